//! The DiT block's elementwise passes fused on the CPU (f32): RMSNorm × weight × modulation in one
//! pass ([`RmsNormScale`]), the residual update `x + RMSNorm(a)·w·gate` in one pass
//! ([`RmsNormGateAdd`]), and the attention's q/k preparation — per-head RMSNorm, interleaved RoPE,
//! the softmax scale and the `[B, L, H, D] → [B, H, L, D]` transpose — in one pass
//! ([`QkNormRope`]). Each replaces three to six candle passes over the activations.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};
use rayon::prelude::*;

use super::{f32_slice, with_avx512};

/// Rows per parallel task (≥ 64 KiB of f32 per task for a 1024-wide row).
const ROWS_PER_TASK: usize = 16;

/// `rms_norm(x)·w·s` for `x` `[B, L, D]` (any rank: rows of `D`), `w` `[D]` and an optional
/// per-item modulation `s` `[B, D]` (item = row / `rows_per_item`).
pub(crate) struct RmsNormScale {
    pub(crate) w: Vec<f32>,
    pub(crate) s: Option<Vec<f32>>,
    pub(crate) rows_per_item: usize,
    pub(crate) eps: f32,
}

impl CustomOp1 for RmsNormScale {
    fn name(&self) -> &'static str {
        "rms-norm-scale"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rms-norm-scale")?;
        let d = self.w.len();
        check_rows(
            x.len(),
            d,
            self.s.as_deref(),
            self.rows_per_item,
            "rms-norm-scale",
        )?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS_PER_TASK * d)
            .zip(x.par_chunks(ROWS_PER_TASK * d))
            .enumerate()
            .for_each(|(t, (o, x))| {
                for (r, (o, x)) in o.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                    let s = item_row(
                        self.s.as_deref(),
                        t * ROWS_PER_TASK + r,
                        self.rows_per_item,
                        d,
                    );
                    norm_row(x, &self.w, s, None, self.eps, o);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `x + rms_norm(a)·w·g` for `x`, `a` `[B, L, D]`, `w` `[D]` and an optional per-item gate `g`
/// `[B, D]`: the residual update of a block in one pass.
pub(crate) struct RmsNormGateAdd {
    pub(crate) w: Vec<f32>,
    pub(crate) g: Option<Vec<f32>>,
    pub(crate) rows_per_item: usize,
    pub(crate) eps: f32,
}

impl CustomOp2 for RmsNormGateAdd {
    fn name(&self) -> &'static str {
        "rms-norm-gate-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rms-norm-gate-add")?;
        let a = f32_slice(as_, al, "rms-norm-gate-add")?;
        let d = self.w.len();
        if xl.shape() != al.shape() {
            candle_core::bail!(
                "rms-norm-gate-add: {:?} against {:?}",
                xl.shape(),
                al.shape()
            );
        }
        check_rows(
            x.len(),
            d,
            self.g.as_deref(),
            self.rows_per_item,
            "rms-norm-gate-add",
        )?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS_PER_TASK * d)
            .zip(
                x.par_chunks(ROWS_PER_TASK * d)
                    .zip(a.par_chunks(ROWS_PER_TASK * d)),
            )
            .enumerate()
            .for_each(|(t, (o, (x, a)))| {
                for (r, ((o, x), a)) in o
                    .chunks_mut(d)
                    .zip(x.chunks(d))
                    .zip(a.chunks(d))
                    .enumerate()
                {
                    let g = item_row(
                        self.g.as_deref(),
                        t * ROWS_PER_TASK + r,
                        self.rows_per_item,
                        d,
                    );
                    norm_row(a, &self.w, g, Some(x), self.eps, o);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// Per-head RMSNorm (weight `w` `[D]`, optional), interleaved-pair RoPE (`cos`, `sin` `[L, D/2]`
/// or `[B, L, D/2]`), times `scale`, of `x` `[B, L, H, D]`; the result is `[B, H, L, D]`
/// contiguous (the attention's layout).
pub(crate) struct QkNormRope {
    pub(crate) w: Option<Vec<f32>>,
    pub(crate) eps: f32,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    pub(crate) scale: f32,
}

impl CustomOp1 for QkNormRope {
    fn name(&self) -> &'static str {
        "qk-norm-rope"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "qk-norm-rope")?;
        let (b, l, h, d) = xl.shape().dims4()?;
        let half = d / 2;
        let table = self.cos.len();
        if d % 2 != 0
            || self.sin.len() != table
            || !(table == l * half || table == b * l * half)
            || self.w.as_ref().is_some_and(|w| w.len() != d)
        {
            candle_core::bail!(
                "qk-norm-rope: input {:?}, rope table of {table}, norm weight {:?}",
                xl.shape(),
                self.w.as_ref().map(Vec::len)
            );
        }
        let per_item = table == b * l * half;
        let mut out = vec![0f32; x.len()];
        // One task per (item, head): its L rows of D are contiguous in the output.
        out.par_chunks_mut(l * d).enumerate().for_each(|(bh, o)| {
            let (item, head) = (bh / h, bh % h);
            let t0 = if per_item { item * l * half } else { 0 };
            for (t, o) in o.chunks_mut(d).enumerate() {
                let src = &x[((item * l + t) * h + head) * d..][..d];
                let at = t0 + t * half;
                qk_row(
                    src,
                    self.w.as_deref(),
                    self.eps,
                    &self.cos[at..at + half],
                    &self.sin[at..at + half],
                    self.scale,
                    o,
                );
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, l, d))))
    }
}

fn check_rows(
    len: usize,
    d: usize,
    per_item: Option<&[f32]>,
    rows_per_item: usize,
    op: &str,
) -> candle_core::Result<()> {
    if d == 0 || len % d != 0 || rows_per_item == 0 {
        candle_core::bail!("{op}: {len} elements in rows of {d}");
    }
    let items = (len / d).div_ceil(rows_per_item);
    if per_item.is_some_and(|s| s.len() != items * d) {
        candle_core::bail!("{op}: modulation does not match {items} items of {d}");
    }
    Ok(())
}

fn item_row(s: Option<&[f32]>, row: usize, rows_per_item: usize, d: usize) -> Option<&[f32]> {
    s.map(|s| &s[(row / rows_per_item) * d..][..d])
}

with_avx512!(fn norm_row(x: &[f32], w: &[f32], s: Option<&[f32]>, add: Option<&[f32]>, eps: f32, out: &mut [f32]) => norm_row_plain);

/// `out = add + x·rsqrt(mean(x²) + eps)·w·s` (absent `s`: 1; absent `add`: 0).
#[inline(always)]
fn norm_row_plain(
    x: &[f32],
    w: &[f32],
    s: Option<&[f32]>,
    add: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) {
    let r = rsqrt_mean_sq(x, eps);
    match (s, add) {
        (Some(s), Some(a)) => {
            for i in 0..out.len() {
                out[i] = a[i] + x[i] * r * w[i] * s[i];
            }
        }
        (Some(s), None) => {
            for i in 0..out.len() {
                out[i] = x[i] * r * w[i] * s[i];
            }
        }
        (None, Some(a)) => {
            for i in 0..out.len() {
                out[i] = a[i] + x[i] * r * w[i];
            }
        }
        (None, None) => {
            for i in 0..out.len() {
                out[i] = x[i] * r * w[i];
            }
        }
    }
}

/// 1 / sqrt(mean(x²) + eps), the sum in 16 lanes (vectorises; f32 like candle's CPU rms_norm).
#[inline(always)]
fn rsqrt_mean_sq(x: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in rest {
        sum += v * v;
    }
    1.0 / (sum / x.len() as f32 + eps).sqrt()
}

with_avx512!(fn qk_row(x: &[f32], w: Option<&[f32]>, eps: f32, cos: &[f32], sin: &[f32], scale: f32, out: &mut [f32]) => qk_row_plain);

#[inline(always)]
fn qk_row_plain(
    x: &[f32],
    w: Option<&[f32]>,
    eps: f32,
    cos: &[f32],
    sin: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let r = match w {
        Some(_) => rsqrt_mean_sq(x, eps) * scale,
        None => scale,
    };
    for i in 0..cos.len() {
        let (mut a, mut b) = (x[2 * i] * r, x[2 * i + 1] * r);
        if let Some(w) = w {
            a *= w[2 * i];
            b *= w[2 * i + 1];
        }
        out[2 * i] = a * cos[i] - b * sin[i];
        out[2 * i + 1] = a * sin[i] + b * cos[i];
    }
}
