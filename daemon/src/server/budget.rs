//! The exchange window one public connection's requests share
//! (`public_connection_window`), as HTTP/2 streams share a connection
//! window: a peer that opens every stream it may and reads none of them
//! holds the budget plus a small floor per stream, not a full window each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tunnel_lib::frame::MIN_EXCHANGE_WINDOW;

/// What one public connection's open exchanges may hold between them.
#[derive(Debug)]
pub struct WindowBudget {
    total: u64,
    leased: AtomicU64,
}

/// One exchange's window, given back to its connection's budget when dropped.
#[derive(Debug)]
pub struct WindowLease {
    budget: Arc<WindowBudget>,
    window: u32,
}

impl WindowBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Arc<Self> {
        Arc::new(WindowBudget { total, leased: AtomicU64::new(0) })
    }

    /// A window for a new exchange: `want` while the budget has that much
    /// left, then what is left, and never less than the protocol's floor,
    /// so that a connection's last streams still move.
    pub fn lease(self: &Arc<Self>, want: u32) -> WindowLease {
        let want = want.max(MIN_EXCHANGE_WINDOW);
        let mut window = want;
        // Concurrent requests of one h2 connection lease at once: the
        // window is chosen against the count it is added to.
        let _ = self.leased.fetch_update(Ordering::AcqRel, Ordering::Acquire, |leased| {
            let left = self.total.saturating_sub(leased);
            window = u32::try_from(left).unwrap_or(u32::MAX).clamp(MIN_EXCHANGE_WINDOW, want);
            Some(leased + u64::from(window))
        });
        WindowLease { budget: self.clone(), window }
    }

    /// Bytes leased to open exchanges now.
    pub fn leased(&self) -> u64 {
        self.leased.load(Ordering::Acquire)
    }
}

impl WindowLease {
    /// The window the exchange was given.
    pub fn window(&self) -> u32 {
        self.window
    }
}

impl Drop for WindowLease {
    fn drop(&mut self) {
        self.budget.leased.fetch_sub(u64::from(self.window), Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 1 << 20;

    #[test]
    fn full_windows_while_the_budget_lasts_then_the_rest_then_the_floor() {
        let budget = WindowBudget::new(u64::from(2 * MIB + MIB / 2));
        let a = budget.lease(MIB);
        let b = budget.lease(MIB);
        let c = budget.lease(MIB);
        let d = budget.lease(MIB);
        assert_eq!((a.window(), b.window(), c.window(), d.window()), (MIB, MIB, MIB / 2, MIN_EXCHANGE_WINDOW));
        drop((b, d));
        assert_eq!(budget.lease(MIB).window(), MIB, "a finished exchange's window is free again");
        drop((a, c));
        assert_eq!(budget.leased(), 0);
    }

    /// The worst a connection can hold: its budget plus the floor for every
    /// stream past it, whatever order the streams come and go in.
    #[test]
    fn what_a_connection_holds_is_bounded() {
        let total = 4 * u64::from(MIB);
        let budget = WindowBudget::new(total);
        let mut open: Vec<WindowLease> = (0..256).map(|_| budget.lease(MIB)).collect();
        let bound = total + 256 * u64::from(MIN_EXCHANGE_WINDOW);
        assert!(budget.leased() <= bound);
        for i in 0..1000 {
            open.swap_remove(i * 7 % open.len());
            open.push(budget.lease(MIB));
            assert!(budget.leased() <= bound, "{} leased", budget.leased());
        }
        drop(open);
        assert_eq!(budget.leased(), 0);
    }

    #[test]
    fn a_small_want_or_budget_still_gets_the_floor() {
        let budget = WindowBudget::new(0);
        assert_eq!(budget.lease(MIB).window(), MIN_EXCHANGE_WINDOW);
        assert_eq!(WindowBudget::new(u64::from(MIB)).lease(0).window(), MIN_EXCHANGE_WINDOW);
    }
}
