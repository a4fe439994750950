//! Admission: calls in flight across the data plane, against `max_concurrent_calls`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The counter of routed calls in flight.
#[derive(Debug, Default)]
pub struct Admission {
    limit: usize,
    in_flight: AtomicUsize,
}

/// One admitted call; dropping it releases its place.
#[derive(Debug)]
pub struct Permit(Arc<Admission>);

impl Admission {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Admission {
            limit,
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Admits one call, or `None` at the limit.
    pub fn enter(self: &Arc<Self>) -> Option<Permit> {
        let mut now = self.in_flight.load(Ordering::Relaxed);
        loop {
            if now >= self.limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Permit(self.clone())),
                Err(actual) => now = actual,
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_releases_on_drop() {
        let admission = Admission::new(2);
        let a = admission.enter().unwrap();
        let _b = admission.enter().unwrap();
        assert!(admission.enter().is_none());
        assert_eq!(admission.in_flight(), 2);
        drop(a);
        assert!(admission.enter().is_some());
        assert_eq!(admission.in_flight(), 1);
    }
}
