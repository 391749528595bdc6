//! Mutual TLS for the node's QUIC server: the node presents its certificate, and every client
//! must present one signed by the cluster CA, or the handshake fails. The certificate also says
//! what its holder may do: `sixfold certs` puts exactly one role URI among its subject
//! alternative names (`urn:sixfold:role:engine` or `urn:sixfold:role:node`), which the CA's
//! signature covers.
//!
//! Invariant: a connection has a role only if its verified leaf certificate names exactly one
//! known role; no role URI, an unknown one or two different ones all mean no role (and the core
//! refuses every request that needs one).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol of every Sixfold connection (defined in `wire`, shared with the engine).
pub use wire::ALPN;
use wire::{JUMBO_UDP_PAYLOAD_BYTES, Role};

/// What a role URI starts with; the role's name follows.
pub const ROLE_URI_PREFIX: &str = "urn:sixfold:role:";

/// The subject alternative name URI that grants `role`.
pub fn role_uri(role: Role) -> String {
    format!("{ROLE_URI_PREFIX}{}", role.as_str())
}

/// The role a DER certificate grants, if it names exactly one known role.
pub fn role_of_certificate(der: &[u8]) -> Option<Role> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut found = None;
    for name in &san.value.general_names {
        let x509_parser::extensions::GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) else {
            continue;
        };
        let role = match role {
            "engine" => Role::Engine,
            "node" => Role::Node,
            _ => return None,
        };
        if found.is_some_and(|f| f != role) {
            return None;
        }
        found = Some(role);
    }
    found
}

/// The role of a connection's peer: its leaf certificate's (verified at the handshake).
pub fn peer_role(connection: &quinn::Connection) -> Option<Role> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    role_of_certificate(chain.first()?)
}

pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} holds a malformed PEM certificate", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a private key from {}", path.display()))
}

/// The root store holding just the cluster CA.
pub fn roots(ca: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .with_context(|| format!("{} is not a usable CA certificate", ca.display()))?;
    }
    Ok(roots)
}

/// A QUIC server configuration that requires a client certificate signed by `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca)?),
        provider.clone(),
    )
    .build()
    .context("cannot build the client-certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 unavailable")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .with_context(|| format!("{} does not match {}", key.display(), cert.display()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let transport = Arc::get_mut(&mut config.transport).expect("fresh transport config");
    transport.max_concurrent_bidi_streams(1024u32.into());
    // Let MTU discovery reach jumbo frames (bare-metal clusters run 9000-byte MTUs, loopback
    // more): a 4 KiB record then travels in one datagram instead of three.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(JUMBO_UDP_PAYLOAD_BYTES);
    transport.mtu_discovery_config(Some(mtu));
    transport.max_concurrent_uni_streams(0u32.into());
    Ok(config)
}
