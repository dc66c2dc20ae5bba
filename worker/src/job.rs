//! One job from delivery to settlement (service-contract §6): parse, dedupe against the results stream,
//! deadline, re-validation, `started`, generation with `progress` and cancellation, safety, encode, upload,
//! `completed` (confirmed) and only then the ack. Failures: retryable → requeue while the quorum queue's
//! delivery count is below its limit; permanent or out of attempts → `failed` (billing 0), then reject
//! without requeue, which dead-letters the message to `{prefix}.dead`.

use std::sync::Arc;
use std::time::Duration;

use image::RgbImage;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::model::{generate_request, GenerateJob, GenerateOutput, ModelError, ModelHandle};
use super::tracker::Tracker;
use fleet::events::{
    now_unix, Completed, ErrorType, Event, EventBody, JobMessage, Progress, Started,
};
use fleet::job::{revalidate, EndpointKind, OutputFormat};
use fleet::queue::{
    delivery_attempt, header_str, message_id, Publisher, QueueError, HEADER_ENDPOINT,
};
use fleet::storage::{object_key, Storage, StorageError};
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
            JobError::Model(e) => e.is_retryable(),
            JobError::Encode(_) => false,
        }
    }

    fn error_type(&self) -> ErrorType {
        match self {
            JobError::Model(ModelError::Pipeline(PipelineError::InvalidRequest(_))) => {
                ErrorType::BadRequest
            }
            JobError::Model(_)
            | JobError::Storage(_)
            | JobError::Queue(_)
            | JobError::Encode(_) => ErrorType::RunnerServerError,
        }
    }
}

/// Runs one delivery to its settlement and settles it.
pub(crate) async fn handle(ctx: &JobContext, delivery: Delivery) {
    let settle = process(ctx, &delivery).await;
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
}

async fn process(ctx: &JobContext, delivery: &Delivery) -> Settle {
    let attempt = delivery_attempt(&delivery.properties);
    let job: JobMessage = match serde_json::from_slice(&delivery.data) {
        Ok(job) => job,
        Err(e) => return malformed(ctx, delivery, &e.to_string()).await,
    };
    let span = tracing::info_span!("job", request_id = %job.request_id, endpoint = %job.endpoint, attempt,
        worker = %ctx.worker_id);
    tracing::Instrument::instrument(run(ctx, &job, attempt), span).await
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

async fn run(ctx: &JobContext, job: &JobMessage, attempt: u32) -> Settle {
    if let Err(e) = ctx.tracker.sync().await {
        tracing::warn!(error = %e, "results stream not caught up; requeueing");
        return Settle::Requeue;
    }
    if let Some(kind) = ctx.tracker.terminal(&job.request_id) {
        tracing::info!(already = kind.as_str(), "request already ended; skipping");
        return Settle::Ack;
    }
    if let Some(deadline) = job.deadline {
        if now_unix() > deadline {
            let event = Event::failed(
                &job.request_id,
                job.endpoint,
                ErrorType::RequestTimeout,
                "the request was not started before its deadline",
            );
            return match publish_failed(ctx, event).await {
                Ok(()) => Settle::Ack,
                Err(_) => Settle::Requeue,
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
                Ok(()) => Settle::DeadLetter,
                Err(_) => Settle::Requeue,
            };
        }
    };
    let cancel = ctx.hard_stop.child_token();
    let _running = ctx
        .tracker
        .register_running(&job.request_id, cancel.clone());
    let job = JobMessage {
        input,
        ..job.clone()
    };
    match execute(ctx, &job, attempt, cancel).await {
        Ok(()) => Settle::Ack,
        Err(JobError::Model(ModelError::Pipeline(PipelineError::Cancelled)))
            if ctx.hard_stop.is_cancelled() =>
        {
            tracing::info!("stopped by shutdown; requeueing");
            Settle::Requeue
        }
        Err(JobError::Model(ModelError::Pipeline(PipelineError::Cancelled))) => {
            tracing::info!("cancelled by the client between steps");
            Settle::Ack
        }
        Err(e) => failure(ctx, &job, attempt, e).await,
    }
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
    let event = Event::failed(
        &job.request_id,
        job.endpoint,
        err.error_type(),
        "image generation failed",
    );
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

    let format = input.output_format;
    let images = output.images;
    let encoded = tokio::task::spawn_blocking(move || encode_all(&images, format))
        .await
        .map_err(|e| JobError::Encode(format!("encoder task: {e}")))??;

    let uploads = encoded.into_iter().enumerate().map(|(i, (bytes, w, h))| {
        let key = object_key(job.endpoint, &job.request_id, i, format.extension());
        async move {
            let stored = ctx
                .storage
                .put_object(&key, bytes, format.content_type())
                .await?;
            Ok::<_, StorageError>(json!({
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
    ctx.publisher.publish_event(&completed).await?;
    tracing::info!(
        inference_time = output.inference_time,
        batch_size = output.batch_size,
        units = input.billable_units(),
        "completed"
    );
    Ok(())
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
            Some((step, total)) = progress_rx.recv() => {
                let progress = EventBody::Progress(Progress {
                    worker: ctx.worker_id.clone(),
                    step,
                    total,
                    message: None,
                });
                let event = Event::new(&job.request_id, job.endpoint, progress);
                ctx.publisher.publish_event(&event).await?;
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
