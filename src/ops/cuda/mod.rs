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

/// `rms_norm(x)·w (·s)` on CUDA for half-type `x` and `w` (`s`: per-item modulation `[B, 1, dim]`
/// in `w`'s dtype, `x`: `[B, L, dim]`), in one kernel with f32 arithmetic, output in `w`'s dtype.
/// `None` where it does not apply (the caller runs the unfused ops).
pub fn rms_norm_scale(
    x: &Tensor,
    w: &Tensor,
    s: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        let half = |t: &Tensor| matches!(t.dtype(), DType::F16 | DType::BF16);
        if x.device().is_cuda() && half(x) && half(w) && s.is_none_or(|s| s.dtype() == w.dtype()) {
            let (b, l, d) = x.dims3()?;
            if w.dims() != [d] || b * l > i32::MAX as usize || d > i32::MAX as usize {
                return Ok(None);
            }
            let op = cuda::RmsNormScale {
                eps: eps as f32,
                rows_per_item: l,
            };
            let x = x.contiguous()?;
            return Ok(Some(match s {
                Some(s) => {
                    if s.dims() != [b, 1, d] {
                        return Ok(None);
                    }
                    x.apply_op3_no_bwd(w, &s.contiguous()?, &op)?
                }
                None => x.apply_op2_no_bwd(w, &op)?,
            }));
        }
    }
    let _ = (x, w, s, eps);
    Ok(None)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/zturbo_kernels.ptx"));
    const MODULE: &str = "zturbo_kernels";

    pub(super) struct RmsNormScale {
        pub(super) eps: f32,
        pub(super) rows_per_item: usize,
    }

    fn slice_ptr(s: &CudaStorage, l: &Layout) -> candle_core::Result<(u64, &'static str)> {
        let Some((o1, _)) = l.contiguous_offsets() else {
            candle_core::bail!("zt-rms-norm-scale: inputs must be contiguous");
        };
        let stream = s.device().cuda_stream();
        let (ptr, name) = match &s.slice {
            CudaStorageSlice::F16(v) => (v.slice(o1..).device_ptr(&stream).0, "f16"),
            CudaStorageSlice::BF16(v) => (v.slice(o1..).device_ptr(&stream).0, "bf16"),
            _ => candle_core::bail!("zt-rms-norm-scale: f16 or bf16 only"),
        };
        Ok((ptr, name))
    }

    impl RmsNormScale {
        fn launch(
            &self,
            x: (&CudaStorage, &Layout),
            w: (&CudaStorage, &Layout),
            s: Option<(&CudaStorage, &Layout)>,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = x.0.device();
            let (xp, xt) = slice_ptr(x.0, x.1)?;
            let (wp, wt) = slice_ptr(w.0, w.1)?;
            let sp = match s {
                Some((st, sl)) => slice_ptr(st, sl)?.0,
                None => 0u64,
            };
            let shape = x.1.shape().clone();
            let el = shape.elem_count();
            let ncols = *shape.dims().last().unwrap_or(&0);
            if ncols == 0 || el == 0 {
                candle_core::bail!("zt-rms-norm-scale: empty input");
            }
            let cfg = LaunchConfig {
                grid_dim: ((el / ncols) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let name = format!("zt_rms_norm_scale_{xt}_{wt}");
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let (n, per, eps) = (ncols as i32, self.rows_per_item as i32, self.eps);
            let slice = if wt == "f16" {
                // SAFETY: every element is written by the kernel.
                let dst = unsafe { dev.alloc::<half::f16>(el)? };
                let mut b = func.builder();
                b.arg(&xp);
                b.arg(&dst);
                b.arg(&wp);
                b.arg(&sp);
                b.arg(&n);
                b.arg(&per);
                b.arg(&eps);
                // SAFETY: x holds rows·ncols elements, w ncols, s items·ncols (or is null), dst el.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::F16(dst)
            } else {
                // SAFETY: every element is written by the kernel.
                let dst = unsafe { dev.alloc::<half::bf16>(el)? };
                let mut b = func.builder();
                b.arg(&xp);
                b.arg(&dst);
                b.arg(&wp);
                b.arg(&sp);
                b.arg(&n);
                b.arg(&per);
                b.arg(&eps);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::BF16(dst)
            };
            Ok((
                CudaStorage {
                    slice,
                    device: dev.clone(),
                },
                shape,
            ))
        }
    }

    impl CustomOp2 for RmsNormScale {
        fn name(&self) -> &'static str {
            "zt-rms-norm-scale"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("zt-rms-norm-scale runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            self.launch((x, xl), (w, wl), None)
        }
    }

    impl CustomOp3 for RmsNormScale {
        fn name(&self) -> &'static str {
            "zt-rms-norm-scale"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("zt-rms-norm-scale runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            s: &CudaStorage,
            sl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            self.launch((x, xl), (w, wl), Some((s, sl)))
        }
    }

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
