//! The `worker` binary as a child process for the scaling tests: the tiny checkpoints on the CPU, the
//! `http <address>` line it prints with `--http`, `/health` and `/metrics` reads, and signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use fleet::queue::Topology;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

/// A tiny random-weight checkpoint of `tests/fixtures/tiny/`.
pub fn tiny(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A fresh empty directory: a model path with no checkpoint in it (loading fails at once, offline).
pub fn empty_dir() -> String {
    let dir = std::env::temp_dir().join(format!("fleet-empty-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create an empty directory");
    dir.to_string_lossy().into_owned()
}

/// The flags that make `worker serve` (or each child of `worker fleet`) load the tiny checkpoints on the CPU.
pub fn tiny_model_args() -> Vec<String> {
    [
        "--device",
        "cpu",
        "--retry-backoff-ms",
        "0",
        "--base-model",
        &tiny("sana"),
        "--sprint-model",
        &tiny("sana_sprint"),
        "--safety-model",
        &tiny("nsfw_vit"),
        "--safety-checker",
        "v2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Spawns the worker binary with `args`, stdout piped (for the `http` line), on `topology`.
pub fn spawn(topology: &Topology, args: &[String]) -> Child {
    super::worker_binary(topology)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the worker binary")
}

/// Reads stdout until the `http <address>` line, failing after `timeout`. The rest of stdout is drained
/// in the background so the child never blocks on a full pipe.
pub async fn http_addr(child: &mut Child, timeout: Duration) -> SocketAddr {
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(timeout, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(a) = line.strip_prefix("http ") {
                return a.parse::<SocketAddr>().expect("an address after `http `");
            }
        }
        panic!("stdout closed before the `http` line")
    })
    .await
    .unwrap_or_else(|_| panic!("no `http` line within {timeout:?}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    addr
}

/// `GET http://addr{path}`: status and body; `None` when nothing answers.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// Polls `GET path` every 50 ms until `pred` holds for its answer, failing after `timeout`.
pub async fn wait_http(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some((code, body)) = get(addr, path).await {
            if pred(code, &body) {
                return (code, body);
            }
            last = Some((code, body));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last answer of {path}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of one sample line (`name{labels} value`) of a Prometheus text body.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("the child is running");
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} failed");
}

pub async fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    tokio::time::timeout(timeout, child.wait())
        .await
        .unwrap_or_else(|_| panic!("worker process did not exit within {timeout:?}"))
        .expect("wait for the worker process")
}
