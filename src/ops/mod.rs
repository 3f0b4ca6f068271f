//! Every kernel zturbo runs beyond candle's own ops: one entry point per op, its CPU, CUDA (and
//! Metal) variants side by side (the model: candle-nn's `SoftmaxLastDim`), so models call the
//! function and never dispatch on the device. `cpu/` holds the CPU kernels (custom candle ops),
//! `cuda/` one `.cu` kernel per file; the caps the memory planner models are `pub const`s here.
//! `quantized` is the weight storage a linear layer multiplies with (GGUF blocks, fp8, float),
//! dequantized per product (`dequant_f16`: the K-quant decoders in f16 arithmetic).
//! Depends on candle only.

pub mod act;
pub mod attention;
pub mod conv;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dequant_f16;
pub mod group_norm;
pub mod interrupt;
pub mod linear;
pub mod quantized;
pub mod rms_norm;
pub mod softmax;

pub use attention::attention;
pub use linear::{activation_dtype, bf16_ready, matmul, Lin};
