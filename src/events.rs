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

impl std::str::FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            EventKind::Queued,
            EventKind::Started,
            EventKind::Progress,
            EventKind::Completed,
            EventKind::Failed,
            EventKind::Cancelled,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| {
            format!("unknown event {s:?} (expected queued, started, progress, completed, failed or cancelled)")
        })
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
    /// The images were generated but could not be stored: the object store stayed unavailable for the
    /// worker's whole upload retry window (`--upload-retry-for`). Not part of fal's list; 500 like
    /// `runner_server_error`, so clients treat it the same way.
    StorageError,
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
            ErrorType::StorageError => 500,
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
            ErrorType::StorageError => "storage_error",
        }
    }
}

/// One lifecycle event: who it is about, when it was emitted, and what happened with exactly the fields of
/// that kind. On the wire it is one flat JSON object whose `event` field names the kind (serde's internal
/// tagging), e.g. `{"request_id":"r","endpoint":"sprint","at":1.5,"event":"started","worker":"w","attempt":1}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub request_id: String,
    pub endpoint: EndpointKind,
    /// Unix time in seconds (fractional) at which the publisher emitted the event.
    pub at: f64,
    #[serde(flatten)]
    pub body: EventBody,
}

/// What happened, by kind; the serde tag is the `event` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum EventBody {
    Queued(Queued),
    Started(Started),
    Progress(Progress),
    Completed(Completed),
    Failed(Failure),
    Cancelled(Failure),
}

/// `queued`: the request was accepted (published by the dispatcher before its job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queued {
    /// The validated input (seed filled in).
    pub input: JobInput,
    /// Unix seconds after which the job must not start (`X-Fal-Request-Timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<f64>,
    /// URL the dispatcher POSTs the result to (fal's `fal_webhook`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// `started`: a worker took the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub worker: String,
    /// The broker's delivery attempt (1-based).
    pub attempt: u32,
}

/// `progress`: denoising step `step` of `total` just finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub worker: String,
    pub step: u32,
    pub total: u32,
    /// Log line shown in the status `logs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `completed`: the images are stored and the result body is final.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completed {
    pub worker: String,
    pub attempt: u32,
    /// The result body (service-contract §3).
    pub result: Value,
    /// Billing units of the run.
    pub billable_units: u64,
    /// Seconds spent in the pipeline.
    pub inference_time: f64,
}

/// `failed` and `cancelled`: the request ended without images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// A message for the client (never an internal cause).
    pub error: String,
    pub error_type: ErrorType,
    /// Always 0: an ended request without images is not billed.
    pub billable_units: u64,
    /// Validation failures: FastAPI's `detail[]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
    /// The worker that reported the failure; absent when the dispatcher did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

impl Failure {
    pub fn new(error_type: ErrorType, error: impl Into<String>) -> Self {
        Failure {
            error: error.into(),
            error_type,
            billable_units: 0,
            detail: None,
            worker: None,
        }
    }
}

/// A notice about an endpoint kind rather than one request, kept in the results stream beside the
/// events: every request of `endpoint` still waiting for a worker when the notice is read shows it in its
/// status `logs` (the dispatcher applies it to its queued requests in stream order, so every dispatcher
/// and every replay agree). Published with the AMQP `type` [`NOTICE_TYPE`] and routing key
/// `{kind}.notice`; [`crate::queue::subscribe_results`] hides notices from readers of events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub endpoint: EndpointKind,
    /// Unix time in seconds (fractional) at which the publisher emitted the notice.
    pub at: f64,
    #[serde(flatten)]
    pub body: NoticeBody,
}

/// AMQP `type` property of notices in the results stream.
pub const NOTICE_TYPE: &str = "fleet.notice";

/// What the notice says, by kind; the serde tag is the `notice` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum NoticeBody {
    /// A worker that would serve the waiting requests exited before it was ready (issue 12: a start
    /// failure is visible in the waiting requests' `logs`).
    WorkerStartFailed(WorkerStartFailed),
}

/// `worker_start_failed`: which worker, why (the cause its exit status names, never an internal error
/// text), and when the supervisor tries again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStartFailed {
    pub worker: String,
    /// The cause, in words (`its models could not be loaded`).
    pub cause: String,
    /// Consecutive start failures so far.
    pub failures: u32,
    /// Seconds until the next start attempt.
    pub retry_in: f64,
}

impl Notice {
    /// A notice emitted now.
    pub fn new(endpoint: EndpointKind, body: NoticeBody) -> Self {
        Notice {
            endpoint,
            at: now_unix(),
            body,
        }
    }

    /// Routing key on `fleet.events`: `{kind}.notice` (no event pattern, so only the stream takes it).
    pub fn routing_key(&self) -> String {
        format!("{}.notice", self.endpoint.as_str())
    }

    /// The line shown in a waiting request's `logs`.
    pub fn log_line(&self) -> String {
        match &self.body {
            NoticeBody::WorkerStartFailed(f) => format!(
                "worker failed to start: {} ({}); start failure {} in a row, retrying in {:.0} s",
                f.worker, f.cause, f.failures, f.retry_in
            ),
        }
    }
}

impl EventBody {
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::Queued(_) => EventKind::Queued,
            EventBody::Started(_) => EventKind::Started,
            EventBody::Progress(_) => EventKind::Progress,
            EventBody::Completed(_) => EventKind::Completed,
            EventBody::Failed(_) => EventKind::Failed,
            EventBody::Cancelled(_) => EventKind::Cancelled,
        }
    }
}

impl Event {
    /// An event emitted now.
    pub fn new(request_id: impl Into<String>, endpoint: EndpointKind, body: EventBody) -> Self {
        Event {
            request_id: request_id.into(),
            endpoint,
            at: now_unix(),
            body,
        }
    }

    /// A terminal failure event (billing 0).
    pub fn failed(
        request_id: impl Into<String>,
        endpoint: EndpointKind,
        error_type: ErrorType,
        error: impl Into<String>,
    ) -> Self {
        let failure = Failure::new(error_type, error);
        Event::new(request_id, endpoint, EventBody::Failed(failure))
    }

    /// The dispatcher's answer to a client's cancel of a request that had not started.
    pub fn cancelled(request_id: impl Into<String>, endpoint: EndpointKind) -> Self {
        let failure = Failure::new(
            ErrorType::ClientCancelled,
            "Request cancelled by the client",
        );
        Event::new(request_id, endpoint, EventBody::Cancelled(failure))
    }

    pub fn kind(&self) -> EventKind {
        self.body.kind()
    }

    /// Routing key on `fleet.events`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.endpoint.as_str(), self.kind().as_str())
    }

    /// The worker named by the event (`started`, `progress`, `completed`, and `failed` when a worker
    /// reported it).
    pub fn worker(&self) -> Option<&str> {
        match &self.body {
            EventBody::Started(Started { worker, .. })
            | EventBody::Progress(Progress { worker, .. })
            | EventBody::Completed(Completed { worker, .. }) => Some(worker),
            EventBody::Failed(f) | EventBody::Cancelled(f) => f.worker.as_deref(),
            EventBody::Queued(_) => None,
        }
    }

    /// The broker's delivery attempt named by `started` and `completed`.
    pub fn attempt(&self) -> Option<u32> {
        match &self.body {
            EventBody::Started(Started { attempt, .. })
            | EventBody::Completed(Completed { attempt, .. }) => Some(*attempt),
            _ => None,
        }
    }

    /// The result body of a `completed` event.
    pub fn result(&self) -> Option<&Value> {
        match &self.body {
            EventBody::Completed(c) => Some(&c.result),
            _ => None,
        }
    }

    /// Billing units of a terminal event (0 unless `completed`); `None` before the end.
    pub fn billable_units(&self) -> Option<u64> {
        match &self.body {
            EventBody::Completed(c) => Some(c.billable_units),
            EventBody::Failed(f) | EventBody::Cancelled(f) => Some(f.billable_units),
            EventBody::Queued(_) | EventBody::Started(_) | EventBody::Progress(_) => None,
        }
    }

    /// The error type of a `failed` or `cancelled` event.
    pub fn error_type(&self) -> Option<ErrorType> {
        match &self.body {
            EventBody::Failed(f) | EventBody::Cancelled(f) => Some(f.error_type),
            _ => None,
        }
    }
}

/// Stand-ins for tests in every crate: an event of a given kind whose kind-specific fields are
/// placeholders (prompt `"test"`, worker `"test-worker"`, attempt 1, step 1 of 1, an empty result, an
/// internal error). Tests that care about a field build the body themselves.
pub mod testing {
    use super::*;

    pub fn body(endpoint: EndpointKind, kind: EventKind) -> EventBody {
        let worker = || "test-worker".to_string();
        match kind {
            EventKind::Queued => EventBody::Queued(Queued {
                input: crate::job::validate(endpoint, &serde_json::json!({"prompt": "test"}), || 1)
                    .expect("a prompt alone is valid input"),
                deadline: None,
                webhook_url: None,
            }),
            EventKind::Started => EventBody::Started(Started {
                worker: worker(),
                attempt: 1,
            }),
            EventKind::Progress => EventBody::Progress(Progress {
                worker: worker(),
                step: 1,
                total: 1,
                message: None,
            }),
            EventKind::Completed => EventBody::Completed(Completed {
                worker: worker(),
                attempt: 1,
                result: Value::Object(Default::default()),
                billable_units: 0,
                inference_time: 0.0,
            }),
            EventKind::Failed => EventBody::Failed(Failure::new(ErrorType::InternalError, "test")),
            EventKind::Cancelled => {
                EventBody::Cancelled(Failure::new(ErrorType::ClientCancelled, "test"))
            }
        }
    }

    /// [`body`] wrapped in an event emitted now.
    pub fn event(request_id: &str, endpoint: EndpointKind, kind: EventKind) -> Event {
        Event::new(request_id, endpoint, body(endpoint, kind))
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
    /// True when the dispatcher started a broker-side timer for `deadline` ([`crate::queue::DeadlineTimer`]):
    /// that timer is then the only writer of the request's `request_timeout`, and a worker that receives
    /// the job after its deadline skips it without publishing anything.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deadline_timer: bool,
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
            deadline_timer: false,
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
    fn event_kinds_parse_from_their_wire_names() {
        for kind in [
            "queued",
            "started",
            "progress",
            "completed",
            "failed",
            "cancelled",
        ] {
            let parsed: EventKind = kind.parse().expect("known kind");
            assert_eq!(parsed.as_str(), kind);
        }
        assert!("done".parse::<EventKind>().is_err());
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
            deadline_timer: true,
            input,
        };
        let back: JobMessage = serde_json::from_str(&serde_json::to_string(&msg).unwrap()).unwrap();
        assert_eq!(back.submitted_at.to_bits(), msg.submitted_at.to_bits());
        assert_eq!(back, msg);
    }

    #[test]
    fn notices_round_trip_route_and_read() {
        let n = Notice::new(
            EndpointKind::Sprint,
            NoticeBody::WorkerStartFailed(WorkerStartFailed {
                worker: "h-s0-3".into(),
                cause: "its models could not be loaded".into(),
                failures: 2,
                retry_in: 60.0,
            }),
        );
        assert_eq!(n.routing_key(), "sprint.notice");
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["notice"], "worker_start_failed");
        assert_eq!(v["endpoint"], "sprint");
        assert_eq!(v["worker"], "h-s0-3");
        let back: Notice = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, n);
        // A notice is no event: a reader that only knows events cannot mistake it for one.
        assert!(serde_json::from_value::<Event>(v).is_err());
        assert_eq!(
            n.log_line(),
            "worker failed to start: h-s0-3 (its models could not be loaded); start failure 2 in a row, \
             retrying in 60 s"
        );
    }

    #[test]
    fn events_round_trip_and_route() {
        let e = Event::failed("r2", EndpointKind::Base, ErrorType::ValidationError, "bad");
        assert_eq!(e.routing_key(), "base.failed");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "failed");
        assert_eq!(v["error_type"], "validation_error");
        assert_eq!(v["billable_units"], 0);
        assert!(v.get("result").is_none());
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;
    use crate::job::validate;
    use serde_json::json;

    /// The JSON of each kind, as published before events became an enum: same keys, same values.
    #[test]
    fn every_kind_keeps_its_wire_shape() {
        let input = validate(EndpointKind::Sprint, &json!({"prompt": "a fox"}), || 3).unwrap();
        let cases = [
            (
                EventBody::Queued(Queued {
                    input: input.clone(),
                    deadline: Some(9.5),
                    webhook_url: None,
                }),
                json!({"event": "queued", "input": serde_json::to_value(&input).unwrap(), "deadline": 9.5}),
            ),
            (
                EventBody::Started(Started {
                    worker: "w".into(),
                    attempt: 2,
                }),
                json!({"event": "started", "worker": "w", "attempt": 2}),
            ),
            (
                EventBody::Progress(Progress {
                    worker: "w".into(),
                    step: 1,
                    total: 2,
                    message: Some("step 1/2".into()),
                }),
                json!({"event": "progress", "worker": "w", "step": 1, "total": 2, "message": "step 1/2"}),
            ),
            (
                EventBody::Completed(Completed {
                    worker: "w".into(),
                    attempt: 1,
                    result: json!({"seed": 3}),
                    billable_units: 1,
                    inference_time: 0.25,
                }),
                json!({"event": "completed", "worker": "w", "attempt": 1, "result": {"seed": 3},
                       "billable_units": 1, "inference_time": 0.25}),
            ),
            (
                EventBody::Cancelled(Failure::new(ErrorType::ClientCancelled, "bye")),
                json!({"event": "cancelled", "error": "bye", "error_type": "client_cancelled",
                       "billable_units": 0}),
            ),
        ];
        for (body, fields) in cases {
            let event = Event {
                request_id: "r".into(),
                endpoint: EndpointKind::Sprint,
                at: 1795603706.5057933,
                body,
            };
            let mut want =
                json!({"request_id": "r", "endpoint": "sprint", "at": 1795603706.5057933});
            want.as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            assert_eq!(serde_json::to_value(&event).unwrap(), want);
            let back: Event = serde_json::from_str(&want.to_string()).unwrap();
            assert_eq!(back, event);
        }
    }
}
