//! Conditioning embeddings of the Sana transformer: timestep (and Sprint's guidance) AdaLN-single
//! embedding and the caption projection.
//!
//! Mirrors diffusers 0.42.1 `models/embeddings.py` (`get_timestep_embedding`, `Timesteps`,
//! `TimestepEmbedding`, `PixArtAlphaCombinedTimestepSizeEmbeddings`, `PixArtAlphaTextProjection`),
//! `models/normalization.py::AdaLayerNormSingle` and
//! `models/transformers/sana_transformer.py::SanaCombinedTimestepGuidanceEmbeddings`
//! (docs/sana-port-spec.md §2.1). Sinusoids are always computed in f32 and then cast to the weights'
//! dtype, as diffusers does with `hidden_dtype`.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::ops::linear;

/// Width of the sinusoidal timestep features (`Timesteps(num_channels=256)` upstream).
pub const TIMESTEP_CHANNELS: usize = 256;

/// `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1, max_period=10000)`.
///
/// `t`: `(B)` (any float dtype; promoted to f32). Returns `(B, dim)` f32 laid out `[cos, sin]`.
pub fn timestep_sinusoid(t: &Tensor, dim: usize) -> Result<Tensor> {
    if !dim.is_multiple_of(2) {
        candle_core::bail!("timestep_sinusoid: odd embedding width {dim} is not used by Sana");
    }
    let half = dim / 2;
    // Same f32 arithmetic as torch: exp(-ln(max_period) * k / (half - shift)), shift = 0.
    let log_max = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (log_max * k as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?; // (B, half)
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// `TimestepEmbedding(256, D)`: `linear_2(SiLU(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(TIMESTEP_CHANNELS, dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    /// `t`: `(B)` f32 -> `(B, D)` in `dtype`.
    fn embed(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let proj = timestep_sinusoid(t, TIMESTEP_CHANNELS)?.to_dtype(dtype)?;
        let h = linear(&self.linear_1, &proj, None)?.silu()?;
        linear(&self.linear_2, &h, None)
    }
}

/// Which timestep embedder the checkpoint has (chosen by `guidance_embeds`).
#[derive(Debug, Clone)]
enum Conditioning {
    /// Base: `AdaLayerNormSingle` → weights under `time_embed.emb.timestep_embedder`.
    Timestep(TimestepEmbedding),
    /// Sprint: `SanaCombinedTimestepGuidanceEmbeddings` → `time_embed.{timestep,guidance}_embedder`.
    TimestepGuidance {
        timestep: TimestepEmbedding,
        guidance: TimestepEmbedding,
    },
}

/// `time_embed`: produces `(temb6 (B, 6D), embedded_timestep (B, D))` like upstream's `(timestep, embedded_timestep)`.
#[derive(Debug, Clone)]
pub struct TimeEmbed {
    cond: Conditioning,
    linear: Linear,
}

impl TimeEmbed {
    /// `vb` is the `time_embed` prefix.
    pub fn load(vb: VarBuilder, dim: usize, guidance_embeds: bool) -> Result<Self> {
        let cond = if guidance_embeds {
            Conditioning::TimestepGuidance {
                timestep: TimestepEmbedding::load(vb.pp("timestep_embedder"), dim)?,
                guidance: TimestepEmbedding::load(vb.pp("guidance_embedder"), dim)?,
            }
        } else {
            Conditioning::Timestep(TimestepEmbedding::load(
                vb.pp("emb").pp("timestep_embedder"),
                dim,
            )?)
        };
        let linear = candle_nn::linear(dim, 6 * dim, vb.pp("linear"))?;
        Ok(Self { cond, linear })
    }

    pub fn uses_guidance(&self) -> bool {
        matches!(self.cond, Conditioning::TimestepGuidance { .. })
    }

    /// `timestep`, `guidance`: `(B)` f32. Returns `(temb6 (B, 6D), embedded_timestep (B, D))` in `dtype`.
    ///
    /// One row (`B = 1`) is computed as two identical rows, row 0 kept: a one-row product takes the
    /// matrix-vector path of the CPU GEMM, which sums in another order than the matrix path every larger
    /// batch takes, so a request alone would not compute what it computes inside a batch (issue 14:
    /// batched results equal solo ones bit for bit). The cost is one more row of three small products.
    pub fn forward(
        &self,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        if timestep.dim(0)? == 1 {
            let guidance = guidance.map(|g| g.repeat(2)).transpose()?;
            let (temb6, embedded) =
                self.forward_rows(&timestep.repeat(2)?, guidance.as_ref(), dtype)?;
            return Ok((temb6.narrow(0, 0, 1)?, embedded.narrow(0, 0, 1)?));
        }
        self.forward_rows(timestep, guidance, dtype)
    }

    fn forward_rows(
        &self,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let embedded = match (&self.cond, guidance) {
            (Conditioning::Timestep(t), None) => t.embed(timestep, dtype)?,
            (Conditioning::TimestepGuidance { timestep: t, guidance: g }, Some(gv)) => {
                (t.embed(timestep, dtype)? + g.embed(gv, dtype)?)?
            }
            (Conditioning::Timestep(_), Some(_)) => candle_core::bail!(
                "this transformer has no guidance embedder (guidance_embeds=false) but guidance was given"
            ),
            (Conditioning::TimestepGuidance { .. }, None) => candle_core::bail!(
                "this transformer embeds guidance (guidance_embeds=true); a guidance tensor is required"
            ),
        };
        let temb6 = linear(&self.linear, &embedded.silu()?, None)?;
        Ok((temb6, embedded))
    }
}

/// `PixArtAlphaTextProjection(caption_channels, D, act_fn="gelu_tanh")`.
#[derive(Debug, Clone)]
pub struct CaptionProjection {
    linear_1: Linear,
    linear_2: Linear,
}

impl CaptionProjection {
    pub fn load(vb: VarBuilder, in_features: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_features, hidden, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(hidden, hidden, vb.pp("linear_2"))?,
        })
    }

    /// `(B, T, caption_channels)` -> `(B, T, D)`; candle's `gelu` is the tanh approximation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(
            &self.linear_2,
            &linear(&self.linear_1, x, None)?.gelu()?,
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sinusoid_matches_closed_form() -> Result<()> {
        let t = Tensor::new(&[0f32, 1.0, 999.0], &Device::Cpu)?;
        let e = timestep_sinusoid(&t, 8)?.to_vec2::<f32>()?;
        for (row, tv) in e.iter().zip([0f64, 1.0, 999.0]) {
            for k in 0..4 {
                let f = (-(10000f64.ln()) * k as f64 / 4.0).exp();
                // f32 arguments up to 999 rad: tolerance 1e-3 absolute covers the f32 rounding of t·f.
                assert!(
                    (row[k] as f64 - (tv * f).cos()).abs() < 1e-3,
                    "cos k={k} t={tv}"
                );
                assert!(
                    (row[4 + k] as f64 - (tv * f).sin()).abs() < 1e-3,
                    "sin k={k} t={tv}"
                );
            }
        }
        // t = 0 gives exactly [1, ..., 1, 0, ..., 0].
        assert_eq!(e[0], vec![1., 1., 1., 1., 0., 0., 0., 0.]);
        Ok(())
    }
}
