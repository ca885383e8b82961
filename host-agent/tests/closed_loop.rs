//! The whole closed loop without a VM: `ops` drives the in-memory libvirt, whose
//! hooks play the hypervisor into a simulated guest kernel, while the real guest
//! agent serves over a Unix socket as it would over virtio-serial.

use std::sync::Arc;
use std::time::Duration;

use vmplug::domain::Affect;
use vmplug::fake::{FakeConnection, FakeDomain, Hook};
use vmplug::link::AgentAddr;
use vmplug::ops::{AttachMemory, GuestVcpus, HotplugOpts, MemoryOpts, Setvcpus};
use vmplug::report::Outcome;
use vmplug::unplug::{DetachMemory, DimmSelector};
use vmplug::verb;
mod common;

use vmplug_common::protocol::ZonePolicy;
use vmplug_common::{Bytes, GIB, MIB};
use vmplug_guest::forecast::Floors;
use vmplug_guest::testing::FakeKernel;

const XML: &str = include_str!("fixtures/x86-ready.xml");
const CAPS: &str = include_str!("fixtures/caps.xml");

struct World {
    _dir: tempfile::TempDir,
    kernel: FakeKernel,
    dom: Arc<FakeDomain>,
    conn: Arc<FakeConnection>,
    addr: AgentAddr,
    agent: Arc<vmplug_guest::agent::Agent>,
}

/// `plays_hypervisor`: whether plugged devices show up in the guest kernel.
async fn world(plays_hypervisor: bool) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = common::kernel(dir.path(), 8, 64);
    let (agent, sock) = common::serve_agent(dir.path(), &kernel);
    let hook: Option<Hook> = plays_hypervisor.then(|| common::plays_hypervisor(&kernel, agent.clone()));
    let dom = FakeDomain::new("web1", XML, hook);
    let conn = FakeConnection::new(CAPS, vec![dom.clone()]);
    World { _dir: dir, kernel, dom, conn, addr: AgentAddr::Serial { path: sock }, agent }
}

/// `size` on guest node `node`, in DIMMs of at most `max_dimm`, as request `id`.
fn mem_opts(size: u64, node: u32, max_dimm: u64, id: &str) -> MemoryOpts {
    MemoryOpts {
        size: Bytes(size),
        node: Some(node),
        round_up: false,
        ceiling: None,
        max_dimm: Bytes(max_dimm),
        request_id: id.into(),
    }
}

fn opts(w: &World, timeout: Duration) -> HotplugOpts {
    HotplugOpts {
        affect: Affect::Both,
        timeout,
        agent_wait: Duration::from_secs(5),
        no_wait: false,
        force: false,
        agent: Some(w.addr.clone()),
        zone: ZonePolicy::Auto,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setvcpus_is_confirmed_by_the_guest() {
    let w = world(true).await;
    let r = verb::run(&Setvcpus { target: 4 }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(w.dom.calls(), vec!["setvcpus 4 Both"], "one socket (2 vCPUs) per step: 2 -> 4");
    assert_eq!(w.kernel.sysfs().cpu_facts().expect("facts").online.to_string(), "0-3");
    assert!(r.host.persistent);
    assert_eq!(r.guest.expect("guest report").cpus_online.to_string(), "0-3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_memory_onlines_exactly_the_new_blocks_on_their_node() {
    let w = world(true).await;
    let mem = mem_opts(GIB, 1, 4 * GIB, "t");
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    let g = r.guest.expect("guest report");
    assert_eq!(g.blocks.len(), 8);
    assert!(g.blocks.iter().all(|b| b.node == Some(1) && b.zone.as_deref() == Some("Movable")), "{g:?}");
    assert_eq!(g.blocks[0].start, 64 * GIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misaligned_memory_is_refused_before_libvirt_is_called() {
    let w = world(true).await;
    let mem = mem_opts(100 * MIB, 0, 4 * GIB, "t");
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(5)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Refused);
    assert_eq!(r.outcome.exit_code(), 2);
    assert!(w.dom.calls().is_empty(), "nothing applied");
    let rounded = MemoryOpts { round_up: true, ..mem };
    let r =
        verb::run(&AttachMemory { mem: rounded.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
            .await
            .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(r.guest.expect("report").blocks.len(), 1, "rounded up to one 128 MiB block");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_failure_is_reported_as_such() {
    let w = world(true).await;
    w.dom.fail("attach-device", "internal error: unable to execute QEMU command 'device_add'");
    let mem = mem_opts(GIB, 0, 4 * GIB, "t");
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(5)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::LibvirtError);
    assert!(r.message.contains("device_add"), "{}", r.message);
    assert!(r.host.applied.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dimm_the_guest_never_sees_is_a_guest_timeout_not_a_success() {
    let w = world(false).await;
    let mem = mem_opts(256 * MIB, 0, 4 * GIB, "t");
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(1)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::GuestTimeout, "{}", r.render_text());
    assert_eq!(r.outcome.exit_code(), 4);
    assert_eq!(r.host.applied.len(), 1, "the host side is reported as applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_is_its_own_outcome() {
    let w = world(true).await;
    let mut o = opts(&w, Duration::from_secs(5));
    o.agent = Some(AgentAddr::Serial { path: "/nonexistent/agent.sock".into() });
    o.agent_wait = Duration::from_millis(600);
    let r = verb::run(&Setvcpus { target: 4 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert_eq!(r.outcome, Outcome::AgentUnreachable, "{}", r.render_text());
    assert_eq!(r.outcome.exit_code(), 7);
    assert!(w.dom.calls().is_empty());
    let unknown = verb::run(&Setvcpus { target: 4 }, w.conn.clone(), "nope", &o).await;
    assert!(unknown.is_err_and(|e| e.to_string().contains("'nope' not found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_on_a_stopped_domain_is_refused() {
    let w = world(true).await;
    w.dom.set_running(false);
    let mut o = opts(&w, Duration::from_secs(5));
    o.affect = Affect::Live;
    let r = verb::run(&Setvcpus { target: 4 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Refused);
    assert!(r.findings.iter().any(|f| f.id == "domain.running"));
    o.affect = Affect::Config;
    let r = verb::run(&Setvcpus { target: 4 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(w.dom.calls(), vec!["setvcpus 4 Config"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_attaches_only_what_is_missing() {
    let w = world(true).await;
    // 1 GiB as four 256 MiB DIMMs; libvirt fails on the third: a crash mid-attach.
    w.dom.fail_after("attach-device", 2, "connection lost");
    let mem = mem_opts(GIB, 0, 256 * MIB, "retry-1");
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Partial, "{}", r.render_text());
    // The same command again: reconciled from the live XML, two more DIMMs, not four.
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert!(r.host.applied.iter().any(|a| a.contains("reconciled: 2 DIMM(s)")), "{:?}", r.host.applied);
    let attaches = w.dom.calls().iter().filter(|c| c.starts_with("attach-device")).count();
    assert_eq!(attaches, 2 + 1 + 2, "two, one failed, then the missing two");
    assert_eq!(r.guest.expect("report").blocks.len(), 8, "the guest confirms the whole request");
    // And once more: nothing left to attach, still verified.
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(w.dom.calls().iter().filter(|c| c.starts_with("attach-device")).count(), 5);
}

async fn attached(w: &World, id: &str, size: u64) {
    let mem = mem_opts(size, 0, 256 * MIB, id);
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
}

fn state(w: &World, block: u64) -> Option<String> {
    w.kernel.sysfs().block(block).expect("sysfs").map(|b| if b.online { "online".into() } else { "offline".into() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_memory_offlines_first_then_detaches_and_the_guest_confirms() {
    let w = world(true).await;
    attached(&w, "u1", 512 * MIB).await;
    let first = 64 * GIB / (128 * MIB);
    assert_eq!(state(&w, first).as_deref(), Some("online"));
    let sel = DimmSelector::Request("u1".into());
    let r = verb::run(&DetachMemory { sel: sel.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(r.guest.as_ref().expect("offline report").blocks.len(), 4);
    assert_eq!(w.dom.calls().iter().filter(|c| c.starts_with("detach-device")).count(), 2, "two 256 MiB DIMMs");
    let live = vmplug::domain::Domain::xml(w.dom.as_ref(), vmplug::domain::XmlView::Live).expect("xml");
    assert_eq!(live.matches("ua-vmplug-u1-").count(), 0, "gone from the live XML");
    assert!((first..first + 4).all(|b| state(&w, b).is_none()), "the blocks are gone from the guest");
    assert!(r.message.contains("4 block(s) gone"), "{}", r.message);
    let text = r.render_text();
    assert!(text.contains(" offlined") && !text.contains(" onlined"), "{text}");
    // Offlined before the detach: every state write of the request was "offline".
    let offline_writes = w.kernel.writes().iter().filter(|(_, v)| v == "offline").count();
    assert_eq!(offline_writes, 4);
}

/// A DIMM onlined in the kernel's zone: the guest's forecast says it cannot
/// release it now (a DIMM goes whole or not at all), so the detach is refused
/// by `mem.forecast` before anything changes; `--force` tries anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dimm_the_guest_forecasts_it_cannot_release_is_refused_before_acting() {
    let w = world(true).await;
    let mem = mem_opts(256 * MIB, 0, 256 * MIB, "u5");
    let kernel_zone = HotplugOpts { zone: ZonePolicy::Kernel, ..opts(&w, Duration::from_secs(10)) };
    let r = verb::run(&AttachMemory { mem }, w.conn.clone(), "web1", &kernel_zone).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    let sel = DimmSelector::Request("u5".into());
    let r = verb::run(&DetachMemory { sel: sel.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(5)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
    assert!(r.findings.iter().any(|f| f.id == "mem.forecast"), "{}", r.render_text());
    assert!(!w.dom.calls().iter().any(|c| c.starts_with("detach-device")), "libvirt was never asked");
    let first = 64 * GIB / (128 * MIB);
    assert_eq!(state(&w, first).as_deref(), Some("online"), "nothing offlined");
    let forced = HotplugOpts { force: true, ..opts(&w, Duration::from_secs(5)) };
    let r = verb::run(&DetachMemory { sel }, w.conn.clone(), "web1", &forced).await.expect("runs");
    assert_ne!(r.outcome, Outcome::Refused, "--force tries anyway: {}", r.render_text());
    assert!(w.dom.calls().iter().any(|c| c.starts_with("detach-device")), "libvirt was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detach_the_guest_vetoes_is_refused_with_its_reason_and_nothing_changes() {
    let w = world(true).await;
    attached(&w, "u6", 256 * MIB).await;
    // The fake guest has 900,000 kB available: 256 MiB less leaves ~623 MiB,
    // under a floor of 700 MiB.
    let floors = Floors { min_available: Bytes(700 * MIB), memory_pressure: 0.0 };
    let _ = w.agent.clone().with_floors(floors);
    let sel = DimmSelector::Request("u6".into());
    let forced = HotplugOpts { force: true, ..opts(&w, Duration::from_secs(5)) };
    let r = verb::run(&DetachMemory { sel: sel.clone() }, w.conn.clone(), "web1", &forced).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Refused, "--force does not override the guest: {}", r.render_text());
    let veto = r.findings.iter().find(|f| f.id == "guest.veto").expect("guest.veto");
    assert!(veto.message.contains("veto_min_available_mib"), "the guest's reason: {}", veto.message);
    assert!(r.message.contains("nothing was changed"), "{}", r.message);
    assert!(!w.dom.calls().iter().any(|c| c.starts_with("detach-device")), "libvirt was never asked");
    let first = 64 * GIB / (128 * MIB);
    assert!((first..first + 2).all(|b| state(&w, b).as_deref() == Some("online")), "nothing offlined");
    // Under a floor it can keep, the same detach goes through.
    let _ = w.agent.clone().with_floors(Floors { min_available: Bytes(500 * MIB), memory_pressure: 0.0 });
    let r = verb::run(&DetachMemory { sel }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(5)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert!(w.dom.calls().iter().any(|c| c.starts_with("detach-device")), "libvirt was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_the_guest_cannot_offline_means_nothing_is_detached() {
    let w = world(true).await;
    attached(&w, "u2", 256 * MIB).await;
    let first = 64 * GIB / (128 * MIB);
    // The second block keeps failing with EBUSY (unmovable pages) through every retry.
    let path = w.kernel.sysfs().block_state_path(first + 1);
    w.kernel.fail_writes(path, &[EBUSY; 64]);
    let sel = DimmSelector::Request("u2".into());
    let r = verb::run(&DetachMemory { sel: sel.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(5)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::GuestFailed, "{}", r.render_text());
    assert!(r.message.contains("nothing was detached"), "{}", r.message);
    assert!(!w.dom.calls().iter().any(|c| c.starts_with("detach-device")), "libvirt was never asked");
    assert_eq!(state(&w, first).as_deref(), Some("online"), "the block it did offline is online again");
    assert_eq!(state(&w, first + 1).as_deref(), Some("online"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_detach_puts_the_remaining_blocks_back_online() {
    let w = world(true).await;
    attached(&w, "u3", 512 * MIB).await;
    w.dom.fail_after("detach-device", 1, "internal error: unable to execute QEMU command 'device_del'");
    let sel = DimmSelector::Request("u3".into());
    let r = verb::run(&DetachMemory { sel: sel.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(5)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Partial, "{}", r.render_text());
    assert!(r.message.contains("device_del") && r.message.contains("online again"), "{}", r.message);
    let first = 64 * GIB / (128 * MIB);
    assert!((first..first + 2).all(|b| state(&w, b).is_none()), "the first DIMM went");
    assert!((first + 2..first + 4).all(|b| state(&w, b).as_deref() == Some("online")), "the second stays usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_memory_names_what_exists_when_nothing_matches() {
    let w = world(true).await;
    let sel = DimmSelector::Request("nope".into());
    // The domain was read to know this: a refusal (exit 2), not a usage error.
    let r = verb::run(&DetachMemory { sel: sel.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(5)))
        .await
        .expect("a report");
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
    assert!(r.message.contains("no DIMM of 'web1' has request id 'nope'"), "{}", r.message);
    assert!(r.findings.iter().any(|f| f.id == "unplug.dimm"), "{:?}", r.findings);
    assert!(w.dom.calls().is_empty());
}

/// errno of a block whose pages cannot be migrated away.
const EBUSY: i32 = 16;

/// Issue 14: `attach-memory 1K --force --no-wait` printed "OK — 1 KiB attached"
/// with nothing applied. A request that makes no DIMM is refused, forced or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_makes_no_dimm_is_refused_even_forced() {
    let w = world(true).await;
    let mut o = opts(&w, Duration::from_secs(5));
    (o.force, o.no_wait) = (true, true);
    let r = verb::run(&AttachMemory { mem: mem_opts(1024, 0, 4 * GIB, "k") }, w.conn.clone(), "web1", &o)
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
    assert_eq!(r.findings[0].id, "mem.plan", "{}", r.render_text());
    assert!(w.dom.calls().is_empty(), "nothing applied: {:?}", w.dom.calls());
}

/// Issue 14: repeating a `--request-id` with a different size printed OK without
/// a word. Asking less than the request already attached is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_repeated_with_a_smaller_size_is_refused() {
    let w = world(true).await;
    let o = opts(&w, Duration::from_secs(10));
    let r = verb::run(&AttachMemory { mem: mem_opts(512 * MIB, 0, 4 * GIB, "same") }, w.conn.clone(), "web1", &o)
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    let calls = w.dom.calls().len();
    let r = verb::run(&AttachMemory { mem: mem_opts(256 * MIB, 0, 4 * GIB, "same") }, w.conn.clone(), "web1", &o)
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
    assert_eq!(r.findings[0].id, "mem.request-id", "{}", r.render_text());
    assert!(r.findings[0].message.contains("already attached 512 MiB"), "{}", r.render_text());
    assert_eq!(w.dom.calls().len(), calls, "nothing more applied");
    // The same size again: reconciled, nothing attached, still a success.
    let r = verb::run(&AttachMemory { mem: mem_opts(512 * MIB, 0, 4 * GIB, "same") }, w.conn.clone(), "web1", &o)
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(w.dom.calls().len(), calls, "nothing more applied");
}

/// Issue 14: shrinking with `setvcpus` ignored an incomplete offline report and
/// called libvirt anyway. Now libvirt is never asked to unplug a CPU the guest
/// has not released; the CPUs it did release are onlined again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_the_guest_cannot_complete_changes_nothing_in_libvirt() {
    let w = world(true).await;
    let o = opts(&w, Duration::from_secs(5));
    let r = verb::run(&Setvcpus { target: 4 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    let calls = w.dom.calls().len();
    w.kernel.fail_writes(w.kernel.sys().join("devices/system/cpu/cpu3/online"), &[libc::EBUSY; 64]);
    let r = verb::run(&Setvcpus { target: 2 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert_eq!(r.outcome, Outcome::GuestFailed, "{}", r.render_text());
    assert!(r.message.contains("nothing was changed in libvirt"), "{}", r.message);
    assert_eq!(w.dom.calls().len(), calls, "libvirt was not asked to unplug: {:?}", w.dom.calls());
    assert_eq!(w.kernel.sysfs().cpu_facts().expect("facts").online.to_string(), "0-3", "back online");
}

/// "Set in libvirt" only when libvirt was asked: a target equal to the current
/// count changes nothing and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setvcpus_to_the_current_count_says_nothing_changed() {
    let w = world(true).await;
    let mut o = opts(&w, Duration::from_secs(5));
    o.no_wait = true;
    let r = verb::run(&Setvcpus { target: 2 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert!(r.message.contains("nothing was changed"), "{}", r.message);
    assert!(w.dom.calls().is_empty() && r.host.applied.is_empty(), "{:?}", w.dom.calls());
}

/// `setvcpus --guest`: all vCPUs present at boot, the surplus offline (as with
/// `maxcpus=`); the agent onlines and offlines them, libvirt is never called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_level_vcpus_move_only_inside_the_guest() {
    let w = world(false).await;
    for cpu in 2..4 {
        w.kernel.add_cpu(cpu, false);
    }
    let o = HotplugOpts { affect: Affect::Current, ..opts(&w, Duration::from_secs(10)) };
    let r = verb::run(&GuestVcpus { target: 4 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(w.kernel.sysfs().cpu_facts().expect("facts").online.to_string(), "0-3");
    assert!(r.message.contains("guest-level"), "{}", r.message);
    let r = verb::run(&GuestVcpus { target: 1 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(w.kernel.sysfs().cpu_facts().expect("facts").online.to_string(), "0");
    assert!(w.dom.calls().is_empty(), "libvirt untouched: {:?}", w.dom.calls());
    assert!(!r.host.persistent);
    // Past the vCPUs the guest has: refused before anything moves.
    let r = verb::run(&GuestVcpus { target: 5 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
    assert!(r.findings.iter().any(|f| f.id == "cpu.guest-present"), "{:?}", r.findings);
    assert_eq!(w.kernel.sysfs().cpu_facts().expect("facts").online.to_string(), "0");
    // The persistent definition is not a guest-level thing.
    let config = HotplugOpts { affect: Affect::Config, ..o.clone() };
    assert!(
        verb::run(&GuestVcpus { target: 2 }, w.conn.clone(), "web1", &config).await.is_err(),
        "--config: a usage error"
    );
}

/// Sets the simulated guest's MemAvailable.
fn set_available(w: &World, mib: u64) {
    let kib = mib * 1024;
    std::fs::write(
        w.kernel.proc().join("meminfo"),
        format!("MemTotal:        8388608 kB\nMemFree:         {kib} kB\nMemAvailable:    {kib} kB\nHugepagesize:       2048 kB\n"),
    )
    .expect("meminfo");
}

/// Staged growth: with 64 MiB available a guest may take 2 GiB at a time
/// (1:32); 4 GiB goes in two waves, each onlined before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plug_larger_than_the_guest_can_absorb_goes_in_waves() {
    let w = world(true).await;
    set_available(&w, 64);
    let mem = mem_opts(4 * GIB, 1, GIB, "big");
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert!(r.host.applied.iter().any(|a| a == "wave 1 of 2: 2 GiB in 2 DIMM(s)"), "{:?}", r.host.applied);
    assert!(r.host.applied.iter().any(|a| a == "wave 2 of 2: 2 GiB in 2 DIMM(s)"), "{:?}", r.host.applied);
    assert!(r.message.contains("in 2 waves"), "{}", r.message);
    // The first wave's blocks were onlined by the agent in that wave, not by
    // "the kernel or a udev rule" (the final check finds them online already).
    assert!(!r.message.contains("udev rule"), "{}", r.message);
    assert_eq!(r.guest.expect("report").blocks.len(), 32, "every block of all four DIMMs, verified at the end");
}

/// The guest has less available after a wave than the next one needs: the
/// plug stops there (exit 6, what is attached stays online), and the repeat
/// with the same request id attaches the rest once the guest has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_stop_when_the_guest_cannot_absorb_the_next() {
    let w = world(true).await;
    set_available(&w, 64);
    let mem = mem_opts(6 * GIB, 1, GIB, "big");
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Partial, "{}", r.render_text());
    assert!(r.message.contains("stopped after wave 1 of 2") && r.message.contains("--request-id big"), "{}", r.message);
    assert_eq!(w.dom.calls().len(), 2, "two DIMMs attached: {:?}", w.dom.calls());
    assert_eq!(w.kernel.sysfs().memory_facts().expect("facts").expect("memory").blocks_offline, 0, "and online");
    set_available(&w, 1024);
    let r = verb::run(&AttachMemory { mem: mem.clone() }, w.conn.clone(), "web1", &opts(&w, Duration::from_secs(10)))
        .await
        .expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(w.dom.calls().len(), 6, "only the missing four: {:?}", w.dom.calls());
    assert!(!r.message.contains("udev rule"), "the first run's blocks are not the kernel's: {}", r.message);
}

/// Every state in which the guest runs no code gets its own verdict at once:
/// the agent (here a socket that accepts and never answers, which would hold a
/// handshake for the whole 30 s) is not even tried, and `check` says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_whose_guest_runs_no_code_is_refused_at_once() {
    use vmplug::domain::{DomainState, PauseReason};
    use vmplug::tune::{check, CheckRequest};
    let w = world(true).await;
    let silent = w._dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent).expect("bind");
    let mut o = opts(&w, Duration::from_secs(5));
    o.agent = Some(AgentAddr::Serial { path: silent });
    o.agent_wait = Duration::from_secs(30);
    for (state, id) in [
        (DomainState::Paused(PauseReason::User), "domain.paused"),
        (DomainState::PmSuspended, "domain.pmsuspended"),
        (DomainState::Crashed, "domain.crashed"),
        (DomainState::ShuttingDown, "domain.shutting-down"),
    ] {
        w.dom.set_state(state);
        let started = std::time::Instant::now();
        let r = verb::run(&Setvcpus { target: 4 }, w.conn.clone(), "web1", &o).await.expect("runs");
        let m = mem_opts(256 * MIB, 0, 256 * MIB, "state");
        let a = verb::run(&AttachMemory { mem: m.clone() }, w.conn.clone(), "web1", &o).await.expect("runs");
        let req = CheckRequest { cpus: Some(4), guest: false, memory: Some(m), resize: None, opts: o.clone() };
        let c = check(w.conn.clone(), "web1", &req).await.expect("check");
        assert!(started.elapsed() < Duration::from_secs(3), "{state:?}: no handshake wait: {:?}", started.elapsed());
        for r in [&r, &a] {
            assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
            let errors: Vec<&str> =
                r.findings.iter().filter(|f| f.severity == vmplug::preflight::Severity::Error).map(|f| f.id).collect();
            assert_eq!(errors, vec![id], "{}", r.render_text());
            assert!(r.message.contains("nothing was changed") && !r.message.contains("handshake"), "{}", r.message);
        }
        assert!(!c.ready, "{state:?}");
        assert!(c.findings.iter().any(|f| f.id == id), "check agrees: {c:?}");
        assert!(!c.findings.iter().any(|f| f.id == "agent.ready"), "{c:?}");
    }
    assert!(w.dom.calls().is_empty(), "nothing was asked of libvirt: {:?}", w.dom.calls());
}

/// Issue #27: a socket vmplug will not trust is a refusal that says so, in the
/// verb and in `check` alike, not "is vmplug-guest running?".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_agent_socket_is_named_as_the_cause() {
    use std::os::unix::fs::PermissionsExt;
    use vmplug::tune::{check, render_check, CheckRequest};
    let w = world(true).await;
    let AgentAddr::Serial { path } = &w.addr else { panic!("a serial address") };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut o = opts(&w, Duration::from_secs(5));
    o.agent_wait = Duration::from_secs(30);
    let started = std::time::Instant::now();
    let r = verb::run(&Setvcpus { target: 4 }, w.conn.clone(), "web1", &o).await.expect("runs");
    assert!(started.elapsed() < Duration::from_secs(3), "refused at once: {:?}", started.elapsed());
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
    assert!(r.message.starts_with("refused to use the agent socket"), "{}", r.message);
    assert!(r.message.contains("writable by every user"), "{}", r.message);
    assert!(!r.render_text().contains("is vmplug-guest running"), "{}", r.render_text());
    assert!(r.findings.iter().any(|f| f.id == "agent.socket"));
    let req = CheckRequest { cpus: Some(4), guest: false, memory: None, resize: None, opts: o.clone() };
    let c = check(w.conn.clone(), "web1", &req).await.expect("check");
    assert!(!c.ready);
    let text = render_check(&c);
    assert!(text.contains("error [agent.socket] refused to use the agent socket"), "{text}");
    assert!(!text.contains("is vmplug-guest running"), "{text}");
    assert!(w.dom.calls().is_empty());
}
