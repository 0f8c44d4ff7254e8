//! `[[groups]]`: the groups of clients and the settings pushed to them.

use super::policy::{self, JwtSection, PolicyKeys, RateLimitSection};
use crate::config::defaults::*;
use crate::config::ranged::{self, Bound::*};
use crate::config::secret::Secret;
use crate::config::source::{ConfigError, Source};
use crate::frame::{DEFAULT_EXCHANGE_WINDOW, MAX_EXCHANGE_WINDOW, MIN_EXCHANGE_WINDOW};
use crate::policy::Policy;
use crate::units::{ByteSize, HumanDuration};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// A `[[groups]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupSection {
    name: Spanned<String>,
    token: Spanned<Secret>,
    heartbeat_interval: Option<Spanned<HumanDuration>>,
    data_streams: Option<Spanned<u32>>,
    exchange_window: Option<Spanned<ByteSize>>,
    max_in_flight: Option<Spanned<u32>>,
    max_requests_per_second: Option<Spanned<u32>>,
    allow: Option<Spanned<Vec<String>>>,
    deny: Option<Spanned<Vec<String>>>,
    basic_auth: Option<Spanned<PathBuf>>,
    jwt: Option<Spanned<JwtSection>>,
    jwt_claims_to_headers: Option<Spanned<BTreeMap<String, String>>>,
    pass_auth: Option<bool>,
    rate_limit: Option<Spanned<RateLimitSection>>,
}

/// One group of clients and what the server manages for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSettings {
    pub name: String,
    pub token: Secret,
    pub heartbeat_interval: Duration,
    /// A stream silent this long is reaped (`[server] heartbeat_timeout`,
    /// default 3 x the group's interval).
    pub heartbeat_timeout: Duration,
    pub data_streams: u32,
    /// Credit per exchange and direction, bytes.
    pub exchange_window: u32,
    /// Requests in flight to one client of the group past which new ones get 503.
    pub max_in_flight: u32,
    /// Requests a second the whole group may be sent; past it, 503. None = no limit.
    pub max_requests_per_second: Option<NonZeroU32>,
    /// The access policy of the group's rules, where a rule sets none of its own.
    pub policy: Policy,
}

/// Checks the groups: unique names, tokens, and the settings pushed to their
/// clients. `heartbeat_timeout` is the `[server]` key, checked here because
/// it must exceed every group's interval.
pub(super) fn check(
    src: &Source,
    raw: &[GroupSection],
    heartbeat_timeout: Option<&Spanned<HumanDuration>>,
) -> Result<Vec<GroupSettings>, ConfigError> {
    let mut groups = Vec::new();
    let mut names = BTreeSet::new();
    for (i, g) in raw.iter().enumerate() {
        let key = |k: &str| format!("groups[{i}].{k}");
        let name = g.name.get_ref().trim();
        if name.is_empty() {
            return Err(src.at(&g.name, key("name"), "group name is empty"));
        }
        if !names.insert(name.to_string()) {
            return Err(src.at(&g.name, key("name"), format!("group {name:?} is defined twice")));
        }
        if g.token.get_ref().expose().is_empty() {
            return Err(src.at(&g.token, key("token"), "token is empty"));
        }
        let interval = ranged::value(
            src,
            &g.heartbeat_interval,
            key("heartbeat_interval"),
            DEFAULT_HEARTBEAT_INTERVAL,
            Min(MIN_HEARTBEAT_INTERVAL),
        )?;
        let timeout = match heartbeat_timeout {
            Some(t) if t.get_ref().0 <= interval => {
                return Err(src.at(
                    t,
                    "server.heartbeat_timeout",
                    format!(
                        "must be longer than group {name:?}'s heartbeat_interval ({})",
                        humantime::format_duration(interval)
                    ),
                ))
            }
            Some(t) => t.get_ref().0,
            None => interval * 3,
        };
        let data_streams =
            ranged::value(src, &g.data_streams, key("data_streams"), DEFAULT_DATA_STREAMS, Range(1, MAX_DATA_STREAMS))?;
        let exchange_window = ranged::value(
            src,
            &g.exchange_window,
            key("exchange_window"),
            u64::from(DEFAULT_EXCHANGE_WINDOW),
            Range(u64::from(MIN_EXCHANGE_WINDOW), u64::from(MAX_EXCHANGE_WINDOW)),
        )?;
        let max_in_flight = ranged::value(src, &g.max_in_flight, key("max_in_flight"), DEFAULT_MAX_IN_FLIGHT, Min(1))?;
        let max_requests_per_second = match &g.max_requests_per_second {
            None => None,
            Some(m) => Some(NonZeroU32::new(*m.get_ref()).ok_or_else(|| {
                src.at(m, key("max_requests_per_second"), "must be at least 1 (omit it for no limit)")
            })?),
        };
        let keys = PolicyKeys {
            allow: &g.allow,
            deny: &g.deny,
            basic_auth: &g.basic_auth,
            jwt: &g.jwt,
            jwt_claims_to_headers: &g.jwt_claims_to_headers,
            pass_auth: g.pass_auth,
            rate_limit: &g.rate_limit,
        };
        let policy = policy::check(src, keys, &format!("groups[{i}]"), &Policy::default())?;
        groups.push(GroupSettings {
            name: name.to_string(),
            token: g.token.get_ref().clone(),
            heartbeat_interval: interval,
            heartbeat_timeout: timeout,
            data_streams,
            // At most MAX_EXCHANGE_WINDOW, a u32.
            exchange_window: exchange_window as u32,
            max_in_flight,
            max_requests_per_second,
            policy,
        });
    }
    Ok(groups)
}
