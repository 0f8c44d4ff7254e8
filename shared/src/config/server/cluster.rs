//! `[cluster]`: several servers sharing membership and their registry of
//! clients in etcd. Absent, the server runs standalone.

use crate::config::ranged::{self, Bound::*, SECOND};
use crate::config::secret::Secret;
use crate::config::source::{parse_url, ConfigError, Source};
use crate::config::tls::tls_error;
use crate::units::HumanDuration;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// Default lease TTL: how long a crashed server's entries outlive it.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default key prefix in etcd.
pub const DEFAULT_PREFIX: &str = "/tunnel";

/// `[cluster]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterSection {
    etcd: Spanned<Vec<String>>,
    prefix: Option<Spanned<String>>,
    advertise: Spanned<String>,
    admin_advertise: Option<Spanned<String>>,
    peer_listen: Option<Spanned<SocketAddr>>,
    peer_advertise: Option<Spanned<String>>,
    peer_token: Option<Spanned<Secret>>,
    peer_ca: Option<Spanned<PathBuf>>,
    peer_cert: Option<Spanned<PathBuf>>,
    peer_key: Option<Spanned<PathBuf>>,
    lease_ttl: Option<Spanned<HumanDuration>>,
    etcd_username: Option<Spanned<String>>,
    etcd_password: Option<Spanned<Secret>>,
    etcd_ca: Option<Spanned<PathBuf>>,
    etcd_cert: Option<Spanned<PathBuf>>,
    etcd_key: Option<Spanned<PathBuf>>,
}

/// `[cluster]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// etcd endpoints (`http://` or `https://`), any member of one etcd cluster.
    pub etcd: Vec<http::Uri>,
    /// Every key this fleet writes lives under it; no trailing slash.
    pub prefix: String,
    /// The URL tunnel clients dial for this server.
    pub advertise: http::Uri,
    /// The URL a console dials for this server's introspection, if it is reachable.
    pub admin_advertise: Option<http::Uri>,
    /// Where peers forward requests to this server, and the URL they dial
    /// for it; None: this server takes no forwarded requests.
    pub peer_listen: Option<SocketAddr>,
    pub peer_advertise: Option<http::Uri>,
    /// Servers present it to each other on forwarded calls; off loopback,
    /// this or `peer_tls` is required (the port would otherwise be an open relay).
    pub peer_token: Option<Secret>,
    /// mTLS between servers: each presents its certificate and accepts only
    /// peers whose certificates `ca` signed; peer URLs are then https://.
    pub peer_tls: Option<PeerTls>,
    /// The etcd lease's TTL: a crashed server's entries vanish this long after it.
    pub lease_ttl: Duration,
    /// etcd user and password, when etcd has authentication on.
    pub etcd_auth: Option<(String, Secret)>,
    /// TLS towards etcd: the CA to trust, and our certificate for mTLS.
    pub etcd_tls: Option<EtcdTls>,
}

/// mTLS between the servers of a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    /// Signs every server's peer certificate.
    pub ca: PathBuf,
    /// This server's certificate (for both the server and the client side of
    /// a forwarded call) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS towards etcd (`https://` endpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's certificates; None = the system's roots.
    pub ca: Option<PathBuf>,
    /// Our certificate and key, when etcd requires client certificates.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Checks `[cluster]`.
pub(super) fn check(src: &Source, c: &ClusterSection) -> Result<ClusterSettings, ConfigError> {
    if c.etcd.get_ref().is_empty() {
        return Err(src.at(
            &c.etcd,
            "cluster.etcd",
            "lists no endpoint; give at least one, e.g. \"http://127.0.0.1:2379\"",
        ));
    }
    let mut etcd = Vec::new();
    for e in c.etcd.get_ref() {
        etcd.push(parse_url(e, &["http", "https"]).map_err(|m| src.at(&c.etcd, "cluster.etcd", m))?);
    }
    let tls_schemes: Vec<bool> = etcd.iter().map(|u| u.scheme_str() == Some("https")).collect();
    if tls_schemes.iter().any(|&t| t != tls_schemes[0]) {
        return Err(src.at(&c.etcd, "cluster.etcd", "mixes http:// and https:// endpoints; use one scheme for all"));
    }
    let prefix = match &c.prefix {
        None => DEFAULT_PREFIX.to_string(),
        Some(p) => {
            let trimmed = p.get_ref().trim().trim_end_matches('/');
            if !trimmed.starts_with('/') || trimmed.len() < 2 {
                return Err(src.at(
                    p,
                    "cluster.prefix",
                    format!("{:?} must start with '/' and name something, e.g. \"/tunnel\"", p.get_ref()),
                ));
            }
            trimmed.to_string()
        }
    };
    let advertise = parse_url(c.advertise.get_ref(), &["http", "https"])
        .map_err(|m| src.at(&c.advertise, "cluster.advertise", m))?;
    let unspecified = |u: &http::Uri| {
        u.host().map(|h| h.trim_start_matches('[').trim_end_matches(']')).is_some_and(|h| h == "0.0.0.0" || h == "::")
    };
    if unspecified(&advertise) {
        return Err(src.at(
            &c.advertise,
            "cluster.advertise",
            "is an unspecified address; give the address clients reach this server on",
        ));
    }
    let admin_advertise = c
        .admin_advertise
        .as_ref()
        .map(|a| parse_url(a.get_ref(), &["http", "https"]).map_err(|m| src.at(a, "cluster.admin_advertise", m)))
        .transpose()?;
    let (peer_listen, peer_advertise, peer_token, peer_tls) = check_peer(src, c)?;
    let lease_ttl = ranged::value(
        src,
        &c.lease_ttl,
        "cluster.lease_ttl",
        DEFAULT_LEASE_TTL,
        Range(2 * SECOND, Duration::from_secs(600)),
    )?;
    if lease_ttl.subsec_nanos() != 0 {
        let at = c.lease_ttl.as_ref().map(|l| l.span().start);
        return Err(src.error(at, "cluster.lease_ttl", "must be whole seconds (etcd leases count seconds)"));
    }
    let etcd_auth = match (&c.etcd_username, &c.etcd_password) {
        (Some(u), Some(p)) if !u.get_ref().is_empty() => Some((u.get_ref().clone(), p.get_ref().clone())),
        (Some(u), Some(_)) => return Err(src.at(u, "cluster.etcd_username", "is empty")),
        (Some(u), None) => return Err(src.at(u, "cluster.etcd_username", "needs cluster.etcd_password too")),
        (None, Some(p)) => return Err(src.at(p, "cluster.etcd_password", "needs cluster.etcd_username too")),
        (None, None) => None,
    };
    let etcd_tls = check_tls(src, c, tls_schemes[0])?;
    Ok(ClusterSettings {
        etcd,
        prefix,
        advertise,
        admin_advertise,
        peer_listen,
        peer_advertise,
        peer_token,
        peer_tls,
        lease_ttl,
        etcd_auth,
        etcd_tls,
    })
}

/// What the forwarding keys give: peer_listen, peer_advertise, peer_token, peer_tls.
type PeerKeys = (Option<SocketAddr>, Option<http::Uri>, Option<Secret>, Option<PeerTls>);

/// Forwarding keys: listen and advertise together, mTLS files together (and
/// then an https:// URL), and a token or mTLS off loopback.
fn check_peer(src: &Source, c: &ClusterSection) -> Result<PeerKeys, ConfigError> {
    let tls = match (&c.peer_ca, &c.peer_cert, &c.peer_key) {
        (Some(ca), Some(cert), Some(key)) => {
            crate::tls::root_store(ca.get_ref()).map_err(|e| src.at(ca, "cluster.peer_ca", e.to_string()))?;
            crate::tls::certified_key(cert.get_ref(), key.get_ref())
                .map_err(|e| tls_error(src, e, (cert, "cluster.peer_cert"), (key, "cluster.peer_key")))?;
            Some(PeerTls { ca: ca.get_ref().clone(), cert: cert.get_ref().clone(), key: key.get_ref().clone() })
        }
        (None, None, None) => None,
        _ => {
            let at = c.peer_ca.as_ref().or(c.peer_cert.as_ref()).or(c.peer_key.as_ref()).map(|p| p.span().start);
            return Err(src.error(
                at,
                "cluster.peer_ca",
                "peer_ca, peer_cert and peer_key go together (mTLS between servers)",
            ));
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let advertise = c
        .peer_advertise
        .as_ref()
        .map(|a| parse_url(a.get_ref(), &[scheme]).map_err(|m| src.at(a, "cluster.peer_advertise", m)))
        .transpose()?;
    let listen = c.peer_listen.as_ref().map(|l| *l.get_ref());
    match (&c.peer_listen, &c.peer_advertise) {
        (Some(l), None) => {
            return Err(src.at(l, "cluster.peer_listen", "needs cluster.peer_advertise, the URL peers dial for it"))
        }
        (None, Some(a)) => return Err(src.at(a, "cluster.peer_advertise", "needs cluster.peer_listen")),
        _ => {}
    }
    let token = match &c.peer_token {
        Some(t) if t.get_ref().expose().is_empty() => return Err(src.at(t, "cluster.peer_token", "is empty")),
        Some(t) => Some(t.get_ref().clone()),
        None => None,
    };
    if let (Some(l), None, None) = (&c.peer_listen, &token, &tls) {
        if !l.get_ref().ip().is_loopback() {
            return Err(src.at(
                l,
                "cluster.peer_listen",
                format!("{} is not a loopback address: set cluster.peer_ca, peer_cert and peer_key (mTLS between servers) or cluster.peer_token, or anyone who reaches it can send requests into the tunnels", l.get_ref()),
            ));
        }
    }
    Ok((listen, advertise, token, tls))
}

/// The etcd TLS keys: files that parse, cert with key, and only with https:// endpoints.
fn check_tls(src: &Source, c: &ClusterSection, https: bool) -> Result<Option<EtcdTls>, ConfigError> {
    if let Some(ca) = &c.etcd_ca {
        crate::tls::root_store(ca.get_ref()).map_err(|e| src.at(ca, "cluster.etcd_ca", e.to_string()))?;
    }
    let identity = match (&c.etcd_cert, &c.etcd_key) {
        (Some(cert), Some(key)) => {
            crate::tls::certified_key(cert.get_ref(), key.get_ref())
                .map_err(|e| tls_error(src, e, (cert, "cluster.etcd_cert"), (key, "cluster.etcd_key")))?;
            Some((cert.get_ref().clone(), key.get_ref().clone()))
        }
        (Some(cert), None) => return Err(src.at(cert, "cluster.etcd_cert", "needs cluster.etcd_key too")),
        (None, Some(key)) => return Err(src.at(key, "cluster.etcd_key", "needs cluster.etcd_cert too")),
        (None, None) => None,
    };
    let ca = c.etcd_ca.as_ref().map(|p| p.get_ref().clone());
    if !https {
        if let Some(first) = c.etcd_ca.as_ref().or(c.etcd_cert.as_ref()) {
            return Err(src.at(first, "cluster.etcd", "TLS files are set but the endpoints are http://; use https://"));
        }
        return Ok(None);
    }
    Ok(Some(EtcdTls { ca, identity }))
}
