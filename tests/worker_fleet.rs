//! `worker fleet` (the supervisor) as a process over CPU slots, its `worker serve` children on the tiny
//! checkpoints, against the real RabbitMQ and S3: a burst scales 0 → max and never above while every job
//! completes exactly once, then back to 0 after keep-alive with every worker drained; a worker that
//! never got a job is reaped after 10 s although keep-alive is long; a worker that cannot start (bad model
//! path) is retried with a growing backoff.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::workerproc::{self, sample, tiny_model_args};
use common::EventLog;
use fleet::events::EventKind;
use fleet::job::EndpointKind;
use fleet::queue::{Publisher, Topology};
use lapin::options::QueuePurgeOptions;
use serde_json::json;
use tokio::process::Child;

const WAIT: Duration = Duration::from_secs(240);

/// The children's model flags: the tiny checkpoints on the CPU, the sprint model from `sprint`.
fn model_args(sprint: &str) -> Vec<String> {
    let mut args = tiny_model_args();
    let i = args
        .iter()
        .position(|a| a == "--sprint-model")
        .expect("tiny_model_args sets --sprint-model");
    args[i + 1] = sprint.to_string();
    args
}

/// `worker fleet` on `topology` with `fleet_args`, its children on the tiny checkpoints plus `serve_args`.
fn spawn_fleet(topology: &Topology, fleet_args: &[&str], serve_args: &[&str]) -> Child {
    let mut child_args = tiny_model_args();
    child_args.extend(serve_args.iter().map(|s| s.to_string()));
    spawn_fleet_with(topology, fleet_args, &child_args)
}

/// `worker fleet` on `topology` with `fleet_args`; `child_args` after `--` for every `worker serve`.
fn spawn_fleet_with(topology: &Topology, fleet_args: &[&str], child_args: &[String]) -> Child {
    let s3 = common::s3_config();
    let mut cmd = tokio::process::Command::new(common::binary("worker"));
    cmd.arg("fleet")
        .args(["--topology-prefix", &topology.prefix])
        .args(["--results-max-age", &topology.results_max_age])
        .args(["--delivery-limit", &topology.delivery_limit.to_string()])
        .args(["--http", "127.0.0.1:0", "--tick-ms", "200"])
        .args(fleet_args)
        .arg("--")
        .args(child_args)
        .env("FLEET_AMQP_URL", common::amqp_url())
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
async fn metrics(addr: SocketAddr) -> String {
    workerproc::get(addr, "/metrics")
        .await
        .expect("supervisor metrics")
        .1
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or(0.0)
}

/// Live worker processes (any state) in a supervisor metrics text.
fn alive(text: &str) -> f64 {
    ["starting", "idle", "busy", "draining"]
        .iter()
        .map(|s| value(text, &format!("fleet_supervisor_workers{{state=\"{s}\"}}")))
        .sum()
}

#[tokio::test]
async fn a_burst_scales_zero_to_max_never_above_completes_and_returns_to_zero() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    // Three slots but --max-workers 2: the policy's max binds, not the slots.
    let mut fleet = spawn_fleet(
        &topology,
        &[
            "--cpu-slots",
            "3",
            "--max-workers",
            "2",
            "--keep-alive",
            "3s",
        ],
        &["--drain-grace", "600"],
    );
    let addr = workerproc::http_addr(&mut fleet, WAIT).await;
    // The demand gauges appear with the first observation of the queues.
    let (_, idle) = workerproc::wait_http(addr, "/metrics", WAIT, "a first decision", |_, t| {
        t.contains("fleet_supervisor_demand_jobs{kind=\"waiting\"} 0")
    })
    .await;
    assert_eq!(value(&idle, "fleet_supervisor_target_workers"), 0.0);
    assert_eq!(alive(&idle), 0.0, "no worker without demand: {idle}");

    let jobs: Vec<_> = (0..6)
        .map(|i| {
            common::job(
                EndpointKind::Sprint,
                json!({"prompt": format!("burst {i}"), "image_size": "square", "num_inference_steps": 8}),
            )
        })
        .collect();
    for job in &jobs {
        publisher.publish_job(job).await.expect("publish");
    }
    // Sample the worker count while the burst runs.
    let deadline = Instant::now() + WAIT;
    let mut most = 0.0f64;
    let mut done = HashSet::new();
    while done.len() < jobs.len() {
        assert!(Instant::now() < deadline, "burst not done in {WAIT:?}");
        most = most.max(alive(&metrics(addr).await));
        for job in &jobs {
            if !done.contains(&job.request_id)
                && log.count(&job.request_id, EventKind::Completed) > 0
            {
                done.insert(job.request_id.clone());
            }
        }
        // Read whatever arrived on the stream within 100 ms (the loop's pace).
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            log.next_matching(WAIT, "any event", |_| true),
        )
        .await;
    }
    assert_eq!(most, 2.0, "scaled to max (2) and never above");
    for job in &jobs {
        assert_eq!(
            log.count(&job.request_id, EventKind::Completed),
            1,
            "{}",
            job.request_id
        );
        assert_eq!(log.count(&job.request_id, EventKind::Failed), 0);
    }
    let workers: HashSet<_> = log
        .seen
        .iter()
        .filter(|(_, e)| e.kind() == EventKind::Completed)
        .filter_map(|(_, e)| e.worker().map(str::to_string))
        .collect();
    assert!(
        workers.len() <= 2,
        "at most two workers ran jobs: {workers:?}"
    );

    // Keep-alive 3 s: both drain and exit, back to min 0.
    let (_, text) = workerproc::wait_http(addr, "/metrics", WAIT, "back to zero", |_, t| {
        value(t, "fleet_supervisor_worker_exits_total{reason=\"drained\"}") == 2.0
            && alive(t) == 0.0
    })
    .await;
    assert_eq!(
        value(&text, "fleet_supervisor_decisions_total{action=\"start\"}"),
        2.0
    );
    assert_eq!(
        value(&text, "fleet_supervisor_decisions_total{action=\"stop\"}"),
        2.0
    );
    assert_eq!(value(&text, "fleet_supervisor_start_failures_total"), 0.0);
    assert_eq!(
        value(&text, "fleet_supervisor_cold_start_seconds_count"),
        2.0
    );

    workerproc::signal(&fleet, "-TERM");
    assert!(workerproc::wait_exit(&mut fleet, WAIT).await.success());
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn a_worker_that_never_got_a_job_is_reaped_after_ten_seconds() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut fleet = spawn_fleet(
        &topology,
        &[
            "--cpu-slots",
            "1",
            "--max-workers",
            "1",
            "--keep-alive",
            "600s",
        ],
        &[],
    );
    let addr = workerproc::http_addr(&mut fleet, WAIT).await;
    let job = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "gone before it is taken"}),
    );
    publisher.publish_job(&job).await.expect("publish");
    workerproc::wait_http(addr, "/metrics", WAIT, "a worker starting", |_, t| {
        value(t, "fleet_supervisor_workers{state=\"starting\"}") == 1.0
    })
    .await;
    // Take the job away while the worker loads its models: it will never get one.
    let ch = conn.create_channel().await.expect("channel");
    let purged = ch
        .queue_purge(
            topology.job_queue(EndpointKind::Sprint).as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await
        .expect("purge");
    assert_eq!(purged, 1, "the job was purged before the worker took it");
    let (_, ready) = workerproc::wait_http(addr, "/metrics", WAIT, "the worker ready", |_, t| {
        value(t, "fleet_supervisor_workers{state=\"idle\"}") == 1.0
    })
    .await;
    let ready_at = Instant::now();
    assert_eq!(
        value(&ready, "fleet_supervisor_demand_jobs{kind=\"waiting\"}"),
        0.0
    );
    workerproc::wait_http(
        addr,
        "/metrics",
        WAIT,
        "the unused worker reaped",
        |_, t| {
            value(t, "fleet_supervisor_worker_exits_total{reason=\"drained\"}") == 1.0
                && alive(t) == 0.0
        },
    )
    .await;
    let after = ready_at.elapsed();
    // Idle since ready; the supervisor saw it ready up to a tick (200 ms) after it became ready.
    assert!(
        after >= Duration::from_millis(9_500),
        "reaped after {after:?}, not before 10 s"
    );
    assert!(
        after < Duration::from_secs(60),
        "reaped after {after:?}, long before keep-alive 600 s"
    );
    workerproc::signal(&fleet, "-TERM");
    assert!(workerproc::wait_exit(&mut fleet, WAIT).await.success());
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn a_worker_that_cannot_start_is_retried_with_a_growing_backoff() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    // min 1: the supervisor keeps trying without any demand. Step 500 ms: waits of 0.5, 1, 1.5 s, ...
    let step = Duration::from_millis(500);
    let mut fleet = spawn_fleet_with(
        &topology,
        &[
            "--cpu-slots",
            "1",
            "--min-concurrency",
            "1",
            "--start-backoff-ms",
            "500",
        ],
        &model_args(&workerproc::empty_dir()),
    );
    let addr = workerproc::http_addr(&mut fleet, WAIT).await;
    // When each failure is first seen (metrics polled every 50 ms).
    let mut seen: Vec<Instant> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "fewer than 4 start failures in {WAIT:?}"
        );
        let text = metrics(addr).await;
        let failures = value(&text, "fleet_supervisor_start_failures_total") as usize;
        assert!(
            failures <= seen.len() + 1,
            "two failures within one poll: {text}"
        );
        if failures == seen.len() + 1 {
            seen.push(Instant::now());
            let backoff = value(&text, "fleet_supervisor_start_backoff_seconds");
            assert_eq!(backoff, 0.5 * failures as f64, "+step per failure: {text}");
            assert_eq!(
                value(&text, "fleet_supervisor_workers{state=\"idle\"}"),
                0.0
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // After failure k the next start waits k steps; the poll adds up to ~100 ms of jitter.
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1] - w[0]).collect();
    for (k, gap) in gaps.iter().enumerate() {
        let floor = step * (k as u32 + 1) - Duration::from_millis(100);
        assert!(
            *gap >= floor,
            "gap {} = {gap:?} below {floor:?}: {gaps:?}",
            k + 1
        );
    }
    assert!(gaps[2] > gaps[0] + step, "the backoff grows: {gaps:?}");
    workerproc::signal(&fleet, "-TERM");
    assert!(workerproc::wait_exit(&mut fleet, WAIT).await.success());
    common::drop_topology(&conn, &topology).await;
}
