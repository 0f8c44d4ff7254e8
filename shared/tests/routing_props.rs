//! Routing as a property (issue 9): for any rules and any Host a public
//! client may send, the group a request reaches is a pure function of the
//! normalized host: case, port, a trailing dot, and whether the host came
//! in a Host header or an absolute-form target never change it; and the
//! Host the upstream is told routes to the same group.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{header, HeaderMap, HeaderValue, Uri, Version};
use proptest::prelude::*;
use std::time::Duration;
use tunnel_lib::frame::strip_hop_by_hop;
use tunnel_lib::head::{check_host, set_host};
use tunnel_lib::rules::{HostPattern, Rule, RuleSet};

fn label() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "app", "api", "www", "x-1", "example", "test", "com", "localhost"])
        .prop_map(str::to_string)
}

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
}

fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![name(), name().prop_map(|n| format!("*.{n}")), Just("*".to_string())]
}

fn rules(patterns: &[String]) -> RuleSet {
    let rules = patterns
        .iter()
        .enumerate()
        .map(|(i, p)| Rule {
            // "*": a rule without a host, which serves any.
            host: if p == "*" {
                HostPattern::Any
            } else {
                HostPattern::parse(p).expect("generated patterns are valid")
            },
            path_prefix: "/".into(),
            group: format!("g{i}"),
            upstream: "web".into(),
            timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_body: None,
            capture_bodies: None,
            policy: Default::default(),
            label: String::new(),
        })
        .collect();
    RuleSet::new(rules)
}

/// How a client may spell one host.
fn spelling(host: &str, upper: &[bool], port: Option<u16>, dot: bool) -> String {
    let mut s: String =
        host.chars().zip(upper.iter().cycle()).map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c }).collect();
    if dot {
        s.push('.');
    }
    if let Some(p) = port {
        s.push_str(&format!(":{p}"));
    }
    s
}

/// The group a public head reaches, and the group of the Host forwarded for it.
fn route(set: &RuleSet, uri: &str, host: Option<&str>) -> (Option<String>, Option<String>) {
    let uri: Uri = uri.parse().expect("uri");
    let mut headers = HeaderMap::new();
    if let Some(h) = host {
        headers.insert(header::HOST, HeaderValue::from_str(h).expect("value"));
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("host, keep-alive"));
    let public = check_host(Version::HTTP_11, &uri, &headers).expect("a valid head");
    let group = set.route(&public.host, uri.path()).map(|r| r.group.clone());
    strip_hop_by_hop(&mut headers);
    set_host(&mut headers, &public.authority);
    let told = check_host(Version::HTTP_11, &Uri::from_static("/"), &headers).expect("forwarded head valid");
    (group, set.route(&told.host, "/").map(|r| r.group.clone()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn group_is_a_function_of_the_normalized_host(
        patterns in prop::collection::vec(pattern(), 0..6),
        host in name(),
        upper in prop::collection::vec(any::<bool>(), 1..8),
        port in prop::option::of(1u16..),
        dot in any::<bool>(),
        absolute in any::<bool>(),
        decoy in name(),
    ) {
        let set = rules(&patterns);
        let (plain, _) = route(&set, "/", Some(&host));
        let spelled = spelling(&host, &upper, port, dot);
        let (group, told) = if absolute {
            // Absolute-form wins over a Host naming something else (RFC 9112 §3.2.2).
            route(&set, &format!("http://{spelled}/"), Some(&decoy))
        } else {
            route(&set, "/", Some(&spelled))
        };
        prop_assert_eq!(&group, &plain, "{:?} routed apart from {:?}", spelled, host);
        prop_assert_eq!(&told, &group, "the upstream's Host routes elsewhere");
    }
}
