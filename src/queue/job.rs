//! A job's record (what the journal and the sidecar store), its states, and the events its
//! subscribers receive. Plain data: the actor in `mod.rs` owns every live record.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::outputs::StorageProblem;
use crate::engine::{Notice, ResolvedParams};
use crate::prompt::Enhanced;
use crate::request::ValidRequest;

/// A job's id: 16 lowercase hex digits (also the stem of its files in the outputs folder).
pub type JobId = String;

pub const JOB_ID_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the time of a finished job went. `total_ms` is the engine's run (encode + denoise +
/// decode and the checks around them); `queue_ms` the wait before it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobTimings {
    pub queue_ms: u64,
    pub encode_ms: u64,
    pub denoise_ms: u64,
    pub decode_ms: u64,
    pub total_ms: u64,
}

/// Everything known about one job; journaled on every state change and written as the sidecar
/// `<id>.json` next to the images when it is done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    /// Acceptance order; the journal is replayed in this order after a restart.
    pub seq: u64,
    pub state: JobState,
    /// The model the server ran when the job was accepted.
    pub model: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default)]
    pub started_at: Option<u64>,
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// The validated request, seed included, so a resumed job makes the same image.
    pub request: ValidRequest,
    /// The parameters the run actually used (final prompts, CFG after interception); `None`
    /// until it ran.
    #[serde(default)]
    pub params: Option<ResolvedParams>,
    #[serde(default)]
    pub enhancement: Option<Enhanced>,
    /// File names in the outputs folder, `<id>-<n>.png`.
    #[serde(default)]
    pub images: Vec<String>,
    /// Each image's own seed (base seed + index, or the seed a blank-image retry used).
    #[serde(default)]
    pub image_seeds: Vec<u64>,
    #[serde(default)]
    pub notices: Vec<Notice>,
    #[serde(default)]
    pub timings: Option<JobTimings>,
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
    /// The memory plan the run used (mode, residency, tiling, estimated peaks, reasons).
    #[serde(default)]
    pub plan: Option<crate::memory::planner::Plan>,
    /// Why it failed; `None` unless it did. Records journaled before the error was typed hold a
    /// plain message, read back as an [`FailureKind::Internal`] failure.
    #[serde(default, deserialize_with = "legacy_error")]
    pub error: Option<JobError>,
    /// The remote worker that ran it (`zturbo worker --name`); `None` on a single machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// What kind of failure ended a job: the HTTP edge picks its status from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The model folder or a weight file was at fault (names the file).
    Model,
    /// Not enough memory for the request on this device.
    DoesNotFit,
    /// Non-finite values the guard could not recover from.
    NonFinite,
    /// The image came out blank twice.
    BlankImage,
    /// A request the engine cannot run as given (e.g. initial latents of the wrong shape).
    Invalid,
    /// The images could not be written: no space (or quota) left in the outputs folder.
    StorageFull,
    /// The images could not be written: the outputs folder is read-only, forbidden or broken.
    StorageUnwritable,
    /// The worker stopped or the engine panicked.
    Internal,
}

impl FailureKind {
    pub const ALL: [FailureKind; 8] = [
        FailureKind::Model,
        FailureKind::DoesNotFit,
        FailureKind::NonFinite,
        FailureKind::BlankImage,
        FailureKind::Invalid,
        FailureKind::StorageFull,
        FailureKind::StorageUnwritable,
        FailureKind::Internal,
    ];

    /// The outputs folder's problem, for a failure to write the images.
    pub fn storage(self) -> Option<StorageProblem> {
        match self {
            FailureKind::StorageFull => Some(StorageProblem::Full),
            FailureKind::StorageUnwritable => Some(StorageProblem::Unwritable),
            _ => None,
        }
    }
}

impl From<StorageProblem> for FailureKind {
    fn from(p: StorageProblem) -> Self {
        match p {
            StorageProblem::Full => FailureKind::StorageFull,
            StorageProblem::Unwritable => FailureKind::StorageUnwritable,
        }
    }
}

/// A job's failure, typed from the engine's error to the HTTP edge (and journaled as such).
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct JobError {
    pub kind: FailureKind,
    pub message: String,
}

impl JobError {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<&crate::engine::EngineError> for JobError {
    fn from(e: &crate::engine::EngineError) -> Self {
        use crate::engine::EngineError as E;
        let kind = match e {
            E::Model(crate::families::ModelError::Candle(_)) => FailureKind::Internal,
            E::Model(_) => FailureKind::Model,
            E::DoesNotFit(_) => FailureKind::DoesNotFit,
            E::NonFinite { .. } => FailureKind::NonFinite,
            E::BlankImage(_) => FailureKind::BlankImage,
            E::Invalid(_) => FailureKind::Invalid,
            E::Cancelled => FailureKind::Internal,
        };
        Self::new(kind, e.to_string())
    }
}

/// `error` as journaled now (`{kind, message}`) or before it was typed (a message).
fn legacy_error<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<JobError>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Typed(JobError),
        Message(String),
    }
    Ok(Option::<Stored>::deserialize(d)?.map(|s| match s {
        Stored::Typed(e) => e,
        Stored::Message(m) => JobError::new(FailureKind::Internal, m),
    }))
}

/// A job as the API shows it: the record plus live progress.
#[derive(Debug, Clone)]
pub struct JobSnapshot {
    pub record: JobRecord,
    /// Jobs ahead of this one (0 = next); `None` unless queued.
    pub position: Option<usize>,
    /// Completed denoising steps.
    pub step: usize,
    pub total_steps: usize,
    pub elapsed_ms: Option<u64>,
    /// Running, and asked to stop (it ends at the next step boundary).
    pub cancelling: bool,
    /// The latest live preview `(step, data URL)` while it runs.
    pub preview: Option<(usize, String)>,
}

/// What a job's subscribers hear, in order; the last one is always terminal.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Queued {
        position: usize,
    },
    Started,
    Progress {
        step: usize,
        total: usize,
        elapsed_ms: u64,
    },
    Notice(Notice),
    /// The worker switches models for this job: `loading`, then `loaded` or `failed` (the error
    /// names the file).
    Model {
        state: &'static str,
        name: String,
        error: Option<String>,
        elapsed_ms: Option<u64>,
    },
    /// The live preview after `step` (a `data:image/png` URL); not kept in the record.
    Preview {
        step: usize,
        image: String,
    },
    Done {
        images: Vec<String>,
        /// The job's exact high-water mark of device memory (the chart shows this one).
        peak_memory_bytes: Option<u64>,
    },
    Failed {
        error: JobError,
    },
    Cancelled,
}

impl JobEvent {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobEvent::Done { .. } | JobEvent::Failed { .. } | JobEvent::Cancelled
        )
    }

    /// The terminal event a finished record stands for (`None` while it is not finished).
    pub fn terminal_for(record: &JobRecord) -> Option<JobEvent> {
        match record.state {
            JobState::Done => Some(JobEvent::Done {
                images: record.images.clone(),
                peak_memory_bytes: record.peak_memory_bytes,
            }),
            JobState::Failed => Some(JobEvent::Failed {
                error: record
                    .error
                    .clone()
                    .unwrap_or_else(|| JobError::new(FailureKind::Internal, "the job failed")),
            }),
            JobState::Cancelled => Some(JobEvent::Cancelled),
            JobState::Queued | JobState::Running => None,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh random job id (the std hasher is randomly keyed per process; the counter and the
/// clock make ids differ within one process too).
pub fn new_job_id() -> JobId {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u64(now_ms());
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Whether `s` has the shape of a job id (so it is safe as a file-name stem).
pub fn is_job_id(s: &str) -> bool {
    s.len() == JOB_ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `<id>-<n>.png`: the name of image `n` (1-based) of a job.
pub fn image_name(id: &str, n: usize) -> String {
    format!("{id}-{n}.png")
}

/// Whether `name` is an image name [`image_name`] could have produced.
pub fn is_image_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".png") else {
        return false;
    };
    let Some((id, n)) = stem.split_once('-') else {
        return false;
    };
    is_job_id(id)
        && !n.is_empty()
        && n.len() <= 3
        && n.bytes().all(|b| b.is_ascii_digit())
        && !n.starts_with('0')
}

/// A small queued or finished record for the queue's and the journal's tests.
#[cfg(test)]
pub(crate) fn test_record(seq: u64, state: JobState, batch: u32) -> JobRecord {
    JobRecord {
        id: new_job_id(),
        seq,
        state,
        model: "demo".into(),
        created_at: 1,
        started_at: None,
        finished_at: None,
        request: ValidRequest {
            prompt: "a lake".into(),
            negative_prompt: None,
            width: 64,
            height: 64,
            steps: 2,
            cfg: 1.0,
            seed: 7,
            batch,
            enhance: false,
            memory_mode: crate::memory::planner::MemoryMode::Auto,
            init: None,
            control: None,
            loras: Vec::new(),
            enhance_exclude: Vec::new(),
        },
        params: None,
        enhancement: None,
        images: vec![],
        image_seeds: vec![],
        notices: vec![],
        timings: None,
        peak_memory_bytes: None,
        plan: None,
        error: None,
        worker: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's errors keep their kind up to the HTTP edge.
    #[test]
    fn engine_errors_keep_their_kind() {
        use crate::engine::EngineError;
        use crate::families::ModelError;
        let cases = [
            (
                EngineError::DoesNotFit("9 GiB".into()),
                FailureKind::DoesNotFit,
            ),
            (EngineError::Invalid("latents".into()), FailureKind::Invalid),
            (
                EngineError::BlankImage("twice".into()),
                FailureKind::BlankImage,
            ),
            (
                EngineError::NonFinite {
                    stage: "decode".into(),
                    detail: "NaN".into(),
                },
                FailureKind::NonFinite,
            ),
            (
                EngineError::Model(ModelError::MissingFile {
                    path: "vae/config.json".into(),
                }),
                FailureKind::Model,
            ),
        ];
        for (e, kind) in cases {
            let j = JobError::from(&e);
            assert_eq!(j.kind, kind, "{e}");
            assert_eq!(j.message, e.to_string());
        }
        let names: Vec<String> = FailureKind::ALL
            .iter()
            .map(|k| {
                serde_json::to_value(k)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(names.len(), 8);
        assert!(names.contains(&"does_not_fit".to_owned()));
    }

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = new_job_id();
        let b = new_job_id();
        assert!(is_job_id(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn image_names_are_strict() {
        let id = "0123456789abcdef";
        assert!(is_image_name(&image_name(id, 1)));
        assert!(is_image_name(&image_name(id, 12)));
        for bad in [
            "0123456789abcdef-0.png",
            "0123456789abcdef-1.jpg",
            "0123456789abcdef.png",
            "../0123456789abcdef-1.png",
            "0123456789ABCDEF-1.png",
            "0123456789abcdef-1.png/x",
            "/etc/passwd",
            "..",
        ] {
            assert!(!is_image_name(bad), "{bad}");
        }
    }
}
