//! `check` says "ready" exactly when the verb would act: over every fixture
//! domain, running or not, with and without a guest agent, with the verbs'
//! option sets, and a table of CPU and memory requests, `check` and the verb
//! (run right after it on the same domain) agree; and a verb that refuses has
//! changed nothing.

mod common;

mod node;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vmplug::domain::{Affect, Connection, Domain, DomainError, DomainState, NumaParams, SchedParams, XmlView};
use vmplug::fake::{FakeConnection, FakeDomain, Hook};
use vmplug::libvirt::LibvirtConnection;
use vmplug::link::AgentAddr;
use vmplug::ops::{new_request_id, AttachMemory, GuestVcpus, HotplugOpts, MemoryOpts, Setvcpus};
use vmplug::preflight::Severity;
use vmplug::report::Outcome;
use vmplug::tune::{check, CheckRequest, CheckResult};
use vmplug::verb;
use vmplug::vmem::{ResizeMemory, ResizeOpts, SizeChange};
use vmplug::xml::DomainFacts;
use vmplug_common::protocol::ZonePolicy;
use vmplug_common::{Bytes, CpuSet, GIB, KIB, MIB};

const CAPS: &str = include_str!("fixtures/caps.xml");
const FIXTURES: &[(&str, &str)] = &[
    ("x86-ready", include_str!("fixtures/x86-ready.xml")),
    ("plain", include_str!("fixtures/plain.xml")),
    ("hugepages", include_str!("fixtures/hugepages.xml")),
    ("arm-virt41", include_str!("fixtures/arm-virt41.xml")),
    ("x86-virtio-mem", include_str!("fixtures/x86-virtio-mem.xml")),
];

/// What libvirt's test driver said to one change the verb made, replayed on a copy
/// of the same domain. Tried with `virsh -c test:///…` (libvirt 9): it models
/// `setvcpus` live and config ("requested cpu amount exceeds maximum (9 > 8)",
/// "domain is not running"); it checks a live DIMM `attach-device` (guest NUMA
/// present, node within the cells, `maxMemory` size) and then answers that live
/// memory attach is not supported; it refuses a persistent attach ("unsupported
/// flags (0x2)"), `update-device` of memory, `setvcpus --guest`, `schedinfo`
/// with `--live`/`--config`, and `vcpupin` with explicit flags; it takes
/// `emulatorpin`, `numatune` and `vcpupin` without flags.
// The texts are read through `Debug`, in the failure messages.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Replay {
    Accepted(String),
    /// A live DIMM passed every check the test driver makes.
    Validated(String),
    NotModelled(String),
    Rejected(String, String),
}

/// libvirt's test driver's text for a live DIMM that passed its checks.
const TEST_DRIVER_NO_LIVE_MEMORY: &str = "live attach of device 'memory' is not supported";

/// A domain that is both the fake (which plays every change into the simulated
/// guest) and a copy in libvirt's test driver, which gets every change too.
#[derive(Debug)]
struct Tee {
    fake: Arc<FakeDomain>,
    /// Opened on first use: most refused cases never reach libvirt.
    td: OnceLock<Arc<dyn Domain>>,
    node: TestNode,
    running: bool,
    replays: Mutex<Vec<Replay>>,
}

/// What the test driver's copy is made of.
#[derive(Debug)]
struct TestNode {
    dir: std::path::PathBuf,
    xml: &'static str,
    name: String,
}

impl Tee {
    fn td(&self) -> &Arc<dyn Domain> {
        self.td.get_or_init(|| test_driver_copy(&self.node.dir, self.node.xml, &self.node.name, self.running))
    }
    fn log(&self, what: String, r: Result<(), DomainError>) {
        let entry = match r {
            Ok(()) => Replay::Accepted(what),
            Err(e) if e.to_string().contains(TEST_DRIVER_NO_LIVE_MEMORY) => Replay::Validated(what),
            Err(e) => Replay::Rejected(what, e.to_string()),
        };
        self.replays.lock().expect("replays").push(entry);
    }
    fn not_modelled(&self, what: String) {
        self.replays.lock().expect("replays").push(Replay::NotModelled(what));
    }
    fn replays(&self) -> Vec<Replay> {
        self.replays.lock().expect("replays").clone()
    }
}

impl Domain for Tee {
    fn name(&self) -> &str {
        self.fake.name()
    }
    fn is_active(&self) -> Result<bool, DomainError> {
        self.fake.is_active()
    }
    fn state(&self) -> Result<DomainState, DomainError> {
        self.fake.state()
    }
    fn xml(&self, view: XmlView) -> Result<String, DomainError> {
        self.fake.xml(view)
    }
    fn job_running(&self) -> Result<bool, DomainError> {
        self.fake.job_running()
    }
    fn set_vcpus(&self, count: u32, affect: Affect) -> Result<(), DomainError> {
        self.log(format!("setvcpus {count} {affect:?}"), self.td().set_vcpus(count, affect));
        self.fake.set_vcpus(count, affect)
    }
    fn attach_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        if xml.contains("model='dimm'") && affect.resolve(self.running).live() {
            self.log(format!("attach-device (live) {xml}"), self.td().attach_device(xml, Affect::Live));
        } else {
            self.not_modelled(format!("attach-device {affect:?}"));
        }
        self.fake.attach_device(xml, affect)
    }
    fn detach_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        self.not_modelled(format!("detach-device {affect:?}"));
        self.fake.detach_device(xml, affect)
    }
    fn update_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        self.not_modelled(format!("update-device {affect:?}"));
        self.fake.update_device(xml, affect)
    }
    fn scheduler(&self, affect: Affect) -> Result<SchedParams, DomainError> {
        self.fake.scheduler(affect)
    }
    fn set_scheduler(&self, p: &SchedParams, affect: Affect) -> Result<(), DomainError> {
        self.log(format!("schedinfo {affect:?}"), self.td().set_scheduler(p, affect));
        self.fake.set_scheduler(p, affect)
    }
    fn pin_emulator(&self, cpus: &CpuSet, host_cpus: u32, affect: Affect) -> Result<(), DomainError> {
        self.log(format!("emulatorpin {cpus} {affect:?}"), self.td().pin_emulator(cpus, host_cpus, affect));
        self.fake.pin_emulator(cpus, host_cpus, affect)
    }
    fn pin_vcpu(&self, vcpu: u32, cpus: &CpuSet, host_cpus: u32, affect: Affect) -> Result<(), DomainError> {
        self.log(format!("vcpupin {vcpu} {cpus} {affect:?}"), self.td().pin_vcpu(vcpu, cpus, host_cpus, affect));
        self.fake.pin_vcpu(vcpu, cpus, host_cpus, affect)
    }
    fn numa(&self, affect: Affect) -> Result<NumaParams, DomainError> {
        self.fake.numa(affect)
    }
    fn set_numa(&self, p: &NumaParams, affect: Affect) -> Result<(), DomainError> {
        self.log(format!("numatune {affect:?}"), self.td().set_numa(p, affect));
        self.fake.set_numa(p, affect)
    }
    fn metadata(&self, ns: &str, view: XmlView) -> Result<Option<String>, DomainError> {
        self.fake.metadata(ns, view)
    }
    fn set_metadata(&self, ns: &str, key: &str, element: Option<&str>, affect: Affect) -> Result<(), DomainError> {
        self.fake.set_metadata(ns, key, element, affect)
    }
}

/// The fake connection, whose one domain is the [`Tee`].
#[derive(Debug)]
struct TeeConnection {
    fake: Arc<FakeConnection>,
    tee: Arc<Tee>,
}

impl Connection for TeeConnection {
    fn uri(&self) -> String {
        self.fake.uri()
    }
    fn capabilities(&self) -> Result<String, DomainError> {
        self.fake.capabilities()
    }
    fn domain_capabilities(&self, arch: &str, machine: &str, virt_type: &str) -> Result<String, DomainError> {
        self.fake.domain_capabilities(arch, machine, virt_type)
    }
    fn cells_free_memory(&self, nodes: u32) -> Result<Vec<u64>, DomainError> {
        self.fake.cells_free_memory(nodes)
    }
    fn lookup(&self, name: &str) -> Result<Arc<dyn Domain>, DomainError> {
        self.fake.lookup(name)?;
        Ok(self.tee.clone())
    }
    fn list_domains(&self) -> Result<Vec<String>, DomainError> {
        self.fake.list_domains()
    }
    fn define(&self, xml: &str) -> Result<(), DomainError> {
        self.fake.define(xml)
    }
}

/// A domain, and (with `agent`) a simulated guest kernel with the real agent on a
/// Unix socket, into which the fake hypervisor plays every plug; every change is
/// also replayed on a copy of the domain in libvirt's test driver.
struct World {
    _dir: tempfile::TempDir,
    dom: Arc<FakeDomain>,
    tee: Arc<Tee>,
    conn: Arc<TeeConnection>,
    agent: Option<AgentAddr>,
}

/// The fixture as the only domain of a test driver node, running or shut off
/// (libvirt's virDomainState 1 or 5).
fn test_driver_copy(dir: &std::path::Path, xml: &str, name: &str, running: bool) -> Arc<dyn Domain> {
    let ns = "xmlns:test='http://libvirt.org/schemas/domain/test/1.0'";
    let state = if running { 1 } else { 5 };
    let doc = xml.trim_start_matches(|c| c != '<').replacen("<domain ", &format!("<domain {ns} "), 1);
    let doc = doc.replacen("</domain>", &format!("<test:runstate>{state}</test:runstate></domain>"), 1);
    let uri = node::test_node(dir, &doc);
    let conn = LibvirtConnection::open(Some(&uri)).expect("the test driver opens the fixture's node");
    let dom = conn.lookup(name).expect("the test driver holds the fixture");
    assert_eq!(dom.is_active().expect("state"), running, "{name}: the test driver's copy is in the state asked");
    dom
}

async fn world(xml: &'static str, running: bool, agent: bool) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let facts = DomainFacts::parse(xml).expect("fixture parses");
    let name = facts.name;
    let mut hook: Option<Hook> = None;
    let mut addr = None;
    if agent {
        // 1 GiB of boot memory over the two nodes: enough for every rule.
        let kernel = common::kernel(dir.path(), 16, 8);
        // An honest guest: as many CPUs online as the domain has vCPUs.
        (2..facts.vcpus_current).for_each(|c| kernel.add_cpu(c, true));
        let (agent, sock) = common::serve_agent(dir.path(), &kernel);
        hook = Some(common::plays_hypervisor(&kernel, agent));
        addr = Some(AgentAddr::Serial { path: sock });
    }
    let dom = FakeDomain::new(&name, xml, hook);
    dom.set_running(running);
    let fake = FakeConnection::new(CAPS, vec![dom.clone()]);
    let node = TestNode { dir: dir.path().to_path_buf(), xml, name };
    let tee = Arc::new(Tee { fake: dom.clone(), td: OnceLock::new(), node, running, replays: Mutex::new(vec![]) });
    let conn = Arc::new(TeeConnection { fake, tee: tee.clone() });
    World { _dir: dir, dom, tee, conn, agent: addr }
}

#[derive(Debug, Clone, Copy)]
enum Req {
    Cpus(u32),
    /// `setvcpus --guest`
    GuestCpus(u32),
    /// size, node, round up
    Mem(u64, Option<u32>, bool),
    /// virtio-mem: the change, node
    Resize(SizeChange, Option<u32>),
}

fn resize_opts(change: SizeChange, node: Option<u32>) -> ResizeOpts {
    ResizeOpts { change, node, settle: Duration::from_millis(300) }
}

/// The verbs' options. `timeout` bounds the wait for the guest: generous where
/// the guest should complete (it only bounds a hang), short where the model
/// expects the guest never to (a forced misaligned DIMM).
fn opts(affect: Affect, agent: Option<AgentAddr>, no_wait: bool, force: bool, timeout: Duration) -> HotplugOpts {
    HotplugOpts {
        affect,
        timeout,
        // The agent is there or its socket is not: connecting never needs to wait.
        agent_wait: Duration::from_secs(30),
        no_wait,
        force,
        agent,
        zone: ZonePolicy::Auto,
    }
}

fn mem_opts(size: u64, node: Option<u32>, round_up: bool) -> MemoryOpts {
    MemoryOpts {
        size: Bytes(size),
        node,
        round_up,
        ceiling: None,
        max_dimm: Bytes(4 * GIB),
        request_id: new_request_id(),
    }
}

/// Runs `check` then the verb; returns (check's verdict, the verb's outcome, calls
/// made by a refused verb), or the usage error both must give.
async fn both(
    w: &World,
    name: &str,
    req: Req,
    o: &HotplugOpts,
) -> Result<(CheckResult, Outcome, Vec<String>), (String, String)> {
    let creq = match req {
        Req::Cpus(n) => CheckRequest { cpus: Some(n), guest: false, memory: None, resize: None, opts: o.clone() },
        Req::GuestCpus(n) => CheckRequest { cpus: Some(n), guest: true, memory: None, resize: None, opts: o.clone() },
        Req::Mem(size, node, up) => CheckRequest {
            cpus: None,
            guest: false,
            memory: Some(mem_opts(size, node, up)),
            resize: None,
            opts: o.clone(),
        },
        Req::Resize(change, node) => CheckRequest {
            cpus: None,
            guest: false,
            memory: None,
            resize: Some(resize_opts(change, node)),
            opts: o.clone(),
        },
    };
    let c = check(w.conn.clone(), name, &creq).await;
    let v = match req {
        Req::Cpus(n) => verb::run(&Setvcpus { target: n }, w.conn.clone(), name, o).await,
        Req::GuestCpus(n) => verb::run(&GuestVcpus { target: n }, w.conn.clone(), name, o).await,
        Req::Mem(size, node, up) => {
            verb::run(&AttachMemory { mem: mem_opts(size, node, up) }, w.conn.clone(), name, o).await
        }
        Req::Resize(change, node) => {
            verb::run(&ResizeMemory { r: resize_opts(change, node) }, w.conn.clone(), name, o).await
        }
    };
    match (c, v) {
        (Ok(c), Ok(v)) => Ok((c, v.outcome, w.dom.calls())),
        (Err(ce), Err(ve @ DomainError::Usage(_))) => Err((ce.to_string(), ve.to_string())),
        (c, v) => panic!("check and verb disagree on the kind of answer: {c:?} vs {v:?}"),
    }
}

const REQUESTS: [Req; 25] = [
    Req::GuestCpus(0),
    Req::GuestCpus(1),
    Req::GuestCpus(2),
    Req::GuestCpus(40),
    Req::Cpus(1),
    Req::Cpus(2),
    Req::Cpus(4),
    Req::Cpus(8),
    Req::Cpus(9),
    Req::Mem(128 * MIB, Some(0), false),
    Req::Mem(GIB, None, false),
    Req::Mem(GIB, Some(9), false),
    Req::Mem(100 * MIB, Some(0), false),
    Req::Mem(100 * MIB, Some(0), true),
    Req::Mem(KIB, Some(0), false),
    Req::Mem(250 * GIB, Some(0), false),
    Req::Mem(7 * GIB, None, false),
    Req::Resize(SizeChange::Grow(Bytes(512 * MIB)), Some(0)),
    Req::Resize(SizeChange::Grow(Bytes(GIB)), None),
    Req::Resize(SizeChange::Grow(Bytes(3 * MIB)), Some(0)),
    Req::Resize(SizeChange::Grow(Bytes(3 * GIB)), Some(0)),
    Req::Resize(SizeChange::Shrink(Bytes(512 * MIB)), Some(1)),
    Req::Resize(SizeChange::Shrink(Bytes(GIB)), Some(1)),
    Req::Resize(SizeChange::To(Bytes(10 * GIB)), None),
    Req::Resize(SizeChange::Grow(Bytes(512 * MIB)), Some(9)),
];

/// What the fixtures declare, read by eye from each file (not through vmplug's
/// parser): the facts the guide's constraints are about.
struct Declared {
    fixture: &'static str,
    vcpus_current: u32,
    vcpus_max: u32,
    /// `<topology cores=…>`, when declared.
    cores: Option<u32>,
    /// `<maxMemory>` and its slots, when declared.
    max_memory: Option<(u64, u32)>,
    /// `<memory>`: boot memory and every memory device.
    memory: u64,
    dimms: u32,
    numa_cells: u32,
    hugepage: Option<u64>,
    virtio_net: u32,
    /// virtio-mem devices: (node, size, requested, block).
    virtio_mem: &'static [(u32, u64, u64, u64)],
}

const DECLARED: &[Declared] = &[
    Declared {
        fixture: "x86-ready",
        vcpus_current: 2,
        vcpus_max: 8,
        cores: Some(2),
        max_memory: Some((16 * GIB, 8)),
        memory: 8 * GIB,
        dimms: 1,
        numa_cells: 2,
        hugepage: None,
        virtio_net: 1,
        virtio_mem: &[],
    },
    Declared {
        fixture: "plain",
        vcpus_current: 2,
        vcpus_max: 2,
        cores: None,
        max_memory: None,
        memory: 4 * GIB,
        dimms: 0,
        numa_cells: 0,
        hugepage: None,
        virtio_net: 0,
        virtio_mem: &[],
    },
    Declared {
        fixture: "hugepages",
        vcpus_current: 4,
        vcpus_max: 4,
        cores: None,
        max_memory: None,
        memory: 3 * GIB,
        dimms: 0,
        numa_cells: 0,
        hugepage: Some(GIB),
        virtio_net: 0,
        virtio_mem: &[],
    },
    Declared {
        fixture: "arm-virt41",
        vcpus_current: 4,
        vcpus_max: 4,
        cores: Some(2),
        max_memory: None,
        memory: 32 * GIB,
        dimms: 0,
        numa_cells: 0,
        hugepage: None,
        virtio_net: 0,
        virtio_mem: &[],
    },
    Declared {
        fixture: "x86-virtio-mem",
        vcpus_current: 2,
        vcpus_max: 8,
        cores: Some(2),
        max_memory: Some((16 * GIB, 8)),
        memory: 13 * GIB,
        dimms: 1,
        numa_cells: 2,
        hugepage: None,
        virtio_net: 1,
        virtio_mem: &[(0, 2 * GIB, 0, 2 * MIB), (1, 2 * GIB, 512 * MIB, 2 * MIB)],
    },
];

/// The simulated guest of [`world`]: 16 possible CPUs, memory blocks of 128 MiB.
const GUEST_POSSIBLE_CPUS: u32 = 16;
const GUEST_BLOCK: u64 = 128 * MIB;
/// The largest DIMM the verbs are given (`mem_opts`).
const MAX_DIMM: u64 = 4 * GIB;

/// How a broken constraint shows when one acts anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaks {
    /// libvirt (or the hypervisor behind it) refuses the change.
    Libvirt,
    /// libvirt takes it, the guest cannot complete it (no agent to confirm, a
    /// block that never appears whole).
    Guest,
    /// The guide advises against it: it may work here and hang a real guest
    /// (a soft lockup, an out-of-memory guest).
    Advice,
}

/// The world a request meets, as the model sees it.
struct Situation<'a> {
    d: &'a Declared,
    running: bool,
    agent: bool,
    affect: Affect,
}

/// The guide's constraints (openEuler's "管理系统资源", DESIGN.md's list), written
/// here without vmplug's planners: every one the request breaks, by name.
fn model(s: &Situation, req: Req) -> Vec<(&'static str, Breaks)> {
    let d = s.d;
    let affect = s.affect.resolve(s.running);
    let mut broken = vec![];
    let mut brk = |cond: bool, why: &'static str, how: Breaks| {
        if cond {
            broken.push((why, how))
        }
    };
    // A live change needs a running domain (libvirt: "domain is not running").
    brk(affect.live() && !s.running, "live change of a stopped domain", Breaks::Libvirt);
    // What only the guest can say (its block size) is known when its agent answers.
    let guest_known = s.running && s.agent;
    match req {
        Req::Cpus(n) => {
            brk(n > d.vcpus_max, "more vCPUs than the maximum", Breaks::Libvirt);
            brk(n > GUEST_POSSIBLE_CPUS && affect.live(), "more vCPUs than the guest kernel's possible", Breaks::Guest);
            // "强烈建议每次新增的CPU数目为Cores的整数倍": about CPUs added.
            let added = n.saturating_sub(d.vcpus_current);
            brk(d.cores.is_some_and(|c| added % c != 0), "an increment not a multiple of the cores", Breaks::Advice);
        }
        Req::GuestCpus(n) => {
            // Entirely the guest's: a running guest with the agent, within its vCPUs.
            brk(!s.running, "no guest runs", Breaks::Guest);
            brk(!s.agent, "no agent in the guest", Breaks::Guest);
            brk(n > d.vcpus_current, "more CPUs online than the guest has", Breaks::Guest);
            // cpu0 has no `online` file: a guest keeps at least one CPU.
            brk(n == 0, "no CPU left online", Breaks::Guest);
        }
        Req::Mem(size, node, round_up) => {
            let size = if round_up { size.div_ceil(GUEST_BLOCK) * GUEST_BLOCK } else { size };
            let Some((max, slots)) = d.max_memory else {
                brk(true, "no <maxMemory>", Breaks::Libvirt);
                return broken;
            };
            brk(d.numa_cells == 0, "no guest NUMA", Breaks::Libvirt);
            brk(node.is_some_and(|n| n >= d.numa_cells), "a guest node that does not exist", Breaks::Libvirt);
            brk(d.memory + size > max, "beyond <maxMemory>", Breaks::Libvirt);
            let free = slots.min(64 - d.virtio_net) - d.dimms;
            brk(size.div_ceil(MAX_DIMM) > u64::from(free), "no free slot", Breaks::Libvirt);
            // The guest's block size is known only from a running guest's agent.
            brk(guest_known && size % GUEST_BLOCK != 0, "not a multiple of the guest's block size", Breaks::Guest);
            brk(d.hugepage.is_some_and(|h| size % h != 0), "not a multiple of the hugepage size", Breaks::Libvirt);
            brk(d.memory < 4 * GIB, "a Linux guest with less than 4 GiB", Breaks::Advice);
        }
        Req::Resize(change, node) => {
            if d.virtio_mem.is_empty() {
                brk(true, "no virtio-mem device", Breaks::Libvirt);
                return broken;
            }
            let on: Vec<_> = d.virtio_mem.iter().filter(|v| node.is_none_or(|n| v.0 == n)).collect();
            brk(on.is_empty(), "no virtio-mem device on that node", Breaks::Libvirt);
            let (size, requested): (u64, u64) = on.iter().fold((0, 0), |(s, r), v| (s + v.1, r + v.2));
            let block = on.iter().map(|v| v.3).max().unwrap_or(1);
            // `--to` is the guest's whole memory: boot memory and DIMMs stay, the
            // devices' requested sizes make up the rest.
            let outside: u64 = d.memory - d.virtio_mem.iter().map(|v| v.1).sum::<u64>();
            let target = match change {
                SizeChange::To(b) => b.get().checked_sub(outside),
                SizeChange::Grow(b) => Some(requested + b.get()),
                SizeChange::Shrink(b) => requested.checked_sub(b.get()),
            };
            match target {
                None => brk(true, "shrinking below nothing", Breaks::Libvirt),
                Some(t) => {
                    brk(t > size, "more than the devices hold", Breaks::Libvirt);
                    brk(t % block != 0, "not a multiple of the device's block", Breaks::Libvirt);
                }
            }
        }
    }
    broken
}

/// Rules that refuse what the guide allows or libvirt would do: vmplug's own
/// choices, each with why. A refusal whose error findings are all here needs no
/// other proof.
const POLICY: &[(&str, &str)] = &[
    (
        "mem.block-align",
        "with no guest to ask its block size, a DIMM must still be a multiple of 2 MiB (vmplug's floor; the guide's \
         rule needs the guest's block_size_bytes)",
    ),
    ("mem.plan", "forced, a size that no DIMM can hold whole (the same floor) still cannot be planned"),
    (
        "mem.forecast",
        "the guest's own forecast (the real agent on the fake kernel) says it cannot release that much now: libvirt \
         would lower the requested size, and the shrink would stall",
    ),
    (
        "agent.ready",
        "a live change waits for the guest agent's confirmation; without an agent vmplug refuses unless \
         --no-wait or --force, though libvirt would act",
    ),
];

/// What one fixture's cases showed.
#[derive(Debug, Default)]
struct Tally {
    cases: u32,
    /// `check` said ready and the verb ended OK, libvirt taking every change.
    acted: u32,
    /// Forced past a broken constraint: acting failed, as the refusal said it would.
    forced_failed: u32,
    /// Refusals the model explains (the guide's or libvirt's constraint).
    refused_by_guide: u32,
    /// ... of which libvirt's test driver refused the change when forced on it.
    libvirt_confirmed: u32,
    /// Refusals whose every error is a named policy rule.
    refused_by_policy: u32,
    /// Forced past a constraint whose breach nobody waited to see (`--no-wait`),
    /// that the guide only advises against, or that only libvirt's unmodelled
    /// persistent path would have refused.
    forced_unobserved: u32,
    usage: u32,
    /// Every disagreement, to report them all at once.
    failures: Vec<String>,
}

/// Records a failed expectation instead of stopping at the first.
macro_rules! expect {
    ($failures:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            $failures.push(format!($($msg)+));
        }
    };
}

/// For a refusal the model blames on libvirt: force the change on the test
/// driver's copy and return its error, where the test driver models it.
fn force_on_libvirt(w: &World, req: Req, affect: Affect, running: bool) -> Option<String> {
    match req {
        Req::Cpus(n) => w.tee.td().set_vcpus(n, affect).err().map(|e| e.to_string()),
        Req::Mem(size, node, _) if affect.resolve(running).live() && running => {
            let xml = vmplug::xml::MemoryDevice::dimm(Bytes(size), node.unwrap_or(0)).to_xml();
            match w.tee.td().attach_device(&xml, Affect::Live) {
                Err(e) if !e.to_string().contains(TEST_DRIVER_NO_LIVE_MEMORY) => Some(e.to_string()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Every case of one fixture, running or not, with an agent or not, each judged
/// against the model, libvirt's test driver and the verb's own outcome with an
/// honest simulated guest.
async fn agree_on(fixture: &'static str, xml: &'static str, running: bool, agent: bool) -> Tally {
    let name = DomainFacts::parse(xml).expect("parses").name;
    let d = DECLARED.iter().find(|d| d.fixture == fixture).expect("every fixture is declared");
    let mut t = Tally::default();
    for (affect, no_wait, force) in [
        (Affect::Current, false, false),
        (Affect::Current, true, false),
        (Affect::Current, false, true),
        (Affect::Current, true, true),
        // --live on a stopped domain, and --live --config.
        (Affect::Live, false, false),
        (Affect::Both, true, false),
    ] {
        for req in REQUESTS {
            let broken = model(&Situation { d, running, agent, affect }, req);
            // Forced past a broken constraint the fake hypervisor may still take
            // (it checks less than libvirt): the guest then waits in vain.
            let guest_fails = force && !no_wait && broken.iter().any(|b| b.1 != Breaks::Advice);
            // A failure the model predicts cannot turn into a success by waiting
            // less: that wait is short; every other one only bounds a hang.
            let timeout = if guest_fails { Duration::from_millis(200) } else { Duration::from_secs(30) };
            let w = world(xml, running, agent).await;
            let o = opts(affect, w.agent.clone(), no_wait, force, timeout);
            let what =
                format!("{fixture} running={running} agent={agent} {affect:?} no_wait={no_wait} force={force} {req:?}");
            t.cases += 1;
            let (c, outcome, calls) = match both(&w, &name, req, &o).await {
                Ok(r) => r,
                Err((c, v)) => {
                    expect!(t.failures, c == v, "{what}: the same usage error: {c} vs {v}");
                    t.usage += 1;
                    continue;
                }
            };
            let replays = w.tee.replays();
            let rejected: Vec<_> = replays.iter().filter(|r| matches!(r, Replay::Rejected(..))).collect();
            // What acting anyway would show: libvirt's refusal, or a guest that
            // cannot complete, seen only when the verb waits for the guest.
            let severe: Vec<_> =
                broken.iter().filter(|b| b.1 == Breaks::Libvirt || (b.1 == Breaks::Guest && !no_wait)).collect();
            if c.ready {
                if !force || broken.is_empty() {
                    expect!(
                        t.failures,
                        broken.is_empty(),
                        "{what}: check says ready, the guide's constraints say {broken:?}"
                    );
                    expect!(t.failures, outcome == Outcome::Ok, "{what}: check says ready, the verb ended {outcome:?}");
                    expect!(
                        t.failures,
                        rejected.is_empty(),
                        "{what}: check says ready, libvirt's test driver: {rejected:?}"
                    );
                    t.acted += 1;
                } else if severe.is_empty()
                    || (outcome == Outcome::Ok && replays.iter().all(|r| matches!(r, Replay::NotModelled(_))))
                {
                    // Not waited for, or a change the test driver does not model
                    // (a persistent attach) that the fake took.
                    t.forced_unobserved += 1;
                } else {
                    // Forced past a broken constraint: acting fails, as refusing said.
                    expect!(
                        t.failures,
                        outcome != Outcome::Ok || !rejected.is_empty(),
                        "{what}: forced past {severe:?}, yet the verb ended OK and libvirt took {replays:?}"
                    );
                    t.forced_failed += 1;
                }
                continue;
            }
            expect!(t.failures, calls.is_empty(), "{what}: refused, yet libvirt was called: {calls:?}");
            expect!(
                t.failures,
                matches!(outcome, Outcome::Refused | Outcome::AgentUnreachable),
                "{what}: check says not ready, the verb ended {outcome:?}"
            );
            let errors: Vec<&str> = c.findings.iter().filter(|f| f.severity == Severity::Error).map(|f| f.id).collect();
            if broken.is_empty() {
                let unexplained: Vec<_> = errors.iter().filter(|id| !POLICY.iter().any(|(p, _)| p == *id)).collect();
                expect!(
                    t.failures,
                    !errors.is_empty() && unexplained.is_empty(),
                    "{what}: refused by {errors:?}, yet the guide's constraints and libvirt allow it \
                             (not policy: {unexplained:?}); {c:?}"
                );
                t.refused_by_policy += 1;
                continue;
            }
            t.refused_by_guide += 1;
            if broken.iter().any(|b| b.1 == Breaks::Libvirt) {
                if let Some(err) = force_on_libvirt(&w, req, affect, running) {
                    debug_assert!(!err.is_empty());
                    t.libvirt_confirmed += 1;
                }
            }
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_agrees_with_the_guide_libvirt_and_the_guest() {
    // libvirt's refusals are expected here and judged below: keep them off stderr.
    virt::error::clear_error_callback();
    // The cases mostly wait on the simulated guest: run each fixture's four
    // worlds (running or not, agent or not) side by side.
    let mut tasks = Vec::new();
    for (f, xml) in FIXTURES {
        for running in [true, false] {
            for agent in [true, false] {
                tasks.push(tokio::spawn(agree_on(f, xml, running, agent)));
            }
        }
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.expect("a world's cases ran to the end");
        all.cases += t.cases;
        all.acted += t.acted;
        all.forced_failed += t.forced_failed;
        all.refused_by_guide += t.refused_by_guide;
        all.libvirt_confirmed += t.libvirt_confirmed;
        all.refused_by_policy += t.refused_by_policy;
        all.usage += t.usage;
        all.forced_unobserved += t.forced_unobserved;
        all.failures.extend(t.failures);
    }
    println!(
        "verdicts: {} cases; {} ready and done; {} forced past a constraint and failed ({} more not waited for); {} refused by the guide \
         ({} of them refused by libvirt's test driver when forced); {} refused by policy; {} usage errors",
        all.cases,
        all.acted,
        all.forced_failed,
        all.forced_unobserved,
        all.refused_by_guide,
        all.libvirt_confirmed,
        all.refused_by_policy,
        all.usage
    );
    let n = all.failures.len();
    let shown: Vec<_> = all.failures.iter().take(40).collect();
    assert!(n == 0, "{n} verdicts disagree with the guide, libvirt or the guest:\n{shown:#?}");
    assert!(
        all.acted > 20 && all.refused_by_guide > 20,
        "the table exercises both verdicts: {} acted, {} refused by the guide",
        all.acted,
        all.refused_by_guide
    );
}
