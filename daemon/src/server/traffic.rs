//! Traffic over time: for the server, each group, client and rule, the
//! public requests that ended in each of the last 300 seconds (and, for the
//! server, groups and rules, each of the last 60 minutes), in fixed-size
//! rings. The server keeps them whoever watches, so a console that connects
//! late still sees the last five minutes; Watch sends them (introspection.rs).
//!
//! Memory is bounded: a series exists only once its subject has had traffic
//! and goes when it has had none for its whole window; client series are
//! capped at [`MAX_CLIENT_SERIES`] (a client past the cap is counted in the
//! server's and its group's series, not in one of its own). A client series
//! costs about 13 KiB, one with the hour about 16 KiB.

use foldhash::fast::FixedState;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tunnel_lib::frame::now_ms;
use tunnel_lib::introspection::{TrafficSeries, TrafficSubject};
use tunnel_lib::traffic::{series, Latency, Point, MINUTES, MINUTE_MS, SECONDS, SECOND_MS};

/// Client series kept at most: 2000 is twice the fleet docs/benchmarks.md
/// measures, about 26 MiB when every one of them is busy.
pub const MAX_CLIENT_SERIES: usize = 2000;
/// Group and rule series kept at most (they come from the config, which a
/// reload can change; gone ones age out over the hour).
pub const MAX_NAMED_SERIES: usize = 1000;

/// One request as the series count it.
pub struct Sample<'a> {
    pub group: &'a str,
    pub client: &'a str,
    pub rule: &'a str,
    pub status: u32,
    /// Answered with a 5xx, or a response cut short.
    pub errored: bool,
    /// An upgraded connection (WebSocket...), recorded when it closed: its
    /// duration is the connection's life, not a latency.
    pub upgraded: bool,
    pub took: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// What is being counted for the step in progress.
#[derive(Default)]
struct Acc {
    point: Point,
    latency: Latency,
    /// The step's requests' durations added up, µs.
    busy_us: u64,
}

impl Acc {
    /// Counts `s`; `step_us` is the step's length, the most one request
    /// adds to its mean in flight (a long one ending now was not in flight
    /// for longer than the step it is counted in).
    fn add(&mut self, s: &Sample<'_>, us: u32, step_us: u64) {
        let p = &mut self.point;
        p.requests = p.requests.saturating_add(1);
        if s.errored {
            p.errors = p.errors.saturating_add(1);
        } else if (400..500).contains(&s.status) {
            p.status_4xx = p.status_4xx.saturating_add(1);
        }
        p.bytes_in = p.bytes_in.saturating_add(s.bytes_in);
        p.bytes_out = p.bytes_out.saturating_add(s.bytes_out);
        if !s.upgraded {
            self.latency.add(us);
            self.busy_us = self.busy_us.saturating_add(u64::from(us).min(step_us));
        }
    }

    /// The finished step's point; the accumulator starts over. Requests
    /// in flight are the most of the samples taken and of the mean the
    /// step's own requests make (their durations added up over the step's
    /// length): a sample a second misses short requests at any rate.
    fn close(&mut self, step_us: u64) -> Point {
        let mut p = std::mem::take(&mut self.point);
        let mean = self.busy_us.div_ceil(step_us);
        p.in_flight = p.in_flight.max(u32::try_from(mean).unwrap_or(u32::MAX));
        self.busy_us = 0;
        if !self.latency.is_empty() {
            p.p50_us = self.latency.quantile(0.5);
            p.p99_us = self.latency.quantile(0.99);
        }
        self.latency.clear();
        p
    }
}

/// The per-minute ring and its minute in progress.
#[derive(Default)]
struct Hour {
    minutes: VecDeque<Point>,
    acc: Acc,
    /// The most in flight of the minute's seconds closed so far.
    peak: u32,
}

const SECOND_US: u64 = 1_000_000;
const MINUTE_US: u64 = 60_000_000;

/// One subject's rings. The seconds ring ends with the second before the
/// open one (`Inner::head`), the minutes ring with the minute before the
/// open minute: every subject's rings end at the same time.
#[derive(Default)]
struct Rings {
    seconds: VecDeque<Point>,
    acc: Acc,
    hour: Option<Box<Hour>>,
    /// The last second that had anything in it (unix seconds).
    last_active: i64,
}

impl Rings {
    fn new(with_hour: bool, now: i64) -> Self {
        Rings { hour: with_hour.then(Box::default), last_active: now, ..Default::default() }
    }

    fn add(&mut self, s: &Sample<'_>, us: u32, now: i64) {
        self.acc.add(s, us, SECOND_US);
        if let Some(h) = &mut self.hour {
            h.acc.add(s, us, MINUTE_US);
        }
        self.last_active = now;
    }

    fn in_flight(&mut self, n: u32, now: i64) {
        if n > 0 {
            self.acc.point.in_flight = self.acc.point.in_flight.max(n);
            if let Some(h) = &mut self.hour {
                h.acc.point.in_flight = h.acc.point.in_flight.max(n);
            }
            self.last_active = now;
        }
    }

    /// Closes the open second and pads `gap - 1` empty ones after it; with
    /// `minutes` > 0, closes the open minute and pads `minutes - 1` more.
    fn close(&mut self, gap: i64, minutes: i64) {
        let p = self.acc.close(SECOND_US);
        push(&mut self.seconds, p, gap, SECONDS);
        if let Some(h) = &mut self.hour {
            // The minute's requests were added as they came; its in flight
            // is the most of its seconds'.
            h.peak = h.peak.max(p.in_flight);
            if minutes > 0 {
                let mut m = h.acc.close(MINUTE_US);
                m.in_flight = m.in_flight.max(h.peak);
                h.peak = 0;
                push(&mut h.minutes, m, minutes, MINUTES);
            }
        }
    }

    /// Nothing in it for longer than it remembers.
    fn idle(&self, head: i64) -> bool {
        let window = if self.hour.is_some() { MINUTES as i64 * 60 + 60 } else { SECONDS as i64 + 1 };
        head - self.last_active > window
    }
}

/// Appends `p` and then `steps - 1` zeros, keeping the last `cap`.
fn push(ring: &mut VecDeque<Point>, p: Point, steps: i64, cap: usize) {
    let zeros = usize::try_from(steps - 1).unwrap_or(0).min(cap);
    ring.push_back(p);
    ring.extend(std::iter::repeat_n(Point::default(), zeros));
    while ring.len() > cap {
        ring.pop_front();
    }
}

type Table = HashMap<String, Rings, FixedState>;

struct Inner {
    /// The open second (unix seconds): what is counted now goes there.
    head: i64,
    server: Rings,
    groups: Table,
    clients: Table,
    rules: Table,
}

/// The traffic series of every subject.
pub struct Traffic {
    // std Mutex: held for an add or a copy, never across an await.
    inner: Mutex<Inner>,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic::new(now_ms())
    }
}

/// Applies `f` to a subject's rings, made on first use while there is
/// room; one lookup when they exist (the path every request takes).
fn with_rings(table: &mut Table, name: &str, cap: usize, hour: bool, now: i64, f: impl FnOnce(&mut Rings)) {
    if name.is_empty() {
        return;
    }
    if let Some(r) = table.get_mut(name) {
        f(r);
    } else if table.len() < cap {
        let mut r = Rings::new(hour, now);
        f(&mut r);
        table.insert(name.to_string(), r);
    }
}

impl Inner {
    /// Moves the open second to `now` (unix seconds), closing the seconds
    /// (and minutes) before it. A clock that stepped back changes nothing.
    fn advance(&mut self, now: i64) {
        if now <= self.head {
            return;
        }
        let gap = now - self.head;
        let minutes = now.div_euclid(60) - self.head.div_euclid(60);
        let all = std::iter::once(&mut self.server)
            .chain(self.groups.values_mut())
            .chain(self.clients.values_mut())
            .chain(self.rules.values_mut());
        for r in all {
            r.close(gap, minutes);
        }
        self.head = now;
        for t in [&mut self.groups, &mut self.clients, &mut self.rules] {
            t.retain(|_, r| !r.idle(now));
        }
    }
}

impl Traffic {
    /// Empty series, the open second being the one of `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        let head = now_ms.div_euclid(1000);
        let inner = Inner {
            head,
            server: Rings::new(true, head),
            groups: Table::default(),
            clients: Table::default(),
            rules: Table::default(),
        };
        Traffic { inner: Mutex::new(inner) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request that ended at `end_ms` (unix ms).
    pub fn record(&self, end_ms: i64, s: &Sample<'_>) {
        let now = end_ms.div_euclid(1000);
        let us = u32::try_from(s.took.as_micros()).unwrap_or(u32::MAX);
        let mut inner = self.lock();
        inner.advance(now);
        let inner = &mut *inner;
        inner.server.add(s, us, now);
        with_rings(&mut inner.groups, s.group, MAX_NAMED_SERIES, true, now, |r| r.add(s, us, now));
        with_rings(&mut inner.clients, s.client, MAX_CLIENT_SERIES, false, now, |r| r.add(s, us, now));
        with_rings(&mut inner.rules, s.rule, MAX_NAMED_SERIES, true, now, |r| r.add(s, us, now));
    }

    /// Closes the seconds before `now_ms` and notes the requests in flight
    /// now: the server's total and each group's and client's (rules' are not kept).
    pub fn tick<'a>(
        &self,
        now_ms: i64,
        total: u32,
        groups: impl IntoIterator<Item = (&'a str, u32)>,
        clients: impl IntoIterator<Item = (&'a str, u32)>,
    ) {
        let now = now_ms.div_euclid(1000);
        let mut inner = self.lock();
        inner.advance(now);
        let inner = &mut *inner;
        inner.server.in_flight(total, now);
        for (name, n) in groups.into_iter().filter(|(_, n)| *n > 0) {
            with_rings(&mut inner.groups, name, MAX_NAMED_SERIES, true, now, |r| r.in_flight(n, now));
        }
        for (name, n) in clients.into_iter().filter(|(_, n)| *n > 0) {
            with_rings(&mut inner.clients, name, MAX_CLIENT_SERIES, false, now, |r| r.in_flight(n, now));
        }
    }

    /// The series as Watch sends them, and the open second (unix ms) they
    /// run up to. With `after_ms` None, every subject's whole windows; with
    /// it, the steps that began at or after it (the open second at the last
    /// call), and only subjects with something in them.
    pub fn export(&self, after_ms: Option<i64>) -> (Vec<TrafficSeries>, i64) {
        // The points are copied under the lock (a memcpy) and the messages
        // built after it: a full export of thousands of subjects must not
        // hold up the requests that record into the same lock.
        type Run = (TrafficSubject, String, u32, i64, Vec<Point>);
        let mut runs: Vec<Run> = Vec::new();
        let head = {
            let inner = self.lock();
            let head = inner.head;
            let subjects = std::iter::once((TrafficSubject::Server, "", &inner.server))
                .chain(inner.groups.iter().map(|(n, r)| (TrafficSubject::Group, n.as_str(), r)))
                .chain(inner.clients.iter().map(|(n, r)| (TrafficSubject::Client, n.as_str(), r)))
                .chain(inner.rules.iter().map(|(n, r)| (TrafficSubject::Rule, n.as_str(), r)));
            let mut take = |subject, name: &str, ring: &VecDeque<Point>, step: u32, open: i64| {
                let start = open - ring.len() as i64;
                let from = after_ms.map_or(start, |a| a.div_euclid(i64::from(step)).max(start));
                let skip = usize::try_from(from - start).unwrap_or(0).min(ring.len());
                let pts = ring.range(skip..);
                if after_ms.is_none() || pts.clone().any(|p| !p.is_zero()) {
                    runs.push((subject, name.to_string(), step, from * i64::from(step), pts.copied().collect()));
                }
            };
            for (subject, name, r) in subjects {
                take(subject, name, &r.seconds, SECOND_MS, head);
                if let Some(h) = &r.hour {
                    take(subject, name, &h.minutes, MINUTE_MS, head.div_euclid(60));
                }
            }
            head
        };
        let out = runs
            .iter()
            .map(|(subject, name, step, start, pts)| series(*subject, name, *step, *start, pts.iter()))
            .collect();
        (out, head * 1000)
    }

    /// Subjects with series now (the server, groups, clients, rules).
    pub fn subjects(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.groups.len(), inner.clients.len(), inner.rules.len())
    }
}

/// Closes the series' seconds and samples requests in flight, once a second,
/// until `stop` fires: the series move on when no request comes.
pub async fn run(shared: Arc<super::Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let streams = shared.registry.streams();
        let mut groups: HashMap<&str, u32, FixedState> = HashMap::default();
        let mut clients: HashMap<&str, u32, FixedState> = HashMap::default();
        let mut total = 0u32;
        for s in &streams {
            let n = u32::try_from(s.in_flight).unwrap_or(u32::MAX);
            total = total.saturating_add(n);
            *groups.entry(s.group.as_str()).or_default() += n;
            *clients.entry(s.client_id.as_str()).or_default() += n;
        }
        shared.traffic.tick(now_ms(), total, groups, clients);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_lib::traffic::points;

    fn sample<'a>(client: &'a str, status: u32, ms: u64) -> Sample<'a> {
        Sample {
            group: "g",
            client,
            rule: "*/",
            status,
            errored: status >= 500,
            upgraded: false,
            took: Duration::from_millis(ms),
            bytes_in: 10,
            bytes_out: 100,
        }
    }

    fn find<'a>(v: &'a [TrafficSeries], subject: TrafficSubject, name: &str, step: u32) -> Option<&'a TrafficSeries> {
        v.iter().find(|s| s.subject == subject as i32 && s.name == name && s.step_ms == step)
    }

    /// Requests count in the second they ended; seconds without any are
    /// zeros; the server, the group, the client and the rule each have a series.
    #[test]
    fn counts_per_second() {
        let t = Traffic::new(100_000);
        t.record(100_100, &sample("a", 200, 2));
        t.record(100_900, &sample("a", 404, 4));
        t.record(100_950, &sample("b", 502, 8));
        t.record(102_500, &sample("a", 200, 1));
        t.tick(103_000, 0, [], []);
        let (all, head) = t.export(None);
        assert_eq!(head, 103_000);
        let server = find(&all, TrafficSubject::Server, "", SECOND_MS).expect("server series");
        assert_eq!(server.start_unix_ms, 100_000);
        let p = points(server);
        assert_eq!(p.iter().map(|p| p.requests).collect::<Vec<_>>(), [3, 0, 1]);
        assert_eq!((p[0].status_4xx, p[0].errors, p[0].bytes_in, p[0].bytes_out), (1, 1, 30, 300));
        // p50 of 2, 4, 8 ms is 4 ms; p99 8 ms (within the buckets' 1/16).
        assert!((3750..=4250).contains(&p[0].p50_us), "{}", p[0].p50_us);
        assert!((7500..=8500).contains(&p[0].p99_us), "{}", p[0].p99_us);
        // 14 ms of requests in a second: one in flight on average, rounded up.
        assert_eq!(p[0].in_flight, 1);
        let a = points(find(&all, TrafficSubject::Client, "a", SECOND_MS).expect("client a"));
        assert_eq!(a.iter().map(|p| p.requests).collect::<Vec<_>>(), [2, 0, 1]);
        assert!(find(&all, TrafficSubject::Client, "a", MINUTE_MS).is_none(), "clients keep no hour");
        assert!(find(&all, TrafficSubject::Group, "g", MINUTE_MS).is_some());
        assert!(find(&all, TrafficSubject::Rule, "*/", SECOND_MS).is_some());
    }

    /// Export after a time gives only the steps since, and only subjects
    /// with something in them.
    #[test]
    fn export_is_incremental() {
        let t = Traffic::new(10_000);
        t.record(10_500, &sample("a", 200, 1));
        t.tick(11_000, 0, [], []);
        let (_, head) = t.export(None);
        t.record(11_200, &sample("b", 200, 1));
        t.tick(12_000, 0, [], []);
        let (new, head2) = t.export(Some(head));
        assert_eq!(head2, 12_000);
        let b = find(&new, TrafficSubject::Client, "b", SECOND_MS).expect("b");
        assert_eq!((b.start_unix_ms, b.requests.as_slice()), (11_000, &[1][..]));
        assert!(find(&new, TrafficSubject::Client, "a", SECOND_MS).is_none(), "a had nothing new");
        let (none, _) = t.export(Some(head2));
        assert!(none.is_empty(), "{none:?}");
    }

    /// The windows hold 300 seconds and 60 minutes; a long gap pads zeros;
    /// idle subjects go; in flight is the most seen in the step.
    #[test]
    fn windows_are_bounded() {
        let t = Traffic::new(0);
        t.record(500, &sample("a", 200, 1));
        t.tick(600, 3, [("g", 3)], [("a", 2), ("idle", 0)]);
        t.tick(700, 1, [("g", 1)], [("a", 1)]);
        t.tick(10_000_000, 0, [], []);
        let (all, head) = t.export(None);
        assert_eq!(head, 10_000_000);
        let server = find(&all, TrafficSubject::Server, "", SECOND_MS).expect("server");
        assert_eq!(server.requests.len(), SECONDS);
        assert!(server.requests.iter().all(|&n| n == 0));
        let hour = find(&all, TrafficSubject::Server, "", MINUTE_MS).expect("hour");
        assert_eq!(hour.requests.len(), MINUTES);
        assert_eq!(t.subjects(), (0, 0, 0), "idle subjects are dropped");

        let t = Traffic::new(0);
        t.tick(600, 3, [("g", 3)], [("a", 2), ("idle", 0)]);
        t.tick(700, 1, [("g", 1)], [("a", 1)]);
        t.tick(61_000, 0, [], []);
        let (all, _) = t.export(None);
        let s = points(find(&all, TrafficSubject::Server, "", SECOND_MS).expect("server"));
        assert_eq!(s[0].in_flight, 3);
        let m = points(find(&all, TrafficSubject::Group, "g", MINUTE_MS).expect("group hour"));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].in_flight, 3);

        // Ten requests of 500 ms ending in one second: five in flight on
        // average, though no sample saw any.
        let t = Traffic::new(0);
        for _ in 0..10 {
            t.record(500, &sample("a", 200, 500));
        }
        t.tick(1_000, 0, [], []);
        let (all, _) = t.export(None);
        assert_eq!(points(find(&all, TrafficSubject::Rule, "*/", SECOND_MS).expect("rule"))[0].in_flight, 5);
        assert!(find(&all, TrafficSubject::Client, "idle", SECOND_MS).is_none());
    }

    /// Past the cap, a new client has no series of its own but still counts in the server's.
    #[test]
    fn client_series_are_capped() {
        let t = Traffic::new(0);
        let names: Vec<String> = (0..MAX_CLIENT_SERIES + 5).map(|i| format!("c{i}")).collect();
        for n in &names {
            t.record(100, &sample(n, 200, 1));
        }
        assert_eq!(t.subjects().1, MAX_CLIENT_SERIES);
        t.tick(1_000, 0, [], []);
        let (all, _) = t.export(None);
        let server = find(&all, TrafficSubject::Server, "", SECOND_MS).expect("server");
        assert_eq!(server.requests[0] as usize, names.len());
    }
}
