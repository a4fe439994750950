//! Outlier tracking: each upstream's recent attempt outcomes, cheap to read from Python.
//!
//! Ejection itself is Python's decision (it owns replica state and picks replicas);
//! the data plane keeps the counters that decision needs without a record scan.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one upstream.
#[derive(Debug, Default)]
pub struct Outliers {
    consecutive_failures: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
}

/// A snapshot: (consecutive failures, successes, failures).
pub type Snapshot = (u64, u64, u64);

impl Outliers {
    pub fn success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.successes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failure(&self) {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        (
            self.consecutive_failures.load(Ordering::Relaxed),
            self.successes.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_ends_a_run_of_failures() {
        let o = Outliers::default();
        o.failure();
        o.failure();
        assert_eq!(o.snapshot(), (2, 0, 2));
        o.success();
        assert_eq!(o.snapshot(), (0, 1, 2));
    }
}
