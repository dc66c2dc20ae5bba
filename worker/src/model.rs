//! The model thread (STYLE "Concurrency"; TEI `backends/src/lib.rs`): one named OS thread owns the
//! pipelines and the safety checker, fed by a bounded channel, replying through `oneshot`. Async code
//! never runs a model forward. Models are loaded through a [`PipelineFactory`] so the binary plugs in the
//! real Sana pipelines and tests plug in a deterministic stand-in; unloading drops them (keep-alive
//! `unload`) and the next job loads them again. Jobs waiting for the thread are run in batches of up to
//! `max_batch` compatible ones ([`crate::batch`]); with `max_batch = 1` one at a time, in arrival order.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::batch::{self, Batching};
use crate::safety::{SafetyChecker, SafetyError};
use fleet::job::{EndpointKind, JobInput};
use sana_pipelines::{GenerateRequest, ImagePipeline, PipelineError, PipelineKind, StepObserver};

/// The pipeline that serves an endpoint kind: the service's routing key and the model library's
/// pipelines correspond one to one.
pub fn pipeline_kind(kind: EndpointKind) -> PipelineKind {
    match kind {
        EndpointKind::Base => PipelineKind::Base,
        EndpointKind::Sprint => PipelineKind::Sprint,
    }
}

/// The one translation of a validated job input into a pipeline request (worker jobs, `worker generate`).
pub fn generate_request(kind: EndpointKind, input: &JobInput) -> GenerateRequest {
    GenerateRequest {
        endpoint: pipeline_kind(kind),
        prompt: input.prompt.clone(),
        negative_prompt: input.negative_prompt.clone(),
        width: input.image_size.width,
        height: input.image_size.height,
        num_inference_steps: input.num_inference_steps,
        guidance_scale: input.guidance_scale,
        seed: input.seed,
        num_images: input.num_images,
    }
}

/// The pipelines of one worker, looked up by endpoint kind (the real set shares one text encoder
/// between its two pipelines, so it cannot be split into independent boxes).
pub trait PipelineSet: Send {
    fn pipeline(&mut self, kind: EndpointKind) -> Option<&mut dyn ImagePipeline>;
    /// The same pipeline, read-only (its batch key).
    fn pipeline_ref(&self, kind: EndpointKind) -> Option<&dyn ImagePipeline>;
}

impl PipelineSet for HashMap<EndpointKind, Box<dyn ImagePipeline>> {
    fn pipeline(&mut self, kind: EndpointKind) -> Option<&mut dyn ImagePipeline> {
        self.get_mut(&kind)
            .map(|p| p.as_mut() as &mut dyn ImagePipeline)
    }

    fn pipeline_ref(&self, kind: EndpointKind) -> Option<&dyn ImagePipeline> {
        self.get(&kind).map(|p| p.as_ref() as &dyn ImagePipeline)
    }
}

impl PipelineSet for sana_pipelines::sana::Pipelines {
    fn pipeline(&mut self, kind: EndpointKind) -> Option<&mut dyn ImagePipeline> {
        self.get_mut(pipeline_kind(kind))
    }

    fn pipeline_ref(&self, kind: EndpointKind) -> Option<&dyn ImagePipeline> {
        self.get(pipeline_kind(kind))
    }
}

/// Everything one worker runs: its pipelines and the NSFW checker.
pub struct LoadedModels {
    pub pipelines: Box<dyn PipelineSet>,
    pub safety: Box<dyn SafetyChecker>,
}

/// Loads the models. Called on the model thread, at start and again after an unload.
pub trait PipelineFactory: Send + 'static {
    /// Loads a pipeline for each of `endpoints` plus the safety checker; failure keeps the worker from
    /// starting (or fails the job that asked for a reload).
    fn load(&mut self, endpoints: &[EndpointKind]) -> Result<LoadedModels, PipelineError>;
}

/// Why the model thread produced no images.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Safety(#[from] SafetyError),
    /// The model thread is gone (the worker is shutting down).
    #[error("model thread stopped")]
    Stopped,
    /// The models panicked on this job. The panic was caught on the model thread, which dropped the
    /// models (a panic may leave them half-updated; the next job loads them again) and serves on.
    #[error("the model panicked: {0}")]
    Panicked(String),
}

impl ModelError {
    /// True when another attempt (on this or another worker) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ModelError::Pipeline(PipelineError::Cancelled) => false,
            ModelError::Pipeline(PipelineError::InvalidRequest(_)) => false,
            // A load failure is a deployment problem of this worker; another worker may have the models.
            ModelError::Pipeline(PipelineError::Load(_)) => true,
            ModelError::Pipeline(PipelineError::Candle(_)) => true,
            ModelError::Safety(SafetyError::Load(_)) => true,
            ModelError::Safety(SafetyError::Input(_)) => false,
            ModelError::Safety(SafetyError::Candle(_)) => true,
            ModelError::Stopped => true,
            // A panic is a bug this input reaches; another attempt would most likely hit it again.
            ModelError::Panicked(_) => false,
        }
    }
}

/// Images of one run, after the safety check (flagged ones already blacked out).
#[derive(Debug)]
pub struct GenerateOutput {
    pub images: Vec<RgbImage>,
    pub has_nsfw_concepts: Vec<bool>,
    /// Seconds spent in the pipeline and the checker (for a batch: the batch's pipeline run and this
    /// request's check).
    pub inference_time: f64,
    /// Requests in the batch this one ran in (1 = alone).
    pub batch_size: usize,
}

/// One generation request for the model thread.
pub struct GenerateJob {
    /// The job's endpoint: which pipeline of the set runs `request`.
    pub endpoint: EndpointKind,
    pub request: GenerateRequest,
    /// `enable_safety_checker` of the request; false = all flags false, no checker call.
    pub check_safety: bool,
    /// Checked between denoising steps; cancelled = stop with `PipelineError::Cancelled`.
    pub cancel: CancellationToken,
    /// `(step, total, time since the previous step or the run's start)` after each step; best effort
    /// (a full channel drops the update).
    pub progress: mpsc::Sender<(u32, u32, Duration)>,
    /// Fired when the model thread takes this job up (before loading or running anything), so
    /// `started` means the GPU works on it, not that it waits behind another job.
    pub started: oneshot::Sender<()>,
}

pub(crate) enum Command {
    Load(oneshot::Sender<Result<(), ModelError>>),
    Generate(
        Box<GenerateJob>,
        oneshot::Sender<Result<GenerateOutput, ModelError>>,
    ),
    Unload(oneshot::Sender<()>),
}

/// Handle to the model thread; cheap to clone. The thread ends when every handle is dropped.
#[derive(Clone)]
pub struct ModelHandle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelHandle")
    }
}

impl ModelHandle {
    /// Spawns the thread `fleet-model`; nothing is loaded until [`ModelHandle::load`] or the first job.
    /// `queue_depth` bounds the jobs waiting for the thread; `batching` says how it groups them.
    pub fn spawn(
        factory: Box<dyn PipelineFactory>,
        endpoints: Vec<EndpointKind>,
        queue_depth: usize,
        batching: Batching,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(queue_depth.max(1));
        // Only for waiting on the channel with a timeout while a batch fills (`batch_wait`).
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let inbox = Inbox {
            rx,
            pending: VecDeque::new(),
            timer,
        };
        std::thread::Builder::new()
            .name("fleet-model".into())
            .spawn(move || model_loop(factory, endpoints, inbox, batching))?;
        Ok(ModelHandle { tx })
    }

    /// Loads the models now (a no-op when they are loaded).
    pub async fn load(&self) -> Result<(), ModelError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Load(reply))
            .await
            .map_err(|_| ModelError::Stopped)?;
        rx.await.map_err(|_| ModelError::Stopped)?
    }

    /// Runs one job (loading the models first if they were unloaded).
    pub async fn generate(&self, job: GenerateJob) -> Result<GenerateOutput, ModelError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Generate(Box::new(job), reply))
            .await
            .map_err(|_| ModelError::Stopped)?;
        rx.await.map_err(|_| ModelError::Stopped)?
    }

    /// Drops the models (keep-alive `unload`); returns once they are freed.
    pub async fn unload(&self) -> Result<(), ModelError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Unload(reply))
            .await
            .map_err(|_| ModelError::Stopped)?;
        rx.await.map_err(|_| ModelError::Stopped)
    }
}

pub(crate) struct Observer<'a> {
    pub(crate) cancel: &'a CancellationToken,
    pub(crate) progress: &'a mpsc::Sender<(u32, u32, Duration)>,
    /// When the previous step ended (the run's start before the first).
    pub(crate) last: Instant,
}

impl StepObserver for Observer<'_> {
    fn on_step(&mut self, step: u32, total: u32) -> Result<(), PipelineError> {
        let now = Instant::now();
        let took = now - self.last;
        self.last = now;
        // Progress is advisory: never block the GPU thread on a slow publisher.
        let _ = self.progress.try_send((step, total, took));
        if self.cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        Ok(())
    }
}

pub(crate) fn ensure_loaded<'a>(
    models: &'a mut Option<LoadedModels>,
    factory: &mut dyn PipelineFactory,
    endpoints: &[EndpointKind],
) -> Result<&'a mut LoadedModels, ModelError> {
    if models.is_none() {
        let started = Instant::now();
        *models = Some(factory.load(endpoints)?);
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "models loaded");
    }
    models.as_mut().ok_or(ModelError::Stopped)
}

/// Runs `f` on the model thread, turning a panic into [`ModelError::Panicked`] for this command only:
/// the thread keeps serving, so one bad job cannot turn the worker into a black hole that consumes and
/// fails everything after it. The models are dropped after a panic and reloaded on demand.
pub(crate) fn guarded<T>(
    models: &mut Option<LoadedModels>,
    f: impl FnOnce(&mut Option<LoadedModels>) -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(models))) {
        Ok(result) => result,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            tracing::error!(
                panic = what,
                "the model thread caught a panic; failing this job and dropping the models"
            );
            *models = None;
            Err(ModelError::Panicked(what))
        }
    }
}

/// The thread's side of the channel: commands already received but not run yet stay in `pending`, in
/// arrival order, so a batch can be picked from them.
pub(crate) struct Inbox {
    rx: mpsc::Receiver<Command>,
    pub(crate) pending: VecDeque<Command>,
    timer: tokio::runtime::Runtime,
}

impl Inbox {
    /// Moves every command already in the channel to `pending` (bounded: every waiting job holds one of
    /// the worker's permits).
    fn drain(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            self.pending.push_back(cmd);
        }
    }

    /// The oldest command, waiting for one when none is pending; `None` once every handle is gone.
    fn next(&mut self) -> Option<Command> {
        if self.pending.is_empty() {
            let cmd = self.rx.blocking_recv()?;
            self.pending.push_back(cmd);
        }
        self.drain();
        self.pending.pop_front()
    }

    /// The next command to arrive within `wait` (pending ones are not looked at).
    pub(crate) fn recv_within(&mut self, wait: Duration) -> Option<Command> {
        let rx = &mut self.rx;
        self.timer
            .block_on(async { tokio::time::timeout(wait, rx.recv()).await.ok().flatten() })
    }
}

fn model_loop(
    mut factory: Box<dyn PipelineFactory>,
    endpoints: Vec<EndpointKind>,
    mut inbox: Inbox,
    batching: Batching,
) {
    let mut models: Option<LoadedModels> = None;
    while let Some(cmd) = inbox.next() {
        match cmd {
            Command::Load(reply) => {
                let result = guarded(&mut models, |models| {
                    ensure_loaded(models, factory.as_mut(), &endpoints).map(|_| ())
                });
                let _ = reply.send(result);
            }
            Command::Generate(job, reply) => {
                let batch = batch::collect(
                    &mut inbox,
                    &mut models,
                    factory.as_mut(),
                    &endpoints,
                    batching,
                    (job, reply),
                );
                batch::run(&mut models, factory.as_mut(), &endpoints, batch);
            }
            Command::Unload(reply) => {
                if models.take().is_some() {
                    tracing::info!("models unloaded");
                }
                let _ = reply.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_endpoint_maps_to_its_pipeline_with_the_same_default_steps() {
        for kind in EndpointKind::ALL {
            let pipeline = pipeline_kind(kind);
            assert_eq!(pipeline.as_str(), kind.as_str());
            assert_eq!(pipeline.default_steps(), kind.default_steps());
        }
    }
}
