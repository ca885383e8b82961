//! The host never trusts the guest: a fake "agent" on a Unix socket floods,
//! stalls, lies about ids and sends oversized frames; the host's link stays
//! bounded in time and memory and reports what happened.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
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

#[tokio::test]
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
    assert!(t.elapsed() < Duration::from_secs(10), "bounded: {:?}", t.elapsed());
}

#[tokio::test]
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

#[tokio::test]
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
