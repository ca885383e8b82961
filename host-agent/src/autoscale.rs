//! `vmplug autoscale`: grow running VMs from their guests' pressure, within a
//! policy's limits, through exactly the `setvcpus` / `attach-memory` closed loop.
//!
//! The decision is a pure function of (policy, the domain's recent samples and
//! state, host capacity, now), table-tested; the daemon only samples, decides,
//! applies, and records every decision as one JSON event.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmplug_common::protocol::{Pressure, ZonePolicy};
use vmplug_common::{Bytes, MIB};

use crate::domain::{Affect, Connection, DomainError};
use crate::ops::{self, HotplugOpts, MemoryOpts};
use crate::report::Outcome;
use crate::xml::DomainFacts;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Select {
    /// Exact domain names.
    pub names: Vec<String>,
    /// Shell-style globs (`*`, `?`).
    pub globs: Vec<String>,
    /// A `<vmplug:tag>` in the domain's metadata.
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CpuPolicy {
    pub max: u32,
    pub step: u32,
    /// PSI `cpu some avg10` (percent) at or above which vCPUs are added.
    pub psi_some_avg10: f64,
}

impl Default for CpuPolicy {
    fn default() -> Self {
        CpuPolicy { max: 4, step: 1, psi_some_avg10: 25.0 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryPolicy {
    pub max: String,
    pub step: String,
    pub psi_some_avg10: f64,
    pub psi_full_avg10: f64,
    /// Add memory when the guest's MemAvailable falls below this.
    pub available_below: String,
}

impl Default for MemoryPolicy {
    fn default() -> Self {
        MemoryPolicy {
            max: "4G".into(),
            step: "512M".into(),
            psi_some_avg10: 20.0,
            psi_full_avg10: 5.0,
            available_below: "128M".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Seconds between samples.
    pub interval_s: u64,
    /// Consecutive samples over a threshold before acting.
    pub sustain: usize,
    /// Seconds after an action before the next one on the same domain.
    pub cooldown_s: u64,
    /// Seconds to back off after a failed action (doubles, capped at 10×).
    pub backoff_s: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { interval_s: 5, sustain: 3, cooldown_s: 60, backoff_s: 60 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostPolicy {
    /// Never plug memory that would leave the host less free memory than this.
    pub memory_reserve: String,
    /// Most vCPUs of running selected domains per host CPU.
    pub vcpu_overcommit: f64,
    /// Domains acted on at once per host.
    pub concurrency: usize,
}

impl Default for HostPolicy {
    fn default() -> Self {
        HostPolicy { memory_reserve: "1G".into(), vcpu_overcommit: 4.0, concurrency: 2 }
    }
}

/// The policy file (TOML; unknown keys are errors).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// libvirt URIs, one per host (default: the `-c` connection).
    pub uris: Vec<String>,
    pub select: Select,
    pub cpu: CpuPolicy,
    pub memory: MemoryPolicy,
    pub timing: Timing,
    pub host: HostPolicy,
    /// Also write changes into the persistent definition.
    pub persist: bool,
    /// Prometheus text endpoint, e.g. `127.0.0.1:9477`.
    pub metrics_listen: Option<String>,
}

/// Longest interval, cooldown or back-off a policy may set, in seconds (a week):
/// keeps every deadline computed from them far from overflowing.
pub const MAX_TIMING_S: u64 = 7 * 24 * 3600;

/// The policy with its sizes parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub cpu_max: u32,
    pub cpu_step: u32,
    pub cpu_psi: f64,
    pub mem_max: Bytes,
    pub mem_step: Bytes,
    pub mem_psi_some: f64,
    pub mem_psi_full: f64,
    pub available_below: Bytes,
    pub sustain: usize,
    pub cooldown_s: u64,
    pub backoff_s: u64,
    pub memory_reserve: Bytes,
    pub vcpu_overcommit: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {0}")]
    Read(String, #[source] std::io::Error),
    #[error("policy {0}: {1}")]
    Parse(String, String),
    #[error("policy: {0}")]
    Invalid(String),
}

impl Policy {
    pub fn parse(name: &str, text: &str) -> Result<Policy, PolicyError> {
        toml::from_str(text).map_err(|e| PolicyError::Parse(name.into(), e.message().to_string()))
    }

    pub fn limits(&self) -> Result<Limits, PolicyError> {
        let size = |what: &str, s: &str| s.parse::<Bytes>().map_err(|e| PolicyError::Invalid(format!("{what}: {e}")));
        let l = Limits {
            cpu_max: self.cpu.max,
            cpu_step: self.cpu.step,
            cpu_psi: self.cpu.psi_some_avg10,
            mem_max: size("memory.max", &self.memory.max)?,
            mem_step: size("memory.step", &self.memory.step)?,
            mem_psi_some: self.memory.psi_some_avg10,
            mem_psi_full: self.memory.psi_full_avg10,
            available_below: size("memory.available_below", &self.memory.available_below)?,
            sustain: self.timing.sustain.max(1),
            cooldown_s: self.timing.cooldown_s,
            backoff_s: self.timing.backoff_s,
            memory_reserve: size("host.memory_reserve", &self.host.memory_reserve)?,
            vcpu_overcommit: self.host.vcpu_overcommit,
        };
        if l.cpu_step == 0 || l.mem_step.get() == 0 {
            return Err(PolicyError::Invalid("steps must be larger than zero".into()));
        }
        for (what, v) in [
            ("timing.interval_s", self.timing.interval_s),
            ("timing.cooldown_s", l.cooldown_s),
            ("timing.backoff_s", l.backoff_s),
        ] {
            if v > MAX_TIMING_S {
                return Err(PolicyError::Invalid(format!("{what} = {v} is over {MAX_TIMING_S} (a week)")));
            }
        }
        for (what, v) in [
            ("cpu.psi_some_avg10", l.cpu_psi),
            ("memory.psi_some_avg10", l.mem_psi_some),
            ("memory.psi_full_avg10", l.mem_psi_full),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(PolicyError::Invalid(format!("{what} = {v} is not a percentage")));
            }
        }
        Ok(l)
    }

    /// Whether a domain is selected.
    pub fn selects(&self, name: &str, tags: &[String]) -> bool {
        self.select.names.iter().any(|n| n == name)
            || self.select.globs.iter().any(|g| glob(g, name))
            || self.select.tag.as_ref().is_some_and(|t| tags.contains(t))
    }
}

/// `*` and `?` globbing, in O(pattern × name) time at worst: on a mismatch
/// only the last `*` is retried (one position further), never every earlier
/// one, so no pattern backtracks exponentially.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// One guest sample, sanitised: a guest controls these numbers, so NaN, negative
/// or over-100 % values are clamped and can never exceed what the policy allows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    pub cpu_some: f64,
    pub mem_some: f64,
    pub mem_full: f64,
    pub available: Bytes,
}

fn pct(v: Option<f64>) -> f64 {
    match v {
        Some(x) if x.is_finite() => x.clamp(0.0, 100.0),
        _ => 0.0,
    }
}

impl From<&Pressure> for Sample {
    fn from(p: &Pressure) -> Self {
        Sample {
            cpu_some: pct(p.cpu_some.map(|x| x.avg10)),
            mem_some: pct(p.memory_some.map(|x| x.avg10)),
            mem_full: pct(p.memory_full.map(|x| x.avg10)),
            available: p.mem_available,
        }
    }
}

/// What autoscale knows of one domain between samples.
#[derive(Debug, Clone, Default)]
pub struct DomainState {
    pub samples: VecDeque<Sample>,
    pub last_action_s: Option<u64>,
    pub backoff_until_s: u64,
    pub failures: u32,
    /// A step on this domain is running (the daemon skips it; `decide` holds).
    pub in_flight: bool,
}

/// The host's view of a domain and of the host, from libvirt (trusted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub vcpus: u32,
    pub vcpus_max: u32,
    pub memory: Bytes,
    pub max_memory: Bytes,
    pub free_slots: u32,
    pub host_free: Bytes,
    pub host_cpus: u32,
    /// vCPUs of all running selected domains on this host.
    pub host_vcpus: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    None,
    AddVcpus {
        to: u32,
    },
    /// `size` as decided; `ceiling`: the most the guest's block size may round it
    /// up to (the policy's and the host's room), never more.
    AddMemory {
        size: Bytes,
        ceiling: Bytes,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub action: Action,
    pub rule: &'static str,
    pub reason: String,
}

fn none(rule: &'static str, reason: impl Into<String>) -> Decision {
    Decision { action: Action::None, rule, reason: reason.into() }
}

/// The pure decision: inputs → at most one action.
pub fn decide(l: &Limits, st: &DomainState, cap: &Capacity, now_s: u64) -> Decision {
    if st.in_flight {
        return none("in-flight", "an action on this domain is still running");
    }
    if now_s < st.backoff_until_s {
        return none("backoff", format!("backing off after {} failure(s) until t={}", st.failures, st.backoff_until_s));
    }
    if let Some(t) = st.last_action_s {
        if now_s < t.saturating_add(l.cooldown_s) {
            return none("cooldown", format!("cooldown until t={}", t.saturating_add(l.cooldown_s)));
        }
    }
    if st.samples.len() < l.sustain {
        return none("warming-up", format!("{} of {} samples", st.samples.len(), l.sustain));
    }
    let recent: Vec<&Sample> = st.samples.iter().rev().take(l.sustain).collect();
    let cpu_hot = recent.iter().all(|s| s.cpu_some >= l.cpu_psi);
    let mem_hot = recent
        .iter()
        .all(|s| s.mem_some >= l.mem_psi_some || s.mem_full >= l.mem_psi_full || s.available < l.available_below);
    if cpu_hot {
        let cap_max = l.cpu_max.min(cap.vcpus_max);
        let host_room = ((cap.host_cpus as f64 * l.vcpu_overcommit) as u32).saturating_sub(cap.host_vcpus);
        let to = (cap.vcpus + l.cpu_step).min(cap_max).min(cap.vcpus + host_room);
        if to > cap.vcpus {
            return Decision {
                action: Action::AddVcpus { to },
                rule: "cpu.psi",
                reason: format!("cpu some avg10 ≥ {} for {} samples", l.cpu_psi, l.sustain),
            };
        }
        if !mem_hot {
            return none(
                "cpu.at-max",
                format!(
                    "cpu pressure, but at {} vCPUs (policy max {}, domain max {}, host room {host_room})",
                    cap.vcpus, l.cpu_max, cap.vcpus_max
                ),
            );
        }
    }
    if mem_hot {
        let room = Bytes(
            l.mem_max.get().saturating_sub(cap.memory.get()).min(cap.max_memory.get().saturating_sub(cap.memory.get())),
        );
        let host_room = Bytes(cap.host_free.get().saturating_sub(l.memory_reserve.get()));
        let ceiling = room.min(host_room);
        let size = l.mem_step.min(ceiling);
        // Whole 128 MiB blocks only; the planner aligns to the guest exactly,
        // rounding up no further than `ceiling`.
        let size = Bytes(size.get() / (128 * MIB) * (128 * MIB));
        if size.get() > 0 && cap.free_slots > 0 {
            return Decision {
                action: Action::AddMemory { size, ceiling },
                rule: "memory.pressure",
                reason: format!("memory pressure or MemAvailable < {} for {} samples", l.available_below, l.sustain),
            };
        }
        return none(
            "memory.at-max",
            format!(
                "memory pressure, but at {} (policy max {}, host room {host_room}, {} free slots)",
                cap.memory, l.mem_max, cap.free_slots
            ),
        );
    }
    none("calm", "no sustained pressure")
}

/// One recorded decision (a JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct DecisionEvent {
    pub ts: u64,
    pub uri: String,
    pub domain: String,
    pub inputs: Option<Sample>,
    pub vcpus: u32,
    pub memory: Bytes,
    pub rule: &'static str,
    pub reason: String,
    pub action: Action,
    pub dry_run: bool,
    pub outcome: Option<Outcome>,
    pub message: Option<String>,
    pub duration_ms: u64,
}

/// Counters for the Prometheus endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    pub lines: std::sync::Mutex<std::collections::BTreeMap<String, f64>>,
}

impl Metrics {
    fn set(&self, key: String, v: f64) {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).insert(key, v);
    }
    fn add(&self, key: String, v: f64) {
        *self.lines.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += v;
    }
    pub fn render(&self) -> String {
        let mut s = String::from("# vmplug autoscale metrics\n");
        for (k, v) in self.lines.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            s.push_str(&format!("{k} {v}\n"));
        }
        s
    }
    fn record(&self, ev: &DecisionEvent, cap: &Capacity) {
        let l = format!("domain=\"{}\",uri=\"{}\"", ev.domain, ev.uri);
        self.set(format!("vmplug_domain_vcpus{{{l}}}"), cap.vcpus as f64);
        self.set(format!("vmplug_domain_vcpus_max{{{l}}}"), cap.vcpus_max as f64);
        self.set(format!("vmplug_domain_memory_bytes{{{l}}}"), cap.memory.get() as f64);
        self.set(format!("vmplug_domain_max_memory_bytes{{{l}}}"), cap.max_memory.get() as f64);
        if ev.action != Action::None {
            self.add(format!("vmplug_decisions_total{{{l},rule=\"{}\"}}", ev.rule), 1.0);
        }
        if let Some(o) = ev.outcome {
            if o != Outcome::Ok {
                self.add(format!("vmplug_failures_total{{{l}}}"), 1.0);
            }
            self.add(format!("vmplug_action_seconds_sum{{{l}}}"), ev.duration_ms as f64 / 1000.0);
            self.add(format!("vmplug_action_seconds_count{{{l}}}"), 1.0);
        }
    }
}

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
    pub fn new(uri: String, conn: Arc<dyn Connection>, concurrency: usize) -> Host {
        Host { uri, conn, actions: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))) }
    }
}

/// The policy, its parsed limits, the metrics, and whether to act.
#[derive(Debug)]
pub struct Engine {
    pub policy: Policy,
    pub limits: Limits,
    pub metrics: Metrics,
    pub dry_run: bool,
}

/// Samples, decides and (unless `dry_run`) acts on one domain; returns the event.
pub async fn step_domain(
    engine: &Engine,
    host: &Host,
    facts: &DomainFacts,
    room: &HostRoom,
    state: &mut DomainState,
) -> Result<DecisionEvent, DomainError> {
    let name = facts.name.as_str();
    let cap = Capacity {
        vcpus: facts.vcpus_current,
        vcpus_max: facts.vcpus_max,
        memory: facts.memory,
        max_memory: facts.max_memory.unwrap_or(facts.memory),
        free_slots: facts.free_slots(),
        host_free: room.free,
        host_cpus: room.cpus,
        host_vcpus: room.vcpus,
    };
    let started = std::time::Instant::now();
    let mut ev = DecisionEvent {
        ts: now_s(),
        uri: host.uri.clone(),
        domain: name.into(),
        inputs: None,
        vcpus: cap.vcpus,
        memory: cap.memory,
        rule: "agent.silent",
        reason: String::new(),
        action: Action::None,
        dry_run: engine.dry_run,
        outcome: None,
        message: None,
        duration_ms: 0,
    };
    let pressure = match ops::connect_agent(facts, None, Duration::from_secs(3)).await {
        Ok(mut link) => link.pressure().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let sample = match pressure {
        Ok(p) => Sample::from(&p),
        Err(e) => {
            // A silent agent: the domain is left alone, and that is reported.
            ev.reason = format!("no pressure from the guest agent: {e}");
            engine.metrics.record(&ev, &cap);
            return Ok(ev);
        }
    };
    ev.inputs = Some(sample);
    state.samples.push_back(sample);
    while state.samples.len() > 32 {
        state.samples.pop_front();
    }
    let d = decide(&engine.limits, state, &cap, ev.ts);
    ev.rule = d.rule;
    ev.reason = d.reason;
    ev.action = d.action.clone();
    if d.action != Action::None && !engine.dry_run {
        let _permit = host.actions.acquire().await;
        let opts = HotplugOpts {
            affect: if engine.policy.persist { Affect::Both } else { Affect::Live },
            timeout: Duration::from_secs(60),
            agent_wait: Duration::from_secs(10),
            no_wait: false,
            force: false,
            agent: None,
            zone: ZonePolicy::Auto,
        };
        let r = match d.action {
            Action::AddVcpus { to } => ops::setvcpus(host.conn.clone(), name, to, &opts).await,
            Action::AddMemory { size, ceiling } => {
                let mem = MemoryOpts {
                    size,
                    node: None,
                    round_up: true,
                    ceiling: Some(ceiling),
                    max_dimm: crate::planner::DEFAULT_MAX_DIMM,
                    request_id: ops::new_request_id(),
                };
                ops::attach_memory(host.conn.clone(), name, &mem, &opts).await
            }
            Action::None => unreachable!("checked above"),
        };
        let (outcome, message) = match r {
            Ok(r) => (r.outcome, r.message),
            Err(e) => (Outcome::LibvirtError, e.to_string()),
        };
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
    ev.duration_ms = started.elapsed().as_millis() as u64;
    engine.metrics.record(&ev, &cap);
    Ok(ev)
}

/// Most metrics connections served at once; more wait in the listen backlog.
pub const MAX_METRICS_CONNECTIONS: usize = 32;
/// How long a metrics client may take to send its request line and headers.
pub const METRICS_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause after a failed `accept` (EMFILE under a connection flood):
/// the endpoint pauses and goes on, it never ends.
pub const METRICS_ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// `metrics_listen` as a socket address: a bare port (`9477` or `:9477`) binds
/// loopback only; anything else is taken as written.
pub fn metrics_addr(listen: &str) -> Result<std::net::SocketAddr, String> {
    let port_only = listen.strip_prefix(':').unwrap_or(listen);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    listen.parse().map_err(|e| format!("'{listen}' is not PORT or ADDRESS:PORT ({e})"))
}

/// The status line and body of the answer to one HTTP request head.
pub fn metrics_response(head: &[u8], metrics: &Metrics) -> (&'static str, String) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    match (method, path, version) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/") => match (m, p.split('?').next()) {
            ("GET" | "HEAD", Some("/metrics")) => ("200 OK", metrics.render()),
            ("GET" | "HEAD", _) => ("404 Not Found", "not found: metrics are at /metrics\n".into()),
            _ => ("405 Method Not Allowed", "only GET /metrics\n".into()),
        },
        _ => ("400 Bad Request", "bad request\n".into()),
    }
}

/// Serves the metrics as Prometheus text on `addr` until the process ends: at
/// most [`MAX_METRICS_CONNECTIONS`] at once, each bounded in time and bytes,
/// accept failures backed off and never fatal.
pub async fn serve_metrics(addr: &str, engine: Arc<Engine>) -> std::io::Result<std::net::SocketAddr> {
    let addr = metrics_addr(addr).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics endpoint reachable beyond this host (unauthenticated)");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(10);
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, ?pause, "metrics accept failed; pausing");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(METRICS_ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            pause = Duration::from_millis(10);
            let engine = engine.clone();
            tokio::spawn(async move {
                answer_metrics(stream, &engine.metrics).await;
                drop(permit);
            });
        }
    });
    Ok(bound)
}

/// Reads one request head (at most 4 KiB, within [`METRICS_READ_TIMEOUT`]) and answers it.
async fn answer_metrics(mut s: tokio::net::TcpStream, metrics: &Metrics) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(METRICS_READ_TIMEOUT, async {
        let mut buf = [0u8; 512];
        while head.len() < 4096 && !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.ends_with(b"\n\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let (status, body) = metrics_response(&head, metrics);
    let resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(METRICS_READ_TIMEOUT, s.write_all(resp.as_bytes())).await;
}

/// The daemon: every interval, every selected running domain on every host,
/// a task per domain with bounded concurrency per host. `once` runs until each
/// domain has had `sustain` samples and one decision.
pub async fn run(hosts: Vec<Host>, policy: Policy, dry_run: bool, once: bool) -> Result<(), PolicyError> {
    let limits = policy.limits()?;
    let engine = Arc::new(Engine { policy, limits, metrics: Metrics::default(), dry_run });
    if let Some(addr) = engine.policy.metrics_listen.clone() {
        let e = engine.clone();
        let bound = serve_metrics(&addr, e)
            .await
            .map_err(|err| PolicyError::Invalid(format!("metrics_listen {addr}: {err}")))?;
        tracing::info!(%bound, "serving metrics at /metrics");
    }
    // A domain whose step is still running (a slow action, a stalling guest) is
    // marked in flight and skipped by later rounds instead of holding them up: one
    // guest never delays the sampling of another. `--once` waits for each round.
    let states: Arc<std::sync::Mutex<std::collections::HashMap<(String, String), DomainState>>> = Arc::default();
    let rounds = if once { engine.limits.sustain } else { usize::MAX };
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..rounds {
        for host in &hosts {
            let (selected, room) = select_running(&engine.policy, host).await;
            let room = Arc::new(room);
            for facts in selected {
                let key = (host.uri.clone(), facts.name.clone());
                let mut st = {
                    let mut map = states.lock().unwrap_or_else(|e| e.into_inner());
                    let st = map.entry(key.clone()).or_default();
                    if st.in_flight {
                        tracing::debug!(domain = %facts.name, "previous step still running; skipped this round");
                        continue;
                    }
                    st.in_flight = true;
                    DomainState { in_flight: false, ..st.clone() }
                };
                let (host, engine, states, room) = (host.clone(), engine.clone(), states.clone(), room.clone());
                tasks.spawn(async move {
                    let name = facts.name.clone();
                    let res = step_domain(&engine, &host, &facts, &room, &mut st).await;
                    states.lock().unwrap_or_else(|e| e.into_inner()).insert(key, st);
                    match res {
                        Ok(ev) => println!("{}", serde_json::to_string(&ev).unwrap_or_default()),
                        Err(e) => eprintln!("autoscale: {name}: {e}"),
                    }
                });
            }
        }
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
async fn select_running(policy: &Policy, host: &Host) -> (Vec<DomainFacts>, HostRoom) {
    let conn = host.conn.clone();
    let (names, host_facts) = ops::blocking(move || {
        let names = conn.list_domains()?;
        // Free memory and CPUs only: no domain capabilities needed here.
        Ok((names, ops::host_facts(conn.as_ref(), &DomainFacts::default())?))
    })
    .await
    .unwrap_or_default();
    let mut selected = Vec::new();
    for name in names {
        let conn = host.conn.clone();
        let facts = ops::blocking(move || {
            let d = conn.lookup(&name)?;
            if !d.is_active()? {
                return Ok(None);
            }
            DomainFacts::parse(&d.xml(crate::domain::XmlView::Live)?)
                .map(Some)
                .map_err(|e| DomainError::Other(e.to_string()))
        })
        .await;
        if let Ok(Some(f)) = facts {
            if policy.selects(&f.name, &f.tags) {
                selected.push(f);
            }
        }
    }
    let room = HostRoom {
        free: Bytes(host_facts.free.iter().map(|b| b.get()).sum()),
        cpus: host_facts.cpus.max(1),
        vcpus: selected.iter().map(|f| f.vcpus_current).sum(),
    };
    (selected, room)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmplug_common::GIB;

    fn limits() -> Limits {
        Policy::default().limits().expect("defaults are valid")
    }

    fn cap() -> Capacity {
        Capacity {
            vcpus: 2,
            vcpus_max: 8,
            memory: Bytes(GIB),
            max_memory: Bytes(8 * GIB),
            free_slots: 4,
            host_free: Bytes(16 * GIB),
            host_cpus: 2,
            host_vcpus: 2,
        }
    }

    fn s(cpu: f64, mem: f64, avail_mib: u64) -> Sample {
        Sample { cpu_some: cpu, mem_some: mem, mem_full: 0.0, available: Bytes(avail_mib * MIB) }
    }

    fn state(samples: &[Sample]) -> DomainState {
        DomainState { samples: samples.iter().copied().collect(), ..Default::default() }
    }

    #[test]
    fn decision_table() {
        let l = limits();
        let hot = s(80.0, 0.0, 900);
        let calm = s(1.0, 0.0, 900);
        let tight = s(0.0, 50.0, 64);
        let rows: Vec<(&str, DomainState, Capacity, Action, &str)> = vec![
            ("warming up", state(&[hot, hot]), cap(), Action::None, "warming-up"),
            ("sustained cpu", state(&[hot, hot, hot]), cap(), Action::AddVcpus { to: 3 }, "cpu.psi"),
            ("one calm sample breaks the run", state(&[hot, calm, hot]), cap(), Action::None, "calm"),
            ("at policy max", state(&[hot, hot, hot]), Capacity { vcpus: 4, ..cap() }, Action::None, "cpu.at-max"),
            (
                "domain max below policy",
                state(&[hot, hot, hot]),
                Capacity { vcpus: 3, vcpus_max: 3, ..cap() },
                Action::None,
                "cpu.at-max",
            ),
            (
                "host overcommit",
                state(&[hot, hot, hot]),
                Capacity { host_vcpus: 8, ..cap() },
                Action::None,
                "cpu.at-max",
            ),
            (
                "sustained memory",
                state(&[tight, tight, tight]),
                cap(),
                Action::AddMemory { size: Bytes(512 * MIB), ceiling: Bytes(3 * GIB) },
                "memory.pressure",
            ),
            (
                "memory capped by policy max",
                state(&[tight, tight, tight]),
                Capacity { memory: Bytes(3840 * MIB), ..cap() },
                Action::AddMemory { size: Bytes(256 * MIB), ceiling: Bytes(256 * MIB) },
                "memory.pressure",
            ),
            (
                "memory at max",
                state(&[tight, tight, tight]),
                Capacity { memory: Bytes(4 * GIB), ..cap() },
                Action::None,
                "memory.at-max",
            ),
            (
                "host reserve",
                state(&[tight, tight, tight]),
                Capacity { host_free: Bytes(GIB), ..cap() },
                Action::None,
                "memory.at-max",
            ),
            (
                "no slot",
                state(&[tight, tight, tight]),
                Capacity { free_slots: 0, ..cap() },
                Action::None,
                "memory.at-max",
            ),
        ];
        for (what, st, c, want, rule) in rows {
            let d = decide(&l, &st, &c, 1000);
            assert_eq!((d.action, d.rule), (want, rule), "{what}: {}", d.reason);
        }
    }

    #[test]
    fn cooldown_backoff_and_in_flight_hold_actions() {
        let l = limits();
        let hot = s(80.0, 0.0, 900);
        let mut st = state(&[hot, hot, hot]);
        st.last_action_s = Some(990);
        assert_eq!(decide(&l, &st, &cap(), 1000).rule, "cooldown");
        assert_eq!(decide(&l, &st, &cap(), 1050).rule, "cpu.psi", "cooldown over");
        st.backoff_until_s = 2000;
        assert_eq!(decide(&l, &st, &cap(), 1500).rule, "backoff");
        st.in_flight = true;
        assert_eq!(decide(&l, &st, &cap(), 5000).rule, "in-flight");
    }

    #[test]
    fn absurd_guest_numbers_cannot_exceed_the_policy() {
        let p = Pressure {
            cpu_some: Some(vmplug_common::protocol::Psi { avg10: f64::INFINITY, avg60: 0.0, avg300: 0.0, total_us: 0 }),
            memory_some: Some(vmplug_common::protocol::Psi { avg10: 1e12, avg60: 0.0, avg300: 0.0, total_us: 0 }),
            memory_full: Some(vmplug_common::protocol::Psi { avg10: f64::NAN, avg60: 0.0, avg300: 0.0, total_us: 0 }),
            mem_total: Bytes(u64::MAX),
            mem_available: Bytes(0),
            load1: 1e9,
            load5: 0.0,
            load15: 0.0,
            cpus_online: u32::MAX,
        };
        let sample = Sample::from(&p);
        assert_eq!((sample.cpu_some, sample.mem_some, sample.mem_full), (0.0, 100.0, 0.0));
        let st = state(&[sample, sample, sample]);
        let c = Capacity { vcpus: 4, memory: Bytes(4 * GIB), ..cap() };
        assert_eq!(decide(&limits(), &st, &c, 1000).action, Action::None, "at the policy's max nothing is added");
    }

    #[test]
    fn policy_parsing_and_selection() {
        let p = Policy::parse(
            "p.toml",
            "uris = ['qemu:///system']\n[select]\nnames = ['db1']\nglobs = ['web-*']\ntag = 'autoscale'\n[cpu]\nmax = 8\n[memory]\nmax = '16G'\n",
        )
        .expect("parses");
        assert!(p.selects("db1", &[]) && p.selects("web-7", &[]) && p.selects("x", &["autoscale".into()]));
        assert!(!p.selects("webx", &[]));
        assert_eq!(p.limits().expect("valid").mem_max, Bytes(16 * GIB));
        let err = Policy::parse("p.toml", "[cpu]\nmaximum = 3\n").expect_err("unknown key");
        assert!(err.to_string().contains("maximum"), "{err}");
        let bad = Policy::parse("p.toml", "[cpu]\npsi_some_avg10 = 150.0\n").expect("parses").limits();
        assert!(bad.is_err());
        assert!(glob("a*c?", "abbbcd") && !glob("a*c?", "abbbc"));
    }

    #[test]
    fn glob_cases() {
        for (p, s, want) in [
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("web-*", "web-", true),
            ("*b*c", "abxbc", true),
            ("a*b*c", "acb", false),
            ("??", "ab", true),
            ("??", "abc", false),
            ("*x", "xxxx", true),
            ("a**b", "ab", true),
        ] {
            assert_eq!(glob(p, s), want, "{p} ~ {s}");
        }
    }

    /// Security finding 9: `a*a*…*b` against `aaaa…` backtracked exponentially.
    /// Steps of the matcher are bounded by pattern × name; this pattern took
    /// minutes before and is answered at once now.
    #[test]
    fn a_pathological_glob_does_not_backtrack_exponentially() {
        let pattern = format!("{}b", "a*".repeat(30));
        let name = "a".repeat(60);
        assert!(!glob(&pattern, &name));
        assert!(glob(&"a*".repeat(30), &name));
    }

    /// Security finding 9: huge cooldown/backoff values overflowed deadlines.
    #[test]
    fn timing_values_are_bounded_and_deadlines_saturate() {
        for key in ["cooldown_s", "backoff_s", "interval_s"] {
            let p = Policy::parse("p.toml", &format!("[timing]\n{key} = 9223372036854775807\n")).expect("parses");
            let err = p.limits().expect_err("refused");
            assert!(err.to_string().contains(key), "{err}");
        }
        let l = Limits { cooldown_s: MAX_TIMING_S, ..limits() };
        let hot = s(80.0, 0.0, 900);
        let st = DomainState { last_action_s: Some(u64::MAX - 5), ..state(&[hot, hot, hot]) };
        assert_eq!(decide(&l, &st, &cap(), 1000).rule, "cooldown");
    }

    /// Security finding 7: the endpoint answered every path; it answers /metrics only.
    #[test]
    fn the_metrics_endpoint_answers_its_path_only() {
        let m = Metrics::default();
        assert_eq!(metrics_response(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m).0, "200 OK");
        assert_eq!(metrics_response(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &m).0, "200 OK");
        assert_eq!(metrics_response(b"GET / HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(metrics_response(b"GET /metrics/../etc HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(metrics_response(b"POST /metrics HTTP/1.1\r\n\r\n", &m).0, "405 Method Not Allowed");
        assert_eq!(metrics_response(b"\x16\x03\x01garbage", &m).0, "400 Bad Request");
        assert_eq!(metrics_response(b"", &m).0, "400 Bad Request");
        assert_eq!(metrics_addr("9477").expect("port"), "127.0.0.1:9477".parse().expect("addr"));
        assert_eq!(metrics_addr(":9477").expect("port"), "127.0.0.1:9477".parse().expect("addr"));
        assert_eq!(metrics_addr("0.0.0.0:9477").expect("addr"), "0.0.0.0:9477".parse().expect("addr"));
        assert!(metrics_addr("localhost:x").is_err());
    }
}

#[cfg(test)]
mod shipped {
    #[test]
    fn the_packaged_policy_parses_and_selects_nothing() {
        let p = super::Policy::parse("autoscale.toml", include_str!("../autoscale.toml")).expect("parses");
        p.limits().expect("valid");
        assert!(!p.selects("anything", &[]), "nothing is selected until the operator names domains");
    }
}
