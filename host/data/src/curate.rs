//! Curation: operations that read one version and write a new one (same role, the input as
//! parent) together with a serde-serialisable report. An operation that changes nothing
//! returns the input version itself (`changed: false`): versions are content-addressed.
//!
//! - [`dedupe`]: exact duplicates after normalisation (messages and label), then optionally
//!   near duplicates by MinHash + LSH, keeping the first occurrence of each cluster.
//! - [`scan_pii`]: report, redact or drop examples with e-mails, phones, cards, IBANs, SSNs
//!   or IP addresses (see [`crate::pii`]).
//! - [`validate_outputs`]: every example's target through an [`OutputValidator`] (the host
//!   plugs the WebAssembly validator in); report or drop the failures.
//! - [`statistics`]: counts, lengths (characters and, with a [`TokenCounter`], tokens),
//!   labels, duplicates and PII hits. Reads only.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::example::Example;
use crate::pii::{self, PiiKind};
use crate::store::{Manifest, Operation, Datasets, VersionWriter};
use crate::text::{LshIndex, MinHasher, NearDupParams, estimate_jaccard, exact_key, messages_text};
use crate::util::PremixedState;

/// The result of a curation operation.
#[derive(Debug, Clone)]
pub struct Curated<R> {
    /// The new version, or the input version when nothing changed.
    pub manifest: Manifest,
    pub changed: bool,
    pub report: R,
}

fn finish<R: Serialize>(
    store: &Datasets,
    input: &Manifest,
    writer: VersionWriter,
    changed: bool,
    operation: Operation,
    report: R,
    summary: serde_json::Value,
) -> Result<Curated<R>> {
    if !changed {
        return Ok(Curated { manifest: input.clone(), changed: false, report });
    }
    let manifest = writer.seal()?.commit(store, Some(input.id.clone()), operation, input.role, summary)?;
    let changed = manifest.id != input.id;
    Ok(Curated { manifest, changed, report })
}

// ---------------------------------------------------------------------------------------
// Deduplication

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupeParams {
    /// Drop exact duplicates (after normalisation, messages and label).
    pub exact: bool,
    /// Drop near duplicates too (messages only).
    pub near: Option<NearDupParams>,
}

impl Default for DedupeParams {
    fn default() -> Self {
        DedupeParams { exact: true, near: Some(NearDupParams::default()) }
    }
}

impl DedupeParams {
    pub fn exact_only() -> Self {
        DedupeParams { exact: true, near: None }
    }

    pub fn near(threshold: f64) -> Self {
        DedupeParams { exact: true, near: Some(NearDupParams::with_threshold(threshold)) }
    }
}

/// An exact duplicate: example `dropped` repeats example `kept` (indices in the input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactDuplicate {
    pub dropped: usize,
    pub kept: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NearMember {
    pub index: usize,
    /// Estimated Jaccard similarity to the kept example.
    pub similarity: f64,
}

/// A near-duplicate cluster: the first occurrence, kept, and the later ones, dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NearCluster {
    pub kept: usize,
    pub dropped: Vec<NearMember>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupeReport {
    pub input_rows: u64,
    pub output_rows: u64,
    pub exact_dropped: u64,
    pub near_dropped: u64,
    pub exact: Vec<ExactDuplicate>,
    pub near_clusters: Vec<NearCluster>,
}

impl DedupeReport {
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "input_rows": self.input_rows,
            "output_rows": self.output_rows,
            "exact_dropped": self.exact_dropped,
            "near_dropped": self.near_dropped,
            "near_clusters": self.near_clusters.len(),
        })
    }
}

/// Finds near duplicates among examples fed in order, against the ones kept so far.
struct NearDeduper {
    params: NearDupParams,
    hasher: MinHasher,
    index: LshIndex,
    /// Signatures of the kept examples, `num_perm` each.
    sigs: Vec<u32>,
    /// Input index of each kept example.
    kept: Vec<usize>,
    sig: Vec<u32>,
    text: String,
}

impl NearDeduper {
    fn new(params: NearDupParams) -> Result<Self> {
        params.check()?;
        let (bands, rows) = params.banding();
        Ok(NearDeduper {
            params,
            hasher: MinHasher::new(&params),
            index: LshIndex::new(bands, rows),
            sigs: Vec::new(),
            kept: Vec::new(),
            sig: Vec::new(),
            text: String::new(),
        })
    }

    /// The kept example this one nearly duplicates (best similarity), or `None` after
    /// keeping it.
    fn check(&mut self, index: usize, ex: &Example) -> Option<(usize, f64)> {
        messages_text(ex, &mut self.text);
        self.hasher.signature(&self.text, &mut self.sig);
        let p = self.params.num_perm;
        let mut best: Option<(usize, f64)> = None;
        for &c in self.index.candidates(&self.sig) {
            let other = &self.sigs[c as usize * p..(c as usize + 1) * p];
            let s = estimate_jaccard(&self.sig, other);
            if s >= self.params.threshold && best.is_none_or(|(_, bs)| s > bs) {
                best = Some((self.kept[c as usize], s));
            }
        }
        if best.is_none() {
            let ord = self.kept.len() as u32;
            self.index.insert(ord, &self.sig);
            self.sigs.extend_from_slice(&self.sig);
            self.kept.push(index);
        }
        best
    }
}

/// Drops exact and (optionally) near duplicates, keeping each first occurrence.
pub fn dedupe(store: &Datasets, input: &str, params: &DedupeParams) -> Result<Curated<DedupeReport>> {
    let m = store.manifest(input)?;
    let mut near = params.near.map(NearDeduper::new).transpose()?;
    let mut seen: HashMap<u128, usize, PremixedState> = HashMap::with_hasher(PremixedState);
    let mut writer = store.writer()?;
    let mut scratch = String::new();
    let mut report = DedupeReport {
        input_rows: 0,
        output_rows: 0,
        exact_dropped: 0,
        near_dropped: 0,
        exact: Vec::new(),
        near_clusters: Vec::new(),
    };
    let mut clusters: BTreeMap<usize, Vec<NearMember>> = BTreeMap::new();
    for (i, ex) in store.examples(input)?.enumerate() {
        let ex = ex?;
        report.input_rows += 1;
        if params.exact {
            let key = exact_key(&ex, true, &mut scratch);
            if let Some(&kept) = seen.get(&key) {
                report.exact.push(ExactDuplicate { dropped: i, kept });
                report.exact_dropped += 1;
                continue;
            }
            seen.insert(key, i);
        }
        if let Some(nd) = near.as_mut()
            && let Some((kept, similarity)) = nd.check(i, &ex)
        {
            clusters.entry(kept).or_default().push(NearMember { index: i, similarity });
            report.near_dropped += 1;
            continue;
        }
        writer.push(&ex)?;
        report.output_rows += 1;
    }
    report.near_clusters = clusters.into_iter().map(|(kept, dropped)| NearCluster { kept, dropped }).collect();
    let changed = report.output_rows != report.input_rows;
    let summary = report.summary();
    finish(store, &m, writer, changed, Operation::Dedupe(params.clone()), report, summary)
}

// ---------------------------------------------------------------------------------------
// PII

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PiiMode {
    /// List the hits; the version is unchanged.
    Report,
    /// Replace each hit with its placeholder (`[EMAIL]`, `[PHONE]`, ...).
    Redact,
    /// Drop every example with a hit.
    Drop,
}

/// One hit: `field` of input example `example`, bytes `start..end` of that field's text
/// (before redaction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiiHit {
    pub example: usize,
    pub field: String,
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PiiReport {
    pub mode: PiiMode,
    pub input_rows: u64,
    pub output_rows: u64,
    pub rows_with_pii: u64,
    pub counts: BTreeMap<PiiKind, u64>,
    pub hits: Vec<PiiHit>,
}

impl PiiReport {
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode,
            "input_rows": self.input_rows,
            "output_rows": self.output_rows,
            "rows_with_pii": self.rows_with_pii,
            "counts": self.counts,
        })
    }
}

/// Scans every message of every example for PII; see [`PiiMode`].
pub fn scan_pii(store: &Datasets, input: &str, mode: PiiMode) -> Result<Curated<PiiReport>> {
    let m = store.manifest(input)?;
    let mut writer = store.writer()?;
    let mut report = PiiReport {
        mode,
        input_rows: 0,
        output_rows: 0,
        rows_with_pii: 0,
        counts: BTreeMap::new(),
        hits: Vec::new(),
    };
    for (i, ex) in store.examples(input)?.enumerate() {
        let mut ex = ex?;
        report.input_rows += 1;
        let mut any = false;
        for (k, msg) in ex.messages.iter_mut().enumerate() {
            let found = pii::scan(&msg.content);
            if found.is_empty() {
                continue;
            }
            any = true;
            for h in &found {
                *report.counts.entry(h.kind).or_default() += 1;
                report.hits.push(PiiHit {
                    example: i,
                    field: format!("messages[{k}].content"),
                    kind: h.kind,
                    start: h.start,
                    end: h.end,
                });
            }
            if mode == PiiMode::Redact {
                msg.content = pii::redact(&msg.content, &found);
            }
        }
        report.rows_with_pii += u64::from(any);
        if mode == PiiMode::Drop && any {
            continue;
        }
        if mode != PiiMode::Report {
            writer.push(&ex)?;
        }
        report.output_rows += 1;
    }
    let changed = mode != PiiMode::Report && report.rows_with_pii > 0;
    let summary = report.summary();
    finish(store, &m, writer, changed, Operation::Pii { mode }, report, summary)
}

// ---------------------------------------------------------------------------------------
// Format consistency

/// Checks one example's output (its target). The host implements it over the WebAssembly
/// validator plugin; closures work too.
pub trait OutputValidator {
    fn validate(&self, output: &str) -> std::result::Result<(), Vec<String>>;
}

impl<F: Fn(&str) -> std::result::Result<(), Vec<String>>> OutputValidator for F {
    fn validate(&self, output: &str) -> std::result::Result<(), Vec<String>> {
        self(output)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValidateMode {
    Report,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationFailure {
    pub example: usize,
    pub violations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationReport {
    pub validator: String,
    pub mode: ValidateMode,
    pub checked: u64,
    pub passed: u64,
    pub output_rows: u64,
    pub failures: Vec<ValidationFailure>,
}

/// Validates every example's target with `validator` (named `name` in the manifest).
pub fn validate_outputs<V: OutputValidator + ?Sized>(
    store: &Datasets,
    input: &str,
    validator: &V,
    name: &str,
    mode: ValidateMode,
) -> Result<Curated<ValidationReport>> {
    let m = store.manifest(input)?;
    let mut writer = store.writer()?;
    let mut report = ValidationReport {
        validator: name.to_string(),
        mode,
        checked: 0,
        passed: 0,
        output_rows: 0,
        failures: Vec::new(),
    };
    for (i, ex) in store.examples(input)?.enumerate() {
        let ex = ex?;
        report.checked += 1;
        match validator.validate(ex.target()) {
            Ok(()) => report.passed += 1,
            Err(violations) => {
                report.failures.push(ValidationFailure { example: i, violations });
                if mode == ValidateMode::Drop {
                    continue;
                }
            }
        }
        if mode == ValidateMode::Drop {
            writer.push(&ex)?;
        }
        report.output_rows += 1;
    }
    let changed = mode == ValidateMode::Drop && !report.failures.is_empty();
    let summary = serde_json::json!({
        "validator": name, "mode": mode, "checked": report.checked,
        "passed": report.passed, "output_rows": report.output_rows,
    });
    let op = Operation::Validate { validator: name.to_string(), mode };
    finish(store, &m, writer, changed, op, report, summary)
}

// ---------------------------------------------------------------------------------------
// Statistics

/// Counts tokens of a text (the engine's tokenizer, supplied by the caller).
pub trait TokenCounter {
    fn count(&self, text: &str) -> usize;
}

impl<F: Fn(&str) -> usize> TokenCounter for F {
    fn count(&self, text: &str) -> usize {
        self(text)
    }
}

/// Distribution of one quantity. Percentiles are nearest-rank.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Summary {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p95: u64,
    pub max: u64,
}

impl Summary {
    pub fn of(values: &mut [u64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        values.sort_unstable();
        let n = values.len();
        let rank = |p: f64| values[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Summary {
            min: values[0],
            mean: values.iter().sum::<u64>() as f64 / n as f64,
            p50: rank(0.5),
            p95: rank(0.95),
            max: values[n - 1],
        }
    }
}

/// Lengths of the context (every message but the target), the target and both together.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Lengths {
    pub prompt: Summary,
    pub completion: Summary,
    pub total: Summary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statistics {
    pub rows: u64,
    pub messages_per_example: Summary,
    /// In Unicode scalar values.
    pub chars: Lengths,
    /// With a token counter only.
    pub tokens: Option<Lengths>,
    pub labels: BTreeMap<String, u64>,
    pub unlabelled: u64,
    /// Examples that exactly repeat an earlier one (after normalisation).
    pub exact_duplicates: u64,
    pub rows_with_pii: u64,
    pub pii: BTreeMap<PiiKind, u64>,
    /// Whole-example lengths (prompt and target), in tokens when counted, else characters.
    #[serde(default)]
    pub length_histogram: Histogram,
}

/// Counts of values in equal-width bins: bin `i` holds values in `(upto[i-1], upto[i]]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Histogram {
    /// `tokens` or `chars`.
    pub unit: String,
    pub bins: Vec<Bin>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    pub upto: u64,
    pub count: u64,
}

impl Histogram {
    /// `bins` equal-width bins from 0 to the largest value.
    pub fn of(values: &[u64], bins: usize, unit: &str) -> Histogram {
        let max = values.iter().copied().max().unwrap_or(0).max(1);
        let width = max.div_ceil(bins.max(1) as u64).max(1);
        let n = max.div_ceil(width) as usize;
        let mut out: Vec<Bin> = (1..=n as u64).map(|i| Bin { upto: i * width, count: 0 }).collect();
        for &v in values {
            let i = (v.saturating_sub(1) / width) as usize;
            out[i.min(n - 1)].count += 1;
        }
        Histogram { unit: unit.to_string(), bins: out }
    }
}

#[derive(Default)]
struct LengthCols {
    prompt: Vec<u64>,
    completion: Vec<u64>,
    total: Vec<u64>,
}

impl LengthCols {
    fn push(&mut self, prompt: u64, completion: u64) {
        self.prompt.push(prompt);
        self.completion.push(completion);
        self.total.push(prompt + completion);
    }

    fn summarise(mut self) -> Lengths {
        Lengths {
            prompt: Summary::of(&mut self.prompt),
            completion: Summary::of(&mut self.completion),
            total: Summary::of(&mut self.total),
        }
    }
}

/// Statistics of a version; `tokens` counts tokens of one text.
pub fn statistics(store: &Datasets, input: &str, tokens: Option<&dyn TokenCounter>) -> Result<Statistics> {
    let mut messages = Vec::new();
    let mut chars = LengthCols::default();
    let mut toks = LengthCols::default();
    let mut labels: BTreeMap<String, u64> = BTreeMap::new();
    let mut unlabelled = 0;
    let mut seen: HashSet<u128, PremixedState> = HashSet::with_hasher(PremixedState);
    let mut exact_duplicates = 0;
    let mut rows_with_pii = 0;
    let mut pii_counts: BTreeMap<PiiKind, u64> = BTreeMap::new();
    let mut scratch = String::new();
    for ex in store.examples(input)? {
        let ex = ex?;
        messages.push(ex.messages.len() as u64);
        let prompt_chars: usize = ex.context().iter().map(|m| m.content.chars().count()).sum();
        chars.push(prompt_chars as u64, ex.target().chars().count() as u64);
        if let Some(tc) = tokens {
            let p: usize = ex.context().iter().map(|m| tc.count(&m.content)).sum();
            toks.push(p as u64, tc.count(ex.target()) as u64);
        }
        match &ex.label {
            Some(l) => *labels.entry(l.clone()).or_default() += 1,
            None => unlabelled += 1,
        }
        if !seen.insert(exact_key(&ex, true, &mut scratch)) {
            exact_duplicates += 1;
        }
        let mut any = false;
        for msg in &ex.messages {
            for h in pii::scan(&msg.content) {
                any = true;
                *pii_counts.entry(h.kind).or_default() += 1;
            }
        }
        rows_with_pii += u64::from(any);
    }
    let length_histogram = match tokens {
        Some(_) => Histogram::of(&toks.total, 20, "tokens"),
        None => Histogram::of(&chars.total, 20, "chars"),
    };
    Ok(Statistics {
        rows: messages.len() as u64,
        length_histogram,
        messages_per_example: Summary::of(&mut messages),
        chars: chars.summarise(),
        tokens: tokens.map(|_| toks.summarise()),
        labels,
        unlabelled,
        exact_duplicates,
        rows_with_pii,
        pii: pii_counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_cover_every_value_once() {
        let h = Histogram::of(&[0, 1, 5, 10, 11, 20], 4, "tokens");
        assert_eq!(h.bins.iter().map(|b| b.upto).collect::<Vec<_>>(), [5, 10, 15, 20]);
        assert_eq!(h.bins.iter().map(|b| b.count).collect::<Vec<_>>(), [3, 1, 1, 1]);
        assert!(Histogram::of(&[], 4, "chars").bins.iter().all(|b| b.count == 0));
    }

    #[test]
    fn summary_nearest_rank() {
        let mut v: Vec<u64> = (1..=20).rev().collect();
        let s = Summary::of(&mut v);
        assert_eq!((s.min, s.p50, s.p95, s.max), (1, 10, 19, 20));
        assert!((s.mean - 10.5).abs() < 1e-9);
        assert_eq!(Summary::of(&mut []), Summary::default());
    }
}
