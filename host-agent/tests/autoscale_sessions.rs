//! Autoscale's agent sessions: on (hybrid) vsock one session per domain lasts
//! across rounds; on virtio-serial, whose chardev admits one host client at a
//! time, each round's session is closed when its step ends, so an operator's
//! `vmplug` gets the channel in between.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use vmplug::autoscale::{run, Host, Policy};
use vmplug::fake::{FakeConnection, FakeDomain};
use vmplug_common::protocol::{Message, Pressure, Psi, Response};
use vmplug_common::{Bytes, MIB};

const XML: &str = include_str!("fixtures/x86-ready.xml");
const CAPS: &str = include_str!("fixtures/caps.xml");
const GUEST_INFO: &str = include_str!("../../common/tests/golden/guest_info.json");

fn calm() -> Response {
    let psi = Some(Psi { avg10: 0.0, avg60: 0.0, avg300: 0.0, total_us: 1 });
    Response::Pressure(Pressure {
        cpu_some: psi,
        memory_some: psi,
        memory_full: psi,
        mem_total: Bytes(1024 * MIB),
        mem_available: Bytes(900 * MIB),
        load1: 0.0,
        load5: 0.0,
        load15: 0.0,
        cpus_online: 2,
    })
}

/// A scripted agent on `path` that logs `accept`, each request's type and `eof`;
/// `hybrid` answers Firecracker's `CONNECT <port>` line first.
fn agent(path: std::path::PathBuf, hybrid: bool, log: Arc<Mutex<Vec<String>>>) {
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let log = log.clone();
            log.lock().expect("log").push("accept".into());
            tokio::spawn(async move {
                let (r, mut w) = tokio::io::split(s);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if hybrid && line.starts_with("CONNECT ") {
                        let _ = w.write_all(b"OK 1073741824\n").await;
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(&line).expect("host frames are JSON");
                    let ty = v["body"]["type"].as_str().unwrap_or_default().to_string();
                    log.lock().expect("log").push(ty.clone());
                    let mut answer = match ty.as_str() {
                        "hello" | "info" => serde_json::from_str(GUEST_INFO).expect("golden"),
                        "pressure" => serde_json::to_value(Message::new(None, calm())).expect("json"),
                        _ => continue,
                    };
                    answer["id"] = v["id"].clone();
                    let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
                }
                log.lock().expect("log").push("eof".into());
            });
        }
    });
}

#[tokio::test(start_paused = true)]
async fn vsock_sessions_last_across_rounds_and_serial_ones_end_with_each_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (vsock_log, serial_log) = (Arc::default(), Arc::default());
    let mut domains = Vec::new();
    for (name, hybrid, log) in [("vs", true, &vsock_log), ("ser", false, &serial_log)] {
        let sock = dir.path().join(format!("{name}.sock"));
        agent(sock.clone(), hybrid, Arc::clone(log));
        let mut xml = XML.replace("<name>web1</name>", &format!("<name>{name}</name>"));
        if hybrid {
            let hint = format!(
                "<metadata>\n    <vmplug:agent xmlns:vmplug='https://vmplug.dev/xmlns/agent/1' transport='hybrid' path='{}' port='1023'/>",
                sock.display()
            );
            xml = xml.replace("<metadata>", &hint);
        } else {
            xml = xml.replace("/run/vmplug/web1.agent", &sock.to_string_lossy());
        }
        domains.push(FakeDomain::new(name, &xml, None));
    }
    let conn = FakeConnection::new(CAPS, domains);
    let policy =
        Policy::parse("test", "[select]\nglobs = ['*']\n[timing]\ninterval_s = 1\nsustain = 1\n").expect("policy");
    let host = Host::new("fake:///".into(), conn, 2);
    // 4.5 s of a paused clock: it moves only when every task waits, so the count
    // of rounds does not depend on how loaded the machine is.
    let ran = tokio::time::timeout(Duration::from_millis(4500), run(vec![host], policy, false, false)).await;
    assert!(ran.is_err(), "the daemon runs until stopped");
    let count =
        |log: &Arc<Mutex<Vec<String>>>, what: &str| log.lock().expect("log").iter().filter(|t| *t == what).count();

    let rounds = count(&vsock_log, "pressure");
    assert!(rounds >= 3, "sampled every second: {rounds} rounds");
    assert_eq!(count(&vsock_log, "accept"), 1, "one vsock session for all {rounds} rounds");
    assert_eq!(count(&vsock_log, "hello"), 1, "one handshake: {:?}", vsock_log.lock().expect("log"));
    assert_eq!(count(&vsock_log, "info"), rounds - 1, "later rounds ask for fresh facts on the same session");

    let log = serial_log.lock().expect("log").clone();
    let rounds = log.iter().filter(|t| *t == "pressure").count();
    assert!(rounds >= 3, "sampled every second: {log:?}");
    // Every serial session ends before the next begins: accept, hello, pressure, eof.
    let sessions: Vec<&[String]> = log.split(|t| t == "eof").filter(|s| !s.is_empty()).collect();
    assert!(sessions.len() >= rounds, "each round's session closed: {log:?}");
    for s in sessions {
        assert_eq!(s.first().map(String::as_str), Some("accept"), "one session at a time: {log:?}");
        assert_eq!(s.iter().filter(|t| *t == "accept").count(), 1, "one session at a time: {log:?}");
    }
}
