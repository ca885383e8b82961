//! Domain and host XML: a DOM query over what libvirt gives us (unknown elements
//! are never touched), and typed writers for the few pieces vmplug writes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use roxmltree::{Document, Node};
use vmplug_common::{Bytes, CpuSet, KIB};

pub use crate::settings::{AgentHint, VMPLUG_NS};

#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("domain XML does not parse")]
    Parse(#[from] roxmltree::Error),
    #[error("<{element}> attribute {attr}='{value}' is invalid")]
    Attr { element: &'static str, attr: &'static str, value: String },
    #[error("domain XML has no <{0}>")]
    Missing(&'static str),
}

fn unit_to_bytes(n: u64, unit: Option<&str>) -> Option<u64> {
    let mult = match unit.unwrap_or("KiB") {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => KIB,
        "MB" => 1000 * 1000,
        "M" | "MiB" => KIB * KIB,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => KIB * KIB * KIB,
        "T" | "TiB" => KIB * KIB * KIB * KIB,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn size_of(node: Node) -> Option<Bytes> {
    let n: u64 = node.text()?.trim().parse().ok()?;
    unit_to_bytes(n, node.attribute("unit")).map(Bytes)
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn path<'a, 'i>(node: Node<'a, 'i>, names: &[&str]) -> Option<Node<'a, 'i>> {
    names.iter().try_fold(node, |n, name| child(n, name))
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub id: u32,
    pub cpus: CpuSet,
    pub memory: Bytes,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dimm {
    pub size: Bytes,
    pub node: Option<u32>,
    pub slot: Option<u32>,
    /// Guest-physical base (live XML only).
    pub base: Option<u64>,
    pub alias: Option<String>,
    pub model: String,
}

impl Dimm {
    /// The guest-physical range the DIMM covers (known from the live XML only).
    pub fn range(&self) -> Option<vmplug_common::protocol::MemRange> {
        Some(vmplug_common::protocol::MemRange { start: self.base?, size: self.size })
    }
}

/// A `<memory model='virtio-mem'>` device: a region of `size` on one guest node
/// that the guest's driver plugs in `block` steps up to `requested`.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct VirtioMem {
    /// Position among the domain's virtio-mem devices, in document order (the
    /// live and persistent XML list them alike).
    pub index: usize,
    pub size: Bytes,
    pub node: Option<u32>,
    pub block: Bytes,
    pub requested: Bytes,
    /// What the device reports plugged (live XML only; QEMU's
    /// `MEMORY_DEVICE_SIZE_CHANGE` event updates it, at most once a second).
    pub current: Option<Bytes>,
    /// Guest-physical base of the region (live XML).
    pub base: Option<u64>,
    pub alias: Option<String>,
}

impl VirtioMem {
    /// The guest-physical region (known from the live XML only).
    pub fn range(&self) -> Option<vmplug_common::protocol::MemRange> {
        Some(vmplug_common::protocol::MemRange { start: self.base?, size: self.size })
    }

    /// What the guest holds: `current` where libvirt reports it, else `requested`.
    pub fn plugged(&self) -> Bytes {
        self.current.unwrap_or(self.requested)
    }

    /// How an operator finds it: its alias, else its position and node.
    pub fn label(&self) -> String {
        match (&self.alias, self.node) {
            (Some(a), _) => a.clone(),
            (None, Some(n)) => format!("virtio-mem #{} (node {n})", self.index),
            (None, None) => format!("virtio-mem #{}", self.index),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

impl Topology {
    /// vCPUs per socket.
    pub fn per_socket(&self) -> u32 {
        (self.cores * self.threads).max(1)
    }
}

/// Everything vmplug reads from one domain XML.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DomainFacts {
    pub name: String,
    pub virt_type: String,
    pub arch: String,
    pub machine: String,
    /// `<devices><emulator>`: the QEMU binary (probed for what the machine can do).
    pub emulator: String,
    pub os_is_windows: bool,
    pub vcpu_placement: String,
    pub vcpus_max: u32,
    pub vcpus_current: u32,
    pub topology: Option<Topology>,
    pub cells: Vec<Cell>,
    pub memory: Bytes,
    pub max_memory: Option<Bytes>,
    pub slots: Option<u32>,
    /// Memory devices in DIMM slots (`dimm`, `nvdimm`); virtio-mem is apart.
    pub dimms: Vec<Dimm>,
    pub virtio_mems: Vec<VirtioMem>,
    pub virtio_nets: u32,
    pub vhost_user_devices: Vec<String>,
    /// virtio-serial channels: target name → host socket path; `None` when the
    /// definition names no path (libvirt then chooses one under its channel
    /// directory when the domain starts, and only the live XML shows it).
    pub channels: BTreeMap<String, Option<String>>,
    pub vsock_cid: Option<u32>,
    pub hugepage_size: Option<Bytes>,
    pub cpu_shares: Option<u64>,
    pub emulatorpin: Option<CpuSet>,
    pub vcpupins: BTreeMap<u32, CpuSet>,
    pub numatune_mode: Option<String>,
    pub numatune_nodeset: Option<CpuSet>,
    /// cellid → (mode, nodeset)
    pub memnodes: BTreeMap<u32, (String, CpuSet)>,
    /// The agent's address from vmplug's metadata.
    pub agent_hint: Option<AgentHint>,
    /// Tags from vmplug's metadata (autoscale's `[select] tag`).
    pub tags: Vec<String>,
    /// Why vmplug's metadata could not be read (then no tags and no agent
    /// address came from it).
    pub metadata_error: Option<crate::settings::MetaError>,
    /// The user the domain's process runs as: the DAC `<seclabel>`'s `<label>`
    /// (else `<imagelabel>`), which the live XML of a running domain has.
    pub dac_user: Option<crate::trust::DacUser>,
}

impl DomainFacts {
    pub fn parse(xml: &str) -> Result<DomainFacts, XmlError> {
        let doc = Document::parse(xml)?;
        let dom = doc.root_element();
        let mut f = DomainFacts {
            name: child(dom, "name").and_then(|n| n.text()).unwrap_or_default().to_string(),
            virt_type: dom.attribute("type").unwrap_or_default().to_string(),
            ..Default::default()
        };
        f.read_os(dom);
        f.read_vcpu(dom)?;
        f.read_cpu(dom)?;
        f.read_memory(dom);
        f.read_devices(dom);
        f.read_tuning(dom);
        f.read_metadata(dom);
        f.read_seclabel(dom);
        Ok(f)
    }

    /// `<seclabel model='dac'><label>+64055:+993</label>` (domain level only:
    /// a device's `<seclabel>` is about its file, not the process).
    fn read_seclabel(&mut self, dom: Node) {
        let dac = dom
            .children()
            .filter(|n| n.has_tag_name("seclabel"))
            .find(|n| n.attribute("model") == Some("dac") && n.attribute("type") != Some("none"));
        self.dac_user = dac.and_then(|sl| {
            ["label", "imagelabel"]
                .iter()
                .filter_map(|tag| child(sl, tag).and_then(|l| l.text()))
                .find_map(crate::trust::DacUser::from_label)
        });
    }

    /// `<os><type arch machine>`, and whether the guest is Windows.
    fn read_os(&mut self, dom: Node) {
        let f = self;
        if let Some(t) = path(dom, &["os", "type"]) {
            f.arch = t.attribute("arch").unwrap_or_default().to_string();
            f.machine = t.attribute("machine").unwrap_or_default().to_string();
        }
        f.os_is_windows = dom.descendants().any(|n| {
            n.tag_name().name() == "os" && n.attribute("id").is_some_and(|id| id.contains("microsoft.com/win"))
        }) || path(dom, &["features", "hyperv"]).is_some();
    }

    /// `<vcpu placement current>N</vcpu>`.
    fn read_vcpu(&mut self, dom: Node) -> Result<(), XmlError> {
        let f = self;
        let vcpu = child(dom, "vcpu").ok_or(XmlError::Missing("vcpu"))?;
        f.vcpu_placement = vcpu.attribute("placement").unwrap_or("static").to_string();
        f.vcpus_max = vcpu.text().and_then(|t| t.trim().parse().ok()).ok_or(XmlError::Attr {
            element: "vcpu",
            attr: "text",
            value: vcpu.text().unwrap_or_default().to_string(),
        })?;
        f.vcpus_current = match vcpu.attribute("current") {
            Some(c) => {
                c.parse().map_err(|_| XmlError::Attr { element: "vcpu", attr: "current", value: c.to_string() })?
            }
            None => f.vcpus_max,
        };
        Ok(())
    }

    /// `<cpu>`: topology and guest NUMA cells.
    fn read_cpu(&mut self, dom: Node) -> Result<(), XmlError> {
        let f = self;
        if let Some(cpu) = child(dom, "cpu") {
            if let Some(t) = child(cpu, "topology") {
                let get = |a| t.attribute(a).and_then(|v| v.parse().ok()).unwrap_or(1);
                f.topology = Some(Topology { sockets: get("sockets"), cores: get("cores"), threads: get("threads") });
            }
            if let Some(numa) = child(cpu, "numa") {
                for c in numa.children().filter(|c| c.has_tag_name("cell")) {
                    let id = c.attribute("id").and_then(|v| v.parse().ok()).unwrap_or(f.cells.len() as u32);
                    let cpus = c.attribute("cpus").unwrap_or("").parse().map_err(|_| XmlError::Attr {
                        element: "cell",
                        attr: "cpus",
                        value: c.attribute("cpus").unwrap_or_default().to_string(),
                    })?;
                    let memory = c
                        .attribute("memory")
                        .and_then(|m| m.parse().ok())
                        .and_then(|m| unit_to_bytes(m, c.attribute("unit")))
                        .map(Bytes)
                        .unwrap_or_default();
                    f.cells.push(Cell { id, cpus, memory });
                }
            }
        }
        Ok(())
    }

    /// `<memory>`, `<maxMemory slots>`, hugepage backing.
    fn read_memory(&mut self, dom: Node) {
        let f = self;
        f.memory = child(dom, "memory").and_then(size_of).unwrap_or_default();
        if let Some(mm) = child(dom, "maxMemory") {
            f.max_memory = size_of(mm);
            f.slots = mm.attribute("slots").and_then(|s| s.parse().ok());
        }
        if let Some(mb) = child(dom, "memoryBacking") {
            if let Some(hp) = child(mb, "hugepages") {
                f.hugepage_size = child(hp, "page")
                    .and_then(|p| p.attribute("size")?.parse().ok().and_then(|n| unit_to_bytes(n, p.attribute("unit"))))
                    .map(Bytes)
                    .or(Some(Bytes(2 * KIB * KIB)));
            }
        }
    }

    /// `<devices>`: DIMMs, NICs, channels, vsock, vhost-user devices (also
    /// those passed on the QEMU command line).
    fn read_devices(&mut self, dom: Node) {
        let f = self;
        if let Some(devices) = child(dom, "devices") {
            for d in devices.children().filter(|n| n.is_element()) {
                match d.tag_name().name() {
                    "emulator" => f.emulator = d.text().unwrap_or_default().trim().to_string(),
                    "memory" if d.attribute("model") == Some("virtio-mem") => {
                        let size = |p: &[&str]| path(d, p).and_then(size_of);
                        f.virtio_mems.push(VirtioMem {
                            index: f.virtio_mems.len(),
                            size: size(&["target", "size"]).unwrap_or_default(),
                            node: path(d, &["target", "node"]).and_then(|n| n.text()?.trim().parse().ok()),
                            block: size(&["target", "block"]).unwrap_or_default(),
                            requested: size(&["target", "requested"]).unwrap_or_default(),
                            current: size(&["target", "current"]),
                            base: path(d, &["target", "address"]).and_then(|a| parse_num(a.attribute("base")?)),
                            alias: child(d, "alias").and_then(|a| a.attribute("name")).map(str::to_string),
                        })
                    }
                    "memory" => f.dimms.push(Dimm {
                        model: d.attribute("model").unwrap_or_default().to_string(),
                        size: path(d, &["target", "size"]).and_then(size_of).unwrap_or_default(),
                        node: path(d, &["target", "node"]).and_then(|n| n.text()?.trim().parse().ok()),
                        slot: child(d, "address").and_then(|a| a.attribute("slot")?.parse().ok()),
                        base: child(d, "address").and_then(|a| parse_num(a.attribute("base")?)),
                        alias: child(d, "alias").and_then(|a| a.attribute("name")).map(str::to_string),
                    }),
                    "interface" => {
                        let kind = d.attribute("type").unwrap_or_default();
                        if kind == "vhostuser" {
                            f.vhost_user_devices.push("interface type='vhostuser'".into());
                        }
                        if child(d, "model").and_then(|m| m.attribute("type")) == Some("virtio") {
                            f.virtio_nets += 1;
                        }
                    }
                    "channel" => {
                        if let Some(t) = child(d, "target").filter(|t| t.attribute("type") == Some("virtio")) {
                            if let Some(name) = t.attribute("name") {
                                let p = child(d, "source").and_then(|s| s.attribute("path")).filter(|p| !p.is_empty());
                                f.channels.insert(name.to_string(), p.map(str::to_string));
                            }
                        }
                    }
                    "vsock" => {
                        f.vsock_cid = child(d, "cid").and_then(|c| c.attribute("address")?.parse().ok());
                    }
                    other => {
                        if child(d, "driver").and_then(|dr| dr.attribute("type")) == Some("vhostuser")
                            || d.attribute("type") == Some("vhostuser")
                        {
                            f.vhost_user_devices.push(format!("{other} type='vhostuser'"));
                        }
                    }
                }
            }
        }
        // vhost-user devices passed through on the QEMU command line count too.
        for arg in dom.descendants().filter(|n| n.tag_name().name() == "arg") {
            if let Some(v) = arg.attribute("value") {
                if let Some(dev) = v.split(',').next().filter(|d| d.starts_with("vhost-user-")) {
                    f.vhost_user_devices.push(format!("qemu:commandline {dev}"));
                }
            }
        }
    }

    /// `<cputune>` and `<numatune>`.
    fn read_tuning(&mut self, dom: Node) {
        let f = self;
        if let Some(ct) = child(dom, "cputune") {
            f.cpu_shares = child(ct, "shares").and_then(|s| s.text()?.trim().parse().ok());
            f.emulatorpin = child(ct, "emulatorpin").and_then(|e| e.attribute("cpuset")?.parse().ok());
            for p in ct.children().filter(|c| c.has_tag_name("vcpupin")) {
                if let (Some(v), Some(set)) = (
                    p.attribute("vcpu").and_then(|v| v.parse().ok()),
                    p.attribute("cpuset").and_then(|s| s.parse().ok()),
                ) {
                    f.vcpupins.insert(v, set);
                }
            }
        }
        if let Some(nt) = child(dom, "numatune") {
            if let Some(m) = child(nt, "memory") {
                f.numatune_mode = Some(m.attribute("mode").unwrap_or("strict").to_string());
                f.numatune_nodeset = m.attribute("nodeset").and_then(|s| s.parse().ok());
            }
            for mn in nt.children().filter(|c| c.has_tag_name("memnode")) {
                if let (Some(id), Some(set)) = (
                    mn.attribute("cellid").and_then(|v| v.parse().ok()),
                    mn.attribute("nodeset").and_then(|s| s.parse().ok()),
                ) {
                    f.memnodes.insert(id, (mn.attribute("mode").unwrap_or("strict").to_string(), set));
                }
            }
        }
    }

    /// vmplug's `<metadata>`: tags and the agent's address (see [`crate::settings`]).
    fn read_metadata(&mut self, dom: Node) {
        let Some(md) = child(dom, "metadata") else { return };
        match crate::settings::Settings::from_metadata(md) {
            Ok(s) => {
                self.tags = s.tags.iter().map(|t| t.as_str().to_string()).collect();
                self.agent_hint = s.agent;
            }
            Err(e) => self.metadata_error = Some(e),
        }
    }

    /// Memory in DIMMs.
    pub fn dimm_memory(&self) -> Bytes {
        Bytes(self.dimms.iter().map(|d| d.size.get()).sum())
    }

    /// Memory the domain booted with: `<memory>` counts every memory device's
    /// whole size (a virtio-mem region too, plugged or not).
    pub fn boot_memory(&self) -> Bytes {
        let devices = self.dimm_memory().get() + self.virtio_mems.iter().map(|v| v.size.get()).sum::<u64>();
        Bytes(self.memory.get().saturating_sub(devices))
    }

    /// Memory the guest has: boot memory, DIMMs, and what virtio-mem plugged.
    pub fn guest_memory(&self) -> Bytes {
        let plugged: u64 = self.virtio_mems.iter().map(|v| v.plugged().get()).sum();
        Bytes(self.boot_memory().get() + self.dimm_memory().get() + plugged)
    }

    /// The cell holding `vcpu`.
    pub fn cell_of_vcpu(&self, vcpu: u32) -> Option<&Cell> {
        self.cells.iter().find(|c| c.cpus.contains(vcpu))
    }

    /// Memory slots a DIMM may still use: `min(slots, 64 - virtio-net devices)`
    /// minus DIMMs present (the guide reserves slots for the NICs).
    pub fn free_slots(&self) -> u32 {
        let usable = self.slots.unwrap_or(0).min(64u32.saturating_sub(self.virtio_nets));
        usable.saturating_sub(self.dimms.len() as u32)
    }

    /// Memory vmplug may still add under `<maxMemory>`.
    pub fn memory_headroom(&self) -> Bytes {
        Bytes(self.max_memory.map(|m| m.get().saturating_sub(self.memory.get())).unwrap_or(0))
    }
}

/// One host NUMA node from the capabilities XML.
#[derive(Debug, Clone, PartialEq)]
pub struct HostNode {
    pub id: u32,
    pub memory: Bytes,
    pub cpus: CpuSet,
    /// sibling id → distance
    pub distances: BTreeMap<u32, u32>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostFacts {
    pub arch: String,
    pub nodes: Vec<HostNode>,
    /// Highest host CPU id + 1 (the cpumap length).
    pub cpus: u32,
    /// Free memory per node, bytes (same order as `nodes`), when known.
    pub free: Vec<Bytes>,
    /// The hypervisor's vCPU maximum for this domain's machine (domain capabilities).
    pub max_vcpus: Option<u32>,
    /// cgroup version of the host, when the host is this machine.
    pub cgroup_v2: Option<bool>,
    /// Machine types libvirt offers for the domain's architecture (capabilities).
    pub machines: Vec<String>,
    /// Whether the domain's machine type can hot-plug vCPUs, as its QEMU says
    /// (`query-machines` → `hotpluggable-cpus`); `None` when not asked (x86, or
    /// a remote host whose emulator vmplug cannot run).
    pub cpu_hotplug: Option<bool>,
}

impl HostFacts {
    pub fn parse_capabilities(xml: &str) -> Result<HostFacts, XmlError> {
        let doc = Document::parse(xml)?;
        let host = child(doc.root_element(), "host").ok_or(XmlError::Missing("host"))?;
        let mut f = HostFacts {
            arch: path(host, &["cpu", "arch"]).and_then(|a| a.text()).unwrap_or_default().to_string(),
            ..Default::default()
        };
        if let Some(cells) = path(host, &["topology", "cells"]) {
            for c in cells.children().filter(|c| c.has_tag_name("cell")) {
                let id = c.attribute("id").and_then(|v| v.parse().ok()).unwrap_or(0);
                let memory = child(c, "memory").and_then(size_of).unwrap_or_default();
                let cpus: CpuSet = child(c, "cpus")
                    .map(|cs| {
                        cs.children()
                            .filter(|n| n.has_tag_name("cpu"))
                            .filter_map(|n| n.attribute("id")?.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                let distances = child(c, "distances")
                    .map(|d| {
                        d.children()
                            .filter(|n| n.has_tag_name("sibling"))
                            .filter_map(|n| {
                                Some((n.attribute("id")?.parse().ok()?, n.attribute("value")?.parse().ok()?))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                f.cpus = f.cpus.max(cpus.max().map(|m| m + 1).unwrap_or(0));
                f.nodes.push(HostNode { id, memory, cpus, distances });
            }
        }
        Ok(f)
    }

    /// The machine types (names and aliases) libvirt's capabilities offer for
    /// guests of `arch`.
    pub fn parse_machines(xml: &str, arch: &str) -> Vec<String> {
        let Ok(doc) = Document::parse(xml) else { return Vec::new() };
        let mut out: Vec<String> = doc
            .root_element()
            .children()
            .filter(|g| g.has_tag_name("guest"))
            .filter_map(|g| child(g, "arch").filter(|a| a.attribute("name") == Some(arch)))
            .flat_map(|a| a.descendants().filter(|n| n.has_tag_name("machine")))
            .filter_map(|m| m.text().map(|t| t.trim().to_string()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The newest versioned machine type of `family` (`virt`, `pc-q35`) that
    /// libvirt offers: `virt-10.0` rather than the unversioned alias.
    pub fn newest_versioned(&self, family: &str) -> Option<&str> {
        newest_versioned(&self.machines, family)
    }

    /// `<vcpu max='N'/>` of the domain capabilities XML.
    pub fn parse_domcaps_max_vcpus(xml: &str) -> Option<u32> {
        let doc = Document::parse(xml).ok()?;
        child(doc.root_element(), "vcpu")?.attribute("max")?.parse().ok()
    }

    pub fn all_cpus(&self) -> CpuSet {
        CpuSet::first_n(self.cpus)
    }

    pub fn node(&self, id: u32) -> Option<&HostNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn free_on(&self, id: u32) -> Option<Bytes> {
        let idx = self.nodes.iter().position(|n| n.id == id)?;
        self.free.get(idx).copied()
    }
}

/// The newest versioned machine type of `family` among `machines`.
pub fn newest_versioned<'a>(machines: &'a [String], family: &str) -> Option<&'a str> {
    machines.iter().filter_map(|m| Some((machine_version(m, family)?, m.as_str()))).max().map(|(_, m)| m)
}

/// `virt-4.1` → Some((4, 1)); the bare alias `virt` → None.
pub fn machine_version(machine: &str, family: &str) -> Option<(u32, u32)> {
    let rest = machine.strip_prefix(family)?.strip_prefix('-')?;
    let (major, minor) = rest.split_once('.').unwrap_or((rest, "0"));
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// From QEMU's `query-machines` answer (the QMP `return` array): whether
/// `machine` (a name or an alias) can hot-plug CPUs. None if it is not listed.
pub fn machine_hotplugs_cpus(query_machines: &serde_json::Value, machine: &str) -> Option<bool> {
    query_machines
        .as_array()?
        .iter()
        .find(|m| m["name"] == machine || m["alias"] == machine)?
        .get("hotpluggable-cpus")?
        .as_bool()
}

/// Minimal XML escaping for attribute and text values we write.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// A `<memory model='dimm'>` device as vmplug attaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DimmSpec {
    pub size: Bytes,
    pub node: u32,
}

/// The user alias of DIMM `n` of `attach-memory` request `id`: `ua-vmplug-ID-N`.
pub fn request_alias(id: &str, n: u32) -> String {
    format!("ua-vmplug-{id}-{n}")
}

/// `n` when `d` is DIMM `n` of request `id` (the inverse of [`request_alias`]).
pub fn request_index(d: &Dimm, id: &str) -> Option<u32> {
    let n = d.alias.as_deref()?.strip_prefix("ua-vmplug-")?.strip_prefix(id)?.strip_prefix('-')?;
    n.bytes().all(|b| b.is_ascii_digit()).then(|| n.parse().ok()).flatten()
}

/// A [`DimmSpec`] with the user alias (`ua-…`) that ties it to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedDimm {
    pub spec: DimmSpec,
    pub alias: String,
}

impl NamedDimm {
    pub fn to_xml(&self) -> String {
        let d = MemoryDevice { alias: Some(&self.alias), ..MemoryDevice::dimm(self.spec.size, self.spec.node) };
        d.to_xml()
    }
}

impl DimmSpec {
    /// The device XML, sized in KiB (libvirt's native unit; always exact here
    /// because sizes are block-aligned).
    pub fn to_xml(&self) -> String {
        MemoryDevice::dimm(self.size, self.node).to_xml()
    }
}

/// A `<memory>` device as vmplug writes it: the one writer for what is attached,
/// what is detached (matched by alias, as libvirt does), and the fake libvirt's
/// live XML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryDevice<'a> {
    pub model: &'a str,
    pub size: Bytes,
    pub node: Option<u32>,
    pub alias: Option<&'a str>,
    /// `(slot, base)`: where QEMU placed it (live XML only).
    pub address: Option<(u32, u64)>,
}

impl<'a> MemoryDevice<'a> {
    /// A new DIMM of `size` on guest node `node`.
    pub fn dimm(size: Bytes, node: u32) -> MemoryDevice<'static> {
        MemoryDevice { model: "dimm", size, node: Some(node), alias: None, address: None }
    }

    /// An existing device, as the live XML describes it.
    pub fn of(d: &'a Dimm) -> MemoryDevice<'a> {
        MemoryDevice {
            model: &d.model,
            size: d.size,
            node: d.node,
            alias: d.alias.as_deref(),
            address: d.slot.zip(d.base),
        }
    }

    pub fn to_xml(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "<memory model='{}'>\n  <target>\n    <size unit='KiB'>{}</size>\n",
            esc(self.model),
            self.size.kib()
        );
        if let Some(n) = self.node {
            let _ = writeln!(s, "    <node>{n}</node>");
        }
        s.push_str("  </target>\n");
        if let Some(a) = self.alias {
            let _ = writeln!(s, "  <alias name='{}'/>", esc(a));
        }
        if let Some((slot, base)) = self.address {
            let _ = writeln!(s, "  <address type='dimm' slot='{slot}' base='{base:#x}'/>");
        }
        s.push_str("</memory>\n");
        s
    }
}

/// The `index`-th virtio-mem device of `domain_xml`, verbatim (unknown elements,
/// its alias and PCI address kept, so libvirt matches it), with `<requested>`
/// set to `requested`: the device XML `virsh update-memory-device` sends.
pub fn virtio_mem_update_xml(domain_xml: &str, index: usize, requested: Bytes) -> Result<String, XmlError> {
    let doc = Document::parse(domain_xml)?;
    let dev = child(doc.root_element(), "devices")
        .into_iter()
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("memory") && n.attribute("model") == Some("virtio-mem"))
        .nth(index)
        .ok_or(XmlError::Missing("memory model='virtio-mem'"))?;
    let req = path(dev, &["target", "requested"]).ok_or(XmlError::Missing("requested"))?;
    let (d, r) = (dev.range(), req.range());
    let new = format!("<requested unit='KiB'>{}</requested>", requested.kib());
    Ok(format!("{}{new}{}", &domain_xml[d.start..r.start], &domain_xml[r.end..d.end]))
}

/// A new virtio-mem device: `size` on guest node `node`, plugged in `block` steps,
/// nothing requested yet.
pub fn virtio_mem_xml(size: Bytes, node: Option<u32>, block: Bytes) -> String {
    let node = node.map(|n| format!("<node>{n}</node>")).unwrap_or_default();
    format!(
        "<memory model='virtio-mem'>\n  <target>\n    <size unit='KiB'>{}</size>\n    {node}\n    <block unit='KiB'>{}</block>\n    <requested unit='KiB'>0</requested>\n  </target>\n</memory>\n",
        size.kib(),
        block.kib()
    )
}

/// The XML that detaches an existing DIMM (matched by alias, as libvirt does).
pub fn dimm_detach_xml(d: &Dimm) -> String {
    MemoryDevice::of(d).to_xml()
}

/// The virtio-serial channel the guest agent listens on (`org.vmplug.guest.0`),
/// as `vmplug prepare` adds it. Without a path, libvirt chooses the socket
/// when the domain starts, under its own channel directory (which its
/// AppArmor and SELinux profiles allow), and shows it in the live XML only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentChannel<'a> {
    pub path: Option<&'a str>,
}

impl AgentChannel<'_> {
    /// The device XML: its first line unindented, the next ones `indent`
    /// (where the channel starts) plus `step` per level.
    pub fn to_xml(&self, indent: &str, step: &str) -> String {
        let source = match self.path {
            Some(p) => format!("<source mode='bind' path='{}'/>", esc(p)),
            None => "<source mode='bind'/>".to_string(),
        };
        format!(
            "<channel type='unix'>\n{indent}{step}{source}\n{indent}{step}<target type='virtio' name='{}'/>\n{indent}</channel>",
            vmplug_common::protocol::DEFAULT_SERIAL_NAME
        )
    }
}
