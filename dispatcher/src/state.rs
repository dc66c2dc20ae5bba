//! The dispatcher's view of every request, rebuilt only from lifecycle events (service-contract §5).
//!
//! `Registry::apply` is the whole state machine: `queued` → `IN_QUEUE`, `started`/`progress` →
//! `IN_PROGRESS`, `completed`/`failed`/`cancelled` → `COMPLETED`. The first terminal event wins and
//! everything after it is ignored, so every dispatcher replaying the same stream reaches the same view.
//! The queue position of a request is the number of still-queued requests of the same endpoint kind
//! whose `queued` event came earlier in the stream (0 = next), which is the order the job queue
//! delivers them in. Nothing here talks to the broker; `follow` in `dispatcher::stream` feeds it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use serde_json::{json, Value};
use tokio::sync::watch;

use fleet::events::{ErrorType, Event, EventBody, Notice};
use fleet::job::{EndpointKind, JobInput};

/// fal's three statuses; nothing else goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    InQueue { position: usize },
    InProgress,
    Completed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InQueue { .. } => "IN_QUEUE",
            Status::InProgress => "IN_PROGRESS",
            Status::Completed => "COMPLETED",
        }
    }
}

/// How a finished request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded {
        result: Value,
        billable_units: u64,
        inference_time: Option<f64>,
    },
    Failed {
        error: String,
        error_type: ErrorType,
        detail: Option<Value>,
    },
}

/// One line of fal's `logs` array.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub message: String,
    pub at: f64,
    pub level: LogLevel,
}

/// fal's log levels, as far as the fleet uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    /// Something went wrong for the request (a worker that would serve it failed to start).
    Error,
}

impl LogLine {
    pub fn info(message: impl Into<String>, at: f64) -> Self {
        LogLine {
            message: message.into(),
            at,
            level: LogLevel::Info,
        }
    }

    /// fal's log object: `{message, level, source, timestamp}`.
    pub fn to_json(&self) -> Value {
        let level = match self.level {
            LogLevel::Info => "INFO",
            LogLevel::Error => "ERROR",
        };
        json!({
            "message": self.message,
            "level": level,
            "source": "user",
            "timestamp": iso8601(self.at),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Queued,
    Running,
    Done,
}

/// Everything the API serves about one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestView {
    pub request_id: String,
    pub endpoint: EndpointKind,
    /// Stream offset of the first event seen for this request (its place in the queue).
    pub seq: u64,
    pub submitted_at: f64,
    pub input: Option<JobInput>,
    pub webhook_url: Option<String>,
    pub deadline: Option<f64>,
    pub logs: Vec<LogLine>,
    /// Last `progress` step and total.
    pub step: Option<(u32, u32)>,
    /// Set once, by the first terminal event.
    pub outcome: Option<Outcome>,
    /// Time of the terminal event.
    pub finished_at: Option<f64>,
    phase: Phase,
}

impl RequestView {
    fn new(seq: u64, ev: &Event) -> Self {
        RequestView {
            request_id: ev.request_id.clone(),
            endpoint: ev.endpoint,
            seq,
            submitted_at: ev.at,
            input: None,
            webhook_url: None,
            deadline: None,
            logs: Vec::new(),
            step: None,
            outcome: None,
            finished_at: None,
            phase: Phase::Queued,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Seconds of inference reported by a successful run.
    pub fn inference_time(&self) -> Option<f64> {
        match &self.outcome {
            Some(Outcome::Succeeded { inference_time, .. }) => *inference_time,
            Some(Outcome::Failed { .. }) | None => None,
        }
    }
}

/// What `apply` changed, for metrics and webhooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event was after the terminal one (or a duplicate queued) and changed nothing.
    Ignored,
    Updated,
    /// This event ended the request.
    Finished,
}

/// All requests seen on the stream, plus the per-kind queue order.
#[derive(Debug, Default)]
pub struct Registry {
    views: HashMap<String, RequestView>,
    queued: HashMap<EndpointKind, BTreeSet<(u64, String)>>,
    /// Offset of the last event applied (the follower resumes after it).
    last_offset: Option<u64>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    pub fn get(&self, request_id: &str) -> Option<&RequestView> {
        self.views.get(request_id)
    }

    pub fn len(&self) -> usize {
        self.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    pub fn last_offset(&self) -> Option<u64> {
        self.last_offset
    }

    /// Requests of `kind` still waiting for a worker.
    pub fn queued_count(&self, kind: EndpointKind) -> usize {
        self.queued.get(&kind).map_or(0, BTreeSet::len)
    }

    pub fn status(&self, request_id: &str) -> Option<Status> {
        let view = self.views.get(request_id)?;
        Some(match view.phase {
            Phase::Queued => {
                let position = self
                    .queued
                    .get(&view.endpoint)
                    .map_or(0, |set| set.range(..(view.seq, String::new())).count());
                Status::InQueue { position }
            }
            Phase::Running => Status::InProgress,
            Phase::Done => Status::Completed,
        })
    }

    /// Applies one event read at stream `offset`. Offsets must not go backwards across calls.
    pub fn apply(&mut self, offset: u64, ev: &Event) -> Applied {
        self.last_offset = Some(self.last_offset.map_or(offset, |o| o.max(offset)));
        let fresh = !self.views.contains_key(&ev.request_id);
        let view = self
            .views
            .entry(ev.request_id.clone())
            .or_insert_with(|| RequestView::new(offset, ev));
        if view.phase == Phase::Done {
            return Applied::Ignored;
        }
        // A dispatcher's validation failure is about a submission that was never queued: when it names
        // the id of an accepted request (an invalid submission reusing someone's id), it must not end it.
        if let EventBody::Failed(f) = &ev.body {
            if f.error_type == ErrorType::ValidationError
                && f.worker.is_none()
                && !fresh
                && view.input.is_some()
            {
                return Applied::Ignored;
            }
        }
        let key = (view.seq, view.request_id.clone());
        let queue = self.queued.entry(view.endpoint).or_default();
        let applied = match &ev.body {
            EventBody::Queued(queued) => {
                if !fresh && view.input.is_some() {
                    return Applied::Ignored;
                }
                view.submitted_at = ev.at;
                view.input = Some(queued.input.clone());
                view.webhook_url = queued.webhook_url.clone().or(view.webhook_url.take());
                view.deadline = queued.deadline.or(view.deadline);
                if view.phase == Phase::Queued {
                    queue.insert(key);
                }
                Applied::Updated
            }
            EventBody::Started(started) => {
                queue.remove(&key);
                view.phase = Phase::Running;
                let mut line = format!("started on {}", started.worker);
                if started.attempt > 1 {
                    line.push_str(&format!(" (attempt {})", started.attempt));
                }
                view.logs.push(LogLine::info(line, ev.at));
                Applied::Updated
            }
            EventBody::Progress(progress) => {
                queue.remove(&key);
                view.phase = Phase::Running;
                view.step = Some((progress.step, progress.total));
                // One line per step: the worker's message when it sent one, else the step itself.
                let message = progress
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("step {}/{}", progress.step, progress.total));
                view.logs.push(LogLine::info(message, ev.at));
                Applied::Updated
            }
            EventBody::Completed(done) => {
                queue.remove(&key);
                view.phase = Phase::Done;
                view.finished_at = Some(ev.at);
                view.outcome = Some(Outcome::Succeeded {
                    result: done.result.clone(),
                    billable_units: done.billable_units,
                    inference_time: Some(done.inference_time),
                });
                view.logs.push(LogLine::info("completed", ev.at));
                Applied::Finished
            }
            EventBody::Failed(failure) | EventBody::Cancelled(failure) => {
                queue.remove(&key);
                view.phase = Phase::Done;
                view.finished_at = Some(ev.at);
                view.logs.push(LogLine::info(
                    format!("{}: {}", failure.error_type.as_str(), failure.error),
                    ev.at,
                ));
                view.outcome = Some(Outcome::Failed {
                    error: failure.error.clone(),
                    error_type: failure.error_type,
                    detail: failure.detail.clone(),
                });
                Applied::Finished
            }
        };
        applied
    }

    /// Applies a notice read at stream `offset`: each request of its endpoint kind still waiting for a
    /// worker gets its line (an error line: something is keeping the request from starting). Requests
    /// that started, ended or come later in the stream do not. Returns how many requests got it.
    pub fn apply_notice(&mut self, offset: u64, notice: &Notice) -> usize {
        self.last_offset = Some(self.last_offset.map_or(offset, |o| o.max(offset)));
        let Some(waiting) = self.queued.get(&notice.endpoint) else {
            return 0;
        };
        let line = LogLine {
            message: notice.log_line(),
            at: notice.at,
            level: LogLevel::Error,
        };
        let mut n = 0;
        for (_, id) in waiting {
            if let Some(view) = self.views.get_mut(id) {
                view.logs.push(line.clone());
                n += 1;
            }
        }
        n
    }
}

/// The registry shared between the stream follower and the HTTP handlers. `changes` ticks after every
/// applied event, so handlers wait for what they expect instead of sleeping.
#[derive(Clone)]
pub struct SharedRegistry {
    inner: Arc<RwLock<Registry>>,
    changes: watch::Sender<u64>,
}

impl Default for SharedRegistry {
    fn default() -> Self {
        SharedRegistry::new()
    }
}

impl SharedRegistry {
    pub fn new() -> Self {
        SharedRegistry {
            inner: Arc::new(RwLock::new(Registry::new())),
            changes: watch::channel(0).0,
        }
    }

    /// Applies an event and wakes every waiter.
    pub fn apply(&self, offset: u64, ev: &Event) -> Applied {
        let applied = {
            let mut reg = self
                .inner
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            reg.apply(offset, ev)
        };
        self.changes.send_modify(|n| *n += 1);
        applied
    }

    /// Applies a notice and wakes every waiter.
    pub fn apply_notice(&self, offset: u64, notice: &Notice) -> usize {
        let n = {
            let mut reg = self
                .inner
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            reg.apply_notice(offset, notice)
        };
        self.changes.send_modify(|c| *c += 1);
        n
    }

    /// Runs `f` on a consistent snapshot.
    pub fn read<R>(&self, f: impl FnOnce(&Registry) -> R) -> R {
        let reg = self
            .inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&reg)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits until `pred` holds, or `timeout` passes (then returns false).
    pub async fn wait_for(
        &self,
        timeout: std::time::Duration,
        pred: impl Fn(&Registry) -> bool,
    ) -> bool {
        let mut rx = self.subscribe();
        let wait = async {
            loop {
                if self.read(&pred) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return self.read(&pred);
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }
}

/// RFC 3339 UTC timestamp with microseconds, from unix seconds (fal's log timestamp format).
pub fn iso8601(unix: f64) -> String {
    let micros_total = (unix * 1e6).round().max(0.0) as i64;
    let secs = micros_total.div_euclid(1_000_000);
    let micros = micros_total.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}+00:00",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::events::{Completed, EventKind, Failure, Progress, Queued, Started};
    use fleet::job::validate;

    fn queued(id: &str, kind: EndpointKind) -> Event {
        let input = validate(kind, &json!({"prompt": "a cat"}), || 1).expect("valid input");
        let queued = Queued {
            input,
            deadline: None,
            webhook_url: Some("http://hook".into()),
        };
        Event::new(id, kind, EventBody::Queued(queued))
    }

    fn ev(id: &str, kind: EndpointKind, what: EventKind) -> Event {
        fleet::events::testing::event(id, kind, what)
    }

    fn progress(step: u32, total: u32) -> EventBody {
        EventBody::Progress(Progress {
            worker: "w1".into(),
            step,
            total,
            message: None,
        })
    }

    fn completed(result: Value, billable_units: u64, inference_time: f64) -> EventBody {
        EventBody::Completed(Completed {
            worker: "w1".into(),
            attempt: 1,
            result,
            billable_units,
            inference_time,
        })
    }

    #[test]
    fn each_step_is_one_log_line() {
        let mut reg = Registry::new();
        reg.apply(1, &queued("a", EndpointKind::Sprint));
        reg.apply(2, &ev("a", EndpointKind::Sprint, EventKind::Started));
        // The worker before issue 10 sent both `step` and a `message` saying the same.
        let with_message = EventBody::Progress(Progress {
            worker: "w1".into(),
            step: 1,
            total: 2,
            message: Some("step 1/2".into()),
        });
        reg.apply(3, &Event::new("a", EndpointKind::Sprint, with_message));
        reg.apply(4, &Event::new("a", EndpointKind::Sprint, progress(2, 2)));
        let lines: Vec<&str> = reg.views["a"]
            .logs
            .iter()
            .map(|l| l.message.as_str())
            .filter(|m| m.starts_with("step"))
            .collect();
        assert_eq!(lines, ["step 1/2", "step 2/2"]);
    }

    #[test]
    fn a_validation_failure_does_not_end_a_queued_request() {
        let mut reg = Registry::new();
        reg.apply(1, &queued("a", EndpointKind::Sprint));
        let hijack = Event::new(
            "a",
            EndpointKind::Base,
            EventBody::Failed(Failure::new(ErrorType::ValidationError, "invalid")),
        );
        assert_eq!(reg.apply(2, &hijack), Applied::Ignored);
        assert!(!reg.views["a"].is_terminal());
        // A fresh id is still answered, and a worker's validation failure still ends its job.
        assert_eq!(
            reg.apply(3, &Event::new("b", EndpointKind::Base, hijack.body.clone())),
            Applied::Finished
        );
        let by_worker = Failure {
            worker: Some("w1".into()),
            ..Failure::new(ErrorType::ValidationError, "invalid")
        };
        assert_eq!(
            reg.apply(
                4,
                &Event::new("a", EndpointKind::Sprint, EventBody::Failed(by_worker))
            ),
            Applied::Finished
        );
    }

    #[test]
    fn queue_position_counts_earlier_queued_requests_of_the_same_kind() {
        let mut reg = Registry::new();
        reg.apply(10, &queued("a", EndpointKind::Sprint));
        reg.apply(11, &queued("x", EndpointKind::Base));
        reg.apply(12, &queued("b", EndpointKind::Sprint));
        reg.apply(13, &queued("c", EndpointKind::Sprint));
        assert_eq!(reg.status("a"), Some(Status::InQueue { position: 0 }));
        assert_eq!(reg.status("x"), Some(Status::InQueue { position: 0 }));
        assert_eq!(reg.status("b"), Some(Status::InQueue { position: 1 }));
        assert_eq!(reg.status("c"), Some(Status::InQueue { position: 2 }));
        assert_eq!(reg.queued_count(EndpointKind::Sprint), 3);

        reg.apply(14, &ev("a", EndpointKind::Sprint, EventKind::Started));
        assert_eq!(reg.status("a"), Some(Status::InProgress));
        assert_eq!(reg.status("b"), Some(Status::InQueue { position: 0 }));
        assert_eq!(reg.status("c"), Some(Status::InQueue { position: 1 }));

        // A cancelled queued request no longer holds a place.
        reg.apply(15, &ev("b", EndpointKind::Sprint, EventKind::Cancelled));
        assert_eq!(reg.status("c"), Some(Status::InQueue { position: 0 }));
        assert_eq!(reg.queued_count(EndpointKind::Sprint), 1);
        assert_eq!(reg.status("nope"), None);
    }

    #[test]
    fn a_notice_reaches_the_logs_of_the_waiting_requests_of_its_kind_only() {
        use fleet::events::{NoticeBody, WorkerStartFailed};
        let mut reg = Registry::new();
        reg.apply(1, &queued("running", EndpointKind::Sprint));
        reg.apply(2, &ev("running", EndpointKind::Sprint, EventKind::Started));
        reg.apply(3, &queued("waiting", EndpointKind::Sprint));
        reg.apply(4, &queued("other-kind", EndpointKind::Base));
        let notice = Notice::new(
            EndpointKind::Sprint,
            NoticeBody::WorkerStartFailed(WorkerStartFailed {
                worker: "h-s0-1".into(),
                cause: "its models could not be loaded".into(),
                failures: 1,
                retry_in: 30.0,
            }),
        );
        assert_eq!(reg.apply_notice(5, &notice), 1);
        reg.apply(6, &queued("later", EndpointKind::Sprint));
        let logs = |id: &str| reg.get(id).expect("known").logs.clone();
        let waiting = logs("waiting");
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].message, notice.log_line());
        assert_eq!(waiting[0].to_json()["level"], "ERROR");
        assert_eq!(logs("running").len(), 1, "only its `started` line");
        assert!(logs("other-kind").is_empty());
        assert!(logs("later").is_empty());
        assert_eq!(reg.status("waiting"), Some(Status::InQueue { position: 0 }));
        assert_eq!(reg.last_offset(), Some(6));
    }

    #[test]
    fn progress_logs_and_completion() {
        let mut reg = Registry::new();
        let k = EndpointKind::Base;
        reg.apply(1, &queued("r", k));
        reg.apply(
            2,
            &Event::new(
                "r",
                k,
                EventBody::Started(Started {
                    worker: "w1".into(),
                    attempt: 2,
                }),
            ),
        );
        reg.apply(3, &Event::new("r", k, progress(1, 2)));
        reg.apply(4, &Event::new("r", k, progress(2, 2)));
        let view = reg.get("r").expect("view");
        assert_eq!(view.step, Some((2, 2)));
        let msgs: Vec<_> = view.logs.iter().map(|l| l.message.as_str()).collect();
        assert_eq!(msgs, ["started on w1 (attempt 2)", "step 1/2", "step 2/2"]);
        let applied = reg.apply(
            5,
            &Event::new("r", k, completed(json!({"images": []}), 8, 0.5)),
        );
        assert_eq!(applied, Applied::Finished);
        assert_eq!(reg.status("r"), Some(Status::Completed));
        let view = reg.get("r").expect("view");
        assert_eq!(view.inference_time(), Some(0.5));
        assert_eq!(view.webhook_url.as_deref(), Some("http://hook"));
        match &view.outcome {
            Some(Outcome::Succeeded {
                billable_units,
                result,
                ..
            }) => {
                assert_eq!(*billable_units, 8);
                assert_eq!(result["images"], json!([]));
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    #[test]
    fn first_terminal_event_wins() {
        let mut reg = Registry::new();
        let k = EndpointKind::Sprint;
        reg.apply(1, &queued("r", k));
        assert_eq!(
            reg.apply(2, &ev("r", k, EventKind::Cancelled)),
            Applied::Finished
        );
        assert_eq!(
            reg.apply(3, &ev("r", k, EventKind::Started)),
            Applied::Ignored
        );
        assert_eq!(
            reg.apply(4, &Event::new("r", k, completed(json!({}), 0, 0.0))),
            Applied::Ignored
        );
        assert_eq!(reg.status("r"), Some(Status::Completed));
        match &reg.get("r").expect("view").outcome {
            Some(Outcome::Failed { error_type, .. }) => {
                assert_eq!(*error_type, ErrorType::ClientCancelled)
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    #[test]
    fn failure_keeps_type_and_detail() {
        let mut reg = Registry::new();
        let k = EndpointKind::Base;
        let failure = Failure {
            detail: Some(json!([{"loc": ["body", "num_images"]}])),
            ..Failure::new(ErrorType::ValidationError, "invalid input")
        };
        let failed = Event::new("v", k, EventBody::Failed(failure));
        // A failure with no `queued` before it (AMQP validation error) still makes a view.
        assert_eq!(reg.apply(7, &failed), Applied::Finished);
        assert_eq!(reg.status("v"), Some(Status::Completed));
        match &reg.get("v").expect("view").outcome {
            Some(Outcome::Failed {
                error,
                error_type,
                detail,
            }) => {
                assert_eq!(error, "invalid input");
                assert_eq!(*error_type, ErrorType::ValidationError);
                assert_eq!(detail.as_ref().expect("detail")[0]["loc"][1], "num_images");
            }
            other => panic!("unexpected outcome {other:?}"),
        }
        assert_eq!(reg.queued_count(k), 0);
        assert_eq!(reg.last_offset(), Some(7));
    }

    #[test]
    fn duplicate_queued_event_does_not_move_the_request() {
        let mut reg = Registry::new();
        let k = EndpointKind::Sprint;
        reg.apply(1, &queued("a", k));
        reg.apply(2, &queued("b", k));
        assert_eq!(reg.apply(3, &queued("a", k)), Applied::Ignored);
        assert_eq!(reg.status("a"), Some(Status::InQueue { position: 0 }));
        assert_eq!(reg.status("b"), Some(Status::InQueue { position: 1 }));
    }

    #[tokio::test]
    async fn waiters_wake_on_apply() {
        let shared = SharedRegistry::new();
        let waiter = {
            let shared = shared.clone();
            tokio::spawn(async move {
                shared
                    .wait_for(std::time::Duration::from_secs(10), |r| r.get("z").is_some())
                    .await
            })
        };
        shared.apply(1, &queued("z", EndpointKind::Base));
        assert!(waiter.await.expect("join"));
        assert!(
            !shared
                .wait_for(std::time::Duration::from_millis(10), |r| r
                    .get("missing")
                    .is_some())
                .await
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(iso8601(0.0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(
            iso8601(1_700_000_000.25),
            "2023-11-14T22:13:20.250000+00:00"
        );
        assert_eq!(iso8601(951_782_400.0), "2000-02-29T00:00:00.000000+00:00");
    }
}
