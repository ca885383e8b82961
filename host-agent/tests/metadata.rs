//! vmplug's per-domain settings against real libvirt (`test:///` driver with a
//! node file per test, so tests share no state): libvirt keeps one metadata
//! element per namespace, and tags and the agent's address both survive in
//! vmplug's one element — through `virDomainSetMetadata`, through define, and
//! into autoscale's selection by tag.

mod node;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vmplug::autoscale::{run, Host, Policy};
use vmplug::domain::{Affect, Connection, XmlView};
use vmplug::libvirt::LibvirtConnection;
use vmplug::meta::{meta, Change, Settings, Tag, DOMAIN_NS, LEGACY_NS};
use vmplug::xml::{AgentHint, DomainFacts};

const GUEST_INFO: &str = include_str!("../../common/tests/golden/guest_info.json");

/// A node file with one domain per `(name, metadata children)`, all running.
fn node(dir: &std::path::Path, domains: &[(&str, &str)]) -> Arc<dyn Connection> {
    let doms: String = domains
        .iter()
        .map(|(name, md)| {
            format!(
                "<domain type='test'>
                   <name>{name}</name><metadata>{md}</metadata>
                   <memory>1048576</memory><vcpu current='1'>4</vcpu>
                   <os><type arch='x86_64' machine='pc'>hvm</type></os><devices/>
                 </domain>"
            )
        })
        .collect();
    Arc::new(LibvirtConnection::open(Some(&node::test_node(dir, &doms))).expect("test driver"))
}

fn tag(s: &str) -> Tag {
    s.parse().expect("tag")
}

fn facts(c: &Arc<dyn Connection>, name: &str, view: XmlView) -> DomainFacts {
    DomainFacts::parse(&c.lookup(name).expect("domain").xml(view).expect("xml")).expect("parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_agent_both_survive_set_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = node(dir.path(), &[("web1", "")]);
    let change = Change {
        tag: vec![tag("autoscale"), tag("web")],
        agent: Some(AgentHint::Hybrid { path: "/run/vmplug/web1.vsock".into(), port: 1024 }),
        ..Default::default()
    };
    let r = meta(c.clone(), "web1", change, false, false).await.expect("meta");
    assert_eq!(r.affect, Affect::Both, "a running domain: live and persistent");
    let want = Settings {
        tags: vec![tag("autoscale"), tag("web")],
        agent: Some(AgentHint::Hybrid { path: "/run/vmplug/web1.vsock".into(), port: 1024 }),
        other: vec![],
    };
    assert_eq!((r.live.as_ref(), r.config.as_ref()), (Some(&want), Some(&want)), "read back through the API");
    for view in [XmlView::Live, XmlView::Inactive] {
        let f = facts(&c, "web1", view);
        assert_eq!(f.tags, vec!["autoscale", "web"], "{view:?}");
        assert_eq!(f.agent_hint, want.agent, "{view:?}");
    }
    // A second change keeps what it does not name.
    let untag = Change { untag: vec![tag("web")], ..Default::default() };
    let r = meta(c.clone(), "web1", untag, false, true).await.expect("meta --config");
    assert_eq!(r.live, None);
    let config = r.config.expect("config");
    assert_eq!((config.tags, config.agent), (vec![tag("autoscale")], want.agent.clone()));
    assert_eq!(facts(&c, "web1", XmlView::Live).tags, vec!["autoscale", "web"], "live untouched");
    // Clearing everything removes the element.
    let clear = Change { untag: vec![tag("autoscale")], no_agent: true, ..Default::default() };
    meta(c.clone(), "web1", clear, false, true).await.expect("clear");
    let dom = c.lookup("web1").expect("domain");
    assert_eq!(dom.metadata(DOMAIN_NS, XmlView::Inactive).expect("metadata"), None);
}

#[test]
fn define_with_the_element_keeps_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = node(dir.path(), &[("web1", "")]);
    let mut xml = c.lookup("web1").expect("domain").xml(XmlView::Inactive).expect("xml");
    let element = "<vmplug:domain xmlns:vmplug='https://vmplug.dev/xmlns/domain/1'>\
                   <vmplug:tag>a</vmplug:tag><vmplug:tag>b</vmplug:tag>\
                   <vmplug:agent transport='vsock' cid='42' port='1024'/></vmplug:domain>\
                   <app:x xmlns:app='https://example.com/app'>theirs</app:x>";
    xml = match xml.find("<metadata/>") {
        Some(_) => xml.replace("<metadata/>", &format!("<metadata>{element}</metadata>")),
        None => xml.replace("</name>", &format!("</name><metadata>{element}</metadata>")),
    };
    c.define(&xml).expect("define");
    let f = facts(&c, "web1", XmlView::Inactive);
    assert_eq!(f.tags, vec!["a", "b"]);
    assert_eq!(f.agent_hint, Some(AgentHint::Vsock { cid: 42, port: 1024 }));
    let got = c.lookup("web1").expect("domain").metadata(DOMAIN_NS, XmlView::Inactive).expect("metadata");
    let s = Settings::parse(&got.expect("the element")).expect("parses");
    assert_eq!(s.tags, vec![tag("a"), tag("b")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_form_is_read_and_moved_into_the_element() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = "<vmplug:agent xmlns:vmplug='https://vmplug.dev/xmlns/agent/1' transport='serial' path='/run/a.sock'/>";
    let c = node(dir.path(), &[("db1", old)]);
    assert_eq!(facts(&c, "db1", XmlView::Live).agent_hint, Some(AgentHint::Serial { path: "/run/a.sock".into() }));
    let r = meta(c.clone(), "db1", Change { tag: vec![tag("autoscale")], ..Default::default() }, false, false)
        .await
        .expect("meta");
    assert!(r.applied.iter().any(|a| a.contains("old-form")), "{:?}", r.applied);
    let dom = c.lookup("db1").expect("domain");
    for view in [XmlView::Live, XmlView::Inactive] {
        assert_eq!(dom.metadata(LEGACY_NS, view).expect("metadata"), None, "{view:?}: old form removed");
        let f = facts(&c, "db1", view);
        assert_eq!(f.tags, vec!["autoscale"], "{view:?}");
        assert_eq!(f.agent_hint, Some(AgentHint::Serial { path: "/run/a.sock".into() }), "{view:?}: agent kept");
    }
}

/// An agent on `path` that answers the handshake and pressure, logging each
/// request's type.
fn agent(path: std::path::PathBuf, log: Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let (r, mut w) = tokio::io::split(s);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let v: serde_json::Value = serde_json::from_str(&line).expect("host frames are JSON");
                    let ty = v["body"]["type"].as_str().unwrap_or_default().to_string();
                    log.lock().expect("log").push(ty.clone());
                    let mut answer: serde_json::Value = match ty.as_str() {
                        "hello" | "info" => serde_json::from_str(GUEST_INFO).expect("golden"),
                        _ => continue,
                    };
                    answer["id"] = v["id"].clone();
                    let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
                }
            });
        }
    });
}

/// Autoscale's `[select] tag` finds a domain whose element also names its agent
/// (the two could not both survive in the old namespace), and only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscale_selects_by_tag_a_domain_that_also_has_an_agent_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tagged, untagged) = (Arc::default(), Arc::default());
    let (a, b) = (dir.path().join("tagged.sock"), dir.path().join("untagged.sock"));
    agent(a.clone(), Arc::clone(&tagged));
    agent(b.clone(), Arc::clone(&untagged));
    let element = |tags: &str, sock: &std::path::Path| {
        format!(
            "<vmplug:domain xmlns:vmplug='{DOMAIN_NS}'>{tags}<vmplug:agent transport='serial' path='{}'/></vmplug:domain>",
            sock.display()
        )
    };
    let c = node(
        dir.path(),
        &[
            ("tagged", &element("<vmplug:tag>web</vmplug:tag><vmplug:tag>autoscale</vmplug:tag>", &a)),
            ("untagged", &element("<vmplug:tag>web</vmplug:tag>", &b)),
        ],
    );
    let policy =
        Policy::parse("test", "[select]\ntag = 'autoscale'\n[timing]\ninterval_s = 1\nsustain = 1\n").expect("policy");
    let host = Host::new("test:///node".into(), c, 2);
    tokio::time::timeout(Duration::from_secs(20), run(vec![host], policy, true, true))
        .await
        .expect("one round ends")
        .expect("runs");
    let tagged = tagged.lock().expect("log").clone();
    assert!(tagged.iter().any(|t| t == "hello"), "the tagged domain's agent was reached: {tagged:?}");
    assert!(untagged.lock().expect("log").is_empty(), "the untagged domain was not selected");
}
