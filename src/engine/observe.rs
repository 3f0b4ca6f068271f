//! What a run reports as it goes (phases, steps, notices, previews, through an [`Observer`]),
//! how it is cancelled, and how it fails ([`EngineError`]).

use super::*;

/// Shared flag a job's owner sets to stop it between steps.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// The flag itself, for [`crate::ops::interrupt::scope`].
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Encode,
    Denoise,
    Decode,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Encode => "encode",
            Phase::Denoise => "denoise",
            Phase::Decode => "decode",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StepEvent {
    pub step: usize,
    pub total: usize,
    pub sigma: f32,
    pub elapsed_ms: u64,
}

/// What a [`Notice`] reports. The wire names are the snake_case ones (`cfg_clamped`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// The requested CFG was intercepted and lowered to the model's safe maximum.
    CfgClamped,
    /// A step went non-finite and was retried with a lower CFG.
    CfgAdjusted,
    /// A step went non-finite and was retried as it was.
    StepRetried,
    /// A component was rebuilt in a higher precision after overflowing.
    PrecisionRaised,
    /// A blank image was regenerated from a new seed.
    BlackRetry,
    /// The memory plan ran in a lower mode than asked.
    MemoryMode,
    /// The VAE decoded in tiles.
    DecodeTiled,
    /// The queue re-ran the job from step 1 after the server restarted.
    Resumed,
    /// The worker switched models to run the job.
    ModelSwitch,
}

impl NoticeKind {
    pub const ALL: [NoticeKind; 9] = [
        NoticeKind::CfgClamped,
        NoticeKind::CfgAdjusted,
        NoticeKind::StepRetried,
        NoticeKind::PrecisionRaised,
        NoticeKind::BlackRetry,
        NoticeKind::MemoryMode,
        NoticeKind::DecodeTiled,
        NoticeKind::Resumed,
        NoticeKind::ModelSwitch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::CfgClamped => "cfg_clamped",
            NoticeKind::CfgAdjusted => "cfg_adjusted",
            NoticeKind::StepRetried => "step_retried",
            NoticeKind::PrecisionRaised => "precision_raised",
            NoticeKind::BlackRetry => "black_retry",
            NoticeKind::MemoryMode => "memory_mode",
            NoticeKind::DecodeTiled => "decode_tiled",
            NoticeKind::Resumed => "resumed",
            NoticeKind::ModelSwitch => "model_switch",
        }
    }
}

impl NoticeKind {
    /// Notices the queue itself adds (not the engine): they outlive a re-run's own notices.
    pub fn is_queue_notice(self) -> bool {
        matches!(self, NoticeKind::Resumed | NoticeKind::ModelSwitch)
    }
}

impl std::fmt::Display for NoticeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for NoticeKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Something the engine adapted or wants the user to know (shown as a toast, kept in the record
/// and the PNG).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub kind: NoticeKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
}

impl Notice {
    pub fn new(kind: NoticeKind, message: String) -> Self {
        Self {
            kind,
            message,
            step: None,
            from: None,
            to: None,
            component: None,
        }
    }
}

/// Receives progress while a job runs (on the engine's thread: keep it cheap).
pub trait Observer {
    fn phase(&mut self, _phase: Phase) {}
    fn step(&mut self, _event: &StepEvent) {}
    fn notice(&mut self, _notice: &Notice) {}
    fn plan(&mut self, _plan: &Plan) {}
    /// Whether [`Observer::preview`] should get the denoised estimate after each step (computing
    /// it costs one latent-sized tensor operation per step).
    fn wants_preview(&self) -> bool {
        false
    }
    /// The denoised estimate x̂₀ = x − σ·d of the batch's first image after step `step`, as
    /// `[C, h, w]` f32 in the denoiser's latent space (see [`preview`]).
    fn preview(&mut self, _step: usize, _total: usize, _x0: &Tensor) {}
}

/// An observer that ignores everything.
pub struct NullObserver;
impl Observer for NullObserver {}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{stage}: {detail}")]
    NonFinite { stage: String, detail: String },
    #[error("the image came out blank: {0}")]
    BlankImage(String),
    #[error("{0}")]
    Invalid(String),
    #[error("not enough memory: {0}")]
    DoesNotFit(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(ModelError::Candle(e))
    }
}
