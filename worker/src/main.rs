//! `worker`: consumes jobs from RabbitMQ, runs the Sana pipelines, uploads results to S3 and publishes
//! lifecycle events (service-contract §6). Thin wiring over `fleet_worker`; `serve` is the default
//! subcommand. Every flag has an environment variable; secrets are never logged.

mod fleet_cmd;
mod generate;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use fleet::duration::parse_duration;
use fleet::job::EndpointKind;
use fleet::queue::Topology;
use fleet::storage::{StorageConfig, MAX_URL_LIFETIME};
use fleet::telemetry::{init_tracing, LogFormat};
use fleet_worker::safety::SafetyCheckerVersion;
use fleet_worker::{
    IdleAction, SanaFactory, SanaFactoryConfig, WorkerConfig, WorkerExit, WorkerStatus,
};
use sana_pipelines::loader::ModelSource;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "Sana text-to-image queue worker",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

// Parsed once at start; the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Consume jobs until keep-alive or a shutdown signal (the default).
    Serve(ServeArgs),
    /// Run one pipeline without the queue and write the images to a directory.
    Generate(generate::GenerateArgs),
    /// Supervise `worker serve` processes on this host's GPU (or CPU) slots, scaled by queue demand.
    Fleet(fleet_cmd::FleetArgs),
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Worker name in events and consumer tags (default: hostname-pid).
    #[arg(long, env = "FLEET_WORKER_ID")]
    worker_id: Option<String>,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "FLEET_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Prefix of every exchange and queue name.
    #[arg(long, env = "FLEET_TOPOLOGY_PREFIX", default_value = "fleet")]
    topology_prefix: String,
    /// `x-delivery-limit` of the job queues (a job runs at most limit + 1 times).
    #[arg(long, env = "FLEET_DELIVERY_LIMIT", default_value_t = 3)]
    delivery_limit: u32,
    /// Retention (`x-max-age`) of the results stream.
    #[arg(long, env = "FLEET_RESULTS_MAX_AGE", default_value = "7D")]
    results_max_age: String,
    /// Endpoint kinds served, comma-separated.
    #[arg(
        long,
        env = "FLEET_ENDPOINTS",
        value_delimiter = ',',
        default_value = "base,sprint"
    )]
    endpoints: Vec<EndpointKind>,
    /// Base pipeline: Hub repo id or local diffusers directory.
    #[arg(
        long,
        env = "FLEET_BASE_MODEL",
        default_value = "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers"
    )]
    base_model: String,
    /// Hub revision of the base model (branch, tag or commit).
    #[arg(long, env = "FLEET_BASE_REVISION")]
    base_revision: Option<String>,
    /// Sprint pipeline: Hub repo id or local diffusers directory.
    #[arg(
        long,
        env = "FLEET_SPRINT_MODEL",
        default_value = "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers"
    )]
    sprint_model: String,
    /// Hub revision of the sprint model.
    #[arg(long, env = "FLEET_SPRINT_REVISION")]
    sprint_revision: Option<String>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "FLEET_DEVICE", default_value = "auto")]
    device: String,
    /// `auto` (bf16 on CUDA, f32 on CPU), `bf16`, `f16` or `f32`.
    #[arg(long, env = "FLEET_DTYPE", default_value = "auto")]
    dtype: String,
    /// NSFW checker: v2 (Falconsai ViT, fal's default) or v1 (CompVis CLIP).
    #[arg(long, env = "FLEET_SAFETY_CHECKER", default_value = "v2",
          value_parser = one_of(&SafetyCheckerVersion::NAMED))]
    safety_checker: SafetyCheckerVersion,
    /// Checker checkpoint: Hub repo id or local directory (default: the version's Hub repo).
    #[arg(long, env = "FLEET_SAFETY_MODEL")]
    safety_model: Option<String>,
    /// Hub revision of the checker.
    #[arg(long, env = "FLEET_SAFETY_REVISION")]
    safety_revision: Option<String>,
    /// Pipeline depth: jobs in flight at once (RabbitMQ prefetch per endpoint queue, and the cap across
    /// endpoints) — waiting for the model thread, running, encoding, uploading. Raised to --max-batch when
    /// smaller; 2 × --max-batch lets the next batch gather while one runs and the last one uploads.
    #[arg(long, env = "FLEET_MAX_CONCURRENCY", default_value_t = 1)]
    max_concurrency: u16,
    /// Most compatible requests (same endpoint, binned size, steps and CFG on/off) the model thread runs
    /// as one batch; 1 = one at a time. Needs that many jobs in flight (see --max-concurrency).
    #[arg(long, env = "FLEET_MAX_BATCH", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    max_batch: u16,
    /// Milliseconds the model thread waits for more compatible jobs when a batch is not full
    /// (0 = run what is already waiting). The oldest waiting job always runs next: none starves.
    #[arg(long, env = "FLEET_BATCH_WAIT_MS", default_value_t = 0)]
    batch_wait: u64,
    /// Seconds without a job before `--idle-action` (0 = never).
    #[arg(long, env = "FLEET_KEEP_ALIVE", default_value_t = 0)]
    keep_alive: u64,
    /// `exit` (under a launcher) or `unload` (standalone).
    #[arg(long, env = "FLEET_IDLE_ACTION", default_value = "unload",
          value_parser = one_of(&IdleAction::NAMED))]
    idle_action: IdleAction,
    /// Seconds in-flight jobs may take to finish after SIGTERM before they are requeued.
    #[arg(long, env = "FLEET_DRAIN_GRACE", default_value_t = 60)]
    drain_grace: u64,
    /// Milliseconds to wait before requeueing a job whose attempt failed with a retryable error.
    #[arg(long, env = "FLEET_RETRY_BACKOFF_MS", default_value_t = 1000)]
    retry_backoff_ms: u64,
    /// MiB of host memory one request's images may take: a request needs 3 bytes per output pixel per
    /// image, plus one image while it is encoded (`3·w·h·(n+1)`); a larger one fails at once with
    /// `validation_error` instead of exhausting the worker. 4096 MiB fits four 14142² images.
    #[arg(long, env = "FLEET_IMAGE_MEMORY_BUDGET_MB", default_value_t = 4096)]
    image_memory_budget_mb: u64,
    /// How long an upload is retried while the object store is unavailable (exponential backoff, the
    /// encoded images kept in memory) before the job fails with `storage_error`: `300s`, `5m`, `1h`.
    #[arg(long, env = "FLEET_UPLOAD_RETRY_FOR", default_value = "300s", value_parser = parse_duration)]
    upload_retry_for: Duration,
    /// How far back the results stream is replayed at start, and how long an ended request is
    /// remembered (a redelivered job of a request that ended within it is acked without running).
    #[arg(long, env = "FLEET_REPLAY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    replay_window: Duration,
    /// S3 API endpoint.
    #[arg(
        long,
        env = "FLEET_S3_ENDPOINT",
        default_value = "http://127.0.0.1:3900"
    )]
    s3_endpoint: String,
    /// Endpoint clients download from (URLs are signed for it); default: --s3-endpoint.
    #[arg(long, env = "FLEET_S3_PUBLIC_ENDPOINT")]
    s3_public_endpoint: Option<String>,
    /// S3 region (SigV4 signing scope); Garage uses "garage".
    #[arg(long, env = "FLEET_S3_REGION", default_value = "garage")]
    s3_region: String,
    /// S3 access key id (required by `serve`).
    #[arg(long, env = "FLEET_S3_ACCESS_KEY_ID")]
    s3_access_key_id: Option<String>,
    /// S3 secret access key (required by `serve`; redacted in logs).
    #[arg(long, env = "FLEET_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    s3_secret_access_key: Option<String>,
    /// Bucket the images are uploaded to.
    #[arg(long, env = "FLEET_S3_BUCKET", default_value = "fleet")]
    s3_bucket: String,
    /// Serve `{base}/{key}` URLs instead of presigned ones (publicly readable bucket).
    #[arg(long, env = "FLEET_S3_PUBLIC_BASE_URL")]
    s3_public_base_url: Option<String>,
    /// Lifetime of presigned URLs in seconds (at most 7 days).
    #[arg(long, env = "FLEET_URL_LIFETIME", default_value_t = MAX_URL_LIFETIME.as_secs())]
    url_lifetime: u64,
    /// Log format.
    #[arg(long, env = "FLEET_LOG_FORMAT", default_value = "text",
          value_parser = one_of(&LogFormat::NAMED))]
    log_format: LogFormat,
    /// Address of the HTTP listener for `GET /health` (200 once the models are loaded and warmed up and
    /// the worker consumes, 503 before and while draining) and `GET /metrics` (Prometheus). Port 0 picks
    /// a free port. Once listening the worker prints `http <address>` as one line on stdout.
    #[arg(long, env = "FLEET_HTTP")]
    http: Option<std::net::SocketAddr>,
    /// On Kubernetes: keep this pod's `controller.kubernetes.io/pod-deletion-cost` at 1000 while a job
    /// is in flight and 0 otherwise, so scale-down removes idle pods first. Needs POD_NAME and
    /// POD_NAMESPACE (downward API) and a service account allowed to patch pods.
    #[arg(long, env = "FLEET_POD_DELETION_COST")]
    pod_deletion_cost: bool,
    /// Kubernetes API base URL for --pod-deletion-cost (default: the in-cluster API).
    #[arg(long, env = "FLEET_KUBE_API_URL")]
    kube_api_url: Option<String>,
}

/// The flag parser of a library enum from its `NAMED` table: one of the names (listed by `--help`),
/// mapped to its value. The library enums know nothing of clap; the flags live here.
fn one_of<T: Copy + Send + Sync + 'static>(
    named: &'static [(&'static str, T)],
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(named.iter().map(|(name, _)| *name)).map(move |chosen| {
        named
            .iter()
            .find(|(name, _)| *name == chosen)
            .map(|(_, value)| *value)
            .expect("PossibleValuesParser only passes listed names")
    })
}

fn source(id: &str, revision: &Option<String>) -> ModelSource {
    ModelSource {
        id: id.to_string(),
        revision: revision.clone(),
    }
}

fn device(spec: &str) -> anyhow::Result<Device> {
    Ok(match spec {
        "cpu" => Device::Cpu,
        "auto" if candle_core::utils::cuda_is_available() => Device::new_cuda(0)?,
        "auto" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::new_cuda(i)?,
            _ => anyhow::bail!("unknown device {other:?} (auto, cpu, cuda, cuda:N)"),
        },
    })
}

fn dtype(spec: &str, device: &Device) -> anyhow::Result<DType> {
    Ok(match spec {
        "auto" if device.is_cuda() => DType::BF16,
        "auto" | "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => anyhow::bail!("unknown dtype {other:?} (auto, bf16, f16, f32)"),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}

/// The id `nvidia-smi --id` takes for the GPU this process uses: the first of `CUDA_VISIBLE_DEVICES`
/// (an index or a UUID) when set, else the CUDA ordinal.
fn nvidia_smi_id(device: &Device) -> Option<String> {
    let ordinal = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => return None,
    };
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').nth(ordinal).map(|s| s.trim().to_string()),
        _ => Some(ordinal.to_string()),
    }
}

/// Binds `--http`, announces the bound address on stdout and serves `/health` and `/metrics` until the
/// process exits.
async fn listen(addr: std::net::SocketAddr, status: Arc<WorkerStatus>) -> anyhow::Result<()> {
    use std::io::Write;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --http {addr}"))?;
    let bound = listener.local_addr().context("--http local address")?;
    tracing::info!(%bound, "health and metrics listener");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "http {bound}").context("announcing the http address")?;
        out.flush().context("announcing the http address")?;
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, fleet_worker::status::router(status)).await {
            tracing::error!(error = %e, "health and metrics listener failed");
        }
    });
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_tracing(args.log_format);
    let device = device(&args.device)?;
    let status = WorkerStatus::new(nvidia_smi_id(&device));
    if let Some(addr) = args.http {
        listen(addr, status.clone()).await?;
    }
    if args.pod_deletion_cost {
        let cost = fleet_worker::k8s::PodDeletionCost::from_env(args.kube_api_url.as_deref())
            .context("--pod-deletion-cost")?;
        tokio::spawn(cost.follow(status.busy()));
    }
    let dtype = dtype(&args.dtype, &device)?;
    let config = WorkerConfig {
        worker_id: args
            .worker_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id())),
        amqp_url: args.amqp_url.clone(),
        topology: Topology {
            prefix: args.topology_prefix.clone(),
            delivery_limit: args.delivery_limit,
            results_max_age: args.results_max_age.clone(),
        },
        endpoints: args.endpoints.clone(),
        max_concurrency: args.max_concurrency,
        max_batch: args.max_batch,
        batch_wait: Duration::from_millis(args.batch_wait),
        keep_alive: (args.keep_alive > 0).then(|| Duration::from_secs(args.keep_alive)),
        idle_action: args.idle_action,
        drain_grace: Duration::from_secs(args.drain_grace),
        retry_backoff: Duration::from_millis(args.retry_backoff_ms),
        image_memory_budget: args.image_memory_budget_mb << 20,
        upload_retry_for: args.upload_retry_for,
        replay_window: args.replay_window,
        storage: StorageConfig {
            endpoint: args.s3_endpoint.clone(),
            public_endpoint: args.s3_public_endpoint.clone(),
            region: args.s3_region.clone(),
            access_key_id: args
                .s3_access_key_id
                .clone()
                .context("--s3-access-key-id (FLEET_S3_ACCESS_KEY_ID) is required")?,
            secret_access_key: args
                .s3_secret_access_key
                .clone()
                .context("--s3-secret-access-key (FLEET_S3_SECRET_ACCESS_KEY) is required")?,
            bucket: args.s3_bucket.clone(),
            public_base_url: args.s3_public_base_url.clone(),
            url_lifetime: Duration::from_secs(args.url_lifetime),
        },
    };
    let factory = SanaFactory {
        config: SanaFactoryConfig {
            base: source(&args.base_model, &args.base_revision),
            sprint: source(&args.sprint_model, &args.sprint_revision),
            device,
            dtype,
            safety_version: args.safety_checker,
            safety_model: args
                .safety_model
                .as_deref()
                .map(|id| source(id, &args.safety_revision)),
        },
    };
    tracing::info!(models = ?factory.config, "model configuration");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        fleet::signal::shutdown_signal().await;
        tracing::info!("shutdown signal received; draining");
        signal.cancel();
    });
    match fleet_worker::run_with_status(config, Box::new(factory), shutdown, status).await {
        Ok(WorkerExit::Idle) => tracing::info!("idle: exiting"),
        Ok(WorkerExit::Shutdown) => tracing::info!("drained: exiting"),
        Err(e) => {
            tracing::error!(error = %e, code = e.exit_code(), "worker failed");
            return Ok(ExitCode::from(e.exit_code()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Serve(args)) => serve(args).await,
        // Model forwards stay off the async runtime's worker threads.
        Some(Command::Generate(args)) => tokio::task::spawn_blocking(move || generate::run(args))
            .await
            .context("generate task")?
            .map(|()| ExitCode::SUCCESS),
        Some(Command::Fleet(args)) => fleet_cmd::run(args).await.map(|()| ExitCode::SUCCESS),
        None => serve(cli.serve).await,
    }
}
