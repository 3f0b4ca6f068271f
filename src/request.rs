//! The one request shape every surface (browser form, CLI, OpenAI, A1111) turns into. The wire form
//! is parsed once into a [`ValidRequest`] with defaults and a seed filled in; everything downstream
//! accepts only that type. Errors name the field, the allowed range and the value given.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::families::Profile;
use crate::memory::planner::MemoryMode;

/// Longest prompt accepted, in characters. Text encoders truncate far earlier anyway; this only
/// stops absurd bodies before they reach the tokenizer.
pub const MAX_PROMPT_CHARS: usize = 4000;
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 2048;
pub const MIN_STEPS: u32 = 1;
pub const MAX_STEPS: u32 = 100;
/// ComfyUI/A1111 convention: 1.0 = no guidance. Values from the profile's `cfg.intercept_at` up
/// are accepted and clamped to the model's safe maximum before the run.
pub const MIN_CFG: f32 = 1.0;
pub const MAX_CFG: f32 = 30.0;

/// A generation request as it arrives (JSON body or CLI flags). Unknown fields are an error.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub cfg: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub batch: Option<u32>,
    #[serde(default)]
    pub enhance: Option<bool>,
    #[serde(default)]
    pub memory_mode: Option<MemoryMode>,
    /// Phrases the enhancement must not add (the UI's removed chips), as the preview showed them.
    #[serde(default)]
    pub enhance_exclude: Vec<String>,
    /// The model to run on (a name `/api/models` lists as local); the selected one when absent.
    /// The server checks it and records it with the job; validation ignores it.
    #[serde(default)]
    pub model: Option<String>,
}

/// At most this many excluded enhancement phrases, each at most [`MAX_EXCLUDE_CHARS`] long.
pub const MAX_EXCLUDED_PHRASES: usize = 64;
pub const MAX_EXCLUDE_CHARS: usize = 200;

/// What a request is validated against: the loaded model's facts and the server's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub default_width: u32,
    pub default_height: u32,
    pub default_steps: u32,
    pub default_cfg: f32,
    /// Width and height must be multiples of this (the profile's `size_multiple`).
    pub size_multiple: u32,
    pub max_batch: u32,
    pub default_memory_mode: MemoryMode,
}

impl Limits {
    /// The loaded model's defaults and size multiple, with the device's batch limit.
    pub fn new(profile: &Profile, max_batch: u32, default_memory_mode: MemoryMode) -> Self {
        let d = profile.defaults;
        Self {
            default_width: d.width,
            default_height: d.height,
            default_steps: d.steps,
            default_cfg: d.cfg,
            size_multiple: profile.size_multiple,
            max_batch,
            default_memory_mode,
        }
    }
}

/// A request that passed validation: every field resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub cfg: f32,
    pub seed: u64,
    pub batch: u32,
    pub enhance: bool,
    pub memory_mode: MemoryMode,
    /// Phrases the enhancement leaves out (see [`GenerationRequest::enhance_exclude`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enhance_exclude: Vec<String>,
}

/// A user error: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl GenerationRequest {
    pub fn validate(self, limits: &Limits) -> Result<ValidRequest, FieldError> {
        let prompt = check_text("prompt", self.prompt)?;
        if prompt.trim().is_empty() {
            return Err(FieldError::new("prompt", "must not be empty"));
        }
        let negative_prompt = match self.negative_prompt {
            Some(n) => Some(check_text("negative_prompt", n)?),
            None => None,
        };
        let side = |field: &str, v: Option<u32>, default: u32| -> Result<u32, FieldError> {
            let v = v.unwrap_or(default);
            let m = limits.size_multiple.max(1);
            if !(MIN_SIDE..=MAX_SIDE).contains(&v) {
                return Err(FieldError::new(
                    field,
                    format!("must be between {MIN_SIDE} and {MAX_SIDE} (got {v})"),
                ));
            }
            if v % m != 0 {
                return Err(FieldError::new(
                    field,
                    format!(
                        "must be a multiple of {m} (got {v}; nearest: {} or {})",
                        v / m * m,
                        (v / m + 1) * m
                    ),
                ));
            }
            Ok(v)
        };
        let width = side("width", self.width, limits.default_width)?;
        let height = side("height", self.height, limits.default_height)?;
        let steps = self.steps.unwrap_or(limits.default_steps);
        if !(MIN_STEPS..=MAX_STEPS).contains(&steps) {
            return Err(FieldError::new(
                "steps",
                format!("must be between {MIN_STEPS} and {MAX_STEPS} (got {steps})"),
            ));
        }
        let cfg = self.cfg.unwrap_or(limits.default_cfg);
        if !cfg.is_finite() || !(MIN_CFG..=MAX_CFG).contains(&cfg) {
            return Err(FieldError::new(
                "cfg",
                format!(
                    "must be between {MIN_CFG} and {MAX_CFG}; 1.0 turns guidance off (got {cfg})"
                ),
            ));
        }
        let batch = self.batch.unwrap_or(1);
        if batch == 0 || batch > limits.max_batch {
            return Err(FieldError::new(
                "batch",
                format!(
                    "must be between 1 and {} on this device (got {batch})",
                    limits.max_batch
                ),
            ));
        }
        let enhance_exclude = check_excluded(self.enhance_exclude)?;
        Ok(ValidRequest {
            prompt,
            negative_prompt,
            width,
            height,
            steps,
            cfg,
            seed: self.seed.unwrap_or_else(random_seed),
            batch,
            enhance: self.enhance.unwrap_or(true),
            memory_mode: self.memory_mode.unwrap_or(limits.default_memory_mode),
            enhance_exclude,
        })
    }
}

/// `enhance_exclude`: a bounded list of short phrases without control characters.
pub fn check_excluded(list: Vec<String>) -> Result<Vec<String>, FieldError> {
    const FIELD: &str = "enhance_exclude";
    if list.len() > MAX_EXCLUDED_PHRASES {
        return Err(FieldError::new(
            FIELD,
            format!(
                "at most {MAX_EXCLUDED_PHRASES} phrases (got {})",
                list.len()
            ),
        ));
    }
    list.into_iter()
        .map(|p| {
            let n = p.chars().count();
            if n > MAX_EXCLUDE_CHARS {
                return Err(FieldError::new(
                    FIELD,
                    format!("each phrase must be at most {MAX_EXCLUDE_CHARS} characters (got {n})"),
                ));
            }
            if p.chars().any(char::is_control) {
                return Err(FieldError::new(
                    FIELD,
                    "must not contain control characters",
                ));
            }
            Ok(p.trim().to_string())
        })
        .collect()
}

fn check_text(field: &str, text: String) -> Result<String, FieldError> {
    let n = text.chars().count();
    if n > MAX_PROMPT_CHARS {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_PROMPT_CHARS} characters (got {n})"),
        ));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
    {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(text)
}

/// Largest seed handed out at random: JavaScript numbers are exact up to 2^53, so the UI can show
/// and reuse every seed it gets.
pub const MAX_RANDOM_SEED: u64 = (1 << 53) - 1;

/// A fresh random seed (no RNG crate needed: the std hasher is randomly keyed per process).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish() & MAX_RANDOM_SEED
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            default_width: 1024,
            default_height: 1024,
            default_steps: 8,
            default_cfg: 1.8,
            size_multiple: 16,
            max_batch: 4,
            default_memory_mode: MemoryMode::Auto,
        }
    }

    fn req(json: &str) -> Result<ValidRequest, FieldError> {
        let r: GenerationRequest = serde_json::from_str(json).expect("parses");
        r.validate(&limits())
    }

    #[test]
    fn defaults_fill_in() {
        let v = req(r#"{"prompt":"a lake"}"#).unwrap();
        assert_eq!((v.width, v.height, v.steps, v.batch), (1024, 1024, 8, 1));
        assert_eq!(v.cfg, 1.8);
        assert!(v.enhance);
        assert!(v.seed <= MAX_RANDOM_SEED);
    }

    #[test]
    fn errors_name_field_range_and_value() {
        let e = req(r#"{"prompt":"x","width":100}"#).unwrap_err();
        assert_eq!(e.field, "width");
        assert!(
            e.message.contains("multiple of 16") && e.message.contains("100"),
            "{e}"
        );
        let e = req(r#"{"prompt":"x","steps":0}"#).unwrap_err();
        assert_eq!(e.field, "steps");
        assert!(e.message.contains("between 1 and 100"), "{e}");
        let e = req(r#"{"prompt":"x","steps":500}"#).unwrap_err();
        assert!(e.message.contains("500"));
        let e = req(r#"{"prompt":"x","cfg":-1}"#).unwrap_err();
        assert_eq!(e.field, "cfg");
        let e = req(r#"{"prompt":"x","batch":9}"#).unwrap_err();
        assert_eq!(e.field, "batch");
        let e = req(r#"{"prompt":"   "}"#).unwrap_err();
        assert_eq!(e.field, "prompt");
        let long = "a".repeat(MAX_PROMPT_CHARS + 1);
        let e = req(&format!(r#"{{"prompt":"{long}"}}"#)).unwrap_err();
        assert_eq!(e.field, "prompt");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<GenerationRequest, _> = serde_json::from_str(r#"{"prompt":"x","stepz":4}"#);
        assert!(r.unwrap_err().to_string().contains("stepz"));
    }

    #[test]
    fn high_cfg_is_accepted_for_interception() {
        assert_eq!(req(r#"{"prompt":"x","cfg":3.2}"#).unwrap().cfg, 3.2);
    }

    #[test]
    fn random_seeds_differ() {
        assert_ne!(random_seed(), random_seed());
    }
}
