//! The long-running agent: uevent task, listeners, readiness, shutdown.
//!
//! Transports may appear after the agent starts (under systemd, udev loads
//! `virtio_console` and the vsock transport in parallel with early services), so
//! each transport task waits for its device on uevents instead of failing: no
//! polling, and `READY=1` goes out as soon as the first transport listens.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::agent::Agent;
use crate::config::Config;
use crate::server::{serve_connection, SessionLimits};
use crate::transport::{find_serial_port, open_serial, VsockListener, LAST_PRIVILEGED_PORT};
use crate::uevent::UeventSocket;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no transport enabled: set vsock_port or serial_port")]
    NoTransport,
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// Tells systemd we are ready once, when the first transport listens.
#[derive(Debug)]
struct Readiness(std::sync::Once);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(std::sync::Once::new())
    }
}

impl Readiness {
    fn listening(&self, what: &str) {
        self.0.call_once(|| {
            crate::notify::ready(&format!("serving on {what}"));
        });
    }
}

/// Most vsock sessions served at once; a connection beyond them is closed at once.
pub const MAX_VSOCK_SESSIONS: usize = 4;
/// First and longest pause after a failed `accept` (EMFILE, ENOBUFS, …); the
/// pause doubles while failures go on and resets after a success.
pub const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));

/// Binds the vsock listener, waiting for the vsock device on uevents; `None` on shutdown.
async fn bind_vsock(
    port: u32,
    privileged_peer: bool,
    mut stop: watch::Receiver<bool>,
    mut devices: watch::Receiver<u64>,
) -> Option<VsockListener> {
    if port > LAST_PRIVILEGED_PORT {
        tracing::warn!(port, "vsock port is not privileged: any guest user could bind it first and answer the host");
    }
    loop {
        devices.borrow_and_update();
        match VsockListener::bind(port, privileged_peer) {
            Ok(l) => return Some(l),
            Err(e) => tracing::info!(port, error = %e, "vsock not available yet; waiting for devices"),
        }
        tokio::select! {
            r = devices.changed() => if r.is_err() { return None },
            _ = stop.changed() => return None,
        }
    }
}

/// Accepts host sessions until shutdown: at most [`MAX_VSOCK_SESSIONS`] at
/// once, each under [`SessionLimits::VSOCK`], accept failures backed off.
async fn serve_vsock(agent: Arc<Agent>, listener: VsockListener, mut stop: watch::Receiver<bool>) {
    let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_VSOCK_SESSIONS));
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = stop.changed() => return,
        };
        let stream = match conn {
            Ok(stream) => {
                backoff = ACCEPT_BACKOFF.0;
                stream
            }
            Err(e) => {
                tracing::warn!(error = %e, pause = ?backoff, "vsock accept failed; pausing");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            tracing::warn!(max = MAX_VSOCK_SESSIONS, "refused vsock connection: too many sessions open");
            continue;
        };
        tracing::info!("host connected over vsock");
        let (agent, stop) = (agent.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_connection(agent, stream, Vec::new(), stop, SessionLimits::VSOCK).await {
                tracing::warn!(error = %e, "vsock connection ended");
            }
            drop(permit);
        });
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(agent: Arc<Agent>, config: &Config) -> Result<(), DaemonError> {
    if config.vsock_port == 0 && config.serial_port.is_empty() {
        return Err(DaemonError::NoTransport);
    }
    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let ready = Arc::new(Readiness::default());
    // Bumped on every uevent: transports waiting for their device look again.
    let (devices_tx, devices) = watch::channel(0u64);

    match UeventSocket::open() {
        Ok(mut sock) => {
            let agent = agent.clone();
            let mut stop = shutdown.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        ev = sock.next() => match ev {
                            Ok(Some(ev)) => {
                                agent.on_uevent(&ev).await;
                                devices_tx.send_modify(|n| *n += 1);
                            }
                            Ok(None) => {
                                agent.notify_changed();
                                devices_tx.send_modify(|n| *n += 1);
                            }
                            Err(e) => { tracing::error!(error = %e, "uevent socket failed; requests still rescan sysfs"); break; }
                        },
                        _ = stop.changed() => break,
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "no uevent socket; requests rescan sysfs while they wait"),
    }

    if config.online_at_start {
        match agent.online_everything().await {
            Ok(r) if r.failures() > 0 => tracing::warn!(failures = r.failures(), "start-up onlining had failures"),
            Ok(r) => tracing::info!(cpus = r.cpus.len(), blocks = r.blocks.len(), "start-up onlining done"),
            Err(e) => tracing::warn!(error = %e, "start-up onlining failed"),
        }
    }

    if config.vsock_port != 0 {
        let (agent, ready, port) = (agent.clone(), ready.clone(), config.vsock_port);
        let privileged_peer = config.vsock_privileged_peer;
        let (stop, devices) = (shutdown.clone(), devices.clone());
        tasks.spawn(async move {
            if let Some(listener) = bind_vsock(port, privileged_peer, stop.clone(), devices).await {
                tracing::info!(port, privileged_peer, "listening on vsock");
                ready.listening("vsock");
                serve_vsock(agent, listener, stop).await;
            }
        });
    }
    if !config.serial_port.is_empty() {
        let (agent, ready) = (agent.clone(), ready.clone());
        let (name, dev_root) = (config.serial_port.clone(), config.dev_root.clone());
        let (mut stop, mut devices) = (shutdown.clone(), devices);
        tasks.spawn(async move {
            let sysfs = agent.sysfs().clone();
            let stream = loop {
                devices.borrow_and_update();
                match find_serial_port(&sysfs, &dev_root, &name).map(|p| (open_serial(&p), p)) {
                    Some((Ok(s), path)) => {
                        tracing::info!(path = %path.display(), "serving virtio-serial port");
                        break s;
                    }
                    Some((Err(e), path)) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot open virtio-serial port")
                    }
                    None => tracing::info!(%name, "virtio-serial port not present yet; waiting for devices"),
                }
                tokio::select! {
                    r = devices.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
            };
            ready.listening("virtio-serial");
            loop {
                let mut prefix = Vec::new();
                tokio::select! {
                    r = stream.wait_for_peer(&mut prefix) => if let Err(e) = r {
                        tracing::error!(error = %e, "virtio-serial port failed");
                        break;
                    },
                    _ = stop.changed() => break,
                }
                if let Err(e) =
                    serve_connection(agent.clone(), stream.clone(), prefix, stop.clone(), SessionLimits::NONE).await
                {
                    tracing::warn!(error = %e, "virtio-serial session ended");
                }
                if *stop.borrow() {
                    break;
                }
            }
        });
    }

    agent.emit(vmplug_common::protocol::Event::AgentStarted { version: env!("CARGO_PKG_VERSION").into() });
    if let Some(every) = crate::notify::watchdog_interval() {
        let mut stop = shutdown.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => crate::notify::watchdog(),
                    _ = stop.changed() => break,
                }
            }
        });
    }

    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(DaemonError::Signals)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    crate::notify::stopping();
    let _ = shutdown_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}
