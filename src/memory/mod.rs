//! Memory: what the process and its devices hold (allocator, probes) and what a job will need (planner).
//! The bottom layer of the crate: it imports nothing from the rest of zturbo.

pub mod alloc;
pub mod monitor;
pub mod planner;
pub mod probe;

pub use alloc::CountingAlloc;
pub use planner::{
    default_reserve, format_bytes, max_batch, parse_bytes, plan, ActivationModel, ComponentBytes,
    MemoryMode, ParseBytesError, Plan, PlanInput, Residency, VaeTiling,
};
pub use probe::{CpuProbe, DeviceKind, MemoryProbe, MemoryReading};
