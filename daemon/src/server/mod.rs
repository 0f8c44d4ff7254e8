//! tunnel-server: the gRPC endpoint clients dial, the public HTTP ingress,
//! the registry of live streams, and config reloads pushed to clients.

pub mod accept;
pub mod access;
pub mod budget;
pub mod capture;
pub mod cluster;
pub mod events;
pub mod gate;
pub mod ingress;
pub mod introspection;
pub mod keepalive;
pub mod peer;
pub mod recent;
pub mod registry;
pub mod reload;
pub mod replay;
pub mod service;
pub mod tcp;
pub mod traffic;

use anyhow::Context as _;
use recent::RequestLog;
use registry::Registry;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_lib::config::ServerConfig;
use tunnel_lib::proto::{tunnel_message::Payload, Drain};

/// How often silent streams are looked for.
const REAP_INTERVAL: Duration = Duration::from_millis(500);
/// Bound on the gRPC server's own graceful stop, after our grace period
/// (hyper's graceful shutdown can wait forever on long-lived streams).
const GRPC_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The server's listeners, bound before `run` so tests can use port 0.
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    /// Introspection, for the console.
    pub admin: TcpListener,
    /// Public HTTPS; served only when the config has `https_listen`.
    pub https: Option<TcpListener>,
    /// Prometheus metrics; served only when the config has `metrics_listen`.
    pub metrics: Option<TcpListener>,
    /// Forwarded requests from peer servers; with `[cluster] peer_listen`.
    pub peer: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(cfg: &ServerConfig) -> anyhow::Result<Self> {
        let http = TcpListener::bind(cfg.server.http_listen)
            .await
            .with_context(|| format!("binding http_listen {}", cfg.server.http_listen))?;
        let grpc = TcpListener::bind(cfg.server.grpc_listen)
            .await
            .with_context(|| format!("binding grpc_listen {}", cfg.server.grpc_listen))?;
        let admin = TcpListener::bind(cfg.server.admin_listen)
            .await
            .with_context(|| format!("binding admin_listen {}", cfg.server.admin_listen))?;
        let https = match cfg.server.https_listen {
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("binding https_listen {a}"))?),
            None => None,
        };
        let metrics = match cfg.server.metrics_listen {
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("binding metrics_listen {a}"))?),
            None => None,
        };
        let peer = match cfg.cluster.as_ref().and_then(|c| c.peer_listen) {
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("binding cluster.peer_listen {a}"))?),
            None => None,
        };
        Ok(Listeners { http, grpc, admin, https, metrics, peer })
    }

    /// Binds all four on 127.0.0.1 with ports chosen by the system (tests, demos).
    pub async fn ephemeral() -> anyhow::Result<Self> {
        let bind = || TcpListener::bind("127.0.0.1:0");
        Ok(Listeners {
            http: bind().await?,
            grpc: bind().await?,
            admin: bind().await?,
            https: Some(bind().await?),
            metrics: Some(bind().await?),
            peer: None,
        })
    }

    /// The metrics listener's address, if there is one.
    pub fn metrics_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.metrics.as_ref().map(|l| l.local_addr()).transpose()
    }

    /// The HTTPS listener's address, if there is one.
    pub fn https_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.https.as_ref().map(|l| l.local_addr()).transpose()
    }

    /// The bound addresses (public HTTP, gRPC, admin).
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr, SocketAddr)> {
        Ok((self.http.local_addr()?, self.grpc.local_addr()?, self.admin.local_addr()?))
    }
}

/// State every part of the server shares.
pub struct Shared {
    config: RwLock<Arc<ServerConfig>>,
    /// Each group's config version, computed once per config.
    versions: RwLock<Arc<BTreeMap<String, String>>>,
    /// Public requests: totals and the recent ones.
    pub requests: RequestLog,
    /// Their access lines, written off the runtime thread.
    pub access: access::AccessLog,
    /// Their counts over time, per server, group, client and rule.
    pub traffic: traffic::Traffic,
    /// What happened to clients, streams and config, for the console's timeline.
    pub events: events::Events,
    /// Requests whose bodies are kept for the console's inspector.
    pub captures: capture::Captures,
    /// Replays from the console on their way through the ingress.
    pub replays: replay::Replays,
    /// The rules' access policies' state: rate buckets, verified credentials.
    pub gate: gate::Gate,
    /// Streams closed for an overdue heartbeat, since start.
    pub streams_reaped: AtomicU64,
    /// Exchanges closed because nothing moved for their rule's idle_timeout.
    pub exchanges_idle_closed: AtomicU64,
    /// The listeners' bound addresses, for introspection.
    pub addrs: OnceLock<(SocketAddr, SocketAddr, SocketAddr)>,
    /// Each `[[tcp]]` service's configured and bound address.
    pub tcp_addrs: OnceLock<Vec<(SocketAddr, SocketAddr)>>,
    /// Where the config came from, for reloads.
    pub config_path: Option<PathBuf>,
    pub registry: Registry,
    /// Membership and the shared registry in etcd; None when standalone.
    pub cluster: Option<Arc<cluster::Cluster>>,
    /// Connections to peer servers, for forwarded requests.
    pub peers: peer::Peers,
    /// The fleet's groups and rules from etcd and their revision, once pushed.
    pushed: std::sync::Mutex<Option<(tunnel_lib::config::PushedConfig, i64)>>,
    pub server_id: String,
    pub started: Instant,
    pub started_at: SystemTime,
    /// Parent of every stream's token: cancelling it closes all streams.
    pub streams: CancellationToken,
    /// Stream reader tasks, waited for at shutdown.
    pub tasks: TaskTracker,
    /// Set at SIGTERM: /ready answers 503 so load balancers move traffic away.
    draining: AtomicBool,
    /// rustls settings of the tunnel link (None: plaintext) and of the HTTPS
    /// ingress, re-read from their files on every reload.
    tls: RwLock<TlsSettings>,
    /// (link TLS on, HTTPS on), as the server started.
    tls_modes: OnceLock<(bool, bool)>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::ServerMetrics,
}

/// The TLS settings in force.
#[derive(Default, Clone)]
struct TlsSettings {
    link: Option<Arc<tunnel_lib::tls::rustls::ServerConfig>>,
    ingress: Option<Arc<tunnel_lib::tls::rustls::ServerConfig>>,
}

impl Shared {
    /// The config in force now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_config(&self, cfg: ServerConfig) {
        *self.versions.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(group_versions(&cfg));
        let cfg = Arc::new(cfg);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = cfg.clone();
        // After the swap: a request on the old config could otherwise make
        // a limit again that the new one dropped.
        self.gate.reconfigured(&cfg);
    }

    /// The fleet's pushed groups and rules in force, with their etcd revision.
    pub fn pushed(&self) -> Option<(tunnel_lib::config::PushedConfig, i64)> {
        self.pushed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_pushed(&self, pushed: tunnel_lib::config::PushedConfig, revision: i64) {
        *self.pushed.lock().unwrap_or_else(|e| e.into_inner()) = Some((pushed, revision));
    }

    /// The tunnel link's TLS settings now; None when it is plaintext.
    pub fn link_tls(&self) -> Option<Arc<tunnel_lib::tls::rustls::ServerConfig>> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).link.clone()
    }

    /// The HTTPS ingress's TLS settings now.
    pub fn ingress_tls(&self) -> Option<Arc<tunnel_lib::tls::rustls::ServerConfig>> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).ingress.clone()
    }

    /// Reads `cfg`'s certificates and keys and puts them in force; on error
    /// the ones in force stay. Whether the link has TLS and whether HTTPS is
    /// served are fixed at start, like the listen addresses: a reload that
    /// turns either on or off is warned about and applies at the next restart
    /// (silently dropping to a plaintext link would be worse).
    pub fn load_tls(&self, cfg: &ServerConfig) -> Result<(), tunnel_lib::tls::TlsError> {
        let mut settings = self.tls.write().unwrap_or_else(|e| e.into_inner());
        let started = *self.tls_modes.get_or_init(|| (cfg.server.tls.is_some(), cfg.server.https_listen.is_some()));
        let link = match (started.0, &cfg.server.tls) {
            (true, Some(t)) => Some(t.load()?),
            (false, None) => None,
            (on, _) => {
                tracing::warn!(
                    tls_on_now = on,
                    "[server.tls] was added or removed: the tunnel link keeps its mode until a restart"
                );
                settings.link.clone()
            }
        };
        let ingress = match (started.1, cfg.server.https_listen.is_some()) {
            (true, true) => cfg.ingress_tls()?,
            (false, false) => None,
            (on, _) => {
                tracing::warn!(https_on_now = on, "https_listen was added or removed: it applies at the next restart");
                settings.ingress.clone()
            }
        };
        *settings = TlsSettings { link, ingress };
        Ok(())
    }

    /// Records a finished public request: the console's log and the metrics.
    /// `took` is the precise duration; the record keeps whole milliseconds.
    /// `head` is what the inspector shows of it.
    pub fn record_request(
        &self,
        rec: tunnel_lib::introspection::RequestInfo,
        took: Duration,
        mut head: Option<capture::Head>,
    ) {
        let m = &self.metrics;
        if !rec.forwarded_to.is_empty() {
            m.forwarded.get_or_create(&vec![("group", rec.group.clone()), ("peer", rec.forwarded_to.clone())]).inc();
        }
        let g = m.group(&rec.group);
        g.requests(rec.status).inc();
        g.duration.observe(took.as_secs_f64());
        g.bytes_in.inc_by(rec.bytes_in);
        g.bytes_out.inc_by(rec.bytes_out);
        let sample = traffic::Sample {
            group: &rec.group,
            client: &rec.client_id,
            rule: &rec.rule,
            status: rec.status,
            // A 4xx the tunnel answered itself (no route, too large) is a 4xx.
            errored: recent::is_error(&rec),
            upgraded: rec.status == 101,
            took,
            bytes_in: rec.bytes_in,
            bytes_out: rec.bytes_out,
        };
        self.traffic.record(rec.unix_ms + took.as_millis() as i64, &sample);
        if let Some(h) = &mut head {
            h.ended();
        }
        let bodies = head.as_ref().is_some_and(|h| h.bodies.is_some());
        let recorded = self.requests.record(rec, head);
        if bodies {
            self.captures.keep(recorded.clone(), self.config().server.capture_limit);
        }
        self.access.record(recorded.info.clone());
    }

    /// One line for `systemctl status`: clients, streams, requests in flight, config versions.
    pub fn status_line(&self) -> String {
        let streams = self.registry.streams();
        let clients = distinct_clients(&streams);
        let in_flight: usize = streams.iter().map(|s| s.in_flight).sum();
        let versions = self.versions.read().unwrap_or_else(|e| e.into_inner()).clone();
        let config: Vec<String> = versions.iter().map(|(g, v)| format!("{g}={v}")).collect();
        format!("{} clients, {} streams, {in_flight} in flight, config {}", clients, streams.len(), config.join(" "))
    }

    /// The metrics text.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    /// The state the scrape-time gauges show, read from the registry now.
    fn scrape_state(&self) -> crate::metrics::ServerState {
        let streams = self.registry.streams();
        let control = streams.iter().filter(|s| s.stream_type == tunnel_lib::proto::StreamType::Control).count();
        let by_type = [("control", control as i64), ("data", (streams.len() - control) as i64)];
        let (groups, clients, rules) = self.traffic.subjects();
        crate::metrics::ServerState {
            clients: distinct_clients(&streams) as i64,
            streams: by_type.into_iter().filter(|(_, n)| *n > 0).collect(),
            in_flight: streams.iter().map(|s| s.in_flight as i64).sum(),
            upgraded: streams.iter().map(|s| s.upgraded as i64).sum(),
            queue_depth: streams.iter().map(|s| s.queue_depth as i64).sum(),
            config: self
                .versions
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(g, v)| (g.clone(), v.clone()))
                .collect(),
            traffic_series: vec![("group", groups as i64), ("client", clients as i64), ("rule", rules as i64)],
            rate_limit_keys: self.gate.keys(),
        }
    }

    /// Whether a load balancer should send public traffic here (`GET /ready`):
    /// not while draining, nor before any client has registered (every
    /// request would fail with 502 "no client").
    /// Ok carries a note for the operator (empty when all is well): an
    /// unreachable etcd leaves the server ready, serving from what it holds.
    pub fn readiness(&self) -> Result<String, String> {
        if self.is_draining() {
            return Err("draining: the server is shutting down".into());
        }
        // A clustered server serves what it cannot itself through its peers.
        let forwards = self.cluster.as_ref().is_some_and(|c| c.with_view(|v| v.can_forward(&self.server_id)));
        if !self.registry.can_serve() && !forwards {
            return Err(match self.cluster {
                Some(_) => "no tunnel client registered here or on a peer that takes forwarded requests".into(),
                None => "no tunnel client registered".into(),
            });
        }
        match self.cluster.as_ref().and_then(|c| c.outage()) {
            Some((since, why)) => {
                let secs = since.elapsed().map_or(0, |d| d.as_secs());
                Ok(format!("etcd unreachable for {secs}s ({why}); serving with the registry and config held"))
            }
            None => Ok(String::new()),
        }
    }

    /// Turns /ready to 503 for the rest of the server's life.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.metrics.draining.set(1);
        if let Some(c) = &self.cluster {
            c.start_draining();
        }
    }

    /// True from SIGTERM on.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// A request's record with its head, by request_id: a recent one, or
    /// one whose bodies are still kept.
    pub fn capture_of(&self, request_id: &str) -> Option<Arc<capture::Recorded>> {
        self.requests.find(request_id).or_else(|| self.captures.find(request_id))
    }

    /// Values masked wherever they appear in a captured head: the group tokens.
    pub fn secrets(&self) -> Vec<String> {
        self.config().groups.iter().map(|g| g.token.expose().to_string()).collect()
    }

    /// The current config version of `group`.
    pub fn group_version(&self, group: &str) -> Option<String> {
        self.versions.read().unwrap_or_else(|e| e.into_inner()).get(group).cloned()
    }
}

/// Clients with at least one of `streams`.
fn distinct_clients(streams: &[registry::StreamView]) -> usize {
    streams.iter().map(|s| s.client_id.as_str()).collect::<std::collections::BTreeSet<_>>().len()
}

pub(crate) fn group_versions(cfg: &ServerConfig) -> BTreeMap<String, String> {
    cfg.groups.iter().filter_map(|g| cfg.group_sync(&g.name).map(|(v, _)| (g.name.clone(), v))).collect()
}

/// A server ready to run.
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// A server on `config`; `config_path` is re-read on SIGHUP and on change.
    pub fn new(config: ServerConfig, config_path: Option<PathBuf>) -> Self {
        let server_id = config.server.server_id.clone();
        let cluster = config.cluster.clone().map(|c| Arc::new(cluster::Cluster::new(c, server_id.clone())));
        let metrics = crate::metrics::ServerMetrics::default();
        let shared = Arc::new(Shared {
            versions: RwLock::new(Arc::new(group_versions(&config))),
            config: RwLock::new(Arc::new(config)),
            requests: RequestLog::default(),
            access: access::AccessLog::new(metrics.access_log_dropped.clone()),
            traffic: traffic::Traffic::default(),
            events: events::Events::default(),
            captures: capture::Captures::default(),
            replays: replay::Replays::default(),
            gate: gate::Gate::default(),
            streams_reaped: AtomicU64::new(0),
            exchanges_idle_closed: AtomicU64::new(0),
            addrs: OnceLock::new(),
            tcp_addrs: OnceLock::new(),
            config_path,
            registry: Registry::new(),
            cluster,
            peers: peer::Peers::default(),
            pushed: std::sync::Mutex::new(None),
            server_id,
            started: Instant::now(),
            started_at: SystemTime::now(),
            streams: CancellationToken::new(),
            tasks: TaskTracker::new(),
            draining: AtomicBool::new(false),
            tls: RwLock::new(TlsSettings::default()),
            tls_modes: OnceLock::new(),
            metrics,
        });
        // Weak: the metrics live inside what they read.
        let state = Arc::downgrade(&shared);
        shared
            .metrics
            .set_state_source(Box::new(move || state.upgrade().map(|s| s.scrape_state()).unwrap_or_default()));
        Server { shared }
    }

    /// The shared state (registry, config), for tests and the console.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then drains: public listener closed,
    /// in-flight requests given the grace period, clients told, streams closed.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let shared = self.shared;
        let cfg = shared.config();
        shared
            .metrics
            .server_info
            .get_or_create(&vec![("server_id", shared.server_id.clone()), ("version", tunnel_lib::VERSION.to_string())])
            .set(1);
        let (http_addr, grpc_addr, admin_addr) = listeners.addrs()?;
        let _ = shared.addrs.set((http_addr, grpc_addr, admin_addr));
        shared.load_tls(&cfg).context("loading TLS certificates")?;
        let https = match (listeners.https, cfg.server.https_listen) {
            (Some(l), Some(_)) => Some(l),
            _ => None,
        };
        let https_addr = https.as_ref().map(|l| l.local_addr()).transpose()?;
        let link = if cfg.server.tls.is_some() { "TLS" } else { "plaintext" };
        tracing::info!(%http_addr, https_addr = ?https_addr, %grpc_addr, link, %admin_addr, server_id = %shared.server_id, groups = cfg.groups.len(), rules = cfg.rules.rules().len(), "tunnel-server listening");
        if cfg.server.tls.is_none() && !grpc_addr.ip().is_loopback() {
            tracing::warn!(%grpc_addr, "the tunnel link is plaintext on a non-loopback address: group tokens and traffic cross the network in clear; set [server.tls]");
        }

        crate::tunnel::tuning::announce("server", &cfg.server.link_tuning);
        crate::metrics::set_link_tuning(&shared.metrics.link_tuning, &cfg.server.link_tuning);

        let background = CancellationToken::new();
        let grpc_stop = CancellationToken::new();
        let grpc = tokio::spawn(service::serve(shared.clone(), listeners.grpc, grpc_stop.clone()));
        let admin = tokio::spawn(introspection::serve(shared.clone(), listeners.admin, background.clone()));
        let ingress_stop = CancellationToken::new();
        let ingress =
            tokio::spawn(ingress::run(shared.clone(), listeners.http, ingress::Scheme::Http, ingress_stop.clone()));
        let secure_ingress =
            https.map(|l| tokio::spawn(ingress::run(shared.clone(), l, ingress::Scheme::Https, ingress_stop.clone())));
        // The [[tcp]] services' ports, bound now: like the other listen
        // addresses, a reload that changes them applies at the next restart.
        let tcp_stop = CancellationToken::new();
        let (mut tcp_tasks, mut tcp_addrs) = (Vec::new(), Vec::new());
        for (i, t) in cfg.tcp.iter().enumerate() {
            let l =
                TcpListener::bind(t.listen).await.with_context(|| format!("binding [[tcp]] listen {}", t.listen))?;
            let bound = l.local_addr()?;
            tracing::info!(service = %t.label, %bound, group = %t.group, upstream = %t.upstream, "serving a tcp service");
            tcp_addrs.push((t.listen, bound));
            tcp_tasks.push(tokio::spawn(tcp::run(shared.clone(), i, t.listen, l, tcp_stop.clone())));
        }
        let _ = shared.tcp_addrs.set(tcp_addrs);
        let reaper = tokio::spawn(reap(shared.clone(), background.clone()));
        let series = tokio::spawn(traffic::run(shared.clone(), background.clone()));
        let metrics = match (listeners.metrics, cfg.server.metrics_listen) {
            (Some(l), Some(_)) => {
                tracing::info!(metrics_addr = %l.local_addr()?, "serving Prometheus metrics at /metrics and readiness at /ready");
                let (s, r) = (shared.clone(), shared.clone());
                let endpoints = crate::metrics::Endpoints {
                    render: Arc::new(move || s.render_metrics()),
                    ready: Some(Arc::new(move || r.readiness())),
                };
                Some(tokio::spawn(crate::metrics::serve(l, endpoints, background.clone())))
            }
            _ => None,
        };
        let reloader = tokio::spawn(reload::watch(shared.clone(), background.clone()));
        // Stopped last, after the streams: the lease is revoked on the way out.
        let cluster_stop = CancellationToken::new();
        let peer_server = listeners.peer.map(|l| {
            if let Ok(a) = l.local_addr() {
                tracing::info!(peer_addr = %a, "taking requests forwarded by peer servers");
            }
            tokio::spawn(peer::serve(shared.clone(), l, grpc_stop.clone()))
        });
        let cluster = shared.cluster.clone().map(|c| {
            tracing::info!(etcd = ?c.settings.etcd.iter().map(|u| u.to_string()).collect::<Vec<_>>(), prefix = %c.settings.prefix, advertise = %c.settings.advertise, "cluster: membership and registry in etcd");
            tokio::spawn(cluster::run(shared.clone(), c, cluster_stop.clone()))
        });

        crate::systemd::ready(&shared.status_line());
        let status_of = shared.clone();
        let keepalive = tokio::spawn(crate::systemd::keepalive(move || status_of.status_line(), background.clone()));

        shutdown.await;
        shared.start_draining();
        let drain_delay = shared.config().server.drain_delay;
        shared.events.record(
            tunnel_lib::introspection::EventKind::Draining,
            events::About::default(),
            format!(
                "server {} shutting down: /ready answers 503, public listeners close in {drain_delay:?}",
                shared.server_id
            ),
        );
        // The whole stop: the delay, the grace, the bound after it, a margin.
        let whole_stop =
            drain_delay + shared.config().server.shutdown_grace + GRPC_STOP_TIMEOUT + Duration::from_secs(1);
        if !drain_delay.is_zero() {
            // Load balancers see /ready fail and move traffic away while we
            // still serve whatever they send until they do.
            crate::systemd::stopping_within(
                &format!("draining: /ready says 503, serving {drain_delay:?} more"),
                whole_stop,
            );
            tracing::info!(server_id = %shared.server_id, drain_delay = ?drain_delay, "draining: /ready answers 503; serving on for drain_delay before closing the public listeners");
            tokio::time::sleep(drain_delay).await;
        }
        let grace = shared.config().server.shutdown_grace;
        crate::systemd::stopping_within(&format!("draining for up to {grace:?}: {}", shared.status_line()), whole_stop);
        tracing::info!(server_id = %shared.server_id, grace = ?grace, "shutting down: public listener closed, finishing in-flight requests");
        ingress_stop.cancel();
        tcp_stop.cancel();
        for task in tcp_tasks {
            let _ = task.await;
        }
        for task in std::iter::once(ingress).chain(secure_ingress) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("ingress: {e:#}"),
                Err(e) => tracing::warn!("ingress task: {e}"),
            }
        }
        for s in shared.registry.all_streams() {
            let msg = s
                .exchanges
                .message("", Payload::Drain(Drain { reason: "server shutting down".into(), ..Default::default() }));
            s.outbound().try_priority(msg);
        }
        // Give the drain messages a moment to be written before the streams end.
        tokio::time::sleep(Duration::from_millis(50)).await;
        shared.streams.cancel();
        grpc_stop.cancel();
        background.cancel();
        shared.tasks.close();
        // One bound for everything after the grace period, not one per part.
        let last_call = tokio::time::Instant::now() + GRPC_STOP_TIMEOUT;
        if tokio::time::timeout_at(last_call, shared.tasks.wait()).await.is_err() {
            tracing::warn!("stream tasks still running after {GRPC_STOP_TIMEOUT:?}; exiting anyway");
        }
        match tokio::time::timeout_at(last_call, grpc).await {
            Ok(Ok(Err(e))) => tracing::warn!("gRPC server: {e:#}"),
            Err(_) => tracing::warn!("gRPC server did not stop within {GRPC_STOP_TIMEOUT:?}; exiting anyway"),
            _ => {}
        }
        let _ = reaper.await;
        let _ = series.await;
        let _ = keepalive.await;
        if let Some(m) = metrics {
            let _ = m.await;
        }
        match tokio::time::timeout_at(last_call, admin).await {
            Ok(Ok(Err(e))) => tracing::warn!("admin server: {e:#}"),
            Err(_) => tracing::warn!("admin server did not stop within {GRPC_STOP_TIMEOUT:?}"),
            _ => {}
        }
        let _ = reloader.await;
        if let Some(p) = peer_server {
            match tokio::time::timeout_at(last_call, p).await {
                Ok(Ok(Err(e))) => tracing::warn!("peer server: {e:#}"),
                Err(_) => tracing::warn!("peer server did not stop within {GRPC_STOP_TIMEOUT:?}"),
                _ => {}
            }
        }
        cluster_stop.cancel();
        if let Some(c) = cluster {
            let _ = c.await;
        }
        // Every request has ended: its line is written before the exit.
        shared.access.close();
        tracing::info!("tunnel-server stopped");
        Ok(())
    }
}

/// Closes streams whose heartbeat is overdue.
async fn reap(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cfg = shared.config();
        let timeout_of = |group: &str| cfg.group(group).map_or(Duration::from_secs(90), |g| g.heartbeat_timeout);
        for (h, age) in shared.registry.reap(timeout_of) {
            shared.streams_reaped.fetch_add(1, Ordering::Relaxed);
            shared.metrics.streams_reaped.inc();
            let about = events::About { client_id: &h.client_id, group: &h.group, stream_id: &h.stream_id };
            let kind = if h.stream_type == tunnel_lib::proto::StreamType::Control { "control" } else { "data" };
            let detail = format!(
                "no heartbeat for {:.1}s (timeout {:?}): {kind} stream closed",
                age.as_secs_f64(),
                timeout_of(&h.group)
            );
            shared.events.record(tunnel_lib::introspection::EventKind::Reaped, about, detail);
            tracing::warn!(stream = %h.stream_id, client = %h.client_id, group = %h.group, silent = ?age, "no heartbeat within the timeout: stream closed");
            h.cancel.cancel();
        }
        let now = std::time::Instant::now();
        for h in shared.registry.handles() {
            for id in h.exchanges.expire_idle(now) {
                shared.exchanges_idle_closed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(request_id = %id, stream = %h.stream_id, client = %h.client_id, "exchange idle past its rule's idle_timeout: closed");
            }
        }
    }
}
