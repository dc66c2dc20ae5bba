//! The worker's view of the results stream: which requests already ended (`completed`, `failed`,
//! `cancelled`; such jobs are acked without running) and which running jobs were cancelled.
//!
//! Dedupe must not race the stream: before deciding on a job the worker calls [`Tracker::sync`], which
//! publishes a marker into the stream and waits until this tracker has read it back. Every event confirmed
//! before the marker (a completion by a worker that died before acking, a cancellation by the dispatcher)
//! sits at a lower offset, so after `sync` the tracker has seen it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::Connection;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use fleet::events::EventKind;
use fleet::queue::{subscribe_raw, Publisher, QueueError, StreamItem, StreamOffset};

/// How long [`Tracker::sync`] waits for its marker to come back.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    terminal: HashMap<String, EventKind>,
    running: HashMap<String, CancellationToken>,
    cancelled: HashSet<String>,
    markers: HashMap<String, oneshot::Sender<()>>,
}

/// Follows the results stream from its first offset in a background task.
#[derive(Clone)]
pub struct Tracker {
    state: Arc<Mutex<State>>,
    publisher: Publisher,
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

impl Tracker {
    /// Starts reading the stream. The returned task ends only with an error (the stream broke); the
    /// worker treats that as fatal.
    pub async fn start(
        conn: &Connection,
        publisher: Publisher,
    ) -> Result<(Self, JoinHandle<QueueError>), QueueError> {
        let mut stream = subscribe_raw(conn, publisher.topology(), StreamOffset::First).await?;
        let state = Arc::new(Mutex::new(State::default()));
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                match stream.next().await {
                    None => return QueueError::Closed("results stream ended".into()),
                    Some(Err(e)) => return e,
                    Some(Ok((_, item))) => apply(&task_state, item),
                }
            }
        });
        Ok((Tracker { state, publisher }, task))
    }

    /// Waits until every event published before this call has been read.
    pub async fn sync(&self) -> Result<(), QueueError> {
        let token = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.state).markers.insert(token.clone(), tx);
        let result = async {
            self.publisher.publish_marker(&token).await?;
            match tokio::time::timeout(SYNC_TIMEOUT, rx).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(QueueError::Closed("results tracker stopped".into())),
                Err(_) => Err(QueueError::Timeout("the results stream to catch up")),
            }
        }
        .await;
        lock(&self.state).markers.remove(&token);
        result
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

fn apply(state: &Mutex<State>, item: StreamItem) {
    let mut state = lock(state);
    match item {
        StreamItem::Marker(token) => {
            if let Some(tx) = state.markers.remove(&token) {
                let _ = tx.send(());
            }
        }
        StreamItem::Event(event) => {
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
}
