//! The fused RMSNorm · weight (· per-item modulation) kernel (`rms_norm.cu`): f32 arithmetic over
//! half inputs, one rounding to the output type.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape};

use super::slice_ptr;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
const MODULE: &str = "zturbo_rms_norm";

pub(crate) struct RmsNormScale {
    pub(crate) eps: f32,
    pub(crate) rows_per_item: usize,
}

impl RmsNormScale {
    fn launch(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        s: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.0.device();
        let (xp, xt) = slice_ptr(x.0, x.1, "zt-rms-norm-scale")?;
        let (wp, wt) = slice_ptr(w.0, w.1, "zt-rms-norm-scale")?;
        let sp = match s {
            Some((st, sl)) => slice_ptr(st, sl, "zt-rms-norm-scale")?.0,
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
