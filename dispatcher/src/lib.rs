//! The dispatcher: fal-compatible HTTP queue API, AMQP ingress and result-topic client
//! (service-contract §4, §5).
//!
//! It owns no state of its own: every request's view is rebuilt from the `fleet.results` stream
//! (`state`, fed by `follow`), so it can be killed, restarted or run several times side by side.
//! Submissions (`submit`, used by `handlers` and `ingress`) publish a `queued` event and then the job,
//! both confirmed by the broker, before the client gets an answer. `http` is the door (router, key
//! check, admission limit) in front of `handlers`; both share `app` (settings and state), and every error
//! answer comes from `reply`; `playground` is the static page that tries the API in a browser. `client`
//! holds the CLI's `submit`/`results` commands and `progress` their progress display. `deadletter` and
//! `deadlines` close requests whose job the broker dropped or whose start deadline passed. `webhooks`
//! turns terminal events into durable, signed webhook deliveries (its own RabbitMQ queues). The
//! `dispatcher` binary only parses flags and calls [`serve`].

pub mod app;
pub mod client;
pub mod deadletter;
pub mod deadlines;
pub mod follow;
pub mod handlers;
pub mod http;
#[cfg(test)]
mod http_tests;
pub mod ingress;
pub mod metrics;
pub mod openapi;
pub mod playground;
pub mod progress;
pub mod reply;
pub mod state;
pub mod submit;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use deadlines::{RequestWatch, WatchIndex};
use fleet::events::now_unix;
use fleet::queue::{EventSink, Link, QueueError, StreamOffset, StreamReader, Topology};
use fleet::telemetry::redact_url;
use follow::Follower;
use http::{AppState, HttpConfig, ListenConfig};
use metrics::Metrics;
use state::{Retention, SharedRegistry};
use webhooks::{WebhookConfig, Webhooks};

/// Everything `serve` needs. `Debug` redacts the broker password and API keys.
#[derive(Clone)]
pub struct ServeConfig {
    pub amqp_url: String,
    pub topology: Topology,
    pub http: HttpConfig,
    pub listen: ListenConfig,
    pub webhooks: WebhookConfig,
    /// Consume `fleet.submit` (AMQP ingress).
    pub ingress: bool,
    pub ingress_prefetch: u16,
    /// How long ended requests are answered, and how far back a start replays the stream.
    pub retention: Retention,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("topology", &self.topology)
            .field("http", &self.http)
            .field("listen", &self.listen)
            .field("webhooks", &self.webhooks)
            .field("ingress", &self.ingress)
            .field("ingress_prefetch", &self.ingress_prefetch)
            .field("retention", &self.retention)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("webhook HTTP client: {0}")]
    WebhookClient(#[from] reqwest::Error),
}

/// Runs the dispatcher until `shutdown` (or until a part fails for good, which shuts the rest down: the
/// process is meant to be restarted, and a restart replays the stream). A broker that goes away is not
/// such a failure: the [`Link`] reconnects with backoff, the stream reader resumes after its last
/// offset, the consumers start again, and meanwhile the HTTP API serves reads from its view and answers
/// submits 503 with `Retry-After`. `on_bound` receives the listening address.
pub async fn serve(
    cfg: ServeConfig,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), DispatcherError> {
    tracing::info!(config = ?cfg, "dispatcher starting");
    let link = Link::connect(&cfg.amqp_url, &cfg.topology).await?;
    let registry = SharedRegistry::with_retention(cfg.retention);
    let metrics = Arc::new(Metrics::new()?);
    let (ready_tx, ready_rx) = watch::channel(false);
    // One reader of the results stream feeds both the HTTP view and the deadline/dead-letter watch.
    let ingress_registry = registry.clone();
    let follower = Arc::new(Follower {
        registry,
        metrics: metrics.clone(),
        ready: ready_tx,
    });
    let watch_index = Arc::new(WatchIndex::with_window(cfg.retention.window));
    let sinks: Vec<Arc<dyn EventSink>> = vec![follower, watch_index.clone()];
    // Only the replay window is read back at start (state::Retention).
    let from = (now_unix() - cfg.retention.window.as_secs_f64()).max(0.0) as u64;
    let (reader, reading) =
        StreamReader::open(link.clone(), StreamOffset::Timestamp(from), sinks).await?;
    // The reader publishes through the link's confirmed publisher and lets a handler catch up with
    // the stream before it answers that a request is unknown (submitted on another dispatcher).
    let bus: Arc<dyn submit::Bus> = reader.clone();
    let state = AppState::new(
        cfg.http.clone(),
        ingress_registry.clone(),
        bus.clone(),
        metrics.clone(),
        ready_rx,
    );
    let app = http::router(state);
    let watch = RequestWatch::new(watch_index, reader.clone());
    let (ingress_on, ingress_prefetch, listen) =
        (cfg.ingress, cfg.ingress_prefetch, cfg.listen.clone());
    let (link_ref, metrics, bus, watch) = (&*link, &metrics, &bus, &watch);
    let registry = &ingress_registry;
    let hooks = Webhooks::new(link_ref, registry, &reader, metrics, &cfg.webhooks)?;
    hooks.declare().await?;
    let follow_task = {
        let shutdown = shutdown.clone();
        async move {
            let r = reading.run(&shutdown).await;
            if let Err(e) = &r {
                tracing::error!(error = %e, "results stream reader stopped");
            }
            shutdown.cancel();
            r.map_err(DispatcherError::from)
        }
    };
    let ingress_task = {
        let shutdown = shutdown.clone();
        async move {
            if !ingress_on {
                shutdown.cancelled().await;
                return Ok(());
            }
            let r = ingress::run(
                link_ref,
                bus.as_ref(),
                registry,
                metrics,
                ingress_prefetch,
                shutdown.clone(),
            )
            .await;
            if let Err(e) = &r {
                tracing::error!(error = %e, "AMQP ingress stopped");
            }
            shutdown.cancel();
            r.map_err(DispatcherError::from)
        }
    };
    // Dead-lettered jobs and missed start deadlines: nothing accepted is left hanging.
    let recovery_task = {
        let shutdown = shutdown.clone();
        async move {
            let r = deadletter::run_recovery(link_ref, watch, &shutdown).await;
            if let Err(e) = &r {
                tracing::error!(error = %e, "dead-letter and deadline watch stopped");
            }
            shutdown.cancel();
            r.map_err(DispatcherError::from)
        }
    };
    // Durable webhook delivery: terminal events become delivery jobs, sent by whichever dispatcher
    // takes them.
    let webhook_task = {
        let shutdown = shutdown.clone();
        let hooks = &hooks;
        async move {
            let r = hooks.run(&shutdown).await;
            if let Err(e) = &r {
                tracing::error!(error = %e, "webhook delivery stopped");
            }
            shutdown.cancel();
            r.map_err(DispatcherError::from)
        }
    };
    // Eviction also when no events come (state::Retention).
    let sweep_task = {
        let (shutdown, registry, metrics) = (shutdown.clone(), registry.clone(), metrics.clone());
        let every =
            (cfg.retention.finished / 4).clamp(Duration::from_millis(50), Duration::from_secs(10));
        async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok::<(), DispatcherError>(()),
                    _ = tick.tick() => {}
                }
                registry.evict();
                let (views, (ended, tombstones)) = registry.read(|r| (r.len(), r.retained()));
                for (what, n) in [
                    ("views", views),
                    ("ended", ended),
                    ("tombstones", tombstones),
                ] {
                    metrics
                        .retained
                        .with_label_values(&[what])
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
    };
    let http_task = {
        let shutdown = shutdown.clone();
        async move {
            let r = http::serve(app, &listen, shutdown.clone(), on_bound).await;
            shutdown.cancel();
            r.map_err(DispatcherError::from)
        }
    };
    let (f, i, r, w, h, s) = tokio::join!(
        follow_task,
        ingress_task,
        recovery_task,
        webhook_task,
        http_task,
        sweep_task
    );
    link.close("dispatcher shutting down").await;
    f.and(i).and(r).and(w).and(h).and(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let cfg = ServeConfig {
            amqp_url: "amqp://guest:hunter2@rabbit:5672/%2f".into(),
            topology: Topology::default(),
            http: HttpConfig {
                api_keys: vec!["sk-very-secret".into()],
                ..HttpConfig::default()
            },
            listen: ListenConfig {
                addr: "127.0.0.1:0".parse().expect("addr"),
                tls: None,
            },
            webhooks: WebhookConfig {
                secret: Some(
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
                        .parse()
                        .expect("secret"),
                ),
                ..WebhookConfig::default()
            },
            ingress: true,
            ingress_prefetch: 16,
            retention: Default::default(),
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("sk-very-secret"), "{text}");
        assert!(!text.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "{text}");
        assert!(text.contains("amqp://guest:***@rabbit:5672/%2f"));
        assert_eq!(redact_url("amqp://localhost"), "amqp://localhost");
    }
}
