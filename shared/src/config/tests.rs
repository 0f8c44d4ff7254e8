//! The file formats end to end: text in, a checked config or an error naming
//! file, line and key out.

use super::*;
use std::time::Duration;

const SERVER: &str = r#"
[server]
http_listen = "127.0.0.1:8080"
grpc_listen = "127.0.0.1:7000"
heartbeat_timeout = "90s"

[[groups]]
name = "demo"
token = "change-me"
heartbeat_interval = "30s"
data_streams = 2

[[rules]]
host = "*.localhost"
path_prefix = "/"
group = "demo"
upstream = "web"
timeout = "30s"
"#;

#[test]
fn server_example_parses() {
    let c = ServerConfig::from_str_named(SERVER, "server.toml").expect("valid");
    assert_eq!(c.groups[0].heartbeat_timeout, Duration::from_secs(90));
    assert_eq!(c.groups[0].data_streams, 2);
    assert_eq!(format!("{:?}", c.groups[0].token), "\"***\"");
    let (v1, cfg) = c.group_sync("demo").expect("group");
    assert_eq!(cfg.routes[0].upstream, "web");
    let c2 = ServerConfig::from_str_named(&SERVER.replace("\"30s\"\ndata", "\"10s\"\ndata"), "s").expect("ok");
    assert_ne!(c2.group_sync("demo").expect("group").0, v1, "version follows content");
    let c3 = ServerConfig::from_str_named(&SERVER.replace("*.localhost", "app.localhost"), "s").expect("ok");
    assert_ne!(c3.group_sync("demo").expect("group").0, v1, "a rule is part of the group's config");
    assert_eq!(c.group_sync("demo").expect("group").0, v1, "stable for the same content");
}

/// Every transport bound is a key with a default, and set values arrive.
#[test]
fn transport_keys_default_and_apply() {
    let d = ServerConfig::from_str_named(SERVER, "s").expect("valid").server;
    assert_eq!(
        (d.public_max_streams, d.h2_max_remote_resets, d.h2_max_local_resets),
        (DEFAULT_PUBLIC_MAX_STREAMS, DEFAULT_H2_MAX_REMOTE_RESETS, DEFAULT_H2_MAX_LOCAL_RESETS)
    );
    assert_eq!((d.link_ping_interval, d.link_handshake_timeout), (DEFAULT_PING_INTERVAL, Duration::from_secs(10)));
    assert_eq!(d.public_connection_window, DEFAULT_PUBLIC_CONNECTION_WINDOW);
    let set = SERVER.replace(
        "heartbeat_timeout = \"90s\"",
        "heartbeat_timeout = \"90s\"\npublic_connection_window = \"64MiB\"\npublic_max_streams = 8\nh2_max_remote_resets = 5\nlink_ping_interval = \"3s\"\nlink_ping_timeout = \"2s\"\npublic_ping_timeout = \"4s\"\nlink_handshake_timeout = \"1s\"\nregistration_timeout = \"2s\"",
    );
    let s = ServerConfig::from_str_named(&set, "s").expect("valid").server;
    assert_eq!((s.public_max_streams, s.h2_max_remote_resets), (8, 5));
    assert_eq!(s.public_connection_window, 64 << 20);
    assert_eq!((s.link_ping_interval, s.link_ping_timeout), (Duration::from_secs(3), Duration::from_secs(2)));
    assert_eq!(s.public_ping_timeout, Duration::from_secs(4));
    assert_eq!((s.link_handshake_timeout, s.registration_timeout), (Duration::from_secs(1), Duration::from_secs(2)));

    let client = "server = \"http://127.0.0.1:7000\"\ngroup = \"g\"\ntoken = \"t\"\n";
    let c = ClientConfig::from_str_named(client, "c").expect("valid");
    assert_eq!((c.reconnect_min, c.reconnect_max), (DEFAULT_RECONNECT_MIN, DEFAULT_RECONNECT_MAX));
    assert_eq!(c.upstream_connect_timeout, DEFAULT_UPSTREAM_CONNECT_TIMEOUT);
    let small_cap = ClientConfig::from_str_named(&format!("{client}reconnect_max = \"100ms\"\n"), "c").expect("valid");
    assert_eq!(small_cap.reconnect_min, Duration::from_millis(100), "the default first step follows the cap down");
    let c = ClientConfig::from_str_named(
        &format!("{client}reconnect_min = \"1s\"\nping_interval = \"5s\"\nupstream_idle_timeout = \"2s\"\n"),
        "c",
    )
    .expect("valid");
    assert_eq!((c.reconnect_min, c.ping_interval), (Duration::from_secs(1), Duration::from_secs(5)));
    assert_eq!(c.upstream_idle_timeout, Duration::from_secs(2));
}

/// Each bad config names the file, the line and the key.
#[test]
fn errors_name_file_line_and_key() {
    struct Case {
        text: String,
        expect: &'static str,
    }
    let cases = [
        Case {
            text: SERVER.replace("\"90s\"", "\"90 parsecs\""),
            expect: "server.toml:5: server.heartbeat_timeout: invalid duration",
        },
        Case {
            text: SERVER.replace("\"30s\"\ndata", "\"50ms\"\ndata"),
            expect: "server.toml:10: groups[0].heartbeat_interval: must be at least 100ms",
        },
        Case {
            text: SERVER.replace("data_streams = 2", "data_streams = 0"),
            expect: "server.toml:11: groups[0].data_streams: must be 1",
        },
        Case {
            text: SERVER.replace("group = \"demo\"", "group = \"nope\""),
            expect: "server.toml:16: rules[0].group: no group named \"nope\"",
        },
        Case {
            text: SERVER.replace("path_prefix", "path_prefx"),
            expect: "server.toml:15: rules[0].path_prefx: unknown field `path_prefx`",
        },
        Case { text: SERVER.replace("[server]", "[server"), expect: "server.toml:2: syntax:" },
        Case {
            text: SERVER.replace("\"127.0.0.1:7000\"", "\"localhost:x\""),
            expect: "server.toml:4: server.grpc_listen:",
        },
        Case {
            text: format!("{SERVER}\n[[rules]]\nhost = \"a.localhost\"\ngroup = \"demo\"\nupstream = \"web\"\n"),
            expect: "server.toml:22: rules[1]: unreachable: rules[0]",
        },
    ];
    let mut wrong = Vec::new();
    for c in cases {
        let err = ServerConfig::from_str_named(&c.text, "server.toml").expect_err("invalid").to_string();
        if !err.starts_with(c.expect) {
            wrong.push(format!("got {err:?}, want {:?}", c.expect));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // A quarter-second heartbeat reaped at 750 ms is a setting for a lossy link.
    let fast = SERVER.replace("\"90s\"", "\"750ms\"").replace("\"30s\"\ndata", "\"250ms\"\ndata");
    let c = ServerConfig::from_str_named(&fast, "server.toml").expect("250 ms heartbeats");
    assert_eq!(c.groups[0].heartbeat_interval, Duration::from_millis(250));
}

/// The issue's flat keys and the [log] section mean the same; both at once is an error.
#[test]
fn log_keys_flat_or_in_their_section() {
    let flat = SERVER.replace(
        "heartbeat_timeout = \"90s\"",
        "heartbeat_timeout = \"90s\"\nlog_format = \"json\"\nlog_level = \"debug\"",
    );
    let c = ServerConfig::from_str_named(&flat, "server.toml").expect("valid");
    assert_eq!((c.log.format, c.log.level.as_deref()), (LogFormat::Json, Some("debug")));
    let both = format!("{flat}\n[log]\nlevel = \"info\"\n");
    let err = ServerConfig::from_str_named(&both, "server.toml").expect_err("both").to_string();
    assert!(err.starts_with("server.toml:7: server.log_level: set either"), "{err}");
    let client = "server = \"http://127.0.0.1:7000\"\ngroup = \"g\"\ntoken = \"t\"\nlog_format = \"json\"\n";
    let c = ClientConfig::from_str_named(client, "client.toml").expect("valid");
    assert_eq!(c.log.format, LogFormat::Json);
    let bad = client.replace("\"json\"", "\"xml\"");
    let err = ClientConfig::from_str_named(&bad, "client.toml").expect_err("bad format").to_string();
    assert!(err.starts_with("client.toml:4: log_format: unknown variant `xml`"), "{err}");
}

#[test]
fn client_config_parses_and_checks_urls() {
    let text = r#"
server = "http://127.0.0.1:7000"
client_id = "edge-1"
group = "demo"
token = "change-me"
transport = "split-connection"
[upstreams]
web = "http://127.0.0.1:3000"
"#;
    let c = ClientConfig::from_str_named(text, "client.toml").expect("valid");
    assert_eq!(c.transport, Transport::SplitConnection);
    assert_eq!(c.upstreams["web"].url.port_u16(), Some(3000));
    assert!(!c.upstreams["web"].http2);
    let bad = text.replace("http://127.0.0.1:3000", "127.0.0.1:3000");
    let err = ClientConfig::from_str_named(&bad, "client.toml").expect_err("invalid").to_string();
    assert!(err.starts_with("client.toml:8: upstreams.web: "), "{err}");
    let bad = text.replace("split-connection", "carrier-pigeon");
    let err = ClientConfig::from_str_named(&bad, "client.toml").expect_err("invalid").to_string();
    assert!(err.starts_with("client.toml:6: transport: "), "{err}");
    // The table form, for h2c (gRPC) upstreams.
    let grpc = format!("{text}grpc = {{ url = \"http://127.0.0.1:50051\", http2 = true }}\n");
    let c = ClientConfig::from_str_named(&grpc, "client.toml").expect("valid");
    assert!(c.upstreams["grpc"].http2);
    assert_eq!(c.upstreams["grpc"].url.port_u16(), Some(50051));
    for (bad, want) in [
        (
            "grpc = { url = \"http://127.0.0.1:50051\", h2 = true }",
            "client.toml:9: upstreams.grpc.h2: unknown field `h2`",
        ),
        ("grpc = { http2 = true }", "client.toml:9: upstreams.grpc: missing field `url`"),
        ("grpc = 5", "client.toml:9: upstreams.grpc: invalid type: integer `5`, expected a URL string"),
        ("grpc = { url = \"ftp://x:1\" }", "client.toml:9: upstreams.grpc: scheme \"ftp\""),
    ] {
        let err = ClientConfig::from_str_named(&format!("{text}{bad}\n"), "client.toml").expect_err(bad).to_string();
        assert!(err.starts_with(want), "{bad}: {err}");
    }
}

/// The access keys: a group's are its rules' default, a rule's own replace
/// them key by key, and every bad value names file, line and key.
#[test]
fn access_policies_default_from_the_group_and_errors_name_the_key() {
    let text = r#"
[server]
trusted_proxies = ["10.0.0.1", "fd00::/8"]
client_address_header = "forwarded"

[[groups]]
name = "demo"
token = "t"
deny = ["192.0.2.0/24"]
rate_limit = { requests = 100, per = "1m" }
max_requests_per_second = 50

[[rules]]
path_prefix = "/api"
group = "demo"
upstream = "web"
allow = ["10.0.0.0/8", "2001:db8::/32"]
rate_limit = { requests = 5, burst = 10, by = "X-Api-Key" }

[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
"#;
    let c = ServerConfig::from_str_named(text, "server.toml").expect("valid");
    assert!(c.server.trusted_proxies.contains("fd00::1".parse().expect("ip")));
    assert_eq!(c.server.client_address_header, crate::policy::ForwardedHeader::Forwarded);
    assert_eq!(c.server.rate_limit_max_keys, DEFAULT_RATE_LIMIT_MAX_KEYS);
    assert_eq!(c.groups[0].max_requests_per_second.map(|n| n.get()), Some(50));
    let (api, rest) = (&c.rules.rules()[0].policy, &c.rules.rules()[1].policy);
    // The rule's allow, with the group's deny still in force.
    assert!(api.addresses.admits("10.1.1.1".parse().expect("ip")));
    assert!(!api.addresses.admits("192.0.2.1".parse().expect("ip")));
    let limit = api.rate_limit.as_ref().expect("limit");
    assert_eq!((limit.requests.get(), limit.burst.get(), limit.per), (5, 10, Duration::from_secs(1)));
    assert_eq!(limit.by, crate::policy::RateKey::Header(http::HeaderName::from_static("x-api-key")));
    // The group's, untouched.
    assert!(rest.addresses.admits("10.1.1.1".parse().expect("ip")));
    assert!(!rest.addresses.admits("192.0.2.1".parse().expect("ip")));
    let limit = rest.rate_limit.as_ref().expect("the group's limit");
    assert_eq!((limit.requests.get(), limit.burst.get(), limit.per), (100, 100, Duration::from_secs(60)));
    assert_eq!(limit.by, crate::policy::RateKey::ClientIp);

    let cases = [
        (text.replace("\"2001:db8::/32\"", "\"2001:db8::/200\""), 17, "rules[0].allow", "CIDR"),
        (text.replace("\"192.0.2.0/24\"", "\"192.0.2.9/24\""), 9, "groups[0].deny", "192.0.2.0/24"),
        (text.replace("\"10.0.0.1\"", "\"proxy.local\""), 3, "server.trusted_proxies", "not an address"),
        (text.replace("requests = 5,", "requests = 0,"), 18, "rules[0].rate_limit.requests", "at least 1"),
        (text.replace("by = \"X-Api-Key\"", "by = \"the key\""), 18, "rules[0].rate_limit.by", "header name"),
        (text.replace("per = \"1m\"", "per = \"0s\""), 10, "groups[0].rate_limit.per", "at least 1ms"),
        (
            text.replace("max_requests_per_second = 50", "max_requests_per_second = 0"),
            11,
            "groups[0].max_requests_per_second",
            "at least 1",
        ),
        (
            text.replace(
                "upstream = \"web\"\nallow",
                "upstream = \"web\"\nbasic_auth = \"/nonexistent/users.htpasswd\"\nallow",
            ),
            17,
            "rules[0].basic_auth",
            "cannot read /nonexistent/users.htpasswd",
        ),
        (
            text.replace("rate_limit = { requests = 5,", "rate_limit = { rate = 5,"),
            18,
            "rules[0].rate_limit.rate",
            "unknown field",
        ),
    ];
    // A JWKS that does not parse, and one with a symmetric key: refused at load, naming the key.
    let dir = std::env::temp_dir().join(format!("tunnel-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (body, want) in [("not json", "not a JWKS"), (r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, "symmetric")] {
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, body).expect("write");
        let with = text.replace(
            "upstream = \"web\"\nallow",
            &format!("upstream = \"web\"\njwt = {{ jwks = \"{}\" }}\nallow", jwks.display()),
        );
        let e = ServerConfig::from_str_named(&with, "server.toml").expect_err(want).to_string();
        assert!(e.starts_with("server.toml:17: rules[0].jwt: ") && e.contains(want), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let huge = text.replace(
        "rate_limit = { requests = 5, burst = 10,",
        "rate_limit = { requests = 1, per = \"365d\", burst = 1000,",
    );
    let e = ServerConfig::from_str_named(&huge, "server.toml").expect_err("a bucket deeper than a year").to_string();
    assert!(e.starts_with("server.toml:18: rules[0].rate_limit: ") && e.contains("365 days"), "{e}");
    for (text, line, key, message) in cases {
        let e = ServerConfig::from_str_named(&text, "server.toml").expect_err(key).to_string();
        assert!(e.starts_with(&format!("server.toml:{line}: {key}: ")), "{key}: {e}");
        assert!(e.contains(message), "{key}: {e}");
    }
}

/// `[[tcp]]` entries and tcp:// upstreams: checked, errors naming the key.
#[test]
fn tcp_services_and_upstreams_are_checked() {
    let text = r#"
[[groups]]
name = "demo"
token = "t"

[[tcp]]
listen = "0.0.0.0:2222"
group = "demo"
upstream = "ssh"
deny = ["192.0.2.0/24"]
proxy_protocol = true
"#;
    let c = ServerConfig::from_str_named(text, "server.toml").expect("valid");
    let t = &c.tcp[0];
    assert_eq!((t.label.as_str(), t.upstream.as_str(), t.proxy_protocol), ("tcp:0.0.0.0:2222", "ssh", true));
    assert_eq!((t.idle_timeout, t.max_connections), (DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_TCP_MAX_CONNECTIONS));
    assert!(!t.addresses.admits("192.0.2.9".parse().expect("ip")));
    let twice = format!("{text}\n[[tcp]]\nlisten = \"0.0.0.0:2222\"\ngroup = \"demo\"\nupstream = \"db\"\n");
    let cases = [
        (
            text.replace("group = \"demo\"\nupstream", "group = \"other\"\nupstream"),
            8,
            "tcp[0].group",
            "no group named",
        ),
        (text.replace("192.0.2.0/24", "192.0.2.0/99"), 10, "tcp[0].deny", "CIDR"),
        (twice, 14, "tcp[1].listen", "listed twice"),
    ];
    for (text, line, key, message) in cases {
        let e = ServerConfig::from_str_named(&text, "server.toml").expect_err(key).to_string();
        assert!(e.starts_with(&format!("server.toml:{line}: {key}: ")) && e.contains(message), "{key}: {e}");
    }
    let client = |up: &str| {
        ClientConfig::from_str_named(
            &format!("server = \"http://127.0.0.1:7000\"\ngroup = \"demo\"\ntoken = \"t\"\n[upstreams]\nssh = {up}\n"),
            "client.toml",
        )
    };
    assert!(client("\"tcp://127.0.0.1:22\"").expect("valid").upstreams["ssh"].is_tcp());
    let e = client("\"tcp://127.0.0.1\"").expect_err("no port").to_string();
    assert!(e.contains("upstreams.ssh") && e.contains("needs a port"), "{e}");
    let e = client("{ url = \"tcp://127.0.0.1:22\", http2 = true }").expect_err("http2").to_string();
    assert!(e.contains("http2 is for http://"), "{e}");
    let e = client("\"udp://127.0.0.1:53\"").expect_err("scheme").to_string();
    assert!(e.contains("use http:// or tcp://"), "{e}");
}

/// The link's TCP timers: defaults, "off", set values, and what Linux would
/// refuse refused at its line.
#[test]
fn link_timers_default_turn_off_and_stay_in_linux_range() {
    let d = ServerConfig::from_str_named(SERVER, "s").expect("valid").server.link_tuning;
    assert_eq!(d, LinkTuning::default());
    assert_eq!(d.rto_min, DEFAULT_LINK_RTO_MIN);
    let set =
        |keys: &str| SERVER.replace("heartbeat_timeout = \"90s\"", &format!("heartbeat_timeout = \"90s\"\n{keys}"));
    let off = ServerConfig::from_str_named(
        &set("link_rto_min = \"off\"\nlink_delack_max = \"OFF\"\nlink_notsent_lowat = 0"),
        "s",
    )
    .expect("valid")
    .server
    .link_tuning;
    assert!(off.is_off(), "{off:?}");
    let s = ServerConfig::from_str_named(&set("link_rto_min = \"40ms\"\nlink_thin_timeouts = true"), "s")
        .expect("valid")
        .server
        .link_tuning;
    assert_eq!(
        (s.rto_min, s.delack_max, s.thin_timeouts),
        (Some(Duration::from_millis(40)), DEFAULT_LINK_DELACK_MAX, true)
    );
    for (keys, expect) in [
        ("link_rto_min = \"1ms\"", "server.toml:6: server.link_rto_min: must be 5ms to 200ms"),
        ("link_delack_max = \"1s\"", "server.toml:6: server.link_delack_max: must be 5ms to 200ms"),
        ("link_rto_min = \"soon\"", "server.toml:6: server.link_rto_min: invalid duration \"soon\""),
        ("link_notsent_lowat = \"1KiB\"", "server.toml:6: server.link_notsent_lowat: must be 16KiB to 4GiB"),
    ] {
        let err = ServerConfig::from_str_named(&set(keys), "server.toml").expect_err("refused").to_string();
        assert!(err.starts_with(expect), "{err}");
    }

    let client = "server = \"http://127.0.0.1:7000\"\ngroup = \"g\"\ntoken = \"t\"\n";
    let c = ClientConfig::from_str_named(client, "c").expect("valid");
    assert_eq!(c.link_tuning, LinkTuning::default());
    let c = ClientConfig::from_str_named(&format!("{client}link_delack_max = \"12ms\"\n"), "c").expect("valid");
    assert_eq!(c.link_tuning.delack_max, Some(Duration::from_millis(12)));
    let err = ClientConfig::from_str_named(&format!("{client}link_rto_min = \"300ms\"\n"), "client.toml")
        .expect_err("refused")
        .to_string();
    assert!(err.starts_with("client.toml:4: link_rto_min: must be 5ms to 200ms"), "{err}");
    let changed = c.changed_keys(&ClientConfig::from_str_named(client, "c").expect("valid"));
    assert_eq!(changed, vec!["link_delack_max"]);
}
