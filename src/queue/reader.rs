//! The one reader of the results stream in a process. Every part of a process that needs the stream
//! (the dispatcher's request registry and its deadline/dead-letter watch, the worker's tracker) is an
//! [`EventSink`] of a single [`StreamReader`], so the stream is consumed once, in one order, and
//! "caught up" and "synced" mean the same thing for all of them.
//!
//! At start the reader subscribes from a given offset (the first one, or a point in time for a process
//! that replays only a window of the stream) and publishes a start marker; when it reads the
//! marker back the replay is complete ([`StreamReader::caught_up`]), and events from then on are `live`.
//! [`StreamReader::sync`] publishes a marker of its own and waits until it is read back: every event the
//! broker confirmed before the call has then been handed to every sink.
//!
//! The reader survives a broker restart: when its consumer ends it subscribes again on the [`Link`]'s next
//! connection from the offset after the last one it read, so no event is applied twice or skipped. A
//! marker whose publish was confirmed is read back after the restart; `sync` callers waiting meanwhile
//! time out (retryable).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{
    subscribe_raw, Backoff, Link, Publisher, QueueError, ResultStream, StreamItem, StreamOffset,
};
use crate::events::{Event, Notice};

/// How long [`StreamReader::sync`] waits for its marker to come back.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// A consumer of the results stream, called on the reader's task in stream order.
pub trait EventSink: Send + Sync {
    /// One event at `offset`; `live` once the replay at start is complete.
    fn apply(&self, offset: u64, event: &Event, live: bool);
    /// One notice about an endpoint kind at `offset` (most sinks have no use for them).
    fn notice(&self, _offset: u64, _notice: &Notice, _live: bool) {}
    /// The replay at start is complete: everything published before the process started was applied.
    fn caught_up(&self) {}
}

/// The process's reader of the results stream; see the module docs.
pub struct StreamReader {
    link: Arc<Link>,
    sinks: Vec<Arc<dyn EventSink>>,
    markers: Mutex<HashMap<String, oneshot::Sender<()>>>,
    caught_up: watch::Sender<bool>,
}

/// The subscription of a [`StreamReader`], read by [`Reading::run`].
pub struct Reading {
    reader: Arc<StreamReader>,
    stream: ResultStream<StreamItem>,
    start_marker: String,
    /// Offset of the last message read (events and markers): a resubscription starts after it.
    last_offset: Option<u64>,
    /// Where the subscription started (a resubscription before anything was read starts there again).
    start: StreamOffset,
}

impl StreamReader {
    /// Subscribes from `start` on `link`'s connection and publishes the start marker (through the link's
    /// publisher, which the reader also uses for the markers of [`sync`](Self::sync)).
    /// `StreamOffset::Timestamp` starts at the first stream chunk written at or after that time, so a
    /// few earlier events may come too.
    pub async fn open(
        link: Arc<Link>,
        start: StreamOffset,
        sinks: Vec<Arc<dyn EventSink>>,
    ) -> Result<(Arc<StreamReader>, Reading), QueueError> {
        let conn = link
            .connection()
            .await
            .ok_or_else(|| QueueError::Closed("broker link closed".into()))?;
        let stream = subscribe_raw(&conn, link.topology(), start).await?;
        let start_marker = uuid::Uuid::new_v4().to_string();
        link.publisher().publish_marker(&start_marker).await?;
        let reader = Arc::new(StreamReader {
            link,
            sinks,
            markers: Mutex::new(HashMap::new()),
            caught_up: watch::channel(false).0,
        });
        let reading = Reading {
            reader: reader.clone(),
            stream,
            start_marker,
            last_offset: None,
            start,
        };
        Ok((reader, reading))
    }

    fn markers(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<()>>> {
        // A panic while holding the lock leaves a plain map behind; keep using it.
        self.markers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until the replay at start has reached "now".
    pub async fn caught_up(&self) {
        let mut rx = self.caught_up.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Waits until every event published before this call has been applied by every sink.
    pub async fn sync(&self) -> Result<(), QueueError> {
        self.sync_within(SYNC_TIMEOUT).await
    }

    /// [`sync`](Self::sync), giving up after `timeout` (the marker's publish included).
    pub async fn sync_within(&self, timeout: Duration) -> Result<(), QueueError> {
        let token = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        self.markers().insert(token.clone(), tx);
        let result = tokio::time::timeout(timeout, async {
            self.link.publisher().publish_marker(&token).await?;
            rx.await
                .map_err(|_| QueueError::Closed("results stream reader stopped".into()))
        })
        .await
        .unwrap_or(Err(QueueError::Timeout("the results stream to catch up")));
        // Removed here, not on drop: callers bound the wait with `timeout`, not by dropping this future.
        self.markers().remove(&token);
        result
    }

    /// The confirmed publisher the reader uses.
    pub fn publisher(&self) -> &Publisher {
        self.link.publisher()
    }
}

impl Reading {
    /// Reads the stream until `shutdown` (Ok) or until it breaks for good (the error). A consumer that
    /// ends with a retryable error (the broker went away) is resubscribed after the last offset read.
    pub async fn run(mut self, shutdown: &CancellationToken) -> Result<(), QueueError> {
        let reader = self.reader.clone();
        let mut live = false;
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                item = self.stream.next() => item,
            };
            let item = match item {
                Some(Ok(item)) => item,
                Some(Err(e)) if !e.is_retryable() => return Err(e),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, last_offset = ?self.last_offset, "results stream interrupted; resubscribing");
                    if !self.resubscribe(shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
                None => {
                    tracing::warn!(last_offset = ?self.last_offset, "results stream ended; resubscribing");
                    if !self.resubscribe(shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            self.last_offset = Some(item.0);
            match item {
                (_, StreamItem::Marker(token)) if !live && token == self.start_marker => {
                    live = true;
                    reader.caught_up.send_replace(true);
                    for sink in &reader.sinks {
                        sink.caught_up();
                    }
                }
                (_, StreamItem::Marker(token)) => {
                    if let Some(tx) = reader.markers().remove(&token) {
                        let _ = tx.send(());
                    }
                }
                (offset, StreamItem::Event(event)) => {
                    for sink in &reader.sinks {
                        sink.apply(offset, &event, live);
                    }
                }
                (offset, StreamItem::Notice(notice)) => {
                    for sink in &reader.sinks {
                        sink.notice(offset, &notice, live);
                    }
                }
            }
        }
    }

    /// Subscribes again after the last offset read, on the link's live connection, with backoff; false
    /// when `shutdown` (or the link closing) came first.
    async fn resubscribe(&mut self, shutdown: &CancellationToken) -> bool {
        let from = self
            .last_offset
            .map_or(self.start, |o| StreamOffset::Offset(o + 1));
        let link = self.reader.link.clone();
        let mut backoff = Backoff::reconnect();
        loop {
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return false,
                conn = link.connection() => conn,
            };
            let Some(conn) = conn else { return false };
            match subscribe_raw(&conn, link.topology(), from).await {
                Ok(stream) => {
                    tracing::info!(?from, "results stream resubscribed");
                    self.stream = stream;
                    return true;
                }
                Err(e) => tracing::debug!(error = %e, "resubscribing to the results stream failed"),
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
    }
}
