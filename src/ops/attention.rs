//! Scaled dot-product attention, one op for the DiT, the UNet and the VAE's mid block:
//! `softmax(q·kᵀ + bias)·v` for a pre-scaled `q`.
//!
//! On the CPU in f32 it is fused (ops/cpu/attention.rs): blocks of query rows, no score matrix
//! beyond one ≈ 1 MiB block. Elsewhere (CUDA, Metal, half types on the CPU) the query rows run in
//! chunks so that the scores of one chunk stay under a cap — at 1024² with guidance the DiT's full
//! matrix would be 2 × 30 × 4160² values, 2 GB in f16, and the softmax doubles it. The caps are
//! public here because the memory planner models them (the families' `activations.rs` read them).

use candle_core::{DType, Tensor};

#[cfg(zturbo_mkl)]
use super::cpu::attention::AttentionBf16;
use super::cpu::attention::AttentionF32;
use super::{linear, softmax};
use crate::profile;

/// Score values one chunk of the unfused attention may hold (the DiT's default execution).
pub const SCORE_CHUNK_ELEMS: usize = 64 << 20;
/// The same cap in the DiT's low-memory execution.
pub const LOW_MEMORY_SCORE_CHUNK_ELEMS: usize = 8 << 20;
/// Query rows per chunk of the VAE mid block's single-head attention over all positions (at 1024²
/// the scores of all 16 384 positions would be 1 GiB at once).
pub const QUERY_CHUNK_ROWS: usize = 4096;

/// Names the profiler (`ZTURBO_PROFILE`) charges the attention's stages to.
#[derive(Debug, Clone, Copy)]
pub struct Spans {
    pub fused: &'static str,
    pub scores: &'static str,
    pub softmax: &'static str,
    pub pv: &'static str,
    pub cat: &'static str,
}

/// How one attention call runs.
#[derive(Debug, Clone, Copy)]
pub struct Attention<'a> {
    /// Additive bias broadcastable to `[B, 1, 1, Lk]` (a key mask: 0 or −∞).
    pub bias: Option<&'a Tensor>,
    /// Most score values held at once by the unfused path.
    pub max_scores: usize,
    /// Most query rows per chunk of the unfused path.
    pub max_rows: usize,
    /// Products through bf16 operands on a bf16-ready CPU (bf16 weights, f32 activations).
    pub bf16_products: bool,
    /// `q·kᵀ` in f32 whatever the activations' dtype (the UNet's `upcast_attention`).
    pub upcast: bool,
    /// The softmax in f32 whatever the scores' dtype (the UNet's, as diffusers runs it).
    pub f32_softmax: bool,
    /// Multiplies `q` before the product (the softmax scale; 1 for a caller that scaled `q`).
    pub q_scale: f64,
    pub spans: Option<&'a Spans>,
}

impl Default for Attention<'_> {
    fn default() -> Self {
        Self {
            bias: None,
            max_scores: usize::MAX,
            max_rows: usize::MAX,
            bf16_products: false,
            upcast: false,
            f32_softmax: false,
            q_scale: 1.0,
            spans: None,
        }
    }
}

/// `softmax(q_scale·q·kᵀ + bias)·v` for `q` `[B, H, L, D]` and `k`, `v` `[B, H, Lk, D]`; the
/// result is `[B, H, L, D]` in `v`'s dtype. On the CPU in f32 the inputs are read in place when
/// their last dimension is contiguous (heads split off a `[B, L, H·D]` projection by a reshape and
/// a transpose need no copy), and the result is a transposed view of `[B, L, H, D]` storage, so
/// `transpose(1, 2)` and a reshape to `[B, L, H·D]` cost nothing.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &Attention<'_>,
) -> candle_core::Result<Tensor> {
    let dev = q.device();
    let span = |pick: fn(&Spans) -> &'static str| opts.spans.map_or("", pick);
    let fusable = dev.is_cpu()
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
        && opts.bias.is_none_or(|b| b.dtype() == DType::F32);
    if fusable {
        return timed(span(|s| s.fused), dev, || {
            fused_cpu(q, k, v, opts.bias, opts.bf16_products, opts.q_scale)
        });
    }
    let q = if opts.q_scale == 1.0 {
        q.clone()
    } else {
        (q * opts.q_scale)?
    };
    let (q, k) = if opts.upcast {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q, k.clone())
    };
    let kt = k.t()?;
    let (b, h, l, _) = q.dims4()?;
    let keys = kt.dim(3)?;
    let chunk = (opts.max_scores / (b * h * keys).max(1))
        .min(opts.max_rows)
        .clamp(1, l.max(1));
    let mut parts = Vec::with_capacity(l.div_ceil(chunk));
    for start in (0..l).step_by(chunk) {
        let len = chunk.min(l - start);
        let qc = if len == l {
            q.clone()
        } else {
            q.narrow(2, start, len)?
        };
        let scores = timed(span(|s| s.scores), dev, || {
            let s = linear::matmul(&qc, &kt, opts.bf16_products)?;
            match opts.bias {
                Some(bias) => s.broadcast_add(&bias.to_dtype(s.dtype())?),
                None => Ok(s),
            }
        })?;
        let probs = timed(span(|s| s.softmax), dev, || {
            let p = if opts.f32_softmax {
                softmax::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            } else {
                softmax::softmax_last_dim(&scores)?
            };
            p.to_dtype(v.dtype())
        })?;
        drop(scores);
        parts.push(timed(span(|s| s.pv), dev, || {
            linear::matmul(&probs, v, opts.bf16_products)
        })?);
    }
    if parts.len() == 1 {
        Ok(parts.remove(0))
    } else {
        timed(span(|s| s.cat), dev, || Tensor::cat(&parts, 2))
    }
}

/// `f` under a profiler span when the caller named one.
fn timed<T>(
    name: &'static str,
    dev: &candle_core::Device,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    if name.is_empty() {
        f()
    } else {
        profile::span(name, dev, f)
    }
}

/// The fused CPU attention for f32 `q`, `k`, `v` (and f32 `bias`); with `bf16` on a bf16-ready CPU
/// the products take bf16 operands (MKL), else f32 (candle's `gemm`).
fn fused_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    bf16: bool,
    q_scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, _, _, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let bias = match bias {
        Some(t) => Some(
            t.broadcast_as((b, 1, 1, lk))?
                .flatten_all()?
                .to_vec1::<f32>()?,
        ),
        None => None,
    };
    #[cfg(zturbo_mkl)]
    if bf16 && linear::bf16_ready() {
        let q = if q_scale == 1.0 {
            q.contiguous()?
        } else {
            (q * q_scale)?.contiguous()?
        };
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        return q.apply_op3_no_bwd(&k, &v, &AttentionBf16 { bias });
    }
    let _ = bf16;
    // Views whose last dimension is strided (none of ours) are copied first.
    let inner = |t: &Tensor| -> candle_core::Result<Tensor> {
        if t.stride().last() == Some(&1) || t.dim(3)? <= 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let op = AttentionF32 {
        bias,
        scale: q_scale as f32,
    };
    // Stored [B, L, H, D]: viewed as [B, H, L, D].
    inner(q)?
        .apply_op3_no_bwd(&inner(k)?, &inner(v)?, &op)?
        .transpose(1, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_attention_matches_softmax_product() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, h, l, lk, d) = (2, 3, 37, 41, 16);
        let q = (Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)? * 0.25)?;
        let k = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
        let mut mask = vec![0f32; b * lk];
        for m in &mut mask[lk + 30..] {
            *m = f32::NEG_INFINITY; // the second item's last keys are padding
        }
        let bias = Tensor::from_vec(mask, (b, 1, 1, lk), &dev)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
        let want = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        // f32 products: equal up to summation order; bf16 operands (where native): within bf16.
        let opts = Attention {
            bias: Some(&bias),
            ..Attention::default()
        };
        let exact = attention(&q, &k, &v, &opts)?;
        let diff = max_diff(&exact, &want);
        assert!(diff < 1e-5, "f32: max |diff| {diff}");
        let bf16 = Attention {
            bf16_products: true,
            ..opts
        };
        let narrow = attention(&q, &k, &v, &bf16)?;
        let diff = max_diff(&narrow, &want);
        assert!(diff < 0.05, "bf16 operands: max |diff| {diff}");
        // Fewer query rows than a score block's minimum (a UNet's coarsest level: 4 tokens
        // attending to 77 of text).
        let (qs, ks, vs) = (
            Tensor::randn(0f32, 0.25, (1, 2, 4, d), &dev)?,
            Tensor::randn(0f32, 1.0, (1, 2, 77, d), &dev)?,
            Tensor::randn(0f32, 1.0, (1, 2, 77, d), &dev)?,
        );
        let want = candle_nn::ops::softmax_last_dim(&qs.matmul(&ks.t()?)?)?.matmul(&vs)?;
        for bf16 in [false, true] {
            let opts = Attention {
                bf16_products: bf16,
                ..Attention::default()
            };
            let got = attention(&qs, &ks, &vs, &opts)?;
            let diff = max_diff(&got, &want);
            assert!(diff < if bf16 { 0.05 } else { 1e-5 }, "4 rows: {diff}");
        }
        Ok(())
    }

    /// Heads split off `[B, L, H·D]` projections as views (a reshape and a transpose, no copy), a
    /// softmax scale passed as `q_scale`, many query blocks per head: the same as the product of
    /// contiguous tensors; the result transposes back to `[B, L, H, D]` without a copy.
    #[test]
    fn fused_attention_reads_strided_heads_and_scales_q() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, h, l, lk, d) = (2, 5, 300, 77, 16);
        let split = |t: &Tensor, n: usize| t.reshape((b, n, h, d))?.transpose(1, 2);
        let qp = Tensor::randn(0f32, 1.0, (b, l, h * d), &dev)?;
        let kp = Tensor::randn(0f32, 1.0, (b, lk, h * d), &dev)?;
        let vp = Tensor::randn(0f32, 1.0, (b, lk, h * d), &dev)?;
        let (q, k, v) = (split(&qp, l)?, split(&kp, lk)?, split(&vp, lk)?);
        assert!(!q.is_contiguous());
        let scale = 0.25;
        let (qc, kc, vc) = ((q.contiguous()? * scale)?, k.contiguous()?, v.contiguous()?);
        let want = candle_nn::ops::softmax_last_dim(&qc.matmul(&kc.t()?)?)?.matmul(&vc)?;
        for bf16 in [false, true] {
            let opts = Attention {
                q_scale: scale,
                bf16_products: bf16,
                ..Attention::default()
            };
            let got = attention(&q, &k, &v, &opts)?;
            assert_eq!(got.dims(), &[b, h, l, d]);
            let diff = max_diff(&got, &want);
            assert!(diff < if bf16 { 0.05 } else { 1e-5 }, "bf16 {bf16}: {diff}");
            if !bf16 {
                assert!(got.transpose(1, 2)?.is_contiguous());
            }
        }
        // The unfused path scales as well (f16 on the CPU).
        let opts = Attention {
            q_scale: scale,
            ..Attention::default()
        };
        let got = attention(
            &q.to_dtype(DType::F16)?,
            &k.to_dtype(DType::F16)?,
            &v.to_dtype(DType::F16)?,
            &opts,
        )?;
        assert!(max_diff(&got, &want) < 1e-2);
        Ok(())
    }

    /// The unfused path (half types, other devices): chunking by score cap or by rows gives the
    /// whole-matrix result, the bias applies, and the f32 options keep the result's dtype.
    #[test]
    fn chunked_attention_matches_the_whole_matrix() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, h, l, lk, d) = (2, 2, 29, 23, 8);
        let q = (Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)? * 0.3)?;
        let k = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
        let mut mask = vec![0f32; b * lk];
        for m in &mut mask[lk + 20..] {
            *m = f32::NEG_INFINITY;
        }
        let bias = Tensor::from_vec(mask, (b, 1, 1, lk), &dev)?;
        let want = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?.broadcast_add(&bias)?)?
            .matmul(&v)?;
        let (q16, k16, v16) = (
            q.to_dtype(DType::F16)?,
            k.to_dtype(DType::F16)?,
            v.to_dtype(DType::F16)?,
        );
        for (max_scores, max_rows, f32s) in [
            (usize::MAX, usize::MAX, false),
            (b * h * lk * 5, usize::MAX, false),
            (usize::MAX, 7, true),
            (1, usize::MAX, true),
        ] {
            let opts = Attention {
                bias: Some(&bias),
                max_scores,
                max_rows,
                upcast: f32s,
                f32_softmax: f32s,
                ..Attention::default()
            };
            let got = attention(&q16, &k16, &v16, &opts)?;
            assert_eq!(got.dims(), &[b, h, l, d]);
            assert_eq!(got.dtype(), DType::F16);
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-2, "{max_scores} {max_rows}: max |diff| {diff}");
        }
        Ok(())
    }
}
