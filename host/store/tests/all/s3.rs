//! The S3 artifact store against a real S3-compatible server (moto) on loopback, with a
//! relay in front of it for the outages.

use std::time::{Duration, Instant};

use lathe_store::{ArtifactStore, LocalArtifacts, MULTIPART_THRESHOLD, S3Artifacts, S3Config, StoreError};
use object_store::ObjectStoreExt;
use object_store::aws::AmazonS3Builder;
use rand::{RngCore, SeedableRng};

use crate::s3_server::{Relay, S3Server};

fn config(server: &S3Server, endpoint: &str, prefix: &str) -> S3Config {
    let mut config = S3Config::new(format!("s3://{}/{prefix}", server.bucket)).patience(Duration::from_secs(20));
    config.options = S3Server::options(endpoint);
    config
}

/// A store with a cache folder of its own: another machine's view of the same bucket.
fn machine(config: &S3Config) -> (tempfile::TempDir, S3Artifacts) {
    let dir = tempfile::tempdir().unwrap();
    let cache = LocalArtifacts::new(dir.path().join("cache")).unwrap();
    (dir, S3Artifacts::open(config, cache).unwrap())
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

#[test]
fn an_artifact_put_on_one_machine_is_read_whole_on_another() {
    let server = S3Server::start();
    let config = config(&server, &server.endpoint(), "team/artifacts");
    let (_a, here) = machine(&config);
    let sha = here.put_bytes(b"hello").unwrap();
    assert_eq!(sha, lathe_util::sha256_hex(b"hello"));
    assert_eq!(here.put_bytes(b"hello").unwrap(), sha, "the same bytes are one artifact");
    let other = here.put_bytes(b"world").unwrap();

    let (_b, there) = machine(&config);
    assert!(there.exists(&sha).unwrap() && there.exists(&other).unwrap());
    assert_eq!(there.list().unwrap(), { let mut all = vec![sha.clone(), other.clone()]; all.sort(); all });
    assert!(there.cache().list().unwrap().is_empty(), "nothing read yet");
    assert_eq!(std::fs::read(there.get_path(&sha).unwrap()).unwrap(), b"hello");
    assert_eq!(there.cache().list().unwrap(), vec![sha.clone()], "read through the cache");

    // Keys are content addresses under the prefix; nothing else is in the bucket.
    let absent = "0".repeat(64);
    assert!(!there.exists(&absent).unwrap());
    assert!(matches!(there.get_path(&absent), Err(StoreError::NotFound { .. })));
    let wrong = there.put_verified(&mut &b"not it"[..], &absent);
    assert!(matches!(wrong, Err(StoreError::Integrity { .. })), "{wrong:?}");
    assert!(!there.exists(&absent).unwrap(), "bytes that do not hash to their name are not stored");
    let other_prefix = config.clone();
    let (_c, elsewhere) = machine(&S3Config { url: format!("s3://{}/other", server.bucket), ..other_prefix });
    assert!(elsewhere.list().unwrap().is_empty(), "another prefix is another store");
}

#[test]
fn bytes_changed_in_the_bucket_are_refused_on_download() {
    let server = S3Server::start();
    let config = config(&server, &server.endpoint(), "");
    let (_a, here) = machine(&config);
    let sha = here.put_bytes(b"the adapter").unwrap();
    // Someone overwrites the object behind Lathe's back.
    let mut raw = AmazonS3Builder::new().with_bucket_name(&server.bucket).with_allow_http(true);
    for (key, value) in S3Server::options(&server.endpoint()) {
        raw = raw.with_config(key.parse().unwrap(), value);
    }
    let raw = raw.build().unwrap();
    let key = object_store::path::Path::from(format!("{}/{sha}", &sha[..2]));
    tokio::runtime::Runtime::new().unwrap().block_on(raw.put(&key, b"tampered".to_vec().into())).unwrap();
    let (_b, there) = machine(&config);
    let read = there.get_path(&sha);
    assert!(matches!(read, Err(StoreError::Integrity { .. })), "{read:?}");
    assert!(there.cache().list().unwrap().is_empty(), "nothing unverified is cached");
}

#[test]
fn a_large_artifact_cut_mid_upload_is_never_listed_and_the_retry_stores_it_whole() {
    let server = S3Server::start();
    let relay = Relay::to(server.port);
    let size = (MULTIPART_THRESHOLD + (20 << 20)) as usize; // three parts
    let bytes = random_bytes(size, 7);
    let sha = lathe_util::sha256_hex(&bytes);
    let impatient = config(&server, &relay.endpoint(), "ckpt").patience(Duration::from_secs(2));
    let (_a, here) = machine(&impatient);

    relay.cut_after(12 << 20); // past the first part, before the last
    let cut = here.put_bytes(&bytes);
    let message = cut.expect_err("the upload was cut").to_string();
    eprintln!("{message}");
    assert!(message.contains(&format!("s3://lathe/ckpt: uploading {sha}")), "{message}");
    relay.restore();
    assert!(!here.exists(&sha).unwrap(), "a cut multipart upload is not visible");
    assert!(here.list().unwrap().is_empty());

    // The retry goes through, and another machine reads every byte back.
    assert_eq!(here.put_bytes(&bytes).unwrap(), sha);
    let (_b, there) = machine(&config(&server, &server.endpoint(), "ckpt"));
    assert_eq!(there.list().unwrap(), vec![sha.clone()]);
    assert!(std::fs::read(there.get_path(&sha).unwrap()).unwrap() == bytes, "the bytes differ");
}

#[test]
fn an_unreachable_store_is_waited_for_and_then_named_in_the_error() {
    let server = S3Server::start();
    let relay = Relay::to(server.port);
    let (_a, here) = machine(&config(&server, &relay.endpoint(), "").patience(Duration::from_secs(20)));

    // Down for a while: the put waits and goes through once the store is back.
    relay.cut();
    let started = Instant::now();
    let put = std::thread::scope(|s| {
        let put = s.spawn(|| here.put_bytes(b"checkpoint"));
        std::thread::sleep(Duration::from_millis(1500));
        relay.restore();
        put.join().unwrap()
    });
    let sha = put.expect("the put outlasts a short outage");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(here.exists(&sha).unwrap());

    // Down for longer than the patience: a clear error, in about that time.
    let (_b, impatient) = machine(&config(&server, &relay.endpoint(), "").patience(Duration::from_secs(2)));
    relay.cut();
    let started = Instant::now();
    let message = impatient.get_path(&sha).expect_err("the store is down").to_string();
    eprintln!("{message}");
    assert!(started.elapsed() < Duration::from_secs(15), "gave up after {:?}", started.elapsed());
    assert!(message.starts_with(&format!("object store s3://lathe: downloading {sha}")), "{message}");
    relay.restore();
    assert_eq!(std::fs::read(impatient.get_path(&sha).unwrap()).unwrap(), b"checkpoint");
}

#[test]
fn a_bucket_that_does_not_answer_is_refused_when_opened() {
    let server = S3Server::start();
    let missing = S3Config { url: "s3://no-such-bucket".into(), ..config(&server, &server.endpoint(), "") };
    let dir = tempfile::tempdir().unwrap();
    let error = S3Artifacts::open(&missing, LocalArtifacts::new(dir.path()).unwrap()).unwrap_err().to_string();
    assert!(error.starts_with("object store s3://no-such-bucket: checking the bucket:"), "{error}");
    let bad = S3Artifacts::open(&S3Config::new("https://example.com/b"), LocalArtifacts::new(dir.path()).unwrap()).unwrap_err();
    assert!(bad.to_string().contains("expected s3://bucket"), "{bad}");
}
