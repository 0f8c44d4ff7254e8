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
        let mut inner = self.lock();
        inner.seq += 1;
        let event = Event {
            seq: inner.seq,
            unix_ms: now_ms(),
            kind: kind as i32,
            client_id: about.client_id.to_string(),
            group: about.group.to_string(),
            stream_id: about.stream_id.to_string(),
            detail: detail.into(),
        };
        if inner.ring.len() == EVENTS {
            inner.ring.pop_front();
        }
        inner.ring.push_back(event);
    }

    /// Notes that `client_id` connected; true if it had connected before.
    pub fn seen_before(&self, client_id: &str) -> bool {
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
    }
}
