//! CUDA kernels of our own (feature `cuda`; `src/cuda/*.cu`, compiled to PTX by build.rs and loaded
//! through candle's custom-module cache). Without the feature, or off CUDA, every entry point is
//! candle's op.

use candle_core::Tensor;
#[cfg(feature = "cuda")]
use candle_core::{DType, D};

/// Widest row the register-resident softmax takes (64 values per thread × 256 threads).
#[cfg(feature = "cuda")]
const MAX_SOFTMAX_COLS: usize = 64 * 256;

/// Softmax over the last dimension. f16/bf16 on CUDA: one block per row that reads the row once,
/// works in f32 and writes it once (candle's kernel: one warp per row, five sweeps, exp in the
/// half type). Elsewhere candle's `softmax_last_dim`.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F16 | DType::BF16) {
        let n = x.dim(D::Minus1)?;
        if n > 0 && n <= MAX_SOFTMAX_COLS && x.elem_count() / n <= i32::MAX as usize {
            return x.contiguous()?.apply_op1_no_bwd(&cuda::Softmax);
        }
    }
    candle_nn::ops::softmax_last_dim(x)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/zturbo_kernels.ptx"));
    const MODULE: &str = "zturbo_kernels";

    pub(super) struct Softmax;

    impl CustomOp1 for Softmax {
        fn name(&self) -> &'static str {
            "zt-softmax-last-dim"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("zt-softmax-last-dim runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = s.device();
            let Some((o1, o2)) = l.contiguous_offsets() else {
                candle_core::bail!("zt-softmax-last-dim: input must be contiguous");
            };
            let el = l.shape().elem_count();
            let ncols = *l.dims().last().unwrap_or(&0);
            if ncols == 0 {
                candle_core::bail!("zt-softmax-last-dim: empty rows");
            }
            let nrows = el / ncols;
            let Some(items) = [4usize, 8, 16, 32, 64]
                .into_iter()
                .find(|i| i * 256 >= ncols)
            else {
                candle_core::bail!("zt-softmax-last-dim: rows of {ncols} are too wide");
            };
            let cfg = LaunchConfig {
                grid_dim: (nrows as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let n = ncols as i32;
            let slice = match &s.slice {
                CudaStorageSlice::F16(src) => {
                    let src = src.slice(o1..o2);
                    // SAFETY: every element is written by the kernel below.
                    let dst = unsafe { dev.alloc::<half::f16>(el)? };
                    let name = format!("zt_softmax_f16_{items}");
                    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                    let mut b = func.builder();
                    b.arg(&src);
                    b.arg(&dst);
                    b.arg(&n);
                    // SAFETY: the kernel reads nrows·ncols elements of src and writes as many of dst.
                    unsafe { b.launch(cfg) }.w()?;
                    CudaStorageSlice::F16(dst)
                }
                CudaStorageSlice::BF16(src) => {
                    let src = src.slice(o1..o2);
                    // SAFETY: every element is written by the kernel below.
                    let dst = unsafe { dev.alloc::<half::bf16>(el)? };
                    let name = format!("zt_softmax_bf16_{items}");
                    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                    let mut b = func.builder();
                    b.arg(&src);
                    b.arg(&dst);
                    b.arg(&n);
                    // SAFETY: the kernel reads nrows·ncols elements of src and writes as many of dst.
                    unsafe { b.launch(cfg) }.w()?;
                    CudaStorageSlice::BF16(dst)
                }
                _ => candle_core::bail!("zt-softmax-last-dim: f16 or bf16 only"),
            };
            Ok((
                CudaStorage {
                    slice,
                    device: dev.clone(),
                },
                l.shape().clone(),
            ))
        }
    }
}
