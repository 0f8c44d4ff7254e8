//! The client's sessions, one per server. Every configured server URL is
//! resolved, and each address it resolves to gets a link: a task that keeps
//! one session (control stream, data streams, heartbeats, pushed config) to
//! that address, reconnecting with its own backoff. Links share nothing but
//! the upstream pools and a table of which link holds which `server_id`, so
//! one server down, slow or refusing never delays the sessions to the others,
//! and two addresses of one server keep one session between them.

use super::session::{self, Ended};
use super::upstream::Upstreams;
use super::{Backoff, ClientStatus, ServerStatus};
use crate::metrics::ClientMetrics;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tunnel_lib::config::ClientConfig;

/// A session that lived this long resets its link's backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// How often server names are resolved again, to follow DNS changes.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a link that found its server already held waits before looking
/// again, if the holder keeps it (the address may come to lead elsewhere).
const DUPLICATE_RECHECK: Duration = Duration::from_secs(60);

/// One server address a session dials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The configured URL: its host is the `:authority` and the TLS server name.
    pub url: http::Uri,
    /// The address this session dials.
    pub addr: SocketAddr,
}

impl Target {
    /// How logs, status and metrics name the link: the URL, and the address
    /// when the URL names a host rather than an address.
    pub fn key(&self) -> String {
        let base = url_text(&self.url);
        if host_ip(&self.url).is_some() {
            base
        } else {
            format!("{base} ({})", self.addr)
        }
    }
}

/// `scheme://authority`, without the `/` a Uri displays.
pub fn url_text(url: &http::Uri) -> String {
    match (url.scheme_str(), url.authority()) {
        (Some(s), Some(a)) => format!("{s}://{a}"),
        _ => url.to_string(),
    }
}

fn host_ip(url: &http::Uri) -> Option<IpAddr> {
    url.host()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

fn port_of(url: &http::Uri) -> u16 {
    url.port_u16().unwrap_or(if url.scheme_str() == Some("https") { 443 } else { 80 })
}

/// The addresses `url` names now: itself if it is an address, else what
/// its host resolves to (bounded by `within`).
async fn resolve(url: &http::Uri, within: Duration) -> Result<Vec<Target>, String> {
    let port = port_of(url);
    if let Some(ip) = host_ip(url) {
        return Ok(vec![Target { url: url.clone(), addr: SocketAddr::new(ip, port) }]);
    }
    let host = url.host().unwrap_or_default();
    let addrs = match tokio::time::timeout(within, tokio::net::lookup_host((host, port))).await {
        Err(_) => return Err(format!("resolving {host}: no answer within {within:?}")),
        Ok(Err(e)) => return Err(format!("resolving {host}: {e}")),
        Ok(Ok(a)) => a.collect::<BTreeSet<_>>(),
    };
    if addrs.is_empty() {
        return Err(format!("{host} resolved to no address"));
    }
    Ok(addrs.into_iter().map(|addr| Target { url: url.clone(), addr }).collect())
}

/// Which link holds which server: the first link to reach a server keeps
/// it; another address of the same server waits until that session ends.
#[derive(Default)]
pub struct Claims {
    held: Mutex<HashMap<String, String>>,
    /// Bumped at every release, for the links waiting on one.
    released: watch::Sender<u64>,
}

/// A held claim; dropping it releases the server to other links.
pub struct Claim {
    claims: Arc<Claims>,
    server_id: String,
}

impl Claims {
    /// Claims `server_id` for the link `key`, or names the link holding it.
    pub fn claim(self: &Arc<Self>, server_id: &str, key: &str) -> Result<Claim, String> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match held.get(server_id) {
            Some(holder) if holder != key => Err(holder.clone()),
            _ => {
                held.insert(server_id.to_string(), key.to_string());
                Ok(Claim { claims: self.clone(), server_id: server_id.to_string() })
            }
        }
    }

    /// Resolves once some claim is released, or after `within`.
    async fn released(&self, within: Duration) {
        let mut rx = self.released.subscribe();
        let _ = tokio::time::timeout(within, rx.changed()).await;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.server_id);
        self.claims.released.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What one link's sessions share with the rest of the client.
pub struct Link {
    pub cfg: Arc<ClientConfig>,
    pub target: Target,
    /// The target's key, as status and logs name it.
    pub key: String,
    /// The upstreams in force; a reload (SIGHUP) replaces them for new exchanges.
    pub upstreams: watch::Receiver<Arc<Upstreams>>,
    status: watch::Sender<ClientStatus>,
    pub metrics: Arc<ClientMetrics>,
    pub claims: Arc<Claims>,
}

impl Link {
    /// Changes this link's entry in the client's status (and the totals).
    pub fn update(&self, f: impl FnOnce(&mut ServerStatus)) {
        self.status.send_modify(|s| {
            f(s.servers.entry(self.key.clone()).or_default());
            s.recount();
        });
    }

    /// This link's status now.
    pub fn status(&self) -> ServerStatus {
        self.status.borrow().servers.get(&self.key).cloned().unwrap_or_default()
    }

    /// Notes `version` as applied by this link's session.
    pub fn config_applied(&self, version: &str) {
        self.status.send_modify(|s| {
            s.servers.entry(self.key.clone()).or_default().config_version = version.to_string();
            s.config_version = version.to_string();
            s.recount();
        });
        self.metrics.set_config(&self.key, version);
    }
}

/// Runs a link per server address until `stop` fires, then waits for every
/// session to drain.
pub async fn run(
    cfg: Arc<ClientConfig>,
    upstreams: watch::Receiver<Arc<Upstreams>>,
    status: watch::Sender<ClientStatus>,
    metrics: Arc<ClientMetrics>,
    stop: CancellationToken,
) {
    let claims = Arc::new(Claims::default());
    let mut links: HashMap<Target, CancellationToken> = HashMap::new();
    let mut tasks = JoinSet::new();
    let lookup_bound = cfg.connect_timeout;
    loop {
        let mut failed = false;
        for url in &cfg.servers {
            let targets = match resolve(url, lookup_bound).await {
                Ok(t) => t,
                Err(e) => {
                    // Links already running for this URL keep going.
                    tracing::warn!(server = %url_text(url), "{e}");
                    failed = true;
                    continue;
                }
            };
            for t in &targets {
                if links.contains_key(t) {
                    continue;
                }
                let token = stop.child_token();
                links.insert(t.clone(), token.clone());
                let link = Arc::new(Link {
                    cfg: cfg.clone(),
                    key: t.key(),
                    target: t.clone(),
                    upstreams: upstreams.clone(),
                    status: status.clone(),
                    metrics: metrics.clone(),
                    claims: claims.clone(),
                });
                tracing::info!(server = %link.key, "session to start");
                tasks.spawn(run_link(link, token));
            }
            // Addresses the name no longer gives: drain those sessions.
            links.retain(|t, token| {
                let keep = &t.url != url || targets.contains(t);
                if !keep {
                    tracing::info!(server = %t.key(), "no longer in DNS: draining its session");
                    token.cancel();
                }
                keep
            });
        }
        let next =
            if failed { cfg.reconnect_max.clamp(Duration::from_secs(1), RESOLVE_INTERVAL) } else { RESOLVE_INTERVAL };
        let wake = tokio::time::sleep(next);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // Every link's token is a child of `stop`: they drain in parallel.
                    while tasks.join_next().await.is_some() {}
                    return;
                }
                _ = &mut wake => break,
                Some(_) = tasks.join_next() => {}
            }
        }
    }
}

/// Keeps one session to `link`'s address until `stop` fires, reconnecting
/// with backoff.
async fn run_link(link: Arc<Link>, stop: CancellationToken) {
    let cfg = link.cfg.clone();
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    // A failure that repeats word for word is logged once per backoff cap,
    // so a server that is down does not flood the log.
    let mut last_failure: Option<(String, Instant)> = None;
    // The server drained (a planned stop): failing to reach it until it is
    // back is expected, not an error.
    let mut away = false;
    loop {
        let started = Instant::now();
        link.update(|s| s.sessions += 1);
        if link.status().sessions > 1 {
            link.metrics.reconnects.inc();
        }
        let registered_before = link.status().registrations;
        let result = session::run(link.clone(), stop.clone()).await;
        let reached = link.status().registrations > registered_before;
        link.update(|s| s.registered_streams = 0);
        if stop.is_cancelled() {
            break;
        }
        if started.elapsed() > STABLE_SESSION {
            backoff.reset();
        }
        if reached {
            away = false;
        }
        let delay = backoff.step();
        match result {
            Ok(Ended::Stopped) => break,
            Ok(Ended::ServerDrained) => {
                away = true;
                last_failure = None;
                tracing::info!(server = %link.key, retry_in = ?delay, "the server is draining (a planned stop); reconnecting to it with backoff");
            }
            Ok(Ended::Duplicate { server_id, holder }) => {
                tracing::info!(server = %link.key, %server_id, held_by = %holder, "same server as another address: one session kept");
                link.update(|s| s.duplicate_of = Some(holder));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = link.claims.released(DUPLICATE_RECHECK) => {}
                }
                link.update(|s| s.duplicate_of = None);
                continue;
            }
            Err(e) => {
                let text = format!("{e:#}");
                let repeat = last_failure
                    .as_ref()
                    .is_some_and(|(t, at)| *t == text && at.elapsed() < cfg.reconnect_max + Duration::from_secs(1));
                if repeat {
                    tracing::debug!(server = %link.key, retry_in = ?delay, "session failed again: {text}");
                } else {
                    if away {
                        tracing::info!(server = %link.key, retry_in = ?delay, "server not back yet: {text}");
                    } else {
                        tracing::warn!(server = %link.key, retry_in = ?delay, "session failed: {text}");
                    }
                    last_failure = Some((text, Instant::now()));
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    // A retired link (its address left DNS) leaves the status with its session.
    link.status.send_modify(|s| {
        s.servers.remove(&link.key);
        s.recount();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second link reaching a server already held is refused until the holder lets go.
    #[test]
    fn one_claim_per_server() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim("edge-1", "a").expect("free");
        assert_eq!(claims.claim("edge-1", "b").err().as_deref(), Some("a"));
        assert!(claims.claim("edge-2", "b").is_ok(), "another server is free");
        drop(first);
        assert!(claims.claim("edge-1", "b").is_ok(), "released with the session");
    }

    #[test]
    fn keys_name_the_address_only_for_host_names() {
        let t = |u: &str, a: &str| Target { url: u.parse().expect("url"), addr: a.parse().expect("addr") };
        assert_eq!(t("http://127.0.0.1:7000", "127.0.0.1:7000").key(), "http://127.0.0.1:7000");
        assert_eq!(t("https://edge.example:7000", "10.0.0.2:7000").key(), "https://edge.example:7000 (10.0.0.2:7000)");
        assert_eq!(t("http://[::1]:7000", "[::1]:7000").key(), "http://[::1]:7000");
    }

    #[tokio::test]
    async fn names_resolve_to_one_target_per_address() {
        let url: http::Uri = "http://localhost:7000".parse().expect("url");
        let targets = resolve(&url, Duration::from_secs(5)).await.expect("localhost resolves");
        assert!(!targets.is_empty());
        assert!(targets.iter().all(|t| t.addr.port() == 7000 && t.addr.ip().is_loopback()));
        let ip: http::Uri = "http://127.0.0.1:7001".parse().expect("url");
        assert_eq!(resolve(&ip, Duration::from_secs(5)).await.expect("an address").len(), 1);
    }
}
