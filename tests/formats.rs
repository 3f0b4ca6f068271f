//! The files people already have (issue 16): ComfyUI single files, fp8, GGUF DiT and Qwen3 files,
//! the ldm-named VAE — each against the reference loader's own reading of the same file, and one
//! file of each bad kind. Fixtures and goldens: `tests/fixtures/tiny-z-image-files/`, written by
//! `tests/fixtures/gen/gen_quant.py` (diffusers 0.42.1 `from_single_file` with
//! `GGUFQuantizationConfig(compute_dtype=float32)`, transformers' GGUF loader, torch's fp8 casts).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, Golden};
use zturbo::families::weights::{Role, Weights};
use zturbo::families::z_image::ZImage;
use zturbo::families::{ComponentFiles, Family, ModelDir, PrecisionPolicy, StepInput};

fn file(name: &str) -> PathBuf {
    fixture("tiny-z-image-files").join(name)
}

fn open(files: ComponentFiles) -> ZImage {
    let dir = ModelDir::open(fixture("tiny-z-image")).unwrap();
    ZImage::open_with(dir, &files, &Device::Cpu, PrecisionPolicy::F32).unwrap()
}

fn with_transformer(name: &str) -> ZImage {
    open(ComponentFiles {
        transformer: Some(file(name)),
        ..Default::default()
    })
}

/// The 8-step, guidance-off run of `gen_quant.py` (and of `run_cfg0`): Euler steps through the
/// family's `predict`, from the golden initial latents. Returns the final latents.
fn run_cfg0(m: &mut ZImage) -> Tensor {
    let g = Golden::load("tiny-z-image/golden/run_cfg0.safetensors");
    let cond = m.encode("a serene mountain lake at dawn", None).unwrap();
    let schedule = m.schedule(8, 16, 16).unwrap();
    let mut x = g.get("initial_latents").clone();
    for i in 0..8 {
        let step = StepInput {
            index: i,
            schedule: &schedule,
            cfg: 1.0,
        };
        let d = m.predict(&x, &cond, step).unwrap();
        let dt = schedule.sigmas[i + 1] - schedule.sigmas[i];
        x = (&x + (d * dt as f64).unwrap()).unwrap();
    }
    x
}

fn golden() -> Golden {
    Golden::load("tiny-z-image-files/golden.safetensors")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b)
}

#[test]
fn comfy_single_file_is_the_folder_bit_for_bit() {
    // The ComfyUI file carries `model.diffusion_model.`, fused qkv, `attention.out`, `q_norm`,
    // `x_embedder`, `final_layer` and the unused `norm_final`: mapped, every tensor must equal the
    // diffusers folder's exactly (gen_quant.py checks the same with diffusers' own loader).
    let comfy = Weights::open_file(
        &file("z_image_tiny_comfy.safetensors"),
        "transformer",
        Role::Transformer,
    )
    .unwrap();
    let folder = ModelDir::open(fixture("tiny-z-image"))
        .unwrap()
        .open_weights_as("transformer", Role::Transformer)
        .unwrap();
    let names: Vec<&String> = folder.tensors().keys().collect();
    assert_eq!(names, comfy.tensors().keys().collect::<Vec<_>>());
    for n in names {
        let a = folder.load(n, DType::F32, &Device::Cpu).unwrap();
        let b = comfy.load(n, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0, "{n}");
    }
    // And so the whole run is identical to the folder's.
    let want = run_cfg0(&mut open(ComponentFiles::default()));
    let got = run_cfg0(&mut with_transformer("z_image_tiny_comfy.safetensors"));
    assert_eq!(max_diff(&got, &want), 0.0);
}

#[test]
fn gguf_transformers_match_diffusers_gguf_loading() {
    let g = golden();
    for name in [
        "dit-q8_0.gguf",
        "dit-q4_0.gguf",
        "dit-q4_k.gguf",
        "dit-q6_k.gguf",
    ] {
        let mut m = with_transformer(name);
        // Quantized matrices stay quantized in memory: far fewer bytes than f32.
        let w = m.weights(zturbo::families::Component::Denoiser);
        assert!(w.is_quantized(), "{name}");
        let resident = w.bytes_in("", DType::F32);
        let dense: u64 = w
            .tensors()
            .values()
            .map(|t| t.elem_count() as u64 * 4)
            .sum();
        assert!(
            resident * 2 < dense,
            "{name}: {resident} resident bytes vs {dense} in f32"
        );
        let types: serde_json::Value =
            serde_json::from_str(&g.meta[&format!("{name}.types")]).unwrap();
        eprintln!("{name}: {types}");
        let got = run_cfg0(&mut m);
        assert_close(
            &format!("{name} final latents"),
            &got,
            g.get(&format!("{name}.final_latents")),
            1e-4,
        );
    }
}

#[test]
fn gguf_files_mix_every_block_type() {
    // The four files together hold every type candle reads except Q8_1/Q8_K (no writer makes
    // those for weights): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K.
    let mut seen = std::collections::BTreeSet::new();
    for name in [
        "dit-q8_0.gguf",
        "dit-q4_0.gguf",
        "dit-q4_k.gguf",
        "dit-q6_k.gguf",
    ] {
        let w = Weights::open_file(&file(name), "transformer", Role::Transformer).unwrap();
        seen.extend(w.format().encodings.into_keys());
    }
    for t in [
        "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k",
        "q5_k", "q6_k",
    ] {
        assert!(seen.contains(t), "{t} missing from {seen:?}");
    }
}

#[test]
fn fp8_files_reproduce_their_dequantized_weights() {
    let g = golden();
    for name in [
        "dit-fp8-e4m3fn-scaled.safetensors",
        "dit-fp8-e5m2.safetensors",
    ] {
        let w = Weights::open_file(&file(name), "transformer", Role::Transformer).unwrap();
        assert!(w.is_quantized());
        let prefix = format!("{name}.dequantized.");
        let mut checked = 0;
        for (k, want) in &g.tensors {
            if let Some(t) = k.strip_prefix(&prefix) {
                let got = w.load(t, DType::F32, &Device::Cpu).unwrap();
                assert_close(&format!("{name} {t}"), &got, want, 1e-4);
                // Through the quantized path too: the stored codes dequantized per product.
                let m = w
                    .loader(DType::F32, &Device::Cpu)
                    .matrix(want.dim(0).unwrap(), want.dim(1).unwrap(), t)
                    .unwrap();
                assert!(m.is_quantized());
                assert_close(
                    &format!("{name} {t} (kept)"),
                    &m.dequantize(DType::F32).unwrap(),
                    want,
                    1e-4,
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 3, "{name}");
    }
    let got = run_cfg0(&mut with_transformer("dit-fp8-e4m3fn-scaled.safetensors"));
    assert_close(
        "fp8 e4m3fn final latents",
        &got,
        g.get("dit-fp8-e4m3fn-scaled.safetensors.final_latents"),
        1e-4,
    );
}

#[test]
fn gguf_text_encoder_matches_transformers_gguf_loading() {
    let g = golden();
    let mut m = open(ComponentFiles {
        text_encoder: Some(file("te-q8_0.gguf")),
        ..Default::default()
    });
    assert!(m
        .weights(zturbo::families::Component::TextEncoder)
        .is_quantized());
    let cond = m
        .encode("a serene mountain lake at dawn", Some("blurry"))
        .unwrap();
    assert_close(
        "prompt embeds",
        &cond.positive.hidden,
        g.get("te-q8_0.gguf.prompt.embeds"),
        1e-4,
    );
    assert_close(
        "negative embeds",
        &cond.negative.unwrap().hidden,
        g.get("te-q8_0.gguf.negative.embeds"),
        1e-4,
    );
}

#[test]
fn ldm_vae_is_the_folder_bit_for_bit() {
    let ae = Weights::open_file(&file("ae.safetensors"), "vae", Role::Vae).unwrap();
    let folder = ModelDir::open(fixture("tiny-z-image"))
        .unwrap()
        .open_weights_as("vae", Role::Vae)
        .unwrap();
    assert_eq!(
        folder.tensors().keys().collect::<Vec<_>>(),
        ae.tensors().keys().collect::<Vec<_>>()
    );
    for n in folder.tensors().keys() {
        let a = folder.load(n, DType::F32, &Device::Cpu).unwrap();
        let b = ae.load(n, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(a.dims(), b.dims(), "{n}");
        assert_eq!(max_diff(&a, &b), 0.0, "{n}");
    }
    let mut with_ae = open(ComponentFiles {
        vae: Some(file("ae.safetensors")),
        ..Default::default()
    });
    let mut plain = open(ComponentFiles::default());
    let z = Tensor::randn(0f32, 1.0, (1, 16, 8, 8), &Device::Cpu).unwrap();
    let a = with_ae.decode(&z).unwrap();
    let b = plain.decode(&z).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
}

/// The error of opening the fixture with `files`, as the user reads it.
fn open_error(files: ComponentFiles) -> String {
    let dir = ModelDir::open(fixture("tiny-z-image")).unwrap();
    match ZImage::open_with(dir, &files, &Device::Cpu, PrecisionPolicy::F32) {
        Ok(_) => panic!("{files:?} opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_get_one_sentence_naming_file_and_tensor() {
    let bad = |n: &str| fixture("tiny-z-image-files/bad").join(n);
    let cases: Vec<(ComponentFiles, &str, Vec<&str>)> = vec![
        (
            ComponentFiles {
                transformer: Some(bad("flux-transformer.safetensors")),
                ..Default::default()
            },
            "flux-transformer.safetensors",
            vec![
                "a Flux transformer",
                "double_blocks.",
                "not a Z-Image transformer",
            ],
        ),
        (
            ComponentFiles {
                transformer: Some(file("ae.safetensors")),
                ..Default::default()
            },
            "ae.safetensors",
            vec![
                "an AutoencoderKL VAE",
                "decoder.",
                "not a Z-Image transformer",
            ],
        ),
        (
            ComponentFiles {
                text_encoder: Some(bad("te-missing-tensor.gguf")),
                ..Default::default()
            },
            "te-missing-tensor.gguf",
            vec!["missing tensor `blk.1.ffn_down.weight`"],
        ),
        (
            ComponentFiles {
                text_encoder: Some(bad("te-wrong-shape.gguf")),
                ..Default::default()
            },
            "te-wrong-shape.gguf",
            vec!["`blk.0.attn_k.weight` has shape [16, 48]", "[32, 48]"],
        ),
        (
            ComponentFiles {
                text_encoder: Some(bad("te-iq4_nl.gguf")),
                ..Default::default()
            },
            "te-iq4_nl.gguf",
            vec!["`blk.0.attn_output.weight`", "IQ4_NL", "cannot read"],
        ),
        (
            ComponentFiles {
                transformer: Some(bad("dit-truncated.gguf")),
                ..Default::default()
            },
            "dit-truncated.gguf",
            vec!["truncated", "tensor `"],
        ),
    ];
    for (files, name, parts) in cases {
        let e = open_error(files);
        assert!(e.contains(name), "{e}");
        for p in parts {
            assert!(e.contains(p), "`{p}` not in: {e}");
        }
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}
