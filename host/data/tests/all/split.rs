//! The held-out split: determinism, stratification, grouping of near duplicates, leakage.

use std::collections::BTreeSet;

use lathe_data::split::{self, SideCounts, SplitParams, check_leakage, check_leakage_between};
use lathe_data::{DataError, DatasetRole, Example, HeldOut, NearDupParams, Operation, TrainingSet};

use crate::{Env, qa};

const VOCAB: &[&str] = &[
    "account", "billing", "cancel", "delivery", "error", "firmware", "gateway", "hardware", "invoice", "journal",
    "kernel", "ledger", "modem", "network", "outage", "password", "quota", "router", "server", "ticket", "upgrade",
    "voucher", "warranty", "xml", "yield", "zone", "printer", "scanner", "laptop", "monitor", "keyboard", "battery",
];

/// A distinct pseudo-random sentence for each `i`.
fn sentence(i: u64) -> String {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let words: Vec<&str> = (0..16)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            VOCAB[(x % VOCAB.len() as u64) as usize]
        })
        .collect();
    format!("{} {i}", words.join(" "))
}

fn write(env: &Env, examples: &[Example]) -> String {
    env.store.write_examples(examples, None, Operation::Create { note: "test".into() }, DatasetRole::Full).unwrap().id
}

fn lines(env: &Env, id: &str) -> BTreeSet<String> {
    env.examples(id).iter().map(Example::to_canonical).collect()
}

fn labelled(n: u64, label: &str, offset: u64) -> Vec<Example> {
    (0..n).map(|i| qa(&sentence(offset + i), &format!("answer {}", offset + i)).with_label(label)).collect()
}

#[test]
fn split_is_deterministic_and_independent_of_order() {
    let env = Env::new();
    let examples = labelled(300, "x", 0);
    let id = write(&env, &examples);
    let a = split::split(&env.store, &id, &SplitParams::with_seed(7)).unwrap();
    let b = split::split(&env.store, &id, &SplitParams::with_seed(7)).unwrap();
    assert_eq!((&a.train.id, &a.heldout.id), (&b.train.id, &b.heldout.id));
    assert_eq!(a.report.heldout_rows, 45);
    assert_eq!(a.report.train_rows, 255);

    let mut reversed = examples.clone();
    reversed.reverse();
    let rid = write(&env, &reversed);
    let r = split::split(&env.store, &rid, &SplitParams::with_seed(7)).unwrap();
    assert_eq!(lines(&env, &r.heldout.id), lines(&env, &a.heldout.id));
    assert_eq!(lines(&env, &r.train.id), lines(&env, &a.train.id));

    let c = split::split(&env.store, &id, &SplitParams::with_seed(8)).unwrap();
    assert_ne!(lines(&env, &c.heldout.id), lines(&env, &a.heldout.id));
    assert_eq!(c.report.heldout_rows, 45);

    // Both sides record the input, the parameters and each other.
    for (m, role) in [(&a.train, DatasetRole::Train), (&a.heldout, DatasetRole::Heldout)] {
        assert_eq!(m.role, role);
        assert_eq!(m.parent.as_deref(), Some(id.as_str()));
        assert_eq!(m.operation, Operation::Split {
            params: SplitParams::with_seed(7),
            train: a.train.id.clone(),
            heldout: a.heldout.id.clone(),
        });
    }
    // Every input example is on exactly one side.
    let all: BTreeSet<String> = examples.iter().map(Example::to_canonical).collect();
    let train = lines(&env, &a.train.id);
    let held = lines(&env, &a.heldout.id);
    assert!(train.is_disjoint(&held));
    assert_eq!(train.union(&held).cloned().collect::<BTreeSet<_>>(), all);
}

#[test]
fn stratified_proportions() {
    let env = Env::new();
    let mut examples = labelled(600, "A", 0);
    examples.extend(labelled(300, "B", 1000));
    examples.extend(labelled(100, "C", 2000));
    examples.extend(labelled(2, "D", 3000));
    examples.extend(labelled(1, "E", 4000));
    examples.extend((5000..5040).map(|i| qa(&sentence(i), "unlabelled")));
    let id = write(&env, &examples);
    let out = split::split(&env.store, &id, &SplitParams::default()).unwrap();
    let r = &out.report;
    assert!(r.stratified);
    let c = |train, heldout| SideCounts { train, heldout };
    assert_eq!(r.labels["A"], c(510, 90));
    assert_eq!(r.labels["B"], c(255, 45));
    assert_eq!(r.labels["C"], c(85, 15));
    assert_eq!(r.labels["D"], c(1, 1), "a label with two examples gets one held out");
    assert_eq!(r.labels["E"], c(1, 0), "a single example cannot be split");
    assert_eq!(r.labels[""], c(34, 6));
    assert_eq!(r.heldout_rows, 90 + 45 + 15 + 1 + 6);
    // The held-out version really holds those labels.
    let held = HeldOut::open(&env.store, &out.heldout.id).unwrap();
    let n_c = held.examples().unwrap().filter(|e| e.as_ref().unwrap().label.as_deref() == Some("C")).count();
    assert_eq!(n_c, 15);

    // Unstratified, the overall share still holds.
    let flat = split::split(&env.store, &id, &SplitParams { stratify: false, ..SplitParams::default() }).unwrap();
    assert!(!flat.report.stratified);
    assert_eq!(flat.report.heldout_rows, (0.15f64 * 1043.0).round() as u64);
}

/// 300 distinct examples, 30 near copies of the first 30 and 10 exact copies (after
/// normalisation) of examples 100..110.
fn planted() -> Vec<Example> {
    let mut ex: Vec<Example> = (0..300).map(|i| qa(&sentence(i), &format!("answer {i}"))).collect();
    for i in 0..30 {
        ex.push(qa(&format!("{}!", sentence(i)), &format!("answer {i}")));
    }
    for i in 100..110 {
        ex.push(qa(&sentence(i).to_uppercase(), &format!("answer {i}")));
    }
    ex
}

#[test]
fn split_keeps_near_duplicates_on_one_side() {
    let env = Env::new();
    let id = write(&env, &planted());
    let near = NearDupParams::default();
    let out = split::split(&env.store, &id, &SplitParams::default()).unwrap();
    assert_eq!(out.report.duplicate_groups, 40);
    assert_eq!(out.report.examples_in_duplicate_groups, 80);
    let train = TrainingSet::open(&env.store, &out.train.id).unwrap();
    let held = HeldOut::open(&env.store, &out.heldout.id).unwrap();
    let leak = check_leakage(&env.store, &train, &held, Some(&near)).unwrap();
    assert!(leak.is_clean(), "{leak:?}");
    assert_eq!(out.report.heldout_rows, 51);

    // Grouping exact duplicates only lets planted near pairs straddle the split, and the
    // check catches exactly those.
    let loose = split::split(&env.store, &id, &SplitParams { near: None, ..SplitParams::with_seed(3) }).unwrap();
    let leak = check_leakage_between(&env.store, &loose.train.id, &loose.heldout.id, Some(&near)).unwrap();
    assert!(leak.exact.is_empty(), "exact duplicates are always grouped");
    assert!(!leak.near.is_empty(), "some of 30 planted pairs straddle a 15 % split");
    let train_ex = env.examples(&loose.train.id);
    let held_ex = env.examples(&loose.heldout.id);
    for p in &leak.near {
        let (a, b) = (&train_ex[p.train].messages[0].content, &held_ex[p.heldout].messages[0].content);
        assert!(a.trim_end_matches('!') == b.trim_end_matches('!') && a != b, "{a:?} vs {b:?}");
        assert!(p.similarity >= 0.8);
    }
    // Without near detection, the check reports no near pairs.
    let exact_only = check_leakage_between(&env.store, &loose.train.id, &loose.heldout.id, None).unwrap();
    assert!(exact_only.is_clean());
}

#[test]
fn leakage_across_versions() {
    let env = Env::new();
    let id = write(&env, &(0..100).map(|i| qa(&sentence(i), "a")).collect::<Vec<_>>());
    let old = split::split(&env.store, &id, &SplitParams::default()).unwrap();
    let held = env.examples(&old.heldout.id);
    // A later training set that picked up one held-out example verbatim (modulo case) and a
    // near copy of another.
    let mut new_train = env.examples(&old.train.id);
    new_train.push(qa(&held[3].messages[0].content.to_uppercase(), "a"));
    new_train.push(qa(&format!("{} ok", held[5].messages[0].content), "a"));
    let n = new_train.len();
    let m = env
        .store
        .write_examples(&new_train, Some(old.train.id.clone()), Operation::Create { note: "more data".into() }, DatasetRole::Train)
        .unwrap();
    let train = TrainingSet::open(&env.store, &m.id).unwrap();
    let heldout = HeldOut::open(&env.store, &old.heldout.id).unwrap();
    let leak = check_leakage(&env.store, &train, &heldout, Some(&NearDupParams::default())).unwrap();
    let exact: Vec<(usize, usize)> = leak.exact.iter().map(|p| (p.train, p.heldout)).collect();
    let near: Vec<(usize, usize)> = leak.near.iter().map(|p| (p.train, p.heldout)).collect();
    assert_eq!(exact, vec![(n - 2, 3)]);
    assert_eq!(near, vec![(n - 1, 5)]);
    assert_eq!((leak.train_id.as_str(), leak.heldout_id.as_str()), (m.id.as_str(), old.heldout.id.as_str()));
}

#[test]
fn split_rejects_what_cannot_be_split() {
    let env = Env::new();
    let one = write(&env, &[qa("only", "one")]);
    assert!(matches!(split::split(&env.store, &one, &SplitParams::default()), Err(DataError::InvalidParameter { .. })));
    // Two copies of one example form one group: still nothing to hold out.
    let dup = write(&env, &[qa("same", "x"), qa("SAME", "x")]);
    assert!(matches!(split::split(&env.store, &dup, &SplitParams::default()), Err(DataError::InvalidParameter { .. })));
    let many = write(&env, &(0..20).map(|i| qa(&sentence(i), "a")).collect::<Vec<_>>());
    for f in [0.0, 1.0, -0.1, f64::NAN] {
        let p = SplitParams { heldout_fraction: f, ..SplitParams::default() };
        assert!(matches!(split::split(&env.store, &many, &p), Err(DataError::InvalidParameter { name: "heldout_fraction", .. })));
    }
    let out = split::split(&env.store, &many, &SplitParams::default()).unwrap();
    assert_eq!(out.report.heldout_rows, 3);
    let err = split::split(&env.store, &out.heldout.id, &SplitParams::default()).unwrap_err();
    assert!(matches!(err, DataError::WrongRole { found: DatasetRole::Heldout, .. }));
    // A failed split leaves only the versions that existed before.
    assert_eq!(env.entries().len(), 5);
}
