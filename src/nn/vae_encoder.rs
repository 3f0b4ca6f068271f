//! The encoder half of AutoencoderKL (image to image, inpainting): pixels in [-1, 1] → the
//! diagonal Gaussian posterior over latents, sampled with the job's generator as diffusers'
//! `retrieve_latents(vae.encode(image), generator)` does. Shares the decoder's blocks (`vae.rs`).

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::torch_rng::TorchGenerator;
use super::vae::{group_norm, GroupNorm, NormCtx, Resnet, SpatialAttention, VaeConfig};
use crate::ops::conv::{Conv, CONV_BAND_ELEMS};
use crate::ops::linear;

/// `Downsample2D(use_conv=True, padding=0)`: zero-pad one row and column at the bottom and right,
/// then a 3×3 convolution with stride 2.
#[derive(Debug, Clone)]
struct Downsample(Conv);

impl Downsample {
    fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        Ok(Self(Conv::new(candle_nn::conv2d(c, c, 3, cfg, vb)?, false)))
    }

    /// Runs in bands of output rows (each reads rows `2r … 2r+2` of the padded input), so the
    /// im2col buffer stays bounded at large sizes.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let conv = &self.0;
        let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        let (_, cin, h, w) = x.dims4()?;
        let out_h = (h - 3) / 2 + 1;
        let per_row = (w / 2) * cin * 9;
        let rows = (CONV_BAND_ELEMS / per_row.max(1)).max(1);
        if rows >= out_h {
            return conv.forward(&x);
        }
        let mut bands = Vec::with_capacity(out_h.div_ceil(rows));
        let mut r0 = 0;
        while r0 < out_h {
            let r1 = (r0 + rows).min(out_h);
            let band = x.narrow(2, 2 * r0, 2 * (r1 - r0) + 1)?;
            bands.push(conv.forward(&band)?);
            r0 = r1;
        }
        Tensor::cat(&bands, 2)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<Resnet>,
    downsample: Option<Downsample>,
}

/// The posterior `N(mean, std²)` of one encoded image, `[B, C, h, w]` each (f32).
#[derive(Debug, Clone)]
pub struct Posterior {
    pub mean: Tensor,
    pub std: Tensor,
}

impl Posterior {
    /// `DiagonalGaussianDistribution.sample(generator)`: `mean + std · randn(mean.shape)`, one draw
    /// from `gen` (batch 1, as diffusers encodes image by image with a list of generators).
    pub fn sample(&self, gen: &mut TorchGenerator) -> candle_core::Result<Tensor> {
        let eps = gen.randn_tensor(self.mean.dims(), self.mean.device())?;
        &self.mean + (&self.std * eps)?
    }
}

/// `Encoder` (+ `quant_conv` when the config has it) of diffusers' AutoencoderKL.
#[derive(Debug, Clone)]
pub struct VaeEncoder {
    conv_in: Conv,
    down_blocks: Vec<DownBlock>,
    mid_resnets: [Resnet; 2],
    mid_attention: Option<SpatialAttention>,
    norm_out: GroupNorm,
    conv_out: Conv,
    quant_conv: Option<Conv>,
    dtype: DType,
}

impl VaeEncoder {
    /// `vb` is rooted at the VAE's weight file (keys `encoder.*`, `quant_conv.*`).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        if let Some(types) = &cfg.down_block_types {
            if let Some(t) = types.iter().find(|t| t.as_str() != "DownEncoderBlock2D") {
                candle_core::bail!("down block type `{t}` is not supported (DownEncoderBlock2D)");
            }
        }
        let groups = cfg.norm_num_groups;
        let boc = &cfg.block_out_channels;
        let e = vb.pp("encoder");
        let mut down_blocks = Vec::with_capacity(boc.len());
        let mut prev = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let db = e.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    Resnet::new(cin, out, groups, db.pp("resnets").pp(j))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsample = if i + 1 < boc.len() {
                Some(Downsample::new(out, db.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            prev = out;
        }
        let top = *boc.last().unwrap_or(&64);
        let mid = e.pp("mid_block");
        let latent2 = 2 * cfg.latent_channels;
        Ok(Self {
            conv_in: Conv::same(cfg.in_channels, boc[0], 3, e.pp("conv_in"))?,
            down_blocks,
            mid_resnets: [
                Resnet::new(top, top, groups, mid.pp("resnets.0"))?,
                Resnet::new(top, top, groups, mid.pp("resnets.1"))?,
            ],
            mid_attention: if cfg.mid_block_add_attention {
                Some(SpatialAttention::new(top, groups, mid.pp("attentions.0"))?)
            } else {
                None
            },
            norm_out: group_norm(groups, top, e.pp("conv_norm_out"))?,
            conv_out: Conv::same(top, latent2, 3, e.pp("conv_out"))?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv::same(latent2, latent2, 1, vb.pp("quant_conv"))?)
            } else {
                None
            },
            dtype: linear::activation_dtype(vb.dtype(), vb.device()),
        })
    }

    /// Pixels `[B, 3, H, W]` in [-1, 1] → the posterior over latents `[B, C, H/f, W/f]` (f32).
    pub fn encode(&self, pixels: &Tensor) -> candle_core::Result<Posterior> {
        let ctx = &mut NormCtx::Local;
        let mut h = self.conv_in.forward(&pixels.to_dtype(self.dtype)?)?;
        for block in &self.down_blocks {
            for r in &block.resnets {
                h = r.forward(&h, ctx)?;
            }
            if let Some(d) = &block.downsample {
                h = d.forward(&h)?;
            }
        }
        h = self.mid_resnets[0].forward(&h, ctx)?;
        if let Some(a) = &self.mid_attention {
            h = a.forward(&h, ctx)?;
        }
        h = self.mid_resnets[1].forward(&h, ctx)?;
        h = self.norm_out.forward_act(&h, ctx, true)?;
        h = self.conv_out.forward(&h)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let h = h.to_dtype(DType::F32)?;
        let c = h.dim(1)? / 2;
        let mean = h.narrow(1, 0, c)?.contiguous()?;
        let logvar = h.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(Posterior { mean, std })
    }
}
