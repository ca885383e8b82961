//! A shrink forecast and the guest's veto: how much memory the guest could give
//! back now, by the kernel's own signals, and whether it agrees to give back what
//! the host means to take.
//!
//! A block can go now when it is offline already, or online in ZONE_MOVABLE
//! (`valid_zones` of an online block names its zone; the kernel keeps unmovable
//! and long-term pinned pages out of that zone) and `removable`. The pages of an
//! online block move to what stays, so no more than `MemAvailable` can go.

use std::collections::BTreeMap;

use vmplug_common::protocol::{DeviceForecast, DeviceKind, Forecast, ForecastRequest, MemRange, NodeForecast, Veto};
use vmplug_common::{BlockSize, Bytes};

use crate::online::{blocks_of, OnlineError};
use crate::sysfs::{Block, Sysfs};

/// The guest's own floors (`guest.toml`); zero turns one off.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Floors {
    /// `veto_min_available_mib`: MemAvailable must stay at least this after a shrink.
    pub min_available: Bytes,
    /// `veto_memory_pressure`: PSI memory `some avg10` (%) over which no shrink is agreed.
    pub memory_pressure: f64,
}

fn releasable(b: &Block) -> bool {
    !b.online || (b.removable && b.zones.first().map(String::as_str) == Some("Movable"))
}

fn describe_held(held: &BTreeMap<String, u64>) -> Option<String> {
    (!held.is_empty())
        .then(|| held.iter().map(|(zone, n)| format!("{n} block(s) online in {zone}")).collect::<Vec<_>>().join(", "))
}

fn device(
    sysfs: &Sysfs,
    kind: DeviceKind,
    range: &MemRange,
    bs: BlockSize,
    available: Bytes,
) -> Result<DeviceForecast, OnlineError> {
    let (mut present, mut offline, mut movable) = (0u64, 0u64, 0u64);
    let mut held: BTreeMap<String, u64> = BTreeMap::new();
    for index in blocks_of(std::slice::from_ref(range), bs)? {
        let Some(b) = sysfs.block(index)? else { continue };
        present += bs.get();
        if !b.online {
            offline += bs.get();
        } else if releasable(&b) {
            movable += bs.get();
        } else {
            let zone = b.zones.first().cloned().unwrap_or_else(|| "an unknown zone".into());
            let zone = if b.zones.first().map(String::as_str) == Some("Movable") {
                "Movable, not removable".into()
            } else {
                zone
            };
            *held.entry(zone).or_default() += 1;
        }
    }
    let mut held = describe_held(&held);
    let fits = movable <= available.get();
    let releasable = match kind {
        // A DIMM goes whole or not at all.
        DeviceKind::Dimm if held.is_none() && fits && present == range.size.get() => present,
        DeviceKind::Dimm => 0,
        DeviceKind::VirtioMem => offline + movable.min(available.get()),
    };
    if !fits && held.is_none() {
        held = Some(format!("MemAvailable ({available}) cannot take the pages of {}", Bytes(movable)));
    }
    if kind == DeviceKind::Dimm && present < range.size.get() && held.is_none() {
        held = Some(format!("only {} of {} present in the guest", Bytes(present), range.size));
    }
    Ok(DeviceForecast {
        kind,
        start: range.start,
        size: range.size,
        present: Bytes(present),
        releasable: Bytes(releasable),
        held,
    })
}

/// The forecast for `req` over the guest's current state; the veto when `floors`
/// would be broken by releasing `req.release`.
pub fn forecast(sysfs: &Sysfs, req: &ForecastRequest, floors: &Floors) -> Result<Forecast, OnlineError> {
    let bs = sysfs.block_size()?.ok_or(OnlineError::NoMemoryHotplug)?;
    let meminfo = sysfs.meminfo()?;
    let available = Bytes(meminfo.get("MemAvailable").copied().unwrap_or(0));
    let mut nodes: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for b in sysfs.blocks()?.iter().filter(|b| b.online) {
        let n = nodes.entry(b.node.unwrap_or(0)).or_default();
        n.0 += bs.get();
        if releasable(b) {
            n.1 += bs.get();
        }
    }
    let nodes = nodes
        .into_iter()
        .map(|(node, (online, movable))| NodeForecast {
            node,
            online: Bytes(online),
            releasable: Bytes(movable.min(available.get())),
        })
        .collect();
    let mut devices = Vec::new();
    for r in &req.dimms {
        devices.push(device(sysfs, DeviceKind::Dimm, r, bs, available)?);
    }
    for r in &req.virtio_mem {
        devices.push(device(sysfs, DeviceKind::VirtioMem, r, bs, available)?);
    }
    let veto = req.release.and_then(|release| veto(sysfs, floors, available, release));
    Ok(Forecast { block_size: bs, mem_available: available, nodes, devices, veto })
}

/// Whether releasing `release` would break one of the guest's floors.
pub fn veto(sysfs: &Sysfs, floors: &Floors, available: Bytes, release: Bytes) -> Option<Veto> {
    if floors.min_available.get() > 0 {
        let left = Bytes(available.get().saturating_sub(release.get()));
        if left < floors.min_available {
            return Some(Veto {
                floor: "min_available".into(),
                reason: format!(
                    "releasing {release} would leave MemAvailable at {left} (now {available}), under the guest's floor of {} (veto_min_available_mib)",
                    floors.min_available
                ),
            });
        }
    }
    if floors.memory_pressure > 0.0 {
        if let (Some(some), _) = sysfs.psi("memory") {
            if some.avg10 > floors.memory_pressure {
                return Some(Veto {
                    floor: "memory_pressure".into(),
                    reason: format!(
                        "memory pressure (PSI some avg10) is {:.2}%, over the guest's ceiling of {:.2}% (veto_memory_pressure)",
                        some.avg10, floors.memory_pressure
                    ),
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeKernel;
    use vmplug_common::MIB;

    const BLOCK: u64 = 128 * MIB;

    fn range(first: u64, blocks: u64) -> MemRange {
        MemRange { start: first * BLOCK, size: Bytes(blocks * BLOCK) }
    }

    fn set_available(k: &FakeKernel, mib: u64) {
        let kib = mib * 1024;
        std::fs::write(
            k.proc().join("meminfo"),
            format!("MemTotal: 4000000 kB\nMemFree: {kib} kB\nMemAvailable: {kib} kB\n"),
        )
        .expect("meminfo");
    }

    #[test]
    fn movable_and_offline_blocks_count_normal_ones_hold() {
        let d = tempfile::tempdir().expect("tempdir");
        let k = FakeKernel::new(d.path(), 2);
        set_available(&k, 2048);
        // Boot memory on node 0 (Normal), a DIMM at block 32 all Movable, a DIMM
        // at 40 with one Normal block, a virtio-mem region at 64 on node 1:
        // 2 Movable, 1 Normal, 1 offline, the rest absent.
        for i in 0..4 {
            k.add_block(i, true, "Normal", 0);
        }
        for i in 32..36 {
            k.add_block(i, true, "Movable", 0);
        }
        k.add_block(40, true, "Normal", 0);
        k.add_block(41, true, "Movable", 0);
        for i in 64..66 {
            k.add_block(i, true, "Movable", 1);
        }
        k.add_block(66, true, "Normal", 1);
        k.add_block(67, false, "Normal Movable", 1);
        let req =
            ForecastRequest { dimms: vec![range(32, 4), range(40, 2)], virtio_mem: vec![range(64, 16)], release: None };
        let f = forecast(&k.sysfs(), &req, &Floors::default()).expect("forecast");
        assert_eq!(f.block_size.get(), BLOCK);
        assert_eq!(f.devices[0].releasable, Bytes(4 * BLOCK), "all Movable: the whole DIMM");
        assert_eq!(f.devices[0].held, None);
        assert_eq!(f.devices[1].releasable, Bytes(0), "one Normal block holds the whole DIMM");
        assert_eq!(f.devices[1].held.as_deref(), Some("1 block(s) online in Normal"));
        let v = &f.devices[2];
        assert_eq!((v.kind, v.present, v.releasable), (DeviceKind::VirtioMem, Bytes(4 * BLOCK), Bytes(3 * BLOCK)));
        assert_eq!(f.nodes.len(), 2);
        assert_eq!((f.nodes[0].online, f.nodes[0].releasable), (Bytes(10 * BLOCK), Bytes(5 * BLOCK)));
        assert_eq!((f.nodes[1].online, f.nodes[1].releasable), (Bytes(3 * BLOCK), Bytes(2 * BLOCK)));
        assert_eq!(f.veto, None, "not asked");
    }

    #[test]
    fn no_more_than_memavailable_can_go() {
        let d = tempfile::tempdir().expect("tempdir");
        let k = FakeKernel::new(d.path(), 2);
        set_available(&k, 200);
        for i in 32..36 {
            k.add_block(i, true, "Movable", 0);
        }
        let req = ForecastRequest { dimms: vec![range(32, 4)], virtio_mem: vec![range(32, 4)], release: None };
        let f = forecast(&k.sysfs(), &req, &Floors::default()).expect("forecast");
        assert_eq!(f.devices[0].releasable, Bytes(0), "a DIMM whose pages cannot fit stays");
        assert!(f.devices[0].held.as_deref().is_some_and(|h| h.contains("MemAvailable")), "{:?}", f.devices[0]);
        assert_eq!(f.devices[1].releasable, Bytes(200 * MIB), "virtio-mem: up to MemAvailable");
        assert_eq!(f.nodes[0].releasable, Bytes(200 * MIB));
    }

    #[test]
    fn the_guest_vetoes_below_its_floors_and_says_why() {
        let d = tempfile::tempdir().expect("tempdir");
        let k = FakeKernel::new(d.path(), 2);
        set_available(&k, 1024);
        let floors = Floors { min_available: Bytes(512 * MIB), memory_pressure: 0.0 };
        let ask = |release: u64, floors: &Floors| {
            let req = ForecastRequest { dimms: vec![], virtio_mem: vec![], release: Some(Bytes(release * MIB)) };
            forecast(&k.sysfs(), &req, floors).expect("forecast").veto
        };
        assert_eq!(ask(512, &floors), None, "exactly at the floor is allowed");
        let v = ask(513, &floors).expect("below the floor: vetoed");
        assert_eq!(v.floor, "min_available");
        assert!(v.reason.contains("veto_min_available_mib"), "{}", v.reason);
        assert_eq!(ask(513, &Floors::default()), None, "no floors: no veto");
        std::fs::write(
            k.proc().join("pressure/memory"),
            "some avg10=12.50 avg60=3.00 avg300=1.00 total=99\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=9\n",
        )
        .expect("psi");
        let psi = Floors { min_available: Bytes(0), memory_pressure: 10.0 };
        let v = ask(1, &psi).expect("over the pressure ceiling: vetoed");
        assert_eq!(v.floor, "memory_pressure");
        assert!(v.reason.contains("12.50%"), "{}", v.reason);
        assert_eq!(ask(1, &Floors { memory_pressure: 20.0, ..psi }), None);
    }
}
