//! A broker link that survives a broker restart: one connection at a time, replaced with backoff when it
//! dies, the topology declared again on each new connection, and the process's [`Publisher`] moved onto it.
//!
//! lapin 4 has no recovery we can rely on for consumers, so recovery is ours: [`Link`] owns the current
//! connection and a supervisor task that polls it; every consumer of the process (results stream reader,
//! job and submit consumers, the dead-letter watch) notices its own end (the consumer stream ends or
//! errors), asks [`Link::connection`] for the live connection (waiting while the broker is away) and
//! subscribes again. Unacknowledged deliveries of the dead channels are requeued by the broker itself.
//! While no connection is live, publishing fails at once with a retryable error (the HTTP API answers 503).

use std::sync::{Arc, Weak};
use std::time::Duration;

use lapin::Connection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{connect_declared, Publisher, QueueError, Topology};

/// How often the supervisor looks at the connection.
const POLL: Duration = Duration::from_millis(200);

/// Exponential backoff between reconnect attempts: `first`, doubled each time, at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// The backoff of broker reconnects: 250 ms doubling to 5 s.
    pub fn reconnect() -> Self {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(5))
    }

    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first, max }
    }

    /// The next pause (and doubles the one after it).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Sleeps the next pause; false when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// The process's connection to the broker, replaced when it dies; see the module docs.
pub struct Link {
    url: String,
    topology: Topology,
    publisher: Publisher,
    current: watch::Sender<Option<Arc<Connection>>>,
    closed: CancellationToken,
}

impl Link {
    /// Connects (once: a broker that is down at start is an error), declares the topology, opens the
    /// publisher, and starts the supervisor that reconnects from then on.
    pub async fn connect(url: &str, topology: &Topology) -> Result<Arc<Link>, QueueError> {
        let conn = connect_declared(url, topology).await?;
        let publisher = Publisher::new(&conn, topology.clone()).await?;
        let link = Arc::new(Link {
            url: url.to_string(),
            topology: topology.clone(),
            publisher,
            current: watch::channel(Some(Arc::new(conn))).0,
            closed: CancellationToken::new(),
        });
        tokio::spawn(supervise(Arc::downgrade(&link), link.closed.clone()));
        Ok(link)
    }

    /// The confirmed publisher; it follows the link onto each new connection.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// True while the current connection is open.
    pub fn is_connected(&self) -> bool {
        self.current
            .borrow()
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// The live connection, waiting while the broker is away; `None` once the link is closed.
    pub async fn connection(&self) -> Option<Arc<Connection>> {
        let mut rx = self.current.subscribe();
        loop {
            if let Some(conn) = rx.borrow_and_update().as_ref() {
                if conn.status().connected() {
                    return Some(conn.clone());
                }
            }
            tokio::select! {
                _ = self.closed.cancelled() => return None,
                changed = rx.changed() => if changed.is_err() { return None },
                // The supervisor may not have noticed yet that the connection died.
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Stops reconnecting and closes the connection.
    pub async fn close(&self, reason: &str) {
        self.closed.cancel();
        let conn = self.current.send_replace(None);
        if let Some(conn) = conn {
            if let Err(e) = conn.close(200, reason.into()).await {
                tracing::debug!(error = %e, "closing the broker connection");
            }
        }
    }
}

/// Polls the connection; when it is gone, reconnects with backoff, declares the topology again and moves
/// the publisher onto the new connection.
async fn supervise(link: Weak<Link>, closed: CancellationToken) {
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let Some(l) = link.upgrade() else { return };
        let conn = l.current.borrow().clone();
        match conn {
            Some(c) if c.status().connected() => {
                // The connection is fine; a publisher channel closed by a channel error is reopened.
                if !l.publisher.is_open() {
                    if let Err(e) = l.publisher.reopen(&c).await {
                        tracing::warn!(error = %e, "reopening the publisher channel failed");
                    }
                }
                continue;
            }
            _ => {}
        }
        tracing::warn!("broker connection lost; reconnecting");
        l.current.send_replace(None);
        let (url, topology) = (l.url.clone(), l.topology.clone());
        drop(l);
        let mut backoff = Backoff::reconnect();
        let mut attempts = 0u32;
        loop {
            if !backoff.wait(&closed).await {
                return;
            }
            attempts += 1;
            let fresh = async {
                let conn = connect_declared(&url, &topology).await?;
                let Some(l) = link.upgrade() else {
                    return Ok(None);
                };
                l.publisher.reopen(&conn).await?;
                Ok::<_, QueueError>(Some((l, conn)))
            }
            .await;
            match fresh {
                Ok(None) => return,
                Ok(Some((l, conn))) => {
                    tracing::info!(attempts, "broker connection re-established");
                    l.current.send_replace(Some(Arc::new(conn)));
                    break;
                }
                Err(e) => tracing::debug!(attempts, error = %e, "reconnect failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
        let got: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [250, 500, 1000, 1000]);
    }
}
