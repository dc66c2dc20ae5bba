//! Parity of the safety checkers with transformers/diffusers/Pillow on the tiny random-weight
//! checkpoints `tests/fixtures/tiny/{nsfw_vit,sd_safety_checker}` and the reference tensors in
//! `tests/fixtures/reference/safety.{safetensors,json}` + `resize_*.png` (documented in
//! `tests/fixtures/README.md`; Pillow 13.0.0, transformers 5.24.0, diffusers 0.42.1, CPU f32).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fleet_worker::safety::processor::ResizeTarget;
use fleet_worker::safety::resize::{resize, Filter};
use fleet_worker::safety::{
    apply, load_checker, load_clip, load_vit, SafetyCheckerVersion, SafetyError,
};
use image::RgbImage;
use sana_pipelines::loader::ModelSource;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn png(name: &str) -> RgbImage {
    let path = fixtures().join("reference").join(name);
    image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("reference/safety.safetensors"),
        &Device::Cpu,
    )
    .expect("reference/safety.safetensors")
}

fn sources() -> Vec<RgbImage> {
    (0..6)
        .map(|i| png(&format!("safety_src_{i}.png")))
        .collect()
}

fn tiny(name: &str) -> ModelSource {
    ModelSource::new(fixtures().join("tiny").join(name).to_string_lossy())
}

fn flags(t: &Tensor) -> Vec<bool> {
    t.to_vec1::<u8>()
        .expect("u8 flags")
        .into_iter()
        .map(|f| f != 0)
        .collect()
}

/// ||a - b|| / ||b|| over all elements.
fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b)
        .and_then(|d| d.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>())
        .expect("same shapes");
    let norm = b
        .sqr()
        .and_then(|s| s.sum_all()?.sqrt()?.to_scalar::<f32>())
        .expect("f32");
    diff / norm
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("same shapes")
}

#[test]
fn resize_matches_pillow_bytes() {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/safety.json")).expect("safety.json"),
    )
    .expect("json");
    let src = sources();
    let entries = meta["resize_pngs"].as_array().expect("resize_pngs");
    assert!(entries.len() >= 7);
    for e in entries {
        let img = &src[e["source"].as_u64().expect("source") as usize];
        let (w, h, filter) = match e["kind"].as_str().expect("kind") {
            "bilinear_224" => (224, 224, Filter::Bilinear),
            "bicubic_224" => (224, 224, Filter::Bicubic),
            "bicubic_short224" => {
                let (w, h) = ResizeTarget::ShortestEdge(224).output_size(img.width(), img.height());
                (w, h, Filter::Bicubic)
            }
            other => panic!("unknown resize kind {other}"),
        };
        let expected = png(e["png"].as_str().expect("png"));
        let ours = resize(img, w, h, filter).expect("non-empty");
        assert_eq!(ours.dimensions(), expected.dimensions());
        let max = ours
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        println!("resize {}: max abs diff {max} u8 levels", e["png"]);
        // Byte-exact Pillow reimplementation: tolerance 0 levels.
        assert_eq!(max, 0, "{}", e["png"]);
    }
}

#[test]
fn vit_v2_logits_and_flags_match_transformers() {
    let r = reference();
    let checker = load_vit(&tiny("nsfw_vit"), &Device::Cpu, DType::F32).expect("tiny ViT loads");
    let images = sources();
    let pixel_values = checker.pixel_values(&images).expect("preprocess");
    let logits = checker.logits(&pixel_values).expect("forward");
    let rel = rel_l2(&logits, &r["vit_logits"]);
    println!("v2 logits rel L2 {rel:e}");
    assert!(rel <= 1e-4, "rel L2 {rel} > 1e-4");
    let probs = Tensor::new(
        checker.nsfw_probabilities(&logits).expect("softmax"),
        &Device::Cpu,
    )
    .expect("tensor");
    let ref_p = r["vit_probs"]
        .narrow(1, 1, 1)
        .and_then(|t| t.flatten_all())
        .expect("p(nsfw) column");
    println!("v2 p(nsfw) max abs diff {:e}", max_abs(&probs, &ref_p));
    let expected = flags(&r["vit_flags"]);
    // The fixture must exercise both sides of the 0.5 threshold or the flag check proves little.
    assert!(
        expected.contains(&true) && expected.contains(&false),
        "{expected:?}"
    );
    let boxed = load_checker(
        SafetyCheckerVersion::V2,
        &tiny("nsfw_vit"),
        &Device::Cpu,
        DType::F32,
    )
    .expect("loads");
    assert_eq!(boxed.check(&images).expect("check"), expected);
}

#[test]
fn clip_v1_pixel_values_embeds_and_flags_match_diffusers() {
    let r = reference();
    let checker =
        load_clip(&tiny("sd_safety_checker"), &Device::Cpu, DType::F32).expect("tiny CLIP loads");
    let images = sources();
    let pixel_values = checker.pixel_values(&images).expect("preprocess");
    let pv1 = pixel_values.narrow(0, 1, 1).expect("image 1");
    let pv_diff = max_abs(&pv1, &r["v1_pixel_values_1"]);
    println!("v1 pixel_values[1] max abs diff {pv_diff:e}");
    // Same u8 bytes and the same f32 op order as transformers: exact up to f32 rounding (1e-6).
    assert!(pv_diff <= 1e-6, "{pv_diff}");

    let embeds = checker.image_embeds(&pixel_values).expect("forward");
    let rel = rel_l2(&embeds, &r["v1_image_embeds"]);
    println!("v1 image_embeds rel L2 {rel:e}");
    assert!(rel <= 1e-4, "rel L2 {rel} > 1e-4");

    let scores = checker.scores(&embeds).expect("cosines");
    let special = Tensor::new(scores.special.clone(), &Device::Cpu).expect("(6, 3)");
    let concept = Tensor::new(scores.concept.clone(), &Device::Cpu).expect("(6, 17)");
    let (ds, dc) = (
        max_abs(&special, &r["v1_special_cos"]),
        max_abs(&concept, &r["v1_concept_cos"]),
    );
    println!("v1 cosine max abs diff special {ds:e} concept {dc:e}");
    // Cosines of unit vectors; 1e-5 absolute keeps them far inside one 1e-3 rounding step.
    assert!(ds <= 1e-5 && dc <= 1e-5, "{ds} {dc}");

    // Rounded scores and the special-care adjustment: exact, the <= 1.5e-7 cosine differences above do
    // not cross a rounding boundary (x * 1000 = k + 0.5) on these images.
    let per_image = checker.image_scores(&scores);
    let ref_special = r["v1_special_scores"].to_vec2::<f32>().expect("(6, 3)");
    let ref_concept = r["v1_concept_scores"].to_vec2::<f32>().expect("(6, 17)");
    let ref_adj = r["v1_adjustment"].to_vec1::<f32>().expect("(6,)");
    for (i, s) in per_image.iter().enumerate() {
        assert_eq!(s.special, ref_special[i], "special scores of image {i}");
        assert_eq!(s.concept, ref_concept[i], "concept scores of image {i}");
        assert_eq!(s.adjustment, ref_adj[i], "adjustment of image {i}");
    }
    let expected = flags(&r["v1_flags"]);
    assert!(
        expected.contains(&true) && expected.contains(&false),
        "{expected:?}"
    );
    // Some image must be flagged only through the +0.01 special-care adjustment (safety.json says 3).
    assert!(
        per_image.iter().any(|s| s.adjustment > 0.0),
        "no special-care hit exercised"
    );
    assert_eq!(checker.flags(&scores), expected);
    let boxed = load_checker(
        SafetyCheckerVersion::V1,
        &tiny("sd_safety_checker"),
        &Device::Cpu,
        DType::F32,
    )
    .expect("loads");
    assert_eq!(boxed.check(&images).expect("check"), expected);
}

/// A copy of a tiny checkpoint in a fresh temp dir, removed on drop.
struct TempCopy(PathBuf);

impl TempCopy {
    fn of(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fleet-safety-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for f in [
            "config.json",
            "preprocessor_config.json",
            "model.safetensors",
        ] {
            std::fs::copy(fixtures().join("tiny").join(name).join(f), dir.join(f))
                .expect("copy fixture");
        }
        Self(dir)
    }

    fn rename_weight(&self, from: &str, to: &str) {
        let path = self.0.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("weights");
        let t = tensors
            .remove(from)
            .unwrap_or_else(|| panic!("fixture has {from}"));
        tensors.insert(to.to_string(), t);
        candle_core::safetensors::save(&tensors, &path).expect("rewrite weights");
    }

    fn source(&self) -> ModelSource {
        ModelSource::new(self.0.to_string_lossy())
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_err(version: SafetyCheckerVersion, src: &ModelSource) -> String {
    match load_checker(version, src, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} should not load", src.id),
        Err(e @ SafetyError::Load(_)) => e.to_string(),
        Err(other) => panic!("expected a load error, got {other}"),
    }
}

#[test]
fn misnamed_or_missing_files_fail_naming_them() {
    let vit = TempCopy::of("nsfw_vit");
    vit.rename_weight("classifier.weight", "classifier.weights");
    let e = load_err(SafetyCheckerVersion::V2, &vit.source());
    println!("misnamed v2 weight: {e}");
    assert!(e.contains("classifier.weight"), "{e}");

    let clip = TempCopy::of("sd_safety_checker");
    clip.rename_weight(
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.cls",
    );
    let e = load_err(SafetyCheckerVersion::V1, &clip.source());
    println!("misnamed v1 weight: {e}");
    assert!(e.contains("class_embedding"), "{e}");

    let clip = TempCopy::of("sd_safety_checker");
    clip.rename_weight("special_care_embeds_weights", "special_care_weights");
    let e = load_err(SafetyCheckerVersion::V1, &clip.source());
    assert!(e.contains("special_care_embeds_weights"), "{e}");

    let no_proc = TempCopy::of("nsfw_vit");
    std::fs::remove_file(no_proc.0.join("preprocessor_config.json")).expect("remove");
    let e = load_err(SafetyCheckerVersion::V2, &no_proc.source());
    assert!(e.contains("preprocessor_config.json"), "{e}");

    let missing = fixtures().join("tiny/no_such_checker");
    let e = load_err(
        SafetyCheckerVersion::V2,
        &ModelSource::new(missing.to_string_lossy()),
    );
    println!("missing directory: {e}");
    assert!(e.contains("no_such_checker"), "{e}");
}

#[test]
fn apply_blackens_exactly_the_flagged_images() {
    let mut images = sources();
    let before = images.clone();
    let flags = [false, true, false, true, false, false];
    apply(&mut images, &flags);
    for (i, (after, orig)) in images.iter().zip(&before).enumerate() {
        assert_eq!(after.dimensions(), orig.dimensions());
        if flags[i] {
            assert!(
                after.pixels().all(|p| p.0 == [0, 0, 0]),
                "image {i} not black"
            );
        } else {
            assert_eq!(after, orig, "image {i} changed");
        }
    }
}
