//! HTTP/1.1 towards the upstreams as bytes (RFC 9112): the request head the
//! client writes from a tunnelled head, the response head it reads, and the
//! bodies' framings. No I/O here; `pool` drives the sockets.
//!
//! hyper's client cost the client about a third of its instructions per
//! small request (issue 20): a request head turned into a `HeaderMap` and
//! back into bytes, the response's into a `HeaderMap` and back into our
//! block, and a connection task woken twice per request. Here the tunnel's
//! header block is written out line by line and the response's headers
//! become a block straight from the parser's slices.
//!
//! Framing is where a proxy can be made to disagree with its upstream about
//! where a message ends (request smuggling), so it is strict: a request's
//! body is framed by us alone (its Content-Length, checked against what is
//! sent, or chunked), and a response's by RFC 9112 section 6.3 in order:
//! no body for HEAD, 1xx, 204 and 304; Transfer-Encoding ending in chunked;
//! one agreed Content-Length; else until the upstream closes. Any doubt
//! closes the connection instead of reusing it.

use bytes::{Bytes, BytesMut};
use tunnel_lib::proto;

/// Response headers read at most, as hyper's default.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 16 << 10;

/// What is wrong with a head or a body, ours or the upstream's.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum H1Error {
    /// The tunnelled request head cannot be written as HTTP/1.1.
    #[error("invalid {0} in request head")]
    Request(&'static str),
    /// The upstream's response is not valid HTTP/1.1.
    #[error("invalid response from upstream: {0}")]
    Response(&'static str),
    /// The upstream's response head did not fit the read buffer.
    #[error("upstream response head over {0} bytes")]
    HeadTooLarge(usize),
}

/// How the request body we write is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    /// Exactly this many bytes, as the request's Content-Length says.
    Length(u64),
    /// Chunked, with any trailers at its end.
    Chunked,
}

/// A tunnelled request head, as the client received it.
pub struct RequestHead<'a> {
    /// Method, checked to be a token.
    pub method: &'a str,
    /// Origin-form target ("/path?query") or "*".
    pub target: &'a str,
    /// The public host, written as Host when the headers carry none.
    pub authority: &'a str,
    /// Headers as `name:value\n` lines (`frame::headers_to_block`).
    pub block: &'a [u8],
    /// Headers listed one by one (a server that predates blocks).
    pub listed: &'a [proto::Header],
    /// Body frames follow the head.
    pub has_body: bool,
}

/// Appends `head` to `out` as an HTTP/1.1 request head, and says how its
/// body must be framed. Hop-by-hop headers are left out (the server removed
/// them already; a peer's slip must not reach the upstream), and so is any
/// Transfer-Encoding: the framing is ours.
pub fn encode_request(head: &RequestHead<'_>, out: &mut Vec<u8>) -> Result<RequestFraming, H1Error> {
    if head.method.is_empty() || !head.method.bytes().all(is_tchar) {
        return Err(H1Error::Request("method"));
    }
    let target = head.target.as_bytes();
    let origin = target.first() == Some(&b'/') || target == b"*";
    if !origin || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err(H1Error::Request("path"));
    }
    out.reserve(head.method.len() + target.len() + head.block.len() + head.block.len() / 8 + 64);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut length: Option<u64> = None;
    let mut host = false;
    let mut write = |name: &[u8], value: &[u8]| -> Result<(), H1Error> {
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return Err(H1Error::Request("header name"));
        }
        if !value.iter().copied().all(is_value_byte) {
            return Err(H1Error::Request("header value"));
        }
        match Field::of(name) {
            Field::Other => {}
            // The one TE value that goes end to end (gRPC relies on it).
            Field::Te if value.eq_ignore_ascii_case(b"trailers") => {}
            Field::ContentLength => {
                let n = parse_length(value).ok_or(H1Error::Request("content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(H1Error::Request("content-length"));
                }
                length = Some(n);
                // Written once below, as one number: upstreams refuse a
                // repeated or listed Content-Length (RFC 9110 8.6 allows
                // them to).
                return Ok(());
            }
            Field::Host => host = true,
            _ => return Ok(()),
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
        Ok(())
    };
    for line in BlockLines(head.block) {
        let (name, value) = line?;
        write(name, value)?;
    }
    for h in head.listed {
        write(h.name.as_bytes(), &h.value)?;
    }
    if !host {
        let authority = head.authority.as_bytes();
        if authority.is_empty() || !authority.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
            return Err(H1Error::Request("authority"));
        }
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = match (head.has_body, length) {
        (false, None | Some(0)) => RequestFraming::Empty,
        // The upstream would wait for bytes that never come, then read the
        // next request on this connection as them.
        (false, Some(_)) => return Err(H1Error::Request("content-length (no body follows)")),
        (true, Some(n)) => RequestFraming::Length(n),
        (true, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            RequestFraming::Chunked
        }
    };
    out.extend_from_slice(b"\r\n");
    Ok(framing)
}

/// The lines of a header block, split into name and value.
struct BlockLines<'a>(&'a [u8]);

impl<'a> Iterator for BlockLines<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), H1Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let bad = Some(Err(H1Error::Request("header block")));
        let Some(end) = memchr::memchr(b'\n', self.0) else {
            self.0 = &[];
            return bad;
        };
        let line = &self.0[..end];
        self.0 = &self.0[end + 1..];
        match memchr::memchr(b':', line) {
            Some(colon) => Some(Ok((&line[..colon], &line[colon + 1..]))),
            None => bad,
        }
    }
}

/// The body that follows a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// None (HEAD, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Everything until the upstream closes the connection.
    Close,
}

/// A final response head, read.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// The end-to-end headers as `name:value\n` lines, names lowercased.
    pub block: Bytes,
    /// How its body is framed.
    pub framing: BodyFraming,
    /// The connection may carry another request once the body has ended.
    pub keep_alive: bool,
}

/// What the buffer's start holds.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) response of this many bytes, to skip: the final
    /// response follows.
    Interim(usize),
    /// A final response head of this many bytes.
    Final(ResponseHead, usize),
}

/// Reads a response head from the start of `buf`; `head_request` when the
/// request was HEAD (its response has no body whatever it says).
pub fn parse_response(buf: &[u8], head_request: bool) -> Result<Parsed, H1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Err(H1Error::Response("more than 100 headers")),
        Err(_) => return Err(H1Error::Response("malformed head")),
    };
    let status = resp.code.unwrap_or(0);
    let http11 = resp.version == Some(1);
    match status {
        0..=99 => return Err(H1Error::Response("status code below 100")),
        // 101 is answered only to an Upgrade, which takes hyper's path.
        101 => return Err(H1Error::Response("101 Switching Protocols to a request that did not ask")),
        100..=199 => return Ok(Parsed::Interim(used)),
        _ => {}
    }
    // The names `Connection` lists are hop-by-hop too; nearly every
    // response names at most `keep-alive` or `close`.
    let (mut says_close, mut says_keep_alive) = (false, false);
    // Allocates only for a response whose Connection names a field.
    let mut listed: Vec<&[u8]> = Vec::new();
    let mut transfer: Option<&[u8]> = None;
    let mut length: Option<u64> = None;
    let mut lengths_differ = false;
    let mut fields = [Field::Other; MAX_HEADERS];
    for (h, field) in resp.headers.iter().zip(fields.iter_mut()) {
        *field = Field::of(h.name.as_bytes());
        match *field {
            Field::Connection => {
                for token in h.value.split(|&b| b == b',').map(trim) {
                    if token.eq_ignore_ascii_case(b"close") {
                        says_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        says_keep_alive = true;
                    } else if !token.is_empty() {
                        listed.push(token);
                    }
                }
            }
            // Several fields are one list; the last coding decides.
            Field::TransferEncoding => transfer = Some(h.value),
            Field::ContentLength => match parse_length(h.value) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                Some(_) => lengths_differ = true,
                None => return Err(H1Error::Response("Content-Length")),
            },
            _ => {}
        }
    }
    let close = says_close || (!http11 && !says_keep_alive);
    let no_body = head_request || status == 204 || status == 304;
    let (framing, keep_alive) = if no_body {
        (BodyFraming::Empty, !close)
    } else if let Some(te) = transfer {
        let last = te.rsplit(|&b| b == b',').map(trim).next().unwrap_or_default();
        // A Content-Length beside it is ignored and the connection not
        // reused (RFC 9112 6.3 item 3).
        // Nor after HTTP/1.0 with Transfer-Encoding: faulty framing (RFC 9112 6.1).
        if last.eq_ignore_ascii_case(b"chunked") {
            (BodyFraming::Chunked, !close && length.is_none() && http11)
        } else {
            (BodyFraming::Close, false)
        }
    } else if lengths_differ {
        return Err(H1Error::Response("conflicting Content-Length values"));
    } else if let Some(n) = length {
        (BodyFraming::Length(n), !close)
    } else {
        (BodyFraming::Close, false)
    };
    // httparse has checked the names (tokens) and values (no CR, LF or
    // other controls but tab); the server checks them again as it builds
    // its response.
    let mut block = Vec::with_capacity(used);
    for (h, field) in resp.headers.iter().zip(fields) {
        let name = h.name.as_bytes();
        match field {
            Field::Other | Field::Host => {}
            // What framed the body here must not frame it again downstream.
            Field::ContentLength if transfer.is_none() => {}
            Field::Te if h.value.eq_ignore_ascii_case(b"trailers") => {}
            _ => continue,
        }
        if !listed.is_empty() && listed.iter().any(|l| l.eq_ignore_ascii_case(name)) {
            continue;
        }
        let at = block.len();
        block.extend_from_slice(name);
        block[at..].make_ascii_lowercase();
        block.push(b':');
        block.extend_from_slice(trim(h.value));
        block.push(b'\n');
    }
    Ok(Parsed::Final(ResponseHead { status, block: block.into(), framing, keep_alive }, used))
}

/// A body's bytes, decoded from what the connection read.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The body has ended, with these trailers (`name:value\n` lines).
    End(Bytes),
    /// More bytes must be read first.
    NeedMore,
}

/// Takes a response body out of the bytes read, whatever its framing.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes remain of a Content-Length body.
    Length(u64),
    /// Until the connection closes.
    Close,
    /// A chunk-size line comes next.
    ChunkSize,
    /// This many bytes remain of the current chunk.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// The trailer section, after the last chunk.
    Trailers,
    Done,
}

impl BodyDecoder {
    /// A decoder for a body framed as `framing`.
    pub fn new(framing: BodyFraming) -> Self {
        let state = match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::ChunkSize,
            BodyFraming::Close => State::Close,
        };
        BodyDecoder { state }
    }

    /// The body has been read to its end.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of the body from `buf`, at most `max` bytes of data.
    pub fn decode(&mut self, buf: &mut BytesMut, max: usize) -> Result<Decoded, H1Error> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End(Bytes::new())),
                State::Length(n) => {
                    return Ok(match take_counted(buf, max, n) {
                        None => Decoded::NeedMore,
                        Some((data, left)) => {
                            self.state = if left == 0 { State::Done } else { State::Length(left) };
                            Decoded::Data(data)
                        }
                    });
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = buf.len().min(max);
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::ChunkSize => {
                    let Some(lf) = memchr::memchr(b'\n', buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(H1Error::Response("chunk size line too long"));
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&buf[..lf])?;
                    let _ = buf.split_to(lf + 1);
                    self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                }
                State::ChunkData(n) => {
                    return Ok(match take_counted(buf, max, n) {
                        None => Decoded::NeedMore,
                        Some((data, left)) => {
                            self.state = if left == 0 { State::ChunkEnd } else { State::ChunkData(left) };
                            Decoded::Data(data)
                        }
                    });
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Response("chunk not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let mut headers = [httparse::EMPTY_HEADER; 32];
                    match httparse::parse_headers(buf, &mut headers) {
                        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                            return Err(H1Error::Response("trailers too large"))
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                        Ok(httparse::Status::Complete((used, trailers))) => {
                            let mut block = Vec::new();
                            for h in trailers {
                                if !matches!(Field::of(h.name.as_bytes()), Field::Other | Field::Host) {
                                    continue;
                                }
                                block.extend(h.name.bytes().map(|b| b.to_ascii_lowercase()));
                                block.push(b':');
                                block.extend_from_slice(trim(h.value));
                                block.push(b'\n');
                            }
                            let _ = buf.split_to(used);
                            self.state = State::Done;
                            return Ok(Decoded::End(block.into()));
                        }
                        Err(_) => return Err(H1Error::Response("malformed trailers")),
                    }
                }
            }
        }
    }

    /// The connection closed: the end of a close-delimited body, else a
    /// body cut short.
    pub fn on_eof(&mut self) -> Result<(), H1Error> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(H1Error::Response("connection closed before the body's end")),
        }
    }
}

/// Up to `max` of the `n` bytes still due from `buf`, and how many are then
/// left; `None` when `buf` is empty.
fn take_counted(buf: &mut BytesMut, max: usize, n: u64) -> Option<(Bytes, u64)> {
    if buf.is_empty() {
        return None;
    }
    let take = buf.len().min(max).min(usize::try_from(n).unwrap_or(usize::MAX));
    Some((buf.split_to(take).freeze(), n - take as u64))
}

/// The size on a chunk-size line (its LF excluded): hex digits, then
/// optional extensions, which are ignored, then CR.
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let bad = H1Error::Response("chunk size line");
    let line = line.strip_suffix(b"\r").ok_or(bad.clone())?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(bad);
    }
    let rest = &line[digits..];
    let ext = rest.iter().position(|&b| b != b' ' && b != b'\t').map_or(&[][..], |i| &rest[i..]);
    if !ext.is_empty() && (ext[0] != b';' || ext.iter().any(|&b| b == b'\r' || (b < 0x20 && b != b'\t'))) {
        return Err(bad);
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| bad.clone())?;
    u64::from_str_radix(hex, 16).map_err(|_| bad)
}

/// Appends the head of a request body chunk of `len` bytes.
pub fn chunk_head(len: usize, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let _ = write!(out, "{len:x}\r\n");
}

/// The last chunk and its trailers, ending a chunked request body; trailers
/// that are not valid fields or that would frame anything are left out.
pub fn last_chunk(trailers: Option<&http::HeaderMap>) -> Vec<u8> {
    let mut out = b"0\r\n".to_vec();
    for (name, value) in trailers.into_iter().flatten() {
        if matches!(Field::of(name.as_str().as_bytes()), Field::Other | Field::Host) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The fields a proxy treats apart: those that frame a message, Host, and
/// the hop-by-hop ones (RFC 9110 7.6.1, as `frame::strip_hop_by_hop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Other,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    /// TE: hop-by-hop but for `trailers`.
    Te,
    /// Any other hop-by-hop field.
    Hop,
}

impl Field {
    fn of(name: &[u8]) -> Field {
        // By length first: most names are ruled out by it alone.
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        match name.len() {
            2 if is(b"te") => Field::Te,
            4 if is(b"host") => Field::Host,
            7 if is(b"trailer") || is(b"upgrade") => Field::Hop,
            10 if is(b"connection") => Field::Connection,
            10 if is(b"keep-alive") => Field::Hop,
            14 if is(b"content-length") => Field::ContentLength,
            14 if is(b"http2-settings") => Field::Hop,
            16 if is(b"proxy-connection") => Field::Hop,
            17 if is(b"transfer-encoding") => Field::TransferEncoding,
            18 if is(b"proxy-authenticate") => Field::Hop,
            19 if is(b"proxy-authorization") => Field::Hop,
            _ => Field::Other,
        }
    }
}

/// A Content-Length value: digits, or a list of identical ones (RFC 9110 8.6).
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for part in value.split(|&b| b == b',').map(trim) {
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &v[start..end]
}

/// A token character (RFC 9110 5.6.2).
fn is_tchar(b: u8) -> bool {
    const TABLE: [bool; 256] = {
        let mut t = [false; 256];
        let mut i = 0;
        while i < 256 {
            let b = i as u8;
            t[i] = b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                );
            i += 1;
        }
        t
    };
    TABLE[usize::from(b)]
}

/// A byte a field value may hold, as `http::HeaderValue` allows: visible
/// characters, space, tab and obs-text; never CR, LF or NUL.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(block: &str, has_body: bool) -> Result<(String, RequestFraming), H1Error> {
        let head = RequestHead {
            method: "POST",
            target: "/a?b=c",
            authority: "app.example",
            block: block.as_bytes(),
            listed: &[],
            has_body,
        };
        let mut out = Vec::new();
        let framing = encode_request(&head, &mut out)?;
        Ok((String::from_utf8(out).expect("ascii"), framing))
    }

    #[test]
    fn a_request_head_is_written_from_the_block_with_our_framing() {
        let (text, framing) = request("x-forwarded-for:10.0.0.1\naccept:*/*\n", true).expect("valid");
        assert_eq!(
            text,
            "POST /a?b=c HTTP/1.1\r\nx-forwarded-for: 10.0.0.1\r\naccept: */*\r\nhost: app.example\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(framing, RequestFraming::Chunked);
        let (text, framing) =
            request("host:h\ncontent-length:5, 5\ntransfer-encoding:chunked\ncontent-length:5\n", true).expect("valid");
        assert_eq!(text, "POST /a?b=c HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(framing, RequestFraming::Length(5));
        let (text, framing) = request("connection:close\nte:trailers\nte:gzip\nupgrade:x\n", false).expect("valid");
        assert_eq!(text, "POST /a?b=c HTTP/1.1\r\nte: trailers\r\nhost: app.example\r\n\r\n");
        assert_eq!(framing, RequestFraming::Empty);
    }

    #[test]
    fn a_request_head_that_could_split_a_message_is_refused() {
        for (block, body) in [
            ("a:b\r\nx:y\n", false),
            ("a b:c\n", false),
            ("a:b\0\n", false),
            ("content-length:5\n", false),
            ("content-length:5\ncontent-length:6\n", true),
            ("content-length:-1\n", true),
            ("content-length:+5\n", true),
            ("no-colon\n", false),
            ("a:b", false),
        ] {
            assert!(request(block, body).is_err(), "{block:?} accepted");
        }
        let mut out = Vec::new();
        for (method, target) in [("GET", "/a b"), ("GET", "a"), ("GET", "/\r\n"), ("G ET", "/"), ("", "/")] {
            let head = RequestHead { method, target, authority: "h", block: b"", listed: &[], has_body: false };
            assert!(encode_request(&head, &mut out).is_err(), "{method:?} {target:?} accepted");
        }
    }

    fn final_head(text: &str, head_request: bool) -> (ResponseHead, usize) {
        match parse_response(text.as_bytes(), head_request) {
            Ok(Parsed::Final(h, n)) => (h, n),
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let (h, n) = final_head("HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n\r\nok", false);
        assert_eq!((h.status, h.framing, h.keep_alive, n), (200, BodyFraming::Length(2), true, 49));
        assert_eq!(&h.block[..], b"server:x\ncontent-length:2\n");
        let (h, _) = final_head("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", true);
        assert_eq!((h.framing, &h.block[..]), (BodyFraming::Empty, &b"content-length:2\n"[..]));
        let (h, _) = final_head("HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::Empty, true));
        let (h, _) =
            final_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive, &h.block[..]), (BodyFraming::Chunked, false, &b""[..]));
        let (h, _) = final_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::Close, false));
        let (h, _) = final_head("HTTP/1.1 200 OK\r\nX: 1\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::Close, false));
        let (h, _) = final_head("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nConnection: close\r\n\r\n", false);
        assert_eq!(
            (h.framing, h.keep_alive, &h.block[..]),
            (BodyFraming::Length(3), false, &b"content-length:3, 3\n"[..])
        );
        let (h, _) = final_head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!h.keep_alive, "HTTP/1.0 closes unless it says keep-alive");
        let (h, _) = final_head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", false);
        assert!(h.keep_alive);
        let (h, _) =
            final_head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::Chunked, false), "HTTP/1.0 with chunked is not reused");
        let many =
            "HTTP/1.1 200 OK\r\nConnection: a, b, c, d, e, f, g, h, i, j\r\nJ: 1\r\nK: 2\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(&final_head(many, false).0.block[..], b"k:2\ncontent-length:0\n");
        let (h, _) =
            final_head("HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nVary: a\r\nContent-Length: 0\r\n\r\n", false);
        assert_eq!(&h.block[..], b"vary:a\ncontent-length:0\n");
        assert!(matches!(parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1", false), Ok(Parsed::Interim(25))));
        assert!(matches!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le", false), Ok(Parsed::Partial)));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 099 Low\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(parse_response(bad.as_bytes(), false).is_err(), "{bad:?} accepted");
        }
    }

    /// Decodes `wire` fed in pieces of `step` bytes.
    fn decode_all(framing: BodyFraming, wire: &[u8], step: usize, max: usize) -> Result<(Vec<u8>, Bytes), H1Error> {
        let mut dec = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        for _ in 0..wire.len() * 4 + 16 {
            match dec.decode(&mut buf, max)? {
                Decoded::Data(d) => {
                    assert!(!d.is_empty() && d.len() <= max);
                    body.extend_from_slice(&d);
                }
                Decoded::End(trailers) => return Ok((body, trailers)),
                Decoded::NeedMore if fed < wire.len() => {
                    let to = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..to]);
                    fed = to;
                }
                Decoded::NeedMore => {
                    dec.on_eof()?;
                    return Ok((body, Bytes::new()));
                }
            }
        }
        panic!("no end");
    }

    #[test]
    fn chunked_bodies_decode_in_any_pieces() {
        let wire = b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nx-sum: 7\r\nConnection: x\r\n\r\n";
        for step in 1..wire.len() {
            let (body, trailers) = decode_all(BodyFraming::Chunked, wire, step, 4).expect("valid");
            assert_eq!(&body[..], b"hello 0123456789");
            assert_eq!(&trailers[..], b"x-sum:7\n");
        }
        for bad in [
            &b"5\r\nhelloXX0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"z\r\n",
            b"-1\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\n",
        ] {
            assert!(decode_all(BodyFraming::Chunked, bad, 3, 64).is_err(), "{bad:?} accepted");
        }
        assert!(decode_all(BodyFraming::Chunked, b"5\r\nhel", 3, 64).is_err(), "cut short");
        assert!(decode_all(BodyFraming::Length(5), b"hel", 3, 64).is_err(), "cut short");
        assert_eq!(decode_all(BodyFraming::Close, b"until close", 4, 64).expect("valid").0, b"until close");
        assert_eq!(decode_all(BodyFraming::Length(3), b"abcdef", 6, 64).expect("valid").0, b"abc");
    }

    #[test]
    fn a_chunked_request_body_ends_with_its_trailers() {
        let mut out = Vec::new();
        chunk_head(300, &mut out);
        assert_eq!(out, b"12c\r\n");
        let mut t = http::HeaderMap::new();
        t.insert("x-sum", http::HeaderValue::from_static("9"));
        t.insert("transfer-encoding", http::HeaderValue::from_static("chunked"));
        assert_eq!(last_chunk(Some(&t)), b"0\r\nx-sum: 9\r\n\r\n");
        assert_eq!(last_chunk(None), b"0\r\n\r\n");
    }
}
