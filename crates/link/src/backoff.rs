//! Reconnect delays: exponential with jitter.

use std::time::Duration;

/// Doubles from `min` up to `max`; each delay is drawn from `[d/2, d]` ("equal jitter")
/// so that many nodes cut off at once do not reconnect in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = base / 2;
        let spread = u64::try_from((base - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(fastrand::u64(0..=spread))
    }

    /// After a connection that held: start again from `min`.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// After a refusal that retrying soon will not fix (a bad token): wait the longest.
    pub fn to_max(&mut self) {
        self.next = self.max;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_max_with_jitter_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let mut b = Backoff::new(min, max);
        let mut bases = Vec::new();
        for _ in 0..8 {
            bases.push(b.next);
            let d = b.next_delay();
            let base = bases[bases.len() - 1];
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
        let ms: Vec<u128> = bases.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        b.reset();
        assert!(b.next_delay() <= min);
        b.to_max();
        assert!(b.next_delay() >= max / 2);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
            seen.insert(b.next_delay());
        }
        assert!(
            seen.len() > 10,
            "50 draws gave only {} distinct delays",
            seen.len()
        );
    }
}
