//! Dispatcher helpers for integration tests: run the dispatcher in-process (a task) or as the real
//! binary (a child process that can be SIGKILLed), wait for its replay to finish via
//! `/health?wait_ms=`, read SSE status streams, and play a worker (take jobs off the job queue and
//! publish lifecycle events) for dispatcher-only tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fleet::events::{Completed, Event, EventBody, JobMessage, Progress, Started};
use fleet::job::EndpointKind;
use fleet::queue::{Publisher, Topology};
use fleet_dispatcher::http::{HttpConfig, ListenConfig};
use fleet_dispatcher::webhooks::WebhookConfig;
use fleet_dispatcher::{serve, ServeConfig};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::Connection;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

fn serve_config(
    topology: &Topology,
    http: HttpConfig,
    tls: Option<(PathBuf, PathBuf)>,
) -> ServeConfig {
    ServeConfig {
        amqp_url: super::amqp_url(),
        topology: topology.clone(),
        http: HttpConfig {
            https: tls.is_some(),
            ..http
        },
        listen: ListenConfig {
            addr: "127.0.0.1:0".parse().expect("addr"),
            tls,
        },
        // Test receivers listen on loopback.
        webhooks: WebhookConfig {
            allow_private: true,
            ..WebhookConfig::default()
        },
        ingress: true,
        ingress_prefetch: 16,
        retention: Default::default(),
    }
}

/// A dispatcher running as a task of the test's runtime.
pub struct InProcess {
    pub base: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl InProcess {
    pub async fn start(
        topology: &Topology,
        http: HttpConfig,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let cfg = serve_config(topology, http, tls);
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                if let Err(e) = serve(cfg, shutdown, move |addr| {
                    let _ = tx.send(addr);
                })
                .await
                {
                    eprintln!("dispatcher stopped with an error: {e}");
                }
            }
        });
        let addr = tokio::time::timeout(WAIT, rx)
            .await
            .expect("dispatcher bound in time")
            .expect("dispatcher bound");
        let base = format!("{scheme}://localhost:{}", addr.port());
        InProcess {
            base,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

/// The `dispatcher` binary as a child process (killed on drop).
pub struct Spawned {
    pub base: String,
    child: Child,
}

impl Spawned {
    pub async fn start(topology: &Topology, extra: &[&str]) -> Self {
        let mut child = Command::new(super::binary("dispatcher"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--amqp-url",
                &super::amqp_url(),
            ])
            .args([
                "--prefix",
                &topology.prefix,
                "--results-max-age",
                &topology.results_max_age,
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the dispatcher binary");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let find = async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return url.to_string();
                }
            }
            panic!("dispatcher exited before listening");
        };
        let base = tokio::time::timeout(WAIT, find)
            .await
            .expect("dispatcher listening in time");
        Spawned { base, child }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("SIGKILL the dispatcher");
    }
}

/// Waits until the dispatcher has replayed the stream (long-poll on `/health`).
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let resp = client
        .get(format!("{base}/health?wait_ms=20000"))
        .send()
        .await
        .expect("GET /health");
    assert_eq!(
        resp.status(),
        200,
        "dispatcher at {base} not ready: {:?}",
        resp.text().await
    );
}

/// Sends a request and returns status, headers and the JSON (or text) body.
pub async fn send(req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = req.send().await.expect("HTTP request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    assert!(
        ![408, 409, 429].contains(&status),
        "fal clients retry {status}; the dispatcher must not send it"
    );
    (status, headers, body)
}

/// Submits over HTTP and returns the submit body.
pub async fn submit(client: &reqwest::Client, base: &str, path: &str, input: Value) -> Value {
    let (status, headers, body) =
        send(client.post(format!("{base}/local/sana{path}")).json(&input)).await;
    assert_eq!(status, 200, "submit failed: {body}");
    assert_eq!(
        headers["x-fal-request-id"],
        body["request_id"].as_str().expect("request_id")
    );
    body
}

/// Reads an SSE status stream one status body at a time.
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buf: String,
}

impl SseReader {
    pub async fn open(client: &reqwest::Client, url: &str) -> Self {
        let resp = client.get(url).send().await.expect("GET status stream");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        SseReader {
            stream: resp.bytes_stream().map(|r| r.map(|b| b.to_vec())).boxed(),
            buf: String::new(),
        }
    }

    /// The next status body, or None when the server ended the stream.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let data: String = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Some(serde_json::from_str(&data).expect("status JSON"));
            }
            let chunk = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("SSE event in time")?;
            self.buf
                .push_str(&String::from_utf8_lossy(&chunk.expect("SSE bytes")));
        }
    }
}

/// Plays a worker inside the test: takes jobs off the job queue in order and publishes the events a
/// worker would. Only for dispatcher tests; the real worker is tested end to end elsewhere.
pub struct FakeWorker {
    channel: lapin::Channel,
    publisher: Publisher,
    topology: Topology,
}

impl FakeWorker {
    pub async fn new(conn: &Connection, topology: &Topology) -> Self {
        let channel = conn.create_channel().await.expect("channel");
        let publisher = Publisher::new(conn, topology.clone())
            .await
            .expect("publisher");
        FakeWorker {
            channel,
            publisher,
            topology: topology.clone(),
        }
    }

    /// Takes the next job of `kind` (None when the queue is empty) and acks it.
    pub async fn take(&self, kind: EndpointKind) -> Option<JobMessage> {
        let msg = self
            .channel
            .basic_get(
                self.topology.job_queue(kind).as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic.get")?;
        let job: JobMessage = serde_json::from_slice(&msg.delivery.data).expect("job JSON");
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        Some(job)
    }

    /// Waits (up to `WAIT`) for the next job of `kind` with a consumer, acks it and returns it.
    pub async fn wait_job(&self, conn: &Connection, kind: EndpointKind) -> JobMessage {
        // Own channel, closed at the end: anything prefetched beyond the one job goes back to the queue.
        let ch = conn.create_channel().await.expect("channel");
        let tag = format!("fake-{}", uuid::Uuid::new_v4().simple());
        ch.basic_qos(1, lapin::options::BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = ch
            .basic_consume(
                self.topology.job_queue(kind).as_str().into(),
                tag.as_str().into(),
                Default::default(),
                Default::default(),
            )
            .await
            .expect("consume jobs");
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a job in time")
            .expect("consumer open")
            .expect("delivery");
        let job: JobMessage = serde_json::from_slice(&delivery.data).expect("job JSON");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        ch.basic_cancel(tag.as_str().into(), Default::default())
            .await
            .expect("cancel consumer");
        ch.close(200, "done".into()).await.expect("close channel");
        job
    }

    pub async fn publish(&self, event: Event) {
        self.publisher
            .publish_event(&event)
            .await
            .expect("publish event");
    }

    pub async fn start(&self, job: &JobMessage) {
        let started = Started {
            worker: "fake".into(),
            attempt: 1,
        };
        self.publish(Event::new(
            &job.request_id,
            job.endpoint,
            EventBody::Started(started),
        ))
        .await;
    }

    pub async fn step(&self, job: &JobMessage, step: u32, total: u32) {
        let progress = Progress {
            worker: "fake".into(),
            step,
            total,
            message: None,
        };
        self.publish(Event::new(
            &job.request_id,
            job.endpoint,
            EventBody::Progress(progress),
        ))
        .await;
    }

    /// Publishes `completed` with a result shaped like the real one (URLs are fake: nothing downloads them).
    pub async fn complete(&self, job: &JobMessage) -> Value {
        let size = job.input.image_size;
        let images: Vec<Value> = (0..job.input.num_images)
            .map(|i| json!({"url": format!("http://s3.test/{}/{}/{i}.jpeg", job.endpoint, job.request_id),
                            "width": size.width, "height": size.height, "content_type": "image/jpeg"}))
            .collect();
        let result = json!({"images": images, "seed": job.input.seed, "has_nsfw_concepts": vec![false; images.len()],
                            "prompt": job.input.prompt, "timings": {"inference": 0.1}});
        let completed = Completed {
            worker: "fake".into(),
            attempt: 1,
            result: result.clone(),
            billable_units: job.input.billable_units(),
            inference_time: 0.1,
        };
        self.publish(Event::new(
            &job.request_id,
            job.endpoint,
            EventBody::Completed(completed),
        ))
        .await;
        result
    }
}

/// Ready messages in both job queues.
pub async fn jobs_enqueued(conn: &Connection, topology: &Topology) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let mut n = 0;
    for kind in EndpointKind::ALL {
        n += fleet::queue::queue_depth(&ch, &topology.job_queue(kind))
            .await
            .expect("queue depth");
    }
    n
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("fleet-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
