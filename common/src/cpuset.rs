//! `CpuSet`: the kernel's cpulist grammar (`0-3,8`) and libvirt's exclusion form
//! (`0-3,^1`), shared by host (`cpuset=`), guest (`/sys/devices/system/cpu/online`) and CLI.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The highest CPU id accepted. Bounds every allocation made from untrusted input.
pub const MAX_CPU_ID: u32 = 16_383;

/// Most elements one cpulist may have: one per possible id. A longer list can
/// only repeat itself, and is refused before any of it is applied.
pub const MAX_ELEMENTS: usize = MAX_CPU_ID as usize + 1;

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
    #[error("cpulist has more than {MAX_ELEMENTS} elements")]
    TooManyElements,
    #[error("CPU {cpu} does not exist on a host with {host_cpus} CPUs")]
    OutsideHost { cpu: u32, host_cpus: u32 },
}

/// A set of CPU ids: a bitmap, one bit per id up to [`MAX_CPU_ID`] (at most
/// 2 KiB). Parsing and set operations are linear in the input and in words, never
/// in the ids a range spans, so a hostile cpulist cannot cost more than its length.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuSet {
    /// Bit `i % 64` of word `i / 64` is CPU `i`. No trailing zero words, so
    /// equal sets are equal values.
    words: Vec<u64>,
}

impl CpuSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// CPUs `0..n`.
    pub fn first_n(n: u32) -> Self {
        let mut set = CpuSet::new();
        if n > 0 {
            set.insert_range(0, n.min(MAX_CPU_ID + 1) - 1);
        }
        set
    }

    fn trim(&mut self) {
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
    }

    fn grow_to(&mut self, cpu: u32) {
        let need = cpu as usize / 64 + 1;
        if self.words.len() < need {
            self.words.resize(need, 0);
        }
    }

    /// Adds `cpu`; returns whether it was new. Ids above [`MAX_CPU_ID`] are not
    /// representable and are refused (returns false).
    pub fn insert(&mut self, cpu: u32) -> bool {
        if cpu > MAX_CPU_ID {
            return false;
        }
        self.grow_to(cpu);
        let (w, bit) = (cpu as usize / 64, 1u64 << (cpu % 64));
        let new = self.words[w] & bit == 0;
        self.words[w] |= bit;
        new
    }

    /// Adds `lo..=hi` (both at most [`MAX_CPU_ID`], `lo <= hi`) word by word.
    fn insert_range(&mut self, lo: u32, hi: u32) {
        debug_assert!(lo <= hi && hi <= MAX_CPU_ID);
        self.grow_to(hi);
        let (first, last) = (lo as usize / 64, hi as usize / 64);
        for w in first..=last {
            let from = if w == first { lo % 64 } else { 0 };
            let to = if w == last { hi % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - to)) & (u64::MAX << from);
            self.words[w] |= mask;
        }
    }

    pub fn contains(&self, cpu: u32) -> bool {
        self.words.get(cpu as usize / 64).is_some_and(|w| w & (1u64 << (cpu % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut rest = w;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                Some(i as u32 * 64 + bit)
            })
        })
    }

    pub fn max(&self) -> Option<u32> {
        let last = self.words.last()?;
        Some((self.words.len() as u32 - 1) * 64 + 63 - last.leading_zeros())
    }

    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.words.iter().enumerate().all(|(i, w)| w & !other.words.get(i).copied().unwrap_or(0) == 0)
    }

    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        let mut out = CpuSet {
            words: self.words.iter().enumerate().map(|(i, w)| w & !other.words.get(i).copied().unwrap_or(0)).collect(),
        };
        out.trim();
        out
    }

    pub fn union(&self, other: &CpuSet) -> CpuSet {
        let (long, short) = if self.words.len() >= other.words.len() { (self, other) } else { (other, self) };
        let mut out = long.clone();
        for (w, s) in out.words.iter_mut().zip(&short.words) {
            *w |= s;
        }
        out
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
    /// Ids above [`MAX_CPU_ID`] are dropped (they cannot be represented).
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut set = CpuSet::new();
        for cpu in iter {
            set.insert(cpu);
        }
        set
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
        let mut include = CpuSet::new();
        let mut exclude = CpuSet::new();
        if s.is_empty() {
            return Ok(CpuSet::new());
        }
        if s.bytes().filter(|&b| b == b',').count() >= MAX_ELEMENTS {
            return Err(CpuSetError::TooManyElements);
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
                include.insert_range(lo, hi);
            } else {
                include.insert(parse_cpu(element)?);
            }
        }
        Ok(include.difference(&exclude))
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

    /// Security finding 2: `0-16383,` repeated through a 256 KiB frame cost ~18 s
    /// of host CPU (every id of every range re-inserted). Such a list is refused by
    /// its element count; the longest accepted list is applied word by word.
    #[test]
    fn a_hostile_list_is_refused_and_the_longest_accepted_one_is_cheap() {
        let hostile = "0-16383,".repeat(32 * 1024);
        assert_eq!(hostile.parse::<CpuSet>(), Err(CpuSetError::TooManyElements));
        let longest = vec!["0-16383"; MAX_ELEMENTS].join(",");
        let set: CpuSet = longest.parse().expect("16384 elements are accepted");
        assert_eq!(set.len(), MAX_ELEMENTS);
        assert_eq!(set.to_string(), "0-16383");
    }

    #[test]
    fn set_operations_across_word_boundaries() {
        let a = set("60-70,200");
        let b = set("63-64,1000");
        assert_eq!(a.union(&b).to_string(), "60-70,200,1000");
        assert_eq!(a.difference(&b).to_string(), "60-62,65-70,200");
        assert_eq!(b.difference(&set("1000")).to_string(), "63-64");
        assert_eq!(set("1000").difference(&set("1000")), CpuSet::new(), "trailing words trimmed");
        assert!(set("63-64").is_subset(&a));
        assert!(!b.is_subset(&a));
        assert_eq!(a.max(), Some(200));
        assert_eq!(CpuSet::new().max(), None);
        assert_eq!(CpuSet::first_n(65).to_string(), "0-64");
        assert_eq!(CpuSet::first_n(0), CpuSet::new());
        assert!(!CpuSet::new().insert(MAX_CPU_ID + 1));
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
            let original: CpuSet = cpus.into_iter().collect();
            let parsed: CpuSet = original.to_string().parse().expect("own output parses");
            prop_assert_eq!(parsed, original);
        }

        #[test]
        fn cpumap_round_trip(cpus in proptest::collection::btree_set(0u32..256, 0..64)) {
            let original: CpuSet = cpus.into_iter().collect();
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
