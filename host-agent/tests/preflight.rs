//! One test per preflight rule, failing and passing, on domain XML fixtures.

use std::collections::BTreeMap;

use vmplug::domain::{Affect, DomainState, NumaMode, PauseReason};
use vmplug::planner::PlanError;
use vmplug::preflight::{
    check, gate, AgentTrouble, Ctx, DimmPlanning, Finding, FloorBreach, NotPlanned, Operation, Proposal,
    ResizePlanning, Severity, StrictCell,
};
use vmplug::xml::{DomainFacts, HostFacts};
use vmplug_common::protocol::{CpuFacts, GuestInfo, MemoryFacts};
use vmplug_common::{BlockSize, Bytes, CpuSet, GIB, MIB};

const READY: &str = include_str!("fixtures/x86-ready.xml");
const CAPS: &str = include_str!("fixtures/caps.xml");

fn dom(xml: &str) -> DomainFacts {
    DomainFacts::parse(xml).expect("fixture parses")
}

fn host() -> HostFacts {
    let mut h = HostFacts::parse_capabilities(CAPS).expect("caps parse");
    h.free = vec![Bytes(16 * GIB), Bytes(GIB)];
    h.max_vcpus = Some(255);
    h.cgroup_v2 = Some(false);
    h
}

fn guest() -> GuestInfo {
    GuestInfo {
        protocol: 1,
        agent_version: "0.1.0".into(),
        capabilities: vec![],
        kernel: "6.1.0".into(),
        cpus: CpuFacts {
            possible: "0-7".parse().expect("set"),
            present: "0-1".parse().expect("set"),
            online: "0-1".parse().expect("set"),
        },
        memory: Some(MemoryFacts {
            block_size: BlockSize::new(128 * MIB).expect("pow2"),
            blocks_online: 64,
            blocks_offline: 0,
            zones: BTreeMap::new(),
            auto_online_blocks: Some("offline".into()),
        }),
        hugepage_size: Some(Bytes(2 * MIB)),
        mem_total: Bytes(8 * GIB),
        mem_available: Bytes(6 * GIB),
        acpi_memory_hotplug: Some(true),
        acpi_cpu_hotplug: Some(true),
        numa_nodes: "0-1".parse().expect("set"),
        numa_possible: None,
        memmap_on_memory: None,
        udev_online_rule: false,
        virtio_mem_devices: Some(0),
    }
}

#[derive(Clone)]
struct Case {
    dom: DomainFacts,
    host: HostFacts,
    guest: Option<GuestInfo>,
    trouble: Option<AgentTrouble>,
    running: bool,
    state: DomainState,
    job: bool,
    affect: Affect,
    no_wait: bool,
}

impl Case {
    fn new() -> Case {
        Case {
            dom: dom(READY),
            host: host(),
            guest: Some(guest()),
            trouble: None,
            running: true,
            state: DomainState::Running,
            job: false,
            affect: Affect::Both,
            no_wait: false,
        }
    }
    /// The domain in `state`, its guest unreached (as gather leaves a guest
    /// that runs no code).
    fn in_state(state: DomainState) -> Case {
        Case { state, running: state != DomainState::ShutOff, guest: None, ..Case::new() }
    }
    fn clone_with(&self, trouble: AgentTrouble) -> Case {
        Case { trouble: Some(trouble), ..self.clone() }
    }
    fn xml(mut self, from: &str, to: &str) -> Case {
        assert!(READY.contains(from), "fixture lacks {from}");
        self.dom = dom(&READY.replace(from, to));
        self
    }
    fn run(&self, op: &Operation) -> Vec<Finding> {
        let ctx = Ctx {
            dom: &self.dom,
            host: &self.host,
            guest: self.guest.as_ref(),
            agent_trouble: self.trouble.as_ref(),
            running: self.running,
            state: self.state,
            job_running: self.job,
            affect: self.affect,
            no_wait: self.no_wait,
        };
        check(&ctx, op)
    }
}

fn ids(f: &[Finding], sev: Severity) -> Vec<&'static str> {
    f.iter().filter(|x| x.severity == sev).map(|x| x.id).collect()
}

/// The rule fires (with `sev`) on `bad` and not on `good`.
fn assert_rule(id: &str, sev: Severity, bad: &Case, good: &Case, op: &Operation) {
    let b = bad.run(op);
    assert!(ids(&b, sev).contains(&id), "{id} should fire: {b:#?}");
    let g = good.run(op);
    assert!(!g.iter().any(|f| f.id == id), "{id} should not fire: {g:#?}");
}

fn cpus(target: u32) -> Operation {
    Operation::Vcpus { target }
}

fn mem(size: u64, node: Option<u32>) -> Operation {
    Operation::Memory { size: Bytes(size), node, dimms: 1, first_wave: Bytes(size), plan: Default::default() }
}

#[test]
fn the_ready_fixture_passes_everything() {
    let c = Case::new();
    for op in [cpus(4), mem(GIB, Some(1)), Operation::Readiness] {
        let f = c.run(&op);
        assert!(ids(&f, Severity::Error).is_empty(), "{op:?}: {f:#?}");
    }
}

#[test]
fn domain_running() {
    let bad = Case::in_state(DomainState::ShutOff);
    assert_rule("domain.running", Severity::Error, &bad, &Case::new(), &cpus(4));
    let f = bad.run(&cpus(4));
    assert!(!f.iter().any(|f| f.id == "agent.ready"), "a stopped domain has no agent to blame: {f:#?}");
}

/// Every state but running gets its own verdict, and only that one: no
/// "agent did not answer" for a guest that runs no code.
fn assert_state_rule(id: &str, state: DomainState, says: &str) {
    let bad = Case::in_state(state);
    for op in [cpus(4), mem(GIB, Some(0)), Operation::GuestVcpus { target: 2 }, unplug(&[], &[]), Operation::Readiness]
    {
        let f = bad.run(&op);
        assert!(ids(&f, Severity::Error).contains(&id), "{op:?}: {id} should fire: {f:#?}");
        assert!(
            !f.iter().any(|f| f.id == "agent.ready" || f.id.starts_with("domain.") && f.id != id),
            "{op:?}: {f:#?}"
        );
        let m = &f.iter().find(|f| f.id == id).expect("found").message;
        assert!(m.contains(says), "{m}");
    }
    let mut config = Case::in_state(state);
    config.affect = Affect::Config;
    assert!(!config.run(&cpus(4)).iter().any(|f| f.id == id), "the definition can still be changed");
    assert!(!Case::new().run(&cpus(4)).iter().any(|f| f.id == id));
}

#[test]
fn domain_paused() {
    assert_state_rule("domain.paused", DomainState::Paused(PauseReason::User), "virsh resume web1");
    assert_state_rule("domain.paused", DomainState::Paused(PauseReason::Migration), "for a migration");
    assert_state_rule("domain.paused", DomainState::Paused(PauseReason::IoError), "disk I/O error");
}

#[test]
fn domain_crashed() {
    assert_state_rule("domain.crashed", DomainState::Crashed, "crashed");
    assert_state_rule("domain.crashed", DomainState::Paused(PauseReason::Crashed), "crashed");
}

#[test]
fn domain_shutting_down() {
    assert_state_rule("domain.shutting-down", DomainState::ShuttingDown, "is shutting down");
}

#[test]
fn domain_pmsuspended() {
    assert_state_rule("domain.pmsuspended", DomainState::PmSuspended, "virsh dompmwakeup web1");
}

/// Issue #27: a socket vmplug refused to use is said as that, in its own
/// rule, never as an agent that did not answer.
#[test]
fn agent_socket() {
    let why = "refused to use the agent socket /run/x.sock: it is owned by uid 1500, a login user by /etc/login.defs (UID_MIN 1000..UID_MAX 60000)";
    let mut bad = Case::new();
    bad.guest = None;
    bad.trouble = Some(AgentTrouble::Untrusted(why.into()));
    let mut silent = bad.clone_with(AgentTrouble::Unanswered("no answer to hello within 3s".into()));
    assert_rule("agent.socket", Severity::Error, &bad, &silent, &cpus(4));
    for op in [cpus(4), mem(GIB, Some(0)), unplug(&[], &[]), Operation::GuestVcpus { target: 2 }] {
        let f = bad.run(&op);
        assert!(!f.iter().any(|f| f.id == "agent.ready"), "{op:?}: {f:#?}");
        let m = &f.iter().find(|f| f.id == "agent.socket").expect("agent.socket").message;
        assert!(m.starts_with(why) && !m.contains("is vmplug-guest running"), "{m}");
    }
    // Plugging blind never needed the socket: a warning; unplugging does.
    bad.no_wait = true;
    assert!(ids(&bad.run(&cpus(4)), Severity::Warning).contains(&"agent.socket"));
    assert!(ids(&bad.run(&unplug(&[], &[])), Severity::Error).contains(&"agent.socket"));
    // Silence is agent.ready, naming what was heard.
    silent.no_wait = false;
    let f = silent.run(&cpus(4));
    let m = &f.iter().find(|f| f.id == "agent.ready").expect("agent.ready").message;
    assert!(m.contains("no answer to hello within 3s") && m.contains("is vmplug-guest running"), "{m}");
}

#[test]
fn nothing_to_connect_to_is_not_called_silence() {
    let mut c = Case::new();
    c.guest = None;
    c.trouble = Some(AgentTrouble::NoEndpoint("agent socket /run/x.sock does not exist".into()));
    let f = c.run(&cpus(4));
    let m = &f.iter().find(|f| f.id == "agent.ready").expect("agent.ready").message;
    assert!(m.contains("no guest agent to talk to (agent socket /run/x.sock does not exist)"), "{m}");
    assert!(!m.contains("did not complete its handshake"), "{m}");
}

#[test]
fn domain_job() {
    let mut bad = Case::new();
    bad.job = true;
    assert_rule("domain.job", Severity::Error, &bad, &Case::new(), &mem(GIB, Some(0)));
}

#[test]
fn agent_ready() {
    let mut bad = Case::new();
    bad.guest = None;
    assert_rule("agent.ready", Severity::Error, &bad, &Case::new(), &cpus(4));
}

#[test]
fn cpu_machine() {
    let bad = Case::new().xml("machine='pc-q35-10.0'", "machine='microvm'");
    assert_rule("cpu.machine", Severity::Error, &bad, &Case::new(), &cpus(4));
    let old_arm = Case::new().xml("arch='x86_64' machine='pc-q35-10.0'", "arch='aarch64' machine='virt-4.0'");
    assert!(ids(&old_arm.run(&cpus(4)), Severity::Error).contains(&"cpu.machine"));
    let arm = Case::new().xml("arch='x86_64' machine='pc-q35-10.0'", "arch='aarch64' machine='virt-4.1'");
    assert!(
        ids(&arm.run(&cpus(4)), Severity::Warning).contains(&"cpu.machine"),
        "QEMU not asked (remote): a warning, not a verdict"
    );
    // What QEMU says decides, whatever the version: upstream says no…
    let mut upstream = Case::new().xml("arch='x86_64' machine='pc-q35-10.0'", "arch='aarch64' machine='virt-10.0'");
    upstream.host.cpu_hotplug = Some(false);
    let f = upstream.run(&cpus(4));
    let e = f.iter().find(|f| f.id == "cpu.machine" && f.severity == Severity::Error).expect("refused");
    assert!(e.message.contains("hotpluggable-cpus=false") && e.message.contains("setvcpus --guest"), "{e:?}");
    // …openEuler's QEMU says yes, even for the guide's virt-4.1.
    let mut openeuler = arm;
    openeuler.host.cpu_hotplug = Some(true);
    assert!(!openeuler.run(&cpus(4)).iter().any(|f| f.id == "cpu.machine"));
}

const ARM_CAPS: &str = "<capabilities><host><cpu><arch>aarch64</arch></cpu></host>
  <guest><os_type>hvm</os_type><arch name='aarch64'><machine maxCpus='512'>virt-9.2</machine>
    <machine canonical='virt-10.0' maxCpus='512'>virt</machine><machine maxCpus='512'>virt-10.0</machine>
    <machine maxCpus='512'>virt-4.1</machine><machine maxCpus='512'>virt-10.0</machine></arch></guest>
  <guest><os_type>hvm</os_type><arch name='x86_64'><machine>pc-q35-11.0</machine></arch></guest>
</capabilities>";

#[test]
fn machines_come_from_the_capabilities_and_qemu() {
    let h = HostFacts { machines: HostFacts::parse_machines(ARM_CAPS, "aarch64"), ..HostFacts::default() };
    assert_eq!(h.machines, ["virt", "virt-10.0", "virt-4.1", "virt-9.2"]);
    assert_eq!(h.newest_versioned("virt"), Some("virt-10.0"), "10.0 > 9.2 > 4.1, numerically");
    let answer = serde_json::json!([
        {"name": "virt-10.0", "alias": "virt", "hotpluggable-cpus": false},
        {"name": "pc-q35-10.0", "alias": "q35", "hotpluggable-cpus": true},
    ]);
    assert_eq!(vmplug::xml::machine_hotplugs_cpus(&answer, "virt"), Some(false), "an alias counts");
    assert_eq!(vmplug::xml::machine_hotplugs_cpus(&answer, "q35"), Some(true));
    assert_eq!(vmplug::xml::machine_hotplugs_cpus(&answer, "virt-4.1"), None, "not listed: unknown");
}

#[test]
fn cpu_placement() {
    let bad = Case::new().xml("placement='static'", "placement='auto'");
    assert_rule("cpu.placement", Severity::Error, &bad, &Case::new(), &cpus(4));
}

#[test]
fn cpu_max() {
    let c = Case::new();
    assert!(ids(&c.run(&cpus(9)), Severity::Error).contains(&"cpu.max"));
    assert!(ids(&c.run(&cpus(0)), Severity::Error).contains(&"cpu.max"));
    assert!(!c.run(&cpus(8)).iter().any(|f| f.id == "cpu.max"));
}

#[test]
fn cpu_hypervisor_max() {
    let mut bad = Case::new().xml(">8</vcpu>", ">300</vcpu>");
    bad.guest = None;
    let f = bad.run(&cpus(300));
    assert!(ids(&f, Severity::Error).contains(&"cpu.hypervisor-max"), "{f:#?}");
    assert!(!Case::new().run(&cpus(8)).iter().any(|f| f.id == "cpu.hypervisor-max"));
}

#[test]
fn cpu_guest_possible() {
    let mut bad = Case::new();
    if let Some(g) = bad.guest.as_mut() {
        g.cpus.possible = "0-3".parse().expect("set");
    }
    assert_rule("cpu.guest-possible", Severity::Error, &bad, &Case::new(), &cpus(6));
}

#[test]
fn cpu_guest_acpi() {
    let mut bad = Case::new();
    if let Some(g) = bad.guest.as_mut() {
        g.acpi_cpu_hotplug = Some(false);
    }
    assert_rule("cpu.guest-acpi", Severity::Error, &bad, &Case::new(), &cpus(4));
}

#[test]
fn cpu_cores_multiple() {
    // Two vCPUs per socket: 2 → 3 splits a socket, 2 → 4 does not.
    let f = Case::new().run(&cpus(3));
    assert!(ids(&f, Severity::Warning).contains(&"cpu.cores-multiple"), "{f:#?}");
    assert!(!Case::new().run(&cpus(4)).iter().any(|f| f.id == "cpu.cores-multiple"));
}

#[test]
fn cpu_socket_cell() {
    // Socket 1 holds vCPUs 2-3; moving vCPU 3 to cell 1 splits it across cells.
    let split = READY.replace("cpus='0-3' memory", "cpus='0-2' memory").replace("cpus='4-7'", "cpus='3-7'");
    let bad = Case { dom: dom(&split), ..Case::new() };
    assert_rule("cpu.socket-cell", Severity::Error, &bad, &Case::new(), &cpus(4));
}

#[test]
fn persist_live_only() {
    let mut bad = Case::new();
    bad.affect = Affect::Live;
    assert_rule("persist.live-only", Severity::Warning, &bad, &Case::new(), &cpus(4));
}

#[test]
fn mem_machine() {
    let bad = Case::new().xml("arch='x86_64' machine='pc-q35-10.0'", "arch='aarch64' machine='virt-4.1'");
    let f = bad.run(&mem(GIB, Some(0)));
    assert!(ids(&f, Severity::Warning).contains(&"mem.machine"), "virt-4.1 needs openEuler's QEMU: {f:#?}");
    let worse = Case::new().xml("arch='x86_64' machine='pc-q35-10.0'", "arch='aarch64' machine='virt-3.1'");
    assert_rule("mem.machine", Severity::Error, &worse, &Case::new(), &mem(GIB, Some(0)));
    // Upstream QEMU (its virt-4.1 cannot hot-plug vCPUs either): refused, with
    // the newest versioned machine the host offers.
    let mut upstream = bad;
    upstream.host.machines = HostFacts::parse_machines(ARM_CAPS, "aarch64");
    upstream.host.cpu_hotplug = Some(false);
    let f = upstream.run(&mem(GIB, Some(0)));
    let e = f.iter().find(|f| f.id == "mem.machine" && f.severity == Severity::Error).expect("refused");
    assert!(e.message.contains("use virt-10.0") && e.message.contains("acpi-ged"), "{e:?}");
}

#[test]
fn mem_guest_node() {
    // The guest kernel fell back to one node (its NUMA set-up failed).
    let mut one_node = Case::new();
    if let Some(g) = one_node.guest.as_mut() {
        g.numa_possible = Some("0".parse().expect("set"));
    }
    let mut both = Case::new();
    if let Some(g) = both.guest.as_mut() {
        g.numa_possible = Some("0-1".parse().expect("set"));
    }
    assert_rule("mem.guest-node", Severity::Error, &one_node, &both, &mem(GIB, Some(1)));
    assert_rule("mem.guest-node", Severity::Error, &one_node, &both, &mem(GIB, None));
    assert!(!one_node.run(&mem(GIB, Some(0))).iter().any(|f| f.id == "mem.guest-node"), "node 0 exists");
    assert!(!Case::new().run(&mem(GIB, Some(1))).iter().any(|f| f.id == "mem.guest-node"), "older agent: unknown");
}

#[test]
fn mem_guest_kernel_acpi_and_free() {
    let mut no_hotplug = Case::new();
    if let Some(g) = no_hotplug.guest.as_mut() {
        g.memory = None;
    }
    assert_rule("mem.guest-kernel", Severity::Error, &no_hotplug, &Case::new(), &mem(GIB, Some(0)));
    let mut no_acpi = Case::new();
    if let Some(g) = no_acpi.guest.as_mut() {
        g.acpi_memory_hotplug = Some(false);
    }
    assert_rule("mem.guest-acpi", Severity::Error, &no_acpi, &Case::new(), &mem(GIB, Some(0)));
    let f = no_acpi.run(&mem(GIB, Some(0)));
    assert!(f.iter().any(|f| f.id == "mem.guest-acpi" && f.message.contains("virtio-mem")), "names the way: {f:#?}");
    let mut tight = Case::new();
    if let Some(g) = tight.guest.as_mut() {
        g.mem_available = Bytes(16 * MIB);
    }
    // 1 GiB needs 32 MiB free (1/32).
    assert_rule("mem.guest-free", Severity::Error, &tight, &Case::new(), &mem(GIB, Some(0)));
    // The rule is about the first wave, not the whole request: 64 GiB in waves
    // whose first is 256 MiB needs 8 MiB.
    let staged = Operation::Memory {
        size: Bytes(64 * GIB),
        node: Some(0),
        dimms: 16,
        first_wave: Bytes(256 * MIB),
        plan: Default::default(),
    };
    assert!(!tight.run(&staged).iter().any(|f| f.id == "mem.guest-free"));
    // With memmap_on_memory the new memory carries its own page structures.
    let mut self_hosted = Case::new();
    if let Some(g) = self_hosted.guest.as_mut() {
        g.mem_available = Bytes(16 * MIB);
        g.memmap_on_memory = Some(true);
    }
    assert!(!self_hosted.run(&mem(GIB, Some(0))).iter().any(|f| f.id == "mem.guest-free"));
    // virtio-mem: the driver adds at most 1 GiB offline before waiting for it to
    // be onlined, so 64 GiB needs what 1 GiB needs (32 MiB), not 2 GiB.
    let mut roomy = Case::new();
    if let Some(g) = roomy.guest.as_mut() {
        g.mem_available = Bytes(40 * MIB);
    }
    let resize = |grow| Operation::Resize { grow: Bytes(grow), node: None, plan: None };
    assert!(
        !roomy.run(&resize(64 * GIB)).iter().any(|f| f.id == "mem.guest-free"),
        "64 GiB of virtio-mem, 40 MiB free"
    );
    let f = tight.run(&resize(64 * GIB));
    assert!(
        f.iter().any(|f| f.id == "mem.guest-free" && f.message.contains("driver's step, 1 GiB")),
        "16 MiB free cannot map the driver's 1 GiB step: {f:#?}"
    );
}

#[test]
fn mem_max_memory() {
    let bad = Case::new().xml("<maxMemory slots='8' unit='KiB'>16777216</maxMemory>", "");
    assert_rule("mem.max-memory", Severity::Error, &bad, &Case::new(), &mem(GIB, Some(0)));
}

#[test]
fn mem_slots() {
    // One DIMM present of 8 slots: 7 free; 8 DIMMs do not fit.
    let op = Operation::Memory {
        size: Bytes(GIB),
        node: Some(0),
        dimms: 8,
        first_wave: Bytes(GIB),
        plan: Default::default(),
    };
    assert!(ids(&Case::new().run(&op), Severity::Error).contains(&"mem.slots"));
    let fits = Operation::Memory {
        size: Bytes(GIB),
        node: Some(0),
        dimms: 7,
        first_wave: Bytes(GIB),
        plan: Default::default(),
    };
    assert!(!Case::new().run(&fits).iter().any(|f| f.id == "mem.slots"));
    // min(max_slot, 64 - virtio NICs): 62 NICs leave 2 slots, one used.
    let nic =
        "<interface type='network'>\n      <source network='default'/>\n      <model type='virtio'/>\n    </interface>";
    let many_nics = READY.replace("<maxMemory slots='8'", "<maxMemory slots='200'").replace(nic, &nic.repeat(62));
    let many = Case { dom: dom(&many_nics), ..Case::new() };
    let two = Operation::Memory {
        size: Bytes(GIB),
        node: Some(0),
        dimms: 2,
        first_wave: Bytes(GIB),
        plan: Default::default(),
    };
    assert!(ids(&many.run(&two), Severity::Error).contains(&"mem.slots"));
}

#[test]
fn mem_max_size() {
    assert!(ids(&Case::new().run(&mem(16 * GIB, Some(0))), Severity::Error).contains(&"mem.max-size"));
    assert!(!Case::new().run(&mem(8 * GIB, Some(0))).iter().any(|f| f.id == "mem.max-size"));
}

#[test]
fn mem_numa_and_node() {
    let no_numa = Case::new().xml(
        "<numa>\n      <cell id='0' cpus='0-3' memory='4194304' unit='KiB'/>\n      <cell id='1' cpus='4-7' memory='4' unit='GiB'/>\n    </numa>",
        "",
    );
    assert_rule("mem.numa", Severity::Error, &no_numa, &Case::new(), &mem(GIB, None));
    let f = Case::new().run(&mem(GIB, Some(5)));
    assert!(ids(&f, Severity::Error).contains(&"mem.node"), "{f:#?}");
    assert!(!Case::new().run(&mem(GIB, Some(1))).iter().any(|f| f.id == "mem.node"));
}

#[test]
fn mem_block_align() {
    let f = Case::new().run(&mem(100 * MIB, Some(0)));
    let rule = f.iter().find(|f| f.id == "mem.block-align").expect("fires");
    assert_eq!(rule.severity, Severity::Error);
    assert!(rule.message.contains("100 MiB") && rule.message.contains("128 MiB"), "{}", rule.message);
    assert!(!Case::new().run(&mem(256 * MIB, Some(0))).iter().any(|f| f.id == "mem.block-align"));
    let mut unknown = Case::new();
    unknown.guest = None;
    let f = unknown.run(&mem(256 * MIB, Some(0)));
    assert!(ids(&f, Severity::Warning).contains(&"mem.block-align"), "unknown guest: a warning, not a guess");
}

#[test]
fn mem_hugepage_align() {
    let bad = Case::new().xml(
        "<vcpu placement",
        "<memoryBacking><hugepages><page size='1' unit='GiB'/></hugepages></memoryBacking>\n  <vcpu placement",
    );
    let f = bad.run(&mem(512 * MIB, Some(0)));
    assert!(ids(&f, Severity::Error).contains(&"mem.hugepage-align"), "{f:#?}");
    assert!(!bad.run(&mem(GIB, Some(0))).iter().any(|f| f.id == "mem.hugepage-align"));
}

#[test]
fn mem_vhost_user() {
    let bad = Case::new().xml("<interface type='network'>", "<interface type='vhostuser'>");
    assert_rule("mem.vhost-user", Severity::Error, &bad, &Case::new(), &mem(GIB, Some(0)));
}

#[test]
fn mem_linux_4g() {
    let small = Case::new().xml("<memory unit='KiB'>8388608</memory>", "<memory unit='KiB'>2097152</memory>");
    assert_rule("mem.linux-4g", Severity::Warning, &small, &Case::new(), &mem(GIB, Some(0)));
}

#[test]
fn mem_windows_node0() {
    let win = "<os>\n    <type arch='x86_64' machine='pc-q35-10.0'>hvm</type>\n  </os>";
    let first = READY.replace(win, &format!("{win}\n  <features><hyperv mode='custom'/></features>")).replace(
        "<memory model='dimm'>\n      <target>\n        <size unit='KiB'>1048576</size>\n        <node>0</node>\n      </target>\n      <alias name='dimm0'/>\n      <address type='dimm' slot='0' base='0x240000000'/>\n    </memory>",
        "",
    );
    let bad = Case { dom: dom(&first), ..Case::new() };
    assert!(ids(&bad.run(&mem(GIB, Some(1))), Severity::Error).contains(&"mem.windows-node0"));
    assert!(!bad.run(&mem(GIB, Some(0))).iter().any(|f| f.id == "mem.windows-node0"));
}

#[test]
fn sched_shares_range() {
    let c = Case::new();
    assert!(ids(&c.run(&Operation::Shares(1)), Severity::Error).contains(&"sched.shares-range"));
    assert!(ids(&c.run(&Operation::Shares(300_000)), Severity::Error).contains(&"sched.shares-range"));
    assert!(c.run(&Operation::Shares(2048)).is_empty());
    let mut v2 = Case::new();
    v2.host.cgroup_v2 = Some(true);
    assert!(ids(&v2.run(&Operation::Shares(20_000)), Severity::Error).contains(&"sched.shares-range"));
}

#[test]
fn pin_host_cpus_and_vcpu() {
    let c = Case::new();
    let outside: CpuSet = "0-3,^1,9".parse().expect("set");
    assert!(ids(&c.run(&Operation::Pin { vcpu: None, cpus: outside }), Severity::Error).contains(&"pin.host-cpus"));
    let fine: CpuSet = "0-3,^1".parse().expect("set");
    assert!(c.run(&Operation::Pin { vcpu: Some(0), cpus: fine.clone() }).is_empty());
    assert!(ids(&c.run(&Operation::Pin { vcpu: Some(8), cpus: fine }), Severity::Error).contains(&"pin.vcpu"));
}

#[test]
fn numatune_nodes_and_strict_free() {
    let mut stopped = Case::new();
    stopped.running = false;
    let bad_node = Operation::Numatune { mode: Some(NumaMode::Strict), nodeset: Some("3".parse().expect("set")) };
    assert!(ids(&stopped.run(&bad_node), Severity::Error).contains(&"numatune.nodes"));
    // Node 1 has 1 GiB free, the guest needs 8 GiB.
    let tight = Operation::Numatune { mode: Some(NumaMode::Strict), nodeset: Some("1".parse().expect("set")) };
    assert!(ids(&stopped.run(&tight), Severity::Error).contains(&"numatune.strict-free"));
    let roomy = Operation::Numatune { mode: Some(NumaMode::Strict), nodeset: Some("0".parse().expect("set")) };
    assert!(stopped.run(&roomy).is_empty());
    let preferred = Operation::Numatune { mode: Some(NumaMode::Preferred), nodeset: Some("1".parse().expect("set")) };
    assert!(stopped.run(&preferred).is_empty(), "preferred may spill to other nodes");
}

#[test]
fn numa_cell_pinning() {
    let bad = Case::new().xml("<vcpupin vcpu='4' cpuset='4-7'/>", "<vcpupin vcpu='4' cpuset='0-3'/>");
    assert_rule("numa.cell-pinning", Severity::Warning, &bad, &Case::new(), &Operation::Readiness);
}

#[test]
fn unknown_elements_do_not_disturb_the_reading() {
    let f = dom(READY);
    assert_eq!((f.vcpus_current, f.vcpus_max), (2, 8));
    assert_eq!(f.cells.len(), 2);
    assert_eq!(f.cells[1].memory, Bytes(4 * GIB));
    assert_eq!(f.dimms[0].base, Some(0x2_4000_0000));
    assert_eq!(f.free_slots(), 7);
    assert_eq!(f.channels.get("org.vmplug.guest.0").and_then(|p| p.as_deref()), Some("/run/vmplug/web1.agent"));
    assert_eq!(f.memnodes.get(&1).map(|(m, s)| (m.as_str(), s.to_string())), Some(("strict", "1".to_string())));
}

fn planned(plan: DimmPlanning) -> Operation {
    Operation::Memory { size: Bytes(GIB), node: Some(1), dimms: 1, first_wave: Bytes(GIB), plan }
}

/// What the DIMM planner could not do is its rule's hard error, in the
/// planner's words (it knows the layout it tried): first among the errors,
/// and `--force` does not pass it.
#[test]
fn the_dimm_planners_verdicts_are_hard_rules() {
    let unit = Bytes(128 * MIB);
    let cases = [
        (
            "mem.block-align",
            PlanError::Misaligned {
                size: Bytes(100 * MIB),
                what: "the guest's memory block size",
                unit,
                down: Bytes(0),
                up: unit,
            },
        ),
        (
            "mem.round-up",
            PlanError::RoundUpTooFar {
                size: Bytes(100 * MIB),
                what: "the guest's memory block size",
                unit,
                up: unit,
                ceiling: Bytes(64 * MIB),
            },
        ),
        ("mem.max-dimm", PlanError::UnitOverMaxDimm { what: "the hugepage size", unit: Bytes(GIB), max_dimm: unit }),
        ("mem.slots", PlanError::NoSlots { needed: 9, free: 7 }),
        ("mem.node", PlanError::NoSuchNode(5, "0, 1".into())),
        ("mem.numa", PlanError::NoCells),
        ("mem.plan", PlanError::Zero),
    ];
    let c = Case::new();
    for (id, e) in cases {
        let f = c.run(&planned(DimmPlanning { error: Some(e.clone()), ..Default::default() }));
        let errors: Vec<&Finding> = f.iter().filter(|x| x.severity == Severity::Error).collect();
        assert_eq!(errors.len(), 1, "{id}: {f:#?}");
        assert_eq!((errors[0].id, errors[0].message.as_str(), errors[0].hard), (id, e.to_string().as_str(), true));
        let Err(NotPlanned::Refused(r)) = gate(f, true, vec![]) else { panic!("{id}: forced past a hard rule") };
        assert_eq!(r.findings[0].id, id);
    }
    // Without a planner verdict, none of them fires on the ready fixture.
    assert!(ids(&c.run(&planned(DimmPlanning::default())), Severity::Error).is_empty());
}

#[test]
fn the_dimm_plans_own_rules() {
    let c = Case::new();
    // Rounded up: said, not refused.
    let f = c.run(&planned(DimmPlanning {
        total: Bytes(GIB),
        rounded_from: Some(Bytes(1000 * MIB)),
        unit: Bytes(128 * MIB),
        ..Default::default()
    }));
    let w: Vec<&Finding> = f.iter().filter(|x| x.id == "mem.round-up").collect();
    assert_eq!(w.len(), 1, "{f:#?}");
    assert_eq!(
        (w[0].severity, w[0].message.as_str()),
        (Severity::Warning, "1000 MiB rounded up to 1 GiB (alignment 128 MiB)")
    );
    // A plan of nothing, and a request id that already attached more.
    let nothing = c.run(&planned(DimmPlanning { total: Bytes(MIB / 2), empty: true, ..Default::default() }));
    assert!(
        nothing.iter().any(|x| x.id == "mem.plan" && x.hard && x.message.contains("makes no DIMM")),
        "{nothing:#?}"
    );
    let again =
        DimmPlanning { total: Bytes(GIB), request_id: "r1".into(), already: Bytes(2 * GIB), ..Default::default() };
    let f = c.run(&planned(again.clone()));
    assert!(
        f.iter()
            .any(|x| x.id == "mem.request-id" && x.hard && x.message.starts_with("request r1 already attached 2 GiB")),
        "{f:#?}"
    );
    let fits = c.run(&planned(DimmPlanning { already: Bytes(GIB), ..again }));
    assert!(!fits.iter().any(|x| x.id == "mem.request-id"), "{fits:#?}");
}

/// resize-memory's own rules, on what its plan measured: each one hard (no
/// `--force` passes it), and none on a change that fits.
#[test]
fn the_resize_plans_rules() {
    let fits = ResizePlanning {
        scope: "guest node 1".into(),
        devices: 1,
        before: Bytes(5 * GIB),
        fixed: Bytes(4 * GIB),
        plugged: Bytes(GIB),
        capacity: Bytes(4 * GIB),
        unit: Bytes(2 * MIB),
        target: Bytes(2 * GIB),
        floor: None,
    };
    let run = |p: &ResizePlanning| {
        Case::new().run(&Operation::Resize { grow: Bytes(GIB), node: Some(1), plan: Some(p.clone()) })
    };
    let only = |p: ResizePlanning, id: &str, message: &str| {
        let f = run(&p);
        let errors: Vec<&Finding> = f.iter().filter(|x| x.severity == Severity::Error).collect();
        assert_eq!(errors.len(), 1, "{id}: {f:#?}");
        assert_eq!((errors[0].id, errors[0].message.as_str(), errors[0].hard), (id, message, true));
        assert!(matches!(gate(f, true, vec![]), Err(NotPlanned::Refused(_))), "{id} forced");
    };
    assert!(ids(&run(&fits), Severity::Error).is_empty(), "{:#?}", run(&fits));
    only(
        ResizePlanning { devices: 0, ..fits.clone() },
        "vmem.device",
        "'web1' has no virtio-mem device on guest node 1: add one with `vmplug add-virtio-mem` (or use attach-memory for DIMMs)",
    );
    only(
        ResizePlanning { target: Bytes(GIB), floor: Some(FloorBreach::BelowFixed), ..fits.clone() },
        "vmem.floor",
        "guest node 1 cannot go below 4 GiB: that is its boot memory and DIMMs, which virtio-mem does not hold",
    );
    only(
        ResizePlanning { target: Bytes(GIB), floor: Some(FloorBreach::GiveBack(Bytes(2 * GIB))), ..fits.clone() },
        "vmem.floor",
        "guest node 1's virtio-mem devices hold 1 GiB: they cannot give back 2 GiB",
    );
    only(
        ResizePlanning { target: Bytes(GIB + MIB), ..fits.clone() },
        "vmem.block-align",
        "1 MiB is not a multiple of the devices' block size 2 MiB: use a multiple",
    );
    only(
        ResizePlanning { target: Bytes(6 * GIB), ..fits.clone() },
        "vmem.size",
        "guest node 1's virtio-mem devices hold at most 4 GiB (1 GiB plugged): 6 GiB does not fit; add a device (`vmplug add-virtio-mem`) or use DIMMs",
    );
    only(
        ResizePlanning { target: Bytes(GIB), ..fits.clone() },
        "vmem.plan",
        "guest node 1 already has 5 GiB: nothing to change",
    );
}

/// detach-memory of a DIMM the domain lacks: refused, naming what it has, and
/// no --force passes it.
#[test]
fn unplug_dimm() {
    let op = Operation::Unplug { live_only: vec![], without_address: vec![], unmatched: Some("alias 'x'".into()) };
    let f = Case::new().run(&op);
    let e: Vec<&Finding> = f.iter().filter(|x| x.id == "unplug.dimm").collect();
    assert_eq!(e.len(), 1, "{f:#?}");
    assert!(e[0].hard && e[0].message == "no DIMM of 'web1' has alias 'x'; its DIMMs: dimm0", "{f:#?}");
    assert!(!Case::new().run(&unplug(&[], &[])).iter().any(|x| x.id == "unplug.dimm"));
}

/// resize-memory's device rules over the domain's virtio-mem devices in the
/// resize's scope: the guest's driver, a device still settling, a device the
/// live XML does not place (only when the guest confirms).
#[test]
fn the_resize_device_rules() {
    const VMEM: &str = include_str!("fixtures/x86-virtio-mem.xml");
    let plan = ResizePlanning {
        devices: 1,
        unit: Bytes(2 * MIB),
        target: Bytes(GIB),
        capacity: Bytes(2 * GIB),
        ..Default::default()
    };
    let op = |node| Operation::Resize { grow: Bytes(GIB), node: Some(node), plan: Some(plan.clone()) };
    let mut c = Case { dom: dom(VMEM), affect: Affect::Live, ..Case::new() };
    let errors = |c: &Case, node| ids(&c.run(&op(node)), Severity::Error);
    assert!(errors(&c, 0).is_empty(), "{:#?}", c.run(&op(0)));
    // The driver: not loaded, or an agent too old to say.
    if let Some(g) = c.guest.as_mut() {
        g.virtio_mem_devices = None;
    }
    let e = c.run(&op(0));
    assert!(
        e.iter().any(|x| x.id == "vmem.guest-driver"
            && x.severity == Severity::Error
            && x.message.contains("cannot confirm")),
        "{e:#?}"
    );
    let unwaited = Case { no_wait: true, ..c.clone() }.run(&op(0));
    assert!(unwaited.iter().any(|x| x.id == "vmem.guest-driver" && x.severity == Severity::Warning), "{unwaited:#?}");
    if let Some(g) = c.guest.as_mut() {
        g.capabilities = vec!["virtio-mem".into()];
    }
    assert!(errors(&c, 0).contains(&"vmem.guest-driver"), "{:#?}", c.run(&op(0)));
    // Settling: node 1's device has not reached what it was asked.
    let moving = Case {
        dom: dom(&VMEM.replace("<current unit='KiB'>524288</current>", "<current unit='KiB'>262144</current>")),
        ..c.clone()
    };
    let w = moving.run(&op(1));
    assert!(
        w.iter().any(|x| x.id == "vmem.settling"
            && x.severity == Severity::Warning
            && x.message.starts_with("virtiomem1 still moves from 256 MiB to its requested 512 MiB")),
        "{w:#?}"
    );
    assert!(!moving.run(&op(0)).iter().any(|x| x.id == "vmem.settling"), "node 0's device is not in scope");
    // No region base: an error only when the guest confirms.
    let unplaced =
        Case { dom: dom(&VMEM.replace("<address base='0x300000000'/>", "")), guest: Some(guest()), ..c.clone() };
    assert!(errors(&unplaced, 0).contains(&"vmem.no-address"), "{:#?}", unplaced.run(&op(0)));
    let blind = Case { no_wait: true, ..unplaced.clone() };
    assert!(!blind.run(&op(0)).iter().any(|x| x.id == "vmem.no-address"));
}

/// `prepare`'s proposal, judged by the same rules as the live verbs: each
/// bound and count by its rule, and a sound proposal by none at all (no rule
/// of a live verb speaks about a definition not yet written).
#[test]
fn a_prepare_proposal_is_judged_by_the_rules_of_its_constraints() {
    let ok = Proposal {
        current: 2,
        max_vcpus: 8,
        cells: 2,
        per_socket: 1,
        slots: 16,
        max_memory: Bytes(32 * GIB),
        host_nodes: Some("0-1".parse().expect("set")),
        strict: vec![StrictCell {
            cell: 0,
            node: 0,
            memory: Bytes(4 * GIB),
            free: Bytes(16 * GIB),
            node_need: Bytes(4 * GIB),
        }],
        channel_path: Some("/run/vmplug/web1.agent".into()),
    };
    let c = Case { running: false, state: DomainState::ShutOff, guest: None, affect: Affect::Config, ..Case::new() };
    let run = |p: Proposal| c.run(&Operation::Prepare(Box::new(p)));
    assert_eq!(run(ok.clone()), vec![], "a sound proposal");
    let only = |p: Proposal, id: &str, text: &str| {
        let f = run(p);
        let errors: Vec<&Finding> = f.iter().filter(|x| x.severity == Severity::Error).collect();
        assert!(errors.len() == 1 && errors[0].id == id && errors[0].message.contains(text), "{id}: {f:#?}");
    };
    only(Proposal { max_vcpus: 5000, ..ok.clone() }, "cpu.max", "5000 vCPUs requested: at most 4096");
    only(Proposal { max_vcpus: 1, cells: 1, ..ok.clone() }, "cpu.max", "1 vCPUs is below the 2");
    only(
        Proposal { per_socket: 3, ..ok.clone() },
        "cpu.cores-multiple",
        "8 vCPUs is not a multiple of the topology's 3",
    );
    only(Proposal { cells: 200, ..ok.clone() }, "cpu.socket-cell", "200 guest NUMA cells requested: at most 128");
    only(Proposal { cells: 9, ..ok.clone() }, "cpu.socket-cell", "9 guest NUMA cells for 8 sockets");
    only(Proposal { slots: 0, ..ok.clone() }, "mem.slots", "0 memory slots");
    only(Proposal { slots: 300, ..ok.clone() }, "mem.slots", "300 memory slots requested");
    only(
        Proposal { max_memory: Bytes(GIB), ..ok.clone() },
        "mem.max-memory",
        "max memory 1 GiB is below the current memory",
    );
    only(
        Proposal { host_nodes: Some(vmplug_common::CpuSet::new()), ..ok.clone() },
        "numatune.nodes",
        "--host-nodes is empty",
    );
    only(
        Proposal { host_nodes: Some("3".parse().expect("set")), ..ok.clone() },
        "numatune.nodes",
        "host NUMA node 3 does not exist",
    );
    let tight = StrictCell { free: Bytes(GIB), ..ok.strict[0].clone() };
    only(
        Proposal { strict: vec![tight], ..ok.clone() },
        "numatune.strict-free",
        "strict binding of cell 0 (4 GiB) to host node 0 with 1 GiB free",
    );
    only(
        Proposal { channel_path: Some("agent.sock".into()), ..ok.clone() },
        "prepare.channel-path",
        "'agent.sock' is not absolute",
    );
    let arm = Case {
        dom: dom(&READY.replace("arch='x86_64' machine='pc-q35-10.0'", "arch='aarch64' machine='virt-4.0'")),
        ..c.clone()
    };
    let f = arm.run(&Operation::Prepare(Box::new(ok.clone())));
    assert!(
        f.iter().any(|x| x.id == "cpu.machine" && x.message.contains("the guide requires virt-4.1 or newer")),
        "{f:#?}"
    );
}

#[test]
fn every_rule_has_a_test_here() {
    let src = include_str!("preflight.rs");
    for (id, _) in vmplug::preflight::RULES {
        // Findings carry the rule id or a refinement of it (mem.guest → mem.guest-acpi).
        assert!(src.contains(&format!("\"{id}")), "no test asserts on rule {id}");
    }
}

fn unplug(live_only: &[&str], without_address: &[&str]) -> Operation {
    Operation::Unplug {
        live_only: live_only.iter().map(|s| s.to_string()).collect(),
        without_address: without_address.iter().map(|s| s.to_string()).collect(),
        unmatched: None,
    }
}

#[test]
fn unplug_live_only() {
    // Both: the DIMM must also leave the definition, which does not have it.
    let op = unplug(&["ua-vmplug-a-0"], &[]);
    let b = Case::new().run(&op);
    assert!(ids(&b, Severity::Error).contains(&"unplug.live-only"), "{b:#?}");
    let mut live = Case::new();
    live.affect = Affect::Live;
    assert!(!live.run(&op).iter().any(|f| f.id == "unplug.live-only"), "--live alone is fine");
    assert!(!Case::new().run(&unplug(&[], &[])).iter().any(|f| f.id == "unplug.live-only"));
}

#[test]
fn unplug_no_address() {
    let b = Case::new().run(&unplug(&[], &["dimm0"]));
    assert!(ids(&b, Severity::Error).contains(&"unplug.no-address"), "{b:#?}");
    let mut config = Case::new();
    config.affect = Affect::Config;
    assert!(!config.run(&unplug(&[], &["dimm0"])).iter().any(|f| f.id == "unplug.no-address"));
}

#[test]
fn unplug_needs_the_agent_even_without_waiting() {
    let mut bad = Case::new();
    bad.guest = None;
    let f = bad.run(&unplug(&[], &[]));
    assert!(ids(&f, Severity::Error).contains(&"agent.ready"), "{f:#?}");
}

/// `check DOM` alone says what a CPU hot-plug would refuse for the domain itself.
#[test]
fn placement_is_part_of_readiness() {
    let bad = Case::new().xml("<vcpu placement='static'", "<vcpu placement='auto'");
    let f = bad.run(&Operation::Readiness);
    assert!(ids(&f, Severity::Error).contains(&"cpu.placement"), "{f:#?}");
}

#[test]
fn cpu_guest_present_and_persist_guest_level() {
    // The guest has vCPUs 0-1 present: --guest moves CPUs among those only.
    let op = |target| Operation::GuestVcpus { target };
    let c = Case::new();
    let mut four = Case::new();
    if let Some(g) = four.guest.as_mut() {
        g.cpus.present = "0-3".parse().expect("set");
    }
    assert_rule("cpu.guest-present", Severity::Error, &c, &four, &op(3));
    assert!(!c.run(&op(2)).iter().any(|f| f.id == "cpu.guest-present"));
    assert!(ids(&c.run(&op(0)), Severity::Error).contains(&"cpu.guest-present"), "at least one CPU");
    assert!(ids(&c.run(&op(2)), Severity::Warning).contains(&"persist.guest-level"));
    let mut no_agent = Case::new();
    no_agent.guest = None;
    assert!(ids(&no_agent.run(&op(2)), Severity::Error).contains(&"agent.ready"), "the agent does the work");
}

fn vmem_detach(alias: &str, requested_mib: u64, current_mib: u64) -> Operation {
    let dev = |n: usize, req: u64, cur: u64| vmplug::xml::VirtioMem {
        index: n,
        size: Bytes(GIB),
        node: Some(n as u32),
        block: Bytes(2 * 1024 * 1024),
        requested: Bytes(req * 1024 * 1024),
        current: Some(Bytes(cur * 1024 * 1024)),
        base: Some((4 + n as u64) * GIB),
        alias: Some(format!("virtiomem{n}")),
    };
    Operation::VirtioMemDetach { alias: alias.into(), devices: vec![dev(0, 0, 0), dev(1, requested_mib, current_mib)] }
}

#[test]
fn vmem_detach_needs_an_empty_device_that_exists() {
    let plugged = Case::new().run(&vmem_detach("virtiomem1", 256, 256));
    let f = plugged.iter().find(|f| f.id == "vmem.plugged").expect("vmem.plugged");
    assert!(f.message.contains("resize-memory") && f.message.contains("-256 MiB --node 1"), "{}", f.message);
    // Still settling towards a requested size: refused too.
    let settling = Case::new().run(&vmem_detach("virtiomem1", 256, 0));
    assert!(ids(&settling, Severity::Error).contains(&"vmem.plugged"), "{settling:#?}");
    let empty = Case::new().run(&vmem_detach("virtiomem0", 256, 256));
    assert!(!empty.iter().any(|f| f.id.starts_with("vmem.")), "{empty:#?}");
    let unknown = Case::new().run(&vmem_detach("virtiomem7", 0, 0));
    let f = unknown.iter().find(|f| f.id == "vmem.alias").expect("vmem.alias");
    assert!(f.message.contains("virtiomem0, virtiomem1"), "{}", f.message);
}

#[test]
fn add_virtio_mem_places_a_whole_block_device_on_a_node() {
    let add = |size: u64, node: Option<u32>, block: u64| Operation::AddVirtioMem {
        size: Bytes(size),
        node,
        block: Bytes(block),
    };
    let mib = 1024 * 1024;
    let ok = Case::new().run(&add(GIB, Some(1), 2 * mib));
    assert!(ok.is_empty(), "{ok:#?}");
    let b = Case::new().run(&add(GIB, Some(1), 3 * mib));
    assert_eq!(ids(&b, Severity::Error), vec!["vmem.block"], "{b:#?}");
    let b = Case::new().run(&add(GIB + mib, Some(1), 2 * mib));
    assert_eq!(ids(&b, Severity::Error), vec!["vmem.block-align"], "{b:#?}");
    let b = Case::new().run(&add(GIB, None, 2 * mib));
    let f = b.iter().find(|f| f.id == "vmem.node").expect("vmem.node");
    assert_eq!(f.message, "the guest has NUMA cells (0, 1): pass --node");
    let b = Case::new().run(&add(GIB, Some(7), 2 * mib));
    assert_eq!(ids(&b, Severity::Error), vec!["mem.node"], "{b:#?}");
}
