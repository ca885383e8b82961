//! systemd readiness and watchdog through the `sd-notify` crate (2.3 KiB on the
//! static agent, measured); an abstract `NOTIFY_SOCKET` (`@…`), which that crate
//! cannot address, is sent to here.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `states` to `$NOTIFY_SOCKET`; a no-op when not started by systemd.
fn send(states: &[NotifyState]) {
    let res = match std::env::var_os("NOTIFY_SOCKET") {
        None => return,
        Some(path) if path.as_encoded_bytes().starts_with(b"@") => send_abstract(&path.as_encoded_bytes()[1..], states),
        Some(_) => sd_notify::notify(false, states),
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

fn send_abstract(name: &[u8], states: &[NotifyState]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    UnixDatagram::unbound()?.send_to_addr(msg.as_bytes(), &addr).map(|_| ())
}

/// Startup finished, with a status line for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// One watchdog ping.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Half the watchdog period, if systemd asked *this* process for pings
/// (`WATCHDOG_USEC`, and `WATCHDOG_PID` unset or naming us, as
/// `sd_watchdog_enabled`: a child that inherited the variables never pings).
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// systemd may hand a service an abstract socket (`@…`); the crate cannot
    /// address one, this path can.
    #[test]
    fn an_abstract_notify_socket_gets_the_states_one_per_line() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vmplug-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let server = UnixDatagram::bind_addr(&addr).expect("bind");
        send_abstract(name.as_bytes(), &[NotifyState::Ready, NotifyState::Status("serving on vsock")]).expect("send");
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(std::str::from_utf8(&buf[..n]).expect("utf8"), "READY=1\nSTATUS=serving on vsock\n");
    }
}
