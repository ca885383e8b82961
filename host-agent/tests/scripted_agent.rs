//! The executors run against the `GuestAgent` trait, so a scripted agent can
//! play any guest, including one that lies, with no socket and no simulated
//! kernel: the verdict comes from the host's own count and libvirt's view.

use std::time::Duration;

use vmplug::domain::Affect;
use vmplug::fake::{FakeConnection, FakeDomain, ScriptedAgent};
use vmplug::ops::{AttachMemory, HotplugOpts, MemoryOpts, Run, Setvcpus};
use vmplug::plan::{gather, Facts};
use vmplug::report::Outcome;
use vmplug::verb::run_on;
use vmplug_common::protocol::{
    BlockResult, CpuResult, GuestInfo, ItemOutcome as Done, Message, Report, Response, ZonePolicy,
};
use vmplug_common::{Bytes, GIB, MIB};

fn info() -> GuestInfo {
    let env: Message<Response> =
        serde_json::from_str(include_str!("../../common/tests/golden/guest_info.json")).expect("golden");
    match env.body {
        Response::GuestInfo(i) => i,
        other => panic!("{other:?}"),
    }
}

fn opts() -> HotplugOpts {
    HotplugOpts {
        affect: Affect::Live,
        timeout: Duration::from_secs(5),
        agent_wait: Duration::from_millis(100),
        no_wait: false,
        force: false,
        agent: None,
        zone: ZonePolicy::Auto,
    }
}

fn report(cpus: &[u32], online: &str, blocks: &[u64]) -> Report {
    Report {
        cpus: cpus.iter().map(|&cpu| CpuResult { cpu, outcome: Done::Done }).collect(),
        blocks: blocks
            .iter()
            .map(|&start| BlockResult {
                index: start / (128 * MIB),
                start,
                node: Some(0),
                zone: None,
                outcome: Done::Done,
            })
            .collect(),
        cpus_online: online.parse().expect("cpulist"),
        memory_online: Bytes(0),
        complete: true,
        timed_out: false,
        duration_ms: 1,
        queues: vec![],
    }
}

/// attach-memory 256M on node 0 as request `id`.
fn mem_256m(id: &str) -> MemoryOpts {
    MemoryOpts {
        size: Bytes(256 * MIB),
        node: Some(0),
        round_up: false,
        ceiling: None,
        max_dimm: Bytes(4 * GIB),
        request_id: id.into(),
    }
}

/// The x86-ready domain's facts, with the scripted agent's handshake as the guest's.
async fn facts(dom: &std::sync::Arc<FakeDomain>, agent: &ScriptedAgent) -> Facts {
    let conn = FakeConnection::new(include_str!("fixtures/caps.xml"), vec![dom.clone()]);
    let (mut f, _) = gather(conn, "web1", &opts()).await.expect("gathers");
    f.guest = Some(agent.info.clone());
    f.agent_error = None;
    f.agent_trouble = None;
    f
}

#[tokio::test]
async fn a_guest_that_confirms_blocks_outside_the_dimm_is_not_believed() {
    let dom = FakeDomain::new("web1", include_str!("fixtures/x86-ready.xml"), None);
    let mut agent = ScriptedAgent::new(info());
    // "Complete", with two blocks at guest-physical 0: not the new DIMM's.
    agent.online.push_back(Ok((report(&[], "0-1", &[0, 128 * MIB]), 0)));
    let f = facts(&dom, &agent).await;
    let r =
        run_on(&AttachMemory { mem: mem_256m("lie") }, &f, Some(&mut agent), &opts(), Run::new()).await.expect("runs");
    assert_eq!(r.outcome, Outcome::GuestFailed, "{}", r.render_text());
    assert!(r.message.contains("confirmed 0 of them"), "{}", r.message);
    assert_eq!(agent.requests, ["online cpus=None ranges=1"]);
}

#[tokio::test]
async fn vcpus_are_confirmed_and_a_refused_shrink_is_put_back() {
    let dom = FakeDomain::new("web1", include_str!("fixtures/x86-ready.xml"), None);
    let mut agent = ScriptedAgent::new(info());
    agent.online.push_back(Ok((report(&[2, 3], "0-3", &[]), 0)));
    let f = facts(&dom, &agent).await;
    let r = run_on(&Setvcpus { target: 4 }, &f, Some(&mut agent), &opts(), Run::new()).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.render_text());
    assert_eq!(dom.calls(), ["setvcpus 4 Live"]);

    // The guest cannot release CPU 3: nothing reaches libvirt, the CPUs go back online.
    let mut incomplete = report(&[], "0-3", &[]);
    incomplete.complete = false;
    incomplete.cpus = vec![CpuResult { cpu: 3, outcome: Done::Failed { errno: 16, message: "busy".into() } }];
    agent.offline.push_back(Ok(incomplete));
    agent.online.push_back(Ok((report(&[], "0-3", &[]), 0)));
    let f = facts(&dom, &agent).await;
    let r = run_on(&Setvcpus { target: 2 }, &f, Some(&mut agent), &opts(), Run::new()).await.expect("runs");
    assert_eq!(r.outcome, Outcome::GuestFailed, "{}", r.render_text());
    assert_eq!(dom.calls(), ["setvcpus 4 Live"], "no unplug was asked of libvirt");
    assert_eq!(
        agent.requests,
        ["online cpus=Some(4) ranges=0", "offline cpus=Some(2) ranges=0", "online cpus=Some(4) ranges=0"]
    );
}

/// The judges decide from evidence alone: each is called here with evidence
/// made by hand, nothing reaches libvirt or the agent, and the outcome follows
/// the evidence (the same plan, different evidence, another verdict).
#[tokio::test]
async fn a_verbs_judge_decides_from_its_evidence_alone() {
    use vmplug::ops::{MemoryEvidence, MemorySeen, VcpuEvidence, VcpuSeen, WaveEnd};
    use vmplug::unplug::{DetachEvidence, DetachMemory, DetachSeen};
    use vmplug::verb::Verb;

    let dom = FakeDomain::new("web1", include_str!("fixtures/x86-ready.xml"), None);
    let agent = ScriptedAgent::new(info());
    let f = facts(&dom, &agent).await;
    let o = opts();

    // setvcpus: a report that calls itself complete is believed only when the
    // guest's own count of online CPUs is the target.
    let verb = Setvcpus { target: 4 };
    let seen = |online: &str| VcpuSeen::Applied {
        applied: vec!["setvcpus 4 (live)".into()],
        released: None,
        confirmation: Some(Ok(report(&[2, 3], online, &[]))),
        after: None,
    };
    let plan = verb.plan(&f, &o).expect("plans");
    let r = verb.judge(&f, VcpuEvidence { plan: plan.clone(), seen: seen("0-3") }, &o, &Run::new());
    assert_eq!((r.outcome, r.message.as_str()), (Outcome::Ok, "4 vCPUs: libvirt and the guest agree (0-3 online)"));
    let r = verb.judge(&f, VcpuEvidence { plan: plan.clone(), seen: seen("0-2") }, &o, &Run::new());
    assert_eq!(
        (r.outcome, r.message.as_str()),
        (Outcome::GuestFailed, "libvirt set 4 vCPUs but the guest reports 3 online (0-2)")
    );
    let not_released =
        VcpuSeen::NotReleased { answer: Err(vmplug::link::LinkError::NoAddress), back: "4 CPU(s) online again".into() };
    let r = verb.judge(&f, VcpuEvidence { plan, seen: not_released }, &o, &Run::new());
    assert_eq!(r.outcome, Outcome::GuestFailed);
    assert!(r.message.ends_with("; 4 CPU(s) online again; nothing was changed in libvirt"), "{}", r.message);

    // attach-memory: a staged plug stopped between waves is partial when the
    // guest lacked room for the next wave, a failure when it did not online one.
    let verb = AttachMemory { mem: mem_256m("w") };
    let plan = verb.plan(&f, &o).expect("plans");
    let stopped = |why| MemoryEvidence {
        plan: plan.clone(),
        applied: vec![],
        waves: 2,
        seen: MemorySeen::WaveStopped { done: 1, why },
    };
    let r = verb.judge(&f, stopped(WaveEnd::NoRoom("no room".into())), &o, &Run::new());
    assert_eq!(r.outcome, Outcome::Partial, "{}", r.message);
    assert!(r.message.starts_with("stopped after wave 1 of 2: no room;"), "{}", r.message);
    let r = verb.judge(&f, stopped(WaveEnd::NotOnline("not onlined".into())), &o, &Run::new());
    assert_eq!(r.outcome, Outcome::GuestFailed, "{}", r.message);

    // detach-memory: a DIMM QEMU still lists is a timeout, unless the
    // operator asked not to wait.
    let verb = DetachMemory { sel: vmplug::unplug::DimmSelector::Alias("dimm0".into()) };
    let plan = vmplug::plan::DetachPlan {
        findings: vec![],
        chosen: vec![],
        ranges: vec![],
        size: Bytes(128 * MIB),
        offline_first: true,
    };
    let still = || DetachEvidence {
        plan: plan.clone(),
        applied: vec![],
        guest: None,
        seen: DetachSeen::Live { after: None, left: vec!["dimm0".into()], gone: None },
    };
    let r = verb.judge(&f, still(), &o, &Run::new());
    assert_eq!(r.outcome, Outcome::GuestTimeout, "{}", r.message);
    let r = verb.judge(&f, still(), &HotplugOpts { no_wait: true, ..opts() }, &Run::new());
    assert_eq!(r.outcome, Outcome::Ok, "{}", r.message);

    assert!(dom.calls().is_empty(), "a judge acted: {:?}", dom.calls());
    assert!(agent.requests.is_empty(), "a judge asked the guest: {:?}", agent.requests);
}
