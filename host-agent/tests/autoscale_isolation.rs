//! One guest cannot hold up autoscale for the others: a guest that reports high
//! CPU pressure, then never answers the hot-plug it provoked, keeps its own domain
//! busy (up to the action's timeout) while the other domain is still sampled every
//! interval.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use vmplug::autoscale::{run, Host, Policy};
use vmplug::fake::{FakeConnection, FakeDomain};
use vmplug_common::protocol::{Message, Pressure, Psi, Response};
use vmplug_common::{Bytes, MIB};

const XML: &str = include_str!("fixtures/x86-ready.xml");
const CAPS: &str = include_str!("fixtures/caps.xml");
const GUEST_INFO: &str = include_str!("../../common/tests/golden/guest_info.json");

fn pressure(cpu: f64) -> Response {
    let psi = |avg10| Some(Psi { avg10, avg60: avg10, avg300: avg10, total_us: 1 });
    Response::Pressure(Pressure {
        cpu_some: psi(cpu),
        memory_some: psi(0.0),
        memory_full: psi(0.0),
        mem_total: Bytes(1024 * MIB),
        mem_available: Bytes(900 * MIB),
        load1: 0.0,
        load5: 0.0,
        load15: 0.0,
        cpus_online: 2,
    })
}

/// A scripted agent on `path`, one task per connection: hello and info get the
/// golden facts, pressure gets `cpu` %, online is recorded and never answered.
fn agent(path: std::path::PathBuf, cpu: f64, log: Arc<Mutex<Vec<(String, Instant)>>>) {
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let (r, mut w) = tokio::io::split(s);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let v: serde_json::Value = serde_json::from_str(&line).expect("host frames are JSON");
                    let ty = v["body"]["type"].as_str().unwrap_or_default().to_string();
                    log.lock().expect("log").push((ty.clone(), Instant::now()));
                    let mut answer = match ty.as_str() {
                        "hello" | "info" => serde_json::from_str(GUEST_INFO).expect("golden"),
                        "pressure" => serde_json::to_value(Message::new(None, pressure(cpu))).expect("json"),
                        _ => continue, // online: the stall
                    };
                    answer["id"] = v["id"].clone();
                    let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
                }
            });
        }
    });
}

#[tokio::test(start_paused = true)]
async fn a_guest_stalling_its_hot_plug_does_not_delay_sampling_of_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (slow_log, calm_log) = (Arc::default(), Arc::default());
    let mut domains = Vec::new();
    for (name, cpu, log) in [("slow", 90.0, &slow_log), ("calm", 0.0, &calm_log)] {
        let sock = dir.path().join(format!("{name}.sock"));
        agent(sock.clone(), cpu, Arc::clone(log));
        let xml = XML
            .replace("<name>web1</name>", &format!("<name>{name}</name>"))
            .replace("/run/vmplug/web1.agent", &sock.to_string_lossy());
        domains.push(FakeDomain::new(name, &xml, None));
    }
    let conn = FakeConnection::new(CAPS, domains);
    let policy = Policy::parse(
        "test",
        "[select]\nglobs = ['*']\n[cpu]\nmax = 8\n[timing]\ninterval_s = 1\nsustain = 1\ncooldown_s = 0\n",
    )
    .expect("policy");
    let host = Host::new("fake:///".into(), conn, 2);
    // Five seconds of a paused clock: it moves only when every task waits, so the
    // count of rounds does not depend on how loaded the machine is.
    let ran = tokio::time::timeout(Duration::from_secs(5), run(vec![host], policy, false, false)).await;
    assert!(ran.is_err(), "the daemon runs until stopped");
    let ops = |log: &Arc<Mutex<Vec<(String, Instant)>>>, ty: &str| {
        log.lock().expect("log").iter().filter(|(t, _)| t == ty).count()
    };
    assert_eq!(ops(&slow_log, "online"), 1, "the slow guest provoked one hot-plug and stalls it");
    assert_eq!(ops(&slow_log, "pressure"), 1, "and its domain is skipped while the action runs");
    let calm = ops(&calm_log, "pressure");
    eprintln!("while the slow guest stalls its hot-plug, the calm domain was sampled {calm} times in 5 s");
    assert!(calm >= 3, "the calm domain is sampled every interval meanwhile: {calm} samples in 5 s");
}
