//! sana-pipelines: the Sana (`base`) and Sana-Sprint (`sprint`) text-to-image pipelines on candle.
//!
//! A library of its own that knows nothing of queues, HTTP or storage: the `fleet-worker` crate drives it,
//! and anyone can load a checkpoint and call [`ImagePipeline::generate`] without the service.
//!
//! The worker reaches every pipeline through one narrow interface, [`ImagePipeline`]: a validated
//! request in, RGB images at the requested size out, with a per-step observer that reports progress and
//! can stop the run (cancellation is honoured between denoising steps). Everything model-specific
//! (Gemma-2 text encoder, linear DiT, DC-AE decoder, samplers) lives in the submodules; the layout and
//! numerics follow docs/sana-port-spec.md and diffusers 0.42.1.

pub mod dcae;
pub mod gemma2;
pub mod image_ops;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod loader;
pub mod ops;
pub mod param_count;
pub mod rng;
#[cfg(feature = "cuda")]
pub mod rng_cuda;
pub mod sana;
pub mod scheduler;
pub use sana::{load_pipelines, Pipelines, PipelinesConfig};
pub mod text;
pub mod transformer;

/// Which of the two pipelines a request is for; the service maps its endpoint kinds onto these one to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PipelineKind {
    /// Sana 1600M, flow DPM-Solver++ with classifier-free guidance.
    Base,
    /// Sana-Sprint 1.6B, TrigFlow SCM, one to a few steps.
    Sprint,
}

impl PipelineKind {
    pub const ALL: [PipelineKind; 2] = [PipelineKind::Base, PipelineKind::Sprint];

    pub fn as_str(self) -> &'static str {
        match self {
            PipelineKind::Base => "base",
            PipelineKind::Sprint => "sprint",
        }
    }

    /// Denoising steps the pipeline is run with by default (fal's defaults, which the service's
    /// `EndpointKind::default_steps` also uses): 18 for base, 2 for sprint.
    pub fn default_steps(self) -> u32 {
        match self {
            PipelineKind::Base => 18,
            PipelineKind::Sprint => 2,
        }
    }
}

impl std::fmt::Display for PipelineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a pipeline needs to produce images; the worker builds it from a validated job's input.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub endpoint: PipelineKind,
    pub prompt: String,
    pub negative_prompt: String,
    /// Requested output size in pixels (before binning); the returned images have exactly this size.
    pub width: u32,
    pub height: u32,
    pub num_inference_steps: u32,
    pub guidance_scale: f64,
    pub seed: u64,
    pub num_images: u32,
}

/// Why a pipeline run ended without images.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The observer asked to stop (request cancelled) between two denoising steps.
    #[error("cancelled between denoising steps")]
    Cancelled,
    /// The request cannot be run by this pipeline (bad input that slipped past validation). Permanent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Model files missing, misnamed weights, wrong shapes, bad configs. Permanent for this worker.
    #[error("model load: {0}")]
    Load(String),
    /// A tensor operation failed (device error, out of memory). Retryable.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Receives `(step, total)` after each denoising step (1-based); returning `Err(PipelineError::Cancelled)`
/// stops the run before the next step.
pub trait StepObserver {
    fn on_step(&mut self, step: u32, total: u32) -> Result<(), PipelineError>;
}

/// Observer that never cancels and ignores progress.
pub struct NoProgress;

impl StepObserver for NoProgress {
    fn on_step(&mut self, _step: u32, _total: u32) -> Result<(), PipelineError> {
        Ok(())
    }
}

/// What requests must share to run as one batch: the pipeline, the binned generation size (latent shape),
/// the step count (one sampler schedule) and, for base, whether CFG is on (`guidance_scale > 1`, which
/// doubles a request's rows). Guidance scales, prompts, seeds, `num_images` and requested output sizes may
/// differ: they are applied per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub endpoint: PipelineKind,
    /// Generation (binned) size in pixels.
    pub height: u32,
    pub width: u32,
    pub steps: u32,
    pub cfg: bool,
}

/// One request of a batched run and the observer of its own steps.
pub struct BatchEntry<'a> {
    pub request: &'a GenerateRequest,
    pub observer: &'a mut dyn StepObserver,
}

/// One request's outcome in a batched run: its images, or the error that is the request's own (invalid or
/// incompatible request, cancelled by its observer, its decode failed).
pub type RequestOutcome = Result<Vec<image::RgbImage>, PipelineError>;

/// Per-request outcomes of a batched run, in the order of the entries.
pub type BatchOutcome = Vec<RequestOutcome>;

/// One text-to-image pipeline. Owned and called by the single model thread of a worker; never from async code.
pub trait ImagePipeline: Send {
    /// Generates `req.num_images` RGB images of exactly `req.width × req.height`.
    fn generate(
        &mut self,
        req: &GenerateRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<image::RgbImage>, PipelineError>;

    /// The batch `req` can join (requests with equal keys can run as one batch), or why `req` cannot
    /// run on this pipeline at all (`InvalidRequest`: the request's own failure).
    fn batch_key(&self, req: &GenerateRequest) -> Result<BatchKey, PipelineError>;

    /// Runs compatible requests as one batch: each request's images are those its solo
    /// [`ImagePipeline::generate`] gives (the implementation states the bound), each observer sees its
    /// own request's steps, and an observer that cancels takes only its request out of the batch.
    ///
    /// Each request's outcome goes to `done(entry index, outcome)` as soon as it is final, not when the
    /// batch ends: a request that cannot run or is cancelled when it leaves, a completed one right after
    /// its own images are decoded (the sampling steps are shared; the decodes run one request after
    /// another, so the first request's answer need not wait for the last one's decode).
    /// `Ok` = every entry was handed exactly once. `Err` = the batch as a whole failed (a model or device
    /// error); the entries not handed before it failed with it (the caller may retry them one by one).
    /// The default runs the entries one after another.
    fn generate_batch_each(
        &mut self,
        batch: &mut [BatchEntry<'_>],
        done: &mut dyn FnMut(usize, RequestOutcome),
    ) -> Result<(), PipelineError> {
        for (i, entry) in batch.iter_mut().enumerate() {
            match self.generate(entry.request, &mut *entry.observer) {
                Err(PipelineError::Candle(e)) => return Err(PipelineError::Candle(e)),
                other => done(i, other),
            }
        }
        Ok(())
    }

    /// [`ImagePipeline::generate_batch_each`], with the outcomes collected in entry order.
    fn generate_batch(
        &mut self,
        batch: &mut [BatchEntry<'_>],
    ) -> Result<BatchOutcome, PipelineError> {
        let mut slots: Vec<Option<RequestOutcome>> = batch.iter().map(|_| None).collect();
        self.generate_batch_each(batch, &mut |i, outcome| slots[i] = Some(outcome))?;
        Ok(slots
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(PipelineError::InvalidRequest(
                        "the batch gave this request no outcome".into(),
                    ))
                })
            })
            .collect())
    }
}
