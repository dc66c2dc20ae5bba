//! Bit-exact torch CUDA `randn` on the GPU (spec §5): the device twin of [`super::rng`].
//!
//! torch 2.x fills a float32 CUDA tensor with `normal_` through `distribution_nullary_kernel`
//! (`aten/src/ATen/native/cuda/DistributionTemplates.h`): block 256, grid
//! `min(SMs · maxThreadsPerSM/256, ceil(numel/256))`, thread `idx` runs
//! `curand_init(seed, idx, philox_offset)` on a `curandStatePhilox4_32_10_t` and draws one
//! `curand_normal4` per grid-stride iteration; lane `ii` of iteration `k` lands on element
//! `idx + T·(4k + ii)` (`T = grid·256`); the generator's offset advances by `((numel−1)/(4T) + 1)·4`.
//! The CPU port cannot reproduce curand's Box–Muller bit for bit because `_curand_box_muller` uses the
//! SFU intrinsic `__sincosf` and libdevice `logf`; this module runs the same arithmetic on the device.
//!
//! [`KERNEL_SRC`] is self-contained CUDA C (no curand headers): Philox4x32-10
//! (`curand_philox4x32_x.h`), `curand_init`'s `skipahead_sequence` + `skipahead`, `curand4` with the
//! `STATE` lane shift, and `_curand_box_muller` (`curand_normal.h`) written out with the same
//! expressions, compiled at run time by NVRTC with nvcc's defaults (`-fmad=true`, no ftz, IEEE sqrt/div),
//! as torch's own build compiles curand. The generator state (seed + offset) stays on the host, one per
//! request, like [`super::rng::TorchCudaGenerator`]; nothing global besides the compiled PTX.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Device, Shape, Storage, Tensor};

use super::sana::NoiseSource;
use super::PipelineError;

/// Threads per block of torch's distribution kernels (`block_size_bound`).
const BLOCK_SIZE: u64 = 256;
/// `curand4_engine_calls` / `unroll_factor` of `normal_` for float.
const UNROLL: u64 = 4;

const MODULE_NAME: &str = "fleet_rng_cuda";
const KERNEL_NAME: &str = "fleet_torch_randn_f32";

/// The kernel: torch's `distribution_nullary_kernel` specialised to `normal_` on float32, with curand's
/// Philox and Box–Muller inlined verbatim (expression for expression, so NVVM contracts them the same way).
pub const KERNEL_SRC: &str = r#"
#define PHILOX_W32_0   (0x9E3779B9)
#define PHILOX_W32_1   (0xBB67AE85)
#define PHILOX_M4x32_0 (0xD2511F53)
#define PHILOX_M4x32_1 (0xCD9E8D57)
#define CURAND_2POW32_INV (2.3283064e-10f)
#define CURAND_2POW32_INV_2PI (2.3283064e-10f * 6.2831855f)

struct fu4 { unsigned int x, y, z, w; };
struct ff4 { float x, y, z, w; };
struct ff2 { float x, y; };

struct philox_state {
    fu4 ctr;
    fu4 output;
    unsigned int key_x, key_y;
    unsigned int STATE;
};

__device__ __forceinline__ fu4 philox_round(fu4 ctr, unsigned int kx, unsigned int ky) {
    unsigned int hi0 = __umulhi(PHILOX_M4x32_0, ctr.x);
    unsigned int lo0 = PHILOX_M4x32_0 * ctr.x;
    unsigned int hi1 = __umulhi(PHILOX_M4x32_1, ctr.z);
    unsigned int lo1 = PHILOX_M4x32_1 * ctr.z;
    fu4 ret = {hi1 ^ ctr.y ^ kx, lo1, hi0 ^ ctr.w ^ ky, lo0};
    return ret;
}

__device__ __forceinline__ fu4 philox4x32_10(fu4 c, unsigned int kx, unsigned int ky) {
    #pragma unroll
    for (int r = 0; r < 9; r++) {
        c = philox_round(c, kx, ky);
        kx += PHILOX_W32_0; ky += PHILOX_W32_1;
    }
    return philox_round(c, kx, ky);
}

/* Philox_State_Incr(s, n) */
__device__ __forceinline__ void state_incr_n(philox_state* s, unsigned long long n) {
    unsigned int nlo = (unsigned int)(n);
    unsigned int nhi = (unsigned int)(n >> 32);
    s->ctr.x += nlo;
    if (s->ctr.x < nlo) nhi++;
    s->ctr.y += nhi;
    if (nhi <= s->ctr.y) return;
    if (++s->ctr.z) return;
    ++s->ctr.w;
}

/* Philox_State_Incr_hi(s, n) */
__device__ __forceinline__ void state_incr_hi(philox_state* s, unsigned long long n) {
    unsigned int nlo = (unsigned int)(n);
    unsigned int nhi = (unsigned int)(n >> 32);
    s->ctr.z += nlo;
    if (s->ctr.z < nlo) nhi++;
    s->ctr.w += nhi;
}

/* Philox_State_Incr(s) */
__device__ __forceinline__ void state_incr(philox_state* s) {
    if (++s->ctr.x) return;
    if (++s->ctr.y) return;
    if (++s->ctr.z) return;
    ++s->ctr.w;
}

/* curand_init(seed, subsequence, offset, &state) for curandStatePhilox4_32_10_t */
__device__ __forceinline__ void philox_init(unsigned long long seed, unsigned long long subsequence,
                                            unsigned long long offset, philox_state* s) {
    s->ctr.x = 0; s->ctr.y = 0; s->ctr.z = 0; s->ctr.w = 0;
    s->key_x = (unsigned int)seed;
    s->key_y = (unsigned int)(seed >> 32);
    s->STATE = 0;
    /* skipahead_sequence */
    state_incr_hi(s, subsequence);
    s->output = philox4x32_10(s->ctr, s->key_x, s->key_y);
    /* skipahead */
    s->STATE += (offset & 3);
    unsigned long long n = offset / 4;
    if (s->STATE > 3) { n += 1; s->STATE -= 4; }
    state_incr_n(s, n);
    s->output = philox4x32_10(s->ctr, s->key_x, s->key_y);
}

/* curand4(state) */
__device__ __forceinline__ fu4 philox_curand4(philox_state* s) {
    fu4 r;
    fu4 tmp = s->output;
    state_incr(s);
    s->output = philox4x32_10(s->ctr, s->key_x, s->key_y);
    switch (s->STATE) {
    case 0: return tmp;
    case 1: r.x = tmp.y; r.y = tmp.z; r.z = tmp.w; r.w = s->output.x; break;
    case 2: r.x = tmp.z; r.y = tmp.w; r.z = s->output.x; r.w = s->output.y; break;
    case 3: r.x = tmp.w; r.y = s->output.x; r.z = s->output.y; r.w = s->output.z; break;
    default: return tmp;
    }
    return r;
}

/* _curand_box_muller(x, y), device branch */
__device__ __forceinline__ ff2 box_muller(unsigned int x, unsigned int y) {
    ff2 result;
    float u = x * CURAND_2POW32_INV + (CURAND_2POW32_INV/2);
    float v = y * CURAND_2POW32_INV_2PI + (CURAND_2POW32_INV_2PI/2);
    float s;
    s = sqrtf(-2.0f * logf(u));
    __sincosf(v, &result.x, &result.y);
    result.x *= s;
    result.y *= s;
    return result;
}

/* curand_normal4(state) = curand_box_muller4(state) */
__device__ __forceinline__ ff4 philox_normal4(philox_state* s) {
    ff4 result;
    ff2 r2;
    fu4 x = philox_curand4(s);
    r2 = box_muller(x.x, x.y);
    result.x = r2.x; result.y = r2.y;
    r2 = box_muller(x.z, x.w);
    result.z = r2.x; result.w = r2.y;
    return result;
}

/* distribution_nullary_kernel<float, float, 4>(…, curand_normal4, normal_func(mean=0, std=1)) */
extern "C" __global__ void fleet_torch_randn_f32(float* out, long long numel,
                                                 unsigned long long seed,
                                                 unsigned long long philox_offset) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    philox_state state;
    philox_init(seed, idx, philox_offset, &state);
    long long stride = (long long)blockDim.x * gridDim.x;
    long long rounded_size = ((numel - 1) / (stride * 4) + 1) * stride * 4;
    for (long long linear_index = idx; linear_index < rounded_size; linear_index += stride * 4) {
        ff4 rand = philox_normal4(&state);
        #pragma unroll
        for (int ii = 0; ii < 4; ii++) {
            long long li = linear_index + stride * ii;
            if (li < numel) {
                float r = (&rand.x)[ii];
                out[li] = r * 1.0f + 0.0f;
            }
        }
        __syncthreads();
    }
}
"#;

/// PTX of [`KERNEL_SRC`] per `compute_XY` target, compiled once per process.
fn ptx_for(arch: &str) -> candle_core::Result<String> {
    static PTX: OnceLock<std::sync::Mutex<Vec<(String, String)>>> = OnceLock::new();
    let cache = PTX.get_or_init(Default::default);
    let mut cache = cache
        .lock()
        .map_err(|_| candle_core::Error::Msg("rng_cuda PTX cache poisoned".into()))?;
    if let Some((_, ptx)) = cache.iter().find(|(a, _)| a == arch) {
        return Ok(ptx.clone());
    }
    // nvcc's defaults, spelled out: torch compiles curand without fast math.
    let opts = CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(true),
        use_fast_math: Some(false),
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some("fleet_rng_cuda.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(KERNEL_SRC, opts)
        .map_err(|e| candle_core::Error::Msg(format!("NVRTC compile of the randn kernel: {e}")))?
        .to_src();
    cache.push((arch.to_string(), ptx.clone()));
    Ok(ptx)
}

/// What the launch needs to know about the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceShape {
    pub sm_count: u32,
    pub max_threads_per_sm: u32,
    pub compute_capability: (u32, u32),
}

impl DeviceShape {
    pub fn query(dev: &CudaDevice) -> candle_core::Result<Self> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let attr = |a| -> candle_core::Result<u32> { Ok(ctx.attribute(a).w()?.max(0) as u32) };
        Ok(DeviceShape {
            sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            max_threads_per_sm: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR,
            )?,
            compute_capability: (
                attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
        })
    }

    /// torch's grid cap `multiProcessorCount · (maxThreadsPerMultiProcessor / 256)`.
    pub fn max_blocks(&self) -> u64 {
        (u64::from(self.sm_count) * (u64::from(self.max_threads_per_sm) / BLOCK_SIZE)).max(1)
    }
}

/// torch's `calc_execution_policy` for `numel` elements: `(grid, offset increment)`.
pub fn launch_policy(numel: u64, max_blocks: u64) -> (u64, u64) {
    let grid = numel.div_ceil(BLOCK_SIZE).clamp(1, max_blocks);
    let increment = (numel.saturating_sub(1) / (BLOCK_SIZE * grid * UNROLL) + 1) * UNROLL;
    (grid, increment)
}

/// A seeded torch-CUDA-compatible generator whose draws are computed on `dev`
/// (`torch.Generator(device="cuda").manual_seed(seed)` + `torch.randn(..., generator=g)`).
#[derive(Debug, Clone)]
pub struct CudaTorchGenerator {
    seed: u64,
    /// Philox offset (in 32-bit draws) of the next call.
    offset: u64,
    dev: CudaDevice,
    shape: DeviceShape,
}

impl CudaTorchGenerator {
    /// Reads the SM count of `dev` (it decides which thread writes which element).
    pub fn new(seed: u64, dev: &CudaDevice) -> candle_core::Result<Self> {
        Ok(CudaTorchGenerator {
            seed,
            offset: 0,
            dev: dev.clone(),
            shape: DeviceShape::query(dev)?,
        })
    }

    /// Philox offset the next call starts at.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn device_shape(&self) -> DeviceShape {
        self.shape
    }

    /// One `torch.randn(shape, generator=g, device="cuda", dtype=float32)` call.
    pub fn randn_tensor(&mut self, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let numel = shape.elem_count();
        // SAFETY: every element < numel is written by the kernel below before the tensor is read.
        let mut out = unsafe { self.dev.alloc::<f32>(numel) }?;
        if numel > 0 {
            let n = numel as u64;
            let (grid, increment) = launch_policy(n, self.shape.max_blocks());
            let (major, minor) = self.shape.compute_capability;
            let ptx = ptx_for(&format!("compute_{major}{minor}"))?;
            let func = self
                .dev
                .get_or_load_custom_func(KERNEL_NAME, MODULE_NAME, &ptx)?;
            let cfg = LaunchConfig {
                grid_dim: (grid as u32, 1, 1),
                block_dim: (BLOCK_SIZE as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let numel_i = numel as i64;
            let mut b = func.builder();
            b.arg(&mut out);
            b.arg(&numel_i);
            b.arg(&self.seed);
            b.arg(&self.offset);
            // SAFETY: argument types match the kernel signature (float*, long long, u64, u64) and `out`
            // holds `numel` floats.
            unsafe { b.launch(cfg) }.w()?;
            self.offset += increment;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.dev.clone()));
        Ok(Tensor::from_storage(
            storage,
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}

impl NoiseSource for CudaTorchGenerator {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor, PipelineError> {
        let t = self.randn_tensor(shape)?;
        if device.same_device(&Device::Cuda(self.dev.clone())) {
            Ok(t)
        } else {
            Ok(t.to_device(device)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_policy_matches_torch() {
        // H100/H200: 132 SMs × 2048 threads → 1056 blocks.
        let max = 132 * 8;
        assert_eq!(launch_policy(2048, max), (8, 4));
        assert_eq!(launch_policy(32 * 32 * 32, max), (128, 4));
        // 522,240 > 270,336 threads: capped grid, one normal4 per thread still covers it.
        assert_eq!(launch_policy(2 * 32 * 68 * 120, max), (1056, 4));
        assert_eq!(launch_policy(4 * 32 * 120 * 68 * 2, max), (1056, 8));
        assert_eq!(launch_policy(1, max), (1, 4));
    }
}
