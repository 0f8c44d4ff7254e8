//! A group's config as `ConfigSync` carries it, and its version.
//!
//! The version must depend on the group's config alone, never on the host:
//! the same server.toml deployed on several servers of a fleet must give
//! every group the same version on each, so that a client that reconnects to
//! another server, or whose acknowledgement is compared there, is not taken
//! for one running a stale config and resynced. So `group_config` reads only
//! the group's settings and its rules; keys such as `server_id` or the
//! listeners must never find their way into it.

use super::server::GroupSettings;
use crate::proto;
use crate::rules::RuleSet;

/// What `ConfigSync` carries for group `g`: its settings and the rules that
/// route to it, in file order.
pub(super) fn group_config(g: &GroupSettings, rules: &RuleSet) -> proto::GroupConfig {
    let mine = || rules.rules().iter().filter(|r| r.group == g.name);
    let mut routes: Vec<proto::UpstreamRoute> = Vec::new();
    for r in mine() {
        let ms = r.timeout.as_millis() as u64;
        match routes.iter_mut().find(|x| x.upstream == r.upstream) {
            Some(x) => x.timeout_ms = x.timeout_ms.max(ms),
            None => routes.push(proto::UpstreamRoute { upstream: r.upstream.clone(), timeout_ms: ms }),
        }
    }
    let rules = mine()
        .map(|r| proto::RouteRule {
            host: r.host.to_string(),
            path_prefix: r.path_prefix.clone(),
            upstream: r.upstream.clone(),
            timeout_ms: r.timeout.as_millis() as u64,
        })
        .collect();
    proto::GroupConfig {
        group: g.name.clone(),
        heartbeat_interval_ms: g.heartbeat_interval.as_millis() as u64,
        data_streams: g.data_streams,
        routes,
        exchange_window: g.exchange_window,
        rules,
    }
}

/// The content hash naming a group config: FNV-1a 64 over its protobuf
/// encoding, which is deterministic for our messages (no maps), so every
/// server computes the same version for the same config.
pub fn config_version(cfg: &proto::GroupConfig) -> String {
    use prost::Message;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cfg.encode_to_vec() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")[..12].to_string()
}

#[cfg(test)]
mod tests {
    use crate::config::ServerConfig;

    const GROUPS: &str = r#"
[[groups]]
name = "demo"
token = "change-me"
heartbeat_interval = "20s"
data_streams = 3
exchange_window = "256KiB"

[[groups]]
name = "other"
token = "other-token"

[[rules]]
host = "*.localhost"
group = "demo"
upstream = "web"

[[rules]]
host = "api.example.com"
path_prefix = "/v1"
group = "other"
upstream = "api"
timeout = "5s"
"#;

    /// Two servers of a fleet share a server.toml but not their host's keys:
    /// each group must get the same version on both.
    #[test]
    fn versions_do_not_depend_on_the_host() {
        let one = format!(
            "[server]\nserver_id = \"edge-1\"\nhttp_listen = \"127.0.0.1:8080\"\ngrpc_listen = \"127.0.0.1:7000\"\nadmin_listen = \"127.0.0.1:7001\"\n{GROUPS}"
        );
        let two = format!(
            "[server]\nserver_id = \"edge-2\"\nhttp_listen = \"10.0.0.2:80\"\ngrpc_listen = \"10.0.0.2:443\"\nadmin_listen = \"127.0.0.2:9001\"\n{GROUPS}"
        );
        let one = ServerConfig::from_str_named(&one, "one.toml").expect("valid");
        let two = ServerConfig::from_str_named(&two, "two.toml").expect("valid");
        assert_ne!(one.server, two.server, "the hosts' settings differ");
        for name in ["demo", "other"] {
            let (v1, c1) = one.group_sync(name).expect("group");
            let (v2, c2) = two.group_sync(name).expect("group");
            assert_eq!(c1, c2, "group {name}: same config");
            assert_eq!(v1, v2, "group {name}: same version");
        }
        assert_ne!(one.group_sync("demo").expect("group").0, one.group_sync("other").expect("group").0);
    }
}
