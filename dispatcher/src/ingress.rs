//! AMQP ingress (service-contract §5): consumes `fleet.submit` messages
//! `{endpoint, input, request_id?, webhook_url?, priority?}` and routes them exactly like an HTTP
//! submit. A message that does not validate becomes a `failed` event with `error_type =
//! validation_error` and the FastAPI `detail[]`; no job is enqueued. The delivery is acked only after
//! what it caused (job or failure event) was confirmed, so a crash in between redelivers it; the
//! `request_id` (field, else `message_id`, else a fresh uuid) keeps a redelivery from becoming a second
//! request (the registry ignores a repeated `queued`, workers dedupe on the id).

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Connection;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::state::{SharedRegistry, START_TIMEOUT_TOO_LONG};
use super::submit::{submit, validation_failed, Bus, Priority, SubmitError, SubmitOptions};
use fleet::events::{ErrorType, Event};
use fleet::job::{
    bounded_echo, bounded_prefix, validate_request_id, EndpointKind, FieldError, ValidationError,
};
use fleet::queue::{consume, message_id, open_channel, Backoff, Link, QueueError, Topology};

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

/// Consumes the submit queue until `shutdown` or a permanent broker error. When the broker goes away
/// (or a submission cannot be published) the channel is dropped, which returns its unacknowledged
/// deliveries to the queue, and consuming starts again on the link's next connection.
pub async fn run(
    link: &Link,
    bus: &dyn Bus,
    registry: &SharedRegistry,
    metrics: &Metrics,
    prefetch: u16,
    shutdown: CancellationToken,
) -> Result<(), QueueError> {
    let topology = link.topology();
    let mut backoff = Backoff::reconnect();
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            conn = link.connection() => conn,
        };
        let Some(conn) = conn else { return Ok(()) };
        let result = consume_once(
            &conn,
            topology,
            bus,
            registry,
            metrics,
            prefetch,
            &shutdown,
            &mut backoff,
        )
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "AMQP ingress interrupted; consuming again after a pause");
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// One channel's worth of consuming: Ok on shutdown, the error that ended it otherwise.
#[allow(clippy::too_many_arguments)]
async fn consume_once(
    conn: &Connection,
    topology: &Topology,
    bus: &dyn Bus,
    registry: &SharedRegistry,
    metrics: &Metrics,
    prefetch: u16,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), QueueError> {
    let channel = open_channel(conn).await?;
    let tag = format!("dispatcher-{}", uuid::Uuid::new_v4());
    let mut consumer = consume(&channel, &topology.submit_queue(), &tag, prefetch).await?;
    tracing::info!(
        queue = topology.submit_queue(),
        prefetch,
        "consuming AMQP submissions"
    );
    *backoff = Backoff::reconnect();
    // Up to `prefetch` submissions are handled at once (each waits for two publisher confirms; one at a
    // time held AMQP ingress to about 75 submissions/s in the load run of 2026-12-06).
    let limit = usize::from(prefetch.max(1));
    let mut running = futures::stream::FuturesUnordered::new();
    let mut result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(done) = running.next(), if !running.is_empty() => {
                if let Err(e) = done {
                    break Err(e);
                }
            }
            delivery = consumer.next(), if running.len() < limit => {
                let Some(delivery) = delivery else {
                    break Err(QueueError::Closed("submit consumer cancelled".into()));
                };
                match delivery {
                    Ok(d) => running.push(handle(d, bus, registry, metrics)),
                    Err(source) => {
                        break Err(QueueError::Broker {
                            op: "submit delivery",
                            source,
                        })
                    }
                }
            }
        }
    };
    // Submissions under way finish (each is bounded by the publisher's confirm timeout), so none is left
    // with a confirmed `queued` and no job.
    while let Some(done) = running.next().await {
        if let (Ok(()), Err(e)) = (&result, done) {
            result = Err(e);
        }
    }
    // Unacknowledged deliveries return to the queue when the channel closes.
    if let Err(e) = channel.close(200, "ingress stopping".into()).await {
        tracing::debug!(error = %e, "closing the submit channel");
    }
    result
}

/// What one `fleet.submit` message turned into before anything was published.
enum Parsed {
    /// Route it: a validated envelope (the input itself is validated by `submit`).
    Submit {
        request_id: String,
        kind: EndpointKind,
        input: Value,
        opts: SubmitOptions,
    },
    /// Answer it with a `failed` event for `request_id`.
    Reject {
        request_id: String,
        kind: EndpointKind,
        err: ValidationError,
    },
    /// No usable id to answer to: drop it (nack without requeue) and log why.
    Drop(String),
}

/// Reads an envelope field by field, so every defect is reported against the id it carries.
fn parse(data: &[u8], fallback_id: Option<String>, registry: &SharedRegistry) -> Parsed {
    let value: Value = match serde_json::from_slice(data) {
        Ok(v) => v,
        Err(e) => {
            let err = one_error(
                &[],
                "json_invalid",
                &format!("Invalid submit message: {e}"),
                Value::Null,
            );
            return match fallback_id {
                Some(id) => usable(id, EndpointKind::Base, err),
                None => Parsed::Drop(format!("malformed submit message without an id: {e}")),
            };
        }
    };
    let Some(obj) = value.as_object() else {
        let err = one_error(
            &[],
            "model_attributes_type",
            "Submit message should be an object",
            bounded_echo(&value),
        );
        return match fallback_id {
            Some(id) => usable(id, EndpointKind::Base, err),
            None => Parsed::Drop("submit message is not an object and has no id".into()),
        };
    };
    // The id first: every later defect is answered to it.
    let (request_id, id_error) = match obj.get("request_id") {
        None | Some(Value::Null) => (
            fallback_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            None,
        ),
        Some(Value::String(s)) => (s.clone(), None),
        // A number is answered under its decimal text, so the client can still find its answer.
        Some(v @ Value::Number(n)) => (
            n.to_string(),
            Some(one_error(
                &["request_id"],
                "string_type",
                "Input should be a valid string",
                v.clone(),
            )),
        ),
        Some(v) => match fallback_id {
            Some(id) => (
                id,
                Some(one_error(
                    &["request_id"],
                    "string_type",
                    "Input should be a valid string",
                    bounded_echo(v),
                )),
            ),
            None => {
                return Parsed::Drop(
                    "submit message with a non-string request_id and no message_id".into(),
                )
            }
        },
    };
    let kind_result = match obj.get("endpoint") {
        None => Err(one_error(
            &["endpoint"],
            "missing",
            "Field required",
            Value::Null,
        )),
        Some(Value::String(e)) => e
            .parse::<EndpointKind>()
            .map_err(|msg| one_error(&["endpoint"], "enum", &msg, bounded_echo(&json!(e)))),
        Some(v) => Err(one_error(
            &["endpoint"],
            "string_type",
            "Input should be 'base' or 'sprint'",
            bounded_echo(v),
        )),
    };
    let kind = *kind_result.as_ref().unwrap_or(&EndpointKind::Base);
    let mut errs = Vec::new();
    if let Err(e) = validate_request_id(&request_id, &["body", "request_id"]) {
        errs.extend(e.0);
    }
    errs.extend(id_error.into_iter().flat_map(|e| e.0));
    if let Err(e) = kind_result {
        errs.extend(e.0);
    }
    let input = match obj.get("input") {
        None => {
            errs.extend(one_error(&["input"], "missing", "Field required", Value::Null).0);
            Value::Null
        }
        Some(v) => v.clone(),
    };
    let optional_string = |name: &str, errs: &mut Vec<FieldError>| match obj.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            errs.extend(
                one_error(
                    &[name],
                    "string_type",
                    "Input should be a valid string",
                    bounded_echo(v),
                )
                .0,
            );
            None
        }
    };
    let webhook_url = optional_string("webhook_url", &mut errs);
    let priority = match optional_string("priority", &mut errs).map(|p| p.parse::<Priority>()) {
        None => Priority::Normal,
        Some(Ok(p)) => p,
        Some(Err(msg)) => {
            errs.extend(
                one_error(
                    &["priority"],
                    "literal_error",
                    &msg,
                    bounded_echo(&obj["priority"]),
                )
                .0,
            );
            Priority::Normal
        }
    };
    let start_timeout = match obj.get("start_timeout") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(secs)
                if secs.is_finite() && secs > 0.0 && !registry.accepts_start_timeout(secs) =>
            {
                errs.extend(
                    one_error(
                        &["start_timeout"],
                        "less_than_equal",
                        START_TIMEOUT_TOO_LONG,
                        bounded_echo(v),
                    )
                    .0,
                );
                None
            }
            Some(secs) if secs.is_finite() && secs > 0.0 => Some(secs),
            _ => {
                errs.extend(
                    one_error(
                        &["start_timeout"],
                        "greater_than",
                        "Input should be a positive number of seconds",
                        bounded_echo(v),
                    )
                    .0,
                );
                None
            }
        },
    };
    if !errs.is_empty() {
        return usable(request_id, kind, ValidationError(errs));
    }
    Parsed::Submit {
        request_id: request_id.clone(),
        kind,
        input,
        opts: SubmitOptions {
            request_id: Some(request_id),
            webhook_url,
            start_timeout,
            priority,
        },
    }
}

/// A rejection answered to `request_id` when that id can carry an answer (it fits the AMQP short
/// string the event's `message_id` is); dropped otherwise.
fn usable(request_id: String, kind: EndpointKind, err: ValidationError) -> Parsed {
    if request_id.is_empty() || request_id.len() > MAX_ANSWERABLE_ID_BYTES {
        return Parsed::Drop(format!(
            "submit message with an unusable request_id ({} bytes, starts {:?}): {err}",
            request_id.len(),
            bounded_prefix(&request_id, 64)
        ));
    }
    Parsed::Reject {
        request_id,
        kind,
        err,
    }
}

/// Longest invalid id still answered with a `failed` event (an AMQP short string); longer ones are
/// dropped and logged.
const MAX_ANSWERABLE_ID_BYTES: usize = 255;

async fn handle(
    delivery: Delivery,
    bus: &dyn Bus,
    registry: &SharedRegistry,
    metrics: &Metrics,
) -> Result<(), QueueError> {
    let fallback_id = message_id(&delivery.properties);
    let (request_id, kind, input, opts) = match parse(&delivery.data, fallback_id, registry) {
        Parsed::Submit {
            request_id,
            kind,
            input,
            opts,
        } => (request_id, kind, input, opts),
        Parsed::Reject {
            request_id,
            kind,
            err,
        } => {
            publish_rejection(bus, registry, metrics, &request_id, kind, &err).await?;
            return ack(&delivery).await;
        }
        Parsed::Drop(why) => {
            tracing::warn!(
                reason = why,
                "dropping a submit message that cannot be answered"
            );
            return reject(&delivery).await;
        }
    };
    match submit(bus, kind, &input, opts).await {
        Ok(_) => {
            metrics.submission(kind, "amqp", "accepted");
            tracing::info!(request_id, endpoint = %kind, "AMQP submission queued");
        }
        Err(SubmitError::Invalid(err)) => {
            // Locations of the input are under `input` in this message, but keep FastAPI's `body` root
            // so HTTP and AMQP clients read the same `detail[]`.
            publish_rejection(bus, registry, metrics, &request_id, kind, &err).await?;
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
    registry: &SharedRegistry,
    metrics: &Metrics,
    request_id: &str,
    kind: EndpointKind,
    err: &ValidationError,
) -> Result<(), QueueError> {
    metrics.submission(kind, "amqp", "invalid");
    if registry.read(|r| r.get(request_id).is_some()) {
        // The id belongs to a request already seen: answering would end someone else's request.
        tracing::warn!(request_id, error = %err, "invalid submission reuses a known request id; dropped without an event");
        return Ok(());
    }
    let event: Event = validation_failed(request_id, kind, err);
    debug_assert_eq!(event.error_type(), Some(ErrorType::ValidationError));
    bus.publish_event(&event).await
}

async fn reject(delivery: &Delivery) -> Result<(), QueueError> {
    delivery
        .acker
        .nack(BasicNackOptions {
            requeue: false,
            ..BasicNackOptions::default()
        })
        .await
        .map(|_| ())
        .map_err(|source| QueueError::Broker {
            op: "nack submit",
            source,
        })
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
