//! The long-running agent: uevent task, listeners, readiness, shutdown.

use std::sync::Arc;

use tokio::sync::watch;

use crate::agent::Agent;
use crate::config::Config;
use crate::server::serve_connection;
use crate::transport::{find_serial_port, open_serial, VsockListener};
use crate::uevent::UeventSocket;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on vsock port {port}")]
    Vsock { port: u32, source: std::io::Error },
    #[error("virtio-serial port '{0}' not found (no /dev/virtio-ports link, no /sys/class/virtio-ports entry)")]
    SerialMissing(String),
    #[error("cannot open virtio-serial port {0}")]
    Serial(std::path::PathBuf, #[source] std::io::Error),
    #[error("no transport enabled: set vsock_port or serial_port")]
    NoTransport,
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(agent: Arc<Agent>, config: &Config) -> Result<(), DaemonError> {
    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    match UeventSocket::open() {
        Ok(mut sock) => {
            let agent = agent.clone();
            let mut stop = shutdown.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        ev = sock.next() => match ev {
                            Ok(Some(ev)) => agent.on_uevent(&ev).await,
                            Ok(None) => agent.notify_changed(),
                            Err(e) => { tracing::error!(error = %e, "uevent socket failed; requests still rescan sysfs"); break; }
                        },
                        _ = stop.changed() => break,
                    }
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "no uevent socket; requests rescan sysfs while they wait")
        }
    }

    if config.online_at_start {
        match agent.online_everything().await {
            Ok(r) if r.failures() > 0 => {
                tracing::warn!(failures = r.failures(), "start-up onlining had failures")
            }
            Ok(r) => tracing::info!(cpus = r.cpus.len(), blocks = r.blocks.len(), "start-up onlining done"),
            Err(e) => tracing::warn!(error = %e, "start-up onlining failed"),
        }
    }

    let mut transports = 0;
    if config.vsock_port != 0 {
        let listener = VsockListener::bind(config.vsock_port)
            .map_err(|source| DaemonError::Vsock { port: config.vsock_port, source })?;
        tracing::info!(port = config.vsock_port, "listening on vsock");
        transports += 1;
        let agent = agent.clone();
        let mut stop = shutdown.clone();
        let conn_shutdown = shutdown.clone();
        tasks.spawn(async move {
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
        let sysfs = agent.sysfs().clone();
        match find_serial_port(&sysfs, &config.dev_root, &config.serial_port) {
            Some(path) => {
                let stream = open_serial(&path).map_err(|e| DaemonError::Serial(path.clone(), e))?;
                tracing::info!(path = %path.display(), "serving virtio-serial port");
                transports += 1;
                let agent = agent.clone();
                let mut stop = shutdown.clone();
                tasks.spawn(async move {
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
            None if config.vsock_port == 0 => return Err(DaemonError::SerialMissing(config.serial_port.clone())),
            None => {
                tracing::warn!(name = %config.serial_port, "virtio-serial port not present; vsock only")
            }
        }
    }
    if transports == 0 {
        return Err(DaemonError::NoTransport);
    }

    agent.emit(vmplug_common::protocol::Event::AgentStarted { version: env!("CARGO_PKG_VERSION").into() });
    crate::notify::notify("READY=1\nSTATUS=serving");
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

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| DaemonError::Vsock { port: 0, source: e })?;
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
