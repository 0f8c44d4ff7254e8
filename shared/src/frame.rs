//! Frame rules of the protocol, free of I/O so they can be tested alone:
//! per-exchange credit accounting, the order of an exchange's frames, and
//! conversion of HTTP heads to and from their protobuf form.

use crate::proto::{self, tunnel_message::Payload, TunnelMessage};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Largest body chunk in one frame.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Least credit a body frame consumes, so that the frames a receiver buffers
/// per exchange are bounded in number as well as in bytes.
pub const MIN_FRAME_COST: u32 = 1024;
/// Default credit per exchange and direction: 1 MiB measured 1.04 GB/s for
/// one download on loopback where 256 KiB gave 0.6 GB/s (docs/benchmarks.md).
pub const DEFAULT_EXCHANGE_WINDOW: u32 = 1024 * 1024;
/// Smallest window, the floor an exchange keeps when its public connection's
/// shared budget is spent: 32 KiB lets 256 stalled exchanges of one
/// connection hold 8 MiB, not 256 MiB.
pub const MIN_EXCHANGE_WINDOW: u32 = 32 * 1024;
/// Largest window a peer may grant.
pub const MAX_EXCHANGE_WINDOW: u32 = 16 * 1024 * 1024;

/// Largest chunk a sender may put in one frame under `window` (0 = default).
/// The receiver grants credit back a quarter of the window at a time, so a
/// sender whose frames were all read holds more than three quarters of it:
/// a chunk of at most half the window always fits, and no sender waits
/// forever for credit it can never get.
pub fn max_chunk(window: u32) -> usize {
    let window = if window == 0 { DEFAULT_EXCHANGE_WINDOW } else { window };
    MAX_CHUNK.min(window as usize / 2)
}

/// Credit a body chunk of `len` bytes consumes.
pub fn frame_cost(len: usize) -> u32 {
    (len as u32).max(MIN_FRAME_COST)
}

/// Capacity of a per-exchange body buffer that a peer keeping to `window`
/// can never overflow: every chunk costs at least MIN_FRAME_COST, plus room
/// for the final frame.
pub fn body_buffer_capacity(window: u32) -> usize {
    (window / MIN_FRAME_COST) as usize + 2
}

/// A broken protocol rule, for one exchange or one message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message has no payload")]
    NoPayload,
    #[error("{0} frame before the exchange's head")]
    BeforeHead(&'static str),
    #[error("second head for the exchange")]
    DuplicateHead,
    #[error("{0} frame after the exchange's body ended")]
    AfterEnd(&'static str),
    #[error("peer sent {cost} bytes of body with {available} bytes of credit")]
    CreditExceeded { cost: u32, available: u32 },
    #[error("peer granted credit past the {MAX_EXCHANGE_WINDOW} byte maximum")]
    CreditOverflow,
    #[error("empty body chunk")]
    EmptyChunk,
    #[error("body chunk of {0} bytes exceeds {MAX_CHUNK}")]
    ChunkTooLarge(usize),
    #[error("invalid header {0:?}")]
    BadHeader(String),
    #[error("invalid {0}")]
    BadHead(&'static str),
}

/// The receiving side's view of one direction of an exchange's credit.
#[derive(Debug, Clone)]
pub struct RecvWindow {
    /// Credit the peer still holds.
    available: u32,
    /// Bytes consumed by our reader and not yet granted back.
    pending: u32,
    threshold: u32,
}

impl RecvWindow {
    /// A window of `window` bytes, granted back a quarter at a time.
    pub fn new(window: u32) -> Self {
        RecvWindow { available: window, pending: 0, threshold: (window / 4).max(1) }
    }

    /// Accounts a chunk that arrived; an error if the peer overran its credit.
    pub fn on_chunk(&mut self, len: usize) -> Result<(), FrameError> {
        if len == 0 {
            return Err(FrameError::EmptyChunk);
        }
        if len > MAX_CHUNK {
            return Err(FrameError::ChunkTooLarge(len));
        }
        let cost = frame_cost(len);
        if cost > self.available {
            return Err(FrameError::CreditExceeded { cost, available: self.available });
        }
        self.available -= cost;
        Ok(())
    }

    /// Accounts a chunk our reader consumed; returns credit to grant back once
    /// enough has built up (batched, so small chunks do not each cost a frame).
    pub fn on_consumed(&mut self, len: usize) -> Option<u32> {
        self.pending += frame_cost(len);
        if self.pending >= self.threshold {
            let grant = std::mem::take(&mut self.pending);
            self.available += grant;
            Some(grant)
        } else {
            None
        }
    }
}

/// Where one direction of an exchange is: the order its frames must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    AwaitHead,
    Body,
    Ended,
}

/// Kinds of frames, for [`Phase::advance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// HttpRequest or HttpResponse; `ends` when it carries end_of_stream.
    Head {
        ends: bool,
    },
    Body,
    End,
}

impl FrameKind {
    fn name(self) -> &'static str {
        match self {
            FrameKind::Head { .. } => "head",
            FrameKind::Body => "body",
            FrameKind::End => "end",
        }
    }
}

impl Phase {
    /// The phase after a frame of `kind`, or why the frame is out of order.
    pub fn advance(self, kind: FrameKind) -> Result<Phase, FrameError> {
        match (self, kind) {
            (Phase::AwaitHead, FrameKind::Head { ends: true }) => Ok(Phase::Ended),
            (Phase::AwaitHead, FrameKind::Head { ends: false }) => Ok(Phase::Body),
            (Phase::AwaitHead, k) => Err(FrameError::BeforeHead(k.name())),
            (Phase::Body, FrameKind::Head { .. }) => Err(FrameError::DuplicateHead),
            (Phase::Body, FrameKind::Body) => Ok(Phase::Body),
            (Phase::Body, FrameKind::End) => Ok(Phase::Ended),
            (Phase::Ended, k) => Err(FrameError::AfterEnd(k.name())),
        }
    }
}

/// Headers a proxy must not forward (RFC 9110 7.6.1), plus those named in
/// `Connection`. `TE: trailers` is kept: it is the one TE value HTTP/2
/// allows, and gRPC servers rely on it to know the client takes trailers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    use http::header;
    // Nearly every head has none, and most of the rest only `Connection`
    // (nginx's `keep-alive`): one pass over the names finds those present,
    // and only those, with the names `Connection` lists, are removed
    // (a lookup of each of the ten, each parsing and hashing a name, was
    // 6% of the client's instructions per small request).
    let mut present: Vec<HeaderName> = headers.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    if present.is_empty() {
        return;
    }
    present.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
    );
    // `TE: trailers` survives even when `Connection` lists TE, as RFC 9110
    // asks a sender of TE to do: gRPC needs it end to end.
    let te_trailers = headers.get_all(header::TE).iter().any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in present {
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Headers `strip_hop_by_hop` removes whatever `Connection` says.
const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// The same, for names `http` has no constant for; `http2-settings` is the
/// h2c upgrade's settings, meaningful on one connection only.
const HOP_BY_HOP_EXTRA: [&str; 3] = ["keep-alive", "proxy-connection", "http2-settings"];

/// A name `strip_hop_by_hop` removes whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || HOP_BY_HOP_EXTRA.contains(&name.as_str())
}

/// Headers to their protobuf form, in order, repeated names kept.
pub fn headers_to_proto(headers: &HeaderMap) -> Vec<proto::Header> {
    headers
        .iter()
        .map(|(n, v)| proto::Header {
            name: n.as_str().to_string(),
            value: bytes::Bytes::copy_from_slice(v.as_bytes()),
        })
        .collect()
}

/// Headers from their protobuf form; a peer's invalid name or value is an error.
pub fn headers_from_proto(headers: Vec<proto::Header>) -> Result<HeaderMap, FrameError> {
    let mut map = HeaderMap::try_with_capacity(headers.len()).map_err(|_| TOO_MANY)?;
    append_listed(&mut map, headers)?;
    Ok(map)
}

fn append_listed(map: &mut HeaderMap, headers: Vec<proto::Header>) -> Result<(), FrameError> {
    for h in headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| FrameError::BadHeader(h.name.clone()))?;
        let value = HeaderValue::from_maybe_shared(h.value).map_err(|_| FrameError::BadHeader(h.name))?;
        map.try_append(name, value).map_err(|_| TOO_MANY)?;
    }
    Ok(())
}

/// More headers than a `HeaderMap` holds (its `append` would panic): a
/// peer's message is refused instead.
const TOO_MANY: FrameError = FrameError::BadHead("number of headers");

/// Headers as one block of `name:value\n` lines, in order, repeated names
/// kept: one protobuf field for a whole head instead of a message per
/// header (decoding those was a sixth of the server's instructions per
/// small request). A valid name holds neither ':' nor '\n' and a valid
/// value no '\n', so the block needs no escaping.
pub fn headers_to_block(headers: &HeaderMap) -> bytes::Bytes {
    let len = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 2).sum();
    let mut block = Vec::with_capacity(len);
    for (n, v) in headers {
        block.extend_from_slice(n.as_str().as_bytes());
        block.push(b':');
        block.extend_from_slice(v.as_bytes());
        block.push(b'\n');
    }
    block.into()
}

/// Headers from a block `headers_to_block` wrote; a peer's invalid name,
/// value or line is an error. The values are slices of one copy of the
/// block: a head kept for a long exchange holds its own bytes, not the
/// link's read buffer it arrived in.
pub fn headers_from_block(block: &[u8]) -> Result<HeaderMap, FrameError> {
    let block = bytes::Bytes::copy_from_slice(block);
    let mut map = HeaderMap::try_with_capacity(memchr::memchr_iter(b'\n', &block).count()).map_err(|_| TOO_MANY)?;
    let mut at = 0;
    while at < block.len() {
        let line = &block[at..];
        let end = memchr::memchr(b'\n', line).ok_or(FrameError::BadHead("header block"))?;
        let colon = memchr::memchr(b':', &line[..end]).ok_or(FrameError::BadHead("header block"))?;
        let raw = &line[..colon];
        let name = match known_name(raw) {
            Some(n) => n,
            None => HeaderName::from_bytes(raw)
                .map_err(|_| FrameError::BadHeader(String::from_utf8_lossy(raw).into_owned()))?,
        };
        let value = HeaderValue::from_maybe_shared(block.slice(at + colon + 1..at + end))
            .map_err(|_| FrameError::BadHeader(name.as_str().to_string()))?;
        map.try_append(name, value).map_err(|_| TOO_MANY)?;
        at += end + 1;
    }
    Ok(map)
}

/// A block's lines as protobuf headers, for a peer that predates blocks;
/// a line without a colon is left out (blocks we write have none).
pub fn block_to_proto(block: &[u8]) -> Vec<proto::Header> {
    block
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let colon = memchr::memchr(b':', line)?;
            Some(proto::Header {
                name: String::from_utf8_lossy(&line[..colon]).into_owned(),
                value: bytes::Bytes::copy_from_slice(&line[colon + 1..]),
            })
        })
        .collect()
}

/// Names every tunnelled request carries that `http` has no constant for:
/// taken from here they cost no allocation per request.
fn known_name(raw: &[u8]) -> Option<HeaderName> {
    const KNOWN: [HeaderName; 3] = [
        HeaderName::from_static("x-forwarded-for"),
        HeaderName::from_static("x-forwarded-proto"),
        HeaderName::from_static("x-forwarded-host"),
    ];
    if !raw.starts_with(b"x-forwarded-") {
        return None;
    }
    KNOWN.into_iter().find(|n| n.as_str().as_bytes() == raw)
}

/// A head's headers from whichever form its sender used: the block first,
/// then any listed one by one.
pub fn head_headers(block: &[u8], listed: Vec<proto::Header>) -> Result<HeaderMap, FrameError> {
    if block.is_empty() {
        return headers_from_proto(listed);
    }
    let mut map = headers_from_block(block)?;
    append_listed(&mut map, listed)?;
    Ok(map)
}

/// Unix time now, milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Builds an envelope for one exchange frame.
pub fn message(client_id: &str, request_id: &str, direction: proto::Direction, payload: Payload) -> TunnelMessage {
    TunnelMessage {
        client_id: client_id.to_string(),
        request_id: request_id.to_string(),
        direction: direction as i32,
        payload: Some(payload),
        trace_id: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer can send exactly its window, no more; consumption grants credit back in batches.
    #[test]
    fn credit_is_enforced_and_returned_in_batches() {
        let mut w = RecvWindow::new(4 * MAX_CHUNK as u32);
        for _ in 0..4 {
            w.on_chunk(MAX_CHUNK).expect("within credit");
        }
        assert!(matches!(w.on_chunk(1), Err(FrameError::CreditExceeded { .. })));
        assert_eq!(w.on_consumed(MAX_CHUNK), Some(MAX_CHUNK as u32), "quarter reached");
        w.on_chunk(MAX_CHUNK).expect("credit granted back");
        // Small chunks cost the minimum and are granted back only once a quarter builds up.
        let mut w = RecvWindow::new(MIN_EXCHANGE_WINDOW);
        let per_quarter = (MIN_EXCHANGE_WINDOW / 4 / MIN_FRAME_COST) as usize;
        for i in 1..=per_quarter {
            w.on_chunk(10).expect("within credit");
            let grant = w.on_consumed(10);
            assert_eq!(grant.is_some(), i == per_quarter);
        }
        assert_eq!(w.on_chunk(0), Err(FrameError::EmptyChunk));
        assert_eq!(w.on_chunk(MAX_CHUNK + 1), Err(FrameError::ChunkTooLarge(MAX_CHUNK + 1)));
    }

    /// At every window a sender may be given, a sender whose frames were all
    /// read can send its largest chunk: it never waits for credit that the
    /// receiver holds back below its grant threshold.
    #[test]
    fn largest_chunk_always_fits_what_a_sender_can_hold() {
        for window in [MIN_EXCHANGE_WINDOW, 48 << 10, 100_000, 128 << 10, DEFAULT_EXCHANGE_WINDOW, MAX_EXCHANGE_WINDOW]
        {
            let chunk = max_chunk(window);
            assert!(chunk > 0 && chunk <= MAX_CHUNK);
            let mut w = RecvWindow::new(window);
            let mut held = window;
            // Worst case: everything sent was read, and the ungranted rest is
            // just under the threshold.
            let mut sent = 0;
            while held >= frame_cost(chunk) && sent < 1000 {
                w.on_chunk(chunk).expect("within credit");
                held -= frame_cost(chunk);
                if let Some(g) = w.on_consumed(chunk) {
                    held += g;
                }
                sent += 1;
            }
            assert_eq!(sent, 1000, "window {window}: a sender with {held} bytes of credit is stuck");
        }
        assert_eq!(max_chunk(0), MAX_CHUNK);
        assert_eq!(max_chunk(MIN_EXCHANGE_WINDOW), 16 << 10);
    }

    /// The buffer capacity covers every frame a well-behaved peer can have outstanding.
    #[test]
    fn buffer_capacity_covers_the_window() {
        let window = DEFAULT_EXCHANGE_WINDOW;
        let mut w = RecvWindow::new(window);
        let mut frames = 0;
        while w.on_chunk(1).is_ok() {
            frames += 1;
        }
        assert!(frames < body_buffer_capacity(window));
    }

    /// Frames must come head, body*, end; anything else is an error.
    #[test]
    fn frame_order() {
        use FrameKind::*;
        let p = Phase::AwaitHead;
        assert_eq!(p.advance(Body), Err(FrameError::BeforeHead("body")));
        assert_eq!(p.advance(End), Err(FrameError::BeforeHead("end")));
        assert_eq!(p.advance(Head { ends: true }), Ok(Phase::Ended));
        let p = p.advance(Head { ends: false }).expect("head first");
        assert_eq!(p.advance(Head { ends: false }), Err(FrameError::DuplicateHead));
        let p = p.advance(Body).and_then(|p| p.advance(End)).expect("body then end");
        assert_eq!(p.advance(Body), Err(FrameError::AfterEnd("body")));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers", "gRPC's te: trailers passes");
        h.insert("connection", HeaderValue::from_static("te"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers", "also when Connection lists it");
        assert!(!h.contains_key("connection"));
    }

    #[test]
    fn headers_round_trip_with_binary_values() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.append("x-bin", HeaderValue::from_bytes(b"caf\xc3\xa9").expect("obs-text allowed"));
        let back = headers_from_proto(headers_to_proto(&h)).expect("valid");
        assert_eq!(back, h);
        let bad = vec![proto::Header { name: "bad name".into(), value: bytes::Bytes::new() }];
        assert!(headers_from_proto(bad).is_err());
    }

    #[test]
    fn header_blocks_round_trip_and_refuse_what_a_head_cannot_hold() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2:3"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-fox", HeaderValue::from_static("x"));
        h.append("x-empty", HeaderValue::from_static(""));
        h.append("x-bin", HeaderValue::from_bytes(b"caf\xc3\xa9\tz").expect("obs-text allowed"));
        h.append(http::header::HOST, HeaderValue::from_static("example.com"));
        let block = headers_to_block(&h);
        assert_eq!(headers_from_block(&block).expect("valid"), h);
        let back = headers_from_block(&block).expect("valid");
        let repeated: Vec<_> = back.get_all("x-a").iter().collect();
        assert_eq!(repeated, ["1", "2:3"], "repeats kept in order, a colon in a value kept");
        assert!(headers_from_block(b"").expect("empty").is_empty());
        for bad in [&b"x-a:1"[..], b"no colon\n", b"bad name:1\n", b":1\n", b"x-a:1\rx\n", b"x-a:\x00\n"] {
            assert!(headers_from_block(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // More than a HeaderMap holds is an error, not a panic: 30000 empty
        // lines (100 KiB, well inside a message) and 40000 distinct names.
        assert_eq!(headers_from_block(&b"\n".repeat(30_000)), Err(TOO_MANY));
        let names: String = (0..40_000).map(|i| format!("x-{i}:v\n")).collect();
        assert_eq!(headers_from_block(names.as_bytes()), Err(TOO_MANY));
        let listed = (0..40_000).map(|i| proto::Header { name: format!("x-{i}"), value: bytes::Bytes::new() });
        assert_eq!(headers_from_proto(listed.collect()), Err(TOO_MANY));
        let listed = vec![proto::Header { name: "x-late".into(), value: bytes::Bytes::from_static(b"9") }];
        let both = head_headers(&block, listed).expect("valid");
        assert_eq!(both.len(), 8);
        assert_eq!(both["x-late"], "9");
        let old = head_headers(&[], headers_to_proto(&h)).expect("valid");
        assert_eq!(old, h);
    }
}
