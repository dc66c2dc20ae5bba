//! Confirmed publishing (service-contract §5): every `publish_*` returns only after the broker's
//! `basic.ack`; `basic.nack` and `basic.return` (mandatory, unroutable) are errors. One channel in
//! confirm mode, shared by clones of [`Publisher`]; lapin matches confirms to publishes by delivery tag,
//! so concurrent publishes from several tasks are fine. A [`super::Link`] moves the publisher onto a new
//! channel after a reconnect ([`Publisher::reopen`]); a publish on a dead channel fails at once, and a
//! confirm that does not come within [`CONFIRM_TIMEOUT`] is an error (both retryable).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::Serialize;

use super::{QueueError, Topology, HEADER_ENDPOINT};
use crate::events::{Event, JobMessage, Notice, NOTICE_TYPE};

/// Routing key of stream markers (see [`Publisher::publish_marker`]); matches no `{kind}.{event}` pattern.
pub const MARKER_ROUTING_KEY: &str = "_marker";
/// AMQP `type` property of stream markers; [`super::subscribe_results`] skips such messages.
pub const MARKER_TYPE: &str = "fleet.marker";

/// Longest wait for the broker's confirm of one publish.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// A channel in confirm mode plus the topology it publishes into. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    channel: Arc<RwLock<Channel>>,
    topology: Topology,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.channel().id())
            .field("topology", &self.topology)
            .finish()
    }
}

impl Publisher {
    /// Opens a new channel on `conn` and puts it in confirm mode.
    pub async fn new(conn: &Connection, topology: Topology) -> Result<Self, QueueError> {
        let channel = confirm_channel(conn).await?;
        Ok(Publisher {
            channel: Arc::new(RwLock::new(channel)),
            topology,
        })
    }

    /// Moves this publisher (and every clone of it) onto a new confirm channel of `conn`.
    pub async fn reopen(&self, conn: &Connection) -> Result<(), QueueError> {
        let channel = confirm_channel(conn).await?;
        *self
            .channel
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = channel;
        Ok(())
    }

    /// True while the current channel is open.
    pub fn is_open(&self) -> bool {
        self.channel().status().connected()
    }

    /// The topology this publisher targets.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The current channel (confirm mode); usable for declares and passive queue checks.
    pub fn channel(&self) -> Channel {
        self.channel
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Publishes a job to `{prefix}.jobs` with routing key = its endpoint kind: persistent JSON,
    /// `message_id = request_id`, header `x-endpoint`. Returns after the broker confirmed it.
    pub async fn publish_job(&self, job: &JobMessage) -> Result<(), QueueError> {
        self.publish_job_with_priority(job, None).await
    }

    /// [`Publisher::publish_job`] with an AMQP priority (quorum queues on RabbitMQ 4 treat > 4 as high).
    pub async fn publish_job_with_priority(
        &self,
        job: &JobMessage,
        priority: Option<u8>,
    ) -> Result<(), QueueError> {
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_ENDPOINT.into(),
            AMQPValue::LongString(job.endpoint.as_str().into()),
        );
        let mut props = json_props(&job.request_id).with_headers(headers);
        if let Some(p) = priority {
            props = props.with_priority(p);
        }
        let body = serde_json::to_vec(job).map_err(QueueError::Serialize)?;
        self.publish_raw(
            &self.topology.jobs_exchange(),
            job.endpoint.as_str(),
            &body,
            props,
        )
        .await
    }

    /// Publishes a lifecycle event to `{prefix}.events` with routing key `{kind}.{event}` (it lands in
    /// the results stream). Returns after the broker confirmed it.
    pub async fn publish_event(&self, event: &Event) -> Result<(), QueueError> {
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_ENDPOINT.into(),
            AMQPValue::LongString(event.endpoint.as_str().into()),
        );
        let props = json_props(&event.request_id).with_headers(headers);
        let body = serde_json::to_vec(event).map_err(QueueError::Serialize)?;
        self.publish_raw(
            &self.topology.events_exchange(),
            &event.routing_key(),
            &body,
            props,
        )
        .await
    }

    /// Publishes a [`Notice`] to `{prefix}.events` with routing key `{kind}.notice` and the AMQP `type`
    /// [`NOTICE_TYPE`] (it lands in the results stream only). Returns after the broker confirmed it.
    pub async fn publish_notice(&self, notice: &Notice) -> Result<(), QueueError> {
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_ENDPOINT.into(),
            AMQPValue::LongString(notice.endpoint.as_str().into()),
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(PERSISTENT)
            .with_type(NOTICE_TYPE.into())
            .with_headers(headers);
        let body = serde_json::to_vec(notice).map_err(QueueError::Serialize)?;
        self.publish_raw(
            &self.topology.events_exchange(),
            &notice.routing_key(),
            &body,
            props,
        )
        .await
    }

    /// Publishes a JSON body to the `{prefix}.submit` queue (AMQP ingress; contract §5). `request_id`,
    /// when given, becomes the `message_id`.
    pub async fn publish_submit<T: Serialize>(
        &self,
        body: &T,
        request_id: Option<&str>,
    ) -> Result<(), QueueError> {
        let body = serde_json::to_vec(body).map_err(QueueError::Serialize)?;
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(PERSISTENT);
        if let Some(id) = request_id.filter(|id| fits_short_string(id)) {
            props = props.with_message_id(id.into());
        }
        self.publish_raw("", &self.topology.submit_queue(), &body, props)
            .await
    }

    /// Publishes a marker `token` into the results stream. Stream readers that need to know they have
    /// caught up to "now" publish a marker and wait until they read it back; [`super::subscribe_results`]
    /// hides markers, [`super::subscribe_raw`] shows them.
    pub async fn publish_marker(&self, token: &str) -> Result<(), QueueError> {
        let props = BasicProperties::default()
            .with_type(MARKER_TYPE.into())
            .with_message_id(token.into())
            .with_content_type("text/plain".into());
        self.publish_raw(
            &self.topology.events_exchange(),
            MARKER_ROUTING_KEY,
            token.as_bytes(),
            props,
        )
        .await
    }

    /// Publishes `body` with `mandatory` and waits for the broker's confirm.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), QueueError> {
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let channel = self.channel();
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, async {
            channel
                .basic_publish(exchange.into(), routing_key.into(), opts, body, props)
                .await
                .map_err(QueueError::broker("basic.publish"))?
                .await
                .map_err(QueueError::broker("publisher confirm"))
        })
        .await
        .map_err(|_| QueueError::Timeout("the publisher confirm"))??;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(QueueError::Unroutable {
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                    reply_text: returned.reply_text.to_string(),
                })
            }
            Confirmation::Nack(None) => Err(QueueError::Nacked {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            }),
            Confirmation::NotRequested => Err(QueueError::NotConfirmed {
                exchange: exchange.to_string(),
            }),
        }
    }
}

async fn confirm_channel(conn: &Connection) -> Result<Channel, QueueError> {
    let channel = super::open_channel(conn).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(QueueError::broker("confirm.select"))?;
    Ok(channel)
}

fn json_props(message_id: &str) -> BasicProperties {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT);
    // An id that is no AMQP short string would panic lapin's encoder: leave the property out (the body
    // carries the id anyway). Request ids are validated upstream; this keeps a slip from crashing.
    if fits_short_string(message_id) {
        props.with_message_id(message_id.into())
    } else {
        props
    }
}

/// Whether `s` fits an AMQP short string (at most 255 bytes).
pub fn fits_short_string(s: &str) -> bool {
    s.len() <= 255
}
