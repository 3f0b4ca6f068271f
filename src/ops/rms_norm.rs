//! RMSNorm (`x · rsqrt(mean(x²) + eps) · w`), computed in f32 like diffusers' and returned in the
//! weight's dtype, optionally times a per-item modulation. On CUDA with half types the whole of it
//! is one kernel (ops/cuda/rms_norm.cu); on the CPU in f32 one pass (ops/cpu/rms_norm.rs), which
//! also fuses a block's residual update ([`rms_norm_gate_add`]) and its q/k preparation
//! ([`qk_norm_rope`]); elsewhere candle's `rms_norm` (whose CUDA kernel already reads half types
//! into f32 and rounds once) and a multiply.

use candle_core::{DType, Tensor};

use super::cpu::rms_norm as cpu;

/// `rms_norm(x)·w`, in f32 arithmetic, returned in `w`'s dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    // For an input already in the weight's dtype, candle's CUDA kernel gives the f32 result
    // without the two f32 copies.
    if x.dtype() == w.dtype() && (x.dtype() == DType::F32 || x.device().is_cuda()) {
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32);
    }
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let wf = w.to_dtype(DType::F32)?;
    candle_nn::ops::rms_norm(&xf, &wf, eps as f32)?.to_dtype(w.dtype())
}

/// `rms_norm(x)·w·s` for `x` `[B, L, dim]` and an optional per-item modulation `s` `[B, 1, dim]` in
/// `w`'s dtype: one fused kernel on CUDA for half types, [`rms_norm`] and a multiply elsewhere.
pub fn rms_norm_scale(
    x: &Tensor,
    w: &Tensor,
    s: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) = cuda_fused(x, w, s, eps)? {
        return Ok(y);
    }
    if let Some(rows_per_item) = cpu_f32_rows(x, w, s)? {
        let op = cpu::RmsNormScale {
            w: f32_vec(w)?,
            s: s.map(f32_vec).transpose()?,
            rows_per_item,
            eps: eps as f32,
        };
        return x.contiguous()?.apply_op1_no_bwd(&op);
    }
    let y = rms_norm(x, w, eps)?;
    match s {
        Some(s) => y.broadcast_mul(s),
        None => Ok(y),
    }
}

/// `x + rms_norm(a)·w·g` (the gate `g` `[B, 1, dim]` optional), in `x`'s dtype: a block's residual
/// update. One pass on the CPU for f32 `x` and `a`; [`rms_norm_scale`] and an add elsewhere.
pub fn rms_norm_gate_add(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    g: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 && x.dims() == a.dims() {
        if let Some(rows_per_item) = cpu_f32_rows(a, w, g)? {
            let op = cpu::RmsNormGateAdd {
                w: f32_vec(w)?,
                g: g.map(f32_vec).transpose()?,
                rows_per_item,
                eps: eps as f32,
            };
            return x.contiguous()?.apply_op2_no_bwd(&a.contiguous()?, &op);
        }
    }
    x + rms_norm_scale(a, w, g, eps)?.to_dtype(x.dtype())?
}

/// The attention's q or k from a projection `x` `[B, L, H, D]`: per-head RMSNorm with `w` (when
/// given), interleaved-pair RoPE with `cos`, `sin` `[L, D/2]` or `[B, L, D/2]` (f32), times
/// `scale`, as `[B, H, L, D]` contiguous in `x`'s dtype — diffusers' order (norm, rotate in f32,
/// scale). One pass on the CPU for an f32 `x`.
pub fn qk_norm_rope(
    x: &Tensor,
    w: Option<&Tensor>,
    eps: f64,
    cos: &Tensor,
    sin: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4 {
        let op = cpu::QkNormRope {
            w: w.map(f32_vec).transpose()?,
            eps: eps as f32,
            cos: cos.flatten_all()?.to_vec1::<f32>()?,
            sin: sin.flatten_all()?.to_vec1::<f32>()?,
            scale: scale as f32,
        };
        return x.contiguous()?.apply_op1_no_bwd(&op);
    }
    let dtype = x.dtype();
    let x = match w {
        Some(w) => rms_norm(x, w, eps)?,
        None => x.clone(),
    };
    let x = x.transpose(1, 2)?.to_dtype(DType::F32)?.contiguous()?;
    let x = candle_nn::rotary_emb::rope_i(&x, cos, sin)?;
    (x * scale)?.to_dtype(dtype)
}

/// For an f32 CPU input `x` `[B, L, D]` with `w` `[D]` and an optional `s` `[B, 1, D]`: the rows
/// per item (`L`), i.e. the fused CPU op applies; `None` otherwise.
fn cpu_f32_rows(x: &Tensor, w: &Tensor, s: Option<&Tensor>) -> candle_core::Result<Option<usize>> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 3) {
        return Ok(None);
    }
    let (b, l, d) = x.dims3()?;
    if w.dims() != [d] || s.is_some_and(|s| s.dims() != [b, 1, d]) || l == 0 {
        return Ok(None);
    }
    Ok(Some(l))
}

/// A small tensor's elements as f32 (weights and modulations the fused CPU ops take by value).
fn f32_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The CUDA kernel where it applies (half-type `x` and `w`, `s` in `w`'s dtype); `None` elsewhere.
#[cfg(feature = "cuda")]
fn cuda_fused(
    x: &Tensor,
    w: &Tensor,
    s: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    let half = |t: &Tensor| matches!(t.dtype(), DType::F16 | DType::BF16);
    if !(x.device().is_cuda() && half(x) && half(w) && s.is_none_or(|s| s.dtype() == w.dtype())) {
        return Ok(None);
    }
    let (b, l, d) = x.dims3()?;
    if w.dims() != [d] || b * l > i32::MAX as usize || d > i32::MAX as usize {
        return Ok(None);
    }
    let op = super::cuda::rms_norm::RmsNormScale {
        eps: eps as f32,
        rows_per_item: l,
    };
    let x = x.contiguous()?;
    Ok(Some(match s {
        Some(s) => {
            if s.dims() != [b, 1, d] {
                return Ok(None);
            }
            x.apply_op3_no_bwd(w, &s.contiguous()?, &op)?
        }
        None => x.apply_op2_no_bwd(w, &op)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference: diffusers' `RMSNorm` — `x · rsqrt(mean(x², -1) + eps) · w` in f32.
    #[test]
    fn matches_the_definition_with_and_without_modulation() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 3, 8), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        let s = Tensor::randn(1f32, 0.5, (2, 1, 8), &dev)?;
        let ms = x.sqr()?.mean_keepdim(2)?;
        let want = x.broadcast_div(&(ms + 1e-6)?.sqrt()?)?.broadcast_mul(&w)?;
        let diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(diff(&rms_norm(&x, &w, 1e-6)?, &want)? < 1e-5);
        let got = rms_norm_scale(&x, &w, Some(&s), 1e-6)?;
        assert!(diff(&got, &want.broadcast_mul(&s)?)? < 1e-5);
        // A half input against an f32 weight: computed in f32, returned in the weight's dtype.
        let y = rms_norm(&x.to_dtype(DType::BF16)?, &w, 1e-6)?;
        assert_eq!(y.dtype(), DType::F32);
        assert!(diff(&y, &want)? < 5e-2);
        Ok(())
    }

    /// The fused CPU passes against the unfused candle ops they replace (same definitions as
    /// diffusers' `RMSNorm`, gate and `apply_rotary_emb` on interleaved pairs).
    #[test]
    fn fused_cpu_passes_match_the_unfused_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        let (b, l, h, d) = (2, 5, 3, 8);
        let x = Tensor::randn(0f32, 1.0, (b, l, h * d), &dev)?;
        let a = Tensor::randn(0f32, 2.0, (b, l, h * d), &dev)?;
        let w = Tensor::randn(1f32, 0.1, h * d, &dev)?;
        let g = Tensor::randn(0f32, 0.5, (b, 1, h * d), &dev)?;
        let norm = candle_nn::ops::rms_norm(&a, &w, 1e-6)?;
        assert!(
            diff(
                &rms_norm_scale(&a, &w, Some(&g), 1e-6)?,
                &norm.broadcast_mul(&g)?
            )? < 1e-5
        );
        let want = (&x + norm.broadcast_mul(&g)?)?;
        assert!(diff(&rms_norm_gate_add(&x, &a, &w, Some(&g), 1e-6)?, &want)? < 1e-5);
        assert!(diff(&rms_norm_gate_add(&x, &a, &w, None, 1e-6)?, &(&x + &norm)?)? < 1e-5);
        // q/k: per-head norm, RoPE, scale, transpose — per-item and shared tables.
        let q = Tensor::randn(0f32, 1.0, (b, l, h, d), &dev)?;
        let wq = Tensor::randn(1f32, 0.1, d, &dev)?;
        for tables in [(b, l, d / 2), (1, l, d / 2)] {
            let cos = Tensor::randn(0f32, 1.0, tables, &dev)?;
            let sin = Tensor::randn(0f32, 1.0, tables, &dev)?;
            let (c2, s2) = if tables.0 == 1 {
                (cos.squeeze(0)?, sin.squeeze(0)?)
            } else {
                (cos.clone(), sin.clone())
            };
            let normed = candle_nn::ops::rms_norm(&q, &wq, 1e-6)?;
            let t = normed.transpose(1, 2)?.contiguous()?;
            let want = (candle_nn::rotary_emb::rope_i(&t, &c2, &s2)? * 0.25)?;
            let got = qk_norm_rope(&q, Some(&wq), 1e-6, &c2, &s2, 0.25)?;
            assert_eq!(got.dims(), &[b, h, l, d]);
            assert!(diff(&got, &want)? < 1e-5);
            let want = candle_nn::rotary_emb::rope_i(&q.transpose(1, 2)?.contiguous()?, &c2, &s2)?;
            assert!(diff(&qk_norm_rope(&q, None, 1e-6, &c2, &s2, 1.0)?, &want)? < 1e-5);
        }
        Ok(())
    }
}
