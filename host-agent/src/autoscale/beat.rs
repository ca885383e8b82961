//! The daemon's beat: rounds start at fixed instants (`start + k × interval`),
//! whatever a round costs; a round that starts late does not push the next
//! ones back, and the rounds skipped are counted, never silently lost.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

#[derive(Debug)]
pub struct Beat {
    interval: Interval,
    period: Duration,
    start: Instant,
    /// The last round of the grid run or counted as skipped.
    covered: Option<u128>,
}

impl Beat {
    pub fn new(period: Duration) -> Beat {
        let period = period.max(Duration::from_millis(1));
        // The grid's origin is the first tick's own instant (were it read
        // after, every tick would index one round early).
        let start = Instant::now();
        let mut interval = tokio::time::interval_at(start, period);
        // Skip: a late tick fires once, and the next is the next instant of
        // the grid (neither a burst to catch up, nor a drift).
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Beat { interval, period, start, covered: None }
    }

    fn index(&self, t: Instant) -> u128 {
        t.saturating_duration_since(self.start).as_nanos() / self.period.as_nanos()
    }

    /// Waits for the next round; returns when it was due and how many rounds
    /// of the grid are skipped: those between the last one and this one, and
    /// those this one, starting late, has already passed (they will not run).
    pub async fn tick(&mut self) -> (Instant, u64) {
        let at = self.interval.tick().await;
        let due = self.index(at);
        let mut skipped = match self.covered {
            Some(c) => due.saturating_sub(c + 1),
            None => 0,
        };
        let now = self.index(Instant::now()).max(due);
        skipped += now - due;
        self.covered = Some(now);
        (at, u64::try_from(skipped).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rounds_keep_the_grid_and_skipped_ones_are_counted() {
        let start = Instant::now();
        let mut beat = Beat::new(Duration::from_secs(5));
        let (at, skipped) = beat.tick().await;
        assert_eq!((at - start, skipped), (Duration::ZERO, 0), "the first round at once");
        // A round that costs 3 s: the next still starts at 5 s, not at 8.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (at, skipped) = beat.tick().await;
        assert_eq!((at - start, skipped), (Duration::from_secs(5), 0));
        // A round that costs 12 s: the round due at 10 s starts late, at 17 s,
        // and the one of 15 s, passed, is counted as skipped at once; the next
        // is due at 20 s, on the grid.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let (at, skipped) = beat.tick().await;
        assert_eq!((at - start, skipped), (Duration::from_secs(10), 1), "one round of the grid passed");
        assert_eq!(Instant::now() - start, Duration::from_secs(17));
        let (next, skipped) = beat.tick().await;
        assert_eq!((next - start, skipped), (Duration::from_secs(20), 0), "back on the grid, counted once");
        // Many quick rounds: no drift at all.
        for k in 5..100u64 {
            tokio::time::sleep(Duration::from_millis(1234)).await;
            let (at, skipped) = beat.tick().await;
            assert_eq!((at - start, skipped), (Duration::from_secs(5 * k), 0));
        }
    }
}
