//! The result-topic client behind `dispatcher submit` and `dispatcher results` (service-contract §5):
//! submit over AMQP to `fleet.submit` and follow the request on the `fleet.results` stream, or print
//! the stream as JSON lines from an offset.
//!
//! `submit` attaches to the stream at `next` *before* publishing, so no event of its request can be
//! missed. `results` without `--follow` stops once it has read everything published before it started
//! (it publishes a marker and stops when it reads it back).

use std::io::Write;

use futures::StreamExt;
use serde_json::{json, Value};

use super::ingress::SubmitMessage;
use fleet::events::{ErrorType, Event, EventBody};
use fleet::queue::{
    connect_declared, subscribe_raw, subscribe_results, Publisher, QueueError, StreamItem,
    StreamOffset, Topology,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
    #[error("request {request_id} failed ({}): {error}", error_type.as_str())]
    Failed {
        request_id: String,
        error_type: ErrorType,
        error: String,
    },
}

/// A submission from the command line.
#[derive(Debug, Clone)]
pub struct SubmitArgs {
    pub endpoint: String,
    pub input: Value,
    pub webhook_url: Option<String>,
    pub priority: Option<String>,
    /// Follow the request until it finishes and print its image URLs.
    pub wait: bool,
}

/// Submits over AMQP. Prints the request id (stdout) and, with `wait`, progress (stderr) and then the
/// image URLs (stdout, one per line). Returns the terminal event when waiting.
pub async fn submit(
    amqp_url: &str,
    topology: &Topology,
    args: SubmitArgs,
    out: &mut (dyn Write + Send),
    progress: &mut (dyn Write + Send),
) -> Result<Option<Event>, ClientError> {
    let conn = connect_declared(amqp_url, topology).await?;
    let mut stream = if args.wait {
        Some(subscribe_results(&conn, topology, StreamOffset::Next).await?)
    } else {
        None
    };
    let publisher = Publisher::new(&conn, topology.clone()).await?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let msg = SubmitMessage {
        endpoint: args.endpoint,
        input: args.input,
        request_id: Some(request_id.clone()),
        webhook_url: args.webhook_url,
        priority: args.priority,
        start_timeout: None,
    };
    publisher.publish_submit(&msg, Some(&request_id)).await?;
    writeln!(out, "{request_id}")?;
    let Some(stream) = stream.as_mut() else {
        return Ok(None);
    };
    while let Some(item) = stream.next().await {
        let (_, ev) = item?;
        if ev.request_id != request_id {
            continue;
        }
        match &ev.body {
            EventBody::Queued(_) => writeln!(progress, "queued")?,
            EventBody::Started(started) => writeln!(progress, "started on {}", started.worker)?,
            EventBody::Progress(p) => writeln!(progress, "step {}/{}", p.step, p.total)?,
            EventBody::Completed(done) => {
                let urls = done.result["images"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for image in urls {
                    if let Some(url) = image["url"].as_str() {
                        writeln!(out, "{url}")?;
                    }
                }
                return Ok(Some(ev));
            }
            EventBody::Failed(failure) | EventBody::Cancelled(failure) => {
                if let Some(detail) = &failure.detail {
                    writeln!(progress, "{detail}")?;
                }
                return Err(ClientError::Failed {
                    request_id,
                    error_type: failure.error_type,
                    error: failure.error.clone(),
                });
            }
        }
    }
    Err(QueueError::Closed("results stream ended before the request finished".into()).into())
}

/// One output line of `dispatcher results`: the event (or notice) with its stream offset.
pub fn event_line(offset: u64, ev: &impl serde::Serialize) -> String {
    let mut v = serde_json::to_value(ev).unwrap_or_else(|e| json!({"error": e.to_string()}));
    if let Value::Object(map) = &mut v {
        map.insert("offset".into(), json!(offset));
    }
    v.to_string()
}

/// Prints the stream from `from` as JSON lines; stops at the present unless `follow`.
pub async fn results(
    amqp_url: &str,
    topology: &Topology,
    from: StreamOffset,
    follow: bool,
    out: &mut (dyn Write + Send),
) -> Result<u64, ClientError> {
    let conn = connect_declared(amqp_url, topology).await?;
    let mut stream = subscribe_raw(&conn, topology, from).await?;
    let marker = uuid::Uuid::new_v4().to_string();
    if !follow {
        Publisher::new(&conn, topology.clone())
            .await?
            .publish_marker(&marker)
            .await?;
    }
    let mut printed = 0u64;
    while let Some(item) = stream.next().await {
        match item? {
            (_, StreamItem::Marker(token)) if token == marker => return Ok(printed),
            (_, StreamItem::Marker(_)) => {}
            (offset, StreamItem::Event(ev)) => {
                writeln!(out, "{}", event_line(offset, &*ev))?;
                out.flush()?;
                printed += 1;
            }
            (offset, StreamItem::Notice(notice)) => {
                writeln!(out, "{}", event_line(offset, &*notice))?;
                out.flush()?;
                printed += 1;
            }
        }
    }
    Err(QueueError::Closed("results stream ended".into()).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::events::Started;
    use fleet::job::EndpointKind;

    #[test]
    fn lines_carry_the_offset() {
        let line = event_line(
            42,
            &Event::new(
                "r",
                EndpointKind::Sprint,
                EventBody::Started(Started {
                    worker: "w".into(),
                    attempt: 1,
                }),
            ),
        );
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["offset"], 42);
        assert_eq!(v["event"], "started");
        assert_eq!(v["request_id"], "r");
    }
}
