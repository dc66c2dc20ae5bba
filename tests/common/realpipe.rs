//! The REAL worker models for the in-process worker tests: the tiny Sana / Sana-Sprint checkpoints
//! (`tests/fixtures/tiny/sana`, `tiny/sana_sprint`) and the tiny NSFW ViT (`tiny/nsfw_vit`), loaded
//! through the production [`SanaFactory`] on the CPU in f32, exactly as the `worker` binary loads them.
//!
//! The only test-side additions are observation and timing control around the real objects:
//! - [`ObservedFactory`] delegates every load to the real factory, counts loads, and reports when the
//!   loaded pipeline set and checker are actually freed (keep-alive `unload` is observable);
//! - every pipeline call goes through a wrapper that counts runs (and records the size of each batched
//!   call, `Probe::batches`) and, when the test gives a [`Gate`],
//!   holds the real run inside its first denoising step (after the step's computation, before its
//!   progress report and cancellation check) until the test lets it go. The images are always the
//!   real pipeline's.
//!
//! [`forced_nsfw_checker`] copies the tiny checker with a `classifier.bias` that makes every image flag.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use candle_core::{DType, Device};
use fleet::job::EndpointKind;
use fleet_worker::safety::{SafetyChecker, SafetyCheckerVersion, SafetyError};
use fleet_worker::{LoadedModels, PipelineFactory, PipelineSet, SanaFactory, SanaFactoryConfig};
use image::RgbImage;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sana_pipelines::loader::ModelSource;
use sana_pipelines::{
    BatchEntry, BatchKey, GenerateRequest, ImagePipeline, PipelineError, RequestOutcome,
    StepObserver,
};
use tokio::sync::{mpsc, watch};

/// `tests/fixtures/tiny/<name>`.
pub fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

/// The worker binary's factory settings for the tiny checkpoints: CPU, f32, the v2 checker from
/// `checker` (a local directory; the stock tiny one unless a test edits it).
pub fn tiny_factory_config(checker: &Path) -> SanaFactoryConfig {
    let local = |p: PathBuf| ModelSource::new(p.to_string_lossy().into_owned());
    SanaFactoryConfig {
        base: local(tiny("sana")),
        sprint: local(tiny("sana_sprint")),
        device: Device::Cpu,
        dtype: DType::F32,
        safety_version: SafetyCheckerVersion::V2,
        safety_model: Some(local(checker.to_path_buf())),
    }
}

/// Permits for pipeline runs: a held run waits inside its first step until a permit is free.
pub struct Gate {
    /// `None` = open for good.
    permits: Mutex<Option<u32>>,
    cv: Condvar,
    /// Runs that reached the gate so far (held or let through).
    arrived: watch::Sender<usize>,
}

impl Gate {
    /// A gate that holds every run until [`Gate::release`] or [`Gate::open`].
    pub fn closed() -> Arc<Self> {
        Arc::new(Gate {
            permits: Mutex::new(Some(0)),
            cv: Condvar::new(),
            arrived: watch::Sender::new(0),
        })
    }

    /// Waits until `n` runs in all have reached the gate, i.e. the real pipeline has computed their first
    /// denoising step; fails after `timeout`.
    pub async fn wait_arrived(&self, n: usize, timeout: std::time::Duration) {
        let mut rx = self.arrived.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&count| count >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} runs did not reach the gate within {timeout:?}"))
            .expect("gate alive");
    }

    /// Lets `n` more runs through.
    pub fn release(&self, n: u32) {
        let mut p = self.permits.lock().expect("gate lock");
        if let Some(count) = p.as_mut() {
            *count += n;
        }
        self.cv.notify_all();
    }

    /// Opens the gate for good.
    pub fn open(&self) {
        *self.permits.lock().expect("gate lock") = None;
        self.cv.notify_all();
    }

    fn pass(&self) {
        self.arrived.send_modify(|count| *count += 1);
        let mut p = self.permits.lock().expect("gate lock");
        loop {
            match p.as_mut() {
                None => return,
                Some(n) if *n > 0 => {
                    *n -= 1;
                    return;
                }
                Some(_) => p = self.cv.wait(p).expect("gate wait"),
            }
        }
    }
}

/// What the models reported as freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Freed {
    Pipelines,
    Checker,
}

/// Observable side effects of the real models.
#[derive(Clone)]
pub struct Probe {
    /// Completed calls of the real factory.
    pub loads: Arc<AtomicUsize>,
    /// Requests run by a real pipeline (`generate` calls plus the requests of `generate_batch_each` calls).
    pub runs: Arc<AtomicUsize>,
    /// Number of requests of each `generate_batch_each` call, in call order (the worker runs even a single
    /// request through it).
    pub batches: Arc<Mutex<Vec<usize>>>,
    freed: mpsc::UnboundedSender<Freed>,
}

impl Probe {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Freed>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let probe = Probe {
            loads: Arc::default(),
            runs: Arc::default(),
            batches: Arc::default(),
            freed: tx,
        };
        (probe, rx)
    }
}

/// A prompt on which the observed pipeline panics (after counting the run), to test that a panic on the
/// model thread fails only its own job.
pub const PANIC_PROMPT: &str = "test: panic in the model thread";

/// The real [`SanaFactory`] with a probe and an optional gate around what it loads.
pub struct ObservedFactory {
    inner: SanaFactory,
    probe: Probe,
    gate: Option<Arc<Gate>>,
}

impl ObservedFactory {
    /// The tiny pipelines with the stock tiny v2 checker.
    pub fn boxed(probe: Probe, gate: Option<Arc<Gate>>) -> Box<dyn PipelineFactory> {
        Self::with_checker(&tiny("nsfw_vit"), probe, gate)
    }

    /// The tiny pipelines with the v2 checker in `checker`.
    pub fn with_checker(
        checker: &Path,
        probe: Probe,
        gate: Option<Arc<Gate>>,
    ) -> Box<dyn PipelineFactory> {
        let inner = SanaFactory {
            config: tiny_factory_config(checker),
        };
        Box::new(ObservedFactory { inner, probe, gate })
    }
}

impl PipelineFactory for ObservedFactory {
    fn load(&mut self, endpoints: &[EndpointKind]) -> Result<LoadedModels, PipelineError> {
        let real = self.inner.load(endpoints)?;
        self.probe.loads.fetch_add(1, Ordering::SeqCst);
        Ok(LoadedModels {
            pipelines: Box::new(ObservedSet {
                inner: Some(real.pipelines),
                kind: None,
                probe: self.probe.clone(),
                gate: self.gate.clone(),
            }),
            safety: Box::new(ObservedChecker {
                inner: Some(real.safety),
                probe: self.probe.clone(),
            }),
        })
    }
}

/// The real pipeline set; it is also the [`ImagePipeline`] it hands out, delegating to the real
/// pipeline of the kind last looked up.
struct ObservedSet {
    /// Always `Some` until dropped (taken in `drop` to free the real models before reporting it).
    inner: Option<Box<dyn PipelineSet>>,
    kind: Option<EndpointKind>,
    probe: Probe,
    gate: Option<Arc<Gate>>,
}

impl PipelineSet for ObservedSet {
    fn pipeline(&mut self, kind: EndpointKind) -> Option<&mut dyn ImagePipeline> {
        let inner = self.inner.as_mut()?;
        inner.pipeline(kind)?;
        self.kind = Some(kind);
        Some(self)
    }

    fn pipeline_ref(&self, kind: EndpointKind) -> Option<&dyn ImagePipeline> {
        self.inner.as_ref()?.pipeline_ref(kind)
    }
}

impl ImagePipeline for ObservedSet {
    fn generate(
        &mut self,
        req: &GenerateRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<RgbImage>, PipelineError> {
        let kind = self.kind.ok_or_else(|| {
            PipelineError::InvalidRequest("generate before a pipeline lookup".into())
        })?;
        let real = self
            .inner
            .as_mut()
            .and_then(|set| set.pipeline(kind))
            .ok_or_else(|| PipelineError::InvalidRequest(format!("no {kind} pipeline")))?;
        self.probe.runs.fetch_add(1, Ordering::SeqCst);
        // Test-only trigger (this file is test code): a model bug that panics on one input.
        if req.prompt == PANIC_PROMPT {
            panic!("test pipeline asked to panic");
        }
        let mut gated = GatedObserver {
            inner: observer,
            gate: self.gate.as_deref(),
        };
        real.generate(req, &mut gated)
    }

    fn batch_key(&self, req: &GenerateRequest) -> Result<BatchKey, PipelineError> {
        let kind = self.kind.ok_or_else(|| {
            PipelineError::InvalidRequest("batch_key before a pipeline lookup".into())
        })?;
        self.inner
            .as_ref()
            .and_then(|set| set.pipeline_ref(kind))
            .ok_or_else(|| PipelineError::InvalidRequest(format!("no {kind} pipeline")))?
            .batch_key(req)
    }

    fn generate_batch_each(
        &mut self,
        batch: &mut [BatchEntry<'_>],
        done: &mut dyn FnMut(usize, RequestOutcome),
    ) -> Result<(), PipelineError> {
        let kind = self.kind.ok_or_else(|| {
            PipelineError::InvalidRequest("generate before a pipeline lookup".into())
        })?;
        let gate = self.gate.clone();
        let real = self
            .inner
            .as_mut()
            .and_then(|set| set.pipeline(kind))
            .ok_or_else(|| PipelineError::InvalidRequest(format!("no {kind} pipeline")))?;
        self.probe.runs.fetch_add(batch.len(), Ordering::SeqCst);
        self.probe
            .batches
            .lock()
            .expect("probe lock")
            .push(batch.len());
        if batch.iter().any(|e| e.request.prompt == PANIC_PROMPT) {
            panic!("test pipeline asked to panic");
        }
        let requests: Vec<&GenerateRequest> = batch.iter().map(|e| e.request).collect();
        let mut gated: Vec<GatedObserver<'_>> = batch
            .iter_mut()
            .map(|e| GatedObserver {
                inner: &mut *e.observer,
                gate: gate.as_deref(),
            })
            .collect();
        let mut entries: Vec<BatchEntry<'_>> = requests
            .into_iter()
            .zip(gated.iter_mut())
            .map(|(request, observer)| BatchEntry { request, observer })
            .collect();
        real.generate_batch_each(&mut entries, done)
    }
}

impl Drop for ObservedSet {
    fn drop(&mut self) {
        drop(self.inner.take());
        let _ = self.probe.freed.send(Freed::Pipelines);
    }
}

/// Holds the run at its first step until the gate lets it pass, then reports as the worker's observer.
struct GatedObserver<'a> {
    inner: &'a mut dyn StepObserver,
    gate: Option<&'a Gate>,
}

impl StepObserver for GatedObserver<'_> {
    fn on_step(&mut self, step: u32, total: u32) -> Result<(), PipelineError> {
        if step == 1 {
            if let Some(gate) = self.gate {
                gate.pass();
            }
        }
        self.inner.on_step(step, total)
    }
}

/// The real checker, reporting when it is freed.
struct ObservedChecker {
    inner: Option<Box<dyn SafetyChecker>>,
    probe: Probe,
}

impl SafetyChecker for ObservedChecker {
    fn check(&self, images: &[RgbImage]) -> Result<Vec<bool>, SafetyError> {
        match &self.inner {
            Some(checker) => checker.check(images),
            None => Err(SafetyError::Load("checker already freed".into())),
        }
    }
}

impl Drop for ObservedChecker {
    fn drop(&mut self) {
        drop(self.inner.take());
        let _ = self.probe.freed.send(Freed::Checker);
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
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

/// Logit gap forcing the nsfw class: ±1000 on the bias dwarfs the O(20) logit differences of the tiny
/// random-weight classifier, so p(nsfw) rounds to 1 for every image.
const FORCED_BIAS: f32 = 1000.0;

/// A copy of `tiny/nsfw_vit` whose `classifier.bias` is +FORCED_BIAS on the nsfw label and −FORCED_BIAS on
/// the others; every other tensor and both JSON files are byte-identical.
pub fn forced_nsfw_checker() -> TempDir {
    let src = tiny("nsfw_vit");
    let text = std::fs::read_to_string(src.join("config.json")).expect("read config.json");
    let cfg: serde_json::Value = serde_json::from_str(&text).expect("config.json is json");
    let nsfw = cfg["label2id"]["nsfw"].as_u64().expect("label2id.nsfw") as usize;
    let labels = cfg["id2label"].as_object().expect("id2label").len();
    let bias: Vec<u8> = (0..labels)
        .map(|i| if i == nsfw { FORCED_BIAS } else { -FORCED_BIAS })
        .flat_map(f32::to_le_bytes)
        .collect();

    let dir = TempDir::new("nsfw-forced");
    for file in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(file), dir.0.join(file)).expect("copy checker json");
    }
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read model.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("parse model.safetensors");
    let mut found = false;
    let mut tensors: Vec<(String, TensorView)> = Vec::new();
    for (key, view) in st.tensors() {
        if key == "classifier.bias" {
            assert_eq!(view.dtype(), Dtype::F32, "classifier.bias is f32");
            assert_eq!(view.data().len(), bias.len(), "one bias per label");
            let shape = view.shape().to_vec();
            let new = TensorView::new(Dtype::F32, shape, &bias).expect("valid tensor view");
            tensors.push((key, new));
            found = true;
        } else {
            tensors.push((key, view));
        }
    }
    assert!(found, "classifier.bias is in {}", src.display());
    let out = safetensors::serialize(tensors, None).expect("serialise weights");
    std::fs::write(dir.0.join("model.safetensors"), out).expect("write model.safetensors");
    dir
}
