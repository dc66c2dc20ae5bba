//! `worker fleet` (the supervisor) as a child process for the scaling tests: spawned on a test topology
//! over CPU slots with its children on the tiny checkpoints, and its `/metrics` read back.

use std::net::SocketAddr;

use fleet::queue::Topology;
use tokio::process::Child;

use super::workerproc::{self, sample, tiny_model_args};

/// The children's model flags: the tiny checkpoints on the CPU, the sprint model from `sprint`.
pub fn model_args(sprint: &str) -> Vec<String> {
    let mut args = tiny_model_args();
    let i = args
        .iter()
        .position(|a| a == "--sprint-model")
        .expect("tiny_model_args sets --sprint-model");
    args[i + 1] = sprint.to_string();
    args
}

/// `worker fleet` on `topology` with `fleet_args`, its children on the tiny checkpoints plus `serve_args`.
pub fn spawn_fleet(topology: &Topology, fleet_args: &[&str], serve_args: &[&str]) -> Child {
    let mut child_args = tiny_model_args();
    child_args.extend(serve_args.iter().map(|s| s.to_string()));
    spawn_fleet_with(topology, fleet_args, &child_args)
}

/// `worker fleet` on `topology` with `fleet_args`; `child_args` after `--` for every `worker serve`.
pub fn spawn_fleet_with(topology: &Topology, fleet_args: &[&str], child_args: &[String]) -> Child {
    let s3 = super::s3_config();
    let mut cmd = tokio::process::Command::new(super::binary("worker"));
    cmd.arg("fleet")
        .args(["--topology-prefix", &topology.prefix])
        .args(["--results-max-age", &topology.results_max_age])
        .args(["--delivery-limit", &topology.delivery_limit.to_string()])
        .args(["--http", "127.0.0.1:0", "--tick-ms", "200"])
        .args(fleet_args)
        .arg("--")
        .args(child_args)
        .env("FLEET_AMQP_URL", super::amqp_url())
        .env("FLEET_S3_ENDPOINT", &s3.endpoint)
        .env("FLEET_S3_REGION", &s3.region)
        .env("FLEET_S3_ACCESS_KEY_ID", &s3.access_key_id)
        .env("FLEET_S3_SECRET_ACCESS_KEY", &s3.secret_access_key)
        .env("FLEET_S3_BUCKET", &s3.bucket)
        .stdout(std::process::Stdio::piped())
        .stderr(if std::env::var_os("FLEET_TEST_WORKER_LOGS").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .kill_on_drop(true);
    cmd.spawn().expect("spawn worker fleet")
}

/// The supervisor's metrics text.
pub async fn metrics(addr: SocketAddr) -> String {
    workerproc::get(addr, "/metrics")
        .await
        .expect("supervisor metrics")
        .1
}

/// One sample of a metrics text; 0 when absent.
pub fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or(0.0)
}

/// Workers in `state` (`starting`, `idle`, `busy`, `draining`).
pub fn workers(text: &str, state: &str) -> f64 {
    value(
        text,
        &format!("fleet_supervisor_workers{{state=\"{state}\"}}"),
    )
}

/// Live worker processes (any state) in a supervisor metrics text.
pub fn alive(text: &str) -> f64 {
    ["starting", "idle", "busy", "draining"]
        .iter()
        .map(|s| workers(text, s))
        .sum()
}

/// `fleet_supervisor_decisions_total{action}`.
pub fn decisions(text: &str, action: &str) -> f64 {
    value(
        text,
        &format!("fleet_supervisor_decisions_total{{action=\"{action}\"}}"),
    )
}
