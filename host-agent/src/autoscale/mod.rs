//! `vmplug autoscale`: grow running VMs from their guests' pressure, within a
//! policy's limits, through exactly the `setvcpus` / `attach-memory` closed loop.
//!
//! By concern: [`policy`] (the file and its limits), [`decision`] (the pure
//! decision, table-tested), [`metrics`] (the Prometheus endpoint), and here the
//! daemon, which only samples, decides, applies, and records every decision as
//! one JSON event.

pub mod decision;
pub mod events;
pub mod metrics;
pub mod policy;
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
}

impl Host {
    /// `concurrency` is held to `1..=MAX_CONCURRENCY` (the policy refuses
    /// anything else before a host is made; a semaphore that large panics).
    pub fn new(uri: String, conn: Arc<dyn Connection>, concurrency: usize) -> Host {
        let permits = concurrency.clamp(1, MAX_CONCURRENCY);
        Host { uri, conn, actions: Arc::new(tokio::sync::Semaphore::new(permits)) }
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
    /// see [`Engine::keep_session`]).
    pub sessions: std::sync::Mutex<std::collections::HashMap<(String, String), GuestLink>>,
}

impl Engine {
    pub fn new(policy: Policy, limits: Limits, dry_run: bool) -> Engine {
        Engine {
            policy,
            limits,
            metrics: Metrics::default(),
            dry_run,
            states: States::default(),
            sessions: Default::default(),
        }
    }

    /// The session kept for this domain, if any (taken while its step runs: a
    /// domain has one step in flight at most, see [`Engine::begin`]).
    pub fn take_session(&self, key: &(String, String)) -> Option<GuestLink> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(key)
    }

    /// Keeps a session for the domain's next round — unless it is virtio-serial:
    /// QEMU's chardev admits one host client at a time, so autoscale holds that
    /// channel only for a step (sample, decide, act) and then gives it back, and an
    /// operator's `vmplug`, which retries its connection for `--agent-wait`, gets
    /// it in between. vsock admits several sessions (the agent serves
    /// `MAX_VSOCK_SESSIONS`), so there autoscale keeps its one.
    pub fn keep_session(&self, key: (String, String), link: Option<GuestLink>) {
        if let Some(link) = link.filter(|l| !matches!(l.addr, AgentAddr::Serial { .. })) {
            self.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(key, link);
        }
    }

    /// Closes the sessions of domains no longer selected or running.
    fn retain_sessions(&self, live: &std::collections::HashSet<DomainLabels>) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(uri, domain), _| live.contains(&DomainLabels { uri: uri.clone(), domain: domain.clone() }));
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
    let mut link = engine.take_session(&key);
    let sample = match sample(engine, &host.uri, facts, &mut link).await {
        Ok(p) => Sample::from(&p),
        Err(e) => {
            // A silent agent: the domain is left alone, and that is reported.
            ev.reason = format!("no pressure from the guest agent: {e}");
            engine.metrics.record(&ev, &cap, None);
            return Ok(ev);
        }
    };
    let guest = link.as_ref().map(|l| l.info.clone());
    ev.inputs = Some(sample);
    state.samples.push_back(sample);
    while state.samples.len() > KEPT_SAMPLES {
        state.samples.pop_front();
    }
    let d = decide(&engine.limits, state, &cap, ev.ts);
    apply(engine, host, d, &mut ev, state, &mut link).await;
    engine.keep_session(key, link);
    ev.duration_ms = started.elapsed().as_millis() as u64;
    engine.metrics.record(&ev, &cap, guest.as_ref());
    Ok(ev)
}

/// How long a round waits for a domain's agent to answer a new connection.
pub const SAMPLE_CONNECT_WAIT: Duration = Duration::from_secs(3);

/// The guest's pressure and fresh facts, through the held session when it still
/// answers (an agent restart or the vsock idle limit ends it), else a new one
/// (counted in `vmplug_agent_sessions_total`). `link` holds the session after.
async fn sample(
    engine: &Engine,
    uri: &str,
    facts: &DomainFacts,
    link: &mut Option<GuestLink>,
) -> Result<vmplug_common::protocol::Pressure, LinkError> {
    let want = discover(facts).ok();
    if let Some(l) = link.as_mut().filter(|l| want.as_ref() == Some(&l.addr)) {
        match l.refresh().await {
            Ok(()) => return l.pressure().await,
            Err(e) => {
                tracing::debug!(domain = %facts.name, error = %e, "the kept agent session ended; connecting again")
            }
        }
    }
    // Closed before connecting again: a virtio-serial channel admits one client.
    *link = None;
    let mut l = ops::connect_agent(facts, None, SAMPLE_CONNECT_WAIT).await?;
    engine.metrics.session_opened(&DomainLabels { uri: uri.into(), domain: facts.name.clone() });
    let p = l.pressure().await;
    *link = Some(l);
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
                _ => SizeChange::Shrink(size),
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

/// The daemon: every interval, every selected running domain on every host,
/// a task per domain with bounded concurrency per host. `once` runs until each
/// domain has had `sustain` samples and one decision.
pub async fn run(hosts: Vec<Host>, policy: Policy, dry_run: bool, once: bool) -> Result<(), PolicyError> {
    let limits = policy.limits()?;
    let engine = Arc::new(Engine::new(policy, limits, dry_run));
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
    // A domain whose step is still running (a slow action, a stalling guest) is
    // marked in flight and skipped by later rounds instead of holding them up: one
    // guest never delays the sampling of another. `--once` waits for each round.
    let rounds = if once { engine.limits.sustain } else { usize::MAX };
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..rounds {
        let mut live = std::collections::HashSet::new();
        for host in &hosts {
            let (selected, room) = select_running(&engine.policy, host).await;
            live.extend(selected.iter().map(|f| DomainLabels { uri: host.uri.clone(), domain: f.name.clone() }));
            let room = Arc::new(room);
            for facts in selected {
                let key = (host.uri.clone(), facts.name.clone());
                let Some(mut st) = engine.begin(&key) else {
                    tracing::debug!(domain = %facts.name, "previous step still running; skipped this round");
                    continue;
                };
                let (host, engine, room) = (host.clone(), engine.clone(), room.clone());
                tasks.spawn(async move {
                    let name = facts.name.clone();
                    let res = step_domain(&engine, &host, &facts, &room, &mut st).await;
                    engine.end(key, st);
                    match res {
                        Ok(ev) => events::print_event(&ev),
                        Err(e) => eprintln!("autoscale: {name}: {e}"),
                    }
                });
            }
        }
        // Series and sessions of domains that stopped or left the selection go.
        engine.metrics.retain(&live);
        engine.retain_sessions(&live);
        if once {
            while tasks.join_next().await.is_some() {}
        } else {
            while tasks.try_join_next().is_some() {}
        }
        if round + 1 < rounds {
            tokio::time::sleep(Duration::from_secs(engine.policy.timing.interval_s.max(1))).await;
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// A host's room for growth, read once per round for all its domains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostRoom {
    pub free: Bytes,
    pub cpus: u32,
    /// vCPUs of the running selected domains.
    pub vcpus: u32,
}

/// The running domains of `host` the policy selects (their live XML, read once
/// per round) and the host's room.
pub(crate) async fn select_running(policy: &Policy, host: &Host) -> (Vec<DomainFacts>, HostRoom) {
    let conn = host.conn.clone();
    let (names, host_facts) = ops::blocking(move || {
        let names = conn.list_domains()?;
        // Free memory and CPUs only: no domain capabilities needed here.
        Ok((names, ops::host_facts(conn.as_ref(), &DomainFacts::default())?))
    })
    .await
    .unwrap_or_default();
    let mut selected = Vec::new();
    let mut vcpus = 0u32;
    for name in names {
        let conn = host.conn.clone();
        let facts = ops::blocking(move || {
            let d = conn.lookup(&name)?;
            if !d.is_active()? {
                return Ok(None);
            }
            // A paused, crashed or guest-suspended domain runs no code: its
            // agent cannot answer, so it is not sampled (no connection waits
            // for it); its vCPUs still count against the host.
            let runs = matches!(d.state()?, crate::domain::DomainState::Running | crate::domain::DomainState::Blocked);
            DomainFacts::parse(&d.xml(crate::domain::XmlView::Live)?)
                .map(|f| Some((f, runs)))
                .map_err(|e| DomainError::Other(e.to_string()))
        })
        .await;
        if let Ok(Some((f, runs))) = facts {
            if policy.selects(&f.name, &f.tags) {
                vcpus = vcpus.saturating_add(f.vcpus_current);
                if runs {
                    selected.push(f);
                }
            }
        }
    }
    let room =
        HostRoom { free: Bytes(host_facts.free.iter().map(|b| b.get()).sum()), cpus: host_facts.cpus.max(1), vcpus };
    (selected, room)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DomainState as State, PauseReason};
    use crate::fake::{FakeConnection, FakeDomain};

    const XML: &str = include_str!("../../tests/fixtures/x86-ready.xml");
    const CAPS: &str = include_str!("../../tests/fixtures/caps.xml");

    #[tokio::test]
    async fn a_domain_that_runs_no_code_is_not_sampled_but_its_vcpus_count() {
        let names = ["a", "b", "c"];
        let domains: Vec<_> = names
            .iter()
            .map(|n| FakeDomain::new(n, &XML.replace("<name>web1</name>", &format!("<name>{n}</name>")), None))
            .collect();
        domains[1].set_state(State::Paused(PauseReason::User));
        domains[2].set_state(State::PmSuspended);
        let conn = FakeConnection::new(CAPS, domains.clone());
        let policy = Policy::parse("p", "[select]\nglobs = ['*']\n").expect("policy");
        let host = Host::new("test:///".into(), conn, 1);
        let (selected, room) = select_running(&policy, &host).await;
        let picked: Vec<&str> = selected.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(picked, ["a"], "only the running domain is sampled");
        let each = selected[0].vcpus_current;
        assert_eq!(room.vcpus, 3 * each, "the paused and suspended domains' vCPUs still count");
    }
}
