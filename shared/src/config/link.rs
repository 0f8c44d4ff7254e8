//! The tunnel link's per-socket TCP timers, a section of keys both files
//! have (`[server]` in server.toml, the top level of client.toml).
//!
//! On a lossy path a lost segment that carries a heartbeat waits for the
//! retransmission timer, whose floor is 200 ms on Linux, and the reply's ACK
//! may wait up to 200 ms more for a delayed-ACK timer: heartbeats then read
//! as a sick peer. Linux 6.15 and later let one socket lower both
//! (TCP_RTO_MIN_US, TCP_DELACK_MAX_US); the daemons apply them to the link's
//! sockets only, where the traffic is a few long-lived connections that want
//! recovery in milliseconds. An older kernel refuses them, and the daemons
//! carry on with the kernel's own timers.

use super::defaults::{
    DEFAULT_LINK_DELACK_MAX, DEFAULT_LINK_NOTSENT_LOWAT, DEFAULT_LINK_RTO_MIN, DEFAULT_LINK_THIN_TIMEOUTS,
};
use super::source::{ConfigError, Source};
use crate::units::{ByteSize, DurationOrOff};
use std::time::Duration;
use toml::Spanned;

/// The least value Linux takes for either timer (it rounds up to its tick).
pub const LINK_TIMER_MIN: Duration = Duration::from_millis(5);
/// The most: the kernel's own values, 200 ms each.
pub const LINK_TIMER_MAX: Duration = Duration::from_millis(200);

/// What the daemons set on each tunnel-link socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTuning {
    /// Minimum retransmission timeout; None = the kernel's (200 ms).
    pub rto_min: Option<Duration>,
    /// Maximum delayed-ACK time; None = the kernel's (200 ms, 40 ms in practice).
    pub delack_max: Option<Duration>,
    /// TCP_THIN_LINEAR_TIMEOUTS: a stream with few segments in flight
    /// retries at the RTO instead of doubling it, for its first six retries.
    pub thin_timeouts: bool,
    /// TCP_NOTSENT_LOWAT: bytes the socket holds not yet sent; None = no
    /// limit (the kernel's). Kept small, bulk bytes wait in HTTP/2's queues,
    /// where a heartbeat can pass them, instead of in the socket, where it
    /// cannot.
    pub notsent_lowat: Option<u32>,
}

impl Default for LinkTuning {
    fn default() -> Self {
        LinkTuning {
            rto_min: DEFAULT_LINK_RTO_MIN,
            delack_max: DEFAULT_LINK_DELACK_MAX,
            thin_timeouts: DEFAULT_LINK_THIN_TIMEOUTS,
            notsent_lowat: DEFAULT_LINK_NOTSENT_LOWAT,
        }
    }
}

impl LinkTuning {
    /// The kernel's own timers, nothing set.
    pub const OFF: LinkTuning =
        LinkTuning { rto_min: None, delack_max: None, thin_timeouts: false, notsent_lowat: None };

    /// Whether anything is set at all.
    pub fn is_off(&self) -> bool {
        *self == LinkTuning::OFF
    }
}

/// The least TCP_NOTSENT_LOWAT taken: below a few segments, writes of a
/// busy link would wake the writer for every segment.
pub const LINK_NOTSENT_LOWAT_MIN: u64 = 16 << 10;

/// The keys as written (the same names in both files; each file's section
/// lists them itself, as `deny_unknown_fields` cannot flatten).
pub(super) struct RawLink {
    pub link_rto_min: Option<Spanned<DurationOrOff>>,
    pub link_delack_max: Option<Spanned<DurationOrOff>>,
    pub link_thin_timeouts: Option<bool>,
    pub link_notsent_lowat: Option<Spanned<ByteSize>>,
}

/// The keys checked; `prefix` is "server." for server.toml.
pub(super) fn check(src: &Source, prefix: &str, raw: &RawLink) -> Result<LinkTuning, ConfigError> {
    let RawLink {
        link_rto_min: rto_min,
        link_delack_max: delack_max,
        link_thin_timeouts: thin_timeouts,
        link_notsent_lowat,
    } = raw;
    let defaults = LinkTuning::default();
    let timer = |raw: &Option<Spanned<DurationOrOff>>, key: &str, default: Option<Duration>| {
        let Some(spanned) = raw else { return Ok(default) };
        match spanned.get_ref().0 {
            Some(d) if !(LINK_TIMER_MIN..=LINK_TIMER_MAX).contains(&d) => Err(src.at(
                spanned,
                format!("{prefix}{key}"),
                "must be 5ms to 200ms (what Linux accepts), or \"off\" for the kernel's own",
            )),
            v => Ok(v),
        }
    };
    Ok(LinkTuning {
        rto_min: timer(rto_min, "link_rto_min", defaults.rto_min)?,
        delack_max: timer(delack_max, "link_delack_max", defaults.delack_max)?,
        thin_timeouts: thin_timeouts.unwrap_or(defaults.thin_timeouts),
        notsent_lowat: match link_notsent_lowat {
            None => defaults.notsent_lowat,
            Some(v) => match v.get_ref().0 {
                0 => None,
                n if (LINK_NOTSENT_LOWAT_MIN..=u64::from(u32::MAX)).contains(&n) => Some(n as u32),
                _ => {
                    return Err(src.at(
                        v,
                        format!("{prefix}link_notsent_lowat"),
                        "must be 16KiB to 4GiB, or 0 for no limit (the kernel's)",
                    ))
                }
            },
        },
    })
}
