//! The host end of the guest link: AF_VSOCK, hybrid vsock (a Unix socket and
//! `CONNECT <port>`), or virtio-serial (the channel's Unix socket). Bounded retry
//! until the handshake succeeds; every read bounded; every byte from the guest
//! treated as untrusted (bounded frames, ids matched, values validated by type).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant};
use vmplug_common::frame::{write_frame, Decoded, FrameError, FrameReader};
use vmplug_common::protocol::*;

use crate::lograte::{Admit, LogLimiter};
use crate::trust::{self, SocketTrust};
use crate::wait::Wait;
use crate::xml::{AgentHint, DomainFacts};

/// How often a refused or unanswered connection is retried while waiting.
pub const CONNECT_RETRY: Duration = Duration::from_millis(250);
/// How long one connection attempt may take to answer `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Extra time the host grants beyond the guest's own deadline before giving up.
pub const REPLY_SLACK: Duration = Duration::from_secs(10);
/// Longest single `Online` round of [`GuestLink::online_until_done`].
pub const ONLINE_ROUND: Duration = Duration::from_secs(10);
/// How long past a round's deadline an answer may take before the agent is
/// presumed gone (a round is then at most 12 s).
pub const ROUND_SLACK: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    Vsock { cid: u32, port: u32 },
    Hybrid { path: PathBuf, port: u32 },
    Serial { path: PathBuf },
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            AgentAddr::Hybrid { path, port } => write!(f, "hybrid:{}:{port}", path.display()),
            AgentAddr::Serial { path } => write!(f, "serial:{}", path.display()),
        }
    }
}

impl FromStr for AgentAddr {
    type Err = String;
    /// `vsock:CID:PORT`, `hybrid:PATH:PORT`, `serial:PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("agent address '{s}' is not vsock:CID:PORT, hybrid:PATH:PORT or serial:PATH");
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "vsock" => {
                let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
                Ok(AgentAddr::Vsock { cid: cid.parse().map_err(|_| bad())?, port: port.parse().map_err(|_| bad())? })
            }
            "hybrid" => {
                let (path, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                Ok(AgentAddr::Hybrid { path: path.into(), port: port.parse().map_err(|_| bad())? })
            }
            "serial" if !rest.is_empty() => Ok(AgentAddr::Serial { path: rest.into() }),
            _ => Err(bad()),
        }
    }
}

impl From<&AgentAddr> for AgentHint {
    fn from(a: &AgentAddr) -> AgentHint {
        match a {
            AgentAddr::Vsock { cid, port } => AgentHint::Vsock { cid: *cid, port: *port },
            AgentAddr::Hybrid { path, port } => {
                AgentHint::Hybrid { path: path.to_string_lossy().into_owned(), port: *port }
            }
            AgentAddr::Serial { path } => AgentHint::Serial { path: path.to_string_lossy().into_owned() },
        }
    }
}

impl From<&AgentHint> for AgentAddr {
    fn from(h: &AgentHint) -> AgentAddr {
        match h {
            AgentHint::Hybrid { path, port } => AgentAddr::Hybrid { path: path.into(), port: *port },
            AgentHint::Vsock { cid, port } => AgentAddr::Vsock { cid: *cid, port: *port },
            AgentHint::Serial { path } => AgentAddr::Serial { path: path.into() },
        }
    }
}

/// Where the agent of this domain listens: vmplug metadata, else the
/// virtio-serial channel named `org.vmplug.guest.0`, else a `<vsock>` device.
///
/// A channel defined without a path gets one from libvirt when the domain
/// starts (under its channel directory, e.g.
/// `/run/libvirt/qemu/channel/ID-NAME/org.vmplug.guest.0` on libvirt 11, `/var/lib/libvirt/qemu/channel/target/domain-N-NAME/…` on older ones):
/// `facts` must then be the running domain's live XML, which shows it.
pub fn discover(facts: &DomainFacts) -> Result<AgentAddr, LinkError> {
    if let Some(h) = &facts.agent_hint {
        return Ok(h.into());
    }
    if let Some(e) = &facts.metadata_error {
        return Err(LinkError::Metadata(e.clone()));
    }
    match facts.channels.get(DEFAULT_SERIAL_NAME) {
        Some(Some(path)) => Ok(AgentAddr::Serial { path: path.into() }),
        Some(None) => Err(LinkError::ChannelPathUnknown { domain: facts.name.clone() }),
        None => {
            facts.vsock_cid.map(|cid| AgentAddr::Vsock { cid, port: DEFAULT_VSOCK_PORT }).ok_or(LinkError::NoAddress)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no guest agent address: the domain has no vmplug metadata, no '{DEFAULT_SERIAL_NAME}' channel and no <vsock>; pass --agent")]
    NoAddress,
    #[error("no guest agent address: the '{DEFAULT_SERIAL_NAME}' channel of '{domain}' names no socket path; libvirt chooses one when the domain starts and only the running domain's live XML shows it (is '{domain}' running?)")]
    ChannelPathUnknown { domain: String },
    #[error("no guest agent address: {0}")]
    Metadata(crate::settings::MetaError),
    #[error("guest agent at {addr} did not complete a handshake within {waited:?} (last error: {last})")]
    Unreachable { addr: String, waited: Duration, last: String },
    #[error("hybrid vsock backend refused CONNECT {port}: '{reply}'")]
    HybridRefused { port: u32, reply: String },
    #[error("guest agent speaks protocol {0}, this host speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("guest agent did not answer '{0}' within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("guest agent answered '{request}' with {code}: {message}")]
    Guest { request: &'static str, code: ErrorCode, message: String },
    #[error("guest agent sent an unexpected answer to '{0}'")]
    Unexpected(&'static str),
    #[error("agent socket {path} does not exist (is the domain running, and is this its socket?)")]
    NoSocket { path: PathBuf },
    /// The socket may not lead to the guest (see [`crate::trust`]): refused
    /// before connecting, never retried.
    #[error("refused to use the agent socket {path}: {why}")]
    UnsafeSocket { path: PathBuf, why: String },
    // Flattened into report strings (there is no error chain there), so the
    // cause is part of the message.
    #[error("guest link: {0}")]
    Frame(#[from] FrameError),
    #[error("guest link i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<&LinkError> for crate::preflight::AgentTrouble {
    /// What preflight is told of a failed connect: a refusal, nothing there, or silence.
    fn from(e: &LinkError) -> Self {
        use crate::preflight::AgentTrouble;
        match e {
            LinkError::UnsafeSocket { .. } => AgentTrouble::Untrusted(e.to_string()),
            LinkError::NoAddress
            | LinkError::ChannelPathUnknown { .. }
            | LinkError::Metadata(_)
            | LinkError::NoSocket { .. } => AgentTrouble::NoEndpoint(e.to_string()),
            _ => AgentTrouble::Unanswered(e.to_string()),
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What the host asks of a guest agent once a session exists: the real
/// [`GuestLink`], or a scripted fake in tests (`fake::ScriptedAgent`). The
/// executors are written against this, never against a socket.
pub trait GuestAgent: Send {
    /// The facts the guest gave at the handshake.
    fn facts(&self) -> &GuestInfo;
    /// Brings the guest to the request's totals, surviving agent restarts;
    /// also returns how often the session had to be re-established.
    fn online(
        &mut self,
        req: OnlineRequest,
    ) -> impl std::future::Future<Output = Result<(Report, u32), LinkError>> + Send;
    fn offline(&mut self, req: OfflineRequest) -> impl std::future::Future<Output = Result<Report, LinkError>> + Send;
    /// The state of every block in these ranges (read-only).
    fn blocks(
        &mut self,
        memory: Vec<MemRange>,
    ) -> impl std::future::Future<Output = Result<Vec<BlockState>, LinkError>> + Send;
    fn pressure(&mut self) -> impl std::future::Future<Output = Result<Pressure, LinkError>> + Send;
    /// The guest's shrink forecast and its veto on `req.release`; `None` from an
    /// agent without the `forecast` capability.
    fn forecast(
        &mut self,
        req: ForecastRequest,
    ) -> impl std::future::Future<Output = Result<Option<Forecast>, LinkError>> + Send {
        let _ = req;
        async { Ok(None) }
    }
    /// When, during the last `online`, the guest's last add and online events
    /// reached the host (none from an agent that sends no events).
    fn milestones(&self) -> Milestones {
        Milestones::default()
    }
}

/// The guest phase of an `online` call, from the agent's unsolicited events as
/// the host received them: when the last new CPU or block was seen added in
/// the guest, and when the last one was onlined, in ms from the call's start.
/// Events that came while the host was not reading (during the plug call) are
/// stamped when read: "seen by then", never earlier than true.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Milestones {
    pub added_ms: Option<u64>,
    pub onlined_ms: Option<u64>,
}

/// The guest's veto on releasing `req.release` from the ranges in `req`,
/// asked just before a shrink or an unplug changes anything; `None` when it
/// agrees, cannot say (an older agent, an error), or was not asked.
pub async fn guest_veto<A: GuestAgent>(agent: &mut A, req: ForecastRequest) -> Option<String> {
    match agent.forecast(req).await {
        Ok(Some(f)) => f.veto.map(|v| v.reason),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(error = %e, "the guest's veto is unknown");
            None
        }
    }
}

impl GuestAgent for GuestLink {
    fn facts(&self) -> &GuestInfo {
        &self.info
    }
    fn online(
        &mut self,
        req: OnlineRequest,
    ) -> impl std::future::Future<Output = Result<(Report, u32), LinkError>> + Send {
        self.online_until_done(req)
    }
    fn offline(&mut self, req: OfflineRequest) -> impl std::future::Future<Output = Result<Report, LinkError>> + Send {
        GuestLink::offline(self, req)
    }
    fn blocks(
        &mut self,
        memory: Vec<MemRange>,
    ) -> impl std::future::Future<Output = Result<Vec<BlockState>, LinkError>> + Send {
        GuestLink::blocks(self, memory)
    }
    fn pressure(&mut self) -> impl std::future::Future<Output = Result<Pressure, LinkError>> + Send {
        GuestLink::pressure(self)
    }
    fn forecast(
        &mut self,
        req: ForecastRequest,
    ) -> impl std::future::Future<Output = Result<Option<Forecast>, LinkError>> + Send {
        GuestLink::forecast(self, req)
    }
    fn milestones(&self) -> Milestones {
        let log = &self.wire.events;
        let since = |at: Option<Instant>| Some(at?.saturating_duration_since(log.since?).as_millis() as u64);
        Milestones { added_ms: since(log.last_added), onlined_ms: since(log.last_onlined) }
    }
}

/// One connection's framing: requests out, answers matched by id, events kept.
struct Wire {
    reader: FrameReader<tokio::io::ReadHalf<Box<dyn Stream>>>,
    writer: tokio::io::WriteHalf<Box<dyn Stream>>,
    next_id: u64,
    /// Unsolicited events seen while waiting for answers.
    events: EventLog,
    /// Log lines about frames the guest sent that were dropped (bounded: the
    /// guest can send them at will).
    dropped_log: LogLimiter,
    /// Debug lines about the guest's events (bounded likewise).
    events_log: LogLimiter,
    /// `queues` was sent since the last hello: the agent's reports on this
    /// session may carry the network queue changes.
    queues_asked: bool,
}

impl Drop for Wire {
    fn drop(&mut self) {
        if let Some(n) = self.dropped_log.take_suppressed() {
            tracing::warn!(suppressed = n, "guest sent frames that were dropped without a log line each");
        }
    }
}

/// A handshaken session with a guest agent: it exists only once the agent has
/// answered `Hello` with facts of this protocol version (there is no session,
/// and so no guest facts, before that).
pub struct GuestLink {
    wire: Wire,
    pub addr: AgentAddr,
    pub info: GuestInfo,
    /// What the socket must be to be used (again, on a reconnect).
    expect: SocketTrust,
}

/// Most bytes of guest events one link keeps; later events are counted only.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// The guest's unsolicited events, bounded in bytes (not in count: one event
/// can carry a string of nearly a whole frame).
#[derive(Debug, Default)]
pub struct EventLog {
    pub events: Vec<Event>,
    bytes: usize,
    /// Events not kept because the log was full.
    pub dropped: u64,
    /// Since when add and online events are timed (the current `online` call).
    since: Option<Instant>,
    last_added: Option<Instant>,
    last_onlined: Option<Instant>,
}

impl EventLog {
    /// Times add and online events from now on (a new `online` call).
    fn start_timing(&mut self) {
        (self.since, self.last_added, self.last_onlined) = (Some(Instant::now()), None, None);
    }

    pub fn push(&mut self, ev: Event) {
        if self.since.is_some() {
            match ev {
                Event::CpuAdded { .. } | Event::MemoryAdded { .. } => self.last_added = Some(Instant::now()),
                Event::CpuOnlined { .. } | Event::MemoryOnlined { .. } => self.last_onlined = Some(Instant::now()),
                _ => {}
            }
        }
        let size = ev.held_bytes();
        if self.bytes + size > MAX_EVENT_BYTES {
            self.dropped += 1;
            return;
        }
        self.bytes += size;
        self.events.push(ev);
    }

    /// Bytes held by the kept events.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl std::fmt::Debug for GuestLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestLink").field("addr", &self.addr).field("next_id", &self.wire.next_id).finish()
    }
}

/// Whether a host-side Unix socket may be trusted to lead to the guest: it must
/// exist, be a socket, and pass [`trust::judge`] (owner and permission bits).
/// Hybrid vsock and virtio-serial have no other guard: whoever can connect to
/// the socket drives the agent, and whoever could create it could pose as the
/// agent.
pub fn check_socket(path: &std::path::Path, expect: &SocketTrust) -> Result<(), LinkError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LinkError::NoSocket { path: path.to_path_buf() })
        }
        Err(e) => return Err(LinkError::Io(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(LinkError::UnsafeSocket { path: path.to_path_buf(), why: "it is not a socket".into() });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match trust::judge(meta.uid(), meta.mode(), me, expect) {
        Ok(why) => {
            tracing::debug!(path = %path.display(), owner = meta.uid(), ?why, "agent socket trusted");
            Ok(())
        }
        Err(why) => Err(LinkError::UnsafeSocket { path: path.to_path_buf(), why }),
    }
}

async fn open(addr: &AgentAddr, expect: &SocketTrust) -> Result<Box<dyn Stream>, LinkError> {
    match addr {
        AgentAddr::Serial { path } => {
            check_socket(path, expect)?;
            Ok(Box::new(tokio::net::UnixStream::connect(path).await?))
        }
        AgentAddr::Hybrid { path, port } => {
            check_socket(path, expect)?;
            let mut s = tokio::net::UnixStream::connect(path).await?;
            s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
            // The reply line is short; read it byte by byte so no frame byte is consumed.
            let mut reply = Vec::new();
            loop {
                let b = s.read_u8().await?;
                if b == b'\n' || reply.len() > 64 {
                    break;
                }
                reply.push(b);
            }
            let reply = vmplug_common::text::escape(&String::from_utf8_lossy(&reply));
            if !reply.starts_with("OK ") {
                return Err(LinkError::HybridRefused { port: *port, reply });
            }
            Ok(Box::new(s))
        }
        AgentAddr::Vsock { cid, port } => Ok(Box::new(vmplug_common::fdstream::connect_vsock(*cid, *port).await?)),
    }
}

/// Request ids start from the clock so a stale answer of an earlier session
/// (virtio-serial keeps one byte stream) never matches.
fn first_id() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(1) << 8
}

impl GuestLink {
    /// Connects and handshakes, retrying until `wait` has passed; a socket is
    /// trusted by this host's login ranges alone (no domain user known).
    pub async fn connect(addr: &AgentAddr, wait: Duration) -> Result<GuestLink, LinkError> {
        let expect = SocketTrust::for_domain(None, std::path::Path::new(trust::LOGIN_DEFS));
        Self::connect_expecting(addr, &expect, wait).await
    }

    /// Connects and handshakes, retrying until `wait` has passed, to a socket
    /// that meets `expect` (checked before every attempt).
    pub async fn connect_expecting(
        addr: &AgentAddr,
        expect: &SocketTrust,
        wait: Duration,
    ) -> Result<GuestLink, LinkError> {
        let started = Instant::now();
        let patience = Wait::new(format!("the guest agent at {addr}"), wait).every(CONNECT_RETRY);
        let mut waiting = patience.start();
        let mut last;
        loop {
            match timeout(HELLO_TIMEOUT, Self::try_connect(addr, expect)).await {
                Ok(Ok(link)) => return Ok(link),
                // Waiting cannot fix these: say so at once, naming the path.
                Ok(Err(e @ (LinkError::Version(_) | LinkError::NoSocket { .. } | LinkError::UnsafeSocket { .. }))) => {
                    return Err(e)
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("no answer to hello within {HELLO_TIMEOUT:?}"),
            }
            // Another try only when a whole retry interval is left before the end.
            if waiting.left() <= CONNECT_RETRY || waiting.pause().await.is_err() {
                return Err(LinkError::Unreachable { addr: addr.to_string(), waited: started.elapsed(), last });
            }
            tracing::debug!(%addr, %last, "agent not ready, retrying");
        }
    }

    /// Opens the transport and says hello; the session exists only once the
    /// guest has answered with facts of this protocol version.
    async fn try_connect(addr: &AgentAddr, expect: &SocketTrust) -> Result<GuestLink, LinkError> {
        let stream = open(addr, expect).await?;
        let mut wire = Wire::new(stream);
        let info = wire.hello().await?;
        Ok(GuestLink { wire, addr: addr.clone(), info, expect: expect.clone() })
    }

    /// Hello again on this session's connection (the agent forgot it).
    async fn handshake(&mut self) -> Result<(), LinkError> {
        self.info = self.wire.hello().await?;
        Ok(())
    }

    /// Sends a request and waits (bounded) for the answer with its id. An agent
    /// that has forgotten this session's handshake gets hello again and the request
    /// once more: on virtio-serial the guest learns of host connects and hang-ups
    /// from control messages that can race the data, so it may have closed our
    /// session and opened a fresh one under us. Requests are totals, so the repeat
    /// is harmless.
    pub async fn call(&mut self, req: Request, wait: Duration) -> Result<Response, LinkError> {
        match self.wire.call_once(req.clone(), wait).await {
            Err(LinkError::Guest { code: ErrorCode::HandshakeRequired, .. })
                if !matches!(req, Request::Hello { .. }) =>
            {
                tracing::warn!(request = req.type_name(), "the agent lost this session's handshake; handshaking again");
                self.handshake().await?;
                self.wire.call_once(req, wait).await
            }
            other => other,
        }
    }

    /// Asks an established session for the guest's facts again (they change with
    /// every plug) and forgets the events of earlier requests: what a session kept
    /// between operations (autoscale's) does before each use.
    pub async fn refresh(&mut self) -> Result<(), LinkError> {
        self.info = self.info().await?;
        self.wire.events = EventLog::default();
        Ok(())
    }

    pub async fn info(&mut self) -> Result<GuestInfo, LinkError> {
        match self.call(Request::Info, HELLO_TIMEOUT).await? {
            Response::GuestInfo(i) => Ok(i),
            _ => Err(LinkError::Unexpected("info")),
        }
    }

    async fn report(&mut self, req: Request, guest_wait: Duration) -> Result<Report, LinkError> {
        let kind = req.type_name();
        let cpus = matches!(&req, Request::Online(r) if r.cpus.is_some())
            || matches!(&req, Request::Offline(r) if r.cpus.is_some());
        if cpus && !self.wire.queues_asked && self.info.capabilities.iter().any(|c| c == "queues") {
            // Asking once tells the agent this host reads the report's `queues`.
            if let Err(e) = self.queues().await {
                tracing::debug!(error = %e, "the guest's network queues are unknown");
            }
        }
        match self.call(req, guest_wait + REPLY_SLACK).await? {
            Response::Report(r) => Ok(r),
            _ => Err(LinkError::Unexpected(kind)),
        }
    }

    /// Brings the guest to `req`'s targets, surviving an agent restart: the wait
    /// is cut into rounds of at most [`ONLINE_ROUND`]; a round that ends without
    /// an answer (agent killed, link dropped) reconnects and asks again. Totals,
    /// not deltas, make the repeat harmless. Ends by `req.timeout_ms` overall.
    pub async fn online_until_done(&mut self, req: OnlineRequest) -> Result<(Report, u32), LinkError> {
        let budget = Wait::new("the guest to reach the request's targets", Duration::from_millis(req.timeout_ms));
        let waiting = budget.start();
        self.wire.events.start_timing();
        let mut reconnects = 0;
        loop {
            let left = waiting.left();
            let round = left.min(ONLINE_ROUND).max(Duration::from_millis(1));
            let r = OnlineRequest { timeout_ms: round.as_millis() as u64, ..req.clone() };
            let res = self.report(Request::Online(r), round.saturating_sub(REPLY_SLACK) + ROUND_SLACK).await;
            match res {
                Ok(report) if report.complete || !report.timed_out || waiting.left().is_zero() => {
                    return Ok((report, reconnects))
                }
                Ok(_) => continue,
                Err(e @ (LinkError::Timeout(..) | LinkError::Frame(_) | LinkError::Io(_))) => {
                    let left = waiting.left();
                    if left.is_zero() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "no answer from the guest agent; reconnecting");
                    // Close this connection first: a virtio-serial chardev serves one
                    // client at a time and would never answer a second one.
                    self.wire.close();
                    let fresh = GuestLink::connect_expecting(&self.addr, &self.expect, left).await?;
                    let events = std::mem::take(&mut self.wire.events);
                    *self = fresh;
                    self.wire.events = events;
                    reconnects += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn offline(&mut self, req: OfflineRequest) -> Result<Report, LinkError> {
        let wait = Duration::from_millis(req.timeout_ms);
        self.report(Request::Offline(req), wait).await
    }

    pub async fn blocks(&mut self, memory: Vec<MemRange>) -> Result<Vec<BlockState>, LinkError> {
        match self.call(Request::Blocks { memory }, HELLO_TIMEOUT).await? {
            Response::Blocks { blocks } => Ok(blocks),
            _ => Err(LinkError::Unexpected("blocks")),
        }
    }

    /// The guest's shrink forecast (and veto on `req.release`); `None` when the
    /// agent predates the `forecast` capability (it is not asked).
    pub async fn forecast(&mut self, req: ForecastRequest) -> Result<Option<Forecast>, LinkError> {
        if !self.info.capabilities.iter().any(|c| c == "forecast") {
            return Ok(None);
        }
        match self.call(Request::Forecast(req), HELLO_TIMEOUT).await? {
            Response::Forecast(f) => Ok(Some(f)),
            _ => Err(LinkError::Unexpected("forecast")),
        }
    }

    /// The guest's multiqueue virtio-net devices (agents with the `queues` capability).
    pub async fn queues(&mut self) -> Result<Queues, LinkError> {
        let r = match self.call(Request::Queues, HELLO_TIMEOUT).await? {
            Response::Queues(q) => Ok(q),
            _ => Err(LinkError::Unexpected("queues")),
        };
        self.wire.queues_asked = r.is_ok();
        r
    }

    pub async fn pressure(&mut self) -> Result<Pressure, LinkError> {
        match self.call(Request::Pressure, HELLO_TIMEOUT).await? {
            Response::Pressure(p) => Ok(p),
            _ => Err(LinkError::Unexpected("pressure")),
        }
    }
}

impl Wire {
    fn new(stream: Box<dyn Stream>) -> Wire {
        let (r, w) = tokio::io::split(stream);
        Wire {
            reader: FrameReader::new(r),
            writer: w,
            next_id: first_id(),
            events: EventLog::default(),
            dropped_log: LogLimiter::default(),
            events_log: LogLimiter::default(),
            queues_asked: false,
        }
    }

    /// `Hello`, and the guest's facts in return (of this protocol version).
    async fn hello(&mut self) -> Result<GuestInfo, LinkError> {
        self.queues_asked = false;
        let hello =
            Request::Hello { protocol: PROTOCOL_VERSION, host_agent: format!("vmplug {}", env!("CARGO_PKG_VERSION")) };
        match self.call_once(hello, HELLO_TIMEOUT).await? {
            Response::GuestInfo(info) if info.protocol == PROTOCOL_VERSION => Ok(info),
            Response::GuestInfo(info) => Err(LinkError::Version(info.protocol)),
            _ => Err(LinkError::Unexpected("hello")),
        }
    }

    async fn call_once(&mut self, req: Request, wait: Duration) -> Result<Response, LinkError> {
        let kind = req.type_name();
        self.next_id += 1;
        let id = self.next_id;
        write_frame(&mut self.writer, &Message::new(Some(id), req)).await?;
        // Reading and decoding both count against the wait.
        let deadline = Instant::now() + wait;
        tokio::time::timeout_at(deadline, self.answer(id, kind)).await.map_err(|_| LinkError::Timeout(kind, wait))?
    }

    /// Reads frames until the answer to `id`; events are kept (bounded), stale
    /// answers and invalid frames dropped. Every guest string is escaped here.
    /// Every log line the guest can cause is rate-limited, and the guest's
    /// text inside a decoding error (serde quotes what it did not expect) is
    /// escaped.
    async fn answer(&mut self, id: u64, kind: &'static str) -> Result<Response, LinkError> {
        loop {
            let Decoded::Frame(frame) = self.reader.next().await? else {
                if let Admit::Log { suppressed } = self.dropped_log.admit(Instant::now().into_std()) {
                    tracing::warn!(suppressed, "guest sent an oversized frame; dropped");
                }
                continue;
            };
            let mut env: Message<Response> = match serde_json::from_slice(&frame) {
                Ok(e) => e,
                Err(e) => {
                    if let Admit::Log { suppressed } = self.dropped_log.admit(Instant::now().into_std()) {
                        let error = vmplug_common::text::escape(&e.to_string());
                        tracing::warn!(%error, suppressed, "guest sent an invalid frame; dropped");
                    }
                    continue;
                }
            };
            env.body.escape_text();
            match (env.id, env.body) {
                (None, Response::Event(ev)) => {
                    if let Admit::Log { suppressed } = self.events_log.admit(Instant::now().into_std()) {
                        tracing::debug!(?ev, suppressed, "guest event");
                    }
                    self.events.push(ev);
                }
                (Some(i), Response::Error(e)) if i == id => {
                    return Err(LinkError::Guest { request: kind, code: e.code, message: e.message });
                }
                (Some(i), body) if i == id => return Ok(body),
                (other, _) => {
                    if let Admit::Log { suppressed } = self.dropped_log.admit(Instant::now().into_std()) {
                        tracing::debug!(id = ?other, suppressed, "stale answer ignored");
                    }
                }
            }
        }
    }

    /// Drops the underlying connection (the link is unusable afterwards).
    fn close(&mut self) {
        let (closed, _) = tokio::io::duplex(1);
        let (r, w) = tokio::io::split(Box::new(closed) as Box<dyn Stream>);
        self.reader = FrameReader::new(r);
        self.writer = w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A domain with `devices` and `metadata` children.
    fn facts(devices: &str, metadata: &str) -> DomainFacts {
        let xml = format!(
            "<domain type='kvm'><name>web1</name><metadata>{metadata}</metadata><vcpu>1</vcpu><devices>{devices}</devices></domain>"
        );
        DomainFacts::parse(&xml).expect("parses")
    }

    const PATHLESS: &str =
        "<channel type='unix'><source mode='bind'/><target type='virtio' name='org.vmplug.guest.0'/></channel>";
    /// The same channel in a running domain's live XML: libvirt's QEMU driver
    /// chose the socket under its channel directory.
    const LIVE: &str = "<channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web1/org.vmplug.guest.0'/>
      <target type='virtio' name='org.vmplug.guest.0' state='connected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>";

    /// Issue #27: a channel whose path libvirt chose is found in the live XML;
    /// the inactive XML (or a driver that shows no path, as the test driver,
    /// which drops the <source> too) gets an error that says why.
    #[test]
    fn a_channel_path_libvirt_chose_comes_from_the_live_xml() {
        assert_eq!(
            discover(&facts(LIVE, "")).expect("found"),
            AgentAddr::Serial { path: "/var/lib/libvirt/qemu/channel/target/domain-3-web1/org.vmplug.guest.0".into() }
        );
        let no_source = "<channel type='unix'><target type='virtio' name='org.vmplug.guest.0'/></channel>";
        for inactive in [PATHLESS, no_source] {
            let e = discover(&facts(inactive, "")).expect_err("no path yet");
            assert!(matches!(&e, LinkError::ChannelPathUnknown { domain } if domain == "web1"), "{e}");
            assert!(e.to_string().contains("is 'web1' running?"), "{e}");
            assert!(
                matches!(crate::preflight::AgentTrouble::from(&e), crate::preflight::AgentTrouble::NoEndpoint(_)),
                "told to preflight as nothing to connect to"
            );
        }
    }

    #[test]
    fn discovery_order_and_its_errors() {
        let vsock = "<vsock model='virtio'><cid auto='no' address='9'/></vsock>";
        let md = "<v:domain xmlns:v='https://vmplug.dev/xmlns/domain/1'><v:tag>a</v:tag><v:agent transport='hybrid' path='/run/h.sock' port='1024'/></v:domain>";
        assert_eq!(
            discover(&facts(&format!("{LIVE}{vsock}"), md)).expect("metadata first"),
            AgentAddr::Hybrid { path: "/run/h.sock".into(), port: 1024 }
        );
        assert!(matches!(discover(&facts(LIVE, "")), Ok(AgentAddr::Serial { .. })), "then the channel");
        assert_eq!(
            discover(&facts(vsock, "")).expect("then vsock"),
            AgentAddr::Vsock { cid: 9, port: DEFAULT_VSOCK_PORT }
        );
        assert!(matches!(discover(&facts("", "")), Err(LinkError::NoAddress)));
        let bad = "<v:domain xmlns:v='https://vmplug.dev/xmlns/domain/1'><v:agent transport='pigeon'/></v:domain>";
        let e = discover(&facts(LIVE, bad)).expect_err("broken metadata is said, not skipped");
        assert!(matches!(e, LinkError::Metadata(crate::settings::MetaError::Agent(_))), "{e}");
    }

    /// Security finding 5: 1024 events of nearly a frame each were kept (~250 MiB).
    #[test]
    fn the_event_log_is_bounded_in_bytes() {
        let mut log = EventLog::default();
        let big = "x".repeat(vmplug_common::frame::MAX_FRAME_BYTES - 100);
        for _ in 0..1024 {
            log.push(Event::OnlineFailed { what: big.clone(), errno: 5 });
        }
        assert!(log.bytes() <= MAX_EVENT_BYTES, "{} bytes held", log.bytes());
        assert_eq!(log.dropped, 1024, "none of them fits");
        for cpu in 0..100 {
            log.push(Event::CpuAdded { cpu });
        }
        assert_eq!(log.events.len(), 100, "small events are still kept");
    }

    #[test]
    fn agent_sockets_are_checked_before_use() {
        use std::os::unix::fs::PermissionsExt;
        let expect = SocketTrust::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.sock");
        let e = check_socket(&missing, &expect).expect_err("missing");
        assert!(e.to_string().contains(&*missing.to_string_lossy()), "names the path: {e}");
        let file = dir.path().join("file");
        std::fs::write(&file, "").expect("file");
        assert!(matches!(check_socket(&file, &expect), Err(LinkError::UnsafeSocket { .. })));
        let sock = dir.path().join("agent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        check_socket(&sock, &expect).expect("ours, not world-writable");
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = check_socket(&sock, &expect).expect_err("world-writable");
        assert!(e.to_string().contains("refused to use the agent socket"), "{e}");
        assert!(e.to_string().contains("writable by every user (mode 777)"), "{e}");
        // Ownership by other users is judged by trust::judge (its own tests);
        // chown needs root, so it is exercised here only as root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o775)).expect("chmod");
            std::os::unix::fs::chown(&sock, Some(64055), Some(993)).expect("chown to Debian's libvirt-qemu");
            check_socket(&sock, &expect).expect("a system account (Debian's libvirt-qemu) may own it");
            std::os::unix::fs::chown(&sock, Some(1500), Some(1500)).expect("chown to a login user");
            let e = check_socket(&sock, &expect).expect_err("another login user's socket");
            assert!(e.to_string().contains("owned by uid 1500"), "{e}");
        }
    }

    /// An untrusted socket is refused at once (no retrying for the whole wait),
    /// and the error says it was a refusal, not silence.
    #[tokio::test]
    async fn an_untrusted_socket_fails_at_once_naming_why() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let started = std::time::Instant::now();
        let e = GuestLink::connect(&AgentAddr::Serial { path }, Duration::from_secs(30)).await.expect_err("refused");
        assert!(started.elapsed() < Duration::from_secs(5), "refused at once: {:?}", started.elapsed());
        assert!(matches!(e, LinkError::UnsafeSocket { .. }), "{e}");
        assert!(e.to_string().starts_with("refused to use the agent socket"), "{e}");
    }

    /// A missing socket fails at once naming the path, not after the whole wait
    /// as "guest link i/o" (the retry loop ends only in `Unreachable`).
    #[tokio::test]
    async fn a_missing_socket_fails_at_once() {
        let addr = AgentAddr::Serial { path: "/nonexistent/vmplug-agent.sock".into() };
        let e = GuestLink::connect(&addr, Duration::from_secs(30)).await.expect_err("no socket");
        assert!(matches!(e, LinkError::NoSocket { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/vmplug-agent.sock"), "{e}");
    }

    /// The guest phase's milestones come from the agent's events as they
    /// arrive: the last add, then the last online, both before the report.
    #[tokio::test]
    async fn an_online_call_times_the_guests_add_and_online_events() {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (r, mut w) = tokio::io::split(s);
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
                let id = v["id"].as_u64();
                let send = |body: Response, id: Option<u64>| {
                    format!("{}\n", serde_json::to_string(&Message::new(id, body)).expect("json"))
                };
                match v["body"]["type"].as_str() {
                    Some("hello") => {
                        let mut info: serde_json::Value =
                            serde_json::from_str(include_str!("../../common/tests/golden/guest_info.json"))
                                .expect("golden");
                        info["id"] = v["id"].clone();
                        w.write_all(format!("{info}\n").as_bytes()).await.expect("write");
                    }
                    Some("online") => {
                        for (ev, pause) in
                            [(Event::MemoryAdded { block: 8 }, 40), (Event::MemoryOnlined { block: 8, zone: None }, 40)]
                        {
                            w.write_all(send(Response::Event(ev), None).as_bytes()).await.expect("write");
                            tokio::time::sleep(Duration::from_millis(pause)).await;
                        }
                        let report = Report {
                            cpus: vec![],
                            blocks: vec![],
                            cpus_online: "0".parse().expect("cpulist"),
                            memory_online: vmplug_common::Bytes(0),
                            complete: true,
                            timed_out: false,
                            duration_ms: 80,
                            queues: vec![],
                        };
                        w.write_all(send(Response::Report(report), id).as_bytes()).await.expect("write");
                    }
                    _ => {}
                }
            }
        });
        let mut link = GuestLink::connect(&AgentAddr::Serial { path }, Duration::from_secs(5)).await.expect("connect");
        assert_eq!(link.milestones(), Milestones::default(), "nothing timed before an online call");
        let req =
            OnlineRequest { cpus: None, memory: vec![], zone: ZonePolicy::Auto, timeout_ms: 5000, virtio_mem: vec![] };
        link.online_until_done(req).await.expect("report");
        let m = link.milestones();
        let (added, onlined) = (m.added_ms.expect("add seen"), m.onlined_ms.expect("online seen"));
        assert!(onlined >= added + 30, "the online event came 40 ms after the add: {m:?}");
    }

    /// What a test's tracing subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("log")).into_owned()
        }
    }

    /// Runs `wire.answer(1)` against a guest that writes `frames` and then the
    /// answer, with every log line (debug included) captured.
    async fn answer_after(frames: Vec<u8>) -> (Result<Response, LinkError>, String) {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let (host, mut guest) = tokio::io::duplex(64 * 1024);
        let mut wire = Wire::new(Box::new(host));
        tokio::spawn(async move {
            let answer = Message::new(Some(1), Response::Blocks { blocks: vec![] });
            let answer = format!("{}\n", serde_json::to_string(&answer).expect("json"));
            let _ = guest.write_all(&frames).await;
            let _ = guest.write_all(answer.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let r = timeout(Duration::from_secs(60), wire.answer(1, "blocks")).await.expect("bounded");
        drop(wire);
        (r, captured.text())
    }

    /// Security finding 5: one `status` against an agent sending `x\n` 2^20
    /// times wrote 3.1 million warnings.
    #[tokio::test]
    async fn a_flood_of_invalid_frames_is_logged_a_few_times() {
        let (r, log) = answer_after(b"x\n".repeat(50_000)).await;
        assert!(matches!(r, Ok(Response::Blocks { .. })), "{r:?}");
        let lines = log.lines().count();
        assert!(lines <= crate::lograte::BURST as usize + 1, "{lines} lines:\n{log}");
        assert!(log.contains("suppressed=49995"), "the rest counted, once: {log}");
    }

    /// Security finding 5: serde quotes the guest's text in its errors (an
    /// unknown variant), and that text reached the log raw.
    #[tokio::test]
    async fn guest_text_in_a_decoding_error_is_escaped() {
        let forged =
            "{\"v\":1,\"id\":1,\"body\":{\"type\":\"x\\n2026-01-01T00:00:00Z  INFO vmplug: forged\\u001b[2K\"}}\n";
        let (r, log) = answer_after(forged.as_bytes().to_vec()).await;
        assert!(matches!(r, Ok(Response::Blocks { .. })), "{r:?}");
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.contains("unknown variant `x\\u{a}2026-01-01T00:00:00Z  INFO vmplug: forged\\u{1b}[2K`"), "{log}");
    }

    #[test]
    fn addresses_parse_and_print() {
        for s in ["vsock:3:1023", "hybrid:/run/vm/v.sock:1023", "serial:/run/vm/agent.sock"] {
            assert_eq!(s.parse::<AgentAddr>().expect("parses").to_string(), s);
        }
        for bad in ["tcp:1.2.3.4:5", "vsock:3", "vsock:x:1", "serial:", "hybrid:/p"] {
            assert!(bad.parse::<AgentAddr>().is_err(), "{bad}");
        }
    }
}
