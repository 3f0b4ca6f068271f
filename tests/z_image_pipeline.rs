//! End-to-end parity with diffusers' `ZImagePipeline` on the tiny fixture: every sampler step
//! through the family API, and the whole run through the `zturbo generate` CLI (final latents
//! within 1e-4, PNG within ±1). Goldens: `tests/fixtures/tiny-z-image/golden/run_cfg*.safetensors`.
//! Our CFG is diffusers' `guidance_scale + 1` (ComfyUI/A1111 convention).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use candle_core::{Device, Tensor};
use common::{assert_close, fixture, max_abs_diff, Golden};
use zturbo::families::z_image::ZImage;
use zturbo::families::{Family, ModelDir, PrecisionPolicy, StepInput};

fn model() -> ZImage {
    let dir = ModelDir::open(fixture("tiny-z-image")).unwrap();
    ZImage::open(dir, &Device::Cpu, PrecisionPolicy::F32).unwrap()
}

/// Runs the golden's schedule step by step with the family's `predict` and the Euler update,
/// comparing the model output (after CFG and sign flip) and the latents after every step.
fn stepwise(golden: &str, negative: Option<&str>, cfg: f32) {
    let g = Golden::load(golden);
    let mut m = model();
    let cond = m
        .encode("a serene mountain lake at dawn", negative)
        .unwrap();
    assert_close(
        "prompt embeds",
        &cond.positive.hidden,
        g.get("prompt.embeds"),
        1e-4,
    );
    if let Some(n) = &cond.negative {
        assert_close("negative embeds", &n.hidden, g.get("negative.embeds"), 1e-4);
    }
    let schedule = m.schedule(8, 16, 16).unwrap();
    let sig = Tensor::new(schedule.sigmas.as_slice(), &Device::Cpu).unwrap();
    assert_close("sigmas", &sig, g.get("scheduler.sigmas"), 1e-6);
    let tmodel: Vec<f32> = g
        .get("transformer.t")
        .narrow(1, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut x = g.get("initial_latents").clone();
    for (i, &want_t) in tmodel.iter().enumerate() {
        let got_t = (1000.0f32 - schedule.timesteps[i]) / 1000.0;
        assert!(
            (got_t - want_t).abs() <= 1e-7,
            "t at step {i}: {got_t} vs {want_t}"
        );
        let d = m
            .predict(
                &x,
                &cond,
                StepInput {
                    index: i,
                    schedule: &schedule,
                    cfg,
                },
            )
            .unwrap();
        let want_d = g.get("step.noise_pred").get(i).unwrap();
        assert_close(&format!("step {i} noise_pred"), &d, &want_d, 1e-4);
        let dt = schedule.sigmas[i + 1] - schedule.sigmas[i];
        x = (&x + (d * dt as f64).unwrap()).unwrap();
        let want_x = g.get("step.latents").get(i).unwrap();
        assert_close(&format!("step {i} latents"), &x, &want_x, 1e-4);
    }
    assert_close("final latents", &x, g.get("final_latents"), 1e-4);
    if let Some(want) = g.tensors.get("vae.decoded") {
        let decoded = m.decode(&x).unwrap();
        assert_close("vae decoded", &decoded, want, 1e-4);
    }
}

#[test]
fn every_step_matches_without_guidance() {
    stepwise("tiny-z-image/golden/run_cfg0.safetensors", None, 1.0);
}

#[test]
fn every_step_matches_with_guidance_2_8() {
    stepwise(
        "tiny-z-image/golden/run_cfg1.8.safetensors",
        Some("blurry"),
        2.8,
    );
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zturbo-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn save_latents(t: &Tensor, path: &std::path::Path) {
    let map = HashMap::from([("latents".to_string(), t.clone())]);
    candle_core::safetensors::save(&map, path).unwrap();
}

/// The acceptance command, run through the real binary.
fn cli_run(golden: &str, extra: &[&str], name: &str) {
    let g = Golden::load(golden);
    let dir = tmpdir(name);
    let init = dir.join("init.safetensors");
    save_latents(g.get("initial_latents"), &init);
    let out_png = dir.join("out.png");
    let out_lat = dir.join("out.safetensors");
    let mut args: Vec<String> = [
        "generate",
        "--model",
        fixture("tiny-z-image").to_str().unwrap(),
        "--prompt",
        "a serene mountain lake at dawn",
        "--width",
        "128",
        "--height",
        "128",
        "--steps",
        "8",
        "--seed",
        "42",
        "--precision",
        "f32",
        "--enhance",
        "off",
        "--init-latents",
        init.to_str().unwrap(),
        "--save-latents",
        out_lat.to_str().unwrap(),
        "--output",
        out_png.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args(&args)
        .output()
        .unwrap();
    eprintln!("{name}: wall time {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "zturbo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lat = candle_core::safetensors::load(&out_lat, &Device::Cpu).unwrap();
    assert_close(
        &format!("{name} final latents"),
        &lat["latents"],
        g.get("final_latents"),
        1e-4,
    );

    let ours = image::open(&out_png).unwrap().to_rgb8();
    let want = image::open(fixture(&golden.replace(".safetensors", ".png")))
        .unwrap()
        .to_rgb8();
    assert_eq!(ours.dimensions(), want.dimensions());
    let worst = ours
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| (*a as i16 - *b as i16).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "{name}: PNG differs by {worst} levels");
    eprintln!("{name}: PNG max |diff| = {worst} levels");
    // The image also matches the float golden image within 2e-3 before quantisation.
    let f = Tensor::from_vec(
        ours.as_raw()
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect::<Vec<_>>(),
        (1, 128, 128, 3),
        &Device::Cpu,
    )
    .unwrap();
    assert!(max_abs_diff(&f, g.get("image")) <= 0.5 / 255.0 + 2e-3);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn cli_reproduces_run_cfg0() {
    cli_run(
        "tiny-z-image/golden/run_cfg0.safetensors",
        &["--cfg", "1.0"],
        "cfg0",
    );
}

#[test]
fn cli_reproduces_run_cfg1_8_as_cfg_2_8() {
    cli_run(
        "tiny-z-image/golden/run_cfg1.8.safetensors",
        &["--cfg", "2.8", "--negative-prompt", "blurry"],
        "cfg18",
    );
}

/// `--precision int8` end to end: the DiT's block projections in int8 (weights per channel,
/// activations per token), everything else f32. The image is not black and stays within a PSNR
/// bound of the f32 golden image (measured 53.1 dB on AVX512-VNNI; the bound is 40 dB); on a CPU without
/// AVX512-VNNI the command is refused, naming the option and the missing instructions.
#[test]
fn int8_precision_runs_close_to_the_f32_image_or_is_refused_by_name() {
    let golden = "tiny-z-image/golden/run_cfg0.safetensors";
    let g = Golden::load(golden);
    let dir = tmpdir("int8");
    let init = dir.join("init.safetensors");
    save_latents(g.get("initial_latents"), &init);
    let out_png = dir.join("out.png");
    let model = fixture("tiny-z-image");
    let out = Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a serene mountain lake at dawn",
            "--width",
            "128",
            "--height",
            "128",
            "--steps",
            "8",
            "--seed",
            "42",
            "--cfg",
            "1.0",
            "--precision",
            "int8",
            "--enhance",
            "off",
            "--init-latents",
            init.to_str().unwrap(),
            "--output",
            out_png.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !zturbo::ops::cpu::int8::vnni_available() {
        assert!(!out.status.success());
        assert!(
            stderr.contains("--precision int8") && stderr.contains("AVX512-VNNI"),
            "{stderr}"
        );
        assert!(!out_png.exists());
        return;
    }
    assert!(out.status.success(), "zturbo failed: {stderr}");
    assert!(stderr.contains("denoiser=int8"), "{stderr}");
    let ours = image::open(&out_png).unwrap().to_rgb8();
    let want = image::open(fixture(&golden.replace(".safetensors", ".png")))
        .unwrap()
        .to_rgb8();
    assert_eq!(ours.dimensions(), want.dimensions());
    let mean = ours.as_raw().iter().map(|&v| v as f64).sum::<f64>() / ours.as_raw().len() as f64;
    assert!(mean > 8.0, "int8 image is black (mean level {mean:.1})");
    let mse = ours
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        / ours.as_raw().len() as f64;
    let psnr = 10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10();
    eprintln!("int8 against the f32 golden image: PSNR {psnr:.1} dB");
    assert!(psnr >= 40.0, "int8 image PSNR {psnr:.1} dB against f32");
    std::fs::remove_dir_all(dir).unwrap();
}
