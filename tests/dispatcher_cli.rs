//! The `dispatcher` command line (issue 13) as a user runs it, end to end: `dispatcher submit --wait`
//! with its progress display, `--json` and `--download`, and `dispatcher results` filtered by endpoint
//! and event. Real processes throughout: the `dispatcher` binary serving (its AMQP ingress routes what
//! `submit` publishes) and as the CLI, the `worker` binary on the tiny checkpoints on the CPU, the real
//! RabbitMQ and S3 (Garage). `dispatcher/tests/cli.rs` covers the flags that need no broker.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::http::{submit, wait_ready, Spawned, TempDir};
use common::workerproc::tiny_model_args;
use common::EventLog;
use fleet::events::EventKind;
use fleet::queue::Topology;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// Worker start (model load, warm-up) plus two tiny-model jobs on the CPU.
const WAIT: Duration = Duration::from_secs(300);

/// `dispatcher <args…>` against the test broker and `topology`, logging only warnings.
fn cli(topology: &Topology, args: &[&str]) -> Command {
    let mut cmd = Command::new(common::binary("dispatcher"));
    cmd.args(args)
        .args(["--amqp-url", &common::amqp_url()])
        .args(["--prefix", &topology.prefix])
        .args(["--results-max-age", &topology.results_max_age])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn spawn_worker(topology: &Topology, id: &str) -> Child {
    common::worker_binary(topology)
        .args(["--worker-id", id])
        .args(tiny_model_args())
        .spawn()
        .expect("spawn the worker binary")
}

/// Position of the first line starting with `prefix`, failing with every line when there is none.
fn position(lines: &[String], prefix: &str) -> usize {
    lines
        .iter()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{}", lines.join("\n")))
}

#[tokio::test]
async fn submit_wait_shows_queue_position_steps_and_upload_then_prints_json_and_saves_the_images() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut log = EventLog::open(&conn, &topology).await;
    let dispatcher = Spawned::start(&topology, &[]).await;
    let http = reqwest::Client::new();
    wait_ready(&http, &dispatcher.base).await;

    // One base request ahead, and no worker yet: the CLI's request waits at position 1.
    let ahead = submit(
        &http,
        &dispatcher.base,
        "",
        json!({"prompt": "ahead", "image_size": {"width": 256, "height": 160}, "num_inference_steps": 2}),
    )
    .await;
    let downloads = TempDir::new();
    let dir = downloads.0.to_str().expect("utf-8 temp dir");
    let mut child = cli(
        &topology,
        &[
            "submit",
            "--endpoint",
            "base",
            "--prompt",
            "a lighthouse",
            "--size",
            "320x192",
            "--steps",
            "3",
            "--seed",
            "77",
            "--format",
            "png",
            "--json",
            "--download",
            dir,
        ],
    )
    .spawn()
    .expect("spawn dispatcher submit");
    let mut stdout = child.stdout.take().expect("stdout");
    let stdout_task = tokio::spawn(async move {
        let mut text = String::new();
        stdout.read_to_string(&mut text).await.map(|_| text)
    });
    let mut progress = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut lines = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = progress.next_line().await.expect("read stderr") {
            let queued = line.starts_with("queued: position 1 (1 ahead)");
            lines.push(line);
            if queued {
                return;
            }
        }
        panic!(
            "submit ended before showing position 1:\n{}",
            lines.join("\n")
        );
    })
    .await
    .expect("the CLI shows its queue position in time");

    let mut worker = spawn_worker(&topology, "cli-worker");
    let rest = tokio::time::timeout(WAIT, async {
        let mut rest = Vec::new();
        while let Some(line) = progress.next_line().await.expect("read stderr") {
            rest.push(line);
        }
        rest
    })
    .await
    .expect("the CLI finishes in time");
    lines.extend(rest);
    let status = child.wait().await.expect("wait for submit");
    assert!(
        status.success(),
        "dispatcher submit: {status:?}\n{}",
        lines.join("\n")
    );
    eprintln!("progress:\n{}", lines.join("\n"));

    // stderr: the request id, then the phases in order.
    let id = lines[position(&lines, "request ")]["request ".len()..].to_string();
    let order = [
        position(&lines, "request "),
        position(&lines, "queued: position 1 (1 ahead)"),
        position(&lines, "queued: position 0 (next)"),
        position(&lines, "started on cli-worker"),
        position(&lines, "step 1/3 ["),
        position(&lines, "step 2/3 ["),
        position(&lines, "step 3/3 [########################]"),
        position(&lines, "uploading"),
        position(&lines, "completed in "),
        position(&lines, "saved "),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "phases out of order {order:?}:\n{}",
        lines.join("\n")
    );

    // stdout: the result body, and nothing else.
    let stdout = stdout_task.await.expect("join").expect("read stdout");
    let result: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {stdout:?}"));
    assert_eq!(result["seed"], 77);
    let image = &result["images"][0];
    assert_eq!(
        (image["width"].as_u64(), image["height"].as_u64()),
        (Some(320), Some(192))
    );
    assert_eq!(image["content_type"], "image/png");
    assert_eq!(result["images"].as_array().map(Vec::len), Some(1));

    // --download: DIR/<request_id>/<file_name>, the stored bytes at the requested size.
    let file_name = image["file_name"].as_str().expect("file_name");
    let saved = downloads.0.join(&id).join(file_name);
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("saved {}", saved.display())),
        "{}",
        lines.join("\n")
    );
    let bytes = std::fs::read(&saved).unwrap_or_else(|e| panic!("read {}: {e}", saved.display()));
    assert_eq!(Some(bytes.len() as u64), image["file_size"].as_u64());
    let decoded =
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).expect("a PNG image");
    assert_eq!((decoded.width(), decoded.height()), (320, 192));

    // The stream agrees: the request completed once, with one progress event per step shown.
    let terminal = log.terminal(&id, WAIT).await;
    assert_eq!(terminal.kind(), EventKind::Completed, "{terminal:?}");
    assert_eq!(log.count(&id, EventKind::Progress), 3);
    assert_eq!(log.count(&id, EventKind::Completed), 1);
    log.terminal(ahead["request_id"].as_str().expect("id"), WAIT)
        .await;

    worker.kill().await.expect("stop the worker");
    drop(dispatcher);
    common::drop_topology(&conn, &topology).await;
}

/// Parses `dispatcher results` output lines.
fn events(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

#[tokio::test]
async fn results_prints_only_the_chosen_endpoints_and_events() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut log = EventLog::open(&conn, &topology).await;
    let dispatcher = Spawned::start(&topology, &[]).await;
    let http = reqwest::Client::new();
    wait_ready(&http, &dispatcher.base).await;
    let mut worker = spawn_worker(&topology, "results-worker");

    // Following from the first offset: everything published from here on passes through the filter.
    let mut follower = cli(
        &topology,
        &[
            "results",
            "--from",
            "first",
            "--follow",
            "--endpoint",
            "sprint",
            "--event",
            "completed,failed",
        ],
    )
    .spawn()
    .expect("spawn dispatcher results --follow");
    let mut followed = BufReader::new(follower.stdout.take().expect("stdout")).lines();

    // A base request ends first, then a sprint one: by the time the follower prints the sprint
    // completion it has read (and must have dropped) every base event and every other sprint event.
    let small = json!({"prompt": "a fox", "image_size": {"width": 256, "height": 160}, "num_inference_steps": 2});
    let base = submit(&http, &dispatcher.base, "", small.clone()).await;
    let base_id = base["request_id"].as_str().expect("id").to_string();
    let ended = log.terminal(&base_id, WAIT).await;
    assert_eq!(ended.kind(), EventKind::Completed, "{ended:?}");
    let sprint = submit(&http, &dispatcher.base, "/sprint", small).await;
    let sprint_id = sprint["request_id"].as_str().expect("id").to_string();
    let ended = log.terminal(&sprint_id, WAIT).await;
    assert_eq!(ended.kind(), EventKind::Completed, "{ended:?}");

    let first = tokio::time::timeout(WAIT, followed.next_line())
        .await
        .expect("the follower prints in time")
        .expect("read the follower")
        .expect("a line before the follower ends");
    let first: Value = serde_json::from_str(&first).expect("JSON line");
    assert_eq!(first["request_id"], sprint_id.as_str(), "{first}");
    assert_eq!(first["event"], "completed");
    assert_eq!(first["endpoint"], "sprint");
    assert!(first["offset"].as_u64().is_some(), "{first}");
    assert_eq!(first["result"]["images"][0]["width"], 256);
    follower.kill().await.expect("stop the follower");
    // Nothing else had been printed before the kill (a base line would have come first).
    let mut rest = String::new();
    let mut tail = followed.into_inner();
    tail.read_to_string(&mut rest).await.expect("read the rest");
    assert_eq!(rest, "", "lines after the sprint completion");

    // Without --follow: stops at the present; the filter takes comma lists and repeated flags.
    let out = cli(
        &topology,
        &[
            "results",
            "--from",
            "first",
            "--endpoint",
            "base",
            "--event",
            "queued",
            "--event",
            "completed",
        ],
    )
    .output()
    .await
    .expect("run dispatcher results");
    assert!(out.status.success(), "{out:?}");
    let printed = events(&String::from_utf8_lossy(&out.stdout));
    let seen: Vec<(&str, &str)> = printed
        .iter()
        .map(|e| {
            (
                e["request_id"].as_str().unwrap_or(""),
                e["event"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (base_id.as_str(), "queued"),
            (base_id.as_str(), "completed")
        ]
    );
    assert!(printed[0]["offset"].as_u64() < printed[1]["offset"].as_u64());

    // A value that is not an event is a usage error before anything connects.
    let bad = cli(&topology, &["results", "--event", "done"])
        .output()
        .await
        .expect("run dispatcher results");
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown event"));

    worker.kill().await.expect("stop the worker");
    drop(dispatcher);
    common::drop_topology(&conn, &topology).await;
}
