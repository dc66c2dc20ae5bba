//! Worker failure paths on the real RabbitMQ and S3, with the REAL tiny Sana pipelines and NSFW checker
//! (`tests/common/realpipe.rs`): an always-failing job (its upload fails after every real generation) is
//! retried up to the delivery limit and then dead-lettered with one `failed` event (billing 0); requests
//! that already ended are skipped (dedupe on `request_id` through the results stream) and never reach the
//! pipeline; a passed deadline fails with `request_timeout`; a `cancelled` event stops a job that is in
//! the middle of its real denoising loop, between steps.

mod common;

use std::time::Duration;

use common::realpipe::{Gate, ObservedFactory, Probe};
use common::{EventLog, RunningWorker};
use fleet::events::{Completed, ErrorType, Event, EventBody, EventKind};
use fleet::job::EndpointKind;
use fleet::queue::{self, Publisher};
use futures::StreamExt;
use lapin::options::BasicAckOptions;
use serde_json::json;

/// Generous bound for a few tiny CPU jobs on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn always_failing_job_is_dead_lettered_after_the_delivery_limit() {
    let mut storage = common::s3_config();
    storage.bucket = format!("no-such-bucket-{}", uuid::Uuid::new_v4().simple());
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let dead_ch = conn.create_channel().await.expect("channel");
    let mut dead = queue::consume(&dead_ch, &topology.dead_queue(), "dead-watch", 10)
        .await
        .expect("consume dead");
    let (probe, _freed) = Probe::new();
    let worker = RunningWorker::spawn(
        common::worker_config(&topology, "w-failing", storage),
        ObservedFactory::boxed(probe.clone(), None),
    );
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let job = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "never stored", "image_size": "square"}),
    );
    publisher.publish_job(&job).await.expect("publish");

    let failed = log.terminal(&job.request_id, WAIT).await;
    assert_eq!(failed.kind(), EventKind::Failed, "{failed:?}");
    assert_eq!(failed.billable_units(), Some(0));
    assert_eq!(failed.error_type(), Some(ErrorType::StorageError));

    let delivery = tokio::time::timeout(WAIT, dead.next())
        .await
        .expect("dead-lettered in time")
        .expect("consumer open")
        .expect("delivery");
    let dead_job: fleet::events::JobMessage =
        serde_json::from_slice(&delivery.data).expect("job body");
    assert_eq!(dead_job.request_id, job.request_id);
    delivery.ack(BasicAckOptions::default()).await.expect("ack");

    // `failed` follows every `started` in the stream, so the log already holds all attempts.
    let attempts: Vec<u32> = log
        .of(&job.request_id)
        .iter()
        .filter(|e| e.kind() == EventKind::Started)
        .filter_map(|e| e.attempt())
        .collect();
    let limit = topology.delivery_limit;
    assert_eq!(
        attempts,
        (1..=limit + 1).collect::<Vec<_>>(),
        "delivery_limit + 1 attempts, then dead letter"
    );
    assert_eq!(log.count(&job.request_id, EventKind::Failed), 1);
    assert_eq!(log.count(&job.request_id, EventKind::Completed), 0);
    worker.stop(WAIT).await;
    assert_eq!(
        probe.runs.load(std::sync::atomic::Ordering::SeqCst),
        attempts.len(),
        "every attempt generated with the real pipeline and failed at the upload"
    );
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn ended_requests_are_skipped_and_late_ones_time_out() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    // One job at a time, so the queue is worked in order: when the last job completes, the others are settled.
    let worker = RunningWorker::spawn(
        common::worker_config(&topology, "w-dedupe", common::s3_config()),
        ObservedFactory::boxed(probe.clone(), None),
    );
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;

    let input = json!({"prompt": "x", "image_size": "square"});
    let done_before = common::job(EndpointKind::Sprint, input.clone());
    let cancelled_before = common::job(EndpointKind::Sprint, input.clone());
    let mut late = common::job(EndpointKind::Sprint, input.clone());
    late.deadline = Some(fleet::events::now_unix() - 10.0);
    let fresh = common::job(EndpointKind::Sprint, input);

    // A worker that completed but died before its ack, and a dispatcher that cancelled a queued request.
    let completed = Event::new(
        &done_before.request_id,
        EndpointKind::Sprint,
        EventBody::Completed(Completed {
            worker: "gone".into(),
            attempt: 1,
            result: json!({}),
            billable_units: 1,
            inference_time: 0.0,
        }),
    );
    publisher.publish_event(&completed).await.expect("event");
    let cancelled = Event::cancelled(&cancelled_before.request_id, EndpointKind::Sprint);
    publisher.publish_event(&cancelled).await.expect("event");
    for job in [&done_before, &cancelled_before, &late, &fresh] {
        publisher.publish_job(job).await.expect("publish");
    }

    let last = log.terminal(&fresh.request_id, WAIT).await;
    assert_eq!(last.kind(), EventKind::Completed);
    let timed_out = log.terminal(&late.request_id, WAIT).await;
    assert_eq!(
        (timed_out.kind(), timed_out.error_type()),
        (EventKind::Failed, Some(ErrorType::RequestTimeout))
    );
    assert_eq!(timed_out.billable_units(), Some(0));
    for skipped in [&done_before, &cancelled_before, &late] {
        assert_eq!(
            log.count(&skipped.request_id, EventKind::Started),
            0,
            "{} must not run",
            skipped.request_id
        );
    }
    assert_eq!(
        log.count(&done_before.request_id, EventKind::Completed),
        1,
        "no second completion"
    );
    assert_eq!(
        probe.runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the fresh job reached the pipeline"
    );
    worker.stop(WAIT).await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn a_cancelled_event_stops_a_running_job_between_steps() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let gate = Gate::closed();
    let mut config = common::worker_config(&topology, "w-cancel", common::s3_config());
    config.max_concurrency = 2;
    let worker = RunningWorker::spawn(
        config,
        ObservedFactory::boxed(probe.clone(), Some(gate.clone())),
    );
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;

    let running = common::job(
        EndpointKind::Base,
        json!({"prompt": "long", "image_size": "square", "num_inference_steps": 5}),
    );
    publisher.publish_job(&running).await.expect("publish");
    log.wait_for(WAIT, "the first job to start", |e| {
        e.request_id == running.request_id && e.kind() == EventKind::Started
    })
    .await;
    // The real pipeline has computed step 1 of 5 and is held before reporting it.
    gate.wait_arrived(1, WAIT).await;
    let cancel = Event::cancelled(&running.request_id, EndpointKind::Base);
    publisher
        .publish_event(&cancel)
        .await
        .expect("cancel event");
    // A redelivery of the cancelled job takes the worker's second slot; the worker acks it without
    // running once its tracker read past the cancellation (its sync marker follows it in the stream),
    // which cancels the first job's token. Only then is the slot free for the next job, so once the next
    // job has left the queue the token is cancelled, before the gate opens. (`started` is no signal
    // here: it is published only when the model thread, held by the first job, takes a job up.)
    publisher
        .publish_job(&running)
        .await
        .expect("publish duplicate");
    let next = common::job(
        EndpointKind::Base,
        json!({"prompt": "short", "image_size": "square", "num_inference_steps": 2}),
    );
    publisher.publish_job(&next).await.expect("publish");
    let depth_ch = conn.create_channel().await.expect("channel");
    let deadline = tokio::time::Instant::now() + WAIT;
    while queue::queue_depth(&depth_ch, &topology.job_queue(EndpointKind::Base))
        .await
        .expect("depth")
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the next job was never delivered"
        );
        tokio::task::yield_now().await;
    }
    gate.open();

    // One model thread: the first job ran (and stopped) before the second one completes.
    assert_eq!(
        log.terminal(&next.request_id, WAIT).await.kind(),
        EventKind::Completed
    );
    assert_eq!(
        log.count(&running.request_id, EventKind::Completed),
        0,
        "the cancelled job produced no result"
    );
    assert_eq!(log.count(&running.request_id, EventKind::Failed), 0);
    assert!(
        log.count(&running.request_id, EventKind::Progress) <= 1,
        "stopped after at most one step"
    );
    assert_eq!(
        probe.runs.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the cancelled job was inside the real pipeline, the next one ran after it"
    );
    let ch = conn.create_channel().await.expect("channel");
    worker.stop(WAIT).await;
    let left = queue::queue_depth(&ch, &topology.job_queue(EndpointKind::Base))
        .await
        .expect("depth");
    assert_eq!(left, 0, "the cancelled job was acked, not requeued");
    common::drop_topology(&conn, &topology).await;
}

/// A request whose images would not fit the worker's image-memory budget fails at once with
/// `validation_error` (no generation run, no retry); one within the budget completes.
#[tokio::test]
async fn a_request_over_the_image_memory_budget_fails_before_generating() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let mut config = common::worker_config(&topology, "w-budget", common::s3_config());
    // 1 MiB: 512×512 needs 3·512·512·2 = 1.5 MiB (over); 256×256 needs 384 KiB (under).
    config.image_memory_budget = 1 << 20;
    let worker = RunningWorker::spawn(config, ObservedFactory::boxed(probe.clone(), None));
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let big = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "too big", "image_size": {"width": 512, "height": 512}}),
    );
    publisher.publish_job(&big).await.expect("publish");
    let failed = log.terminal(&big.request_id, WAIT).await;
    assert_eq!(
        failed.error_type(),
        Some(ErrorType::ValidationError),
        "{failed:?}"
    );
    let EventBody::Failed(failure) = &failed.body else {
        panic!("not a failure: {failed:?}");
    };
    assert!(
        failure.error.contains("need 2 MiB") && failure.error.contains("allows 1 MiB"),
        "{}",
        failure.error
    );
    assert_eq!(log.count(&big.request_id, EventKind::Started), 0);
    assert_eq!(probe.runs.load(std::sync::atomic::Ordering::SeqCst), 0);

    let small = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "fits", "image_size": {"width": 256, "height": 256}}),
    );
    publisher.publish_job(&small).await.expect("publish");
    let done = log.terminal(&small.request_id, WAIT).await;
    assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
    worker.stop(WAIT).await;
}
