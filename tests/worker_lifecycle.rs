//! Worker lifecycle on the real RabbitMQ and S3, with the REAL tiny Sana pipelines and NSFW checker
//! (`tests/common/realpipe.rs`): keep-alive `exit` (the runtime returns `Idle`, the binary exits 0) and
//! `unload` (the real pipelines and checker freed, loaded again by the real factory for the next job), the
//! prefetch cap on concurrently running jobs counted from `started`/`completed` events, and the shutdown
//! drain letting an in-flight job finish.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::realpipe::{Freed, Gate, ObservedFactory, Probe};
use common::{EventLog, RunningWorker};
use fleet::events::EventKind;
use fleet::job::EndpointKind;
use fleet::queue::{self, Publisher};
use fleet_worker::{IdleAction, WorkerExit};
use serde_json::json;

/// Generous bound for a few tiny CPU jobs on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(120);

fn small_job() -> fleet::events::JobMessage {
    common::job(
        EndpointKind::Sprint,
        json!({"prompt": "x", "image_size": {"width": 64, "height": 48}}),
    )
}

#[tokio::test]
async fn idle_worker_exits_after_keep_alive() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let mut config = common::worker_config(&topology, "w-idle-exit", common::s3_config());
    config.keep_alive = Some(Duration::from_millis(1500));
    config.idle_action = IdleAction::Exit;
    let worker = RunningWorker::spawn(config, ObservedFactory::boxed(probe, None));
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let job = small_job();
    publisher.publish_job(&job).await.expect("publish");
    assert_eq!(
        log.terminal(&job.request_id, WAIT).await.kind(),
        EventKind::Completed
    );
    assert_eq!(
        worker.join(WAIT).await,
        WorkerExit::Idle,
        "returns on its own once idle"
    );
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn idle_worker_unloads_and_reloads_for_the_next_job() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, mut freed) = Probe::new();
    let mut config = common::worker_config(&topology, "w-idle-unload", common::s3_config());
    config.keep_alive = Some(Duration::from_millis(1000));
    config.idle_action = IdleAction::Unload;
    let worker = RunningWorker::spawn(config, ObservedFactory::boxed(probe.clone(), None));

    // An unload frees the real pipeline set (both endpoints, one shared text encoder) and the checker.
    let mut gone = Vec::new();
    for _ in 0..2 {
        gone.push(
            tokio::time::timeout(WAIT, freed.recv())
                .await
                .expect("models unloaded in time")
                .expect("probe open"),
        );
    }
    gone.sort();
    assert_eq!(gone, [Freed::Pipelines, Freed::Checker]);
    assert_eq!(probe.loads.load(Ordering::SeqCst), 1);
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let job = small_job();
    publisher.publish_job(&job).await.expect("publish");
    assert_eq!(
        log.terminal(&job.request_id, WAIT).await.kind(),
        EventKind::Completed
    );
    assert_eq!(
        probe.loads.load(Ordering::SeqCst),
        2,
        "the job loaded the models again"
    );
    assert_eq!(probe.runs.load(Ordering::SeqCst), 1);
    assert!(
        !worker.handle.is_finished(),
        "an unloading worker keeps running"
    );
    assert_eq!(worker.stop(WAIT).await, WorkerExit::Shutdown);
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn prefetch_caps_concurrent_jobs() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let gate = Gate::closed();
    let mut config = common::worker_config(&topology, "w-prefetch", common::s3_config());
    config.endpoints = vec![EndpointKind::Sprint];
    config.max_concurrency = 2;
    let worker = RunningWorker::spawn(
        config,
        ObservedFactory::boxed(probe.clone(), Some(gate.clone())),
    );
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let jobs: Vec<_> = (0..5).map(|_| small_job()).collect();
    for job in &jobs {
        publisher.publish_job(job).await.expect("publish");
    }
    // The gate holds the model thread on the first job; with prefetch 2 the worker holds one more
    // (waiting for the model thread, so not yet `started`) and the other three stay in the queue.
    gate.wait_arrived(1, WAIT).await;
    let ch = conn.create_channel().await.expect("channel");
    let queue = topology.job_queue(EndpointKind::Sprint);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut ready = jobs.len() as u32;
    while ready > 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second job was never delivered"
        );
        tokio::task::yield_now().await;
        ready = fleet::queue::queue_depth(&ch, &queue).await.expect("depth");
    }
    assert_eq!(
        ready, 3,
        "max_concurrency = 2 deliveries in flight, never more"
    );
    assert_eq!(
        log.wait_for(WAIT, "the first started job", |e| e.kind()
            == EventKind::Started)
            .await
            .kind(),
        EventKind::Started
    );
    // The two in-flight jobs may reach the model thread in either order: count completions, not ids.
    for done in 1..=jobs.len() {
        gate.release(1);
        log.wait_count(WAIT, "one more completed job", done, |e| {
            e.kind() == EventKind::Completed
        })
        .await;
    }
    // `started` is published when the model thread takes a job up: at most two are open at once (the
    // one uploading and the next generating), never more.
    let mut running: HashMap<String, i32> = HashMap::new();
    let mut peak = 0;
    for (_, e) in &log.seen {
        let worker = e.worker().unwrap_or_default().to_string();
        match e.kind() {
            EventKind::Started => *running.entry(worker.clone()).or_default() += 1,
            EventKind::Completed | EventKind::Failed => {
                *running.entry(worker.clone()).or_default() -= 1
            }
            _ => {}
        }
        peak = peak.max(running.get(&worker).copied().unwrap_or(0));
    }
    assert!(
        (1..=2).contains(&peak),
        "at most max_concurrency = 2 jobs open at once, got {peak}"
    );
    assert!(jobs
        .iter()
        .all(|j| log.count(&j.request_id, EventKind::Completed) == 1));
    assert_eq!(probe.runs.load(Ordering::SeqCst), jobs.len());
    worker.stop(WAIT).await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn shutdown_drains_the_job_in_flight() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let gate = Gate::closed();
    let mut config = common::worker_config(&topology, "w-drain", common::s3_config());
    config.drain_grace = Duration::from_secs(30);
    let worker = RunningWorker::spawn(config, ObservedFactory::boxed(probe, Some(gate.clone())));
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let (first, second) = (small_job(), small_job());
    publisher.publish_job(&first).await.expect("publish");
    publisher.publish_job(&second).await.expect("publish");
    log.wait_for(WAIT, "the first job to start", |e| {
        e.request_id == first.request_id && e.kind() == EventKind::Started
    })
    .await;
    worker.shutdown.cancel();
    gate.open();
    assert_eq!(worker.join(WAIT).await, WorkerExit::Shutdown);
    assert_eq!(
        log.terminal(&first.request_id, WAIT).await.kind(),
        EventKind::Completed,
        "in-flight job finished"
    );
    let ch = conn.create_channel().await.expect("channel");
    let left = queue::queue_depth(&ch, &topology.job_queue(EndpointKind::Sprint))
        .await
        .expect("depth");
    assert_eq!(left, 1, "the job not yet started stays queued");
    assert_eq!(log.count(&second.request_id, EventKind::Started), 0);
    common::drop_topology(&conn, &topology).await;
}
