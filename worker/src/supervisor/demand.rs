//! The supervisor's broker link: waiting jobs, and the notices it publishes into the results stream (a
//! start failure, for the waiting requests' `logs`). Waiting jobs, as the supervisor reads them: a passive `queue.declare` of each served endpoint's job
//! queue, whose answer carries the queue's ready-message count (AMQP 0-9-1; no management plugin needed).
//! Jobs a worker has taken (unacked) are not in that count; the supervisor reads those from its own
//! workers' `/metrics` instead, so demand = waiting here + running on this host. Chosen over the
//! management HTTP API (which reports ready + unacked) because it needs only the AMQP port and
//! credentials every worker already has, and because unacked jobs of other hosts' workers are capacity
//! already serving them, not demand for this host.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use fleet::events::Notice;
use fleet::job::EndpointKind;
use fleet::queue::{self, Publisher, QueueError, Topology};

/// Longest wait for the broker's answer to `connection.close` of a failed connection.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A broker connection for passive declares and notices; reconnects after any failure.
pub struct QueueDepth {
    url: String,
    topology: Topology,
    endpoints: Vec<EndpointKind>,
    link: Option<(Connection, Channel, Publisher)>,
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
            self.reset().await;
        }
        result
    }

    /// Publishes `notice` into the results stream (confirmed).
    pub async fn notify(&mut self, notice: &Notice) -> Result<(), QueueError> {
        let result = match self.link().await {
            Ok((_, publisher)) => publisher.publish_notice(notice).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.reset().await;
        }
        result
    }

    /// A failed passive declare closes the channel; start afresh next time.
    async fn reset(&mut self) {
        if let Some((conn, _, _)) = self.link.take() {
            let close = conn.close(200, "supervisor reconnecting".into());
            let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
        }
    }

    /// The open channel and publisher, connecting first when there is none.
    async fn link(&mut self) -> Result<(Channel, Publisher), QueueError> {
        if let Some((_, ch, publisher)) = &self.link {
            return Ok((ch.clone(), publisher.clone()));
        }
        let conn = queue::connect_declared(&self.url, &self.topology).await?;
        let ch = queue::open_channel(&conn).await?;
        let publisher = Publisher::new(&conn, self.topology.clone()).await?;
        self.link = Some((conn, ch.clone(), publisher.clone()));
        Ok((ch, publisher))
    }

    async fn read(&mut self) -> Result<u32, QueueError> {
        let (ch, _) = self.link().await?;
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
