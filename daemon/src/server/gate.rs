//! The gate: a rule's access policy applied to a request that matched it,
//! before it goes to any client. In order: the client's address (`allow`,
//! `deny`), its rate (`rate_limit`, checked before credentials so that
//! password guessing is rate limited too), its credentials (`basic_auth` or
//! `jwt`), and the group's rate (`max_requests_per_second`, which only admitted
//! requests count against). A refusal is answered here, at no cost to
//! clients. The state lives here: rate buckets, kept across reloads that
//! leave a limit's settings alone, and credentials verified recently.

use governor::clock::{Clock, MonotonicClock};
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use lru::LruCache;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tunnel_lib::config::{GroupSettings, ServerConfig};
use tunnel_lib::policy::jwt::{claim_value, Claims, LEEWAY_SECS};
use tunnel_lib::policy::{Htpasswd, JwtPolicy, RateKey, RateLimit, Refusal};
use tunnel_lib::rules::Rule;

/// Credentials remembered as verified (a digest of each, never the
/// password): a browser sends them with every request, and each check
/// costs a bcrypt or argon2 run.
const VERIFIED_CACHE: usize = 4096;
/// How long a request waits for its turn at a password check before it is
/// answered 503: a flood of guesses must not hold requests without bound.
const VERIFY_WAIT: Duration = Duration::from_secs(2);

/// A request the gate refused: its status, reason and extra headers.
#[derive(Debug)]
pub struct Refused {
    pub refusal: Refusal,
    pub status: StatusCode,
    pub reason: String,
    /// `WWW-Authenticate` on 401, `Retry-After` on 429 and 503.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Refused {
    fn new(refusal: Refusal, status: StatusCode, reason: String) -> Self {
        Refused { refusal, status, reason, headers: Vec::new() }
    }

    fn retry_after(mut self, wait: Duration) -> Self {
        // Whole seconds, rounded up: a client that waits that long gets in.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.headers.push((header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
        self
    }
}

/// What the gate adds to an admitted request: the verified claims, as the
/// headers `jwt_claims_to_headers` names. They are set after the headers
/// are sanitized, so that nothing the client sends (`Connection` naming
/// them) can remove them.
#[derive(Debug, Default)]
pub struct Admitted {
    pub claims: Vec<(HeaderName, HeaderValue)>,
}

/// The gate's state: see the module.
pub struct Gate {
    /// Each rule's buckets, by its label (unique: duplicate rules are refused).
    rules: Mutex<HashMap<String, Arc<Limiter>>>,
    /// Each group's one bucket, by its name.
    groups: Mutex<HashMap<String, Arc<Limiter>>>,
    /// Keys rate-limit buckets and verified credentials with a secret seed,
    /// so that a client cannot aim a collision at another's bucket.
    hasher: RandomState,
    verified: Mutex<LruCache<u64, ()>>,
    /// Bearer tokens verified recently, by a seeded digest of the policy's
    /// fingerprint and the token: a client sends the same token with every
    /// request, and checking its signature cost more than the rest of the
    /// request (docs/benchmarks.md). Their `exp` and `nbf` are checked on
    /// every use.
    tokens: Mutex<LruCache<u64, Arc<VerifiedToken>>>,
    verifying: Arc<tokio::sync::Semaphore>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            rules: Mutex::default(),
            groups: Mutex::default(),
            hasher: RandomState::new(),
            verified: Mutex::new(LruCache::new(NonZeroUsize::new(VERIFIED_CACHE).unwrap_or(NonZeroUsize::MIN))),
            tokens: Mutex::new(LruCache::new(NonZeroUsize::new(VERIFIED_CACHE).unwrap_or(NonZeroUsize::MIN))),
            // One check per core at once, on blocking threads: failed
            // guesses cannot take more than the machine.
            verifying: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            )),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a request to `rule` of `group` has anything to check: most
/// rules have no policy, and their requests skip the gate altogether.
pub fn applies(rule: &Rule, group: Option<&GroupSettings>) -> bool {
    !rule.policy.is_open() || group.is_some_and(|g| g.max_requests_per_second.is_some())
}

impl Gate {
    /// Lets the request through, or says why not. `client` is the public
    /// client's address; `headers` lose the credentials unless `pass_auth`.
    pub async fn admit(
        &self,
        cfg: &ServerConfig,
        rule: &Rule,
        group: Option<&GroupSettings>,
        client: IpAddr,
        headers: &mut HeaderMap,
    ) -> Result<Admitted, Refused> {
        let mut admitted = Admitted::default();
        let policy = &rule.policy;
        if !policy.addresses.admits(client) {
            let why = format!("address {client} may not use this route");
            return Err(Refused::new(Refusal::Address, StatusCode::FORBIDDEN, why));
        }
        if let Some(limit) = &policy.rate_limit {
            let limiter = self.rule_limiter(rule, limit, cfg.server.rate_limit_max_keys);
            limiter.check(self.rate_key(limit, client, headers)).map_err(|wait| {
                let why = format!(
                    "over the rate limit of {} requests per {}",
                    limit.requests,
                    humantime::format_duration(limit.per)
                );
                Refused::new(Refusal::RateLimit, StatusCode::TOO_MANY_REQUESTS, why).retry_after(wait)
            })?;
        }
        if let Some(users) = &policy.basic_auth {
            self.basic_auth(users, &rule.label, headers).await?;
        }
        if let Some(jwt) = &policy.jwt {
            admitted.claims = bearer(self, jwt, &rule.label, headers)?;
        }
        if (policy.basic_auth.is_some() || policy.jwt.is_some()) && !policy.pass_auth {
            headers.remove(header::AUTHORIZATION);
        }
        if let Some((g, n)) = group.and_then(|g| Some((g, g.max_requests_per_second?))) {
            self.group_limiter(&g.name, n).check(0).map_err(|wait| {
                let why = format!("group {:?} takes at most {n} requests a second", g.name);
                Refused::new(Refusal::GroupRate, StatusCode::SERVICE_UNAVAILABLE, why).retry_after(wait)
            })?;
        }
        Ok(admitted)
    }

    /// After a reload: limits whose rule or settings went are dropped (the
    /// rest keep their buckets). Verified credentials stay: they are keyed
    /// by the hash they were checked against, which a changed password or
    /// a removed user no longer matches.
    pub fn reconfigured(&self, cfg: &ServerConfig) {
        let max_keys = cfg.server.rate_limit_max_keys;
        lock(&self.rules).retain(|label, l| {
            cfg.rules
                .rules()
                .iter()
                .any(|r| &r.label == label && r.policy.rate_limit.as_ref().is_some_and(|s| l.is(s, max_keys)))
        });
        lock(&self.groups).retain(|name, l| {
            cfg.group(name).and_then(|g| g.max_requests_per_second).is_some_and(|n| l.is(&group_rate(n), 1))
        });
    }

    /// Keys each keyed rate limit remembers now, by rule.
    pub fn keys(&self) -> Vec<(String, i64)> {
        let rules = lock(&self.rules);
        let mut keys: Vec<_> = rules
            .iter()
            .filter_map(|(label, l)| match &l.buckets {
                Buckets::Keyed(_, store) => Some((label.clone(), store.len() as i64)),
                Buckets::One(_) => None,
            })
            .collect();
        keys.sort();
        keys
    }

    /// The token's claims: remembered if verified before and still within
    /// its times, else verified now (and remembered).
    fn verified_token(&self, jwt: &JwtPolicy, token: &str) -> Result<Arc<Claims>, String> {
        let key = self.hasher.hash_one((jwt.fingerprint(), token));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let cached = lock(&self.tokens).get(&key).cloned();
        if let Some(t) = cached {
            if t.valid_at(now) {
                return Ok(t.claims.clone());
            }
            lock(&self.tokens).pop(&key);
        }
        let claims = Arc::new(jwt.verify(token)?);
        let time = |name: &str| claims.get(name).and_then(serde_json::Value::as_u64);
        let verified = VerifiedToken { exp: time("exp").unwrap_or(0), nbf: time("nbf"), claims: claims.clone() };
        lock(&self.tokens).put(key, Arc::new(verified));
        Ok(claims)
    }

    fn rule_limiter(&self, rule: &Rule, spec: &RateLimit, max_keys: usize) -> Arc<Limiter> {
        let mut rules = lock(&self.rules);
        match rules.get(&rule.label) {
            Some(l) if l.is(spec, max_keys) => l.clone(),
            _ => {
                let l = Arc::new(Limiter::new(spec.clone(), max_keys));
                rules.insert(rule.label.clone(), l.clone());
                l
            }
        }
    }

    fn group_limiter(&self, group: &str, n: NonZeroU32) -> Arc<Limiter> {
        let spec = group_rate(n);
        let mut groups = lock(&self.groups);
        match groups.get(group) {
            Some(l) if l.is(&spec, 1) => l.clone(),
            _ => {
                let l = Arc::new(Limiter::new(spec, 1));
                groups.insert(group.to_string(), l.clone());
                l
            }
        }
    }

    /// The bucket a request counts against, as a seeded hash of its key.
    fn rate_key(&self, limit: &RateLimit, client: IpAddr, headers: &HeaderMap) -> u64 {
        match &limit.by {
            RateKey::Rule => 0,
            RateKey::ClientIp => self.hasher.hash_one(bucket_address(client)),
            RateKey::Header(name) => match headers.get(name) {
                // Tagged apart from addresses: a header's value never shares
                // an address's bucket.
                Some(v) => self.hasher.hash_one((1u8, v.as_bytes())),
                None => self.hasher.hash_one(bucket_address(client)),
            },
        }
    }

    async fn basic_auth(&self, users: &Arc<Htpasswd>, realm: &str, headers: &HeaderMap) -> Result<(), Refused> {
        let challenge = |why: &str| {
            let realm: String = realm.chars().filter(|c| *c != '"' && *c != '\\').collect();
            let value = HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
                .unwrap_or(HeaderValue::from_static("Basic realm=\"tunnel\", charset=\"UTF-8\""));
            let mut r = Refused::new(Refusal::BasicAuth, StatusCode::UNAUTHORIZED, why.to_string());
            r.headers.push((header::WWW_AUTHENTICATE, value));
            r
        };
        let Some((user, password)) = basic_credentials(headers) else {
            return Err(challenge("user and password required"));
        };
        // The credentials and the hash they are checked against, seeded:
        // the cache holds no password, and a changed one misses it.
        let stored = users.hash_of(&user).unwrap_or_default();
        let key = self.hasher.hash_one((&user, &password, stored));
        if !stored.is_empty() && lock(&self.verified).get(&key).is_some() {
            return Ok(());
        }
        let permit = match tokio::time::timeout(VERIFY_WAIT, self.verifying.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                let why = "password checks are busy".to_string();
                let busy = Refused::new(Refusal::BasicAuth, StatusCode::SERVICE_UNAVAILABLE, why);
                return Err(busy.retry_after(Duration::from_secs(1)));
            }
        };
        // A browser's first requests come together: the ones that waited
        // for a turn find the first one's answer here, and hash nothing.
        if !stored.is_empty() && lock(&self.verified).get(&key).is_some() {
            return Ok(());
        }
        let users = users.clone();
        let who = user.clone();
        // Owned by this request, which awaits it; one hash run, bounded.
        let verified = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            users.verify(&who, &password)
        })
        .await
        .unwrap_or(false);
        if !verified {
            // Escaped: the name is the client's, and may hold anything.
            tracing::info!(user = ?user, "basic_auth: wrong user or password");
            return Err(challenge("wrong user or password"));
        }
        lock(&self.verified).put(key, ());
        Ok(())
    }
}

/// Checks the bearer token; the headers `jwt_claims_to_headers` makes of
/// its claims (the client's own values for them never get this far: the
/// ingress drops them from every request).
fn bearer(
    gate: &Gate,
    jwt: &JwtPolicy,
    realm: &str,
    headers: &HeaderMap,
) -> Result<Vec<(HeaderName, HeaderValue)>, Refused> {
    let refuse = |why: String, error: bool| {
        let realm: String = realm.chars().filter(|c| *c != '"' && *c != '\\').collect();
        let value = if error {
            let why: String = why.chars().filter(|c| *c != '"' && *c != '\\').collect();
            format!("Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{why}\"")
        } else {
            format!("Bearer realm=\"{realm}\"")
        };
        let mut r = Refused::new(Refusal::Jwt, StatusCode::UNAUTHORIZED, why);
        r.headers.push((
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Bearer")),
        ));
        r
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_string());
    let Some(token) = token else {
        return Err(refuse("bearer token required".into(), false));
    };
    let claims = gate.verified_token(jwt, &token).map_err(|why| refuse(why, true))?;
    Ok(jwt
        .claims_to_headers
        .iter()
        .filter_map(|(claim, name)| {
            let v = HeaderValue::from_str(&claim_value(claims.get(claim)?)).ok()?;
            Some((name.clone(), v))
        })
        .collect())
}

/// The address a `client_ip` bucket is kept for: an IPv4 address, or an
/// IPv6 address's /64, the least a single site is given, so that one
/// client cannot take a fresh bucket per request from its own prefix.
fn bucket_address(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// A token whose signature, issuer and audience were verified, with the
/// times it is valid between.
struct VerifiedToken {
    exp: u64,
    nbf: Option<u64>,
    claims: Arc<Claims>,
}

impl VerifiedToken {
    /// Whether it is valid at `now` (unix seconds), with the verifier's leeway.
    fn valid_at(&self, now: u64) -> bool {
        now <= self.exp.saturating_add(LEEWAY_SECS) && self.nbf.is_none_or(|nbf| nbf <= now.saturating_add(LEEWAY_SECS))
    }
}

/// `Authorization: Basic base64(user:password)`, decoded.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, Vec<u8>)> {
    use base64::Engine as _;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = std::str::from_utf8(&decoded[..colon]).ok()?.to_string();
    Some((user, decoded[colon + 1..].to_vec()))
}

/// A group's `max_requests_per_second` as a limit: one bucket, a second's worth.
fn group_rate(n: NonZeroU32) -> RateLimit {
    RateLimit { requests: n, per: Duration::from_secs(1), burst: n, by: RateKey::Rule }
}

/// One limit's buckets (GCRA, from governor): one for `by = "rule"`,
/// else one per key, at most `max_keys` of them.
struct Limiter {
    spec: RateLimit,
    max_keys: usize,
    buckets: Buckets,
    clock: MonotonicClock,
}

enum Buckets {
    One(RateLimiter<NotKeyed, InMemoryState, MonotonicClock>),
    /// With a handle on the store the limiter owns, to count its keys.
    Keyed(RateLimiter<u64, BoundedStore, MonotonicClock>, BoundedStore),
}

impl Limiter {
    fn new(spec: RateLimit, max_keys: usize) -> Self {
        let clock = MonotonicClock;
        // The config check makes the period at least a nanosecond.
        let quota = Quota::with_period(spec.period()).unwrap_or_else(|| Quota::per_second(spec.requests));
        let quota = quota.allow_burst(spec.burst);
        let buckets = match spec.by {
            RateKey::Rule => Buckets::One(RateLimiter::direct_with_clock(quota, clock.clone())),
            _ => {
                let store = BoundedStore::new(max_keys);
                Buckets::Keyed(RateLimiter::new(quota, store.clone(), clock.clone()), store)
            }
        };
        Limiter { spec, max_keys, buckets, clock }
    }

    /// Whether this limiter is the one `spec` and `max_keys` would make.
    fn is(&self, spec: &RateLimit, max_keys: usize) -> bool {
        self.spec == *spec && (matches!(self.buckets, Buckets::One(_)) || self.max_keys == max_keys)
    }

    /// Takes a token from `key`'s bucket, or says how long until one is back.
    fn check(&self, key: u64) -> Result<(), Duration> {
        let outcome = match &self.buckets {
            Buckets::One(l) => l.check(),
            Buckets::Keyed(l, _) => l.check_key(&key),
        };
        outcome.map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// Keyed buckets in a bounded map: past `max_keys` the least recently seen
/// key is forgotten (its client starts again with a full bucket), so that
/// an attacker rotating addresses or keys cannot grow it. The key that
/// keeps hitting a limit is recently seen and is not the one forgotten.
#[derive(Clone)]
struct BoundedStore(Arc<Mutex<LruCache<u64, Nanos>>>);

impl BoundedStore {
    fn new(max_keys: usize) -> Self {
        let cap = NonZeroUsize::new(max_keys).unwrap_or(NonZeroUsize::MIN);
        BoundedStore(Arc::new(Mutex::new(LruCache::new(cap))))
    }

    fn len(&self) -> usize {
        lock(&self.0).len()
    }
}

impl StateStore for BoundedStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut buckets = lock(&self.0);
        let (outcome, next) = f(buckets.get(key).copied())?;
        buckets.put(*key, next);
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32, per_ms: u64, burst: u32, by: RateKey) -> RateLimit {
        RateLimit {
            requests: NonZeroU32::new(requests).expect("nonzero"),
            per: Duration::from_millis(per_ms),
            burst: NonZeroU32::new(burst).expect("nonzero"),
            by,
        }
    }

    #[test]
    fn a_burst_passes_then_the_rest_wait_their_period() {
        let l = Limiter::new(limit(10, 1000, 5, RateKey::ClientIp), 100);
        for _ in 0..5 {
            assert!(l.check(1).is_ok());
        }
        let wait = l.check(1).expect_err("burst spent");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        // Another key has its own bucket.
        assert!(l.check(2).is_ok());
        // One bucket for the rule: keys do not matter.
        let one = Limiter::new(limit(1, 1000, 1, RateKey::Rule), 100);
        assert!(one.check(1).is_ok());
        assert!(one.check(2).is_err());
    }

    #[test]
    fn the_keyed_store_is_bounded_and_forgets_the_least_recent() {
        let l = Limiter::new(limit(1, 60_000, 1, RateKey::ClientIp), 3);
        assert!(l.check(7).is_ok());
        for k in 100..200 {
            // The limited key keeps coming back: it is never the one forgotten.
            assert!(l.check(7).is_err(), "key 7 forgotten at {k}");
            let _ = l.check(k);
        }
        let Buckets::Keyed(_, store) = &l.buckets else { panic!("keyed") };
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn remembered_tokens_keep_their_times() {
        let t = VerifiedToken { exp: 1000, nbf: Some(500), claims: Arc::default() };
        assert!(t.valid_at(700));
        assert!(t.valid_at(1000 + LEEWAY_SECS), "leeway past exp");
        assert!(!t.valid_at(1001 + LEEWAY_SECS), "expired while remembered");
        assert!(t.valid_at(500 - LEEWAY_SECS), "leeway before nbf");
        assert!(!t.valid_at(499 - LEEWAY_SECS), "not yet valid");
    }

    #[test]
    fn ipv6_clients_share_their_64s_bucket() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(bucket_address(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(bucket_address(ip("2001:db8:1:2:ffff::9")), bucket_address(ip("2001:db8:1:2::7")));
        assert_ne!(bucket_address(ip("2001:db8:1:3::1")), bucket_address(ip("2001:db8:1:2::1")));
        assert_eq!(bucket_address(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(bucket_address(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn retry_after_is_rounded_up_to_whole_seconds() {
        let r = Refused::new(Refusal::RateLimit, StatusCode::TOO_MANY_REQUESTS, String::new());
        let r = r.retry_after(Duration::from_millis(1200));
        assert_eq!(r.headers[0].1, "2");
        let r = Refused::new(Refusal::RateLimit, StatusCode::TOO_MANY_REQUESTS, String::new());
        assert_eq!(r.retry_after(Duration::from_millis(3)).headers[0].1, "1");
    }

    #[test]
    fn basic_credentials_decode() {
        let mut h = HeaderMap::new();
        assert!(basic_credentials(&h).is_none());
        // "alice:wonder:land" — the password may hold colons.
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("basic YWxpY2U6d29uZGVyOmxhbmQ="));
        assert_eq!(basic_credentials(&h), Some(("alice".to_string(), b"wonder:land".to_vec())));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert!(basic_credentials(&h).is_none());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert!(basic_credentials(&h).is_none());
    }
}
