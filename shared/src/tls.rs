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

/// Largest PEM file read (a long chain is tens of KiB).
const MAX_PEM_FILE: u64 = 1 << 20;

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::units::read_bounded(path, MAX_PEM_FILE).map_err(|e| err(path, format!("cannot read: {e}")))
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

/// Certificates by server name: the most specific match (an exact name, then
/// the longest wildcard suffix; the earlier entry on a tie), else the first.
#[derive(Debug)]
struct SniCerts {
    entries: Vec<(Vec<HostPattern>, Arc<CertifiedKey>)>,
}

/// How closely a pattern names a host: exact beats any wildcard, a longer
/// wildcard suffix beats a shorter one.
fn specificity(p: &HostPattern) -> usize {
    match p {
        HostPattern::Exact(_) => usize::MAX,
        HostPattern::Wildcard(suffix) => suffix.len(),
        HostPattern::Any => 0,
    }
}

impl SniCerts {
    fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let mut best: Option<(usize, &Arc<CertifiedKey>)> = None;
        if let Some(name) = server_name.map(normalize_host) {
            for (hosts, key) in &self.entries {
                let score = hosts.iter().filter(|h| h.matches(&name)).map(specificity).max();
                if let Some(score) = score {
                    if best.is_none_or(|(b, _)| score > b) {
                        best = Some((score, key));
                    }
                }
            }
        }
        best.map(|(_, k)| k.clone()).or_else(|| self.entries.first().map(|(_, k)| k.clone()))
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

    /// The most specific pattern wins whatever the order; no match gets the first entry.
    #[test]
    fn sni_picks_the_most_specific_certificate() {
        let key = |n: u8| {
            let signer =
                provider().key_provider.load_private_key(PrivateKeyDer::Pkcs8(test_key().into())).expect("test key");
            Arc::new(CertifiedKey::new(vec![CertificateDer::from(vec![n])], signer))
        };
        let p = |s: &str| HostPattern::parse(s).expect("pattern");
        let certs = SniCerts {
            entries: vec![
                (vec![p("*.a.test")], key(1)),
                (vec![p("*.y.a.test")], key(2)),
                (vec![p("x.y.a.test"), p("b.test")], key(3)),
            ],
        };
        let leaf = |name: Option<&str>| certs.pick(name).expect("a certificate").cert[0].as_ref()[0];
        assert_eq!(leaf(Some("x.y.a.test")), 3, "exact beats wildcards");
        assert_eq!(leaf(Some("z.y.a.test")), 2, "the longer wildcard beats the shorter");
        assert_eq!(leaf(Some("q.a.test")), 1);
        assert_eq!(leaf(Some("B.TEST.")), 3, "names are normalised");
        assert_eq!(leaf(Some("other.test")), 1, "no match: the first entry");
        assert_eq!(leaf(None), 1, "no SNI: the first entry");
    }

    /// A P-256 PKCS#8 key made with openssl for this test only (not a secret).
    fn test_key() -> Vec<u8> {
        let pem = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgwIsklcZtBBhph+vc\n\
e/ksdBLyajTr8qRudJDLHTlxJrGhRANCAASli7kYcqZjXwibc1mckZk1ZWhwtBZv\n\
eYy19Zs3t0KazlEjM56ihrAFQPbqg1msnsNiVnUQny8W6JXESwKtP9wQ\n\
-----END PRIVATE KEY-----\n";
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).map(|k| k.secret_der().to_vec()).expect("test key parses")
    }

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
