//! Queues follow CPUs: a multiqueue virtio-net device keeps the channel count it
//! was probed with (`virtio_net` picks min(online CPUs, queue pairs) at probe and
//! never again), so after a vCPU hot-plug the new CPUs get no queue of their own.
//! After CPUs go online or offline the agent sets every such device's combined
//! channels to the online CPU count, bounded by the device's maximum, through the
//! kernel's ethtool interface (`ETHTOOL_GCHANNELS`/`ETHTOOL_SCHANNELS` over
//! `SIOCETHTOOL`), as `ethtool -L DEV combined N` would.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmplug_common::protocol::{ItemOutcome, QueueChange, QueueState};

use crate::sysfs::Sysfs;

/// A device's channels as `ETHTOOL_GCHANNELS` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Channels {
    pub max_combined: u32,
    pub combined: u32,
}

/// The kernel's ethtool channel interface, or a simulation in tests.
pub trait ChannelControl: Send + Sync + std::fmt::Debug {
    fn get(&self, device: &str) -> io::Result<Channels>;
    fn set_combined(&self, device: &str, combined: u32) -> io::Result<()>;
}

const ETHTOOL_GCHANNELS: u32 = 0x0000_003c;
const ETHTOOL_SCHANNELS: u32 = 0x0000_003d;

/// `struct ethtool_channels` (include/uapi/linux/ethtool.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// `struct ifreq` with its union as `ifr_data` (the union is 24 bytes on
/// 64-bit targets, 16 on 32-bit: the padding covers both).
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 24],
}

/// The real kernel: one ioctl on a datagram socket per call.
#[derive(Debug, Default)]
pub struct Ethtool;

impl Ethtool {
    fn socket() -> io::Result<OwnedFd> {
        for family in [libc::AF_INET, libc::AF_UNIX] {
            // SAFETY: plain socket(2) call; the descriptor is owned right below.
            let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if fd >= 0 {
                // SAFETY: `fd` is a fresh descriptor nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        Err(io::Error::last_os_error())
    }

    fn call(device: &str, ch: &mut EthtoolChannels) -> io::Result<()> {
        let bytes = device.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut ifr = IfreqData { name: [0; libc::IFNAMSIZ], data: std::ptr::null_mut(), _pad: [0; 24] };
        for (d, s) in ifr.name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        ifr.data = (ch as *mut EthtoolChannels).cast();
        let sock = Self::socket()?;
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_channels its
        // `ifr_data` points to, both alive and correctly laid out for the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut ifr as *mut IfreqData) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl ChannelControl for Ethtool {
    fn get(&self, device: &str) -> io::Result<Channels> {
        let mut ch = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..Default::default() };
        Self::call(device, &mut ch)?;
        Ok(Channels { max_combined: ch.max_combined, combined: ch.combined_count })
    }

    fn set_combined(&self, device: &str, combined: u32) -> io::Result<()> {
        // SCHANNELS takes the whole set: read it, change only `combined`.
        let mut ch = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..Default::default() };
        Self::call(device, &mut ch)?;
        ch.cmd = ETHTOOL_SCHANNELS;
        ch.combined_count = combined;
        Self::call(device, &mut ch)
    }
}

impl Sysfs {
    /// Network interfaces bound to the `virtio_net` driver
    /// (`/sys/class/net/NAME/device/driver` → `…/virtio_net`), sorted.
    pub fn virtio_net_devices(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.sys.join("class/net")) else { return Vec::new() };
        let mut out: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| {
                fs::read_link(e.path().join("device/driver"))
                    .ok()
                    .and_then(|t| t.file_name().map(|n| n == "virtio_net"))
                    .unwrap_or(false)
            })
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        out.sort();
        out
    }
}

/// What one alignment pass found and did on one multiqueue device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aligned {
    pub state: QueueState,
    /// Whether the pass wrote (or tried to write) this device.
    pub changed: bool,
}

/// The combined channels a device of `max` should have with `cpus` online.
pub fn target(cpus: u32, max: u32) -> u32 {
    cpus.clamp(1, max.max(1))
}

/// Reads every multiqueue virtio-net device and, when `apply`, sets its combined
/// channels to [`target`]; each write is followed by a re-read. Devices with one
/// queue pair (nothing to spread) are left out.
pub fn align(sysfs: &Sysfs, ctl: &dyn ChannelControl, cpus: u32, apply: bool) -> Vec<Aligned> {
    let mut out = Vec::new();
    for device in sysfs.virtio_net_devices() {
        let now = match ctl.get(&device) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%device, error = %e, "cannot read channels");
                continue;
            }
        };
        if now.max_combined <= 1 {
            continue;
        }
        let want = target(cpus, now.max_combined);
        let mut state =
            QueueState { device: device.clone(), max: now.max_combined, combined: Some(now.combined), last: None };
        if !apply || now.combined == want {
            out.push(Aligned { state, changed: false });
            continue;
        }
        let outcome = match ctl.set_combined(&device, want) {
            Ok(()) => match ctl.get(&device) {
                Ok(c) if c.combined == want => {
                    state.combined = Some(c.combined);
                    ItemOutcome::Done
                }
                Ok(c) => {
                    state.combined = Some(c.combined);
                    ItemOutcome::Failed {
                        errno: libc::EIO,
                        message: format!("set {want} combined channels, the device reads back {}", c.combined),
                    }
                }
                Err(e) => {
                    state.combined = None;
                    ItemOutcome::Failed {
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                        message: format!("re-read: {e}"),
                    }
                }
            },
            Err(e) => ItemOutcome::Failed { errno: e.raw_os_error().unwrap_or(libc::EIO), message: e.to_string() },
        };
        match &outcome {
            ItemOutcome::Done => {
                tracing::info!(%device, from = now.combined, to = want, "combined channels follow the CPUs")
            }
            o => {
                tracing::warn!(%device, from = now.combined, to = want, outcome = ?o, "setting combined channels failed")
            }
        }
        state.last = Some(QueueChange { from: now.combined, to: want, outcome });
        out.push(Aligned { state, changed: true });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeKernel;

    #[test]
    fn the_target_is_the_online_cpus_bounded_by_the_device() {
        assert_eq!(target(2, 4), 2);
        assert_eq!(target(4, 4), 4);
        assert_eq!(target(8, 4), 4);
        assert_eq!(target(0, 4), 1);
    }

    #[test]
    fn only_virtio_net_interfaces_are_found() {
        let d = tempfile::tempdir().expect("tempdir");
        let k = FakeKernel::new(d.path(), 4);
        k.add_netdev("eth0", "virtio_net", 4, 2);
        k.add_netdev("eth1", "e1000", 4, 1);
        k.add_netdev("eth2", "virtio_net", 1, 1);
        assert_eq!(k.sysfs().virtio_net_devices(), vec!["eth0", "eth2"]);
    }

    #[test]
    fn channels_grow_and_shrink_with_the_cpus() {
        let d = tempfile::tempdir().expect("tempdir");
        let k = FakeKernel::new(d.path(), 8);
        k.add_netdev("eth0", "virtio_net", 4, 2);
        k.add_netdev("eth1", "virtio_net", 1, 1);
        let ctl = k.channels();
        let r = align(&k.sysfs(), &ctl, 4, true);
        assert_eq!(r.len(), 1, "the single-queue device is left out: {r:?}");
        assert_eq!(r[0].state.device, "eth0");
        assert_eq!(r[0].state.last, Some(QueueChange { from: 2, to: 4, outcome: ItemOutcome::Done }));
        assert_eq!(ctl.combined("eth0"), 4);
        // 8 CPUs: bounded by the device's 4; nothing to write.
        let r = align(&k.sysfs(), &ctl, 8, true);
        assert!(!r[0].changed && r[0].state.last.is_none(), "{r:?}");
        let r = align(&k.sysfs(), &ctl, 1, true);
        assert_eq!(r[0].state.last, Some(QueueChange { from: 4, to: 1, outcome: ItemOutcome::Done }));
        assert_eq!(ctl.combined("eth0"), 1);
        assert_eq!(ctl.sets(), vec![("eth0".to_string(), 4), ("eth0".to_string(), 1)]);
    }

    #[test]
    fn a_refused_write_says_why_and_read_only_changes_nothing() {
        let d = tempfile::tempdir().expect("tempdir");
        let k = FakeKernel::new(d.path(), 4);
        k.add_netdev("eth0", "virtio_net", 4, 1);
        let ctl = k.channels();
        let r = align(&k.sysfs(), &ctl, 4, false);
        assert_eq!((r[0].changed, r[0].state.combined), (false, Some(1)));
        assert!(ctl.sets().is_empty());
        ctl.fail_sets(libc::EBUSY);
        let r = align(&k.sysfs(), &ctl, 4, true);
        match &r[0].state.last {
            Some(QueueChange { from: 1, to: 4, outcome: ItemOutcome::Failed { errno, .. } }) => {
                assert_eq!(*errno, libc::EBUSY)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ctl.combined("eth0"), 1);
    }

    /// The real ioctl on an interface that has no channel support (loopback)
    /// or does not exist: an error, never a panic or a bogus count.
    #[test]
    fn the_real_ioctl_answers_errors() {
        assert!(Ethtool.get("no-such-if0").is_err());
        assert!(Ethtool.get("").is_err());
        assert!(Ethtool.get("an-interface-name-too-long").is_err());
    }
}
