//! Safety checker v2 (fal's default): `Falconsai/nsfw_image_detection`, a transformers
//! `ViTForImageClassification` (ViT-B/16 @ 224, labels `normal`/`nsfw`).
//!
//! fal `run_safety_checker_v2` runs `ViTImageProcessor` + the classifier, takes `softmax(logits)` and
//! flags `p[label2id["nsfw"]] > 0.5` (strict). The backbone is candle-transformers' `vit::Model`, whose
//! parameter names are transformers' verbatim (`vit.embeddings.*`, `vit.encoder.layer.N.*`,
//! `vit.layernorm`, `classifier`) and whose `gelu` is the erf GELU transformers uses; its config is
//! built from the checkpoint's `config.json` (below), never from a preset.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::vit;
use image::RgbImage;
use serde::Deserialize;

use super::input::ModelInput;
use super::processor::ClassDefaults;
use super::{load_error, SafetyChecker, SafetyError};

fn default_act() -> candle_nn::Activation {
    candle_nn::Activation::Gelu
}
fn default_eps() -> f64 {
    1e-12
}
fn default_image() -> usize {
    224
}
fn default_patch() -> usize {
    16
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}

/// Mirror of transformers `ViTConfig` (`models/vit/configuration_vit.py`) as saved in `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VitConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: candle_nn::Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_image")]
    pub image_size: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub id2label: HashMap<String, String>,
    #[serde(default)]
    pub label2id: HashMap<String, i64>,
}

impl VitConfig {
    fn candle(&self) -> vit::Config {
        vit::Config {
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
            image_size: self.image_size,
            patch_size: self.patch_size,
            num_channels: self.num_channels,
            qkv_bias: self.qkv_bias,
        }
    }

    /// Index of the `nsfw` class: `label2id["nsfw"]` as fal reads it, else the `id2label` entry.
    pub fn nsfw_index(&self) -> Result<usize, SafetyError> {
        let from_label2id = self
            .label2id
            .get("nsfw")
            .and_then(|&i| usize::try_from(i).ok());
        let from_id2label = self
            .id2label
            .iter()
            .find(|(_, label)| label.as_str() == "nsfw")
            .and_then(|(id, _)| id.parse().ok());
        let idx = from_label2id.or(from_id2label).ok_or_else(|| {
            SafetyError::Load("config.json: no \"nsfw\" label in label2id/id2label".into())
        })?;
        if idx >= self.id2label.len() {
            return Err(SafetyError::Load(format!(
                "config.json: nsfw index {idx} out of range for {} labels",
                self.id2label.len()
            )));
        }
        Ok(idx)
    }
}

/// The v2 checker: processor + ViT classifier on one device.
pub struct VitChecker {
    input: ModelInput,
    model: vit::Model,
    nsfw_index: usize,
}

impl VitChecker {
    /// Builds from the parsed `config.json`, `preprocessor_config.json` text and the weights.
    pub fn new(
        cfg: &VitConfig,
        preprocessor_json: &str,
        vb: VarBuilder,
    ) -> Result<Self, SafetyError> {
        let input = ModelInput::new(preprocessor_json, ClassDefaults::VIT, cfg.image_size, &vb)?;
        let nsfw_index = cfg.nsfw_index()?;
        let model = vit::Model::new(&cfg.candle(), cfg.id2label.len(), vb)
            .map_err(|e| load_error("ViT weights", e))?;
        Ok(Self {
            input,
            model,
            nsfw_index,
        })
    }

    /// `pixel_values` `(B, 3, 224, 224)` f32 exactly as `ViTImageProcessor` makes them.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor, SafetyError> {
        self.input.pixel_values(images)
    }

    /// Classifier logits `(B, num_labels)` in f32 for preprocessed `pixel_values`.
    pub fn logits(&self, pixel_values: &Tensor) -> Result<Tensor, SafetyError> {
        let x = self.input.to_model(pixel_values)?;
        Ok(self.model.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// p(nsfw) per image: softmax over the labels in f32, as torch does on the f32 logits.
    pub fn nsfw_probabilities(&self, logits: &Tensor) -> Result<Vec<f32>, SafetyError> {
        let rows = logits.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        Ok(rows
            .iter()
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&l| (l - max).exp()).sum();
                (row[self.nsfw_index] - max).exp() / sum
            })
            .collect())
    }
}

impl SafetyChecker for VitChecker {
    fn check(&self, images: &[RgbImage]) -> Result<Vec<bool>, SafetyError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.logits(&self.pixel_values(images)?)?;
        Ok(self
            .nsfw_probabilities(&logits)?
            .into_iter()
            .map(|p| p > 0.5)
            .collect())
    }
}
