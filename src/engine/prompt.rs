//! Prompt quality enhancement: adds the natural details of named subjects, lighting from the user's own time
//! and weather words, concrete defects for the negative prompt, and length/CFG/steps guidance — all from a
//! compiled-in table, so it is instant, offline, deterministic and every added phrase can be shown.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::families::profile::{fmt_num, Band, BandLevel, Profile};

/// Used when guidance is on and the user gave no negative prompt; "black screen" is part of the
/// anti-black-image defence.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "nsfw, blurry, deformed, black screen";

const RULES_TOML: &str = include_str!("prompt_rules.toml");

const MAX_SCANNED_WORDS: usize = 256;

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
    let mut advice_list = advice(prompt, ctx);
    let mut out = if enabled {
        rewrite(rules(), prompt, negative_prompt, ctx, &mut advice_list)
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
        let hint = if default > 1.0 {
            format!(
                "set CFG above 1 ({} is the default) for it to take effect",
                fmt_num(default)
            )
        } else {
            format!(
                "set CFG above 1 (this model's default is {}, off) for it to take effect",
                fmt_num(default)
            )
        };
        advice_list.push(Advice::info(
            "negative_unused",
            format!(
                "CFG {} turns guidance off, so the negative prompt is shown but not used by the model; \
                 {hint}.",
                fmt_num(ctx.cfg)
            ),
        ));
    }
    out.advice = advice_list;
    out
}

/// Guidance only (word count, CFG, steps); `enhance` includes it.
pub fn advice(prompt: &str, ctx: &PromptContext) -> Vec<Advice> {
    vec![prompt_advice(prompt), cfg_advice(ctx), steps_advice(ctx)]
}

/// Words as a user counts them: whitespace- or comma-separated chunks with a letter or digit
/// ("ultra-detailed" is one word).
pub fn word_count(prompt: &str) -> usize {
    prompt
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '|'))
        .filter(|w| has_word(w))
        .count()
}

// ---------------------------------------------------------------------------------------------------
// Rewriting

fn rewrite(
    rules: &Rules,
    prompt: &str,
    negative_prompt: Option<&str>,
    ctx: &PromptContext,
    advice_list: &mut Vec<Advice>,
) -> Enhanced {
    let limits = rules.limits;
    let script = classify(prompt);
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
    let (details, lighting) = if expand {
        rules.expand(&tokens, &subjects, &lights)
    } else {
        (Vec::new(), Vec::new())
    };
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

/// What one rewrite did, for the "enhancement" advice that explains it to the user.
struct Outcome<'a> {
    script: Script,
    words: usize,
    subjects: &'a [String],
    lights: &'a [String],
    details: usize,
    lighting: usize,
    added_words: usize,
    negative: usize,
}

impl Outcome<'_> {
    fn summary(&self, limits: Limits) -> String {
        let head = match self.script {
            Script::Empty => "Prompt is empty: nothing to enhance.".to_owned(),
            Script::NonLatin => {
                "Prompt left unchanged: it is mostly non-Latin script and the table is English."
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

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Appends phrases with ", ". Returns `base` untouched when there is nothing to add, so a prompt that
/// needs nothing comes back byte for byte.
fn join(base: &str, added: &[impl AsRef<str>]) -> String {
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

fn guidance_on(ctx: &PromptContext) -> bool {
    ctx.cfg > 1.0
}

fn has_word(text: &str) -> bool {
    text.chars().any(char::is_alphanumeric)
}

// ---------------------------------------------------------------------------------------------------
// Advice

impl Advice {
    fn info(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            level: AdviceLevel::Info,
            message: message.into(),
        }
    }

    fn warn(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            level: AdviceLevel::Warn,
            message: message.into(),
        }
    }
}

fn prompt_advice(prompt: &str) -> Advice {
    let n = word_count(prompt);
    match classify(prompt) {
        Script::Empty => Advice::warn(
            "empty",
            "The prompt is empty, so the image is unguided; describe a subject in 8–12 words.",
        ),
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
fn band_advice(
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

fn cfg_advice(ctx: &PromptContext) -> Advice {
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

fn steps_advice(ctx: &PromptContext) -> Advice {
    let band = ctx.profile.steps.band(ctx.steps);
    let default = ctx.profile.defaults.steps.to_string();
    band_advice("steps", band, ctx, ctx.steps.to_string(), default)
}

// ---------------------------------------------------------------------------------------------------
// Script / language detection

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Empty,
    English,
    OtherLatin,
    NonLatin,
}

const ENGLISH_FUNCTION_WORDS: &[&str] = &[
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "by", "from", "under", "over", "near",
    "into", "through", "his", "her", "their", "is", "are", "for", "to", "as", "its", "this",
    "that", "while", "behind", "beside", "above", "below",
];

// Articles and prepositions of the most common other Latin-script languages, none of them English words.
const FOREIGN_FUNCTION_WORDS: &[&str] = &[
    "le", "la", "les", "des", "du", "un", "une", "et", "dans", "sur", "avec", "sous", "au", "aux",
    "de", "à", "der", "die", "das", "und", "ein", "eine", "mit", "im", "auf", "dem", "den", "von",
    "zu", "bei", "el", "los", "las", "una", "y", "con", "en", "del", "al", "bajo", "sobre", "il",
    "lo", "gli", "della", "di", "che", "nel", "sotto", "um", "uma", "com", "em", "na", "nas", "os",
];

fn classify(prompt: &str) -> Script {
    let (mut letters, mut latin) = (0usize, 0usize);
    for c in prompt.chars().filter(|c| c.is_alphabetic()) {
        letters += 1;
        if c.is_ascii_alphabetic()
            || ('\u{00C0}'..='\u{024F}').contains(&c)
            || ('\u{1E00}'..='\u{1EFF}').contains(&c)
        {
            latin += 1;
        }
    }
    if letters == 0 {
        return Script::Empty;
    }
    if latin * 2 < letters {
        return Script::NonLatin;
    }
    let (mut english, mut foreign) = (0usize, 0usize);
    for token in tokenize(prompt) {
        let w = token.word.text();
        if ENGLISH_FUNCTION_WORDS.contains(&w) {
            english += 1;
        } else if FOREIGN_FUNCTION_WORDS.contains(&w) {
            foreign += 1;
        }
    }
    // Two foreign articles/prepositions and little English grammar: English tags would not mix well.
    if foreign >= 2 && foreign > 2 * english {
        Script::OtherLatin
    } else {
        Script::English
    }
}

// ---------------------------------------------------------------------------------------------------
// Words and matching

/// A lowercase word with the singular forms it may stand for, so "lakes" matches "lake".
#[derive(Debug, Clone)]
struct Word {
    forms: Vec<String>,
}

const IRREGULAR_PLURALS: &[(&str, &str)] = &[
    ("men", "man"),
    ("children", "child"),
    ("mice", "mouse"),
    ("geese", "goose"),
    ("teeth", "tooth"),
    ("feet", "foot"),
    ("oxen", "ox"),
    ("cacti", "cactus"),
    ("fungi", "fungus"),
];

impl Word {
    fn new(lower: &str) -> Self {
        let mut forms = vec![lower.to_owned()];
        let mut add = |f: String| {
            if !f.is_empty() && !forms.contains(&f) {
                forms.push(f);
            }
        };
        if let Some((_, singular)) = IRREGULAR_PLURALS.iter().find(|(p, _)| *p == lower) {
            add((*singular).to_owned());
        }
        // Short words ("bus", "gas", "is") are left alone: stripping them only creates false matches.
        if lower.chars().count() >= 4 {
            if let Some(stem) = lower.strip_suffix("men") {
                add(format!("{stem}man"));
            }
            if let Some(stem) = lower.strip_suffix("ies") {
                add(format!("{stem}y"));
            }
            if let Some(stem) = lower.strip_suffix("ves") {
                add(format!("{stem}f"));
                add(format!("{stem}fe"));
            }
            if let Some(stem) = lower.strip_suffix("es") {
                add(stem.to_owned());
            }
            if !lower.ends_with("ss") {
                if let Some(stem) = lower.strip_suffix('s') {
                    add(stem.to_owned());
                }
            }
        }
        Self { forms }
    }

    fn text(&self) -> &str {
        self.forms.first().map(String::as_str).unwrap_or_default()
    }

    /// Either word may be the plural of the other: for comparing two pieces of user or phrase text.
    fn matches(&self, other: &Word) -> bool {
        self.forms.iter().any(|f| other.forms.contains(f))
    }

    /// This (prompt) word is the table word or its plural. One-way on purpose: the table's "woods" must
    /// not match the prompt's "wood".
    fn is_form_of(&self, table_word: &Word) -> bool {
        self.forms.iter().any(|f| f == table_word.text())
    }
}

/// A word of the prompt and the clause it sits in; multi-word terms never span a comma.
#[derive(Debug, Clone)]
struct Token {
    word: Word,
    clause: usize,
}

/// Characters that end a clause, including the CJK full-width ones.
const CLAUSE_BREAKS: &[char] = &[
    ',', ';', ':', '.', '!', '?', '(', ')', '[', ']', '{', '}', '|', '\n', '\r', '，', '。', '、',
    '；',
];

fn tokenize(text: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut clause = 0;
    let mut flush = |current: &mut String, clause: usize| {
        if !current.is_empty() {
            tokens.push(Token {
                word: Word::new(current),
                clause,
            });
            current.clear();
        }
    };
    for c in text.chars() {
        if c.is_alphanumeric() {
            current.extend(c.to_lowercase());
            continue;
        }
        // Hyphens and apostrophes split words: "rain-wet" says rain, "snow-capped" is handled by the
        // ignore list.
        flush(&mut current, clause);
        if CLAUSE_BREAKS.contains(&c) {
            clause += 1;
        }
    }
    flush(&mut current, clause);
    tokens
}

fn phrase_words(text: &str) -> Vec<Word> {
    tokenize(text).into_iter().map(|t| t.word).collect()
}

/// The negative prompt as a list of clauses, each a word sequence, for duplicate checks.
fn clause_words(text: &str) -> Vec<Vec<Word>> {
    let mut clauses: Vec<Vec<Word>> = Vec::new();
    let mut last = None;
    for token in tokenize(text) {
        if last != Some(token.clause) {
            clauses.push(Vec::new());
            last = Some(token.clause);
        }
        if let Some(clause) = clauses.last_mut() {
            clause.push(token.word);
        }
    }
    clauses
}

type Term = Vec<Word>;

fn term_at(tokens: &[Token], start: usize, term: &[Word]) -> bool {
    let Some(window) = tokens.get(start..start + term.len()) else {
        return false;
    };
    let Some(first) = window.first() else {
        return false;
    };
    window
        .iter()
        .zip(term)
        .all(|(t, w)| t.clause == first.clause && t.word.is_form_of(w))
}

fn contains_sequence(haystack: &[Word], needle: &[Word]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w.iter().zip(needle).all(|(a, b)| a.matches(b)))
}

#[derive(Debug, Clone, Copy)]
struct Hit {
    start: usize,
    len: usize,
    owner: usize,
}

fn find_hits<'a>(tokens: &[Token], terms: impl Iterator<Item = (&'a Term, usize)>) -> Vec<Hit> {
    let mut hits = Vec::new();
    for (term, owner) in terms {
        for start in 0..tokens.len() {
            if term_at(tokens, start, term) {
                hits.push(Hit {
                    start,
                    len: term.len(),
                    owner,
                });
            }
        }
    }
    hits
}

/// Longest match first, so "mountain lake" wins over "mountain" and "lake"; `taken` marks claimed words.
/// The result is in prompt order.
fn claim(mut hits: Vec<Hit>, taken: &mut [bool]) -> Vec<Hit> {
    hits.sort_by(|a, b| {
        b.len
            .cmp(&a.len)
            .then(a.start.cmp(&b.start))
            .then(a.owner.cmp(&b.owner))
    });
    let mut kept = Vec::new();
    for hit in hits {
        let Some(span) = taken.get_mut(hit.start..hit.start + hit.len) else {
            continue;
        };
        if span.iter().any(|&t| t) {
            continue;
        }
        span.fill(true);
        kept.push(hit);
    }
    kept.sort_by_key(|h| (h.start, h.owner));
    kept
}

fn distinct_owners(hits: &[Hit]) -> Vec<usize> {
    let mut owners = Vec::new();
    for hit in hits {
        if !owners.contains(&hit.owner) {
            owners.push(hit.owner);
        }
    }
    owners
}

// ---------------------------------------------------------------------------------------------------
// The table

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Limits {
    max_subjects: usize,
    max_details_per_subject: usize,
    max_lighting_entries: usize,
    max_lighting_phrases: usize,
    max_added_words: usize,
    expand_max_words: usize,
    max_negative_phrases: usize,
}

/// Which defect list a subject brings into the negative prompt. Declaration order is priority order:
/// anatomy defects matter most, so they are kept first when the negative list is capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Class {
    Person,
    Animal,
    Fantasy,
    Vehicle,
    Food,
    Object,
    Scifi,
    Urban,
    Interior,
    Landscape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Category {
    Landscape,
    City,
    Interior,
    People,
    Animal,
    Food,
    Vehicle,
    Object,
    Fantasy,
    Scifi,
}

impl Category {
    fn default_class(self) -> Class {
        match self {
            Self::Landscape => Class::Landscape,
            Self::City => Class::Urban,
            Self::Interior => Class::Interior,
            Self::People => Class::Person,
            Self::Animal => Class::Animal,
            Self::Food => Class::Food,
            Self::Vehicle => Class::Vehicle,
            Self::Object => Class::Object,
            Self::Fantasy => Class::Fantasy,
            Self::Scifi => Class::Scifi,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    limits: Limits,
    #[serde(default)]
    ignore: Vec<String>,
    subjects: RawSubjects,
    lighting: Vec<RawLighting>,
    negative: RawNegative,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubjects {
    #[serde(default)]
    landscape: Vec<RawSubject>,
    #[serde(default)]
    city: Vec<RawSubject>,
    #[serde(default)]
    interior: Vec<RawSubject>,
    #[serde(default)]
    people: Vec<RawSubject>,
    #[serde(default)]
    animal: Vec<RawSubject>,
    #[serde(default)]
    food: Vec<RawSubject>,
    #[serde(default)]
    vehicle: Vec<RawSubject>,
    #[serde(default)]
    object: Vec<RawSubject>,
    #[serde(default)]
    fantasy: Vec<RawSubject>,
    #[serde(default)]
    scifi: Vec<RawSubject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubject {
    name: String,
    #[serde(default)]
    also: Vec<String>,
    details: Vec<String>,
    #[serde(default)]
    class: Option<Class>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLighting {
    name: String,
    triggers: Vec<String>,
    phrases: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNegative {
    general: Vec<RawDefect>,
    #[serde(default)]
    class: BTreeMap<Class, Vec<RawDefect>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefect {
    phrase: String,
    #[serde(default)]
    unless: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
enum RulesError {
    #[error("prompt rules are not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("prompt rules: {0}")]
    Invalid(String),
}

/// A phrase the enhancement may add. `key` holds the words that, already present, mean the prompt says
/// this (the head noun, plus its modifier when the head alone is too general, as in "skin texture").
#[derive(Debug)]
struct Phrase {
    text: String,
    words: Vec<Word>,
    key: Vec<Word>,
    n_words: usize,
}

const KEY_SKIP: &[&str] = &[
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "to", "from", "by", "for",
    "over", "under", "into", "onto", "through", "its", "their", "as", "off", "overhead", "above",
    "below", "beneath", "behind", "around", "nearby", "outside", "inside", "up", "down", "out",
    "away",
];

const GENERIC_HEADS: &[&str] = &[
    "light",
    "lights",
    "lighting",
    "glow",
    "tone",
    "tones",
    "texture",
    "color",
    "colors",
    "colour",
    "colours",
    "detail",
    "details",
    "atmosphere",
];

impl Phrase {
    fn new(text: &str) -> Self {
        let words = phrase_words(text);
        let content: Vec<&Word> = words
            .iter()
            .filter(|w| !KEY_SKIP.contains(&w.text()))
            .collect();
        let key = match content.as_slice() {
            [.., modifier, head] if GENERIC_HEADS.contains(&head.text()) => {
                vec![(*modifier).clone(), (*head).clone()]
            }
            [.., head] => vec![(*head).clone()],
            [] => Vec::new(),
        };
        Self {
            text: text.trim().to_owned(),
            words,
            key,
            n_words: word_count(text),
        }
    }
}

#[derive(Debug)]
struct Subject {
    name: String,
    class: Class,
    terms: Vec<Term>,
    details: Vec<Phrase>,
}

#[derive(Debug)]
struct Lighting {
    name: String,
    triggers: Vec<Term>,
    phrases: Vec<Phrase>,
}

/// A defect for the negative prompt. Skipped when the positive prompt uses one of its describing words
/// (`modifiers`: "blurry background" wants blur) or an `unless` term (fog is low-contrast on purpose).
#[derive(Debug)]
struct Defect {
    text: String,
    words: Vec<Word>,
    modifiers: Vec<Word>,
    unless: Vec<Term>,
}

impl Defect {
    fn new(raw: &RawDefect) -> Self {
        let words = phrase_words(&raw.phrase);
        let modifiers = match words.split_last() {
            Some((only, [])) => vec![only.clone()],
            Some((_, rest)) => rest
                .iter()
                .filter(|w| !KEY_SKIP.contains(&w.text()))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        Self {
            text: raw.phrase.trim().to_owned(),
            words,
            modifiers,
            unless: raw.unless.iter().map(|u| phrase_words(u)).collect(),
        }
    }

    fn conflicts_with(&self, positive: &[Token]) -> bool {
        self.modifiers
            .iter()
            .any(|m| positive.iter().any(|t| t.word.matches(m)))
            || self
                .unless
                .iter()
                .any(|term| (0..positive.len()).any(|i| term_at(positive, i, term)))
    }
}

#[derive(Debug, Default)]
struct Rules {
    limits: Limits,
    ignore: Vec<Term>,
    subjects: Vec<Subject>,
    lighting: Vec<Lighting>,
    general_defects: Vec<Defect>,
    class_defects: BTreeMap<Class, Vec<Defect>>,
}

/// The compiled-in table, parsed once. A malformed table is a build defect caught by the unit tests;
/// should one ever ship, prompts still generate: the error is logged and enhancement degrades to the
/// default negative prompt and advice instead of panicking a server thread.
fn rules() -> &'static Rules {
    static RULES: OnceLock<Rules> = OnceLock::new();
    RULES.get_or_init(|| match Rules::parse(RULES_TOML) {
        Ok(rules) => rules,
        Err(err) => {
            tracing::error!(error = %err, "prompt enhancement table rejected; enhancement disabled");
            Rules::default()
        }
    })
}

impl Rules {
    fn parse(text: &str) -> Result<Self, RulesError> {
        let raw: RawRules = toml::from_str(text)?;
        let subjects_by_category = [
            (Category::Landscape, &raw.subjects.landscape),
            (Category::City, &raw.subjects.city),
            (Category::Interior, &raw.subjects.interior),
            (Category::People, &raw.subjects.people),
            (Category::Animal, &raw.subjects.animal),
            (Category::Food, &raw.subjects.food),
            (Category::Vehicle, &raw.subjects.vehicle),
            (Category::Object, &raw.subjects.object),
            (Category::Fantasy, &raw.subjects.fantasy),
            (Category::Scifi, &raw.subjects.scifi),
        ];
        let mut subjects = Vec::new();
        for (category, list) in subjects_by_category {
            for s in list {
                subjects.push(Subject {
                    name: s.name.trim().to_owned(),
                    class: s.class.unwrap_or(category.default_class()),
                    terms: std::iter::once(&s.name)
                        .chain(&s.also)
                        .map(|t| phrase_words(t))
                        .collect(),
                    details: s.details.iter().map(|d| Phrase::new(d)).collect(),
                });
            }
        }
        let rules = Self {
            limits: raw.limits,
            ignore: raw.ignore.iter().map(|t| phrase_words(t)).collect(),
            subjects,
            lighting: raw
                .lighting
                .iter()
                .map(|l| Lighting {
                    name: l.name.trim().to_owned(),
                    triggers: l.triggers.iter().map(|t| phrase_words(t)).collect(),
                    phrases: l.phrases.iter().map(|p| Phrase::new(p)).collect(),
                })
                .collect(),
            general_defects: raw.negative.general.iter().map(Defect::new).collect(),
            class_defects: raw
                .negative
                .class
                .iter()
                .map(|(class, list)| (*class, list.iter().map(Defect::new).collect()))
                .collect(),
        };
        rules.validate()?;
        Ok(rules)
    }

    /// The invariants the enhancement's guarantees rest on (see the table's header).
    fn validate(&self) -> Result<(), RulesError> {
        // Every problem at once: fixing a table one error per build is tedious.
        let mut problems = Vec::new();
        for s in &self.subjects {
            if s.name.is_empty() || s.terms.iter().any(Vec::is_empty) {
                problems.push(format!("subject {:?} has an empty name or synonym", s.name));
            }
            if !(3..=4).contains(&s.details.len()) {
                problems.push(format!("subject {:?} needs 3-4 details", s.name));
            }
        }
        for l in &self.lighting {
            if l.name.is_empty() || l.triggers.is_empty() || l.triggers.iter().any(Vec::is_empty) {
                problems.push(format!(
                    "lighting {:?} has an empty name or trigger",
                    l.name
                ));
            }
            if !(2..=3).contains(&l.phrases.len()) {
                problems.push(format!("lighting {:?} needs 2-3 phrases", l.name));
            }
        }
        if self.ignore.iter().any(Vec::is_empty) {
            problems.push("an ignore phrase is empty".to_owned());
        }
        let same_term =
            |a: &Term, b: &Term| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.matches(y));
        for (i, a) in self.subjects.iter().enumerate() {
            for b in self.subjects.iter().skip(i + 1) {
                for t in a
                    .terms
                    .iter()
                    .filter(|t| b.terms.iter().any(|u| same_term(t, u)))
                {
                    problems.push(format!(
                        "subjects {:?} and {:?} share the term {:?}",
                        a.name,
                        b.name,
                        term_text(t)
                    ));
                }
            }
        }
        for (i, a) in self.lighting.iter().enumerate() {
            for b in self.lighting.iter().skip(i + 1) {
                for t in a
                    .triggers
                    .iter()
                    .filter(|t| b.triggers.iter().any(|u| same_term(t, u)))
                {
                    problems.push(format!(
                        "lighting {:?} and {:?} share the trigger {:?}",
                        a.name,
                        b.name,
                        term_text(t)
                    ));
                }
            }
        }
        let phrases = self
            .subjects
            .iter()
            .flat_map(|s| &s.details)
            .chain(self.lighting.iter().flat_map(|l| &l.phrases));
        for p in phrases {
            if p.text.is_empty() || p.key.is_empty() || p.n_words == 0 {
                problems.push(format!("phrase {:?} has no words to key on", p.text));
            }
            let tokens = tokenize(&p.text);
            let subjects = self.recognise_subjects(&tokens);
            let lights = self.recognise_lighting(&tokens);
            if !subjects.is_empty() || !lights.is_empty() {
                let (s, l) = self.names(&subjects, &lights);
                problems.push(format!(
                    "phrase {:?} would itself be recognised (subjects {s:?}, lighting {l:?})",
                    p.text
                ));
            }
        }
        let defects = self
            .general_defects
            .iter()
            .chain(self.class_defects.values().flatten());
        for d in defects {
            if d.words.is_empty() || d.unless.iter().any(Vec::is_empty) {
                problems.push(format!("negative phrase {:?} is empty", d.text));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RulesError::Invalid(problems.join("; ")))
        }
    }

    fn recognise_subjects(&self, tokens: &[Token]) -> Vec<usize> {
        let terms = self
            .subjects
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.terms.iter().map(move |t| (t, i)));
        let mut taken = vec![false; tokens.len()];
        // Subjects are then taken in prompt order: people name the main subject first.
        distinct_owners(&claim(find_hits(tokens, terms), &mut taken))
    }

    fn recognise_lighting(&self, tokens: &[Token]) -> Vec<usize> {
        let mut taken = vec![false; tokens.len()];
        let ignore = self.ignore.iter().map(|t| (t, 0));
        claim(find_hits(tokens, ignore), &mut taken);
        let triggers = self
            .lighting
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.triggers.iter().map(move |t| (t, i)));
        distinct_owners(&claim(find_hits(tokens, triggers), &mut taken))
    }

    fn names(&self, subjects: &[usize], lights: &[usize]) -> (Vec<String>, Vec<String>) {
        (
            subjects
                .iter()
                .filter_map(|&i| self.subjects.get(i))
                .map(|s| s.name.clone())
                .collect(),
            lights
                .iter()
                .filter_map(|&i| self.lighting.get(i))
                .map(|l| l.name.clone())
                .collect(),
        )
    }

    /// Details of the first subjects and lighting of the recognised light words, within the limits.
    /// Order of consideration: first subject, lighting, further subjects, so a second subject cannot
    /// crowd out the light the user asked for. Returns (details, lighting phrases).
    fn expand(
        &self,
        tokens: &[Token],
        subjects: &[usize],
        lights: &[usize],
    ) -> (Vec<&Phrase>, Vec<&Phrase>) {
        let limits = self.limits;
        let mut budget = Budget {
            seen: tokens.iter().map(|t| t.word.clone()).collect(),
            used_words: 0,
            max_words: limits.max_added_words,
        };
        let chosen: Vec<&Subject> = subjects
            .iter()
            .filter_map(|&i| self.subjects.get(i))
            .take(limits.max_subjects)
            .collect();
        let entries: Vec<&Lighting> = lights
            .iter()
            .filter_map(|&i| self.lighting.get(i))
            .collect();
        // Round robin, so rain + neon gets some of each rather than all of the first.
        let rounds = entries.iter().map(|l| l.phrases.len()).max().unwrap_or(0);
        let light_phrases: Vec<&Phrase> = (0..rounds)
            .flat_map(|r| entries.iter().filter_map(move |l| l.phrases.get(r)))
            .collect();

        let mut details = Vec::new();
        let mut lighting = Vec::new();
        if let Some(first) = chosen.first() {
            details.extend(budget.group(&first.details, limits.max_details_per_subject));
        }
        lighting.extend(budget.group(light_phrases, limits.max_lighting_phrases));
        for s in chosen.iter().skip(1) {
            details.extend(budget.group(&s.details, limits.max_details_per_subject));
        }
        (details, lighting)
    }

    /// Concrete defects for the recognised subjects' classes plus the general list, skipping those the
    /// negative already has (they count towards the cap, as in `Budget::group`) and those the positive
    /// prompt asks for.
    fn purify(
        &self,
        subjects: &[usize],
        positive: &[Token],
        items: &mut Vec<Vec<Word>>,
    ) -> Vec<String> {
        let classes: BTreeSet<Class> = subjects
            .iter()
            .filter_map(|&i| self.subjects.get(i))
            .map(|s| s.class)
            .collect();
        let mut candidates: Vec<&Defect> = Vec::new();
        let lists = std::iter::once(&self.general_defects)
            .chain(classes.iter().filter_map(|c| self.class_defects.get(c)));
        for defect in lists.flatten() {
            if !candidates
                .iter()
                .any(|c| c.text.eq_ignore_ascii_case(&defect.text))
            {
                candidates.push(defect);
            }
        }
        let mut count = 0;
        let mut added = Vec::new();
        for defect in candidates {
            if items
                .iter()
                .any(|item| contains_sequence(item, &defect.words))
            {
                count += 1;
                continue;
            }
            if count >= self.limits.max_negative_phrases || defect.conflicts_with(positive) {
                continue;
            }
            items.push(defect.words.clone());
            count += 1;
            added.push(defect.text.clone());
        }
        added
    }
}

fn term_text(term: &Term) -> String {
    term.iter().map(Word::text).collect::<Vec<_>>().join(" ")
}

/// Word budget and duplicate check shared by all phrase groups of one expansion.
struct Budget {
    seen: Vec<Word>,
    used_words: usize,
    max_words: usize,
}

impl Budget {
    /// Adds phrases of one group, at most `cap` of them. A phrase the prompt already has counts towards
    /// the cap and the word budget exactly as if it had been added: that makes enhancement idempotent,
    /// because a second pass sees every count at least as high as the first and so adds nothing.
    fn group<'r>(
        &mut self,
        phrases: impl IntoIterator<Item = &'r Phrase>,
        cap: usize,
    ) -> Vec<&'r Phrase> {
        let mut count = 0;
        let mut added = Vec::new();
        for phrase in phrases {
            let present = phrase
                .key
                .iter()
                .all(|k| self.seen.iter().any(|w| w.matches(k)));
            if present {
                count += 1;
                self.used_words += phrase.n_words;
                continue;
            }
            if count >= cap || self.used_words + phrase.n_words > self.max_words {
                continue;
            }
            self.seen.extend(phrase.words.iter().cloned());
            count += 1;
            self.used_words += phrase.n_words;
            added.push(phrase);
        }
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::FamilyKind;

    fn ctx_cfg(cfg: f32) -> PromptContext {
        PromptContext {
            cfg,
            steps: 8,
            profile: FamilyKind::ZImage.profile(),
        }
    }

    /// The seed's defaults: CFG 1.8, 8 steps, CFG from 3.0 intercepted.
    fn ctx() -> PromptContext {
        ctx_cfg(1.8)
    }

    fn run(prompt: &str) -> Enhanced {
        enhance(prompt, None, &ctx(), true)
    }

    fn table() -> Rules {
        match Rules::parse(RULES_TOML) {
            Ok(rules) => rules,
            Err(err) => panic!("embedded table rejected: {err}"),
        }
    }

    fn raw_table() -> RawRules {
        match toml::from_str(RULES_TOML) {
            Ok(raw) => raw,
            Err(err) => panic!("embedded table is not TOML: {err}"),
        }
    }

    /// Comma-separated items, normalised for duplicate checks.
    fn items(text: &str) -> Vec<String> {
        text.split(',')
            .map(|i| i.trim().to_lowercase())
            .filter(|i| !i.is_empty())
            .collect()
    }

    fn kinds(e: &Enhanced) -> Vec<&str> {
        e.advice.iter().map(|a| a.kind.as_str()).collect()
    }

    fn advice_of<'a>(e: &'a Enhanced, kind: &str) -> &'a Advice {
        match e.advice.iter().find(|a| a.kind == kind) {
            Some(a) => a,
            None => panic!("no {kind:?} advice in {:?}", e.advice),
        }
    }

    fn lighting_phrases(rules: &Rules, name: &str) -> Vec<String> {
        rules
            .lighting
            .iter()
            .filter(|l| l.name == name)
            .flat_map(|l| l.phrases.iter().map(|p| p.text.clone()))
            .collect()
    }

    /// Short, long, multi-subject, already-enhanced, foreign and empty prompts: the inputs the
    /// property tests below run over.
    const CORPUS: &[&str] = &[
        "a serene mountain lake at dawn",
        "cyberpunk street, neon signs, rain-wet pavement",
        "a serene mountain lake at dawn, mist rising, pine trees on shore, ultra-detailed, cinematic lighting",
        "a cat sleeping in a cozy living room",
        "a woman walking her dog in a city park at sunset",
        "studio portrait of a young woman",
        "snow-capped mountains at sunset",
        "a lighthouse on a cliff during a storm",
        "a red sports car on a wet street at night, neon lights",
        "a dragon flying over a medieval castle",
        "a knight in a foggy forest",
        "wolves howling at the full moon",
        "a cozy cabin in a snowy forest, fireplace",
        "children playing on the beach, sunny afternoon",
        "a cat, a dog and a horse in a meadow",
        "rainy foggy night in a harbor with neon and candlelight",
        "portrait of an old fisherman with deep wrinkles and kind eyes, natural skin texture",
        "a mountain lake with turquoise water at dawn",
        "ramen.",
        "a Cat",
        "a tiny house",
        "an old man and an old woman sitting on a bench in a park on a quiet autumn afternoon with leaves",
        "一只猫坐在窗台上，黄昏",
        "un lac de montagne à l'aube",
        "",
        "   ",
        "!!!",
    ];

    // --- the table -------------------------------------------------------------------------------

    #[test]
    fn embedded_table_parses_validates_and_covers_all_categories() {
        let rules = table();
        let raw = raw_table();
        let s = &raw.subjects;
        let per_category = [
            ("landscape", s.landscape.len()),
            ("city", s.city.len()),
            ("interior", s.interior.len()),
            ("people", s.people.len()),
            ("animal", s.animal.len()),
            ("food", s.food.len()),
            ("vehicle", s.vehicle.len()),
            ("object", s.object.len()),
            ("fantasy", s.fantasy.len()),
            ("scifi", s.scifi.len()),
        ];
        for (category, n) in per_category {
            assert!(n >= 10, "{category}: only {n} subjects");
        }
        assert!(
            rules.subjects.len() >= 150,
            "{} subjects",
            rules.subjects.len()
        );
        assert!(
            rules.lighting.len() >= 20,
            "{} lighting entries",
            rules.lighting.len()
        );
        for s in &rules.subjects {
            assert!((3..=4).contains(&s.details.len()), "{}", s.name);
        }
        assert!(!rules.general_defects.is_empty());
        for class in [
            Class::Person,
            Class::Animal,
            Class::Fantasy,
            Class::Vehicle,
            Class::Food,
            Class::Object,
            Class::Scifi,
            Class::Urban,
            Class::Interior,
            Class::Landscape,
        ] {
            assert!(
                rules
                    .class_defects
                    .get(&class)
                    .is_some_and(|d| !d.is_empty()),
                "{class:?}"
            );
        }
    }

    #[test]
    fn every_subject_is_recognised_by_its_name_and_each_synonym() {
        let rules = table();
        for s in &rules.subjects {
            for term in &s.terms {
                let text = term_text(term);
                let tokens = tokenize(&text);
                let found = rules.recognise_subjects(&tokens);
                let (names, _) = rules.names(&found, &[]);
                assert_eq!(names, vec![s.name.clone()], "term {text:?}");
            }
        }
    }

    #[test]
    fn added_phrases_never_trigger_anything() {
        // Checked at load time too; this states the guarantee idempotence and "no invented time of
        // day" rest on.
        let rules = table();
        let phrases = rules
            .subjects
            .iter()
            .flat_map(|s| &s.details)
            .chain(rules.lighting.iter().flat_map(|l| &l.phrases));
        for p in phrases {
            let tokens = tokenize(&p.text);
            assert!(rules.recognise_subjects(&tokens).is_empty(), "{:?}", p.text);
            assert!(rules.recognise_lighting(&tokens).is_empty(), "{:?}", p.text);
        }
    }

    #[test]
    fn malformed_tables_are_rejected() {
        let valid = r#"
            ignore = []
            [limits]
            max_subjects = 2
            max_details_per_subject = 3
            max_lighting_entries = 2
            max_lighting_phrases = 3
            max_added_words = 15
            expand_max_words = 15
            max_negative_phrases = 10
            [subjects]
            landscape = [ { name = "lake", details = ["clear water", "reedy banks", "soft ripples"] } ]
            animal = [ { name = "cat", details = ["soft fur", "long whiskers", "alert eyes"] } ]
            [[lighting]]
            name = "sunset"
            triggers = ["sunset"]
            phrases = ["warm orange glow", "long shadows"]
            [negative]
            general = [ { phrase = "jpeg artifacts" } ]
        "#;
        assert!(Rules::parse(valid).is_ok());
        let broken = [
            ("not toml", "limits = [", "TOML"),
            (
                "unknown field",
                &valid.replace("max_subjects", "max_subject"),
                "max_subject",
            ),
            (
                "unknown class",
                &format!("{valid}\n[negative.class]\nrobots = []\n"),
                "robots",
            ),
            (
                "phrase with a time word",
                &valid.replace("soft ripples", "sunset ripples"),
                "sunset ripples",
            ),
            (
                "phrase naming a subject",
                &valid.replace("alert eyes", "lake eyes"),
                "lake eyes",
            ),
            (
                "shared term",
                &valid.replace("name = \"cat\"", "name = \"cat\", also = [\"lakes\"]"),
                "share",
            ),
            (
                "too few details",
                &valid.replace(", \"soft ripples\"", ""),
                "3-4 details",
            ),
        ];
        for (what, text, expected) in broken {
            match Rules::parse(text) {
                Ok(_) => panic!("{what}: accepted"),
                Err(err) => {
                    let msg = err.to_string();
                    assert!(msg.contains(expected), "{what}: {msg}");
                }
            }
        }
    }

    #[test]
    fn an_empty_rule_set_still_applies_the_default_negative() {
        // What a rejected table degrades to at run time.
        let mut advice_list = Vec::new();
        let e = rewrite(
            &Rules::default(),
            "a serene mountain lake at dawn",
            None,
            &ctx(),
            &mut advice_list,
        );
        assert_eq!(e.prompt, "a serene mountain lake at dawn");
        assert_eq!(e.negative_prompt, DEFAULT_NEGATIVE_PROMPT);
        assert!(e.added.prompt.is_empty());
    }

    #[test]
    fn phrase_keys_are_the_head_noun_or_modifier_plus_generic_head() {
        let key = |text: &str| -> Vec<String> {
            Phrase::new(text)
                .key
                .iter()
                .map(|w| w.text().to_owned())
                .collect()
        };
        assert_eq!(key("clear water"), ["water"]);
        assert_eq!(key("tangled overhead cables"), ["cables"]);
        assert_eq!(key("cool ambient tone"), ["ambient", "tone"]);
        assert_eq!(key("natural skin texture"), ["skin", "texture"]);
        assert_eq!(key("catchlight in the eyes"), ["eyes"]);
    }

    // --- the seed's examples -------------------------------------------------------------------

    #[test]
    fn seed_mountain_lake_at_dawn_gets_details_and_dawn_lighting() {
        let e = run("a serene mountain lake at dawn");
        assert_eq!(
            e.added.prompt,
            [
                "rocky shoreline",
                "clear water",
                "distant peaks",
                "soft golden light",
                "long shadows",
                "cool ambient tone"
            ]
        );
        assert_eq!(
            e.prompt,
            "a serene mountain lake at dawn, rocky shoreline, clear water, distant peaks, soft golden \
             light, long shadows, cool ambient tone"
        );
        assert_eq!(e.recognised.subjects, ["mountain lake"]);
        assert_eq!(e.recognised.lighting, ["dawn"]);
        assert!(e.enhanced);
    }

    #[test]
    fn seed_cyberpunk_street_gets_neon_and_rain_but_no_time_of_day() {
        let rules = table();
        let e = run("cyberpunk street, neon signs, rain-wet pavement");
        assert_eq!(e.recognised.lighting, ["neon", "rain"]);
        let neon = lighting_phrases(&rules, "neon");
        let rain = lighting_phrases(&rules, "rain");
        assert!(
            e.added.prompt.iter().any(|p| neon.contains(p)),
            "{:?}",
            e.added
        );
        assert!(
            e.added.prompt.iter().any(|p| rain.contains(p)),
            "{:?}",
            e.added
        );
        let time_entries = [
            "dawn",
            "sunrise",
            "morning",
            "noon",
            "afternoon",
            "golden hour",
            "sunset",
            "dusk",
            "twilight",
            "blue hour",
            "night",
            "midnight",
        ];
        let time_phrases: Vec<String> = time_entries
            .iter()
            .flat_map(|name| lighting_phrases(&rules, name))
            .collect();
        for added in &e.added.prompt {
            assert!(
                !time_phrases.contains(added),
                "invented time of day: {added}"
            );
        }
        let lower = e.prompt.to_lowercase();
        for word in [
            "night", "dusk", "evening", "sunset", "dawn", "morning", "noon",
        ] {
            assert!(!lower.contains(word), "{word} in {lower}");
        }
    }

    #[test]
    fn seed_sample_prompt_of_fifteen_words_is_still_expanded_within_budget() {
        let prompt =
            "a serene mountain lake at dawn, mist rising, pine trees on shore, ultra-detailed, \
                      cinematic lighting";
        assert_eq!(word_count(prompt), 15);
        let e = run(prompt);
        assert!(!e.added.prompt.is_empty());
        assert_eq!(e.recognised.lighting, ["dawn", "fog"]);
        assert!(word_count(&e.added.prompt.join(", ")) <= table().limits.max_added_words);
        assert!(e.prompt.starts_with(prompt));
    }

    // --- lighting --------------------------------------------------------------------------------

    #[test]
    fn each_time_and_weather_word_selects_its_lighting() {
        let rules = table();
        let cases = [
            ("dawn", "dawn"),
            ("sunrise", "sunrise"),
            ("morning", "morning"),
            ("noon", "noon"),
            ("afternoon", "afternoon"),
            ("golden hour", "golden hour"),
            ("sunset", "sunset"),
            ("dusk", "dusk"),
            ("twilight", "twilight"),
            ("blue hour", "blue hour"),
            ("night", "night"),
            ("midnight", "midnight"),
            ("overcast", "overcast"),
            ("fog", "fog"),
            ("mist", "fog"),
            ("rain", "rain"),
            ("snow", "snow"),
            ("storm", "storm"),
            ("neon", "neon"),
            ("candlelight", "candlelight"),
            ("studio lighting", "studio"),
            ("moonlight", "moonlight"),
            ("campfire", "firelight"),
            ("northern lights", "aurora"),
            ("sunshine", "sunny"),
        ];
        for (word, entry) in cases {
            let e = run(&format!("a quiet harbor, {word}"));
            assert_eq!(e.recognised.lighting, [entry], "{word}");
            let phrases = lighting_phrases(&rules, entry);
            assert!(
                e.added.prompt.iter().any(|p| phrases.contains(p)),
                "{word}: {:?}",
                e.added.prompt
            );
        }
    }

    #[test]
    fn without_time_or_weather_words_no_lighting_is_invented() {
        let rules = table();
        let all_light: Vec<String> = rules
            .lighting
            .iter()
            .flat_map(|l| l.phrases.iter().map(|p| p.text.clone()))
            .collect();
        for prompt in [
            "a cat sleeping in a cozy living room",
            "a dragon flying over a medieval castle",
            "bowl of ramen on a wooden table",
            "a pottery studio with shelves of vases",
            "studio ghibli style forest",
        ] {
            let e = run(prompt);
            assert!(
                e.recognised.lighting.is_empty(),
                "{prompt}: {:?}",
                e.recognised
            );
            for added in &e.added.prompt {
                assert!(!all_light.contains(added), "{prompt}: {added}");
            }
        }
    }

    #[test]
    fn look_alike_words_do_not_select_lighting() {
        assert_eq!(
            run("snow-capped mountains at sunset").recognised.lighting,
            ["sunset"]
        );
        assert_eq!(
            run("a woman in an evening gown").recognised.lighting,
            Vec::<String>::new()
        );
        assert_eq!(
            run("studio portrait of a man").recognised.lighting,
            ["studio"]
        );
        assert_eq!(
            run("a rain forest river").recognised.lighting,
            Vec::<String>::new()
        );
    }

    #[test]
    fn at_most_two_lighting_entries_in_prompt_order() {
        let e = run("rainy foggy night in a harbor with neon and candlelight");
        assert_eq!(e.recognised.lighting, ["rain", "fog"]);
        let rules = table();
        let allowed: Vec<String> = ["rain", "fog"]
            .iter()
            .flat_map(|n| lighting_phrases(&rules, n))
            .collect();
        let lights: Vec<&String> = e
            .added
            .prompt
            .iter()
            .filter(|p| allowed.contains(p))
            .collect();
        assert!(!lights.is_empty() && lights.len() <= rules.limits.max_lighting_phrases);
    }

    // --- matching --------------------------------------------------------------------------------

    #[test]
    fn plurals_and_synonyms_match() {
        let cases = [
            ("two lakes under clouds", "lake"),
            ("a pack of wolves", "wolf"),
            ("cities from above", "city"),
            ("fishermen mending nets", "fisherman"),
            ("three puppies", "dog"),
            ("elves in a glade", "elf"),
            ("women laughing", "woman"),
            ("children reading", "child"),
            ("bunnies in the grass", "rabbit"),
            ("an alpine lake", "mountain lake"),
            ("steaming dumpling", "dumplings"),
            ("A CAT", "cat"),
            ("a café in paris", "cafe"),
        ];
        for (prompt, subject) in cases {
            let e = run(prompt);
            assert_eq!(
                e.recognised.subjects.first().map(String::as_str),
                Some(subject),
                "{prompt}"
            );
            assert!(!e.added.prompt.is_empty(), "{prompt}");
        }
    }

    #[test]
    fn matching_is_on_whole_words() {
        for prompt in [
            "a catalog of scattered items",
            "a carpet with a category label",
            "bushes along a parking lot",
            "a wooden table",
        ] {
            let e = run(prompt);
            assert!(
                e.recognised.subjects.is_empty(),
                "{prompt}: {:?}",
                e.recognised
            );
            assert_eq!(e.prompt, prompt);
        }
    }

    #[test]
    fn longest_match_wins() {
        assert_eq!(
            run("a mountain lake").recognised.subjects,
            ["mountain lake"]
        );
        assert_eq!(run("a teddy bear").recognised.subjects, ["teddy bear"]);
        assert_eq!(run("a sea turtle").recognised.subjects, ["turtle"]);
        assert_eq!(
            run("cyberpunk street").recognised.subjects,
            ["cyberpunk city"]
        );
        // A multi-word term never spans a comma.
        assert_eq!(
            run("a mountain, lake").recognised.subjects,
            ["mountain", "lake"]
        );
    }

    #[test]
    fn only_the_first_two_subjects_get_details() {
        let rules = table();
        let e = run("a cat, a dog and a horse in a meadow");
        assert_eq!(e.recognised.subjects, ["cat", "dog", "horse", "meadow"]);
        let details_of = |name: &str| -> Vec<String> {
            rules
                .subjects
                .iter()
                .filter(|s| s.name == name)
                .flat_map(|s| s.details.iter().map(|p| p.text.clone()))
                .collect()
        };
        assert!(e.added.prompt.iter().any(|p| details_of("cat").contains(p)));
        for later in ["horse", "meadow"] {
            assert!(
                !e.added.prompt.iter().any(|p| details_of(later).contains(p)),
                "{later}"
            );
        }
    }

    #[test]
    fn what_the_prompt_already_says_is_not_repeated() {
        let e = run("a mountain lake with turquoise water at dawn");
        assert!(
            !e.added.prompt.iter().any(|p| p.contains("water")),
            "{:?}",
            e.added
        );
        assert!(e.added.prompt.contains(&"rocky shoreline".to_owned()));

        let e = run("a mountain lake at dawn, long shadows, soft golden light");
        assert!(!e
            .added
            .prompt
            .iter()
            .any(|p| p == "long shadows" || p == "soft golden light"));

        // Details of different subjects share keys: "natural skin texture" once.
        let e = run("portrait of a woman");
        let n = e
            .added
            .prompt
            .iter()
            .filter(|p| p.contains("skin texture"))
            .count();
        assert_eq!(n, 1, "{:?}", e.added);
    }

    // --- bounds ----------------------------------------------------------------------------------

    #[test]
    fn expansion_is_bounded_for_every_subject() {
        let rules = table();
        let limits = rules.limits;
        for s in &rules.subjects {
            let prompt = format!("{} in the rain at sunset", s.name);
            let e = run(&prompt);
            let added_words = word_count(&e.added.prompt.join(", "));
            assert!(
                added_words <= limits.max_added_words,
                "{prompt}: {added_words} words"
            );
            let details = e
                .added
                .prompt
                .iter()
                .filter(|p| s.details.iter().any(|d| &d.text == *p))
                .count();
            assert!(
                (1..=limits.max_details_per_subject).contains(&details),
                "{prompt}: {details} details"
            );
            let lights = e.added.prompt.len() - details;
            assert!(lights <= limits.max_lighting_phrases, "{prompt}");
            assert!(e.added.negative_prompt.len() <= 4 + limits.max_negative_phrases);
        }
    }

    #[test]
    fn long_prompts_are_not_expanded_but_the_negative_is_purified() {
        let prompt = "an old man and an old woman sitting on a bench in a park on a quiet autumn \
                      afternoon with leaves";
        assert!(word_count(prompt) > 15);
        let e = run(prompt);
        assert_eq!(e.prompt, prompt);
        assert!(e.added.prompt.is_empty());
        assert!(
            e.negative_prompt.contains("extra limbs"),
            "{}",
            e.negative_prompt
        );
        assert_eq!(advice_of(&e, "prompt_length").level, AdviceLevel::Warn);
        assert!(advice_of(&e, "enhancement")
            .message
            .contains("not expanded"));
    }

    // --- negative prompt -----------------------------------------------------------------------

    #[test]
    fn default_negative_when_guidance_is_on_and_none_was_given() {
        let e = run("a cat");
        assert!(
            e.negative_prompt.starts_with(DEFAULT_NEGATIVE_PROMPT),
            "{}",
            e.negative_prompt
        );
        assert_eq!(
            e.added.negative_prompt.get(..4),
            Some(&["nsfw", "blurry", "deformed", "black screen"].map(String::from)[..])
        );
        assert_eq!(e.original_negative_prompt, None);
        // An empty or blank negative counts as none given.
        let e = enhance("a cat", Some("  "), &ctx(), true);
        assert!(e.negative_prompt.starts_with(DEFAULT_NEGATIVE_PROMPT));
        assert_eq!(e.original_negative_prompt.as_deref(), Some("  "));
    }

    #[test]
    fn guidance_off_skips_the_default_but_shows_the_negative_as_unused() {
        let e = enhance("a cat", None, &ctx_cfg(1.0), true);
        assert!(!e.negative_prompt.contains("black screen"));
        assert!(e.negative_prompt.contains("jpeg artifacts"));
        assert_eq!(advice_of(&e, "negative_unused").level, AdviceLevel::Info);

        // Nothing to show, nothing to warn about.
        let e = enhance("一只猫", None, &ctx_cfg(1.0), true);
        assert_eq!(e.negative_prompt, "");
        assert!(!kinds(&e).contains(&"negative_unused"));
    }

    #[test]
    fn user_negative_is_kept_first_and_not_duplicated() {
        let user = "Blurry, EXTRA LIMBS, (jpeg artifacts:1.2)";
        let e = enhance("portrait of a woman", Some(user), &ctx(), true);
        assert!(e.negative_prompt.starts_with(user), "{}", e.negative_prompt);
        for phrase in ["extra limbs", "jpeg artifacts", "nsfw", "black screen"] {
            assert!(
                !e.added.negative_prompt.iter().any(|p| p == phrase),
                "{phrase}"
            );
        }
        assert!(e
            .added
            .negative_prompt
            .contains(&"extra fingers".to_owned()));
    }

    #[test]
    fn anatomy_defects_only_when_people_are_present() {
        for prompt in [
            "a serene mountain lake at dawn",
            "bowl of ramen",
            "a red sports car",
        ] {
            let neg = run(prompt).negative_prompt;
            for anatomy in [
                "extra limbs",
                "extra fingers",
                "malformed hands",
                "distorted face",
            ] {
                assert!(!neg.contains(anatomy), "{prompt}: {neg}");
            }
        }
        for prompt in [
            "portrait of a woman",
            "a knight in armor",
            "children playing",
        ] {
            assert!(
                run(prompt).negative_prompt.contains("extra limbs"),
                "{prompt}"
            );
        }
        assert!(run("a fox in the snow")
            .negative_prompt
            .contains("extra legs"));
    }

    #[test]
    fn defects_the_prompt_asks_for_are_not_negated() {
        assert!(!run("a knight in a foggy forest")
            .negative_prompt
            .contains("low contrast"));
        assert!(!run("flat design poster of a cat")
            .negative_prompt
            .contains("flat lighting"));
        assert!(!run("a muddy river")
            .negative_prompt
            .contains("muddy colors"));
        assert!(run("a river").negative_prompt.contains("muddy colors"));
    }

    // --- pass-through ----------------------------------------------------------------------------

    #[test]
    fn disabled_returns_everything_verbatim_with_advice() {
        let e = enhance(" a serene mountain lake at dawn ", None, &ctx(), false);
        assert_eq!(e.prompt, " a serene mountain lake at dawn ");
        assert_eq!(e.negative_prompt, "");
        assert_eq!(e.added, Added::default());
        assert!(!e.enhanced);
        assert_eq!(kinds(&e), ["prompt_length", "cfg", "steps"]);

        let e = enhance("a cat", Some("ugly"), &ctx_cfg(1.0), false);
        assert_eq!(e.negative_prompt, "ugly");
        assert!(kinds(&e).contains(&"negative_unused"));
    }

    #[test]
    fn non_english_prompts_pass_through_with_a_notice() {
        for prompt in [
            "一只猫坐在窗台上，黄昏",
            "夕暮れの山の湖",
            "горное озеро на рассвете",
            "un lac de montagne à l'aube",
            "ein Bergsee bei Sonnenaufgang mit der Sonne",
            "una playa al atardecer con el sol",
        ] {
            let e = run(prompt);
            assert_eq!(e.prompt, prompt);
            assert!(e.added.prompt.is_empty(), "{prompt}");
            assert_eq!(e.negative_prompt, DEFAULT_NEGATIVE_PROMPT, "{prompt}");
            assert!(kinds(&e).contains(&"language"), "{prompt}: {:?}", e.advice);
            assert!(advice_of(&e, "enhancement").message.contains("unchanged"));
        }
        // English with a foreign name in it is still English.
        assert!(!run("Notre Dame de Paris cathedral at dusk")
            .added
            .prompt
            .is_empty());
    }

    #[test]
    fn empty_prompts_pass_through_with_a_notice() {
        for prompt in ["", "   ", ",,,", "!!!"] {
            let e = run(prompt);
            assert_eq!(e.prompt, prompt);
            assert!(e.added.prompt.is_empty());
            assert_eq!(advice_of(&e, "empty").level, AdviceLevel::Warn);
        }
    }

    #[test]
    fn trailing_separators_are_not_doubled() {
        assert!(run("a cat.").prompt.starts_with("a cat, soft detailed fur"));
        assert!(run("a cat, ")
            .prompt
            .starts_with("a cat, soft detailed fur"));
        assert!(run("  a cat").prompt.starts_with("a cat, soft"));
    }

    // --- properties over the corpus -------------------------------------------------------------

    #[test]
    fn enhancing_an_enhanced_prompt_adds_nothing() {
        for cfg in [1.0, 1.8] {
            for user_negative in [None, Some("ugly, extra limbs")] {
                for prompt in CORPUS {
                    let c = ctx_cfg(cfg);
                    let first = enhance(prompt, user_negative, &c, true);
                    let second = enhance(&first.prompt, Some(&first.negative_prompt), &c, true);
                    assert_eq!(second.added, Added::default(), "{prompt:?} cfg {cfg}");
                    assert_eq!(second.prompt, first.prompt);
                    assert_eq!(second.negative_prompt, first.negative_prompt);
                }
            }
        }
    }

    #[test]
    fn results_contain_no_duplicate_phrases() {
        for prompt in CORPUS {
            for negative in [None, Some("blurry, watermark, Watermark")] {
                let e = enhance(prompt, negative, &ctx(), true);
                let user_items = items(negative.unwrap_or_default());
                let mut seen = user_items.clone();
                for added in &e.added.negative_prompt {
                    let added = added.to_lowercase();
                    assert!(!seen.contains(&added), "{prompt:?}: {added} twice");
                    seen.push(added);
                }
                let mut seen = items(prompt);
                for added in &e.added.prompt {
                    assert!(!seen.contains(&added.to_lowercase()), "{prompt:?}: {added}");
                    seen.push(added.to_lowercase());
                }
            }
        }
    }

    #[test]
    fn added_phrases_are_visible_in_the_final_texts() {
        for prompt in CORPUS {
            let e = run(prompt);
            assert_eq!(e.original_prompt, *prompt);
            if e.added.prompt.is_empty() {
                assert_eq!(e.prompt, *prompt);
            } else {
                let tail = format!(", {}", e.added.prompt.join(", "));
                assert!(e.prompt.ends_with(&tail), "{:?}", e.prompt);
                assert!(e.prompt.starts_with(prompt.trim().trim_end_matches('.')));
            }
            let tail = e.added.negative_prompt.join(", ");
            assert!(e.negative_prompt.ends_with(&tail));
        }
    }

    #[test]
    fn enhancement_is_deterministic() {
        for prompt in CORPUS {
            let a = run(prompt);
            let b = run(prompt);
            assert_eq!(a, b);
            let ja = serde_json::to_string(&a).ok();
            let jb = serde_json::to_string(&b).ok();
            assert!(ja.is_some());
            assert_eq!(ja, jb);
        }
    }

    // --- advice ----------------------------------------------------------------------------------

    #[test]
    fn prompt_length_advice_follows_the_seed_numbers() {
        let cases = [
            ("a cat", AdviceLevel::Info, "8–12"),
            ("a small red fox sitting in fresh snow at dusk", AdviceLevel::Info, "8–12 word range"),
            (
                "a small red fox sitting in fresh snow at dusk under tall old pines",
                AdviceLevel::Info,
                "76.1",
            ),
            (
                "a small red fox sitting in fresh snow at dusk under tall old pines near a frozen river",
                AdviceLevel::Warn,
                "76.1",
            ),
        ];
        for (prompt, level, needle) in cases {
            let a = advice(prompt, &ctx());
            let Some(length) = a.iter().find(|a| a.kind == "prompt_length") else {
                panic!("no prompt_length advice for {prompt}");
            };
            assert_eq!(length.level, level, "{prompt}");
            assert!(
                length.message.contains(needle),
                "{prompt}: {}",
                length.message
            );
            assert!(length
                .message
                .starts_with(&format!("{} word", word_count(prompt))));
        }
    }

    #[test]
    fn cfg_advice_follows_the_seed_numbers() {
        let cases = [
            (1.0, AdviceLevel::Info, "guidance off"),
            (1.5, AdviceLevel::Info, "soft"),
            (1.8, AdviceLevel::Info, "89.6"),
            (2.2, AdviceLevel::Info, "overexpose"),
            (2.6, AdviceLevel::Warn, "overexpose"),
            (3.0, AdviceLevel::Warn, "intercepted"),
            (4.5, AdviceLevel::Warn, "intercepted"),
            (f32::NAN, AdviceLevel::Warn, "not a number"),
        ];
        for (cfg, level, needle) in cases {
            let a = cfg_advice(&ctx_cfg(cfg));
            assert_eq!(a.kind, "cfg");
            assert_eq!(a.level, level, "cfg {cfg}");
            assert!(a.message.contains(needle), "cfg {cfg}: {}", a.message);
        }
        assert!(cfg_advice(&ctx_cfg(3.2)).message.starts_with("CFG 3.2:"));
    }

    #[test]
    fn steps_advice_follows_the_seed_numbers() {
        let cases = [
            (2, AdviceLevel::Warn, "composition"),
            (4, AdviceLevel::Info, "composition only"),
            (6, AdviceLevel::Info, "basic texture"),
            (8, AdviceLevel::Info, "default"),
            (10, AdviceLevel::Info, "little gain"),
            (12, AdviceLevel::Warn, "over-sharpen"),
            (30, AdviceLevel::Warn, "over-sharpen"),
        ];
        for (steps, level, needle) in cases {
            let a = steps_advice(&PromptContext { steps, ..ctx() });
            assert_eq!(a.level, level, "{steps} steps");
            assert!(a.message.contains(needle), "{steps}: {}", a.message);
        }
    }

    #[test]
    fn unet_turbo_families_get_their_own_advice() {
        let ctx = PromptContext {
            cfg: 1.0,
            steps: 1,
            profile: FamilyKind::SdTurbo.profile(),
        };
        let a = advice("a red fox in the snow", &ctx);
        assert!(a[1].message.contains("guidance off"), "{}", a[1].message);
        assert!(
            a[2].message.contains("1 step: the default"),
            "{}",
            a[2].message
        );
        assert_eq!(a[2].level, AdviceLevel::Info);
        let many = advice("a red fox", &PromptContext { steps: 8, ..ctx });
        assert_eq!(many[2].level, AdviceLevel::Warn);
        let hot = advice("a red fox", &PromptContext { cfg: 2.5, ..ctx });
        assert_eq!(hot[1].level, AdviceLevel::Warn);
        let e = enhance("a red fox", Some("blurry"), &ctx, false);
        let unused = e
            .advice
            .iter()
            .find(|a| a.kind == "negative_unused")
            .unwrap();
        assert!(!unused.message.contains("1.8"), "{}", unused.message);
    }

    #[test]
    fn every_job_gets_length_cfg_and_steps_advice() {
        for prompt in CORPUS {
            let e = run(prompt);
            let k = kinds(&e);
            assert!(k.contains(&"cfg") && k.contains(&"steps"), "{prompt:?}");
            assert!(
                k.contains(&"prompt_length") || k.contains(&"language") || k.contains(&"empty"),
                "{prompt:?}"
            );
            assert!(k.contains(&"enhancement"), "{prompt:?}");
        }
    }

    #[test]
    fn word_count_counts_what_a_user_sees_as_words() {
        let cases = [
            ("", 0),
            ("  ,  ", 0),
            ("a cat", 2),
            ("ultra-detailed, cinematic lighting", 3),
            ("rain-wet pavement", 2),
            ("a,b,,c", 3),
            ("a  serene\tlake\n", 3),
        ];
        for (text, n) in cases {
            assert_eq!(word_count(text), n, "{text:?}");
        }
    }

    #[test]
    fn numbers_are_shown_without_float_noise() {
        assert_eq!(fmt_num(1.8), "1.8");
        assert_eq!(fmt_num(3.0), "3.0");
        assert_eq!(fmt_num(1.85), "1.85");
    }

    /// The advice never names a family: it is the profile's band sentence, placeholders filled.
    #[test]
    fn advice_renders_the_profiles_bands() {
        for kind in FamilyKind::ALL {
            let profile = kind.profile();
            for cfg in [1.0, 1.5, 1.8, 2.0, 2.2, 2.6, 3.0, 7.5] {
                let ctx = PromptContext {
                    cfg,
                    steps: 1,
                    profile,
                };
                let a = cfg_advice(&ctx);
                let band = profile.cfg.band(cfg).unwrap();
                let want =
                    profile.render(band.advice, &fmt_num(cfg), &fmt_num(profile.defaults.cfg));
                assert_eq!(a.message, want, "{kind} cfg {cfg}");
                assert!(!a.message.contains('{'), "{kind}: {}", a.message);
                let warn = matches!(band.level, BandLevel::Warn | BandLevel::Bad);
                assert_eq!(a.level == AdviceLevel::Warn, warn, "{kind} cfg {cfg}");
            }
            for steps in [1, 2, 4, 5, 8, 10, 12, 30] {
                let ctx = PromptContext {
                    cfg: 1.0,
                    steps,
                    profile,
                };
                let a = steps_advice(&ctx);
                assert!(a.message.starts_with(&steps.to_string()), "{}", a.message);
                assert!(!a.message.contains('{'), "{kind}: {}", a.message);
            }
        }
    }

    // --- wire format -----------------------------------------------------------------------------

    #[test]
    fn serialises_for_the_api() {
        let e = run("a serene mountain lake at dawn");
        let json = match serde_json::to_value(&e) {
            Ok(v) => v,
            Err(err) => panic!("{err}"),
        };
        assert_eq!(json["added"]["prompt"][0], "rocky shoreline");
        assert_eq!(json["added"]["negative_prompt"][0], "nsfw");
        assert_eq!(json["advice"][0]["level"], "info");
        assert_eq!(json["enhanced"], true);
        assert!(json["original_negative_prompt"].is_null());
        let back: Enhanced = match serde_json::from_value(json.clone()) {
            Ok(v) => v,
            Err(err) => panic!("{err}"),
        };
        assert_eq!(back, e);

        // Records written before `recognised` existed still load.
        let mut old = json;
        if let Some(map) = old.as_object_mut() {
            map.remove("recognised");
        }
        let back: Result<Enhanced, _> = serde_json::from_value(old);
        assert!(back.is_ok_and(|b| b.recognised == Recognised::default()));

        let warn = serde_json::to_string(&AdviceLevel::Warn).ok();
        assert_eq!(warn.as_deref(), Some("\"warn\""));
    }
}
