//! The fused activations on the CPU: SwiGLU's `silu(a)·b` and GEGLU's `a·gelu(g)` with the exact
//! (erf) GELU, vectorised through branch-free `exp` and `erf`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};
use rayon::prelude::*;

use super::{exp_neg, f32_slice, fast_exp, with_avx512};

pub(crate) struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "silu-mul")?;
        let b = f32_slice(s2, l2, "silu-mul")?;
        let mut out = vec![0f32; a.len()];
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| silu_mul_slice(a, b, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

with_avx512!(fn silu_mul_slice(a: &[f32], b: &[f32], out: &mut [f32]) => silu_mul_scalar);

/// Written so that the compiler vectorises it: `exp` through 2^n · p(f) with a degree-6 polynomial
/// (see [`fast_exp`]), no branches in the loop.
#[inline(always)]
fn silu_mul_scalar(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x / (1.0 + exp_neg(x)) * y;
    }
}

pub(crate) struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = f32_slice(s, l, "geglu")?;
        let dims = l.shape().dims();
        let n = dims[dims.len() - 1] / 2;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = n;
        let mut out = vec![0f32; h.len() / 2];
        if let Some(per) = (1usize << 14).checked_div(n) {
            let rows = per + 1;
            out.par_chunks_mut(rows * n)
                .zip(h.par_chunks(rows * 2 * n))
                .for_each(|(o, h)| {
                    for (o, h) in o.chunks_mut(n).zip(h.chunks(2 * n)) {
                        let (a, g) = h.split_at(n);
                        geglu_row(a, g, o);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

with_avx512!(fn geglu_row(a: &[f32], g: &[f32], out: &mut [f32]) => geglu_row_plain);

#[inline(always)]
fn geglu_row_plain(a: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(g) {
        *o = x * gelu_erf(y);
    }
}

/// GELU with the exact form `x/2 · (1 + erf(x/√2))`, `erf` by Abramowitz & Stegun 7.1.26 (absolute
/// error ≤ 1.5e-7) with [`fast_exp`]; branch-free so that loops over it vectorise.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * fast_exp(-a * a);
    0.5 * x * (1.0 + erf_abs.copysign(z))
}
