//! `dispatcher`: the fal-compatible queue API in front of the fleet (service-contract §4, §5).
//!
//! `dispatcher [serve]` runs the HTTP API, the AMQP ingress and the stream follower;
//! `dispatcher submit` submits over AMQP and follows the result topic (progress on stderr, then the image
//! URLs, the result body with `--json`, the images saved with `--download`); `dispatcher results` prints the
//! result stream as JSON lines, filtered by `--endpoint` and `--event`. All logic lives in the
//! `fleet_dispatcher` library; this file only parses flags.
//! Once listening, `serve` prints `listening on <scheme>://<addr>` on stdout (logs go to stderr).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleet::duration::parse_duration;
use fleet::events::EventKind;
use fleet::job::EndpointKind;
use fleet::queue::{StreamOffset, Topology};
use fleet::signal::shutdown_signal;
use fleet_dispatcher::client::{self, EventFilter, SubmitArgs};
use fleet_dispatcher::http::{HttpConfig, ListenConfig};
use fleet_dispatcher::state::Retention;
use fleet_dispatcher::webhooks::{RetryPolicy, Secret, WebhookConfig};
use fleet_dispatcher::{serve, ServeConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "dispatcher",
    version,
    about = "fal-compatible queue API for the Sana fleet"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args, Debug, Clone)]
struct BrokerArgs {
    /// RabbitMQ URL (amqp://user:pass@host:port/vhost).
    #[arg(
        long,
        env = "FLEET_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Prefix of every exchange and queue name.
    #[arg(
        long = "topology-prefix",
        visible_alias = "prefix",
        env = "FLEET_TOPOLOGY_PREFIX",
        default_value = "fleet"
    )]
    prefix: String,
    /// `x-delivery-limit` of the job queues (must match every other process's declaration).
    #[arg(long, env = "FLEET_DELIVERY_LIMIT", default_value_t = 3)]
    delivery_limit: u32,
    /// `x-max-age` of the results stream, RabbitMQ syntax (7D, 12h).
    #[arg(long, env = "FLEET_RESULTS_MAX_AGE", default_value = "7D")]
    results_max_age: String,
}

impl BrokerArgs {
    fn topology(&self) -> Topology {
        Topology {
            prefix: self.prefix.clone(),
            delivery_limit: self.delivery_limit,
            results_max_age: self.results_max_age.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the HTTP API and the AMQP ingress (the default).
    Serve(ServeArgs),
    /// Submit one request over AMQP (fleet.submit) and optionally wait for its images.
    Submit(SubmitCmd),
    /// Print the results stream as JSON lines.
    Results(ResultsCmd),
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "FLEET_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// App owner in the URL: /{owner}/{app}.
    #[arg(long, env = "FLEET_APP_OWNER", default_value = "local")]
    owner: String,
    /// App name in the URL: /{owner}/{app}.
    #[arg(long, env = "FLEET_APP_NAME", default_value = "sana")]
    app: String,
    /// Public origin used in response/status/cancel URLs (default: from the Host header).
    #[arg(long, env = "FLEET_PUBLIC_URL")]
    public_url: Option<String>,
    /// Comma-separated API keys; when set, requests need `Authorization: Key <key>`.
    #[arg(
        long,
        env = "FLEET_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// PEM certificate chain; with --tls-key, serve HTTPS.
    #[arg(long, env = "FLEET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "FLEET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Requests handled at once (SSE streams excepted).
    #[arg(long, env = "FLEET_MAX_CONCURRENCY", default_value_t = 256)]
    max_concurrency: usize,
    /// Seconds a request may wait for a slot before it gets 503.
    #[arg(long, env = "FLEET_ADMISSION_TIMEOUT", default_value_t = 30)]
    admission_timeout: u64,
    /// Seconds the request routes wait for the results-stream replay at start before answering 503.
    #[arg(long, env = "FLEET_REPLAY_WAIT", default_value_t = 10)]
    replay_wait: u64,
    /// How long an ended request stays answerable (status, result, SSE) after its terminal event; later
    /// it answers 404 with `error_type: request_expired`. fal keeps results for 1 h: `3600s`, `1h`.
    #[arg(long, env = "FLEET_RETENTION", default_value = "1h", value_parser = parse_duration)]
    retention: Duration,
    /// How far back the results stream is replayed at start (at least the retention); start timeouts
    /// must fire within it (22 h at most with 24 h).
    #[arg(long, env = "FLEET_REPLAY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    replay_window: Duration,
    /// Consume the AMQP submit queue.
    #[arg(long, env = "FLEET_INGRESS", default_value_t = true, action = clap::ArgAction::Set)]
    ingress: bool,
    /// Unacked AMQP submissions in flight.
    #[arg(long, env = "FLEET_INGRESS_PREFETCH", default_value_t = 16)]
    ingress_prefetch: u16,
    /// Send results to `fal_webhook` URLs (consume the webhook queues).
    #[arg(long, env = "FLEET_WEBHOOKS", default_value_t = true, action = clap::ArgAction::Set)]
    webhooks: bool,
    /// Standard Webhooks signing secret, `whsec_<base64>` (24+ bytes); deliveries are unsigned without it.
    #[arg(long, env = "FLEET_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<Secret>,
    /// Allow webhooks to loopback, private, link-local and unique-local addresses.
    #[arg(long, env = "FLEET_WEBHOOK_ALLOW_PRIVATE")]
    webhook_allow_private: bool,
    /// Seconds one webhook POST may take (connect, send, answer).
    #[arg(long, env = "FLEET_WEBHOOK_TIMEOUT", default_value_t = 10)]
    webhook_timeout: u64,
    /// Milliseconds before the first retry of a failed webhook; doubled each round, with jitter.
    #[arg(long, env = "FLEET_WEBHOOK_RETRY_INITIAL_MS", default_value_t = 5_000)]
    webhook_retry_initial_ms: u64,
    /// Milliseconds: longest wait between two attempts.
    #[arg(long, env = "FLEET_WEBHOOK_RETRY_MAX_MS", default_value_t = 1_800_000)]
    webhook_retry_max_ms: u64,
    /// Seconds after the first attempt during which a webhook is retried before it is dead-lettered.
    #[arg(long, env = "FLEET_WEBHOOK_RETRY_FOR", default_value_t = 7_200)]
    webhook_retry_for: u64,
    /// Webhook POSTs in flight per dispatcher.
    #[arg(long, env = "FLEET_WEBHOOK_CONCURRENCY", default_value_t = 32)]
    webhook_concurrency: u16,
}

#[derive(Args, Debug)]
struct SubmitCmd {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Endpoint kind: base or sprint.
    #[arg(long, env = "FLEET_SUBMIT_ENDPOINT", default_value = "sprint")]
    endpoint: String,
    /// The prompt.
    #[arg(long, env = "FLEET_SUBMIT_PROMPT")]
    prompt: String,
    /// Negative prompt (base only).
    #[arg(long, env = "FLEET_SUBMIT_NEGATIVE_PROMPT")]
    negative_prompt: Option<String>,
    /// Size preset (square_hd, landscape_16_9, …) or WIDTHxHEIGHT.
    #[arg(long, env = "FLEET_SUBMIT_SIZE")]
    size: Option<String>,
    /// Seed (random when absent).
    #[arg(long, env = "FLEET_SUBMIT_SEED")]
    seed: Option<u64>,
    /// Denoising steps.
    #[arg(long, env = "FLEET_SUBMIT_STEPS")]
    steps: Option<u32>,
    /// Images per request (1..=4).
    #[arg(long, env = "FLEET_SUBMIT_NUM_IMAGES")]
    num_images: Option<u32>,
    /// jpeg or png.
    #[arg(long, env = "FLEET_SUBMIT_FORMAT")]
    format: Option<String>,
    /// Webhook URL that receives the result.
    #[arg(long, env = "FLEET_SUBMIT_WEBHOOK")]
    webhook: Option<String>,
    /// normal or low.
    #[arg(long, env = "FLEET_SUBMIT_PRIORITY")]
    priority: Option<String>,
    /// Follow the request, showing its progress on stderr (queue position, steps, upload), then print
    /// its image URLs.
    #[arg(long, env = "FLEET_SUBMIT_WAIT")]
    wait: bool,
    /// Print the result body (JSON) on stdout instead of the request id and URLs; implies --wait.
    #[arg(long, env = "FLEET_SUBMIT_JSON")]
    json: bool,
    /// Save the images under DIR/<request_id>/; implies --wait.
    #[arg(long, env = "FLEET_SUBMIT_DOWNLOAD", value_name = "DIR")]
    download: Option<PathBuf>,
}

impl SubmitCmd {
    fn input(&self) -> anyhow::Result<Value> {
        let mut input = json!({"prompt": self.prompt});
        if let Some(n) = &self.negative_prompt {
            input["negative_prompt"] = json!(n);
        }
        if let Some(size) = &self.size {
            input["image_size"] = match size.split_once('x') {
                Some((w, h)) => json!({
                    "width": w.parse::<u32>().context("--size width")?,
                    "height": h.parse::<u32>().context("--size height")?,
                }),
                None => json!(size),
            };
        }
        for (key, value) in [
            ("seed", self.seed.map(|v| json!(v))),
            ("num_inference_steps", self.steps.map(|v| json!(v))),
            ("num_images", self.num_images.map(|v| json!(v))),
            ("output_format", self.format.as_ref().map(|v| json!(v))),
        ] {
            if let Some(v) = value {
                input[key] = v;
            }
        }
        Ok(input)
    }
}

#[derive(Args, Debug)]
struct ResultsCmd {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Where to start: first, next, an offset, or @unix_seconds.
    #[arg(long, env = "FLEET_RESULTS_FROM", default_value = "first")]
    from: StreamOffset,
    /// Keep reading new events instead of stopping at the present.
    #[arg(long, env = "FLEET_RESULTS_FOLLOW")]
    follow: bool,
    /// Only these endpoint kinds (base, sprint; comma-separated or repeated); all when absent.
    #[arg(long, env = "FLEET_RESULTS_ENDPOINT", value_delimiter = ',')]
    endpoint: Vec<EndpointKind>,
    /// Only these events (queued, started, progress, completed, failed, cancelled; comma-separated or
    /// repeated); all when absent.
    #[arg(long, env = "FLEET_RESULTS_EVENT", value_delimiter = ',')]
    event: Vec<EventKind>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => run_serve(cli.serve).await,
        Some(Command::Serve(args)) => run_serve(args).await,
        Some(Command::Submit(cmd)) => {
            let args = SubmitArgs {
                endpoint: cmd.endpoint.clone(),
                input: cmd.input()?,
                webhook_url: cmd.webhook.clone(),
                priority: cmd.priority.clone(),
                wait: cmd.wait || cmd.json || cmd.download.is_some(),
                json: cmd.json,
                download: cmd.download.clone(),
                tty: std::io::stderr().is_terminal(),
            };
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            client::submit(
                &cmd.broker.amqp_url,
                &cmd.broker.topology(),
                args,
                &mut out,
                &mut err,
            )
            .await
            .context("submit")?;
            Ok(())
        }
        Some(Command::Results(cmd)) => {
            let mut out = std::io::stdout();
            let topology = cmd.broker.topology();
            let filter = EventFilter {
                endpoints: cmd.endpoint.clone(),
                events: cmd.event.clone(),
            };
            let follow = client::results(
                &cmd.broker.amqp_url,
                &topology,
                cmd.from,
                cmd.follow,
                &filter,
                &mut out,
            );
            tokio::select! {
                r = follow => { r.context("reading the results stream")?; }
                _ = shutdown_signal() => {}
            }
            Ok(())
        }
    }
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let topology = args.broker.topology();
    let tls = args.tls_cert.clone().zip(args.tls_key.clone());
    let https = tls.is_some();
    let cfg = ServeConfig {
        amqp_url: args.broker.amqp_url.clone(),
        topology,
        http: HttpConfig {
            owner: args.owner,
            app: args.app,
            public_url: args.public_url,
            api_keys: args
                .api_keys
                .into_iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect(),
            max_concurrency: args.max_concurrency,
            admission_timeout: Duration::from_secs(args.admission_timeout),
            read_your_writes_timeout: Duration::from_secs(5),
            replay_wait: Duration::from_secs(args.replay_wait),
            https,
        },
        listen: ListenConfig {
            addr: args.listen,
            tls,
        },
        webhooks: WebhookConfig {
            enabled: args.webhooks,
            secret: args.webhook_secret,
            allow_private: args.webhook_allow_private,
            timeout: Duration::from_secs(args.webhook_timeout.max(1)),
            retry: RetryPolicy {
                initial: Duration::from_millis(args.webhook_retry_initial_ms.max(1)),
                max_delay: Duration::from_millis(args.webhook_retry_max_ms.max(1)),
                give_up_after: Duration::from_secs(args.webhook_retry_for),
            },
            concurrency: args.webhook_concurrency.max(1),
        },
        ingress: args.ingress,
        ingress_prefetch: args.ingress_prefetch,
        retention: Retention {
            finished: args.retention,
            window: args.replay_window,
        },
    };
    anyhow::ensure!(
        args.replay_window >= args.retention,
        "--replay-window ({:?}) must be at least --retention ({:?})",
        args.replay_window,
        args.retention
    );
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested");
            shutdown.cancel();
        });
    }
    let scheme = if https { "https" } else { "http" };
    serve(cfg, shutdown, |addr| {
        println!("listening on {scheme}://{addr}");
        tracing::info!(%addr, scheme, "listening");
    })
    .await
    .context("dispatcher")
}
