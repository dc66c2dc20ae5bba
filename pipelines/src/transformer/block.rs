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

use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::TransformerConfig;
pub use crate::ops::layer_norm_no_affine;
use crate::ops::{
    cross_attention, gated_residual, glu_depthwise, layer_norm_modulate, linear, modulation_row,
    relu_linear_attention_tokens, rms_norm_segments, split_heads_as, DepthwiseWeight,
};

/// `Attention(eps=1e-5)` default, used by the `rms_norm_across_heads` q/k norms.
const QK_NORM_EPS: f32 = 1e-5;
/// Denominator guard of `SanaLinearAttnProcessor2_0`.
const LINEAR_ATTN_EPS: f64 = 1e-15;

/// `h * (1 + scale) + shift` with `scale`, `shift` of shape `(B, 1, D)`.
pub fn modulate(h: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// diffusers `RMSNorm(dim, eps, elementwise_affine=True)`: f32 statistics, weight applied in the model dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    rms_norm_segments(x, &[Some(weight)], eps)
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

/// `(B, L, heads·d)` -> `(B, L, heads, d)` (a view).
fn token_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, dim) = x.dims3()?;
    x.reshape((b, l, heads, dim / heads))
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

/// `attn1`'s q, k, v projections: three linears, or on CUDA one linear over the concatenated weights
/// (`(3·D, D)`, made at load; the three are dropped), whose `(B, N, 3·D)` output the attention reads as
/// strided q | k | v views. One GEMM of 3·D columns instead of three of D (fewer launches, better tiles).
/// CPU keeps the three: the shape-only parameter-count loads must not allocate a copy.
#[derive(Debug, Clone)]
enum QkvProjection {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// `attn1`: ReLU linear self-attention, evaluated in f32 whatever the weights' dtype.
#[derive(Debug, Clone)]
struct LinearSelfAttention {
    qkv: QkvProjection,
    to_out: Linear,
    qk_norm: Option<QkNorm>,
    heads: usize,
}

impl LinearSelfAttention {
    fn load(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let bias = cfg.attention_bias;
        let (q, k, v) = (
            candle_nn::linear_b(dim, dim, bias, vb.pp("to_q"))?,
            candle_nn::linear_b(dim, dim, bias, vb.pp("to_k"))?,
            candle_nn::linear_b(dim, dim, bias, vb.pp("to_v"))?,
        );
        let qkv = if vb.device().is_cuda() {
            let w = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
            let b = match (q.bias(), k.bias(), v.bias()) {
                (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?),
                _ => None,
            };
            QkvProjection::Fused(Linear::new(w, b))
        } else {
            QkvProjection::Split { q, k, v }
        };
        Ok(Self {
            qkv,
            to_out: candle_nn::linear(dim, dim, vb.pp("to_out").pp(0))?,
            qk_norm: QkNorm::load(&vb, cfg, dim, dim)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `(B, N, D)` -> `(B, N, D)`.
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let dtype = h.dtype();
        let (b, n, dim) = h.dims3()?;
        let (heads, d) = (self.heads, dim / self.heads);
        // (B, N, heads, d) views of q, k, v with one layout; the op applies ReLU, works in f32 and
        // returns (B, N, D). Sprint normalises q and k first (`rms_norm_across_heads`).
        let (q, k, v) = match &self.qkv {
            QkvProjection::Split { q, k, v } => {
                let (mut q, mut k) = (linear(q, h, None)?, linear(k, h, None)?);
                if let Some(nrm) = &self.qk_norm {
                    q = rms_norm(&q, &nrm.q, QK_NORM_EPS)?;
                    k = rms_norm(&k, &nrm.k, QK_NORM_EPS)?;
                }
                (
                    token_heads(&q, heads)?,
                    token_heads(&k, heads)?,
                    token_heads(&linear(v, h, None)?, heads)?,
                )
            }
            QkvProjection::Fused(qkv) => {
                let mut y = linear(qkv, h, None)?;
                if let Some(nrm) = &self.qk_norm {
                    // Both norms in one pass over the projection, v copied alongside: q, k and v stay
                    // strided views of one tensor (no copy out of the q|k|v rows).
                    let w = [Some(&nrm.q), Some(&nrm.k), None];
                    y = rms_norm_segments(&y, &w, QK_NORM_EPS)?;
                }
                let y = y.reshape((b, n, 3, heads, d))?;
                let part = |i: usize| y.narrow(2, i, 1)?.squeeze(2);
                (part(0)?, part(1)?, part(2)?)
            }
        };
        let o = relu_linear_attention_tokens(&q, &k, &v, LINEAR_ATTN_EPS)?;
        linear(&self.to_out, &o.to_dtype(dtype)?, None)
    }
}

/// Text keys/values of one block's cross-attention; constant over all denoising steps.
#[derive(Debug, Clone)]
pub struct CrossKv {
    /// `(B, heads, T, d)` in the model dtype.
    k: Tensor,
    /// `(B, heads, T, d)` in the model dtype.
    v: Tensor,
}

impl CrossKv {
    /// The rows `idx` (a `(k)` u32 tensor) of the batch, copied unchanged.
    pub fn index_rows(&self, idx: &Tensor) -> Result<CrossKv> {
        Ok(CrossKv {
            k: self.k.index_select(idx, 0)?,
            v: self.v.index_select(idx, 0)?,
        })
    }
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
        let mut k = linear(&self.to_k, text, None)?;
        let v = linear(&self.to_v, text, None)?;
        if let Some(n) = &self.qk_norm {
            k = rms_norm(&k, &n.k, QK_NORM_EPS)?;
        }
        // (B, T, inner) -> (B, heads, T, d)
        let k = split_heads_as(&k, self.heads, k.dtype())?;
        let v = split_heads_as(&v, self.heads, v.dtype())?;
        Ok(CrossKv { k, v })
    }

    /// `x`: `(B, N, D)`; `mask_bias`: `(B, 1, 1, T)` f32. Returns `x + attn(x)` `(B, N, D)` (the
    /// block's ungated residual, fused into the output projection).
    fn forward_residual(&self, x: &Tensor, kv: &CrossKv, mask_bias: &Tensor) -> Result<Tensor> {
        let mut q = linear(&self.to_q, x, None)?;
        if let Some(n) = &self.qk_norm {
            q = rms_norm(&q, &n.q, QK_NORM_EPS)?;
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let o = cross_attention(&q, &kv.k, &kv.v, mask_bias, scale)?; // (B, N, heads·d)
        linear(&self.to_out, &o, Some(x))
    }
}

/// `ff`: GLUMBConv(D, D, mlp_ratio, norm_type=None, residual_connection=False), channels-last.
#[derive(Debug, Clone)]
struct GluMbConv {
    /// The 1×1 expansion without its bias; the bias goes into the fused depthwise op.
    conv_inverted: Linear,
    conv_inverted_bias: Tensor,
    depth_weight: DepthwiseWeight,
    depth_bias: Tensor,
    conv_point: Linear,
    hidden: usize,
}

impl GluMbConv {
    fn load(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let hidden = cfg.ff_hidden();
        let depth = vb.pp("conv_depth");
        let inverted = conv1x1_as_linear(vb.pp("conv_inverted"), dim, 2 * hidden, true)?;
        let conv_inverted_bias = inverted
            .bias()
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("conv_inverted has no bias".into()))?;
        Ok(Self {
            conv_inverted: Linear::new(inverted.weight().clone(), None),
            conv_inverted_bias,
            depth_weight: DepthwiseWeight::new(depth.get((2 * hidden, 1, 3, 3), "weight")?),
            depth_bias: depth.get(2 * hidden, "bias")?,
            conv_point: conv1x1_as_linear(vb.pp("conv_point"), hidden, dim, false)?,
            hidden,
        })
    }

    /// `h`: `(B, N, D)` with `N = height·width` (row-major tokens). Returns `(B, N, D)`.
    fn forward(&self, h: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let (b, n, _) = h.dims3()?;
        let y = linear(&self.conv_inverted, h, None)?; // (B, N, 2·hidden), bias not yet added
        let y = y.reshape((b, height, width, 2 * self.hidden))?;
        // silu(y + bias) -> depthwise 3×3 + bias -> value · silu(gate) (torch.chunk: value first).
        let glu = glu_depthwise(
            &y,
            &self.conv_inverted_bias,
            &self.depth_weight,
            &self.depth_bias,
        )?
        .reshape((b, n, self.hidden))?;
        linear(&self.conv_point, &glu, None)
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
        // Rows of the AdaLN modulation `scale_shift_table + temb6`: shift/scale/gate for attention
        // (0, 1, 2) then for the feed-forward (3, 4, 5); the fused ops read them in place.
        let table = &self.scale_shift_table;
        let h = layer_norm_modulate(x, table, temb6, 0, 1, self.norm_eps)?;
        let x = gated_residual(x, &self.attn1.forward(&h)?, table, temb6, 2)?;

        // Cross-attention reads the un-normalised stream and has no gate.
        let x = self.attn2.forward_residual(&x, kv, mask_bias)?;

        let h = match &self.norm2_affine {
            None => layer_norm_modulate(&x, table, temb6, 3, 4, self.norm_eps)?,
            Some((w, bias)) => {
                let h = layer_norm_no_affine(&x, self.norm_eps)?
                    .broadcast_mul(w)?
                    .broadcast_add(bias)?;
                let shift = modulation_row(table, temb6, 3)?;
                let scale = modulation_row(table, temb6, 4)?;
                modulate(&h, &shift, &scale)?
            }
        };
        let ff = self.ff.forward(&h, height, width)?;
        gated_residual(&x, &ff, table, temb6, 5)
    }
}
