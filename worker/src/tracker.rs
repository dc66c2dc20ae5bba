//! The worker's view of the results stream: which requests already ended (`completed`, `failed`,
//! `cancelled`; such jobs are acked without running) and which running jobs were cancelled.
//!
//! The tracker is the sink of the worker's one [`StreamReader`]. Dedupe must not race the stream: before
//! deciding on a job the worker calls [`Tracker::sync`], which publishes a marker into the stream and
//! waits until the reader has read it back. Every event confirmed
//! before the marker (a completion by a worker that died before acking, a cancellation by the dispatcher)
//! sits at a lower offset, so after `sync` the tracker has seen it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use fleet::events::{Event, EventKind};
use fleet::queue::{EventSink, Link, QueueError, StreamReader};

#[derive(Default)]
struct State {
    terminal: HashMap<String, EventKind>,
    running: HashMap<String, CancellationToken>,
    cancelled: HashSet<String>,
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
        let mut state = lock(&self.0);
        let kind = event.kind();
        if kind == EventKind::Cancelled {
            state.cancelled.insert(event.request_id.clone());
            if let Some(token) = state.running.get(&event.request_id) {
                token.cancel();
            }
        }
        if kind.is_terminal() {
            // The first terminal event wins (a late `cancelled` after `completed` changes nothing).
            state
                .terminal
                .entry(event.request_id.clone())
                .or_insert(kind);
        }
    }
}

impl Tracker {
    /// Starts the process's reader of the stream on `link` with the tracker as its sink. The reader
    /// resubscribes across broker restarts; the returned task ends only with a permanent error, which the
    /// worker treats as fatal.
    pub async fn start(link: Arc<Link>) -> Result<(Self, JoinHandle<QueueError>), QueueError> {
        let state = Arc::new(Mutex::new(State::default()));
        let sink = Arc::new(Sink(state.clone()));
        let (reader, reading) = StreamReader::open(link, vec![sink]).await?;
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

    /// The terminal event kind of `request_id`, if it ended.
    pub fn terminal(&self, request_id: &str) -> Option<EventKind> {
        lock(&self.state).terminal.get(request_id).copied()
    }

    /// Registers a running job: a later `cancelled` event for it cancels `token`. Cancels it at once when
    /// the request was already cancelled.
    pub fn register_running(&self, request_id: &str, token: CancellationToken) -> RunningGuard {
        let mut state = lock(&self.state);
        if state.cancelled.contains(request_id) {
            token.cancel();
        }
        state.running.insert(request_id.to_string(), token);
        RunningGuard {
            state: self.state.clone(),
            request_id: request_id.to_string(),
        }
    }
}
