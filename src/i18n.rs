//! Texts the server makes in more than one language. A notice, an advice item, a field error or a
//! profile band keeps its English text where it always was (`message`, `hint`, `advice`: APIs and
//! clients rely on it) and carries its other languages beside it as `i18n: {"zh-CN": …}`; the page
//! shows the one for its language and falls back to English. Imports nothing from the crate.

use serde::{Deserialize, Serialize};

/// The page's language tag for Simplified Chinese (the key under `i18n`).
pub const ZH_CN: &str = "zh-CN";

/// A server text's translations (English is the text beside it). Empty = English only, e.g. a
/// journaled notice written before translations existed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translations {
    #[serde(rename = "zh-CN", default, skip_serializing_if = "String::is_empty")]
    pub zh_cn: String,
}

impl Translations {
    pub fn zh(text: impl Into<String>) -> Self {
        Self { zh_cn: text.into() }
    }

    pub fn is_empty(&self) -> bool {
        self.zh_cn.is_empty()
    }
}

/// Whether `s` holds a CJK ideograph (what the tests ask of every Chinese text).
pub fn has_cjk(s: &str) -> bool {
    s.chars()
        .any(|c| matches!(c, '\u{3400}'..='\u{4dbf}' | '\u{4e00}'..='\u{9fff}' | '\u{f900}'..='\u{faff}'))
}

/// The numbers a text states, in order (`"CFG 3.2 → 2.4 at step 3"` → `["3.2", "2.4", "3"]`): a
/// translation must state the same ones, so the tests compare them.
pub fn numbers(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() || (c == '.' && !cur.is_empty()) {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(cur.trim_end_matches('.').to_owned());
            cur.clear();
        }
    }
    if !cur.is_empty() {
        out.push(cur.trim_end_matches('.').to_owned());
    }
    out
}

/// The distinct [`numbers`], sorted: word order differs between the languages, and a translation
/// may state a figure once where the English repeats it.
pub fn number_set(s: &str) -> Vec<String> {
    let mut v = numbers(s);
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_in_order() {
        assert_eq!(numbers("CFG 3.2 → 2.4 at step 3."), ["3.2", "2.4", "3"]);
        assert_eq!(numbers("约 15–30 个字"), ["15", "30"]);
        assert!(has_cjk("步数") && !has_cjk("steps"));
        assert_eq!(number_set("8–12 words (8–12, 2.4)"), ["12", "2.4", "8"]);
    }

    #[test]
    fn empty_translations_are_not_sent() {
        let v = serde_json::to_value(Translations::default()).unwrap();
        assert_eq!(v, serde_json::json!({}));
        let v = serde_json::to_value(Translations::zh("步数")).unwrap();
        assert_eq!(v, serde_json::json!({"zh-CN": "步数"}));
    }
}
