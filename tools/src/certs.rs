//! `sixfold certs`: a cluster CA and certificates signed by it (rcgen). Every node and engine
//! certificate can serve and connect (server and client auth), names its holder and
//! `localhost`, and covers 127.0.0.1 so local clusters work out of the box.
//!
//! Each certificate carries its holder's role as a subject alternative name URI
//! (`urn:sixfold:role:engine` or `urn:sixfold:role:node`, see `node::tls`): the CA's signature
//! covers it, and nodes accept writes, fences, truncations and segment assignments only from
//! engine certificates, and gossip only from node certificates.
//!
//! Files under the output directory: `ca.pem`, `ca.key.pem`, and `NAME.pem` + `NAME.key.pem`
//! for every node and engine. An existing CA there is reused, so certificates can be added
//! to a cluster later.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use wire::Role;

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Sixfold cluster CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Loads the CA under `out`, or creates one.
fn ca_issuer(out: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let (cert_path, key_path) = (out.join("ca.pem"), out.join("ca.key.pem"));
    if cert_path.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path)?)
            .with_context(|| format!("{} is not a private key", key_path.display()))?;
        // Our CAs are always made from `ca_params()`, so the same parameters and key sign
        // certificates that chain to the stored CA certificate.
        return Ok(Issuer::new(ca_params(), key));
    }
    let key = KeyPair::generate()?;
    let params = ca_params();
    let cert = params.self_signed(&key)?;
    std::fs::write(&cert_path, cert.pem())?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok(Issuer::new(params, key))
}

/// Creates (or reuses) the CA under `out`, a node certificate for each of `nodes` and an
/// engine certificate for each of `engines`.
pub fn generate(out: &Path, nodes: &[String], engines: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let issuer = ca_issuer(out)?;
    let named = nodes
        .iter()
        .map(|n| (n, Role::Node))
        .chain(engines.iter().map(|e| (e, Role::Engine)));
    for (name, role) in named {
        issue(out, &issuer, name, role)?;
    }
    Ok(())
}

/// Writes `NAME.pem` and `NAME.key.pem`: a certificate for `name` granting `role`.
fn issue(
    out: &Path,
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    role: Role,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
        "certificate name {name:?} must be letters, digits, '-' or '.'"
    );
    let mut params = CertificateParams::new(vec![name.to_string(), "localhost".to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let uri = node::tls::role_uri(role).try_into()?;
    params.subject_alt_names.push(SanType::URI(uri));
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    std::fs::write(out.join(format!("{name}.pem")), cert.pem())?;
    write_private(&out.join(format!("{name}.key.pem")), &key.serialize_pem())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    /// Goal: node and engine certificates carry their role where the node reads it.
    /// Method: issue one of each, read each back with the node's own parser.
    #[test]
    fn certificates_carry_their_role() {
        let dir = std::env::temp_dir().join(format!("sixfold-certs-{}", std::process::id()));
        generate(&dir, &["node1".into()], &["engine".into()]).unwrap();
        for (name, role) in [("node1", Role::Node), ("engine", Role::Engine)] {
            let cert = CertificateDer::from_pem_file(dir.join(format!("{name}.pem"))).unwrap();
            assert_eq!(node::tls::role_of_certificate(&cert), Some(role), "{name}");
        }
        let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
        assert_eq!(
            node::tls::role_of_certificate(&ca),
            None,
            "the CA grants nothing"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
