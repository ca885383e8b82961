//! vmplug's per-domain settings (tags, the agent's address, and later ones),
//! parsed and written without I/O (`meta` reads and changes them through libvirt):
//! ONE element of vmplug's own namespace in the domain's `<metadata>`, because
//! libvirt keeps only one element per namespace URI (define and
//! `virDomainSetMetadata` both keep the first child of each namespace):
//!
//! ```xml
//! <vmplug:domain xmlns:vmplug='https://vmplug.dev/xmlns/domain/1'>
//!   <vmplug:tag>autoscale</vmplug:tag>
//!   <vmplug:tag>web</vmplug:tag>
//!   <vmplug:agent transport='hybrid' path='/run/vmplug/web1.vsock' port='1024'/>
//! </vmplug:domain>
//! ```
//!
//! The old forms, one `<vmplug:tag>` or one `<vmplug:agent>` in the namespace
//! `https://vmplug.dev/xmlns/agent/1`, are still read; `vmplug meta` rewrites
//! them into the element above and removes them. Written and read through
//! libvirt's metadata API (`virsh metadata --uri … --key vmplug`).

use std::fmt::Write as _;

use roxmltree::{Document, Node};
use vmplug_common::protocol::DEFAULT_VSOCK_PORT;

/// The namespace of vmplug's first metadata forms (one `<tag>` or one
/// `<agent>`), still read; [`DOMAIN_NS`] holds the settings now.
pub const VMPLUG_NS: &str = "https://vmplug.dev/xmlns/agent/1";

/// Where the guest agent can be reached, as vmplug's metadata tells
/// (`<agent>` of [`Settings`]).
#[derive(Debug, Clone, PartialEq)]
pub enum AgentHint {
    /// `<agent transport='hybrid' path=… port=…/>`
    Hybrid { path: String, port: u32 },
    /// `<agent transport='vsock' cid=… port=…/>`
    Vsock { cid: u32, port: u32 },
    /// `<agent transport='serial' path=…/>`
    Serial { path: String },
}

impl std::fmt::Display for AgentHint {
    /// As `--agent` takes it: `hybrid:PATH:PORT`, `vsock:CID:PORT`, `serial:PATH`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentHint::Hybrid { path, port } => write!(f, "hybrid:{path}:{port}"),
            AgentHint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            AgentHint::Serial { path } => write!(f, "serial:{path}"),
        }
    }
}

/// The namespace of the one settings element.
pub const DOMAIN_NS: &str = "https://vmplug.dev/xmlns/domain/1";
/// The namespace of the old forms (one `<tag>` or one `<agent>`), read only.
pub const LEGACY_NS: &str = VMPLUG_NS;
/// The prefix libvirt writes the element with (`virsh metadata --key`).
pub const KEY: &str = "vmplug";
/// The longest tag, in bytes.
pub const MAX_TAG: usize = 128;
/// The most tags on one domain.
pub const MAX_TAGS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("vmplug metadata does not parse as XML: {0}")]
    Parse(String),
    #[error("vmplug metadata: <{0}> is not a vmplug settings element (<domain> of {DOMAIN_NS}, or <tag>/<agent> of {LEGACY_NS})")]
    Element(String),
    #[error(
        "vmplug metadata: tag '{0}' is empty, longer than {MAX_TAG} bytes, or has whitespace or control characters"
    )]
    Tag(String),
    #[error("vmplug metadata: more than {MAX_TAGS} tags")]
    TooManyTags,
    #[error("vmplug metadata: <agent> {0}")]
    Agent(String),
    #[error("vmplug metadata: <{0}> appears twice")]
    Twice(&'static str),
}

/// A tag: what autoscale's `[select] tag` matches. Non-empty, at most
/// [`MAX_TAG`] bytes, no whitespace or control characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Tag {
    type Err = MetaError;
    fn from_str(s: &str) -> Result<Tag, MetaError> {
        let ok = !s.is_empty() && s.len() <= MAX_TAG && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        if ok {
            Ok(Tag(s.to_string()))
        } else {
            Err(MetaError::Tag(s.chars().take(MAX_TAG + 1).collect()))
        }
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// vmplug's settings of one domain (one view: live or persistent).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Settings {
    /// In the order written, without repeats.
    pub tags: Vec<Tag>,
    /// Where the guest agent listens (`hybrid:PATH:PORT`, `vsock:CID:PORT`, `serial:PATH`).
    #[serde(serialize_with = "agent_string")]
    pub agent: Option<AgentHint>,
    /// Children this version does not know (a later version's settings), kept
    /// verbatim so that a rewrite does not lose them.
    #[serde(skip)]
    pub other: Vec<String>,
}

fn agent_string<S: serde::Serializer>(a: &Option<AgentHint>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.serialize_some(&a.to_string()),
        None => s.serialize_none(),
    }
}

/// Whether `n` is in vmplug's settings namespace, or in none (the element as
/// `virDomainGetMetadata` returns it: libvirt strips the namespace).
fn ours(n: Node, ns: &str) -> bool {
    n.tag_name().namespace().is_none_or(|n| n == ns)
}

/// `<agent transport=… path=… cid=… port=…/>`.
fn parse_agent(a: Node) -> Result<AgentHint, MetaError> {
    let attr = |name: &str| a.attribute(name).map(str::trim);
    let bad = |what: String| Err(MetaError::Agent(what));
    let port = match attr("port") {
        None => DEFAULT_VSOCK_PORT,
        Some(p) => match p.parse() {
            Ok(p) => p,
            Err(_) => return bad(format!("port='{p}' is not a number")),
        },
    };
    let path = || match attr("path") {
        Some(p) if !p.is_empty() => Ok(p.to_string()),
        _ => Err(MetaError::Agent(format!("transport='{}' needs a path", attr("transport").unwrap_or_default()))),
    };
    match attr("transport") {
        Some("hybrid") => Ok(AgentHint::Hybrid { path: path()?, port }),
        Some("serial") => Ok(AgentHint::Serial { path: path()? }),
        Some("vsock") => match attr("cid").map(|c| (c, c.parse::<u32>())) {
            Some((_, Ok(cid))) => Ok(AgentHint::Vsock { cid, port }),
            Some((c, Err(_))) => bad(format!("cid='{c}' is not a number")),
            None => bad("transport='vsock' needs a cid".into()),
        },
        Some(t) => bad(format!("transport='{t}' is not hybrid, vsock or serial")),
        None => bad("has no transport".into()),
    }
}

fn parse_tag(n: Node) -> Result<Tag, MetaError> {
    n.text().unwrap_or_default().trim().parse()
}

impl Settings {
    /// The settings element, as the domain XML holds it (namespaced) or as
    /// `virDomainGetMetadata` returns it (namespace stripped).
    pub fn parse(xml: &str) -> Result<Settings, MetaError> {
        let doc = Document::parse(xml).map_err(|e| MetaError::Parse(e.to_string()))?;
        Settings::from_node(doc.root_element())
    }

    /// `<domain>` of [`DOMAIN_NS`].
    pub fn from_node(root: Node) -> Result<Settings, MetaError> {
        if root.tag_name().name() != "domain" || !ours(root, DOMAIN_NS) {
            return Err(MetaError::Element(root.tag_name().name().to_string()));
        }
        let mut s = Settings::default();
        let doc_text = root.document().input_text();
        for c in root.children().filter(|c| c.is_element()) {
            match c.tag_name().name() {
                "tag" if ours(c, DOMAIN_NS) => s.add_tag(parse_tag(c)?)?,
                "agent" if ours(c, DOMAIN_NS) => {
                    if s.agent.is_some() {
                        return Err(MetaError::Twice("agent"));
                    }
                    s.agent = Some(parse_agent(c)?);
                }
                _ => s.other.push(doc_text[c.range()].to_string()),
            }
        }
        Ok(s)
    }

    /// An old form: one `<tag>` or one `<agent>` of [`LEGACY_NS`] (as the
    /// domain XML holds it, or namespace-stripped from `virDomainGetMetadata`).
    pub fn parse_legacy(xml: &str) -> Result<Settings, MetaError> {
        let doc = Document::parse(xml).map_err(|e| MetaError::Parse(e.to_string()))?;
        let mut s = Settings::default();
        s.read_legacy(doc.root_element())?;
        Ok(s)
    }

    fn read_legacy(&mut self, n: Node) -> Result<(), MetaError> {
        match n.tag_name().name() {
            "tag" if ours(n, LEGACY_NS) => self.add_tag(parse_tag(n)?),
            "agent" if ours(n, LEGACY_NS) => {
                self.agent.get_or_insert(parse_agent(n)?);
                Ok(())
            }
            other => Err(MetaError::Element(other.to_string())),
        }
    }

    /// Everything vmplug's settings say in a domain's `<metadata>`: the
    /// settings element, and the old forms beside it (the element wins where
    /// both name an agent; tags are the union). Elements of other namespaces
    /// are not looked at.
    pub fn from_metadata(md: Node) -> Result<Settings, MetaError> {
        let mut s = Settings::default();
        let mut seen = false;
        for c in md.children().filter(|c| c.is_element()) {
            match c.tag_name().namespace() {
                Some(DOMAIN_NS) if !seen => {
                    seen = true;
                    let new = Settings::from_node(c)?;
                    let old = std::mem::replace(&mut s, new);
                    s.merge_legacy(old)?;
                }
                Some(LEGACY_NS) => {
                    let mut old = Settings::default();
                    old.read_legacy(c)?;
                    s.merge_legacy(old)?;
                }
                _ => {}
            }
        }
        Ok(s)
    }

    /// Adds what an old form says: its tags (when new), its agent (when none yet).
    pub fn merge_legacy(&mut self, old: Settings) -> Result<(), MetaError> {
        for t in old.tags {
            self.add_tag(t)?;
        }
        if self.agent.is_none() {
            self.agent = old.agent;
        }
        Ok(())
    }

    pub(crate) fn add_tag(&mut self, t: Tag) -> Result<(), MetaError> {
        if !self.tags.contains(&t) {
            if self.tags.len() >= MAX_TAGS {
                return Err(MetaError::TooManyTags);
            }
            self.tags.push(t);
        }
        Ok(())
    }

    /// Nothing set: the element is removed rather than written empty.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.agent.is_none() && self.other.is_empty()
    }

    /// The element as `virDomainSetMetadata` takes it: no namespace (libvirt
    /// puts it and every child in [`DOMAIN_NS`] with the prefix [`KEY`]).
    pub fn to_element(&self) -> String {
        let mut s = String::from("<domain>\n");
        for t in &self.tags {
            let _ = writeln!(s, "  <tag>{}</tag>", esc(t.as_str()));
        }
        match &self.agent {
            Some(AgentHint::Hybrid { path, port }) => {
                let _ = writeln!(s, "  <agent transport='hybrid' path='{}' port='{port}'/>", esc(path));
            }
            Some(AgentHint::Vsock { cid, port }) => {
                let _ = writeln!(s, "  <agent transport='vsock' cid='{cid}' port='{port}'/>");
            }
            Some(AgentHint::Serial { path }) => {
                let _ = writeln!(s, "  <agent transport='serial' path='{}'/>", esc(path));
            }
            None => {}
        }
        for o in &self.other {
            let _ = writeln!(s, "  {o}");
        }
        s.push_str("</domain>\n");
        s
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}
