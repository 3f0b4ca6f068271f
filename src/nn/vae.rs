//! The AutoencoderKL decoder shared by every family (Z-Image's 16-channel VAE, SD's 4-channel one):
//! config from `vae/config.json`, diffusers tensor names (new and legacy attention names), and a
//! forward that frees each feature map as soon as the next one exists.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::ops::attention::{self, Attention, QUERY_CHUNK_ROWS};
use crate::ops::conv::Conv;
use crate::ops::group_norm;
use crate::ops::linear::{self, Lin};
use crate::profile::span;
use serde::Deserialize;

const VAE_NORM_EPS: f64 = 1e-6;

/// `vae/config.json` (unknown fields ignored).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct VaeConfig {
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default = "d_in")]
    pub out_channels: usize,
    #[serde(default = "d_latent")]
    pub latent_channels: usize,
    #[serde(default = "d_blocks")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    /// `null` in SD VAEs.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    /// The encoder's `quant_conv` (absent in Z-Image's VAE).
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
    #[serde(default = "d_act")]
    pub act_fn: String,
}

fn d_in() -> usize {
    3
}
fn d_latent() -> usize {
    4
}
fn d_blocks() -> Vec<usize> {
    vec![64]
}
fn d_layers() -> usize {
    1
}
fn d_groups() -> usize {
    32
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}
fn d_act() -> String {
    "silu".into()
}

impl VaeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels must not be empty".into());
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| *c == 0 || c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "every block_out_channels entry must be a positive multiple of norm_num_groups ({})",
                self.norm_num_groups
            ));
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(format!("act_fn `{}` is not supported (silu)", self.act_fn));
        }
        if let Some(types) = &self.up_block_types {
            if let Some(t) = types.iter().find(|t| t.as_str() != "UpDecoderBlock2D") {
                return Err(format!(
                    "up block type `{t}` is not supported (UpDecoderBlock2D)"
                ));
            }
        }
        if self.scaling_factor == 0.0 {
            return Err("scaling_factor must not be 0".into());
        }
        Ok(())
    }

    /// Pixels per latent cell: 2^(number of blocks − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// A posterior sample `z` as the sampler's latents, as the pipelines scale an encoded image:
    /// `(z − shift)·scale` (SD: `scale·z`).
    pub fn latents_from_sample(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = z.to_dtype(DType::F32)?;
        let z = match self.shift_factor {
            Some(s) => (z - s)?,
            None => z,
        };
        z * self.scaling_factor
    }
}

pub(super) fn group_norm(
    groups: usize,
    c: usize,
    vb: VarBuilder,
) -> candle_core::Result<GroupNorm> {
    Ok(GroupNorm {
        weight: vb.get(c, "weight")?,
        bias: vb.get(c, "bias")?,
        groups,
    })
}

/// GroupNorm statistics of every norm layer of one decode, in call order: per layer the mean and
/// variance per group, `[B, G, 1]` (f32).
#[derive(Debug, Clone, Default)]
pub struct GroupNormStats {
    layers: Vec<(Tensor, Tensor)>,
}

impl GroupNormStats {
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

/// Where each GroupNorm takes its statistics from. A tile normalised with its own statistics
/// drifts in tone from its neighbours (the classic tiled-VAE seam); normalising every tile with
/// statistics of the whole image removes that drift.
pub(super) enum NormCtx<'a> {
    Local,
    Record(&'a mut GroupNormStats),
    Fixed {
        stats: &'a GroupNormStats,
        next: usize,
    },
}

impl NormCtx<'_> {
    /// The next norm layer's per-group (mean, variance) `[B, G, 1]`: the recorded ones in `Fixed`,
    /// else `compute`d here (and kept in `Record`).
    fn stats(
        &mut self,
        compute: impl FnOnce() -> candle_core::Result<(Tensor, Tensor)>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            NormCtx::Fixed { stats, next } => {
                let Some((m, v)) = stats.layers.get(*next) else {
                    candle_core::bail!(
                        "group-norm statistics have {} layers, the decoder more",
                        stats.len()
                    )
                };
                *next += 1;
                Ok((m.clone(), v.clone()))
            }
            NormCtx::Record(stats) => {
                let (m, v) = compute()?;
                stats.layers.push((m.clone(), v.clone()));
                Ok((m, v))
            }
            NormCtx::Local => compute(),
        }
    }
}

/// GroupNorm over `[B, C, H, W]` (ops::group_norm), taking its statistics from the [`NormCtx`].
#[derive(Debug, Clone)]
pub(super) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    /// GroupNorm followed by SiLU when `silu`.
    pub(super) fn forward_act(
        &self,
        x: &Tensor,
        ctx: &mut NormCtx<'_>,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        let (w, b, g) = (&self.weight, &self.bias, self.groups);
        if let NormCtx::Local = ctx {
            return group_norm::group_norm(x, w, b, g, VAE_NORM_EPS, silu);
        }
        let (mean, var) = ctx.stats(|| group_norm::group_stats(x, g))?;
        group_norm::group_norm_with(x, &mean, &var, w, b, VAE_NORM_EPS, silu)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    pub(super) fn new(
        cin: usize,
        cout: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: group_norm(groups, cin, vb.pp("norm1"))?,
            conv1: Conv::same(cin, cout, 3, vb.pp("conv1"))?,
            norm2: group_norm(groups, cout, vb.pp("norm2"))?,
            conv2: Conv::same(cout, cout, 3, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(Conv::same(cin, cout, 1, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    pub(super) fn forward(&self, x: &Tensor, ctx: &mut NormCtx<'_>) -> candle_core::Result<Tensor> {
        let dev = x.device();
        let mut h = span("vae.norm_silu", dev, || {
            self.norm1.forward_act(x, ctx, true)
        })?;
        h = span("vae.conv3x3", dev, || self.conv1.forward(&h))?;
        h = span("vae.norm_silu", dev, || {
            self.norm2.forward_act(&h, ctx, true)
        })?;
        h = span("vae.conv3x3", dev, || self.conv2.forward(&h))?;
        span("vae.shortcut_add", dev, || match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        })
    }
}

/// Single-head self-attention over all spatial positions (the mid block).
#[derive(Debug, Clone)]
pub(super) struct SpatialAttention {
    norm: GroupNorm,
    q: Lin,
    k: Lin,
    v: Lin,
    out: Lin,
}

impl SpatialAttention {
    pub(super) fn new(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        // diffusers renamed query/key/value/proj_attn to to_q/to_k/to_v/to_out.0; old files and
        // some conversions still carry the legacy names (sometimes as 1×1 conv weights).
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let act = linear::activation_dtype(vb.dtype(), vb.device());
        let lin = |name: &str| -> candle_core::Result<Lin> {
            let vb = vb.pp(name);
            // Legacy files may store these as 1×1 conv weights, so take whatever shape is there.
            let w = if vb.contains_tensor("weight") {
                vb.get_unchecked("weight")?
            } else {
                vb.get((c, c), "weight")?
            };
            let w = match w.rank() {
                4 => w.squeeze(3)?.squeeze(2)?,
                _ => w,
            };
            if w.dims() != [c, c] {
                candle_core::bail!(
                    "tensor `{}.weight` has shape {:?}, expected [{c}, {c}]",
                    vb.prefix(),
                    w.dims()
                );
            }
            let b = vb.get(c, "bias")?;
            Lin::from_parts(w, Some(b), act)
        };
        Ok(Self {
            norm: group_norm(groups, c, vb.pp("group_norm"))?,
            q: lin(names[0])?,
            k: lin(names[1])?,
            v: lin(names[2])?,
            out: lin(names[3])?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, ctx: &mut NormCtx<'_>) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward_act(x, ctx, false)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let scale = 1.0 / (c as f64).sqrt();
        let q = (t.apply(&self.q)? * scale)?;
        let k = t.apply(&self.k)?;
        let v = t.apply(&self.v)?;
        drop(t);
        let opts = Attention {
            max_rows: QUERY_CHUNK_ROWS,
            bf16_products: self.q.weight_dtype() == DType::BF16,
            ..Attention::default()
        };
        let heads = |t: &Tensor| t.unsqueeze(1); // [B, 1, n, c]: one head
        let o = attention::attention(&heads(&q)?, &heads(&k)?, &heads(&v)?, &opts)?;
        let o = o.squeeze(1)?.apply(&self.out)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + o
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv>,
}

/// The decoder half of AutoencoderKL (plus `post_quant_conv` when the config has it).
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid_resnets: [Resnet; 2],
    mid_attention: Option<SpatialAttention>,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
    dtype: DType,
}

impl VaeDecoder {
    /// `vb` is rooted at the VAE's weight file (keys `decoder.*`, `post_quant_conv.*`).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let groups = cfg.norm_num_groups;
        let boc = &cfg.block_out_channels;
        let top = *boc.last().unwrap_or(&64);
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv::same(
                cfg.latent_channels,
                cfg.latent_channels,
                1,
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        let d = vb.pp("decoder");
        let mid = d.pp("mid_block");
        let mid_resnets = [
            Resnet::new(top, top, groups, mid.pp("resnets.0"))?,
            Resnet::new(top, top, groups, mid.pp("resnets.1"))?,
        ];
        let mid_attention = if cfg.mid_block_add_attention {
            Some(SpatialAttention::new(top, groups, mid.pp("attentions.0"))?)
        } else {
            None
        };
        let reversed: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut prev = reversed[0];
        for (i, &out) in reversed.iter().enumerate() {
            let ub = d.pp("up_blocks").pp(i);
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    Resnet::new(cin, out, groups, ub.pp("resnets").pp(j))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample = if i + 1 < reversed.len() {
                Some(Conv::same(out, out, 3, ub.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: Conv::same(cfg.latent_channels, top, 3, d.pp("conv_in"))?,
            mid_resnets,
            mid_attention,
            up_blocks,
            norm_out: group_norm(groups, boc[0], d.pp("conv_norm_out"))?,
            conv_out: Conv::same(boc[0], cfg.out_channels, 3, d.pp("conv_out"))?,
            // bf16 weights on a bf16-ready CPU run f32 activations (ops::linear).
            dtype: linear::activation_dtype(vb.dtype(), vb.device()),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Decoder input (already unscaled: `latents / scaling + shift`) → pixels in about [-1, 1], f32.
    pub fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.trunk(z)?;
        self.head(&h, &mut NormCtx::Local)
    }

    /// The low-resolution part of the decoder (`post_quant_conv`, `conv_in`, the mid block with its
    /// global attention): cheap at latent resolution, and it must see the whole image to be exact.
    pub fn trunk(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let ctx = &mut NormCtx::Local;
        let mut h = z.to_dtype(self.dtype)?;
        if let Some(pq) = &self.post_quant_conv {
            h = h.apply(pq)?;
        }
        h = self.conv_in.forward(&h)?;
        h = self.mid_resnets[0].forward(&h, ctx)?;
        if let Some(a) = &self.mid_attention {
            let dev = h.device().clone();
            h = span("vae.attention", &dev, || a.forward(&h, ctx))?;
        }
        self.mid_resnets[1].forward(&h, ctx)
    }

    /// Runs the upsampling head on (a downscaled copy of) trunk features and records every
    /// GroupNorm's statistics, for [`VaeDecoder::head_with_stats`].
    pub fn record_head_stats(&self, features: &Tensor) -> candle_core::Result<GroupNormStats> {
        let mut stats = GroupNormStats::default();
        self.head(features, &mut NormCtx::Record(&mut stats))?;
        Ok(stats)
    }

    /// The upsampling head on one tile of trunk features, normalised with whole-image statistics
    /// instead of the tile's own (tiles then agree in tone: no seams).
    pub fn head_with_stats(
        &self,
        features: &Tensor,
        stats: &GroupNormStats,
    ) -> candle_core::Result<Tensor> {
        self.head(features, &mut NormCtx::Fixed { stats, next: 0 })
    }

    fn head(&self, features: &Tensor, ctx: &mut NormCtx<'_>) -> candle_core::Result<Tensor> {
        let mut h = features.clone();
        for block in &self.up_blocks {
            for r in &block.resnets {
                h = r.forward(&h, ctx)?;
            }
            if let Some(up) = &block.upsample {
                let (_, _, hh, ww) = h.dims4()?;
                let dev = h.device().clone();
                h = span("vae.upsample", &dev, || {
                    h.upsample_nearest2d(hh * 2, ww * 2)
                })?;
                h = span("vae.conv3x3", &dev, || up.forward(&h))?;
            }
        }
        let dev = h.device().clone();
        h = span("vae.norm_silu", &dev, || {
            self.norm_out.forward_act(&h, ctx, true)
        })?;
        h = span("vae.conv3x3", &dev, || self.conv_out.forward(&h))?;
        h.to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_group_norm_silu_matches_the_unfused_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, c, h, w, g) = (2, 8, 5, 7, 4);
        let x = (Tensor::randn(0f32, 2.0, (b, c, h, w), &dev)? + 0.5)?;
        let gn = GroupNorm {
            weight: Tensor::randn(1f32, 0.3, c, &dev)?,
            bias: Tensor::randn(0f32, 0.3, c, &dev)?,
            groups: g,
        };
        // Reference: candle-nn's GroupNorm (its own parity with PyTorch's), then SiLU.
        let reference = candle_nn::GroupNorm::new(gn.weight.clone(), gn.bias.clone(), c, g, 1e-6)?;
        for silu in [false, true] {
            let want = reference.forward(&x)?;
            let want = if silu {
                candle_nn::ops::silu(&want)?
            } else {
                want
            };
            let got = gn.forward_act(&x, &mut NormCtx::Local, silu)?;
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "silu {silu}: max |diff| {diff}");
        }
        // Recorded statistics replayed on the same input give the same result.
        let mut stats = GroupNormStats::default();
        let rec = gn.forward_act(&x, &mut NormCtx::Record(&mut stats), true)?;
        let fixed = gn.forward_act(
            &x,
            &mut NormCtx::Fixed {
                stats: &stats,
                next: 0,
            },
            true,
        )?;
        let diff = (rec - fixed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff == 0.0, "record vs fixed: {diff}");
        Ok(())
    }
}
