//! Retries: the policy a decision gives a call, when a failed attempt may be retried,
//! and exponential backoff with full jitter between attempts.

use std::time::Duration;

use rand::Rng;

use crate::config::Kind;

/// How one call may be retried (from the Python decision).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retried).
    pub max_attempts: u32,
    /// Replaying the request has no further effect: it may be retried even after it
    /// reached a sidecar (never after a response message was forwarded).
    pub idempotent: bool,
    /// Each attempt's time until its first response message.
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Status codes of the plugin's own answer that an idempotent call is retried on.
    pub retry_on: Vec<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            idempotent: false,
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            retry_on: vec![crate::grpc::code::UNAVAILABLE],
        }
    }
}

/// How an attempt failed, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Provably never reached a sidecar: connect failed, REFUSED_STREAM, a stream
    /// above a GOAWAY's last stream id, an unknown or unverified replica.
    NeverReached,
    /// The transport failed after the request may have reached the sidecar.
    Transport,
    /// No response message within the per-try timeout.
    PerTryTimeout,
    /// The plugin answered with a status in `retry_on`.
    Status,
}

/// What the call has done so far that bears on retrying it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Attempts made, the failed one included.
    pub attempts: u32,
    /// A response message (or headers followed by data) reached the client.
    pub committed: bool,
    /// A request message beyond the first was sent upstream (bidi calls).
    pub sent_beyond_first: bool,
}

impl RetryPolicy {
    /// Whether an attempt that failed this way may be retried.
    pub fn may_retry(&self, kind: Kind, failure: Failure, progress: Progress) -> bool {
        if progress.committed || progress.attempts >= self.max_attempts {
            return false;
        }
        match failure {
            Failure::NeverReached => kind.single_request() || !progress.sent_beyond_first,
            Failure::Transport | Failure::PerTryTimeout | Failure::Status => {
                self.idempotent && kind.single_request()
            }
        }
    }

    /// The pause before retry number `retry` (1 for the first retry): a uniform draw
    /// from `[0, min(max, base * 2^(retry-1))]` ("full jitter").
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let cap = self.backoff_cap(retry);
        if cap.is_zero() {
            return cap;
        }
        Duration::from_nanos(rng.random_range(0..=cap.as_nanos() as u64))
    }

    /// The upper bound of [`RetryPolicy::backoff`] for retry number `retry`.
    pub fn backoff_cap(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy(idempotent: bool) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            idempotent,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn never_reached_is_retried_for_every_call_kind() {
        let p = policy(false);
        let fresh = Progress {
            attempts: 1,
            ..Progress::default()
        };
        for kind in [Kind::UnaryUnary, Kind::UnaryStream, Kind::StreamStream] {
            assert!(p.may_retry(kind, Failure::NeverReached, fresh));
        }
        let sent = Progress {
            sent_beyond_first: true,
            ..fresh
        };
        assert!(!p.may_retry(Kind::StreamStream, Failure::NeverReached, sent));
    }

    #[test]
    fn reached_is_retried_only_when_idempotent_and_single_request() {
        let fresh = Progress {
            attempts: 1,
            ..Progress::default()
        };
        for failure in [Failure::Transport, Failure::PerTryTimeout, Failure::Status] {
            assert!(!policy(false).may_retry(Kind::UnaryStream, failure, fresh));
            assert!(policy(true).may_retry(Kind::UnaryStream, failure, fresh));
            assert!(!policy(true).may_retry(Kind::StreamStream, failure, fresh));
        }
    }

    #[test]
    fn never_after_a_response_or_past_max_attempts() {
        let p = policy(true);
        let committed = Progress {
            attempts: 1,
            committed: true,
            ..Progress::default()
        };
        assert!(!p.may_retry(Kind::UnaryUnary, Failure::NeverReached, committed));
        let spent = Progress {
            attempts: 3,
            ..Progress::default()
        };
        assert!(!p.may_retry(Kind::UnaryUnary, Failure::NeverReached, spent));
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        let p = RetryPolicy {
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(250),
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff_cap(1), Duration::from_millis(20));
        assert_eq!(p.backoff_cap(2), Duration::from_millis(40));
        assert_eq!(p.backoff_cap(4), Duration::from_millis(160));
        assert_eq!(p.backoff_cap(5), Duration::from_millis(250));
        assert_eq!(p.backoff_cap(64), Duration::from_millis(250));
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 1..8 {
            let draws: Vec<_> = (0..200).map(|_| p.backoff(retry, &mut rng)).collect();
            assert!(draws.iter().all(|d| *d <= p.backoff_cap(retry)));
            let mean = draws.iter().sum::<Duration>() / 200;
            // Uniform on [0, cap]: the mean is near cap / 2, not at either end.
            assert!(mean > p.backoff_cap(retry) / 4 && mean < p.backoff_cap(retry) * 3 / 4);
        }
        let zero = RetryPolicy {
            backoff_base: Duration::ZERO,
            ..RetryPolicy::default()
        };
        assert_eq!(zero.backoff(3, &mut rng), Duration::ZERO);
    }
}
