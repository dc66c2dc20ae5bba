//! `worker fleet`: the flags of the supervisor ([`fleet_worker::supervisor`]) and its wiring. The knobs
//! carry fal's names; the children are this same binary's `worker serve`, configured by the arguments
//! after `--` and by the environment they inherit (`FLEET_*`: broker, S3, models, device).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fleet::job::EndpointKind;
use fleet::queue::Topology;
use fleet::telemetry::{init_tracing, LogFormat};
use fleet_worker::scaling::ScalingPolicy;
use fleet_worker::supervisor::child::{ChildSpec, Slot};
use fleet_worker::supervisor::metrics::{router, SupervisorMetrics};
use fleet_worker::supervisor::{self, SupervisorConfig};
use tokio_util::sync::CancellationToken;

use super::one_of;
use fleet::duration::parse_duration;

#[derive(Args, Clone)]
pub struct FleetArgs {
    /// GPU slots, one worker each (`CUDA_VISIBLE_DEVICES` per slot): indices or UUIDs, comma-separated.
    #[arg(
        long,
        env = "FLEET_GPUS",
        value_delimiter = ',',
        conflicts_with = "cpu_slots"
    )]
    gpus: Vec<String>,
    /// CPU slots instead of GPUs (tests, CPU-only hosts).
    #[arg(long, env = "FLEET_CPU_SLOTS")]
    cpu_slots: Option<usize>,
    /// fal's `min_concurrency`: workers kept up even without demand.
    #[arg(long, env = "FLEET_MIN_CONCURRENCY", default_value_t = 0)]
    min_concurrency: u32,
    /// fal's `max_concurrency`: most workers at once (also bounded by the slots).
    #[arg(long, env = "FLEET_MAX_WORKERS", default_value_t = 10)]
    max_workers: u32,
    /// fal's `concurrency_buffer`: warm workers beyond current demand.
    #[arg(long, env = "FLEET_CONCURRENCY_BUFFER", default_value_t = 0)]
    concurrency_buffer: u32,
    /// fal's `concurrency_buffer_perc`: buffer as a percentage of demand (the larger buffer wins).
    #[arg(long, env = "FLEET_CONCURRENCY_BUFFER_PERC", default_value_t = 0)]
    concurrency_buffer_perc: u32,
    /// fal's `max_multiplexing`: jobs per worker, passed to each worker as `--max-concurrency`
    /// (a pipelining depth: one model thread runs one job or batch at a time).
    #[arg(long, env = "FLEET_MAX_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_multiplexing: u32,
    /// fal's `keep_alive`: an idle worker is drained after this long (`600s`, `10m`).
    #[arg(long, env = "FLEET_SCALE_KEEP_ALIVE", default_value = "600s", value_parser = parse_duration)]
    keep_alive: Duration,
    /// fal's `scaling_delay`: jobs must have waited this long before they start a worker.
    #[arg(long, env = "FLEET_SCALING_DELAY", default_value = "0s", value_parser = parse_duration)]
    scaling_delay: Duration,
    /// Start backoff step: +this per consecutive start failure, at most 20 steps (30 s → 10 min).
    #[arg(long, env = "FLEET_START_BACKOFF_MS", default_value_t = 30_000)]
    start_backoff_ms: u64,
    /// Milliseconds between observations of the queues and the workers.
    #[arg(long, env = "FLEET_TICK_MS", default_value_t = 1000)]
    tick_ms: u64,
    /// Address of the supervisor's `/metrics` and `/health`.
    #[arg(long, env = "FLEET_SUPERVISOR_HTTP")]
    http: Option<std::net::SocketAddr>,
    /// Prefix of the workers' ids (default: hostname).
    #[arg(long, env = "FLEET_SUPERVISOR_NAME")]
    name: Option<String>,
    /// RabbitMQ URL (queue depths; the workers read FLEET_AMQP_URL too).
    #[arg(
        long,
        env = "FLEET_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Prefix of every exchange and queue name (passed to the workers).
    #[arg(long, env = "FLEET_TOPOLOGY_PREFIX", default_value = "fleet")]
    topology_prefix: String,
    /// `x-delivery-limit` of the job queues (passed to the workers).
    #[arg(long, env = "FLEET_DELIVERY_LIMIT", default_value_t = 3)]
    delivery_limit: u32,
    /// Retention of the results stream (passed to the workers).
    #[arg(long, env = "FLEET_RESULTS_MAX_AGE", default_value = "7D")]
    results_max_age: String,
    /// Endpoint kinds served: the queues whose demand counts, and each worker's `--endpoints`.
    #[arg(
        long,
        env = "FLEET_ENDPOINTS",
        value_delimiter = ',',
        default_value = "base,sprint"
    )]
    endpoints: Vec<EndpointKind>,
    /// Log format.
    #[arg(long, env = "FLEET_LOG_FORMAT", default_value = "text",
          value_parser = one_of(&LogFormat::NAMED))]
    log_format: LogFormat,
    /// Arguments for every `worker serve` (after `--`); not `--worker-id`, `--http`, `--max-concurrency`
    /// or `--keep-alive`, which the supervisor sets.
    #[arg(last = true)]
    worker_args: Vec<String>,
}

pub async fn run(args: FleetArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    let slots: Vec<Slot> = match args.cpu_slots {
        Some(n) => (0..n).map(|index| Slot { index, gpu: None }).collect(),
        None => args
            .gpus
            .iter()
            .enumerate()
            .map(|(index, g)| Slot {
                index,
                gpu: Some(g.trim().to_string()),
            })
            .collect(),
    };
    let policy = ScalingPolicy {
        min_concurrency: args.min_concurrency,
        max_concurrency: args
            .max_workers
            .min(u32::try_from(slots.len()).unwrap_or(u32::MAX)),
        concurrency_buffer: args.concurrency_buffer,
        concurrency_buffer_perc: args.concurrency_buffer_perc,
        max_multiplexing: args.max_multiplexing,
        keep_alive: args.keep_alive,
        scaling_delay: args.scaling_delay,
    };
    if policy.max_concurrency < args.max_workers {
        tracing::warn!(
            max_workers = args.max_workers,
            slots = slots.len(),
            "fewer slots than --max-workers: at most one worker per slot"
        );
    }
    let topology = Topology {
        prefix: args.topology_prefix.clone(),
        delivery_limit: args.delivery_limit,
        results_max_age: args.results_max_age.clone(),
    };
    let endpoints = args
        .endpoints
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut child_args = vec![
        "--amqp-url".to_string(),
        args.amqp_url.clone(),
        "--topology-prefix".into(),
        topology.prefix.clone(),
        "--delivery-limit".into(),
        topology.delivery_limit.to_string(),
        "--results-max-age".into(),
        topology.results_max_age.clone(),
        "--endpoints".into(),
        endpoints,
    ];
    child_args.extend(args.worker_args.iter().cloned());
    let config = SupervisorConfig {
        name: args.name.clone().unwrap_or_else(super::hostname),
        slots,
        policy,
        child: ChildSpec {
            exe: std::env::current_exe().context("the worker binary's own path")?,
            args: child_args,
            max_multiplexing: args.max_multiplexing,
        },
        amqp_url: args.amqp_url.clone(),
        topology,
        endpoints: args.endpoints.clone(),
        tick: Duration::from_millis(args.tick_ms.max(10)),
        backoff_step: Duration::from_millis(args.start_backoff_ms),
    };
    let metrics = SupervisorMetrics::new().context("supervisor metrics")?;
    if let Some(addr) = args.http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --http {addr}"))?;
        let bound = listener.local_addr().context("--http local address")?;
        tracing::info!(%bound, "supervisor metrics listener");
        println!("http {bound}");
        let m = Arc::clone(&metrics);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router(m)).await {
                tracing::error!(error = %e, "supervisor listener failed");
            }
        });
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        fleet::signal::shutdown_signal().await;
        tracing::info!("shutdown signal received; draining the workers");
        signal.cancel();
    });
    supervisor::run(config, metrics, shutdown)
        .await
        .context("supervisor")?;
    Ok(())
}
