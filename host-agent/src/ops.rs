//! The closed loop: read → preflight → plan → act through libvirt → wait for the
//! guest → verify → one report. Blocking libvirt calls run off the async threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmplug_common::protocol::{MemRange, OfflineRequest, OnlineRequest, ZonePolicy};
use vmplug_common::Bytes;

use crate::domain::{Affect, Connection, Domain, DomainError, XmlView};
use crate::link::{discover, AgentAddr, GuestLink, LinkError};
use crate::planner::{align, alignment, plan_dimms, plan_vcpus, PlanError, RoundUp};
use crate::preflight::{self, Ctx, Finding, Operation, Severity};
use crate::report::{HostSide, OpReport, Outcome, Timings};
use crate::xml::{request_alias, request_index, DomainFacts, HostFacts, NamedDimm};

/// Runs a blocking libvirt call on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DomainError> + Send + 'static,
) -> Result<T, DomainError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| DomainError::Other(format!("libvirt worker failed: {e}")))?
}

/// A domain with everything read about it.
#[derive(Debug)]
pub struct Loaded {
    pub dom: Arc<dyn Domain>,
    pub running: bool,
    pub job_running: bool,
    pub facts: DomainFacts,
    pub host: HostFacts,
}

impl Loaded {
    /// The preflight context for this domain.
    pub fn ctx<'a>(
        &'a self,
        guest: Option<&'a vmplug_common::protocol::GuestInfo>,
        affect: Affect,
        no_wait: bool,
    ) -> Ctx<'a> {
        Ctx {
            dom: &self.facts,
            host: &self.host,
            guest,
            running: self.running,
            job_running: self.job_running,
            affect,
            no_wait,
        }
    }
}

/// Whether the libvirt host is this machine (then its cgroup version is ours).
fn is_local(uri: &str) -> bool {
    let after = uri.split_once("://").map(|(_, r)| r).unwrap_or("");
    after.starts_with('/')
}

fn local_cgroup_v2() -> Option<bool> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        Some(true)
    } else if root.join("cpu").exists() || root.join("cpu,cpuacct").exists() {
        Some(false)
    } else {
        None
    }
}

/// Host facts for a domain: topology, free memory per node, hypervisor limits.
pub fn host_facts(conn: &dyn Connection, facts: &DomainFacts) -> Result<HostFacts, DomainError> {
    let mut host = HostFacts::parse_capabilities(&conn.capabilities()?)
        .map_err(|e| DomainError::Other(format!("host capabilities: {e}")))?;
    if !host.nodes.is_empty() {
        host.free =
            conn.cells_free_memory(host.nodes.len() as u32).unwrap_or_default().into_iter().map(Bytes).collect();
    }
    if !facts.arch.is_empty() {
        host.max_vcpus = conn
            .domain_capabilities(&facts.arch, &facts.machine, &facts.virt_type)
            .ok()
            .and_then(|x| HostFacts::parse_domcaps_max_vcpus(&x));
    }
    if is_local(&conn.uri()) {
        host.cgroup_v2 = local_cgroup_v2();
    }
    Ok(host)
}

/// Reads a domain: state, XML (live when running and `live` wanted), host facts.
pub async fn load(conn: Arc<dyn Connection>, name: &str, want_live: bool) -> Result<Loaded, DomainError> {
    let name = name.to_string();
    blocking(move || {
        let dom = conn.lookup(&name)?;
        let running = dom.is_active()?;
        let view = if running && want_live { XmlView::Live } else { XmlView::Inactive };
        let facts = DomainFacts::parse(&dom.xml(view)?)
            .map_err(|e| DomainError::Other(format!("domain XML of '{name}': {e}")))?;
        let job_running = dom.job_running().unwrap_or(false);
        let host = host_facts(conn.as_ref(), &facts)?;
        Ok(Loaded { dom, running, job_running, facts, host })
    })
    .await
}

/// Options shared by the hot-plug commands.
#[derive(Debug, Clone)]
pub struct HotplugOpts {
    pub affect: Affect,
    /// How long the guest may take to bring everything online.
    pub timeout: Duration,
    /// How long to wait for the agent's handshake.
    pub agent_wait: Duration,
    pub no_wait: bool,
    /// Apply even when preflight has errors (the guest still verifies).
    pub force: bool,
    pub agent: Option<AgentAddr>,
    pub zone: ZonePolicy,
}

pub(crate) struct Run {
    pub(crate) started: Instant,
    pub(crate) preflight_ms: u64,
    pub(crate) libvirt_ms: u64,
    pub(crate) guest_ms: u64,
}

impl Run {
    pub(crate) fn new() -> Self {
        Run { started: Instant::now(), preflight_ms: 0, libvirt_ms: 0, guest_ms: 0 }
    }
    pub(crate) fn timings(&self) -> Timings {
        Timings {
            preflight_ms: self.preflight_ms,
            libvirt_ms: self.libvirt_ms,
            guest_ms: self.guest_ms,
            total_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

pub(crate) fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Connects to the agent for a live operation on a running domain.
pub async fn connect_agent(
    facts: &DomainFacts,
    addr: Option<&AgentAddr>,
    wait: Duration,
) -> Result<GuestLink, LinkError> {
    let addr = addr.cloned().or_else(|| discover(facts)).ok_or(LinkError::NoAddress)?;
    GuestLink::connect(&addr, wait).await
}

/// The agent link a live hot-plug on a running domain needs; nothing otherwise,
/// nor when the caller plugs blind (`--no-wait`) into a domain without an agent.
async fn agent_for(l: &Loaded, affect: Affect, opts: &HotplugOpts) -> (Option<GuestLink>, Option<LinkError>) {
    let blind = opts.no_wait && opts.agent.is_none() && discover(&l.facts).is_none();
    if !affect.live() || blind {
        return (None, None);
    }
    agent_if_running(l, opts.agent.as_ref(), opts.agent_wait).await
}

/// The agent link of a running domain (none for a stopped one), or why not.
pub async fn agent_if_running(
    l: &Loaded,
    addr: Option<&AgentAddr>,
    wait: Duration,
) -> (Option<GuestLink>, Option<LinkError>) {
    if !l.running {
        return (None, None);
    }
    match connect_agent(&l.facts, addr, wait).await {
        Ok(link) => (Some(link), None),
        Err(e) => (None, Some(e)),
    }
}

/// What the host side did, with nothing from the guest: the shape shared by the
/// reports that end before (or without) the guest's part.
struct HostOnly<'a> {
    op: &'a str,
    name: &'a str,
    affect: Affect,
    findings: Vec<Finding>,
    applied: Vec<String>,
    persistent: bool,
}

impl HostOnly<'_> {
    fn report(self, outcome: Outcome, message: String, run: &Run) -> OpReport {
        OpReport {
            operation: self.op.into(),
            domain: self.name.into(),
            affect: self.affect,
            outcome,
            message,
            findings: self.findings,
            host: HostSide { applied: self.applied, verified: None, persistent: self.persistent },
            guest: None,
            timings: run.timings(),
        }
    }
}

/// libvirt refused a step: nothing applied (LibvirtError) or some steps did (Partial).
pub(crate) fn libvirt_failed(
    op: &str,
    name: &str,
    affect: Affect,
    applied: Vec<String>,
    findings: Vec<Finding>,
    e: &DomainError,
    run: &Run,
) -> OpReport {
    let outcome = if applied.is_empty() { Outcome::LibvirtError } else { Outcome::Partial };
    HostOnly { op, name, affect, findings, applied, persistent: affect.config() }.report(outcome, e.to_string(), run)
}

/// A change made to the persistent definition only: nothing for the guest to confirm.
pub(crate) fn persistent_only(
    op: &str,
    name: &str,
    affect: Affect,
    message: String,
    findings: Vec<Finding>,
    applied: Vec<String>,
    run: &Run,
) -> OpReport {
    HostOnly { op, name, affect, findings, applied, persistent: true }.report(Outcome::Ok, message, run)
}

pub(crate) fn refused(
    op: &str,
    name: &str,
    affect: Affect,
    findings: Vec<Finding>,
    link_err: Option<&LinkError>,
    run: &Run,
) -> OpReport {
    let errors: Vec<&Finding> = findings.iter().filter(|f| f.severity == Severity::Error).collect();
    let only_agent = errors.iter().all(|f| f.id == "agent.ready");
    let (outcome, message) = match link_err {
        Some(e) if only_agent => (Outcome::AgentUnreachable, e.to_string()),
        _ => (
            Outcome::Refused,
            format!(
                "preflight refused ({}); nothing was changed",
                errors.iter().map(|f| f.id).collect::<Vec<_>>().join(", ")
            ),
        ),
    };
    HostOnly { op, name, affect, findings, applied: vec![], persistent: false }.report(outcome, message, run)
}

/// `vmplug setvcpus`: preflight, socket-sized steps, libvirt, guest online, verify.
pub async fn setvcpus(
    conn: Arc<dyn Connection>,
    name: &str,
    target: u32,
    opts: &HotplugOpts,
) -> Result<OpReport, DomainError> {
    let mut run = Run::new();
    let t = Instant::now();
    let l = load(conn.clone(), name, true).await?;
    let affect = opts.affect.resolve(l.running);
    let (mut link, link_err) = agent_for(&l, affect, opts).await;
    let ctx = l.ctx(link.as_ref().map(|k| &k.info), affect, opts.no_wait);
    let findings = preflight::check(&ctx, &Operation::Vcpus { target });
    run.preflight_ms = ms(t);
    if preflight::has_errors(&findings) && !opts.force {
        return Ok(refused("setvcpus", name, affect, findings, link_err.as_ref(), &run));
    }

    // Shrinking: offline in the guest first, so the unplug never yanks a busy CPU.
    let mut guest_report = None;
    if affect.live() && target < l.facts.vcpus_current {
        if let Some(link) = link.as_mut() {
            let t = Instant::now();
            let r = link
                .offline(OfflineRequest {
                    cpus: Some(target),
                    memory: vec![],
                    timeout_ms: opts.timeout.as_millis() as u64,
                })
                .await
                .map_err(|e| DomainError::Other(format!("guest offline: {e}")))?;
            run.guest_ms += ms(t);
            guest_report = Some(r);
        }
    }

    let steps = if affect.live() {
        plan_vcpus(l.facts.vcpus_current, target, l.facts.topology.as_ref().map(|t| t.per_socket()).unwrap_or(1))
    } else {
        vec![target]
    };
    let mut applied = Vec::new();
    let t = Instant::now();
    for step in &steps {
        let (dom, step) = (l.dom.clone(), *step);
        if let Err(e) = blocking(move || dom.set_vcpus(step, affect)).await {
            run.libvirt_ms = ms(t);
            return Ok(libvirt_failed("setvcpus", name, affect, applied, findings, &e, &run));
        }
        applied.push(format!("setvcpus {step} ({})", affect_text(affect)));
    }
    run.libvirt_ms = ms(t);

    // Guest side.
    let mut outcome = Outcome::Ok;
    let mut message = format!("{target} vCPUs");
    if affect.live() && target >= l.facts.vcpus_current {
        match link.as_mut() {
            Some(link) if !opts.no_wait => {
                let t = Instant::now();
                let r = link
                    .online_until_done(OnlineRequest {
                        cpus: Some(target),
                        memory: vec![],
                        zone: opts.zone,
                        timeout_ms: opts.timeout.as_millis() as u64,
                    })
                    .await
                    .map(|(r, reconnects)| {
                        if reconnects > 0 {
                            applied
                                .push(format!("guest agent link re-established {reconnects} time(s) during the wait"));
                        }
                        r
                    });
                run.guest_ms += ms(t);
                match r {
                    Ok(r) => {
                        if r.timed_out {
                            outcome = Outcome::GuestTimeout;
                            message = format!(
                                "libvirt set {target} vCPUs but the guest has only {} online after {:?}",
                                r.cpus_online.len(),
                                opts.timeout
                            );
                        } else if !r.complete {
                            outcome = Outcome::GuestFailed;
                            message =
                                format!("the guest could not bring {target} CPUs online ({} failed)", r.failures());
                        } else {
                            message = format!("{target} vCPUs: libvirt and the guest agree ({} online)", r.cpus_online);
                        }
                        guest_report = Some(r);
                    }
                    Err(e) => {
                        outcome = Outcome::GuestFailed;
                        message = format!("libvirt set {target} vCPUs; the guest did not confirm: {e}");
                    }
                }
            }
            _ => message = format!("{target} vCPUs set in libvirt; guest not verified (--no-wait or no agent)"),
        }
    } else if !affect.live() {
        message = format!("{target} vCPUs in the persistent definition (effective at the next start)");
    }

    // Verify the host side from a fresh read.
    let (dom, view) = (l.dom.clone(), if affect.live() { XmlView::Live } else { XmlView::Inactive });
    let after = blocking(move || dom.xml(view)).await.ok().and_then(|x| DomainFacts::parse(&x).ok());
    let verified = after.as_ref().map(|f| format!("vcpu current={} max={}", f.vcpus_current, f.vcpus_max));
    if let Some(f) = &after {
        if f.vcpus_current != target && outcome == Outcome::Ok {
            outcome = Outcome::LibvirtError;
            message = format!("libvirt reports {} vCPUs after setting {target}", f.vcpus_current);
        }
    }
    Ok(OpReport {
        operation: "setvcpus".into(),
        domain: name.into(),
        affect,
        outcome,
        message,
        findings,
        host: HostSide { applied, verified, persistent: affect.config() },
        guest: guest_report,
        timings: run.timings(),
    })
}

pub fn affect_text(a: Affect) -> &'static str {
    match a {
        Affect::Live => "live",
        Affect::Config => "config",
        Affect::Both => "live+config",
        Affect::Current => "current",
    }
}

/// Options of `attach-memory`.
#[derive(Debug, Clone)]
pub struct MemoryOpts {
    pub size: Bytes,
    pub node: Option<u32>,
    /// Round a size that is not a multiple of the guest's block size up to one.
    pub round_up: bool,
    /// The most rounding up may reach, as a total (autoscale: the policy's and
    /// the host's room); `None`: the domain's `<maxMemory>` headroom. The guest
    /// reports the block size, so this is what keeps it from widening the plug.
    pub ceiling: Option<Bytes>,
    pub max_dimm: Bytes,
    /// Ties the DIMMs to this request (`<alias name='ua-vmplug-ID-N'/>`): the
    /// same command with the same id, after a crash, attaches only what is missing.
    pub request_id: String,
}

/// A fresh request id (microseconds since the epoch, base 36).
pub fn new_request_id() -> String {
    let mut n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    let mut s = String::new();
    while n > 0 {
        let d = (n % 36) as u32;
        s.insert(0, char::from_digit(d, 36).unwrap_or('0'));
        n /= 36;
    }
    s
}

/// Request ids become libvirt user aliases: `[A-Za-z0-9_-]`, at most 40.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 40 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `vmplug attach-memory`: size to the guest's block size, plan DIMMs, attach,
/// find their addresses in the live XML, have the guest online exactly those
/// blocks, check each block's node.
pub async fn attach_memory(
    conn: Arc<dyn Connection>,
    name: &str,
    mem: &MemoryOpts,
    opts: &HotplugOpts,
) -> Result<OpReport, DomainError> {
    let mut run = Run::new();
    let t = Instant::now();
    let l = load(conn.clone(), name, true).await?;
    let affect = opts.affect.resolve(l.running);
    let (mut link, link_err) = agent_for(&l, affect, opts).await;
    let guest = link.as_ref().map(|k| k.info.clone());
    let block = guest.as_ref().and_then(|g| g.memory.as_ref()).map(|m| m.block_size.get());
    let hugepage = l.facts.hugepage_size.map(|h| h.get());
    // Without guest facts only the hugepage size (or 1 MiB) is known; preflight warns.
    let (unit, what) = match block {
        Some(b) => alignment(b, hugepage),
        None => (hugepage.unwrap_or(1 << 20), "the hugepage size"),
    };
    let ceiling = mem.ceiling.unwrap_or_else(|| {
        if l.facts.max_memory.is_some() {
            l.facts.memory_headroom()
        } else {
            Bytes(u64::MAX)
        }
    });
    let round = if mem.round_up { RoundUp::UpTo(ceiling) } else { RoundUp::No };
    let size = match align(mem.size, unit, what, round) {
        Ok(s) => s,
        Err(e @ (PlanError::Misaligned { .. } | PlanError::RoundUpTooFar { .. })) if !opts.force => {
            let mut findings = vec![plan_finding(&e)];
            if let Some(le) = &link_err {
                findings.push(Finding { id: "agent.ready", severity: Severity::Warning, message: le.to_string() });
            }
            run.preflight_ms = ms(t);
            return Ok(refused("attach-memory", name, affect, findings, None, &run));
        }
        Err(PlanError::Zero) => return Err(DomainError::Usage("size must be larger than zero".into())),
        // Forced past a misaligned size: plan in libvirt's MiB granularity and let
        // the guest's answer show what happened.
        Err(_) => mem.size,
    };
    let unit = if size.is_multiple_of(unit) { unit } else { vmplug_common::MIB };
    let cells: Vec<(u32, Bytes)> = l
        .facts
        .cells
        .iter()
        .map(|c| {
            (
                c.id,
                Bytes(
                    c.memory.get()
                        + l.facts.dimms.iter().filter(|d| d.node == Some(c.id)).map(|d| d.size.get()).sum::<u64>(),
                ),
            )
        })
        .collect();
    // Reconcile with the live XML: DIMMs of this request that are already there
    // (an earlier run crashed) count; only the remainder is planned.
    if !valid_request_id(&mem.request_id) {
        return Err(DomainError::Usage(format!("request id '{}' must be 1 to 40 of A-Z a-z 0-9 _ -", mem.request_id)));
    }
    let mine: Vec<&crate::xml::Dimm> =
        l.facts.dimms.iter().filter(|d| request_index(d, &mem.request_id).is_some()).collect();
    let already = Bytes(mine.iter().map(|d| d.size.get()).sum());
    let next_index = mine.iter().filter_map(|d| request_index(d, &mem.request_id)).max().map_or(0, |m| m + 1);
    let remaining = Bytes(size.get().saturating_sub(already.get()));
    let plan = if remaining.get() == 0 {
        Ok(Vec::new())
    } else {
        plan_dimms(remaining, unit, mem.max_dimm, mem.node, &cells, l.facts.free_slots().max(1))
    };
    let dimm_count = plan.as_ref().map(|p| p.len() as u32).unwrap_or(1);
    let ctx = l.ctx(guest.as_ref(), affect, opts.no_wait);
    let mut findings =
        preflight::check(&ctx, &Operation::Memory { size: remaining, node: mem.node, dimms: dimm_count });
    if let Err(e) = &plan {
        if !findings.iter().any(|f| f.severity == Severity::Error) {
            findings.insert(0, plan_finding(e));
        }
    }
    if size != mem.size {
        findings.push(Finding {
            id: "mem.round-up",
            severity: Severity::Warning,
            message: format!("{} rounded up to {size} ({what} {})", mem.size, Bytes(unit)),
        });
    }
    run.preflight_ms = ms(t);
    if preflight::has_errors(&findings) && !opts.force {
        return Ok(refused("attach-memory", name, affect, findings, link_err.as_ref(), &run));
    }
    let plan = match plan {
        Ok(p) => p,
        Err(e) => return Err(DomainError::Usage(e.to_string())),
    };

    let mut applied = Vec::new();
    if !mine.is_empty() {
        applied.push(format!(
            "reconciled: {} DIMM(s) ({already}) of this request were already attached; {remaining} to go",
            mine.len()
        ));
    }
    let t = Instant::now();
    let mut libvirt_err = None;
    for (i, d) in plan.iter().enumerate() {
        let named = NamedDimm { spec: *d, alias: request_alias(&mem.request_id, next_index + i as u32) };
        let (dom, xml) = (l.dom.clone(), named.to_xml());
        tracing::debug!(%xml, "attaching");
        match blocking(move || dom.attach_device(&xml, affect)).await {
            Ok(()) => applied.push(format!(
                "attach dimm {} on node {} as {} ({})",
                d.size,
                d.node,
                named.alias,
                affect_text(affect)
            )),
            Err(e) => {
                libvirt_err = Some(e);
                break;
            }
        }
    }
    run.libvirt_ms = ms(t);
    if let Some(e) = libvirt_err {
        let mut r = libvirt_failed("attach-memory", name, affect, applied, findings, &e, &run);
        r.message =
            format!("{}; repeat with --request-id {} to attach only what is missing", r.message, mem.request_id);
        return Ok(r);
    }
    if !affect.live() {
        let message = format!("{size} added to the persistent definition (effective at the next start)");
        return Ok(persistent_only("attach-memory", name, affect, message, findings, applied, &run));
    }

    // The new DIMMs, with the addresses QEMU gave them.
    let dom = l.dom.clone();
    let after = match blocking(move || dom.xml(XmlView::Live))
        .await
        .and_then(|x| DomainFacts::parse(&x).map_err(|e| DomainError::Other(format!("live XML: {e}"))))
    {
        Ok(f) => f,
        // libvirtd restarted or the connection dropped after the attach: the DIMMs
        // are there, the guest side is unknown; the repeat reconciles.
        Err(e) => {
            let mut r = libvirt_failed("attach-memory", name, affect, applied, findings, &e, &run);
            r.message = format!(
                "{}; the DIMMs were attached but not verified: repeat with --request-id {} to verify and finish",
                r.message, mem.request_id
            );
            return Ok(r);
        }
    };
    let new: Vec<_> = after.dimms.iter().filter(|d| request_index(d, &mem.request_id).is_some()).cloned().collect();
    let verified = Some(format!(
        "request {}: {} DIMM(s), memory {}, {} slot(s) free; this request: {}",
        mem.request_id,
        after.dimms.len(),
        after.memory,
        after.free_slots(),
        new.iter()
            .map(|d| format!("{} node {} @{:#x}", d.size, d.node.unwrap_or(0), d.base.unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let ranges: Vec<MemRange> = new.iter().filter_map(crate::xml::Dimm::range).collect();
    let mut outcome = Outcome::Ok;
    let mut message = format!("{size} attached");
    let mut guest_report = None;
    match link.as_mut() {
        Some(link) if !opts.no_wait => {
            let t = Instant::now();
            let r = link
                .online_until_done(OnlineRequest {
                    cpus: None,
                    memory: ranges.clone(),
                    zone: opts.zone,
                    timeout_ms: opts.timeout.as_millis() as u64,
                })
                .await;
            let r = r.map(|(r, reconnects)| {
                if reconnects > 0 {
                    applied.push(format!("guest agent link re-established {reconnects} time(s) during the wait"));
                }
                r
            });
            run.guest_ms = ms(t);
            match r {
                Ok(r) => {
                    let wrong_node: Vec<String> = r
                        .blocks
                        .iter()
                        .filter_map(|b| {
                            let dimm = new.iter().find(|d| {
                                d.base
                                    .is_some_and(|base| b.start >= base && b.start < base.saturating_add(d.size.get()))
                            })?;
                            (b.node.is_some() && b.node != dimm.node).then(|| {
                                format!("memory{} on node {:?}, DIMM on node {:?}", b.index, b.node, dimm.node)
                            })
                        })
                        .collect();
                    let (confirmed, expected) = confirmed_blocks(&ranges, block, &r);
                    let missing =
                        r.blocks.iter().filter(|b| b.outcome == vmplug_common::protocol::Outcome::NotFound).count();
                    if r.timed_out {
                        outcome = Outcome::GuestTimeout;
                        message = format!(
                            "libvirt attached {size} but {missing} of {} block(s) never appeared in the guest within {:?} (the guest kernel rejected or did not see the DIMM)",
                            r.blocks.len(),
                            opts.timeout
                        );
                    } else if !r.complete {
                        outcome = Outcome::GuestFailed;
                        message = format!("the guest failed to online {} block(s)", r.failures());
                    } else if expected == 0 || confirmed != expected {
                        outcome = Outcome::GuestFailed;
                        message = format!(
                            "libvirt attached {size} ({expected} block(s)) but the guest confirmed {confirmed} of them online"
                        );
                    } else if !wrong_node.is_empty() {
                        outcome = Outcome::GuestFailed;
                        message = format!("blocks landed on the wrong guest node: {}", wrong_node.join("; "));
                    } else {
                        message = format!(
                            "{size} attached; libvirt and the guest agree ({} block(s) online)",
                            r.blocks.len()
                        );
                    }
                    guest_report = Some(r);
                }
                Err(e) => {
                    outcome = Outcome::GuestFailed;
                    message = format!("libvirt attached {size}; the guest refused to online it: {e}");
                }
            }
        }
        _ => message = format!("{size} attached in libvirt; guest not verified (--no-wait or no agent)"),
    }
    Ok(OpReport {
        operation: "attach-memory".into(),
        domain: name.into(),
        affect,
        outcome,
        message,
        findings,
        host: HostSide { applied, verified, persistent: affect.config() },
        guest: guest_report,
        timings: run.timings(),
    })
}

/// A planner refusal as a finding, under the rule id it belongs to.
fn plan_finding(e: &PlanError) -> Finding {
    let id = match e {
        PlanError::Misaligned { .. } => "mem.block-align",
        PlanError::RoundUpTooFar { .. } => "mem.round-up",
        PlanError::UnitOverMaxDimm { .. } => "mem.max-dimm",
        PlanError::NoSlots { .. } => "mem.slots",
        PlanError::NoSuchNode(..) => "mem.node",
        PlanError::NoCells => "mem.numa",
        PlanError::Zero => "mem.plan",
    };
    Finding { id, severity: Severity::Error, message: e.to_string() }
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
    pub refused: Option<String>,
}

impl PrepareReport {
    pub fn render_text(&self) -> String {
        if let Some(why) = &self.refused {
            return format!("prepare {}: REFUSED — {why}\n", self.domain);
        }
        let mut s = self.diff.clone();
        for n in &self.notes {
            s.push_str(&format!("# {n}\n"));
        }
        s.push_str(&match (self.defined, self.diff.is_empty()) {
            (_, true) => format!("prepare {}: already hot-plug-ready; nothing to change\n", self.domain),
            (false, false) => format!("prepare {}: dry run; nothing defined\n", self.domain),
            (true, false) if self.running => {
                format!("prepare {}: definition updated; takes effect at the next start (the running domain is unchanged)\n", self.domain)
            }
            (true, false) => format!("prepare {}: definition updated; takes effect at the next start\n", self.domain),
        });
        s
    }
}

/// `vmplug prepare`: edits the persistent definition (never the live one).
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
        refused: None,
    };
    match crate::prepare::prepare(&old, &l.host, opts) {
        Err(e) => report.refused = Some(e.to_string()),
        Ok(p) => {
            report.diff = if p.xml == old { String::new() } else { crate::prepare::diff(&old, &p.xml) };
            report.notes = p.notes;
            if !dry_run && p.xml != old {
                let c = conn.clone();
                blocking(move || c.define(&p.xml)).await?;
                report.defined = true;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmplug_common::protocol::{BlockResult, Outcome as BlockOutcome, Report};
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
