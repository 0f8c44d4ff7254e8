//! The request inspector's pure parts: how a body reads (text, pretty JSON,
//! a hex dump), the `curl` line that reproduces a request, the line diff of
//! two heads, and the Requests view's filter terms.

use crate::model::short_bytes;
use tunnel_lib::introspection::{Header, RequestHead, RequestInfo};

/// A kept body as lines: JSON pretty-printed, other UTF-8 text as is,
/// anything else as a hex dump; then a line saying how much was cut.
pub fn body_lines(data: &[u8], total: u64, content_type: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if data.is_empty() {
        out.push(if total == 0 { "(empty)".into() } else { format!("(none kept of {})", short_bytes(total)) });
        return out;
    }
    let jsonish = content_type.is_some_and(|c| c.contains("json")) || matches!(data.first(), Some(b'{' | b'['));
    let parsed = if jsonish && data.len() as u64 == total {
        serde_json::from_slice::<serde_json::Value>(data).ok().and_then(|v| serde_json::to_string_pretty(&v).ok())
    } else {
        None
    };
    match (parsed, std::str::from_utf8(data)) {
        (Some(pretty), _) => out.extend(pretty.lines().map(str::to_string)),
        (None, Ok(text)) if !text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) => {
            out.extend(text.lines().map(str::to_string))
        }
        _ => out.extend(hex_dump(data)),
    }
    if (data.len() as u64) < total {
        out.push(format!("… cut: {} of {} kept", short_bytes(data.len() as u64), short_bytes(total)));
    }
    out
}

/// "00000000  7b 22 61 22 3a 31 7d 0a  ...  |{"a":1}.|": 16 bytes a line.
pub fn hex_dump(data: &[u8]) -> Vec<String> {
    data.chunks(16)
        .enumerate()
        .map(|(i, c)| {
            let hex: Vec<String> = c.iter().map(|b| format!("{b:02x}")).collect();
            let text: String = c.iter().map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '.' }).collect();
            format!("{:08x}  {:<47}  |{text}|", i * 16, hex.join(" "))
        })
        .collect()
}

/// A header's value, by name (the first).
pub fn header<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
}

/// `'it'\''s'`: a word the shell passes through untouched.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The environment variable a masked header's value is left to: "AUTHORIZATION".
fn env_name(header: &str) -> String {
    header.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}

/// A `curl` command that sends the request again to the host it named:
/// method, URL, headers in order (a masked one's value left to an
/// environment variable of its name, `$AUTHORIZATION`), and the body when it
/// was kept whole as text.
pub fn curl(r: &RequestInfo, head: &RequestHead, body: Option<(&[u8], u64)>) -> String {
    let host = header(&head.request_headers, "host").unwrap_or(&r.host);
    // Everything from the request is quoted: a method, a header or a path
    // is whatever a public client sent, and this line is pasted into a shell.
    let mut cmd = format!("curl -X {} {}", quote(&r.method), quote(&format!("{}://{host}{}", head.scheme, head.uri)));
    for h in &head.request_headers {
        // curl sets these itself from the URL and the body.
        if ["host", "content-length", "transfer-encoding", "connection"].contains(&h.name.as_str()) {
            continue;
        }
        if h.masked {
            cmd.push_str(&format!(" -H {}\"${}\"", quote(&format!("{}: ", h.name)), env_name(&h.name)));
        } else {
            cmd.push_str(&format!(" -H {}", quote(&format!("{}: {}", h.name, h.value))));
        }
    }
    match body {
        Some((data, total)) if !data.is_empty() && data.len() as u64 == total => match std::str::from_utf8(data) {
            Ok(text) => cmd.push_str(&format!(" --data-binary {}", quote(text))),
            Err(_) => cmd.push_str(" --data-binary @body.bin  # the body is binary: save it as body.bin"),
        },
        _ if r.bytes_in > 0 => cmd.push_str(&format!("  # its {} body was not kept whole", short_bytes(r.bytes_in))),
        _ => {}
    }
    cmd
}

/// One line of a diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diff {
    Same(String),
    Gone(String),
    New(String),
}

/// The line diff of `old` and `new` (longest common subsequence): heads are
/// a few dozen lines, so the quadratic table is small.
pub fn diff(old: &[String], new: &[String]) -> Vec<Diff> {
    let (n, m) = (old.len(), new.len());
    let mut lcs = vec![vec![0u16; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if old[i] == new[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && old[i] == new[j] {
            out.push(Diff::Same(old[i].clone()));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(Diff::New(new[j].clone()));
            j += 1;
        } else {
            out.push(Diff::Gone(old[i].clone()));
            i += 1;
        }
    }
    out
}

/// A response as diff lines: its status, then its headers, in order.
pub fn response_lines(r: &RequestInfo) -> Vec<String> {
    let mut lines = vec![format!("status: {}", r.status)];
    if let Some(h) = &r.head {
        lines.extend(h.response_headers.iter().map(|h| format!("{}: {}", h.name, h.value)));
    }
    lines
}

/// The Requests view's filter: `status:5xx` (or `status:404`), `host:`,
/// `path:`, `client:`, `slower:250ms` (or `>250ms`); any other word must
/// appear in one of the request's fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFilter {
    pub status: Vec<String>,
    pub host: Vec<String>,
    pub path: Vec<String>,
    pub client: Vec<String>,
    pub slower_ms: Option<u64>,
    pub words: Vec<String>,
}

/// "250ms", "2s", "1.5s", "300" (ms).
fn parse_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(n) = s.strip_suffix("ms") {
        return n.trim().parse().ok();
    }
    if let Some(n) = s.strip_suffix('s') {
        return n.trim().parse::<f64>().ok().map(|v| (v * 1000.0) as u64);
    }
    s.parse().ok()
}

impl RequestFilter {
    /// Parses the filter text; terms that do not parse are words.
    pub fn parse(text: &str) -> Self {
        let mut f = RequestFilter::default();
        for term in text.split_whitespace() {
            let lower = term.to_lowercase();
            let slower = lower.strip_prefix("slower:").or_else(|| lower.strip_prefix('>')).and_then(parse_ms);
            match (lower.split_once(':'), slower) {
                (_, Some(ms)) => f.slower_ms = Some(ms),
                (Some(("status", v)), _) => f.status.push(v.to_string()),
                (Some(("host", v)), _) => f.host.push(v.to_string()),
                (Some(("path", v)), _) => f.path.push(v.to_string()),
                (Some(("client", v)), _) => f.client.push(v.to_string()),
                _ => f.words.push(lower),
            }
        }
        f
    }

    /// Whether `r` passes; `also` are more fields a word may match (its server's name).
    pub fn matches(&self, r: &RequestInfo, also: &[&str]) -> bool {
        let has = |field: &str, want: &str| field.to_lowercase().contains(want);
        let status = r.status.to_string();
        let class = format!("{}xx", r.status / 100);
        self.status.iter().all(|s| *s == status || *s == class)
            && self.host.iter().all(|h| has(&r.host, h))
            && self.path.iter().all(|p| has(&r.path, p) || r.head.as_ref().is_some_and(|h| has(&h.uri, p)))
            && self.client.iter().all(|c| has(&r.client_id, c))
            && self.slower_ms.is_none_or(|ms| r.duration_ms > ms)
            && self.words.iter().all(|w| {
                [
                    &r.method,
                    &r.host,
                    &r.path,
                    &r.client_id,
                    &r.trace_id,
                    &r.error,
                    &r.rule,
                    &status,
                    &r.refused,
                    &r.remote_addr,
                ]
                .iter()
                .any(|f| has(f, w))
                    || also.iter().any(|f| has(f, w))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &str, masked: bool) -> Header {
        Header { name: name.into(), value: value.into(), masked }
    }

    #[test]
    fn bodies_read_as_json_text_or_hex() {
        assert_eq!(
            body_lines(br#"{"a":[1,2]}"#, 11, Some("application/json")),
            ["{", "  \"a\": [", "    1,", "    2", "  ]", "}"]
        );
        assert_eq!(body_lines(b"hello\nworld", 11, Some("text/plain")), ["hello", "world"]);
        let bin = body_lines(&[0, 1, 2, 0xff], 4, None);
        assert_eq!(bin, [format!("00000000  {:<47}  |....|", "00 01 02 ff")]);
        // Cut short: no pretty-printing (the JSON is incomplete), and a line says so.
        let cut = body_lines(br#"{"a":"#, 100, Some("application/json"));
        assert_eq!(cut, ["{\"a\":", "… cut: 5 B of 100 B kept"]);
        assert_eq!(body_lines(b"", 0, None), ["(empty)"]);
    }

    #[test]
    fn curl_reproduces_the_request() {
        let r =
            RequestInfo { method: "POST".into(), host: "app.example.com".into(), bytes_in: 7, ..Default::default() };
        let head = RequestHead {
            scheme: "http".into(),
            uri: "/api/items?x=1".into(),
            request_headers: vec![
                h("host", "127.0.0.1:8080", false),
                h("authorization", "Bearer ••• (masked, 12 bytes)", true),
                h("content-type", "application/json", false),
                h("content-length", "7", false),
                h("x-note", "it's", false),
            ],
            ..Default::default()
        };
        let line = curl(&r, &head, Some((b"{\"a\":1}", 7)));
        assert_eq!(
            line,
            r#"curl -X 'POST' 'http://127.0.0.1:8080/api/items?x=1' -H 'authorization: '"$AUTHORIZATION" -H 'content-type: application/json' -H 'x-note: it'\''s' --data-binary '{"a":1}'"#
        );
        assert!(curl(&r, &head, None).ends_with("# its 7 B body was not kept whole"));
        // A hostile method or header stays one word.
        let evil = RequestInfo { method: "GET`touch${IFS}x`".into(), ..r.clone() };
        let head = RequestHead { request_headers: vec![h("x-$(id)", "`id`", false), h("a\"b", "v", true)], ..head };
        let line = curl(&evil, &head, None);
        assert!(line.starts_with("curl -X 'GET`touch${IFS}x`' "), "{line}");
        assert!(line.contains(" -H 'x-$(id): `id`'") && line.contains(r#" -H 'a"b: '"$A_B""#), "{line}");
    }

    #[test]
    fn heads_diff_by_line() {
        let a: Vec<String> = ["status: 200", "a: 1", "b: 2"].map(String::from).to_vec();
        let b: Vec<String> = ["status: 502", "a: 1", "c: 3"].map(String::from).to_vec();
        assert_eq!(
            diff(&a, &b),
            [
                Diff::New("status: 502".into()),
                Diff::Gone("status: 200".into()),
                Diff::Same("a: 1".into()),
                Diff::New("c: 3".into()),
                Diff::Gone("b: 2".into()),
            ]
        );
        assert!(diff(&a, &a).iter().all(|d| matches!(d, Diff::Same(_))));
    }

    #[test]
    fn filters() {
        let r = RequestInfo {
            method: "GET".into(),
            host: "api.example.com".into(),
            path: "/v1/items".into(),
            status: 502,
            duration_ms: 300,
            client_id: "edge-2".into(),
            ..Default::default()
        };
        let ok = |f: &str| RequestFilter::parse(f).matches(&r, &[]);
        assert!(ok("status:5xx") && ok("status:502") && !ok("status:4xx"));
        assert!(ok("host:api") && !ok("host:www"));
        assert!(ok("path:/v1") && ok("client:edge-2") && !ok("client:edge-1"));
        assert!(ok("slower:250ms") && ok(">0.2s") && !ok("slower:300ms"));
        assert!(ok("items 502") && !ok("items 404"));
        assert!(ok("status:5xx client:edge >100"));
    }
}
