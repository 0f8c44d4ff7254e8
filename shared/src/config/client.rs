//! client.toml: the file as written, and its checks into a `ClientConfig`.

use super::defaults::*;
use super::link::{self, LinkTuning};
use super::log::{merge_log, LogConfig, LogFormat};
use super::ranged::{self, Bound::*, SECOND, TENTH};
use super::secret::Secret;
use super::source::{parse_url, read, ConfigError, Source};
use super::tls::{check_client_tls, ClientTls, ClientTlsSection};
use crate::units::{ByteSize, DurationOrOff, HumanDuration};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// How the client lays its streams over connections (the design's plans).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Plan B, the default: control on ControlStream, data on N Proxy
    /// streams, one connection. On a lossy link it measured best: a lost
    /// segment on a busy connection is recovered by the segments after it,
    /// while a connection that carries only heartbeats waits for its timers
    /// (design.md, "Heartbeats on a lossy link").
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

/// Largest `connections`: more sessions than this per client is the
/// every-client-on-every-server shape that clustering exists to avoid.
const MAX_CONNECTIONS: usize = 16;

/// client.toml as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server: Option<Spanned<String>>,
    servers: Option<Spanned<Vec<Spanned<String>>>>,
    connections: Option<Spanned<usize>>,
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
    link_rto_min: Option<Spanned<DurationOrOff>>,
    link_delack_max: Option<Spanned<DurationOrOff>>,
    link_thin_timeouts: Option<bool>,
    link_notsent_lowat: Option<Spanned<ByteSize>>,
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

/// An `[upstreams]` entry as written: a URL, or a table with options.
enum RawUpstream {
    Url(String),
    Table(UpstreamTable),
}

/// The table form of an `[upstreams]` entry.
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
    /// Base URL, `http://host:port`, or `tcp://host:port` for a `[[tcp]]` service.
    pub url: http::Uri,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge) to it: gRPC services.
    pub http2: bool,
}

impl Upstream {
    /// Whether it is a `tcp://` upstream: connections, not HTTP requests.
    pub fn is_tcp(&self) -> bool {
        self.url.scheme_str() == Some("tcp")
    }
}

/// The whole client configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The servers' gRPC addresses, `http://host:port` (all https:// or all
    /// http://): a session to each, and to each address a name resolves to.
    pub servers: Vec<http::Uri>,
    /// With clustered servers: hold sessions to this many of the fleet's
    /// servers, learned from the servers' answers (`servers` are then only
    /// the seeds to learn it from); 0 = a session to every configured server.
    pub connections: usize,
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
    /// TCP timers set on each link connection.
    pub link_tuning: LinkTuning,
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
    /// TLS on the tunnel link: Some exactly when the servers are https://.
    pub tls: Option<ClientTls>,
    /// Prometheus `/metrics`; None = off.
    pub metrics_listen: Option<SocketAddr>,
}

impl ClientConfig {
    /// The keys whose values differ between `self` and `other`, as client.toml names them.
    pub fn changed_keys(&self, other: &ClientConfig) -> Vec<&'static str> {
        // Destructured whole: a new field must be named here to compile.
        let ClientConfig {
            servers,
            connections,
            client_id,
            group,
            token,
            transport,
            heartbeat_interval,
            data_streams,
            connect_timeout,
            reconnect_min,
            reconnect_max,
            registration_timeout,
            tcp_keepalive,
            link_tuning,
            ping_interval,
            ping_timeout,
            upstream_connect_timeout,
            upstream_idle_timeout,
            shutdown_grace,
            worker_threads,
            log,
            upstreams,
            tls,
            metrics_listen,
        } = self;
        let pairs = [
            ("servers", *servers != other.servers),
            ("connections", *connections != other.connections),
            ("client_id", *client_id != other.client_id),
            ("group", *group != other.group),
            ("token", *token != other.token),
            ("transport", *transport != other.transport),
            ("heartbeat_interval", *heartbeat_interval != other.heartbeat_interval),
            ("data_streams", *data_streams != other.data_streams),
            ("connect_timeout", *connect_timeout != other.connect_timeout),
            ("reconnect_min", *reconnect_min != other.reconnect_min),
            ("reconnect_max", *reconnect_max != other.reconnect_max),
            ("registration_timeout", *registration_timeout != other.registration_timeout),
            ("tcp_keepalive", *tcp_keepalive != other.tcp_keepalive),
            ("link_rto_min", link_tuning.rto_min != other.link_tuning.rto_min),
            ("link_delack_max", link_tuning.delack_max != other.link_tuning.delack_max),
            ("link_thin_timeouts", link_tuning.thin_timeouts != other.link_tuning.thin_timeouts),
            ("link_notsent_lowat", link_tuning.notsent_lowat != other.link_tuning.notsent_lowat),
            ("ping_interval", *ping_interval != other.ping_interval),
            ("ping_timeout", *ping_timeout != other.ping_timeout),
            ("upstream_connect_timeout", *upstream_connect_timeout != other.upstream_connect_timeout),
            ("upstream_idle_timeout", *upstream_idle_timeout != other.upstream_idle_timeout),
            ("shutdown_grace", *shutdown_grace != other.shutdown_grace),
            ("worker_threads", *worker_threads != other.worker_threads),
            ("log", *log != other.log),
            ("upstreams", *upstreams != other.upstreams),
            ("tls", *tls != other.tls),
            ("metrics_listen", *metrics_listen != other.metrics_listen),
        ];
        pairs.into_iter().filter(|(_, changed)| *changed).map(|(k, _)| k).collect()
    }

    /// Reads and checks a client.toml.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_str_named(&text, &path.display().to_string())
    }

    /// Parses and checks client.toml text; `file` names it in errors.
    pub fn from_str_named(text: &str, file: &str) -> Result<Self, ConfigError> {
        let src = Source { file, text };
        let raw: ClientFile = src.parse()?;
        // The order of the checks is the order in which errors are found.
        let (servers, tls) = check_servers(&src, &raw, raw.tls.as_ref())?;
        let (client_id, group, token) = check_identity(&src, &raw)?;
        let heartbeat_interval = ranged::value(
            &src,
            &raw.heartbeat_interval,
            "heartbeat_interval",
            DEFAULT_HEARTBEAT_INTERVAL,
            Min(MIN_HEARTBEAT_INTERVAL),
        )?;
        let data_streams =
            ranged::value(&src, &raw.data_streams, "data_streams", DEFAULT_DATA_STREAMS, Range(1, MAX_DATA_STREAMS))?;
        let connect_timeout =
            ranged::value(&src, &raw.connect_timeout, "connect_timeout", DEFAULT_CONNECT_TIMEOUT, Min(TENTH))?;
        let reconnect_max =
            ranged::value(&src, &raw.reconnect_max, "reconnect_max", DEFAULT_RECONNECT_MAX, Min(TENTH))?;
        let reconnect_min = check_reconnect_min(&src, &raw.reconnect_min, reconnect_max)?;
        let upstreams = check_upstreams(&src, &raw.upstreams)?;
        Ok(ClientConfig {
            servers,
            connections: ranged::value(&src, &raw.connections, "connections", 0, Range(0, MAX_CONNECTIONS))?,
            client_id,
            group,
            token,
            transport: raw.transport,
            heartbeat_interval,
            data_streams,
            connect_timeout,
            reconnect_min,
            reconnect_max,
            registration_timeout: ranged::value(
                &src,
                &raw.registration_timeout,
                "registration_timeout",
                DEFAULT_REGISTRATION_TIMEOUT,
                Min(TENTH),
            )?,
            tcp_keepalive: ranged::value(
                &src,
                &raw.tcp_keepalive,
                "tcp_keepalive",
                DEFAULT_TCP_KEEPALIVE,
                Min(SECOND),
            )?,
            link_tuning: link::check(
                &src,
                "",
                &link::RawLink {
                    link_rto_min: raw.link_rto_min.clone(),
                    link_delack_max: raw.link_delack_max.clone(),
                    link_thin_timeouts: raw.link_thin_timeouts,
                    link_notsent_lowat: raw.link_notsent_lowat.clone(),
                },
            )?,
            ping_interval: ranged::value(
                &src,
                &raw.ping_interval,
                "ping_interval",
                DEFAULT_PING_INTERVAL,
                Min(SECOND),
            )?,
            ping_timeout: ranged::value(&src, &raw.ping_timeout, "ping_timeout", DEFAULT_PING_TIMEOUT, Min(SECOND))?,
            upstream_connect_timeout: ranged::value(
                &src,
                &raw.upstream_connect_timeout,
                "upstream_connect_timeout",
                DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
                Min(TENTH),
            )?,
            upstream_idle_timeout: ranged::value(
                &src,
                &raw.upstream_idle_timeout,
                "upstream_idle_timeout",
                DEFAULT_UPSTREAM_IDLE_TIMEOUT,
                Min(SECOND),
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

/// The servers' URLs (`server` for one, `servers` for several, never both)
/// and the `[tls]` section, which is there exactly when the URLs are
/// https:// (an https:// URL alone trusts the system's roots).
fn check_servers(
    src: &Source,
    raw: &ClientFile,
    tls: Option<&Spanned<ClientTlsSection>>,
) -> Result<(Vec<http::Uri>, Option<ClientTls>), ConfigError> {
    let schemes = &["http", "https"];
    let urls: Vec<http::Uri> = match (&raw.server, &raw.servers) {
        (Some(_), Some(list)) => {
            return Err(src.at(list, "servers", "server and servers are both set; list every server in servers alone"))
        }
        (None, None) => {
            return Err(src.error(None, "top level", "missing field `server` (or `servers` for several)"));
        }
        (Some(one), None) => vec![parse_url(one.get_ref(), schemes).map_err(|m| src.at(one, "server", m))?],
        (None, Some(list)) if list.get_ref().is_empty() => {
            return Err(src.at(list, "servers", "is empty; list at least one server URL"))
        }
        (None, Some(list)) => {
            let mut urls: Vec<http::Uri> = Vec::new();
            for (i, entry) in list.get_ref().iter().enumerate() {
                let key = format!("servers[{i}]");
                let url = parse_url(entry.get_ref(), schemes).map_err(|m| src.at(entry, key.as_str(), m))?;
                if let Some(first) = urls.first() {
                    if first.scheme_str() != url.scheme_str() {
                        return Err(src.at(
                            entry,
                            key,
                            "mixes http:// and https:// URLs; [tls] applies to every server",
                        ));
                    }
                }
                if urls.iter().any(|u| u.authority() == url.authority()) {
                    return Err(src.at(entry, key, "is listed twice"));
                }
                urls.push(url);
            }
            urls
        }
    };
    let https = urls.first().is_some_and(|u| u.scheme_str() == Some("https"));
    let tls = match (https, tls) {
        (false, Some(t)) => return Err(src.at(t, "tls", "is set but server is http://; use an https:// URL for TLS")),
        (false, None) => None,
        (true, None) => Some(ClientTls::default()),
        (true, Some(t)) => Some(check_client_tls(src, t.get_ref())?),
    };
    Ok((urls, tls))
}

/// Who the client is: its id (default: the host name), group and token.
fn check_identity(src: &Source, raw: &ClientFile) -> Result<(String, String, Secret), ConfigError> {
    let client_id = name_or_host_name(src, &raw.client_id, "client_id")?;
    if raw.group.get_ref().trim().is_empty() {
        return Err(src.at(&raw.group, "group", "group name is empty"));
    }
    if raw.token.get_ref().expose().is_empty() {
        return Err(src.at(&raw.token, "token", "token is empty"));
    }
    Ok((client_id, raw.group.get_ref().trim().to_string(), raw.token.get_ref().clone()))
}

/// The first reconnect delay: unset, it follows a small cap down; set, it
/// must fit under the cap.
fn check_reconnect_min(
    src: &Source,
    raw: &Option<Spanned<HumanDuration>>,
    reconnect_max: Duration,
) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(DEFAULT_RECONNECT_MIN.min(reconnect_max)),
        Some(d) if d.get_ref().0 > reconnect_max => {
            let cap = humantime::format_duration(reconnect_max);
            Err(src.at(d, "reconnect_min", format!("must not exceed reconnect_max ({cap})")))
        }
        Some(_) => ranged::value(src, raw, "reconnect_min", DEFAULT_RECONNECT_MIN, Min(TENTH)),
    }
}

/// The `[upstreams]` entries: http:// URLs, and tcp:// addresses for `[[tcp]]` services.
fn check_upstreams(
    src: &Source,
    raw: &BTreeMap<String, Spanned<RawUpstream>>,
) -> Result<BTreeMap<String, Upstream>, ConfigError> {
    let mut upstreams = BTreeMap::new();
    for (name, entry) in raw {
        let (url, http2) = match entry.get_ref() {
            RawUpstream::Url(u) => (u, false),
            RawUpstream::Table(t) => (&t.url, t.http2),
        };
        let key = format!("upstreams.{name}");
        let url = parse_url(url, &["http", "tcp"]).map_err(|m| src.at(entry, key.clone(), m))?;
        let tcp = url.scheme_str() == Some("tcp");
        if tcp && http2 {
            return Err(src.at(entry, key, "http2 is for http:// upstreams; a tcp:// one carries any protocol"));
        }
        if tcp && url.port_u16().is_none() {
            return Err(src.at(entry, key, "a tcp:// upstream needs a port, e.g. \"tcp://127.0.0.1:22\""));
        }
        upstreams.insert(name.clone(), Upstream { url, http2 });
    }
    Ok(upstreams)
}
