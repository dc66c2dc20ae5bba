//! Fault: the broker restarts mid-burst (`rabbitmqctl stop_app`, an outage, `start_app`) under the real
//! `dispatcher` and `worker` binaries, on a RabbitMQ node of the test's own (the shared broker is never
//! stopped). Both processes stay up and reconnect; while the broker is away the HTTP API keeps answering
//! status reads and answers submits 503 with `Retry-After`; afterwards every accepted request ends in
//! exactly one terminal event with one set of objects, and none stays IN_QUEUE/IN_PROGRESS. Repeated:
//! two restarts, each in its own burst.

mod common;

use std::time::{Duration, Instant};

use common::faults::{poll_until, secs, spawn_dispatcher, spawn_worker, RabbitNode, Tally};
use common::EventLog;
use fleet::job::EndpointKind;
use serde_json::{json, Value};

/// Broker restarts, each in the middle of its own burst.
const ROUNDS: usize = 2;
/// Requests per round, and how many go in before the broker stops.
const BURST: usize = 10;
const BEFORE_OUTAGE: usize = 5;
/// How long the broker stays stopped.
const OUTAGE: Duration = Duration::from_secs(15);
/// Generous bound for the whole burst of tiny CPU jobs on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

async fn post(client: &reqwest::Client, base: &str, i: usize) -> (u16, Option<String>, Value) {
    let resp = client
        .post(format!("{base}/local/sana/sprint"))
        .json(&json!({"prompt": format!("fault {i}"), "image_size": {"width": 256, "height": 256}, "seed": i}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("POST submit (the dispatcher must stay up)");
    let code = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (code, retry_after, body)
}

async fn status(client: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    let resp = client
        .get(format!("{base}/local/sana/requests/{id}/status"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("GET status (the dispatcher must stay up)");
    let code = resp.status().as_u16();
    (code, resp.json::<Value>().await.unwrap_or(Value::Null))
}

/// Submits until accepted (retrying 503s as a client would, after `Retry-After`); returns the id.
async fn submit_until_accepted(
    client: &reqwest::Client,
    base: &str,
    i: usize,
    refused: &mut usize,
) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, retry_after, body) = post(client, base, i).await;
        match code {
            200 => return body["request_id"].as_str().expect("request_id").to_string(),
            503 => {
                *refused += 1;
                assert!(retry_after.is_some(), "503 without Retry-After: {body}");
                assert!(body["detail"].is_string(), "503 body is JSON: {body}");
            }
            other => panic!("submit answered {other}: {body}"),
        }
        assert!(Instant::now() < deadline, "submit {i} never accepted");
        let secs: u64 = retry_after.and_then(|s| s.parse().ok()).unwrap_or(1);
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
}

#[tokio::test]
async fn broker_restart_mid_burst_fault() {
    let node = RabbitNode::start().await;
    let url = node.url();
    let conn = fleet::queue::connect(&url)
        .await
        .expect("connect to the test node");
    let topology = common::fresh_topology(&conn).await;
    let s3 = common::s3_config();
    let mut worker = spawn_worker(
        &url,
        &topology,
        &s3,
        "w-fault",
        &["--retry-backoff-ms", "0"],
    );
    let (mut dispatcher, base) = spawn_dispatcher(&url, &topology).await;
    let client = reqwest::Client::new();
    common::http::wait_ready(&client, &base).await;

    let mut accepted = Vec::new();
    let mut refused = 0usize;
    let mut reads = 0usize;
    let (mut outages, mut accept_after, mut done_after) = (Vec::new(), Vec::new(), Vec::new());
    // The test's own connection goes with the first restart; it reconnects at the end.
    conn.close(200, "the test reads the stream at the end".into())
        .await
        .ok();
    for round in 0..ROUNDS {
        let offset = round * BURST;
        let mut ids = Vec::new();
        for i in 0..BEFORE_OUTAGE {
            ids.push(submit_until_accepted(&client, &base, offset + i, &mut refused).await);
        }
        // Stop while jobs are queued and (as soon as the worker took the round's first) in flight.
        let first = ids[0].clone();
        poll_until(WAIT, "the round's first job to start", || {
            let (client, base, first) = (client.clone(), base.clone(), first.clone());
            async move { status(&client, &base, &first).await.1["status"] != "IN_QUEUE" }
        })
        .await;
        node.stop_app();
        let outage_started = Instant::now();

        // While the broker is away: reads are answered from the view, submits get 503 + Retry-After.
        let (code, retry_after, body) = post(&client, &base, 999).await;
        assert_eq!(code, 503, "submit while the broker is stopped: {body}");
        assert!(retry_after.is_some(), "Retry-After on the 503");
        refused += 1;
        while outage_started.elapsed() < OUTAGE {
            for id in accepted.iter().chain(&ids) {
                let (code, body) = status(&client, &base, id).await;
                assert!(
                    matches!(code, 200 | 202),
                    "status read during the outage: {code} {body}"
                );
                reads += 1;
            }
            assert!(
                dispatcher.try_wait().expect("poll dispatcher").is_none(),
                "dispatcher exited"
            );
            assert!(
                worker.try_wait().expect("poll worker").is_none(),
                "worker exited"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        node.start_app().await;
        outages.push(outage_started.elapsed());

        let resumed = Instant::now();
        for i in BEFORE_OUTAGE..BURST {
            ids.push(submit_until_accepted(&client, &base, offset + i, &mut refused).await);
        }
        accept_after.push(resumed.elapsed());
        for id in &ids {
            let (client, base, id2) = (client.clone(), base.clone(), id.clone());
            poll_until(WAIT, &format!("{id} to complete"), || {
                let (client, base, id) = (client.clone(), base.clone(), id2.clone());
                async move { status(&client, &base, &id).await.1["status"] == "COMPLETED" }
            })
            .await;
        }
        done_after.push(resumed.elapsed());
        accepted.extend(ids);
    }
    assert!(
        dispatcher.try_wait().expect("poll dispatcher").is_none(),
        "dispatcher exited"
    );
    assert!(
        worker.try_wait().expect("poll worker").is_none(),
        "worker exited"
    );

    let conn = fleet::queue::connect(&url)
        .await
        .expect("reconnect the test");
    let mut log = EventLog::open(&conn, &topology).await;
    for id in &accepted {
        log.terminal(id, WAIT).await;
    }
    // A late duplicate would sit after the terminal events read so far.
    log.read_to_end(&conn, &topology, WAIT).await;

    let tally = Tally::count(&accepted, &log.seen, &s3, EndpointKind::Sprint, 1).await;
    // Runs of the model (`started` events); a job whose `started` could not be published when the broker
    // left is run again after it, which is not a second result.
    let generations: usize = accepted
        .iter()
        .map(|id| log.count(id, fleet::events::EventKind::Started))
        .sum();
    tally.print(
        "broker_restart",
        &format!(
            "rounds={ROUNDS} outages={} generations={generations} refused_503={refused} \
             status_reads_during_outages={reads} all_completed_after_restart={} resubmits_accepted_after={}",
            secs(&outages),
            secs(&done_after),
            secs(&accept_after)
        ),
    );
    assert_eq!(tally.accepted, ROUNDS * BURST);
    assert_eq!(
        (tally.lost, tally.duplicated, tally.failed),
        (0, 0, 0),
        "{tally:?}"
    );
    assert_eq!(tally.completed, ROUNDS * BURST);
    let _ = worker.kill().await;
    let _ = dispatcher.kill().await;
    common::drop_topology(&conn, &topology).await;
}
