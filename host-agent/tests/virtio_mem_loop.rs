//! resize-memory's closed loop without a VM: the in-memory libvirt plays the
//! virtio-mem driver into a simulated guest kernel, the real agent onlines.

mod common;

use std::sync::Arc;
use std::time::Duration;

use vmplug::domain::Affect;
use vmplug::fake::{FakeConnection, FakeDomain};
use vmplug::link::AgentAddr;
use vmplug::ops::HotplugOpts;
use vmplug::report::Outcome;
use vmplug::verb;
use vmplug::vmem::{ResizeMemory, ResizeOpts, SizeChange};
use vmplug::xml::DomainFacts;
use vmplug_common::protocol::ZonePolicy;
use vmplug_common::{Bytes, MIB};
use vmplug_guest::forecast::Floors;

const XML: &str = include_str!("fixtures/x86-virtio-mem.xml");
const CAPS: &str = include_str!("fixtures/caps.xml");

fn opts(addr: AgentAddr) -> HotplugOpts {
    HotplugOpts {
        affect: Affect::Live,
        timeout: Duration::from_secs(5),
        agent_wait: Duration::from_secs(5),
        no_wait: false,
        force: false,
        agent: Some(addr),
        zone: ZonePolicy::Movable,
    }
}

fn live_device(dom: &FakeDomain, node: u32) -> (Bytes, Option<Bytes>) {
    use vmplug::domain::{Domain, XmlView};
    let f = DomainFacts::parse(&dom.xml(XmlView::Live).expect("xml")).expect("parses");
    let d = f.virtio_mems.into_iter().find(|d| d.node == Some(node)).expect("device");
    (d.requested, d.current)
}

/// The in-memory libvirt with one virtio-mem device on node 0, playing the
/// driver into a fake guest kernel that the real agent serves.
struct World {
    _dir: tempfile::TempDir,
    agent: Arc<vmplug_guest::agent::Agent>,
    dom: Arc<FakeDomain>,
    conn: Arc<FakeConnection>,
    opts: HotplugOpts,
}

fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = common::kernel(dir.path(), 8, 8);
    let (agent, sock) = common::serve_agent(dir.path(), &kernel);
    let dom = FakeDomain::new("mem1", XML, Some(common::plays_hypervisor(&kernel, agent.clone())));
    let conn = FakeConnection::new(CAPS, vec![dom.clone()]);
    World { _dir: dir, agent, dom, conn, opts: opts(AgentAddr::Serial { path: sock }) }
}

fn resize(change: SizeChange) -> ResizeMemory {
    ResizeMemory { r: ResizeOpts { change, node: Some(0), settle: Duration::from_millis(500) } }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_is_confirmed_block_by_block_and_a_held_shrink_is_reset() {
    let World { dom, conn, opts: o, .. } = &world();
    let r = verb::run(&resize(SizeChange::Grow(Bytes(512 * MIB))), conn.clone(), "mem1", o).await.expect("report");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    let d = &r.virtio_mem[0];
    assert_eq!((d.current, d.blocks, d.blocks_online), (Bytes(512 * MIB), 4, 4), "{d:?}");
    assert_eq!(d.zones.get("Movable"), Some(&4), "{d:?}");
    assert_eq!(live_device(dom, 0), (Bytes(512 * MIB), Some(Bytes(512 * MIB))));

    // The guest cannot give back the last 256 MiB: reported, requested reset.
    dom.hold_virtio_mem(256 * MIB);
    let r = verb::run(&resize(SizeChange::Shrink(Bytes(512 * MIB))), conn.clone(), "mem1", o).await.expect("report");
    assert_eq!(r.outcome, Outcome::GuestFailed, "{}", r.render_text());
    assert!(r.message.contains("released 256 MiB of 512 MiB"), "{}", r.message);
    assert!(r.virtio_mem[0].requested_reset);
    assert_eq!(live_device(dom, 0), (Bytes(256 * MIB), Some(Bytes(256 * MIB))), "requested is what the guest holds");
    assert!(r.host.applied.iter().any(|a| a.contains("what the guest still holds")), "{:?}", r.host.applied);
}

/// QEMU reports a device's size to libvirt at most once a second: the growth
/// is proven by the guest's blocks, and the report says libvirt's `<current>`
/// had not caught up instead of waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growth_proven_by_the_guest_reports_libvirt_lagging() {
    let World { dom, conn, opts: o, .. } = &world();
    dom.lag_virtio_mem_current(true);
    let mut o = o.clone();
    // Far beyond the test: only the guest's evidence can end the wait in time.
    o.timeout = Duration::from_secs(600);

    let grow = ResizeOpts { change: SizeChange::Grow(Bytes(512 * MIB)), node: Some(0), settle: Duration::from_secs(1) };
    let r =
        tokio::time::timeout(Duration::from_secs(60), verb::run(&ResizeMemory { r: grow }, conn.clone(), "mem1", &o))
            .await
            .expect("the guest's blocks end the wait, not libvirt's <current>")
            .expect("report");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    let d = &r.virtio_mem[0];
    assert_eq!((d.requested, d.current, d.current_lags), (Bytes(512 * MIB), Bytes(0), true), "{d:?}");
    assert_eq!((d.blocks, d.blocks_online), (4, 4), "{d:?}");
    assert!(r.message.contains("grew by 512 MiB") && r.message.contains("not caught up"), "{}", r.message);
    assert!(r.render_text().contains("not caught up yet"), "{}", r.render_text());
    assert_eq!(live_device(dom, 0), (Bytes(512 * MIB), Some(Bytes(0))), "libvirt's view as the report says");

    // The next verb, 0.3 s later, as QEMU's event lands: it plans from the
    // caught-up view (from the stale 0, a shrink of 512 MiB would be refused).
    let later = dom.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        later.catch_up_virtio_mem();
    });
    dom.lag_virtio_mem_current(false);
    let shrink =
        ResizeOpts { change: SizeChange::Shrink(Bytes(512 * MIB)), node: Some(0), settle: Duration::from_secs(1) };
    let r = verb::run(&ResizeMemory { r: shrink }, conn.clone(), "mem1", &o).await.expect("report");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(live_device(dom, 0), (Bytes(0), Some(Bytes(0))));
}

/// A shrink under the guest's own floor (guest.toml) is the guest's refusal:
/// exit 2 with its reason, `<requested>` untouched, even with `--force`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_the_guest_vetoes_changes_nothing() {
    let World { agent, dom, conn, opts: o, .. } = &world();
    let r = verb::run(&resize(SizeChange::Grow(Bytes(512 * MIB))), conn.clone(), "mem1", o).await.expect("report");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());

    // The fake guest has 900,000 kB available: 256 MiB less is under 700 MiB.
    let _ = agent.clone().with_floors(Floors { min_available: Bytes(700 * MIB), memory_pressure: 0.0 });
    let shrink = resize(SizeChange::Shrink(Bytes(256 * MIB)));
    let forced = HotplugOpts { force: true, ..o.clone() };
    let r = verb::run(&shrink, conn.clone(), "mem1", &forced).await.expect("report");
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
    let veto = r.findings.iter().find(|f| f.id == "guest.veto").expect("guest.veto");
    assert!(veto.message.contains("veto_min_available_mib"), "the guest's reason: {}", veto.message);
    assert_eq!(live_device(dom, 0).0, Bytes(512 * MIB), "requested untouched");

    let _ = agent.clone().with_floors(Floors { min_available: Bytes(500 * MIB), memory_pressure: 0.0 });
    let r = verb::run(&shrink, conn.clone(), "mem1", o).await.expect("report");
    assert_eq!(r.outcome, Outcome::Ok, "under a floor it keeps, the shrink goes: {}", r.render_text());
    assert_eq!(live_device(dom, 0).0, Bytes(256 * MIB));
}

/// add-virtio-mem gives the guest nothing yet, so it does not ask the guest:
/// an agent named on the command line is never connected to, and the device
/// is read back from the live XML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_device_is_read_back_without_asking_the_guest() {
    use vmplug::vmem_add::AddVirtioMem;
    let World { conn, opts: o, _dir: dir, .. } = &world();
    let path = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let o = HotplugOpts { agent: Some(AgentAddr::Serial { path }), agent_wait: Duration::from_secs(2), ..o.clone() };
    let add = AddVirtioMem { size: Bytes(512 * MIB), node: Some(1), block: Bytes(2 * MIB) };
    let r = verb::run(&add, conn.clone(), "mem1", &o).await.expect("report");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert!(
        r.message.starts_with("libvirt added virtiomem") && r.message.contains("nothing plugged yet"),
        "{}",
        r.message
    );
    assert!(r.guest.is_none(), "{}", r.render_text());
    let asked = listener.accept();
    assert!(
        matches!(&asked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the agent's socket was connected to: {asked:?}"
    );
}
