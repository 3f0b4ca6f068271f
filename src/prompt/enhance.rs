//! The rewrite: the table's details and lighting appended to an English prompt of a reasonable
//! length, the default negative when guidance is on, and the negative prompt's concrete defects.

use super::rules::{Limits, Rules};
use super::text::{
    classify, clause_words, has_word, phrase_words, plural, tokenize, word_count, Script,
};
use super::zh;
use super::{Added, Advice, Enhanced, PromptContext, Recognised, DEFAULT_NEGATIVE_PROMPT};

/// Recognition reads at most this many words of a prompt.
const MAX_SCANNED_WORDS: usize = 256;

pub(super) fn rewrite(
    rules: &Rules,
    prompt: &str,
    negative_prompt: Option<&str>,
    ctx: &PromptContext,
    advice_list: &mut Vec<Advice>,
    exclude: &[String],
) -> Enhanced {
    let limits = rules.limits;
    let excluded = |text: &str| exclude.iter().any(|x| x.trim().eq_ignore_ascii_case(text));
    let script = classify(prompt);
    if script == Script::NonLatin && zh::is_chinese(prompt) {
        return rewrite_chinese(rules, prompt, negative_prompt, ctx, advice_list, &excluded);
    }
    let english = script == Script::English;
    let tokens = tokenize(prompt);
    // Recognition looks at the start of the prompt only: that is where subjects are named, and it keeps
    // the cost bounded for pathological input (long prompts are not expanded anyway).
    let scanned = tokens.get(..MAX_SCANNED_WORDS).unwrap_or(&tokens);
    let (subjects, lights) = if english {
        (
            rules.recognise_subjects(scanned),
            rules.recognise_lighting(scanned),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let lights: Vec<usize> = lights
        .into_iter()
        .take(limits.max_lighting_entries)
        .collect();
    let words = word_count(prompt);
    // Above the seed's 15-word cliff more words only hurt composition, so long prompts get no additions;
    // the negative prompt is encoded separately and still gets its defects.
    let expand = english && words <= limits.expand_max_words;
    let (mut details, mut lighting) = if expand {
        rules.expand(&tokens, &subjects, &lights)
    } else {
        (Vec::new(), Vec::new())
    };
    details.retain(|p| !excluded(&p.text));
    lighting.retain(|p| !excluded(&p.text));
    let added_prompt: Vec<String> = details
        .iter()
        .chain(&lighting)
        .map(|p| p.text.clone())
        .collect();
    let final_prompt = join(prompt, &added_prompt);

    let user_negative = negative_prompt.filter(|n| has_word(n));
    let mut items = clause_words(user_negative.unwrap_or_default());
    let mut added_negative = Vec::new();
    // The default negative belongs to the enhancement toggle and only matters when guidance is on.
    if user_negative.is_none() && guidance_on(ctx) {
        for phrase in DEFAULT_NEGATIVE_PROMPT.split(',').map(str::trim) {
            items.push(phrase_words(phrase));
            added_negative.push(phrase.to_owned());
        }
    }
    if english {
        let positive = tokenize(&final_prompt);
        added_negative.extend(rules.purify(&subjects, &positive, &mut items));
    }
    added_negative.retain(|p| !excluded(p));
    let final_negative = join(negative_prompt.unwrap_or_default(), &added_negative);

    let (subject_names, lighting_names) = rules.names(&subjects, &lights);
    let outcome = Outcome {
        script,
        words,
        subjects: &subject_names,
        lights: &lighting_names,
        details: details.len(),
        lighting: lighting.len(),
        added_words: word_count(&added_prompt.join(", ")),
        negative: added_negative.len(),
    };
    advice_list.push(Advice::info("enhancement", outcome.summary(limits)));
    Enhanced {
        prompt: final_prompt,
        negative_prompt: final_negative,
        original_prompt: prompt.to_owned(),
        original_negative_prompt: negative_prompt.map(str::to_owned),
        added: Added {
            prompt: added_prompt,
            negative_prompt: added_negative,
        },
        advice: Vec::new(),
        enhanced: true,
        recognised: Recognised {
            subjects: subject_names,
            lighting: lighting_names,
        },
    }
}

/// The rewrite of a Chinese prompt by the table's `[zh]` section: details and lighting joined with
/// the full-width comma, the default negative when guidance is on, and the subjects' defects in
/// Chinese.
fn rewrite_chinese(
    rules: &Rules,
    prompt: &str,
    negative_prompt: Option<&str>,
    ctx: &PromptContext,
    advice_list: &mut Vec<Advice>,
    excluded: &dyn Fn(&str) -> bool,
) -> Enhanced {
    let user_negative = negative_prompt.filter(|n| has_word(n));
    let r = rules
        .zh
        .rewrite(prompt, user_negative.unwrap_or_default(), rules.limits);
    let added_prompt: Vec<String> = r
        .details
        .iter()
        .chain(&r.lighting_phrases)
        .filter(|p| !excluded(p))
        .cloned()
        .collect();
    let final_prompt = zh::join(prompt, &added_prompt);
    let mut added_negative: Vec<String> = Vec::new();
    if user_negative.is_none() && guidance_on(ctx) {
        added_negative.extend(
            DEFAULT_NEGATIVE_PROMPT
                .split(',')
                .map(|p| p.trim().to_owned()),
        );
    }
    added_negative.extend(r.negative.iter().cloned());
    added_negative.retain(|p| !excluded(p));
    let final_negative = join(negative_prompt.unwrap_or_default(), &added_negative);
    let zh_limits = rules.zh.limits;
    let head = if !r.expanded {
        format!(
            "Prompt not expanded: {} Chinese characters is above {}, the length it is expanded              up to.",
            r.chars, zh_limits.expand_max_chars
        )
    } else if r.subjects.is_empty() && r.lighting.is_empty() {
        "No known subject or time/weather word recognised: prompt left as written.".to_owned()
    } else {
        let mut found = Vec::new();
        if !r.subjects.is_empty() {
            found.push(r.subjects.join("、"));
        }
        if !r.lighting.is_empty() {
            found.push(format!("lighting: {}", r.lighting.join("、")));
        }
        let found = found.join("; ");
        let n_details = r.details.iter().filter(|p| !excluded(p)).count();
        let n_lighting = added_prompt.len() - n_details;
        if added_prompt.is_empty() {
            format!("Recognised {found}; the prompt already describes it, nothing added.")
        } else {
            let chars: usize = added_prompt.iter().map(|p| p.chars().count()).sum();
            format!(
                "Recognised {found}; added {n_details} detail{} and {n_lighting} lighting \
                 phrase{} ({chars} characters, at most {}).",
                plural(n_details),
                plural(n_lighting),
                zh_limits.max_added_chars
            )
        }
    };
    let summary = match added_negative.len() {
        0 => head,
        n => format!("{head} Negative prompt: {n} phrase{} added.", plural(n)),
    };
    advice_list.push(Advice::info("enhancement", summary));
    Enhanced {
        prompt: final_prompt,
        negative_prompt: final_negative,
        original_prompt: prompt.to_owned(),
        original_negative_prompt: negative_prompt.map(str::to_owned),
        added: Added {
            prompt: added_prompt,
            negative_prompt: added_negative,
        },
        advice: Vec::new(),
        enhanced: true,
        recognised: Recognised {
            subjects: r.subjects,
            lighting: r.lighting,
        },
    }
}

/// What one rewrite did, for the "enhancement" advice that explains it to the user.
pub(super) struct Outcome<'a> {
    pub(super) script: Script,
    pub(super) words: usize,
    pub(super) subjects: &'a [String],
    pub(super) lights: &'a [String],
    pub(super) details: usize,
    pub(super) lighting: usize,
    pub(super) added_words: usize,
    pub(super) negative: usize,
}

impl Outcome<'_> {
    pub(super) fn summary(&self, limits: Limits) -> String {
        let head = match self.script {
            Script::Empty => "Prompt is empty: nothing to enhance.".to_owned(),
            Script::NonLatin => {
                "Prompt left unchanged: it is mostly non-Latin script and the table has English \
                 and Chinese rules only."
                    .to_owned()
            }
            Script::OtherLatin => {
                "Prompt left unchanged: it does not look like English and the table is English."
                    .to_owned()
            }
            Script::English if self.words > limits.expand_max_words => format!(
                "Prompt not expanded: {} words is above {}, where composition accuracy drops.",
                self.words, limits.expand_max_words
            ),
            Script::English if self.subjects.is_empty() && self.lights.is_empty() => {
                "No known subject or time/weather word recognised: prompt left as written."
                    .to_owned()
            }
            Script::English => {
                let mut found = Vec::new();
                if !self.subjects.is_empty() {
                    found.push(self.subjects.join(", "));
                }
                if !self.lights.is_empty() {
                    found.push(format!("lighting: {}", self.lights.join(", ")));
                }
                let found = found.join("; ");
                if self.details + self.lighting == 0 {
                    format!("Recognised {found}; the prompt already describes it, nothing added.")
                } else {
                    format!(
                        "Recognised {found}; added {} detail{} and {} lighting phrase{} ({} word{}, \
                         at most {}).",
                        self.details,
                        plural(self.details),
                        self.lighting,
                        plural(self.lighting),
                        self.added_words,
                        plural(self.added_words),
                        limits.max_added_words
                    )
                }
            }
        };
        match self.negative {
            0 => head,
            n => format!("{head} Negative prompt: {n} phrase{} added.", plural(n)),
        }
    }
}

/// Appends phrases with ", ". Returns `base` untouched when there is nothing to add, so a prompt that
/// needs nothing comes back byte for byte.
pub(super) fn join(base: &str, added: &[impl AsRef<str>]) -> String {
    if added.is_empty() {
        return base.to_owned();
    }
    let added: Vec<&str> = added.iter().map(AsRef::as_ref).collect();
    // A trailing separator would otherwise produce "dawn., rocky shoreline".
    let head = base
        .trim()
        .trim_end_matches(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | ':' | '.' | '|'));
    if head.is_empty() {
        added.join(", ")
    } else {
        format!("{head}, {}", added.join(", "))
    }
}

pub(super) fn guidance_on(ctx: &PromptContext) -> bool {
    ctx.cfg > 1.0
}
