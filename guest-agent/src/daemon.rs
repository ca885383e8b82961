//! The long-running agent: uevent task, listeners, readiness, shutdown.
//!
//! Transports may appear after the agent starts (under systemd, udev loads
//! `virtio_console` and the vsock transport in parallel with early services), so
//! each transport task waits for its device on uevents instead of failing: no
//! polling, and `READY=1` goes out as soon as the first transport listens.

use std::sync::Arc;

use tokio::sync::watch;

use crate::agent::Agent;
use crate::config::Config;
use crate::server::serve_connection;
use crate::transport::{find_serial_port, open_serial, VsockListener};
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
            crate::notify::notify(&format!("READY=1\nSTATUS=serving on {what}"));
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
        let (mut stop, mut devices) = (shutdown.clone(), devices.clone());
        let conn_shutdown = shutdown.clone();
        tasks.spawn(async move {
            let listener = loop {
                devices.borrow_and_update();
                match VsockListener::bind(port) {
                    Ok(l) => break l,
                    Err(e) => tracing::info!(port, error = %e, "vsock not available yet; waiting for devices"),
                }
                tokio::select! {
                    r = devices.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
            };
            tracing::info!(port, "listening on vsock");
            ready.listening("vsock");
            loop {
                tokio::select! {
                    conn = listener.accept() => match conn {
                        Ok(stream) => {
                            tracing::info!("host connected over vsock");
                            let (agent, stop) = (agent.clone(), conn_shutdown.clone());
                            tokio::spawn(async move {
                                if let Err(e) = serve_connection(agent, stream, Vec::new(), stop).await {
                                    tracing::warn!(error = %e, "vsock connection ended");
                                }
                            });
                        }
                        Err(e) => tracing::warn!(error = %e, "vsock accept failed"),
                    },
                    _ = stop.changed() => break,
                }
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
                if let Err(e) = serve_connection(agent.clone(), stream.clone(), prefix, stop.clone()).await {
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
                    _ = tick.tick() => crate::notify::notify("WATCHDOG=1"),
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
    crate::notify::notify("STOPPING=1");
    let _ = shutdown_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}
