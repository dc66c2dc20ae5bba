//! Durable, signed webhooks against the real RabbitMQ and the real `dispatcher` binary: a receiver inside
//! the test records every POST. Two dispatchers deliver each webhook once; a receiver that is down at
//! first gets it when it comes up; a dispatcher SIGKILLed mid-retry loses nothing (a fresh one delivers);
//! the README's Python verifier accepts the signature and rejects a tampered body; private targets are
//! refused (dead-lettered) without `--webhook-allow-private`; a retry window that runs out dead-letters.
//! Terminal events are published by the test playing the worker. Every wait polls a condition with a
//! deadline. The tests live in the dispatcher's package (not the workspace's `tests/`) so that they build
//! without the model crates; each runs under its own uuid-named topology.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use fleet::events::{Completed, Event, EventBody, JobMessage, Queued, Started};
use fleet::job::EndpointKind;
use fleet::queue::{Publisher, Topology};
use fleet_dispatcher::webhooks::{Queues, RetryPolicy};
use lapin::Connection;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(30);

/// `FLEET_TEST_AMQP_URL` or the local default (as the workspace's `tests/common`).
fn amqp_url() -> String {
    std::env::var("FLEET_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

async fn connect() -> Connection {
    let url = amqp_url();
    fleet::queue::connect(&url).await.unwrap_or_else(|e| {
        panic!("cannot reach RabbitMQ at {url} ({e}); start it with `rabbitmq-server -detached` or set FLEET_TEST_AMQP_URL")
    })
}

/// A fresh topology named `t-<uuid>` (same settings as the workspace tests), declared on the broker.
async fn fresh_topology(conn: &Connection) -> Topology {
    let topology = Topology {
        prefix: format!("t-{}", uuid::Uuid::new_v4().simple()),
        delivery_limit: 3,
        results_max_age: "1h".into(),
    };
    let ch = conn.create_channel().await.expect("channel");
    topology.declare(&ch).await.expect("declare topology");
    topology
}

/// Deletes the topology and its webhook queues (best effort).
async fn drop_topology(conn: &Connection, topology: &Topology) {
    if let Ok(ch) = conn.create_channel().await {
        let _ = topology.delete(&ch).await;
    }
    if let Ok(ch) = conn.create_channel().await {
        let tiers = RetryPolicy::default().tiers();
        let _ = Queues::new(topology).delete(&ch, tiers).await;
    }
}

/// The `dispatcher` binary as a child process (SIGKILLed on drop).
struct Spawned {
    base: String,
    child: tokio::process::Child,
}

impl Spawned {
    async fn start(topology: &Topology, extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--amqp-url",
                &amqp_url(),
            ])
            .args(["--prefix", &topology.prefix])
            .args(["--results-max-age", &topology.results_max_age])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("FLEET_TEST_DISPATCHER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
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
        let client = reqwest::Client::new();
        let ready = client
            .get(format!("{base}/health?wait_ms=20000"))
            .send()
            .await
            .expect("GET /health");
        assert_eq!(ready.status(), 200, "dispatcher at {base} not ready");
        Spawned { base, child }
    }

    /// SIGKILL: no shutdown code runs.
    async fn kill(mut self) {
        self.child.kill().await.expect("SIGKILL the dispatcher");
    }
}

/// Plays the worker: publishes lifecycle events (confirmed).
struct FakeWorker {
    publisher: Publisher,
}

impl FakeWorker {
    async fn new(conn: &Connection, topology: &Topology) -> Self {
        let publisher = Publisher::new(conn, topology.clone())
            .await
            .expect("publisher");
        FakeWorker { publisher }
    }

    async fn publish(&self, job: &JobMessage, body: EventBody) {
        self.publisher
            .publish_event(&Event::new(&job.request_id, job.endpoint, body))
            .await
            .expect("publish event");
    }
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Short retries for tests: 200 ms doubling to 1 s.
const FAST_RETRY: [&str; 4] = [
    "--webhook-retry-initial-ms",
    "200",
    "--webhook-retry-max-ms",
    "1000",
];

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: String,
}

/// A webhook receiver on loopback answering `status` to every POST.
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(addr: SocketAddr, status: StatusCode) -> Self {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new().route(
            "/hook/{token}",
            axum::routing::post({
                let hits = hits.clone();
                move |headers: HeaderMap, body: String| {
                    hits.lock().expect("hits").push(Hit { headers, body });
                    async move { status }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { hits, addr, task }
    }

    fn url(&self) -> String {
        url_at(self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits").clone()
    }

    fn of(&self, request_id: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.headers["webhook-id"] == request_id)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn url_at(addr: SocketAddr) -> String {
    // The path and query carry a token that logs must never show.
    format!("http://{addr}/hook/tok-secret?sig=abc")
}

/// A loopback address nothing listens on (connections are refused) that a receiver can bind later.
async fn free_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr")
}

/// Publishes `queued` (with the webhook URL), `started` and `completed` for a fresh request.
async fn finish_request(worker: &FakeWorker, webhook: &str) -> JobMessage {
    let kind = EndpointKind::Sprint;
    let input = fleet::job::validate(kind, &json!({"prompt": "a heron"}), || 42).expect("input");
    let job = JobMessage {
        request_id: uuid::Uuid::new_v4().to_string(),
        endpoint: kind,
        submitted_at: fleet::events::now_unix(),
        deadline: None,
        deadline_timer: false,
        input,
    };
    let queued = Queued {
        input: job.input.clone(),
        deadline: None,
        webhook_url: Some(webhook.to_string()),
    };
    worker.publish(&job, EventBody::Queued(queued)).await;
    let started = Started {
        worker: "fake".into(),
        attempt: 1,
    };
    worker.publish(&job, EventBody::Started(started)).await;
    let completed = Completed {
        worker: "fake".into(),
        attempt: 1,
        result: json!({"images": [], "seed": 42, "prompt": "a heron"}),
        billable_units: 1,
        inference_time: 0.1,
    };
    worker.publish(&job, EventBody::Completed(completed)).await;
    job
}

/// Polls `cond` every 50 ms until it holds, failing after `timeout`.
async fn until(timeout: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `fleet_webhook_deliveries_total{outcome}` of one dispatcher.
async fn counter(client: &reqwest::Client, base: &str, outcome: &str) -> u64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let prefix = format!("fleet_webhook_deliveries_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("counter value"))
}

async fn sum(client: &reqwest::Client, bases: &[&str], outcome: &str) -> u64 {
    let mut n = 0;
    for base in bases {
        n += counter(client, base, outcome).await;
    }
    n
}

async fn depth(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    fleet::queue::queue_depth(&ch, queue)
        .await
        .expect("queue depth")
}

/// The README's verification snippet (the ```python block after `<!-- webhook-verify -->`), run with
/// python3 on one captured delivery; true when it accepts the signature.
fn readme_verifies(hit: &Hit, body: &str) -> bool {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let after = readme
        .split_once("<!-- webhook-verify -->")
        .expect("README marks its webhook verification snippet")
        .1;
    let code = after
        .split_once("```python\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a python block after the marker")
        .0;
    let headers: serde_json::Map<String, Value> =
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
            .iter()
            .map(|h| {
                let v = hit.headers[*h].to_str().expect("ascii header");
                (h.to_string(), json!(v))
            })
            .collect();
    let input = json!({"secret": SECRET, "headers": headers, "body": body});
    let script = format!(
        "{code}\nimport json, sys\nd = json.load(sys.stdin)\nprint(verify(d['secret'], d['headers'], d['body'].encode()))\n"
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(
        child.stdin.as_mut().expect("stdin"),
        input.to_string().as_bytes(),
    )
    .expect("write stdin");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("python3 output");
    assert!(out.status.success(), "the README snippet failed: {out:?}");
    match String::from_utf8_lossy(&out.stdout).trim() {
        "True" => true,
        "False" => false,
        other => panic!("the README snippet printed {other:?}"),
    }
}

#[tokio::test]
async fn two_dispatchers_deliver_each_webhook_once_signed_as_the_readme_verifies() {
    let conn = connect().await;
    let topology = fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let flags = ["--webhook-allow-private", "--webhook-secret", SECRET];
    let a = Spawned::start(&topology, &flags).await;
    let b = Spawned::start(&topology, &flags).await;
    let receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"), StatusCode::OK).await;
    let worker = FakeWorker::new(&conn, &topology).await;
    const N: usize = 6;
    let mut jobs = Vec::new();
    for _ in 0..N {
        jobs.push(finish_request(&worker, &receiver.url()).await);
    }
    let bases = [a.base.as_str(), b.base.as_str()];
    until(WAIT, "every webhook delivered", async || {
        sum(&client, &bases, "delivered").await >= N as u64
    })
    .await;
    // Every delivery the two dispatchers made is counted: once they counted N, the receiver has N, one
    // per request, and nothing is left on the queues.
    let queues = Queues::new(&topology);
    until(WAIT, "the webhook queues drained", async || {
        depth(&conn, &queues.terminal).await == 0 && depth(&conn, &queues.deliveries).await == 0
    })
    .await;
    assert_eq!(sum(&client, &bases, "delivered").await, N as u64);
    assert_eq!(receiver.hits().len(), N, "one POST per request");
    for job in &jobs {
        let hits = receiver.of(&job.request_id);
        assert_eq!(hits.len(), 1, "{}", job.request_id);
        let hit = &hits[0];
        let body: Value = serde_json::from_str(&hit.body).expect("JSON body");
        assert_eq!(
            (body["request_id"].as_str(), body["status"].as_str()),
            (Some(job.request_id.as_str()), Some("OK"))
        );
        assert_eq!(hit.headers["content-type"], "application/json");
        assert!(
            readme_verifies(hit, &hit.body),
            "a genuine delivery verifies"
        );
    }
    // The same captured delivery with one byte of the body changed does not.
    let hit = &receiver.of(&jobs[0].request_id)[0];
    let tampered = hit.body.replacen("\"OK\"", "\"KO\"", 1);
    assert_ne!(tampered, hit.body);
    assert!(!readme_verifies(hit, &tampered), "a tampered body fails");
    a.kill().await;
    b.kill().await;
    drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn a_receiver_down_at_first_gets_the_webhook_when_it_comes_up() {
    let conn = connect().await;
    let topology = fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let mut flags = vec!["--webhook-allow-private", "--webhook-secret", SECRET];
    flags.extend(FAST_RETRY);
    let d = Spawned::start(&topology, &flags).await;
    let addr = free_addr().await;
    let worker = FakeWorker::new(&conn, &topology).await;
    let job = finish_request(&worker, &url_at(addr)).await;
    until(WAIT, "two refused attempts", async || {
        counter(&client, &d.base, "retried").await >= 2
    })
    .await;
    let receiver = Receiver::start(addr, StatusCode::OK).await;
    until(WAIT, "the delivery once the receiver is up", async || {
        counter(&client, &d.base, "delivered").await == 1
    })
    .await;
    assert_eq!(receiver.of(&job.request_id).len(), 1);
    assert_eq!(counter(&client, &d.base, "dead").await, 0);
    d.kill().await;
    drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn a_dispatcher_killed_mid_retry_loses_nothing() {
    let conn = connect().await;
    let topology = fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    // The first retry waits 2 to 4 s: the job is in a retry queue when the dispatcher dies.
    let flags = [
        "--webhook-allow-private",
        "--webhook-secret",
        SECRET,
        "--webhook-retry-initial-ms",
        "4000",
        "--webhook-retry-max-ms",
        "4000",
    ];
    let first = Spawned::start(&topology, &flags).await;
    let addr = free_addr().await;
    let worker = FakeWorker::new(&conn, &topology).await;
    let job = finish_request(&worker, &url_at(addr)).await;
    until(WAIT, "a failed attempt handed to a retry", async || {
        counter(&client, &first.base, "retried").await >= 1
    })
    .await;
    first.kill().await;
    let receiver = Receiver::start(addr, StatusCode::OK).await;
    let second = Spawned::start(&topology, &flags).await;
    until(WAIT, "the new dispatcher to deliver it", async || {
        !receiver.of(&job.request_id).is_empty()
    })
    .await;
    until(WAIT, "the delivery counted", async || {
        counter(&client, &second.base, "delivered").await == 1
    })
    .await;
    assert_eq!(receiver.of(&job.request_id).len(), 1);
    second.kill().await;
    drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn private_targets_are_refused_and_a_spent_retry_window_dead_letters() {
    let conn = connect().await;
    let topology = fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let queues = Queues::new(&topology);
    let worker = FakeWorker::new(&conn, &topology).await;

    // Without the flag a loopback receiver gets nothing: the job goes straight to the dead queue.
    let mut flags = vec!["--webhook-secret", SECRET, "--webhook-retry-for", "1"];
    flags.extend(FAST_RETRY);
    let strict = Spawned::start(&topology, &flags).await;
    let receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"), StatusCode::OK).await;
    finish_request(&worker, &receiver.url()).await;
    until(WAIT, "the refused webhook dead-lettered", async || {
        counter(&client, &strict.base, "dead").await == 1
    })
    .await;
    assert_eq!(depth(&conn, &queues.dead).await, 1);
    assert_eq!(counter(&client, &strict.base, "retried").await, 0);
    assert!(receiver.hits().is_empty(), "a loopback target was called");
    strict.kill().await;

    // With the flag, a receiver answering 500 is retried (same webhook-id) until the 1 s window is
    // spent, then dead-lettered.
    let failing = Receiver::start(
        "127.0.0.1:0".parse().expect("addr"),
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    flags.push("--webhook-allow-private");
    let lenient = Spawned::start(&topology, &flags).await;
    let job = finish_request(&worker, &failing.url()).await;
    until(WAIT, "the failing webhook dead-lettered", async || {
        counter(&client, &lenient.base, "dead").await == 1
    })
    .await;
    let hits = failing.of(&job.request_id);
    assert!(
        hits.len() >= 2,
        "retried before giving up: {} POSTs",
        hits.len()
    );
    assert_eq!(
        counter(&client, &lenient.base, "retried").await as usize,
        hits.len() - 1
    );
    assert_eq!(depth(&conn, &queues.dead).await, 2);
    lenient.kill().await;
    drop_topology(&conn, &topology).await;
}
