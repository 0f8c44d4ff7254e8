//! The client registry: every live stream by `stream_id`, with its client,
//! group, type and heartbeat, and the choice of a data stream for a request.

use crate::tunnel::exchange::Exchanges;
use crate::tunnel::outbound::Outbound;
use crate::tunnel::tuning::LinkProbe;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tunnel_lib::proto::{LinkCounters, LinkOptions, StreamType};

/// One live stream: fixed facts, and the handles to use and close it.
pub struct StreamHandle {
    pub stream_id: String,
    pub client_id: String,
    pub group: String,
    pub stream_type: StreamType,
    pub session_id: String,
    pub peer: Option<SocketAddr>,
    pub connected_at: SystemTime,
    pub exchanges: Arc<Exchanges>,
    /// Fires to close the stream.
    pub cancel: CancellationToken,
    /// The server's socket of the link connection carrying the stream.
    pub link: Option<Arc<LinkProbe>>,
    /// The options the client says its end of the link has.
    pub client_link: Option<LinkOptions>,
    draining: AtomicBool,
    /// Has asked for config: config pushes go here.
    syncs_config: AtomicBool,
}

impl StreamHandle {
    /// A handle for a stream that just registered.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream_id: String,
        client_id: String,
        group: String,
        stream_type: StreamType,
        session_id: String,
        peer: Option<SocketAddr>,
        exchanges: Arc<Exchanges>,
        cancel: CancellationToken,
    ) -> Self {
        StreamHandle {
            stream_id,
            client_id,
            group,
            stream_type,
            session_id,
            peer,
            connected_at: SystemTime::now(),
            exchanges,
            cancel,
            link: None,
            client_link: None,
            draining: AtomicBool::new(false),
            syncs_config: AtomicBool::new(false),
        }
    }

    /// Names the link connection the stream came on, and what the client
    /// says of its end.
    pub fn with_link(mut self, probe: Option<Arc<LinkProbe>>, client: Option<LinkOptions>) -> Self {
        self.link = probe;
        self.client_link = client;
        self
    }

    /// The stream's outbound queues.
    pub fn outbound(&self) -> &Outbound {
        self.exchanges.outbound()
    }

    /// No new exchanges go to a draining stream.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the stream takes no new exchanges.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the stream as the one its client syncs config on.
    pub fn set_syncs_config(&self) {
        self.syncs_config.store(true, Ordering::Relaxed);
    }
}

struct StreamState {
    handle: Arc<StreamHandle>,
    last_heartbeat: Instant,
    last_heartbeat_at: SystemTime,
    last_delay_ms: i64,
    last_rtt_ms: i64,
    heartbeats: u64,
    /// The last HEARTBEAT_WINDOW one-way delays and round trips, ms.
    /// i32: a sample fits (24 days of ms) and a full window costs half the
    /// memory, which counts with thousands of streams.
    delays: VecDeque<i32>,
    rtts: VecDeque<i32>,
    /// The client's socket of the stream's connection, as its last heartbeat said.
    client_counters: Option<LinkCounters>,
}

/// Heartbeats kept per stream for delay statistics.
pub const HEARTBEAT_WINDOW: usize = 128;
/// Heartbeat delays the console is sent per stream, for its history line:
/// fewer than kept, since a stream is resent on every heartbeat.
pub const DELAY_HISTORY: usize = 64;

/// p50, p99 and max of a window of samples (ms); all -1 when it is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    pub p50: i64,
    pub p99: i64,
    pub max: i64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &VecDeque<i32>) -> Self {
        if samples.is_empty() {
            return Percentiles { p50: -1, p99: -1, max: -1 };
        }
        let mut v: Vec<i64> = samples.iter().map(|&s| i64::from(s)).collect();
        v.sort_unstable();
        let rank = |p: usize| v[((v.len() * p).div_ceil(100)).clamp(1, v.len()) - 1];
        Percentiles { p50: rank(50), p99: rank(99), max: v[v.len() - 1] }
    }
}

fn push_sample(window: &mut VecDeque<i32>, v: i64) {
    if window.len() == HEARTBEAT_WINDOW {
        window.pop_front();
    }
    window.push_back(v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32);
}

struct ClientState {
    group: String,
    session_started_ms: i64,
    peer: Option<SocketAddr>,
    version: String,
    session_id: String,
    connected_at: SystemTime,
    config_version: String,
    streams: BTreeSet<String>,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<String, StreamState>,
    clients: HashMap<String, ClientState>,
    /// HTTP streams per group, for picking.
    by_group: HashMap<String, Vec<Arc<StreamHandle>>>,
}

/// A copy of one stream's state, for tests, logs and the console.
#[derive(Debug, Clone)]
pub struct StreamView {
    pub stream_id: String,
    pub client_id: String,
    pub group: String,
    pub stream_type: StreamType,
    pub peer: Option<SocketAddr>,
    pub connected_at: SystemTime,
    pub last_heartbeat: SystemTime,
    pub heartbeat_age: Duration,
    pub last_delay_ms: i64,
    /// -1 until the client reports one.
    pub last_rtt_ms: i64,
    pub heartbeats: u64,
    /// One-way heartbeat delay over the last HEARTBEAT_WINDOW heartbeats.
    pub delay: Percentiles,
    /// The last `DELAY_HISTORY` of those delays, oldest first, ms.
    pub delay_history: Vec<i64>,
    /// Client-measured round trip over the same window.
    pub rtt: Percentiles,
    pub in_flight: usize,
    /// Of in_flight, upgraded connections.
    pub upgraded: usize,
    pub requests: u64,
    pub bytes_to_client: u64,
    pub bytes_from_client: u64,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub draining: bool,
    /// The link connection's socket, read outside the registry's lock.
    pub link: Option<Arc<LinkProbe>>,
    pub client_link: Option<LinkOptions>,
    pub client_counters: Option<LinkCounters>,
}

/// A copy of one client's state.
#[derive(Debug, Clone)]
pub struct ClientView {
    pub client_id: String,
    pub group: String,
    pub peer: Option<SocketAddr>,
    pub version: String,
    pub session_id: String,
    pub connected_at: SystemTime,
    pub config_version: String,
    pub streams: Vec<String>,
}

/// Why a registration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The client id is connected in another group: ids must be unique.
    #[error("client_id is connected in group {0:?}; client ids must be unique")]
    OtherGroup(String),
    /// A newer session of this client is connected.
    #[error("a newer session of this client is connected")]
    StaleSession,
    /// Another client holds this stream id.
    #[error("stream_id is in use by another client")]
    StreamIdTaken,
}

/// Why no stream was picked for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStream {
    /// The group has no connected client (or all are draining).
    NoClient,
    /// Every client of the group has max_in_flight requests in flight.
    Busy,
}

/// All live streams and clients.
#[derive(Default)]
pub struct Registry {
    // std RwLock: never held across an await; reads (picks) dominate.
    inner: RwLock<Inner>,
    rr: AtomicUsize,
    /// Wakes whoever publishes the holdings (the cluster) when they may have changed.
    changed: tokio::sync::Notify,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a registered stream. Returns the streams of the client's older
    /// sessions, which the caller closes: a client that reconnected has left
    /// them behind, and waiting for their heartbeats to time out would send
    /// requests into dead streams.
    pub fn register(
        &self,
        handle: Arc<StreamHandle>,
        version: &str,
        config_version: &str,
        session_started_ms: i64,
    ) -> Result<Vec<Arc<StreamHandle>>, RegisterError> {
        let mut inner = self.write();
        let mut stale = Vec::new();
        let mut replaced_session = false;
        if let Some(c) = inner.clients.get(&handle.client_id) {
            if c.group != handle.group {
                return Err(RegisterError::OtherGroup(c.group.clone()));
            }
            if c.session_id != handle.session_id {
                if session_started_ms < c.session_started_ms {
                    return Err(RegisterError::StaleSession);
                }
                replaced_session = true;
            }
        }
        if let Some(s) = inner.streams.get(&handle.stream_id) {
            if s.handle.client_id != handle.client_id {
                return Err(RegisterError::StreamIdTaken);
            }
        }
        if replaced_session {
            let old: Vec<String> = inner.clients[&handle.client_id].streams.iter().cloned().collect();
            for id in old {
                if let Some(s) = Self::remove_locked(&mut inner, &id) {
                    stale.push(s);
                }
            }
        }
        // Re-registration of a known stream id replaces the old entry.
        if let Some(s) = Self::remove_locked(&mut inner, &handle.stream_id) {
            stale.push(s);
        }
        let client = inner.clients.entry(handle.client_id.clone()).or_insert_with(|| ClientState {
            group: handle.group.clone(),
            session_started_ms,
            peer: handle.peer,
            version: version.to_string(),
            session_id: handle.session_id.clone(),
            connected_at: SystemTime::now(),
            config_version: config_version.to_string(),
            streams: BTreeSet::new(),
        });
        client.streams.insert(handle.stream_id.clone());
        client.version = version.to_string();
        if handle.stream_type == StreamType::Http {
            inner.by_group.entry(handle.group.clone()).or_default().push(handle.clone());
        }
        inner.streams.insert(
            handle.stream_id.clone(),
            StreamState {
                handle,
                last_heartbeat: Instant::now(),
                last_heartbeat_at: SystemTime::now(),
                last_delay_ms: 0,
                last_rtt_ms: -1,
                heartbeats: 0,
                delays: VecDeque::with_capacity(HEARTBEAT_WINDOW),
                rtts: VecDeque::with_capacity(HEARTBEAT_WINDOW),
                client_counters: None,
            },
        );
        self.changed.notify_one();
        Ok(stale)
    }

    /// Records a heartbeat of `stream_id`, and the config version its client
    /// says it applies; true if that version is not the one it said before.
    pub fn heartbeat(
        &self,
        stream_id: &str,
        delay_ms: i64,
        rtt_ms: i64,
        config_version: &str,
        client_counters: Option<LinkCounters>,
    ) -> bool {
        let mut inner = self.write();
        let Some(s) = inner.streams.get_mut(stream_id) else {
            return false;
        };
        if client_counters.is_some() {
            s.client_counters = client_counters;
        }
        s.last_heartbeat = Instant::now();
        s.last_heartbeat_at = SystemTime::now();
        s.last_delay_ms = delay_ms;
        push_sample(&mut s.delays, delay_ms);
        if rtt_ms >= 0 {
            s.last_rtt_ms = rtt_ms;
            push_sample(&mut s.rtts, rtt_ms);
        }
        s.heartbeats += 1;
        let client_id = s.handle.client_id.clone();
        match inner.clients.get_mut(&client_id) {
            Some(c) if !config_version.is_empty() && c.config_version != config_version => {
                c.config_version = config_version.to_string();
                true
            }
            _ => false,
        }
    }

    /// Records the config version a client says it holds; true if it is not
    /// the one it said before.
    pub fn set_config_version(&self, client_id: &str, version: &str) -> bool {
        match self.write().clients.get_mut(client_id) {
            Some(c) if c.config_version != version => {
                c.config_version = version.to_string();
                true
            }
            _ => false,
        }
    }

    /// Removes a stream (and its client when it was the last one).
    pub fn remove(&self, stream_id: &str) -> Option<Arc<StreamHandle>> {
        let removed = Self::remove_locked(&mut self.write(), stream_id);
        self.changed.notify_one();
        removed
    }

    /// Removes `stream_id` only if it is still this very handle (a newer
    /// registration with the same id must not be removed by the old stream's end).
    pub fn remove_if_same(&self, handle: &Arc<StreamHandle>) {
        let mut inner = self.write();
        let same = inner.streams.get(&handle.stream_id).is_some_and(|s| Arc::ptr_eq(&s.handle, handle));
        if same {
            Self::remove_locked(&mut inner, &handle.stream_id);
            self.changed.notify_one();
        }
    }

    fn remove_locked(inner: &mut Inner, stream_id: &str) -> Option<Arc<StreamHandle>> {
        let s = inner.streams.remove(stream_id)?;
        let h = s.handle;
        if let Some(list) = inner.by_group.get_mut(&h.group) {
            list.retain(|x| !Arc::ptr_eq(x, &h));
            if list.is_empty() {
                inner.by_group.remove(&h.group);
            }
        }
        let gone = inner.clients.get_mut(&h.client_id).is_some_and(|c| {
            c.streams.remove(stream_id);
            c.streams.is_empty()
        });
        if gone {
            inner.clients.remove(&h.client_id);
        }
        Some(h)
    }

    /// A data stream of `group` for a new exchange: the least loaded, ties
    /// broken round robin; draining streams are skipped.
    pub fn pick(&self, group: &str, max_in_flight: usize) -> Result<Arc<StreamHandle>, NoStream> {
        let inner = self.read();
        let list = inner.by_group.get(group).ok_or(NoStream::NoClient)?;
        let n = list.len();
        // Requests in flight per client, over its data streams. Upgraded
        // connections are long-lived and bounded by max_connections instead:
        // idle WebSockets must not lock a client out of ordinary requests.
        let mut per_client: HashMap<&str, usize> = HashMap::new();
        for h in list {
            let requests = h.exchanges.in_flight().saturating_sub(h.exchanges.upgraded());
            *per_client.entry(h.client_id.as_str()).or_default() += requests;
        }
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        // Load: a stream whose outbound queue is full (its connection is not
        // draining it) ranks after every stream that is moving.
        let mut best: Option<(&Arc<StreamHandle>, (bool, usize))> = None;
        let mut busy = false;
        for i in 0..n {
            let h = &list[(start + i) % n];
            if h.is_draining() {
                continue;
            }
            if per_client.get(h.client_id.as_str()).copied().unwrap_or(0) >= max_in_flight {
                busy = true;
                continue;
            }
            let out = h.outbound();
            let load = (out.depth() >= out.capacity(), h.exchanges.in_flight());
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((h, load));
            }
        }
        match best {
            Some((h, _)) => Ok(h.clone()),
            None if busy => Err(NoStream::Busy),
            None => Err(NoStream::NoClient),
        }
    }

    /// Every registered stream's handle.
    pub fn handles(&self) -> Vec<Arc<StreamHandle>> {
        self.read().streams.values().map(|s| s.handle.clone()).collect()
    }

    /// Removes and returns streams silent for longer than their group's timeout.
    pub fn reap(&self, timeout_of: impl Fn(&str) -> Duration) -> Vec<(Arc<StreamHandle>, Duration)> {
        let now = Instant::now();
        let expired: Vec<(String, Duration)> = self
            .read()
            .streams
            .iter()
            .filter_map(|(id, s)| {
                let age = now.duration_since(s.last_heartbeat);
                (age > timeout_of(&s.handle.group)).then(|| (id.clone(), age))
            })
            .collect();
        if expired.is_empty() {
            return Vec::new();
        }
        let mut inner = self.write();
        self.changed.notify_one();
        expired.into_iter().filter_map(|(id, age)| Self::remove_locked(&mut inner, &id).map(|h| (h, age))).collect()
    }

    /// Marks every stream of a client as draining.
    pub fn drain_client(&self, client_id: &str) {
        let inner = self.read();
        if let Some(c) = inner.clients.get(client_id) {
            for id in &c.streams {
                if let Some(s) = inner.streams.get(id) {
                    s.handle.set_draining();
                }
            }
        }
        self.changed.notify_one();
    }

    /// Marks one stream as draining.
    pub fn drain_stream(&self, handle: &StreamHandle) {
        handle.set_draining();
        self.changed.notify_one();
    }

    /// Resolves when streams registered, ended or started draining since the
    /// last call (one waiter: the cluster's publisher).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Each (group, client) with a data stream that takes new exchanges, and
    /// when its oldest such stream connected: what the cluster publishes.
    pub fn holdings(&self) -> BTreeMap<(String, String), SystemTime> {
        let mut held: BTreeMap<(String, String), SystemTime> = BTreeMap::new();
        for h in self.read().by_group.values().flatten().filter(|h| !h.is_draining()) {
            let since = held.entry((h.group.clone(), h.client_id.clone())).or_insert(h.connected_at);
            *since = (*since).min(h.connected_at);
        }
        held
    }

    /// Streams that config pushes for `group` go to.
    pub fn config_streams(&self, group: &str) -> Vec<Arc<StreamHandle>> {
        self.read()
            .streams
            .values()
            .filter(|s| s.handle.group == group && s.handle.syncs_config.load(Ordering::Relaxed))
            .map(|s| s.handle.clone())
            .collect()
    }

    /// The live stream `stream_id`.
    pub fn stream(&self, stream_id: &str) -> Option<Arc<StreamHandle>> {
        self.read().streams.get(stream_id).map(|s| s.handle.clone())
    }

    /// The live streams of a client.
    pub fn client_streams(&self, client_id: &str) -> Vec<Arc<StreamHandle>> {
        let inner = self.read();
        let Some(c) = inner.clients.get(client_id) else { return Vec::new() };
        c.streams.iter().filter_map(|id| inner.streams.get(id)).map(|s| s.handle.clone()).collect()
    }

    /// Whether config pushes go to this stream.
    pub fn syncs_config(handle: &StreamHandle) -> bool {
        handle.syncs_config.load(Ordering::Relaxed)
    }

    /// Whether some client can take requests now: a data stream of any
    /// group registered and not draining.
    pub fn can_serve(&self) -> bool {
        self.read().by_group.values().flatten().any(|h| !h.is_draining())
    }

    /// Every live stream.
    pub fn all_streams(&self) -> Vec<Arc<StreamHandle>> {
        self.read().streams.values().map(|s| s.handle.clone()).collect()
    }

    /// A copy of every stream's state, sorted by client then stream id.
    pub fn streams(&self) -> Vec<StreamView> {
        let now = Instant::now();
        let mut v: Vec<StreamView> = self
            .read()
            .streams
            .values()
            .map(|s| {
                let h = &s.handle;
                StreamView {
                    stream_id: h.stream_id.clone(),
                    client_id: h.client_id.clone(),
                    group: h.group.clone(),
                    stream_type: h.stream_type,
                    peer: h.peer,
                    connected_at: h.connected_at,
                    last_heartbeat: s.last_heartbeat_at,
                    heartbeat_age: now.duration_since(s.last_heartbeat),
                    last_delay_ms: s.last_delay_ms,
                    last_rtt_ms: s.last_rtt_ms,
                    heartbeats: s.heartbeats,
                    delay: Percentiles::of(&s.delays),
                    delay_history: s
                        .delays
                        .iter()
                        .skip(s.delays.len().saturating_sub(DELAY_HISTORY))
                        .map(|&d| i64::from(d))
                        .collect(),
                    rtt: Percentiles::of(&s.rtts),
                    in_flight: h.exchanges.in_flight(),
                    upgraded: h.exchanges.upgraded(),
                    requests: h.exchanges.stats.exchanges.load(Ordering::Relaxed),
                    bytes_to_client: h.exchanges.stats.bytes_sent.load(Ordering::Relaxed),
                    bytes_from_client: h.exchanges.stats.bytes_received.load(Ordering::Relaxed),
                    queue_depth: h.outbound().depth(),
                    queue_capacity: h.outbound().capacity(),
                    draining: h.is_draining(),
                    link: h.link.clone(),
                    client_link: h.client_link.clone(),
                    client_counters: s.client_counters,
                }
            })
            .collect();
        v.sort_by(|a, b| (&a.client_id, &a.stream_id).cmp(&(&b.client_id, &b.stream_id)));
        v
    }

    /// A copy of every client's state, sorted by id.
    pub fn clients(&self) -> Vec<ClientView> {
        let mut v: Vec<ClientView> = self
            .read()
            .clients
            .iter()
            .map(|(id, c)| ClientView {
                client_id: id.clone(),
                group: c.group.clone(),
                peer: c.peer,
                version: c.version.clone(),
                session_id: c.session_id.clone(),
                connected_at: c.connected_at,
                config_version: c.config_version.clone(),
                streams: c.streams.iter().cloned().collect(),
            })
            .collect();
        v.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::exchange::Role;

    fn handle(stream: &str, client: &str, session: &str, ty: StreamType) -> Arc<StreamHandle> {
        let cancel = CancellationToken::new();
        let (out, _stream) = Outbound::new(cancel.clone());
        Arc::new(StreamHandle::new(
            stream.into(),
            client.into(),
            "g".into(),
            ty,
            session.into(),
            None,
            Exchanges::new(out, Role::Server, client.into()),
            cancel,
        ))
    }

    /// Picks spread over streams, skip draining ones, and only HTTP streams are picked.
    #[test]
    fn pick_spreads_and_skips_draining() {
        let r = Registry::new();
        r.register(handle("c", "a", "s1", StreamType::Control), "v", "", 1).expect("ok");
        let h1 = handle("h1", "a", "s1", StreamType::Http);
        let h2 = handle("h2", "a", "s1", StreamType::Http);
        r.register(h1.clone(), "v", "", 1).expect("ok");
        r.register(h2.clone(), "v", "", 1).expect("ok");
        let picks: BTreeSet<String> =
            (0..4).filter_map(|_| r.pick("g", 10).ok()).map(|h| h.stream_id.clone()).collect();
        assert_eq!(picks, BTreeSet::from(["h1".to_string(), "h2".to_string()]));
        h1.set_draining();
        assert!((0..4).all(|_| r.pick("g", 10).is_ok_and(|h| h.stream_id == "h2")));
        h2.set_draining();
        assert_eq!(r.pick("g", 10).err(), Some(NoStream::NoClient));
        assert_eq!(r.pick("other", 10).err(), Some(NoStream::NoClient));
    }

    /// A reconnect (new session) evicts the old session's streams at once.
    #[test]
    fn new_session_evicts_stale_streams() {
        let r = Registry::new();
        r.register(handle("old1", "a", "s1", StreamType::Http), "v", "", 1).expect("ok");
        r.register(handle("old2", "a", "s1", StreamType::Control), "v", "", 1).expect("ok");
        // A straggler from an even older session is refused and evicts nothing.
        assert_eq!(
            r.register(handle("older", "a", "s0", StreamType::Http), "v", "", 0).err(),
            Some(RegisterError::StaleSession)
        );
        let stale = r.register(handle("new1", "a", "s2", StreamType::Http), "v", "", 2).expect("newer session");
        let mut ids: Vec<_> = stale.iter().map(|h| h.stream_id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["old1", "old2"]);
        assert_eq!(r.streams().len(), 1);
        assert_eq!(r.clients()[0].streams, ["new1"]);
        // The same client id in another group is refused; so is another client's stream id.
        let mut other = handle("x", "a", "s9", StreamType::Http);
        Arc::get_mut(&mut other).expect("unshared").group = "other".into();
        assert!(matches!(r.register(other, "v", "", 9), Err(RegisterError::OtherGroup(_))));
        assert_eq!(
            r.register(handle("new1", "b", "s1", StreamType::Http), "v", "", 9).err(),
            Some(RegisterError::StreamIdTaken)
        );
    }

    /// Nearest-rank percentiles over a window.
    #[test]
    fn percentiles() {
        let w: VecDeque<i32> = (1..=100).collect();
        assert_eq!(Percentiles::of(&w), Percentiles { p50: 50, p99: 99, max: 100 });
        let w: VecDeque<i32> = [5].into_iter().collect();
        assert_eq!(Percentiles::of(&w), Percentiles { p50: 5, p99: 5, max: 5 });
    }

    /// Heartbeats update their own stream; silent streams are reaped; a client goes with its last stream.
    #[test]
    fn heartbeats_and_reaping() {
        let r = Registry::new();
        r.register(handle("h1", "a", "s", StreamType::Http), "v", "", 1).expect("ok");
        r.register(handle("h2", "a", "s", StreamType::Http), "v", "", 1).expect("ok");
        assert!(r.heartbeat("h1", 3, 1, "cfg1", None));
        assert!(!r.heartbeat("nope", 0, -1, "", None));
        let v = r.streams();
        assert_eq!((v[0].heartbeats, v[0].last_delay_ms), (1, 3));
        assert_eq!(v[0].delay, Percentiles { p50: 3, p99: 3, max: 3 });
        assert_eq!(v[1].delay.max, -1, "no heartbeat yet");
        assert_eq!(v[1].heartbeats, 0);
        assert_eq!(r.clients()[0].config_version, "cfg1");
        assert!(r.reap(|_| Duration::from_secs(60)).is_empty());
        let reaped = r.reap(|_| Duration::ZERO);
        assert_eq!(reaped.len(), 2);
        assert!(r.clients().is_empty());
    }
}
