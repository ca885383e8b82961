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

use std::sync::Arc;

use vmplug_common::protocol::{GuestInfo, MemRange};
use vmplug_common::Bytes;

use crate::domain::{Affect, Connection, DomainError, XmlView};
use crate::link::{discover, GuestLink, LinkError};
use crate::ops::{blocking, connect_agent, read_domain, read_host, HotplugOpts, Loaded, MemoryOpts};
use crate::planner::{align, alignment, plan_dimms, plan_vcpus, PlanError, RoundUp};
use crate::preflight::{self, AgentTrouble, Ctx, Finding, Operation, Severity};
use crate::unplug::DimmSelector;
use crate::xml::{request_alias, request_index, Dimm, DomainFacts, NamedDimm};

/// What a plan may look at, read once: the domain (live XML when running), the
/// host, where the change lands, and the guest's facts (or why there are none).
#[derive(Debug)]
pub struct Facts {
    pub loaded: Loaded,
    pub affect: Affect,
    pub guest: Option<GuestInfo>,
    pub agent_error: Option<String>,
    /// Why there are no guest facts, for the rules (refused, absent, silent).
    pub agent_trouble: Option<AgentTrouble>,
    /// The persistent definition, when a running domain's change also goes there.
    pub persistent: Option<DomainFacts>,
}

impl Facts {
    fn ctx(&self, no_wait: bool) -> preflight::Ctx<'_> {
        self.ctx_for(no_wait)
    }

    /// The preflight context of these facts.
    pub fn ctx_for(&self, no_wait: bool) -> preflight::Ctx<'_> {
        Ctx { agent_trouble: self.agent_trouble.as_ref(), ..self.loaded.ctx(self.guest.as_ref(), self.affect, no_wait) }
    }
}

/// Reads everything the verbs' plans need, and opens the agent session a live
/// change on a running domain uses (none when plugging blind: `--no-wait` with no
/// agent configured or discoverable).
pub async fn gather(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
) -> Result<(Facts, Option<GuestLink>), DomainError> {
    gather_phases(conn, name, opts, None).await.map(|(f, l, _)| (f, l))
}

/// [`gather`], and how long the libvirt facts and the agent's handshake took (ms).
async fn gather_phases(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
    held: Option<GuestLink>,
) -> Result<(Facts, Option<GuestLink>, (u64, u64)), DomainError> {
    // The domain first (it says where the agent is), then the host's facts and
    // the agent's handshake at the same time: neither waits for the other.
    let t = std::time::Instant::now();
    let d = read_domain(conn.clone(), name, true).await?;
    let affect = opts.affect.resolve(d.running);
    let blind = opts.no_wait && opts.agent.is_none() && discover(&d.facts).is_err();
    let host = async {
        let h = read_host(conn.clone(), d.facts.clone()).await;
        (h, crate::ops::ms(t))
    };
    let agent = async {
        let t = std::time::Instant::now();
        // A guest that runs no code (paused, suspended, …) cannot answer: the
        // state rules say so at once instead of after the handshake's wait.
        let s = if affect.live() && !blind && d.running && d.state.guest_runs() {
            session(&d.facts, opts, held).await
        } else {
            (None, None)
        };
        (s, crate::ops::ms(t))
    };
    let ((host, facts_ms), ((link, err), handshake_ms)) = tokio::join!(host, agent);
    let loaded = d.with_host(host?);
    let persistent = if affect.config() && loaded.running {
        let dom = loaded.dom.clone();
        let xml = blocking(move || dom.xml(XmlView::Inactive)).await?;
        Some(DomainFacts::parse(&xml).map_err(|e| DomainError::Other(format!("persistent XML of '{name}': {e}")))?)
    } else {
        None
    };
    let facts = Facts {
        guest: link.as_ref().map(|k| k.info.clone()),
        agent_error: err.as_ref().map(LinkError::to_string),
        agent_trouble: err.as_ref().map(AgentTrouble::from),
        loaded,
        affect,
        persistent,
    };
    Ok((facts, link, (facts_ms, handshake_ms)))
}

/// [`gather`], timed: the facts, the agent session, and the run whose
/// preflight phase the reading was (every verb's entry point starts so).
pub async fn gather_timed(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
) -> Result<(Facts, Option<GuestLink>, crate::ops::Run), DomainError> {
    gather_timed_with(conn, name, opts, None).await
}

/// [`gather_timed`] with an agent session the caller already holds (autoscale
/// keeps one per domain): used when it leads to this domain's agent and still
/// answers (its facts are asked again), else closed and a new one opened.
pub async fn gather_timed_with(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
    held: Option<GuestLink>,
) -> Result<(Facts, Option<GuestLink>, crate::ops::Run), DomainError> {
    let mut run = crate::ops::Run::new();
    let t = std::time::Instant::now();
    let (facts, link, (facts_ms, handshake_ms)) = gather_phases(conn, name, opts, held).await?;
    run.preflight_ms = crate::ops::ms(t);
    (run.facts_ms, run.handshake_ms) = (facts_ms, handshake_ms);
    Ok((facts, link, run))
}

/// The agent session of a live change: `held` when it leads where this domain's
/// agent is and answers a fresh `Info`, else a new one. A held session that is not
/// used is closed before connecting (a virtio-serial channel admits one client).
async fn session(
    dom: &DomainFacts,
    opts: &HotplugOpts,
    held: Option<GuestLink>,
) -> (Option<GuestLink>, Option<LinkError>) {
    let want = opts.agent.clone().or_else(|| discover(dom).ok());
    if let Some(mut link) = held {
        if want.as_ref() == Some(&link.addr) {
            match link.refresh().await {
                Ok(()) => return (Some(link), None),
                Err(e) => tracing::debug!(error = %e, "the held agent session no longer answers; connecting again"),
            }
        }
    }
    match connect_agent(dom, opts.agent.as_ref(), opts.agent_wait).await {
        Ok(link) => (Some(link), None),
        Err(e) => (None, Some(e)),
    }
}

/// Why a verb will not act: every finding, errors first, each with its rule id and
/// what to change.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub findings: Vec<Finding>,
    /// The only error is an unreachable agent (exit 7, not 2).
    pub agent_unreachable: bool,
}

/// A request that cannot become a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum NotPlanned {
    /// The rules refuse it; nothing is changed.
    Refused(Refusal),
    /// The request itself is malformed (exit 64).
    Usage(String),
}

impl NotPlanned {
    pub fn findings(&self) -> Vec<Finding> {
        match self {
            NotPlanned::Refused(r) => r.findings.clone(),
            NotPlanned::Usage(_) => vec![],
        }
    }
}

fn error(id: &'static str, message: String) -> Finding {
    Finding { id, severity: Severity::Error, message }
}

/// Errors refuse, unless forced — except `hard` findings, which no `--force`
/// overrides (there would be nothing to do, or it would widen the request).
fn gate(findings: Vec<Finding>, force: bool, hard: Vec<Finding>) -> Result<Vec<Finding>, NotPlanned> {
    if hard.is_empty() && (force || !preflight::has_errors(&findings)) {
        let mut findings = findings;
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        return Ok(findings);
    }
    Err(refuse(findings, hard))
}

/// [`gate`] for the other verbs' planners (virtio-mem).
pub fn gate_findings(findings: Vec<Finding>, force: bool, hard: Vec<Finding>) -> Result<Vec<Finding>, NotPlanned> {
    gate(findings, force, hard)
}

fn refuse(mut findings: Vec<Finding>, hard: Vec<Finding>) -> NotPlanned {
    findings.splice(0..0, hard);
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    let errors: Vec<&Finding> = findings.iter().filter(|f| f.severity == Severity::Error).collect();
    let agent_unreachable = !errors.is_empty() && errors.iter().all(|f| f.id == "agent.ready");
    NotPlanned::Refused(Refusal { findings, agent_unreachable })
}

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
    let findings = gate(preflight::check(&f.ctx(opts.no_wait), &Operation::Vcpus { target }), opts.force, vec![])?;
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
    let ctx = Ctx { affect: Affect::Live, ..f.ctx(false) };
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

/// A planner refusal as a finding, under the rule id it belongs to.
pub fn plan_finding(e: &PlanError) -> Finding {
    let id = match e {
        PlanError::Misaligned { .. } => "mem.block-align",
        PlanError::RoundUpTooFar { .. } => "mem.round-up",
        PlanError::UnitOverMaxDimm { .. } => "mem.max-dimm",
        PlanError::NoSlots { .. } => "mem.slots",
        PlanError::NoSuchNode(..) => "mem.node",
        PlanError::NoCells => "mem.numa",
        PlanError::Zero => "mem.plan",
    };
    error(id, e.to_string())
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
/// with the size and the unit the DIMMs are cut in, or the finding that refuses.
fn aligned_size(f: &Facts, mem: &MemoryOpts, force: bool) -> Result<(Bytes, u64), Finding> {
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
        Err(e) => Err(plan_finding(&e)),
    }
}

pub fn plan_attach_memory(f: &Facts, mem: &MemoryOpts, opts: &HotplugOpts) -> Result<MemoryPlan, NotPlanned> {
    if mem.size.get() == 0 {
        return Err(NotPlanned::Usage("size must be larger than zero".into()));
    }
    if !crate::ops::valid_request_id(&mem.request_id) {
        return Err(NotPlanned::Usage(format!("request id '{}' must be 1 to 40 of A-Z a-z 0-9 _ -", mem.request_id)));
    }
    let dom = &f.loaded.facts;
    let block = f.guest.as_ref().and_then(|g| g.memory.as_ref()).map(|m| m.block_size.get());
    let (size, unit) = match aligned_size(f, mem, opts.force) {
        Ok(s) => s,
        Err(finding) => {
            let mut rest = preflight::check(
                &f.ctx(opts.no_wait),
                &Operation::Memory { size: mem.size, node: mem.node, dimms: 1, first_wave: mem.size.min(mem.max_dimm) },
            );
            rest.retain(|r| r.id != finding.id);
            return Err(refuse(rest, vec![finding]));
        }
    };
    // Reconcile with the live XML: DIMMs of this request already there (an earlier
    // run ended early) count; only the remainder is planned.
    let reconciled: Vec<Dimm> =
        dom.dimms.iter().filter(|d| request_index(d, &mem.request_id).is_some()).cloned().collect();
    let already = Bytes(reconciled.iter().map(|d| d.size.get()).sum());
    let next = reconciled.iter().filter_map(|d| request_index(d, &mem.request_id)).max().map_or(0, |m| m + 1);
    let remaining = Bytes(size.get().saturating_sub(already.get()));
    let mut hard = Vec::new();
    if already > size {
        hard.push(error(
            "mem.request-id",
            format!("request {} already attached {already}, more than the {size} asked now: repeat it with its own size, or use a new --request-id", mem.request_id),
        ));
    }
    let cells = cell_fill(dom);
    let plan = if remaining.get() == 0 {
        Ok(Vec::new())
    } else {
        plan_dimms(remaining, unit, mem.max_dimm, mem.node, &cells, dom.free_slots().max(1))
    };
    match &plan {
        Err(e) => hard.push(plan_finding(e)),
        Ok(p) if p.is_empty() && reconciled.is_empty() => hard.push(error(
            "mem.plan",
            format!("{size} makes no DIMM (libvirt sizes DIMMs in whole MiB and the guest in blocks): nothing would be attached"),
        )),
        Ok(_) => {}
    }
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
    let op = Operation::Memory { size: remaining, node: mem.node, dimms: dimm_count, first_wave };
    let mut findings = preflight::check(&f.ctx(opts.no_wait), &op);
    // A planner finding says more than the rule that saw the same problem.
    findings.retain(|r| !hard.iter().any(|h| h.id == r.id));
    if size != mem.size {
        findings.push(Finding {
            id: "mem.round-up",
            severity: Severity::Warning,
            message: format!("{} rounded up to {size} (alignment {})", mem.size, Bytes(unit)),
        });
    }
    let findings = gate(findings, opts.force, hard)?;
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

pub fn plan_detach_memory(f: &Facts, sel: &DimmSelector, opts: &HotplugOpts) -> Result<DetachPlan, NotPlanned> {
    let dom = &f.loaded.facts;
    let chosen: Vec<Dimm> = dom.dimms.iter().filter(|d| sel.matches(d)).cloned().collect();
    if chosen.is_empty() {
        let known: Vec<&str> = dom.dimms.iter().map(|d| d.alias.as_deref().unwrap_or("?")).collect();
        // The domain was read to know this: not a usage error but a refusal,
        // naming what is there (no --force makes a DIMM appear).
        let none = error(
            "unplug.dimm",
            format!(
                "no DIMM of '{}' has {}; its DIMMs: {}",
                dom.name,
                sel.describe(),
                if known.is_empty() { "none".into() } else { known.join(", ") }
            ),
        );
        return Err(refuse(vec![], vec![none]));
    }
    let alias = |d: &Dimm| d.alias.clone().unwrap_or_else(|| "?".into());
    let live_only = match &f.persistent {
        Some(p) => chosen.iter().filter(|d| !p.dimms.iter().any(|q| q.alias == d.alias)).map(alias).collect(),
        None => vec![],
    };
    let without_address = chosen.iter().filter(|d| d.base.is_none()).map(alias).collect();
    let op = Operation::Unplug { live_only, without_address };
    // The guest must release the memory: with no agent even --no-wait refuses
    // (only --force leaves it to the guest's ACPI handler).
    let findings = gate(preflight::check(&f.ctx(false), &op), opts.force, vec![])?;
    Ok(DetachPlan {
        findings,
        ranges: chosen.iter().filter_map(Dimm::range).collect(),
        size: Bytes(chosen.iter().map(|d| d.size.get()).sum()),
        offline_first: f.affect.live() && f.guest.is_some(),
        chosen,
    })
}
