//! Shared helpers of the integration tests: the real RabbitMQ and S3 (Garage) settings from the
//! environment, a uuid-named topology per test, and waiting on result-stream events with timeouts.
//! Tests never skip when a server is missing: they fail with a message that says what to set.
#![allow(dead_code)] // each test binary uses a different subset

pub mod faults;
pub mod fleetproc;
pub mod http;
pub mod realpipe;
pub mod workerproc;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet::events::{Event, EventKind};
use fleet::queue::{self, ResultStream, StreamOffset, Topology};
use fleet::storage::StorageConfig;
use futures::StreamExt;
use lapin::Connection;

/// Default broker of the development machines (`rabbitmq-server -detached`).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// `FLEET_TEST_AMQP_URL` or the local default.
pub fn amqp_url() -> String {
    std::env::var("FLEET_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_string())
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need a real S3 server. Start Garage with \
             `eval \"$(bash .ci/garage-up.sh)\"` (it exports FLEET_TEST_S3_ENDPOINT, FLEET_TEST_S3_REGION, \
             FLEET_TEST_S3_ACCESS_KEY, FLEET_TEST_S3_SECRET_KEY, FLEET_TEST_S3_BUCKET)"
        )
    })
}

/// S3 settings from `FLEET_TEST_S3_*`; the public endpoint is the same server (tests download the
/// presigned URLs directly). Panics with set-up instructions when unset.
pub fn s3_config() -> StorageConfig {
    let endpoint = required_env("FLEET_TEST_S3_ENDPOINT");
    StorageConfig {
        endpoint: endpoint.clone(),
        public_endpoint: Some(endpoint),
        region: required_env("FLEET_TEST_S3_REGION"),
        access_key_id: required_env("FLEET_TEST_S3_ACCESS_KEY"),
        secret_access_key: required_env("FLEET_TEST_S3_SECRET_KEY"),
        bucket: required_env("FLEET_TEST_S3_BUCKET"),
        public_base_url: None,
        url_lifetime: Duration::from_secs(3600),
    }
}

/// A binary of the workspace (`worker`, `dispatcher`). Cargo sets `CARGO_BIN_EXE_<name>` only for the
/// tests of the binary's own package, and these tests span packages, so the binary is taken from where
/// cargo puts it: the profile folder above this test's `deps/`. `cargo test --workspace` builds both (their
/// packages have tests of their own); `cargo test -p fleet` alone runs whatever was built last.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, or build it first \
         (`cargo build -p fleet-worker -p fleet-dispatcher`)",
        path.display()
    );
    path
}

/// The real `worker` binary wired to `topology`, the test broker and the test S3 server, with stdout
/// discarded and stderr shown only when `FLEET_TEST_WORKER_LOGS` is set; killed when dropped. Callers add
/// the model, device and behaviour flags (and may override stderr) before spawning.
pub fn worker_binary(topology: &Topology) -> tokio::process::Command {
    let s3 = s3_config();
    let mut cmd = tokio::process::Command::new(binary("worker"));
    cmd.args(["--topology-prefix", &topology.prefix])
        .args(["--results-max-age", &topology.results_max_age])
        .args(["--delivery-limit", &topology.delivery_limit.to_string()])
        .env("FLEET_AMQP_URL", amqp_url())
        .env("FLEET_S3_ENDPOINT", &s3.endpoint)
        .env("FLEET_S3_REGION", &s3.region)
        .env("FLEET_S3_ACCESS_KEY_ID", &s3.access_key_id)
        .env("FLEET_S3_SECRET_ACCESS_KEY", &s3.secret_access_key)
        .env("FLEET_S3_BUCKET", &s3.bucket)
        .stdout(std::process::Stdio::null())
        .stderr(if std::env::var_os("FLEET_TEST_WORKER_LOGS").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .kill_on_drop(true);
    cmd
}

/// Settings of every test topology (a redeclare must use the same arguments): prefix left empty.
pub fn test_topology_settings() -> Topology {
    Topology {
        prefix: String::new(),
        delivery_limit: 3,
        results_max_age: "1h".into(),
    }
}

/// A fresh topology named `t-<uuid>`, declared on the broker, with a short stream retention.
pub async fn fresh_topology(conn: &Connection) -> Topology {
    let topology = Topology {
        prefix: format!("t-{}", uuid::Uuid::new_v4().simple()),
        ..test_topology_settings()
    };
    let ch = conn.create_channel().await.expect("channel for declare");
    topology.declare(&ch).await.expect("declare topology");
    topology
}

/// Deletes a test topology and the dispatcher's webhook queues in it (best effort; a failure here
/// must not hide the test's own result).
pub async fn drop_topology(conn: &Connection, topology: &Topology) {
    if let Ok(ch) = conn.create_channel().await {
        if let Err(e) = topology.delete(&ch).await {
            eprintln!("cleanup of {} failed: {e}", topology.prefix);
        }
    }
    let hooks = fleet_dispatcher::webhooks::Queues::new(topology);
    let tiers = fleet_dispatcher::webhooks::RetryPolicy::default().tiers();
    if let Ok(ch) = conn.create_channel().await {
        if let Err(e) = hooks.delete(&ch, tiers).await {
            eprintln!(
                "cleanup of the webhook queues of {} failed: {e}",
                topology.prefix
            );
        }
    }
}

/// Connects to the test broker, failing with a clear message when it is down.
pub async fn connect() -> Connection {
    let url = amqp_url();
    queue::connect(&url).await.unwrap_or_else(|e| {
        panic!("cannot reach RabbitMQ at {url} ({e}); start it with `rabbitmq-server -detached` or set FLEET_TEST_AMQP_URL")
    })
}

/// Follows the results stream of a topology from the first offset, keeping every event seen.
pub struct EventLog {
    stream: ResultStream<Event>,
    pub seen: Vec<(u64, Event)>,
}

impl EventLog {
    pub async fn open(conn: &Connection, topology: &Topology) -> Self {
        let stream = queue::subscribe_results(conn, topology, StreamOffset::First)
            .await
            .expect("subscribe results");
        EventLog {
            stream,
            seen: Vec::new(),
        }
    }

    /// Reads events until one satisfies `pred` (already seen ones included), failing after `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        if let Some((_, e)) = self.seen.iter().find(|(_, e)| pred(e)) {
            return e.clone();
        }
        self.next_matching(timeout, what, pred).await
    }

    /// Reads new events until one satisfies `pred`, failing after `timeout`.
    pub async fn next_matching(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next()).await;
            match next {
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what}; events seen: {:#?}",
                    self.kinds()
                ),
                Ok(None) => panic!("results stream ended while waiting for {what}"),
                Ok(Some(Err(e))) => panic!("results stream failed while waiting for {what}: {e}"),
                Ok(Some(Ok((offset, event)))) => {
                    let hit = pred(&event);
                    self.seen.push((offset, event.clone()));
                    if hit {
                        return event;
                    }
                }
            }
        }
    }

    /// Reads events until `n` of those seen satisfy `pred`, failing after `timeout`.
    pub async fn wait_count(
        &mut self,
        timeout: Duration,
        what: &str,
        n: usize,
        pred: impl Fn(&Event) -> bool,
    ) {
        let mut have = self.seen.iter().filter(|(_, e)| pred(e)).count();
        while have < n {
            self.next_matching(timeout, what, &pred).await;
            have += 1;
        }
    }

    /// Waits for the terminal event of `request_id`.
    pub async fn terminal(&mut self, request_id: &str, timeout: Duration) -> Event {
        self.wait_for(timeout, &format!("a terminal event of {request_id}"), |e| {
            e.request_id == request_id && e.kind().is_terminal()
        })
        .await
    }

    /// Reads the stream up to a fresh end marker (a `cancelled` event of a new request id) published on
    /// `conn` now: anything published before this call (a late duplicate of a terminal event read so far)
    /// is then in `seen`.
    pub async fn read_to_end(&mut self, conn: &Connection, topology: &Topology, timeout: Duration) {
        let publisher = queue::Publisher::new(conn, topology.clone())
            .await
            .expect("publisher of the end marker");
        let marker = job(
            fleet::job::EndpointKind::Base,
            serde_json::json!({"prompt": "end marker"}),
        );
        publisher
            .publish_event(&Event::cancelled(
                marker.request_id.clone(),
                fleet::job::EndpointKind::Base,
            ))
            .await
            .expect("end marker");
        self.terminal(&marker.request_id, timeout).await;
    }

    /// Events of one request, in stream order.
    pub fn of(&self, request_id: &str) -> Vec<&Event> {
        self.seen
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.request_id == request_id)
            .collect()
    }

    /// Events of one request and kind.
    pub fn count(&self, request_id: &str, kind: EventKind) -> usize {
        self.of(request_id)
            .iter()
            .filter(|e| e.kind() == kind)
            .count()
    }

    fn kinds(&self) -> Vec<String> {
        self.seen
            .iter()
            .map(|(o, e)| {
                format!(
                    "{o}: {} {} {:?}",
                    e.request_id,
                    e.kind().as_str(),
                    e.worker()
                )
            })
            .collect()
    }
}

/// Downloads a URL and returns its status, content type and body.
pub async fn http_get(url: &str) -> (u16, Option<String>, Vec<u8>) {
    let resp = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("read body of {url}: {e}"))
        .to_vec();
    (status, ct, body)
}

/// A worker config for tests: one endpoint, no keep-alive, short grace, no retry pause.
pub fn worker_config(
    topology: &Topology,
    worker_id: &str,
    storage: StorageConfig,
) -> fleet_worker::WorkerConfig {
    fleet_worker::WorkerConfig {
        worker_id: worker_id.to_string(),
        amqp_url: amqp_url(),
        topology: topology.clone(),
        endpoints: vec![
            fleet::job::EndpointKind::Sprint,
            fleet::job::EndpointKind::Base,
        ],
        max_concurrency: 1,
        max_batch: 1,
        batch_wait: Duration::ZERO,
        keep_alive: None,
        idle_action: fleet_worker::IdleAction::Exit,
        drain_grace: Duration::from_secs(10),
        retry_backoff: Duration::ZERO,
        image_memory_budget: 4096 << 20,
        upload_retry_for: Duration::from_secs(300),
        replay_window: Duration::from_secs(86_400),
        storage,
    }
}

/// A worker running in-process on the test's runtime.
pub struct RunningWorker {
    pub shutdown: tokio_util::sync::CancellationToken,
    pub handle:
        tokio::task::JoinHandle<Result<fleet_worker::WorkerExit, fleet_worker::WorkerError>>,
}

impl RunningWorker {
    pub fn spawn(
        config: fleet_worker::WorkerConfig,
        factory: Box<dyn fleet_worker::PipelineFactory>,
    ) -> Self {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(fleet_worker::run(config, factory, shutdown.clone()));
        RunningWorker { shutdown, handle }
    }

    /// Signals shutdown and waits for the drain, failing after `timeout`.
    pub async fn stop(self, timeout: Duration) -> fleet_worker::WorkerExit {
        self.shutdown.cancel();
        self.join(timeout).await
    }

    /// Waits for the worker to return on its own.
    pub async fn join(self, timeout: Duration) -> fleet_worker::WorkerExit {
        match tokio::time::timeout(timeout, self.handle).await {
            Err(_) => panic!("worker did not stop within {timeout:?}"),
            Ok(Err(e)) => panic!("worker task panicked: {e}"),
            Ok(Ok(Err(e))) => panic!("worker failed: {e}"),
            Ok(Ok(Ok(exit))) => exit,
        }
    }
}

/// Validates `input` for `kind` (seed 42 unless given) and wraps it in a job message with a fresh id.
pub fn job(kind: fleet::job::EndpointKind, input: serde_json::Value) -> fleet::events::JobMessage {
    let input = fleet::job::validate(kind, &input, || 42).expect("test input is valid");
    fleet::events::JobMessage {
        request_id: uuid::Uuid::new_v4().to_string(),
        endpoint: kind,
        submitted_at: fleet::events::now_unix(),
        deadline: None,
        deadline_timer: false,
        input,
    }
}
