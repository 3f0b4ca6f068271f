//! Weights that stay quantized in memory — GGUF blocks and fp8 codes — and are dequantized into
//! the compute dtype just before each product (one layer at a time), on every device with the
//! same function. candle's CUDA quantized-matmul kernels are deliberately not used: they return
//! inf in Z-Image's feed-forward `w2` (k = 10240), which makes every image black (mold#1110).

use std::sync::Arc;

use candle_core::quantized::{k_quants, GgmlDType, GgmlType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

pub use super::cpu::int8::PackedInt8;

/// The fp8 encodings found in safetensors files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// 4 exponent bits, 3 mantissa bits, no infinities, ±448 (`float8_e4m3fn`).
    E4M3Fn,
    /// 5 exponent bits, 2 mantissa bits, IEEE-like with infinities (`float8_e5m2`).
    E5M2,
}

impl Fp8Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::E4M3Fn => "float8_e4m3fn",
            Self::E5M2 => "float8_e5m2",
        }
    }

    /// The value of one code, exactly (every fp8 value is an f32).
    pub fn decode(self, byte: u8) -> f32 {
        let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
        match self {
            Self::E4M3Fn => {
                let exp = ((byte >> 3) & 0x0f) as i32;
                let man = (byte & 0x07) as f32;
                if exp == 0x0f && byte & 0x07 == 0x07 {
                    return f32::NAN;
                }
                if exp == 0 {
                    sign * man / 8.0 * 2f32.powi(-6)
                } else {
                    sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
                }
            }
            Self::E5M2 => {
                let exp = ((byte >> 2) & 0x1f) as i32;
                let man = (byte & 0x03) as f32;
                if exp == 0x1f {
                    return if man == 0.0 {
                        sign * f32::INFINITY
                    } else {
                        f32::NAN
                    };
                }
                if exp == 0 {
                    sign * man / 4.0 * 2f32.powi(-14)
                } else {
                    sign * (1.0 + man / 4.0) * 2f32.powi(exp - 15)
                }
            }
        }
    }

    /// All 256 values, indexed by code.
    pub fn table(self) -> [f32; 256] {
        std::array::from_fn(|i| self.decode(i as u8))
    }
}

/// A 2-D weight `[rows, cols]` as it is stored: dense, GGUF blocks, or fp8 codes with a scale.
#[derive(Debug, Clone)]
pub enum StoredMatrix {
    Dense(Tensor),
    Blocks(BlockMatrix),
    Fp8(Fp8Matrix),
    /// Per-channel int8 codes packed for the CPU's int8 kernel (`--precision int8`).
    Int8(Arc<PackedInt8>),
}

/// How GGUF blocks become values. The two reference tools for our two components differ:
/// ComfyUI-GGUF and diffusers decode DiT weights with half-precision arithmetic, llama.cpp and
/// transformers (gguf-py) decode in f32. A component decodes the way the tools people compare
/// against do, so its outputs match theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockArithmetic {
    /// `d·q − m` in f32 (llama.cpp, stable-diffusion.cpp, transformers).
    #[default]
    F32,
    /// Every product and difference rounded to f16 (ComfyUI-GGUF, diffusers).
    F16,
}

/// GGUF blocks on a device (on the host for the CPU), with the arithmetic that decodes them.
#[derive(Debug, Clone)]
pub struct BlockMatrix {
    pub blocks: Arc<QTensor>,
    pub arithmetic: BlockArithmetic,
}

/// fp8 codes `[rows, cols]` (u8) with the per-tensor scale ComfyUI stores as `scale_weight`.
#[derive(Debug, Clone)]
pub struct Fp8Matrix {
    pub codes: Tensor,
    pub format: Fp8Format,
    pub scale: f32,
}

impl StoredMatrix {
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Dense(t) => t.dims(),
            Self::Blocks(q) => q.blocks.shape().dims(),
            Self::Fp8(f) => f.codes.dims(),
            Self::Int8(q) => q.shape(),
        }
    }

    /// Bytes this weight holds on its device.
    pub fn stored_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Blocks(q) => q.blocks.storage_size_in_bytes(),
            Self::Fp8(f) => f.codes.elem_count(),
            Self::Int8(q) => q.bytes(),
        }
    }

    /// True unless the weight is a plain tensor.
    pub fn is_quantized(&self) -> bool {
        !matches!(self, Self::Dense(_))
    }

    /// A short name of the storage: `f32`, `q8_0`, `float8_e4m3fn` …
    pub fn kind(&self) -> String {
        match self {
            Self::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Self::Blocks(q) => ggml_name(q.blocks.dtype()).to_string(),
            Self::Fp8(f) => f.format.name().to_string(),
            Self::Int8(_) => "int8".to_string(),
        }
    }

    /// The weight as a dense tensor in `dtype` on its own device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(t) => t.to_dtype(dtype),
            Self::Blocks(q) => dequantize_blocks(&q.blocks, dtype, q.arithmetic),
            Self::Fp8(f) => f.dequantize(dtype),
            Self::Int8(q) => {
                let (n, k) = q.dims();
                Tensor::from_vec(q.dequantize(), (n, k), &Device::Cpu)?.to_dtype(dtype)
            }
        }
    }

    /// The weight quantized to per-channel int8 for the CPU's int8 kernel (from any storage: it
    /// is dequantized to f32 first, one layer at a time); a weight already in int8 is shared.
    pub fn to_int8(&self) -> Result<Self> {
        if let Self::Int8(_) = self {
            return Ok(self.clone());
        }
        let w = self.dequantize(DType::F32)?;
        let (n, k) = w.dims2()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let packed = PackedInt8::quantize(&values, n, k).map_err(candle_core::Error::Msg)?;
        Ok(Self::Int8(Arc::new(packed)))
    }
}

impl Fp8Matrix {
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let table = self.format.table();
        let dev = self.codes.device();
        if dev.is_cpu() {
            let codes = self.codes.flatten_all()?.to_vec1::<u8>()?;
            let scale = self.scale;
            let t = match dtype {
                DType::BF16 => {
                    let lut: Vec<bf16> = table.iter().map(|v| bf16::from_f32(v * scale)).collect();
                    let out: Vec<bf16> = codes.par_iter().map(|&c| lut[c as usize]).collect();
                    Tensor::from_vec(out, self.codes.shape(), dev)?
                }
                DType::F16 => {
                    let lut: Vec<f16> = table.iter().map(|v| f16::from_f32(v * scale)).collect();
                    let out: Vec<f16> = codes.par_iter().map(|&c| lut[c as usize]).collect();
                    Tensor::from_vec(out, self.codes.shape(), dev)?
                }
                _ => {
                    let lut: Vec<f32> = table.iter().map(|v| v * scale).collect();
                    let out: Vec<f32> = codes.par_iter().map(|&c| lut[c as usize]).collect();
                    Tensor::from_vec(out, self.codes.shape(), dev)?.to_dtype(dtype)?
                }
            };
            return Ok(t);
        }
        // On a GPU: a gather from the 256-entry table (in f32, so the scale multiplies exactly
        // as ComfyUI's `weight.to(f32) * scale_weight` does), then the compute dtype.
        let lut: Vec<f32> = table.iter().map(|v| v * self.scale).collect();
        let lut = Tensor::from_vec(lut, 256, dev)?;
        let w = lut
            .index_select(&self.codes.flatten_all()?, 0)?
            .reshape(self.codes.shape())?;
        w.to_dtype(dtype)
    }
}

/// The lower-case GGUF name of a block type (`q4_k`, `bf16` …).
pub fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// Builds a block tensor on `device` from the raw bytes of a GGUF tensor (`rows × cols` values;
/// `bytes.len()` must already have been checked against the type's block size).
pub fn blocks_from_bytes(
    bytes: &[u8],
    dtype: GgmlDType,
    dims: &[usize],
    device: &Device,
) -> Result<QTensor> {
    let elems: usize = dims.iter().product();
    let block = dtype.block_size();
    if elems % block != 0 || bytes.len() != elems / block * dtype.type_size() {
        candle_core::bail!(
            "{} values of {} do not fill {} bytes",
            elems,
            ggml_name(dtype),
            bytes.len()
        )
    }
    // candle reinterprets the bytes as blocks: they must sit at an aligned address (a mapping of a
    // well-formed file always does; copy otherwise).
    let storage = if (bytes.as_ptr() as usize) % 8 == 0 {
        QStorage::from_data(std::borrow::Cow::Borrowed(bytes), device, dtype)?
    } else {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `words` spans at least `bytes.len()` bytes; u8 has no alignment needs.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, bytes.len()) };
        dst.copy_from_slice(bytes);
        QStorage::from_data(std::borrow::Cow::Borrowed(&*dst), device, dtype)?
    };
    QTensor::new(storage, dims)
}

/// Rows dequantized per rayon task: big enough to amortise the task, small enough to spread.
const ROWS_PER_TASK: usize = 16;

/// Dequantizes GGUF blocks into `dtype` on their own device: on the CPU in parallel over rows
/// (candle's f32 block decoders, or ours in f16 arithmetic), on a GPU with candle's dequantize
/// kernels (f32 arithmetic; with [`BlockArithmetic::F16`] the values are then rounded to f16).
pub fn dequantize_blocks(q: &QTensor, dtype: DType, arithmetic: BlockArithmetic) -> Result<Tensor> {
    let dev = q.device();
    if !dev.is_cpu() {
        return match (dtype, arithmetic) {
            (DType::F16, _) => q.dequantize_f16(&dev),
            (_, BlockArithmetic::F16) => q.dequantize_f16(&dev)?.to_dtype(dtype),
            _ => q.dequantize(&dev)?.to_dtype(dtype),
        };
    }
    let dims = q.shape().dims().to_vec();
    let cols = *dims.last().unwrap_or(&1);
    let rows = q.shape().elem_count() / cols.max(1);
    let data = q.data()?;
    if arithmetic == BlockArithmetic::F16 {
        if let Some((block, bytes)) = super::dequant_f16::block_shape(q.dtype()) {
            return decode_rows_f16(&data, q.dtype(), (block, bytes), rows, cols, dtype, &dims);
        }
    }
    macro_rules! with_block {
        ($ty:ty) => {
            decode_rows::<$ty>(&data, rows, cols, dtype, &dims)
        };
    }
    match q.dtype() {
        GgmlDType::F32 => with_block!(f32),
        GgmlDType::F16 => with_block!(f16),
        GgmlDType::BF16 => with_block!(bf16),
        GgmlDType::Q4_0 => with_block!(k_quants::BlockQ4_0),
        GgmlDType::Q4_1 => with_block!(k_quants::BlockQ4_1),
        GgmlDType::Q5_0 => with_block!(k_quants::BlockQ5_0),
        GgmlDType::Q5_1 => with_block!(k_quants::BlockQ5_1),
        GgmlDType::Q8_0 => with_block!(k_quants::BlockQ8_0),
        GgmlDType::Q8_1 => with_block!(k_quants::BlockQ8_1),
        GgmlDType::Q2K => with_block!(k_quants::BlockQ2K),
        GgmlDType::Q3K => with_block!(k_quants::BlockQ3K),
        GgmlDType::Q4K => with_block!(k_quants::BlockQ4K),
        GgmlDType::Q5K => with_block!(k_quants::BlockQ5K),
        GgmlDType::Q6K => with_block!(k_quants::BlockQ6K),
        GgmlDType::Q8K => with_block!(k_quants::BlockQ8K),
    }
}

fn decode_rows<B: GgmlType>(
    data: &[u8],
    rows: usize,
    cols: usize,
    dtype: DType,
    dims: &[usize],
) -> Result<Tensor> {
    let per_row = cols / B::BLCK_SIZE;
    let size = std::mem::size_of::<B>();
    if cols % B::BLCK_SIZE != 0
        || data.len() != rows * per_row * size
        || (data.as_ptr() as usize) % std::mem::align_of::<B>() != 0
    {
        candle_core::bail!("quantized data does not match its shape {dims:?}")
    }
    // SAFETY: length and alignment checked above; the block types are plain old data
    // (`repr(C)` structs of integers and halves), valid for any bit pattern.
    let blocks: &[B] =
        unsafe { std::slice::from_raw_parts(data.as_ptr() as *const B, rows * per_row) };
    let chunk = ROWS_PER_TASK * cols;
    let task_blocks = ROWS_PER_TASK * per_row;
    match dtype {
        DType::F32 => {
            let mut out = vec![0f32; rows * cols];
            out.par_chunks_mut(chunk)
                .zip(blocks.par_chunks(task_blocks))
                .for_each(|(o, b)| B::to_float(b, o));
            Tensor::from_vec(out, dims, &Device::Cpu)
        }
        DType::BF16 | DType::F16 => {
            let mut out = vec![0u16; rows * cols];
            out.par_chunks_mut(chunk)
                .zip(blocks.par_chunks(task_blocks))
                .for_each(|(o, b)| {
                    let mut tmp = vec![0f32; o.len()];
                    B::to_float(b, &mut tmp);
                    if dtype == DType::BF16 {
                        for (d, s) in o.iter_mut().zip(&tmp) {
                            *d = bf16::from_f32(*s).to_bits();
                        }
                    } else {
                        for (d, s) in o.iter_mut().zip(&tmp) {
                            *d = f16::from_f32(*s).to_bits();
                        }
                    }
                });
            if dtype == DType::BF16 {
                let out: Vec<bf16> = out.into_iter().map(bf16::from_bits).collect();
                Tensor::from_vec(out, dims, &Device::Cpu)
            } else {
                let out: Vec<f16> = out.into_iter().map(f16::from_bits).collect();
                Tensor::from_vec(out, dims, &Device::Cpu)
            }
        }
        other => {
            let mut out = vec![0f32; rows * cols];
            out.par_chunks_mut(chunk)
                .zip(blocks.par_chunks(task_blocks))
                .for_each(|(o, b)| B::to_float(b, o));
            Tensor::from_vec(out, dims, &Device::Cpu)?.to_dtype(other)
        }
    }
}

/// [`decode_rows`] with the f16-arithmetic decoders of [`super::dequant_f16`].
fn decode_rows_f16(
    data: &[u8],
    t: GgmlDType,
    (block, bytes): (usize, usize),
    rows: usize,
    cols: usize,
    dtype: DType,
    dims: &[usize],
) -> Result<Tensor> {
    let per_row = cols / block;
    if cols % block != 0 || data.len() != rows * per_row * bytes {
        candle_core::bail!("quantized data does not match its shape {dims:?}")
    }
    let decode = |o: &mut [f32], b: &[u8]| super::dequant_f16::decode_blocks(t, block, bytes, b, o);
    let chunk = ROWS_PER_TASK * cols;
    let task_bytes = ROWS_PER_TASK * per_row * bytes;
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(chunk)
        .zip(data.par_chunks(task_bytes))
        .for_each(|(o, b)| decode(o, b));
    // f16-exact values: the conversion to f16 is exact, to bf16 one rounding.
    Tensor::from_vec(out, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// `x·Wᵀ` on the CPU with integer dot products: `x` (f32, `[…, k]`) is quantized to the blocks'
/// 8-bit partner type and multiplied against `w` (`[n, k]` blocks) by candle's vec-dot kernels,
/// without dequantizing `w` and without the repacked copy `QMatMul` keeps (which would double the
/// resident bytes). Approximate: the activations lose precision to 8 bits per 32 (or 256) values.
/// `None` for block types without a vec-dot kernel or off the CPU.
pub fn vec_dot_matmul(x: &Tensor, w: &QTensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || !w.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        candle_core::bail!("input {dims:?} does not end in the weight's {k} columns")
    }
    let m = x.elem_count() / k.max(1);
    let lhs = x.flatten_all()?.to_vec1::<f32>()?;
    let data = w.data()?;
    let mut dst = vec![0f32; m * n];
    macro_rules! with_block {
        ($ty:ty) => {{
            let size = std::mem::size_of::<$ty>();
            if data.len() != n * (k / <$ty as GgmlType>::BLCK_SIZE) * size
                || (data.as_ptr() as usize) % std::mem::align_of::<$ty>() != 0
            {
                candle_core::bail!("quantized data does not match its shape [{n}, {k}]")
            }
            // SAFETY: length and alignment checked; plain-old-data blocks.
            let blocks: &[$ty] = unsafe {
                std::slice::from_raw_parts(data.as_ptr() as *const $ty, data.len() / size)
            };
            k_quants::matmul::<$ty>((m, k, n), &lhs, blocks, &mut dst)?;
        }};
    }
    match w.dtype() {
        GgmlDType::Q4_0 => with_block!(k_quants::BlockQ4_0),
        GgmlDType::Q4_1 => with_block!(k_quants::BlockQ4_1),
        GgmlDType::Q5_0 => with_block!(k_quants::BlockQ5_0),
        GgmlDType::Q5_1 => with_block!(k_quants::BlockQ5_1),
        GgmlDType::Q8_0 => with_block!(k_quants::BlockQ8_0),
        GgmlDType::Q2K => with_block!(k_quants::BlockQ2K),
        GgmlDType::Q3K => with_block!(k_quants::BlockQ3K),
        GgmlDType::Q4K => with_block!(k_quants::BlockQ4K),
        GgmlDType::Q5K => with_block!(k_quants::BlockQ5K),
        GgmlDType::Q6K => with_block!(k_quants::BlockQ6K),
        _ => return Ok(None),
    }
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    Ok(Some(Tensor::from_vec(dst, out_dims, &Device::Cpu)?))
}

/// Quantizes a 2-D f32 host tensor into `dtype` blocks, in parallel over rows (candle's reference
/// quantizers, the same as ggml's `quantize_row_*_ref`). The row length must divide into blocks.
pub fn quantize_rows(w: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    let dims = w.dims().to_vec();
    let cols = *dims.last().unwrap_or(&1);
    if cols % dtype.block_size() != 0 {
        candle_core::bail!(
            "rows of {cols} values do not divide into {} blocks of {}",
            ggml_name(dtype),
            dtype.block_size()
        )
    }
    let values = w
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    macro_rules! with_block {
        ($ty:ty) => {
            encode_rows::<$ty>(&values, cols, dtype, &dims)
        };
    }
    match dtype {
        GgmlDType::F32 => with_block!(f32),
        GgmlDType::F16 => with_block!(f16),
        GgmlDType::BF16 => with_block!(bf16),
        GgmlDType::Q4_0 => with_block!(k_quants::BlockQ4_0),
        GgmlDType::Q4_1 => with_block!(k_quants::BlockQ4_1),
        GgmlDType::Q5_0 => with_block!(k_quants::BlockQ5_0),
        GgmlDType::Q5_1 => with_block!(k_quants::BlockQ5_1),
        GgmlDType::Q8_0 => with_block!(k_quants::BlockQ8_0),
        GgmlDType::Q8_1 => with_block!(k_quants::BlockQ8_1),
        GgmlDType::Q2K => with_block!(k_quants::BlockQ2K),
        GgmlDType::Q3K => with_block!(k_quants::BlockQ3K),
        GgmlDType::Q4K => with_block!(k_quants::BlockQ4K),
        GgmlDType::Q5K => with_block!(k_quants::BlockQ5K),
        GgmlDType::Q6K => with_block!(k_quants::BlockQ6K),
        GgmlDType::Q8K => with_block!(k_quants::BlockQ8K),
    }
}

fn encode_rows<B: GgmlType>(
    values: &[f32],
    cols: usize,
    dtype: GgmlDType,
    dims: &[usize],
) -> Result<QTensor> {
    let per_row = cols / B::BLCK_SIZE;
    let rows = values.len() / cols.max(1);
    let mut blocks: Vec<B> = vec![B::zeros(); rows * per_row];
    blocks
        .par_chunks_mut(per_row.max(1) * ROWS_PER_TASK)
        .zip(values.par_chunks(cols.max(1) * ROWS_PER_TASK))
        .for_each(|(b, v)| B::from_float(v, b));
    let size = std::mem::size_of::<B>();
    // SAFETY: plain-old-data blocks viewed as their bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, blocks.len() * size) };
    blocks_from_bytes(bytes, dtype, dims, &Device::Cpu)
}

/// A low-rank update `scale · B·A` added to a linear layer's output at run time (LoRA):
/// `a` is `[rank, in]`, `b` is `[out, rank]`. The base weight is never touched, so deltas can be
/// attached, replaced and removed between jobs without reloading it, quantized or not.
#[derive(Debug, Clone)]
pub struct LowRankDelta {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl LowRankDelta {
    /// `x·Aᵀ·Bᵀ·scale` for `x` `[…, in]`, in `x`'s dtype.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        let h = x.broadcast_matmul(&a.t()?)?;
        h.broadcast_matmul(&b.t()?)? * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_tables_match_the_formats() {
        // Reference values: the OCP fp8 spec (and torch's float8 casts): e4m3fn max 448, min
        // subnormal 2^-9, 0x7f NaN; e5m2 max 57344, min subnormal 2^-16, 0x7c inf.
        let e4 = Fp8Format::E4M3Fn;
        assert_eq!(e4.decode(0x7e), 448.0);
        assert_eq!(e4.decode(0x01), 2f32.powi(-9));
        assert_eq!(e4.decode(0x38), 1.0);
        assert_eq!(e4.decode(0xb8), -1.0);
        assert!(e4.decode(0x7f).is_nan());
        let e5 = Fp8Format::E5M2;
        assert_eq!(e5.decode(0x7b), 57344.0);
        assert_eq!(e5.decode(0x01), 2f32.powi(-16));
        assert_eq!(e5.decode(0x3c), 1.0);
        assert_eq!(e5.decode(0x7c), f32::INFINITY);
        assert!(e5.decode(0x7d).is_nan());
    }

    #[test]
    fn parallel_dequantize_matches_candle() {
        // candle's own (single-threaded) dequantize is the reference.
        let w = Tensor::randn(0f32, 1.0, (40, 512), &Device::Cpu).unwrap();
        for t in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let q = quantize_rows(&w, t).unwrap();
            let want = QTensor::quantize(&w, t)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let got = dequantize_blocks(&q, DType::F32, BlockArithmetic::F32).unwrap();
            let diff = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{t:?}");
            let b = dequantize_blocks(&q, DType::BF16, BlockArithmetic::F32).unwrap();
            assert_eq!(b.dtype(), DType::BF16);
            // Half arithmetic differs from f32 by at most a few f16 roundings of each value.
            let h = dequantize_blocks(&q, DType::F32, BlockArithmetic::F16).unwrap();
            let rel = ((h - &want).unwrap().abs().unwrap().max_all().unwrap())
                .to_scalar::<f32>()
                .unwrap();
            assert!(rel < 4e-3 * 8.0, "{t:?}: {rel}");
        }
    }

    #[test]
    fn low_rank_delta_is_b_times_a() {
        let d = Device::Cpu;
        let a = Tensor::new(&[[1f32, 0., 2.]], &d).unwrap(); // [1, 3]
        let b = Tensor::new(&[[1f32], [3.]], &d).unwrap(); // [2, 1]
        let delta = LowRankDelta { a, b, scale: 0.5 };
        let x = Tensor::new(&[[1f32, 1., 1.]], &d).unwrap();
        let y = delta.apply(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![1.5, 4.5]]);
    }
}
