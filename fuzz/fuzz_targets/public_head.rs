//! A public HTTP/1.1 request head, parsed as hyper parses it (httparse),
//! through the tunnel's host check and header sanitizer, read both as
//! HTTP/1.x and as HTTP/2. For every head that is accepted: exactly one
//! Host goes upstream, it is the authority the request was routed by, no
//! hop-by-hop header survives (bar `TE: trailers`, which gRPC needs end to
//! end), and checking the forwarded head again routes
//! to the same host.
#![no_main]

use http::{header, HeaderMap, HeaderName, HeaderValue, Uri, Version};
use libfuzzer_sys::fuzz_target;
use tunnel_lib::frame::strip_hop_by_hop;
use tunnel_lib::head::{check_host, set_host};
use tunnel_lib::rules::normalize_host;

fuzz_target!(|data: &[u8]| {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else { return };
    let Some(Ok(uri)) = req.path.map(|p| p.parse::<Uri>()) else { return };
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) else {
            return;
        };
        headers.append(n, v);
    }
    let v1 = if req.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    for version in [v1, Version::HTTP_2] {
        let Ok(public) = check_host(version, &uri, &headers) else { continue };
        assert_eq!(public.host, normalize_host(&public.authority));
        let connection_named: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|n| n.trim().to_ascii_lowercase()).collect::<Vec<_>>())
            .collect();
        let mut forwarded = headers.clone();
        strip_hop_by_hop(&mut forwarded);
        set_host(&mut forwarded, &public.authority);
        let hosts: Vec<&HeaderValue> = forwarded.get_all(header::HOST).iter().collect();
        if public.authority.is_empty() {
            assert!(hosts.is_empty(), "no authority, yet a Host went upstream");
            continue;
        }
        assert_eq!(hosts.len(), 1, "one Host upstream");
        assert_eq!(hosts[0].as_bytes(), public.authority.as_bytes(), "upstream told the routed host");
        for hop in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "http2-settings"] {
            assert!(!forwarded.contains_key(hop), "{hop} forwarded");
        }
        for named in connection_named {
            if named == "te" {
                // `TE: trailers` goes end to end even when Connection names
                // TE (gRPC needs it); any other TE value must not.
                let te: Vec<&[u8]> = forwarded.get_all(header::TE).iter().map(|v| v.as_bytes()).collect();
                assert!(te.is_empty() || te == [b"trailers"], "TE other than `trailers` forwarded");
            } else if named != "host" && !named.is_empty() && HeaderName::from_bytes(named.as_bytes()).is_ok() {
                assert!(!forwarded.contains_key(named.as_str()), "{named} (named in Connection) forwarded");
            }
        }
        let again =
            check_host(Version::HTTP_11, &Uri::from_static("/"), &forwarded).expect("the forwarded head is valid");
        assert_eq!(again.host, public.host, "the upstream's Host routes where the request went");
    }
});
