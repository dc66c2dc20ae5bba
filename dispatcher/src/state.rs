//! The dispatcher's view of every request, rebuilt only from lifecycle events (service-contract §5).
//!
//! `Registry::apply` is the whole state machine: `queued` → `IN_QUEUE`, `started`/`progress` →
//! `IN_PROGRESS`, `completed`/`failed`/`cancelled` → `COMPLETED`. The first terminal event wins and
//! everything after it is ignored, so every dispatcher replaying the same stream reaches the same view.
//! The queue position of a request is the number of still-queued requests of the same endpoint kind
//! whose `queued` event came earlier in the stream (0 = next), which is the order the job queue
//! delivers them in. Nothing here talks to the broker; `follow` in `dispatcher::stream` feeds it.
//!
//! Memory is bounded by [`Retention`]: an ended request is answered for `finished` after its terminal
//! event (fal keeps a result for an hour), then its view is evicted and only an 8-byte hash of its id
//! is kept as a tombstone for the replay `window`, so a late event of it (a duplicate `completed`, a
//! straggling `progress`) cannot bring it back as a request in progress, and the API can say that it
//! expired. Requests still queued or running are never evicted.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use std::time::Duration;

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

/// The 422 message for a start timeout that would fire outside the replay window.
pub const START_TIMEOUT_TOO_LONG: &str =
    "Input should be a start timeout whose timer fires within the dispatcher's replay window (--replay-window, 24 h by default: at most 22 h)";

/// How long the dispatcher keeps what it read (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// An ended request is answered this long after its terminal event, then evicted.
    pub finished: Duration,
    /// How far back the stream is replayed at start, and how long an evicted request's tombstone lives.
    /// At least `finished`; a start timeout must fire within it (`Retention::max_start_timeout`).
    pub window: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            finished: Duration::from_secs(3600),
            window: Duration::from_secs(24 * 3600),
        }
    }
}

impl Retention {
    /// Whether a start timeout of `secs` is accepted: its timer (rounded up to its bucket, plus the
    /// grace) must fire within the replay window, so that a dispatcher restarted before it fires has
    /// replayed the request's `queued` event and every later one, and never times out a request whose
    /// `started` it did not replay.
    pub fn accepts_start_timeout(&self, secs: f64) -> bool {
        let wait = fleet::queue::deadline_bucket(Duration::from_secs_f64(secs.min(1e9)));
        wait + fleet::queue::DEADLINE_GRACE <= self.window
    }
}

/// The tombstone of an evicted request: a hash of its id (collisions are harmless at 2⁻⁶⁴ per pair:
/// the other request's late events would be ignored and its status answered as expired).
fn tombstone(request_id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    request_id.hash(&mut h);
    h.finish()
}

/// All requests seen on the stream, plus the per-kind queue order.
#[derive(Debug, Default)]
pub struct Registry {
    views: HashMap<String, RequestView>,
    queued: HashMap<EndpointKind, BTreeSet<(u64, String)>>,
    /// Offset of the last event applied (the follower resumes after it).
    last_offset: Option<u64>,
    /// `None`: keep everything (tests of the state machine).
    retention: Option<Retention>,
    /// Ended requests in the order they ended, with the time of their terminal event.
    ended: VecDeque<(f64, String)>,
    /// Tombstones of evicted requests, and their eviction order with the time they ended.
    expired: HashSet<u64>,
    expired_order: VecDeque<(f64, u64)>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// A registry that evicts ended requests as `retention` says.
    pub fn with_retention(retention: Retention) -> Self {
        Registry {
            retention: Some(retention),
            ..Registry::default()
        }
    }

    /// True when `request_id` ended longer ago than the retention and was evicted.
    pub fn is_expired(&self, request_id: &str) -> bool {
        !self.views.contains_key(request_id) && self.expired.contains(&tombstone(request_id))
    }

    /// Ended requests still answered, and tombstones kept.
    pub fn retained(&self) -> (usize, usize) {
        (self.ended.len(), self.expired.len())
    }

    /// Evicts the ended requests whose terminal event is older than the retention at `now` (unix
    /// seconds), and forgets tombstones older than the window. Returns how many views were evicted.
    pub fn evict(&mut self, now: f64) -> usize {
        let Some(retention) = self.retention else {
            return 0;
        };
        let (keep, window) = (
            retention.finished.as_secs_f64(),
            retention.window.as_secs_f64(),
        );
        let mut evicted = 0;
        while let Some((at, _)) = self.ended.front() {
            if now - at <= keep {
                break;
            }
            let (at, id) = self.ended.pop_front().expect("front exists");
            if self.views.remove(&id).is_some() {
                evicted += 1;
            }
            let t = tombstone(&id);
            if self.expired.insert(t) {
                self.expired_order.push_back((at, t));
            }
        }
        while let Some((at, _)) = self.expired_order.front() {
            if now - at <= window {
                break;
            }
            let (_, t) = self.expired_order.pop_front().expect("front exists");
            self.expired.remove(&t);
        }
        evicted
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
        if !self.expired.is_empty()
            && !self.views.contains_key(&ev.request_id)
            && self.expired.contains(&tombstone(&ev.request_id))
        {
            return Applied::Ignored;
        }
        let applied = self.apply_view(offset, ev);
        if applied == Applied::Finished && self.retention.is_some() {
            self.ended.push_back((ev.at, ev.request_id.clone()));
            self.evict(fleet::events::now_unix());
        }
        applied
    }

    fn apply_view(&mut self, offset: u64, ev: &Event) -> Applied {
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
        Self::from(Registry::new())
    }

    /// A shared registry that evicts ended requests as `retention` says.
    pub fn with_retention(retention: Retention) -> Self {
        Self::from(Registry::with_retention(retention))
    }

    fn from(registry: Registry) -> Self {
        SharedRegistry {
            inner: Arc::new(RwLock::new(registry)),
            changes: watch::channel(0).0,
        }
    }

    /// The retention this registry evicts by (`None`: it keeps everything).
    pub fn retention(&self) -> Option<Retention> {
        self.read(|r| r.retention)
    }

    /// Whether a start timeout of `secs` is accepted ([`Retention::accepts_start_timeout`]; any
    /// timeout when nothing is evicted).
    pub fn accepts_start_timeout(&self, secs: f64) -> bool {
        self.retention()
            .is_none_or(|r| r.accepts_start_timeout(secs))
    }

    /// [`Registry::evict`] at the current time (the periodic sweep, for when no events come).
    pub fn evict(&self) -> usize {
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .evict(fleet::events::now_unix())
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

    fn at(mut ev: Event, when: f64) -> Event {
        ev.at = when;
        ev
    }

    fn retention(finished: u64, window: u64) -> Retention {
        Retention {
            finished: Duration::from_secs(finished),
            window: Duration::from_secs(window),
        }
    }

    #[test]
    fn ended_requests_are_evicted_after_the_retention_and_stay_expired_for_the_window() {
        // Times are relative to now: `apply` evicts by the real clock, the explicit `evict`s by `t`.
        let t0 = fleet::events::now_unix();
        let t = |secs: f64| t0 + secs;
        let mut r = Registry::with_retention(retention(100, 1000));
        let k = EndpointKind::Sprint;
        r.apply(0, &at(queued("done", k), t(0.0)));
        r.apply(1, &at(ev("done", k, EventKind::Completed), t(10.0)));
        r.apply(2, &at(queued("waiting", k), t(10.0)));
        r.apply(3, &at(queued("running", k), t(10.0)));
        r.apply(4, &at(ev("running", k, EventKind::Started), t(11.0)));
        assert_eq!(r.evict(t(105.0)), 0, "ended 95 s ago: still answered");
        assert_eq!(r.status("done"), Some(Status::Completed));
        assert_eq!(r.evict(t(111.0)), 1);
        assert!(r.get("done").is_none() && r.is_expired("done"));
        assert_eq!(r.status("waiting"), Some(Status::InQueue { position: 0 }));
        assert_eq!(r.status("running"), Some(Status::InProgress));
        assert!(!r.is_expired("never-seen"));
        assert_eq!(r.retained(), (0, 1));
        // A straggler of the evicted request does not bring it back.
        assert_eq!(
            r.apply(5, &at(ev("done", k, EventKind::Progress), t(112.0))),
            Applied::Ignored
        );
        assert!(r.get("done").is_none());
        // After the window the tombstone goes too.
        r.evict(t(1011.0));
        assert!(!r.is_expired("done"));
        assert_eq!(r.retained(), (0, 0));
    }

    #[test]
    fn a_replayed_request_that_ended_before_the_retention_is_evicted_as_it_is_applied() {
        let now = fleet::events::now_unix();
        let mut r = Registry::with_retention(retention(60, 600));
        let k = EndpointKind::Base;
        r.apply(0, &at(queued("old", k), now - 300.0));
        r.apply(1, &at(ev("old", k, EventKind::Completed), now - 200.0));
        r.apply(2, &at(queued("recent", k), now - 30.0));
        r.apply(3, &at(ev("recent", k, EventKind::Failed), now - 20.0));
        assert!(r.is_expired("old"));
        assert_eq!(r.status("recent"), Some(Status::Completed));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn without_retention_nothing_is_evicted() {
        let mut r = Registry::new();
        let k = EndpointKind::Sprint;
        r.apply(0, &at(queued("a", k), 0.0));
        r.apply(1, &at(ev("a", k, EventKind::Completed), 1.0));
        assert_eq!(r.evict(1e12), 0);
        assert_eq!(r.status("a"), Some(Status::Completed));
    }

    #[test]
    fn start_timeouts_must_fire_within_the_replay_window() {
        let day = Retention::default();
        assert!(day.accepts_start_timeout(30.0));
        // 22 h rounds to 22 h; + 1 s grace is within 24 h. 23.5 h rounds up to 24 h: + grace is not.
        assert!(day.accepts_start_timeout(22.0 * 3600.0));
        assert!(!day.accepts_start_timeout(23.5 * 3600.0));
        assert!(!day.accepts_start_timeout(7.0 * 86_400.0));
        let short = retention(1, 10);
        assert!(short.accepts_start_timeout(9.0));
        assert!(!short.accepts_start_timeout(9.5));
    }

    /// Memory per retained request, for the README: a base request's view (queued, started, 18
    /// progress lines, completed with one image URL) measured as the growth of the process's resident
    /// set over 50 000 of them. By hand: `cargo test -p fleet-dispatcher --lib memory_per_retained
    /// -- --ignored --nocapture --test-threads 1`.
    #[test]
    #[ignore = "a measurement (prints bytes per request), not a check"]
    fn memory_per_retained_request() {
        fn rss() -> u64 {
            let status = std::fs::read_to_string("/proc/self/statm").expect("statm");
            let pages: u64 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        }
        const N: u64 = 50_000;
        let k = EndpointKind::Base;
        let url = "http://127.0.0.1:3900/fleet/results/0f8fad5b-d9cb-469f-a165-70867728950e/0.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=GK0123456789abcdef%2F20261206%2Fgarage%2Fs3%2Faws4_request&X-Amz-Date=20261206T120000Z&X-Amz-Expires=604800&X-Amz-SignedHeaders=host&X-Amz-Signature=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let result = json!({"images": [{"url": url, "width": 1024, "height": 1024, "content_type": "image/png"}],
            "seed": 42, "has_nsfw_concepts": [false], "prompt": "a red fox in the snow, watercolor",
            "timings": {"inference": 1.25}});
        let mut r = Registry::with_retention(Retention::default());
        let before = rss();
        let now = fleet::events::now_unix();
        let mut offset = 0;
        for i in 0..N {
            let id = uuid::Uuid::new_v4().to_string();
            let mut next = |body: EventBody| {
                offset += 1;
                r.apply(offset, &at(Event::new(id.clone(), k, body), now));
            };
            let input = validate(
                k,
                &json!({"prompt": "a red fox in the snow, watercolor"}),
                || i,
            )
            .expect("valid input");
            next(EventBody::Queued(Queued {
                input,
                deadline: None,
                webhook_url: None,
            }));
            next(EventBody::Started(Started {
                worker: "worker-0".into(),
                attempt: 1,
            }));
            for step in 1..=18 {
                next(progress(step, 18));
            }
            next(completed(result.clone(), 1, 1.25));
        }
        let per = (rss() - before) as f64 / N as f64;
        println!(
            "memory per retained base request: {per:.0} bytes ({N} requests, {} views)",
            r.len()
        );
        assert_eq!(r.len() as u64, N);
    }
}
