//! systemd readiness and watchdog (`sd_notify`), without libsystemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` to `$NOTIFY_SOCKET`; a no-op when not started by systemd.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Half of `$WATCHDOG_USEC`, if systemd asked this process for watchdog pings.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_for(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// As `sd_watchdog_enabled`: the watchdog is this process's only when
/// `WATCHDOG_PID` is unset or names it (a child that inherited the variables
/// from a supervised parent must not ping on its behalf); half the period.
pub fn watchdog_for(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_ours_only_when_watchdog_pid_names_us() {
        assert_eq!(watchdog_for(Some("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_for(Some("30000000"), Some("7"), 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_for(Some("30000000"), Some("8"), 7), None, "another process's watchdog");
        assert_eq!(watchdog_for(Some("30000000"), Some("x"), 7), None);
        assert_eq!(watchdog_for(Some("0"), None, 7), None);
        assert_eq!(watchdog_for(None, Some("7"), 7), None);
    }
}
