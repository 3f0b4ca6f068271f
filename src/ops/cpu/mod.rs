//! The CPU variants of zturbo's ops (custom candle ops over contiguous f32 storage) and the
//! helpers they share: the AVX-512 dispatch macro, branch-free `exp`, bf16 rounding.

pub mod act;
pub mod attention;
pub mod conv;
pub mod group_norm;
pub mod int8;
#[cfg(zturbo_mkl)]
pub mod matmul;
#[cfg(zturbo_mkl)]
pub mod mkl;
pub mod rms_norm;
pub mod sgemm;
pub mod softmax;
pub mod winograd;

use candle_core::{CpuStorage, Layout};

/// Defines `$name(args)`: runs `$plain` compiled with AVX-512F enabled when the CPU has it (the
/// compiler then vectorises its loops 16 lanes wide), as is otherwise.
macro_rules! with_avx512 {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $plain:ident) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn wide($($arg: $ty),*) {
                    $plain($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            $plain($($arg),*)
        }
    };
}
pub(crate) use with_avx512;

/// The elements of a contiguous f32 CPU tensor (custom ops' inputs), or `op`'s error naming it.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let Some((o1, o2)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: inputs must be contiguous");
    };
    Ok(&s.as_slice::<f32>()?[o1..o2])
}

/// e^(−x), clamped to the range where f32 stays finite and normal.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    fast_exp(-x)
}

/// e^x for x in f32's normal range (clamped to [−87.3, 88.3]); relative error ≤ 4e-6 (≤ 1e-6
/// for |x| < 15).
/// Branch-free (rounding by the 1.5·2²³ trick) so that loops over it vectorise.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E;
    let r = t + MAGIC;
    let n = r - MAGIC; // t rounded to the nearest integer
    let ni = (r.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // 2^f = e^(f·ln2) for f = t − n in [−0.5, 0.5]: Taylor to degree 7 in g = f·ln2, |g| ≤ 0.347.
    let g = (t - n) * std::f32::consts::LN_2;
    let p = 1.0
        + g * (1.0
            + g * (0.5
                + g * (1.0 / 6.0
                    + g * (1.0 / 24.0
                        + g * (1.0 / 120.0 + g * (1.0 / 720.0 + g * (1.0 / 5040.0)))))));
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// f32 → bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN. Branch-free.
#[cfg(zturbo_mkl)]
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else {
        rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_close_to_exp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((fast_exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.01;
        }
        // The range reduction t = x·log2(e) in f32 carries |x|·6e-8 absolute error into the
        // exponent: ≈ 4e-6 relative at |x| ≈ 87, below 1e-6 for the softmax range |x| < 15.
        assert!(worst < 1e-5, "worst relative error {worst}");
        let floor = (-87.3f32).exp();
        assert!(((fast_exp(-1000.0) - floor) / floor).abs() < 1e-5);
    }
}
