//! Preflight: every constraint of the guide as one rule with a stable id, a
//! severity and a message that says what to change. Rules are pure functions of
//! (domain XML facts, host facts, guest facts, the operation).

use vmplug_common::protocol::GuestInfo;
use vmplug_common::{Bytes, CpuSet, GIB};

use crate::domain::{Affect, DomainState, NumaMode, PauseReason};
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
}

fn error(id: &'static str, message: impl Into<String>) -> Option<Finding> {
    Some(Finding { id, severity: Severity::Error, message: message.into() })
}

fn warning(id: &'static str, message: impl Into<String>) -> Option<Finding> {
    Some(Finding { id, severity: Severity::Warning, message: message.into() })
}

/// What is about to be done.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// `setvcpus` to a total.
    Vcpus {
        target: u32,
    },
    /// `attach-memory`: total size, target node (None: balanced), DIMM count
    /// planned, and the first wave (the most plugged before the guest onlines).
    Memory {
        size: Bytes,
        node: Option<u32>,
        dimms: u32,
        first_wave: Bytes,
    },
    /// `resize-memory`: the virtio-mem devices in scope grow by `grow` (zero
    /// for a shrink), on guest node `node` (None: every device).
    Resize {
        grow: Bytes,
        node: Option<u32>,
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
    /// domain (not in its definition), and those the live XML gives no address.
    Unplug {
        live_only: Vec<String>,
        without_address: Vec<String>,
    },
    /// `setvcpus --guest`: `target` CPUs online inside the guest, among the
    /// vCPUs it already has (nothing is plugged; libvirt is not changed).
    GuestVcpus {
        target: u32,
    },
    /// General readiness (`vmplug check` with no operation).
    Readiness,
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
    ) && ctx.affect.live()
}

fn rule_running(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    (live_op(ctx, op) && !ctx.running).then_some(())?;
    error("domain.running", format!("domain '{}' is not running (shut off): a --live change needs a running domain (use --config alone to change the definition)", ctx.dom.name))
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
        "domain.paused",
        format!("domain '{name}' is paused{cause}: its guest runs no code, so nothing plugged now could be onlined or confirmed; {fix}"),
    )
}

fn rule_crashed(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let crashed = matches!(ctx.state, DomainState::Crashed | DomainState::Paused(PauseReason::Crashed));
    (crashed && live_now(ctx, op)).then_some(())?;
    error(
        "domain.crashed",
        format!("domain '{}' crashed (its guest panicked and libvirt keeps it for inspection): nothing can be plugged into it; restart it (virsh destroy, then virsh start)", ctx.dom.name),
    )
}

fn rule_shutting_down(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    (ctx.state == DomainState::ShuttingDown && live_now(ctx, op)).then_some(())?;
    error(
        "domain.shutting-down",
        format!("domain '{}' is shutting down: its guest is stopping and would not online or confirm anything; change the definition with --config, or start it again", ctx.dom.name),
    )
}

fn rule_pmsuspended(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    (ctx.state == DomainState::PmSuspended && live_now(ctx, op)).then_some(())?;
    error(
        "domain.pmsuspended",
        format!("domain '{}' is suspended by its guest (ACPI S3/S4): it runs no code until woken; wake it (virsh dompmwakeup {}) first", ctx.dom.name, ctx.dom.name),
    )
}

fn rule_job(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    (live_op(ctx, op) && ctx.job_running).then_some(())?;
    error(
        "domain.job",
        "a migration, save or snapshot job is running: hot-plug is not supported during it; wait for the job to finish",
    )
}

/// The guest agent is needed and was not reached: a live change on a domain
/// whose guest runs (the state rules speak for the others).
fn agent_missed(ctx: &Ctx, op: &Operation) -> bool {
    live_op(ctx, op) && ctx.running && ctx.state.guest_runs() && ctx.guest.is_none()
}

fn rule_agent_socket(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Some(AgentTrouble::Untrusted(why)) = ctx.agent_trouble else { return None };
    agent_missed(ctx, op).then_some(())?;
    let blind_ok = ctx.no_wait && !matches!(op, Operation::Unplug { .. } | Operation::GuestVcpus { .. });
    let finding: fn(&'static str, String) -> Option<Finding> = if blind_ok { warning } else { error };
    finding(
        "agent.socket",
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
        return error("agent.ready", format!("{what}: vmplug never unplugs memory the guest has not released ({hint}--force leaves it to the guest's ACPI handler)"));
    }
    if let Operation::GuestVcpus { .. } = op {
        return error(
            "agent.ready",
            format!(
                "{what}: guest-level vCPU scaling is done by the agent{}",
                if hint.is_empty() { String::new() } else { format!(" ({})", hint.trim_end()) }
            ),
        );
    }
    if ctx.no_wait {
        return warning("agent.ready", format!("{what}: the guest's view is unknown and nothing will verify the plug"));
    }
    error(
        "agent.ready",
        format!("{what}: vmplug never plugs into a guest that cannot confirm ({hint}use --no-wait to plug blind)"),
    )
}

fn rule_unplug_live_only(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Unplug { live_only, .. } = op else { return None };
    (ctx.affect.config() && !live_only.is_empty()).then_some(())?;
    error(
        "unplug.live-only",
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
        "unplug.no-address",
        format!(
            "the live XML gives DIMM(s) {} no address: vmplug cannot tell the guest which blocks to release",
            without_address.join(", ")
        ),
    )
}

fn rule_cpu_machine(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Vcpus { .. } = op else { return None };
    let (arch, m) = (ctx.dom.arch.as_str(), ctx.dom.machine.as_str());
    match arch {
        "x86_64" | "i686" if is_x86_hotplug_machine(m) => None,
        "aarch64" if m != "virt" && !m.starts_with("virt-") => {
            error("cpu.machine", format!("machine '{m}' is not an aarch64 'virt' machine; vCPU hot-plug needs virt-4.1 or newer"))
        }
        // What this QEMU says about the machine decides; the version only speaks
        // when QEMU could not be asked (a remote host).
        // The persistent definition needs no hot-plug.
        "aarch64" if !ctx.affect.live() => None,
        "aarch64" => match ctx.host.cpu_hotplug {
            Some(true) => None,
            Some(false) => error(
                "cpu.machine",
                format!("this host's QEMU cannot hot-plug vCPUs on machine '{m}' (query-machines: hotpluggable-cpus=false; upstream QEMU has no aarch64 vCPU hot-plug, openEuler's has); scale inside the guest instead: `vmplug setvcpus --guest` onlines and offlines vCPUs defined at boot"),
            ),
            None => match machine_version(m, "virt") {
                Some(v) if v < (4, 1) => error("cpu.machine", format!("machine '{m}' cannot hot-plug vCPUs: the guide requires virt-4.1 or newer")),
                _ => warning(
                    "cpu.machine",
                    "QEMU could not be asked whether it hot-plugs aarch64 vCPUs (a remote host): openEuler's does, upstream QEMU does not (libvirt then refuses with 'cpu hotplug is not supported'); `vmplug setvcpus --guest` works on both",
                ),
            },
        },
        _ => error("cpu.machine", format!("machine '{m}' ({arch}) is not known to hot-plug vCPUs (x86: pc or q35; aarch64: virt-4.1+)")),
    }
}

fn rule_cpu_placement(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if !matches!(op, Operation::Vcpus { .. } | Operation::Readiness) {
        return None;
    }
    (ctx.dom.vcpu_placement != "static").then_some(())?;
    error("cpu.placement", format!("<vcpu placement='{}'> must be 'static' for CPU hot-plug", ctx.dom.vcpu_placement))
}

fn rule_cpu_max(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Vcpus { target } = *op else { return None };
    if target == 0 {
        return error("cpu.max", "a domain needs at least one vCPU");
    }
    (target > ctx.dom.vcpus_max).then_some(())?;
    error(
        "cpu.max",
        format!("{target} vCPUs exceeds the domain's maximum of {} (<vcpu current='m'>n</vcpu>: raise n with `vmplug prepare`, which takes effect at the next boot)", ctx.dom.vcpus_max),
    )
}

fn rule_cpu_hypervisor_max(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Vcpus { target } = *op else { return None };
    let max = ctx.host.max_vcpus?;
    (target > max).then_some(())?;
    error(
        "cpu.hypervisor-max",
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
            "cpu.guest-possible",
            format!("the guest kernel supports {} CPUs (/sys/devices/system/cpu/possible = {}); {target} cannot come online", g.cpus.possible.len(), g.cpus.possible),
        ),
        Some(g) if g.acpi_cpu_hotplug == Some(false) => error("cpu.guest-acpi", "the guest kernel has no ACPI processor hot-plug: a new vCPU would never appear in it"),
        None if ctx.running => warning("cpu.guest-possible", "guest facts unknown (no agent): cannot check the guest kernel's possible CPUs"),
        _ => None,
    }
}

/// `setvcpus --guest` moves CPUs between online and offline inside the guest:
/// only among the vCPUs the guest has (present), never past them.
fn rule_cpu_guest_present(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::GuestVcpus { target } = *op else { return None };
    if target == 0 {
        return error("cpu.guest-present", "a guest needs at least one CPU online");
    }
    let g = ctx.guest?;
    let present = g.cpus.present.len() as u32;
    (target > present).then_some(())?;
    error(
        "cpu.guest-present",
        format!("the guest has {present} vCPU(s) present ({}): --guest scales only among them; define more at boot (<vcpu>N</vcpu>, the surplus kept offline with the kernel's maxcpus=) or hot-plug them where the machine can (setvcpus without --guest)", g.cpus.present),
    )
}

fn rule_cpu_cores(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Vcpus { target } = *op else { return None };
    let per = ctx.dom.topology.as_ref()?.per_socket();
    let delta = target.abs_diff(ctx.dom.vcpus_current);
    (delta % per != 0).then_some(())?;
    warning(
        "cpu.cores-multiple",
        format!("changing by {delta} vCPUs is not a multiple of the topology's {per} vCPUs per socket: the guest may see a confused topology; use a multiple of {per}"),
    )
}

fn rule_cpu_socket_cell(ctx: &Ctx, op: &Operation) -> Option<Finding> {
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
                "cpu.socket-cell",
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
    warning("persist.live-only", "a --live change is lost when the domain restarts; add --config to keep it")
}

fn rule_persist_guest(_ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::GuestVcpus { .. } = op else { return None };
    warning("persist.guest-level", "a guest-level change lasts until the guest reboots: the kernel then brings up its boot CPUs (all, or maxcpus= of them) and the agent onlines no more than that")
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
                Some(v) if v < (4, 1) => error("mem.machine", format!("machine '{m}' cannot hot-plug memory: the guide requires virt-4.1 or newer{newest}")),
                // Upstream QEMU adds the ACPI GED device (which DIMMs need) from
                // virt-4.2; openEuler's also to its virt-4.1, with its vCPU
                // hot-plug, which is how its QEMU is told from upstream here.
                Some(v) if v < (4, 2) => match ctx.host.cpu_hotplug {
                    Some(false) => error("mem.machine", format!("machine '{m}' has no ACPI GED device in this host's QEMU (upstream QEMU adds it from virt-4.2; only openEuler's QEMU hot-plugs on virt-4.1): QEMU would refuse the DIMM with 'missing acpi-ged device'{newest}")),
                    _ => warning("mem.machine", format!("machine '{m}': upstream QEMU needs virt-4.2 or newer for memory hot-plug (the ACPI GED device); only openEuler's QEMU accepts virt-4.1{newest}")),
                },
                _ if m == "virt" || m.starts_with("virt-") => None,
                _ => error("mem.machine", format!("machine '{m}' is not an aarch64 'virt' machine")),
            }
        }
        _ => error("mem.machine", format!("machine '{m}' ({arch}) is not known to hot-plug memory")),
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
            "mem.guest-kernel",
            "the guest kernel has no memory hot-plug (/sys/devices/system/memory is absent)",
        );
    }
    // virtio-mem needs no ACPI: the device itself tells the guest.
    if !virtio && g.acpi_memory_hotplug == Some(false) {
        return error("mem.guest-acpi", "the guest kernel has no ACPI memory hot-plug (no /sys/firmware/acpi/hotplug/memory; Debian's and Ubuntu's arm64 kernels are built without CONFIG_ACPI_HOTPLUG_MEMORY): the DIMM would attach but the guest would never see it; use virtio-mem instead (`vmplug add-virtio-mem`, then `vmplug resize-memory`), which needs no ACPI");
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
        "mem.guest-free",
        format!(
            "the guest has {} available but {what} needs at least {} (1/32 of it) for its memory map; {fix}",
            g.mem_available,
            Bytes(size.get().div_ceil(32))
        ),
    )
}

fn rule_mem_maxmemory(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if !matches!(op, Operation::Memory { .. } | Operation::Readiness) {
        return None;
    }
    ctx.dom.max_memory.is_none().then_some(())?;
    error(
        "mem.max-memory",
        "no <maxMemory slots='…'>: memory hot-plug needs slots reserved at creation (`vmplug prepare`)",
    )
}

fn rule_mem_slots(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { dimms, .. } = *op else { return None };
    ctx.dom.max_memory?;
    let free = ctx.dom.free_slots();
    (dimms > free).then_some(())?;
    error(
        "mem.slots",
        format!(
            "{dimms} DIMM(s) needed, {free} slot(s) free (min(slots {}, 64 − {} virtio-net) − {} DIMMs present)",
            ctx.dom.slots.unwrap_or(0),
            ctx.dom.virtio_nets,
            ctx.dom.dimms.len()
        ),
    )
}

fn rule_mem_headroom(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { size, .. } = *op else { return None };
    let max = ctx.dom.max_memory?;
    (size > ctx.dom.memory_headroom()).then_some(())?;
    error("mem.max-size", format!("{} + {size} exceeds <maxMemory> {max}", ctx.dom.memory))
}

fn rule_mem_numa(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if !matches!(op, Operation::Memory { .. } | Operation::Readiness) {
        return None;
    }
    ctx.dom.cells.is_empty().then_some(())?;
    error("mem.numa", "no guest NUMA (<cpu><numa><cell …/>): memory hot-plug depends on it; add cells with `vmplug prepare --cells N`")
}

fn rule_mem_node(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let (Operation::Memory { node: Some(n), .. } | Operation::Resize { node: Some(n), .. }) = *op else { return None };
    if ctx.dom.cells.is_empty() || ctx.dom.cells.iter().any(|c| c.id == n) {
        return None;
    }
    let ids: Vec<String> = ctx.dom.cells.iter().map(|c| c.id.to_string()).collect();
    error("mem.node", format!("guest NUMA node {n} does not exist (cells: {})", ids.join(", ")))
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
        "mem.guest-node",
        format!("guest NUMA node(s) {missing} do not exist in the guest kernel (/sys/devices/system/node/possible = {possible}; its NUMA set-up failed or was turned off): the memory would land on another node; fix the guest's NUMA (dmesg | grep NUMA) or plug with --node {}", possible.iter().next().unwrap_or(0)),
    )
}

fn rule_mem_block_align(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { size, .. } = *op else { return None };
    match ctx.guest.and_then(|g| g.memory.as_ref()) {
        Some(m) if !size.is_multiple_of(m.block_size.get()) => error(
            "mem.block-align",
            format!("{size} is not a multiple of the guest's memory block size {} (block_size_bytes): the guest would reject the DIMM and every DIMM after it; use a multiple or --round-up", m.block_size.bytes()),
        ),
        None if ctx.guest.is_none() => warning("mem.block-align", "guest facts unknown (no agent): cannot check the size against the guest's block_size_bytes"),
        _ => None,
    }
}

fn rule_mem_hugepages(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { size, .. } = *op else { return None };
    let hp = ctx.dom.hugepage_size?;
    (!size.is_multiple_of(hp.get())).then_some(())?;
    error(
        "mem.hugepage-align",
        format!("hugepages of {hp} back this guest: {size} is not a multiple of the hugepage size"),
    )
}

fn rule_mem_vhost_user(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    if !matches!(op, Operation::Memory { .. } | Operation::Readiness) {
        return None;
    }
    let dev = ctx.dom.vhost_user_devices.iter().find(|d| !d.contains("vhost-user-vsock"))?;
    error("mem.vhost-user", format!("a vhost-user device is configured ({dev}): the guide says vhost-user devices and memory hot-plug exclude each other"))
}

fn rule_mem_linux_4g(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Memory { .. } = op else { return None };
    if ctx.dom.os_is_windows || ctx.dom.boot_memory().get() >= 4 * GIB {
        return None;
    }
    warning(
        "mem.linux-4g",
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
        "mem.windows-node0",
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
    error("sched.shares-range", format!("cpu_shares={n} is outside {lo}..={hi}, the range of the host's cgroup {v}"))
}

fn rule_pin(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Pin { vcpu, cpus } = op else { return None };
    if cpus.is_empty() {
        return error("pin.host-cpus", "an empty cpuset would leave nothing to run on");
    }
    if let Some(v) = vcpu {
        if *v >= ctx.dom.vcpus_max {
            return error(
                "pin.vcpu",
                format!("vCPU {v} does not exist (the domain has {} at most)", ctx.dom.vcpus_max),
            );
        }
    }
    let host = ctx.host.all_cpus();
    (ctx.host.cpus > 0 && !cpus.is_subset(&host)).then_some(())?;
    error(
        "pin.host-cpus",
        format!(
            "cpuset {cpus} includes CPUs {} that the host does not have (host CPUs: {host})",
            cpus.difference(&host)
        ),
    )
}

fn rule_numatune(ctx: &Ctx, op: &Operation) -> Option<Finding> {
    let Operation::Numatune { mode, nodeset } = op else { return None };
    let set = nodeset.as_ref()?;
    if set.is_empty() {
        return error(
            "numatune.nodes",
            "the nodeset is empty (an exclusion such as '^1' alone names no node): give the nodes to use",
        );
    }
    let nodes: CpuSet = ctx.host.nodes.iter().map(|n| n.id).collect();
    if !set.is_subset(&nodes) {
        return error(
            "numatune.nodes",
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
                "numatune.strict-free",
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
                        "numa.cell-pinning",
                        format!("guest cell {} has its memory on host node(s) {nodeset} but vCPU {v} is pinned to {pin}: pin the cell's vCPUs to {node_cpus} to avoid remote memory access", cell.id),
                    );
                }
            }
        }
    }
    None
}

/// Every rule, in report order.
pub const RULES: &[(&str, Rule)] = &[
    ("domain.running", rule_running),
    ("domain.paused", rule_paused),
    ("domain.crashed", rule_crashed),
    ("domain.shutting-down", rule_shutting_down),
    ("domain.pmsuspended", rule_pmsuspended),
    ("domain.job", rule_job),
    ("agent.socket", rule_agent_socket),
    ("agent.ready", rule_agent),
    ("cpu.machine", rule_cpu_machine),
    ("cpu.guest-present", rule_cpu_guest_present),
    ("persist.guest-level", rule_persist_guest),
    ("cpu.placement", rule_cpu_placement),
    ("cpu.max", rule_cpu_max),
    ("cpu.hypervisor-max", rule_cpu_hypervisor_max),
    ("cpu.guest-possible", rule_cpu_guest_possible),
    ("cpu.cores-multiple", rule_cpu_cores),
    ("cpu.socket-cell", rule_cpu_socket_cell),
    ("persist.live-only", rule_persist),
    ("mem.machine", rule_mem_machine),
    ("mem.guest", rule_mem_guest),
    ("mem.max-memory", rule_mem_maxmemory),
    ("mem.slots", rule_mem_slots),
    ("mem.max-size", rule_mem_headroom),
    ("mem.numa", rule_mem_numa),
    ("mem.node", rule_mem_node),
    ("mem.guest-node", rule_mem_guest_node),
    ("mem.block-align", rule_mem_block_align),
    ("mem.hugepage-align", rule_mem_hugepages),
    ("mem.vhost-user", rule_mem_vhost_user),
    ("mem.linux-4g", rule_mem_linux_4g),
    ("mem.windows-node0", rule_mem_windows_node0),
    ("unplug.live-only", rule_unplug_live_only),
    ("unplug.no-address", rule_unplug_address),
    ("sched.shares-range", rule_shares),
    ("pin.host-cpus", rule_pin),
    ("numatune", rule_numatune),
    ("numa.cell-pinning", rule_cell_pinning),
];

/// Runs every rule; errors first.
pub fn check(ctx: &Ctx, op: &Operation) -> Vec<Finding> {
    let mut out: Vec<Finding> = RULES.iter().filter_map(|(_, rule)| rule(ctx, op)).collect();
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
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

/// Errors refuse, unless forced — except `hard` findings, which no `--force`
/// overrides (there would be nothing to do, or it would widen the request).
pub fn gate(findings: Vec<Finding>, force: bool, hard: Vec<Finding>) -> Result<Vec<Finding>, NotPlanned> {
    if hard.is_empty() && (force || !has_errors(&findings)) {
        let mut findings = findings;
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        return Ok(findings);
    }
    Err(refuse(findings, hard))
}

pub(crate) fn refuse(mut findings: Vec<Finding>, hard: Vec<Finding>) -> NotPlanned {
    findings.splice(0..0, hard);
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    let errors: Vec<&Finding> = findings.iter().filter(|f| f.severity == Severity::Error).collect();
    let agent_unreachable = !errors.is_empty() && errors.iter().all(|f| f.id == "agent.ready");
    NotPlanned::Refused(Refusal { findings, agent_unreachable })
}
