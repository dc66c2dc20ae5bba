//! Start deadlines (service-contract §4: `X-Fal-Request-Timeout` is a deadline to *start*, else
//! `request_timeout`, 504) and [`RequestWatch`], the dispatcher's exact view of which requests started
//! or ended, which `deadletter` shares.
//!
//! One writer per timeout (issue 11, "two dispatchers"): the dispatcher that accepts a request with a
//! deadline starts a broker-side timer for it ([`fleet::queue::DeadlineTimer`]: a message that the broker
//! dead-letters into `{prefix}.deadlines.due` once the deadline plus [`DEADLINE_GRACE`] has passed). Every
//! dispatcher consumes that queue as a competing consumer, so the broker hands each timer to exactly one
//! of them; [`handle_due`] syncs with the results stream and publishes `failed` with `request_timeout`
//! (billing 0, confirmed) only when the request neither started nor ended, then acks. A dispatcher that
//! dies between that publish and the ack leaves the timer to another one, whose sync sees the `failed`
//! and publishes nothing. The job stays in its queue: a worker that receives a job after its deadline
//! skips it (`worker::job`), and publishes the timeout itself only for jobs without a timer (published
//! by something other than a dispatcher).
//!
//! [`WatchIndex`], a sink of the dispatcher's one [`StreamReader`] (beside the HTTP view's `follow`),
//! keeps per request whether it started or ended. [`RequestWatch::sync`] is the reader's: it publishes a
//! marker and waits until it is read back, so every event the broker confirmed before the call has then
//! been applied.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;

use fleet::events::{now_unix, ErrorType, Event, EventBody};
use fleet::queue::{DeadlineTimer, EventSink, Publisher, QueueError, StreamReader, DEADLINE_GRACE};

/// Pause after a transient broker error before the next try.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// What the client reads on a missed start deadline.
const TIMEOUT_MESSAGE: &str = "Request timed out before it started";

/// The pure part of the watch: what the stream said about each request, for the replay window.
/// A request is forgotten once its first `started` (or terminal) event is older than the window: its
/// start timer fired long before (start timeouts must fire within the window,
/// `state::Retention::accepts_start_timeout`), and a dead-lettered job of it was dead-lettered long
/// before too.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Requests that started (`false`) or ended (`true`).
    seen: HashMap<String, bool>,
    /// First-seen order with the event time, for forgetting.
    order: VecDeque<(f64, String)>,
    /// `None`: remember everything.
    window: Option<f64>,
}

impl Index {
    pub(crate) fn with_window(window: Duration) -> Self {
        Index {
            window: Some(window.as_secs_f64()),
            ..Index::default()
        }
    }

    /// Applies one event, then forgets what is older than the window at `now`.
    pub(crate) fn apply(&mut self, ev: &Event, now: f64) {
        let fresh = !self.seen.contains_key(&ev.request_id);
        let noted = match &ev.body {
            EventBody::Queued(_) => false,
            EventBody::Started(_) | EventBody::Progress(_) => {
                self.seen.entry(ev.request_id.clone()).or_insert(false);
                true
            }
            EventBody::Completed(_) | EventBody::Failed(_) | EventBody::Cancelled(_) => {
                self.seen.insert(ev.request_id.clone(), true);
                true
            }
        };
        let Some(window) = self.window else { return };
        if fresh && noted {
            self.order.push_back((ev.at, ev.request_id.clone()));
        }
        while let Some((at, _)) = self.order.front() {
            if now - at <= window {
                break;
            }
            let (_, id) = self.order.pop_front().expect("front exists");
            self.seen.remove(&id);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }

    pub(crate) fn is_terminal(&self, request_id: &str) -> bool {
        self.seen.get(request_id).copied().unwrap_or(false)
    }

    pub(crate) fn started_or_ended(&self, request_id: &str) -> bool {
        self.seen.contains_key(request_id)
    }
}

/// The watch's sink of the dispatcher's one [`StreamReader`].
#[derive(Default)]
pub struct WatchIndex {
    index: Mutex<Index>,
}

impl EventSink for WatchIndex {
    fn apply(&self, _offset: u64, event: &Event, _live: bool) {
        self.lock().apply(event, now_unix());
    }
}

impl WatchIndex {
    /// An index that forgets requests older than `window` (see [`Index`]).
    pub fn with_window(window: Duration) -> Self {
        WatchIndex {
            index: Mutex::new(Index::with_window(window)),
        }
    }

    /// Requests remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // A panic while holding the lock leaves plain maps behind; keep using them.
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The dispatcher's exact view of started and ended requests: the [`WatchIndex`] fed by the process's
/// [`StreamReader`], with that reader's catch-up and sync.
#[derive(Clone)]
pub struct RequestWatch {
    index: Arc<WatchIndex>,
    reader: Arc<StreamReader>,
}

impl RequestWatch {
    /// `index` must be one of `reader`'s sinks.
    pub fn new(index: Arc<WatchIndex>, reader: Arc<StreamReader>) -> Self {
        RequestWatch { index, reader }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock()
    }

    /// Waits until the replay at start has reached "now".
    pub async fn caught_up(&self) {
        self.reader.caught_up().await;
    }

    /// Waits until every event published before this call has been applied.
    pub async fn sync(&self) -> Result<(), QueueError> {
        self.reader.sync().await
    }

    /// True when a terminal event of `request_id` has been read.
    pub fn is_terminal(&self, request_id: &str) -> bool {
        self.lock().is_terminal(request_id)
    }

    /// True when a `started`, `progress` or terminal event of `request_id` has been read.
    pub fn started_or_ended(&self, request_id: &str) -> bool {
        self.lock().started_or_ended(request_id)
    }

    /// The confirmed publisher of the reader (for the `failed` events of the watch's users).
    pub fn publisher(&self) -> &Publisher {
        self.reader.publisher()
    }
}

/// Handles one timer from `{prefix}.deadlines.due`: times the request out unless it started or ended,
/// then acks. A timer that fired before its deadline (a timeout longer than one wait, or clocks that
/// disagree) is started again for the time left. An error leaves the delivery unacknowledged.
pub(crate) async fn handle_due(
    watch: &RequestWatch,
    delivery: &Delivery,
) -> Result<(), QueueError> {
    let timer: DeadlineTimer = match serde_json::from_slice(&delivery.data) {
        Ok(timer) => timer,
        Err(e) => {
            tracing::warn!(error = %e, "malformed deadline timer; acknowledged");
            return crate::deadletter::ack(delivery).await;
        }
    };
    let due = timer.deadline + DEADLINE_GRACE.as_secs_f64();
    if now_unix() < due {
        watch.publisher().publish_deadline_timer(&timer).await?;
        tracing::debug!(
            request_id = timer.request_id,
            "deadline timer fired early; started again"
        );
        return crate::deadletter::ack(delivery).await;
    }
    // Every `started` and terminal event confirmed before now must be seen before deciding.
    watch.sync().await?;
    if watch.started_or_ended(&timer.request_id) {
        return crate::deadletter::ack(delivery).await;
    }
    let event = Event::failed(
        &timer.request_id,
        timer.endpoint,
        ErrorType::RequestTimeout,
        TIMEOUT_MESSAGE,
    );
    watch.publisher().publish_event(&event).await?;
    tracing::info!(request_id = timer.request_id, endpoint = %timer.endpoint, "start deadline missed; request timed out");
    crate::deadletter::ack(delivery).await
}

/// A transient error pauses briefly (or ends the loop on shutdown); a permanent one is returned.
pub(crate) async fn retry_or_fail(
    e: QueueError,
    shutdown: &CancellationToken,
) -> Result<(), QueueError> {
    if !e.is_retryable() {
        return Err(e);
    }
    tracing::warn!(error = %e, "transient broker problem; retrying");
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(RETRY_PAUSE) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::events::EventKind;
    use fleet::job::EndpointKind;

    fn ev(id: &str, kind: EventKind) -> Event {
        fleet::events::testing::event(id, EndpointKind::Sprint, kind)
    }

    #[test]
    fn started_and_ended_requests_are_seen() {
        let mut ix = Index::default();
        for (id, kind) in [
            ("q", EventKind::Queued),
            ("s", EventKind::Started),
            ("p", EventKind::Progress),
            ("c", EventKind::Cancelled),
            ("f", EventKind::Failed),
        ] {
            ix.apply(&ev(id, kind), 0.0);
        }
        assert!(!ix.started_or_ended("q"), "queued only: may time out");
        assert!(ix.started_or_ended("s") && !ix.is_terminal("s"));
        assert!(ix.started_or_ended("p") && !ix.is_terminal("p"));
        assert!(ix.is_terminal("c") && ix.is_terminal("f"));
        // A late `progress` after the end does not reopen it.
        ix.apply(&ev("c", EventKind::Progress), 0.0);
        assert!(ix.is_terminal("c"));
    }

    #[test]
    fn requests_older_than_the_window_are_forgotten() {
        let mut ix = Index::with_window(Duration::from_secs(100));
        let at = |id: &str, kind, when| Event {
            at: when,
            ..ev(id, kind)
        };
        ix.apply(&at("a", EventKind::Started, 10.0), 10.0);
        ix.apply(&at("a", EventKind::Completed, 60.0), 60.0);
        ix.apply(&at("b", EventKind::Started, 50.0), 50.0);
        assert_eq!(ix.len(), 2);
        // "a" was first seen 101 s ago: forgotten, although it ended 51 s ago.
        ix.apply(&at("c", EventKind::Queued, 111.0), 111.0);
        assert!(!ix.started_or_ended("a") && ix.started_or_ended("b"));
        ix.apply(&at("c", EventKind::Started, 151.0), 151.0);
        assert!(!ix.started_or_ended("b") && ix.started_or_ended("c"));
        assert_eq!(ix.len(), 1);
    }
}
