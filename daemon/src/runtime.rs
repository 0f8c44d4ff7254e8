//! The tokio runtime both daemons run on, sized by their `worker_threads` setting.

use anyhow::Context as _;

/// A runtime with `workers` threads: 0 = one per core, 1 = a current-thread
/// runtime (no cross-thread wake-ups: the cheapest on small machines).
pub fn build(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    b.enable_all().build().context("starting the runtime")
}
