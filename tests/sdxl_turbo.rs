//! SDXL-Turbo structure and plumbing (numerical parity with diffusers' `StableDiffusionXLPipeline`
//! is `tests/sdxl_turbo_parity.rs`, on the golden fixture `tests/fixtures/tiny-sdxl-turbo`).
//! What is checked here:
//!
//! 1. Architecture: the UNet and CLIP encoders built from the real `stabilityai/sd-turbo` and
//!    `stabilityai/sdxl-turbo` configs ask for exactly the published parameter counts and for
//!    diffusers' tensor names (a recording weight backend, no weights needed).
//! 2. Pipeline plumbing on a tiny random SDXL folder generated here: two tokenizers and text
//!    encoders (one stored without the `text_model.` prefix), penultimate hidden states
//!    concatenated, pooled projection + size ids into the UNet's `text_time` embedding, zeroed
//!    empty negative prompt, ancestral scheduler file, engine and CLI runs: shapes, finiteness,
//!    determinism, and that every conditioning input changes the output.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use common::{fixture, max_abs, max_abs_diff};
use zturbo::engine::{CancelToken, Engine, EngineConfig, NullObserver, RunExtras};
use zturbo::families::sd_turbo::clip::{ClipTextConfig, ClipTextModel};
use zturbo::families::sd_turbo::config::UNetConfig;
use zturbo::families::sd_turbo::unet::{TextTime, UNet, UNetPrecision};
use zturbo::families::sd_turbo::{SdTurbo, Variant};
use zturbo::families::{self, Family, ModelDir, PrecisionPolicy};
use zturbo::memory::planner::MemoryMode;
use zturbo::nn::rng::noise;
use zturbo::request::{GenerationRequest, Limits};

/// Records every tensor a model asks for; hands out zero-cost placeholders.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
    present: Vec<String>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of `{name}`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.present.iter().any(|p| p == name)
    }
}

impl Recorder {
    fn with_present(present: &[&str]) -> Self {
        Self {
            present: present.iter().map(|s| s.to_string()).collect(),
            ..Self::default()
        }
    }

    fn vb(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }

    fn tensors(&self) -> BTreeMap<String, Vec<usize>> {
        self.seen.lock().unwrap().clone()
    }

    fn params(&self) -> usize {
        self.tensors()
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }
}

const F32: UNetPrecision = UNetPrecision {
    compute: DType::F32,
    residual: DType::F32,
};

/// `stabilityai/sd-turbo` `unet/config.json` (the SD 2.1-base UNet).
const SD_TURBO_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
  "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
  "sample_size": 64, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "upcast_attention": false, "use_linear_projection": true
}"#;

/// `stabilityai/sdxl-turbo` `unet/config.json` (the SDXL-base UNet).
const SDXL_TURBO_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
  "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280], "center_input_sample": false, "class_embed_type": null,
  "class_embeddings_concat": false, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
  "cross_attention_norm": null, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null, "encoder_hid_dim_type": null,
  "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
  "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": null, "num_class_embeds": null,
  "only_cross_attention": false, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false, "resnet_time_scale_shift": "default",
  "sample_size": 64, "time_cond_proj_dim": null, "time_embedding_act_fn": null, "time_embedding_dim": null,
  "time_embedding_type": "positional", "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": null,
  "use_linear_projection": true
}"#;

fn record_unet(config: &str) -> Recorder {
    let cfg: UNetConfig = serde_json::from_str(config).unwrap();
    let rec = Recorder::default();
    UNet::new(&cfg, rec.vb(), F32).unwrap();
    rec
}

fn record_clip(config: serde_json::Value, projection: bool) -> Recorder {
    let cfg: ClipTextConfig = serde_json::from_value(config).unwrap();
    let rec = if projection {
        Recorder::with_present(&["text_projection.weight"])
    } else {
        Recorder::default()
    };
    let m = ClipTextModel::new(&cfg, rec.vb()).unwrap();
    assert_eq!(m.has_projection(), projection);
    rec
}

#[test]
fn real_unet_configs_build_with_the_published_parameter_counts() {
    // Parameter counts of diffusers' UNet2DConditionModel for SD 2.1 (sd-turbo) and SDXL.
    let sd = record_unet(SD_TURBO_UNET);
    assert_eq!(sd.params(), 865_910_724);
    let xl = record_unet(SDXL_TURBO_UNET);
    assert_eq!(xl.params(), 2_567_463_684);

    let t = xl.tensors();
    let shape = |n: &str| {
        t.get(n)
            .unwrap_or_else(|| panic!("tensor `{n}` not requested"))
            .clone()
    };
    assert_eq!(shape("add_embedding.linear_1.weight"), [1280, 2816]);
    assert_eq!(shape("time_embedding.linear_1.weight"), [1280, 320]);
    assert_eq!(
        shape("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight"),
        [1280, 2048]
    );
    assert_eq!(
        shape("up_blocks.0.attentions.2.transformer_blocks.9.ff.net.0.proj.weight"),
        [10240, 1280]
    );
    assert_eq!(
        shape("mid_block.attentions.0.transformer_blocks.9.norm3.weight"),
        [1280]
    );
    assert_eq!(
        shape("up_blocks.2.resnets.2.conv_shortcut.weight"),
        [320, 640, 1, 1]
    );
    assert!(!t.keys().any(|k| k.starts_with("down_blocks.0.attentions")));
    assert!(!t.keys().any(|k| k.starts_with("up_blocks.2.attentions")));
    assert!(!t
        .keys()
        .any(|k| k.starts_with("down_blocks.1.attentions.0.transformer_blocks.2")));
}

#[test]
fn real_clip_configs_build_with_the_published_parameter_counts() {
    let base = |hidden: usize, inter: usize, layers: usize, heads: usize, act: &str| {
        serde_json::json!({
            "vocab_size": 49408, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "max_position_embeddings": 77, "hidden_act": act, "projection_dim": 1280
        })
    };
    // sd-turbo's OpenCLIP ViT-H text tower, SDXL's CLIP ViT-L and OpenCLIP ViT-bigG (+ projection).
    assert_eq!(
        record_clip(base(1024, 4096, 23, 16, "gelu"), false).params(),
        340_387_840
    );
    assert_eq!(
        record_clip(base(768, 3072, 12, 12, "quick_gelu"), false).params(),
        123_060_480
    );
    assert_eq!(
        record_clip(base(1280, 5120, 32, 20, "gelu"), true).params(),
        694_659_840
    );
}

// ---- A tiny random SDXL-Turbo folder --------------------------------------------------------------

const TINY_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
  "attention_head_dim": [1, 2, 4], "block_out_channels": [8, 16, 16], "cross_attention_dim": 40,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
  "norm_num_groups": 4, "norm_eps": 1e-05, "projection_class_embeddings_input_dim": 32,
  "transformer_layers_per_block": [1, 2, 2], "use_linear_projection": true, "upcast_attention": null
}"#;

fn tiny_clip_config(hidden: usize, layers: usize, heads: usize, act: &str, proj: bool) -> String {
    let arch = if proj {
        "CLIPTextModelWithProjection"
    } else {
        "CLIPTextModel"
    };
    serde_json::json!({
        "architectures": [arch], "hidden_act": act, "hidden_size": hidden,
        "intermediate_size": 2 * hidden, "layer_norm_eps": 1e-5, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": heads, "num_hidden_layers": layers,
        "projection_dim": 8, "vocab_size": 802, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1
    })
    .to_string()
}

/// Seeded weights for every tensor `rec` saw: N(0,1) embeddings, norm scales 1 + N(0, 0.1²),
/// biases N(0, 0.05²), matrices N(0,1)/√fan_in (the fixture generator's rule).
fn random_weights(rec: &Recorder, seed: u64, path: &Path) {
    let mut out = HashMap::new();
    for (i, (name, shape)) in rec.tensors().into_iter().enumerate() {
        let n = noise(seed * 10_000 + i as u64, &shape, &Device::Cpu).unwrap();
        let t = if name.ends_with("embedding.weight") {
            n
        } else if shape.len() == 1 && name.ends_with("weight") {
            ((n * 0.1).unwrap() + 1.0).unwrap()
        } else if shape.len() == 1 {
            (n * 0.05).unwrap()
        } else {
            let fan_in: usize = shape[1..].iter().product();
            (n / (fan_in as f64).sqrt()).unwrap()
        };
        out.insert(name, t);
    }
    candle_core::safetensors::save(&out, path).unwrap();
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn copy(from: &str, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(fixture(from), to).unwrap();
}

/// Builds the folder once per test process.
fn tiny_sdxl() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tiny-sdxl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        write(
            &d.join("model_index.json"),
            r#"{"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": true,
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"]}"#,
        );
        write(
            &d.join("scheduler/scheduler_config.json"),
            r#"{"_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "trailing",
                "trained_betas": null}"#,
        );
        for (tok, pad) in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")] {
            for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
                copy(&format!("tiny-sd-turbo/tokenizer/{f}"), &d.join(tok).join(f));
            }
            let map = serde_json::json!({
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": pad, "unk_token": "<|endoftext|>"
            });
            write(
                &d.join(tok).join("special_tokens_map.json"),
                &map.to_string(),
            );
            // The first tokenizer (CLIP ViT-L) pads with <|endoftext|>: its config says so too.
            let cfg_path = d.join(tok).join("tokenizer_config.json");
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
            cfg["pad_token"] = serde_json::json!(pad);
            write(&cfg_path, &cfg.to_string());
        }
        for (folder, hidden, layers, heads, act, proj, seed) in [
            ("text_encoder", 16, 2, 2, "quick_gelu", false, 3001),
            ("text_encoder_2", 24, 3, 3, "gelu", true, 3002),
        ] {
            let cfg = tiny_clip_config(hidden, layers, heads, act, proj);
            write(&d.join(folder).join("config.json"), &cfg);
            let rec = record_clip(serde_json::from_str(&cfg).unwrap(), proj);
            random_weights(&rec, seed, &d.join(folder).join("model.safetensors"));
        }
        write(&d.join("unet/config.json"), TINY_UNET);
        random_weights(
            &record_unet(TINY_UNET),
            3003,
            &d.join("unet/diffusion_pytorch_model.safetensors"),
        );
        copy(
            "tiny-sd-turbo/vae/diffusion_pytorch_model.safetensors",
            &d.join("vae/diffusion_pytorch_model.safetensors"),
        );
        let mut vae: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("tiny-sd-turbo/vae/config.json")).unwrap(),
        )
        .unwrap();
        vae["scaling_factor"] = serde_json::json!(0.13025);
        write(&d.join("vae/config.json"), &vae.to_string());
        d
    })
    .clone()
}

fn open_tiny() -> SdTurbo {
    let dir = ModelDir::open(tiny_sdxl()).unwrap();
    SdTurbo::open(dir, &Device::Cpu, PrecisionPolicy::F32).unwrap()
}

#[test]
fn tiny_sdxl_opens_as_the_sdxl_family() {
    let dir = ModelDir::open(tiny_sdxl()).unwrap();
    let f = families::open(dir, &Device::Cpu, PrecisionPolicy::F32).unwrap();
    let info = f.profile();
    assert_eq!(info.family, "sdxl-turbo");
    assert_eq!(
        (
            info.defaults.width,
            info.defaults.height,
            info.defaults.steps
        ),
        (512, 512, 1)
    );
    assert_eq!(info.defaults.cfg, 1.0);
    assert_eq!(f.components().bytes().denoiser_blocks, 0);
    // Two text encoders count together.
    let m = open_tiny();
    assert_eq!(m.variant(), Variant::Sdxl);
    assert_eq!(m.tokenizer().pad_id(), 801);
    assert_eq!(m.tokenizer_2().unwrap().pad_id(), 0);
    let ids = m.tokenize("a lake").unwrap();
    assert_eq!(ids.len(), 77);
    assert!(ids[4..].iter().all(|&i| i == 801), "{ids:?}");
}

#[test]
fn conditioning_is_two_penultimate_states_and_the_pooled_projection() {
    let mut m = open_tiny();
    let c = m
        .encode("a serene mountain lake at dawn", Some(""))
        .unwrap();
    assert_eq!(c.positive.hidden.dims(), [1, 77, 40]);
    let pooled = c.positive.pooled.as_ref().unwrap();
    assert_eq!(pooled.dims(), [1, 8]);
    // The first 16 features are the first encoder's hidden_states[-2], not its last state.
    let te1 = m
        .text_encoder_forward("a serene mountain lake at dawn")
        .unwrap();
    let first = c.positive.hidden.narrow(2, 0, 16).unwrap();
    assert_eq!(max_abs_diff(&first, &te1.penultimate), 0.0);
    assert!(max_abs_diff(&first, &te1.last_hidden) > 1e-3);
    // An empty negative prompt is zeros (force_zeros_for_empty_prompt); a real one is encoded.
    let neg = c.negative.as_ref().unwrap();
    assert_eq!(max_abs(&neg.hidden), 0.0);
    assert_eq!(max_abs(neg.pooled.as_ref().unwrap()), 0.0);
    let c2 = m.encode("a lake", Some("blurry")).unwrap();
    assert!(max_abs(&c2.negative.unwrap().hidden) > 0.0);
}

#[test]
fn text_time_inputs_change_the_unet_output() {
    let mut m = open_tiny();
    let c = m.encode("a lake", None).unwrap();
    let x = noise(5, &[1, 4, 8, 12], &Device::Cpu).unwrap();
    let pooled = c.positive.pooled.as_ref().unwrap();
    let ids = |h: f32, w: f32| Tensor::new(&[[h, w, 0.0, 0.0, h, w]], &Device::Cpu).unwrap();
    let run = |m: &mut SdTurbo, pooled: &Tensor, ids: &Tensor| {
        let tt = TextTime {
            text_embeds: pooled,
            time_ids: ids,
        };
        m.unet_forward(&x, &[999.0], &c.positive.hidden, Some(&tt))
            .unwrap()
    };
    let base = run(&mut m, pooled, &ids(64.0, 96.0));
    assert_eq!(base.dims(), [1, 4, 8, 12]);
    assert!(max_abs(&base).is_finite());
    let other_size = run(&mut m, pooled, &ids(1024.0, 1024.0));
    assert!(max_abs_diff(&base, &other_size) > 1e-4);
    let zero_pooled = run(&mut m, &pooled.zeros_like().unwrap(), &ids(64.0, 96.0));
    assert!(max_abs_diff(&base, &zero_pooled) > 1e-4);
    let again = run(&mut m, pooled, &ids(64.0, 96.0));
    assert_eq!(max_abs_diff(&base, &again), 0.0);
    // Without the text_time inputs the SDXL UNet refuses to run.
    assert!(m
        .unet_forward(&x, &[999.0], &c.positive.hidden, None)
        .is_err());
}

fn engine() -> Engine {
    let probe = zturbo::memory::probe::for_device(&Device::Cpu);
    Engine::new(
        Box::new(open_tiny()),
        "tiny-sdxl",
        probe,
        EngineConfig::default(),
    )
}

fn request(steps: u32, cfg: f32, seed: u64) -> zturbo::request::ValidRequest {
    let limits = Limits {
        default_width: 512,
        default_height: 512,
        default_steps: 1,
        default_cfg: 1.0,
        size_multiple: 8,
        max_batch: 4,
        default_memory_mode: MemoryMode::Auto,
        img2img: zturbo::families::sd_turbo::profile::IMG2IMG_DEFAULTS,
    };
    GenerationRequest {
        prompt: "a serene mountain lake at dawn".into(),
        negative_prompt: Some("blurry".into()),
        width: Some(96),
        height: Some(64),
        steps: Some(steps),
        cfg: Some(cfg),
        seed: Some(seed),
        enhance: Some(false),
        ..Default::default()
    }
    .validate(&limits)
    .unwrap()
}

#[test]
fn engine_runs_are_finite_and_deterministic() {
    let mut e = engine();
    let go = |e: &mut Engine, steps, cfg, seed| {
        e.generate(
            &request(steps, cfg, seed),
            &RunExtras::default(),
            &mut NullObserver,
            &CancelToken::new(),
        )
        .unwrap()
    };
    let a = go(&mut e, 1, 1.0, 7);
    assert_eq!(a.latents.dims(), [1, 4, 8, 12]);
    assert_eq!((a.images[0].width, a.images[0].height), (96, 64));
    assert!(a.notices.is_empty(), "{:?}", a.notices);
    assert!(max_abs(&a.latents).is_finite());
    let b = go(&mut e, 1, 1.0, 7);
    assert_eq!(max_abs_diff(&a.latents, &b.latents), 0.0);
    assert_eq!(a.images[0].rgb, b.images[0].rgb);
    let other_seed = go(&mut e, 1, 1.0, 8);
    assert!(max_abs_diff(&a.latents, &other_seed.latents) > 1e-3);
    let two = go(&mut e, 2, 1.0, 7);
    assert!(max_abs(&two.latents).is_finite());
    assert!(max_abs_diff(&a.latents, &two.latents) > 1e-3);
    let guided = go(&mut e, 1, 1.5, 7);
    assert!(max_abs(&guided.latents).is_finite());
    assert!(max_abs_diff(&a.latents, &guided.latents) > 1e-3);
    assert_eq!(guided.params.run.negative_prompt.as_deref(), Some("blurry"));
}

#[test]
fn cli_generates_with_the_tiny_sdxl_folder() {
    let dir = tiny_sdxl();
    let out = std::env::temp_dir().join(format!("zturbo-sdxl-cli-{}.png", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "a lake",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "3",
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 64));
    std::fs::remove_file(out).unwrap();
}
