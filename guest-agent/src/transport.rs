//! Transports: an AF_VSOCK listener that accepts only the host (CID 2), and a
//! virtio-serial port whose one byte stream outlives many host connections.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    accept4, bind, getpeername, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::io::unix::AsyncFd;
pub use vmplug_common::fdstream::{register, EdgeStream, FdStream};
use vmplug_common::protocol::HOST_CID;

use crate::sysfs::Sysfs;

/// Highest privileged vsock port: binding a port up to this one needs
/// `CAP_NET_BIND_SERVICE` in the guest, as for IP.
pub const LAST_PRIVILEGED_PORT: u32 = 1023;

/// Why a vsock peer was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("peer CID {0} is not the host (CID {HOST_CID})")]
    NotHost(u32),
    #[error("peer port {0} is not privileged: on the host, only root (or CAP_NET_BIND_SERVICE) binds ports up to {LAST_PRIVILEGED_PORT}; set vsock_privileged_peer = false only behind a hybrid vsock backend whose Unix socket guards access")]
    UnprivilegedPort(u32),
}

/// Who may drive the agent over AF_VSOCK: the host (CID 2) and, when
/// `privileged_peer`, only from a privileged source port, which on a host with
/// vhost-vsock (where every local process is CID 2) only root can bind.
pub fn admit(cid: u32, port: u32, privileged_peer: bool) -> Result<(), Refusal> {
    if cid != HOST_CID {
        return Err(Refusal::NotHost(cid));
    }
    if privileged_peer && port > LAST_PRIVILEGED_PORT {
        return Err(Refusal::UnprivilegedPort(port));
    }
    Ok(())
}

/// An AF_VSOCK listener. Only used inside guests.
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
    pub port: u32,
    privileged_peer: bool,
}

impl VsockListener {
    pub fn bind(port: u32, privileged_peer: bool) -> io::Result<Self> {
        let fd =
            socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(16).map_err(io::Error::from)?)?;
        Ok(VsockListener { fd: register(fd)?, port, privileged_peer })
    }

    /// Accepts the next connection the host may make (see [`admit`]); others are
    /// closed and logged.
    pub async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|fd| {
                accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK).map_err(io::Error::from)
            });
            let raw = match res {
                Err(_would_block) => continue,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Ok(r) => r?,
            };
            // SAFETY: accept4 returned a new, valid descriptor that nothing else owns.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
            let peer: VsockAddr = getpeername(fd.as_raw_fd())?;
            if let Err(why) = admit(peer.cid(), peer.port(), self.privileged_peer) {
                tracing::warn!(cid = peer.cid(), port = peer.port(), "refused vsock connection: {why}");
                continue;
            }
            return FdStream::new(fd);
        }
    }
}

/// Finds the character device of the virtio-serial port `name`: the udev link
/// `/dev/virtio-ports/NAME` if present, else `/sys/class/virtio-ports/*/name`.
pub fn find_serial_port(sysfs: &Sysfs, dev_root: &Path, name: &str) -> Option<PathBuf> {
    let link = dev_root.join("virtio-ports").join(name);
    if link.exists() {
        return Some(link);
    }
    sysfs.virtio_port_device(name).map(|d| dev_root.join(d))
}

/// Opens a virtio-serial port non-blocking, watched edge-triggered (its hang-up
/// is level-triggered while no host is connected).
pub fn open_serial(path: &Path) -> io::Result<EdgeStream> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    EdgeStream::new(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security finding 6: any local user on a vhost-vsock host is CID 2.
    #[test]
    fn only_the_hosts_root_is_admitted() {
        assert_eq!(admit(2, 1000, true), Ok(()));
        assert_eq!(admit(2, 0, true), Ok(()), "vhost-device-vsock numbers host connections from 0");
        assert_eq!(admit(2, 1024, true), Err(Refusal::UnprivilegedPort(1024)));
        assert_eq!(admit(2, 1 << 30, true), Err(Refusal::UnprivilegedPort(1 << 30)));
        assert_eq!(admit(2, 1 << 30, false), Ok(()), "hybrid backends that number from 2^30");
        assert_eq!(admit(3, 1000, true), Err(Refusal::NotHost(3)));
        assert_eq!(admit(1, 1000, false), Err(Refusal::NotHost(1)));
    }
}
