//! The host never trusts the guest: a fake "agent" on a Unix socket floods,
//! stalls, lies about ids and sends oversized frames; the host's link stays
//! bounded in time and memory and reports what happened.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::time::Instant;
use vmplug::link::{AgentAddr, GuestLink, LinkError};

/// Accepts one connection and runs `script` on it.
async fn fake_agent<F, Fut>(script: F) -> (tempfile::TempDir, AgentAddr)
where
    F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        if let Ok((s, _)) = listener.accept().await {
            script(s).await;
        }
    });
    (dir, AgentAddr::Serial { path })
}

#[tokio::test(start_paused = true)]
async fn a_stalling_agent_times_out_in_bounded_time() {
    let (_d, addr) = fake_agent(|s| async move {
        // Reads forever, answers nothing.
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while r.read_line(&mut line).await.map(|n| n > 0).unwrap_or(false) {}
    })
    .await;
    let t = Instant::now();
    let err = GuestLink::connect(&addr, Duration::from_secs(2)).await.expect_err("no handshake");
    assert!(matches!(err, LinkError::Unreachable { .. }), "{err}");
    // A paused clock: the time is the link's own waiting, whatever the load.
    let bound = Duration::from_secs(2) + vmplug::link::HELLO_TIMEOUT + vmplug::link::CONNECT_RETRY;
    assert!(t.elapsed() <= bound, "bounded by the wait and one hello: {:?}", t.elapsed());
}

#[tokio::test(start_paused = true)]
async fn floods_of_garbage_and_oversized_frames_are_dropped_not_buffered() {
    let (_d, addr) = fake_agent(|mut s| async move {
        // 8 MiB without a newline, then garbage lines, then wrong ids: never a
        // valid answer to hello.
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..8 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = s
            .write_all(
                b"\n{not json}\n{\"v\":1,\"id\":1,\"body\":{\"type\":\"error\",\"code\":\"busy\",\"message\":\"x\"}}\n",
            )
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let err = GuestLink::connect(&addr, Duration::from_secs(2)).await.expect_err("no valid handshake");
    assert!(matches!(err, LinkError::Unreachable { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_guest_with_another_protocol_version_is_refused() {
    let (_d, addr) = fake_agent(|s| async move {
        let (r, mut w) = tokio::io::split(s);
        let mut r = BufReader::new(r);
        let mut line = String::new();
        let _ = r.read_line(&mut line).await;
        let id = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["id"].as_u64()).unwrap_or(0);
        let mut info =
            serde_json::from_str::<serde_json::Value>(include_str!("../../common/tests/golden/guest_info.json"))
                .expect("golden");
        info["id"] = id.into();
        info["body"]["protocol"] = 99.into();
        let _ = w.write_all(format!("{info}\n").as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let err = GuestLink::connect(&addr, Duration::from_secs(2)).await.expect_err("refused");
    assert!(matches!(err, LinkError::Version(99)), "{err}");
}

#[tokio::test]
async fn an_agent_that_lost_the_handshake_gets_hello_again_and_the_request_once_more() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let (_d, addr) = fake_agent(|s| async move {
        let (r, mut w) = tokio::io::split(s);
        let mut r = BufReader::new(r);
        let info: serde_json::Value =
            serde_json::from_str(include_str!("../../common/tests/golden/guest_info.json")).expect("golden");
        let mut line = String::new();
        let mut forgot = false;
        while r.read_line(&mut line).await.map(|n| n > 0).unwrap_or(false) {
            let v: serde_json::Value = serde_json::from_str(&line).expect("host frames are JSON");
            line.clear();
            let ty = v["body"]["type"].as_str().unwrap_or_default().to_string();
            log.lock().expect("log").push(ty.clone());
            // The first `info` is refused as after a virtio-serial session flip.
            let mut answer = if ty == "info" && !forgot {
                forgot = true;
                serde_json::json!({"v": 1, "body": {"type": "error", "code": "handshake_required",
                    "message": "'info' refused: send hello first"}})
            } else {
                info.clone()
            };
            answer["id"] = v["id"].clone();
            let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
        }
    })
    .await;
    let mut link = GuestLink::connect(&addr, Duration::from_secs(5)).await.expect("handshake");
    let info = link.info().await.expect("answered after a second hello");
    assert_eq!(info.protocol, 1);
    assert_eq!(*seen.lock().expect("log"), ["hello", "info", "hello", "info"]);
}

/// A fake agent that answers every `hello`/`info` with the golden guest facts
/// changed by `edit`, over as many connections as the host opens.
async fn lying_agent(edit: fn(&mut serde_json::Value)) -> (tempfile::TempDir, AgentAddr) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = tokio::io::split(s);
                let mut r = BufReader::new(r);
                let mut line = String::new();
                while r.read_line(&mut line).await.map(|n| n > 0).unwrap_or(false) {
                    let v: serde_json::Value = serde_json::from_str(&line).expect("host frames are JSON");
                    line.clear();
                    let mut info: serde_json::Value =
                        serde_json::from_str(include_str!("../../common/tests/golden/guest_info.json"))
                            .expect("golden");
                    edit(&mut info);
                    info["id"] = v["id"].clone();
                    let _ = w.write_all(format!("{info}\n").as_bytes()).await;
                }
            });
        }
    });
    (dir, AgentAddr::Serial { path })
}

/// Security finding 1: a guest that reports an 8 GiB block size turned
/// autoscale's 512 MiB step (rounded up, as autoscale asks) into an 8 GiB DIMM.
/// Rounding now stops at the request's ceiling: refused, nothing attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_block_size_cannot_widen_a_plug() {
    use vmplug::domain::Affect;
    use vmplug::fake::{FakeConnection, FakeDomain};
    use vmplug::ops::{AttachMemory, HotplugOpts, MemoryOpts};
    use vmplug::report::Outcome;
    use vmplug::verb;
    use vmplug_common::protocol::ZonePolicy;
    use vmplug_common::{Bytes, GIB, MIB};

    let (_d, addr) = lying_agent(|info| info["body"]["memory"]["block_size"] = (8 * GIB).into()).await;
    let dom = FakeDomain::new("web1", include_str!("fixtures/x86-ready.xml"), None);
    let conn = FakeConnection::new(include_str!("fixtures/caps.xml"), vec![dom.clone()]);
    let opts = HotplugOpts {
        affect: Affect::Live,
        timeout: Duration::from_secs(5),
        agent_wait: Duration::from_secs(5),
        no_wait: false,
        force: false,
        agent: Some(addr),
        zone: ZonePolicy::Auto,
    };
    // As autoscale asks: 512 MiB, rounding allowed up to its room of 1 GiB.
    let mem = MemoryOpts {
        size: Bytes(512 * MIB),
        node: Some(0),
        round_up: true,
        ceiling: Some(Bytes(GIB)),
        max_dimm: Bytes(4 * GIB),
        request_id: "a".into(),
    };
    let r = verb::run(&AttachMemory { mem: mem.clone() }, conn.clone(), "web1", &opts).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
    assert_eq!(r.findings[0].id, "mem.round-up", "{}", r.render_text());
    assert!(dom.calls().is_empty(), "nothing attached: {:?}", dom.calls());
    // As `attach-memory --round-up` asks (no ceiling but the domain's): the
    // 8 GiB unit is larger than --max-dimm, so no DIMM can be made.
    let cli = MemoryOpts { ceiling: None, request_id: "b".into(), ..mem };
    let r = verb::run(&AttachMemory { mem: cli.clone() }, conn.clone(), "web1", &opts).await.expect("runs");
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.render_text());
    assert!(r.findings.iter().any(|f| f.id == "mem.max-dimm"), "{}", r.render_text());
    assert!(dom.calls().is_empty(), "nothing attached: {:?}", dom.calls());
}

/// Security finding 3: guest strings reached the terminal raw; a `kernel` with
/// a newline and ESC sequences forged a line of a report. They arrive escaped.
#[tokio::test]
async fn guest_strings_arrive_escaped() {
    let (_d, addr) = lying_agent(|info| {
        info["body"]["kernel"] = "6.1\n  vcpus 8 of 8 \u{1b}[2K".into();
        info["body"]["memory"]["zones"] = serde_json::json!({"Normal\r\u{1b}]0;x\u{7}": 3});
    })
    .await;
    let link = GuestLink::connect(&addr, Duration::from_secs(5)).await.expect("handshake");
    assert_eq!(link.info.kernel, "6.1\\u{a}  vcpus 8 of 8 \\u{1b}[2K");
    let zones: Vec<&String> = link.info.memory.as_ref().expect("memory").zones.keys().collect();
    assert_eq!(zones, ["Normal\\u{d}\\u{1b}]0;x\\u{7}"]);
}
