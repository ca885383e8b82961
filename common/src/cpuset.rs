//! `CpuSet`: the kernel's cpulist grammar (`0-3,8`) and libvirt's exclusion form
//! (`0-3,^1`), shared by host (`cpuset=`), guest (`/sys/devices/system/cpu/online`) and CLI.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The highest CPU id accepted. Bounds every allocation made from untrusted input.
pub const MAX_CPU_ID: u32 = 16_383;

/// Why a cpulist did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuSetError {
    #[error("'{0}' is not a CPU number")]
    NotANumber(String),
    #[error("range '{0}' ends before it starts")]
    BackwardsRange(String),
    #[error("CPU {0} is above the maximum CPU id {MAX_CPU_ID}")]
    TooLarge(u32),
    #[error("empty element in cpulist '{0}'")]
    EmptyElement(String),
    #[error("CPU {cpu} does not exist on a host with {host_cpus} CPUs")]
    OutsideHost { cpu: u32, host_cpus: u32 },
}

/// A set of CPU ids, kept sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuSet(BTreeSet<u32>);

impl CpuSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// CPUs `0..n`.
    pub fn first_n(n: u32) -> Self {
        Self((0..n).collect())
    }

    pub fn insert(&mut self, cpu: u32) -> bool {
        self.0.insert(cpu)
    }

    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    pub fn max(&self) -> Option<u32> {
        self.0.last().copied()
    }

    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.0.difference(&other.0).copied().collect())
    }

    pub fn union(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.0.union(&other.0).copied().collect())
    }

    /// libvirt's cpumap: one bit per host CPU, CPU 0 in the lowest bit of byte 0.
    /// Every member must be below `host_cpus`.
    pub fn to_cpumap(&self, host_cpus: u32) -> Result<Vec<u8>, CpuSetError> {
        let mut map = vec![0u8; host_cpus.div_ceil(8) as usize];
        for cpu in self.iter() {
            if cpu >= host_cpus {
                return Err(CpuSetError::OutsideHost { cpu, host_cpus });
            }
            map[(cpu / 8) as usize] |= 1 << (cpu % 8);
        }
        Ok(map)
    }

    /// The inverse of [`CpuSet::to_cpumap`].
    pub fn from_cpumap(map: &[u8]) -> Self {
        let mut set = CpuSet::new();
        for (byte_index, byte) in map.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    set.insert(byte_index as u32 * 8 + bit);
                }
            }
        }
        set
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        CpuSet(iter.into_iter().collect())
    }
}

fn parse_cpu(s: &str) -> Result<u32, CpuSetError> {
    let cpu: u32 = s.trim().parse().map_err(|_| CpuSetError::NotANumber(s.trim().to_string()))?;
    if cpu > MAX_CPU_ID {
        return Err(CpuSetError::TooLarge(cpu));
    }
    Ok(cpu)
}

impl FromStr for CpuSet {
    type Err = CpuSetError;

    /// Parses `0-3,8`, libvirt's `0-3,^1` (exclusions apply after all inclusions),
    /// and the empty list (the kernel writes `\n` for "no CPU").
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut include = BTreeSet::new();
        let mut exclude = BTreeSet::new();
        if s.is_empty() {
            return Ok(CpuSet::new());
        }
        for element in s.split(',') {
            let element = element.trim();
            if element.is_empty() {
                return Err(CpuSetError::EmptyElement(s.to_string()));
            }
            if let Some(excluded) = element.strip_prefix('^') {
                exclude.insert(parse_cpu(excluded)?);
            } else if let Some((lo, hi)) = element.split_once('-') {
                let (lo, hi) = (parse_cpu(lo)?, parse_cpu(hi)?);
                if hi < lo {
                    return Err(CpuSetError::BackwardsRange(element.to_string()));
                }
                include.extend(lo..=hi);
            } else {
                include.insert(parse_cpu(element)?);
            }
        }
        Ok(CpuSet(include.difference(&exclude).copied().collect()))
    }
}

impl fmt::Display for CpuSet {
    /// The kernel's compressed form: `0,2-3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut iter = self.iter().peekable();
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end += 1;
                iter.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for CpuSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(s: &str) -> CpuSet {
        s.parse().expect("valid cpulist")
    }

    #[test]
    fn parses_kernel_and_libvirt_forms() {
        assert_eq!(set("0-3,8").iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 8]);
        assert_eq!(set("0-3,^1").to_string(), "0,2-3");
        assert_eq!(set("^1,0-3").to_string(), "0,2-3");
        assert_eq!(set("0\n").to_string(), "0");
        assert!(set("\n").is_empty());
        assert_eq!(set(" 2 , 5-6 ").to_string(), "2,5-6");
    }

    #[test]
    fn rejects_bad_lists_with_specific_errors() {
        assert_eq!("3-1".parse::<CpuSet>(), Err(CpuSetError::BackwardsRange("3-1".into())));
        assert_eq!("a".parse::<CpuSet>(), Err(CpuSetError::NotANumber("a".into())));
        assert_eq!("1,,2".parse::<CpuSet>(), Err(CpuSetError::EmptyElement("1,,2".into())));
        assert_eq!("0-99999".parse::<CpuSet>(), Err(CpuSetError::TooLarge(99999)));
        assert_eq!("-1".parse::<CpuSet>(), Err(CpuSetError::NotANumber("".into())));
    }

    #[test]
    fn cpumap_bits_match_libvirt_layout() {
        assert_eq!(set("0,2-3").to_cpumap(4), Ok(vec![0b1101]));
        assert_eq!(set("9").to_cpumap(16), Ok(vec![0, 0b10]));
        assert_eq!(set("4").to_cpumap(4), Err(CpuSetError::OutsideHost { cpu: 4, host_cpus: 4 }));
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(cpus in proptest::collection::btree_set(0u32..512, 0..64)) {
            let original = CpuSet(cpus);
            let parsed: CpuSet = original.to_string().parse().expect("own output parses");
            prop_assert_eq!(parsed, original);
        }

        #[test]
        fn cpumap_round_trip(cpus in proptest::collection::btree_set(0u32..256, 0..64)) {
            let original = CpuSet(cpus);
            let map = original.to_cpumap(256).expect("all below 256");
            prop_assert_eq!(CpuSet::from_cpumap(&map), original);
        }

        /// The `cpulist` fuzz target's property: whatever parses prints back to a
        /// list that parses to the same set.
        #[test]
        fn parser_never_panics_and_what_parses_round_trips(s in "[0-9^,\\- ]{0,40}") {
            if let Ok(set) = s.parse::<CpuSet>() {
                prop_assert_eq!(set.to_string().parse::<CpuSet>(), Ok(set));
            }
        }
    }
}
