//! The object store backups go to: `[backup] url` made into an `object_store` client (S3 or a
//! local directory) under a key prefix, with every call bounded and every failure one line.
//!
//! Invariants:
//! - every call ends within `backup.request_timeout_ms`, retries included: object_store
//!   retries connect errors, 5xx and 429 (S3's `SlowDown`) with exponential backoff and
//!   jitter, and an outer deadline cuts whatever is left;
//! - every error is a [`BackupError`]: a class the protocol can act on (keep serving writes
//!   and report lag, or stop and wait for an operator) and one line telling the operator what
//!   is wrong and how to fix it; no error carries a secret;
//! - object names are relative to the prefix and made of `/`-separated segments; listing
//!   returns them relative too, sorted;
//! - S3 credentials come from `[backup]` or else from `AWS_ACCESS_KEY_ID` and
//!   `AWS_SECRET_ACCESS_KEY`; with neither the store is not built (object_store would
//!   otherwise ask the EC2 instance-metadata service).

use std::error::Error as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, RetryConfig,
};

use crate::config::{BackupSettings, BackupTarget};

/// Retries of one request (the backoff and the call's deadline usually stop them first).
const RETRIES_MAX: usize = 10;
/// A listing longer than this is refused rather than held in memory.
const LIST_COUNT_MAX: usize = 1_000_000;
/// Where `probe` writes, under the prefix.
const PROBE_DIR: &str = "_probe";
/// At most this much of a server's error text goes into a message.
const DETAIL_CHARS_MAX: usize = 300;

/// Why a store call failed. Each variant's text is one line for the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackupError {
    /// `[backup]` cannot work as written (found before any request).
    #[error("{0}")]
    Config(String),
    /// The server refused the credentials (403 `InvalidAccessKeyId`, `SignatureDoesNotMatch`,
    /// `AccessDenied`…).
    #[error(
        "the S3 credentials were refused by {endpoint} ({code}): check [backup] \
         access_key_id/secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )]
    Credentials { endpoint: String, code: String },
    /// 404 `NoSuchBucket`.
    #[error(
        "bucket {bucket} does not exist at {endpoint}: create it (e.g. `mc mb`) or fix \
         [backup] url"
    )]
    NoSuchBucket { bucket: String, endpoint: String },
    /// No answer: connection refused or reset, DNS, or the deadline passed.
    #[error("cannot reach {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    /// The object asked for is not there (404 `NoSuchKey`, or a missing file).
    #[error("object {object} does not exist at {location}")]
    NotFound { object: String, location: String },
    /// Anything else: a 5xx after the retries, a 4xx not listed above, a local I/O error.
    #[error("{op} {object} at {location} failed: {detail}")]
    Other {
        op: &'static str,
        object: String,
        location: String,
        detail: String,
    },
}

impl BackupError {
    /// Whether the same call may succeed later with no operator's help (the endpoint comes
    /// back, the server stops throttling): the protocol keeps serving writes and reports its
    /// lag. The others need someone to fix the configuration, the bucket or the credentials.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BackupError::Unreachable { .. } | BackupError::Other { .. }
        )
    }
}

/// Objects under a key prefix of one store, with a deadline on every call.
pub struct BackupStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// Where the store is, for messages: the S3 endpoint or `file:///DIR`.
    location: String,
    /// The S3 bucket (none for a directory).
    bucket: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for BackupStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupStore")
            .field("location", &self.location)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix.as_ref())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl BackupStore {
    /// The store `[backup]` names, or `None` when backup is off. Sends no request: call
    /// [`BackupStore::probe`] to check the endpoint, bucket and credentials.
    pub fn from_settings(settings: &BackupSettings) -> Result<Option<BackupStore>, BackupError> {
        Self::from_settings_with_env(settings, |key| std::env::var(key).ok())
    }

    /// [`BackupStore::from_settings`] with the environment given (for tests).
    pub fn from_settings_with_env(
        settings: &BackupSettings,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<BackupStore>, BackupError> {
        let timeout = Duration::from_millis(settings.request_timeout_ms);
        match settings.target().map_err(BackupError::Config)? {
            None => Ok(None),
            Some(BackupTarget::Local { dir }) => Self::local(&dir, timeout).map(Some),
            Some(BackupTarget::S3 { bucket, prefix }) => {
                let credentials = credentials(settings, env)?;
                Self::s3(settings, &bucket, &prefix, credentials, timeout).map(Some)
            }
        }
    }

    fn local(dir: &std::path::Path, timeout: Duration) -> Result<BackupStore, BackupError> {
        let config_error = |e: &dyn std::fmt::Display| {
            BackupError::Config(format!(
                "backup.url: cannot use directory {}: {}",
                dir.display(),
                one_line(&e.to_string())
            ))
        };
        std::fs::create_dir_all(dir).map_err(|e| config_error(&e))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| config_error(&e))?
            .with_automatic_cleanup(true);
        Ok(BackupStore {
            store: Arc::new(store),
            prefix: Path::default(),
            location: format!("file://{}", dir.display()),
            bucket: None,
            timeout,
        })
    }

    fn s3(
        settings: &BackupSettings,
        bucket: &str,
        prefix: &str,
        (key_id, secret): (String, String),
        timeout: Duration,
    ) -> Result<BackupStore, BackupError> {
        // reqwest's rustls is built without a crypto provider of its own (the workspace has
        // one, ring) and takes the process default. Everything else in the node names ring
        // explicitly, so installing it as the default changes nothing there; if a default is
        // already installed, reqwest uses that one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let endpoint = settings
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", settings.region));
        let mut builder = AmazonS3Builder::new()
            .with_region(&settings.region)
            .with_bucket_name(bucket)
            .with_access_key_id(key_id)
            .with_secret_access_key(secret)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_client_options(client_options(settings.allow_http, timeout))
            .with_retry(retry_config(timeout));
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder.build().map_err(|e| {
            BackupError::Config(format!(
                "[backup] is not usable: {}",
                one_line(&e.to_string())
            ))
        })?;
        let prefix = Path::parse(prefix).map_err(|e| {
            BackupError::Config(format!(
                "backup.url has a bad prefix: {}",
                one_line(&e.to_string())
            ))
        })?;
        Ok(BackupStore {
            store: Arc::new(store),
            prefix,
            location: endpoint,
            bucket: Some(bucket.to_string()),
            timeout,
        })
    }

    /// Where the store is: the S3 endpoint or `file:///DIR`.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Writes `bytes` as object `name`, replacing any object of that name.
    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<(), BackupError> {
        let key = self.key(name);
        let put = self.store.put(&key, bytes.into());
        self.call("put", &key, put).await.map(|_| ())
    }

    /// Writes `bytes` as object `name` unless one exists: true if written, false if it was
    /// there (an S3 `If-None-Match: *` PUT; the existing object is left as it is).
    pub async fn put_if_absent(&self, name: &str, bytes: Bytes) -> Result<bool, BackupError> {
        let key = self.key(name);
        let options = PutOptions::from(PutMode::Create);
        let put = self.store.put_opts(&key, bytes.into(), options);
        match tokio::time::timeout(self.timeout, put).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(object_store::Error::AlreadyExists { .. })) => Ok(false),
            Ok(Err(e)) => Err(self.classify("put_if_absent", &key, &e)),
            Err(_) => Err(self.deadline_passed("put_if_absent", &key)),
        }
    }

    /// Reads object `name` whole.
    pub async fn get(&self, name: &str) -> Result<Bytes, BackupError> {
        let key = self.key(name);
        let get = async { self.store.get(&key).await?.bytes().await };
        self.call("get", &key, get).await
    }

    /// Deletes object `name`; deleting an object that is not there succeeds (as S3 does).
    pub async fn delete(&self, name: &str) -> Result<(), BackupError> {
        let key = self.key(name);
        match self.call("delete", &key, self.store.delete(&key)).await {
            Err(BackupError::NotFound { .. }) => Ok(()),
            result => result,
        }
    }

    /// The objects whose names start with the segments of `prefix` ("" for all), with
    /// their sizes in bytes, sorted by name. `pg-1/log` lists `pg-1/log/…`, not `pg-10/…`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        let key = self.key(prefix);
        let list = async {
            let mut stream = self.store.list((!key.as_ref().is_empty()).then_some(&key));
            let mut objects = Vec::new();
            while let Some(meta) = stream.next().await {
                let meta = meta?;
                if objects.len() == LIST_COUNT_MAX {
                    return Err(object_store::Error::Generic {
                        store: "backup",
                        source: format!("more than {LIST_COUNT_MAX} objects").into(),
                    });
                }
                if let Some(name) = self.name(&meta.location) {
                    objects.push((name, meta.size));
                }
            }
            Ok(objects)
        };
        let mut objects = self.call("list", &key, list).await?;
        objects.sort_unstable();
        Ok(objects)
    }

    /// Checks the configuration as the node starts: writes a small object under the prefix,
    /// reads it back, lists it and deletes it. The error says what to fix.
    pub async fn probe(&self) -> Result<(), BackupError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = format!("{PROBE_DIR}/{}-{nanos}", std::process::id());
        let body = Bytes::from(format!("sixfold backup probe {name}\n"));
        self.put(&name, body.clone()).await?;
        let odd = |detail: &str| BackupError::Other {
            op: "probe",
            object: self.describe(&self.key(&name)),
            location: self.location.clone(),
            detail: detail.to_string(),
        };
        if self.get(&name).await? != body {
            return Err(odd("the object read back differs from the one written"));
        }
        if !self.list(PROBE_DIR).await?.iter().any(|(n, _)| *n == name) {
            return Err(odd("a listing does not show the object just written"));
        }
        self.delete(&name).await
    }

    /// The key of object `name`.
    ///
    /// # Panics
    /// If `name` is not a valid object path (an empty, `.` or `..` segment): names are made by
    /// the backup protocol, so that is a programmer error.
    fn key(&self, name: &str) -> Path {
        let name = Path::parse(name)
            .unwrap_or_else(|e| panic!("object name {name:?} is not a valid object path: {e}"));
        self.prefix.parts().chain(name.parts()).collect()
    }

    /// The name of the object at `key` (`None` if it is outside the prefix).
    fn name(&self, key: &Path) -> Option<String> {
        let parts: Vec<_> = key.prefix_match(&self.prefix)?.collect();
        let parts: Vec<&str> = parts.iter().map(AsRef::as_ref).collect();
        Some(parts.join("/"))
    }

    /// `key` as a URL for messages: `s3://BUCKET/KEY` or `file:///DIR/KEY`.
    fn describe(&self, key: &Path) -> String {
        match &self.bucket {
            Some(bucket) => format!("s3://{bucket}/{key}"),
            None => format!("{}/{key}", self.location),
        }
    }

    /// Runs one store call under the deadline, its error classified.
    async fn call<T>(
        &self,
        op: &'static str,
        key: &Path,
        call: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, BackupError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.classify(op, key, &e)),
            Err(_) => Err(self.deadline_passed(op, key)),
        }
    }

    fn deadline_passed(&self, op: &str, key: &Path) -> BackupError {
        BackupError::Unreachable {
            endpoint: self.location.clone(),
            detail: format!(
                "{op} {} got no answer within {} ms (backup.request_timeout_ms)",
                self.describe(key),
                self.timeout.as_millis()
            ),
        }
    }

    fn classify(&self, op: &'static str, key: &Path, e: &object_store::Error) -> BackupError {
        let text = chain_text(e);
        let code = xml_field(&text, "Code");
        let endpoint = self.location.clone();
        match code.as_deref() {
            Some("NoSuchBucket") => {
                let bucket = self.bucket.clone().unwrap_or_default();
                return BackupError::NoSuchBucket { bucket, endpoint };
            }
            Some(
                "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "NotSignedUp"
                | "AccessDenied"
                | "InvalidToken"
                | "ExpiredToken",
            ) => {
                let code = code.unwrap_or_default();
                return BackupError::Credentials { endpoint, code };
            }
            _ => {}
        }
        match e {
            object_store::Error::NotFound { .. } => BackupError::NotFound {
                object: self.describe(key),
                location: endpoint,
            },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => BackupError::Credentials {
                endpoint,
                code: code.unwrap_or_else(|| "403".into()),
            },
            _ if transport_failed(e) => BackupError::Unreachable {
                endpoint,
                detail: root_cause(e),
            },
            _ => BackupError::Other {
                op,
                object: self.describe(key),
                location: endpoint,
                detail: match (code, xml_field(&text, "Message")) {
                    (Some(code), Some(message)) => format!("{code}: {message}"),
                    (Some(code), None) => code,
                    _ => root_cause(e),
                },
            },
        }
    }
}

/// The S3 credentials: `[backup]`'s if it has them, else the environment's.
pub fn credentials(
    settings: &BackupSettings,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(String, String), BackupError> {
    if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
        return Ok((id.clone(), secret.clone()));
    }
    let nonempty = |key: &str| env(key).filter(|v| !v.is_empty());
    match (
        nonempty("AWS_ACCESS_KEY_ID"),
        nonempty("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(id), Some(secret)) => Ok((id, secret)),
        _ => Err(BackupError::Config(
            "[backup] has no S3 credentials: set access_key_id and secret_access_key in \
             [backup], or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the node's environment"
                .into(),
        )),
    }
}

/// One HTTP request: at most half the call's deadline, so a hung request leaves time for a
/// retry; connecting, at most a quarter (and 5 s).
fn client_options(allow_http: bool, timeout: Duration) -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_timeout(timeout / 2)
        .with_connect_timeout((timeout / 4).min(Duration::from_secs(5)))
}

/// Retries stop being started after three quarters of the call's deadline, so the error a
/// caller sees is usually the server's or the network's own rather than "deadline passed";
/// backoff grows from 100 ms by 2× with jitter, capped at an eighth of the deadline.
fn retry_config(timeout: Duration) -> RetryConfig {
    let max_backoff = (timeout / 8).clamp(Duration::from_millis(100), Duration::from_secs(5));
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff,
            base: 2.0,
        },
        max_retries: RETRIES_MAX,
        retry_timeout: timeout * 3 / 4,
    }
}

/// Every message in `e`'s chain of sources, one per line.
fn chain_text(e: &object_store::Error) -> String {
    let mut text = String::new();
    let mut next: Option<&dyn std::error::Error> = Some(e);
    while let Some(e) = next {
        text.push_str(&e.to_string());
        text.push('\n');
        next = e.source();
    }
    text
}

/// The last error in `e`'s chain: the cause ("Connection refused (os error 111)").
fn root_cause(e: &object_store::Error) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(source) = last.source() {
        last = source;
    }
    one_line(&last.to_string())
}

/// Whether the request never got an HTTP answer (connect, send, timeout, reset).
fn transport_failed(e: &object_store::Error) -> bool {
    let mut next = e.source();
    while let Some(e) = next {
        if let Some(http) = e.downcast_ref::<HttpError>() {
            return !matches!(http.kind(), HttpErrorKind::Decode | HttpErrorKind::Unknown);
        }
        next = e.source();
    }
    false
}

/// `<Field>value</Field>` from an S3 error body.
fn xml_field(text: &str, field: &str) -> Option<String> {
    let open = format!("<{field}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{field}>"))? + start;
    Some(one_line(&text[start..end]))
}

/// `text` on one line, cut at `DETAIL_CHARS_MAX` characters.
fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(DETAIL_CHARS_MAX) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> BackupSettings {
        BackupSettings {
            url: Some(url.into()),
            ..BackupSettings::default()
        }
    }

    /// Goal: the file's credentials win over the environment's, the environment fills in
    /// when the file has none, and with neither the error says both ways to set them.
    /// Method: `credentials` with a fake environment.
    #[test]
    fn credentials_come_from_the_file_then_the_environment() {
        let env = |key: &str| match key {
            "AWS_ACCESS_KEY_ID" => Some("env-id".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("env-secret".to_string()),
            _ => None,
        };
        let mut s = settings("s3://bucket");
        assert_eq!(credentials(&s, env).unwrap().0, "env-id");
        s.access_key_id = Some("file-id".into());
        s.secret_access_key = Some("file-secret".into());
        assert_eq!(
            credentials(&s, env).unwrap(),
            ("file-id".into(), "file-secret".into())
        );
        let e = credentials(&settings("s3://bucket"), |_| None).unwrap_err();
        let text = e.to_string();
        assert!(!e.is_transient());
        assert!(
            text.contains("access_key_id") && text.contains("AWS_ACCESS_KEY_ID"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }

    /// Goal: no `[backup] url` means no store; a store's Debug never shows the secret.
    /// Method: build from settings without and with a URL (no request is sent).
    #[test]
    fn off_without_url_and_no_secret_in_debug() {
        let none = BackupStore::from_settings_with_env(&BackupSettings::default(), |_| None);
        assert!(none.unwrap().is_none());
        let mut s = settings("s3://bucket/some/prefix");
        s.endpoint = Some("http://127.0.0.1:9".into());
        s.allow_http = true;
        s.access_key_id = Some("id".into());
        s.secret_access_key = Some("very-secret".into());
        let store = BackupStore::from_settings_with_env(&s, |_| None)
            .unwrap()
            .unwrap();
        assert_eq!(store.key("a/b").as_ref(), "some/prefix/a/b");
        assert_eq!(store.name(&store.key("a/b")).unwrap(), "a/b");
        assert!(!format!("{store:?} {s:?}").contains("very-secret"));
    }

    #[test]
    fn server_text_becomes_one_line() {
        let body = "<Error>\n  <Code>SlowDown</Code>\n  <Message>Please\n reduce</Message></Error>";
        assert_eq!(xml_field(body, "Code").unwrap(), "SlowDown");
        assert_eq!(xml_field(body, "Message").unwrap(), "Please reduce");
        assert!(xml_field(body, "Resource").is_none());
        assert_eq!(
            one_line(&"x".repeat(400)).chars().count(),
            DETAIL_CHARS_MAX + 1
        );
    }
}
