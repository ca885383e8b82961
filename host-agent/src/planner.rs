//! Pure planners: vCPU increments and DIMM layouts, computed as data before
//! anything is applied.

use vmplug_common::{Bytes, MIB};

use crate::xml::DimmSpec;

/// Largest DIMM vmplug creates unless told otherwise; bigger requests are split.
pub const DEFAULT_MAX_DIMM: Bytes = Bytes(4096 * MIB);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("size {size} is not a multiple of {what} {unit}; use a multiple such as {up}{} or --round-up", or_down(.down))]
    Misaligned { size: Bytes, what: &'static str, unit: Bytes, down: Bytes, up: Bytes },
    #[error("size must be larger than zero")]
    Zero,
    #[error("rounding {size} up to {what} {unit} gives {up}, past the {ceiling} this request may reach")]
    RoundUpTooFar { size: Bytes, what: &'static str, unit: Bytes, up: Bytes, ceiling: Bytes },
    #[error("{what} is {unit}, larger than the largest DIMM allowed ({max_dimm}, --max-dimm): no DIMM can be both")]
    UnitOverMaxDimm { what: &'static str, unit: Bytes, max_dimm: Bytes },
    #[error("{needed} DIMMs are needed but only {free} memory slots are free")]
    NoSlots { needed: u32, free: u32 },
    #[error("guest NUMA node {0} does not exist (cells: {1})")]
    NoSuchNode(u32, String),
    #[error("the domain has no guest NUMA cell to place memory on")]
    NoCells,
}

fn or_down(down: &Bytes) -> String {
    if down.get() > 0 {
        format!(" or {down}")
    } else {
        String::new()
    }
}

/// The alignment unit for DIMMs: the guest's block size and, when hugepages back
/// the guest, the hugepage size (both powers of two, so the larger one).
pub fn alignment(block_size: u64, hugepage: Option<u64>) -> (u64, &'static str) {
    match hugepage {
        Some(h) if h > block_size => (h, "the hugepage size"),
        _ => (block_size, "the guest's memory block size"),
    }
}

/// How far a misaligned size may be rounded up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundUp {
    /// Not at all: a misaligned size is refused.
    No,
    /// Up to the next multiple of the unit, but never past this total. The unit
    /// comes from the guest: the ceiling is what keeps a guest from widening the
    /// request (a "block size" of 8 GiB must not turn 512 MiB into 8 GiB).
    UpTo(Bytes),
}

/// Checks (or rounds, within `round_up`'s ceiling) `size` to `unit`.
pub fn align(size: Bytes, unit: u64, what: &'static str, round_up: RoundUp) -> Result<Bytes, PlanError> {
    if size.get() == 0 {
        return Err(PlanError::Zero);
    }
    if size.is_multiple_of(unit) {
        return Ok(size);
    }
    // `None`: the next multiple is past u64 (a size no ceiling admits).
    let up = size.round_up(unit);
    match (round_up, up) {
        (RoundUp::UpTo(ceiling), Some(up)) if up <= ceiling => Ok(up),
        (RoundUp::UpTo(ceiling), up) => {
            Err(PlanError::RoundUpTooFar { size, what, unit: Bytes(unit), up: up.unwrap_or(Bytes(u64::MAX)), ceiling })
        }
        (RoundUp::No, up) => Err(PlanError::Misaligned {
            size,
            what,
            unit: Bytes(unit),
            down: Bytes(size.get() / unit * unit),
            up: up.unwrap_or(size),
        }),
    }
}

/// Splits `size` (already aligned to `unit`) into DIMMs no larger than `max_dimm`
/// and places them: all on `node` when given, else balanced over `cells`
/// (id, current memory), the least-filled cell first.
pub fn plan_dimms(
    size: Bytes,
    unit: u64,
    max_dimm: Bytes,
    node: Option<u32>,
    cells: &[(u32, Bytes)],
    free_slots: u32,
) -> Result<Vec<DimmSpec>, PlanError> {
    if cells.is_empty() {
        return Err(PlanError::NoCells);
    }
    if let Some(n) = node {
        if !cells.iter().any(|(id, _)| *id == n) {
            let ids: Vec<String> = cells.iter().map(|(id, _)| id.to_string()).collect();
            return Err(PlanError::NoSuchNode(n, ids.join(",")));
        }
    }
    if unit > max_dimm.get() {
        return Err(PlanError::UnitOverMaxDimm { what: "the alignment unit", unit: Bytes(unit), max_dimm });
    }
    let units = size.get() / unit;
    let max_units = max_dimm.get() / unit;
    let mut count = units.div_ceil(max_units);
    if node.is_none() {
        // Spread over the cells when there is enough to spread.
        count = count.max((cells.len() as u64).min(units));
    }
    if count > free_slots as u64 {
        return Err(PlanError::NoSlots { needed: count as u32, free: free_slots });
    }
    let mut fill: Vec<(u32, u64)> = cells.iter().map(|(id, m)| (*id, m.get())).collect();
    let mut out = Vec::new();
    for i in 0..count {
        // Even split in whole units; the first DIMMs take the remainder.
        let n_units = units / count + u64::from(i < units % count);
        let dimm_size = n_units * unit;
        let target = match node {
            Some(n) => n,
            None => {
                let (idx, _) = fill.iter().enumerate().min_by_key(|(_, (id, m))| (*m, *id)).expect("cells not empty");
                fill[idx].1 += dimm_size;
                fill[idx].0
            }
        };
        out.push(DimmSpec { size: Bytes(dimm_size), node: target });
    }
    // Pieces that landed on the same node become one DIMM where the size allows:
    // slots are scarce.
    let mut merged: Vec<DimmSpec> = Vec::new();
    for d in out {
        match merged.iter_mut().find(|m| m.node == d.node && m.size.get() + d.size.get() <= max_dimm.get()) {
            Some(m) => m.size = Bytes(m.size.get() + d.size.get()),
            None => merged.push(d),
        }
    }
    Ok(merged)
}

/// vCPU steps from `current` to `target`, one socket's worth at a time, so the
/// guest never sees a half-populated socket (the guide's "multiple of cores").
pub fn plan_vcpus(current: u32, target: u32, per_socket: u32) -> Vec<u32> {
    let step = per_socket.max(1);
    let mut out = Vec::new();
    let mut at = current;
    while at < target {
        at = (at + step).min(target);
        out.push(at);
    }
    if target < current {
        out.push(target);
    }
    out
}

/// How many of `dimms` (sizes, in attach order) go into each wave so that no
/// wave is larger than 32 times what the guest has available when it starts
/// (the guide's scale rule: the kernel builds a new block's page structures in
/// memory it already has, about 1/64 of the block). After a wave the guest is
/// expected to have the wave's memory more, less its page structures; the
/// caller measures it again before the next wave and replans. With
/// `memmap_on_memory` the structures come out of the new memory itself: one
/// wave. `None` when even the first DIMM is too large.
pub fn waves(dimms: &[u64], available: u64, memmap_on_memory: bool) -> Option<Vec<usize>> {
    if memmap_on_memory || dimms.is_empty() {
        return Some(vec![dimms.len()]);
    }
    let mut out = Vec::new();
    let (mut avail, mut i) = (available, 0);
    while i < dimms.len() {
        let budget = avail.saturating_mul(32);
        let (mut n, mut sum) = (0, 0u64);
        while i + n < dimms.len() && sum.saturating_add(dimms[i + n]) <= budget {
            sum += dimms[i + n];
            n += 1;
        }
        if n == 0 {
            return None;
        }
        out.push(n);
        i += n;
        avail = avail.saturating_add(sum - sum / 64);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmplug_common::GIB;

    const BLOCK: u64 = 128 * MIB;

    fn cells(list: &[(u32, u64)]) -> Vec<(u32, Bytes)> {
        list.iter().map(|&(id, mib)| (id, Bytes(mib * MIB))).collect()
    }

    fn sizes(d: &[DimmSpec]) -> Vec<(u64, u32)> {
        d.iter().map(|d| (d.size.mib(), d.node)).collect()
    }

    #[test]
    fn alignment_table() {
        let up = RoundUp::UpTo(Bytes(GIB));
        for (size_mib, round, want) in
            [(128, RoundUp::No, Ok(128)), (1024, RoundUp::No, Ok(1024)), (100, up, Ok(128)), (129, up, Ok(256))]
        {
            assert_eq!(align(Bytes(size_mib * MIB), BLOCK, "b", round).map(|b| b.mib()), want, "{size_mib}");
        }
        let err = align(Bytes(100 * MIB), BLOCK, "the guest's memory block size", RoundUp::No).expect_err("misaligned");
        assert_eq!(
            err.to_string(),
            "size 100 MiB is not a multiple of the guest's memory block size 128 MiB; use a multiple such as 128 MiB or --round-up"
        );
        assert_eq!(align(Bytes(0), BLOCK, "b", up), Err(PlanError::Zero));
        assert_eq!(alignment(BLOCK, Some(GIB)), (GIB, "the hugepage size"));
        assert_eq!(alignment(BLOCK, Some(2 * MIB)).0, BLOCK);
    }

    /// Security finding 1: a guest reporting an 8 GiB block size turned a 512 MiB
    /// step into an 8 GiB DIMM, past the policy, past --max-dimm.
    #[test]
    fn a_guest_block_size_cannot_widen_the_request() {
        let huge = 8 * GIB;
        let e = align(Bytes(512 * MIB), huge, "the guest's memory block size", RoundUp::UpTo(Bytes(GIB)))
            .expect_err("8 GiB is past the 1 GiB ceiling");
        assert!(matches!(e, PlanError::RoundUpTooFar { up: Bytes(u), .. } if u == huge), "{e}");
        assert!(e.to_string().contains("past the 1 GiB"), "{e}");
        let e = plan_dimms(Bytes(huge), huge, Bytes(4 * GIB), Some(0), &cells(&[(0, 512)]), 8)
            .expect_err("no DIMM of 8 GiB within --max-dimm 4 GiB");
        assert!(matches!(e, PlanError::UnitOverMaxDimm { .. }), "{e}");
        assert_eq!(align(Bytes(u64::MAX - 5), BLOCK, "b", RoundUp::UpTo(Bytes(u64::MAX))).ok(), None, "no wrap");
    }

    #[test]
    fn dimm_plans() {
        let two = cells(&[(0, 512), (1, 512)]);
        let one = cells(&[(0, 512)]);
        // (size MiB, node, max dimm MiB, cells, slots) -> [(MiB, node)]
        type Row<'a> = (u64, Option<u32>, u64, &'a [(u32, Bytes)], u32, Vec<(u64, u32)>);
        let table: Vec<Row> = vec![
            (128, None, 4096, &one, 8, vec![(128, 0)]),
            (1024, Some(0), 4096, &two, 8, vec![(1024, 0)]),
            (512, Some(1), 4096, &two, 8, vec![(512, 1)]),
            (1024, None, 4096, &two, 8, vec![(512, 0), (512, 1)]),
            (8192, Some(0), 4096, &two, 8, vec![(4096, 0), (4096, 0)]),
            (384, None, 4096, &two, 8, vec![(256, 0), (128, 1)]),
            (128, None, 4096, &two, 8, vec![(128, 0)]),
            (3072, Some(0), 1024, &one, 8, vec![(1024, 0), (1024, 0), (1024, 0)]),
        ];
        for (size, node, max, cells, slots, want) in table {
            let plan = plan_dimms(Bytes(size * MIB), BLOCK, Bytes(max * MIB), node, cells, slots).expect("plans");
            assert_eq!(sizes(&plan), want, "{size} MiB node {node:?}");
            assert_eq!(plan.iter().map(|d| d.size.get()).sum::<u64>(), size * MIB);
            assert!(plan.iter().all(|d| d.size.is_multiple_of(BLOCK)));
        }
    }

    #[test]
    fn balanced_placement_fills_the_emptier_cell_first() {
        let uneven = cells(&[(0, 2048), (1, 512)]);
        let plan = plan_dimms(Bytes(256 * MIB), BLOCK, Bytes(4096 * MIB), None, &uneven, 8).expect("plans");
        assert_eq!(sizes(&plan), vec![(256, 1)], "both halves go to the emptier cell, as one DIMM");
        let even = cells(&[(0, 512), (1, 512)]);
        let plan = plan_dimms(Bytes(512 * MIB), BLOCK, Bytes(4096 * MIB), None, &even, 8).expect("plans");
        assert_eq!(sizes(&plan), vec![(256, 0), (256, 1)]);
    }

    #[test]
    fn dimm_plan_errors() {
        let one = cells(&[(0, 512)]);
        assert_eq!(
            plan_dimms(Bytes(8192 * MIB), BLOCK, Bytes(1024 * MIB), Some(0), &one, 4),
            Err(PlanError::NoSlots { needed: 8, free: 4 })
        );
        assert_eq!(
            plan_dimms(Bytes(128 * MIB), BLOCK, Bytes(GIB), Some(3), &one, 4),
            Err(PlanError::NoSuchNode(3, "0".into()))
        );
        assert_eq!(plan_dimms(Bytes(128 * MIB), BLOCK, Bytes(GIB), None, &[], 4), Err(PlanError::NoCells));
    }

    #[test]
    fn vcpu_steps_follow_sockets() {
        assert_eq!(plan_vcpus(1, 4, 1), vec![2, 3, 4]);
        assert_eq!(plan_vcpus(2, 8, 2), vec![4, 6, 8]);
        assert_eq!(plan_vcpus(2, 7, 2), vec![4, 6, 7]);
        assert_eq!(plan_vcpus(4, 4, 2), Vec::<u32>::new());
        assert_eq!(plan_vcpus(4, 2, 1), vec![2]);
    }

    /// A 4 GiB guest with 1 GiB available takes 64 GiB in two waves (32 GiB,
    /// then the rest, which what the first made available allows), each within
    /// 1:32 of what it had.
    #[test]
    fn waves_grow_with_what_each_wave_made_available() {
        let g = 1u64 << 30;
        let dimms = vec![4 * g; 16];
        let w = waves(&dimms, g, false).expect("fits");
        assert_eq!(w.iter().sum::<usize>(), 16);
        assert_eq!(w[0], 8, "32 GiB first: 1 GiB × 32");
        let mut avail = g;
        let mut at = 0;
        for n in &w {
            let sum: u64 = dimms[at..at + n].iter().sum();
            assert!(sum <= avail * 32, "a wave of {sum} with {avail} available");
            avail += sum - sum / 64;
            at += n;
        }
        assert_eq!(w.len(), 2, "after 32 GiB the rest fits at once: {w:?}");
        assert_eq!(waves(&dimms, g, true), Some(vec![16]), "memmap_on_memory: one wave");
        assert_eq!(waves(&[4 * g], 64 << 20, false), None, "64 MiB available cannot take a 4 GiB DIMM (needs 128 MiB)");
        assert_eq!(waves(&[], 0, false), Some(vec![0]));
    }
}
