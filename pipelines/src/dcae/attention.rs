//! `EfficientViTBlock` of the DC-AE decoder: `SanaMultiscaleLinearAttention` then `GLUMBConv`.
//!
//! Mirrors diffusers 0.42.1 `models/attention_processor.py` (`SanaMultiscaleLinearAttention`,
//! `SanaMultiscaleAttentionProjection`, `SanaMultiscaleAttnProcessor2_0`) and
//! `models/autoencoders/autoencoder_dc.py::EfficientViTBlock`. Everything runs channels-last.
//!
//! Reproduced literally from upstream:
//! * the "heads" of the attention are consecutive `3·head_dim`-channel slices of the concatenated
//!   `[q | k | v | multiscale(q | k | v)]` tensor, each chunked into its own q, k, v — not q-head i
//!   paired with k-head i;
//! * ReLU linear attention in f32 when `H·W > attention_head_dim`, otherwise the "quadratic" form
//!   `(relu(q)·relu(k)ᵀ) / Σ_keys` (same maths, no softmax) in the input dtype with f32 normalisation.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::blocks::{check_norm_type, ChannelRmsNorm, GluMbConv};
#[cfg(test)]
use crate::ops::relu_linear_attention;
use crate::ops::{depthwise_conv, relu_linear_attention_scales, DepthwiseWeight, RowAct};

/// `SanaMultiscaleLinearAttention.eps` (default 1e-15, also used by the quadratic branch).
const ATTN_EPS: f64 = 1e-15;

/// `SanaMultiscaleAttentionProjection`: depthwise k×k (no bias) then a grouped 1×1 conv with
/// `3·heads` groups of `head_dim` channels (no bias), on `(B, H, W, 3·inner)`.
#[derive(Debug, Clone)]
struct MultiscaleProjection {
    proj_in: DepthwiseWeight, // (3·inner, 1, k, k)
    proj_out: Tensor,         // (3·inner, head_dim, 1, 1)
    head_dim: usize,
}

impl MultiscaleProjection {
    fn load(vb: VarBuilder, inner: usize, head_dim: usize, kernel: usize) -> Result<Self> {
        if kernel.is_multiple_of(2) {
            candle_core::bail!("multiscale kernel size {kernel} must be odd");
        }
        let ch = 3 * inner;
        Ok(Self {
            proj_in: DepthwiseWeight::new(vb.pp("proj_in").get((ch, 1, kernel, kernel), "weight")?),
            proj_out: vb.pp("proj_out").get((ch, head_dim, 1, 1), "weight")?,
            head_dim,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = depthwise_conv(x, &self.proj_in, None)?;
        let (b, h, w, ch) = y.dims4()?;
        let d = self.head_dim;
        let groups = ch / d;
        #[cfg(feature = "cuda")]
        if crate::ops::fused(&y) && y.dtype() == DType::BF16 && self.proj_out.dtype() == DType::BF16
        {
            // One cuBLAS call batched over the groups, on the token-major layout (no transposes).
            return crate::kernels::grouped_linear_bf16(
                &y.reshape((b * h * w, ch))?,
                &self.proj_out.reshape((groups, d, d))?,
            )?
            .reshape((b, h, w, ch));
        }
        // Grouped 1×1 conv as one batched GEMM: (G, BHW, d_in) @ (G, d_in, d_out).
        let y = y
            .reshape((b * h * w, groups, d))?
            .transpose(0, 1)?
            .contiguous()?;
        let wt = self
            .proj_out
            .reshape((groups, d, d))? // (G, d_out, d_in)
            .transpose(1, 2)?
            .contiguous()?;
        y.matmul(&wt)?.transpose(0, 1)?.reshape((b, h, w, ch))
    }
}

/// The q, k, v projections `(inner, C)`: three weights, or on CUDA their concatenation `(3·inner, C)`
/// (made at load; one GEMM whose output is already the `[q | k | v]` concatenation). CPU keeps the three, so
/// the shape-only parameter-count loads allocate nothing.
#[derive(Debug, Clone)]
enum Qkv {
    Split(Tensor, Tensor, Tensor),
    Fused(Tensor),
}

/// diffusers `SanaMultiscaleLinearAttention(C, C, attention_head_dim, mult=1, norm_type,
/// kernel_sizes, residual_connection=True)`.
#[derive(Debug, Clone)]
pub struct MultiscaleLinearAttention {
    qkv: Qkv,
    multiscale: Vec<MultiscaleProjection>,
    to_out: Tensor, // (C, inner·(1 + scales))
    norm_out: ChannelRmsNorm,
    head_dim: usize,
}

impl MultiscaleLinearAttention {
    pub fn load(
        vb: VarBuilder,
        channels: usize,
        head_dim: usize,
        kernel_sizes: &[usize],
        norm_type: &str,
    ) -> Result<Self> {
        check_norm_type(norm_type)?;
        if head_dim == 0 || channels < head_dim {
            candle_core::bail!("attention_head_dim {head_dim} does not fit {channels} channels");
        }
        // num_attention_heads = int(in_channels // attention_head_dim * mult), mult = 1.
        let inner = (channels / head_dim) * head_dim;
        let multiscale = kernel_sizes
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                MultiscaleProjection::load(vb.pp("to_qkv_multiscale").pp(i), inner, head_dim, k)
            })
            .collect::<Result<Vec<_>>>()?;
        let (q, k, v) = (
            vb.pp("to_q").get((inner, channels), "weight")?,
            vb.pp("to_k").get((inner, channels), "weight")?,
            vb.pp("to_v").get((inner, channels), "weight")?,
        );
        let qkv = if vb.device().is_cuda() {
            Qkv::Fused(Tensor::cat(&[&q, &k, &v], 0)?)
        } else {
            Qkv::Split(q, k, v)
        };
        Ok(Self {
            qkv,
            to_out: vb
                .pp("to_out")
                .get((channels, inner * (1 + kernel_sizes.len())), "weight")?,
            multiscale,
            norm_out: ChannelRmsNorm::load(vb.pp("norm_out"), channels)?,
            head_dim,
        })
    }

    /// `x`: `(B, H, W, C)` channels-last; returns the same shape (residual included).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let n = h * w;
        let d = self.head_dim;
        let dtype = x.dtype();
        let use_linear = n > d;

        let tokens = x.reshape((b * n, c))?;
        let qkv = match &self.qkv {
            Qkv::Fused(w) => tokens.matmul(&w.t()?)?,
            Qkv::Split(q, k, v) => Tensor::cat(
                &[
                    tokens.matmul(&q.t()?)?,
                    tokens.matmul(&k.t()?)?,
                    tokens.matmul(&v.t()?)?,
                ],
                1,
            )?,
        }; // (BN, 3·inner)
        let inner3 = qkv.dim(1)?;
        let qkv = qkv.reshape((b, h, w, inner3))?;
        let mut scales = Vec::with_capacity(1 + self.multiscale.len());
        scales.push(qkv.clone());
        for proj in &self.multiscale {
            scales.push(proj.forward(&qkv)?);
        }
        // torch: cat → (B, 6C, H, W).reshape(B, G, 3d, HW).chunk(3, dim=2): group g owns channels
        // [3d·g, 3d·(g+1)) of the concatenated scales.
        let groups = scales
            .iter()
            .map(|s| s.dim(D::Minus1))
            .sum::<Result<usize>>()?
            / (3 * d);
        let out = if use_linear {
            // f32 inside the op, (B, N, G·d) in the model dtype out: channel g·d + c, as torch's reshape
            // of (B, G, d, N) to (B, G·d, H, W). On CUDA the scales are not concatenated first.
            let tokens: Vec<Tensor> = scales
                .iter()
                .map(|s| s.reshape((b, n, s.dim(D::Minus1)?)))
                .collect::<Result<_>>()?;
            relu_linear_attention_scales(&tokens, d, ATTN_EPS)?
                .to_dtype(dtype)?
                .reshape((b * n, groups * d))?
        } else {
            let all = Tensor::cat(&scales, D::Minus1)?; // (B, H, W, 3·inner·(1+S))
            let all = all.reshape((b, n, groups, 3 * d))?;
            let part = |i: usize| -> Result<Tensor> { all.narrow(3, i * d, d)?.transpose(1, 2) }; // (B, G, N, d)
            let out = quadratic_attention(&part(0)?, &part(1)?, &part(2)?)?;
            out.transpose(1, 2)?.reshape((b * n, groups * d))?
        };
        let out = out.matmul(&self.to_out.t()?)?.reshape((b, h, w, c))?;
        self.norm_out.forward_fused(&out, Some(x), RowAct::Identity)
    }
}

/// `apply_quadratic_attention` after the ReLUs: scores in the input dtype, normalised over keys in f32.
/// `q`, `k`, `v`: `(B, G, N, d)`; returns `(B, G, N, d)` in the input dtype.
fn quadratic_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let dtype = q.dtype();
    let q = q.relu()?.contiguous()?;
    let k = k.relu()?.transpose(2, 3)?.contiguous()?;
    let scores = q.matmul(&k)?.to_dtype(DType::F32)?; // (B, G, Nq, Nk)
    let den = (scores.sum_keepdim(D::Minus1)? + ATTN_EPS)?;
    let scores = scores.broadcast_div(&den)?.to_dtype(dtype)?;
    scores.matmul(&v.contiguous()?)
}

/// diffusers `EfficientViTBlock`: attention (residual) then `GLUMBConv` (residual). Channels-last in and out.
#[derive(Debug, Clone)]
pub struct EfficientVitBlock {
    attn: MultiscaleLinearAttention,
    conv_out: GluMbConv,
}

impl EfficientVitBlock {
    pub fn load(
        vb: VarBuilder,
        channels: usize,
        head_dim: usize,
        kernel_sizes: &[usize],
        norm_type: &str,
    ) -> Result<Self> {
        Ok(Self {
            attn: MultiscaleLinearAttention::load(
                vb.pp("attn"),
                channels,
                head_dim,
                kernel_sizes,
                norm_type,
            )?,
            conv_out: GluMbConv::load(vb.pp("conv_out"), channels)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv_out.forward(&self.attn.forward(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quadratic_equals_linear_attention_in_f32() -> Result<()> {
        // Upstream switches forms at H·W = head_dim; both compute the same normalised ReLU attention.
        let shape = (2, 3, 5, 4);
        let q = crate::rng::test_randn("dcae/attention:241", 1.0, shape)?;
        let k = crate::rng::test_randn("dcae/attention:242", 1.0, shape)?;
        let v = crate::rng::test_randn("dcae/attention:243", 1.0, shape)?;
        let quad = quadratic_attention(&q, &k, &v)?;
        let lin = relu_linear_attention(&q, &k, &v, ATTN_EPS)?;
        let diff = (quad - lin)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            diff < 1e-4,
            "max abs diff {diff} (f32 summation order only)"
        );
        Ok(())
    }

    /// Literal re-implementation of the torch processor with per-element loops, on a 2×3 image.
    #[test]
    fn attention_matches_naive_channel_grouping() -> Result<()> {
        let dev = Device::Cpu;
        let (c, d, hh, ww) = (4usize, 2usize, 2usize, 3usize);
        let inner = c; // heads = 2
        let vars = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let attn = MultiscaleLinearAttention::load(vb, c, d, &[3], "rms_norm")?;
        // Random weights, unit norm, zero bias.
        for (name, var) in vars.data().lock().expect("varmap lock").iter() {
            let t = if name.ends_with("norm_out.weight") {
                Tensor::ones(var.dims(), DType::F32, &dev)?
            } else if name.ends_with("norm_out.bias") {
                Tensor::zeros(var.dims(), DType::F32, &dev)?
            } else {
                crate::rng::test_randn("dcae/attention:274", 0.5, var.dims())?
            };
            var.set(&t)?;
        }
        let x = crate::rng::test_randn("dcae/attention:278", 1.0, (1, hh, ww, c))?;
        let ours = attn.forward(&x)?; // N = 6 > d = 2: linear branch

        // Naive: build the (6·inner, N) channel-major tensor exactly like torch, then loop.
        let tok = x.reshape((hh * ww, c))?;
        let Qkv::Split(wq, wk, wv) = &attn.qkv else {
            panic!("CPU loads keep the three projections");
        };
        let qkv = Tensor::cat(
            &[
                tok.matmul(&wq.t()?)?,
                tok.matmul(&wk.t()?)?,
                tok.matmul(&wv.t()?)?,
            ],
            1,
        )?;
        let ms = attn.multiscale[0].forward(&qkv.reshape((1, hh, ww, 3 * inner))?)?;
        let all = Tensor::cat(&[qkv, ms.reshape((hh * ww, 3 * inner))?], 1)?
            .t()?
            .to_vec2::<f32>()?; // [channel][token]
        let n = hh * ww;
        let groups = 6 * inner / (3 * d);
        let mut out = vec![vec![0f32; groups * d]; n];
        for g in 0..groups {
            let ch = |part: usize, e: usize| 3 * d * g + part * d + e;
            for i in 0..n {
                let s: Vec<f32> = (0..n)
                    .map(|j| {
                        (0..d)
                            .map(|e| all[ch(0, e)][i].max(0.) * all[ch(1, e)][j].max(0.))
                            .sum()
                    })
                    .collect();
                let den: f32 = s.iter().sum::<f32>() + 1e-15;
                for e in 0..d {
                    let num: f32 = (0..n).map(|j| s[j] * all[ch(2, e)][j]).sum();
                    out[i][g * d + e] = num / den;
                }
            }
        }
        let out = Tensor::new(out, &dev)?.matmul(&attn.to_out.t()?)?;
        let reference =
            (candle_nn::ops::rms_norm(&out, &Tensor::ones(c, DType::F32, &dev)?, 1e-5)? + tok)?
                .reshape((1, hh, ww, c))?;
        let diff = (ours - reference)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            diff < 1e-4,
            "max abs diff {diff} (f32 summation order only)"
        );
        Ok(())
    }
}
