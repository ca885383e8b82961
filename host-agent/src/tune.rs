//! The guide's tuning verbs (schedinfo, emulatorpin, vcpupin, numatune), the
//! NUMA view, `check` and `status`: each returns a serialisable value and a
//! virsh-like text rendering.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use vmplug_common::protocol::{BlockState, DeviceKind, Forecast, ForecastRequest, GuestInfo, MemRange};
use vmplug_common::{Bytes, CpuSet};

use crate::domain::{Affect, Connection, DomainError, NumaMode, NumaParams, SchedParams};
use crate::facts::gather;
use crate::facts::{agent_if_running, blocking, load, HotplugOpts, Loaded, MemoryOpts};
use crate::link::AgentAddr;
use crate::preflight::NotPlanned;
use crate::preflight::{self, Ctx, Finding, Operation, RuleId, Severity};
use crate::verb::Preview;
use crate::xml::DomainFacts;

/// A refusal by preflight of a tuning change (nothing was applied).
#[derive(Debug, thiserror::Error)]
#[error("preflight refused: {}", .0.iter().map(|f| format!("[{}] {}", f.id, f.message)).collect::<Vec<_>>().join("; "))]
pub struct Refused(pub Vec<Finding>);

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Refused(#[from] Refused),
}

fn gate(findings: Vec<Finding>) -> Result<Vec<Finding>, Refused> {
    if preflight::has_errors(&findings) {
        Err(Refused(findings))
    } else {
        Ok(findings)
    }
}

/// Parses `cpu_shares=N vcpu_quota=…` into scheduler fields.
pub fn parse_sched_args(args: &[String]) -> Result<SchedParams, DomainError> {
    let mut p = SchedParams::default();
    for a in args {
        let (k, v) = a.split_once('=').ok_or_else(|| DomainError::Usage(format!("'{a}' is not key=value")))?;
        let bad = || DomainError::Usage(format!("{k}: '{v}' is not a number"));
        match k {
            "cpu_shares" => p.cpu_shares = Some(v.parse().map_err(|_| bad())?),
            "vcpu_period" => p.vcpu_period = Some(v.parse().map_err(|_| bad())?),
            "vcpu_quota" => p.vcpu_quota = Some(v.parse().map_err(|_| bad())?),
            "emulator_period" => p.emulator_period = Some(v.parse().map_err(|_| bad())?),
            "emulator_quota" => p.emulator_quota = Some(v.parse().map_err(|_| bad())?),
            "global_period" => p.global_period = Some(v.parse().map_err(|_| bad())?),
            "global_quota" => p.global_quota = Some(v.parse().map_err(|_| bad())?),
            "iothread_period" => p.iothread_period = Some(v.parse().map_err(|_| bad())?),
            "iothread_quota" => p.iothread_quota = Some(v.parse().map_err(|_| bad())?),
            _ => {
                return Err(DomainError::Usage(format!(
                    "unknown scheduler parameter '{k}' (cpu_shares, vcpu_period, vcpu_quota, emulator_period, emulator_quota, global_period, global_quota, iothread_period, iothread_quota)"
                )))
            }
        }
    }
    for (name, period) in [
        ("vcpu_period", p.vcpu_period),
        ("emulator_period", p.emulator_period),
        ("global_period", p.global_period),
        ("iothread_period", p.iothread_period),
    ] {
        if let Some(v) = period {
            if v != 0 && !(1000..=1_000_000).contains(&v) {
                return Err(DomainError::Usage(format!("{name}={v} is outside 1000..=1000000 µs")));
            }
        }
    }
    Ok(p)
}

pub fn render_sched(p: &SchedParams) -> String {
    let mut s = String::new();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(s, "{k:<15}: {v}");
    };
    let o = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let i = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    row("Scheduler", p.scheduler.clone());
    row("cpu_shares", o(p.cpu_shares));
    row("vcpu_period", o(p.vcpu_period));
    row("vcpu_quota", i(p.vcpu_quota));
    row("emulator_period", o(p.emulator_period));
    row("emulator_quota", i(p.emulator_quota));
    row("global_period", o(p.global_period));
    row("global_quota", i(p.global_quota));
    row("iothread_period", o(p.iothread_period));
    row("iothread_quota", i(p.iothread_quota));
    s
}

/// `schedinfo DOM [cpu_shares=N …]`: sets what is given, then shows all.
pub async fn schedinfo(
    conn: Arc<dyn Connection>,
    name: &str,
    affect: Affect,
    set: SchedParams,
) -> Result<SchedParams, TuneError> {
    let l = load(conn, name, true).await?;
    // Rules reason about where the change lands; libvirt gets the flag as given
    // (`--current` is VIR_DOMAIN_AFFECT_CURRENT, as virsh sends it).
    let resolved = affect.resolve(l.running);
    if let Some(shares) = set.cpu_shares {
        let ctx = ctx_for(&l, resolved);
        gate(preflight::check(&ctx, &Operation::Shares(shares)))?;
    }
    let dom = l.dom.clone();
    let changed = set != SchedParams::default();
    Ok(blocking(move || {
        if changed {
            let mut p = set;
            p.scheduler = dom.scheduler(affect)?.scheduler;
            dom.set_scheduler(&p, affect)?;
        }
        dom.scheduler(affect)
    })
    .await?)
}

fn ctx_for(l: &Loaded, affect: Affect) -> Ctx<'_> {
    l.ctx(None, affect, true)
}

#[derive(Debug, Clone, Serialize)]
pub struct PinTable {
    pub emulator: Option<CpuSet>,
    pub vcpus: Vec<(u32, CpuSet)>,
}

fn pin_table(facts: &DomainFacts, host_cpus: &CpuSet) -> PinTable {
    PinTable {
        emulator: Some(facts.emulatorpin.clone().unwrap_or_else(|| host_cpus.clone())),
        vcpus: (0..facts.vcpus_max)
            .map(|v| (v, facts.vcpupins.get(&v).cloned().unwrap_or_else(|| host_cpus.clone())))
            .collect(),
    }
}

async fn reread(conn: Arc<dyn Connection>, name: &str, affect: Affect) -> Result<Loaded, DomainError> {
    load(conn, name, affect.live()).await
}

/// `emulatorpin DOM [CPUSET]`.
pub async fn emulatorpin(
    conn: Arc<dyn Connection>,
    name: &str,
    affect: Affect,
    cpus: Option<CpuSet>,
) -> Result<PinTable, TuneError> {
    let l = load(conn.clone(), name, true).await?;
    let resolved = affect.resolve(l.running);
    if let Some(cpus) = cpus {
        gate(preflight::check(&ctx_for(&l, resolved), &Operation::Pin { vcpu: None, cpus: cpus.clone() }))?;
        let (dom, n) = (l.dom.clone(), l.host.cpus);
        blocking(move || dom.pin_emulator(&cpus, n, affect)).await?;
    }
    let l = reread(conn, name, resolved).await?;
    let t = pin_table(&l.facts, &l.host.all_cpus());
    Ok(PinTable { emulator: t.emulator, vcpus: vec![] })
}

/// `vcpupin DOM [VCPU CPUSET]`.
pub async fn vcpupin(
    conn: Arc<dyn Connection>,
    name: &str,
    affect: Affect,
    pin: Option<(u32, CpuSet)>,
) -> Result<PinTable, TuneError> {
    let l = load(conn.clone(), name, true).await?;
    let resolved = affect.resolve(l.running);
    if let Some((vcpu, cpus)) = pin {
        gate(preflight::check(&ctx_for(&l, resolved), &Operation::Pin { vcpu: Some(vcpu), cpus: cpus.clone() }))?;
        let (dom, n) = (l.dom.clone(), l.host.cpus);
        blocking(move || dom.pin_vcpu(vcpu, &cpus, n, affect)).await?;
    }
    let l = reread(conn, name, resolved).await?;
    let t = pin_table(&l.facts, &l.host.all_cpus());
    Ok(PinTable { emulator: None, vcpus: t.vcpus })
}

pub fn render_pins(t: &PinTable) -> String {
    let mut s = String::new();
    if let Some(e) = &t.emulator {
        let _ = writeln!(s, "emulator: CPU Affinity\n----------------------------------\n       *: {e}");
    }
    if !t.vcpus.is_empty() {
        let _ = writeln!(s, " VCPU   CPU Affinity\n----------------------");
        for (v, set) in &t.vcpus {
            let _ = writeln!(s, " {v:<6} {set}");
        }
    }
    s
}

/// `numatune DOM [--mode M] [--nodeset SET]`.
pub async fn numatune(
    conn: Arc<dyn Connection>,
    name: &str,
    affect: Affect,
    set: NumaParams,
) -> Result<NumaParams, TuneError> {
    let l = load(conn, name, true).await?;
    let resolved = affect.resolve(l.running);
    let dom = l.dom.clone();
    if set.mode.is_some() || set.nodeset.is_some() {
        gate(preflight::check(
            &ctx_for(&l, resolved),
            &Operation::Numatune { mode: set.mode, nodeset: set.nodeset.clone() },
        ))?;
    }
    Ok(blocking(move || {
        if set.mode.is_some() || set.nodeset.is_some() {
            dom.set_numa(&set, affect)?;
        }
        dom.numa(affect)
    })
    .await?)
}

pub fn render_numatune(p: &NumaParams) -> String {
    format!(
        "numa_mode      : {}\nnuma_nodeset   : {}\n",
        p.mode.map(NumaMode::as_str).unwrap_or("-"),
        p.nodeset.as_ref().map(|s| s.to_string()).unwrap_or_default()
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct NumaView {
    pub host: Vec<HostNodeView>,
    pub distances: Vec<Vec<u32>>,
    pub guest_cells: Vec<GuestCellView>,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostNodeView {
    pub id: u32,
    pub cpus: CpuSet,
    pub size: Bytes,
    pub free: Option<Bytes>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestCellView {
    pub id: u32,
    pub vcpus: CpuSet,
    pub memory: Bytes,
    pub dimm_memory: Bytes,
    pub host_nodes: Option<CpuSet>,
    pub mode: Option<String>,
}

/// `numa DOM`: host topology as `numactl -H`, guest cells and their host nodes.
pub async fn numa(conn: Arc<dyn Connection>, name: &str) -> Result<NumaView, TuneError> {
    let l = load(conn, name, true).await?;
    let host = l
        .host
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| HostNodeView {
            id: n.id,
            cpus: n.cpus.clone(),
            size: n.memory,
            free: l.host.free.get(i).copied(),
        })
        .collect();
    let distances = l
        .host
        .nodes
        .iter()
        .map(|n| l.host.nodes.iter().map(|m| n.distances.get(&m.id).copied().unwrap_or(0)).collect())
        .collect();
    let guest_cells = l
        .facts
        .cells
        .iter()
        .map(|c| GuestCellView {
            id: c.id,
            vcpus: c.cpus.clone(),
            memory: c.memory,
            dimm_memory: Bytes(l.facts.dimms.iter().filter(|d| d.node == Some(c.id)).map(|d| d.size.get()).sum()),
            host_nodes: l
                .facts
                .memnodes
                .get(&c.id)
                .map(|(_, s)| s.clone())
                .or_else(|| l.facts.numatune_nodeset.clone()),
            mode: l.facts.memnodes.get(&c.id).map(|(m, _)| m.clone()).or_else(|| l.facts.numatune_mode.clone()),
        })
        .collect();
    let findings = preflight::check(&ctx_for(&l, Affect::Live), &Operation::Readiness)
        .into_iter()
        .filter(|f| f.id == RuleId::NumaCellPinning.id() || f.id == RuleId::CpuSocketCell.id())
        .collect();
    Ok(NumaView { host, distances, guest_cells, findings })
}

pub fn render_numa(v: &NumaView) -> String {
    let mut s = String::new();
    let ids: Vec<String> = v.host.iter().map(|n| n.id.to_string()).collect();
    let _ = writeln!(s, "available: {} nodes ({})", v.host.len(), ids.join(","));
    for n in &v.host {
        let cpus: Vec<String> = n.cpus.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(s, "node {} cpus: {}", n.id, cpus.join(" "));
        let _ = writeln!(s, "node {} size: {} MB", n.id, n.size.mib());
        let _ = writeln!(
            s,
            "node {} free: {}",
            n.id,
            n.free.map(|f| format!("{} MB", f.mib())).unwrap_or_else(|| "?".into())
        );
    }
    let _ = writeln!(s, "node distances:\nnode {}", ids.iter().map(|i| format!("{i:>3}")).collect::<String>());
    for (n, row) in v.host.iter().zip(&v.distances) {
        let _ = writeln!(s, "{:>4}:{}", n.id, row.iter().map(|d| format!("{d:>4}")).collect::<String>());
    }
    let _ = writeln!(s, "\nguest cells:");
    for c in &v.guest_cells {
        let _ = writeln!(
            s,
            "cell {} vcpus {} memory {} (+{} DIMM) host nodes {} mode {}",
            c.id,
            c.vcpus,
            c.memory,
            c.dimm_memory,
            c.host_nodes.as_ref().map(|h| h.to_string()).unwrap_or_else(|| "any".into()),
            c.mode.as_deref().unwrap_or("-")
        );
    }
    for f in &v.findings {
        let _ = writeln!(s, "warning [{}] {}", f.id, f.message);
    }
    s
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub domain: String,
    /// The verbs asked about would act (none asked: the domain can hot-plug at all).
    pub ready: bool,
    pub guest: Option<GuestInfo>,
    pub agent_error: Option<String>,
    pub findings: Vec<Finding>,
    /// What the verbs would do, step by step, when ready.
    pub plan: Vec<String>,
    /// What the guest could release now (agents with the `forecast` capability).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Forecast>,
}

/// What `check` is asked: the same requests and options the verbs take.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub cpus: Option<u32>,
    /// `cpus` is a guest-level target (`setvcpus --guest`).
    pub guest: bool,
    pub memory: Option<MemoryOpts>,
    /// `resize-memory`'s request (virtio-mem).
    pub resize: Option<crate::vmem::ResizeOpts>,
    pub opts: HotplugOpts,
}

impl CheckRequest {
    /// The verbs asked about, in the order `check` reports them.
    pub fn verbs(&self) -> Vec<Box<dyn Preview>> {
        let mut verbs: Vec<Box<dyn Preview>> = Vec::new();
        match (self.cpus, self.guest) {
            (Some(target), true) => verbs.push(Box::new(crate::ops::GuestVcpus { target })),
            (Some(target), false) => verbs.push(Box::new(crate::ops::Setvcpus { target })),
            (None, _) => {}
        }
        if let Some(mem) = &self.memory {
            verbs.push(Box::new(crate::ops::AttachMemory { mem: mem.clone() }));
        }
        if let Some(r) = self.resize {
            verbs.push(Box::new(crate::vmem::ResizeMemory { r }));
        }
        verbs
    }
}

/// `check DOM [--cpus N] [--memory SIZE [--node N]]`: the verbs' own plans
/// without their execution, so "ready" means exactly that they would act. With
/// no request, the domain-wide rules: can it hot-plug at all.
pub async fn check(conn: Arc<dyn Connection>, name: &str, req: &CheckRequest) -> Result<CheckResult, TuneError> {
    check_verbs(conn, name, &req.verbs(), &req.opts).await
}

/// `check` of any verbs: each one's [`Preview`] (its plan, not its execution).
pub async fn check_verbs(
    conn: Arc<dyn Connection>,
    name: &str,
    verbs: &[Box<dyn Preview>],
    opts: &HotplugOpts,
) -> Result<CheckResult, TuneError> {
    let (facts, _link) = gather(conn, name, opts).await?;
    let mut findings = Vec::new();
    let mut plan = Vec::new();
    let mut ready = true;
    for verb in verbs {
        match verb.preview(&facts, opts) {
            Ok((f, steps)) => {
                findings.extend(f);
                plan.extend(steps);
            }
            Err(NotPlanned::Usage(m)) => return Err(DomainError::Usage(m).into()),
            Err(NotPlanned::Refused(r)) => {
                ready = false;
                findings.extend(r.findings);
            }
        }
    }
    if verbs.is_empty() {
        findings = preflight::check(&facts.ctx_for(opts.no_wait), &Operation::Readiness);
        ready = !preflight::has_errors(&findings);
    }
    findings.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.id.cmp(b.id)));
    findings.dedup();
    if !ready {
        plan.clear();
    }
    Ok(CheckResult {
        domain: name.into(),
        ready,
        guest: facts.guest,
        agent_error: facts.agent_error,
        findings,
        plan,
        forecast: facts.forecast,
    })
}

/// The guest's shrink forecast as text lines: per node, then per device.
pub fn forecast_lines(f: &Forecast) -> Vec<String> {
    let mut out: Vec<String> = f
        .nodes
        .iter()
        .map(|n| format!("node {}: {} of {} online could be released now", n.node, n.releasable, n.online))
        .collect();
    for d in &f.devices {
        let kind = match d.kind {
            DeviceKind::Dimm => "DIMM",
            DeviceKind::VirtioMem => "virtio-mem",
        };
        out.push(format!(
            "{kind} @{:#x} ({}): {} could be released now{}",
            d.start,
            d.size,
            d.releasable,
            d.held.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
        ));
    }
    out
}

pub fn render_check(c: &CheckResult) -> String {
    let mut s = format!("{}: {}\n", c.domain, if c.ready { "ready" } else { "NOT ready" });
    for step in &c.plan {
        let _ = writeln!(s, "  would: {step}");
    }
    if let Some(e) = &c.agent_error {
        let _ = writeln!(s, "  agent: {e}");
    }
    for line in c.forecast.iter().flat_map(forecast_lines) {
        let _ = writeln!(s, "  forecast: {line}");
    }
    for f in &c.findings {
        let _ = writeln!(
            s,
            "  {} [{}] {}",
            if f.severity == Severity::Error { "error" } else { "warning" },
            f.id,
            f.message
        );
    }
    s
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub domain: String,
    pub running: bool,
    /// As `virsh domstate` says it ("running", "paused", "in shutdown", …).
    pub state: &'static str,
    pub vcpus_current: u32,
    pub vcpus_max: u32,
    /// libvirt's `<memory>`: boot memory, DIMMs and every virtio-mem region's
    /// whole size, plugged or not (for a guest without virtio-mem, what it has).
    pub memory: Bytes,
    /// What the guest was given: boot memory, DIMMs and what virtio-mem plugged.
    pub memory_given: Bytes,
    /// The virtio-mem regions' whole size (what they could plug at most).
    pub virtio_mem_capacity: Bytes,
    pub max_memory: Option<Bytes>,
    pub slots: Option<u32>,
    pub slots_free: u32,
    pub dimms: Vec<DimmStatus>,
    pub virtio_mem: Vec<VirtioMemStatus>,
    pub guest: Option<GuestInfo>,
    pub agent_error: Option<String>,
    /// What the guest could release now (agents with the `forecast` capability).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Forecast>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DimmStatus {
    pub alias: Option<String>,
    pub size: Bytes,
    pub node: Option<u32>,
    pub base: Option<u64>,
    pub blocks: Vec<BlockState>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VirtioMemStatus {
    #[serde(flatten)]
    pub device: crate::xml::VirtioMem,
    /// The guest's blocks of the region that are present (plugged).
    pub blocks: Vec<BlockState>,
}

/// `status DOM`: the host's and the guest's view side by side.
pub async fn status(
    conn: Arc<dyn Connection>,
    name: &str,
    agent: Option<&AgentAddr>,
    agent_wait: Duration,
) -> Result<Status, TuneError> {
    let l = load(conn, name, true).await?;
    let mut dimms: Vec<DimmStatus> = l
        .facts
        .dimms
        .iter()
        .map(|d| DimmStatus { alias: d.alias.clone(), size: d.size, node: d.node, base: d.base, blocks: vec![] })
        .collect();
    let mut virtio_mem: Vec<VirtioMemStatus> =
        l.facts.virtio_mems.iter().map(|v| VirtioMemStatus { device: v.clone(), blocks: vec![] }).collect();
    let (link, err) = agent_if_running(&l, agent, agent_wait).await;
    let mut agent_error = err.map(|e| e.to_string());
    let mut guest = None;
    let mut forecast = None;
    if let Some(mut link) = link {
        for v in virtio_mem.iter_mut() {
            if let Some(range) = v.device.range() {
                match link.blocks(vec![range]).await {
                    Ok(b) => v.blocks = b.into_iter().filter(|b| b.present).collect(),
                    Err(e) => agent_error = Some(e.to_string()),
                }
            }
        }
        for d in dimms.iter_mut() {
            if let Some(base) = d.base {
                match link.blocks(vec![MemRange { start: base, size: d.size }]).await {
                    Ok(b) => d.blocks = b,
                    Err(e) => agent_error = Some(e.to_string()),
                }
            }
        }
        let req = ForecastRequest {
            dimms: dimms.iter().filter_map(|d| Some(MemRange { start: d.base?, size: d.size })).collect(),
            virtio_mem: virtio_mem.iter().filter_map(|v| v.device.range()).collect(),
            release: None,
        };
        if !req.dimms.is_empty() || !req.virtio_mem.is_empty() {
            match link.forecast(req).await {
                Ok(f) => forecast = f,
                Err(e) => agent_error = Some(e.to_string()),
            }
        }
        guest = Some(link.info);
    }
    Ok(Status {
        domain: name.into(),
        running: l.running,
        state: l.state.as_str(),
        vcpus_current: l.facts.vcpus_current,
        vcpus_max: l.facts.vcpus_max,
        memory: l.facts.memory,
        memory_given: l.facts.guest_memory(),
        virtio_mem_capacity: Bytes(l.facts.virtio_mems.iter().map(|v| v.size.get()).sum()),
        max_memory: l.facts.max_memory,
        slots: l.facts.slots,
        slots_free: l.facts.free_slots(),
        dimms,
        virtio_mem,
        guest,
        agent_error,
        forecast,
    })
}

pub fn render_status(st: &Status) -> String {
    let mut s = String::new();
    let g = st.guest.as_ref();
    let _ = writeln!(s, "{:<14} {:<34} guest (agent)", "", "host (libvirt)");
    let _ = writeln!(
        s,
        "{:<14} {:<34} {}",
        "state",
        st.state,
        g.map(|g| format!("kernel {}", g.kernel)).unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "{:<14} {:<34} {}",
        "vcpus",
        format!("{} of {}", st.vcpus_current, st.vcpus_max),
        g.map(|g| format!("{} online ({}), possible {}", g.cpus.online.len(), g.cpus.online, g.cpus.possible))
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "{:<14} {:<34} {}",
        "memory",
        format!("{} of {}", st.memory_given, st.max_memory.map(|m| m.to_string()).unwrap_or_else(|| "-".into())),
        g.map(|g| format!("MemTotal {}, available {}", g.mem_total, g.mem_available)).unwrap_or_else(|| "-".into())
    );
    if !st.virtio_mem.is_empty() {
        // The regions apart: what they may still plug is not the guest's.
        let plugged = Bytes(st.virtio_mem.iter().map(|v| v.device.plugged().get()).sum());
        let _ = writeln!(
            s,
            "{:<14} {:<34} -",
            "virtio-mem",
            format!("{} plugged of {} capacity", plugged, st.virtio_mem_capacity)
        );
    }
    let _ = writeln!(
        s,
        "{:<14} {:<34} {}",
        "blocks",
        format!("slots {} used, {} free", st.dimms.len(), st.slots_free),
        g.and_then(|g| g.memory.as_ref())
            .map(|m| format!("{} online, {} offline, block size {}", m.blocks_online, m.blocks_offline, m.block_size))
            .unwrap_or_else(|| "-".into())
    );
    for d in &st.dimms {
        let online = d.blocks.iter().filter(|b| b.online).count();
        let zones: std::collections::BTreeSet<&str> = d.blocks.iter().filter_map(|b| b.zone.as_deref()).collect();
        let nodes: std::collections::BTreeSet<u32> = d.blocks.iter().filter_map(|b| b.node).collect();
        let _ = writeln!(
            s,
            "{:<14} {:<34} {}",
            format!("dimm {}", d.alias.as_deref().unwrap_or("?")),
            format!(
                "{} node {} @{:#x}",
                d.size,
                d.node.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                d.base.unwrap_or(0)
            ),
            if d.blocks.is_empty() {
                "-".to_string()
            } else {
                {
                    let zones: Vec<&str> = zones.into_iter().collect();
                    let nodes: Vec<String> = nodes.iter().map(u32::to_string).collect();
                    format!(
                        "{online}/{} blocks online, zone {}, node {}",
                        d.blocks.len(),
                        zones.join(","),
                        nodes.join(",")
                    )
                }
            }
        );
    }
    for v in &st.virtio_mem {
        let online = v.blocks.iter().filter(|b| b.online).count();
        let zones: std::collections::BTreeSet<&str> = v.blocks.iter().filter_map(|b| b.zone.as_deref()).collect();
        let _ = writeln!(
            s,
            "{:<14} {:<34} {}",
            format!("virtio-mem {}", v.device.alias.as_deref().unwrap_or("?")),
            format!(
                "{} node {}: requested {}, holds {}",
                v.device.size,
                v.device.node.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                v.device.requested,
                v.device.current.map(|c| c.to_string()).unwrap_or_else(|| "-".into())
            ),
            if g.is_none() {
                "-".to_string()
            } else {
                let zones: Vec<&str> = zones.into_iter().collect();
                format!(
                    "{online}/{} plugged blocks online, zone {}",
                    v.blocks.len(),
                    if zones.is_empty() { "-".into() } else { zones.join(",") }
                )
            }
        );
    }
    for line in st.forecast.iter().flat_map(forecast_lines) {
        let _ = writeln!(s, "{:<14} {line}", "forecast");
    }
    if let Some(e) = &st.agent_error {
        let _ = writeln!(s, "agent: {e}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeConnection, FakeDomain};
    use vmplug_common::GIB;

    /// 1 GiB of boot memory and an empty 2 GiB virtio-mem region: libvirt's
    /// `<memory>` says 3 GiB.
    const EMPTY_REGION: &str = "<domain type='kvm' id='7'><name>vm</name>\
        <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>\
        <memory unit='KiB'>3145728</memory><maxMemory slots='4' unit='KiB'>8388608</maxMemory>\
        <vcpu placement='static'>2</vcpu><os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type></os>\
        <devices><memory model='virtio-mem'><target><size unit='KiB'>2097152</size><node>0</node>\
        <block unit='KiB'>2048</block><requested unit='KiB'>0</requested><current unit='KiB'>0</current>\
        </target><alias name='virtiomem0'/></memory></devices></domain>";

    async fn status_of(xml: &str) -> Status {
        let dom = FakeDomain::new("vm", xml, None);
        dom.set_running(false);
        let conn = FakeConnection::new(include_str!("../tests/fixtures/caps.xml"), vec![dom]);
        status(conn, "vm", None, Duration::from_millis(10)).await.expect("status")
    }

    #[tokio::test]
    async fn status_says_what_the_guest_was_given_and_the_regions_apart() {
        let st = status_of(EMPTY_REGION).await;
        assert_eq!(st.memory, Bytes(3 * GIB), "libvirt's <memory>, as before");
        assert_eq!(st.memory_given, Bytes(GIB));
        assert_eq!(st.virtio_mem_capacity, Bytes(2 * GIB));
        let text = render_status(&st);
        let line = |key: &str| text.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_string();
        assert!(line("memory ").contains("1 GiB of 8 GiB"), "{text}");
        assert!(line("virtio-mem ").contains("0 B plugged of 2 GiB capacity"), "{text}");
    }

    #[tokio::test]
    async fn status_counts_dimms_and_plugged_virtio_mem() {
        // 8 GiB boot, a 1 GiB DIMM, two 2 GiB regions, one holding 512 MiB.
        let st = status_of(include_str!("../tests/fixtures/x86-virtio-mem.xml").replace("mem1", "vm").as_str()).await;
        assert_eq!(st.memory, Bytes(13 * GIB));
        assert_eq!(st.memory_given, Bytes(9 * GIB + GIB / 2));
        assert_eq!(st.virtio_mem_capacity, Bytes(4 * GIB));
    }

    #[tokio::test]
    async fn status_of_a_dimm_only_guest_keeps_memory_as_it_was() {
        let xml = include_str!("../tests/fixtures/x86-ready.xml");
        let name = crate::xml::DomainFacts::parse(xml).expect("parses").name;
        let dom = FakeDomain::new(&name, xml, None);
        dom.set_running(false);
        let conn = FakeConnection::new(include_str!("../tests/fixtures/caps.xml"), vec![dom]);
        let st = status(conn, &name, None, Duration::from_millis(10)).await.expect("status");
        assert_eq!(st.memory, st.memory_given);
        assert_eq!(st.virtio_mem_capacity, Bytes(0));
        assert!(!render_status(&st).contains("virtio-mem"));
    }

    #[test]
    fn the_fake_finds_a_domain_by_name_id_or_uuid() {
        let conn = FakeConnection::new("<capabilities/>", vec![FakeDomain::new("vm", EMPTY_REGION, None)]);
        for key in ["vm", "7", "6695eb01-f6a4-8304-79aa-97f2502e193f", "6695EB01F6A4830479AA97F2502E193F"] {
            assert_eq!(conn.lookup(key).map(|d| d.name().to_string()).ok().as_deref(), Some("vm"), "{key}");
        }
        for key in ["8", "6695eb01-f6a4-8304-79aa-97f2502e1930", "VM"] {
            assert!(matches!(conn.lookup(key), Err(DomainError::NotFound(_))), "{key}");
        }
    }
}
