//! Shared model blocks: the AutoencoderKL decoder, the samplers' schedules and the seeded noise.

pub mod rng;
pub mod scheduler;
pub mod vae;
