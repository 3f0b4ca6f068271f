//! diffusers' `UNet2DConditionModel` as SD 2.x (SD-Turbo) and SDXL (SDXL-Turbo) configure it:
//! cross-attention down/up blocks, the cross-attention mid block, linear or 1×1-conv projections,
//! several transformer layers per block, and SDXL's `text_time` additional embedding.
//!
//! Written here rather than taken from candle-transformers because (1) candle's feed-forward uses
//! the tanh approximation of GELU where diffusers' GEGLU uses the exact one, (2) it has no
//! `addition_embed_type` (SDXL's pooled text + size conditioning) and (3) the precision policy
//! needs two dtypes: weights and matmuls in `compute`, the block-to-block hidden state (including
//! the skip connections) in `residual`. Norms read the residual stream in f32, so a bf16 stream
//! with values beyond f16's range never passes through f16 before it is normalised.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::config::{UNetConfig, UNetPlan};
use crate::families::lora::HasLins;
use crate::ops::attention::{self, Attention as Sdpa, Spans};
use crate::ops::conv::Conv as FastConv;
use crate::ops::linear::{self, Lin};
use crate::ops::{act, group_norm};
use crate::profile;

/// Sinusoidal timestep embedding exactly as diffusers' `get_timestep_embedding` computes it in
/// f32: `exp(−ln(10⁴)·i / (half − shift))`, times t, `[sin, cos]` (flipped to `[cos, sin]`).
pub fn timestep_embedding(timesteps: &[f32], dim: usize, flip: bool, shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_log * i as f32) / denom).exp())
        .collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (first, second): (Vec<f32>, Vec<f32>) = if flip {
            (
                args.iter().map(|a| a.cos()).collect(),
                args.iter().map(|a| a.sin()).collect(),
            )
        } else {
            (
                args.iter().map(|a| a.sin()).collect(),
                args.iter().map(|a| a.cos()).collect(),
            )
        };
        out.extend(first);
        out.extend(second);
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// A norm that reads its input in f32 and returns the compute dtype.
#[derive(Debug, Clone)]
struct F32Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    /// `Some(groups)` for GroupNorm over `[B, C, …]`, `None` for LayerNorm over the last dim.
    groups: Option<usize>,
    out: DType,
}

impl F32Norm {
    fn group(groups: usize, c: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(c, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(c, "bias")?.to_dtype(DType::F32)?,
            eps,
            groups: Some(groups),
            out: linear::activation_dtype(vb.dtype(), vb.device()),
        })
    }

    fn layer(c: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(c, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(c, "bias")?.to_dtype(DType::F32)?,
            eps,
            groups: None,
            out: linear::activation_dtype(vb.dtype(), vb.device()),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(x, false)
    }

    /// The norm, then SiLU when `silu` (GroupNorm only: one fused sweep on the CPU).
    fn forward_act(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let name = match (self.groups, silu) {
            (Some(_), false) => "unet.group_norm",
            (Some(_), true) => "unet.group_norm_silu",
            (None, _) => "unet.layer_norm",
        };
        profile::span(name, x.device(), || self.forward_inner(x, silu))
    }

    fn forward_inner(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let y = match self.groups {
            // ops::group_norm: statistics in one sweep (f64 accumulation on the CPU), then scale,
            // shift and the SiLU in a second, where candle_nn's GroupNorm made a pass per
            // elementwise op.
            Some(g) => group_norm::group_norm(&x, &self.weight, &self.bias, g, self.eps, silu)?,
            None => {
                let y = candle_nn::ops::layer_norm(
                    &x.contiguous()?,
                    &self.weight,
                    &self.bias,
                    self.eps as f32,
                )?;
                if silu {
                    candle_nn::ops::silu(&y)?
                } else {
                    y
                }
            }
        };
        y.to_dtype(self.out)
    }
}

/// A convolution with ops::conv's CPU fast paths where they apply (f32, stride 1, same padding:
/// 3×3 as nine in-place matrix products, 1×1 as one) and candle's whole-image `conv2d` elsewhere
/// (the stride-2 downsamplers, other devices).
#[derive(Debug, Clone)]
struct Conv(FastConv);

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        profile::span("unet.conv", x.device(), || self.0.forward(x))
    }
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv(FastConv::new(
        candle_nn::conv2d(cin, cout, k, cfg, vb)?,
        false,
    )))
}

/// What every resnet of one UNet shares.
#[derive(Debug, Clone, Copy)]
struct ResnetOptions {
    temb: usize,
    groups: usize,
    eps: f64,
    /// The output is divided by this (1 everywhere in SD and SDXL).
    out_scale: f64,
}

/// What every transformer of one UNet shares.
#[derive(Debug, Clone, Copy)]
struct TransformerOptions {
    groups: usize,
    /// `use_linear_projection`: Linear projections in/out (SD 2.x, SDXL) instead of 1×1 convs.
    linear_projection: bool,
    /// `upcast_attention`: attention scores computed in f32 whatever the compute dtype.
    upcast_attention: bool,
}

/// diffusers' `ResnetBlock2D` (time embedding added after the first conv, "default" shift).
#[derive(Debug, Clone)]
struct Resnet {
    norm1: F32Norm,
    conv1: Conv,
    time_emb_proj: Lin,
    norm2: F32Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
    out_scale: f64,
}

impl Resnet {
    fn new(cin: usize, cout: usize, o: ResnetOptions, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: F32Norm::group(o.groups, cin, o.eps, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: Lin::new(o.temb, cout, true, vb.pp("time_emb_proj"))?,
            norm2: F32Norm::group(o.groups, cout, o.eps, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(conv(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            out_scale: o.out_scale,
        })
    }

    /// `x` in the residual dtype, `temb_act` = silu(temb) in the compute dtype.
    fn forward(&self, x: &Tensor, temb_act: &Tensor) -> candle_core::Result<Tensor> {
        let residual = x.dtype();
        let dev = x.device();
        let h = self.norm1.forward_act(x, true)?;
        let h = self.conv1.forward(&h)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = profile::span("unet.temb_add", dev, || h.broadcast_add(&t))?;
        let h = self.norm2.forward_act(&h, true)?;
        let h = self.conv2.forward(&h)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(&x.to_dtype(h.dtype())?)?.to_dtype(residual)?,
            None => x.clone(),
        };
        let out = profile::span("unet.residual_add", dev, || skip + h.to_dtype(residual)?)?;
        if self.out_scale == 1.0 {
            Ok(out)
        } else {
            out / self.out_scale
        }
    }
}

/// diffusers' `Attention` with the default processor (no bias on q/k/v).
#[derive(Debug, Clone)]
struct Attention {
    to_q: Lin,
    to_k: Lin,
    to_v: Lin,
    to_out: Lin,
    heads: usize,
    head_dim: usize,
    upcast: bool,
    /// bf16 weights with f32 activations: the fused CPU attention multiplies bf16 operands too.
    bf16_products: bool,
}

impl Attention {
    fn new(
        dim: usize,
        context_dim: usize,
        heads: usize,
        upcast: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let head_dim = dim / heads;
        let inner = head_dim * heads;
        Ok(Self {
            to_q: Lin::new(dim, inner, false, vb.pp("to_q"))?,
            to_k: Lin::new(context_dim, inner, false, vb.pp("to_k"))?,
            to_v: Lin::new(context_dim, inner, false, vb.pp("to_v"))?,
            to_out: Lin::new(inner, dim, true, vb.pp("to_out.0"))?,
            heads,
            head_dim,
            upcast,
            bf16_products: vb.dtype() == DType::BF16,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let ctx = context.unwrap_or(x);
        let s = ctx.dim(1)?;
        // Heads split off as views: the CPU attention reads them in place.
        let split = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)
        };
        let dev = x.device();
        let (q, k, v) = profile::span("unet.attn.qkv", dev, || {
            Ok((
                split(self.to_q.forward(x)?, l)?,
                split(self.to_k.forward(ctx)?, s)?,
                split(self.to_v.forward(ctx)?, s)?,
            ))
        })?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Fused on the CPU in f32 (the UNet's CPU activations), so no [B, H, L, S] score matrix
        // exists (5 × 4096² values = 336 MB per copy in SD-Turbo's first block at 512²); elsewhere
        // scores in the compute dtype (f32 when the config asks to upcast), softmax always in f32.
        // Scaling q before the product instead of the scores after it only moves rounding.
        let opts = Sdpa {
            bf16_products: self.bf16_products,
            upcast: self.upcast,
            f32_softmax: true,
            q_scale: scale,
            spans: Some(&ATTENTION_SPANS),
            ..Sdpa::default()
        };
        let o = attention::attention(&q, &k, &v, &opts)?;
        let o = o
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        profile::span("unet.attn.out", dev, || self.to_out.forward(&o))
    }
}

/// The profiler's names for the attention's stages.
const ATTENTION_SPANS: Spans = Spans {
    fused: "unet.attn.fused",
    scores: "unet.attn.scores",
    softmax: "unet.attn.softmax",
    pv: "unet.attn.pv",
    cat: "unet.attn.cat",
};

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each behind a
/// LayerNorm and added into the token stream.
#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: F32Norm,
    attn1: Attention,
    norm2: F32Norm,
    attn2: Attention,
    norm3: F32Norm,
    ff_in: Lin,
    ff_out: Lin,
}

impl TransformerBlock {
    fn new(
        dim: usize,
        heads: usize,
        cross: usize,
        upcast: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: F32Norm::layer(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(dim, dim, heads, upcast, vb.pp("attn1"))?,
            norm2: F32Norm::layer(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(dim, cross, heads, upcast, vb.pp("attn2"))?,
            norm3: F32Norm::layer(dim, 1e-5, vb.pp("norm3"))?,
            ff_in: Lin::new(dim, inner * 2, true, vb.pp("ff.net.0.proj"))?,
            ff_out: Lin::new(inner, dim, true, vb.pp("ff.net.2"))?,
        })
    }

    /// `x` `[B, L, dim]` in the residual dtype, `context` in the compute dtype.
    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let residual = x.dtype();
        let a = self.attn1.forward(&self.norm1.forward(x)?, None)?;
        let x = (x + a.to_dtype(residual)?)?;
        let a = self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?;
        let x = (x + a.to_dtype(residual)?)?;
        let h = self.norm3.forward(&x)?;
        let f = profile::span("unet.ff", x.device(), || {
            let f = act::geglu(&self.ff_in.forward(&h)?)?;
            self.ff_out.forward(&f)
        })?;
        x + f.to_dtype(residual)?
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Linear(Lin),
    Conv(Conv),
}

/// `Transformer2DModel` over a feature map: GroupNorm, projection in, transformer blocks,
/// projection out, plus the input.
#[derive(Debug, Clone)]
struct SpatialTransformer {
    norm: F32Norm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    fn new(
        c: usize,
        heads: usize,
        depth: usize,
        cross: usize,
        o: TransformerOptions,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let proj = |name: &str| -> candle_core::Result<Projection> {
            Ok(if o.linear_projection {
                Projection::Linear(Lin::new(c, c, true, vb.pp(name))?)
            } else {
                Projection::Conv(conv(c, c, 1, 1, 0, vb.pp(name))?)
            })
        };
        Ok(Self {
            norm: F32Norm::group(o.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(
                        c,
                        heads,
                        cross,
                        o.upcast_attention,
                        vb.pp("transformer_blocks").pp(i),
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let residual = x.dtype();
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let dev = x.device();
        let tokens = profile::span("unet.proj", dev, || match &self.proj_in {
            Projection::Linear(p) => p.forward(&to_tokens(&n)?),
            Projection::Conv(p) => to_tokens(&p.forward(&n)?),
        })?;
        drop(n);
        let mut tokens = tokens.to_dtype(residual)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let compute = context.dtype();
        let tokens = tokens.to_dtype(compute)?;
        let to_map = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = profile::span("unet.proj", dev, || match &self.proj_out {
            Projection::Linear(p) => to_map(&p.forward(&tokens)?),
            Projection::Conv(p) => p.forward(&to_map(&tokens)?),
        })?;
        profile::span("unet.residual_add", dev, || out.to_dtype(residual)? + x)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Conv>,
    downsample_pad: bool,
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Conv>,
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: Resnet,
    attention: SpatialTransformer,
    resnet1: Resnet,
}

/// Weights and matmuls in `compute`, the hidden state between layers in `residual`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UNetPrecision {
    pub compute: DType,
    pub residual: DType,
}

/// SDXL's additional conditioning: pooled text embedding `[B, D]` and the six size/crop ids
/// `[B, 6]` (original h, w, crop top, left, target h, w).
#[derive(Debug, Clone)]
pub struct TextTime<'a> {
    pub text_embeds: &'a Tensor,
    pub time_ids: &'a Tensor,
}

#[derive(Debug, Clone)]
pub struct UNet {
    plan: UNetPlan,
    center_input: bool,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    conv_in: Conv,
    time_linear_1: Lin,
    time_linear_2: Lin,
    add_linear: Option<(Lin, Lin)>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: F32Norm,
    conv_out: Conv,
    precision: UNetPrecision,
}

impl UNet {
    /// `vb` in the weights' dtype (the compute dtype, or bf16 under f32 activations on a
    /// bf16-ready CPU), rooted at the UNet's weight file.
    pub fn new(
        cfg: &UNetConfig,
        vb: VarBuilder,
        precision: UNetPrecision,
    ) -> candle_core::Result<Self> {
        let plan = cfg.plan().map_err(candle_core::Error::msg)?;
        let n = plan.channels.len();
        let ch = &plan.channels;
        let temb = plan.time_embed_dim();
        let ro = ResnetOptions {
            temb,
            groups: plan.groups,
            eps: cfg.norm_eps,
            out_scale: cfg.resnet_out_scale_factor,
        };
        let to = TransformerOptions {
            groups: plan.groups,
            linear_projection: cfg.use_linear_projection,
            upcast_attention: cfg.upcast_attention,
        };

        let conv_in = conv(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?;
        let time_linear_1 = Lin::new(ch[0], temb, true, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = Lin::new(temb, temb, true, vb.pp("time_embedding.linear_2"))?;
        let add_linear = match plan.text_time {
            Some((_, p)) => Some((
                Lin::new(p, temb, true, vb.pp("add_embedding.linear_1"))?,
                Lin::new(temb, temb, true, vb.pp("add_embedding.linear_2"))?,
            )),
            None => None,
        };

        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp("down_blocks").pp(i);
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..plan.layers[i])
                .map(|j| {
                    let c = if j == 0 { cin } else { ch[i] };
                    Resnet::new(c, ch[i], ro, vb.pp("resnets").pp(j))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attentions = if plan.down_attn[i] {
                (0..plan.layers[i])
                    .map(|j| {
                        SpatialTransformer::new(
                            ch[i],
                            plan.heads[i],
                            plan.transformer_layers[i],
                            plan.cross_dim[i],
                            to,
                            vb.pp("attentions").pp(j),
                        )
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?
            } else {
                vec![]
            };
            let downsample = if i + 1 < n {
                Some(conv(
                    ch[i],
                    ch[i],
                    3,
                    2,
                    cfg.downsample_padding,
                    vb.pp("downsamplers.0.conv"),
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
                downsample_pad: cfg.downsample_padding == 0,
            });
        }

        let top = ch[n - 1];
        let mvb = vb.pp("mid_block");
        let mro = ResnetOptions {
            out_scale: cfg.mid_block_scale_factor,
            ..ro
        };
        let mid = MidBlock {
            resnet0: Resnet::new(top, top, mro, mvb.pp("resnets.0"))?,
            attention: SpatialTransformer::new(
                top,
                plan.heads[n - 1],
                plan.transformer_layers[n - 1],
                plan.cross_dim[n - 1],
                to,
                mvb.pp("attentions.0"),
            )?,
            resnet1: Resnet::new(top, top, mro, mvb.pp("resnets.1"))?,
        };

        // Up blocks walk the down blocks in reverse; per-block lists are reversed with them.
        let rev = |v: &Vec<usize>| -> Vec<usize> { v.iter().rev().copied().collect() };
        let (rch, rlayers, rheads, rtl, rcross) = (
            rev(ch),
            rev(&plan.layers),
            rev(&plan.heads),
            rev(&plan.transformer_layers),
            rev(&plan.cross_dim),
        );
        let mut up = Vec::with_capacity(n);
        let mut prev = rch[0];
        for i in 0..n {
            let vb = vb.pp("up_blocks").pp(i);
            let out = rch[i];
            let input = rch[(i + 1).min(n - 1)];
            let count = rlayers[i] + 1;
            let resnets = (0..count)
                .map(|j| {
                    let skip = if j == count - 1 { input } else { out };
                    let rin = if j == 0 { prev } else { out };
                    Resnet::new(rin + skip, out, ro, vb.pp("resnets").pp(j))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attentions = if plan.up_attn[i] {
                (0..count)
                    .map(|j| {
                        SpatialTransformer::new(
                            out,
                            rheads[i],
                            rtl[i],
                            rcross[i],
                            to,
                            vb.pp("attentions").pp(j),
                        )
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?
            } else {
                vec![]
            };
            let upsample = if i + 1 < n {
                Some(conv(out, out, 3, 1, 1, vb.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
            prev = out;
        }

        Ok(Self {
            center_input: cfg.center_input_sample,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            conv_in,
            time_linear_1,
            time_linear_2,
            add_linear,
            down,
            mid,
            up,
            norm_out: F32Norm::group(plan.groups, ch[0], cfg.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv(ch[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            plan,
            precision,
        })
    }

    pub fn plan(&self) -> &UNetPlan {
        &self.plan
    }

    pub fn precision(&self) -> UNetPrecision {
        self.precision
    }

    /// The time embedding (plus SDXL's text/size embedding) in the compute dtype: `[B, temb]`.
    fn embedding(
        &self,
        timesteps: &[f32],
        text_time: Option<&TextTime<'_>>,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let b = timesteps.len();
        let c0 = self.plan.channels[0];
        let compute = self.precision.compute;
        let t = timestep_embedding(timesteps, c0, self.flip_sin_to_cos, self.freq_shift);
        let t = Tensor::from_vec(t, (b, c0), dev)?.to_dtype(compute)?;
        let emb = self
            .time_linear_2
            .forward(&candle_nn::ops::silu(&self.time_linear_1.forward(&t)?)?)?;
        match (&self.add_linear, self.plan.text_time, text_time) {
            (Some((l1, l2)), Some((tdim, _)), Some(tt)) => {
                let ids: Vec<f32> = tt
                    .time_ids
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let n_ids = ids.len() / b.max(1);
                let te = timestep_embedding(&ids, tdim, self.flip_sin_to_cos, self.freq_shift);
                let te = Tensor::from_vec(te, (b, n_ids * tdim), dev)?;
                let add = Tensor::cat(&[&tt.text_embeds.to_dtype(DType::F32)?, &te], D::Minus1)?
                    .to_dtype(compute)?;
                let aug = l2.forward(&candle_nn::ops::silu(&l1.forward(&add)?)?)?;
                emb + aug
            }
            (Some(_), _, None) => candle_core::bail!(
                "this UNet (addition_embed_type text_time) needs the pooled text embedding and time ids"
            ),
            _ => Ok(emb),
        }
    }

    /// One UNet call: `sample` `[B, C, h, w]`, one timestep per batch row, `context`
    /// `[B, L, cross_attention_dim]`. Returns the model output in f32.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
        text_time: Option<&TextTime<'_>>,
    ) -> candle_core::Result<Tensor> {
        let (b, _, _, _) = sample.dims4()?;
        if timesteps.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", timesteps.len());
        }
        let dev = sample.device();
        let UNetPrecision { compute, residual } = self.precision;
        let emb = self.embedding(timesteps, text_time, dev)?;
        let temb_act = candle_nn::ops::silu(&emb)?;
        drop(emb);
        let context = context.to_dtype(compute)?;

        let x = if self.center_input {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut h = self
            .conv_in
            .forward(&x.to_dtype(compute)?)?
            .to_dtype(residual)?;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            for (j, r) in block.resnets.iter().enumerate() {
                h = r.forward(&h, &temb_act)?;
                if let Some(a) = block.attentions.get(j) {
                    h = a.forward(&h, &context)?;
                }
                skips.push(h.clone());
            }
            if let Some(d) = &block.downsample {
                let mut c = h.to_dtype(compute)?;
                if block.downsample_pad {
                    c = c.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
                }
                h = d.forward(&c)?.to_dtype(residual)?;
                skips.push(h.clone());
            }
        }

        h = self.mid.resnet0.forward(&h, &temb_act)?;
        h = self.mid.attention.forward(&h, &context)?;
        h = self.mid.resnet1.forward(&h, &temb_act)?;

        for block in &self.up {
            for (j, r) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::msg("UNet skip connections exhausted"))?;
                h = profile::span("unet.cat", h.device(), || Tensor::cat(&[&h, &skip], 1))?;
                drop(skip);
                h = r.forward(&h, &temb_act)?;
                if let Some(a) = block.attentions.get(j) {
                    h = a.forward(&h, &context)?;
                }
            }
            if let Some(u) = &block.upsample {
                // To the size of the skip it meets next: ×2, or the odd size the down path
                // rounded up (diffusers' `upsample_size`).
                let (th, tw) = match skips.last() {
                    Some(s) => {
                        let (_, _, sh, sw) = s.dims4()?;
                        (sh, sw)
                    }
                    None => {
                        let (_, _, hh, ww) = h.dims4()?;
                        (hh * 2, ww * 2)
                    }
                };
                let c = upsample_nearest(&h.to_dtype(compute)?, th, tw)?;
                h = u.forward(&c)?.to_dtype(residual)?;
            }
        }
        let h = self.norm_out.forward_act(&h, true)?;
        self.conv_out.forward(&h)?.to_dtype(DType::F32)
    }
}

/// Nearest-neighbour resize with PyTorch's index rule `floor(dst · (in/out))` in f32, which for
/// an exact doubling is `dst / 2`.
fn upsample_nearest(x: &Tensor, th: usize, tw: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if th == 2 * h && tw == 2 * w {
        return x.upsample_nearest2d(th, tw);
    }
    let index = |src: usize, dst: usize| -> Vec<u32> {
        let scale = src as f32 / dst as f32;
        (0..dst)
            .map(|i| ((i as f32 * scale).floor() as usize).min(src - 1) as u32)
            .collect()
    };
    let dev = x.device();
    let iy = Tensor::new(index(h, th).as_slice(), dev)?;
    let ix = Tensor::new(index(w, tw).as_slice(), dev)?;
    x.index_select(&iy, 2)?.index_select(&ix, 3)
}

impl HasLins for Attention {
    fn lins_mut(&mut self) -> Vec<&mut Lin> {
        vec![
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
        ]
    }
    fn lins(&self) -> Vec<&Lin> {
        vec![&self.to_q, &self.to_k, &self.to_v, &self.to_out]
    }
}

impl HasLins for SpatialTransformer {
    fn lins_mut(&mut self) -> Vec<&mut Lin> {
        let mut v = Vec::new();
        if let Projection::Linear(p) = &mut self.proj_in {
            v.push(p);
        }
        for b in &mut self.blocks {
            v.extend(b.attn1.lins_mut());
            v.extend(b.attn2.lins_mut());
            v.push(&mut b.ff_in);
            v.push(&mut b.ff_out);
        }
        if let Projection::Linear(p) = &mut self.proj_out {
            v.push(p);
        }
        v
    }
    fn lins(&self) -> Vec<&Lin> {
        let mut v = Vec::new();
        if let Projection::Linear(p) = &self.proj_in {
            v.push(p);
        }
        for b in &self.blocks {
            v.extend(b.attn1.lins());
            v.extend(b.attn2.lins());
            v.push(&b.ff_in);
            v.push(&b.ff_out);
        }
        if let Projection::Linear(p) = &self.proj_out {
            v.push(p);
        }
        v
    }
}

impl HasLins for UNet {
    fn lins_mut(&mut self) -> Vec<&mut Lin> {
        let mut v: Vec<&mut Lin> = vec![&mut self.time_linear_1, &mut self.time_linear_2];
        if let Some((a, b)) = &mut self.add_linear {
            v.push(a);
            v.push(b);
        }
        for d in &mut self.down {
            v.extend(d.resnets.iter_mut().map(|r| &mut r.time_emb_proj));
            v.extend(d.attentions.iter_mut().flat_map(|a| a.lins_mut()));
        }
        v.push(&mut self.mid.resnet0.time_emb_proj);
        v.extend(self.mid.attention.lins_mut());
        v.push(&mut self.mid.resnet1.time_emb_proj);
        for u in &mut self.up {
            v.extend(u.resnets.iter_mut().map(|r| &mut r.time_emb_proj));
            v.extend(u.attentions.iter_mut().flat_map(|a| a.lins_mut()));
        }
        v
    }
    fn lins(&self) -> Vec<&Lin> {
        let mut v: Vec<&Lin> = vec![&self.time_linear_1, &self.time_linear_2];
        if let Some((a, b)) = &self.add_linear {
            v.push(a);
            v.push(b);
        }
        for d in &self.down {
            v.extend(d.resnets.iter().map(|r| &r.time_emb_proj));
            v.extend(d.attentions.iter().flat_map(|a| a.lins()));
        }
        v.push(&self.mid.resnet0.time_emb_proj);
        v.extend(self.mid.attention.lins());
        v.push(&self.mid.resnet1.time_emb_proj);
        for u in &self.up {
            v.extend(u.resnets.iter().map(|r| &r.time_emb_proj));
            v.extend(u.attentions.iter().flat_map(|a| a.lins()));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_is_cos_then_sin() {
        let e = timestep_embedding(&[0.0], 8, true, 0.0);
        assert_eq!(&e[..4], &[1.0; 4]);
        assert_eq!(&e[4..], &[0.0; 4]);
        let e = timestep_embedding(&[1.0], 4, false, 1.0);
        // freqs exp(-ln(1e4)·i / (2 − 1)) = [1, 1e-4]
        assert!((e[0] - 1f32.sin()).abs() < 1e-7 && (e[1] - 1e-4f32.sin()).abs() < 1e-9);
    }

    #[test]
    fn nearest_resize_follows_torch_indices() {
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let y = upsample_nearest(&x, 3, 5).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        // rows [0, 0, 1], cols [0, 0, 1, 1, 2]
        assert_eq!(
            v,
            vec![0., 0., 1., 1., 2., 0., 0., 1., 1., 2., 3., 3., 4., 4., 5.]
        );
    }

    #[test]
    fn rejects_unsupported_options_by_name() {
        let mut cfg: UNetConfig = serde_json::from_str("{}").unwrap();
        cfg.class_embed_type = Some("timestep".into());
        assert!(cfg.plan().unwrap_err().contains("class_embed_type"));
        let cfg: UNetConfig =
            serde_json::from_str(r#"{"down_block_types": ["SimpleCrossAttnDownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D"]}"#).unwrap();
        assert!(cfg
            .plan()
            .unwrap_err()
            .contains("SimpleCrossAttnDownBlock2D"));
    }
}
