//! Closing requests whose job the broker dead-lettered without a `failed` event (service-contract §5:
//! job queues dead-letter to `{prefix}.dead`), so nothing already accepted is left `IN_QUEUE` or
//! `IN_PROGRESS` forever.
//!
//! A worker that gives up publishes `failed` (confirmed) and then rejects the job, but a worker killed on
//! the job's last allowed delivery publishes nothing: the quorum queue drops the message to the dead
//! exchange once `x-delivery-count` exceeds `x-delivery-limit`. The dead exchange is a fanout, so every
//! dead-lettered message reaches both `{prefix}.dead` (kept for inspection, untouched here) and
//! `{prefix}.dead.watch`, which the dispatchers consume as competing consumers. For each message: sync
//! the [`RequestWatch`] (every event confirmed before the message was dead-lettered is then known), and
//! unless the request already ended publish `failed` with `runner_server_error` (billing 0, confirmed),
//! then ack. A dispatcher that dies between the publish and the ack leaves the message to another one,
//! whose sync sees that `failed` and publishes nothing; even a duplicate would be harmless, since the
//! first terminal event wins in every reader.
//!
//! The same consumer loop serves `{prefix}.deadlines.due`, the start-deadline timers (`deadlines`).

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection};
use tokio_util::sync::CancellationToken;

use super::deadlines::{handle_due, retry_or_fail, RequestWatch};
use fleet::events::{ErrorType, Event, JobMessage};
use fleet::job::EndpointKind;
use fleet::queue::{
    self, header_str, message_id, Backoff, Link, QueueError, Topology, HEADER_ENDPOINT,
};

/// Messages a dispatcher holds unacknowledged at once per watched queue (handled one by one).
const PREFETCH: u16 = 16;
/// What the client reads when the broker gave up on its job.
const DEAD_MESSAGE: &str = "The runner failed to process the request";

/// The queues the dispatchers consume as competing consumers to close requests nobody else will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    /// `{prefix}.dead.watch`: jobs the broker dead-lettered.
    DeadLetters,
    /// `{prefix}.deadlines.due`: start-deadline timers that fired (`deadlines`).
    Deadlines,
}

impl Watched {
    fn queue(self, topology: &Topology) -> String {
        match self {
            Watched::DeadLetters => topology.dead_watch_queue(),
            Watched::Deadlines => topology.deadlines_due_queue(),
        }
    }

    async fn handle(self, watch: &RequestWatch, delivery: &Delivery) -> Result<(), QueueError> {
        match self {
            Watched::DeadLetters => handle(watch, delivery).await,
            Watched::Deadlines => handle_due(watch, delivery).await,
        }
    }
}

/// Runs the dead-letter and the start-deadline consumers over `watch` until `shutdown`; the first
/// permanent error of either ends both.
pub async fn run_recovery(
    link: &Link,
    watch: &RequestWatch,
    shutdown: &CancellationToken,
) -> Result<(), QueueError> {
    tokio::try_join!(
        run(link, watch, shutdown, Watched::DeadLetters),
        run(link, watch, shutdown, Watched::Deadlines),
    )
    .map(|_| ())
}

/// Consumes the `which` queue until `shutdown` or a permanent broker error, consuming again on the
/// link's next connection when the broker goes away.
async fn run(
    link: &Link,
    watch: &RequestWatch,
    shutdown: &CancellationToken,
    which: Watched,
) -> Result<(), QueueError> {
    // Decisions need the whole stream: wait for the replay before taking messages.
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        _ = watch.caught_up() => {}
    }
    let mut backoff = Backoff::reconnect();
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            conn = link.connection() => conn,
        };
        let Some(conn) = conn else { return Ok(()) };
        match consume_once(&conn, link.topology(), watch, shutdown, which).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, ?which, "watch interrupted; consuming again after a pause");
                if !backoff.wait(shutdown).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

async fn consume_once(
    conn: &Connection,
    topology: &Topology,
    watch: &RequestWatch,
    shutdown: &CancellationToken,
    which: Watched,
) -> Result<(), QueueError> {
    let channel = queue::open_channel(conn).await?;
    let queue_name = which.queue(topology);
    let mut consumer = queue::consume(&channel, &queue_name, "", PREFETCH).await?;
    tracing::info!(queue = %queue_name, "watching");
    let result = loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => next,
        };
        let delivery = match next {
            None => {
                break Err(QueueError::Closed(format!(
                    "{queue_name} consumer cancelled"
                )))
            }
            Some(Err(source)) => {
                break Err(QueueError::Broker {
                    op: "watched queue delivery",
                    source,
                })
            }
            Some(Ok(d)) => d,
        };
        // On shutdown the half-handled delivery is dropped unacknowledged: the broker redelivers it.
        let handled = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            r = which.handle(watch, &delivery) => r,
        };
        if let Err(e) = handled {
            // Back to the queue: it is handled again (here or by another dispatcher) once the broker is fine.
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if let Err(e2) = delivery.nack(requeue).await {
                tracing::warn!(error = %e2, queue = %queue_name, "could not requeue a message");
            }
            if let Err(e) = retry_or_fail(e, shutdown).await {
                break Err(e);
            }
            if !channel.status().connected() {
                break Err(QueueError::Closed(format!("{queue_name} channel closed")));
            }
        }
    };
    // Unacknowledged deliveries return to the queue when the channel closes.
    if let Err(e) = channel.close(200, "dispatcher stopping".into()).await {
        tracing::debug!(error = %e, queue = %queue_name, "closing the watch channel");
    }
    result
}

/// Publishes `failed` for the request of one dead-lettered job unless it already ended, then acks.
async fn handle(watch: &RequestWatch, delivery: &Delivery) -> Result<(), QueueError> {
    let reason = death_reason(&delivery.properties);
    let Some((request_id, kind)) = identify(&delivery.properties, &delivery.data) else {
        // Nothing to close; the copy in `{prefix}.dead` stays for inspection.
        tracing::warn!(
            reason = reason.as_deref(),
            "dead-lettered message names no request; acknowledged"
        );
        return ack(delivery).await;
    };
    watch.sync().await?;
    if watch.is_terminal(&request_id) {
        tracing::debug!(
            request_id,
            reason = reason.as_deref(),
            "dead-lettered job already ended"
        );
        return ack(delivery).await;
    }
    let event = Event::failed(
        &request_id,
        kind,
        ErrorType::RunnerServerError,
        DEAD_MESSAGE,
    );
    watch.publisher().publish_event(&event).await?;
    tracing::warn!(request_id, endpoint = %kind, reason = reason.as_deref(), "job dead-lettered without a failed event; request failed");
    ack(delivery).await
}

pub(crate) async fn ack(delivery: &Delivery) -> Result<(), QueueError> {
    delivery
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(QueueError::broker("ack watched message"))
}

/// The request and endpoint of a dead-lettered job: from its body, else from `message_id` and the
/// `x-endpoint` header (what the publisher sets on every job).
pub(crate) fn identify(props: &BasicProperties, body: &[u8]) -> Option<(String, EndpointKind)> {
    if let Ok(job) = serde_json::from_slice::<JobMessage>(body) {
        return Some((job.request_id, job.endpoint));
    }
    let id = message_id(props).filter(|id| !id.is_empty())?;
    let kind = header_str(props, HEADER_ENDPOINT)?.parse().ok()?;
    Some((id, kind))
}

/// `reason` of the newest `x-death` entry (`rejected`, `delivery_limit`, `expired`, …), for the logs.
pub fn death_reason(props: &BasicProperties) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = props.headers().as_ref()?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(newest) = deaths.as_slice().first()? else {
        return None;
    };
    match newest.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, FieldTable};

    #[test]
    fn identifies_jobs_by_body_or_properties() {
        let input = fleet::job::validate(
            EndpointKind::Base,
            &serde_json::json!({"prompt": "p"}),
            || 1,
        )
        .expect("valid input");
        let job = JobMessage {
            request_id: "r-body".into(),
            endpoint: EndpointKind::Base,
            submitted_at: 1.0,
            deadline: None,
            deadline_timer: false,
            input,
        };
        let body = serde_json::to_vec(&job).expect("json");
        assert_eq!(
            identify(&BasicProperties::default(), &body),
            Some(("r-body".to_string(), EndpointKind::Base))
        );

        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_ENDPOINT.into(),
            AMQPValue::LongString("sprint".into()),
        );
        let props = BasicProperties::default()
            .with_message_id("r-props".into())
            .with_headers(headers);
        assert_eq!(
            identify(&props, b"not json"),
            Some(("r-props".to_string(), EndpointKind::Sprint))
        );
        let no_kind = BasicProperties::default().with_message_id("r".into());
        assert_eq!(identify(&no_kind, b"{}"), None);
        assert_eq!(identify(&BasicProperties::default(), b""), None);
    }

    #[test]
    fn reads_the_newest_death_reason() {
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert("queue".into(), AMQPValue::LongString("t.jobs.base".into()));
        let mut older = FieldTable::default();
        older.insert("reason".into(), AMQPValue::LongString("rejected".into()));
        let deaths: FieldArray =
            vec![AMQPValue::FieldTable(death), AMQPValue::FieldTable(older)].into();
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(deaths));
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(death_reason(&props).as_deref(), Some("delivery_limit"));
        assert_eq!(death_reason(&BasicProperties::default()), None);
    }
}
