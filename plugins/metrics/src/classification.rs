//! Classification: per-example accuracy, and micro/macro F1 over a set.

use std::collections::BTreeMap;

/// Labels compare trimmed and case-insensitively.
pub fn normalize_label(s: &str) -> String {
    s.trim().to_lowercase()
}

pub fn accuracy(prediction: &str, reference: &str) -> f64 {
    if normalize_label(prediction) == normalize_label(reference) { 1.0 } else { 0.0 }
}

/// Corpus-level metrics of a set of (prediction, reference) labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub accuracy: f64,
    /// Over all classes' pooled counts. For single-label classification it equals accuracy.
    pub micro_f1: f64,
    /// The unweighted mean of each reference class's F1 (classes only predicted, never
    /// referenced, count too, with F1 0).
    pub macro_f1: f64,
    pub per_class_f1: BTreeMap<String, f64>,
}

pub fn report<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Report {
    #[derive(Default)]
    struct Counts {
        tp: u64,
        fp: u64,
        fn_: u64,
    }
    let mut classes: BTreeMap<String, Counts> = BTreeMap::new();
    let (mut n, mut correct) = (0u64, 0u64);
    for (p, r) in pairs {
        let (p, r) = (normalize_label(p), normalize_label(r));
        n += 1;
        if p == r {
            correct += 1;
            classes.entry(r).or_default().tp += 1;
        } else {
            classes.entry(p).or_default().fp += 1;
            classes.entry(r).or_default().fn_ += 1;
        }
    }
    let f1 = |tp: u64, fp: u64, fn_: u64| {
        if tp == 0 { 0.0 } else { 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64 }
    };
    let per_class_f1: BTreeMap<String, f64> =
        classes.iter().map(|(k, c)| (k.clone(), f1(c.tp, c.fp, c.fn_))).collect();
    let (tp, fp, fn_) = classes
        .values()
        .fold((0, 0, 0), |(a, b, c), k| (a + k.tp, b + k.fp, c + k.fn_));
    Report {
        accuracy: if n == 0 { 0.0 } else { correct as f64 / n as f64 },
        micro_f1: f1(tp, fp, fn_),
        macro_f1: if per_class_f1.is_empty() {
            0.0
        } else {
            per_class_f1.values().sum::<f64>() / per_class_f1.len() as f64
        },
        per_class_f1,
    }
}

/// What a prediction outside every reference class counts as in [`confusion`].
pub const OTHER: &str = "(other)";

/// The confusion matrix of a set: (reference class, predicted class) → count, labels
/// normalised; a prediction that is no reference class counts as [`OTHER`], so the matrix
/// stays square plus one column however a model rambles.
pub fn confusion<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)> + Clone) -> BTreeMap<(String, String), u64> {
    let classes: std::collections::BTreeSet<String> = pairs.clone().into_iter().map(|(_, r)| normalize_label(r)).collect();
    let mut out = BTreeMap::new();
    for (p, r) in pairs {
        let p = normalize_label(p);
        let p = if classes.contains(&p) { p } else { OTHER.to_string() };
        *out.entry((normalize_label(r), p)).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_confusion_matrix_counts_pairs_and_buckets_unknown_predictions() {
        let pairs = [("cat", "cat"), ("Cat ", "cat"), ("dog", "cat"), ("a long answer", "dog")];
        let m = confusion(pairs);
        assert_eq!(m[&("cat".to_string(), "cat".to_string())], 2);
        assert_eq!(m[&("cat".to_string(), "dog".to_string())], 1);
        assert_eq!(m[&("dog".to_string(), OTHER.to_string())], 1);
        assert_eq!(m.values().sum::<u64>(), 4);
    }

    #[test]
    fn micro_and_macro_f1_on_a_known_confusion() {
        // cat: tp 2, fn 1 (one predicted dog); dog: tp 1, fp 1; bird: fn 1 (predicted cat), cat fp 1.
        let pairs = [("cat", "cat"), ("Cat ", "cat"), ("dog", "cat"), ("dog", "dog"), ("cat", "bird")];
        let r = report(pairs);
        assert_eq!(r.accuracy, 0.6);
        assert!((r.micro_f1 - 0.6).abs() < 1e-12);
        // cat: 2·2/(4+1+1) = 2/3; dog: 2/(2+1+0) = 2/3; bird: 0.
        assert!((r.per_class_f1["cat"] - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.per_class_f1["dog"] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.per_class_f1["bird"], 0.0);
        assert!((r.macro_f1 - 4.0 / 9.0).abs() < 1e-12);
        assert_eq!(accuracy(" Positive", "positive"), 1.0);
        assert_eq!(report([]).macro_f1, 0.0);
    }
}
