//! Getting a streamed block's weights onto the device ahead of use. On CUDA (feature `cuda`,
//! `stage_cuda.rs`) a helper thread copies block i+1 from the memory map into pinned host memory
//! and starts its upload on a second stream while block i computes; the compute stream waits on
//! the upload's event before it touches the tensors. Elsewhere blocks load as they always did
//! (a helper thread builds the next block), so this only defines the seam.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};

use super::Weights;
use crate::ops::quantized::StoredMatrix;

/// One tensor of a staged block, already on the device: a plain tensor in its stored dtype, or a
/// matrix kept quantized.
#[derive(Debug, Clone)]
pub enum Staged {
    Dense(Tensor),
    Matrix(StoredMatrix),
}

/// A staged block's tensors by their canonical names.
pub type StagedMap = HashMap<String, Staged>;

/// Moves blocks' tensors to the device ahead of use.
pub trait BlockStager: Send {
    /// Starts moving the tensors `names` of `weights` to the device and returns before the
    /// device has them. Runs on a helper thread while the previous block computes.
    fn stage(
        &mut self,
        weights: &Weights,
        names: &[String],
    ) -> candle_core::Result<Box<dyn StagedBlock>>;
}

/// A block whose upload has started.
pub trait StagedBlock: Send {
    /// Orders the compute stream after the upload and hands out the tensors.
    fn finish(self: Box<Self>) -> candle_core::Result<StagedMap>;
}

/// A stager shared by the block loop and its helper thread.
pub type SharedStager = Arc<Mutex<Box<dyn BlockStager>>>;

/// The stager for `device`, sized for blocks of at most `largest_block` stored bytes: pinned
/// double buffers and a copy stream on CUDA, none elsewhere.
pub fn for_device(
    device: &Device,
    largest_block: usize,
) -> candle_core::Result<Option<SharedStager>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let s: Box<dyn BlockStager> =
            Box::new(super::stage_cuda::CudaStager::new(d, largest_block)?);
        return Ok(Some(Arc::new(Mutex::new(s))));
    }
    let _ = (device, largest_block);
    Ok(None)
}
