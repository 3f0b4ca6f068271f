//! The row softmax kernel for half types (`softmax.cu`): one block per row, the row read once and
//! written once, f32 arithmetic.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));
const MODULE: &str = "zturbo_softmax";

/// Widest row the register-resident softmax takes (64 values per thread × 256 threads).
pub const MAX_COLS: usize = 64 * 256;

pub(crate) struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "zt-softmax-last-dim"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("zt-softmax-last-dim runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
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
