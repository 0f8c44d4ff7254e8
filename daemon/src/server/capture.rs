//! What the console's request inspector shows of a public request beyond
//! its log record: its heads as received and as answered, its timings, and
//! with its rule's `capture_bodies` the first bytes of its bodies. Kept with
//! the record in the recent-request ring (the last 256), and for requests
//! with bodies in a ring of their own bounded by `capture_limit` bytes.
//!
//! The heads are kept as the blocks the tunnel already carries them in
//! (`name:value\n` lines): one copy of the request's, a reference to the
//! response's. Secrets are masked when a head leaves the server
//! (introspection), never in what is kept: a replay needs them.

use crate::tunnel::body::{Tap, TapBudget};
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tunnel_lib::introspection::{Capture, Header, RequestHead, RequestInfo};

/// A public request as recorded: its log record and what the inspector shows.
pub struct Recorded {
    /// Shared with the access log's queue, which needs nothing else.
    pub info: Arc<RequestInfo>,
    /// None for a head hyper refused before any of our code saw it.
    pub head: Option<Head>,
}

/// A request's heads, timings and kept bodies.
#[derive(Clone)]
pub struct Head {
    started: Instant,
    pub scheme: &'static str,
    pub method: http::Method,
    /// Path and query as received.
    pub uri: String,
    /// The authority the request was routed by (HTTP/2's :authority, an
    /// absolute URI's) when its Host header does not say it; None when it
    /// does (the usual case: nothing to copy) or before routing.
    pub authority: Option<String>,
    pub version: http::Version,
    /// The request's headers as received, as a header block.
    pub request: Bytes,
    /// The response's headers as the client sent them; empty when the
    /// tunnel answered itself.
    pub response: Bytes,
    pub timings: Timings,
    /// Taps on the request and response bodies, with `capture_bodies`.
    pub bodies: Option<(Tap, Tap)>,
}

/// Microseconds from arrival (0: not reached).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub routed_us: i64,
    pub sent_us: i64,
    pub response_us: i64,
    pub end_us: i64,
}

impl Head {
    /// The head of `req` as it arrived at `started`.
    pub fn of<B>(req: &http::Request<B>, scheme: &'static str, started: Instant) -> Head {
        Head {
            started,
            scheme,
            method: req.method().clone(),
            uri: req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string(),
            authority: None,
            version: req.version(),
            request: tunnel_lib::frame::headers_to_block(req.headers()),
            response: Bytes::new(),
            timings: Timings::default(),
            bodies: None,
        }
    }

    fn since(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX)
    }

    /// A rule was chosen (never 0 µs: 0 says it was not).
    pub fn routed(&mut self) {
        self.timings.routed_us = self.since().max(1);
    }

    /// The head was queued for the client.
    pub fn sent(&mut self) {
        self.timings.sent_us = self.since();
    }

    /// The response head came back with `headers` (a header block).
    pub fn answered(&mut self, headers: Bytes) {
        self.timings.response_us = self.since();
        self.response = headers;
    }

    /// The exchange ended.
    pub fn ended(&mut self) {
        self.timings.end_us = self.since();
    }

    /// Bytes held for the bodies.
    pub fn body_bytes(&self) -> usize {
        self.bodies.as_ref().map_or(0, |(q, r)| q.kept_len() + r.kept_len())
    }

    /// The head as introspection sends it, secrets masked.
    pub fn to_proto(&self, secrets: &[&str]) -> RequestHead {
        RequestHead {
            scheme: self.scheme.to_string(),
            uri: self.uri.clone(),
            version: format!("{:?}", self.version),
            request_headers: headers(&self.request, secrets),
            response_headers: headers(&self.response, secrets),
            routed_us: self.timings.routed_us,
            sent_us: self.timings.sent_us,
            response_us: self.timings.response_us,
            end_us: self.timings.end_us,
            bodies: self.bodies.is_some(),
        }
    }
}

impl Recorded {
    /// The log record, with the head when `with_head`.
    pub fn info(&self, with_head: bool, secrets: &[&str]) -> RequestInfo {
        let mut info = RequestInfo::clone(&self.info);
        if with_head {
            info.head = self.head.as_ref().map(|h| h.to_proto(secrets));
        }
        info
    }

    /// Everything the inspector shows of it.
    pub fn capture(&self, secrets: &[&str]) -> Capture {
        let mut c = Capture { request: Some(self.info(true, secrets)), ..Default::default() };
        if let Some((req, resp)) = self.head.as_ref().and_then(|h| h.bodies.as_ref()) {
            (c.request_body, c.request_body_size) = req.kept();
            (c.response_body, c.response_body_size) = resp.kept();
        }
        c
    }
}

/// A group token shorter than this is not looked for in values: it would
/// mask ordinary words (a token of "t" is in every "text/plain").
const MIN_SECRET: usize = 8;

/// Header names whose values are secrets wherever they appear (compared
/// without case: a response's block is the upstream's spelling).
const SECRET_NAMES: [&str; 6] =
    ["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token"];

/// The lines of a header block as introspection messages, in order; the
/// values of secret names, and any value holding one of `secrets` (the
/// group tokens, when at least `MIN_SECRET` long), masked.
pub fn headers(block: &[u8], secrets: &[&str]) -> Vec<Header> {
    block
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let name = String::from_utf8_lossy(&line[..colon]).into_owned();
            let value = String::from_utf8_lossy(&line[colon + 1..]).into_owned();
            let secret = SECRET_NAMES.iter().any(|s| s.eq_ignore_ascii_case(&name))
                || secrets.iter().any(|s| s.len() >= MIN_SECRET && value.contains(s));
            Some(if secret {
                Header { value: mask(&name, &value), name, masked: true }
            } else {
                Header { name, value, masked: false }
            })
        })
        .collect()
}

/// "Bearer ••• (masked, 40 bytes)": the scheme of an Authorization value
/// stays (it tells Basic from Bearer), the rest goes.
fn mask(name: &str, value: &str) -> String {
    let auth = name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("proxy-authorization");
    let scheme =
        if auth { value.split_once(' ').map(|(s, _)| format!("{s} ")).unwrap_or_default() } else { String::new() };
    format!("{scheme}••• (masked, {} bytes)", value.len())
}

/// The requests whose bodies are kept, newest last, in at most `limit` bytes.
#[derive(Default)]
pub struct Captures {
    // std Mutex: held for a push or a search, never across an await.
    inner: Mutex<Ring>,
    /// Body bytes every tap holds, kept or in flight.
    budget: TapBudget,
}

#[derive(Default)]
struct Ring {
    records: VecDeque<(Arc<Recorded>, usize)>,
    bytes: usize,
}

impl Captures {
    /// Taps for a request's bodies, each keeping at most `each` bytes, all
    /// of them together at most `limit`.
    pub fn taps(&self, each: u64, limit: u64) -> (Tap, Tap) {
        let each = usize::try_from(each).unwrap_or(usize::MAX);
        let most = usize::try_from(limit).unwrap_or(usize::MAX);
        (Tap::new(each, self.budget.clone(), most), Tap::new(each, self.budget.clone(), most))
    }

    /// Keeps `r` (a request with bodies), dropping the oldest past `limit`
    /// bytes: theirs and what the taps of requests still in flight hold.
    /// A dropped record's bodies are let go at once, even while the
    /// recent-request ring still lists it, so the newest always have room.
    pub fn keep(&self, r: Arc<Recorded>, limit: u64) {
        let size = r.head.as_ref().map_or(0, |h| h.body_bytes() + h.request.len() + h.response.len() + h.uri.len());
        let mut ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        ring.bytes += size;
        ring.records.push_back((r, size));
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        while ring.records.len() > 1 && (ring.bytes > limit || self.budget.held() > limit) {
            let Some((old, n)) = ring.records.pop_front() else { break };
            ring.bytes -= n;
            if let Some((q, r)) = old.head.as_ref().and_then(|h| h.bodies.as_ref()) {
                q.release();
                r.release();
            }
        }
    }

    /// The kept request with `request_id`.
    pub fn find(&self, request_id: &str) -> Option<Arc<Recorded>> {
        let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        ring.records.iter().rev().find(|(r, _)| r.info.request_id == request_id).map(|(r, _)| r.clone())
    }

    /// Requests and bytes kept, and body bytes held by every tap alive.
    pub fn usage(&self) -> (usize, usize, usize) {
        let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (ring.records.len(), ring.bytes, self.budget.held())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Secrets are masked by name and by value; everything else stays, in order.
    #[test]
    fn masking() {
        let block =
            b"host:a.example.com\nauthorization:Bearer abc.def\ncookie:sid=1\nx-token:a-tok-123456\nx-a:1\nx-a:2\nSet-Cookie:s=2\n";
        // A short token ("x") is not looked for: "x" is in too many values.
        let h = headers(block, &["tok-123456", "x"]);
        let names: Vec<&str> = h.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["host", "authorization", "cookie", "x-token", "x-a", "x-a", "Set-Cookie"]);
        assert!(h[6].masked, "names in any case");
        assert_eq!(h[0].value, "a.example.com");
        assert!(!h[0].masked);
        assert_eq!(h[1].value, "Bearer ••• (masked, 14 bytes)");
        assert!(h[1].masked && h[2].masked && h[3].masked);
        assert!(!h[2].value.contains("sid") && !h[3].value.contains("tok-123456"));
        assert_eq!((h[4].value.as_str(), h[5].value.as_str()), ("1", "2"));
    }

    fn recorded(c: &Captures, id: &str, body: usize) -> Arc<Recorded> {
        let req = http::Request::builder().uri("/x?y=1").header("a", "b").body(()).expect("request");
        let mut head = Head::of(&req, "http", Instant::now());
        let (q, r) = c.taps(body as u64, 1 << 20);
        q.take(&vec![b'q'; body]);
        r.take(&vec![b'r'; body * 2]);
        head.bodies = Some((q, r));
        let info = Arc::new(RequestInfo { request_id: id.into(), ..Default::default() });
        Arc::new(Recorded { info, head: Some(head) })
    }

    /// The ring keeps the newest within its bytes; a capture says what was cut.
    #[test]
    fn ring_is_bounded_in_bytes() {
        let c = Captures::default();
        for i in 0..10 {
            c.keep(recorded(&c, &format!("r{i}"), 1000), 5000);
        }
        let (n, bytes, held) = c.usage();
        assert!(bytes <= 5000 && n == 2, "{n} requests, {bytes} bytes");
        // The dropped ones' bodies were let go though the test still holds them.
        assert_eq!(held, 4000);
        assert!(c.find("r0").is_none());
        let got = c.find("r9").expect("newest kept").capture(&[]);
        assert_eq!((got.request_body.len(), got.request_body_size), (1000, 1000));
        assert_eq!((got.response_body.len(), got.response_body_size), (1000, 2000));
        let head = got.request.and_then(|r| r.head).expect("head");
        assert_eq!((head.uri.as_str(), head.bodies), ("/x?y=1", true));
        assert_eq!(head.request_headers[0].name, "a");
    }

    /// Taps together hold no more than the limit, in flight or kept.
    #[test]
    fn taps_share_the_limit() {
        let c = Captures::default();
        let (a, b) = c.taps(1000, 1500);
        a.take(&[1; 1000]);
        b.take(&[2; 1000]);
        assert_eq!((a.kept().0.len(), b.kept().0.len()), (1000, 500));
        assert_eq!(b.kept().1, 1000, "the whole length is still counted");
        drop(a);
        let (c2, _) = c.taps(1000, 1500);
        c2.take(&[3; 1000]);
        assert_eq!(c2.kept().0.len(), 1000, "a's bytes went back when it went");
    }
}
