//! What a run reports as it goes (phases, steps, notices, previews, through an [`Observer`]),
//! how it is cancelled, and how it fails ([`EngineError`]).

use super::*;
use crate::i18n::Translations;

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
/// and the PNG). `message` is English; `i18n` the same text in the page's other languages. Every
/// notice is made by one of the constructors below, which write both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub kind: NoticeKind,
    pub message: String,
    /// Absent in records journaled before notices were translated.
    #[serde(default, skip_serializing_if = "Translations::is_empty")]
    pub i18n: Translations,
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
    /// A notice in English (`message`) and Simplified Chinese (`zh`).
    pub fn new(kind: NoticeKind, message: String, zh: String) -> Self {
        Self {
            kind,
            message,
            i18n: Translations::zh(zh),
            step: None,
            from: None,
            to: None,
            component: None,
        }
    }

    /// The requested CFG was intercepted and lowered to the safe maximum.
    pub fn cfg_clamped(from: f32, to: f32) -> Self {
        Self {
            from: Some(from),
            to: Some(to),
            ..Self::new(
                NoticeKind::CfgClamped,
                format!("CFG {from:.1} is above this model's safe range; using {to:.1}"),
                format!("CFG {from:.1} 超出了这个模型的安全范围；改用 {to:.1}"),
            )
        }
    }

    /// Step `step` (1-based) went non-finite and was rolled back with CFG `from` → `to`.
    pub fn cfg_adjusted(step: usize, from: f32, to: f32) -> Self {
        Self {
            step: Some(step),
            from: Some(from),
            to: Some(to),
            ..Self::new(
                NoticeKind::CfgAdjusted,
                format!(
                    "CFG adapted {from:.2} → {to:.2} at step {step} (non-finite latents rolled back)"
                ),
                format!("第 {step} 步 CFG 从 {from:.2} 调整为 {to:.2}（出现非有限值的潜变量已回滚）"),
            )
        }
    }

    /// Step `step` went non-finite without guidance to lower, and was retried as it was.
    pub fn step_retried(step: usize) -> Self {
        Self {
            step: Some(step),
            ..Self::new(
                NoticeKind::StepRetried,
                format!("step {step} produced non-finite latents; rolled back and retried"),
                format!("第 {step} 步产生了非有限值的潜变量；已回滚并重试"),
            )
        }
    }

    /// The denoiser was rebuilt in f32 after `retries` failed retries of step `step`.
    pub fn denoiser_precision_raised(step: usize, retries: usize, dtype: &str) -> Self {
        Self {
            step: Some(step),
            component: Some("denoiser".into()),
            ..Self::new(
                NoticeKind::PrecisionRaised,
                format!(
                    "step {step} still non-finite after {retries} retries; denoiser raised from \
                     {dtype} to f32"
                ),
                format!(
                    "第 {step} 步重试 {retries} 次后仍是非有限值；去噪模型的精度从 {dtype} 提高到 f32"
                ),
            )
        }
    }

    /// The VAE produced NaN in `dtype` and decoded again in f32.
    pub fn vae_precision_raised(dtype: &str) -> Self {
        Self {
            component: Some("vae".into()),
            ..Self::new(
                NoticeKind::PrecisionRaised,
                format!("VAE produced NaN in {dtype}; decoded again in f32"),
                format!("VAE 在 {dtype} 精度下输出了 NaN；已改用 f32 重新解码"),
            )
        }
    }

    /// The whole-image decode ran out of memory and was redone in tiles.
    pub fn decode_tiled() -> Self {
        Self::new(
            NoticeKind::DecodeTiled,
            "VAE decode ran out of memory; decoding in tiles instead".into(),
            "VAE 解码时内存不足；改为分块解码".into(),
        )
    }

    /// The plan stepped down from the asked memory mode.
    pub fn memory_mode(requested: MemoryMode, mode: MemoryMode) -> Self {
        Self::new(
            NoticeKind::MemoryMode,
            format!("{requested} mode does not fit the free memory; running in {mode} mode"),
            format!(
                "空闲内存放不下“{}”模式；改用“{}”模式运行",
                mode_zh(requested),
                mode_zh(mode)
            ),
        )
    }

    /// Image `index` (1-based) came out blank and is generated again from `seed`; `why` says how
    /// it was blank, in English and Chinese.
    pub fn black_retry(index: usize, why: (String, String), seed: u64) -> Self {
        Self::new(
            NoticeKind::BlackRetry,
            format!(
                "image {index} came out blank ({}); regenerating it with seed {seed}",
                why.0
            ),
            format!(
                "第 {index} 张图像是空白的（{}）；正在用种子 {seed} 重新生成",
                why.1
            ),
        )
    }

    /// A journaled job runs again from its first step after a restart.
    pub fn resumed() -> Self {
        Self::new(
            NoticeKind::Resumed,
            "restarted after the server restarted (from step 1)".into(),
            "服务器重启后已重新开始（从第 1 步开始）".into(),
        )
    }

    /// The worker loaded `model` for this job in `secs` seconds.
    pub fn model_switch(model: &str, secs: f64) -> Self {
        Self::new(
            NoticeKind::ModelSwitch,
            format!("switched to the model {model} for this job (loaded in {secs:.1} s)"),
            format!("已为这个任务切换到模型 {model}（加载用时 {secs:.1} 秒）"),
        )
    }
}

/// The memory mode as the page's Chinese names it (`memory.mode.*` in `i18n.zh-CN.js`).
fn mode_zh(mode: MemoryMode) -> &'static str {
    match mode {
        MemoryMode::Auto => "自动",
        MemoryMode::Performance => "性能",
        MemoryMode::Balanced => "均衡",
        MemoryMode::Low => "低显存",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::i18n::{has_cjk, number_set};

    /// One notice of each kind, made the way the engine and the queue make them (the match is
    /// exhaustive, so a new kind must come with its texts).
    fn samples(kind: NoticeKind) -> Vec<Notice> {
        match kind {
            NoticeKind::CfgClamped => vec![Notice::cfg_clamped(3.2, 2.4)],
            NoticeKind::CfgAdjusted => vec![Notice::cfg_adjusted(3, 2.4, 1.92)],
            NoticeKind::StepRetried => vec![Notice::step_retried(5)],
            NoticeKind::PrecisionRaised => vec![
                Notice::denoiser_precision_raised(4, 2, "bf16"),
                Notice::vae_precision_raised("f16"),
            ],
            NoticeKind::BlackRetry => vec![Notice::black_retry(
                2,
                (
                    "all pixels within 0.5/255".into(),
                    "所有像素都在 0.5/255 以内".into(),
                ),
                1_000_042,
            )],
            NoticeKind::MemoryMode => vec![Notice::memory_mode(
                MemoryMode::Performance,
                MemoryMode::Low,
            )],
            NoticeKind::DecodeTiled => vec![Notice::decode_tiled()],
            NoticeKind::Resumed => vec![Notice::resumed()],
            NoticeKind::ModelSwitch => vec![Notice::model_switch("sd-turbo", 12.34)],
        }
    }

    #[test]
    fn every_notice_kind_has_its_chinese_text_with_the_same_numbers() {
        for kind in NoticeKind::ALL {
            for n in samples(kind) {
                assert_eq!(n.kind, kind);
                let zh = &n.i18n.zh_cn;
                assert!(has_cjk(zh), "{kind}: no Chinese text: {zh:?}");
                assert_eq!(
                    number_set(&n.message),
                    number_set(zh),
                    "{kind}: {} / {zh}",
                    n.message
                );
                let json = serde_json::to_value(&n).unwrap();
                assert_eq!(json["i18n"]["zh-CN"], zh.as_str());
            }
        }
    }

    /// Records journaled before translations still load (English only).
    #[test]
    fn old_notices_load_without_translations() {
        let n: Notice =
            serde_json::from_str(r#"{"kind":"resumed","message":"restarted"}"#).unwrap();
        assert!(n.i18n.is_empty());
        assert_eq!(
            serde_json::to_value(&n).unwrap(),
            serde_json::json!({"kind": "resumed", "message": "restarted"})
        );
    }
}
