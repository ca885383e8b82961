//! `vmplug prepare`: make a domain hot-plug-ready as the guide's creation-time
//! templates say, by editing its persistent definition. The edit is a splice of
//! the few elements vmplug owns (`<vcpu>`, `<maxMemory>`, `<cpu>` topology and
//! NUMA cells, `<cputune>` vCPU pins, `<numatune>` memnodes) into the original
//! text: everything else — unknown elements, metadata, comments — stays byte for
//! byte.

use std::fmt::Write as _;

use roxmltree::{Document, Node};
use vmplug_common::{Bytes, CpuSet, MIB};

use crate::domain::{Affect, DomainState, NumaMode};
use crate::preflight::{self, Ctx, Finding, Operation, Proposal, RuleId, Severity, StrictCell};
use crate::xml::{DomainFacts, HostFacts, XmlError};

/// The limits `prepare` holds a definition to (the rules that do are in
/// preflight, beside the live verbs' rules of the same constraint).
pub use crate::preflight::{MAX_CELLS, MAX_SLOTS, MAX_VCPUS};

#[derive(Debug, Clone, Default)]
pub struct PrepareOpts {
    pub max_vcpus: Option<u32>,
    pub max_memory: Option<Bytes>,
    pub slots: Option<u32>,
    pub cells: Option<u32>,
    pub host_nodes: Option<CpuSet>,
    pub mode: Option<NumaMode>,
    /// The agent channel's socket; `None`: libvirt chooses it when the domain
    /// starts (under its channel directory).
    pub channel_path: Option<String>,
}

/// Why `prepare` wrote nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    #[error("domain XML: {0}")]
    Xml(String),
    /// The guide's constraints refuse the definition prepare would write:
    /// preflight's findings, errors first.
    #[error("{}", errors_text(.0))]
    Refused(Vec<Finding>),
}

fn errors_text(findings: &[Finding]) -> String {
    let errors: Vec<&str> =
        findings.iter().filter(|f| f.severity == Severity::Error).map(|f| f.message.as_str()).collect();
    errors.join("; ")
}

impl PrepareError {
    /// The findings behind the refusal (a broken XML is `prepare.xml`'s).
    pub fn findings(&self) -> Vec<Finding> {
        match self {
            PrepareError::Xml(_) => vec![Finding::error(RuleId::PrepareXml, self.to_string())],
            PrepareError::Refused(f) => f.clone(),
        }
    }

    /// The ids of the rules that refused.
    pub fn ids(&self) -> Vec<&'static str> {
        self.findings().iter().filter(|f| f.severity == Severity::Error).map(|f| f.id).collect()
    }
}

impl From<XmlError> for PrepareError {
    fn from(e: XmlError) -> Self {
        PrepareError::Xml(e.to_string())
    }
}

/// The new definition and what changed, in words.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub xml: String,
    pub notes: Vec<String>,
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(name))
}

/// Byte offset just after an element's start tag.
fn after_start_tag(xml: &str, n: Node) -> usize {
    let start = n.range().start;
    start + xml[start..].find('>').map(|i| i + 1).unwrap_or(0)
}

/// The indentation of the line an element starts on.
fn indent_of(xml: &str, n: Node) -> String {
    let start = n.range().start;
    let line = xml[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
    xml[line..start].chars().take_while(|c| c.is_whitespace()).collect()
}

/// What `prepare` says of a machine the rules accept: on aarch64, a QEMU
/// that cannot hot-plug vCPUs there (upstream's) scales them inside the guest.
fn machine_note(f: &DomainFacts, host: &HostFacts) -> Option<String> {
    let virt = f.arch == "aarch64" && (f.machine == "virt" || f.machine.starts_with("virt-"));
    (virt && host.cpu_hotplug == Some(false)).then(|| {
        format!("vCPUs: this host's QEMU cannot hot-plug vCPUs on '{}' (query-machines); scale with `vmplug setvcpus --guest` among vCPUs defined at boot (boot with maxcpus= to keep the surplus offline)", f.machine)
    })
}

/// The rules over what prepare would write: refused with every finding when
/// one breaks.
fn judge(f: &DomainFacts, host: &HostFacts, proposal: &Proposal) -> Result<(), PrepareError> {
    let ctx = Ctx {
        dom: f,
        host,
        guest: None,
        agent_trouble: None,
        running: false,
        state: DomainState::ShutOff,
        job_running: false,
        affect: Affect::Config,
        no_wait: true,
    };
    let findings = preflight::check(&ctx, &Operation::Prepare(Box::new(proposal.clone())));
    if preflight::has_errors(&findings) {
        return Err(PrepareError::Refused(findings));
    }
    Ok(())
}

/// The counts prepare would write (vCPUs, cells, slots, the memory ceiling),
/// as asked or kept from the definition.
fn propose(f: &DomainFacts, o: &PrepareOpts) -> Proposal {
    let current = f.vcpus_current;
    let (cores, threads) = f.topology.as_ref().map(|t| (t.cores.max(1), t.threads.max(1))).unwrap_or((1, 1));
    Proposal {
        current,
        max_vcpus: o.max_vcpus.unwrap_or(f.vcpus_max.max(current)),
        cells: o.cells.unwrap_or(u32::try_from(f.cells.len().max(1)).unwrap_or(u32::MAX)),
        per_socket: cores.saturating_mul(threads),
        slots: o.slots.unwrap_or(f.slots.unwrap_or(16)),
        max_memory: o.max_memory.or(f.max_memory).unwrap_or(Bytes(f.boot_memory().get() * 4)),
        host_nodes: o.host_nodes.clone(),
        strict: vec![],
        channel_path: o.channel_path.clone(),
    }
}

/// What the prepared definition holds, computed before any text is edited.
struct Layout {
    current: u32,
    max: u32,
    cores: u32,
    threads: u32,
    per_socket: u32,
    sockets: u32,
    ncells: u32,
    slots: u32,
    max_memory: Bytes,
    /// (cell id, its vCPUs, its initial memory)
    cells: Vec<(u32, CpuSet, Bytes)>,
}

/// An edit of the original text: a byte range and its replacement.
type Edit = (std::ops::Range<usize>, String);

/// Computes the prepared definition of `xml` (the persistent one) on `host`.
pub fn prepare(xml: &str, host: &HostFacts, o: &PrepareOpts) -> Result<Prepared, PrepareError> {
    let f = DomainFacts::parse(xml)?;
    let doc = Document::parse(xml).map_err(|e| PrepareError::Xml(e.to_string()))?;
    let dom = doc.root_element();
    // The counts are judged before anything is laid out (a layout's work grows
    // with them); strict placement once the cells' memory is known.
    let mut proposal = propose(&f, o);
    judge(&f, host, &proposal)?;
    let mut notes: Vec<String> = machine_note(&f, host).into_iter().collect();
    let l = layout(&f, &proposal);
    let (pins, memnodes, strict) = placement(&l, host, o, &mut notes);
    if !strict.is_empty() {
        proposal.strict = strict;
        judge(&f, host, &proposal)?;
    }
    let mut edits = size_edits(xml, dom, &f, &l, &mut notes)?;
    edits.extend(cpu_edits(xml, dom, &l)?);
    notes.push(format!("guest NUMA: {} cell(s) of whole sockets ({} vCPU(s) each)", l.ncells, l.per_socket));
    if !pins.is_empty() {
        edits.extend(pin_edits(xml, dom, &pins, &memnodes, o.mode.unwrap_or(NumaMode::Strict))?);
    }
    edits.extend(channel_edits(xml, dom, &f, o.channel_path.as_deref(), &mut notes)?);
    edits.sort_by_key(|(r, _)| std::cmp::Reverse((r.start, r.end)));
    let mut out = xml.to_string();
    for (r, text) in edits {
        out.replace_range(r, &text);
    }
    // What we wrote must read back as what we meant.
    let back = DomainFacts::parse(&out)?;
    debug_assert_eq!(back.vcpus_max, l.max);
    Ok(Prepared { xml: out, notes })
}

/// vCPUs, sockets, cells, slots and memory of the prepared definition, from
/// counts the rules accepted.
fn layout(f: &DomainFacts, p: &Proposal) -> Layout {
    let (current, max, ncells, per_socket, slots, max_memory) =
        (p.current, p.max_vcpus, p.cells, p.per_socket, p.slots, p.max_memory);
    let (cores, threads) = f.topology.as_ref().map(|t| (t.cores.max(1), t.threads.max(1))).unwrap_or((1, 1));
    let sockets = max / per_socket;
    // The initial memory stays; only the ceiling and the layout change.
    let initial = f.boot_memory();

    // Cells: whole sockets each (the guide: a socket's vCPUs in one vNode), memory
    // split evenly in MiB, or in hugepages when hugepages back the guest.
    let unit = f.hugepage_size.map(|h| h.get()).filter(|&h| h > MIB).unwrap_or(MIB);
    let units = initial.get() / unit;
    let mut cells = Vec::new();
    let mut first_socket = 0;
    for i in 0..ncells {
        let n_sockets = sockets / ncells + u32::from(i < sockets % ncells);
        let cpus: CpuSet = (first_socket * per_socket..(first_socket + n_sockets) * per_socket).collect();
        first_socket += n_sockets;
        let cell_units = units / ncells as u64 + u64::from((i as u64) < units % ncells as u64);
        cells.push((i, cpus, Bytes(cell_units * unit)));
    }

    Layout { current, max, cores, threads, per_socket, sockets, ncells, slots, max_memory, cells }
}

/// Host placement: each cell's memory on a host node (round-robin over
/// `--host-nodes`, which the rules have found on the host) and its vCPUs
/// pinned to that node's CPUs; with strict binding, what each cell asks of
/// its node, for the rule that judges it.
#[allow(clippy::type_complexity)]
fn placement(
    l: &Layout,
    host: &HostFacts,
    o: &PrepareOpts,
    notes: &mut Vec<String>,
) -> (Vec<(u32, CpuSet)>, Vec<(u32, u32)>, Vec<StrictCell>) {
    let cells = &l.cells;
    let (mut pins, mut memnodes, mut strict) = (Vec::new(), Vec::new(), Vec::new());
    let Some(list) = o.host_nodes.as_ref().map(|n| n.iter().collect::<Vec<u32>>()).filter(|l| !l.is_empty()) else {
        return (pins, memnodes, strict);
    };
    let mut need = std::collections::BTreeMap::<u32, u64>::new();
    for (i, cpus, mem) in cells {
        let node = list[*i as usize % list.len()];
        *need.entry(node).or_default() += mem.get();
        memnodes.push((*i, node));
        let node_cpus = host.node(node).map(|n| n.cpus.clone()).unwrap_or_default();
        for v in cpus.iter() {
            pins.push((v, node_cpus.clone()));
        }
    }
    if o.mode.unwrap_or(NumaMode::Strict) == NumaMode::Strict {
        for (i, _, mem) in cells {
            let node = list[*i as usize % list.len()];
            if let Some(free) = host.free_on(node) {
                strict.push(StrictCell { cell: *i, node, memory: *mem, free, node_need: Bytes(need[&node]) });
            }
        }
    }
    notes.push(format!(
        "cells → host nodes: {}",
        memnodes.iter().map(|(c, n)| format!("{c}→{n}")).collect::<Vec<_>>().join(", ")
    ));
    (pins, memnodes, strict)
}

/// `<vcpu>` and `<maxMemory>`.
fn size_edits(
    xml: &str,
    dom: Node,
    f: &DomainFacts,
    l: &Layout,
    notes: &mut Vec<String>,
) -> Result<Vec<Edit>, PrepareError> {
    let (current, max, slots, max_memory) = (l.current, l.max, l.slots, l.max_memory);
    let mut edits: Vec<Edit> = Vec::new();
    let vcpu = child(dom, "vcpu").ok_or(PrepareError::Xml("no <vcpu>".into()))?;
    edits.push((vcpu.range(), format!("<vcpu placement='static' current='{current}'>{max}</vcpu>")));
    if max != f.vcpus_max || f.vcpu_placement != "static" {
        notes.push(format!("vCPUs: {current} now, up to {max} by hot-plug"));
    }
    let mm = format!("<maxMemory slots='{slots}' unit='KiB'>{}</maxMemory>", max_memory.kib());
    match child(dom, "maxMemory") {
        Some(n) => edits.push((n.range(), mm)),
        None => {
            let mem = child(dom, "memory").ok_or(PrepareError::Xml("no <memory>".into()))?;
            let at = mem.range().end;
            edits.push((at..at, format!("\n{}{mm}", indent_of(xml, mem))));
        }
    }
    notes.push(format!("memory: up to {max_memory} in {slots} slots"));
    Ok(edits)
}

/// `<cpu>`: topology and NUMA cells, in the existing element or a new one.
fn cpu_edits(xml: &str, dom: Node, l: &Layout) -> Result<Vec<Edit>, PrepareError> {
    let (sockets, cores, threads, cells) = (l.sockets, l.cores, l.threads, &l.cells);
    let vcpu = child(dom, "vcpu").ok_or(PrepareError::Xml("no <vcpu>".into()))?;
    let pad = indent_of(xml, vcpu);
    let mut edits: Vec<Edit> = Vec::new();
    let topo = format!("<topology sockets='{sockets}' dies='1' clusters='1' cores='{cores}' threads='{threads}'/>");
    let mut numa = String::from("<numa>");
    for (i, cpus, mem) in cells {
        let _ = write!(numa, "\n{pad}{pad}{pad}<cell id='{i}' cpus='{cpus}' memory='{}' unit='KiB'/>", mem.kib());
    }
    let _ = write!(numa, "\n{pad}{pad}</numa>");
    match child(dom, "cpu") {
        Some(cpu) if !cpu.children().any(|c| c.is_element()) && xml[cpu.range()].trim_end().ends_with("/>") => {
            let start_tag = &xml[cpu.range()];
            let open = start_tag.trim_end().trim_end_matches("/>").trim_end();
            edits.push((cpu.range(), format!("{open}>\n{pad}{pad}{topo}\n{pad}{pad}{numa}\n{pad}</cpu>")));
        }
        Some(cpu) => {
            match child(cpu, "topology") {
                Some(t) => edits.push((t.range(), topo)),
                None => {
                    let at = after_start_tag(xml, cpu);
                    edits.push((at..at, format!("\n{pad}{pad}{topo}")));
                }
            }
            match child(cpu, "numa") {
                Some(n) => edits.push((n.range(), numa)),
                None => {
                    let at = cpu.range().end - "</cpu>".len();
                    edits.push((at..at, format!("{pad}{numa}\n{pad}")));
                }
            }
        }
        None => {
            let devices = child(dom, "devices").ok_or(PrepareError::Xml("no <devices>".into()))?;
            let at = devices.range().start;
            edits.push((at..at, format!("<cpu>\n{pad}{pad}{topo}\n{pad}{pad}{numa}\n{pad}</cpu>\n{pad}")));
        }
    }
    Ok(edits)
}

/// `<cputune>` vCPU pins and `<numatune>` memnodes.
fn pin_edits(
    xml: &str,
    dom: Node,
    pins: &[(u32, CpuSet)],
    memnodes: &[(u32, u32)],
    mode: NumaMode,
) -> Result<Vec<Edit>, PrepareError> {
    let vcpu = child(dom, "vcpu").ok_or(PrepareError::Xml("no <vcpu>".into()))?;
    let pad = indent_of(xml, vcpu);
    let mode = mode.as_str();
    let mut edits: Vec<Edit> = Vec::new();
    {
        let mut pin_xml = String::new();
        for (v, set) in pins {
            let _ = write!(pin_xml, "\n{pad}{pad}<vcpupin vcpu='{v}' cpuset='{set}'/>");
        }
        match child(dom, "cputune") {
            Some(ct) => {
                // Replace our vcpupins, keep every other child (shares, emulatorpin…).
                for p in ct.children().filter(|c| c.has_tag_name("vcpupin")) {
                    let r = p.range();
                    let line_start = xml[..r.start].rfind('\n').unwrap_or(r.start);
                    edits.push((line_start..r.end, String::new()));
                }
                let at = after_start_tag(xml, ct);
                edits.push((at..at, pin_xml));
            }
            None => {
                let at = vcpu.range().end;
                edits.push((at..at, format!("\n{pad}<cputune>{pin_xml}\n{pad}</cputune>")));
            }
        }
        let mut mn = String::new();
        for (c, n) in memnodes {
            let _ = write!(mn, "\n{pad}{pad}<memnode cellid='{c}' mode='{mode}' nodeset='{n}'/>");
        }
        let nodes: CpuSet = memnodes.iter().map(|(_, n)| *n).collect();
        let numatune = format!("<numatune>\n{pad}{pad}<memory mode='{mode}' nodeset='{nodes}'/>{mn}\n{pad}</numatune>");
        match child(dom, "numatune") {
            Some(nt) => edits.push((nt.range(), numatune)),
            None => {
                let at = vcpu.range().end;
                edits.push((at..at, format!("\n{pad}{numatune}")));
            }
        }
    }

    Ok(edits)
}

/// The guest agent's virtio-serial channel: added when the domain has no way
/// to reach an agent (no vmplug metadata address, no channel, no `<vsock>`),
/// without a path unless `path` is given; an existing channel is changed only
/// to the path asked for.
fn channel_edits(
    xml: &str,
    dom: Node,
    f: &DomainFacts,
    path: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<Vec<Edit>, PrepareError> {
    use vmplug_common::protocol::DEFAULT_SERIAL_NAME;
    let existing = f.channels.get(DEFAULT_SERIAL_NAME);
    match (existing, path) {
        (Some(have), Some(want)) if have.as_deref() == Some(want) => return Ok(vec![]),
        (Some(_), None) => return Ok(vec![]),
        (None, None) if f.agent_hint.is_some() || f.vsock_cid.is_some() => {
            notes.push("agent: reached through vmplug's metadata or <vsock>; no channel added".into());
            return Ok(vec![]);
        }
        _ => {}
    }
    let devices = child(dom, "devices").ok_or(PrepareError::Xml("no <devices>".into()))?;
    let step = indent_of(xml, devices);
    let indent = format!("{step}{step}");
    let channel = crate::xml::AgentChannel { path };
    notes.push(match path {
        Some(p) => format!("agent: virtio-serial channel '{DEFAULT_SERIAL_NAME}' on {p}"),
        None => format!("agent: virtio-serial channel '{DEFAULT_SERIAL_NAME}'; libvirt chooses its socket when the domain starts (the live XML shows it)"),
    });
    // The existing channel (one with another path), replaced in place.
    let old = devices.children().find(|d| {
        d.has_tag_name("channel") && child(*d, "target").and_then(|t| t.attribute("name")) == Some(DEFAULT_SERIAL_NAME)
    });
    if let Some(old) = old {
        let indent = indent_of(xml, old);
        return Ok(vec![(old.range(), channel.to_xml(&indent, &step))]);
    }
    let r = devices.range();
    if xml[r.clone()].trim_end().ends_with("/>") {
        let dev = channel.to_xml(&indent, &step);
        return Ok(vec![(r, format!("<devices>\n{indent}{dev}\n{step}</devices>"))]);
    }
    let close = r.end - "</devices>".len();
    let line = xml[..close].rfind('\n').map_or(close, |i| i + 1);
    let dev = channel.to_xml(&indent, &step);
    if xml[line..close].trim().is_empty() {
        Ok(vec![(line..line, format!("{indent}{dev}\n"))])
    } else {
        Ok(vec![(close..close, format!("\n{indent}{dev}\n{step}"))])
    }
}

/// A unified diff of two definitions.
pub fn diff(old: &str, new: &str) -> String {
    similar::TextDiff::from_lines(old, new).unified_diff().context_radius(2).header("current", "prepared").to_string()
}
