//! The `zturbo` command line: notices on stderr, exit codes, no PNG on failure, clear errors for
//! broken model folders and bad flags, batches, and re-running from a PNG's parameters.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use common::fixture;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zturbo-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn zturbo(args: &[&str], fault: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zturbo"));
    c.args(args).env_remove("ZTURBO_FAULT");
    if let Some(f) = fault {
        c.env("ZTURBO_FAULT", f);
    }
    c.output().unwrap()
}

fn gen_args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red fox in snow",
        "--width",
        "128",
        "--height",
        "128",
        "--steps",
        "4",
        "--seed",
        "7",
        "--output",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn notices_are_printed_and_clamped_cfg_still_writes_an_image() {
    let d = tmpdir("notice");
    let out = d.join("a.png");
    let o = zturbo(
        &gen_args("demo", out.to_str().unwrap(), &["--cfg", "3.2"]),
        Some("denoiser-nan@step=3,attempts=1"),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("notice: cfg_clamped 3.2 -> 2.4"), "{err}");
    assert!(
        err.contains("notice: cfg_adjusted 2.4 -> 1.8 at step 3"),
        "{err}"
    );
    assert!(out.is_file());
    // The PNG records the adaptation for other tools.
    let bytes = std::fs::read(&out).unwrap();
    let chunks = zturbo::engine::output::png_text_chunks(&bytes).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.contains("CFG scale: 1.8") && params.contains("CFG requested: 3.2"),
        "{params}"
    );
    assert!(params.contains("CFG adapted"), "{params}");
}

#[test]
fn a_failed_job_exits_nonzero_and_writes_nothing() {
    let d = tmpdir("fail");
    let out = d.join("a.png");
    let o = zturbo(
        &gen_args("demo", out.to_str().unwrap(), &["--cfg", "2.0"]),
        Some("denoiser-nan@step=3,attempts=all"),
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("error: generation failed: denoising step 3 of 4"),
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        0,
        "no temp files left"
    );
}

#[test]
fn bad_fault_spec_is_rejected_up_front() {
    let d = tmpdir("badfault");
    let out = d.join("a.png");
    let o = zturbo(
        &gen_args("demo", out.to_str().unwrap(), &[]),
        Some("gpu-melt"),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown fault `gpu-melt`"));
}

#[test]
fn bad_flags_name_the_flag() {
    let d = tmpdir("flags");
    let out = d.join("a.png");
    let base = |w: &'static str, s: &'static str| {
        vec![
            "generate", "--model", "demo", "--prompt", "x", "--width", w, "--height", "128",
            "--steps", s, "--output",
        ]
    };
    let mut a = base("100", "4");
    a.push(out.to_str().unwrap());
    let o = zturbo(&a, None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("--width") && err.contains("multiple of 16"),
        "{err}"
    );
    let mut a = base("128", "0");
    a.push(out.to_str().unwrap());
    let o = zturbo(&a, None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--steps: must be between 1 and 100"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

#[test]
fn batch_writes_numbered_files_with_consecutive_seeds_and_reruns_from_png() {
    let d = tmpdir("batch");
    let out = d.join("b.png");
    let o = zturbo(
        &gen_args(
            "demo",
            out.to_str().unwrap(),
            &["--batch", "2", "--cfg", "1.0"],
        ),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let second = d.join("b-2.png");
    assert!(d.join("b-1.png").is_file() && second.is_file());
    let err = stderr(&o);
    assert!(
        err.contains("(seed 7)") && err.contains("(seed 8)"),
        "{err}"
    );
    // Image 2 of the batch is reproducible alone with its own seed…
    let alone = d.join("alone.png");
    let o = zturbo(
        &[
            "generate",
            "--model",
            "demo",
            "--prompt",
            "a red fox in snow",
            "--width",
            "128",
            "--height",
            "128",
            "--steps",
            "4",
            "--seed",
            "8",
            "--cfg",
            "1.0",
            "--output",
            alone.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let px = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    // Equal up to rounding: a batch of 2 runs the matmuls at another shape (other blocking), so
    // the latents may differ in the last bits and a pixel can land on the other side of .5. With
    // bf16 matrix operands (an `mkl` build on a CPU with native bf16 products) a last-bit change
    // can also move an activation across a bf16 rounding step: a few levels.
    let allowed = if zturbo::ops::linear::bf16_ready() {
        6
    } else {
        1
    };
    let worst = px(&second)
        .iter()
        .zip(px(&alone))
        .map(|(a, b)| (*a as i16 - b as i16).abs())
        .max()
        .unwrap();
    assert!(
        worst <= allowed,
        "batch item 2 and its seed alone differ by {worst} levels"
    );
    // …and from its PNG's parameters (prompt as enhanced, seed, size, steps, cfg).
    let again = d.join("again.png");
    let o = zturbo(
        &[
            "generate",
            "--model",
            "demo",
            "--from-png",
            alone.to_str().unwrap(),
            "--output",
            again.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(px(&again), px(&alone));
}

/// Copies the tiny fixture so a test can break it.
fn broken_copy(name: &str) -> PathBuf {
    let dst = tmpdir(name).join("model");
    copy_dir(&fixture("tiny-z-image"), &dst);
    let _ = std::fs::remove_dir_all(dst.join("golden"));
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn load_error(model: &Path) -> String {
    let out = model.parent().unwrap().join("x.png");
    let o = zturbo(
        &gen_args(model.to_str().unwrap(), out.to_str().unwrap(), &[]),
        None,
    );
    assert!(!o.status.success());
    assert!(!out.exists());
    stderr(&o)
}

fn rewrite_tensors(
    path: &Path,
    f: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, path).unwrap();
}

#[test]
fn broken_model_folders_name_the_file_at_fault() {
    let m = broken_copy("missing");
    std::fs::remove_file(m.join("vae/config.json")).unwrap();
    let e = load_error(&m);
    assert!(
        e.contains("missing file") && e.contains("vae/config.json"),
        "{e}"
    );

    let m = broken_copy("malformed");
    std::fs::write(m.join("transformer/config.json"), "{ \"dim\": 64, ").unwrap();
    let e = load_error(&m);
    assert!(
        e.contains("transformer/config.json") && e.contains("EOF"),
        "{e}"
    );

    let m = broken_copy("tensor");
    let w = m.join("transformer/diffusion_pytorch_model.safetensors");
    rewrite_tensors(&w, |t| {
        t.remove("layers.1.attention.to_q.weight");
    });
    let e = load_error(&m);
    assert!(
        e.contains("layers.1.attention.to_q.weight")
            && e.contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );

    let m = broken_copy("shape");
    let w = m.join("vae/diffusion_pytorch_model.safetensors");
    rewrite_tensors(&w, |t| {
        let z = candle_core::Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        t.insert("decoder.conv_in.bias".into(), z);
    });
    let e = load_error(&m);
    assert!(
        e.contains("decoder.conv_in.bias") && e.contains("shape"),
        "{e}"
    );

    let m = broken_copy("class");
    let idx = std::fs::read_to_string(m.join("model_index.json")).unwrap();
    std::fs::write(
        m.join("model_index.json"),
        idx.replace("ZImagePipeline", "FluxPipeline"),
    )
    .unwrap();
    let e = load_error(&m);
    assert!(
        e.contains("unsupported pipeline class `FluxPipeline`") && e.contains("model_index.json"),
        "{e}"
    );

    let e = load_error(&tmpdir("nothing").join("model"));
    assert!(
        e.contains("not found") || e.contains("no such folder"),
        "{e}"
    );
}
