//! The CLIP text side of Stable Diffusion: the tokenizer (built from the slow-tokenizer files
//! `vocab.json` + `merges.txt`, or a `tokenizer.json`) and transformers' `CLIPTextModel` /
//! `CLIPTextModelWithProjection` (causal self-attention, exact GELU or quick-GELU per config,
//! final layer norm, pooled EOS feature, optional text projection).
//!
//! candle's CLIP has private config fields and only quick-GELU, while SD 2.x's OpenCLIP text tower
//! uses exact GELU — hence this module.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use crate::families::lora::HasLins;
use crate::ops::linear::Lin;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::families::weights::ModelDir;
use crate::families::ModelError;

/// `text_encoder/config.json` (transformers `CLIPTextConfig`; unknown fields ignored, defaults as
/// in transformers).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// The legacy value 2 selects the pooled row by `argmax(input_ids)` (the highest id is the
    /// end-of-text token in every CLIP vocabulary); any other value by the first occurrence.
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_inter() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> u32 {
    49407
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Gelu,
    QuickGelu,
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err("num_hidden_layers must be positive".into());
        }
        self.activation().map(|_| ())
    }

    fn activation(&self) -> Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "quick_gelu" => Ok(Activation::QuickGelu),
            other => Err(format!(
                "hidden_act `{other}` is not supported (gelu, quick_gelu)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Lin,
    k: Lin,
    v: Lin,
    out: Lin,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q: linear(h, h, true, vb.pp("q_proj"))?,
            k: linear(h, h, true, vb.pp("k_proj"))?,
            v: linear(h, h, true, vb.pp("v_proj"))?,
            out: linear(h, h, true, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, causal: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        // Scores and softmax in f32 whatever the weights' dtype (transformers' eager path
        // softmaxes in f32 too).
        let scores = (q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
            * scale)?
            .broadcast_add(causal)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let o = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, c))?;
        self.out.forward(&o)
    }
}

/// A linear layer in the encoder's own dtype, as [`Lin`] (f32 products on the CPU go through
/// MKL's sgemm in MKL builds), named by its canonical module path (`text_model.encoder.layers.N.…`,
/// whether or not the file spells the `text_model.` prefix) so text-encoder LoRAs find it.
fn linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Lin> {
    let w = vb.get((o, i), "weight")?;
    let b = bias.then(|| vb.get(o, "bias")).transpose()?;
    let mut lin = Lin::from_parts(w, b, vb.dtype())?;
    let name = vb.prefix();
    lin.set_name(if name.starts_with("text_model.") {
        name
    } else {
        format!("text_model.{name}")
    });
    Ok(lin)
}

#[derive(Debug, Clone)]
struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Lin,
    fc2: Lin,
    act: Activation,
}

impl Layer {
    fn new(cfg: &ClipTextConfig, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            ln1: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            ln2: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(h, cfg.intermediate_size, true, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, h, true, vb.pp("mlp.fc2"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, causal: &Tensor) -> candle_core::Result<Tensor> {
        let h = (x + self.attn.forward(&self.ln1.forward(x)?, causal)?)?;
        let m = self.fc1.forward(&self.ln2.forward(&h)?)?;
        let m = match self.act {
            Activation::Gelu => m.gelu_erf()?,
            Activation::QuickGelu => (&m * candle_nn::ops::sigmoid(&(&m * 1.702)?)?)?,
        };
        h + self.fc2.forward(&m)?
    }
}

/// What one text-encoder call returns (all f32).
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `last_hidden_state` (final layer norm applied): `[B, L, hidden]`.
    pub last_hidden: Tensor,
    /// `hidden_states[-2]`: the output of the second-to-last layer, no final norm (SDXL).
    pub penultimate: Tensor,
    /// `pooler_output` (the EOS row of `last_hidden`), projected by `text_projection` when the
    /// model has one (`CLIPTextModelWithProjection.text_embeds`): `[B, D]`.
    pub pooled: Tensor,
}

/// transformers' `CLIPTextModel` (and `…WithProjection` when `text_projection.weight` exists).
impl HasLins for ClipTextModel {
    fn lins_mut(&mut self) -> Vec<&mut Lin> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                let a = &mut l.attn;
                [
                    &mut a.q, &mut a.k, &mut a.v, &mut a.out, &mut l.fc1, &mut l.fc2,
                ]
            })
            .collect()
    }
    fn lins(&self) -> Vec<&Lin> {
        self.layers
            .iter()
            .flat_map(|l| {
                let a = &l.attn;
                [&a.q, &a.k, &a.v, &a.out, &l.fc1, &l.fc2]
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    projection: Option<Lin>,
    eos_token_id: u32,
    dtype: DType,
}

impl ClipTextModel {
    /// `vb` is rooted at the weight file; keys may carry the `text_model.` prefix (transformers
    /// 4 files, as on the hub) or not (transformers 5 saves `CLIPTextModel` without it).
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let act = cfg.activation().map_err(candle_core::Error::msg)?;
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let h = cfg.hidden_size;
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, h, tm.pp("embeddings.token_embedding"))?;
        let position_embedding = tm.get(
            (cfg.max_position_embeddings, h),
            "embeddings.position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, act, tm.pp("encoder.layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_norm = candle_nn::layer_norm(h, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?;
        let projection = match cfg.projection_dim {
            Some(p) if vb.contains_tensor("text_projection.weight") => {
                Some(linear(h, p, false, vb.pp("text_projection"))?)
            }
            _ => None,
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            projection,
            eos_token_id: cfg.eos_token_id,
            dtype: vb.dtype(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn has_projection(&self) -> bool {
        self.projection.is_some()
    }

    /// Encodes `[B, L]` token ids (u32) with the causal mask only — the SD pipelines pass no
    /// padding mask, so pad positions are encoded like any other token.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<ClipOutput> {
        let (b, l) = ids.dims2()?;
        let dev = ids.device();
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let mut x = self.token_embedding.forward(ids)?.broadcast_add(&pos)?;
        let causal = causal_mask(l, dev)?;
        let mut penultimate = None;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &causal)?;
            if i + 2 == n {
                penultimate = Some(x.clone());
            }
        }
        // A one-layer model's hidden_states[-2] is the embedding output; nobody ships one.
        let penultimate = match penultimate {
            Some(p) => p,
            None => x.clone(),
        };
        let last = self.final_norm.forward(&x)?;
        let ids_host: Vec<Vec<u32>> = ids.to_vec2()?;
        let rows: Vec<u32> = ids_host
            .iter()
            .map(|row| self.eos_position(row) as u32)
            .collect();
        let pooled = (0..b)
            .map(|i| last.get(i)?.get(rows[i] as usize)?.unsqueeze(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut pooled = Tensor::cat(&pooled, 0)?;
        if let Some(p) = &self.projection {
            pooled = p.forward(&pooled)?;
        }
        Ok(ClipOutput {
            last_hidden: last.to_dtype(DType::F32)?,
            penultimate: penultimate.to_dtype(DType::F32)?,
            pooled: pooled.to_dtype(DType::F32)?,
        })
    }

    /// The pooled row: transformers' legacy rule for `eos_token_id == 2` is the first maximum of
    /// the ids (torch `argmax`), otherwise the first occurrence of `eos_token_id`.
    fn eos_position(&self, row: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best
        } else {
            row.iter()
                .position(|&v| v == self.eos_token_id)
                .unwrap_or(0)
        }
    }
}

/// `[L, L]` additive mask: 0 on and below the diagonal, −inf above.
fn causal_mask(l: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (l, l), dev)
}

/// A CLIP tokenizer with the pipeline's fixed-length behaviour: `<|startoftext|>` + tokens +
/// `<|endoftext|>`, truncated to `model_max_length` and right-padded with the pad token.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default)]
    model_max_length: Option<f64>,
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    bos_token: Option<TokenSpec>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
    #[serde(default)]
    do_lower_case: Option<bool>,
}

#[derive(Deserialize, Default)]
struct SpecialTokensMap {
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    bos_token: Option<TokenSpec>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
}

/// A special token is written either as a string or as an `AddedToken` object.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Object { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) => s,
            TokenSpec::Object { content } => content,
        }
    }
}

/// CLIP's pre-tokenisation pattern (openai `simple_tokenizer.py`, transformers `CLIPTokenizer`).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The pipelines' `tokenizer.model_max_length` for every CLIP text encoder.
const DEFAULT_MAX_LENGTH: usize = 77;

impl ClipTokenizer {
    /// Loads `folder/` (e.g. `tokenizer`): `tokenizer.json` when present, else the slow-tokenizer
    /// files, with special tokens from `special_tokens_map.json` / `tokenizer_config.json`.
    pub fn load(dir: &ModelDir, folder: &str) -> Result<Self, ModelError> {
        let cfg_rel = format!("{folder}/tokenizer_config.json");
        let cfg: TokenizerConfig = if dir.exists(&cfg_rel) {
            dir.read_json(&cfg_rel)?
        } else {
            TokenizerConfig::default()
        };
        let map_rel = format!("{folder}/special_tokens_map.json");
        let map: SpecialTokensMap = if dir.exists(&map_rel) {
            dir.read_json(&map_rel)?
        } else {
            SpecialTokensMap::default()
        };
        let pick = |a: &Option<TokenSpec>, b: &Option<TokenSpec>, default: &str| -> String {
            a.as_ref()
                .or(b.as_ref())
                .map(|t| t.content().to_string())
                .unwrap_or_else(|| default.to_string())
        };
        let bos = pick(&map.bos_token, &cfg.bos_token, "<|startoftext|>");
        let eos = pick(&map.eos_token, &cfg.eos_token, "<|endoftext|>");
        let unk = pick(&map.unk_token, &cfg.unk_token, "<|endoftext|>");
        // SD 1.x pads with <|endoftext|>, SD 2.x / OpenCLIP with "!" (id 0).
        let pad = pick(&map.pad_token, &cfg.pad_token, &eos);
        // `model_max_length` is a huge sentinel (1e30) in some files: cap at CLIP's 77.
        let max_length = cfg
            .model_max_length
            .filter(|m| *m >= 2.0 && *m <= 4096.0)
            .map(|m| m as usize)
            .unwrap_or(DEFAULT_MAX_LENGTH);
        let lower = cfg.do_lower_case.unwrap_or(true);

        let json_rel = format!("{folder}/tokenizer.json");
        let mut tokenizer = if dir.exists(&json_rel) {
            let text = dir.read_string(&json_rel)?;
            Tokenizer::from_bytes(text.as_bytes()).map_err(|e| ModelError::Malformed {
                path: dir.display_path(&json_rel),
                message: format!("not a tokenizers JSON file: {e}"),
            })?
        } else {
            let vocab_rel = format!("{folder}/vocab.json");
            let vocab: BTreeMap<String, u32> = dir.read_json(&vocab_rel)?;
            let merges_rel = format!("{folder}/merges.txt");
            let merges = parse_merges(&dir.read_string(&merges_rel)?);
            let spec = slow_to_fast(&vocab, &merges, &bos, &eos, &unk, &pad, lower).map_err(
                |message| ModelError::Malformed {
                    path: dir.display_path(&vocab_rel),
                    message,
                },
            )?;
            Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| {
                ModelError::Malformed {
                    path: dir.display_path(&vocab_rel),
                    message: format!(
                        "cannot build a CLIP tokenizer from vocab.json/merges.txt: {e}"
                    ),
                }
            })?
        };
        let pad_id = tokenizer
            .token_to_id(&pad)
            .ok_or_else(|| ModelError::Malformed {
                path: dir.display_path(folder),
                message: format!("pad token `{pad}` is not in the vocabulary"),
            })?;
        // The pipeline's call: padding="max_length", truncation=True, max_length=77.
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Invalid(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(max_length),
            pad_id,
            pad_token: pad,
            ..Default::default()
        }));
        Ok(Self {
            tokenizer,
            max_length,
            pad_id,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The `max_length` ids the pipeline feeds the text encoder.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Invalid(format!("tokenizer failed: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// Token strings, for messages and tests.
    pub fn tokens(&self, text: &str) -> Result<Vec<String>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Invalid(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_tokens().to_vec())
    }
}

/// `merges.txt`: one `left right` pair per line after the `#version` header.
fn parse_merges(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .filter_map(|l| {
            let mut parts = l.split(' ');
            match (parts.next(), parts.next()) {
                (Some(a), Some(b)) => Some((a.to_string(), b.to_string())),
                _ => None,
            }
        })
        .collect()
}

/// The `tokenizers` pipeline equivalent to transformers' slow `CLIPTokenizer` (what its fast
/// converter builds): NFC + whitespace collapse (+ lowercase), CLIP's split pattern, byte-level
/// alphabet, BPE with `</w>` word ends, `<|startoftext|> … <|endoftext|>` around the ids. The
/// special tokens (bos, eos, pad) are added tokens, so a literal "!" in the text is the pad token
/// (id 0 in SD 2.x's vocabulary), exactly as in the reference.
fn slow_to_fast(
    vocab: &BTreeMap<String, u32>,
    merges: &[(String, String)],
    bos: &str,
    eos: &str,
    unk: &str,
    pad: &str,
    lower: bool,
) -> Result<serde_json::Value, String> {
    let id = |t: &str| -> Result<u32, String> {
        vocab
            .get(t)
            .copied()
            .ok_or_else(|| format!("special token `{t}` is not in vocab.json"))
    };
    let (bos_id, eos_id, pad_id) = (id(bos)?, id(eos)?, id(pad)?);
    let mut specials = vec![(pad_id, pad), (bos_id, bos), (eos_id, eos)];
    specials.sort();
    specials.dedup();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|(i, t)| {
            serde_json::json!({
                "id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    let mut normalizers = vec![
        serde_json::json!({"type": "NFC"}),
        serde_json::json!({"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}),
    ];
    if lower {
        normalizers.push(serde_json::json!({"type": "Lowercase"}));
    }
    let merges: Vec<[&str; 2]> = merges
        .iter()
        .map(|(a, b)| [a.as_str(), b.as_str()])
        .collect();
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {
            "type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
            "trim_offsets": false, "add_prefix_space": false
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_skip_the_header() {
        let m = parse_merges("#version: 0.2\nt h\nth e</w>\n\n");
        assert_eq!(
            m,
            vec![("t".into(), "h".into()), ("th".into(), "e</w>".into())]
        );
    }

    #[test]
    fn causal_mask_blocks_the_future() {
        let m: Vec<Vec<f32>> = causal_mask(3, &Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(m[0][0], 0.0);
        assert!(m[0][1].is_infinite() && m[1][2].is_infinite());
        assert_eq!(m[2][1], 0.0);
    }
}
