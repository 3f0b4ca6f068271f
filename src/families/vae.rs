//! The AutoencoderKL decoder shared by every family (Z-Image's 16-channel VAE, SD's 4-channel one):
//! config from `vae/config.json`, diffusers tensor names (new and legacy attention names), and a
//! forward that frees each feature map as soon as the next one exists.

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use super::cpu_gemm::{self, Lin};
use crate::profile::span;
use serde::Deserialize;

const VAE_NORM_EPS: f64 = 1e-6;
/// Query rows per attention chunk in the mid block (bounds the score matrix to 4096 × positions).
const ATTENTION_CHUNK: usize = 4096;

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
}

/// A decoder convolution (k×k, stride 1, padding k/2, with bias). 3×3 convolutions of f32 tensors on
/// the CPU run as [`Conv3x3Taps`] (no im2col at all); everything else through candle's `conv2d` in
/// row bands ([`conv_banded`]).
#[derive(Debug, Clone)]
pub(super) struct Conv(Conv2d);

pub(super) fn conv(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> candle_core::Result<Conv> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    Ok(Conv(candle_nn::conv2d(cin, cout, k, cfg, vb)?))
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = conv_fast(&self.0, x)? {
            return Ok(y);
        }
        // Weights stored narrower than the activations (bf16 on a CPU) reach here only for small
        // layers (a 1×1 shortcut or post_quant_conv without the fast path).
        conv_banded(in_dtype(&self.0, x.dtype())?.as_ref(), x)
    }
}

/// `conv` with its weight and bias in `dtype`: itself when they already are, else a converted copy
/// for one call (bf16 weights under f32 activations where no fast path applies).
pub(crate) fn in_dtype(conv: &Conv2d, dtype: DType) -> candle_core::Result<Cow<'_, Conv2d>> {
    if conv.weight().dtype() == dtype {
        return Ok(Cow::Borrowed(conv));
    }
    Ok(Cow::Owned(Conv2d::new(
        conv.weight().to_dtype(dtype)?,
        conv.bias().map(|b| b.to_dtype(dtype)).transpose()?,
        *conv.config(),
    )))
}

/// The CPU fast paths of a same-padded, stride-1 convolution with a bias on an f32 input: 3×3 as
/// [`Conv3x3Taps`] (f32 weights, or bf16 on a bf16-ready CPU), 1×1 as one matrix product per item.
/// `None` where neither applies (the caller runs candle's `conv2d`). Shared with the UNet.
pub(crate) fn conv_fast(conv: &Conv2d, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let w = conv.weight();
    let cfg = conv.config();
    let k = w.dims()[2..].to_vec();
    let Some(b) = conv.bias() else {
        return Ok(None);
    };
    let same = cfg.stride == 1
        && cfg.dilation == 1
        && cfg.groups == 1
        && k.len() == 2
        && k[0] == k[1]
        && cfg.padding == k[0] / 2;
    if !(same && x.device().is_cpu() && x.dtype() == DType::F32) {
        return Ok(None);
    }
    if k[0] == 3
        && (w.dtype() == DType::F32 || (w.dtype() == DType::BF16 && cpu_gemm::bf16_ready()))
    {
        return Ok(Some(x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &b.to_dtype(DType::F32)?.contiguous()?,
            &Conv3x3Taps,
        )?));
    }
    if k[0] == 1 {
        // W[out, in] · X[in, H·W] per item (bf16 operands when the weight is bf16 on a
        // bf16-ready CPU), no im2col copy.
        let (n, c_in, h, wd) = x.dims4()?;
        let c_out = w.dim(0)?;
        let w2 = w.reshape((1, c_out, c_in))?.to_dtype(DType::F32)?;
        let w2 = w2.broadcast_as((n, c_out, c_in))?.contiguous()?;
        let bf16 = w.dtype() == DType::BF16;
        let xm = x.contiguous()?.reshape((n, c_in, h * wd))?;
        let y = cpu_gemm::matmul(&w2, &xm, bf16)?;
        let bias = b.to_dtype(DType::F32)?.reshape((1, c_out, 1))?;
        return Ok(Some(y.broadcast_add(&bias)?.reshape((n, c_out, h, wd))?));
    }
    Ok(None)
}

/// 3×3 convolution, stride 1, padding 1, f32 on the CPU, as nine matrix products accumulated in
/// place: output `[c_out, y·(W+2) + x]` += `w[:, :, kh, kw]` · (the zero-padded input, flattened with
/// row length W+2, read from offset `kh·(W+2) + kw`). Each tap's input is a strided view of one padded
/// copy, so no im2col matrix is built; the two extra columns per row are dropped at the end.
/// candle's CPU `conv2d` builds im2col tiles with strided scalar copies and reached about a third of
/// its matmul rate on the VAE's shapes (benches/compare, "Profile").
struct Conv3x3Taps;

impl CustomOp3 for Conv3x3Taps {
    fn name(&self) -> &'static str {
        "conv3x3-taps"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_gemm::f32_slice(xs, xl, "conv3x3-taps")?;
        let bias = cpu_gemm::f32_slice(bs, bl, "conv3x3-taps")?;
        let Some((w0, w1)) = wl.contiguous_offsets() else {
            candle_core::bail!("conv3x3-taps: inputs must be contiguous");
        };
        let (n, c_in, h, w) = xl.shape().dims4()?;
        let (c_out, wc_in, kh, kw) = wl.shape().dims4()?;
        if wc_in != c_in || (kh, kw) != (3, 3) || bias.len() != c_out {
            candle_core::bail!(
                "conv3x3-taps: input {:?}, weight {:?}, bias {:?}",
                xl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        #[cfg(feature = "mkl")]
        if let CpuStorage::BF16(wb) = ws {
            let out = taps_bf16(x, (n, c_in, h, w), &wb[w0..w1], bias);
            return Ok((CpuStorage::F32(out), Shape::from((n, c_out, h, w))));
        }
        let wt = &ws.as_slice::<f32>()?[w0..w1];
        let out = conv3x3_bands(x, (n, c_in, h, w), bias, as_is, |p| {
            // SAFETY: dst is `acc`, c_out rows of `cols` elements. lhs element (o, i) is
            // wt[o·9·c_in + i·9 + tap] < c_out·c_in·9 = wt.len(). rhs element (i, j) is
            // padded[offset + i·plane + j], inside the padded input (see conv3x3_bands).
            unsafe {
                gemm::gemm(
                    c_out,
                    p.cols,
                    c_in,
                    p.acc.as_mut_ptr(),
                    1,
                    p.cols as isize,
                    true,
                    wt.as_ptr().add(p.tap),
                    9,
                    (9 * c_in) as isize,
                    p.padded.as_ptr().add(p.offset),
                    1,
                    p.plane as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c_out, h, w))))
    }
}

/// Accumulator elements per band of the tap-wise convolution (1 MiB of f32: fits a core's L2).
const ACC_BAND_ELEMS: usize = 1 << 18;

/// [`Conv3x3Taps`] with bf16 weights: the same nine accumulated products per band, with bf16
/// operands (weights regrouped per tap, the padded input rounded once) and f32 accumulation
/// through MKL.
#[cfg(feature = "mkl")]
fn taps_bf16(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    wt: &[half::bf16],
    bias: &[f32],
) -> Vec<f32> {
    let (c_in, c_out) = (dims.1, bias.len());
    // Per tap a contiguous [c_out, c_in] matrix.
    let mut taps = vec![0u16; 9 * c_out * c_in];
    for o in 0..c_out {
        for i in 0..c_in {
            for t in 0..9 {
                taps[(t * c_out + o) * c_in + i] = wt[(o * c_in + i) * 9 + t].to_bits();
            }
        }
    }
    fn rounded(p: &[f32]) -> Cow<'_, [u16]> {
        Cow::Owned(cpu_gemm::to_bf16_bits(p))
    }
    conv3x3_bands(x, dims, bias, rounded, |p| {
        cpu_gemm::gemm_bf16(
            c_out,
            p.cols,
            c_in,
            &taps[p.tap * c_out * c_in..],
            c_in,
            &p.padded[p.offset..],
            p.plane,
            false,
            p.acc,
            p.cols,
            1.0,
        );
    })
}

/// The padded f32 input as it is (for f32 weights).
fn as_is(p: &[f32]) -> Cow<'_, [f32]> {
    Cow::Borrowed(p)
}

/// One tap's product for [`conv3x3_bands`]: `acc` (`c_out` rows of `cols`) += weights of `tap` ·
/// (the padded input's `c_in` rows of `plane` elements, read from `offset`, `cols` wide).
struct TapProduct<'a, P> {
    tap: usize,
    offset: usize,
    cols: usize,
    plane: usize,
    padded: &'a [P],
    acc: &'a mut [f32],
}

/// A 3×3, stride-1, padding-1 convolution as nine accumulated products per band of output rows:
/// each item's input is zero-padded once (row length W+2, one zero row above and two below, so the
/// last tap's view of the last row — two elements past the image — stays inside), converted with
/// `prepare`; each band's accumulator starts at the bias, `product` adds the nine taps, and the
/// rows are copied out without the two padding columns. Bands run in parallel; their accumulator
/// stays in cache across the taps (the whole image's would stream through memory nine times).
fn conv3x3_bands<P: Clone + Sync>(
    x: &[f32],
    (n, c_in, h, w): (usize, usize, usize, usize),
    bias: &[f32],
    prepare: impl for<'p> Fn(&'p [f32]) -> Cow<'p, [P]>,
    product: impl Fn(TapProduct<'_, P>) + Sync,
) -> Vec<f32> {
    let c_out = bias.len();
    let row = w + 2;
    let plane = (h + 3) * row;
    let band = (ACC_BAND_ELEMS / (c_out * row).max(1)).clamp(1, h.max(1));
    let bands = h.div_ceil(band);
    let mut out = vec![0f32; n * c_out * h * w];
    let mut padded = vec![0f32; c_in * plane];
    for item in 0..n {
        let src = &x[item * c_in * h * w..(item + 1) * c_in * h * w];
        for c in 0..c_in {
            for y in 0..h {
                let at = c * plane + (y + 1) * row + 1;
                padded[at..at + w].copy_from_slice(&src[(c * h + y) * w..(c * h + y + 1) * w]);
            }
        }
        let prepared = prepare(&padded);
        let prepared: &[P] = &prepared;
        let dst = SendPtr(out[item * c_out * h * w..].as_mut_ptr());
        let run_band = |b: usize, acc: &mut Vec<f32>| {
            let y0 = b * band;
            let rows = band.min(h - y0);
            let cols = rows * row;
            acc.clear();
            acc.resize(c_out * cols, 0.0);
            for (c, bv) in bias.iter().enumerate() {
                acc[c * cols..(c + 1) * cols].fill(*bv);
            }
            for tap in 0..9 {
                // offset ≤ (y0 + 2)·row + 2 and the band reads < rows·row columns per input row,
                // so the last index is at most (c_in − 1)·plane + (h + 2)·row + 1 < c_in·plane.
                product(TapProduct {
                    tap,
                    offset: y0 * row + (tap / 3) * row + tap % 3,
                    cols,
                    plane,
                    padded: prepared,
                    acc,
                });
            }
            for c in 0..c_out {
                for r in 0..rows {
                    let from = c * cols + r * row;
                    let to = (c * h + y0 + r) * w;
                    // SAFETY: bands cover disjoint output rows, so no two tasks write the same
                    // elements; `to + w` ≤ c_out·h·w, inside this item's output.
                    unsafe {
                        std::ptr::copy_nonoverlapping(acc.as_ptr().add(from), dst.get().add(to), w);
                    }
                }
            }
        };
        use rayon::prelude::*;
        (0..bands)
            .into_par_iter()
            .for_each_init(Vec::new, |acc, b| run_band(b, acc));
    }
    out
}

/// A raw output pointer shared by the band tasks, which write disjoint rows.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes from the band tasks, while the buffer outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Largest im2col buffer one convolution call may build, in elements. candle lowers a convolution
/// to one im2col matrix of `H·W × Cin·k²` for the whole image — 1.2 GB for a 128-channel 3×3 conv
/// at 512², 4.5 GB at 1024² — so large convolutions run in row bands that each stay under this.
pub(super) const CONV_BAND_ELEMS: usize = 16 << 20;

/// A 3×3 (or 1×1) same-padding convolution evaluated in horizontal bands: each band takes one
/// halo row from its neighbours (or the real zero padding at the image edge), so the result is
/// identical to the whole-image convolution while the temporary buffer stays bounded.
fn conv_banded(conv: &Conv2d, x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, cin, h, w) = x.dims4()?;
    let k = conv.weight().dim(2)?;
    let halo = k / 2;
    let per_row = w * cin * k * k;
    let rows = (CONV_BAND_ELEMS / per_row.max(1)).max(1);
    if rows >= h {
        return x.apply(conv);
    }
    let mut bands = Vec::with_capacity(h.div_ceil(rows));
    let mut r0 = 0;
    while r0 < h {
        let r1 = (r0 + rows).min(h);
        let a = r0.saturating_sub(halo);
        let b = (r1 + halo).min(h);
        let out = x.narrow(2, a, b - a)?.apply(conv)?;
        // Output row i of this slice is input row a + i; keep rows r0..r1.
        bands.push(out.narrow(2, r0 - a, r1 - r0)?);
        r0 = r1;
    }
    Tensor::cat(&bands, 2)
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

/// GroupNorm over `[B, C, H, W]`; statistics accumulate in f32 whatever the dtype.
#[derive(Debug, Clone)]
pub(super) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    fn forward(&self, x: &Tensor, ctx: &mut NormCtx<'_>) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dtype = x.dtype();
        let g = self.groups;
        let wgt = self.weight.to_dtype(dtype)?.reshape((1, c, 1, 1))?;
        let bias = self.bias.to_dtype(dtype)?.reshape((1, c, 1, 1))?;
        if let NormCtx::Local = ctx {
            // One fused pass (candle's layer norm over each group's values, f32 accumulation in
            // any dtype) instead of a chain of full-size f32 temporaries: at 1024² a 128-channel
            // map is 0.5 GB in f32, and the chain held several at once.
            let n = (c / g) * h * w;
            let ones = Tensor::ones(n, dtype, x.device())?;
            let zeros = Tensor::zeros(n, dtype, x.device())?;
            let normed = candle_nn::ops::layer_norm(
                &x.contiguous()?.reshape((b * g, n))?,
                &ones,
                &zeros,
                VAE_NORM_EPS as f32,
            )?
            .reshape((b, c, h, w))?;
            drop((ones, zeros));
            let scaled = normed.broadcast_mul(&wgt)?;
            drop(normed);
            return scaled.broadcast_add(&bias);
        }
        let xf = x.to_dtype(DType::F32)?.reshape((b, g, (c / g) * h * w))?;
        let (mean, var) = ctx.stats(|| {
            let mean = xf.mean_keepdim(2)?;
            let var = xf.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
            Ok((mean, var))
        })?;
        let mut t = xf.broadcast_sub(&mean)?;
        drop(xf);
        t = t.broadcast_div(&(var + VAE_NORM_EPS)?.sqrt()?)?;
        t = t.reshape((b, c, h, w))?.to_dtype(dtype)?;
        t = t.broadcast_mul(&wgt)?;
        t.broadcast_add(&bias)
    }
}

impl GroupNorm {
    /// GroupNorm followed by SiLU when `silu`. f32 on the CPU: group statistics in one pass (f64
    /// sums), then one pass that applies the per-channel scale and shift and the SiLU — instead of
    /// a layer norm, a multiply, an add and candle's SiLU, each a sweep over the feature map.
    pub(super) fn forward_act(
        &self,
        x: &Tensor,
        ctx: &mut NormCtx<'_>,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        if !(x.device().is_cpu() && x.dtype() == DType::F32) {
            let y = self.forward(x, ctx)?;
            return if silu {
                candle_nn::ops::silu(&y)
            } else {
                Ok(y)
            };
        }
        let (b, c, _, _) = x.dims4()?;
        let g = self.groups;
        if g == 0 || c % g != 0 {
            candle_core::bail!("group norm: {c} channels in {g} groups");
        }
        let x = x.contiguous()?;
        let (mean, var) = ctx.stats(|| {
            let st = x.apply_op1_no_bwd(&GroupStats { groups: g })?; // [B, G, 2]
            Ok((
                st.narrow(2, 0, 1)?.contiguous()?,
                st.narrow(2, 1, 1)?.contiguous()?,
            ))
        })?;
        // Per channel: y = x·a + s with a = γ / √(var + ε), s = β − mean·a.
        let rstd = (var.to_dtype(DType::F32)? + VAE_NORM_EPS)?
            .sqrt()?
            .recip()?; // [B, G, 1]
        let gamma = self.weight.to_dtype(DType::F32)?.reshape((1, g, c / g))?;
        let beta = self.bias.to_dtype(DType::F32)?.reshape((1, g, c / g))?;
        let a = rstd.broadcast_mul(&gamma)?; // [B, G, C/G]
        let shift = beta.broadcast_sub(&mean.to_dtype(DType::F32)?.broadcast_mul(&a)?)?;
        let a = a.reshape((b, c))?.contiguous()?;
        let shift = shift.reshape((b, c))?.contiguous()?;
        x.apply_op3_no_bwd(&a, &shift, &ChannelAffine { silu })
    }
}

/// Mean and (population) variance per group of a contiguous f32 `[B, C, H, W]`: `[B, G, 2]`.
struct GroupStats {
    groups: usize,
}

impl candle_core::CustomOp1 for GroupStats {
    fn name(&self) -> &'static str {
        "group-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_gemm::f32_slice(s, l, "group-stats")?;
        let (b, _, _, _) = l.shape().dims4()?;
        let g = self.groups;
        let n = x.len() / (b * g).max(1);
        use rayon::prelude::*;
        let mut out = vec![0f32; b * g * 2];
        out.par_chunks_mut(2)
            .zip(x.par_chunks(n.max(1)))
            .for_each(|(o, xs)| {
                let (sum, sq) = sums(xs);
                let mean = sum / n as f64;
                o[0] = mean as f32;
                o[1] = (sq / n as f64 - mean * mean).max(0.0) as f32;
            });
        Ok((CpuStorage::F32(out), Shape::from((b, g, 2))))
    }
}

/// Σx and Σx² in f64, over 8 lanes so that the loop vectorises.
fn sums(xs: &[f32]) -> (f64, f64) {
    let mut s = [0f64; 8];
    let mut q = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            let v = c[i] as f64;
            s[i] += v;
            q[i] += v * v;
        }
    }
    let (mut sum, mut sq): (f64, f64) = (s.iter().sum(), q.iter().sum());
    for &v in chunks.remainder() {
        sum += v as f64;
        sq += v as f64 * v as f64;
    }
    (sum, sq)
}

/// `y = x·a[b, c] + s[b, c]` over each `[H, W]` plane of a contiguous f32 `[B, C, H, W]`, then
/// SiLU when `silu`.
struct ChannelAffine {
    silu: bool,
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_gemm::f32_slice(xs, xl, "channel-affine")?;
        let a = cpu_gemm::f32_slice(as_, al, "channel-affine")?;
        let sh = cpu_gemm::f32_slice(ss, sl, "channel-affine")?;
        let (b, c, h, w) = xl.shape().dims4()?;
        if a.len() != b * c || sh.len() != b * c {
            candle_core::bail!("channel-affine: {} scales for {b}×{c} planes", a.len());
        }
        let plane = (h * w).max(1);
        let mut out = vec![0f32; x.len()];
        use rayon::prelude::*;
        let silu = self.silu;
        out.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (o, xs))| affine_plane(xs, o, a[i], sh[i], silu));
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

cpu_gemm::with_avx512!(fn affine_plane(x: &[f32], out: &mut [f32], a: f32, s: f32, silu: bool) => affine_plane_plain);

#[inline(always)]
fn affine_plane_plain(x: &[f32], out: &mut [f32], a: f32, s: f32, silu: bool) {
    if silu {
        for (o, &v) in out.iter_mut().zip(x) {
            let y = v * a + s;
            *o = y / (1.0 + cpu_gemm::exp_neg(y));
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * a + s;
        }
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
            conv1: conv(cin, cout, 3, vb.pp("conv1"))?,
            norm2: group_norm(groups, cout, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(conv(cin, cout, 1, vb.pp("conv_shortcut"))?)
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
        let act = cpu_gemm::activation_dtype(vb.dtype(), vb.device());
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
        let bf16_weights = self.q.weight().dtype() == DType::BF16;
        let heads = |t: &Tensor| t.unsqueeze(1); // [B, 1, n, c]
        if let Some(o) =
            cpu_gemm::attention(&heads(&q)?, &heads(&k)?, &heads(&v)?, None, bf16_weights)?
        {
            let o = o.squeeze(1)?.apply(&self.out)?;
            let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
            return x + o;
        }
        let kt = k.t()?;
        // Queries in chunks: at 1024² the scores of all 16 384 positions would be 1 GiB at once.
        let n = h * w;
        let mut parts = Vec::with_capacity(n.div_ceil(ATTENTION_CHUNK));
        for start in (0..n).step_by(ATTENTION_CHUNK) {
            let len = ATTENTION_CHUNK.min(n - start);
            let qc = q.narrow(1, start, len)?;
            let probs = super::gpu_ops::softmax_last_dim(&qc.matmul(&kt)?)?;
            parts.push(probs.matmul(&v)?);
        }
        let o = Tensor::cat(&parts, 1)?.apply(&self.out)?;
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
            Some(conv(
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
                Some(conv(out, out, 3, ub.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv(cfg.latent_channels, top, 3, d.pp("conv_in"))?,
            mid_resnets,
            mid_attention,
            up_blocks,
            norm_out: group_norm(groups, boc[0], d.pp("conv_norm_out"))?,
            conv_out: conv(boc[0], cfg.out_channels, 3, d.pp("conv_out"))?,
            // bf16 weights on a bf16-ready CPU run f32 activations (cpu_gemm).
            dtype: cpu_gemm::activation_dtype(vb.dtype(), vb.device()),
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
    fn banded_convolution_equals_the_whole_one() {
        let dev = Device::Cpu;
        // 32 input channels × 9 taps × 600 columns ≈ 173k elements per row: bands of ≈ 97 rows.
        let x = Tensor::randn(0f32, 1.0, (1, 32, 250, 600), &dev).unwrap();
        for k in [1usize, 3] {
            let w = Tensor::randn(0f32, 0.1, (8, 32, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.1, 8, &dev).unwrap();
            let conv = Conv2d::new(
                w,
                Some(b),
                Conv2dConfig {
                    padding: k / 2,
                    ..Default::default()
                },
            );
            let whole = x.apply(&conv).unwrap();
            let banded = conv_banded(&conv, &x).unwrap();
            let d = (whole - banded)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-4, "k={k}: {d}");
        }
    }

    /// The tap-wise 3×3 convolution against candle's `conv2d` (im2col), which the parity tests in
    /// turn check against PyTorch: batch 2, non-square, channel counts that differ.
    #[test]
    fn conv3x3_taps_matches_candle_conv2d() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (n, c_in, c_out, h, w) in [(2, 5, 7, 6, 9), (1, 16, 8, 1, 1), (1, 3, 4, 13, 2)] {
            let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 1.0, c_out, &dev)?;
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let reference = Conv2d::new(wt.clone(), Some(b.clone()), cfg);
            let want = reference.forward(&x)?;
            let got = Conv(reference).forward(&x)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                diff < 1e-4,
                "max |diff| {diff} for {:?}",
                (n, c_in, c_out, h, w)
            );
        }
        Ok(())
    }

    #[test]
    fn conv_with_bf16_weights_matches_f32_within_rounding() -> candle_core::Result<()> {
        // bf16 weights, f32 input: MKL's bf16 taps where available, else a converted conv2d.
        let dev = Device::Cpu;
        for (n, c_in, c_out, h, w, k) in
            [(2, 5, 7, 6, 9, 3), (1, 16, 8, 3, 70, 3), (1, 6, 4, 5, 5, 1)]
        {
            let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, c_out, &dev)?;
            let cfg = Conv2dConfig {
                padding: k / 2,
                ..Default::default()
            };
            let want = Conv2d::new(wt.clone(), Some(b.clone()), cfg).forward(&x)?;
            let narrow = Conv2d::new(
                wt.to_dtype(DType::BF16)?,
                Some(b.to_dtype(DType::BF16)?),
                cfg,
            );
            let got = Conv(narrow).forward(&x)?;
            assert_eq!(got.dtype(), DType::F32);
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 0.02 * scale,
                "max |diff| {diff} of {scale} for {:?}",
                (n, c_in, c_out, h, w, k)
            );
        }
        Ok(())
    }

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
        for silu in [false, true] {
            let want = gn.forward(&x, &mut NormCtx::Local)?;
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
