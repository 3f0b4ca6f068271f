//! The fused CPU attention: softmax(q·kᵀ + bias)·v per head in blocks of query rows — the
//! block's scores (one product), an in-place softmax and the product with `v` — so no score
//! matrix beyond one ≈ 1 MiB block ever exists. f32 products through `sgemm`
//! ([`AttentionF32`]: MKL where linked, candle's `gemm` crate otherwise), or bf16 operands through MKL ([`AttentionBf16`], feature `mkl`).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::f32_slice;
#[cfg(zturbo_mkl)]
use super::mkl;
use super::sgemm::sgemm;
use super::softmax::softmax_row;

/// Checks the fused attention's inputs; returns `(b, h, l, lk, d)`.
pub(crate) fn attention_dims(
    ql: &Layout,
    kl: &Layout,
    vl: &Layout,
    bias: Option<&[f32]>,
) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    let (b, h, l, d) = ql.shape().dims4()?;
    let (kb, kh, lk, kd) = kl.shape().dims4()?;
    if (kb, kh, kd) != (b, h, d) || vl.shape().dims4()? != (b, h, lk, d) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}",
            ql.shape(),
            kl.shape(),
            vl.shape()
        );
    }
    if bias.is_some_and(|v| v.len() != b * lk) {
        candle_core::bail!("attention: bias does not match {b}×{lk}");
    }
    Ok((b, h, l, lk, d))
}

/// Score rows per block of the fused attention (with the key count, ≈ 1 MiB of f32 scores:
/// the block stays in cache between the two products).
const SCORE_BLOCK_ELEMS: usize = 1 << 18;

/// [`crate::ops::attention`] with f32 products through `sgemm` (one thread per head).
pub(crate) struct AttentionF32 {
    pub(crate) bias: Option<Vec<f32>>,
}

impl CustomOp3 for AttentionF32 {
    fn name(&self) -> &'static str {
        "attention-f32"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h, l, lk, d) = attention_dims(ql, kl, vl, self.bias.as_deref())?;
        let q = f32_slice(qs, ql, "attention-f32")?;
        let k = f32_slice(ks, kl, "attention-f32")?;
        let v = f32_slice(vs, vl, "attention-f32")?;
        let mut out = vec![0f32; q.len()];
        if l == 0 || lk == 0 || d == 0 {
            return Ok((CpuStorage::F32(out), ql.shape().clone()));
        }
        let block = (SCORE_BLOCK_ELEMS / lk).max(16).min(l);
        out.par_chunks_mut(l * d).enumerate().for_each_init(
            || vec![0f32; block * lk],
            |scores, (bh, out)| {
                let bias = self
                    .bias
                    .as_ref()
                    .map(|v| &v[(bh / h) * lk..(bh / h + 1) * lk]);
                let (kh, vh) = (
                    &k[bh * lk * d..(bh + 1) * lk * d],
                    &v[bh * lk * d..(bh + 1) * lk * d],
                );
                for r0 in (0..l).step_by(block) {
                    let rows = block.min(l - r0);
                    let qa = &q[(bh * l + r0) * d..(bh * l + r0 + rows) * d];
                    // scores[r, j] = Σ_i qa[r, i] · kh[j, i]
                    sgemm(rows, lk, d, qa, d, kh, d, true, scores, lk, 0.0);
                    for s in scores[..rows * lk].chunks_mut(lk) {
                        softmax_row(s, bias);
                    }
                    let o = &mut out[r0 * d..(r0 + rows) * d];
                    // o[r, i] = Σ_j scores[r, j] · vh[j, i]
                    sgemm(rows, d, lk, scores, lk, vh, d, false, o, d, 0.0);
                }
            },
        );
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

/// softmax(q·kᵀ + bias)·v for f32 `q` (pre-scaled), `k`, `v` `[B, H, L, D]` / `[B, H, Lk, D]`,
/// with bf16 operands: per head, blocks of query rows get their scores (one product), a
/// softmax that writes bf16 probabilities directly, and the product with `v` — no score matrix
/// beyond one block ever exists. `bias`: `[B, Lk]` additive, f32.
#[cfg(zturbo_mkl)]
pub(crate) struct AttentionBf16 {
    pub(crate) bias: Option<Vec<f32>>,
}

#[cfg(zturbo_mkl)]
impl CustomOp3 for AttentionBf16 {
    fn name(&self) -> &'static str {
        "attention-bf16-mkl"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, l, lk, d) = attention_dims(ql, kl, vl, self.bias.as_deref())?;
        let q = f32_slice(qs, ql, "attention-bf16")?;
        let k = f32_slice(ks, kl, "attention-bf16")?;
        let v = f32_slice(vs, vl, "attention-bf16")?;
        let mut out = vec![0f32; b * h * l * d];
        if l == 0 || lk == 0 || d == 0 {
            return Ok((CpuStorage::F32(out), ql.shape().clone()));
        }
        let qb = mkl::to_bf16(q);
        let kb = mkl::to_bf16(k);
        let vb = mkl::to_bf16(v);
        let block = (SCORE_BLOCK_ELEMS / lk).max(16).min(l);
        // One head per task, each with its own score block (heads ≥ threads in every model).
        out.par_chunks_mut(l * d).enumerate().for_each_init(
            || (vec![0f32; block * lk], vec![0u16; block * lk]),
            |(scores, probs), (bh, out)| {
                let bias = self
                    .bias
                    .as_ref()
                    .map(|v| &v[(bh / h) * lk..(bh / h + 1) * lk]);
                let (kh, vh) = (&kb[bh * lk * d..], &vb[bh * lk * d..]);
                for r0 in (0..l).step_by(block) {
                    let rows = block.min(l - r0);
                    let qa = &qb[(bh * l + r0) * d..];
                    mkl::gemm(rows, lk, d, qa, d, kh, d, true, scores, lk, 0.0);
                    for s in scores[..rows * lk].chunks_mut(lk) {
                        softmax_row(s, bias);
                    }
                    mkl::convert(&scores[..rows * lk], &mut probs[..rows * lk]);
                    mkl::gemm(
                        rows,
                        d,
                        lk,
                        probs,
                        lk,
                        vh,
                        d,
                        false,
                        &mut out[r0 * d..],
                        d,
                        0.0,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}
