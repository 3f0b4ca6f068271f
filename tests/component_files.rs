//! `--transformer`, `--text-encoder`, `--vae` and `--model FILE` through the real binary (issue
//! 16): the files of `tests/fixtures/tiny-z-image-files/` reproduce their goldens through the
//! CLI, bad files exit non-zero with one sentence naming the file and the tensor, the server
//! refuses to start on them, and `/api/models` lists the files of a models folder and a ComfyUI
//! tree. Goldens: `tiny-z-image/golden/run_cfg0.safetensors` (diffusers' folder run) and
//! `tiny-z-image-files/golden.safetensors` (diffusers' GGUF loading), see tests/fixtures/README.md.

mod common;
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::{assert_close, fixture, Golden};
use support::{get_json, temp_dir, Server};

fn file(name: &str) -> String {
    fixture("tiny-z-image-files")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn zturbo(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zturbo"));
    for (k, _) in std::env::vars() {
        if k.starts_with("ZTURBO_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// `zturbo generate` of the `run_cfg0` golden call (8 steps, guidance off, seed-42 latents) with
/// `extra` flags; returns the final latents.
fn generate(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Tensor {
    let g = Golden::load("tiny-z-image/golden/run_cfg0.safetensors");
    let init = dir.join("init.safetensors");
    let map = HashMap::from([("latents".to_string(), g.get("initial_latents").clone())]);
    candle_core::safetensors::save(&map, &init).unwrap();
    let lat = dir.join("out.safetensors");
    let png = dir.join("out.png");
    let mut args = vec![
        "generate",
        "--prompt",
        "a serene mountain lake at dawn",
        "--width",
        "128",
        "--height",
        "128",
        "--steps",
        "8",
        "--cfg",
        "1.0",
        "--precision",
        "f32",
        "--device",
        "cpu",
        "--enhance",
        "off",
        "--init-latents",
        init.to_str().unwrap(),
        "--save-latents",
        lat.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = zturbo(&args, env);
    assert!(
        out.status.success(),
        "zturbo {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    candle_core::safetensors::load(&lat, &Device::Cpu).unwrap()["latents"].clone()
}

/// A models folder whose `z-image-turbo` holds the tiny fixture: where `--model FILE` and
/// component flags find the catalog model's configs and tokenizer.
fn models_dir_with_tiny(root: &Path, configs_only: bool) -> PathBuf {
    let models = root.join("models");
    let dst = models.join("z-image-turbo");
    copy_tree(&fixture("tiny-z-image"), &dst, configs_only);
    models
}

fn copy_tree(src: &Path, dst: &Path, configs_only: bool) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "golden" {
                copy_tree(&p, &dst.join(&name), configs_only);
            }
        } else if !(configs_only && p.extension().is_some_and(|x| x == "safetensors")) {
            std::fs::copy(&p, dst.join(&name)).unwrap();
        }
    }
}

#[test]
fn transformer_flag_runs_a_gguf_like_diffusers() {
    let dir = temp_dir("cf-gguf");
    let q = file("dit-q4_k.gguf");
    let tiny = fixture("tiny-z-image");
    let got = generate(
        &dir,
        &["--model", tiny.to_str().unwrap(), "--transformer", &q],
        &[],
    );
    let g = Golden::load("tiny-z-image-files/golden.safetensors");
    assert_close(
        "--transformer dit-q4_k.gguf",
        &got,
        g.get("dit-q4_k.gguf.final_latents"),
        1e-4,
    );
    // The same through the environment.
    let env = generate(
        &dir,
        &["--model", tiny.to_str().unwrap()],
        &[("ZTURBO_TRANSFORMER", q.as_str())],
    );
    assert_eq!(common::max_abs_diff(&env, &got), 0.0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn model_file_uses_the_catalog_configs_and_component_files_replace_weights() {
    let dir = temp_dir("cf-model-file");
    let want = Golden::load("tiny-z-image/golden/run_cfg0.safetensors");
    // `--model <ComfyUI file>`: configs, tokenizer, text encoder and VAE from the catalog
    // model's folder (here `<models-dir>/z-image-turbo`, the tiny fixture).
    let models = models_dir_with_tiny(&dir, false);
    let got = generate(
        &dir,
        &[
            "--model",
            &file("z_image_tiny_comfy.safetensors"),
            "--models-dir",
            models.to_str().unwrap(),
        ],
        &[],
    );
    assert_close("--model comfy file", &got, want.get("final_latents"), 1e-4);

    // A configs-only catalog folder plus all three components as files (the ComfyUI set: the
    // single-file DiT, a transformers-named text encoder, the ldm VAE): the folder's run again.
    let configs = dir.join("configs-only");
    let models2 = models_dir_with_tiny(&configs, true);
    let te_st = fixture("tiny-z-image/text_encoder/model.safetensors");
    let got = generate(
        &dir,
        &[
            "--transformer",
            &file("z_image_tiny_comfy.safetensors"),
            "--text-encoder",
            te_st.to_str().unwrap(),
            "--vae",
            &file("ae.safetensors"),
            "--models-dir",
            models2.to_str().unwrap(),
        ],
        &[],
    );
    assert_close(
        "three component files",
        &got,
        want.get("final_latents"),
        1e-4,
    );

    // Missing weights in a configs-only folder: the flag to use is named.
    let out = zturbo(
        &[
            "generate",
            "--prompt",
            "x",
            "--output",
            dir.join("x.png").to_str().unwrap(),
            "--transformer",
            &file("z_image_tiny_comfy.safetensors"),
            "--models-dir",
            models2.to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("has no text_encoder weights") && err.contains("--text-encoder"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_files_exit_non_zero_with_one_sentence() {
    let dir = temp_dir("cf-bad");
    let tiny = fixture("tiny-z-image");
    let png = dir.join("x.png");
    let base = [
        "generate",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt",
        "x",
        "--output",
        png.to_str().unwrap(),
    ];
    let bad = |n: &str| file(&format!("bad/{n}"));
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["--text-encoder".into(), bad("te-iq4_nl.gguf")],
            vec!["te-iq4_nl.gguf", "blk.0.attn_output.weight", "IQ4_NL"],
        ),
        (
            vec!["--transformer".into(), bad("dit-truncated.gguf")],
            vec!["dit-truncated.gguf", "truncated", "tensor `"],
        ),
        (
            vec!["--vae".into(), bad("flux-transformer.safetensors")],
            vec![
                "flux-transformer.safetensors",
                "a Flux transformer",
                "not an AutoencoderKL VAE",
            ],
        ),
        (
            vec![
                "--transformer".into(),
                dir.join("nope.gguf").display().to_string(),
            ],
            vec!["--transformer", "nope.gguf"],
        ),
    ];
    for (extra, parts) in cases {
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend(extra.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = zturbo(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line: {err}"));
        for p in parts {
            assert!(line.contains(p), "`{p}` not in: {line}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }
    // A VAE given as the model to run: pointed at the right flag.
    let out = zturbo(
        &[
            "generate",
            "--model",
            &file("ae.safetensors"),
            "--prompt",
            "x",
            "--output",
            png.to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("pass it with --vae"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn server_refuses_a_bad_file_and_lists_weight_files() {
    let dir = temp_dir("cf-serve");
    // A bad file: the server exits with the load error, it never listens.
    let out = zturbo(
        &[
            "serve",
            "--model",
            fixture("tiny-z-image").to_str().unwrap(),
            "--transformer",
            &file("bad/dit-truncated.gguf"),
            "--port",
            "0",
            "--outputs",
            dir.join("out-bad").to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("dit-truncated.gguf") && err.contains("truncated"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "it must not have listened");

    // A ComfyUI tree with one file per component folder (and a file of another model).
    let comfy = dir.join("ComfyUI");
    for (sub, name) in [
        ("diffusion_models", "dit-q8_0.gguf"),
        ("text_encoders", "te-q8_0.gguf"),
        ("vae", "ae.safetensors"),
        ("diffusion_models", "bad/flux-transformer.safetensors"),
    ] {
        let d = comfy.join("models").join(sub);
        std::fs::create_dir_all(&d).unwrap();
        let src = PathBuf::from(file(name));
        std::fs::copy(&src, d.join(src.file_name().unwrap())).unwrap();
    }
    let q8 = comfy.join("models/diffusion_models/dit-q8_0.gguf");
    let s = Server::start_model(
        &dir.join("out"),
        fixture("tiny-z-image").to_str().unwrap(),
        &[
            "--comfyui-dir",
            comfy.to_str().unwrap(),
            // Found by name in the ComfyUI tree.
            "--transformer",
            "dit-q8_0.gguf",
        ],
        &[],
    );
    let (st, info) = get_json(&s.url("/api/info"));
    assert_eq!(st, 200);
    let loaded = info["model"]["files"]["transformer"].as_str().unwrap();
    assert!(
        Path::new(loaded).ends_with("diffusion_models/dit-q8_0.gguf"),
        "{loaded}"
    );
    let (st, list) = get_json(&s.url("/api/models"));
    assert_eq!(st, 200);
    let files = list["files"].as_array().unwrap();
    let by_name = |n: &str| {
        files
            .iter()
            .find(|f| f["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {files:?}"))
    };
    let dit = by_name("dit-q8_0.gguf");
    assert_eq!(dit["role"], "transformer");
    assert_eq!(dit["encoding"], "q8_0");
    assert_eq!(dit["container"], "gguf");
    assert_eq!(dit["kind"], "ComfyUI transformer");
    assert_eq!(dit["source"], "comfyui");
    assert_eq!(dit["loaded"], true);
    assert_eq!(dit["flag"], "--transformer");
    assert_eq!(
        dit["file_bytes"].as_u64().unwrap(),
        std::fs::metadata(&q8).unwrap().len()
    );
    let te = by_name("te-q8_0.gguf");
    assert_eq!(
        (te["role"].as_str(), te["loaded"].as_bool()),
        (Some("text_encoder"), Some(false))
    );
    assert_eq!(te["kind"], "llama.cpp Qwen3");
    let ae = by_name("ae.safetensors");
    assert_eq!(
        (ae["role"].as_str(), ae["kind"].as_str()),
        (Some("vae"), Some("ldm/Flux VAE"))
    );
    assert!(
        !files
            .iter()
            .any(|f| f["name"] == "flux-transformer.safetensors"),
        "other models' files are not listed"
    );
    drop(s);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A Hugging Face cache holding a pulled z-image-turbo variant (the tiny fixture's GGUF files
/// under the names the variant repositories use).
fn fake_variant_cache(root: &Path) -> PathBuf {
    let hf = root.join("hf");
    for (repo, src, name) in [
        (
            "jayn7--Z-Image-Turbo-GGUF",
            "dit-q8_0.gguf",
            "z_image_turbo-Q8_0.gguf",
        ),
        (
            "unsloth--Qwen3-4B-GGUF",
            "te-q8_0.gguf",
            "Qwen3-4B-Q8_0.gguf",
        ),
    ] {
        let d = hf
            .join("hub")
            .join(format!("models--{repo}/snapshots/0123abc"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(file(src), d.join(name)).unwrap();
    }
    hf
}

#[test]
fn pulled_variants_are_chosen_by_the_planner_or_by_flag() {
    let dir = temp_dir("cf-variants");
    let models = models_dir_with_tiny(&dir, false);
    let hf = fake_variant_cache(&dir);
    let hf_s = hf.to_str().unwrap();
    let models_s = models.to_str().unwrap();
    let png = dir.join("x.png");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            "z-image-turbo",
            "--models-dir",
            models_s,
            "--prompt",
            "a lake",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--output",
            png.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        zturbo(&args, &[("HF_HOME", hf_s), ("ZTURBO_LOG", "info")])
    };
    // Both on disk, room for everything: the planner keeps the release (bf16 folder).
    let out = run(&[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("q8_0: denoiser"), "{log}");
    assert!(log.contains("weights: chose bf16"), "{log}");
    // Forced.
    let out = run(&["--variant", "q8_0"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("z_image_turbo-Q8_0.gguf"), "{log}");
    let out = run(&["--variant", "q4_k_m"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        log.contains("zturbo pull z-image-turbo --variant q4_k_m"),
        "{log}"
    );

    // The Models panel: every variant with its size and smallest card; q8_0 on disk.
    let s = Server::start_model(
        &dir.join("out"),
        fixture("tiny-z-image").to_str().unwrap(),
        &[],
        &[("HF_HOME", hf_s)],
    );
    let (st, list) = get_json(&s.url("/api/models"));
    assert_eq!(st, 200);
    let zit = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "z-image-turbo")
        .unwrap();
    let variants = zit["variants"].as_array().unwrap();
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m"]
    );
    let q8 = &variants[1];
    assert_eq!(q8["on_disk"], true);
    assert_eq!(q8["estimated"], false);
    let q4 = &variants[4];
    assert_eq!(q4["on_disk"], false);
    assert!(q4["size_bytes"].as_u64().unwrap() < variants[0]["size_bytes"].as_u64().unwrap() / 2);
    assert!(q4["smallest_card_gib"].as_u64().unwrap() <= 8, "{q4}");
    assert_eq!(q4["pull"], "zturbo pull z-image-turbo --variant q4_k_m");
    // A variant that does not exist: 400 naming the field.
    let res = support::client()
        .post(s.url("/api/models/z-image-turbo/pull?variant=q9"))
        .send()
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().unwrap();
    assert_eq!(body["error"]["field"], "variant", "{body}");
    drop(s);
    std::fs::remove_dir_all(dir).unwrap();
}
