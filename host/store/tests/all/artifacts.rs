use std::io::{self, Read};

use lathe_store::{ArtifactStore, LocalArtifacts, StoreError};
use sha2::{Digest, Sha256};

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn store() -> (tempfile::TempDir, LocalArtifacts) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalArtifacts::new(dir.path().join("artifacts")).unwrap();
    (dir, store)
}

/// A reader that fails if anything reads it.
struct Untouchable;
impl Read for Untouchable {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::other("read an artifact that was already stored"))
    }
}

#[test]
fn put_get_and_idempotence() {
    let (dir, store) = store();
    let store: &dyn ArtifactStore = &store;
    let sha = store.put_bytes(b"hello").unwrap();
    assert_eq!(
        sha,
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    assert!(store.exists(&sha).unwrap());
    let path = store.get_path(&sha).unwrap();
    assert_eq!(path, dir.path().join("artifacts").join("2c").join(&sha));
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    assert!(
        std::fs::metadata(&path).unwrap().permissions().readonly(),
        "artifacts are immutable"
    );
    let mut read_back = String::new();
    store
        .open(&sha)
        .unwrap()
        .read_to_string(&mut read_back)
        .unwrap();
    assert_eq!(read_back, "hello");

    // The same bytes again, through every way in: one artifact.
    assert_eq!(store.put_bytes(b"hello").unwrap(), sha);
    let source = dir.path().join("hello.txt");
    std::fs::write(&source, b"hello").unwrap();
    assert_eq!(store.put_file(&source).unwrap(), (sha.clone(), 5));
    assert_eq!(
        store.put_verified(&mut Untouchable, &sha).unwrap(),
        5,
        "an existing sha is a no-op"
    );
    assert_eq!(store.list().unwrap(), [sha.as_str()]);

    // Streamed: 24 MiB that never sit in memory at once.
    let size = 24 << 20;
    let (big, n) = store.put_reader(&mut io::repeat(7).take(size)).unwrap();
    assert_eq!(n, size);
    assert_eq!(big, sha_hex(&vec![7u8; size as usize]));
    assert_eq!(
        std::fs::metadata(store.get_path(&big).unwrap())
            .unwrap()
            .len(),
        size
    );
    let mut expected = vec![sha, big];
    expected.sort();
    assert_eq!(store.list().unwrap(), expected);

    let empty = store.put_bytes(b"").unwrap();
    assert_eq!(empty, sha_hex(b""));

    let missing = "0".repeat(64);
    assert!(!store.exists(&missing).unwrap());
    assert!(matches!(
        store.get_path(&missing),
        Err(StoreError::NotFound {
            what: "artifact",
            ..
        })
    ));
    assert!(matches!(
        store.open(&missing),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.put_file(&dir.path().join("absent")),
        Err(StoreError::Io { .. })
    ));
}

#[test]
fn announced_sha_is_verified() {
    let (dir, store) = store();
    let right = sha_hex(b"weights");
    let wrong = sha_hex(b"other weights");
    match store.put_verified(&mut &b"weights"[..], &wrong) {
        Err(StoreError::Integrity { expected, actual }) => {
            assert_eq!((expected, actual), (wrong.clone(), right.clone()))
        }
        other => panic!("expected an integrity error, got {other:?}"),
    }
    assert!(!store.exists(&wrong).unwrap() && !store.exists(&right).unwrap());
    assert!(store.list().unwrap().is_empty());
    let temp = dir.path().join("artifacts").join(".tmp");
    assert_eq!(
        std::fs::read_dir(&temp).unwrap().count(),
        0,
        "the rejected write was cleaned up"
    );

    assert_eq!(store.put_verified(&mut &b"weights"[..], &right).unwrap(), 7);
    assert_eq!(store.list().unwrap(), [right]);

    // Names that are not a sha never become paths.
    for bad in [
        "../../etc/passwd",
        "ABCD",
        &"A".repeat(64),
        &"g".repeat(64),
        "",
    ] {
        assert!(
            matches!(store.get_path(bad), Err(StoreError::Invalid(_))),
            "{bad}"
        );
        assert!(
            matches!(
                store.put_verified(&mut &b"x"[..], bad),
                Err(StoreError::Invalid(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn leftovers_of_a_crash_are_never_artifacts() {
    let (dir, store) = store();
    let root = dir.path().join("artifacts");
    let kept = store.put_bytes(b"complete").unwrap();

    // What a crash mid-put leaves: a partial write under .tmp, whose bytes hash to a sha
    // that a careless lookup might find.
    let partial = b"half a checkpoint";
    let partial_sha = sha_hex(partial);
    std::fs::write(root.join(".tmp").join("put-crashed.partial"), partial).unwrap();
    // And odd files where artifacts live.
    std::fs::write(root.join(&kept[..2]).join("notes.txt"), b"x").unwrap();
    std::fs::write(root.join(&kept[..2]).join(format!(".{kept}.tmp")), b"x").unwrap();
    std::fs::create_dir_all(root.join("zz")).unwrap();
    std::fs::write(root.join("zz").join(&partial_sha), partial).unwrap();

    assert!(!store.exists(&partial_sha).unwrap());
    assert!(matches!(
        store.get_path(&partial_sha),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list().unwrap(), [kept.as_str()]);

    // Reopening the store and sweeping old temporaries removes the debris, not artifacts.
    let reopened = LocalArtifacts::new(&root).unwrap();
    assert_eq!(
        reopened
            .remove_stale_temp(std::time::Duration::ZERO)
            .unwrap(),
        1
    );
    assert_eq!(
        reopened
            .remove_stale_temp(std::time::Duration::ZERO)
            .unwrap(),
        0
    );
    assert_eq!(reopened.list().unwrap(), [kept.as_str()]);
    assert_eq!(
        std::fs::read(reopened.get_path(&kept).unwrap()).unwrap(),
        b"complete"
    );

    // The partial bytes, put properly, become an artifact.
    assert_eq!(reopened.put_bytes(partial).unwrap(), partial_sha);
    assert!(reopened.exists(&partial_sha).unwrap());
}
