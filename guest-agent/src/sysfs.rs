//! Every read and write of the guest kernel's state, through injected roots.
//!
//! Logic never names `/sys` or `/proc`: a [`Sysfs`] value carries the roots, so unit
//! tests lay out a fake tree in a temp dir. Quirks encoded here: `block_size_bytes`
//! and `phys_index` are hex; `cpu0` often has no `online` file (online, and not
//! offlinable); `valid_zones` of an online block names the zone it is in.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use vmplug_common::protocol::{CpuFacts, MemoryFacts, Psi};
use vmplug_common::{BlockSize, Bytes, CpuSet, SizeError};

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: unexpected content '{content}'")]
    Parse { path: PathBuf, content: String },
    #[error("{path}: bad block size")]
    BlockSize { path: PathBuf, source: SizeError },
}

impl SysfsError {
    /// The errno a report carries for this failure (EINVAL for content the
    /// agent cannot read as what it should be).
    pub fn errno(&self) -> i32 {
        match self {
            SysfsError::Read { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            SysfsError::Parse { .. } | SysfsError::BlockSize { .. } => libc::EINVAL,
        }
    }
}

/// One numbered sysfs entry as a scan found it: complete, still being created or
/// removed (`Ok(None)`), or unreadable.
pub type Entry<T> = Result<Option<T>, SysfsError>;

/// The roots every path is built from.
#[derive(Debug, Clone)]
pub struct Sysfs {
    pub sys: PathBuf,
    pub proc: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs { sys: PathBuf::from("/sys"), proc: PathBuf::from("/proc") }
    }
}

/// State of one memory block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub index: u64,
    pub online: bool,
    /// The raw `state` content (`online`, `offline`, `going-offline`).
    pub state: String,
    /// `valid_zones` words: for an offline block what it may become, for an online
    /// block the zone it is in.
    pub zones: Vec<String>,
    pub node: Option<u32>,
    pub removable: bool,
    /// The kernel finished registering the block: it is linked under its NUMA
    /// node (or the kernel has no NUMA). Until then neither `valid_zones` nor
    /// `state` may be touched: Debian's 6.1 kernel dereferences the node of a
    /// block that has none yet and oopses (seen on `valid_zones` right after the
    /// `add` uevent).
    pub ready: bool,
}

/// State of one CPU directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    pub id: u32,
    pub online: bool,
    /// Has an `online` file (cpu0 often has none: always online).
    pub hotpluggable: bool,
}

pub fn read_string(path: &Path) -> Result<String, SysfsError> {
    fs::read_to_string(path).map_err(|source| SysfsError::Read { path: path.to_path_buf(), source })
}

fn parse_err(path: &Path, content: &str) -> SysfsError {
    SysfsError::Parse { path: path.to_path_buf(), content: content.trim().to_string() }
}

fn read_cpuset(path: &Path) -> Result<CpuSet, SysfsError> {
    let s = read_string(path)?;
    s.parse().map_err(|_| parse_err(path, &s))
}

/// Sorted numeric suffixes of the entries `prefixN` in `dir`.
fn numbered_entries(dir: &Path, prefix: &str) -> Result<Vec<u64>, SysfsError> {
    let rd = fs::read_dir(dir).map_err(|source| SysfsError::Read { path: dir.to_path_buf(), source })?;
    let mut ids: Vec<u64> =
        rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok()).collect();
    ids.sort_unstable();
    Ok(ids)
}

impl Sysfs {
    pub fn new(sys: impl Into<PathBuf>, proc: impl Into<PathBuf>) -> Self {
        Sysfs { sys: sys.into(), proc: proc.into() }
    }

    pub fn cpu_dir(&self) -> PathBuf {
        self.sys.join("devices/system/cpu")
    }

    pub fn memory_dir(&self) -> PathBuf {
        self.sys.join("devices/system/memory")
    }

    pub fn cpu_online_path(&self, cpu: u32) -> PathBuf {
        self.cpu_dir().join(format!("cpu{cpu}/online"))
    }

    pub fn block_state_path(&self, index: u64) -> PathBuf {
        self.memory_dir().join(format!("memory{index}/state"))
    }

    pub fn cpu_facts(&self) -> Result<CpuFacts, SysfsError> {
        let dir = self.cpu_dir();
        Ok(CpuFacts {
            possible: read_cpuset(&dir.join("possible"))?,
            present: read_cpuset(&dir.join("present"))?,
            online: read_cpuset(&dir.join("online"))?,
        })
    }

    /// Every `cpuN` directory and its state.
    pub fn cpus(&self) -> Result<Vec<Cpu>, SysfsError> {
        let mut out = Vec::new();
        for id in numbered_entries(&self.cpu_dir(), "cpu")? {
            let Ok(id) = u32::try_from(id) else { continue };
            // A CPU that vanished or is still being created is not there yet.
            if let Some(cpu) = self.cpu(id)? {
                out.push(cpu);
            }
        }
        Ok(out)
    }

    /// Every `cpuN` directory, each with its own result: one unreadable CPU does
    /// not hide the others.
    pub fn cpu_entries(&self) -> Result<Vec<(u32, Entry<Cpu>)>, SysfsError> {
        let ids = numbered_entries(&self.cpu_dir(), "cpu")?;
        Ok(ids.into_iter().filter_map(|id| u32::try_from(id).ok()).map(|id| (id, self.cpu(id))).collect())
    }

    /// Every `memoryN` directory, each with its own result.
    pub fn block_entries(&self) -> Result<Vec<(u64, Entry<Block>)>, SysfsError> {
        let dir = self.memory_dir();
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        Ok(numbered_entries(&dir, "memory")?.into_iter().map(|i| (i, self.block(i))).collect())
    }

    /// One CPU, `None` if its directory does not exist or is not complete yet.
    pub fn cpu(&self, id: u32) -> Result<Option<Cpu>, SysfsError> {
        let dir = self.cpu_dir().join(format!("cpu{id}"));
        if !dir.is_dir() {
            return Ok(None);
        }
        let online_path = dir.join("online");
        match fs::read_to_string(&online_path) {
            Ok(s) => match s.trim() {
                "1" => Ok(Some(Cpu { id, online: true, hotpluggable: true })),
                "0" => Ok(Some(Cpu { id, online: false, hotpluggable: true })),
                _ => Err(parse_err(&online_path, &s)),
            },
            // No `online` file: a CPU that cannot be offlined (cpu0) is in the online
            // list; any other is a directory the kernel has not finished creating
            // (attributes follow the directory) or is removing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let online = read_cpuset(&self.cpu_dir().join("online"))?;
                Ok(online.contains(id).then_some(Cpu { id, online: true, hotpluggable: false }))
            }
            Err(source) => Err(SysfsError::Read { path: online_path, source }),
        }
    }

    /// `None` when the kernel has no memory hot-plug support.
    pub fn block_size(&self) -> Result<Option<BlockSize>, SysfsError> {
        let path = self.memory_dir().join("block_size_bytes");
        match fs::read_to_string(&path) {
            Ok(s) => BlockSize::from_sysfs_hex(&s).map(Some).map_err(|source| SysfsError::BlockSize { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Read { path, source }),
        }
    }

    pub fn auto_online_blocks(&self) -> Option<String> {
        fs::read_to_string(self.memory_dir().join("auto_online_blocks")).ok().map(|s| s.trim().to_string())
    }

    /// One memory block, `None` if absent. A directory without its `state` file is
    /// a block the kernel is still creating (attributes follow the directory) or
    /// is removing: absent too, for now.
    pub fn block(&self, index: u64) -> Result<Option<Block>, SysfsError> {
        let dir = self.memory_dir().join(format!("memory{index}"));
        if !dir.is_dir() {
            return Ok(None);
        }
        let node = fs::read_dir(&dir).ok().and_then(|rd| {
            rd.filter_map(|e| e.ok()).find_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
        });
        let state_path = dir.join("state");
        let state = match fs::read_to_string(&state_path) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SysfsError::Read { path: state_path, source }),
        };
        let online = state == "online";
        let ready = online || node.is_some() || !self.has_numa();
        let zones = if ready {
            fs::read_to_string(dir.join("valid_zones"))
                .map(|s| s.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let removable = fs::read_to_string(dir.join("removable")).map(|s| s.trim() == "1").unwrap_or(false);
        Ok(Some(Block { index, online, state, zones, node, removable, ready }))
    }

    /// Whether the kernel has NUMA (node directories).
    pub fn has_numa(&self) -> bool {
        self.sys.join("devices/system/node").is_dir()
    }

    /// Every memory block. Empty when there is no memory directory.
    pub fn blocks(&self) -> Result<Vec<Block>, SysfsError> {
        let dir = self.memory_dir();
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for index in numbered_entries(&dir, "memory")? {
            if let Some(b) = self.block(index)? {
                out.push(b);
            }
        }
        Ok(out)
    }

    pub fn memory_facts(&self) -> Result<Option<MemoryFacts>, SysfsError> {
        let Some(block_size) = self.block_size()? else {
            return Ok(None);
        };
        let mut facts = MemoryFacts {
            block_size,
            blocks_online: 0,
            blocks_offline: 0,
            zones: BTreeMap::new(),
            auto_online_blocks: self.auto_online_blocks(),
        };
        for b in self.blocks()? {
            if b.online {
                facts.blocks_online += 1;
                let zone = b.zones.first().cloned().unwrap_or_else(|| "unknown".into());
                *facts.zones.entry(zone).or_default() += 1;
            } else {
                facts.blocks_offline += 1;
            }
        }
        Ok(Some(facts))
    }

    /// `/sys/firmware/acpi/hotplug/KIND/enabled`. A kernel without the KIND
    /// handler (CONFIG_ACPI_HOTPLUG_MEMORY unset, as on Debian's arm64) or booted
    /// without ACPI has no such file: `Some(false)`, since nothing would see an
    /// ACPI hot-plug. `None` only where sysfs itself is unreadable.
    pub fn acpi_hotplug(&self, kind: &str) -> Option<bool> {
        match fs::read_to_string(self.sys.join("firmware/acpi/hotplug").join(kind).join("enabled")) {
            Ok(s) => Some(s.trim() == "1"),
            Err(_) if self.sys.join("devices/system").is_dir() => Some(false),
            Err(_) => None,
        }
    }

    /// Devices bound to the virtio_mem driver (`virtioN` links in its sysfs
    /// directory); `None` when the driver is not loaded.
    pub fn virtio_mem_devices(&self) -> Option<u32> {
        let rd = fs::read_dir(self.sys.join("bus/virtio/drivers/virtio_mem")).ok()?;
        Some(rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("virtio")).count() as u32)
    }

    /// `/sys/module/memory_hotplug/parameters/memmap_on_memory` (`Y`/`N`; newer
    /// kernels may say `force`); `None` where the kernel has no such parameter.
    pub fn memmap_on_memory(&self) -> Option<bool> {
        let v = fs::read_to_string(self.sys.join("module/memory_hotplug/parameters/memmap_on_memory")).ok()?;
        Some(matches!(v.trim(), "Y" | "y" | "1" | "force"))
    }

    /// `/sys/devices/system/node/possible`: the nodes the kernel set up.
    pub fn numa_possible(&self) -> Option<CpuSet> {
        read_cpuset(&self.sys.join("devices/system/node/possible")).ok()
    }

    pub fn numa_nodes(&self) -> CpuSet {
        read_cpuset(&self.sys.join("devices/system/node/online")).unwrap_or_else(|_| CpuSet::first_n(1))
    }

    /// `/dev/virtio-ports/NAME` equivalent found via `/sys/class/virtio-ports/*/name`:
    /// the device name (`vport1p1`) whose port is called `name`.
    pub fn virtio_port_device(&self, name: &str) -> Option<String> {
        let rd = fs::read_dir(self.sys.join("class/virtio-ports")).ok()?;
        rd.filter_map(|e| e.ok()).find_map(|e| {
            let n = fs::read_to_string(e.path().join("name")).ok()?;
            (n.trim() == name).then(|| e.file_name().to_string_lossy().into_owned())
        })
    }

    /// `maxcpus=N` (or `nosmp`: 1) on the kernel's command line: how many CPUs
    /// the guest means to run with at boot.
    pub fn boot_cpu_limit(&self) -> Option<u32> {
        let cmdline = fs::read_to_string(self.proc.join("cmdline")).ok()?;
        cmdline.split_whitespace().find_map(|w| match w.split_once('=') {
            Some(("maxcpus", n)) => n.parse().ok(),
            None if w == "nosmp" => Some(1),
            _ => None,
        })
    }

    pub fn kernel_release(&self) -> String {
        fs::read_to_string(self.proc.join("sys/kernel/osrelease"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    }

    /// `/proc/meminfo` as key → bytes (values given in kB are converted).
    pub fn meminfo(&self) -> Result<BTreeMap<String, u64>, SysfsError> {
        let path = self.proc.join("meminfo");
        let s = read_string(&path)?;
        Ok(parse_meminfo(&s))
    }

    /// `(load1, load5, load15)`.
    pub fn loadavg(&self) -> Result<(f64, f64, f64), SysfsError> {
        let path = self.proc.join("loadavg");
        let s = read_string(&path)?;
        let mut it = s.split_whitespace().map(|w| w.parse::<f64>());
        match (it.next(), it.next(), it.next()) {
            (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => Ok((a, b, c)),
            _ => Err(parse_err(&path, &s)),
        }
    }

    /// `/proc/pressure/RESOURCE` lines `some` and `full`; `None` where PSI is off.
    pub fn psi(&self, resource: &str) -> (Option<Psi>, Option<Psi>) {
        match fs::read_to_string(self.proc.join("pressure").join(resource)) {
            Ok(s) => parse_psi(&s),
            Err(_) => (None, None),
        }
    }
}

pub fn parse_meminfo(s: &str) -> BTreeMap<String, u64> {
    s.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let mut words = rest.split_whitespace();
            let n: u64 = words.next()?.parse().ok()?;
            let mult = if words.next() == Some("kB") { 1024 } else { 1 };
            Some((key.trim().to_string(), n.saturating_mul(mult)))
        })
        .collect()
}

/// Parses PSI text into (some, full).
pub fn parse_psi(s: &str) -> (Option<Psi>, Option<Psi>) {
    let mut some = None;
    let mut full = None;
    for line in s.lines() {
        let mut words = line.split_whitespace();
        let kind = words.next();
        let mut psi = Psi { avg10: 0.0, avg60: 0.0, avg300: 0.0, total_us: 0 };
        for w in words {
            match w.split_once('=') {
                Some(("avg10", v)) => psi.avg10 = v.parse().unwrap_or(0.0),
                Some(("avg60", v)) => psi.avg60 = v.parse().unwrap_or(0.0),
                Some(("avg300", v)) => psi.avg300 = v.parse().unwrap_or(0.0),
                Some(("total", v)) => psi.total_us = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        match kind {
            Some("some") => some = Some(psi),
            Some("full") => full = Some(psi),
            _ => {}
        }
    }
    (some, full)
}

/// Hugepage size from meminfo's `Hugepagesize`.
pub fn hugepage_size(meminfo: &BTreeMap<String, u64>) -> Option<Bytes> {
    meminfo.get("Hugepagesize").copied().map(Bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &Path, content: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, content).expect("write");
    }

    /// The kernel creates a device's directory before its attribute files, and
    /// removes them in the other order: a half-made entry is "not there yet".
    #[test]
    fn half_created_blocks_and_cpus_are_absent_not_errors() {
        let d = tempfile::tempdir().expect("tempdir");
        let sys = Sysfs::new(d.path().join("sys"), d.path().join("proc"));
        let mem = d.path().join("sys/devices/system/memory");
        put(&mem.join("block_size_bytes"), "8000000\n");
        put(&mem.join("memory0/state"), "online\n");
        fs::create_dir_all(mem.join("memory32")).expect("mkdir");
        assert_eq!(sys.block(32).expect("no error"), None);
        assert_eq!(sys.blocks().expect("no error").len(), 1);
        let cpu = d.path().join("sys/devices/system/cpu");
        for f in ["possible", "present"] {
            put(&cpu.join(f), "0-3\n");
        }
        put(&cpu.join("online"), "0\n");
        fs::create_dir_all(cpu.join("cpu0")).expect("mkdir");
        fs::create_dir_all(cpu.join("cpu3")).expect("mkdir");
        let cpus = sys.cpus().expect("no error");
        assert_eq!(cpus, vec![Cpu { id: 0, online: true, hotpluggable: false }], "cpu3 has no online file yet");
    }

    /// Debian's arm64 kernel: ACPI processor hot-plug, no memory handler. The
    /// missing profile is a "no" (a DIMM would never be seen), not "unknown".
    #[test]
    fn a_missing_acpi_profile_is_no_not_unknown() {
        let d = tempfile::tempdir().expect("tempdir");
        let sys = Sysfs::new(d.path().join("sys"), d.path().join("proc"));
        assert_eq!(sys.acpi_hotplug("memory"), None, "no sysfs at all: unknown");
        put(&d.path().join("sys/devices/system/node/possible"), "0\n");
        put(&d.path().join("sys/firmware/acpi/hotplug/processor/enabled"), "1\n");
        assert_eq!(sys.acpi_hotplug("processor"), Some(true));
        assert_eq!(sys.acpi_hotplug("memory"), Some(false));
        assert_eq!(sys.numa_possible().map(|s| s.to_string()), Some("0".to_string()));
    }
}
