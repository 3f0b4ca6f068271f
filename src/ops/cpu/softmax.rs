//! The softmax of one row of scores (+ an additive bias), vectorised: the fused attention's
//! inner step.

use super::{fast_exp, with_avx512};

with_avx512!(pub(crate) fn softmax_row(s: &mut [f32], bias: Option<&[f32]>) => softmax_row_plain);

/// (+ bias), − max, exp, normalise. The max and the sum run over 16 lanes (the compiler does not
/// reorder a single float accumulator, so one-lane reductions would stay scalar).
#[inline(always)]
fn softmax_row_plain(s: &mut [f32], bias: Option<&[f32]>) {
    const W: usize = 16;
    if let Some(bias) = bias {
        for (x, b) in s.iter_mut().zip(bias) {
            *x += *b;
        }
    }
    let mut lanes = [f32::NEG_INFINITY; W];
    let mut chunks = s.chunks_exact(W);
    for c in &mut chunks {
        for (m, x) in lanes.iter_mut().zip(c) {
            *m = m.max(*x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(lanes.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; W];
    let mut chunks = s.chunks_exact_mut(W);
    for c in &mut chunks {
        for (acc, x) in sums.iter_mut().zip(c.iter_mut()) {
            *x = fast_exp(*x - max);
            *acc += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = fast_exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in s.iter_mut() {
        *x *= inv;
    }
}
