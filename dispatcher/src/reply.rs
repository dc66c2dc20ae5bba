//! The dispatcher's HTTP answers in one place: JSON bodies with fal's headers, and [`ApiError`], every
//! error the API answers with its status, body and headers (STYLE "Errors": one mapping; meilisearch's
//! `ErrorCode`). Internal causes are logged where they happen and never reach a body.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

pub const REQUEST_ID_HEADER: &str = "x-fal-request-id";
pub const BILLABLE_UNITS_HEADER: &str = "x-fal-billable-units";
/// fal clients do not retry a 504 that carries this header (a timeout the user asked for).
pub const TIMEOUT_TYPE_HEADER: &str = "x-fal-request-timeout-type";

pub fn set_header(resp: &mut Response, name: &'static str, value: HeaderValue) {
    resp.headers_mut()
        .insert(HeaderName::from_static(name), value);
}

/// Sets `x-fal-request-id` (left out when `id` is not a valid header value).
pub fn set_request_id(resp: &mut Response, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        set_header(resp, REQUEST_ID_HEADER, v);
    }
}

/// A JSON response with optional `x-fal-request-id`.
pub fn json_response(status: StatusCode, body: &Value, request_id: Option<&str>) -> Response {
    let mut resp = (status, axum::Json(body.clone())).into_response();
    if let Some(id) = request_id {
        set_request_id(&mut resp, id);
    }
    resp
}

/// Seconds in `Retry-After` while the broker is away (it reconnects with backoff of at most 5 s).
const RETRY_AFTER_QUEUE: &str = "2";
/// Seconds in `Retry-After` while the replay at start runs.
const RETRY_AFTER_REPLAY: &str = "1";

/// 503 with `Retry-After: secs` and a JSON body.
fn retry_later(body: &Value, secs: &'static str) -> Response {
    let mut resp = json_response(StatusCode::SERVICE_UNAVAILABLE, body, None);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
    resp
}

/// Every error the HTTP API answers. No variant is 408, 409 or 429: fal's clients retry those.
#[derive(Debug)]
pub enum ApiError {
    /// 401: no key, or not one of the configured keys.
    Unauthorized,
    /// 503 with `Retry-After: 1`: no admission permit within `admission_timeout`.
    Overloaded,
    /// 503 with `Retry-After`: the broker did not confirm a publish (it is away or restarting; the cause
    /// is logged by the caller).
    QueueUnavailable,
    /// 503 with `Retry-After`: the dispatcher is still replaying the results stream after its start.
    Replaying,
    /// 404 of the request routes for an unknown `request_id`.
    RequestNotFound(String),
    /// 404 of the request routes for a request that ended longer ago than the retention (seconds) and
    /// was evicted.
    RequestExpired(String, u64),
    /// 404 of the cancel route for an unknown `request_id`, in fal's cancel vocabulary.
    CancelNotFound(String),
    /// 404 of a path no route matches.
    NoRoute,
    /// 422 with FastAPI's `{"detail": [...]}` body and `x-fal-billable-units: 0`.
    Invalid(Value),
    /// The body could not be read (413 over the size limit, 400 unreadable), with axum's reason.
    Body(StatusCode, String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Unauthorized => {
                let body = json!({"detail": "Missing or invalid API key; send `Authorization: Key <key>`"});
                let mut resp = json_response(StatusCode::UNAUTHORIZED, &body, None);
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Key"));
                resp
            }
            ApiError::Overloaded => {
                let body = json!({"detail": "Too many concurrent requests; try again later"});
                let mut resp = json_response(StatusCode::SERVICE_UNAVAILABLE, &body, None);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                resp
            }
            ApiError::QueueUnavailable => retry_later(
                &json!({"detail": "The queue is unavailable; try again later", "error_type": "internal_error"}),
                RETRY_AFTER_QUEUE,
            ),
            ApiError::Replaying => retry_later(
                &json!({"detail": "The dispatcher is starting (replaying the results stream); try again shortly", "error_type": "internal_error"}),
                RETRY_AFTER_REPLAY,
            ),
            ApiError::RequestNotFound(id) => json_response(
                StatusCode::NOT_FOUND,
                &json!({"detail": "Request not found"}),
                Some(&id),
            ),
            ApiError::RequestExpired(id, kept) => json_response(
                StatusCode::NOT_FOUND,
                &json!({
                    "detail": "Request not found: it ended longer ago than results are kept",
                    "error_type": "request_expired",
                    "retention_seconds": kept,
                }),
                Some(&id),
            ),
            ApiError::CancelNotFound(id) => json_response(
                StatusCode::NOT_FOUND,
                &json!({"status": "NOT_FOUND"}),
                Some(&id),
            ),
            ApiError::NoRoute => {
                json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"}), None)
            }
            ApiError::Body(status, reason) => {
                let mut resp = json_response(status, &json!({"detail": reason}), None);
                set_header(
                    &mut resp,
                    BILLABLE_UNITS_HEADER,
                    HeaderValue::from_static("0"),
                );
                resp
            }
            ApiError::Invalid(body) => {
                let mut resp = json_response(StatusCode::UNPROCESSABLE_ENTITY, &body, None);
                set_header(
                    &mut resp,
                    BILLABLE_UNITS_HEADER,
                    HeaderValue::from_static("0"),
                );
                resp
            }
        }
    }
}
