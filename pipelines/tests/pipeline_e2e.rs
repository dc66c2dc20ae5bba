//! End-to-end parity of the Sana / Sana-Sprint pipelines against diffusers 0.42.1 (CPU, f32) on the tiny
//! random-weight checkpoints in `tests/fixtures/tiny/`, with the initial latents (and Sprint's per-step
//! noises) that the reference run used injected through `InjectedNoise`. Reference images:
//! `tests/fixtures/reference/e2e_*.png` (settings in `e2e.json`, tensors in `e2e.safetensors`, produced by
//! `tools/make_tiny_fixtures.py`). Also covers the shared text encoder, seeded generation and cancellation,
//! and cross-request batching: a request run in a batch gives bit-for-bit the images of its solo run
//! (`batched_*`; see `BATCH_EXACTNESS`).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use sana_pipelines::image_ops::psnr;
use sana_pipelines::loader::ModelSource;
use sana_pipelines::sana::{load_pipelines, InjectedNoise, Pipelines, PipelinesConfig, RunOptions};
use sana_pipelines::{
    BatchEntry, GenerateRequest, NoProgress, PipelineError, PipelineKind, StepObserver,
};

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

/// Exactness of a batched request against its solo run on the CPU in f32: bit-exact. Every op of the text
/// encoder, transformer and sampler is row-independent and candle's CPU kernels sum in an order that does
/// not depend on the batch size (observed: identical images), so equality is asserted, not a PSNR bound.
/// (On CUDA, cuBLAS may pick another GEMM algorithm per batch size; there the bound is PSNR ≥ 60 dB.)
const BATCH_EXACTNESS: &str = "bit-exact (assert_eq on the RGB images)";

/// Requests of one batch: other prompts, negative prompts, seeds, guidance scales, image counts and output
/// sizes, all binned to the same generation size (300×200 and 600×400 share the 512-table bin of 2:3).
fn batch_requests(kind: PipelineKind, steps: u32) -> Vec<GenerateRequest> {
    let one = |prompt: &str, neg: &str, (w, h): (u32, u32), seed, g, n| GenerateRequest {
        endpoint: kind,
        prompt: prompt.into(),
        negative_prompt: neg.into(),
        width: w,
        height: h,
        num_inference_steps: steps,
        guidance_scale: g,
        seed,
        num_images: n,
    };
    vec![
        one("a lighthouse at dusk", "", (300, 200), 7, 5.0, 1),
        one("three red apples", "blurry", (600, 400), 11, 4.5, 2),
        one("a fox in the snow", "low quality", (300, 200), 12, 7.0, 1),
    ]
}

fn solo_runs(kind: PipelineKind, reqs: &[GenerateRequest]) -> Vec<Vec<image::RgbImage>> {
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    let p = guard.get_mut(kind).expect("loaded");
    reqs.iter()
        .map(|r| p.generate(r, &mut NoProgress).expect("solo run"))
        .collect()
}

/// Runs `reqs` as one batch with a recorder per request (cancelling where `cancel_at` says).
fn batched_run(
    kind: PipelineKind,
    reqs: &[GenerateRequest],
    cancel_at: &[Option<u32>],
) -> (
    Vec<Result<Vec<image::RgbImage>, PipelineError>>,
    Vec<Recorder>,
) {
    let mut recorders: Vec<Recorder> = cancel_at
        .iter()
        .map(|&cancel_at| Recorder {
            steps: vec![],
            cancel_at,
        })
        .collect();
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    let p = guard.get_mut(kind).expect("loaded");
    let keys: Vec<_> = reqs.iter().map(|r| p.batch_key(r).expect("key")).collect();
    assert!(
        keys.windows(2).all(|k| k[0] == k[1]),
        "{kind}: one batch key: {keys:?}"
    );
    let mut entries: Vec<BatchEntry<'_>> = reqs
        .iter()
        .zip(recorders.iter_mut())
        .map(|(request, rec)| BatchEntry {
            request,
            observer: rec,
        })
        .collect();
    let out = p.generate_batch(&mut entries).expect("the batch runs");
    drop(entries);
    (out, recorders)
}

fn assert_batched_equals_solo(kind: PipelineKind, steps: u32) {
    let reqs = batch_requests(kind, steps);
    let solo = solo_runs(kind, &reqs);
    let (batched, recorders) = batched_run(kind, &reqs, &[None, None, None]);
    assert_eq!(batched.len(), reqs.len());
    for (i, ((got, want), rec)) in batched.into_iter().zip(&solo).zip(&recorders).enumerate() {
        let got = got.unwrap_or_else(|e| panic!("{kind} request {i}: {e}"));
        assert_eq!(got.len(), want.len(), "{kind} request {i}: image count");
        for (a, b) in got.iter().zip(want) {
            assert_eq!(
                a.dimensions(),
                (reqs[i].width, reqs[i].height),
                "its own size"
            );
            let p = psnr(a, b);
            eprintln!("{kind} batched request {i} vs solo: PSNR {p} dB");
            assert!(
                a == b,
                "{kind} request {i}: {BATCH_EXACTNESS} violated (PSNR {p:.2} dB)"
            );
        }
        assert_eq!(
            rec.steps,
            (1..=steps).map(|s| (s, steps)).collect::<Vec<_>>(),
            "{kind} request {i}: its own progress, every step"
        );
    }
}

#[test]
fn batched_sprint_equals_solo_runs() {
    assert_batched_equals_solo(PipelineKind::Sprint, 2);
}

#[test]
fn batched_base_with_per_request_guidance_equals_solo_runs() {
    assert_batched_equals_solo(PipelineKind::Base, 3);
}

#[test]
fn a_cancelled_request_leaves_the_batch_without_disturbing_the_others() {
    for (kind, steps) in [(PipelineKind::Base, 4), (PipelineKind::Sprint, 3)] {
        let reqs = batch_requests(kind, steps);
        let solo = solo_runs(kind, &reqs);
        let (batched, recorders) = batched_run(kind, &reqs, &[None, Some(2), None]);
        let err = batched[1].as_ref().unwrap_err();
        assert!(matches!(err, PipelineError::Cancelled), "{kind}: {err:?}");
        assert_eq!(recorders[1].steps, vec![(1, steps), (2, steps)], "{kind}");
        for i in [0, 2] {
            let got = batched[i].as_ref().expect("the others complete");
            assert!(
                got == &solo[i],
                "{kind} request {i}: {BATCH_EXACTNESS} after a member left"
            );
            assert_eq!(recorders[i].steps.len(), steps as usize);
        }
    }
}

#[test]
fn incompatible_and_invalid_requests_fail_alone_in_a_batch() {
    let mut reqs = batch_requests(PipelineKind::Base, 2);
    reqs.truncate(2);
    let mut other_size = reqs[0].clone();
    other_size.width = 512;
    other_size.height = 512;
    let mut no_cfg = reqs[0].clone();
    no_cfg.guidance_scale = 1.0;
    let mut wrong_kind = reqs[0].clone();
    wrong_kind.endpoint = PipelineKind::Sprint;
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    let base = guard.base().expect("base loaded");
    for (why, bad) in [("size", &other_size), ("cfg", &no_cfg)] {
        let (a, b) = (
            sana_pipelines::ImagePipeline::batch_key(base, &reqs[0]).unwrap(),
            sana_pipelines::ImagePipeline::batch_key(base, bad).unwrap(),
        );
        assert_ne!(a, b, "{why} changes the batch key");
    }
    assert!(sana_pipelines::ImagePipeline::batch_key(base, &wrong_kind).is_err());
    drop(guard);
    let all = [reqs[0].clone(), other_size, wrong_kind, reqs[1].clone()];
    let solo = solo_runs(PipelineKind::Base, &[reqs[0].clone(), reqs[1].clone()]);
    let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
    let p = guard.get_mut(PipelineKind::Base).unwrap();
    let mut observers = [NoProgress, NoProgress, NoProgress, NoProgress];
    let mut entries: Vec<BatchEntry<'_>> = all
        .iter()
        .zip(observers.iter_mut())
        .map(|(request, o)| BatchEntry {
            request,
            observer: o,
        })
        .collect();
    let out = p.generate_batch(&mut entries).expect("the batch runs");
    for i in [1, 2] {
        assert!(
            matches!(out[i], Err(PipelineError::InvalidRequest(_))),
            "request {i}: {:?}",
            out[i].as_ref().err()
        );
    }
    assert!(out[0].as_ref().unwrap() == &solo[0], "{BATCH_EXACTNESS}");
    assert!(out[3].as_ref().unwrap() == &solo[1], "{BATCH_EXACTNESS}");
}

/// Logs its request's steps into a log shared by every member of a batch.
struct Logged<'a> {
    idx: usize,
    log: &'a std::cell::RefCell<Vec<String>>,
    cancel_at: Option<u32>,
}

impl StepObserver for Logged<'_> {
    fn on_step(&mut self, step: u32, _total: u32) -> Result<(), PipelineError> {
        self.log
            .borrow_mut()
            .push(format!("step {} of {}", step, self.idx));
        if self.cancel_at == Some(step) {
            return Err(PipelineError::Cancelled);
        }
        Ok(())
    }
}

#[test]
fn each_request_of_a_batch_is_answered_when_its_outcome_is_final() {
    for (kind, steps) in [(PipelineKind::Base, 4), (PipelineKind::Sprint, 3)] {
        let mut reqs = batch_requests(kind, steps);
        let mut invalid = reqs[0].clone();
        invalid.num_images = 0;
        reqs.insert(1, invalid);
        // Members: 0 ok, 1 invalid, 2 ok, 3 cancelled after step 2.
        let solo = solo_runs(kind, &[reqs[0].clone(), reqs[2].clone()]);
        let log = std::cell::RefCell::new(Vec::new());
        let mut observers: Vec<Logged<'_>> = (0..reqs.len())
            .map(|idx| Logged {
                idx,
                log: &log,
                cancel_at: (idx == 3).then_some(2),
            })
            .collect();
        let mut guard = pipelines().lock().unwrap_or_else(|p| p.into_inner());
        let p = guard.get_mut(kind).expect("loaded");
        let mut entries: Vec<BatchEntry<'_>> = reqs
            .iter()
            .zip(observers.iter_mut())
            .map(|(request, observer)| BatchEntry { request, observer })
            .collect();
        let mut outcomes: Vec<Option<Result<Vec<image::RgbImage>, PipelineError>>> =
            reqs.iter().map(|_| None).collect();
        p.generate_batch_each(&mut entries, &mut |i, outcome| {
            log.borrow_mut().push(format!("answer {i}"));
            assert!(
                outcomes[i].replace(outcome).is_none(),
                "{kind}: {i} answered twice"
            );
        })
        .expect("the batch runs");
        drop((entries, guard));
        let log = log.into_inner();
        let at = |what: &str| {
            log.iter()
                .position(|l| l == what)
                .unwrap_or_else(|| panic!("{kind}: no `{what}` in {log:?}"))
        };
        // The invalid request is answered before any step, the cancelled one right after its last step
        // (before the others' next step), the completed ones after every step, in member order.
        assert!(at("answer 1") < at("step 1 of 0"), "{kind}: {log:?}");
        assert!(at("step 2 of 3") < at("answer 3"), "{kind}: {log:?}");
        assert!(at("answer 3") < at("step 3 of 0"), "{kind}: {log:?}");
        let last_step = format!("step {steps} of 2");
        assert!(at(&last_step) < at("answer 0"), "{kind}: {log:?}");
        assert!(at("answer 0") < at("answer 2"), "{kind}: {log:?}");
        assert!(matches!(
            outcomes[1],
            Some(Err(PipelineError::InvalidRequest(_)))
        ));
        assert!(matches!(outcomes[3], Some(Err(PipelineError::Cancelled))));
        for (i, want) in [(0, &solo[0]), (2, &solo[1])] {
            let got = outcomes[i].take().expect("answered").expect("completed");
            assert!(&got == want, "{kind} request {i}: {BATCH_EXACTNESS}");
        }
    }
}
