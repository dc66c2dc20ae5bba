//! The two text-to-image pipelines behind [`ImagePipeline`]: [`SanaPipeline`] (base: CFG, negative prompt,
//! flow DPM-Solver++) and [`SanaSprintPipeline`] (TrigFlow SCM with a guidance embedding), plus
//! [`load_pipelines`], which builds whichever of the two a worker serves and shares one Gemma-2 text
//! encoder between them (`Arc`), as diffusers does when the Sprint pipeline is built with the base one's
//! `text_encoder`/`tokenizer`.
//!
//! Call semantics mirror diffusers 0.42.1 `pipelines/sana/pipeline_sana.py` and `pipeline_sana_sprint.py`
//! (spec §1.5–1.6, §4, §5): resolution binning from the transformer's `sample_size`, latents drawn by one
//! torch-CUDA-compatible `randn` for the whole batch of `n` images (Sprint draws one more per step), the
//! per-step observer after every step, decode at the binned size, bilinear resize + centre crop back to the
//! requested size, `(x·0.5+0.5)` post-processing. [`SanaPipeline::generate_with_noise`] /
//! [`SanaSprintPipeline::generate_with_noise`] take the noise from any [`NoiseSource`] (tests and
//! `worker generate` inject recorded latents through it). Both run through the batched loop of
//! `sana/batch.rs` ([`ImagePipeline::generate_batch`]): a solo run is a batch of one.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;

use super::dcae::{DcAeConfig, DcAeDecoder, DcAeTiling};
use super::gemma2::{self, Gemma2Encoder};
use super::image_ops;
use super::loader::{self, ModelRepo, ModelSource};
use super::scheduler::{DpmSolverConfig, FlowDpmSolver, ScmConfig, ScmScheduler};
use super::text::TextEncoder;
use super::transformer::SanaTransformer2DModel;
use super::{
    BatchEntry, BatchKey, GenerateRequest, ImagePipeline, PipelineError, RequestOutcome,
    StepObserver,
};
use crate::PipelineKind;

mod batch;
mod noise;

pub use batch::BatchMember;
pub use noise::{seeded_noise, InjectedNoise, NoiseSource};

/// Knobs diffusers exposes that the service keeps at their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// `use_resolution_binning` (default true).
    pub use_resolution_binning: bool,
    /// Images whose decoded size (`h·w` at the generation size) exceeds this many pixels decode tiled,
    /// as diffusers does after `vae.enable_tiling()` (512-px tiles every 448 px, [`DcAeTiling::default`]):
    /// the decoder's activation memory then grows with the tile, not the image. Default
    /// [`DECODE_TILE_ABOVE_PIXELS`]; `usize::MAX` never tiles.
    pub decode_tile_above_pixels: usize,
}

/// Default of [`RunOptions::decode_tile_above_pixels`]: 2048² pixels. Every bin of the 512/1024/2048-px
/// Sana checkpoints is at or below it (they decode exactly as diffusers' default, untiled); larger
/// generation sizes (4K checkpoints, or binning off) decode tiled.
pub const DECODE_TILE_ABOVE_PIXELS: usize = 2048 * 2048;

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            use_resolution_binning: true,
            decode_tile_above_pixels: DECODE_TILE_ABOVE_PIXELS,
        }
    }
}

/// Transformer + VAE decoder of one checkpoint, with what the call semantics derive from their configs.
struct DenoiserParts {
    transformer: SanaTransformer2DModel,
    vae: DcAeDecoder,
    scaling_factor: f64,
    /// `2^(len(encoder_block_out_channels) − 1)`.
    vae_scale: usize,
    /// Bin table for the transformer's `sample_size` (`Err` text when it has none: binning then fails).
    bins: Result<&'static [(&'static str, u32, u32)], String>,
}

impl DenoiserParts {
    fn load(
        repo: &mut ModelRepo,
        dtype: DType,
        device: &Device,
        files: &mut Vec<PathBuf>,
    ) -> Result<Self, PipelineError> {
        let t_files = repo.component_for("transformer", dtype)?;
        files.extend(t_files.weights.iter().cloned());
        let transformer = SanaTransformer2DModel::load_component(&t_files, dtype, device)?;
        let v_files = repo.component_for("vae", dtype)?;
        files.extend(v_files.weights.iter().cloned());
        let vae_cfg = DcAeConfig::from_json_file(&v_files.config)?;
        let vb = loader::var_builder(&v_files.weights, dtype, device)?;
        let vae = DcAeDecoder::load(vb, &vae_cfg)
            .map_err(|e| PipelineError::Load(format!("vae {}: {e}", v_files.dir.display())))?;
        let bins = image_ops::aspect_ratio_bins(transformer.config().sample_size)
            .map_err(|e| e.to_string());
        Ok(DenoiserParts {
            transformer,
            vae,
            scaling_factor: vae_cfg.scaling_factor,
            vae_scale: vae_cfg.spatial_compression_ratio(),
            bins,
        })
    }

    /// `(binned_h, binned_w)` to generate at, checked like diffusers' `check_inputs` (`% 32`).
    fn generation_size(
        &self,
        req: &GenerateRequest,
        opts: RunOptions,
    ) -> Result<(usize, usize), PipelineError> {
        let (h, w) = if opts.use_resolution_binning {
            let bins = self
                .bins
                .as_ref()
                .map_err(|e| PipelineError::InvalidRequest(e.clone()))?;
            image_ops::classify_height_width_bin(req.height, req.width, bins)
        } else {
            (req.height, req.width)
        };
        if h % 32 != 0 || w % 32 != 0 || h == 0 || w == 0 {
            return Err(PipelineError::InvalidRequest(format!(
                "height and width have to be divisible by 32 but are {h} and {w}"
            )));
        }
        Ok((h as usize, w as usize))
    }

    fn latent_shape(&self, n: usize, h: usize, w: usize) -> [usize; 4] {
        [
            n,
            self.transformer.config().in_channels,
            h / self.vae_scale,
            w / self.vae_scale,
        ]
    }

    /// `vae.decode(latents.to(vae.dtype) / scaling_factor)`, then resize/crop and post-processing.
    fn decode_to_images(
        &self,
        latents: &Tensor,
        req: &GenerateRequest,
        opts: RunOptions,
    ) -> Result<Vec<image::RgbImage>, PipelineError> {
        let dtype = self.vae.dtype();
        let z = latents.to_dtype(dtype)?;
        let z = if dtype == DType::F32 {
            z.broadcast_div(&Tensor::new(self.scaling_factor as f32, z.device())?)?
        } else {
            // torch's CUDA `x / scalar` multiplies by the f32 reciprocal in f32, then rounds once.
            let inv = 1.0f32 / self.scaling_factor as f32;
            z.to_dtype(DType::F32)?
                .affine(f64::from(inv), 0.0)?
                .to_dtype(dtype)?
        };
        // One image at a time: the decoder's activations dominate peak memory (at 1024² about 2 GiB per
        // image), so n images cost one image's peak, not n; the decoder fills the GPU at batch 1.
        let mut out = Vec::with_capacity(z.dim(0)?);
        let (_, _, h, w) = z.dims4()?;
        let tiled = h * w * self.vae_scale * self.vae_scale > opts.decode_tile_above_pixels;
        for i in 0..z.dim(0)? {
            let zi = z.narrow(0, i, 1)?;
            let image = if tiled {
                self.vae.decode_tiled(&zi, &DcAeTiling::default())?
            } else {
                self.vae.decode(&zi)?
            };
            if opts.use_resolution_binning {
                // Large outputs stream into u8 (bounded memory; see `resize_crop_to_rgb`).
                out.extend(image_ops::resize_crop_to_rgb(
                    &image,
                    req.height as usize,
                    req.width as usize,
                )?);
            } else {
                out.extend(image_ops::to_rgb_images(&image)?);
            }
        }
        Ok(out)
    }
}

fn check_request(req: &GenerateRequest, kind: PipelineKind) -> Result<usize, PipelineError> {
    if req.endpoint != kind {
        return Err(PipelineError::InvalidRequest(format!(
            "a {} request sent to the {kind} pipeline",
            req.endpoint
        )));
    }
    if req.num_images == 0 || req.num_inference_steps == 0 {
        return Err(PipelineError::InvalidRequest(
            "num_images and num_inference_steps must be positive".into(),
        ));
    }
    Ok(req.num_images as usize)
}

/// What both pipelines hold: the shared text encoder, one checkpoint's denoiser and its scheduler config
/// `S` (validated by the pipeline's `load`).
struct PipelineCore<S> {
    text: Arc<TextEncoder>,
    parts: DenoiserParts,
    scheduler: S,
    device: Device,
}

impl<S: DeserializeOwned> PipelineCore<S> {
    /// Reads `scheduler/scheduler_config.json` of `repo` and keeps it beside the loaded `parts`.
    fn new(
        repo: &mut ModelRepo,
        text: Arc<TextEncoder>,
        parts: DenoiserParts,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let scheduler: S = loader::read_json(&repo.file("scheduler/scheduler_config.json")?)?;
        Ok(PipelineCore {
            text,
            parts,
            scheduler,
            device: device.clone(),
        })
    }
}

/// Sana 1600M: CFG over `[negative; positive]`, flow DPM-Solver++(2M).
pub struct SanaPipeline {
    core: PipelineCore<DpmSolverConfig>,
}

impl SanaPipeline {
    /// Loads transformer, VAE and scheduler config from `repo`; the text encoder is given (shared).
    pub fn load(
        repo: &mut ModelRepo,
        text: Arc<TextEncoder>,
        dtype: DType,
        device: &Device,
        files: &mut Vec<PathBuf>,
    ) -> Result<Self, PipelineError> {
        let parts = DenoiserParts::load(repo, dtype, device, files)?;
        let core = PipelineCore::new(repo, text, parts, device)?;
        // Validate the scheduler config now rather than on the first request.
        FlowDpmSolver::new(&core.scheduler, 1)?;
        Ok(SanaPipeline { core })
    }

    pub fn text_encoder(&self) -> &Arc<TextEncoder> {
        &self.core.text
    }

    /// [`ImagePipeline::generate`] with an explicit noise source and options.
    pub fn generate_with_noise(
        &mut self,
        req: &GenerateRequest,
        noise: &mut dyn NoiseSource,
        opts: RunOptions,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<image::RgbImage>, PipelineError> {
        let mut members = [BatchMember {
            request: req,
            noise,
            observer,
        }];
        let mut outcome = None;
        self.generate_batch_with_noise(&mut members, opts, &mut |_, o| outcome = Some(o))?;
        one_outcome(outcome)
    }
}

impl ImagePipeline for SanaPipeline {
    fn generate(
        &mut self,
        req: &GenerateRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<image::RgbImage>, PipelineError> {
        let mut g = seeded_noise(req.seed, &self.core.device)?;
        self.generate_with_noise(req, g.as_mut(), RunOptions::default(), observer)
    }

    fn batch_key(&self, req: &GenerateRequest) -> Result<BatchKey, PipelineError> {
        batch::batch_key(
            &self.core.parts,
            PipelineKind::Base,
            req,
            RunOptions::default(),
        )
    }

    fn generate_batch_each(
        &mut self,
        batch: &mut [BatchEntry<'_>],
        done: &mut dyn FnMut(usize, RequestOutcome),
    ) -> Result<(), PipelineError> {
        let device = self.core.device.clone();
        with_seeded_members(batch, &device, |members| {
            self.generate_batch_with_noise(members, RunOptions::default(), done)
        })
    }
}

/// Guidance value the Sprint transformer embeds: `dtype(dtype(g) · guidance_embeds_scale)` with the product in
/// f32 (torch's opmath), e.g. bf16: 5.0 → 0.5, 4.5 → 0.44921875.
pub fn sprint_guidance(guidance_scale: f64, scale: f64, dtype: DType) -> f32 {
    let round = |x: f32| match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    };
    round(round(guidance_scale as f32) * scale as f32)
}

/// Sana-Sprint 1.6B: TrigFlow SCM, no negative prompt, guidance as an input embedding.
pub struct SanaSprintPipeline {
    core: PipelineCore<ScmConfig>,
}

impl SanaSprintPipeline {
    /// Loads transformer, VAE and scheduler config from `repo`; the text encoder is given (shared).
    pub fn load(
        repo: &mut ModelRepo,
        text: Arc<TextEncoder>,
        dtype: DType,
        device: &Device,
        files: &mut Vec<PathBuf>,
    ) -> Result<Self, PipelineError> {
        let parts = DenoiserParts::load(repo, dtype, device, files)?;
        if !parts.transformer.config().guidance_embeds {
            return Err(PipelineError::Load(format!(
                "{}: the Sprint pipeline needs a transformer with guidance_embeds=true",
                repo.source().id
            )));
        }
        let core = PipelineCore::new(repo, text, parts, device)?;
        ScmScheduler::new(&core.scheduler, 2)?;
        Ok(SanaSprintPipeline { core })
    }

    pub fn text_encoder(&self) -> &Arc<TextEncoder> {
        &self.core.text
    }

    /// [`ImagePipeline::generate`] with an explicit noise source and options. Draws: initial latents,
    /// then one noise per step (the last one included, as diffusers' `SCMScheduler.step`).
    pub fn generate_with_noise(
        &mut self,
        req: &GenerateRequest,
        noise: &mut dyn NoiseSource,
        opts: RunOptions,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<image::RgbImage>, PipelineError> {
        let mut members = [BatchMember {
            request: req,
            noise,
            observer,
        }];
        let mut outcome = None;
        self.generate_batch_with_noise(&mut members, opts, &mut |_, o| outcome = Some(o))?;
        one_outcome(outcome)
    }
}

impl ImagePipeline for SanaSprintPipeline {
    fn generate(
        &mut self,
        req: &GenerateRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<image::RgbImage>, PipelineError> {
        let mut g = seeded_noise(req.seed, &self.core.device)?;
        self.generate_with_noise(req, g.as_mut(), RunOptions::default(), observer)
    }

    fn batch_key(&self, req: &GenerateRequest) -> Result<BatchKey, PipelineError> {
        batch::batch_key(
            &self.core.parts,
            PipelineKind::Sprint,
            req,
            RunOptions::default(),
        )
    }

    fn generate_batch_each(
        &mut self,
        batch: &mut [BatchEntry<'_>],
        done: &mut dyn FnMut(usize, RequestOutcome),
    ) -> Result<(), PipelineError> {
        let device = self.core.device.clone();
        with_seeded_members(batch, &device, |members| {
            self.generate_batch_with_noise(members, RunOptions::default(), done)
        })
    }
}

/// The outcome of a batch of one.
fn one_outcome(outcome: Option<RequestOutcome>) -> RequestOutcome {
    outcome.unwrap_or_else(|| {
        Err(PipelineError::InvalidRequest(
            "a batch of one gave no outcome".into(),
        ))
    })
}

/// Gives every entry its own seeded generator (`seeded_noise(request.seed)`, as its solo run) and runs
/// `f` on the members.
fn with_seeded_members(
    batch: &mut [BatchEntry<'_>],
    device: &Device,
    f: impl FnOnce(&mut [BatchMember<'_>]) -> Result<(), PipelineError>,
) -> Result<(), PipelineError> {
    let mut noises = batch
        .iter()
        .map(|e| seeded_noise(e.request.seed, device))
        .collect::<Result<Vec<_>, _>>()?;
    let mut members: Vec<BatchMember<'_>> = batch
        .iter_mut()
        .zip(noises.iter_mut())
        .map(|(e, noise)| BatchMember {
            request: e.request,
            noise: noise.as_mut(),
            observer: &mut *e.observer,
        })
        .collect();
    f(&mut members)
}

/// Loads the Gemma-2 text encoder and tokenizer of `repo` (`text_encoder/`, `tokenizer/`).
pub fn load_text_encoder(
    repo: &mut ModelRepo,
    dtype: DType,
    device: &Device,
    files: &mut Vec<PathBuf>,
) -> Result<TextEncoder, PipelineError> {
    let te = repo.component_for("text_encoder", dtype)?;
    files.extend(te.weights.iter().cloned());
    let cfg: gemma2::Config = loader::read_json(&te.config)?;
    let vb = loader::var_builder(&te.weights, dtype, device)?;
    let encoder = Gemma2Encoder::load(vb, &cfg)
        .map_err(|e| PipelineError::Load(format!("text_encoder {}: {e}", te.dir.display())))?;
    let tok = repo.file("tokenizer/tokenizer.json")?;
    if repo.has_file("tokenizer/tokenizer_config.json")? {
        repo.file("tokenizer/tokenizer_config.json")?;
    }
    let dir = tok.parent().map(PathBuf::from).unwrap_or_default();
    TextEncoder::from_dir(&dir, encoder)
}

/// What a worker serves: either pipeline may be absent.
#[derive(Debug, Clone)]
pub struct PipelinesConfig {
    pub base: Option<ModelSource>,
    pub sprint: Option<ModelSource>,
    pub device: Device,
    /// Weight/compute dtype (bf16 on the GPU, f32 for CPU tests); fp32 checkpoints are cast on load.
    pub dtype: DType,
}

/// The loaded pipelines of one worker.
pub struct Pipelines {
    base: Option<SanaPipeline>,
    sprint: Option<SanaSprintPipeline>,
    loaded_weight_files: Vec<PathBuf>,
}

impl Pipelines {
    pub fn get_mut(&mut self, kind: PipelineKind) -> Option<&mut dyn ImagePipeline> {
        match kind {
            PipelineKind::Base => self.base.as_mut().map(|p| p as &mut dyn ImagePipeline),
            PipelineKind::Sprint => self.sprint.as_mut().map(|p| p as &mut dyn ImagePipeline),
        }
    }

    /// The pipeline of `kind`, read-only (e.g. its batch key).
    pub fn get(&self, kind: PipelineKind) -> Option<&dyn ImagePipeline> {
        match kind {
            PipelineKind::Base => self.base.as_ref().map(|p| p as &dyn ImagePipeline),
            PipelineKind::Sprint => self.sprint.as_ref().map(|p| p as &dyn ImagePipeline),
        }
    }

    pub fn base(&mut self) -> Option<&mut SanaPipeline> {
        self.base.as_mut()
    }

    pub fn sprint(&mut self) -> Option<&mut SanaSprintPipeline> {
        self.sprint.as_mut()
    }

    /// One real run of every loaded pipeline at `width`×`height` (one denoising step, one image, fixed
    /// seed), so every kernel is compiled and loaded, cuDNN's algorithms for these shapes are chosen and
    /// cuBLAS/cuDNN handles exist before the first request. Returns the seconds it took per pipeline.
    pub fn warm_up(
        &mut self,
        width: u32,
        height: u32,
    ) -> Result<Vec<(PipelineKind, f64)>, PipelineError> {
        let mut times = Vec::new();
        for kind in self.kinds() {
            let req = GenerateRequest {
                endpoint: kind,
                prompt: "warm-up".into(),
                negative_prompt: String::new(),
                width,
                height,
                num_inference_steps: 1,
                guidance_scale: 4.5,
                seed: 0,
                num_images: 1,
            };
            let started = std::time::Instant::now();
            let pipeline = self
                .get_mut(kind)
                .ok_or_else(|| PipelineError::Load(format!("{kind} pipeline vanished")))?;
            let images = pipeline.generate(&req, &mut super::NoProgress)?;
            if images.len() != 1 || images[0].dimensions() != (width, height) {
                return Err(PipelineError::Load(format!(
                    "warm-up of {kind} returned {} images of {:?}",
                    images.len(),
                    images.first().map(|i| i.dimensions())
                )));
            }
            times.push((kind, started.elapsed().as_secs_f64()));
        }
        Ok(times)
    }

    /// Endpoint kinds that are loaded.
    pub fn kinds(&self) -> Vec<PipelineKind> {
        PipelineKind::ALL
            .into_iter()
            .filter(|k| self.loaded(*k))
            .collect()
    }

    fn loaded(&self, kind: PipelineKind) -> bool {
        match kind {
            PipelineKind::Base => self.base.is_some(),
            PipelineKind::Sprint => self.sprint.is_some(),
        }
    }

    /// Every safetensors file memory-mapped while loading, in load order.
    pub fn loaded_weight_files(&self) -> &[PathBuf] {
        &self.loaded_weight_files
    }
}

/// Loads the configured pipelines. The text encoder is loaded once, from the base source when present
/// (else the Sprint one), and shared: the Sprint checkpoint's own `text_encoder/` is never read.
pub fn load_pipelines(cfg: &PipelinesConfig) -> Result<Pipelines, PipelineError> {
    // Our kernels compile (NVRTC) and load here, not on the first request.
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = &cfg.device {
        super::kernels::preload(dev)?;
    }
    let mut files = Vec::new();
    let mut base_repo = cfg.base.as_ref().map(ModelRepo::open).transpose()?;
    let mut sprint_repo = cfg.sprint.as_ref().map(ModelRepo::open).transpose()?;
    let text_repo = match (base_repo.as_mut(), sprint_repo.as_mut()) {
        (Some(r), _) | (None, Some(r)) => r,
        (None, None) => {
            return Err(PipelineError::Load(
                "no pipeline configured (neither base nor sprint)".into(),
            ))
        }
    };
    let text = Arc::new(load_text_encoder(
        text_repo,
        cfg.dtype,
        &cfg.device,
        &mut files,
    )?);
    let base = match base_repo.as_mut() {
        Some(repo) => Some(SanaPipeline::load(
            repo,
            Arc::clone(&text),
            cfg.dtype,
            &cfg.device,
            &mut files,
        )?),
        None => None,
    };
    let sprint = match sprint_repo.as_mut() {
        Some(repo) => Some(SanaSprintPipeline::load(
            repo,
            Arc::clone(&text),
            cfg.dtype,
            &cfg.device,
            &mut files,
        )?),
        None => None,
    };
    Ok(Pipelines {
        base,
        sprint,
        loaded_weight_files: files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sprint_guidance_rounds_like_torch_bf16() {
        // Spec §4.2: bf16(bf16(g)·0.1): 5.0 → 0.5, 4.5 → 0.44921875.
        assert_eq!(sprint_guidance(5.0, 0.1, DType::BF16), 0.5);
        assert_eq!(sprint_guidance(4.5, 0.1, DType::BF16), 0.449_218_75);
        // f32 reference runs: f32(5)·f32(0.1) in f32.
        assert_eq!(sprint_guidance(5.0, 0.1, DType::F32), 5.0f32 * 0.1f32);
    }
}
