//! The record of public requests: totals, and a bounded ring of the most
//! recent ones for the console.

use super::capture::Recorded;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tunnel_lib::introspection::RequestInfo;

/// Requests kept for the console.
pub const RECENT_REQUESTS: usize = 256;

/// Totals and the recent-request ring.
#[derive(Default)]
pub struct RequestLog {
    // std Mutex: held for a push or a copy, never across an await.
    // Shared with the access log's queue: a record is made once.
    ring: Mutex<VecDeque<Arc<Recorded>>>,
    seq: AtomicU64,
    errors: AtomicU64,
}

impl RequestLog {
    /// Records a finished request; assigns its sequence number.
    pub fn record(&self, mut info: RequestInfo, head: Option<super::capture::Head>) -> Arc<Recorded> {
        if is_error(&info) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        info.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        if ring.len() == RECENT_REQUESTS {
            ring.pop_front();
        }
        let rec = Arc::new(Recorded { info: Arc::new(info), head });
        ring.push_back(rec.clone());
        rec
    }

    /// The records of requests recorded after sequence number `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<RequestInfo> {
        self.recorded_since(seq).iter().map(|r| RequestInfo::clone(&r.info)).collect()
    }

    /// Requests recorded after sequence number `seq`, with their heads, oldest first.
    pub fn recorded_since(&self, seq: u64) -> Vec<Arc<Recorded>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().filter(|r| r.info.seq > seq).cloned().collect()
    }

    /// The recent request with `request_id`.
    pub fn find(&self, request_id: &str) -> Option<Arc<Recorded>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().rev().find(|r| r.info.request_id == request_id).cloned()
    }

    /// Requests recorded since start.
    pub fn total(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Of them, answered with a 5xx or cut short.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// Whether a request counts as an error: answered with a 5xx, or cut short
/// after its head (a 4xx the tunnel answered itself, such as no route or a
/// body over max_body, is a 4xx, not an error). The header's count, the
/// traffic series and the metrics' classes agree on it.
pub fn is_error(info: &RequestInfo) -> bool {
    info.status >= 500 || (info.status < 400 && !info.error.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring keeps the newest requests, and `since` returns only new ones.
    #[test]
    fn ring_is_bounded_and_incremental() {
        let log = RequestLog::default();
        for i in 0..(RECENT_REQUESTS + 10) {
            let _ = log.record(RequestInfo { status: if i % 2 == 0 { 200 } else { 502 }, ..Default::default() }, None);
        }
        assert_eq!(log.total(), (RECENT_REQUESTS + 10) as u64);
        assert_eq!(log.errors(), (RECENT_REQUESTS / 2 + 5) as u64);
        let all = log.since(0);
        assert_eq!(all.len(), RECENT_REQUESTS);
        assert_eq!(all[0].seq, 11);
        assert_eq!(log.since(log.total() - 2).len(), 2);
    }
}
