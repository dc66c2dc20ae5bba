//! What an orchestrator reads from a worker (issue 12): readiness for `GET /health` and the Prometheus
//! metrics of `GET /metrics`, served by [`router`] when the binary runs with `--http`.
//!
//! `/health` answers 503 until the models are loaded (for the real models that includes one warm-up
//! run, [`crate::SanaFactory`]) and the consumers are open, 200 while the worker consumes, and 503 again
//! from the moment it starts draining. Its JSON body says which (`starting`, `ready`, `draining`) and how
//! many jobs are in flight. Metric names carry the `fleet_worker_` prefix and unit suffixes; labels are
//! the endpoint kind and the outcome, never request ids. Each [`WorkerStatus`] owns its registry, so
//! several workers in one test process do not collide.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use serde_json::json;
use tokio::sync::watch;

use fleet::job::EndpointKind;

/// How a delivery ended, the `outcome` label of `fleet_worker_jobs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Images uploaded, `completed` published, acked.
    Completed,
    /// `failed` published (validation, deadline, permanent or exhausted errors).
    Failed,
    /// Stopped between steps because the client cancelled.
    Cancelled,
    /// The request had already ended (a redelivery); acked without running.
    Skipped,
    /// Handed back to the queue (retryable failure, or stopped by a drain past its grace).
    Requeued,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Skipped => "skipped",
            Outcome::Requeued => "requeued",
        }
    }
}

/// Where the worker is in its life, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
        }
    }
}

/// The prometheus collectors of one worker.
struct Metrics {
    registry: Registry,
    jobs: IntCounterVec,
    job_duration: HistogramVec,
    inference: HistogramVec,
    step: HistogramVec,
    in_flight: IntGauge,
    model_load: Gauge,
    phase: IntGauge,
    idle: Gauge,
    gpu_used: IntGauge,
    gpu_total: IntGauge,
}

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let jobs = IntCounterVec::new(
            Opts::new(
                "fleet_worker_jobs_total",
                "Deliveries settled, by endpoint and outcome (completed, failed, cancelled, skipped, requeued)",
            ),
            &["endpoint", "outcome"],
        )?;
        let job_duration = HistogramVec::new(
            HistogramOpts::new(
                "fleet_worker_job_duration_seconds",
                "Delivery to settlement, by endpoint and outcome",
            )
            .buckets(vec![
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
            &["endpoint", "outcome"],
        )?;
        let inference = HistogramVec::new(
            HistogramOpts::new(
                "fleet_worker_inference_seconds",
                "Pipeline run plus safety check of completed jobs (all denoising steps), by endpoint",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
            &["endpoint"],
        )?;
        let step = HistogramVec::new(
            HistogramOpts::new(
                "fleet_worker_step_duration_seconds",
                "One denoising step as the model thread saw it (the first step includes text encoding), by endpoint",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["endpoint"],
        )?;
        let in_flight = IntGauge::new(
            "fleet_worker_jobs_in_flight",
            "Deliveries taken and not yet settled",
        )?;
        let model_load = Gauge::new(
            "fleet_worker_model_load_seconds",
            "Duration of the last model load (download, load and warm-up)",
        )?;
        let phase = IntGauge::new(
            "fleet_worker_phase",
            "0 starting (loading models), 1 ready (consuming), 2 draining",
        )?;
        let idle = Gauge::new(
            "fleet_worker_idle_seconds",
            "Seconds since the worker last had a job in flight (since ready when it never had one); 0 while busy",
        )?;
        let gpu_used = IntGauge::new(
            "fleet_worker_gpu_memory_used_bytes",
            "Memory in use on the worker's GPU (nvidia-smi; only on CUDA workers)",
        )?;
        let gpu_total = IntGauge::new(
            "fleet_worker_gpu_memory_total_bytes",
            "Memory of the worker's GPU (nvidia-smi; only on CUDA workers)",
        )?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(job_duration.clone()))?;
        registry.register(Box::new(inference.clone()))?;
        registry.register(Box::new(step.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(model_load.clone()))?;
        registry.register(Box::new(phase.clone()))?;
        registry.register(Box::new(idle.clone()))?;
        Ok(Metrics {
            registry,
            jobs,
            job_duration,
            inference,
            step,
            in_flight,
            model_load,
            phase,
            idle,
            gpu_used,
            gpu_total,
        })
    }
}

/// Shared by the consumer loop, the jobs and the HTTP listener.
pub struct WorkerStatus {
    phase: AtomicU8,
    metrics: Metrics,
    /// When the worker last went idle (or became ready); `None` while a job is in flight.
    idle_since: Mutex<Option<Instant>>,
    /// `Some(gpu)` on CUDA workers: the `nvidia-smi --id` to query for memory.
    gpu: Option<String>,
    /// True while a job is in flight (the pod deletion cost follows it).
    busy: watch::Sender<bool>,
}

impl WorkerStatus {
    /// `gpu`: the device id `nvidia-smi --id` takes, on CUDA workers (registers the GPU memory gauges).
    pub fn new(gpu: Option<String>) -> Arc<Self> {
        let metrics = Metrics::new().expect("metric names and labels are static and distinct");
        if gpu.is_some() {
            for g in [&metrics.gpu_used, &metrics.gpu_total] {
                metrics
                    .registry
                    .register(Box::new(g.clone()))
                    .expect("registered once");
            }
        }
        Arc::new(WorkerStatus {
            phase: AtomicU8::new(Phase::Starting as u8),
            metrics,
            idle_since: Mutex::new(None),
            gpu,
            busy: watch::channel(false).0,
        })
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
        self.metrics.phase.set(phase as i64);
    }

    /// Models loaded (and warmed up) and consumers open.
    pub fn set_ready(&self) {
        if self.phase() == Phase::Starting {
            self.set_phase(Phase::Ready);
            if self.in_flight() == 0 {
                *self.idle_lock() = Some(Instant::now());
            }
        }
    }

    /// The worker stopped consuming; `/health` answers 503 from now on.
    pub fn set_draining(&self) {
        self.set_phase(Phase::Draining);
    }

    pub fn model_loaded(&self, took: Duration) {
        self.metrics.model_load.set(took.as_secs_f64());
    }

    pub fn in_flight(&self) -> i64 {
        self.metrics.in_flight.get()
    }

    fn idle_lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.idle_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Follows whether a job is in flight.
    pub fn busy(&self) -> watch::Receiver<bool> {
        self.busy.subscribe()
    }

    fn set_busy(&self, busy: bool) {
        self.busy
            .send_if_modified(|b| std::mem::replace(b, busy) != busy);
    }

    /// A delivery was taken.
    pub fn job_taken(&self) {
        self.metrics.in_flight.inc();
        *self.idle_lock() = None;
        self.set_busy(true);
    }

    /// A delivery was settled after `took`.
    pub fn job_settled(&self, endpoint: Option<EndpointKind>, outcome: Outcome, took: Duration) {
        let endpoint = endpoint.map_or("unknown", EndpointKind::as_str);
        let labels = [endpoint, outcome.as_str()];
        self.metrics.jobs.with_label_values(&labels).inc();
        self.metrics
            .job_duration
            .with_label_values(&labels)
            .observe(took.as_secs_f64());
        self.metrics.in_flight.dec();
        if self.metrics.in_flight.get() <= 0 {
            *self.idle_lock() = Some(Instant::now());
            self.set_busy(false);
        }
    }

    /// A completed job's pipeline and checker time.
    pub fn inference(&self, endpoint: EndpointKind, seconds: f64) {
        self.metrics
            .inference
            .with_label_values(&[endpoint.as_str()])
            .observe(seconds);
    }

    /// One denoising step of a job.
    pub fn step(&self, endpoint: EndpointKind, took: Duration) {
        self.metrics
            .step
            .with_label_values(&[endpoint.as_str()])
            .observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric, sampled now.
    pub fn render(&self) -> String {
        let idle = self.idle_lock().map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.metrics.idle.set(idle);
        if let Some(gpu) = &self.gpu {
            match gpu_memory(gpu) {
                Some((used, total)) => {
                    self.metrics.gpu_used.set(used);
                    self.metrics.gpu_total.set(total);
                }
                None => tracing::debug!(gpu, "nvidia-smi gave no memory figures"),
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.metrics.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// `(used, total)` bytes of one GPU from `nvidia-smi` (MiB figures), `None` when it cannot be run.
fn gpu_memory(gpu: &str) -> Option<(i64, i64)> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used,memory.total",
            "--format=csv,noheader,nounits",
            "--id",
            gpu,
        ])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut it = text
        .lines()
        .next()?
        .split(',')
        .map(|v| v.trim().parse::<i64>().ok());
    Some((it.next()?? << 20, it.next()?? << 20))
}

/// `GET /health` and `GET /metrics`.
pub fn router(status: Arc<WorkerStatus>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(status)
}

async fn health(State(status): State<Arc<WorkerStatus>>) -> impl IntoResponse {
    let phase = status.phase();
    let code = match phase {
        Phase::Ready => StatusCode::OK,
        Phase::Starting | Phase::Draining => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = json!({"status": phase.as_str(), "jobs_in_flight": status.in_flight()});
    (code, Json(body))
}

async fn metrics(State(status): State<Arc<WorkerStatus>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        status.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get_path(status: &Arc<WorkerStatus>, path: &str) -> (StatusCode, String) {
        let resp = router(status.clone())
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("router answers");
        let code = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (code, String::from_utf8(body.to_vec()).expect("utf-8"))
    }

    #[tokio::test]
    async fn health_is_503_until_ready_and_again_while_draining() {
        let status = WorkerStatus::new(None);
        let (code, body) = get_path(&status, "/health").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"starting\""), "{body}");
        status.set_ready();
        assert_eq!(get_path(&status, "/health").await.0, StatusCode::OK);
        status.set_draining();
        let (code, body) = get_path(&status, "/health").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"draining\""), "{body}");
        // Draining is final: a late set_ready does not make a draining worker ready again.
        status.set_ready();
        assert_eq!(status.phase(), Phase::Draining);
    }

    #[tokio::test]
    async fn metrics_count_jobs_by_outcome_and_track_in_flight_and_idle() {
        let status = WorkerStatus::new(None);
        status.set_ready();
        status.model_loaded(Duration::from_millis(1500));
        status.job_taken();
        let (_, busy) = get_path(&status, "/metrics").await;
        assert!(busy.contains("fleet_worker_jobs_in_flight 1"), "{busy}");
        assert!(busy.contains("fleet_worker_idle_seconds 0\n"), "{busy}");
        status.inference(EndpointKind::Sprint, 0.2);
        status.job_settled(
            Some(EndpointKind::Sprint),
            Outcome::Completed,
            Duration::from_millis(300),
        );
        status.job_taken();
        status.job_settled(None, Outcome::Failed, Duration::from_millis(5));
        let (code, text) = get_path(&status, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        for line in [
            "fleet_worker_jobs_total{endpoint=\"sprint\",outcome=\"completed\"} 1",
            "fleet_worker_jobs_total{endpoint=\"unknown\",outcome=\"failed\"} 1",
            "fleet_worker_job_duration_seconds_count{endpoint=\"sprint\",outcome=\"completed\"} 1",
            "fleet_worker_inference_seconds_count{endpoint=\"sprint\"} 1",
            "fleet_worker_jobs_in_flight 0",
            "fleet_worker_model_load_seconds 1.5",
            "fleet_worker_phase 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // No GPU given: no GPU gauges.
        assert!(!text.contains("gpu_memory"), "{text}");
    }
}
