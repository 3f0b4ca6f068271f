//! Random-weight Z-Image folders of any shape, in the real diffusers layout (sharded weights and
//! all), for benchmarks and memory tests: real sizes matter for memory and speed work, but real
//! weights cannot be downloaded everywhere — and must never be committed.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use candle_transformers::models::z_image::text_encoder::TextEncoderConfig;
use serde_json::json;

use super::blocks::ResidentBlocks;
use super::config::DitConfig;
use super::dit::{Dit, DitPrecision};
use super::text_encoder::TextEncoder;
use crate::families::weights::Recording;
use crate::families::ModelError;
use crate::nn::rng::NoiseRng;
use crate::nn::vae::{VaeConfig, VaeDecoder};

/// Sizes of a synthetic model.
#[derive(Debug, Clone)]
pub struct SyntheticShape {
    pub dit: serde_json::Value,
    pub text_encoder: serde_json::Value,
    pub vae: serde_json::Value,
    /// Dtype the weights are stored in.
    pub dtype: DType,
}

impl SyntheticShape {
    /// Tongyi-MAI/Z-Image-Turbo's exact shapes (6.15 B DiT, Qwen3-4B text encoder), bf16.
    pub fn real() -> Self {
        Self {
            dit: json!({"dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30,
                        "cap_feat_dim": 2560, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512]}),
            text_encoder: qwen3(2560, 36, 32, 8, 128, 9728, 151_936),
            vae: vae(&[128, 256, 512, 512], 32),
            dtype: DType::BF16,
        }
    }

    /// The real proportions (text encoder ≈ 36 % of the weights, DiT ≈ 58 %) at ≈ 1/27 of the
    /// parameters: ≈ 0.77 GB in f32. Big enough that weights and activations matter on a CPU,
    /// small enough that an 8-step 512² run takes seconds, not hours.
    pub fn bench() -> Self {
        Self {
            dit: json!({"dim": 768, "n_layers": 12, "n_refiner_layers": 1, "n_heads": 12, "n_kv_heads": 12,
                        "cap_feat_dim": 768, "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512]}),
            text_encoder: qwen3(768, 9, 12, 4, 64, 2688, 640),
            vae: vae(&[64, 128, 256, 256], 32),
            dtype: DType::F32,
        }
    }

    pub fn named(name: &str) -> Option<Self> {
        match name {
            "real" => Some(Self::real()),
            "bench" => Some(Self::bench()),
            _ => None,
        }
    }
}

fn qwen3(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    inter: usize,
    vocab: usize,
) -> serde_json::Value {
    json!({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
           "head_dim": head_dim, "intermediate_size": inter, "vocab_size": vocab, "hidden_act": "silu",
           "rms_norm_eps": 1e-6, "rope_theta": 1_000_000, "max_position_embeddings": 40960,
           "tie_word_embeddings": true, "attention_bias": false})
}

fn vae(channels: &[usize], groups: usize) -> serde_json::Value {
    json!({"_class_name": "AutoencoderKL", "block_out_channels": channels, "latent_channels": 16,
           "layers_per_block": 2, "norm_num_groups": groups, "scaling_factor": 0.3611, "shift_factor": 0.1159,
           "use_post_quant_conv": false, "use_quant_conv": false, "mid_block_add_attention": true,
           "in_channels": 3, "out_channels": 3})
}

/// Records every tensor a module asks for (name and shape) and hands out free placeholders.
#[derive(Default)]
struct Recorder {
    seen: std::sync::Mutex<Vec<(String, Vec<usize>)>>,
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
        if let Ok(mut v) = self.seen.lock() {
            if !v.iter().any(|(n, _)| n == name) {
                v.push((name.to_string(), s.dims().to_vec()));
            }
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("synthetic models need shapes: `{name}` was requested without one")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

fn record(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<(String, Vec<usize>)>> {
    let rec = std::sync::Arc::new(Recorder::default());
    let vb = VarBuilder::from_backend(Box::new(ArcRecorder(rec.clone())), DType::F32, Device::Cpu);
    build(vb)?;
    let seen = rec.seen.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(seen)
}

struct ArcRecorder(std::sync::Arc<Recorder>);
impl SimpleBackend for ArcRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Values for one tensor: 1-D weights (norm scales) are 1, biases 0, everything else
/// N(0, 1/fan_in) — keeps activations O(1) through many layers, so runs stay finite. Generated in
/// parallel chunks, each with its own seeded stream, so a 20 GB model takes seconds, not minutes.
fn values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    use rayon::prelude::*;
    let n: usize = shape.iter().product();
    if name.ends_with("bias") {
        return vec![0.0; n];
    }
    if shape.len() == 1 {
        return vec![1.0; n];
    }
    let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
    let std = if name.contains("pad_token") {
        0.02
    } else {
        1.0 / (fan_in as f64).sqrt()
    };
    const CHUNK: usize = 1 << 20;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = NoiseRng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for v in chunk {
                *v = (rng.normal() * std) as f32;
            }
        });
    out
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        _ => "F32",
    }
}

fn encode(v: &[f32], d: DType) -> Vec<u8> {
    match d {
        DType::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Largest shard written (the hub's diffusers checkpoints use ≈ 5 GB shards).
const SHARD_BYTES: u64 = 4_000_000_000;

/// Writes one component's tensors, sharded with an index file when larger than a shard.
fn write_component(
    dir: &Path,
    file_stem: &str,
    tensors: &[(String, Vec<usize>)],
    dtype: DType,
    seed: u64,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let size = |s: &[usize]| s.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
    let mut shards: Vec<Vec<&(String, Vec<usize>)>> = vec![vec![]];
    let mut acc = 0u64;
    for t in tensors {
        let b = size(&t.1);
        if acc > 0 && acc + b > SHARD_BYTES {
            shards.push(vec![]);
            acc = 0;
        }
        acc += b;
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            format!("{file_stem}.safetensors")
        } else {
            format!("{file_stem}-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let mut header = serde_json::Map::new();
        let mut off = 0u64;
        for (name, shape) in shard {
            let b = size(shape);
            header.insert(
                name.clone(),
                json!({"dtype": st_dtype(dtype), "shape": shape, "data_offsets": [off, off + b]}),
            );
            off += b;
            weight_map.insert(name.clone(), json!(file));
        }
        let mut h = serde_json::to_vec(&header)?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join(&file))?);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for (name, shape) in shard {
            let tensor_seed = seed
                ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
                });
            w.write_all(&encode(&values(name, shape, tensor_seed), dtype))?;
        }
        w.flush()?;
    }
    if n > 1 {
        let total: u64 = tensors.iter().map(|t| size(&t.1)).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            dir.join(format!("{file_stem}.safetensors.index.json")),
            serde_json::to_vec_pretty(&index)?,
        )?;
    }
    Ok(())
}

/// Writes a complete random-weight Z-Image folder (configs, tokenizer of the demo model, weights).
pub fn write(dir: &Path, shape: &SyntheticShape, seed: u64) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let dit_cfg: DitConfig = serde_json::from_value(shape.dit.clone())
        .map_err(|e| ModelError::Invalid(e.to_string()))?;
    dit_cfg.validate().map_err(ModelError::Invalid)?;
    let te_cfg: TextEncoderConfig = serde_json::from_value(shape.text_encoder.clone())
        .map_err(|e| ModelError::Invalid(e.to_string()))?;
    let vae_cfg: VaeConfig = serde_json::from_value(shape.vae.clone())
        .map_err(|e| ModelError::Invalid(e.to_string()))?;

    let dit_tensors = {
        let rec = Recording::default();
        let ld = rec.loader(DType::F32);
        let p = DitPrecision {
            compute: DType::F32,
            residual: DType::F32,
        };
        Dit::new(dit_cfg.clone(), ld.clone(), p)?;
        ResidentBlocks::load(&dit_cfg, &ld)?;
        rec.tensors()
    };
    let te_tensors = {
        let rec = Recording::default();
        TextEncoder::new(&te_cfg, rec.loader(DType::F32))?;
        let mut t = rec.tensors();
        // The last decoder layer and the final norm exist in real checkpoints although
        // hidden_states[-2] never reads them: write them too.
        let last = te_cfg.num_hidden_layers - 2;
        let extra: Vec<(String, Vec<usize>)> = t
            .iter()
            .filter_map(|(n, s)| {
                n.strip_prefix(&format!("model.layers.{last}."))
                    .map(|rest| (format!("model.layers.{}.{rest}", last + 1), s.clone()))
            })
            .collect();
        t.extend(extra);
        t.push(("model.norm.weight".into(), vec![te_cfg.hidden_size]));
        t
    };
    let vae_tensors = record(|vb| {
        VaeDecoder::new(&vae_cfg, vb.clone())?;
        crate::nn::vae_encoder::VaeEncoder::new(&vae_cfg, vb)?;
        Ok(())
    })?;

    let demo = crate::families::catalog::demo();
    for rel in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ] {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap_or(dir)).map_err(io)?;
        std::fs::write(&path, demo.read_string(rel)?).map_err(io)?;
    }
    let mut dit_json = shape.dit.clone();
    dit_json["_class_name"] = json!("ZImageTransformer2DModel");
    for (rel, v) in [
        ("transformer/config.json", &dit_json),
        ("text_encoder/config.json", &shape.text_encoder),
        ("vae/config.json", &shape.vae),
    ] {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap_or(dir)).map_err(io)?;
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(v).map_err(|e| io(e.into()))?,
        )
        .map_err(io)?;
    }
    write_component(
        &dir.join("transformer"),
        "diffusion_pytorch_model",
        &dit_tensors,
        shape.dtype,
        seed,
    )
    .map_err(io)?;
    write_component(
        &dir.join("text_encoder"),
        "model",
        &te_tensors,
        shape.dtype,
        seed,
    )
    .map_err(io)?;
    write_component(
        &dir.join("vae"),
        "diffusion_pytorch_model",
        &vae_tensors,
        shape.dtype,
        seed,
    )
    .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::{z_image::ZImage, Family, ModelDir, PrecisionPolicy};

    #[test]
    fn a_small_synthetic_model_opens_and_runs() {
        let dir = std::env::temp_dir().join(format!("zturbo-synth-{}", std::process::id()));
        let shape = SyntheticShape {
            dit: json!({"dim": 64, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2, "cap_feat_dim": 32,
                        "axes_dims": [8, 12, 12], "axes_lens": [1536, 512, 512]}),
            text_encoder: qwen3(32, 2, 2, 1, 16, 64, 640),
            vae: vae(&[8, 8], 4),
            dtype: DType::BF16,
        };
        write(&dir, &shape, 1).unwrap();
        let mut m = ZImage::open(
            ModelDir::open(&dir).unwrap(),
            &Device::Cpu,
            PrecisionPolicy::F32,
        )
        .unwrap();
        let cond = m.encode("a cat", None).unwrap();
        let s = m.schedule(2, 4, 4).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 16, 4, 4), &Device::Cpu).unwrap();
        let d = m
            .predict(
                &x,
                &cond,
                crate::families::StepInput {
                    index: 0,
                    schedule: &s,
                    cfg: 1.0,
                },
            )
            .unwrap();
        assert!(d.sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite());
        let img = m.decode(&x).unwrap();
        assert_eq!(img.dims(), &[1, 3, 8, 8]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
