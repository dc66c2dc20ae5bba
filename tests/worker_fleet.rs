//! `worker fleet` (the supervisor) as a process over CPU slots, its `worker serve` children on the tiny
//! checkpoints, against the real RabbitMQ and S3: a burst scales 0 → max and never above while every job
//! completes exactly once, then back to 0 after keep-alive with every worker drained; a worker that
//! never got a job is reaped after 10 s although keep-alive is long; a worker that cannot start (bad model
//! path) is retried with a growing backoff, and the requests waiting for it (submitted through a real
//! dispatcher) show the failure in their status `logs`; `--concurrency-buffer 1` keeps one warm worker at
//! zero demand (past the 10 s reap) and one beside a running job; `--scaling-delay` holds a start back
//! until the job has waited that long; SIGTERM to the supervisor with two jobs in flight finishes each
//! exactly once and leaves the job no worker took on its queue.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::fleetproc::{
    alive, decisions, metrics, model_args, spawn_fleet, spawn_fleet_with, value, workers,
};
use common::workerproc;
use common::EventLog;
use fleet::events::EventKind;
use fleet::job::EndpointKind;
use fleet::queue::Publisher;
use fleet_worker::scaling::NEVER_USED_REAP;
use lapin::options::QueuePurgeOptions;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(240);

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

/// A long base job: many steps and images, so a worker is busy with it over several supervisor ticks.
fn long_job(prompt: &str) -> fleet::events::JobMessage {
    common::job(
        EndpointKind::Base,
        json!({"prompt": prompt, "image_size": "square_hd", "num_images": 4, "num_inference_steps": 50}),
    )
}

#[tokio::test]
async fn a_buffer_keeps_that_many_warm_workers_beyond_demand_even_at_zero() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    // min 0, buffer 1: one warm worker with nothing to do; demand 1 asks for 1 + 1.
    let mut fleet = spawn_fleet(
        &topology,
        &[
            "--cpu-slots",
            "3",
            "--concurrency-buffer",
            "1",
            "--keep-alive",
            "600s",
        ],
        &["--drain-grace", "600"],
    );
    let addr = workerproc::http_addr(&mut fleet, WAIT).await;
    let (_, warm) = workerproc::wait_http(addr, "/metrics", WAIT, "one warm worker", |_, t| {
        workers(t, "idle") == 1.0
    })
    .await;
    let ready_at = Instant::now();
    assert_eq!(
        value(&warm, "fleet_supervisor_demand_jobs{kind=\"waiting\"}"),
        0.0
    );
    assert_eq!(
        value(&warm, "fleet_supervisor_demand_jobs{kind=\"running\"}"),
        0.0
    );
    assert_eq!(value(&warm, "fleet_supervisor_target_workers"), 1.0);
    assert_eq!(alive(&warm), 1.0, "the buffer, no more: {warm}");
    // Kept although it never got a job: the 10 s reap of unused workers is only for min = buffer = 0.
    let window = NEVER_USED_REAP + Duration::from_secs(3);
    while ready_at.elapsed() < window {
        let t = metrics(addr).await;
        assert_eq!(alive(&t), 1.0, "{:?} after ready: {t}", ready_at.elapsed());
        assert_eq!(decisions(&t, "stop"), 0.0, "{t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Demand 1: the warm worker takes the job at once, and the buffer asks for one more beside it.
    let job = long_job("a buffered fox");
    let published = Instant::now();
    publisher.publish_job(&job).await.expect("publish");
    let (_, both) = workerproc::wait_http(addr, "/metrics", WAIT, "job + buffer", |_, t| {
        workers(t, "busy") == 1.0 && alive(t) == 2.0
    })
    .await;
    assert_eq!(
        value(&both, "fleet_supervisor_target_workers"),
        2.0,
        "{both}"
    );
    assert_eq!(decisions(&both, "start"), 2.0, "{both}");
    eprintln!(
        "job + buffer seen {:?} after the publish",
        published.elapsed()
    );
    log.terminal(&job.request_id, WAIT).await;
    eprintln!("the job ended {:?} after the publish", published.elapsed());
    assert_eq!(log.count(&job.request_id, EventKind::Completed), 1);
    // Demand 0 again: the target falls back to the buffer, and both stay warm (keep-alive 600 s).
    let (_, after) = workerproc::wait_http(addr, "/metrics", WAIT, "two warm workers", |_, t| {
        workers(t, "idle") == 2.0 && value(t, "fleet_supervisor_target_workers") == 1.0
    })
    .await;
    assert_eq!(alive(&after), 2.0, "never more than job + buffer: {after}");
    assert_eq!(decisions(&after, "start"), 2.0, "{after}");
    assert_eq!(value(&after, "fleet_supervisor_start_failures_total"), 0.0);

    workerproc::signal(&fleet, "-TERM");
    assert!(workerproc::wait_exit(&mut fleet, WAIT).await.success());
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn scaling_delay_holds_a_new_worker_until_a_request_has_waited_that_long() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let delay = Duration::from_secs(4);
    let mut fleet = spawn_fleet(
        &topology,
        &[
            "--cpu-slots",
            "1",
            "--scaling-delay",
            "4s",
            "--keep-alive",
            "600s",
        ],
        &[],
    );
    let addr = workerproc::http_addr(&mut fleet, WAIT).await;
    workerproc::wait_http(addr, "/metrics", WAIT, "a first decision", |_, t| {
        t.contains("fleet_supervisor_demand_jobs{kind=\"waiting\"} 0")
    })
    .await;
    // Taken before the publish: the job cannot have waited longer than this.
    let published = Instant::now();
    let job = common::job(EndpointKind::Sprint, json!({"prompt": "a patient fox"}));
    publisher.publish_job(&job).await.expect("publish");
    // Until a worker appears, every answer must show no worker; at least one must show the supervisor
    // seeing the waiting job and holding the start back (target 0).
    let deadline = Instant::now() + WAIT;
    let mut held = false;
    let started_after = loop {
        let t = metrics(addr).await;
        if alive(&t) > 0.0 {
            break published.elapsed();
        }
        held |= value(&t, "fleet_supervisor_demand_jobs{kind=\"waiting\"}") == 1.0
            && value(&t, "fleet_supervisor_target_workers") == 0.0;
        assert!(Instant::now() < deadline, "no worker within {WAIT:?}: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("worker started {started_after:?} after the publish (scaling delay {delay:?})");
    assert!(
        held,
        "the supervisor never showed the job waiting with target 0"
    );
    assert!(
        started_after >= delay,
        "a worker started {started_after:?} after the job was queued, before the {delay:?} delay"
    );
    assert!(
        started_after < delay + Duration::from_secs(20),
        "a worker started only {started_after:?} after the job was queued"
    );
    assert_eq!(
        log.terminal(&job.request_id, WAIT).await.kind(),
        EventKind::Completed
    );
    assert_eq!(log.count(&job.request_id, EventKind::Completed), 1);
    workerproc::signal(&fleet, "-TERM");
    assert!(workerproc::wait_exit(&mut fleet, WAIT).await.success());
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn scale_down_with_jobs_in_flight_finishes_each_once_and_leaves_the_rest_queued() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let mut fleet = spawn_fleet(
        &topology,
        &[
            "--cpu-slots",
            "2",
            "--max-workers",
            "2",
            "--keep-alive",
            "600s",
        ],
        &["--drain-grace", "600"],
    );
    let addr = workerproc::http_addr(&mut fleet, WAIT).await;
    let jobs: Vec<_> = (0..3)
        .map(|i| long_job(&format!("in flight {i}")))
        .collect();
    for job in &jobs {
        publisher.publish_job(job).await.expect("publish");
    }
    // Both workers busy, the third job waiting: scale everything down now (SIGTERM to the supervisor).
    workerproc::wait_http(addr, "/metrics", WAIT, "two busy workers", |_, t| {
        workers(t, "busy") == 2.0
    })
    .await;
    workerproc::signal(&fleet, "-TERM");
    assert!(workerproc::wait_exit(&mut fleet, WAIT).await.success());
    // Every job a worker had started ends in exactly one `completed`, none failed or ran twice. (Two
    // were in flight at the SIGTERM; a third only if a worker finished one before its peer was ready.)
    log.wait_count(WAIT, "the in-flight jobs finishing", 2, |e| {
        e.kind() == EventKind::Completed
    })
    .await;
    let started: Vec<_> = jobs
        .iter()
        .filter(|j| log.count(&j.request_id, EventKind::Started) > 0)
        .collect();
    assert!(started.len() >= 2, "two jobs were in flight");
    eprintln!("{} of {} jobs started", started.len(), jobs.len());
    for job in &started {
        let id = &job.request_id;
        let end = log.terminal(id, WAIT).await;
        assert_eq!(end.kind(), EventKind::Completed, "{id}: {end:?}");
        assert_eq!(log.count(id, EventKind::Started), 1, "{id} started once");
        assert_eq!(
            log.count(id, EventKind::Completed),
            1,
            "{id} completed once"
        );
        assert_eq!(log.count(id, EventKind::Failed), 0, "{id}");
    }
    // The jobs no worker had taken are still on their queue: none lost, none started.
    let queued = common::http::jobs_enqueued(&conn, &topology).await;
    assert_eq!(
        queued as usize,
        jobs.len() - started.len(),
        "{} started",
        started.len()
    );
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn a_worker_that_cannot_start_shows_in_the_waiting_requests_logs() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let dispatcher = common::http::Spawned::start(&topology, &[]).await;
    let client = reqwest::Client::new();
    common::http::wait_ready(&client, &dispatcher.base).await;
    // One slot whose worker cannot load its models; a long backoff, so one failure in this test.
    let mut fleet = spawn_fleet_with(
        &topology,
        &["--cpu-slots", "1", "--start-backoff-ms", "600000"],
        &model_args(&workerproc::empty_dir()),
    );
    let addr = workerproc::http_addr(&mut fleet, WAIT).await;
    let submitted = common::http::submit(
        &client,
        &dispatcher.base,
        "/sprint",
        json!({"prompt": "a fox nobody can draw"}),
    )
    .await;
    let status_url = format!(
        "{}?logs=1",
        submitted["status_url"].as_str().expect("status_url")
    );
    let deadline = Instant::now() + WAIT;
    let (status, line) = loop {
        let (code, _, body) = common::http::send(client.get(&status_url)).await;
        assert!(code == 200 || code == 202, "status {code}: {body}");
        let failed = body["logs"].as_array().and_then(|logs| {
            logs.iter()
                .find(|l| {
                    l["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("worker failed to start"))
                })
                .cloned()
        });
        if let Some(line) = failed {
            break (body["status"].clone(), line);
        }
        assert!(
            Instant::now() < deadline,
            "no start failure in the logs within {WAIT:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, "IN_QUEUE", "the request keeps waiting for a worker");
    assert_eq!(line["level"], "ERROR", "{line}");
    let message = line["message"].as_str().expect("message");
    assert!(
        message.contains("its models could not be loaded"),
        "{message}"
    );
    assert!(message.contains("start failure 1 in a row"), "{message}");
    let text = metrics(addr).await;
    assert_eq!(
        value(&text, "fleet_supervisor_start_failures_total"),
        1.0,
        "{text}"
    );
    workerproc::signal(&fleet, "-TERM");
    assert!(workerproc::wait_exit(&mut fleet, WAIT).await.success());
    drop(dispatcher);
    common::drop_topology(&conn, &topology).await;
}
