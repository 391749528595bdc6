//! The backup object store (`node::backup::store`) against a real S3 server: s3s-fs in this
//! process (`tools::s3server`), SigV4 enforced, over HTTP on loopback; and against a local
//! directory. Round trips, the start-up probe, each failure class with its one-line message,
//! and a server that stops and comes back while a put is retrying.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use node::backup::store::{BackupError, BackupStore};
use node::config::BackupSettings;
use tools::s3server::S3Server;

/// `[backup]` pointing at `server`, prefix `backups`.
fn settings(server: &S3Server) -> BackupSettings {
    BackupSettings {
        url: Some(format!("s3://{}/backups", server.bucket())),
        endpoint: Some(server.endpoint()),
        allow_http: true,
        access_key_id: Some(server.access_key().into()),
        secret_access_key: Some(server.secret_key().into()),
        request_timeout_ms: 10_000,
        ..BackupSettings::default()
    }
}

/// A store from `settings`, with an empty environment (credentials come from the settings).
fn store(settings: &BackupSettings) -> BackupStore {
    BackupStore::from_settings_with_env(settings, |_| None)
        .unwrap()
        .expect("backup is on")
}

/// The error's text, checked to be one line (and shown by `--nocapture`).
fn assert_one_line(e: &BackupError) -> String {
    let text = e.to_string();
    eprintln!("{text}");
    assert!(!text.contains('\n'), "{text}");
    text
}

/// Checks put, get, list, overwrite, delete and put-if-absent through `store`; the objects
/// land in `files` (the directory that holds the store's prefix) as files.
async fn round_trip(store: &BackupStore, files: &Path) {
    let objects = [
        ("vol-1/pg-0/log/1-10", "first"),
        ("vol-1/pg-0/log/11-20", "second range"),
        ("vol-1/pg-1/log/1-5", "pg one"),
        ("vol-1/pg-10/log/1-5", "pg ten"),
    ];
    for (name, body) in objects {
        store.put(name, Bytes::from(body)).await.unwrap();
    }
    assert!(files.join("vol-1/pg-0/log/11-20").is_file());
    assert_eq!(store.get("vol-1/pg-0/log/1-10").await.unwrap(), "first");
    let listed = store.list("vol-1/pg-0/log").await.unwrap();
    assert_eq!(
        listed,
        vec![
            ("vol-1/pg-0/log/1-10".into(), 5),
            ("vol-1/pg-0/log/11-20".into(), 12)
        ]
    );
    // Segments, not characters: pg-1 does not list pg-10.
    let listed = store.list("vol-1/pg-1").await.unwrap();
    assert_eq!(listed, vec![("vol-1/pg-1/log/1-5".into(), 6)]);
    assert_eq!(store.list("").await.unwrap().len(), 4);
    assert!(store.list("vol-2").await.unwrap().is_empty());

    store
        .put("vol-1/pg-0/log/1-10", Bytes::from("replaced"))
        .await
        .unwrap();
    assert_eq!(store.get("vol-1/pg-0/log/1-10").await.unwrap(), "replaced");

    store.delete("vol-1/pg-0/log/1-10").await.unwrap();
    store.delete("vol-1/pg-0/log/1-10").await.unwrap(); // deleting nothing succeeds
    let e = store.get("vol-1/pg-0/log/1-10").await.unwrap_err();
    assert!(matches!(e, BackupError::NotFound { .. }), "{e:?}");
    assert!(assert_one_line(&e).contains("vol-1/pg-0/log/1-10"), "{e}");
    assert!(!e.is_transient());
    assert_eq!(store.list("").await.unwrap().len(), 3);

    assert!(
        store
            .put_if_absent("vol-1/manifest", Bytes::from("one"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_if_absent("vol-1/manifest", Bytes::from("two"))
            .await
            .unwrap()
    );
    assert_eq!(store.get("vol-1/manifest").await.unwrap(), "one");
}

/// Goal: objects written through the store are read, listed (by whole segments, sorted, with
/// sizes), replaced and deleted on a real S3 server, as files under the bucket and prefix;
/// a conditional put does not replace; the probe passes and leaves nothing behind.
/// Method: one S3Server, one store, every call checked.
#[tokio::test]
async fn s3_round_trip_and_probe() {
    let dir = common::test_dir("backup-s3-round-trip");
    let server = S3Server::start(&dir.join("s3")).unwrap();
    let store = store(&settings(&server));
    store.probe().await.unwrap();
    assert!(store.list("").await.unwrap().is_empty());
    round_trip(&store, &server.root().join(server.bucket()).join("backups")).await;
    drop(server);
    common::cleanup(&dir);
}

/// Goal: the `file://` form stores objects as files in the directory (created if missing),
/// with the same behaviour as S3.
/// Method: the round trip and the probe on a fresh directory.
#[tokio::test]
async fn local_directory_round_trip_and_probe() {
    let dir = common::test_dir("backup-local");
    let backups = dir.join("backups");
    let settings = BackupSettings {
        url: Some(format!("file://{}", backups.display())),
        ..BackupSettings::default()
    };
    let store = store(&settings);
    assert!(backups.is_dir());
    store.probe().await.unwrap();
    round_trip(&store, &backups).await;
    common::cleanup(&dir);
}

/// Goal: the server enforces SigV4: a request without a signature is refused.
/// Method: a raw, unsigned HTTP GET listing the bucket.
#[test]
fn server_refuses_unsigned_requests() {
    let dir = common::test_dir("backup-s3-unsigned");
    let server = S3Server::start(&dir.join("s3")).unwrap();
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "GET /{}?list-type=2 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.bucket(),
        server.addr()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert!(response.contains("AccessDenied"), "{response}");
    drop(server);
    common::cleanup(&dir);
}

/// Goal: a wrong secret or an unknown access key is the credentials class, and its line
/// names the endpoint and the keys to check.
/// Method: the probe with a bad secret, then with an unknown key.
#[tokio::test]
async fn bad_credentials_are_named() {
    let dir = common::test_dir("backup-s3-credentials");
    let server = S3Server::start(&dir.join("s3")).unwrap();
    let mut bad = settings(&server);
    bad.secret_access_key = Some("not-the-secret".into());
    let e = store(&bad).probe().await.unwrap_err();
    assert!(matches!(e, BackupError::Credentials { .. }), "{e:?}");
    let text = assert_one_line(&e);
    let expected = format!("the S3 credentials were refused by {}", server.endpoint());
    assert!(text.starts_with(&expected), "{text}");
    assert!(text.contains("SignatureDoesNotMatch"), "{text}");
    assert!(text.contains("AWS_SECRET_ACCESS_KEY") && !text.contains("not-the-secret"));
    assert!(!e.is_transient());

    bad.access_key_id = Some("nobody".into());
    let e = store(&bad).probe().await.unwrap_err();
    assert!(matches!(e, BackupError::Credentials { .. }), "{e:?}");
    assert_one_line(&e);
    drop(server);
    common::cleanup(&dir);
}

/// Goal: a bucket that does not exist is the missing-bucket class, for a put as for a list
/// (s3s-fs alone would create it on a put; the test server refuses as S3 does).
/// Method: the probe and a list against `s3://nosuchbucket`; the bucket stays absent.
#[tokio::test]
async fn missing_bucket_is_named() {
    let dir = common::test_dir("backup-s3-bucket");
    let server = S3Server::start(&dir.join("s3")).unwrap();
    let mut missing = settings(&server);
    missing.url = Some("s3://nosuchbucket/backups".into());
    let store = store(&missing);
    let e = store.probe().await.unwrap_err();
    assert!(matches!(e, BackupError::NoSuchBucket { .. }), "{e:?}");
    let expected = format!(
        "bucket nosuchbucket does not exist at {}",
        server.endpoint()
    );
    assert!(assert_one_line(&e).starts_with(&expected), "{e}");
    let e = store.list("").await.unwrap_err();
    assert!(matches!(e, BackupError::NoSuchBucket { .. }), "{e:?}");
    assert!(!server.root().join("nosuchbucket").exists());
    drop(server);
    common::cleanup(&dir);
}

/// Goal: an endpoint nobody listens on is the unreachable class, and the call returns (after
/// its retries) within its deadline instead of hanging.
/// Method: a port bound then released; a small request_timeout_ms.
#[tokio::test]
async fn unreachable_endpoint_is_named_and_bounded() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = BackupSettings {
        url: Some("s3://sixfold".into()),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        allow_http: true,
        access_key_id: Some("id".into()),
        secret_access_key: Some("secret".into()),
        request_timeout_ms: 1000,
        ..BackupSettings::default()
    };
    let e = store(&settings).probe().await.unwrap_err();
    assert!(matches!(e, BackupError::Unreachable { .. }), "{e:?}");
    let text = assert_one_line(&e);
    assert!(
        text.starts_with(&format!("cannot reach http://127.0.0.1:{port}: ")),
        "{text}"
    );
    assert!(e.is_transient());
}

/// Goal: a put issued while the server is down succeeds once it is back (object_store
/// retries connection errors with backoff), and the server serves the same data on the same
/// port after a restart; a call whose deadline passes while it is down is the unreachable
/// class.
/// Method: put, stop (the port then refuses connections), a short-deadline get fails, then a
/// put while another thread restarts the server after 1 s; both objects are read back.
#[tokio::test]
async fn put_survives_a_server_restart() {
    let dir = common::test_dir("backup-s3-restart");
    let mut server = S3Server::start(&dir.join("s3")).unwrap();
    let settings = settings(&server);
    let store = store(&settings);
    store.put("before", Bytes::from("before")).await.unwrap();

    server.stop().unwrap();
    assert!(TcpStream::connect(server.addr()).is_err());
    let impatient = BackupStore::from_settings_with_env(
        &BackupSettings {
            request_timeout_ms: 500,
            ..settings.clone()
        },
        |_| None,
    )
    .unwrap()
    .unwrap();
    let e = impatient.get("before").await.unwrap_err();
    assert!(matches!(e, BackupError::Unreachable { .. }), "{e:?}");
    assert_one_line(&e);

    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        server.restart().unwrap();
        server
    });
    store.put("during", Bytes::from("during")).await.unwrap();
    let server = restarter.join().unwrap();
    assert!(server.is_running());
    assert_eq!(store.get("before").await.unwrap(), "before");
    assert_eq!(store.get("during").await.unwrap(), "during");
    drop(server);
    common::cleanup(&dir);
}
