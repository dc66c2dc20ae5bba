//! Safety checker v1: `CompVis/stable-diffusion-safety-checker`, diffusers' `StableDiffusionSafetyChecker`
//! (`pipelines/stable_diffusion/safety_checker.py`): a CLIP ViT-L/14 vision tower, `visual_projection`,
//! and cosine thresholds against 17 concept and 3 "special care" embeddings.
//!
//! The vision tower is written here rather than taken from candle-transformers' `clip::vision_model`
//! because that one hard-codes quick-GELU and LayerNorm eps 1e-5 and silently substitutes a random
//! `class_embedding` when the weight is missing; this one reads both from `config.json` and fails at
//! load with the missing tensor's name. Parameter names are transformers' `CLIPVisionModel` ones under
//! `vision_model.vision_model.` (Hub layout) or `vision_model.` (transformers 5 re-saves). The concept
//! logic runs on f32 host values with NumPy 2 semantics (NEP 50: every step stays float32;
//! `round(x, 3)` is `rint(x * 1000) / 1000` half-to-even).

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{
    conv2d_no_bias, layer_norm, linear, linear_no_bias, Conv2d, LayerNorm, Linear, VarBuilder,
};
use image::RgbImage;
use serde::Deserialize;

use super::input::ModelInput;
use super::processor::ClassDefaults;
use super::{load_error, SafetyChecker, SafetyError};

/// Concept table sizes diffusers hard-codes in `StableDiffusionSafetyChecker.__init__`.
const N_CONCEPTS: usize = 17;
const N_SPECIAL: usize = 3;

/// transformers `CLIPVisionConfig` (`models/clip/configuration_clip.py`) with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

fn default_projection_dim() -> usize {
    512
}

/// The `config.json` of the checker (a transformers `CLIPConfig`; only the vision half is used).
#[derive(Debug, Clone, Deserialize)]
pub struct SafetyCheckerConfig {
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
}

#[derive(Debug, Clone, Copy)]
enum Act {
    QuickGelu,
    GeluErf,
    GeluTanh,
}

impl Act {
    fn parse(name: &str) -> Result<Self, SafetyError> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => Err(SafetyError::Load(format!(
                "config.json: unsupported vision hidden_act {other:?}"
            ))),
        }
    }

    fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

struct EncoderLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ln2: LayerNorm,
    heads: usize,
    act: Act,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, c: &ClipVisionConfig, act: Act) -> candle_core::Result<Self> {
        let (h, a) = (c.hidden_size, vb.pp("self_attn"));
        Ok(Self {
            q: linear(h, h, a.pp("q_proj"))?,
            k: linear(h, h, a.pp("k_proj"))?,
            v: linear(h, h, a.pp("v_proj"))?,
            out: linear(h, h, a.pp("out_proj"))?,
            ln1: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: linear(h, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, h, vb.pp("mlp").pp("fc2"))?,
            ln2: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            heads: c.num_attention_heads,
            act,
        })
    }

    fn attention(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, h) = xs.dims3()?;
        let d = h / self.heads;
        // (B, N, H) -> (B, heads, N, d)
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(xs)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let dtype = q.dtype();
        // Scores and softmax in f32 whatever the weights are, as torch's SDPA math does for half inputs.
        let scores = (q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
            * (d as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h))?;
        self.out.forward(&ctx)
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = (xs + self.attention(&self.ln1.forward(xs)?)?)?;
        let ys = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.ln2.forward(&xs)?)?)?,
        )?;
        xs + ys
    }
}

/// transformers `CLIPVisionTransformer`: returns the pooled output (post-LN CLS token).
struct VisionTower {
    patch: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_ln: LayerNorm,
}

impl VisionTower {
    fn load(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self, SafetyError> {
        let act = Act::parse(&c.hidden_act)?;
        let build = || -> candle_core::Result<Self> {
            let e = vb.pp("embeddings");
            let conv = candle_nn::Conv2dConfig {
                stride: c.patch_size,
                ..Default::default()
            };
            let positions = (c.image_size / c.patch_size).pow(2) + 1;
            let enc = vb.pp("encoder").pp("layers");
            Ok(Self {
                patch: conv2d_no_bias(
                    c.num_channels,
                    c.hidden_size,
                    c.patch_size,
                    conv,
                    e.pp("patch_embedding"),
                )?,
                class_embedding: e.get(c.hidden_size, "class_embedding")?,
                position_embedding: e
                    .pp("position_embedding")
                    .get((positions, c.hidden_size), "weight")?,
                pre_ln: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
                layers: (0..c.num_hidden_layers)
                    .map(|i| EncoderLayer::load(enc.pp(i), c, act))
                    .collect::<candle_core::Result<_>>()?,
                post_ln: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            })
        };
        build().map_err(|e| load_error("CLIP vision weights", e))
    }

    fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixel_values.dim(0)?;
        // (B, 3, H, W) -> (B, hidden, H/p, W/p) -> (B, N, hidden)
        let patches = self
            .patch
            .forward(pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let hidden = self.class_embedding.dim(0)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .expand((b, 1, hidden))?;
        let mut xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        xs = self.pre_ln.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.post_ln.forward(&xs.i((.., 0, ..))?)
    }
}

/// Cosine similarities of one batch against both tables, f32 `(B, 3)` and `(B, 17)`.
#[derive(Debug, Clone)]
pub struct ConceptScores {
    pub special: Vec<Vec<f32>>,
    pub concept: Vec<Vec<f32>>,
}

/// NumPy `round(np.float32(x), 3)`: `rint(x * 1000) / 1000` in float32, ties to even.
pub fn np_round3(x: f32) -> f32 {
    (x * 1000.0f32).round_ties_even() / 1000.0f32
}

/// Rounded scores of one image as `StableDiffusionSafetyChecker.forward` records them
/// (`result_img["special_scores"]`, `["concept_scores"]`) and the final `adjustment`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    pub special: Vec<f32>,
    pub concept: Vec<f32>,
    pub adjustment: f32,
}

impl ImageScores {
    /// The per-image decision loop, bit for bit in f32.
    pub fn compute(
        special_cos: &[f32],
        concept_cos: &[f32],
        special_w: &[f32],
        concept_w: &[f32],
    ) -> Self {
        let mut adjustment = 0.0f32;
        let mut special = Vec::with_capacity(special_cos.len());
        for (cos, w) in special_cos.iter().zip(special_w) {
            let s = np_round3(cos - w + adjustment);
            if s > 0.0 {
                // Any special-care hit lowers every later threshold by 0.01 (including later special ones).
                adjustment = 0.01;
            }
            special.push(s);
        }
        let concept = concept_cos
            .iter()
            .zip(concept_w)
            .map(|(cos, w)| np_round3(cos - w + adjustment))
            .collect();
        Self {
            special,
            concept,
            adjustment,
        }
    }

    /// `has_nsfw_concepts`: any concept score above zero.
    pub fn nsfw(&self) -> bool {
        self.concept.iter().any(|&c| c > 0.0)
    }
}

/// The decision of `StableDiffusionSafetyChecker.forward` for one image.
pub fn has_nsfw_concept(
    special: &[f32],
    concept: &[f32],
    special_w: &[f32],
    concept_w: &[f32],
) -> bool {
    ImageScores::compute(special, concept, special_w, concept_w).nsfw()
}

/// The v1 checker.
pub struct ClipChecker {
    input: ModelInput,
    tower: VisionTower,
    visual_projection: Linear,
    concept_embeds: Tensor,
    special_care_embeds: Tensor,
    concept_w: Vec<f32>,
    special_w: Vec<f32>,
}

/// `F.normalize(x, dim=-1)`: `x / max(||x||, 1e-12)`, in f32.
fn normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&norm)
}

impl ClipChecker {
    pub fn new(
        cfg: &SafetyCheckerConfig,
        preprocessor_json: &str,
        vb: VarBuilder,
    ) -> Result<Self, SafetyError> {
        let c = &cfg.vision_config;
        let input = ModelInput::new(preprocessor_json, ClassDefaults::CLIP, c.image_size, &vb)?;
        // Hub checkpoints (transformers 4 `CLIPVisionModel` wrapping `CLIPVisionTransformer`) nest the
        // tower as `vision_model.vision_model.*`; transformers 5 flattened the class (its
        // `PrefixChange(prefix_to_remove="vision_model")` converts on load) and saves `vision_model.*`.
        let legacy = vb.contains_tensor("vision_model.vision_model.embeddings.class_embedding");
        let tower_vb = if legacy {
            vb.pp("vision_model").pp("vision_model")
        } else {
            vb.pp("vision_model")
        };
        let tower = VisionTower::load(tower_vb, c)?;
        let load = |what: &str, r: candle_core::Result<Tensor>| r.map_err(|e| load_error(what, e));
        let p = cfg.projection_dim;
        let visual_projection = linear_no_bias(c.hidden_size, p, vb.pp("visual_projection"))
            .map_err(|e| load_error("visual_projection", e))?;
        let concept_embeds = load("concept_embeds", vb.get((N_CONCEPTS, p), "concept_embeds"))?;
        let special_care_embeds = load(
            "special_care_embeds",
            vb.get((N_SPECIAL, p), "special_care_embeds"),
        )?;
        let host = |name: &str, n: usize| -> Result<Vec<f32>, SafetyError> {
            let t = load(name, vb.get(n, name))?;
            Ok(t.to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .to_vec1::<f32>()?)
        };
        Ok(Self {
            input,
            tower,
            visual_projection,
            concept_embeds,
            special_care_embeds,
            concept_w: host("concept_embeds_weights", N_CONCEPTS)?,
            special_w: host("special_care_embeds_weights", N_SPECIAL)?,
        })
    }

    /// `pixel_values` `(B, 3, 224, 224)` f32 exactly as the CLIP feature extractor makes them.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor, SafetyError> {
        self.input.pixel_values(images)
    }

    /// `image_embeds = visual_projection(pooled_output)`, f32 `(B, projection_dim)`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor, SafetyError> {
        let x = self.input.to_model(pixel_values)?;
        let pooled = self.tower.forward(&x)?;
        Ok(self
            .visual_projection
            .forward(&pooled)?
            .to_dtype(DType::F32)?)
    }

    /// `cosine_distance` against both tables (diffusers computes it in the model dtype, then `.float()`).
    pub fn scores(&self, image_embeds: &Tensor) -> Result<ConceptScores, SafetyError> {
        let e = normalize(image_embeds)?;
        let cos = |table: &Tensor| -> Result<Vec<Vec<f32>>, SafetyError> {
            let t = normalize(table)?;
            Ok(e.matmul(&t.t()?)?
                .to_device(&Device::Cpu)?
                .to_vec2::<f32>()?)
        };
        Ok(ConceptScores {
            special: cos(&self.special_care_embeds)?,
            concept: cos(&self.concept_embeds)?,
        })
    }

    /// Rounded per-image scores from the cosines.
    pub fn image_scores(&self, scores: &ConceptScores) -> Vec<ImageScores> {
        scores
            .special
            .iter()
            .zip(&scores.concept)
            .map(|(s, c)| ImageScores::compute(s, c, &self.special_w, &self.concept_w))
            .collect()
    }

    /// Flags from precomputed scores.
    pub fn flags(&self, scores: &ConceptScores) -> Vec<bool> {
        self.image_scores(scores)
            .iter()
            .map(ImageScores::nsfw)
            .collect()
    }
}

impl SafetyChecker for ClipChecker {
    fn check(&self, images: &[RgbImage]) -> Result<Vec<bool>, SafetyError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let embeds = self.image_embeds(&self.pixel_values(images)?)?;
        Ok(self.flags(&self.scores(&embeds)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_round_is_half_even_in_f32() {
        // Values checked against numpy 2.4 `round(np.float32(x), 3)`: 0.0005 -> 0.0, 0.0015 -> 0.002.
        assert_eq!(np_round3(0.0005), 0.0);
        assert_eq!(np_round3(0.0015), 0.002);
        assert_eq!(np_round3(-0.0004), 0.0);
        assert_eq!(np_round3(0.0123456), 0.012);
    }

    #[test]
    fn special_care_hit_lowers_concept_thresholds() {
        let sw = [0.5f32, 0.5, 0.5];
        let cw = vec![0.3f32; N_CONCEPTS];
        let mut concept = vec![0.0f32; N_CONCEPTS];
        concept[4] = 0.295; // 0.295 - 0.3 = -0.005 -> not flagged on its own
        assert!(!has_nsfw_concept(&[0.1, 0.1, 0.1], &concept, &sw, &cw));
        // A special-care hit adds 0.01: -0.005 + 0.01 = 0.005 -> rounds to 0.005 > 0 -> flagged.
        assert!(has_nsfw_concept(&[0.1, 0.51, 0.1], &concept, &sw, &cw));
        // 0.0004 above threshold rounds to 0.0 and is not > 0.
        concept[4] = 0.3004;
        assert!(!has_nsfw_concept(&[0.1, 0.1, 0.1], &concept, &sw, &cw));
    }
}
