//! NSFW safety checking of generated images, as fal's `postprocess_images` does it
//! (fal `toolkit/image/safety_checker.py`; docs/sana-port-spec.md §8).
//!
//! Contract: a [`SafetyChecker`] takes a batch of RGB images and returns one flag per image from a single
//! batched model call on its device; [`apply`] then replaces every flagged image by a black image of
//! the same size (fal `filter_by`). Two versions exist, chosen by [`SafetyCheckerVersion`]:
//! * `v2` (fal's default): `Falconsai/nsfw_image_detection`, ViT classifier, `p(nsfw) > 0.5` ([`vit`]);
//! * `v1`: `CompVis/stable-diffusion-safety-checker`, CLIP concept thresholds ([`clip`]).
//!
//! Both preprocess with Pillow-identical resampling ([`resize`]) and transformers' processor numerics
//! ([`processor`]), so flags near the decision boundary agree with the Python service.

pub mod clip;
mod input;
pub mod processor;
pub mod resize;
pub mod vit;

use candle_core::{DType, Device};
use image::RgbImage;

use sana_pipelines::loader::{read_config, var_builder, ModelRepo, ModelSource};
use sana_pipelines::PipelineError;

/// Why checking could not produce flags.
#[derive(Debug, thiserror::Error)]
pub enum SafetyError {
    /// Checkpoint missing, misnamed or misshapen weights, unusable configs. Permanent for this worker.
    #[error("safety checker load: {0}")]
    Load(String),
    /// An image the preprocessor cannot handle (zero-sized). Permanent for this request.
    #[error("safety checker input: {0}")]
    Input(String),
    /// A tensor operation failed (device error, out of memory). Retryable.
    #[error("safety checker tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<PipelineError> for SafetyError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Load(msg) => SafetyError::Load(msg),
            PipelineError::Candle(e) => SafetyError::Candle(e),
            other @ (PipelineError::Cancelled | PipelineError::InvalidRequest(_)) => {
                SafetyError::Load(other.to_string())
            }
        }
    }
}

/// A load error naming `what`, with candle's captured backtrace (present when `RUST_BACKTRACE` is set)
/// dropped so the message stays one line in logs and job errors.
pub(crate) fn load_error(what: &str, e: candle_core::Error) -> SafetyError {
    let e = match e {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        other => other,
    };
    SafetyError::Load(format!("{what}: {e}"))
}

/// An NSFW classifier over a batch of images. Owned by the model thread; never called from async code.
pub trait SafetyChecker: Send {
    /// One flag per image (`true` = NSFW), computed in one batched forward.
    fn check(&self, images: &[RgbImage]) -> Result<Vec<bool>, SafetyError>;
}

/// fal's `safety_checker_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SafetyCheckerVersion {
    /// CompVis `StableDiffusionSafetyChecker` (CLIP ViT-L/14 concept embeddings).
    V1,
    /// `Falconsai/nsfw_image_detection` (ViT-B/16 classifier); fal's default.
    #[default]
    V2,
}

impl SafetyCheckerVersion {
    /// Names on the command line and in `FLEET_SAFETY_CHECKER` (fal's values, as in JSON).
    pub const NAMED: [(&'static str, SafetyCheckerVersion); 2] =
        [("v1", Self::V1), ("v2", Self::V2)];

    /// The Hub repo fal loads for this version.
    pub fn default_source(self) -> ModelSource {
        match self {
            Self::V1 => ModelSource::new("CompVis/stable-diffusion-safety-checker"),
            Self::V2 => ModelSource::new("Falconsai/nsfw_image_detection"),
        }
    }
}

/// Loads the checker of `version` from `source` (a local directory or a Hub repo with `config.json`,
/// `preprocessor_config.json` and `model.safetensors` at its root) onto `device` in `dtype`.
pub fn load_checker(
    version: SafetyCheckerVersion,
    source: &ModelSource,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn SafetyChecker>, SafetyError> {
    Ok(match version {
        SafetyCheckerVersion::V1 => Box::new(load_clip(source, device, dtype)?),
        SafetyCheckerVersion::V2 => Box::new(load_vit(source, device, dtype)?),
    })
}

/// The v2 checker with its inspection methods (logits, probabilities); see [`load_checker`].
pub fn load_vit(
    source: &ModelSource,
    device: &Device,
    dtype: DType,
) -> Result<vit::VitChecker, SafetyError> {
    let files = CheckerFiles::resolve(source, device, dtype)?;
    let cfg: vit::VitConfig = read_config(&files.dir)?;
    let vb = files.vb.clone();
    vit::VitChecker::new(&cfg, &files.preprocessor_json, vb).map_err(|e| files.name(e, "v2"))
}

/// The v1 checker with its inspection methods (embeddings, cosine scores); see [`load_checker`].
pub fn load_clip(
    source: &ModelSource,
    device: &Device,
    dtype: DType,
) -> Result<clip::ClipChecker, SafetyError> {
    let files = CheckerFiles::resolve(source, device, dtype)?;
    let cfg: clip::SafetyCheckerConfig = read_config(&files.dir)?;
    let vb = files.vb.clone();
    clip::ClipChecker::new(&cfg, &files.preprocessor_json, vb).map_err(|e| files.name(e, "v1"))
}

/// The three files every checker repo has, resolved through the shared pipeline loader.
struct CheckerFiles {
    id: String,
    dir: std::path::PathBuf,
    preprocessor_json: String,
    vb: candle_nn::VarBuilder<'static>,
}

impl CheckerFiles {
    fn resolve(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self, SafetyError> {
        let mut repo = ModelRepo::open(source)?;
        let files = repo.component_for("", dtype)?;
        let preprocessor = repo.file("preprocessor_config.json")?;
        let preprocessor_json = std::fs::read_to_string(&preprocessor)
            .map_err(|e| SafetyError::Load(format!("reading {}: {e}", preprocessor.display())))?;
        Ok(Self {
            id: source.id.clone(),
            dir: files.dir,
            preprocessor_json,
            vb: var_builder(&files.weights, dtype, device)?,
        })
    }

    /// Prefixes load errors with the repo and checker version so logs say which checkpoint is broken.
    fn name(&self, e: SafetyError, version: &str) -> SafetyError {
        match e {
            SafetyError::Load(msg) => {
                SafetyError::Load(format!("{} (safety checker {version}): {msg}", self.id))
            }
            other => other,
        }
    }
}

/// fal `filter_by`: every image whose flag is `true` becomes black (same size); others are untouched.
/// Images without a flag (a shorter `flags`) are left as they are.
pub fn apply(images: &mut [RgbImage], flags: &[bool]) {
    for (img, &nsfw) in images.iter_mut().zip(flags) {
        if nsfw {
            *img = RgbImage::new(img.width(), img.height());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_blackens_only_flagged_images() {
        let mut imgs = vec![
            RgbImage::from_pixel(3, 2, image::Rgb([9, 8, 7])),
            RgbImage::from_pixel(5, 4, image::Rgb([1, 2, 3])),
            RgbImage::from_pixel(2, 6, image::Rgb([200, 100, 50])),
        ];
        let before = imgs.clone();
        apply(&mut imgs, &[false, true, false]);
        assert_eq!(imgs[0], before[0]);
        assert_eq!(imgs[2], before[2]);
        assert_eq!(imgs[1].dimensions(), (5, 4));
        assert!(imgs[1].pixels().all(|p| p.0 == [0, 0, 0]));
    }

    #[test]
    fn version_parses_from_cli_and_json_and_defaults_to_v2() {
        assert_eq!(SafetyCheckerVersion::default(), SafetyCheckerVersion::V2);
        let named = |name| SafetyCheckerVersion::NAMED.iter().find(|(n, _)| *n == name);
        assert_eq!(named("v1").map(|(_, v)| *v), Some(SafetyCheckerVersion::V1));
        let v: SafetyCheckerVersion = serde_json::from_str("\"v2\"").expect("valid json");
        assert_eq!(v, SafetyCheckerVersion::V2);
        assert_eq!(
            serde_json::to_string(&SafetyCheckerVersion::V1).expect("serialisable"),
            "\"v1\""
        );
        assert_eq!(
            SafetyCheckerVersion::V2.default_source().id,
            "Falconsai/nsfw_image_detection"
        );
    }

    #[test]
    fn missing_directory_fails_naming_it() {
        let src = ModelSource::new("/nonexistent/safety-checker-dir");
        let err = load_checker(SafetyCheckerVersion::V2, &src, &Device::Cpu, DType::F32)
            .err()
            .expect("no such directory");
        assert!(matches!(err, SafetyError::Load(_)), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/safety-checker-dir"),
            "{err}"
        );
    }
}
