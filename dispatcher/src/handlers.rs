//! Handlers of fal's queue API (service-contract §4), wire-compatible with fal-client's
//! `SyncRequestHandle`/`AsyncRequestHandle` and fal-js: submit answers `request_id`, `response_url`,
//! `status_url`, `cancel_url`; status always carries `logs` (null unless `?logs=1|true`), plus
//! `queue_position` while `IN_QUEUE` and `metrics` once `COMPLETED`. Only the statuses `IN_QUEUE`,
//! `IN_PROGRESS` and `COMPLETED` exist; failures are `COMPLETED` with `error`/`error_type`, and the
//! result endpoint answers the error type's HTTP status. No handler answers 408, 409 or 429 (fal's
//! clients retry those).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::reply::{
    json_response, set_header, set_request_id, ApiError, BILLABLE_UNITS_HEADER, TIMEOUT_TYPE_HEADER,
};
use crate::state::{Outcome, Registry, SharedRegistry, Status, START_TIMEOUT_TOO_LONG};
use crate::submit::{submit, Priority, SubmitError, SubmitOptions};
use fleet::events::{ErrorType, Event};
use fleet::job::{validate_request_id, EndpointKind};

/// The `{request_id}` path segment, checked like every client-supplied id (422 naming it otherwise).
fn request_id(params: &HashMap<String, String>) -> Result<String, ApiError> {
    let id = params.get("request_id").cloned().unwrap_or_default();
    validate_request_id(&id, &["path", "request_id"])
        .map_err(|e| ApiError::Invalid(e.to_body()))?;
    Ok(id)
}

/// One bad location outside the body schema (headers, malformed JSON).
struct BadInput {
    loc: Value,
    kind: &'static str,
    msg: &'static str,
    input: Value,
}

impl BadInput {
    /// FastAPI's 422 for it.
    fn response(self) -> Response {
        let detail =
            json!({"loc": self.loc, "msg": self.msg, "type": self.kind, "input": self.input});
        ApiError::Invalid(json!({ "detail": [detail] })).into_response()
    }
}

/// The public base of this app's URLs: `--public-url`, else the scheme and `Host` of the request.
fn app_base(state: &AppState, headers: &HeaderMap) -> String {
    let cfg = state.config();
    let origin = match &cfg.public_url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost");
            let scheme = if cfg.https { "https" } else { "http" };
            format!("{scheme}://{host}")
        }
    };
    format!("{origin}/{}/{}", cfg.owner, cfg.app)
}

fn urls(base: &str, id: &str) -> Value {
    let response_url = format!("{base}/requests/{id}");
    json!({
        "request_id": id,
        "response_url": response_url,
        "status_url": format!("{response_url}/status"),
        "cancel_url": format!("{response_url}/cancel"),
    })
}

/// The status body of `id`, as the status endpoint and the SSE stream send it.
pub fn status_body(
    reg: &Registry,
    base: &str,
    id: &str,
    with_logs: bool,
) -> Option<(Status, Value)> {
    let view = reg.get(id)?;
    let status = reg.status(id)?;
    let mut body = urls(base, id);
    body["status"] = json!(status.as_str());
    body["logs"] = if with_logs {
        Value::Array(view.logs.iter().map(|l| l.to_json()).collect())
    } else {
        Value::Null
    };
    match status {
        Status::InQueue { position } => body["queue_position"] = json!(position),
        Status::InProgress => {}
        Status::Completed => {
            body["metrics"] = json!({ "inference_time": view.inference_time() });
            if let Some(Outcome::Failed {
                error, error_type, ..
            }) = &view.outcome
            {
                body["error"] = json!(error);
                body["error_type"] = json!(error_type.as_str());
            }
        }
    }
    Some((status, body))
}

fn wants_logs(q: &HashMap<String, String>) -> bool {
    q.get("logs")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

pub async fn submit_base(
    state: State<AppState>,
    headers: HeaderMap,
    q: Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    let body = read_body(body).await;
    submit_kind(state, EndpointKind::Base, headers, q, body).await
}

pub async fn submit_sprint(
    state: State<AppState>,
    headers: HeaderMap,
    q: Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    let body = read_body(body).await;
    submit_kind(state, EndpointKind::Sprint, headers, q, body).await
}

/// Largest submit body read (axum's default limit, 2 MiB).
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// How much of an oversized body is read and discarded before the 413: a client that is still sending gets
/// the answer instead of a reset stream (HTTP/2 cancels a stream whose body the server stops reading; curl
/// reports that as exit 92 with no status). Past this the stream is reset after all.
const DRAIN_BYTES: usize = 64 << 20;

/// The body, up to [`MAX_BODY_BYTES`]; an oversized one is drained (up to [`DRAIN_BYTES`]) and answered 413.
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::Body(
                StatusCode::BAD_REQUEST,
                format!("Failed to read the request body: {e}"),
            )
        })?;
        seen = seen.saturating_add(chunk.len());
        if seen <= MAX_BODY_BYTES {
            buf.extend_from_slice(&chunk);
        } else if seen > DRAIN_BYTES {
            break;
        }
    }
    if seen > MAX_BODY_BYTES {
        return Err(ApiError::Body(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Failed to buffer the request body: length limit exceeded".into(),
        ));
    }
    Ok(Bytes::from(buf))
}

/// Whether `id` has a view here. A request submitted on another dispatcher a moment ago may not yet have
/// its `queued` event read by this one, so before saying no the view catches up with the results stream
/// (waiting at most `read_your_writes_timeout`): an id that any replica handed out is known to every
/// replica. An expired id is answered at once.
async fn known(state: &AppState, id: &str) -> bool {
    let has = || state.registry().read(|r| r.get(id).is_some());
    if has() {
        return true;
    }
    if !state.registry().read(|r| r.is_expired(id)) {
        let within = state.config().read_your_writes_timeout;
        if let Err(e) = state.bus().catch_up(within).await {
            tracing::warn!(request_id = id, error = %e, "could not catch up with the results stream; answering from the view");
        }
        return has();
    }
    false
}

/// The 404 of the request routes: fal's "Request not found", or that it expired when the request ended
/// longer ago than the retention (`state` module docs).
fn not_found_or_expired(state: &AppState, id: String) -> Response {
    if state.registry().read(|r| r.is_expired(&id)) {
        let kept = state
            .registry()
            .retention()
            .map_or(0, |r| r.finished.as_secs());
        ApiError::RequestExpired(id, kept).into_response()
    } else {
        ApiError::RequestNotFound(id).into_response()
    }
}

/// The submit options carried by the query (`fal_webhook`) and headers, or the header that does not parse.
fn submit_options(
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    registry: &SharedRegistry,
) -> Result<SubmitOptions, BadInput> {
    let mut opts = SubmitOptions {
        webhook_url: q.get("fal_webhook").cloned(),
        ..SubmitOptions::default()
    };
    // fal-client ≥ 0.5 sends X-Fal-Request-Start-Timeout; the contract names X-Fal-Request-Timeout.
    for name in ["x-fal-request-timeout", "x-fal-request-start-timeout"] {
        if let Some(v) = headers.get(name) {
            let text = v.to_str().unwrap_or("");
            match text.trim().parse::<f64>() {
                Ok(secs)
                    if secs.is_finite() && secs > 0.0 && !registry.accepts_start_timeout(secs) =>
                {
                    return Err(BadInput {
                        loc: json!(["header", name]),
                        kind: "less_than_equal",
                        msg: START_TIMEOUT_TOO_LONG,
                        input: json!(text),
                    })
                }
                Ok(secs) if secs.is_finite() && secs > 0.0 => opts.start_timeout = Some(secs),
                _ => {
                    return Err(BadInput {
                        loc: json!(["header", name]),
                        kind: "float_parsing",
                        msg: "Input should be a positive number of seconds",
                        input: json!(text),
                    })
                }
            }
        }
    }
    if let Some(v) = headers.get("x-fal-queue-priority") {
        let text = v.to_str().unwrap_or("");
        opts.priority = text.parse::<Priority>().map_err(|_| BadInput {
            loc: json!(["header", "x-fal-queue-priority"]),
            kind: "literal_error",
            msg: "Input should be 'normal' or 'low'",
            input: json!(text),
        })?;
    }
    Ok(opts)
}

async fn submit_kind(
    State(state): State<AppState>,
    kind: EndpointKind,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Result<Bytes, ApiError>,
) -> Response {
    let metrics = state.metrics();
    let body = match body {
        Ok(body) => body,
        Err(err) => {
            metrics.submission(kind, "http", "invalid");
            return err.into_response();
        }
    };
    let parsed = match serde_json::from_slice::<Value>(&body) {
        Ok(raw) => submit_options(&headers, &q, state.registry()).map(|opts| (raw, opts)),
        Err(e) => Err(BadInput {
            loc: json!(["body", e.column()]),
            kind: "json_invalid",
            msg: "JSON decode error",
            input: json!({}),
        }),
    };
    let (raw, opts) = match parsed {
        Ok(parsed) => parsed,
        Err(bad) => {
            metrics.submission(kind, "http", "invalid");
            return bad.response();
        }
    };
    let accepted = match submit(state.bus(), kind, &raw, opts).await {
        Ok(a) => a,
        Err(SubmitError::Invalid(err)) => {
            metrics.submission(kind, "http", "invalid");
            return ApiError::Invalid(err.to_body()).into_response();
        }
        Err(SubmitError::Broker(e)) => {
            metrics.submission(kind, "http", "error");
            tracing::error!(error = %e, "submit failed at the broker");
            return ApiError::QueueUnavailable.into_response();
        }
    };
    metrics.submission(kind, "http", "accepted");
    let id = accepted.request_id;
    // Read-your-writes: answer with the position the stream gives, so a status poll right after this
    // response never sees an unknown request. Fall back to an estimate if the stream lags.
    let seen = state
        .registry()
        .wait_for(state.config().read_your_writes_timeout, |r| {
            r.get(&id).is_some()
        })
        .await;
    let position = state.registry().read(|r| match r.status(&id) {
        Some(Status::InQueue { position }) => position,
        Some(Status::InProgress | Status::Completed) => 0,
        None => r.queued_count(kind),
    });
    if !seen {
        tracing::warn!(
            request_id = id,
            "queued event not read back in time; queue position estimated"
        );
    }
    let mut body = urls(&app_base(&state, &headers), &id);
    body["status"] = json!("IN_QUEUE");
    body["queue_position"] = json!(position);
    json_response(StatusCode::OK, &body, Some(&id))
}

pub async fn status(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let id = match request_id(&params) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = state.replayed().await {
        return e.into_response();
    }
    if !known(&state, &id).await {
        return not_found_or_expired(&state, id);
    }
    let base = app_base(&state, &headers);
    match state
        .registry()
        .read(|r| status_body(r, &base, &id, wants_logs(&q)))
    {
        Some((Status::Completed, body)) => json_response(StatusCode::OK, &body, Some(&id)),
        Some((_, body)) => json_response(StatusCode::ACCEPTED, &body, Some(&id)),
        None => not_found_or_expired(&state, id),
    }
}

pub async fn status_stream(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let id = match request_id(&params) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = state.replayed().await {
        return e.into_response();
    }
    let base = app_base(&state, &headers);
    let logs = wants_logs(&q);
    if !known(&state, &id).await {
        return not_found_or_expired(&state, id);
    }
    let registry = state.registry().clone();
    let mut changes = registry.subscribe();
    let stream_id = id.clone();
    let events = async_stream::stream! {
        let mut last: Option<Value> = None;
        loop {
            let current = registry.read(|r| status_body(r, &base, &stream_id, logs));
            let Some((status, body)) = current else { break };
            if last.as_ref() != Some(&body) {
                yield Ok::<SseEvent, Infallible>(SseEvent::default().data(body.to_string()));
                last = Some(body);
            }
            if status == Status::Completed || changes.changed().await.is_err() {
                break;
            }
        }
    };
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    set_request_id(&mut resp, &id);
    resp
}

pub async fn result(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    let id = match request_id(&params) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = state.replayed().await {
        return e.into_response();
    }
    if !known(&state, &id).await {
        return not_found_or_expired(&state, id);
    }
    let Some(view) = state.registry().read(|r| r.get(&id).cloned()) else {
        return not_found_or_expired(&state, id);
    };
    let (status, body, units) = match &view.outcome {
        None => (
            StatusCode::BAD_REQUEST,
            json!({"detail": "Request is still in progress", "status": if view.is_terminal() { "COMPLETED" } else { "IN_PROGRESS" }}),
            0,
        ),
        Some(Outcome::Succeeded {
            result,
            billable_units,
            ..
        }) => (StatusCode::OK, result.clone(), *billable_units),
        Some(Outcome::Failed {
            error,
            error_type,
            detail,
        }) => {
            let code = StatusCode::from_u16(error_type.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let shown = match (error_type, detail) {
                (ErrorType::ValidationError, Some(d)) => d.clone(),
                _ => json!(error),
            };
            (
                code,
                json!({"detail": shown, "error_type": error_type.as_str()}),
                0,
            )
        }
    };
    let mut resp = json_response(status, &body, Some(&id));
    set_header(&mut resp, BILLABLE_UNITS_HEADER, HeaderValue::from(units));
    if matches!(
        &view.outcome,
        Some(Outcome::Failed {
            error_type: ErrorType::RequestTimeout,
            ..
        })
    ) {
        set_header(
            &mut resp,
            TIMEOUT_TYPE_HEADER,
            HeaderValue::from_static("user"),
        );
    }
    resp
}

pub async fn cancel(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    let id = match request_id(&params) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = state.replayed().await {
        return e.into_response();
    }
    // Not known even after catching up (or expired): answered below.
    known(&state, &id).await;
    let Some((kind, terminal)) = state
        .registry()
        .read(|r| r.get(&id).map(|v| (v.endpoint, v.is_terminal())))
    else {
        if state.registry().read(|r| r.is_expired(&id)) {
            // It ended longer ago than the retention: it is no longer cancellable, as when it is shown.
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"status": "ALREADY_COMPLETED"}),
                Some(&id),
            );
        }
        return ApiError::CancelNotFound(id).into_response();
    };
    if terminal {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"status": "ALREADY_COMPLETED"}),
            Some(&id),
        );
    }
    // Queued: workers skip a cancelled id, so it never runs. Running: the worker stops between steps.
    let event = Event::cancelled(id.clone(), kind);
    if let Err(e) = state.bus().publish_event(&event).await {
        tracing::error!(request_id = id, error = %e, "publishing the cancellation failed");
        return ApiError::QueueUnavailable.into_response();
    }
    let timeout = state.config().read_your_writes_timeout;
    state
        .registry()
        .wait_for(timeout, |r| r.get(&id).is_some_and(|v| v.is_terminal()))
        .await;
    json_response(
        StatusCode::ACCEPTED,
        &json!({"status": "CANCELLATION_REQUESTED"}),
        Some(&id),
    )
}

/// 200 once the stream replay is complete, 503 before. `?wait_ms=N` (at most 30 s) long-polls for
/// readiness, so a supervisor or test waits on the event instead of sleeping.
pub async fn health(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let wait = q
        .get("wait_ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        .min(30_000);
    if wait > 0 {
        state.wait_ready(Duration::from_millis(wait)).await;
    }
    let ready = state.is_ready();
    let requests = state.registry().read(|r| r.len());
    let body = json!({"status": if ready { "ok" } else { "replaying" }, "requests": requests});
    json_response(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &body,
        None,
    )
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    )
        .into_response()
}

pub async fn openapi(State(state): State<AppState>) -> Response {
    let cfg = state.config();
    json_response(
        StatusCode::OK,
        &super::openapi::document(&cfg.owner, &cfg.app),
        None,
    )
}

pub async fn not_found() -> Response {
    ApiError::NoRoute.into_response()
}
