//! Softmax over the last dimension. f16/bf16 on CUDA: our kernel (ops/cuda/softmax.cu), one block
//! per row that reads the row once, works in f32 and writes it once (candle's kernel: one warp per
//! row, five sweeps, exp in the half type). Elsewhere candle's `softmax_last_dim`. The fused CPU
//! attention has its own row kernel (ops/cpu/softmax.rs).

use candle_core::Tensor;
#[cfg(feature = "cuda")]
use candle_core::{DType, D};

pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F16 | DType::BF16) {
        let n = x.dim(D::Minus1)?;
        if n > 0 && n <= super::cuda::softmax::MAX_COLS && x.elem_count() / n <= i32::MAX as usize {
            return x
                .contiguous()?
                .apply_op1_no_bwd(&super::cuda::softmax::Softmax);
        }
    }
    candle_nn::ops::softmax_last_dim(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn rows_sum_to_one_in_order() -> candle_core::Result<()> {
        let x = Tensor::new(
            &[[1f32, 2.0, 3.0], [0.0, 0.0, f32::NEG_INFINITY]],
            &Device::Cpu,
        )?;
        let y = softmax_last_dim(&x)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let e = [1f32.exp(), 2f32.exp(), 3f32.exp()];
        let s: f32 = e.iter().sum();
        for (got, want) in y[0].iter().zip(e.iter().map(|v| v / s)) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(y[1], [0.5, 0.5, 0.0]);
        Ok(())
    }
}
