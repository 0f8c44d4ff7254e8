//! `[[tcp]]`: services that are not HTTP (SSH, a database), each a public
//! TCP port whose connections are carried to an upstream of a group's
//! clients as they are, byte for byte.

use super::groups::GroupSettings;
use crate::config::defaults::{DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_TCP_MAX_CONNECTIONS};
use crate::config::source::{join, ConfigError, Source};
use crate::policy::{AddressRules, NetList};
use crate::units::HumanDuration;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use toml::Spanned;

/// A `[[tcp]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TcpSection {
    listen: Spanned<SocketAddr>,
    group: Spanned<String>,
    upstream: Spanned<String>,
    allow: Option<Spanned<Vec<String>>>,
    deny: Option<Spanned<Vec<String>>>,
    idle_timeout: Option<HumanDuration>,
    max_connections: Option<Spanned<usize>>,
    #[serde(default)]
    proxy_protocol: bool,
}

/// One TCP service, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpService {
    /// The public address, as configured (port 0: chosen at start).
    pub listen: SocketAddr,
    pub group: String,
    /// A `tcp://` upstream name known to the group's clients.
    pub upstream: String,
    /// Client addresses that may connect (the direct peer's: no proxy headers in TCP).
    pub addresses: AddressRules,
    /// A connection with nothing moving either way this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; past it new ones are closed at once.
    pub max_connections: usize,
    /// Whether the upstream is sent a PROXY protocol v2 header naming the
    /// public client before the first byte.
    pub proxy_protocol: bool,
    /// How logs, metrics and the console name it: "tcp:0.0.0.0:2222".
    pub label: String,
}

/// Checks the entries: known groups, distinct listen addresses.
pub(super) fn check(
    src: &Source,
    raw: &[TcpSection],
    groups: &[GroupSettings],
) -> Result<Vec<TcpService>, ConfigError> {
    let names: BTreeSet<String> = groups.iter().map(|g| g.name.clone()).collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, t) in raw.iter().enumerate() {
        let key = |k: &str| format!("tcp[{i}].{k}");
        let listen = *t.listen.get_ref();
        if listen.port() != 0 && !seen.insert(listen) {
            return Err(src.at(&t.listen, key("listen"), format!("{listen} is listed twice")));
        }
        let group = t.group.get_ref().trim();
        if !names.contains(group) {
            let why = format!("no group named {group:?} (defined: {})", join(&names));
            return Err(src.at(&t.group, key("group"), why));
        }
        let upstream = t.upstream.get_ref().trim();
        if upstream.is_empty() {
            return Err(src.at(&t.upstream, key("upstream"), "upstream name is empty"));
        }
        let nets = |list: &Option<Spanned<Vec<String>>>, k: &str| match list {
            None => Ok(NetList::default()),
            Some(l) => NetList::parse(l.get_ref()).map_err(|m| src.at(l, key(k), m)),
        };
        let addresses = AddressRules { allow: nets(&t.allow, "allow")?, deny: nets(&t.deny, "deny")? };
        let max_connections = match &t.max_connections {
            Some(m) if *m.get_ref() == 0 => return Err(src.at(m, key("max_connections"), "must be at least 1")),
            Some(m) => *m.get_ref(),
            None => DEFAULT_TCP_MAX_CONNECTIONS,
        };
        out.push(TcpService {
            listen,
            group: group.to_string(),
            upstream: upstream.to_string(),
            addresses,
            idle_timeout: t.idle_timeout.map_or(DEFAULT_TCP_IDLE_TIMEOUT, |d| d.0),
            max_connections,
            proxy_protocol: t.proxy_protocol,
            label: format!("tcp:{listen}"),
        });
    }
    Ok(out)
}
