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
const ALL: [Source; 3] = [DWCONV, LINEAR_ATTN, NORM];

/// One function of each module, loaded by [`preload`] (loading one function loads its whole module).
const PRELOAD: [(Source, &str); 3] = [
    (DWCONV, "dwconv_bf16_v8_k3_glu"),
    (LINEAR_ATTN, "la_kv_reduce"),
    (NORM, "ln_modulate_bf16"),
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
    match q.dtype() {
        DType::BF16 => linear_attention_typed::<half::bf16>(q, k, v, eps),
        DType::F32 => linear_attention_typed::<f32>(q, k, v, eps),
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
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    const NAME: &str = "relu_linear_attention_tokens";
    let dev = cuda_dev(q)?;
    let (b, n, g, d) = q.dims4()?;
    if k.dims() != q.dims() || v.dims() != q.dims() || d > 64 || d == 0 {
        bail!(
            "{NAME}: q {:?} k {:?} v {:?} (head dim ≤ 64)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
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
    // Enough blocks to fill the card (≈ 4 per SM on 132 SMs), chunks a multiple of the 32-token tile.
    let want = (4 * 132usize).div_ceil(bg).clamp(1, n.div_ceil(32).max(1));
    let chunk = n.div_ceil(want).div_ceil(32) * 32;
    let nchunks = n.div_ceil(chunk);
    let mut partial = unsafe { dev.alloc::<f32>(bg * nchunks * p) }?;
    let mut kv = unsafe { dev.alloc::<f32>(bg * p) }?;
    let mut out = unsafe { dev.alloc::<T>(b * n * g * d) }?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qv, kvw, vv) = (
        view::<T>(&qs, ql)?,
        view::<T>(&ks, kl)?,
        view::<T>(&vs, vl)?,
    );
    let (gi, ni, di) = (g as i32, n as i32, d as i32);
    let (sb, sn, sg) = st;
    let chunk_i = chunk as i32;
    let (stream_f1, f1) = func(&dev, LINEAR_ATTN, &format!("la_kv_partial_{suffix}"))?;
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

    let (stream_f2, f2) = func(&dev, LINEAR_ATTN, "la_kv_reduce")?;
    let (bgi, nci, pi) = (bg as i32, nchunks as i32, p as i32);
    let mut lb = stream_f2.launch_builder(&f2);
    lb.arg(&partial);
    lb.arg(&mut kv);
    lb.arg(&bgi);
    lb.arg(&nci);
    lb.arg(&pi);
    unsafe { lb.launch(grid_1d(bg * p)) }.w()?;

    let (stream_f3, f3) = func(&dev, LINEAR_ATTN, &format!("la_apply_{suffix}"))?;
    let eps_f = eps as f32;
    let mut lb = stream_f3.launch_builder(&f3);
    lb.arg(&qv);
    lb.arg(&kv);
    lb.arg(&mut out);
    lb.arg(&gi);
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
    Ok(wrap(out, &dev, (b, n, g * d)))
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
    let (suffix, _) = tag(x.dtype())?;
    let (stream_f, f) = func(&dev, NORM, &format!("gated_residual_{suffix}"))?;
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
    unsafe { lb.launch(grid_1d(total)) }.w()?;
    Ok(wrap(out, &dev, (b, n, d)))
}

/// diffusers `RMSNorm(C, eps, weight, bias)` over the channels of NCHW `h`, plus `residual` if given.
pub fn rms_norm_nchw(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    match h.dtype() {
        DType::BF16 => rms_nchw_typed::<half::bf16>(h, weight, bias, residual, eps),
        DType::F32 => rms_nchw_typed::<f32>(h, weight, bias, residual, eps),
        other => bail!("rms_norm_nchw: no kernel for {other:?}"),
    }
}

fn rms_nchw_typed<T: CudaDType + WithDType + DeviceRepr>(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    let (b, c, hh, ww) = h.dims4()?;
    if weight.dims() != [c] || bias.is_some_and(|t| t.dims() != [c]) {
        bail!("rms_norm_nchw: weight/bias do not fit {c} channels");
    }
    if residual.is_some_and(|r| r.dims() != h.dims()) {
        bail!("rms_norm_nchw: residual shape differs");
    }
    for t in [Some(h), Some(weight), bias, residual]
        .into_iter()
        .flatten()
    {
        require_contiguous("rms_norm_nchw", t)?;
        if t.dtype() != h.dtype() {
            bail!("rms_norm_nchw: mixed dtypes");
        }
    }
    let dev = cuda_dev(h)?;
    let (suffix, _) = tag(h.dtype())?;
    let (stream_f, f) = func(&dev, NORM, &format!("rms_nchw_{suffix}"))?;
    let mut out = unsafe { dev.alloc::<T>(b * c * hh * ww) }?;
    let (hs, hl) = h.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let hv = view::<T>(&hs, hl)?;
    let wv = view::<T>(&ws, wl)?;
    let bias_g = bias.map(|t| t.storage_and_layout());
    let res_g = residual.map(|t| t.storage_and_layout());
    let bias_v = match &bias_g {
        Some((s, l)) => Some(view::<T>(s, l)?),
        None => None,
    };
    let res_v = match &res_g {
        Some((s, l)) => Some(view::<T>(s, l)?),
        None => None,
    };
    let (bi, ci, hw) = (b as i32, c as i32, (hh * ww) as i64);
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
    lb.arg(&bi);
    lb.arg(&ci);
    lb.arg(&hw);
    lb.arg(&eps);
    unsafe { lb.launch(grid_1d(b * hh * ww)) }.w()?;
    Ok(wrap(out, &dev, (b, c, hh, ww)))
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

/// In place on a fresh NCHW tensor we own: `x = act(x + bias[c])`.
fn bias_act_nchw_inplace<T: CudaDType + WithDType + DeviceRepr>(
    dev: &CudaDevice,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    bias: Option<&Tensor>,
    dims: (usize, usize, usize, usize),
    silu: bool,
) -> Result<()> {
    let (b, c, h, w) = dims;
    let (suffix, vec) = tag(T::DTYPE)?;
    let hw = h * w;
    let v = if hw % vec == 0 { vec } else { 1 };
    let (stream_f, f) = func(dev, NORM, &format!("bias_act_nchw_{suffix}_v{v}"))?;
    let bias_g = bias.map(|t| t.storage_and_layout());
    let bias_v = match &bias_g {
        Some((s, l)) => Some(view::<T>(s, l)?),
        None => None,
    };
    let total = b * c * hw;
    let (tot, ci, hwi, si) = (total as i64, c as i32, hw as i64, i32::from(silu));
    let mut lb = stream_f.launch_builder(&f);
    lb.arg(out);
    match &bias_v {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
    lb.arg(&tot);
    lb.arg(&ci);
    lb.arg(&hwi);
    lb.arg(&si);
    unsafe { lb.launch(grid_1d(total / v)) }.w()?;
    Ok(())
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

/// Dense 2-D convolution, NCHW, stride 1, dilation 1, through cuDNN with tensor-op math for bf16 (f32
/// compute, the `PSEUDO_BFLOAT16` configuration) and default math for f32. The algorithm is chosen once
/// per shape by cuDNN's heuristics and cached; the workspace is allocated per call from candle's pool.
/// Then `act(y + bias)` in one pass. candle's own cuDNN path leaves the math type at its default, where
/// cuDNN picked an FFMA implicit GEMM (no tensor cores: 240 of 300 ms of a 1024² decode on an H200).
pub fn conv2d_nchw(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    silu: bool,
) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => conv2d_typed::<half::bf16>(x, weight, bias, padding, silu),
        DType::F32 => conv2d_typed::<f32>(x, weight, bias, padding, silu),
        other => bail!("conv2d_nchw: no kernel for {other:?}"),
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
    let (b, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if wcin != cin || weight.dtype() != x.dtype() || bias.is_some_and(|t| t.dims() != [cout]) {
        bail!(
            "conv2d_nchw: weight {:?} / bias do not fit x {:?}",
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
    let nchw = dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let i = |v: usize| v as i32;
    let xd = cudnn
        .create_4d_tensor::<T>(nchw, [i(b), i(cin), i(h), i(w)])
        .map_err(dnn_err)?;
    let wd = cudnn
        .create_4d_filter::<T>(nchw, [i(cout), i(cin), i(kh), i(kw)])
        .map_err(dnn_err)?;
    let yd = cudnn
        .create_4d_tensor::<T>(nchw, [i(b), i(cout), i(ho), i(wo)])
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
    if bias.is_some() || silu {
        let bc = bias.map(|t| t.contiguous()).transpose()?;
        bias_act_nchw_inplace::<T>(&dev, &mut out, bc.as_ref(), (b, cout, ho, wo), silu)?;
    }
    Ok(wrap(out, &dev, (b, cout, ho, wo)))
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

/// `main + pixel_shuffle(repeat_interleave(x, r, dim=1), 2)`, NCHW, one pass.
pub fn up_shortcut_add(main: &Tensor, x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, co, h2, w2) = main.dims4()?;
    let (bx, ci, h, w) = x.dims4()?;
    if bx != b || h2 != 2 * h || w2 != 2 * w || ci * r != 4 * co || x.dtype() != main.dtype() {
        bail!(
            "up_shortcut_add: main {:?} / x {:?} / r {r}",
            main.dims(),
            x.dims()
        );
    }
    require_contiguous("up_shortcut_add", main)?;
    require_contiguous("up_shortcut_add", x)?;
    let dev = cuda_dev(x)?;
    let (suffix, _) = tag(x.dtype())?;
    let (stream_f, f) = func(&dev, NORM, &format!("up_shortcut_add_{suffix}"))?;
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
            unsafe { lb.launch(grid_1d(total)) }.w()?;
            drop(lb);
            Ok(wrap(out, &dev, (b, co, h2, w2)))
        }};
    }
    match x.dtype() {
        DType::BF16 => go!(half::bf16),
        _ => go!(f32),
    }
}
