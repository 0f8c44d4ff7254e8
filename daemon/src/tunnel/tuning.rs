//! The tunnel link's per-socket TCP options (`config::LinkTuning`, design.md
//! "Heartbeats on a lossy link"): timers and the unsent-bytes limit; what this kernel supports, found once; the
//! timers set on each link socket and read back; and the link's TCP counters
//! (TCP_INFO), so that an operator can tell a lossy path from a sick client.
//!
//! The one module allowed `unsafe`: TCP_RTO_MIN_US and TCP_DELACK_MAX_US
//! (Linux 6.15) and TCP_INFO are not wrapped by socket2, rustix or nix, so
//! they are set and read here with `libc`, each call on an int or a
//! `tcp_info` we own, sized by its type.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::OnceLock;
use std::time::Duration;
use tunnel_lib::config::LinkTuning;

/// Linux's option numbers (include/uapi/linux/tcp.h); libc has no names for them yet.
const TCP_RTO_MIN_US: libc::c_int = 45;
const TCP_DELACK_MAX_US: libc::c_int = 46;

/// Set (to anything) in a daemon's environment, it behaves as on a kernel
/// without the options: how the fallback is tested on a kernel that has them.
pub const FORCE_UNSUPPORTED_ENV: &str = "TUNNEL_LINK_TUNING_UNSUPPORTED";

/// Which of the options this kernel has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Support {
    pub rto_min: bool,
    pub delack_max: bool,
    pub thin_timeouts: bool,
    pub notsent_lowat: bool,
}

/// What this kernel supports, probed once on a socket of our own: an older
/// kernel answers ENOPROTOOPT to reading an option it does not know.
pub fn support() -> Support {
    static SUPPORT: OnceLock<Support> = OnceLock::new();
    *SUPPORT.get_or_init(|| {
        if std::env::var_os(FORCE_UNSUPPORTED_ENV).is_some() {
            return Support::default();
        }
        let Ok(sock) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
            return Support::default();
        };
        Support {
            rto_min: get_int(&sock, TCP_RTO_MIN_US).is_ok(),
            delack_max: get_int(&sock, TCP_DELACK_MAX_US).is_ok(),
            thin_timeouts: get_int(&sock, libc::TCP_THIN_LINEAR_TIMEOUTS).is_ok(),
            notsent_lowat: get_int(&sock, libc::TCP_NOTSENT_LOWAT).is_ok(),
        }
    })
}

/// Says once, at start, what the link's sockets will get: the configured
/// timers, or that this kernel lacks them and the link keeps its own.
pub fn announce(side: &str, wanted: &LinkTuning) {
    let s = support();
    let missing: Vec<&str> = [
        (wanted.rto_min.is_some() && !s.rto_min, "TCP_RTO_MIN_US (link_rto_min)"),
        (wanted.delack_max.is_some() && !s.delack_max, "TCP_DELACK_MAX_US (link_delack_max)"),
        (wanted.thin_timeouts && !s.thin_timeouts, "TCP_THIN_LINEAR_TIMEOUTS (link_thin_timeouts)"),
        (wanted.notsent_lowat.is_some() && !s.notsent_lowat, "TCP_NOTSENT_LOWAT (link_notsent_lowat)"),
    ]
    .into_iter()
    .filter_map(|(m, name)| m.then_some(name))
    .collect();
    if !missing.is_empty() {
        tracing::warn!(
            side,
            "this kernel does not support {} (Linux 6.15 and later have the timers): the {side}'s link sockets keep the kernel's own, so a lost segment on the link waits at least 200 ms for its retransmission",
            missing.join(", ")
        );
    } else if !wanted.is_off() {
        let timer = |d: Option<Duration>| d.map_or("off".to_string(), |d| humantime::format_duration(d).to_string());
        let lowat = wanted.notsent_lowat.map_or("off".to_string(), |n| format!("{}KiB", n >> 10));
        tracing::info!(
            side,
            rto_min = %timer(wanted.rto_min),
            delack_max = %timer(wanted.delack_max),
            notsent_lowat = %lowat,
            thin_timeouts = wanted.thin_timeouts,
            "link sockets get their own TCP options"
        );
    }
}

/// Each option's state for `wanted` on this kernel: "applied", "off" (not
/// configured) or "unsupported" (configured, and this kernel lacks it).
pub fn states(wanted: &LinkTuning) -> [(&'static str, &'static str); 4] {
    let s = support();
    let state = |on: bool, supported: bool| match (on, supported) {
        (false, _) => "off",
        (true, true) => "applied",
        (true, false) => "unsupported",
    };
    [
        ("rto_min", state(wanted.rto_min.is_some(), s.rto_min)),
        ("delack_max", state(wanted.delack_max.is_some(), s.delack_max)),
        ("thin_timeouts", state(wanted.thin_timeouts, s.thin_timeouts)),
        ("notsent_lowat", state(wanted.notsent_lowat.is_some(), s.notsent_lowat)),
    ]
}

/// What one link socket has: the timers read back from the kernel after
/// setting them (rounded up to its tick), None where nothing was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub rto_min: Option<Duration>,
    pub delack_max: Option<Duration>,
    pub thin_timeouts: bool,
    pub notsent_lowat: Option<u32>,
}

/// Sets what `wanted` names and this kernel supports on a link socket, and
/// reads it back. A refusal is logged at debug level and leaves the
/// kernel's value: the link works either way.
pub fn apply(sock: &impl AsFd, wanted: &LinkTuning) -> Applied {
    let s = support();
    let mut applied = Applied::default();
    for (value, supported, opt, slot) in [
        (wanted.rto_min, s.rto_min, TCP_RTO_MIN_US, &mut applied.rto_min),
        (wanted.delack_max, s.delack_max, TCP_DELACK_MAX_US, &mut applied.delack_max),
    ] {
        let Some(d) = value.filter(|_| supported) else { continue };
        let us = libc::c_int::try_from(d.as_micros()).unwrap_or(libc::c_int::MAX);
        match set_int(sock, opt, us).and_then(|()| get_int(sock, opt)) {
            Ok(v) => *slot = Some(Duration::from_micros(u64::try_from(v).unwrap_or_default())),
            Err(e) => tracing::debug!(option = opt, "link socket timer not set: {e}"),
        }
    }
    if wanted.thin_timeouts && s.thin_timeouts {
        match set_int(sock, libc::TCP_THIN_LINEAR_TIMEOUTS, 1)
            .and_then(|()| get_int(sock, libc::TCP_THIN_LINEAR_TIMEOUTS))
        {
            Ok(v) => applied.thin_timeouts = v != 0,
            Err(e) => tracing::debug!("TCP_THIN_LINEAR_TIMEOUTS not set: {e}"),
        }
    }
    if let (Some(n), true) = (wanted.notsent_lowat, s.notsent_lowat) {
        let n = libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
        match set_int(sock, libc::TCP_NOTSENT_LOWAT, n).and_then(|()| get_int(sock, libc::TCP_NOTSENT_LOWAT)) {
            Ok(v) => applied.notsent_lowat = u32::try_from(v).ok(),
            Err(e) => tracing::debug!("TCP_NOTSENT_LOWAT not set: {e}"),
        }
    }
    applied
}

/// The timers a socket has now, as the kernel reports them (its defaults
/// where none was set; None for an option this kernel lacks). The daemons
/// keep `apply`'s read-back; the tests check the kernel's word afterwards.
#[cfg(test)]
fn read(sock: &impl AsFd) -> Applied {
    let s = support();
    let timer = |supported: bool, opt| {
        supported
            .then(|| get_int(sock, opt).ok())
            .flatten()
            .map(|v| Duration::from_micros(u64::try_from(v).unwrap_or_default()))
    };
    Applied {
        rto_min: timer(s.rto_min, TCP_RTO_MIN_US),
        delack_max: timer(s.delack_max, TCP_DELACK_MAX_US),
        thin_timeouts: s.thin_timeouts && get_int(sock, libc::TCP_THIN_LINEAR_TIMEOUTS).is_ok_and(|v| v != 0),
        // 0 is the kernel's "no limit" (its sysctl's default, UINT_MAX, reads back as -1).
        notsent_lowat: s
            .notsent_lowat
            .then(|| get_int(sock, libc::TCP_NOTSENT_LOWAT).ok())
            .flatten()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| v != 0),
    }
}

/// A link socket's TCP counters (TCP_INFO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// The retransmission timeout in force.
    pub rto: Duration,
    /// Segments retransmitted over the connection's life.
    pub retransmits: u32,
}

/// The socket's counters, None if the kernel will not say.
pub fn counters(sock: &impl AsFd) -> Option<Counters> {
    let info = tcp_info(sock).ok()?;
    Some(Counters {
        rtt: Duration::from_micros(u64::from(info.tcpi_rtt)),
        rto: Duration::from_micros(u64::from(info.tcpi_rto)),
        retransmits: info.tcpi_total_retrans,
    })
}

fn set_int(sock: &impl AsFd, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd is borrowed, so open for the call; the kernel reads
    // `len` bytes from a live c_int of exactly that size.
    let r = unsafe {
        libc::setsockopt(sock.as_fd().as_raw_fd(), libc::IPPROTO_TCP, opt, (&value as *const libc::c_int).cast(), len)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_int(sock: &impl AsFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd is borrowed, so open for the call; the kernel writes at
    // most `len` bytes into a c_int of that size and says how many it wrote.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn tcp_info(sock: &impl AsFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers, for which all zeroes is a value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is borrowed, so open for the call; the kernel writes at
    // most `len` bytes (fewer on an older kernel, the rest staying zero).
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(info)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (a, b)
    }

    #[test]
    fn timers_are_set_and_read_back_where_the_kernel_has_them() {
        let (a, _b) = connected();
        let wanted = LinkTuning {
            rto_min: Some(Duration::from_millis(20)),
            delack_max: Some(Duration::from_millis(8)),
            thin_timeouts: true,
            notsent_lowat: Some(128 << 10),
        };
        let s = support();
        if !s.rto_min {
            eprintln!("skipped: this kernel has no TCP_RTO_MIN_US (Linux 6.15+)");
            return;
        }
        let applied = apply(&a, &wanted);
        assert_eq!(applied.rto_min, Some(Duration::from_millis(20)));
        assert_eq!(applied.delack_max, Some(Duration::from_millis(8)));
        assert!(applied.thin_timeouts);
        assert_eq!(applied.notsent_lowat, Some(128 << 10));
        assert_eq!(read(&a), applied, "what the kernel says afterwards");
        // A fresh socket has the kernel's own.
        let (c, _d) = connected();
        assert_eq!(read(&c).rto_min, Some(Duration::from_millis(200)));
        // Nothing wanted, nothing set.
        assert_eq!(apply(&c, &LinkTuning::OFF), Applied::default());
    }

    #[test]
    fn counters_come_from_the_live_socket() {
        use std::io::{Read, Write};
        let (mut a, mut b) = connected();
        a.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).expect("read");
        let c = counters(&a).expect("TCP_INFO on Linux");
        assert!(c.rto > Duration::ZERO, "{c:?}");
        assert_eq!(c.retransmits, 0, "loopback loses nothing: {c:?}");
    }
}
