//! Fault: the worker process is SIGKILLed at random points of a burst, under the real `dispatcher` and
//! `worker` binaries on the shared RabbitMQ and Garage (killing a worker stops no server). After each kill
//! a replacement worker (a new worker id) starts, and the quorum queues deliver the killed worker's
//! unacknowledged jobs again. Every accepted request ends in exactly one terminal event with one set of
//! objects, none stays IN_QUEUE/IN_PROGRESS in the dispatcher, and nothing fails.
//!
//! The delivery limit: the job queues have `x-delivery-limit` 3 (`common::test_topology_settings`), and
//! RabbitMQ dead-letters a message on its fourth return (its `x-delivery-count` would exceed 3; the worker
//! reads that count as `attempt - 1`). A kill returns what the worker holds: with prefetch 1 per endpoint
//! queue, one consumer at a time and returned messages going back to the head, that is at most the oldest
//! unacknowledged job of each kind. The test counts, per job, the kills it may have been held at (the two
//! oldest unended jobs of each kind, in case the stream lags a completion behind) and defers a kill that
//! would return any job a fourth time, so no job can legitimately fail on the limit; a `failed` here is a bug.
//!
//! Seeded: `FLEET_TEST_SEED=<n>` replays the delays of a run (the seed is printed).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::faults::{poll_until, spawn_dispatcher, spawn_worker, Tally};
use common::EventLog;
use fleet::events::{Event, EventKind};
use fleet::job::EndpointKind;
use serde_json::{json, Value};

/// Requests in the burst; every `BASE_EVERY`-th is a base request (1024², 40 steps: seconds on the tiny
/// checkpoints, long enough to be hit mid-run), the others 256² sprint requests.
const BURST: usize = 12;
const BASE_EVERY: usize = 4;
/// Worker processes killed, one after the other.
const KILLS: usize = 4;
/// The SIGKILL lands a random delay in `0..=MAX_DELAY_MS` after a job started in the current worker.
const MAX_DELAY_MS: u64 = 2500;
/// Generous bound on a step of tiny CPU jobs on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

/// SplitMix64: the test's random delays, reproducible from the printed seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn up_to(&mut self, max: u64) -> u64 {
        self.next() % (max + 1)
    }
}

fn seed() -> u64 {
    std::env::var("FLEET_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        })
}

/// Submits request `i` over HTTP; returns its id and kind.
async fn submit(client: &reqwest::Client, base: &str, i: usize) -> (String, EndpointKind) {
    let prompt = format!("sigkill {i}");
    let (kind, path, input) = if i % BASE_EVERY == BASE_EVERY - 1 {
        (
            EndpointKind::Base,
            "",
            json!({"prompt": prompt, "image_size": "square_hd", "num_inference_steps": 40, "seed": i}),
        )
    } else {
        (
            EndpointKind::Sprint,
            "/sprint",
            json!({"prompt": prompt, "image_size": {"width": 256, "height": 256}, "seed": i}),
        )
    };
    let body = common::http::submit(client, base, path, input).await;
    let id = body["request_id"].as_str().expect("request_id").to_string();
    (id, kind)
}

async fn status(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let (_, _, body) =
        common::http::send(client.get(format!("{base}/local/sana/requests/{id}/status"))).await;
    body
}

/// Reads whatever the results stream delivers for `dur`.
async fn pump(log: &mut EventLog, dur: Duration) {
    let deadline = tokio::time::Instant::now() + dur;
    while tokio::time::timeout_at(deadline, log.next_matching(WAIT, "any event", |_| true))
        .await
        .is_ok()
    {}
}

fn ended(log: &EventLog, id: &str) -> bool {
    log.seen
        .iter()
        .any(|(_, e)| e.request_id == id && e.kind().is_terminal())
}

/// The job `worker` runs now as far as the stream tells (started by it and not ended), with its attempt.
fn running_in(log: &EventLog, worker: &str) -> Option<(String, u32)> {
    log.seen
        .iter()
        .rev()
        .filter(|(_, e)| e.kind() == EventKind::Started && e.worker() == Some(worker))
        .map(|(_, e)| (e.request_id.clone(), e.attempt().unwrap_or(1)))
        .find(|(id, _)| !ended(log, id))
}

fn ever_started(log: &EventLog, id: &str) -> bool {
    log.seen
        .iter()
        .any(|(_, e)| e.request_id == id && e.kind() == EventKind::Started)
}

/// The jobs a kill now may return to their queues: the two oldest unended jobs of each kind.
fn exposed(log: &EventLog, accepted: &[(String, EndpointKind)]) -> Vec<String> {
    let mut out = Vec::new();
    for kind in [EndpointKind::Sprint, EndpointKind::Base] {
        out.extend(
            accepted
                .iter()
                .filter(|(id, k)| *k == kind && !ended(log, id))
                .take(2)
                .map(|(id, _)| id.clone()),
        );
    }
    out
}

/// The tallies of the sprint and the base requests, as one.
fn merge(a: Tally, b: Tally) -> Tally {
    let mut failures = a.failures;
    for (label, n) in b.failures {
        *failures.entry(label).or_default() += n;
    }
    Tally {
        accepted: a.accepted + b.accepted,
        completed: a.completed + b.completed,
        failed: a.failed + b.failed,
        lost: a.lost + b.lost,
        duplicated: a.duplicated + b.duplicated,
        failures,
    }
}

#[tokio::test]
async fn worker_sigkill_at_random_points_fault() {
    let began = Instant::now();
    let url = common::amqp_url();
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let s3 = common::s3_config();
    let mut log = EventLog::open(&conn, &topology).await;
    let worker_args = ["--retry-backoff-ms", "0"];
    let mut generation = 0usize;
    let mut worker_id = format!("w-kill-{generation}");
    let mut worker = spawn_worker(&url, &topology, &s3, &worker_id, &worker_args);
    let (mut dispatcher, base) = spawn_dispatcher(&url, &topology).await;
    let client = reqwest::Client::new();
    common::http::wait_ready(&client, &base).await;

    let mut accepted = Vec::new();
    for i in 0..BURST {
        accepted.push(submit(&client, &base, i).await);
    }

    let seed = seed();
    let mut rng = SplitMix(seed);
    // Kills each job may have been held at (an upper bound of its returns, see the module doc).
    let mut held_at: HashMap<String, u32> = HashMap::new();
    let mut killed = Vec::new();
    let mut delays_ms = Vec::new();
    let mut in_progress_at_aim = 0usize;
    let mut deferred = 0usize;
    for round in 0..KILLS {
        // Aim: wait until the current worker runs a job on its first delivery (spreads the kills over
        // jobs), or any job once every request has started.
        let deadline = Instant::now() + WAIT;
        let target = loop {
            if let Some((id, attempt)) = running_in(&log, &worker_id) {
                if attempt == 1 || accepted.iter().all(|(id, _)| ever_started(&log, id)) {
                    break id;
                }
            }
            assert!(
                accepted.iter().any(|(id, _)| !ended(&log, id)),
                "every request ended before kill {round}: the burst is too short for {KILLS} kills"
            );
            assert!(
                Instant::now() < deadline,
                "{worker_id} started no job within {WAIT:?}"
            );
            assert!(
                worker.try_wait().expect("poll worker").is_none(),
                "{worker_id} exited on its own"
            );
            pump(&mut log, Duration::from_millis(100)).await;
        };
        // The dispatcher follows the same stream: it moves the target off IN_QUEUE.
        let (c, b, t) = (client.clone(), base.clone(), target.clone());
        poll_until(WAIT, &format!("{target} to leave IN_QUEUE"), || {
            let (c, b, t) = (c.clone(), b.clone(), t.clone());
            async move { status(&c, &b, &t).await["status"] != "IN_QUEUE" }
        })
        .await;
        if status(&client, &base, &target).await["status"] == "IN_PROGRESS" {
            in_progress_at_aim += 1;
        }
        let delay = rng.up_to(MAX_DELAY_MS);
        pump(&mut log, Duration::from_millis(delay)).await;
        // Catch up with the stream, then hold the kill while it could return a job a fourth time.
        loop {
            pump(&mut log, Duration::from_millis(50)).await;
            let at_limit = exposed(&log, &accepted)
                .iter()
                .any(|id| held_at.get(id).copied().unwrap_or(0) >= topology.delivery_limit);
            if !at_limit {
                break;
            }
            deferred += 1;
            assert!(
                Instant::now() < deadline,
                "kill {round} deferred past {WAIT:?}"
            );
            pump(&mut log, Duration::from_millis(200)).await;
        }
        for id in exposed(&log, &accepted) {
            *held_at.entry(id).or_default() += 1;
        }
        worker.kill().await.expect("SIGKILL the worker");
        killed.push(worker_id.clone());
        delays_ms.push(delay);
        generation += 1;
        worker_id = format!("w-kill-{generation}");
        worker = spawn_worker(&url, &topology, &s3, &worker_id, &worker_args);
    }

    for (id, _) in &accepted {
        log.terminal(id, WAIT).await;
    }
    // A late duplicate would sit after the terminal events read so far.
    log.read_to_end(&conn, &topology, WAIT).await;
    for (id, _) in &accepted {
        let (c, b, t) = (client.clone(), base.clone(), id.clone());
        poll_until(WAIT, &format!("{id} COMPLETED in the dispatcher"), || {
            let (c, b, t) = (c.clone(), b.clone(), t.clone());
            async move { status(&c, &b, &t).await["status"] == "COMPLETED" }
        })
        .await;
    }

    let of_kind = |kind: EndpointKind| -> Vec<String> {
        accepted
            .iter()
            .filter(|(_, k)| *k == kind)
            .map(|(id, _)| id.clone())
            .collect()
    };
    let tally = merge(
        Tally::count(
            &of_kind(EndpointKind::Sprint),
            &log.seen,
            &s3,
            EndpointKind::Sprint,
            1,
        )
        .await,
        Tally::count(
            &of_kind(EndpointKind::Base),
            &log.seen,
            &s3,
            EndpointKind::Base,
            1,
        )
        .await,
    );
    let starts: Vec<&Event> = log
        .seen
        .iter()
        .map(|(_, e)| e)
        .filter(|e| {
            e.kind() == EventKind::Started && accepted.iter().any(|(id, _)| *id == e.request_id)
        })
        .collect();
    let generations = starts.len();
    let max_attempt = starts.iter().filter_map(|e| e.attempt()).max().unwrap_or(0);
    let rerun = accepted
        .iter()
        .filter(|(id, _)| starts.iter().filter(|e| e.request_id == *id).count() > 1)
        .count();
    // A kill landed mid-job when the killed worker had started a job it never ended.
    let mid_job = killed
        .iter()
        .filter(|w| {
            starts.iter().any(|s| {
                s.worker() == Some(w.as_str())
                    && !log.seen.iter().any(|(_, e)| {
                        e.request_id == s.request_id
                            && e.kind().is_terminal()
                            && e.worker() == Some(w.as_str())
                    })
            })
        })
        .count();
    let max_held = held_at.values().copied().max().unwrap_or(0);
    tally.print(
        "worker_sigkill",
        &format!(
            "kills={} mid_job={mid_job} in_progress_at_aim={in_progress_at_aim} generations={generations} \
             rerun_jobs={rerun} max_attempt={max_attempt} max_held_at_kills={max_held} \
             deferred_for_delivery_limit={deferred} delays_ms={delays_ms:?} seed={seed} took={:.1}s",
            killed.len(),
            began.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(killed.len(), KILLS);
    assert!(mid_job >= 1, "no kill landed mid-job (seed {seed})");
    assert!(
        max_held <= topology.delivery_limit,
        "a job may have been returned more often than x-delivery-limit allows"
    );
    assert_eq!(tally.accepted, BURST);
    assert_eq!(
        (tally.lost, tally.duplicated, tally.failed),
        (0, 0, 0),
        "{tally:?} (a runner_server_error failure = dead-lettered past the delivery limit; seed {seed})"
    );
    assert_eq!(tally.completed, BURST);
    assert!(
        generations >= BURST + mid_job,
        "every job cut mid-run is run again"
    );
    assert!(
        worker.try_wait().expect("poll worker").is_none(),
        "{worker_id} exited"
    );
    assert!(
        dispatcher.try_wait().expect("poll dispatcher").is_none(),
        "dispatcher exited"
    );
    let _ = worker.kill().await;
    let _ = dispatcher.kill().await;
    common::drop_topology(&conn, &topology).await;
}
