//! `SanaTransformer2DModel` (Sana 1600M base and Sana-Sprint 1.6B) on candle.
//!
//! Owns the linear-attention DiT: config, weight loading under the exact diffusers names, the text
//! cache, and the per-step forward. Contract:
//! * [`SanaTransformer2DModel::prepare_text`] runs the caption projection + RMSNorm and every block's
//!   cross-attention K/V once per prompt batch ([`TextContext`]); they depend only on the text, so the
//!   same context serves all denoising steps.
//! * [`SanaTransformer2DModel::forward`] maps latents `(B, C, H, W)`, timesteps `(B)` f32 and (Sprint)
//!   guidance `(B)` f32 to the prediction `(B, C_out, H, W)`.
//! * Tokens stay channels-last `(B, N, D)` between patch embedding and unpatchify. Compute runs in the
//!   dtype of the loaded weights (f32 for CPU tests, bf16 on the GPU) except the sinusoidal timestep
//!   features, LayerNorm statistics, the linear self-attention and the cross-attention logits (f32).
//!
//! Mirrors diffusers 0.42.1 `models/transformers/sana_transformer.py` (docs/sana-port-spec.md §1.1, §2).
//! Only `patch_size = 1` and no positional embedding (`interpolation_scale = None`) are implemented,
//! which is what both released checkpoints use; other configs fail at load with a clear message.

mod block;
mod embed;
#[cfg(test)]
mod tests;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

pub use block::{layer_norm_no_affine, modulate, rms_norm, CrossKv, SanaTransformerBlock};
pub use embed::{timestep_sinusoid, CaptionProjection, TimeEmbed, TimestepEmbedding};

use crate::loader::{self, ComponentFiles};
use crate::PipelineError;

/// `caption_norm = RMSNorm(inner_dim, eps=1e-5)` upstream (not a config field).
const CAPTION_NORM_EPS: f32 = 1e-5;
/// `norm_out = SanaModulatedNorm(inner_dim, eps=1e-6)` upstream (not a config field).
const NORM_OUT_EPS: f64 = 1e-6;
/// Additive bias for masked-out caption tokens: `(1 - mask) * -10000.0` upstream.
const MASK_BIAS: f64 = -10000.0;

/// Mirror of `transformer/config.json`; defaults are those of diffusers
/// `SanaTransformer2DModel.__init__` (`models/transformers/sana_transformer.py`). Unknown keys
/// (`_class_name`, `_diffusers_version`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TransformerConfig {
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    /// `null` means "same as `in_channels`".
    #[serde(default = "d_out_channels")]
    pub out_channels: Option<usize>,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_cross_heads")]
    pub num_cross_attention_heads: Option<usize>,
    #[serde(default = "d_cross_head_dim")]
    pub cross_attention_head_dim: Option<usize>,
    #[serde(default = "d_cross_dim")]
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "d_caption_channels")]
    pub caption_channels: usize,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Bias on `attn1.to_{q,k,v}` (attn2 always has one).
    #[serde(default)]
    pub attention_bias: bool,
    /// Picks the resolution-binning table in the pipeline; no effect on the forward.
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_patch_size")]
    pub patch_size: usize,
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    /// `Some` would enable a sincos positional embedding (not implemented; absent/null in both checkpoints).
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Applied to the guidance by the Sprint pipeline, not by the model.
    #[serde(default = "d_guidance_embeds_scale")]
    pub guidance_embeds_scale: f64,
    /// `None` or `"rms_norm_across_heads"` (Sprint).
    #[serde(default)]
    pub qk_norm: Option<String>,
    /// Config-only in diffusers 0.42.1 (the pipelines never apply it).
    #[serde(default = "d_timestep_scale")]
    pub timestep_scale: f64,
}

fn d_channels() -> usize {
    32
}
fn d_out_channels() -> Option<usize> {
    Some(32)
}
fn d_heads() -> usize {
    70
}
fn d_head_dim() -> usize {
    32
}
fn d_layers() -> usize {
    20
}
fn d_cross_heads() -> Option<usize> {
    Some(20)
}
fn d_cross_head_dim() -> Option<usize> {
    Some(112)
}
fn d_cross_dim() -> Option<usize> {
    Some(2240)
}
fn d_caption_channels() -> usize {
    2304
}
fn d_mlp_ratio() -> f64 {
    2.5
}
fn d_sample_size() -> usize {
    32
}
fn d_patch_size() -> usize {
    1
}
fn d_norm_eps() -> f64 {
    1e-6
}
fn d_guidance_embeds_scale() -> f64 {
    0.1
}
fn d_timestep_scale() -> f64 {
    1.0
}

impl TransformerConfig {
    /// `D = num_attention_heads · attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// GLUMBConv hidden width `int(mlp_ratio · D)` (the inverted conv has twice this many channels).
    pub fn ff_hidden(&self) -> usize {
        (self.mlp_ratio * self.inner_dim() as f64) as usize
    }

    /// Whether `attn1`/`attn2` carry `norm_q`/`norm_k`; errors on a norm type Sana does not use.
    pub fn has_qk_norm(&self) -> Result<bool> {
        match self.qk_norm.as_deref() {
            None => Ok(false),
            Some("rms_norm_across_heads") => Ok(true),
            Some(other) => candle_core::bail!(
                "transformer config: qk_norm {other:?} is not supported (only null or \"rms_norm_across_heads\")"
            ),
        }
    }

    /// `(heads, head_dim, cross_attention_dim)` of `attn2`.
    pub fn cross_attention(&self) -> Result<(usize, usize, usize)> {
        match (
            self.num_cross_attention_heads,
            self.cross_attention_head_dim,
            self.cross_attention_dim,
        ) {
            (Some(h), Some(d), Some(c)) => Ok((h, d, c)),
            _ => candle_core::bail!(
                "transformer config: num_cross_attention_heads, cross_attention_head_dim and \
                 cross_attention_dim must all be set (Sana blocks always cross-attend)"
            ),
        }
    }

    /// Rejects configs this port does not implement, before any weight is read.
    pub fn validate(&self) -> Result<()> {
        if self.patch_size != 1 {
            candle_core::bail!(
                "transformer config: patch_size {} is not supported (only 1, as in both Sana checkpoints)",
                self.patch_size
            );
        }
        if let Some(s) = self.interpolation_scale {
            candle_core::bail!(
                "transformer config: interpolation_scale {s} (sincos positional embedding) is not supported"
            );
        }
        self.has_qk_norm()?;
        let (_, _, cross_dim) = self.cross_attention()?;
        if cross_dim != self.inner_dim() {
            candle_core::bail!(
                "transformer config: cross_attention_dim {cross_dim} must equal the inner dim {} \
                 (the caption projection feeds attn2)",
                self.inner_dim()
            );
        }
        Ok(())
    }
}

/// Caption-dependent state shared by every denoising step: the mask bias and each block's K/V.
#[derive(Debug, Clone)]
pub struct TextContext {
    blocks: Vec<CrossKv>,
    /// `(B, 1, 1, T)` f32 additive bias.
    mask_bias: Tensor,
    batch: usize,
}

impl TextContext {
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// The context of the rows `rows` only (a batched run whose request left keeps the others' rows):
    /// the values are copied unchanged, so the remaining rows compute exactly as before.
    pub fn select_rows(&self, rows: &[usize]) -> Result<TextContext> {
        let dev = self.mask_bias.device();
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), dev)?;
        Ok(TextContext {
            blocks: self
                .blocks
                .iter()
                .map(|kv| kv.index_rows(&idx))
                .collect::<Result<Vec<_>>>()?,
            mask_bias: self.mask_bias.index_select(&idx, 0)?,
            batch: rows.len(),
        })
    }
}

/// Intermediates shown to [`SanaTransformer2DModel::forward_tapped`]'s taps (names follow the reference keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    /// `(B, N, D)` after `patch_embed`.
    PatchEmbed,
    /// `(B, 6D)` modulation from `time_embed`.
    TimeT6,
    /// `(B, D)` `embedded_timestep`.
    TimeEmb,
    /// `(B, T, D)` after `caption_projection` + `caption_norm`.
    Caption,
    /// `(B, N, D)` after block `i`.
    Block(usize),
    /// `(B, N, D)` after `norm_out`, before `proj_out`.
    NormOut,
}

/// The Sana linear DiT (`SanaTransformer2DModel`).
#[derive(Debug, Clone)]
pub struct SanaTransformer2DModel {
    cfg: TransformerConfig,
    /// `patch_embed.proj` 1×1 conv as a per-token linear `C_in -> D`.
    patch_embed: Linear,
    time_embed: TimeEmbed,
    caption_projection: CaptionProjection,
    caption_norm: Tensor,
    blocks: Vec<SanaTransformerBlock>,
    /// `(2, D)`: shift then scale of the output norm.
    scale_shift_table: Tensor,
    proj_out: Linear,
    dtype: DType,
}

impl SanaTransformer2DModel {
    /// Builds the model from `vb` (root of the diffusers state dict); tensors come in `vb.dtype()`.
    pub fn load(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let patch = vb.pp("patch_embed").pp("proj");
        let patch_w = patch
            .get((dim, cfg.in_channels, 1, 1), "weight")?
            .squeeze(3)?
            .squeeze(2)?;
        let patch_embed = Linear::new(patch_w, Some(patch.get(dim, "bias")?));
        let time_embed = TimeEmbed::load(vb.pp("time_embed"), dim, cfg.guidance_embeds)?;
        let caption_projection =
            CaptionProjection::load(vb.pp("caption_projection"), cfg.caption_channels, dim)?;
        let caption_norm = vb.pp("caption_norm").get(dim, "weight")?;
        let blocks_vb = vb.pp("transformer_blocks");
        let blocks = (0..cfg.num_layers)
            .map(|i| SanaTransformerBlock::load(blocks_vb.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let scale_shift_table = vb.get((2, dim), "scale_shift_table")?;
        let p = cfg.patch_size;
        let proj_out = candle_nn::linear(dim, p * p * cfg.out_channels(), vb.pp("proj_out"))?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed,
            time_embed,
            caption_projection,
            caption_norm,
            blocks,
            scale_shift_table,
            proj_out,
            dtype: vb.dtype(),
        })
    }

    /// Loads a resolved `transformer/` component ([`loader::ModelRepo::component`]): its
    /// `config.json` and memory-mapped safetensors, cast to `dtype`.
    pub fn load_component(
        files: &ComponentFiles,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, PipelineError> {
        let cfg: TransformerConfig = loader::read_json(&files.config)?;
        let vb = loader::var_builder(&files.weights, dtype, device)?;
        Self::load(vb, &cfg)
            .map_err(|e| PipelineError::Load(format!("transformer {}: {e}", files.dir.display())))
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Caption projection + `caption_norm` + every block's cross-attention K/V, once per prompt batch.
    ///
    /// `encoder_hidden_states`: `(B, T, caption_channels)` (any float dtype; cast to the model's);
    /// `mask`: `(B, T)` with 1 for tokens to attend to and 0 for padding (any dtype).
    pub fn prepare_text(
        &self,
        encoder_hidden_states: &Tensor,
        mask: &Tensor,
    ) -> Result<TextContext> {
        self.prepare_text_tapped(encoder_hidden_states, mask, &mut |_, _| {})
    }

    fn prepare_text_tapped(
        &self,
        encoder_hidden_states: &Tensor,
        mask: &Tensor,
        tap: &mut dyn FnMut(Tap, &Tensor),
    ) -> Result<TextContext> {
        let (b, t, c) = encoder_hidden_states.dims3()?;
        if c != self.cfg.caption_channels {
            candle_core::bail!(
                "prepare_text: caption width {c} != caption_channels {}",
                self.cfg.caption_channels
            );
        }
        if mask.dims() != [b, t] {
            candle_core::bail!(
                "prepare_text: mask {:?} does not match text ({b}, {t})",
                mask.dims()
            );
        }
        let text = self
            .caption_projection
            .forward(&encoder_hidden_states.to_dtype(self.dtype)?)?;
        let text = rms_norm(&text, &self.caption_norm, CAPTION_NORM_EPS)?; // (B, T, D)
        tap(Tap::Caption, &text);
        let blocks = self
            .blocks
            .iter()
            .map(|blk| blk.text_kv(&text))
            .collect::<Result<Vec<_>>>()?;
        // (1 - mask) * -10000, broadcast over heads and queries.
        let mask_bias =
            ((mask.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * MASK_BIAS)?).reshape((b, 1, 1, t))?;
        Ok(TextContext {
            blocks,
            mask_bias,
            batch: b,
        })
    }

    /// One denoiser evaluation.
    ///
    /// `x`: `(B, C_in, H, W)`; `timestep`: `(B)` (or one value for all rows) f32;
    /// `guidance`: `(B)` f32, required iff the config has `guidance_embeds`; `text` from
    /// [`Self::prepare_text`] with the same `B`. Returns `(B, C_out, H, W)` in the model dtype.
    pub fn forward(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        text: &TextContext,
    ) -> Result<Tensor> {
        self.forward_tapped(x, timestep, guidance, text, &mut |_, _| {})
    }

    /// [`Self::forward`], showing each intermediate to `tap` (parity tests compare them with diffusers';
    /// gpu-check compares a batch's rows with their solo runs).
    pub fn forward_tapped(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        text: &TextContext,
        tap: &mut dyn FnMut(Tap, &Tensor),
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "forward: {c} input channels, config has {}",
                self.cfg.in_channels
            );
        }
        if b != text.batch {
            candle_core::bail!("forward: latent batch {b} != text batch {}", text.batch);
        }
        let timestep = per_row(timestep, b, "timestep")?;
        let guidance = guidance.map(|g| per_row(g, b, "guidance")).transpose()?;

        // (B, C, H, W) -> (B, H·W, C) row-major tokens -> (B, N, D)
        let tokens = x
            .to_dtype(self.dtype)?
            .permute((0, 2, 3, 1))?
            .reshape((b, h * w, c))?;
        let mut x = crate::ops::linear(&self.patch_embed, &tokens, None)?;
        tap(Tap::PatchEmbed, &x);

        let (temb6, embedded) =
            self.time_embed
                .forward(&timestep, guidance.as_ref(), self.dtype)?;
        tap(Tap::TimeT6, &temb6);
        tap(Tap::TimeEmb, &embedded);
        for (i, (blk, kv)) in self.blocks.iter().zip(&text.blocks).enumerate() {
            x = blk.forward(&x, &temb6, kv, &text.mask_bias, h, w)?;
            tap(Tap::Block(i), &x);
        }

        // SanaModulatedNorm: (1, 2, D) + (B, 1, D); row 0 is the shift, row 1 the scale.
        let mods = self
            .scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&embedded.unsqueeze(1)?)?;
        let (shift, scale) = (mods.narrow(1, 0, 1)?, mods.narrow(1, 1, 1)?);
        let x = modulate(&layer_norm_no_affine(&x, NORM_OUT_EPS)?, &shift, &scale)?;
        tap(Tap::NormOut, &x);
        // (B, N, C_out); unpatchify for p = 1: (B, H, W, C) -> (B, C, H, W).
        let x = crate::ops::linear(&self.proj_out, &x, None)?;
        x.reshape((b, h, w, self.cfg.out_channels()))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

/// `(B)` f32 from a `(B)`, `(1)` or scalar tensor (a single value is used for every row).
fn per_row(t: &Tensor, b: usize, what: &str) -> Result<Tensor> {
    let t = t.flatten_all()?.to_dtype(DType::F32)?;
    match t.dim(0)? {
        n if n == b => Ok(t),
        1 => t.broadcast_as(b)?.contiguous(),
        n => candle_core::bail!("forward: {what} has {n} values for batch {b}"),
    }
}
