//! Configuration of both daemons: the TOML file formats, their defaults, and
//! validation into checked runtime types. Every error names the file, the line
//! and the key.

use crate::frame::{DEFAULT_EXCHANGE_WINDOW, MAX_EXCHANGE_WINDOW, MIN_EXCHANGE_WINDOW};
use crate::proto;
use crate::rules::{HostPattern, Rule, RuleProblem, RuleSet};
use crate::tls::rustls;
use crate::units::{ByteSize, HumanDuration};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// Default public HTTP listener.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
/// Default gRPC listener that tunnel clients dial.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:7000";
/// Default admin (introspection) listener the console connects to.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7001";
/// Default heartbeat interval of a group's streams.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Shortest heartbeat interval accepted.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Default number of data (Proxy) streams per client.
pub const DEFAULT_DATA_STREAMS: u32 = 2;
/// Most data streams per client.
pub const MAX_DATA_STREAMS: u32 = 64;
/// Default bound on the wait for an upstream's response head.
pub const DEFAULT_RULE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time given to in-flight requests at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default cap on gRPC streams per client connection (a client holds 1 + N).
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Default cap on concurrent public connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default bound on a public connection's first request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a public connection may sit idle between requests (nginx: 75s).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default client connect (TCP + HTTP/2 handshake) timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap of the client's reconnect backoff.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Default cap on a public request's whole head (request line and headers).
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
/// Smallest head cap accepted (hyper's HTTP/1 read buffer minimum).
pub const MIN_MAX_HEADER_BYTES: u64 = 8 * 1024;
/// Default cap on the number of headers of a public request.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Largest `max_headers` accepted.
pub const MAX_MAX_HEADERS: usize = 1000;
/// Default cap on a public request's URI.
pub const DEFAULT_MAX_URI_BYTES: u64 = 8 * 1024;
/// Default cap on requests in flight to one client of a group.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1000;
/// Default bound on a link connection's TLS handshake, or on its first plaintext byte.
pub const DEFAULT_LINK_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on a tunnel stream's registration and its acknowledgement.
pub const DEFAULT_REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Default TCP keepalive idle time, for peers that vanish without a FIN.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Default HTTP/2 PING interval on idle connections, and the wait for its answer.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
/// Default wait for a PING's answer before the connection is closed.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Default cap on concurrent streams of one public HTTP/2 connection:
/// nginx's default. Each stream a peer stops reading costs about 230-430
/// KiB across the two daemons, measured (docs/reliability.md).
pub const DEFAULT_PUBLIC_MAX_STREAMS: u32 = 128;
/// Exchange window one public connection's requests share: four bulk
/// downloads at the full default window, then 32 KiB each.
pub const DEFAULT_PUBLIC_CONNECTION_WINDOW: u64 = 4 << 20;
/// Largest `public_connection_window`.
pub const MAX_PUBLIC_CONNECTION_WINDOW: u64 = 1 << 30;
/// Default cap on streams a peer opens and resets before they are served
/// (the rapid-reset attack, CVE-2023-44487); past it, GOAWAY.
pub const DEFAULT_H2_MAX_REMOTE_RESETS: usize = 20;
/// Default cap on streams we reset for a peer's protocol errors; past it, GOAWAY.
pub const DEFAULT_H2_MAX_LOCAL_RESETS: usize = 1024;
/// First reconnect delay; doubles (with jitter) up to `reconnect_max`.
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(200);
/// Default bound on connecting to an upstream.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time an idle pooled upstream connection is kept.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default silence after which a streamed response or upload is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Runtime threads unless configured: single-threaded (1) on machines with
/// up to 2 cores, where it measured 20-30% less CPU per request and more bulk
/// throughput than one thread per core (no cross-thread wake-ups;
/// docs/benchmarks.md); one per core (0) on bigger machines, so that a busy
/// server is not held to one core.
pub fn default_worker_threads() -> usize {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() > 2 => 0,
        _ => 1,
    }
}

/// A secret (token) whose Debug output is masked.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for sending it; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Compares in constant time, so timing tells an attacker nothing.
    pub fn matches(&self, other: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other).into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A configuration that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is wrong.
    #[error("{file}:{line}: {key}: {message}")]
    Invalid { file: String, line: usize, key: String, message: String },
}

/// Where a config text came from, to locate errors in it.
struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn error(&self, offset: Option<usize>, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: offset.map_or(1, |o| self.line_of(o)),
            key: key.into(),
            message: message.into(),
        }
    }

    fn at<T>(&self, spanned: &Spanned<T>, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        self.error(Some(spanned.span().start), key, message)
    }

    fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let de = toml::Deserializer::parse(self.text)
            .map_err(|e| self.error(e.span().map(|s| s.start), "syntax", e.message().trim()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            // Spanned<T> shows up in serde's path as a private field: hide it.
            let key = e.path().to_string().replace(".$__serde_spanned_private_value", "");
            let inner = e.into_inner();
            let key = if key == "." { "top level".to_string() } else { key };
            self.error(inner.span().map(|s| s.start), key, inner.message().trim())
        })
    }
}

/// Largest config file read.
const MAX_CONFIG_FILE: u64 = 4 << 20;

fn read(path: &Path) -> Result<String, ConfigError> {
    let error = |source| ConfigError::Read { path: path.display().to_string(), source };
    let bytes = crate::units::read_bounded(path, MAX_CONFIG_FILE).map_err(error)?;
    String::from_utf8(bytes).map_err(|_| error(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8")))
}

/// Where and how a daemon logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Filter such as "info" or "tunnel_daemon=debug"; `RUST_LOG` overrides it.
    #[serde(default)]
    pub level: Option<String>,
    /// Write daily-rolling files in this directory instead of stderr.
    #[serde(default)]
    pub directory: Option<PathBuf>,
    /// File name prefix of the rolling files (default: the binary's name).
    #[serde(default)]
    pub file_prefix: Option<String>,
    /// "text" (default) or "json": one JSON object per line, for journald or a log shipper.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

// ---------------------------------------------------------------- server

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    groups: Vec<GroupSection>,
    #[serde(default)]
    rules: Vec<RuleSection>,
    #[serde(default)]
    certificates: Vec<CertificateSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkTlsSection {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
    client_ca: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateSection {
    hosts: Spanned<Vec<String>>,
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    http_listen: Option<SocketAddr>,
    grpc_listen: Option<SocketAddr>,
    admin_listen: Option<Spanned<SocketAddr>>,
    admin_token: Option<Spanned<Secret>>,
    #[serde(default)]
    config_push: ConfigPush,
    heartbeat_timeout: Option<Spanned<HumanDuration>>,
    server_id: Option<String>,
    shutdown_grace: Option<HumanDuration>,
    worker_threads: Option<usize>,
    max_streams_per_connection: Option<u32>,
    max_connections: Option<usize>,
    header_read_timeout: Option<Spanned<HumanDuration>>,
    keepalive_timeout: Option<Spanned<HumanDuration>>,
    max_header_bytes: Option<Spanned<ByteSize>>,
    max_headers: Option<Spanned<usize>>,
    max_uri_bytes: Option<Spanned<ByteSize>>,
    https_listen: Option<Spanned<SocketAddr>>,
    metrics_listen: Option<SocketAddr>,
    tls: Option<LinkTlsSection>,
    link_handshake_timeout: Option<Spanned<HumanDuration>>,
    registration_timeout: Option<Spanned<HumanDuration>>,
    tcp_keepalive: Option<Spanned<HumanDuration>>,
    link_ping_interval: Option<Spanned<HumanDuration>>,
    link_ping_timeout: Option<Spanned<HumanDuration>>,
    public_ping_interval: Option<Spanned<HumanDuration>>,
    public_ping_timeout: Option<Spanned<HumanDuration>>,
    public_max_streams: Option<Spanned<u32>>,
    public_connection_window: Option<Spanned<ByteSize>>,
    h2_max_remote_resets: Option<Spanned<usize>>,
    h2_max_local_resets: Option<Spanned<usize>>,
    log_level: Option<Spanned<String>>,
    log_format: Option<Spanned<LogFormat>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupSection {
    name: Spanned<String>,
    token: Spanned<Secret>,
    heartbeat_interval: Option<Spanned<HumanDuration>>,
    data_streams: Option<Spanned<u32>>,
    exchange_window: Option<Spanned<ByteSize>>,
    max_in_flight: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSection {
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    group: Spanned<String>,
    upstream: Spanned<String>,
    timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    max_body: Option<Spanned<ByteSize>>,
}

/// When a changed group config reaches connected clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigPush {
    /// At once, on reload; clients that missed it notice at their next heartbeat.
    #[default]
    Auto,
    /// Only when an operator forces a resync (from the console); lets a
    /// change be rolled out client by client.
    Manual,
}

impl std::fmt::Display for ConfigPush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConfigPush::Auto => "auto",
            ConfigPush::Manual => "manual",
        })
    }
}

/// `[server]`: listeners and server-wide settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub http_listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    /// Introspection service for the console.
    pub admin_listen: SocketAddr,
    /// Required on every introspection call when set.
    pub admin_token: Option<Secret>,
    pub config_push: ConfigPush,
    /// Names this server in its acknowledgements (default: the host name).
    pub server_id: String,
    pub shutdown_grace: Duration,
    /// Tokio worker threads; 0 = one per core, 1 = single-threaded (default: see `default_worker_threads`).
    pub worker_threads: usize,
    pub max_streams_per_connection: u32,
    pub max_connections: usize,
    /// A public connection must send a complete request head within this.
    pub header_read_timeout: Duration,
    /// An idle keep-alive public connection is closed after this.
    pub keepalive_timeout: Duration,
    /// A public request head larger than this gets 431.
    pub max_header_bytes: u64,
    /// A public request with more headers than this gets 431.
    pub max_headers: usize,
    /// A public request whose URI is longer than this gets 414.
    pub max_uri_bytes: u64,
    /// Public HTTPS listener (`[[certificates]]` chosen by SNI).
    pub https_listen: Option<SocketAddr>,
    /// Prometheus `/metrics`; None = off.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS on `grpc_listen`; None = plaintext.
    pub tls: Option<LinkTls>,
    /// Bound on a link connection's TLS handshake, or on a plaintext link
    /// peer's first byte (public HTTPS handshakes count against
    /// `header_read_timeout`).
    pub link_handshake_timeout: Duration,
    /// Bound on a tunnel stream's first message.
    pub registration_timeout: Duration,
    /// TCP keepalive idle time on tunnel link connections.
    pub tcp_keepalive: Duration,
    /// HTTP/2 PING interval on idle tunnel link connections.
    pub link_ping_interval: Duration,
    /// A link connection whose PING goes unanswered this long is closed.
    pub link_ping_timeout: Duration,
    /// HTTP/2 PING interval on idle public h2/h2c connections.
    pub public_ping_interval: Duration,
    /// A public h2 connection whose PING goes unanswered this long is closed.
    pub public_ping_timeout: Duration,
    /// Concurrent streams one public HTTP/2 connection may open.
    pub public_max_streams: u32,
    /// Exchange window the requests of one public connection share: each
    /// gets its group's `exchange_window` while this lasts, then what is
    /// left, down to `frame::MIN_EXCHANGE_WINDOW`.
    pub public_connection_window: u64,
    /// Streams a peer may open and reset before they are served, on either
    /// HTTP/2 listener, before it gets GOAWAY.
    pub h2_max_remote_resets: usize,
    /// Streams we may reset for a peer's errors, on either HTTP/2 listener,
    /// before it gets GOAWAY.
    pub h2_max_local_resets: usize,
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

/// One `[[certificates]]` entry of the HTTPS ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressCert {
    /// Server names it serves: `example.com` or `*.example.com`.
    pub hosts: Vec<HostPattern>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One group of clients and what the server manages for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSettings {
    pub name: String,
    pub token: Secret,
    pub heartbeat_interval: Duration,
    /// A stream silent this long is reaped (`[server] heartbeat_timeout`,
    /// default 3 x the group's interval).
    pub heartbeat_timeout: Duration,
    pub data_streams: u32,
    /// Credit per exchange and direction, bytes.
    pub exchange_window: u32,
    /// Requests in flight to one client of the group past which new ones get 503.
    pub max_in_flight: u32,
}

/// The whole server configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub server: ServerSettings,
    pub log: LogConfig,
    pub groups: Vec<GroupSettings>,
    pub rules: RuleSet,
    /// HTTPS ingress certificates; the first is the default.
    pub certificates: Vec<IngressCert>,
}

impl ServerConfig {
    /// Reads and checks a server.toml.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_str_named(&text, &path.display().to_string())
    }

    /// Parses and checks server.toml text; `file` names it in errors.
    pub fn from_str_named(text: &str, file: &str) -> Result<Self, ConfigError> {
        let src = Source { file, text };
        let raw: ServerFile = src.parse()?;
        let s = raw.server;
        let admin_listen = match &s.admin_listen {
            Some(a) => *a.get_ref(),
            None => parse_default_addr(DEFAULT_ADMIN_LISTEN),
        };
        let admin_token = match &s.admin_token {
            Some(t) if t.get_ref().expose().is_empty() => {
                return Err(src.at(t, "server.admin_token", "is empty; omit it to run without one on loopback"))
            }
            Some(t) => Some(t.get_ref().clone()),
            None => None,
        };
        if admin_token.is_none() && !admin_listen.ip().is_loopback() {
            let offset = s.admin_listen.as_ref().map(|a| a.span().start);
            return Err(src.error(
                offset,
                "server.admin_listen",
                format!("{admin_listen} is not a loopback address: set server.admin_token, or anyone who reaches it can close streams"),
            ));
        }
        let server = ServerSettings {
            http_listen: s.http_listen.unwrap_or_else(|| parse_default_addr(DEFAULT_HTTP_LISTEN)),
            grpc_listen: s.grpc_listen.unwrap_or_else(|| parse_default_addr(DEFAULT_GRPC_LISTEN)),
            admin_listen,
            admin_token,
            config_push: s.config_push,
            server_id: s.server_id.unwrap_or_else(default_host_name),
            shutdown_grace: s.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            worker_threads: s.worker_threads.unwrap_or_else(default_worker_threads),
            max_streams_per_connection: s.max_streams_per_connection.unwrap_or(DEFAULT_MAX_STREAMS_PER_CONNECTION),
            max_connections: s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            header_read_timeout: match &s.header_read_timeout {
                Some(d) if d.get_ref().0.is_zero() => {
                    return Err(src.at(d, "server.header_read_timeout", "must be more than 0s"))
                }
                Some(d) => d.get_ref().0,
                None => DEFAULT_HEADER_READ_TIMEOUT,
            },
            keepalive_timeout: match &s.keepalive_timeout {
                Some(d) if d.get_ref().0.is_zero() => {
                    return Err(src.at(d, "server.keepalive_timeout", "must be more than 0s"))
                }
                Some(d) => d.get_ref().0,
                None => DEFAULT_KEEPALIVE_TIMEOUT,
            },
            max_header_bytes: match &s.max_header_bytes {
                Some(b) if b.get_ref().0 < MIN_MAX_HEADER_BYTES => {
                    return Err(src.at(b, "server.max_header_bytes", "must be at least 8KiB"))
                }
                Some(b) => b.get_ref().0,
                None => DEFAULT_MAX_HEADER_BYTES,
            },
            max_headers: match &s.max_headers {
                // hyper sizes a parse buffer by it: a typo must not cost gigabytes per request.
                Some(n) if !(1..=MAX_MAX_HEADERS).contains(n.get_ref()) => {
                    return Err(src.at(n, "server.max_headers", format!("must be 1 to {MAX_MAX_HEADERS}")))
                }
                Some(n) => *n.get_ref(),
                None => DEFAULT_MAX_HEADERS,
            },
            max_uri_bytes: match &s.max_uri_bytes {
                Some(b) if b.get_ref().0 < 256 => {
                    return Err(src.at(b, "server.max_uri_bytes", "must be at least 256B"))
                }
                Some(b) => b.get_ref().0,
                None => DEFAULT_MAX_URI_BYTES,
            },
            https_listen: s.https_listen.as_ref().map(|a| *a.get_ref()),
            metrics_listen: s.metrics_listen,
            tls: match &s.tls {
                None => None,
                Some(t) => Some(check_link_tls(&src, t)?),
            },
            link_handshake_timeout: duration_key(
                &src,
                &s.link_handshake_timeout,
                "server.link_handshake_timeout",
                DEFAULT_LINK_HANDSHAKE_TIMEOUT,
                Duration::from_millis(100),
            )?,
            registration_timeout: duration_key(
                &src,
                &s.registration_timeout,
                "server.registration_timeout",
                DEFAULT_REGISTRATION_TIMEOUT,
                Duration::from_millis(100),
            )?,
            tcp_keepalive: duration_key(&src, &s.tcp_keepalive, "server.tcp_keepalive", DEFAULT_TCP_KEEPALIVE, SECOND)?,
            link_ping_interval: duration_key(
                &src,
                &s.link_ping_interval,
                "server.link_ping_interval",
                DEFAULT_PING_INTERVAL,
                SECOND,
            )?,
            link_ping_timeout: duration_key(
                &src,
                &s.link_ping_timeout,
                "server.link_ping_timeout",
                DEFAULT_PING_TIMEOUT,
                SECOND,
            )?,
            public_ping_interval: duration_key(
                &src,
                &s.public_ping_interval,
                "server.public_ping_interval",
                DEFAULT_PING_INTERVAL,
                SECOND,
            )?,
            public_ping_timeout: duration_key(
                &src,
                &s.public_ping_timeout,
                "server.public_ping_timeout",
                DEFAULT_PING_TIMEOUT,
                SECOND,
            )?,
            public_max_streams: count_key(
                &src,
                &s.public_max_streams,
                "server.public_max_streams",
                DEFAULT_PUBLIC_MAX_STREAMS,
                1..=10_000,
            )?,
            public_connection_window: match &s.public_connection_window {
                Some(b)
                    if !(u64::from(MIN_EXCHANGE_WINDOW)..=MAX_PUBLIC_CONNECTION_WINDOW).contains(&b.get_ref().0) =>
                {
                    return Err(src.at(
                        b,
                        "server.public_connection_window",
                        format!(
                            "must be {}KiB to {}MiB",
                            MIN_EXCHANGE_WINDOW >> 10,
                            MAX_PUBLIC_CONNECTION_WINDOW >> 20
                        ),
                    ))
                }
                Some(b) => b.get_ref().0,
                None => DEFAULT_PUBLIC_CONNECTION_WINDOW,
            },
            h2_max_remote_resets: count_key(
                &src,
                &s.h2_max_remote_resets,
                "server.h2_max_remote_resets",
                DEFAULT_H2_MAX_REMOTE_RESETS,
                1..=100_000,
            )?,
            h2_max_local_resets: count_key(
                &src,
                &s.h2_max_local_resets,
                "server.h2_max_local_resets",
                DEFAULT_H2_MAX_LOCAL_RESETS,
                1..=100_000,
            )?,
        };
        let mut certificates = Vec::new();
        for (i, c) in raw.certificates.iter().enumerate() {
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
                .map_err(|e| tls_error(&src, e, (&c.cert, &key("cert")), (&c.key, &key("key"))))?;
            certificates.push(IngressCert { hosts, cert: c.cert.get_ref().clone(), key: c.key.get_ref().clone() });
        }
        match (&s.https_listen, certificates.is_empty()) {
            (Some(a), true) => {
                return Err(src.at(a, "server.https_listen", "needs at least one [[certificates]] entry to serve"))
            }
            (None, false) => {
                let first = &raw.certificates[0].hosts;
                return Err(src.at(first, "certificates[0]", "certificates are for HTTPS: set server.https_listen"));
            }
            _ => {}
        }

        let mut groups = Vec::new();
        let mut names = BTreeSet::new();
        for (i, g) in raw.groups.iter().enumerate() {
            let key = |k: &str| format!("groups[{i}].{k}");
            let name = g.name.get_ref().trim();
            if name.is_empty() {
                return Err(src.at(&g.name, key("name"), "group name is empty"));
            }
            if !names.insert(name.to_string()) {
                return Err(src.at(&g.name, key("name"), format!("group {name:?} is defined twice")));
            }
            if g.token.get_ref().expose().is_empty() {
                return Err(src.at(&g.token, key("token"), "token is empty"));
            }
            let interval = match &g.heartbeat_interval {
                Some(d) if d.get_ref().0 < MIN_HEARTBEAT_INTERVAL => {
                    return Err(src.at(d, key("heartbeat_interval"), "must be at least 1s"))
                }
                Some(d) => d.get_ref().0,
                None => DEFAULT_HEARTBEAT_INTERVAL,
            };
            let timeout = match &s.heartbeat_timeout {
                Some(t) if t.get_ref().0 <= interval => {
                    return Err(src.at(
                        t,
                        "server.heartbeat_timeout",
                        format!(
                            "must be longer than group {name:?}'s heartbeat_interval ({})",
                            humantime::format_duration(interval)
                        ),
                    ))
                }
                Some(t) => t.get_ref().0,
                None => interval * 3,
            };
            let data_streams = match &g.data_streams {
                Some(n) if !(1..=MAX_DATA_STREAMS).contains(n.get_ref()) => {
                    return Err(src.at(n, key("data_streams"), format!("must be 1 to {MAX_DATA_STREAMS}")))
                }
                Some(n) => *n.get_ref(),
                None => DEFAULT_DATA_STREAMS,
            };
            let exchange_window = match &g.exchange_window {
                Some(w) if !(MIN_EXCHANGE_WINDOW as u64..=MAX_EXCHANGE_WINDOW as u64).contains(&w.get_ref().0) => {
                    return Err(src.at(
                        w,
                        key("exchange_window"),
                        format!("must be {}KiB to {}MiB", MIN_EXCHANGE_WINDOW >> 10, MAX_EXCHANGE_WINDOW >> 20),
                    ))
                }
                Some(w) => w.get_ref().0 as u32,
                None => DEFAULT_EXCHANGE_WINDOW,
            };
            let max_in_flight = match &g.max_in_flight {
                Some(n) if *n.get_ref() == 0 => return Err(src.at(n, key("max_in_flight"), "must be at least 1")),
                Some(n) => *n.get_ref(),
                None => DEFAULT_MAX_IN_FLIGHT,
            };
            groups.push(GroupSettings {
                name: name.to_string(),
                token: g.token.get_ref().clone(),
                heartbeat_interval: interval,
                heartbeat_timeout: timeout,
                data_streams,
                exchange_window,
                max_in_flight,
            });
        }

        let mut rules = Vec::new();
        let mut rule_lines = Vec::new();
        for (i, r) in raw.rules.iter().enumerate() {
            let key = |k: &str| format!("rules[{i}].{k}");
            let host = match &r.host {
                None => HostPattern::Any,
                Some(h) => HostPattern::parse(h.get_ref()).map_err(|m| src.at(h, key("host"), m))?,
            };
            let path_prefix = match &r.path_prefix {
                None => "/".to_string(),
                Some(p) if !p.get_ref().starts_with('/') => {
                    return Err(src.at(p, key("path_prefix"), "must start with '/'"))
                }
                Some(p) => p.get_ref().clone(),
            };
            let group = r.group.get_ref().trim();
            if !names.contains(group) {
                return Err(src.at(
                    &r.group,
                    key("group"),
                    format!("no group named {group:?} (defined: {})", join(&names)),
                ));
            }
            let upstream = r.upstream.get_ref().trim();
            if upstream.is_empty() {
                return Err(src.at(&r.upstream, key("upstream"), "upstream name is empty"));
            }
            rules.push(Rule {
                host,
                path_prefix,
                group: group.to_string(),
                upstream: upstream.to_string(),
                timeout: r.timeout.map_or(DEFAULT_RULE_TIMEOUT, |d| d.0),
                idle_timeout: r.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
                max_body: r.max_body.as_ref().map(|b| b.get_ref().0),
            });
            rule_lines.push(r.group.span().start);
        }
        let rules = RuleSet::new(rules);
        if let Some(p) = rules.problems().first() {
            let (i, msg) = match *p {
                RuleProblem::Duplicate { rule, earlier } => {
                    (rule, format!("duplicate of rules[{earlier}] (same host and path_prefix)"))
                }
                RuleProblem::Unreachable { rule, earlier } => {
                    (rule, format!("unreachable: rules[{earlier}] matches every request it would"))
                }
            };
            return Err(src.error(Some(rule_lines[i]), format!("rules[{i}]"), msg));
        }
        let log = merge_log(&src, raw.log, s.log_level, s.log_format, "server.")?;
        Ok(ServerConfig { server, log, groups, rules, certificates })
    }

    /// The HTTPS ingress's rustls settings, read from the files now; None without https_listen.
    pub fn ingress_tls(&self) -> Result<Option<Arc<crate::tls::rustls::ServerConfig>>, crate::tls::TlsError> {
        if self.server.https_listen.is_none() {
            return Ok(None);
        }
        let certs: Vec<_> =
            self.certificates.iter().map(|c| (c.hosts.clone(), c.cert.as_path(), c.key.as_path())).collect();
        crate::tls::ingress_server_config(&certs).map(Some)
    }

    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&GroupSettings> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// What `ConfigSync` carries for a group, and its version (content hash).
    pub fn group_sync(&self, name: &str) -> Option<(String, proto::GroupConfig)> {
        let g = self.group(name)?;
        let mut routes: Vec<proto::UpstreamRoute> = Vec::new();
        for r in self.rules.rules().iter().filter(|r| r.group == name) {
            let ms = r.timeout.as_millis() as u64;
            match routes.iter_mut().find(|x| x.upstream == r.upstream) {
                Some(x) => x.timeout_ms = x.timeout_ms.max(ms),
                None => routes.push(proto::UpstreamRoute { upstream: r.upstream.clone(), timeout_ms: ms }),
            }
        }
        let rules = self
            .rules
            .rules()
            .iter()
            .filter(|r| r.group == name)
            .map(|r| proto::RouteRule {
                host: r.host.to_string(),
                path_prefix: r.path_prefix.clone(),
                upstream: r.upstream.clone(),
                timeout_ms: r.timeout.as_millis() as u64,
            })
            .collect();
        let cfg = proto::GroupConfig {
            group: g.name.clone(),
            heartbeat_interval_ms: g.heartbeat_interval.as_millis() as u64,
            data_streams: g.data_streams,
            routes,
            exchange_window: g.exchange_window,
            rules,
        };
        Some((config_version(&cfg), cfg))
    }
}

/// The content hash naming a group config: FNV-1a 64 over its protobuf
/// encoding, which is deterministic for our messages (no maps), so every
/// server computes the same version for the same config.
pub fn config_version(cfg: &proto::GroupConfig) -> String {
    use prost::Message;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cfg.encode_to_vec() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")[..12].to_string()
}

fn join(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn parse_default_addr(s: &str) -> SocketAddr {
    s.parse().expect("built-in default addresses are valid")
}

/// The machine's host name, or "localhost" when it cannot be read.
pub fn default_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

// ---------------------------------------------------------------- client

/// How the client lays its streams over connections (the design's plans).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Plan B: control on ControlStream, data on N Proxy streams, one connection.
    #[default]
    Split,
    /// Plan A: everything on one Proxy stream.
    Single,
    /// Plan 3: the control stream on its own TCP connection.
    SplitConnection,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Split => "split",
            Transport::Single => "single",
            Transport::SplitConnection => "split-connection",
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server: Spanned<String>,
    client_id: Option<Spanned<String>>,
    group: Spanned<String>,
    token: Spanned<Secret>,
    #[serde(default)]
    transport: Transport,
    heartbeat_interval: Option<Spanned<HumanDuration>>,
    data_streams: Option<Spanned<u32>>,
    connect_timeout: Option<Spanned<HumanDuration>>,
    reconnect_min: Option<Spanned<HumanDuration>>,
    reconnect_max: Option<Spanned<HumanDuration>>,
    registration_timeout: Option<Spanned<HumanDuration>>,
    tcp_keepalive: Option<Spanned<HumanDuration>>,
    ping_interval: Option<Spanned<HumanDuration>>,
    ping_timeout: Option<Spanned<HumanDuration>>,
    upstream_connect_timeout: Option<Spanned<HumanDuration>>,
    upstream_idle_timeout: Option<Spanned<HumanDuration>>,
    shutdown_grace: Option<HumanDuration>,
    worker_threads: Option<usize>,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    tls: Option<Spanned<ClientTlsSection>>,
    metrics_listen: Option<SocketAddr>,
    log_level: Option<Spanned<String>>,
    log_format: Option<Spanned<LogFormat>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientTlsSection {
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

/// An `[upstreams]` entry as written: a URL, or a table with options.
enum RawUpstream {
    Url(String),
    Table(UpstreamTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamTable {
    url: String,
    #[serde(default)]
    http2: bool,
}

impl<'de> Deserialize<'de> for RawUpstream {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = RawUpstream;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a URL string, or a table such as { url = \"http://127.0.0.1:50051\", http2 = true }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawUpstream, E> {
                Ok(RawUpstream::Url(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawUpstream, A::Error> {
                UpstreamTable::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(RawUpstream::Table)
            }
        }
        d.deserialize_any(Entry)
    }
}

/// A local service the client forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Base URL, `http://host:port`.
    pub url: http::Uri,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge) to it: gRPC services.
    pub http2: bool,
}

/// The whole client configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The server's gRPC address, `http://host:port`.
    pub server: http::Uri,
    pub client_id: String,
    pub group: String,
    pub token: Secret,
    pub transport: Transport,
    /// Used until the server's config arrives.
    pub heartbeat_interval: Duration,
    /// Used until the server's config arrives.
    pub data_streams: u32,
    /// Bound on reaching the server: TCP, TLS and the HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles with jitter up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Bound on a stream's registration and its acknowledgement.
    pub registration_timeout: Duration,
    /// TCP keepalive idle time on the link.
    pub tcp_keepalive: Duration,
    /// HTTP/2 PING interval on the link (and on h2c upstream connections).
    pub ping_interval: Duration,
    /// The link is closed when a PING goes unanswered this long.
    pub ping_timeout: Duration,
    /// Bound on connecting to an upstream.
    pub upstream_connect_timeout: Duration,
    /// An idle pooled upstream connection is closed after this.
    pub upstream_idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Tokio worker threads; 0 = one per core, 1 = single-threaded (default: see `default_worker_threads`).
    pub worker_threads: usize,
    pub log: LogConfig,
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, Upstream>,
    /// TLS on the tunnel link: Some exactly when `server` is https://.
    pub tls: Option<ClientTls>,
    /// Prometheus `/metrics`; None = off.
    pub metrics_listen: Option<SocketAddr>,
}

impl ClientConfig {
    /// Reads and checks a client.toml.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_str_named(&text, &path.display().to_string())
    }

    /// Parses and checks client.toml text; `file` names it in errors.
    pub fn from_str_named(text: &str, file: &str) -> Result<Self, ConfigError> {
        let src = Source { file, text };
        let raw: ClientFile = src.parse()?;
        let server =
            parse_url(raw.server.get_ref(), &["http", "https"]).map_err(|m| src.at(&raw.server, "server", m))?;
        let tls = match (server.scheme_str() == Some("https"), &raw.tls) {
            (false, Some(t)) => {
                return Err(src.at(t, "tls", "is set but server is http://; use an https:// URL for TLS"))
            }
            (false, None) => None,
            (true, None) => Some(ClientTls::default()),
            (true, Some(t)) => Some(check_client_tls(&src, t.get_ref())?),
        };
        let client_id = match &raw.client_id {
            Some(id) if id.get_ref().trim().is_empty() => {
                return Err(src.at(id, "client_id", "is empty; omit it to use the host name"))
            }
            Some(id) => id.get_ref().trim().to_string(),
            None => default_host_name(),
        };
        if raw.group.get_ref().trim().is_empty() {
            return Err(src.at(&raw.group, "group", "group name is empty"));
        }
        if raw.token.get_ref().expose().is_empty() {
            return Err(src.at(&raw.token, "token", "token is empty"));
        }
        let heartbeat_interval = match &raw.heartbeat_interval {
            Some(d) if d.get_ref().0 < MIN_HEARTBEAT_INTERVAL => {
                return Err(src.at(d, "heartbeat_interval", "must be at least 1s"))
            }
            Some(d) => d.get_ref().0,
            None => DEFAULT_HEARTBEAT_INTERVAL,
        };
        let data_streams = match &raw.data_streams {
            Some(n) if !(1..=MAX_DATA_STREAMS).contains(n.get_ref()) => {
                return Err(src.at(n, "data_streams", format!("must be 1 to {MAX_DATA_STREAMS}")))
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_DATA_STREAMS,
        };
        let connect_timeout =
            duration_key(&src, &raw.connect_timeout, "connect_timeout", DEFAULT_CONNECT_TIMEOUT, TENTH)?;
        let reconnect_max = duration_key(&src, &raw.reconnect_max, "reconnect_max", DEFAULT_RECONNECT_MAX, TENTH)?;
        // Unset, the first step follows a small cap down; set, it must fit under it.
        let reconnect_min = match &raw.reconnect_min {
            None => DEFAULT_RECONNECT_MIN.min(reconnect_max),
            Some(d) if d.get_ref().0 > reconnect_max => {
                let cap = humantime::format_duration(reconnect_max);
                return Err(src.at(d, "reconnect_min", format!("must not exceed reconnect_max ({cap})")));
            }
            Some(_) => duration_key(&src, &raw.reconnect_min, "reconnect_min", DEFAULT_RECONNECT_MIN, TENTH)?,
        };
        let mut upstreams = BTreeMap::new();
        for (name, entry) in &raw.upstreams {
            let (url, http2) = match entry.get_ref() {
                RawUpstream::Url(u) => (u, false),
                RawUpstream::Table(t) => (&t.url, t.http2),
            };
            let url = parse_http_url(url).map_err(|m| src.at(entry, format!("upstreams.{name}"), m))?;
            upstreams.insert(name.clone(), Upstream { url, http2 });
        }
        Ok(ClientConfig {
            server,
            client_id,
            group: raw.group.get_ref().trim().to_string(),
            token: raw.token.get_ref().clone(),
            transport: raw.transport,
            heartbeat_interval,
            data_streams,
            connect_timeout,
            reconnect_min,
            reconnect_max,
            registration_timeout: duration_key(
                &src,
                &raw.registration_timeout,
                "registration_timeout",
                DEFAULT_REGISTRATION_TIMEOUT,
                TENTH,
            )?,
            tcp_keepalive: duration_key(&src, &raw.tcp_keepalive, "tcp_keepalive", DEFAULT_TCP_KEEPALIVE, SECOND)?,
            ping_interval: duration_key(&src, &raw.ping_interval, "ping_interval", DEFAULT_PING_INTERVAL, SECOND)?,
            ping_timeout: duration_key(&src, &raw.ping_timeout, "ping_timeout", DEFAULT_PING_TIMEOUT, SECOND)?,
            upstream_connect_timeout: duration_key(
                &src,
                &raw.upstream_connect_timeout,
                "upstream_connect_timeout",
                DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
                TENTH,
            )?,
            upstream_idle_timeout: duration_key(
                &src,
                &raw.upstream_idle_timeout,
                "upstream_idle_timeout",
                DEFAULT_UPSTREAM_IDLE_TIMEOUT,
                SECOND,
            )?,
            shutdown_grace: raw.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            worker_threads: raw.worker_threads.unwrap_or_else(default_worker_threads),
            log: merge_log(&src, raw.log, raw.log_level, raw.log_format, "")?,
            upstreams,
            tls,
            metrics_listen: raw.metrics_listen,
        })
    }
}

const SECOND: Duration = Duration::from_secs(1);
const TENTH: Duration = Duration::from_millis(100);

/// A duration key: `default` when absent, refused (naming the key) below `min`.
fn duration_key(
    src: &Source,
    value: &Option<Spanned<HumanDuration>>,
    key: &str,
    default: Duration,
    min: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        Some(d) if d.get_ref().0 < min => {
            Err(src.at(d, key, format!("must be at least {}", humantime::format_duration(min))))
        }
        Some(d) => Ok(d.get_ref().0),
        None => Ok(default),
    }
}

/// A count key: `default` when absent, refused (naming the key) outside `range`.
fn count_key<T: Copy + PartialOrd + std::fmt::Display>(
    src: &Source,
    value: &Option<Spanned<T>>,
    key: &str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    match value {
        Some(n) if !range.contains(n.get_ref()) => {
            Err(src.at(n, key, format!("must be {} to {}", range.start(), range.end())))
        }
        Some(n) => Ok(*n.get_ref()),
        None => Ok(default),
    }
}

/// The `[log]` section with the flat `log_level` / `log_format` keys folded
/// in (either place works; both at once is an error, naming the key).
fn merge_log(
    src: &Source,
    mut log: LogConfig,
    level: Option<Spanned<String>>,
    format: Option<Spanned<LogFormat>>,
    prefix: &str,
) -> Result<LogConfig, ConfigError> {
    if let Some(l) = level {
        if log.level.is_some() {
            return Err(src.at(&l, format!("{prefix}log_level"), "set either this or [log] level, not both"));
        }
        log.level = Some(l.into_inner());
    }
    if let Some(f) = format {
        if log.format != LogFormat::Text {
            return Err(src.at(&f, format!("{prefix}log_format"), "set either this or [log] format, not both"));
        }
        log.format = f.into_inner();
    }
    Ok(log)
}

/// Checks a `[server.tls]` section: the files exist, parse and belong together.
fn check_link_tls(src: &Source, t: &LinkTlsSection) -> Result<LinkTls, ConfigError> {
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

/// Checks client.toml's `[tls]`: files that exist and parse, cert with key.
fn check_client_tls(src: &Source, t: &ClientTlsSection) -> Result<ClientTls, ConfigError> {
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
fn tls_error(
    src: &Source,
    e: crate::tls::TlsError,
    cert: (&Spanned<PathBuf>, &str),
    key: (&Spanned<PathBuf>, &str),
) -> ConfigError {
    let (at, name) = if e.path == key.0.get_ref().display().to_string() { key } else { cert };
    src.at(at, name, e.to_string())
}

/// Checks an `http://host:port[/]` URL.
fn parse_http_url(s: &str) -> Result<http::Uri, String> {
    parse_url(s, &["http"])
}

/// Checks a `scheme://host:port[/]` URL with one of `schemes`.
fn parse_url(s: &str, schemes: &[&str]) -> Result<http::Uri, String> {
    let uri: http::Uri = s.trim().parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    match uri.scheme_str() {
        Some(x) if schemes.contains(&x) => {}
        Some(other) => {
            let want = schemes.iter().map(|x| format!("{x}://")).collect::<Vec<_>>().join(" or ");
            return Err(format!("scheme {other:?} is not supported in {s:?}; use {want}"));
        }
        None => return Err(format!("{s:?} has no scheme; write e.g. \"http://127.0.0.1:3000\"")),
    }
    if uri.authority().is_none() {
        return Err(format!("{s:?} has no host"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{s:?} has a path; give only scheme, host and port"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = r#"
[server]
http_listen = "127.0.0.1:8080"
grpc_listen = "127.0.0.1:7000"
heartbeat_timeout = "90s"

[[groups]]
name = "demo"
token = "change-me"
heartbeat_interval = "30s"
data_streams = 2

[[rules]]
host = "*.localhost"
path_prefix = "/"
group = "demo"
upstream = "web"
timeout = "30s"
"#;

    #[test]
    fn server_example_parses() {
        let c = ServerConfig::from_str_named(SERVER, "server.toml").expect("valid");
        assert_eq!(c.groups[0].heartbeat_timeout, Duration::from_secs(90));
        assert_eq!(c.groups[0].data_streams, 2);
        assert_eq!(format!("{:?}", c.groups[0].token), "\"***\"");
        let (v1, cfg) = c.group_sync("demo").expect("group");
        assert_eq!(cfg.routes[0].upstream, "web");
        let c2 = ServerConfig::from_str_named(&SERVER.replace("\"30s\"\ndata", "\"10s\"\ndata"), "s").expect("ok");
        assert_ne!(c2.group_sync("demo").expect("group").0, v1, "version follows content");
        let c3 = ServerConfig::from_str_named(&SERVER.replace("*.localhost", "app.localhost"), "s").expect("ok");
        assert_ne!(c3.group_sync("demo").expect("group").0, v1, "a rule is part of the group's config");
        assert_eq!(c.group_sync("demo").expect("group").0, v1, "stable for the same content");
    }

    /// Every transport bound is a key with a default, and set values arrive.
    #[test]
    fn transport_keys_default_and_apply() {
        let d = ServerConfig::from_str_named(SERVER, "s").expect("valid").server;
        assert_eq!(
            (d.public_max_streams, d.h2_max_remote_resets, d.h2_max_local_resets),
            (DEFAULT_PUBLIC_MAX_STREAMS, DEFAULT_H2_MAX_REMOTE_RESETS, DEFAULT_H2_MAX_LOCAL_RESETS)
        );
        assert_eq!((d.link_ping_interval, d.link_handshake_timeout), (DEFAULT_PING_INTERVAL, Duration::from_secs(10)));
        assert_eq!(d.public_connection_window, DEFAULT_PUBLIC_CONNECTION_WINDOW);
        let set = SERVER.replace(
            "heartbeat_timeout = \"90s\"",
            "heartbeat_timeout = \"90s\"\npublic_connection_window = \"64MiB\"\npublic_max_streams = 8\nh2_max_remote_resets = 5\nlink_ping_interval = \"3s\"\nlink_ping_timeout = \"2s\"\npublic_ping_timeout = \"4s\"\nlink_handshake_timeout = \"1s\"\nregistration_timeout = \"2s\"",
        );
        let s = ServerConfig::from_str_named(&set, "s").expect("valid").server;
        assert_eq!((s.public_max_streams, s.h2_max_remote_resets), (8, 5));
        assert_eq!(s.public_connection_window, 64 << 20);
        assert_eq!((s.link_ping_interval, s.link_ping_timeout), (Duration::from_secs(3), Duration::from_secs(2)));
        assert_eq!(s.public_ping_timeout, Duration::from_secs(4));
        assert_eq!(
            (s.link_handshake_timeout, s.registration_timeout),
            (Duration::from_secs(1), Duration::from_secs(2))
        );

        let client = "server = \"http://127.0.0.1:7000\"\ngroup = \"g\"\ntoken = \"t\"\n";
        let c = ClientConfig::from_str_named(client, "c").expect("valid");
        assert_eq!((c.reconnect_min, c.reconnect_max), (DEFAULT_RECONNECT_MIN, DEFAULT_RECONNECT_MAX));
        assert_eq!(c.upstream_connect_timeout, DEFAULT_UPSTREAM_CONNECT_TIMEOUT);
        let small_cap =
            ClientConfig::from_str_named(&format!("{client}reconnect_max = \"100ms\"\n"), "c").expect("valid");
        assert_eq!(small_cap.reconnect_min, Duration::from_millis(100), "the default first step follows the cap down");
        let c = ClientConfig::from_str_named(
            &format!("{client}reconnect_min = \"1s\"\nping_interval = \"5s\"\nupstream_idle_timeout = \"2s\"\n"),
            "c",
        )
        .expect("valid");
        assert_eq!((c.reconnect_min, c.ping_interval), (Duration::from_secs(1), Duration::from_secs(5)));
        assert_eq!(c.upstream_idle_timeout, Duration::from_secs(2));
    }

    /// Each bad config names the file, the line and the key.
    #[test]
    fn errors_name_file_line_and_key() {
        struct Case {
            text: String,
            expect: &'static str,
        }
        let cases = [
            Case {
                text: SERVER.replace("\"90s\"", "\"90 parsecs\""),
                expect: "server.toml:5: server.heartbeat_timeout: invalid duration",
            },
            Case {
                text: SERVER.replace("data_streams = 2", "data_streams = 0"),
                expect: "server.toml:11: groups[0].data_streams: must be 1",
            },
            Case {
                text: SERVER.replace("group = \"demo\"", "group = \"nope\""),
                expect: "server.toml:16: rules[0].group: no group named \"nope\"",
            },
            Case {
                text: SERVER.replace("path_prefix", "path_prefx"),
                expect: "server.toml:15: rules[0].path_prefx: unknown field `path_prefx`",
            },
            Case { text: SERVER.replace("[server]", "[server"), expect: "server.toml:2: syntax:" },
            Case {
                text: SERVER.replace("\"127.0.0.1:7000\"", "\"localhost:x\""),
                expect: "server.toml:4: server.grpc_listen:",
            },
            Case {
                text: format!("{SERVER}\n[[rules]]\nhost = \"a.localhost\"\ngroup = \"demo\"\nupstream = \"web\"\n"),
                expect: "server.toml:22: rules[1]: unreachable: rules[0]",
            },
        ];
        let mut wrong = Vec::new();
        for c in cases {
            let err = ServerConfig::from_str_named(&c.text, "server.toml").expect_err("invalid").to_string();
            if !err.starts_with(c.expect) {
                wrong.push(format!("got {err:?}, want {:?}", c.expect));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// The issue's flat keys and the [log] section mean the same; both at once is an error.
    #[test]
    fn log_keys_flat_or_in_their_section() {
        let flat = SERVER.replace(
            "heartbeat_timeout = \"90s\"",
            "heartbeat_timeout = \"90s\"\nlog_format = \"json\"\nlog_level = \"debug\"",
        );
        let c = ServerConfig::from_str_named(&flat, "server.toml").expect("valid");
        assert_eq!((c.log.format, c.log.level.as_deref()), (LogFormat::Json, Some("debug")));
        let both = format!("{flat}\n[log]\nlevel = \"info\"\n");
        let err = ServerConfig::from_str_named(&both, "server.toml").expect_err("both").to_string();
        assert!(err.starts_with("server.toml:7: server.log_level: set either"), "{err}");
        let client = "server = \"http://127.0.0.1:7000\"\ngroup = \"g\"\ntoken = \"t\"\nlog_format = \"json\"\n";
        let c = ClientConfig::from_str_named(client, "client.toml").expect("valid");
        assert_eq!(c.log.format, LogFormat::Json);
        let bad = client.replace("\"json\"", "\"xml\"");
        let err = ClientConfig::from_str_named(&bad, "client.toml").expect_err("bad format").to_string();
        assert!(err.starts_with("client.toml:4: log_format: unknown variant `xml`"), "{err}");
    }

    #[test]
    fn client_config_parses_and_checks_urls() {
        let text = r#"
server = "http://127.0.0.1:7000"
client_id = "edge-1"
group = "demo"
token = "change-me"
transport = "split-connection"
[upstreams]
web = "http://127.0.0.1:3000"
"#;
        let c = ClientConfig::from_str_named(text, "client.toml").expect("valid");
        assert_eq!(c.transport, Transport::SplitConnection);
        assert_eq!(c.upstreams["web"].url.port_u16(), Some(3000));
        assert!(!c.upstreams["web"].http2);
        let bad = text.replace("http://127.0.0.1:3000", "127.0.0.1:3000");
        let err = ClientConfig::from_str_named(&bad, "client.toml").expect_err("invalid").to_string();
        assert!(err.starts_with("client.toml:8: upstreams.web: "), "{err}");
        let bad = text.replace("split-connection", "carrier-pigeon");
        let err = ClientConfig::from_str_named(&bad, "client.toml").expect_err("invalid").to_string();
        assert!(err.starts_with("client.toml:6: transport: "), "{err}");
        // The table form, for h2c (gRPC) upstreams.
        let grpc = format!("{text}grpc = {{ url = \"http://127.0.0.1:50051\", http2 = true }}\n");
        let c = ClientConfig::from_str_named(&grpc, "client.toml").expect("valid");
        assert!(c.upstreams["grpc"].http2);
        assert_eq!(c.upstreams["grpc"].url.port_u16(), Some(50051));
        for (bad, want) in [
            (
                "grpc = { url = \"http://127.0.0.1:50051\", h2 = true }",
                "client.toml:9: upstreams.grpc.h2: unknown field `h2`",
            ),
            ("grpc = { http2 = true }", "client.toml:9: upstreams.grpc: missing field `url`"),
            ("grpc = 5", "client.toml:9: upstreams.grpc: invalid type: integer `5`, expected a URL string"),
            ("grpc = { url = \"ftp://x:1\" }", "client.toml:9: upstreams.grpc: scheme \"ftp\""),
        ] {
            let err =
                ClientConfig::from_str_named(&format!("{text}{bad}\n"), "client.toml").expect_err(bad).to_string();
            assert!(err.starts_with(want), "{bad}: {err}");
        }
    }
}
