//! zturbo's own CUDA kernels (feature `cuda`): each `*.cu` file here is one kernel, compiled to
//! its own PTX module by build.rs and loaded through candle's custom-module cache. The Rust side
//! of each is a candle custom op; `ops::softmax` and `ops::rms_norm` dispatch to them.

pub mod rms_norm;
pub mod softmax;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::Layout;

/// The device address of a contiguous f16/bf16 input from its first element, with the type's name
/// as the kernels' names spell it (`f16`, `bf16`); `op` names the kernel in errors.
fn slice_ptr(s: &CudaStorage, l: &Layout, op: &str) -> candle_core::Result<(u64, &'static str)> {
    let Some((o1, _)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: inputs must be contiguous");
    };
    let stream = s.device().cuda_stream();
    let (ptr, name) = match &s.slice {
        CudaStorageSlice::F16(v) => (v.slice(o1..).device_ptr(&stream).0, "f16"),
        CudaStorageSlice::BF16(v) => (v.slice(o1..).device_ptr(&stream).0, "bf16"),
        _ => candle_core::bail!("{op}: f16 or bf16 only"),
    };
    Ok((ptr, name))
}
