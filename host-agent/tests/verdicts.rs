//! `check` says "ready" exactly when the verb would act: over every fixture
//! domain, running or not, with and without a guest agent, with the verbs'
//! option sets, and a table of CPU and memory requests, `check` and the verb
//! (run right after it on the same domain) agree; and a verb that refuses has
//! changed nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use vmplug::domain::{Affect, DomainError};
use vmplug::fake::{FakeConnection, FakeDomain, Hook};
use vmplug::link::AgentAddr;
use vmplug::ops::{attach_memory, new_request_id, setvcpus, setvcpus_guest, HotplugOpts, MemoryOpts};
use vmplug::report::Outcome;
use vmplug::tune::{check, CheckRequest};
use vmplug::vmem::{resize_memory, ResizeOpts, SizeChange};
use vmplug::xml::DomainFacts;
use vmplug_common::protocol::ZonePolicy;
use vmplug_common::{Bytes, GIB, KIB, MIB};

const CAPS: &str = include_str!("fixtures/caps.xml");
const FIXTURES: &[(&str, &str)] = &[
    ("x86-ready", include_str!("fixtures/x86-ready.xml")),
    ("plain", include_str!("fixtures/plain.xml")),
    ("hugepages", include_str!("fixtures/hugepages.xml")),
    ("arm-virt41", include_str!("fixtures/arm-virt41.xml")),
    ("x86-virtio-mem", include_str!("fixtures/x86-virtio-mem.xml")),
];

/// A domain, and (with `agent`) a simulated guest kernel with the real agent on a
/// Unix socket, into which the fake hypervisor plays every plug.
struct World {
    _dir: tempfile::TempDir,
    dom: Arc<FakeDomain>,
    conn: Arc<FakeConnection>,
    agent: Option<AgentAddr>,
}

async fn world(xml: &str, running: bool, agent: bool) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = DomainFacts::parse(xml).expect("fixture parses").name;
    let mut hook: Option<Hook> = None;
    let mut addr = None;
    if agent {
        // 1 GiB of boot memory over the two nodes: enough for every rule.
        let kernel = common::kernel(dir.path(), 16, 8);
        let (agent, sock) = common::serve_agent(dir.path(), &kernel);
        hook = Some(common::plays_hypervisor(&kernel, agent));
        addr = Some(AgentAddr::Serial { path: sock });
    }
    let dom = FakeDomain::new(&name, xml, hook);
    dom.set_running(running);
    let conn = FakeConnection::new(CAPS, vec![dom.clone()]);
    World { _dir: dir, dom, conn, agent: addr }
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

fn opts(affect: Affect, agent: Option<AgentAddr>, no_wait: bool, force: bool) -> HotplugOpts {
    HotplugOpts {
        affect,
        // Plugs the simulated guest cannot complete (a forced misaligned DIMM)
        // end in a guest timeout: keep it short.
        timeout: Duration::from_secs(1),
        agent_wait: Duration::from_millis(300),
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
) -> Result<(bool, Outcome, Vec<String>), (String, String)> {
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
        Req::Cpus(n) => setvcpus(w.conn.clone(), name, n, o).await,
        Req::GuestCpus(n) => setvcpus_guest(w.conn.clone(), name, n, o).await,
        Req::Mem(size, node, up) => attach_memory(w.conn.clone(), name, &mem_opts(size, node, up), o).await,
        Req::Resize(change, node) => resize_memory(w.conn.clone(), name, &resize_opts(change, node), o).await,
    };
    match (c, v) {
        (Ok(c), Ok(v)) => Ok((c.ready, v.outcome, w.dom.calls())),
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

/// Every case of one fixture: returns (cases, cases where the verb acted).
async fn agree_on(fixture: &'static str, xml: &'static str) -> (u32, u32) {
    let name = DomainFacts::parse(xml).expect("parses").name;
    let (mut cases, mut acted) = (0, 0);
    for running in [true, false] {
        for agent in [true, false] {
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
                    let w = world(xml, running, agent).await;
                    let o = opts(affect, w.agent.clone(), no_wait, force);
                    let what = format!(
                        "{fixture} running={running} agent={agent} {affect:?} no_wait={no_wait} force={force} {req:?}"
                    );
                    cases += 1;
                    match both(&w, &name, req, &o).await {
                        Ok((ready, outcome, calls)) => {
                            let refused = matches!(outcome, Outcome::Refused | Outcome::AgentUnreachable);
                            assert_eq!(ready, !refused, "{what}: check says ready={ready}, the verb ended {outcome:?}");
                            if refused {
                                assert!(calls.is_empty(), "{what}: refused, yet libvirt was called: {calls:?}");
                            } else {
                                acted += 1;
                            }
                        }
                        Err((c, v)) => assert_eq!(c, v, "{what}: the same usage error"),
                    }
                }
            }
        }
    }
    (cases, acted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_the_verbs_agree_everywhere() {
    let tasks: Vec<_> = FIXTURES.iter().map(|(f, xml)| tokio::spawn(agree_on(f, xml))).collect();
    let (mut cases, mut acted) = (0, 0);
    for t in tasks {
        let (c, a) = t.await.expect("a fixture's cases ran to the end");
        cases += c;
        acted += a;
    }
    println!("check and the verbs agreed in {cases} cases ({acted} acted)");
    assert!(acted > 20 && acted < cases, "the table exercises both verdicts: {acted} of {cases} acted");
}
