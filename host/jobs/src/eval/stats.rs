//! The statistics behind "is it better": bootstrap confidence intervals of a mean, and
//! paired comparisons of two runs over the same items (paired bootstrap of the mean
//! difference, and a sign-flip permutation test).
//!
//! Every resampling is seeded, so a report recomputed from the same scores gives the same
//! numbers.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A mean with its percentile-bootstrap confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub mean: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub n: usize,
}

pub const DEFAULT_RESAMPLES: usize = 2000;

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// The `q`-quantile of sorted values (linear interpolation).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The mean of `values` with a 95 % percentile-bootstrap interval.
pub fn bootstrap_mean(values: &[f64], resamples: usize, seed: u64) -> Estimate {
    let n = values.len();
    let m = mean(values);
    if n < 2 {
        return Estimate { mean: m, ci_low: m, ci_high: m, n };
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    Estimate { mean: m, ci_low: quantile(&means, 0.025), ci_high: quantile(&means, 0.975), n }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Better,
    NoDifference,
    Worse,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Better => "better",
            Self::NoDifference => "no difference",
            Self::Worse => "worse",
        }
    }
}

/// Candidate minus baseline on the same items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Mean of (candidate − baseline) with its paired-bootstrap 95 % interval.
    pub difference: Estimate,
    /// Two-sided sign-flip permutation p-value of the mean difference.
    pub p_value: f64,
    /// The smallest difference that counts as a change.
    pub margin: f64,
    pub verdict: Verdict,
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
}

/// Compares paired scores: "better" when the whole 95 % interval of the mean difference
/// lies above `margin`, "worse" when it lies below `-margin`, else "no difference".
pub fn compare_paired(baseline: &[f64], candidate: &[f64], margin: f64, resamples: usize, seed: u64) -> Comparison {
    assert_eq!(baseline.len(), candidate.len(), "paired scores need the same items");
    let diffs: Vec<f64> = candidate.iter().zip(baseline).map(|(c, b)| c - b).collect();
    let difference = bootstrap_mean(&diffs, resamples, seed);
    let observed = mean(&diffs).abs();
    // Sign-flip permutation: under "no difference" each paired difference is as likely to
    // have the other sign.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_f11b);
    let mut extreme = 0usize;
    for _ in 0..resamples {
        let s: f64 = diffs.iter().map(|&d| if rng.random::<bool>() { d } else { -d }).sum();
        if (s / diffs.len().max(1) as f64).abs() >= observed - 1e-12 {
            extreme += 1;
        }
    }
    let p_value = (extreme + 1) as f64 / (resamples + 1) as f64;
    let verdict = if difference.ci_low > margin {
        Verdict::Better
    } else if difference.ci_high < -margin {
        Verdict::Worse
    } else {
        Verdict::NoDifference
    };
    let eps = 1e-12;
    Comparison {
        difference,
        p_value,
        margin,
        verdict,
        wins: diffs.iter().filter(|&&d| d > eps).count(),
        losses: diffs.iter().filter(|&&d| d < -eps).count(),
        ties: diffs.iter().filter(|&&d| d.abs() <= eps).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores in [0, 1] from a seeded generator: `p` of them are 1.
    fn bernoulli(n: usize, p: f64, seed: u64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| if rng.random::<f64>() < p { 1.0 } else { 0.0 }).collect()
    }

    #[test]
    fn the_interval_covers_the_true_mean_about_95_percent_of_the_time() {
        let mut covered = 0;
        for trial in 0..200 {
            let v = bernoulli(200, 0.6, trial);
            let e = bootstrap_mean(&v, 500, trial + 1000);
            if e.ci_low <= 0.6 && 0.6 <= e.ci_high {
                covered += 1;
            }
        }
        assert!((180..=198).contains(&covered), "coverage {covered}/200");
    }

    #[test]
    fn a_real_difference_is_better_and_none_is_no_difference() {
        // Candidate right on 80 % of items, baseline on 50 %: clearly better.
        let base = bernoulli(300, 0.5, 1);
        let cand = bernoulli(300, 0.8, 2);
        let c = compare_paired(&base, &cand, 0.0, DEFAULT_RESAMPLES, 7);
        assert_eq!(c.verdict, Verdict::Better, "{c:?}");
        assert!(c.p_value < 0.001);
        assert!((c.difference.mean - (cand.iter().sum::<f64>() - base.iter().sum::<f64>()) / 300.0).abs() < 1e-12);
        // Swapped, it is worse.
        assert_eq!(compare_paired(&cand, &base, 0.0, DEFAULT_RESAMPLES, 7).verdict, Verdict::Worse);

        // Two draws from the same distribution: no difference in (almost) every trial.
        let mut false_alarms = 0;
        for t in 0..40 {
            let a = bernoulli(200, 0.6, 100 + t);
            let b = bernoulli(200, 0.6, 200 + t);
            let c = compare_paired(&a, &b, 0.0, 1000, t);
            if c.verdict != Verdict::NoDifference {
                false_alarms += 1;
            }
            assert!(c.p_value > 0.0 && c.p_value <= 1.0);
        }
        assert!(false_alarms <= 5, "{false_alarms} of 40 equal pairs called different");
    }

    #[test]
    fn a_margin_turns_a_small_gain_into_no_difference() {
        let base: Vec<f64> = (0..400).map(|i| (i % 10) as f64 / 10.0).collect();
        let cand: Vec<f64> = base.iter().map(|b| b + 0.02).collect();
        assert_eq!(compare_paired(&base, &cand, 0.0, 1000, 1).verdict, Verdict::Better);
        assert_eq!(compare_paired(&base, &cand, 0.05, 1000, 1).verdict, Verdict::NoDifference);
        let c = compare_paired(&base, &cand, 0.0, 1000, 1);
        assert_eq!((c.wins, c.losses, c.ties), (400, 0, 0));
    }

    #[test]
    fn resampling_is_reproducible() {
        let v = bernoulli(50, 0.3, 9);
        assert_eq!(bootstrap_mean(&v, 300, 4), bootstrap_mean(&v, 300, 4));
    }
}
