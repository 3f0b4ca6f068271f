//! `zturbo quantize` (issue 16) on the tiny fixture: the DiT written under ComfyUI's names
//! (`general.architecture = lumina2`, fused qkv, `norm_final`), the text encoder under llama.cpp's
//! `qwen3` names; both read back by our loader (and run) and by gguf-py, llama.cpp's own reader
//! (the pinned `gguf` of tests/clients/requirements.txt, in the Python `.ci/run` prepares).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs_diff};
use serde_json::Value;
use zturbo::families::weights::{Role, Weights};
use zturbo::families::z_image::ZImage;
use zturbo::families::{ComponentFiles, Family, ModelDir, PrecisionPolicy, StepInput};

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("ZTURBO_PY_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/pyclients/bin/python"))
}

/// gguf-py's reading of `path` (see tests/clients/read_gguf.py).
fn read_with_gguf_py(path: &Path) -> Value {
    let py = python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/read_gguf.py");
    let out = Command::new(&py).arg(&script).arg(path).output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        other => panic!(
            "gguf-py could not read {} ({other:?}). The test needs a Python with the packages of \
             tests/clients/requirements.txt at {}: run .ci/run, or `python3 -m venv target/pyclients && \
             target/pyclients/bin/python -m pip install -r tests/clients/requirements.txt` (or set \
             ZTURBO_PY_CLIENTS=/path/to/python)",
            path.display(),
            py.display()
        ),
    };
    serde_json::from_slice(&out.stdout).unwrap()
}

fn quantize(component: &str, to: &str, out: &Path) {
    let res = Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args([
            "quantize",
            "--model",
            fixture("tiny-z-image").to_str().unwrap(),
            "--component",
            component,
            "--to",
            to,
            "--output",
            out.to_str().unwrap(),
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "quantize failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(String::from_utf8_lossy(&res.stderr).contains("wrote "));
    assert!(!out.with_extension("gguf.part").exists());
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zturbo-quantize-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Our dequantized reading of every tensor agrees with gguf-py's (type, shape, sums).
fn agrees_with_gguf_py(w: &Weights, py: &Value, rel_tol: f64) {
    let tensors = py["tensors"].as_object().unwrap();
    for (name, t) in tensors {
        // The fused qkv is three of our tensors; compare those through their parts.
        let ours: Vec<Tensor> = match w.tensors().iter().find(|(_, i)| i.stored_name == *name) {
            Some(_) => w
                .tensors()
                .iter()
                .filter(|(_, i)| i.stored_name == *name)
                .map(|(n, _)| w.load(n, DType::F32, &Device::Cpu).unwrap())
                .collect(),
            None => {
                assert!(
                    name == "norm_final.weight",
                    "{name}: in the file, not read by our loader"
                );
                continue;
            }
        };
        let sum: f64 = ours
            .iter()
            .map(|t| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .sum();
        let abs: f64 = ours
            .iter()
            .map(|t| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .sum();
        let want_abs = t["abs_sum"].as_f64().unwrap();
        let want_sum = t["sum"].as_f64().unwrap();
        assert!(
            (abs - want_abs).abs() <= rel_tol * want_abs.max(1e-9),
            "{name}: |x| sums {abs} vs gguf-py {want_abs}"
        );
        assert!(
            (sum - want_sum).abs() <= rel_tol * want_abs.max(1e-9),
            "{name}: sums {sum} vs gguf-py {want_sum}"
        );
    }
}

#[test]
fn transformer_to_q8_0_in_comfyui_names() {
    let dir = tmp("dit");
    let out = dir.join("dit-q8_0.gguf");
    quantize("transformer", "q8_0", &out);

    let w = Weights::open_file(&out, "transformer", Role::Transformer).unwrap();
    assert_eq!(w.format().layout, Some("ComfyUI transformer"));
    assert!(w.is_quantized());
    // The same names as the ComfyUI single file (minus its prefix), nothing more, nothing less.
    let comfy = Weights::open_file(
        &fixture("tiny-z-image-files/z_image_tiny_comfy.safetensors"),
        "transformer",
        Role::Transformer,
    )
    .unwrap();
    assert_eq!(
        comfy.tensors().keys().collect::<Vec<_>>(),
        w.tensors().keys().collect::<Vec<_>>()
    );
    // Every weight within Q8_0's rounding of the original (|w| < 1: half a step of ≤ max|w|/127
    // plus f16 rounding).
    let folder = ModelDir::open(fixture("tiny-z-image"))
        .unwrap()
        .open_weights_as("transformer", Role::Transformer)
        .unwrap();
    for n in folder.tensors().keys() {
        let a = folder.load(n, DType::F32, &Device::Cpu).unwrap();
        let b = w.load(n, DType::F32, &Device::Cpu).unwrap();
        let d = max_abs_diff(&a, &b);
        assert!(d < 0.02, "{n}: {d}");
    }

    // It runs, close to the f32 model.
    let tiny = || ModelDir::open(fixture("tiny-z-image")).unwrap();
    let files = ComponentFiles {
        transformer: Some(out.clone()),
        ..Default::default()
    };
    let mut q = ZImage::open_with(tiny(), &files, &Device::Cpu, PrecisionPolicy::F32).unwrap();
    let mut f = ZImage::open(tiny(), &Device::Cpu, PrecisionPolicy::F32).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 16, 8, 8), &Device::Cpu).unwrap();
    let step = |m: &mut ZImage| {
        let cond = m.encode("a lake", None).unwrap();
        let s = m.schedule(2, 8, 8).unwrap();
        m.predict(
            &x,
            &cond,
            StepInput {
                index: 0,
                schedule: &s,
                cfg: 1.0,
            },
        )
        .unwrap()
    };
    let d = max_abs_diff(&step(&mut q), &step(&mut f));
    assert!(d < 0.1, "q8_0 prediction differs from f32 by {d}");

    // llama.cpp's reader sees what ComfyUI-GGUF looks for.
    let py = read_with_gguf_py(&out);
    assert_eq!(py["architecture"], "lumina2");
    let t = &py["tensors"]["layers.0.attention.qkv.weight"];
    assert_eq!(t["type"], "Q8_0");
    assert_eq!(t["shape"], serde_json::json!([192, 64]));
    assert_eq!(py["tensors"]["x_embedder.weight"]["type"], "F32");
    assert_eq!(
        py["tensors"]["layers.0.feed_forward.w2.weight"]["type"],
        "F32"
    );
    // Our decoding rounds through f16 like ComfyUI-GGUF's; gguf-py's stays f32.
    agrees_with_gguf_py(&w, &py, 2e-3);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn text_encoder_to_q4_0_and_q4_k_in_llama_cpp_names() {
    let dir = tmp("te");
    for to in ["q4_0", "q4_k"] {
        let out = dir.join(format!("te-{to}.gguf"));
        quantize("text-encoder", to, &out);
        let w = Weights::open_file(&out, "text_encoder", Role::TextEncoder).unwrap();
        assert_eq!(w.format().layout, Some("llama.cpp Qwen3"));
        let py = read_with_gguf_py(&out);
        assert_eq!(py["architecture"], "qwen3");
        let names: Vec<&String> = py["tensors"].as_object().unwrap().keys().collect();
        assert!(names.contains(&&"token_embd.weight".to_string()));
        assert!(names.contains(&&"blk.2.attn_k_norm.weight".to_string()));
        assert!(
            names.iter().all(|n| n.starts_with("blk.")
                || *n == "token_embd.weight"
                || *n == "output_norm.weight"),
            "{names:?}"
        );
        // Rows of 64 and 96 values: Q4_0 blocks of 32 (Q4_K falls back to Q5_0, as llama.cpp's
        // quantizer does when rows do not divide into 256); rows of 48 stay F32.
        let o = &py["tensors"]["blk.0.attn_output.weight"]["type"];
        assert_eq!(o, if to == "q4_0" { "Q4_0" } else { "Q5_0" });
        assert_eq!(py["tensors"]["blk.0.attn_q.weight"]["type"], "F32");
        agrees_with_gguf_py(&w, &py, 1e-5);
        // And the encoder runs on it.
        let files = ComponentFiles {
            text_encoder: Some(out.clone()),
            ..Default::default()
        };
        let mut m = ZImage::open_with(
            ModelDir::open(fixture("tiny-z-image")).unwrap(),
            &files,
            &Device::Cpu,
            PrecisionPolicy::F32,
        )
        .unwrap();
        let c = m.encode("a lake", None).unwrap();
        assert!(c
            .positive
            .hidden
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .is_finite());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn quantize_refuses_what_it_cannot_do() {
    let dir = tmp("refuse");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_zturbo"))
            .args(args)
            .output()
            .unwrap()
    };
    let tiny = fixture("tiny-z-image");
    let out = dir.join("x.gguf");
    let r = run(&[
        "quantize",
        "--model",
        tiny.to_str().unwrap(),
        "--component",
        "transformer",
        "--to",
        "q3_k",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("q8_0, q6_k, q5_k, q4_k, q4_0"));
    let r = run(&[
        "quantize",
        "--model",
        tiny.to_str().unwrap(),
        "--component",
        "vae",
        "--to",
        "q8_0",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    // Overwriting the source.
    let src = fixture("tiny-z-image-files/dit-q8_0.gguf");
    let copy = dir.join("dit.gguf");
    std::fs::copy(&src, &copy).unwrap();
    let r = run(&[
        "quantize",
        "--model",
        tiny.to_str().unwrap(),
        "--component",
        "transformer",
        "--transformer",
        copy.to_str().unwrap(),
        "--to",
        "q4_0",
        "--output",
        copy.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("is the file being quantized"));
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&src).unwrap());
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn fp8_scaled_safetensors_in_comfyui_and_transformers_names() {
    let dir = tmp("fp8");
    let dit = dir.join("dit-fp8.safetensors");
    quantize("transformer", "fp8", &dit);
    let w = Weights::open_file(&dit, "transformer", Role::Transformer).unwrap();
    assert_eq!(w.format().layout, Some("ComfyUI transformer"));
    let enc = w.format().encodings;
    assert!(
        enc.contains_key("float8_e4m3fn") && enc.contains_key("bf16"),
        "{enc:?}"
    );
    // Within e4m3's rounding (3 mantissa bits: 1/16 relative) of the scaled maximum.
    let folder = ModelDir::open(fixture("tiny-z-image"))
        .unwrap()
        .open_weights_as("transformer", Role::Transformer)
        .unwrap();
    for n in [
        "layers.0.attention.to_k.weight",
        "layers.1.feed_forward.w1.weight",
    ] {
        let a = folder.load(n, DType::F32, &Device::Cpu).unwrap();
        let b = w.load(n, DType::F32, &Device::Cpu).unwrap();
        let max = common::max_abs(&a);
        let d = max_abs_diff(&a, &b);
        assert!(d <= max / 16.0, "{n}: {d} vs max {max}");
    }
    let te = dir.join("te-fp8.safetensors");
    quantize("text-encoder", "fp8", &te);
    let w = Weights::open_file(&te, "text_encoder", Role::TextEncoder).unwrap();
    assert_eq!(w.format().layout, Some("transformers Qwen3"));
    let files = ComponentFiles {
        transformer: Some(dit),
        text_encoder: Some(te),
        ..Default::default()
    };
    let mut m = ZImage::open_with(
        ModelDir::open(fixture("tiny-z-image")).unwrap(),
        &files,
        &Device::Cpu,
        PrecisionPolicy::F32,
    )
    .unwrap();
    let c = m.encode("a lake", None).unwrap();
    assert!(c
        .positive
        .hidden
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .is_finite());
    std::fs::remove_dir_all(dir).unwrap();
}
