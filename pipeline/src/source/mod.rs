//! Where shards come from: a local folder, an S3-compatible bucket, a Google Cloud Storage
//! bucket, an Azure Blob Storage container or a plain HTTP(S) server, all through the
//! `object_store` crate, read as ranged GETs with read-ahead and retries.
//!
//! A shard is streamed in `chunk_bytes` ranges. Each range is fetched on the tokio
//! runtime while the previous one is being parsed, and a failed range is retried at the
//! same offset with exponential backoff, so a connection broken mid-shard resumes where it
//! stopped, without duplicating or losing samples.

use std::io::Read;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

mod upload;

pub use upload::{Progress, SHA256_METADATA, UPLOADS, UploadReport};

use crate::error::{Error, Result};
use crate::format::{MANIFEST_FILE, Manifest};

/// How to reach a remote store: S3 as AWS tools configure it, Google Cloud Storage and
/// Azure with `object_store`'s `GOOGLE_*` and `AZURE_*` variables. Its `Debug` output
/// leaves the secrets out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// `AWS_ENDPOINT_URL`: an on-prem or test server (`http://127.0.0.1:8333`).
    pub endpoint: Option<String>,
    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`). By default, `us-east-1`.
    pub region: Option<String>,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
    /// The `GOOGLE_*` (for `gs://`) and `AZURE_*` (for `az://`) variables, names in lower
    /// case: `google_service_account` (a key file), `google_application_credentials`,
    /// `azure_storage_account_name`, `azure_storage_account_key`,
    /// `azure_storage_sas_token`, `azure_storage_use_emulator`, `google_allow_http`, ...
    /// Without credentials, each cloud's own defaults apply (for example the metadata
    /// server of a GCE or Azure VM).
    pub cloud: Vec<(String, String)>,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<hidden>");
        f.debug_struct("StoreOptions")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &hidden(&self.secret_access_key))
            .field("session_token", &hidden(&self.session_token))
            .field(
                "cloud",
                &self.cloud.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl StoreOptions {
    /// Takes the `AWS_*` variables from `vars` (pass `std::env::vars()`).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> StoreOptions {
        let mut o = StoreOptions::default();
        for (k, v) in vars {
            match k.as_str() {
                "AWS_ENDPOINT_URL" | "AWS_ENDPOINT_URL_S3" => o.endpoint = Some(v),
                "AWS_REGION" => o.region = Some(v),
                "AWS_DEFAULT_REGION" => {
                    o.region.get_or_insert(v);
                }
                "AWS_ACCESS_KEY_ID" => o.access_key_id = Some(v),
                "AWS_SECRET_ACCESS_KEY" => o.secret_access_key = Some(v),
                "AWS_SESSION_TOKEN" => o.session_token = Some(v),
                _ if k.starts_with("GOOGLE_") || k.starts_with("AZURE_") => {
                    o.cloud.push((k.to_ascii_lowercase(), v));
                }
                _ => {}
            }
        }
        o
    }

    /// The cloud variables whose names start with `prefix` (`google_`, `azure_`) that
    /// `object_store` knows, as its config keys; others (`GOOGLE_CLOUD_PROJECT`, ...) are
    /// not its business.
    fn cloud_config<K: std::str::FromStr>(&self, prefix: &str) -> Vec<(K, &str)> {
        self.cloud
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str())))
            .collect()
    }
}

/// Splits `bucket/prefix` after a URL's scheme.
fn bucket_and_prefix<'a>(
    rest: &'a str,
    form: &str,
) -> std::result::Result<(&'a str, &'a str), String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("no bucket in the URL: use {form}"));
    }
    Ok((bucket, prefix))
}

/// Timeouts of every remote store.
fn client_options(allow_http: bool) -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(60))
}

/// A few quick retries inside object_store; [`ShardSource::get_range`] adds the long,
/// offset-resuming retries.
fn quick_retry() -> RetryConfig {
    RetryConfig {
        backoff: Default::default(),
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
    }
}

/// A split's location: a store and the prefix of the split inside it.
pub struct ShardSource {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    location: String,
    local: bool,
    /// What to check when the store cannot be reached: its URL and settings.
    settings: &'static str,
}

impl ShardSource {
    /// A local folder, `s3://bucket/prefix` or an `http(s)://` folder URL holding a split
    /// (its `manifest.json` and shards).
    pub fn open(location: &str, options: &StoreOptions) -> Result<ShardSource> {
        let err = |message: String| Error::Source {
            location: location.to_string(),
            message,
        };
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = bucket_and_prefix(rest, "s3://bucket/prefix").map_err(err)?;
            let endpoint = options.endpoint.clone();
            let client = client_options(
                endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            );
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(options.region.clone().unwrap_or_else(|| "us-east-1".into()))
                .with_client_options(client)
                .with_retry(quick_retry());
            if let Some(e) = endpoint {
                builder = builder.with_endpoint(e);
            }
            if let (Some(id), Some(secret)) = (&options.access_key_id, &options.secret_access_key) {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
            }
            if let Some(token) = &options.session_token {
                builder = builder.with_token(token);
            }
            let store = builder.build().map_err(|e| err(e.to_string()))?;
            return Ok(ShardSource {
                settings: "the URL, AWS_ENDPOINT_URL and the AWS_* credentials",
                ..ShardSource::new(Arc::new(store), prefix, location)
            });
        }
        // Our timeouts first; the GOOGLE_* / AZURE_* settings (allow_http, timeouts, ...)
        // change them one by one (a later `with_client_options` would replace them all).
        if let Some(rest) = location.strip_prefix("gs://") {
            let (bucket, prefix) = bucket_and_prefix(rest, "gs://bucket/prefix").map_err(err)?;
            let mut builder = GoogleCloudStorageBuilder::new()
                .with_client_options(client_options(false))
                .with_retry(quick_retry());
            for (key, value) in options.cloud_config("google_") {
                builder = builder.with_config(key, value);
            }
            let store = builder
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| err(e.to_string()))?;
            return Ok(ShardSource {
                settings: "the URL and the GOOGLE_* credentials (GOOGLE_SERVICE_ACCOUNT or GOOGLE_APPLICATION_CREDENTIALS)",
                ..ShardSource::new(Arc::new(store), prefix, location)
            });
        }
        if let Some(rest) = location.strip_prefix("az://") {
            let (container, prefix) =
                bucket_and_prefix(rest, "az://container/prefix").map_err(err)?;
            let mut builder = MicrosoftAzureBuilder::new()
                .with_client_options(client_options(false))
                .with_retry(quick_retry());
            for (key, value) in options.cloud_config("azure_") {
                builder = builder.with_config(key, value);
            }
            let store = builder
                .with_container_name(container)
                .build()
                .map_err(|e| {
                    err(format!(
                        "{e}; set AZURE_STORAGE_ACCOUNT_NAME and its credentials"
                    ))
                })?;
            return Ok(ShardSource {
                settings: "the URL, AZURE_STORAGE_ACCOUNT_NAME and its credentials (AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN)",
                ..ShardSource::new(Arc::new(store), prefix, location)
            });
        }
        if location.starts_with("http://") || location.starts_with("https://") {
            // The split's URL is a folder: shard names are appended to it as path segments.
            let store = HttpBuilder::new()
                .with_url(location.trim_end_matches('/'))
                .with_client_options(client_options(location.starts_with("http://")))
                .with_retry(quick_retry())
                .build()
                .map_err(|e| err(e.to_string()))?;
            return Ok(ShardSource::new(Arc::new(store), "", location));
        }
        if let Some((scheme, _)) = location.split_once("://")
            && scheme != "file"
        {
            return Err(err(format!(
                "unsupported scheme {scheme}://: use a local folder, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or an http(s):// URL"
            )));
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        let dir = std::fs::canonicalize(path).map_err(|e| {
            err(format!(
                "{e}: expected a folder written by `shardtool pack`"
            ))
        })?;
        let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| err(e.to_string()))?;
        Ok(ShardSource {
            local: true,
            ..ShardSource::new(Arc::new(store), "", location)
        })
    }

    /// Wraps any store (for example `object_store::memory::InMemory` in tests).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, location: &str) -> ShardSource {
        ShardSource {
            store,
            prefix: StorePath::from(prefix.trim_matches('/')),
            location: location.to_string(),
            local: false,
            settings: "the URL",
        }
    }

    /// Whether the shards are on a local disk (then they are never cached).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// The location as the user gave it.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn path(&self, name: &str) -> StorePath {
        if self.prefix.as_ref().is_empty() {
            StorePath::from(name)
        } else {
            self.prefix.clone().join(name)
        }
    }

    /// Fetches and checks the manifest: one clear error if it is missing or the store
    /// cannot be reached.
    pub async fn manifest(&self) -> Result<Manifest> {
        let path = self.path(MANIFEST_FILE);
        let origin = format!("{}/{MANIFEST_FILE}", self.location.trim_end_matches('/'));
        let got = self.store.get(&path).await;
        let bytes = match got {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        }
        .map_err(|e| Error::Source {
            location: origin.clone(),
            message: match e {
                object_store::Error::NotFound { .. } => {
                    "not found: the split is not packed, or its pack is incomplete (run `shardtool pack`, with --resume to finish one)".into()
                }
                other => format!("{other}; check {}", self.settings),
            },
        })?;
        Manifest::from_json(&bytes, &origin)
    }

    /// Fetches `range` of shard `name`, retrying failures with exponential backoff
    /// (0.2 s doubling to 5 s) for up to `retry_for`, or until `stop` is set. A shard
    /// missing from a local folder is no passing failure: it is not retried.
    pub async fn get_range(
        &self,
        name: &str,
        range: Range<u64>,
        retry_for: Duration,
        stop: &AtomicBool,
        retries: &AtomicU64,
    ) -> Result<Bytes> {
        let path = self.path(name);
        let start = Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            let failure = match self.store.get_range(&path, range.clone()).await {
                Ok(bytes) if bytes.len() as u64 == range.end - range.start => return Ok(bytes),
                // A short body (a connection cut mid-response) is retried like an error.
                Ok(bytes) => format!(
                    "asked for {} bytes at {}, got {}",
                    range.end - range.start,
                    range.start,
                    bytes.len()
                ),
                Err(object_store::Error::NotFound { .. }) if self.local => {
                    return Err(Error::Source {
                        location: format!("{}/{name}", self.location),
                        message: "the manifest lists this shard but the folder has no such \
                                  file: run `shardtool verify` on the split, and pack it \
                                  again (or restore the file)"
                            .into(),
                    });
                }
                Err(e) => e.to_string(),
            };
            match failure {
                e if start.elapsed() >= retry_for || stop.load(Ordering::Relaxed) => {
                    return Err(Error::Source {
                        location: format!("{}/{name}", self.location),
                        message: format!(
                            "reading bytes {}..{} failed for {:.0} s: {e}",
                            range.start,
                            range.end,
                            start.elapsed().as_secs_f64()
                        ),
                    });
                }
                e => {
                    retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(shard = name, offset = range.start, error = %e, "read failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// A blocking `Read` over one shard: ranged GETs of `chunk` bytes on the runtime, one
/// range fetched ahead of the one being read.
pub struct RangeReader {
    source: Arc<ShardSource>,
    runtime: Handle,
    name: String,
    size: u64,
    chunk: u64,
    retry_for: Duration,
    stop: Arc<AtomicBool>,
    counters: Arc<IoCounters>,
    /// Offset of the next range to request.
    next_offset: u64,
    current: Bytes,
    ahead: Option<JoinHandle<Result<Bytes>>>,
}

/// I/O counters shared by all readers.
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Bytes fetched.
    pub bytes: AtomicU64,
    /// Failed requests that were retried.
    pub retries: AtomicU64,
    /// Nanoseconds readers spent waiting for bytes.
    pub wait_ns: AtomicU64,
}

impl RangeReader {
    /// Streams shard `name` of `size` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: Arc<ShardSource>,
        runtime: Handle,
        name: &str,
        size: u64,
        chunk: u64,
        retry_for: Duration,
        stop: Arc<AtomicBool>,
        counters: Arc<IoCounters>,
    ) -> RangeReader {
        let mut reader = RangeReader {
            source,
            runtime,
            name: name.to_string(),
            size,
            chunk: chunk.max(1),
            retry_for,
            stop,
            counters,
            next_offset: 0,
            current: Bytes::new(),
            ahead: None,
        };
        reader.fetch_ahead();
        reader
    }

    fn fetch_ahead(&mut self) {
        if self.next_offset >= self.size {
            self.ahead = None;
            return;
        }
        let range = self.next_offset..(self.next_offset + self.chunk).min(self.size);
        self.next_offset = range.end;
        let (source, name, retry_for, stop, counters) = (
            self.source.clone(),
            self.name.clone(),
            self.retry_for,
            self.stop.clone(),
            self.counters.clone(),
        );
        self.ahead = Some(self.runtime.spawn(async move {
            source
                .get_range(&name, range, retry_for, &stop, &counters.retries)
                .await
        }));
    }
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.current.is_empty() {
            let Some(ahead) = self.ahead.take() else {
                return Ok(0);
            };
            let waited = Instant::now();
            let got = self
                .runtime
                .block_on(ahead)
                .map_err(std::io::Error::other)?;
            self.counters
                .wait_ns
                .fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.current = got.map_err(std::io::Error::other)?;
            self.counters
                .bytes
                .fetch_add(self.current.len() as u64, Ordering::Relaxed);
            self.fetch_ahead();
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

impl Drop for RangeReader {
    fn drop(&mut self) {
        if let Some(ahead) = self.ahead.take() {
            ahead.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_options_keep_cloud_variables_and_hide_secrets() {
        let vars = [
            ("AWS_SECRET_ACCESS_KEY", "s3-secret"),
            ("AZURE_STORAGE_ACCOUNT_KEY", "azure-secret"),
            ("GOOGLE_SERVICE_ACCOUNT", "/keys/gcs.json"),
            ("HOME", "/root"),
        ];
        let o = StoreOptions::from_vars(vars.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!(
            o.cloud,
            vec![
                ("azure_storage_account_key".into(), "azure-secret".into()),
                ("google_service_account".into(), "/keys/gcs.json".into()),
            ]
        );
        assert_eq!(o.secret_access_key.as_deref(), Some("s3-secret"));
        let shown = format!("{o:?}");
        assert!(!shown.contains("-secret"), "{shown}");
        assert!(shown.contains("azure_storage_account_key"), "{shown}");
    }
}
