//! The public request head as the tunnel forwards it: which host it is for,
//! checked once (RFC 9112 §3.2, RFC 9113 §8.3.1), and the one Host the
//! upstream will be told. Kept apart from sockets so it can be tested and
//! fuzzed alone.
//!
//! The invariant it keeps: the host a request is routed by is the host its
//! upstream sees. A proxy that routes by the request-target but forwards a
//! different Host header lets one tenant's request be served as another's.

use crate::rules::normalize_host;
use http::{header, HeaderMap, HeaderValue, Uri, Version};

/// Why a public request head is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("more than one Host header")]
    ManyHosts,
    #[error("an HTTP/1.1 request needs a Host header")]
    NoHost,
    #[error("invalid host {0:?}")]
    BadHost(String),
    #[error("Host {host:?} disagrees with :authority {authority:?}")]
    HostMismatch { host: String, authority: String },
}

/// What routing and forwarding need from a checked head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicHost {
    /// As the client wrote it, port included (empty for an HTTP/1.0 request without one).
    pub authority: String,
    /// Lower-cased, without port or trailing dot: what rules match.
    pub host: String,
}

/// Checks which host a public request is for and leaves exactly one Host
/// header naming it. Call before stripping hop-by-hop headers, and set
/// Host again after (a `Connection: host` must not remove it).
pub fn check_host(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<PublicHost, HeadError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(HeadError::ManyHosts);
    }
    let host_header = match host_header {
        Some(v) => Some(v.to_str().map_err(|_| HeadError::BadHost(String::from_utf8_lossy(v.as_bytes()).into()))?),
        None => None,
    };
    let authority = match (uri.authority(), host_header) {
        // HTTP/2 :authority beside a Host that names something else is malformed.
        (Some(a), Some(h)) if version == Version::HTTP_2 && !same_host(a.as_str(), h) => {
            return Err(HeadError::HostMismatch { host: h.to_string(), authority: a.to_string() })
        }
        // HTTP/1.1 absolute-form: the request-target wins and Host is
        // replaced (RFC 9112 §3.2.2).
        (Some(a), _) => a.as_str().to_string(),
        (None, Some(h)) => h.to_string(),
        (None, None) if version == Version::HTTP_11 => return Err(HeadError::NoHost),
        (None, None) => String::new(),
    };
    if authority.is_empty() {
        if host_header.is_some() && version == Version::HTTP_11 {
            // `Host:` with an empty value is allowed only without an authority
            // in the target; we route by host, so an empty one routes nowhere.
            return Err(HeadError::BadHost(String::new()));
        }
        return Ok(PublicHost { authority, host: String::new() });
    }
    valid_authority(&authority)?;
    let host = normalize_host(&authority);
    Ok(PublicHost { authority, host })
}

/// Puts back the single Host header for `authority` (after hop-by-hop stripping).
pub fn set_host(headers: &mut HeaderMap, authority: &str) {
    // Usually the one Host header already says it.
    let mut hosts = headers.get_all(header::HOST).iter();
    if let (Some(h), None) = (hosts.next(), hosts.next()) {
        if !authority.is_empty() && h.as_bytes() == authority.as_bytes() {
            return;
        }
    }
    headers.remove(header::HOST);
    if authority.is_empty() {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, v);
    }
}

fn same_host(a: &str, b: &str) -> bool {
    normalize_host(a) == normalize_host(b)
}

/// host [":" port], no user info, a host made of the characters a
/// registered name, an IPv4 or a bracketed IPv6 literal may hold. One pass
/// of our own: the `http` crate's authority parser, with the host lookup
/// after it, was half of this check's cost on every request, and its rules
/// are wider than ours anyway (a test holds the two to the same answers).
fn valid_authority(a: &str) -> Result<(), HeadError> {
    let bad = || HeadError::BadHost(a.to_string());
    let port = if let Some(rest) = a.strip_prefix('[') {
        let (v6, port) = rest.split_once(']').ok_or_else(bad)?;
        v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        port
    } else {
        let (host, port) = a.find(':').map_or((a, ""), |i| a.split_at(i));
        // Labels of a registered name or an IPv4 address: none empty, one
        // trailing dot at most ("a..b" or "..." name nothing).
        let name = host.strip_suffix('.').unwrap_or(host);
        let ok = !host.is_empty()
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            && name.split('.').all(|label| !label.is_empty());
        if !ok {
            return Err(bad());
        }
        port
    };
    // After the host, nothing or ":" and a port number ("host:." once
    // routed as another host).
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
        });
    if !port_ok {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    fn check(v: Version, uri: &str, headers: &[(&str, &str)]) -> Result<PublicHost, HeadError> {
        check_host(v, &uri.parse().expect("uri"), &h(headers))
    }

    /// The check as it was, on the `http` crate's parser: the oracle that
    /// the one-pass check must agree with.
    fn valid_authority_by_http(a: &str) -> Result<(), HeadError> {
        let bad = || HeadError::BadHost(a.to_string());
        let parsed: http::uri::Authority = a.parse().map_err(|_| bad())?;
        if a.contains('@') || parsed.host().is_empty() {
            return Err(bad());
        }
        let host = parsed.host();
        let ok = if let Some(inner) = host.strip_prefix('[') {
            inner.strip_suffix(']').is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            // Labels of a registered name or an IPv4 address: none empty, one
            // trailing dot at most ("a..b" or "..." name nothing).
            let name = host.strip_suffix('.').unwrap_or(host);
            host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
                && name.split('.').all(|label| !label.is_empty())
        };
        if !ok {
            return Err(bad());
        }
        // After the host, nothing or ":" and a port number: the http crate's
        // parser lets "host:." through, which would route as another host.
        let port_ok = match a.strip_prefix(host) {
            Some("") => true,
            Some(rest) => rest.strip_prefix(':').is_some_and(|p| {
                (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
            }),
            None => false,
        };
        if !port_ok {
            return Err(bad());
        }
        Ok(())
    }

    /// The one-pass check answers as the old one did, on the cases that
    /// matter and on random strings of the characters that make them.
    #[test]
    fn one_pass_authority_check_agrees_with_the_http_parser() {
        let cases = [
            "a",
            "a.b",
            "A.Example.:8080",
            "a.b.",
            "a..b",
            ".a",
            "...",
            "...............:.",
            "a:",
            "a:0",
            "a:65535",
            "a:65536",
            "a:99999",
            "a:080",
            "a:+1",
            "a:1:2",
            "a@b",
            "@a",
            "a b",
            "a/b",
            "a%20b",
            "a_b",
            "-a",
            "a-",
            "1.2.3.4",
            "1.2.3.4:80",
            "[::1]",
            "[::1]:8080",
            "[::1]:",
            "[::1]x",
            "[zz]",
            "[::1",
            "::1",
            "[]",
            "",
            ":80",
            "[fe80::1%25eth0]",
            "a.example:80:80",
            "a.example/../b",
            "a\u{e9}",
            "a?b",
            "a#b",
            "[::ffff:1.2.3.4]",
        ];
        for a in cases {
            assert_eq!(valid_authority(a).is_ok(), valid_authority_by_http(a).is_ok(), "{a:?}");
        }
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&"[a-zA-Z0-9.:\\[\\]@_%-]{0,12}", |a| {
                prop_assert_eq!(valid_authority(&a).is_ok(), valid_authority_by_http(&a).is_ok(), "{:?}", a);
                Ok(())
            })
            .expect("the two checks agree");
    }

    /// Each case: what the head says, and the host it is routed by or why it is refused.
    #[test]
    fn hosts_checked_and_chosen() {
        const HTTP_10: Version = Version::HTTP_10;
        const HTTP_11: Version = Version::HTTP_11;
        const HTTP_2: Version = Version::HTTP_2;
        struct Case(Version, &'static str, &'static [(&'static str, &'static str)], Result<&'static str, HeadError>);
        let cases = [
            Case(HTTP_11, "/", &[("host", "App.Example.:8080")], Ok("app.example")),
            Case(HTTP_11, "/", &[("host", "a"), ("host", "b")], Err(HeadError::ManyHosts)),
            // Found by fuzzing (host_router): a port that is no number, and a
            // host of dots, normalized to another host than the one checked.
            Case(HTTP_11, "/", &[("host", "...............:.")], Err(HeadError::BadHost("...............:.".into()))),
            Case(HTTP_11, "/", &[("host", "a..b")], Err(HeadError::BadHost("a..b".into()))),
            Case(HTTP_11, "/", &[("host", "a:99999")], Err(HeadError::BadHost("a:99999".into()))),
            Case(HTTP_11, "/", &[("host", "a.b.:80")], Ok("a.b")),
            Case(HTTP_11, "/", &[("host", "[::1]:8080")], Ok("::1")),
            Case(HTTP_11, "/", &[], Err(HeadError::NoHost)),
            Case(HTTP_10, "/", &[], Ok("")),
            Case(HTTP_11, "http://b.example/x", &[("host", "a.example")], Ok("b.example")),
            Case(
                HTTP_2,
                "http://b.example/x",
                &[("host", "a.example")],
                Err(HeadError::HostMismatch { host: "a.example".into(), authority: "b.example".into() }),
            ),
            Case(HTTP_2, "http://b.example:80/x", &[("host", "B.example")], Ok("b.example")),
            Case(HTTP_11, "/", &[("host", "evil@a.example")], Err(HeadError::BadHost("evil@a.example".into()))),
            Case(HTTP_11, "/", &[("host", "a b")], Err(HeadError::BadHost("a b".into()))),
            Case(HTTP_11, "/", &[("host", "a.example:80:80")], Err(HeadError::BadHost("a.example:80:80".into()))),
            Case(HTTP_11, "/", &[("host", "a.example/../b")], Err(HeadError::BadHost("a.example/../b".into()))),
            Case(HTTP_11, "/", &[("host", "a.example:")], Err(HeadError::BadHost("a.example:".into()))),
            Case(HTTP_11, "/", &[("host", "")], Err(HeadError::BadHost(String::new()))),
            Case(HTTP_11, "/", &[("host", "[::1]:8080")], Ok("::1")),
            Case(HTTP_11, "/", &[("host", "[zz]")], Err(HeadError::BadHost("[zz]".into()))),
        ];
        for Case(v, uri, headers, want) in cases {
            let got = check(v, uri, headers).map(|p| p.host);
            assert_eq!(got, want.map(str::to_string), "{v:?} {uri} {headers:?}");
        }
    }

    /// After hop-by-hop stripping, exactly one Host names the routed authority.
    #[test]
    fn set_host_leaves_one() {
        let mut m = h(&[("host", "a.example")]);
        set_host(&mut m, "b.example:8080");
        assert_eq!(m.get_all(header::HOST).iter().collect::<Vec<_>>(), ["b.example:8080"]);
        set_host(&mut m, "");
        assert!(m.get(header::HOST).is_none());
    }
}
