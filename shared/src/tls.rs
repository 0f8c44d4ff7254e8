//! TLS material for both daemons: PEM files read into rustls settings with
//! errors that name the file, the tunnel link's server settings (TLS, or
//! mTLS with a client CA), and the HTTPS ingress's certificates, chosen by
//! SNI with the same host patterns as the rules.

use crate::rules::{normalize_host, HostPattern};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::path::Path;
use std::sync::Arc;
pub use tokio_rustls::rustls;

/// ALPN protocol ids.
pub const ALPN_H2: &[u8] = b"h2";
/// HTTP/1.1's ALPN id.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A TLS file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    /// The file at fault.
    pub path: String,
    pub message: String,
}

fn err(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError { path: path.display().to_string(), message: message.into() }
}

/// The crypto provider both daemons use (ring, as tonic's TLS).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))
}

/// The certificates of a PEM file (a chain, leaf first, or CA roots).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(err(path, "no certificate in it (expected -----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| err(path, format!("no usable PEM private key in it: {e}")))
}

/// A certificate chain with its key, checked to belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certs(cert)?;
    let der = read_key(key)?;
    let signer =
        provider().key_provider.load_private_key(der).map_err(|e| err(key, format!("unusable private key: {e}")))?;
    let pair = CertifiedKey::new(chain, signer);
    match pair.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(pair)),
        Err(e) => Err(err(key, format!("does not belong to the certificate in {}: {e}", cert.display()))),
    }
}

/// The roots of a CA file, to verify peers with.
pub fn root_store(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c).map_err(|e| err(ca, format!("unusable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The tunnel link's server side: HTTP/2 only, and with `client_ca` the
/// clients must present a certificate it signed (mTLS).
pub fn link_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pair = certified_key(cert, key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(cert, e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider())
                .build()
                .map_err(|e| err(ca, format!("unusable client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(SniCerts { entries: vec![(Vec::new(), pair)] }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// The HTTPS ingress: each certificate serves the host patterns it lists;
/// the first is the default for names that match none (or no SNI at all).
/// ALPN offers h2 and http/1.1.
pub fn ingress_server_config(
    certs: &[(Vec<HostPattern>, &Path, &Path)],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut entries = Vec::with_capacity(certs.len());
    for (hosts, cert, key) in certs {
        entries.push((hosts.clone(), certified_key(cert, key)?));
    }
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError { path: String::new(), message: e.to_string() })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniCerts { entries }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(Arc::new(cfg))
}

/// Certificates by server name: the first whose patterns match, else the first.
#[derive(Debug)]
struct SniCerts {
    entries: Vec<(Vec<HostPattern>, Arc<CertifiedKey>)>,
}

impl SniCerts {
    fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let by_name = server_name.map(normalize_host).and_then(|name| {
            self.entries.iter().find(|(hosts, _)| hosts.iter().any(|h| h.matches(&name))).map(|(_, k)| k.clone())
        });
        by_name.or_else(|| self.entries.first().map(|(_, k)| k.clone()))
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let e = read_certs(Path::new("/nonexistent/tunnel.crt")).expect_err("missing");
        assert_eq!(e.path, "/nonexistent/tunnel.crt");
        assert!(e.message.starts_with("cannot read"), "{e}");
    }

    #[test]
    fn a_file_without_pem_is_refused() {
        let dir = std::env::temp_dir().join(format!("tunnel-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let f = dir.join("empty.crt");
        std::fs::write(&f, "not a certificate\n").expect("write");
        let e = read_certs(&f).expect_err("no PEM");
        assert!(e.message.starts_with("no certificate"), "{e}");
        let e = read_key(&f).expect_err("no PEM");
        assert!(e.message.starts_with("no usable PEM private key"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
