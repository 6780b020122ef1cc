//! The one retry-delay policy: exponential growth with full jitter.
//!
//! Owns the arithmetic of "how long until the next attempt": the ceiling
//! doubles from an initial delay up to a maximum, and each delay is drawn
//! uniformly from zero to that ceiling ("full jitter"), so many gateways
//! losing the same store do not reconnect in lockstep, and many events
//! failing at once do not retry in lockstep. Sources reconnecting, plugin
//! calls retrying and quarantine probes all use it. It must not sleep, log
//! or know about what it paces: the caller asks for [`Backoff::next_delay`]
//! and sleeps itself (racing its shutdown). A source calls
//! [`Backoff::reset`] only after a healthy session, never merely after a
//! successful connect, so a store that accepts and then drops every
//! connection is still retried ever more slowly.

use std::time::Duration;

/// Exponential backoff with full jitter. One per retrying loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff whose first delay is at most `initial` and whose delays
    /// never exceed `max` (raised to `initial` if smaller).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The delay to wait before the next attempt: uniformly random between
    /// zero and [`Backoff::ceiling`], which then doubles (up to the
    /// maximum) for the attempt after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::random_range(0..=nanos))
    }

    /// The upper bound of the next delay: `initial × 2^attempts`, capped at
    /// the maximum.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Start over from the initial delay. Call only after a healthy session
    /// (one that lasted and did useful work), not after every successful
    /// connect.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_up_to_the_maximum() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling());
            b.next_delay();
        }
        assert_eq!(
            ceilings,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(b.attempts(), 6);
    }

    #[test]
    fn delays_stay_within_zero_and_the_ceiling_and_are_jittered() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        let mut distinct = delays.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 100, "delays are not jittered: {delays:?}");
        assert!(delays.iter().any(|d| *d < Duration::from_millis(500)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(500)));
    }

    #[test]
    fn reset_starts_over_from_the_initial_delay() {
        let mut b = Backoff::new(10 * MS, Duration::from_secs(60));
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), 320 * MS);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.ceiling(), 10 * MS);
        assert!(b.next_delay() <= 10 * MS);
    }

    #[test]
    fn many_attempts_neither_overflow_nor_exceed_the_maximum() {
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(7200));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(7200));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(7200));
    }

    #[test]
    fn a_maximum_below_the_initial_delay_is_raised_to_it() {
        let mut b = Backoff::new(500 * MS, 100 * MS);
        assert_eq!(b.ceiling(), 500 * MS);
        b.next_delay();
        assert_eq!(b.ceiling(), 500 * MS);
    }
}
