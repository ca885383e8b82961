//! A non-blocking file descriptor (AF_VSOCK socket, virtio-serial port) as a tokio
//! byte stream. Shared by both agents; only with the `io` feature.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)) {
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
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
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

/// Dials AF_VSOCK `cid:port` (the host side of a guest agent on real vhost-vsock).
pub async fn connect_vsock(cid: u32, port: u32) -> io::Result<FdStream> {
    use nix::sys::socket::{connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, VsockAddr};
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let stream = FdStream::new(fd)?;
    let guard = stream.0.writable().await?;
    drop(guard);
    let err = getsockopt(stream.0.get_ref(), sockopt::SocketError)?;
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(stream)
}
