//! Autoscale's agent sessions under a file-descriptor budget. Every session
//! (one socket) holds a permit of the budget, whether it is kept between
//! rounds or in use by a step; when a new session needs a permit and none is
//! free, the least recently used kept session is closed for it. The domain
//! whose session was closed connects again at its next sample (and that is
//! counted): no guest goes silent because the daemon ran out of descriptors.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors the daemon keeps for everything but agent sessions: libvirt's
/// connections (two to four each), the metrics endpoint's
/// (`MAX_METRICS_CONNECTIONS`) and the webhook's connections, the listeners,
/// standard streams, logs, and the blocking pool's transient files.
pub const RESERVED_FDS: u64 = 256;

/// The most sessions `nofile` (`RLIMIT_NOFILE`'s soft limit) leaves room
/// for: all but [`RESERVED_FDS`], and at least 1.
pub fn budget_for(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (what systemd's
/// `LimitNOFILE=` sets) and returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    r.rlim_cur
}

/// The soft `RLIMIT_NOFILE` in force.
pub fn nofile() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 1024, rlim_max: 1024 };
    // SAFETY: getrlimit with a valid pointer to a local.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    r.rlim_cur
}

/// One session and the budget's permit it holds (either may be absent: no
/// session yet; or a session opened outside the budget, by an action).
#[derive(Debug)]
pub struct Session<L> {
    pub link: Option<L>,
    pub permit: Option<OwnedSemaphorePermit>,
}

impl<L> Default for Session<L> {
    fn default() -> Self {
        Session { link: None, permit: None }
    }
}

/// Why a new session cannot be opened: every permit of the budget is held by
/// a session in use by a running step (none kept to close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    pub budget: usize,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "all {} agent sessions of the file-descriptor budget are in use by running steps", self.budget)
    }
}

type Key = (String, String);

#[derive(Debug)]
struct Lru<L> {
    /// key → (last use, session)
    kept: HashMap<Key, (u64, L, OwnedSemaphorePermit)>,
    /// last use → key, oldest first.
    order: BTreeMap<u64, Key>,
    clock: u64,
}

/// The kept sessions, least recently used first out, within a budget of
/// permits shared with the sessions in use.
#[derive(Debug)]
pub struct SessionPool<L> {
    budget: usize,
    permits: Arc<Semaphore>,
    lru: Mutex<Lru<L>>,
    evicted: std::sync::atomic::AtomicU64,
    /// Wakes one step waiting for a descriptor when a session is kept (it can
    /// then be closed for the waiter).
    kept_notify: tokio::sync::Notify,
}

impl<L> SessionPool<L> {
    pub fn new(budget: usize) -> Self {
        let budget = budget.clamp(1, Semaphore::MAX_PERMITS);
        SessionPool {
            budget,
            permits: Arc::new(Semaphore::new(budget)),
            lru: Mutex::new(Lru { kept: HashMap::new(), order: BTreeMap::new(), clock: 0 }),
            evicted: Default::default(),
            kept_notify: tokio::sync::Notify::new(),
        }
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru<L>> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Sessions open: kept, and in use by steps.
    pub fn open(&self) -> usize {
        self.budget - self.permits.available_permits()
    }

    /// Sessions kept between rounds (not in use).
    pub fn kept(&self) -> usize {
        self.lru().kept.len()
    }

    /// Kept sessions closed to make room, since the start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The session kept for `key`, taken out for a step (empty when none).
    pub fn take(&self, key: &Key) -> Session<L> {
        let mut lru = self.lru();
        match lru.kept.remove(key) {
            Some((stamp, link, permit)) => {
                lru.order.remove(&stamp);
                Session { link: Some(link), permit: Some(permit) }
            }
            None => Session::default(),
        }
    }

    /// A permit for one new session: a free one, else the one of the least
    /// recently used kept session, which is closed (the key it belonged to is
    /// returned, to be counted).
    pub fn permit(&self) -> Result<(OwnedSemaphorePermit, Option<Key>), Exhausted> {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Ok((p, None));
        }
        let mut lru = self.lru();
        let Some((_, key)) = lru.order.pop_first() else { return Err(Exhausted { budget: self.budget }) };
        let (_, link, permit) = lru.kept.remove(&key).expect("order and kept agree");
        drop(lru);
        // The socket closes here.
        drop(link);
        self.evicted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((permit, Some(key)))
    }

    /// A permit for one new session as [`SessionPool::permit`] gives it, but
    /// when every permit is held by a running step, waiting up to `wait` for
    /// one of them to end (freeing its permit) or to keep its session (which
    /// is then closed for this one): a fleet larger than the budget is
    /// sampled in turns, not refused.
    pub async fn permit_within(
        &self,
        wait: std::time::Duration,
    ) -> Result<(OwnedSemaphorePermit, Option<Key>), Exhausted> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Interest registered before the check: a session kept in between wakes it.
            let notified = self.kept_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let exhausted = match self.permit() {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            tokio::select! {
                p = self.permits.clone().acquire_owned() => return p.map(|p| (p, None)).map_err(|_| exhausted),
                _ = &mut notified => continue,
                _ = tokio::time::sleep_until(deadline) => return Err(exhausted),
            }
        }
    }

    /// Keeps a step's session for the next round, as the most recently used.
    /// One without a permit gets one (closing the least recently used kept
    /// session if need be) or is closed; a permit without a session is freed.
    /// Returns the key of a session closed to make room, if any.
    pub fn keep(&self, key: Key, s: Session<L>) -> Option<Key> {
        let link = s.link?;
        let (permit, evicted) = match s.permit {
            Some(p) => (p, None),
            None => match self.permit() {
                Ok(pe) => pe,
                Err(_) => return None,
            },
        };
        let mut lru = self.lru();
        lru.clock += 1;
        let stamp = lru.clock;
        if let Some((old, _, _)) = lru.kept.insert(key.clone(), (stamp, link, permit)) {
            lru.order.remove(&old);
        }
        lru.order.insert(stamp, key);
        drop(lru);
        self.kept_notify.notify_one();
        evicted
    }

    /// Closes the kept sessions whose key `live` refuses.
    pub fn retain(&self, mut live: impl FnMut(&Key) -> bool) {
        let mut lru = self.lru();
        let gone: Vec<Key> = lru.kept.keys().filter(|k| !live(k)).cloned().collect();
        for k in gone {
            if let Some((stamp, _, _)) = lru.kept.remove(&k) {
                lru.order.remove(&stamp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> Key {
        ("h".into(), n.into())
    }

    /// A session that says when it is closed.
    struct Sock(&'static str, Arc<Mutex<Vec<&'static str>>>);
    impl Drop for Sock {
        fn drop(&mut self) {
            self.1.lock().expect("log").push(self.0);
        }
    }

    fn open(pool: &SessionPool<Sock>, name: &'static str, closed: &Arc<Mutex<Vec<&'static str>>>) -> Option<Key> {
        let (permit, evicted) = pool.permit().expect("a permit");
        pool.keep(key(name), Session { link: Some(Sock(name, closed.clone())), permit: Some(permit) });
        evicted
    }

    #[test]
    fn the_least_recently_used_session_is_closed_first_and_the_budget_holds() {
        let closed = Arc::new(Mutex::new(Vec::new()));
        let pool = SessionPool::new(3);
        for n in ["a", "b", "c"] {
            assert_eq!(open(&pool, n, &closed), None, "under budget nothing is closed");
        }
        assert_eq!((pool.open(), pool.kept()), (3, 3));
        // a is used again: b is now the least recently used.
        let s = pool.take(&key("a"));
        assert!(s.link.is_some() && s.permit.is_some());
        assert_eq!(pool.open(), 3, "a session in use still holds its descriptor");
        pool.keep(key("a"), s);
        assert_eq!(open(&pool, "d", &closed), Some(key("b")), "the least recently used goes first");
        assert_eq!(*closed.lock().expect("log"), ["b"], "and its socket is closed");
        assert_eq!(open(&pool, "e", &closed), Some(key("c")));
        assert_eq!(pool.open(), 3, "never more open than the budget");
        assert_eq!(pool.evicted(), 2);
        // b, closed, connects again at its next sample, in the room of the least recently used.
        assert!(pool.take(&key("b")).link.is_none(), "b has no kept session: its next sample connects");
        assert_eq!(open(&pool, "b", &closed), Some(key("a")));
    }

    /// A fleet larger than the budget: a new session waits for a running step
    /// to keep its session (closed for it) or end, and is refused only when
    /// none does within the wait.
    #[tokio::test(start_paused = true)]
    async fn a_new_session_waits_its_turn_when_the_budget_is_in_use() {
        let closed = Arc::new(Mutex::new(Vec::new()));
        let pool = Arc::new(SessionPool::new(2));
        open(&pool, "a", &closed);
        open(&pool, "b", &closed);
        let a = pool.take(&key("a"));
        let b = pool.take(&key("b"));
        // Nothing ends within the wait: refused, after the wait.
        let t = tokio::time::Instant::now();
        let r = pool.permit_within(std::time::Duration::from_secs(3)).await;
        assert_eq!(r.err(), Some(Exhausted { budget: 2 }));
        assert_eq!(t.elapsed(), std::time::Duration::from_secs(3));
        // a's step keeps its session 1 s into the wait: it is closed for the waiter.
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.permit_within(std::time::Duration::from_secs(3)).await })
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        pool.keep(key("a"), a);
        let (permit, evicted) = waiter.await.expect("task").expect("a permit once a was kept");
        assert_eq!(evicted, Some(key("a")));
        assert_eq!(*closed.lock().expect("log"), ["a"]);
        // b's step ends without keeping: its permit goes to the next waiter.
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.permit_within(std::time::Duration::from_secs(3)).await })
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        drop(b);
        let (_p2, evicted) = waiter.await.expect("task").expect("b's permit");
        assert_eq!(evicted, None);
        assert_eq!(pool.open(), 2, "never more open than the budget");
        drop(permit);
    }

    #[test]
    fn sessions_in_use_are_never_closed_and_exhaustion_is_said() {
        let closed = Arc::new(Mutex::new(Vec::new()));
        let pool = SessionPool::new(2);
        open(&pool, "a", &closed);
        open(&pool, "b", &closed);
        let a = pool.take(&key("a"));
        let b = pool.take(&key("b"));
        assert_eq!(pool.permit().err(), Some(Exhausted { budget: 2 }), "both in use: nothing to close");
        assert!(closed.lock().expect("log").is_empty());
        // A session opened without a permit (an action's) is kept only with one.
        drop(a);
        let extra = Session { link: Some(Sock("x", closed.clone())), permit: None };
        assert_eq!(pool.keep(key("x"), extra), None);
        assert_eq!((pool.open(), pool.kept()), (2, 1));
        let none = Session { link: Some(Sock("y", closed.clone())), permit: None };
        pool.keep(key("y"), none);
        assert_eq!(*closed.lock().expect("log"), ["a", "x"], "x was kept, then closed for y");
        drop(b);
        pool.retain(|k| k.1 != "y");
        assert_eq!(pool.open(), 0);
    }
}
