//! Issue 4 end to end: the `worker` binary with the real tiny Sana pipelines and the REAL tiny NSFW
//! checkers (`tests/fixtures/tiny/nsfw_vit`, `tiny/sd_safety_checker`), against the real RabbitMQ and S3.
//!
//! * Unflagged: the stock tiny v2 checker keeps a generated image (flag false, image not black), and
//!   running `fleet_worker::safety` on the downloaded PNG (the exact checked image) gives p(nsfw) <= 0.5.
//! * Flagged: a copy of the tiny v2 checker whose `classifier.bias` makes the nsfw logit dominate flags
//!   every image; the uploads are black at the requested size. On the same worker a request with
//!   `enable_safety_checker: false` gets all-false flags and its image is kept, although that very checker
//!   flags it: proof that no model call was made.
//! * Load failure: a checker without `classifier.weight` keeps the worker from starting (non-zero exit
//!   naming the weight, a job published beforehand is still queued, no `started`); the v1 checker loads and
//!   completes a job.
//!
//! Needs `eval "$(bash .ci/garage-up.sh)"` and a local RabbitMQ (see `tests/common`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use candle_core::{DType, Device};
use common::EventLog;
use fleet::events::{Event, EventKind};
use fleet::job::EndpointKind;
use fleet::queue::{self, Publisher, Topology};
use fleet_worker::safety::{self, SafetyCheckerVersion};
use image::RgbImage;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sana_pipelines::loader::ModelSource;
use serde_json::{json, Value};
use tokio::process::Child;

/// Generous bound for one tiny CPU job (or a start-up) on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(180);

/// Seed of the unflagged case: the stock tiny v2 checker scores its sprint image (prompt "a quiet meadow",
/// 300x200) with p(nsfw) well below the 0.5 threshold (the test asserts and prints the value).
const UNFLAGGED_SEED: u64 = 7;

/// Bias forcing the nsfw class: a logit gap of 2000, far beyond the O(20) logit differences the tiny
/// classifier's random weights produce (reference/safety.json: threshold gap s = 21.5).
const FORCED_BIAS: f32 = 1000.0;

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("fleet-{tag}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a copied checker's `model.safetensors` is changed.
enum Edit {
    /// Replace an f32 tensor's values (same shape).
    SetF32(&'static str, Vec<f32>),
    /// Drop a tensor.
    Remove(&'static str),
}

/// Copies the checker directory `src` to a temp dir, applying `edit` to its weights (other tensors, the
/// header metadata and both JSON files unchanged). Panics when the edited tensor does not exist or has
/// another shape.
fn edited_checker(src: &Path, edit: Edit) -> TempDir {
    let dir = TempDir::new("checker");
    for file in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(file), dir.0.join(file)).expect("copy checker json");
    }
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read model.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("parse model.safetensors");
    let (name, replacement) = match &edit {
        Edit::SetF32(name, values) => (
            *name,
            Some(
                values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        ),
        Edit::Remove(name) => (*name, None),
    };
    let mut found = false;
    let mut tensors: Vec<(String, TensorView)> = Vec::new();
    for (key, view) in st.tensors() {
        if key != name {
            tensors.push((key, view));
            continue;
        }
        found = true;
        if let Some(data) = &replacement {
            assert_eq!(view.dtype(), Dtype::F32, "{name} is f32");
            assert_eq!(view.data().len(), data.len(), "{name} keeps its shape");
            let shape = view.shape().to_vec();
            let new = TensorView::new(Dtype::F32, shape, data).expect("valid tensor view");
            tensors.push((key, new));
        }
    }
    assert!(found, "{name} is in {}", src.display());
    let (_, header) = SafeTensors::read_metadata(&bytes).expect("read the safetensors header");
    let out =
        safetensors::serialize(tensors, header.metadata().clone()).expect("serialise weights");
    std::fs::write(dir.0.join("model.safetensors"), out).expect("write model.safetensors");
    dir
}

/// `label2id["nsfw"]` and the number of labels of a v2 checker's `config.json`.
fn nsfw_label(dir: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(dir.join("config.json")).expect("read config.json");
    let cfg: Value = serde_json::from_str(&text).expect("config.json is json");
    let idx = cfg["label2id"]["nsfw"].as_u64().expect("label2id.nsfw") as usize;
    let n = cfg["id2label"].as_object().expect("id2label").len();
    (idx, n)
}

/// The tiny v2 checker with a bias of +FORCED_BIAS on nsfw and -FORCED_BIAS on every other label.
fn forced_nsfw_checker() -> TempDir {
    let src = tiny("nsfw_vit");
    let (nsfw, n) = nsfw_label(&src);
    let bias = (0..n)
        .map(|i| if i == nsfw { FORCED_BIAS } else { -FORCED_BIAS })
        .collect();
    edited_checker(&src, Edit::SetF32("classifier.bias", bias))
}

/// Starts the worker binary (sprint endpoint only) on `topology` with the tiny pipelines and the given
/// checker. Stderr is piped when `capture_stderr`, else shown only with FLEET_TEST_WORKER_LOGS=1.
fn spawn_worker(
    topology: &Topology,
    worker_id: &str,
    checker: (&str, &Path),
    capture_stderr: bool,
) -> Child {
    let mut cmd = common::worker_binary(topology);
    if capture_stderr {
        cmd.stderr(Stdio::piped());
    }
    cmd.args([
        "--worker-id",
        worker_id,
        "--device",
        "cpu",
        "--dtype",
        "f32",
    ])
    .args(["--retry-backoff-ms", "0", "--endpoints", "sprint"])
    .arg("--sprint-model")
    .arg(tiny("sana_sprint"))
    .arg("--base-model")
    .arg(tiny("sana"))
    .args(["--safety-checker", checker.0])
    .arg("--safety-model")
    .arg(checker.1)
    .spawn()
    .expect("spawn the worker binary")
}

/// SIGTERM, then waits (bounded) for the drain; the worker must exit 0.
async fn stop_worker(mut child: Child) {
    let pid = child.id().expect("the worker is still running");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {pid}");
    let status: ExitStatus = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("worker did not exit within {WAIT:?} of SIGTERM"))
        .expect("wait for the worker");
    assert!(status.success(), "SIGTERM drains and exits 0: {status:?}");
}

/// A test's broker side: a fresh topology, a publisher and the results stream.
struct Broker {
    conn: lapin::Connection,
    topology: Topology,
    publisher: Publisher,
    log: EventLog,
}

impl Broker {
    async fn new() -> Self {
        let conn = common::connect().await;
        let topology = common::fresh_topology(&conn).await;
        let publisher = Publisher::new(&conn, topology.clone())
            .await
            .expect("publisher");
        let log = EventLog::open(&conn, &topology).await;
        Broker {
            conn,
            topology,
            publisher,
            log,
        }
    }

    /// Publishes a sprint job and returns its request id.
    async fn publish(&self, input: Value) -> String {
        let job = common::job(EndpointKind::Sprint, input);
        self.publisher.publish_job(&job).await.expect("publish job");
        job.request_id
    }

    /// Waits for the job's terminal event, which must be `completed`, and returns its result body.
    async fn completed(&mut self, request_id: &str) -> Value {
        let done: Event = self.log.terminal(request_id, WAIT).await;
        assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
        done.result()
            .cloned()
            .expect("completed carries the result body")
    }

    async fn drop(self) {
        common::drop_topology(&self.conn, &self.topology).await;
    }
}

/// `has_nsfw_concepts` of a result body.
fn flags(result: &Value) -> Vec<bool> {
    result["has_nsfw_concepts"]
        .as_array()
        .expect("has_nsfw_concepts array")
        .iter()
        .map(|f| f.as_bool().expect("boolean flag"))
        .collect()
}

/// Downloads every image of a result body, checking its metadata size against `size`.
async fn download_images(result: &Value, size: (u32, u32)) -> Vec<RgbImage> {
    let mut out = Vec::new();
    for meta in result["images"].as_array().expect("images array") {
        assert_eq!(
            (meta["width"].as_u64(), meta["height"].as_u64()),
            (Some(size.0.into()), Some(size.1.into()))
        );
        let url = meta["url"].as_str().expect("image url");
        let (status, _, body) = common::http_get(url).await;
        assert_eq!(status, 200, "GET {url}");
        assert_eq!(
            image::guess_format(&body).expect("image bytes"),
            image::ImageFormat::Png
        );
        let img = image::load_from_memory(&body).expect("decodes").to_rgb8();
        assert_eq!(img.dimensions(), size, "uploaded at the requested size");
        out.push(img);
    }
    out
}

fn is_black(img: &RgbImage) -> bool {
    img.pixels().all(|p| p.0 == [0, 0, 0])
}

/// p(nsfw) of each image under the v2 checker in `dir` (CPU, f32, the worker's own code path).
fn vit_probabilities(dir: &Path, images: &[RgbImage]) -> Vec<f32> {
    let source = ModelSource::new(dir.to_string_lossy());
    let checker = safety::load_vit(&source, &Device::Cpu, DType::F32).expect("load the v2 checker");
    let pixels = checker.pixel_values(images).expect("preprocess");
    let logits = checker.logits(&pixels).expect("classify");
    checker.nsfw_probabilities(&logits).expect("softmax")
}

#[tokio::test]
async fn real_checker_keeps_an_unflagged_image() {
    let mut broker = Broker::new().await;
    let checker = tiny("nsfw_vit");
    let worker = spawn_worker(
        &broker.topology,
        "safety-unflagged",
        ("v2", &checker),
        false,
    );
    let size = (300, 200);
    let id = broker
        .publish(json!({"prompt": "a quiet meadow", "seed": UNFLAGGED_SEED, "enable_safety_checker": true,
                        "image_size": {"width": size.0, "height": size.1}, "output_format": "png"}))
        .await;
    let result = broker.completed(&id).await;
    assert_eq!(flags(&result), [false]);
    let images = download_images(&result, size).await;
    assert!(!is_black(&images[0]), "an unflagged image is kept");
    // PNG is lossless: this is exactly the image the worker checked.
    let p = vit_probabilities(&checker, &images);
    println!("unflagged case: p(nsfw) = {p:?}");
    assert!(
        p[0] <= 0.5,
        "the tiny checker genuinely passes it: p(nsfw) = {}",
        p[0]
    );
    stop_worker(worker).await;
    broker.drop().await;
}

#[tokio::test]
async fn forced_checker_blackens_flagged_images_and_disabled_check_skips_the_model() {
    let mut broker = Broker::new().await;
    let forced = forced_nsfw_checker();
    let worker = spawn_worker(&broker.topology, "safety-flagged", ("v2", &forced.0), false);
    let size = (320, 256);
    let flagged = broker
        .publish(
            json!({"prompt": "a quiet meadow", "seed": UNFLAGGED_SEED, "num_images": 2,
                        "image_size": {"width": size.0, "height": size.1}, "output_format": "png"}),
        )
        .await;
    let unchecked = broker
        .publish(json!({"prompt": "a quiet meadow", "seed": UNFLAGGED_SEED, "enable_safety_checker": false,
                        "image_size": {"width": size.0, "height": size.1}, "output_format": "png"}))
        .await;

    let result = broker.completed(&flagged).await;
    assert_eq!(flags(&result), [true, true]);
    let images = download_images(&result, size).await;
    assert_eq!(images.len(), 2);
    for img in &images {
        assert!(
            is_black(img),
            "a flagged image is uploaded with every pixel 0"
        );
    }

    let result = broker.completed(&unchecked).await;
    assert_eq!(flags(&result), [false], "checker disabled: all flags false");
    let images = download_images(&result, size).await;
    assert!(!is_black(&images[0]), "checker disabled: the image is kept");
    // The forced checker flags this very image, so a model call would have blackened it.
    let p = vit_probabilities(&forced.0, &images);
    assert!(
        p[0] > 0.5,
        "the forced checker flags the kept image: p(nsfw) = {}",
        p[0]
    );
    stop_worker(worker).await;
    broker.drop().await;
}

#[tokio::test]
async fn worker_refuses_to_start_when_the_checker_cannot_load() {
    let broker = Broker::new().await;
    let broken = edited_checker(&tiny("nsfw_vit"), Edit::Remove("classifier.weight"));
    // Queued before the worker starts: a worker that consumed anything would start it.
    let id = broker
        .publish(json!({"prompt": "never run", "seed": 1}))
        .await;
    let worker = spawn_worker(&broker.topology, "safety-broken", ("v2", &broken.0), true);
    let output: Output = tokio::time::timeout(WAIT, worker.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("a worker with a broken checker did not exit within {WAIT:?}"))
        .expect("wait for the worker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "non-zero exit: {:?}\n{stderr}",
        output.status
    );
    assert!(
        stderr.contains("classifier.weight"),
        "stderr names the missing weight:\n{stderr}"
    );
    let depth = queue::queue_depth(
        &broker.publisher.channel(),
        &broker.topology.job_queue(EndpointKind::Sprint),
    )
    .await
    .expect("queue depth");
    assert_eq!(depth, 1, "the job was never consumed");
    assert!(
        broker.log.of(&id).is_empty(),
        "no event for the job: {:?}",
        broker.log.of(&id)
    );
    broker.drop().await;
}

/// The v1 checker loads and runs: the checked job's flag equals what `fleet_worker::safety`'s v1 says of the same
/// image, regenerated unchecked (same prompt and seed; generation is deterministic on the CPU).
#[tokio::test]
async fn v1_checker_loads_and_completes_a_job() {
    let mut broker = Broker::new().await;
    let checker = tiny("sd_safety_checker");
    let worker = spawn_worker(&broker.topology, "safety-v1", ("v1", &checker), false);
    let size = (256, 256);
    let input = |check: bool| {
        json!({"prompt": "a quiet meadow", "seed": UNFLAGGED_SEED, "enable_safety_checker": check,
               "image_size": {"width": size.0, "height": size.1}, "output_format": "png"})
    };
    let checked = broker.publish(input(true)).await;
    let unchecked = broker.publish(input(false)).await;
    let result = broker.completed(&checked).await;
    let flags = flags(&result);
    println!("v1 case: has_nsfw_concepts = {flags:?}");
    assert_eq!(flags.len(), 1);
    let checked_images = download_images(&result, size).await;

    let result = broker.completed(&unchecked).await;
    let kept = download_images(&result, size).await;
    assert!(!is_black(&kept[0]), "checker disabled: the image is kept");
    let v1 = safety::load_checker(
        SafetyCheckerVersion::V1,
        &ModelSource::new(checker.to_string_lossy()),
        &Device::Cpu,
        DType::F32,
    )
    .expect("load the v1 checker");
    assert_eq!(
        v1.check(&kept).expect("check"),
        flags,
        "the worker's v1 flag"
    );
    if flags[0] {
        assert!(
            is_black(&checked_images[0]),
            "flagged by v1: uploaded black"
        );
    } else {
        assert_eq!(
            checked_images[0], kept[0],
            "passed by v1: uploaded unchanged"
        );
    }
    stop_worker(worker).await;
    broker.drop().await;
}
