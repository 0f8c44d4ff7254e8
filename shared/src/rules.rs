//! The rules engine: which group (and which of its upstreams) serves a public
//! request, decided by host and path prefix; ordered, first match wins.

use std::time::Duration;

/// The host part of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// No `host` key: any host.
    Any,
    /// An exact host name, lower case.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (one or more labels
    /// before it), not `example.com` itself. Holds ".example.com".
    Wildcard(String),
}

impl HostPattern {
    /// Parses `example.com` or `*.example.com`; rejects ports, schemes and other globs.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if s.is_empty() {
            return Err("empty host; omit the key to match any host".into());
        }
        let (wild, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        let valid_label =
            |l: &str| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name.split('.').all(valid_label) {
            return Err(format!(
                "invalid host {s:?}: write a host name such as \"app.example.com\" or \"*.example.com\" (no port, no scheme)"
            ));
        }
        Ok(if wild { HostPattern::Wildcard(format!(".{name}")) } else { HostPattern::Exact(name.to_string()) })
    }

    /// Whether `host` (already normalized by [`normalize_host`]) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }

    /// Whether every host this pattern's `other` matches is matched by `self`.
    pub fn covers(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Any, _) => true,
            (_, HostPattern::Any) => false,
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Exact(_), HostPattern::Wildcard(_)) => false,
            (HostPattern::Wildcard(_), HostPattern::Exact(b)) => self.matches(b),
            (HostPattern::Wildcard(a), HostPattern::Wildcard(b)) => b.ends_with(a.as_str()),
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

/// Lower-cases a Host / :authority value and strips its port and trailing dot.
pub fn normalize_host(authority: &str) -> String {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split(']').next().unwrap_or_default()
    } else {
        a.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map_or(a, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// One routing rule, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub host: HostPattern,
    /// Plain string prefix of the path (as nginx's prefix locations).
    pub path_prefix: String,
    pub group: String,
    /// An upstream name known to the group's clients.
    pub upstream: String,
    /// Bounds the wait for the upstream's response head.
    pub timeout: Duration,
    /// After the head, an exchange silent in both directions this long is closed.
    pub idle_timeout: Duration,
    /// A request body larger than this gets 413; None = no limit (memory
    /// stays bounded by the exchange window whatever the size).
    pub max_body: Option<u64>,
    /// Keep the first this-many bytes of each request and response body for
    /// the console's inspector; None = no bodies kept (they are private).
    pub capture_bodies: Option<u64>,
    /// Who may use the rule, and how often (its own keys, else its group's).
    pub policy: crate::policy::Policy,
    /// How the console and the traffic series name the rule: its host
    /// pattern and path prefix, "app.example.com/api" or "*/". Set by
    /// [`RuleSet::new`], made once rather than per request.
    pub label: String,
}

impl Rule {
    /// Whether this rule serves `host` (normalized) and `path`.
    pub fn matches(&self, host: &str, path: &str) -> bool {
        path.starts_with(self.path_prefix.as_str()) && self.host.matches(host)
    }

    /// Whether every request this rule's `later` serves would be taken by `self` first.
    pub fn shadows(&self, later: &Rule) -> bool {
        self.host.covers(&later.host) && later.path_prefix.starts_with(self.path_prefix.as_str())
    }
}

/// Why a rule can never match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleProblem {
    /// Same host and prefix as an earlier rule.
    Duplicate { rule: usize, earlier: usize },
    /// An earlier rule matches everything this one would.
    Unreachable { rule: usize, earlier: usize },
}

/// The ordered rules; first match wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// Every header any rule's `jwt_claims_to_headers` sets: only the
    /// tunnel writes them, so they are removed from every public request.
    claim_headers: Vec<http::HeaderName>,
}

impl RuleSet {
    /// Wraps rules in their order, naming each.
    pub fn new(mut rules: Vec<Rule>) -> Self {
        for r in &mut rules {
            r.label = format!("{}{}", r.host, r.path_prefix);
        }
        let mut claim_headers: Vec<http::HeaderName> = rules
            .iter()
            .filter_map(|r| r.policy.jwt.as_ref())
            .flat_map(|j| j.claims_to_headers.iter().map(|(_, h)| h.clone()))
            .collect();
        claim_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        claim_headers.dedup();
        RuleSet { rules, claim_headers }
    }

    /// The headers only the tunnel may set (see the field).
    pub fn claim_headers(&self) -> &[http::HeaderName] {
        &self.claim_headers
    }

    /// The first rule that serves `host` (normalized) and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(host, path))
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Rules that can never match (indexes are 0-based).
    pub fn problems(&self) -> Vec<RuleProblem> {
        let mut out = Vec::new();
        for (i, later) in self.rules.iter().enumerate() {
            if let Some(j) = self.rules[..i].iter().position(|e| e.shadows(later)) {
                let e = &self.rules[j];
                out.push(if e.host == later.host && e.path_prefix == later.path_prefix {
                    RuleProblem::Duplicate { rule: i, earlier: j }
                } else {
                    RuleProblem::Unreachable { rule: i, earlier: j }
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: &str, prefix: &str, group: &str) -> Rule {
        Rule {
            host: if host.is_empty() { HostPattern::Any } else { HostPattern::parse(host).expect("test host") },
            path_prefix: prefix.into(),
            group: group.into(),
            upstream: "web".into(),
            timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_body: None,
            capture_bodies: None,
            policy: Default::default(),
            label: String::new(),
        }
    }

    /// Hosts match exactly or by wildcard suffix, case-insensitively, without port.
    #[test]
    fn host_patterns() {
        struct Case {
            pattern: &'static str,
            host: &'static str,
            matches: bool,
        }
        let cases = [
            Case { pattern: "a.example.com", host: "a.example.com", matches: true },
            Case { pattern: "a.example.com", host: "b.example.com", matches: false },
            Case { pattern: "*.example.com", host: "a.example.com", matches: true },
            Case { pattern: "*.example.com", host: "x.a.example.com", matches: true },
            Case { pattern: "*.example.com", host: "example.com", matches: false },
            Case { pattern: "*.example.com", host: "badexample.com", matches: false },
            Case { pattern: "*.localhost", host: "app.localhost", matches: true },
        ];
        for c in cases {
            let p = HostPattern::parse(c.pattern).expect("valid");
            assert_eq!(p.matches(&normalize_host(c.host)), c.matches, "{} vs {}", c.pattern, c.host);
        }
        assert_eq!(normalize_host("App.Example.COM:8080"), "app.example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert!(HostPattern::parse("http://x").is_err());
        assert!(HostPattern::parse("x.com:80").is_err());
        assert!(HostPattern::parse("a.*.com").is_err());
    }

    /// First match wins; host and prefix both decide.
    #[test]
    fn first_match_wins() {
        let set = RuleSet::new(vec![
            rule("api.example.com", "/v2", "v2"),
            rule("api.example.com", "/", "api"),
            rule("*.example.com", "/", "wild"),
            rule("", "/", "default"),
        ]);
        let g = |h: &str, p: &str| set.route(&normalize_host(h), p).map(|r| r.group.clone());
        assert_eq!(g("api.example.com", "/v2/x").as_deref(), Some("v2"));
        assert_eq!(g("API.example.com:443", "/v1").as_deref(), Some("api"));
        assert_eq!(g("www.example.com", "/").as_deref(), Some("wild"));
        assert_eq!(g("other.org", "/x").as_deref(), Some("default"));
        assert!(set.problems().is_empty());
    }

    /// Duplicate and shadowed rules are reported with the earlier rule that hides them.
    #[test]
    fn shadowed_rules_are_reported() {
        let set = RuleSet::new(vec![
            rule("*.example.com", "/", "a"),
            rule("x.example.com", "/api", "b"),
            rule("*.example.com", "/", "c"),
            rule("other.org", "/", "d"),
        ]);
        assert_eq!(
            set.problems(),
            vec![RuleProblem::Unreachable { rule: 1, earlier: 0 }, RuleProblem::Duplicate { rule: 2, earlier: 0 },]
        );
    }
}
