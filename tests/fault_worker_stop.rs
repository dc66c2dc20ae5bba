//! Fault: a worker frozen with SIGSTOP past the broker's consumer timeout, then thawed with SIGCONT,
//! under the real `dispatcher` and `worker` binaries, on a RabbitMQ node of the test's own whose
//! `consumer_timeout` is 3 s (checked every 500 ms). The broker closes the frozen worker's job channel
//! and requeues its unacknowledged job while the worker still runs it; after SIGCONT the worker finishes
//! that run, consumes again, receives the same job and acks it without a second run. Repeated in
//! several rounds; every accepted request ends in exactly one terminal event with one set of objects,
//! none stays IN_QUEUE/IN_PROGRESS, and the worker process stays up.
//!
//! Which of two broker mechanisms gives up on the frozen worker: RabbitMQ 3.10 checks `consumer_timeout`
//! on a channel's tick timer, and a channel cancels that timer when its process hibernates
//! (`rabbit_channel:handle_pre_hibernate/1` calls `maybe_cancel_tick_timer/1`). A frozen client sends
//! nothing, so a channel that hibernated before the delivery was `consumer_timeout` old never ticks
//! again; then the requeue comes only when the connection dies of missed heartbeats. The first run of this
//! test (2026-12-01) saw 185 s with lapin taking the server's 60 s heartbeat, which fits (its log is gone). The
//! worker here connects with `?heartbeat=4` in its AMQP URL (the knob the README names), so either way
//! the job is requeued within seconds; the test prints how many connections the node closed for missed
//! heartbeats (the other freezes ended by the consumer timeout).

mod common;

use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use common::faults::{poll_until, spawn_dispatcher, spawn_worker, RabbitNode, Tally};
use common::EventLog;
use fleet::events::EventKind;
use fleet::job::EndpointKind;
use serde_json::{json, Value};

const ROUNDS: usize = 3;
/// Per round: one job that runs when the worker is frozen, one waiting behind it.
const JOBS_PER_ROUND: usize = 2;
/// The node's consumer timeout and how often channels check it (`rabbit` application settings).
const ADVANCED_CONFIG: &str =
    "[{rabbit, [{consumer_timeout, 3000}, {channel_tick_interval, 500}]}].\n";
/// Generous bound on a step of tiny CPU jobs on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

fn signal(pid: u32, sig: &str) {
    let status = StdCommand::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

async fn submit(client: &reqwest::Client, base: &str, prompt: &str) -> String {
    let (status, _, body) = common::http::send(
        client
            .post(format!("{base}/local/sana"))
            // Long enough on the tiny checkpoints that the freeze lands while it runs.
            .json(&json!({"prompt": prompt, "image_size": "square_hd", "num_inference_steps": 40})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["request_id"].as_str().expect("request_id").to_string()
}

async fn status(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let (_, _, body) =
        common::http::send(client.get(format!("{base}/local/sana/requests/{id}/status"))).await;
    body
}

/// The worker's heartbeat (seconds): the broker closes a frozen worker's connection after missing it.
const HEARTBEAT: u32 = 4;

#[tokio::test]
async fn worker_stopped_past_the_consumer_timeout_fault() {
    let node = RabbitNode::start_with_advanced(Some(ADVANCED_CONFIG)).await;
    let url = node.url();
    let conn = fleet::queue::connect(&url)
        .await
        .expect("connect to the test node");
    let topology = common::fresh_topology(&conn).await;
    let s3 = common::s3_config();
    let worker_url = format!("{url}?heartbeat={HEARTBEAT}");
    let mut worker = spawn_worker(
        &worker_url,
        &topology,
        &s3,
        "w-stop",
        &["--retry-backoff-ms", "0"],
    );
    let pid = worker.id().expect("worker pid");
    let (mut dispatcher, base) = spawn_dispatcher(&url, &topology).await;
    let client = reqwest::Client::new();
    common::http::wait_ready(&client, &base).await;
    let job_queue = topology.job_queue(EndpointKind::Base);

    let mut accepted = Vec::new();

    // The test reads no stream while the worker is frozen: a stream consumer that leaves deliveries
    // unacknowledged past the consumer timeout loses its channel too. Progress comes from the dispatcher.
    let mut frozen_mid_run = 0usize;
    let mut frozen_for = Vec::new();
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for j in 0..JOBS_PER_ROUND {
            ids.push(submit(&client, &base, &format!("frozen {round}.{j}")).await);
        }
        let running = ids[0].clone();
        poll_until(WAIT, "the round's first job to start", || {
            let (client, base, id) = (client.clone(), base.clone(), running.clone());
            async move { status(&client, &base, &id).await["status"] == "IN_PROGRESS" }
        })
        .await;
        signal(pid, "-STOP");
        let stopped = Instant::now();
        // The broker gives up on the frozen consumer: both jobs of the round are ready again.
        poll_until(
            WAIT,
            "the consumer timeout to requeue the running job",
            || {
                let ready = node.messages_ready(&job_queue);
                async move { ready == Some(JOBS_PER_ROUND as u64) }
            },
        )
        .await;
        frozen_for.push(stopped.elapsed());
        if status(&client, &base, &running).await["status"] == "IN_PROGRESS" {
            frozen_mid_run += 1;
        }
        signal(pid, "-CONT");
        accepted.extend(ids);
    }
    let mut log = EventLog::open(&conn, &topology).await;
    for id in &accepted {
        log.terminal(id, WAIT).await;
    }
    // A late duplicate would sit after the terminal events read so far.
    log.read_to_end(&conn, &topology, WAIT).await;
    for id in &accepted {
        let (client, base, id2) = (client.clone(), base.clone(), id.clone());
        poll_until(WAIT, &format!("{id} COMPLETED in the dispatcher"), || {
            let (client, base, id) = (client.clone(), base.clone(), id2.clone());
            async move { status(&client, &base, &id).await["status"] == "COMPLETED" }
        })
        .await;
    }

    let tally = Tally::count(&accepted, &log.seen, &s3, EndpointKind::Base, 1).await;
    let generations: usize = accepted
        .iter()
        .map(|id| log.count(id, EventKind::Started))
        .sum();
    let log = node.log_text().to_lowercase();
    let missed_heartbeats = log.matches("missed heartbeats").count();
    tally.print(
        "worker_sigstop",
        &format!(
            "rounds={ROUNDS} frozen_mid_run={frozen_mid_run} generations={generations} frozen_for={:?} heartbeat={HEARTBEAT}s connections_closed_for_missed_heartbeats={missed_heartbeats}",
            frozen_for
                .iter()
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .collect::<Vec<_>>()
        ),
    );
    assert_eq!(
        frozen_mid_run, ROUNDS,
        "every freeze must land while a job runs"
    );
    assert_eq!(tally.accepted, ROUNDS * JOBS_PER_ROUND);
    assert_eq!(
        (tally.lost, tally.duplicated, tally.failed),
        (0, 0, 0),
        "{tally:?}"
    );
    assert_eq!(tally.completed, ROUNDS * JOBS_PER_ROUND);
    assert!(
        worker.try_wait().expect("poll worker").is_none(),
        "worker exited"
    );
    assert!(
        dispatcher.try_wait().expect("poll dispatcher").is_none(),
        "dispatcher exited"
    );
    let _ = worker.kill().await;
    let _ = dispatcher.kill().await;
    common::drop_topology(&conn, &topology).await;
}
