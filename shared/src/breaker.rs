//! A circuit breaker: after `threshold` failures in a row, calls are refused for `cool_down`;
//! then one trial call decides whether it closes again or stays open.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    state: Mutex<State>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A trial call is in flight; others wait for its verdict.
    HalfOpen,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cool_down,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// Whether a call may go ahead now. After the cool-down, exactly one caller gets `true`.
    pub fn allow(&self) -> bool {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        }
    }

    pub fn success(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    pub fn failure(&self) {
        let mut state = self.lock();
        *state = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: Instant::now() + self.cool_down,
            },
        };
    }

    /// Open or half-open: calls are (mostly) being refused.
    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }

    /// How long until a trial call will be allowed; zero when calls are allowed now.
    pub fn retry_in(&self) -> Duration {
        match *self.lock() {
            State::Open { until } => until.saturating_duration_since(Instant::now()),
            State::Closed { .. } | State::HalfOpen => Duration::ZERO,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_recovers_after_cool_down() {
        let breaker = Breaker::new(5, Duration::from_secs(30));
        for _ in 0..4 {
            breaker.failure();
            assert!(breaker.allow());
        }
        breaker.failure();
        assert!(breaker.is_open());
        assert!(!breaker.allow());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!breaker.allow());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(breaker.allow(), "one trial after the cool-down");
        assert!(!breaker.allow(), "only one");
        breaker.success();
        assert!(!breaker.is_open());
        assert!(breaker.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_trial_opens_again() {
        let breaker = Breaker::new(1, Duration::from_secs(10));
        breaker.failure();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(breaker.allow());
        breaker.failure();
        assert!(!breaker.allow());
        assert_eq!(breaker.retry_in(), Duration::from_secs(10));
    }

    #[test]
    fn success_resets_the_count() {
        let breaker = Breaker::new(2, Duration::from_secs(1));
        breaker.failure();
        breaker.success();
        breaker.failure();
        assert!(!breaker.is_open());
    }
}
