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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tunnel_lib::config::LinkTuning;
use tunnel_lib::proto::{LinkCounters, LinkOptions};

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
    /// The timers a fresh socket has (the kernel's sysctls), microseconds:
    /// what an option turned off goes back to.
    kernel_rto_min: libc::c_int,
    kernel_delack_max: libc::c_int,
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
        let (rto_min, delack_max) = (get_int(&sock, TCP_RTO_MIN_US), get_int(&sock, TCP_DELACK_MAX_US));
        Support {
            rto_min: rto_min.is_ok(),
            delack_max: delack_max.is_ok(),
            thin_timeouts: get_int(&sock, libc::TCP_THIN_LINEAR_TIMEOUTS).is_ok(),
            notsent_lowat: get_int(&sock, libc::TCP_NOTSENT_LOWAT).is_ok(),
            kernel_rto_min: rto_min.unwrap_or_default(),
            kernel_delack_max: delack_max.unwrap_or_default(),
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
        let [rto_min, delack_max, _, notsent_lowat] = values(wanted).map(|v| v.unwrap_or_else(|| "off".into()));
        tracing::info!(
            side,
            %rto_min,
            %delack_max,
            %notsent_lowat,
            thin_timeouts = wanted.thin_timeouts,
            "link sockets get their own TCP options"
        );
    }
}

/// Each option's configured value as an operator writes it ("20ms",
/// "128KiB", "on"), in `states`' order; None where it is off.
pub fn values(wanted: &LinkTuning) -> [Option<String>; 4] {
    let timer = |d: Option<Duration>| d.map(|d| humantime::format_duration(d).to_string());
    [
        timer(wanted.rto_min),
        timer(wanted.delack_max),
        wanted.thin_timeouts.then(|| "on".to_string()),
        wanted.notsent_lowat.map(|n| format!("{}KiB", n >> 10)),
    ]
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

/// What one link socket has, as the kernel reports it: None / false / 0
/// where the socket keeps the kernel's own value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub rto_min: Option<Duration>,
    pub delack_max: Option<Duration>,
    pub thin_timeouts: bool,
    pub notsent_lowat: Option<u32>,
}

impl Applied {
    /// As the protocol carries it, with the configured options this kernel lacks.
    pub fn to_proto(&self, wanted: &LinkTuning) -> LinkOptions {
        let us = |d: Option<Duration>| d.map_or(0, |d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
        LinkOptions {
            rto_min_us: us(self.rto_min),
            delack_max_us: us(self.delack_max),
            notsent_lowat: self.notsent_lowat.unwrap_or(0),
            thin_timeouts: self.thin_timeouts,
            unsupported: states(wanted)
                .into_iter()
                .filter(|(_, state)| *state == "unsupported")
                .map(|(option, _)| option.to_string())
                .collect(),
        }
    }
}

/// Gives a link socket exactly what `wanted` names, as far as this kernel
/// supports it: configured options set, the others back to the kernel's own
/// (a listener keeps what an earlier config gave it), and says what it has
/// now. A refusal is logged at debug level and leaves the kernel's value:
/// the link works either way.
pub fn apply(sock: &impl AsFd, wanted: &LinkTuning) -> Applied {
    let s = support();
    let us = |d: Duration| libc::c_int::try_from(d.as_micros()).unwrap_or(libc::c_int::MAX);
    let bytes = |n: u32| libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
    for (supported, opt, want) in [
        (s.rto_min, TCP_RTO_MIN_US, wanted.rto_min.map_or(s.kernel_rto_min, us)),
        (s.delack_max, TCP_DELACK_MAX_US, wanted.delack_max.map_or(s.kernel_delack_max, us)),
        (s.thin_timeouts, libc::TCP_THIN_LINEAR_TIMEOUTS, libc::c_int::from(wanted.thin_timeouts)),
        // 0: the sysctl's limit, unlimited by default.
        (s.notsent_lowat, libc::TCP_NOTSENT_LOWAT, wanted.notsent_lowat.map_or(0, bytes)),
    ] {
        // A socket already as wanted is left alone: a fresh one keeps the
        // kernel's state untouched where nothing is configured.
        if !supported || get_int(sock, opt).is_ok_and(|v| v == want) {
            continue;
        }
        if let Err(e) = set_int(sock, opt, want) {
            tracing::debug!(option = opt, value = want, "link socket option not set: {e}");
        }
    }
    read(sock)
}

/// The options a socket has now, as the kernel reports them.
pub fn read(sock: &impl AsFd) -> Applied {
    let s = support();
    let timer = |supported: bool, opt, kernel| {
        supported
            .then(|| get_int(sock, opt).ok())
            .flatten()
            .filter(|&v| v != kernel)
            .map(|v| Duration::from_micros(u64::try_from(v).unwrap_or_default()))
    };
    Applied {
        rto_min: timer(s.rto_min, TCP_RTO_MIN_US, s.kernel_rto_min),
        delack_max: timer(s.delack_max, TCP_DELACK_MAX_US, s.kernel_delack_max),
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
    /// Bytes sent over the connection's life, retransmissions included, and
    /// of them resent (64-bit counters: a busy link wraps no 32-bit one).
    pub bytes_sent: u64,
    pub bytes_retrans: u64,
}

impl Counters {
    /// As the protocol carries them.
    pub fn to_proto(&self) -> LinkCounters {
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        LinkCounters {
            rtt_us: us(self.rtt),
            rto_us: us(self.rto),
            retransmits: u64::from(self.retransmits),
            bytes_sent: self.bytes_sent,
            bytes_retrans: self.bytes_retrans,
        }
    }
}

/// The socket's counters, None if the kernel will not say.
pub fn counters(sock: &impl AsFd) -> Option<Counters> {
    let info = tcp_info(sock).ok()?;
    Some(Counters {
        rtt: Duration::from_micros(u64::from(info.tcpi_rtt)),
        rto: Duration::from_micros(u64::from(info.tcpi_rto)),
        retransmits: info.tcpi_total_retrans,
        bytes_sent: info.tcpi_bytes_sent,
        bytes_retrans: info.tcpi_bytes_retrans,
    })
}

/// A sample older than this is read again; younger, it is answered from
/// memory, so that many consoles watching many streams of one connection
/// cost one getsockopt a second.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// A view of one link socket: its options and counters, read from the live
/// socket on demand.
#[derive(Debug)]
pub struct LinkProbe {
    socket: Mutex<Sampled>,
}

/// What a link socket has and has counted, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkSample {
    pub options: Applied,
    pub counters: Counters,
}

#[derive(Debug)]
struct Sampled {
    /// The socket's descriptor while `Probed` owns it; None once it closes.
    fd: Option<RawFd>,
    /// The last reading and when; the options alone come from the accept.
    last: LinkSample,
    at: Option<Instant>,
}

impl LinkProbe {
    /// The socket's options and counters, at most a second old; after it
    /// closed, the last ones read.
    pub fn sample(&self) -> LinkSample {
        // std Mutex: held for a few getsockopt calls, never across an await.
        let mut s = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = s.at.is_some_and(|at| at.elapsed() < SAMPLE_EVERY);
        if let (Some(fd), false) = (s.fd, fresh) {
            // SAFETY: `fd` is open: Probed clears it under this lock before
            // its socket closes, and the lock is held until the borrow ends.
            let sock = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Some(counters) = counters(&sock) {
                s.last = LinkSample { options: read(&sock), counters };
                s.at = Some(Instant::now());
            }
        }
        s.last
    }
}

/// A link socket that its probe can read while it is open: the server's
/// accepted sockets, for the console, and the client's, for its heartbeats.
pub struct Probed {
    tcp: TcpStream,
    probe: Arc<LinkProbe>,
}

impl Probed {
    /// Wraps a link socket, with the options it has.
    pub fn new(tcp: TcpStream, options: Applied) -> Self {
        let fd = Some(tcp.as_raw_fd());
        let last = LinkSample { options, counters: Counters::default() };
        let probe = Arc::new(LinkProbe { socket: Mutex::new(Sampled { fd, last, at: None }) });
        Probed { tcp, probe }
    }

    /// The socket's probe, which outlives it.
    pub fn probe(&self) -> Arc<LinkProbe> {
        self.probe.clone()
    }
}

impl Drop for Probed {
    // Runs before `tcp` closes the descriptor, which may then be reused.
    fn drop(&mut self) {
        self.probe.socket.lock().unwrap_or_else(|e| e.into_inner()).fd = None;
    }
}

/// What a tunnel-link request knows of its connection: the peer's address
/// and the probe on its socket.
#[derive(Debug, Clone)]
pub struct LinkConnectInfo {
    pub tcp: TcpConnectInfo,
    pub probe: Arc<LinkProbe>,
}

impl Connected for Probed {
    type ConnectInfo = LinkConnectInfo;

    fn connect_info(&self) -> LinkConnectInfo {
        LinkConnectInfo { tcp: self.tcp.connect_info(), probe: self.probe.clone() }
    }
}

impl AsyncRead for Probed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Probed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
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
        // Rounded up to the kernel's tick: 8 ms at HZ=250 or 1000, 10 ms at HZ=100.
        let delack = applied.delack_max.expect("set");
        assert!(delack >= Duration::from_millis(8) && delack <= Duration::from_millis(10), "{delack:?}");
        assert!(applied.thin_timeouts);
        assert_eq!(applied.notsent_lowat, Some(128 << 10));
        assert_eq!(read(&a), applied, "what the kernel says afterwards");
        // Turned off again (a listener after a reload): the kernel's own.
        assert_eq!(apply(&a, &LinkTuning::OFF), Applied::default());
        assert_eq!(get_int(&a, TCP_RTO_MIN_US).ok(), Some(s.kernel_rto_min), "the kernel's own");
        // A fresh socket has the kernel's own, and nothing wanted sets nothing.
        let (c, _d) = connected();
        assert_eq!(read(&c), Applied::default());
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

    /// The probe reads the live socket; once the socket is gone it answers
    /// with the last reading and never touches the closed descriptor.
    #[tokio::test]
    async fn the_probe_reads_while_the_socket_lives_and_remembers_after() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut a = TcpStream::connect(l.local_addr().expect("addr")).await.expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        let wanted = LinkTuning { notsent_lowat: Some(64 << 10), ..LinkTuning::OFF };
        let options = apply(&b, &wanted);
        let mut b = Probed::new(b, options);
        let probe = b.connect_info().probe;
        b.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        a.read_exact(&mut buf).await.expect("read");
        let live = probe.sample();
        assert!(live.counters.bytes_sent >= 5 && live.counters.rto > Duration::ZERO, "{live:?}");
        assert_eq!(live.options.notsent_lowat, Some(64 << 10));
        drop(b);
        // Another socket may now take the descriptor number: the probe must not read it.
        let (_c, _d) = connected();
        tokio::time::sleep(SAMPLE_EVERY + Duration::from_millis(100)).await;
        assert_eq!(probe.sample(), live);
    }
}
