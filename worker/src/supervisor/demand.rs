//! Waiting jobs, as the supervisor reads them: a passive `queue.declare` of each served endpoint's job
//! queue, whose answer carries the queue's ready-message count (AMQP 0-9-1; no management plugin needed).
//! Jobs a worker has taken (unacked) are not in that count; the supervisor reads those from its own
//! workers' `/metrics` instead, so demand = waiting here + running on this host. Chosen over the
//! management HTTP API (which reports ready + unacked) because it needs only the AMQP port and
//! credentials every worker already has, and because unacked jobs of other hosts' workers are capacity
//! already serving them, not demand for this host.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use fleet::job::EndpointKind;
use fleet::queue::{self, QueueError, Topology};

/// Longest wait for the broker's answer to `connection.close` of a failed connection.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A broker connection for passive declares; reconnects after any failure.
pub struct QueueDepth {
    url: String,
    topology: Topology,
    endpoints: Vec<EndpointKind>,
    link: Option<(Connection, Channel)>,
}

impl QueueDepth {
    pub fn new(url: String, topology: Topology, endpoints: Vec<EndpointKind>) -> Self {
        QueueDepth {
            url,
            topology,
            endpoints,
            link: None,
        }
    }

    /// Ready messages on the served endpoints' job queues, summed. Declares the topology on each new
    /// connection (idempotent), so the queues exist before any worker started.
    pub async fn waiting(&mut self) -> Result<u32, QueueError> {
        let result = self.read().await;
        if result.is_err() {
            // A failed passive declare closes the channel; start afresh next time.
            if let Some((conn, _)) = self.link.take() {
                let close = conn.close(200, "supervisor reconnecting".into());
                let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
            }
        }
        result
    }

    async fn read(&mut self) -> Result<u32, QueueError> {
        let ch = match &self.link {
            Some((_, ch)) => ch.clone(),
            None => {
                let conn = queue::connect_declared(&self.url, &self.topology).await?;
                let ch = queue::open_channel(&conn).await?;
                self.link = Some((conn, ch.clone()));
                ch
            }
        };
        let mut total = 0u32;
        for kind in &self.endpoints {
            let name = self.topology.job_queue(*kind);
            let q = ch
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(QueueError::broker("passive declare of a job queue"))?;
            total = total.saturating_add(q.message_count());
        }
        Ok(total)
    }
}
