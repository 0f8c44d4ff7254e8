//! What the console knows about the servers it watches: each server's state
//! built from its Watch updates, the fleet of them, and the derived facts the
//! views show (ages, health, sync).

use std::collections::{BTreeMap, VecDeque};
use tunnel_lib::introspection::{
    ClientInfo, Event, GroupInfo, LinkInfo, LinkOptionState, RequestInfo, ServerInfo, StreamInfo, WatchUpdate,
};
use tunnel_lib::proto::{LinkCounters, LinkOptions};

/// Recent requests the console keeps.
pub const MAX_REQUESTS: usize = 500;
/// Events the console keeps (the server keeps 1000).
pub const MAX_EVENTS: usize = 1000;

/// The server's state as the console last heard it.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub server: Option<ServerInfo>,
    pub clients: BTreeMap<String, ClientInfo>,
    pub streams: BTreeMap<String, StreamInfo>,
    /// Oldest first.
    pub requests: VecDeque<RequestInfo>,
    /// Server clock minus ours at the last update, ms: ages use the server's clock.
    pub clock_offset_ms: i64,
    /// Traffic over time, per subject.
    pub traffic: crate::traffic::Traffic,
    /// What happened to clients, streams and config, oldest first.
    pub events: VecDeque<Event>,
}

/// The link to one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Live,
    /// Lost or unreachable, with the reason; the network task keeps retrying.
    Lost(String),
}

/// One watched server: where it is, how its link stands, what it last said.
#[derive(Debug, Clone)]
pub struct Watched {
    /// The address as given on the command line.
    pub addr: String,
    /// How the link stands now.
    pub conn: ConnState,
    /// What the server last said (kept while the link is down).
    pub model: Model,
}

impl Watched {
    /// A server at `addr` not heard from yet.
    pub fn new(addr: impl Into<String>) -> Self {
        Watched { addr: addr.into(), conn: ConnState::Connecting, model: Model::default() }
    }

    /// Whether its link is up; when not, its rows are from before.
    pub fn is_up(&self) -> bool {
        self.conn == ConnState::Live
    }

    /// The server's own id, once a snapshot has said it.
    pub fn server_id(&self) -> Option<&str> {
        self.model.server.as_ref().map(|s| s.server_id.as_str()).filter(|id| !id.is_empty())
    }
}

/// Every server the console watches, in the order given; rows are told apart
/// by their server's index here, since the same client (and in principle the
/// same id) appears once per server.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// In the order given on the command line; a row's server is its index here.
    pub servers: Vec<Watched>,
}

impl Fleet {
    /// Servers at `addrs`, none heard from yet.
    pub fn new<S: Into<String>>(addrs: impl IntoIterator<Item = S>) -> Self {
        Fleet { servers: addrs.into_iter().map(Watched::new).collect() }
    }

    /// More than one server: the views add a SERVER column and the header counts servers.
    pub fn is_fleet(&self) -> bool {
        self.servers.len() > 1
    }

    /// How many links are up.
    pub fn up(&self) -> usize {
        self.servers.iter().filter(|w| w.is_up()).count()
    }

    /// The server at index `i`.
    pub fn get(&self, i: usize) -> Option<&Watched> {
        self.servers.get(i)
    }

    /// What the SERVER column shows for server `i`: its server_id, or its
    /// address until the first snapshot (and when another server claims the
    /// same id, so that two servers never read as one).
    pub fn label(&self, i: usize) -> &str {
        let Some(w) = self.servers.get(i) else { return "?" };
        match w.server_id() {
            Some(id) if self.servers.iter().enumerate().all(|(j, o)| j == i || o.server_id() != Some(id)) => id,
            _ => &w.addr,
        }
    }
}

/// How a heartbeat age compares with its group's interval and timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within the interval (plus slack).
    Fresh,
    /// Overdue, but not near the timeout.
    Late,
    /// Past two thirds of the timeout: about to be reaped.
    Critical,
}

impl Model {
    /// Applies one update received at local time `local_ms`.
    pub fn apply(&mut self, u: WatchUpdate, local_ms: i64) {
        if u.full {
            self.clients.clear();
            self.streams.clear();
            // The snapshot carries the server's whole rings again: kept, a
            // reconnection would list every request and event twice.
            self.requests.clear();
            self.events.clear();
        }
        if let Some(s) = u.server {
            self.clock_offset_ms = s.now_unix_ms - local_ms;
            self.server = Some(s);
        }
        for c in u.clients {
            self.clients.insert(c.client_id.clone(), c);
        }
        for id in &u.removed_clients {
            self.clients.remove(id);
        }
        for s in u.streams {
            self.streams.insert(s.stream_id.clone(), s);
        }
        for id in &u.removed_streams {
            self.streams.remove(id);
        }
        for r in u.requests {
            if self.requests.len() == MAX_REQUESTS {
                self.requests.pop_front();
            }
            self.requests.push_back(r);
        }
        self.traffic.apply(u.full, u.traffic, u.traffic_head_unix_ms);
        for e in u.events {
            if self.events.len() == MAX_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(e);
        }
    }

    /// The server's clock now, given ours.
    pub fn server_now(&self, local_ms: i64) -> i64 {
        local_ms + self.clock_offset_ms
    }

    /// The group's settings.
    pub fn group(&self, name: &str) -> Option<&GroupInfo> {
        self.server.as_ref()?.groups.iter().find(|g| g.name == name)
    }

    /// Milliseconds since the stream's last heartbeat.
    pub fn heartbeat_age_ms(&self, s: &StreamInfo, local_ms: i64) -> i64 {
        (self.server_now(local_ms) - s.last_heartbeat_unix_ms).max(0)
    }

    /// Whether the stream's heartbeat is fresh, late or about to be reaped.
    pub fn freshness(&self, s: &StreamInfo, local_ms: i64) -> Freshness {
        let age = self.heartbeat_age_ms(s, local_ms) as u64;
        let Some(g) = self.group(&s.group) else { return Freshness::Fresh };
        // Slack: a heartbeat is "fresh" until a quarter interval past due.
        if age <= g.heartbeat_interval_ms + g.heartbeat_interval_ms / 4 {
            Freshness::Fresh
        } else if age < g.heartbeat_timeout_ms * 2 / 3 {
            Freshness::Late
        } else {
            Freshness::Critical
        }
    }

    /// The client's acknowledged and current config versions, if known.
    pub fn config_of(&self, client_id: &str) -> Option<(&str, &str)> {
        let c = self.clients.get(client_id)?;
        Some((c.config_version_acked.as_str(), c.config_version_current.as_str()))
    }
}

/// "1h02m", "3m05s", "4.2s", "850ms": short, for narrow columns.
pub fn short_duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 60_000 {
        format!("{}s", ms / 1000)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else if ms < 86_400_000 {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    } else {
        format!("{}d{:02}h", ms / 86_400_000, (ms / 3_600_000) % 24)
    }
}

/// An age in whole seconds ("0s", "42s", "3m05s"), so it changes once a second on screen.
pub fn short_age(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 60_000 {
        format!("{}s", ms / 1000)
    } else {
        short_duration(ms)
    }
}

/// "1.5 MiB", "312 B": short byte counts.
pub fn short_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The first 8 characters of an id, as the tables show it.
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// How a client's link stands: whether both ends lowered their TCP timers
/// (a lost heartbeat then costs milliseconds, not 200), for the LINK cell.
pub fn link_state(server: Option<&LinkOptions>, client: Option<&LinkOptions>) -> &'static str {
    let timers = |o: &LinkOptions| o.rto_min_us > 0 && o.delack_max_us > 0;
    match (server.map(timers), client.map(timers)) {
        (None, _) => "-",
        (Some(true), Some(true)) => "tuned",
        (Some(true), _) => "server only",
        (Some(false), Some(true)) => "client only",
        (Some(false), _) => "untuned",
    }
}

/// The server's link tuning in a few words (`short`: "link tuned", for the
/// header), and whether it is a warning (configured options this kernel
/// lacks); None from a server too old to say.
pub fn link_tuning_summary(states: &[LinkOptionState], short: bool) -> Option<(String, bool)> {
    if states.is_empty() {
        return None;
    }
    let lacking: Vec<&str> = states.iter().filter(|o| o.state == "unsupported").map(|o| o.option.as_str()).collect();
    if !lacking.is_empty() {
        return Some((format!("link: kernel lacks {}", lacking.join(", ")), true));
    }
    let applied: Vec<String> =
        states.iter().filter(|o| o.state == "applied").map(|o| format!("{} {}", o.option, o.value)).collect();
    let timers = states.iter().any(|o| o.option == "rto_min" && o.state == "applied");
    Some(if short {
        (if timers { "link tuned" } else { "link: kernel's timers" }.into(), false)
    } else if applied.is_empty() {
        ("link: kernel's timers".into(), false)
    } else {
        (format!("link: {}", applied.join(", ")), false)
    })
}

/// "rto_min 20ms, delack_max 8ms, notsent_lowat 128KiB", or "the kernel's
/// own", and which configured options the kernel lacked.
pub fn link_options_text(o: &LinkOptions) -> String {
    let mut parts = Vec::new();
    if o.rto_min_us > 0 {
        parts.push(format!("rto_min {}", short_duration(i64::from(o.rto_min_us / 1000))));
    }
    if o.delack_max_us > 0 {
        parts.push(format!("delack_max {}", short_duration(i64::from(o.delack_max_us / 1000))));
    }
    if o.notsent_lowat > 0 {
        parts.push(format!("notsent_lowat {}KiB", o.notsent_lowat >> 10));
    }
    if o.thin_timeouts {
        parts.push("thin_timeouts".into());
    }
    let mut text = if parts.is_empty() { "the kernel's own".to_string() } else { parts.join(", ") };
    if !o.unsupported.is_empty() {
        text.push_str(&format!(" (this kernel lacks {})", o.unsupported.join(", ")));
    }
    text
}

/// The share of bytes resent in one direction of a link; None before any
/// were sent.
pub fn resent_share(c: &LinkCounters) -> Option<f64> {
    (c.bytes_sent > 0).then(|| c.bytes_retrans as f64 / c.bytes_sent as f64)
}

/// The worse of a link's two directions (the server's sending, and the
/// client's as its heartbeats say): loss either way delays heartbeats.
pub fn link_loss(link: &LinkInfo) -> Option<f64> {
    [link.server.as_ref(), link.client.as_ref()].into_iter().flatten().filter_map(resent_share).reduce(f64::max)
}

/// "1.25%", "0%", or "-" with nothing sent.
pub fn share_text(share: Option<f64>) -> String {
    match share.map(|s| s * 100.0) {
        None => "-".into(),
        Some(0.0) => "0%".into(),
        Some(p) if p < 10.0 => format!("{p:.2}%"),
        Some(p) => format!("{p:.0}%"),
    }
}

/// "rtt 41.2ms, resent 12 segments (0.06% of 9.4 MiB)": one direction of a link.
pub fn link_counts(c: &LinkCounters) -> String {
    format!(
        "rtt {:.1}ms, resent {} segments ({} of {})",
        f64::from(c.rtt_us) / 1000.0,
        c.retransmits,
        share_text(resent_share(c)),
        short_bytes(c.bytes_sent)
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn link_state_says_which_ends_lowered_their_timers() {
        let tuned = LinkOptions { rto_min_us: 20_000, delack_max_us: 8_000, ..Default::default() };
        let kernel = LinkOptions::default();
        assert_eq!(link_state(Some(&tuned), Some(&tuned)), "tuned");
        assert_eq!(link_state(Some(&tuned), Some(&kernel)), "server only");
        assert_eq!(link_state(Some(&tuned), None), "server only");
        assert_eq!(link_state(Some(&kernel), Some(&tuned)), "client only");
        assert_eq!(link_state(Some(&kernel), Some(&kernel)), "untuned");
        assert_eq!(link_state(None, Some(&tuned)), "-");
        let lacking =
            LinkOptions { notsent_lowat: 128 << 10, unsupported: vec!["rto_min".into()], ..Default::default() };
        assert_eq!(link_options_text(&lacking), "notsent_lowat 128KiB (this kernel lacks rto_min)");
        assert_eq!(link_options_text(&tuned), "rto_min 20ms, delack_max 8ms");
        assert_eq!(link_options_text(&kernel), "the kernel's own");
        let counts = |sent, resent| LinkCounters { bytes_sent: sent, bytes_retrans: resent, ..Default::default() };
        assert_eq!(share_text(resent_share(&counts(0, 0))), "-");
        assert_eq!(share_text(resent_share(&counts(10, 0))), "0%");
        assert_eq!(share_text(resent_share(&counts(10_000, 125))), "1.25%");
        assert_eq!(share_text(resent_share(&counts(100, 30))), "30%");
        // The worse direction decides; an older client sends no counts.
        let link =
            LinkInfo { server: Some(counts(10_000, 10)), client: Some(counts(10_000, 300)), ..Default::default() };
        assert_eq!(share_text(link_loss(&link)), "3.00%");
        let old = LinkInfo { server: Some(counts(10_000, 10)), client: None, ..Default::default() };
        assert_eq!(share_text(link_loss(&old)), "0.10%");
    }

    use super::*;

    fn stream(id: &str, last_hb: i64) -> StreamInfo {
        StreamInfo { stream_id: id.into(), group: "g".into(), last_heartbeat_unix_ms: last_hb, ..Default::default() }
    }

    fn server(now: i64) -> ServerInfo {
        ServerInfo {
            now_unix_ms: now,
            groups: vec![GroupInfo {
                name: "g".into(),
                heartbeat_interval_ms: 1000,
                heartbeat_timeout_ms: 3000,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Deltas add, replace and remove; a full update starts over.
    #[test]
    fn updates_apply_as_deltas() {
        let mut m = Model::default();
        m.apply(
            WatchUpdate {
                full: true,
                server: Some(server(1000)),
                streams: vec![stream("a", 0), stream("b", 0)],
                ..Default::default()
            },
            1000,
        );
        assert_eq!(m.streams.len(), 2);
        m.apply(
            WatchUpdate { streams: vec![stream("c", 0)], removed_streams: vec!["a".into()], ..Default::default() },
            1000,
        );
        assert_eq!(m.streams.keys().collect::<Vec<_>>(), ["b", "c"]);
        m.apply(WatchUpdate { full: true, streams: vec![stream("z", 0)], ..Default::default() }, 1000);
        assert_eq!(m.streams.keys().collect::<Vec<_>>(), ["z"]);
    }

    /// Ages use the server's clock; freshness follows interval and timeout.
    #[test]
    fn ages_and_freshness() {
        let mut m = Model::default();
        // Our clock is 5 s behind the server's.
        m.apply(WatchUpdate { full: true, server: Some(server(10_000)), ..Default::default() }, 5_000);
        let s = stream("a", 9_500);
        assert_eq!(m.heartbeat_age_ms(&s, 5_000), 500);
        assert_eq!(m.freshness(&s, 5_000), Freshness::Fresh);
        assert_eq!(m.freshness(&s, 6_000), Freshness::Late);
        assert_eq!(m.freshness(&s, 7_000), Freshness::Critical);
    }

    /// A server is named by its id once it has said it; the address before,
    /// and when two servers claim one id.
    #[test]
    fn fleet_labels() {
        let mut f = Fleet::new(["a:1", "b:2", "c:3"]);
        assert!(f.is_fleet());
        assert_eq!(f.label(0), "a:1");
        let named = |id: &str| WatchUpdate {
            full: true,
            server: Some(ServerInfo { server_id: id.into(), ..Default::default() }),
            ..Default::default()
        };
        f.servers[0].model.apply(named("edge-1"), 0);
        f.servers[0].conn = ConnState::Live;
        assert_eq!((f.label(0), f.up()), ("edge-1", 1));
        f.servers[1].model.apply(named("edge-1"), 0);
        assert_eq!((f.label(0), f.label(1)), ("a:1", "b:2"));
        assert_eq!(f.label(7), "?");
        assert!(!Fleet::new(["a:1"]).is_fleet());
    }

    #[test]
    fn short_formats() {
        assert_eq!(short_duration(850), "850ms");
        assert_eq!(short_duration(4_200), "4.2s");
        assert_eq!(short_duration(185_000), "3m05s");
        assert_eq!(short_duration(3_720_000), "1h02m");
        assert_eq!(short_age(999), "0s");
        assert_eq!(short_age(42_500), "42s");
        assert_eq!(short_bytes(312), "312 B");
        assert_eq!(short_bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(short_id("0123456789"), "01234567");
        assert_eq!(short_id("abc"), "abc");
    }
}
