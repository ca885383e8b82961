//! The onlining engine: one pass over sysfs toward a target, synchronous and pure
//! apart from the [`AttrWriter`] it writes through (the kernel in production, a
//! simulated kernel in unit tests).
//!
//! Every write is retried a bounded number of times on EBUSY/EAGAIN and followed by
//! a re-read; every item gets an [`ItemOutcome`]. A resource already in the wanted state
//! (a udev rule or kernel auto-online got there first) is success, not an error.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::Duration;

use vmplug_common::protocol::{BlockResult, CpuResult, ItemOutcome, MemRange, ZonePolicy};
use vmplug_common::{BlockSize, Bytes, CpuSet};

use crate::sysfs::{Block, Sysfs, SysfsError};

/// Most blocks one request may name: 64 Ki blocks is 8 TiB at 128 MiB.
pub const MAX_REQUEST_BLOCKS: u64 = 65_536;

/// How sysfs attributes are written. The real kernel, or a simulation in tests.
pub trait AttrWriter: Send + Sync + std::fmt::Debug {
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
}

/// Writes through the filesystem: the real sysfs.
#[derive(Debug, Default)]
pub struct KernelWriter;

impl AttrWriter for KernelWriter {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        std::fs::write(path, value)
    }
}

#[derive(Debug, Clone)]
pub struct OnlinePolicy {
    /// Upper bound of movable:kernel online blocks for the `auto` zone policy.
    pub movable_ratio: f64,
    /// Attempts per write on EBUSY/EAGAIN.
    pub write_attempts: u32,
    /// Pause between attempts (multiplied by the attempt number).
    pub retry_pause: Duration,
}

impl Default for OnlinePolicy {
    fn default() -> Self {
        OnlinePolicy { movable_ratio: 3.0, write_attempts: 5, retry_pause: Duration::from_millis(20) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OnlineError {
    #[error("memory range at {start:#x} of {size} is not a whole number of blocks of {block_size}")]
    Misaligned { start: u64, size: Bytes, block_size: BlockSize },
    #[error("memory hot-plug is not available in this guest kernel (no /sys/devices/system/memory)")]
    NoMemoryHotplug,
    #[error("memory range at {start:#x} of {size} ends past the 64-bit physical address space")]
    OutOfRange { start: u64, size: Bytes },
    #[error("request names {0} memory blocks, more than the limit of {MAX_REQUEST_BLOCKS}")]
    TooManyBlocks(u64),
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
}

/// The guest-physical start of block `index`; saturates where no block can be
/// (indices from requests are checked by [`blocks_of`] never to get there).
pub fn block_start(index: u64, block_size: BlockSize) -> u64 {
    index.saturating_mul(block_size.get())
}

/// Block indices covered by `ranges`, checked for alignment and range.
pub fn blocks_of(ranges: &[MemRange], block_size: BlockSize) -> Result<Vec<u64>, OnlineError> {
    let bs = block_size.get();
    let mut total = 0u64;
    let mut out = Vec::new();
    for r in ranges {
        if r.start % bs != 0 || r.size.get() % bs != 0 || r.size.get() == 0 {
            return Err(OnlineError::Misaligned { start: r.start, size: r.size, block_size });
        }
        // The range must end inside the address space: then every block index in
        // it times the block size fits in a u64 (see `block_start`).
        if r.start.checked_add(r.size.get()).is_none() {
            return Err(OnlineError::OutOfRange { start: r.start, size: r.size });
        }
        let n = r.size.get() / bs;
        total = total.saturating_add(n);
        if total > MAX_REQUEST_BLOCKS {
            return Err(OnlineError::TooManyBlocks(total));
        }
        out.extend(r.start / bs..r.start / bs + n);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Counts used by the `auto` zone policy.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ZoneCounts {
    pub movable: u64,
    pub kernel: u64,
}

impl ZoneCounts {
    pub fn of(blocks: &[Block]) -> Self {
        let mut c = ZoneCounts::default();
        for b in blocks.iter().filter(|b| b.online) {
            if b.zones.first().map(String::as_str) == Some("Movable") {
                c.movable += 1;
            } else {
                c.kernel += 1;
            }
        }
        c
    }
}

/// The `state` value to write for an offline block under `policy`.
/// The state to write when an online block is outside the explicit zone asked
/// (`movable`, `kernel`); `None` when it is where it should be, or when the
/// policy leaves the zone to the agent or the kernel.
fn misplaced(zone: ZonePolicy, block: &Block) -> Option<&'static str> {
    let movable = block.zones.first().map(String::as_str) == Some("Movable");
    match zone {
        ZonePolicy::Movable if !movable => Some("online_movable"),
        ZonePolicy::Kernel if movable => Some("online_kernel"),
        _ => None,
    }
}

pub fn choose_state(policy: ZonePolicy, valid_zones: &[String], counts: ZoneCounts, ratio: f64) -> &'static str {
    let may_move = valid_zones.iter().any(|z| z == "Movable");
    let may_kernel = valid_zones.is_empty() || valid_zones.iter().any(|z| z != "Movable");
    match policy {
        ZonePolicy::Online => "online",
        ZonePolicy::Movable => "online_movable",
        ZonePolicy::Kernel => "online_kernel",
        ZonePolicy::Auto => {
            let under_bound = (counts.movable + 1) as f64 <= ratio * counts.kernel.max(1) as f64;
            if may_move && (under_bound || !may_kernel) {
                "online_movable"
            } else {
                "online_kernel"
            }
        }
    }
}

fn errno_outcome(e: &io::Error) -> ItemOutcome {
    ItemOutcome::Failed { errno: e.raw_os_error().unwrap_or(0), message: e.to_string() }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN))
}

/// Onlines and offlines through sysfs.
#[derive(Debug)]
pub struct Onliner {
    pub sysfs: Sysfs,
    pub policy: OnlinePolicy,
    writer: Box<dyn AttrWriter>,
    /// `block_size_bytes` is fixed for the kernel's lifetime: read it once.
    block_size: std::sync::OnceLock<BlockSize>,
}

impl Onliner {
    pub fn new(sysfs: Sysfs, policy: OnlinePolicy, writer: Box<dyn AttrWriter>) -> Self {
        Onliner { sysfs, policy, writer, block_size: std::sync::OnceLock::new() }
    }

    /// The guest's memory block size; `None` without memory hot-plug.
    pub fn block_size(&self) -> Result<Option<BlockSize>, SysfsError> {
        if let Some(bs) = self.block_size.get() {
            return Ok(Some(*bs));
        }
        let read = self.sysfs.block_size()?;
        if let Some(bs) = read {
            let _ = self.block_size.set(bs);
        }
        Ok(read)
    }

    /// Block indices covered by `ranges` (none for no ranges), checked for alignment.
    pub fn blocks_for(&self, ranges: &[MemRange]) -> Result<Vec<u64>, OnlineError> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        blocks_of(ranges, self.block_size()?.ok_or(OnlineError::NoMemoryHotplug)?)
    }

    /// Writes with bounded retries on transient errors.
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut attempt = 1;
        loop {
            match self.writer.write(path, value) {
                Ok(()) => return Ok(()),
                Err(e) if is_transient(&e) && attempt < self.policy.write_attempts => {
                    tracing::debug!(path = %path.display(), attempt, error = %e, "transient write failure, retrying");
                    std::thread::sleep(self.policy.retry_pause * attempt);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Brings one CPU online. Re-reads after the write.
    pub fn online_cpu(&self, id: u32) -> Result<ItemOutcome, SysfsError> {
        let Some(cpu) = self.sysfs.cpu(id)? else {
            return Ok(ItemOutcome::NotFound);
        };
        if cpu.online {
            return Ok(ItemOutcome::Already);
        }
        if let Err(e) = self.write(&self.sysfs.cpu_online_path(id), "1") {
            // Onlined by someone else meanwhile: already online, not a failure.
            return Ok(match self.sysfs.cpu(id)? {
                Some(c) if c.online => ItemOutcome::Already,
                _ => errno_outcome(&e),
            });
        }
        Ok(match self.sysfs.cpu(id)? {
            Some(c) if c.online => ItemOutcome::Done,
            Some(_) => ItemOutcome::Failed { errno: 0, message: format!("cpu{id} still offline after the write") },
            None => ItemOutcome::NotFound,
        })
    }

    pub fn offline_cpu(&self, id: u32) -> Result<ItemOutcome, SysfsError> {
        let Some(cpu) = self.sysfs.cpu(id)? else {
            return Ok(ItemOutcome::NotFound);
        };
        if !cpu.online {
            return Ok(ItemOutcome::Already);
        }
        if !cpu.hotpluggable {
            return Ok(ItemOutcome::Failed { errno: libc::EPERM, message: format!("cpu{id} cannot be offlined") });
        }
        if let Err(e) = self.write(&self.sysfs.cpu_online_path(id), "0") {
            return Ok(errno_outcome(&e));
        }
        Ok(match self.sysfs.cpu(id)? {
            Some(c) if !c.online => ItemOutcome::Done,
            Some(_) => ItemOutcome::Failed { errno: 0, message: format!("cpu{id} still online after the write") },
            None => ItemOutcome::Done,
        })
    }

    /// Onlines one block by policy; `counts` is updated for the next decision.
    pub fn online_block(
        &self,
        index: u64,
        zone: ZonePolicy,
        counts: &mut ZoneCounts,
    ) -> Result<BlockResult, SysfsError> {
        // The start is for the report; a block size that cannot be read does not
        // stop the onlining (the state write does not need it).
        let start = self.block_size().ok().flatten().map(|b| block_start(index, b)).unwrap_or(0);
        let result = |block: Option<&Block>, outcome| BlockResult {
            index,
            start,
            node: block.and_then(|b| b.node),
            zone: block.filter(|b| b.online).and_then(|b| b.zones.first().cloned()),
            outcome,
        };
        let Some(block) = self.sysfs.block(index)? else {
            return Ok(result(None, ItemOutcome::NotFound));
        };
        if block.online {
            // Onlined by the kernel or a udev rule first: an explicit zone is
            // enforced by taking the block offline and online again there.
            if let Some(state) = misplaced(zone, &block) {
                return Ok(self.rezone(index, &block, state, result));
            }
            return Ok(result(Some(&block), ItemOutcome::Already));
        }
        if !block.ready {
            // Still being registered by the kernel: not there yet for us.
            return Ok(result(None, ItemOutcome::NotFound));
        }
        let state = choose_state(zone, &block.zones, *counts, self.policy.movable_ratio);
        if let Err(e) = self.write(&self.sysfs.block_state_path(index), state) {
            // A udev rule or the kernel onlined it between our read and our write
            // (the kernel then answers EINVAL): already online, not a failure.
            return Ok(match self.sysfs.block(index)? {
                Some(b) if b.online => result(Some(&b), ItemOutcome::Already),
                _ => result(Some(&block), errno_outcome(&e)),
            });
        }
        let after = self.sysfs.block(index)?;
        let outcome = match &after {
            Some(b) if b.online => {
                if b.zones.first().map(String::as_str) == Some("Movable") {
                    counts.movable += 1;
                } else {
                    counts.kernel += 1;
                }
                ItemOutcome::Done
            }
            Some(b) => ItemOutcome::Failed {
                errno: 0,
                message: format!("memory{index} reads '{}' after writing {state}", b.state),
            },
            None => ItemOutcome::NotFound,
        };
        Ok(result(after.as_ref(), outcome))
    }

    /// Moves an online block to `state`'s zone. A block that cannot be emptied
    /// stays where it is and is reported there (`Already`, its zone): the host
    /// judges the zone. One that went offline but not back online is put back
    /// with a plain `online` and reported as failed.
    fn rezone(
        &self,
        index: u64,
        block: &Block,
        state: &str,
        result: impl Fn(Option<&Block>, ItemOutcome) -> BlockResult,
    ) -> BlockResult {
        if self.write(&self.sysfs.block_state_path(index), "offline").is_err() {
            return result(Some(block), ItemOutcome::Already);
        }
        let outcome = match self.write(&self.sysfs.block_state_path(index), state) {
            Ok(()) => ItemOutcome::Done,
            Err(e) => {
                let _ = self.write(&self.sysfs.block_state_path(index), "online");
                ItemOutcome::Failed {
                    errno: e.raw_os_error().unwrap_or(0),
                    message: format!("memory{index}: offline to move it, then {state} failed: {e}"),
                }
            }
        };
        let after = self.sysfs.block(index).ok().flatten();
        match (&outcome, &after) {
            (ItemOutcome::Done, Some(b)) if b.online => result(after.as_ref(), ItemOutcome::Done),
            (ItemOutcome::Done, _) => result(
                after.as_ref(),
                ItemOutcome::Failed { errno: 0, message: format!("memory{index} is not online after {state}") },
            ),
            _ => result(after.as_ref(), outcome),
        }
    }

    pub fn offline_block(&self, index: u64) -> Result<BlockResult, SysfsError> {
        let start = self.block_size()?.map(|b| block_start(index, b)).unwrap_or(0);
        let Some(block) = self.sysfs.block(index)?.filter(|b| b.ready) else {
            return Ok(BlockResult { index, start, node: None, zone: None, outcome: ItemOutcome::Already });
        };
        let result = |outcome| BlockResult { index, start, node: block.node, zone: None, outcome };
        if !block.online {
            return Ok(result(ItemOutcome::Already));
        }
        if let Err(e) = self.write(&self.sysfs.block_state_path(index), "offline") {
            return Ok(result(errno_outcome(&e)));
        }
        Ok(match self.sysfs.block(index)? {
            Some(b) if b.online => {
                result(ItemOutcome::Failed { errno: 0, message: format!("memory{index} still online after the write") })
            }
            _ => result(ItemOutcome::Done),
        })
    }

    /// One pass toward "at least `target` CPUs online", ascending. Returns a result
    /// for each of the lowest `target` present CPUs, plus `NotFound` for the ids the
    /// guest does not have yet.
    pub fn cpu_pass(&self, target: u32) -> Result<Vec<CpuResult>, SysfsError> {
        let cpus = self.sysfs.cpus()?;
        let mut online = cpus.iter().filter(|c| c.online).count() as u32;
        let mut out = Vec::new();
        for c in &cpus {
            if out.len() as u32 >= target {
                break;
            }
            let outcome = if c.online {
                ItemOutcome::Already
            } else if online < target {
                let o = self.online_cpu(c.id)?;
                if matches!(o, ItemOutcome::Done) {
                    online += 1;
                }
                o
            } else {
                continue;
            };
            out.push(CpuResult { cpu: c.id, outcome });
        }
        let present: CpuSet = cpus.iter().map(|c| c.id).collect();
        let possible = self.sysfs.cpu_facts().map(|f| f.possible).unwrap_or_default();
        let missing = possible.difference(&present);
        for cpu in missing.iter().take(target.saturating_sub(out.len() as u32) as usize) {
            out.push(CpuResult { cpu, outcome: ItemOutcome::NotFound });
        }
        Ok(out)
    }

    /// One pass over `blocks`, onlining every offline one.
    pub fn block_pass(&self, blocks: &[u64], zone: ZonePolicy) -> Result<Vec<BlockResult>, SysfsError> {
        // Only `auto` weighs the zones already in use (a read of every block).
        let mut counts = match zone {
            ZonePolicy::Auto if !blocks.is_empty() => ZoneCounts::of(&self.sysfs.blocks()?),
            _ => ZoneCounts::default(),
        };
        blocks.iter().map(|&i| self.online_block(i, zone, &mut counts)).collect()
    }

    /// Offlines the highest-numbered hot-pluggable CPUs until `target` are online.
    pub fn cpu_offline_pass(&self, target: u32) -> Result<Vec<CpuResult>, SysfsError> {
        let cpus = self.sysfs.cpus()?;
        let mut online = cpus.iter().filter(|c| c.online).count() as u32;
        let mut out = Vec::new();
        for c in cpus.iter().rev().filter(|c| c.online && c.hotpluggable) {
            if online <= target {
                break;
            }
            let outcome = self.offline_cpu(c.id)?;
            if matches!(outcome, ItemOutcome::Done) {
                online -= 1;
            }
            out.push(CpuResult { cpu: c.id, outcome });
        }
        Ok(out)
    }

    /// Onlines everything offline right now: the guide's shell loop, done
    /// properly. Each CPU and block stands alone: one that cannot be read is a
    /// failure in the report (with its errno), one the kernel has not finished
    /// creating is "not found" (so the report is not complete), and neither stops
    /// the others from being onlined.
    ///
    /// A kernel booted with `maxcpus=N` keeps its other CPUs offline on purpose
    /// (guest-level vCPU scaling, `vmplug setvcpus --guest`): CPUs are onlined
    /// only while fewer than N are online.
    pub fn online_everything(&self, zone: ZonePolicy) -> Result<(Vec<CpuResult>, Vec<BlockResult>), SysfsError> {
        let failed = |e: SysfsError| ItemOutcome::Failed { errno: e.errno(), message: e.to_string() };
        let mut cpus = Vec::new();
        let entries = self.sysfs.cpu_entries()?;
        let limit = self.sysfs.boot_cpu_limit();
        let mut online = entries.iter().filter(|(_, e)| matches!(e, Ok(Some(c)) if c.online)).count() as u32;
        for (id, entry) in entries {
            let outcome = match entry {
                Ok(Some(c)) if c.online => continue,
                Ok(Some(_)) if limit.is_some_and(|l| online >= l) => continue,
                Ok(Some(_)) => {
                    let o = self.online_cpu(id).unwrap_or_else(failed);
                    online += u32::from(matches!(o, ItemOutcome::Done | ItemOutcome::Already));
                    o
                }
                Ok(None) => ItemOutcome::NotFound,
                Err(e) => failed(e),
            };
            cpus.push(CpuResult { cpu: id, outcome });
        }
        let entries = self.sysfs.block_entries()?;
        let present: Vec<Block> = entries.iter().filter_map(|(_, e)| e.as_ref().ok().cloned().flatten()).collect();
        let mut counts = ZoneCounts::of(&present);
        let start = |index| self.block_size().ok().flatten().map(|b| block_start(index, b)).unwrap_or(0);
        let mut blocks = Vec::new();
        for (index, entry) in entries {
            let outcome = match entry {
                Ok(Some(b)) if b.online => continue,
                Ok(Some(_)) => match self.online_block(index, zone, &mut counts) {
                    Ok(r) => {
                        blocks.push(r);
                        continue;
                    }
                    Err(e) => failed(e),
                },
                Ok(None) => ItemOutcome::NotFound,
                Err(e) => failed(e),
            };
            blocks.push(BlockResult { index, start: start(index), node: None, zone: None, outcome });
        }
        Ok((cpus, blocks))
    }

    /// Bytes in online blocks.
    pub fn memory_online(&self) -> Result<Bytes, SysfsError> {
        let Some(bs) = self.block_size()? else {
            return Ok(Bytes(0));
        };
        // Blocks that cannot be read are not counted as online (they are reported
        // as failures where they matter).
        let entries = self.sysfs.block_entries()?;
        let n = entries.iter().filter(|(_, e)| matches!(e, Ok(Some(b)) if b.online)).count() as u64;
        Ok(Bytes(n.saturating_mul(bs.get())))
    }
}

/// Merges a later pass into earlier results: `Done` is kept (a re-read says
/// `Already` once we onlined it), anything else is replaced by the newer outcome.
pub fn merge<K: Ord + Copy, T: Clone>(
    acc: &mut BTreeMap<K, T>,
    new: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> K,
    outcome: impl Fn(&T) -> &ItemOutcome,
) {
    for item in new {
        let k = key(&item);
        match acc.get(&k) {
            Some(old)
                if matches!(outcome(old), ItemOutcome::Done) && matches!(outcome(&item), ItemOutcome::Already) => {}
            _ => {
                acc.insert(k, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeKernel;
    use vmplug_common::MIB;

    fn setup(possible: u32) -> (tempfile::TempDir, FakeKernel, Onliner) {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = FakeKernel::new(dir.path(), possible);
        let policy = OnlinePolicy { retry_pause: Duration::from_millis(1), ..OnlinePolicy::default() };
        let o = Onliner::new(k.sysfs(), policy, k.writer());
        (dir, k, o)
    }

    #[test]
    fn block_size_is_read_as_hex() {
        let (_d, _k, o) = setup(4);
        assert_eq!(o.sysfs.block_size().expect("readable").map(|b| b.get()), Some(128 * MIB));
    }

    #[test]
    fn cpu0_without_online_file_is_online_and_not_offlinable() {
        let (_d, k, o) = setup(4);
        let cpu0 = o.sysfs.cpu(0).expect("readable").expect("present");
        assert!(cpu0.online && !cpu0.hotpluggable);
        assert!(matches!(o.offline_cpu(0).expect("readable"), ItemOutcome::Failed { errno: libc::EPERM, .. }));
        assert!(k.writes().is_empty(), "nothing written to cpu0");
    }

    #[test]
    fn cpus_online_ascending_to_a_total_target() {
        let (_d, k, o) = setup(4);
        k.add_cpu(1, true);
        k.add_cpu(2, false);
        k.add_cpu(3, false);
        let r = o.cpu_pass(3).expect("pass");
        let got: Vec<_> = r.iter().map(|c| (c.cpu, c.outcome.clone())).collect();
        assert_eq!(got, vec![(0, ItemOutcome::Already), (1, ItemOutcome::Already), (2, ItemOutcome::Done)]);
        assert_eq!(k.writes().len(), 1, "only cpu2 written");
        assert_eq!(o.sysfs.cpu_facts().expect("facts").online.to_string(), "0-2");
        // Idempotent: the same target again writes nothing.
        let again = o.cpu_pass(3).expect("pass");
        assert!(again.iter().all(|c| c.outcome == ItemOutcome::Already));
        assert_eq!(k.writes().len(), 1);
    }

    #[test]
    fn missing_cpus_are_not_found_with_their_ids() {
        let (_d, _k, o) = setup(4);
        let r = o.cpu_pass(3).expect("pass");
        let got: Vec<_> = r.iter().map(|c| (c.cpu, c.outcome.clone())).collect();
        assert_eq!(got, vec![(0, ItemOutcome::Already), (1, ItemOutcome::NotFound), (2, ItemOutcome::NotFound)]);
    }

    #[test]
    fn failed_write_carries_the_errno_after_bounded_retries() {
        let (_d, k, o) = setup(2);
        k.add_cpu(1, false);
        k.fail_writes(o.sysfs.cpu_online_path(1), &[libc::EBUSY; 10]);
        let outcome = o.online_cpu(1).expect("readable");
        assert!(matches!(outcome, ItemOutcome::Failed { errno: libc::EBUSY, .. }), "{outcome:?}");
        assert_eq!(k.writes().len(), 5, "write_attempts bounds the retries");
    }

    #[test]
    fn transient_errors_are_retried_to_success() {
        let (_d, k, o) = setup(2);
        k.add_cpu(1, false);
        k.fail_writes(o.sysfs.cpu_online_path(1), &[libc::EAGAIN, libc::EBUSY]);
        assert_eq!(o.online_cpu(1).expect("readable"), ItemOutcome::Done);
        assert_eq!(k.writes().len(), 3);
    }

    #[test]
    fn einval_is_not_retried() {
        let (_d, k, o) = setup(2);
        k.add_block(8, false, "Normal Movable", 0);
        k.fail_writes(o.sysfs.block_state_path(8), &[libc::EINVAL]);
        let r = o.block_pass(&[8], ZonePolicy::Auto).expect("pass");
        assert!(matches!(r[0].outcome, ItemOutcome::Failed { errno: libc::EINVAL, .. }));
        assert_eq!(k.writes().len(), 1);
    }

    #[test]
    fn already_online_blocks_are_not_written() {
        let (_d, k, o) = setup(2);
        k.add_block(8, true, "Normal", 0);
        let r = o.block_pass(&[8], ZonePolicy::Auto).expect("pass");
        assert_eq!(r[0].outcome, ItemOutcome::Already);
        assert_eq!(r[0].zone.as_deref(), Some("Normal"));
        assert!(k.writes().is_empty());
    }

    /// A kernel that onlines by itself (trixie, openEuler) put the block in
    /// Normal: an explicit `movable` moves it; a block in use stays and says where.
    #[test]
    fn an_explicit_zone_is_enforced_on_a_block_the_kernel_onlined() {
        let (_d, k, o) = setup(2);
        k.add_block(8, true, "Normal", 0);
        let r = o.block_pass(&[8], ZonePolicy::Movable).expect("pass");
        assert_eq!((r[0].outcome.clone(), r[0].zone.as_deref()), (ItemOutcome::Done, Some("Movable")));
        let writes: Vec<String> = k.writes().into_iter().map(|(_, v)| v).collect();
        assert_eq!(writes, ["offline", "online_movable"]);
        // In use: offlining fails with EBUSY every time; nothing else is written.
        k.add_block(9, true, "Normal", 0);
        k.fail_writes(k.sysfs().block_state_path(9), &[libc::EBUSY; 8]);
        let r = o.block_pass(&[9], ZonePolicy::Movable).expect("pass");
        assert_eq!((r[0].outcome.clone(), r[0].zone.as_deref()), (ItemOutcome::Already, Some("Normal")));
        assert!(k.writes().iter().skip(2).all(|(_, v)| v == "offline"), "{:?}", k.writes());
        // `auto` leaves the kernel's choice alone.
        k.add_block(10, true, "Normal", 0);
        let before = k.writes().len();
        let r = o.block_pass(&[10], ZonePolicy::Auto).expect("pass");
        assert_eq!(r[0].outcome, ItemOutcome::Already);
        assert_eq!(k.writes().len(), before);
    }

    /// The openEuler rule racing the agent: the rule onlines the block between
    /// the agent's read and its write, and the kernel answers the agent EINVAL.
    /// Found by the end-to-end race; it is `already`, not a failure.
    #[test]
    fn a_block_onlined_by_someone_else_mid_write_is_already_online() {
        let (_d, k, o) = setup(2);
        k.add_block(8, false, "Normal Movable", 0);
        k.race_write(k.sysfs().block_state_path(8), "online\n", libc::EINVAL);
        let r = o.block_pass(&[8], ZonePolicy::Auto).expect("pass");
        assert_eq!(r[0].outcome, ItemOutcome::Already, "{r:?}");
        // The same for a CPU the rule onlined first.
        k.add_cpu(1, false);
        k.race_write(k.sysfs().cpu_online_path(1), "1\n", libc::EINVAL);
        assert_eq!(o.online_cpu(1).expect("result"), ItemOutcome::Already);
        // A write that fails with the block still offline is still a failure.
        k.add_block(9, false, "Normal Movable", 0);
        k.fail_writes(k.sysfs().block_state_path(9), &[libc::EINVAL]);
        let r = o.block_pass(&[9], ZonePolicy::Auto).expect("pass");
        assert!(matches!(r[0].outcome, ItemOutcome::Failed { errno: 22, .. }), "{r:?}");
    }

    #[test]
    fn valid_zones_without_movable_goes_to_the_kernel_zone() {
        let (_d, k, o) = setup(2);
        k.add_block(8, false, "Normal", 0);
        let r = o.block_pass(&[8], ZonePolicy::Auto).expect("pass");
        assert_eq!((r[0].outcome.clone(), r[0].zone.as_deref()), (ItemOutcome::Done, Some("Normal")));
        assert_eq!(k.writes()[0].1, "online_kernel");
    }

    #[test]
    fn ratio_guard_switches_auto_to_the_kernel_zone() {
        let (_d, k, o) = setup(2);
        // One kernel block online: a 3:1 bound allows three movable blocks.
        k.add_block(0, true, "Normal", 0);
        for i in 8..13 {
            k.add_block(i, false, "Normal Movable", 0);
        }
        let r = o.block_pass(&[8, 9, 10, 11, 12], ZonePolicy::Auto).expect("pass");
        let zones: Vec<_> = r.iter().map(|b| b.zone.clone().unwrap_or_default()).collect();
        assert_eq!(zones, vec!["Movable", "Movable", "Movable", "Normal", "Movable"]);
        assert!(r.iter().all(|b| b.outcome == ItemOutcome::Done));
    }

    #[test]
    fn explicit_policies_write_what_they_say() {
        let (_d, k, o) = setup(2);
        k.add_block(8, false, "Normal Movable", 1);
        k.add_block(9, false, "Normal Movable", 1);
        k.add_block(10, false, "Normal Movable", 1);
        o.block_pass(&[8], ZonePolicy::Movable).expect("pass");
        o.block_pass(&[9], ZonePolicy::Kernel).expect("pass");
        let r = o.block_pass(&[10], ZonePolicy::Online).expect("pass");
        let written: Vec<_> = k.writes().into_iter().map(|(_, v)| v).collect();
        assert_eq!(written, vec!["online_movable", "online_kernel", "online"]);
        assert_eq!(r[0].node, Some(1));
    }

    #[test]
    fn no_memory_directory_is_a_capability_not_a_crash() {
        let (d, _k, o) = setup(2);
        std::fs::remove_dir_all(d.path().join("sys/devices/system/memory")).expect("rm");
        assert_eq!(o.sysfs.block_size().expect("ok"), None);
        assert_eq!(o.sysfs.memory_facts().expect("ok"), None);
        assert!(o.sysfs.blocks().expect("ok").is_empty());
        assert_eq!(o.memory_online().expect("ok"), Bytes(0));
    }

    #[test]
    fn misaligned_ranges_name_both_numbers() {
        let bs = BlockSize::new(128 * MIB).expect("pow2");
        let err = blocks_of(&[MemRange { start: 0x1_0000_0000, size: Bytes(100 * MIB) }], bs).expect_err("misaligned");
        let msg = err.to_string();
        assert!(msg.contains("100 MiB") && msg.contains("128 MiB"), "{msg}");
        assert_eq!(
            blocks_of(&[MemRange { start: 0x1_0000_0000, size: Bytes(256 * MIB) }], bs).expect("aligned"),
            vec![32, 33]
        );
        assert!(matches!(
            blocks_of(&[MemRange { start: 0, size: Bytes(u64::MAX / 2 + 1) }], bs),
            Err(OnlineError::TooManyBlocks(_)) | Err(OnlineError::Misaligned { .. })
        ));
    }

    /// Issue 14: one unreadable file stopped `vmplug-guest online` with no report
    /// and nothing onlined; a half-made entry was left out of a "complete" report.
    #[test]
    fn online_everything_reports_each_bad_entry_and_onlines_the_rest() {
        use std::os::unix::fs::symlink;
        let (d, k, o) = setup(4);
        let sys = d.path().join("sys/devices/system");
        k.add_cpu(1, false);
        k.add_cpu(2, false);
        std::fs::write(sys.join("cpu/cpu2/online"), "garbage\n").expect("garbage");
        std::fs::create_dir_all(sys.join("cpu/cpu3")).expect("a cpu without its online file");
        k.add_block(8, false, "Normal Movable", 0);
        k.add_block(9, false, "Normal Movable", 0);
        std::fs::remove_file(sys.join("memory/memory9/state")).expect("rm state");
        std::fs::create_dir(sys.join("memory/memory9/state")).expect("a state that is a directory");
        k.add_block(10, false, "Normal Movable", 0);
        std::fs::remove_file(sys.join("memory/memory10/state")).expect("rm state");
        symlink("/nonexistent", sys.join("memory/memory10/state")).expect("a dangling state link");
        std::fs::write(sys.join("memory/block_size_bytes"), "zzz\n").expect("a bad block size");

        let (cpus, blocks) = o.online_everything(ZonePolicy::Auto).expect("a report, not an error");
        let cpu = |id| cpus.iter().find(|c| c.cpu == id).map(|c| c.outcome.clone());
        assert_eq!(cpu(1), Some(ItemOutcome::Done), "the good CPU is onlined: {cpus:?}");
        assert!(matches!(cpu(2), Some(ItemOutcome::Failed { errno: libc::EINVAL, .. })), "{cpus:?}");
        assert_eq!(cpu(3), Some(ItemOutcome::NotFound), "{cpus:?}");
        let block = |i| blocks.iter().find(|b| b.index == i).map(|b| b.outcome.clone());
        assert_eq!(block(8), Some(ItemOutcome::Done), "the good block is onlined: {blocks:?}");
        assert!(matches!(block(9), Some(ItemOutcome::Failed { errno: libc::EISDIR, .. })), "{blocks:?}");
        assert_eq!(block(10), Some(ItemOutcome::NotFound), "{blocks:?}");
    }

    /// Guest-level vCPU scaling: a guest booted with `maxcpus=2` keeps its
    /// surplus vCPUs offline; the start-up onlining tops up to 2, no further.
    #[test]
    fn online_everything_respects_maxcpus() {
        let (d, k, o) = setup(4);
        for cpu in 1..4 {
            k.add_cpu(cpu, false);
        }
        std::fs::write(d.path().join("proc/cmdline"), "console=ttyAMA0 maxcpus=2 quiet\n").expect("cmdline");
        let (cpus, _) = o.online_everything(ZonePolicy::Auto).expect("report");
        assert_eq!(cpus.iter().map(|c| (c.cpu, c.outcome.clone())).collect::<Vec<_>>(), vec![(1, ItemOutcome::Done)]);
        assert_eq!(k.sysfs().cpu_facts().expect("facts").online.to_string(), "0-1");
        std::fs::write(d.path().join("proc/cmdline"), "console=ttyAMA0 quiet\n").expect("cmdline");
        o.online_everything(ZonePolicy::Auto).expect("report");
        assert_eq!(k.sysfs().cpu_facts().expect("facts").online.to_string(), "0-3", "no limit: all");
    }

    /// Security finding 4: this range passed validation and `index * block_size`
    /// overflowed (an abort in debug, a silent wrap in release).
    #[test]
    fn a_range_past_the_address_space_is_refused() {
        let bs = BlockSize::new(128 * MIB).expect("pow2");
        let r = MemRange { start: 0xffff_ffff_f800_0000, size: Bytes(256 * MIB) };
        assert!(matches!(blocks_of(&[r], bs), Err(OnlineError::OutOfRange { .. })), "{:?}", blocks_of(&[r], bs));
        let last = MemRange { start: 0xffff_ffff_f000_0000, size: Bytes(128 * MIB) };
        let idx = blocks_of(&[last], bs).expect("the last whole block is a valid range");
        assert_eq!(idx.len(), 1);
        assert_eq!(block_start(idx[0], bs), 0xffff_ffff_f000_0000);
        assert_eq!(block_start(u64::MAX, bs), u64::MAX, "saturates, never wraps");
    }

    #[test]
    fn a_block_not_yet_under_its_node_is_left_alone() {
        let (d, k, o) = setup(2);
        k.add_block(8, false, "Normal Movable", 0);
        std::fs::remove_dir(d.path().join("sys/devices/system/memory/memory8/node0")).expect("unlink node");
        // valid_zones must not even be read: make reading it an error.
        std::fs::remove_file(d.path().join("sys/devices/system/memory/memory8/valid_zones")).expect("rm");
        std::fs::create_dir(d.path().join("sys/devices/system/memory/memory8/valid_zones")).expect("dir");
        let r = o.block_pass(&[8], ZonePolicy::Auto).expect("pass");
        assert_eq!(r[0].outcome, ItemOutcome::NotFound);
        assert!(k.writes().is_empty());
    }

    #[test]
    fn offline_takes_highest_cpus_first() {
        let (_d, k, o) = setup(4);
        for i in 1..4 {
            k.add_cpu(i, true);
        }
        let r = o.cpu_offline_pass(2).expect("pass");
        assert_eq!(r.iter().map(|c| c.cpu).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(o.sysfs.cpu_facts().expect("facts").online.to_string(), "0-1");
    }

    #[test]
    fn everything_offline_is_onlined_like_the_guides_loop() {
        let (_d, k, o) = setup(4);
        k.add_cpu(1, false);
        k.add_block(8, false, "Normal Movable", 0);
        k.add_block(9, true, "Normal", 0);
        let (cpus, blocks) = o.online_everything(ZonePolicy::Auto).expect("pass");
        assert_eq!(cpus.len(), 1);
        assert_eq!(blocks.len(), 1, "already-online blocks are not touched");
        assert_eq!(blocks[0].outcome, ItemOutcome::Done);
    }
}
