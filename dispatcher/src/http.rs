//! The dispatcher's HTTP door: router, API-key check, concurrency limit, request metrics, and serving
//! over plain TCP or rustls (service-contract §4).
//!
//! Routes live under `/{owner}/{app}` (configurable, default `local/sana`); the `/sprint` submit path
//! picks the sprint pipeline, and request routes are also answered under `/{owner}/{app}/sprint/…` for
//! clients that keep the path. `/health`, `/metrics` and the playground page (static, no data: its script
//! sends the key the user types) need no key; everything else does when keys are configured. A semaphore
//! bounds in-flight requests (SSE streams excepted, they are long-lived): a request waits up to
//! `admission_timeout` for a permit, then gets 503 (never 429, which fal clients retry blindly).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use tokio_util::sync::CancellationToken;

pub use crate::app::{AppState, HttpConfig};
use crate::reply::ApiError;
use crate::{handlers, playground};

/// The whole API.
pub fn router(state: AppState) -> Router {
    let base = format!("/{}/{}", state.config().owner, state.config().app);
    let mut api = Router::new()
        .route(&base, post(handlers::submit_base))
        .route(&format!("{base}/sprint"), post(handlers::submit_sprint))
        .route("/openapi.json", get(handlers::openapi));
    for prefix in [base.clone(), format!("{base}/sprint")] {
        api = api
            .route(
                &format!("{prefix}/requests/{{request_id}}"),
                get(handlers::result),
            )
            .route(
                &format!("{prefix}/requests/{{request_id}}/status"),
                get(handlers::status),
            )
            .route(
                &format!("{prefix}/requests/{{request_id}}/cancel"),
                put(handlers::cancel),
            );
    }
    let api = api.layer(middleware::from_fn_with_state(state.clone(), limit));
    let mut streams = Router::new();
    for prefix in [base.clone(), format!("{base}/sprint")] {
        streams = streams.route(
            &format!("{prefix}/requests/{{request_id}}/status/stream"),
            get(handlers::status_stream),
        );
    }
    let guarded = api
        .merge(streams)
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(handlers::health))
        .route(&format!("{base}/playground"), get(playground::page))
        .route(
            &format!("{base}/playground/app.js"),
            get(playground::script),
        )
        .route("/metrics", get(handlers::metrics))
        .merge(guarded)
        .fallback(handlers::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// `Authorization: Key <key>` against the configured keys (fal's scheme), 401 otherwise.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &state.config().api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Key ").or_else(|| v.strip_prefix("key ")))
        .map(str::trim);
    // Compare against every key without stopping early, so timing does not reveal which one matched.
    let ok = given.is_some_and(|g| {
        keys.iter().fold(false, |acc, k| {
            acc | constant_time_eq(k.as_bytes(), g.as_bytes())
        })
    });
    if ok {
        return next.run(req).await;
    }
    ApiError::Unauthorized.into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The semaphore at the door.
async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let timeout = state.config().admission_timeout;
    match tokio::time::timeout(timeout, state.limiter().acquire()).await {
        Ok(Ok(_permit)) => next.run(req).await,
        Ok(Err(_)) | Err(_) => ApiError::Overloaded.into_response(),
    }
}

/// Request count, latency and in-flight gauge, labelled by route template (never the raw path).
/// Also gives HTTP/2 requests (which carry `:authority`, not `Host`) a `Host` header, from which
/// the handlers derive the public URLs.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if !req.headers().contains_key(header::HOST) {
        if let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| axum::http::HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let metrics = state.metrics();
    metrics.http_in_flight.inc();
    let started = Instant::now();
    let resp = next.run(req).await;
    metrics.http_in_flight.dec();
    metrics
        .http_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .http_requests
        .with_label_values(&[&route, &method, resp.status().as_str()])
        .inc();
    resp
}

/// Where and how to listen.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    /// PEM certificate chain and private key; TLS when both are set.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Serves `app` until `shutdown`, then drains open connections (at most `grace`).
pub async fn serve(
    app: Router,
    listen: &ListenConfig,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let grace = Duration::from_secs(10);
    let handle = axum_server::Handle::new();
    {
        let handle = handle.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            handle.graceful_shutdown(Some(grace));
        });
    }
    let listener = std::net::TcpListener::bind(listen.addr)?;
    listener.set_nonblocking(true)?;
    on_bound(listener.local_addr()?);
    let svc = app.into_make_service();
    match &listen.tls {
        Some((cert, key)) => {
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await?;
            axum_server::from_tcp_rustls(listener, tls)?
                .handle(handle)
                .serve(svc)
                .await
        }
        None => {
            axum_server::from_tcp(listener)?
                .handle(handle)
                .serve(svc)
                .await
        }
    }
}
