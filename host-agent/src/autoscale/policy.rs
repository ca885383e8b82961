//! The autoscale policy file (TOML; unknown keys are errors), its limits as
//! numbers, and domain selection. Sizes are written as on the command line
//! (`512M`, `4G`) and parsed into `Bytes` by serde.

use serde::{Deserialize, Serialize};
use vmplug_common::{Bytes, GIB, MIB};

/// The samples kept per domain: `timing.sustain` may ask for at most this many
/// in a row (a larger one would never be met, and autoscale never act).
pub const KEPT_SAMPLES: usize = 32;

/// What autoscale moves memory in: whole 128 MiB blocks (x86's memory block
/// size); a `memory.step` under one would round to nothing.
pub const WHOLE_BLOCK: Bytes = Bytes(128 * MIB);

/// Sizes in the policy, as the CLI writes them (`512M`, `4G`; a bare number is
/// refused: see `vmplug_common::size::parse_size`).
mod size_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use vmplug_common::Bytes;

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s = String::deserialize(d)?;
        vmplug_common::size::parse_size(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Select {
    /// Exact domain names.
    pub names: Vec<String>,
    /// Shell-style globs (`*`, `?`).
    pub globs: Vec<String>,
    /// A `<vmplug:tag>` in the domain's metadata.
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CpuPolicy {
    pub max: u32,
    pub step: u32,
    /// PSI `cpu some avg10` (percent) at or above which vCPUs are added.
    pub psi_some_avg10: f64,
}

impl Default for CpuPolicy {
    fn default() -> Self {
        CpuPolicy { max: 4, step: 1, psi_some_avg10: 25.0 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryPolicy {
    #[serde(with = "size_str")]
    pub max: Bytes,
    #[serde(with = "size_str")]
    pub step: Bytes,
    pub psi_some_avg10: f64,
    pub psi_full_avg10: f64,
    /// Add memory when the guest's MemAvailable falls below this.
    #[serde(with = "size_str")]
    pub available_below: Bytes,
    /// virtio-mem domains only: give memory back when MemAvailable stays above
    /// this (and memory pressure below its thresholds). Unset: never shrink. Must
    /// be at least `available_below` + `step`, so that a shrink cannot land the
    /// guest under the grow threshold (no flapping).
    #[serde(default, with = "opt_size_str", skip_serializing_if = "Option::is_none")]
    pub shrink_available_above: Option<Bytes>,
    /// The floor: a shrink never takes the guest below this much memory.
    #[serde(with = "size_str")]
    pub min: Bytes,
}

/// An optional size in the policy.
mod opt_size_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use vmplug_common::Bytes;

    pub fn serialize<S: Serializer>(b: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.collect_str(b),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        let s = String::deserialize(d)?;
        vmplug_common::size::parse_size(&s).map(Some).map_err(serde::de::Error::custom)
    }
}

impl Default for MemoryPolicy {
    fn default() -> Self {
        MemoryPolicy {
            max: Bytes(4 * GIB),
            step: Bytes(512 * MIB),
            psi_some_avg10: 20.0,
            psi_full_avg10: 5.0,
            available_below: Bytes(128 * MIB),
            shrink_available_above: None,
            min: Bytes(GIB),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Seconds between samples.
    pub interval_s: u64,
    /// Consecutive samples over a threshold before acting.
    pub sustain: usize,
    /// Seconds after an action before the next one on the same domain.
    pub cooldown_s: u64,
    /// Seconds to back off after a failed action (doubles, capped at 10×).
    pub backoff_s: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { interval_s: 5, sustain: 3, cooldown_s: 60, backoff_s: 60 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostPolicy {
    /// Never plug memory that would leave the host less free memory than this.
    #[serde(with = "size_str")]
    pub memory_reserve: Bytes,
    /// Most vCPUs of running selected domains per host CPU.
    pub vcpu_overcommit: f64,
    /// Domains acted on at once per host.
    pub concurrency: usize,
}

impl Default for HostPolicy {
    fn default() -> Self {
        HostPolicy { memory_reserve: Bytes(GIB), vcpu_overcommit: 4.0, concurrency: 2 }
    }
}

/// The policy file (TOML; unknown keys are errors).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// libvirt URIs, one per host (default: the `-c` connection).
    pub uris: Vec<String>,
    pub select: Select,
    pub cpu: CpuPolicy,
    pub memory: MemoryPolicy,
    pub timing: Timing,
    pub host: HostPolicy,
    /// Also write changes into the persistent definition.
    pub persist: bool,
    /// Prometheus text endpoint, e.g. `127.0.0.1:9477`.
    pub metrics_listen: Option<String>,
    /// Alertmanager webhook receiver (`POST /alerts`), e.g. `127.0.0.1:9478`.
    pub webhook_listen: Option<String>,
}

/// Longest interval, cooldown or back-off a policy may set, in seconds (a week):
/// keeps every deadline computed from them far from overflowing.
pub const MAX_TIMING_S: u64 = 7 * 24 * 3600;

/// Most actions at once per host (`[host] concurrency`): far more than one
/// libvirtd serves at once (its `max_workers` defaults to 20), and far under
/// what a tokio semaphore can hold (a larger count panicked).
pub const MAX_CONCURRENCY: usize = 1024;

/// The policy with its sizes parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub cpu_max: u32,
    pub cpu_step: u32,
    pub cpu_psi: f64,
    pub mem_max: Bytes,
    pub mem_step: Bytes,
    pub mem_psi_some: f64,
    pub mem_psi_full: f64,
    pub available_below: Bytes,
    pub shrink_above: Option<Bytes>,
    pub mem_min: Bytes,
    pub sustain: usize,
    pub cooldown_s: u64,
    pub backoff_s: u64,
    pub memory_reserve: Bytes,
    pub vcpu_overcommit: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {0}")]
    Read(String, #[source] std::io::Error),
    #[error("policy {0}: {1}")]
    Parse(String, String),
    #[error("policy: {0}")]
    Invalid(String),
}

impl Policy {
    pub fn parse(name: &str, text: &str) -> Result<Policy, PolicyError> {
        toml::from_str(text).map_err(|e| PolicyError::Parse(name.into(), e.message().to_string()))
    }

    pub fn limits(&self) -> Result<Limits, PolicyError> {
        let l = Limits {
            cpu_max: self.cpu.max,
            cpu_step: self.cpu.step,
            cpu_psi: self.cpu.psi_some_avg10,
            mem_max: self.memory.max,
            mem_step: self.memory.step,
            mem_psi_some: self.memory.psi_some_avg10,
            mem_psi_full: self.memory.psi_full_avg10,
            available_below: self.memory.available_below,
            shrink_above: self.memory.shrink_available_above,
            mem_min: self.memory.min,
            sustain: self.timing.sustain,
            cooldown_s: self.timing.cooldown_s,
            backoff_s: self.timing.backoff_s,
            memory_reserve: self.host.memory_reserve,
            vcpu_overcommit: self.host.vcpu_overcommit,
        };
        if l.cpu_step == 0 || l.mem_step.get() == 0 {
            return Err(PolicyError::Invalid("steps must be larger than zero".into()));
        }
        self.check_bounds()?;
        if let Some(above) = l.shrink_above {
            let least = Bytes(l.available_below.get().saturating_add(l.mem_step.get()));
            if above < least {
                return Err(PolicyError::Invalid(format!(
                    "memory.shrink_available_above = {above} must be at least available_below + step = {least}: a shrink would land the guest under the grow threshold, and the two would take turns"
                )));
            }
        }
        for (what, v) in [
            ("timing.interval_s", self.timing.interval_s),
            ("timing.cooldown_s", l.cooldown_s),
            ("timing.backoff_s", l.backoff_s),
        ] {
            if v > MAX_TIMING_S {
                return Err(PolicyError::Invalid(format!("{what} = {v} is over {MAX_TIMING_S} (a week)")));
            }
        }
        for (what, v) in [
            ("cpu.psi_some_avg10", l.cpu_psi),
            ("memory.psi_some_avg10", l.mem_psi_some),
            ("memory.psi_full_avg10", l.mem_psi_full),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(PolicyError::Invalid(format!("{what} = {v} is not a percentage")));
            }
        }
        Ok(l)
    }

    /// Counts the daemon sizes things by, each within what it can use: a value
    /// beyond panicked (`concurrency`), or was accepted and never acted on
    /// (`sustain` over the samples kept, a step under one block).
    fn check_bounds(&self) -> Result<(), PolicyError> {
        use crate::prepare::MAX_VCPUS;
        let invalid = |m: String| Err(PolicyError::Invalid(m));
        let c = self.host.concurrency;
        if !(1..=MAX_CONCURRENCY).contains(&c) {
            return invalid(format!("host.concurrency = {c} is not within 1..={MAX_CONCURRENCY} actions at once"));
        }
        let n = self.timing.sustain;
        if n == 0 {
            return invalid("timing.sustain = 0: at least one sample must be over a threshold".into());
        }
        if n > KEPT_SAMPLES {
            return invalid(format!(
                "timing.sustain = {n} is over the {KEPT_SAMPLES} samples autoscale keeps per domain: it would never act"
            ));
        }
        for (what, v) in [("cpu.max", self.cpu.max), ("cpu.step", self.cpu.step)] {
            if v > MAX_VCPUS {
                return invalid(format!("{what} = {v} is over {MAX_VCPUS} vCPUs, KVM's most per VM"));
            }
        }
        let o = self.host.vcpu_overcommit;
        if !(o > 0.0 && o <= f64::from(MAX_VCPUS)) {
            return invalid(format!(
                "host.vcpu_overcommit = {o} is not a number of vCPUs per host CPU above 0 and at most {MAX_VCPUS}"
            ));
        }
        let step = self.memory.step;
        if step < WHOLE_BLOCK {
            return invalid(format!(
                "memory.step = {step} is under one {WHOLE_BLOCK} block: autoscale moves whole blocks, so it would never act"
            ));
        }
        Ok(())
    }

    /// Whether a domain is selected.
    pub fn selects(&self, name: &str, tags: &[String]) -> bool {
        self.select.names.iter().any(|n| n == name)
            || self.select.globs.iter().any(|g| glob(g, name))
            || self.select.tag.as_ref().is_some_and(|t| tags.contains(t))
    }
}

/// `*` and `?` globbing, in O(pattern × name) time at worst: on a mismatch
/// only the last `*` is retried (one position further), never every earlier
/// one, so no pattern backtracks exponentially.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parsing_and_selection() {
        let p = Policy::parse(
            "p.toml",
            "uris = ['qemu:///system']\n[select]\nnames = ['db1']\nglobs = ['web-*']\ntag = 'autoscale'\n[cpu]\nmax = 8\n[memory]\nmax = '16G'\n",
        )
        .expect("parses");
        assert!(p.selects("db1", &[]) && p.selects("web-7", &[]) && p.selects("x", &["autoscale".into()]));
        assert!(!p.selects("webx", &[]));
        assert_eq!(p.limits().expect("valid").mem_max, Bytes(16 * GIB));
        let err = Policy::parse("p.toml", "[cpu]\nmaximum = 3\n").expect_err("unknown key");
        assert!(err.to_string().contains("maximum"), "{err}");
        let bad = Policy::parse("p.toml", "[cpu]\npsi_some_avg10 = 150.0\n").expect("parses").limits();
        assert!(bad.is_err());
        assert!(glob("a*c?", "abbbcd") && !glob("a*c?", "abbbc"));
    }

    #[test]
    fn glob_cases() {
        for (p, s, want) in [
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("web-*", "web-", true),
            ("*b*c", "abxbc", true),
            ("a*b*c", "acb", false),
            ("??", "ab", true),
            ("??", "abc", false),
            ("*x", "xxxx", true),
            ("a**b", "ab", true),
        ] {
            assert_eq!(glob(p, s), want, "{p} ~ {s}");
        }
    }

    /// Security finding 9: `a*a*…*b` against `aaaa…` backtracked exponentially.
    /// Steps of the matcher are bounded by pattern × name; this pattern took
    /// minutes before and is answered at once now.
    #[test]
    fn a_pathological_glob_does_not_backtrack_exponentially() {
        let pattern = format!("{}b", "a*".repeat(30));
        let name = "a".repeat(60);
        assert!(!glob(&pattern, &name));
        assert!(glob(&"a*".repeat(30), &name));
    }

    /// Security finding 9: huge cooldown/backoff values overflowed deadlines.
    #[test]
    fn timing_values_are_bounded_and_deadlines_saturate() {
        use crate::autoscale::decision::tests::{cap, limits, s, state};
        use crate::autoscale::decision::{decide, DomainState};
        for key in ["cooldown_s", "backoff_s", "interval_s"] {
            let p = Policy::parse("p.toml", &format!("[timing]\n{key} = 9223372036854775807\n")).expect("parses");
            let err = p.limits().expect_err("refused");
            assert!(err.to_string().contains(key), "{err}");
        }
        let l = Limits { cooldown_s: MAX_TIMING_S, ..limits() };
        let hot = s(80.0, 0.0, 900);
        let st = DomainState { last_action_s: Some(u64::MAX - 5), ..state(&[hot, hot, hot]) };
        assert_eq!(decide(&l, &st, &cap(), 1000).rule, "cooldown");
    }

    #[test]
    fn sizes_are_parsed_by_serde_with_a_unit() {
        let p = Policy::parse("p.toml", "[memory]\nstep = '256M'\n[host]\nmemory_reserve = '2GiB'\n").expect("parses");
        assert_eq!((p.memory.step, p.host.memory_reserve), (Bytes(256 * MIB), Bytes(2 * GIB)));
        let e = Policy::parse("p.toml", "[memory]\nmax = '4096'\n").expect_err("no unit");
        assert!(e.to_string().contains("has no unit"), "{e}");
        let e = Policy::parse("p.toml", "[memory]\nmax = 'lots'\n").expect_err("not a size");
        assert!(e.to_string().contains("lots"), "{e}");
    }

    #[test]
    fn a_shrink_threshold_must_clear_the_grow_threshold_by_a_step() {
        let p = Policy::parse(
            "p.toml",
            "[memory]\nstep = '256M'\navailable_below = '128M'\nshrink_available_above = '256M'\n",
        )
        .expect("parses");
        let e = p.limits().expect_err("would flap");
        assert!(e.to_string().contains("384 MiB"), "{e}");
        let p = Policy::parse(
            "p.toml",
            "[memory]\nstep = '256M'\navailable_below = '128M'\nshrink_available_above = '1G'\nmin = '2G'\n",
        )
        .expect("parses");
        let l = p.limits().expect("valid");
        assert_eq!((l.shrink_above, l.mem_min), (Some(Bytes(GIB)), Bytes(2 * GIB)));
    }

    #[test]
    fn the_packaged_policy_parses_and_selects_nothing() {
        let p = Policy::parse("autoscale.toml", include_str!("../../autoscale.toml")).expect("parses");
        p.limits().expect("valid");
        assert!(!p.selects("anything", &[]), "nothing is selected until the operator names domains");
    }

    /// Security finding 8 (issue #26): `[host] concurrency = 2^62` panicked (a
    /// semaphore that large), `timing.sustain` over the 32 samples kept was
    /// accepted and never acted; the other counts had the same kind of hole.
    /// Each is refused naming the key, its value and the bound.
    #[test]
    fn counts_beyond_what_the_daemon_can_use_are_refused() {
        for (toml, says) in [
            (
                "[host]\nconcurrency = 4611686018427387904\n",
                "host.concurrency = 4611686018427387904 is not within 1..=1024",
            ),
            ("[host]\nconcurrency = 0\n", "host.concurrency = 0"),
            ("[timing]\nsustain = 33\n", "timing.sustain = 33 is over the 32 samples"),
            ("[timing]\nsustain = 0\n", "timing.sustain = 0"),
            ("[cpu]\nstep = 4294967295\n", "cpu.step = 4294967295 is over 4096"),
            ("[cpu]\nmax = 100000\n", "cpu.max = 100000 is over 4096"),
            ("[host]\nvcpu_overcommit = nan\n", "host.vcpu_overcommit = NaN"),
            ("[host]\nvcpu_overcommit = -1.0\n", "host.vcpu_overcommit = -1"),
            ("[host]\nvcpu_overcommit = inf\n", "host.vcpu_overcommit = inf"),
            ("[memory]\nstep = '64M'\n", "memory.step = 64 MiB is under one 128 MiB block"),
        ] {
            let p = Policy::parse("p.toml", toml).expect("parses");
            let e = p.limits().expect_err(toml);
            assert!(e.to_string().contains(says), "{toml}: {e}");
        }
        for toml in [
            "[host]\nconcurrency = 1024\n",
            "[timing]\nsustain = 32\n",
            "[cpu]\nmax = 4096\nstep = 4096\n",
            "[memory]\nstep = '128M'\n",
        ] {
            Policy::parse("p.toml", toml).expect("parses").limits().expect(toml);
        }
        // A host made from an unchecked policy still cannot panic.
        let conn = crate::fake::FakeConnection::new(include_str!("../../tests/fixtures/caps.xml"), vec![]);
        let host = crate::autoscale::Host::new("fake:///".into(), conn, 4611686018427387904);
        assert_eq!(host.actions.available_permits(), MAX_CONCURRENCY);
    }

    /// Security finding 8 (issue #26): with `sustain` at the kept window the
    /// daemon acts (the window is what `decide` can see).
    #[test]
    fn a_sustain_of_the_whole_kept_window_still_acts() {
        use crate::autoscale::decision::tests::{cap, s, state};
        use crate::autoscale::decision::{decide, Action};
        let l = Policy::parse("p.toml", "[timing]\nsustain = 32\n").expect("parses").limits().expect("valid");
        let hot = s(80.0, 0.0, 900);
        assert_eq!(
            decide(&l, &state(&[hot; crate::autoscale::decision::KEPT_SAMPLES]), &cap(), 1000).action,
            Action::AddVcpus { to: 3 }
        );
    }
}
