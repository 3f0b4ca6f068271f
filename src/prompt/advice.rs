//! Guidance shown with every job: the prompt's length and language, and what the chosen CFG and
//! step count do — the profile's bands, rendered with the values (never a family's own numbers).

use serde::{Deserialize, Serialize};

use super::text::{classify, plural, word_count, Script};
use super::PromptContext;
use crate::families::profile::{fmt_num, Band, BandLevel};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdviceLevel {
    Info,
    Warn,
}

/// One guidance message. `kind` is one of "prompt_length", "empty", "language", "cfg", "steps",
/// "negative_unused", "enhancement".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advice {
    pub kind: String,
    pub level: AdviceLevel,
    pub message: String,
}

/// Guidance only (word count, CFG, steps); `enhance` includes it.
pub fn advice(prompt: &str, ctx: &PromptContext) -> Vec<Advice> {
    vec![prompt_advice(prompt), cfg_advice(ctx), steps_advice(ctx)]
}

impl Advice {
    pub(super) fn info(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            level: AdviceLevel::Info,
            message: message.into(),
        }
    }

    pub(super) fn warn(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            level: AdviceLevel::Warn,
            message: message.into(),
        }
    }
}

/// Chinese prompts are measured in characters: about two per English word, so the measured 8–12
/// words become 15–30 characters and the 15-word drop about 40 (a conversion, stated as such; the
/// page's hints use the same bands).
pub(super) const ZH_GOOD_CHARS: (usize, usize) = (15, 30);
pub(super) const ZH_TOO_LONG_CHARS: usize = 40;

fn chinese_length_advice(prompt: &str) -> Advice {
    let n = super::zh::cjk_chars(prompt);
    let (lo, hi) = ZH_GOOD_CHARS;
    let source = "the 8–12 English word guidance converted at about two characters a word, not \
                  measured for Chinese";
    if n < lo {
        Advice::info(
            "prompt_length",
            format!(
                "{n} Chinese character{}: about {lo}–{hi} characters say what 8–12 words do \
                 ({source}); name the subject, setting and light.",
                plural(n)
            ),
        )
    } else if n <= hi {
        Advice::info(
            "prompt_length",
            format!("{n} Chinese characters: in the {lo}–{hi} character range ({source})."),
        )
    } else if n <= ZH_TOO_LONG_CHARS {
        Advice::info(
            "prompt_length",
            format!(
                "{n} Chinese characters: a little long; {lo}–{hi} carry the subject, setting and \
                 light ({source})."
            ),
        )
    } else {
        Advice::warn(
            "prompt_length",
            format!(
                "{n} Chinese characters: above about {ZH_TOO_LONG_CHARS} the extra details tend \
                 to get lost ({source}); consider trimming."
            ),
        )
    }
}

pub(super) fn prompt_advice(prompt: &str) -> Advice {
    let n = word_count(prompt);
    match classify(prompt) {
        Script::Empty => Advice::warn(
            "empty",
            "The prompt is empty, so the image is unguided; describe a subject in 8–12 words.",
        ),
        Script::NonLatin if super::zh::is_chinese(prompt) => chinese_length_advice(prompt),
        Script::NonLatin => Advice::info(
            "language",
            "The prompt is mostly non-Latin script: the 8–12 word guidance was measured on English \
             prompts, and quality enhancement leaves such prompts as written.",
        ),
        Script::OtherLatin => Advice::info(
            "language",
            "The prompt does not look like English: the 8–12 word guidance was measured on English \
             prompts, and quality enhancement leaves such prompts as written.",
        ),
        Script::English => match n {
            0..=7 => Advice::info(
                "prompt_length",
                format!(
                    "{n} word{}: prompts of 8–12 words compose best (92.3 % accuracy); name the \
                     subject, setting and light.",
                    plural(n)
                ),
            ),
            8..=12 => Advice::info(
                "prompt_length",
                format!("{n} words: in the 8–12 word range that composes best (92.3 % accuracy)."),
            ),
            13..=15 => Advice::info(
                "prompt_length",
                format!(
                    "{n} words: 8–12 compose best; above 15 words accuracy falls to 76.1 %."
                ),
            ),
            _ => Advice::warn(
                "prompt_length",
                format!(
                    "{n} words: above 15 words composition accuracy fell from 92.3 % to 76.1 %; \
                     trim to 8–12 words. Quality enhancement does not expand prompts this long."
                ),
            ),
        },
    }
}

/// One band of the profile as advice: its sentence with the placeholders filled; `warn` and `bad`
/// bands warn.
pub(super) fn band_advice(
    kind: &str,
    band: Option<&Band>,
    ctx: &PromptContext,
    value: String,
    default: String,
) -> Advice {
    let Some(band) = band else {
        // Only an empty ladder has no band (the profiles' tests rule that out).
        return Advice::info(kind, value);
    };
    let message = ctx.profile.render(band.advice, &value, &default);
    match band.level {
        BandLevel::Info | BandLevel::Ok => Advice::info(kind, message),
        BandLevel::Warn | BandLevel::Bad => Advice::warn(kind, message),
    }
}

pub(super) fn cfg_advice(ctx: &PromptContext) -> Advice {
    let default = fmt_num(ctx.profile.defaults.cfg);
    if !ctx.cfg.is_finite() {
        return Advice::warn(
            "cfg",
            format!(
                "CFG {} is not a number; {default} is the default.",
                fmt_num(ctx.cfg)
            ),
        );
    }
    let band = ctx.profile.cfg.band(ctx.cfg);
    band_advice("cfg", band, ctx, fmt_num(ctx.cfg), default)
}

pub(super) fn steps_advice(ctx: &PromptContext) -> Advice {
    let band = ctx.profile.steps.band(ctx.steps);
    let default = ctx.profile.defaults.steps.to_string();
    band_advice("steps", band, ctx, ctx.steps.to_string(), default)
}
