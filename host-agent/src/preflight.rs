//! Preflight: every constraint of the guide as one rule with a stable id, a
//! severity and a message that says what to change. Rules are pure functions of
//! (domain XML facts, host facts, guest facts, the operation).

use vmplug_common::protocol::GuestInfo;
use vmplug_common::{Bytes, CpuSet, GIB};

use crate::domain::{Affect, DomainState, NumaMode, PauseReason};
use crate::planner::PlanError;
use crate::xml::{machine_version, DomainFacts, HostFacts};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub id: &'static str,
    pub severity: Severity,
    pub message: String,
    /// An error no `--force` overrides: the planner found nothing it could
    /// do, or doing it would widen the request (reports show it as an error).
    #[serde(skip)]
    pub hard: bool,
}

/// Declares [`RuleId`] from the one table of rule ids.
macro_rules! rule_ids {
    ($($variant:ident = $id:literal,)*) => {
        /// Every rule vmplug checks, by the id its findings carry: the table below is
        /// the only place an id is spelled (reports, README and tests name these
        /// strings, so a string never changes).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum RuleId {
            $($variant,)*
        }

        impl RuleId {
            /// Every rule, in the table's order.
            pub const ALL: &'static [RuleId] = &[$(RuleId::$variant,)*];

            /// The id as findings, reports and `--json` carry it (`mem.node`).
            pub const fn id(self) -> &'static str {
                match self {
                    $(RuleId::$variant => $id,)*
                }
            }

            /// The rule an id names, if any.
            pub fn from_id(id: &str) -> Option<RuleId> {
                match id {
                    $($id => Some(RuleId::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

rule_ids! {
    AgentReady = "agent.ready",
    AgentSocket = "agent.socket",
    CpuCoresMultiple = "cpu.cores-multiple",
    CpuGuestAcpi = "cpu.guest-acpi",
    CpuGuestPossible = "cpu.guest-possible",
    CpuGuestPresent = "cpu.guest-present",
    CpuHypervisorMax = "cpu.hypervisor-max",
    CpuMachine = "cpu.machine",
    CpuMax = "cpu.max",
    CpuPlacement = "cpu.placement",
    CpuSocketCell = "cpu.socket-cell",
    DomainCrashed = "domain.crashed",
    DomainJob = "domain.job",
    DomainPaused = "domain.paused",
    DomainPmsuspended = "domain.pmsuspended",
    DomainRunning = "domain.running",
    DomainShuttingDown = "domain.shutting-down",
    GuestVeto = "guest.veto",
    MemBlockAlign = "mem.block-align",
    MemGuest = "mem.guest",
    MemGuestAcpi = "mem.guest-acpi",
    MemGuestFree = "mem.guest-free",
    MemGuestKernel = "mem.guest-kernel",
    MemGuestNode = "mem.guest-node",
    MemForecast = "mem.forecast",
    MemHugepageAlign = "mem.hugepage-align",
    MemLinux4g = "mem.linux-4g",
    MemMachine = "mem.machine",
    MemMaxDimm = "mem.max-dimm",
    MemMaxMemory = "mem.max-memory",
    MemMaxSize = "mem.max-size",
    MemNode = "mem.node",
    MemNuma = "mem.numa",
    MemPlan = "mem.plan",
    MemRequestId = "mem.request-id",
    MemRoundUp = "mem.round-up",
    MemSlots = "mem.slots",
    MemVhostUser = "mem.vhost-user",
    MemWindowsNode0 = "mem.windows-node0",
    NumaCellPinning = "numa.cell-pinning",
    Numatune = "numatune",
    NumatuneNodes = "numatune.nodes",
    NumatuneStrictFree = "numatune.strict-free",
    PersistGuestLevel = "persist.guest-level",
    PersistLiveOnly = "persist.live-only",
    PinHostCpus = "pin.host-cpus",
    PinVcpu = "pin.vcpu",
    PrepareChannelPath = "prepare.channel-path",
    PrepareXml = "prepare.xml",
    SchedSharesRange = "sched.shares-range",
    UnplugDimm = "unplug.dimm",
    UnplugLiveOnly = "unplug.live-only",
    UnplugNoAddress = "unplug.no-address",
    VmemBlock = "vmem.block",
    VmemBlockAlign = "vmem.block-align",
    VmemDevice = "vmem.device",
    VmemFloor = "vmem.floor",
    VmemGuestDriver = "vmem.guest-driver",
    VmemNoAddress = "vmem.no-address",
    VmemAlias = "vmem.alias",
    VmemNode = "vmem.node",
    VmemPlan = "vmem.plan",
    VmemPlugged = "vmem.plugged",
    VmemSettling = "vmem.settling",
    VmemSize = "vmem.size",
}

impl std::fmt::Display for RuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

impl Finding {
    /// A broken rule: refuses unless forced.
    pub fn error(rule: RuleId, message: String) -> Finding {
        Finding { id: rule.id(), severity: Severity::Error, message, hard: false }
    }

    /// A broken rule that refuses even when forced.
    pub fn hard(rule: RuleId, message: String) -> Finding {
        Finding { hard: true, ..Finding::error(rule, message) }
    }

    /// A rule that advises: reported, never refuses.
    pub fn warning(rule: RuleId, message: String) -> Finding {
        Finding { id: rule.id(), severity: Severity::Warning, message, hard: false }
    }
}

fn error(rule: RuleId, message: impl Into<String>) -> Option<Finding> {
    Some(Finding::error(rule, message.into()))
}

fn hard(rule: RuleId, message: impl Into<String>) -> Option<Finding> {
    Some(Finding::hard(rule, message.into()))
}

fn warning(rule: RuleId, message: impl Into<String>) -> Option<Finding> {
    Some(Finding::warning(rule, message.into()))
}

/// What is about to be done.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// `setvcpus` to a total.
    Vcpus {
        target: u32,
    },
    /// `attach-memory`: total size, target node (None: balanced), DIMM count
    /// planned, the first wave (the most plugged before the guest onlines),
    /// and what the DIMM planner made of the request.
    Memory {
        size: Bytes,
        node: Option<u32>,
        dimms: u32,
        first_wave: Bytes,
        plan: DimmPlanning,
    },
    /// `resize-memory`: the virtio-mem devices in scope grow by `grow` (zero
    /// for a shrink), on guest node `node` (None: every device), and what the
    /// plan measured of them (`None`: not planned, as in a probe).
    Resize {
        grow: Bytes,
        node: Option<u32>,
        plan: Option<ResizePlanning>,
    },
    Shares(u64),
    Pin {
        vcpu: Option<u32>,
        cpus: CpuSet,
    },
    Numatune {
        mode: Option<NumaMode>,
        nodeset: Option<CpuSet>,
    },
    /// `detach-memory`: the chosen DIMMs' aliases that are only in the live
    /// domain (not in its definition), and those the live XML gives no address;
    /// `unmatched`: the selector, in words, when it chose no DIMM.
    Unplug {
        live_only: Vec<String>,
        without_address: Vec<String>,
        unmatched: Option<String>,
    },
    /// `setvcpus --guest`: `target` CPUs online inside the guest, among the
    /// vCPUs it already has (nothing is plugged; libvirt is not changed).
    GuestVcpus {
        target: u32,
    },
    /// `detach-virtio-mem`: the device with this alias, among the domain's
    /// virtio-mem devices (the live XML's when the change is live).
    VirtioMemDetach {
        alias: String,
        devices: Vec<crate::xml::VirtioMem>,
    },
    /// `add-virtio-mem`: a new device of `size` on guest node `node`, plugged
    /// in `block` steps.
    AddVirtioMem {
        size: Bytes,
        node: Option<u32>,
        block: Bytes,
    },
    /// `prepare`: the definition it would write (boxed: it is the largest).
    Prepare(Box<Proposal>),
    /// General readiness (`vmplug check` with no operation).
    Readiness,
    /// What `prepare` must leave beside readiness: usable slots, and room for
    /// one more vCPU (warned: memory-only domains exist).
    Prepared,
}

/// What the DIMM planner made of an `attach-memory` request: the input of the
/// rules on alignment, rounding, slots, cells, the DIMM size limit and the
/// request id, which say it in the planner's words (it knows the layout it
/// tried). `Default`: nothing planned yet (`check`'s probes, tests).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DimmPlanning {
    /// Why the request could not be cut into DIMMs.
    pub error: Option<PlanError>,
    /// The request's total after alignment.
    pub total: Bytes,
    /// The size asked, when alignment rounded it up to `total`.
    pub rounded_from: Option<Bytes>,
    /// The alignment unit.
    pub unit: Bytes,
    /// Nothing would be attached, by this run or an earlier one.
    pub empty: bool,
    /// The request id, and what earlier runs of it attached.
    pub request_id: String,
    pub already: Bytes,
}

/// The most memory slots: the guide's limit, and QEMU's (`ACPI_MAX_RAM_SLOTS`),
/// which libvirt checks too.
pub const MAX_SLOTS: u32 = 256;

/// The most vCPUs `prepare` writes: KVM allows at most 4096 per VM (x86's
/// `KVM_MAX_VCPUS` ceiling; arm64's is lower), so no machine vmplug prepares
/// (pc, q35, virt) can start with more. A larger count could never run, and
/// laying it out over cells took minutes.
pub const MAX_VCPUS: u32 = 4096;

/// The most guest NUMA cells: QEMU's `MAX_NODES`.
pub const MAX_CELLS: u32 = 128;

/// What `prepare` would write, for the rules that judge a definition before
/// it exists: the counts first, then (once the cells are laid out) what strict
/// host placement asks of each node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Proposal {
    /// vCPUs now, and the most.
    pub current: u32,
    pub max_vcpus: u32,
    /// Guest NUMA cells, and vCPUs per socket (cores × threads).
    pub cells: u32,
    pub per_socket: u32,
    pub slots: u32,
    pub max_memory: Bytes,
    /// `--host-nodes`, as given.
    pub host_nodes: Option<CpuSet>,
    /// Strictly bound cells, each with its host node's free memory.
    pub strict: Vec<StrictCell>,
    /// `--channel-path`, as given.
    pub channel_path: Option<String>,
}

/// One guest cell strictly bound to a host node.
#[derive(Debug, Clone, PartialEq)]
pub struct StrictCell {
    pub cell: u32,
    pub node: u32,
    /// The cell's memory, the node's free memory, and what every cell bound
    /// there needs together.
    pub memory: Bytes,
    pub free: Bytes,
    pub node_need: Bytes,
}

/// Why `prepare`'s machine cannot hot-plug on this host, judged from
/// libvirt's capabilities and, on aarch64, what this QEMU says it can do.
fn machine_cannot_hotplug(ctx: &Ctx) -> Option<String> {
    let f = ctx.dom;
    Some(match f.arch.as_str() {
        "x86_64" | "i686" if is_x86_hotplug_machine(&f.machine) => return None,
        "aarch64" if f.machine == "virt" || f.machine.starts_with("virt-") => {
            let newest = ctx
                .host
                .newest_versioned("virt")
                .map_or(String::new(), |n| format!("; use {n}, the newest this host's QEMU offers"));
            match machine_version(&f.machine, "virt") {
                Some(v) if v < (4, 1) => format!("the guide requires virt-4.1 or newer{newest}"),
                Some(v) if v < (4, 2) && ctx.host.cpu_hotplug == Some(false) => format!("this host's QEMU has no ACPI GED device on virt-4.1 (upstream adds it from virt-4.2), so neither DIMMs nor vCPUs can be hot-plugged there{newest}"),
                _ => return None,
            }
        }
        "aarch64" => "only the 'virt' machine can hot-plug on aarch64".into(),
        _ => "vmplug knows hot-plug on x86 pc/q35 and aarch64 virt".into(),
    })
}

/// What is wrong with `prepare --host-nodes`: none given, or one the host
/// lacks.
fn host_nodes_problem(ctx: &Ctx, p: &Proposal) -> Option<String> {
    let nodes = p.host_nodes.as_ref()?;
    let host_ids: CpuSet = ctx.host.nodes.iter().map(|n| n.id).collect();
    if nodes.is_empty() {
        return Some(format!("--host-nodes is empty: name at least one host NUMA node (host nodes: {host_ids})"));
    }
    let n = nodes.iter().find(|n| !host_ids.contains(*n))?;
    Some(format!("host NUMA node {n} does not exist (host nodes: {host_ids})"))
}

/// The first strictly bound cell whose node cannot hold what is bound there.
fn strict_problem(p: &Proposal) -> Option<String> {
    let c = p.strict.iter().find(|c| c.free < c.node_need)?;
    Some(format!(
        "strict binding of cell {} ({}) to host node {} with {} free would fail at start",
        c.cell, c.memory, c.node, c.free
    ))
}

/// `--channel-path` names a socket libvirt creates: an absolute path.
fn rule_prepare_channel_path(_: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Prepare(p) = op else { return None };
    let path = p.channel_path.as_deref().filter(|p| !p.starts_with('/'))?;
    error(RuleId::PrepareChannelPath, format!("channel path '{path}' is not absolute"))
}

/// What `resize-memory`'s plan measured of the virtio-mem devices in scope:
/// the input of the rules on their number, the floor, block alignment,
/// capacity and a change of nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResizePlanning {
    /// Whose memory changes, in words: "the guest", "guest node 1".
    pub scope: String,
    /// How many virtio-mem devices are in scope.
    pub devices: usize,
    /// The memory in scope now, and the part of it no device in scope holds
    /// (boot memory, DIMMs, other nodes' devices).
    pub before: Bytes,
    pub fixed: Bytes,
    /// What the devices hold now, and at most.
    pub plugged: Bytes,
    pub capacity: Bytes,
    /// The devices' largest block.
    pub unit: Bytes,
    /// What the devices would hold after the change (what they hold now when
    /// the request breaks the floor).
    pub target: Bytes,
    pub floor: Option<FloorBreach>,
}

/// How a resize asks for less than virtio-mem can give back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorBreach {
    /// A total below the memory no device holds.
    BelowFixed,
    /// A shrink by more than the devices hold.
    GiveBack(Bytes),
}

/// Why the guest agent gave no facts: told apart because each has another fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentTrouble {
    /// vmplug refused to use the agent's socket (it may not lead to the
    /// guest: see `trust`); the message names the socket, owner and rule.
    Untrusted(String),
    /// There was nothing to connect to: no agent address, or no socket there.
    NoEndpoint(String),
    /// Nobody completed the handshake in time (the last error, if any).
    Unanswered(String),
}

/// Everything a rule may look at.
#[derive(Debug, Clone)]
pub struct Ctx<'a> {
    pub dom: &'a DomainFacts,
    pub host: &'a HostFacts,
    /// `None`: the agent was not reached (rules warn instead of guessing).
    pub guest: Option<&'a GuestInfo>,
    /// Why `guest` is `None`, when the agent was tried.
    pub agent_trouble: Option<&'a AgentTrouble>,
    /// The domain is active (any state but shut off).
    pub running: bool,
    pub state: DomainState,
    pub job_running: bool,
    pub affect: Affect,
    /// The caller will not wait for the guest (`--no-wait`).
    pub no_wait: bool,
}

type Rule = fn(&Ctx, &Operation) -> Option<Finding>;

fn is_x86_hotplug_machine(m: &str) -> bool {
    m == "pc" || m == "q35" || m.starts_with("pc-")
}

fn live_op(ctx: &Ctx, op: &Operation) -> bool {
    matches!(
        op,
        Operation::Vcpus { .. }
            | Operation::Memory { .. }
            | Operation::Unplug { .. }
            | Operation::Resize { .. }
            | Operation::GuestVcpus { .. }
            | Operation::VirtioMemDetach { .. }
    ) && ctx.affect.live()
}

fn rule_running(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::AddVirtioMem { .. } = op {
        (ctx.affect.live() && !ctx.running).then_some(())?;
        return error(RuleId::DomainRunning, format!("domain '{}' is not running: use --config", ctx.dom.name));
    }
    (live_op(ctx, op) && !ctx.running).then_some(())?;
    error(RuleId::DomainRunning, format!("domain '{}' is not running (shut off): a --live change needs a running domain (use --config alone to change the definition)", ctx.dom.name))
}

/// A live change, or `check`'s readiness of an active domain: the state rules
/// give their verdict at once, before any wait for a guest that cannot answer.
fn live_now(ctx: &Ctx, op: &Operation) -> bool {
    ctx.running && (live_op(ctx, op) || (matches!(op, Operation::Readiness) && ctx.affect.live()))
}

fn rule_paused(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let DomainState::Paused(why) = ctx.state else { return None };
    if why == PauseReason::Crashed || !live_now(ctx, op) {
        return None;
    }
    let name = &ctx.dom.name;
    let (cause, fix) = match why {
        PauseReason::User => ("by `virsh suspend`", format!("resume it (virsh resume {name}) first")),
        PauseReason::Migration => ("for a migration", "wait for the migration to end".into()),
        PauseReason::SaveOrSnapshot => ("for a save, dump or snapshot", "wait for it to end".into()),
        PauseReason::IoError => {
            ("by a disk I/O error", format!("fix the storage, then resume it (virsh resume {name})"))
        }
        PauseReason::Watchdog => {
            ("by its watchdog", format!("see why the guest hung, then resume it (virsh resume {name})"))
        }
        PauseReason::StartingUp => ("while starting up", "wait for it to run".into()),
        PauseReason::Crashed | PauseReason::Other => ("", format!("resume it (virsh resume {name}) first")),
    };
    let cause = if cause.is_empty() { String::new() } else { format!(" {cause}") };
    error(
        RuleId::DomainPaused,
        format!("domain '{name}' is paused{cause}: its guest runs no code, so nothing plugged now could be onlined or confirmed; {fix}"),
    )
}

fn rule_crashed(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let crashed = matches!(ctx.state, DomainState::Crashed | DomainState::Paused(PauseReason::Crashed));
    (crashed && live_now(ctx, op)).then_some(())?;
    error(
        RuleId::DomainCrashed,
        format!("domain '{}' crashed (its guest panicked and libvirt keeps it for inspection): nothing can be plugged into it; restart it (virsh destroy, then virsh start)", ctx.dom.name),
    )
}

fn rule_shutting_down(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    (ctx.state == DomainState::ShuttingDown && live_now(ctx, op)).then_some(())?;
    error(
        RuleId::DomainShuttingDown,
        format!("domain '{}' is shutting down: its guest is stopping and would not online or confirm anything; change the definition with --config, or start it again", ctx.dom.name),
    )
}

fn rule_pmsuspended(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    (ctx.state == DomainState::PmSuspended && live_now(ctx, op)).then_some(())?;
    error(
        RuleId::DomainPmsuspended,
        format!("domain '{}' is suspended by its guest (ACPI S3/S4): it runs no code until woken; wake it (virsh dompmwakeup {}) first", ctx.dom.name, ctx.dom.name),
    )
}

fn rule_job(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    (live_op(ctx, op) && ctx.job_running).then_some(())?;
    error(
        RuleId::DomainJob,
        "a migration, save or snapshot job is running: hot-plug is not supported during it; wait for the job to finish",
    )
}

/// The guest agent is needed and was not reached: a live change on a domain
/// whose guest runs (the state rules speak for the others).
fn agent_missed(ctx: &Ctx, op: &Operation) -> bool {
    // Removing an empty virtio-mem device needs nothing from the guest agent.
    live_op(ctx, op)
        && !matches!(op, Operation::VirtioMemDetach { .. })
        && ctx.running
        && ctx.state.guest_runs()
        && ctx.guest.is_none()
}

fn rule_agent_socket(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Some(AgentTrouble::Untrusted(why)) = ctx.agent_trouble else { return None };
    agent_missed(ctx, op).then_some(())?;
    let blind_ok = ctx.no_wait && !matches!(op, Operation::Unplug { .. } | Operation::GuestVcpus { .. });
    let finding: fn(RuleId, String) -> Option<Finding> = if blind_ok { warning } else { error };
    finding(
        RuleId::AgentSocket,
        format!("{why}. vmplug uses a socket only if nobody else can write it and it belongs to the user the domain runs as (its DAC <seclabel>), root, this user, or an account outside /etc/login.defs' UID_MIN..UID_MAX; the guest agent itself was not asked"),
    )
}

fn rule_agent(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if !agent_missed(ctx, op) {
        return None;
    }
    let (what, hint) = match ctx.agent_trouble {
        Some(AgentTrouble::Untrusted(_)) => return None,
        Some(AgentTrouble::NoEndpoint(e)) => (format!("there is no guest agent to talk to ({e})"), ""),
        // The link's own words: "guest agent at … did not complete a handshake within …".
        Some(AgentTrouble::Unanswered(e)) => (e.clone(), "is vmplug-guest running? "),
        None => ("the guest agent did not complete its handshake".to_string(), "is vmplug-guest running? "),
    };
    if let Operation::Unplug { .. } = op {
        return error(RuleId::AgentReady, format!("{what}: vmplug never unplugs memory the guest has not released ({hint}--force leaves it to the guest's ACPI handler)"));
    }
    if let Operation::GuestVcpus { .. } = op {
        return error(
            RuleId::AgentReady,
            format!(
                "{what}: guest-level vCPU scaling is done by the agent{}",
                if hint.is_empty() { String::new() } else { format!(" ({})", hint.trim_end()) }
            ),
        );
    }
    if ctx.no_wait {
        return warning(
            RuleId::AgentReady,
            format!("{what}: the guest's view is unknown and nothing will verify the plug"),
        );
    }
    error(
        RuleId::AgentReady,
        format!("{what}: vmplug never plugs into a guest that cannot confirm ({hint}use --no-wait to plug blind)"),
    )
}

/// The DIMMs to unplug must be there: no `--force` makes one appear.
fn rule_unplug_dimm(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Unplug { unmatched: Some(sel), .. } = op else { return None };
    let known: Vec<&str> = ctx.dom.dimms.iter().map(|d| d.alias.as_deref().unwrap_or("?")).collect();
    hard(
        RuleId::UnplugDimm,
        format!(
            "no DIMM of '{}' has {sel}; its DIMMs: {}",
            ctx.dom.name,
            if known.is_empty() { "none".into() } else { known.join(", ") }
        ),
    )
}

fn rule_unplug_live_only(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Unplug { live_only, .. } = op else { return None };
    (ctx.affect.config() && !live_only.is_empty()).then_some(())?;
    error(
        RuleId::UnplugLiveOnly,
        format!(
            "DIMM(s) {} are attached live only, not in the persistent definition: use --live",
            live_only.join(", ")
        ),
    )
}

fn rule_unplug_address(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Unplug { without_address, .. } = op else { return None };
    (ctx.affect.live() && !without_address.is_empty()).then_some(())?;
    error(
        RuleId::UnplugNoAddress,
        format!(
            "the live XML gives DIMM(s) {} no address: vmplug cannot tell the guest which blocks to release",
            without_address.join(", ")
        ),
    )
}

/// A virtio-mem device's block: QEMU's minimum is the host's transparent
/// hugepage size, and the region is whole blocks.
fn rule_vmem_block(_: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::AddVirtioMem { block, .. } = *op else { return None };
    (!block.get().is_power_of_two() || block.get() < 2 * vmplug_common::MIB).then_some(())?;
    error(RuleId::VmemBlock, format!("block size {block} must be a power of two of at least 2 MiB (QEMU's minimum is the host's transparent hugepage size)"))
}

/// A resize's planning, when there is a device to resize.
fn resizing(op: &Operation) -> Option<&ResizePlanning> {
    match op {
        Operation::Resize { plan: Some(p), .. } if p.devices > 0 => Some(p),
        _ => None,
    }
}

/// `resize-memory` needs a virtio-mem device in its scope.
fn rule_vmem_device(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Resize { node, plan: Some(p), .. } = op else { return None };
    (p.devices == 0).then_some(())?;
    let where_ = node.map_or(String::new(), |n| format!(" on guest node {n}"));
    hard(
        RuleId::VmemDevice,
        format!("'{}' has no virtio-mem device{where_}: add one with `vmplug add-virtio-mem` (or use attach-memory for DIMMs)", ctx.dom.name),
    )
}

/// virtio-mem holds only what it plugged: boot memory and DIMMs stay.
fn rule_vmem_floor(_: &Ctx, op: &Operation) -> Option<Finding> {
    let p = resizing(op)?;
    let message = match p.floor? {
        FloorBreach::BelowFixed => format!(
            "{} cannot go below {}: that is its boot memory and DIMMs, which virtio-mem does not hold",
            p.scope, p.fixed
        ),
        FloorBreach::GiveBack(d) => {
            format!("{}'s virtio-mem devices hold {}: they cannot give back {d}", p.scope, p.plugged)
        }
    };
    hard(RuleId::VmemFloor, message)
}

/// The devices can hold at most their regions.
fn rule_vmem_size(_: &Ctx, op: &Operation) -> Option<Finding> {
    let p = resizing(op)?;
    (p.target.is_multiple_of(p.unit.get()) && p.target > p.capacity).then_some(())?;
    hard(
        RuleId::VmemSize,
        format!(
            "{}'s virtio-mem devices hold at most {} ({} plugged): {} does not fit; add a device (`vmplug add-virtio-mem`) or use DIMMs",
            p.scope, p.capacity, p.plugged, p.target
        ),
    )
}

/// A resize must change something.
fn rule_vmem_plan(_: &Ctx, op: &Operation) -> Option<Finding> {
    let p = resizing(op)?;
    let fits = p.target.is_multiple_of(p.unit.get()) && p.target <= p.capacity;
    (p.floor.is_none() && fits && p.target == p.plugged).then_some(())?;
    hard(RuleId::VmemPlan, format!("{} already has {}: nothing to change", p.scope, p.before))
}

/// The devices a resize plans for: the domain's virtio-mem devices on its
/// node (every one without `--node`).
fn resize_scope<'a>(ctx: &'a Ctx, op: &Operation) -> Vec<&'a crate::xml::VirtioMem> {
    let Operation::Resize { node, .. } = *op else { return vec![] };
    ctx.dom.virtio_mems.iter().filter(|d| node.is_none() || d.node == node).collect()
}

/// The guest's agent confirms a live resize unless `--no-wait`.
fn resize_confirmed(ctx: &Ctx) -> bool {
    ctx.affect.live() && ctx.guest.is_some() && !ctx.no_wait
}

/// A live resize needs the guest's virtio_mem driver, and an agent that can
/// see it to confirm the change.
fn rule_vmem_guest_driver(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    resizing(op)?;
    let g = ctx.guest.filter(|_| ctx.affect.live())?;
    g.virtio_mem_devices.is_none().then_some(())?;
    if g.capabilities.iter().any(|c| c == "virtio-mem") {
        return error(RuleId::VmemGuestDriver, "the guest kernel's virtio_mem driver is not loaded (no /sys/bus/virtio/drivers/virtio_mem): nothing would plug or unplug; load the module (Linux 5.8+, CONFIG_VIRTIO_MEM) or use DIMMs");
    }
    if resize_confirmed(ctx) {
        return error(RuleId::VmemGuestDriver, "the guest agent predates virtio-mem support: it cannot confirm the plug; upgrade vmplug-guest (or --no-wait to resize unverified)");
    }
    warning(
        RuleId::VmemGuestDriver,
        "the guest agent predates virtio-mem support: cannot check the guest's virtio_mem driver",
    )
}

/// A device still moving toward an earlier request is planned from what it
/// holds now: said.
fn rule_vmem_settling(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    resizing(op)?;
    let moving: Vec<String> = resize_scope(ctx, op)
        .into_iter()
        .filter(|d| d.current.is_some_and(|c| c != d.requested))
        .map(|d| format!("{} still moves from {} to its requested {}", d.label(), d.plugged(), d.requested))
        .collect();
    (!moving.is_empty()).then_some(())?;
    warning(RuleId::VmemSettling, format!("{}: planned from what it holds now", moving.join("; ")))
}

/// The agent is told which blocks are a device's by its region: a confirmed
/// resize needs the live XML to place every device.
fn rule_vmem_no_address(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    resizing(op)?;
    resize_confirmed(ctx).then_some(())?;
    let unplaced: Vec<String> =
        resize_scope(ctx, op).into_iter().filter(|d| d.base.is_none()).map(|d| d.label()).collect();
    (!unplaced.is_empty()).then_some(())?;
    error(
        RuleId::VmemNoAddress,
        format!(
            "the live XML gives {} no region base: vmplug cannot tell the guest which blocks are its",
            unplaced.join(", ")
        ),
    )
}

/// A new device's size, and a resize's change, in whole blocks.
fn rule_vmem_add_align(_: &Ctx, op: &Operation) -> Option<Finding> {
    if let Some(p) = resizing(op) {
        (!p.target.is_multiple_of(p.unit.get())).then_some(())?;
        return hard(
            RuleId::VmemBlockAlign,
            format!(
                "{} is not a multiple of the devices' block size {}: use a multiple",
                Bytes(p.target.get().abs_diff(p.plugged.get())),
                p.unit
            ),
        );
    }
    let Operation::AddVirtioMem { size, block, .. } = *op else { return None };
    let b = block.get();
    // A wrong block is vmem.block's; the size is measured against a good one.
    (b.is_power_of_two() && b >= 2 * vmplug_common::MIB && (size.get() == 0 || !size.is_multiple_of(b)))
        .then_some(())?;
    error(RuleId::VmemBlockAlign, format!("size {size} is not a positive multiple of the block size {block}"))
}

/// A guest with NUMA cells: the device belongs to one of them.
fn rule_vmem_node(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::AddVirtioMem { node: None, .. } = *op else { return None };
    (!ctx.dom.cells.is_empty()).then_some(())?;
    let ids: Vec<String> = ctx.dom.cells.iter().map(|c| c.id.to_string()).collect();
    error(RuleId::VmemNode, format!("the guest has NUMA cells ({}): pass --node", ids.join(", ")))
}

fn rule_vmem_alias(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::VirtioMemDetach { alias, devices } = op else { return None };
    devices.iter().all(|d| d.alias.as_deref() != Some(alias.as_str())).then_some(())?;
    let known: Vec<String> = devices.iter().map(|d| d.label()).collect();
    error(
        RuleId::VmemAlias,
        format!(
            "no virtio-mem device of '{}' has alias {alias}; its virtio-mem devices: {}",
            ctx.dom.name,
            if known.is_empty() { "none".into() } else { known.join(", ") }
        ),
    )
}

/// QEMU refuses to unplug a virtio-mem device that still holds memory, and the
/// guest must release that memory first: `resize-memory` does it, verified.
fn rule_vmem_plugged(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::VirtioMemDetach { alias, devices } = op else { return None };
    let d = devices.iter().find(|d| d.alias.as_deref() == Some(alias.as_str()))?;
    (d.plugged().get() > 0 || d.requested.get() > 0).then_some(())?;
    let node = d.node.map_or(String::new(), |n| format!(" --node {n}"));
    let how = if d.plugged().get() > 0 {
        format!("`vmplug resize-memory {} -{}{node}`", ctx.dom.name, d.plugged())
    } else {
        "resize-memory (its requested size is not 0 yet)".to_string()
    };
    error(
        RuleId::VmemPlugged,
        format!(
            "{alias} still holds {} (requested {}): resize-memory it to 0 first, so the guest releases the memory ({how}), then detach it",
            d.plugged(),
            d.requested
        ),
    )
}

fn rule_cpu_machine(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::Prepare(_) = op {
        let why = machine_cannot_hotplug(ctx)?;
        let f = ctx.dom;
        return error(RuleId::CpuMachine, format!("machine '{}' ({}) cannot hot-plug: {why}", f.machine, f.arch));
    }
    let Operation::Vcpus { .. } = op else { return None };
    let (arch, m) = (ctx.dom.arch.as_str(), ctx.dom.machine.as_str());
    match arch {
        "x86_64" | "i686" if is_x86_hotplug_machine(m) => None,
        "aarch64" if m != "virt" && !m.starts_with("virt-") => {
            error(RuleId::CpuMachine, format!("machine '{m}' is not an aarch64 'virt' machine; vCPU hot-plug needs virt-4.1 or newer"))
        }
        // What this QEMU says about the machine decides; the version only speaks
        // when QEMU could not be asked (a remote host).
        // The persistent definition needs no hot-plug.
        "aarch64" if !ctx.affect.live() => None,
        "aarch64" => match ctx.host.cpu_hotplug {
            Some(true) => None,
            Some(false) => error(
                RuleId::CpuMachine,
                format!("this host's QEMU cannot hot-plug vCPUs on machine '{m}' (query-machines: hotpluggable-cpus=false; upstream QEMU has no aarch64 vCPU hot-plug, openEuler's has); scale inside the guest instead: `vmplug setvcpus --guest` onlines and offlines vCPUs defined at boot"),
            ),
            None => match machine_version(m, "virt") {
                Some(v) if v < (4, 1) => error(RuleId::CpuMachine, format!("machine '{m}' cannot hot-plug vCPUs: the guide requires virt-4.1 or newer")),
                _ => warning(
                    RuleId::CpuMachine,
                    "QEMU could not be asked whether it hot-plugs aarch64 vCPUs (a remote host): openEuler's does, upstream QEMU does not (libvirt then refuses with 'cpu hotplug is not supported'); `vmplug setvcpus --guest` works on both",
                ),
            },
        },
        _ => error(RuleId::CpuMachine, format!("machine '{m}' ({arch}) is not known to hot-plug vCPUs (x86: pc or q35; aarch64: virt-4.1+)")),
    }
}

fn rule_cpu_placement(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if !matches!(op, Operation::Vcpus { .. } | Operation::Readiness) {
        return None;
    }
    (ctx.dom.vcpu_placement != "static").then_some(())?;
    error(
        RuleId::CpuPlacement,
        format!("<vcpu placement='{}'> must be 'static' for CPU hot-plug", ctx.dom.vcpu_placement),
    )
}

fn rule_cpu_max(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::Prepare(p) = op {
        let (max, current) = (p.max_vcpus, p.current);
        if max > MAX_VCPUS {
            return error(RuleId::CpuMax, format!("{max} vCPUs requested: at most {MAX_VCPUS} (KVM's most per VM)"));
        }
        (max < current).then_some(())?;
        return error(RuleId::CpuMax, format!("{max} vCPUs is below the {current} the domain has now"));
    }
    if let Operation::Prepared = op {
        (ctx.dom.vcpus_max <= ctx.dom.vcpus_current).then_some(())?;
        return warning(
            RuleId::CpuMax,
            format!(
                "max vCPUs equals the current {}: no vCPU can be hot-plugged; pass --max-vcpus",
                ctx.dom.vcpus_current
            ),
        );
    }
    let Operation::Vcpus { target } = *op else { return None };
    if target == 0 {
        return error(RuleId::CpuMax, "a domain needs at least one vCPU");
    }
    (target > ctx.dom.vcpus_max).then_some(())?;
    error(
        RuleId::CpuMax,
        format!("{target} vCPUs exceeds the domain's maximum of {} (<vcpu current='m'>n</vcpu>: raise n with `vmplug prepare`, which takes effect at the next boot)", ctx.dom.vcpus_max),
    )
}

fn rule_cpu_hypervisor_max(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Vcpus { target } = *op else { return None };
    let max = ctx.host.max_vcpus?;
    (target > max).then_some(())?;
    error(
        RuleId::CpuHypervisorMax,
        format!("{target} vCPUs exceeds the hypervisor's maximum of {max} for machine '{}'", ctx.dom.machine),
    )
}

fn rule_cpu_guest_possible(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Vcpus { target } = *op else { return None };
    if !ctx.affect.live() {
        return None;
    }
    match ctx.guest {
        Some(g) if target as usize > g.cpus.possible.len() => error(
            RuleId::CpuGuestPossible,
            format!("the guest kernel supports {} CPUs (/sys/devices/system/cpu/possible = {}); {target} cannot come online", g.cpus.possible.len(), g.cpus.possible),
        ),
        Some(g) if g.acpi_cpu_hotplug == Some(false) => error(RuleId::CpuGuestAcpi, "the guest kernel has no ACPI processor hot-plug: a new vCPU would never appear in it"),
        None if ctx.running => warning(RuleId::CpuGuestPossible, "guest facts unknown (no agent): cannot check the guest kernel's possible CPUs"),
        _ => None,
    }
}

/// `setvcpus --guest` moves CPUs between online and offline inside the guest:
/// only among the vCPUs the guest has (present), never past them.
fn rule_cpu_guest_present(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::GuestVcpus { target } = *op else { return None };
    if target == 0 {
        return error(RuleId::CpuGuestPresent, "a guest needs at least one CPU online");
    }
    let g = ctx.guest?;
    let present = g.cpus.present.len() as u32;
    (target > present).then_some(())?;
    error(
        RuleId::CpuGuestPresent,
        format!("the guest has {present} vCPU(s) present ({}): --guest scales only among them; define more at boot (<vcpu>N</vcpu>, the surplus kept offline with the kernel's maxcpus=) or hot-plug them where the machine can (setvcpus without --guest)", g.cpus.present),
    )
}

fn rule_cpu_cores(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::Prepare(p) = op {
        (!p.max_vcpus.is_multiple_of(p.per_socket)).then_some(())?;
        return error(
            RuleId::CpuCoresMultiple,
            format!("{} vCPUs is not a multiple of the topology's {} vCPUs per socket", p.max_vcpus, p.per_socket),
        );
    }
    let Operation::Vcpus { target } = *op else { return None };
    let per = ctx.dom.topology.as_ref()?.per_socket();
    let delta = target.abs_diff(ctx.dom.vcpus_current);
    (delta % per != 0).then_some(())?;
    warning(
        RuleId::CpuCoresMultiple,
        format!("changing by {delta} vCPUs is not a multiple of the topology's {per} vCPUs per socket: the guest may see a confused topology; use a multiple of {per}"),
    )
}

fn rule_cpu_socket_cell(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::Prepare(p) = op {
        if p.cells > MAX_CELLS {
            return error(
                RuleId::CpuSocketCell,
                format!("{} guest NUMA cells requested: at most {MAX_CELLS} (QEMU's most)", p.cells),
            );
        }
        // Sockets that are not whole are cpu.cores-multiple's to say.
        let sockets = p.max_vcpus / p.per_socket;
        (p.max_vcpus.is_multiple_of(p.per_socket) && (p.cells == 0 || p.cells > sockets)).then_some(())?;
        return error(
            RuleId::CpuSocketCell,
            format!("{} guest NUMA cells for {sockets} sockets: every cell needs at least one whole socket", p.cells),
        );
    }
    if !matches!(op, Operation::Vcpus { .. } | Operation::Readiness) || ctx.dom.cells.is_empty() {
        return None;
    }
    let per = ctx.dom.topology.as_ref().map(|t| t.per_socket()).unwrap_or(1);
    for socket in 0..ctx.dom.vcpus_max.div_ceil(per) {
        let vcpus: Vec<u32> = (socket * per..((socket + 1) * per).min(ctx.dom.vcpus_max)).collect();
        let cells: std::collections::BTreeSet<Option<u32>> =
            vcpus.iter().map(|v| ctx.dom.cell_of_vcpu(*v).map(|c| c.id)).collect();
        if cells.len() > 1 {
            let names: Vec<String> = cells.iter().map(|c| c.map_or("none".to_string(), |c| c.to_string())).collect();
            return error(
                RuleId::CpuSocketCell,
                format!("socket {socket} (vCPUs {}) spans guest NUMA cells {}: the guide warns this can soft-lockup the guest after a CPU hot-plug; put each socket's vCPUs in one <cell>", vcpus.iter().copied().collect::<CpuSet>(), names.join(", ")),
            );
        }
    }
    None
}

fn rule_persist(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if !matches!(op, Operation::Vcpus { .. } | Operation::Memory { .. } | Operation::Resize { .. }) {
        return None;
    }
    (ctx.affect == Affect::Live).then_some(())?;
    warning(RuleId::PersistLiveOnly, "a --live change is lost when the domain restarts; add --config to keep it")
}

fn rule_persist_guest(_ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::GuestVcpus { .. } = op else { return None };
    warning(RuleId::PersistGuestLevel, "a guest-level change lasts until the guest reboots: the kernel then brings up its boot CPUs (all, or maxcpus= of them) and the agent onlines no more than that")
}

fn rule_mem_machine(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { .. } = op else { return None };
    let (arch, m) = (ctx.dom.arch.as_str(), ctx.dom.machine.as_str());
    match arch {
        "x86_64" | "i686" if is_x86_hotplug_machine(m) => None,
        "aarch64" => {
            let newest = ctx
                .host
                .newest_versioned("virt")
                .map_or(String::new(), |n| format!("; use {n}, the newest this host's QEMU offers"));
            match machine_version(m, "virt") {
                Some(v) if v < (4, 1) => error(RuleId::MemMachine, format!("machine '{m}' cannot hot-plug memory: the guide requires virt-4.1 or newer{newest}")),
                // Upstream QEMU adds the ACPI GED device (which DIMMs need) from
                // virt-4.2; openEuler's also to its virt-4.1, with its vCPU
                // hot-plug, which is how its QEMU is told from upstream here.
                Some(v) if v < (4, 2) => match ctx.host.cpu_hotplug {
                    Some(false) => error(RuleId::MemMachine, format!("machine '{m}' has no ACPI GED device in this host's QEMU (upstream QEMU adds it from virt-4.2; only openEuler's QEMU hot-plugs on virt-4.1): QEMU would refuse the DIMM with 'missing acpi-ged device'{newest}")),
                    _ => warning(RuleId::MemMachine, format!("machine '{m}': upstream QEMU needs virt-4.2 or newer for memory hot-plug (the ACPI GED device); only openEuler's QEMU accepts virt-4.1{newest}")),
                },
                _ if m == "virt" || m.starts_with("virt-") => None,
                _ => error(RuleId::MemMachine, format!("machine '{m}' is not an aarch64 'virt' machine")),
            }
        }
        _ => error(RuleId::MemMachine, format!("machine '{m}' ({arch}) is not known to hot-plug memory")),
    }
}

/// Most hot-added memory the guest's virtio-mem driver keeps offline: it adds
/// memory blocks until this much waits to be onlined, then waits (Linux's
/// `VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD`; measured in tests/tests/virtio_mem.rs).
/// A virtio-mem growth of any size therefore arrives in steps of at most this,
/// each onlined (by the agent or the kernel) before the next.
pub const VIRTIO_MEM_OFFLINE_STEP: u64 = 1 << 30;

fn rule_mem_guest(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let (size, virtio) = match *op {
        Operation::Memory { first_wave, .. } => (first_wave, false),
        Operation::Resize { grow, .. } => (grow, true),
        _ => return None,
    };
    if !ctx.affect.live() {
        return None;
    }
    let g = ctx.guest?;
    if g.memory.is_none() {
        return error(
            RuleId::MemGuestKernel,
            "the guest kernel has no memory hot-plug (/sys/devices/system/memory is absent)",
        );
    }
    // virtio-mem needs no ACPI: the device itself tells the guest.
    if !virtio && g.acpi_memory_hotplug == Some(false) {
        return error(RuleId::MemGuestAcpi, "the guest kernel has no ACPI memory hot-plug (no /sys/firmware/acpi/hotplug/memory; Debian's and Ubuntu's arm64 kernels are built without CONFIG_ACPI_HOTPLUG_MEMORY): the DIMM would attach but the guest would never see it; use virtio-mem instead (`vmplug add-virtio-mem`, then `vmplug resize-memory`), which needs no ACPI");
    }
    // With memmap_on_memory the new memory carries its own page structures.
    if !virtio && g.memmap_on_memory == Some(true) {
        return None;
    }
    // virtio-mem: the driver's own step is what needs a memory map at once.
    let size = if virtio { Bytes(size.get().min(VIRTIO_MEM_OFFLINE_STEP)) } else { size };
    (size.get() > g.mem_available.get().saturating_mul(32)).then_some(())?;
    let what = if virtio {
        format!("the virtio-mem driver's step, {size} (it adds at most that offline, and waits for it to be onlined before adding more),")
    } else {
        format!("its first wave, {size} (vmplug plugs DIMMs in waves of at most 32× what the guest has available, onlining each before the next)")
    };
    let fix = if virtio {
        "free memory in the guest first"
    } else {
        "free memory in the guest first, or plug smaller DIMMs (--max-dimm)"
    };
    error(
        RuleId::MemGuestFree,
        format!(
            "the guest has {} available but {what} needs at least {} (1/32 of it) for its memory map; {fix}",
            g.mem_available,
            Bytes(size.get().div_ceil(32))
        ),
    )
}

fn rule_mem_maxmemory(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::Prepare(p) = op {
        (p.max_memory < ctx.dom.memory).then_some(())?;
        return error(
            RuleId::MemMaxMemory,
            format!("max memory {} is below the current memory {}", p.max_memory, ctx.dom.memory),
        );
    }
    if let Operation::AddVirtioMem { .. } = op {
        ctx.dom.max_memory.is_none().then_some(())?;
        return error(
            RuleId::MemMaxMemory,
            "no <maxMemory>: a memory device needs room reserved at creation (`vmplug prepare`)",
        );
    }
    if !matches!(op, Operation::Memory { .. } | Operation::Readiness) {
        return None;
    }
    ctx.dom.max_memory.is_none().then_some(())?;
    error(
        RuleId::MemMaxMemory,
        "no <maxMemory slots='…'>: memory hot-plug needs slots reserved at creation (`vmplug prepare`)",
    )
}

fn rule_mem_slots(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::Prepare(p) = op {
        return match p.slots {
            0 => error(
                RuleId::MemSlots,
                format!("0 memory slots: memory hot-plug needs at least one (the guide allows up to {MAX_SLOTS})"),
            ),
            n if n > MAX_SLOTS => {
                error(RuleId::MemSlots, format!("{n} memory slots requested: the guide allows at most {MAX_SLOTS}"))
            }
            _ => None,
        };
    }
    if let Operation::Memory { plan: DimmPlanning { error: Some(e @ PlanError::NoSlots { .. }), .. }, .. } = op {
        return hard(RuleId::MemSlots, e.to_string());
    }
    if let Operation::Prepared = op {
        let (f, usable) = (ctx.dom, 64u32.saturating_sub(ctx.dom.virtio_nets));
        let slots = f.slots.filter(|&s| s > usable)?;
        return error(RuleId::MemSlots, format!("{slots} memory slots, but only {usable} are usable (64 − {} virtio-net device(s)): pass --slots {usable} or fewer", f.virtio_nets));
    }
    let Operation::Memory { dimms, .. } = *op else { return None };
    ctx.dom.max_memory?;
    let free = ctx.dom.free_slots();
    (dimms > free).then_some(())?;
    error(
        RuleId::MemSlots,
        format!(
            "{dimms} DIMM(s) needed, {free} slot(s) free (min(slots {}, 64 − {} virtio-net) − {} DIMMs present)",
            ctx.dom.slots.unwrap_or(0),
            ctx.dom.virtio_nets,
            ctx.dom.dimms.len()
        ),
    )
}

fn rule_mem_headroom(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::AddVirtioMem { size, .. } = *op {
        let max = ctx.dom.max_memory?;
        (size > ctx.dom.memory_headroom()).then_some(())?;
        return error(
            RuleId::MemMaxSize,
            format!(
                "{} + {size} exceeds <maxMemory> {max} (<memory> counts every device's whole region)",
                ctx.dom.memory
            ),
        );
    }
    let Operation::Memory { size, .. } = *op else { return None };
    let max = ctx.dom.max_memory?;
    (size > ctx.dom.memory_headroom()).then_some(())?;
    error(RuleId::MemMaxSize, format!("{} + {size} exceeds <maxMemory> {max}", ctx.dom.memory))
}

fn rule_mem_numa(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::Memory { plan: DimmPlanning { error: Some(e @ PlanError::NoCells), .. }, .. } = op {
        return hard(RuleId::MemNuma, e.to_string());
    }
    if !matches!(op, Operation::Memory { .. } | Operation::Readiness) {
        return None;
    }
    ctx.dom.cells.is_empty().then_some(())?;
    error(RuleId::MemNuma, "no guest NUMA (<cpu><numa><cell …/>): memory hot-plug depends on it; add cells with `vmplug prepare --cells N`")
}

fn rule_mem_node(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::Memory { plan: DimmPlanning { error: Some(e @ PlanError::NoSuchNode(..)), .. }, .. } = op {
        return hard(RuleId::MemNode, e.to_string());
    }
    if let Operation::AddVirtioMem { node: Some(n), .. } = *op {
        return match ctx.dom.cells.is_empty() {
            true => error(
                RuleId::MemNode,
                format!("the guest has no NUMA cells: node {n} does not exist (leave out --node)"),
            ),
            false if !ctx.dom.cells.iter().any(|c| c.id == n) => {
                error(RuleId::MemNode, format!("guest NUMA node {n} does not exist"))
            }
            false => None,
        };
    }
    let (Operation::Memory { node: Some(n), .. } | Operation::Resize { node: Some(n), .. }) = *op else { return None };
    // A node without devices is vmem.device's to say.
    if let Operation::Resize { plan: Some(ResizePlanning { devices: 0, .. }), .. } = op {
        return None;
    }
    if ctx.dom.cells.is_empty() || ctx.dom.cells.iter().any(|c| c.id == n) {
        return None;
    }
    let ids: Vec<String> = ctx.dom.cells.iter().map(|c| c.id.to_string()).collect();
    error(RuleId::MemNode, format!("guest NUMA node {n} does not exist (cells: {})", ids.join(", ")))
}

/// The guest kernel must know the node the memory is meant for: where its NUMA
/// set-up failed (Debian 6.1 arm64 under UEFI falls back to one node), memory
/// plugged for node 1 lands on node 0.
fn rule_mem_guest_node(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let targets: Vec<u32> = match *op {
        Operation::Memory { node: Some(n), .. } | Operation::Resize { node: Some(n), .. } => vec![n],
        Operation::Memory { node: None, .. } => ctx.dom.cells.iter().map(|c| c.id).collect(),
        Operation::Resize { node: None, .. } => ctx.dom.virtio_mems.iter().filter_map(|d| d.node).collect(),
        _ => return None,
    };
    let possible = ctx.guest?.numa_possible.as_ref()?;
    if !ctx.affect.live() {
        return None;
    }
    let missing: CpuSet = targets.iter().copied().filter(|n| !possible.contains(*n)).collect();
    (!missing.is_empty()).then_some(())?;
    error(
        RuleId::MemGuestNode,
        format!("guest NUMA node(s) {missing} do not exist in the guest kernel (/sys/devices/system/node/possible = {possible}; its NUMA set-up failed or was turned off): the memory would land on another node; fix the guest's NUMA (dmesg | grep NUMA) or plug with --node {}", possible.iter().next().unwrap_or(0)),
    )
}

fn rule_mem_block_align(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { size, ref plan, .. } = *op else { return None };
    if let Some(e @ PlanError::Misaligned { .. }) = &plan.error {
        return hard(RuleId::MemBlockAlign, e.to_string());
    }
    match ctx.guest.and_then(|g| g.memory.as_ref()) {
        Some(m) if !size.is_multiple_of(m.block_size.get()) => error(
            RuleId::MemBlockAlign,
            format!("{size} is not a multiple of the guest's memory block size {} (block_size_bytes): the guest would reject the DIMM and every DIMM after it; use a multiple or --round-up", m.block_size.bytes()),
        ),
        None if ctx.guest.is_none() => warning(RuleId::MemBlockAlign, "guest facts unknown (no agent): cannot check the size against the guest's block_size_bytes"),
        _ => None,
    }
}

/// Rounding a misaligned size up (`--round-up`): said, and refused past the
/// request's ceiling.
fn rule_mem_round_up(_: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { ref plan, .. } = *op else { return None };
    if let Some(e @ PlanError::RoundUpTooFar { .. }) = &plan.error {
        return hard(RuleId::MemRoundUp, e.to_string());
    }
    let from = plan.rounded_from?;
    warning(RuleId::MemRoundUp, format!("{from} rounded up to {} (alignment {})", plan.total, plan.unit))
}

/// DIMMs are cut in the alignment unit: one larger than `--max-dimm` cannot be made.
fn rule_mem_max_dimm(_: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { plan: DimmPlanning { error: Some(e @ PlanError::UnitOverMaxDimm { .. }), .. }, .. } = op
    else {
        return None;
    };
    hard(RuleId::MemMaxDimm, e.to_string())
}

/// The plan must attach something.
fn rule_mem_plan(_: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { ref plan, .. } = *op else { return None };
    if let Some(e @ PlanError::Zero) = &plan.error {
        return hard(RuleId::MemPlan, e.to_string());
    }
    plan.empty.then_some(())?;
    hard(
        RuleId::MemPlan,
        format!(
            "{} makes no DIMM (libvirt sizes DIMMs in whole MiB and the guest in blocks): nothing would be attached",
            plan.total
        ),
    )
}

/// A request id names one request: repeating it with a smaller size would
/// have to detach what it attached.
fn rule_mem_request_id(_: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { ref plan, .. } = *op else { return None };
    (plan.already > plan.total).then_some(())?;
    hard(
        RuleId::MemRequestId,
        format!(
            "request {} already attached {}, more than the {} asked now: repeat it with its own size, or use a new --request-id",
            plan.request_id, plan.already, plan.total
        ),
    )
}

fn rule_mem_hugepages(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { size, .. } = *op else { return None };
    let hp = ctx.dom.hugepage_size?;
    (!size.is_multiple_of(hp.get())).then_some(())?;
    error(
        RuleId::MemHugepageAlign,
        format!("hugepages of {hp} back this guest: {size} is not a multiple of the hugepage size"),
    )
}

fn rule_mem_vhost_user(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if !matches!(op, Operation::Memory { .. } | Operation::Readiness) {
        return None;
    }
    let dev = ctx.dom.vhost_user_devices.iter().find(|d| !d.contains("vhost-user-vsock"))?;
    error(RuleId::MemVhostUser, format!("a vhost-user device is configured ({dev}): the guide says vhost-user devices and memory hot-plug exclude each other"))
}

fn rule_mem_linux_4g(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { .. } = op else { return None };
    if ctx.dom.os_is_windows || ctx.dom.boot_memory().get() >= 4 * GIB {
        return None;
    }
    warning(
        RuleId::MemLinux4g,
        format!(
            "initial memory is {}: the guide asks Linux guests to start with at least 4 GiB before memory hot-plug",
            ctx.dom.boot_memory()
        ),
    )
}

fn rule_mem_windows_node0(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { node, .. } = *op else { return None };
    if !ctx.dom.os_is_windows || !ctx.dom.dimms.is_empty() || node == Some(0) {
        return None;
    }
    error(
        RuleId::MemWindowsNode0,
        "Windows guests see hot-plugged memory only if the first DIMM goes to guest NUMA node 0: pass --node 0",
    )
}

fn rule_shares(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Shares(n) = *op else { return None };
    let (lo, hi, v) = match ctx.host.cgroup_v2 {
        Some(true) => (1, 10_000, "v2 (cpu.weight)"),
        Some(false) => (2, 262_144, "v1 (cpu.shares)"),
        None => return None,
    };
    (n < lo || n > hi).then_some(())?;
    error(
        RuleId::SchedSharesRange,
        format!("cpu_shares={n} is outside {lo}..={hi}, the range of the host's cgroup {v}"),
    )
}

fn rule_pin(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Pin { vcpu, cpus } = op else { return None };
    if cpus.is_empty() {
        return error(RuleId::PinHostCpus, "an empty cpuset would leave nothing to run on");
    }
    if let Some(v) = vcpu {
        if *v >= ctx.dom.vcpus_max {
            return error(
                RuleId::PinVcpu,
                format!("vCPU {v} does not exist (the domain has {} at most)", ctx.dom.vcpus_max),
            );
        }
    }
    let host = ctx.host.all_cpus();
    (ctx.host.cpus > 0 && !cpus.is_subset(&host)).then_some(())?;
    error(
        RuleId::PinHostCpus,
        format!(
            "cpuset {cpus} includes CPUs {} that the host does not have (host CPUs: {host})",
            cpus.difference(&host)
        ),
    )
}

fn rule_numatune(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if let Operation::Prepare(p) = op {
        if let Some(why) = host_nodes_problem(ctx, p) {
            return error(RuleId::NumatuneNodes, why);
        }
        return error(RuleId::NumatuneStrictFree, strict_problem(p)?);
    }
    let Operation::Numatune { mode, nodeset } = op else { return None };
    let set = nodeset.as_ref()?;
    if set.is_empty() {
        return error(
            RuleId::NumatuneNodes,
            "the nodeset is empty (an exclusion such as '^1' alone names no node): give the nodes to use",
        );
    }
    let nodes: CpuSet = ctx.host.nodes.iter().map(|n| n.id).collect();
    if !set.is_subset(&nodes) {
        return error(
            RuleId::NumatuneNodes,
            format!(
                "nodeset {set} names host nodes {} that do not exist (host nodes: {nodes})",
                set.difference(&nodes)
            ),
        );
    }
    if mode.unwrap_or(NumaMode::Strict) == NumaMode::Strict {
        let free: u64 = set.iter().filter_map(|n| ctx.host.free_on(n)).map(|b| b.get()).sum();
        if !ctx.host.free.is_empty() && free < ctx.dom.memory.get() && !ctx.running {
            return error(
                RuleId::NumatuneStrictFree,
                format!("strict binding to node(s) {set} with {} free cannot hold the guest's {}: the guest would fail to start", Bytes(free), ctx.dom.memory),
            );
        }
    }
    None
}

fn rule_cell_pinning(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if !matches!(op, Operation::Readiness) {
        return None;
    }
    for cell in &ctx.dom.cells {
        let Some((_, nodeset)) = ctx.dom.memnodes.get(&cell.id) else { continue };
        let node_cpus =
            nodeset.iter().filter_map(|n| ctx.host.node(n)).fold(CpuSet::new(), |acc, n| acc.union(&n.cpus));
        for v in cell.cpus.iter() {
            if let Some(pin) = ctx.dom.vcpupins.get(&v) {
                if !pin.is_subset(&node_cpus) {
                    return warning(
                        RuleId::NumaCellPinning,
                        format!("guest cell {} has its memory on host node(s) {nodeset} but vCPU {v} is pinned to {pin}: pin the cell's vCPUs to {node_cpus} to avoid remote memory access", cell.id),
                    );
                }
            }
        }
    }
    None
}

/// Every rule, in report order.
pub const RULES: &[(RuleId, Rule)] = &[
    (RuleId::DomainRunning, rule_running),
    (RuleId::DomainPaused, rule_paused),
    (RuleId::DomainCrashed, rule_crashed),
    (RuleId::DomainShuttingDown, rule_shutting_down),
    (RuleId::DomainPmsuspended, rule_pmsuspended),
    (RuleId::DomainJob, rule_job),
    (RuleId::AgentSocket, rule_agent_socket),
    (RuleId::AgentReady, rule_agent),
    (RuleId::CpuMachine, rule_cpu_machine),
    (RuleId::CpuGuestPresent, rule_cpu_guest_present),
    (RuleId::PersistGuestLevel, rule_persist_guest),
    (RuleId::CpuPlacement, rule_cpu_placement),
    (RuleId::CpuMax, rule_cpu_max),
    (RuleId::CpuHypervisorMax, rule_cpu_hypervisor_max),
    (RuleId::CpuGuestPossible, rule_cpu_guest_possible),
    (RuleId::CpuCoresMultiple, rule_cpu_cores),
    (RuleId::CpuSocketCell, rule_cpu_socket_cell),
    (RuleId::PersistLiveOnly, rule_persist),
    (RuleId::MemMachine, rule_mem_machine),
    (RuleId::MemGuest, rule_mem_guest),
    (RuleId::MemMaxMemory, rule_mem_maxmemory),
    (RuleId::MemRequestId, rule_mem_request_id),
    (RuleId::MemSlots, rule_mem_slots),
    (RuleId::MemMaxSize, rule_mem_headroom),
    (RuleId::MemNuma, rule_mem_numa),
    (RuleId::MemNode, rule_mem_node),
    (RuleId::MemGuestNode, rule_mem_guest_node),
    (RuleId::MemBlockAlign, rule_mem_block_align),
    (RuleId::MemRoundUp, rule_mem_round_up),
    (RuleId::MemMaxDimm, rule_mem_max_dimm),
    (RuleId::MemPlan, rule_mem_plan),
    (RuleId::MemHugepageAlign, rule_mem_hugepages),
    (RuleId::MemVhostUser, rule_mem_vhost_user),
    (RuleId::MemLinux4g, rule_mem_linux_4g),
    (RuleId::MemWindowsNode0, rule_mem_windows_node0),
    (RuleId::UnplugDimm, rule_unplug_dimm),
    (RuleId::UnplugLiveOnly, rule_unplug_live_only),
    (RuleId::UnplugNoAddress, rule_unplug_address),
    (RuleId::VmemDevice, rule_vmem_device),
    (RuleId::VmemFloor, rule_vmem_floor),
    (RuleId::VmemBlock, rule_vmem_block),
    (RuleId::VmemBlockAlign, rule_vmem_add_align),
    (RuleId::VmemSize, rule_vmem_size),
    (RuleId::VmemPlan, rule_vmem_plan),
    (RuleId::VmemGuestDriver, rule_vmem_guest_driver),
    (RuleId::VmemSettling, rule_vmem_settling),
    (RuleId::VmemNoAddress, rule_vmem_no_address),
    (RuleId::VmemNode, rule_vmem_node),
    (RuleId::VmemAlias, rule_vmem_alias),
    (RuleId::VmemPlugged, rule_vmem_plugged),
    (RuleId::SchedSharesRange, rule_shares),
    (RuleId::PinHostCpus, rule_pin),
    (RuleId::Numatune, rule_numatune),
    (RuleId::NumaCellPinning, rule_cell_pinning),
    (RuleId::PrepareChannelPath, rule_prepare_channel_path),
];

/// Runs every rule; errors first, the hard ones leading.
pub fn check(ctx: &Ctx, op: &Operation) -> Vec<Finding> {
    let mut out: Vec<Finding> = RULES.iter().filter_map(|(_, rule)| rule(ctx, op)).collect();
    out.sort_by_key(|f| (std::cmp::Reverse(f.severity), !f.hard));
    out
}

pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
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

/// A shrink or unplug of `shrink` when the guest's forecast says `what` can
/// release only `can` now (`held`: the guest's reasons): refused, since the
/// guest would stall on it; `--force` tries anyway. The one emitter of
/// `mem.forecast`, for virtio-mem shrinks and DIMM unplugs alike.
pub fn forecast_refusal(
    what: &str,
    can: vmplug_common::Bytes,
    shrink: vmplug_common::Bytes,
    held: &[String],
) -> Finding {
    let why = if held.is_empty() { String::new() } else { format!(" ({})", held.join("; ")) };
    Finding::error(
        RuleId::MemForecast,
        format!("{what} can release {can} now by the guest's forecast{why}: a shrink of {shrink} would stall; --force to try anyway"),
    )
}

/// The guest refused to give back memory below a floor of its own
/// (`guest.toml`), with its reason: a refusal no `--force` overrides. The one
/// emitter of `guest.veto`, for virtio-mem shrinks and DIMM unplugs alike.
pub fn guest_veto(reason: &str) -> Finding {
    Finding::error(RuleId::GuestVeto, reason.to_string())
}

/// Errors refuse, unless forced — except hard findings (and `hard`, found
/// outside the rules), which no `--force` overrides (there would be nothing to
/// do, or it would widen the request).
pub fn gate(findings: Vec<Finding>, force: bool, hard: Vec<Finding>) -> Result<Vec<Finding>, NotPlanned> {
    if hard.is_empty() && !findings.iter().any(|f| f.hard) && (force || !has_errors(&findings)) {
        let mut findings = findings;
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        return Ok(findings);
    }
    Err(refuse(findings, hard))
}

/// Every finding, errors first and among them the hard ones.
pub(crate) fn refuse(mut findings: Vec<Finding>, hard: Vec<Finding>) -> NotPlanned {
    findings.splice(0..0, hard.into_iter().map(|f| Finding { hard: true, ..f }));
    findings.sort_by_key(|f| (std::cmp::Reverse(f.severity), !f.hard));
    let errors: Vec<&Finding> = findings.iter().filter(|f| f.severity == Severity::Error).collect();
    let agent_unreachable = !errors.is_empty() && errors.iter().all(|f| f.id == RuleId::AgentReady.id());
    NotPlanned::Refused(Refusal { findings, agent_unreachable })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_id_is_spelled_once_and_names_its_rule() {
        let mut seen = std::collections::BTreeSet::new();
        for r in RuleId::ALL {
            assert!(seen.insert(r.id()), "{} twice in the table", r.id());
            assert_eq!(RuleId::from_id(r.id()), Some(*r));
            assert_eq!(r.to_string(), r.id());
        }
        assert_eq!(RuleId::from_id("no.such-rule"), None);
        for (rule, _) in RULES {
            assert!(RuleId::ALL.contains(rule));
        }
    }

    /// Production code names a rule by its variant: an id written as a string
    /// anywhere but the table could drift from it unnoticed.
    #[test]
    fn no_rule_id_is_written_as_a_string_outside_the_table() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut stack = vec![src];
        let mut found = vec![];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("source directory") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("source file");
                // Test modules (here and elsewhere) assert on the strings themselves.
                let code = text.split("\n#[cfg(test)]\nmod tests").next().unwrap_or_default();
                for (n, line) in code.lines().enumerate() {
                    if line.trim_start().starts_with("//") || path.ends_with("preflight.rs") && line.contains(" = \"") {
                        continue;
                    }
                    // `numatune` is also an element and a verb; autoscale's policy keys
                    // (`cpu.max`) share the rules' style without being rules.
                    for r in RuleId::ALL.iter().filter(|r| r.id().contains('.')) {
                        if !path.components().any(|c| c.as_os_str() == "autoscale")
                            && line.contains(&format!("\"{}\"", r.id()))
                        {
                            found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                        }
                    }
                }
            }
        }
        assert!(found.is_empty(), "rule ids written as strings:\n{}", found.join("\n"));
    }

    /// Every source file of the crate with its production code (test modules cut).
    fn production_sources() -> Vec<(String, String)> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let (mut stack, mut out) = (vec![src.clone()], vec![]);
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("source directory") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).expect("source file");
                    let code = text.split("\n#[cfg(test)]\nmod tests").next().unwrap_or_default().to_string();
                    let rel = path.strip_prefix(&src).unwrap_or(&path).display().to_string();
                    out.push((rel, code));
                }
            }
        }
        out
    }

    /// Where each rule id is emitted: `file::fn` of every `error(RuleId::X`,
    /// `warning(RuleId::X`, `id: RuleId::X` and `=> RuleId::X` (an error
    /// type's rule), by the function around it.
    fn emitters() -> std::collections::BTreeMap<&'static str, std::collections::BTreeSet<String>> {
        let mut out: std::collections::BTreeMap<&'static str, std::collections::BTreeSet<String>> = Default::default();
        for (file, code) in production_sources() {
            for (at, _) in code.match_indices("RuleId::") {
                let before = code[..at].trim_end();
                if !["error(", "warning(", "id:", "=>"].iter().any(|p| before.ends_with(p)) {
                    continue;
                }
                let name: String =
                    code[at + 8..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let Some(rule) = RuleId::ALL.iter().find(|r| format!("{r:?}") == name) else { continue };
                let func = before
                    .rfind("fn ")
                    .map(|f| before[f + 3..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
                    .unwrap_or_else(|| "?".to_string());
                out.entry(rule.id()).or_default().insert(format!("{file}::{func}"));
            }
        }
        out
    }

    /// Each rule id comes from one function: a second emitter of any id
    /// fails this test.
    #[test]
    fn each_rule_id_is_emitted_from_one_place() {
        let e = emitters();
        let twice: Vec<String> =
            e.iter().filter(|(_, places)| places.len() > 1).map(|(id, p)| format!("{id}: {p:?}")).collect();
        assert!(twice.is_empty(), "rule ids emitted from more than one function:\n{}", twice.join("\n"));
        // The checker sees the rules this file's table runs.
        assert!(e.get("vmem.plugged").is_some_and(|p| p.contains("preflight.rs::rule_vmem_plugged")), "{e:?}");
        assert!(e.get("domain.running").is_some_and(|p| p.len() == 1), "{e:?}");
    }
}
