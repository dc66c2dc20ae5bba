//! Fused-op entry points shared by the Sana transformer and the DC-AE decoder.
//!
//! Each op is one function so a fused CUDA kernel can later replace the body without touching the
//! model code (sana-port-spec §6.2). The bodies here are the portable reference path: plain candle ops,
//! correct on every device, used by the CPU parity tests. With the `cuda` feature, a CUDA tensor in bf16 or
//! f32 goes to our fused kernels instead ([`super::kernels`], compared with these bodies by `gpu-check`).
//! Layout is channels-last `(B, H, W, C)` unless a function says otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Result, Tensor, D};

static PORTABLE_ONLY: AtomicBool = AtomicBool::new(false);

/// Routes every op through the portable bodies, also on CUDA (process-wide). For `gpu-check` and the
/// benchmarks, which compare the fused kernels with the reference path on the same device.
pub fn force_portable(on: bool) {
    PORTABLE_ONLY.store(on, Ordering::SeqCst);
}

static BATCH_INVARIANT: AtomicBool = AtomicBool::new(true);

/// Whether a batch row's result must not depend on the batch size (default on; process-wide). On, the
/// CUDA kernels whose summation order would follow the call's total size (cuBLASLt's algorithm choice by
/// row count, the linear attention's chunking, batched attention GEMMs) take an order fixed by one batch
/// row's shape, so a request batched with others computes exactly what it computes alone (issue 14).
/// Off is the earlier, size-tuned behaviour, kept so `sana-bench` and `gpu-check` can measure both on
/// one card. The CPU path is invariant either way.
pub fn set_batch_invariant(on: bool) {
    BATCH_INVARIANT.store(on, Ordering::SeqCst);
}

/// See [`set_batch_invariant`].
pub fn batch_invariant() -> bool {
    BATCH_INVARIANT.load(Ordering::Relaxed)
}

/// Whether `t` takes the fused CUDA path.
#[cfg(feature = "cuda")]
pub(crate) fn fused(t: &Tensor) -> bool {
    !PORTABLE_ONLY.load(Ordering::Relaxed)
        && t.device().is_cuda()
        && super::kernels::supports(t.dtype())
}

/// A depthwise conv weight `(C, 1, k, k)` as PyTorch stores it, and its `(k, k, C)` transpose (one
/// C-vector per tap), made on first use and kept: the layout both the portable body and the kernel read.
#[derive(Debug, Clone)]
pub struct DepthwiseWeight {
    weight: Tensor,
    taps: Arc<OnceLock<Tensor>>,
}

impl DepthwiseWeight {
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight,
            taps: Arc::new(OnceLock::new()),
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `(k, k, C)` in the weight's dtype, contiguous.
    pub fn taps(&self) -> Result<Tensor> {
        if let Some(t) = self.taps.get() {
            return Ok(t.clone());
        }
        let (c, one, kh, kw) = self.weight.dims4()?;
        if one != 1 || kh != kw || kh % 2 == 0 {
            candle_core::bail!(
                "depthwise weight {:?} is not (C, 1, k, k) with odd k",
                self.weight.dims()
            );
        }
        let taps = self
            .weight
            .reshape((c, kh, kw))?
            .permute((1, 2, 0))?
            .contiguous()?;
        Ok(self.taps.get_or_init(|| taps).clone())
    }
}

/// [`depthwise_conv2d_nhwc`] with a prepared weight: the fused kernel on CUDA.
pub fn depthwise_conv(
    x: &Tensor,
    weight: &DepthwiseWeight,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        let taps = weight.taps()?.to_dtype(x.dtype())?;
        let bias = bias.map(|b| b.to_dtype(x.dtype())).transpose()?;
        if super::kernels::dwconv_tiled_fits(x, taps.dim(0)?) {
            return super::kernels::dwconv_tiled(&x.contiguous()?, &taps, bias.as_ref());
        }
        return super::kernels::dwconv_nhwc(
            &x.contiguous()?,
            &taps,
            bias.as_ref(),
            None,
            false,
            false,
        );
    }
    depthwise_conv2d_nhwc(x, weight.weight(), bias)
}

/// The middle of GLUMBConv, channels-last: `y = depthwise(silu(x + in_bias)) + bias`, then the channel
/// halves `value · silu(gate)` (`torch.chunk(2)`: value first). `x`: `(B, H, W, 2·hidden)`, the 1×1
/// expansion without its bias. Returns `(B, H, W, hidden)`. One kernel on CUDA.
pub fn glu_depthwise(
    x: &Tensor,
    in_bias: &Tensor,
    weight: &DepthwiseWeight,
    bias: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        let dt = x.dtype();
        let taps = weight.taps()?.to_dtype(dt)?;
        if super::kernels::glu_tiled_fits(x) && taps.dims()[..2] == [3, 3] {
            return super::kernels::glu_dwconv_tiled(
                &x.contiguous()?,
                &taps,
                &bias.to_dtype(dt)?.contiguous()?,
                &in_bias.to_dtype(dt)?.contiguous()?,
            );
        }
        // silu(x + in_bias) once per element (bf16, as diffusers rounds it), then depthwise + bias + GLU.
        let y = super::kernels::bias_rows_act(x.contiguous()?, &in_bias.to_dtype(dt)?, None, true)?;
        return super::kernels::dwconv_nhwc(
            &y,
            &taps,
            Some(&bias.to_dtype(dt)?),
            None,
            false,
            true,
        );
    }
    let hidden = x.dim(D::Minus1)? / 2;
    let y = x.broadcast_add(in_bias)?.silu()?;
    let y = depthwise_conv2d_nhwc(&y, weight.weight(), Some(bias))?;
    let value = y.narrow(D::Minus1, 0, hidden)?;
    let gate = y.narrow(D::Minus1, hidden, hidden)?;
    value * gate.silu()?
}

/// ReLU linear attention on token-major views `(B, N, G, d)` (any strides, unit stride on `d`: heads
/// split by a reshape, or q|k|v groups narrowed out of one tensor). Returns `(B, N, G·d)` in the inputs'
/// dtype; f32 inside, as [`relu_linear_attention`]. One fused pass on CUDA, no casts or copies.
pub fn relu_linear_attention_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(q) && q.dim(3)? <= 64 {
        return super::kernels::relu_linear_attention_tokens(q, k, v, eps);
    }
    let (b, n, g, d) = q.dims4()?;
    let o = relu_linear_attention(
        &q.transpose(1, 2)?,
        &k.transpose(1, 2)?,
        &v.transpose(1, 2)?,
        eps,
    )?;
    o.to_dtype(q.dtype())?
        .transpose(1, 2)?
        .reshape((b, n, g * d))
}

/// [`relu_linear_attention_tokens`] over the groups of several q|k|v tensors, as if concatenated on the
/// channel dim first: each scale is `(B, N, G_i·3d)` with group `g` at channels `[3d·g, 3d·(g+1))` holding
/// its q | k | v (the DC-AE's multiscale attention); returns `(B, N, (Σ G_i)·d)`. On CUDA each scale is
/// attended where it lies and writes its own columns (no concatenated copy of the inputs); the portable
/// body concatenates and attends once.
pub fn relu_linear_attention_scales(scales: &[Tensor], d: usize, eps: f64) -> Result<Tensor> {
    let grouped = |t: &Tensor| -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        if c % (3 * d) != 0 {
            candle_core::bail!(
                "relu_linear_attention_scales: {c} channels are not q|k|v groups of {d}"
            );
        }
        t.reshape((b, n, c / (3 * d), 3 * d))
    };
    #[cfg(feature = "cuda")]
    if scales.first().is_some_and(fused) && d <= 64 {
        let parts = scales
            .iter()
            .map(|s| {
                let all = grouped(s)?;
                Ok((
                    all.narrow(3, 0, d)?,
                    all.narrow(3, d, d)?,
                    all.narrow(3, 2 * d, d)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        return super::kernels::relu_linear_attention_parts(&parts, eps);
    }
    let all = grouped(&Tensor::cat(scales, D::Minus1)?)?;
    let part = |i: usize| all.narrow(3, i * d, d);
    relu_linear_attention_tokens(&part(0)?, &part(1)?, &part(2)?, eps)
}

/// LayerNorm over the last dim without affine, computed two-pass in f32 (no `E[x²]−mean²`
/// cancellation on large residual streams) and returned in `x`'s dtype, like `nn.LayerNorm` on bf16.
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// Row `i` of the AdaLN modulation: `table[i] + temb6[:, i]` as `(B, 1, D)`.
/// `table`: `(6, D)`; `temb6`: `(B, 6·D)`.
pub fn modulation_row(table: &Tensor, temb6: &Tensor, i: usize) -> Result<Tensor> {
    let (b, d6) = temb6.dims2()?;
    let d = d6 / 6;
    table
        .unsqueeze(0)?
        .broadcast_add(&temb6.reshape((b, 6, d))?)?
        .narrow(1, i, 1)
}

/// `LayerNorm(x) · (1 + scale) + shift` with `shift`/`scale` rows `shift_i`/`scale_i` of the modulation
/// ([`modulation_row`]). `x`: `(B, N, D)`. One kernel on CUDA.
pub fn layer_norm_modulate(
    x: &Tensor,
    table: &Tensor,
    temb6: &Tensor,
    shift_i: usize,
    scale_i: usize,
    eps: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        let dt = x.dtype();
        return super::kernels::layer_norm_modulate(
            &x.contiguous()?,
            &table.to_dtype(dt)?.contiguous()?,
            &temb6.to_dtype(dt)?.contiguous()?,
            shift_i,
            scale_i,
            eps,
        );
    }
    let shift = modulation_row(table, temb6, shift_i)?;
    let scale = modulation_row(table, temb6, scale_i)?;
    layer_norm_no_affine(x, eps)?
        .broadcast_mul(&(scale + 1.0)?)?
        .broadcast_add(&shift)
}

/// `x + y · gate` with `gate` row `gate_i` of the modulation. `x`, `y`: `(B, N, D)`. One kernel on CUDA.
pub fn gated_residual(
    x: &Tensor,
    y: &Tensor,
    table: &Tensor,
    temb6: &Tensor,
    gate_i: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        let dt = x.dtype();
        return super::kernels::gated_residual(
            &x.contiguous()?,
            &y.contiguous()?,
            &table.to_dtype(dt)?.contiguous()?,
            &temb6.to_dtype(dt)?.contiguous()?,
            gate_i,
        );
    }
    x + y.broadcast_mul(&modulation_row(table, temb6, gate_i)?)?
}

/// A dense 2-D convolution layer (stride 1, dilation 1) on channels-last tensors `(B, H, W, C)`, with
/// optional bias, weight as PyTorch stores it `(Cout, Cin, kh, kw)`. On CUDA: cuDNN on NHWC descriptors
/// with the weight permuted once to `(Cout, kh, kw, Cin)`, plus one fused bias(+SiLU) pass
/// ([`super::kernels::conv2d_nhwc`]); elsewhere candle's NCHW `conv2d` between two layout copies.
#[derive(Debug, Clone)]
pub struct Conv2dLayer {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    /// `(Cout, kh, kw, Cin)` contiguous, made on first CUDA use and kept.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    krsc: Arc<OnceLock<Tensor>>,
}

impl Conv2dLayer {
    pub fn new(weight: Tensor, bias: Option<Tensor>, padding: usize) -> Self {
        Self {
            weight,
            bias,
            padding,
            krsc: Arc::new(OnceLock::new()),
        }
    }

    /// Loads `weight` (and `bias`) of a `k×k` conv under `vb`, padding `k / 2`.
    pub fn load(
        vb: candle_nn::VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((cout, cin, k, k), "weight")?;
        let bias = if bias {
            Some(vb.get(cout, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias, k / 2))
    }

    /// `x`: `(B, H, W, Cin)` → `(B, H', W', Cout)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }

    /// `silu(conv(x) + bias)` when `silu`, else `conv(x) + bias`; channels-last in and out.
    pub fn forward_act(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused(x) && self.weight.dtype() == x.dtype() {
            let krsc = match self.krsc.get() {
                Some(w) => w.clone(),
                None => {
                    let w = self.weight.permute((0, 2, 3, 1))?.contiguous()?;
                    self.krsc.get_or_init(|| w).clone()
                }
            };
            return super::kernels::conv2d_nhwc(
                &x.contiguous()?,
                &krsc,
                self.bias.as_ref(),
                self.padding,
                silu,
            );
        }
        let nchw = x.permute((0, 3, 1, 2))?.contiguous()?;
        let y = nchw.conv2d(&self.weight, self.padding, 1, 1, 1)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => y,
        };
        let y = if silu { y.silu()? } else { y };
        y.permute((0, 2, 3, 1))?.contiguous()
    }
}

/// `x @ wᵀ + b` of a candle `Linear`, plus `residual` when given. On CUDA in bf16: one cuBLASLt call
/// with the bias (and residual) in its epilogue. With batch invariance on ([`set_batch_invariant`]) its
/// algorithm is the one for a single batch row of `x` (the `L` rows of a `(B, L, k)` input, a fixed 16
/// rows for a 2-D input), so a batch row computes alike in a batch of any size. Other CUDA dtypes:
/// candle's GEMM and one vectorised bias (and residual) pass instead of candle's strided broadcast add.
pub fn linear(lin: &candle_nn::Linear, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    linear_pinned(lin, x, residual, batch_invariant())
}

/// [`linear`] with the heuristic's fastest algorithm for the call's own row count, whatever the batch
/// invariance setting (split-K allowed). For callers that keep batch invariance by running each batch row
/// in a call of its own shape: the text encoder (`text::TextEncoder`), whose trimmed prompts have few
/// rows, where the algorithms without split-K leave most of the GPU idle.
pub fn linear_fastest(
    lin: &candle_nn::Linear,
    x: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    linear_pinned(lin, x, residual, false)
}

fn linear_pinned(
    lin: &candle_nn::Linear,
    x: &Tensor,
    residual: Option<&Tensor>,
    pin: bool,
) -> Result<Tensor> {
    use candle_nn::Module;
    #[cfg(not(feature = "cuda"))]
    let _ = pin; // the CPU GEMM sums each row alike at any row count
    #[cfg(feature = "cuda")]
    if fused(x) {
        let w = lin.weight();
        if x.dtype() == DType::BF16
            && w.dtype() == DType::BF16
            && x.is_contiguous()
            && w.is_contiguous()
            && residual.is_none_or(|r| r.is_contiguous() && r.dtype() == DType::BF16)
        {
            let b = lin.bias().map(|b| b.to_dtype(DType::BF16)).transpose()?;
            // One batch row's rows: `L` of `(B, L, k)`, `H·W` of `(B, H, W, k)`. 2-D inputs (the
            // timestep embeddings, one row per batch row): the algorithm for a small batch, a plain tiled
            // kernel that accepts any row count (a one-row choice may be a matrix-vector kernel that
            // does not).
            let algo_rows = match x.rank() {
                0..=2 => 16,
                _ => x.elem_count() / (x.dim(0)? * x.dim(D::Minus1)?).max(1),
            };
            let algo_rows = pin.then_some(algo_rows);
            return super::kernels::linear_bf16(x, w, b.as_ref(), residual, algo_rows);
        }
        if let Some(b) = lin.bias() {
            let y = candle_nn::Linear::new(w.clone(), None).forward(x)?;
            return super::kernels::add_bias_rows(y, &b.to_dtype(x.dtype())?, residual);
        }
    }
    let y = lin.forward(x)?;
    match residual {
        Some(r) => r + y,
        None => Ok(y),
    }
}

/// `(B, L, heads·d)` → `(B, heads, L, d)` contiguous in `dtype` (split heads + cast, one pass on CUDA).
pub fn split_heads_as(x: &Tensor, heads: usize, dtype: DType) -> Result<Tensor> {
    let (b, l, dim) = x.dims3()?;
    let x4 = x.reshape((b, l, heads, dim / heads))?;
    #[cfg(feature = "cuda")]
    if fused(x) && (dim / heads).is_multiple_of(8) {
        return super::kernels::permute0213(&x4.contiguous()?, dtype);
    }
    x4.transpose(1, 2)?.to_dtype(dtype)?.contiguous()
}

/// `(B, heads, L, d)` → `(B, L, heads·d)` contiguous (merge heads, one pass on CUDA).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    #[cfg(feature = "cuda")]
    if fused(x) && d % 8 == 0 {
        return super::kernels::permute0213(&x.contiguous()?, x.dtype())?.reshape((b, l, h * d));
    }
    x.transpose(1, 2)?.reshape((b, l, h * d))
}

/// `torch.repeat_interleave(x, r, dim=1)` of an NCHW tensor, on its channels-last form `(..., C)`:
/// channel `c·r + k` is input channel `c`.
pub fn repeat_interleave_last(x: &Tensor, r: usize) -> Result<Tensor> {
    if r == 1 {
        return Ok(x.clone());
    }
    let mut dims = x.dims().to_vec();
    let c = dims.pop().unwrap_or(1);
    let mut wide = dims.clone();
    wide.extend([c, r]);
    dims.push(c * r);
    x.unsqueeze(x.rank())?.broadcast_as(wide)?.reshape(dims)
}

/// `pixel_shuffle(x, 2)` of an NCHW tensor, on its channels-last form: `(B, H, W, 4·C)` → `(B, 2H, 2W, C)`,
/// input channel `4c + 2a + b` going to pixel `(2i + a, 2j + b)`.
pub fn pixel_shuffle2_nhwc(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c4) = x.dims4()?;
    let c = c4 / 4;
    x.reshape((b, h, w, c, 2, 2))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, 2 * h, 2 * w, c))
}

/// Nearest ×2 upsample (`F.interpolate(scale_factor=2, mode="nearest")`), channels-last. One pass on CUDA.
pub fn upsample_nearest2x_nhwc(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    #[cfg(feature = "cuda")]
    if fused(x) && super::kernels::nhwc_fits(c, x.dtype()) {
        return super::kernels::upsample2x_nhwc(&x.contiguous()?);
    }
    x.reshape((b, h, 1, w, 1, c))?
        .broadcast_as((b, h, 2, w, 2, c))?
        .reshape((b, 2 * h, 2 * w, c))
}

/// `DCUpBlock2d`'s shortcut and residual, channels-last: `main + pixel_shuffle(repeat_interleave(x, r), 2)`
/// (`main` `(B, 2H, 2W, Co)`, `x` `(B, H, W, Ci)`). One pass on CUDA (no repeated or shuffled copies).
pub fn up_shortcut_add(main: &Tensor, x: &Tensor, r: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) && super::kernels::nhwc_fits(main.dim(3)?, x.dtype()) {
        return super::kernels::up_shortcut_add_nhwc(&main.contiguous()?, &x.contiguous()?, r);
    }
    main + pixel_shuffle2_nhwc(&repeat_interleave_last(x, r)?)?
}

/// `a.matmul(b)` for f32 operands whose values are bf16 numbers (bf16 activations cast up): on CUDA through
/// the TF32 tensor cores, which is exact here (bf16 → tf32 loses no bits; products and sums stay f32, as in
/// the fused SDPA kernels diffusers uses). candle's switch is process-wide, so it is set around this one call.
pub fn matmul_bf16_valued(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(a) && a.dtype() == DType::F32 {
        let before = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        let out = a.matmul(b);
        candle_core::cuda::set_gemm_reduced_precision_f32(before);
        return out;
    }
    a.matmul(b)
}

/// Softmax cross-attention of `q` `(B, N, heads·d)` to cached text keys/values `k`, `v` `(B, heads, T, d)`
/// (model dtype), scale `scale`, additive f32 `mask_bias` `(B, 1, 1, T)`; returns `(B, N, heads·d)` in q's
/// dtype. Scores are f32 from exact products of the model-dtype values (as the fused SDPA kernels compute
/// them), probabilities are rounded to the model dtype before the value GEMM. On CUDA in bf16: two cuBLAS
/// strided-batched GEMMs per batch row that read q and write the output in the token-major layout, around
/// one fused softmax, with no head split/merge copies.
pub fn cross_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let heads = k.dim(1)?;
    let dtype = q.dtype();
    #[cfg(feature = "cuda")]
    if fused(q) && dtype == DType::BF16 && k.dtype() == dtype && v.dtype() == dtype {
        return super::kernels::cross_attention_bf16(
            &q.contiguous()?,
            &k.contiguous()?,
            &v.contiguous()?,
            &mask_bias.contiguous()?,
            scale,
        );
    }
    let qh = split_heads_as(q, heads, DType::F32)?; // (B, heads, N, d)
    let k_t = k.to_dtype(DType::F32)?.transpose(2, 3)?.contiguous()?; // (B, heads, d, T)
                                                                      // q and k hold bf16 values when the model runs in bf16: the f32 product is exact in TF32.
    let scores = if dtype == DType::BF16 {
        matmul_bf16_valued(&qh, &k_t)?
    } else {
        qh.matmul(&k_t)?
    }; // (B, heads, N, T)
    let probs = masked_softmax(&scores, mask_bias, scale, dtype)?;
    let o = probs.matmul(&v.contiguous()?)?; // (B, heads, N, d)
    merge_heads(&o)?.reshape((b, n, inner))
}

/// `softmax(scores · scale + mask_bias)` over the last dim, cast to `dtype`: f32 `scores` `(B, H, N, T)`,
/// additive f32 `mask_bias` `(B, 1, 1, T)`. One kernel on CUDA (scale, mask, softmax and cast fused).
pub fn masked_softmax(
    scores: &Tensor,
    mask_bias: &Tensor,
    scale: f64,
    dtype: DType,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(scores) && scores.dtype() == DType::F32 && super::kernels::supports(dtype) {
        return super::kernels::masked_softmax(
            &scores.contiguous()?,
            &mask_bias.contiguous()?,
            scale,
            dtype,
        );
    }
    let s = (scores * scale)?.broadcast_add(mask_bias)?;
    candle_nn::ops::softmax_last_dim(&s)?.to_dtype(dtype)
}

/// The activation [`rms_norm_rows`] applies to its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowAct {
    Identity,
    Silu,
    Relu,
}

impl RowAct {
    /// The `act` argument of the `rms_rows` kernels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn code(self) -> i32 {
        match self {
            RowAct::Identity => 0,
            RowAct::Silu => 1,
            RowAct::Relu => 2,
        }
    }
}

/// diffusers `RMSNorm(C, eps, weight, bias)` over the last (channel) dim, plus `residual` when given, then
/// `act` (the DC-AE's `norm_out` → `conv_act`). One kernel on CUDA; the portable body is candle's
/// `rms_norm` and elementwise ops.
pub fn rms_norm_rows(
    h: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    eps: f32,
    act: RowAct,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(h) && super::kernels::rms_rows_fits(h.dim(D::Minus1)?, h.dtype()) {
        let dt = h.dtype();
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        return super::kernels::rms_norm_rows(
            &h.contiguous()?,
            &weight.to_dtype(dt)?.contiguous()?,
            Some(&bias.to_dtype(dt)?.contiguous()?),
            residual.as_ref(),
            eps,
            act,
        );
    }
    let y = candle_nn::ops::rms_norm(&h.contiguous()?, weight, eps)?.broadcast_add(bias)?;
    let y = match residual {
        Some(r) => (y + r)?,
        None => y,
    };
    match act {
        RowAct::Identity => Ok(y),
        RowAct::Silu => y.silu(),
        RowAct::Relu => y.relu(),
    }
}

/// diffusers `RMSNorm(C, eps, weight)` of each `C`-column segment of the last dim of `x` (`S·C` columns,
/// `S = weights.len()`), each with its own weight; a segment whose weight is `None` passes unchanged. Sprint's
/// `rms_norm_across_heads` norms of q and k on the fused q|k|v projection (`[Some(q), Some(k), None]`) and
/// of one projection (`[Some(w)]`). One kernel on CUDA, one read and one write of `x`; the portable body
/// is candle's `rms_norm` of each narrowed segment, concatenated.
pub fn rms_norm_segments(x: &Tensor, weights: &[Option<&Tensor>], eps: f32) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    let segs = weights.len();
    if segs == 0 || cols % segs != 0 {
        candle_core::bail!("rms_norm_segments: {cols} columns do not split into {segs} segments");
    }
    let c = cols / segs;
    #[cfg(feature = "cuda")]
    if fused(x) && segs <= 3 && super::kernels::rms_segments_fits(c, x.dtype()) {
        let dt = x.dtype();
        let weights = weights
            .iter()
            .map(|w| w.map(|w| w.to_dtype(dt)).transpose())
            .collect::<Result<Vec<_>>>()?;
        let refs = weights.iter().map(Option::as_ref).collect::<Vec<_>>();
        return super::kernels::rms_norm_segments(x, &refs, eps);
    }
    let parts = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let seg = x.narrow(D::Minus1, i * c, c)?;
            match w {
                Some(w) => candle_nn::ops::rms_norm(&seg.contiguous()?, w, eps),
                None => Ok(seg),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    match parts.as_slice() {
        [one] => Ok(one.clone()),
        _ => Tensor::cat(&parts, D::Minus1),
    }
}

/// Depthwise 2-D convolution, stride 1, "same" zero padding (`k / 2`), channels-last.
///
/// `x`: `(B, H, W, C)`; `weight`: `(C, 1, k, k)` as stored by PyTorch for `groups = C`;
/// `bias`: `(C)`. Returns `(B, H, W, C)`. Mirrors `nn.Conv2d(C, C, k, padding=k//2, groups=C)`.
///
/// candle's own grouped conv runs one convolution per group (unusable at 11 200 groups), so this
/// sums `k·k` shifted, per-channel-scaled views instead: exact in f32, `k²` elementwise passes.
pub fn depthwise_conv2d_nhwc(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (_b, h, w, c) = x.dims4()?;
    let (wc, one, kh, kw) = weight.dims4()?;
    if wc != c || one != 1 || kh != kw || kh % 2 == 0 {
        candle_core::bail!(
            "depthwise_conv2d_nhwc: weight {:?} does not fit {c} channels",
            weight.dims()
        );
    }
    let pad = kh / 2;
    let xp = x.pad_with_zeros(1, pad, pad)?.pad_with_zeros(2, pad, pad)?;
    // (C, 1, k, k) -> (k, k, C): one C-vector per tap, broadcast over (B, H, W).
    let taps = weight
        .to_dtype(x.dtype())?
        .squeeze(1)?
        .permute((1, 2, 0))?
        .contiguous()?;
    let mut acc: Option<Tensor> = None;
    for i in 0..kh {
        for j in 0..kw {
            let tap = taps.get(i)?.get(j)?; // (C)
            let term = xp.narrow(1, i, h)?.narrow(2, j, w)?.broadcast_mul(&tap)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    let out = acc.expect("kernel has at least one tap");
    match bias {
        Some(b) => out.broadcast_add(&b.to_dtype(x.dtype())?),
        None => Ok(out),
    }
}

/// ReLU linear attention as diffusers computes it (`SanaLinearAttnProcessor2_0`,
/// `SanaMultiscaleAttnProcessor2_0`), in f32 whatever the input dtype.
///
/// `q`, `k`, `v`: `(B, G, N, d)` (G heads or groups, N tokens). Returns `(B, G, N, d)` in f32:
/// `out_i = (Σ_j v_j relu(k_j)ᵀ) relu(q_i) / (Σ_j relu(k_j)ᵀ relu(q_i) + eps)`, with `eps = 1e-15`
/// in both upstream processors. The ReLU is applied here; pass the raw projections.
pub fn relu_linear_attention(q: &Tensor, k: &Tensor, v: &Tensor, eps: f64) -> Result<Tensor> {
    let q = q.to_dtype(DType::F32)?.relu()?;
    let k = k.to_dtype(DType::F32)?.relu()?;
    let v = v.to_dtype(DType::F32)?;
    // diffusers pads v with a row of ones so one GEMM yields numerator and denominator.
    let ones = Tensor::ones(v.dims(), DType::F32, v.device())?.narrow(D::Minus1, 0, 1)?;
    let v_pad = Tensor::cat(&[&v, &ones], D::Minus1)?; // (B, G, N, d+1)
    let kv = k
        .transpose(2, 3)?
        .contiguous()?
        .matmul(&v_pad.contiguous()?)?; // (B, G, d, d+1)
    let o = q.contiguous()?.matmul(&kv)?; // (B, G, N, d+1)
    let d = v.dim(D::Minus1)?;
    let num = o.narrow(D::Minus1, 0, d)?;
    let den = (o.narrow(D::Minus1, d, 1)? + eps)?;
    num.broadcast_div(&den)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depthwise_matches_candle_grouped_conv() -> Result<()> {
        let (b, h, w, c) = (2, 5, 7, 6);
        let x = crate::rng::test_randn("ops:620", 1.0, (b, h, w, c))?;
        for k in [3usize, 5] {
            let wt = crate::rng::test_randn("ops:622", 1.0, (c, 1, k, k))?;
            let bias = crate::rng::test_randn("ops:623", 1.0, c)?;
            let ours = depthwise_conv2d_nhwc(&x, &wt, Some(&bias))?;
            let nchw = x.permute((0, 3, 1, 2))?.contiguous()?;
            let reference = nchw
                .conv2d(&wt, k / 2, 1, 1, c)?
                .broadcast_add(&bias.reshape((1, c, 1, 1))?)?
                .permute((0, 2, 3, 1))?;
            let diff = (ours - reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "k={k}: max abs diff {diff}");
        }
        Ok(())
    }

    /// The channels-last layout ops against candle's NCHW ones.
    #[test]
    fn channels_last_layout_ops_match_nchw() -> Result<()> {
        let nchw = |t: &Tensor| t.permute((0, 3, 1, 2))?.contiguous();
        let x = crate::rng::test_randn("ops:645", 1.0, (2, 3, 5, 8))?; // (B, H, W, C)
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let up = nchw(&upsample_nearest2x_nhwc(&x)?)?;
        assert_eq!(max_diff(&up, &nchw(&x)?.upsample_nearest2d(6, 10)?)?, 0.0);
        let ps = nchw(&pixel_shuffle2_nhwc(&x)?)?;
        assert_eq!(
            max_diff(&ps, &candle_nn::ops::pixel_shuffle(&nchw(&x)?, 2)?)?,
            0.0
        );
        // repeat_interleave of 8 channels by 3: channel c·3 + k is channel c.
        let ri = repeat_interleave_last(&x, 3)?;
        for c in 0..8 {
            for k in 0..3 {
                let got = ri.narrow(3, c * 3 + k, 1)?;
                assert_eq!(max_diff(&got, &x.narrow(3, c, 1)?)?, 0.0);
            }
        }
        // up-block shortcut: main + pixel_shuffle(repeat_interleave(x, r)), r = 4·Co/Ci = 2 for Co = 4.
        let main = crate::rng::test_randn("ops:665", 1.0, (2, 6, 10, 4))?;
        let want = (nchw(&main)?
            + candle_nn::ops::pixel_shuffle(
                &nchw(&x)?
                    .unsqueeze(2)?
                    .broadcast_as((2, 8, 2, 3, 5))?
                    .reshape((2, 16, 3, 5))?,
                2,
            )?)?;
        assert!(max_diff(&nchw(&up_shortcut_add(&main, &x, 2)?)?, &want)? < 1e-6);
        Ok(())
    }

    #[test]
    fn rms_norm_rows_fuses_residual_and_silu() -> Result<()> {
        let x = crate::rng::test_randn("ops:681", 2.0, (3, 4, 16))?;
        let r = crate::rng::test_randn("ops:682", 1.0, (3, 4, 16))?;
        let (w, b) = (
            crate::rng::test_randn("ops:684", 1.0, 16)?,
            crate::rng::test_randn("ops:685", 1.0, 16)?,
        );
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&w)?
            .broadcast_add(&b)?;
        let got = rms_norm_rows(&x, &w, &b, Some(&r), 1e-5, RowAct::Silu)?;
        let want = (normed + &r)?.silu()?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max abs diff {diff}");
        Ok(())
    }

    #[test]
    fn rms_norm_segments_normalises_each_weighted_segment_and_copies_the_rest() -> Result<()> {
        // (2, 3, 3·4): q | k | v segments of 4 columns, as Sprint's fused projection.
        let c = 4;
        let x = crate::rng::test_randn("ops:segments", 2.0, (2, 3, 3 * c))?;
        let wq = crate::rng::test_randn("ops:segments-wq", 1.0, c)?;
        let wk = crate::rng::test_randn("ops:segments-wk", 1.0, c)?;
        let got = rms_norm_segments(&x, &[Some(&wq), Some(&wk), None], 1e-5)?;
        assert_eq!(got.dims(), x.dims());
        let (rows, got) = (
            x.flatten_to(1)?.to_vec2::<f32>()?,
            got.flatten_to(1)?.to_vec2::<f32>()?,
        );
        let (wq, wk) = (wq.to_vec1::<f32>()?, wk.to_vec1::<f32>()?);
        for (row, out) in rows.iter().zip(&got) {
            for (s, w) in [(0, Some(&wq)), (1, Some(&wk)), (2, None)] {
                let (xs, ys) = (&row[s * c..(s + 1) * c], &out[s * c..(s + 1) * c]);
                let Some(w) = w else {
                    assert_eq!(xs, ys, "the segment without a weight is copied bit for bit");
                    continue;
                };
                let ms = xs.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / c as f64;
                for ((xv, yv), wv) in xs.iter().zip(ys).zip(w) {
                    let want = f64::from(*xv) / (ms + 1e-5).sqrt() * f64::from(*wv);
                    assert!(
                        (f64::from(*yv) - want).abs() < 1e-5,
                        "segment {s}: {yv} vs {want}"
                    );
                }
            }
        }
        // One segment is diffusers' RMSNorm of the whole row; columns that do not split are refused.
        let one = rms_norm_segments(
            &x,
            &[Some(&Tensor::ones(3 * c, DType::F32, x.device())?)],
            1e-5,
        )?;
        let whole =
            candle_nn::ops::rms_norm(&x, &Tensor::ones(3 * c, DType::F32, x.device())?, 1e-5)?;
        assert_eq!(
            one.flatten_all()?.to_vec1::<f32>()?,
            whole.flatten_all()?.to_vec1::<f32>()?
        );
        assert!(rms_norm_segments(&x, &[None, None, None, None, None], 1e-5).is_err());
        Ok(())
    }

    #[test]
    fn linear_attention_of_scales_is_that_of_their_concatenation() -> Result<()> {
        // Two scales of 2 and 1 q|k|v groups of d = 4: groups of the first scale come first.
        let d = 4;
        let s0 = crate::rng::test_randn("ops:scales0", 1.0, (2, 5, 2 * 3 * d))?;
        let s1 = crate::rng::test_randn("ops:scales1", 1.0, (2, 5, 3 * d))?;
        let got = relu_linear_attention_scales(&[s0.clone(), s1.clone()], d, 1e-15)?;
        assert_eq!(got.dims(), &[2, 5, 3 * d]);
        let one = |s: &Tensor| -> Result<Tensor> {
            let (b, n, c) = s.dims3()?;
            let all = s.reshape((b, n, c / (3 * d), 3 * d))?;
            relu_linear_attention_tokens(
                &all.narrow(3, 0, d)?,
                &all.narrow(3, d, d)?,
                &all.narrow(3, 2 * d, d)?,
                1e-15,
            )
        };
        let want = Tensor::cat(&[one(&s0)?, one(&s1)?], D::Minus1)?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "max abs diff {diff}");
        let bad = crate::rng::test_randn("ops:scales2", 1.0, (2, 5, 3 * d + 1))?;
        assert!(relu_linear_attention_scales(&[bad], d, 1e-15).is_err());
        Ok(())
    }

    #[test]
    fn linear_attention_matches_explicit_sum() -> Result<()> {
        let (q, k, v) = (
            crate::rng::test_randn("ops:707", 1.0, (1, 2, 4, 3))?,
            crate::rng::test_randn("ops:708", 1.0, (1, 2, 4, 3))?,
            crate::rng::test_randn("ops:709", 1.0, (1, 2, 4, 3))?,
        );
        let (qv, kv, vv) = (
            q.relu()?.squeeze(0)?.to_vec3::<f32>()?,
            k.relu()?.squeeze(0)?.to_vec3::<f32>()?,
            v.squeeze(0)?.to_vec3::<f32>()?,
        );
        let full = relu_linear_attention(&q, &k, &v, 1e-15)?
            .squeeze(0)?
            .to_vec3::<f32>()?;
        for g in 0..2 {
            for i in 0..4 {
                let scores: Vec<f32> = (0..4)
                    .map(|j| (0..3).map(|c| qv[g][i][c] * kv[g][j][c]).sum())
                    .collect();
                let den: f32 = scores.iter().sum::<f32>() + 1e-15;
                for c in 0..3 {
                    let num: f32 = (0..4).map(|j| scores[j] * vv[g][j][c]).sum();
                    let want = num / den;
                    assert!((full[g][i][c] - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
            }
        }
        Ok(())
    }
}
