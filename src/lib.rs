//! zturbo: a local image-generation server for Turbo diffusion models on candle.
//! Layers, top to bottom: server → queue → engine → families → memory.

pub mod families;
