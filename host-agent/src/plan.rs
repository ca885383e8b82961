//! Every hot-plug verb as data before anything runs.
//!
//! ```text
//! gather(): libvirt + the agent's handshake  →  Facts            (I/O, once)
//! plan_*(): Facts + request                  →  Plan | NotPlanned (pure: every rule)
//! ops/unplug: execute the plan's steps       →  evidence          (I/O)
//! judge_*(): plan + evidence                 →  outcome, message  (pure)
//! ```
//!
//! `check` is `gather` + `plan_*` without the executor, so it says "ready"
//! exactly when the verb would act (`tests/verdicts.rs` proves it over every
//! fixture and a table of requests). Guest facts can narrow a plan (refuse,
//! round within a ceiling) but never widen it past the request.

use vmplug_common::protocol::{DeviceKind, MemRange};
use vmplug_common::Bytes;

use crate::domain::Affect;
use crate::facts::{HotplugOpts, MemoryOpts};
use crate::planner::{align, alignment, plan_dimms, plan_vcpus, PlanError, RoundUp};
use crate::preflight::{self, Ctx, DimmPlanning, Finding, Operation};
use crate::xml::{request_alias, request_index, Dimm, DomainFacts, NamedDimm};

pub use crate::facts::{gather, gather_timed, gather_timed_with, Facts};
use crate::preflight::refuse;
pub use crate::preflight::{gate, NotPlanned, Refusal};

/// `setvcpus`: socket-sized steps; a shrink offlines in the guest first.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuPlan {
    pub findings: Vec<Finding>,
    pub current: u32,
    pub target: u32,
    /// libvirt's steps, in order (each a total).
    pub steps: Vec<u32>,
    /// A live shrink: the guest takes the CPUs offline before libvirt unplugs them.
    pub offline_first: bool,
    /// A live grow with an agent and no `--no-wait`: the guest must confirm.
    pub confirm: bool,
}

pub fn plan_setvcpus(f: &Facts, target: u32, opts: &HotplugOpts) -> Result<VcpuPlan, NotPlanned> {
    if target == 0 {
        return Err(NotPlanned::Usage("a domain needs at least one vCPU".into()));
    }
    let findings = gate(preflight::check(&f.ctx_for(opts.no_wait), &Operation::Vcpus { target }), opts.force, vec![])?;
    let dom = &f.loaded.facts;
    let live = f.affect.live();
    let per_socket = dom.topology.as_ref().map(|t| t.per_socket()).unwrap_or(1);
    let steps = if live { plan_vcpus(dom.vcpus_current, target, per_socket) } else { vec![target] };
    let agent = f.guest.is_some();
    Ok(VcpuPlan {
        findings,
        current: dom.vcpus_current,
        target,
        steps,
        offline_first: live && agent && target < dom.vcpus_current,
        confirm: live && agent && !opts.no_wait && target >= dom.vcpus_current,
    })
}

/// `setvcpus --guest`: CPUs onlined or offlined inside the guest by the agent,
/// among the vCPUs it has; libvirt is not asked to change anything.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestVcpuPlan {
    pub findings: Vec<Finding>,
    /// CPUs online in the guest now.
    pub online: u32,
    pub target: u32,
}

pub fn plan_guest_vcpus(f: &Facts, target: u32, opts: &HotplugOpts) -> Result<GuestVcpuPlan, NotPlanned> {
    if opts.affect.config() || opts.no_wait {
        return Err(NotPlanned::Usage(
            "--guest changes the running guest and waits for it: it takes neither --config nor --no-wait".into(),
        ));
    }
    // Always the running guest (a stopped domain is refused by domain.running).
    // --force cannot help: every refusal is one the agent itself would meet.
    let ctx = Ctx { affect: Affect::Live, ..f.ctx_for(false) };
    let findings = gate(preflight::check(&ctx, &Operation::GuestVcpus { target }), false, vec![])?;
    let Some(g) = f.guest.as_ref() else {
        return Err(NotPlanned::Usage("--guest needs the guest agent".into()));
    };
    Ok(GuestVcpuPlan { findings, online: g.cpus.online.len() as u32, target })
}

/// `attach-memory`: DIMMs sized to the guest's block size (and hugepage size),
/// minus what an earlier run of the same request already attached.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub findings: Vec<Finding>,
    /// The request's total after rounding.
    pub size: Bytes,
    /// The guest's memory block size, when known.
    pub block: Option<u64>,
    /// DIMMs of this request already in the live XML (an earlier run).
    pub reconciled: Vec<Dimm>,
    pub remaining: Bytes,
    /// What to attach, in order.
    pub dimms: Vec<NamedDimm>,
    /// A live plug with an agent and no `--no-wait`: the guest must confirm.
    pub confirm: bool,
    /// The zone the blocks must end in (`movable`, `kernel`), or the agent's or
    /// the kernel's choice (`auto`, `online`).
    pub zone: vmplug_common::protocol::ZonePolicy,
    /// How many of `dimms` each wave attaches (the guest onlines a wave before
    /// the next is plugged); one wave when nothing needs staging.
    pub waves: Vec<usize>,
    /// Ranges whose blocks were onlined before the last step for a known
    /// reason (an earlier run of the request, earlier waves), and how many of
    /// those blocks the kernel or a rule had onlined before the agent.
    pub settled: Vec<MemRange>,
    pub settled_by_others: usize,
}

impl MemoryPlan {
    pub fn already(&self) -> Bytes {
        Bytes(self.reconciled.iter().map(|d| d.size.get()).sum())
    }
}

/// Memory per guest cell: its initial memory plus its DIMMs.
fn cell_fill(dom: &DomainFacts) -> Vec<(u32, Bytes)> {
    dom.cells
        .iter()
        .map(|c| {
            let dimms: u64 = dom.dimms.iter().filter(|d| d.node == Some(c.id)).map(|d| d.size.get()).sum();
            (c.id, Bytes(c.memory.get() + dimms))
        })
        .collect()
}

/// The request's size after alignment (or rounding within its ceiling): `Ok`
/// with the size and the unit the DIMMs are cut in, or why it cannot be.
fn aligned_size(f: &Facts, mem: &MemoryOpts, force: bool) -> Result<(Bytes, u64), PlanError> {
    let dom = &f.loaded.facts;
    let block = f.guest.as_ref().and_then(|g| g.memory.as_ref()).map(|m| m.block_size.get());
    let hugepage = dom.hugepage_size.map(|h| h.get());
    // Without guest facts only the hugepage size (or 1 MiB) is known; preflight warns.
    let (unit, what) = match block {
        Some(b) => alignment(b, hugepage),
        None => (hugepage.unwrap_or(vmplug_common::MIB), "the hugepage size"),
    };
    let ceiling = mem.ceiling.unwrap_or(if dom.max_memory.is_some() { dom.memory_headroom() } else { Bytes(u64::MAX) });
    let round = if mem.round_up { RoundUp::UpTo(ceiling) } else { RoundUp::No };
    match align(mem.size, unit, what, round) {
        Ok(size) => Ok((size, unit)),
        // Forced past a misaligned size: plan in libvirt's MiB granularity; the
        // guest's answer shows what happened.
        Err(PlanError::Misaligned { .. } | PlanError::RoundUpTooFar { .. }) if force => {
            Ok((mem.size, vmplug_common::MIB))
        }
        Err(e) => Err(e),
    }
}

pub fn plan_attach_memory(f: &Facts, mem: &MemoryOpts, opts: &HotplugOpts) -> Result<MemoryPlan, NotPlanned> {
    if mem.size.get() == 0 {
        return Err(NotPlanned::Usage("size must be larger than zero".into()));
    }
    if !crate::facts::valid_request_id(&mem.request_id) {
        return Err(NotPlanned::Usage(format!("request id '{}' must be 1 to 40 of A-Z a-z 0-9 _ -", mem.request_id)));
    }
    let dom = &f.loaded.facts;
    let block = f.guest.as_ref().and_then(|g| g.memory.as_ref()).map(|m| m.block_size.get());
    let (size, unit) = match aligned_size(f, mem, opts.force) {
        Ok(s) => s,
        Err(e) => {
            let plan = DimmPlanning {
                error: Some(e),
                total: mem.size,
                request_id: mem.request_id.clone(),
                ..Default::default()
            };
            let op = Operation::Memory {
                size: mem.size,
                node: mem.node,
                dimms: 1,
                first_wave: mem.size.min(mem.max_dimm),
                plan,
            };
            return Err(refuse(preflight::check(&f.ctx_for(opts.no_wait), &op), vec![]));
        }
    };
    // Reconcile with the live XML: DIMMs of this request already there (an earlier
    // run ended early) count; only the remainder is planned.
    let reconciled: Vec<Dimm> =
        dom.dimms.iter().filter(|d| request_index(d, &mem.request_id).is_some()).cloned().collect();
    let already = Bytes(reconciled.iter().map(|d| d.size.get()).sum());
    let next = reconciled.iter().filter_map(|d| request_index(d, &mem.request_id)).max().map_or(0, |m| m + 1);
    let remaining = Bytes(size.get().saturating_sub(already.get()));
    let cells = cell_fill(dom);
    let plan = if remaining.get() == 0 {
        Ok(Vec::new())
    } else {
        plan_dimms(remaining, unit, mem.max_dimm, mem.node, &cells, dom.free_slots().max(1))
    };
    let dimm_count = plan.as_ref().map(|p| p.len() as u32).unwrap_or(1);
    // Waves need the agent between them (to online one before the next).
    let sizes: Vec<u64> = plan.as_ref().map(|p| p.iter().map(|d| d.size.get()).collect()).unwrap_or_default();
    let waves = match &f.guest {
        Some(g) if f.affect.live() && !opts.no_wait => {
            crate::planner::waves(&sizes, g.mem_available.get(), g.memmap_on_memory == Some(true))
        }
        _ => Some(vec![sizes.len()]),
    };
    // The first wave, or (when not even one DIMM fits) the first DIMM: what the
    // guest must absorb before anything it gains from the plug.
    let first_wave = match &waves {
        Some(w) => Bytes(sizes.iter().take(w.first().copied().unwrap_or(0)).sum()),
        None => Bytes(sizes.first().copied().unwrap_or(0)),
    };
    let planning = DimmPlanning {
        error: plan.as_ref().err().cloned(),
        total: size,
        rounded_from: (size != mem.size).then_some(mem.size),
        unit: Bytes(unit),
        empty: matches!(&plan, Ok(p) if p.is_empty() && reconciled.is_empty()),
        request_id: mem.request_id.clone(),
        already,
    };
    let op = Operation::Memory { size: remaining, node: mem.node, dimms: dimm_count, first_wave, plan: planning };
    let findings = gate(preflight::check(&f.ctx_for(opts.no_wait), &op), opts.force, vec![])?;
    let dimms: Vec<NamedDimm> = plan
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, spec)| NamedDimm { spec, alias: request_alias(&mem.request_id, next + i as u32) })
        .collect();
    Ok(MemoryPlan {
        settled: reconciled.iter().filter_map(Dimm::range).collect(),
        findings,
        size,
        block,
        reconciled,
        remaining,
        waves: waves.unwrap_or_else(|| vec![dimms.len()]),
        settled_by_others: 0,
        dimms,
        confirm: f.affect.live() && f.guest.is_some() && !opts.no_wait,
        zone: opts.zone,
    })
}

/// Which DIMMs to unplug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DimmSelector {
    /// One DIMM by its alias (`ua-…` user alias or libvirt's `dimmN`).
    Alias(String),
    /// Every DIMM `attach-memory --request-id ID` attached (`ua-vmplug-ID-N`).
    Request(String),
}

impl DimmSelector {
    pub fn matches(&self, d: &Dimm) -> bool {
        match self {
            DimmSelector::Alias(a) => d.alias.as_deref() == Some(a.as_str()),
            DimmSelector::Request(id) => request_index(d, id).is_some(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            DimmSelector::Alias(a) => format!("alias '{a}'"),
            DimmSelector::Request(id) => format!("request id '{id}'"),
        }
    }
}

/// `detach-memory`: which DIMMs, their ranges, and whether the guest releases
/// them first.
#[derive(Debug, Clone, PartialEq)]
pub struct DetachPlan {
    pub findings: Vec<Finding>,
    pub chosen: Vec<Dimm>,
    pub ranges: Vec<MemRange>,
    pub size: Bytes,
    /// The guest offlines the blocks before libvirt detaches anything.
    pub offline_first: bool,
}

/// DIMMs the guest's forecast says it cannot release now: a DIMM goes whole
/// or not at all, so each chosen one must be releasable in full. `None`
/// without a forecast covering every chosen DIMM (an older agent).
fn dimm_forecast(f: &Facts, chosen: &[Dimm]) -> Option<Finding> {
    let fc = f.forecast.as_ref()?;
    let mut can = 0u64;
    let mut held = Vec::new();
    for d in chosen {
        let start = d.range()?.start;
        let dev = fc.devices.iter().find(|x| x.kind == DeviceKind::Dimm && x.start == start)?;
        if dev.releasable >= d.size {
            can += d.size.get();
        } else {
            let alias = d.alias.as_deref().unwrap_or("?");
            held.push(dev.held.as_ref().map_or_else(|| format!("{alias}: not all of it"), |h| format!("{alias}: {h}")));
        }
    }
    let size = Bytes(chosen.iter().map(|d| d.size.get()).sum());
    (can < size.get()).then(|| preflight::forecast_refusal("the DIMMs", Bytes(can), size, &held))
}

pub fn plan_detach_memory(f: &Facts, sel: &DimmSelector, opts: &HotplugOpts) -> Result<DetachPlan, NotPlanned> {
    let dom = &f.loaded.facts;
    let chosen: Vec<Dimm> = dom.dimms.iter().filter(|d| sel.matches(d)).cloned().collect();
    if chosen.is_empty() {
        // The domain was read to know this: not a usage error but a refusal
        // (unplug.dimm, hard), naming what is there, and only that: the
        // other rules would judge a detach of nothing.
        let op = Operation::Unplug { live_only: vec![], without_address: vec![], unmatched: Some(sel.describe()) };
        let none: Vec<Finding> = preflight::check(&f.ctx_for(false), &op).into_iter().filter(|x| x.hard).collect();
        return Err(refuse(none, vec![]));
    }
    let alias = |d: &Dimm| d.alias.clone().unwrap_or_else(|| "?".into());
    let live_only = match &f.persistent {
        Some(p) => chosen.iter().filter(|d| !p.dimms.iter().any(|q| q.alias == d.alias)).map(alias).collect(),
        None => vec![],
    };
    let without_address = chosen.iter().filter(|d| d.base.is_none()).map(alias).collect();
    let op = Operation::Unplug { live_only, without_address, unmatched: None };
    // The guest must release the memory: with no agent even --no-wait refuses
    // (only --force leaves it to the guest's ACPI handler).
    let mut findings = preflight::check(&f.ctx_for(false), &op);
    if f.affect.live() {
        findings.extend(dimm_forecast(f, &chosen));
    }
    let findings = gate(findings, opts.force, vec![])?;
    Ok(DetachPlan {
        findings,
        ranges: chosen.iter().filter_map(Dimm::range).collect(),
        size: Bytes(chosen.iter().map(|d| d.size.get()).sum()),
        offline_first: f.affect.live() && f.guest.is_some(),
        chosen,
    })
}
