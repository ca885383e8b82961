//! Sizes as newtypes: `Bytes` with parsing of `128M`, `1G`, `1GiB`, `512MiB` and plain
//! bytes (binary units throughout, as libvirt and the kernel use), and `BlockSize`, the
//! guest's memory block size, which is a power of two by construction.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size '{0}' has no number")]
    NoNumber(String),
    #[error("size '{input}' has an unknown unit '{unit}' (use K, M, G, T, KiB, MiB, GiB, TiB or none)")]
    UnknownUnit { input: String, unit: String },
    #[error("size '{0}' does not fit in 64 bits")]
    Overflow(String),
    #[error("block size {0:#x} is not a power of two")]
    NotPowerOfTwo(u64),
    #[error("block size '{0}' is not a hexadecimal number")]
    NotHex(String),
}

/// A size in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    pub const fn from_mib(mib: u64) -> Self {
        Bytes(mib * MIB)
    }
    pub const fn from_kib(kib: u64) -> Self {
        Bytes(kib * KIB)
    }
    pub const fn get(self) -> u64 {
        self.0
    }
    pub const fn kib(self) -> u64 {
        self.0 / KIB
    }
    pub const fn mib(self) -> u64 {
        self.0 / MIB
    }
    /// Whether the size is a whole multiple of `unit` (a zero unit divides nothing).
    pub fn is_multiple_of(self, unit: u64) -> bool {
        unit != 0 && self.0.is_multiple_of(unit)
    }
    /// Rounds up to a multiple of `unit`.
    pub fn round_up(self, unit: u64) -> Option<Bytes> {
        if unit == 0 {
            return None;
        }
        self.0.checked_next_multiple_of(unit).map(Bytes)
    }
}

impl FromStr for Bytes {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        if digits.is_empty() {
            return Err(SizeError::NoNumber(s.to_string()));
        }
        let n: u64 = digits.parse().map_err(|_| SizeError::Overflow(s.to_string()))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" | "kb" => KIB,
            "m" | "mib" | "mb" => MIB,
            "g" | "gib" | "gb" => GIB,
            "t" | "tib" | "tb" => TIB,
            _ => return Err(SizeError::UnknownUnit { input: s.to_string(), unit: unit.trim().to_string() }),
        };
        n.checked_mul(mult).map(Bytes).ok_or_else(|| SizeError::Overflow(s.to_string()))
    }
}

/// A size as an operator writes it (command line, policy file): a number and a unit, binary multiples
/// (`512M` = `512MiB` = 512 × 2^20 bytes; K, M, G, T, optionally with `iB` or
/// `B`; `B` alone for bytes). A bare number is refused: virsh reads it as KiB,
/// other tools as bytes, and a wrong guess plugs a thousand times too much or too
/// little.
pub fn parse_size(s: &str) -> Result<Bytes, String> {
    if !s.trim().is_empty() && s.trim().chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("'{s}' has no unit: write {s}M, {s}G, {s}K or {s}B (binary multiples: 1G = 1024M)"));
    }
    s.parse::<Bytes>().map_err(|e| e.to_string())
}

impl fmt::Display for Bytes {
    /// The largest binary unit that divides the size exactly: `1 GiB`, `128 MiB`, `100 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, name) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
            if n != 0 && n.is_multiple_of(unit) {
                return write!(f, "{} {name}", n / unit);
            }
        }
        write!(f, "{n} B")
    }
}

/// The guest's memory block size (`/sys/devices/system/memory/block_size_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct BlockSize(u64);

impl BlockSize {
    pub fn new(bytes: u64) -> Result<Self, SizeError> {
        if bytes.is_power_of_two() {
            Ok(BlockSize(bytes))
        } else {
            Err(SizeError::NotPowerOfTwo(bytes))
        }
    }

    /// Parses sysfs's hexadecimal form, with or without `0x` (`8000000` is 128 MiB).
    pub fn from_sysfs_hex(s: &str) -> Result<Self, SizeError> {
        let t = s.trim();
        let t = t.strip_prefix("0x").unwrap_or(t);
        let bytes = u64::from_str_radix(t, 16).map_err(|_| SizeError::NotHex(s.trim().to_string()))?;
        BlockSize::new(bytes)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    pub const fn bytes(self) -> Bytes {
        Bytes(self.0)
    }
}

impl TryFrom<u64> for BlockSize {
    type Error = SizeError;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        BlockSize::new(v)
    }
}

impl From<BlockSize> for u64 {
    fn from(b: BlockSize) -> u64 {
        b.0
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#x})", Bytes(self.0), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_documented_form() {
        for (input, bytes) in [
            ("128M", 128 * MIB),
            ("1G", GIB),
            ("1GiB", GIB),
            ("512MiB", 512 * MIB),
            ("4096", 4096),
            ("2 g", 2 * GIB),
            ("1T", TIB),
            ("64KiB", 64 * KIB),
        ] {
            assert_eq!(input.parse::<Bytes>(), Ok(Bytes(bytes)), "{input}");
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!("G".parse::<Bytes>(), Err(SizeError::NoNumber(_))));
        assert!(matches!("1Q".parse::<Bytes>(), Err(SizeError::UnknownUnit { .. })));
        assert!(matches!("99999999999T".parse::<Bytes>(), Err(SizeError::Overflow(_))));
        assert!(matches!("1.5G".parse::<Bytes>(), Err(SizeError::UnknownUnit { .. })));
    }

    #[test]
    fn block_size_reads_sysfs_hex() {
        assert_eq!(BlockSize::from_sysfs_hex("8000000\n").map(|b| b.get()), Ok(128 * MIB));
        assert_eq!(BlockSize::from_sysfs_hex("0x80000000").map(|b| b.get()), Ok(2 * GIB));
        assert_eq!(BlockSize::from_sysfs_hex("6000000"), Err(SizeError::NotPowerOfTwo(0x6000000)));
        assert!(matches!(BlockSize::from_sysfs_hex("zz"), Err(SizeError::NotHex(_))));
    }

    #[test]
    fn displays_largest_exact_unit() {
        assert_eq!(Bytes(GIB).to_string(), "1 GiB");
        assert_eq!(Bytes(100 * MIB).to_string(), "100 MiB");
        assert_eq!(Bytes(1536 * MIB).to_string(), "1536 MiB");
        assert_eq!(Bytes(7).to_string(), "7 B");
    }

    #[test]
    fn alignment_helpers() {
        assert!(Bytes(GIB).is_multiple_of(128 * MIB));
        assert!(!Bytes(100 * MIB).is_multiple_of(128 * MIB));
        assert_eq!(Bytes(100 * MIB).round_up(128 * MIB), Some(Bytes(128 * MIB)));
    }

    proptest! {
        #[test]
        fn mib_round_trip(mib in 0u64..1_000_000) {
            prop_assert_eq!(format!("{mib}M").parse::<Bytes>(), Ok(Bytes(mib * MIB)));
        }
    }
}
