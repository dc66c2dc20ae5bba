//! Fault: the `dispatcher` binary is SIGKILLed and started again over a results stream holding many
//! finished requests. Polled from the moment it listens, it never answers 404 (or IN_PROGRESS) for a
//! request the stream knows completed: the request routes wait for the replay to reach the stream's tail (or answer 503 with
//! `Retry-After`), then answer from the complete view.

mod common;

use std::time::{Duration, Instant};

use common::http::{FakeWorker, Spawned, WAIT};
use fleet::events::{Event, EventBody, Queued};
use fleet::job::EndpointKind;
use serde_json::{json, Value};

/// Finished requests in the stream before the restarts, each with this many progress events.
const REQUESTS: usize = 40;
const STEPS: u32 = 10;
const RESTARTS: usize = 2;

#[tokio::test]
async fn restarted_dispatcher_never_answers_404_while_replaying_fault() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let worker = FakeWorker::new(&conn, &topology).await;
    let jobs: Vec<_> = (0..REQUESTS)
        .map(|i| common::job(EndpointKind::Sprint, json!({"prompt": format!("done {i}")})))
        .collect();
    for job in &jobs {
        let queued = Queued {
            input: job.input.clone(),
            deadline: None,
            webhook_url: None,
        };
        worker
            .publish(Event::new(
                &job.request_id,
                job.endpoint,
                EventBody::Queued(queued),
            ))
            .await;
        worker.start(job).await;
        for step in 1..=STEPS {
            worker.step(job, step, STEPS).await;
        }
        worker.complete(job).await;
    }
    let last = jobs.last().expect("jobs").request_id.clone();
    let client = reqwest::Client::new();
    let mut d = Spawned::start(&topology, &[]).await;
    let (mut not_found, mut stale, mut unavailable, mut polls) = (0usize, 0usize, 0usize, 0usize);
    let mut first_ok = Vec::new();
    for round in 0..=RESTARTS {
        if round > 0 {
            d.kill().await;
            d = Spawned::start(&topology, &[]).await;
        }
        let listening = Instant::now();
        let url = format!("{}/local/sana/requests/{last}/status", d.base);
        loop {
            let resp = client.get(&url).send().await.expect("GET status");
            polls += 1;
            match resp.status().as_u16() {
                200 => {
                    let body: Value = resp.json().await.expect("status JSON");
                    assert_eq!(body["status"], "COMPLETED", "{body}");
                    break;
                }
                404 => not_found += 1,
                // A completed request seen as queued or running: also an answer from a half-built view.
                202 => stale += 1,
                503 => {
                    assert!(
                        resp.headers().contains_key("retry-after"),
                        "503 with Retry-After"
                    );
                    unavailable += 1;
                }
                other => panic!("status answered {other}"),
            }
            assert!(listening.elapsed() < WAIT, "no 200 within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        first_ok.push(format!("{:.0}ms", listening.elapsed().as_secs_f64() * 1e3));
        // Every request is answered from the complete view.
        for job in &jobs {
            let (code, _, body) = common::http::send(client.get(format!(
                "{}/local/sana/requests/{}/status",
                d.base, job.request_id
            )))
            .await;
            assert_eq!(
                (code, body["status"].as_str()),
                (200, Some("COMPLETED")),
                "{body}"
            );
        }
    }
    println!(
        "fault dispatcher_restart: accepted={REQUESTS} completed={REQUESTS} failed=0 lost=0 duplicated=0 \
         restarts={RESTARTS} events_replayed={} polls={polls} answers_404={not_found} answers_202={stale} answers_503={unavailable} \
         first_200_after_listening=[{}]",
        REQUESTS * (STEPS as usize + 3),
        first_ok.join(", ")
    );
    assert_eq!(
        (not_found, stale),
        (0, 0),
        "answers from a half-built view (404, 202)"
    );
    d.kill().await;
    common::drop_topology(&conn, &topology).await;
}
