//! AMQP ingress (service-contract §5): consumes `fleet.submit` messages
//! `{endpoint, input, request_id?, webhook_url?, priority?}` and routes them exactly like an HTTP
//! submit. A message that does not validate becomes a `failed` event with `error_type =
//! validation_error` and the FastAPI `detail[]`; no job is enqueued. The delivery is acked only after
//! what it caused (job or failure event) was confirmed, so a crash in between redelivers it; the
//! `request_id` (field, else `message_id`, else a fresh uuid) keeps a redelivery from becoming a second
//! request (the registry ignores a repeated `queued`, workers dedupe on the id).

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::Connection;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::submit::{submit, validation_failed, Bus, Priority, SubmitError, SubmitOptions};
use fleet::events::{ErrorType, Event};
use fleet::job::{EndpointKind, FieldError, ValidationError};
use fleet::queue::{consume, message_id, open_channel, QueueError, Topology};

/// The body of a `fleet.submit` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitMessage {
    pub endpoint: String,
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// `"normal"` or `"low"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// Seconds within which the job must start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<f64>,
}

/// Consumes the submit queue until `shutdown` or a broker error.
pub async fn run(
    conn: &Connection,
    topology: &Topology,
    bus: &dyn Bus,
    metrics: &Metrics,
    prefetch: u16,
    shutdown: CancellationToken,
) -> Result<(), QueueError> {
    let channel = open_channel(conn).await?;
    let tag = format!("dispatcher-{}", uuid::Uuid::new_v4());
    let mut consumer = consume(&channel, &topology.submit_queue(), &tag, prefetch).await?;
    tracing::info!(
        queue = topology.submit_queue(),
        prefetch,
        "consuming AMQP submissions"
    );
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else {
            return Err(QueueError::Closed("submit consumer cancelled".into()));
        };
        let delivery = delivery.map_err(|source| QueueError::Broker {
            op: "submit delivery",
            source,
        })?;
        handle(delivery, bus, metrics).await?;
    }
}

async fn handle(delivery: Delivery, bus: &dyn Bus, metrics: &Metrics) -> Result<(), QueueError> {
    let fallback_id = message_id(&delivery.properties);
    let msg: SubmitMessage = match serde_json::from_slice(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            // Without an endpoint there is nothing to route; with a message_id the client still learns why.
            tracing::warn!(error = %e, "malformed submit message");
            if let Some(id) = fallback_id {
                let err = one_error(
                    &[],
                    "json_invalid",
                    &format!("Invalid submit message: {e}"),
                    Value::Null,
                );
                publish_rejection(bus, metrics, &id, EndpointKind::Base, &err).await?;
            }
            return ack(&delivery).await;
        }
    };
    let request_id = msg
        .request_id
        .clone()
        .or(fallback_id)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let kind = match msg.endpoint.parse::<EndpointKind>() {
        Ok(k) => k,
        Err(e) => {
            let err = one_error(&["endpoint"], "enum", &e, json!(msg.endpoint));
            publish_rejection(bus, metrics, &request_id, EndpointKind::Base, &err).await?;
            return ack(&delivery).await;
        }
    };
    let priority = match msg.priority.as_deref().map(str::parse::<Priority>) {
        None => Priority::Normal,
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            let err = one_error(&["priority"], "literal_error", &e, json!(msg.priority));
            publish_rejection(bus, metrics, &request_id, kind, &err).await?;
            return ack(&delivery).await;
        }
    };
    let opts = SubmitOptions {
        request_id: Some(request_id.clone()),
        webhook_url: msg.webhook_url.clone(),
        start_timeout: msg.start_timeout.filter(|s| s.is_finite() && *s > 0.0),
        priority,
    };
    match submit(bus, kind, &msg.input, opts).await {
        Ok(_) => {
            metrics.submission(kind, "amqp", "accepted");
            tracing::info!(request_id, endpoint = %kind, "AMQP submission queued");
        }
        Err(SubmitError::Invalid(err)) => {
            // Locations of the input are under `input` in this message, but keep FastAPI's `body` root
            // so HTTP and AMQP clients read the same `detail[]`.
            publish_rejection(bus, metrics, &request_id, kind, &err).await?;
        }
        Err(SubmitError::Broker(e)) => {
            metrics.submission(kind, "amqp", "error");
            // Leave the delivery unacked: the channel closing (or this process ending) redelivers it.
            return Err(e);
        }
    }
    ack(&delivery).await
}

fn one_error(field: &[&str], kind: &str, msg: &str, input: Value) -> ValidationError {
    let mut loc = vec!["body".to_string()];
    loc.extend(field.iter().map(|s| s.to_string()));
    ValidationError(vec![FieldError {
        loc,
        msg: msg.to_string(),
        kind: kind.to_string(),
        input,
    }])
}

async fn publish_rejection(
    bus: &dyn Bus,
    metrics: &Metrics,
    request_id: &str,
    kind: EndpointKind,
    err: &ValidationError,
) -> Result<(), QueueError> {
    metrics.submission(kind, "amqp", "invalid");
    let event: Event = validation_failed(request_id, kind, err);
    debug_assert_eq!(event.error_type(), Some(ErrorType::ValidationError));
    bus.publish_event(&event).await
}

async fn ack(delivery: &Delivery) -> Result<(), QueueError> {
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|source| QueueError::Broker {
            op: "ack submit",
            source,
        })
}
