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

/// Query rows per task of the fused attention over `heads` (batch × heads) heads of `l` queries
/// and `lk` keys: at most a score block of [`SCORE_BLOCK_ELEMS`], at least 16 rows, and small
/// enough that there are four tasks per thread where the rows allow.
fn row_block(heads: usize, l: usize, lk: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per_task = (heads * l).div_ceil(4 * threads);
    (SCORE_BLOCK_ELEMS / lk.max(1))
        .min(per_task)
        .max(16)
        .min(l)
        .max(1)
}

/// [`crate::ops::attention`] with f32 products through `sgemm`, blocks of query rows across the
/// pool. `q`, `k` and `v` may be any `[B, H, L, D]` views whose last dimension is contiguous — a
/// projection's `[B, L, H·D]` output with its heads split off and transposed, read in place — and
/// the result is stored `[B, L, H, D]` (returned with that shape; [`crate::ops::attention`]
/// transposes the view back), so neither side of the attention needs a transposing copy.
pub(crate) struct AttentionF32 {
    pub(crate) bias: Option<Vec<f32>>,
    /// Multiplies `q` (the softmax scale, applied to each block of query rows as it is read).
    pub(crate) scale: f32,
}

/// A `[B, H, L, D]` f32 view: the storage from the view's first element, and its strides.
fn strided<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [f32], [usize; 4])> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32");
    };
    let (st, dims) = (l.stride(), l.shape().dims());
    if st.len() != 4 || (st[3] != 1 && dims[3] > 1) {
        candle_core::bail!("{what}: the last dimension must be contiguous");
    }
    Ok((&data[l.start_offset()..], [st[0], st[1], st[2], st[3]]))
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
        let (b, h, l, lk, d) = attention_dims(ql, kl, vl, self.bias.as_deref())?;
        let (q, qst) = strided(qs, ql, "attention-f32")?;
        let (k, kst) = strided(ks, kl, "attention-f32")?;
        let (v, vst) = strided(vs, vl, "attention-f32")?;
        let mut out = vec![0f32; b * h * l * d];
        let shape = Shape::from((b, l, h, d));
        if l == 0 || lk == 0 || d == 0 {
            return Ok((CpuStorage::F32(out), shape));
        }
        let block = row_block(b * h, l, lk);
        let blocks = l.div_ceil(block);
        let dst = super::conv::SendPtr(out.as_mut_ptr());
        // One task per block of query rows of one head: a head count that does not divide among
        // the threads (SD's 5 heads at 64² on 2 threads) leaves no thread idle.
        (0..b * h * blocks).into_par_iter().for_each_init(
            || {
                (
                    vec![0f32; block * lk],
                    vec![0f32; block * d],
                    vec![0f32; block * d],
                )
            },
            |(scores, qa, o), task| {
                let (bh, i) = (task / blocks, task % blocks);
                let (bi, hi) = (bh / h, bh % h);
                let (r0, rows) = (i * block, block.min(l - i * block));
                let bias = self.bias.as_ref().map(|v| &v[bi * lk..(bi + 1) * lk]);
                // The block's query rows, scaled, as one contiguous [rows, d] operand.
                let qb = bi * qst[0] + hi * qst[1];
                for (r, row) in qa[..rows * d].chunks_mut(d).enumerate() {
                    let from = &q[qb + (r0 + r) * qst[2]..][..d];
                    for (a, x) in row.iter_mut().zip(from) {
                        *a = x * self.scale;
                    }
                }
                let kh = &k[bi * kst[0] + hi * kst[1]..];
                let vh = &v[bi * vst[0] + hi * vst[1]..];
                // scores[r, j] = Σ_i qa[r, i] · kh[j, i]
                sgemm(rows, lk, d, qa, d, kh, kst[2], true, scores, lk, 0.0);
                for s in scores[..rows * lk].chunks_mut(lk) {
                    softmax_row(s, bias);
                }
                // o[r, i] = Σ_j scores[r, j] · vh[j, i]
                sgemm(rows, d, lk, scores, lk, vh, vst[2], false, o, d, 0.0);
                for (r, row) in o[..rows * d].chunks(d).enumerate() {
                    // SAFETY: output row (bi, r0 + r, hi) of [B, L, H, D], d elements inside
                    // `out`; each (item, row, head) belongs to exactly one task.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            row.as_ptr(),
                            dst.get().add(((bi * l + r0 + r) * h + hi) * d),
                            d,
                        );
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), shape))
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
        let block = row_block(b * h, l, lk);
        // One task per block of query rows of one head, each with its own score block.
        out.par_chunks_mut(l * d).enumerate().for_each(|(bh, out)| {
            let bias = self
                .bias
                .as_ref()
                .map(|v| &v[(bh / h) * lk..(bh / h + 1) * lk]);
            let (kh, vh) = (&kb[bh * lk * d..], &vb[bh * lk * d..]);
            out.par_chunks_mut(block * d).enumerate().for_each_init(
                || (vec![0f32; block * lk], vec![0u16; block * lk]),
                |(scores, probs), (i, o)| {
                    let (r0, rows) = (i * block, o.len() / d);
                    let qa = &qb[(bh * l + r0) * d..];
                    mkl::gemm(rows, lk, d, qa, d, kh, d, true, scores, lk, 0.0);
                    for s in scores[..rows * lk].chunks_mut(lk) {
                        softmax_row(s, bias);
                    }
                    mkl::convert(&scores[..rows * lk], &mut probs[..rows * lk]);
                    mkl::gemm(rows, d, lk, probs, lk, vh, d, false, o, d, 0.0);
                },
            );
        });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}
