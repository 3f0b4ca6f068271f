//! Words as the enhancement sees them: script and language detection, tokens with their singular
//! forms, clauses, and matching a table's terms against a prompt.

pub(super) fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

pub(super) fn has_word(text: &str) -> bool {
    text.chars().any(char::is_alphanumeric)
}

/// Words as a user counts them: whitespace- or comma-separated chunks with a letter or digit
/// ("ultra-detailed" is one word).
pub fn word_count(prompt: &str) -> usize {
    prompt
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '|'))
        .filter(|w| has_word(w))
        .count()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Script {
    Empty,
    English,
    OtherLatin,
    NonLatin,
}

pub(super) const ENGLISH_FUNCTION_WORDS: &[&str] = &[
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "by", "from", "under", "over", "near",
    "into", "through", "his", "her", "their", "is", "are", "for", "to", "as", "its", "this",
    "that", "while", "behind", "beside", "above", "below",
];

// Articles and prepositions of the most common other Latin-script languages, none of them English words.
pub(super) const FOREIGN_FUNCTION_WORDS: &[&str] = &[
    "le", "la", "les", "des", "du", "un", "une", "et", "dans", "sur", "avec", "sous", "au", "aux",
    "de", "à", "der", "die", "das", "und", "ein", "eine", "mit", "im", "auf", "dem", "den", "von",
    "zu", "bei", "el", "los", "las", "una", "y", "con", "en", "del", "al", "bajo", "sobre", "il",
    "lo", "gli", "della", "di", "che", "nel", "sotto", "um", "uma", "com", "em", "na", "nas", "os",
];

pub(super) fn classify(prompt: &str) -> Script {
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

/// A lowercase word with the singular forms it may stand for, so "lakes" matches "lake".
#[derive(Debug, Clone)]
pub(super) struct Word {
    pub(super) forms: Vec<String>,
}

pub(super) const IRREGULAR_PLURALS: &[(&str, &str)] = &[
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
    pub(super) fn new(lower: &str) -> Self {
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

    pub(super) fn text(&self) -> &str {
        self.forms.first().map(String::as_str).unwrap_or_default()
    }

    /// Either word may be the plural of the other: for comparing two pieces of user or phrase text.
    pub(super) fn matches(&self, other: &Word) -> bool {
        self.forms.iter().any(|f| other.forms.contains(f))
    }

    /// This (prompt) word is the table word or its plural. One-way on purpose: the table's "woods" must
    /// not match the prompt's "wood".
    pub(super) fn is_form_of(&self, table_word: &Word) -> bool {
        self.forms.iter().any(|f| f == table_word.text())
    }
}

/// A word of the prompt and the clause it sits in; multi-word terms never span a comma.
#[derive(Debug, Clone)]
pub(super) struct Token {
    pub(super) word: Word,
    pub(super) clause: usize,
}

/// Characters that end a clause, including the CJK full-width ones.
pub(super) const CLAUSE_BREAKS: &[char] = &[
    ',', ';', ':', '.', '!', '?', '(', ')', '[', ']', '{', '}', '|', '\n', '\r', '，', '。', '、',
    '；',
];

pub(super) fn tokenize(text: &str) -> Vec<Token> {
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

pub(super) fn phrase_words(text: &str) -> Vec<Word> {
    tokenize(text).into_iter().map(|t| t.word).collect()
}

/// The negative prompt as a list of clauses, each a word sequence, for duplicate checks.
pub(super) fn clause_words(text: &str) -> Vec<Vec<Word>> {
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

pub(super) type Term = Vec<Word>;

pub(super) fn term_at(tokens: &[Token], start: usize, term: &[Word]) -> bool {
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

pub(super) fn contains_sequence(haystack: &[Word], needle: &[Word]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w.iter().zip(needle).all(|(a, b)| a.matches(b)))
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Hit {
    pub(super) start: usize,
    pub(super) len: usize,
    pub(super) owner: usize,
}

pub(super) fn find_hits<'a>(
    tokens: &[Token],
    terms: impl Iterator<Item = (&'a Term, usize)>,
) -> Vec<Hit> {
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
pub(super) fn claim(mut hits: Vec<Hit>, taken: &mut [bool]) -> Vec<Hit> {
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

pub(super) fn distinct_owners(hits: &[Hit]) -> Vec<usize> {
    let mut owners = Vec::new();
    for hit in hits {
        if !owners.contains(&hit.owner) {
            owners.push(hit.owner);
        }
    }
    owners
}
