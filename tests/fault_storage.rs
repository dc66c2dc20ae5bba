//! Fault: the object store goes away mid-burst. The real `worker` binary uploads to a Garage node of the
//! test's own, which the test kills and starts again on the same ports and data (the shared Garage is
//! never touched), twice, 30 s each time. Uploads are retried with backoff while the encoded images wait in memory: every
//! accepted request completes exactly once, each generated once (one `started` each), with one set of
//! objects. A store that stays away longer than `upload_retry_for` fails the job with `storage_error`,
//! after one generation.

mod common;

use std::time::{Duration, Instant};

use common::faults::{secs, spawn_worker, GarageNode, Tally};
use common::realpipe::{ObservedFactory, Probe};
use common::{EventLog, RunningWorker};
use fleet::events::{ErrorType, EventKind};
use fleet::job::EndpointKind;
use fleet::queue::Publisher;
use serde_json::json;

/// Outages, each in the middle of its own burst.
const ROUNDS: usize = 2;
/// Requests per round.
const BURST: usize = 6;
/// How long the store stays down.
const OUTAGE: Duration = Duration::from_secs(30);
/// Generous bound for the burst of tiny CPU jobs on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

#[tokio::test]
async fn storage_outage_mid_burst_fault() {
    let mut garage = GarageNode::start().await;
    let s3 = garage.config();
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let mut worker = spawn_worker(
        &common::amqp_url(),
        &topology,
        &s3,
        "w-store",
        &["--upload-retry-for", "120s"],
    );
    let mut accepted = Vec::new();
    let (mut outages, mut done_after, mut during) = (Vec::new(), Vec::new(), 0usize);
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for i in 0..BURST {
            let job = common::job(
                EndpointKind::Sprint,
                json!({"prompt": format!("outage {round}.{i}"), "image_size": {"width": 256, "height": 256}}),
            );
            publisher.publish_job(&job).await.expect("publish job");
            ids.push(job.request_id);
        }
        // The store goes away once the round's first job completed, with the rest queued or in flight.
        log.terminal(&ids[0], WAIT).await;
        garage.down();
        let outage_started = Instant::now();
        // Hold the outage; meanwhile the worker must finish generating but not fail anything.
        while outage_started.elapsed() < OUTAGE {
            assert!(
                worker.try_wait().expect("poll worker").is_none(),
                "worker exited"
            );
            let deadline = OUTAGE.saturating_sub(outage_started.elapsed());
            if let Ok(e) =
                tokio::time::timeout(deadline, log.next_matching(WAIT, "any event", |_| true)).await
            {
                assert_ne!(
                    e.kind(),
                    EventKind::Failed,
                    "nothing fails during the outage: {e:?}"
                );
                during += 1;
            }
        }
        garage.up().await;
        outages.push(outage_started.elapsed());
        let resumed = Instant::now();
        for id in &ids {
            log.terminal(id, WAIT).await;
        }
        done_after.push(resumed.elapsed());
        accepted.extend(ids);
    }
    // Anything published after the terminal events read so far (a duplicate) is read too.
    log.read_to_end(&conn, &topology, WAIT).await;

    let tally = Tally::count(&accepted, &log.seen, &s3, EndpointKind::Sprint, 1).await;
    let generations: usize = accepted
        .iter()
        .map(|id| log.count(id, EventKind::Started))
        .sum();
    tally.print(
        "storage_outage",
        &format!(
            "rounds={ROUNDS} outages={} events_during_outages={during} generations={generations} \
             all_completed_after_store_back={}",
            secs(&outages),
            secs(&done_after)
        ),
    );
    assert_eq!(
        (tally.lost, tally.duplicated, tally.failed),
        (0, 0, 0),
        "{tally:?}"
    );
    assert_eq!(tally.completed, ROUNDS * BURST);
    assert_eq!(
        generations,
        ROUNDS * BURST,
        "each request generated once: the upload is retried, not the job"
    );
    assert!(
        worker.try_wait().expect("poll worker").is_none(),
        "worker exited"
    );
    let _ = worker.kill().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn storage_outage_past_the_retry_window_fails_with_storage_error_fault() {
    // Nothing listens on the endpoint: every upload is refused, as during an outage.
    let mut s3 = common::s3_config();
    s3.endpoint = format!("http://127.0.0.1:{}", common::faults::free_port());
    s3.public_endpoint = Some(s3.endpoint.clone());
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let (probe, _freed) = Probe::new();
    let mut config = common::worker_config(&topology, "w-no-store", s3.clone());
    config.upload_retry_for = Duration::from_secs(3);
    let worker = RunningWorker::spawn(config, ObservedFactory::boxed(probe.clone(), None));
    let job = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "never stored", "image_size": {"width": 256, "height": 256}}),
    );
    publisher.publish_job(&job).await.expect("publish job");
    let started = Instant::now();
    let failed = log.terminal(&job.request_id, WAIT).await;
    let took = started.elapsed();
    assert_eq!(failed.kind(), EventKind::Failed, "{failed:?}");
    assert_eq!(failed.error_type(), Some(ErrorType::StorageError));
    assert_eq!(failed.billable_units(), Some(0));
    assert_eq!(
        log.count(&job.request_id, EventKind::Started),
        1,
        "generated once"
    );
    worker.stop(WAIT).await;
    assert_eq!(probe.runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    let tally = Tally {
        accepted: 1,
        failed: 1,
        failures: [("storage_error".to_string(), 1)].into_iter().collect(),
        ..Tally::default()
    };
    tally.print(
        "storage_gave_up",
        &format!(
            "upload_retry_for=3s terminal_after={:.1}s",
            took.as_secs_f64()
        ),
    );
    common::drop_topology(&conn, &topology).await;
}
