//! The worker's view of the results stream: which requests already ended (`completed`, `failed`,
//! `cancelled`; such jobs are acked without running) and which running jobs were cancelled.
//!
//! The tracker is the sink of the worker's one [`StreamReader`]. Dedupe must not race the stream: before
//! deciding on a job the worker calls [`Tracker::sync`], which publishes a marker into the stream and
//! waits until the reader has read it back. Every event confirmed
//! before the marker (a completion by a worker that died before acking, a cancellation by the dispatcher)
//! sits at a lower offset, so after `sync` the tracker has seen it.
//!
//! Memory is bounded by a window (`--replay-window`, 24 h by default): at start the reader replays only
//! the stream written in the last window, and a terminal (or cancelled) entry is dropped once its event is
//! older than the window, so a worker that ran for a month holds what a freshly started one would. A job
//! whose request ended longer ago than that (a cancelled request whose job sat in the queue for a whole
//! window) is no longer recognised and runs; readers keep the first terminal event.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use fleet::events::{now_unix, Event, EventKind};
use fleet::queue::{EventSink, Link, QueueError, StreamOffset, StreamReader};

#[derive(Default)]
struct State {
    terminal: HashMap<String, EventKind>,
    running: HashMap<String, CancellationToken>,
    cancelled: HashSet<String>,
    /// Terminal and cancelled entries in the order they were read, with their event time: the oldest
    /// leave first once older than `window`.
    order: VecDeque<(f64, String)>,
    window: f64,
}

impl State {
    fn with_window(window: Duration) -> Self {
        State {
            window: window.as_secs_f64(),
            ..State::default()
        }
    }

    /// Records what `event` says, then drops entries whose event is older than the window at `now`.
    fn apply(&mut self, event: &Event, now: f64) {
        let kind = event.kind();
        let mut remember = false;
        if kind == EventKind::Cancelled {
            remember |= self.cancelled.insert(event.request_id.clone());
        }
        // Any end of a request this worker runs stops the run at its next step: a cancellation, a
        // `request_timeout` that raced its `started`, or another worker's completion of a redelivered
        // copy. (The worker's own terminal event comes after its run, when stopping changes nothing.)
        if kind.is_terminal() {
            if let Some(token) = self.running.get(&event.request_id) {
                token.cancel();
            }
        }
        if kind.is_terminal() && !self.terminal.contains_key(&event.request_id) {
            // The first terminal event wins (a late `cancelled` after `completed` changes nothing).
            self.terminal.insert(event.request_id.clone(), kind);
            remember = true;
        }
        if remember {
            self.order.push_back((event.at, event.request_id.clone()));
        }
        while let Some((at, _)) = self.order.front() {
            if now - at <= self.window {
                break;
            }
            let (_, id) = self.order.pop_front().expect("front exists");
            self.terminal.remove(&id);
            self.cancelled.remove(&id);
        }
    }

    fn len(&self) -> usize {
        self.terminal.len() + self.cancelled.len()
    }
}

/// The worker's sink of the process's one [`StreamReader`].
#[derive(Clone)]
pub struct Tracker {
    state: Arc<Mutex<State>>,
    reader: Arc<StreamReader>,
}

/// Unregisters a running job when dropped.
pub struct RunningGuard {
    state: Arc<Mutex<State>>,
    request_id: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        lock(&self.state).running.remove(&self.request_id);
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding this lock leaves only plain maps behind; keep using them.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the reader hands the tracker.
struct Sink(Arc<Mutex<State>>);

impl EventSink for Sink {
    fn apply(&self, _offset: u64, event: &Event, _live: bool) {
        lock(&self.0).apply(event, now_unix());
    }
}

impl Tracker {
    /// Starts the process's reader of the stream on `link` with the tracker as its sink, replaying the
    /// last `window` of the stream. The reader resubscribes across broker restarts; the returned task ends
    /// only with a permanent error, which the worker treats as fatal.
    pub async fn start(
        link: Arc<Link>,
        window: Duration,
    ) -> Result<(Self, JoinHandle<QueueError>), QueueError> {
        let state = Arc::new(Mutex::new(State::with_window(window)));
        let sink = Arc::new(Sink(state.clone()));
        let from = StreamOffset::Timestamp((now_unix() - window.as_secs_f64()).max(0.0) as u64);
        let (reader, reading) = StreamReader::open(link, from, vec![sink]).await?;
        let task = tokio::spawn(async move {
            match reading.run(&CancellationToken::new()).await {
                Ok(()) => QueueError::Closed("results stream reader stopped".into()),
                Err(e) => e,
            }
        });
        Ok((Tracker { state, reader }, task))
    }

    /// Waits until every event published before this call has been read.
    pub async fn sync(&self) -> Result<(), QueueError> {
        self.reader.sync().await
    }

    /// Requests the tracker remembers as ended or cancelled (bounded by the window).
    pub fn remembered(&self) -> usize {
        lock(&self.state).len()
    }

    /// The terminal event kind of `request_id`, if it ended.
    pub fn terminal(&self, request_id: &str) -> Option<EventKind> {
        lock(&self.state).terminal.get(request_id).copied()
    }

    /// Registers a running job: a later terminal event for it (`cancelled`, a `failed` such as
    /// `request_timeout`, another worker's `completed`) cancels `token`. Cancels it at once when the
    /// request already ended.
    pub fn register_running(&self, request_id: &str, token: CancellationToken) -> RunningGuard {
        let mut state = lock(&self.state);
        if state.cancelled.contains(request_id) || state.terminal.contains_key(request_id) {
            token.cancel();
        }
        state.running.insert(request_id.to_string(), token);
        RunningGuard {
            state: self.state.clone(),
            request_id: request_id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::job::EndpointKind;

    fn at(id: &str, kind: EventKind, when: f64) -> Event {
        Event {
            at: when,
            ..fleet::events::testing::event(id, EndpointKind::Sprint, kind)
        }
    }

    #[test]
    fn entries_older_than_the_window_are_dropped() {
        let mut state = State::with_window(Duration::from_secs(100));
        state.apply(&at("old", EventKind::Completed, 1000.0), 1000.0);
        state.apply(&at("gone", EventKind::Cancelled, 1010.0), 1010.0);
        state.apply(&at("new", EventKind::Completed, 1090.0), 1090.0);
        assert_eq!(state.len(), 4, "old + gone (terminal and cancelled) + new");
        // 1105: "old" is 105 s old, "gone" 95 s.
        state.apply(&at("other", EventKind::Started, 1105.0), 1105.0);
        assert!(!state.terminal.contains_key("old"));
        assert!(state.terminal.contains_key("gone") && state.cancelled.contains("gone"));
        state.apply(&at("x", EventKind::Progress, 1111.0), 1111.0);
        assert!(!state.terminal.contains_key("gone") && !state.cancelled.contains("gone"));
        assert_eq!(state.terminal.get("new"), Some(&EventKind::Completed));
        assert_eq!(state.order.len(), 1);
    }

    #[test]
    fn the_first_terminal_event_wins_and_is_remembered_once() {
        let mut state = State::with_window(Duration::from_secs(100));
        state.apply(&at("r", EventKind::Completed, 10.0), 10.0);
        state.apply(&at("r", EventKind::Completed, 11.0), 11.0);
        assert_eq!(state.terminal.get("r"), Some(&EventKind::Completed));
        assert_eq!(
            state.order.len(),
            1,
            "a duplicate terminal event adds no entry"
        );
        state.apply(&at("r", EventKind::Cancelled, 12.0), 12.0);
        assert_eq!(state.terminal.get("r"), Some(&EventKind::Completed));
        assert!(state.cancelled.contains("r"));
    }

    #[test]
    fn any_terminal_event_stops_a_running_job() {
        let mut state = State::with_window(Duration::from_secs(100));
        let (timed_out, done_elsewhere, progressing) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        state.running.insert("t".into(), timed_out.clone());
        state.running.insert("d".into(), done_elsewhere.clone());
        state.running.insert("p".into(), progressing.clone());
        state.apply(&at("t", EventKind::Failed, 1.0), 1.0);
        state.apply(&at("d", EventKind::Completed, 1.0), 1.0);
        state.apply(&at("p", EventKind::Progress, 1.0), 1.0);
        assert!(timed_out.is_cancelled() && done_elsewhere.is_cancelled());
        assert!(!progressing.is_cancelled());
    }
}
