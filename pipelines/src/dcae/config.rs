//! `DcAeConfig`: serde mirror of diffusers' `AutoencoderDC` `vae/config.json`.
//!
//! Field names and defaults are those of `AutoencoderDC.__init__` in diffusers 0.42.1
//! (`src/diffusers/models/autoencoders/autoencoder_dc.py`); fields the checkpoint omits take these
//! defaults (notably `decoder_in_shortcut = true`, `decoder_conv_act_fn = "relu"`,
//! `upsample_block_type = "pixel_shuffle"`). Unknown keys (`_class_name`, `_diffusers_version`, …) are
//! ignored. Only the decoder fields are used by this crate; the encoder fields are kept because
//! diffusers derives the spatial compression ratio from `encoder_block_out_channels`.

use std::path::Path;

use serde::Deserialize;

use crate::PipelineError;

/// A config value diffusers accepts either as one string (applied to every stage) or as one per stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerStage {
    All(String),
    Each(Vec<String>),
}

impl PerStage {
    fn all(s: &str) -> Self {
        Self::All(s.to_string())
    }

    /// The value for stage `i` of `n`; errors if a per-stage list has the wrong length.
    pub fn stage(&self, i: usize, n: usize) -> Result<&str, String> {
        match self {
            Self::All(s) => Ok(s),
            Self::Each(v) if v.len() == n => Ok(&v[i]),
            Self::Each(v) => Err(format!(
                "per-stage list has {} entries, expected {n}",
                v.len()
            )),
        }
    }
}

/// Mirror of diffusers `AutoencoderDC` config (see module docs for the upstream file).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DcAeConfig {
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "d_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_block_types")]
    pub encoder_block_types: PerStage,
    #[serde(default = "d_block_types")]
    pub decoder_block_types: PerStage,
    #[serde(default = "d_block_out_channels")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "d_block_out_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "d_encoder_layers_per_block")]
    pub encoder_layers_per_block: Vec<usize>,
    #[serde(default = "d_decoder_layers_per_block")]
    pub decoder_layers_per_block: Vec<usize>,
    #[serde(default = "d_qkv_multiscales")]
    pub encoder_qkv_multiscales: Vec<Vec<usize>>,
    #[serde(default = "d_qkv_multiscales")]
    pub decoder_qkv_multiscales: Vec<Vec<usize>>,
    #[serde(default = "d_upsample_block_type")]
    pub upsample_block_type: String,
    #[serde(default = "d_downsample_block_type")]
    pub downsample_block_type: String,
    #[serde(default = "d_norm_types")]
    pub decoder_norm_types: PerStage,
    #[serde(default = "d_act_fns")]
    pub decoder_act_fns: PerStage,
    #[serde(default = "d_true")]
    pub encoder_out_shortcut: bool,
    #[serde(default = "d_true")]
    pub decoder_in_shortcut: bool,
    #[serde(default = "d_conv_act_fn")]
    pub decoder_conv_act_fn: String,
    #[serde(default = "d_scaling_factor")]
    pub scaling_factor: f64,
}

fn d_in_channels() -> usize {
    3
}
fn d_latent_channels() -> usize {
    32
}
fn d_attention_head_dim() -> usize {
    32
}
fn d_block_types() -> PerStage {
    PerStage::all("ResBlock")
}
fn d_block_out_channels() -> Vec<usize> {
    vec![128, 256, 512, 512, 1024, 1024]
}
fn d_encoder_layers_per_block() -> Vec<usize> {
    vec![2, 2, 2, 3, 3, 3]
}
fn d_decoder_layers_per_block() -> Vec<usize> {
    vec![3, 3, 3, 3, 3, 3]
}
fn d_qkv_multiscales() -> Vec<Vec<usize>> {
    vec![vec![], vec![], vec![], vec![5], vec![5], vec![5]]
}
fn d_upsample_block_type() -> String {
    "pixel_shuffle".to_string()
}
fn d_downsample_block_type() -> String {
    "pixel_unshuffle".to_string()
}
fn d_norm_types() -> PerStage {
    PerStage::all("rms_norm")
}
fn d_act_fns() -> PerStage {
    PerStage::all("silu")
}
fn d_true() -> bool {
    true
}
fn d_conv_act_fn() -> String {
    "relu".to_string()
}
fn d_scaling_factor() -> f64 {
    1.0
}

impl Default for DcAeConfig {
    /// `AutoencoderDC()` with no arguments.
    fn default() -> Self {
        serde_json::from_str("{}").expect("every DcAeConfig field has a serde default")
    }
}

impl DcAeConfig {
    /// Reads `vae/config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self, PipelineError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PipelineError::Load(format!("reading {}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| PipelineError::Load(format!("parsing {}: {e}", path.display())))
    }

    /// `AutoencoderDC.spatial_compression_ratio`: `2 ** (len(encoder_block_out_channels) - 1)`
    /// (32 for the Sana f32c32 VAE). diffusers derives it from the encoder; tiling uses it.
    pub fn spatial_compression_ratio(&self) -> usize {
        1usize << self.encoder_block_out_channels.len().saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_diffusers_init() {
        let c = DcAeConfig::default();
        assert_eq!(c.latent_channels, 32);
        assert_eq!(c.decoder_layers_per_block, vec![3; 6]);
        assert_eq!(c.upsample_block_type, "pixel_shuffle");
        assert!(c.decoder_in_shortcut);
        assert_eq!(c.decoder_conv_act_fn, "relu");
        assert_eq!(c.scaling_factor, 1.0);
        assert_eq!(c.spatial_compression_ratio(), 32);
    }

    #[test]
    fn per_stage_accepts_string_or_list() {
        let c: DcAeConfig = serde_json::from_str(
            r#"{"decoder_block_types": ["ResBlock", "EfficientViTBlock"],
                "decoder_act_fns": "relu", "encoder_block_out_channels": [8, 8, 8],
                "_class_name": "AutoencoderDC"}"#,
        )
        .expect("valid config");
        assert_eq!(c.decoder_block_types.stage(1, 2), Ok("EfficientViTBlock"));
        assert!(c.decoder_block_types.stage(0, 6).is_err());
        assert_eq!(c.decoder_act_fns.stage(5, 6), Ok("relu"));
        assert_eq!(c.spatial_compression_ratio(), 4);
    }
}
