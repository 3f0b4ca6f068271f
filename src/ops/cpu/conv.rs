//! The 3×3 convolution on the CPU as nine accumulated matrix products per band of output rows
//! ([`Conv3x3Taps`]): no im2col matrix at all, f32 weights through `sgemm` (MKL where linked,
//! candle's `gemm` crate otherwise) or bf16 weights through MKL.

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

use super::sgemm::sgemm;
use super::{f32_slice, with_avx512};

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
        if c_in >= WINOGRAD_MIN_CHANNELS
            && c_out >= WINOGRAD_MIN_CHANNELS
            && h * w >= WINOGRAD_MIN_PIXELS
        {
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

/// … and at least this many pixels: the kernels' transform (16·c_in·c_out values per call) and
/// products only a few tiles wide cost more than they save on small maps (a UNet's 16² and 8²
/// levels ran at 12–45 GFLOP/s).
const WINOGRAD_MIN_PIXELS: usize = 64 * 64;

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
    // U[o][ξ][i], ξ = 4·row + column of the 4×4 transformed kernel: U[ξ] is the `[c_out, c_in]`
    // matrix at offset ξ·c_in with row stride 16·c_in. One output channel per task.
    let mut u = vec![0f32; 16 * c_out * c_in];
    let kernel = |o: usize, ur: &mut [f32]| {
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
                    ur[(r * 4 + c) * c_in + i] = *v;
                }
            }
        }
    };
    {
        use rayon::prelude::*;
        u.par_chunks_mut(16 * c_in)
            .enumerate()
            .for_each(|(o, ur)| kernel(o, ur));
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let band = (WINOGRAD_BAND_TILES / tw).clamp(1, th);
    let bands = th.div_ceil(band);
    // A padded input row (x = −1 … 2·tw) split into its even and odd positions: `lane` each.
    let lane = tw + 1;
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
            rows.resize(16 * lane, 0.0);
            let (d, scratch) = rows.split_at_mut(8 * lane);
            for i in 0..c_in {
                let plane = &src[i * h * w..(i + 1) * h * w];
                for ty in 0..tys {
                    // The tile row's four padded input rows (image rows 2·(ty0+ty) − 1 + r),
                    // even positions in d[..4·lane], odd ones in d[4·lane..]: padded position p
                    // holds image column p − 1.
                    let (even, odd) = d.split_at_mut(4 * lane);
                    for r in 0..4 {
                        let (de, dodd) = (
                            &mut even[r * lane..(r + 1) * lane],
                            &mut odd[r * lane..(r + 1) * lane],
                        );
                        de.fill(0.0);
                        dodd.fill(0.0);
                        let y = 2 * (ty0 + ty) + r;
                        if y >= 1 && y - 1 < h {
                            let line = &plane[(y - 1) * w..y * w];
                            for (c, pair) in line.chunks(2).enumerate() {
                                dodd[c] = pair[0];
                                if let Some(v) = pair.get(1) {
                                    de[c + 1] = *v;
                                }
                            }
                        }
                    }
                    let mut rest = &mut v[i * tiles + ty * tw..];
                    let mut segs: [&mut [f32]; 16] = std::array::from_fn(|xi| {
                        let take = if xi < 15 { c_in * tiles } else { tw };
                        let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
                        rest = tail;
                        &mut head[..tw]
                    });
                    wino_in(even, odd, lane, tw, scratch, &mut segs);
                }
            }
            m.clear();
            m.resize(16 * c_out * tiles, 0.0);
            // The 16 products are independent: across the pool too, so that a map of fewer bands
            // than threads still uses every thread.
            use rayon::prelude::*;
            m.par_chunks_mut(c_out * tiles)
                .zip(v.par_chunks(c_in * tiles))
                .enumerate()
                .for_each(|(xi, (mx, vx))| {
                    let ux = &u[xi * c_in..];
                    sgemm(
                        c_out,
                        tiles,
                        c_in,
                        ux,
                        16 * c_in,
                        vx,
                        tiles,
                        false,
                        mx,
                        tiles,
                        0.0,
                    );
                });
            // Aᵀ·M·A + bias, two output rows per tile row.
            for (o, bv) in bias.iter().enumerate() {
                for ty in 0..tys {
                    let mm: [&[f32]; 16] =
                        std::array::from_fn(|xi| &m[(xi * c_out + o) * tiles + ty * tw..][..tw]);
                    let y = 2 * (ty0 + ty);
                    let pair = (h - y).min(2);
                    // SAFETY: bands cover disjoint output rows of every channel, inside this
                    // item's `c_out·h·w` output; rows y and y + 1 (when inside the image).
                    let lines = unsafe {
                        std::slice::from_raw_parts_mut(dst.get().add((o * h + y) * w), pair * w)
                    };
                    let (l0, l1) = lines.split_at_mut(w);
                    wino_out(&mm, tw, *bv, rows, l0, l1);
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

with_avx512!(fn wino_in(even: &[f32], odd: &[f32], lane: usize, tw: usize, scratch: &mut [f32], out: &mut [&mut [f32]; 16]) => wino_in_plain);

/// `V = Bᵀ·d·B` for one tile row of one channel: `even`/`odd` hold the four padded input rows'
/// even and odd positions (`lane` = tw + 1 each); `out[ξ]` gets the tw tiles' element ξ.
#[inline(always)]
fn wino_in_plain(
    even: &[f32],
    odd: &[f32],
    lane: usize,
    tw: usize,
    scratch: &mut [f32],
    out: &mut [&mut [f32]; 16],
) {
    // Bᵀ·d over the rows, for the even and the odd positions.
    let (te, to) = scratch[..8 * lane].split_at_mut(4 * lane);
    for (d, t) in [(even, te), (odd, to)] {
        let (r0, r1, r2, r3) = (
            &d[..lane],
            &d[lane..2 * lane],
            &d[2 * lane..3 * lane],
            &d[3 * lane..4 * lane],
        );
        let (t0, rest) = t.split_at_mut(lane);
        let (t1, rest) = rest.split_at_mut(lane);
        let (t2, t3) = rest.split_at_mut(lane);
        for c in 0..lane {
            t0[c] = r0[c] - r2[c];
            t1[c] = r1[c] + r2[c];
            t2[c] = r2[c] - r1[c];
            t3[c] = r1[c] - r3[c];
        }
    }
    let (te, to) = scratch[..8 * lane].split_at(4 * lane);
    // ·B per tile: padded columns 2·tx … 2·tx + 3 are even[tx], odd[tx], even[tx+1], odd[tx+1].
    for k in 0..4 {
        let (ea, eb) = (
            &te[k * lane..k * lane + tw],
            &te[k * lane + 1..k * lane + 1 + tw],
        );
        let (oa, ob) = (
            &to[k * lane..k * lane + tw],
            &to[k * lane + 1..k * lane + 1 + tw],
        );
        for ((v, a), b) in out[4 * k].iter_mut().zip(ea).zip(eb) {
            *v = a - b;
        }
        for ((v, a), b) in out[4 * k + 1].iter_mut().zip(oa).zip(eb) {
            *v = a + b;
        }
        for ((v, a), b) in out[4 * k + 2].iter_mut().zip(eb).zip(oa) {
            *v = a - b;
        }
        for ((v, a), b) in out[4 * k + 3].iter_mut().zip(oa).zip(ob) {
            *v = a - b;
        }
    }
}

with_avx512!(fn wino_out(m: &[&[f32]; 16], tw: usize, bias: f32, scratch: &mut [f32], l0: &mut [f32], l1: &mut [f32]) => wino_out_plain);

/// `Y = Aᵀ·M·A + bias` for one tile row of one output channel: `m[ξ]` holds the tw tiles' element
/// ξ; the two output rows go to `l0` and `l1` (empty past the image's last row), each w ≤ 2·tw
/// long.
#[inline(always)]
fn wino_out_plain(
    m: &[&[f32]; 16],
    tw: usize,
    bias: f32,
    scratch: &mut [f32],
    l0: &mut [f32],
    l1: &mut [f32],
) {
    // Aᵀ·M: s[a][j] over the tiles (8 rows of tw), then ·A into even/odd output columns.
    let (s, yy) = scratch[..16 * tw].split_at_mut(8 * tw);
    for j in 0..4 {
        let (m0, m1, m2, m3) = (m[j], m[4 + j], m[8 + j], m[12 + j]);
        let (top, bottom) = s.split_at_mut(4 * tw);
        let s0 = &mut top[j * tw..(j + 1) * tw];
        for (((v, a), b), c) in s0.iter_mut().zip(m0).zip(m1).zip(m2) {
            *v = a + b + c;
        }
        let s1 = &mut bottom[j * tw..(j + 1) * tw];
        for (((v, a), b), c) in s1.iter_mut().zip(m1).zip(m2).zip(m3) {
            *v = a - b - c;
        }
    }
    for (a, line) in [l0, l1].into_iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        let q = &s[a * 4 * tw..(a + 1) * 4 * tw];
        let (q0, q1, q2, q3) = (&q[..tw], &q[tw..2 * tw], &q[2 * tw..3 * tw], &q[3 * tw..]);
        let (ye, yo) = yy.split_at_mut(4 * tw);
        let (ye, yo) = (&mut ye[..tw], &mut yo[..tw]);
        for (((v, a), b), c) in ye.iter_mut().zip(q0).zip(q1).zip(q2) {
            *v = a + b + c + bias;
        }
        for (((v, a), b), c) in yo.iter_mut().zip(q1).zip(q2).zip(q3) {
            *v = a - b - c + bias;
        }
        for (pair, (e, o)) in line.chunks_mut(2).zip(ye.iter().zip(yo.iter())) {
            pair[0] = *e;
            if let Some(p) = pair.get_mut(1) {
                *p = *o;
            }
        }
    }
}
