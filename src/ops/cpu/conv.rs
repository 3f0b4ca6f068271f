//! The 3×3 convolution on the CPU ([`Conv3x3Taps`]). f32 layers of 32+ channels each way run as
//! Winograd ([`winograd`]: F(4×4, 3×3) on maps of 64²+ pixels, F(2×2, 3×3) on 32²+) or as one
//! column-matrix product on smaller maps ([`im2col_gemm`]); the rest as nine accumulated matrix
//! products per band of output rows, no im2col matrix at all, f32 weights through `sgemm` (MKL
//! where linked, candle's `gemm` crate otherwise) or bf16 weights through MKL.

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

use super::f32_slice;
use super::sgemm::sgemm;
use super::winograd::{winograd, F2, F4};

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
        let dims = (n, c_in, h, w);
        let out = match f32_method(c_in, c_out, h * w) {
            Method::Winograd2 => Some(winograd::<F2>(x, dims, wt, bias)?),
            Method::Winograd4 => Some(winograd::<F4>(x, dims, wt, bias)?),
            Method::Im2col => Some(im2col_gemm(x, dims, wt, bias)?),
            Method::Taps => None,
        };
        if let Some(out) = out {
            return Ok((CpuStorage::F32(out), Shape::from((n, c_out, h, w))));
        }
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
    // At least one band per thread where the map has the rows (small maps: a UNet's 16², 8²).
    let per_thread = h.div_ceil(rayon::current_num_threads().max(1));
    let band = (ACC_BAND_ELEMS / (c_out * row).max(1)).clamp(1, per_thread.max(1));
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
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used for disjoint writes from the band tasks, while the buffer outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// How an f32 3×3 convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// Winograd F(2×2, 3×3) ([`winograd`] with [`F2`]): wide layers on maps of 32² to 64².
    Winograd2,
    /// Winograd F(4×4, 3×3) ([`winograd`] with [`F4`]): wide layers on maps of 64²+.
    Winograd4,
    /// [`im2col_gemm`]: wide layers on small maps (below 32²).
    Im2col,
    /// [`Conv3x3Taps`]' nine accumulated products: thin layers.
    Taps,
}

/// The method for `c_in → c_out` channels over `pixels` (per item); `ZTURBO_CONV3X3=winograd4|
/// winograd2|im2col|taps` forces one (for benchmarks; Winograd and im2col only on layers of 32+ channels
/// each way).
fn f32_method(c_in: usize, c_out: usize, pixels: usize) -> Method {
    static FORCED: std::sync::OnceLock<Option<Method>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| match std::env::var("ZTURBO_CONV3X3").as_deref() {
        Ok("winograd2") => Some(Method::Winograd2),
        Ok("winograd4" | "winograd") => Some(Method::Winograd4),
        Ok("im2col") => Some(Method::Im2col),
        Ok("taps") => Some(Method::Taps),
        _ => None,
    });
    let wide = c_in >= WINOGRAD_MIN_CHANNELS && c_out >= WINOGRAD_MIN_CHANNELS;
    match forced {
        Some(Method::Taps) => Method::Taps,
        Some(m) if wide => m,
        _ if !wide => Method::Taps,
        _ if pixels >= WINOGRAD4_MIN_PIXELS => Method::Winograd4,
        _ if pixels >= WINOGRAD_MIN_PIXELS => Method::Winograd2,
        _ => Method::Im2col,
    }
}

/// Column-matrix elements per band of [`im2col_gemm`] (64 MiB of f32).
const IM2COL_BAND_ELEMS: usize = 1 << 24;

/// A 3×3, stride-1, padding-1 convolution of a contiguous f32 `[n, c_in, h, w]` as one matrix
/// product per band of output rows: the band's column matrix `[c_in·9, rows·w]` (row `i·9 + t`
/// holds input channel `i` shifted by tap `t`, zeros outside the image) is built across the pool,
/// and `W[c_out, c_in·9]` — the weight exactly as stored, no regrouped copy — multiplies it with
/// the output channels split across the pool, writing straight into the output rows. For the
/// small maps of a UNet's deep levels (16², 8² at 512²: 1280–2560 channels, a few hundred
/// pixels): one product with K = 9·c_in keeps every thread busy where nine per-tap products of a
/// few hundred columns per band did not, and the weight (up to 118 MB) is read once per band
/// instead of being regrouped per call.
pub(crate) fn im2col_gemm(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    wt: &[f32],
    bias: &[f32],
) -> candle_core::Result<Vec<f32>> {
    im2col_gemm_in(x, dims, wt, bias, IM2COL_BAND_ELEMS)
}

/// [`im2col_gemm`] with bands of at most `band_elems` column-matrix elements (at least one row).
fn im2col_gemm_in(
    x: &[f32],
    (n, c_in, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    bias: &[f32],
    band_elems: usize,
) -> candle_core::Result<Vec<f32>> {
    use rayon::prelude::*;
    let c_out = bias.len();
    let k = c_in * 9;
    if wt.len() != c_out * k || x.len() != n * c_in * h * w {
        candle_core::bail!("im2col: weight or input length does not match its shape");
    }
    let hw = h * w;
    let mut out = vec![0f32; n * c_out * hw];
    if hw == 0 || c_out == 0 {
        return Ok(out);
    }
    let band = (band_elems / (k * w).max(1)).clamp(1, h);
    let mut cols = vec![0f32; k * band * w];
    let threads = rayon::current_num_threads().max(1);
    for item in 0..n {
        let src = &x[item * c_in * hw..(item + 1) * c_in * hw];
        let dst = &mut out[item * c_out * hw..(item + 1) * c_out * hw];
        for (ch, bv) in dst.chunks_mut(hw).zip(bias) {
            ch.fill(*bv);
        }
        let mut y0 = 0;
        while y0 < h {
            crate::ops::interrupt::check()?;
            let rows = band.min(h - y0);
            let span = rows * w;
            // Row i·9 + t of the column matrix: input channel i at offset (dy, dx) = (t/3 − 1,
            // t%3 − 1) for output rows y0 … y0 + rows.
            cols[..k * span]
                .par_chunks_mut(9 * span)
                .enumerate()
                .for_each(|(i, block)| {
                    let plane = &src[i * hw..(i + 1) * hw];
                    for (t, line) in block.chunks_mut(span).enumerate() {
                        let (dy, dx) = (t / 3, t % 3);
                        for r in 0..rows {
                            let out_row = &mut line[r * w..(r + 1) * w];
                            // Input row y0 + r + dy − 1.
                            let y = y0 + r + dy;
                            if y == 0 || y > h {
                                out_row.fill(0.0);
                                continue;
                            }
                            let inp = &plane[(y - 1) * w..y * w];
                            match dx {
                                0 => {
                                    out_row[0] = 0.0;
                                    out_row[1..].copy_from_slice(&inp[..w - 1]);
                                }
                                1 => out_row.copy_from_slice(inp),
                                _ => {
                                    out_row[..w - 1].copy_from_slice(&inp[1..]);
                                    out_row[w - 1] = 0.0;
                                }
                            }
                        }
                    }
                });
            // Output channels split across the pool, at least 32 rows per task.
            let per = c_out.div_ceil(threads).max(32);
            let cols = &cols[..k * span];
            let out_band = SendPtr(dst[y0 * w..].as_mut_ptr());
            (0..c_out.div_ceil(per)).into_par_iter().for_each(|task| {
                let o0 = task * per;
                let m = per.min(c_out - o0);
                // SAFETY: tasks write disjoint output channels (rows o0 … o0 + m of the band);
                // the last element written, ((o0 + m − 1)·hw + span) past the band's start, lies
                // inside this item's output because y0·w + span ≤ hw.
                let c = unsafe {
                    std::slice::from_raw_parts_mut(out_band.get().add(o0 * hw), (m - 1) * hw + span)
                };
                sgemm(m, span, k, &wt[o0 * k..], k, cols, span, false, c, hw, 1.0);
            });
            y0 += rows;
        }
    }
    Ok(out)
}

/// f32 3×3 convolutions with at least this many input and output channels run as
/// Winograd or a column matrix; thinner ones (a decoder's `conv_in`/`conv_out`) as nine taps, where the
/// transforms would cost more than the products they save.
const WINOGRAD_MIN_CHANNELS: usize = 32;

/// … and at least this many pixels: below, the kernels' transform (16·c_in·c_out values per
/// call) and products only a few tiles wide cost more than they save, and [`im2col_gemm`] runs
/// them (compare_ops at 512², 2 threads, Zen 4, ms: 1280→1280 at 16² Winograd 54, column matrix
/// 35, taps 76; at 8² 43 / 8.8 / 56; 640→640 at 32² Winograd 27, column matrix 44, taps 56).
const WINOGRAD_MIN_PIXELS: usize = 32 * 32;

/// … and from this many pixels F(4×4, 3×3) rather than F(2×2, 3×3): compare_ops at 512², 2
/// threads, Zen 4, F(2×2) → F(4×4), ms: 256→256 at 128² 110 → 55, 128→128 at 512² 314 → 196,
/// 256→256 at 256² 270 → 173, 128→64 at 512² 183 → 136; at 32², 640→640 25 → 31 (the larger
/// tiles' padding and transforms outweigh the products they save on a map 8 tiles wide).
const WINOGRAD4_MIN_PIXELS: usize = 64 * 64;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};
    use candle_nn::{Conv2d, Conv2dConfig};

    /// A random 3×3 convolution `(n, c_in, c_out, h, w)` as flat vectors — input, weight, bias —
    /// and candle's direct `conv2d` of it (the reference the parity tests check against PyTorch).
    pub(crate) type Case = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

    pub(crate) fn reference(dims: (usize, usize, usize, usize, usize)) -> Case {
        let (n, c_in, c_out, h, w) = dims;
        let dev = Device::Cpu;
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, c_out, &dev).unwrap();
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let want = Conv2d::new(wt.clone(), Some(b.clone()), cfg)
            .forward(&x)
            .unwrap();
        (flat(&x), flat(&wt), flat(&b), flat(&want))
    }

    /// Largest |got − want| relative to the output's scale (at least 1) and √c_in.
    pub(crate) fn rel_error(got: &[f32], want: &[f32], c_in: usize) -> f32 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / (scale * (c_in as f32).sqrt())
    }

    /// The column-matrix product against candle's direct `conv2d`, whole and in bands of one row
    /// and of a few rows (the last one partial), batch 2, one-pixel and one-column maps.
    #[test]
    fn im2col_bands_match_candle_conv2d() -> candle_core::Result<()> {
        for dims in [
            (2, 5, 7, 6, 9),
            (1, 40, 33, 1, 1),
            (1, 3, 70, 11, 1),
            (2, 6, 3, 9, 13),
        ] {
            let (n, c_in, _, h, w) = dims;
            let (xs, ws, bs, want) = reference(dims);
            let k = c_in * 9;
            for band_elems in [usize::MAX, k * w, 4 * k * w] {
                let got = im2col_gemm_in(&xs, (n, c_in, h, w), &ws, &bs, band_elems)?;
                let e = rel_error(&got, &want, c_in);
                assert!(
                    e < 2e-6,
                    "relative error {e} for {dims:?}, bands of {band_elems}"
                );
            }
        }
        Ok(())
    }
}
