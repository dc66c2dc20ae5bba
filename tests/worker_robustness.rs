//! Issue 10, worker side, on the real RabbitMQ and S3 with the REAL tiny pipelines: a panic on the model
//! thread fails only its own job, once (no retries of a bug), and the worker serves the next job; a
//! custom size whose resize used to underflow (944×256) completes at exactly that size.

mod common;

use std::time::Duration;

use common::realpipe::{Gate, ObservedFactory, Probe, PANIC_PROMPT};
use common::{EventLog, RunningWorker};
use fleet::events::{ErrorType, EventKind};
use fleet::job::EndpointKind;
use fleet::queue::Publisher;
use serde_json::json;

/// Generous bound for a few tiny CPU jobs on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_model_panic_fails_only_its_job_and_944x256_completes() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let worker = RunningWorker::spawn(
        common::worker_config(&topology, "w-robust", common::s3_config()),
        ObservedFactory::boxed(probe.clone(), None),
    );
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;

    let bad = common::job(
        EndpointKind::Sprint,
        json!({"prompt": PANIC_PROMPT, "image_size": "square"}),
    );
    publisher.publish_job(&bad).await.expect("publish");
    let failed = log.terminal(&bad.request_id, WAIT).await;
    assert_eq!(failed.kind(), EventKind::Failed, "{failed:?}");
    assert_eq!(failed.error_type(), Some(ErrorType::RunnerServerError));
    assert_eq!(failed.billable_units(), Some(0));
    assert_eq!(
        log.count(&bad.request_id, EventKind::Started),
        1,
        "a panic is not retried"
    );

    // The same worker serves on, at a size that used to panic in resize_and_crop.
    let odd = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "a fox", "image_size": {"width": 944, "height": 256}}),
    );
    publisher.publish_job(&odd).await.expect("publish");
    let done = log.terminal(&odd.request_id, WAIT).await;
    assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
    let image = &done.result().expect("result")["images"][0];
    assert_eq!(
        (image["width"].as_u64(), image["height"].as_u64()),
        (Some(944), Some(256))
    );
    assert_eq!(log.count(&odd.request_id, EventKind::Started), 1);
    worker.stop(WAIT).await;
    assert_eq!(
        probe.runs.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one run each"
    );
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn started_is_published_when_the_model_thread_takes_the_job() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let gate = Gate::closed();
    let mut config = common::worker_config(&topology, "w-started", common::s3_config());
    config.max_concurrency = 2;
    let worker = RunningWorker::spawn(config, ObservedFactory::boxed(probe, Some(gate.clone())));
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let first = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "first", "image_size": "square"}),
    );
    let second = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "second", "image_size": "square"}),
    );
    publisher.publish_job(&first).await.expect("publish");
    // The first job holds the model thread inside its first step.
    gate.wait_arrived(1, WAIT).await;
    publisher.publish_job(&second).await.expect("publish");
    // The second is delivered to the same worker (prefetch 2) and waits behind the first.
    let ch = conn.create_channel().await.expect("channel");
    let deadline = tokio::time::Instant::now() + WAIT;
    while fleet::queue::queue_depth(&ch, &topology.job_queue(EndpointKind::Sprint))
        .await
        .expect("depth")
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "second job never delivered"
        );
        tokio::task::yield_now().await;
    }
    // Read the stream up to a sentinel published now: the worker took the second job before it.
    let sentinel = fleet::events::Event::cancelled("sentinel-started", EndpointKind::Base);
    publisher.publish_event(&sentinel).await.expect("sentinel");
    log.terminal("sentinel-started", WAIT).await;
    assert_eq!(log.count(&first.request_id, EventKind::Started), 1);
    assert_eq!(
        log.count(&second.request_id, EventKind::Started),
        0,
        "a job waiting behind another must stay IN_QUEUE"
    );
    gate.open();
    for job in [&first, &second] {
        let done = log.terminal(&job.request_id, WAIT).await;
        assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
        assert_eq!(log.count(&job.request_id, EventKind::Started), 1);
    }
    worker.stop(WAIT).await;
    common::drop_topology(&conn, &topology).await;
}
