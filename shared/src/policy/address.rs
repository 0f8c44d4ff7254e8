//! Public client addresses: the networks `allow`, `deny` and
//! `trusted_proxies` list, and the client's address when a trusted proxy
//! (a load balancer) stands between it and the server.

use http::HeaderMap;
use ipnet::IpNet;
use std::net::IpAddr;

/// Parses `10.0.0.0/8`, `2001:db8::/32` or a single address (`192.0.2.7`).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip.to_canonical()));
    }
    let net: IpNet = s.parse().map_err(|_| {
        format!("{s:?} is not an address or a CIDR network such as \"10.0.0.0/8\" or \"2001:db8::/32\"")
    })?;
    // "10.0.0.1/8" is most likely a typo for one of two intents: ask.
    if net.trunc() != net {
        return Err(format!("{s:?} has bits set past its prefix: write {} for the network", net.trunc()));
    }
    Ok(net)
}

/// A list of networks; an address is in it when one of them contains it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetList(Vec<IpNet>);

impl NetList {
    /// Parses each item with [`parse_net`]; the error names the bad one.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, String> {
        items.iter().map(|s| parse_net(s.as_ref())).collect::<Result<Vec<_>, _>>().map(NetList)
    }

    /// Whether a network of the list contains `ip` (an IPv4-mapped IPv6
    /// address counts as the IPv4 address it carries).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// Whether it lists no network.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `allow` and `deny` of a rule: deny wins; a non-empty allow admits only
/// its networks; both empty admit everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressRules {
    pub allow: NetList,
    pub deny: NetList,
}

impl AddressRules {
    /// Whether the client at `ip` may use the rule.
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && (self.allow.is_empty() || self.allow.contains(ip))
    }

    /// Whether neither list names a network: nothing to check.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// The header in which trusted proxies name the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1` (HAProxy's `option forwardfor`, nginx).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for=proxy1`.
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// Hops read from a header at most: a proxy chain is a few hops long, and
/// the header's size is bounded anyway.
const MAX_HOPS: usize = 64;

/// The public client's address. The direct peer, unless it is one of the
/// `trusted` proxies: then the hops `header` lists are walked from the
/// right (the hop the trusted proxy itself appended) to the first address
/// that is not a trusted proxy. Only trusted hops are believed: whatever
/// a client wrote to the left of its own address is never reached. A hop
/// that is not an address ("unknown", garbage) ends the walk at the last
/// trusted proxy, whose address then stands for the client.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &NetList, header: ForwardedHeader) -> IpAddr {
    let mut client = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(client) {
        return client;
    }
    let hops = match header {
        ForwardedHeader::XForwardedFor => hops(headers, "x-forwarded-for", forwarded_for_hop),
        ForwardedHeader::Forwarded => hops(headers, "forwarded", forwarded_element),
    };
    for hop in hops.into_iter().rev() {
        match hop {
            Some(ip) => client = ip.to_canonical(),
            None => return client,
        }
        if !trusted.contains(client) {
            return client;
        }
    }
    client
}

/// Every hop of every line of header `name`, in order (a chain may be split
/// over several lines; they read as one list, RFC 9110 5.3); at most the
/// last `MAX_HOPS`.
fn hops(headers: &HeaderMap, name: &str, parse: fn(&str) -> Option<IpAddr>) -> Vec<Option<IpAddr>> {
    let mut out: Vec<Option<IpAddr>> = headers
        .get_all(name)
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(s) => s.split(',').map(parse).collect::<Vec<_>>(),
            Err(_) => vec![None],
        })
        .collect();
    if out.len() > MAX_HOPS {
        out.drain(..out.len() - MAX_HOPS);
    }
    out
}

/// One X-Forwarded-For hop: `192.0.2.7`, `2001:db8::1`, and as some proxies
/// write them with a port, `192.0.2.7:4711` or `[2001:db8::1]:4711`.
fn forwarded_for_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then(|| host.parse().ok()).flatten()
}

/// The `for=` of one `Forwarded` element (`for=192.0.2.7;proto=https`,
/// `for="[2001:db8::1]:4711"`); None for `unknown`, obfuscated names and
/// elements without `for`.
fn forwarded_element(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
    forwarded_for_hop(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn nets(items: &[&str]) -> NetList {
        NetList::parse(items).expect("test networks")
    }

    #[test]
    fn networks_parse_or_say_why() {
        assert!(nets(&["10.0.0.0/8"]).contains(ip("10.2.3.4")));
        assert!(nets(&["2001:db8::/32"]).contains(ip("2001:db8:1::5")));
        assert!(nets(&["192.0.2.7"]).contains(ip("192.0.2.7")));
        assert!(!nets(&["192.0.2.7"]).contains(ip("192.0.2.8")));
        // An IPv4 client seen on a dual-stack socket.
        assert!(nets(&["10.0.0.0/8"]).contains(ip("::ffff:10.1.1.1")));
        let e = NetList::parse(&["10.0.0.0/8", "10.0.0.1/8"]).expect_err("host bits");
        assert!(e.contains("10.0.0.0/8"), "{e}");
        let e = NetList::parse(&["10.0.0.0/33"]).expect_err("prefix");
        assert!(e.contains("CIDR"), "{e}");
        assert!(NetList::parse(&["example.com"]).is_err());
    }

    #[test]
    fn deny_wins_and_allow_admits_only_its_networks() {
        let open = AddressRules::default();
        assert!(open.admits(ip("203.0.113.9")));
        let rules = AddressRules { allow: nets(&["10.0.0.0/8", "2001:db8::/32"]), deny: nets(&["10.9.0.0/16"]) };
        assert!(rules.admits(ip("10.1.2.3")));
        assert!(rules.admits(ip("2001:db8::1")));
        assert!(!rules.admits(ip("10.9.0.1")), "deny wins over allow");
        assert!(!rules.admits(ip("203.0.113.9")), "not allowed");
        let deny_only = AddressRules { allow: NetList::default(), deny: nets(&["203.0.113.0/24"]) };
        assert!(!deny_only.admits(ip("203.0.113.9")));
        assert!(deny_only.admits(ip("198.51.100.1")));
    }

    fn headers(name: &str, lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(l).expect("value"),
            );
        }
        h
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let trusted = nets(&["127.0.0.1", "10.0.0.0/8"]);
        let xff = ForwardedHeader::XForwardedFor;
        // Straight from an untrusted peer: its header is not believed.
        let h = headers("x-forwarded-for", &["1.1.1.1"]);
        assert_eq!(client_address(ip("203.0.113.5"), &h, &trusted, xff), ip("203.0.113.5"));
        // Through a trusted proxy: the hop it appended.
        assert_eq!(client_address(ip("127.0.0.1"), &h, &trusted, xff), ip("1.1.1.1"));
        // A spoofed hop the client wrote, left of its own address, is skipped.
        let h = headers("x-forwarded-for", &["6.6.6.6, 198.51.100.4, 10.0.0.2"]);
        assert_eq!(client_address(ip("10.0.0.3"), &h, &trusted, xff), ip("198.51.100.4"));
        // A chain split over lines reads as one list.
        let h = headers("x-forwarded-for", &["6.6.6.6", "198.51.100.4", "10.0.0.2"]);
        assert_eq!(client_address(ip("10.0.0.3"), &h, &trusted, xff), ip("198.51.100.4"));
        // IPv6 with ports, as some proxies write them.
        let h = headers("x-forwarded-for", &["[2001:db8::7]:4711"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &trusted, xff), ip("2001:db8::7"));
        let h = headers("x-forwarded-for", &["192.0.2.1:80"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &trusted, xff), ip("192.0.2.1"));
        // Garbage stops the walk at the last trusted proxy.
        let h = headers("x-forwarded-for", &["nonsense, 10.0.0.2"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &trusted, xff), ip("10.0.0.2"));
        // Every hop trusted: the left-most.
        let h = headers("x-forwarded-for", &["10.1.1.1, 10.0.0.2"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &trusted, xff), ip("10.1.1.1"));
        // No header: the proxy itself.
        assert_eq!(client_address(ip("127.0.0.1"), &HeaderMap::new(), &trusted, xff), ip("127.0.0.1"));
        // No trusted proxies: never the header.
        let h = headers("x-forwarded-for", &["1.1.1.1"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &NetList::default(), xff), ip("127.0.0.1"));
    }

    #[test]
    fn forwarded_elements_name_the_client() {
        let trusted = nets(&["127.0.0.1"]);
        let fwd = ForwardedHeader::Forwarded;
        let h = headers("forwarded", &["for=6.6.6.6, for=\"[2001:db8::9]:4711\";proto=https"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &trusted, fwd), ip("2001:db8::9"));
        let h = headers("forwarded", &["proto=https;FOR=192.0.2.60;by=203.0.113.43"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &trusted, fwd), ip("192.0.2.60"));
        let h = headers("forwarded", &["for=unknown"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &trusted, fwd), ip("127.0.0.1"));
        // The other header is not read.
        let h = headers("x-forwarded-for", &["1.1.1.1"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &trusted, fwd), ip("127.0.0.1"));
    }
}
