//! Text normalisation, exact-duplicate keys, MinHash signatures and LSH banding: the shared
//! machinery of deduplication, the split's grouping and the leakage check.
//!
//! Normalisation is Unicode-aware lower-casing, whitespace runs collapsed to one space, and
//! trimming. Near-duplicate similarity is the Jaccard similarity of shingle sets (character
//! n-grams by default), estimated by MinHash with `num_perm` seeded multiply-add-shift hash
//! functions; candidate pairs come from LSH banding and are verified by the estimate.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::example::Example;
use crate::util::{PremixedState, SplitMix64, hash_bytes, mix64};

/// Appends the normalised form of `s` to `out`: lower-cased, whitespace collapsed, trimmed.
pub fn normalize_into(s: &str, out: &mut String) {
    let mut pending_space = false;
    let start = out.len();
    for c in s.chars() {
        if c.is_whitespace() {
            pending_space = out.len() > start;
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
}

pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    normalize_into(s, &mut out);
    out
}

/// The normalised text of an example's messages (roles and contents, not label or meta),
/// separated by unit-separator characters. Used for near-duplicate shingles and leakage.
pub fn messages_text(ex: &Example, out: &mut String) {
    out.clear();
    for (i, m) in ex.messages.iter().enumerate() {
        if i > 0 {
            out.push('\u{1f}');
        }
        normalize_into(&m.content, out);
    }
}

/// A 128-bit key of the normalised messages (and, if `with_label`, the label): equal keys
/// mean exact duplicates after normalisation.
pub fn exact_key(ex: &Example, with_label: bool, scratch: &mut String) -> u128 {
    let mut h = Sha256::new();
    for m in &ex.messages {
        scratch.clear();
        normalize_into(&m.content, scratch);
        h.update([m.role as u8]);
        h.update((scratch.len() as u64).to_le_bytes());
        h.update(scratch.as_bytes());
    }
    if with_label {
        match &ex.label {
            Some(l) => {
                scratch.clear();
                normalize_into(l, scratch);
                h.update([1u8]);
                h.update(scratch.as_bytes());
            }
            None => h.update([0u8]),
        }
    }
    let d = h.finalize();
    u128::from_le_bytes(d[..16].try_into().expect("16 bytes"))
}

/// How a text is cut into the set whose Jaccard similarity is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shingles {
    /// Overlapping n-character windows (robust for short texts and typos).
    Chars(usize),
    /// Overlapping n-word windows.
    Words(usize),
}

/// Parameters of near-duplicate detection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NearDupParams {
    /// Estimated Jaccard similarity at or above which two examples are near duplicates.
    pub threshold: f64,
    pub num_perm: usize,
    pub shingles: Shingles,
    pub seed: u64,
    /// LSH bands; `None` chooses them from the threshold (see [`choose_bands`]).
    pub bands: Option<usize>,
}

impl Default for NearDupParams {
    fn default() -> Self {
        NearDupParams { threshold: 0.8, num_perm: 128, shingles: Shingles::Chars(5), seed: 0x1a7e, bands: None }
    }
}

impl NearDupParams {
    pub fn with_threshold(threshold: f64) -> Self {
        NearDupParams { threshold, ..Self::default() }
    }

    pub fn check(&self) -> crate::Result<()> {
        let bad = |name, message: String| Err(crate::DataError::InvalidParameter { name, message });
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return bad("threshold", format!("{} is not in (0, 1]", self.threshold));
        }
        if self.num_perm == 0 || self.num_perm > 1024 {
            return bad("num_perm", format!("{} is not in 1..=1024", self.num_perm));
        }
        match self.shingles {
            Shingles::Chars(0) | Shingles::Words(0) => return bad("shingles", "n must be at least 1".into()),
            _ => {}
        }
        if let Some(b) = self.bands
            && (b == 0 || !self.num_perm.is_multiple_of(b))
        {
            return bad("bands", format!("{b} does not divide num_perm {}", self.num_perm));
        }
        Ok(())
    }

    /// (bands, rows per band).
    pub fn banding(&self) -> (usize, usize) {
        match self.bands {
            Some(b) => (b, self.num_perm / b),
            None => choose_bands(self.num_perm, self.threshold),
        }
    }
}

/// Chooses (bands, rows) with bands × rows = `num_perm`: the most rows per band (fewest
/// false candidates) such that a pair with similarity `threshold + 0.05` becomes a candidate
/// with probability ≥ 0.99.
pub fn choose_bands(num_perm: usize, threshold: f64) -> (usize, usize) {
    let s = (threshold + 0.05).min(1.0);
    let mut best = (num_perm, 1);
    for rows in 1..=num_perm {
        if !num_perm.is_multiple_of(rows) {
            continue;
        }
        let bands = num_perm / rows;
        let p = 1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32);
        if p >= 0.99 {
            best = (bands, rows);
        }
    }
    best
}

/// Computes MinHash signatures.
pub struct MinHasher {
    a: Vec<u64>,
    b: Vec<u64>,
    shingles: Shingles,
    hashes: Vec<u64>,
}

impl MinHasher {
    pub fn new(params: &NearDupParams) -> Self {
        let mut rng = SplitMix64::new(params.seed);
        let a = (0..params.num_perm).map(|_| rng.next_u64() | 1).collect();
        let b = (0..params.num_perm).map(|_| rng.next_u64()).collect();
        MinHasher { a, b, shingles: params.shingles, hashes: Vec::new() }
    }

    pub fn num_perm(&self) -> usize {
        self.a.len()
    }

    /// Writes the signature of `text` (already normalised) into `sig` (cleared first).
    pub fn signature(&mut self, text: &str, sig: &mut Vec<u32>) {
        shingle_hashes(text, self.shingles, &mut self.hashes);
        sig.clear();
        sig.resize(self.a.len(), u32::MAX);
        for &x in &self.hashes {
            // Multiply-add-shift: a strongly universal family for 32-bit keys.
            let x = x >> 32;
            for ((s, &a), &b) in sig.iter_mut().zip(&self.a).zip(&self.b) {
                let h = (a.wrapping_mul(x).wrapping_add(b) >> 32) as u32;
                if h < *s {
                    *s = h;
                }
            }
        }
    }
}

/// The distinct 64-bit hashes of the shingles of `text`.
pub fn shingle_hashes(text: &str, shingles: Shingles, out: &mut Vec<u64>) {
    out.clear();
    match shingles {
        Shingles::Chars(n) => {
            let mut starts = std::collections::VecDeque::with_capacity(n + 1);
            for (i, _) in text.char_indices() {
                starts.push_back(i);
                if starts.len() > n {
                    let s = starts.pop_front().expect("non-empty");
                    out.push(hash_bytes(&text.as_bytes()[s..i]));
                }
            }
            if starts.len() == n || out.is_empty() {
                // The last full window, or the whole text when it is shorter than n.
                let s = starts.front().copied().unwrap_or(0);
                out.push(hash_bytes(&text.as_bytes()[s..]));
            }
        }
        Shingles::Words(n) => {
            let words: Vec<&str> = text.split_whitespace().collect();
            if words.len() <= n {
                out.push(hash_bytes(text.as_bytes()));
            } else {
                for w in words.windows(n) {
                    let mut h = 0u64;
                    for word in w {
                        h = mix64(h ^ hash_bytes(word.as_bytes()));
                    }
                    out.push(h);
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
}

/// Exact Jaccard similarity of two texts' shingle sets (for tests and small inputs).
pub fn jaccard(a: &str, b: &str, shingles: Shingles) -> f64 {
    let (mut ha, mut hb) = (Vec::new(), Vec::new());
    shingle_hashes(a, shingles, &mut ha);
    shingle_hashes(b, shingles, &mut hb);
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < ha.len() && j < hb.len() {
        match ha[i].cmp(&hb[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = ha.len() + hb.len() - inter;
    if union == 0 { 1.0 } else { inter as f64 / union as f64 }
}

/// The fraction of equal positions of two signatures: an unbiased estimate of Jaccard.
pub fn estimate_jaccard(a: &[u32], b: &[u32]) -> f64 {
    let eq = a.iter().zip(b).filter(|(x, y)| x == y).count();
    eq as f64 / a.len().max(1) as f64
}

/// An LSH index over signatures: each band of `rows` values is hashed into a bucket;
/// signatures sharing a bucket in any band are candidates. Buckets are linked lists in one
/// vector, so the index costs about 24 bytes per (item, band).
pub struct LshIndex {
    bands: usize,
    rows: usize,
    heads: HashMap<u64, u32, PremixedState>,
    /// (item, next entry) where next is `u32::MAX` at the end of a bucket.
    entries: Vec<(u32, u32)>,
    scratch: Vec<u32>,
}

impl LshIndex {
    pub fn new(bands: usize, rows: usize) -> Self {
        LshIndex { bands, rows, heads: HashMap::with_hasher(PremixedState), entries: Vec::new(), scratch: Vec::new() }
    }

    fn band_key(&self, band: usize, sig: &[u32]) -> u64 {
        let mut h = mix64(band as u64 ^ 0x5bd1_e995);
        for &v in &sig[band * self.rows..(band + 1) * self.rows] {
            h = mix64(h ^ v as u64);
        }
        h
    }

    pub fn insert(&mut self, item: u32, sig: &[u32]) {
        for band in 0..self.bands {
            let key = self.band_key(band, sig);
            let idx = self.entries.len() as u32;
            let next = self.heads.insert(key, idx).unwrap_or(u32::MAX);
            self.entries.push((item, next));
        }
    }

    /// The distinct items sharing at least one band with `sig`, in ascending order.
    pub fn candidates(&mut self, sig: &[u32]) -> &[u32] {
        let mut found = std::mem::take(&mut self.scratch);
        found.clear();
        for band in 0..self.bands {
            let key = self.band_key(band, sig);
            let mut at = self.heads.get(&key).copied().unwrap_or(u32::MAX);
            while at != u32::MAX {
                let (item, next) = self.entries[at as usize];
                found.push(item);
                at = next;
            }
        }
        found.sort_unstable();
        found.dedup();
        self.scratch = found;
        &self.scratch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_is_unicode_aware() {
        assert_eq!(normalize("  Hello\t\tWORLD \n ÉTÉ  "), "hello world été");
        assert_eq!(normalize("İ"), "i\u{307}");
        assert_eq!(normalize(""), "");
    }

    #[test]
    fn bands_for_default_threshold() {
        assert_eq!(choose_bands(128, 0.8), (16, 8));
        let (b, r) = choose_bands(128, 0.5);
        assert_eq!(b * r, 128);
        assert!(r < 8);
    }

    #[test]
    fn minhash_estimates_jaccard() {
        let params = NearDupParams { num_perm: 256, ..NearDupParams::default() };
        let mut mh = MinHasher::new(&params);
        let a = "the quick brown fox jumps over the lazy dog and then runs far away into the forest";
        let b = "the quick brown fox jumped over the lazy dog and then ran far away into the forest";
        let exact = jaccard(a, b, params.shingles);
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        mh.signature(a, &mut sa);
        mh.signature(b, &mut sb);
        let est = estimate_jaccard(&sa, &sb);
        assert!((est - exact).abs() < 0.1, "estimate {est} vs exact {exact}");
        mh.signature(a, &mut sb);
        assert_eq!(estimate_jaccard(&sa, &sb), 1.0);
        mh.signature("completely unrelated sentence about tax law", &mut sb);
        assert!(estimate_jaccard(&sa, &sb) < 0.1);
    }

    #[test]
    fn short_texts_have_one_shingle() {
        let mut h = Vec::new();
        shingle_hashes("abc", Shingles::Chars(5), &mut h);
        assert_eq!(h.len(), 1);
        shingle_hashes("abcdef", Shingles::Chars(5), &mut h);
        assert_eq!(h.len(), 2);
        shingle_hashes("abcde", Shingles::Chars(5), &mut h);
        assert_eq!(h.len(), 1);
    }
}
