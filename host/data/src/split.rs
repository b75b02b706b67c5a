//! The held-out split and the train/held-out leakage check.
//!
//! [`split`] is deterministic and independent of row order: examples are first grouped so
//! that exact duplicates (normalised messages) and near duplicates (MinHash, the same
//! parameters as dedupe) fall into one group, and each group lands wholly on one side, so
//! the split itself cannot leak. Groups are ordered by a seeded hash of their content, and
//! within each label stratum (when labels exist and stratification is on) groups are taken
//! into the held-out side in that order until it holds about `heldout_fraction` of the
//! stratum, at least one example for any stratum of two or more examples that can be split.
//! The result is two versions, roles `train` and `heldout`, each naming the input as parent
//! and the other side in its operation.
//!
//! [`check_leakage`] compares any training set with any held-out set (also across versions,
//! e.g. a new training set against an older held-out set) and lists exact and near pairs.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::store::{DatasetRole, HeldOut, Manifest, Operation, Datasets, TrainingSet};
use crate::text::{LshIndex, MinHasher, NearDupParams, estimate_jaccard, exact_key, messages_text};
use crate::util::{PremixedState, mix64};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitParams {
    /// The share of examples held out, in (0, 1); default 0.15.
    pub heldout_fraction: f64,
    pub seed: u64,
    /// Stratify by label when any example has one.
    pub stratify: bool,
    /// Keep near duplicates on one side; `None` groups exact duplicates only.
    pub near: Option<NearDupParams>,
}

impl Default for SplitParams {
    fn default() -> Self {
        SplitParams { heldout_fraction: 0.15, seed: 0, stratify: true, near: Some(NearDupParams::default()) }
    }
}

impl SplitParams {
    pub fn with_seed(seed: u64) -> Self {
        SplitParams { seed, ..Self::default() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SideCounts {
    pub train: u64,
    pub heldout: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitReport {
    pub input_rows: u64,
    pub train_rows: u64,
    pub heldout_rows: u64,
    pub stratified: bool,
    /// Per label (the empty string for unlabelled examples), when stratified.
    pub labels: BTreeMap<String, SideCounts>,
    /// Groups of duplicates or near duplicates kept together (more than one example).
    pub duplicate_groups: u64,
    pub examples_in_duplicate_groups: u64,
}

#[derive(Debug, Clone)]
pub struct SplitOutcome {
    pub train: Manifest,
    pub heldout: Manifest,
    pub report: SplitReport,
}

struct UnionFind(Vec<u32>);

impl UnionFind {
    fn new(n: usize) -> Self {
        UnionFind((0..n as u32).collect())
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.0[x as usize] != x {
            let p = self.0[x as usize];
            self.0[x as usize] = self.0[p as usize];
            x = p;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.0[hi as usize] = lo;
        }
    }
}

/// Splits version `input` (role full or train) into a training and a held-out version.
pub fn split(store: &Datasets, input: &str, params: &SplitParams) -> Result<SplitOutcome> {
    let f = params.heldout_fraction;
    if !(f > 0.0 && f < 1.0) {
        return Err(DataError::InvalidParameter { name: "heldout_fraction", message: format!("{f} is not in (0, 1)") });
    }
    if let Some(n) = &params.near {
        n.check()?;
    }
    let m = store.manifest(input)?;
    if m.role == DatasetRole::Heldout {
        return Err(DataError::WrongRole { id: m.id.clone(), expected: DatasetRole::Full, found: m.role });
    }

    // Pass 1: keys, labels, and the grouping.
    let mut keys: Vec<u128> = Vec::new();
    let mut labels: Vec<Option<u32>> = Vec::new();
    let mut label_names: Vec<String> = Vec::new();
    let mut label_ids: HashMap<String, u32> = HashMap::new();
    let mut first_of_key: HashMap<u128, u32, PremixedState> = HashMap::with_hasher(PremixedState);
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    let mut near = params.near.map(|p| {
        let (bands, rows) = p.banding();
        (p, MinHasher::new(&p), LshIndex::new(bands, rows), Vec::<u32>::new(), Vec::<u32>::new())
    });
    let (mut text, mut sig, mut scratch) = (String::new(), Vec::new(), String::new());
    for (i, ex) in store.examples(input)?.enumerate() {
        let ex = ex?;
        let i = i as u32;
        let key = exact_key(&ex, false, &mut scratch);
        keys.push(key);
        labels.push(ex.label.as_ref().map(|l| {
            *label_ids.entry(l.clone()).or_insert_with(|| {
                label_names.push(l.clone());
                label_names.len() as u32 - 1
            })
        }));
        if let Some(&first) = first_of_key.get(&key) {
            pairs.push((first, i));
            continue;
        }
        first_of_key.insert(key, i);
        if let Some((p, hasher, index, sigs, owners)) = near.as_mut() {
            messages_text(&ex, &mut text);
            hasher.signature(&text, &mut sig);
            let np = p.num_perm;
            for &c in index.candidates(&sig) {
                let other = &sigs[c as usize * np..(c as usize + 1) * np];
                if estimate_jaccard(&sig, other) >= p.threshold {
                    pairs.push((owners[c as usize], i));
                }
            }
            index.insert(owners.len() as u32, &sig);
            sigs.extend_from_slice(&sig);
            owners.push(i);
        }
    }
    drop(near);
    drop(first_of_key);
    let n = keys.len();
    let mut uf = UnionFind::new(n);
    for (a, b) in pairs {
        uf.union(a, b);
    }

    // Groups: members, order key (seeded hash of the smallest member key), size.
    let mut group_of: Vec<u32> = vec![0; n];
    let mut roots: HashMap<u32, u32> = HashMap::new();
    let mut group_key: Vec<u128> = Vec::new();
    let mut group_size: Vec<u64> = Vec::new();
    let mut group_labels: Vec<BTreeMap<Option<u32>, u64>> = Vec::new();
    for i in 0..n {
        let r = uf.find(i as u32);
        let g = *roots.entry(r).or_insert_with(|| {
            group_key.push(u128::MAX);
            group_size.push(0);
            group_labels.push(BTreeMap::new());
            group_key.len() as u32 - 1
        });
        group_of[i] = g;
        let g = g as usize;
        group_key[g] = group_key[g].min(keys[i]);
        group_size[g] += 1;
        *group_labels[g].entry(labels[i]).or_default() += 1;
    }
    let stratified = params.stratify && labels.iter().any(Option::is_some);
    // A group's stratum: its most common label, ties to the smallest label text.
    let stratum = |g: usize| -> Option<u32> {
        if !stratified {
            return None;
        }
        group_labels[g]
            .iter()
            .max_by(|(la, ca), (lb, cb)| {
                ca.cmp(cb).then_with(|| {
                    let name = |l: &&Option<u32>| l.map(|x| label_names[x as usize].as_str());
                    name(lb).cmp(&name(la))
                })
            })
            .map(|(l, _)| *l)
            .unwrap_or(None)
    };
    let order = |g: usize| -> u64 {
        let k = group_key[g];
        mix64(mix64(params.seed ^ k as u64) ^ (k >> 64) as u64)
    };
    let mut strata: BTreeMap<Option<String>, Vec<usize>> = BTreeMap::new();
    for g in 0..group_key.len() {
        let name = stratum(g).map(|l| label_names[l as usize].clone());
        strata.entry(name).or_default().push(g);
    }
    let mut heldout_group = vec![false; group_key.len()];
    for groups in strata.values_mut() {
        groups.sort_by_key(|&g| (order(g), group_key[g]));
        let total: u64 = groups.iter().map(|&g| group_size[g]).sum();
        if groups.len() < 2 {
            continue;
        }
        let mut target = (f * total as f64).round() as u64;
        target = target.clamp(1, total - 1);
        let mut held = 0;
        for &g in groups.iter() {
            if held + group_size[g] <= target {
                heldout_group[g] = true;
                held += group_size[g];
            }
        }
        if held == 0 {
            // Every group is larger than the target: hold out the smallest one.
            let &g = groups.iter().min_by_key(|&&g| group_size[g]).expect("two groups or more");
            heldout_group[g] = true;
        }
    }

    // Pass 2: write both sides in input order.
    let mut train = store.writer()?;
    let mut held = store.writer()?;
    let mut per_label: BTreeMap<String, SideCounts> = BTreeMap::new();
    for (i, ex) in store.examples(input)?.enumerate() {
        let ex = ex?;
        let h = heldout_group[group_of[i] as usize];
        if stratified {
            let c = per_label.entry(ex.label.clone().unwrap_or_default()).or_default();
            if h { c.heldout += 1 } else { c.train += 1 }
        }
        if h { held.push(&ex)? } else { train.push(&ex)? }
    }
    if train.rows() == 0 || held.rows() == 0 {
        return Err(DataError::InvalidParameter {
            name: "heldout_fraction",
            message: format!(
                "version {input} ({n} rows in {} duplicate groups) cannot be split into two non-empty sides",
                group_key.len()
            ),
        });
    }
    let report = SplitReport {
        input_rows: n as u64,
        train_rows: train.rows(),
        heldout_rows: held.rows(),
        stratified,
        labels: per_label,
        duplicate_groups: group_size.iter().filter(|&&s| s > 1).count() as u64,
        examples_in_duplicate_groups: group_size.iter().filter(|&&s| s > 1).sum(),
    };
    let (train, held) = (train.seal()?, held.seal()?);
    let op = Operation::Split { params: params.clone(), train: train.id().to_string(), heldout: held.id().to_string() };
    let summary = serde_json::to_value(&report).expect("reports serialise");
    let parent = Some(m.id.clone());
    let heldout = held.commit(store, parent.clone(), op.clone(), DatasetRole::Heldout, summary.clone())?;
    let train = train.commit(store, parent, op, DatasetRole::Train, summary)?;
    Ok(SplitOutcome { train, heldout, report })
}

/// A training example that repeats (or nearly repeats) a held-out example.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LeakPair {
    /// Index in the training set.
    pub train: usize,
    /// Index in the held-out set.
    pub heldout: usize,
    /// 1.0 for exact pairs; the estimated Jaccard similarity for near pairs.
    pub similarity: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeakageReport {
    pub train_id: String,
    pub heldout_id: String,
    /// Equal after normalisation (messages only).
    pub exact: Vec<LeakPair>,
    /// At or above the near-duplicate threshold, not already exact.
    pub near: Vec<LeakPair>,
}

impl LeakageReport {
    pub fn is_clean(&self) -> bool {
        self.exact.is_empty() && self.near.is_empty()
    }
}

/// Exact and near duplicates between a training set and a held-out set.
pub fn check_leakage(
    store: &Datasets,
    train: &TrainingSet,
    heldout: &HeldOut,
    near: Option<&NearDupParams>,
) -> Result<LeakageReport> {
    check_leakage_between(store, train.id(), heldout.id(), near)
}

/// Like [`check_leakage`] for any two versions, whatever their roles.
pub fn check_leakage_between(
    store: &Datasets,
    train_id: &str,
    heldout_id: &str,
    near: Option<&NearDupParams>,
) -> Result<LeakageReport> {
    if let Some(p) = near {
        p.check()?;
    }
    let mut scratch = String::new();
    let mut text = String::new();
    let mut sig = Vec::new();
    let mut by_key: HashMap<u128, Vec<u32>, PremixedState> = HashMap::with_hasher(PremixedState);
    let mut held_keys: Vec<u128> = Vec::new();
    let mut index = near.map(|p| {
        let (b, r) = p.banding();
        (MinHasher::new(p), LshIndex::new(b, r), Vec::<u32>::new())
    });
    for (j, ex) in store.examples(heldout_id)?.enumerate() {
        let ex = ex?;
        let key = exact_key(&ex, false, &mut scratch);
        by_key.entry(key).or_default().push(j as u32);
        held_keys.push(key);
        if let Some((hasher, lsh, sigs)) = index.as_mut() {
            messages_text(&ex, &mut text);
            hasher.signature(&text, &mut sig);
            lsh.insert(j as u32, &sig);
            sigs.extend_from_slice(&sig);
        }
    }
    let mut report =
        LeakageReport { train_id: train_id.to_string(), heldout_id: heldout_id.to_string(), exact: Vec::new(), near: Vec::new() };
    for (i, ex) in store.examples(train_id)?.enumerate() {
        let ex = ex?;
        let key = exact_key(&ex, false, &mut scratch);
        if let Some(js) = by_key.get(&key) {
            report.exact.extend(js.iter().map(|&j| LeakPair { train: i, heldout: j as usize, similarity: 1.0 }));
        }
        if let (Some(p), Some((hasher, lsh, sigs))) = (near, index.as_mut()) {
            messages_text(&ex, &mut text);
            hasher.signature(&text, &mut sig);
            let np = p.num_perm;
            for &c in lsh.candidates(&sig) {
                if held_keys[c as usize] == key {
                    continue;
                }
                let s = estimate_jaccard(&sig, &sigs[c as usize * np..(c as usize + 1) * np]);
                if s >= p.threshold {
                    report.near.push(LeakPair { train: i, heldout: c as usize, similarity: s });
                }
            }
        }
    }
    Ok(report)
}
