//! The worker runtime (service-contract §6), a library so tests can drive it in-process; the `worker`
//! binary only parses flags, builds the real [`PipelineFactory`] and calls [`run`].
//!
//! Shape: models load on the model thread ([`model`]) before anything touches the broker (a worker that
//! cannot load refuses to start); then the topology is declared, the results [`tracker`] starts, and one
//! consumer per served endpoint runs with `basic.qos(prefetch = depth)`. A semaphore of the same size
//! caps the jobs in flight across endpoints (`depth` = [`WorkerConfig::pipeline_depth`]: `max_concurrency`,
//! raised to `max_batch` so that enough jobs can wait for the model thread to fill a batch). The consumer loop is one `select!` over shutdown, the tracker,
//! finished jobs, the keep-alive timer and the next delivery (vector `sources/amqp.rs`).
//!
//! Keep-alive: after `keep_alive` with no job in flight the worker either returns
//! [`WorkerExit::Idle`] (`exit`: the process ends with status 0, its launcher reaps it) or drops its models
//! (`unload`) and loads them again for the next job. Shutdown (SIGTERM/SIGINT in the binary) drains: the
//! consumers are cancelled, running jobs get `drain_grace` to finish, then they are stopped between
//! denoising steps and requeued; anything still unsettled returns to the queue when the channel closes.

mod batch;
pub mod factory;
mod job;
pub mod k8s;
pub mod model;
pub mod safety;
pub mod scaling;
pub mod status;
pub mod supervisor;
pub mod tracker;

pub use batch::Batching;
pub use factory::{SanaFactory, SanaFactoryConfig};
pub use job::encode;
pub use model::{
    generate_request, pipeline_kind, GenerateOutput, LoadedModels, ModelError, ModelHandle,
    PipelineFactory, PipelineSet,
};
pub use status::{Outcome, Phase, WorkerStatus};

use std::sync::Arc;
use std::time::Duration;

use futures::stream::SelectAll;
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicNackOptions};
use lapin::{Channel, Consumer};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use fleet::job::EndpointKind;
use fleet::queue::{self, Backoff, Link, QueueError, Topology};
use fleet::storage::{Storage, StorageConfig, StorageError};
use fleet::telemetry::redact_url;
use job::JobContext;
use tracker::Tracker;

/// What an idle worker does when its keep-alive runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleAction {
    /// Stop consuming and return; the process exits with status 0 (workers under a launcher).
    Exit,
    /// Drop the models and keep consuming; the next job loads them again (standalone workers).
    Unload,
}

impl IdleAction {
    /// Names on the command line and in `FLEET_IDLE_ACTION` (the binary's flags read this table).
    pub const NAMED: [(&'static str, IdleAction); 2] =
        [("exit", IdleAction::Exit), ("unload", IdleAction::Unload)];
}

/// Everything the runtime needs. `Debug` hides the broker password and the S3 secret.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Named in `started`/`progress`/`completed` events and in the consumer tags.
    pub worker_id: String,
    pub amqp_url: String,
    pub topology: Topology,
    /// Endpoint kinds this worker serves (a queue consumer and a pipeline each).
    pub endpoints: Vec<EndpointKind>,
    /// Prefetch per consumer and the cap on jobs in flight (the pipeline depth: waiting for the model
    /// thread, running, encoding, uploading); raised to `max_batch` when smaller.
    pub max_concurrency: u16,
    /// Most compatible requests the model thread runs as one batch (1 = one at a time).
    pub max_batch: u16,
    /// How long the model thread waits for more compatible jobs to fill a batch (0 = only those queued).
    pub batch_wait: Duration,
    /// Idle time after which `idle_action` happens; `None` = never.
    pub keep_alive: Option<Duration>,
    pub idle_action: IdleAction,
    /// How long running jobs may take to finish after a shutdown signal before they are requeued.
    pub drain_grace: Duration,
    /// Pause before requeueing a job whose attempt failed with a retryable error.
    pub retry_backoff: Duration,
    /// Bytes one request's images may take ([`job::image_memory_need`]); larger requests fail at once.
    pub image_memory_budget: u64,
    /// How long an upload that fails because the object store is unavailable is retried (exponential
    /// backoff, the encoded images kept in memory) before the job fails with `storage_error`.
    pub upload_retry_for: Duration,
    /// How far back the results stream is replayed at start, and how long the tracker remembers an
    /// ended request (its memory bound; `tracker` module docs).
    pub replay_window: Duration,
    pub storage: StorageConfig,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("worker_id", &self.worker_id)
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("topology", &self.topology)
            .field("endpoints", &self.endpoints)
            .field("max_concurrency", &self.max_concurrency)
            .field("max_batch", &self.max_batch)
            .field("batch_wait", &self.batch_wait)
            .field("keep_alive", &self.keep_alive)
            .field("idle_action", &self.idle_action)
            .field("drain_grace", &self.drain_grace)
            .field("retry_backoff", &self.retry_backoff)
            .field("image_memory_budget", &self.image_memory_budget)
            .field("upload_retry_for", &self.upload_retry_for)
            .field("replay_window", &self.replay_window)
            .field("storage", &self.storage)
            .finish()
    }
}

impl WorkerConfig {
    /// Jobs in flight at once (prefetch per endpoint queue, and the cap across endpoints):
    /// `max(max_concurrency, max_batch)`, so a full batch can wait for the model thread.
    pub fn pipeline_depth(&self) -> u16 {
        self.max_concurrency.max(self.max_batch)
    }

    fn batching(&self) -> Batching {
        Batching {
            max_batch: usize::from(self.max_batch.max(1)),
            batch_wait: self.batch_wait,
        }
    }
}

/// Why [`run`] returned normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Keep-alive ran out with `IdleAction::Exit`.
    Idle,
    /// The shutdown token was cancelled and the drain finished.
    Shutdown,
}

/// Why the worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("models: {0}")]
    Model(#[from] ModelError),
    #[error("broker: {0}")]
    Queue(#[from] QueueError),
    #[error("spawning the model thread: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Upper bound on waiting for stopped jobs to settle after the grace period.
const HARD_STOP_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for the broker's answer to `basic.cancel` or `connection.close` while stopping, so a
/// broker that does not answer cannot keep a drained worker from exiting.
const BROKER_CALL_WAIT: Duration = Duration::from_secs(5);

impl WorkerError {
    /// The process exit status for this error, one per cause, so a supervisor can tell a worker that
    /// cannot start from one that lost its broker: 3 configuration, 4 models, 5 broker, 6 storage,
    /// 7 model thread. (0 is a clean exit: drained or idle; 1 an error outside the runtime; 2 bad flags.)
    pub fn exit_code(&self) -> u8 {
        match self {
            WorkerError::Config(_) => 3,
            WorkerError::Model(_) => 4,
            WorkerError::Queue(_) => 5,
            WorkerError::Storage(_) => 6,
            WorkerError::Spawn(_) => 7,
        }
    }

    /// The cause a worker's exit status names ([`Self::exit_code`]), in words a client may read (a
    /// supervisor tells the requests waiting for a worker that failed to start why).
    pub fn exit_cause(status: std::process::ExitStatus) -> String {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(0), _) => "it exited before it was ready".into(),
            (Some(2), _) => "bad flags".into(),
            (Some(3), _) => "invalid configuration".into(),
            (Some(4), _) => "its models could not be loaded".into(),
            (Some(5), _) => "the broker could not be reached".into(),
            (Some(6), _) => "the object store could not be reached".into(),
            (Some(7), _) => "its model thread could not be started".into(),
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "it stopped for an unknown reason".into(),
        }
    }
}

/// Runs a worker until keep-alive `exit`, `shutdown`, or a fatal error.
pub async fn run(
    config: WorkerConfig,
    factory: Box<dyn PipelineFactory>,
    shutdown: CancellationToken,
) -> Result<WorkerExit, WorkerError> {
    run_with_status(config, factory, shutdown, WorkerStatus::new(None)).await
}

/// [`run`], reporting readiness and metrics through `status` (the `--http` listener reads it).
pub async fn run_with_status(
    config: WorkerConfig,
    factory: Box<dyn PipelineFactory>,
    shutdown: CancellationToken,
    status: Arc<WorkerStatus>,
) -> Result<WorkerExit, WorkerError> {
    tracing::info!(config = ?config, "worker starting");
    if config.endpoints.is_empty() || config.max_concurrency == 0 || config.max_batch == 0 {
        return Err(WorkerError::Config(
            "need at least one endpoint, max_concurrency >= 1 and max_batch >= 1".into(),
        ));
    }
    let depth = config.pipeline_depth();
    if depth > config.max_concurrency {
        tracing::warn!(
            max_concurrency = config.max_concurrency,
            max_batch = config.max_batch,
            depth,
            "max_concurrency below max_batch: raised so a batch can fill"
        );
    }
    let storage = Arc::new(Storage::new(config.storage.clone())?);
    let model = ModelHandle::spawn(
        factory,
        config.endpoints.clone(),
        usize::from(depth),
        config.batching(),
    )?;
    let loading = std::time::Instant::now();
    model.load().await?;
    status.model_loaded(loading.elapsed());

    let link = Link::connect(&config.amqp_url, &config.topology).await?;
    let publisher = link.publisher().clone();
    let (tracker, mut tracker_task) = Tracker::start(link.clone(), config.replay_window).await?;

    let (mut consume_ch, mut deliveries, tags) = open_consumers(&link, &config).await?;
    tracing::info!(endpoints = ?config.endpoints, "consuming");

    let ctx = Arc::new(JobContext {
        publisher,
        tracker,
        model: model.clone(),
        storage,
        worker_id: config.worker_id.clone(),
        delivery_limit: config.topology.delivery_limit,
        hard_stop: CancellationToken::new(),
        retry_backoff: config.retry_backoff,
        image_memory_budget: config.image_memory_budget,
        upload_retry_for: config.upload_retry_for,
        running: job::RunningIds::default(),
        status: status.clone(),
    });
    let permits = Arc::new(Semaphore::new(usize::from(depth)));
    let tasks = TaskTracker::new();
    // Every in-flight job sends exactly one `done`; in-flight jobs are bounded by prefetch × endpoints.
    let (done_tx, mut done_rx) =
        mpsc::channel::<()>(usize::from(depth) * config.endpoints.len() + 1);
    let mut in_flight = 0usize;
    let mut idle_since = Instant::now();
    let mut unloaded = false;
    status.set_ready();

    let exit = loop {
        let idle_deadline = match config.keep_alive {
            Some(k) if in_flight == 0 && !unloaded => Some(idle_since + k),
            _ => None,
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break WorkerExit::Shutdown,
            died = &mut tracker_task => {
                let err = died.unwrap_or_else(|e| QueueError::Closed(format!("results tracker task: {e}")));
                return Err(WorkerError::Queue(err));
            }
            Some(()) = done_rx.recv() => {
                in_flight = in_flight.saturating_sub(1);
                if in_flight == 0 {
                    idle_since = Instant::now();
                }
            }
            _ = sleep_until_opt(idle_deadline) => match config.idle_action {
                IdleAction::Exit => {
                    tracing::info!("keep-alive expired; exiting");
                    break WorkerExit::Idle;
                }
                IdleAction::Unload => {
                    tracing::info!("keep-alive expired; unloading models");
                    model.unload().await?;
                    unloaded = true;
                }
            },
            next = deliveries.next() => {
                let delivery = match next {
                    Some(Ok(d)) => d,
                    ended => {
                        match ended {
                            Some(Err(e)) => tracing::warn!(error = %e, "job consumer failed; consuming again"),
                            _ => tracing::warn!("job consumer ended; consuming again"),
                        }
                        // The dead channel's unacknowledged jobs go back to the queue on the broker's side.
                        let reopened = tokio::select! {
                            _ = shutdown.cancelled() => break WorkerExit::Shutdown,
                            r = reopen_consumers(&link, &config) => r,
                        };
                        let Some((ch, d, _)) = reopened else {
                            break WorkerExit::Shutdown;
                        };
                        (consume_ch, deliveries) = (ch, d);
                        tracing::info!(endpoints = ?config.endpoints, "consuming again");
                        continue;
                    }
                };
                in_flight += 1;
                unloaded = false;
                status.job_taken();
                let (ctx, permits, done, shutdown) = (ctx.clone(), permits.clone(), done_tx.clone(), shutdown.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        permit = permits.acquire_owned() => {
                            // The semaphore is never closed, so acquiring only fails in impossible states.
                            let _permit = permit;
                            job::handle(&ctx, delivery).await;
                        }
                        _ = shutdown.cancelled() => {
                            // Not started yet: hand it back right away.
                            let opts = BasicNackOptions { requeue: true, ..BasicNackOptions::default() };
                            if let Err(e) = delivery.nack(opts).await {
                                tracing::warn!(error = %e, "could not requeue a waiting job");
                            }
                            ctx.status.job_settled(None, Outcome::Requeued, Duration::ZERO);
                        }
                    }
                    let _ = done.send(()).await;
                });
            }
        }
    };
    status.set_draining();

    // Nothing counts finished jobs any more. Without a receiver a job's `done.send` returns at once;
    // with one it would wait for room once more jobs end than the channel holds (possible after the
    // consumers were reopened, when old and redelivered jobs are in flight together), and the drain below
    // would then wait out its grace for jobs that had already finished.
    drop(done_rx);
    for tag in &tags {
        let cancel = consume_ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
        match tokio::time::timeout(BROKER_CALL_WAIT, cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "basic.cancel failed"),
            Err(_) => tracing::warn!("basic.cancel unanswered; closing the connection cancels it"),
        }
    }
    drop(deliveries);
    tasks.close();
    if tokio::time::timeout(config.drain_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?config.drain_grace, "jobs still running after the grace period; requeueing them");
        ctx.hard_stop.cancel();
        if tokio::time::timeout(HARD_STOP_WAIT, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("jobs did not stop; closing the connection returns them to the queue");
        }
    }
    tracker_task.abort();
    if tokio::time::timeout(BROKER_CALL_WAIT, link.close("worker stopped"))
        .await
        .is_err()
    {
        tracing::warn!("the broker did not answer connection.close; exiting anyway");
    }
    tracing::info!(?exit, "worker stopped");
    Ok(exit)
}

type Deliveries = SelectAll<Consumer>;

/// Opens a channel on the link's live connection and starts one consumer per served endpoint, with
/// `basic.qos(prefetch = max_concurrency)`. Returns the channel, the merged deliveries and the tags.
async fn open_consumers(
    link: &Link,
    config: &WorkerConfig,
) -> Result<(Channel, Deliveries, Vec<String>), QueueError> {
    let conn = link
        .connection()
        .await
        .ok_or_else(|| QueueError::Closed("broker link closed".into()))?;
    let consume_ch = queue::open_channel(&conn).await?;
    let mut tags = Vec::new();
    let mut consumers = Vec::new();
    for kind in &config.endpoints {
        let tag = format!("{}-{}", config.worker_id, kind.as_str());
        let queue_name = config.topology.job_queue(*kind);
        consumers
            .push(queue::consume(&consume_ch, &queue_name, &tag, config.pipeline_depth()).await?);
        tags.push(tag);
    }
    Ok((consume_ch, futures::stream::select_all(consumers), tags))
}

/// [`open_consumers`] with backoff until it works; `None` once the link is closed.
async fn reopen_consumers(
    link: &Link,
    config: &WorkerConfig,
) -> Option<(Channel, Deliveries, Vec<String>)> {
    let mut backoff = Backoff::reconnect();
    loop {
        match open_consumers(link, config).await {
            Ok(opened) => return Some(opened),
            Err(QueueError::Closed(_)) if link.connection().await.is_none() => return None,
            Err(e) => tracing::debug!(error = %e, "consuming again failed; retrying"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_broker_password_and_the_s3_secret() {
        let config = WorkerConfig {
            worker_id: "w1".into(),
            amqp_url: "amqp://fleet:broker-pass@rabbit:5672/%2f".into(),
            topology: Topology::default(),
            endpoints: vec![EndpointKind::Base],
            max_concurrency: 1,
            max_batch: 1,
            batch_wait: Duration::ZERO,
            keep_alive: None,
            idle_action: IdleAction::Unload,
            drain_grace: Duration::from_secs(1),
            retry_backoff: Duration::ZERO,
            image_memory_budget: 1 << 30,
            upload_retry_for: Duration::from_secs(300),
            replay_window: Duration::from_secs(86_400),
            storage: StorageConfig {
                endpoint: "http://s3:3900".into(),
                public_endpoint: None,
                region: "garage".into(),
                access_key_id: "GKid".into(),
                secret_access_key: "s3-secret-value".into(),
                bucket: "fleet".into(),
                public_base_url: None,
                url_lifetime: Duration::from_secs(60),
            },
        };
        let text = format!("{config:?}");
        assert!(
            !text.contains("broker-pass") && !text.contains("s3-secret-value"),
            "{text}"
        );
        assert!(text.contains("amqp://fleet:***@rabbit:5672/%2f"), "{text}");
    }

    #[test]
    fn every_exit_code_has_the_cause_the_supervisor_reports() {
        use std::os::unix::process::ExitStatusExt;
        // A wait status holds the exit code in its second byte and a signal in its low bits.
        let exited = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        let model = WorkerError::Model(model::ModelError::Stopped);
        assert_eq!(
            WorkerError::exit_cause(exited(i32::from(model.exit_code()))),
            "its models could not be loaded"
        );
        assert_eq!(
            WorkerError::exit_cause(exited(5)),
            "the broker could not be reached"
        );
        assert_eq!(WorkerError::exit_cause(exited(101)), "exit status 101");
        assert_eq!(
            WorkerError::exit_cause(std::process::ExitStatus::from_raw(9)),
            "killed by signal 9"
        );
    }
}
