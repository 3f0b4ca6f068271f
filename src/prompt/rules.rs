//! The compiled-in table (`rules.toml`): subjects with their natural details, lighting from time
//! and weather words, concrete defects for the negative prompt, and the limits on what is added.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use serde::Deserialize;

use super::text::{
    claim, contains_sequence, distinct_owners, find_hits, phrase_words, term_at, tokenize,
    word_count, Term, Token, Word,
};

pub(super) const RULES_TOML: &str = include_str!("rules.toml");

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    pub(super) max_subjects: usize,
    pub(super) max_details_per_subject: usize,
    pub(super) max_lighting_entries: usize,
    pub(super) max_lighting_phrases: usize,
    pub(super) max_added_words: usize,
    pub(super) expand_max_words: usize,
    pub(super) max_negative_phrases: usize,
}

/// Which defect list a subject brings into the negative prompt. Declaration order is priority order:
/// anatomy defects matter most, so they are kept first when the negative list is capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Class {
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
pub(super) enum Category {
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
    pub(super) fn default_class(self) -> Class {
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
pub(super) struct RawRules {
    pub(super) limits: Limits,
    #[serde(default)]
    pub(super) ignore: Vec<String>,
    pub(super) subjects: RawSubjects,
    pub(super) lighting: Vec<RawLighting>,
    pub(super) negative: RawNegative,
    /// Chinese prompts (see `zh.rs`).
    #[serde(default)]
    pub(super) zh: Option<super::zh::RawZh>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubjects {
    #[serde(default)]
    pub(super) landscape: Vec<RawSubject>,
    #[serde(default)]
    pub(super) city: Vec<RawSubject>,
    #[serde(default)]
    pub(super) interior: Vec<RawSubject>,
    #[serde(default)]
    pub(super) people: Vec<RawSubject>,
    #[serde(default)]
    pub(super) animal: Vec<RawSubject>,
    #[serde(default)]
    pub(super) food: Vec<RawSubject>,
    #[serde(default)]
    pub(super) vehicle: Vec<RawSubject>,
    #[serde(default)]
    pub(super) object: Vec<RawSubject>,
    #[serde(default)]
    pub(super) fantasy: Vec<RawSubject>,
    #[serde(default)]
    pub(super) scifi: Vec<RawSubject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubject {
    pub(super) name: String,
    #[serde(default)]
    pub(super) also: Vec<String>,
    pub(super) details: Vec<String>,
    #[serde(default)]
    pub(super) class: Option<Class>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLighting {
    pub(super) name: String,
    pub(super) triggers: Vec<String>,
    pub(super) phrases: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNegative {
    pub(super) general: Vec<RawDefect>,
    #[serde(default)]
    pub(super) class: BTreeMap<Class, Vec<RawDefect>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefect {
    pub(super) phrase: String,
    #[serde(default)]
    pub(super) unless: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum RulesError {
    #[error("prompt rules are not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("prompt rules: {0}")]
    Invalid(String),
}

/// A phrase the enhancement may add. `key` holds the words that, already present, mean the prompt says
/// this (the head noun, plus its modifier when the head alone is too general, as in "skin texture").
#[derive(Debug)]
pub(super) struct Phrase {
    pub(super) text: String,
    pub(super) words: Vec<Word>,
    pub(super) key: Vec<Word>,
    pub(super) n_words: usize,
}

pub(super) const KEY_SKIP: &[&str] = &[
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "to", "from", "by", "for",
    "over", "under", "into", "onto", "through", "its", "their", "as", "off", "overhead", "above",
    "below", "beneath", "behind", "around", "nearby", "outside", "inside", "up", "down", "out",
    "away",
];

pub(super) const GENERIC_HEADS: &[&str] = &[
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
    pub(super) fn new(text: &str) -> Self {
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
pub(super) struct Subject {
    pub(super) name: String,
    pub(super) class: Class,
    pub(super) terms: Vec<Term>,
    pub(super) details: Vec<Phrase>,
}

#[derive(Debug)]
pub(super) struct Lighting {
    pub(super) name: String,
    pub(super) triggers: Vec<Term>,
    pub(super) phrases: Vec<Phrase>,
}

/// A defect for the negative prompt. Skipped when the positive prompt uses one of its describing words
/// (`modifiers`: "blurry background" wants blur) or an `unless` term (fog is low-contrast on purpose).
#[derive(Debug)]
pub(super) struct Defect {
    pub(super) text: String,
    pub(super) words: Vec<Word>,
    pub(super) modifiers: Vec<Word>,
    pub(super) unless: Vec<Term>,
}

impl Defect {
    pub(super) fn new(raw: &RawDefect) -> Self {
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

    pub(super) fn conflicts_with(&self, positive: &[Token]) -> bool {
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
pub(super) struct Rules {
    pub(super) limits: Limits,
    pub(super) ignore: Vec<Term>,
    pub(super) subjects: Vec<Subject>,
    pub(super) lighting: Vec<Lighting>,
    pub(super) general_defects: Vec<Defect>,
    pub(super) class_defects: BTreeMap<Class, Vec<Defect>>,
    pub(super) zh: super::zh::ZhRules,
}

/// The compiled-in table, parsed once. A malformed table is a build defect caught by the unit tests;
/// should one ever ship, prompts still generate: the error is logged and enhancement degrades to the
/// default negative prompt and advice instead of panicking a server thread.
pub(super) fn rules() -> &'static Rules {
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
    pub(super) fn parse(text: &str) -> Result<Self, RulesError> {
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
            zh: raw.zh.map(super::zh::ZhRules::build).unwrap_or_default(),
        };
        rules.validate()?;
        Ok(rules)
    }

    /// The invariants the enhancement's guarantees rest on (see the table's header).
    pub(super) fn validate(&self) -> Result<(), RulesError> {
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
        self.zh.validate(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RulesError::Invalid(problems.join("; ")))
        }
    }

    pub(super) fn recognise_subjects(&self, tokens: &[Token]) -> Vec<usize> {
        let terms = self
            .subjects
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.terms.iter().map(move |t| (t, i)));
        let mut taken = vec![false; tokens.len()];
        // Subjects are then taken in prompt order: people name the main subject first.
        distinct_owners(&claim(find_hits(tokens, terms), &mut taken))
    }

    pub(super) fn recognise_lighting(&self, tokens: &[Token]) -> Vec<usize> {
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

    pub(super) fn names(&self, subjects: &[usize], lights: &[usize]) -> (Vec<String>, Vec<String>) {
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
    pub(super) fn expand(
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
    pub(super) fn purify(
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

pub(super) fn term_text(term: &Term) -> String {
    term.iter().map(Word::text).collect::<Vec<_>>().join(" ")
}

/// Word budget and duplicate check shared by all phrase groups of one expansion.
pub(super) struct Budget {
    pub(super) seen: Vec<Word>,
    pub(super) used_words: usize,
    pub(super) max_words: usize,
}

impl Budget {
    /// Adds phrases of one group, at most `cap` of them. A phrase the prompt already has counts towards
    /// the cap and the word budget exactly as if it had been added: that makes enhancement idempotent,
    /// because a second pass sees every count at least as high as the first and so adds nothing.
    pub(super) fn group<'r>(
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
