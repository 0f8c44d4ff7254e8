//! The systemd notify protocol for `Type=notify` units, spoken only when
//! NOTIFY_SOCKET is set (silent otherwise): READY=1 once serving,
//! RELOADING=1 (with MONOTONIC_USEC) then READY=1 around a reload,
//! STOPPING=1 (and EXTEND_TIMEOUT_USEC) when draining, WATCHDOG=1 at half of WATCHDOG_USEC, and STATUS=
//! lines an operator reads in `systemctl status`.

use sd_notify::NotifyState;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often STATUS= is refreshed when there is no watchdog to pace it.
const STATUS_EVERY: Duration = Duration::from_secs(10);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("systemd notify: {e}");
    }
}

/// Whether a service manager listens.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Serving: READY=1 with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts; `ready` ends it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading config")];
    // systemd matches the reload to the notification by this timestamp.
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// Draining toward exit.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Draining toward exit, which may take `within`: systemd's stop timeout is
/// extended to cover it (EXTEND_TIMEOUT_USEC), so a long `drain_delay` plus
/// `shutdown_grace` is not cut short by `TimeoutStopSec`.
pub fn stopping_within(status: &str, within: Duration) {
    let usec = u32::try_from(within.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::Stopping, NotifyState::Status(status), NotifyState::ExtendTimeoutUsec(usec)]);
}

/// Pings the watchdog at half its interval (and refreshes STATUS= with
/// `status()` each time) until `stop` fires. Without a watchdog, only the
/// status is refreshed; without a service manager, returns at once.
pub async fn keepalive(status: impl Fn() -> String, stop: CancellationToken) {
    if !enabled() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).max(Duration::from_millis(10)));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let line = status();
        if watchdog.is_some() {
            send(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
        } else {
            send(&[NotifyState::Status(&line)]);
        }
    }
}
