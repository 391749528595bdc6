//! `node.toml`: what an operator configures. Every mistake is reported as one line naming the
//! key and what to do about it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::ThrottleConfig;
use crate::journal::INFLIGHT_GROUPS_MAX;
use crate::manifest::SegmentKey;

/// The configuration a node runs with when no `--config` is given: one node on loopback with
/// data and certificates under `./.sixfold` (create the certificates with
/// `sixfold certs --out .sixfold/certs --node node1 --engine engine`).
pub const DEFAULT_CONFIG: &str = r#"# Sixfold storage node: embedded default for local runs.
name = "node1"
listen = "127.0.0.1:7100"
az = "az1"
data_dir = ".sixfold/node1"
# Prometheus metrics over HTTP at http://ADDRESS/metrics; off unless set.
# metrics_listen = "127.0.0.1:9100"

[tls]
ca = ".sixfold/certs/ca.pem"
cert = ".sixfold/certs/node1.pem"
key = ".sixfold/certs/node1.key.pem"

[journal]
file_bytes = 268435456   # 256 MiB per journal file
file_count = 8
inflight_groups_max = 4
sync = "rwf_dsync"       # or "fdatasync" (write + linked fdatasync)
persister = "inline"     # or "thread" (io_uring on its own thread) or "std_fs" (no io_uring)

[background]
# Coalescing and garbage collection. Paused, nothing leaves the journal and it fills: for
# benchmarks that compare foreground latency with and without background work only.
paused = false

[[segment]]
volume = 1
pg = 0
segment = 0
"#;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name: its certificate's subject name.
    pub name: String,
    pub listen: SocketAddr,
    pub az: String,
    pub data_dir: PathBuf,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`); off unless set.
    #[serde(default, deserialize_with = "metrics_listen")]
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default, rename = "segment")]
    pub segments: Vec<SegmentKey>,
    #[serde(default)]
    pub gossip: GossipSettings,
    #[serde(default)]
    pub scrub: ScrubSettings,
    #[serde(default)]
    pub background: BackgroundSettings,
    #[serde(default)]
    pub backpressure: BackpressureSettings,
    #[serde(default)]
    pub backup: BackupSettings,
}

/// `[scrub]`: how the node re-reads its page store and journal to find damage (see the
/// README's "Background work").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubSettings {
    /// Off: no scrub rounds (damage a read finds is still repaired).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Time between two scrub rounds.
    #[serde(default = "default_scrub_interval_ms")]
    pub interval_ms: u64,
    /// Written pages a round reads back.
    #[serde(default = "default_scrub_pages")]
    pub pages_per_round: usize,
    /// Journal records a round reads back.
    #[serde(default = "default_scrub_records")]
    pub records_per_round: usize,
}

fn default_scrub_interval_ms() -> u64 {
    1000
}

fn default_scrub_pages() -> usize {
    32
}

fn default_scrub_records() -> usize {
    512
}

impl Default for ScrubSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: default_scrub_interval_ms(),
            pages_per_round: default_scrub_pages(),
            records_per_round: default_scrub_records(),
        }
    }
}

/// `[backup]`: where the node backs its PGs up (see the README's "Backup configuration"). Off
/// unless `url` is set; the tunables are checked either way.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BackupSettings {
    /// `file:///ABSOLUTE/DIR` (a local directory) or `s3://BUCKET/OPTIONAL/PREFIX`.
    pub url: Option<String>,
    /// The S3 endpoint, `http(s)://HOST:PORT` (MinIO); AWS's own for the region if unset.
    pub endpoint: Option<String>,
    pub region: String,
    /// Both or neither; if neither, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// `http://ENDPOINT/BUCKET/KEY` rather than `http://BUCKET.ENDPOINT/KEY` (MinIO needs it).
    pub path_style: bool,
    /// Plain http to the endpoint: it must be said, since credentials-signed requests and the
    /// backups themselves then cross the network in the clear.
    pub allow_http: bool,
    /// A log object is sealed and uploaded at this many bytes…
    pub log_bytes: u64,
    /// …or this long after its first record, whichever comes first.
    pub log_interval_ms: u64,
    /// Time between two page snapshots of a PG.
    pub snapshot_interval_s: u64,
    /// Journal bytes not yet backed up from which the node reports itself lagging.
    pub lag_bytes_max: u64,
    /// Deadline of one store call (a put, a get, a list or a delete), retries included.
    pub request_timeout_ms: u64,
}

impl Default for BackupSettings {
    fn default() -> Self {
        Self {
            url: None,
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            path_style: true,
            allow_http: false,
            log_bytes: 4 << 20,
            log_interval_ms: 1000,
            snapshot_interval_s: 300,
            lag_bytes_max: 1 << 30,
            request_timeout_ms: 30_000,
        }
    }
}

/// Never prints the secret.
impl std::fmt::Debug for BackupSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = self.secret_access_key.as_ref().map(|_| "<redacted>");
        f.debug_struct("BackupSettings")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &secret)
            .field("path_style", &self.path_style)
            .field("allow_http", &self.allow_http)
            .field("log_bytes", &self.log_bytes)
            .field("log_interval_ms", &self.log_interval_ms)
            .field("snapshot_interval_s", &self.snapshot_interval_s)
            .field("lag_bytes_max", &self.lag_bytes_max)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .finish()
    }
}

/// Where `[backup] url` points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupTarget {
    /// `file:///DIR`: objects are files under `DIR`.
    Local { dir: PathBuf },
    /// `s3://BUCKET/PREFIX`: objects are keys `PREFIX/…` of `BUCKET` (`prefix` may be empty).
    S3 { bucket: String, prefix: String },
}

impl BackupSettings {
    /// Where backups go, `None` when backup is off. Errors are one line naming the key.
    pub fn target(&self) -> Result<Option<BackupTarget>, String> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        let usage = "use file:///ABSOLUTE/DIR or s3://BUCKET/OPTIONAL/PREFIX";
        if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') || dir.split('/').any(|s| s == "..") {
                return Err(format!(
                    "backup.url = \"{url}\" must name an absolute directory: {usage}"
                ));
            }
            return Ok(Some(BackupTarget::Local { dir: dir.into() }));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(format!(
                "backup.url = \"{url}\" is neither file:// nor s3://: {usage}"
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_bucket_name(bucket) {
            return Err(format!(
                "backup.url = \"{url}\" names bucket \"{bucket}\", which is not a valid S3 \
                 bucket name (3 to 63 lowercase letters, digits, dots and hyphens): {usage}"
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        if object_store::path::Path::parse(prefix).is_err() || prefix.contains("//") {
            return Err(format!(
                "backup.url = \"{url}\" has prefix \"{prefix}\", which is not a valid object \
                 path (no empty, \".\" or \"..\" segments): {usage}"
            ));
        }
        Ok(Some(BackupTarget::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        }))
    }

    fn check(&self) -> Result<(), String> {
        let target = self.target()?;
        if matches!(target, Some(BackupTarget::S3 { .. })) {
            self.check_s3()?;
        }
        let ranges: [(&str, u64, u64, u64, &str); 5] = [
            ("log_bytes", self.log_bytes, 4096, 1 << 30, "4194304"),
            (
                "log_interval_ms",
                self.log_interval_ms,
                10,
                3_600_000,
                "1000",
            ),
            (
                "snapshot_interval_s",
                self.snapshot_interval_s,
                1,
                604_800,
                "300",
            ),
            (
                "lag_bytes_max",
                self.lag_bytes_max,
                1 << 20,
                1 << 40,
                "1073741824",
            ),
            (
                "request_timeout_ms",
                self.request_timeout_ms,
                100,
                600_000,
                "30000",
            ),
        ];
        for (key, value, min, max, default) in ranges {
            if !(min..=max).contains(&value) {
                return Err(format!(
                    "backup.{key} = {value} must be between {min} and {max}; try {default}"
                ));
            }
        }
        if self.lag_bytes_max < self.log_bytes {
            return Err(format!(
                "backup.lag_bytes_max = {} must be at least backup.log_bytes = {}",
                self.lag_bytes_max, self.log_bytes
            ));
        }
        Ok(())
    }

    fn check_s3(&self) -> Result<(), String> {
        if let Some(endpoint) = &self.endpoint {
            let host = endpoint
                .strip_prefix("https://")
                .or_else(|| endpoint.strip_prefix("http://"));
            if host.is_none_or(str::is_empty) {
                return Err(format!(
                    "backup.endpoint = \"{endpoint}\" must be http(s)://HOST:PORT, e.g. \
                     \"http://127.0.0.1:9000\""
                ));
            }
            if endpoint.starts_with("http://") && !self.allow_http {
                return Err(format!(
                    "backup.endpoint = \"{endpoint}\" is plain http: set allow_http = true in \
                     [backup] to allow it (or use an https endpoint)"
                ));
            }
        }
        if self.region.is_empty() {
            return Err("backup.region must not be empty; try \"us-east-1\"".into());
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(
                "backup.access_key_id and backup.secret_access_key go together: set \
                        both, or neither to take AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                        from the environment"
                    .into(),
            );
        }
        Ok(())
    }
}

/// S3's bucket naming rules, as far as they matter here.
fn valid_bucket_name(name: &str) -> bool {
    let edges_ok =
        |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && edges_ok(name.chars().next())
        && edges_ok(name.chars().last())
}

/// `[background]`: the node's background work (coalescing and garbage collection; gossip has
/// its own table).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackgroundSettings {
    /// Paused: no coalescing round and no garbage collection ever starts, so nothing leaves
    /// the journal and it fills (appends are then refused with `JournalFull`). Off by
    /// default; benchmarks pause it to measure what background work costs the foreground.
    #[serde(default)]
    pub paused: bool,
}

/// `[backpressure]`: when the node delays its acks (see the README's "Back-pressure"). The
/// defaults suit every deployment; tests force throttling with `journal_percent = 0`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BackpressureSettings {
    /// Journal use (percent of its bytes) from which acks are delayed (0 to 75).
    pub journal_percent: u64,
    /// Records waiting to be coalesced from which acks are delayed.
    pub backlog_records: usize,
    /// The delay as pressure begins, and at its full (at most 1000).
    pub ack_delay_min_ms: u64,
    pub ack_delay_max_ms: u64,
}

impl Default for BackpressureSettings {
    fn default() -> Self {
        let core = ThrottleConfig::default();
        Self {
            journal_percent: core.journal_percent,
            backlog_records: core.backlog_records,
            ack_delay_min_ms: u64::try_from(core.delay_min.as_millis()).expect("small"),
            ack_delay_max_ms: u64::try_from(core.delay_max.as_millis()).expect("small"),
        }
    }
}

impl BackpressureSettings {
    /// The core's settings.
    pub fn throttle_config(&self) -> ThrottleConfig {
        ThrottleConfig {
            journal_percent: self.journal_percent,
            backlog_records: self.backlog_records,
            delay_min: std::time::Duration::from_millis(self.ack_delay_min_ms),
            delay_max: std::time::Duration::from_millis(self.ack_delay_max_ms),
        }
    }
}

/// `[gossip]`: how the node fills holes from its peers (see the README's "Gossip").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GossipSettings {
    /// Off: the node never asks its peers for anything (it still answers them). For tests
    /// that need a segment to stay behind.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often each peer node is asked for its SCLs (± 25 %).
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
}

fn default_true() -> bool {
    true
}

fn default_poll_interval_ms() -> u64 {
    500
}

impl Default for GossipSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval_ms: default_poll_interval_ms(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How a journal write is made durable (`journal.sync`). The one definition: the config, the
/// persisters, the raw-disk probe and the benchmarks' flags all use it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SyncMode {
    /// A write followed by an `fdatasync` (linked SQEs under io_uring).
    Fdatasync,
    /// One write with `RWF_DSYNC`.
    RwfDsync,
}

/// Where and how the journal is written (`journal.persister`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum PersisterMode {
    /// io_uring driven from the node's runtime thread, woken by the ring's eventfd: no thread
    /// hand-off between receiving a batch and submitting its write, nor between its completion
    /// and the ack.
    Inline,
    /// io_uring on a thread of its own.
    Thread,
    /// `pwrite` + `fdatasync` (or `pwritev2(RWF_DSYNC)`) on a thread of its own: for kernels or
    /// sandboxes without io_uring.
    StdFs,
}

impl SyncMode {
    /// The value as written in `node.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Fdatasync => "fdatasync",
            SyncMode::RwfDsync => "rwf_dsync",
        }
    }
}

impl PersisterMode {
    /// The value as written in `node.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            PersisterMode::Inline => "inline",
            PersisterMode::Thread => "thread",
            PersisterMode::StdFs => "std_fs",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    pub file_bytes: u64,
    pub file_count: u32,
    pub inflight_groups_max: usize,
    /// `RWF_DSYNC` by default: measured on this project's reference disk (virtio, ext4,
    /// write-back cache) at one in flight, p50 105–136 µs against 175–220 µs for a write linked
    /// to an `fdatasync` (`sixfold-bench persist --sync …`); the raw probes agree in direction
    /// (90 µs against 102–127 µs). Re-measure on new hardware.
    pub sync: SyncMode,
    #[serde(default = "default_persister")]
    pub persister: PersisterMode,
}

/// Inline by default: measured on this project's 2-core reference machine, inline beat a
/// persister thread at every concurrency (`sixfold-bench append --persister …`, 4 s runs):
/// p50 at 1 in flight 249–256 µs against 282–297 µs, 37.8k against 31.0k appends/s at 16 in
/// flight and 77.4k against 67.9k at 64. Re-measure on machines with many cores.
fn default_persister() -> PersisterMode {
    PersisterMode::Inline
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            file_bytes: 256 << 20,
            file_count: 8,
            inflight_groups_max: 4,
            sync: SyncMode::RwfDsync,
            persister: default_persister(),
        }
    }
}

/// `metrics_listen = "IP:PORT"`, with an error that names the key and shows an example.
fn metrics_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "metrics_listen = \"{text}\" is not an IP address and port; try \"127.0.0.1:9100\""
        ))
    })
}

impl NodeConfig {
    /// Parses and checks a configuration; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, String> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].lines().count().max(1));
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            format!("{origin}{at}: {}", e.message().trim().replace('\n', "; "))
        })?;
        config.check().map_err(|e| format!("{origin}: {e}"))?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn check(&self) -> Result<(), String> {
        let j = &self.journal;
        let align = crate::io::DIRECT_IO_ALIGN as u64;
        let group = crate::journal::format::GROUP_BYTES_MAX as u64;
        if !j.file_bytes.is_multiple_of(align) || j.file_bytes < group {
            return Err(format!(
                "journal.file_bytes = {} must be a multiple of {align} and at least {group} \
                 (one full block group); try 268435456",
                j.file_bytes
            ));
        }
        if j.file_count == 0 {
            return Err("journal.file_count must be at least 1; try 8".into());
        }
        if j.inflight_groups_max == 0 || j.inflight_groups_max > INFLIGHT_GROUPS_MAX {
            return Err(format!(
                "journal.inflight_groups_max = {} must be between 1 and {INFLIGHT_GROUPS_MAX}",
                j.inflight_groups_max
            ));
        }
        if !(10..=60_000).contains(&self.gossip.poll_interval_ms) {
            return Err(format!(
                "gossip.poll_interval_ms = {} must be between 10 and 60000; try 500",
                self.gossip.poll_interval_ms
            ));
        }
        let scrub = &self.scrub;
        if !(10..=3_600_000).contains(&scrub.interval_ms) {
            return Err(format!(
                "scrub.interval_ms = {} must be between 10 and 3600000; try 1000",
                scrub.interval_ms
            ));
        }
        if !(1..=4096).contains(&scrub.pages_per_round)
            || !(1..=65536).contains(&scrub.records_per_round)
        {
            return Err(format!(
                "scrub.pages_per_round = {} must be 1..=4096 and scrub.records_per_round = {} \
                 1..=65536; try 32 and 512",
                scrub.pages_per_round, scrub.records_per_round
            ));
        }
        if let Err(e) = self.backpressure.throttle_config().check() {
            return Err(format!(
                "[backpressure] {e}; the defaults are journal_percent = {}, backlog_records = \
                 {}, ack_delay_min_ms = 1, ack_delay_max_ms = 10",
                ThrottleConfig::JOURNAL_PERCENT_DEFAULT,
                ThrottleConfig::BACKLOG_RECORDS_DEFAULT
            ));
        }
        if self.name.is_empty() {
            return Err("name must not be empty: use the node's certificate name".into());
        }
        self.backup.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses() {
        let c = NodeConfig::parse(DEFAULT_CONFIG, "default").unwrap();
        assert_eq!(c.segments.len(), 1);
        assert_eq!(c.journal.sync, SyncMode::RwfDsync);
        assert_eq!(c.journal.persister, PersisterMode::Inline);
        assert!(!c.background.paused);
    }

    /// Goal: `[background] paused` parses, defaults to false when the table or the key is
    /// missing, and a misspelt key is one line naming it.
    /// Method: the default config with the table changed, removed and misspelt.
    #[test]
    fn background_paused_parses_and_defaults_to_false() {
        let text = DEFAULT_CONFIG.replace("paused = false", "paused = true");
        assert!(
            NodeConfig::parse(&text, "node.toml")
                .unwrap()
                .background
                .paused
        );
        let text = DEFAULT_CONFIG.replace("paused = false", "");
        assert!(
            !NodeConfig::parse(&text, "node.toml")
                .unwrap()
                .background
                .paused
        );
        let text = DEFAULT_CONFIG
            .replace("[background]", "")
            .replace("paused = false", "");
        assert!(
            !NodeConfig::parse(&text, "node.toml")
                .unwrap()
                .background
                .paused
        );
        let text = DEFAULT_CONFIG.replace("paused = false", "pause = true");
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("pause"), "{e}");
    }

    /// Goal: each choice has one spelling, shared by `node.toml`, `as_str` and the command-line
    /// flags, and a bad value is one line naming the key's allowed values.
    /// Method: parse every value through the config, compare with `as_str`; parse a bad one.
    #[test]
    fn each_choice_parses_from_its_own_name() {
        for sync in [SyncMode::Fdatasync, SyncMode::RwfDsync] {
            let text = DEFAULT_CONFIG.replace("\"rwf_dsync\"", &format!("\"{}\"", sync.as_str()));
            let c = NodeConfig::parse(&text, "node.toml").unwrap();
            assert_eq!(c.journal.sync, sync);
            let flag = <SyncMode as clap::ValueEnum>::from_str(sync.as_str(), false).unwrap();
            assert_eq!(flag, sync);
        }
        for mode in [
            PersisterMode::Inline,
            PersisterMode::Thread,
            PersisterMode::StdFs,
        ] {
            let text = DEFAULT_CONFIG.replace("\"inline\"", &format!("\"{}\"", mode.as_str()));
            let c = NodeConfig::parse(&text, "node.toml").unwrap();
            assert_eq!(c.journal.persister, mode);
            let flag = <PersisterMode as clap::ValueEnum>::from_str(mode.as_str(), false).unwrap();
            assert_eq!(flag, mode);
        }
        let text = DEFAULT_CONFIG.replace("\"inline\"", "\"sideways\"");
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("sideways") && e.contains("std_fs"), "{e}");
    }

    /// Goal: without a `[backup]` table backup is off with the documented defaults; a full
    /// table parses; each bad value, plain http without `allow_http` and an unknown key are
    /// refused with one line naming the key and the fix.
    /// Method: the default config with `[backup]` tables appended.
    #[test]
    fn backup_table_defaults_and_errors() {
        let c = NodeConfig::parse(DEFAULT_CONFIG, "node.toml").unwrap();
        assert_eq!(c.backup, BackupSettings::default());
        assert_eq!(c.backup.target(), Ok(None));
        assert!(c.backup.path_style && !c.backup.allow_http);
        assert_eq!(c.backup.region, "us-east-1");
        assert_eq!(c.backup.log_bytes, 4 << 20);
        assert_eq!(c.backup.log_interval_ms, 1000);
        assert_eq!(c.backup.snapshot_interval_s, 300);
        assert_eq!(c.backup.lag_bytes_max, 1 << 30);
        assert_eq!(c.backup.request_timeout_ms, 30_000);

        let backup = |table: &str| {
            NodeConfig::parse(
                &format!("{DEFAULT_CONFIG}\n[backup]\n{table}\n"),
                "node.toml",
            )
        };
        let c = backup(
            "url = \"s3://sixfold/prod/backups/\"\nendpoint = \"http://127.0.0.1:9000\"\n\
             allow_http = true\naccess_key_id = \"minio\"\nsecret_access_key = \"minio123\"",
        )
        .unwrap();
        let target = BackupTarget::S3 {
            bucket: "sixfold".into(),
            prefix: "prod/backups".into(),
        };
        assert_eq!(c.backup.target(), Ok(Some(target)));
        assert!(!format!("{c:?}").contains("minio123"));
        let c = backup("url = \"file:///var/lib/sixfold/backup\"").unwrap();
        let dir = PathBuf::from("/var/lib/sixfold/backup");
        assert_eq!(c.backup.target(), Ok(Some(BackupTarget::Local { dir })));

        let refused = [
            (
                "url = \"s3://sixfold\"\nendpoint = \"http://minio:9000\"",
                "set allow_http = true",
            ),
            (
                "url = \"s3://sixfold\"\nendpoint = \"minio:9000\"",
                "backup.endpoint",
            ),
            ("url = \"file://relative/dir\"", "absolute directory"),
            ("url = \"gs://bucket\"", "neither file:// nor s3://"),
            ("url = \"s3://Bad_Bucket\"", "not a valid S3 bucket name"),
            ("url = \"s3://sixfold/a//b\"", "not a valid object path"),
            (
                "url = \"s3://sixfold\"\naccess_key_id = \"x\"",
                "go together",
            ),
            ("log_bytes = 10", "backup.log_bytes = 10 must be between"),
            ("request_timeout_ms = 0", "backup.request_timeout_ms"),
            ("lag_bytes_max = 1048576", "at least backup.log_bytes"),
            ("bucket = \"sixfold\"", "unknown field `bucket`"),
        ];
        for (table, expected) in refused {
            let e = backup(table).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            assert!(e.contains(expected), "{table}: {e}");
        }
    }

    #[test]
    fn bad_config_is_one_line_naming_the_problem() {
        let text = DEFAULT_CONFIG.replace("listen = \"127.0.0.1:7100\"", "listen = \"nowhere\"");
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let text = DEFAULT_CONFIG.replace("file_count = 8", "file_count = 0");
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(e.contains("journal.file_count"), "{e}");
        let text = DEFAULT_CONFIG.replace("# metrics_listen", "metrics_listen");
        let c = NodeConfig::parse(&text, "node.toml").unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert!(
            NodeConfig::parse(DEFAULT_CONFIG, "node.toml")
                .unwrap()
                .metrics_listen
                .is_none()
        );
        let text = DEFAULT_CONFIG.replace(
            "# metrics_listen = \"127.0.0.1:9100\"",
            "metrics_listen = \"localhost\"",
        );
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("metrics_listen = \"localhost\" is not an IP address and port"),
            "{e}"
        );
        let text = format!("{DEFAULT_CONFIG}\n[backpressure]\nack_delay_max_ms = 5000\n");
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("[backpressure]") && e.contains("5s"), "{e}");
        let text = format!("{DEFAULT_CONFIG}\n[backpressure]\njournal_percent = 0\n");
        let c = NodeConfig::parse(&text, "node.toml").unwrap();
        assert_eq!(c.backpressure.throttle_config().journal_percent, 0);
        assert_eq!(
            c.backpressure.backlog_records,
            ThrottleConfig::BACKLOG_RECORDS_DEFAULT
        );
        let text = format!("{DEFAULT_CONFIG}\nbogus = 1\n");
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }
}
