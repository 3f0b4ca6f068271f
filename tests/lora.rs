//! LoRA behaviour beyond the diffusers goldens (`tests/img2img.rs` has those): switching LoRAs
//! between jobs reuses the loaded model and gives what a fresh model gives; runtime updates and
//! merged weights agree; narrower base weights (bf16) take LoRAs too; text-encoder keys of a
//! kohya SD LoRA reach CLIP; bad files and keys fail naming the file and the key.
//! Fixtures: `tests/fixtures/img2img/lora_*.safetensors` (see `gen/gen_img2img.py`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs_diff};
use zturbo::engine::{CancelToken, Engine, EngineConfig, NullObserver, RunExtras};
use zturbo::families::lora::{LoraFile, LoraPart, LoraSet};
use zturbo::families::sd_turbo::SdTurbo;
use zturbo::families::z_image::ZImage;
use zturbo::families::{Family, ModelDir, PrecisionPolicy};
use zturbo::memory::planner::MemoryMode;
use zturbo::memory::probe::CpuProbe;
use zturbo::ops::linear::LoraMode;
use zturbo::request::{LoraRef, ValidRequest};

fn z_image(policy: PrecisionPolicy) -> ZImage {
    ZImage::open(
        ModelDir::open(fixture("tiny-z-image")).unwrap(),
        &Device::Cpu,
        policy,
    )
    .unwrap()
}

fn lora_path(name: &str) -> PathBuf {
    fixture(&format!("img2img/{name}.safetensors"))
}

fn request(loras: &[(&str, f32)]) -> ValidRequest {
    ValidRequest {
        prompt: "a serene mountain lake at dawn".into(),
        negative_prompt: None,
        width: 128,
        height: 128,
        steps: 2,
        cfg: 1.0,
        seed: 7,
        batch: 1,
        enhance: false,
        memory_mode: MemoryMode::Performance,
        enhance_exclude: Vec::new(),
        init: None,
        control: None,
        loras: loras
            .iter()
            .map(|(n, w)| LoraRef {
                name: n.to_string(),
                weight: *w,
                path: lora_path(n),
            })
            .collect(),
    }
}

fn engine(family: impl Family + 'static) -> Engine {
    Engine::new(
        Box::new(family),
        "tiny",
        Arc::new(CpuProbe::new()),
        EngineConfig::default(),
    )
}

fn run(e: &mut Engine, loras: &[(&str, f32)]) -> Tensor {
    e.generate(
        &request(loras),
        &RunExtras::default(),
        &mut NullObserver,
        &CancelToken::new(),
    )
    .unwrap()
    .latents
}

#[test]
fn switching_loras_between_jobs_matches_fresh_models() {
    let mut e = engine(z_image(PrecisionPolicy::F32));
    let plain = run(&mut e, &[]);
    let with_a = run(&mut e, &[("lora_peft", 0.7)]);
    let with_c = run(&mut e, &[("lora_kohya", 1.3)]);
    let plain_again = run(&mut e, &[]);
    let with_a_again = run(&mut e, &[("lora_peft", 0.7)]);
    // The same engine (no reload) gives what fresh ones give.
    let fresh_a = run(
        &mut engine(z_image(PrecisionPolicy::F32)),
        &[("lora_peft", 0.7)],
    );
    let fresh_c = run(
        &mut engine(z_image(PrecisionPolicy::F32)),
        &[("lora_kohya", 1.3)],
    );
    assert_eq!(max_abs_diff(&plain, &plain_again), 0.0, "removing the LoRA");
    assert_eq!(max_abs_diff(&with_a, &with_a_again), 0.0, "switching back");
    assert_eq!(max_abs_diff(&with_a, &fresh_a), 0.0);
    assert_eq!(max_abs_diff(&with_c, &fresh_c), 0.0);
    assert!(
        max_abs_diff(&plain, &with_a) > 1e-2,
        "the LoRA changes the image"
    );
}

/// Runs the DiT once on fixed inputs with `set` attached in `mode`.
fn dit_output(m: &mut ZImage, set: &Arc<LoraSet>, mode: LoraMode) -> Tensor {
    m.set_lora_mode(mode).unwrap();
    m.set_loras(set.clone()).unwrap();
    let x = zturbo::nn::torch_rng::randn(3, &[1, 16, 16, 16], &Device::Cpu).unwrap();
    let cap = zturbo::nn::torch_rng::randn(4, &[5, 48], &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.3f32], &Device::Cpu).unwrap();
    m.transformer_forward(&x, &t, &[&cap], None).unwrap()
}

fn set_of(m: &dyn Family, loras: &[(&str, f32)]) -> Arc<LoraSet> {
    let files: Vec<_> = loras
        .iter()
        .map(|(n, w)| {
            (
                Arc::new(LoraFile::read(&lora_path(n), m.lora_layers()).unwrap()),
                *w,
            )
        })
        .collect();
    Arc::new(LoraSet::new(&files))
}

#[test]
fn runtime_updates_and_merged_weights_agree() {
    let mut m = z_image(PrecisionPolicy::F32);
    let set = set_of(
        &m,
        &[
            ("lora_peft", 0.5),
            ("lora_comfy", 0.6),
            ("lora_kohya", -0.8),
        ],
    );
    let runtime = dit_output(&mut m, &set, LoraMode::Runtime);
    let merged = dit_output(&mut m, &set, LoraMode::Merged);
    let none = dit_output(&mut m, &Arc::default(), LoraMode::Runtime);
    let d = max_abs_diff(&runtime, &merged);
    assert!(d < 1e-4, "runtime vs merged: {d}");
    assert!(max_abs_diff(&runtime, &none) > 1e-2);
}

#[test]
fn loras_work_on_narrower_base_weights() {
    // bf16 base weights stand in for any storage other than the activations' dtype (quantized
    // included): the update runs next to the base product, which stays as stored.
    let mut f32m = z_image(PrecisionPolicy::F32);
    let mut bf16m = z_image(PrecisionPolicy::resolve(
        zturbo::families::Precision::Bf16,
        &Device::Cpu,
    ));
    let set = set_of(&f32m, &[("lora_peft", 0.7)]);
    let want = dit_output(&mut f32m, &set, LoraMode::Runtime);
    let got = dit_output(&mut bf16m, &set, LoraMode::Runtime);
    let base = dit_output(&mut bf16m, &Arc::default(), LoraMode::Runtime);
    let err = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want);
    let effect = max_abs_diff(&base.to_dtype(DType::F32).unwrap(), &want);
    assert!(
        err < effect / 4.0,
        "bf16 + LoRA is {err} from f32 + LoRA; the LoRA's own effect is {effect}"
    );
}

fn write_lora(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let p = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(&map, &p).unwrap();
    p
}

#[test]
fn kohya_text_encoder_keys_reach_clip() {
    let mut m = SdTurbo::open(
        ModelDir::open(fixture("tiny-sd-turbo")).unwrap(),
        &Device::Cpu,
        PrecisionPolicy::F32,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("zturbo-te-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    let d = zturbo::nn::torch_rng::randn(1, &[2, 32], &Device::Cpu).unwrap();
    let u = zturbo::nn::torch_rng::randn(2, &[32, 2], &Device::Cpu).unwrap();
    let p = write_lora(
        &dir,
        "te",
        &[
            (&format!("{base}.lora_down.weight"), d.clone()),
            (&format!("{base}.lora_up.weight"), u.clone()),
        ],
    );
    let file = LoraFile::read(&p, m.lora_layers()).unwrap();
    assert_eq!(file.layers[0].part, LoraPart::TextEncoder);
    assert_eq!(
        file.layers[0].module,
        "text_model.encoder.layers.0.self_attn.q_proj"
    );
    let before = m.text_encoder_forward("a lake").unwrap().last_hidden;
    m.set_loras(Arc::new(LoraSet::new(&[(Arc::new(file), 1.0)])))
        .unwrap();
    let after = m.text_encoder_forward("a lake").unwrap().last_hidden;
    m.set_loras(Arc::default()).unwrap();
    let again = m.text_encoder_forward("a lake").unwrap().last_hidden;
    assert!(max_abs_diff(&before, &after) > 1e-3);
    assert_eq!(max_abs_diff(&before, &again), 0.0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_files_and_keys_name_the_file_and_the_key() {
    let m = z_image(PrecisionPolicy::F32);
    let layers = m.lora_layers();
    let dir = std::env::temp_dir().join(format!("zturbo-bad-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();

    let p = write_lora(
        &dir,
        "nolayer",
        &[
            (
                "transformer.layers.7.attention.to_q.lora_A.weight",
                t(&[2, 64]),
            ),
            (
                "transformer.layers.7.attention.to_q.lora_B.weight",
                t(&[64, 2]),
            ),
        ],
    );
    let e = LoraFile::read(&p, layers).unwrap_err().to_string();
    assert!(
        e.contains("nolayer.safetensors")
            && e.contains("`transformer.layers.7.attention.to_q.lora_A.weight` matches no layer"),
        "{e}"
    );
    let p = write_lora(
        &dir,
        "kohya_typo",
        &[
            (
                "lora_unet_layers_0_attention_to_z.lora_down.weight",
                t(&[2, 64]),
            ),
            (
                "lora_unet_layers_0_attention_to_z.lora_up.weight",
                t(&[64, 2]),
            ),
        ],
    );
    let e = LoraFile::read(&p, layers).unwrap_err().to_string();
    assert!(
        e.contains("lora_unet_layers_0_attention_to_z.lora_down.weight"),
        "{e}"
    );
    let p = write_lora(
        &dir,
        "shape",
        &[
            (
                "diffusion_model.layers.0.attention.to_q.lora_A.weight",
                t(&[2, 63]),
            ),
            (
                "diffusion_model.layers.0.attention.to_q.lora_B.weight",
                t(&[64, 2]),
            ),
        ],
    );
    let e = LoraFile::read(&p, layers).unwrap_err().to_string();
    assert!(
        e.contains("do not fit layer `layers.0.attention.to_q`"),
        "{e}"
    );
    let p = write_lora(
        &dir,
        "halves",
        &[(
            "transformer.layers.0.attention.to_q.lora_A.weight",
            t(&[2, 64]),
        )],
    );
    let e = LoraFile::read(&p, layers).unwrap_err().to_string();
    assert!(e.contains("no matching up"), "{e}");
    let p = dir.join("text.safetensors");
    std::fs::write(&p, "not safetensors").unwrap();
    let e = LoraFile::read(&p, layers).unwrap_err().to_string();
    assert!(
        e.contains("text.safetensors") && e.contains("not a safetensors file"),
        "{e}"
    );
    // The CLI refuses the same file with the same sentence and writes no image.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args(["generate", "--model"])
        .arg(fixture("tiny-z-image"))
        .args([
            "--prompt", "a lake", "--width", "64", "--height", "64", "--steps", "1",
        ])
        .arg("--lora")
        .arg(format!("{}:0.5", dir.join("nolayer.safetensors").display()))
        .arg("--output")
        .arg(dir.join("out.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("matches no layer"), "{stderr}");
    assert!(!dir.join("out.png").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
