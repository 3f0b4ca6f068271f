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
        if c_in >= WINOGRAD_MIN_CHANNELS && c_out >= WINOGRAD_MIN_CHANNELS {
            let out = winograd_f2x3(x, (n, c_in, h, w), wt, bias)?;
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

/// f32 3×3 convolutions with at least this many input and output channels run as
/// [`winograd_f2x3`]; thinner ones (a decoder's `conv_in`/`conv_out`) as nine taps, where the
/// transforms would cost more than the products they save.
const WINOGRAD_MIN_CHANNELS: usize = 32;

/// Tiles per band of [`winograd_f2x3`]: wide enough for efficient products (N of each GEMM), small
/// enough that a band's transformed input and products stay a few MiB.
const WINOGRAD_BAND_TILES: usize = 256;

/// A 3×3, stride-1, padding-1 convolution of a contiguous f32 `[n, c_in, h, w]` by Winograd's
/// F(2×2, 3×3): each 2×2 block of outputs comes from a 4×4 block of the zero-padded input, and in
/// the transformed domain the 9 taps × 4 outputs of direct convolution (36 multiplies) become 16
/// element-wise products — here 16 matrix products `U[ξ] · V[ξ]` (`[c_out, c_in]` ·
/// `[c_in, tiles]`), 2.25× fewer multiply-adds than [`Conv3x3Taps`]'s nine.
///
/// `U = G·g·Gᵀ` per (output, input) channel pair, once per call (the weights are small next to the
/// image); per band of tile rows, `V = Bᵀ·d·B` per input channel and tile, computed row-wise (the
/// vertical combination over whole padded rows, then the horizontal one per tile: contiguous
/// writes over tiles), the 16 products, then `Y = Aᵀ·M·A` + bias written out. Bands run in
/// parallel. With G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1], Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1],
/// Aᵀ = [1 1 1 0; 0 1 −1 −1] the transforms only add, subtract and halve, so the rounding error
/// stays at a few ulps of the sums (tests compare against candle's direct convolution).
pub(crate) fn winograd_f2x3(
    x: &[f32],
    (n, c_in, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    bias: &[f32],
) -> candle_core::Result<Vec<f32>> {
    let stop = crate::ops::interrupt::current();
    let c_out = bias.len();
    if wt.len() != c_out * c_in * 9 || x.len() != n * c_in * h * w {
        candle_core::bail!("winograd: weight or input length does not match its shape");
    }
    let mut out = vec![0f32; n * c_out * h * w];
    if h == 0 || w == 0 || c_out == 0 {
        return Ok(out);
    }
    // U[ξ][o][i], ξ = 4·row + column of the 4×4 transformed kernel.
    let mut u = vec![0f32; 16 * c_out * c_in];
    for o in 0..c_out {
        for i in 0..c_in {
            let g = &wt[(o * c_in + i) * 9..(o * c_in + i + 1) * 9];
            // G·g: 4 rows of 3.
            let mut gg = [[0f32; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                gg[0][c] = g0;
                gg[1][c] = 0.5 * (g0 + g1 + g2);
                gg[2][c] = 0.5 * (g0 - g1 + g2);
                gg[3][c] = g2;
            }
            for (r, row) in gg.iter().enumerate() {
                let (a0, a1, a2) = (row[0], row[1], row[2]);
                let t = [a0, 0.5 * (a0 + a1 + a2), 0.5 * (a0 - a1 + a2), a2];
                for (c, v) in t.iter().enumerate() {
                    u[((r * 4 + c) * c_out + o) * c_in + i] = *v;
                }
            }
        }
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let band = (WINOGRAD_BAND_TILES / tw).clamp(1, th);
    let bands = th.div_ceil(band);
    // A padded input row: x = −1 … 2·tw (zeros outside the image).
    let prow = 2 * tw + 2;
    for item in 0..n {
        let src = &x[item * c_in * h * w..(item + 1) * c_in * h * w];
        let dst = SendPtr(out[item * c_out * h * w..].as_mut_ptr());
        let run_band = |b: usize, (v, m, rows): &mut (Vec<f32>, Vec<f32>, Vec<f32>)| {
            if crate::ops::interrupt::is_set(&stop) {
                return;
            }
            let ty0 = b * band;
            let tys = band.min(th - ty0);
            let tiles = tys * tw;
            v.clear();
            v.resize(16 * c_in * tiles, 0.0);
            rows.clear();
            rows.resize(8 * prow, 0.0);
            let (d, t) = rows.split_at_mut(4 * prow);
            for i in 0..c_in {
                let plane = &src[i * h * w..(i + 1) * h * w];
                for ty in 0..tys {
                    // The tile row's four padded input rows: image rows 2·(ty0+ty) − 1 + r.
                    for r in 0..4 {
                        let dr = &mut d[r * prow..(r + 1) * prow];
                        dr.fill(0.0);
                        let y = 2 * (ty0 + ty) + r;
                        if y >= 1 && y - 1 < h {
                            dr[1..w + 1].copy_from_slice(&plane[(y - 1) * w..y * w]);
                        }
                    }
                    // Bᵀ·d over whole rows.
                    let (d0, rest) = d.split_at(prow);
                    let (d1, rest) = rest.split_at(prow);
                    let (d2, d3) = rest.split_at(prow);
                    for c in 0..prow {
                        t[c] = d0[c] - d2[c];
                        t[prow + c] = d1[c] + d2[c];
                        t[2 * prow + c] = d2[c] - d1[c];
                        t[3 * prow + c] = d1[c] - d3[c];
                    }
                    // ·B per tile: column block 2·tx … 2·tx + 3.
                    for k in 0..4 {
                        let tr = &t[k * prow..(k + 1) * prow];
                        let at = |j: usize| ((k * 4 + j) * c_in + i) * tiles + ty * tw;
                        let (o0, o1, o2, o3) = (at(0), at(1), at(2), at(3));
                        for tx in 0..tw {
                            let c = 2 * tx;
                            let (e0, e1, e2, e3) = (tr[c], tr[c + 1], tr[c + 2], tr[c + 3]);
                            v[o0 + tx] = e0 - e2;
                            v[o1 + tx] = e1 + e2;
                            v[o2 + tx] = e2 - e1;
                            v[o3 + tx] = e1 - e3;
                        }
                    }
                }
            }
            m.clear();
            m.resize(16 * c_out * tiles, 0.0);
            for xi in 0..16 {
                sgemm(
                    c_out,
                    tiles,
                    c_in,
                    &u[xi * c_out * c_in..(xi + 1) * c_out * c_in],
                    c_in,
                    &v[xi * c_in * tiles..(xi + 1) * c_in * tiles],
                    tiles,
                    false,
                    &mut m[xi * c_out * tiles..(xi + 1) * c_out * tiles],
                    tiles,
                    0.0,
                );
            }
            // Aᵀ·M·A + bias, two output rows per tile row.
            let (s, _) = rows.split_at_mut(4 * prow);
            for (o, bv) in bias.iter().enumerate() {
                for ty in 0..tys {
                    let mrow = |xi: usize| &m[(xi * c_out + o) * tiles + ty * tw..][..tw];
                    for j in 0..4 {
                        let (m0, m1, m2, m3) = (mrow(j), mrow(4 + j), mrow(8 + j), mrow(12 + j));
                        let (top, bottom) = s.split_at_mut(2 * prow);
                        let s0 = &mut top[j * tw..(j + 1) * tw];
                        for tx in 0..tw {
                            s0[tx] = m0[tx] + m1[tx] + m2[tx];
                        }
                        let s1 = &mut bottom[j * tw..(j + 1) * tw];
                        for tx in 0..tw {
                            s1[tx] = m1[tx] - m2[tx] - m3[tx];
                        }
                    }
                    for a in 0..2 {
                        let y = 2 * (ty0 + ty) + a;
                        if y >= h {
                            break;
                        }
                        let sa = &s[a * 2 * prow..a * 2 * prow + 4 * tw];
                        let (q0, q1, q2, q3) = (
                            &sa[..tw],
                            &sa[tw..2 * tw],
                            &sa[2 * tw..3 * tw],
                            &sa[3 * tw..],
                        );
                        // SAFETY: bands cover disjoint output rows of every channel, inside this
                        // item's `c_out·h·w` output; each row is written w elements.
                        let line = unsafe {
                            std::slice::from_raw_parts_mut(dst.get().add((o * h + y) * w), w)
                        };
                        for tx in 0..tw {
                            let x0 = 2 * tx;
                            line[x0] = q0[tx] + q1[tx] + q2[tx] + bv;
                            if x0 + 1 < w {
                                line[x0 + 1] = q1[tx] - q2[tx] - q3[tx] + bv;
                            }
                        }
                    }
                }
            }
        };
        use rayon::prelude::*;
        (0..bands).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |bufs, b| run_band(b, bufs),
        );
        crate::ops::interrupt::check()?;
    }
    Ok(out)
}
