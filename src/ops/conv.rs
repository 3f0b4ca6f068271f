//! 2-D convolutions with zturbo's CPU fast paths. A same-padded, stride-1 convolution with a bias
//! on an f32 input runs, for 3×3 (ops/cpu/conv.rs), as Winograd on wide layers over maps of 32²+
//! pixels (F(4×4, 3×3) from 64²), as one column-matrix product on wide layers over smaller maps,
//! and as nine in-place matrix products otherwise (and for bf16 weights on a bf16-ready CPU); as
//! one matrix product per item for 1×1; everything else is candle's `conv2d`, optionally in row
//! bands so that its im2col buffer stays bounded.

use std::borrow::Cow;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use super::cpu::conv::Conv3x3Taps;
use super::linear;

/// A convolution with the fast paths above. `banded`: candle's fallback runs in row bands of at
/// most [`CONV_BAND_ELEMS`] im2col values (stride-1, same-padded convolutions only; the VAE's,
/// whose full-resolution layers would otherwise build gigabytes of im2col at 1024²).
#[derive(Debug, Clone)]
pub struct Conv {
    inner: Conv2d,
    banded: bool,
}

impl Conv {
    pub fn new(inner: Conv2d, banded: bool) -> Self {
        Self { inner, banded }
    }

    /// A k×k convolution with bias, stride 1 and padding k/2 (a decoder's), banded.
    pub fn same(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig {
            padding: k / 2,
            ..Default::default()
        };
        Ok(Self::new(candle_nn::conv2d(cin, cout, k, cfg, vb)?, true))
    }

    pub fn inner(&self) -> &Conv2d {
        &self.inner
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // A cancelled job stops here rather than after the whole decode (or denoiser call).
        super::interrupt::check()?;
        if let Some(y) = conv_fast(&self.inner, x)? {
            return Ok(y);
        }
        // Weights stored narrower than the activations (bf16 on a CPU) reach here only for small
        // or strided layers (a 1×1 shortcut, post_quant_conv, the UNet's downsamplers): converted
        // for the call.
        let conv = in_dtype(&self.inner, x.dtype())?;
        if self.banded {
            conv_banded(conv.as_ref(), x)
        } else {
            x.apply(conv.as_ref())
        }
    }
}

/// `conv` with its weight and bias in `dtype`: itself when they already are, else a converted copy
/// for one call (bf16 weights under f32 activations where no fast path applies).
fn in_dtype(conv: &Conv2d, dtype: DType) -> candle_core::Result<Cow<'_, Conv2d>> {
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
/// `None` where neither applies (the caller runs candle's `conv2d`).
pub fn conv_fast(conv: &Conv2d, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
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
    if k[0] == 3 && (w.dtype() == DType::F32 || (w.dtype() == DType::BF16 && linear::bf16_ready()))
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
        let y = linear::matmul(&w2, &xm, bf16)?;
        let bias = b.to_dtype(DType::F32)?.reshape((1, c_out, 1))?;
        return Ok(Some(y.broadcast_add(&bias)?.reshape((n, c_out, h, wd))?));
    }
    Ok(None)
}

/// Largest im2col buffer one convolution call may build, in elements. candle lowers a convolution
/// to one im2col matrix of `H·W × Cin·k²` for the whole image — 1.2 GB for a 128-channel 3×3 conv
/// at 512², 4.5 GB at 1024² — so large convolutions run in row bands that each stay under this.
pub const CONV_BAND_ELEMS: usize = 16 << 20;

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
        super::interrupt::check()?;
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
    /// turn check against PyTorch: batch 2, non-square, channel counts that differ, images wide
    /// enough to split into several bands (13 rows and a partial one; bands of one row), and the
    /// Winograd and column-matrix paths. Tolerance relative to the output's scale (sums of up to
    /// 576 products).
    #[test]
    fn conv3x3_taps_matches_candle_conv2d() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (n, c_in, c_out, h, w) in [
            (2, 5, 7, 6, 9),
            (1, 16, 8, 1, 1),
            (1, 3, 4, 13, 2),
            (1, 3, 64, 40, 300),
            (2, 4, 200, 5, 700),
            // Winograd (32+ channels each way; F(4×4, 3×3) from 64² pixels, F(2×2, 3×3) from 32²):
            // odd sides (a last partial tile), batch 2, and bands of one tile row.
            (2, 33, 40, 65, 67),
            (1, 32, 48, 1, 1),
            (1, 64, 32, 20, 601),
            (1, 40, 32, 33, 40),
            // Below 32² pixels with 32+ channels each way: the column-matrix product.
            (2, 40, 36, 7, 9),
            (1, 33, 64, 16, 16),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 1.0, c_out, &dev)?;
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let reference = Conv2d::new(wt.clone(), Some(b.clone()), cfg);
            let want = reference.forward(&x)?;
            let got = Conv::new(reference, true).forward(&x)?;
            assert_eq!(got.dims(), want.dims());
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                diff < 2e-6 * scale * (c_in as f32).sqrt(),
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
        for (n, c_in, c_out, h, w, k) in [
            (2, 5, 7, 6, 9, 3),
            (1, 16, 8, 3, 70, 3),
            (1, 6, 4, 5, 5, 1),
            (1, 3, 64, 40, 300, 3),
        ] {
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
            let got = Conv::new(narrow, true).forward(&x)?;
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
}
