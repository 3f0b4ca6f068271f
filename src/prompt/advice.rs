//! Guidance shown with every job: the prompt's length and language, and what the chosen CFG and
//! step count do — the profile's bands, rendered with the values (never a family's own numbers).

use serde::{Deserialize, Serialize};

use super::text::{classify, plural, word_count, Script};
use super::PromptContext;
use crate::families::profile::{fmt_num, Band, BandLevel};
use crate::i18n::Translations;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdviceLevel {
    Info,
    Warn,
}

/// One guidance message. `kind` is one of [`ADVICE_KINDS`]; `message` is English and `i18n` the
/// same sentence in the page's other languages (`{"zh-CN": …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advice {
    pub kind: String,
    pub level: AdviceLevel,
    pub message: String,
    #[serde(default, skip_serializing_if = "Translations::is_empty")]
    pub i18n: Translations,
}

/// Every advice `kind` there is.
pub const ADVICE_KINDS: [&str; 7] = [
    "prompt_length",
    "empty",
    "language",
    "cfg",
    "steps",
    "negative_unused",
    "enhancement",
];

/// Guidance only (word count, CFG, steps); `enhance` includes it.
pub fn advice(prompt: &str, ctx: &PromptContext) -> Vec<Advice> {
    vec![prompt_advice(prompt), cfg_advice(ctx), steps_advice(ctx)]
}

impl Advice {
    /// Guidance in English (`message`) and Simplified Chinese (`zh`).
    pub(super) fn info(kind: &str, message: impl Into<String>, zh: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            level: AdviceLevel::Info,
            message: message.into(),
            i18n: Translations::zh(zh),
        }
    }

    pub(super) fn warn(kind: &str, message: impl Into<String>, zh: impl Into<String>) -> Self {
        Self {
            level: AdviceLevel::Warn,
            ..Self::info(kind, message, zh)
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
    let zh_source = "由 8–12 个英文单词的建议按每词约两个字换算而来，未针对中文实测";
    if n < lo {
        Advice::info(
            "prompt_length",
            format!(
                "{n} Chinese character{}: about {lo}–{hi} characters say what 8–12 words do \
                 ({source}); name the subject, setting and light.",
                plural(n)
            ),
            format!(
                "{n} 个汉字：大约 {lo}–{hi} 个字能说清 8–12 个英文单词的内容（按每词约两个字换算，\
                 未针对中文实测）；请写明主体、场景和光线。"
            ),
        )
    } else if n <= hi {
        Advice::info(
            "prompt_length",
            format!("{n} Chinese characters: in the {lo}–{hi} character range ({source})."),
            format!("{n} 个汉字：在 {lo}–{hi} 个字的范围内（{zh_source}）。"),
        )
    } else if n <= ZH_TOO_LONG_CHARS {
        Advice::info(
            "prompt_length",
            format!(
                "{n} Chinese characters: a little long; {lo}–{hi} carry the subject, setting and \
                 light ({source})."
            ),
            format!("{n} 个汉字：稍长；{lo}–{hi} 个字就足以写清主体、场景和光线（{zh_source}）。"),
        )
    } else {
        Advice::warn(
            "prompt_length",
            format!(
                "{n} Chinese characters: above about {ZH_TOO_LONG_CHARS} the extra details tend \
                 to get lost ({source}); consider trimming."
            ),
            format!(
                "{n} 个汉字：超过约 {ZH_TOO_LONG_CHARS} 个字后，多出来的细节往往会被忽略\
                 （{zh_source}）；建议精简。"
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
            "提示词为空，图像将没有任何引导；请用 8–12 个词描述一个主体。",
        ),
        Script::NonLatin if super::zh::is_chinese(prompt) => chinese_length_advice(prompt),
        Script::NonLatin => Advice::info(
            "language",
            "The prompt is mostly non-Latin script: the 8–12 word guidance was measured on English \
             prompts, and quality enhancement leaves such prompts as written.",
            "提示词大部分不是拉丁字母：8–12 个词的建议是在英文提示词上测得的，画质增强也不会改写\
             这类提示词。",
        ),
        Script::OtherLatin => Advice::info(
            "language",
            "The prompt does not look like English: the 8–12 word guidance was measured on English \
             prompts, and quality enhancement leaves such prompts as written.",
            "提示词看起来不是英文：8–12 个词的建议是在英文提示词上测得的，画质增强也不会改写这类\
             提示词。",
        ),
        Script::English => match n {
            0..=7 => Advice::info(
                "prompt_length",
                format!(
                    "{n} word{}: prompts of 8–12 words compose best (92.3 % accuracy); name the \
                     subject, setting and light.",
                    plural(n)
                ),
                format!(
                    "{n} 个英文单词：8–12 个单词的提示词构图最好（准确率 92.3 %）；请写明主体、\
                     场景和光线。"
                ),
            ),
            8..=12 => Advice::info(
                "prompt_length",
                format!("{n} words: in the 8–12 word range that composes best (92.3 % accuracy)."),
                format!("{n} 个英文单词：在构图最好的 8–12 个单词范围内（准确率 92.3 %）。"),
            ),
            13..=15 => Advice::info(
                "prompt_length",
                format!(
                    "{n} words: 8–12 compose best; above 15 words accuracy falls to 76.1 %."
                ),
                format!(
                    "{n} 个英文单词：8–12 个单词构图最好；超过 15 个单词准确率降到 76.1 %。"
                ),
            ),
            _ => Advice::warn(
                "prompt_length",
                format!(
                    "{n} words: above 15 words composition accuracy fell from 92.3 % to 76.1 %; \
                     trim to 8–12 words. Quality enhancement does not expand prompts this long."
                ),
                format!(
                    "{n} 个英文单词：超过 15 个单词后构图准确率从 92.3 % 降到 76.1 %；请精简到 \
                     8–12 个单词。画质增强不会扩写这么长的提示词。"
                ),
            ),
        },
    }
}

/// One band of the profile as advice: its sentence (in English and in the band's Chinese) with
/// the placeholders filled; `warn` and `bad` bands warn.
pub(super) fn band_advice(
    kind: &str,
    band: Option<&Band>,
    ctx: &PromptContext,
    value: String,
    default: String,
) -> Advice {
    let Some(band) = band else {
        // Only an empty ladder has no band (the profiles' tests rule that out).
        return Advice::info(kind, value.clone(), value);
    };
    let message = ctx.profile.render(band.advice, &value, &default);
    let zh = ctx.profile.render(band.zh.advice, &value, &default);
    match band.level {
        BandLevel::Info | BandLevel::Ok => Advice::info(kind, message, zh),
        BandLevel::Warn | BandLevel::Bad => Advice::warn(kind, message, zh),
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
            format!("CFG {} 不是数字；默认是 {default}。", fmt_num(ctx.cfg)),
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
