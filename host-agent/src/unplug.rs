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
use crate::report::{affect_text, libvirt_failed, ms, persistent_only, HostOnly, OpReport, Outcome, Run};
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
    type Evidence = DetachEvidence;

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
        run: &mut Run,
    ) -> Result<DetachEvidence, DomainError> {
        let mut d = Detach { facts, plan: &plan, opts, run, applied: vec![], guest: None };
        let seen = d.steps(link).await;
        let (applied, guest) = (d.applied, d.guest);
        Ok(DetachEvidence { plan, applied, guest, seen })
    }

    fn judge(&self, facts: &Facts, ev: DetachEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
        judge_detach(facts, ev, opts, run)
    }
}

const OP: &str = DetachMemory::NAME;

/// What a detach did and saw: its plan, the steps applied, the guest's
/// answer to offlining the blocks, and how it ended.
#[derive(Debug)]
pub struct DetachEvidence {
    pub plan: DetachPlan,
    pub applied: Vec<String>,
    pub guest: Option<vmplug_common::protocol::Report>,
    pub seen: DetachSeen,
}

/// How a detach ended.
#[derive(Debug)]
pub enum DetachSeen {
    /// The guest refused to give the memory up (its floors): nothing changed.
    Vetoed(String),
    /// The guest did not offline every block (its answer); `back`: how
    /// onlining them again went. Nothing was detached.
    NotOffline { answer: Result<vmplug_common::protocol::Report, LinkError>, back: String },
    /// libvirt refused a DIMM; `back`: how onlining the blocks of the DIMMs
    /// still attached went (when the guest had offlined them).
    Libvirt { error: DomainError, back: Option<String> },
    /// Only the persistent definition changed.
    Persistent,
    /// The live XML after the wait for QEMU's removal (`None`: unreadable),
    /// the DIMMs it still lists, and once none is left, the guest's view of
    /// their blocks (`None`: no agent to ask).
    Live { after: Option<Box<DomainFacts>>, left: Vec<String>, gone: Option<Result<Vec<BlockState>, LinkError>> },
}

/// One detach in progress: the plan, what was applied, the guest's report.
struct Detach<'a> {
    facts: &'a Facts,
    plan: &'a DetachPlan,
    opts: &'a HotplugOpts,
    run: &'a mut Run,
    applied: Vec<String>,
    guest: Option<vmplug_common::protocol::Report>,
}

impl Detach<'_> {
    /// The steps in order, each ending the detach when it fails.
    async fn steps<A: GuestAgent>(&mut self, mut link: Option<&mut A>) -> DetachSeen {
        let plan = self.plan;
        if let (true, Some(link)) = (plan.offline_first, link.as_deref_mut()) {
            // The guest's own floors first (guest.toml): an unplug is a shrink too.
            let ask = ForecastRequest { dimms: plan.ranges.clone(), virtio_mem: vec![], release: Some(plan.size) };
            if let Some(reason) = crate::link::guest_veto(link, ask).await {
                return DetachSeen::Vetoed(reason);
            }
            if let Err(seen) = self.offline(link).await {
                return seen;
            }
        }
        if let Err(seen) = self.detach(link.as_deref_mut()).await {
            return seen;
        }
        if !self.facts.affect.live() {
            return DetachSeen::Persistent;
        }
        let (left, after) = self.wait_removed().await;
        let gone = match link {
            Some(link) if left.is_empty() => {
                let t = Instant::now();
                let blocks = link.blocks(plan.ranges.clone()).await;
                self.run.guest_ms += ms(t);
                Some(blocks)
            }
            _ => None,
        };
        DetachSeen::Live { after: after.map(Box::new), left, gone }
    }

    /// Step 1: the guest lets go of the blocks, or nothing is detached.
    async fn offline<A: GuestAgent>(&mut self, link: &mut A) -> Result<(), DetachSeen> {
        let t = Instant::now();
        let timeout_ms = self.opts.timeout.as_millis() as u64;
        let res = link.offline(OfflineRequest { cpus: None, memory: self.plan.ranges.clone(), timeout_ms }).await;
        self.run.guest_ms += ms(t);
        match res {
            Ok(r) if r.complete => {
                self.guest = Some(r);
                Ok(())
            }
            answer => {
                let back = put_back(link, self.plan.ranges.clone(), self.opts).await;
                Err(DetachSeen::NotOffline { answer, back })
            }
        }
    }

    /// Step 2: libvirt detaches; a refusal puts the remaining DIMMs' blocks back online.
    async fn detach<A: GuestAgent>(&mut self, link: Option<&mut A>) -> Result<(), DetachSeen> {
        let affect = self.facts.affect;
        let t = Instant::now();
        for (i, d) in self.plan.chosen.iter().enumerate() {
            let (dom, xml) = (self.facts.loaded.dom.clone(), dimm_detach_xml(d));
            if let Err(error) = blocking(move || dom.detach_device(&xml, affect)).await {
                self.run.libvirt_ms = ms(t);
                let back = match link {
                    Some(link) => {
                        let still: Vec<&Dimm> = self.plan.chosen[i..].iter().collect();
                        Some(put_back(link, ranges(&still), self.opts).await)
                    }
                    None => None,
                };
                return Err(DetachSeen::Libvirt { error, back });
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
}

/// `detach-memory`'s judge (pure): the step that ended it, or the DIMMs
/// still listed, or [`judge_gone`] over the guest's view of their blocks.
fn judge_detach(facts: &Facts, ev: DetachEvidence, opts: &HotplugOpts, run: &Run) -> OpReport {
    let (name, affect) = (facts.loaded.facts.name.as_str(), facts.affect);
    let DetachEvidence { plan, applied, mut guest, seen } = ev;
    let size = plan.size;
    let (outcome, message, verified) = match seen {
        DetachSeen::Vetoed(reason) => {
            let message = format!("the guest vetoes the detach: {reason}; nothing was changed");
            let mut r = report(facts, plan.findings, applied, guest, (Outcome::Refused, message, None), run);
            r.findings.insert(0, crate::preflight::guest_veto(&reason));
            return r;
        }
        DetachSeen::NotOffline { answer, back } => {
            let why = match answer {
                Ok(r) => {
                    let why = format!("the guest could not offline {} block(s) ({})", r.failures(), first_failure(&r));
                    guest = Some(r);
                    why
                }
                Err(e) => format!("the guest did not offline the blocks: {e}"),
            };
            (Outcome::GuestFailed, format!("{why}; {back}; nothing was detached"), None)
        }
        DetachSeen::Libvirt { error, back } => {
            let mut r = libvirt_failed(OP, name, affect, applied, plan.findings, &error, run);
            if let Some(back) = back {
                r.message = format!("{}; for the DIMM(s) still attached: {back}", r.message);
            }
            return r;
        }
        DetachSeen::Persistent => {
            let message = format!("{size} removed from the persistent definition (effective at the next start)");
            return persistent_only(OP, name, affect, message, plan.findings, applied, run);
        }
        DetachSeen::Live { after, left, gone } => {
            let verified = after.as_ref().map(|f| {
                format!("{} DIMM(s) left, memory {}, {} slot(s) free", f.dimms.len(), f.memory, f.free_slots())
            });
            let (outcome, message) = match gone {
                _ if !left.is_empty() => removal_pending(size, &left, opts),
                None => (Outcome::Ok, format!("{size} detached; guest not verified (--force, no agent)")),
                Some(blocks) => judge_gone(size, &blocks),
            };
            (outcome, message, verified)
        }
    };
    report(facts, plan.findings, applied, guest, (outcome, message, verified), run)
}

fn report(
    facts: &Facts,
    findings: Vec<Finding>,
    applied: Vec<String>,
    guest: Option<vmplug_common::protocol::Report>,
    (outcome, message, verified): (Outcome, String, Option<String>),
    run: &Run,
) -> OpReport {
    let (name, affect) = (facts.loaded.facts.name.as_str(), facts.affect);
    let host = HostOnly { op: OP, name, affect, findings, applied, persistent: affect.config() };
    let mut report = host.report(outcome, message, run);
    report.host.verified = verified;
    report.guest = guest;
    report.guest_offlined = true;
    report
}

/// The DIMMs QEMU still lists after the wait (pure): not waited for
/// (`--no-wait`), or the guest has not ejected them.
fn removal_pending(size: Bytes, left: &[String], opts: &HotplugOpts) -> (Outcome, String) {
    if opts.no_wait {
        return (
            Outcome::Ok,
            format!("detach of {size} requested; not waiting for QEMU to remove {}", left.join(", ")),
        );
    }
    let m = format!(
        "libvirt accepted the detach but {} still in the live XML after {:?} (the guest has not ejected it); its blocks are offline: repeat the command to finish",
        left.join(", "),
        opts.timeout
    );
    (Outcome::GuestTimeout, m)
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
