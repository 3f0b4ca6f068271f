//! The CLI's commands beyond `serve` (which is `zturbo::server::run`; `worker` is its remote half): their own arguments and
//! what each prints for a terminal user.

pub mod generate;
pub mod hostile;
pub mod models;
pub mod quantize;
pub mod soak;
pub mod worker;
