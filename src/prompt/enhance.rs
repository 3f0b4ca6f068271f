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
    let (summary, zh_summary) = outcome.summary(limits);
    advice_list.push(Advice::info("enhancement", summary, zh_summary));
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
    let (head, zh_head) = if !r.expanded {
        (
            format!(
                "Prompt not expanded: {} Chinese characters is above {}, the length it is expanded \
                 up to.",
                r.chars, zh_limits.expand_max_chars
            ),
            format!(
                "提示词未扩写：{} 个汉字超过了 {}，只有不超过这个长度的提示词才会扩写。",
                r.chars, zh_limits.expand_max_chars
            ),
        )
    } else if r.subjects.is_empty() && r.lighting.is_empty() {
        nothing_recognised()
    } else {
        let found = found_text(&r.subjects, &r.lighting, "、");
        let n_details = r.details.iter().filter(|p| !excluded(p)).count();
        let n_lighting = added_prompt.len() - n_details;
        if added_prompt.is_empty() {
            nothing_added(&found)
        } else {
            let chars: usize = added_prompt.iter().map(|p| p.chars().count()).sum();
            (
                format!(
                    "Recognised {}; added {n_details} detail{} and {n_lighting} lighting \
                     phrase{} ({chars} characters, at most {}).",
                    found.0,
                    plural(n_details),
                    plural(n_lighting),
                    zh_limits.max_added_chars
                ),
                format!(
                    "识别到{}；添加了 {n_details} 个细节和 {n_lighting} 个光线短语\
                     （共 {chars} 个字，最多 {} 个）。",
                    found.1, zh_limits.max_added_chars
                ),
            )
        }
    };
    let (summary, zh_summary) = with_negative((head, zh_head), added_negative.len());
    advice_list.push(Advice::info("enhancement", summary, zh_summary));
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
    /// The summary in English and in Simplified Chinese.
    pub(super) fn summary(&self, limits: Limits) -> (String, String) {
        let unchanged = |en: &str, zh: &str| (en.to_owned(), zh.to_owned());
        let head = match self.script {
            Script::Empty => unchanged(
                "Prompt is empty: nothing to enhance.",
                "提示词为空：没有可增强的内容。",
            ),
            Script::NonLatin => unchanged(
                "Prompt left unchanged: it is mostly non-Latin script and the table has English \
                 and Chinese rules only.",
                "提示词保持不变：它大部分不是拉丁字母，而规则表只有英文和中文规则。",
            ),
            Script::OtherLatin => unchanged(
                "Prompt left unchanged: it does not look like English and the table is English.",
                "提示词保持不变：它看起来不是英文，而这部分规则表是英文的。",
            ),
            Script::English if self.words > limits.expand_max_words => (
                format!(
                    "Prompt not expanded: {} words is above {}, where composition accuracy drops.",
                    self.words, limits.expand_max_words
                ),
                format!(
                    "提示词未扩写：{} 个单词超过了 {}，再长构图准确率就会下降。",
                    self.words, limits.expand_max_words
                ),
            ),
            Script::English if self.subjects.is_empty() && self.lights.is_empty() => {
                nothing_recognised()
            }
            Script::English => {
                let found = found_text(self.subjects, self.lights, ", ");
                if self.details + self.lighting == 0 {
                    nothing_added(&found)
                } else {
                    (
                        format!(
                            "Recognised {}; added {} detail{} and {} lighting phrase{} ({} word{}, \
                             at most {}).",
                            found.0,
                            self.details,
                            plural(self.details),
                            self.lighting,
                            plural(self.lighting),
                            self.added_words,
                            plural(self.added_words),
                            limits.max_added_words
                        ),
                        format!(
                            "识别到{}；添加了 {} 个细节和 {} 个光线短语（共 {} 个单词，最多 {} 个）。",
                            found.1,
                            self.details,
                            self.lighting,
                            self.added_words,
                            limits.max_added_words
                        ),
                    )
                }
            }
        };
        with_negative(head, self.negative)
    }
}

/// "cat, lake; lighting: dawn" and "cat、lake；光线：dawn" (the names as the table has them;
/// `sep` joins the names: ", " for English rules, "、" for Chinese ones).
fn found_text(subjects: &[String], lights: &[String], sep: &str) -> (String, String) {
    let (mut en, mut zh) = (Vec::new(), Vec::new());
    if !subjects.is_empty() {
        en.push(subjects.join(sep));
        zh.push(subjects.join(sep));
    }
    if !lights.is_empty() {
        en.push(format!("lighting: {}", lights.join(sep)));
        zh.push(format!("光线：{}", lights.join(sep)));
    }
    // A space after 识别到 reads well only before Latin names.
    let lead = if subjects.iter().chain(lights).any(|n| n.is_ascii()) {
        " "
    } else {
        ""
    };
    (en.join("; "), format!("{lead}{}", zh.join("；")))
}

fn nothing_recognised() -> (String, String) {
    (
        "No known subject or time/weather word recognised: prompt left as written.".to_owned(),
        "没有识别出已知的主体或时间、天气词：提示词保持原样。".to_owned(),
    )
}

fn nothing_added(found: &(String, String)) -> (String, String) {
    (
        format!(
            "Recognised {}; the prompt already describes it, nothing added.",
            found.0
        ),
        format!("识别到{}；提示词已经写到了这些，未添加内容。", found.1),
    )
}

/// The summary's head, plus what was added to the negative prompt.
fn with_negative(head: (String, String), negative: usize) -> (String, String) {
    match negative {
        0 => head,
        n => (
            format!("{} Negative prompt: {n} phrase{} added.", head.0, plural(n)),
            format!("{}反向提示词：添加了 {n} 个短语。", head.1),
        ),
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
