//! Several servers as one fleet (`[cluster]`): each server keeps an etcd
//! lease, writes itself and the clients it holds under the prefix, attached to
//! that lease, and watches the prefix into an in-memory view. The request
//! path reads only the view, never etcd; when etcd is unreachable the server
//! keeps the view it has ("fail static") and catches up when etcd returns.
//!
//! Keys (components percent-encoded, so a '/' in a name cannot split them):
//!   {prefix}/members/{server_id}                      -> cluster::Member
//!   {prefix}/clients/{group}/{client_id}/{server_id}  -> cluster::Holding

use super::Shared;
use crate::etcd::{Etcd, EtcdError, KeepAlive};
use prost::Message as _;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tunnel_lib::cluster::{Holding, Member};
use tunnel_lib::config::ClusterSettings;
use tunnel_lib::etcd::{event::EventType, KeyValue};

/// How often the holdings are compared with the registry even without a
/// change signal: a safety net that bounds how stale they can be.
const RECHECK: Duration = Duration::from_secs(5);
/// Registry changes within this are written together (a client registers
/// its streams in a burst).
const COALESCE: Duration = Duration::from_millis(20);
/// Reconnect delays after etcd fails: doubling from the first, capped.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Why etcd counts as unreachable before the first connection.
const NOT_YET: &str = "not connected yet";
/// Bound on revoking the lease at exit.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the cluster knows: the live members and who holds which clients.
#[derive(Debug, Default, Clone)]
pub struct View {
    /// The etcd revision the view is current to.
    pub revision: i64,
    /// Live servers by server_id (their lease holds).
    pub members: BTreeMap<String, Member>,
    /// The revision at which `members` last changed (or was read whole).
    pub members_revision: i64,
    /// group -> client_id -> server_id -> holding.
    pub holdings: BTreeMap<String, BTreeMap<String, BTreeMap<String, Holding>>>,
    /// The fleet's pushed config (`tunnel-server config push`): its etcd
    /// revision and text; None until one is pushed.
    pub config: Option<(i64, String)>,
}

impl View {
    /// Servers other than `me` that hold a client of `group` and are live
    /// and not draining, with how many of its clients each holds (a server
    /// that takes no forwarded requests is listed too; the caller skips it).
    pub fn holders(&self, group: &str, me: &str) -> Vec<(&Member, usize)> {
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for servers in self.holdings.get(group).into_iter().flat_map(|c| c.values()) {
            for server in servers.keys() {
                *count.entry(server.as_str()).or_default() += 1;
            }
        }
        count
            .into_iter()
            .filter(|(s, _)| *s != me)
            .filter_map(|(s, n)| self.members.get(s).filter(|m| !m.draining).map(|m| (m, n)))
            .collect()
    }

    /// The live servers for clients to choose from, and their version.
    pub fn fleet(&self) -> (Vec<tunnel_lib::proto::FleetServer>, String) {
        let servers = self
            .members
            .values()
            .map(|m| tunnel_lib::proto::FleetServer {
                server_id: m.server_id.clone(),
                url: m.advertise.clone(),
                draining: m.draining,
            })
            .collect();
        (servers, self.members_revision.to_string())
    }

    fn apply(&mut self, prefix: &str, kv: &KeyValue, deleted: bool) {
        if matches!(parse_key(prefix, &kv.key), Some(Key::Member(_))) {
            self.members_revision = self.members_revision.max(kv.mod_revision);
        }
        match parse_key(prefix, &kv.key) {
            Some(Key::Member(id)) if deleted => {
                self.members.remove(&id);
            }
            Some(Key::Member(id)) => match Member::decode(kv.value.as_slice()) {
                Ok(m) => {
                    self.members.insert(id, m);
                }
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "undecodable member record in etcd: {e}; ignored")
                }
            },
            Some(Key::Holding { group, client, server }) if deleted => {
                if let Some(clients) = self.holdings.get_mut(&group) {
                    if let Some(servers) = clients.get_mut(&client) {
                        servers.remove(&server);
                        if servers.is_empty() {
                            clients.remove(&client);
                        }
                    }
                    if clients.is_empty() {
                        self.holdings.remove(&group);
                    }
                }
            }
            Some(Key::Holding { group, client, server }) => match Holding::decode(kv.value.as_slice()) {
                Ok(h) => {
                    self.holdings.entry(group).or_default().entry(client).or_default().insert(server, h);
                }
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "undecodable holding record in etcd: {e}; ignored")
                }
            },
            Some(Key::Config) if deleted => self.config = None,
            Some(Key::Config) => self.config = Some((kv.mod_revision, String::from_utf8_lossy(&kv.value).into_owned())),
            // Other keys under the prefix (a newer server's) are not ours to read.
            None => {}
        }
    }

    /// Whether some other live, non-draining server that takes forwarded
    /// requests holds a client of some group: this server can then serve
    /// by forwarding even with no client of its own.
    pub fn can_forward(&self, me: &str) -> bool {
        self.holdings.values().flat_map(|c| c.values()).flat_map(|s| s.keys()).any(|server| {
            server != me && self.members.get(server).is_some_and(|m| !m.draining && !m.peer_advertise.is_empty())
        })
    }

    /// Clients held, over all groups and servers.
    pub fn holding_count(&self) -> usize {
        self.holdings.values().flat_map(|c| c.values()).map(|s| s.len()).sum()
    }
}

/// A key under the prefix that we understand.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    /// The fleet's pushed groups and rules.
    Config,
    Member(String),
    Holding {
        group: String,
        client: String,
        server: String,
    },
}

/// Percent-encodes '%' and '/' so that a name is one key component.
fn enc(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

fn dec(s: &str) -> String {
    s.replace("%2F", "/").replace("%25", "%")
}

fn member_key(prefix: &str, server: &str) -> String {
    format!("{prefix}/members/{}", enc(server))
}

/// Where `tunnel-server config push` stores the fleet's groups and rules.
pub fn config_key(prefix: &str) -> String {
    format!("{prefix}/config")
}

fn holding_key(prefix: &str, group: &str, client: &str, server: &str) -> String {
    format!("{prefix}/clients/{}/{}/{}", enc(group), enc(client), enc(server))
}

fn parse_key(prefix: &str, key: &[u8]) -> Option<Key> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["config"] => Some(Key::Config),
        ["members", id] => Some(Key::Member(dec(id))),
        ["clients", g, c, s] => Some(Key::Holding { group: dec(g), client: dec(c), server: dec(s) }),
        _ => None,
    }
}

/// This server's part in the cluster.
pub struct Cluster {
    pub settings: ClusterSettings,
    server_id: String,
    started_unix_ms: i64,
    view: RwLock<View>,
    etcd_up: AtomicBool,
    /// Why etcd is not reachable, and since when; None while it is.
    outage: Mutex<Option<(SystemTime, String)>>,
    /// Draining: the member record says so, and leaving revokes the lease.
    draining: AtomicBool,
    /// Registry writes (puts and deletes of holdings), since start.
    pub writes: AtomicI64,
    /// The revision of the pushed config last applied (0: none yet).
    config_revision: AtomicI64,
    /// Wakes the session when this server's member record must be rewritten.
    member_changed: tokio::sync::Notify,
}

impl Cluster {
    /// The cluster part of a server named `server_id`.
    pub fn new(settings: ClusterSettings, server_id: String) -> Self {
        Cluster {
            settings,
            server_id,
            started_unix_ms: tunnel_lib::frame::now_ms(),
            view: RwLock::new(View::default()),
            etcd_up: AtomicBool::new(false),
            outage: Mutex::new(Some((SystemTime::now(), NOT_YET.into()))),
            draining: AtomicBool::new(false),
            writes: AtomicI64::new(0),
            config_revision: AtomicI64::new(0),
            member_changed: tokio::sync::Notify::new(),
        }
    }

    /// A copy of the view now.
    pub fn view(&self) -> View {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the view without copying it.
    pub fn with_view<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        f(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether the last call to etcd succeeded.
    pub fn etcd_up(&self) -> bool {
        self.etcd_up.load(Ordering::Relaxed)
    }

    /// Since when and why etcd is unreachable; None while it is reachable.
    pub fn outage(&self) -> Option<(SystemTime, String)> {
        self.outage.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Marks this server as draining in its member record.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.member_changed.notify_one();
    }

    /// The fleet as this server sees it, for the console.
    pub fn info(&self) -> tunnel_lib::introspection::ClusterInfo {
        let outage = self.outage();
        self.with_view(|v| {
            let mut clients: BTreeMap<&str, u64> = BTreeMap::new();
            for servers in v.holdings.values().flat_map(|c| c.values()) {
                for s in servers.keys() {
                    *clients.entry(s.as_str()).or_default() += 1;
                }
            }
            tunnel_lib::introspection::ClusterInfo {
                etcd_up: self.etcd_up(),
                etcd_error: outage.as_ref().map(|(_, why)| why.clone()).unwrap_or_default(),
                etcd_down_since_unix_ms: outage
                    .as_ref()
                    .and_then(|(since, _)| since.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as i64),
                revision: v.revision,
                members: v
                    .members
                    .values()
                    .map(|m| tunnel_lib::introspection::ClusterMember {
                        server_id: m.server_id.clone(),
                        advertise: m.advertise.clone(),
                        admin_advertise: m.admin_advertise.clone(),
                        draining: m.draining,
                        version: m.version.clone(),
                        started_unix_ms: m.started_unix_ms,
                        clients: clients.get(m.server_id.as_str()).copied().unwrap_or(0),
                    })
                    .collect(),
                holdings: v.holding_count() as u64,
                config_revision: self.config_revision.load(Ordering::Relaxed),
            }
        })
    }

    fn me(&self) -> Member {
        Member {
            server_id: self.server_id.clone(),
            advertise: self.settings.advertise.to_string().trim_end_matches('/').to_string(),
            peer_advertise: self
                .settings
                .peer_advertise
                .as_ref()
                .map(|u| u.to_string().trim_end_matches('/').to_string())
                .unwrap_or_default(),
            draining: self.draining.load(Ordering::Relaxed),
            version: tunnel_lib::VERSION.to_string(),
            started_unix_ms: self.started_unix_ms,
            admin_advertise: self
                .settings
                .admin_advertise
                .as_ref()
                .map(|u| u.to_string().trim_end_matches('/').to_string())
                .unwrap_or_default(),
        }
    }

    fn set_up(&self, shared: &Shared) {
        if !self.etcd_up.swap(true, Ordering::Relaxed) {
            let was = self.outage.lock().unwrap_or_else(|e| e.into_inner()).take();
            let members = self.with_view(|v| v.members.len());
            match was {
                Some((since, why)) if why != NOT_YET => {
                    let down_for = since.elapsed().unwrap_or_default();
                    tracing::info!(server_id = %self.server_id, down_for = ?down_for, members, "etcd reachable again: membership and registry in sync");
                }
                _ => tracing::info!(server_id = %self.server_id, members, "joined the cluster in etcd"),
            }
        }
        shared.metrics.cluster_etcd_up.set(1);
    }

    fn set_down(&self, shared: &Shared, why: &str) {
        shared.metrics.cluster_etcd_up.set(0);
        let mut outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        if self.etcd_up.swap(false, Ordering::Relaxed) || outage.is_none() {
            tracing::warn!(server_id = %self.server_id, "etcd unreachable: {why}; serving on with the registry and config held ({} members known)", self.with_view(|v| v.members.len()));
            *outage = Some((SystemTime::now(), why.to_string()));
        } else if let Some((_, last)) = outage.as_mut() {
            // Keep the latest reason for /ready and the console, without a log line per retry.
            last.clear();
            last.push_str(why);
        }
    }
}

/// `tunnel-server config push`: checks `text` as a pushed config (groups
/// and rules) and stores it for the fleet; the etcd revision it got, which
/// becomes every group's config version on every server.
pub async fn push_config(settings: &ClusterSettings, text: &str, file: &str) -> anyhow::Result<i64> {
    use anyhow::Context as _;
    tunnel_lib::config::PushedConfig::from_str_named(text, file)?;
    let etcd = Etcd::connect(settings, 0).await.context("connecting to etcd")?;
    let revision = etcd
        .put(config_key(&settings.prefix).as_bytes(), text.as_bytes().to_vec(), 0)
        .await
        .context("storing the config in etcd")?;
    Ok(revision)
}

/// Keeps this server's membership and holdings in etcd and the view current
/// until `stop`; then, if the server is draining, revokes its lease so that
/// its entries vanish at once instead of after the TTL.
pub async fn run(shared: Arc<Shared>, cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut state = SessionState::default();
    let mut delay = RETRY_MIN;
    let mut member = 0usize;
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => break,
            r = session(&shared, &cluster, &mut state, member, &stop) => r,
        };
        match outcome {
            Ok(()) => break,
            Err(e) => {
                cluster.set_down(&shared, &e.to_string());
                // The next attempt starts at the next member.
                member = member.wrapping_add(1);
            }
        }
        let jittered = delay.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(jittered) => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
        if cluster.etcd_up() {
            delay = RETRY_MIN;
        }
    }
    // Leaving: the lease takes every key of ours with it.
    if let (Some(lease), Some(etcd)) = (state.lease, state.etcd.as_ref()) {
        match tokio::time::timeout(REVOKE_TIMEOUT, etcd.revoke(lease)).await {
            Ok(Ok(())) => {
                tracing::info!(server_id = %cluster.server_id, "left the cluster: membership and holdings removed from etcd")
            }
            Ok(Err(e)) => tracing::warn!(
                "leaving the cluster: {e}; entries vanish when the lease expires ({:?})",
                cluster.settings.lease_ttl
            ),
            Err(_) => tracing::warn!(
                "leaving the cluster: etcd did not answer; entries vanish when the lease expires ({:?})",
                cluster.settings.lease_ttl
            ),
        }
    }
}

/// What outlives one connection to etcd.
#[derive(Default)]
struct SessionState {
    etcd: Option<Etcd>,
    lease: Option<i64>,
    /// The holdings as last written under `lease`.
    published: BTreeMap<(String, String), i64>,
}

/// One connection to etcd: lease, member record, holdings, view; returns on
/// the first error (the caller retries) or Ok when `stop` fires.
async fn session(
    shared: &Arc<Shared>,
    cluster: &Cluster,
    state: &mut SessionState,
    member: usize,
    stop: &CancellationToken,
) -> Result<(), EtcdError> {
    let settings = &cluster.settings;
    let prefix = settings.prefix.as_str();
    let etcd = Etcd::connect(settings, member).await?;
    state.etcd = Some(etcd.clone());
    // A lease that survived the outage keeps our keys: renew it. One that
    // expired took them with it: start over under a new one.
    let mut keep_alive = match state.lease {
        Some(lease) => {
            let (ka, ttl) = etcd.keep_alive(lease).await?;
            if ttl > 0 {
                Some(ka)
            } else {
                tracing::info!(server_id = %cluster.server_id, "etcd lease expired during the outage: writing membership and holdings again");
                None
            }
        }
        None => None,
    };
    if keep_alive.is_none() {
        let lease = etcd.grant(settings.lease_ttl).await?;
        state.lease = Some(lease);
        state.published.clear();
        keep_alive = Some(etcd.keep_alive(lease).await?.0);
    }
    let (Some(lease), Some(mut keep_alive)) = (state.lease, keep_alive) else {
        return Err(EtcdError::Call { call: "lease", message: "no lease".into() });
    };
    etcd.put(member_key(prefix, &cluster.server_id).as_bytes(), cluster.me().encode_to_vec(), lease).await?;
    // The whole state at one revision: what we missed while away, deletes
    // included, then the watch from just after it.
    let (kvs, revision) = etcd.range_prefix(format!("{prefix}/").as_bytes()).await?;
    let mut fresh = View { revision, members_revision: revision, ..Default::default() };
    for kv in &kvs {
        fresh.apply(prefix, kv, false);
    }
    // Our own holdings as etcd has them: ones we no longer hold (written
    // before an outage, under a lease that survived it) are deleted below.
    state.published = fresh
        .holdings
        .iter()
        .flat_map(|(g, clients)| clients.iter().map(move |(c, servers)| (g, c, servers)))
        .filter_map(|(g, c, servers)| {
            servers.get(&cluster.server_id).map(|h| ((g.clone(), c.clone()), h.since_unix_ms))
        })
        .collect();
    *cluster.view.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    follow_pushed_config(shared, cluster);
    let mut watch = etcd.watch_prefix(format!("{prefix}/").as_bytes(), revision + 1).await?;
    publish(shared, cluster, &etcd, lease, &mut state.published).await?;
    cluster.set_up(shared);
    update_gauges(shared, cluster);

    let mut renew = tokio::time::interval(settings.lease_ttl / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    renew.tick().await;
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    recheck.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = renew.tick() => renew_lease(cluster, &mut keep_alive).await?,
            msg = watch.responses.message() => apply_watch(shared, cluster, msg)?,
            _ = shared.registry.changed() => {
                tokio::time::sleep(COALESCE).await;
                publish(shared, cluster, &etcd, lease, &mut state.published).await?;
            }
            _ = recheck.tick() => publish(shared, cluster, &etcd, lease, &mut state.published).await?,
            _ = cluster.member_changed.notified() => {
                etcd.put(member_key(prefix, &cluster.server_id).as_bytes(), cluster.me().encode_to_vec(), lease).await?;
            }
        }
    }
}

async fn renew_lease(cluster: &Cluster, keep_alive: &mut KeepAlive) -> Result<(), EtcdError> {
    match keep_alive.renew().await? {
        0 => Err(EtcdError::Call {
            call: "lease keep-alive",
            message: format!("lease of {} expired", cluster.server_id),
        }),
        _ => Ok(()),
    }
}

fn apply_watch(
    shared: &Shared,
    cluster: &Cluster,
    msg: Result<Option<tunnel_lib::etcd::WatchResponse>, tonic::Status>,
) -> Result<(), EtcdError> {
    let resp = match msg {
        Ok(Some(r)) => r,
        Ok(None) => return Err(EtcdError::Call { call: "watch", message: "stream ended".into() }),
        Err(s) => return Err(EtcdError::Call { call: "watch", message: s.message().to_string() }),
    };
    if resp.canceled {
        let why = if resp.compact_revision > 0 {
            format!("compacted past revision {}", resp.compact_revision)
        } else {
            resp.cancel_reason
        };
        return Err(EtcdError::Call { call: "watch", message: format!("cancelled by etcd: {why}") });
    }
    let prefix = cluster.settings.prefix.as_str();
    {
        let mut view = cluster.view.write().unwrap_or_else(|e| e.into_inner());
        for ev in &resp.events {
            if let Some(kv) = &ev.kv {
                view.apply(prefix, kv, ev.r#type == EventType::Delete as i32);
            }
        }
        if let Some(h) = resp.header {
            view.revision = view.revision.max(h.revision);
        }
    }
    if !resp.events.is_empty() {
        update_gauges(shared, cluster);
        follow_pushed_config(shared, cluster);
    }
    Ok(())
}

/// Applies the fleet's pushed config when the view holds a newer one than
/// the one in force (every revision once; a watch may replay).
fn follow_pushed_config(shared: &Shared, cluster: &Cluster) {
    let Some((revision, text)) = cluster.with_view(|v| v.config.clone()) else { return };
    if cluster.config_revision.load(Ordering::Relaxed) >= revision {
        return;
    }
    cluster.config_revision.store(revision, Ordering::Relaxed);
    super::reload::apply_pushed(shared, &text, revision);
}

/// Writes the difference between the registry's holdings and what was
/// last written: a put per client that came, a delete per client that went.
async fn publish(
    shared: &Shared,
    cluster: &Cluster,
    etcd: &Etcd,
    lease: i64,
    published: &mut BTreeMap<(String, String), i64>,
) -> Result<(), EtcdError> {
    let prefix = cluster.settings.prefix.as_str();
    let now: BTreeMap<(String, String), i64> = shared
        .registry
        .holdings()
        .into_iter()
        .map(|(k, since)| {
            let ms = since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            (k, ms)
        })
        .collect();
    let gone: Vec<(String, String)> = published.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
    for (group, client) in gone {
        etcd.delete(holding_key(prefix, &group, &client, &cluster.server_id).as_bytes()).await?;
        published.remove(&(group, client));
        cluster.writes.fetch_add(1, Ordering::Relaxed);
        shared.metrics.cluster_registry_writes.inc();
    }
    for ((group, client), since) in now {
        if published.contains_key(&(group.clone(), client.clone())) {
            continue;
        }
        let h = Holding {
            server_id: cluster.server_id.clone(),
            group: group.clone(),
            client_id: client.clone(),
            since_unix_ms: since,
        };
        etcd.put(holding_key(prefix, &group, &client, &cluster.server_id).as_bytes(), h.encode_to_vec(), lease).await?;
        published.insert((group, client), since);
        cluster.writes.fetch_add(1, Ordering::Relaxed);
        shared.metrics.cluster_registry_writes.inc();
    }
    Ok(())
}

fn update_gauges(shared: &Shared, cluster: &Cluster) {
    let (members, held, revision) = cluster.with_view(|v| (v.members.len(), v.holding_count(), v.revision));
    shared.metrics.cluster_members.set(members as i64);
    shared.metrics.cluster_holdings.set(held as i64);
    shared.metrics.cluster_revision.set(revision);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_names_with_slashes_and_percents() {
        let k = holding_key("/t", "g/1", "c%2F", "s");
        assert_eq!(k, "/t/clients/g%2F1/c%252F/s");
        assert_eq!(
            parse_key("/t", k.as_bytes()),
            Some(Key::Holding { group: "g/1".into(), client: "c%2F".into(), server: "s".into() })
        );
        assert_eq!(parse_key("/t", member_key("/t", "a/b").as_bytes()), Some(Key::Member("a/b".into())));
        // Another fleet's prefix that merely starts with ours is not ours.
        assert_eq!(parse_key("/t", b"/tx/members/a"), None);
        assert_eq!(parse_key("/t", config_key("/t").as_bytes()), Some(Key::Config));
        // A key a newer server may write is not ours to read.
        assert_eq!(parse_key("/t", b"/t/something-new/x"), None);
    }

    #[test]
    fn holders_skip_this_server_draining_and_departed_members() {
        let prefix = "/t";
        let mut v = View::default();
        let put_member = |v: &mut View, id: &str, draining: bool| {
            let m = Member { server_id: id.into(), draining, ..Default::default() };
            let kv =
                KeyValue { key: member_key(prefix, id).into_bytes(), value: m.encode_to_vec(), ..Default::default() };
            v.apply(prefix, &kv, false);
        };
        let hold = |v: &mut View, g: &str, c: &str, s: &str| {
            let h = Holding { server_id: s.into(), group: g.into(), client_id: c.into(), since_unix_ms: 1 };
            let kv = KeyValue {
                key: holding_key(prefix, g, c, s).into_bytes(),
                value: h.encode_to_vec(),
                ..Default::default()
            };
            v.apply(prefix, &kv, false);
        };
        for (id, d) in [("a", false), ("b", false), ("c", true)] {
            put_member(&mut v, id, d);
        }
        hold(&mut v, "web", "c1", "a");
        hold(&mut v, "web", "c1", "b");
        hold(&mut v, "web", "c2", "b");
        hold(&mut v, "web", "c3", "c");
        // A holding whose server's member record is gone (lease expiring).
        hold(&mut v, "web", "c4", "d");
        let ids = |v: &View| v.holders("web", "a").iter().map(|(m, n)| (m.server_id.clone(), *n)).collect::<Vec<_>>();
        assert_eq!(ids(&v), vec![("b".to_string(), 2)]);
        let del = KeyValue { key: holding_key(prefix, "web", "c2", "b").into_bytes(), ..Default::default() };
        v.apply(prefix, &del, true);
        assert_eq!(ids(&v), vec![("b".to_string(), 1)]);
        assert_eq!(v.holding_count(), 4);
        assert!(v.holders("api", "a").is_empty());
    }
}
