//! Reader of the `fleet.results` stream over AMQP 0.9.1 (service-contract §5): a consumer with
//! `basic.qos` and manual acks, started at an `x-stream-offset`; every delivery carries its offset in the
//! `x-stream-offset` header. Readers keep their own offset and resume from `Offset(last + 1)`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;

use super::{header_u64, QueueError, Topology, HEADER_STREAM_OFFSET, MARKER_TYPE};
use crate::events::{Event, Notice, NOTICE_TYPE};

/// Deliveries a stream reader may hold unacknowledged (RabbitMQ requires a prefetch for streams).
const STREAM_PREFETCH: u16 = 256;

/// Where a stream reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOffset {
    /// The oldest message still retained.
    First,
    /// Only messages published after the reader attached.
    Next,
    /// This offset (inclusive).
    Offset(u64),
    /// The first chunk written at or after this unix time in seconds.
    Timestamp(u64),
}

impl StreamOffset {
    fn to_amqp(self) -> AMQPValue {
        match self {
            StreamOffset::First => AMQPValue::LongString("first".into()),
            StreamOffset::Next => AMQPValue::LongString("next".into()),
            StreamOffset::Offset(o) => AMQPValue::LongLongInt(i64::try_from(o).unwrap_or(i64::MAX)),
            StreamOffset::Timestamp(t) => AMQPValue::Timestamp(t),
        }
    }
}

impl std::str::FromStr for StreamOffset {
    type Err = String;
    /// `first`, `next`, a number (offset) or `@<unix seconds>` (timestamp).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "first" => Ok(StreamOffset::First),
            "next" => Ok(StreamOffset::Next),
            _ => {
                if let Some(ts) = s.strip_prefix('@') {
                    ts.parse()
                        .map(StreamOffset::Timestamp)
                        .map_err(|e| format!("bad timestamp {ts:?}: {e}"))
                } else {
                    s.parse().map(StreamOffset::Offset).map_err(|_| {
                        format!("bad stream offset {s:?} (expected first, next, a number or @unix_seconds)")
                    })
                }
            }
        }
    }
}

/// One message of the stream: a lifecycle event, a notice about an endpoint kind (see
/// `Publisher::publish_notice`), or a marker token (see `Publisher::publish_marker`).
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Event(Box<Event>),
    Notice(Box<Notice>),
    Marker(String),
}

/// Items of a stream reader; it ends only when the broker cancels the consumer or the channel closes.
pub type ResultStream<T> = Pin<Box<dyn Stream<Item = Result<(u64, T), QueueError>> + Send>>;

/// Reads lifecycle events from the results stream starting at `from`, yielding `(offset, event)` in
/// stream order. Markers and notices are skipped; a message that is not a valid event is skipped with a warning
/// (a reader must not wedge on one bad message). The reader opens and owns its own channel.
pub async fn subscribe_results(
    conn: &Connection,
    topology: &Topology,
    from: StreamOffset,
) -> Result<ResultStream<Event>, QueueError> {
    let raw = subscribe_raw(conn, topology, from).await?;
    Ok(Box::pin(raw.filter_map(|item| async move {
        match item {
            Ok((offset, StreamItem::Event(e))) => Some(Ok((offset, *e))),
            Ok((_, StreamItem::Marker(_) | StreamItem::Notice(_))) => None,
            Err(e) => Some(Err(e)),
        }
    })))
}

/// Like [`subscribe_results`] but also yields markers.
pub async fn subscribe_raw(
    conn: &Connection,
    topology: &Topology,
    from: StreamOffset,
) -> Result<ResultStream<StreamItem>, QueueError> {
    let channel = super::open_channel(conn).await?;
    channel
        .basic_qos(STREAM_PREFETCH, BasicQosOptions::default())
        .await
        .map_err(QueueError::broker("basic.qos"))?;
    let mut args = FieldTable::default();
    args.insert(HEADER_STREAM_OFFSET.into(), from.to_amqp());
    let mut consumer = channel
        .basic_consume(
            topology.results_stream().into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(QueueError::broker("basic.consume stream"))?;
    let stream = async_stream::stream! {
        // The channel must live as long as the consumer.
        let _channel = channel;
        loop {
            let Some(delivery) = consumer.next().await else {
                yield Err(QueueError::Closed("results stream consumer cancelled".into()));
                break;
            };
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    yield Err(QueueError::Broker { op: "stream delivery", source: e });
                    break;
                }
            };
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                yield Err(QueueError::Broker { op: "stream ack", source: e });
                break;
            }
            let Some(offset) = header_u64(&delivery.properties, HEADER_STREAM_OFFSET) else {
                tracing::warn!("stream delivery without an x-stream-offset header; skipped");
                continue;
            };
            let is_marker = delivery.properties.kind().as_ref().is_some_and(|t| t.as_str() == MARKER_TYPE);
            if is_marker {
                yield Ok((offset, StreamItem::Marker(String::from_utf8_lossy(&delivery.data).into_owned())));
                continue;
            }
            let is_notice = delivery.properties.kind().as_ref().is_some_and(|t| t.as_str() == NOTICE_TYPE);
            if is_notice {
                match serde_json::from_slice::<Notice>(&delivery.data) {
                    Ok(notice) => yield Ok((offset, StreamItem::Notice(Box::new(notice)))),
                    Err(e) => tracing::warn!(offset, error = %e, "results stream notice does not parse; skipped"),
                }
                continue;
            }
            match serde_json::from_slice::<Event>(&delivery.data) {
                Ok(event) => yield Ok((offset, StreamItem::Event(Box::new(event)))),
                Err(e) => tracing::warn!(offset, error = %e, "results stream message is not an event; skipped"),
            }
        }
    };
    Ok(Box::pin(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse() {
        assert_eq!("first".parse::<StreamOffset>(), Ok(StreamOffset::First));
        assert_eq!("next".parse::<StreamOffset>(), Ok(StreamOffset::Next));
        assert_eq!("42".parse::<StreamOffset>(), Ok(StreamOffset::Offset(42)));
        assert_eq!(
            "@1700000000".parse::<StreamOffset>(),
            Ok(StreamOffset::Timestamp(1_700_000_000))
        );
        assert!("last".parse::<StreamOffset>().is_err());
        assert_eq!(StreamOffset::Offset(7).to_amqp(), AMQPValue::LongLongInt(7));
    }
}
