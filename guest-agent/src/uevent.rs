//! Kernel uevents: a pure parser and a netlink listener (group 1, "kernel").
//! Only messages whose sender port is 0 (the kernel) are accepted; udev's
//! re-broadcasts (group 2, `libudev` magic) are ignored.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, recvfrom, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;

/// Largest uevent the kernel sends (UEVENT_BUFFER_SIZE is 2048; leave room).
const UEVENT_BUFFER: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Add,
    Remove,
    Online,
    Offline,
    Change,
    Other,
}

/// What a uevent is about, for the resources vmplug cares for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Cpu(u32),
    MemoryBlock(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: Action,
    pub devpath: String,
    pub subsystem: String,
    pub seqnum: Option<u64>,
    pub env: BTreeMap<String, String>,
}

impl Uevent {
    /// The CPU or memory block this event is about, if any.
    pub fn resource(&self) -> Option<Resource> {
        let name = self.devpath.rsplit('/').next()?;
        match self.subsystem.as_str() {
            "cpu" => name.strip_prefix("cpu")?.parse().ok().map(Resource::Cpu),
            "memory" => name.strip_prefix("memory")?.parse().ok().map(Resource::MemoryBlock),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UeventError {
    #[error("uevent from user space (libudev), not the kernel")]
    FromUdev,
    #[error("uevent header '{0}' has no '@'")]
    NoHeader(String),
    #[error("uevent lacks {0}")]
    Missing(&'static str),
}

/// Parses a kernel uevent payload: `ACTION@DEVPATH\0KEY=VALUE\0…`.
pub fn parse(buf: &[u8]) -> Result<Uevent, UeventError> {
    if buf.starts_with(b"libudev\0") {
        return Err(UeventError::FromUdev);
    }
    let mut fields = buf.split(|&b| b == 0).filter(|f| !f.is_empty());
    let header = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    if !header.contains('@') {
        return Err(UeventError::NoHeader(header.chars().take(64).collect()));
    }
    let mut env = BTreeMap::new();
    for f in fields {
        let f = String::from_utf8_lossy(f);
        if let Some((k, v)) = f.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    let action = match env.get("ACTION").map(String::as_str) {
        Some("add") => Action::Add,
        Some("remove") => Action::Remove,
        Some("online") => Action::Online,
        Some("offline") => Action::Offline,
        Some("change") => Action::Change,
        Some(_) => Action::Other,
        None => return Err(UeventError::Missing("ACTION")),
    };
    let devpath = env.get("DEVPATH").cloned().ok_or(UeventError::Missing("DEVPATH"))?;
    let subsystem = env.get("SUBSYSTEM").cloned().unwrap_or_default();
    let seqnum = env.get("SEQNUM").and_then(|s| s.parse().ok());
    Ok(Uevent { action, devpath, subsystem, seqnum, env })
}

/// A bound kernel uevent socket.
#[derive(Debug)]
pub struct UeventSocket {
    fd: AsyncFd<OwnedFd>,
    buf: Box<[u8]>,
}

impl UeventSocket {
    pub fn open() -> std::io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // A burst of hot-plug events must not overflow the queue; ENOBUFS is still
        // handled (a rescan covers what was lost).
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))?;
        Ok(UeventSocket { fd: crate::transport::register(fd)?, buf: vec![0u8; UEVENT_BUFFER].into_boxed_slice() })
    }

    /// The next kernel uevent. `Ok(None)` means events were lost (ENOBUFS) or a
    /// message was rejected: the caller should rescan sysfs.
    pub async fn next(&mut self) -> std::io::Result<Option<Uevent>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res =
                guard.try_io(|fd| recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut self.buf).map_err(std::io::Error::from));
            match res {
                Err(_would_block) => continue,
                Ok(Ok((n, from))) => {
                    if from.map(|a| a.pid()) != Some(0) {
                        tracing::warn!("uevent not sent by the kernel ignored");
                        return Ok(None);
                    }
                    return Ok(parse(&self.buf[..n]).ok());
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!("uevent queue overflowed; rescanning");
                    return Ok(None);
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(parts: &[&str]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.bytes().chain(std::iter::once(0))).collect()
    }

    #[test]
    fn cpu_add() {
        let ev = parse(&payload(&[
            "add@/devices/system/cpu/cpu2",
            "ACTION=add",
            "DEVPATH=/devices/system/cpu/cpu2",
            "SUBSYSTEM=cpu",
            "SEQNUM=1877",
        ]))
        .expect("parses");
        assert_eq!(ev.action, Action::Add);
        assert_eq!(ev.resource(), Some(Resource::Cpu(2)));
        assert_eq!(ev.seqnum, Some(1877));
    }

    #[test]
    fn memory_add_online_offline() {
        for (action, want) in [("add", Action::Add), ("online", Action::Online), ("offline", Action::Offline)] {
            let ev = parse(&payload(&[
                &format!("{action}@/devices/system/memory/memory40"),
                &format!("ACTION={action}"),
                "DEVPATH=/devices/system/memory/memory40",
                "SUBSYSTEM=memory",
                "SEQNUM=2001",
            ]))
            .expect("parses");
            assert_eq!(ev.action, want);
            assert_eq!(ev.resource(), Some(Resource::MemoryBlock(40)));
        }
    }

    #[test]
    fn cpu_online_event_and_unrelated_devices() {
        let ev = parse(&payload(&[
            "online@/devices/system/cpu/cpu3",
            "ACTION=online",
            "DEVPATH=/devices/system/cpu/cpu3",
            "SUBSYSTEM=cpu",
            "SEQNUM=12",
        ]))
        .expect("parses");
        assert_eq!((ev.action, ev.resource()), (Action::Online, Some(Resource::Cpu(3))));
        let other = parse(&payload(&[
            "add@/devices/virtual/block/loop0",
            "ACTION=add",
            "DEVPATH=/devices/virtual/block/loop0",
            "SUBSYSTEM=block",
        ]))
        .expect("parses");
        assert_eq!(other.resource(), None);
    }

    #[test]
    fn rejects_udev_and_garbage() {
        assert_eq!(parse(b"libudev\0\xfe\xed\xca\xfe"), Err(UeventError::FromUdev));
        assert!(matches!(parse(b"garbage"), Err(UeventError::NoHeader(_))));
        assert_eq!(parse(&payload(&["add@/x", "DEVPATH=/x"])), Err(UeventError::Missing("ACTION")));
        assert_eq!(parse(b""), Err(UeventError::NoHeader(String::new())));
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&data);
        }
    }
}
