//! `[server]`: the listeners and server-wide settings.

use crate::config::defaults::*;
use crate::config::link::{self, LinkTuning};
use crate::config::log::LogFormat;
use crate::config::ranged::{self, Bound::*, SECOND, TENTH};
use crate::config::secret::Secret;
use crate::config::source::{ConfigError, Source};
use crate::config::tls::{check_link_tls, LinkTls, LinkTlsSection};
use crate::frame::MIN_EXCHANGE_WINDOW;
use crate::policy::{ForwardedHeader, NetList};
use crate::units::{ByteSize, DurationOrOff, HumanDuration};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;
use toml::Spanned;

/// `[server]` as written. The keys other sections' checks need are theirs to read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerSection {
    http_listen: Option<SocketAddr>,
    grpc_listen: Option<SocketAddr>,
    admin_listen: Option<Spanned<SocketAddr>>,
    admin_token: Option<Spanned<Secret>>,
    #[serde(default)]
    config_push: ConfigPush,
    pub(super) heartbeat_timeout: Option<Spanned<HumanDuration>>,
    server_id: Option<Spanned<String>>,
    shutdown_grace: Option<HumanDuration>,
    drain_delay: Option<HumanDuration>,
    worker_threads: Option<usize>,
    max_streams_per_connection: Option<u32>,
    max_connections: Option<usize>,
    header_read_timeout: Option<Spanned<HumanDuration>>,
    keepalive_timeout: Option<Spanned<HumanDuration>>,
    max_header_bytes: Option<Spanned<ByteSize>>,
    max_headers: Option<Spanned<usize>>,
    max_uri_bytes: Option<Spanned<ByteSize>>,
    capture_limit: Option<Spanned<ByteSize>>,
    trusted_proxies: Option<Spanned<Vec<String>>>,
    client_address_header: Option<ForwardedHeader>,
    rate_limit_max_keys: Option<Spanned<usize>>,
    pub(super) https_listen: Option<Spanned<SocketAddr>>,
    metrics_listen: Option<SocketAddr>,
    tls: Option<LinkTlsSection>,
    link_handshake_timeout: Option<Spanned<HumanDuration>>,
    registration_timeout: Option<Spanned<HumanDuration>>,
    tcp_keepalive: Option<Spanned<HumanDuration>>,
    link_ping_interval: Option<Spanned<HumanDuration>>,
    link_ping_timeout: Option<Spanned<HumanDuration>>,
    link_rto_min: Option<Spanned<DurationOrOff>>,
    link_delack_max: Option<Spanned<DurationOrOff>>,
    link_thin_timeouts: Option<bool>,
    link_notsent_lowat: Option<Spanned<ByteSize>>,
    public_ping_interval: Option<Spanned<HumanDuration>>,
    public_ping_timeout: Option<Spanned<HumanDuration>>,
    public_max_streams: Option<Spanned<u32>>,
    public_connection_window: Option<Spanned<ByteSize>>,
    h2_max_remote_resets: Option<Spanned<usize>>,
    h2_max_local_resets: Option<Spanned<usize>>,
    pub(super) log_level: Option<Spanned<String>>,
    pub(super) log_format: Option<Spanned<LogFormat>>,
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
    /// Names this server in its acknowledgements, logs, metrics and the
    /// console (default: the host name); unique within a fleet.
    pub server_id: String,
    pub shutdown_grace: Duration,
    /// At SIGTERM, how long /ready says 503 while the server still serves,
    /// before its public listeners close: a load balancer's detection time.
    pub drain_delay: Duration,
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
    /// Bytes the console's request captures (heads, and bodies of rules
    /// with `capture_bodies`) may hold in all; the oldest go first.
    pub capture_limit: u64,
    /// Load balancers whose `client_address_header` names the public
    /// client (right-most untrusted hop); from anyone else it is not believed.
    pub trusted_proxies: NetList,
    /// The header trusted proxies name the client in.
    pub client_address_header: ForwardedHeader,
    /// Keys (client addresses, header values) each `rate_limit` remembers
    /// at most; past it, the least recently seen key is forgotten.
    pub rate_limit_max_keys: usize,
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
    /// TCP timers set on each accepted link connection (new ones after a reload).
    pub link_tuning: LinkTuning,
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

/// Checks `[server]` and its `[server.tls]`; the keys are checked (and the
/// first error reported) in the order of `ServerSettings`.
pub(super) fn check(src: &Source, s: &ServerSection) -> Result<ServerSettings, ConfigError> {
    let (admin_listen, admin_token) = check_admin(src, s)?;
    Ok(ServerSettings {
        http_listen: s.http_listen.unwrap_or_else(|| parse_default_addr(DEFAULT_HTTP_LISTEN)),
        grpc_listen: s.grpc_listen.unwrap_or_else(|| parse_default_addr(DEFAULT_GRPC_LISTEN)),
        admin_listen,
        admin_token,
        config_push: s.config_push,
        server_id: name_or_host_name(src, &s.server_id, "server.server_id")?,
        shutdown_grace: s.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
        drain_delay: s.drain_delay.map_or(Duration::ZERO, |d| d.0),
        worker_threads: s.worker_threads.unwrap_or_else(default_worker_threads),
        max_streams_per_connection: s.max_streams_per_connection.unwrap_or(DEFAULT_MAX_STREAMS_PER_CONNECTION),
        max_connections: s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        header_read_timeout: ranged::value(
            src,
            &s.header_read_timeout,
            "server.header_read_timeout",
            DEFAULT_HEADER_READ_TIMEOUT,
            Above(Duration::ZERO),
        )?,
        keepalive_timeout: ranged::value(
            src,
            &s.keepalive_timeout,
            "server.keepalive_timeout",
            DEFAULT_KEEPALIVE_TIMEOUT,
            Above(Duration::ZERO),
        )?,
        max_header_bytes: ranged::value(
            src,
            &s.max_header_bytes,
            "server.max_header_bytes",
            DEFAULT_MAX_HEADER_BYTES,
            Min(MIN_MAX_HEADER_BYTES),
        )?,
        // hyper sizes a parse buffer by it: a typo must not cost gigabytes per request.
        max_headers: ranged::value(
            src,
            &s.max_headers,
            "server.max_headers",
            DEFAULT_MAX_HEADERS,
            Range(1, MAX_MAX_HEADERS),
        )?,
        max_uri_bytes: ranged::value(src, &s.max_uri_bytes, "server.max_uri_bytes", DEFAULT_MAX_URI_BYTES, Min(256))?,
        capture_limit: ranged::value(
            src,
            &s.capture_limit,
            "server.capture_limit",
            DEFAULT_CAPTURE_LIMIT,
            Range(64 * 1024, MAX_CAPTURE_LIMIT),
        )?,
        trusted_proxies: match &s.trusted_proxies {
            None => NetList::default(),
            Some(t) => NetList::parse(t.get_ref()).map_err(|m| src.at(t, "server.trusted_proxies", m))?,
        },
        client_address_header: s.client_address_header.unwrap_or_default(),
        rate_limit_max_keys: ranged::value(
            src,
            &s.rate_limit_max_keys,
            "server.rate_limit_max_keys",
            DEFAULT_RATE_LIMIT_MAX_KEYS,
            Range(1, MAX_RATE_LIMIT_MAX_KEYS),
        )?,
        https_listen: s.https_listen.as_ref().map(|a| *a.get_ref()),
        metrics_listen: s.metrics_listen,
        tls: s.tls.as_ref().map(|t| check_link_tls(src, t)).transpose()?,
        link_handshake_timeout: ranged::value(
            src,
            &s.link_handshake_timeout,
            "server.link_handshake_timeout",
            DEFAULT_LINK_HANDSHAKE_TIMEOUT,
            Min(TENTH),
        )?,
        registration_timeout: ranged::value(
            src,
            &s.registration_timeout,
            "server.registration_timeout",
            DEFAULT_REGISTRATION_TIMEOUT,
            Min(TENTH),
        )?,
        tcp_keepalive: ranged::value(
            src,
            &s.tcp_keepalive,
            "server.tcp_keepalive",
            DEFAULT_TCP_KEEPALIVE,
            Min(SECOND),
        )?,
        link_ping_interval: ranged::value(
            src,
            &s.link_ping_interval,
            "server.link_ping_interval",
            DEFAULT_PING_INTERVAL,
            Min(SECOND),
        )?,
        link_ping_timeout: ranged::value(
            src,
            &s.link_ping_timeout,
            "server.link_ping_timeout",
            DEFAULT_PING_TIMEOUT,
            Min(SECOND),
        )?,
        link_tuning: link::check(
            src,
            "server.",
            &link::RawLink {
                link_rto_min: s.link_rto_min.clone(),
                link_delack_max: s.link_delack_max.clone(),
                link_thin_timeouts: s.link_thin_timeouts,
                link_notsent_lowat: s.link_notsent_lowat.clone(),
            },
        )?,
        public_ping_interval: ranged::value(
            src,
            &s.public_ping_interval,
            "server.public_ping_interval",
            DEFAULT_PING_INTERVAL,
            Min(SECOND),
        )?,
        public_ping_timeout: ranged::value(
            src,
            &s.public_ping_timeout,
            "server.public_ping_timeout",
            DEFAULT_PING_TIMEOUT,
            Min(SECOND),
        )?,
        public_max_streams: ranged::value(
            src,
            &s.public_max_streams,
            "server.public_max_streams",
            DEFAULT_PUBLIC_MAX_STREAMS,
            Range(1, 10_000),
        )?,
        public_connection_window: ranged::value(
            src,
            &s.public_connection_window,
            "server.public_connection_window",
            DEFAULT_PUBLIC_CONNECTION_WINDOW,
            Range(u64::from(MIN_EXCHANGE_WINDOW), MAX_PUBLIC_CONNECTION_WINDOW),
        )?,
        h2_max_remote_resets: ranged::value(
            src,
            &s.h2_max_remote_resets,
            "server.h2_max_remote_resets",
            DEFAULT_H2_MAX_REMOTE_RESETS,
            Range(1, 100_000),
        )?,
        h2_max_local_resets: ranged::value(
            src,
            &s.h2_max_local_resets,
            "server.h2_max_local_resets",
            DEFAULT_H2_MAX_LOCAL_RESETS,
            Range(1, 100_000),
        )?,
    })
}

/// The admin listener and its token: off loopback, a token is required, or
/// anyone who reaches the port could close streams.
fn check_admin(src: &Source, s: &ServerSection) -> Result<(SocketAddr, Option<Secret>), ConfigError> {
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
    Ok((admin_listen, admin_token))
}

fn parse_default_addr(s: &str) -> SocketAddr {
    s.parse().expect("built-in default addresses are valid")
}
