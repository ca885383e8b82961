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
    let mem = MemoryOpts {
        size: Bytes(256 * MIB),
        node: Some(0),
        round_up: false,
        ceiling: None,
        max_dimm: Bytes(4 * GIB),
        request_id: "lie".into(),
    };
    let r = run_on(&AttachMemory { mem }, &f, Some(&mut agent), &opts(), Run::new()).await.expect("runs");
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
