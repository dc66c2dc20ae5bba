//! Lifecycle events published to the `fleet.events` exchange and kept in the `fleet.results` stream
//! (service-contract §5). The stream is the system of record: the dispatcher rebuilds its view of every
//! request from it, and clients poll it for results. Routing key: `{kind}.{event}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::{EndpointKind, JobInput};

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Queued,
    Started,
    Progress,
    Completed,
    Failed,
    Cancelled,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Queued => "queued",
            EventKind::Started => "started",
            EventKind::Progress => "progress",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
        }
    }

    /// `completed`, `failed` and `cancelled` end a request.
    pub fn is_terminal(self) -> bool {
        match self {
            EventKind::Completed | EventKind::Failed | EventKind::Cancelled => true,
            EventKind::Queued | EventKind::Started | EventKind::Progress => false,
        }
    }
}

/// fal's error types (service-contract §4), each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    RequestTimeout,
    RunnerServerError,
    InternalError,
    ClientCancelled,
    BadRequest,
    ValidationError,
}

impl ErrorType {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorType::RequestTimeout => 504,
            ErrorType::RunnerServerError => 500,
            ErrorType::InternalError => 500,
            ErrorType::ClientCancelled => 499,
            ErrorType::BadRequest => 400,
            ErrorType::ValidationError => 422,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::RequestTimeout => "request_timeout",
            ErrorType::RunnerServerError => "runner_server_error",
            ErrorType::InternalError => "internal_error",
            ErrorType::ClientCancelled => "client_cancelled",
            ErrorType::BadRequest => "bad_request",
            ErrorType::ValidationError => "validation_error",
        }
    }
}

/// One lifecycle event. Fields beyond the first four are present only for the kinds noted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub request_id: String,
    pub endpoint: EndpointKind,
    pub event: EventKind,
    /// Unix time in seconds (fractional) at which the publisher emitted the event.
    pub at: f64,
    /// `queued`: the validated input (seed filled in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<JobInput>,
    /// `queued`: unix seconds after which the job must not start (`X-Fal-Request-Timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<f64>,
    /// `queued`: URL the dispatcher POSTs the result to (fal's `fal_webhook`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// `started`: which worker took the job, and the broker's delivery attempt (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// `progress`: denoising step `step` of `total` just finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u32>,
    /// `completed`: the result body (service-contract §3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// `completed` (units of the run) and `failed`/`cancelled` (always 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billable_units: Option<u64>,
    /// `completed`: seconds spent in the pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_time: Option<f64>,
    /// `failed`/`cancelled`: a message for the client (never an internal cause) and its type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<ErrorType>,
    /// `failed` for validation errors: FastAPI's `detail[]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
    /// Free-form log line shown in the status `logs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Event {
    /// An event with only the identifying fields set; fill the rest with struct update syntax.
    pub fn new(request_id: impl Into<String>, endpoint: EndpointKind, event: EventKind) -> Self {
        Event {
            request_id: request_id.into(),
            endpoint,
            event,
            at: now_unix(),
            input: None,
            deadline: None,
            webhook_url: None,
            worker: None,
            attempt: None,
            step: None,
            total: None,
            result: None,
            billable_units: None,
            inference_time: None,
            error: None,
            error_type: None,
            detail: None,
            message: None,
        }
    }

    /// Routing key on `fleet.events`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.endpoint.as_str(), self.event.as_str())
    }

    /// A terminal failure event (billing 0).
    pub fn failed(
        request_id: impl Into<String>,
        endpoint: EndpointKind,
        error_type: ErrorType,
        error: impl Into<String>,
    ) -> Self {
        Event {
            error: Some(error.into()),
            error_type: Some(error_type),
            billable_units: Some(0),
            ..Event::new(request_id, endpoint, EventKind::Failed)
        }
    }
}

/// Current unix time in fractional seconds.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The job message body on `fleet.jobs` (service-contract §5): the validated input plus identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    pub request_id: String,
    pub endpoint: EndpointKind,
    pub submitted_at: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<f64>,
    #[serde(flatten)]
    pub input: JobInput,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::validate;
    use serde_json::json;

    #[test]
    fn job_message_is_flat_input_plus_identity() {
        let input = validate(EndpointKind::Sprint, &json!({"prompt": "a fox"}), || 3).unwrap();
        let msg = JobMessage {
            request_id: "r1".into(),
            endpoint: EndpointKind::Sprint,
            submitted_at: 1.0,
            deadline: None,
            input,
        };
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(v["prompt"], "a fox");
        assert_eq!(v["endpoint"], "sprint");
        assert_eq!(v["seed"], 3);
        let back: JobMessage = serde_json::from_value(v).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn timestamps_survive_json_exactly() {
        // Seen in CI: without serde_json's `float_roundtrip`, 1795603706.5057933 came back as ...505793.
        let input = validate(EndpointKind::Base, &json!({"prompt": "x"}), || 1).unwrap();
        let msg = JobMessage {
            request_id: "r".into(),
            endpoint: EndpointKind::Base,
            submitted_at: 1795603706.5057933,
            deadline: Some(1795603706.5057933 + 0.1),
            input,
        };
        let back: JobMessage = serde_json::from_str(&serde_json::to_string(&msg).unwrap()).unwrap();
        assert_eq!(back.submitted_at.to_bits(), msg.submitted_at.to_bits());
        assert_eq!(back, msg);
    }

    #[test]
    fn events_round_trip_and_route() {
        let e = Event::failed("r2", EndpointKind::Base, ErrorType::ValidationError, "bad");
        assert_eq!(e.routing_key(), "base.failed");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["error_type"], "validation_error");
        assert_eq!(v["billable_units"], 0);
        assert!(v.get("result").is_none());
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
    }
}
