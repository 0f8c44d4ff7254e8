//! `[[certificates]]`: the HTTPS ingress's certificates, chosen by SNI.

use crate::config::source::{ConfigError, Source};
use crate::config::tls::tls_error;
use crate::rules::HostPattern;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use toml::Spanned;

/// A `[[certificates]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CertificateSection {
    hosts: Spanned<Vec<String>>,
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
}

/// One `[[certificates]]` entry of the HTTPS ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressCert {
    /// Server names it serves: `example.com` or `*.example.com`.
    pub hosts: Vec<HostPattern>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Checks the entries (their files are read now) and that they come with
/// `[server] https_listen`, and it with them: either alone serves nothing.
pub(super) fn check(
    src: &Source,
    raw: &[CertificateSection],
    https_listen: Option<&Spanned<SocketAddr>>,
) -> Result<Vec<IngressCert>, ConfigError> {
    let mut certificates = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        let key = |k: &str| format!("certificates[{i}].{k}");
        if c.hosts.get_ref().is_empty() {
            return Err(src.at(&c.hosts, key("hosts"), "lists no host; e.g. [\"*.example.com\", \"example.com\"]"));
        }
        let hosts = c
            .hosts
            .get_ref()
            .iter()
            .map(|h| HostPattern::parse(h).map_err(|m| src.at(&c.hosts, key("hosts"), format!("{h:?}: {m}"))))
            .collect::<Result<Vec<_>, _>>()?;
        crate::tls::certified_key(c.cert.get_ref(), c.key.get_ref())
            .map_err(|e| tls_error(src, e, (&c.cert, &key("cert")), (&c.key, &key("key"))))?;
        certificates.push(IngressCert { hosts, cert: c.cert.get_ref().clone(), key: c.key.get_ref().clone() });
    }
    match (https_listen, raw.first()) {
        (Some(a), None) => Err(src.at(a, "server.https_listen", "needs at least one [[certificates]] entry to serve")),
        (None, Some(first)) => {
            Err(src.at(&first.hosts, "certificates[0]", "certificates are for HTTPS: set server.https_listen"))
        }
        _ => Ok(certificates),
    }
}
