//! The fault harness: servers of a test's own that it may stop and start (a RabbitMQ node, a Garage
//! node), the real `dispatcher` and `worker` binaries pointed at them, and the tally every fault test
//! prints (accepted / completed / failed / lost / duplicated). Nothing here touches the shared broker or
//! the shared Garage; every server is stopped and its directory removed when its guard drops, also when
//! the test fails.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;

use fleet::events::{Event, EventKind};
use fleet::storage::{Storage, StorageConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A free loopback TCP port (bound and released; good enough for a test's own servers).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Durations for a fault line: `[16.2s, 0.7s]`.
pub fn secs(durations: &[Duration]) -> String {
    let parts: Vec<String> = durations
        .iter()
        .map(|d| format!("{:.1}s", d.as_secs_f64()))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Polls `cond` every 100 ms until it is true, failing after `timeout` with `what`.
pub async fn poll_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A RabbitMQ node of the test's own (Debian's `rabbitmq-server`, run as the `rabbitmq` user by its
/// wrapper), on free ports, with no plugins; `stop_app`/`start_app` simulate a broker restart. Stopped
/// (`rabbitmqctl stop`) and its directory removed on drop.
pub struct RabbitNode {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
}

impl RabbitNode {
    /// Starts the node and waits until it accepts AMQP connections.
    pub async fn start() -> Self {
        Self::start_with_advanced(None).await
    }

    /// [`RabbitNode::start`] with an `advanced.config` (Erlang terms, e.g. a short `consumer_timeout`).
    pub async fn start_with_advanced(advanced: Option<&str>) -> Self {
        let short = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let name = format!("fault-{short}@localhost");
        let dir = std::env::temp_dir().join(format!("fleet-rabbit-{short}"));
        std::fs::create_dir_all(dir.join("mnesia")).expect("node dir");
        std::fs::create_dir_all(dir.join("log")).expect("log dir");
        let (port, dist_port) = (free_port(), free_port());
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("write rabbitmq.conf");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        std::fs::write(dir.join("advanced.config"), advanced.unwrap_or("[].\n"))
            .expect("write advanced.config");
        let chown = StdCommand::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .expect("run chown");
        assert!(chown.success(), "chown of {} failed", dir.display());
        let node = RabbitNode { name, port, dir };
        let status = StdCommand::new("rabbitmq-server")
            .arg("-detached")
            .current_dir("/tmp")
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                node.dir.join("advanced.config"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                node.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run rabbitmq-server -detached");
        assert!(status.success(), "rabbitmq-server -detached failed");
        node.wait_amqp(Duration::from_secs(90)).await;
        node
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn ctl(&self, args: &[&str]) -> bool {
        StdCommand::new("rabbitmqctl")
            .args(["-n", &self.name])
            .args(args)
            .current_dir("/tmp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits until an AMQP connection succeeds.
    async fn wait_amqp(&self, timeout: Duration) {
        let url = self.url();
        poll_until(
            timeout,
            &format!("RabbitMQ node {} to accept AMQP", self.name),
            || {
                let url = url.clone();
                async move {
                    match fleet::queue::connect(&url).await {
                        Ok(conn) => {
                            let _ = conn.close(200, "probe".into()).await;
                            true
                        }
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
    }

    /// `messages_ready` of `queue` on this node (`None` when it does not exist).
    pub fn messages_ready(&self, queue: &str) -> Option<u64> {
        let out = StdCommand::new("rabbitmqctl")
            .args(["-n", &self.name, "list_queues", "-q", "--no-table-headers"])
            .args(["name", "messages_ready"])
            .current_dir("/tmp")
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let mut cols = line.split_whitespace();
                (cols.next() == Some(queue)).then(|| cols.next()?.parse().ok())?
            })
    }

    /// The node's log so far (every `*.log` file under its log directory).
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("log")) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
                }
            }
        }
        text
    }

    /// `rabbitmqctl stop_app`: every connection is closed and the port refuses new ones.
    pub fn stop_app(&self) {
        assert!(self.ctl(&["stop_app"]), "stop_app on {}", self.name);
    }

    /// `rabbitmqctl start_app`, then waits until AMQP is accepted again.
    pub async fn start_app(&self) {
        assert!(self.ctl(&["start_app"]), "start_app on {}", self.name);
        self.wait_amqp(Duration::from_secs(60)).await;
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if !self.ctl(&["stop"]) {
            eprintln!("rabbitmqctl -n {} stop failed", self.name);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A single-node Garage of the test's own (the same settings as `.ci/garage-up.sh`), which the test
/// can stop (SIGKILL) and start again on the same ports and data. Killed and removed on drop.
pub struct GarageNode {
    dir: PathBuf,
    s3_port: u16,
    access_key: String,
    secret_key: String,
    bucket: String,
    child: Option<std::process::Child>,
}

/// `bytes` random bytes in hex (from v4 uuids; test secrets only).
fn hex(bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes * 2 {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(bytes * 2);
    s
}

/// `GARAGE_BIN`, else `garage` on `PATH`, else `~/.cargo/bin/garage` (where `.ci/run` installs it).
fn garage_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("GARAGE_BIN") {
        return bin.into();
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("garage"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").expect("HOME");
        PathBuf::from(home).join(".cargo/bin/garage")
    })
}

impl GarageNode {
    pub async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("fleet-garage-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("garage dir");
        let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
        let toml = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret}\"\n\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             root_domain = \".s3.garage.localhost\"\n\n[admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\n",
            d = dir.display(),
            secret = hex(32),
        );
        std::fs::write(dir.join("garage.toml"), toml).expect("write garage.toml");
        let mut node = GarageNode {
            dir,
            s3_port,
            access_key: format!("GK{}", hex(12)),
            secret_key: hex(32),
            bucket: "fleet-fault".into(),
            child: None,
        };
        node.up().await;
        node
    }

    /// Starts the server (again) and waits until the bucket answers.
    pub async fn up(&mut self) {
        let bin = garage_bin();
        assert!(
            bin.is_file(),
            "garage not found at {} (install it: cargo install garage --locked --version 2.5.0)",
            bin.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("garage.log"))
            .expect("garage log");
        let child = StdCommand::new(bin)
            .arg("-c")
            .arg(self.dir.join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_key)
            .env("GARAGE_DEFAULT_BUCKET", &self.bucket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn garage");
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/{}", self.s3_port, self.bucket);
        poll_until(Duration::from_secs(60), "Garage to answer", || {
            let url = url.clone();
            async move {
                // An unsigned GET is refused with 403 once the bucket exists.
                matches!(
                    reqwest::get(&url).await.map(|r| r.status().as_u16()),
                    Ok(403 | 200)
                )
            }
        })
        .await;
    }

    /// SIGKILL: the S3 port refuses connections until [`GarageNode::up`].
    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn config(&self) -> StorageConfig {
        let endpoint = format!("http://127.0.0.1:{}", self.s3_port);
        StorageConfig {
            endpoint: endpoint.clone(),
            public_endpoint: Some(endpoint),
            region: "garage".into(),
            access_key_id: self.access_key.clone(),
            secret_access_key: self.secret_key.clone(),
            bucket: self.bucket.clone(),
            public_base_url: None,
            url_lifetime: Duration::from_secs(3600),
        }
    }
}

impl Drop for GarageNode {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tiny(name: &str) -> String {
    super::realpipe::tiny(name).to_string_lossy().into_owned()
}

/// The `worker` binary on the tiny checkpoints (CPU), against `amqp_url` and `s3`; killed on drop.
pub fn spawn_worker(
    amqp_url: &str,
    topology: &fleet::queue::Topology,
    s3: &StorageConfig,
    worker_id: &str,
    extra: &[&str],
) -> Child {
    Command::new(super::binary("worker"))
        .arg("serve")
        .args(["--topology-prefix", &topology.prefix])
        .args(["--results-max-age", &topology.results_max_age])
        .args(["--delivery-limit", &topology.delivery_limit.to_string()])
        .args(["--worker-id", worker_id, "--device", "cpu"])
        .args([
            "--base-model",
            &tiny("sana"),
            "--sprint-model",
            &tiny("sana_sprint"),
        ])
        .args([
            "--safety-model",
            &tiny("nsfw_vit"),
            "--safety-checker",
            "v2",
        ])
        .args(extra)
        .env("FLEET_AMQP_URL", amqp_url)
        .env("FLEET_S3_ENDPOINT", &s3.endpoint)
        .env("FLEET_S3_REGION", &s3.region)
        .env("FLEET_S3_ACCESS_KEY_ID", &s3.access_key_id)
        .env("FLEET_S3_SECRET_ACCESS_KEY", &s3.secret_access_key)
        .env("FLEET_S3_BUCKET", &s3.bucket)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("FLEET_TEST_WORKER_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the worker binary")
}

/// The `dispatcher` binary against `amqp_url`; returns the child (killed on drop) and its base URL.
pub async fn spawn_dispatcher(
    amqp_url: &str,
    topology: &fleet::queue::Topology,
) -> (Child, String) {
    let mut child = Command::new(super::binary("dispatcher"))
        .args(["serve", "--listen", "127.0.0.1:0", "--amqp-url", amqp_url])
        .args(["--prefix", &topology.prefix])
        .args(["--results-max-age", &topology.results_max_age])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("FLEET_TEST_WORKER_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
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
    let base = tokio::time::timeout(Duration::from_secs(30), find)
        .await
        .expect("dispatcher listening in time");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, base)
}

/// What the results stream says about the accepted requests, and the pass rule of every fault test.
#[derive(Debug, Default)]
pub struct Tally {
    pub accepted: usize,
    pub completed: usize,
    pub failed: usize,
    /// Accepted requests without a terminal event.
    pub lost: usize,
    /// Accepted requests with more than one terminal event, or more than one set of objects.
    pub duplicated: usize,
    /// `failed` events by error type.
    pub failures: BTreeMap<String, usize>,
}

impl Tally {
    /// Counts terminal events per accepted id in `events` (the whole stream) and the objects stored
    /// under each id's key prefix (`{kind}/{id}/`): one set = `num_images` objects for a completed request,
    /// none for a failed one.
    pub async fn count(
        accepted: &[String],
        events: &[(u64, Event)],
        storage: &StorageConfig,
        kind: fleet::job::EndpointKind,
        num_images: usize,
    ) -> Self {
        let mut terminal: HashMap<&str, Vec<&Event>> = HashMap::new();
        for (_, e) in events {
            if e.kind().is_terminal() {
                terminal.entry(e.request_id.as_str()).or_default().push(e);
            }
        }
        let store = Storage::new(storage.clone()).expect("storage client");
        let mut t = Tally {
            accepted: accepted.len(),
            ..Tally::default()
        };
        for id in accepted {
            let ends = terminal.get(id.as_str()).map_or(&[][..], Vec::as_slice);
            let keys = store
                .list_keys(&format!("{}/{id}/", kind.as_str()))
                .await
                .expect("list objects");
            match ends.first().map(|e| e.kind()) {
                None => t.lost += 1,
                Some(EventKind::Completed) => t.completed += 1,
                Some(_) => {
                    t.failed += 1;
                    let label = ends[0]
                        .error_type()
                        .map_or("none".to_string(), |e| e.as_str().to_string());
                    *t.failures.entry(label).or_default() += 1;
                }
            }
            let want_keys = match ends.first().map(|e| e.kind()) {
                Some(EventKind::Completed) => num_images,
                _ => keys.len().min(num_images),
            };
            if ends.len() > 1 || keys.len() != want_keys {
                t.duplicated += 1;
            }
        }
        t
    }

    /// The line every fault test prints.
    pub fn print(&self, name: &str, extra: &str) {
        println!(
            "fault {name}: accepted={} completed={} failed={} lost={} duplicated={} failures={:?} {extra}",
            self.accepted, self.completed, self.failed, self.lost, self.duplicated, self.failures
        );
    }
}
