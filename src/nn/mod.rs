//! Shared model blocks: the AutoencoderKL decoder and encoder, the samplers' schedules and the
//! seeded noise (PyTorch's CPU generator for a job's draws).

pub mod rng;
pub mod scheduler;
pub mod torch_rng;
pub mod vae;
pub mod vae_encoder;
