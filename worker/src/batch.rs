//! Cross-request batching on the model thread (issue 14).
//!
//! The thread takes the oldest waiting job (FIFO: no request waits behind younger ones, so none starves)
//! and adds, from the jobs already waiting and then from those arriving within `batch_wait`, up to
//! `max_batch − 1` jobs with the same [`BatchKey`] (endpoint, binned size, steps, CFG on/off; see
//! `sana_pipelines::BatchKey`). Incompatible jobs keep their place in the queue. The batch then runs as
//! one `ImagePipeline::generate_batch_each`: `started` is signalled for each job, progress goes to each
//! job's own channel, and each job is safety-checked on its own and answered on its own reply as soon as
//! its images are decoded (the decodes run one request after another after the shared steps, so the
//! first job of a batch of k is answered k − 1 decodes before the last).
//!
//! Failures: a job cancelled before or during the run leaves alone (the others keep their values); a
//! failure that is one request's own (invalid request, its decode, its safety check) fails only it; a
//! batch that fails on the model (a tensor error or a panic) is run again request by request (those not
//! answered yet), so the job that breaks the model fails alone and the others complete. `max_batch = 1` is the old behaviour:
//! one job at a time, in arrival order.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::model::{
    ensure_loaded, guarded, Command, GenerateJob, GenerateOutput, Inbox, LoadedModels, ModelError,
    Observer, PipelineFactory,
};
use crate::safety;
use fleet::job::EndpointKind;
use sana_pipelines::{BatchEntry, BatchKey, PipelineError};

/// How the model thread groups waiting jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most requests in one batch (1 = no batching).
    pub max_batch: usize,
    /// How long to wait for more compatible jobs when fewer than `max_batch` are waiting
    /// (0 = only what is already queued).
    pub batch_wait: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_batch: 1,
            batch_wait: Duration::ZERO,
        }
    }
}

/// A job waiting for the model thread and its reply.
pub(crate) type Waiting = (
    Box<GenerateJob>,
    oneshot::Sender<Result<GenerateOutput, ModelError>>,
);

fn key_of(models: &LoadedModels, job: &GenerateJob) -> Option<BatchKey> {
    if job.cancel.is_cancelled() {
        return None;
    }
    models
        .pipelines
        .pipeline_ref(job.endpoint)?
        .batch_key(&job.request)
        .ok()
}

/// The batch headed by `head` (the oldest waiting job): compatible jobs from `inbox`, then arriving ones
/// within `batching.batch_wait`, up to `batching.max_batch` in all.
pub(crate) fn collect(
    inbox: &mut Inbox,
    models: &mut Option<LoadedModels>,
    factory: &mut dyn PipelineFactory,
    endpoints: &[EndpointKind],
    batching: Batching,
    head: Waiting,
) -> Vec<Waiting> {
    let mut batch = vec![head];
    if batching.max_batch <= 1 {
        return batch;
    }
    // The key needs the loaded pipelines (the binned size); when they do not load, or the head has no
    // key (invalid, cancelled), the head runs alone and fails there with its own error.
    if guarded(models, |m| {
        ensure_loaded(m, &mut *factory, endpoints).map(|_| ())
    })
    .is_err()
    {
        return batch;
    }
    let Some(m) = models.as_ref() else {
        return batch;
    };
    let Some(key) = key_of(m, &batch[0].0) else {
        return batch;
    };
    let mut i = 0;
    while batch.len() < batching.max_batch && i < inbox.pending.len() {
        let fits =
            matches!(&inbox.pending[i], Command::Generate(job, _) if key_of(m, job) == Some(key));
        match fits.then(|| inbox.pending.remove(i)).flatten() {
            Some(Command::Generate(job, reply)) => batch.push((job, reply)),
            Some(other) => {
                inbox.pending.insert(i, other);
                i += 1;
            }
            None => i += 1,
        }
    }
    if batching.batch_wait.is_zero() {
        return batch;
    }
    let deadline = Instant::now() + batching.batch_wait;
    while batch.len() < batching.max_batch {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match inbox.recv_within(left) {
            None => break,
            Some(Command::Generate(job, reply)) if key_of(m, &job) == Some(key) => {
                batch.push((job, reply))
            }
            Some(other) => inbox.pending.push_back(other),
        }
    }
    batch
}

/// The reply of a job not answered yet (`None` once answered).
type Reply = Option<oneshot::Sender<Result<GenerateOutput, ModelError>>>;

/// Runs `batch` and answers every job: as one batch (each job as soon as its own images are checked),
/// then, when the batch fails on the model, the jobs not answered yet one by one.
pub(crate) fn run(
    models: &mut Option<LoadedModels>,
    factory: &mut dyn PipelineFactory,
    endpoints: &[EndpointKind],
    batch: Vec<Waiting>,
) {
    let mut jobs = Vec::with_capacity(batch.len());
    let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
    for (mut job, reply) in batch {
        // `started` = the thread works on this job now (before loading or running anything).
        let (signal, _) = oneshot::channel();
        let _ = std::mem::replace(&mut job.started, signal).send(());
        jobs.push(job);
        replies.push(Some(reply));
    }
    let size = jobs.len();
    if size > 1 {
        tracing::info!(size, endpoint = %jobs[0].endpoint, "running a batch");
    }
    let result = guarded(models, |m| {
        ensure_loaded(m, &mut *factory, endpoints).and_then(|m| run_batch(m, &jobs, &mut replies))
    });
    let Err(e) = result else { return };
    if size == 1 {
        if let Some(reply) = replies.pop().flatten() {
            let _ = reply.send(Err(e));
        }
        return;
    }
    let left = replies.iter().filter(|r| r.is_some()).count();
    tracing::warn!(size, left, error = %e, "the batch failed on the model; running its unanswered requests one by one");
    for (job, reply) in jobs.iter().zip(replies.iter_mut()) {
        if reply.is_none() {
            continue;
        }
        let mut one = [reply.take()];
        let solo = guarded(models, |m| {
            ensure_loaded(m, &mut *factory, endpoints)
                .and_then(|m| run_batch(m, std::slice::from_ref(job), &mut one))
        });
        if let (Err(e), Some(reply)) = (solo, one[0].take()) {
            let _ = reply.send(Err(e));
        }
    }
}

/// One pipeline run over `jobs` (all for the same endpoint), each job answered on its reply as soon as
/// its images are safety-checked. `Err` = the run failed as a whole; the jobs whose reply is still
/// `Some` were not answered.
fn run_batch(
    models: &mut LoadedModels,
    jobs: &[Box<GenerateJob>],
    replies: &mut [Reply],
) -> Result<(), ModelError> {
    let started = Instant::now();
    let mut answer = |i: usize, outcome: Result<GenerateOutput, ModelError>| {
        if let Some(reply) = replies[i].take() {
            let _ = reply.send(outcome);
        }
    };
    let mut runnable = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        if job.cancel.is_cancelled() {
            answer(i, Err(PipelineError::Cancelled.into()));
        } else {
            runnable.push(i);
        }
    }
    let Some(&first) = runnable.first() else {
        return Ok(());
    };
    let endpoint = jobs[first].endpoint;
    let LoadedModels { pipelines, safety } = models;
    let pipeline = pipelines.pipeline(endpoint).ok_or_else(|| {
        PipelineError::InvalidRequest(format!(
            "this worker does not serve the {endpoint} endpoint"
        ))
    })?;
    let mut observers: Vec<Observer<'_>> = runnable
        .iter()
        .map(|&i| Observer {
            cancel: &jobs[i].cancel,
            progress: &jobs[i].progress,
            last: std::time::Instant::now(),
        })
        .collect();
    let mut entries: Vec<BatchEntry<'_>> = runnable
        .iter()
        .zip(observers.iter_mut())
        .map(|(&i, observer)| BatchEntry {
            request: &jobs[i].request,
            observer,
        })
        .collect();
    let batch_size = runnable.len();
    pipeline.generate_batch_each(&mut entries, &mut |entry, result| {
        let i = runnable[entry];
        let outcome = result.map_err(ModelError::from).and_then(|mut images| {
            let flags = if jobs[i].check_safety {
                safety.check(&images)?
            } else {
                vec![false; images.len()]
            };
            safety::apply(&mut images, &flags);
            Ok(GenerateOutput {
                images,
                has_nsfw_concepts: flags,
                // From the batch's start to this job's checked images: its share of the shared steps,
                // the decodes before its own, its decode and its check.
                inference_time: started.elapsed().as_secs_f64(),
                batch_size,
            })
        });
        answer(i, outcome);
    })?;
    Ok(())
}
