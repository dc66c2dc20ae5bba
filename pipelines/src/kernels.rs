//! Our CUDA kernels, launched on candle's tensors (the `cuda` feature).
//!
//! The CUDA C lives in `kernels/*.cu` beside this file, each file prefixed with `kernels/common.cuh`
//! (bf16 as raw bits, vector loads, block reductions: no CUDA headers needed). **Compilation: at run time
//! with NVRTC**, once per process and architecture (`compute_XY` PTX, cached), as `rng_cuda.rs` does, so
//! the build needs no nvcc for our kernels and the same sources load in `bench/kernel_harness.py` through
//! CuPy. [`preload`] compiles and loads every module; the pipelines call it when they are loaded on a CUDA
//! device, so no user request waits on NVRTC or on the driver's PTX JIT.
//!
//! Each launcher takes candle tensors, checks dtype (bf16 or f32), device and layout, and returns a new
//! tensor; inputs are read through their storage at the layout's offset (no copies). A kernel with four or
//! more tensor operands does not fit candle's `CustomOp1/2/3`, so all launchers use the storage directly,
//! the way `rng_cuda` does. The portable candle bodies in [`super::ops`] are the reference and the CPU
//! path; [`super::ops`] picks this path only for CUDA tensors.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};

mod gemma;

use gemma::GEMMA;
pub use gemma::{gemma_gelu_mul, gemma_norm, gemma_norm_fits, gemma_rope_split, gemma_softmax};

const COMMON: &str = include_str!("kernels/common.cuh");

/// One `.cu` file: its module name and source.
#[derive(Clone, Copy)]
struct Source {
    module: &'static str,
    code: &'static str,
}

const DWCONV: Source = Source {
    module: "fleet_dwconv",
    code: include_str!("kernels/dwconv.cu"),
};
const LINEAR_ATTN: Source = Source {
    module: "fleet_linear_attn",
    code: include_str!("kernels/linear_attn.cu"),
};
const NORM: Source = Source {
    module: "fleet_norm",
    code: include_str!("kernels/norm.cu"),
};
const IMAGE: Source = Source {
    module: "fleet_image",
    code: include_str!("kernels/image.cu"),
};
const ATTENTION: Source = Source {
    module: "fleet_attention",
    code: include_str!("kernels/attention.cu"),
};
const ALL: [Source; 6] = [DWCONV, LINEAR_ATTN, NORM, IMAGE, ATTENTION, GEMMA];

/// One function of each module, loaded by [`preload`] (loading one function loads its whole module).
/// `attention.cu` uses bf16 tensor-core `mma` (sm_80 and later): loaded only where [`flash_attention_ok`].
const PRELOAD: [(Source, &str); 6] = [
    (DWCONV, "dwconv_bf16_v8_k3_glu"),
    (LINEAR_ATTN, "la_kv_reduce"),
    (NORM, "ln_modulate_bf16"),
    (IMAGE, "rgb_u8_bf16"),
    (ATTENTION, "xattn_bf16_d32"),
    (GEMMA, "gemma_norm_bf16_m4"),
];

fn ptx(src: Source, arch: &str) -> Result<String> {
    type Cache = Mutex<Vec<(String, String, String)>>;
    static PTX: OnceLock<Cache> = OnceLock::new();
    let cache = PTX.get_or_init(Default::default);
    let mut cache = cache
        .lock()
        .map_err(|_| candle_core::Error::Msg("kernel PTX cache poisoned".into()))?;
    if let Some((_, _, p)) = cache.iter().find(|(m, a, _)| m == src.module && a == arch) {
        return Ok(p.clone());
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
        name: Some(format!("{}.cu", src.module)),
        ..Default::default()
    };
    let code = format!("{COMMON}\n{}", src.code);
    let p = compile_ptx_with_opts(code, opts)
        .map_err(|e| candle_core::Error::Msg(format!("NVRTC compile of {}: {e}", src.module)))?
        .to_src();
    cache.push((src.module.to_string(), arch.to_string(), p.clone()));
    Ok(p)
}

fn arch(dev: &CudaDevice) -> Result<String> {
    static ARCH: OnceLock<String> = OnceLock::new();
    if let Some(a) = ARCH.get() {
        return Ok(a.clone());
    }
    let (major, minor) = super::rng_cuda::DeviceShape::query(dev)?.compute_capability;
    Ok(ARCH
        .get_or_init(|| format!("compute_{major}{minor}"))
        .clone())
}

/// The stream of `dev` and kernel `name` of `src`; each module is loaded once per device, each function
/// looked up once.
fn poisoned<E>(_: E) -> candle_core::Error {
    candle_core::Error::Msg("kernel cache poisoned".into())
}

fn func(dev: &CudaDevice, src: Source, name: &str) -> Result<(Arc<CudaStream>, CudaFunction)> {
    type Modules = Mutex<Vec<(DeviceId, &'static str, Arc<CudaModule>)>>;
    type Funcs = Mutex<Vec<(DeviceId, String, CudaFunction)>>;
    static MODULES: OnceLock<Modules> = OnceLock::new();
    static FUNCS: OnceLock<Funcs> = OnceLock::new();
    let stream = dev.cuda_stream();
    let mut funcs = FUNCS
        .get_or_init(Default::default)
        .lock()
        .map_err(poisoned)?;
    if let Some((_, _, f)) = funcs.iter().find(|(d, n, _)| *d == dev.id() && n == name) {
        return Ok((stream, f.clone()));
    }
    let module = {
        let mut modules = MODULES
            .get_or_init(Default::default)
            .lock()
            .map_err(poisoned)?;
        match modules
            .iter()
            .find(|(d, m, _)| *d == dev.id() && *m == src.module)
        {
            Some((_, _, m)) => Arc::clone(m),
            None => {
                let p = ptx(src, &arch(dev)?)?;
                let m = stream.context().load_module(Ptx::from_src(p)).w()?;
                modules.push((dev.id(), src.module, Arc::clone(&m)));
                m
            }
        }
    };
    let f = module.load_function(name).w()?;
    funcs.push((dev.id(), name.to_string(), f.clone()));
    Ok((stream, f))
}

/// Compiles (NVRTC) and loads every kernel module on `dev`. Idempotent; seconds the first time.
pub fn preload(dev: &CudaDevice) -> Result<()> {
    for (src, name) in PRELOAD {
        if src.module == ATTENTION.module && !flash_attention_ok(dev)? {
            continue;
        }
        func(dev, src, name)?;
    }
    debug_assert_eq!(ALL.len(), PRELOAD.len());
    Ok(())
}

fn cuda_dev(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        other => bail!("kernel launch needs a CUDA tensor, got {other:?}"),
    }
}

/// Kernel-name suffix and vector width (16-byte accesses) of a dtype.
fn tag(dtype: DType) -> Result<(&'static str, usize)> {
    match dtype {
        DType::BF16 => Ok(("bf16", 8)),
        DType::F32 => Ok(("f32", 4)),
        other => bail!("no fleet kernel for {other:?}"),
    }
}

/// Whether the kernels take this dtype (others use the portable path).
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F32)
}

fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(layout.start_offset()..)),
        _ => bail!("kernel operand is not on a CUDA device"),
    }
}

fn wrap<T: CudaDType>(
    out: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn require_contiguous(name: &str, t: &Tensor) -> Result<()> {
    if !t.is_contiguous() {
        bail!("{name}: operand {:?} must be contiguous", t.dims());
    }
    Ok(())
}

fn grid_1d(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (total.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Null pointer for an absent optional operand.
const NULL: u64 = 0;

/// Depthwise k×k conv (stride 1, zero padding k/2) on channels-last `x` `(B, H, W, Cin)`, with the
/// input transformed as `silu(x + in_bias)` when asked, and with `glu` the output `a · silu(gate)` of the
/// two channel halves. `taps`: `(k, k, Cin)`. Returns `(B, H, W, Cin / (1 + glu))`.
pub fn dwconv_nhwc(
    x: &Tensor,
    taps: &Tensor,
    bias: Option<&Tensor>,
    in_bias: Option<&Tensor>,
    in_silu: bool,
    glu: bool,
) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => dwconv_typed::<half::bf16>(x, taps, bias, in_bias, in_silu, glu),
        DType::F32 => dwconv_typed::<f32>(x, taps, bias, in_bias, in_silu, glu),
        other => bail!("dwconv_nhwc: no kernel for {other:?}"),
    }
}

fn dwconv_typed<T: CudaDType + WithDType + DeviceRepr>(
    x: &Tensor,
    taps: &Tensor,
    bias: Option<&Tensor>,
    in_bias: Option<&Tensor>,
    in_silu: bool,
    glu: bool,
) -> Result<Tensor> {
    let dev = cuda_dev(x)?;
    let (b, h, w, cin) = x.dims4()?;
    let (k, k2, tc) = taps.dims3()?;
    if k != k2 || tc != cin || k % 2 == 0 || (glu && cin % 2 != 0) {
        bail!(
            "dwconv_nhwc: taps {:?} do not fit x {:?}",
            taps.dims(),
            x.dims()
        );
    }
    for t in [Some(x), Some(taps), bias, in_bias].into_iter().flatten() {
        require_contiguous("dwconv_nhwc", t)?;
        if t.dtype() != x.dtype() {
            bail!("dwconv_nhwc: mixed dtypes");
        }
    }
    let cout = if glu { cin / 2 } else { cin };
    let (suffix, vec) = tag(x.dtype())?;
    let v = if cout % vec == 0 { vec } else { 1 };
    let fast = v > 1 && (k == 3 || (!glu && k == 5));
    let name = format!(
        "dwconv_{suffix}_{}{}",
        if fast {
            format!("v{v}_k{k}")
        } else {
            "v1_kn".to_string()
        },
        if glu { "_glu" } else { "" }
    );
    let v = if fast { v } else { 1 };
    let (stream_f, f) = func(&dev, DWCONV, &name)?;
    let n_out = b * h * w * cout;
    let mut out = unsafe { dev.alloc::<T>(n_out) }?;
    let (xs, xl) = x.storage_and_layout();
    let (ts, tl) = taps.storage_and_layout();
    let xv = view::<T>(&xs, xl)?;
    let tv = view::<T>(&ts, tl)?;
    let bias_g = bias.map(|t| t.storage_and_layout());
    let in_bias_g = in_bias.map(|t| t.storage_and_layout());
    let bias_v = match &bias_g {
        Some((s, l)) => Some(view::<T>(s, l)?),
        None => None,
    };
    let in_bias_v = match &in_bias_g {
        Some((s, l)) => Some(view::<T>(s, l)?),
        None => None,
    };
    let (bi, hi, wi, ci, ki, silu_i) = (
        b as i32,
        h as i32,
        w as i32,
        cin as i32,
        k as i32,
        i32::from(in_silu),
    );
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(&xv);
    lb.arg(&tv);
    match &bias_v {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
    match &in_bias_v {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
    lb.arg(&silu_i);
    lb.arg(&mut out);
    lb.arg(&bi);
    lb.arg(&hi);
    lb.arg(&wi);
    lb.arg(&ci);
    lb.arg(&ki);
    unsafe { lb.launch(grid_1d(n_out / v)) }.w()?;
    Ok(wrap(out, &dev, (b, h, w, cout)))
}

/// ReLU linear attention on `(B, N, G, d)` views whose last dim is contiguous (any strides for the
/// others, e.g. narrowed q|k|v groups). Returns `(B, N, G·d)` in the inputs' dtype, f32 accumulation.
pub fn relu_linear_attention_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    relu_linear_attention_parts(&[(q.clone(), k.clone(), v.clone())], eps)
}

/// [`relu_linear_attention_tokens`] of several `(q, k, v)` parts (each `(B, N, G_i, d)`, its own strides)
/// as if their groups were concatenated: `(B, N, (Σ G_i)·d)`, part `i`'s groups after those of the parts
/// before it. Each part is attended on its own and writes its columns of the one output, so the inputs
/// are never concatenated (the DC-AE's scales).
pub fn relu_linear_attention_parts(parts: &[(Tensor, Tensor, Tensor)], eps: f64) -> Result<Tensor> {
    let Some((q0, _, _)) = parts.first() else {
        bail!("relu_linear_attention_parts: no parts");
    };
    match q0.dtype() {
        DType::BF16 => linear_attention_typed::<half::bf16>(parts, eps),
        DType::F32 => linear_attention_typed::<f32>(parts, eps),
        other => bail!("relu_linear_attention_tokens: no kernel for {other:?}"),
    }
}

/// `(sb, sn, sg)` element strides of a `(B, N, G, d)` view with unit stride on `d`.
fn token_strides(name: &str, t: &Tensor) -> Result<(i64, i64, i64)> {
    let s = t.layout().stride();
    if s.len() != 4 || (s[3] != 1 && t.dim(3)? > 1) {
        bail!(
            "{name}: layout {:?} needs a contiguous last dim",
            t.layout()
        );
    }
    Ok((s[0] as i64, s[1] as i64, s[2] as i64))
}

fn linear_attention_typed<T: CudaDType + WithDType + DeviceRepr>(
    parts: &[(Tensor, Tensor, Tensor)],
    eps: f64,
) -> Result<Tensor> {
    const NAME: &str = "relu_linear_attention_tokens";
    let (q0, _, _) = &parts[0];
    let dev = cuda_dev(q0)?;
    let (b, n, _, d) = q0.dims4()?;
    let mut g_out = 0;
    for (q, k, v) in parts {
        let (qb, qn, g, qd) = q.dims4()?;
        if (qb, qn, qd) != (b, n, d)
            || k.dims() != q.dims()
            || v.dims() != q.dims()
            || d > 64
            || d == 0
            || q.dtype() != q0.dtype()
        {
            bail!(
                "{NAME}: q {:?} k {:?} v {:?} (head dim ≤ 64, parts alike but for their groups)",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        g_out += g;
    }
    let mut out = unsafe { dev.alloc::<T>(b * n * g_out * d) }?;
    let mut g0 = 0;
    for (q, k, v) in parts {
        let g = q.dim(2)?;
        let mut out_part = out.slice_mut(g0 * d..);
        linear_attention_part::<T>(q, k, v, eps, &dev, &mut out_part, g_out)?;
        g0 += g;
    }
    Ok(wrap(out, &dev, (b, n, g_out * d)))
}

/// One part of [`linear_attention_typed`]: writes groups `0..G` of `out`, rows of `g_out` groups.
fn linear_attention_part<T: CudaDType + WithDType + DeviceRepr>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    eps: f64,
    dev: &CudaDevice,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, T>,
    g_out: usize,
) -> Result<()> {
    const NAME: &str = "relu_linear_attention_tokens";
    let (b, n, g, d) = q.dims4()?;
    let st = token_strides(NAME, q)?;
    if token_strides(NAME, k)? != st || token_strides(NAME, v)? != st {
        bail!("{NAME}: q, k, v must share strides");
    }
    let (dt, _) = tag(q.dtype())?;
    let suffix = if d == 32 {
        format!("{dt}_d32")
    } else {
        dt.to_string()
    };
    let bg = b * g;
    let p = d * (d + 1);
    // Enough blocks to fill the card (≈ 8 per SM on 132 SMs) with one batch row's g heads, chunks a
    // multiple of the 32-token tile. The chunking fixes the summation order of kv, so it depends on one
    // row's shape only and a row sums alike in any batch (issue 14); with batch invariance off
    // (`ops::set_batch_invariant`) it is sized for the whole batch, as before.
    let per_fill = if crate::ops::batch_invariant() { g } else { bg };
    let want = (8 * 132usize)
        .div_ceil(per_fill)
        .clamp(1, n.div_ceil(32).max(1));
    let chunk = n.div_ceil(want).div_ceil(32) * 32;
    let nchunks = n.div_ceil(chunk);
    let mut partial = unsafe { dev.alloc::<f32>(bg * nchunks * p) }?;
    let mut kv = unsafe { dev.alloc::<f32>(bg * p) }?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qv, kvw, vv) = (
        view::<T>(&qs, ql)?,
        view::<T>(&ks, kl)?,
        view::<T>(&vs, vl)?,
    );
    let (gi, goi, ni, di) = (g as i32, g_out as i32, n as i32, d as i32);
    let (sb, sn, sg) = st;
    let chunk_i = chunk as i32;
    let (stream_f1, f1) = func(dev, LINEAR_ATTN, &format!("la_kv_partial_{suffix}"))?;
    let mut lb = stream_f1.launch_builder(&f1);
    lb.arg(&kvw);
    lb.arg(&vv);
    lb.arg(&mut partial);
    lb.arg(&gi);
    lb.arg(&ni);
    lb.arg(&di);
    lb.arg(&sb);
    lb.arg(&sn);
    lb.arg(&sg);
    lb.arg(&chunk_i);
    let cfg = LaunchConfig {
        grid_dim: (bg as u32, nchunks as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;

    let (stream_f2, f2) = func(dev, LINEAR_ATTN, "la_kv_reduce")?;
    let (bgi, nci, pi) = (bg as i32, nchunks as i32, p as i32);
    let mut lb = stream_f2.launch_builder(&f2);
    lb.arg(&partial);
    lb.arg(&mut kv);
    lb.arg(&bgi);
    lb.arg(&nci);
    lb.arg(&pi);
    unsafe { lb.launch(grid_1d(bg * p)) }.w()?;

    let (stream_f3, f3) = func(dev, LINEAR_ATTN, &format!("la_apply_{suffix}"))?;
    let eps_f = eps as f32;
    let mut lb = stream_f3.launch_builder(&f3);
    lb.arg(&qv);
    lb.arg(&kv);
    lb.arg(out);
    lb.arg(&gi);
    lb.arg(&goi);
    lb.arg(&ni);
    lb.arg(&di);
    lb.arg(&sb);
    lb.arg(&sn);
    lb.arg(&sg);
    lb.arg(&eps_f);
    let cfg = LaunchConfig {
        grid_dim: (bg as u32, n.div_ceil(64) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(())
}

/// `LayerNorm(x) · (1 + table[scale_i] + temb6[b, scale_i]) + table[shift_i] + temb6[b, shift_i]`.
/// `x`: `(B, N, D)`; `table`: `(6, D)`; `temb6`: `(B, 6·D)`.
pub fn layer_norm_modulate(
    x: &Tensor,
    table: &Tensor,
    temb6: &Tensor,
    shift_i: usize,
    scale_i: usize,
    eps: f64,
) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => ln_modulate_typed::<half::bf16>(x, table, temb6, shift_i, scale_i, eps),
        DType::F32 => ln_modulate_typed::<f32>(x, table, temb6, shift_i, scale_i, eps),
        other => bail!("layer_norm_modulate: no kernel for {other:?}"),
    }
}

fn check_mods(
    name: &str,
    x: &Tensor,
    table: &Tensor,
    temb6: &Tensor,
) -> Result<(usize, usize, usize)> {
    let (b, n, d) = x.dims3()?;
    if table.dims() != [6, d] || temb6.dims() != [b, 6 * d] {
        bail!(
            "{name}: table {:?} / temb6 {:?} do not fit x {:?}",
            table.dims(),
            temb6.dims(),
            x.dims()
        );
    }
    for t in [x, table, temb6] {
        require_contiguous(name, t)?;
        if t.dtype() != x.dtype() {
            bail!("{name}: mixed dtypes");
        }
    }
    Ok((b, n, d))
}

fn ln_modulate_typed<T: CudaDType + WithDType + DeviceRepr>(
    x: &Tensor,
    table: &Tensor,
    temb6: &Tensor,
    shift_i: usize,
    scale_i: usize,
    eps: f64,
) -> Result<Tensor> {
    let (b, n, d) = check_mods("layer_norm_modulate", x, table, temb6)?;
    let dev = cuda_dev(x)?;
    let (suffix, _) = tag(x.dtype())?;
    let (stream_f, f) = func(&dev, NORM, &format!("ln_modulate_{suffix}"))?;
    let mut out = unsafe { dev.alloc::<T>(b * n * d) }?;
    let (xs, xl) = x.storage_and_layout();
    let (ts, tl) = table.storage_and_layout();
    let (es, el) = temb6.storage_and_layout();
    let (xv, tv, ev) = (
        view::<T>(&xs, xl)?,
        view::<T>(&ts, tl)?,
        view::<T>(&es, el)?,
    );
    let (ni, di, si, ci, epsf) = (
        n as i32,
        d as i32,
        shift_i as i32,
        scale_i as i32,
        eps as f32,
    );
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(&xv);
    lb.arg(&tv);
    lb.arg(&ev);
    lb.arg(&mut out);
    lb.arg(&ni);
    lb.arg(&di);
    lb.arg(&si);
    lb.arg(&ci);
    lb.arg(&epsf);
    let cfg = LaunchConfig {
        grid_dim: ((b * n) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(wrap(out, &dev, (b, n, d)))
}

/// `x + y · (table[gate_i] + temb6[b, gate_i])`, all `(B, N, D)` but the table rows.
pub fn gated_residual(
    x: &Tensor,
    y: &Tensor,
    table: &Tensor,
    temb6: &Tensor,
    gate_i: usize,
) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => gated_residual_typed::<half::bf16>(x, y, table, temb6, gate_i),
        DType::F32 => gated_residual_typed::<f32>(x, y, table, temb6, gate_i),
        other => bail!("gated_residual: no kernel for {other:?}"),
    }
}

fn gated_residual_typed<T: CudaDType + WithDType + DeviceRepr>(
    x: &Tensor,
    y: &Tensor,
    table: &Tensor,
    temb6: &Tensor,
    gate_i: usize,
) -> Result<Tensor> {
    let (b, n, d) = check_mods("gated_residual", x, table, temb6)?;
    if y.dims() != x.dims() || y.dtype() != x.dtype() {
        bail!(
            "gated_residual: y {:?} does not match x {:?}",
            y.dims(),
            x.dims()
        );
    }
    require_contiguous("gated_residual", y)?;
    let dev = cuda_dev(x)?;
    let (suffix, vec) = tag(x.dtype())?;
    let v = if d.is_multiple_of(vec) && [x, y, table, temb6].iter().all(|t| aligned(t, vec)) {
        vec
    } else {
        1
    };
    let name = if v > 1 {
        format!("gated_residual_{suffix}_v{v}")
    } else {
        format!("gated_residual_{suffix}")
    };
    let (stream_f, f) = func(&dev, NORM, &name)?;
    let total = b * n * d;
    let mut out = unsafe { dev.alloc::<T>(total) }?;
    let (xs, xl) = x.storage_and_layout();
    let (ys, yl) = y.storage_and_layout();
    let (ts, tl) = table.storage_and_layout();
    let (es, el) = temb6.storage_and_layout();
    let (xv, yv) = (view::<T>(&xs, xl)?, view::<T>(&ys, yl)?);
    let (tv, ev) = (view::<T>(&ts, tl)?, view::<T>(&es, el)?);
    let (tot, ni, di, gi) = (total as i64, n as i32, d as i32, gate_i as i32);
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(&xv);
    lb.arg(&yv);
    lb.arg(&tv);
    lb.arg(&ev);
    lb.arg(&mut out);
    lb.arg(&tot);
    lb.arg(&ni);
    lb.arg(&di);
    lb.arg(&gi);
    unsafe { lb.launch(grid_1d(total / v)) }.w()?;
    Ok(wrap(out, &dev, (b, n, d)))
}

/// Whether `t`'s first element sits on a 16-byte boundary for `vec`-element accesses (allocations are;
/// a view may start anywhere).
fn aligned(t: &Tensor, vec: usize) -> bool {
    t.layout().start_offset().is_multiple_of(vec)
}

/// `t` contiguous and 16-byte aligned for `vec`-element accesses: itself when it is, else a fresh copy.
fn vec_ready(t: &Tensor, vec: usize) -> Result<Tensor> {
    if t.is_contiguous() && aligned(t, vec) {
        Ok(t.clone())
    } else {
        t.copy()
    }
}

/// `softmax(scores · scale + mask[b])` over the last dim, in `out_dtype`. `scores`: `(B, ..., T)` f32;
/// `mask`: `(B, 1, 1, T)` (or any shape of `B·T` elements) f32, additive.
pub fn masked_softmax(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
    out_dtype: DType,
) -> Result<Tensor> {
    match out_dtype {
        DType::BF16 => masked_softmax_typed::<half::bf16>(scores, mask, scale),
        DType::F32 => masked_softmax_typed::<f32>(scores, mask, scale),
        other => bail!("masked_softmax: no kernel for {other:?}"),
    }
}

fn masked_softmax_typed<T: CudaDType + WithDType + DeviceRepr>(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let (b, t) = (dims[0], *dims.last().unwrap_or(&0));
    if scores.dtype() != DType::F32 || mask.dtype() != DType::F32 || mask.elem_count() != b * t {
        bail!(
            "masked_softmax: scores {:?} {:?}, mask {:?} {:?}",
            scores.dims(),
            scores.dtype(),
            mask.dims(),
            mask.dtype()
        );
    }
    require_contiguous("masked_softmax", scores)?;
    require_contiguous("masked_softmax", mask)?;
    let dev = cuda_dev(scores)?;
    let rows = scores.elem_count() / t.max(1);
    let (suffix, _) = tag(T::DTYPE)?;
    let (stream_f, f) = func(&dev, NORM, &format!("masked_softmax_{suffix}"))?;
    let mut out = unsafe { dev.alloc::<T>(scores.elem_count()) }?;
    let (ss, sl) = scores.storage_and_layout();
    let (ms, ml) = mask.storage_and_layout();
    let (sv, mv) = (view::<f32>(&ss, sl)?, view::<f32>(&ms, ml)?);
    let (rows_i, rpb, ti, sc) = (rows as i64, (rows / b) as i32, t as i32, scale as f32);
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(&sv);
    lb.arg(&mv);
    lb.arg(&mut out);
    lb.arg(&rows_i);
    lb.arg(&rpb);
    lb.arg(&ti);
    lb.arg(&sc);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(wrap(out, &dev, dims))
}

/// `y + bias` (row broadcast over the last dim), plus `residual` when given, into a new tensor.
pub fn add_bias_rows(y: Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    bias_rows_act(y, bias, residual, false)
}

/// [`add_bias_rows`] followed by SiLU when `silu`.
pub fn bias_rows_act(
    y: Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    match y.dtype() {
        DType::BF16 => bias_rows_typed::<half::bf16>(y, bias, residual, silu),
        DType::F32 => bias_rows_typed::<f32>(y, bias, residual, silu),
        other => bail!("add_bias_rows: no kernel for {other:?}"),
    }
}

fn bias_rows_typed<T: CudaDType + WithDType + DeviceRepr>(
    y: Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    let dims = y.dims().to_vec();
    let n = *dims.last().unwrap_or(&0);
    if bias.dims() != [n] || bias.dtype() != y.dtype() {
        bail!(
            "add_bias_rows: bias {:?} does not fit {:?}",
            bias.dims(),
            dims
        );
    }
    if residual.is_some_and(|r| r.dims() != y.dims() || r.dtype() != y.dtype()) {
        bail!("add_bias_rows: residual does not match {:?}", dims);
    }
    let dev = cuda_dev(&y)?;
    let total = y.elem_count();
    let mut out = unsafe { dev.alloc::<T>(total) }?;
    let yc = y.contiguous()?;
    let (ys, yl) = yc.storage_and_layout();
    let yv = view::<T>(&ys, yl)?;
    let (suffix, vec) = tag(T::DTYPE)?;
    let v = if n.is_multiple_of(vec) { vec } else { 1 };
    let (stream_f, f) = func(&dev, NORM, &format!("bias_rows_{suffix}_v{v}"))?;
    let bc = bias.contiguous()?;
    let (bs, bl) = bc.storage_and_layout();
    let bv = view::<T>(&bs, bl)?;
    let rc = residual.map(|r| r.contiguous()).transpose()?;
    let res_g = rc.as_ref().map(|t| t.storage_and_layout());
    let res_v = match &res_g {
        Some((s, l)) => Some(view::<T>(s, l)?),
        None => None,
    };
    let (tot, ni, si) = (total as i64, n as i32, i32::from(silu));
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(&yv);
    lb.arg(&bv);
    match &res_v {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
    lb.arg(&mut out);
    lb.arg(&tot);
    lb.arg(&ni);
    lb.arg(&si);
    unsafe { lb.launch(grid_1d(total / v)) }.w()?;
    drop(lb);
    Ok(wrap(out, &dev, dims))
}

/// Dense 2-D convolution, channels-last, stride 1, dilation 1, through cuDNN: `x` `(B, H, W, Cin)`,
/// `weight` `(Cout, kh, kw, Cin)` (KRSC, the PyTorch weight permuted once), NHWC descriptors, so cuDNN's
/// sm90 implicit-GEMM kernels run without the NCHW↔NHWC transposes it inserted around every NCHW conv
/// (6.6 of 41.5 ms of a 1024² decode on the H200, `bench/results/2026-12-01-h200-profile-after.md`).
/// Tensor-op math for bf16 (f32 compute), default math for f32. The algorithm is chosen once per shape
/// by cuDNN's heuristics and cached; the workspace is allocated per call. Then `act(y + bias)` in one
/// row-broadcast pass. candle's own cuDNN path is NCHW-only and leaves the math type at its default, where
/// cuDNN picked an FFMA implicit GEMM (no tensor cores: 240 of 300 ms of a 1024² decode on an H200).
pub fn conv2d_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    silu: bool,
) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => conv2d_typed::<half::bf16>(x, weight, bias, padding, silu),
        DType::F32 => conv2d_typed::<f32>(x, weight, bias, padding, silu),
        other => bail!("conv2d_nhwc: no kernel for {other:?}"),
    }
}

type ConvKey = (DeviceId, DType, [usize; 8]);
type ConvAlgo = candle_core::cuda_backend::cudarc::cudnn::sys::cudnnConvolutionFwdAlgo_t;

thread_local! {
    // cuDNN handles are neither Send nor Sync: one per thread and device, as candle keeps them.
    static CUDNN: std::cell::RefCell<Vec<(DeviceId, Arc<candle_core::cuda_backend::cudarc::cudnn::Cudnn>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn conv_algos() -> &'static Mutex<Vec<(ConvKey, ConvAlgo, usize)>> {
    static ALGOS: OnceLock<Mutex<Vec<(ConvKey, ConvAlgo, usize)>>> = OnceLock::new();
    ALGOS.get_or_init(Default::default)
}

fn conv2d_typed<T>(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    silu: bool,
) -> Result<Tensor>
where
    T: CudaDType
        + WithDType
        + DeviceRepr
        + candle_core::cuda_backend::cudarc::cudnn::CudnnDataType
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
{
    use candle_core::cuda_backend::cudarc::cudnn::{sys as dnn, ConvForward, Cudnn};
    let dev = cuda_dev(x)?;
    let (b, h, w, cin) = x.dims4()?;
    let (cout, kh, kw, wcin) = weight.dims4()?;
    if wcin != cin || weight.dtype() != x.dtype() || bias.is_some_and(|t| t.dims() != [cout]) {
        bail!(
            "conv2d_nhwc: weight {:?} / bias do not fit x {:?}",
            weight.dims(),
            x.dims()
        );
    }
    let (ho, wo) = (h + 2 * padding + 1 - kh, w + 2 * padding + 1 - kw);
    let cudnn = CUDNN.with(|c| -> Result<Arc<Cudnn>> {
        let mut c = c.borrow_mut();
        if let Some((_, h)) = c.iter().find(|(d, _)| *d == dev.id()) {
            return Ok(Arc::clone(h));
        }
        let h = Cudnn::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?;
        c.push((dev.id(), Arc::clone(&h)));
        Ok(h)
    })?;
    let dnn_err = candle_core::Error::wrap;
    let p = padding as i32;
    let mut conv = cudnn
        .create_conv2d::<f32>(
            [p, p],
            [1, 1],
            [1, 1],
            dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(dnn_err)?;
    if x.dtype() == DType::BF16 {
        conv.set_math_type(dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
            .map_err(dnn_err)?;
    }
    let nhwc = dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    let i = |v: usize| v as i32;
    let xd = cudnn
        .create_4d_tensor::<T>(nhwc, [i(b), i(cin), i(h), i(w)])
        .map_err(dnn_err)?;
    let wd = cudnn
        .create_4d_filter::<T>(nhwc, [i(cout), i(cin), i(kh), i(kw)])
        .map_err(dnn_err)?;
    let yd = cudnn
        .create_4d_tensor::<T>(nhwc, [i(b), i(cout), i(ho), i(wo)])
        .map_err(dnn_err)?;
    let fwd = ConvForward {
        conv: &conv,
        x: &xd,
        w: &wd,
        y: &yd,
    };
    let key: ConvKey = (dev.id(), x.dtype(), [b, cin, h, w, cout, kh, kw, padding]);
    let cached = conv_algos()
        .lock()
        .map_err(poisoned)?
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, a, ws)| (*a, *ws));
    let (algo, ws_size) = match cached {
        Some(v) => v,
        None => {
            let algo = fwd.pick_algorithm().map_err(dnn_err)?;
            let ws = fwd.get_workspace_size(algo).map_err(dnn_err)?;
            conv_algos().lock().map_err(poisoned)?.push((key, algo, ws));
            (algo, ws)
        }
    };
    let xc = x.contiguous()?;
    let wc = weight.contiguous()?;
    let mut out = unsafe { dev.alloc::<T>(b * cout * ho * wo) }?;
    {
        let (xs, xl) = xc.storage_and_layout();
        let (ws, wl) = wc.storage_and_layout();
        let (xv, wv) = (view::<T>(&xs, xl)?, view::<T>(&ws, wl)?);
        let mut workspace = unsafe { dev.alloc::<u8>(ws_size.max(1)) }?;
        unsafe {
            fwd.launch::<_, _, _, _>(
                algo,
                Some(&mut workspace),
                (T::one(), T::zero()),
                &xv,
                &wv,
                &mut out,
            )
        }
        .map_err(dnn_err)?;
    }
    let y = wrap(out, &dev, (b, ho, wo, cout));
    match bias {
        Some(bias) => bias_rows_act(y, bias, None, silu),
        None if silu => y.silu(),
        None => Ok(y),
    }
}

/// `(P, A, C, D)` → `(P, C, A, D)` contiguous, cast to `out_dtype` (bf16→f32, bf16→bf16 or f32→f32).
pub fn permute0213(x: &Tensor, out_dtype: DType) -> Result<Tensor> {
    let (p, a, c, d) = x.dims4()?;
    require_contiguous("permute0213", x)?;
    let dev = cuda_dev(x)?;
    let (name, v) = match (x.dtype(), out_dtype) {
        (DType::BF16, DType::F32) => ("permute0213_bf16_f32_v4", 4),
        (DType::BF16, DType::BF16) => ("permute0213_bf16_bf16_v8", 8),
        (DType::F32, DType::F32) => ("permute0213_f32_f32_v4", 4),
        (i, o) => bail!("permute0213: no kernel for {i:?} -> {o:?}"),
    };
    if d % v != 0 {
        bail!("permute0213: last dim {d} is not a multiple of {v}");
    }
    let total = p * a * c * d;
    let (stream_f, f) = func(&dev, NORM, name)?;
    let (xs, xl) = x.storage_and_layout();
    let (pi, ai, ci, di) = (p as i32, a as i32, c as i32, d as i32);
    macro_rules! go {
        ($ti:ty, $to:ty) => {{
            let xv = view::<$ti>(&xs, xl)?;
            let mut out = unsafe { dev.alloc::<$to>(total) }?;
            let mut lb = stream_f.launch_builder(&f);
            lb.arg(&xv);
            lb.arg(&mut out);
            lb.arg(&pi);
            lb.arg(&ai);
            lb.arg(&ci);
            lb.arg(&di);
            unsafe { lb.launch(grid_1d(total / v)) }.w()?;
            drop(lb);
            Ok(wrap(out, &dev, (p, c, a, d)))
        }};
    }
    match (x.dtype(), out_dtype) {
        (DType::BF16, DType::F32) => go!(half::bf16, f32),
        (DType::BF16, DType::BF16) => go!(half::bf16, half::bf16),
        _ => go!(f32, f32),
    }
}

/// Lanes per row of `rms_rows` for `nv` vectors a row, and the kernel's per-lane capacity (2 or 4: the
/// `_m2` / `_m4` kernels): at least two vectors a lane where the row allows, so loads overlap.
fn rms_lanes(nv: usize) -> Option<(usize, usize)> {
    let lpr = [32usize, 16, 8, 4, 2, 1]
        .into_iter()
        .find(|l| nv >= 2 * l)
        .unwrap_or(1);
    match nv.div_ceil(lpr) {
        0..=2 => Some((lpr, 2)),
        3..=4 => Some((lpr, 4)),
        _ => None,
    }
}

/// Whether [`rms_norm_rows`] has a kernel for rows of `c` channels in `dtype`.
pub fn rms_rows_fits(c: usize, dtype: DType) -> bool {
    tag(dtype).is_ok_and(|(_, vec)| c.is_multiple_of(vec) && rms_lanes(c / vec).is_some())
}

/// diffusers `RMSNorm(C, eps, weight, bias)` over the last dim of contiguous `h` (`(..., C)`), plus
/// `residual`, then SiLU when `silu` (of the rounded sum, as the unfused ops round it). One warp-slice a row.
pub fn rms_norm_rows(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    eps: f32,
    act: crate::ops::RowAct,
) -> Result<Tensor> {
    match h.dtype() {
        DType::BF16 => rms_rows_typed::<half::bf16>(h, weight, bias, residual, eps, act),
        DType::F32 => rms_rows_typed::<f32>(h, weight, bias, residual, eps, act),
        other => bail!("rms_norm_rows: no kernel for {other:?}"),
    }
}

fn rms_rows_typed<T: CudaDType + WithDType + DeviceRepr>(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    eps: f32,
    act: crate::ops::RowAct,
) -> Result<Tensor> {
    let c = *h.dims().last().unwrap_or(&0);
    let (suffix, vec) = tag(h.dtype())?;
    if !rms_rows_fits(c, h.dtype())
        || weight.dims() != [c]
        || bias.is_some_and(|t| t.dims() != [c])
        || residual.is_some_and(|r| r.dims() != h.dims())
    {
        bail!(
            "rms_norm_rows: no kernel for {:?} with these operands",
            h.dims()
        );
    }
    if [Some(weight), bias, residual]
        .into_iter()
        .flatten()
        .any(|t| t.dtype() != h.dtype())
    {
        bail!("rms_norm_rows: mixed dtypes");
    }
    let (h, weight) = (&vec_ready(h, vec)?, &vec_ready(weight, vec)?);
    let bias = bias.map(|t| vec_ready(t, vec)).transpose()?;
    let residual = residual.map(|t| vec_ready(t, vec)).transpose()?;
    let (bias, residual) = (bias.as_ref(), residual.as_ref());
    let (lpr, m) = rms_lanes(c / vec).unwrap_or((32, 4));
    let rows = h.elem_count() / c.max(1);
    let dev = cuda_dev(h)?;
    let (stream_f, f) = func(&dev, NORM, &format!("rms_rows_{suffix}_m{m}"))?;
    let mut out = unsafe { dev.alloc::<T>(h.elem_count()) }?;
    let (hs, hl) = h.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let (hv, wv) = (view::<T>(&hs, hl)?, view::<T>(&ws, wl)?);
    let bias_g = bias.map(|t| t.storage_and_layout());
    let res_g = residual.map(|t| t.storage_and_layout());
    let bias_v = bias_g.as_ref().map(|(s, l)| view::<T>(s, l)).transpose()?;
    let res_v = res_g.as_ref().map(|(s, l)| view::<T>(s, l)).transpose()?;
    let (rows_i, ci, si, li) = (rows as i64, c as i32, act.code(), lpr as i32);
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(&hv);
    lb.arg(&wv);
    match &bias_v {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
    match &res_v {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
    lb.arg(&mut out);
    lb.arg(&rows_i);
    lb.arg(&ci);
    lb.arg(&eps);
    lb.arg(&si);
    lb.arg(&li);
    let per_block = 8 * (32 / lpr);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(per_block).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    drop(lb);
    Ok(wrap(out, &dev, h.dims()))
}

/// Whether [`rms_norm_segments`] has a kernel for segments of `c` columns in `dtype` (whole 16-byte vectors).
pub fn rms_segments_fits(c: usize, dtype: DType) -> bool {
    tag(dtype).is_ok_and(|(_, vec)| c > 0 && c.is_multiple_of(vec))
}

/// diffusers `RMSNorm(C, eps, weight)` of each `C`-column segment of `x` (`(..., S·C)`, `S = weights.len()`
/// ≤ 3) that has a weight; a segment without one is copied. One read and one write of `x`: Sana-Sprint's
/// q and k norms on the fused q|k|v projection. One warp a (row, segment).
pub fn rms_norm_segments(x: &Tensor, weights: &[Option<&Tensor>], eps: f32) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => rms_segments_typed::<half::bf16>(x, weights, eps),
        DType::F32 => rms_segments_typed::<f32>(x, weights, eps),
        other => bail!("rms_norm_segments: no kernel for {other:?}"),
    }
}

fn rms_segments_typed<T: CudaDType + WithDType + DeviceRepr>(
    x: &Tensor,
    weights: &[Option<&Tensor>],
    eps: f32,
) -> Result<Tensor> {
    let (suffix, vec) = tag(x.dtype())?;
    let segs = weights.len();
    let cols = *x.dims().last().unwrap_or(&0);
    let c = cols / segs.max(1);
    if !(1..=3).contains(&segs)
        || c * segs != cols
        || !rms_segments_fits(c, x.dtype())
        || weights.iter().flatten().any(|w| w.dims() != [c])
    {
        bail!(
            "rms_norm_segments: no kernel for {:?} in {segs} segments",
            x.dims()
        );
    }
    if weights.iter().flatten().any(|w| w.dtype() != x.dtype()) {
        bail!("rms_norm_segments: mixed dtypes");
    }
    let x = vec_ready(x, vec)?;
    let weights = weights
        .iter()
        .map(|w| w.map(|w| vec_ready(w, vec)).transpose())
        .collect::<Result<Vec<_>>>()?;
    let rows = x.elem_count() / cols.max(1);
    let dev = cuda_dev(&x)?;
    let (stream_f, f) = func(&dev, NORM, &format!("rms_segments_{suffix}"))?;
    let mut out = unsafe { dev.alloc::<T>(x.elem_count()) }?;
    let (xs, xl) = x.storage_and_layout();
    let xv = view::<T>(&xs, xl)?;
    let guards = weights
        .iter()
        .map(|w| w.as_ref().map(|w| w.storage_and_layout()))
        .collect::<Vec<_>>();
    let wviews = guards
        .iter()
        .map(|g| g.as_ref().map(|(s, l)| view::<T>(s, l)).transpose())
        .collect::<Result<Vec<_>>>()?;
    let (rows_i, segs_i, ci) = (rows as i64, segs as i32, c as i32);
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(&xv);
    for i in 0..3 {
        match wviews.get(i).and_then(Option::as_ref) {
            Some(v) => lb.arg(v),
            None => lb.arg(&NULL),
        };
    }
    lb.arg(&mut out);
    lb.arg(&rows_i);
    lb.arg(&segs_i);
    lb.arg(&ci);
    lb.arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8).max(1) as u32, segs as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    drop(lb);
    Ok(wrap(out, &dev, x.dims()))
}

/// Whether the channels-last layout kernels ([`upsample2x_nhwc`], [`up_shortcut_add_nhwc`]) take `c`
/// channels of `dtype` (whole 16-byte vectors).
pub fn nhwc_fits(c: usize, dtype: DType) -> bool {
    tag(dtype).is_ok_and(|(_, vec)| c.is_multiple_of(vec))
}

/// Nearest ×2 upsample of contiguous channels-last `x` `(B, H, W, C)` → `(B, 2H, 2W, C)`.
pub fn upsample2x_nhwc(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (suffix, vec) = tag(x.dtype())?;
    if !c.is_multiple_of(vec) {
        bail!("upsample2x_nhwc: {c} channels are not whole 16-byte vectors");
    }
    let x = &vec_ready(x, vec)?;
    let dev = cuda_dev(x)?;
    let (stream_f, f) = func(&dev, NORM, &format!("upsample2x_nhwc_{suffix}_v{vec}"))?;
    let total = 4 * x.elem_count();
    let (xs, xl) = x.storage_and_layout();
    let args = [b, h, w, c].map(|v| v as i32);
    macro_rules! go {
        ($t:ty) => {{
            let xv = view::<$t>(&xs, xl)?;
            let mut out = unsafe { dev.alloc::<$t>(total) }?;
            let mut lb = stream_f.launch_builder(&f);
            lb.arg(&xv);
            lb.arg(&mut out);
            for a in &args {
                lb.arg(a);
            }
            unsafe { lb.launch(grid_1d(total / vec)) }.w()?;
            drop(lb);
            Ok(wrap(out, &dev, (b, 2 * h, 2 * w, c)))
        }};
    }
    match x.dtype() {
        DType::BF16 => go!(half::bf16),
        _ => go!(f32),
    }
}

/// `main + pixel_shuffle(repeat_interleave(x, r), 2)` channels-last: `main` `(B, 2H, 2W, Co)`, `x`
/// `(B, H, W, Ci)` with `Ci·r = 4·Co`; one pass.
pub fn up_shortcut_add_nhwc(main: &Tensor, x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, h2, w2, co) = main.dims4()?;
    let (bx, h, w, ci) = x.dims4()?;
    let (suffix, vec) = tag(x.dtype())?;
    if bx != b || h2 != 2 * h || w2 != 2 * w || ci * r != 4 * co || x.dtype() != main.dtype() {
        bail!(
            "up_shortcut_add_nhwc: main {:?} / x {:?} / r {r}",
            main.dims(),
            x.dims()
        );
    }
    require_contiguous("up_shortcut_add_nhwc", x)?;
    if !co.is_multiple_of(vec) {
        bail!("up_shortcut_add_nhwc: {co} channels are not whole 16-byte vectors");
    }
    let main = &vec_ready(main, vec)?;
    let dev = cuda_dev(x)?;
    let (stream_f, f) = func(&dev, NORM, &format!("up_shortcut_add_nhwc_{suffix}_v{vec}"))?;
    let total = main.elem_count();
    let (ms, ml) = main.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let args = [b, co, ci, h, w, r].map(|v| v as i32);
    macro_rules! go {
        ($t:ty) => {{
            let (mv, xv) = (view::<$t>(&ms, ml)?, view::<$t>(&xs, xl)?);
            let mut out = unsafe { dev.alloc::<$t>(total) }?;
            let mut lb = stream_f.launch_builder(&f);
            lb.arg(&mv);
            lb.arg(&xv);
            lb.arg(&mut out);
            for a in &args {
                lb.arg(a);
            }
            unsafe { lb.launch(grid_1d(total / vec)) }.w()?;
            drop(lb);
            Ok(wrap(out, &dev, (b, h2, w2, co)))
        }};
    }
    match x.dtype() {
        DType::BF16 => go!(half::bf16),
        _ => go!(f32),
    }
}

/// Whether [`glu_dwconv_tiled`] takes `x` `(B, H, W, Cin)`: bf16, `Cin/2` a multiple of 32.
pub fn glu_tiled_fits(x: &Tensor) -> bool {
    x.dtype() == DType::BF16
        && x.dims().last().is_some_and(|c| c.is_multiple_of(64))
        && x.rank() == 4
}

/// Whether [`dwconv_tiled`] takes `x` `(B, H, W, C)` with a `k×k` kernel: bf16, C a multiple of 32, k 3 or 5.
pub fn dwconv_tiled_fits(x: &Tensor, k: usize) -> bool {
    x.dtype() == DType::BF16
        && x.rank() == 4
        && x.dims().last().is_some_and(|c| c.is_multiple_of(32))
        && (k == 3 || k == 5)
}

/// Depthwise k×k (+ bias) of channels-last bf16 `x` through shared-memory tiles (`dwconv.cu::dwtile`).
/// `taps` `(k, k, C)`; returns `(B, H, W, C)`.
pub fn dwconv_tiled(x: &Tensor, taps: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let k = taps.dim(0)?;
    if !dwconv_tiled_fits(x, k) || taps.dims() != [k, k, c] || bias.is_some_and(|t| t.dims() != [c])
    {
        bail!(
            "dwconv_tiled: no kernel for x {:?} taps {:?}",
            x.dims(),
            taps.dims()
        );
    }
    if taps.dtype() != DType::BF16 || bias.is_some_and(|t| t.dtype() != DType::BF16) {
        bail!("dwconv_tiled: operands must be bf16");
    }
    let (x, taps) = (&vec_ready(x, 8)?, &vec_ready(taps, 8)?);
    let bias = bias.map(|t| vec_ready(t, 8)).transpose()?;
    let bias = bias.as_ref();
    let dev = cuda_dev(x)?;
    let (stream_f, f) = func(&dev, DWCONV, &format!("dwtile_bf16_k{k}"))?;
    let mut out = unsafe { dev.alloc::<half::bf16>(x.elem_count()) }?;
    let (xs, xl) = x.storage_and_layout();
    let (ts, tl) = taps.storage_and_layout();
    let xv = view::<half::bf16>(&xs, xl)?;
    let tv = view::<half::bf16>(&ts, tl)?;
    let bias_g = bias.map(|t| t.storage_and_layout());
    let bias_v = bias_g
        .as_ref()
        .map(|(s, l)| view::<half::bf16>(s, l))
        .transpose()?;
    let args = [b, h, w, c].map(|v| v as i32);
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(&xv);
    lb.arg(&tv);
    match &bias_v {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
    lb.arg(&NULL);
    lb.arg(&mut out);
    for a in &args {
        lb.arg(a);
    }
    let cfg = LaunchConfig {
        grid_dim: (
            (b * h.div_ceil(8) * w.div_ceil(8)) as u32,
            (c / 32) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    drop(lb);
    Ok(wrap(out, &dev, (b, h, w, c)))
}

/// GLUMBConv's middle in one launch (`dwconv.cu::dwtile_bf16_k3_glu`): `silu(x + in_bias)` rounded to bf16,
/// depthwise 3×3 + `bias`, then `value · silu(gate)`. `x` `(B, H, W, Cin)` bf16, `taps` `(3, 3, Cin)`;
/// returns `(B, H, W, Cin/2)`. Bit-equal to `bias_rows_act` + [`dwconv_nhwc`] (checked by the harness).
pub fn glu_dwconv_tiled(
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    in_bias: &Tensor,
) -> Result<Tensor> {
    let (b, h, w, cin) = x.dims4()?;
    if !glu_tiled_fits(x)
        || taps.dims() != [3, 3, cin]
        || bias.dims() != [cin]
        || in_bias.dims() != [cin]
    {
        bail!(
            "glu_dwconv_tiled: no kernel for x {:?} taps {:?}",
            x.dims(),
            taps.dims()
        );
    }
    if [taps, bias, in_bias]
        .iter()
        .any(|t| t.dtype() != DType::BF16)
    {
        bail!("glu_dwconv_tiled: operands must be bf16");
    }
    let (x, taps) = (&vec_ready(x, 8)?, &vec_ready(taps, 8)?);
    let (bias, in_bias) = (&vec_ready(bias, 8)?, &vec_ready(in_bias, 8)?);
    let dev = cuda_dev(x)?;
    let (stream_f, f) = func(&dev, DWCONV, "dwtile_bf16_k3_glu")?;
    let cout = cin / 2;
    let mut out = unsafe { dev.alloc::<half::bf16>(b * h * w * cout) }?;
    let (xs, xl) = x.storage_and_layout();
    let (ts, tl) = taps.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let (is, il) = in_bias.storage_and_layout();
    let xv = view::<half::bf16>(&xs, xl)?;
    let tv = view::<half::bf16>(&ts, tl)?;
    let bv = view::<half::bf16>(&bs, bl)?;
    let iv = view::<half::bf16>(&is, il)?;
    let args = [b, h, w, cin].map(|v| v as i32);
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(&xv);
    lb.arg(&tv);
    lb.arg(&bv);
    lb.arg(&iv);
    lb.arg(&mut out);
    for a in &args {
        lb.arg(a);
    }
    let tiles = b * h.div_ceil(8) * w.div_ceil(8);
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, (cout / 32) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    drop(lb);
    Ok(wrap(out, &dev, (b, h, w, cout)))
}

/// One cuBLAS strided-batched GEMM on bf16 operands with f32 compute, column-major as cuBLAS sees it:
/// `C_i = op(A_i) · op(B_i)` for `i < batch`, `C` bf16 or f32 (`c_f32`). Pointers are device addresses
/// (byte offsets already applied); leading dimensions and strides in elements.
#[allow(clippy::too_many_arguments)]
fn gemm_bf16(
    dev: &CudaDevice,
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    (a, lda, stride_a): (u64, usize, usize),
    (b, ldb, stride_b): (u64, usize, usize),
    (c, ldc, stride_c, c_f32): (u64, usize, usize, bool),
    batch: usize,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_strided_batched_ex, sys};
    let op = |t: bool| {
        if t {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (one, zero) = (1f32, 0f32);
    let bf = sys::cudaDataType_t::CUDA_R_16BF;
    let c_type = if c_f32 {
        sys::cudaDataType_t::CUDA_R_32F
    } else {
        bf
    };
    let i = |x: usize| x as i32;
    let blas = dev.cublas_handle();
    // SAFETY: the callers pass addresses inside live allocations sized for these shapes and strides,
    // on the stream cuBLAS is bound to (candle's, the one every kernel here runs on).
    unsafe {
        gemm_strided_batched_ex(
            *blas.handle(),
            op(ta),
            op(tb),
            i(m),
            i(n),
            i(k),
            (&one) as *const f32 as *const _,
            a as *const _,
            bf,
            i(lda),
            stride_a as i64,
            b as *const _,
            bf,
            i(ldb),
            stride_b as i64,
            (&zero) as *const f32 as *const _,
            c as *mut _,
            c_type,
            i(ldc),
            stride_c as i64,
            i(batch),
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("cuBLAS gemm: {e:?}")))
}

/// The DC-AE multiscale projection's grouped 1×1 conv on tokens: `y` `(rows, G·d_in)` bf16 contiguous,
/// `w` `(G, d_out, d_in)` bf16 contiguous → `(rows, G·d_out)`, `out[r, g] = w[g] · y[r, g]`. One cuBLAS
/// call batched over groups, reading and writing the token-major layout in place (no transposes).
pub fn grouped_linear_bf16(y: &Tensor, w: &Tensor) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let (rows, cin) = y.dims2()?;
    let (g, d_out, d_in) = w.dims3()?;
    if g * d_in != cin || y.dtype() != DType::BF16 || w.dtype() != DType::BF16 {
        bail!("grouped_linear_bf16: y {:?} w {:?}", y.dims(), w.dims());
    }
    require_contiguous("grouped_linear_bf16", y)?;
    require_contiguous("grouped_linear_bf16", w)?;
    let dev = cuda_dev(y)?;
    let stream = dev.cuda_stream();
    let mut out = unsafe { dev.alloc::<half::bf16>(rows * g * d_out) }?;
    {
        let (ys, yl) = y.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (yv, wv) = (view::<half::bf16>(&ys, yl)?, view::<half::bf16>(&ws, wl)?);
        let (yp, _gy) = yv.device_ptr(&stream);
        let (wp, _gw) = wv.device_ptr(&stream);
        let (op, _go) = out.device_ptr_mut(&stream);
        // Column-major: out_gᵀ (d_out × rows, ld G·d_out) = W_g (op T of d_in × d_out, ld d_in) · y_gᵀ
        // (d_in × rows, ld G·d_in).
        gemm_bf16(
            &dev,
            (true, false),
            (d_out, rows, d_in),
            (wp, d_in, d_out * d_in),
            (yp, cin, d_in),
            (op, g * d_out, d_out, false),
            g,
        )?;
    }
    Ok(wrap(out, &dev, (rows, g * d_out)))
}

/// `softmax(q·kᵀ·scale + mask) · v` per head, bf16: `q` `(B, N, H·d)`, `k`, `v` `(B, H, T, d)` contiguous,
/// `mask` `(B, 1, 1, T)` f32. Scores `(B, H, N, T)` f32 from one cuBLAS strided-batched GEMM per batch row
/// (bf16 operands, f32 compute and output: the products are exact, as in the fused SDPA kernels), then
/// [`masked_softmax`] to bf16, then a second GEMM (f32 compute) that writes each head's `(N, d)` block
/// straight into the token-major output `(B, N, H·d)` (leading dimension H·d). Returns that output.
pub fn cross_attention_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let (b, n, inner) = q.dims3()?;
    let (bk, h, t, d) = k.dims4()?;
    if bk != b || h * d != inner || v.dims() != k.dims() || mask.elem_count() != b * t {
        bail!(
            "cross_attention_bf16: q {:?} k {:?} v {:?} mask {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        );
    }
    for x in [q, k, v] {
        require_contiguous("cross_attention_bf16", x)?;
        if x.dtype() != DType::BF16 {
            bail!("cross_attention_bf16: operands must be bf16");
        }
    }
    let dev = cuda_dev(q)?;
    if matches!(d, 32 | 64 | 112) && mask.dtype() == DType::F32 && flash_attention_ok(&dev)? {
        return flash_cross_attention(q, k, v, mask, scale);
    }
    let stream = dev.cuda_stream();
    let mut scores = unsafe { dev.alloc::<f32>(b * h * n * t) }?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qv, kv, vv) = (
        view::<half::bf16>(&qs, ql)?,
        view::<half::bf16>(&ks, kl)?,
        view::<half::bf16>(&vs, vl)?,
    );
    let bf = 2u64; // bytes per bf16
    {
        let (qp, _gq) = qv.device_ptr(&stream);
        let (kp, _gk) = kv.device_ptr(&stream);
        let (sp, _gs) = scores.device_ptr_mut(&stream);
        for bi in 0..b as u64 {
            // Column-major: scoresᵀ (T × N, ld T) = K_h (op T of d × T, ld d) · Q_hᵀ (d × N, ld H·d).
            gemm_bf16(
                &dev,
                (true, false),
                (t, n, d),
                (kp + bi * (h * t * d) as u64 * bf, d, t * d),
                (qp + bi * (n * inner) as u64 * bf, inner, d),
                (sp + bi * (h * n * t) as u64 * 4, t, n * t, true),
                h,
            )?;
        }
    }
    let scores = wrap(scores, &dev, (b, h, n, t));
    let probs = masked_softmax(&scores, mask, scale, DType::BF16)?;
    drop(scores);
    let mut out = unsafe { dev.alloc::<half::bf16>(b * n * inner) }?;
    {
        let (ps, pl) = probs.storage_and_layout();
        let pv = view::<half::bf16>(&ps, pl)?;
        let (pp, _gp) = pv.device_ptr(&stream);
        let (vp, _gv) = vv.device_ptr(&stream);
        let (op, _go) = out.device_ptr_mut(&stream);
        for bi in 0..b as u64 {
            // Column-major: out_hᵀ (d × N, ld H·d) = V_hᵀ (d × T, ld d) · P_hᵀ (T × N, ld T).
            gemm_bf16(
                &dev,
                (false, false),
                (d, n, t),
                (vp + bi * (h * t * d) as u64 * bf, d, t * d),
                (pp + bi * (h * n * t) as u64 * bf, t, n * t),
                (op + bi * (n * inner) as u64 * bf, inner, d, false),
                h,
            )?;
        }
    }
    Ok(wrap(out, &dev, (b, n, inner)))
}

/// Whether `attention.cu` runs here: its bf16 `mma.sync` needs compute capability 8.0 or later.
fn flash_attention_ok(dev: &CudaDevice) -> Result<bool> {
    Ok(arch(dev)?
        .trim_start_matches("compute_")
        .parse::<u32>()
        .is_ok_and(|cc| cc >= 80))
}

/// [`cross_attention_bf16`] for head dim 32, 64 or 112 (Sana's cross-attention: 20 heads × 112) in one
/// kernel (`attention.cu`, flash style on tensor cores): the scores stay in registers, with an online
/// softmax in f32. Same operands and result. Chunks of 64 keys that are all padding (mask ≤ −10000) are
/// skipped when the row has a live key: their weights are exactly 0 in f32, so the bits are those of the
/// whole loop (`bench/kernel_harness.py` compares the two builds).
fn flash_cross_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let (_, h, t, d) = k.dims4()?;
    let dev = cuda_dev(q)?;
    // 16-byte K/V rows for the vector loads into shared memory; Q and the output are read and written as
    // bf16 pairs.
    let (k, v) = (vec_ready(k, 8)?, vec_ready(v, 8)?);
    let q = vec_ready(q, 2)?;
    let mask = mask.contiguous()?;
    let (stream_f, f) = func(&dev, ATTENTION, &format!("xattn_bf16_d{d}"))?;
    let mut out = unsafe { dev.alloc::<half::bf16>(b * n * inner) }?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (ms, ml) = mask.storage_and_layout();
    let (qv, kv, vv, mv) = (
        view::<half::bf16>(&qs, ql)?,
        view::<half::bf16>(&ks, kl)?,
        view::<half::bf16>(&vs, vl)?,
        view::<f32>(&ms, ml)?,
    );
    let dims = [n, h, t].map(|x| x as i32);
    let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(64) as u32, h as u32, b as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    {
        let mut lb = stream_f.launch_builder(&f);
        lb.arg(&qv).arg(&kv).arg(&vv).arg(&mv).arg(&mut out);
        for a in &dims {
            lb.arg(a);
        }
        lb.arg(&scale_log2);
        // SAFETY: operands checked by `cross_attention_bf16` (shapes, bf16, contiguous) and made aligned
        // above; the kernel reads q (B·N·H·d), k and v (B·H·T·d), mask (B·T) and writes each output
        // element once.
        unsafe { lb.launch(cfg) }.w()?;
    }
    Ok(wrap(out, &dev, (b, n, inner)))
}

/// Decoder output `samples` `(B, 3, H, W)` (contiguous, bf16 or f32, in [-1, 1]) → 8-bit RGB `(B, OH, OW, 3)`
/// u8 on the device (`image.cu`): with `cover = Some((RH, RW, SY, SX))` the bilinear resize to `RH × RW`
/// and the crop at `(SY, SX)` first, as `image_ops::resize_and_crop` computes them; then the denormalise
/// and quantise of `image_ops::to_rgb_images`.
pub fn rgb_u8(
    samples: &Tensor,
    out_h: usize,
    out_w: usize,
    cover: Option<(usize, usize, usize, usize)>,
) -> Result<Tensor> {
    let (b, c, h, w) = samples.dims4()?;
    require_contiguous("rgb_u8", samples)?;
    let (rh, rw, sy, sx) = cover.unwrap_or((h, w, 0, 0));
    if c != 3 || sy + out_h > rh || sx + out_w > rw {
        bail!(
            "rgb_u8: {:?} to {out_w}x{out_h} with cover {cover:?}",
            samples.dims()
        );
    }
    let dev = cuda_dev(samples)?;
    let (suffix, _) = tag(samples.dtype())?;
    let (stream_f, f) = func(&dev, IMAGE, &format!("rgb_u8_{suffix}"))?;
    let total = b * out_h * out_w;
    let mut out = unsafe { dev.alloc::<u8>(3 * total) }?;
    let (ss, sl) = samples.storage_and_layout();
    let args = [
        b,
        h,
        w,
        rh,
        rw,
        out_h,
        out_w,
        sy,
        sx,
        usize::from(cover.is_some()),
    ]
    .map(|v| v as i32);
    macro_rules! go {
        ($t:ty) => {{
            let sv = view::<$t>(&ss, sl)?;
            let mut lb = stream_f.launch_builder(&f);
            lb.arg(&sv);
            lb.arg(&mut out);
            for a in &args {
                lb.arg(a);
            }
            unsafe { lb.launch(grid_1d(total)) }.w()?;
        }};
    }
    match samples.dtype() {
        DType::BF16 => go!(half::bf16),
        _ => go!(f32),
    }
    drop(ss);
    Ok(wrap(out, &dev, (b, out_h, out_w, 3)))
}

/// What one cuBLASLt plan is for: `Y (rows, n) = X (rows, k) Wᵀ [+ bias] [+ residual]` on one device, with
/// the algorithm chosen for `algo_rows` rows (see [`linear_bf16`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LtKey {
    dev: DeviceId,
    n: usize,
    rows: usize,
    k: usize,
    bias: bool,
    residual: bool,
    /// Row count the heuristic was asked about; `None`: `rows` itself, any reduction scheme allowed.
    algo_rows: Option<usize>,
}

/// One cuBLASLt plan: descriptors and the algorithm for one [`LtKey`], made on first use and kept (the
/// heuristic query costs host time; a forward makes about 80 of these calls).
struct LtPlan {
    key: LtKey,
    desc: lt::sys::cublasLtMatmulDesc_t,
    a: lt::sys::cublasLtMatrixLayout_t,
    b: lt::sys::cublasLtMatrixLayout_t,
    c: lt::sys::cublasLtMatrixLayout_t,
    algo: lt::sys::cublasLtMatmulAlgo_t,
}

/// One cuBLASLt handle and workspace per device.
struct LtHandle {
    dev: DeviceId,
    handle: lt::sys::cublasLtHandle_t,
    workspace: candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
}

struct LtState {
    handles: Vec<LtHandle>,
    plans: Vec<LtPlan>,
}

// SAFETY: the raw cuBLASLt handles are only used while the mutex around `LtState` is held.
unsafe impl Send for LtState {}

use candle_core::cuda_backend::cudarc::cublaslt as lt;

/// Workspace cuBLASLt may use (NVIDIA's recommendation for Hopper).
const LT_WORKSPACE: usize = 32 << 20;

/// Plans whose algorithm could not be the one chosen for their `algo_rows` (cuBLASLt rejected it for the
/// real row count) and fell back to the heuristic's choice for the real rows: their rows are not
/// guaranteed to equal a call with another row count. gpu-check reports it; 0 is expected.
static LT_UNPINNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many cuBLASLt plans so far could not use the row-count-independent algorithm ([`linear_bf16`]).
pub fn lt_unpinned_plans() -> usize {
    LT_UNPINNED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `x @ wᵀ [+ bias] [+ residual]` in one cuBLASLt call, bf16 in and out with f32 accumulation: the bias
/// goes in the GEMM's epilogue and the residual in as `C` with `β = 1`, so no separate pass reads the
/// output again. `x` `(.., k)`, `w` `(n, k)`, `bias` `(n)`, `residual` the output's shape; all contiguous.
///
/// `algo_rows: Some(r)` makes every output row independent of how many rows the call has (issue 14: a
/// request batched with others computes what it computes alone). The algorithm is the heuristic's choice
/// for `r` rows among those without a split-K reduction, and the same algorithm runs the call's real
/// `rows`: each output tile then sums its full `k` in an order fixed by the algorithm alone, whatever
/// the number of tiles. Callers pass one sequence's rows (tokens per batch row), so a batch of B
/// sequences runs the algorithm one sequence would. `None`: the heuristic's fastest choice for `rows`.
pub fn linear_bf16(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    algo_rows: Option<usize>,
) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let k = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / k.max(1);
    let (n, kw) = w.dims2()?;
    if kw != k
        || bias.is_some_and(|b| b.dims() != [n])
        || residual.is_some_and(|r| r.elem_count() != rows * n)
    {
        bail!(
            "linear_bf16: x {:?} w {:?} bias {:?} residual {:?}",
            x.dims(),
            w.dims(),
            bias.map(|b| b.dims().to_vec()),
            residual.map(|r| r.dims().to_vec())
        );
    }
    for t in [Some(x), Some(w), bias, residual].into_iter().flatten() {
        require_contiguous("linear_bf16", t)?;
        if t.dtype() != DType::BF16 {
            bail!("linear_bf16: operands must be bf16");
        }
    }
    let dev = cuda_dev(x)?;
    let stream = dev.cuda_stream();
    let mut out = unsafe { dev.alloc::<half::bf16>(rows * n) }?;
    static STATE: OnceLock<Mutex<LtState>> = OnceLock::new();
    let mut state = STATE
        .get_or_init(|| {
            Mutex::new(LtState {
                handles: Vec::new(),
                plans: Vec::new(),
            })
        })
        .lock()
        .map_err(poisoned)?;
    let lt_err = |what: &str, e: lt::result::CublasError| {
        candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
    };
    if !state.handles.iter().any(|h| h.dev == dev.id()) {
        let handle = lt::result::create_handle().map_err(|e| lt_err("create", e))?;
        let workspace = unsafe { dev.alloc::<u8>(LT_WORKSPACE) }?;
        state.handles.push(LtHandle {
            dev: dev.id(),
            handle,
            workspace,
        });
    }
    let hi = state
        .handles
        .iter()
        .position(|h| h.dev == dev.id())
        .unwrap_or(0);
    let key = LtKey {
        dev: dev.id(),
        n,
        rows,
        k,
        bias: bias.is_some(),
        residual: residual.is_some(),
        algo_rows,
    };
    if !state.plans.iter().any(|p| p.key == key) {
        let plan = lt_plan(state.handles[hi].handle, key).map_err(|e| lt_err("plan", e))?;
        state.plans.push(plan);
    }
    let LtState { handles, plans } = &mut *state;
    let plan = plans
        .iter()
        .find(|p| p.key == key)
        .expect("plan inserted above");
    let h = &handles[hi];
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (xv, wv) = (view::<half::bf16>(&xs, xl)?, view::<half::bf16>(&ws, wl)?);
    let bst = bias.map(|b| b.storage_and_layout());
    let bv = match &bst {
        Some((bs, bl)) => Some(view::<half::bf16>(bs, bl)?),
        None => None,
    };
    let res = residual.map(|r| r.storage_and_layout());
    let rv = match &res {
        Some((rs, rl)) => Some(view::<half::bf16>(rs, rl)?),
        None => None,
    };
    let (one, beta) = (1f32, if residual.is_some() { 1f32 } else { 0f32 });
    {
        let (xp, _gx) = xv.device_ptr(&stream);
        let (wp, _gw) = wv.device_ptr(&stream);
        let bp = bv.as_ref().map(|b| b.device_ptr(&stream));
        let rp = rv.as_ref().map(|r| r.device_ptr(&stream));
        let (op, _go) = out.device_ptr_mut(&stream);
        let (wsp, _gws) = h.workspace.device_ptr(&stream);
        let cp = rp.as_ref().map(|(p, _)| *p).unwrap_or(op);
        // SAFETY: the plan's layouts describe exactly these contiguous operands (checked above); the bias
        // pointer is set on the plan's descriptor under the state lock, right before the call that reads
        // it; everything is enqueued on candle's stream.
        unsafe {
            if let Some((bp, _)) = &bp {
                lt::result::set_matmul_desc_attribute(
                    plan.desc,
                    lt::sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    bp as *const u64 as *const _,
                    std::mem::size_of::<u64>(),
                )
                .map_err(|e| lt_err("bias pointer", e))?;
            }
            lt::result::matmul(
                h.handle,
                plan.desc,
                (&one) as *const f32 as *const _,
                (&beta) as *const f32 as *const _,
                wp as *const _,
                plan.a,
                xp as *const _,
                plan.b,
                cp as *const _,
                plan.c,
                op as *mut _,
                plan.c,
                &plan.algo,
                wsp as *mut _,
                LT_WORKSPACE,
                stream.cu_stream() as *mut _,
            )
            .map_err(|e| lt_err("matmul", e))?;
        }
    }
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("x has a last dim") = n;
    Ok(wrap(out, &dev, shape))
}

/// Sets one cuBLASLt matmul-preference attribute to `value`.
///
/// # Safety
/// `pref` is a live preference and `T` the type cuBLASLt documents for `attr`.
unsafe fn set_lt_pref<T>(
    pref: lt::sys::cublasLtMatmulPreference_t,
    attr: lt::sys::cublasLtMatmulPreferenceAttributes_t,
    value: &T,
) -> std::result::Result<(), lt::result::CublasError> {
    lt::result::set_matmul_pref_attribute(
        pref,
        attr,
        value as *const T as *const _,
        std::mem::size_of::<T>(),
    )
}

/// Descriptors for `D (n × rows, col-major) = W (k × n, col-major)ᵀ · X (k × rows) [+ bias] [+ C]`, the
/// row-major `Y (rows, n) = X Wᵀ + b`, and the algorithm for them ([`linear_bf16`]): the heuristic's
/// fastest for `algo_rows` rows without split-K when `key.algo_rows` is set and cuBLASLt accepts it for
/// `rows`, else the fastest for `rows`.
fn lt_plan(
    handle: lt::sys::cublasLtHandle_t,
    key: LtKey,
) -> std::result::Result<LtPlan, lt::result::CublasError> {
    use lt::sys::{cublasLtMatmulDescAttributes_t as Attr, cudaDataType_t as Ty};
    let LtKey { n, rows, k, .. } = key;
    let bf = Ty::CUDA_R_16BF;
    let desc = lt::result::create_matmul_desc(
        lt::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        Ty::CUDA_R_32F,
    )?;
    let layouts = |rows: usize| -> std::result::Result<_, lt::result::CublasError> {
        Ok((
            lt::result::create_matrix_layout(bf, k as u64, rows as u64, k as i64)?,
            lt::result::create_matrix_layout(bf, n as u64, rows as u64, n as i64)?,
        ))
    };
    let a = lt::result::create_matrix_layout(bf, k as u64, n as u64, k as i64)?;
    let (b, c) = layouts(rows)?;
    let trans = candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
    let epilogue = if key.bias {
        lt::sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
    } else {
        lt::sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
    };
    // SAFETY: attribute buffers are live locals of the sizes cuBLASLt documents for each attribute; the
    // heuristic result is plain data cuBLASLt fills.
    unsafe {
        lt::result::set_matmul_desc_attribute(
            desc,
            Attr::CUBLASLT_MATMUL_DESC_TRANSA,
            (&trans) as *const _ as *const _,
            std::mem::size_of_val(&trans),
        )?;
        lt::result::set_matmul_desc_attribute(
            desc,
            Attr::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&epilogue) as *const _ as *const _,
            std::mem::size_of_val(&epilogue),
        )?;
        use lt::sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let pref = lt::result::create_matmul_pref()?;
        // Reduction-scheme mask: which split-K reductions the heuristic may choose.
        let reductions = |mask: u32| {
            set_lt_pref(
                pref,
                Pref::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                &mask,
            )
        };
        set_lt_pref(
            pref,
            Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &LT_WORKSPACE,
        )?;
        let fastest_for_rows =
            |pref| lt::result::get_matmul_algo_heuristic(handle, desc, a, b, c, c, pref);
        let algo = match key.algo_rows {
            None => fastest_for_rows(pref).map(|h| h.algo),
            Some(algo_rows) => {
                // Only algorithms that sum each output's k in one pass (no split-K reduction).
                reductions(
                    lt::sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_NONE as u32,
                )?;
                let (rb, rc) = layouts(algo_rows)?;
                let chosen =
                    lt::result::get_matmul_algo_heuristic(handle, desc, a, rb, rc, rc, pref);
                lt::result::destroy_matrix_layout(rb)?;
                lt::result::destroy_matrix_layout(rc)?;
                let accepted = chosen.ok().filter(|h| {
                    let mut check: lt::sys::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
                    lt::sys::cublasLtMatmulAlgoCheck(handle, desc, a, b, c, c, &h.algo, &mut check)
                        .result()
                        .is_ok()
                        && check.workspaceSize <= LT_WORKSPACE
                });
                match accepted {
                    Some(h) => Ok(h.algo),
                    None => {
                        LT_UNPINNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        reductions(
                            lt::sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_MASK
                                as u32,
                        )?;
                        fastest_for_rows(pref).map(|h| h.algo)
                    }
                }
            }
        };
        lt::result::destroy_matmul_pref(pref)?;
        Ok(LtPlan {
            key,
            desc,
            a,
            b,
            c,
            algo: algo?,
        })
    }
}
