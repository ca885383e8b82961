//! Alertmanager's webhook (`webhook_configs`) as a trigger for autoscale: a
//! firing alert that names a domain (labels `domain`, optional `host` and
//! `resource`) asks it to grow, through the same policy limits, cooldown,
//! back-off and closed loop as pressure; its outcome is a JSON event and a
//! metric. Only `POST /alerts`. Each alert is judged on its own: a delivery
//! is answered 200 with what became of each alert (an invalid one, or one for
//! a domain this daemon does not manage, is counted and logged, and its
//! neighbours still act); only a payload that is not Alertmanager's webhook
//! version 4 is a 400.

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

/// The webhook payload version this receiver reads (Alertmanager's since 0.x;
/// 0.25 and later send it).
pub const WEBHOOK_VERSION: &str = "4";

/// One alert of a delivery, judged on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alert {
    /// A firing alert that names a domain: a request to grow it.
    Firing(AlertRequest),
    /// Counted, not acted on.
    Resolved { alert: String },
    /// An alert this receiver cannot act on (no labels, no `domain`, an
    /// unknown `resource` or `status`), and why; its neighbours still act.
    Invalid { alert: String, error: String },
}

/// Alertmanager's webhook JSON → its alerts, each judged on its own. `Err`
/// only for a payload that is not Alertmanager's webhook at all (not JSON, no
/// `alerts` array, a `version` other than [`WEBHOOK_VERSION`]).
pub fn parse_alerts(body: &[u8]) -> Result<Vec<Alert>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    match doc.get("version") {
        Some(Value::String(v)) if v == WEBHOOK_VERSION => {}
        Some(v) => {
            return Err(format!(
                "payload version {} is not {WEBHOOK_VERSION:?}, the Alertmanager webhook version this receiver reads",
                vmplug_common::text::escape(&v.to_string())
            ))
        }
        None => return Err(format!("no 'version' (Alertmanager's webhook sends {WEBHOOK_VERSION:?})")),
    }
    let alerts = doc.get("alerts").and_then(Value::as_array).ok_or("no 'alerts' array (not Alertmanager's webhook)")?;
    Ok(alerts.iter().enumerate().map(|(i, a)| parse_alert(i, a)).collect())
}

/// One alert of a delivery; `i` names it when it has no `alertname`.
fn parse_alert(i: usize, a: &Value) -> Alert {
    let Some(labels) = a.get("labels").and_then(Value::as_object) else {
        return Alert::Invalid { alert: format!("#{i}"), error: "no labels".into() };
    };
    // Escaped on arrival: labels reach log lines and events (a newline forged a line).
    let label = |k: &str| labels.get(k).and_then(Value::as_str).map(vmplug_common::text::escape);
    let alert = label("alertname").unwrap_or_else(|| format!("#{i}"));
    let invalid = |error: String| Alert::Invalid { alert: alert.clone(), error };
    match a.get("status").and_then(Value::as_str) {
        Some("firing") => {}
        Some("resolved") => return Alert::Resolved { alert },
        other => {
            let other = other.map(vmplug_common::text::escape);
            return invalid(format!("status {other:?}, not firing or resolved"));
        }
    }
    let Some(domain) = label("domain") else { return invalid("no 'domain' label".into()) };
    let resource = match label("resource").as_deref() {
        None | Some("memory") => Resource::Memory,
        Some("cpu") => Resource::Cpu,
        Some(r) => return invalid(format!("resource '{r}' is neither 'cpu' nor 'memory'")),
    };
    Alert::Firing(AlertRequest { alert, domain, host: label("host"), resource })
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

/// What became of one alert of a delivery, in the answer's `alerts` list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AlertResult {
    pub alert: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// One of [`super::ALERT_RESULTS`] but `malformed`.
    pub result: &'static str,
    /// Why it was not accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Handles one webhook delivery: judges each alert on its own, starts the
/// accepted ones' actions (answered at once; Alertmanager does not wait
/// minutes) and answers 200 with what became of each, in the delivery's order
/// (`accepted`, `duplicate`, `rejected`, `invalid`, `resolved`) and their
/// counts. One bad alert never costs its neighbours their action: Alertmanager
/// takes any 4xx as final and drops the whole delivery. Only a payload that is
/// not Alertmanager's webhook at all is a 400. One delivery asks each domain
/// for at most one grow per resource: further alerts for the same domain and
/// resource are duplicates, counted apart and never acted on.
pub async fn handle(engine: &Arc<Engine>, hosts: &[Host], body: &[u8]) -> Answer {
    let alerts = match parse_alerts(body) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %vmplug_common::text::escape(&e), "webhook: malformed payload");
            engine.metrics.count_alerts("malformed", 1);
            return ("400 Bad Request", serde_json::json!({ "error": e }).to_string());
        }
    };
    let result = |alert: &str, domain: Option<&str>, result: &'static str, reason: Option<String>| AlertResult {
        alert: alert.to_string(),
        domain: domain.map(str::to_string),
        result,
        reason,
    };
    let mut results: Vec<Option<AlertResult>> = vec![None; alerts.len()];
    // Copies of one alert (and alerts asking the same thing) are checked once.
    let mut asked = std::collections::HashSet::new();
    let mut requests = Vec::new();
    for (i, a) in alerts.into_iter().enumerate() {
        results[i] = match a {
            Alert::Resolved { alert } => Some(result(&alert, None, "resolved", None)),
            Alert::Invalid { alert, error } => {
                tracing::warn!(%alert, %error, "webhook: alert not acted on");
                Some(result(&alert, None, "invalid", Some(error)))
            }
            Alert::Firing(r) if !asked.insert((r.domain.clone(), r.host.clone(), r.resource)) => {
                Some(result(&r.alert, Some(&r.domain), "duplicate", None))
            }
            Alert::Firing(r) => {
                requests.push((i, r));
                None
            }
        };
    }
    // Domains already granted a grow of this resource in this delivery, by host.
    let mut granted = std::collections::HashSet::new();
    // Each host's running domains, read once per delivery and on every host at
    // the same time: a delivery of many alerts waits for the slowest host once.
    let mut reads = tokio::task::JoinSet::new();
    for (i, host) in hosts.iter().enumerate() {
        if requests.iter().any(|(_, r)| r.host.as_deref().is_none_or(|n| names_host(&host.uri, n))) {
            let (engine, host) = (engine.clone(), host.clone());
            reads.spawn(async move { (i, select_running(&engine.policy, &host, engine.round()).await) });
        }
    }
    let mut running = std::collections::BTreeMap::new();
    while let Some(r) = reads.join_next().await {
        if let Ok((i, selection)) = r {
            running.insert(i, selection);
        }
    }
    for (at, req) in requests {
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
                "no running domain '{}' selected by the policy{}",
                req.domain,
                req.host.as_deref().map(|h| format!(" on host '{h}'")).unwrap_or_default()
            );
            tracing::warn!(alert = %req.alert, "webhook: {why}");
            results[at] = Some(result(&req.alert, Some(&req.domain), "rejected", Some(why)));
            continue;
        };
        // The same domain named with and without its host label.
        if !granted.insert((host.uri.clone(), facts.name.clone(), req.resource)) {
            results[at] = Some(result(&req.alert, Some(&req.domain), "duplicate", None));
            continue;
        }
        results[at] = Some(result(&req.alert, Some(&req.domain), "accepted", None));
        let engine = engine.clone();
        tokio::spawn(async move {
            let ev = act_on_alert(&engine, &host, &facts, &room, &req).await;
            super::events::print_event(&ev);
        });
    }
    let results: Vec<AlertResult> = results.into_iter().flatten().collect();
    let mut body = serde_json::json!({ "alerts": results });
    for name in super::ALERT_RESULTS.into_iter().filter(|r| *r != "malformed") {
        let n = results.iter().filter(|r| r.result == name).count();
        engine.metrics.count_alerts(name, n as u64);
        body[name] = n.into();
    }
    ("200 OK", body.to_string())
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
    let mut session = engine.take_session(&key);
    apply(engine, host, d, &mut ev, &mut st, &mut session.link).await;
    if ev.outcome.is_some() {
        host.xml.invalidate(&facts.name);
    }
    engine.keep_session(key.clone(), session);
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

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length` (0 without one).
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A request head: method, path without its query, body framing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    method: String,
    path: String,
    framing: Framing,
}

/// Why a request could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadError {
    /// A broken request: a 400 saying this.
    Bad(&'static str),
    /// A body over [`MAX_WEBHOOK_BODY`]: a 413.
    TooLarge,
}

/// The request line's method and path, and how the body is framed.
fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "the request head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(path), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("no request line");
    };
    if !v.starts_with("HTTP/") {
        return Err("not HTTP");
    }
    let (mut length, mut chunked) = (None, false);
    for l in lines {
        if let Some((k, val)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = Some(val.trim().parse().map_err(|_| "a bad Content-Length")?);
            } else if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                if !val.trim().eq_ignore_ascii_case("chunked") {
                    return Err("a Transfer-Encoding other than chunked");
                }
                chunked = true;
            }
        }
    }
    let framing = match (length, chunked) {
        (Some(_), true) => return Err("both Content-Length and Transfer-Encoding"),
        (_, true) => Framing::Chunked,
        (n, false) => Framing::Length(n.unwrap_or(0)),
    };
    Ok(Head { method: method.to_string(), path: path.split('?').next().unwrap_or_default().to_string(), framing })
}

/// The body that follows the head, once all of it is in `rest`; `None` until then.
fn read_body(framing: Framing, rest: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
    match framing {
        Framing::Length(n) if n > MAX_WEBHOOK_BODY => Err(ReadError::TooLarge),
        Framing::Length(n) => Ok((rest.len() >= n).then(|| rest[..n].to_vec())),
        Framing::Chunked => dechunk(rest),
    }
}

/// A chunked body (RFC 9112 §7.1) decoded, once its last chunk and trailers
/// are in `buf`; `None` until then. At most [`MAX_WEBHOOK_BODY`] decoded bytes.
fn dechunk(buf: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
    /// The longest chunk-size or trailer line read.
    const MAX_LINE: usize = 4096;
    let line_end = |at: usize| -> Result<Option<usize>, ReadError> {
        match buf[at..].windows(2).position(|w| w == b"\r\n") {
            Some(n) if n <= MAX_LINE => Ok(Some(n)),
            None if buf.len() - at <= MAX_LINE => Ok(None),
            _ => Err(ReadError::Bad("a chunk-size or trailer line too long")),
        }
    };
    let (mut out, mut at) = (Vec::new(), 0);
    loop {
        let Some(n) = line_end(at)? else { return Ok(None) };
        let line = std::str::from_utf8(&buf[at..at + n]).map_err(|_| ReadError::Bad("a bad chunk size"))?;
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(hex, 16).map_err(|_| ReadError::Bad("a bad chunk size"))?;
        at += n + 2;
        if size == 0 {
            // Trailers, up to the empty line that ends the body.
            loop {
                let Some(n) = line_end(at)? else { return Ok(None) };
                at += n + 2;
                if n == 0 {
                    return Ok(Some(out));
                }
            }
        }
        if size > MAX_WEBHOOK_BODY - out.len() {
            return Err(ReadError::TooLarge);
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(ReadError::Bad("a chunk not ended by CRLF"));
        }
        at += size + 2;
    }
}

/// The most bytes read for one request: its head, and a body with room for
/// chunked framing's overhead.
const MAX_REQUEST: usize = 16 * 1024 + 2 * MAX_WEBHOOK_BODY;

/// Reads one request (its head, and its body by length or in chunks).
async fn read_request(s: &mut tokio::net::TcpStream) -> Result<(Head, Vec<u8>), ReadError> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        if let Some((head, rest)) = split_head(&buf) {
            let head = parse_head(head).map_err(ReadError::Bad)?;
            if let Some(body) = read_body(head.framing, rest)? {
                return Ok((head, body));
            }
        } else if buf.len() > 16 * 1024 {
            return Err(ReadError::Bad("the request head is too long"));
        }
        if buf.len() > MAX_REQUEST {
            return Err(ReadError::TooLarge);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(ReadError::Bad("the client went away")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn answer(mut s: tokio::net::TcpStream, engine: Arc<Engine>, hosts: Arc<Vec<Host>>) {
    use tokio::io::AsyncWriteExt;
    let read = tokio::time::timeout(READ_TIMEOUT, read_request(&mut s)).await;
    let (status, body): Answer = match read {
        Err(_) => ("408 Request Timeout", "{\"error\":\"request not received in time\"}".into()),
        Ok(Err(ReadError::Bad(e))) => ("400 Bad Request", serde_json::json!({ "error": e }).to_string()),
        Ok(Err(ReadError::TooLarge)) => {
            ("413 Payload Too Large", format!("{{\"error\":\"at most {MAX_WEBHOOK_BODY} bytes\"}}"))
        }
        Ok(Ok((head, body))) => match (head.method.as_str(), head.path.as_str()) {
            ("POST", "/alerts") => handle(&engine, &hosts, &body).await,
            (_, "/alerts") => ("405 Method Not Allowed", "{\"error\":\"POST only\"}".into()),
            _ => ("404 Not Found", "{\"error\":\"the receiver is at /alerts\"}".into()),
        },
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
        let alerts = parse_alerts(FIRING.as_bytes()).expect("parses");
        assert_eq!(
            alerts,
            vec![
                Alert::Firing(AlertRequest {
                    alert: "GuestLowMemory".into(),
                    domain: "web1".into(),
                    host: None,
                    resource: Resource::Memory
                }),
                Alert::Firing(AlertRequest {
                    alert: "GuestCpu".into(),
                    domain: "db1".into(),
                    host: Some("hv3".into()),
                    resource: Resource::Cpu
                }),
                Alert::Resolved { alert: "GuestLowMemory".into() },
            ]
        );
    }

    /// A payload that is not Alertmanager's webhook version 4 is refused whole.
    #[test]
    fn malformed_payloads_say_what_is_wrong() {
        for (body, says) in [
            ("nope", "not JSON"),
            (r#"{"version":"4"}"#, "no 'alerts'"),
            (r#"{"alerts":[]}"#, "no 'version'"),
            (r#"{"version":"5","alerts":[]}"#, r#"version "5" is not "4""#),
            (r#"{"version":4,"alerts":[]}"#, "version 4 is not \"4\""),
        ] {
            let e = parse_alerts(body.as_bytes()).expect_err(body);
            assert!(e.contains(says), "{body}: {e}");
        }
    }

    /// Issue #30: one alert the receiver cannot act on made the whole delivery
    /// a 400 (and Alertmanager drops a delivery on any 4xx). Each alert is
    /// judged on its own.
    #[test]
    fn a_bad_alert_is_judged_alone() {
        for (alert, says) in [
            (r#"{"status":"firing","labels":{"alertname":"X"}}"#, "no 'domain' label"),
            (r#"{"status":"firing","labels":{"domain":"a","resource":"disk"}}"#, "neither 'cpu' nor 'memory'"),
            (r#"{"status":"pending","labels":{"domain":"a"}}"#, "not firing"),
            (r#"{"status":"firing"}"#, "no labels"),
        ] {
            let body = format!(
                r#"{{"version":"4","alerts":[{alert},{{"status":"firing","labels":{{"alertname":"Ok","domain":"b"}}}}]}}"#
            );
            let alerts = parse_alerts(body.as_bytes()).expect(&body);
            assert!(matches!(&alerts[0], Alert::Invalid { error, .. } if error.contains(says)), "{alerts:?}");
            assert!(matches!(&alerts[1], Alert::Firing(r) if r.domain == "b"), "{alerts:?}");
        }
    }

    /// Security finding 5: a label value with a newline forged a log line.
    #[test]
    fn label_values_arrive_escaped() {
        let body = r#"{"version":"4","alerts":[{"status":"firing","labels":{"alertname":"A\n2026-01-01T00:00:00Z  WARN forged","domain":"web1\u001b[2K","host":"hv3\r"}}]}"#;
        let alerts = parse_alerts(body.as_bytes()).expect("parses");
        let Alert::Firing(req) = &alerts[0] else { panic!("{alerts:?}") };
        assert_eq!(req.alert, "A\\u{a}2026-01-01T00:00:00Z  WARN forged");
        assert_eq!((req.domain.as_str(), req.host.as_deref()), ("web1\\u{1b}[2K", Some("hv3\\u{d}")));
        let bad = r#"{"version":"4","alerts":[{"status":"firing\n","labels":{"domain":"a","resource":"disk\nx"}}]}"#;
        let alerts = parse_alerts(bad.as_bytes()).expect("parses");
        let Alert::Invalid { error, .. } = &alerts[0] else { panic!("{alerts:?}") };
        assert!(!error.contains('\n'), "{error}");
        let bad = r#"{"version":"4\nx","alerts":[]}"#;
        let e = parse_alerts(bad.as_bytes()).expect_err("bad version");
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
        let head = parse_head(head).expect("head");
        assert_eq!(head, Head { method: "POST".into(), path: "/alerts".into(), framing: Framing::Length(2) });
        assert_eq!(read_body(head.framing, body), Ok(Some(b"{}".to_vec())));
        assert_eq!(read_body(Framing::Length(3), body), Ok(None), "not all of it yet");
        assert_eq!(read_body(Framing::Length(MAX_WEBHOOK_BODY + 1), b""), Err(ReadError::TooLarge));
        assert!(split_head(b"POST /alerts HTTP/1.1\r\n").is_none(), "head not complete yet");
        assert!(parse_head(b"\x16\x03garbage").is_err());
        assert!(parse_head(b"POST /alerts HTTP/1.1\r\nContent-Length: lots").is_err());
        let chunked = parse_head(b"POST /alerts HTTP/1.1\r\nTransfer-Encoding: Chunked").expect("chunked");
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(parse_head(b"POST /alerts HTTP/1.1\r\nTransfer-Encoding: gzip").is_err());
        assert!(parse_head(b"POST /alerts HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2").is_err());
    }

    /// Issue #30: a chunked body (what a proxy or a client without the length
    /// sends) was read as empty. It is decoded, within the same size limit.
    #[test]
    fn chunked_bodies_are_read_within_the_limit() {
        let whole = b"4;ext=1\r\n{\"ve\r\n3\r\nrsi\r\n0\r\nX-Trailer: y\r\n\r\n";
        assert_eq!(dechunk(whole), Ok(Some(b"{\"versi".to_vec())));
        for cut in 0..whole.len() {
            assert_eq!(dechunk(&whole[..cut]), Ok(None), "{cut} bytes are not all of it");
        }
        assert_eq!(dechunk(b"0\r\n\r\n"), Ok(Some(vec![])));
        assert!(matches!(dechunk(b"zz\r\n"), Err(ReadError::Bad(_))));
        assert!(matches!(dechunk(b"2\r\nabc\r\n"), Err(ReadError::Bad(_))));
        assert!(matches!(dechunk(&[b'1'; 5000]), Err(ReadError::Bad(_))), "a size line without end");
        let big = format!("{:x}\r\n", MAX_WEBHOOK_BODY + 1);
        assert_eq!(dechunk(big.as_bytes()), Err(ReadError::TooLarge), "refused before it is sent");
        let half = format!("{:x}\r\n{}\r\n", MAX_WEBHOOK_BODY / 2, "x".repeat(MAX_WEBHOOK_BODY / 2));
        assert_eq!(dechunk(format!("{half}{half}1\r\n").as_bytes()), Err(ReadError::TooLarge), "over it in sum");
        assert!(
            matches!(dechunk(format!("{half}{half}0\r\n\r\n").as_bytes()), Ok(Some(b)) if b.len() == MAX_WEBHOOK_BODY)
        );
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
        let body = serde_json::json!({ "version": "4", "alerts": alerts }).to_string();
        let (status, answer) = handle(&engine, std::slice::from_ref(&host), body.as_bytes()).await;
        assert_eq!(status, "200 OK", "{answer}");
        let answer: Value = serde_json::from_str(&answer).expect("JSON");
        assert_eq!(answer["accepted"], 2, "one grow per resource");
        assert_eq!(answer["rejected"], 1, "{answer}");
        assert_eq!(answer["duplicate"], 2502);
        assert_eq!(answer["alerts"].as_array().map(Vec::len), Some(2505), "one result per alert");
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

    /// Issue #30: a delivery with an alert that names no domain and one for an
    /// unknown domain beside a good one got a 400, and Alertmanager gave the
    /// good one up. Now the good one acts, the others are counted and
    /// logged, and the 200 says what became of each, in order.
    #[tokio::test]
    async fn the_good_alerts_of_a_mixed_delivery_act() {
        let xml = include_str!("../../tests/fixtures/x86-ready.xml");
        let fake = crate::fake::FakeConnection::new(
            include_str!("../../tests/fixtures/caps.xml"),
            vec![crate::fake::FakeDomain::new("web1", xml, None)],
        );
        let host = Host::new("qemu:///system".into(), fake, 2);
        let policy = super::super::Policy::parse("p.toml", "[select]\nglobs = ['*']\n").expect("policy");
        let limits = policy.limits().expect("valid");
        let engine = Arc::new(Engine::new(policy, limits, true));
        let body = serde_json::json!({ "version": "4", "alerts": [
            { "status": "firing", "labels": { "alertname": "NoDomain" } },
            firing("nope", None, "memory", "Unknown"),
            firing("web1", None, "memory", "GuestLowMemory"),
            { "status": "firing", "labels": { "alertname": "Disk", "domain": "web1", "resource": "disk" } },
            { "status": "resolved", "labels": { "alertname": "Old", "domain": "web1" } },
        ]})
        .to_string();
        let (status, answer) = handle(&engine, std::slice::from_ref(&host), body.as_bytes()).await;
        assert_eq!(status, "200 OK", "{answer}");
        let answer: Value = serde_json::from_str(&answer).expect("JSON");
        let results: Vec<(&str, &str)> = answer["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .map(|r| (r["alert"].as_str().unwrap_or_default(), r["result"].as_str().unwrap_or_default()))
            .collect();
        assert_eq!(
            results,
            [
                ("NoDomain", "invalid"),
                ("Unknown", "rejected"),
                ("GuestLowMemory", "accepted"),
                ("Disk", "invalid"),
                ("Old", "resolved")
            ]
        );
        assert!(answer["alerts"][0]["reason"].as_str().is_some_and(|r| r.contains("no 'domain'")), "{answer}");
        assert!(answer["alerts"][1]["reason"].as_str().is_some_and(|r| r.contains("'nope'")), "{answer}");
        let text = engine.metrics.render();
        for line in [
            r#"vmplug_alerts_total{result="accepted"} 1"#,
            r#"vmplug_alerts_total{result="invalid"} 2"#,
            r#"vmplug_alerts_total{result="rejected"} 1"#,
            r#"vmplug_alerts_total{result="resolved"} 1"#,
            r#"vmplug_alerts_total{result="malformed"} 0"#,
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        let (status, answer) = handle(&engine, &[host], br#"{"version":"3","alerts":[]}"#).await;
        assert_eq!(status, "400 Bad Request", "{answer}");
        assert!(answer.contains(r#"\"3\""#), "names the version: {answer}");
        assert!(engine.metrics.render().contains(r#"vmplug_alerts_total{result="malformed"} 1"#));
    }
}
