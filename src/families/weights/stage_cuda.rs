//! Block streaming on CUDA: pinned (page-locked) host staging and a second stream.
//!
//! Copying a block straight from the memory map is a synchronous copy from pageable memory on the
//! compute stream: the GPU idles while the driver pages and bounces every byte (the 60 s low mode
//! of issue 16). Here a helper thread copies block i+1's bytes from the map into one of two
//! pinned buffers (plain CPU memcpy, overlapping block i's kernels), then enqueues the uploads on
//! a dedicated copy stream and records an event; the block loop makes the compute stream wait on
//! that event before it builds the block from the uploaded tensors, and records a compute-stream
//! event that the buffer must reach before it is refilled (two blocks later).

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

use super::stage::{BlockStager, Staged, StagedBlock, StagedMap};
use super::{Encoding, Weights};
use crate::ops::quantized::{BlockArithmetic, BlockMatrix, Fp8Matrix, StoredMatrix};

/// Offsets inside a buffer are rounded to this (every element type's alignment and more).
const ALIGN: usize = 256;

/// A pinned buffer and the compute-stream event after which it may be overwritten.
struct Buffer {
    host: Arc<PinnedHostSlice<u8>>,
    ptr: *mut u8,
    len: usize,
    last_use: Arc<Mutex<Option<CudaEvent>>>,
}

// SAFETY: `ptr` points into the pinned allocation `host` keeps alive; it is written only by the
// stager (one thread at a time, behind the shared stager's mutex) after `last_use` has passed.
unsafe impl Send for Buffer {}

pub struct CudaStager {
    device: CudaDevice,
    copy: Arc<CudaStream>,
    buffers: Vec<Buffer>,
    next: usize,
}

fn pinned(device: &CudaDevice, len: usize) -> candle_core::Result<Buffer> {
    let ctx = device.cuda_stream().context().clone();
    // SAFETY: the memory is written before any read (stage copies into it, then uploads).
    let mut host = unsafe { ctx.alloc_pinned::<u8>(len.max(ALIGN)) }.w()?;
    let ptr = host.as_mut_ptr().w()?;
    let len = host.len();
    Ok(Buffer {
        host: Arc::new(host),
        ptr,
        len,
        last_use: Arc::new(Mutex::new(None)),
    })
}

impl CudaStager {
    /// Two pinned buffers of `largest_block` bytes (grown if a block needs more) and a copy
    /// stream on `device`.
    pub fn new(device: &CudaDevice, largest_block: usize) -> candle_core::Result<Self> {
        let copy = device.cuda_stream().context().new_stream().w()?;
        let cap = largest_block + 64 * ALIGN;
        Ok(Self {
            device: device.clone(),
            copy,
            buffers: vec![pinned(device, cap)?, pinned(device, cap)?],
            next: 0,
        })
    }
}

/// Where one staged tensor's bytes went.
enum Part {
    Dense {
        name: String,
        storage: CudaStorage,
        shape: Vec<usize>,
    },
    Fp8 {
        name: String,
        storage: CudaStorage,
        shape: Vec<usize>,
        matrix: Fp8Matrix,
    },
    /// GGUF blocks: built from the pinned bytes on the compute stream in `finish` (candle builds
    /// quantized device storage only from host bytes).
    Blocks {
        name: String,
        offset: usize,
        len: usize,
        dtype: candle_core::quantized::GgmlDType,
        shape: Vec<usize>,
        arithmetic: BlockArithmetic,
    },
}

struct CudaStaged {
    device: CudaDevice,
    parts: Vec<Part>,
    done: CudaEvent,
    host: Arc<PinnedHostSlice<u8>>,
    host_ptr: usize,
    last_use: Arc<Mutex<Option<CudaEvent>>>,
}

// SAFETY: the raw pointer refers to the pinned allocation `host` keeps alive; the CUDA handles
// are thread-safe (cudarc's own types are Send + Sync).
unsafe impl Send for CudaStaged {}

/// Uploads `bytes` (a slice of pinned memory) as a new device buffer of `T` on `stream`.
fn upload<
    T: candle_core::cuda_backend::cudarc::driver::DeviceRepr + candle_core::cuda_backend::CudaDType,
>(
    stream: &Arc<CudaStream>,
    device: &CudaDevice,
    bytes: &[u8],
) -> candle_core::Result<CudaStorage> {
    let n = bytes.len() / std::mem::size_of::<T>();
    // SAFETY: `bytes` is ALIGN-aligned pinned memory holding `n` values of plain-old-data `T`.
    let src: &[T] = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) };
    // SAFETY: fully written by the copy just below before any kernel reads it.
    let mut dst = unsafe { stream.alloc::<T>(n) }.w()?;
    stream.memcpy_htod(src, &mut dst).w()?;
    Ok(CudaStorage::wrap_cuda_slice(dst, device.clone()))
}

impl BlockStager for CudaStager {
    fn stage(
        &mut self,
        weights: &Weights,
        names: &[String],
    ) -> candle_core::Result<Box<dyn StagedBlock>> {
        let slot = self.next;
        self.next = (self.next + 1) % self.buffers.len();
        // The buffer's previous block must be done with it (its uploads and any compute-stream
        // copy from it), two blocks back.
        if let Some(ev) = self.buffers[slot].last_use.lock().map_err(poisoned)?.take() {
            ev.synchronize().w()?;
        }
        let mut layout = Vec::with_capacity(names.len());
        let mut total = 0usize;
        for n in names {
            let (info, bytes) = weights.raw_parts(n)?;
            let offset = total.div_ceil(ALIGN) * ALIGN;
            total = offset + bytes.len();
            layout.push((n, info.clone(), bytes, offset));
        }
        if total > self.buffers[slot].len {
            self.buffers[slot] = pinned(&self.device, total + total / 8)?;
        }
        let buf = &self.buffers[slot];
        // CPU copy from the map into pinned memory: the part that overlaps block i's kernels.
        for (_, _, bytes, offset) in &layout {
            // SAFETY: offset + len ≤ total ≤ buf.len, and the buffer is not in use (above).
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.ptr.add(*offset), bytes.len());
            }
        }
        let pinned_at = |offset: usize, len: usize| -> &[u8] {
            // SAFETY: inside the buffer, written just above.
            unsafe { std::slice::from_raw_parts(buf.ptr.add(offset), len) }
        };
        let mut parts = Vec::with_capacity(layout.len());
        for (name, info, bytes, offset) in layout {
            let src = pinned_at(offset, bytes.len());
            let name = name.clone();
            let shape = info.shape.clone();
            let part = match info.encoding {
                Encoding::Dense(DType::BF16) => Part::Dense {
                    name,
                    storage: upload::<bf16>(&self.copy, &self.device, src)?,
                    shape,
                },
                Encoding::Dense(DType::F16) => Part::Dense {
                    name,
                    storage: upload::<f16>(&self.copy, &self.device, src)?,
                    shape,
                },
                Encoding::Dense(DType::F32) => Part::Dense {
                    name,
                    storage: upload::<f32>(&self.copy, &self.device, src)?,
                    shape,
                },
                Encoding::Dense(other) => {
                    candle_core::bail!(
                        "tensor `{}`: cannot stream {other:?} weights",
                        info.stored_name
                    )
                }
                Encoding::Fp8 { format, scale } => Part::Fp8 {
                    storage: upload::<u8>(&self.copy, &self.device, src)?,
                    matrix: Fp8Matrix {
                        codes: Tensor::zeros(1, DType::U8, &Device::Cpu)?,
                        format,
                        scale,
                    },
                    name,
                    shape,
                },
                Encoding::Blocks(t) => match t {
                    candle_core::quantized::GgmlDType::F32 => Part::Dense {
                        name,
                        storage: upload::<f32>(&self.copy, &self.device, src)?,
                        shape,
                    },
                    candle_core::quantized::GgmlDType::F16 => Part::Dense {
                        name,
                        storage: upload::<f16>(&self.copy, &self.device, src)?,
                        shape,
                    },
                    candle_core::quantized::GgmlDType::BF16 => Part::Dense {
                        name,
                        storage: upload::<bf16>(&self.copy, &self.device, src)?,
                        shape,
                    },
                    q => Part::Blocks {
                        name,
                        offset,
                        len: src.len(),
                        dtype: q,
                        shape,
                        arithmetic: weights.arithmetic(),
                    },
                },
            };
            parts.push(part);
        }
        let done = self.copy.record_event(None).w()?;
        Ok(Box::new(CudaStaged {
            device: self.device.clone(),
            parts,
            done,
            host: buf.host.clone(),
            host_ptr: buf.ptr as usize,
            last_use: buf.last_use.clone(),
        }))
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> candle_core::Error {
    candle_core::Error::Msg("the block stager's lock was poisoned".into())
}

impl StagedBlock for CudaStaged {
    fn finish(self: Box<Self>) -> candle_core::Result<StagedMap> {
        let compute = self.device.cuda_stream();
        // Everything below runs on the compute stream after the uploads.
        compute.wait(&self.done).w()?;
        let device = Device::Cuda(self.device.clone());
        let mut map = StagedMap::with_capacity(self.parts.len());
        for part in self.parts {
            match part {
                Part::Dense {
                    name,
                    storage,
                    shape,
                } => {
                    let t = Tensor::from_storage(
                        Storage::Cuda(storage),
                        shape,
                        BackpropOp::none(),
                        false,
                    );
                    map.insert(name, Staged::Dense(t));
                }
                Part::Fp8 {
                    name,
                    storage,
                    shape,
                    matrix,
                } => {
                    let codes = Tensor::from_storage(
                        Storage::Cuda(storage),
                        shape,
                        BackpropOp::none(),
                        false,
                    );
                    map.insert(
                        name,
                        Staged::Matrix(StoredMatrix::Fp8(Fp8Matrix { codes, ..matrix })),
                    );
                }
                Part::Blocks {
                    name,
                    offset,
                    len,
                    dtype,
                    shape,
                    arithmetic,
                } => {
                    // SAFETY: inside the pinned buffer `self.host` keeps alive; not overwritten
                    // before `last_use` (recorded below) has passed.
                    let bytes = unsafe {
                        std::slice::from_raw_parts((self.host_ptr + offset) as *const u8, len)
                    };
                    let storage =
                        QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &device, dtype)?;
                    let q = QTensor::new(storage, shape)?;
                    map.insert(
                        name,
                        Staged::Matrix(StoredMatrix::Blocks(BlockMatrix {
                            blocks: Arc::new(q),
                            arithmetic,
                        })),
                    );
                }
            }
        }
        // The buffer may be refilled once the compute stream is past this point (the uploads it
        // waited on, and any copy from it just above).
        let ev = compute.record_event(None).w()?;
        *self.last_use.lock().map_err(poisoned)? = Some(ev);
        drop(self.host);
        Ok(map)
    }
}
