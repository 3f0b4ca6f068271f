//! Winograd's minimal filtering for f32 3×3 convolutions (stride 1, padding 1) on the CPU: each
//! m×m block of outputs comes from an α×α block of the zero-padded input (α = m + 2), and in the
//! transformed domain the 9·m² multiplies of direct convolution become α² element-wise products —
//! here α² matrix products `U[ξ] · V[ξ]` (`[c_out, c_in]` · `[c_in, tiles]`).
//!
//! - [`F2`], F(2×2, 3×3): 16 products for 4 outputs, 2.25× fewer multiply-adds than direct;
//!   transforms that only add, subtract and halve.
//! - [`F4`], F(4×4, 3×3): 36 products for 16 outputs, 4× fewer; transforms with small integer
//!   factors (up to 8) and a kernel transform with sixths and twenty-fourths, so its rounding error
//!   is a few times F(2×2)'s — still around 1e-6 of the output's scale in f32 (tests compare both
//!   against candle's direct convolution).
//!
//! One driver ([`winograd`]) serves both: `U = G·g·Gᵀ` per (output, input) channel pair, once per
//! call; per band of tile rows, `V = Bᵀ·d·B` per input channel and tile row, computed row-wise
//! over whole padded rows split into m phase lanes (padded position 4j + φ at lane φ, index j, for
//! m = 4), so every pass reads and writes contiguous runs over the tiles; the α² products; then
//! `Y = Aᵀ·M·A` + bias written out. Bands run in parallel, and so do a band's products.

use super::conv::SendPtr;
use super::sgemm::sgemm;
use super::with_avx512;

/// One Winograd tiling: the transforms of F(m×m, 3×3).
pub(crate) trait Tiling {
    /// Output tile side m.
    const OUT: usize;
    /// Transformed tile side α = m + 2.
    const ALPHA: usize = Self::OUT + 2;
    /// Tiles per band: wide enough for efficient products (N of each GEMM), small enough that a
    /// band's transformed input and products stay a few MiB.
    const BAND_TILES: usize;
    /// `G·g·Gᵀ` of one 3×3 kernel `g` (row-major): element ξ written to `u[ξ·stride]`.
    fn kernel(g: &[f32], u: &mut [f32], stride: usize);
    /// `V = Bᵀ·d·B` for one tile row of one channel. `d` holds the α padded input rows in m phase
    /// lanes, `[φ][r][lane]`; `out[ξ]` gets the `tw` tiles' element ξ.
    fn input(d: &[f32], lane: usize, tw: usize, scratch: &mut [f32], out: &mut [&mut [f32]]);
    /// `Y = Aᵀ·M·A + bias` for one tile row of one output channel: `m[ξ]` holds the tiles'
    /// element ξ; output row a goes to `lines[a]` (empty past the image's last row), each at most
    /// m·tw long.
    fn output(m: &[&[f32]], tw: usize, bias: f32, scratch: &mut [f32], lines: &mut [&mut [f32]]);
}

/// F(2×2, 3×3). G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1], Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1],
/// Aᵀ = [1 1 1 0; 0 1 −1 −1].
pub(crate) struct F2;

impl Tiling for F2 {
    const OUT: usize = 2;
    const BAND_TILES: usize = 256;

    fn kernel(g: &[f32], u: &mut [f32], stride: usize) {
        // G·g: 4 rows of 3, then ·Gᵀ.
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
                u[(r * 4 + c) * stride] = *v;
            }
        }
    }

    fn input(d: &[f32], lane: usize, tw: usize, scratch: &mut [f32], out: &mut [&mut [f32]]) {
        let (even, odd) = d[..8 * lane].split_at(4 * lane);
        wino2_in(even, odd, lane, tw, scratch, out)
    }

    fn output(m: &[&[f32]], tw: usize, bias: f32, scratch: &mut [f32], lines: &mut [&mut [f32]]) {
        let (l0, l1) = lines.split_at_mut(1);
        wino2_out(m, tw, bias, scratch, l0[0], l1[0])
    }
}

/// F(4×4, 3×3) with interpolation points 0, ±1, ±2, ∞: G = [¼ 0 0; −⅙ −⅙ −⅙; −⅙ ⅙ −⅙;
/// 1⁄24 1⁄12 ⅙; 1⁄24 −1⁄12 ⅙; 0 0 1], Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0;
/// 0 −2 −1 2 1 0; 0 2 −1 −2 1 0; 0 4 0 −5 0 1], Aᵀ = [1 1 1 1 1 0; 0 1 −1 2 −2 0; 0 1 1 4 4 0;
/// 0 1 −1 8 −8 1].
pub(crate) struct F4;

impl Tiling for F4 {
    const OUT: usize = 4;
    const BAND_TILES: usize = 128;

    fn kernel(g: &[f32], u: &mut [f32], stride: usize) {
        let gt = |a: f32, b: f32, c: f32| {
            [
                0.25 * a,
                -(a + b + c) / 6.0,
                -(a - b + c) / 6.0,
                a / 24.0 + b / 12.0 + c / 6.0,
                a / 24.0 - b / 12.0 + c / 6.0,
                c,
            ]
        };
        // G·g: 6 rows of 3 (per kernel column), then ·Gᵀ per row.
        let mut gg = [[0f32; 3]; 6];
        for c in 0..3 {
            let col = gt(g[c], g[3 + c], g[6 + c]);
            for (r, v) in col.iter().enumerate() {
                gg[r][c] = *v;
            }
        }
        for (r, row) in gg.iter().enumerate() {
            for (c, v) in gt(row[0], row[1], row[2]).iter().enumerate() {
                u[(r * 6 + c) * stride] = *v;
            }
        }
    }

    fn input(d: &[f32], lane: usize, tw: usize, scratch: &mut [f32], out: &mut [&mut [f32]]) {
        wino4_in(d, lane, tw, scratch, out)
    }

    fn output(m: &[&[f32]], tw: usize, bias: f32, scratch: &mut [f32], lines: &mut [&mut [f32]]) {
        wino4_out(m, tw, bias, scratch, lines)
    }
}

/// A 3×3, stride-1, padding-1 convolution of a contiguous f32 `[n, c_in, h, w]` with weights
/// `[c_out, c_in, 3, 3]` and a bias, by the tiling `T`.
pub(crate) fn winograd<T: Tiling>(
    x: &[f32],
    (n, c_in, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    bias: &[f32],
) -> candle_core::Result<Vec<f32>> {
    use rayon::prelude::*;
    let (m_out, alpha) = (T::OUT, T::ALPHA);
    let xis = alpha * alpha;
    let stop = crate::ops::interrupt::current();
    let c_out = bias.len();
    if wt.len() != c_out * c_in * 9 || x.len() != n * c_in * h * w {
        candle_core::bail!("winograd: weight or input length does not match its shape");
    }
    let mut out = vec![0f32; n * c_out * h * w];
    if h == 0 || w == 0 || c_out == 0 {
        return Ok(out);
    }
    // U[o][ξ][i]: U[ξ] is the `[c_out, c_in]` matrix at offset ξ·c_in with row stride α²·c_in.
    // One output channel per task.
    let mut u = vec![0f32; xis * c_out * c_in];
    u.par_chunks_mut(xis * c_in)
        .enumerate()
        .for_each(|(o, ur)| {
            for i in 0..c_in {
                T::kernel(
                    &wt[(o * c_in + i) * 9..(o * c_in + i + 1) * 9],
                    &mut ur[i..],
                    c_in,
                );
            }
        });
    let (th, tw) = (h.div_ceil(m_out), w.div_ceil(m_out));
    let band = (T::BAND_TILES / tw).clamp(1, th);
    let bands = th.div_ceil(band);
    // A padded input row (positions 0 … m·(tw + 1) − 1; position p holds image column p − 1)
    // split into m phase lanes: position m·j + φ at lane φ, index j.
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
            v.resize(xis * c_in * tiles, 0.0);
            rows.clear();
            rows.resize(2 * xis * lane, 0.0);
            let (d, scratch) = rows.split_at_mut(xis * lane);
            let d = &mut d[..m_out * alpha * lane];
            for i in 0..c_in {
                let plane = &src[i * h * w..(i + 1) * h * w];
                for ty in 0..tys {
                    // The tile row's α padded input rows: image rows m·(ty0 + ty) − 1 + r.
                    d.fill(0.0);
                    for r in 0..alpha {
                        let y = m_out * (ty0 + ty) + r;
                        if y < 1 || y > h {
                            continue;
                        }
                        let line = &plane[(y - 1) * w..y * w];
                        for (c, v) in line.iter().enumerate() {
                            let p = c + 1;
                            d[((p % m_out) * alpha + r) * lane + p / m_out] = *v;
                        }
                    }
                    let mut rest = &mut v[i * tiles + ty * tw..];
                    let mut segs: Vec<&mut [f32]> = (0..xis)
                        .map(|xi| {
                            let take = if xi + 1 < xis { c_in * tiles } else { tw };
                            let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
                            rest = tail;
                            &mut head[..tw]
                        })
                        .collect();
                    T::input(d, lane, tw, scratch, &mut segs);
                }
            }
            m.clear();
            m.resize(xis * c_out * tiles, 0.0);
            // The α² products are independent: across the pool too, so that a map of fewer bands
            // than threads still uses every thread.
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
                        xis * c_in,
                        vx,
                        tiles,
                        false,
                        mx,
                        tiles,
                        0.0,
                    );
                });
            // Aᵀ·M·A + bias, m output rows per tile row.
            let mut mm: Vec<&[f32]> = Vec::with_capacity(xis);
            let mut lines: Vec<&mut [f32]> = Vec::with_capacity(m_out);
            for (o, bv) in bias.iter().enumerate() {
                for ty in 0..tys {
                    mm.clear();
                    mm.extend((0..xis).map(|xi| &m[(xi * c_out + o) * tiles + ty * tw..][..tw]));
                    let y = m_out * (ty0 + ty);
                    let count = (h - y).min(m_out);
                    // SAFETY: bands cover disjoint output rows of every channel, inside this
                    // item's `c_out·h·w` output; rows y … y + count − 1 (inside the image).
                    let block = unsafe {
                        std::slice::from_raw_parts_mut(dst.get().add((o * h + y) * w), count * w)
                    };
                    lines.clear();
                    lines.extend(block.chunks_mut(w));
                    while lines.len() < m_out {
                        lines.push(&mut []);
                    }
                    T::output(&mm, tw, *bv, scratch, &mut lines);
                }
            }
        };
        (0..bands).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |bufs, b| run_band(b, bufs),
        );
        crate::ops::interrupt::check()?;
    }
    Ok(out)
}

with_avx512!(fn wino2_in(even: &[f32], odd: &[f32], lane: usize, tw: usize, scratch: &mut [f32], out: &mut [&mut [f32]]) => wino2_in_plain);

/// F(2×2)'s `V = Bᵀ·d·B` for one tile row of one channel: `even`/`odd` hold the four padded input
/// rows' even and odd positions (`lane` = tw + 1 each); `out[ξ]` gets the tw tiles' element ξ.
#[inline(always)]
fn wino2_in_plain(
    even: &[f32],
    odd: &[f32],
    lane: usize,
    tw: usize,
    scratch: &mut [f32],
    out: &mut [&mut [f32]],
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

with_avx512!(fn wino2_out(m: &[&[f32]], tw: usize, bias: f32, scratch: &mut [f32], l0: &mut [f32], l1: &mut [f32]) => wino2_out_plain);

/// F(2×2)'s `Y = Aᵀ·M·A + bias` for one tile row of one output channel: `m[ξ]` holds the tw
/// tiles' element ξ; the two output rows go to `l0` and `l1` (empty past the image's last row),
/// each w ≤ 2·tw long.
#[inline(always)]
fn wino2_out_plain(
    m: &[&[f32]],
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

/// F(4×4)'s Bᵀ applied to six equally long runs: `t[k] = Σ_r Bᵀ[k][r]·d[r]`.
#[inline(always)]
fn b4t(d: [&[f32]; 6], t: [&mut [f32]; 6]) {
    let [t0, t1, t2, t3, t4, t5] = t;
    let n = t0.len();
    let [d0, d1, d2, d3, d4, d5] = d.map(|r| &r[..n]);
    let (t1, t2, t3, t4, t5) = (
        &mut t1[..n],
        &mut t2[..n],
        &mut t3[..n],
        &mut t4[..n],
        &mut t5[..n],
    );
    for c in 0..n {
        let (a0, a1, a2, a3, a4, a5) = (d0[c], d1[c], d2[c], d3[c], d4[c], d5[c]);
        t0[c] = 4.0 * a0 - 5.0 * a2 + a4;
        t1[c] = a4 + a3 - 4.0 * (a1 + a2);
        t2[c] = a4 - a3 + 4.0 * (a1 - a2);
        t3[c] = a4 - a2 + 2.0 * (a3 - a1);
        t4[c] = a4 - a2 - 2.0 * (a3 - a1);
        t5[c] = 4.0 * a1 - 5.0 * a3 + a5;
    }
}

with_avx512!(fn wino4_in(d: &[f32], lane: usize, tw: usize, scratch: &mut [f32], out: &mut [&mut [f32]]) => wino4_in_plain);

/// F(4×4)'s `V = Bᵀ·d·B` for one tile row of one channel: `d` holds the six padded rows in four
/// phase lanes, `[φ][r][lane]`; tile tx reads padded columns 4·tx … 4·tx + 5, which are
/// lane φ index tx for φ = 0 … 3, then lanes 0 and 1 at index tx + 1.
#[inline(always)]
fn wino4_in_plain(d: &[f32], lane: usize, tw: usize, scratch: &mut [f32], out: &mut [&mut [f32]]) {
    // Bᵀ·d over the rows, per phase: t[φ][k] (lane each).
    let t = &mut scratch[..24 * lane];
    for phase in 0..4 {
        let rows = &d[phase * 6 * lane..(phase + 1) * 6 * lane];
        let r: [&[f32]; 6] = std::array::from_fn(|i| &rows[i * lane..(i + 1) * lane]);
        let block = &mut t[phase * 6 * lane..(phase + 1) * 6 * lane];
        let mut it = block.chunks_mut(lane);
        let tk: [&mut [f32]; 6] = std::array::from_fn(|_| it.next().unwrap_or_default());
        b4t(r, tk);
    }
    let t = &scratch[..24 * lane];
    // ·B per tile, for each transformed row k.
    let (head, _) = out.split_at_mut(36);
    for (k, outs) in head.chunks_mut(6).enumerate() {
        let p = |phase: usize, shift: usize| {
            let at = (phase * 6 + k) * lane + shift;
            &t[at..at + tw]
        };
        let cols = [p(0, 0), p(1, 0), p(2, 0), p(3, 0), p(0, 1), p(1, 1)];
        let mut it = outs.iter_mut();
        let o: [&mut [f32]; 6] = std::array::from_fn(|_| match it.next() {
            Some(s) => &mut s[..tw],
            None => &mut [],
        });
        b4t(cols, o);
    }
}

with_avx512!(fn wino4_out(m: &[&[f32]], tw: usize, bias: f32, scratch: &mut [f32], lines: &mut [&mut [f32]]) => wino4_out_plain);

/// F(4×4)'s `Y = Aᵀ·M·A + bias` for one tile row of one output channel: `m[ξ]` holds the tw
/// tiles' element ξ; output row a goes to `lines[a]` (empty past the image's last row).
#[inline(always)]
fn wino4_out_plain(
    m: &[&[f32]],
    tw: usize,
    bias: f32,
    scratch: &mut [f32],
    lines: &mut [&mut [f32]],
) {
    // Aᵀ·M over the rows: s[a][j] (24 runs of tw), then ·A per output row into y[b] (4 runs).
    let (s, y) = scratch[..28 * tw].split_at_mut(24 * tw);
    for j in 0..6 {
        let [m0, m1, m2, m3, m4, m5] = std::array::from_fn(|r| &m[6 * r + j][..tw]);
        let (s0, rest) = s.split_at_mut(6 * tw);
        let (s1, rest) = rest.split_at_mut(6 * tw);
        let (s2, s3) = rest.split_at_mut(6 * tw);
        let (s0, s1, s2, s3) = (
            &mut s0[j * tw..(j + 1) * tw],
            &mut s1[j * tw..(j + 1) * tw],
            &mut s2[j * tw..(j + 1) * tw],
            &mut s3[j * tw..(j + 1) * tw],
        );
        for c in 0..tw {
            let (a1, a2, a3, a4) = (m1[c], m2[c], m3[c], m4[c]);
            let (p12, d12, p34, d34) = (a1 + a2, a1 - a2, a3 + a4, a3 - a4);
            s0[c] = m0[c] + p12 + p34;
            s1[c] = d12 + 2.0 * d34;
            s2[c] = p12 + 4.0 * p34;
            s3[c] = d12 + 8.0 * d34 + m5[c];
        }
    }
    for (a, line) in lines.iter_mut().enumerate().take(4) {
        if line.is_empty() {
            continue;
        }
        let q = &s[a * 6 * tw..(a + 1) * 6 * tw];
        let [q0, q1, q2, q3, q4, q5] = std::array::from_fn(|j| &q[j * tw..(j + 1) * tw]);
        let (y0, rest) = y.split_at_mut(tw);
        let (y1, rest) = rest.split_at_mut(tw);
        let (y2, y3) = rest.split_at_mut(tw);
        for c in 0..tw {
            let (a1, a2, a3, a4) = (q1[c], q2[c], q3[c], q4[c]);
            let (p12, d12, p34, d34) = (a1 + a2, a1 - a2, a3 + a4, a3 - a4);
            y0[c] = q0[c] + p12 + p34 + bias;
            y1[c] = d12 + 2.0 * d34 + bias;
            y2[c] = p12 + 4.0 * p34 + bias;
            y3[c] = d12 + 8.0 * d34 + q5[c] + bias;
        }
        let full = line.len() / 4;
        for (tx, quad) in line.chunks_exact_mut(4).enumerate() {
            quad.copy_from_slice(&[y0[tx], y1[tx], y2[tx], y3[tx]]);
        }
        let tail = &mut line[4 * full..];
        let last = [y0.get(full), y1.get(full), y2.get(full)];
        for (v, from) in tail.iter_mut().zip(last) {
            *v = from.copied().unwrap_or(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::conv::tests::{reference, rel_error};

    /// Largest error of the tiling `T` against candle's direct convolution (relative, see
    /// [`rel_error`]).
    fn tiling_error<T: Tiling>(dims: (usize, usize, usize, usize, usize)) -> f32 {
        let (n, c_in, _, h, w) = dims;
        let (x, wt, b, want) = reference(dims);
        rel_error(
            &winograd::<T>(&x, (n, c_in, h, w), &wt, &b).unwrap(),
            &want,
            c_in,
        )
    }

    /// Both tilings against candle's direct convolution: sides that are not multiples of the tile
    /// (a last partial tile, one-pixel and one-row maps), batch 2, and maps wide enough that a band
    /// is one tile row. F(4×4)'s transforms round a few times more than F(2×2)'s.
    #[test]
    fn winograd_matches_candle_conv2d() {
        for dims in [
            (2, 5, 7, 6, 9),
            (1, 3, 4, 1, 1),
            (1, 8, 3, 1, 13),
            (1, 6, 5, 7, 2),
            (2, 33, 40, 17, 19),
            (1, 16, 12, 5, 530),
        ] {
            let e2 = tiling_error::<F2>(dims);
            assert!(e2 < 2e-6, "F(2×2): {e2} for {dims:?}");
            let e4 = tiling_error::<F4>(dims);
            assert!(e4 < 1e-5, "F(4×4): {e4} for {dims:?}");
        }
    }

    /// The kernel transform against its definition U = G·g·Gᵀ, written out in f64.
    #[test]
    fn f4_kernel_transform_is_g_g_gt() {
        let g: Vec<f32> = (0..9).map(|i| (i as f32 * 0.7 - 2.0).sin()).collect();
        let gm = [
            [0.25, 0.0, 0.0],
            [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
            [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
            [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
            [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
            [0.0, 0.0, 1.0],
        ];
        let mut u = [0f32; 36];
        F4::kernel(&g, &mut u, 1);
        for r in 0..6 {
            for c in 0..6 {
                let mut want = 0f64;
                for i in 0..3 {
                    for j in 0..3 {
                        want += gm[r][i] * g[i * 3 + j] as f64 * gm[c][j];
                    }
                }
                assert!((u[r * 6 + c] as f64 - want).abs() < 1e-6, "U[{r}][{c}]");
            }
        }
    }
}
