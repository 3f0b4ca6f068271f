//! The CLI's commands beyond `serve` (which is `zturbo::server::run`): their own arguments and
//! what each prints for a terminal user.

pub mod generate;
pub mod hostile;
pub mod models;
pub mod quantize;
pub mod soak;
