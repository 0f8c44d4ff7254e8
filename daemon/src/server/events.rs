//! The events ring: what happened to clients, streams and config (client
//! connections and reconnections, reaps, config pushes and acks, reloads,
//! drains, operators' actions from the console), the last [`EVENTS`] of
//! them, for the console's timeline (`Watch`, `tunnel-tui --once --events`).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use tunnel_lib::frame::now_ms;
use tunnel_lib::introspection::{Event, EventKind};

/// Events kept.
pub const EVENTS: usize = 1000;
/// Longest detail kept, and longest id: a client names itself and its
/// reasons, and the ring must stay small whatever it sends.
const MAX_DETAIL: usize = 512;
const MAX_ID: usize = 128;
/// Clients remembered as seen, to tell a reconnection from a first
/// connection; past this many the oldest are forgotten (and would read as new).
const SEEN: usize = 10_000;

#[derive(Default)]
struct Inner {
    ring: VecDeque<Event>,
    seq: u64,
    /// Clients that have connected since start, oldest first.
    seen: VecDeque<String>,
    seen_set: HashSet<String>,
}

/// The ring, and the clients seen so far.
#[derive(Default)]
pub struct Events {
    // std Mutex: held for a push or a copy, never across an await.
    inner: Mutex<Inner>,
}

/// Who an event is about; empty fields where it is not about one.
#[derive(Default, Clone, Copy)]
pub struct About<'a> {
    pub client_id: &'a str,
    pub group: &'a str,
    pub stream_id: &'a str,
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one event, now.
    pub fn record(&self, kind: EventKind, about: About<'_>, detail: impl Into<String>) {
        let event = Event {
            seq: 0,
            unix_ms: now_ms(),
            kind: kind as i32,
            client_id: cut(about.client_id, MAX_ID),
            group: cut(about.group, MAX_ID),
            stream_id: cut(about.stream_id, MAX_ID),
            detail: cut(&detail.into(), MAX_DETAIL),
        };
        let mut inner = self.lock();
        inner.seq += 1;
        let event = Event { seq: inner.seq, ..event };
        if inner.ring.len() == EVENTS {
            inner.ring.pop_front();
        }
        inner.ring.push_back(event);
    }

    /// Notes that `client_id` connected; true if it had connected before.
    pub fn seen_before(&self, client_id: &str) -> bool {
        let client_id = &cut(client_id, MAX_ID);
        let mut inner = self.lock();
        if inner.seen_set.contains(client_id) {
            return true;
        }
        if inner.seen.len() == SEEN {
            if let Some(old) = inner.seen.pop_front() {
                inner.seen_set.remove(&old);
            }
        }
        inner.seen.push_back(client_id.to_string());
        inner.seen_set.insert(client_id.to_string());
        false
    }

    /// Events recorded after sequence number `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<Event> {
        let inner = self.lock();
        inner.ring.iter().filter(|e| e.seq > seq).cloned().collect()
    }
}

/// At most `max` bytes of `s`, cut at a character boundary, "…" marking a cut.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded_and_incremental() {
        let ev = Events::default();
        for i in 0..(EVENTS + 5) {
            ev.record(EventKind::Reaped, About { client_id: "c", ..Default::default() }, format!("#{i}"));
        }
        let all = ev.since(0);
        assert_eq!(all.len(), EVENTS);
        assert_eq!(all[0].detail, "#5");
        assert_eq!(all[0].kind, EventKind::Reaped as i32);
        assert_eq!(ev.since(all[EVENTS - 2].seq).len(), 1);
        assert!(!ev.seen_before("a"));
        assert!(ev.seen_before("a"));
        // What a client sends is cut to size.
        ev.record(
            EventKind::Draining,
            About { client_id: &"c".repeat(10_000), ..Default::default() },
            "é".repeat(5000),
        );
        let last = ev.since(0).pop().expect("event");
        assert!(last.client_id.len() <= MAX_ID + 3 && last.detail.len() <= MAX_DETAIL + 3, "{}", last.detail.len());
    }
}
