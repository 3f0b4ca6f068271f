//! Prompt quality enhancement: adds the natural details of named subjects, lighting from the user's own time
//! and weather words, concrete defects for the negative prompt, and length/CFG/steps guidance — all from a
//! compiled-in table, so it is instant, offline, deterministic and every added phrase can be shown. It
//! touches no tensor: `text` (words, matching), `rules` (the table), `enhance` (the rewrite) and
//! `advice` (guidance, rendered from the family's profile).

mod advice;
mod enhance;
mod rules;
#[cfg(test)]
mod tests;
mod text;
mod zh;

use serde::{Deserialize, Serialize};

use crate::families::profile::{fmt_num, Profile};

pub use advice::{advice, Advice, AdviceLevel, ADVICE_KINDS};
use enhance::{guidance_on, rewrite};
use rules::rules;
use text::has_word;
pub use text::word_count;
pub use zh::cjk_chars;

/// Used when guidance is on and the user gave no negative prompt; "black screen" is part of the
/// anti-black-image defence.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "nsfw, blurry, deformed, black screen";

/// Generation parameters the advice depends on. `cfg` follows the ComfyUI/A1111 convention: 1.0 means
/// classifier-free guidance is off (and the negative prompt unused).
#[derive(Debug, Clone, Copy)]
pub struct PromptContext {
    pub cfg: f32,
    pub steps: u32,
    /// The loaded model's profile: the CFG and step advice renders its bands.
    pub profile: Profile,
}

/// Phrases the enhancement appended, in the order they appear in the final texts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Added {
    pub prompt: Vec<String>,
    pub negative_prompt: Vec<String>,
}

/// What the table recognised in the prompt, by table name (explains why phrases were added).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recognised {
    pub subjects: Vec<String>,
    pub lighting: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enhanced {
    pub prompt: String,
    pub negative_prompt: String,
    pub original_prompt: String,
    pub original_negative_prompt: Option<String>,
    pub added: Added,
    pub advice: Vec<Advice>,
    /// The toggle: rewriting was allowed. `added` says what it actually changed.
    pub enhanced: bool,
    #[serde(default)]
    pub recognised: Recognised,
}

/// Rewrites `prompt` and `negative_prompt` (when `enabled`) and always returns the guidance.
/// With `enabled == false` both texts come back verbatim (a missing negative as "").
pub fn enhance(
    prompt: &str,
    negative_prompt: Option<&str>,
    ctx: &PromptContext,
    enabled: bool,
) -> Enhanced {
    enhance_with(prompt, negative_prompt, ctx, enabled, &[])
}

/// [`enhance`], leaving out the added phrases listed in `exclude` (compared case-insensitively):
/// the phrases a user removed from the preview stay removed in the job.
pub fn enhance_with(
    prompt: &str,
    negative_prompt: Option<&str>,
    ctx: &PromptContext,
    enabled: bool,
    exclude: &[String],
) -> Enhanced {
    let mut advice_list = advice(prompt, ctx);
    let mut out = if enabled {
        rewrite(
            rules(),
            prompt,
            negative_prompt,
            ctx,
            &mut advice_list,
            exclude,
        )
    } else {
        Enhanced {
            prompt: prompt.to_owned(),
            negative_prompt: negative_prompt.unwrap_or_default().to_owned(),
            original_prompt: prompt.to_owned(),
            original_negative_prompt: negative_prompt.map(str::to_owned),
            added: Added::default(),
            advice: Vec::new(),
            enhanced: false,
            recognised: Recognised::default(),
        }
    };
    if !guidance_on(ctx) && has_word(&out.negative_prompt) {
        let default = ctx.profile.defaults.cfg;
        let (hint, zh_hint) = if default > 1.0 {
            (
                format!(
                    "set CFG above 1 ({} is the default) for it to take effect",
                    fmt_num(default)
                ),
                format!(
                    "把 CFG 设到 1 以上（默认是 {}）它才会生效",
                    fmt_num(default)
                ),
            )
        } else {
            (
                format!(
                    "set CFG above 1 (this model's default is {}, off) for it to take effect",
                    fmt_num(default)
                ),
                format!(
                    "把 CFG 设到 1 以上它才会生效（这个模型的默认值是 {}，即关闭）",
                    fmt_num(default)
                ),
            )
        };
        advice_list.push(Advice::info(
            "negative_unused",
            format!(
                "CFG {} turns guidance off, so the negative prompt is shown but not used by the model; \
                 {hint}.",
                fmt_num(ctx.cfg)
            ),
            format!(
                "CFG {} 会关闭引导，所以反向提示词虽然显示出来，但模型不会使用；{zh_hint}。",
                fmt_num(ctx.cfg)
            ),
        ));
    }
    out.advice = advice_list;
    out
}
