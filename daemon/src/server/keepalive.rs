//! The public connections' own clocks: how long a request head may take from
//! its first byte (`header_read_timeout`) and how long a connection may sit
//! idle between requests (`keepalive_timeout`).
//!
//! hyper 1.x runs one timer for both (its header timer also starts when a
//! keep-alive connection goes idle), so a short head deadline would also be
//! a short keep-alive. Operators expect nginx's split: slowloris heads cut
//! after seconds, idle browsers kept for a minute. hyper's own timer is
//! turned off; these clocks are the only ones.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// No head is being read.
const NONE: u64 = u64::MAX;

/// What one public connection is doing, as its reads and its requests tell.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Requests whose response has not finished.
    in_service: AtomicU32,
    /// Milliseconds since `start` when the last response finished.
    idle_since: AtomicU64,
    /// Milliseconds since `start` of the first byte read while idle: the
    /// start of the next request head.
    head_since: AtomicU64,
    /// A request has been served: the first-request deadline is over.
    served: AtomicBool,
    /// HTTP/2: reads carry pings and window updates, not heads.
    multiplexed: AtomicBool,
}

/// What the connection's watchdog should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is late; look again at this instant.
    CheckAt(Instant),
    /// No request yet, or a head that started arriving, within `header_read_timeout`.
    HeadTimedOut,
    /// No request for `keepalive_timeout` since the last response.
    Idle,
}

impl Activity {
    /// A connection accepted at `start`.
    pub fn new(start: Instant) -> Arc<Self> {
        Arc::new(Activity {
            start,
            in_service: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            served: AtomicBool::new(false),
            multiplexed: AtomicBool::new(false),
        })
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Bytes arrived from the peer.
    pub fn on_read(&self) {
        if self.in_service.load(Ordering::Relaxed) == 0 && self.head_since.load(Ordering::Relaxed) == NONE {
            let now = self.ms(Instant::now());
            let _ = self.head_since.compare_exchange(NONE, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// A request head arrived; the returned guard marks its response finished when dropped.
    pub fn request_started(self: &Arc<Self>, http2: bool) -> InService {
        self.in_service.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(NONE, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        if http2 {
            self.multiplexed.store(true, Ordering::Relaxed);
        }
        InService(self.clone())
    }

    /// Judges the connection at `now`.
    pub fn verdict(&self, now: Instant, header_read: Duration, keepalive: Duration) -> Verdict {
        if !self.served.load(Ordering::Relaxed) {
            // A connection that never completes a first request, however it
            // trickles, gets header_read_timeout from its accept.
            let deadline = self.start + header_read;
            return if now >= deadline { Verdict::HeadTimedOut } else { Verdict::CheckAt(deadline) };
        }
        if self.in_service.load(Ordering::Acquire) > 0 {
            // No deadline can fall before this: both clocks start once the
            // last response finishes.
            return Verdict::CheckAt(now + header_read.min(keepalive));
        }
        let head = self.head_since.load(Ordering::Relaxed);
        if head != NONE && !self.multiplexed.load(Ordering::Relaxed) {
            let deadline = self.at(head) + header_read;
            return if now >= deadline { Verdict::HeadTimedOut } else { Verdict::CheckAt(deadline) };
        }
        let deadline = self.at(self.idle_since.load(Ordering::Relaxed)) + keepalive;
        if now >= deadline {
            return Verdict::Idle;
        }
        if self.multiplexed.load(Ordering::Relaxed) {
            return Verdict::CheckAt(deadline);
        }
        // A head may start at any moment without waking us: its deadline
        // is at least header_read away.
        Verdict::CheckAt(deadline.min(now + header_read))
    }
}

/// A request being served; dropped when its response has been written (or abandoned).
#[derive(Debug)]
pub struct InService(Arc<Activity>);

impl Drop for InService {
    fn drop(&mut self) {
        let a = &self.0;
        // Set before the count reaches zero, so a watchdog that sees zero
        // never reads the previous idle start.
        a.idle_since.store(a.ms(Instant::now()), Ordering::Relaxed);
        a.in_service.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that keeps its request counted until hyper drops it.
pub struct Counted<B> {
    body: B,
    _in_service: InService,
}

impl<B> Counted<B> {
    /// Ties `body` to the request it answers.
    pub fn new(body: B, in_service: InService) -> Self {
        Counted { body, _in_service: in_service }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: Duration = Duration::from_secs(1);
    const IDLE: Duration = Duration::from_secs(5);

    /// Before the first request only the head deadline counts; after a
    /// response the idle clock runs, and the first byte of a new head
    /// switches to the (shorter) head clock.
    #[tokio::test(start_paused = true)]
    async fn head_and_idle_clocks() {
        let t0 = Instant::now();
        let a = Activity::new(t0);
        assert_eq!(a.verdict(t0, HEAD, IDLE), Verdict::CheckAt(t0 + HEAD));
        assert_eq!(a.verdict(t0 + HEAD, HEAD, IDLE), Verdict::HeadTimedOut);

        let a = Activity::new(t0);
        let req = a.request_started(false);
        tokio::time::advance(Duration::from_secs(3)).await;
        // A long response: nothing is late while it is in service.
        assert!(matches!(a.verdict(Instant::now(), HEAD, IDLE), Verdict::CheckAt(_)));
        drop(req);
        let done = Instant::now();
        let later = done + Duration::from_secs(2);
        assert_eq!(
            a.verdict(later, HEAD, IDLE),
            Verdict::CheckAt(later + HEAD),
            "looks again as often as a head could end"
        );
        assert_eq!(a.verdict(done + IDLE - HEAD / 2, HEAD, IDLE), Verdict::CheckAt(done + IDLE));
        assert_eq!(a.verdict(done + IDLE, HEAD, IDLE), Verdict::Idle);

        tokio::time::advance(Duration::from_secs(2)).await;
        a.on_read();
        let head = Instant::now();
        assert_eq!(a.verdict(head, HEAD, IDLE), Verdict::CheckAt(head + HEAD));
        assert_eq!(a.verdict(head + HEAD, HEAD, IDLE), Verdict::HeadTimedOut);
        let _next = a.request_started(false);
        assert!(matches!(a.verdict(head + HEAD, HEAD, IDLE), Verdict::CheckAt(_)));
    }

    /// On HTTP/2, frames read while idle (pings) start no head clock.
    #[tokio::test(start_paused = true)]
    async fn http2_reads_do_not_start_a_head() {
        let t0 = Instant::now();
        let a = Activity::new(t0);
        drop(a.request_started(true));
        a.on_read();
        let now = Instant::now();
        assert_eq!(a.verdict(now + HEAD, HEAD, IDLE), Verdict::CheckAt(now + IDLE));
        assert_eq!(a.verdict(now + IDLE, HEAD, IDLE), Verdict::Idle);
    }
}
