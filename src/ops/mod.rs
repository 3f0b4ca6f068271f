//! Every kernel zturbo runs beyond candle's own ops: one entry point per op, its CPU, CUDA (and
//! Metal) variants side by side, so models call the function and never dispatch on the device.

pub mod cuda;
pub mod linear;
