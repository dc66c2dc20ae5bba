//! `worker generate` (worker/src/generate.rs) driven directly on the tiny fixtures: flags → validated input →
//! pipeline → files. The module is compiled into this test crate the same way the worker binary includes it.

#[path = "../src/generate.rs"]
mod generate;

use std::path::{Path, PathBuf};

use candle_core::Device;
use clap::Parser;
use sana_pipelines::image_ops::psnr;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: generate::GenerateArgs,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn temp_dir() -> PathBuf {
    let p = std::env::temp_dir().join(format!("fleet-generate-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn parse(extra: &[&str]) -> generate::GenerateArgs {
    let model = fixtures().join("tiny/sana");
    let mut argv = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).expect("flags parse").args
}

#[test]
fn base_512_with_recorded_latents_matches_diffusers_png() {
    let dir = temp_dir();
    // Recorded initial latents of the reference run, in the `--latents` file layout.
    let st =
        candle_core::safetensors::load(fixtures().join("reference/e2e.safetensors"), &Device::Cpu)
            .unwrap();
    let lat = dir.join("latents.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", st["base_512_latents_init"].clone())]),
        &lat,
    )
    .unwrap();
    let out = dir.join("out");
    let args = parse(&[
        "--endpoint",
        "base",
        "--prompt",
        "A Red Fox in the snow, golden hour",
        "--size",
        "square",
        "--seed",
        "0",
        "--format",
        "png",
        "--out",
        out.to_str().unwrap(),
        "--latents",
        lat.to_str().unwrap(),
    ]);
    generate::run(args).unwrap();
    let got = image::open(out.join("0.png")).unwrap().to_rgb8();
    let want = image::open(fixtures().join("reference/e2e_base_512.png"))
        .unwrap()
        .to_rgb8();
    let p = psnr(&got, &want);
    // Same tolerance as tests/pipeline_e2e.rs (PNG is lossless).
    assert!(p >= 40.0, "PSNR {p:.2} dB");
    assert!(!out.join("1.png").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn seeded_jpeg_batch_is_written_at_the_requested_size() {
    let dir = temp_dir();
    let out = dir.join("out");
    let args = parse(&[
        "--endpoint",
        "base",
        "--prompt",
        "a red fox",
        "--size",
        "200x136",
        "--steps",
        "2",
        "--seed",
        "3",
        "--num-images",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    generate::run(args).unwrap();
    for i in 0..2 {
        let p = out.join(format!("{i}.jpeg"));
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            &bytes[..2],
            &[0xFF, 0xD8],
            "JPEG SOI marker (default output_format is jpeg)"
        );
        assert_eq!(image::open(&p).unwrap().to_rgb8().dimensions(), (200, 136));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn service_validation_rules_apply() {
    let out = std::env::temp_dir().join("fleet-generate-never-written");
    // num_images > 4 and sprint steps > 20 are rejected by fleet::job::validate before any model load.
    for extra in [["--num-images", "5"], ["--steps", "21"]] {
        let mut flags = vec![
            "--endpoint",
            "sprint",
            "--prompt",
            "x",
            "--seed",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        flags.extend_from_slice(&extra);
        let err = generate::run(parse(&flags)).unwrap_err().to_string();
        assert!(err.contains("invalid input"), "{err}");
    }
    let err = generate::run(parse(&[
        "--prompt",
        " ",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("prompt"), "{err}");
    assert!(!out.exists());
}

/// Peak RSS of one `worker generate` process (the real binary) for a sprint image of `size`.
fn peak_rss_of_generate(size: &str) -> u64 {
    let model = fixtures().join("tiny/sana_sprint");
    let out = temp_dir();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["generate", "--device", "cpu", "--endpoint", "sprint"])
        .args(["--model", model.to_str().unwrap()])
        .args(["--prompt", "a lighthouse", "--seed", "3", "--size", size])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .expect("run worker generate");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8_lossy(&output.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    let _ = std::fs::remove_dir_all(&out);
    v["peak_rss_bytes"]
        .as_u64()
        .expect("peak_rss_bytes on Linux")
}

/// The memory bound the worker states (README, `image_memory_need`): a large output costs about its RGB
/// bytes, not the ~59 bytes per pixel of resizing and converting full-size f32 tensors. 6144² is above the
/// streaming threshold (4096²); the tiny model generates at its 512² bin either way.
#[test]
fn a_large_output_costs_about_its_rgb_bytes() {
    let small = peak_rss_of_generate("512x512");
    let big = peak_rss_of_generate("6144x6144");
    let pixels = 6144u64 * 6144;
    let bound = 3 * pixels * 2; // `3·w·h·(n+1)` for n = 1
    let grew = big.saturating_sub(small);
    eprintln!(
        "peak RSS 512²: {} MiB, 6144²: {} MiB (+{} MiB, bound {} MiB)",
        small >> 20,
        big >> 20,
        grew >> 20,
        bound >> 20
    );
    assert!(
        grew <= bound + (64 << 20),
        "a 6144² image grew peak RSS by {} MiB; stated bound {} MiB",
        grew >> 20,
        bound >> 20
    );
}
