//! `vmplug detach-virtio-mem`: removes a virtio-mem device once it holds no
//! memory. QEMU refuses to unplug a device with memory still plugged, and that
//! memory is the guest's until its driver releases it, so a device that holds
//! any is refused (`vmem.plugged`): `resize-memory` it to 0 first (verified
//! with the guest), then detach it.
//!
//! ```text
//! plan:    the device by alias; preflight (vmem.alias, vmem.plugged, the
//!          domain's state) over the domain's virtio-mem devices
//! execute: detach-device from each view, wait until the live XML no longer
//!          lists it
//! judge:   gone from the live XML → ok; still listed → guest timeout
//! ```

use std::time::{Duration, Instant};

use crate::domain::{Affect, DomainError, XmlView};
use crate::facts::{blocking, Facts, HotplugOpts};
use crate::link::GuestAgent;
use crate::preflight::{self, Finding, NotPlanned, Operation};
use crate::report::{affect_text, libvirt_failed, ms, persistent_only, HostOnly, OpReport, Outcome, Run};
use crate::verb::{AffectArgs, AgentArgs, Verb, VerbArgs};
use crate::wait::Wait;
use crate::xml::{virtio_mem_update_xml, DomainFacts, VirtioMem};

/// How often the live XML is read while QEMU removes the device.
const POLL: Duration = Duration::from_millis(100);

/// Remove a virtio-mem device that holds no memory (resize-memory it to 0
/// first); waits until it is gone from the live domain.
#[derive(clap::Args, Debug, Clone)]
pub struct DetachVirtioMemArgs {
    /// Domain name, ID or UUID (as virsh takes them).
    pub domain: String,
    /// The device's alias (`virtiomem0`, as `vmplug status` and the XML name it).
    #[arg(long)]
    pub alias: String,
    #[command(flatten)]
    pub affect: AffectArgs,
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Seconds QEMU may take to remove the device from the live domain.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Do not wait for the device to leave the live domain.
    #[arg(long)]
    pub no_wait: bool,
}

impl VerbArgs for DetachVirtioMemArgs {
    type Verb = DetachVirtioMem;

    crate::domain_field!();

    fn verb(&self) -> Result<DetachVirtioMem, DomainError> {
        Ok(DetachVirtioMem { alias: self.alias.clone() })
    }

    fn opts(&self) -> Result<HotplugOpts, DomainError> {
        Ok(HotplugOpts {
            affect: self.affect.affect()?,
            timeout: Duration::from_secs(self.timeout.clamp(1, 3600)),
            agent_wait: Duration::from_secs(self.agent.agent_timeout.clamp(1, 3600)),
            no_wait: self.no_wait,
            force: false,
            agent: self.agent.agent.clone(),
            zone: vmplug_common::protocol::ZonePolicy::Auto,
        })
    }
}

/// `detach-virtio-mem --alias ALIAS`.
#[derive(Debug, Clone)]
pub struct DetachVirtioMem {
    pub alias: String,
}

/// The device to remove, as the domain lists it, and the findings.
#[derive(Debug, Clone, PartialEq)]
pub struct DetachVmemPlan {
    pub findings: Vec<Finding>,
    pub device: VirtioMem,
}

impl Verb for DetachVirtioMem {
    const NAME: &'static str = "detach-virtio-mem";
    type Plan = DetachVmemPlan;
    type Evidence = DetachVmemEvidence;

    fn plan(&self, facts: &Facts, _: &HotplugOpts) -> Result<DetachVmemPlan, NotPlanned> {
        let devices = facts.loaded.facts.virtio_mems.clone();
        let op = Operation::VirtioMemDetach { alias: self.alias.clone(), devices: devices.clone() };
        // Neither rule is one --force may override: QEMU refuses either way.
        let findings = preflight::gate(preflight::check(&facts.ctx_for(true), &op), false, vec![])?;
        match devices.into_iter().find(|d| d.alias.as_deref() == Some(self.alias.as_str())) {
            Some(device) => Ok(DetachVmemPlan { findings, device }),
            None => Err(NotPlanned::Usage(format!("no virtio-mem device has alias {}", self.alias))),
        }
    }

    fn preview(&self, facts: &Facts, p: DetachVmemPlan) -> (Vec<Finding>, Vec<String>) {
        let step = format!("detach {} ({})", p.device.label(), affect_text(facts.affect));
        (p.findings, vec![step])
    }

    async fn execute<A: GuestAgent>(
        &self,
        facts: &Facts,
        _: Option<&mut A>,
        plan: DetachVmemPlan,
        opts: &HotplugOpts,
        run: &mut Run,
    ) -> Result<DetachVmemEvidence, DomainError> {
        let (affect, label) = (facts.affect, plan.device.label());
        let mut applied = Vec::new();
        let t = Instant::now();
        for (view, a) in views(facts, affect) {
            let (dom, index) = (facts.loaded.dom.clone(), plan.device.index);
            let r = blocking(move || {
                let xml = virtio_mem_update_xml(&dom.xml(view)?, index, vmplug_common::Bytes(0))
                    .map_err(|e| DomainError::Other(format!("virtio-mem device {index}: {e}")))?;
                dom.detach_device(&xml, a)
            })
            .await;
            if let Err(e) = r {
                run.libvirt_ms = ms(t);
                return Ok(DetachVmemEvidence { plan, applied, seen: DetachVmemSeen::Libvirt(e) });
            }
            applied.push(format!("detach {label} ({})", affect_text(a)));
        }
        run.libvirt_ms = ms(t);
        if !affect.live() {
            return Ok(DetachVmemEvidence { plan, applied, seen: DetachVmemSeen::Persistent });
        }
        let t = Instant::now();
        let timeout = if opts.no_wait { Duration::ZERO } else { opts.timeout };
        let removal = Wait::new(format!("QEMU to remove {label}"), timeout).every(POLL);
        let mut waiting = removal.start();
        let after = loop {
            let dom = facts.loaded.dom.clone();
            let after = blocking(move || dom.xml(XmlView::Live)).await.ok().and_then(|x| DomainFacts::parse(&x).ok());
            if after.as_ref().is_some_and(|f| !listed(f, &self.alias)) || waiting.pause().await.is_err() {
                break after;
            }
        };
        run.guest_ms = ms(t);
        Ok(DetachVmemEvidence { plan, applied, seen: DetachVmemSeen::Live { after: after.map(Box::new) } })
    }

    fn judge(&self, facts: &Facts, ev: DetachVmemEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
        let (name, affect, label) = (facts.loaded.facts.name.as_str(), facts.affect, ev.plan.device.label());
        let (findings, applied) = (ev.plan.findings, ev.applied);
        let after = match ev.seen {
            DetachVmemSeen::Libvirt(e) => return libvirt_failed(Self::NAME, name, affect, applied, findings, &e, run),
            DetachVmemSeen::Persistent => {
                let message = format!("{label} removed from the persistent definition (effective at the next start)");
                return persistent_only(Self::NAME, name, affect, message, findings, applied, run);
            }
            DetachVmemSeen::Live { after } => after,
        };
        let (outcome, message) = judge(&label, after.as_deref(), &self.alias, opts);
        let verified = after.as_ref().map(|f| {
            let left: Vec<String> = f.virtio_mems.iter().map(VirtioMem::label).collect();
            format!("virtio-mem devices left: {}", if left.is_empty() { "none".into() } else { left.join(", ") })
        });
        let host = HostOnly { op: Self::NAME, name, affect, findings, applied, persistent: affect.config() };
        let mut report = host.report(outcome, message, run);
        report.host.verified = verified;
        report
    }
}

/// What a detach did: the plan, the steps applied, and how it ended.
#[derive(Debug)]
pub struct DetachVmemEvidence {
    pub plan: DetachVmemPlan,
    pub applied: Vec<String>,
    pub seen: DetachVmemSeen,
}

#[derive(Debug)]
pub enum DetachVmemSeen {
    /// libvirt refused a step.
    Libvirt(DomainError),
    /// Only the persistent definition changed.
    Persistent,
    /// The live XML after the wait for QEMU's removal (unreadable: `None`).
    Live { after: Option<Box<DomainFacts>> },
}

/// The views a change goes to, each with the XML libvirt matches the device in.
fn views(facts: &Facts, affect: Affect) -> Vec<(XmlView, Affect)> {
    match affect {
        Affect::Both if facts.loaded.running => {
            vec![(XmlView::Live, Affect::Live), (XmlView::Inactive, Affect::Config)]
        }
        Affect::Config | Affect::Both => vec![(XmlView::Inactive, Affect::Config)],
        _ => vec![(XmlView::Live, Affect::Live)],
    }
}

fn listed(f: &DomainFacts, alias: &str) -> bool {
    f.virtio_mems.iter().any(|d| d.alias.as_deref() == Some(alias))
}

/// The verdict from the live XML after the wait (pure).
pub fn judge(label: &str, after: Option<&DomainFacts>, alias: &str, opts: &HotplugOpts) -> (Outcome, String) {
    match after {
        Some(f) if !listed(f, alias) => (Outcome::Ok, format!("{label} removed: the live domain no longer lists it")),
        _ if opts.no_wait => (Outcome::Ok, format!("detach of {label} requested; not waiting for QEMU to remove it")),
        None => (Outcome::LibvirtError, format!("detach of {label} requested, but the live XML could not be read")),
        Some(_) => (
            Outcome::GuestTimeout,
            format!(
                "libvirt asked QEMU to remove {label}, but the live domain still lists it after {:?} (the guest has not released the device)",
                opts.timeout
            ),
        ),
    }
}

#[cfg(test)]
/// Two devices: virtiomem0 empty, virtiomem1 holding 256 MiB.
pub(crate) const DOM: &str = "<domain type='kvm'><name>vm</name><maxMemory slots='8' unit='KiB'>8388608</maxMemory>\
    <memory unit='KiB'>3145728</memory><currentMemory unit='KiB'>1048576</currentMemory><vcpu>1</vcpu>\
    <os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type></os><devices>\
    <memory model='virtio-mem'><target><size unit='KiB'>1048576</size><block unit='KiB'>2048</block>\
    <requested unit='KiB'>0</requested><current unit='KiB'>0</current><address base='0x100000000'/></target>\
    <alias name='virtiomem0'/></memory>\
    <memory model='virtio-mem'><target><size unit='KiB'>1048576</size><block unit='KiB'>2048</block>\
    <requested unit='KiB'>262144</requested><current unit='KiB'>262144</current><address base='0x140000000'/></target>\
    <alias name='virtiomem1'/></memory></devices></domain>";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeConnection, FakeDomain};
    use crate::report::Outcome;
    use std::sync::Arc;

    use super::DOM;

    fn opts() -> HotplugOpts {
        HotplugOpts {
            affect: Affect::Live,
            timeout: Duration::from_secs(2),
            agent_wait: Duration::from_secs(1),
            no_wait: false,
            force: false,
            agent: None,
            zone: vmplug_common::protocol::ZonePolicy::Auto,
        }
    }

    fn live(dom: &FakeDomain) -> String {
        crate::domain::Domain::xml(dom, XmlView::Live).expect("live XML")
    }

    async fn run(alias: &str) -> (OpReport, Arc<FakeDomain>) {
        let dom = FakeDomain::new("vm", DOM, None);
        let conn: Arc<dyn crate::domain::Connection> =
            FakeConnection::new(include_str!("../tests/fixtures/caps.xml"), vec![dom.clone()]);
        let verb = DetachVirtioMem { alias: alias.into() };
        let r = crate::verb::run(&verb, conn, "vm", &opts()).await.expect("a report");
        (r, dom)
    }

    #[tokio::test]
    async fn a_device_that_holds_memory_is_refused_with_the_way_to_empty_it() {
        let (r, dom) = run("virtiomem1").await;
        assert_eq!(r.outcome, Outcome::Refused, "{}", r.message);
        let f = r.findings.iter().find(|f| f.id == "vmem.plugged").expect("vmem.plugged");
        assert!(f.message.contains("resize-memory") && f.message.contains("256 MiB"), "{}", f.message);
        assert!(live(&dom).contains("virtiomem1"), "nothing was detached");
    }

    #[tokio::test]
    async fn an_empty_device_is_removed_and_gone_from_the_live_xml() {
        let (r, dom) = run("virtiomem0").await;
        assert_eq!(r.outcome, Outcome::Ok, "{}", r.message);
        assert_eq!(r.operation, "detach-virtio-mem");
        assert!(!live(&dom).contains("virtiomem0"), "{}", live(&dom));
        assert!(live(&dom).contains("virtiomem1"), "the other device stays");
    }

    #[tokio::test]
    async fn an_unknown_alias_is_refused_naming_the_devices() {
        let (r, _) = run("virtiomem7").await;
        assert_eq!(r.outcome, Outcome::Refused, "{}", r.message);
        let f = r.findings.iter().find(|f| f.id == "vmem.alias").expect("vmem.alias");
        assert!(f.message.contains("virtiomem0, virtiomem1"), "{}", f.message);
    }

    #[test]
    fn a_device_still_listed_after_the_wait_is_a_timeout() {
        let f = DomainFacts::parse(DOM).expect("parses");
        assert_eq!(judge("virtiomem0", Some(&f), "virtiomem0", &opts()).0, Outcome::GuestTimeout);
        assert_eq!(judge("virtiomem9", Some(&f), "virtiomem9", &opts()).0, Outcome::Ok);
    }
}
