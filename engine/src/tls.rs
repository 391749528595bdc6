//! Mutual TLS for the engine's QUIC client: it trusts only the cluster CA and presents its own
//! CA-signed certificate.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol of every Sixfold connection (defined in `wire`, shared with the node).
pub use wire::ALPN;

/// Paths of the cluster CA and of this client's certificate and key.
#[derive(Clone, Debug)]
pub struct ClientIdentity {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl ClientIdentity {
    /// The files `sixfold certs` writes for `name` under `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key.pem")),
        }
    }
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} holds a malformed PEM certificate", path.display()))
}

/// A QUIC client configuration for `identity`; `None` as the certificate makes a client that
/// offers no certificate (tests use it to check that nodes refuse it).
pub fn client_config(
    ca: &Path,
    cert_and_key: Option<(&Path, &Path)>,
) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .with_context(|| format!("{} is not a usable CA", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 unavailable")?
        .with_root_certificates(roots);
    let mut tls = match cert_and_key {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                load_certs(cert)?,
                PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("cannot read a private key from {}", key.display()))?,
            )
            .with_context(|| format!("{} does not match {}", key.display(), cert.display()))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // A node that stops answering is noticed within seconds: the quorum routes around it.
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(5)).expect("small timeout"),
    ));
    // MTU discovery up to jumbo frames, as on the node side.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(wire::JUMBO_UDP_PAYLOAD_BYTES);
    transport.mtu_discovery_config(Some(mtu));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A client endpoint on an ephemeral loopback-or-any port, using `identity`.
pub fn client_endpoint(identity: &ClientIdentity) -> anyhow::Result<quinn::Endpoint> {
    let config = client_config(&identity.ca, Some((&identity.cert, &identity.key)))?;
    endpoint_with(config)
}

/// A client endpoint with an explicit configuration.
pub fn endpoint_with(config: quinn::ClientConfig) -> anyhow::Result<quinn::Endpoint> {
    let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid address"))
        .context("cannot bind a UDP socket for QUIC")?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
