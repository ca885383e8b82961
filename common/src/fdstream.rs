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

/// Source ports the host's vmplug binds before it connects over AF_VSOCK:
/// privileged (below 1024), so binding one needs `CAP_NET_BIND_SERVICE`.
pub const PRIVILEGED_SOURCE_PORTS: std::ops::Range<u32> = 512..1024;

/// Dials AF_VSOCK `cid:port` (the host side of a guest agent on real vhost-vsock)
/// from a privileged source port (see [`PRIVILEGED_SOURCE_PORTS`]).
pub async fn connect_vsock(cid: u32, port: u32) -> io::Result<FdStream> {
    use nix::sys::socket::{bind, connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, VsockAddr};
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    // A privileged source port proves to the guest that this is the host's root
    // (or a process granted CAP_NET_BIND_SERVICE), not any local user: on a host
    // with vhost-vsock every local process is CID 2.
    let mut bound = Err(nix::errno::Errno::EADDRINUSE);
    for src in PRIVILEGED_SOURCE_PORTS.rev() {
        bound = bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, src));
        if !matches!(bound, Err(nix::errno::Errno::EADDRINUSE)) {
            break;
        }
    }
    bound.map_err(|e| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("cannot bind a privileged vsock source port ({e}): the guest agent accepts only the host's root; run vmplug as root or with CAP_NET_BIND_SERVICE"),
        )
    })?;
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

/// An epoll instance watching one fd edge-triggered, itself watched by tokio.
#[derive(Debug)]
struct EdgeWatch(nix::sys::epoll::Epoll);

impl AsRawFd for EdgeWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0 .0.as_raw_fd()
    }
}

fn edge_watch(fd: &OwnedFd, flags: nix::sys::epoll::EpollFlags) -> io::Result<AsyncFd<EdgeWatch>> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    ep.add(fd, EpollEvent::new(flags | EpollFlags::EPOLLET, 0))?;
    // SAFETY: the epoll fd is owned by `EdgeWatch`, valid and unchanged for the
    // whole life of the `AsyncFd`, and closed only when that is dropped.
    unsafe { AsyncFd::register(EdgeWatch(ep)) }.map_err(io::Error::from)
}

/// Consumes the queued edges of a watch (never blocks).
fn drain(w: &AsyncFd<EdgeWatch>) {
    let mut events = [nix::sys::epoll::EpollEvent::empty(); 4];
    while matches!(w.get_ref().0.wait(&mut events, 0u8), Ok(n) if n == events.len()) {}
}

/// A character device whose poll(2) reports a *level* hang-up while its peer is
/// away: a virtio-serial port with no host connected. tokio keeps read-closed
/// readiness once seen, so awaiting such an fd directly spins at 100% CPU.
/// Instead the fd is watched by two private edge-triggered epoll instances (input
/// and output) and tokio watches those, which only become readable when the
/// port's state really changes. Clones share the fd.
#[derive(Debug, Clone)]
pub struct EdgeStream(Arc<EdgeInner>);

#[derive(Debug)]
struct EdgeInner {
    fd: OwnedFd,
    input: AsyncFd<EdgeWatch>,
    output: AsyncFd<EdgeWatch>,
}

impl EdgeStream {
    /// `fd` must be non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        use nix::sys::epoll::EpollFlags;
        let input = edge_watch(&fd, EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLRDHUP)?;
        let output = edge_watch(&fd, EpollFlags::EPOLLOUT)?;
        Ok(EdgeStream(Arc::new(EdgeInner { fd, input, output })))
    }

    /// Waits until the peer sends something, and returns its first bytes. Reads
    /// of 0 (no peer) and EAGAIN both wait for the next edge: no busy loop, no
    /// timer, and an edge that arrives between the read and the wait is kept.
    pub async fn wait_for_peer(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        loop {
            match nix::unistd::read(self.0.fd.as_raw_fd(), &mut scratch) {
                Ok(n) if n > 0 => {
                    buf.extend_from_slice(&scratch[..n]);
                    return Ok(());
                }
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => {
                    let mut guard = self.0.input.readable().await?;
                    drain(&self.0.input);
                    guard.clear_ready();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsyncRead for EdgeStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match nix::unistd::read(self.0.fd.as_raw_fd(), buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    let mut guard = ready!(self.0.input.poll_read_ready(cx))?;
                    drain(&self.0.input);
                    guard.clear_ready();
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            match nix::unistd::write(&self.0.fd, data) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(nix::errno::Errno::EAGAIN) => {
                    let mut guard = ready!(self.0.output.poll_read_ready(cx))?;
                    drain(&self.0.output);
                    guard.clear_ready();
                }
                Err(e) => return Poll::Ready(Err(e.into())),
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
