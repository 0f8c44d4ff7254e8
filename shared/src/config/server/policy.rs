//! The access keys `[[rules]]` and `[[groups]]` share (a group's are the
//! default of its rules): `allow`, `deny`, `basic_auth`, `jwt`,
//! `jwt_claims_to_headers`, `pass_auth` and `rate_limit`. Files they name are read now, and again at every reload.

use crate::config::source::{ConfigError, Source};
use crate::policy::{AddressRules, Htpasswd, JwtPolicy, NetList, Policy, RateKey, RateLimit};
use crate::units::HumanDuration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// `rate_limit = { requests = 100, per = "1s", burst = 200, by = "client_ip" }` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitSection {
    requests: Spanned<u32>,
    per: Option<Spanned<HumanDuration>>,
    burst: Option<Spanned<u32>>,
    by: Option<Spanned<String>>,
}

/// `jwt = { jwks = "keys.json", issuer = "...", audience = "..." }` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JwtSection {
    jwks: PathBuf,
    issuer: Option<String>,
    audience: Option<String>,
}

/// The access keys of one entry, borrowed from its section.
pub(super) struct PolicyKeys<'a> {
    pub(super) allow: &'a Option<Spanned<Vec<String>>>,
    pub(super) deny: &'a Option<Spanned<Vec<String>>>,
    pub(super) basic_auth: &'a Option<Spanned<PathBuf>>,
    pub(super) jwt: &'a Option<Spanned<JwtSection>>,
    pub(super) jwt_claims_to_headers: &'a Option<Spanned<BTreeMap<String, String>>>,
    pub(super) pass_auth: Option<bool>,
    pub(super) rate_limit: &'a Option<Spanned<RateLimitSection>>,
}

/// Shortest `per`: a finer one is a typo, and the limiter's clock is in ms.
const MIN_RATE_PER: Duration = Duration::from_millis(1);
/// Longest `per`, and longest refill of a full bucket.
const MAX_RATE_PER: Duration = Duration::from_secs(365 * 86_400);

/// The entry's policy: each key it sets replaces `base`'s (its group's, or
/// none); `entry` names it in errors ("rules[2]").
pub(super) fn check(src: &Source, keys: PolicyKeys, entry: &str, base: &Policy) -> Result<Policy, ConfigError> {
    let key = |k: &str| format!("{entry}.{k}");
    let nets =
        |list: &Spanned<Vec<String>>, k: &str| NetList::parse(list.get_ref()).map_err(|m| src.at(list, key(k), m));
    let mut policy = base.clone();
    if let Some(allow) = keys.allow {
        policy.addresses = AddressRules { allow: nets(allow, "allow")?, ..policy.addresses };
    }
    if let Some(deny) = keys.deny {
        policy.addresses = AddressRules { deny: nets(deny, "deny")?, ..policy.addresses };
    }
    // Both read the Authorization header: an entry sets one, and the one it
    // sets replaces whichever its group had.
    if let (Some(_), Some(j)) = (keys.basic_auth, keys.jwt) {
        return Err(src.at(j, key("jwt"), "basic_auth and jwt both read the Authorization header: choose one"));
    }
    if let Some(path) = keys.basic_auth {
        policy.jwt = None;
        let htpasswd = Htpasswd::load(path.get_ref()).map_err(|e| src.at(path, key("basic_auth"), e.to_string()))?;
        policy.basic_auth = Some(Arc::new(htpasswd));
    }
    if let Some(j) = keys.jwt {
        policy.basic_auth = None;
        let JwtSection { jwks, issuer, audience } = j.get_ref();
        let claims = policy.jwt.as_ref().map(|p| p.claims_to_headers.clone()).unwrap_or_default();
        let loaded =
            JwtPolicy::load(jwks, issuer.clone(), audience.clone(), claims).map_err(|m| src.at(j, key("jwt"), m))?;
        policy.jwt = Some(Arc::new(loaded));
    }
    if let Some(map) = keys.jwt_claims_to_headers {
        let Some(jwt) = &policy.jwt else {
            return Err(src.at(map, key("jwt_claims_to_headers"), "needs jwt (here or on the group)"));
        };
        let mut claims = Vec::new();
        for (claim, name) in map.get_ref() {
            let header = http::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| src.at(map, key("jwt_claims_to_headers"), format!("{name:?} is not a header name")))?;
            claims.push((claim.clone(), header));
        }
        policy.jwt = Some(Arc::new(jwt.with_claims(claims)));
    }
    if let Some(pass) = keys.pass_auth {
        policy.pass_auth = pass;
    }
    if let Some(limit) = keys.rate_limit {
        policy.rate_limit = Some(rate_limit(src, limit.get_ref(), &key("rate_limit"))?);
    }
    Ok(policy)
}

fn rate_limit(src: &Source, r: &RateLimitSection, key: &str) -> Result<RateLimit, ConfigError> {
    let Some(requests) = NonZeroU32::new(*r.requests.get_ref()) else {
        return Err(src.at(&r.requests, format!("{key}.requests"), "must be at least 1"));
    };
    let per = match &r.per {
        None => Duration::from_secs(1),
        Some(p) if p.get_ref().0 < MIN_RATE_PER => {
            return Err(src.at(p, format!("{key}.per"), "must be at least 1ms"));
        }
        Some(p) => p.get_ref().0,
    };
    if (per / requests.get()).is_zero() {
        return Err(src.at(&r.requests, format!("{key}.requests"), "more than one request per nanosecond"));
    }
    let burst = match &r.burst {
        None => requests,
        Some(b) => {
            NonZeroU32::new(*b.get_ref()).ok_or_else(|| src.at(b, format!("{key}.burst"), "must be at least 1"))?
        }
    };
    // The bucket's depth in time (a token's period x burst) must fit the
    // limiter's nanosecond clock with room to spare: past a year it is a typo.
    let depth = (per / requests.get()).as_nanos() * u128::from(burst.get());
    if per > MAX_RATE_PER || depth > MAX_RATE_PER.as_nanos() {
        let at = r.burst.as_ref().map_or(r.requests.span().start, |b| b.span().start);
        let why = "per, and per / requests x burst (the time a full bucket takes to refill), must be at most 365 days";
        return Err(src.error(Some(at), key.to_string(), why));
    }
    let by = match &r.by {
        None => RateKey::ClientIp,
        Some(b) => RateKey::parse(b.get_ref()).map_err(|m| src.at(b, format!("{key}.by"), m))?,
    };
    Ok(RateLimit { requests, per, burst, by })
}
