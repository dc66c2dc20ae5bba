//! The `dispatcher` binary against the real RabbitMQ: SIGKILLed and restarted, it serves every status
//! and result again (its view is rebuilt from the results stream); and the CLI client submits over
//! AMQP, follows the stream and prints image URLs, and prints the stream as JSON lines.

mod common;

use std::process::Stdio;

use common::http::{send, submit, wait_ready, FakeWorker, Spawned, WAIT};
use fleet::events::{EventBody, EventKind, Queued};
use fleet::job::EndpointKind;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn killed_and_restarted_dispatcher_serves_everything_again() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let d = Spawned::start(&topology, &[]).await;
    wait_ready(&client, &d.base).await;

    let done = submit(
        &client,
        &d.base,
        "/sprint",
        json!({"prompt": "done", "image_size": {"width": 3840, "height": 2160}}),
    )
    .await;
    let cancelled = submit(&client, &d.base, "/sprint", json!({"prompt": "cancelled"})).await;
    let waiting = submit(
        &client,
        &d.base,
        "/sprint",
        json!({"prompt": "still waiting"}),
    )
    .await;
    let worker = FakeWorker::new(&conn, &topology).await;
    let job = worker.take(EndpointKind::Sprint).await.expect("job");
    assert_eq!(job.request_id, done["request_id"].as_str().expect("id"));
    worker.start(&job).await;
    let result = worker.complete(&job).await;
    // Cancel answers once the dispatcher applied the cancellation, which the stream orders after the
    // (confirmed) completion: the snapshot below sees both.
    let cancel_path = format!(
        "{}/local/sana/requests/{}/cancel",
        d.base,
        cancelled["request_id"].as_str().expect("id")
    );
    let (status, _, _) = send(client.put(&cancel_path)).await;
    assert_eq!(status, 202);

    let paths = |base: &str, body: &Value| {
        let id = body["request_id"].as_str().expect("id");
        (
            format!("{base}/local/sana/requests/{id}/status"),
            format!("{base}/local/sana/requests/{id}"),
        )
    };
    let before: Vec<_> = {
        let mut v = Vec::new();
        for body in [&done, &cancelled, &waiting] {
            let (status_url, result_url) = paths(&d.base, body);
            v.push((
                send(client.get(&status_url)).await,
                send(client.get(&result_url)).await,
            ));
        }
        v
    };
    d.kill().await;

    let d = Spawned::start(&topology, &[]).await;
    wait_ready(&client, &d.base).await;
    for (body, ((s_code, _, s_before), (r_code, r_headers, r_before))) in
        [&done, &cancelled, &waiting].into_iter().zip(before)
    {
        let (status_url, result_url) = paths(&d.base, body);
        let (code, _, s) = send(client.get(&status_url)).await;
        assert_eq!(code, s_code);
        assert_eq!(s["status"], s_before["status"], "{s}");
        assert_eq!(s["queue_position"], s_before["queue_position"]);
        assert_eq!(s["error_type"], s_before["error_type"]);
        let (code, headers, r) = send(client.get(&result_url)).await;
        assert_eq!(code, r_code);
        assert_eq!(r, r_before);
        assert_eq!(
            headers.get("x-fal-billable-units"),
            r_headers.get("x-fal-billable-units")
        );
    }
    let (code, headers, r) = send(client.get(paths(&d.base, &done).1)).await;
    assert_eq!((code, &r), (200, &result));
    assert_eq!(
        headers["x-fal-billable-units"], "8",
        "3840×2160 is ceil(7.91) = 8 units"
    );
    let (code, _, s) = send(client.get(paths(&d.base, &waiting).0)).await;
    assert_eq!(
        (code, s["status"].as_str(), s["queue_position"].as_u64()),
        (202, Some("IN_QUEUE"), Some(0))
    );
    let (code, _, r) = send(client.get(paths(&d.base, &cancelled).1)).await;
    assert_eq!(
        (code, r["error_type"].as_str()),
        (499, Some("client_cancelled"))
    );

    // The restarted dispatcher keeps following: a request finishing now shows up.
    let job = worker
        .take(EndpointKind::Sprint)
        .await
        .expect("cancelled job still queued");
    assert_eq!(
        job.request_id,
        cancelled["request_id"].as_str().expect("id")
    );
    let job = worker
        .take(EndpointKind::Sprint)
        .await
        .expect("waiting job");
    let mut sse =
        common::http::SseReader::open(&client, &format!("{}/stream", paths(&d.base, &waiting).0))
            .await;
    assert_eq!(sse.next().await.expect("status")["status"], "IN_QUEUE");
    worker.start(&job).await;
    assert_eq!(sse.next().await.expect("status")["status"], "IN_PROGRESS");
    worker.complete(&job).await;
    assert_eq!(sse.next().await.expect("status")["status"], "COMPLETED");
    d.kill().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn cli_submits_over_amqp_waits_for_urls_and_prints_the_stream() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let d = Spawned::start(&topology, &[]).await;
    wait_ready(&client, &d.base).await;
    let mut log = common::EventLog::open(&conn, &topology).await;

    let broker = [
        "--amqp-url".to_string(),
        common::amqp_url(),
        "--prefix".into(),
        topology.prefix.clone(),
        "--results-max-age".into(),
        topology.results_max_age.clone(),
    ];
    let mut cli = Command::new(common::binary("dispatcher"))
        .args([
            "submit",
            "--endpoint",
            "sprint",
            "--prompt",
            "a paper boat",
            "--size",
            "512x256",
            "--seed",
            "11",
            "--wait",
        ])
        .args(&broker)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn dispatcher submit");
    let mut out = BufReader::new(cli.stdout.take().expect("stdout")).lines();
    let request_id = tokio::time::timeout(WAIT, out.next_line())
        .await
        .expect("id in time")
        .expect("read")
        .expect("a line");
    let queued = log
        .wait_for(WAIT, "the CLI's queued event", |e| {
            e.request_id == request_id
        })
        .await;
    assert_eq!(queued.kind(), EventKind::Queued);
    let EventBody::Queued(Queued { input, .. }) = queued.body else {
        panic!("not queued: {queued:?}");
    };
    assert_eq!(
        (input.image_size.width, input.image_size.height, input.seed),
        (512, 256, 11)
    );

    let worker = FakeWorker::new(&conn, &topology).await;
    // The ingress publishes `queued` before the job, so the job may not be in the queue yet: wait for it.
    let job = worker.wait_job(&conn, EndpointKind::Sprint).await;
    assert_eq!(job.request_id, request_id);
    worker.start(&job).await;
    worker.step(&job, 1, 2).await;
    worker.step(&job, 2, 2).await;
    let result = worker.complete(&job).await;
    let url = tokio::time::timeout(WAIT, out.next_line())
        .await
        .expect("URL in time")
        .expect("read")
        .expect("a URL line");
    assert_eq!(url, result["images"][0]["url"].as_str().expect("url"));
    let status = tokio::time::timeout(WAIT, cli.wait())
        .await
        .expect("CLI exits")
        .expect("wait");
    assert!(status.success());
    let mut progress = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut cli.stderr.take().expect("stderr"), &mut progress)
        .await
        .expect("stderr");
    assert!(progress.contains("step 2/2"), "progress shown: {progress}");

    // An invalid submission makes the CLI fail with the validation error.
    let bad = Command::new(common::binary("dispatcher"))
        .args([
            "submit",
            "--endpoint",
            "sprint",
            "--prompt",
            "x",
            "--steps",
            "99",
            "--wait",
        ])
        .args(&broker)
        .env("RUST_LOG", "warn")
        .output();
    let bad = tokio::time::timeout(WAIT, bad)
        .await
        .expect("CLI exits")
        .expect("run");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("validation_error"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // `results` prints everything so far as JSON lines with offsets, then stops.
    let results = Command::new(common::binary("dispatcher"))
        .args(["results", "--from", "first"])
        .args(&broker)
        .output();
    let results = tokio::time::timeout(WAIT, results)
        .await
        .expect("results exits")
        .expect("run");
    assert!(results.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&results.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let ours: Vec<_> = lines
        .iter()
        .filter(|l| l["request_id"] == request_id.as_str())
        .map(|l| l["event"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        ours,
        ["queued", "started", "progress", "progress", "completed"]
    );
    assert!(
        lines
            .windows(2)
            .all(|w| w[0]["offset"].as_u64() < w[1]["offset"].as_u64()),
        "offsets increase"
    );
    d.kill().await;
    common::drop_topology(&conn, &topology).await;
}
