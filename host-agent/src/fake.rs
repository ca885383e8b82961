//! An in-memory libvirt for unit tests: domains are XML strings that the fake
//! edits as libvirt would (vCPU count, DIMMs with slot and base address), every
//! call is recorded, any verb can be made to fail, and hooks let a test play the
//! guest's side (a simulated kernel seeing the new CPU or DIMM). Tests only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use vmplug_common::{CpuSet, GIB};

use crate::domain::{Affect, Connection, Domain, DomainError, DomainState, NumaParams, SchedParams, XmlView};

/// What the fake hypervisor did, for hooks.
#[derive(Debug, Clone, PartialEq)]
pub enum FakeEvent {
    Vcpus(u32),
    Dimm {
        base: u64,
        size: u64,
        node: u32,
    },
    /// A DIMM left the live domain (the guest ejected it).
    DimmRemoved {
        base: u64,
        size: u64,
    },
    /// A virtio-mem device's region now holds `current` bytes from its start
    /// (the guest's driver plugged or unplugged to it).
    VirtioMem {
        base: u64,
        size: u64,
        current: u64,
        node: u32,
    },
}

pub type Hook = Arc<dyn Fn(&FakeEvent) + Send + Sync>;

#[derive(Default)]
struct State {
    live: String,
    config: String,
    running: bool,
    /// What `state` says while running (a stopped domain is shut off).
    active_state: Option<DomainState>,
    calls: Vec<String>,
    fail: HashMap<&'static str, String>,
    /// verb → (calls still to succeed, message of the failure after them)
    fail_after: HashMap<&'static str, (u32, String)>,
    sched: SchedParams,
    numa: NumaParams,
    dimms: u32,
    next_base: u64,
    /// A virtio-mem device's `current` never drops below this (a guest that
    /// cannot release its memory).
    virtio_mem_floor: u64,
    /// libvirt's `<current>` of a virtio-mem device keeps its old value after
    /// a change, as when QEMU's throttled size event has not come yet.
    virtio_mem_current_lags: bool,
}

pub struct FakeDomain {
    name: String,
    state: Mutex<State>,
    hook: Option<Hook>,
    /// How often its XML was read (either view).
    xml_reads: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for FakeDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDomain").field("name", &self.name).finish()
    }
}

fn set_current(xml: &str, n: u32) -> String {
    let Some(start) = xml.find("<vcpu") else { return xml.to_string() };
    let end = start + xml[start..].find('>').unwrap_or(0);
    let tag = &xml[start..end];
    let new_tag = match tag.find("current='") {
        Some(i) => {
            let j = tag[i + 9..].find('\'').map(|j| i + 9 + j).unwrap_or(tag.len());
            format!("{}current='{n}'{}", &tag[..i], &tag[j + 1..])
        }
        None => format!("{tag} current='{n}'"),
    };
    format!("{}{}{}", &xml[..start], new_tag, &xml[end..])
}

fn insert_device(xml: &str, dev: &str) -> String {
    match xml.rfind("</devices>") {
        Some(i) => format!("{}{dev}{}", &xml[..i], &xml[i..]),
        None => xml.to_string(),
    }
}

/// The DIMM a device XML describes, read as libvirt's XML reader reads it.
fn memory_device(xml: &str) -> Result<crate::xml::Dimm, DomainError> {
    let facts = crate::xml::DomainFacts::parse(&format!("<domain><vcpu>1</vcpu><devices>{xml}</devices></domain>"))
        .map_err(|e| DomainError::Other(e.to_string()))?;
    facts.dimms.into_iter().next().ok_or_else(|| DomainError::Other("not a memory device".into()))
}

/// `xml` without the `<memory>` device whose alias is `alias` (None: no such device).
fn remove_device(xml: &str, alias: &str) -> Option<String> {
    let at = xml.find(&format!("<alias name='{alias}'/>"))?;
    let start = xml[..at].rfind("<memory ")?;
    let end = at + xml[at..].find("</memory>")? + "</memory>".len();
    Some(format!("{}{}", &xml[..start], &xml[end..]))
}

/// The virtio-mem device a device XML describes.
fn virtio_mem_device(xml: &str) -> Result<crate::xml::VirtioMem, DomainError> {
    let facts = crate::xml::DomainFacts::parse(&format!("<domain><vcpu>1</vcpu><devices>{xml}</devices></domain>"))
        .map_err(|e| DomainError::Other(e.to_string()))?;
    facts.virtio_mems.into_iter().next().ok_or_else(|| DomainError::Other("not a virtio-mem device".into()))
}

/// `xml` with the virtio-mem device `alias` asked for `requested` (and, in the
/// live XML, holding `current`), as libvirt and QEMU's size-change event leave it.
fn set_virtio_mem(xml: &str, alias: &str, requested: u64, current: Option<u64>) -> String {
    let Some(at) = xml.find(&format!("<alias name='{alias}'/>")) else { return xml.to_string() };
    let Some(start) = xml[..at].rfind("<memory ") else { return xml.to_string() };
    let end = at + xml[at..].find("</memory>").unwrap_or(0);
    let mut dev = xml[start..end].to_string();
    for (tag, value) in [("requested", Some(requested)), ("current", current)] {
        let Some(v) = value else { continue };
        if let (Some(a), Some(b)) = (dev.find(&format!("<{tag} ")), dev.find(&format!("</{tag}>"))) {
            dev = format!("{}<{tag} unit='KiB'>{}{}", &dev[..a], v / 1024, &dev[b..]);
        }
    }
    format!("{}{dev}{}", &xml[..start], &xml[end..])
}

/// The first element of namespace `ns` in `xml`'s `<metadata>` (its byte
/// range), and where a new element goes (None: there is no `<metadata>`).
fn metadata_slot(xml: &str, ns: &str) -> (Option<std::ops::Range<usize>>, Option<usize>) {
    let Ok(doc) = roxmltree::Document::parse(xml) else { return (None, None) };
    let Some(md) = doc.root_element().children().find(|n| n.has_tag_name("metadata")) else { return (None, None) };
    let found = md.children().find(|c| c.is_element() && c.tag_name().namespace() == Some(ns)).map(|c| c.range());
    let end = md.range().end;
    let at = xml[..end].ends_with("</metadata>").then(|| end - "</metadata>".len());
    (found, at)
}

/// `xml` with the metadata element of `ns` replaced by `element` (put in `ns`
/// as a default namespace) or removed, as `virDomainSetMetadata` leaves it.
fn set_metadata_in(xml: &str, ns: &str, element: Option<&str>) -> String {
    let new = element
        .map(|e| {
            let e = e.trim();
            let name_end = e.find(|c: char| c.is_whitespace() || c == '>' || c == '/').unwrap_or(e.len());
            format!("{} xmlns='{ns}'{}", &e[..name_end], &e[name_end..])
        })
        .unwrap_or_default();
    match metadata_slot(xml, ns) {
        (Some(r), _) => format!("{}{new}{}", &xml[..r.start], &xml[r.end..]),
        (None, Some(at)) => format!("{}{new}{}", &xml[..at], &xml[at..]),
        (None, None) if new.is_empty() => xml.to_string(),
        (None, None) => match xml.find("</name>") {
            Some(i) => {
                let at = i + "</name>".len();
                format!("{}<metadata>{new}</metadata>{}", &xml[..at], &xml[at..])
            }
            None => xml.to_string(),
        },
    }
}

/// The region base of the live virtio-mem device `alias`.
fn live_base(xml: &str, alias: &str) -> Option<u64> {
    crate::xml::DomainFacts::parse(xml).ok()?.virtio_mems.into_iter().find(|v| v.alias.as_deref() == Some(alias))?.base
}

impl FakeDomain {
    /// A new virtio-mem device: an alias and (live) a region base and `current`.
    fn attach_virtio_mem(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        let d = virtio_mem_device(xml)?;
        let mut st = self.st();
        let (n, base) = (st.dimms, st.next_base);
        st.dimms += 1;
        st.next_base += d.size.get();
        let dev = |live: bool| {
            let extra = if live {
                format!("<current unit='KiB'>0</current><address base='{base:#x}'/>")
            } else {
                String::new()
            };
            format!(
                "<memory model='virtio-mem'><target><size unit='KiB'>{}</size>{}<block unit='KiB'>{}</block><requested unit='KiB'>0</requested>{extra}</target><alias name='virtiomem{n}'/></memory>",
                d.size.kib(),
                d.node.map(|n| format!("<node>{n}</node>")).unwrap_or_default(),
                d.block.kib()
            )
        };
        if affect.live() {
            st.live = insert_device(&st.live, &dev(true));
        }
        if affect.config() {
            st.config = insert_device(&st.config, &dev(false));
        }
        Ok(())
    }

    /// A running domain with `xml` as both live and persistent definition.
    pub fn new(name: &str, xml: &str, hook: Option<Hook>) -> Arc<FakeDomain> {
        Arc::new(FakeDomain {
            name: name.into(),
            state: Mutex::new(State {
                live: xml.into(),
                config: xml.into(),
                running: true,
                // Past any DIMM a fixture may already have.
                dimms: xml.matches("<memory model=").count() as u32,
                next_base: 64 * GIB,
                sched: SchedParams { scheduler: "posix".into(), cpu_shares: Some(1024), ..Default::default() },
                ..Default::default()
            }),
            hook,
            xml_reads: Default::default(),
        })
    }

    /// How often its XML was read.
    pub fn xml_reads(&self) -> u32 {
        self.xml_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces the live XML, as a change libvirt made outside vmplug would.
    pub fn set_live_xml(&self, xml: &str) {
        self.st().live = xml.into();
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next call of `verb` fails with `message`.
    pub fn fail(&self, verb: &'static str, message: &str) {
        self.st().fail.insert(verb, message.into());
    }

    /// `verb` succeeds `ok` more times, then fails once with `message`.
    pub fn fail_after(&self, verb: &'static str, ok: u32, message: &str) {
        self.st().fail_after.insert(verb, (ok, message.into()));
    }

    /// The simulated guest cannot shrink a virtio-mem device below `bytes`.
    pub fn hold_virtio_mem(&self, bytes: u64) {
        self.st().virtio_mem_floor = bytes;
    }

    /// libvirt's `<current>` stays behind what the simulated driver plugged
    /// (QEMU's size event not sent yet) until [`Self::catch_up_virtio_mem`].
    pub fn lag_virtio_mem_current(&self, lags: bool) {
        self.st().virtio_mem_current_lags = lags;
    }

    /// QEMU's size event arrives: each virtio-mem device's `<current>` in the
    /// live XML becomes what it holds (its `<requested>`, above any floor).
    pub fn catch_up_virtio_mem(&self) {
        let mut st = self.st();
        let Ok(f) = crate::xml::DomainFacts::parse(&st.live) else { return };
        for v in f.virtio_mems {
            if let Some(alias) = &v.alias {
                let held = v.requested.get().max(st.virtio_mem_floor.min(v.plugged().get()));
                st.live = set_virtio_mem(&st.live, alias, v.requested.get(), Some(held));
            }
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.st().calls.clone()
    }

    pub fn set_running(&self, running: bool) {
        let mut st = self.st();
        st.running = running;
        st.active_state = None;
    }

    /// Puts the domain in `state` (paused, shutting down, …; shut off stops it).
    pub fn set_state(&self, state: DomainState) {
        let mut st = self.st();
        st.running = state != DomainState::ShutOff;
        st.active_state = Some(state);
    }

    fn enter(&self, verb: &'static str, detail: String) -> Result<(), DomainError> {
        let mut st = self.st();
        st.calls.push(format!("{verb} {detail}").trim().to_string());
        if let Some((left, _)) = st.fail_after.get_mut(verb) {
            if *left == 0 {
                let (_, message) = st.fail_after.remove(verb).unwrap_or_default();
                return Err(DomainError::Libvirt { domain: self.name.clone(), op: verb, message });
            }
            *left -= 1;
        }
        match st.fail.remove(verb) {
            Some(message) => Err(DomainError::Libvirt { domain: self.name.clone(), op: verb, message }),
            None => Ok(()),
        }
    }

    fn fire(&self, ev: FakeEvent) {
        if let Some(h) = &self.hook {
            h(&ev);
        }
    }
}

impl Domain for FakeDomain {
    fn name(&self) -> &str {
        &self.name
    }
    fn is_active(&self) -> Result<bool, DomainError> {
        Ok(self.st().running)
    }
    fn state(&self) -> Result<DomainState, DomainError> {
        let st = self.st();
        Ok(match (st.running, st.active_state) {
            (false, _) => DomainState::ShutOff,
            (true, Some(s)) => s,
            (true, None) => DomainState::Running,
        })
    }
    fn xml(&self, view: XmlView) -> Result<String, DomainError> {
        self.xml_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let st = self.st();
        Ok(if view == XmlView::Live && st.running { st.live.clone() } else { st.config.clone() })
    }
    fn job_running(&self) -> Result<bool, DomainError> {
        Ok(false)
    }
    fn set_vcpus(&self, count: u32, affect: Affect) -> Result<(), DomainError> {
        self.enter("setvcpus", format!("{count} {affect:?}"))?;
        {
            let mut st = self.st();
            if affect.live() {
                st.live = set_current(&st.live, count);
            }
            if affect.config() {
                st.config = set_current(&st.config, count);
            }
        }
        if affect.live() {
            self.fire(FakeEvent::Vcpus(count));
        }
        Ok(())
    }
    fn attach_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        self.enter("attach-device", format!("{affect:?}"))?;
        if xml.contains("model='virtio-mem'") {
            return self.attach_virtio_mem(xml, affect);
        }
        let d = memory_device(xml)?;
        let (size, node, user_alias) = (d.size.get(), d.node.unwrap_or(0), d.alias.clone());
        let base = {
            let mut st = self.st();
            let (slot, base) = (st.dimms, st.next_base);
            st.dimms += 1;
            st.next_base += size;
            let alias = user_alias.unwrap_or_else(|| format!("dimm{slot}"));
            let dev = crate::xml::MemoryDevice {
                alias: Some(&alias),
                address: Some((slot, base)),
                ..crate::xml::MemoryDevice::dimm(vmplug_common::Bytes(size), node)
            }
            .to_xml();
            if affect.live() {
                st.live = insert_device(&st.live, &dev);
            }
            if affect.config() {
                st.config = insert_device(&st.config, &dev);
            }
            base
        };
        if affect.live() {
            self.fire(FakeEvent::Dimm { base, size, node });
        }
        Ok(())
    }
    fn detach_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        self.enter("detach-device", format!("{affect:?}"))?;
        let d = if xml.contains("model='virtio-mem'") {
            // A virtio-mem device leaves no DIMM-removal event behind.
            let v = virtio_mem_device(xml)?;
            let model = "virtio-mem".to_string();
            crate::xml::Dimm { size: v.size, node: v.node, slot: None, base: None, alias: v.alias, model }
        } else {
            memory_device(xml)?
        };
        let alias = d.alias.clone().ok_or_else(|| DomainError::Other("the fake matches DIMMs by alias".into()))?;
        let removed = {
            let mut st = self.st();
            let live = remove_device(&st.live, &alias);
            let config = remove_device(&st.config, &alias);
            match (affect.live(), live, affect.config(), config) {
                (true, None, ..) | (_, _, true, None) => {
                    return Err(DomainError::Libvirt {
                        domain: self.name.clone(),
                        op: "detach-device",
                        message: format!("device not found: memory device {alias}"),
                    })
                }
                (l, live, c, config) => {
                    if let (true, Some(x)) = (l, live) {
                        st.live = x;
                    }
                    if let (true, Some(x)) = (c, config) {
                        st.config = x;
                    }
                }
            }
            affect.live()
        };
        if let (true, Some(base)) = (removed, d.base) {
            self.fire(FakeEvent::DimmRemoved { base, size: d.size.get() });
        }
        Ok(())
    }
    fn update_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        self.enter("update-device", format!("{affect:?}"))?;
        let dev = virtio_mem_device(xml)?;
        let alias =
            dev.alias.ok_or_else(|| DomainError::Other("the fake matches virtio-mem devices by alias".into()))?;
        let mut st = self.st();
        let floor = st.virtio_mem_floor;
        let found = |x: &str| x.contains(&format!("<alias name='{alias}'/>"));
        if affect.live() && !found(&st.live) {
            return Err(DomainError::Libvirt {
                domain: self.name.clone(),
                op: "update-device",
                message: format!("device not found: virtio-mem {alias}"),
            });
        }
        let req = dev.requested.get();
        if affect.live() {
            let cur_before = crate::xml::DomainFacts::parse(&st.live)
                .ok()
                .and_then(|f| f.virtio_mems.into_iter().find(|v| v.alias.as_deref() == Some(alias.as_str())))
                .and_then(|v| v.current)
                .map_or(0, |b| b.get());
            // Growth always completes; a shrink stops at the floor.
            let current = if req >= cur_before { req } else { req.max(floor.min(cur_before)) };
            let shown = if st.virtio_mem_current_lags { cur_before } else { current };
            st.live = set_virtio_mem(&st.live, &alias, req, Some(shown));
            if let Some(base) = live_base(&st.live, &alias) {
                let ev = FakeEvent::VirtioMem { base, size: dev.size.get(), current, node: dev.node.unwrap_or(0) };
                drop(st);
                self.fire(ev);
                st = self.st();
            }
        }
        if affect.config() {
            st.config = set_virtio_mem(&st.config, &alias, req, None);
        }
        Ok(())
    }

    fn scheduler(&self, _affect: Affect) -> Result<SchedParams, DomainError> {
        Ok(self.st().sched.clone())
    }
    fn set_scheduler(&self, p: &SchedParams, affect: Affect) -> Result<(), DomainError> {
        self.enter("schedinfo", format!("{:?} {affect:?}", p.cpu_shares))?;
        let mut st = self.st();
        if let Some(s) = p.cpu_shares {
            st.sched.cpu_shares = Some(s);
        }
        Ok(())
    }
    fn pin_emulator(&self, cpus: &CpuSet, host_cpus: u32, affect: Affect) -> Result<(), DomainError> {
        cpus.to_cpumap(host_cpus).map_err(|e| DomainError::Usage(e.to_string()))?;
        self.enter("emulatorpin", format!("{cpus} {affect:?}"))
    }
    fn pin_vcpu(&self, vcpu: u32, cpus: &CpuSet, host_cpus: u32, affect: Affect) -> Result<(), DomainError> {
        cpus.to_cpumap(host_cpus).map_err(|e| DomainError::Usage(e.to_string()))?;
        self.enter("vcpupin", format!("{vcpu} {cpus} {affect:?}"))
    }
    fn numa(&self, _affect: Affect) -> Result<NumaParams, DomainError> {
        Ok(self.st().numa.clone())
    }
    fn set_numa(&self, p: &NumaParams, affect: Affect) -> Result<(), DomainError> {
        self.enter("numatune", format!("{affect:?}"))?;
        self.st().numa = p.clone();
        Ok(())
    }
    fn metadata(&self, ns: &str, view: XmlView) -> Result<Option<String>, DomainError> {
        let st = self.st();
        let xml = match view {
            XmlView::Live if !st.running => return Err(DomainError::NotRunning(self.name.clone())),
            XmlView::Live => &st.live,
            XmlView::Inactive => &st.config,
        };
        Ok(metadata_slot(xml, ns).0.map(|r| xml[r].to_string()))
    }
    fn set_metadata(&self, ns: &str, key: &str, element: Option<&str>, affect: Affect) -> Result<(), DomainError> {
        self.enter("metadata", format!("{ns} {key} {} {affect:?}", if element.is_some() { "set" } else { "remove" }))?;
        let mut st = self.st();
        let affect = affect.resolve(st.running);
        if affect.live() && !st.running {
            return Err(DomainError::NotRunning(self.name.clone()));
        }
        if affect.live() {
            st.live = set_metadata_in(&st.live, ns, element);
        }
        if affect.config() {
            st.config = set_metadata_in(&st.config, ns, element);
        }
        Ok(())
    }
}

/// The `id='N'` of a running domain's `<domain>` element.
fn xml_domain_id(xml: &str) -> Option<u32> {
    let start = xml.find("<domain")?;
    let tag = &xml[start..start + xml[start..].find('>')?];
    let i = tag.find(" id='")? + 5;
    tag[i..].split('\'').next()?.parse().ok()
}

/// The text of `<uuid>`.
fn xml_uuid(xml: &str) -> Option<&str> {
    let i = xml.find("<uuid>")? + 6;
    Some(xml[i..].split('<').next()?.trim())
}

/// A fake connection holding fake domains.
#[derive(Debug)]
pub struct FakeConnection {
    pub caps: String,
    pub domains: Mutex<HashMap<String, Arc<FakeDomain>>>,
    /// How often a domain was looked up.
    pub lookups: std::sync::atomic::AtomicU32,
}

impl FakeConnection {
    pub fn new(caps: &str, domains: Vec<Arc<FakeDomain>>) -> Arc<FakeConnection> {
        Arc::new(FakeConnection {
            caps: caps.into(),
            domains: Mutex::new(domains.into_iter().map(|d| (d.name.clone(), d)).collect()),
            lookups: Default::default(),
        })
    }
}

impl Connection for FakeConnection {
    fn uri(&self) -> String {
        "fake:///".into()
    }
    fn capabilities(&self) -> Result<String, DomainError> {
        Ok(self.caps.clone())
    }
    fn domain_capabilities(&self, _: &str, _: &str, _: &str) -> Result<String, DomainError> {
        Ok("<domainCapabilities><vcpu max='255'/></domainCapabilities>".into())
    }
    fn cells_free_memory(&self, nodes: u32) -> Result<Vec<u64>, DomainError> {
        Ok(vec![16 * GIB; nodes as usize])
    }
    fn lookup(&self, name: &str) -> Result<Arc<dyn Domain>, DomainError> {
        self.lookups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let doms = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        let hex = |s: &str| s.chars().filter(char::is_ascii_hexdigit).collect::<String>().to_ascii_lowercase();
        doms.get(name)
            .or_else(|| {
                let id = name.parse::<u32>().ok()?;
                doms.values().find(|d| {
                    let st = d.st();
                    st.running && xml_domain_id(&st.live) == Some(id)
                })
            })
            .or_else(|| {
                if !crate::domain::looks_like_uuid(name) {
                    return None;
                }
                doms.values().find(|d| xml_uuid(&d.st().config).is_some_and(|u| hex(u) == hex(name)))
            })
            .cloned()
            .map(|d| d as Arc<dyn Domain>)
            .ok_or_else(|| DomainError::NotFound(name.into()))
    }
    fn define(&self, xml: &str) -> Result<(), DomainError> {
        let f = crate::xml::DomainFacts::parse(xml).map_err(|e| DomainError::Other(e.to_string()))?;
        let doms = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        let d = doms.get(&f.name).ok_or_else(|| DomainError::NotFound(f.name.clone()))?;
        d.enter("define", String::new())?;
        d.st().config = xml.to_string();
        Ok(())
    }

    fn list_domains(&self) -> Result<Vec<String>, DomainError> {
        Ok(self.domains.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect())
    }

    /// As libvirt's bulk listing: handles and states, no lookups; the
    /// fingerprint is the live XML's `<vcpu>` element and memory total, as
    /// the driver's vCPU and balloon stats would change with them.
    fn list_running(&self) -> Result<Vec<crate::domain::Listed>, DomainError> {
        let doms = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for d in doms.values() {
            let st = d.st();
            if !st.running {
                continue;
            }
            let state = st.active_state.unwrap_or(DomainState::Running);
            let id = xml_domain_id(&st.live);
            let fingerprint = {
                use std::hash::{Hash, Hasher};
                let vcpu = st.live.find("<vcpu").and_then(|i| st.live[i..].find("</vcpu>").map(|j| &st.live[i..i + j]));
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (vcpu, st.live.matches("<memory model=").count(), st.dimms).hash(&mut h);
                h.finish().max(1)
            };
            drop(st);
            out.push(crate::domain::Listed { dom: d.clone(), id, state, fingerprint });
        }
        Ok(out)
    }
}

/// A guest agent answering from a script (tests only): the facts of its
/// handshake and, per request kind, a queue of answers; every request is
/// recorded. An empty queue answers as a silent agent would (a timeout).
#[derive(Debug)]
pub struct ScriptedAgent {
    pub info: vmplug_common::protocol::GuestInfo,
    pub online: std::collections::VecDeque<Result<(vmplug_common::protocol::Report, u32), crate::link::LinkError>>,
    pub offline: std::collections::VecDeque<Result<vmplug_common::protocol::Report, crate::link::LinkError>>,
    pub blocks: std::collections::VecDeque<Result<Vec<vmplug_common::protocol::BlockState>, crate::link::LinkError>>,
    pub pressure: std::collections::VecDeque<Result<vmplug_common::protocol::Pressure, crate::link::LinkError>>,
    /// `online cpus=… ranges=…`, `offline …`, `blocks N`, `pressure`, in order.
    pub requests: Vec<String>,
}

impl ScriptedAgent {
    pub fn new(info: vmplug_common::protocol::GuestInfo) -> ScriptedAgent {
        ScriptedAgent {
            info,
            online: Default::default(),
            offline: Default::default(),
            blocks: Default::default(),
            pressure: Default::default(),
            requests: vec![],
        }
    }
}

fn silent<T>(kind: &'static str) -> Result<T, crate::link::LinkError> {
    Err(crate::link::LinkError::Timeout(kind, std::time::Duration::ZERO))
}

impl crate::link::GuestAgent for ScriptedAgent {
    fn facts(&self) -> &vmplug_common::protocol::GuestInfo {
        &self.info
    }
    fn online(
        &mut self,
        req: vmplug_common::protocol::OnlineRequest,
    ) -> impl std::future::Future<Output = Result<(vmplug_common::protocol::Report, u32), crate::link::LinkError>> + Send
    {
        self.requests.push(format!("online cpus={:?} ranges={}", req.cpus, req.memory.len()));
        let answer = self.online.pop_front().unwrap_or_else(|| silent("online"));
        async move { answer }
    }
    fn offline(
        &mut self,
        req: vmplug_common::protocol::OfflineRequest,
    ) -> impl std::future::Future<Output = Result<vmplug_common::protocol::Report, crate::link::LinkError>> + Send {
        self.requests.push(format!("offline cpus={:?} ranges={}", req.cpus, req.memory.len()));
        let answer = self.offline.pop_front().unwrap_or_else(|| silent("offline"));
        async move { answer }
    }
    fn blocks(
        &mut self,
        memory: Vec<vmplug_common::protocol::MemRange>,
    ) -> impl std::future::Future<Output = Result<Vec<vmplug_common::protocol::BlockState>, crate::link::LinkError>> + Send
    {
        self.requests.push(format!("blocks {}", memory.len()));
        let answer = self.blocks.pop_front().unwrap_or_else(|| silent("blocks"));
        async move { answer }
    }
    fn pressure(
        &mut self,
    ) -> impl std::future::Future<Output = Result<vmplug_common::protocol::Pressure, crate::link::LinkError>> + Send
    {
        self.requests.push("pressure".into());
        let answer = self.pressure.pop_front().unwrap_or_else(|| silent("pressure"));
        async move { answer }
    }
}
