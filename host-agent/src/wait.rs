//! The one way vmplug waits for something: a named condition polled until it
//! holds, a deadline, a back-off between polls and an optional cancellation flag.
//! A wait that ends without the condition says what it waited for and how long.
//!
//! ```text
//! Wait::new("the guest to online 4 CPUs", CASE_TIMEOUT).every(POLL).until(|| probe()).await
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

// tokio's clock: the same as std's outside a runtime, and paused with a
// test's paused runtime, so a wait's deadline follows the clock its pauses
// sleep on.
use tokio::time::Instant;

/// How long the first pause between two polls is, unless said otherwise.
pub const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause the back-off grows to, unless said otherwise.
pub const MAX_PAUSE: Duration = Duration::from_millis(500);

/// Why a wait ended without its condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("{what}: not within {timeout:?}")]
    TimedOut { what: String, timeout: Duration },
    #[error("{what}: cancelled")]
    Cancelled { what: String },
}

/// A bounded wait for a named condition.
#[derive(Debug, Clone)]
pub struct Wait {
    what: String,
    timeout: Duration,
    first: Duration,
    max: Duration,
    cancel: Option<Arc<AtomicBool>>,
}

impl Wait {
    /// Waits at most `timeout` for `what` (said in the error), polling after
    /// [`FIRST_PAUSE`], the pause doubling up to [`MAX_PAUSE`].
    pub fn new(what: impl Into<String>, timeout: Duration) -> Wait {
        Wait { what: what.into(), timeout, first: FIRST_PAUSE, max: MAX_PAUSE, cancel: None }
    }

    /// Polls at a fixed interval instead of backing off.
    pub fn every(self, pause: Duration) -> Wait {
        Wait { first: pause, max: pause, ..self }
    }

    /// Backs off from `first` to at most `max`, doubling.
    pub fn backoff(self, first: Duration, max: Duration) -> Wait {
        Wait { first, max: max.max(first), ..self }
    }

    /// Ends the wait as soon as `flag` is set (checked before every poll).
    pub fn cancel_on(self, flag: Arc<AtomicBool>) -> Wait {
        Wait { cancel: Some(flag), ..self }
    }

    /// What this wait is for.
    pub fn what(&self) -> &str {
        &self.what
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst))
    }

    /// The pause before the next poll, or why the wait is over.
    fn next(&self, end: Instant, pause: &mut Duration) -> Result<Duration, WaitError> {
        let now = Instant::now();
        if now >= end {
            return Err(WaitError::TimedOut { what: self.what.clone(), timeout: self.timeout });
        }
        let p = (*pause).min(end - now);
        *pause = (*pause * 2).min(self.max);
        Ok(p)
    }

    fn check_cancel(&self) -> Result<(), WaitError> {
        if self.cancelled() {
            return Err(WaitError::Cancelled { what: self.what.clone() });
        }
        Ok(())
    }

    /// Starts the clock: the caller polls in its own loop and calls
    /// [`Waiting::pause`] between two looks (for probes that borrow what the
    /// loop holds, such as an agent session).
    pub fn start(&self) -> Waiting<'_> {
        Waiting { wait: self, end: Instant::now() + self.timeout, pause: self.first }
    }

    /// Polls `probe` (a quick, non-blocking look) until it gives a value, on the
    /// async runtime's timer. The probe runs at least once, and once more at the deadline.
    pub async fn until<T>(&self, mut probe: impl FnMut() -> Option<T>) -> Result<T, WaitError> {
        let mut w = self.start();
        loop {
            w.check_cancel()?;
            if let Some(v) = probe() {
                return Ok(v);
            }
            w.pause().await?;
        }
    }

    /// [`Wait::until`] with an async probe.
    pub async fn until_async<T, F: std::future::Future<Output = Option<T>>>(
        &self,
        mut probe: impl FnMut() -> F,
    ) -> Result<T, WaitError> {
        let mut w = self.start();
        loop {
            w.check_cancel()?;
            if let Some(v) = probe().await {
                return Ok(v);
            }
            w.pause().await?;
        }
    }

    /// [`Wait::until`] for a thread that is not on the async runtime (it sleeps).
    pub fn until_blocking<T>(&self, mut probe: impl FnMut() -> Option<T>) -> Result<T, WaitError> {
        let mut w = self.start();
        loop {
            w.check_cancel()?;
            if let Some(v) = probe() {
                return Ok(v);
            }
            w.pause_blocking()?;
        }
    }
}

/// A wait under way (see [`Wait::start`]).
#[derive(Debug)]
pub struct Waiting<'a> {
    wait: &'a Wait,
    end: Instant,
    pause: Duration,
}

impl Waiting<'_> {
    fn check_cancel(&self) -> Result<(), WaitError> {
        self.wait.check_cancel()
    }

    /// How long is left before the deadline.
    pub fn left(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }

    /// Sleeps until the next look on the async runtime's timer, or says why
    /// the wait is over (the deadline passed, or it was cancelled).
    pub async fn pause(&mut self) -> Result<(), WaitError> {
        self.check_cancel()?;
        let p = self.wait.next(self.end, &mut self.pause)?;
        tokio::time::sleep(p).await;
        Ok(())
    }

    /// [`Waiting::pause`] on a thread that is not on the async runtime.
    pub fn pause_blocking(&mut self) -> Result<(), WaitError> {
        self.check_cancel()?;
        let p = self.wait.next(self.end, &mut self.pause)?;
        std::thread::sleep(p);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_holds_ends_the_wait_with_its_value() {
        let mut n = 0;
        let v = Wait::new("three polls", Duration::from_secs(5)).every(Duration::from_millis(1)).until_blocking(|| {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(v, Ok(3));
    }

    #[test]
    fn a_timeout_names_what_was_awaited() {
        let t = Instant::now();
        let e = Wait::new("the guest to answer", Duration::from_millis(60))
            .backoff(Duration::from_millis(5), Duration::from_millis(20))
            .until_blocking(|| None::<()>)
            .expect_err("never holds");
        assert!(t.elapsed() >= Duration::from_millis(60) && t.elapsed() < Duration::from_secs(2));
        assert_eq!(e.to_string(), "the guest to answer: not within 60ms");
    }

    #[test]
    fn the_back_off_doubles_up_to_its_bound() {
        let w = Wait::new("x", Duration::from_secs(60)).backoff(Duration::from_millis(10), Duration::from_millis(35));
        let end = Instant::now() + Duration::from_secs(60);
        let mut pause = w.first;
        let pauses: Vec<u128> = (0..4).map(|_| w.next(end, &mut pause).expect("in time").as_millis()).collect();
        assert_eq!(pauses, [10, 20, 35, 35]);
    }

    #[test]
    fn a_set_flag_cancels_before_the_next_poll() {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let e = Wait::new("the daemon", Duration::from_secs(30))
            .every(Duration::from_millis(1))
            .cancel_on(flag)
            .until_blocking(|| {
                f.store(true, Ordering::SeqCst);
                None::<()>
            });
        assert_eq!(e, Err(WaitError::Cancelled { what: "the daemon".into() }));
    }

    #[tokio::test]
    async fn the_async_forms_wait_on_the_runtime() {
        let mut n = 0;
        let v = Wait::new("two polls", Duration::from_secs(5))
            .every(Duration::from_millis(1))
            .until(|| {
                n += 1;
                (n == 2).then_some("done")
            })
            .await;
        assert_eq!(v, Ok("done"));
        let e = Wait::new("nothing", Duration::from_millis(10)).until_async(|| async { None::<()> }).await;
        assert!(matches!(e, Err(WaitError::TimedOut { .. })));
    }
}
