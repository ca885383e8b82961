//! The closed loop: read → preflight → plan → act through libvirt → wait for the
//! guest → verify → one report. Blocking libvirt calls run off the async threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmplug_common::protocol::{MemRange, OfflineRequest, OnlineRequest, ZonePolicy};
use vmplug_common::Bytes;

use crate::domain::{Affect, Connection, DomainError, XmlView};
use crate::facts::Facts;
use crate::link::{GuestAgent, LinkError};
use crate::plan::{plan_attach_memory, plan_setvcpus, MemoryPlan, VcpuPlan};
use crate::preflight::NotPlanned;
use crate::preflight::{Ctx, Finding, RuleId, Severity};
use crate::report::{libvirt_failed, ms, persistent_only, HostOnly, OpReport, Outcome};
use crate::verb::{HotplugArgs, Verb, VerbArgs};
use crate::xml::{request_index, DomainFacts, HostFacts};

pub use crate::facts::{
    agent_if_running, blocking, connect_agent, host_facts, load, new_request_id, probe_cpu_hotplug, read_domain,
    read_host, valid_request_id, DomainRead, HotplugOpts, Loaded, MemoryOpts,
};
pub use crate::report::{affect_text, Run};

/// `vmplug setvcpus N`: offline first when shrinking, socket-sized libvirt
/// steps, the guest's confirmation, [`judge_vcpus`].
#[derive(Debug, Clone, Copy)]
pub struct Setvcpus {
    pub target: u32,
}

impl Verb for Setvcpus {
    const NAME: &'static str = "setvcpus";
    type Plan = VcpuPlan;
    type Evidence = VcpuEvidence;

    fn plan(&self, facts: &Facts, opts: &HotplugOpts) -> Result<VcpuPlan, NotPlanned> {
        plan_setvcpus(facts, self.target, opts)
    }

    fn preview(&self, facts: &Facts, p: VcpuPlan) -> (Vec<Finding>, Vec<String>) {
        let steps = p.steps.iter().map(|s| format!("setvcpus {s} ({})", affect_text(facts.affect))).collect();
        (p.findings, steps)
    }

    async fn execute<A: GuestAgent>(
        &self,
        facts: &Facts,
        link: Option<&mut A>,
        plan: VcpuPlan,
        opts: &HotplugOpts,
        run: &mut Run,
    ) -> Result<VcpuEvidence, DomainError> {
        Ok(execute_vcpus(facts, link, plan, opts, run).await)
    }

    fn judge(&self, facts: &Facts, ev: VcpuEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
        judge_setvcpus(facts, ev, opts, run)
    }
}

/// Set the number of vCPUs; waits until the guest has them online.
#[derive(clap::Args, Debug, Clone)]
pub struct SetvcpusArgs {
    /// Domain name, ID or UUID (as virsh takes them).
    pub domain: String,
    /// The total number of vCPUs wanted (not a delta).
    #[arg(required_unless_present = "count_flag")]
    pub count: Option<u32>,
    /// The count, as virsh setvcpus --count (instead of COUNT).
    #[arg(long = "count", value_name = "COUNT", conflicts_with = "count")]
    pub count_flag: Option<u32>,
    /// virsh's --maximum (change the most vCPUs the definition allows) is
    /// refused: `vmplug prepare DOMAIN --max-vcpus N` does that.
    #[arg(long)]
    pub maximum: bool,
    /// Guest-level scaling (virsh setvcpus --guest): online or offline CPUs
    /// inside the guest, among the vCPUs it has; nothing is plugged. The way
    /// to scale where QEMU cannot hot-plug vCPUs (upstream aarch64).
    #[arg(long, conflicts_with_all = ["no_wait", "force", "config"])]
    pub guest: bool,
    #[command(flatten)]
    pub hotplug: HotplugArgs,
}

impl VerbArgs for SetvcpusArgs {
    type Verb = VcpuVerb;

    crate::domain_field!();

    fn verb(&self) -> Result<VcpuVerb, DomainError> {
        let target = self
            .count
            .or(self.count_flag)
            .ok_or_else(|| DomainError::Usage("setvcpus: give COUNT or --count".into()))?;
        Ok(if self.guest { VcpuVerb::Guest(GuestVcpus { target }) } else { VcpuVerb::Plug(Setvcpus { target }) })
    }

    fn opts(&self) -> Result<HotplugOpts, DomainError> {
        self.hotplug.opts()
    }

    fn unsupported(&self) -> Option<String> {
        self.maximum.then(|| {
            let d = &self.domain;
            format!("setvcpus --maximum is not supported: change the most vCPUs '{d}' may have with `vmplug prepare {d} --max-vcpus N` (persistent definition, effective at the next start)")
        })
    }
}

/// `setvcpus` as its command line asks: vCPUs plugged by libvirt, or (with
/// `--guest`) CPUs onlined among those the guest has.
#[derive(Debug, Clone, Copy)]
pub enum VcpuVerb {
    Plug(Setvcpus),
    Guest(GuestVcpus),
}

/// The plan of the one `setvcpus` asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum VcpuVerbPlan {
    Plug(VcpuPlan),
    Guest(crate::plan::GuestVcpuPlan),
}

/// The evidence of the one `setvcpus` that ran.
#[derive(Debug)]
pub enum VcpuVerbEvidence {
    Plug(VcpuEvidence),
    Guest(GuestVcpuEvidence),
}

impl Verb for VcpuVerb {
    const NAME: &'static str = Setvcpus::NAME;
    type Plan = VcpuVerbPlan;
    type Evidence = VcpuVerbEvidence;

    fn plan(&self, facts: &Facts, opts: &HotplugOpts) -> Result<VcpuVerbPlan, NotPlanned> {
        match self {
            VcpuVerb::Plug(v) => v.plan(facts, opts).map(VcpuVerbPlan::Plug),
            VcpuVerb::Guest(v) => v.plan(facts, opts).map(VcpuVerbPlan::Guest),
        }
    }

    fn preview(&self, facts: &Facts, p: VcpuVerbPlan) -> (Vec<Finding>, Vec<String>) {
        match p {
            VcpuVerbPlan::Plug(p) => Setvcpus { target: p.target }.preview(facts, p),
            VcpuVerbPlan::Guest(p) => GuestVcpus { target: p.target }.preview(facts, p),
        }
    }

    async fn execute<A: GuestAgent>(
        &self,
        facts: &Facts,
        link: Option<&mut A>,
        plan: VcpuVerbPlan,
        opts: &HotplugOpts,
        run: &mut Run,
    ) -> Result<VcpuVerbEvidence, DomainError> {
        Ok(match plan {
            VcpuVerbPlan::Plug(p) => VcpuVerbEvidence::Plug(execute_vcpus(facts, link, p, opts, run).await),
            VcpuVerbPlan::Guest(p) => VcpuVerbEvidence::Guest(execute_guest_vcpus(link, p, opts, run).await?),
        })
    }

    fn judge(&self, facts: &Facts, ev: VcpuVerbEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
        match ev {
            VcpuVerbEvidence::Plug(ev) => judge_setvcpus(facts, ev, opts, run),
            VcpuVerbEvidence::Guest(ev) => judge_guest_scaling(facts, ev, opts, run),
        }
    }
}

/// What a `setvcpus` did and saw, with its plan.
#[derive(Debug)]
pub struct VcpuEvidence {
    pub plan: VcpuPlan,
    pub seen: VcpuSeen,
}

/// How a `setvcpus` went.
#[derive(Debug)]
pub enum VcpuSeen {
    /// A live shrink the guest did not release (its answer); libvirt was not
    /// touched. `back`: how onlining the CPUs again went.
    NotReleased { answer: Result<vmplug_common::protocol::Report, LinkError>, back: String },
    /// libvirt refused a step; `applied` are the steps before it.
    Libvirt { applied: Vec<String>, error: DomainError },
    /// Every step ran: libvirt's view after them, what the guest released
    /// first (a shrink) and its confirmation.
    Applied {
        applied: Vec<String>,
        released: Option<vmplug_common::protocol::Report>,
        confirmation: Option<Result<vmplug_common::protocol::Report, LinkError>>,
        after: Option<Box<DomainFacts>>,
    },
}

async fn execute_vcpus<A: GuestAgent>(
    facts: &Facts,
    mut link: Option<&mut A>,
    plan: VcpuPlan,
    opts: &HotplugOpts,
    run: &mut Run,
) -> VcpuEvidence {
    let affect = facts.affect;
    let mut released = None;
    if let (true, Some(link)) = (plan.offline_first, link.as_deref_mut()) {
        match release_cpus(link, &plan, opts, run).await {
            Ok(r) => released = Some(r),
            Err((answer, back)) => return VcpuEvidence { plan, seen: VcpuSeen::NotReleased { answer, back } },
        }
    }
    let mut applied = Vec::new();
    let t = Instant::now();
    for step in plan.steps.iter().copied() {
        let dom = facts.loaded.dom.clone();
        if let Err(error) = blocking(move || dom.set_vcpus(step, affect)).await {
            run.libvirt_ms = ms(t);
            return VcpuEvidence { plan, seen: VcpuSeen::Libvirt { applied, error } };
        }
        applied.push(format!("setvcpus {step} ({})", affect_text(affect)));
    }
    run.libvirt_ms = ms(t);
    let mut confirmation = None;
    if let (true, Some(link)) = (plan.confirm, link) {
        let t = Instant::now();
        let req = OnlineRequest {
            cpus: Some(plan.target),
            memory: vec![],
            zone: opts.zone,
            timeout_ms: opts.timeout.as_millis() as u64,
            virtio_mem: vec![],
        };
        let r = link.online(req).await;
        run.guest_ms += ms(t);
        run.milestones = link.milestones();
        confirmation = Some(r.map(|(r, reconnects)| {
            if reconnects > 0 {
                applied.push(format!("guest agent link re-established {reconnects} time(s) during the wait"));
            }
            r
        }));
    }
    let (dom, view) = (facts.loaded.dom.clone(), if affect.live() { XmlView::Live } else { XmlView::Inactive });
    let after = blocking(move || dom.xml(view)).await.ok().and_then(|x| DomainFacts::parse(&x).ok()).map(Box::new);
    VcpuEvidence { plan, seen: VcpuSeen::Applied { applied, released, confirmation, after } }
}

/// `setvcpus`'s judge (pure): a shrink the guest did not release, a step
/// libvirt refused, or [`judge_vcpus`] over libvirt's view and the guest's word.
fn judge_setvcpus(facts: &Facts, ev: VcpuEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
    let (name, affect) = (facts.loaded.facts.name.as_str(), facts.affect);
    let VcpuEvidence { plan, seen } = ev;
    let (applied, released, confirmation, after) = match seen {
        VcpuSeen::NotReleased { answer, back } => {
            let why = match &answer {
                Ok(r) => format!("the guest could not take {} CPU(s) offline", r.failures().max(1)),
                Err(e) => format!("the guest did not take the CPUs offline: {e}"),
            };
            let findings = plan.findings;
            let host = HostOnly { op: Setvcpus::NAME, name, affect, findings, applied: vec![], persistent: false };
            let message = format!("{why}; {back}; nothing was changed in libvirt");
            let mut report = host.report(Outcome::GuestFailed, message, run);
            report.guest = answer.ok();
            return report;
        }
        VcpuSeen::Libvirt { applied, error } => {
            return libvirt_failed(Setvcpus::NAME, name, affect, applied, plan.findings, &error, run)
        }
        VcpuSeen::Applied { applied, released, confirmation, after } => (applied, released, confirmation, after),
    };
    let (outcome, message) = judge_vcpus(&plan, affect, confirmation.as_ref(), after.as_deref(), opts.timeout);
    let guest = match confirmation {
        Some(Ok(r)) => Some(r),
        _ => released,
    };
    let host =
        HostOnly { op: Setvcpus::NAME, name, affect, findings: plan.findings, applied, persistent: affect.config() };
    let mut report = host.report(outcome, message, run);
    report.host.verified = after.as_ref().map(|f| format!("vcpu current={} max={}", f.vcpus_current, f.vcpus_max));
    report.guest = guest;
    report
}

/// `setvcpus --guest`: virsh's `setvcpus --guest` done by vmplug's agent and
/// verified — `target` CPUs online inside the guest, among the vCPUs it has.
/// Where QEMU cannot hot-plug vCPUs (upstream aarch64) this is how a guest
/// scales: all vCPUs defined at boot, the surplus kept offline.
#[derive(Debug, Clone, Copy)]
pub struct GuestVcpus {
    pub target: u32,
}

impl Verb for GuestVcpus {
    const NAME: &'static str = Setvcpus::NAME;
    type Plan = crate::plan::GuestVcpuPlan;
    type Evidence = GuestVcpuEvidence;

    fn plan(&self, facts: &Facts, opts: &HotplugOpts) -> Result<Self::Plan, NotPlanned> {
        crate::plan::plan_guest_vcpus(facts, self.target, opts)
    }

    fn preview(&self, _: &Facts, p: Self::Plan) -> (Vec<Finding>, Vec<String>) {
        let steps = match p.target.cmp(&p.online) {
            std::cmp::Ordering::Equal => vec![],
            std::cmp::Ordering::Greater => vec![format!("guest: online CPUs {} → {}", p.online, p.target)],
            std::cmp::Ordering::Less => vec![format!("guest: offline CPUs {} → {}", p.online, p.target)],
        };
        (p.findings, steps)
    }

    async fn execute<A: GuestAgent>(
        &self,
        _: &Facts,
        link: Option<&mut A>,
        plan: Self::Plan,
        opts: &HotplugOpts,
        run: &mut Run,
    ) -> Result<GuestVcpuEvidence, DomainError> {
        execute_guest_vcpus(link, plan, opts, run).await
    }

    fn judge(&self, facts: &Facts, ev: GuestVcpuEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
        judge_guest_scaling(facts, ev, opts, run)
    }
}

/// What `setvcpus --guest` asked of the agent and its answer (none when the
/// guest already had the count), with the plan.
#[derive(Debug)]
pub struct GuestVcpuEvidence {
    pub plan: crate::plan::GuestVcpuPlan,
    /// The request ("online" or "offline") and the agent's answer.
    pub answer: Option<(&'static str, Result<vmplug_common::protocol::Report, LinkError>)>,
}

/// The verdict of `setvcpus --guest` from the agent's answer to its `verb`
/// ("online" or "offline") request (pure): `target` CPUs online, confirmed.
pub fn judge_guest_vcpus(
    target: u32,
    verb: &str,
    answer: &Result<vmplug_common::protocol::Report, LinkError>,
    libvirt: u32,
    timeout: Duration,
) -> (Outcome, String) {
    match answer {
        Ok(r) if r.complete && r.cpus_online.len() as u32 == target => {
            (Outcome::Ok, format!("{target} CPUs online in the guest ({}), confirmed by its agent; libvirt's {libvirt} vCPUs unchanged (guest-level scaling)", r.cpus_online))
        }
        Ok(r) if r.timed_out => (Outcome::GuestTimeout, format!("the guest has {} CPUs online ({}) after {timeout:?}, not {target}", r.cpus_online.len(), r.cpus_online)),
        Ok(r) => (Outcome::GuestFailed, format!("the guest has {} CPUs online ({}), not {target}: {} CPU(s) could not be {verb}d", r.cpus_online.len(), r.cpus_online, r.failures())),
        Err(e) => (Outcome::GuestFailed, format!("the guest agent did not answer the {verb} request: {e}")),
    }
}

async fn execute_guest_vcpus<A: GuestAgent>(
    link: Option<&mut A>,
    plan: crate::plan::GuestVcpuPlan,
    opts: &HotplugOpts,
    run: &mut Run,
) -> Result<GuestVcpuEvidence, DomainError> {
    let Some(link) = link else { return Err(DomainError::Usage("--guest needs the guest agent".into())) };
    if plan.target == plan.online {
        return Ok(GuestVcpuEvidence { plan, answer: None });
    }
    let (target, timeout_ms) = (plan.target, opts.timeout.as_millis() as u64);
    let t = Instant::now();
    let answer = if plan.target > plan.online {
        let req = OnlineRequest { cpus: Some(target), memory: vec![], zone: opts.zone, timeout_ms, virtio_mem: vec![] };
        ("online", link.online(req).await.map(|(r, _)| r))
    } else {
        ("offline", link.offline(OfflineRequest { cpus: Some(target), memory: vec![], timeout_ms }).await)
    };
    run.guest_ms += ms(t);
    Ok(GuestVcpuEvidence { plan, answer: Some(answer) })
}

/// `setvcpus --guest`'s judge (pure): nothing to do, or
/// [`judge_guest_vcpus`] over the agent's answer.
fn judge_guest_scaling(facts: &Facts, ev: GuestVcpuEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
    let (name, target, libvirt) = (facts.loaded.facts.name.as_str(), ev.plan.target, facts.loaded.facts.vcpus_current);
    let findings = ev.plan.findings;
    let host =
        |applied| HostOnly { op: Setvcpus::NAME, name, affect: Affect::Live, findings, applied, persistent: false };
    let Some((verb, answer)) = ev.answer else {
        let msg =
            format!("{target} CPUs are already online in the guest; nothing was changed (libvirt: {libvirt} vCPUs)");
        return host(vec![]).report(Outcome::Ok, msg, run);
    };
    let applied =
        vec![format!("guest: {verb} CPUs to {target} online (guest-level; libvirt's {libvirt} vCPUs unchanged)")];
    let (outcome, message) = judge_guest_vcpus(target, verb, &answer, libvirt, opts.timeout);
    let mut report = host(applied).report(outcome, message, run);
    report.guest = answer.ok();
    report
}

/// A live shrink's first step: the guest takes the CPUs offline. libvirt never
/// unplugs a CPU the guest has not released: on failure the CPUs are onlined
/// again, and the agent's answer and how that went are returned.
async fn release_cpus<A: GuestAgent>(
    link: &mut A,
    plan: &VcpuPlan,
    opts: &HotplugOpts,
    run: &mut Run,
) -> Result<vmplug_common::protocol::Report, (Result<vmplug_common::protocol::Report, LinkError>, String)> {
    let t = Instant::now();
    let req = OfflineRequest { cpus: Some(plan.target), memory: vec![], timeout_ms: opts.timeout.as_millis() as u64 };
    let r = link.offline(req).await;
    run.guest_ms += ms(t);
    match r {
        Ok(r) if r.complete => Ok(r),
        answer => Err((answer, put_cpus_back(link, plan.current, opts).await)),
    }
}

/// Onlines CPUs up to `count` again after a shrink the guest could not finish.
async fn put_cpus_back<A: GuestAgent>(link: &mut A, count: u32, opts: &HotplugOpts) -> String {
    let req = OnlineRequest {
        cpus: Some(count),
        memory: vec![],
        zone: opts.zone,
        timeout_ms: opts.timeout.as_millis() as u64,
        virtio_mem: vec![],
    };
    match link.online(req).await {
        Ok((r, _)) if r.complete => format!("{} CPU(s) online again", r.cpus_online.len()),
        Ok((r, _)) => format!("only {} CPU(s) online again", r.cpus_online.len()),
        Err(e) => format!("the CPUs could not be onlined again: {e}"),
    }
}

/// The verdict of `setvcpus` from its evidence: libvirt's view after the steps
/// and, when the plan asked for it, the guest's confirmation.
pub fn judge_vcpus(
    plan: &VcpuPlan,
    affect: Affect,
    confirmation: Option<&Result<vmplug_common::protocol::Report, crate::link::LinkError>>,
    after: Option<&DomainFacts>,
    timeout: Duration,
) -> (Outcome, String) {
    let target = plan.target;
    if let Some(f) = after {
        if f.vcpus_current != target {
            return (
                Outcome::LibvirtError,
                format!("libvirt reports {} vCPUs after setting {target}", f.vcpus_current),
            );
        }
    }
    if !affect.live() {
        return (Outcome::Ok, format!("{target} vCPUs in the persistent definition (effective at the next start)"));
    }
    match confirmation {
        Some(Ok(r)) if r.timed_out => (
            Outcome::GuestTimeout,
            format!(
                "libvirt set {target} vCPUs but the guest has only {} online after {timeout:?}",
                r.cpus_online.len()
            ),
        ),
        Some(Ok(r)) if !r.complete => {
            (Outcome::GuestFailed, format!("the guest could not bring {target} CPUs online ({} failed)", r.failures()))
        }
        // The host counts: a report that calls itself complete with another
        // number of CPUs online is not agreement.
        Some(Ok(r)) if r.cpus_online.len() as u32 != target => (
            Outcome::GuestFailed,
            format!(
                "libvirt set {target} vCPUs but the guest reports {} online ({})",
                r.cpus_online.len(),
                r.cpus_online
            ),
        ),
        Some(Ok(r)) => (Outcome::Ok, format!("{target} vCPUs: libvirt and the guest agree ({} online)", r.cpus_online)),
        Some(Err(e)) => (Outcome::GuestFailed, format!("libvirt set {target} vCPUs; the guest did not confirm: {e}")),
        None if plan.offline_first => {
            (Outcome::Ok, format!("{target} vCPUs: the guest released the CPUs first, then libvirt unplugged them"))
        }
        None if plan.steps.is_empty() => {
            (Outcome::Ok, format!("the domain already has {target} vCPUs; nothing was changed (guest not verified)"))
        }
        None => (Outcome::Ok, format!("{target} vCPUs set in libvirt; guest not verified (--no-wait or no agent)")),
    }
}

/// `vmplug attach-memory`: DIMMs sized to the guest's block size, reconciled
/// with what this request already attached; attach, find the DIMMs' addresses
/// in the live XML, have the guest online exactly those blocks, [`judge_memory`].
#[derive(Debug, Clone)]
pub struct AttachMemory {
    pub mem: MemoryOpts,
}

/// Hot-plug memory as DIMMs; waits until the guest has every block online.
#[derive(clap::Args, Debug, Clone)]
pub struct AttachMemoryArgs {
    /// Domain name, ID or UUID (as virsh takes them).
    pub domain: String,
    /// Memory to add, with a unit: 512M, 1G, 2GiB (binary: 1G = 1024M; a bare number is refused).
    #[arg(value_parser = vmplug_common::size::parse_size)]
    pub size: Bytes,
    /// Guest NUMA node (default: balanced over the cells).
    #[arg(long)]
    pub node: Option<u32>,
    /// Round a misaligned size up to the guest's block size.
    #[arg(long)]
    pub round_up: bool,
    /// Largest single DIMM (a size with a unit); larger requests are split.
    #[arg(long, default_value = "4G", value_parser = vmplug_common::size::parse_size)]
    pub max_dimm: Bytes,
    /// Idempotency key: repeating the command with the same id (after a crash)
    /// attaches only what is missing. Default: a fresh id, printed in the report.
    #[arg(long)]
    pub request_id: Option<String>,
    #[command(flatten)]
    pub hotplug: HotplugArgs,
}

impl VerbArgs for AttachMemoryArgs {
    type Verb = AttachMemory;

    crate::domain_field!();

    fn verb(&self) -> Result<AttachMemory, DomainError> {
        Ok(AttachMemory {
            mem: MemoryOpts {
                size: self.size,
                node: self.node,
                round_up: self.round_up,
                ceiling: None,
                max_dimm: self.max_dimm,
                request_id: self.request_id.clone().unwrap_or_else(new_request_id),
            },
        })
    }

    fn opts(&self) -> Result<HotplugOpts, DomainError> {
        self.hotplug.opts()
    }
}

impl Verb for AttachMemory {
    const NAME: &'static str = "attach-memory";
    type Plan = MemoryPlan;
    type Evidence = MemoryEvidence;

    fn request_id(&self) -> Option<&str> {
        Some(&self.mem.request_id)
    }

    fn plan(&self, facts: &Facts, opts: &HotplugOpts) -> Result<MemoryPlan, NotPlanned> {
        plan_attach_memory(facts, &self.mem, opts)
    }

    fn preview(&self, _: &Facts, p: MemoryPlan) -> (Vec<Finding>, Vec<String>) {
        let steps = p
            .dimms
            .iter()
            .map(|d| format!("attach dimm {} on node {} as {}", d.spec.size, d.spec.node, d.alias))
            .collect();
        (p.findings, steps)
    }

    async fn execute<A: GuestAgent>(
        &self,
        facts: &Facts,
        link: Option<&mut A>,
        plan: MemoryPlan,
        opts: &HotplugOpts,
        run: &mut Run,
    ) -> Result<MemoryEvidence, DomainError> {
        Ok(execute_memory(facts, link, plan, &self.mem, opts, run).await)
    }

    fn judge(&self, facts: &Facts, ev: MemoryEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
        judge_attach(facts, &self.mem.request_id, ev, opts, run)
    }
}

/// What an `attach-memory` did and saw: its plan (with what earlier waves
/// settled), the steps applied, and how it ended.
#[derive(Debug)]
pub struct MemoryEvidence {
    pub plan: MemoryPlan,
    pub applied: Vec<String>,
    /// The plan's waves (1 when it was not staged).
    pub waves: usize,
    pub seen: MemorySeen,
}

/// How an `attach-memory` ended.
#[derive(Debug)]
pub enum MemorySeen {
    /// libvirt refused a DIMM; `applied` lists the ones before it.
    Libvirt(DomainError),
    /// A staged plug stopped after wave `done`.
    WaveStopped { done: usize, why: WaveEnd },
    /// Only the persistent definition changed.
    Persistent,
    /// The DIMMs were attached but the live XML could not be read after.
    Unread(DomainError),
    /// The live XML after the attach and, when the plan asked, the guest's
    /// answer to onlining the request's ranges.
    Placed { after: Box<DomainFacts>, confirmation: Option<Result<vmplug_common::protocol::Report, LinkError>> },
}

/// Why a staged plug stopped between waves.
#[derive(Debug)]
pub enum WaveEnd {
    /// The guest did not online the wave.
    NotOnline(String),
    /// The guest has too little available for the next wave, or did not say.
    NoRoom(String),
}

async fn execute_memory<A: GuestAgent>(
    facts: &Facts,
    link: Option<&mut A>,
    plan: MemoryPlan,
    mem: &MemoryOpts,
    opts: &HotplugOpts,
    run: &mut Run,
) -> MemoryEvidence {
    let name = facts.loaded.facts.name.as_str();
    let (affect, id) = (facts.affect, mem.request_id.as_str());
    let mut applied = Vec::new();
    if !plan.reconciled.is_empty() {
        applied.push(format!(
            "reconciled: {} DIMM(s) ({}) of request {id} were already attached; {} to go",
            plan.reconciled.len(),
            plan.already(),
            plan.remaining
        ));
    }
    let (mut link, mut plan) = (link, plan);
    let waves = plan.waves.clone();
    let ended = |plan, applied, seen| MemoryEvidence { plan, applied, waves: waves.len(), seen };
    let mut at = 0;
    for (k, n) in waves.iter().copied().enumerate() {
        let last = k + 1 == waves.len();
        let wave = &plan.dimms[at..(at + n).min(plan.dimms.len())];
        if waves.len() > 1 {
            let size = Bytes(wave.iter().map(|d| d.spec.size.get()).sum());
            applied.push(format!("wave {} of {}: {size} in {n} DIMM(s)", k + 1, waves.len()));
            progress(&format!("attach-memory {name}: wave {} of {}: {size} in {n} DIMM(s)", k + 1, waves.len()));
        }
        let t = Instant::now();
        for d in wave {
            let (dom, xml) = (facts.loaded.dom.clone(), d.to_xml());
            tracing::debug!(%xml, "attaching");
            if let Err(e) = blocking(move || dom.attach_device(&xml, affect)).await {
                run.libvirt_ms += ms(t);
                return ended(plan, applied, MemorySeen::Libvirt(e));
            }
            applied.push(format!(
                "attach dimm {} on node {} as {} ({})",
                d.spec.size,
                d.spec.node,
                d.alias,
                affect_text(affect)
            ));
        }
        run.libvirt_ms += ms(t);
        at += n;
        if last {
            break;
        }
        // Between waves: the guest onlines what is plugged, then says how much
        // it has available; the next wave must fit 1:32 in that.
        if let Some(l) = link.as_deref_mut() {
            let aliases: Vec<String> = plan.dimms[at - n..at].iter().map(|d| d.alias.clone()).collect();
            match online_wave(facts, l, id, &aliases, opts, run).await {
                Ok((ranges, by_others)) => {
                    plan.settled.extend(ranges);
                    plan.settled_by_others += by_others;
                }
                Err(why) => {
                    return ended(plan, applied, MemorySeen::WaveStopped { done: k + 1, why: WaveEnd::NotOnline(why) })
                }
            }
            let next: u64 =
                plan.dimms[at..(at + waves[k + 1]).min(plan.dimms.len())].iter().map(|d| d.spec.size.get()).sum();
            let why = match l.pressure().await {
                Ok(p) if next <= p.mem_available.get().saturating_mul(32) => continue,
                Ok(p) => format!(
                    "the guest has {} available after it, and the next wave, {}, needs {} (1/32)",
                    p.mem_available,
                    Bytes(next),
                    Bytes(next.div_ceil(32))
                ),
                Err(e) => format!("the guest did not say how much memory it has available: {e}"),
            };
            return ended(plan, applied, MemorySeen::WaveStopped { done: k + 1, why: WaveEnd::NoRoom(why) });
        }
    }
    if !affect.live() {
        return ended(plan, applied, MemorySeen::Persistent);
    }
    let seen = confirm_memory(facts, link, &plan, mem, opts, &mut applied, run).await;
    ended(plan, applied, seen)
}

/// `attach-memory`'s judge (pure): how the steps ended, or [`judge_memory`]
/// over the request's DIMMs in the live XML and the guest's per-block answer.
fn judge_attach(facts: &Facts, id: &str, ev: MemoryEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
    let (name, affect) = (facts.loaded.facts.name.as_str(), facts.affect);
    let MemoryEvidence { plan, applied, waves, seen } = ev;
    let (after, confirmation) = match seen {
        MemorySeen::Libvirt(e) => {
            let mut r = libvirt_failed(AttachMemory::NAME, name, affect, applied, plan.findings, &e, run);
            r.message = format!("{}; repeat with --request-id {id} to attach only what is missing", r.message);
            return r;
        }
        MemorySeen::WaveStopped { done, why } => {
            let (outcome, why) = match why {
                WaveEnd::NotOnline(why) => (Outcome::GuestFailed, why),
                WaveEnd::NoRoom(why) => (Outcome::Partial, why),
            };
            return wave_stopped(outcome, name, affect, plan.findings, applied, (done, waves), why, id, run);
        }
        MemorySeen::Persistent => {
            let message = format!("{} added to the persistent definition (effective at the next start)", plan.size);
            return persistent_only(AttachMemory::NAME, name, affect, message, plan.findings, applied, run);
        }
        // libvirtd restarted or the connection dropped after the attach: the DIMMs
        // are there, the guest side is unknown; the repeat reconciles.
        MemorySeen::Unread(e) => {
            let mut r = libvirt_failed(AttachMemory::NAME, name, affect, applied, plan.findings, &e, run);
            r.message = format!(
                "{}; the DIMMs were attached but not verified: repeat with --request-id {id} to verify and finish",
                r.message
            );
            return r;
        }
        MemorySeen::Placed { after, confirmation } => (after, confirmation),
    };
    let new: Vec<_> = after.dimms.iter().filter(|d| request_index(d, id).is_some()).cloned().collect();
    let placed: Vec<String> =
        new.iter().map(|d| format!("{} node {} @{:#x}", d.size, d.node.unwrap_or(0), d.base.unwrap_or(0))).collect();
    let verified = Some(format!(
        "request {id}: {} DIMM(s), memory {}, {} slot(s) free; this request: {}",
        after.dimms.len(),
        after.memory,
        after.free_slots(),
        placed.join(", ")
    ));
    let ranges: Vec<MemRange> = new.iter().filter_map(crate::xml::Dimm::range).collect();
    let (outcome, mut message) = judge_memory(&plan, &new, &ranges, confirmation.as_ref(), opts.timeout);
    if waves > 1 && outcome == Outcome::Ok {
        message = format!("{message} (in {waves} waves, each at most 32× what the guest had available)");
    }
    let findings = plan.findings;
    let host = HostOnly { op: AttachMemory::NAME, name, affect, findings, applied, persistent: affect.config() };
    let mut report = host.report(outcome, message, run);
    report.host.verified = verified;
    report.guest = confirmation.and_then(Result::ok);
    report
}

/// A line of progress on stderr when it is a terminal (waves of a large plug).
fn progress(line: &str) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!("{line}");
    }
}

/// Onlines every block of the request's DIMMs attached so far (a wave's end);
/// returns the ranges of this wave's DIMMs (`aliases`) and how many of their
/// blocks the kernel or a rule had onlined before the agent.
async fn online_wave<A: GuestAgent>(
    facts: &Facts,
    link: &mut A,
    id: &str,
    aliases: &[String],
    opts: &HotplugOpts,
    run: &mut Run,
) -> Result<(Vec<MemRange>, usize), String> {
    let dom = facts.loaded.dom.clone();
    let live = blocking(move || dom.xml(XmlView::Live))
        .await
        .map_err(|e| e.to_string())
        .and_then(|x| DomainFacts::parse(&x).map_err(|e| format!("live XML: {e}")))?;
    let ranges: Vec<MemRange> =
        live.dimms.iter().filter(|d| request_index(d, id).is_some()).filter_map(crate::xml::Dimm::range).collect();
    let wave: Vec<MemRange> = live
        .dimms
        .iter()
        .filter(|d| d.alias.as_ref().is_some_and(|a| aliases.contains(a)))
        .filter_map(crate::xml::Dimm::range)
        .collect();
    let t = Instant::now();
    let timeout_ms = opts.timeout.as_millis() as u64;
    let req = OnlineRequest { cpus: None, memory: ranges, zone: opts.zone, timeout_ms, virtio_mem: vec![] };
    let r = link.online(req).await;
    run.guest_ms += ms(t);
    match r {
        Ok((r, _)) if r.complete && !r.timed_out => {
            let inside = |start: u64| wave.iter().any(|rg| start >= rg.start && start < rg.end());
            let already = vmplug_common::protocol::ItemOutcome::Already;
            Ok((wave.clone(), r.blocks.iter().filter(|b| inside(b.start) && b.outcome == already).count()))
        }
        Ok((r, _)) => Err(format!(
            "the guest onlined only {} of {} block(s)",
            r.blocks.iter().filter(|b| b.outcome.is_success()).count(),
            r.blocks.len()
        )),
        Err(e) => Err(format!("the guest did not online it: {e}")),
    }
}

/// The report of a staged plug that stopped after `done` of `total` waves:
/// what is attached stays (and is online), the repeat finishes it.
#[allow(clippy::too_many_arguments)]
fn wave_stopped(
    outcome: Outcome,
    name: &str,
    affect: Affect,
    findings: Vec<Finding>,
    applied: Vec<String>,
    (done, total): (usize, usize),
    why: String,
    id: &str,
    run: &Run,
) -> OpReport {
    let host = HostOnly { op: AttachMemory::NAME, name, affect, findings, applied, persistent: affect.config() };
    host.report(
        outcome,
        format!("stopped after wave {done} of {total}: {why}; what was attached stays; repeat with --request-id {id} to attach the rest"),
        run,
    )
}

/// The guest side of `attach-memory`: the request's DIMMs as QEMU placed them
/// (the live XML), and the guest onlining exactly their blocks.
async fn confirm_memory<A: GuestAgent>(
    facts: &Facts,
    link: Option<&mut A>,
    plan: &MemoryPlan,
    mem: &MemoryOpts,
    opts: &HotplugOpts,
    applied: &mut Vec<String>,
    run: &mut Run,
) -> MemorySeen {
    let id = mem.request_id.as_str();
    let dom = facts.loaded.dom.clone();
    let after = match blocking(move || dom.xml(XmlView::Live))
        .await
        .and_then(|x| DomainFacts::parse(&x).map_err(|e| DomainError::Other(format!("live XML: {e}"))))
    {
        Ok(f) => f,
        Err(e) => return MemorySeen::Unread(e),
    };
    let ranges: Vec<MemRange> =
        after.dimms.iter().filter(|d| request_index(d, id).is_some()).filter_map(crate::xml::Dimm::range).collect();
    let mut confirmation = None;
    if let (true, Some(link)) = (plan.confirm, link) {
        let t = Instant::now();
        let timeout_ms = opts.timeout.as_millis() as u64;
        let req = OnlineRequest { cpus: None, memory: ranges, zone: opts.zone, timeout_ms, virtio_mem: vec![] };
        let r = link.online(req).await;
        run.guest_ms = ms(t);
        run.milestones = link.milestones();
        confirmation = Some(r.map(|(r, reconnects)| {
            if reconnects > 0 {
                applied.push(format!("guest agent link re-established {reconnects} time(s) during the wait"));
            }
            r
        }));
    }
    MemorySeen::Placed { after: Box::new(after), confirmation }
}

/// The blocks of `ranges` outside an explicit zone (`movable`, `kernel`): the
/// kernel or a rule onlined them there first and the agent could not move them.
fn wrong_zone(zone: ZonePolicy, ranges: &[MemRange], r: &vmplug_common::protocol::Report) -> Option<String> {
    let want = match zone {
        ZonePolicy::Movable => "Movable",
        ZonePolicy::Kernel => "a kernel zone",
        ZonePolicy::Auto | ZonePolicy::Online => return None,
    };
    let inside = |start: u64| ranges.iter().any(|rg| start >= rg.start && start < rg.end());
    let off: Vec<String> = r
        .blocks
        .iter()
        .filter(|b| inside(b.start) && b.outcome.is_success())
        .filter(|b| (zone == ZonePolicy::Movable) != (b.zone.as_deref() == Some("Movable")))
        .map(|b| format!("memory{} ({})", b.index, b.zone.as_deref().unwrap_or("?")))
        .collect();
    (!off.is_empty()).then(|| format!(
        "{} online but not in {want}, as asked: the kernel or a udev rule onlined them first and they could not be emptied to move (boot the guest with memhp_default_state=online_movable or memory_hotplug.online_policy=auto-movable, or remove the onlining rule)",
        off.join(", ")
    ))
}

/// ", N by the kernel or a rule before the agent" when some blocks of `ranges`
/// were already online when the agent came to them. Blocks of `plan.settled`
/// (an earlier run's DIMMs, earlier waves) were online before this request's
/// last step for a known reason: not counted here; what earlier waves found
/// onlined by others (`plan.settled_by_others`) is.
fn onlined_by_others(plan: &MemoryPlan, ranges: &[MemRange], r: &vmplug_common::protocol::Report) -> String {
    let inside = |rs: &[MemRange], start: u64| rs.iter().any(|rg| start >= rg.start && start < rg.end());
    let n = r
        .blocks
        .iter()
        .filter(|b| inside(ranges, b.start) && !inside(&plan.settled, b.start))
        .filter(|b| b.outcome == vmplug_common::protocol::ItemOutcome::Already)
        .count()
        + plan.settled_by_others;
    if n == 0 {
        String::new()
    } else {
        format!(", {n} of them onlined by the kernel or a udev rule before the agent")
    }
}

/// Which of the guest's blocks landed on another node than their DIMM.
fn wrong_nodes(new: &[crate::xml::Dimm], r: &vmplug_common::protocol::Report) -> Vec<String> {
    let node = |n: Option<u32>| n.map_or("?".to_string(), |n| n.to_string());
    r.blocks
        .iter()
        .filter_map(|b| {
            let dimm = new.iter().find(|d| d.range().is_some_and(|rg| b.start >= rg.start && b.start < rg.end()))?;
            (b.node.is_some() && b.node != dimm.node)
                .then(|| format!("memory{} on node {}, its DIMM on node {}", b.index, node(b.node), node(dimm.node)))
        })
        .collect()
}

/// The verdict of `attach-memory` from its evidence: the request's DIMMs in the
/// live XML (`new`, their `ranges`) and, when the plan asked for it, the guest's
/// per-block report. Only distinct blocks inside the ranges count, against the
/// host's own count; each block must be on its DIMM's node.
pub fn judge_memory(
    plan: &MemoryPlan,
    new: &[crate::xml::Dimm],
    ranges: &[MemRange],
    confirmation: Option<&Result<vmplug_common::protocol::Report, LinkError>>,
    timeout: Duration,
) -> (Outcome, String) {
    let size = plan.size;
    let r = match confirmation {
        None if plan.dimms.is_empty() => {
            let m = format!("{size} was already attached by an earlier run of this request; guest not verified");
            return (Outcome::Ok, m);
        }
        None => {
            return (Outcome::Ok, format!("{size} attached in libvirt; guest not verified (--no-wait or no agent)"))
        }
        Some(Err(e)) => {
            return (Outcome::GuestFailed, format!("libvirt attached {size}; the guest refused to online it: {e}"))
        }
        Some(Ok(r)) => r,
    };
    let (confirmed, expected) = confirmed_blocks(ranges, plan.block, r);
    let missing = r.blocks.iter().filter(|b| b.outcome == vmplug_common::protocol::ItemOutcome::NotFound).count();
    let wrong_node = wrong_nodes(new, r);
    if r.timed_out {
        let m = format!(
            "libvirt attached {size} but {missing} of {} block(s) never appeared in the guest within {timeout:?} (the guest kernel rejected or did not see the DIMM)",
            r.blocks.len()
        );
        (Outcome::GuestTimeout, m)
    } else if !r.complete {
        (Outcome::GuestFailed, format!("the guest failed to online {} block(s)", r.failures()))
    } else if expected == 0 || confirmed != expected {
        let m =
            format!("libvirt attached {size} ({expected} block(s)) but the guest confirmed {confirmed} of them online");
        (Outcome::GuestFailed, m)
    } else if !wrong_node.is_empty() {
        (Outcome::GuestFailed, format!("blocks landed on the wrong guest node: {}", wrong_node.join("; ")))
    } else if let Some(m) = wrong_zone(plan.zone, ranges, r) {
        (Outcome::GuestFailed, m)
    } else {
        (
            Outcome::Ok,
            format!(
                "{size} attached; libvirt and the guest agree ({confirmed} block(s) online{})",
                onlined_by_others(plan, ranges, r)
            ),
        )
    }
}

/// How many blocks of the plugged `ranges` the guest confirmed online, and how
/// many there are. Counted by the host: only distinct, block-aligned starts
/// inside the ranges count, whatever else the guest's report lists, and the
/// expected count comes from the ranges (libvirt's live XML) and the block
/// size. No block size (the guest reports no memory hot-plug): nothing is
/// expected to be confirmable, and `(0, 0)` is never a success.
pub fn confirmed_blocks(
    ranges: &[MemRange],
    block: Option<u64>,
    report: &vmplug_common::protocol::Report,
) -> (u64, u64) {
    let Some(bs) = block.filter(|&b| b > 0) else { return (0, 0) };
    let expected = ranges.iter().map(|r| r.size.get() / bs).fold(0u64, u64::saturating_add);
    let inside = |start: u64| start.is_multiple_of(bs) && ranges.iter().any(|r| start >= r.start && start < r.end());
    let confirmed: std::collections::BTreeSet<u64> =
        report.blocks.iter().filter(|b| b.outcome.is_success() && inside(b.start)).map(|b| b.start).collect();
    (confirmed.len() as u64, expected)
}

/// What `vmplug prepare` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrepareReport {
    pub domain: String,
    pub running: bool,
    pub defined: bool,
    pub diff: String,
    pub notes: Vec<String>,
    /// The readiness rules over the prepared definition.
    pub findings: Vec<Finding>,
    pub refused: Option<String>,
}

impl PrepareReport {
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let findings: String = self
            .findings
            .iter()
            .map(|f| {
                let sev = if f.severity == Severity::Error { "error" } else { "warning" };
                format!("  {sev} [{}] {}\n", f.id, f.message)
            })
            .collect();
        if let Some(why) = &self.refused {
            return format!("prepare {}: REFUSED — {why}\n{findings}", self.domain);
        }
        s.push_str(&self.diff);
        for n in &self.notes {
            s.push_str(&format!("# {n}\n"));
        }
        let warned =
            if self.findings.is_empty() { String::new() } else { format!(", with {} warning(s)", self.findings.len()) };
        s.push_str(&match (self.defined, self.diff.is_empty()) {
            (_, true) => format!("prepare {}: already hot-plug-ready{warned}; nothing to change\n", self.domain),
            (false, false) => format!("prepare {}: dry run; nothing defined\n", self.domain),
            (true, false) if self.running => format!(
                "prepare {}: definition updated{warned}; takes effect at the next start (the running domain is unchanged)\n",
                self.domain
            ),
            (true, false) => format!("prepare {}: definition updated{warned}; takes effect at the next start\n", self.domain),
        });
        s.push_str(&findings);
        s
    }
}

/// The rules a prepared definition must pass to be called hot-plug-ready: the
/// domain-wide preflight rules, the guide's 4 GiB for Linux guests, usable slots,
/// and room for at least one more vCPU (warned: memory-only domains exist).
pub fn readiness_of(xml: &str, host: &HostFacts) -> Result<Vec<Finding>, DomainError> {
    let facts = DomainFacts::parse(xml).map_err(|e| DomainError::Other(format!("prepared XML: {e}")))?;
    let ctx = Ctx {
        dom: &facts,
        host,
        guest: None,
        agent_trouble: None,
        running: false,
        state: crate::domain::DomainState::ShutOff,
        job_running: false,
        affect: Affect::Config,
        no_wait: true,
    };
    let mut findings = crate::preflight::check(&ctx, &crate::preflight::Operation::Readiness);
    let probe = crate::preflight::Operation::Memory {
        size: Bytes(vmplug_common::MIB),
        node: None,
        dimms: 1,
        first_wave: Bytes(vmplug_common::MIB),
        plan: Default::default(),
    };
    findings.extend(crate::preflight::check(&ctx, &probe).into_iter().filter(|f| f.id == RuleId::MemLinux4g.id()));
    findings.extend(crate::preflight::check(&ctx, &crate::preflight::Operation::Prepared));
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    findings.dedup();
    Ok(findings)
}

/// `vmplug prepare`: edits the persistent definition (never the live one), and
/// only into one the readiness rules accept.
pub async fn prepare(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &crate::prepare::PrepareOpts,
    dry_run: bool,
) -> Result<PrepareReport, DomainError> {
    let l = load(conn.clone(), name, false).await?;
    let dom = l.dom.clone();
    let old = blocking(move || dom.xml(XmlView::Inactive)).await?;
    let mut report = PrepareReport {
        domain: name.into(),
        running: l.running,
        defined: false,
        diff: String::new(),
        notes: vec![],
        findings: vec![],
        refused: None,
    };
    let p = match crate::prepare::prepare(&old, &l.host, opts) {
        Err(e) => {
            report.findings = e.findings();
            report.refused = Some(format!("{e}; nothing was defined"));
            return Ok(report);
        }
        Ok(p) => p,
    };
    report.diff = if p.xml == old { String::new() } else { crate::prepare::diff(&old, &p.xml) };
    report.notes = p.notes;
    report.findings = readiness_of(&p.xml, &l.host)?;
    let errors: Vec<&str> = report.findings.iter().filter(|f| f.severity == Severity::Error).map(|f| f.id).collect();
    if !errors.is_empty() {
        report.refused = Some(format!(
            "the prepared definition would still not be hot-plug-ready ({}); nothing was defined",
            errors.join(", ")
        ));
        return Ok(report);
    }
    if !dry_run && p.xml != old {
        let c = conn.clone();
        blocking(move || c.define(&p.xml)).await?;
        report.defined = true;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmplug_common::protocol::{BlockResult, ItemOutcome as BlockOutcome, Report};
    use vmplug_common::MIB;

    fn report(blocks: &[(u64, BlockOutcome)]) -> Report {
        Report {
            cpus: vec![],
            blocks: blocks
                .iter()
                .map(|(start, o)| BlockResult {
                    index: start / (128 * MIB),
                    start: *start,
                    node: None,
                    zone: None,
                    outcome: o.clone(),
                })
                .collect(),
            cpus_online: Default::default(),
            memory_online: Default::default(),
            complete: true,
            timed_out: false,
            duration_ms: 0,
            queues: vec![],
        }
    }

    /// Security finding 1: success was summed over every block the guest listed,
    /// with the guest's block size: a block outside the new DIMM counted.
    #[test]
    fn only_blocks_inside_the_plugged_ranges_count_once() {
        let bs = 128 * MIB;
        let dimm = [MemRange { start: 4096 * MIB, size: Bytes(256 * MIB) }];
        let done = BlockOutcome::Done;
        let exact = report(&[(4096 * MIB, done.clone()), (4224 * MIB, done.clone())]);
        assert_eq!(confirmed_blocks(&dimm, Some(bs), &exact), (2, 2));
        let outside = report(&[(4096 * MIB, done.clone()), (0, done.clone())]);
        assert_eq!(confirmed_blocks(&dimm, Some(bs), &outside), (1, 2), "a block outside the DIMM does not count");
        let twice = report(&[(4096 * MIB, done.clone()), (4096 * MIB, BlockOutcome::Already)]);
        assert_eq!(confirmed_blocks(&dimm, Some(bs), &twice), (1, 2), "a block listed twice counts once");
        let unaligned = report(&[(4096 * MIB, done.clone()), (4096 * MIB + 1, done.clone())]);
        assert_eq!(confirmed_blocks(&dimm, Some(bs), &unaligned), (1, 2));
        let failed = report(&[(4096 * MIB, done.clone()), (4224 * MIB, BlockOutcome::NotFound)]);
        assert_eq!(confirmed_blocks(&dimm, Some(bs), &failed), (1, 2));
        assert_eq!(confirmed_blocks(&dimm, None, &exact), (0, 0), "no block size: nothing confirmable");
    }
}
