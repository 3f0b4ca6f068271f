//! Gated activations of the feed-forward layers: SwiGLU's gate `silu(a)·b` (the DiT) and GEGLU
//! `h[…, :n]·gelu(h[…, n:])` (the UNet), fused into one pass on the CPU for f32 (ops/cpu/act.rs),
//! candle's ops elsewhere.

use candle_core::{DType, Tensor};

use super::cpu::act::{Geglu, SiluMul};

/// `silu(a) · b`, fused into one pass for contiguous f32 tensors on the CPU (two candle ops and an
/// intermediate tensor otherwise).
pub fn silu_mul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.dims() == b.dims()
    {
        return a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &SiluMul);
    }
    candle_nn::ops::silu(a)? * b
}

/// diffusers' GEGLU on `h` `[…, 2n]`: `h[…, :n] · gelu(h[…, n:])` with the exact (erf) GELU,
/// fused into one pass over contiguous f32 rows on the CPU (a chunk, two copies, the GELU and the
/// product otherwise: on SD-Turbo's UNet the scalar `erf` alone was most of the feed-forward).
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    let last = h.dim(candle_core::D::Minus1)?;
    if h.device().is_cpu() && h.dtype() == DType::F32 && last % 2 == 0 {
        return h.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let parts = h.chunk(2, candle_core::D::Minus1)?;
    &parts[0] * parts[1].gelu_erf()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::act::gelu_erf;
    use candle_core::Device;

    #[test]
    fn silu_mul_matches_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = (Tensor::randn(0f32, 3.0, (7, 1001), &dev)? * 4.0)?;
        let b = Tensor::randn(0f32, 1.0, (7, 1001), &dev)?;
        let want = (candle_nn::ops::silu(&a)? * &b)?;
        let got = silu_mul(&a, &b)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max |diff| {diff}");
        Ok(())
    }

    #[test]
    fn geglu_matches_the_unfused_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // Wide range, zeros and the tails (GELU → 0 and → x) included.
        let h = (Tensor::randn(0f32, 1.0, (3, 5, 2 * 37), &dev)? * 4.0)?;
        let h = h.slice_assign(
            &[0..1, 0..1, 37..74],
            &Tensor::zeros((1, 1, 37), DType::F32, &dev)?,
        )?;
        let parts = h.chunk(2, candle_core::D::Minus1)?;
        let want = (&parts[0] * parts[1].gelu_erf()?)?;
        let got = geglu(&h)?;
        assert_eq!(got.dims(), &[3, 5, 37]);
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max |diff| {diff}");
        for x in [-40f32, -9.0, -3.0, -0.5, 0.0, 1e-3, 0.7, 2.5, 9.0, 40.0] {
            let exact = Tensor::new(&[x], &dev)?.gelu_erf()?.to_vec1::<f32>()?[0];
            assert!(
                (gelu_erf(x) - exact).abs() <= 2e-7 * x.abs().max(1.0),
                "gelu({x})"
            );
        }
        Ok(())
    }
}
