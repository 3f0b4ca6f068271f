//! RMSNorm (`x · rsqrt(mean(x²) + eps) · w`), computed in f32 like diffusers' and returned in the
//! weight's dtype, optionally times a per-item modulation. On CUDA with half types the whole of it
//! is one kernel (ops/cuda/rms_norm.cu); elsewhere candle's `rms_norm` (whose CUDA kernel already
//! reads half types into f32 and rounds once) and a multiply.

use candle_core::{DType, Tensor};

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
    let y = rms_norm(x, w, eps)?;
    match s {
        Some(s) => y.broadcast_mul(s),
        None => Ok(y),
    }
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
}
