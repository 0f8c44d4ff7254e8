//! The TLS sections: `[server.tls]` of server.toml and `[tls]` of
//! client.toml. Their files are read and checked when the config is, so that
//! a wrong path or a key that does not belong to its certificate fails
//! `--check` and a reload, not the first connection.

use super::source::{ConfigError, Source};
use crate::tls::rustls;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use toml::Spanned;

/// `[server.tls]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LinkTlsSection {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
    client_ca: Option<Spanned<PathBuf>>,
}

/// `[server.tls]`: TLS (and with `client_ca`, mTLS) on the tunnel link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTls {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl LinkTls {
    /// The rustls server settings, read from the files now.
    pub fn load(&self) -> Result<Arc<crate::tls::rustls::ServerConfig>, crate::tls::TlsError> {
        crate::tls::link_server_config(&self.cert, &self.key, self.client_ca.as_deref())
    }
}

/// Checks a `[server.tls]` section: the files exist, parse and belong together.
pub(super) fn check_link_tls(src: &Source, t: &LinkTlsSection) -> Result<LinkTls, ConfigError> {
    let tls = LinkTls {
        cert: t.cert.get_ref().clone(),
        key: t.key.get_ref().clone(),
        client_ca: t.client_ca.as_ref().map(|c| c.get_ref().clone()),
    };
    if let Some(ca) = &t.client_ca {
        crate::tls::root_store(ca.get_ref()).map_err(|e| src.at(ca, "server.tls.client_ca", e.to_string()))?;
    }
    crate::tls::certified_key(&tls.cert, &tls.key)
        .map_err(|e| tls_error(src, e, (&t.cert, "server.tls.cert"), (&t.key, "server.tls.key")))?;
    Ok(tls)
}

/// `[tls]` of client.toml as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClientTlsSection {
    ca: Option<Spanned<PathBuf>>,
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
    server_name: Option<Spanned<String>>,
}

/// `[tls]` of client.toml: how to verify the server, and our certificate for mTLS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientTls {
    /// Trust this CA; None = the system's roots.
    pub ca: Option<PathBuf>,
    /// Our certificate chain and key, for servers that require mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify, when it differs from the server URL's host.
    pub server_name: Option<String>,
}

/// Checks client.toml's `[tls]`: files that exist and parse, cert with key.
pub(super) fn check_client_tls(src: &Source, t: &ClientTlsSection) -> Result<ClientTls, ConfigError> {
    if let Some(ca) = &t.ca {
        crate::tls::root_store(ca.get_ref()).map_err(|e| src.at(ca, "tls.ca", e.to_string()))?;
    }
    match (&t.cert, &t.key) {
        (Some(c), Some(k)) => {
            crate::tls::certified_key(c.get_ref(), k.get_ref())
                .map_err(|e| tls_error(src, e, (c, "tls.cert"), (k, "tls.key")))?;
        }
        (Some(c), None) => return Err(src.at(c, "tls.cert", "needs tls.key too")),
        (None, Some(k)) => return Err(src.at(k, "tls.key", "needs tls.cert too")),
        (None, None) => {}
    }
    if let Some(n) = &t.server_name {
        if rustls::pki_types::ServerName::try_from(n.get_ref().as_str()).is_err() {
            return Err(src.at(
                n,
                "tls.server_name",
                format!("{:?} is not a valid DNS name or IP address", n.get_ref()),
            ));
        }
    }
    Ok(ClientTls {
        ca: t.ca.as_ref().map(|c| c.get_ref().clone()),
        cert: t.cert.as_ref().map(|c| c.get_ref().clone()),
        key: t.key.as_ref().map(|c| c.get_ref().clone()),
        server_name: t.server_name.as_ref().map(|n| n.get_ref().clone()),
    })
}

/// A TLS file error at the key that names the file at fault.
pub(super) fn tls_error(
    src: &Source,
    e: crate::tls::TlsError,
    cert: (&Spanned<PathBuf>, &str),
    key: (&Spanned<PathBuf>, &str),
) -> ConfigError {
    let (at, name) = if e.path == key.0.get_ref().display().to_string() { key } else { cert };
    src.at(at, name, e.to_string())
}
