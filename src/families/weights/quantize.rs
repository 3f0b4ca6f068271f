//! `zturbo quantize`: a component's weights (any format we read) written as GGUF the way the
//! tools people use expect it — the Z-Image DiT under ComfyUI's names with
//! `general.architecture = lumina2` (what ComfyUI-GGUF's `UnetLoaderGGUF` accepts and
//! stable-diffusion.cpp's `--diffusion-model` reads), the Qwen3 text encoder under llama.cpp's
//! `qwen3` names with its `qwen3.*` hyper-parameters. One tensor at a time: memory stays at one
//! matrix in f32, and the file appears only when complete.

use std::io::Write;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::gguf::{self, Value};
use super::layout::{self, Role};
use super::Weights;
use crate::families::ModelError;
use crate::ops::quantized::{ggml_name, quantize_rows};

/// The block types `zturbo quantize --to` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Q8_0,
    Q6K,
    Q5K,
    Q4K,
    Q4_0,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "q8_0" => Self::Q8_0,
            "q6_k" => Self::Q6K,
            "q5_k" => Self::Q5K,
            "q4_k" => Self::Q4K,
            "q4_0" => Self::Q4_0,
            other => {
                return Err(format!(
                    "unknown type `{other}` (allowed: q8_0, q6_k, q5_k, q4_k, q4_0)"
                ))
            }
        })
    }
}

impl Target {
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_MOSTLY_*).
    fn file_type(self) -> u32 {
        match self {
            Self::Q8_0 => 7,
            Self::Q4_0 => 2,
            Self::Q4K => 15,
            Self::Q5K => 17,
            Self::Q6K => 18,
        }
    }
}

/// One tensor of the output: its name, row-major dims, type, and the canonical tensors whose rows
/// it concatenates (ComfyUI fuses q, k, v).
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: GgmlDType,
    pub sources: Vec<String>,
}

impl Planned {
    fn bytes(&self) -> usize {
        let n: usize = self.dims.iter().product();
        n / self.ty.block_size() * self.ty.type_size()
    }
}

/// llama.cpp's fallback for rows that do not divide into a K type's 256-value blocks.
fn fallback(t: GgmlDType) -> GgmlDType {
    match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        other => other,
    }
}

/// The type of one tensor in a file whose matrices are `main`: 1-D tensors, pad tokens and (for
/// the DiT) the embedders and final layer stay F32, as ComfyUI-GGUF's converter keeps them;
/// matrices take `main` when their rows divide into its blocks, llama.cpp's fallback when they
/// divide into 32, else F32. `name` may be the stored or the canonical name.
pub fn type_for_canonical(name: &str, dims: &[usize], main: GgmlDType, role: Role) -> GgmlDType {
    let high_precision = matches!(role, Role::Transformer)
        && [
            "x_embedder.",
            "final_layer.",
            "all_x_embedder.",
            "all_final_layer.",
            "t_embedder.",
            "cap_embedder.",
        ]
        .iter()
        .any(|p| name.starts_with(p));
    if dims.len() != 2 || name.contains("pad_token") || high_precision {
        return GgmlDType::F32;
    }
    let cols = dims[1];
    if cols % main.block_size() == 0 {
        main
    } else if cols % fallback(main).block_size() == 0 {
        fallback(main)
    } else {
        GgmlDType::F32
    }
}

fn type_for(name: &str, dims: &[usize], target: Target, role: Role) -> GgmlDType {
    type_for_canonical(name, dims, target.ggml(), role)
}

/// The output tensors for `weights` (opened as `role`).
pub fn plan(weights: &Weights, role: Role, target: Target) -> Result<Vec<Planned>, ModelError> {
    let mut out: Vec<Planned> = Vec::new();
    for (name, info) in weights.tensors() {
        let (stored, sources, dims) = match role {
            Role::Transformer => {
                if name.ends_with(".attention.to_k.weight") || name.ends_with(".attention.to_v.weight") {
                    continue;
                }
                if let Some(base) = name.strip_suffix(".attention.to_q.weight") {
                    let parts: Vec<String> = ["to_q", "to_k", "to_v"]
                        .iter()
                        .map(|p| format!("{base}.attention.{p}.weight"))
                        .collect();
                    let mut rows = 0;
                    for p in &parts {
                        let i = weights.tensors().get(p).ok_or_else(|| ModelError::Invalid(format!(
                            "{}: `{p}` is missing, cannot write the fused `{base}.attention.qkv.weight`",
                            weights.files().first().map(|f| f.display().to_string()).unwrap_or_default()
                        )))?;
                        rows += i.shape[0];
                    }
                    (
                        layout::comfy_name(name),
                        parts,
                        vec![rows, info.shape[1]],
                    )
                } else {
                    (layout::comfy_name(name), vec![name.clone()], info.shape.clone())
                }
            }
            Role::TextEncoder => match layout::llama_cpp_name(name) {
                Some(n) => (n, vec![name.clone()], info.shape.clone()),
                // lm_head and the like: llama.cpp's qwen3 ties the output to the embedding.
                None => continue,
            },
            Role::Vae => {
                return Err(ModelError::Invalid(
                    "the VAE stays as it is (it is small); quantize the transformer or the text encoder".into(),
                ))
            }
        };
        let ty = type_for(&stored, &dims, target, role);
        out.push(Planned {
            name: stored,
            dims,
            ty,
            sources,
        });
    }
    if role == Role::Transformer {
        // The original model's final RMSNorm: ComfyUI's model class has it, Z-Image never uses
        // it (diffusers drops it); real single files carry it, so ours do too.
        let dim = weights
            .tensors()
            .get("cap_pad_token")
            .and_then(|t| t.shape.last().copied());
        if let Some(dim) = dim {
            out.push(Planned {
                name: "norm_final.weight".into(),
                dims: vec![dim],
                ty: GgmlDType::F32,
                sources: vec![],
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Metadata of the output file.
pub fn metadata(
    role: Role,
    target: Target,
    te: Option<&candle_transformers::models::z_image::text_encoder::TextEncoderConfig>,
    source: &str,
) -> Vec<(String, Value)> {
    let s = |v: &str| Value::String(v.to_string());
    let mut m = vec![
        (
            "general.architecture".to_string(),
            s(match role {
                Role::TextEncoder => "qwen3",
                _ => "lumina2",
            }),
        ),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.file_type".into(), Value::U32(target.file_type())),
        ("general.name".into(), s(source)),
        (
            "general.quantized_by".into(),
            s(concat!("zturbo ", env!("CARGO_PKG_VERSION"))),
        ),
    ];
    if let (Role::TextEncoder, Some(c)) = (role, te) {
        let u = |v: usize| Value::U32(v as u32);
        m.extend([
            ("qwen3.context_length".into(), u(c.max_position_embeddings)),
            ("qwen3.embedding_length".into(), u(c.hidden_size)),
            ("qwen3.block_count".into(), u(c.num_hidden_layers)),
            ("qwen3.feed_forward_length".into(), u(c.intermediate_size)),
            (
                "qwen3.attention.head_count".into(),
                u(c.num_attention_heads),
            ),
            (
                "qwen3.attention.head_count_kv".into(),
                u(c.num_key_value_heads),
            ),
            ("qwen3.attention.key_length".into(), u(c.head_dim)),
            ("qwen3.attention.value_length".into(), u(c.head_dim)),
            (
                "qwen3.rope.freq_base".into(),
                Value::F32(c.rope_theta as f32),
            ),
            (
                "qwen3.attention.layer_norm_rms_epsilon".into(),
                Value::F32(c.rms_norm_eps as f32),
            ),
        ]);
    }
    m
}

/// Writes the planned tensors of `weights` to `output` (through `output.part`, renamed when
/// complete). `progress(done, total)` is called with bytes of output.
pub fn write(
    weights: &Weights,
    planned: &[Planned],
    metadata: &[(String, Value)],
    output: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::Io {
        path: output.to_path_buf(),
        source: e,
    };
    let part = output.with_extension("gguf.part");
    let total: u64 = planned.iter().map(|p| p.bytes() as u64).sum();
    let header: Vec<(String, Vec<usize>, GgmlDType, usize)> = planned
        .iter()
        .map(|p| (p.name.clone(), p.dims.clone(), p.ty, p.bytes()))
        .collect();
    let result = (|| -> Result<(), ModelError> {
        let file = std::fs::File::create(&part).map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
        let mut done = 0u64;
        let mut failure: Option<ModelError> = None;
        let written = gguf::write(&mut w, metadata, &header, |i| {
            let p = &planned[i];
            let data = encode(weights, p).map_err(|e| {
                let msg = format!("tensor `{}`: {e}", p.name);
                failure = Some(ModelError::Invalid(msg.clone()));
                std::io::Error::other(msg)
            })?;
            done += data.len() as u64;
            progress(done, total);
            Ok(data)
        });
        if let Some(f) = failure {
            return Err(f);
        }
        written.map_err(io)?;
        w.flush().map_err(io)?;
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&part, output).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// The bytes of one output tensor: its sources' rows, in f32, then blocks.
fn encode(weights: &Weights, p: &Planned) -> candle_core::Result<Vec<u8>> {
    let values = load_planned(weights, p)?;
    match p.ty {
        GgmlDType::F32 => Ok(values
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()),
        t => {
            let q = quantize_rows(&values, t)?;
            let data = q.data()?.into_owned();
            if data.len() != p.bytes() {
                candle_core::bail!(
                    "{} blocks came out at {} bytes, {} expected",
                    ggml_name(t),
                    data.len(),
                    p.bytes()
                )
            }
            Ok(data)
        }
    }
}

/// `x` as a float8_e4m3fn code, rounded to nearest (ties to even) and saturated at ±448, as
/// torch's cast does for values in range.
pub fn e4m3fn(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7f;
    }
    if a < 2f32.powi(-6) {
        // Subnormals: multiples of 2^-9 (a code of 8 is the smallest normal, 0x08).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let man = bits & 0x7f_ffff;
    let mut m = (man + 0x7_ffff + ((man >> 20) & 1)) >> 20;
    if m == 8 {
        m = 0;
        e += 1;
    }
    let biased = e + 7;
    if biased > 15 || (biased == 15 && m == 7) {
        return sign | 0x7e;
    }
    sign | ((biased as u8) << 3) | m as u8
}

/// One tensor of a safetensors file being written: name, dtype string, shape, byte size.
type StEntry = (String, &'static str, Vec<usize>, usize);

/// `zturbo quantize --to fp8`: ComfyUI's "scaled fp8" safetensors — every matrix that GGUF would
/// quantize as float8_e4m3fn with a per-tensor `scale_weight` (max|w| / 448) and the `scaled_fp8`
/// marker; everything else bf16. ComfyUI names for the DiT, transformers names for Qwen3. One
/// tensor at a time, through `.part`.
pub fn write_fp8(
    weights: &Weights,
    role: Role,
    output: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ModelError> {
    let planned = plan(weights, role, Target::Q8_0)?;
    let mut entries: Vec<(StEntry, Option<usize>)> = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        let n: usize = p.dims.iter().product();
        let name = match role {
            Role::TextEncoder => p.sources.first().cloned().unwrap_or_else(|| p.name.clone()),
            _ => p.name.clone(),
        };
        let embedding = name.ends_with("embed_tokens.weight");
        if p.ty != GgmlDType::F32 && !embedding {
            entries.push(((name.clone(), "F8_E4M3", p.dims.clone(), n), Some(i)));
            let base = name.strip_suffix(".weight").unwrap_or(&name);
            entries.push(((format!("{base}.scale_weight"), "F32", vec![1], 4), Some(i)));
        } else {
            entries.push(((name, "BF16", p.dims.clone(), n * 2), Some(i)));
        }
    }
    if role == Role::Transformer {
        entries.push((("scaled_fp8".into(), "F8_E4M3", vec![0], 0), None));
    }
    let io = |e: std::io::Error| ModelError::Io {
        path: output.to_path_buf(),
        source: e,
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for ((name, dtype, shape, size), _) in &entries {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}),
        );
        offset += size;
    }
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "quantized_by": concat!("zturbo ", env!("CARGO_PKG_VERSION"))}),
    );
    let mut h = serde_json::to_vec(&header).map_err(|e| io(e.into()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let total = offset as u64;
    let part = output.with_extension("safetensors.part");
    let result = (|| -> Result<(), ModelError> {
        let file = std::fs::File::create(&part).map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&h).map_err(io)?;
        let mut done = 0u64;
        let mut i = 0;
        while i < entries.len() {
            let ((name, dtype, _, size), source) = &entries[i];
            let Some(pi) = source else {
                i += 1;
                continue;
            };
            let p = &planned[*pi];
            let values = load_planned(weights, p).map_err(|e| weights.context(e))?;
            let v = values
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| weights.context(e))?;
            if *dtype == "F8_E4M3" {
                let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = if max > 0.0 { max / 448.0 } else { 1.0 };
                let codes: Vec<u8> = {
                    use rayon::prelude::*;
                    v.par_iter().map(|x| e4m3fn(x / scale)).collect()
                };
                w.write_all(&codes).map_err(io)?;
                w.write_all(&scale.to_le_bytes()).map_err(io)?;
                done += (codes.len() + 4) as u64;
                i += 2;
            } else {
                let bytes: Vec<u8> = v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect();
                if bytes.len() != *size {
                    return Err(ModelError::Invalid(format!(
                        "tensor `{name}`: size mismatch"
                    )));
                }
                w.write_all(&bytes).map_err(io)?;
                done += bytes.len() as u64;
                i += 1;
            }
            progress(done, total);
        }
        w.flush().map_err(io)?;
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&part, output).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// A planned tensor's values in f32 (its sources' rows concatenated).
fn load_planned(weights: &Weights, p: &Planned) -> candle_core::Result<Tensor> {
    let dev = Device::Cpu;
    if p.sources.is_empty() {
        return Tensor::ones(p.dims.as_slice(), DType::F32, &dev);
    }
    let mut parts = p
        .sources
        .iter()
        .map(|s| weights.load(s, DType::F32, &dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let t = if parts.len() == 1 {
        parts.remove(0)
    } else {
        Tensor::cat(&parts, 0)?
    };
    t.reshape(p.dims.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::quantized::Fp8Format;

    #[test]
    fn e4m3fn_encoding_inverts_the_decoding() {
        // Every finite code decodes to a value that encodes back to it (±0 included).
        for c in 0u8..=255 {
            if c & 0x7f == 0x7f {
                continue;
            }
            let v = Fp8Format::E4M3Fn.decode(c);
            assert_eq!(e4m3fn(v), c, "{c:#x} = {v}");
        }
        // Nearest, ties to even: 1 + 1/16 lies between 1 (0x38) and 1.125 (0x39).
        assert_eq!(e4m3fn(1.0625), 0x38);
        assert_eq!(e4m3fn(1.07), 0x39);
        // Codes from torch 2.15: `torch.tensor([x]).to(torch.float8_e4m3fn).view(torch.uint8)`.
        assert_eq!(e4m3fn(1000.0), 0x7e);
        assert_eq!(e4m3fn(-0.001), 0x81);
        assert_eq!(e4m3fn(-0.0009), 0x80);
    }
}
