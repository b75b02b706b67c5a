//! The versioned store: content addressing, immutability, lineage, names, typed handles.

use lathe_data::store::is_version_id;
use lathe_data::{DataError, DatasetRole, HeldOut, ImportOptions, Operation, TrainingSet, import_file};

use crate::{Env, qa, sha256_file};

#[test]
fn id_is_the_sha256_of_the_canonical_lines_and_writes_do_not_duplicate() {
    let env = Env::new();
    let p = env.file("a.jsonl", "{\"prompt\":\"p\",\"completion\":\"c\"}\n");
    let first = import_file(&env.store, &p, &ImportOptions::default()).unwrap().manifest;
    assert!(is_version_id(&first.id));
    let data = env.store.version_dir(&first.id).join("data.jsonl");
    assert_eq!(sha256_file(&data), first.id);

    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = import_file(&env.store, &p, &ImportOptions::default()).unwrap().manifest;
    assert_eq!(again, first, "the existing version is returned untouched");
    let written = env.store.write_examples(&[qa("p", "c")], None, Operation::Create { note: "api".into() }, DatasetRole::Full).unwrap();
    assert_eq!(written.id, first.id);
    assert_eq!(env.entries(), vec![first.id.clone()]);
    assert_eq!(env.store.versions().unwrap(), vec![first]);
}

#[test]
fn versions_stream_lazily_and_missing_ones_are_errors() {
    let env = Env::new();
    let examples: Vec<_> = (0..1000).map(|i| qa(&format!("q{i}"), &format!("a{i}"))).collect();
    let m = env.store.write_examples(&examples, None, Operation::Create { note: "t".into() }, DatasetRole::Full).unwrap();
    assert_eq!(m.rows, 1000);
    let mut it = env.store.examples(&m.id).unwrap();
    assert_eq!(it.next().unwrap().unwrap(), examples[0]);
    assert_eq!(it.count(), 999);

    let missing = "0".repeat(64);
    assert!(matches!(env.store.manifest(&missing), Err(DataError::VersionNotFound { .. })));
    assert!(matches!(env.store.manifest("../../etc"), Err(DataError::VersionNotFound { .. })));

    // A damaged data file is reported with its line.
    let data = env.store.version_dir(&m.id).join("data.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{not json\n");
    std::fs::write(&data, text).unwrap();
    let err = env.store.examples(&m.id).unwrap().find_map(Result::err).unwrap();
    assert!(matches!(err, DataError::CorruptVersion { line: Some(1001), .. }), "{err:?}");
}

#[test]
fn lineage_walks_parents_back_to_the_import() {
    let env = Env::new();
    let mut text = String::new();
    for i in 0..40 {
        text.push_str(&format!("{{\"prompt\":\"question number {i}\",\"completion\":\"answer {i}\"}}\n"));
    }
    text.push_str("{\"prompt\":\"Question number 3 \",\"completion\":\"answer 3\"}\n");
    let p = env.file("l.jsonl", text);
    let imported = import_file(&env.store, &p, &ImportOptions::default()).unwrap().manifest;
    let deduped = lathe_data::curate::dedupe(&env.store, &imported.id, &lathe_data::curate::DedupeParams::exact_only()).unwrap();
    assert!(deduped.changed);
    let split = lathe_data::split::split(&env.store, &deduped.manifest.id, &Default::default()).unwrap();
    let chain: Vec<String> = env.store.lineage(&split.train.id).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(chain, vec![split.train.id.clone(), deduped.manifest.id.clone(), imported.id.clone()]);
    let ops: Vec<&str> = env
        .store
        .lineage(&split.heldout.id)
        .unwrap()
        .iter()
        .map(|m| match m.operation {
            Operation::Import { .. } => "import",
            Operation::Dedupe(_) => "dedupe",
            Operation::Split { .. } => "split",
            _ => "other",
        })
        .collect();
    assert_eq!(ops, ["split", "dedupe", "import"]);
    assert_eq!(env.store.versions().unwrap().len(), 4);
}

#[test]
fn names_resolve_to_versions() {
    let env = Env::new();
    let m = env.store.write_examples(&[qa("q", "a")], None, Operation::Create { note: "t".into() }, DatasetRole::Full).unwrap();
    env.store.set_ref("support/tickets", &m.id).unwrap();
    assert_eq!(env.store.resolve("support/tickets").unwrap(), m.id);
    assert_eq!(env.store.resolve(&m.id).unwrap(), m.id);
    assert_eq!(env.store.refs().unwrap().len(), 1);
    assert!(matches!(env.store.resolve("nope"), Err(DataError::UnknownRef { .. })));
    for bad in ["", "../x", "/abs", "a b", ".hidden"] {
        assert!(matches!(env.store.set_ref(bad, &m.id), Err(DataError::InvalidRefName { .. })), "{bad:?}");
    }
    assert!(matches!(env.store.set_ref("x", &"1".repeat(64)), Err(DataError::VersionNotFound { .. })));
}

#[test]
fn roles_are_enforced_by_the_handles() {
    let env = Env::new();
    let full = env.store.write_examples(&[qa("q", "a")], None, Operation::Create { note: "t".into() }, DatasetRole::Full).unwrap();
    let train = env.store.write_examples(&[qa("q2", "a")], None, Operation::Create { note: "t".into() }, DatasetRole::Train).unwrap();
    let held = env.store.write_examples(&[qa("q3", "a")], None, Operation::Create { note: "t".into() }, DatasetRole::Heldout).unwrap();
    assert_eq!(TrainingSet::open(&env.store, &train.id).unwrap().examples().unwrap().count(), 1);
    assert_eq!(HeldOut::open(&env.store, &held.id).unwrap().manifest().role, DatasetRole::Heldout);
    let err = TrainingSet::open(&env.store, &held.id).unwrap_err();
    assert!(matches!(err, DataError::WrongRole { expected: DatasetRole::Train, found: DatasetRole::Heldout, .. }));
    assert!(err.to_string().contains("expected role train, found heldout"));
    assert!(matches!(TrainingSet::open(&env.store, &full.id), Err(DataError::WrongRole { .. })));
    assert!(matches!(HeldOut::open(&env.store, &train.id), Err(DataError::WrongRole { .. })));
}

#[test]
fn an_abandoned_writer_leaves_nothing() {
    let env = Env::new();
    let mut w = env.store.writer().unwrap();
    w.push(&qa("q", "a")).unwrap();
    assert_eq!(env.entries().len(), 1, "the temporary folder exists while writing");
    drop(w);
    env.assert_empty();
    let w = env.store.writer().unwrap();
    let sealed = w.seal().unwrap();
    drop(sealed);
    env.assert_empty();
}

#[test]
fn stale_temporaries_are_removed() {
    let env = Env::new();
    let w = env.store.writer().unwrap();
    // A writer that died without unwinding (a crash) leaves its folder behind.
    std::mem::forget(w);
    assert_eq!(env.entries().len(), 1);
    assert_eq!(env.store.remove_stale_temporaries(std::time::Duration::from_secs(3600)).unwrap(), 0);
    assert_eq!(env.store.remove_stale_temporaries(std::time::Duration::ZERO).unwrap(), 1);
    env.assert_empty();
    assert!(env.store.versions().unwrap().is_empty());
}
