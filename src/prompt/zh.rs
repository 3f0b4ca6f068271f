//! Chinese prompts: the table's `[zh]` section — subjects with their details, lighting from the
//! user's own time and weather words (黎明 → 柔和的金色晨光…) and each class's defects for the
//! negative prompt. Chinese has no spaces, so terms match as substrings of the prompt (longest
//! first, each character claimed once) and length is counted in characters.
//!
//! The same guarantees as the English table, checked when the table loads:
//! - no added phrase contains a subject term or a lighting trigger, so enhancing an enhanced prompt
//!   recognises nothing new and adds nothing (idempotence), and no detail invents a time of day or
//!   weather;
//! - no two subjects (or lighting entries) share a term.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::rules::Class;

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ZhLimits {
    /// Prompts longer than this many CJK characters are not expanded (the counterpart of the
    /// English `expand_max_words`; see the table).
    pub(super) expand_max_chars: usize,
    /// At most this many characters are added to the prompt.
    pub(super) max_added_chars: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawZh {
    pub(super) limits: ZhLimits,
    #[serde(default)]
    pub(super) ignore: Vec<String>,
    pub(super) subjects: Vec<RawZhSubject>,
    pub(super) lighting: Vec<RawZhLighting>,
    #[serde(default)]
    pub(super) negative: BTreeMap<Class, Vec<RawZhDefect>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawZhSubject {
    pub(super) name: String,
    #[serde(default)]
    pub(super) also: Vec<String>,
    pub(super) class: Class,
    pub(super) details: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawZhLighting {
    pub(super) name: String,
    pub(super) triggers: Vec<String>,
    pub(super) phrases: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawZhDefect {
    pub(super) phrase: String,
    /// Left out when the prompt contains one of these (a foggy scene is low-contrast on purpose).
    #[serde(default)]
    pub(super) unless: Vec<String>,
}

#[derive(Debug)]
pub(super) struct ZhSubject {
    pub(super) name: String,
    pub(super) class: Class,
    pub(super) terms: Vec<String>,
    pub(super) details: Vec<String>,
}

#[derive(Debug)]
pub(super) struct ZhLighting {
    pub(super) name: String,
    pub(super) triggers: Vec<String>,
    pub(super) phrases: Vec<String>,
}

#[derive(Debug)]
pub(super) struct ZhDefect {
    pub(super) phrase: String,
    pub(super) unless: Vec<String>,
}

#[derive(Debug, Default)]
pub(super) struct ZhRules {
    pub(super) limits: ZhLimits,
    /// Words that contain a trigger without meaning it (雪山 is a mountain, not a snowfall).
    pub(super) ignore: Vec<String>,
    pub(super) subjects: Vec<ZhSubject>,
    pub(super) lighting: Vec<ZhLighting>,
    pub(super) negative: BTreeMap<Class, Vec<ZhDefect>>,
}

/// What the Chinese rewrite found and adds.
#[derive(Debug, Default)]
pub(super) struct ZhRewrite {
    pub(super) subjects: Vec<String>,
    pub(super) lighting: Vec<String>,
    pub(super) details: Vec<String>,
    pub(super) lighting_phrases: Vec<String>,
    /// Class defects for the negative prompt (not yet in it).
    pub(super) negative: Vec<String>,
    /// The prompt's CJK characters, and whether it was short enough to expand.
    pub(super) chars: usize,
    pub(super) expanded: bool,
}

fn is_han(c: char) -> bool {
    matches!(c,
        '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{F900}'..='\u{FAFF}'
        | '\u{20000}'..='\u{2A6DF}')
}

fn is_kana_or_hangul(c: char) -> bool {
    matches!(c, '\u{3040}'..='\u{30FF}' | '\u{AC00}'..='\u{D7AF}' | '\u{1100}'..='\u{11FF}')
}

/// CJK characters in `text` (the length a Chinese prompt is measured in).
pub fn cjk_chars(text: &str) -> usize {
    text.chars().filter(|&c| is_han(c)).count()
}

/// Mostly Han characters and no kana or hangul: a Chinese prompt.
pub(super) fn is_chinese(text: &str) -> bool {
    let (mut letters, mut han) = (0usize, 0usize);
    for c in text.chars().filter(|c| c.is_alphabetic()) {
        if is_kana_or_hangul(c) {
            return false;
        }
        letters += 1;
        if is_han(c) {
            han += 1;
        }
    }
    han > 0 && han * 2 >= letters
}

/// Every occurrence of `term` in `chars`, as (start, len) in characters.
fn occurrences(chars: &[char], term: &[char]) -> Vec<(usize, usize)> {
    if term.is_empty() || term.len() > chars.len() {
        return Vec::new();
    }
    (0..=chars.len() - term.len())
        .filter(|&i| chars[i..i + term.len()] == *term)
        .map(|i| (i, term.len()))
        .collect()
}

/// Owners of the terms found in `text`: longest match first, each character claimed once, in
/// prompt order. `hidden` characters (an ignore word) match nothing.
fn recognise(text: &str, terms: &[(usize, &str)], hidden: &[bool]) -> Vec<usize> {
    let chars: Vec<char> = text.chars().collect();
    let mut hits: Vec<(usize, usize, usize)> = Vec::new(); // (start, len, owner)
    for &(owner, term) in terms {
        let term: Vec<char> = term.chars().collect();
        for (start, len) in occurrences(&chars, &term) {
            if !hidden[start..start + len].iter().any(|&h| h) {
                hits.push((start, len, owner));
            }
        }
    }
    hits.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)).then(a.2.cmp(&b.2)));
    let mut taken = vec![false; chars.len()];
    let mut kept = Vec::new();
    for (start, len, owner) in hits {
        let span = &mut taken[start..start + len];
        if span.iter().any(|&t| t) {
            continue;
        }
        span.fill(true);
        kept.push((start, owner));
    }
    kept.sort();
    let mut owners = Vec::new();
    for (_, owner) in kept {
        if !owners.contains(&owner) {
            owners.push(owner);
        }
    }
    owners
}

impl ZhRules {
    pub(super) fn build(raw: RawZh) -> Self {
        let clean =
            |v: &[String]| -> Vec<String> { v.iter().map(|t| t.trim().to_owned()).collect() };
        Self {
            limits: raw.limits,
            ignore: clean(&raw.ignore),
            subjects: raw
                .subjects
                .iter()
                .map(|s| ZhSubject {
                    name: s.name.trim().to_owned(),
                    class: s.class,
                    terms: clean(&[vec![s.name.clone()], s.also.clone()].concat()),
                    details: clean(&s.details),
                })
                .collect(),
            lighting: raw
                .lighting
                .iter()
                .map(|l| ZhLighting {
                    name: l.name.trim().to_owned(),
                    triggers: clean(&l.triggers),
                    phrases: clean(&l.phrases),
                })
                .collect(),
            negative: raw
                .negative
                .into_iter()
                .map(|(class, list)| {
                    let list = list
                        .iter()
                        .map(|d| ZhDefect {
                            phrase: d.phrase.trim().to_owned(),
                            unless: clean(&d.unless),
                        })
                        .collect();
                    (class, list)
                })
                .collect(),
        }
    }

    fn hidden(&self, text: &str) -> Vec<bool> {
        let chars: Vec<char> = text.chars().collect();
        let mut hidden = vec![false; chars.len()];
        for word in &self.ignore {
            let w: Vec<char> = word.chars().collect();
            for (start, len) in occurrences(&chars, &w) {
                hidden[start..start + len].fill(true);
            }
        }
        hidden
    }

    pub(super) fn recognise_subjects(&self, text: &str) -> Vec<usize> {
        let terms: Vec<(usize, &str)> = self
            .subjects
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.terms.iter().map(move |t| (i, t.as_str())))
            .collect();
        let none = vec![false; text.chars().count()];
        recognise(text, &terms, &none)
    }

    /// Lighting entries whose triggers the prompt uses (outside the ignore words).
    pub(super) fn recognise_lighting(&self, text: &str) -> Vec<usize> {
        let terms: Vec<(usize, &str)> = self
            .lighting
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.triggers.iter().map(move |t| (i, t.as_str())))
            .collect();
        recognise(text, &terms, &self.hidden(text))
    }

    /// The rewrite of a Chinese prompt: details of at most `max_subjects` subjects (three each),
    /// the lighting of at most `max_lighting` of its own time/weather words, within the character
    /// budget; phrases the prompt already holds are not added again. `negative` is the user's
    /// negative prompt: class defects it already holds are not added.
    pub(super) fn rewrite(
        &self,
        prompt: &str,
        negative: &str,
        limits: super::rules::Limits,
    ) -> ZhRewrite {
        let subjects: Vec<usize> = self
            .recognise_subjects(prompt)
            .into_iter()
            .take(limits.max_subjects)
            .collect();
        let lights: Vec<usize> = self
            .recognise_lighting(prompt)
            .into_iter()
            .take(limits.max_lighting_entries)
            .collect();
        let chars = cjk_chars(prompt);
        let expanded = chars <= self.limits.expand_max_chars;
        let mut out = ZhRewrite {
            subjects: subjects
                .iter()
                .map(|&i| self.subjects[i].name.clone())
                .collect(),
            lighting: lights
                .iter()
                .map(|&i| self.lighting[i].name.clone())
                .collect(),
            chars,
            expanded,
            ..Default::default()
        };
        if expanded {
            // A phrase the prompt already holds still uses its place and its characters, so
            // enhancing the result again picks the very same phrases (and adds none).
            let mut budget = self.limits.max_added_chars;
            let mut consider = |phrase: &str, list: &mut Vec<String>| -> bool {
                let n = phrase.chars().count();
                if n > budget {
                    return false;
                }
                budget -= n;
                if !prompt.contains(phrase) && !list.iter().any(|p| p == phrase) {
                    list.push(phrase.to_owned());
                }
                true
            };
            // Lighting first: the user's own time word is what the image most visibly lacks.
            let mut lighting = Vec::new();
            let mut slots = limits.max_lighting_phrases;
            let per_entry = slots.div_ceil(lights.len().max(1));
            for &i in &lights {
                for p in self.lighting[i].phrases.iter().take(per_entry.min(slots)) {
                    if consider(p, &mut lighting) {
                        slots -= 1;
                    }
                }
            }
            let mut details = Vec::new();
            for &i in &subjects {
                for p in self.subjects[i]
                    .details
                    .iter()
                    .take(limits.max_details_per_subject)
                {
                    consider(p, &mut details);
                }
            }
            out.details = details;
            out.lighting_phrases = lighting;
        }
        let positive = format!("{prompt}，{}", out.details.join("，"));
        let mut classes: Vec<Class> = subjects.iter().map(|&i| self.subjects[i].class).collect();
        classes.sort();
        classes.dedup();
        for class in classes {
            for d in self.negative.get(&class).into_iter().flatten() {
                if negative.contains(&d.phrase)
                    || out.negative.contains(&d.phrase)
                    || d.unless.iter().any(|u| positive.contains(u.as_str()))
                    || out.negative.len() >= limits.max_negative_phrases
                {
                    continue;
                }
                out.negative.push(d.phrase.clone());
            }
        }
        out
    }

    /// The invariants the guarantees rest on (see the module docs).
    pub(super) fn validate(&self, problems: &mut Vec<String>) {
        for s in &self.subjects {
            if s.terms.iter().any(String::is_empty) {
                problems.push(format!("zh subject {:?} has an empty term", s.name));
            }
            if !(3..=4).contains(&s.details.len()) {
                problems.push(format!("zh subject {:?} needs 3-4 details", s.name));
            }
        }
        for l in &self.lighting {
            if l.triggers.is_empty() || l.triggers.iter().any(String::is_empty) {
                problems.push(format!("zh lighting {:?} has an empty trigger", l.name));
            }
            if !(2..=3).contains(&l.phrases.len()) {
                problems.push(format!("zh lighting {:?} needs 2-3 phrases", l.name));
            }
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for s in &self.subjects {
            for t in &s.terms {
                if let Some(other) = seen.insert(t, &s.name) {
                    problems.push(format!(
                        "zh subjects {other:?} and {:?} share the term {t:?}",
                        s.name
                    ));
                }
            }
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for l in &self.lighting {
            for t in &l.triggers {
                if let Some(other) = seen.insert(t, &l.name) {
                    problems.push(format!(
                        "zh lighting {other:?} and {:?} share the trigger {t:?}",
                        l.name
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
            if cjk_chars(p) == 0 {
                problems.push(format!("zh phrase {p:?} has no Chinese characters"));
            }
            let subjects = self.recognise_subjects(p);
            let lights = self.recognise_lighting(p);
            // A trigger hidden by an ignore word still must not appear in an added phrase: the
            // phrase would then depend on the ignore list to stay neutral.
            let raw_trigger = self
                .lighting
                .iter()
                .flat_map(|l| &l.triggers)
                .find(|t| p.contains(t.as_str()));
            if !subjects.is_empty() || !lights.is_empty() || raw_trigger.is_some() {
                let names: Vec<&str> = subjects
                    .iter()
                    .map(|&i| self.subjects[i].name.as_str())
                    .chain(lights.iter().map(|&i| self.lighting[i].name.as_str()))
                    .chain(raw_trigger.map(String::as_str))
                    .collect();
                problems.push(format!(
                    "zh phrase {p:?} contains a subject term or trigger ({})",
                    names.join(", ")
                ));
            }
        }
        for (class, list) in &self.negative {
            for d in list {
                if d.phrase.is_empty() {
                    problems.push(format!("zh negative for {class:?} has an empty phrase"));
                }
            }
        }
    }
}

/// Appends phrases with the full-width comma. Returns `base` untouched when there is nothing to
/// add.
pub(super) fn join(base: &str, added: &[String]) -> String {
    if added.is_empty() {
        return base.to_owned();
    }
    let head = base.trim().trim_end_matches(|c: char| {
        c.is_whitespace() || matches!(c, ',' | '，' | '。' | '、' | ';' | '；' | '.')
    });
    if head.is_empty() {
        added.join("，")
    } else {
        format!("{head}，{}", added.join("，"))
    }
}
