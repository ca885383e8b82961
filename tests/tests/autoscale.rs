//! `vmplug autoscale` on a real guest: a CPU burner makes it add vCPUs up to the
//! policy's max and stop there; a memory eater makes it add DIMMs up to the max;
//! the JSON event log and the metrics say so.

use std::io::{Read, Write};
use std::time::Duration;

use vmplug_e2e::{Guest, GuestSpec};

fn autoscale(g: &Guest, policy: &str) -> Vec<serde_json::Value> {
    g.autoscale_once(policy)
}

#[test]
fn grows_cpus_then_memory_up_to_the_policy_and_stops() {
    let mut g = Guest::boot("autoscale", GuestSpec { vcpus: 1, max_vcpus: 4, ..GuestSpec::default() });
    let name = g.name.clone();
    let policy = format!(
        "[select]\nnames = ['{name}']\n[cpu]\nmax = 2\npsi_some_avg10 = 15.0\n[memory]\nmax = '1G'\nstep = '256M'\navailable_below = '230M'\npsi_some_avg10 = 100.0\npsi_full_avg10 = 100.0\n[timing]\ninterval_s = 1\nsustain = 2\ncooldown_s = 0\n[host]\nmemory_reserve = '64M'\n"
    );
    // Two busy loops on one vCPU: runnable tasks wait, PSI cpu "some" rises.
    g.sh("(while :; do :; done) & echo $! >/tmp/burn1; (while :; do :; done) & echo $! >/tmp/burn2");
    std::thread::sleep(Duration::from_secs(8));
    let ev = autoscale(&g, &policy);
    let last = ev.last().expect("one event per sample");
    assert_eq!(last["rule"], "cpu.psi", "{ev:?}");
    assert_eq!(last["action"]["kind"], "add_vcpus");
    assert_eq!(last["outcome"], "ok", "{last}");
    assert_eq!(g.online_cpus(), "0-1");
    // At the policy's max it stops, and says why.
    std::thread::sleep(Duration::from_secs(4));
    let ev = autoscale(&g, &policy);
    assert!(ev.iter().all(|e| e["action"]["kind"] == "none"), "{ev:?}");
    assert!(ev.iter().any(|e| e["rule"] == "cpu.at-max"), "{ev:?}");
    g.sh("kill $(cat /tmp/burn1 /tmp/burn2)");

    // Eat memory until MemAvailable (about 370 MiB at rest) is under the threshold.
    g.sh("mkdir -p /mnt && mount -t tmpfs -o size=1G tmpfs /mnt && dd if=/dev/zero of=/mnt/eat bs=1M count=180 2>/dev/null; grep MemAvailable /proc/meminfo");
    let mut added = 0;
    for _ in 0..4 {
        let ev = autoscale(&g, &policy);
        let last = ev.last().expect("events");
        if last["action"]["kind"] == "add_memory" {
            assert_eq!(last["outcome"], "ok", "{last}");
            added += 1;
            // Keep the guest under pressure after each plug.
            // Keep the guest under pressure: use what was just added.
            g.sh("dd if=/dev/zero of=/mnt/eat$RANDOM bs=1M count=256 2>/dev/null; true");
        } else {
            assert_eq!(last["rule"], "memory.at-max", "{ev:?}");
            break;
        }
    }
    assert_eq!(added, 2, "512 MiB + 2 × 256 MiB reaches the 1 GiB max, then it stops");
    let st = g.vmplug_json(&["status", &name]);
    assert_eq!(st["memory"], 1024 * 1024 * 1024u64, "{st}");
}

#[test]
fn a_silent_agent_is_left_alone_and_metrics_are_served() {
    let mut g = Guest::boot("autoscale-silent", GuestSpec::default());
    let name = g.name.clone();
    g.sh("touch /run/agent.disabled; kill $(cat /run/agent.pid)");
    // Find a free loopback port for the metrics endpoint.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let policy = format!("metrics_listen = '127.0.0.1:{port}'\n[select]\nglobs = ['vmplug-autoscale-silent-*']\n[timing]\ninterval_s = 1\nsustain = 1\n");
    let path = g.dir.join("policy.toml");
    std::fs::write(&path, policy).expect("policy");
    let mut child = std::process::Command::new(&vmplug_e2e::Env::get().vmplug)
        .args(["-c", &g.daemon.uri, "autoscale", "--policy", &path.to_string_lossy()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("daemon");
    let mut first = String::new();
    {
        let stdout = child.stdout.as_mut().expect("stdout");
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).map(|n| n == 1).unwrap_or(false) && byte[0] != b'\n' {
            first.push(byte[0] as char);
        }
    }
    let ev: serde_json::Value = serde_json::from_str(&first).expect("event");
    assert_eq!(ev["domain"], name.as_str());
    assert_eq!(ev["rule"], "agent.silent", "{ev}");
    assert_eq!(ev["action"]["kind"], "none");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    assert!(body.contains(&format!("vmplug_domain_vcpus{{domain=\"{name}\"")), "{body}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn two_hosts_by_uri_at_once() {
    // Two private libvirtd instances stand in for two hosts.
    let _slots = vmplug_e2e::guest::reserve_guests(2);
    let a = Guest::boot("as-host-a", GuestSpec::default());
    let b = Guest::boot("as-host-b", GuestSpec::default());
    let policy = format!(
        "uris = ['{}', '{}']\n[select]\nglobs = ['vmplug-as-host-*']\n[timing]\ninterval_s = 1\nsustain = 1\n",
        a.daemon.uri, b.daemon.uri
    );
    let path = a.dir.join("two-hosts.toml");
    std::fs::write(&path, policy).expect("policy");
    let out = a.vmplug(&["autoscale", "--policy", &path.to_string_lossy(), "--once", "--dry-run"]);
    assert!(out.status.success());
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("event")).collect();
    for g in [&a, &b] {
        let ev = events
            .iter()
            .find(|e| e["domain"] == g.name.as_str())
            .unwrap_or_else(|| panic!("no event for {}: {events:?}", g.name));
        assert_eq!(ev["uri"], g.daemon.uri.as_str());
        assert_eq!(ev["dry_run"], true);
        assert!(ev["inputs"].is_object(), "pressure read from each host's guest: {ev}");
    }
}

/// The `vmplug_agent_sessions_total` of `domain` in a metrics exposition.
fn sessions_of(metrics: &str, domain: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with("vmplug_agent_sessions_total{") && l.contains(&format!("domain=\"{domain}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A running autoscale keeps one session per vsock guest, and takes a
/// virtio-serial guest's single-client channel only for each step, so an
/// operator's `vmplug` works on both guests while autoscale watches them.
#[test]
fn an_operator_and_a_running_autoscale_share_each_guest() {
    use vmplug_e2e::procs::{free_port, http, start, wait_for, Procs};
    use vmplug_e2e::Transport;
    let _slots = vmplug_e2e::guest::reserve_guests(2);
    let mut serial = Guest::boot("as-share-serial", GuestSpec::default());
    let mut vsock = Guest::boot("as-share-vsock", GuestSpec { transport: Transport::Vsock, ..GuestSpec::default() });
    let port = free_port();
    let policy = format!(
        "uris = ['{}', '{}']\nmetrics_listen = '127.0.0.1:{port}'\n[select]\nnames = ['{}', '{}']\n\
         [timing]\ninterval_s = 1\nsustain = 1\n[cpu]\npsi_some_avg10 = 100.0\n\
         [memory]\navailable_below = '1M'\npsi_some_avg10 = 100.0\npsi_full_avg10 = 100.0\n",
        serial.daemon.uri, vsock.daemon.uri, serial.name, vsock.name
    );
    let path = serial.dir.join("share.toml");
    std::fs::write(&path, policy).expect("policy");
    let env = vmplug_e2e::Env::get();
    let _procs = Procs(vec![start(
        &serial.dir,
        "autoscale",
        std::process::Command::new(&env.vmplug).args(["autoscale", "--policy", &path.to_string_lossy()]),
    )]);
    let scrape = || http(port, "GET", "/metrics", "").map(|(_, body)| body);
    let mut m = String::new();
    let sampling = vmplug::wait::Wait::new("autoscale to sample both guests", Duration::from_secs(30))
        .every(Duration::from_millis(500))
        .until_blocking(|| {
            m = scrape().unwrap_or_default();
            (sessions_of(&m, &serial.name).is_some_and(|n| n >= 2) && sessions_of(&m, &vsock.name).is_some())
                .then_some(())
        });
    if let Err(e) = sampling {
        let log = std::fs::read_to_string(serial.dir.join("autoscale.log")).unwrap_or_default();
        panic!("{e}:\n{m}\n{log}");
    }

    // The operator, while autoscale samples every second.
    for g in [&serial, &vsock] {
        let r = g.vmplug_json(&["setvcpus", &g.name, "2"]);
        assert_eq!(r["outcome"], "ok", "{r}");
        let r = g.vmplug_json(&["attach-memory", &g.name, "256M"]);
        assert_eq!(r["outcome"], "ok", "{r}");
    }
    assert_eq!(serial.online_cpus(), "0-1");
    assert_eq!(vsock.online_cpus(), "0-1");

    // Autoscale went on: a new session per step on virtio-serial, still its
    // first one on vsock.
    let before = sessions_of(&scrape().expect("metrics"), &serial.name).expect("serial sessions");
    let m = wait_for("more autoscale rounds", Duration::from_secs(30), || {
        let m = scrape()?;
        (sessions_of(&m, &serial.name)? >= before + 2).then_some(m)
    });
    assert_eq!(sessions_of(&m, &vsock.name), Some(1), "one vsock session all along:\n{m}");
    assert!(
        m.lines().any(|l| l.starts_with("vmplug_guest_cpus_online{") && l.contains(&vsock.name) && l.ends_with(" 2")),
        "the kept session still reads fresh guest facts (2 CPUs online):\n{m}"
    );
}
