//! The defaults and bounds of the keys of both files, and the defaults that
//! depend on the machine.

use std::time::Duration;

/// Default public HTTP listener.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
/// Default gRPC listener that tunnel clients dial.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:7000";
/// Default admin (introspection) listener the console connects to.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7001";
/// Default heartbeat interval of a group's streams.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Shortest heartbeat interval accepted: fast enough to reap a dead link
/// within about a second (250 ms beats, a 750 ms timeout, a reaper looking
/// every 500 ms; tested on a lossy link), slow enough that a fleet's
/// heartbeats stay a small load on the server.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
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
/// The request captures' memory, in all: 16 MiB.
pub const DEFAULT_CAPTURE_LIMIT: u64 = 16 << 20;
/// At most 1 GiB: a typo must not let captures take the machine's memory.
pub const MAX_CAPTURE_LIMIT: u64 = 1 << 30;
/// A rule's `capture_bodies` keeps at most this much of each body.
pub const MAX_CAPTURE_BODIES: u64 = 1 << 20;
/// Keys a `rate_limit` remembers by default: about 100 bytes each, so
/// 10 MiB per limited rule at worst, whatever an attacker rotates through.
pub const DEFAULT_RATE_LIMIT_MAX_KEYS: usize = 100_000;
/// Most keys a `rate_limit` may be told to remember.
pub const MAX_RATE_LIMIT_MAX_KEYS: usize = 10_000_000;
/// A `[[tcp]]` connection silent both ways this long is closed (an SSH
/// session with keepalives off sits idle for long).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default cap on a `[[tcp]]` service's open connections.
pub const DEFAULT_TCP_MAX_CONNECTIONS: usize = 1000;
/// Default cap on requests in flight to one client of a group.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1000;
/// Default bound on a link connection's TLS handshake, or on its first plaintext byte.
pub const DEFAULT_LINK_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on a tunnel stream's registration and its acknowledgement.
pub const DEFAULT_REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Default TCP keepalive idle time, for peers that vanish without a FIN.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Default minimum retransmission timeout of a tunnel-link socket (Linux
/// 6.15+; docs/benchmarks.md section 12 measured the choice).
pub const DEFAULT_LINK_RTO_MIN: Option<Duration> = Some(Duration::from_millis(20));
/// Default maximum delayed-ACK time of a tunnel-link socket.
pub const DEFAULT_LINK_DELACK_MAX: Option<Duration> = Some(Duration::from_millis(8));
/// Default for TCP_THIN_LINEAR_TIMEOUTS on tunnel-link sockets.
pub const DEFAULT_LINK_THIN_TIMEOUTS: bool = false;
/// Default TCP_NOTSENT_LOWAT of tunnel-link sockets.
pub const DEFAULT_LINK_NOTSENT_LOWAT: Option<u32> = Some(128 << 10);
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

/// The machine's host name, or "localhost" when it cannot be read.
pub fn default_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A name key (`client_id`, `server_id`) that defaults to the host name:
/// trimmed, and refused when set but empty.
pub(super) fn name_or_host_name(
    src: &super::source::Source,
    raw: &Option<toml::Spanned<String>>,
    key: &str,
) -> Result<String, super::source::ConfigError> {
    match raw {
        Some(id) if id.get_ref().trim().is_empty() => Err(src.at(id, key, "is empty; omit it to use the host name")),
        Some(id) => Ok(id.get_ref().trim().to_string()),
        None => Ok(default_host_name()),
    }
}
