//! Text metrics: exact match with normalisation, SQuAD-style token F1, ROUGE-L.

use std::collections::HashMap;

/// How strings are normalised before exact match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Normalize {
    /// Ignore leading and trailing whitespace.
    pub trim: bool,
    /// Compare case-insensitively (Unicode lowercase).
    pub ignore_case: bool,
    /// Treat every run of whitespace as one space.
    pub collapse_whitespace: bool,
    /// Drop punctuation (Unicode `is_ascii_punctuation` and general punctuation).
    pub ignore_punctuation: bool,
}

impl Normalize {
    fn is_plain(&self) -> bool {
        !(self.trim || self.ignore_case || self.collapse_whitespace || self.ignore_punctuation)
    }

    pub fn apply(&self, s: &str) -> String {
        let s = if self.trim { s.trim() } else { s };
        let mut out = String::with_capacity(s.len());
        let mut last_space = false;
        for c in s.chars() {
            if self.ignore_punctuation && is_punct(c) {
                continue;
            }
            if self.collapse_whitespace && c.is_whitespace() {
                if !last_space {
                    out.push(' ');
                }
                last_space = true;
                continue;
            }
            last_space = false;
            if self.ignore_case {
                out.extend(c.to_lowercase());
            } else {
                out.push(c);
            }
        }
        if self.trim && self.collapse_whitespace {
            out.truncate(out.trim_end().len());
        }
        out
    }
}

fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation() || matches!(c, '\u{2000}'..='\u{206F}' | '\u{3000}'..='\u{303F}' | '¡' | '¿' | '«' | '»')
}

/// 1.0 when the normalised strings are equal, else 0.0.
pub fn exact_match(prediction: &str, reference: &str, norm: &Normalize) -> f64 {
    let equal = if norm.is_plain() {
        prediction == reference
    } else if *norm == (Normalize { trim: true, ..Default::default() }) {
        prediction.trim() == reference.trim()
    } else {
        norm.apply(prediction) == norm.apply(reference)
    };
    if equal { 1.0 } else { 0.0 }
}

/// SQuAD's answer normalisation: lowercase, drop punctuation and the articles a/an/the,
/// split on whitespace.
pub fn squad_tokens(s: &str) -> Vec<String> {
    let lowered: String = s
        .chars()
        .filter(|c| !is_punct(*c))
        .flat_map(char::to_lowercase)
        .collect();
    lowered
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(String::from)
        .collect()
}

/// Harmonic mean of token precision and recall over the multiset of shared tokens. Two
/// empty answers agree (1.0); one empty answer scores 0.
pub fn token_f1(prediction: &str, reference: &str) -> f64 {
    let (p, r) = (squad_tokens(prediction), squad_tokens(reference));
    if p.is_empty() || r.is_empty() {
        return if p.is_empty() && r.is_empty() { 1.0 } else { 0.0 };
    }
    let mut counts: HashMap<&str, i32> = HashMap::with_capacity(r.len());
    for t in &r {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0;
    for t in &p {
        if let Some(c) = counts.get_mut(t.as_str())
            && *c > 0
        {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// ROUGE-L F-measure (β = 1) on lowercased whitespace tokens: the longest common
/// subsequence against both lengths.
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let p: Vec<String> = prediction.split_whitespace().map(str::to_lowercase).collect();
    let r: Vec<String> = reference.split_whitespace().map(str::to_lowercase).collect();
    if p.is_empty() || r.is_empty() {
        return if p.is_empty() && r.is_empty() { 1.0 } else { 0.0 };
    }
    // One row of the LCS table at a time.
    let mut prev = vec![0u32; r.len() + 1];
    let mut cur = vec![0u32; r.len() + 1];
    for a in &p {
        for (j, b) in r.iter().enumerate() {
            cur[j + 1] = if a == b { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let lcs = prev[r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (lcs / p.len() as f64, lcs / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_normalises_as_configured() {
        let all = Normalize { trim: true, ignore_case: true, collapse_whitespace: true, ignore_punctuation: true };
        assert_eq!(exact_match("Paris", "Paris", &Normalize::default()), 1.0);
        assert_eq!(exact_match("Paris ", "Paris", &Normalize::default()), 0.0);
        assert_eq!(exact_match("  paris.  ", "PARIS", &all), 1.0);
        assert_eq!(exact_match("São  Paulo!", "são paulo", &all), 1.0);
        assert_eq!(exact_match("ÉCOLE", "école", &Normalize { ignore_case: true, ..Default::default() }), 1.0);
        assert_eq!(exact_match("", "", &all), 1.0);
        assert_eq!(exact_match("", "x", &all), 0.0);
        assert_eq!(exact_match(" a ", "a", &Normalize { trim: true, ..Default::default() }), 1.0);
    }

    #[test]
    fn token_f1_follows_squad() {
        assert_eq!(token_f1("The Eiffel Tower", "eiffel tower"), 1.0);
        // 1 shared of 2 predicted and 3 reference tokens: P 0.5, R 1/3, F1 0.4.
        assert!((token_f1("red apple", "green apple pie") - 0.4).abs() < 1e-12);
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("x", ""), 0.0);
        assert_eq!(token_f1("a an the", "the"), 1.0); // both normalise to nothing
        assert_eq!(token_f1("日本 東京", "東京"), 2.0 * 0.5 * 1.0 / 1.5);
        // Repeated tokens count as a multiset.
        assert!((token_f1("go go go", "go") - 0.5).abs() < 1e-12);
    }

    #[test]
    fn rouge_l_uses_the_longest_common_subsequence() {
        // LCS("police killed the gunman", "police kill the gunman") = 3 of 4 and 4.
        assert!((rouge_l("police killed the gunman", "police kill the gunman") - 0.75).abs() < 1e-12);
        assert_eq!(rouge_l("a b c", "c b a"), 1.0 / 3.0);
        assert_eq!(rouge_l("", ""), 1.0);
        assert_eq!(rouge_l("", "a"), 0.0);
        assert_eq!(rouge_l("Ünïcode wörds", "ünïcode WÖRDS"), 1.0);
    }
}
