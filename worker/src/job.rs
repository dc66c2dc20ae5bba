//! One job from delivery to settlement (service-contract §6): parse, dedupe against the results stream,
//! deadline, re-validation, `started`, generation with `progress` and cancellation, safety, encode, upload,
//! `completed` (confirmed) and only then the ack. Failures: retryable → requeue while the quorum queue's
//! delivery count is below its limit; permanent or out of attempts → `failed` (billing 0), then reject
//! without requeue, which dead-letters the message to `{prefix}.dead`.
//!
//! Outages are ridden out where the work is, not by generating again: an upload that fails because the
//! store is unavailable is retried with exponential backoff for `upload_retry_for` while the encoded
//! images stay in memory (then `failed` with `storage_error`), and a `completed` that cannot be published
//! because the broker is away is retried until it is back (bounded by [`PUBLISH_RETRY_FOR`]). One job per
//! request id runs at a time in a worker ([`RunningIds`]): the broker's redelivery of a job whose channel
//! died while it ran waits for that run, then finds the request ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::model::{generate_request, GenerateJob, GenerateOutput, ModelError, ModelHandle};
use super::status::{Outcome, WorkerStatus};
use super::tracker::Tracker;
use fleet::events::{
    now_unix, Completed, ErrorType, Event, EventBody, JobMessage, Progress, Started,
};
use fleet::job::{revalidate, EndpointKind, OutputFormat};
use fleet::queue::{
    delivery_attempt, header_str, message_id, Backoff, Publisher, QueueError, HEADER_ENDPOINT,
};
use fleet::storage::{object_key, Storage, StorageError, StoredObject};
use sana_pipelines::{GenerateRequest, PipelineError};

/// What a job shares with the rest of the worker.
pub(crate) struct JobContext {
    pub publisher: Publisher,
    pub tracker: Tracker,
    pub model: ModelHandle,
    pub storage: Arc<Storage>,
    pub worker_id: String,
    pub delivery_limit: u32,
    /// Cancelled when the drain grace period is over: running jobs stop and are requeued.
    pub hard_stop: CancellationToken,
    /// Pause before requeueing a retryable failure.
    pub retry_backoff: Duration,
    /// Bytes one request's images may take ([`image_memory_need`]).
    pub image_memory_budget: u64,
    /// How long an upload to an unavailable store is retried before the job fails.
    pub upload_retry_for: Duration,
    /// Request ids with a job running in this worker.
    pub running: RunningIds,
    /// Job counts and durations for `/metrics`.
    pub status: Arc<WorkerStatus>,
}

/// Longest time a `completed` event is retried while the broker is away. Past it the attempt fails as
/// retryable and the broker's redelivery generates again.
pub(crate) const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(300);

/// One async lock per request id with a job running in this worker, so a redelivery of the same job
/// (its first channel died while it ran) waits for the first run instead of generating beside it.
#[derive(Default)]
pub(crate) struct RunningIds(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl RunningIds {
    /// Holds the request's lock until the returned guard is dropped.
    async fn hold(&self, request_id: &str) -> RunningIdGuard<'_> {
        let lock = self
            .map()
            .entry(request_id.to_string())
            .or_default()
            .clone();
        let (guard, waited) = match lock.clone().try_lock_owned() {
            Ok(guard) => (guard, false),
            Err(_) => (lock.clone().lock_owned().await, true),
        };
        RunningIdGuard {
            ids: self,
            request_id: request_id.to_string(),
            lock,
            guard: Some(guard),
            waited,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        // Only plain map operations happen under this lock; a poisoned map is still consistent.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct RunningIdGuard<'a> {
    ids: &'a RunningIds,
    request_id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// Another job of the same request held the lock first.
    waited: bool,
}

impl Drop for RunningIdGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.ids.map();
        // The map's entry and ours are the only references left: nobody else waits on this id.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.request_id);
        }
    }
}

/// Host bytes a request's images take at most: each output image as RGB `u8` (3 bytes per pixel, held
/// until upload) plus one more while it is encoded. The pipelines stream large outputs into `u8`
/// (`sana_pipelines::image_ops::resize_crop_to_rgb`), so nothing else grows with the output size.
pub fn image_memory_need(width: u32, height: u32, num_images: u32) -> u64 {
    3 * u64::from(width) * u64::from(height) * (u64::from(num_images) + 1)
}

/// How the delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    Requeue,
    DeadLetter,
}

/// Why a run failed after `started`.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The store stayed unavailable for the whole upload retry window.
    #[error("gave up uploading after {0:?}: {1}")]
    StorageGaveUp(Duration, StorageError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("image encoding: {0}")]
    Encode(String),
}

impl JobError {
    fn is_retryable(&self) -> bool {
        match self {
            JobError::Queue(e) => e.is_retryable(),
            JobError::Storage(e) => e.is_retryable(),
            JobError::StorageGaveUp(..) => false,
            JobError::Model(e) => e.is_retryable(),
            JobError::Encode(_) => false,
        }
    }

    fn error_type(&self) -> ErrorType {
        match self {
            JobError::Model(ModelError::Pipeline(PipelineError::InvalidRequest(_))) => {
                ErrorType::BadRequest
            }
            JobError::Storage(_) | JobError::StorageGaveUp(..) => ErrorType::StorageError,
            JobError::Model(_) | JobError::Queue(_) | JobError::Encode(_) => {
                ErrorType::RunnerServerError
            }
        }
    }
}

/// Runs one delivery to its settlement and settles it.
pub(crate) async fn handle(ctx: &JobContext, delivery: Delivery) {
    let taken = Instant::now();
    let (settle, endpoint, outcome) = process(ctx, &delivery).await;
    if settle == Settle::Requeue && !ctx.retry_backoff.is_zero() && !ctx.hard_stop.is_cancelled() {
        tokio::time::sleep(ctx.retry_backoff).await;
    }
    let result = match settle {
        Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
        Settle::DeadLetter => delivery.reject(BasicRejectOptions { requeue: false }).await,
    };
    match result {
        Ok(_) => tracing::debug!(?settle, "delivery settled"),
        // The channel is gone: the broker redelivers the unsettled message, and dedupe covers a completed one.
        Err(e) => tracing::warn!(?settle, error = %e, "could not settle the delivery"),
    }
    ctx.status.job_settled(endpoint, outcome, taken.elapsed());
}

/// The outcome of a settlement that is not an ack (an ack's outcome depends on why).
fn not_acked(settle: Settle) -> (Settle, Outcome) {
    match settle {
        Settle::Requeue => (settle, Outcome::Requeued),
        Settle::DeadLetter => (settle, Outcome::Failed),
        Settle::Ack => (settle, Outcome::Skipped),
    }
}

async fn process(ctx: &JobContext, delivery: &Delivery) -> (Settle, Option<EndpointKind>, Outcome) {
    let attempt = delivery_attempt(&delivery.properties);
    let job: JobMessage = match serde_json::from_slice(&delivery.data) {
        Ok(job) => job,
        Err(e) => {
            let (settle, outcome) = not_acked(malformed(ctx, delivery, &e.to_string()).await);
            return (settle, None, outcome);
        }
    };
    let span = tracing::info_span!("job", request_id = %job.request_id, endpoint = %job.endpoint, attempt,
        worker = %ctx.worker_id);
    let (settle, outcome) = tracing::Instrument::instrument(run(ctx, &job, attempt), span).await;
    (settle, Some(job.endpoint), outcome)
}

/// A body that is not a job: fail it (when it names a request) and dead-letter it.
async fn malformed(ctx: &JobContext, delivery: &Delivery, why: &str) -> Settle {
    tracing::warn!(error = why, "malformed job message");
    let id = message_id(&delivery.properties);
    let kind = header_str(&delivery.properties, HEADER_ENDPOINT)
        .and_then(|k| k.parse::<EndpointKind>().ok());
    if let (Some(id), Some(kind)) = (id, kind) {
        let event = Event::failed(id, kind, ErrorType::BadRequest, "malformed job message");
        if let Err(e) = publish_failed(ctx, event).await {
            tracing::warn!(error = %e, "could not publish the failed event; requeueing");
            return Settle::Requeue;
        }
    }
    Settle::DeadLetter
}

async fn publish_failed(ctx: &JobContext, mut event: Event) -> Result<(), QueueError> {
    if let EventBody::Failed(failure) = &mut event.body {
        failure.worker = Some(ctx.worker_id.clone());
    }
    ctx.publisher.publish_event(&event).await
}

async fn run(ctx: &JobContext, job: &JobMessage, attempt: u32) -> (Settle, Outcome) {
    if let Some(settle) = already_ended(ctx, job).await {
        return not_acked(settle);
    }
    // A run of the same request in this worker (its delivery's channel died) finishes first; what it
    // published decides whether this one runs at all.
    let one_at_a_time = ctx.running.hold(&job.request_id).await;
    if one_at_a_time.waited {
        if let Some(settle) = already_ended(ctx, job).await {
            return not_acked(settle);
        }
    }
    if let Some(deadline) = job.deadline {
        if now_unix() > deadline && job.deadline_timer {
            // The dispatcher's broker-side timer is the one writer of this request's timeout
            // (`fleet::queue::DeadlineTimer`); publishing it here too could race that timer.
            tracing::info!("start deadline passed; skipping (the deadline timer times it out)");
            return not_acked(Settle::Ack);
        }
        if now_unix() > deadline {
            let event = Event::failed(
                &job.request_id,
                job.endpoint,
                ErrorType::RequestTimeout,
                "the request was not started before its deadline",
            );
            return match publish_failed(ctx, event).await {
                Ok(()) => (Settle::Ack, Outcome::Failed),
                Err(_) => (Settle::Requeue, Outcome::Requeued),
            };
        }
    }
    let input = match revalidate(job.endpoint, &job.input) {
        Ok(input) => input,
        Err(v) => {
            let mut event = Event::failed(
                &job.request_id,
                job.endpoint,
                ErrorType::ValidationError,
                v.to_string(),
            );
            if let EventBody::Failed(failure) = &mut event.body {
                failure.detail = Some(v.to_body()["detail"].clone());
            }
            return match publish_failed(ctx, event).await {
                Ok(()) => not_acked(Settle::DeadLetter),
                Err(_) => not_acked(Settle::Requeue),
            };
        }
    };
    let request = generate_request(job.endpoint, &input);
    let need = image_memory_need(request.width, request.height, request.num_images);
    if need > ctx.image_memory_budget {
        let event = Event::failed(
            &job.request_id,
            job.endpoint,
            ErrorType::ValidationError,
            format!(
                "{} image(s) of {}x{} need {} MiB of worker memory; this worker allows {} MiB: \
                 ask for fewer or smaller images",
                request.num_images,
                request.width,
                request.height,
                need.div_ceil(1 << 20),
                ctx.image_memory_budget >> 20
            ),
        );
        return match publish_failed(ctx, event).await {
            Ok(()) => not_acked(Settle::DeadLetter),
            Err(_) => not_acked(Settle::Requeue),
        };
    }
    let cancel = ctx.hard_stop.child_token();
    let _running = ctx
        .tracker
        .register_running(&job.request_id, cancel.clone());
    let job = JobMessage {
        input,
        ..job.clone()
    };
    match execute(ctx, &job, attempt, cancel).await {
        Ok(()) => (Settle::Ack, Outcome::Completed),
        Err(JobError::Model(ModelError::Pipeline(PipelineError::Cancelled)))
            if ctx.hard_stop.is_cancelled() =>
        {
            tracing::info!("stopped by shutdown; requeueing");
            (Settle::Requeue, Outcome::Requeued)
        }
        Err(JobError::Model(ModelError::Pipeline(PipelineError::Cancelled))) => {
            tracing::info!("request ended elsewhere (cancelled, timed out, or completed by another worker); stopped");
            (Settle::Ack, Outcome::Cancelled)
        }
        Err(e) => not_acked(failure(ctx, &job, attempt, e).await),
    }
}

/// Dedupe against the results stream: `Ack` when the request already ended, `Requeue` when the stream
/// cannot be synced, `None` to go on.
async fn already_ended(ctx: &JobContext, job: &JobMessage) -> Option<Settle> {
    if let Err(e) = ctx.tracker.sync().await {
        tracing::warn!(error = %e, "results stream not caught up; requeueing");
        return Some(Settle::Requeue);
    }
    if let Some(kind) = ctx.tracker.terminal(&job.request_id) {
        tracing::info!(already = kind.as_str(), "request already ended; skipping");
        return Some(Settle::Ack);
    }
    None
}

async fn failure(ctx: &JobContext, job: &JobMessage, attempt: u32, err: JobError) -> Settle {
    // x-delivery-count = attempt - 1; the broker drops the message once it exceeds the limit.
    let attempts_left = attempt <= ctx.delivery_limit;
    if err.is_retryable() && attempts_left {
        tracing::warn!(error = %err, "attempt failed; requeueing");
        return Settle::Requeue;
    }
    tracing::error!(error = %err, retryable = err.is_retryable(), "job failed for good; dead-lettering");
    // Internal causes stay in the log; the client gets a generic message.
    let error_type = err.error_type();
    let message = match error_type {
        ErrorType::StorageError => "the generated images could not be stored",
        _ => "image generation failed",
    };
    let event = Event::failed(&job.request_id, job.endpoint, error_type, message);
    match publish_failed(ctx, event).await {
        Ok(()) => Settle::DeadLetter,
        Err(e) => {
            tracing::warn!(error = %e, "could not publish the failed event; requeueing");
            Settle::Requeue
        }
    }
}

async fn execute(
    ctx: &JobContext,
    job: &JobMessage,
    attempt: u32,
    cancel: CancellationToken,
) -> Result<(), JobError> {
    let input = &job.input;
    let request = generate_request(job.endpoint, input);
    let output = generate_with_progress(ctx, job, attempt, request, cancel).await?;
    ended_elsewhere(ctx, job)?;

    let format = input.output_format;
    let images = output.images;
    let encoded = tokio::task::spawn_blocking(move || encode_all(&images, format))
        .await
        .map_err(|e| JobError::Encode(format!("encoder task: {e}")))??;

    let uploads = encoded.into_iter().enumerate().map(|(i, (bytes, w, h))| {
        let key = object_key(job.endpoint, &job.request_id, i, format.extension());
        async move {
            let stored = upload(ctx, &key, bytes, format.content_type()).await?;
            Ok::<_, JobError>(json!({
                "url": stored.url,
                "width": w,
                "height": h,
                "content_type": stored.content_type,
                "file_name": format!("{i}.{}", format.extension()),
                "file_size": stored.size,
            }))
        }
    });
    let images: Vec<Value> = futures::future::try_join_all(uploads).await?;
    // Checked again right before `completed`: one terminal event per request wherever the tracker saw
    // the other one in time (a duplicate is left only to a race within this gap; readers keep the first).
    ended_elsewhere(ctx, job)?;

    let result = json!({
        "images": images,
        "seed": input.seed,
        "has_nsfw_concepts": output.has_nsfw_concepts,
        "prompt": input.prompt,
        "timings": {"inference": output.inference_time},
    });
    let completed = EventBody::Completed(Completed {
        worker: ctx.worker_id.clone(),
        attempt,
        result,
        billable_units: input.billable_units(),
        inference_time: output.inference_time,
    });
    let completed = Event::new(&job.request_id, job.endpoint, completed);
    publish_retrying(ctx, &completed).await?;
    ctx.status.inference(job.endpoint, output.inference_time);
    tracing::info!(
        inference_time = output.inference_time,
        batch_size = output.batch_size,
        units = input.billable_units(),
        "completed"
    );
    Ok(())
}

/// `Cancelled` when the request ended while this worker ran it (cancelled, timed out, or completed by
/// another worker running a redelivered copy): its run stops without a second terminal event.
fn ended_elsewhere(ctx: &JobContext, job: &JobMessage) -> Result<(), JobError> {
    match ctx.tracker.terminal(&job.request_id) {
        Some(kind) => {
            tracing::info!(
                ended = kind.as_str(),
                "request ended elsewhere while running; stopping"
            );
            Err(JobError::Model(ModelError::Pipeline(
                PipelineError::Cancelled,
            )))
        }
        None => Ok(()),
    }
}

/// Uploads one object, retrying while the store is unavailable (exponential backoff from 0.5 s to 15 s,
/// for at most `upload_retry_for`); the bytes stay in memory meanwhile. Other errors return at once.
async fn upload(
    ctx: &JobContext,
    key: &str,
    bytes: Vec<u8>,
    content_type: &str,
) -> Result<StoredObject, JobError> {
    let first_failure = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
    let mut tries = 0u32;
    loop {
        tries += 1;
        let err = match ctx
            .storage
            .put_object(key, bytes.clone(), content_type)
            .await
        {
            Ok(stored) => {
                if tries > 1 {
                    tracing::info!(key, tries, "upload succeeded after the store came back");
                }
                return Ok(stored);
            }
            Err(e) => e,
        };
        let outage = match &err {
            StorageError::Unavailable { .. } => true,
            StorageError::Config(_)
            | StorageError::Misconfigured { .. }
            | StorageError::Rejected { .. }
            | StorageError::Build { .. } => false,
        };
        if !outage {
            return Err(err.into());
        }
        let waited = first_failure.elapsed();
        if waited >= ctx.upload_retry_for {
            return Err(JobError::StorageGaveUp(waited, err));
        }
        let pause = backoff.next_delay().min(ctx.upload_retry_for - waited);
        tracing::warn!(key, tries, error = %err, ?pause, "store unavailable; retrying the upload");
        tokio::select! {
            // A drain that runs out of grace requeues the job instead of waiting for the store.
            _ = ctx.hard_stop.cancelled() => return Err(err.into()),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Publishes `event`, retrying retryable broker errors (the broker restarting) with backoff for at
/// most [`PUBLISH_RETRY_FOR`].
async fn publish_retrying(ctx: &JobContext, event: &Event) -> Result<(), QueueError> {
    let started = Instant::now();
    let mut backoff = Backoff::reconnect();
    loop {
        match ctx.publisher.publish_event(event).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && started.elapsed() < PUBLISH_RETRY_FOR => {
                tracing::warn!(error = %e, event = event.kind().as_str(), "publish failed; retrying");
                tokio::select! {
                    _ = ctx.hard_stop.cancelled() => return Err(e),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the model while publishing `started` when the model thread takes the job up (a job waiting
/// behind another stays `IN_QUEUE`) and `progress` events as steps finish.
async fn generate_with_progress(
    ctx: &JobContext,
    job: &JobMessage,
    attempt: u32,
    request: GenerateRequest,
    cancel: CancellationToken,
) -> Result<GenerateOutput, JobError> {
    let (progress_tx, mut progress_rx) = mpsc::channel(64);
    let (started_tx, started_rx) = oneshot::channel();
    let model_job = GenerateJob {
        endpoint: job.endpoint,
        request,
        check_safety: job.input.enable_safety_checker,
        cancel,
        progress: progress_tx,
        started: started_tx,
    };
    let generation = ctx.model.generate(model_job);
    tokio::pin!(generation);
    let mut started_rx = Some(started_rx);
    loop {
        tokio::select! {
            // `started` before any progress (the thread signals it first), progress before the reply:
            // every step reported is published before `completed`.
            biased;
            taken = async { started_rx.as_mut().expect("guarded by the branch condition").await }, if started_rx.is_some() => {
                started_rx = None;
                if taken.is_err() {
                    // The model thread dropped the job without taking it up; its reply says why.
                    continue;
                }
                let started = EventBody::Started(Started {
                    worker: ctx.worker_id.clone(),
                    attempt,
                });
                let started = Event::new(&job.request_id, job.endpoint, started);
                ctx.publisher.publish_event(&started).await?;
            }
            Some((step, total, took)) = progress_rx.recv() => {
                ctx.status.step(job.endpoint, took);
                let progress = EventBody::Progress(Progress {
                    worker: ctx.worker_id.clone(),
                    step,
                    total,
                    message: None,
                });
                let event = Event::new(&job.request_id, job.endpoint, progress);
                // Progress is informative: a broker outage must not cost the generation.
                if let Err(e) = ctx.publisher.publish_event(&event).await {
                    tracing::warn!(step, total, error = %e, "progress event not published");
                }
            }
            result = &mut generation => return Ok(result?),
        }
    }
}

/// Encodes every image: JPEG quality 95 or PNG with fast compression (as fal does).
fn encode_all(
    images: &[RgbImage],
    format: OutputFormat,
) -> Result<Vec<(Vec<u8>, u32, u32)>, JobError> {
    images
        .iter()
        .map(|img| {
            encode(img, format)
                .map(|bytes| (bytes, img.width(), img.height()))
                .map_err(|e| JobError::Encode(e.to_string()))
        })
        .collect()
}

/// Encodes one image in `format`.
pub fn encode(img: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, image::ImageError> {
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut buf = Vec::new();
    let result = match format {
        OutputFormat::Jpeg => JpegEncoder::new_with_quality(&mut buf, 95).encode_image(img),
        OutputFormat::Png => img.write_with_encoder(PngEncoder::new_with_quality(
            &mut buf,
            CompressionType::Fast,
            FilterType::Adaptive,
        )),
    };
    result.map(|()| buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_job_of_a_request_waits_for_the_first_and_knows_it_waited() {
        let ids = RunningIds::default();
        let first = ids.hold("r").await;
        assert!(!first.waited);
        let other = ids.hold("other").await;
        assert!(!other.waited, "other requests do not wait");
        let second = tokio::time::timeout(Duration::from_millis(50), ids.hold("r")).await;
        assert!(
            second.is_err(),
            "the same request waits while the first runs"
        );
        let waiting = async { ids.hold("r").await.waited };
        let (waited, ()) = tokio::join!(waiting, async move { drop(first) });
        assert!(waited);
        drop(other);
        assert!(
            ids.map().is_empty(),
            "entries are removed once nobody holds them"
        );
    }

    #[test]
    fn encodes_both_formats_at_their_size() {
        let img = RgbImage::from_fn(40, 24, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 10) as u8, 128])
        });
        for format in [OutputFormat::Jpeg, OutputFormat::Png] {
            let bytes = encode(&img, format).expect("encode");
            let decoded = image::load_from_memory(&bytes).expect("decode");
            assert_eq!((decoded.width(), decoded.height()), (40, 24));
            let guessed = image::guess_format(&bytes).expect("format");
            let expected = match format {
                OutputFormat::Jpeg => image::ImageFormat::Jpeg,
                OutputFormat::Png => image::ImageFormat::Png,
            };
            assert_eq!(guessed, expected);
        }
    }
}
