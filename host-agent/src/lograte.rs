//! Log lines a peer can cause at will (a guest's invalid frames, a flood of
//! events), bounded: the first few of each interval in full, the rest counted
//! and the count given with the next line logged, or when the limiter is
//! done. One `status` against an agent sending `x\n` 2^20 times used to write
//! 3.1 million warnings.

use std::time::{Duration, Instant};

/// Lines logged in full per interval.
pub const BURST: u32 = 5;
/// How long an interval is: at most [`BURST`] lines per this.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Whether one more occurrence is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it, and say that `suppressed` occurrences before it were not logged.
    Log { suppressed: u64 },
    /// Count it only.
    Drop,
}

/// One limiter per peer and kind of line (each link has its own).
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    interval: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(BURST, INTERVAL)
    }
}

impl LogLimiter {
    pub fn new(burst: u32, interval: Duration) -> Self {
        LogLimiter { burst, interval, window_start: None, in_window: 0, suppressed: 0 }
    }

    /// One more occurrence at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        let new_window = self.window_start.is_none_or(|w| now.saturating_duration_since(w) >= self.interval);
        if new_window {
            (self.window_start, self.in_window) = (Some(now), 0);
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Admit::Log { suppressed: std::mem::take(&mut self.suppressed) }
        } else {
            self.suppressed += 1;
            Admit::Drop
        }
    }

    /// The occurrences not logged since the last line, if any (for a last
    /// summary line when the peer is gone).
    pub fn take_suppressed(&mut self) -> Option<u64> {
        Some(std::mem::take(&mut self.suppressed)).filter(|n| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_counted_until_the_next_interval() {
        let mut l = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let admitted: Vec<Admit> = (0..1000).map(|_| l.admit(t0)).collect();
        assert_eq!(admitted[..3], [Admit::Log { suppressed: 0 }; 3]);
        assert!(admitted[3..].iter().all(|a| *a == Admit::Drop));
        assert_eq!(l.admit(t0 + Duration::from_secs(9)), Admit::Drop, "still the same interval");
        assert_eq!(l.admit(t0 + Duration::from_secs(10)), Admit::Log { suppressed: 998 }, "the count, once");
        assert_eq!(l.admit(t0 + Duration::from_secs(10)), Admit::Log { suppressed: 0 });
        assert_eq!(l.take_suppressed(), None);
        l.admit(t0 + Duration::from_secs(11));
        l.admit(t0 + Duration::from_secs(11));
        assert_eq!(l.take_suppressed(), Some(1));
        assert_eq!(l.take_suppressed(), None, "taken once");
    }
}
