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
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
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
/// After a planned drain, failing to reach the server is logged at info for
/// this long; a server still away after it may be gone for good: warn.
const AWAY_QUIET: Duration = Duration::from_secs(300);
/// While a drained server is expected back (within AWAY_QUIET), retries are
/// at most this far apart, so a restarted server has its clients back at
/// once, not after a backoff grown during its absence.
const AWAY_RETRY_MAX: Duration = Duration::from_secs(2);

/// With `connections = k`: a chosen server that no session has reached for
/// this long is passed over for the next in rank (a killed server refuses at
/// once; the membership would say so only when its lease expires).
const SUSPECT_AFTER: Duration = Duration::from_secs(1);
/// How long a server passed over that way stays passed over before it is
/// tried again (if it still ranks among the k).
const SUSPECT_FOR: Duration = Duration::from_secs(30);
/// With `connections = k`: how often the choice of servers is looked at.
const CHOOSE_INTERVAL: Duration = Duration::from_millis(250);

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
    /// server_id -> the holder's key. Only the holder's drop removes an
    /// entry: no other claim can be made while it is there.
    held: Mutex<HashMap<String, String>>,
    /// server_id -> (releases so far, whether the last was a planned drain),
    /// for the links waiting on one.
    released: watch::Sender<HashMap<String, (u64, bool)>>,
}

/// A held claim; dropping it releases the server to other links.
pub struct Claim {
    claims: Arc<Claims>,
    server_id: String,
    planned: AtomicBool,
}

/// What a link waiting on a held server watches: that server's releases
/// since the moment it looked.
pub struct Releases {
    rx: watch::Receiver<HashMap<String, (u64, bool)>>,
    server_id: String,
    seen: Option<u64>,
}

impl std::fmt::Debug for Releases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releases").field("server_id", &self.server_id).field("seen", &self.seen).finish()
    }
}

impl Releases {
    /// Waits until the holder lets go (Some(planned)) or `within` passes (None).
    async fn wait(mut self, within: Duration) -> Option<bool> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((n, planned)) = self.rx.borrow_and_update().get(&self.server_id) {
                if Some(*n) != self.seen {
                    return Some(*planned);
                }
            }
            match tokio::time::timeout_at(deadline, self.rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }
}

impl Claims {
    /// Claims `server_id` for the link `key`, or names the link holding it.
    /// A link's key may come back (an address that left DNS and returned)
    /// while its old session still drains: that one holds it until it ends.
    pub fn claim(self: &Arc<Self>, server_id: &str, key: &str) -> Result<Claim, String> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(holder) = held.get(server_id) {
            return Err(holder.clone());
        }
        held.insert(server_id.to_string(), key.to_string());
        Ok(Claim { claims: self.clone(), server_id: server_id.to_string(), planned: AtomicBool::new(false) })
    }

    /// `server_id`'s releases from now on; taken before trying a claim, so none is missed.
    pub fn watch(&self, server_id: &str) -> Releases {
        let rx = self.released.subscribe();
        let seen = rx.borrow().get(server_id).map(|e| e.0);
        Releases { rx, server_id: server_id.to_string(), seen }
    }
}

impl Claim {
    /// The session ends because the server drains: waiting links expect it away.
    pub fn ends_planned(&self) {
        self.planned.store(true, Ordering::Relaxed);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.server_id);
        let planned = self.planned.load(Ordering::Relaxed);
        self.claims.released.send_modify(|m| {
            let e = m.entry(self.server_id.clone()).or_default();
            *e = (e.0.wrapping_add(1), planned);
        });
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

    /// Whether another address of this link's URL holds a session now (a
    /// dual-stack name whose other family works).
    fn sibling_serves(&self) -> bool {
        let url = url_text(&self.target.url);
        self.status.borrow().servers.iter().any(|(k, s)| *k != self.key && s.url == url && s.registered_streams > 0)
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
/// session to drain. With `connections = k` the addresses are those of the k
/// servers chosen from the fleet the servers announce (the configured ones
/// until a server has announced it), chosen again as the fleet changes.
pub async fn run(
    cfg: Arc<ClientConfig>,
    upstreams: watch::Receiver<Arc<Upstreams>>,
    status: watch::Sender<ClientStatus>,
    metrics: Arc<ClientMetrics>,
    stop: CancellationToken,
) {
    let claims = Arc::new(Claims::default());
    // Links running, and those retired (their address left DNS) still draining:
    // an address that comes back gets a new link only once its old one ended.
    let mut links: HashMap<Target, CancellationToken> = HashMap::new();
    let mut retiring: HashSet<Target> = HashSet::new();
    let mut tasks: JoinSet<Target> = JoinSet::new();
    let mut chooser = Chooser::new(&cfg);
    let mut urls = chooser.choose(&status.borrow());
    loop {
        // Every name at once, and none holds up a stop.
        let resolved = tokio::select! {
            _ = stop.cancelled() => None,
            r = resolve_all(&urls, cfg.connect_timeout) => Some(r),
        };
        let Some(resolved) = resolved else { break };
        let mut failed = false;
        for (url, targets) in resolved {
            let targets = match targets {
                Ok(t) => t,
                Err(e) => {
                    // Links already running for this URL keep going.
                    tracing::warn!(server = %url_text(&url), "{e}");
                    failed = true;
                    continue;
                }
            };
            for t in &targets {
                if links.contains_key(t) || retiring.contains(t) {
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
                tracing::info!(server = %link.key, "starting a session");
                let target = t.clone();
                tasks.spawn(async move {
                    run_link(link, token).await;
                    target
                });
            }
            // Addresses the name no longer gives: drain those sessions.
            links.retain(|t, token| {
                let keep = t.url != url || targets.contains(t);
                if !keep {
                    tracing::info!(server = %t.key(), "no longer in DNS: draining its session");
                    token.cancel();
                    retiring.insert(t.clone());
                }
                keep
            });
        }
        // Servers no longer chosen: drain those sessions.
        links.retain(|t, token| {
            let keep = urls.contains(&t.url);
            if !keep {
                tracing::info!(server = %t.key(), "no longer among the servers chosen: draining its session");
                token.cancel();
                retiring.insert(t.clone());
            }
            keep
        });
        let next =
            if failed { cfg.reconnect_max.clamp(Duration::from_secs(1), RESOLVE_INTERVAL) } else { RESOLVE_INTERVAL };
        let wake = tokio::time::sleep(next);
        tokio::pin!(wake);
        let mut look = tokio::time::interval(CHOOSE_INTERVAL);
        look.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = &mut wake => break,
                Some(ended) = tasks.join_next() => {
                    if let Ok(t) = ended {
                        retiring.remove(&t);
                    }
                }
                _ = look.tick(), if chooser.k > 0 => {
                    let chosen = chooser.choose(&status.borrow());
                    if chosen != urls {
                        urls = chosen;
                        break;
                    }
                }
            }
        }
        if stop.is_cancelled() {
            break;
        }
    }
    // Every link's token is a child of `stop`: they drain in parallel.
    while tasks.join_next().await.is_some() {}
}

/// Which servers to hold sessions with: every configured one, or with
/// `connections = k` the first k of the announced fleet by rendezvous rank
/// of this client's id, passing over draining servers and ones that could
/// not be reached lately.
struct Chooser {
    k: usize,
    client_id: String,
    seeds: Vec<http::Uri>,
    /// The servers' scheme: a fleet member advertising another is unusable.
    scheme: String,
    /// server_id -> until when it is passed over.
    suspects: HashMap<String, Instant>,
    /// The last choice logged, so each change is logged once.
    logged: Vec<String>,
}

impl Chooser {
    fn new(cfg: &ClientConfig) -> Self {
        Chooser {
            k: cfg.connections,
            client_id: cfg.client_id.clone(),
            seeds: cfg.servers.clone(),
            scheme: cfg.servers.first().and_then(|u| u.scheme_str()).unwrap_or("http").to_string(),
            suspects: HashMap::new(),
            logged: Vec::new(),
        }
    }

    fn choose(&mut self, status: &ClientStatus) -> Vec<http::Uri> {
        if self.k == 0 {
            return self.seeds.clone();
        }
        // The newest announcement any session heard (versions are etcd revisions).
        let fleet = status
            .servers
            .values()
            .filter(|s| !s.fleet.is_empty())
            .max_by_key(|s| s.fleet_version.parse::<i64>().unwrap_or(0))
            .map(|s| s.fleet.clone())
            .unwrap_or_default();
        if fleet.is_empty() {
            return self.seeds.clone();
        }
        let now = Instant::now();
        self.suspects.retain(|_, until| *until > now);
        for s in status.servers.values() {
            let id = if s.server_id.is_empty() {
                fleet.iter().find(|f| f.url == s.url).map(|f| f.server_id.clone())
            } else {
                Some(s.server_id.clone())
            };
            if let (Some(id), Some(since)) = (id, s.down_since) {
                if now.duration_since(since) >= SUSPECT_AFTER && !self.suspects.contains_key(&id) {
                    tracing::info!(server_id = %id, "unreachable for {SUSPECT_AFTER:?}: moving its session to the next server for {SUSPECT_FOR:?}");
                    self.suspects.insert(id, now + SUSPECT_FOR);
                }
            }
        }
        let mut ranked: Vec<(u64, &tunnel_lib::proto::FleetServer)> = fleet
            .iter()
            .filter(|f| !f.draining && !self.suspects.contains_key(&f.server_id))
            .filter(|f| f.url.starts_with(&format!("{}://", self.scheme)))
            .map(|f| (rendezvous(&self.client_id, &f.server_id), f))
            .collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.server_id.cmp(&b.1.server_id)));
        let chosen: Vec<&tunnel_lib::proto::FleetServer> = ranked.into_iter().take(self.k).map(|(_, f)| f).collect();
        if chosen.is_empty() {
            // Every server draining or unreachable: start over from the seeds.
            return self.seeds.clone();
        }
        let ids: Vec<String> = chosen.iter().map(|f| f.server_id.clone()).collect();
        if ids != self.logged {
            tracing::info!(servers = ?ids, connections = self.k, fleet = fleet.len(), "sessions to the servers chosen from the fleet");
            self.logged = ids;
        }
        chosen.iter().filter_map(|f| f.url.parse::<http::Uri>().ok()).collect()
    }
}

/// The rendezvous (highest random weight) score of `server` for `client`:
/// each client ranks the servers in its own order, so clients spread over
/// the fleet, and a server that leaves moves only its own clients.
fn rendezvous(client: &str, server: &str) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client.bytes().chain(std::iter::once(0)).chain(server.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A final mix: FNV's low bits barely differ for names that differ at the end.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Each URL's addresses now, looked up concurrently.
async fn resolve_all(urls: &[http::Uri], within: Duration) -> Vec<(http::Uri, Result<Vec<Target>, String>)> {
    let mut lookups = JoinSet::new();
    for (i, url) in urls.iter().enumerate() {
        let url = url.clone();
        lookups.spawn(async move {
            let r = resolve(&url, within).await;
            (i, url, r)
        });
    }
    let mut out = Vec::with_capacity(urls.len());
    while let Some(r) = lookups.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    // In the configured order, so links start (and log) in it.
    out.sort_by_key(|(i, _, _)| *i);
    out.into_iter().map(|(_, u, r)| (u, r)).collect()
}

/// Keeps one session to `link`'s address until `stop` fires, reconnecting
/// with backoff.
async fn run_link(link: Arc<Link>, stop: CancellationToken) {
    let cfg = link.cfg.clone();
    link.update(|s| s.url = url_text(&link.target.url));
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    // A failure that repeats word for word is logged once per backoff cap,
    // so a server that is down does not flood the log.
    let mut last_failure: Option<(String, Instant)> = None;
    // Since when the server is away after a planned drain: failing to reach
    // it is expected for a while, not an error.
    let mut away_since: Option<Instant> = None;
    let mut warned_duplicate = false;
    loop {
        let started = Instant::now();
        link.update(|s| s.sessions += 1);
        let registered_before = link.status().registrations;
        let result = session::run(link.clone(), stop.clone()).await;
        let reached = link.status().registrations > registered_before;
        link.update(|s| {
            s.registered_streams = 0;
            s.down_since = if reached { None } else { s.down_since.or(Some(Instant::now())) };
        });
        if stop.is_cancelled() {
            break;
        }
        if let Ok(Ended::Duplicate { server_id, holder, releases }) = result {
            // Not a session: nothing was registered.
            link.update(|s| {
                s.sessions -= 1;
                s.duplicate_of = Some(holder.clone());
            });
            let same_name =
                link.status.borrow().servers.get(&holder).is_some_and(|h| h.url == url_text(&link.target.url));
            if same_name || warned_duplicate {
                tracing::info!(server = %link.key, %server_id, held_by = %holder, "same server as another address: one session kept");
            } else {
                // Two URLs the operator listed lead to one server_id: fine
                // behind a balancer, wrong if they are different servers.
                tracing::warn!(server = %link.key, %server_id, held_by = %holder, "same server_id as another configured server: one session kept (if these are different servers, give each its own server_id)");
                warned_duplicate = true;
            }
            let planned = tokio::select! {
                _ = stop.cancelled() => break,
                r = releases.wait(DUPLICATE_RECHECK) => r,
            };
            link.update(|s| s.duplicate_of = None);
            if planned == Some(true) {
                away_since.get_or_insert_with(Instant::now);
            }
            continue;
        }
        if link.status().sessions > 1 {
            link.metrics.reconnects.inc();
        }
        if started.elapsed() > STABLE_SESSION {
            backoff.reset();
        }
        if reached {
            away_since = None;
        }
        let expected_back = away_since.is_some_and(|t| t.elapsed() < AWAY_QUIET);
        if matches!(result, Ok(Ended::ServerDrained)) {
            // A planned stop: the server is probably restarting.
            backoff.reset();
        }
        let step = backoff.step();
        // Jittered like the backoff, so a fleet's clients do not retry in step.
        let delay = if expected_back { step.min(AWAY_RETRY_MAX.mul_f64(0.5 + fastrand::f64() / 2.0)) } else { step };
        match result {
            Ok(Ended::Stopped) | Ok(Ended::Duplicate { .. }) => break,
            Ok(Ended::ServerDrained) => {
                away_since = Some(Instant::now());
                last_failure = None;
                tracing::info!(server = %link.key, retry_in = ?delay, "the server is draining (a planned stop); reconnecting to it with backoff");
            }
            Err(e) => {
                let text = format!("{e:#}");
                let repeat = last_failure
                    .as_ref()
                    .is_some_and(|(t, at)| *t == text && at.elapsed() < cfg.reconnect_max + Duration::from_secs(1));
                if repeat {
                    tracing::debug!(server = %link.key, retry_in = ?delay, "session failed again: {text}");
                } else if expected_back {
                    tracing::info!(server = %link.key, retry_in = ?delay, "server not back yet: {text}");
                } else if link.sibling_serves() {
                    tracing::info!(server = %link.key, retry_in = ?delay, "unreachable, the name's other address serves: {text}");
                } else {
                    tracing::warn!(server = %link.key, retry_in = ?delay, "session failed: {text}");
                }
                if !repeat {
                    last_failure = Some((text, Instant::now()));
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    // A retired link (its address left DNS) leaves the status and the metrics with its session.
    link.status.send_modify(|s| {
        s.servers.remove(&link.key);
        s.recount();
    });
    link.metrics.forget_server(&link.key);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet_status(servers: &[(&str, bool)]) -> ClientStatus {
        let fleet: Vec<tunnel_lib::proto::FleetServer> = servers
            .iter()
            .map(|(id, draining)| tunnel_lib::proto::FleetServer {
                server_id: id.to_string(),
                url: format!("http://{id}:7000"),
                draining: *draining,
            })
            .collect();
        let mut status = ClientStatus::default();
        let seed = ServerStatus { fleet, fleet_version: "7".into(), ..Default::default() };
        status.servers.insert("http://seed:7000".into(), seed);
        status
    }

    fn chooser(client: &str, k: usize) -> Chooser {
        let toml = format!(
            "server = \"http://seed:7000\"\nclient_id = \"{client}\"\ngroup = \"g\"\ntoken = \"t\"\nconnections = {k}\n"
        );
        Chooser::new(&ClientConfig::from_str_named(&toml, "test").expect("a valid client.toml"))
    }

    /// k distinct servers, seeds until the fleet is known, draining ones
    /// passed over, and a server that leaves moves only the clients that held it.
    #[test]
    fn clients_choose_k_servers_by_rendezvous_rank() {
        let hosts = |urls: Vec<http::Uri>| urls.iter().map(|u| u.host().unwrap_or("").to_string()).collect::<Vec<_>>();
        assert_eq!(hosts(chooser("c", 2).choose(&ClientStatus::default())), ["seed"]);
        let five = fleet_status(&[("a", false), ("b", false), ("c", false), ("d", false), ("e", false)]);
        let mut moved = 0;
        let mut load: HashMap<String, usize> = HashMap::new();
        for i in 0..200 {
            let client = format!("client-{i}");
            let before = hosts(chooser(&client, 2).choose(&five));
            assert_eq!(before.len(), 2);
            assert_ne!(before[0], before[1]);
            for h in &before {
                *load.entry(h.clone()).or_default() += 1;
            }
            let mut without_c = five.clone();
            without_c.servers.get_mut("http://seed:7000").expect("the seed").fleet[2].draining = true;
            let after = hosts(chooser(&client, 2).choose(&without_c));
            assert!(!after.contains(&"c".to_string()));
            if before.contains(&"c".to_string()) {
                moved += 1;
                assert!(after.iter().filter(|h| before.contains(h)).count() == 1, "{before:?} -> {after:?}");
            } else {
                assert_eq!(before, after, "a client that did not hold c keeps its servers");
            }
        }
        // 400 sessions over 5 servers: about 80 each.
        assert!(load.values().all(|&n| (50..=110).contains(&n)), "{load:?}");
        assert!((50..=110).contains(&moved), "{moved}");
    }

    /// A second link reaching a server already held is refused until the
    /// holder lets go, even under the holder's own key (a returning address
    /// while its old session drains); a release frees only its own claim.
    #[tokio::test]
    async fn one_claim_per_server() {
        let claims = Arc::new(Claims::default());
        let waiting = claims.watch("edge-1");
        let first = claims.claim("edge-1", "a").expect("free");
        assert_eq!(claims.claim("edge-1", "b").err().as_deref(), Some("a"));
        assert_eq!(claims.claim("edge-1", "a").err().as_deref(), Some("a"), "not twice under one key");
        assert!(claims.claim("edge-2", "b").is_ok(), "another server is free");
        first.ends_planned();
        drop(first);
        assert_eq!(waiting.wait(Duration::from_secs(1)).await, Some(true), "a planned release");
        let second = claims.claim("edge-1", "b").expect("released with the session");
        let quiet = claims.watch("edge-1");
        assert_eq!(quiet.wait(Duration::from_millis(50)).await, None, "held: nothing released");
        drop(second);
        assert!(claims.claim("edge-1", "c").is_ok());
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
