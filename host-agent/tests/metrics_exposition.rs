//! Issue #30: the endpoint answered OpenMetrics whatever the client asked, and
//! `promtool check metrics` failed on it. A scrape over loopback gets
//! Prometheus text by default, which promtool passes, and OpenMetrics when its
//! `Accept` header prefers it.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use vmplug::autoscale::{serve_metrics, Engine, Policy};

/// One scrape: the response's head and body.
fn scrape(addr: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    c.write_all(format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}\r\n").as_bytes()).expect("send");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    (head.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_is_in_the_format_asked_for_and_promtool_clean() {
    let policy = Policy::default();
    let limits = policy.limits().expect("defaults are valid");
    let engine = Arc::new(Engine::new(policy, limits, true));
    let addr = serve_metrics("127.0.0.1:0", engine).await.expect("bind");
    let (head, text, om_head, om) = tokio::task::spawn_blocking(move || {
        let (head, text) = scrape(addr, None);
        let (om_head, om) =
            scrape(addr, Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"));
        (head, text, om_head, om)
    })
    .await
    .expect("scrapes");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"), "{head}");
    assert!(text.contains("# HELP vmplug_alerts_total ") && !text.contains("# EOF"), "{text}");
    assert!(om_head.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"), "{om_head}");
    assert!(om.ends_with("# EOF\n") && om.contains("# TYPE vmplug_alerts counter"), "{om}");

    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped the promtool check: promtool not runnable ({e}); Debian's 'prometheus' has it");
            return;
        }
    };
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool: {said}\n{text}");
}
