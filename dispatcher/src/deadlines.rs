//! Start deadlines (service-contract §4: `X-Fal-Request-Timeout` is a deadline to *start*, else
//! `request_timeout`, 504) and [`RequestWatch`], the dispatcher's exact view of which requests started
//! or ended, which `deadletter` shares.
//!
//! [`WatchIndex`], a sink of the dispatcher's one [`StreamReader`] (beside the HTTP view's `follow`),
//! keeps per request whether it started or ended, plus an index of still-queued requests that carry a
//! `deadline` (bounded by the number of queued requests). [`RequestWatch::sync`] is the reader's: it
//! publishes a marker and waits until it is read back, so every event the broker confirmed before the
//! call has then been applied.
//!
//! [`run_deadlines`] sleeps until the earliest deadline plus [`GRACE`], syncs, and publishes `failed`
//! with `request_timeout` (billing 0, confirmed) for each request still queued, at most [`BATCH`] per
//! round. The job stays in its queue: workers check the terminal events and the deadline themselves before
//! they publish `started` (`worker::job`), so a worker that reaches it acks it without running it.
//!
//! Several dispatchers each run the timer, so two may publish `failed` for the same request. That is
//! harmless: the first terminal event in the stream wins in every reader (dispatcher `state`, worker
//! `tracker`, clients following the stream), so the second one changes nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use fleet::events::{now_unix, ErrorType, Event, EventBody};
use fleet::job::EndpointKind;
use fleet::queue::{EventSink, Publisher, QueueError, StreamReader};

/// Time past a deadline before the dispatcher declares it missed. A worker checks the deadline right
/// before publishing `started`; the grace keeps that `started` (and small clock skew between hosts) ahead
/// of the dispatcher's `failed` in the stream.
pub const GRACE: Duration = Duration::from_secs(1);
/// Most requests timed out per round (one `sync` each round); the rest follow in the next rounds.
pub const BATCH: usize = 256;
/// Longest nap of the deadline loop: wall-clock time is re-read at least this often.
const MAX_NAP: Duration = Duration::from_secs(60);
/// Pause after a transient broker error before the next try.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// What the client reads on a missed start deadline.
const TIMEOUT_MESSAGE: &str = "Request timed out before it started";

/// Unix seconds → microseconds; None for deadlines that cannot be meant (non-finite, not positive).
fn micros(unix: f64) -> Option<u64> {
    // `as` saturates for values beyond u64: a deadline in the far future simply never comes.
    (unix.is_finite() && unix > 0.0).then_some((unix * 1e6) as u64)
}

fn now_micros() -> u64 {
    micros(now_unix()).unwrap_or(0)
}

fn grace_micros() -> u64 {
    u64::try_from(GRACE.as_micros()).unwrap_or(u64::MAX)
}

/// The pure part of the watch: what the stream said about each request.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Requests that started (`false`) or ended (`true`).
    seen: HashMap<String, bool>,
    /// Still-queued requests with a deadline, by deadline (µs since the epoch).
    pending: BTreeSet<(u64, String)>,
    pending_by_id: HashMap<String, (u64, EndpointKind)>,
}

impl Index {
    /// Applies one event; true when it brought the earliest pending deadline forward.
    pub(crate) fn apply(&mut self, ev: &Event) -> bool {
        match &ev.body {
            EventBody::Queued(queued) => {
                let Some(deadline) = queued.deadline.and_then(micros) else {
                    return false;
                };
                if self.seen.contains_key(&ev.request_id)
                    || self.pending_by_id.contains_key(&ev.request_id)
                {
                    return false;
                }
                let earlier = self.earliest().is_none_or(|e| deadline < e);
                self.pending.insert((deadline, ev.request_id.clone()));
                self.pending_by_id
                    .insert(ev.request_id.clone(), (deadline, ev.endpoint));
                earlier
            }
            EventBody::Started(_) | EventBody::Progress(_) => {
                self.seen.entry(ev.request_id.clone()).or_insert(false);
                self.forget(&ev.request_id);
                false
            }
            EventBody::Completed(_) | EventBody::Failed(_) | EventBody::Cancelled(_) => {
                self.seen.insert(ev.request_id.clone(), true);
                self.forget(&ev.request_id);
                false
            }
        }
    }

    /// Drops a request from the deadline index; true when it was there.
    pub(crate) fn forget(&mut self, request_id: &str) -> bool {
        match self.pending_by_id.remove(request_id) {
            Some((deadline, _)) => self.pending.remove(&(deadline, request_id.to_string())),
            None => false,
        }
    }

    pub(crate) fn is_terminal(&self, request_id: &str) -> bool {
        self.seen.get(request_id).copied().unwrap_or(false)
    }

    /// Earliest pending deadline (µs).
    pub(crate) fn earliest(&self) -> Option<u64> {
        self.pending.first().map(|(d, _)| *d)
    }

    /// Up to `limit` queued requests whose deadline is at or before `cutoff` (µs), earliest first.
    pub(crate) fn due(&self, cutoff: u64, limit: usize) -> Vec<(String, EndpointKind)> {
        self.pending
            .iter()
            .take_while(|(d, _)| *d <= cutoff)
            .take(limit)
            .filter_map(|(_, id)| self.pending_by_id.get(id).map(|(_, k)| (id.clone(), *k)))
            .collect()
    }
}

/// The watch's sink of the dispatcher's one [`StreamReader`]: the index, and a wake-up for the deadline
/// loop when the earliest deadline moved forward.
#[derive(Default)]
pub struct WatchIndex {
    index: Mutex<Index>,
    wake: Notify,
}

impl EventSink for WatchIndex {
    fn apply(&self, _offset: u64, event: &Event, _live: bool) {
        if self.lock().apply(event) {
            self.wake.notify_one();
        }
    }
}

impl WatchIndex {
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

    /// The confirmed publisher of the reader (for the `failed` events of the watch's users).
    pub fn publisher(&self) -> &Publisher {
        self.reader.publisher()
    }
}

/// Times out queued requests whose start deadline passed, until `shutdown` or a permanent broker error.
pub async fn run_deadlines(
    watch: &RequestWatch,
    shutdown: &CancellationToken,
) -> Result<(), QueueError> {
    // Before the replay is complete a `started` may still lie ahead in the stream: decide nothing yet.
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        _ = watch.caught_up() => {}
    }
    loop {
        let now = now_micros();
        let next_due = watch
            .lock()
            .earliest()
            .map(|d| d.saturating_add(grace_micros()));
        let nap = match next_due {
            Some(due) if due <= now => Duration::ZERO,
            Some(due) => Duration::from_micros(due - now).min(MAX_NAP),
            None => MAX_NAP,
        };
        if !nap.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = watch.index.wake.notified() => {}
                _ = tokio::time::sleep(nap) => {}
            }
            continue;
        }
        // Every `started` confirmed before now must be seen before a request is declared missed.
        let synced = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = watch.sync() => r,
        };
        if let Err(e) = synced {
            retry_or_fail(e, shutdown).await?;
            continue;
        }
        let cutoff = now_micros().saturating_sub(grace_micros());
        let due = watch.lock().due(cutoff, BATCH);
        for (request_id, kind) in due {
            let event = Event::failed(
                &request_id,
                kind,
                ErrorType::RequestTimeout,
                TIMEOUT_MESSAGE,
            );
            // Kept in the index until the broker confirmed the `failed` (a broker outage retries it);
            // then taken out, so the loop does not fire again while that event travels the stream.
            if let Err(e) = watch.publisher().publish_event(&event).await {
                retry_or_fail(e, shutdown).await?;
                break;
            }
            watch.lock().forget(&request_id);
            tracing::info!(request_id, endpoint = %kind, "start deadline missed; request timed out");
        }
    }
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

    fn queued(id: &str, deadline: Option<f64>) -> Event {
        let mut ev = ev(id, EventKind::Queued);
        if let EventBody::Queued(queued) = &mut ev.body {
            queued.deadline = deadline;
        }
        ev
    }

    fn ev(id: &str, kind: EventKind) -> Event {
        fleet::events::testing::event(id, EndpointKind::Sprint, kind)
    }

    #[test]
    fn due_lists_queued_requests_by_deadline() {
        let mut ix = Index::default();
        assert!(ix.apply(&queued("late", Some(30.0))));
        assert!(ix.apply(&queued("early", Some(10.0))));
        assert!(!ix.apply(&queued("mid", Some(20.0))), "not the earliest");
        assert!(!ix.apply(&queued("none", None)));
        assert_eq!(ix.earliest(), Some(10_000_000));
        let ids =
            |v: Vec<(String, EndpointKind)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(ix.due(20_000_000, 10)), ["early", "mid"]);
        assert_eq!(ids(ix.due(u64::MAX, 1)), ["early"]);
        assert!(ix.due(9_999_999, 10).is_empty());
    }

    #[test]
    fn started_and_ended_requests_leave_the_index() {
        let mut ix = Index::default();
        ix.apply(&queued("s", Some(1.0)));
        ix.apply(&queued("p", Some(2.0)));
        ix.apply(&queued("c", Some(3.0)));
        ix.apply(&queued("q", Some(4.0)));
        ix.apply(&ev("s", EventKind::Started));
        ix.apply(&ev("p", EventKind::Progress));
        ix.apply(&ev("c", EventKind::Cancelled));
        let due: Vec<_> = ix.due(u64::MAX, 10).into_iter().map(|(id, _)| id).collect();
        assert_eq!(due, ["q"]);
        assert!(ix.is_terminal("c"));
        assert!(!ix.is_terminal("s"));
        assert!(!ix.is_terminal("q"));
        assert!(ix.forget("q"));
        assert!(!ix.forget("q"));
        assert_eq!(ix.earliest(), None);
    }

    #[test]
    fn late_or_repeated_queued_events_do_not_reenter() {
        let mut ix = Index::default();
        // Out of order (a `failed` before its `queued`, as AMQP validation failures produce).
        ix.apply(&ev("f", EventKind::Failed));
        assert!(!ix.apply(&queued("f", Some(5.0))));
        ix.apply(&queued("d", Some(5.0)));
        assert!(
            !ix.apply(&queued("d", Some(1.0))),
            "a duplicate keeps the first deadline"
        );
        assert_eq!(ix.earliest(), Some(5_000_000));
        // Deadlines that cannot be meant are ignored; a huge one saturates instead of overflowing.
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
            assert!(!ix.apply(&queued("bad", Some(bad))));
        }
        ix.apply(&queued("far", Some(1e300)));
        assert_eq!(ix.pending_by_id.get("far").map(|(d, _)| *d), Some(u64::MAX));
        assert!(ix.is_terminal("f"));
    }
}
