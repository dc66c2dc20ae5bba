//! The result-topic client behind `dispatcher submit` and `dispatcher results` (service-contract §5):
//! submit over AMQP to `fleet.submit` and follow the request on the `fleet.results` stream, or print
//! the stream as JSON lines from an offset, optionally filtered by endpoint and event.
//!
//! `submit --wait` attaches to the stream at `first` *before* publishing, so no event of its request can be
//! missed, and applies every event to the same [`Registry`] the dispatcher's view is built with: a request's
//! queue position is the number of requests of its kind queued before it and not started yet, which only
//! the whole stream tells. It shows the phases (queued with position, started, steps, uploading) through
//! [`ProgressDisplay`], then prints the image URLs or, with `json`, the result body, and with `download`
//! saves the images under `DIR/<request_id>/`. `results` without `--follow` stops once it has read
//! everything published before it started (it publishes a marker and stops when it reads it back).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use super::ingress::SubmitMessage;
use crate::progress::{Phase, ProgressDisplay};
use crate::state::{Registry, Status};
use fleet::events::{ErrorType, Event, EventBody, EventKind};
use fleet::job::EndpointKind;
use fleet::queue::{
    connect_declared, subscribe_raw, subscribe_results, Publisher, QueueError, StreamItem,
    StreamOffset, Topology,
};

/// How long one image download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(300);

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
    /// The message names the file, never the presigned URL (it carries a signature).
    #[error("downloading {file}: {error}")]
    Download { file: String, error: String },
}

/// A submission from the command line.
#[derive(Debug, Clone)]
pub struct SubmitArgs {
    pub endpoint: String,
    pub input: Value,
    pub webhook_url: Option<String>,
    pub priority: Option<String>,
    /// Follow the request until it finishes, showing its progress.
    pub wait: bool,
    /// Print the result body on stdout instead of the request id and image URLs (needs `wait`).
    pub json: bool,
    /// Save the images under `DIR/<request_id>/` (needs `wait`).
    pub download: Option<PathBuf>,
    /// Redraw the progress line in place (the progress output is a terminal).
    pub tty: bool,
}

/// Submits over AMQP. Prints the request id (stdout; stderr with `json`) and, with `wait`, the progress
/// (stderr) and then the image URLs (stdout, one per line) or the result body. Returns the terminal
/// event when waiting.
pub async fn submit(
    amqp_url: &str,
    topology: &Topology,
    args: SubmitArgs,
    out: &mut (dyn Write + Send),
    progress: &mut (dyn Write + Send),
) -> Result<Option<Event>, ClientError> {
    let conn = connect_declared(amqp_url, topology).await?;
    let mut stream = if args.wait {
        Some(subscribe_results(&conn, topology, StreamOffset::First).await?)
    } else {
        None
    };
    let publisher = Publisher::new(&conn, topology.clone()).await?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let msg = SubmitMessage {
        endpoint: args.endpoint.clone(),
        input: args.input.clone(),
        request_id: Some(request_id.clone()),
        webhook_url: args.webhook_url.clone(),
        priority: args.priority.clone(),
        start_timeout: None,
    };
    let submitted = Instant::now();
    publisher.publish_submit(&msg, Some(&request_id)).await?;
    let mut display = ProgressDisplay::new(progress, args.tty);
    if args.json {
        display.message(&format!("request {request_id}"))?;
    } else {
        writeln!(out, "{request_id}")?;
    }
    let Some(stream) = stream.as_mut() else {
        return Ok(None);
    };
    let mut registry = Registry::new();
    while let Some(item) = stream.next().await {
        let (offset, ev) = item?;
        registry.apply(offset, &ev);
        if ev.request_id != request_id {
            // Another request starting moves this one up its queue.
            if let Some(Status::InQueue { position }) = registry.status(&request_id) {
                display.show(Phase::Queued { position })?;
            }
            continue;
        }
        match &ev.body {
            EventBody::Queued(_) => {
                if let Some(Status::InQueue { position }) = registry.status(&request_id) {
                    display.show(Phase::Queued { position })?;
                }
            }
            EventBody::Started(started) => display.show(Phase::Started {
                worker: started.worker.clone(),
            })?,
            EventBody::Progress(p) => {
                display.show(Phase::Step {
                    step: p.step,
                    total: p.total,
                })?;
                if p.step >= p.total {
                    display.show(Phase::Uploading)?;
                }
            }
            EventBody::Completed(done) => {
                display.show(Phase::Completed {
                    seconds: submitted.elapsed().as_secs_f64(),
                    inference: done.inference_time,
                })?;
                if let Some(dir) = &args.download {
                    for path in download(&done.result, dir, &request_id).await? {
                        display.message(&format!("saved {}", path.display()))?;
                    }
                }
                if args.json {
                    writeln!(out, "{}", done.result)?;
                } else {
                    for url in image_urls(&done.result) {
                        writeln!(out, "{url}")?;
                    }
                }
                out.flush()?;
                return Ok(Some(ev));
            }
            EventBody::Failed(failure) | EventBody::Cancelled(failure) => {
                display.show(Phase::Failed {
                    error_type: failure.error_type.as_str().to_string(),
                    error: failure.error.clone(),
                })?;
                if let Some(detail) = &failure.detail {
                    display.message(&detail.to_string())?;
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

fn image_urls(result: &Value) -> Vec<&str> {
    result["images"]
        .as_array()
        .map(|images| images.iter().filter_map(|i| i["url"].as_str()).collect())
        .unwrap_or_default()
}

/// The name an image is saved under: the result's `file_name` when it is a plain file name, else
/// `{index}.{ext}` from its content type.
fn file_name(image: &Value, index: usize) -> String {
    let given = image["file_name"].as_str().unwrap_or_default();
    let plain =
        !given.is_empty() && given != "." && given != ".." && !given.contains(['/', '\\', '\0']);
    if plain {
        return given.to_string();
    }
    let ext = match image["content_type"].as_str() {
        Some("image/png") => "png",
        _ => "jpeg",
    };
    format!("{index}.{ext}")
}

/// Saves every image of `result` under `dir/<request_id>/` and returns the paths written.
async fn download(
    result: &Value,
    dir: &Path,
    request_id: &str,
) -> Result<Vec<PathBuf>, ClientError> {
    let target = dir.join(request_id);
    tokio::fs::create_dir_all(&target).await?;
    let client = reqwest::Client::builder()
        .timeout(DOWNLOAD_TIMEOUT)
        .build()
        .map_err(|e| ClientError::Download {
            file: target.display().to_string(),
            error: e.without_url().to_string(),
        })?;
    let images = result["images"].as_array().cloned().unwrap_or_default();
    let mut saved = Vec::with_capacity(images.len());
    for (index, image) in images.iter().enumerate() {
        let name = file_name(image, index);
        let Some(url) = image["url"].as_str() else {
            return Err(ClientError::Download {
                file: name,
                error: "the result has no URL for it".into(),
            });
        };
        let fail = |e: reqwest::Error| ClientError::Download {
            file: name.clone(),
            error: e.without_url().to_string(),
        };
        let bytes = client
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(fail)?
            .bytes()
            .await
            .map_err(fail)?;
        let path = target.join(&name);
        tokio::fs::write(&path, &bytes).await?;
        saved.push(path);
    }
    Ok(saved)
}

/// Which events `dispatcher results` prints; an empty list lets every value through.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub endpoints: Vec<EndpointKind>,
    pub events: Vec<EventKind>,
}

impl EventFilter {
    pub fn matches(&self, ev: &Event) -> bool {
        (self.endpoints.is_empty() || self.endpoints.contains(&ev.endpoint))
            && (self.events.is_empty() || self.events.contains(&ev.kind()))
    }
}

/// One output line of `dispatcher results`: the event (or notice) with its stream offset.
pub fn event_line(offset: u64, ev: &impl serde::Serialize) -> String {
    let mut v = serde_json::to_value(ev).unwrap_or_else(|e| json!({"error": e.to_string()}));
    if let Value::Object(map) = &mut v {
        map.insert("offset".into(), json!(offset));
    }
    v.to_string()
}

/// Prints the events of the stream from `from` that pass `filter` as JSON lines; stops at the present
/// unless `follow`. Filtering happens here: stream filters need RabbitMQ 3.13 (service-contract §5).
pub async fn results(
    amqp_url: &str,
    topology: &Topology,
    from: StreamOffset,
    follow: bool,
    filter: &EventFilter,
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
            (_, StreamItem::Event(ev)) if !filter.matches(&ev) => {}
            (offset, StreamItem::Event(ev)) => {
                writeln!(out, "{}", event_line(offset, &*ev))?;
                out.flush()?;
                printed += 1;
            }
            // Notices are not events: an `--event` filter leaves them out.
            (_, StreamItem::Notice(_)) if !filter.events.is_empty() => {}
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

    #[test]
    fn images_are_saved_under_plain_names_only() {
        assert_eq!(file_name(&json!({"file_name": "0.png"}), 0), "0.png");
        for hostile in ["../x.jpeg", "a/b.jpeg", "..", "", "c:\\x"] {
            assert_eq!(
                file_name(
                    &json!({"file_name": hostile, "content_type": "image/png"}),
                    3
                ),
                "3.png",
                "{hostile}"
            );
        }
        assert_eq!(file_name(&json!({}), 1), "1.jpeg");
    }

    #[test]
    fn the_filter_keeps_the_listed_endpoints_and_events() {
        let started = |kind| {
            Event::new(
                "r",
                kind,
                EventBody::Started(Started {
                    worker: "w".into(),
                    attempt: 1,
                }),
            )
        };
        let all = EventFilter::default();
        assert!(all.matches(&started(EndpointKind::Base)));
        let sprint_started = EventFilter {
            endpoints: vec![EndpointKind::Sprint],
            events: vec![EventKind::Started, EventKind::Completed],
        };
        assert!(sprint_started.matches(&started(EndpointKind::Sprint)));
        assert!(!sprint_started.matches(&started(EndpointKind::Base)));
        let completed_only = EventFilter {
            endpoints: vec![],
            events: vec![EventKind::Completed],
        };
        assert!(!completed_only.matches(&started(EndpointKind::Sprint)));
    }
}
