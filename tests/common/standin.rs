//! A deterministic stand-in for the Sana pipelines and the NSFW checker, used only by the worker tests to
//! drive the runtime before (and besides) the real candle pipelines. Never part of the library or binaries.
//!
//! - Images: exactly the requested size; pixel `(x, y)` of image `i` is a function of seed, `i`, `x`, `y`.
//!   A prompt containing `[red]` gives pure red images, which the stand-in checker flags as NSFW.
//! - Every step calls the observer, so progress and cancellation work as with the real pipelines.
//! - An optional [`Gate`] makes `generate` wait for a permit before its first step (tests use it to hold
//!   jobs in flight deterministically instead of sleeping).
//! - Loads are counted and dropped pipelines are reported, so keep-alive `unload` is observable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use fleet::job::EndpointKind;
use fleet::pipelines::{GenerateRequest, ImagePipeline, PipelineError, StepObserver};
use fleet::safety::{SafetyChecker, SafetyError};
use fleet::worker::{LoadedModels, PipelineFactory};
use image::{Rgb, RgbImage};
use tokio::sync::mpsc;

/// Permits for `generate` calls; `open` gates never block.
#[derive(Default)]
pub struct Gate {
    permits: Mutex<Option<u32>>,
    cv: Condvar,
}

impl Gate {
    /// A gate that blocks every run until [`Gate::release`].
    pub fn closed() -> Arc<Self> {
        Arc::new(Gate {
            permits: Mutex::new(Some(0)),
            cv: Condvar::new(),
        })
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

/// Observable side effects of the stand-in.
#[derive(Clone)]
pub struct Probe {
    pub loads: Arc<AtomicUsize>,
    pub runs: Arc<AtomicUsize>,
    pub dropped: mpsc::UnboundedSender<()>,
}

impl Probe {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Probe {
                loads: Arc::default(),
                runs: Arc::default(),
                dropped: tx,
            },
            rx,
        )
    }
}

pub struct StandInFactory {
    pub probe: Probe,
    pub gate: Option<Arc<Gate>>,
}

impl StandInFactory {
    pub fn boxed(probe: Probe, gate: Option<Arc<Gate>>) -> Box<dyn PipelineFactory> {
        Box::new(StandInFactory { probe, gate })
    }
}

impl PipelineFactory for StandInFactory {
    fn load(&mut self, endpoints: &[EndpointKind]) -> Result<LoadedModels, PipelineError> {
        self.probe.loads.fetch_add(1, Ordering::SeqCst);
        let mut pipelines: HashMap<EndpointKind, Box<dyn ImagePipeline>> = HashMap::new();
        for kind in endpoints {
            pipelines.insert(
                *kind,
                Box::new(StandInPipeline {
                    probe: self.probe.clone(),
                    gate: self.gate.clone(),
                }),
            );
        }
        Ok(LoadedModels {
            pipelines: Box::new(pipelines),
            safety: Box::new(RedChecker),
        })
    }
}

struct StandInPipeline {
    probe: Probe,
    gate: Option<Arc<Gate>>,
}

impl Drop for StandInPipeline {
    fn drop(&mut self) {
        let _ = self.probe.dropped.send(());
    }
}

/// The deterministic image of the stand-in.
pub fn standin_image(req: &GenerateRequest, index: u32) -> RgbImage {
    if req.prompt.contains("[red]") {
        return RgbImage::from_pixel(req.width, req.height, Rgb([255, 0, 0]));
    }
    let s = req.seed.wrapping_add(u64::from(index) * 7919);
    RgbImage::from_fn(req.width, req.height, |x, y| {
        Rgb([
            (u64::from(x) + s) as u8,
            (u64::from(y).wrapping_mul(3) + (s >> 8)) as u8,
            ((u64::from(x) ^ u64::from(y)) + (s >> 16)) as u8 | 0x10,
        ])
    })
}

impl ImagePipeline for StandInPipeline {
    fn generate(
        &mut self,
        req: &GenerateRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<RgbImage>, PipelineError> {
        self.probe.runs.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.pass();
        }
        for step in 1..=req.num_inference_steps {
            observer.on_step(step, req.num_inference_steps)?;
        }
        Ok((0..req.num_images).map(|i| standin_image(req, i)).collect())
    }
}

/// Flags images that are mostly pure red.
struct RedChecker;

impl SafetyChecker for RedChecker {
    fn check(&self, images: &[RgbImage]) -> Result<Vec<bool>, SafetyError> {
        Ok(images
            .iter()
            .map(|img| img.pixels().take(64).all(|p| p.0 == [255, 0, 0]))
            .collect())
    }
}
