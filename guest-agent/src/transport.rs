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

/// An AF_VSOCK listener. Only used inside guests.
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
    pub port: u32,
}

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd =
            socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(16).map_err(io::Error::from)?)?;
        Ok(VsockListener { fd: register(fd)?, port })
    }

    /// Accepts the next connection from the host. Connections from any other CID
    /// are closed and logged.
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
            if peer.cid() != HOST_CID {
                tracing::warn!(cid = peer.cid(), port = peer.port(), "refused vsock connection not from the host");
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
