//! Prometheus metrics of both daemons (prometheus-client, OpenMetrics text),
//! served at `/metrics` on `metrics_listen`. Counters and histograms are
//! updated where things happen; gauges of current state are read from the
//! registry at each scrape, so they can never drift from it.

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Durations from 1 ms to about 65 s.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Heartbeat delays and round trips from 0.5 ms to about 16 s.
fn heartbeat_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// `2xx`, `4xx`...: the status class label.
pub fn status_class(status: u32) -> String {
    format!("{}xx", status / 100)
}

/// What a leak would grow, read at each scrape: a soak (or an operator)
/// watches these stay flat.
#[derive(Default, Clone)]
struct ProcessGauges {
    resident_bytes: Gauge,
    open_fds: Gauge,
    tasks: Gauge,
}

impl ProcessGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory of the process",
            Unit::Bytes,
            self.resident_bytes.clone(),
        );
        registry.register("process_open_fds", "Open file descriptors of the process", self.open_fds.clone());
        registry.register("runtime_alive_tasks", "Tasks alive on the async runtime", self.tasks.clone());
    }

    fn refresh(&self) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let rss_kib: i64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        self.resident_bytes.set(rss_kib * 1024);
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        self.open_fds.set(fds as i64);
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            self.tasks.set(h.metrics().num_alive_tasks() as i64);
        }
    }
}

/// The server's state as one scrape reads it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub clients: i64,
    /// Streams by type ("control", "data"); types with none are left out.
    pub streams: Vec<(&'static str, i64)>,
    pub in_flight: i64,
    pub upgraded: i64,
    pub queue_depth: i64,
    /// Each group's current config version.
    pub config: Vec<(String, String)>,
    /// Traffic series kept, by subject ("group", "client", "rule").
    pub traffic_series: Vec<(&'static str, i64)>,
    /// Keys each keyed `rate_limit` remembers, by rule: one at its
    /// `rate_limit_max_keys` is forgetting keys (many clients, or an attack).
    pub rate_limit_keys: Vec<(String, i64)>,
}

/// Reads the server's state for a scrape.
pub type StateSource = Box<dyn Fn() -> ServerState + Send + Sync>;

/// The gauges of the state now, made from it at each scrape rather than
/// kept: nothing to clear and refill, no lock between two scrapes, and
/// nothing that can drift from the registry.
#[derive(Default, Clone)]
struct StateCollector(Arc<std::sync::OnceLock<StateSource>>);

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn const_gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn gauge_family<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(L, i64)],
) -> std::fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let Some(source) = self.0.get() else { return Ok(()) };
        let s = source();
        const_gauge(&mut e, "clients", "Connected tunnel clients", s.clients)?;
        let streams: Vec<_> = s.streams.iter().map(|(t, n)| ([("type", *t)], *n)).collect();
        gauge_family(&mut e, "streams", "Registered streams by type", &streams)?;
        const_gauge(&mut e, "in_flight_requests", "Exchanges in flight", s.in_flight)?;
        const_gauge(&mut e, "upgraded_connections", "Upgraded connections open", s.upgraded)?;
        const_gauge(&mut e, "outbound_queue_depth", "Frames waiting in streams' outbound queues", s.queue_depth)?;
        let config: Vec<_> =
            s.config.iter().map(|(g, v)| ([("group", g.as_str()), ("version", v.as_str())], 1)).collect();
        gauge_family(&mut e, "config_info", "Current config version of each group (value 1)", &config)?;
        let series: Vec<_> = s.traffic_series.iter().map(|(k, n)| ([("subject", *k)], *n)).collect();
        gauge_family(
            &mut e,
            "traffic_series",
            "Traffic series the console's charts are drawn from, by subject",
            &series,
        )?;
        let keys: Vec<_> = s.rate_limit_keys.iter().map(|(r, n)| ([("rule", r.as_str())], *n)).collect();
        gauge_family(
            &mut e,
            "rate_limit_keys",
            "Keys (client addresses, header values) each rule's rate_limit remembers",
            &keys,
        )
    }
}

const LINK_TUNING_HELP: &str =
    "The tunnel link sockets' TCP timers (value 1): state applied, off (not configured) or unsupported (this kernel lacks it)";

/// Sets `family` to the link tuning's state per option (`tuning::states`).
pub fn set_link_tuning(family: &Family<Labels, Gauge>, wanted: &tunnel_lib::config::LinkTuning) {
    for (option, state) in crate::tunnel::tuning::states(wanted) {
        family.get_or_create(&vec![("option", option.to_string()), ("state", state.to_string())]).set(1);
    }
}

/// The server's metrics.
pub struct ServerMetrics {
    registry: Registry,
    /// Public requests by group and status class.
    pub requests: Family<Labels, Counter>,
    /// Public request durations (head to the end of the response) by group.
    pub request_duration: Histograms,
    /// Body bytes by group and direction (`in` from public clients, `out` to them).
    pub bytes: Family<Labels, Counter>,
    /// One-way heartbeat delay as the server receives heartbeats (same-host clocks).
    pub heartbeat_delay: Histogram,
    pub streams_reaped: Counter,
    /// Config reloads by result (`ok`, `failed`).
    pub reloads: Family<Labels, Counter>,
    /// Registrations refused for an unknown group or a wrong token.
    pub auth_failures: Counter,
    /// Gauges of the state now (clients, streams, config versions...), read at each scrape.
    state: StateCollector,
    /// 1, labelled with this server's server_id and version.
    pub server_info: Family<Labels, Gauge>,
    /// The link sockets' TCP timers, by option and state (value 1).
    pub link_tuning: Family<Labels, Gauge>,
    /// 1 while draining (SIGTERM received): /ready answers 503.
    pub draining: Gauge,
    /// Requests forwarded to a peer server, by group and peer.
    pub forwarded: Family<Labels, Counter>,
    /// Exchanges forwarded here by a peer server and relayed, by group.
    pub forwarded_in: Family<Labels, Counter>,
    /// `[cluster]`: 1 while etcd answers.
    pub cluster_etcd_up: Gauge,
    /// `[cluster]`: live servers in the membership, this one included.
    pub cluster_members: Gauge,
    /// `[cluster]`: (client, server) sessions in the shared registry.
    pub cluster_holdings: Gauge,
    /// `[cluster]`: the etcd revision the view is current to.
    pub cluster_revision: Gauge,
    /// `[cluster]`: registry entries this server wrote or deleted.
    pub cluster_registry_writes: Counter,
    /// Access lines dropped because their writer fell behind.
    pub access_log_dropped: Counter,
    /// Public requests the gate refused (address, credentials, rates), by rule and reason.
    pub refused: Family<Labels, Counter>,
    /// Each group's request metrics, looked up once per group rather than
    /// by building label sets on every request.
    groups: std::sync::RwLock<std::collections::HashMap<String, Arc<GroupMetrics>>>,
    process: ProcessGauges,
}

/// One group's per-request metrics, as handles into the families.
pub struct GroupMetrics {
    group: String,
    /// By status class (index: status / 100), made on first use so that
    /// only the classes seen are exported, as before.
    classes: [std::sync::OnceLock<Counter>; 6],
    pub duration: Histogram,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    requests: Family<Labels, Counter>,
}

impl GroupMetrics {
    /// The request counter of `status`'s class.
    pub fn requests(&self, status: u32) -> &Counter {
        let i = ((status / 100) as usize).min(self.classes.len() - 1);
        self.classes[i].get_or_init(|| {
            self.requests.get_or_create(&vec![("group", self.group.clone()), ("class", status_class(status))]).clone()
        })
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tunnel");
        let m = ServerMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            bytes: Family::default(),
            heartbeat_delay: heartbeat_histogram(),
            streams_reaped: Counter::default(),
            reloads: Family::default(),
            auth_failures: Counter::default(),
            state: StateCollector::default(),
            server_info: Family::default(),
            link_tuning: Family::default(),
            draining: Gauge::default(),
            forwarded: Family::default(),
            forwarded_in: Family::default(),
            cluster_etcd_up: Gauge::default(),
            cluster_members: Gauge::default(),
            cluster_holdings: Gauge::default(),
            cluster_revision: Gauge::default(),
            cluster_registry_writes: Counter::default(),
            access_log_dropped: Counter::default(),
            refused: Family::default(),
            groups: Default::default(),
            process: ProcessGauges::default(),
            registry: Registry::default(),
        };
        m.process.register(&mut registry);
        registry.register("server_info", "This server's server_id and version (value 1)", m.server_info.clone());
        registry.register("draining", "1 while the server drains before stopping", m.draining.clone());
        registry.register("link_tuning", LINK_TUNING_HELP, m.link_tuning.clone());
        registry.register(
            "forwarded_requests",
            "Public requests forwarded to a peer server holding a client of their group, by group and peer",
            m.forwarded.clone(),
        );
        registry.register(
            "forwarded_in",
            "Exchanges forwarded here by a peer server and relayed to a client, by group",
            m.forwarded_in.clone(),
        );
        registry.register("cluster_etcd_up", "1 while etcd answers ([cluster] only)", m.cluster_etcd_up.clone());
        registry.register("cluster_members", "Live servers in the cluster's membership", m.cluster_members.clone());
        registry.register(
            "cluster_holdings",
            "Client sessions in the cluster's shared registry, over all servers",
            m.cluster_holdings.clone(),
        );
        registry.register(
            "cluster_revision",
            "The etcd revision this server's view is current to",
            m.cluster_revision.clone(),
        );
        registry.register(
            "cluster_registry_writes",
            "Registry entries this server wrote to or deleted from etcd",
            m.cluster_registry_writes.clone(),
        );
        registry.register("requests", "Public requests by group and status class", m.requests.clone());
        registry.register(
            "access_log_dropped",
            "Access lines dropped because the log's writer fell behind",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "refused_requests",
            "Public requests refused before reaching a client, by rule and reason (address, basic_auth, jwt, rate_limit, group_rate)",
            m.refused.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Public request duration, head to end of response, by group",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        registry.register_with_unit("body", "Public body bytes by group and direction", Unit::Bytes, m.bytes.clone());
        registry.register_with_unit(
            "heartbeat_delay",
            "One-way heartbeat delay at the server",
            Unit::Seconds,
            m.heartbeat_delay.clone(),
        );
        registry.register("streams_reaped", "Streams closed for a missed heartbeat", m.streams_reaped.clone());
        registry.register("config_reloads", "Config reloads by result", m.reloads.clone());
        registry.register(
            "auth_failures",
            "Registrations refused: unknown group or wrong token",
            m.auth_failures.clone(),
        );
        registry.register_collector(Box::new(m.state.clone()));
        ServerMetrics { registry, ..m }
    }
}

impl ServerMetrics {
    /// Where scrapes read the server's state from (set once, when the server
    /// is built; until then those gauges are not exported).
    pub fn set_state_source(&self, source: StateSource) {
        let _ = self.state.0.set(source);
    }

    /// The per-request metrics of `group`.
    pub fn group(&self, group: &str) -> Arc<GroupMetrics> {
        if let Some(g) = self.groups.read().unwrap_or_else(|e| e.into_inner()).get(group) {
            return g.clone();
        }
        let mut groups = self.groups.write().unwrap_or_else(|e| e.into_inner());
        groups
            .entry(group.to_string())
            .or_insert_with(|| {
                // One statement each: a family's guard lives to the end of
                // its statement, and a second lookup in it would wait on it.
                let label = |k: &'static str, v: &str| vec![("group", group.to_string()), (k, v.to_string())];
                let duration = self.request_duration.get_or_create(&vec![("group", group.to_string())]).clone();
                let bytes_in = self.bytes.get_or_create(&label("direction", "in")).clone();
                let bytes_out = self.bytes.get_or_create(&label("direction", "out")).clone();
                Arc::new(GroupMetrics {
                    group: group.to_string(),
                    classes: Default::default(),
                    duration,
                    bytes_in,
                    bytes_out,
                    requests: self.requests.clone(),
                })
            })
            .clone()
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        self.process.refresh();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The client's metrics.
pub struct ClientMetrics {
    registry: Registry,
    /// Streams the server accepted.
    pub registrations: Counter,
    /// Sessions started after the first (connection lost, server restarted...).
    pub reconnects: Counter,
    /// Time to the upstream's response head, by upstream.
    pub upstream_duration: Histograms,
    /// Upstream failures by upstream and kind.
    pub upstream_errors: Family<Labels, Counter>,
    /// Requests served, by upstream and the class of the status the public
    /// client got (a failure before the head counts as the 5xx the server sends).
    pub requests: Family<Labels, Counter>,
    /// Heartbeat round trips as the client measures them.
    pub heartbeat_rtt: Histogram,
    /// 1 for the config version each server's session applied, by server.
    pub config_info: Family<Labels, Gauge>,
    /// Streams registered now, by server (its address and server_id).
    pub server_streams: Family<Labels, Gauge>,
    /// The link sockets' TCP timers, by option and state (value 1).
    pub link_tuning: Family<Labels, Gauge>,
    /// The version in `config_info` for each server.
    applied: std::sync::Mutex<std::collections::HashMap<String, String>>,
    render_lock: std::sync::Mutex<()>,
    process: ProcessGauges,
}

impl Default for ClientMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tunnel_client");
        let m = ClientMetrics {
            registrations: Counter::default(),
            reconnects: Counter::default(),
            upstream_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            upstream_errors: Family::default(),
            requests: Family::default(),
            heartbeat_rtt: heartbeat_histogram(),
            config_info: Family::default(),
            server_streams: Family::default(),
            link_tuning: Family::default(),
            applied: Default::default(),
            render_lock: Default::default(),
            process: ProcessGauges::default(),
            registry: Registry::default(),
        };
        m.process.register(&mut registry);
        registry.register("server_streams", "Streams registered now, by server", m.server_streams.clone());
        registry.register("registrations", "Streams registered with the server", m.registrations.clone());
        registry.register("reconnects", "Sessions started after the first", m.reconnects.clone());
        registry.register_with_unit(
            "upstream_duration",
            "Time to the upstream's response head, by upstream",
            Unit::Seconds,
            m.upstream_duration.clone(),
        );
        registry.register("upstream_errors", "Upstream failures by upstream and kind", m.upstream_errors.clone());
        registry.register("requests", "Requests served, by upstream and status class", m.requests.clone());
        registry.register_with_unit("heartbeat_rtt", "Heartbeat round trip", Unit::Seconds, m.heartbeat_rtt.clone());
        registry.register("config_info", "The config version applied, by server (value 1)", m.config_info.clone());
        registry.register("link_tuning", LINK_TUNING_HELP, m.link_tuning.clone());
        ClientMetrics { registry, ..m }
    }
}

impl ClientMetrics {
    /// The text exposition.
    pub fn render(&self) -> String {
        self.process.refresh();
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The text exposition, with the per-server gauges read from `status` now.
    pub fn render_with(&self, status: &crate::client::ClientStatus) -> String {
        // Scrapes in parallel would clear and refill the same gauges over each other.
        let _one_at_a_time = self.render_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.server_streams.clear();
        for (server, s) in &status.servers {
            let labels = vec![("server", server.clone()), ("server_id", s.server_id.clone())];
            self.server_streams.get_or_create(&labels).set(s.registered_streams as i64);
        }
        self.render()
    }

    /// Drops `server`'s series: its link is gone (its address left DNS).
    pub fn forget_server(&self, server: &str) {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = applied.remove(server) {
            self.config_info.remove(&vec![("server", server.to_string()), ("version", old)]);
        }
    }

    /// Marks `version` as the one applied by the session to `server`.
    pub fn set_config(&self, server: &str, version: &str) {
        let labels = |v: &str| vec![("server", server.to_string()), ("version", v.to_string())];
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        // One series per server: the version it replaces goes.
        if let Some(old) = applied.insert(server.to_string(), version.to_string()) {
            self.config_info.remove(&labels(&old));
        }
        self.config_info.get_or_create(&labels(version)).set(1);
    }
}

/// What the metrics listener answers.
#[derive(Clone)]
pub struct Endpoints {
    /// `GET /metrics`: the text exposition.
    pub render: Arc<dyn Fn() -> String + Send + Sync>,
    /// `GET /ready`, for load balancers: Ok, or why not (a 503 with that reason).
    pub ready: Option<Arc<dyn Fn() -> Result<String, String> + Send + Sync>>,
}

/// Serves `GET /metrics` (and `/ready` if given) until `stop` fires.
pub async fn serve(listener: TcpListener, endpoints: Endpoints, stop: CancellationToken) -> anyhow::Result<()> {
    while let Some((tcp, _)) = crate::server::accept::next_connection(&listener, "metrics", &stop).await {
        let endpoints = endpoints.clone();
        let stop = stop.clone();
        // Ends when the scraper closes the connection or at shutdown.
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(req, endpoints.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
    Ok(())
}

/// The answer to `GET /ready`: 200 "ready", or 503 with the reason, one line.
pub fn ready_response(ready: Result<String, String>) -> (StatusCode, String) {
    match ready {
        Ok(note) if note.is_empty() => (StatusCode::OK, "ready\n".to_string()),
        Ok(note) => (StatusCode::OK, format!("ready; {note}\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

async fn answer(req: Request<Incoming>, endpoints: Endpoints) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    let mut resp = match (req.uri().path(), &endpoints.ready) {
        ("/metrics", _) => {
            let mut r = Response::new(Full::new(Bytes::from((endpoints.render)())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        ("/ready", Some(ready)) => {
            let (status, body) = ready_response(ready());
            text(status, body)
        }
        _ => text(StatusCode::NOT_FOUND, "metrics are at /metrics\n".to_string()),
    };
    resp.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    Ok(resp)
}
