//! Alertmanager's webhook (`webhook_configs`) as a trigger for autoscale: a
//! firing alert that names a domain (labels `domain`, optional `host` and
//! `resource`) asks it to grow, through the same policy limits, cooldown,
//! back-off and closed loop as pressure; its outcome is a JSON event and a
//! metric. Only `POST /alerts`; a malformed payload is a 400, an alert for a
//! domain this daemon does not manage a 404, each with a log line and nothing
//! else done.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::decision::{decide_alert, DecisionEvent, Resource};
use super::{apply, capacity, now_s, select_running, Engine, Host};

/// The largest payload read (Alertmanager sends a few KiB per group).
pub const MAX_WEBHOOK_BODY: usize = 256 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests handled at once.
const MAX_CONNECTIONS: usize = 16;

/// One firing alert's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRequest {
    pub alert: String,
    pub domain: String,
    /// A libvirt URI (or its host part) of one of autoscale's hosts.
    pub host: Option<String>,
    pub resource: Resource,
}

/// Alertmanager's webhook JSON → the firing alerts' requests (resolved ones are
/// counted, not acted on). Every firing alert must name a domain.
pub fn parse_alerts(body: &[u8]) -> Result<(Vec<AlertRequest>, usize), String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let alerts = doc.get("alerts").and_then(Value::as_array).ok_or("no 'alerts' array (not Alertmanager's webhook)")?;
    let (mut out, mut resolved) = (Vec::new(), 0);
    for (i, a) in alerts.iter().enumerate() {
        let labels = a.get("labels").and_then(Value::as_object).ok_or(format!("alert {i} has no labels"))?;
        // Escaped on arrival: labels reach log lines and events (a newline forged a line).
        let label = |k: &str| labels.get(k).and_then(Value::as_str).map(vmplug_common::text::escape);
        let alert = label("alertname").unwrap_or_else(|| format!("#{i}"));
        match a.get("status").and_then(Value::as_str) {
            Some("firing") => {}
            Some("resolved") => {
                resolved += 1;
                continue;
            }
            other => return Err(format!("alert {alert}: status {other:?}, not firing or resolved")),
        }
        let domain = label("domain").ok_or(format!("alert {alert} has no 'domain' label"))?;
        let resource = match label("resource").as_deref() {
            None | Some("memory") => Resource::Memory,
            Some("cpu") => Resource::Cpu,
            Some(r) => return Err(format!("alert {alert}: resource '{r}' is neither 'cpu' nor 'memory'")),
        };
        out.push(AlertRequest { alert, domain, host: label("host"), resource });
    }
    Ok((out, resolved))
}

/// Whether `host` (an alert's label) names this libvirt URI: the URI itself or
/// its host part (`qemu+ssh://root@hv3/system` → `hv3`).
fn names_host(uri: &str, host: &str) -> bool {
    if uri == host {
        return true;
    }
    let rest = uri.split_once("://").map_or("", |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let name = authority.rsplit('@').next().unwrap_or("").split(':').next().unwrap_or("");
    !name.is_empty() && name == host
}

/// What one request got: a status line and a JSON body.
pub type Answer = (&'static str, String);

/// Handles one webhook delivery: checks every alert, starts the accepted ones'
/// actions (answered at once; Alertmanager does not wait minutes) and says
/// which were accepted and which not, and why. One delivery asks each domain
/// for at most one grow per resource: further alerts for the same domain and
/// resource are duplicates, counted apart and never acted on.
pub async fn handle(engine: &Arc<Engine>, hosts: &[Host], body: &[u8]) -> Answer {
    let (requests, resolved) = match parse_alerts(body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %vmplug_common::text::escape(&e), "webhook: malformed payload");
            engine.metrics.count_alerts("malformed", 1);
            return ("400 Bad Request", serde_json::json!({ "error": e }).to_string());
        }
    };
    engine.metrics.count_alerts("resolved", resolved as u64);
    // Copies of one alert (and alerts asking the same thing) are checked once.
    let mut asked = std::collections::HashSet::new();
    let total = requests.len();
    let requests: Vec<AlertRequest> =
        requests.into_iter().filter(|r| asked.insert((r.domain.clone(), r.host.clone(), r.resource))).collect();
    let mut duplicates = total - requests.len();
    // Domains already granted a grow of this resource in this delivery, by host.
    let mut granted = std::collections::HashSet::new();
    let (mut accepted, mut rejected) = (Vec::new(), Vec::new());
    // Each host's running domains, read once per delivery and on every host at
    // the same time: a delivery of many alerts waits for the slowest host once.
    let mut reads = tokio::task::JoinSet::new();
    for (i, host) in hosts.iter().enumerate() {
        if requests.iter().any(|r| r.host.as_deref().is_none_or(|n| names_host(&host.uri, n))) {
            let (engine, host) = (engine.clone(), host.clone());
            reads.spawn(async move { (i, select_running(&engine.policy, &host).await) });
        }
    }
    let mut running = std::collections::BTreeMap::new();
    while let Some(r) = reads.join_next().await {
        if let Ok((i, selection)) = r {
            running.insert(i, selection);
        }
    }
    for req in requests {
        let mut found = None;
        for (i, host) in hosts.iter().enumerate() {
            if !req.host.as_deref().is_none_or(|n| names_host(&host.uri, n)) {
                continue;
            }
            let Some((selected, room)) = running.get(&i) else { continue };
            if let Some(facts) = selected.iter().find(|f| f.name == req.domain) {
                found = Some((host.clone(), facts.clone(), *room));
                break;
            }
        }
        let Some((host, facts, room)) = found else {
            let why = format!(
                "alert {}: no running domain '{}' selected by the policy{}",
                req.alert,
                req.domain,
                req.host.as_deref().map(|h| format!(" on host '{h}'")).unwrap_or_default()
            );
            tracing::warn!("webhook: {why}");
            rejected.push(why);
            continue;
        };
        // The same domain named with and without its host label.
        if !granted.insert((host.uri.clone(), facts.name.clone(), req.resource)) {
            duplicates += 1;
            continue;
        }
        accepted.push(format!("{} {:?} ({})", req.domain, req.resource, req.alert));
        let engine = engine.clone();
        tokio::spawn(async move {
            let ev = act_on_alert(&engine, &host, &facts, &room, &req).await;
            println!("{}", serde_json::to_string(&ev).unwrap_or_default());
        });
    }
    engine.metrics.count_alerts("accepted", accepted.len() as u64);
    engine.metrics.count_alerts("rejected", rejected.len() as u64);
    engine.metrics.count_alerts("duplicate", duplicates as u64);
    let body = serde_json::json!({
        "accepted": accepted,
        "rejected": rejected,
        "duplicates": duplicates,
        "resolved": resolved,
    })
    .to_string();
    if accepted.is_empty() && !rejected.is_empty() {
        ("404 Not Found", body)
    } else {
        ("202 Accepted", body)
    }
}

/// One alert's grow: decided against the domain's own state (one cooldown and
/// one action in flight whatever triggered it), applied, recorded.
async fn act_on_alert(
    engine: &Engine,
    host: &Host,
    facts: &crate::xml::DomainFacts,
    room: &super::HostRoom,
    req: &AlertRequest,
) -> DecisionEvent {
    let cap = capacity(facts, room);
    let started = std::time::Instant::now();
    let mut ev = DecisionEvent::new(&host.uri, &facts.name, &cap, now_s(), engine.dry_run);
    let key = (host.uri.clone(), facts.name.clone());
    let Some(mut st) = engine.begin(&key) else {
        ev.rule = "in-flight";
        ev.reason = format!("alert {}: an action on this domain is still running", req.alert);
        return ev;
    };
    let d = decide_alert(&engine.limits, &st, &cap, req.resource, &req.alert, ev.ts);
    let mut link = engine.take_session(&key);
    apply(engine, host, d, &mut ev, &mut st, &mut link).await;
    engine.keep_session(key.clone(), link);
    engine.end(key, st);
    ev.duration_ms = started.elapsed().as_millis() as u64;
    engine.metrics.record_action(&ev);
    ev
}

/// Splits a request into its head and as much of the body as came with it;
/// `None` until the head is complete.
fn split_head(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((&buf[..at], &buf[at + 4..]))
}

/// The request line's method and path, and the Content-Length.
fn parse_head(head: &[u8]) -> Result<(String, String, usize), &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "the request head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(path), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("no request line");
    };
    if !v.starts_with("HTTP/") {
        return Err("not HTTP");
    }
    let mut length = 0;
    for l in lines {
        if let Some((k, val)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = val.trim().parse().map_err(|_| "a bad Content-Length")?;
            }
        }
    }
    Ok((method.to_string(), path.split('?').next().unwrap_or_default().to_string(), length))
}

async fn answer(mut s: tokio::net::TcpStream, engine: Arc<Engine>, hosts: Arc<Vec<Host>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::with_capacity(4096);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some((head, body)) = split_head(&buf) {
                match parse_head(head) {
                    Ok((_, _, len)) if body.len() >= len || len > MAX_WEBHOOK_BODY => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            } else if buf.len() > 16 * 1024 {
                return Err("the request head is too long");
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err("the client went away"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let (status, body): Answer = match read {
        Err(_) => ("408 Request Timeout", "{\"error\":\"request not received in time\"}".into()),
        Ok(Err(e)) => ("400 Bad Request", serde_json::json!({ "error": e }).to_string()),
        Ok(Ok(())) => {
            let (head, rest) = split_head(&buf).unwrap_or_default();
            match parse_head(head) {
                Ok((_, _, len)) if len > MAX_WEBHOOK_BODY => {
                    ("413 Payload Too Large", format!("{{\"error\":\"at most {MAX_WEBHOOK_BODY} bytes\"}}"))
                }
                Ok((m, p, len)) => match (m.as_str(), p.as_str()) {
                    ("POST", "/alerts") => handle(&engine, &hosts, &rest[..len.min(rest.len())]).await,
                    (_, "/alerts") => ("405 Method Not Allowed", "{\"error\":\"POST only\"}".into()),
                    _ => ("404 Not Found", "{\"error\":\"the receiver is at /alerts\"}".into()),
                },
                Err(e) => ("400 Bad Request", serde_json::json!({ "error": e }).to_string()),
            }
        }
    };
    let resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(READ_TIMEOUT, s.write_all(resp.as_bytes())).await;
}

/// Serves the receiver on `addr` (a bare port binds loopback) until the process
/// ends: at most [`MAX_CONNECTIONS`] requests at once, each bounded in bytes and time.
pub async fn serve(addr: &str, engine: Arc<Engine>, hosts: Vec<Host>) -> std::io::Result<std::net::SocketAddr> {
    let addr = super::metrics_addr(addr).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "webhook receiver reachable beyond this host (unauthenticated): put it behind Alertmanager's network only");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let hosts = Arc::new(hosts);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (engine, hosts) = (engine.clone(), hosts.clone());
            tokio::spawn(async move {
                answer(stream, engine, hosts).await;
                drop(permit);
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRING: &str = r#"{"version":"4","status":"firing","receiver":"vmplug","groupKey":"{}:{}",
      "alerts":[
        {"status":"firing","labels":{"alertname":"GuestLowMemory","domain":"web1","resource":"memory"},"annotations":{}},
        {"status":"firing","labels":{"alertname":"GuestCpu","domain":"db1","host":"hv3","resource":"cpu"}},
        {"status":"resolved","labels":{"alertname":"GuestLowMemory","domain":"old"}}
      ]}"#;

    #[test]
    fn alertmanagers_payload_becomes_requests() {
        let (reqs, resolved) = parse_alerts(FIRING.as_bytes()).expect("parses");
        assert_eq!(resolved, 1, "resolved alerts are not acted on");
        assert_eq!(
            reqs,
            vec![
                AlertRequest {
                    alert: "GuestLowMemory".into(),
                    domain: "web1".into(),
                    host: None,
                    resource: Resource::Memory
                },
                AlertRequest {
                    alert: "GuestCpu".into(),
                    domain: "db1".into(),
                    host: Some("hv3".into()),
                    resource: Resource::Cpu
                },
            ]
        );
    }

    #[test]
    fn malformed_payloads_say_what_is_wrong() {
        for (body, says) in [
            ("nope", "not JSON"),
            ("{}", "no 'alerts'"),
            (r#"{"alerts":[{"status":"firing","labels":{"alertname":"X"}}]}"#, "no 'domain' label"),
            (
                r#"{"alerts":[{"status":"firing","labels":{"domain":"a","resource":"disk"}}]}"#,
                "neither 'cpu' nor 'memory'",
            ),
            (r#"{"alerts":[{"status":"pending","labels":{"domain":"a"}}]}"#, "not firing"),
            (r#"{"alerts":[{"status":"firing"}]}"#, "no labels"),
        ] {
            let e = parse_alerts(body.as_bytes()).expect_err(body);
            assert!(e.contains(says), "{body}: {e}");
        }
    }

    /// Security finding 5: a label value with a newline forged a log line.
    #[test]
    fn label_values_arrive_escaped() {
        let body = r#"{"alerts":[{"status":"firing","labels":{"alertname":"A\n2026-01-01T00:00:00Z  WARN forged","domain":"web1\u001b[2K","host":"hv3\r"}}]}"#;
        let (reqs, _) = parse_alerts(body.as_bytes()).expect("parses");
        assert_eq!(reqs[0].alert, "A\\u{a}2026-01-01T00:00:00Z  WARN forged");
        assert_eq!((reqs[0].domain.as_str(), reqs[0].host.as_deref()), ("web1\\u{1b}[2K", Some("hv3\\u{d}")));
        let bad = r#"{"alerts":[{"status":"firing","labels":{"domain":"a","resource":"disk\nx"}}]}"#;
        let e = parse_alerts(bad.as_bytes()).expect_err("bad resource");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_host_label_names_a_uri_or_its_host() {
        assert!(names_host("qemu+ssh://root@hv3/system", "hv3"));
        assert!(names_host("qemu+tls://hv3:16514/system", "hv3"));
        assert!(names_host("qemu:///system", "qemu:///system"));
        assert!(!names_host("qemu:///system", "hv3"));
        assert!(!names_host("qemu+ssh://hv30/system", "hv3"));
    }

    #[test]
    fn requests_are_read_by_head_and_length() {
        let (head, body) = split_head(b"POST /alerts HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").expect("complete");
        assert_eq!(parse_head(head).expect("head"), ("POST".into(), "/alerts".into(), 2));
        assert_eq!(body, b"{}");
        assert!(split_head(b"POST /alerts HTTP/1.1\r\n").is_none(), "head not complete yet");
        assert!(parse_head(b"\x16\x03garbage").is_err());
        assert!(parse_head(b"POST /alerts HTTP/1.1\r\nContent-Length: lots").is_err());
    }

    /// A connection that counts the domain reads a delivery makes.
    #[derive(Debug)]
    struct Counting {
        inner: Arc<crate::fake::FakeConnection>,
        lists: std::sync::atomic::AtomicUsize,
        lookups: std::sync::atomic::AtomicUsize,
    }

    impl crate::domain::Connection for Counting {
        fn uri(&self) -> String {
            self.inner.uri()
        }
        fn capabilities(&self) -> Result<String, crate::domain::DomainError> {
            self.inner.capabilities()
        }
        fn domain_capabilities(&self, a: &str, m: &str, v: &str) -> Result<String, crate::domain::DomainError> {
            self.inner.domain_capabilities(a, m, v)
        }
        fn cells_free_memory(&self, nodes: u32) -> Result<Vec<u64>, crate::domain::DomainError> {
            self.inner.cells_free_memory(nodes)
        }
        fn lookup(&self, name: &str) -> Result<Arc<dyn crate::domain::Domain>, crate::domain::DomainError> {
            self.lookups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.lookup(name)
        }
        fn list_domains(&self) -> Result<Vec<String>, crate::domain::DomainError> {
            self.lists.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.list_domains()
        }
        fn define(&self, xml: &str) -> Result<(), crate::domain::DomainError> {
            self.inner.define(xml)
        }
    }

    fn firing(domain: &str, host: Option<&str>, resource: &str, name: &str) -> Value {
        let mut labels = serde_json::json!({ "alertname": name, "domain": domain, "resource": resource });
        if let Some(h) = host {
            labels["host"] = h.into();
        }
        serde_json::json!({ "status": "firing", "labels": labels })
    }

    /// Security finding 9 (issue #26): a delivery of 2,500 copies of one alert
    /// counted 2,500 accepted alerts and started 2,500 grows. One delivery
    /// grows a domain once per resource; the rest are duplicates, counted
    /// apart; and the delivery reads the host's domains once, however many
    /// alerts it carries.
    #[tokio::test]
    async fn copies_of_an_alert_in_one_delivery_are_one_request() {
        let xml = include_str!("../../tests/fixtures/x86-ready.xml");
        let fake = crate::fake::FakeConnection::new(
            include_str!("../../tests/fixtures/caps.xml"),
            vec![crate::fake::FakeDomain::new("web1", xml, None)],
        );
        let conn = Arc::new(Counting { inner: fake, lists: Default::default(), lookups: Default::default() });
        let host = Host::new("qemu+ssh://root@hv3/system".into(), conn.clone(), 2);
        let policy = super::super::Policy::parse("p.toml", "[select]\nglobs = ['*']\n").expect("policy");
        let limits = policy.limits().expect("valid");
        let engine = Arc::new(Engine::new(policy, limits, true));

        let mut alerts: Vec<Value> = (0..2500).map(|_| firing("web1", None, "memory", "GuestLowMemory")).collect();
        alerts.push(firing("web1", Some("hv3"), "memory", "GuestMemPressure"));
        alerts.push(firing("web1", None, "cpu", "GuestCpu"));
        alerts.push(firing("web1", None, "cpu", "GuestCpu"));
        alerts.push(firing("nope", None, "cpu", "GuestCpu"));
        alerts.push(firing("nope", None, "cpu", "GuestCpu"));
        let body = serde_json::json!({ "alerts": alerts }).to_string();
        let (status, answer) = handle(&engine, std::slice::from_ref(&host), body.as_bytes()).await;
        assert_eq!(status, "202 Accepted", "{answer}");
        let answer: Value = serde_json::from_str(&answer).expect("JSON");
        assert_eq!(answer["accepted"].as_array().map(Vec::len), Some(2), "one grow per resource");
        assert_eq!(answer["rejected"].as_array().map(Vec::len), Some(1), "{}", answer["rejected"]);
        assert_eq!(answer["duplicates"], 2502);
        let text = engine.metrics.render();
        for line in [
            r#"vmplug_alerts_total{result="accepted"} 2"#,
            r#"vmplug_alerts_total{result="duplicate"} 2502"#,
            r#"vmplug_alerts_total{result="rejected"} 1"#,
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(conn.lists.load(Relaxed), 1, "the domain list is read once per delivery");
        assert_eq!(conn.lookups.load(Relaxed), 1, "each domain is read once per delivery");
    }
}
