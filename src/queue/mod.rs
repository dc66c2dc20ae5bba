//! RabbitMQ side of the fleet (service-contract §5): topology names and idempotent declaration, the
//! confirmed [`Publisher`], job consumption helpers, and the `fleet.results` stream reader.
//!
//! Contract summary for users of this module (dispatcher and worker):
//! - [`Topology`] names every exchange and queue from one prefix (default `fleet`), so tests isolate
//!   themselves with a uuid prefix. [`Topology::declare`] is idempotent and may be called by every process
//!   at start; the arguments never change between calls (RabbitMQ refuses a redeclare with other arguments).
//! - [`Publisher`] returns from `publish_*` only after the broker confirmed the message; a `basic.nack` or
//!   a `basic.return` (mandatory, unroutable) is an error. Jobs are persistent JSON with
//!   `message_id = request_id` and header `x-endpoint = kind`.
//! - [`subscribe_results`] reads the `fleet.results` stream from a [`StreamOffset`] and yields
//!   `(offset, Event)`; keep the last offset and resume from `StreamOffset::Offset(last + 1)`.
//! - [`Link`] keeps one connection alive across broker restarts (reconnect with backoff, topology
//!   declared again, the publisher moved over); consumers re-subscribe on its new connection.
//! - [`QueueError::is_retryable`] tells a transient broker problem from a permanent one.
//!
//! Mirrors RabbitMQ's documented AMQP 0.9.1 usage of quorum queues (`x-delivery-limit`,
//! `x-dead-letter-exchange`) and streams (`x-queue-type=stream`, `x-max-age`, `x-stream-offset`), as seen
//! working on RabbitMQ 3.10.8 with lapin 4.12.

mod deadline;
mod link;
mod publish;
mod reader;
mod stream;

pub use deadline::{bucket as deadline_bucket, DeadlineTimer, GRACE as DEADLINE_GRACE};
pub use link::{Backoff, Link};
pub use publish::{Publisher, CONFIRM_TIMEOUT, MARKER_ROUTING_KEY, MARKER_TYPE};
pub use reader::{EventSink, Reading, StreamReader};
pub use stream::{subscribe_raw, subscribe_results, ResultStream, StreamItem, StreamOffset};

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

use crate::job::EndpointKind;

/// Header carrying the endpoint kind on job messages.
pub const HEADER_ENDPOINT: &str = "x-endpoint";
/// Header the quorum queue sets on redelivered messages: how many earlier deliveries failed.
pub const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";
/// Header the stream sets on every delivery: the message's offset in the stream.
pub const HEADER_STREAM_OFFSET: &str = "x-stream-offset";

/// Errors of the queue layer.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Could not open the connection to the broker.
    #[error("connect to broker: {0}")]
    Connect(#[source] lapin::Error),
    /// A broker operation (channel, declare, publish, ack, consume) failed.
    #[error("broker operation {op}: {source}")]
    Broker {
        op: &'static str,
        #[source]
        source: lapin::Error,
    },
    /// The broker answered `basic.nack`: it could not store the message.
    #[error("broker nacked the message published to {exchange:?} with key {routing_key:?}")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    /// A mandatory message matched no queue (the topology is not declared, or the kind has no queue).
    #[error(
        "message to {exchange:?} with key {routing_key:?} was returned unroutable: {reply_text}"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply_text: String,
    },
    /// The broker did not confirm a publish although the channel is in confirm mode.
    #[error("publish to {exchange:?} was not confirmed by the broker")]
    NotConfirmed { exchange: String },
    /// A message body could not be serialised.
    #[error("serialise message: {0}")]
    Serialize(#[source] serde_json::Error),
    /// A received message is malformed (bad JSON, missing header). Permanent for that message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A consumer or stream ended because the broker cancelled it or the channel closed.
    #[error("consumer closed: {0}")]
    Closed(String),
    /// Waiting for the broker took longer than allowed.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

impl QueueError {
    /// True when retrying later (on a new connection if needed) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            QueueError::Connect(_) => true,
            QueueError::Broker { source, .. } => source.can_be_recovered(),
            QueueError::Nacked { .. } => true,
            QueueError::Unroutable { .. } => false,
            QueueError::NotConfirmed { .. } => true,
            QueueError::Serialize(_) => false,
            QueueError::Malformed(_) => false,
            QueueError::Closed(_) => true,
            QueueError::Timeout(_) => true,
        }
    }

    /// `map_err` adapter naming the broker operation that failed.
    pub fn broker(op: &'static str) -> impl FnOnce(lapin::Error) -> QueueError {
        move |source| QueueError::Broker { op, source }
    }
}

/// Names and settings of every exchange and queue, derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Name prefix; `fleet` in production, `t-<uuid>` in tests.
    pub prefix: String,
    /// `x-delivery-limit` of the job queues: a job is delivered at most `delivery_limit + 1` times.
    pub delivery_limit: u32,
    /// `x-max-age` of the results stream (RabbitMQ syntax: `7D`, `12h`, `30m`).
    pub results_max_age: String,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            prefix: "fleet".into(),
            delivery_limit: 3,
            results_max_age: "7D".into(),
        }
    }
}

impl Topology {
    /// The default topology with another prefix.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
            ..Topology::default()
        }
    }

    /// `{prefix}.submit`: quorum queue for clients submitting over AMQP.
    pub fn submit_queue(&self) -> String {
        format!("{}.submit", self.prefix)
    }

    /// `{prefix}.jobs`: direct exchange, routing key = endpoint kind.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// `{prefix}.jobs.{kind}`: quorum job queue of one endpoint kind.
    pub fn job_queue(&self, kind: EndpointKind) -> String {
        format!("{}.jobs.{}", self.prefix, kind.as_str())
    }

    /// `{prefix}.dead`: fanout exchange receiving dead-lettered jobs.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// `{prefix}.dead`: quorum queue holding dead-lettered jobs for inspection (same name as the exchange;
    /// exchanges and queues live in separate namespaces).
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// `{prefix}.dead.watch`: quorum queue bound to the dead exchange beside `{prefix}.dead`; the
    /// dispatcher consumes it to close requests whose job the broker dropped without a `failed` event.
    pub fn dead_watch_queue(&self) -> String {
        format!("{}.dead.watch", self.prefix)
    }

    /// `{prefix}.events`: topic exchange for lifecycle events, routing key `{kind}.{event}`.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// `{prefix}.results`: stream bound to the events exchange with `#`.
    pub fn results_stream(&self) -> String {
        format!("{}.results", self.prefix)
    }

    /// Declares every exchange, queue and binding. Idempotent: safe to call from every process at start.
    pub async fn declare(&self, ch: &Channel) -> Result<(), QueueError> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        ch.exchange_declare(
            self.jobs_exchange().into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(QueueError::broker("declare jobs exchange"))?;
        ch.exchange_declare(
            self.dead_exchange().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(QueueError::broker("declare dead exchange"))?;
        ch.exchange_declare(
            self.events_exchange().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(QueueError::broker("declare events exchange"))?;
        ch.exchange_declare(
            self.deadlines_exchange().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(QueueError::broker("declare deadlines exchange"))?;

        let mut quorum = FieldTable::default();
        quorum.insert("x-queue-type".into(), long_string("quorum"));
        declare_queue(ch, &self.submit_queue(), quorum.clone()).await?;
        declare_queue(ch, &self.dead_queue(), quorum.clone()).await?;
        bind(ch, &self.dead_queue(), &self.dead_exchange(), "").await?;
        // The dead exchange is a fanout: both queues get every dead-lettered message.
        declare_queue(ch, &self.dead_watch_queue(), quorum.clone()).await?;
        bind(ch, &self.dead_watch_queue(), &self.dead_exchange(), "").await?;
        // Start-deadline timers that fired (`deadline` module): one competing consumer takes each.
        declare_queue(ch, &self.deadlines_due_queue(), quorum.clone()).await?;
        bind(
            ch,
            &self.deadlines_due_queue(),
            &self.deadlines_exchange(),
            "",
        )
        .await?;

        let mut jobs = quorum;
        jobs.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        jobs.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_exchange()),
        );
        for kind in EndpointKind::ALL {
            declare_queue(ch, &self.job_queue(kind), jobs.clone()).await?;
            bind(
                ch,
                &self.job_queue(kind),
                &self.jobs_exchange(),
                kind.as_str(),
            )
            .await?;
        }

        let mut stream = FieldTable::default();
        stream.insert("x-queue-type".into(), long_string("stream"));
        stream.insert("x-max-age".into(), long_string(&self.results_max_age));
        declare_queue(ch, &self.results_stream(), stream).await?;
        bind(ch, &self.results_stream(), &self.events_exchange(), "#").await?;
        Ok(())
    }

    /// Deletes every queue and exchange of this topology (tests clean up their uuid-named topology).
    pub async fn delete(&self, ch: &Channel) -> Result<(), QueueError> {
        let mut queues = vec![
            self.submit_queue(),
            self.dead_queue(),
            self.dead_watch_queue(),
            self.deadlines_due_queue(),
            self.results_stream(),
        ];
        queues.extend(EndpointKind::ALL.map(|k| self.job_queue(k)));
        for q in queues {
            ch.queue_delete(q.into(), QueueDeleteOptions::default())
                .await
                .map_err(QueueError::broker("delete queue"))?;
        }
        for x in [
            self.jobs_exchange(),
            self.dead_exchange(),
            self.events_exchange(),
            self.deadlines_exchange(),
        ] {
            ch.exchange_delete(x.into(), Default::default())
                .await
                .map_err(QueueError::broker("delete exchange"))?;
        }
        Ok(())
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), QueueError> {
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(|_| ())
        .map_err(QueueError::broker("declare queue"))
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), QueueError> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(QueueError::broker("bind queue"))
}

/// Opens a connection (`amqp://user:pass@host:port/vhost`) on the tokio runtime.
pub async fn connect(url: &str) -> Result<Connection, QueueError> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(QueueError::Connect)
}

/// Opens a channel on `conn`.
pub async fn open_channel(conn: &Connection) -> Result<Channel, QueueError> {
    conn.create_channel()
        .await
        .map_err(QueueError::broker("create channel"))
}

/// Connects to `url` and declares `topology` (idempotent), as every process does before anything else.
pub async fn connect_declared(url: &str, topology: &Topology) -> Result<Connection, QueueError> {
    let conn = connect(url).await?;
    topology.declare(&open_channel(&conn).await?).await?;
    Ok(conn)
}

/// Sets `basic.qos(prefetch)` on `ch` and starts a manual-ack consumer on `queue`. `prefetch` is the
/// number of unacknowledged deliveries the broker hands this consumer at once (the worker's concurrency cap).
pub async fn consume(
    ch: &Channel,
    queue: &str,
    consumer_tag: &str,
    prefetch: u16,
) -> Result<Consumer, QueueError> {
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(QueueError::broker("basic.qos"))?;
    ch.basic_consume(
        queue.into(),
        consumer_tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(QueueError::broker("basic.consume"))
}

/// Number of ready (not yet delivered) messages in `queue`, from a passive declare.
pub async fn queue_depth(ch: &Channel, queue: &str) -> Result<u32, QueueError> {
    let opts = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(queue.into(), opts, FieldTable::default())
        .await
        .map(|q| q.message_count())
        .map_err(QueueError::broker("passive queue.declare"))
}

/// Reads an integer header of any AMQP integer width.
pub fn header_u64(props: &BasicProperties, name: &str) -> Option<u64> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

/// Reads a string header (short or long string).
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The broker's delivery attempt of a job message, 1-based: `x-delivery-count` (earlier failed
/// deliveries, absent on the first) plus one.
pub fn delivery_attempt(props: &BasicProperties) -> u32 {
    let earlier = header_u64(props, HEADER_DELIVERY_COUNT).unwrap_or(0);
    u32::try_from(earlier)
        .unwrap_or(u32::MAX - 1)
        .saturating_add(1)
}

/// The `message_id` property as a string.
pub fn message_id(props: &BasicProperties) -> Option<String> {
    props.message_id().as_ref().map(ShortString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let t = Topology::with_prefix("t-1");
        assert_eq!(t.submit_queue(), "t-1.submit");
        assert_eq!(t.jobs_exchange(), "t-1.jobs");
        assert_eq!(t.job_queue(EndpointKind::Sprint), "t-1.jobs.sprint");
        assert_eq!(t.dead_exchange(), "t-1.dead");
        assert_eq!(t.dead_watch_queue(), "t-1.dead.watch");
        assert_eq!(t.events_exchange(), "t-1.events");
        assert_eq!(t.results_stream(), "t-1.results");
        assert_eq!(
            Topology::default().job_queue(EndpointKind::Base),
            "fleet.jobs.base"
        );
        assert_eq!((t.delivery_limit, t.results_max_age.as_str()), (3, "7D"));
    }

    #[test]
    fn attempt_reads_delivery_count() {
        assert_eq!(delivery_attempt(&BasicProperties::default()), 1);
        let mut h = FieldTable::default();
        h.insert(HEADER_DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        h.insert(HEADER_ENDPOINT.into(), AMQPValue::LongString("base".into()));
        let props = BasicProperties::default().with_headers(h);
        assert_eq!(delivery_attempt(&props), 3);
        assert_eq!(header_str(&props, HEADER_ENDPOINT).as_deref(), Some("base"));
        assert_eq!(header_u64(&props, "missing"), None);
    }

    #[test]
    fn retryable_classification() {
        assert!(QueueError::Nacked {
            exchange: "x".into(),
            routing_key: "k".into()
        }
        .is_retryable());
        assert!(!QueueError::Malformed("bad".into()).is_retryable());
        assert!(!QueueError::Unroutable {
            exchange: "x".into(),
            routing_key: "k".into(),
            reply_text: "NO_ROUTE".into()
        }
        .is_retryable());
        assert!(QueueError::Timeout("confirm").is_retryable());
    }
}
