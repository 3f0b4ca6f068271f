//! GroupNorm's two passes on the CPU for contiguous f32 maps: the statistics per group in one
//! sweep (f64 sums), then one sweep that applies the per-channel scale and shift and the SiLU.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::{exp_neg, f32_slice, with_avx512};

/// Mean and (population) variance per group of a contiguous f32 `[B, C, H, W]`: `[B, G, 2]`.
pub(crate) struct GroupStats {
    pub(crate) groups: usize,
}

impl CustomOp1 for GroupStats {
    fn name(&self) -> &'static str {
        "group-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "group-stats")?;
        let (b, _, _, _) = l.shape().dims4()?;
        let g = self.groups;
        let n = x.len() / (b * g).max(1);
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
pub(crate) struct ChannelAffine {
    pub(crate) silu: bool,
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
        let x = f32_slice(xs, xl, "channel-affine")?;
        let a = f32_slice(as_, al, "channel-affine")?;
        let sh = f32_slice(ss, sl, "channel-affine")?;
        let (b, c, h, w) = xl.shape().dims4()?;
        if a.len() != b * c || sh.len() != b * c {
            candle_core::bail!("channel-affine: {} scales for {b}×{c} planes", a.len());
        }
        let plane = (h * w).max(1);
        let mut out = vec![0f32; x.len()];
        let silu = self.silu;
        out.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (o, xs))| affine_plane(xs, o, a[i], sh[i], silu));
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

with_avx512!(fn affine_plane(x: &[f32], out: &mut [f32], a: f32, s: f32, silu: bool) => affine_plane_plain);

#[inline(always)]
fn affine_plane_plain(x: &[f32], out: &mut [f32], a: f32, s: f32, silu: bool) {
    if silu {
        for (o, &v) in out.iter_mut().zip(x) {
            let y = v * a + s;
            *o = y / (1.0 + exp_neg(y));
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * a + s;
        }
    }
}
