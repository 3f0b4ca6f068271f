//! Qwen3 as Z-Image uses it: the causal decoder up to `hidden_states[-2]` (the last decoder
//! layer and the final norm are never run, so they are never loaded). Same arithmetic as
//! candle-transformers' `ZImageTextEncoder` (and transformers' `Qwen3Model`), built on our
//! [`Lin`] so its weights may stay quantized (GGUF, fp8) and take low-rank deltas.

use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::z_image::text_encoder::TextEncoderConfig;

use crate::families::weights::Loader;
use crate::ops::linear::{self as cpu_gemm, Lin};
use crate::ops::quantized::{Fp8Matrix, StoredMatrix};

/// The token embedding table, kept as stored: rows are looked up (and dequantized) per prompt.
#[derive(Debug, Clone)]
struct Embedding {
    table: StoredMatrix,
    hidden: usize,
}

impl Embedding {
    fn forward(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let flat = ids.flatten_all()?;
        let rows = match &self.table {
            StoredMatrix::Dense(t) => t.index_select(&flat, 0)?,
            StoredMatrix::Blocks(q) => q.blocks.embedding(&flat)?,
            StoredMatrix::Fp8(f) => Fp8Matrix {
                codes: f.codes.index_select(&flat, 0)?,
                ..f.clone()
            }
            .dequantize(dtype)?,
            StoredMatrix::Int8(_) => self.table.dequantize(DType::F32)?.index_select(&flat, 0)?,
        };
        let mut dims = ids.dims().to_vec();
        dims.push(self.hidden);
        rows.to_dtype(dtype)?.reshape(dims)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    q_proj: Lin,
    k_proj: Lin,
    v_proj: Lin,
    o_proj: Lin,
    q_norm: Tensor,
    k_norm: Tensor,
    input_norm: Tensor,
    post_norm: Tensor,
    gate_proj: Lin,
    up_proj: Lin,
    down_proj: Lin,
}

/// Qwen3 up to its second-to-last layer.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    embed: Embedding,
    layers: Vec<Layer>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    rope_theta: f64,
    /// The dtype activations run in.
    act: DType,
    device: Device,
}

impl TextEncoder {
    /// Builds from transformers' names (`model.embed_tokens`, `model.layers.N.…`).
    pub fn new(cfg: &TextEncoderConfig, ld: Loader) -> candle_core::Result<Self> {
        if cfg.num_hidden_layers < 2 {
            candle_core::bail!("num_hidden_layers must be at least 2 (hidden_states[-2] is used)")
        }
        let act = cpu_gemm::activation_dtype(ld.dtype(), ld.device());
        let m = ld.pp("model");
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if nkv == 0 || nq % nkv != 0 {
            candle_core::bail!(
                "num_attention_heads {nq} is not a multiple of num_key_value_heads {nkv}"
            )
        }
        let embed = Embedding {
            table: m.matrix(cfg.vocab_size, h, "embed_tokens.weight")?,
            hidden: h,
        };
        let norm = |l: &Loader, size: usize, name: &str| l.get(size, name)?.to_dtype(act);
        let bias = cfg.attention_bias;
        // hidden_states[-2] is the output of layer n-2: layer n-1 is never used.
        let layers = (0..cfg.num_hidden_layers - 1)
            .map(|i| {
                let l = m.pp("layers").pp(i);
                let a = l.pp("self_attn");
                let mlp = l.pp("mlp");
                Ok(Layer {
                    q_proj: Lin::load(h, nq * hd, bias, a.pp("q_proj"))?,
                    k_proj: Lin::load(h, nkv * hd, bias, a.pp("k_proj"))?,
                    v_proj: Lin::load(h, nkv * hd, bias, a.pp("v_proj"))?,
                    o_proj: Lin::load(nq * hd, h, bias, a.pp("o_proj"))?,
                    q_norm: norm(&a, hd, "q_norm.weight")?,
                    k_norm: norm(&a, hd, "k_norm.weight")?,
                    input_norm: norm(&l, h, "input_layernorm.weight")?,
                    post_norm: norm(&l, h, "post_attention_layernorm.weight")?,
                    gate_proj: Lin::load(h, cfg.intermediate_size, false, mlp.pp("gate_proj"))?,
                    up_proj: Lin::load(h, cfg.intermediate_size, false, mlp.pp("up_proj"))?,
                    down_proj: Lin::load(cfg.intermediate_size, h, false, mlp.pp("down_proj"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed,
            layers,
            heads: nq,
            kv_heads: nkv,
            head_dim: hd,
            eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta,
            act,
            device: ld.device().clone(),
        })
    }

    /// The linear layers by their transformers names (where runtime deltas attach).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Lin)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &mut l.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut l.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut l.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut l.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut l.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut l.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut l.down_proj));
        }
        out
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, self.eps as f32)
    }

    /// cos/sin `[L, head_dim/2]` for positions 0..L, computed as candle's Qwen3 rotary table is
    /// (f32 inverse frequencies times f32 positions).
    fn rope(&self, len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let dim = self.head_dim;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / self.rope_theta.powf(i as f64 / dim as f64) as f32)
            .collect();
        let half = inv.len();
        let mut freqs = Vec::with_capacity(len * half);
        for p in 0..len {
            for f in &inv {
                freqs.push(p as f32 * f);
            }
        }
        let freqs = Tensor::from_vec(freqs, (len, half), &self.device)?;
        Ok((
            freqs.cos()?.to_dtype(self.act)?,
            freqs.sin()?.to_dtype(self.act)?,
        ))
    }

    /// `hidden_states[-2]` for token ids `[B, L]`: `[B, L, hidden]` in the activation dtype.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let mut x = self.embed.forward(ids, self.act)?;
        let mask = if l > 1 {
            let v: Vec<f32> = (0..l)
                .flat_map(|i| (0..l).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            Some(Tensor::from_vec(v, (1, 1, l, l), &self.device)?.to_dtype(self.act)?)
        } else {
            None
        };
        let (cos, sin) = self.rope(l)?;
        let groups = self.heads / self.kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        for layer in &self.layers {
            let h = self.rms(&x, &layer.input_norm)?;
            let split = |t: Tensor, n: usize| t.reshape((b, l, n, self.head_dim))?.transpose(1, 2);
            let q = split(h.apply(&layer.q_proj)?, self.heads)?;
            let k = split(h.apply(&layer.k_proj)?, self.kv_heads)?;
            let v = split(h.apply(&layer.v_proj)?, self.kv_heads)?;
            let q = self.rms(&q.flatten(0, 2)?, &layer.q_norm)?.reshape((
                b,
                self.heads,
                l,
                self.head_dim,
            ))?;
            let k = self.rms(&k.flatten(0, 2)?, &layer.k_norm)?.reshape((
                b,
                self.kv_heads,
                l,
                self.head_dim,
            ))?;
            let q = candle_nn::rotary_emb::rope(&q.contiguous()?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k.contiguous()?, &cos, &sin)?;
            let repeat = |t: Tensor| -> candle_core::Result<Tensor> {
                if groups == 1 {
                    return Ok(t);
                }
                let (b, n, s, d) = t.dims4()?;
                t.unsqueeze(2)?
                    .broadcast_as((b, n, groups, s, d))?
                    .reshape((b, n * groups, s, d))
            };
            let k = repeat(k)?.contiguous()?;
            let v = repeat(v)?.contiguous()?;
            let mut scores = (q.matmul(&k.transpose(2, 3)?)? * scale)?;
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            drop(scores);
            let ctx =
                probs
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .reshape((b, l, self.heads * self.head_dim))?;
            x = (x + ctx.apply(&layer.o_proj)?)?;
            let h = self.rms(&x, &layer.post_norm)?;
            let gate = h.apply(&layer.gate_proj)?.silu()?;
            let up = h.apply(&layer.up_proj)?;
            x = (x + (gate * up)?.apply(&layer.down_proj)?)?;
        }
        Ok(x)
    }
}

impl Module for TextEncoder {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        TextEncoder::forward(self, ids)
    }
}
