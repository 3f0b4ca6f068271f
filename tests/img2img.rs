//! Issue 19 parity through the real `zturbo generate` binary: seeded text-to-image, img2img,
//! inpainting and LoRA runs reproduce diffusers' final latents (≤ 1e-4) on the tiny fixtures.
//! Goldens: `tests/fixtures/img2img/*.safetensors`, made by `tests/fixtures/gen/gen_img2img.py`
//! (each file's `call` metadata is the exact diffusers call).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use common::{assert_close, fixture, Golden};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zturbo-i2i-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `zturbo generate` on `model` with `args`, returns the saved final latents.
fn generate(name: &str, model: &str, args: &[&str]) -> candle_core::Tensor {
    let dir = tmpdir(name);
    let lat = dir.join("latents.safetensors");
    let png = dir.join("out.png");
    let out = Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args([
            "generate",
            "--model",
            fixture(model).to_str().unwrap(),
            "--prompt",
            "a serene mountain lake at dawn",
            "--width",
            "128",
            "--height",
            "128",
            "--precision",
            "f32",
            "--enhance",
            "off",
            "--save-latents",
            lat.to_str().unwrap(),
            "--output",
            png.to_str().unwrap(),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: zturbo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap()["latents"].clone();
    std::fs::remove_dir_all(dir).unwrap();
    t
}

fn golden(name: &str) -> Golden {
    Golden::load(&format!("img2img/{name}.safetensors"))
}

fn check(name: &str, model: &str, args: &[&str]) {
    let g = golden(name);
    let got = generate(name, model, args);
    assert_close(name, &got, g.get("final_latents"), 1e-4);
}

fn input(rel: &str) -> String {
    fixture(&format!("img2img/{rel}"))
        .to_str()
        .unwrap()
        .to_string()
}

/// Writes a golden's tensor as a `latents` safetensors file for `--init-latents`.
fn latents_file(g: &Golden, tensor: &str, path: &Path) {
    let map = std::collections::HashMap::from([("latents".to_string(), g.get(tensor).clone())]);
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn seeded_text_to_image_matches_diffusers_generator() {
    check(
        "z_txt2img_seed7",
        "tiny-z-image",
        &["--steps", "4", "--cfg", "1.0", "--seed", "7"],
    );
}

#[test]
fn seeded_text_to_image_with_guidance_matches_diffusers() {
    // diffusers' guidance_scale 1.5 is our CFG 2.5 (ComfyUI/A1111 convention).
    check(
        "z_txt2img_seed1234_cfg",
        "tiny-z-image",
        &[
            "--steps",
            "3",
            "--cfg",
            "2.5",
            "--negative-prompt",
            "blurry",
            "--seed",
            "1234",
        ],
    );
}

#[test]
fn seeded_sd_turbo_matches_diffusers_generator() {
    check(
        "sd_txt2img_seed7",
        "tiny-sd-turbo",
        &["--steps", "2", "--cfg", "1.0", "--seed", "7"],
    );
}

#[test]
fn img2img_seeded_end_to_end_matches_diffusers() {
    let image = input("input.png");
    check(
        "z_img2img_seed7",
        "tiny-z-image",
        &[
            "--image",
            &image,
            "--strength",
            "0.6",
            "--steps",
            "8",
            "--cfg",
            "1.0",
            "--seed",
            "7",
        ],
    );
}

#[test]
fn img2img_with_start_latents_matches_diffusers() {
    let g = golden("z_img2img_latents");
    let dir = tmpdir("start");
    let start = dir.join("start.safetensors");
    latents_file(&g, "start_latents", &start);
    let image = input("input.png");
    check(
        "z_img2img_latents",
        "tiny-z-image",
        &[
            "--image",
            &image,
            "--strength",
            "0.5",
            "--steps",
            "6",
            "--cfg",
            "2.5",
            "--negative-prompt",
            "blurry",
            "--init-latents",
            start.to_str().unwrap(),
        ],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn inpainting_matches_diffusers() {
    let (image, mask) = (input("input.png"), input("mask.png"));
    check(
        "z_inpaint_seed7",
        "tiny-z-image",
        &[
            "--image", &image, "--mask", &mask, "--steps", "4", "--cfg", "1.0", "--seed", "7",
        ],
    );
    check(
        "z_inpaint_strength0.7_seed11",
        "tiny-z-image",
        &[
            "--image",
            &image,
            "--mask",
            &mask,
            "--strength",
            "0.7",
            "--steps",
            "6",
            "--cfg",
            "1.0",
            "--seed",
            "11",
        ],
    );
}

#[test]
fn sd_turbo_img2img_matches_diffusers() {
    let image = input("input.png");
    check(
        "sd_img2img_seed7",
        "tiny-sd-turbo",
        &[
            "--image",
            &image,
            "--strength",
            "0.5",
            "--steps",
            "2",
            "--cfg",
            "1.0",
            "--seed",
            "7",
        ],
    );
    check(
        "sd_img2img_4steps_seed5",
        "tiny-sd-turbo",
        &[
            "--image",
            &image,
            "--strength",
            "0.75",
            "--steps",
            "4",
            "--cfg",
            "1.0",
            "--seed",
            "5",
        ],
    );
}

#[test]
fn sd_turbo_inpainting_matches_diffusers() {
    let (image, mask) = (input("input.png"), input("mask.png"));
    check(
        "sd_inpaint_seed7",
        "tiny-sd-turbo",
        &[
            "--image",
            &image,
            "--mask",
            &mask,
            "--strength",
            "1.0",
            "--steps",
            "2",
            "--cfg",
            "1.0",
            "--seed",
            "7",
        ],
    );
    check(
        "sd_inpaint_strength0.75_seed3",
        "tiny-sd-turbo",
        &[
            "--image",
            &image,
            "--mask",
            &mask,
            "--strength",
            "0.75",
            "--steps",
            "4",
            "--cfg",
            "1.0",
            "--seed",
            "3",
        ],
    );
}

/// Runs `zturbo generate` expecting failure; returns stderr.
fn generate_fails(model: &str, args: &[&str]) -> String {
    let dir = tmpdir("bad");
    let out = Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args([
            "generate",
            "--model",
            fixture(model).to_str().unwrap(),
            "--prompt",
            "a lake",
            "--output",
            dir.join("out.png").to_str().unwrap(),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "expected a failure for {args:?}");
    assert!(!dir.join("out.png").exists(), "no image may be written");
    std::fs::remove_dir_all(dir).unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_inputs_fail_with_a_message_naming_the_flag_and_file() {
    let dir = tmpdir("badfiles");
    let text = dir.join("notes.png");
    std::fs::write(&text, "not an image at all").unwrap();
    let small = dir.join("small.png");
    image::GrayImage::from_pixel(64, 64, image::Luma([255]))
        .save(&small)
        .unwrap();
    let black = dir.join("black.png");
    image::GrayImage::new(128, 128).save(&black).unwrap();
    let image = input("input.png");
    let (text, small, black) = (
        text.to_str().unwrap(),
        small.to_str().unwrap(),
        black.to_str().unwrap(),
    );

    let e = generate_fails("tiny-z-image", &["--image", text]);
    assert!(
        e.contains("--image") && e.contains("notes.png") && e.contains("not a PNG, JPEG or WebP"),
        "{e}"
    );
    let e = generate_fails("tiny-z-image", &["--image", &image, "--mask", small]);
    assert!(
        e.contains("--mask") && e.contains("same size") && e.contains("64×64"),
        "{e}"
    );
    let e = generate_fails("tiny-z-image", &["--image", &image, "--mask", black]);
    assert!(e.contains("--mask") && e.contains("empty"), "{e}");
    for bad in ["1.5", "-0.1", "NaN"] {
        let flag = format!("--strength={bad}");
        let e = generate_fails("tiny-z-image", &["--image", &image, &flag]);
        assert!(
            e.contains("--strength") && e.contains("between 0 and 1"),
            "{bad}: {e}"
        );
    }
    let e = generate_fails("tiny-z-image", &["--image", &image, "--strength", "0"]);
    assert!(
        e.contains("--strength") && e.contains("no denoising step"),
        "{e}"
    );
    // SD-Turbo runs int(steps × strength) steps: 1 × 0.5 runs none.
    let e = generate_fails(
        "tiny-sd-turbo",
        &["--image", &image, "--steps", "1", "--strength", "0.5"],
    );
    assert!(e.contains("steps × strength must be at least 1"), "{e}");
    let e = generate_fails("tiny-z-image", &["--mask", black]);
    assert!(e.contains("--image"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn lora_in_each_format_matches_diffusers() {
    for (golden, file, weight) in [
        ("z_lora_peft_w0.7", "lora_peft.safetensors", "0.7"),
        ("z_lora_comfy_w0.6", "lora_comfy.safetensors", "0.6"),
        ("z_lora_kohya_w1.3", "lora_kohya.safetensors", "1.3"),
    ] {
        let lora = format!("{}:{weight}", input(file));
        check(
            golden,
            "tiny-z-image",
            &[
                "--steps", "4", "--cfg", "1.0", "--seed", "7", "--lora", &lora,
            ],
        );
    }
}

#[test]
fn two_loras_at_once_match_diffusers() {
    let a = format!("{}:0.5", input("lora_peft.safetensors"));
    let b = format!("{}:-0.8", input("lora_kohya.safetensors"));
    check(
        "z_lora_two",
        "tiny-z-image",
        &[
            "--steps", "4", "--cfg", "1.0", "--seed", "7", "--lora", &a, "--lora", &b,
        ],
    );
}

#[test]
fn kohya_lora_on_sd_turbo_matches_diffusers() {
    let l = format!("{}:0.8", input("sd_lora_kohya.safetensors"));
    check(
        "sd_lora_kohya_w0.8",
        "tiny-sd-turbo",
        &["--steps", "2", "--cfg", "1.0", "--seed", "7", "--lora", &l],
    );
}
