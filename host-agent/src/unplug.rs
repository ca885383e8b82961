//! `vmplug detach-memory`: DIMM hot-unplug in the only order that cannot strand the
//! guest. The guest offlines the DIMMs' blocks first (through the agent, so a block
//! the kernel cannot empty is a refusal with nothing detached), then libvirt
//! detaches the devices, vmplug waits until QEMU has removed them from the live XML,
//! and the agent confirms the blocks are gone. A step that fails puts back what the
//! steps before it did: blocks offlined for a DIMM that stays are onlined again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmplug_common::protocol::{MemRange, OfflineRequest, OnlineRequest, Outcome as BlockOutcome};
use vmplug_common::Bytes;

use crate::domain::{Connection, DomainError, XmlView};
use crate::link::GuestLink;
use crate::ops::{
    affect_text, agent_if_running, blocking, libvirt_failed, load, ms, persistent_only, refused, HotplugOpts, Run,
};
use crate::preflight::{has_errors, Finding, Severity};
use crate::report::{HostSide, OpReport, Outcome};
use crate::xml::{dimm_detach_xml, request_index, Dimm, DomainFacts};

/// How often the live XML is read while QEMU removes a DIMM.
const REMOVAL_POLL: Duration = Duration::from_millis(100);

/// Which DIMMs to unplug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DimmSelector {
    /// One DIMM by its alias (`ua-…` user alias or libvirt's `dimmN`).
    Alias(String),
    /// Every DIMM `attach-memory --request-id ID` attached (`ua-vmplug-ID-N`).
    Request(String),
}

impl DimmSelector {
    pub fn matches(&self, d: &Dimm) -> bool {
        match self {
            DimmSelector::Alias(a) => d.alias.as_deref() == Some(a.as_str()),
            DimmSelector::Request(id) => request_index(d, id).is_some(),
        }
    }

    fn describe(&self) -> String {
        match self {
            DimmSelector::Alias(a) => format!("alias '{a}'"),
            DimmSelector::Request(id) => format!("request id '{id}'"),
        }
    }
}

fn alias(d: &Dimm) -> &str {
    d.alias.as_deref().unwrap_or("?")
}

fn ranges(dimms: &[&Dimm]) -> Vec<MemRange> {
    dimms.iter().filter_map(|d| d.range()).collect()
}

fn total(dimms: &[&Dimm]) -> Bytes {
    Bytes(dimms.iter().map(|d| d.size.get()).sum())
}

/// Onlines `ranges` again after a failed unplug; says what happened, for the report.
async fn put_back(link: &mut GuestLink, ranges: Vec<MemRange>, opts: &HotplugOpts) -> String {
    if ranges.is_empty() {
        return "no block needed onlining again".into();
    }
    let req =
        OnlineRequest { cpus: None, memory: ranges, zone: opts.zone, timeout_ms: opts.timeout.as_millis() as u64 };
    match link.online_until_done(req).await {
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

/// `vmplug detach-memory`: offline in the guest, detach, wait for removal, verify.
pub async fn detach_memory(
    conn: Arc<dyn Connection>,
    name: &str,
    sel: &DimmSelector,
    opts: &HotplugOpts,
) -> Result<OpReport, DomainError> {
    const OP: &str = "detach-memory";
    let mut run = Run::new();
    let t = Instant::now();
    let l = load(conn, name, true).await?;
    let affect = opts.affect.resolve(l.running);
    let chosen: Vec<&Dimm> = l.facts.dimms.iter().filter(|d| sel.matches(d)).collect();
    if chosen.is_empty() {
        let known: Vec<&str> = l.facts.dimms.iter().map(alias).collect();
        return Err(DomainError::Usage(format!(
            "no DIMM of '{name}' has {}; its DIMMs: {}",
            sel.describe(),
            if known.is_empty() { "none".into() } else { known.join(", ") }
        )));
    }
    let mut findings = Vec::new();
    if affect.config() && l.running {
        let dom = l.dom.clone();
        let persistent = DomainFacts::parse(&blocking(move || dom.xml(XmlView::Inactive)).await?)
            .map_err(|e| DomainError::Other(format!("persistent XML of '{name}': {e}")))?;
        for d in chosen.iter().filter(|d| !persistent.dimms.iter().any(|p| p.alias == d.alias)) {
            findings.push(Finding {
                id: "unplug.live-only",
                severity: Severity::Error,
                message: format!(
                    "DIMM {} is attached live only, not in the persistent definition: use --live",
                    alias(d)
                ),
            });
        }
    }
    if affect.live() {
        for d in chosen.iter().filter(|d| d.base.is_none()) {
            findings.push(Finding {
                id: "unplug.no-address",
                severity: Severity::Error,
                message: format!("the live XML gives DIMM {} no address: cannot tell the guest which blocks", alias(d)),
            });
        }
    }
    if l.job_running {
        findings.push(Finding {
            id: "domain.job",
            severity: Severity::Error,
            message: "a libvirt job (migration, save, dump) is running on the domain".into(),
        });
    }
    let (mut link, link_err) = match affect.live() {
        true => agent_if_running(&l, opts.agent.as_ref(), opts.agent_wait).await,
        false => (None, None),
    };
    if let Some(e) = &link_err {
        findings.push(Finding {
            id: "agent.ready",
            severity: Severity::Error,
            message: format!(
                "{e}: vmplug never unplugs memory the guest has not released (--force leaves it to the guest's ACPI handler)"
            ),
        });
    }
    run.preflight_ms = ms(t);
    if has_errors(&findings) && !opts.force {
        return Ok(refused(OP, name, affect, findings, link_err.as_ref(), &run));
    }
    let size = total(&chosen);
    let all_ranges = ranges(&chosen);

    // 1. The guest lets go of the blocks (or nothing is detached).
    let mut guest_report = None;
    if let Some(link) = link.as_mut() {
        let t = Instant::now();
        let req =
            OfflineRequest { cpus: None, memory: all_ranges.clone(), timeout_ms: opts.timeout.as_millis() as u64 };
        let res = link.offline(req).await;
        run.guest_ms += ms(t);
        let failed = match res {
            Ok(r) if r.complete => {
                guest_report = Some(r);
                None
            }
            Ok(r) => {
                let why = format!("the guest could not offline {} block(s) ({})", r.failures(), first_failure(&r));
                guest_report = Some(r);
                Some(why)
            }
            Err(e) => Some(format!("the guest did not offline the blocks: {e}")),
        };
        if let Some(why) = failed {
            let back = put_back(link, all_ranges, opts).await;
            return Ok(OpReport {
                operation: OP.into(),
                domain: name.into(),
                affect,
                outcome: Outcome::GuestFailed,
                message: format!("{why}; {back}; nothing was detached"),
                findings,
                host: HostSide { applied: vec![], verified: None, persistent: false },
                guest: guest_report,
                timings: run.timings(),
            });
        }
    }

    // 2. libvirt detaches; a refusal puts the remaining DIMMs' blocks back online.
    let mut applied = Vec::new();
    let t = Instant::now();
    for (i, d) in chosen.iter().enumerate() {
        let (dom, xml) = (l.dom.clone(), dimm_detach_xml(d));
        if let Err(e) = blocking(move || dom.detach_device(&xml, affect)).await {
            run.libvirt_ms = ms(t);
            let mut r = libvirt_failed(OP, name, affect, applied, findings, &e, &run);
            if let Some(link) = link.as_mut() {
                let back = put_back(link, ranges(&chosen[i..]), opts).await;
                r.message = format!("{}; for the DIMM(s) still attached: {back}", r.message);
            }
            return Ok(r);
        }
        applied.push(format!(
            "detach dimm {} ({}, node {}) ({})",
            alias(d),
            d.size,
            d.node.unwrap_or(0),
            affect_text(affect)
        ));
    }
    run.libvirt_ms = ms(t);
    if !affect.live() {
        let message = format!("{size} removed from the persistent definition (effective at the next start)");
        return Ok(persistent_only(OP, name, affect, message, findings, applied, &run));
    }

    // 3. QEMU removes the DIMMs once the guest has ejected them: watch the live XML.
    let names: Vec<String> = chosen.iter().map(|d| alias(d).to_string()).collect();
    let t = Instant::now();
    let deadline = t + if opts.no_wait { Duration::ZERO } else { opts.timeout };
    let (left, after) = loop {
        let dom = l.dom.clone();
        let after = blocking(move || dom.xml(XmlView::Live)).await.ok().and_then(|x| DomainFacts::parse(&x).ok());
        let left: Vec<String> = match &after {
            Some(f) => {
                names.iter().filter(|n| f.dimms.iter().any(|d| d.alias.as_deref() == Some(n))).cloned().collect()
            }
            None => names.clone(),
        };
        if left.is_empty() || Instant::now() >= deadline {
            break (left, after);
        }
        tokio::time::sleep(REMOVAL_POLL).await;
    };
    run.guest_ms += ms(t);
    let verified = after
        .as_ref()
        .map(|f| format!("{} DIMM(s) left, memory {}, {} slot(s) free", f.dimms.len(), f.memory, f.free_slots()));
    let report = |run: &Run, outcome, message, guest_report| OpReport {
        operation: OP.into(),
        domain: name.into(),
        affect,
        outcome,
        message,
        findings: findings.clone(),
        host: HostSide { applied: applied.clone(), verified: verified.clone(), persistent: affect.config() },
        guest: guest_report,
        timings: run.timings(),
    };
    if !left.is_empty() {
        let (outcome, message) = if opts.no_wait {
            (Outcome::Ok, format!("detach of {size} requested; not waiting for QEMU to remove {}", left.join(", ")))
        } else {
            (
                Outcome::GuestTimeout,
                format!(
                    "libvirt accepted the detach but {} still in the live XML after {:?} (the guest has not ejected it); its blocks are offline: repeat the command to finish",
                    left.join(", "),
                    opts.timeout
                ),
            )
        };
        return Ok(report(&run, outcome, message, guest_report));
    }

    // 4. The guest confirms the blocks are gone.
    let Some(link) = link.as_mut() else {
        return Ok(report(&run, Outcome::Ok, format!("{size} detached; guest not verified (--force, no agent)"), None));
    };
    let t = Instant::now();
    let blocks = link.blocks(all_ranges).await;
    run.guest_ms += ms(t);
    let (outcome, message) = match blocks {
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
    };
    Ok(report(&run, outcome, message, guest_report))
}

#[cfg(test)]
mod tests {
    use super::*;

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
