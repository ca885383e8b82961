//! The one report every operation ends with, its outcome and exit code.

use serde::Serialize;
use vmplug_common::protocol::Report as GuestReport;

use std::collections::BTreeMap;
use std::time::Instant;

use vmplug_common::Bytes;

use crate::domain::{Affect, DomainError};
use crate::preflight::{Finding, NotPlanned, RuleId, Severity};

/// How an operation ended. Each has its own, documented exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Host and guest agree: done.
    Ok,
    /// Preflight refused; nothing was changed.
    Refused,
    /// libvirt refused or failed.
    LibvirtError,
    /// libvirt applied it but the guest did not confirm in time.
    GuestTimeout,
    /// The guest reported a failure (or a mismatch with the host's view).
    GuestFailed,
    /// Some steps applied, others not.
    Partial,
    /// The guest agent could not be reached.
    AgentUnreachable,
    /// Failed before acting (domain not found, a file unreadable, …); nothing changed.
    Error,
    /// The command line was wrong; nothing was read or changed.
    Usage,
}

impl Outcome {
    /// The process exit status: the only place one is chosen (README, "Exit codes").
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Ok => 0,
            Outcome::Error => 1,
            Outcome::Refused => 2,
            Outcome::LibvirtError => 3,
            Outcome::GuestTimeout => 4,
            Outcome::GuestFailed => 5,
            Outcome::Partial => 6,
            Outcome::AgentUnreachable => 7,
            Outcome::Usage => EXIT_USAGE,
        }
    }

    /// The word a text report starts its verdict with.
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Refused => "REFUSED",
            Outcome::LibvirtError => "LIBVIRT ERROR",
            Outcome::GuestTimeout => "GUEST TIMEOUT",
            Outcome::GuestFailed => "GUEST FAILED",
            Outcome::Partial => "PARTIAL",
            Outcome::AgentUnreachable => "AGENT UNREACHABLE",
            Outcome::Error => "ERROR",
            Outcome::Usage => "USAGE",
        }
    }
}

/// Exit code for a wrong command line (sysexits' EX_USAGE): distinct from 2, which
/// means "refused by preflight".
pub const EXIT_USAGE: u8 = 64;

/// Version of the `--json` envelope (`schema/vmplug-report.schema.json`).
pub const ENVELOPE_VERSION: u32 = 1;

/// The one `--json` document every command prints, on success and on every
/// error: the envelope fields, with the command's own result fields beside them.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    pub vmplug: u32,
    pub operation: String,
    pub domain: Option<String>,
    pub outcome: Outcome,
    pub exit_code: u8,
    pub message: String,
    pub findings: Vec<Finding>,
    /// What was changed, in order (libvirt calls and guest steps); empty when nothing was.
    pub applied: Vec<String>,
    pub timings: Option<Timings>,
    pub error: Option<String>,
}

impl Envelope {
    pub fn new(operation: &str, domain: Option<&str>, outcome: Outcome, message: String) -> Envelope {
        Envelope {
            vmplug: ENVELOPE_VERSION,
            operation: operation.into(),
            domain: domain.map(Into::into),
            outcome,
            exit_code: outcome.exit_code(),
            message,
            findings: vec![],
            applied: vec![],
            timings: None,
            error: None,
        }
    }

    /// The JSON document: `result`'s fields (if an object), then the envelope's
    /// fields over them.
    pub fn to_json(&self, result: Option<serde_json::Value>) -> serde_json::Value {
        let mut out = match result {
            Some(serde_json::Value::Object(m)) => m,
            Some(other) => {
                let mut m = serde_json::Map::new();
                m.insert("result".into(), other);
                m
            }
            None => serde_json::Map::new(),
        };
        if let Ok(serde_json::Value::Object(env)) = serde_json::to_value(self) {
            out.extend(env);
        }
        serde_json::Value::Object(out)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Everything before the first change: reading facts, the handshake, the
    /// rules and the plan.
    pub preflight_ms: u64,
    /// Of `preflight_ms`: the domain's and the host's facts from libvirt.
    pub facts_ms: u64,
    /// Of `preflight_ms`: the guest agent's handshake. It starts once the
    /// domain's XML is read and runs alongside the host's facts, so the two
    /// can add up to more than `preflight_ms`.
    pub handshake_ms: u64,
    pub libvirt_ms: u64,
    pub guest_ms: u64,
    /// Of `guest_ms`: when the last new CPU or block was seen added in the
    /// guest, from the agent's events as the host received them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_added_ms: Option<u64>,
    /// Of `guest_ms`: when the last one was onlined (an event of the agent's
    /// uevent path; absent when the request itself onlined everything).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_onlined_ms: Option<u64>,
    pub total_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostSide {
    /// libvirt calls made, in order (`setvcpus 2 live+config`, `attach dimm 1 GiB node 0`).
    pub applied: Vec<String>,
    /// What libvirt's live XML says afterwards.
    pub verified: Option<String>,
    /// The change is also in the persistent definition.
    pub persistent: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub operation: String,
    pub domain: String,
    pub affect: Affect,
    pub outcome: Outcome,
    pub message: String,
    pub findings: Vec<Finding>,
    pub host: HostSide,
    pub guest: Option<GuestReport>,
    /// `resize-memory`: each virtio-mem device it changed, at the end.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub virtio_mem: Vec<DeviceOutcome>,
    pub timings: Timings,
    /// The guest took memory offline (an unplug): its `done` items read
    /// "offlined" in the text. Not in the JSON, whose items say `done`.
    #[serde(skip)]
    pub guest_offlined: bool,
}

impl OpReport {
    /// The `--json` envelope of this report.
    pub fn envelope(&self) -> Envelope {
        Envelope {
            findings: self.findings.clone(),
            applied: self.host.applied.clone(),
            timings: Some(self.timings.clone()),
            error: (self.outcome != Outcome::Ok).then(|| self.message.clone()),
            ..Envelope::new(&self.operation, Some(&self.domain), self.outcome, self.message.clone())
        }
    }

    pub fn render_text(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("{} {}: {} — {}\n", self.operation, self.domain, self.outcome.word(), self.message));
        for f in &self.findings {
            let sev = if f.severity == Severity::Error { "error" } else { "warning" };
            s.push_str(&format!("  {sev} [{}] {}\n", f.id, f.message));
        }
        for step in &self.host.applied {
            s.push_str(&format!("  host: {step}\n"));
        }
        if let Some(v) = &self.host.verified {
            s.push_str(&format!("  host: live XML: {v}\n"));
        }
        if self.outcome != Outcome::Refused && !self.host.applied.is_empty() {
            s.push_str(&format!(
                "  host: {}\n",
                if self.host.persistent {
                    "persistent (also in the domain definition)"
                } else {
                    "live only: lost at the next domain start"
                }
            ));
        }
        for d in &self.virtio_mem {
            let zones: Vec<String> = d.zones.iter().map(|(z, n)| format!("{n} {z}")).collect();
            s.push_str(&format!(
                "  device: {} node {}: {} → requested {}, holds {}{}; guest: {} block(s), {} online{}\n",
                d.device,
                d.node.map_or("-".into(), |n| n.to_string()),
                d.before,
                d.requested,
                d.current,
                match (d.requested_reset, d.current_lags) {
                    (true, _) => " (requested set back)",
                    (_, true) => " (libvirt's view, not caught up yet: the guest shows the requested size)",
                    _ => "",
                },
                d.blocks,
                d.blocks_online,
                if zones.is_empty() { String::new() } else { format!(" ({})", zones.join(", ")) }
            ));
        }
        if let Some(g) = &self.guest {
            // An offline report (unplug, shrink): a CPU it took down is not online after it.
            let offline = self.guest_offlined
                || g.cpus
                    .iter()
                    .any(|c| c.outcome == vmplug_common::protocol::ItemOutcome::Done && !g.cpus_online.contains(c.cpu));
            let outcome_text = |o| outcome_text(o, offline);
            for c in &g.cpus {
                s.push_str(&format!("  guest: cpu{} {}\n", c.cpu, outcome_text(&c.outcome)));
            }
            for b in &g.blocks {
                s.push_str(&format!(
                    "  guest: memory{} @{:#x} node {} {}{}\n",
                    b.index,
                    b.start,
                    b.node.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                    outcome_text(&b.outcome),
                    b.zone.as_ref().map(|z| format!(" ({z})")).unwrap_or_default()
                ));
            }
            for q in &g.queues {
                s.push_str(&format!("  guest: {}\n", queue_text(q)));
            }
            s.push_str(&format!(
                "  guest: {} CPUs online ({}), {} memory online, {} in {} ms\n",
                g.cpus_online.len(),
                g.cpus_online,
                g.memory_online,
                if g.complete {
                    "complete"
                } else if g.timed_out {
                    "timed out"
                } else {
                    "incomplete"
                },
                g.duration_ms
            ));
        }
        let t = &self.timings;
        let inside = match (t.guest_added_ms, t.guest_onlined_ms) {
            (Some(a), Some(o)) => format!(" (last added at {a}, onlined at {o})"),
            (Some(a), None) => format!(" (last added at {a})"),
            (None, Some(o)) => format!(" (last onlined at {o})"),
            (None, None) => String::new(),
        };
        s.push_str(&format!(
            "  time: preflight {} ms (facts {} and handshake {}, overlapped), libvirt {} ms, guest {} ms{inside}, total {} ms\n",
            t.preflight_ms, t.facts_ms, t.handshake_ms, t.libvirt_ms, t.guest_ms, t.total_ms
        ));
        s
    }
}

/// One network device's queue change as the report shows it.
pub fn queue_text(q: &vmplug_common::protocol::QueueState) -> String {
    use vmplug_common::protocol::ItemOutcome::*;
    match &q.last {
        Some(c) => match &c.outcome {
            Done | Already => {
                format!("{}: combined channels {} → {} (follow the CPUs; max {})", q.device, c.from, c.to, q.max)
            }
            NotFound => format!("{}: gone before its channels could be set to {}", q.device, c.to),
            Failed { errno, message } => format!(
                "{}: combined channels stay {} (max {}), not {}: FAILED (errno {errno}: {message})",
                q.device,
                q.combined.map_or("unknown".into(), |n| n.to_string()),
                q.max,
                c.to
            ),
        },
        None => format!(
            "{}: {} of {} combined channels",
            q.device,
            q.combined.map_or("unknown".into(), |n| n.to_string()),
            q.max
        ),
    }
}

pub fn outcome_text(o: &vmplug_common::protocol::ItemOutcome, offline: bool) -> String {
    use vmplug_common::protocol::ItemOutcome::*;
    match (o, offline) {
        (Done, false) => "onlined".into(),
        (Already, false) => "already online".into(),
        (Done, true) => "offlined".into(),
        (Already, true) => "already offline".into(),
        (NotFound, _) => "not found".into(),
        (Failed { errno, message }, _) => format!("FAILED (errno {errno}: {message})"),
    }
}

/// One device after the change, as the report shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceOutcome {
    pub device: String,
    pub node: Option<u32>,
    pub size: Bytes,
    pub before: Bytes,
    pub requested: Bytes,
    /// What libvirt's `<current>` says the device holds, read at the end.
    pub current: Bytes,
    /// `current` had not yet caught up when the guest's blocks proved the
    /// requested size (QEMU reports a device's size at most once a second).
    pub current_lags: bool,
    /// `<requested>` was set back to `current` (a shrink the guest could not finish).
    pub requested_reset: bool,
    /// The guest's blocks in the region (present ones), by zone.
    pub blocks: u32,
    pub blocks_online: u32,
    pub zones: BTreeMap<String, u32>,
}

/// Phase timings of one verb, as it runs.
#[derive(Debug)]
pub struct Run {
    pub(crate) started: Instant,
    pub(crate) preflight_ms: u64,
    /// Parts of `preflight_ms`: reading the domain and host from libvirt, and
    /// the agent's handshake (which runs alongside the host's facts).
    pub(crate) facts_ms: u64,
    pub(crate) handshake_ms: u64,
    pub(crate) libvirt_ms: u64,
    pub(crate) guest_ms: u64,
    /// Of `guest_ms`: the guest's last add and online events, as received.
    pub(crate) milestones: crate::link::Milestones,
}

impl Default for Run {
    fn default() -> Self {
        Self::new()
    }
}

impl Run {
    pub fn new() -> Self {
        Run {
            started: Instant::now(),
            preflight_ms: 0,
            facts_ms: 0,
            handshake_ms: 0,
            libvirt_ms: 0,
            guest_ms: 0,
            milestones: Default::default(),
        }
    }
    pub(crate) fn timings(&self) -> Timings {
        Timings {
            preflight_ms: self.preflight_ms,
            facts_ms: self.facts_ms,
            handshake_ms: self.handshake_ms,
            libvirt_ms: self.libvirt_ms,
            guest_ms: self.guest_ms,
            guest_added_ms: self.milestones.added_ms,
            guest_onlined_ms: self.milestones.onlined_ms,
            total_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

pub(crate) fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

pub fn affect_text(a: Affect) -> &'static str {
    match a {
        Affect::Live => "live",
        Affect::Config => "config",
        Affect::Both => "live+config",
        Affect::Current => "current",
    }
}

/// What the host side did, with nothing from the guest: the shape shared by the
/// reports that end before (or without) the guest's part.
pub(crate) struct HostOnly<'a> {
    pub(crate) op: &'a str,
    pub(crate) name: &'a str,
    pub(crate) affect: Affect,
    pub(crate) findings: Vec<Finding>,
    pub(crate) applied: Vec<String>,
    pub(crate) persistent: bool,
}

impl HostOnly<'_> {
    pub(crate) fn report(self, outcome: Outcome, message: String, run: &Run) -> OpReport {
        OpReport {
            operation: self.op.into(),
            domain: self.name.into(),
            affect: self.affect,
            outcome,
            message,
            findings: self.findings,
            host: HostSide { applied: self.applied, verified: None, persistent: self.persistent },
            guest: None,
            virtio_mem: vec![],
            timings: run.timings(),
            guest_offlined: false,
        }
    }
}

/// libvirt refused a step: nothing applied (LibvirtError) or some steps did (Partial).
pub(crate) fn libvirt_failed(
    op: &str,
    name: &str,
    affect: Affect,
    applied: Vec<String>,
    findings: Vec<Finding>,
    e: &DomainError,
    run: &Run,
) -> OpReport {
    let outcome = if applied.is_empty() { Outcome::LibvirtError } else { Outcome::Partial };
    HostOnly { op, name, affect, findings, applied, persistent: affect.config() }.report(outcome, e.to_string(), run)
}

/// A change made to the persistent definition only: nothing for the guest to confirm.
pub(crate) fn persistent_only(
    op: &str,
    name: &str,
    affect: Affect,
    message: String,
    findings: Vec<Finding>,
    applied: Vec<String>,
    run: &Run,
) -> OpReport {
    HostOnly { op, name, affect, findings, applied, persistent: true }.report(Outcome::Ok, message, run)
}

/// The report of a request that did not become a plan: refused (nothing
/// changed; exit 7 when the only error is an unreachable agent), or a usage error.
pub(crate) fn not_planned(
    op: &str,
    name: &str,
    affect: Affect,
    why: NotPlanned,
    run: &Run,
) -> Result<OpReport, DomainError> {
    let r = match why {
        NotPlanned::Usage(message) => return Err(DomainError::Usage(message)),
        NotPlanned::Refused(r) => r,
    };
    let errors: Vec<&str> = r.findings.iter().filter(|f| f.severity == Severity::Error).map(|f| f.id).collect();
    // A verdict that stands alone (the socket refused, the domain not in a
    // state to take it) is the message itself, not only a finding under it.
    let alone = |id: &str| errors.len() == 1 && errors[0] == id;
    let sole = [
        RuleId::AgentSocket.id(),
        RuleId::DomainPaused.id(),
        RuleId::DomainCrashed.id(),
        RuleId::DomainShuttingDown.id(),
        RuleId::DomainPmsuspended.id(),
        RuleId::UnplugDimm.id(),
    ]
    .into_iter()
    .find(|id| alone(id))
    .and_then(|id| r.findings.iter().find(|f| f.id == id));
    let (outcome, message) = if r.agent_unreachable {
        let why =
            r.findings.iter().find(|f| f.id == RuleId::AgentReady.id()).map(|f| f.message.clone()).unwrap_or_default();
        (Outcome::AgentUnreachable, why)
    } else if let Some(f) = sole {
        (Outcome::Refused, format!("{}; nothing was changed", f.message))
    } else {
        (Outcome::Refused, format!("preflight refused ({}); nothing was changed", errors.join(", ")))
    };
    Ok(HostOnly { op, name, affect, findings: r.findings, applied: vec![], persistent: false }
        .report(outcome, message, run))
}

#[cfg(test)]
mod queue_tests {
    use vmplug_common::protocol::{ItemOutcome, QueueChange, QueueState};

    use super::queue_text;

    #[test]
    fn a_queue_change_reads_as_from_to_or_why_not() {
        let mut q = QueueState {
            device: "eth0".into(),
            max: 4,
            combined: Some(4),
            last: Some(QueueChange { from: 2, to: 4, outcome: ItemOutcome::Done }),
        };
        assert_eq!(queue_text(&q), "eth0: combined channels 2 → 4 (follow the CPUs; max 4)");
        q.combined = Some(2);
        q.last =
            Some(QueueChange { from: 2, to: 4, outcome: ItemOutcome::Failed { errno: 16, message: "busy".into() } });
        assert_eq!(queue_text(&q), "eth0: combined channels stay 2 (max 4), not 4: FAILED (errno 16: busy)");
    }
}
