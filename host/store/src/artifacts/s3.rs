//! Artifacts in an S3-compatible object store (AWS S3, MinIO, Ceph, R2, moto), through the
//! `object_store` crate, with a local folder as a read-through cache.
//!
//! - Keys are content addresses: `<prefix>/<first two hex digits>/<sha256>`, so a key's
//!   bytes never change and any process may cache them forever.
//! - A put hashes the bytes into the cache first (which also names the key), then uploads
//!   them unless the bucket has the key already: in one request up to
//!   [`MULTIPART_THRESHOLD`], else as a multipart upload. S3 makes an object visible only
//!   when its single PUT or its CompleteMultipartUpload succeeds, so a key is there whole
//!   or not at all; a failed multipart upload is aborted.
//! - A read is served from the cache, else downloaded into it and verified against its
//!   sha256 on the way (`Integrity` if the bucket returns other bytes).
//! - The bucket is the truth: `exists` and `list` ask it, not the cache.
//! - While the store is unreachable (a restart, a network partition), every request is
//!   retried with exponential backoff for up to the configured patience, then fails with an
//!   error that names the store, the operation and the key.
//!
//! The interface is blocking like [`ArtifactStore`]'s; the store runs its requests on a
//! small runtime of its own, so it works from any thread, async or not.

use std::fs::File;
use std::future::Future;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};

use super::{ArtifactStore, LocalArtifacts, check_sha, is_lower_hex};
use crate::{Result, StoreError};

/// Artifacts up to this size go up in one PUT; larger ones as a multipart upload.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// The part size of a multipart upload (S3 wants at least 5 MiB per part but the last).
const PART_SIZE: usize = 8 << 20;
/// Parts in flight at once during a multipart upload.
const PARTS_IN_FLIGHT: usize = 4;
/// Downloaded chunks buffered between the network and the cache file.
const CHUNKS_IN_FLIGHT: usize = 8;

/// Where an [`S3Artifacts`] keeps its objects and how it reaches them.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// Settings in `object_store`'s names (`aws_endpoint`, `aws_region`,
    /// `aws_access_key_id`, ...), applied over the standard `AWS_*` environment variables.
    /// An `http://` endpoint (a test server on loopback) is allowed as given.
    pub options: Vec<(String, String)>,
    /// How long a request keeps being retried while the store does not answer (or answers
    /// with a server error) before the operation fails.
    pub patience: Duration,
}

impl S3Config {
    pub fn new(url: impl Into<String>) -> S3Config {
        S3Config { url: url.into(), options: Vec::new(), patience: Duration::from_secs(120) }
    }

    pub fn option(mut self, key: &str, value: impl Into<String>) -> S3Config {
        self.options.push((key.to_owned(), value.into()));
        self
    }

    pub fn patience(mut self, patience: Duration) -> S3Config {
        self.patience = patience;
        self
    }
}

/// Content-addressed artifacts in an S3 bucket, cached in a local folder (see the module
/// documentation).
pub struct S3Artifacts {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket/prefix`, for messages.
    url: String,
    prefix: String,
    cache: LocalArtifacts,
    /// Runs the requests; `Option` only so that `Drop` can shut it down from any context.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for S3Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Artifacts").field("url", &self.url).field("cache", &self.cache.root()).finish()
    }
}

impl Drop for S3Artifacts {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime's task.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl S3Artifacts {
    /// Connects to the bucket of `config.url`, caching artifacts in `cache`. Checks that
    /// the bucket answers (a wrong endpoint, name or key fails here, not at the first
    /// upload), waiting for up to the patience while it does not.
    pub fn open(config: &S3Config, cache: LocalArtifacts) -> Result<S3Artifacts> {
        let (bucket, prefix) = parse_url(&config.url)?;
        // reqwest's TLS uses rustls without choosing a crypto provider; ring is the one
        // already in the build. Installing it twice is harmless (the first one stays).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let mut endpoint = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT")).ok();
        for (key, value) in &config.options {
            let parsed: AmazonS3ConfigKey =
                key.parse().map_err(|_| StoreError::Invalid(format!("object store option `{key}`: not an S3 setting")))?;
            if parsed == AmazonS3ConfigKey::Endpoint {
                endpoint = Some(value.clone());
            }
            builder = builder.with_config(parsed, value);
        }
        let client = ClientOptions::new()
            .with_allow_http(endpoint.as_deref().is_some_and(|e| e.starts_with("http://")))
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(300));
        let retry = RetryConfig {
            backoff: BackoffConfig { init_backoff: Duration::from_millis(200), max_backoff: Duration::from_secs(5), base: 2.0 },
            max_retries: 1000, // the patience ends the retries first
            retry_timeout: config.patience,
        };
        let store = builder
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|e| StoreError::Invalid(format!("object store {}: {e}", config.url)))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lathe-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io { path: PathBuf::from("(object store runtime)"), source: e })?;
        let artifacts = S3Artifacts {
            store: Arc::new(store),
            url: config.url.trim_end_matches('/').to_owned(),
            prefix,
            cache,
            runtime: Some(runtime),
        };
        // A listing of the prefix's top level: a missing bucket or a refused key fails it.
        let (store, prefix) = (artifacts.store.clone(), artifacts.prefix_key());
        let checked = artifacts.block(async move { store.list_with_delimiter(prefix.as_ref()).await.map(drop) });
        checked.map_err(|e| artifacts.context("checking the bucket", "", e))?;
        Ok(artifacts)
    }

    /// The local folder artifacts are cached in.
    pub fn cache(&self) -> &LocalArtifacts {
        &self.cache
    }

    fn prefix_key(&self) -> Option<Key> {
        (!self.prefix.is_empty()).then(|| Key::from(self.prefix.as_str()))
    }

    fn key(&self, sha256: &str) -> Key {
        let name = format!("{}/{sha256}", &sha256[..2]);
        match self.prefix.is_empty() {
            true => Key::from(name),
            false => Key::from(format!("{}/{name}", self.prefix)),
        }
    }

    /// Runs `future` on the store's runtime and waits for it, from any thread.
    fn block<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = mpsc::sync_channel(1);
        let runtime = self.runtime.as_ref().expect("the runtime lives as long as the store");
        runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().expect("the object store's runtime finishes what it was given")
    }

    /// The object's size, `None` if there is no such key.
    fn head(&self, sha256: &str) -> Result<Option<u64>, object_store::Error> {
        let (store, key) = (self.store.clone(), self.key(sha256));
        self.block(async move {
            match store.head(&key).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn context(&self, op: &str, sha256: &str, source: object_store::Error) -> StoreError {
        let what = match sha256 {
            "" => op.to_owned(),
            sha => format!("{op} {sha}"),
        };
        StoreError::ObjectStore { url: self.url.clone(), what, source: Box::new(source) }
    }

    /// Uploads the cached artifact `sha256` unless the bucket has it.
    fn upload(&self, sha256: &str, size: u64) -> Result<()> {
        if self.head(sha256).map_err(|e| self.context("looking up", sha256, e))?.is_some() {
            return Ok(());
        }
        let path = self.cache.get_path(sha256)?;
        let (store, key) = (self.store.clone(), self.key(sha256));
        let uploaded = self.block(async move {
            if size <= MULTIPART_THRESHOLD {
                let bytes = std::fs::read(&path).map_err(|e| io_error(&path, e))?;
                store.put(&key, PutPayload::from(bytes)).await.map(drop)
            } else {
                let mut upload = WriteMultipart::new_with_chunk_size(store.put_multipart(&key).await?, PART_SIZE);
                let written = async {
                    let mut file = File::open(&path).map_err(|e| io_error(&path, e))?;
                    let mut buffer = vec![0u8; PART_SIZE];
                    loop {
                        upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                        let n = read_full(&mut file, &mut buffer).map_err(|e| io_error(&path, e))?;
                        if n == 0 {
                            return Ok(());
                        }
                        upload.write(&buffer[..n]);
                    }
                }
                .await;
                match written {
                    Ok(()) => upload.finish().await.map(drop),
                    Err(e) => {
                        // Nothing of it becomes visible; the abort only frees the parts.
                        let _ = upload.abort().await;
                        Err(e)
                    }
                }
            }
        });
        uploaded.map_err(|e| self.context("uploading", sha256, e))
    }

    /// Downloads `sha256` into the cache, verifying it.
    fn download(&self, sha256: &str) -> Result<()> {
        let (store, key) = (self.store.clone(), self.key(sha256));
        let (tx, rx) = mpsc::sync_channel::<Result<bytes::Bytes, object_store::Error>>(CHUNKS_IN_FLIGHT);
        let runtime = self.runtime.as_ref().expect("the runtime lives as long as the store");
        runtime.spawn(async move {
            let mut stream = match store.get(&key).await {
                Ok(got) => got.into_stream(),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while let Some(chunk) = stream.next().await {
                let failed = chunk.is_err();
                // The reader went away (it failed): stop downloading.
                if tx.send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        let mut reader = ChunkReader { rx, chunk: bytes::Bytes::new(), error: None };
        match self.cache.put_verified(&mut reader, sha256) {
            Ok(_) => Ok(()),
            Err(e) => match reader.error.take() {
                Some(object_store::Error::NotFound { .. }) => Err(StoreError::not_found("artifact", sha256)),
                Some(source) => Err(self.context("downloading", sha256, source)),
                None => Err(e),
            },
        }
    }
}

impl ArtifactStore for S3Artifacts {
    fn put_reader(&self, reader: &mut dyn Read) -> Result<(String, u64)> {
        let (sha256, size) = self.cache.put_reader(reader)?;
        self.upload(&sha256, size)?;
        Ok((sha256, size))
    }

    fn put_verified(&self, reader: &mut dyn Read, sha256: &str) -> Result<u64> {
        check_sha(sha256)?;
        if let Some(size) = self.head(sha256).map_err(|e| self.context("looking up", sha256, e))? {
            return Ok(size);
        }
        let size = self.cache.put_verified(reader, sha256)?;
        self.upload(sha256, size)?;
        Ok(size)
    }

    fn exists(&self, sha256: &str) -> Result<bool> {
        check_sha(sha256)?;
        Ok(self.head(sha256).map_err(|e| self.context("looking up", sha256, e))?.is_some())
    }

    fn get_path(&self, sha256: &str) -> Result<PathBuf> {
        if let Ok(path) = self.cache.get_path(sha256) {
            return Ok(path); // content-addressed: a cached copy is the artifact
        }
        check_sha(sha256)?;
        self.download(sha256)?;
        self.cache.get_path(sha256)
    }

    fn list(&self) -> Result<Vec<String>> {
        let (store, prefix) = (self.store.clone(), self.prefix_key());
        let keys = self.block(async move {
            let mut keys = Vec::new();
            let mut listing = store.list(prefix.as_ref());
            while let Some(meta) = listing.next().await {
                keys.push(meta?.location.to_string());
            }
            Ok(keys)
        });
        let keys = keys.map_err(|e| self.context("listing", "", e))?;
        let mut shas: Vec<String> = keys
            .iter()
            .filter_map(|key| {
                let mut parts = key.rsplit('/');
                let (name, shard) = (parts.next()?, parts.next()?);
                (check_sha(name).is_ok() && shard.len() == 2 && is_lower_hex(shard) && name.starts_with(shard)).then(|| name.to_owned())
            })
            .collect();
        shas.sort();
        Ok(shas)
    }
}

/// `s3://bucket[/prefix]` → (bucket, prefix without slashes at its ends).
fn parse_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| StoreError::Invalid(format!("object store URL `{url}`: expected s3://bucket or s3://bucket/prefix")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(StoreError::Invalid(format!("object store URL `{url}`: no bucket named")));
    }
    Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
}

fn io_error(path: &std::path::Path, source: io::Error) -> object_store::Error {
    object_store::Error::Generic { store: "local cache", source: format!("{}: {source}", path.display()).into() }
}

/// Reads until `buffer` is full or the file ends.
fn read_full(file: &mut File, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The bytes of a download as a `Read`, chunk by chunk from the runtime; a failed chunk
/// is kept for the error message and ends the read.
struct ChunkReader {
    rx: mpsc::Receiver<Result<bytes::Bytes, object_store::Error>>,
    chunk: bytes::Bytes,
    error: Option<object_store::Error>,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => self.chunk = chunk,
                Ok(Err(e)) => {
                    let message = e.to_string();
                    self.error = Some(e);
                    return Err(io::Error::other(message));
                }
                Err(_) => return Ok(0), // the stream ended
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls_name_a_bucket_and_an_optional_prefix() {
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert_eq!(parse_url("s3://b/team/artifacts/").unwrap(), ("b".into(), "team/artifacts".into()));
        for bad in ["b/prefix", "s3:///x", "https://b"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
