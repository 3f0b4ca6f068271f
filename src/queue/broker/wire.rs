//! What travels through the broker, as JSON: a job's stream entry, a worker's registration, a
//! model's record (so the front door can validate requests without loading the model), and a
//! run's outcome.

use serde::{Deserialize, Serialize};

use crate::engine::{Notice, ResolvedParams, Timings};
use crate::families::{Defaults, FamilyKind, Profile};
use crate::prompt::Enhanced;
use crate::queue::job::JobError;
use crate::request::ValidRequest;

/// The `entry` field of a job's stream entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobEntry {
    pub request: ValidRequest,
    /// When the front door accepted it (ms since the Unix epoch).
    pub created_at: u64,
}

/// What a worker says about itself with every heartbeat (`zturbo:worker:<name>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub model: String,
    /// `cpu`, `cuda:0`, `metal`.
    pub device: String,
    pub device_name: String,
    pub total_bytes: u64,
    /// The job it runs, if any.
    pub job: Option<String>,
    pub step: usize,
    pub total_steps: usize,
    /// When it registered, and when it was last heard from (ms since the Unix epoch).
    pub started_at: u64,
    pub seen_at: u64,
}

/// A model as its workers serve it (`zturbo:model:<name>`): enough for the front door to
/// validate requests and fill `/api/info` while it loads no model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub model: String,
    pub family: FamilyKind,
    pub defaults: Defaults,
    pub max_batch: u32,
    pub demo: bool,
    pub description: String,
}

impl ModelRecord {
    /// The profile the workers run with (the family's, with the model's defaults).
    pub fn profile(&self) -> Profile {
        Profile {
            defaults: self.defaults,
            ..self.family.profile()
        }
    }
}

/// How a remote run ended: the `record` field of `zturbo:result:<id>` (the PNG bytes sit beside
/// it as `png:1`, `png:2`, …).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum RemoteEnd {
    Done(Box<RemoteDone>),
    Failed { error: JobError },
    Cancelled,
}

impl RemoteEnd {
    pub fn outcome(&self) -> &'static str {
        match self {
            RemoteEnd::Done(_) => "done",
            RemoteEnd::Failed { .. } => "failed",
            RemoteEnd::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteDone {
    pub params: ResolvedParams,
    pub enhancement: Enhanced,
    pub notices: Vec<Notice>,
    pub timings: Timings,
    pub peak_memory_bytes: u64,
    pub plan: crate::memory::planner::Plan,
    /// Each image's own seed, in the order of the images.
    #[serde(default)]
    pub image_seeds: Vec<u64>,
}

/// A step as the `progress` event carries it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
    pub elapsed_ms: u64,
}
