//! The host router: rules from fuzzed patterns, fuzzed Host values. A host
//! the head check accepts routes as a pure function of its normalized form:
//! its case, its port and a trailing dot never change the rule chosen.
#![no_main]

use http::{HeaderMap, HeaderValue, Uri, Version};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tunnel_lib::head::check_host;
use tunnel_lib::rules::{normalize_host, HostPattern, Rule, RuleSet};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let n = lines.next().map_or(0, |l| l.len() % 8);
    let mut rules = Vec::new();
    for (i, pattern) in lines.by_ref().take(n).enumerate() {
        let Ok(host) = HostPattern::parse(pattern) else { continue };
        rules.push(Rule {
            host,
            path_prefix: "/".into(),
            group: format!("g{i}"),
            upstream: "u".into(),
            timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_body: None,
            capture_bodies: None,
            policy: Default::default(),
            label: String::new(),
        });
    }
    let set = RuleSet::new(rules);
    let group = |host: &str| set.route(host, "/").map(|r| r.group.clone());
    for raw in lines {
        let Ok(value) = HeaderValue::from_str(raw) else { continue };
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, value);
        let Ok(public) = check_host(Version::HTTP_11, &Uri::from_static("/"), &headers) else { continue };
        let routed = group(&public.host);
        if public.host.contains(':') {
            // An IPv6 literal: normalized without its brackets, so it is not
            // itself an authority; it takes a port only inside brackets.
            continue;
        }
        assert_eq!(normalize_host(&public.host), public.host, "normalizing is idempotent");
        let variants =
            [public.authority.to_ascii_uppercase(), format!("{}:8443", public.host), format!("{}.", public.host)];
        for v in variants {
            assert_eq!(group(&normalize_host(&v)), routed, "{v:?} routed apart from {:?}", public.authority);
        }
    }
});
