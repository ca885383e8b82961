//! The pure decision: (limits, a domain's recent samples and state, its and the
//! host's capacity, now) → at most one action. Guest numbers are clamped on the
//! way in and can never push a domain past the policy.

use std::collections::VecDeque;

use serde::Serialize;
use vmplug_common::protocol::Pressure;
use vmplug_common::Bytes;

use super::policy::Limits;
pub use super::policy::{KEPT_SAMPLES, WHOLE_BLOCK};
use crate::report::Outcome;

/// One guest sample, sanitised: a guest controls these numbers, so NaN, negative
/// or over-100 % values are clamped and can never exceed what the policy allows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    pub cpu_some: f64,
    pub mem_some: f64,
    pub mem_full: f64,
    pub available: Bytes,
}

fn pct(v: Option<f64>) -> f64 {
    match v {
        Some(x) if x.is_finite() => x.clamp(0.0, 100.0),
        _ => 0.0,
    }
}

impl From<&Pressure> for Sample {
    fn from(p: &Pressure) -> Self {
        Sample {
            cpu_some: pct(p.cpu_some.map(|x| x.avg10)),
            mem_some: pct(p.memory_some.map(|x| x.avg10)),
            mem_full: pct(p.memory_full.map(|x| x.avg10)),
            available: p.mem_available,
        }
    }
}

/// What autoscale knows of one domain between samples.
#[derive(Debug, Clone, Default)]
pub struct DomainState {
    pub samples: VecDeque<Sample>,
    pub last_action_s: Option<u64>,
    pub backoff_until_s: u64,
    pub failures: u32,
    /// A step on this domain is running (the daemon skips it; `decide` holds).
    pub in_flight: bool,
}

/// The host's view of a domain and of the host, from libvirt (trusted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub vcpus: u32,
    pub vcpus_max: u32,
    pub memory: Bytes,
    pub max_memory: Bytes,
    pub free_slots: u32,
    pub host_free: Bytes,
    pub host_cpus: u32,
    /// vCPUs of all running selected domains on this host.
    pub host_vcpus: u32,
    /// The domain has virtio-mem devices: memory moves through them (both ways).
    pub virtio_mem: bool,
    /// What its virtio-mem devices could still plug (their regions minus what
    /// they hold), and what they hold.
    pub virtio_room: Bytes,
    pub virtio_plugged: Bytes,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    None,
    AddVcpus {
        to: u32,
    },
    /// `size` as decided; `ceiling`: the most the guest's block size may round it
    /// up to (the policy's and the host's room), never more.
    AddMemory {
        size: Bytes,
        ceiling: Bytes,
    },
    /// virtio-mem: grow the devices by `size` (balanced).
    GrowVirtioMem {
        size: Bytes,
    },
    /// virtio-mem: give `size` back (the fullest device first).
    ShrinkVirtioMem {
        size: Bytes,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub action: Action,
    pub rule: &'static str,
    pub reason: String,
}

fn none(rule: &'static str, reason: impl Into<String>) -> Decision {
    Decision { action: Action::None, rule, reason: reason.into() }
}

/// Cooldown, back-off and an action still running hold every decision, however
/// it was asked for (pressure or an alert).
fn held(l: &Limits, st: &DomainState, now_s: u64) -> Option<Decision> {
    if st.in_flight {
        return Some(none("in-flight", "an action on this domain is still running"));
    }
    if now_s < st.backoff_until_s {
        return Some(none(
            "backoff",
            format!("backing off after {} failure(s) until t={}", st.failures, st.backoff_until_s),
        ));
    }
    if let Some(t) = st.last_action_s {
        if now_s < t.saturating_add(l.cooldown_s) {
            return Some(none("cooldown", format!("cooldown until t={}", t.saturating_add(l.cooldown_s))));
        }
    }
    None
}

/// Why a grow was asked for: the rule id and reason its action carries.
#[derive(Debug, Clone, Copy)]
struct Why<'a> {
    rule: &'static str,
    reason: &'a str,
}

/// One `cpu_step` more vCPUs within the policy's, the domain's and the host's
/// room; `Err` with why not when there is none.
fn grow_vcpus(l: &Limits, cap: &Capacity, why: Why) -> Result<Decision, String> {
    let cap_max = l.cpu_max.min(cap.vcpus_max);
    let host_room = ((cap.host_cpus as f64 * l.vcpu_overcommit) as u32).saturating_sub(cap.host_vcpus);
    let to = cap.vcpus.saturating_add(l.cpu_step).min(cap_max).min(cap.vcpus.saturating_add(host_room));
    if to > cap.vcpus {
        return Ok(Decision { action: Action::AddVcpus { to }, rule: why.rule, reason: why.reason.to_string() });
    }
    Err(format!(
        "at {} vCPUs (policy max {}, domain max {}, host room {host_room})",
        cap.vcpus, l.cpu_max, cap.vcpus_max
    ))
}

/// One `mem_step` more memory (virtio-mem where the domain has it, else DIMMs)
/// within the policy's, the domain's and the host's room; `Err` with why not
/// when there is none.
fn grow_memory(l: &Limits, cap: &Capacity, why: Why) -> Result<Decision, String> {
    if cap.virtio_mem {
        return grow_virtio_mem(l, cap, why);
    }
    let room = Bytes(
        l.mem_max.get().saturating_sub(cap.memory.get()).min(cap.max_memory.get().saturating_sub(cap.memory.get())),
    );
    let host_room = Bytes(cap.host_free.get().saturating_sub(l.memory_reserve.get()));
    let ceiling = room.min(host_room);
    let size = l.mem_step.min(ceiling);
    // Whole 128 MiB blocks only; the planner aligns to the guest exactly,
    // rounding up no further than `ceiling`.
    let size = whole_blocks(size.get());
    if size.get() > 0 && cap.free_slots > 0 {
        return Ok(Decision {
            action: Action::AddMemory { size, ceiling },
            rule: why.rule,
            reason: why.reason.to_string(),
        });
    }
    Err(format!("at {} (policy max {}, host room {host_room}, {} free slots)", cap.memory, l.mem_max, cap.free_slots))
}

/// The pure decision: inputs → at most one action.
pub fn decide(l: &Limits, st: &DomainState, cap: &Capacity, now_s: u64) -> Decision {
    if let Some(d) = held(l, st, now_s) {
        return d;
    }
    if st.samples.len() < l.sustain {
        return none("warming-up", format!("{} of {} samples", st.samples.len(), l.sustain));
    }
    let recent: Vec<&Sample> = st.samples.iter().rev().take(l.sustain).collect();
    let cpu_hot = recent.iter().all(|s| s.cpu_some >= l.cpu_psi);
    let mem_hot = recent
        .iter()
        .all(|s| s.mem_some >= l.mem_psi_some || s.mem_full >= l.mem_psi_full || s.available < l.available_below);
    if cpu_hot {
        let reason = format!("cpu some avg10 ≥ {} for {} samples", l.cpu_psi, l.sustain);
        match grow_vcpus(l, cap, Why { rule: "cpu.psi", reason: &reason }) {
            Ok(d) => return d,
            Err(why) if !mem_hot => return none("cpu.at-max", format!("cpu pressure, but {why}")),
            Err(_) => {}
        }
    }
    if mem_hot {
        let reason = format!("memory pressure or MemAvailable < {} for {} samples", l.available_below, l.sustain);
        return grow_memory(l, cap, Why { rule: "memory.pressure", reason: &reason })
            .unwrap_or_else(|why| none("memory.at-max", format!("memory pressure, but {why}")));
    }
    if let (true, Some(above)) = (cap.virtio_mem, l.shrink_above) {
        let idle =
            recent.iter().all(|s| s.available >= above && s.mem_some < l.mem_psi_some && s.mem_full < l.mem_psi_full);
        if idle {
            return shrink_virtio_mem(l, cap, &recent);
        }
    }
    none("calm", "no sustained pressure")
}

/// What an alert asks to grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Cpu,
    Memory,
}

/// An alert (Alertmanager's webhook) asks a domain to grow: the same limits,
/// cooldown and back-off as pressure; only the trigger differs. `alert` is its
/// name, for the event's reason.
pub fn decide_alert(
    l: &Limits,
    st: &DomainState,
    cap: &Capacity,
    resource: Resource,
    alert: &str,
    now_s: u64,
) -> Decision {
    if let Some(d) = held(l, st, now_s) {
        return d;
    }
    let reason = format!("alert {alert} firing");
    // An alert's decision carries the alert's rule whether or not there is
    // room to grow (the reason says which): the README promises
    // `alert.memory` and `alert.cpu`, and an alert at the limit is still the
    // alert's outcome, not pressure's.
    match resource {
        Resource::Cpu => grow_vcpus(l, cap, Why { rule: "alert.cpu", reason: &reason })
            .unwrap_or_else(|why| none("alert.cpu", format!("alert {alert}, but {why}"))),
        Resource::Memory => grow_memory(l, cap, Why { rule: "alert.memory", reason: &reason })
            .unwrap_or_else(|why| none("alert.memory", format!("alert {alert}, but {why}"))),
    }
}

/// Whole 128 MiB blocks: a virtio-mem step never leaves a guest block partly
/// plugged by autoscale.
fn whole_blocks(b: u64) -> Bytes {
    Bytes(b / WHOLE_BLOCK.get() * WHOLE_BLOCK.get())
}

fn grow_virtio_mem(l: &Limits, cap: &Capacity, why: Why) -> Result<Decision, String> {
    let policy_room = l.mem_max.get().saturating_sub(cap.memory.get());
    let host_room = cap.host_free.get().saturating_sub(l.memory_reserve.get());
    let size = whole_blocks(l.mem_step.get().min(policy_room).min(cap.virtio_room.get()).min(host_room));
    if size.get() == 0 {
        return Err(format!(
            "at {} (policy max {}, virtio-mem room {}, host room {})",
            cap.memory,
            l.mem_max,
            cap.virtio_room,
            Bytes(host_room)
        ));
    }
    Ok(Decision { action: Action::GrowVirtioMem { size }, rule: why.rule, reason: why.reason.to_string() })
}

/// Gives memory back, never below the floor, never more than the devices hold,
/// and never so much that the least MemAvailable seen would fall under the grow
/// threshold.
fn shrink_virtio_mem(l: &Limits, cap: &Capacity, recent: &[&Sample]) -> Decision {
    let least = recent.iter().map(|s| s.available.get()).min().unwrap_or(0);
    let spare = least.saturating_sub(l.available_below.get());
    let above_floor = cap.memory.get().saturating_sub(l.mem_min.get());
    let size = whole_blocks(l.mem_step.get().min(cap.virtio_plugged.get()).min(above_floor).min(spare));
    if size.get() == 0 {
        return none(
            "memory.at-min",
            format!("idle, but at {} (floor {}, virtio-mem holds {})", cap.memory, l.mem_min, cap.virtio_plugged),
        );
    }
    Decision {
        action: Action::ShrinkVirtioMem { size },
        rule: "memory.idle",
        reason: format!(
            "MemAvailable ≥ {} and no memory pressure for {} samples",
            l.shrink_above.unwrap_or_default(),
            l.sustain
        ),
    }
}

/// A shrink asks for no more than the guest forecasts it can give back now:
/// its virtio-mem regions' releasable bytes, in whole blocks. Without a
/// forecast (an agent older than the `forecast` capability) the size stays
/// as decided, and the resize's own rules and the guest judge it.
pub fn shrink_within_forecast(size: Bytes, forecast: Option<&vmplug_common::protocol::Forecast>) -> Bytes {
    let Some(f) = forecast else { return size };
    let releasable: u64 = f
        .devices
        .iter()
        .filter(|d| d.kind == vmplug_common::protocol::DeviceKind::VirtioMem)
        .map(|d| d.releasable.get())
        .sum();
    whole_blocks(size.get().min(releasable))
}

/// One recorded decision (a JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct DecisionEvent {
    pub ts: u64,
    pub uri: String,
    pub domain: String,
    pub inputs: Option<Sample>,
    pub vcpus: u32,
    pub memory: Bytes,
    pub rule: &'static str,
    pub reason: String,
    pub action: Action,
    pub dry_run: bool,
    pub outcome: Option<Outcome>,
    pub message: Option<String>,
    pub duration_ms: u64,
}

impl DecisionEvent {
    /// An event about to be decided: no inputs, no action yet.
    pub fn new(uri: &str, domain: &str, cap: &Capacity, ts: u64, dry_run: bool) -> DecisionEvent {
        DecisionEvent {
            ts,
            uri: uri.into(),
            domain: domain.into(),
            inputs: None,
            vcpus: cap.vcpus,
            memory: cap.memory,
            rule: "agent.silent",
            reason: String::new(),
            action: Action::None,
            dry_run,
            outcome: None,
            message: None,
            duration_ms: 0,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::autoscale::policy::Policy;

    #[test]
    fn a_shrink_never_asks_for_more_than_the_forecast() {
        use vmplug_common::protocol::{DeviceForecast, DeviceKind, Forecast};
        use vmplug_common::BlockSize;
        let dev = |kind, releasable: u64| DeviceForecast {
            kind,
            start: 0,
            size: Bytes(GIB),
            present: Bytes(GIB),
            releasable: Bytes(releasable),
            held: None,
        };
        let f = Forecast {
            block_size: BlockSize::new(128 * MIB).expect("block size"),
            mem_available: Bytes(GIB),
            nodes: vec![],
            devices: vec![
                dev(DeviceKind::VirtioMem, 200 * MIB),
                dev(DeviceKind::Dimm, GIB),
                dev(DeviceKind::VirtioMem, 128 * MIB),
            ],
            veto: None,
        };
        // 328 MiB releasable in virtio-mem (the DIMM's gigabyte is not this action's): 256 in whole blocks.
        assert_eq!(shrink_within_forecast(Bytes(512 * MIB), Some(&f)), Bytes(256 * MIB));
        assert_eq!(shrink_within_forecast(Bytes(128 * MIB), Some(&f)), Bytes(128 * MIB));
        let none = Forecast { devices: vec![dev(DeviceKind::VirtioMem, 64 * MIB)], ..f };
        assert_eq!(shrink_within_forecast(Bytes(512 * MIB), Some(&none)), Bytes(0), "less than a block: nothing");
        assert_eq!(shrink_within_forecast(Bytes(512 * MIB), None), Bytes(512 * MIB), "no forecast: as decided");
    }
    use vmplug_common::GIB;
    use vmplug_common::MIB;

    pub(crate) fn limits() -> Limits {
        Policy::default().limits().expect("defaults are valid")
    }

    pub(crate) fn cap() -> Capacity {
        Capacity {
            vcpus: 2,
            vcpus_max: 8,
            memory: Bytes(GIB),
            max_memory: Bytes(8 * GIB),
            free_slots: 4,
            host_free: Bytes(16 * GIB),
            host_cpus: 2,
            host_vcpus: 2,
            virtio_mem: false,
            virtio_room: Bytes(0),
            virtio_plugged: Bytes(0),
        }
    }

    pub(crate) fn s(cpu: f64, mem: f64, avail_mib: u64) -> Sample {
        Sample { cpu_some: cpu, mem_some: mem, mem_full: 0.0, available: Bytes(avail_mib * MIB) }
    }

    pub(crate) fn state(samples: &[Sample]) -> DomainState {
        DomainState { samples: samples.iter().copied().collect(), ..Default::default() }
    }

    /// An alert grows by the policy's step with no samples needed, and is held by
    /// exactly what holds pressure: cooldown, back-off, an action in flight, limits.
    #[test]
    fn an_alert_goes_through_the_same_limits() {
        let l = limits();
        let calm = state(&[]);
        let d = decide_alert(&l, &calm, &cap(), Resource::Memory, "GuestLowMemory", 1000);
        assert_eq!(d.rule, "alert.memory");
        assert!(matches!(d.action, Action::AddMemory { size, .. } if size == l.mem_step), "{d:?}");
        assert!(d.reason.contains("GuestLowMemory"));
        let d = decide_alert(&l, &calm, &cap(), Resource::Cpu, "GuestCpu", 1000);
        assert_eq!(d.action, Action::AddVcpus { to: 2 + l.cpu_step.min(8 - 2) }, "{d:?}");
        let cooling = DomainState { last_action_s: Some(990), ..state(&[]) };
        assert_eq!(decide_alert(&l, &cooling, &cap(), Resource::Memory, "a", 1000).rule, "cooldown");
        let busy = DomainState { in_flight: true, ..state(&[]) };
        assert_eq!(decide_alert(&l, &busy, &cap(), Resource::Cpu, "a", 1000).rule, "in-flight");
        // At the limit, nothing to do, and still the alert's rule (issue #30:
        // memory said `memory.at-max`, cpu `cpu.at-max`).
        let full = Capacity { memory: l.mem_max, ..cap() };
        let d = decide_alert(&l, &calm, &full, Resource::Memory, "GuestLowMemory", 1000);
        assert_eq!((d.action, d.rule), (Action::None, "alert.memory"));
        assert!(d.reason.starts_with("alert GuestLowMemory, but at "), "{}", d.reason);
        let full_virtio = Capacity { memory: l.mem_max, virtio_mem: true, ..cap() };
        let d = decide_alert(&l, &calm, &full_virtio, Resource::Memory, "a", 1000);
        assert_eq!((d.action, d.rule), (Action::None, "alert.memory"));
        let at_max = Capacity { vcpus: 8, ..cap() };
        let d = decide_alert(&l, &calm, &at_max, Resource::Cpu, "a", 1000);
        assert_eq!((d.action, d.rule), (Action::None, "alert.cpu"));
        assert!(d.reason.starts_with("alert a, but at 8 vCPUs"), "{}", d.reason);
    }

    #[test]
    fn decision_table() {
        let l = limits();
        let hot = s(80.0, 0.0, 900);
        let calm = s(1.0, 0.0, 900);
        let tight = s(0.0, 50.0, 64);
        let rows: Vec<(&str, DomainState, Capacity, Action, &str)> = vec![
            ("warming up", state(&[hot, hot]), cap(), Action::None, "warming-up"),
            ("sustained cpu", state(&[hot, hot, hot]), cap(), Action::AddVcpus { to: 3 }, "cpu.psi"),
            ("one calm sample breaks the run", state(&[hot, calm, hot]), cap(), Action::None, "calm"),
            ("at policy max", state(&[hot, hot, hot]), Capacity { vcpus: 4, ..cap() }, Action::None, "cpu.at-max"),
            (
                "domain max below policy",
                state(&[hot, hot, hot]),
                Capacity { vcpus: 3, vcpus_max: 3, ..cap() },
                Action::None,
                "cpu.at-max",
            ),
            (
                "host overcommit",
                state(&[hot, hot, hot]),
                Capacity { host_vcpus: 8, ..cap() },
                Action::None,
                "cpu.at-max",
            ),
            (
                "sustained memory",
                state(&[tight, tight, tight]),
                cap(),
                Action::AddMemory { size: Bytes(512 * MIB), ceiling: Bytes(3 * GIB) },
                "memory.pressure",
            ),
            (
                "memory capped by policy max",
                state(&[tight, tight, tight]),
                Capacity { memory: Bytes(3840 * MIB), ..cap() },
                Action::AddMemory { size: Bytes(256 * MIB), ceiling: Bytes(256 * MIB) },
                "memory.pressure",
            ),
            (
                "memory at max",
                state(&[tight, tight, tight]),
                Capacity { memory: Bytes(4 * GIB), ..cap() },
                Action::None,
                "memory.at-max",
            ),
            (
                "host reserve",
                state(&[tight, tight, tight]),
                Capacity { host_free: Bytes(GIB), ..cap() },
                Action::None,
                "memory.at-max",
            ),
            (
                "no slot",
                state(&[tight, tight, tight]),
                Capacity { free_slots: 0, ..cap() },
                Action::None,
                "memory.at-max",
            ),
        ];
        for (what, st, c, want, rule) in rows {
            let d = decide(&l, &st, &c, 1000);
            assert_eq!((d.action, d.rule), (want, rule), "{what}: {}", d.reason);
        }
    }

    #[test]
    fn virtio_mem_grows_within_its_room_and_shrinks_to_the_floor_only_when_idle() {
        let l = Limits { shrink_above: Some(Bytes(GIB)), mem_min: Bytes(GIB), ..limits() };
        let vm = Capacity {
            memory: Bytes(2 * GIB),
            virtio_mem: true,
            virtio_room: Bytes(256 * MIB),
            virtio_plugged: Bytes(GIB),
            ..cap()
        };
        let tight = s(0.0, 50.0, 64);
        let idle = s(0.0, 0.0, 1400);
        let d = decide(&l, &state(&[tight, tight, tight]), &vm, 1000);
        assert_eq!((d.action, d.rule), (Action::GrowVirtioMem { size: Bytes(256 * MIB) }, "memory.pressure"));
        let full = Capacity { virtio_room: Bytes(0), ..vm };
        assert_eq!(decide(&l, &state(&[tight, tight, tight]), &full, 1000).rule, "memory.at-max");
        // Idle: a step back, no more than keeps MemAvailable over the grow threshold.
        let d = decide(&l, &state(&[idle, idle, idle]), &vm, 1000);
        assert_eq!((d.action, d.rule), (Action::ShrinkVirtioMem { size: Bytes(512 * MIB) }, "memory.idle"));
        let low = s(0.0, 0.0, 900);
        let d = decide(&l, &state(&[idle, low, idle]), &vm, 1000);
        assert_eq!(d.action, Action::None, "one sample under 1 GiB holds it: {}", d.reason);
        let near_floor = Capacity { memory: Bytes(GIB + 128 * MIB), ..vm };
        let d = decide(&l, &state(&[idle, idle, idle]), &near_floor, 1000);
        assert_eq!(d.action, Action::ShrinkVirtioMem { size: Bytes(128 * MIB) }, "never below the floor");
        let at_floor = Capacity { memory: Bytes(GIB), ..vm };
        assert_eq!(decide(&l, &state(&[idle, idle, idle]), &at_floor, 1000).rule, "memory.at-min");
        // Without a shrink threshold, or without virtio-mem, nothing is taken away.
        assert_eq!(decide(&limits(), &state(&[idle, idle, idle]), &vm, 1000).rule, "calm");
        assert_eq!(decide(&l, &state(&[idle, idle, idle]), &cap(), 1000).rule, "calm");
    }

    #[test]
    fn cooldown_backoff_and_in_flight_hold_actions() {
        let l = limits();
        let hot = s(80.0, 0.0, 900);
        let mut st = state(&[hot, hot, hot]);
        st.last_action_s = Some(990);
        assert_eq!(decide(&l, &st, &cap(), 1000).rule, "cooldown");
        assert_eq!(decide(&l, &st, &cap(), 1050).rule, "cpu.psi", "cooldown over");
        st.backoff_until_s = 2000;
        assert_eq!(decide(&l, &st, &cap(), 1500).rule, "backoff");
        st.in_flight = true;
        assert_eq!(decide(&l, &st, &cap(), 5000).rule, "in-flight");
    }

    #[test]
    fn absurd_guest_numbers_cannot_exceed_the_policy() {
        let p = Pressure {
            cpu_some: Some(vmplug_common::protocol::Psi { avg10: f64::INFINITY, avg60: 0.0, avg300: 0.0, total_us: 0 }),
            memory_some: Some(vmplug_common::protocol::Psi { avg10: 1e12, avg60: 0.0, avg300: 0.0, total_us: 0 }),
            memory_full: Some(vmplug_common::protocol::Psi { avg10: f64::NAN, avg60: 0.0, avg300: 0.0, total_us: 0 }),
            mem_total: Bytes(u64::MAX),
            mem_available: Bytes(0),
            load1: 1e9,
            load5: 0.0,
            load15: 0.0,
            cpus_online: u32::MAX,
        };
        let sample = Sample::from(&p);
        assert_eq!((sample.cpu_some, sample.mem_some, sample.mem_full), (0.0, 100.0, 0.0));
        let st = state(&[sample, sample, sample]);
        let c = Capacity { vcpus: 4, memory: Bytes(4 * GIB), ..cap() };
        assert_eq!(decide(&limits(), &st, &c, 1000).action, Action::None, "at the policy's max nothing is added");
    }
}
