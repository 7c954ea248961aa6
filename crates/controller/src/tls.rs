//! Certificates and TLS settings of the agent↔controller channel.
//!
//! A small private CA ([`init_ca`]) signs every leaf ([`issue`]): the
//! controller's server certificate and one client certificate per host whose
//! common name is the host name. The server asks every client for a
//! certificate but also lets token-carrying API clients in without one; the
//! agents' endpoints then check that a certificate was presented, chained to
//! the CA, and that its CN ([`common_name`]) is the host in the URL.
//!
//! Files in a CA directory: `ca.pem`, `ca.key`, and `NAME.pem` / `NAME.key`
//! per leaf. Keys are ECDSA P-256 and written mode 0600.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use palisade_api::tls::{load_certs, load_key, provider, roots};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;

/// Making or loading certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A CA already exists where `init` was asked to make one.
    #[error("{0} already exists; refusing to overwrite a CA")]
    Exists(PathBuf),
    /// A certificate or key could not be loaded.
    #[error(transparent)]
    Load(#[from] palisade_api::tls::TlsError),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

const CA_CN: &str = "Palisade CA";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_secret(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

/// Create a CA in `dir` (`ca.pem`, `ca.key`).
pub fn init_ca(dir: &Path) -> Result<PathBuf, TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join("ca.pem");
    if cert_path.exists() {
        return Err(TlsError::Exists(cert_path));
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write_secret(&dir.join("ca.key"), &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok(cert_path)
}

/// Issue a leaf certificate `NAME.pem`/`NAME.key` in `dir`, signed by its CA.
/// Every leaf can authenticate as a client (CN = `name`); `server` adds the
/// server purpose, with `name` and `ips` as subject alternative names.
pub fn issue(dir: &Path, name: &str, server: bool, ips: &[IpAddr]) -> Result<(PathBuf, PathBuf), TlsError> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(TlsError::Config(format!(
            "name \"{name}\" must be letters, digits, '-', '_' or '.'"
        )));
    }
    let ca_key_path = dir.join("ca.key");
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    // Re-creating the CA certificate from the same name and key gives an issuer
    // identical to the stored one (rcgen only needs its name and key to sign).
    let ca = ca_params()?.self_signed(&ca_key)?;
    let mut p = CertificateParams::new(vec![name.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if server {
        p.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    let (cp, kp) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    write_secret(&kp, &key.serialize_pem())?;
    std::fs::write(&cp, cert.pem()).map_err(io(&cp))?;
    Ok((cp, kp))
}

/// The server side: `cert`/`key` as identity, client certificates optional but verified against `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let (body, rest) = rest.split_at(len);
    Some((tag, body, rest))
}

/// The subject common name of a DER certificate; `None` if it has none or is malformed.
///
/// Only certificates that rustls already verified against the CA get here, but
/// the walk is still bounds-checked at every step, never trusting a length.
pub fn common_name(cert: &[u8]) -> Option<String> {
    const SEQ: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    let (SEQ, certificate, _) = der(cert)? else { return None };
    let (SEQ, mut tbs, _) = der(certificate)? else {
        return None;
    };
    // Skip the optional explicit version [0], then serial, signature algorithm, issuer, validity.
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs)?.2;
    }
    for _ in 0..4 {
        tbs = der(tbs)?.2;
    }
    let (SEQ, mut subject, _) = der(tbs)? else { return None };
    while !subject.is_empty() {
        let (tag, mut rdn, rest) = der(subject)?;
        subject = rest;
        if tag != SET {
            return None;
        }
        while !rdn.is_empty() {
            let (SEQ, atv, rest) = der(rdn)? else { return None };
            rdn = rest;
            let (0x06, oid, value) = der(atv)? else { return None };
            if oid == OID_CN {
                let (_, text, _) = der(value)?;
                return String::from_utf8(text.to_vec()).ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_leaves_whose_cn_is_the_name() {
        let dir = std::env::temp_dir().join(format!("palisade-ctl-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init_ca(&dir).unwrap();
        assert!(matches!(init_ca(&dir), Err(TlsError::Exists(_))));
        let (cert, key) = issue(&dir, "hv1", false, &[]).unwrap();
        let der = load_certs(&cert).unwrap();
        assert_eq!(common_name(&der[0]).as_deref(), Some("hv1"));
        assert_eq!(
            common_name(&load_certs(&dir.join("ca.pem")).unwrap()[0]).as_deref(),
            Some(CA_CN)
        );
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        issue(&dir, "ctl", true, &["127.0.0.1".parse().unwrap()]).unwrap();
        server_config(&dir.join("ca.pem"), &dir.join("ctl.pem"), &dir.join("ctl.key")).unwrap();
        palisade_api::tls::client_config(&dir.join("ca.pem"), Some((&cert, &key))).unwrap();
        assert!(issue(&dir, "../evil", false, &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn common_name_survives_garbage() {
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[0x30, 0x02, 0x30, 0x00]), None);
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(0x30)).collect();
            let _ = common_name(&junk);
        }
    }
}
