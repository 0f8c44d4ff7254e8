//! `rate_limit`: how many requests a rule takes, per what, in what bursts.

use std::num::NonZeroU32;
use std::time::Duration;

/// What a rate limit counts requests by: one bucket per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// Per public client address (through `trusted_proxies`).
    ClientIp,
    /// One bucket for the whole rule.
    Rule,
    /// Per value of a request header (an API key); requests without it
    /// count by client address.
    Header(http::HeaderName),
}

impl RateKey {
    /// Parses `client_ip`, `rule` or a header name such as `X-Api-Key`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "client_ip" => Ok(RateKey::ClientIp),
            "rule" => Ok(RateKey::Rule),
            other => http::HeaderName::from_bytes(other.as_bytes()).map(RateKey::Header).map_err(|_| {
                format!("{other:?} is neither \"client_ip\", \"rule\" nor a header name such as \"X-Api-Key\"")
            }),
        }
    }
}

/// A checked `rate_limit`: `requests` per `per` sustained, `burst` at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: NonZeroU32,
    pub per: Duration,
    /// Requests a full bucket lets through at once (default: `requests`).
    pub burst: NonZeroU32,
    pub by: RateKey,
}

impl RateLimit {
    /// The time one request's token takes to come back.
    pub fn period(&self) -> Duration {
        self.per / self.requests.get()
    }
}
