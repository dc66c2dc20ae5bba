//! What every HTTP handler shares: the HTTP settings and [`AppState`] (registry, bus, metrics,
//! readiness, the admission semaphore). Its own module so that `http` (router, middleware) and
//! `handlers` both depend on it and not on each other.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::metrics::Metrics;
use crate::state::SharedRegistry;
use crate::submit::Bus;

/// HTTP settings. `Debug` redacts the API keys.
#[derive(Clone)]
pub struct HttpConfig {
    pub owner: String,
    pub app: String,
    /// Public origin for `response_url` etc. (`https://api.example.com`); derived from `Host` when unset.
    pub public_url: Option<String>,
    /// Accepted `Authorization: Key …` values; empty = no auth.
    pub api_keys: Vec<String>,
    pub max_concurrency: usize,
    pub admission_timeout: Duration,
    /// How long submit/cancel wait to read their own event back from the stream.
    pub read_your_writes_timeout: Duration,
    /// How long the request routes wait for the replay at start before answering 503 (never a 404 from a
    /// half-built view).
    pub replay_wait: Duration,
    /// Whether the server speaks TLS (for derived URLs).
    pub https: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            owner: "local".into(),
            app: "sana".into(),
            public_url: None,
            api_keys: Vec::new(),
            max_concurrency: 256,
            admission_timeout: Duration::from_secs(30),
            read_your_writes_timeout: Duration::from_secs(5),
            replay_wait: Duration::from_secs(10),
            https: false,
        }
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("owner", &self.owner)
            .field("app", &self.app)
            .field("public_url", &self.public_url)
            .field(
                "api_keys",
                &format_args!("[{} redacted]", self.api_keys.len()),
            )
            .field("max_concurrency", &self.max_concurrency)
            .field("admission_timeout", &self.admission_timeout)
            .field("read_your_writes_timeout", &self.read_your_writes_timeout)
            .field("replay_wait", &self.replay_wait)
            .field("https", &self.https)
            .finish()
    }
}

struct Inner {
    cfg: HttpConfig,
    registry: SharedRegistry,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    limiter: Semaphore,
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    pub fn new(
        cfg: HttpConfig,
        registry: SharedRegistry,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        ready: watch::Receiver<bool>,
    ) -> Self {
        let limiter = Semaphore::new(cfg.max_concurrency.max(1));
        AppState(Arc::new(Inner {
            cfg,
            registry,
            bus,
            metrics,
            ready,
            limiter,
        }))
    }

    pub fn config(&self) -> &HttpConfig {
        &self.0.cfg
    }

    pub fn registry(&self) -> &SharedRegistry {
        &self.0.registry
    }

    pub fn bus(&self) -> &dyn Bus {
        self.0.bus.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The semaphore at the door (see `http`).
    pub(crate) fn limiter(&self) -> &Semaphore {
        &self.0.limiter
    }

    pub fn is_ready(&self) -> bool {
        *self.0.ready.borrow()
    }

    /// Waits until the replay is complete or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) {
        let mut rx = self.0.ready.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|r| *r)).await;
    }

    /// For the request routes: Ok once the replay is complete (waiting at most `replay_wait`), else the
    /// 503 to answer. A view still being rebuilt would answer 404 for requests it has not reached yet.
    pub async fn replayed(&self) -> Result<(), crate::reply::ApiError> {
        if !self.is_ready() {
            self.wait_ready(self.0.cfg.replay_wait).await;
        }
        if self.is_ready() {
            Ok(())
        } else {
            Err(crate::reply::ApiError::Replaying)
        }
    }
}
