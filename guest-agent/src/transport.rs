//! Transports: an AF_VSOCK listener that accepts only the host (CID 2), and a
//! virtio-serial port whose one byte stream outlives many host connections.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use nix::sys::socket::{
    accept4, bind, getpeername, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
    VsockAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vmplug_common::protocol::HOST_CID;

use crate::sysfs::Sysfs;

/// Registers an owned, non-blocking descriptor with the tokio reactor.
pub fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns a valid open descriptor, returns the same one from
    // every `as_raw_fd()` call, and closes it only when dropped with the `AsyncFd`.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// A non-blocking file descriptor as an async byte stream. Clones share the fd.
#[derive(Debug, Clone)]
pub struct FdStream(Arc<AsyncFd<OwnedFd>>);

impl FdStream {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(FdStream(Arc::new(register(fd)?)))
    }

    /// Waits until the peer (the host, on virtio-serial) may have something for
    /// us. Clears stale readiness first, then probes, so a connection made between
    /// the probe and the wait still wakes us.
    pub async fn wait_for_peer(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        loop {
            let mut guard = self.0.readable().await?;
            guard.clear_ready();
            match nix::unistd::read(self.0.get_ref().as_raw_fd(), &mut scratch) {
                Ok(0) => {
                    // No host connected: sleep until the port's state changes.
                    let mut g = self.0.readable().await?;
                    g.clear_ready_matching(tokio::io::Ready::READ_CLOSED);
                    continue;
                }
                Ok(n) => {
                    buf.extend_from_slice(&scratch[..n]);
                    return Ok(());
                }
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(res) => return Poll::Ready(res),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// An AF_VSOCK listener. Only used inside guests.
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
    pub port: u32,
}

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(16).map_err(io::Error::from)?)?;
        Ok(VsockListener {
            fd: register(fd)?,
            port,
        })
    }

    /// Accepts the next connection from the host. Connections from any other CID
    /// are closed and logged.
    pub async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|fd| {
                accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(io::Error::from)
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
                tracing::warn!(
                    cid = peer.cid(),
                    port = peer.port(),
                    "refused vsock connection not from the host"
                );
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

/// Opens a virtio-serial port non-blocking.
pub fn open_serial(path: &Path) -> io::Result<FdStream> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    FdStream::new(OwnedFd::from(file))
}
