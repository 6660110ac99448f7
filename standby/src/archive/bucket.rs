//! An archive in S3-compatible object storage (`s3://BUCKET/PREFIX`),
//! through the `object_store` crate: the object layout, the bucket
//! manifest, and hashed uploads and downloads.
//!
//! Layout under PREFIX. Objects are never modified once written:
//! - `objects/e<epoch>/<base>/<file>.<stored>.<blake3>`: one file of a
//!   backup, named by the epoch it was first archived in, the base it
//!   belongs to (its id's first [`KEY_BASE_CHARS`] characters), its name in
//!   the environment (log files carry their number, the log position's
//!   file), how many bytes the object holds (for the backup's last log
//!   file: the log end's offset; the rest of the file is zeros, BDB's
//!   pre-allocation) and the blake3 of the whole file, cut to
//!   [`KEY_DIGEST_HEX`] hex digits (the manifest holds all of it and every
//!   download is checked against that). Two writers of one key write the
//!   same bytes. Keys stay short (about 85 bytes plus the prefix and the
//!   file's name): s3s-fs names its side files of a multipart upload with
//!   the base64 of the key and refuses keys over about 129 bytes
//!   (ENAMETOOLONG). Format 1 (`tandem-bucket-backup/1`) named objects with
//!   the padded epoch, the whole base id and the whole blake3; it is still
//!   read.
//! - `manifests/e<epoch>-<base>-<log end file>-<log end offset>.json`: a
//!   [`BucketManifest`], written last, with a create-only conditional put
//!   (`If-None-Match: *`): a second archiver reaching the same name (after
//!   a failover, two standbys of one base) is refused by the store instead
//!   of replacing history.
//!
//! Every byte read back is checked: an object's length against the
//! manifest, then the blake3 of the file it rebuilds. Errors name the
//! object. Transient failures (5xx, resets, timeouts) are retried by
//! `object_store` with backoff; an upload counts only once the store
//! acknowledged it and a HEAD shows its full length.

use super::manifest::{log_rel_name, FileKind, Manifest, ManifestFile};
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const BUCKET_MANIFEST_FORMAT: &str = "tandem-bucket-backup/2";
/// The first format: long object keys (see the module doc); read, never
/// written.
pub const BUCKET_MANIFEST_FORMAT_1: &str = "tandem-bucket-backup/1";
/// Hex digits of a file's blake3 in its object's key (format 2).
pub const KEY_DIGEST_HEX: usize = 32;
/// Characters of the base id in an object's key (format 2).
pub const KEY_BASE_CHARS: usize = 16;
pub const MANIFESTS: &str = "manifests";
pub const OBJECTS: &str = "objects";
/// Objects up to this size go up in one PUT; larger ones as a multipart
/// upload of parts this size, at most [`PARTS_IN_FLIGHT`] at a time.
pub const PART: usize = 8 << 20;
pub const PARTS_IN_FLIGHT: usize = 2;
/// Objects uploaded or downloaded at once: memory stays below
/// `TRANSFERS * PARTS_IN_FLIGHT * PART` (plus read buffers).
pub const TRANSFERS: usize = 4;
const READ_BUF: usize = 1 << 20;
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(120);

/// What went wrong talking to the bucket, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("{0}")]
    Url(String),
    #[error("cannot use the object store at {url}: {source}")]
    Open {
        url: String,
        source: object_store::Error,
    },
    #[error("{key}: {what}: {source}")]
    Store {
        key: String,
        what: &'static str,
        source: object_store::Error,
    },
    #[error("{key}: {why}")]
    Object { key: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{key}: not a readable bucket manifest: {why}")]
    Manifest { key: String, why: String },
}

/// `s3://BUCKET/PREFIX`, the prefix without slashes at either end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketUrl {
    pub bucket: String,
    pub prefix: String,
}

impl BucketUrl {
    /// `None` for anything that does not start with `s3://`.
    pub fn parse(s: &str) -> Option<Result<Self, BucketError>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let ok_bucket = !bucket.is_empty()
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !ok_bucket {
            return Some(Err(BucketError::Url(format!(
                "{s}: the bucket name must be lowercase letters, digits, '-' and '.'"
            ))));
        }
        if prefix
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
            && !prefix.is_empty()
        {
            return Some(Err(BucketError::Url(format!(
                "{s}: the prefix has an empty, '.' or '..' part"
            ))));
        }
        Some(Ok(Self {
            bucket: bucket.into(),
            prefix: prefix.into(),
        }))
    }
}

impl std::fmt::Display for BucketUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.as_str() {
            "" => write!(f, "s3://{}", self.bucket),
            p => write!(f, "s3://{}/{p}", self.bucket),
        }
    }
}

/// Connection settings beyond the AWS environment variables
/// (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ALLOW_HTTP`); set ones win.
#[derive(Debug, Clone, Default)]
pub struct BucketOptions {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// How long one request is retried [default: RETRY_TIMEOUT].
    pub retry_timeout: Option<Duration>,
}

/// Is this endpoint on the loopback interface (plain HTTP is allowed there
/// without `AWS_ALLOW_HTTP`)?
fn is_loopback_endpoint(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An opened archive bucket.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    pub url: BucketUrl,
    /// Objects (key relative to PREFIX, length) this process uploaded or
    /// found with that length.
    confirmed: Mutex<HashSet<(String, u64)>>,
}

impl Bucket {
    pub fn open(url: &BucketUrl, opts: &BucketOptions) -> Result<Self, BucketError> {
        // reqwest's rustls takes the process's provider (ring, as for gRPC).
        tandem_shared::tls::require_tls13();
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            // The store checks every PUT body against its SHA-256: a body
            // cut or altered on the way is refused, not stored.
            .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &opts.region {
            b = b.with_region(r);
        }
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT").ok());
        if endpoint.as_deref().is_some_and(is_loopback_endpoint) {
            b = b.with_allow_http(true);
        }
        b = b.with_retry(RetryConfig {
            retry_timeout: opts.retry_timeout.unwrap_or(RETRY_TIMEOUT),
            ..Default::default()
        });
        let store = b.build().map_err(|source| BucketError::Open {
            url: url.to_string(),
            source,
        })?;
        Ok(Self {
            store: Arc::new(store),
            url: url.clone(),
            confirmed: Mutex::default(),
        })
    }

    /// A bucket over any store (tests: `object_store::memory::InMemory`).
    #[cfg(test)]
    pub(crate) fn over(store: Arc<dyn ObjectStore>, url: BucketUrl) -> Self {
        Self {
            store,
            url,
            confirmed: Mutex::default(),
        }
    }

    /// The object key of `rel` (relative to PREFIX).
    pub fn key(&self, rel: &str) -> ObjectPath {
        match self.url.prefix.as_str() {
            "" => ObjectPath::from(rel),
            p => ObjectPath::from(format!("{p}/{rel}")),
        }
    }

    /// `s3://BUCKET/PREFIX/rel`, for messages and reports.
    pub fn show(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    fn store_err(
        &self,
        rel: &str,
        what: &'static str,
    ) -> impl FnOnce(object_store::Error) -> BucketError {
        let key = self.show(rel);
        move |source| BucketError::Store { key, what, source }
    }

    /// Creates `rel` holding `bytes` unless it exists: `Ok(false)` when it
    /// did (nothing was written).
    pub async fn create(&self, rel: &str, bytes: Bytes) -> Result<bool, BucketError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.key(rel), PutPayload::from_bytes(bytes), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.store_err(rel, "create-only put")(e)),
        }
    }

    /// The whole object, `None` if there is none.
    pub async fn read(&self, rel: &str) -> Result<Option<Bytes>, BucketError> {
        let got = match self.store.get(&self.key(rel)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_err(rel, "reading")(e)),
        };
        got.bytes()
            .await
            .map(Some)
            .map_err(self.store_err(rel, "reading"))
    }

    /// The length of an object, `None` if there is none.
    pub async fn size(&self, rel: &str) -> Result<Option<u64>, BucketError> {
        match self.store.head(&self.key(rel)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err(rel, "HEAD")(e)),
        }
    }

    /// Keys under `rel_dir/` (relative to PREFIX), with their sizes and
    /// last-modified times (unix ms).
    pub async fn list(&self, rel_dir: &str) -> Result<Vec<(String, u64, i64)>, BucketError> {
        let root = self.key(rel_dir);
        let strip = match self.url.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let mut out = Vec::new();
        let mut listing = self.store.list(Some(&root));
        while let Some(item) = listing.next().await {
            let m = item.map_err(self.store_err(rel_dir, "listing"))?;
            let full = m.location.to_string();
            if let Some(rel) = full.strip_prefix(&strip) {
                out.push((rel.to_owned(), m.size, m.last_modified.timestamp_millis()));
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn delete(&self, rel: &str) -> Result<(), BucketError> {
        self.forget(rel);
        match self.store.delete(&self.key(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_err(rel, "deleting")(e)),
        }
    }

    /// Makes sure `rel` holds the first `len` bytes of `path`: nothing to
    /// do when this process confirmed it before or a HEAD shows that length
    /// (keys name their content), else [`Self::upload`]. `Ok(true)` when it
    /// uploaded. Confirmations are remembered for the life of the [`Bucket`]
    /// (a `--follow` round HEADs only objects it has not seen; a restarted
    /// archiver checks them all again); [`Self::delete`] forgets them.
    pub async fn ensure(&self, rel: &str, path: &Path, len: u64) -> Result<bool, BucketError> {
        if self.is_confirmed(rel, len) {
            return Ok(false);
        }
        if self.size(rel).await? == Some(len) {
            self.confirm(rel, len);
            return Ok(false);
        }
        self.upload(rel, path, len).await?;
        Ok(true)
    }

    fn is_confirmed(&self, rel: &str, len: u64) -> bool {
        self.confirmed
            .lock()
            .is_ok_and(|c| c.contains(&(rel.to_owned(), len)))
    }

    fn confirm(&self, rel: &str, len: u64) {
        if let Ok(mut c) = self.confirmed.lock() {
            c.insert((rel.to_owned(), len));
        }
    }

    fn forget(&self, rel: &str) {
        if let Ok(mut c) = self.confirmed.lock() {
            c.retain(|(k, _)| k != rel);
        }
    }

    /// Uploads the first `len` bytes of `path` as `rel` (overwriting: keys
    /// name their content), then confirms the object's length. A multipart
    /// upload that fails in any way is aborted (the parts sent so far are
    /// deleted); one that cannot be (the store is gone, the process killed)
    /// is left to the bucket's AbortIncompleteMultipartUpload rule (README).
    pub async fn upload(&self, rel: &str, path: &Path, len: u64) -> Result<(), BucketError> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(io_at("opening", path))?;
        let key = self.key(rel);
        if len as usize <= PART {
            let mut buf = Vec::with_capacity(len as usize);
            (&mut file)
                .take(len)
                .read_to_end(&mut buf)
                .await
                .map_err(io_at("reading", path))?;
            if buf.len() as u64 != len {
                return Err(self.short_source(rel, path, buf.len() as u64, len));
            }
            self.store
                .put(&key, PutPayload::from(buf))
                .await
                .map_err(self.store_err(rel, "uploading"))?;
        } else {
            let upload = self
                .store
                .put_multipart(&key)
                .await
                .map_err(self.store_err(rel, "starting a multipart upload"))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            if let Err(e) = self.send_parts(&mut w, rel, path, &mut file, len).await {
                if let Err(abort) = w.abort().await {
                    tracing::warn!(object = %self.show(rel), error = %abort, "could not abort the failed multipart upload; the bucket's lifecycle rule removes its parts");
                }
                return Err(e);
            }
            // `finish` aborts the upload itself when it fails.
            w.finish()
                .await
                .map_err(self.store_err(rel, "completing a multipart upload"))?;
        }
        match self.size(rel).await? {
            Some(n) if n == len => {
                self.confirm(rel, len);
                Ok(())
            }
            found => Err(BucketError::Object {
                key: self.show(rel),
                why: format!(
                    "the store acknowledged the upload but holds {} bytes, not {len}",
                    found
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "no object of".into())
                ),
            }),
        }
    }

    /// The parts of a multipart upload: the first `len` bytes of `file`,
    /// at most [`PARTS_IN_FLIGHT`] parts on the way at once.
    async fn send_parts(
        &self,
        w: &mut WriteMultipart,
        rel: &str,
        path: &Path,
        file: &mut tokio::fs::File,
        len: u64,
    ) -> Result<(), BucketError> {
        let mut reader = file.take(len);
        let mut buf = vec![0u8; READ_BUF];
        let mut sent = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(io_at("reading", path))?;
            if n == 0 {
                break;
            }
            w.wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(self.store_err(rel, "uploading a part"))?;
            w.write(&buf[..n]);
            sent += n as u64;
        }
        if sent != len {
            return Err(self.short_source(rel, path, sent, len));
        }
        Ok(())
    }

    fn short_source(&self, rel: &str, path: &Path, got: u64, len: u64) -> BucketError {
        BucketError::Object {
            key: self.show(rel),
            why: format!("{} ended after {got} of {len} bytes", path.display()),
        }
    }

    /// Downloads `rel` into the new file `dest` as described by `f`: the
    /// object must hold exactly `stored` bytes; the file is extended with
    /// zeros to `f.size` and its blake3 must be `f.blake3`. `dest` is
    /// fsynced. Adds each chunk's length to `progress`.
    pub async fn download(
        &self,
        rel: &str,
        f: &ManifestFile,
        stored: u64,
        dest: &Path,
        progress: &AtomicU64,
    ) -> Result<(), BucketError> {
        let io = |what: &str| {
            let what = format!("{what} {}", dest.display());
            move |source| BucketError::Io { what, source }
        };
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io("creating the directory of"))?;
        }
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .await
            .map_err(io("creating"))?;
        let mut out = tokio::io::BufWriter::with_capacity(READ_BUF, file);
        let got = self
            .store
            .get(&self.key(rel))
            .await
            .map_err(self.store_err(rel, "downloading"))?;
        let mut stream = got.into_stream();
        let mut hasher = blake3::Hasher::new();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.store_err(rel, "downloading"))?;
            n += chunk.len() as u64;
            if n > stored {
                break;
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io("writing"))?;
            progress.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        if n != stored {
            return Err(BucketError::Object {
                key: self.show(rel),
                why: format!(
                    "{} bytes, the manifest says {stored} (truncated or replaced object)",
                    if n > stored {
                        format!("more than {stored}")
                    } else {
                        n.to_string()
                    }
                ),
            });
        }
        out.flush().await.map_err(io("writing"))?;
        let file = out.into_inner();
        if f.size > stored {
            file.set_len(f.size).await.map_err(io("sizing"))?;
            super::store::hash_zeros(&mut hasher, f.size - stored);
        }
        let found = hasher.finalize().to_hex().to_string();
        if found != f.blake3 {
            return Err(BucketError::Object {
                key: self.show(rel),
                why: format!(
                    "altered: blake3 {}…, the manifest says {}… for {}",
                    &found[..16],
                    &f.blake3[..f.blake3.len().min(16)],
                    f.name
                ),
            });
        }
        file.sync_all().await.map_err(io("fsync of"))?;
        Ok(())
    }
}

fn io_at(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BucketError {
    let what = format!("{what} {}", path.display());
    move |source| BucketError::Io { what, source }
}

/// Keys may hold only what survives every S3 implementation unescaped.
pub fn key_safe(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect()
}

/// How many bytes of `f` its object holds: all of them, except for the
/// backup's last log file, cut at the log end (the rest is zeros).
pub fn stored_len(m: &Manifest, f: &ManifestFile) -> u64 {
    if f.kind == FileKind::Log && f.name == log_rel_name(&m.log_dir, m.log_end.file) {
        f.size.min(u64::from(m.log_end.offset))
    } else {
        f.size
    }
}

pub fn object_key(epoch: u64, base_id: &str, f: &ManifestFile, stored: u64) -> String {
    let base: String = key_safe(base_id).chars().take(KEY_BASE_CHARS).collect();
    format!(
        "{OBJECTS}/e{epoch}/{base}/{}",
        object_tail(BUCKET_MANIFEST_FORMAT, f, stored)
    )
}

/// How the key of `f`'s object ends in a manifest of `format`.
fn object_tail(format: &str, f: &ManifestFile, stored: u64) -> String {
    let digest = match format {
        BUCKET_MANIFEST_FORMAT_1 => f.blake3.as_str(),
        _ => f.blake3.get(..KEY_DIGEST_HEX).unwrap_or(&f.blake3),
    };
    format!("{}.{stored}.{digest}", f.name)
}

pub fn manifest_key(m: &Manifest) -> String {
    format!(
        "{MANIFESTS}/e{:010}-{}-{:010}-{:010}.json",
        m.epoch,
        key_safe(&m.base_id),
        m.log_end.file,
        m.log_end.offset
    )
}

/// What a bucket holds for one backup: the backup's [`Manifest`] and the
/// object holding each of its files (same order). `digest` is the blake3
/// of the compact JSON with `digest` empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketManifest {
    pub format: String,
    pub backup: Manifest,
    pub objects: Vec<String>,
    pub digest: String,
}

impl BucketManifest {
    /// `objects`: the keys already holding some of the files (from the
    /// previous manifest of the same base); the others get fresh keys.
    pub fn new(m: Manifest, reuse: &[(ManifestFile, u64, String)]) -> Self {
        let objects = m
            .files
            .iter()
            .map(|f| {
                let stored = stored_len(&m, f);
                reuse
                    .iter()
                    .find(|(g, s, _)| g == f && *s == stored)
                    .map(|(_, _, k)| k.clone())
                    .unwrap_or_else(|| object_key(m.epoch, &m.base_id, f, stored))
            })
            .collect();
        let mut bm = Self {
            format: BUCKET_MANIFEST_FORMAT.into(),
            backup: m,
            objects,
            digest: String::new(),
        };
        bm.digest = bm.compute_digest();
        bm
    }

    fn compute_digest(&self) -> String {
        let mut body = self.clone();
        body.digest = String::new();
        blake3::hash(&serde_json::to_vec(&body).unwrap_or_default())
            .to_hex()
            .to_string()
    }

    /// Each file with its object and how many bytes that object holds.
    pub fn entries(&self) -> impl Iterator<Item = (&ManifestFile, &str, u64)> {
        self.backup
            .files
            .iter()
            .zip(&self.objects)
            .map(|(f, k)| (f, k.as_str(), stored_len(&self.backup, f)))
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        Bytes::from(out)
    }

    /// Parses and checks: format, digest, the inner manifest (its own
    /// checks), one object per file, each object key naming that file's
    /// length and digest and staying under `objects/`.
    pub fn parse(bytes: &[u8], key: &str) -> Result<Self, BucketError> {
        let bad = |why: String| BucketError::Manifest {
            key: key.into(),
            why,
        };
        let bm: BucketManifest =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("damaged? {e}")))?;
        if bm.format != BUCKET_MANIFEST_FORMAT && bm.format != BUCKET_MANIFEST_FORMAT_1 {
            return Err(bad(format!(
                "format {:?} is neither {BUCKET_MANIFEST_FORMAT:?} nor {BUCKET_MANIFEST_FORMAT_1:?}",
                bm.format
            )));
        }
        let computed = bm.compute_digest();
        if computed != bm.digest {
            return Err(bad(format!(
                "digest mismatch: altered or damaged (recorded {}, computed {computed})",
                bm.digest
            )));
        }
        let inner = serde_json::to_vec(&bm.backup).unwrap_or_default();
        Manifest::parse(&inner, Path::new(key)).map_err(|e| bad(e.why))?;
        if bm.objects.len() != bm.backup.files.len() {
            return Err(bad("not one object per file".into()));
        }
        for (f, k, stored) in bm.entries() {
            let well_formed =
                f.blake3.len() == 64 && f.blake3.bytes().all(|b| b.is_ascii_hexdigit());
            if !well_formed {
                return Err(bad(format!(
                    "{}: not a blake3 digest: {:?}",
                    f.name, f.blake3
                )));
            }
            let tail = format!("/{}", object_tail(&bm.format, f, stored));
            let under = k.starts_with(&format!("{OBJECTS}/"));
            if !under || !k.ends_with(&tail) || tandem_shared::wirepath::validate(k).is_err() {
                return Err(bad(format!(
                    "object {k} does not name {} as it must",
                    f.name
                )));
            }
        }
        Ok(bm)
    }

    /// Same backup content (files, log range) as `other`, whoever wrote it.
    pub fn same_content(&self, other: &Self) -> bool {
        let (a, b) = (&self.backup, &other.backup);
        a.files == b.files && a.log_start == b.log_start && a.log_end == b.log_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = BucketUrl::parse("s3://tandem/site-a/prod/")
            .unwrap()
            .unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.prefix.as_str()),
            ("tandem", "site-a/prod")
        );
        assert_eq!(u.to_string(), "s3://tandem/site-a/prod");
        assert_eq!(BucketUrl::parse("s3://b").unwrap().unwrap().prefix, "");
        assert!(BucketUrl::parse("/srv/archive").is_none());
        assert!(BucketUrl::parse("s3://Bad_Bucket/x").unwrap().is_err());
        assert!(BucketUrl::parse("s3://b/a/../x").unwrap().is_err());
        assert!(BucketUrl::parse("s3:///x").unwrap().is_err());
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "http://127.0.0.1:9000",
            "http://localhost:1",
            "http://[::1]:80/x",
            "http://127.8.0.1",
        ] {
            assert!(is_loopback_endpoint(ok), "{ok}");
        }
        for no in [
            "https://127.0.0.1",
            "http://10.0.0.1:9000",
            "http://s3.example.com",
            "http://localhost.evil:1",
        ] {
            assert!(!is_loopback_endpoint(no), "{no}");
        }
    }
}
