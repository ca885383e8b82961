//! One connection: frames in, dispatch, frames out. Generic over any byte stream so
//! it runs the same over vsock, virtio-serial and an in-process socket pair.
//!
//! Per connection: `Hello` first (hot-plug requests before it are refused), one
//! Online/Offline at a time (a second request meanwhile gets `Busy`), unsolicited
//! events forwarded after the handshake. Bad frames get a specific error and the
//! connection goes on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use vmplug_common::frame::{write_frame, Decoded, FrameError, FrameReader, MAX_FRAME_BYTES};
use vmplug_common::protocol::{
    decode_request, DecodedRequest, ErrorBody, ErrorCode, Message, Request, Response, PROTOCOL_VERSION,
};

use crate::agent::Agent;

fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Message<Response> {
    Message::new(id, Response::Error(ErrorBody { code, message: message.into() }))
}

/// A vsock session that has not said hello within this time is closed.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// A vsock session with no frame and no running request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Time limits of one session, so a peer that connects and says nothing cannot
/// hold a session (and its memory) forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Close a session that has not completed `Hello` by then.
    pub hello: Option<Duration>,
    /// Close a session idle (no frame, nothing running) for this long.
    pub idle: Option<Duration>,
}

impl SessionLimits {
    /// vsock: every connection is a new peer.
    pub const VSOCK: SessionLimits = SessionLimits { hello: Some(HELLO_DEADLINE), idle: Some(IDLE_TIMEOUT) };
    /// virtio-serial: one byte stream that outlives host connections, and QEMU's
    /// chardev admits one host client at a time; a session ends when the host
    /// hangs up.
    pub const NONE: SessionLimits = SessionLimits { hello: None, idle: None };
}

/// Serves one connection until the peer closes it, `shutdown` flips, or a limit
/// of `limits` passes. `prefix` holds bytes already read from the stream
/// (virtio-serial's probe).
pub async fn serve_connection<S>(
    agent: Arc<Agent>,
    stream: S,
    prefix: Vec<u8>,
    mut shutdown: watch::Receiver<bool>,
    limits: SessionLimits,
) -> Result<(), FrameError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Message<Response>>(64);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            write_frame(&mut wr, &msg).await?;
        }
        Ok::<_, FrameError>(())
    });
    let mut reader = FrameReader::new(tokio::io::AsyncReadExt::chain(std::io::Cursor::new(prefix), rd));
    let busy = Arc::new(AtomicBool::new(false));
    // The host asked for `queues` on this connection: it knows the report's
    // `queues` field (an older host refuses a report that carries it).
    let queues_known = Arc::new(AtomicBool::new(false));
    let mut events: Option<tokio::task::JoinHandle<()>> = None;
    let started = tokio::time::Instant::now();
    let mut last_seen = started;
    let result = loop {
        let deadline = match events {
            None => limits.hello.map(|d| (started + d, "no hello")),
            Some(_) => limits.idle.map(|d| (last_seen + d, "idle")),
        };
        let item = tokio::select! {
            item = reader.next() => item,
            _ = shutdown.changed() => break Ok(()),
            _ = sleep_until(deadline.map(|(at, _)| at)) => {
                if busy.load(Ordering::Acquire) {
                    // A long request still runs: the session is not idle.
                    last_seen = tokio::time::Instant::now();
                    continue;
                }
                let why = deadline.map_or("", |(_, why)| why);
                tracing::info!(reason = why, "closing the session");
                break Ok(());
            }
        };
        last_seen = tokio::time::Instant::now();
        let frame = match item {
            Ok(Decoded::Frame(f)) => f,
            Ok(Decoded::TooLarge { len }) => {
                let msg = format!("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes");
                tracing::warn!("{msg}");
                let _ = tx.send(error(None, ErrorCode::FrameTooLarge, msg)).await;
                continue;
            }
            Err(FrameError::Closed) => break Ok(()),
            Err(e) => break Err(e),
        };
        let DecodedRequest { id, request } = match decode_request(&frame) {
            Ok(r) => r,
            Err((id, body)) => {
                tracing::warn!(code = ?body.code, "{}", body.message);
                let _ = tx.send(Message::new(id, Response::Error(body))).await;
                continue;
            }
        };
        if busy.load(Ordering::Acquire) {
            let _ = tx
                .send(error(
                    id,
                    ErrorCode::Busy,
                    format!("'{}' refused: another request is still running on this connection", request.type_name()),
                ))
                .await;
            continue;
        }
        let span = tracing::info_span!("request", id, kind = request.type_name());
        let _enter = span.enter();
        match request {
            Request::Hello { protocol, host_agent } => {
                if protocol != PROTOCOL_VERSION {
                    let _ = tx
                        .send(error(
                            id,
                            ErrorCode::VersionMismatch,
                            format!("host speaks protocol {protocol}, this agent speaks {PROTOCOL_VERSION}"),
                        ))
                        .await;
                    continue;
                }
                tracing::info!(%host_agent, "handshake");
                if events.is_none() {
                    let mut sub = agent.subscribe();
                    let tx = tx.clone();
                    events = Some(tokio::spawn(async move {
                        loop {
                            match sub.recv().await {
                                Ok(ev) => {
                                    if tx.send(Message::new(None, Response::Event(ev))).await.is_err() {
                                        break;
                                    }
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                    tracing::warn!(lost = n, "event subscriber lagged");
                                }
                                Err(_) => break,
                            }
                        }
                    }));
                }
                let _ = tx.send(respond(id, agent.info().map(Response::GuestInfo))).await;
            }
            _ if events.is_none() => {
                let _ = tx
                    .send(error(
                        id,
                        ErrorCode::HandshakeRequired,
                        format!("'{}' refused: send hello first", request.type_name()),
                    ))
                    .await;
            }
            Request::Info => {
                let _ = tx.send(respond(id, agent.info().map(Response::GuestInfo))).await;
            }
            Request::Pressure => {
                let _ = tx.send(respond(id, agent.pressure().map(Response::Pressure))).await;
            }
            Request::Queues => {
                queues_known.store(true, Ordering::Release);
                let _ = tx.send(respond(id, agent.queues().map(Response::Queues))).await;
            }
            Request::Forecast(req) => {
                let _ = tx.send(respond(id, agent.forecast(&req).map(Response::Forecast))).await;
            }
            Request::Blocks { memory } => {
                let res = agent.blocks(&memory).map(|blocks| Response::Blocks { blocks });
                let _ = tx.send(respond(id, res)).await;
            }
            Request::Online(req) => {
                let agent = agent.clone();
                let known = queues_known.clone();
                run_long(id, &busy, &tx, async move { strip_queues(agent.online(req).await, &known) });
            }
            Request::Offline(req) => {
                let agent = agent.clone();
                let known = queues_known.clone();
                run_long(id, &busy, &tx, async move { strip_queues(agent.offline(req).await, &known) });
            }
        }
    };
    if let Some(ev) = events {
        ev.abort();
    }
    drop(tx);
    // Running operations finish and their answers drain before the writer ends.
    let _ = writer.await;
    result
}

/// A report for a host that has not shown it knows the `queues` field loses it.
fn strip_queues(
    res: Result<vmplug_common::protocol::Report, crate::agent::AgentError>,
    known: &AtomicBool,
) -> Result<vmplug_common::protocol::Report, crate::agent::AgentError> {
    res.map(|mut r| {
        if !known.load(Ordering::Acquire) {
            r.queues.clear();
        }
        r
    })
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs a long request (Online/Offline) off the read loop: the connection is
/// busy until it answers, so a second request meanwhile gets `Busy`.
fn run_long(
    id: Option<u64>,
    busy: &Arc<AtomicBool>,
    tx: &mpsc::Sender<Message<Response>>,
    op: impl std::future::Future<Output = Result<vmplug_common::protocol::Report, crate::agent::AgentError>>
        + Send
        + 'static,
) {
    busy.store(true, Ordering::Release);
    let (tx, busy) = (tx.clone(), busy.clone());
    tokio::spawn(async move {
        let res = op.await.map(Response::Report);
        busy.store(false, Ordering::Release);
        let _ = tx.send(respond(id, res)).await;
    });
}

fn respond(id: Option<u64>, res: Result<Response, crate::agent::AgentError>) -> Message<Response> {
    match res {
        Ok(r) => Message::new(id, r),
        Err(e) => {
            tracing::warn!(error = %e, "request failed");
            Message::new(id, Response::Error(e.to_body()))
        }
    }
}
