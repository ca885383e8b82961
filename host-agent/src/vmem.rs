//! virtio-mem: the second memory model beside DIMMs. One device per guest node
//! holds a region; `<requested>` says how much of it the guest should have, the
//! guest's driver plugs or unplugs blocks until `<current>` matches.
//!
//! ```text
//! plan_resize():  Facts + request → per-device requested sizes | NotPlanned  (pure)
//! resize:         register the regions with the agent, update <requested>,
//!                 poll <current> (QEMU throttles its size event to 1/s), keep
//!                 the guest onlining while it grows               → evidence
//! judge_resize(): plan + final devices + the guest's blocks → outcome (pure)
//! ```
//!
//! A shrink the guest cannot complete is not left retrying: `<requested>` is set
//! back to what the device still holds, and the report says how much that is.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vmplug_common::protocol::{BlockState, DeviceKind, ForecastRequest, MemRange, OnlineRequest, ZonePolicy};
use vmplug_common::Bytes;

use crate::domain::{Affect, DomainError, XmlView};
use crate::facts::Facts;
use crate::facts::{blocking, HotplugOpts};
use crate::link::GuestAgent;
use crate::preflight::{self, Finding, FloorBreach, Operation, ResizePlanning};
use crate::preflight::{NotPlanned, Refusal};
use crate::report::{affect_text, libvirt_failed, ms, persistent_only, HostOnly, Run};
use crate::report::{OpReport, Outcome};
use crate::verb::{HotplugArgs, Verb, VerbArgs};
use crate::wait::Wait;

pub use crate::report::DeviceOutcome;
use crate::xml::{virtio_mem_update_xml, DomainFacts, VirtioMem};

/// How often the live XML is read while the guest's driver plugs or unplugs.
const POLL: Duration = Duration::from_millis(50);
/// How often the guest's blocks are read while they can prove a growth: one
/// small request to the agent, answered from sysfs.
const PROOF_POLL: Duration = Duration::from_millis(20);
/// While growing, the agent is asked to online what is present at most this often
/// (the driver adds at most about 1 GiB offline before it waits for onlining).
const ONLINE_EVERY: Duration = Duration::from_secs(1);
/// One online round's bound: it only onlines what is present, it waits for nothing.
const ONLINE_ROUND: Duration = Duration::from_secs(5);

/// `resize-memory`'s size: a total, or a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChange {
    /// The guest's memory (on the node, with `--node`) becomes this.
    To(Bytes),
    Grow(Bytes),
    Shrink(Bytes),
}

impl std::str::FromStr for SizeChange {
    type Err = String;
    /// `4G` (a total), `+1G`, `-512M`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s.as_bytes().first() {
            Some(b'+') => vmplug_common::size::parse_size(&s[1..]).map(SizeChange::Grow),
            Some(b'-') => vmplug_common::size::parse_size(&s[1..]).map(SizeChange::Shrink),
            _ => vmplug_common::size::parse_size(s).map(SizeChange::To),
        }
    }
}

impl std::fmt::Display for SizeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeChange::To(b) => write!(f, "{b}"),
            SizeChange::Grow(b) => write!(f, "+{b}"),
            SizeChange::Shrink(b) => write!(f, "-{b}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeOpts {
    pub change: SizeChange,
    pub node: Option<u32>,
    /// A shrink that makes no progress for this long is over: the guest cannot
    /// release more (its driver retries with growing pauses, never giving up).
    pub settle: Duration,
}

/// One device's change.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStep {
    pub device: VirtioMem,
    /// What it holds now.
    pub from: Bytes,
    /// Its new `<requested>`.
    pub to: Bytes,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResizePlan {
    pub findings: Vec<Finding>,
    /// Devices whose requested size changes, in device order.
    pub steps: Vec<DeviceStep>,
    /// The guest's memory in scope (the node, or the domain) before and after.
    pub before: Bytes,
    pub after: Bytes,
    /// A live change with an agent and no `--no-wait`: the guest must confirm.
    pub confirm: bool,
    pub zone: ZonePolicy,
    /// "the guest" or "guest node N": what `before` and `after` measure.
    pub scope: String,
}

impl ResizePlan {
    pub fn grows(&self) -> bool {
        self.after > self.before
    }

    /// The regions of every device that changes (the live XML gives them).
    pub fn ranges(&self) -> Vec<MemRange> {
        self.steps.iter().filter_map(|s| s.device.range()).collect()
    }
}

/// Spreads `total` over `devices` in `unit` steps, moving each device only in the
/// direction of the change: a grow fills the emptiest device first, a shrink
/// drains the fullest. `None` when the devices cannot hold `total`.
pub fn distribute(devices: &[VirtioMem], total: Bytes, unit: u64) -> Option<Vec<Bytes>> {
    let mut to: Vec<u64> = devices.iter().map(|d| d.plugged().get()).collect();
    let now: u64 = to.iter().sum();
    if unit == 0 || total.get() > devices.iter().map(|d| d.size.get()).sum() {
        return None;
    }
    if total.get() >= now {
        let mut left = (total.get() - now) / unit;
        while left > 0 {
            let i = (0..to.len()).filter(|&i| to[i] + unit <= devices[i].size.get()).min_by_key(|&i| (to[i], i))?;
            to[i] += unit;
            left -= 1;
        }
    } else {
        let mut left = (now - total.get()).div_ceil(unit);
        while left > 0 {
            let i = (0..to.len()).filter(|&i| to[i] >= unit).max_by_key(|&i| (to[i], std::cmp::Reverse(i)))?;
            to[i] -= unit;
            left -= 1;
        }
    }
    Some(to.into_iter().map(Bytes).collect())
}

/// The guest memory in scope now, and the part of it no virtio-mem device in
/// scope can change (boot memory, DIMMs, other nodes' devices).
fn scope_memory(dom: &DomainFacts, node: Option<u32>, scope: &[VirtioMem]) -> (Bytes, Bytes) {
    let plugged: u64 = scope.iter().map(|d| d.plugged().get()).sum();
    let now = match node {
        None => dom.guest_memory().get(),
        Some(n) => {
            let cell = dom.cells.iter().find(|c| c.id == n).map_or(0, |c| c.memory.get());
            let dimms: u64 = dom.dimms.iter().filter(|d| d.node == Some(n)).map(|d| d.size.get()).sum();
            cell + dimms + plugged
        }
    };
    (Bytes(now), Bytes(now.saturating_sub(plugged)))
}

pub fn plan_resize(f: &Facts, r: &ResizeOpts, opts: &HotplugOpts) -> Result<ResizePlan, NotPlanned> {
    let dom = &f.loaded.facts;
    let scope: Vec<VirtioMem> =
        dom.virtio_mems.iter().filter(|d| r.node.is_none() || d.node == r.node).cloned().collect();
    let (before, fixed) = scope_memory(dom, r.node, &scope);
    let plugged = Bytes(before.get() - fixed.get());
    let capacity = Bytes(scope.iter().map(|d| d.size.get()).sum());
    let unit = scope.iter().map(|d| d.block.get()).max().unwrap_or(0).max(1);
    let what = r.node.map_or("the guest".to_string(), |n| format!("guest node {n}"));
    // A request below the floor is planned as no change; the rule refuses it.
    let (target, floor) = match r.change {
        SizeChange::To(t) if t < fixed => (plugged, Some(FloorBreach::BelowFixed)),
        SizeChange::To(t) => (Bytes(t.get() - fixed.get()), None),
        SizeChange::Grow(d) => (Bytes(plugged.get().saturating_add(d.get())), None),
        SizeChange::Shrink(d) if d > plugged => (plugged, Some(FloorBreach::GiveBack(d))),
        SizeChange::Shrink(d) => (Bytes(plugged.get() - d.get()), None),
    };
    // Nothing to grow without a device (the rules of a grow would only add noise).
    let grow = if scope.is_empty() { Bytes(0) } else { Bytes(target.get().saturating_sub(plugged.get())) };
    let planning = ResizePlanning {
        scope: what.clone(),
        devices: scope.len(),
        before,
        fixed,
        plugged,
        capacity,
        unit: Bytes(unit),
        target,
        floor,
    };
    let mut findings =
        preflight::check(&f.ctx_for(opts.no_wait), &Operation::Resize { grow, node: r.node, plan: Some(planning) });
    if scope.is_empty() {
        return Err(NotPlanned::Refused(refusal(findings, vec![])));
    }
    let confirm = f.affect.live() && f.guest.is_some() && !opts.no_wait;
    if f.affect.live() && target < plugged {
        findings.extend(forecast_finding(f, &scope, Bytes(plugged.get() - target.get()), &what));
    }
    let findings = crate::preflight::gate(findings, opts.force, vec![])?;
    let sizes = distribute(&scope, target, unit).unwrap_or_else(|| scope.iter().map(|d| d.plugged()).collect());
    let steps = scope
        .into_iter()
        .zip(sizes)
        .filter(|(d, to)| *to != d.plugged() || *to != d.requested)
        .map(|(d, to)| DeviceStep { from: d.plugged(), to, device: d })
        .collect();
    Ok(ResizePlan {
        findings,
        steps,
        before,
        after: Bytes(fixed.get() + target.get()),
        confirm,
        zone: opts.zone,
        scope: what,
    })
}

/// What the guest's forecast says `scope`'s devices could release now (each
/// bounded by what it holds); `None` without a forecast covering all of them.
pub fn releasable(f: &Facts, scope: &[VirtioMem]) -> Option<Bytes> {
    let fc = f.forecast.as_ref()?;
    let mut total = 0u64;
    for d in scope {
        let range = d.range()?;
        let dev = fc.devices.iter().find(|x| x.kind == DeviceKind::VirtioMem && x.start == range.start)?;
        total += dev.releasable.get().min(d.plugged().get());
    }
    Some(Bytes(total))
}

/// A shrink larger than the guest's forecast: refused (`--force` tries anyway).
fn forecast_finding(f: &Facts, scope: &[VirtioMem], shrink: Bytes, what: &str) -> Option<Finding> {
    let can = releasable(f, scope)?;
    (shrink > can).then(|| {
        let held: Vec<String> = f
            .forecast
            .iter()
            .flat_map(|fc| fc.devices.iter())
            .filter(|d| d.kind == DeviceKind::VirtioMem)
            .filter_map(|d| d.held.clone())
            .collect();
        preflight::forecast_refusal(what, can, shrink, &held)
    })
}

fn refusal(findings: Vec<Finding>, hard: Vec<Finding>) -> Refusal {
    match crate::preflight::gate(findings, false, hard) {
        Err(NotPlanned::Refused(r)) => r,
        _ => Refusal { findings: vec![], agent_unreachable: false },
    }
}

/// How the wait for the devices ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Every device's `<current>` reached its `<requested>`.
    Reached,
    /// The guest's blocks prove every device holds what it was asked (see
    /// [`guest_proves_growth`]); libvirt's `<current>`, read then, may lag:
    /// QEMU reports a device's size to libvirt at most once a second.
    GuestReached,
    /// The deadline passed first.
    TimedOut,
    /// A shrink stopped making progress: the guest cannot release more.
    Stalled,
}

/// The evidence the wait leaves: each changed device as the live XML shows it at
/// the end, and (when the plan confirms) the guest's present blocks.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub devices: Vec<VirtioMem>,
    pub blocks: Option<Result<Vec<BlockState>, String>>,
    pub reset: Vec<usize>,
    /// Blocks of the regions present before a growth: their zone was chosen
    /// by an earlier request (a first stage in the kernel's zone, say), so
    /// this one's zone is checked on the blocks it added.
    pub earlier: Vec<u64>,
}

fn zone_ok(policy: ZonePolicy, zone: Option<&str>) -> bool {
    match policy {
        ZonePolicy::Movable => zone == Some("Movable"),
        ZonePolicy::Kernel => zone.is_some_and(|z| z != "Movable"),
        ZonePolicy::Auto | ZonePolicy::Online => zone.is_some(),
    }
}

/// What is wrong with a device's blocks in the guest: offline ones, too few for
/// what the device holds, blocks on another node, and (for a growth, `zone`)
/// blocks outside the asked zone.
fn block_problems(
    d: &VirtioMem,
    mine: &[&BlockState],
    bs: u64,
    zone: Option<ZonePolicy>,
    earlier: &[u64],
) -> Vec<String> {
    let mut problems = Vec::new();
    let current = d.plugged();
    let offline: Vec<String> = mine.iter().filter(|b| !b.online).map(|b| format!("memory{}", b.index)).collect();
    if !offline.is_empty() {
        problems.push(format!("{}: {} offline in the guest", d.label(), offline.join(", ")));
    }
    if (mine.len() as u64).saturating_mul(bs) < current.get() {
        problems.push(format!(
            "{}: the guest shows {} block(s) of {} for the {current} the device holds",
            d.label(),
            mine.len(),
            Bytes(bs)
        ));
    }
    let wrong_node: Vec<String> = mine
        .iter()
        .filter(|b| d.node.is_some() && b.node.is_some() && b.node != d.node)
        .map(|b| format!("memory{} on node {}", b.index, b.node.unwrap_or(0)))
        .collect();
    if !wrong_node.is_empty() {
        problems.push(format!("{} is on node {}, but {}", d.label(), d.node.unwrap_or(0), wrong_node.join(", ")));
    }
    let Some(zone) = zone else { return problems };
    let wrong_zone: Vec<String> = mine
        .iter()
        .filter(|b| b.online && !earlier.contains(&b.index) && !zone_ok(zone, b.zone.as_deref()))
        .map(|b| format!("memory{} ({})", b.index, b.zone.as_deref().unwrap_or("?")))
        .collect();
    if !wrong_zone.is_empty() {
        problems.push(format!(
            "{}: {} not in the {zone:?} zone the request asked (onlined by the kernel or a udev rule first? boot the guest with memhp_default_state=online_movable, or pass --zone online to accept the kernel's choice)",
            d.label(),
            wrong_zone.join(", ")
        ));
    }
    problems
}

/// The verdict of a resize from its evidence (pure). Each device must hold what
/// it was asked; with the guest's confirmation, each present block of its region
/// must be online, on the device's node and in the asked zone, and the blocks
/// must cover what the device holds.
pub fn judge_resize(
    plan: &ResizePlan,
    ev: &Evidence,
    settled: Settled,
    block_size: Option<u64>,
    timeout: Duration,
) -> (Outcome, String, Vec<DeviceOutcome>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for step in &plan.steps {
        let d = ev.devices.iter().find(|d| d.index == step.device.index).unwrap_or(&step.device);
        let current = d.plugged();
        let range = d.range();
        let mine: Vec<&BlockState> = match (&ev.blocks, range) {
            (Some(Ok(b)), Some(r)) => {
                b.iter().filter(|b| b.present && b.start >= r.start && b.start < r.end()).collect()
            }
            _ => vec![],
        };
        let mut zones = BTreeMap::new();
        for b in mine.iter().filter(|b| b.online) {
            *zones.entry(b.zone.clone().unwrap_or_else(|| "?".into())).or_insert(0u32) += 1;
        }
        let online = mine.iter().filter(|b| b.online).count() as u32;
        // The guest's blocks proved the size: a libvirt `<current>` short of it
        // is libvirt's view lagging, not the device.
        let current_lags = settled == Settled::GuestReached && current != step.to;
        if current != step.to && !current_lags {
            problems.push(format!("{} holds {current} of the {} asked", d.label(), step.to));
        }
        if current_lags && d.requested != step.to {
            problems.push(format!("{}: libvirt's requested is {}, not the {} asked", d.label(), d.requested, step.to));
        }
        if let (Some(Ok(_)), Some(bs)) = (&ev.blocks, block_size) {
            problems.extend(block_problems(d, &mine, bs, plan.grows().then_some(plan.zone), &ev.earlier));
        }
        out.push(DeviceOutcome {
            device: d.label(),
            node: d.node,
            size: d.size,
            before: step.from,
            requested: if ev.reset.contains(&d.index) { current } else { step.to },
            current,
            current_lags,
            requested_reset: ev.reset.contains(&d.index),
            blocks: mine.len() as u32,
            blocks_online: online,
            zones,
        });
    }
    // What each device holds: libvirt's `<current>`, or what the guest proved.
    let held: u64 =
        out.iter().zip(&plan.steps).map(|(d, s)| if d.current_lags { s.to.get() } else { d.current.get() }).sum();
    let lagging: Vec<String> =
        out.iter().filter(|d| d.current_lags).map(|d| format!("{} current {}", d.device, d.current)).collect();
    let asked: u64 = plan.steps.iter().map(|s| s.to.get()).sum();
    let from: u64 = plan.steps.iter().map(|s| s.from.get()).sum();
    let moved = Bytes(held.abs_diff(from));
    let wanted = Bytes(asked.abs_diff(from));
    let verb = if plan.grows() { "grew" } else { "shrank" };
    let (outcome, message) = match (&ev.blocks, settled) {
        (Some(Err(e)), _) => (Outcome::GuestFailed, format!("the devices {verb} by {moved} of {wanted}; the guest agent did not report its blocks: {e}")),
        (_, Settled::TimedOut) if plan.grows() => (
            Outcome::GuestTimeout,
            format!("the guest plugged {moved} of {wanted} within {timeout:?}: {} (requested stays: the guest's driver may still plug the rest)", problems.join("; ")),
        ),
        (_, Settled::TimedOut | Settled::Stalled) => {
            let reset = if ev.reset.is_empty() { String::new() } else { "; requested set back to what the devices hold, so they stop retrying".into() };
            (
                Outcome::GuestFailed,
                format!("the guest released {moved} of {wanted}: {}{reset} (the guest could not move the data out: memory in use with nowhere to go, in a kernel zone, or pinned)", problems.join("; ")),
            )
        }
        _ if !problems.is_empty() => (Outcome::GuestFailed, problems.join("; ")),
        (None, _) => (
            Outcome::Ok,
            format!("{} {verb} by {moved} to {}; guest not verified (--no-wait or no agent)", plan.scope, plan.after),
        ),
        (Some(Ok(_)), _) if !lagging.is_empty() => {
            let blocks: u32 = out.iter().map(|d| d.blocks_online).sum();
            (
                Outcome::Ok,
                format!(
                    "{} {verb} by {moved} to {}; the guest shows it ({blocks} block(s) of the devices added and online); libvirt's view had not caught up yet ({}: QEMU reports a device's size at most once a second)",
                    plan.scope,
                    plan.after,
                    lagging.join(", ")
                ),
            )
        }
        (Some(Ok(_)), _) => {
            let blocks: u32 = out.iter().map(|d| d.blocks_online).sum();
            (
                Outcome::Ok,
                format!(
                    "{} {verb} by {moved} to {}; libvirt and the guest agree ({blocks} block(s) of the devices present, all online)",
                    plan.scope, plan.after
                ),
            )
        }
    };
    (outcome, message, out)
}

/// `vmplug resize-memory`: change `<requested>`, wait for `<current>` with the
/// guest onlining, [`judge_resize`].
#[derive(Debug, Clone, Copy)]
pub struct ResizeMemory {
    pub r: ResizeOpts,
}

/// Grow or shrink guest memory through virtio-mem (virsh update-memory-device
/// --requested-size); waits until the devices hold it and the guest has every
/// plugged block online, or has released it.
#[derive(clap::Args, Debug, Clone)]
pub struct ResizeMemoryArgs {
    /// Domain name, ID or UUID (as virsh takes them).
    pub domain: String,
    /// The guest's memory as a total (4G; on the node with --node), or a
    /// change (+1G, -512M). Boot memory and DIMMs stay; virtio-mem moves.
    #[arg(allow_hyphen_values = true)]
    pub size: SizeChange,
    /// Only the virtio-mem device(s) on this guest node (default: every
    /// device, balanced).
    #[arg(long)]
    pub node: Option<u32>,
    /// Seconds a shrink may make no progress before it is over (the guest
    /// cannot release more; requested is then set back to what it holds).
    #[arg(long, default_value_t = 10)]
    pub settle: u64,
    #[command(flatten)]
    pub hotplug: HotplugArgs,
}

impl VerbArgs for ResizeMemoryArgs {
    type Verb = ResizeMemory;

    crate::domain_field!();

    fn verb(&self) -> Result<ResizeMemory, DomainError> {
        let settle = Duration::from_secs(self.settle.clamp(1, 3600));
        Ok(ResizeMemory { r: ResizeOpts { change: self.size, node: self.node, settle } })
    }

    /// virtio-mem's blocks go to ZONE_MOVABLE unless told otherwise, so that
    /// the memory can shrink again.
    fn opts(&self) -> Result<HotplugOpts, DomainError> {
        self.hotplug.opts_with_zone(ZonePolicy::Movable)
    }
}

impl Verb for ResizeMemory {
    const NAME: &'static str = "resize-memory";
    type Plan = ResizePlan;
    type Evidence = ResizeEvidence;

    fn plan(&self, facts: &Facts, opts: &HotplugOpts) -> Result<ResizePlan, NotPlanned> {
        plan_resize(facts, &self.r, opts)
    }

    fn preview(&self, _: &Facts, p: ResizePlan) -> (Vec<Finding>, Vec<String>) {
        let steps = p
            .steps
            .iter()
            .map(|s| format!("update {} requested {} → {}", s.device.label(), s.device.requested, s.to))
            .collect();
        (p.findings, steps)
    }

    async fn execute<A: GuestAgent>(
        &self,
        facts: &Facts,
        link: Option<&mut A>,
        plan: ResizePlan,
        opts: &HotplugOpts,
        run: &mut Run,
    ) -> Result<ResizeEvidence, DomainError> {
        execute_resize(facts, link, plan, &self.r, opts, run).await
    }

    fn judge(&self, facts: &Facts, ev: ResizeEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
        judge_resize_run(facts, ev, opts, run)
    }
}

/// What a resize did and saw: its plan, the steps applied, how it ended.
#[derive(Debug)]
pub struct ResizeEvidence {
    pub plan: ResizePlan,
    pub applied: Vec<String>,
    pub seen: ResizeSeen,
}

/// How a resize ended.
#[derive(Debug)]
pub enum ResizeSeen {
    /// The guest refused the shrink (its floors): nothing changed.
    Vetoed(String),
    /// libvirt refused a device's update; `applied` lists those before it.
    Libvirt(DomainError),
    /// Only the persistent definition changed.
    Persistent,
    /// How the wait ended, and the devices and the guest's blocks at its end.
    Settled { settled: Settled, ev: Evidence },
}

/// `resize-memory`'s judge (pure): the guest's veto, libvirt's refusal, or
/// [`judge_resize`] over the devices and blocks the wait ended with.
fn judge_resize_run(facts: &Facts, ev: ResizeEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
    let (name, affect) = (facts.loaded.facts.name.as_str(), facts.affect);
    let ResizeEvidence { plan, applied, seen } = ev;
    let (settled, ev) = match seen {
        ResizeSeen::Vetoed(reason) => {
            let mut findings = plan.findings;
            findings.insert(0, preflight::guest_veto(&reason));
            let host = HostOnly { op: ResizeMemory::NAME, name, affect, findings, applied, persistent: false };
            let message = format!("the guest vetoes the shrink: {reason}; nothing was changed");
            return host.report(Outcome::Refused, message, run);
        }
        ResizeSeen::Libvirt(e) => {
            return libvirt_failed(ResizeMemory::NAME, name, affect, applied, plan.findings, &e, run);
        }
        ResizeSeen::Persistent => {
            let message =
                format!("requested sizes set in the persistent definition ({} at the next start)", plan.after);
            return persistent_only(ResizeMemory::NAME, name, affect, message, plan.findings, applied, run);
        }
        ResizeSeen::Settled { settled, ev } => (settled, ev),
    };
    let bs = facts.guest.as_ref().and_then(|g| g.memory.as_ref()).map(|m| m.block_size.get());
    let (outcome, message, devices) = judge_resize(&plan, &ev, settled, bs, opts.timeout);
    let verified = Some(
        devices
            .iter()
            .map(|d| format!("{}: requested {}, current {}", d.device, d.requested, d.current))
            .collect::<Vec<_>>()
            .join("; "),
    );
    let findings = plan.findings;
    let host = HostOnly { op: ResizeMemory::NAME, name, affect, findings, applied, persistent: affect.config() };
    let mut report = host.report(outcome, message, run);
    report.host.verified = verified;
    report.virtio_mem = devices;
    report
}

async fn execute_resize<A: GuestAgent>(
    facts: &Facts,
    mut link: Option<&mut A>,
    plan: ResizePlan,
    r: &ResizeOpts,
    opts: &HotplugOpts,
    run: &mut Run,
) -> Result<ResizeEvidence, DomainError> {
    let affect = facts.affect;
    let ranges = plan.ranges();
    let bs = facts.guest.as_ref().and_then(|g| g.memory.as_ref()).map(|m| m.block_size.get());
    let (mut proof, mut earlier) = (None, vec![]);
    if let (true, Some(agent)) = (plan.confirm && plan.grows(), link.as_deref_mut()) {
        // First the regions and their zone: blocks the device plugs from now on
        // are onlined there by the agent's own uevent path.
        let _ = agent.online(online_round(&ranges, plan.zone)).await;
        // What the regions hold now decides whether the guest's blocks can
        // prove the growth on their own.
        if let Ok(before) = agent.blocks(ranges.clone()).await {
            proof = bs.filter(|_| guest_proves_growth(&plan, bs, &before));
            earlier = before.iter().filter(|b| b.present).map(|b| b.index).collect();
        }
    }
    let mut applied = Vec::new();
    if let (true, Some(agent)) = (affect.live() && plan.after < plan.before, link.as_deref_mut()) {
        let release = Bytes(plan.before.get() - plan.after.get());
        let ask = ForecastRequest { dimms: vec![], virtio_mem: ranges.clone(), release: Some(release) };
        if let Some(reason) = crate::link::guest_veto(agent, ask).await {
            return Ok(ResizeEvidence { plan, applied, seen: ResizeSeen::Vetoed(reason) });
        }
    }
    let t = Instant::now();
    for step in &plan.steps {
        if let Err(e) = update_requested(facts, step.device.index, step.to, affect).await {
            run.libvirt_ms = ms(t);
            return Ok(ResizeEvidence { plan, applied, seen: ResizeSeen::Libvirt(e) });
        }
        applied.push(format!(
            "update {} requested {} → {} ({})",
            step.device.label(),
            step.device.requested,
            step.to,
            affect_text(affect)
        ));
    }
    run.libvirt_ms = ms(t);
    if !affect.live() {
        return Ok(ResizeEvidence { plan, applied, seen: ResizeSeen::Persistent });
    }
    let t = Instant::now();
    let (settled, mut ev) = wait_settled(facts, link.as_deref_mut(), &plan, r, opts, proof).await?;
    ev.earlier = earlier;
    if settled != Settled::Reached && !plan.grows() {
        reset_requested(facts, &plan, &mut ev, &mut applied).await;
    }
    if let (true, None, Some(agent)) = (plan.confirm, &ev.blocks, link) {
        let deadline = t + opts.timeout;
        ev.blocks = Some(final_blocks(agent, &plan, &ev.devices, bs, deadline).await);
    }
    run.guest_ms = ms(t);
    Ok(ResizeEvidence { plan, applied, seen: ResizeSeen::Settled { settled, ev } })
}

fn online_round(ranges: &[MemRange], zone: ZonePolicy) -> OnlineRequest {
    OnlineRequest {
        cpus: None,
        memory: vec![],
        zone,
        timeout_ms: ONLINE_ROUND.as_millis() as u64,
        virtio_mem: ranges.to_vec(),
    }
}

/// The guest's blocks of the changed regions at the end: onlined (growth), or
/// read (shrink: the driver offlines and removes what it unplugs). The device
/// reports memory plugged before the guest has added its blocks, and unplugged
/// before the guest has removed them, so this waits (until `deadline`) for a
/// settled view: no block half-way, and for a growth blocks that cover what
/// each device holds.
async fn final_blocks<A: GuestAgent>(
    agent: &mut A,
    plan: &ResizePlan,
    devices: &[VirtioMem],
    block_size: Option<u64>,
    deadline: Instant,
) -> Result<Vec<BlockState>, String> {
    let ranges = plan.ranges();
    let settle =
        Wait::new("the guest's blocks of the resized devices", deadline.saturating_duration_since(Instant::now()))
            .every(POLL);
    let mut waiting = settle.start();
    loop {
        if plan.grows() {
            agent.online(online_round(&ranges, plan.zone)).await.map_err(|e| e.to_string())?;
        }
        let blocks = agent.blocks(ranges.clone()).await.map_err(|e| e.to_string())?;
        let covered = |d: &VirtioMem| {
            let (Some(r), Some(bs)) = (d.range(), block_size) else { return true };
            let n = blocks.iter().filter(|b| b.present && b.online && b.start >= r.start && b.start < r.end()).count();
            (n as u64).saturating_mul(bs) >= d.plugged().get()
        };
        // A block present but offline is in passage: the driver offlines what it
        // unplugs, then removes it (a shrink), or the agent has yet to online it.
        let in_passage = blocks.iter().any(|b| b.present && !b.online);
        let covered = plan.steps.iter().all(|s| devices.iter().find(|d| d.index == s.device.index).is_none_or(covered));
        if (!in_passage && (covered || !plan.grows())) || waiting.pause().await.is_err() {
            return Ok(blocks);
        }
    }
}

/// Sets device `index`'s `<requested>` where `affect` says, from the XML of
/// each view (so libvirt matches the device by its alias and address).
async fn update_requested(facts: &Facts, index: usize, to: Bytes, affect: Affect) -> Result<(), DomainError> {
    let views: Vec<(XmlView, Affect)> = match affect {
        Affect::Both if facts.loaded.running => {
            vec![(XmlView::Live, Affect::Live), (XmlView::Inactive, Affect::Config)]
        }
        Affect::Config | Affect::Both => vec![(XmlView::Inactive, Affect::Config)],
        _ => vec![(XmlView::Live, Affect::Live)],
    };
    for (view, a) in views {
        let dom = facts.loaded.dom.clone();
        blocking(move || {
            let xml = virtio_mem_update_xml(&dom.xml(view)?, index, to)
                .map_err(|e| DomainError::Other(format!("virtio-mem device {index}: {e}")))?;
            tracing::debug!(%xml, ?a, "update-device");
            dom.update_device(&xml, a)
        })
        .await?;
    }
    Ok(())
}

pub(crate) async fn live_devices(facts: &Facts) -> Result<Vec<VirtioMem>, DomainError> {
    let dom = facts.loaded.dom.clone();
    let xml = blocking(move || dom.xml(XmlView::Live)).await?;
    Ok(DomainFacts::parse(&xml).map_err(|e| DomainError::Other(format!("live XML: {e}")))?.virtio_mems)
}

/// Whether the guest's blocks alone can prove a growth done (pure): every
/// changed device grows between whole memory blocks (`bs`), and its region's
/// present blocks before the change are exactly what it held, all online.
/// The virtio-mem driver adds a memory block only after the device plugged all
/// of it (and a device block bigger than a memory block as a whole), so then
/// `to / bs` online blocks in the region mean the device holds `to`. Any other
/// growth (a partly plugged block the driver may fill later) waits for
/// libvirt's `<current>`.
pub fn guest_proves_growth(plan: &ResizePlan, bs: Option<u64>, before: &[BlockState]) -> bool {
    let Some(bs) = bs.filter(|b| *b > 0) else { return false };
    plan.grows()
        && plan.confirm
        && !plan.steps.is_empty()
        && plan.steps.iter().all(|s| {
            let Some(r) = s.device.range() else { return false };
            let mine: Vec<&BlockState> =
                before.iter().filter(|b| b.present && b.start >= r.start && b.start < r.end()).collect();
            s.from.get() % bs == 0
                && s.to.get() % bs == 0
                && s.to > s.from
                && mine.len() as u64 * bs == s.from.get()
                && mine.iter().all(|b| b.online)
        })
}

/// The guest's side of a growth [`guest_proves_growth`] accepted is done
/// (pure): each device's region has `to / bs` present blocks, all online.
pub fn guest_grew(plan: &ResizePlan, bs: u64, blocks: &[BlockState]) -> bool {
    plan.steps.iter().all(|s| {
        let Some(r) = s.device.range() else { return false };
        let mine: Vec<&BlockState> =
            blocks.iter().filter(|b| b.present && b.start >= r.start && b.start < r.end()).collect();
        mine.len() as u64 * bs == s.to.get() && mine.iter().all(|b| b.online)
    })
}

/// Waits until every changed device holds what it was asked, the timeout
/// passes, or a shrink stops moving. The evidence is the guest's blocks when
/// they can prove the growth (`proof`: the guest's block size; polled through
/// the agent, then libvirt's live XML read once), else the live XML's
/// `<current>`, polled. A growing guest is asked to online what its driver
/// plugged (once a second) on the way.
async fn wait_settled<A: GuestAgent>(
    facts: &Facts,
    mut link: Option<&mut A>,
    plan: &ResizePlan,
    r: &ResizeOpts,
    opts: &HotplugOpts,
    proof: Option<u64>,
) -> Result<(Settled, Evidence), DomainError> {
    let settle = Wait::new("the devices to hold what they were asked", opts.timeout).every(if proof.is_some() {
        PROOF_POLL
    } else {
        POLL
    });
    let mut waiting = settle.start();
    let (mut last_move, mut last_online) = (Instant::now(), Instant::now());
    let mut seen: Vec<Bytes> = plan.steps.iter().map(|s| s.from).collect();
    let ranges = plan.ranges();
    loop {
        if let (Some(bs), Some(agent)) = (proof, link.as_deref_mut()) {
            // A failed read is not evidence: the XML below still decides.
            if let Ok(blocks) = agent.blocks(ranges.clone()).await {
                if guest_grew(plan, bs, &blocks) {
                    let devices = live_devices(facts).await?;
                    let libvirt_agrees = plan.steps.iter().all(|s| {
                        devices.iter().find(|d| d.index == s.device.index).is_some_and(|d| d.plugged() == s.to)
                    });
                    let settled = if libvirt_agrees { Settled::Reached } else { Settled::GuestReached };
                    return Ok((settled, Evidence { devices, blocks: Some(Ok(blocks)), ..Default::default() }));
                }
            }
        }
        let devices = live_devices(facts).await?;
        let now: Vec<Bytes> = plan
            .steps
            .iter()
            .map(|s| devices.iter().find(|d| d.index == s.device.index).map_or(s.from, |d| d.plugged()))
            .collect();
        let ev = Evidence { devices, ..Default::default() };
        if plan.steps.iter().zip(&now).all(|(s, c)| *c == s.to) {
            return Ok((Settled::Reached, ev));
        }
        if now != seen {
            seen = now;
            last_move = Instant::now();
        }
        if waiting.left().is_zero() {
            return Ok((Settled::TimedOut, ev));
        }
        if !plan.grows() && last_move.elapsed() >= r.settle {
            return Ok((Settled::Stalled, ev));
        }
        if let (true, Some(agent)) = (plan.confirm && plan.grows(), link.as_deref_mut()) {
            if last_online.elapsed() >= ONLINE_EVERY {
                let _ = agent.online(online_round(&ranges, plan.zone)).await;
                last_online = Instant::now();
            }
        }
        // Past the deadline the pause ends at once; the check above then says so.
        let _ = waiting.pause().await;
    }
}

/// A shrink the guest could not finish: each device that still holds more
/// than asked gets `<requested>` = what it holds, so QEMU stops asking the
/// guest's driver (which would retry forever).
async fn reset_requested(facts: &Facts, plan: &ResizePlan, ev: &mut Evidence, applied: &mut Vec<String>) {
    for step in &plan.steps {
        let Some(d) = ev.devices.iter().find(|d| d.index == step.device.index).cloned() else { continue };
        let held = d.plugged();
        if held == step.to {
            continue;
        }
        match update_requested(facts, d.index, held, Affect::Live).await {
            Ok(()) => {
                applied.push(format!(
                    "update {} requested {} → {held} (live: what the guest still holds)",
                    d.label(),
                    step.to
                ));
                ev.reset.push(d.index);
            }
            Err(e) => applied.push(format!("could not set {} requested back to {held}: {e}", d.label())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmplug_common::MIB;

    fn dev(index: usize, size: u64, plugged: u64) -> VirtioMem {
        VirtioMem {
            index,
            size: Bytes(size * MIB),
            node: Some(index as u32),
            block: Bytes(2 * MIB),
            requested: Bytes(plugged * MIB),
            current: Some(Bytes(plugged * MIB)),
            base: Some((4 + 2 * index as u64) << 30),
            alias: Some(format!("virtiomem{index}")),
        }
    }

    fn mib(v: &[Bytes]) -> Vec<u64> {
        v.iter().map(|b| b.get() / MIB).collect()
    }

    #[test]
    fn growth_fills_the_emptiest_device_and_never_shrinks_another() {
        let d = [dev(0, 2048, 512), dev(1, 2048, 0)];
        assert_eq!(mib(&distribute(&d, Bytes(1024 * MIB), 2 * MIB).expect("fits")), vec![512, 512]);
        assert_eq!(mib(&distribute(&d, Bytes(1536 * MIB), 2 * MIB).expect("fits")), vec![768, 768]);
        // One device full: the other takes the rest.
        let d = [dev(0, 512, 512), dev(1, 2048, 0)];
        assert_eq!(mib(&distribute(&d, Bytes(2048 * MIB), 2 * MIB).expect("fits")), vec![512, 1536]);
        assert_eq!(distribute(&d, Bytes(4096 * MIB), 2 * MIB), None, "more than the devices hold");
    }

    #[test]
    fn a_shrink_drains_the_fullest_device_first() {
        let d = [dev(0, 2048, 1024), dev(1, 2048, 256)];
        assert_eq!(mib(&distribute(&d, Bytes(768 * MIB), 2 * MIB).expect("fits")), vec![512, 256]);
        assert_eq!(mib(&distribute(&d, Bytes(0), 2 * MIB).expect("fits")), vec![0, 0]);
    }

    #[test]
    fn size_changes_parse_as_totals_and_deltas() {
        assert_eq!("4G".parse::<SizeChange>(), Ok(SizeChange::To(Bytes(4096 * MIB))));
        assert_eq!("+1G".parse::<SizeChange>(), Ok(SizeChange::Grow(Bytes(1024 * MIB))));
        assert_eq!("-512M".parse::<SizeChange>(), Ok(SizeChange::Shrink(Bytes(512 * MIB))));
        assert!("+1024".parse::<SizeChange>().is_err(), "a bare number has no unit");
    }

    fn plan(steps: Vec<DeviceStep>, before: u64, after: u64) -> ResizePlan {
        ResizePlan {
            findings: vec![],
            steps,
            before: Bytes(before * MIB),
            after: Bytes(after * MIB),
            confirm: true,
            zone: ZonePolicy::Movable,
            scope: "the guest".into(),
        }
    }

    fn block(index: u64, online: bool, zone: &str, node: u32) -> BlockState {
        BlockState { index, start: index * 128 * MIB, present: true, online, zone: Some(zone.into()), node: Some(node) }
    }

    #[test]
    fn growth_is_ok_only_with_every_block_online_movable_on_its_node() {
        let d = dev(1, 2048, 0);
        let base_block = d.base.expect("base") / (128 * MIB);
        let p = plan(vec![DeviceStep { device: d.clone(), from: Bytes(0), to: Bytes(256 * MIB) }], 768, 1024);
        let after = VirtioMem { requested: Bytes(256 * MIB), current: Some(Bytes(256 * MIB)), ..d.clone() };
        let good = vec![block(base_block, true, "Movable", 1), block(base_block + 1, true, "Movable", 1)];
        let ev =
            Evidence { devices: vec![after.clone()], blocks: Some(Ok(good.clone())), reset: vec![], earlier: vec![] };
        let (o, m, devs) = judge_resize(&p, &ev, Settled::Reached, Some(128 * MIB), Duration::from_secs(60));
        assert_eq!(o, Outcome::Ok, "{m}");
        assert_eq!((devs[0].blocks, devs[0].blocks_online), (2, 2));
        // A block in Normal: the memory works but could never be unplugged.
        let mut normal = good.clone();
        normal[1].zone = Some("Normal".into());
        let ev = Evidence { devices: vec![after.clone()], blocks: Some(Ok(normal)), reset: vec![], earlier: vec![] };
        let (o, m, _) = judge_resize(&p, &ev, Settled::Reached, Some(128 * MIB), Duration::from_secs(60));
        assert_eq!(o, Outcome::GuestFailed, "{m}");
        assert!(m.contains("Normal") && m.contains("memhp_default_state=online_movable"), "{m}");
        // A block an earlier request onlined in Normal (a first stage in the
        // kernel's zone) is that request's choice, not this one's.
        let mut staged = good.clone();
        staged[0].zone = Some("Normal".into());
        let ev = Evidence {
            devices: vec![after.clone()],
            blocks: Some(Ok(staged)),
            reset: vec![],
            earlier: vec![base_block],
        };
        let (o, m, _) = judge_resize(&p, &ev, Settled::Reached, Some(128 * MIB), Duration::from_secs(60));
        assert_eq!(o, Outcome::Ok, "{m}");
        // One block missing for the 256 MiB plugged.
        let ev = Evidence {
            devices: vec![after.clone()],
            blocks: Some(Ok(good[..1].to_vec())),
            reset: vec![],
            earlier: vec![],
        };
        let (o, m, _) = judge_resize(&p, &ev, Settled::Reached, Some(128 * MIB), Duration::from_secs(60));
        assert_eq!(o, Outcome::GuestFailed, "{m}");
        // Blocks reported outside the region do not count.
        let outside = vec![block(3, true, "Movable", 1), block(4, true, "Movable", 1)];
        let ev = Evidence { devices: vec![after], blocks: Some(Ok(outside)), reset: vec![], earlier: vec![] };
        let (o, _, devs) = judge_resize(&p, &ev, Settled::Reached, Some(128 * MIB), Duration::from_secs(60));
        assert_eq!((o, devs[0].blocks), (Outcome::GuestFailed, 0));
    }

    #[test]
    fn the_guest_proves_a_growth_only_between_whole_blocks_it_fully_holds() {
        let d = dev(1, 2048, 256);
        let b0 = d.base.expect("base") / (128 * MIB);
        let held = vec![block(b0, true, "Movable", 1), block(b0 + 1, true, "Movable", 1)];
        let grow = |from: u64, to: u64| {
            plan(vec![DeviceStep { device: d.clone(), from: Bytes(from * MIB), to: Bytes(to * MIB) }], from, to)
        };
        let bs = Some(128 * MIB);
        assert!(guest_proves_growth(&grow(256, 1024), bs, &held));
        assert!(!guest_proves_growth(&grow(256, 1000), bs, &held), "a partly plugged last block");
        assert!(!guest_proves_growth(&grow(200, 1024), bs, &held), "a partly plugged block before");
        assert!(!guest_proves_growth(&grow(256, 1024), bs, &held[..1]), "blocks fewer than it holds");
        let mut offline = held.clone();
        offline[1].online = false;
        assert!(!guest_proves_growth(&grow(256, 1024), bs, &offline), "a block in passage");
        assert!(!guest_proves_growth(&grow(256, 1024), None, &held), "no block size");
        assert!(!guest_proves_growth(&grow(1024, 256), bs, &held), "a shrink");
        let mut unconfirmed = grow(256, 1024);
        unconfirmed.confirm = false;
        assert!(!guest_proves_growth(&unconfirmed, bs, &held));

        let p = grow(256, 512);
        let mut blocks = held.clone();
        assert!(!guest_grew(&p, 128 * MIB, &blocks));
        blocks.push(block(b0 + 2, false, "Movable", 1));
        blocks.push(block(b0 + 3, true, "Movable", 1));
        assert!(!guest_grew(&p, 128 * MIB, &blocks), "one block still offline");
        blocks[2].online = true;
        assert!(guest_grew(&p, 128 * MIB, &blocks));
        blocks.push(block(b0 + 4, true, "Movable", 1));
        assert!(!guest_grew(&p, 128 * MIB, &blocks), "more than asked is not what was asked");
    }

    #[test]
    fn a_lagging_current_is_ok_only_when_the_guest_proved_it() {
        let d = dev(1, 2048, 0);
        let b0 = d.base.expect("base") / (128 * MIB);
        let p = plan(vec![DeviceStep { device: d.clone(), from: Bytes(0), to: Bytes(256 * MIB) }], 768, 1024);
        let lagging = VirtioMem { requested: Bytes(256 * MIB), current: Some(Bytes(128 * MIB)), ..d.clone() };
        let good = vec![block(b0, true, "Movable", 1), block(b0 + 1, true, "Movable", 1)];
        let ev = Evidence { devices: vec![lagging.clone()], blocks: Some(Ok(good)), reset: vec![], earlier: vec![] };
        let (o, m, devs) = judge_resize(&p, &ev, Settled::GuestReached, Some(128 * MIB), Duration::from_secs(60));
        assert_eq!(o, Outcome::Ok, "{m}");
        assert!(devs[0].current_lags && devs[0].current == Bytes(128 * MIB), "{devs:?}");
        assert!(m.contains("grew by 256 MiB") && m.contains("current 128 MiB"), "{m}");
        // The same view reached through libvirt alone is a device short.
        let (o, m, devs) = judge_resize(&p, &ev, Settled::Reached, Some(128 * MIB), Duration::from_secs(60));
        assert_eq!(o, Outcome::GuestFailed, "{m}");
        assert!(!devs[0].current_lags);
        // libvirt not holding the asked `<requested>` is never a lag.
        let wrong = VirtioMem { requested: Bytes(128 * MIB), ..lagging };
        let ev = Evidence { devices: vec![wrong], ..ev };
        let (o, m, _) = judge_resize(&p, &ev, Settled::GuestReached, Some(128 * MIB), Duration::from_secs(60));
        assert_eq!(o, Outcome::GuestFailed, "{m}");
    }

    #[test]
    fn a_stalled_shrink_reports_what_stays_and_the_reset() {
        let d = dev(0, 2048, 1024);
        let p = plan(vec![DeviceStep { device: d.clone(), from: Bytes(1024 * MIB), to: Bytes(0) }], 1792, 768);
        let held = VirtioMem { requested: Bytes(128 * MIB), current: Some(Bytes(128 * MIB)), ..d };
        let ev = Evidence { devices: vec![held], blocks: Some(Ok(vec![])), reset: vec![0], earlier: vec![] };
        let (o, m, devs) = judge_resize(&p, &ev, Settled::Stalled, None, Duration::from_secs(60));
        assert_eq!(o, Outcome::GuestFailed, "{m}");
        assert!(m.contains("released 896 MiB of 1 GiB") && m.contains("set back"), "{m}");
        assert!(devs[0].requested_reset && devs[0].requested == Bytes(128 * MIB));
    }
}
