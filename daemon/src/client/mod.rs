//! tunnel-client: dials every configured server, keeps a session to each (a
//! control stream and N data streams registered and heartbeating, and the
//! config that server pushes), and forwards every exchange, from whichever
//! server, to the same local upstreams.

mod dial;
pub mod fleet;
pub mod h1;
pub mod pool;
pub mod session;
pub mod upstream;

use anyhow::Context as _;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_lib::config::ClientConfig;

/// What the client reports about itself (for tests, logs and status lines):
/// each server's session, and totals over them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStatus {
    /// Streams registered now, over every server.
    pub registered_streams: usize,
    /// The config version applied last, by any server's session ("" until the first sync).
    pub config_version: String,
    /// The server_ids of the servers holding streams now, comma-separated.
    pub server_id: String,
    /// Sessions started over every server (1 per server + reconnects).
    pub sessions: u64,
    /// Each server address's session, by its key (the URL, and the address
    /// when the URL names a host).
    pub servers: BTreeMap<String, ServerStatus>,
}

/// One server address's session, as the client sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStatus {
    /// The configured URL this address came from.
    pub url: String,
    /// The server's name, from its answer ("" until it answered).
    pub server_id: String,
    /// Streams registered with it now.
    pub registered_streams: usize,
    /// The config version its session applied.
    pub config_version: String,
    /// Sessions started (1 + reconnects).
    pub sessions: u64,
    /// Streams it accepted, since start.
    pub registrations: u64,
    /// Another address of the same server holds the session (that one's key).
    pub duplicate_of: Option<String>,
    /// A clustered server's fleet as it last told us: the live servers, and
    /// the version we send back so that it resends only on a change.
    pub fleet: Vec<tunnel_lib::proto::FleetServer>,
    pub fleet_version: String,
    /// Since when no session could be established (None while one is, or
    /// before the first attempt ended): how `connections = k` tells a dead
    /// server before the fleet's membership does.
    pub down_since: Option<std::time::Instant>,
}

impl ClientStatus {
    /// Recomputes the totals from `servers`.
    fn recount(&mut self) {
        self.registered_streams = self.servers.values().map(|s| s.registered_streams).sum();
        self.sessions = self.servers.values().map(|s| s.sessions).sum();
        let ids: std::collections::BTreeSet<&str> = self
            .servers
            .values()
            .filter(|s| s.registered_streams > 0 && !s.server_id.is_empty())
            .map(|s| s.server_id.as_str())
            .collect();
        self.server_id = ids.into_iter().collect::<Vec<_>>().join(",");
    }

    /// Servers with at least one stream registered now.
    pub fn connected_servers(&self) -> usize {
        self.servers.values().filter(|s| s.registered_streams > 0).count()
    }
}

/// Capped exponential backoff with jitter (50–100% of the step), so that
/// many clients cut off together do not reconnect together.
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `min`, capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { next: min.min(max), min, max }
    }

    /// The delay before the next attempt.
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// Back to the first step.
    pub fn reset(&mut self) {
        self.next = self.min.min(self.max);
    }
}

/// A client ready to run.
pub struct Client {
    config: Arc<ClientConfig>,
    /// Where the config came from: re-read on SIGHUP.
    config_path: Option<PathBuf>,
    status: watch::Sender<ClientStatus>,
    metrics: Arc<crate::metrics::ClientMetrics>,
}

impl Client {
    /// A client on `config`.
    pub fn new(config: ClientConfig) -> Self {
        Client {
            config: Arc::new(config),
            config_path: None,
            status: watch::Sender::new(ClientStatus::default()),
            metrics: Arc::new(crate::metrics::ClientMetrics::default()),
        }
    }

    /// Re-reads `path` on SIGHUP (upstreams apply at once; the rest at the next restart).
    pub fn with_config_path(mut self, path: PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    /// Watches the client's status.
    pub fn status(&self) -> watch::Receiver<ClientStatus> {
        self.status.subscribe()
    }

    /// Runs sessions until `shutdown` resolves, reconnecting with backoff.
    /// At shutdown it drains: tells the server, lets in-flight requests finish
    /// within the grace period, then closes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let (upstreams_tx, upstreams) =
            watch::channel(upstream::Upstreams::new(self.config.upstreams.clone(), &self.config, self.metrics.clone()));
        let serving_metrics = match self.config.metrics_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics_listen {addr}"))?;
                tracing::info!(metrics_addr = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
                let (m, status) = (self.metrics.clone(), self.status.subscribe());
                let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || m.render_with(&status.borrow()));
                let endpoints = crate::metrics::Endpoints { render, ready: None };
                Some(tokio::spawn(crate::metrics::serve(listener, endpoints, stop.clone())))
            }
            None => None,
        };
        let servers: Vec<String> = self.config.servers.iter().map(fleet::url_text).collect();
        tracing::info!(servers = %servers.join(", "), client = %self.config.client_id, group = %self.config.group, transport = %self.config.transport, upstreams = ?upstreams.borrow().names(), "tunnel-client starting");
        crate::tunnel::tuning::announce("client", &self.config.link_tuning);
        crate::metrics::set_link_tuning(&self.metrics.link_tuning, &self.config.link_tuning);
        let reloader = self.config_path.clone().map(|path| {
            let reload =
                Reloader { path, applied: self.config.clone(), upstreams: upstreams_tx, metrics: self.metrics.clone() };
            let status = self.status.subscribe();
            let servers = servers.clone();
            // Owned by the client: ends with `stop`.
            tokio::spawn(reload.run(move || status_line(&status.borrow(), &servers), stop.clone()))
        });
        // READY=1 once the server has accepted us; a status line (and the
        // watchdog) from the start, since reaching the server may take a while.
        let mut registered = self.status.subscribe();
        let (status_of, server) = (self.status.subscribe(), servers.clone());
        let notify_stop = stop.clone();
        let notifier = tokio::spawn(async move {
            let ready = async {
                if registered.wait_for(|s| s.registered_streams > 0).await.is_ok() {
                    crate::systemd::ready(&status_line(&registered.borrow(), &server));
                }
            };
            let keep = crate::systemd::keepalive(|| status_line(&status_of.borrow(), &server), notify_stop.clone());
            let ready = async {
                tokio::select! {
                    _ = notify_stop.cancelled() => {}
                    _ = ready => {}
                }
            };
            tokio::join!(ready, keep);
        });
        let runner =
            fleet::run(self.config.clone(), upstreams.clone(), self.status.clone(), self.metrics.clone(), stop.clone());
        tokio::pin!(runner);
        tokio::select! {
            _ = &mut runner => {}
            _ = shutdown => {
                tracing::info!("shutting down: draining");
                crate::systemd::stopping("draining: no new requests, finishing those in flight");
                stop.cancel();
                // Every session sees `stop`, drains within the grace period and returns.
                let bound = self.config.shutdown_grace + Duration::from_secs(2);
                if tokio::time::timeout(bound, runner).await.is_err() {
                    tracing::warn!("drain did not finish within the grace period; exiting anyway");
                }
            }
        }
        // `stop` has fired in every way out of the select above, which ends the metrics server.
        stop.cancel();
        let _ = notifier.await;
        if let Some(r) = reloader {
            let _ = r.await;
        }
        if let Some(m) = serving_metrics {
            let _ = m.await;
        }
        tracing::info!("tunnel-client stopped");
        Ok(())
    }
}

/// Re-reads client.toml on SIGHUP. New `[upstreams]` serve new exchanges at
/// once (those in flight finish on the old ones); the other keys name the
/// server, the identity and the process, and apply at the next restart.
struct Reloader {
    path: PathBuf,
    applied: Arc<ClientConfig>,
    upstreams: watch::Sender<Arc<upstream::Upstreams>>,
    metrics: Arc<crate::metrics::ClientMetrics>,
}

impl Reloader {
    async fn run(mut self, status: impl Fn() -> String, stop: CancellationToken) {
        let Some(mut hangups) = crate::signal::hangups() else { return };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            crate::systemd::reloading();
            self.reload();
            crate::systemd::ready(&status());
        }
    }

    fn reload(&mut self) {
        let new = match ClientConfig::from_file(&self.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("config reload refused, the running config stays: {e}");
                return;
            }
        };
        let later: Vec<&str> = self.applied.changed_keys(&new).into_iter().filter(|k| *k != "upstreams").collect();
        if !later.is_empty() {
            tracing::warn!(path = %self.path.display(), keys = %later.join(", "), "client.toml changed beyond [upstreams]; these keys apply at the next restart");
        }
        if new.upstreams == self.applied.upstreams {
            tracing::info!("config reloaded: upstreams unchanged");
            return;
        }
        let fresh = upstream::Upstreams::new(new.upstreams.clone(), &self.applied, self.metrics.clone());
        tracing::info!(upstreams = ?fresh.names(), "config reloaded: new upstreams serve new requests");
        self.upstreams.send_replace(fresh);
        let mut applied = (*self.applied).clone();
        applied.upstreams = new.upstreams;
        self.applied = Arc::new(applied);
    }
}

/// One line for `systemctl status`.
fn status_line(s: &ClientStatus, servers: &[String]) -> String {
    let version = if s.config_version.is_empty() { "-" } else { s.config_version.as_str() };
    match servers {
        [one] if s.registered_streams == 0 => format!("connecting to {one} (attempt {})", s.sessions),
        [one] => format!("connected to {one} ({}), {} streams, config {version}", s.server_id, s.registered_streams),
        _ => format!(
            "connected to {} of {} servers ({}), {} streams, config {version}",
            s.connected_servers(),
            s.servers.len().max(servers.len()),
            if s.server_id.is_empty() { "-" } else { s.server_id.as_str() },
            s.registered_streams
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff doubles up to its cap, with jitter, and resets.
    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let steps: Vec<Duration> = (0..8).map(|_| b.step()).collect();
        assert!(steps[0] >= Duration::from_millis(100) && steps[0] <= Duration::from_millis(200));
        assert!(steps.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(steps[7] >= Duration::from_secs(1), "reached the cap");
        b.reset();
        assert!(b.step() <= Duration::from_millis(200));
    }
}
