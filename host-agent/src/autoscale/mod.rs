//! `vmplug autoscale`: grow running VMs from their guests' pressure, within a
//! policy's limits, through exactly the `setvcpus` / `attach-memory` closed loop.
//!
//! By concern: [`policy`] (the file and its limits), [`decision`] (the pure
//! decision, table-tested), [`metrics`] (the Prometheus endpoint), and here the
//! daemon, which only samples, decides, applies, and records every decision as
//! one JSON event.

pub mod beat;
pub mod decision;
pub mod events;
pub mod listing;
pub mod metrics;
pub mod policy;
pub mod sessions;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use vmplug_common::protocol::ZonePolicy;
use vmplug_common::Bytes;

pub use decision::{
    decide, decide_alert, Action, Capacity, Decision, DecisionEvent, DomainState, Resource, Sample, KEPT_SAMPLES,
};
pub use metrics::{metrics_addr, metrics_response, serve_metrics, DomainLabels, Format, Metrics, ALERT_RESULTS};
pub use policy::{glob, Limits, Policy, PolicyError, MAX_CONCURRENCY, MAX_TIMING_S};

pub(crate) use listing::select_running;
use sessions::{Session, SessionPool};

use crate::domain::{Affect, Connection, DomainError};
use crate::facts::gather_timed_with;
use crate::link::{discover, AgentAddr, GuestLink, LinkError};
use crate::ops::{self, HotplugOpts, MemoryOpts};
use crate::report::Outcome;
use crate::verb;
use crate::vmem::{ResizeOpts, SizeChange};
use crate::xml::DomainFacts;

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Everything the daemon needs to act on one host.
#[derive(Debug, Clone)]
pub struct Host {
    pub uri: String,
    pub conn: Arc<dyn Connection>,
    /// Hot-plugs allowed at once on this host (`[host] concurrency`). Only actions
    /// take a permit; sampling never waits for another domain.
    pub actions: Arc<tokio::sync::Semaphore>,
    /// The parsed live XML of its domains between rounds.
    pub xml: Arc<listing::XmlCache>,
}

impl Host {
    /// `concurrency` is held to `1..=MAX_CONCURRENCY` (the policy refuses
    /// anything else before a host is made; a semaphore that large panics).
    pub fn new(uri: String, conn: Arc<dyn Connection>, concurrency: usize) -> Host {
        let permits = concurrency.clamp(1, MAX_CONCURRENCY);
        Host { uri, conn, actions: Arc::new(tokio::sync::Semaphore::new(permits)), xml: Default::default() }
    }
}

/// What autoscale knows of each domain between rounds, by (host URI, name);
/// shared by the sampling rounds and the alert receiver, so both see one
/// cooldown, one back-off and one action in flight per domain.
pub type States = std::sync::Mutex<std::collections::HashMap<(String, String), DomainState>>;

/// The policy, its parsed limits, the metrics, and whether to act.
#[derive(Debug)]
pub struct Engine {
    pub policy: Policy,
    pub limits: Limits,
    pub metrics: Metrics,
    pub dry_run: bool,
    pub states: States,
    /// The agent session kept per domain between rounds (vsock and hybrid vsock;
    /// see [`Engine::keep_session`]), within the file-descriptor budget.
    pub sessions: SessionPool<GuestLink>,
    /// The round the daemon is in (the webhook reads the cached XML of it).
    pub round: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// An engine whose sessions may use every descriptor of the process's
    /// `RLIMIT_NOFILE` but [`sessions::RESERVED_FDS`].
    pub fn new(policy: Policy, limits: Limits, dry_run: bool) -> Engine {
        Engine::with_session_budget(policy, limits, dry_run, sessions::budget_for(sessions::nofile()))
    }

    pub fn with_session_budget(policy: Policy, limits: Limits, dry_run: bool, budget: usize) -> Engine {
        let metrics = Metrics::default();
        let sessions = SessionPool::new(budget);
        metrics.set_session_budget(sessions.budget());
        Engine { policy, limits, metrics, dry_run, states: States::default(), sessions, round: Default::default() }
    }

    /// The round the daemon is in.
    pub fn round(&self) -> u64 {
        self.round.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The session kept for this domain, if any (taken while its step runs: a
    /// domain has one step in flight at most, see [`Engine::begin`]).
    pub fn take_session(&self, key: &(String, String)) -> Session<GuestLink> {
        self.sessions.take(key)
    }

    /// A descriptor of the budget for a new session: a free one, else the
    /// least recently used kept session's (closed, and counted).
    /// When the whole budget is in use by running steps, waits up to `wait`
    /// for one of them to keep its session or end.
    async fn session_permit(&self, wait: Duration) -> Result<tokio::sync::OwnedSemaphorePermit, LinkError> {
        match self.sessions.permit_within(wait).await {
            Ok((permit, evicted)) => {
                if evicted.is_some() {
                    self.metrics.session_evicted();
                }
                Ok(permit)
            }
            Err(e) => {
                self.metrics.session_refused();
                Err(LinkError::Io(std::io::Error::other(e.to_string())))
            }
        }
    }

    /// Keeps a session for the domain's next round — unless it is virtio-serial:
    /// QEMU's chardev admits one host client at a time, so autoscale holds that
    /// channel only for a step (sample, decide, act) and then gives it back, and an
    /// operator's `vmplug`, which retries its connection for `--agent-wait`, gets
    /// it in between. vsock admits several sessions (the agent serves
    /// `MAX_VSOCK_SESSIONS`), so there autoscale keeps its one.
    pub fn keep_session(&self, key: (String, String), mut s: Session<GuestLink>) {
        s.link = s.link.filter(|l| !matches!(l.addr, AgentAddr::Serial { .. }));
        if s.link.is_none() {
            return;
        }
        if self.sessions.keep(key, s).is_some() {
            self.metrics.session_evicted();
        }
    }

    /// Closes the sessions of `uri`'s domains no longer selected or running.
    fn retain_sessions(&self, uri: &str, live: &std::collections::HashSet<String>) {
        self.sessions.retain(|(u, domain)| u != uri || live.contains(domain));
    }

    /// Marks the domain's step as running and returns its state, or `None` when
    /// a step on it is already running.
    pub fn begin(&self, key: &(String, String)) -> Option<DomainState> {
        let mut map = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let st = map.entry(key.clone()).or_default();
        if st.in_flight {
            return None;
        }
        st.in_flight = true;
        Some(DomainState { in_flight: false, ..st.clone() })
    }

    /// Stores the state a finished step leaves (no longer in flight).
    pub fn end(&self, key: (String, String), st: DomainState) {
        self.states.lock().unwrap_or_else(|e| e.into_inner()).insert(key, st);
    }
}

/// The domain's and the host's room, from libvirt (trusted).
fn capacity(facts: &DomainFacts, room: &HostRoom) -> Capacity {
    let plugged: u64 = facts.virtio_mems.iter().map(|v| v.plugged().get()).sum();
    let regions: u64 = facts.virtio_mems.iter().map(|v| v.size.get()).sum();
    Capacity {
        vcpus: facts.vcpus_current,
        vcpus_max: facts.vcpus_max,
        memory: facts.guest_memory(),
        max_memory: facts.max_memory.unwrap_or(facts.memory),
        free_slots: facts.free_slots(),
        host_free: room.free,
        host_cpus: room.cpus,
        host_vcpus: room.vcpus,
        virtio_mem: !facts.virtio_mems.is_empty(),
        virtio_room: Bytes(regions.saturating_sub(plugged)),
        virtio_plugged: Bytes(plugged),
    }
}

/// Runs a decided action (unless dry-run) and records its outcome in `ev` and
/// in the domain's state: cooldown from now, back-off after a failure.
/// `link` is the domain's agent session, which the action uses and leaves there.
async fn apply(
    engine: &Engine,
    host: &Host,
    d: Decision,
    ev: &mut DecisionEvent,
    state: &mut DomainState,
    link: &mut Option<GuestLink>,
) {
    ev.rule = d.rule;
    ev.reason = d.reason;
    ev.action = d.action.clone();
    if d.action == Action::None || engine.dry_run {
        return;
    }
    let _permit = host.actions.acquire().await;
    let (outcome, message) = act(engine, host, &ev.domain, &d.action, link).await;
    ev.outcome = Some(outcome);
    ev.message = Some(message);
    state.last_action_s = Some(now_s());
    if outcome == Outcome::Ok {
        state.failures = 0;
        state.samples.clear();
    } else {
        state.failures += 1;
        state.backoff_until_s =
            now_s().saturating_add(engine.limits.backoff_s.saturating_mul(u64::from(state.failures.min(10))));
    }
}

/// Samples, decides and (unless `dry_run`) acts on one domain; returns the event.
pub async fn step_domain(
    engine: &Engine,
    host: &Host,
    facts: &DomainFacts,
    room: &HostRoom,
    state: &mut DomainState,
) -> Result<DecisionEvent, DomainError> {
    let cap = capacity(facts, room);
    let started = std::time::Instant::now();
    let mut ev = DecisionEvent::new(&host.uri, &facts.name, &cap, now_s(), engine.dry_run);
    let key = (host.uri.clone(), facts.name.clone());
    let mut session = engine.take_session(&key);
    let sample = match sample(engine, &host.uri, facts, &mut session).await {
        Ok(p) => Sample::from(&p),
        Err(e) => {
            // A silent agent: the domain is left alone, and that is reported.
            // Its XML is read again next round (its agent may have moved).
            host.xml.invalidate(&facts.name);
            ev.reason = format!("no pressure from the guest agent: {e}");
            engine.metrics.record(&ev, &cap, None);
            return Ok(ev);
        }
    };
    let guest = session.link.as_ref().map(|l| l.info.clone());
    ev.inputs = Some(sample);
    state.samples.push_back(sample);
    while state.samples.len() > KEPT_SAMPLES {
        state.samples.pop_front();
    }
    let d = decide(&engine.limits, state, &cap, ev.ts);
    apply(engine, host, d, &mut ev, state, &mut session.link).await;
    if ev.outcome.is_some() {
        host.xml.invalidate(&facts.name);
    }
    engine.keep_session(key, session);
    ev.duration_ms = started.elapsed().as_millis() as u64;
    engine.metrics.record(&ev, &cap, guest.as_ref());
    Ok(ev)
}

/// How long a round waits for a domain's agent to answer a new connection.
pub const SAMPLE_CONNECT_WAIT: Duration = Duration::from_secs(3);

/// The guest's pressure and fresh facts, through the held session when it still
/// answers (an agent restart or the vsock idle limit ends it), else a new one
/// (counted in `vmplug_agent_sessions_total`), within the descriptor budget.
/// `session` holds the session after.
async fn sample(
    engine: &Engine,
    uri: &str,
    facts: &DomainFacts,
    session: &mut Session<GuestLink>,
) -> Result<vmplug_common::protocol::Pressure, LinkError> {
    let want = discover(facts).ok();
    if let Some(l) = session.link.as_mut().filter(|l| want.as_ref() == Some(&l.addr)) {
        match l.refresh().await {
            Ok(()) => return l.pressure().await,
            Err(e) => {
                tracing::debug!(domain = %facts.name, error = %e, "the kept agent session ended; connecting again")
            }
        }
    }
    // Closed before connecting again: a virtio-serial channel admits one client.
    session.link = None;
    if session.permit.is_none() {
        session.permit = Some(engine.session_permit(SAMPLE_CONNECT_WAIT).await?);
    }
    let mut l = match ops::connect_agent(facts, None, SAMPLE_CONNECT_WAIT).await {
        Ok(l) => l,
        Err(e) => {
            session.permit = None;
            return Err(e);
        }
    };
    engine.metrics.session_opened(&DomainLabels { uri: uri.into(), domain: facts.name.clone() });
    let p = l.pressure().await;
    session.link = Some(l);
    p
}

/// Applies one decided action through exactly the verbs' closed loop, on the
/// domain's agent session when there is one (no second connection, no second
/// handshake); `link` holds the session the verb ended with.
async fn act(
    engine: &Engine,
    host: &Host,
    name: &str,
    action: &Action,
    link: &mut Option<GuestLink>,
) -> (Outcome, String) {
    let opts = HotplugOpts {
        affect: if engine.policy.persist { Affect::Both } else { Affect::Live },
        timeout: Duration::from_secs(60),
        agent_wait: Duration::from_secs(10),
        no_wait: false,
        force: false,
        agent: None,
        zone: ZonePolicy::Auto,
    };
    let opts = match *action {
        Action::GrowVirtioMem { .. } | Action::ShrinkVirtioMem { .. } => {
            HotplugOpts { zone: ZonePolicy::Movable, ..opts }
        }
        _ => opts,
    };
    if *action == Action::None {
        return (Outcome::Ok, "nothing to do".into());
    }
    let (facts, mut held, run) = match gather_timed_with(host.conn.clone(), name, &opts, link.take()).await {
        Ok(g) => g,
        Err(e) => return (Outcome::LibvirtError, e.to_string()),
    };
    let r = match *action {
        Action::AddVcpus { to } => verb::run_on(&ops::Setvcpus { target: to }, &facts, held.as_mut(), &opts, run).await,
        Action::AddMemory { size, ceiling } => {
            let mem = MemoryOpts {
                size,
                node: None,
                round_up: true,
                ceiling: Some(ceiling),
                max_dimm: crate::planner::DEFAULT_MAX_DIMM,
                request_id: ops::new_request_id(),
            };
            verb::run_on(&ops::AttachMemory { mem }, &facts, held.as_mut(), &opts, run).await
        }
        Action::GrowVirtioMem { size } | Action::ShrinkVirtioMem { size } => {
            let change = match *action {
                Action::GrowVirtioMem { .. } => SizeChange::Grow(size),
                _ => match decision::shrink_within_forecast(size, facts.forecast.as_ref()) {
                    s if s.get() == 0 => {
                        *link = held;
                        return (
                            Outcome::Refused,
                            format!("the guest forecasts less than a block of its virtio-mem it can give back now (asked {size})"),
                        );
                    }
                    s => SizeChange::Shrink(s),
                },
            };
            let r = ResizeOpts { change, node: None, settle: Duration::from_secs(10) };
            verb::run_on(&crate::vmem::ResizeMemory { r }, &facts, held.as_mut(), &opts, run).await
        }
        Action::None => return (Outcome::Ok, "nothing to do".into()),
    };
    *link = held;
    match r {
        Ok(r) => (r.outcome, r.message),
        Err(e) => (Outcome::LibvirtError, e.to_string()),
    }
}

/// What the beat knows of one host between rounds.
#[derive(Debug, Default)]
struct HostBeat {
    /// Its listing of an earlier round is still running.
    listing: std::sync::atomic::AtomicBool,
    /// Domains it selected in its last listing (the ones a skipped round misses).
    selected: std::sync::atomic::AtomicUsize,
}

/// The daemon: on a fixed beat (every `interval_s`, rounds never pushed back
/// by a slow one, skipped ones counted), every host listed at the same time
/// and every selected running domain stepped in its own task; a domain whose
/// step is still running, or whose host is still listing, misses the round
/// (counted in `vmplug_autoscale_missed_samples_total`) without holding up
/// any other. `once` runs until each domain has had `sustain` samples and one
/// decision.
pub async fn run(hosts: Vec<Host>, policy: Policy, dry_run: bool, once: bool) -> Result<(), PolicyError> {
    let limits = policy.limits()?;
    let nofile = sessions::raise_nofile();
    let budget = sessions::budget_for(nofile);
    tracing::info!(nofile, sessions = budget, "agent session budget from RLIMIT_NOFILE");
    let engine = Arc::new(Engine::with_session_budget(policy, limits, dry_run, budget));
    if let Some(addr) = engine.policy.metrics_listen.clone() {
        let e = engine.clone();
        let bound = serve_metrics(&addr, e)
            .await
            .map_err(|err| PolicyError::Invalid(format!("metrics_listen {addr}: {err}")))?;
        tracing::info!(%bound, "serving metrics at /metrics");
    }
    if let Some(addr) = engine.policy.webhook_listen.clone() {
        let bound = webhook::serve(&addr, engine.clone(), hosts.clone())
            .await
            .map_err(|err| PolicyError::Invalid(format!("webhook_listen {addr}: {err}")))?;
        tracing::info!(%bound, "receiving Alertmanager webhooks at /alerts");
    }
    let rounds = if once { engine.limits.sustain as u64 } else { u64::MAX };
    let beats: Vec<Arc<HostBeat>> = hosts.iter().map(|_| Arc::default()).collect();
    let mut beat = beat::Beat::new(Duration::from_secs(engine.policy.timing.interval_s.max(1)));
    for round in 0..rounds {
        let (due, skipped) = beat.tick().await;
        engine.round.store(round, std::sync::atomic::Ordering::Relaxed);
        engine.metrics.round_started(skipped, engine.sessions.open(), engine.sessions.kept());
        if skipped > 0 {
            let known: usize = beats.iter().map(|b| b.selected.load(std::sync::atomic::Ordering::Relaxed)).sum();
            engine.metrics.missed(known as u64 * skipped);
            tracing::warn!(skipped, "rounds skipped: the daemon fell behind its beat");
        }
        let mut rounds_here = tokio::task::JoinSet::new();
        for (host, hb) in hosts.iter().zip(&beats) {
            if hb.listing.swap(true, std::sync::atomic::Ordering::AcqRel) {
                // Its previous listing is still running: this round misses it.
                engine.metrics.missed(hb.selected.load(std::sync::atomic::Ordering::Relaxed) as u64);
                tracing::debug!(uri = %host.uri, "previous listing still running; skipped this round");
                continue;
            }
            let (engine, host, hb) = (engine.clone(), host.clone(), hb.clone());
            rounds_here.spawn(host_round(engine, host, hb, round, due));
        }
        if once {
            while rounds_here.join_next().await.is_some() {}
        } else {
            rounds_here.detach_all();
        }
    }
    Ok(())
}

/// One host's round: list it, step each selected domain in its own task,
/// and (once they all ended) record how long the round took.
async fn host_round(engine: Arc<Engine>, host: Host, hb: Arc<HostBeat>, round: u64, due: tokio::time::Instant) {
    let (selected, room) = select_running(&engine.policy, &host, round).await;
    engine.metrics.listed(&host.uri, due.elapsed(), host.xml.reads());
    hb.selected.store(selected.len(), std::sync::atomic::Ordering::Relaxed);
    // Series and sessions of domains that stopped or left the selection go.
    let live: std::collections::HashSet<String> = selected.iter().map(|f| f.name.clone()).collect();
    engine.metrics.retain_uri(&host.uri, &live);
    engine.retain_sessions(&host.uri, &live);
    let room = Arc::new(room);
    let mut steps = tokio::task::JoinSet::new();
    for facts in selected {
        let key = (host.uri.clone(), facts.name.clone());
        let Some(mut st) = engine.begin(&key) else {
            engine.metrics.missed(1);
            tracing::debug!(domain = %facts.name, "previous step still running; skipped this round");
            continue;
        };
        let (host, engine, room) = (host.clone(), engine.clone(), room.clone());
        steps.spawn(async move {
            let name = facts.name.clone();
            let res = step_domain(&engine, &host, &facts, &room, &mut st).await;
            engine.end(key, st);
            match res {
                Ok(ev) => {
                    events::print_event(&ev);
                    ev.inputs.is_some()
                }
                Err(e) => {
                    eprintln!("autoscale: {name}: {e}");
                    false
                }
            }
        });
    }
    // The next round may list this host: its listing is done.
    hb.listing.store(false, std::sync::atomic::Ordering::Release);
    let mut answered_by = None;
    while let Some(r) = steps.join_next().await {
        if matches!(r, Ok(true)) {
            answered_by = Some(due.elapsed());
        }
    }
    engine.metrics.round_ended(&host.uri, due.elapsed(), answered_by);
}

/// A host's room for growth, read once per round for all its domains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostRoom {
    pub free: Bytes,
    pub cpus: u32,
    /// vCPUs of the running selected domains.
    pub vcpus: u32,
}
