//! `vmplug meta`: reads and changes a domain's settings (see [`crate::settings`]
//! for the element and its rules) through libvirt's metadata API.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::domain::{Affect, Connection, DomainError, XmlView};
use crate::settings::AgentHint;

pub use crate::settings::{MetaError, Settings, Tag, DOMAIN_NS, KEY, LEGACY_NS, MAX_TAG, MAX_TAGS};

/// What `vmplug meta` changes: tags added and removed, the agent set or cleared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    pub tag: Vec<Tag>,
    pub untag: Vec<Tag>,
    pub agent: Option<AgentHint>,
    pub no_agent: bool,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.tag.is_empty() && self.untag.is_empty() && self.agent.is_none() && !self.no_agent
    }

    /// `s` with this change: removals first, then additions.
    pub fn apply(&self, s: &Settings) -> Result<Settings, MetaError> {
        let mut out = s.clone();
        out.tags.retain(|t| !self.untag.contains(t));
        for t in &self.tag {
            out.add_tag(t.clone())?;
        }
        if self.no_agent {
            out.agent = None;
        }
        if let Some(a) = &self.agent {
            out.agent = Some(a.clone());
        }
        Ok(out)
    }
}

/// Which definitions `vmplug meta` reads and changes.
///
/// As `virsh metadata`'s `--live` and `--config`; without either, both when
/// the domain is running (a tag is meant to outlive the run, and autoscale
/// reads the live XML) and the persistent definition when it is not.
pub fn affect_of(live: bool, config: bool, running: bool, name: &str) -> Result<Affect, DomainError> {
    match (live, config) {
        (true, _) if !running => Err(DomainError::NotRunning(name.to_string())),
        (true, true) => Ok(Affect::Both),
        (true, false) => Ok(Affect::Live),
        (false, true) => Ok(Affect::Config),
        (false, false) if running => Ok(Affect::Both),
        (false, false) => Ok(Affect::Config),
    }
}

/// The result of `vmplug meta`: the settings of each definition it touched,
/// as read back from libvirt after the change.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MetaReport {
    pub domain: String,
    pub running: bool,
    pub affect: Affect,
    /// The running domain's settings (when `--live`, or by default on a running domain).
    pub live: Option<Settings>,
    /// The persistent definition's settings.
    pub config: Option<Settings>,
    /// libvirt calls made, in order (empty when nothing changed); the
    /// envelope's `applied`.
    #[serde(skip)]
    pub applied: Vec<String>,
}

impl MetaReport {
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        for (view, set) in [("live", &self.live), ("config", &self.config)] {
            let Some(set) = set else { continue };
            let tags = if set.tags.is_empty() {
                "-".to_string()
            } else {
                set.tags.iter().map(Tag::as_str).collect::<Vec<_>>().join(", ")
            };
            let agent = set.agent.as_ref().map_or("- (channel or <vsock> of the domain)".into(), |a| a.to_string());
            let _ = writeln!(s, "{view:<7} tags:  {tags}");
            let _ = writeln!(s, "{:<7} agent: {agent}", "");
        }
        s
    }
}

/// Why `vmplug meta` failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaVerbError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    // The cause is part of the message: the report's `error` string is all a
    // --json reader gets.
    #[error("{view} metadata of '{domain}': {why}")]
    Read { domain: String, view: &'static str, why: MetaError },
    #[error("{view} metadata of '{domain}': {why}")]
    Change { domain: String, view: &'static str, why: MetaError },
    #[error("{view} metadata of '{domain}' reads back as {got:?}, not the {want:?} written")]
    ReadBack { domain: String, view: &'static str, want: Box<Settings>, got: Box<Settings> },
}

fn view_name(v: XmlView) -> &'static str {
    match v {
        XmlView::Live => "live",
        XmlView::Inactive => "persistent",
    }
}

/// The settings of one view, through `virDomainGetMetadata`: the element, and
/// the old form beside it (libvirt keeps at most one of those).
fn read(dom: &dyn crate::domain::Domain, view: XmlView) -> Result<(Settings, bool), MetaVerbError> {
    let err = |why| MetaVerbError::Read { domain: dom.name().to_string(), view: view_name(view), why };
    let mut s = match dom.metadata(DOMAIN_NS, view)? {
        Some(x) => Settings::parse(&x).map_err(err)?,
        None => Settings::default(),
    };
    let legacy = dom.metadata(LEGACY_NS, view)?;
    if let Some(x) = &legacy {
        s.merge_legacy(Settings::parse_legacy(x).map_err(err)?).map_err(err)?;
    }
    Ok((s, legacy.is_some()))
}

/// `vmplug meta`: applies `change` to each definition `affect` names (each
/// read, changed and written on its own: live and persistent settings may
/// differ), moves an old form into the element, and reads the result back.
pub async fn meta(
    conn: Arc<dyn Connection>,
    name: &str,
    change: Change,
    live: bool,
    config: bool,
) -> Result<MetaReport, MetaVerbError> {
    let name = name.to_string();
    crate::facts::blocking(move || Ok(meta_blocking(conn.as_ref(), &name, &change, live, config))).await?
}

fn meta_blocking(
    conn: &dyn Connection,
    name: &str,
    change: &Change,
    live: bool,
    config: bool,
) -> Result<MetaReport, MetaVerbError> {
    let dom = conn.lookup(name)?;
    let running = dom.is_active()?;
    let affect = affect_of(live, config, running, name)?;
    let mut report = MetaReport { domain: name.into(), running, affect, live: None, config: None, applied: vec![] };
    let views = [(affect.live(), XmlView::Live, Affect::Live), (affect.config(), XmlView::Inactive, Affect::Config)];
    for (_, view, one) in views.into_iter().filter(|(on, ..)| *on) {
        let (now, legacy) = read(dom.as_ref(), view)?;
        let vname = view_name(view);
        let mut result = now.clone();
        if !change.is_empty() || legacy {
            let want =
                change.apply(&now).map_err(|why| MetaVerbError::Change { domain: name.into(), view: vname, why })?;
            if want != now || legacy {
                let element = want.to_element();
                dom.set_metadata(DOMAIN_NS, KEY, (!want.is_empty()).then_some(element.as_str()), one)?;
                report.applied.push(format!("set-metadata {DOMAIN_NS} ({vname})"));
            }
            if legacy {
                dom.set_metadata(LEGACY_NS, KEY, None, one)?;
                report.applied.push(format!("remove old-form metadata {LEGACY_NS} ({vname})"));
            }
            let (got, _) = read(dom.as_ref(), view)?;
            if got != want {
                return Err(MetaVerbError::ReadBack {
                    domain: name.into(),
                    view: vname,
                    want: Box::new(want),
                    got: Box::new(got),
                });
            }
            result = got;
        }
        match view {
            XmlView::Live => report.live = Some(result),
            XmlView::Inactive => report.config = Some(result),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use roxmltree::Document;
    use vmplug_common::protocol::DEFAULT_VSOCK_PORT;

    fn t(s: &str) -> Tag {
        s.parse().expect("tag")
    }

    fn md(inner: &str) -> Result<Settings, MetaError> {
        let xml = format!("<domain><metadata>{inner}</metadata></domain>");
        let doc = Document::parse(&xml).expect("xml");
        let md = doc.root_element().first_element_child().expect("metadata");
        Settings::from_metadata(md)
    }

    #[test]
    fn new_form_with_tags_and_agent() {
        let s = md("<vmplug:domain xmlns:vmplug='https://vmplug.dev/xmlns/domain/1'><vmplug:tag>a</vmplug:tag><vmplug:tag> b </vmplug:tag><vmplug:agent transport='hybrid' path='/run/x.vsock' port='1024'/></vmplug:domain>")
            .expect("parses");
        assert_eq!(s.tags, vec![t("a"), t("b")]);
        assert_eq!(s.agent, Some(AgentHint::Hybrid { path: "/run/x.vsock".into(), port: 1024 }));
        assert!(s.other.is_empty());
    }

    #[test]
    fn new_form_as_get_metadata_returns_it() {
        let s = Settings::parse("<domain>\n  <tag>a</tag>\n  <agent transport=\"vsock\" cid=\"7\"/>\n</domain>")
            .expect("parses");
        assert_eq!(s.tags, vec![t("a")]);
        assert_eq!(s.agent, Some(AgentHint::Vsock { cid: 7, port: DEFAULT_VSOCK_PORT }));
    }

    #[test]
    fn old_forms_are_still_read() {
        let ns = "xmlns:vmplug='https://vmplug.dev/xmlns/agent/1'";
        let s = md(&format!("<vmplug:tag {ns}>autoscale</vmplug:tag>")).expect("tag");
        assert_eq!((s.tags, s.agent), (vec![t("autoscale")], None));
        let s = md(&format!("<vmplug:agent {ns} transport='serial' path='/run/a.sock'/>")).expect("agent");
        assert_eq!(s.agent, Some(AgentHint::Serial { path: "/run/a.sock".into() }));
        // Hand-written XML libvirt never kept: both old elements, still read.
        let s = md(&format!("<vmplug:tag {ns}>x</vmplug:tag><vmplug:agent {ns} transport='vsock' cid='3' port='9'/>"))
            .expect("both");
        assert_eq!((s.tags, s.agent), (vec![t("x")], Some(AgentHint::Vsock { cid: 3, port: 9 })));
        assert_eq!(Settings::parse_legacy("<tag>old</tag>").expect("stripped").tags, vec![t("old")]);
    }

    #[test]
    fn new_and_old_forms_together() {
        let s = md("<vmplug:agent xmlns:vmplug='https://vmplug.dev/xmlns/agent/1' transport='serial' path='/old'/>\
                    <v:domain xmlns:v='https://vmplug.dev/xmlns/domain/1'><v:tag>a</v:tag><v:agent transport='serial' path='/new'/></v:domain>\
                    <vmplug:tag xmlns:vmplug='https://vmplug.dev/xmlns/agent/1'>b</vmplug:tag>")
        .expect("parses");
        assert_eq!(s.tags, vec![t("a"), t("b")], "tags are the union");
        assert_eq!(s.agent, Some(AgentHint::Serial { path: "/new".into() }), "the element's agent wins");
    }

    #[test]
    fn other_namespaces_and_unknown_children() {
        let s = md("<app:tag xmlns:app='https://example.com/app'>not-ours</app:tag>").expect("parses");
        assert_eq!(s, Settings::default());
        let s = Settings::parse("<domain><tag>a</tag><limits cpus='4'/></domain>").expect("parses");
        assert_eq!(s.other, vec!["<limits cpus='4'/>".to_string()]);
        assert!(s.to_element().contains("<limits cpus='4'/>"), "kept through a rewrite");
    }

    #[test]
    fn garbage_is_refused_with_its_reason() {
        type Is = fn(&MetaError) -> bool;
        let cases: &[(&str, Is)] = &[
            ("<domain><tag>a</domain>", |e| matches!(e, MetaError::Parse(_))),
            ("not xml at all", |e| matches!(e, MetaError::Parse(_))),
            ("<settings/>", |e| matches!(e, MetaError::Element(n) if n == "settings")),
            ("<domain><tag></tag></domain>", |e| matches!(e, MetaError::Tag(_))),
            ("<domain><tag>two words</tag></domain>", |e| matches!(e, MetaError::Tag(_))),
            ("<domain><agent transport='carrier-pigeon'/></domain>", |e| matches!(e, MetaError::Agent(_))),
            ("<domain><agent transport='hybrid' port='1024'/></domain>", |e| matches!(e, MetaError::Agent(_))),
            ("<domain><agent transport='vsock' cid='three'/></domain>", |e| matches!(e, MetaError::Agent(_))),
            ("<domain><agent transport='hybrid' path='/x' port='-1'/></domain>", |e| matches!(e, MetaError::Agent(_))),
            ("<domain><agent/></domain>", |e| matches!(e, MetaError::Agent(_))),
            ("<domain><agent transport='serial' path='/a'/><agent transport='serial' path='/b'/></domain>", |e| {
                matches!(e, MetaError::Twice("agent"))
            }),
            ("<x:domain xmlns:x='https://example.com/other'/>", |e| matches!(e, MetaError::Element(_))),
        ];
        for (xml, want) in cases {
            let e = Settings::parse(xml).expect_err(xml);
            assert!(want(&e), "{xml}: {e:?}");
        }
        let many: String = (0..=MAX_TAGS).map(|i| format!("<tag>t{i}</tag>")).collect();
        assert_eq!(Settings::parse(&format!("<domain>{many}</domain>")), Err(MetaError::TooManyTags));
        assert!(matches!(Settings::parse_legacy("<vcpus>4</vcpus>"), Err(MetaError::Element(_))));
    }

    #[test]
    fn written_element_reads_back() {
        let s = Settings {
            tags: vec![t("a"), t("b&c")],
            agent: Some(AgentHint::Hybrid { path: "/run/it's.vsock".into(), port: 1024 }),
            other: vec![],
        };
        assert_eq!(Settings::parse(&s.to_element()), Ok(s.clone()));
        let serial = Settings { agent: Some(AgentHint::Serial { path: "/s".into() }), ..Settings::default() };
        assert_eq!(Settings::parse(&serial.to_element()), Ok(serial));
    }

    #[test]
    fn tags_are_checked() {
        assert!("autoscale".parse::<Tag>().is_ok());
        for bad in ["", " a", "a b", "a\tb", &"x".repeat(MAX_TAG + 1)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_change_removes_then_adds() {
        let now =
            Settings { tags: vec![t("a"), t("b")], agent: Some(AgentHint::Vsock { cid: 3, port: 1 }), other: vec![] };
        let c = Change { tag: vec![t("c"), t("a")], untag: vec![t("b")], no_agent: true, ..Default::default() };
        let after = c.apply(&now).expect("applies");
        assert_eq!((after.tags, after.agent), (vec![t("a"), t("c")], None));
        let c = Change { agent: Some(AgentHint::Serial { path: "/p".into() }), ..Default::default() };
        assert_eq!(c.apply(&now).expect("applies").agent, Some(AgentHint::Serial { path: "/p".into() }));
    }

    #[test]
    fn affect_follows_virsh_with_both_on_a_running_domain() {
        assert_eq!(affect_of(false, false, true, "d").ok(), Some(Affect::Both));
        assert_eq!(affect_of(false, false, false, "d").ok(), Some(Affect::Config));
        assert_eq!(affect_of(true, false, true, "d").ok(), Some(Affect::Live));
        assert_eq!(affect_of(false, true, true, "d").ok(), Some(Affect::Config));
        assert_eq!(affect_of(true, true, true, "d").ok(), Some(Affect::Both));
        assert!(matches!(affect_of(true, false, false, "d"), Err(DomainError::NotRunning(_))));
    }

    fn dom_xml(md: &str) -> String {
        format!("<domain><name>d</name><metadata>{md}</metadata><vcpu>1</vcpu><devices/></domain>")
    }

    fn fake(xml: &str, running: bool) -> (Arc<crate::fake::FakeDomain>, Arc<dyn Connection>) {
        let d = crate::fake::FakeDomain::new("d", xml, None);
        d.set_running(running);
        let c = crate::fake::FakeConnection::new("", vec![d.clone()]);
        (d, c)
    }

    #[tokio::test]
    async fn a_stopped_domain_changes_its_definition_and_drops_the_old_form() {
        use crate::domain::Domain as _;
        let (d, c) = fake(&dom_xml(&format!("<vmplug:tag xmlns:vmplug='{LEGACY_NS}'>old</vmplug:tag>")), false);
        let r = meta(c.clone(), "d", Change { tag: vec![t("new")], ..Default::default() }, false, false)
            .await
            .expect("meta");
        assert_eq!((r.affect, r.live.is_none()), (Affect::Config, true));
        assert_eq!(r.config.map(|s| s.tags), Some(vec![t("old"), t("new")]));
        let calls = d.calls();
        assert!(calls.iter().any(|c| c.contains(DOMAIN_NS) && c.ends_with("set Config")), "{calls:?}");
        assert!(calls.iter().any(|c| c.contains(LEGACY_NS) && c.ends_with("remove Config")), "{calls:?}");
        let f = crate::xml::DomainFacts::parse(&d.xml(XmlView::Inactive).expect("xml")).expect("parses");
        assert_eq!(f.tags, vec!["old", "new"]);
        let e = meta(c, "d", Change::default(), true, false).await.expect_err("--live on a stopped domain");
        assert!(matches!(e, MetaVerbError::Domain(DomainError::NotRunning(_))), "{e}");
    }

    #[tokio::test]
    async fn nothing_to_change_calls_nothing_and_a_failure_is_libvirts() {
        let element = format!("<v:domain xmlns:v='{DOMAIN_NS}'><v:tag>x</v:tag></v:domain>");
        let (d, c) = fake(&dom_xml(&element), true);
        for nothing in [Change::default(), Change { tag: vec![t("x")], ..Default::default() }] {
            let r = meta(c.clone(), "d", nothing, false, false).await.expect("meta");
            assert_eq!(r.live.map(|s| s.tags), Some(vec![t("x")]));
            assert!(r.applied.is_empty() && d.calls().is_empty(), "{:?}", d.calls());
        }
        d.fail("metadata", "operation failed");
        let e =
            meta(c, "d", Change { tag: vec![t("y")], ..Default::default() }, false, false).await.expect_err("fails");
        assert!(matches!(e, MetaVerbError::Domain(DomainError::Libvirt { op: "metadata", .. })), "{e}");
    }
}
