//! Memory: what the process and its devices hold (allocator, probes) and what a job will need (planner).
//! The bottom layer of the crate: it imports nothing from the rest of zturbo.

pub mod activations;
pub mod alloc;
pub mod bytes;
pub mod monitor;
pub mod planner;
pub mod probe;

pub use activations::{ActivationModel, SequenceActivations, VaeActivations};
pub use alloc::CountingAlloc;
pub use bytes::{format_bytes, parse_bytes, ParseBytesError};
pub use planner::{
    default_reserve, max_batch, plan, ComponentBytes, MemoryMode, Plan, PlanInput, Residency,
    VaeTiling,
};
pub use probe::{CpuProbe, DeviceKind, MemoryProbe, MemoryReading};
