//! Who may use a rule, checked before a request goes to any client: the
//! public client's address (`allow`/`deny`, through `trusted_proxies`),
//! credentials (`basic_auth` users, `jwt` bearer tokens) and request rates
//! (`rate_limit`). The settings are parsed and the checks that need no
//! state are made here; the server's `gate` holds the state (rate buckets,
//! verified credentials) and answers refusals.

pub mod address;
pub mod htpasswd;
pub mod jwt;
pub mod rate;

pub use address::{client_address, AddressRules, ForwardedHeader, NetList};
pub use htpasswd::{Htpasswd, HtpasswdError};
pub use jwt::JwtPolicy;
pub use rate::{RateKey, RateLimit};

use std::sync::Arc;

/// A rule's access policy: its own keys, else its group's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub addresses: AddressRules,
    pub basic_auth: Option<Arc<Htpasswd>>,
    pub jwt: Option<Arc<JwtPolicy>>,
    /// Whether the `Authorization` header that passed `basic_auth` or `jwt`
    /// goes on to the upstream (default: stripped).
    pub pass_auth: bool,
    pub rate_limit: Option<RateLimit>,
}

impl Policy {
    /// Whether the policy checks nothing: the request path skips the gate.
    pub fn is_open(&self) -> bool {
        self.addresses.is_open() && self.basic_auth.is_none() && self.jwt.is_none() && self.rate_limit.is_none()
    }
}

/// Why the gate refused a request: the metric's `reason` label and the
/// Requests view's filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 403: the client address is denied or not allowed.
    Address,
    /// 401: no or wrong credentials (`basic_auth`).
    BasicAuth,
    /// 401: no, invalid or expired token (`jwt`).
    Jwt,
    /// 429: the rule's `rate_limit`.
    RateLimit,
    /// 503: the group's `max_requests_per_second`.
    GroupRate,
}

impl Refusal {
    /// The label value: `address`, `basic_auth`, `jwt`, `rate_limit`, `group_rate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Address => "address",
            Refusal::BasicAuth => "basic_auth",
            Refusal::Jwt => "jwt",
            Refusal::RateLimit => "rate_limit",
            Refusal::GroupRate => "group_rate",
        }
    }
}
