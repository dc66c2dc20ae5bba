//! Launchers of `gemma.cu`: the Gemma-2 encoder's fused element-wise ops in bf16 (semantics in the `.cu`
//! header; the portable bodies are in [`crate::gemma2`]).

use super::{
    bail, cuda_dev, func, grid_1d, require_contiguous, vec_ready, view, wrap, DType, LaunchConfig,
    PushKernelArg, Result, Source, Tensor, WrapErr, NULL,
};

pub(super) const GEMMA: Source = Source {
    module: "fleet_gemma",
    code: include_str!("gemma.cu"),
};

/// Vectors (8 bf16) a thread of `gemma_norm_bf16_m4` holds.
const NORM_MAXV: usize = 4;

fn require_bf16(name: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::BF16 {
        bail!(
            "{name}: operand {:?} is {:?}, expected bf16",
            t.dims(),
            t.dtype()
        );
    }
    require_contiguous(name, t)
}

/// Whether [`gemma_norm`] takes rows of `d` channels.
pub fn gemma_norm_fits(d: usize) -> bool {
    d.is_multiple_of(8) && d / 8 <= NORM_MAXV * 1024
}

/// Gemma's RMSNorm of the rows of `h` (bf16, `(..., D)`) with the f32 scale `sa` (`1 + w`, `(D)`), plus
/// `res` when given (`x`), then the norm with `sb` of that sum when given (`h`): returns `(x, h)`.
pub fn gemma_norm(
    h: &Tensor,
    res: Option<&Tensor>,
    sa: &Tensor,
    sb: Option<&Tensor>,
    eps: f32,
) -> Result<(Tensor, Option<Tensor>)> {
    let d = h.dim(candle_core::D::Minus1)?;
    if h.dtype() != DType::BF16 || !gemma_norm_fits(d) {
        bail!("gemma_norm: rows {:?} {:?}", h.dims(), h.dtype());
    }
    if res.is_some_and(|r| r.dtype() != DType::BF16 || r.dims() != h.dims()) {
        bail!(
            "gemma_norm: residual does not match the rows {:?}",
            h.dims()
        );
    }
    for s in std::iter::once(sa).chain(sb) {
        if s.dtype() != DType::F32 || s.dims() != [d] {
            bail!(
                "gemma_norm: scale {:?} {:?}, expected f32 ({d})",
                s.dims(),
                s.dtype()
            );
        }
    }
    let h = &vec_ready(h, 8)?;
    let res = res.map(|r| vec_ready(r, 8)).transpose()?;
    let (sa, sb) = (&vec_ready(sa, 4)?, sb.map(|s| vec_ready(s, 4)).transpose()?);
    let dev = cuda_dev(h)?;
    let rows = h.elem_count() / d;
    let (stream, f) = func(&dev, GEMMA, "gemma_norm_bf16_m4")?;
    let mut out_x = unsafe { dev.alloc::<half::bf16>(h.elem_count()) }?;
    let mut out_h = match sb {
        Some(_) => Some(unsafe { dev.alloc::<half::bf16>(h.elem_count()) }?),
        None => None,
    };
    let (hs, hl) = h.storage_and_layout();
    let hv = view::<half::bf16>(&hs, hl)?;
    let res_g = res.as_ref().map(|r| r.storage_and_layout());
    let rv = res_g
        .as_ref()
        .map(|(s, l)| view::<half::bf16>(s, l))
        .transpose()?;
    let (sas, sal) = sa.storage_and_layout();
    let sav = view::<f32>(&sas, sal)?;
    let sb_g = sb.as_ref().map(|s| s.storage_and_layout());
    let sbv = sb_g.as_ref().map(|(s, l)| view::<f32>(s, l)).transpose()?;
    let (di, e) = (d as i32, eps);
    let mut lb = stream.launch_builder(&f);
    lb.arg(&hv);
    match &rv {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
    lb.arg(&sav);
    match &sbv {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
    lb.arg(&mut out_x);
    match &mut out_h {
        Some(o) => lb.arg(o),
        None => lb.arg(&NULL),
    };
    lb.arg(&di);
    lb.arg(&e);
    let nv = d / 8;
    let threads = nv
        .div_ceil(nv.div_ceil(1024))
        .next_multiple_of(32)
        .min(1024);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    drop(lb);
    let x = wrap(out_x, &dev, h.shape().clone());
    let hn = out_h.map(|o| wrap(o, &dev, h.shape().clone()));
    Ok((x, hn))
}

/// The fused projection's rows `qkv` `(B, L, (nh + 2·nkv)·d)` (bf16) → `q` `(B, nh, L, d)` and `k`
/// `(B, nkv, L, d)` rotated with the `(max_pos, d/2)` bf16 tables, `v` `(B, nkv, L, d)`.
pub fn gemma_rope_split(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    nh: usize,
    nkv: usize,
    d: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, width) = qkv.dims3()?;
    require_bf16("gemma_rope_split", qkv)?;
    require_bf16("gemma_rope_split", cos)?;
    require_bf16("gemma_rope_split", sin)?;
    let (max_pos, half) = cos.dims2()?;
    if width != (nh + 2 * nkv) * d
        || !d.is_multiple_of(2)
        || half != d / 2
        || sin.dims() != cos.dims()
        || l > max_pos
    {
        bail!(
            "gemma_rope_split: qkv {:?} for {nh}+2·{nkv} heads of {d}, tables {:?}",
            qkv.dims(),
            cos.dims()
        );
    }
    let dev = cuda_dev(qkv)?;
    let (stream, f) = func(&dev, GEMMA, "gemma_rope_split_bf16")?;
    let mut q = unsafe { dev.alloc::<half::bf16>(b * nh * l * d) }?;
    let mut k = unsafe { dev.alloc::<half::bf16>(b * nkv * l * d) }?;
    let mut v = unsafe { dev.alloc::<half::bf16>(b * nkv * l * d) }?;
    let (xs, xl) = qkv.storage_and_layout();
    let (cs, cl) = cos.storage_and_layout();
    let (ss, sl) = sin.storage_and_layout();
    let (xv, cv, sv) = (
        view::<half::bf16>(&xs, xl)?,
        view::<half::bf16>(&cs, cl)?,
        view::<half::bf16>(&ss, sl)?,
    );
    let dims = [b as i32, l as i32, nh as i32, nkv as i32, d as i32];
    let mut lb = stream.launch_builder(&f);
    lb.arg(&xv);
    lb.arg(&cv);
    lb.arg(&sv);
    lb.arg(&mut q);
    lb.arg(&mut k);
    lb.arg(&mut v);
    for x in &dims {
        lb.arg(x);
    }
    unsafe { lb.launch(grid_1d(b * l * (nh + 2 * nkv) * half)) }.w()?;
    drop(lb);
    Ok((
        wrap(q, &dev, (b, nh, l, d)),
        wrap(k, &dev, (b, nkv, l, d)),
        wrap(v, &dev, (b, nkv, l, d)),
    ))
}

/// Softcapped, masked softmax of bf16 `scores` (`(B, ..., Lk)` holding `B·heads·Lq` rows of `Lk`) with the
/// additive f32 `mask` `(B, 1, Lq, Lk)`, in bf16; `softcap` `None` skips the cap.
pub fn gemma_softmax(
    scores: &Tensor,
    mask: &Tensor,
    heads: usize,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let b = scores.dim(0)?;
    let l = scores.dim(candle_core::D::Minus1)?;
    require_bf16("gemma_softmax", scores)?;
    require_contiguous("gemma_softmax", mask)?;
    let rows = scores.elem_count() / l.max(1);
    let lq = mask.dims().get(2).copied().unwrap_or(0);
    if mask.dtype() != DType::F32 || mask.dims() != [b, 1, lq, l] || rows != b * heads * lq {
        bail!(
            "gemma_softmax: scores {:?}, mask {:?} {:?}, {heads} heads",
            scores.dims(),
            mask.dims(),
            mask.dtype()
        );
    }
    let dev = cuda_dev(scores)?;
    let name = if l <= 512 {
        "gemma_softmax_bf16_r16"
    } else {
        "gemma_softmax_bf16"
    };
    let (stream, f) = func(&dev, GEMMA, name)?;
    let mut out = unsafe { dev.alloc::<half::bf16>(scores.elem_count()) }?;
    let (ss, sl) = scores.storage_and_layout();
    let (ms, ml) = mask.storage_and_layout();
    let (sv, mv) = (view::<half::bf16>(&ss, sl)?, view::<f32>(&ms, ml)?);
    // As candle's affine ops take them: f64 factors cast to f32, the division as a multiply by 1/cap.
    let (cap, inv_cap) = match softcap {
        Some(c) => (c as f32, (1.0 / c) as f32),
        None => (0.0f32, 0.0f32),
    };
    let (rows_i, hi, lqi, li, sc) = (rows as i64, heads as i32, lq as i32, l as i32, scale as f32);
    let mut lb = stream.launch_builder(&f);
    lb.arg(&sv);
    lb.arg(&mv);
    lb.arg(&mut out);
    lb.arg(&rows_i);
    lb.arg(&hi);
    lb.arg(&lqi);
    lb.arg(&li);
    lb.arg(&sc);
    lb.arg(&inv_cap);
    lb.arg(&cap);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    drop(lb);
    Ok(wrap(out, &dev, scores.shape().clone()))
}

/// `gelu_tanh(gate) · up` of the fused projection's rows `gu` `(..., 2·I)` (bf16) → `(..., I)`.
pub fn gemma_gelu_mul(gu: &Tensor) -> Result<Tensor> {
    let two_i = gu.dim(candle_core::D::Minus1)?;
    if gu.dtype() != DType::BF16 || !two_i.is_multiple_of(16) {
        bail!("gemma_gelu_mul: rows {:?} {:?}", gu.dims(), gu.dtype());
    }
    let gu = &vec_ready(gu, 8)?;
    let i = two_i / 2;
    let rows = gu.elem_count() / two_i;
    let dev = cuda_dev(gu)?;
    let (stream, f) = func(&dev, GEMMA, "gemma_gelu_mul_bf16")?;
    let mut out = unsafe { dev.alloc::<half::bf16>(rows * i) }?;
    let (gs, gl) = gu.storage_and_layout();
    let gv = view::<half::bf16>(&gs, gl)?;
    let (rows_i, ii) = (rows as i64, i as i32);
    let mut lb = stream.launch_builder(&f);
    lb.arg(&gv);
    lb.arg(&mut out);
    lb.arg(&rows_i);
    lb.arg(&ii);
    unsafe { lb.launch(grid_1d(rows * i / 8)) }.w()?;
    drop(lb);
    let mut dims = gu.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = i;
    }
    Ok(wrap(out, &dev, dims))
}
