//! `[[rules]]`: which group and upstream serve a request, by host and path.

use super::groups::GroupSettings;
use super::policy::{self, JwtSection, PolicyKeys, RateLimitSection};
use crate::config::defaults::{DEFAULT_IDLE_TIMEOUT, DEFAULT_RULE_TIMEOUT, MAX_CAPTURE_BODIES};
use crate::config::source::{join, ConfigError, Source};
use crate::rules::{HostPattern, Rule, RuleProblem, RuleSet};
use crate::units::{ByteSize, HumanDuration};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::PathBuf;
use toml::Spanned;

/// A `[[rules]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleSection {
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    group: Spanned<String>,
    upstream: Spanned<String>,
    timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    max_body: Option<Spanned<ByteSize>>,
    capture_bodies: Option<Spanned<ByteSize>>,
    allow: Option<Spanned<Vec<String>>>,
    deny: Option<Spanned<Vec<String>>>,
    basic_auth: Option<Spanned<PathBuf>>,
    jwt: Option<Spanned<JwtSection>>,
    jwt_claims_to_headers: Option<Spanned<BTreeMap<String, String>>>,
    pass_auth: Option<bool>,
    rate_limit: Option<Spanned<RateLimitSection>>,
}

/// Checks each rule, that it names one of `groups`, and that none is a
/// duplicate of or shadowed by an earlier one (it would never match).
pub(super) fn check(src: &Source, raw: &[RuleSection], groups: &[GroupSettings]) -> Result<RuleSet, ConfigError> {
    let names: BTreeSet<String> = groups.iter().map(|g| g.name.clone()).collect();
    let mut rules = Vec::new();
    let mut rule_lines = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = |k: &str| format!("rules[{i}].{k}");
        let host = match &r.host {
            None => HostPattern::Any,
            Some(h) => HostPattern::parse(h.get_ref()).map_err(|m| src.at(h, key("host"), m))?,
        };
        let path_prefix = match &r.path_prefix {
            None => "/".to_string(),
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(src.at(p, key("path_prefix"), "must start with '/'"))
            }
            Some(p) => p.get_ref().clone(),
        };
        let group = r.group.get_ref().trim();
        if !names.contains(group) {
            return Err(src.at(
                &r.group,
                key("group"),
                format!("no group named {group:?} (defined: {})", join(&names)),
            ));
        }
        let upstream = r.upstream.get_ref().trim();
        if upstream.is_empty() {
            return Err(src.at(&r.upstream, key("upstream"), "upstream name is empty"));
        }
        let capture_bodies = match &r.capture_bodies {
            Some(c) if c.get_ref().0 == 0 || c.get_ref().0 > MAX_CAPTURE_BODIES => {
                let why =
                    format!("must be between 1 byte and {} KiB (omit it to keep no bodies)", MAX_CAPTURE_BODIES >> 10);
                return Err(src.at(c, key("capture_bodies"), why));
            }
            c => c.as_ref().map(|c| c.get_ref().0),
        };
        let keys = PolicyKeys {
            allow: &r.allow,
            deny: &r.deny,
            basic_auth: &r.basic_auth,
            jwt: &r.jwt,
            jwt_claims_to_headers: &r.jwt_claims_to_headers,
            pass_auth: r.pass_auth,
            rate_limit: &r.rate_limit,
        };
        let base = groups.iter().find(|g| g.name == group).map(|g| &g.policy);
        let policy = policy::check(src, keys, &format!("rules[{i}]"), base.unwrap_or(&Default::default()))?;
        rules.push(Rule {
            host,
            path_prefix,
            group: group.to_string(),
            upstream: upstream.to_string(),
            timeout: r.timeout.map_or(DEFAULT_RULE_TIMEOUT, |d| d.0),
            idle_timeout: r.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            max_body: r.max_body.as_ref().map(|b| b.get_ref().0),
            capture_bodies,
            policy,
            label: String::new(),
        });
        rule_lines.push(r.group.span().start);
    }
    let rules = RuleSet::new(rules);
    if let Some(p) = rules.problems().first() {
        let (i, msg) = match *p {
            RuleProblem::Duplicate { rule, earlier } => {
                (rule, format!("duplicate of rules[{earlier}] (same host and path_prefix)"))
            }
            RuleProblem::Unreachable { rule, earlier } => {
                (rule, format!("unreachable: rules[{earlier}] matches every request it would"))
            }
        };
        return Err(src.error(Some(rule_lines[i]), format!("rules[{i}]"), msg));
    }
    Ok(rules)
}
