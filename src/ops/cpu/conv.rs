//! The 3×3 convolution on the CPU as nine accumulated matrix products per band of output rows
//! ([`Conv3x3Taps`]): no im2col matrix at all, f32 weights through `sgemm` (MKL where linked,
//! candle's `gemm` crate otherwise) or bf16 weights through MKL.

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

use super::f32_slice;
use super::sgemm::sgemm;

/// 3×3 convolution, stride 1, padding 1, f32 on the CPU, as nine matrix products accumulated in
/// place: output `[c_out, y·(W+2) + x]` += `w[:, :, kh, kw]` · (the zero-padded input, flattened with
/// row length W+2, read from offset `kh·(W+2) + kw`). Each tap's input is a strided view of one padded
/// copy, so no im2col matrix is built; the two extra columns per row are dropped at the end.
/// candle's CPU `conv2d` builds im2col tiles with strided scalar copies and reached about a third of
/// its matmul rate on the VAE's shapes (benches/compare, "Profile").
pub(crate) struct Conv3x3Taps;

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
        let x = f32_slice(xs, xl, "conv3x3-taps")?;
        let bias = f32_slice(bs, bl, "conv3x3-taps")?;
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
        #[cfg(zturbo_mkl)]
        if let CpuStorage::BF16(wb) = ws {
            let out = taps_bf16(x, (n, c_in, h, w), &wb[w0..w1], bias)?;
            return Ok((CpuStorage::F32(out), Shape::from((n, c_out, h, w))));
        }
        let wt = &ws.as_slice::<f32>()?[w0..w1];
        // Per tap a contiguous [c_out, c_in] matrix (a row-major operand for `sgemm`).
        let taps = per_tap(wt, c_out, c_in, |v| v);
        let out = conv3x3_bands(x, (n, c_in, h, w), bias, as_is, |p| {
            sgemm(
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
        })?;
        Ok((CpuStorage::F32(out), Shape::from((n, c_out, h, w))))
    }
}

/// Accumulator elements per band of the tap-wise convolution (1 MiB of f32: fits a core's L2).
const ACC_BAND_ELEMS: usize = 1 << 18;

/// [`Conv3x3Taps`] with bf16 weights: the same nine accumulated products per band, with bf16
/// operands (weights regrouped per tap, the padded input rounded once) and f32 accumulation
/// through MKL.
#[cfg(zturbo_mkl)]
fn taps_bf16(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    wt: &[half::bf16],
    bias: &[f32],
) -> candle_core::Result<Vec<f32>> {
    let (c_in, c_out) = (dims.1, bias.len());
    let taps = per_tap(wt, c_out, c_in, |v| v.to_bits());
    fn rounded(p: &[f32]) -> Cow<'_, [u16]> {
        Cow::Owned(super::mkl::to_bf16(p))
    }
    conv3x3_bands(x, dims, bias, rounded, |p| {
        super::mkl::gemm(
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

/// A `[c_out, c_in, 3, 3]` weight regrouped as nine contiguous `[c_out, c_in]` matrices, one per
/// tap, each element mapped by `f`.
fn per_tap<T: Copy, U: Copy + Default>(
    wt: &[T],
    c_out: usize,
    c_in: usize,
    f: impl Fn(T) -> U,
) -> Vec<U> {
    let mut taps = vec![U::default(); 9 * c_out * c_in];
    for o in 0..c_out {
        for i in 0..c_in {
            for t in 0..9 {
                taps[(t * c_out + o) * c_in + i] = f(wt[(o * c_in + i) * 9 + t]);
            }
        }
    }
    taps
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

/// A 3×3, stride-1, padding-1 convolution as nine accumulated products per band of output rows.
/// Each band zero-pads its own slice of the input — the band's rows, one row above and two below
/// (so the last tap's view of the last row, two elements past it, stays inside), row length W+2 —
/// converted with `prepare`; its accumulator starts at the bias, `product` adds the nine taps, and
/// the rows are copied out without the two padding columns. Bands run in parallel and no padded
/// copy of the whole input exists (at 1024² a 128-channel input's would be 540 MB, alive beside the
/// input and the output); a band's input and accumulator stay in cache across its nine taps.
fn conv3x3_bands<P: Clone + Sync>(
    x: &[f32],
    (n, c_in, h, w): (usize, usize, usize, usize),
    bias: &[f32],
    prepare: impl for<'p> Fn(&'p [f32]) -> Cow<'p, [P]> + Sync,
    product: impl Fn(TapProduct<'_, P>) + Sync,
) -> candle_core::Result<Vec<f32>> {
    // Checked before every band: a cancelled job stops a large convolution within one band.
    let stop = crate::ops::interrupt::current();
    let c_out = bias.len();
    let row = w + 2;
    let band = (ACC_BAND_ELEMS / (c_out * row).max(1)).clamp(1, h.max(1));
    let bands = h.div_ceil(band);
    let mut out = vec![0f32; n * c_out * h * w];
    for item in 0..n {
        let src = &x[item * c_in * h * w..(item + 1) * c_in * h * w];
        let dst = SendPtr(out[item * c_out * h * w..].as_mut_ptr());
        let run_band = |b: usize, (acc, padded): &mut (Vec<f32>, Vec<f32>)| {
            if crate::ops::interrupt::is_set(&stop) {
                return;
            }
            let y0 = b * band;
            let rows = band.min(h - y0);
            let cols = rows * row;
            // Padded row r holds image row y0 + r − 1 (zeros outside the image).
            let plane = (rows + 3) * row;
            padded.clear();
            padded.resize(c_in * plane, 0.0);
            let first = y0.saturating_sub(1);
            let last = (y0 + rows + 1).min(h);
            for c in 0..c_in {
                for y in first..last {
                    let at = c * plane + (y + 1 - y0) * row + 1;
                    padded[at..at + w].copy_from_slice(&src[(c * h + y) * w..(c * h + y + 1) * w]);
                }
            }
            let prepared = prepare(&padded[..]);
            acc.clear();
            acc.resize(c_out * cols, 0.0);
            for (c, bv) in bias.iter().enumerate() {
                acc[c * cols..(c + 1) * cols].fill(*bv);
            }
            for tap in 0..9 {
                // offset ≤ 2·row + 2 and the band reads `cols` = rows·row columns per input row,
                // so the last index is at most (c_in − 1)·plane + (rows + 2)·row + 1 < c_in·plane.
                product(TapProduct {
                    tap,
                    offset: (tap / 3) * row + tap % 3,
                    cols,
                    plane,
                    padded: &prepared,
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
            .for_each_init(|| (Vec::new(), Vec::new()), |bufs, b| run_band(b, bufs));
        crate::ops::interrupt::check()?;
    }
    Ok(out)
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
