//! Prometheus metrics of `worker fleet` (`GET /metrics` on its `--http` listener; `GET /health` answers
//! 200 while it runs). Names carry the `fleet_supervisor_` prefix; labels are states and actions only.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

pub struct SupervisorMetrics {
    registry: Registry,
    pub workers: IntGaugeVec,
    pub demand: IntGaugeVec,
    pub target: IntGauge,
    pub cold_start: Histogram,
    pub start_failures: IntCounter,
    pub backoff_seconds: Gauge,
    pub decisions: IntCounterVec,
    pub exits: IntCounterVec,
}

impl SupervisorMetrics {
    pub fn new() -> Result<Arc<Self>, prometheus::Error> {
        let registry = Registry::new();
        let workers = IntGaugeVec::new(
            Opts::new(
                "fleet_supervisor_workers",
                "Worker processes by state (starting, idle, busy, draining)",
            ),
            &["state"],
        )?;
        let demand = IntGaugeVec::new(
            Opts::new(
                "fleet_supervisor_demand_jobs",
                "Jobs waiting on the served queues and running on this host's workers",
            ),
            &["kind"],
        )?;
        let target = IntGauge::new(
            "fleet_supervisor_target_workers",
            "Worker count the scaling policy asks for",
        )?;
        let cold_start = Histogram::with_opts(
            HistogramOpts::new(
                "fleet_supervisor_cold_start_seconds",
                "Process start to ready (models loaded, warm-up run, consuming)",
            )
            .buckets(vec![
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
        )?;
        let start_failures = IntCounter::new(
            "fleet_supervisor_start_failures_total",
            "Workers that exited (or could not be spawned) before they were ready",
        )?;
        let backoff_seconds = Gauge::new(
            "fleet_supervisor_start_backoff_seconds",
            "Current wait between start attempts after failures (0 after a successful start)",
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "fleet_supervisor_decisions_total",
                "Workers started and stopped by the scaling policy",
            ),
            &["action"],
        )?;
        let exits = IntCounterVec::new(
            Opts::new(
                "fleet_supervisor_worker_exits_total",
                "Worker exits by reason (drained, start_failed, crashed)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(workers.clone()))?;
        registry.register(Box::new(demand.clone()))?;
        registry.register(Box::new(target.clone()))?;
        registry.register(Box::new(cold_start.clone()))?;
        registry.register(Box::new(start_failures.clone()))?;
        registry.register(Box::new(backoff_seconds.clone()))?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(exits.clone()))?;
        Ok(Arc::new(SupervisorMetrics {
            registry,
            workers,
            demand,
            target,
            cold_start,
            start_failures,
            backoff_seconds,
            decisions,
            exits,
        }))
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// `GET /health` (200) and `GET /metrics`.
pub fn router(metrics: Arc<SupervisorMetrics>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(render))
        .with_state(metrics)
}

async fn render(State(m): State<Arc<SupervisorMetrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}
