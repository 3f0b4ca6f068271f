//! Z-Image's single-stream DiT (diffusers `ZImageTransformer2DModel`), composed here rather than
//! taken whole from candle-transformers: candle's forward pads differently (wrong whenever caption
//! or image lengths are not multiples of 32), and the precision policy (f16 compute, bf16 residual
//! stream) and block streaming need the block loop in our hands.

use candle_core::{DType, Device, Tensor, D};

use super::blocks::{BlockGroup, BlockSource};
use super::config::DitConfig;
use super::controlnet::ControlRun;
use crate::families::lora::HasLins;
use crate::families::weights::Loader;
use crate::ops::act;
use crate::ops::attention::{
    self, Attention as Sdpa, Spans, LOW_MEMORY_SCORE_CHUNK_ELEMS, SCORE_CHUNK_ELEMS,
};
use crate::ops::linear::{self, Lin};
use crate::ops::rms_norm::{qk_norm_rope, rms_norm, rms_norm_gate_add, rms_norm_scale};
use crate::profile;

/// Every per-item sequence (image tokens, caption tokens) is padded to a multiple of this.
pub const SEQ_MULTI_OF: usize = 32;
const FREQUENCY_EMBEDDING_SIZE: usize = 256;
const T_EMBED_MID: usize = 1024;
const MAX_PERIOD: f64 = 10_000.0;
/// diffusers builds the per-head q/k RMSNorm with this eps regardless of `norm_eps`.
const QK_NORM_EPS: f64 = 1e-5;
const FINAL_NORM_EPS: f64 = 1e-6;

/// Dtypes the DiT runs in: weights/matmuls in `compute`, the block-to-block hidden state in
/// `residual`. Adds into the residual stream happen in `residual`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DitPrecision {
    pub compute: DType,
    pub residual: DType,
}

impl DitPrecision {
    /// The precision of a DiT whose weights are loaded as `weights`: activations in the weights'
    /// dtype, except bf16 weights on a bf16-ready CPU, which run f32 activations and residual
    /// ([`linear::activation_dtype`]).
    pub fn for_weights(weights: DType, residual: DType, device: &Device) -> Self {
        let compute = linear::activation_dtype(weights, device);
        Self {
            compute,
            residual: if compute == DType::F32 {
                DType::F32
            } else {
                residual
            },
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    to_q: Lin,
    to_k: Lin,
    to_v: Lin,
    to_out: Lin,
    norm_q: Option<Tensor>,
    norm_k: Option<Tensor>,
    n_heads: usize,
    head_dim: usize,
    /// Scores and values multiply through bf16 operands (bf16 weights, f32 activations on a
    /// bf16-ready CPU), like the projections.
    bf16_products: bool,
}

impl Attention {
    fn new(cfg: &DitConfig, vb: Loader) -> candle_core::Result<Self> {
        let (dim, hd) = (cfg.dim, cfg.head_dim());
        let act = linear::activation_dtype(vb.dtype(), vb.device());
        let lin = |name: &str| int8_if_asked(Lin::load(dim, dim, false, vb.pp(name))?, &vb);
        let (norm_q, norm_k) = if cfg.qk_norm {
            (
                Some(vb.get(hd, "norm_q.weight")?.to_dtype(act)?),
                Some(vb.get(hd, "norm_k.weight")?.to_dtype(act)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            to_q: lin("to_q")?,
            to_k: lin("to_k")?,
            to_v: lin("to_v")?,
            to_out: int8_if_asked(Lin::load(dim, dim, false, vb.pp("to_out").pp("0"))?, &vb)?,
            norm_q,
            norm_k,
            n_heads: cfg.n_heads,
            head_dim: hd,
            bf16_products: act != vb.dtype(),
        })
    }

    /// `x`: `[B, L, dim]`; `rope`: cos/sin `[B, L, head_dim/2]` f32; `bias`: additive mask
    /// `[B, 1, 1, L]` when some items are shorter than others.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        bias: Option<&Tensor>,
        max_scores: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let dev = x.device();
        let heads = |t: Tensor| t.reshape((b, l, self.n_heads, self.head_dim));
        let (q, k, v) = profile::span("dit.attn.qkv", dev, || {
            Ok((
                heads(x.apply(&self.to_q)?)?,
                heads(x.apply(&self.to_k)?)?,
                heads(x.apply(&self.to_v)?)?,
            ))
        })?;
        let (q, k, v) = profile::span("dit.attn.qk_norm_rope", dev, || {
            // Per-head norm, rotary embedding in f32 on interleaved pairs (as diffusers' complex
            // multiply), and q's softmax scale (saves a pass over the L×L scores): one pass each
            // on the CPU.
            let scale = 1.0 / (self.head_dim as f64).sqrt();
            let q = qk_norm_rope(
                &q,
                self.norm_q.as_ref(),
                QK_NORM_EPS,
                &rope.cos,
                &rope.sin,
                scale,
            )?;
            let k = qk_norm_rope(
                &k,
                self.norm_k.as_ref(),
                QK_NORM_EPS,
                &rope.cos,
                &rope.sin,
                1.0,
            )?;
            Ok((q, k, v.transpose(1, 2)?.contiguous()?))
        })?;
        let opts = Sdpa {
            bias,
            max_scores,
            bf16_products: self.bf16_products,
            spans: Some(&ATTENTION_SPANS),
            ..Sdpa::default()
        };
        let out = attention::attention(&q, &k, &v, &opts)?;
        profile::span("dit.attn.out", dev, || {
            out.transpose(1, 2)?
                .reshape((b, l, self.n_heads * self.head_dim))?
                .apply(&self.to_out)
        })
    }
}

/// `lin` with its weight in int8 when the loader asks for it (`--precision int8`): the block's
/// attention and feed-forward projections, where nearly all of the DiT's products are. The
/// modulation, embedders and final layer (a few rows each) stay as loaded.
fn int8_if_asked(mut lin: Lin, vb: &Loader) -> candle_core::Result<Lin> {
    if vb.int8() {
        lin.quantize_int8()?;
    }
    Ok(lin)
}

/// The profiler's names for the attention's stages (README "GPU profile").
const ATTENTION_SPANS: Spans = Spans {
    fused: "dit.attn.fused",
    scores: "dit.attn.scores",
    softmax: "dit.attn.softmax",
    pv: "dit.attn.pv",
    cat: "dit.attn.cat",
};

#[derive(Debug, Clone)]
struct FeedForward {
    w1: Lin,
    w2: Lin,
    w3: Lin,
}

impl FeedForward {
    fn new(cfg: &DitConfig, vb: Loader) -> candle_core::Result<Self> {
        let h = cfg.ffn_hidden();
        Ok(Self {
            w1: int8_if_asked(Lin::load(cfg.dim, h, false, vb.pp("w1"))?, &vb)?,
            w2: int8_if_asked(Lin::load(h, cfg.dim, false, vb.pp("w2"))?, &vb)?,
            w3: int8_if_asked(Lin::load(cfg.dim, h, false, vb.pp("w3"))?, &vb)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        act::silu_mul(&x.apply(&self.w1)?, &x.apply(&self.w3)?)?.apply(&self.w2)
    }
}

/// One transformer block; `modulation` is absent in the context refiner.
#[derive(Debug, Clone)]
pub struct Block {
    attention: Attention,
    feed_forward: FeedForward,
    attention_norm1: Tensor,
    attention_norm2: Tensor,
    ffn_norm1: Tensor,
    ffn_norm2: Tensor,
    modulation: Option<Lin>,
    eps: f64,
}

impl Block {
    pub fn new(cfg: &DitConfig, modulated: bool, vb: Loader) -> candle_core::Result<Self> {
        let dim = cfg.dim;
        let act = linear::activation_dtype(vb.dtype(), vb.device());
        let modulation = if modulated {
            Some(Lin::load(
                cfg.adaln_dim(),
                4 * dim,
                true,
                vb.pp("adaLN_modulation").pp("0"),
            )?)
        } else {
            None
        };
        let norm = |name: &str| vb.get(dim, name)?.to_dtype(act);
        Ok(Self {
            attention: Attention::new(cfg, vb.pp("attention"))?,
            feed_forward: FeedForward::new(cfg, vb.pp("feed_forward"))?,
            attention_norm1: norm("attention_norm1.weight")?,
            attention_norm2: norm("attention_norm2.weight")?,
            ffn_norm1: norm("ffn_norm1.weight")?,
            ffn_norm2: norm("ffn_norm2.weight")?,
            modulation,
            eps: cfg.norm_eps,
        })
    }

    /// `x` in the residual dtype; returns the updated residual stream.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        bias: Option<&Tensor>,
        adaln: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.forward_with(x, rope, bias, adaln, &Execution::default())
    }

    /// [`Block::forward`] with an explicit execution strategy (attention chunk size). Each
    /// sub-result is dropped as soon as the next exists, so only one stage's temporaries live.
    pub fn forward_with(
        &self,
        x: &Tensor,
        rope: &Rope,
        bias: Option<&Tensor>,
        adaln: Option<&Tensor>,
        exec: &Execution,
    ) -> candle_core::Result<Tensor> {
        let residual = x.dtype();
        let dev = x.device();
        let (scale_msa, gate_msa, scale_mlp, gate_mlp) = profile::span("dit.adaln", dev, || {
            Ok(match (&self.modulation, adaln) {
                (Some(m), Some(c)) => {
                    let mods = c.apply(m)?.unsqueeze(1)?; // [B, 1, 4·dim]
                    let chunks = mods.chunk(4, D::Minus1)?;
                    (
                        Some((&chunks[0] + 1.0)?),
                        Some(chunks[1].tanh()?),
                        Some((&chunks[2] + 1.0)?),
                        Some(chunks[3].tanh()?),
                    )
                }
                (None, _) => (None, None, None, None),
                (Some(_), None) => candle_core::bail!("modulated block called without adaLN input"),
            })
        })?;
        let norms = |t: &Tensor, w: &Tensor, s: &Option<Tensor>| {
            profile::span("dit.norm_scale", dev, || {
                rms_norm_scale(t, w, s.as_ref(), self.eps)
            })
        };
        // x + rms_norm(a)·w·gate in x's dtype (one pass on the CPU in f32).
        let add = |x: &Tensor, a: Tensor, w: &Tensor, g: &Option<Tensor>| {
            profile::span("dit.norm_gate_add", dev, || {
                rms_norm_gate_add(x, &a, w, g.as_ref(), self.eps)?.to_dtype(residual)
            })
        };
        let x = {
            let h = norms(x, &self.attention_norm1, &scale_msa)?;
            let a = self.attention.forward(&h, rope, bias, exec.max_scores)?;
            drop(h);
            add(x, a, &self.attention_norm2, &gate_msa)?
        };
        let f = {
            let h = norms(&x, &self.ffn_norm1, &scale_mlp)?;
            let f = profile::span("dit.ffn", dev, || self.feed_forward.forward(&h))?;
            drop(h);
            f
        };
        add(&x, f, &self.ffn_norm2, &gate_mlp)
    }
}

/// How a forward trades speed for memory: the resident default runs the whole batch through each
/// block with generous attention chunks; the low-memory plan runs batch items one at a time (the
/// CFG pair no longer doubles the activations) with small attention chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execution {
    /// Batch items per block call (`None`: the whole batch).
    pub micro_batch: Option<usize>,
    /// Most attention scores that exist at once.
    pub max_scores: usize,
}

impl Default for Execution {
    fn default() -> Self {
        Self {
            micro_batch: None,
            max_scores: SCORE_CHUNK_ELEMS,
        }
    }
}

impl Execution {
    /// One batch item at a time, attention scores in chunks of 8 Mi.
    pub const LOW_MEMORY: Execution = Execution {
        micro_batch: Some(1),
        max_scores: LOW_MEMORY_SCORE_CHUNK_ELEMS,
    };
}

/// Runs a block over the batch, in micro-batches when the execution strategy asks for them.
pub(super) fn run_block(
    blk: &Block,
    x: &Tensor,
    rope: &Rope,
    bias: Option<&Tensor>,
    adaln: Option<&Tensor>,
    exec: &Execution,
) -> candle_core::Result<Tensor> {
    let b = x.dim(0)?;
    let micro = exec.micro_batch.unwrap_or(b).max(1);
    if micro >= b {
        return blk.forward_with(x, rope, bias, adaln, exec);
    }
    let mut parts = Vec::with_capacity(b.div_ceil(micro));
    for start in (0..b).step_by(micro) {
        let n = micro.min(b - start);
        let bias = bias.map(|t| t.narrow(0, start, n)).transpose()?;
        let adaln = adaln.map(|t| t.narrow(0, start, n)).transpose()?;
        parts.push(blk.forward_with(
            &x.narrow(0, start, n)?,
            &rope.narrow(start, n)?,
            bias.as_ref(),
            adaln.as_ref(),
            exec,
        )?);
    }
    Tensor::cat(&parts, 0)
}

/// cos/sin of the rotary angles for a batch of sequences, `[B, L, head_dim/2]` f32.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The rows of batch items `start..start + len`.
    fn narrow(&self, start: usize, len: usize) -> candle_core::Result<Rope> {
        Ok(Rope {
            cos: self.cos.narrow(0, start, len)?.contiguous()?,
            sin: self.sin.narrow(0, start, len)?.contiguous()?,
        })
    }
}

/// Per-axis angle tables, computed once: `angle[pos][i] = pos / θ^(2i/d)` (f64, rounded to f32).
#[derive(Debug, Clone)]
pub struct RopeTables {
    axes: Vec<(usize, Vec<f32>, Vec<f32>)>, // (half_dim, cos, sin) flattened [len × half]
}

impl RopeTables {
    pub fn new(cfg: &DitConfig) -> Self {
        let axes = cfg
            .axes_dims
            .iter()
            .zip(&cfg.axes_lens)
            .map(|(&d, &len)| {
                let half = d / 2;
                let freqs: Vec<f64> = (0..half)
                    .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
                    .collect();
                let mut cos = Vec::with_capacity(len * half);
                let mut sin = Vec::with_capacity(len * half);
                for pos in 0..len {
                    for f in &freqs {
                        let angle = (pos as f64 * f) as f32 as f64;
                        cos.push(angle.cos() as f32);
                        sin.push(angle.sin() as f32);
                    }
                }
                (half, cos, sin)
            })
            .collect();
        Self { axes }
    }

    /// Builds cos/sin for `ids` (one `[f, h, w]` triple per token) of each batch item; rows past an
    /// item's length (batch padding) are zeros, as `pad_sequence` leaves them.
    pub fn rope(
        &self,
        ids: &[Vec<[usize; 3]>],
        len: usize,
        dev: &Device,
    ) -> candle_core::Result<Rope> {
        let half: usize = self.axes.iter().map(|a| a.0).sum();
        let b = ids.len();
        let mut cos = vec![0f32; b * len * half];
        let mut sin = vec![0f32; b * len * half];
        for (bi, item) in ids.iter().enumerate() {
            for (ti, pos) in item.iter().enumerate() {
                let mut off = (bi * len + ti) * half;
                for (axis, (h, ct, st)) in self.axes.iter().enumerate() {
                    let p = pos[axis];
                    if (p + 1) * h > ct.len() {
                        candle_core::bail!(
                            "rotary position {p} on axis {axis} exceeds axes_lens (image or prompt too large for this model)"
                        );
                    }
                    cos[off..off + h].copy_from_slice(&ct[p * h..(p + 1) * h]);
                    sin[off..off + h].copy_from_slice(&st[p * h..(p + 1) * h]);
                    off += h;
                }
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (b, len, half), dev)?,
            sin: Tensor::from_vec(sin, (b, len, half), dev)?,
        })
    }
}

/// The parts of the DiT that are not repeated blocks (always resident while denoising).
#[derive(Debug, Clone)]
pub struct DitStem {
    t_mlp1: Lin,
    t_mlp2: Lin,
    cap_norm: Tensor,
    cap_linear: Lin,
    x_embedder: Lin,
    final_linear: Lin,
    final_adaln: Lin,
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    /// The dtype activations run in (the weights' dtype, or f32 for bf16 weights on a bf16-ready
    /// CPU).
    act: DType,
}

impl DitStem {
    pub fn new(cfg: &DitConfig, vb: Loader) -> candle_core::Result<Self> {
        let (p, fp, c, dim) = (cfg.patch(), cfg.f_patch(), cfg.in_channels, cfg.dim);
        let key = format!("{p}-{fp}");
        let act = linear::activation_dtype(vb.dtype(), vb.device());
        let patch_dim = fp * p * p * c;
        Ok(Self {
            t_mlp1: Lin::load(
                FREQUENCY_EMBEDDING_SIZE,
                T_EMBED_MID,
                true,
                vb.pp("t_embedder.mlp.0"),
            )?,
            t_mlp2: Lin::load(
                T_EMBED_MID,
                cfg.adaln_dim(),
                true,
                vb.pp("t_embedder.mlp.2"),
            )?,
            cap_norm: vb
                .get(cfg.cap_feat_dim, "cap_embedder.0.weight")?
                .to_dtype(act)?,
            cap_linear: Lin::load(cfg.cap_feat_dim, dim, true, vb.pp("cap_embedder.1"))?,
            x_embedder: Lin::load(patch_dim, dim, true, vb.pp("all_x_embedder").pp(&key))?,
            final_linear: Lin::load(
                dim,
                patch_dim,
                true,
                vb.pp("all_final_layer").pp(&key).pp("linear"),
            )?,
            final_adaln: Lin::load(
                cfg.adaln_dim(),
                dim,
                true,
                vb.pp("all_final_layer")
                    .pp(&key)
                    .pp("adaLN_modulation")
                    .pp("1"),
            )?,
            x_pad_token: vb.get((1, dim), "x_pad_token")?.to_dtype(act)?,
            cap_pad_token: vb.get((1, dim), "cap_pad_token")?.to_dtype(act)?,
            act,
        })
    }

    /// Sinusoidal timestep embedding (f32, `cat(cos, sin)`) → MLP, in the compute dtype.
    fn t_embed(&self, t: &Tensor, t_scale: f64) -> candle_core::Result<Tensor> {
        let half = FREQUENCY_EMBEDDING_SIZE / 2;
        let dev = t.device();
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(MAX_PERIOD.ln()) * i as f64 / half as f64) as f32)
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), dev)?.exp()?;
        let t = (t.to_dtype(DType::F32)? * t_scale)?.unsqueeze(1)?;
        let args = t.broadcast_mul(&freqs)?;
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
        let dtype = self.act;
        let h = candle_nn::ops::silu(&emb.to_dtype(dtype)?.apply(&self.t_mlp1)?)?;
        h.apply(&self.t_mlp2)
    }
}

/// Holds the DiT's configuration and the pieces every forward needs.
pub struct Dit {
    pub cfg: DitConfig,
    pub stem: DitStem,
    tables: RopeTables,
    precision: DitPrecision,
    exec: Execution,
}

/// Optional per-stage activations, for parity tests against diffusers' forward hooks.
#[derive(Debug, Default)]
pub struct Trace {
    pub stages: Vec<(String, Tensor)>,
}

impl Dit {
    pub fn new(cfg: DitConfig, vb: Loader, precision: DitPrecision) -> candle_core::Result<Self> {
        let stem = DitStem::new(&cfg, vb)?;
        let tables = RopeTables::new(&cfg);
        Ok(Self {
            cfg,
            stem,
            tables,
            precision,
            exec: Execution::default(),
        })
    }

    pub fn set_execution(&mut self, exec: Execution) {
        self.exec = exec;
    }

    pub fn precision(&self) -> DitPrecision {
        self.precision
    }

    /// One denoiser call.
    /// * `x`: `[B, C, h, w]` latents (any float dtype), all items the same size;
    /// * `t`: `[B]` model time in [0, 1] (`(1000 − timestep)/1000`);
    /// * `caps`: per item, caption features `[L_i, cap_feat_dim]`.
    ///
    /// * `control`: a ControlNet's input and scale (diffusers' `ZImageControlNetModel` run beside
    ///   the DiT, its hints added after their layers).
    ///
    /// Returns the raw model output `[B, C, h, w]` in f32 (not yet negated).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        caps: &[&Tensor],
        blocks: &mut dyn BlockSource,
        mut trace: Option<&mut Trace>,
        control: Option<ControlRun<'_>>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let dev = x.device().clone();
        let (b, c, h, w) = x.dims4()?;
        if caps.len() != b {
            candle_core::bail!("{} caption tensors for a batch of {b}", caps.len());
        }
        let p = cfg.patch();
        if h % p != 0 || w % p != 0 {
            candle_core::bail!("latent size {h}×{w} is not a multiple of the patch size {p}");
        }
        let compute = self.precision.compute;
        let residual = self.precision.residual;
        let mut record = |name: &str, t: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.stages.push((name.to_string(), t.clone()));
            }
        };

        let adaln = self.stem.t_embed(t, cfg.t_scale)?; // [B, adaln]
        record("t_embedder", &adaln);

        // Patchify: (C, H/p, p, W/p, p) → tokens (h, w) row-major, features (ph, pw, C).
        let (ht, wt) = (h / p, w / p);
        let n_img = ht * wt;
        let img_pad = (SEQ_MULTI_OF - n_img % SEQ_MULTI_OF) % SEQ_MULTI_OF;
        let n_img_padded = n_img + img_pad;
        let patches = x
            .to_dtype(compute)?
            .reshape((b, c, ht, p, wt, p))?
            .permute((0, 2, 4, 3, 5, 1))?
            .reshape((b, n_img, p * p * c))?;
        let img = patches.apply(&self.stem.x_embedder)?; // [B, n_img, dim]
        record("x_embedder", &img);
        // Image tokens padded to the multiple of 32 with the pad token (diffusers repeats the last
        // row, then overwrites the padding with `x_pad_token`).
        let pad_image = |t: Tensor| -> candle_core::Result<Tensor> {
            if img_pad == 0 {
                return t.to_dtype(residual);
            }
            let pad = self
                .stem
                .x_pad_token
                .unsqueeze(0)?
                .broadcast_as((b, img_pad, cfg.dim))?;
            Tensor::cat(&[&t, &pad.to_dtype(t.dtype())?], 1)?.to_dtype(residual)
        };
        let mut img = pad_image(img)?;
        // The ControlNet's stream: its own patch embedder over the control input, the DiT's pad.
        let mut ctrl = match control {
            Some(run) => Some(pad_image(run.net.embed(run.context, compute)?)?),
            None => None,
        };

        // Caption lengths, padded per item to the multiple of 32.
        let cap_lens: Vec<usize> = caps.iter().map(|c| c.dim(0)).collect::<Result<_, _>>()?;
        let cap_padded: Vec<usize> = cap_lens
            .iter()
            .map(|l| l + (SEQ_MULTI_OF - l % SEQ_MULTI_OF) % SEQ_MULTI_OF)
            .collect();
        let cap_max = cap_padded.iter().copied().max().unwrap_or(0);

        // Rotary positions: image token (f, h, w) sits after its item's padded caption.
        let img_ids: Vec<Vec<[usize; 3]>> = cap_padded
            .iter()
            .map(|&cp| {
                let mut ids = Vec::with_capacity(n_img_padded);
                for hi in 0..ht {
                    for wi in 0..wt {
                        ids.push([cp + 1, hi, wi]);
                    }
                }
                ids.resize(n_img_padded, [0, 0, 0]);
                ids
            })
            .collect();
        let cap_ids: Vec<Vec<[usize; 3]>> = cap_padded
            .iter()
            .map(|&cp| (0..cp).map(|j| [1 + j, 0, 0]).collect())
            .collect();

        let img_rope = self.tables.rope(&img_ids, n_img_padded, &dev)?;
        // 2.0 / 2.1: the control refiner stage over the image tokens gives hints for the noise
        // refiner; the ControlNet runs the DiT's noise refiner on its own copy of the image
        // stream with them added (`img_c`), while the DiT's stream gets none.
        let mut refiner_hints = Vec::new();
        let mut img_c = None;
        if let (Some(run), Some(c)) = (control, ctrl.take()) {
            if run.net.has_plain_refiner() {
                ctrl = Some(c);
            } else {
                let (h, c) = run
                    .net
                    .refiner_hints(c, &img, &img_rope, &adaln, &self.exec, compute)?;
                refiner_hints = h;
                ctrl = Some(c);
                img_c = Some(img.clone());
            }
        }
        for i in 0..cfg.n_refiner_layers {
            match img_c.take() {
                None => {
                    img = blocks.with_block(BlockGroup::NoiseRefiner, i, &mut |blk| {
                        run_block(blk, &img, &img_rope, None, Some(&adaln), &self.exec)
                    })?;
                }
                Some(ic) => {
                    // Both streams through the block while it is here (streamed blocks load once).
                    let both = blocks.with_block(BlockGroup::NoiseRefiner, i, &mut |blk| {
                        let a = run_block(blk, &img, &img_rope, None, Some(&adaln), &self.exec)?;
                        let c = run_block(blk, &ic, &img_rope, None, Some(&adaln), &self.exec)?;
                        Tensor::cat(&[a, c], 0)
                    })?;
                    img = both.narrow(0, 0, b)?;
                    let mut c = both.narrow(0, b, b)?;
                    if let Some(run) = control {
                        if let Some(j) = run.net.cfg.refiner_places.iter().position(|&p| p == i) {
                            c = (c + (&refiner_hints[j] * run.scale)?)?;
                        }
                    }
                    img_c = Some(c);
                }
            }
            record(&format!("noise_refiner.{i}"), &img);
        }
        drop(refiner_hints);
        // 1.0: the plain control noise refiner over the control stream.
        if let (Some(run), Some(c)) = (control, ctrl.take()) {
            ctrl = Some(if run.net.has_plain_refiner() {
                run.net.plain_refine(c, &img_rope, &adaln, &self.exec)?
            } else {
                c
            });
        }
        drop(img_rope);

        // Caption embedding: RMSNorm + Linear per item, pad rows → cap_pad_token, batch-pad → 0.
        let mut cap_rows = Vec::with_capacity(b);
        for (i, cap) in caps.iter().enumerate() {
            let normed = rms_norm(&cap.to_dtype(compute)?, &self.stem.cap_norm, cfg.norm_eps)?;
            let mut e = normed.apply(&self.stem.cap_linear)?; // [L_i, dim]
            if i == 0 {
                record("cap_embedder", &e);
            }
            let pad = cap_padded[i] - cap_lens[i];
            if pad > 0 {
                let tok = self.stem.cap_pad_token.broadcast_as((pad, cfg.dim))?;
                e = Tensor::cat(&[&e, &tok], 0)?;
            }
            if cap_padded[i] < cap_max {
                let z = Tensor::zeros((cap_max - cap_padded[i], cfg.dim), e.dtype(), &dev)?;
                e = Tensor::cat(&[&e, &z], 0)?;
            }
            cap_rows.push(e);
        }
        let mut cap = Tensor::stack(&cap_rows, 0)?.to_dtype(residual)?;
        drop(cap_rows);
        let cap_bias = padding_bias(&cap_padded, cap_max, compute, &dev)?;
        let cap_rope = self.tables.rope(&cap_ids, cap_max, &dev)?;
        for i in 0..cfg.n_refiner_layers {
            cap = blocks.with_block(BlockGroup::ContextRefiner, i, &mut |blk| {
                run_block(blk, &cap, &cap_rope, cap_bias.as_ref(), None, &self.exec)
            })?;
            record(&format!("context_refiner.{i}"), &cap);
        }
        drop(cap_rope);

        // Unified sequence per item: [image tokens, caption tokens], batch-padded at the end.
        let uni_lens: Vec<usize> = cap_padded.iter().map(|cp| n_img_padded + cp).collect();
        let uni_max = n_img_padded + cap_max;
        let mut unified = unify(&img, &cap, &cap_padded, cap_max)?;
        // The ControlNet's unified stream (2.x: its image stream got the refiner hints) and the
        // control stream joined with the same caption tokens.
        let mut ctrl_x = img_c
            .as_ref()
            .map(|t| unify(t, &cap, &cap_padded, cap_max))
            .transpose()?;
        let ctrl_uni = ctrl
            .as_ref()
            .map(|c| unify(c, &cap, &cap_padded, cap_max))
            .transpose()?;
        drop((img, cap, img_c, ctrl));
        let uni_ids: Vec<Vec<[usize; 3]>> = img_ids
            .iter()
            .zip(&cap_ids)
            .map(|(a, c)| a.iter().chain(c.iter()).copied().collect())
            .collect();
        let uni_rope = self.tables.rope(&uni_ids, uni_max, &dev)?;
        let uni_bias = padding_bias(&uni_lens, uni_max, compute, &dev)?;
        // The first control block adds the stream as it enters the layers; the others follow the
        // control stream only, so each runs when its DiT layer is done and its hint is added.
        let mut ctrl_state: Option<(Option<Tensor>, Tensor)> = None;
        if let (Some(run), Some(cu)) = (control, ctrl_uni) {
            let x0 = ctrl_x.take().unwrap_or_else(|| unified.clone());
            let (hint, c) = run.net.layer(
                0,
                &cu,
                Some(&x0),
                &uni_rope,
                uni_bias.as_ref(),
                &adaln,
                &self.exec,
                compute,
            )?;
            ctrl_state = Some((Some(hint), c));
        }
        let mut next_control = 0;
        for i in 0..cfg.n_layers {
            unified = blocks.with_block(BlockGroup::Layers, i, &mut |blk| {
                run_block(
                    blk,
                    &unified,
                    &uni_rope,
                    uni_bias.as_ref(),
                    Some(&adaln),
                    &self.exec,
                )
            })?;
            if let (Some(run), Some((first, c))) = (control, ctrl_state.as_mut()) {
                if run.net.cfg.places.get(next_control) == Some(&i) {
                    let hint = match first.take() {
                        Some(h) => h,
                        None => {
                            let (h, next) = run.net.layer(
                                next_control,
                                c,
                                None,
                                &uni_rope,
                                uni_bias.as_ref(),
                                &adaln,
                                &self.exec,
                                compute,
                            )?;
                            *c = next;
                            h
                        }
                    };
                    unified = (unified + (hint * run.scale)?)?;
                    next_control += 1;
                }
            }
            record(&format!("layers.{i}"), &unified);
        }
        drop(ctrl_state);
        drop(uni_rope);

        // Final layer: LayerNorm (no affine, f32) · (1 + Linear(SiLU(c))) → Linear; image rows only.
        let img_out = unified.narrow(1, 0, n_img)?;
        let scale = (candle_nn::ops::silu(&adaln)?.apply(&self.stem.final_adaln)? + 1.0)?;
        let normed = layer_norm_no_affine(&img_out, FINAL_NORM_EPS)?.to_dtype(compute)?;
        let out = normed
            .broadcast_mul(&scale.unsqueeze(1)?)?
            .apply(&self.stem.final_linear)?;
        record("final_layer", &out);
        // Unpatchify: tokens (h, w), features (ph, pw, C) → [B, C, H, W].
        out.to_dtype(DType::F32)?
            .reshape((b, ht, wt, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, c, h, w))
    }
}

/// `[image tokens, caption tokens]` per item; rows past an item's caption were batch padding in the
/// refiner, and diffusers keeps only the valid rows and pads with zeros again, so do the same.
fn unify(
    img: &Tensor,
    cap: &Tensor,
    cap_padded: &[usize],
    cap_max: usize,
) -> candle_core::Result<Tensor> {
    if cap_padded.iter().all(|&l| l == cap_max) {
        return Tensor::cat(&[img, cap], 1);
    }
    let dim = cap.dim(2)?;
    let rows = (0..img.dim(0)?)
        .map(|i| {
            let mut parts = vec![img.get(i)?, cap.get(i)?.narrow(0, 0, cap_padded[i])?];
            if cap_padded[i] < cap_max {
                parts.push(Tensor::zeros(
                    (cap_max - cap_padded[i], dim),
                    cap.dtype(),
                    cap.device(),
                )?);
            }
            Tensor::cat(&parts, 0)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&rows, 0)
}

/// Additive attention bias masking each item's batch padding, or `None` when nothing is padded.
fn padding_bias(
    lens: &[usize],
    max: usize,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Option<Tensor>> {
    if lens.iter().all(|&l| l == max) {
        return Ok(None);
    }
    let mut v = vec![0f32; lens.len() * max];
    for (i, &l) in lens.iter().enumerate() {
        for x in &mut v[i * max + l..(i + 1) * max] {
            *x = f32::NEG_INFINITY;
        }
    }
    Ok(Some(
        Tensor::from_vec(v, (lens.len(), 1, 1, max), dev)?.to_dtype(dtype)?,
    ))
}

fn layer_norm_no_affine(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}

impl HasLins for Block {
    fn lins_mut(&mut self) -> Vec<&mut Lin> {
        let a = &mut self.attention;
        let f = &mut self.feed_forward;
        let mut v = vec![
            &mut a.to_q,
            &mut a.to_k,
            &mut a.to_v,
            &mut a.to_out,
            &mut f.w1,
            &mut f.w2,
            &mut f.w3,
        ];
        v.extend(self.modulation.as_mut());
        v
    }
    fn lins(&self) -> Vec<&Lin> {
        let a = &self.attention;
        let f = &self.feed_forward;
        let mut v = vec![&a.to_q, &a.to_k, &a.to_v, &a.to_out, &f.w1, &f.w2, &f.w3];
        v.extend(self.modulation.as_ref());
        v
    }
}

impl HasLins for DitStem {
    fn lins_mut(&mut self) -> Vec<&mut Lin> {
        vec![
            &mut self.t_mlp1,
            &mut self.t_mlp2,
            &mut self.cap_linear,
            &mut self.x_embedder,
            &mut self.final_linear,
            &mut self.final_adaln,
        ]
    }
    fn lins(&self) -> Vec<&Lin> {
        vec![
            &self.t_mlp1,
            &self.t_mlp2,
            &self.cap_linear,
            &self.x_embedder,
            &self.final_linear,
            &self.final_adaln,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_attention_equals_one_piece() {
        let d = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 50, 8), &d).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 50, 8), &d).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 50, 8), &d).unwrap();
        let bias = padding_bias(&[50, 37], 50, DType::F32, &d).unwrap();
        let run = |max_scores| {
            let opts = Sdpa {
                bias: bias.as_ref(),
                max_scores,
                ..Sdpa::default()
            };
            attention::attention(&q, &k, &v, &opts).unwrap()
        };
        let whole = run(usize::MAX);
        let chunked = run(2 * 3 * 50 * 7);
        let diff = (whole - chunked).unwrap().abs().unwrap().max_all().unwrap();
        // Chunks change only the matmul blocking: last-bit differences of f32 sums over 50
        // terms of unit size (a few 1e-7; 1e-6 failed on rare random draws).
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
