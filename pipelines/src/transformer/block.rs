//! One Sana transformer block (`transformer_blocks.N`) and its parts: ReLU linear self-attention
//! (`attn1`), softmax cross-attention (`attn2`) with cacheable text K/V, and the GLUMBConv feed-forward
//! (`ff`), all on channels-last tokens `(B, N, D)`.
//!
//! Mirrors diffusers 0.42.1 `models/transformers/sana_transformer.py` (`SanaTransformerBlock`,
//! `GLUMBConv`, `SanaAttnProcessor2_0`) and `models/attention_processor.py`
//! (`Attention` with `qk_norm="rms_norm_across_heads"`, `SanaLinearAttnProcessor2_0`);
//! docs/sana-port-spec.md §2.2. Safetensors names are used verbatim so a missing weight fails at load
//! with its full name. The 1×1 convolutions are loaded as `(out, in, 1, 1)` and used as per-token
//! linears; the depthwise 3×3 runs channels-last through [`crate::ops`].

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};

use super::TransformerConfig;
use crate::ops::{depthwise_conv2d_nhwc, relu_linear_attention};

/// `Attention(eps=1e-5)` default, used by the `rms_norm_across_heads` q/k norms.
const QK_NORM_EPS: f32 = 1e-5;
/// Denominator guard of `SanaLinearAttnProcessor2_0`.
const LINEAR_ATTN_EPS: f64 = 1e-15;

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

/// `h * (1 + scale) + shift` with `scale`, `shift` of shape `(B, 1, D)`.
pub fn modulate(h: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// diffusers `RMSNorm(dim, eps, elementwise_affine=True)`: f32 statistics, weight applied in the model dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)
}

/// Loads a `(out, in, 1, 1)` convolution as a per-token linear (squeeze keeps the storage, no copy).
fn conv1x1_as_linear(vb: VarBuilder, c_in: usize, c_out: usize, bias: bool) -> Result<Linear> {
    let w = vb
        .get((c_out, c_in, 1, 1), "weight")?
        .squeeze(3)?
        .squeeze(2)?;
    let b = if bias {
        Some(vb.get(c_out, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// `(B, L, heads·d)` -> `(B, heads, L, d)` (a strided view).
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, dim) = x.dims3()?;
    x.reshape((b, l, heads, dim / heads))?.transpose(1, 2)
}

/// `(B, heads, L, d)` -> `(B, L, heads·d)`.
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, l, h * d))
}

/// Sprint's `norm_q` / `norm_k`: RMSNorm over all heads at once (`rms_norm_across_heads`).
#[derive(Debug, Clone)]
struct QkNorm {
    q: Tensor,
    k: Tensor,
}

impl QkNorm {
    fn load(
        vb: &VarBuilder,
        cfg: &TransformerConfig,
        q_dim: usize,
        k_dim: usize,
    ) -> Result<Option<Self>> {
        if !cfg.has_qk_norm()? {
            return Ok(None);
        }
        Ok(Some(Self {
            q: vb.pp("norm_q").get(q_dim, "weight")?,
            k: vb.pp("norm_k").get(k_dim, "weight")?,
        }))
    }
}

/// `attn1`: ReLU linear self-attention, evaluated in f32 whatever the weights' dtype.
#[derive(Debug, Clone)]
struct LinearSelfAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    qk_norm: Option<QkNorm>,
    heads: usize,
}

impl LinearSelfAttention {
    fn load(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let bias = cfg.attention_bias;
        Ok(Self {
            to_q: candle_nn::linear_b(dim, dim, bias, vb.pp("to_q"))?,
            to_k: candle_nn::linear_b(dim, dim, bias, vb.pp("to_k"))?,
            to_v: candle_nn::linear_b(dim, dim, bias, vb.pp("to_v"))?,
            to_out: candle_nn::linear(dim, dim, vb.pp("to_out").pp(0))?,
            qk_norm: QkNorm::load(&vb, cfg, dim, dim)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `(B, N, D)` -> `(B, N, D)`.
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let dtype = h.dtype();
        let mut q = self.to_q.forward(h)?;
        let mut k = self.to_k.forward(h)?;
        let v = self.to_v.forward(h)?;
        if let Some(n) = &self.qk_norm {
            q = rms_norm(&q, &n.q, QK_NORM_EPS)?;
            k = rms_norm(&k, &n.k, QK_NORM_EPS)?;
        }
        // (B, N, D) -> (B, heads, N, d); the op applies ReLU and works in f32.
        let (q, k, v) = (
            split_heads(&q, self.heads)?,
            split_heads(&k, self.heads)?,
            split_heads(&v, self.heads)?,
        );
        let o = relu_linear_attention(&q, &k, &v, LINEAR_ATTN_EPS)?; // (B, heads, N, d) f32
        self.to_out.forward(&merge_heads(&o)?.to_dtype(dtype)?)
    }
}

/// Text keys/values of one block's cross-attention; constant over all denoising steps.
#[derive(Debug, Clone)]
pub struct CrossKv {
    /// `(B, heads, d, T)` f32, pre-transposed so scores are one matmul; f32 keeps the logits unrounded
    /// like the fused SDPA kernels do.
    k_t: Tensor,
    /// `(B, heads, T, d)` in the model dtype.
    v: Tensor,
}

/// `attn2`: softmax cross-attention to the projected caption, additive mask bias, scale `1/√d`.
#[derive(Debug, Clone)]
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    qk_norm: Option<QkNorm>,
    heads: usize,
    head_dim: usize,
}

impl CrossAttention {
    fn load(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let (heads, head_dim, cross_dim) = cfg.cross_attention()?;
        let inner = heads * head_dim;
        Ok(Self {
            to_q: candle_nn::linear(dim, inner, vb.pp("to_q"))?,
            to_k: candle_nn::linear(cross_dim, inner, vb.pp("to_k"))?,
            to_v: candle_nn::linear(cross_dim, inner, vb.pp("to_v"))?,
            to_out: candle_nn::linear(inner, dim, vb.pp("to_out").pp(0))?,
            qk_norm: QkNorm::load(&vb, cfg, inner, inner)?,
            heads,
            head_dim,
        })
    }

    /// `text`: `(B, T, cross_attention_dim)` (after caption projection + norm).
    fn text_kv(&self, text: &Tensor) -> Result<CrossKv> {
        let mut k = self.to_k.forward(text)?;
        let v = self.to_v.forward(text)?;
        if let Some(n) = &self.qk_norm {
            k = rms_norm(&k, &n.k, QK_NORM_EPS)?;
        }
        // (B, T, inner) -> (B, heads, d, T)
        let k_t = split_heads(&k, self.heads)?
            .to_dtype(DType::F32)?
            .transpose(2, 3)?
            .contiguous()?;
        let v = split_heads(&v, self.heads)?.contiguous()?;
        Ok(CrossKv { k_t, v })
    }

    /// `x`: `(B, N, D)`; `mask_bias`: `(B, 1, 1, T)` f32. Returns `(B, N, D)`.
    fn forward(&self, x: &Tensor, kv: &CrossKv, mask_bias: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let mut q = self.to_q.forward(x)?;
        if let Some(n) = &self.qk_norm {
            q = rms_norm(&q, &n.q, QK_NORM_EPS)?;
        }
        let q = split_heads(&q, self.heads)?
            .to_dtype(DType::F32)?
            .contiguous()?; // (B, heads, N, d)
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&kv.k_t)? * scale)?.broadcast_add(mask_bias)?; // (B, heads, N, T)
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let o = probs.matmul(&kv.v)?; // (B, heads, N, d)
        self.to_out.forward(&merge_heads(&o)?)
    }
}

/// `ff`: GLUMBConv(D, D, mlp_ratio, norm_type=None, residual_connection=False), channels-last.
#[derive(Debug, Clone)]
struct GluMbConv {
    conv_inverted: Linear,
    depth_weight: Tensor,
    depth_bias: Tensor,
    conv_point: Linear,
    hidden: usize,
}

impl GluMbConv {
    fn load(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let hidden = cfg.ff_hidden();
        let depth = vb.pp("conv_depth");
        Ok(Self {
            conv_inverted: conv1x1_as_linear(vb.pp("conv_inverted"), dim, 2 * hidden, true)?,
            depth_weight: depth.get((2 * hidden, 1, 3, 3), "weight")?,
            depth_bias: depth.get(2 * hidden, "bias")?,
            conv_point: conv1x1_as_linear(vb.pp("conv_point"), hidden, dim, false)?,
            hidden,
        })
    }

    /// `h`: `(B, N, D)` with `N = height·width` (row-major tokens). Returns `(B, N, D)`.
    fn forward(&self, h: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let (b, n, _) = h.dims3()?;
        let y = self.conv_inverted.forward(h)?.silu()?; // (B, N, 2·hidden)
        let y = y.reshape((b, height, width, 2 * self.hidden))?;
        let y = depthwise_conv2d_nhwc(&y, &self.depth_weight, Some(&self.depth_bias))?;
        // torch.chunk(2, dim=channels): first half is the value, second half the gate.
        let value = y.narrow(3, 0, self.hidden)?;
        let gate = y.narrow(3, self.hidden, self.hidden)?;
        let glu = (value * gate.silu()?)?.reshape((b, n, self.hidden))?;
        self.conv_point.forward(&glu)
    }
}

/// `transformer_blocks.N`.
#[derive(Debug, Clone)]
pub struct SanaTransformerBlock {
    /// `(6, D)`: shift/scale/gate for attention then for the feed-forward.
    scale_shift_table: Tensor,
    attn1: LinearSelfAttention,
    attn2: CrossAttention,
    /// `norm2` weight/bias when `norm_elementwise_affine` (false for both released checkpoints).
    norm2_affine: Option<(Tensor, Tensor)>,
    ff: GluMbConv,
    norm_eps: f64,
}

impl SanaTransformerBlock {
    pub fn load(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let norm2_affine = if cfg.norm_elementwise_affine {
            let n = vb.pp("norm2");
            Some((n.get(dim, "weight")?, n.get(dim, "bias")?))
        } else {
            None
        };
        Ok(Self {
            scale_shift_table: vb.get((6, dim), "scale_shift_table")?,
            attn1: LinearSelfAttention::load(vb.pp("attn1"), cfg)?,
            attn2: CrossAttention::load(vb.pp("attn2"), cfg)?,
            norm2_affine,
            ff: GluMbConv::load(vb.pp("ff"), cfg)?,
            norm_eps: cfg.norm_eps,
        })
    }

    /// Cross-attention K/V for `text` `(B, T, D)` (projected, normalised caption).
    pub fn text_kv(&self, text: &Tensor) -> Result<CrossKv> {
        self.attn2.text_kv(text)
    }

    /// `x`: `(B, N, D)`; `temb6`: `(B, 6D)`; `mask_bias`: `(B, 1, 1, T)` f32. Returns `(B, N, D)`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb6: &Tensor,
        kv: &CrossKv,
        mask_bias: &Tensor,
        height: usize,
        width: usize,
    ) -> Result<Tensor> {
        let (b, _, dim) = x.dims3()?;
        // (1, 6, D) + (B, 6, D) -> six (B, 1, D) slices.
        let mods = self
            .scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&temb6.reshape((b, 6, dim))?)?;
        let m = |i: usize| mods.narrow(1, i, 1);
        let (shift_msa, scale_msa, gate_msa) = (m(0)?, m(1)?, m(2)?);
        let (shift_mlp, scale_mlp, gate_mlp) = (m(3)?, m(4)?, m(5)?);

        let h = modulate(
            &layer_norm_no_affine(x, self.norm_eps)?,
            &shift_msa,
            &scale_msa,
        )?;
        let x = (x + self.attn1.forward(&h)?.broadcast_mul(&gate_msa)?)?;

        // Cross-attention reads the un-normalised stream and has no gate.
        let x = (&x + self.attn2.forward(&x, kv, mask_bias)?)?;

        let mut h = layer_norm_no_affine(&x, self.norm_eps)?;
        if let Some((w, bias)) = &self.norm2_affine {
            h = h.broadcast_mul(w)?.broadcast_add(bias)?;
        }
        let h = modulate(&h, &shift_mlp, &scale_mlp)?;
        let ff = self.ff.forward(&h, height, width)?;
        x + ff.broadcast_mul(&gate_mlp)?
    }
}
