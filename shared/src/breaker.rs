//! A circuit breaker: after `threshold` failures in a row, calls are refused for `cool_down`;
//! then one trial call decides whether it closes again or stays open. A trial whose outcome is
//! never recorded (its call was cancelled) cannot keep the breaker half-open forever: a
//! [`Permit`] dropped without an outcome frees the trial at once, and a trial reported by
//! neither means is given up after another `cool_down`.

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
    /// A trial call is in flight; others wait for its verdict, or until `until`, when the
    /// trial counts as lost and another caller may try.
    HalfOpen {
        until: Instant,
    },
}

/// Leave to make one call; record its outcome with [`Permit::success`] or
/// [`Permit::failure`]. Dropped without either (the call was cancelled), it says nothing about
/// the downstream: a trial is handed back so that the next caller may try at once.
#[must_use = "record the call's outcome with success() or failure()"]
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    trial: bool,
    recorded: bool,
}

impl Permit<'_> {
    pub fn success(mut self) {
        self.recorded = true;
        self.breaker.success();
    }

    pub fn failure(mut self) {
        self.recorded = true;
        self.breaker.failure();
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.trial && !self.recorded {
            let mut state = self.breaker.lock();
            if matches!(*state, State::HalfOpen { .. }) {
                *state = State::Open {
                    until: Instant::now(),
                };
            }
        }
    }
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cool_down,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// Leave for one call, or `None` while the breaker refuses calls. After the cool-down,
    /// exactly one caller gets a permit: the trial.
    pub fn acquire(&self) -> Option<Permit<'_>> {
        let mut state = self.lock();
        let now = Instant::now();
        let trial = match *state {
            State::Closed { .. } => false,
            State::Open { until } | State::HalfOpen { until } if now >= until => {
                *state = State::HalfOpen {
                    until: now + self.cool_down,
                };
                true
            }
            State::Open { .. } | State::HalfOpen { .. } => return None,
        };
        Some(Permit {
            breaker: self,
            trial,
            recorded: false,
        })
    }

    /// Whether a call would be let through now, without taking the trial.
    pub fn would_allow(&self) -> bool {
        match *self.lock() {
            State::Closed { .. } => true,
            State::Open { until } | State::HalfOpen { until } => Instant::now() >= until,
        }
    }

    fn success(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    fn failure(&self) {
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
            State::Open { until } | State::HalfOpen { until } => {
                until.saturating_duration_since(Instant::now())
            }
            State::Closed { .. } => Duration::ZERO,
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
            breaker.acquire().expect("closed").failure();
        }
        assert!(!breaker.is_open());
        breaker.acquire().expect("closed").failure();
        assert!(breaker.is_open());
        assert!(breaker.acquire().is_none());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(breaker.acquire().is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        let trial = breaker.acquire().expect("one trial after the cool-down");
        assert!(breaker.acquire().is_none(), "only one");
        trial.success();
        assert!(!breaker.is_open());
        assert!(breaker.acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_trial_opens_again() {
        let breaker = Breaker::new(1, Duration::from_secs(10));
        breaker.failure();
        tokio::time::advance(Duration::from_secs(10)).await;
        breaker.acquire().expect("the trial").failure();
        assert!(breaker.acquire().is_none());
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

    #[tokio::test(start_paused = true)]
    async fn cancelled_trial_lets_the_next_caller_try() {
        let breaker = Breaker::new(1, Duration::from_secs(10));
        breaker.failure();
        tokio::time::advance(Duration::from_secs(10)).await;
        let trial = breaker.acquire().expect("the trial");
        assert!(breaker.acquire().is_none(), "one trial at a time");
        // The trial's call is cancelled: nothing records an outcome.
        drop(trial);
        let trial = breaker
            .acquire()
            .expect("a new trial after a cancelled one");
        trial.success();
        assert!(!breaker.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn unreported_trial_is_given_up_after_the_cool_down() {
        let breaker = Breaker::new(1, Duration::from_secs(10));
        breaker.failure();
        tokio::time::advance(Duration::from_secs(10)).await;
        // A trial whose call never ends (its permit is neither recorded nor dropped).
        let _stuck = breaker.acquire().expect("the trial");
        assert!(breaker.acquire().is_none());
        assert!(!breaker.would_allow());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(breaker.acquire().is_none(), "the trial is still in flight");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(breaker.would_allow());
        assert!(
            breaker.acquire().is_some(),
            "a lost trial does not keep the breaker half-open"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permits_in_the_closed_state_say_nothing_when_dropped() {
        let breaker = Breaker::new(1, Duration::from_secs(10));
        for _ in 0..10 {
            drop(breaker.acquire().expect("closed"));
        }
        assert!(!breaker.is_open(), "cancelled calls are not failures");
        breaker.acquire().expect("closed").failure();
        assert!(breaker.acquire().is_none());
        assert_eq!(breaker.retry_in(), Duration::from_secs(10));
    }
}
