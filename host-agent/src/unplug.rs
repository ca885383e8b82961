//! `vmplug detach-memory`: DIMM hot-unplug in the only order that cannot strand the
//! guest. The guest offlines the DIMMs' blocks first (through the agent, so a block
//! the kernel cannot empty is a refusal with nothing detached), then libvirt
//! detaches the devices, vmplug waits until QEMU has removed them from the live XML,
//! and the agent confirms the blocks are gone. A step that fails puts back what the
//! steps before it did: blocks offlined for a DIMM that stays are onlined again.

use std::time::{Duration, Instant};

use vmplug_common::protocol::{
    BlockState, ForecastRequest, ItemOutcome as BlockOutcome, MemRange, OfflineRequest, OnlineRequest,
};
use vmplug_common::Bytes;

use crate::domain::{DomainError, XmlView};
use crate::facts::{blocking, Facts, HotplugOpts};
use crate::link::{GuestAgent, LinkError};
use crate::plan::{plan_detach_memory, DetachPlan};
use crate::preflight::{Finding, NotPlanned};
use crate::report::{affect_text, libvirt_failed, ms, persistent_only, HostSide, OpReport, Outcome, Run};
use crate::verb::{HotplugArgs, Verb, VerbArgs};
use crate::wait::Wait;
use crate::xml::{dimm_detach_xml, Dimm, DomainFacts};

pub use crate::plan::DimmSelector;

/// How often the live XML is read while QEMU removes a DIMM.
const REMOVAL_POLL: Duration = Duration::from_millis(100);

fn alias(d: &Dimm) -> &str {
    d.alias.as_deref().unwrap_or("?")
}

fn ranges(dimms: &[&Dimm]) -> Vec<MemRange> {
    dimms.iter().filter_map(|d| d.range()).collect()
}

/// Onlines `ranges` again after a failed unplug; says what happened, for the report.
async fn put_back<A: GuestAgent>(link: &mut A, ranges: Vec<MemRange>, opts: &HotplugOpts) -> String {
    if ranges.is_empty() {
        return "no block needed onlining again".into();
    }
    let req = OnlineRequest {
        cpus: None,
        memory: ranges,
        zone: opts.zone,
        timeout_ms: opts.timeout.as_millis() as u64,
        virtio_mem: vec![],
    };
    match link.online(req).await {
        Ok((r, _)) if r.complete => format!("{} block(s) online again", r.blocks.len()),
        Ok((r, _)) => format!("{} block(s) could not be onlined again", r.failures()),
        Err(e) => format!("the blocks could not be onlined again: {e}"),
    }
}

fn first_failure(r: &vmplug_common::protocol::Report) -> String {
    r.blocks
        .iter()
        .find_map(|b| match &b.outcome {
            BlockOutcome::Failed { errno, message } => Some(format!("memory{}: {message} (errno {errno})", b.index)),
            _ => None,
        })
        .unwrap_or_else(|| "no detail".into())
}

/// `vmplug detach-memory`: the steps in the only safe order — the guest
/// offlines the blocks, libvirt detaches, QEMU removes, the guest confirms —
/// each undoing what the ones before it did if it fails.
#[derive(Debug, Clone)]
pub struct DetachMemory {
    pub sel: DimmSelector,
}

/// Hot-unplug DIMMs: the guest offlines their blocks, libvirt detaches them,
/// vmplug waits for QEMU to remove them and the guest to confirm.
#[derive(clap::Args, Debug, Clone)]
pub struct DetachMemoryArgs {
    /// Domain name, ID or UUID (as virsh takes them).
    pub domain: String,
    /// One DIMM by alias (`ua-vmplug-ID-N`, or libvirt's `dimmN`).
    #[arg(long, conflicts_with = "request_id", required_unless_present = "request_id")]
    pub alias: Option<String>,
    /// Every DIMM that `attach-memory --request-id ID` attached.
    #[arg(long)]
    pub request_id: Option<String>,
    #[command(flatten)]
    pub hotplug: HotplugArgs,
}

impl VerbArgs for DetachMemoryArgs {
    type Verb = DetachMemory;

    crate::domain_field!();

    fn verb(&self) -> Result<DetachMemory, DomainError> {
        let sel =
            self.alias.clone().map(DimmSelector::Alias).or_else(|| self.request_id.clone().map(DimmSelector::Request));
        Ok(DetachMemory { sel: sel.ok_or_else(|| DomainError::Usage("give --alias or --request-id".into()))? })
    }

    fn opts(&self) -> Result<HotplugOpts, DomainError> {
        self.hotplug.opts()
    }
}

impl Verb for DetachMemory {
    const NAME: &'static str = "detach-memory";
    type Plan = DetachPlan;

    fn plan(&self, facts: &Facts, opts: &HotplugOpts) -> Result<DetachPlan, NotPlanned> {
        plan_detach_memory(facts, &self.sel, opts)
    }

    fn preview(&self, _: &Facts, p: DetachPlan) -> (Vec<Finding>, Vec<String>) {
        let steps = p.chosen.iter().map(|d| format!("detach dimm {} ({})", alias(d), d.size)).collect();
        (p.findings, steps)
    }

    async fn execute<A: GuestAgent>(
        &self,
        facts: &Facts,
        link: Option<&mut A>,
        plan: DetachPlan,
        opts: &HotplugOpts,
        run: Run,
    ) -> Result<OpReport, DomainError> {
        execute(facts, link, &plan, opts, run).await
    }
}

async fn execute<A: GuestAgent>(
    facts: &Facts,
    mut link: Option<&mut A>,
    plan: &DetachPlan,
    opts: &HotplugOpts,
    run: Run,
) -> Result<OpReport, DomainError> {
    let name = facts.loaded.facts.name.as_str();
    let mut d = Detach { facts, plan, opts, run, applied: vec![], guest: None };
    if let (true, Some(link)) = (plan.offline_first, link.as_deref_mut()) {
        // The guest's own floors first (guest.toml): an unplug is a shrink too.
        let ask = ForecastRequest { dimms: plan.ranges.clone(), virtio_mem: vec![], release: Some(plan.size) };
        if let Some(reason) = crate::link::guest_veto(link, ask).await {
            return Ok(d.vetoed(&reason));
        }
        if let Err(report) = d.offline(link).await {
            return Ok(*report);
        }
    }
    if let Err(report) = d.detach(link.as_deref_mut()).await {
        return Ok(*report);
    }
    if !facts.affect.live() {
        let message = format!("{} removed from the persistent definition (effective at the next start)", plan.size);
        return Ok(persistent_only(OP, name, facts.affect, message, plan.findings.clone(), d.applied, &d.run));
    }
    let (left, after) = d.wait_removed().await;
    let verified = after
        .as_ref()
        .map(|f| format!("{} DIMM(s) left, memory {}, {} slot(s) free", f.dimms.len(), f.memory, f.free_slots()));
    let (outcome, message) = if !left.is_empty() { d.removal_pending(&left) } else { d.confirm_gone(link).await };
    Ok(d.report(outcome, message, verified))
}

const OP: &str = DetachMemory::NAME;

/// One detach in progress: the plan, what was applied, the guest's report.
struct Detach<'a> {
    facts: &'a Facts,
    plan: &'a DetachPlan,
    opts: &'a HotplugOpts,
    run: Run,
    applied: Vec<String>,
    guest: Option<vmplug_common::protocol::Report>,
}

impl Detach<'_> {
    fn name(&self) -> &str {
        &self.facts.loaded.facts.name
    }

    fn report(&self, outcome: Outcome, message: String, verified: Option<String>) -> OpReport {
        OpReport {
            operation: OP.into(),
            domain: self.name().into(),
            affect: self.facts.affect,
            outcome,
            message,
            findings: self.plan.findings.clone(),
            host: HostSide { applied: self.applied.clone(), verified, persistent: self.facts.affect.config() },
            guest: self.guest.clone(),
            virtio_mem: vec![],
            timings: self.run.timings(),
            guest_offlined: true,
        }
    }

    /// The guest refused to give the memory up: a refusal, nothing changed.
    fn vetoed(&self, reason: &str) -> OpReport {
        let message = format!("the guest vetoes the detach: {reason}; nothing was changed");
        let mut r = self.report(Outcome::Refused, message, None);
        r.findings.insert(0, crate::preflight::guest_veto(reason));
        r
    }

    /// Step 1: the guest lets go of the blocks, or nothing is detached.
    async fn offline<A: GuestAgent>(&mut self, link: &mut A) -> Result<(), Box<OpReport>> {
        let t = Instant::now();
        let timeout_ms = self.opts.timeout.as_millis() as u64;
        let res = link.offline(OfflineRequest { cpus: None, memory: self.plan.ranges.clone(), timeout_ms }).await;
        self.run.guest_ms += ms(t);
        let why = match res {
            Ok(r) if r.complete => {
                self.guest = Some(r);
                return Ok(());
            }
            Ok(r) => {
                let why = format!("the guest could not offline {} block(s) ({})", r.failures(), first_failure(&r));
                self.guest = Some(r);
                why
            }
            Err(e) => format!("the guest did not offline the blocks: {e}"),
        };
        let back = put_back(link, self.plan.ranges.clone(), self.opts).await;
        Err(Box::new(self.report(Outcome::GuestFailed, format!("{why}; {back}; nothing was detached"), None)))
    }

    /// Step 2: libvirt detaches; a refusal puts the remaining DIMMs' blocks back online.
    async fn detach<A: GuestAgent>(&mut self, link: Option<&mut A>) -> Result<(), Box<OpReport>> {
        let affect = self.facts.affect;
        let t = Instant::now();
        for (i, d) in self.plan.chosen.iter().enumerate() {
            let (dom, xml) = (self.facts.loaded.dom.clone(), dimm_detach_xml(d));
            if let Err(e) = blocking(move || dom.detach_device(&xml, affect)).await {
                self.run.libvirt_ms = ms(t);
                let findings = self.plan.findings.clone();
                let mut r = libvirt_failed(OP, self.name(), affect, self.applied.clone(), findings, &e, &self.run);
                if let Some(link) = link {
                    let still: Vec<&Dimm> = self.plan.chosen[i..].iter().collect();
                    let back = put_back(link, ranges(&still), self.opts).await;
                    r.message = format!("{}; for the DIMM(s) still attached: {back}", r.message);
                }
                return Err(Box::new(r));
            }
            let node = d.node.unwrap_or(0);
            self.applied.push(format!("detach dimm {} ({}, node {node}) ({})", alias(d), d.size, affect_text(affect)));
        }
        self.run.libvirt_ms = ms(t);
        Ok(())
    }

    /// Step 3: QEMU removes the DIMMs once the guest has ejected them; the live
    /// XML is read until they are gone (or the timeout; at once with `--no-wait`).
    async fn wait_removed(&mut self) -> (Vec<String>, Option<DomainFacts>) {
        let names: Vec<String> = self.plan.chosen.iter().map(|d| alias(d).to_string()).collect();
        let t = Instant::now();
        let removal =
            Wait::new("QEMU to remove the DIMMs", if self.opts.no_wait { Duration::ZERO } else { self.opts.timeout })
                .every(REMOVAL_POLL);
        let mut waiting = removal.start();
        loop {
            let dom = self.facts.loaded.dom.clone();
            let after = blocking(move || dom.xml(XmlView::Live)).await.ok().and_then(|x| DomainFacts::parse(&x).ok());
            let left: Vec<String> = match &after {
                Some(f) => {
                    names.iter().filter(|n| f.dimms.iter().any(|d| d.alias.as_deref() == Some(n))).cloned().collect()
                }
                None => names.clone(),
            };
            if left.is_empty() || waiting.pause().await.is_err() {
                self.run.guest_ms += ms(t);
                return (left, after);
            }
        }
    }

    fn removal_pending(&self, left: &[String]) -> (Outcome, String) {
        let size = self.plan.size;
        if self.opts.no_wait {
            return (
                Outcome::Ok,
                format!("detach of {size} requested; not waiting for QEMU to remove {}", left.join(", ")),
            );
        }
        let m = format!(
            "libvirt accepted the detach but {} still in the live XML after {:?} (the guest has not ejected it); its blocks are offline: repeat the command to finish",
            left.join(", "),
            self.opts.timeout
        );
        (Outcome::GuestTimeout, m)
    }

    /// Step 4: the guest confirms the blocks are gone.
    async fn confirm_gone<A: GuestAgent>(&mut self, link: Option<&mut A>) -> (Outcome, String) {
        let size = self.plan.size;
        let Some(link) = link else {
            return (Outcome::Ok, format!("{size} detached; guest not verified (--force, no agent)"));
        };
        let t = Instant::now();
        let blocks = link.blocks(self.plan.ranges.clone()).await;
        self.run.guest_ms += ms(t);
        judge_gone(size, &blocks)
    }
}

/// The verdict of a detach once QEMU removed the DIMMs, from the guest's
/// view of their blocks (pure): none of them may still be present.
pub fn judge_gone(size: Bytes, blocks: &Result<Vec<BlockState>, LinkError>) -> (Outcome, String) {
    match blocks {
        Ok(b) => {
            let still: Vec<String> = b.iter().filter(|s| s.present).map(|s| format!("memory{}", s.index)).collect();
            if still.is_empty() {
                (Outcome::Ok, format!("{size} detached; libvirt and the guest agree ({} block(s) gone)", b.len()))
            } else {
                (
                    Outcome::GuestFailed,
                    format!("QEMU removed the DIMM(s) but the guest still lists {}", still.join(", ")),
                )
            }
        }
        Err(e) => (Outcome::GuestFailed, format!("{size} detached in libvirt; the guest did not confirm: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detach_is_ok_only_when_the_guest_lists_none_of_its_blocks() {
        let block = |index, present| BlockState {
            index,
            start: (index * 128) << 20,
            present,
            online: false,
            zone: None,
            node: None,
        };
        let size = Bytes(256 << 20);
        let gone = judge_gone(size, &Ok(vec![block(32, false), block(33, false)]));
        assert_eq!(gone, (Outcome::Ok, "256 MiB detached; libvirt and the guest agree (2 block(s) gone)".into()));
        let (o, m) = judge_gone(size, &Ok(vec![block(32, false), block(33, true)]));
        assert_eq!(
            (o, m.as_str()),
            (Outcome::GuestFailed, "QEMU removed the DIMM(s) but the guest still lists memory33")
        );
        let (o, m) = judge_gone(size, &Err(LinkError::NoAddress));
        assert!(
            o == Outcome::GuestFailed && m.starts_with("256 MiB detached in libvirt; the guest did not confirm"),
            "{m}"
        );
    }

    fn dimm(alias: Option<&str>) -> Dimm {
        Dimm { alias: alias.map(str::to_string), ..Dimm::default() }
    }

    #[test]
    fn a_request_selects_only_its_own_numbered_dimms() {
        let sel = DimmSelector::Request("r1".into());
        assert!(sel.matches(&dimm(Some("ua-vmplug-r1-0"))));
        assert!(sel.matches(&dimm(Some("ua-vmplug-r1-12"))));
        for other in [Some("ua-vmplug-r10-0"), Some("ua-vmplug-r1-"), Some("ua-vmplug-r1-x"), Some("dimm0"), None] {
            assert!(!sel.matches(&dimm(other)), "{other:?}");
        }
    }

    #[test]
    fn an_alias_selects_exactly_one_dimm() {
        let sel = DimmSelector::Alias("dimm1".into());
        assert!(sel.matches(&dimm(Some("dimm1"))));
        assert!(!sel.matches(&dimm(Some("dimm10"))));
        assert!(!sel.matches(&dimm(None)));
    }
}
