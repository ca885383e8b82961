//! `vmplug add-virtio-mem`: adds a virtio-mem device, a region the guest's
//! memory can later grow into and shrink out of with `resize-memory`. Nothing
//! is plugged yet, so the guest is not asked: its driver is checked when the
//! device first grows.
//!
//! ```text
//! plan:    preflight over the new device (vmem.block, vmem.block-align,
//!          vmem.node, mem.node, mem.max-memory, mem.max-size, the domain's state)
//! execute: attach-device; a live change is read back from the live XML
//! judge:   the live XML lists one device more → ok; else a libvirt error
//! ```

use std::time::{Duration, Instant};

use vmplug_common::protocol::ZonePolicy;
use vmplug_common::Bytes;

use crate::domain::DomainError;
use crate::facts::{blocking, Facts, HotplugOpts};
use crate::link::GuestAgent;
use crate::preflight::{self, Finding, NotPlanned, Operation};
use crate::report::{affect_text, libvirt_failed, ms, persistent_only, HostOnly, OpReport, Outcome, Run};
use crate::verb::{AffectArgs, Verb, VerbArgs};
use crate::xml::{virtio_mem_xml, VirtioMem};

/// Add a virtio-mem device (one per guest node): a region the guest's memory
/// can later grow into and shrink out of with resize-memory.
#[derive(clap::Args, Debug, Clone)]
pub struct AddVirtioMemArgs {
    /// Domain name, ID or UUID (as virsh takes them).
    pub domain: String,
    /// The region's size, with a unit (the most this device can ever plug).
    #[arg(value_parser = vmplug_common::size::parse_size)]
    pub size: Bytes,
    /// Guest NUMA node (required when the guest has NUMA cells).
    #[arg(long)]
    pub node: Option<u32>,
    /// The device's block size: the step it plugs and unplugs in.
    #[arg(long, default_value = "2M", value_parser = vmplug_common::size::parse_size)]
    pub block: Bytes,
    #[command(flatten)]
    pub affect: AffectArgs,
}

impl VerbArgs for AddVirtioMemArgs {
    type Verb = AddVirtioMem;

    crate::domain_field!();

    fn verb(&self) -> Result<AddVirtioMem, DomainError> {
        Ok(AddVirtioMem { size: self.size, node: self.node, block: self.block })
    }

    fn opts(&self) -> Result<HotplugOpts, DomainError> {
        Ok(AddVirtioMem::opts(self.affect.affect()?))
    }
}

/// `add-virtio-mem SIZE [--node N] [--block B]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddVirtioMem {
    pub size: Bytes,
    pub node: Option<u32>,
    pub block: Bytes,
}

impl AddVirtioMem {
    /// The options of an add: nothing to wait for, nothing to force, no agent.
    pub fn opts(affect: crate::domain::Affect) -> HotplugOpts {
        HotplugOpts {
            affect,
            timeout: Duration::ZERO,
            agent_wait: Duration::ZERO,
            no_wait: true,
            force: false,
            agent: None,
            zone: ZonePolicy::Movable,
        }
    }
}

/// The device to add, and the findings.
#[derive(Debug, Clone, PartialEq)]
pub struct AddPlan {
    pub findings: Vec<Finding>,
}

impl Verb for AddVirtioMem {
    const NAME: &'static str = "add-virtio-mem";
    const ASKS_GUEST: bool = false;
    type Plan = AddPlan;
    type Evidence = AddEvidence;

    fn plan(&self, facts: &Facts, _: &HotplugOpts) -> Result<AddPlan, NotPlanned> {
        // The rules of a new device: where it goes, its block size, its room
        // under <maxMemory>, a running domain for a live one. No --force.
        let op = Operation::AddVirtioMem { size: self.size, node: self.node, block: self.block };
        let findings = preflight::gate(preflight::check(&facts.ctx_for(true), &op), false, vec![])?;
        Ok(AddPlan { findings })
    }

    fn preview(&self, facts: &Facts, p: AddPlan) -> (Vec<Finding>, Vec<String>) {
        (p.findings, vec![self.applied(facts.affect)])
    }

    async fn execute<A: GuestAgent>(
        &self,
        facts: &Facts,
        _: Option<&mut A>,
        plan: AddPlan,
        _: &HotplugOpts,
        run: &mut Run,
    ) -> Result<AddEvidence, DomainError> {
        let affect = facts.affect;
        let before = facts.loaded.facts.virtio_mems.len();
        let (xml, dom) = (virtio_mem_xml(self.size, self.node, self.block), facts.loaded.dom.clone());
        let t = Instant::now();
        let attached = blocking(move || dom.attach_device(&xml, affect)).await;
        run.libvirt_ms = ms(t);
        let seen = match attached {
            Err(e) => AddSeen::Libvirt(e),
            Ok(()) if !affect.live() => AddSeen::Persistent,
            Ok(()) => AddSeen::Live { before, after: crate::vmem::live_devices(facts).await? },
        };
        Ok(AddEvidence { plan, seen })
    }

    fn judge(&self, facts: &Facts, ev: AddEvidence, _: &HotplugOpts, run: &Run) -> OpReport {
        let (name, affect, findings) = (facts.loaded.facts.name.as_str(), facts.affect, ev.plan.findings);
        let (before, after) = match ev.seen {
            AddSeen::Libvirt(e) => return libvirt_failed(Self::NAME, name, affect, vec![], findings, &e, run),
            AddSeen::Persistent => {
                let message = format!(
                    "virtio-mem device of {} added to the persistent definition (present at the next start)",
                    self.size
                );
                let applied = vec![self.applied(affect)];
                return persistent_only(Self::NAME, name, affect, message, findings, applied, run);
            }
            AddSeen::Live { before, after } => (before, after),
        };
        let (outcome, message, verified) = judge(name, before, &after);
        let applied = vec![self.applied(affect)];
        let host = HostOnly { op: Self::NAME, name, affect, findings, applied, persistent: affect.config() };
        let mut report = host.report(outcome, message, run);
        report.host.verified = verified;
        report
    }
}

/// What an add did: the plan, and libvirt's refusal, a persistent-only
/// change, or the live devices before (a count) and after it.
#[derive(Debug)]
pub struct AddEvidence {
    pub plan: AddPlan,
    pub seen: AddSeen,
}

#[derive(Debug)]
pub enum AddSeen {
    Libvirt(DomainError),
    Persistent,
    Live { before: usize, after: Vec<VirtioMem> },
}

impl AddVirtioMem {
    /// The step, in words.
    fn applied(&self, affect: crate::domain::Affect) -> String {
        format!(
            "attach virtio-mem {} on node {} (block {}) ({})",
            self.size,
            self.node.map_or("-".into(), |n| n.to_string()),
            self.block,
            affect_text(affect)
        )
    }
}

/// The verdict from the live XML read after the attach (pure): the device
/// the domain lists beyond the `before` it had.
pub fn judge(name: &str, before: usize, after: &[VirtioMem]) -> (Outcome, String, Option<String>) {
    match after.get(before) {
        Some(d) => (
            Outcome::Ok,
            format!(
                "libvirt added {}, nothing plugged yet (the guest's driver is checked when it grows): `vmplug resize-memory {name} +SIZE`",
                d.label()
            ),
            Some(format!(
                "{}: {} on node {} at {:#x}, block {}",
                d.label(),
                d.size,
                d.node.map_or("-".into(), |n| n.to_string()),
                d.base.unwrap_or(0),
                d.block
            )),
        ),
        None => (Outcome::LibvirtError, "libvirt accepted the device but the live XML does not show it".into(), None),
    }
}
