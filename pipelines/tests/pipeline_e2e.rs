//! End-to-end parity of the Sana / Sana-Sprint pipelines against diffusers 0.42.1 (CPU, f32) on the tiny
//! random-weight checkpoints in `tests/fixtures/tiny/`, with the initial latents (and Sprint's per-step
//! noises) that the reference run used injected through `InjectedNoise`. Reference images:
//! `tests/fixtures/reference/e2e_*.png` (settings in `e2e.json`, tensors in `e2e.safetensors`, produced by
//! `tools/make_tiny_fixtures.py`). Also covers the shared text encoder, seeded generation and cancellation.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use sana_pipelines::image_ops::psnr;
use sana_pipelines::loader::ModelSource;
use sana_pipelines::sana::{load_pipelines, InjectedNoise, Pipelines, PipelinesConfig, RunOptions};
use sana_pipelines::{GenerateRequest, NoProgress, PipelineError, PipelineKind, StepObserver};

/// Images must match the diffusers reference to this PSNR (8-bit RGB). The f32 CPU computation differs only
/// in summation order (matmul/conv blocking, libm), so almost every pixel is identical.
const MIN_PSNR_DB: f64 = 40.0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Both tiny pipelines, loaded once for all tests (loading is the slow part on 2 cores).
fn pipelines() -> &'static Mutex<Pipelines> {
    static P: OnceLock<Mutex<Pipelines>> = OnceLock::new();
    P.get_or_init(|| {
        let cfg = PipelinesConfig {
            base: Some(ModelSource::new(
                fixtures().join("tiny/sana").to_string_lossy(),
            )),
            sprint: Some(ModelSource::new(
                fixtures().join("tiny/sana_sprint").to_string_lossy(),
            )),
            device: Device::Cpu,
            dtype: DType::F32,
        };
        Mutex::new(load_pipelines(&cfg).expect("tiny fixture pipelines load"))
    })
}

fn reference() -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    let dir = fixtures().join("reference");
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("e2e.json")).unwrap()).unwrap();
    let st = candle_core::safetensors::load(dir.join("e2e.safetensors"), &Device::Cpu).unwrap();
    (meta, st)
}

fn load_png(name: &str) -> image::RgbImage {
    image::open(fixtures().join("reference").join(name))
        .expect("reference png")
        .to_rgb8()
}

fn request(
    meta: &serde_json::Value,
    case: &serde_json::Value,
    endpoint: PipelineKind,
) -> GenerateRequest {
    GenerateRequest {
        endpoint,
        prompt: meta["prompt"].as_str().unwrap().to_string(),
        negative_prompt: meta["negative_prompt"].as_str().unwrap().to_string(),
        width: case["width"].as_u64().unwrap() as u32,
        height: case["height"].as_u64().unwrap() as u32,
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as u32,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        seed: 0,
        num_images: case["num_images_per_prompt"].as_u64().unwrap() as u32,
    }
}

fn check_images(name: &str, got: &[image::RgbImage], case: &serde_json::Value) {
    let pngs = case["pngs"].as_array().unwrap();
    assert_eq!(got.len(), pngs.len(), "{name}: image count");
    for (img, png) in got.iter().zip(pngs) {
        let want = load_png(png.as_str().unwrap());
        assert_eq!(img.dimensions(), want.dimensions(), "{name}: size");
        let p = psnr(img, &want);
        eprintln!("{name}: {} PSNR {p:.2} dB", png.as_str().unwrap());
        assert!(p >= MIN_PSNR_DB, "{name}: PSNR {p:.2} dB < {MIN_PSNR_DB}");
    }
}

fn run_base_case(name: &str) {
    let (meta, st) = reference();
    let case = &meta["cases"][name];
    let req = request(&meta, case, PipelineKind::Base);
    let opts = RunOptions {
        use_resolution_binning: case["use_resolution_binning"].as_bool().unwrap(),
        ..RunOptions::default()
    };
    let mut noise = InjectedNoise::new([st[&format!("{name}_latents_init")].clone()]);
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    let base = guard.base().expect("base loaded");
    let images = base
        .generate_with_noise(&req, &mut noise, opts, &mut NoProgress)
        .unwrap();
    assert_eq!(noise.remaining(), 0);
    check_images(name, &images, case);
}

#[test]
fn base_512_matches_diffusers() {
    run_base_case("base_512");
}

#[test]
fn base_300x200_binned_resized_matches_diffusers() {
    run_base_case("base_300x200");
}

#[test]
fn base_two_images_match_diffusers() {
    run_base_case("base_n2");
}

#[test]
fn sprint_512_matches_diffusers() {
    let (meta, st) = reference();
    let case = &meta["cases"]["sprint_512"];
    let req = request(&meta, case, PipelineKind::Sprint);
    let noises = &st["sprint_512_noises"];
    let draws = [
        st["sprint_512_latents_init"].clone(),
        noises.get(0).unwrap(),
        noises.get(1).unwrap(),
    ];
    let mut noise = InjectedNoise::new(draws);
    // diffusers ran without binning (its Sprint pipeline only bins for sample_size 32); 512² is its own bin.
    let opts = RunOptions {
        use_resolution_binning: case["use_resolution_binning"].as_bool().unwrap(),
        ..RunOptions::default()
    };
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    let sprint = guard.sprint().expect("sprint loaded");
    let images = sprint
        .generate_with_noise(&req, &mut noise, opts, &mut NoProgress)
        .unwrap();
    assert_eq!(noise.remaining(), 0, "latents + one noise per step");
    check_images("sprint_512", &images, case);
}

#[test]
fn text_encoder_is_loaded_once_and_shared() {
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    let te_files: Vec<&PathBuf> = guard
        .loaded_weight_files()
        .iter()
        .filter(|p| p.to_string_lossy().contains("text_encoder"))
        .collect();
    assert_eq!(te_files.len(), 1, "{te_files:?}");
    assert!(
        te_files[0].starts_with(fixtures().join("tiny/sana")),
        "{te_files:?}"
    );
    assert!(!guard
        .loaded_weight_files()
        .iter()
        .any(|p| p.starts_with(fixtures().join("tiny/sana_sprint/text_encoder"))));
    let base_te = guard.base().unwrap().text_encoder().clone();
    let sprint_te = guard.sprint().unwrap().text_encoder().clone();
    assert!(std::sync::Arc::ptr_eq(&base_te, &sprint_te));
    assert_eq!(
        guard.kinds(),
        vec![PipelineKind::Base, PipelineKind::Sprint]
    );
}

struct Recorder {
    steps: Vec<(u32, u32)>,
    cancel_at: Option<u32>,
}

impl StepObserver for Recorder {
    fn on_step(&mut self, step: u32, total: u32) -> Result<(), PipelineError> {
        self.steps.push((step, total));
        if self.cancel_at == Some(step) {
            return Err(PipelineError::Cancelled);
        }
        Ok(())
    }
}

fn seeded_request(endpoint: PipelineKind, seed: u64) -> GenerateRequest {
    GenerateRequest {
        endpoint,
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: String::new(),
        width: 200,
        height: 136,
        num_inference_steps: endpoint.default_steps().min(4),
        guidance_scale: 5.0,
        seed,
        num_images: 2,
    }
}

#[test]
fn seeded_generation_is_deterministic_sized_and_reports_progress() {
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    for kind in PipelineKind::ALL {
        let p = guard.get_mut(kind).expect("loaded");
        let req = seeded_request(kind, 7);
        let mut rec = Recorder {
            steps: vec![],
            cancel_at: None,
        };
        let a = p.generate(&req, &mut rec).unwrap();
        let n = req.num_inference_steps;
        assert_eq!(
            rec.steps,
            (1..=n).map(|s| (s, n)).collect::<Vec<_>>(),
            "{kind}"
        );
        assert_eq!(a.len(), 2);
        assert!(
            a.iter().all(|i| i.dimensions() == (200, 136)),
            "{kind}: requested size, after bin + crop"
        );
        assert_ne!(a[0], a[1], "{kind}: the two images get different noise");
        let b = p.generate(&req, &mut NoProgress).unwrap();
        assert_eq!(a, b, "{kind}: same seed, same images");
        let c = p
            .generate(&seeded_request(kind, 8), &mut NoProgress)
            .unwrap();
        assert_ne!(a[0], c[0], "{kind}: another seed changes the image");
    }
}

#[test]
fn observer_error_cancels_between_steps() {
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    let p = guard.get_mut(PipelineKind::Base).unwrap();
    let mut req = seeded_request(PipelineKind::Base, 1);
    req.num_inference_steps = 5;
    let mut rec = Recorder {
        steps: vec![],
        cancel_at: Some(2),
    };
    let err = p.generate(&req, &mut rec).unwrap_err();
    assert!(matches!(err, PipelineError::Cancelled), "{err:?}");
    assert_eq!(
        rec.steps,
        vec![(1, 5), (2, 5)],
        "no step after the cancelling one"
    );
}

#[test]
fn wrong_endpoint_and_unbinnable_sizes_are_rejected() {
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    let base = guard.base().unwrap();
    let req = seeded_request(PipelineKind::Sprint, 1);
    let mut noise = InjectedNoise::default();
    let err = base
        .generate_with_noise(&req, &mut noise, RunOptions::default(), &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, PipelineError::InvalidRequest(_)), "{err:?}");
    let mut req = seeded_request(PipelineKind::Base, 1);
    req.width = 300; // not a multiple of 32 without binning
    let opts = RunOptions {
        use_resolution_binning: false,
        ..RunOptions::default()
    };
    let err = base
        .generate_with_noise(&req, &mut noise, opts, &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, PipelineError::InvalidRequest(_)), "{err:?}");
}

#[test]
fn warm_up_runs_every_loaded_pipeline_once_at_the_given_size() {
    let mut pipes = pipelines().lock().unwrap();
    let times = pipes.warm_up(300, 200).expect("warm-up");
    let kinds: Vec<PipelineKind> = times.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, vec![PipelineKind::Base, PipelineKind::Sprint]);
    assert!(times.iter().all(|(_, s)| *s > 0.0));
}
