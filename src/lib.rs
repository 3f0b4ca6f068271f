//! zturbo: a local image-generation server for Turbo diffusion models on candle.
//! Layers, top to bottom: server → queue → engine → families → memory.

// The OpenAPI document is one large `json!` literal (server/openapi.rs).
#![recursion_limit = "256"]

pub mod control;
pub mod engine;
pub mod families;
pub mod i18n;
pub mod inputs;
pub mod memory;
pub mod nn;
pub mod ops;
pub mod profile;
pub mod prompt;
pub mod queue;
pub mod request;
pub mod server;
pub mod settings;

/// Every heap allocation is counted, so the CPU memory chart and per-job peaks are exact.
#[global_allocator]
static GLOBAL: memory::CountingAlloc = memory::CountingAlloc;
