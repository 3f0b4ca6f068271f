//! Kernels and weight storage shared by every model (see DESIGN.md, `src/ops/`).

pub mod dequant_f16;
pub mod quantized;
