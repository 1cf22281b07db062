//! A memory budget, the node's (`node.max_memory`) or a tenant's (`quota.max_memory`):
//! the linear memory of the live instances it covers may not pass it. Every instance's
//! limiter reserves from its tenant's budget and the node's as its memories grow (their
//! first size included) and gives everything back when its store is dropped. A growth
//! that would pass either budget is refused; the call then fails as "out of memory" (503,
//! retry later) instead of the node overcommitting. A leaf: no other module of the node.
//!
//! With the engine's decommit settings (`runtime::engine`), memory an instance dirtied is
//! given back to the system when the instance ends, so the node's resident memory stays
//! within this budget plus a bounded reserve of reset pages kept for reuse.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::gauge::Gauge;

pub struct MemoryBudget {
    limit: AtomicU64,
    reserved: AtomicU64,
    gauge: Gauge,
}

impl MemoryBudget {
    /// `gauge` shows what is reserved (`trellis_node_memory_reserved_bytes`).
    pub fn new(limit: u64, gauge: Gauge) -> Self {
        Self {
            limit: AtomicU64::new(limit),
            reserved: AtomicU64::new(0),
            gauge,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// A new limit; what is reserved stays reserved (growths wait for room).
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Release);
    }

    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// Reserves `bytes` if the budget has room for them.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        let taken = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |reserved| {
                reserved
                    .checked_add(bytes)
                    .filter(|total| *total <= self.limit())
            })
            .is_ok();
        if taken {
            self.gauge.inc_by(bytes as i64);
        }
        taken
    }

    pub fn release(&self, bytes: u64) {
        self.reserved.fetch_sub(bytes, Ordering::AcqRel);
        self.gauge.dec_by(bytes as i64);
    }
}

/// The default budget: three quarters of the machine's memory (from /proc/meminfo), or
/// 4 GiB where that cannot be read.
pub fn default_budget() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
    match total_kib {
        Some(kib) => kib * 1024 / 4 * 3,
        None => 4 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_limit_and_come_back() {
        let budget = MemoryBudget::new(100, Gauge::default());
        assert!(budget.try_reserve(60));
        assert!(!budget.try_reserve(41), "60 + 41 is over 100");
        assert!(budget.try_reserve(40));
        budget.release(60);
        assert_eq!(budget.reserved(), 40);
        assert!(budget.try_reserve(60));
    }
}
