//! Certificates made for the tests (rcgen), none committed: a CA that
//! issues server and client certificates into a temporary directory.

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};

/// A CA that signs server and client certificates into a temporary directory.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        Ca { issuer: Issuer::new(params, key), dir: dir.to_path_buf(), name: name.to_string() }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}.crt", self.name))
    }

    /// Issues a certificate for `names`; returns (cert, key) paths.
    pub fn issue(
        &self,
        file: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        self.issue_for(file, names, vec![usage], expired)
    }

    fn issue_for(
        &self,
        file: &str,
        names: &[&str],
        usages: Vec<ExtendedKeyUsagePurpose>,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, file);
        params.extended_key_usages = usages;
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (self.dir.join(format!("{file}.crt")), self.dir.join(format!("{file}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    pub fn server(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.issue(file, names, ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    /// A server's peer certificate: it serves and dials forwarded calls with it.
    pub fn peer(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let both = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_for(file, names, both, false)
    }

    pub fn client(&self, file: &str) -> (PathBuf, PathBuf) {
        self.issue(file, &["edge-1"], ExtendedKeyUsagePurpose::ClientAuth, false)
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("tunnel-tls-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
