//! Reliability: a hot-plug requested while the guest is still booting waits for
//! the agent's handshake (bounded); 200 offline/online cycles through the agent
//! leave its RSS and open file count flat.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmplug_e2e::{Guest, GuestSpec};

#[test]
fn hot_plug_before_the_agent_is_ready_waits_for_the_handshake() {
    let mut g = Guest::define("early", GuestSpec::default());
    let name = g.name.clone();
    g.start_nowait();
    // The guest is still in firmware: vmplug must wait, not plug blind.
    let r = g.vmplug_json(&["setvcpus", &name, "2", "--live", "--agent-timeout", "90"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    g.wait_ready();
    assert_eq!(g.online_cpus(), "0-1");
}

/// A minimal protocol client on the virtio-serial socket, doing what the host's
/// link does when an answer never comes: close, connect again, say hello, and
/// ask again (requests are totals, so the repeat is harmless). Each such stall is
/// counted and reported, never hidden.
struct Client {
    path: std::path::PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    id: u64,
    /// Requests whose answer did not come within the read timeout.
    stalls: u32,
    requests: u32,
}

/// How long one answer may take before the client reconnects (a CPU online or
/// offline takes well under a second under TCG).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    fn connect(path: &std::path::Path) -> Client {
        let s = UnixStream::connect(path).expect("agent socket");
        s.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("timeout");
        let reader = BufReader::new(s.try_clone().expect("clone"));
        Client { path: path.to_path_buf(), reader, writer: s, id: 1 << 40, stalls: 0, requests: 0 }
    }

    /// One request and its answer, or `None` when none came within the timeout.
    fn try_call(&mut self, body: &serde_json::Value) -> Option<serde_json::Value> {
        self.id += 1;
        let frame = serde_json::json!({"v": 1, "id": self.id, "body": body});
        writeln!(self.writer, "{frame}").expect("send");
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(n) if n > 0 => {}
                Ok(_) => return None,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return None
                }
                Err(e) => panic!("reading the agent's answer: {e}"),
            }
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON frame");
            if v["id"].as_u64() == Some(self.id) {
                return Some(v["body"].clone());
            }
        }
    }

    fn call(&mut self, body: serde_json::Value) -> serde_json::Value {
        self.requests += 1;
        if let Some(v) = self.try_call(&body) {
            return v;
        }
        self.stalls += 1;
        eprintln!("soak: no answer to request {} within {ANSWER_TIMEOUT:?}; reconnecting", self.requests);
        // virtio-serial serves one host client at a time: close before connecting.
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        let (path, stalls, requests) = (self.path.clone(), self.stalls, self.requests);
        *self = Client { stalls, requests, ..Client::connect(&path) };
        let hello = serde_json::json!({"type": "hello", "protocol": 1, "host_agent": "soak"});
        assert_eq!(self.try_call(&hello).expect("hello after reconnecting")["type"], "guest_info");
        self.try_call(&body).expect("an answer after reconnecting")
    }
}

fn agent_rss_and_fds(g: &mut Guest) -> (u64, u64) {
    let out =
        g.sh("p=$(cat /run/agent.pid); grep VmRSS /proc/$p/status | tr -s ' ' | cut -d' ' -f2; ls /proc/$p/fd | wc -l");
    let v: Vec<u64> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (v[0], v[1])
}

#[test]
fn soak_200_cpu_offline_online_cycles_through_the_agent() {
    let mut g = Guest::boot("soak", GuestSpec { vcpus: 2, max_vcpus: 2, ..GuestSpec::default() });
    let mut c = Client::connect(&g.dir.join("agent.sock"));
    assert_eq!(c.call(serde_json::json!({"type": "hello", "protocol": 1, "host_agent": "soak"}))["type"], "guest_info");
    let cycle = |c: &mut Client| {
        let off = c.call(serde_json::json!({"type": "offline", "cpus": 1, "timeout_ms": 20000}));
        let on = c.call(serde_json::json!({"type": "online", "cpus": 2, "timeout_ms": 20000}));
        off["complete"] == true && on["complete"] == true
    };
    for _ in 0..10 {
        assert!(cycle(&mut c), "warm-up cycle");
    }
    let (rss0, fds0) = agent_rss_and_fds(&mut g);
    let (mut tried, mut survived) = (0, 0);
    for _ in 0..200 {
        tried += 1;
        if cycle(&mut c) {
            survived += 1;
        }
    }
    let (rss1, fds1) = agent_rss_and_fds(&mut g);
    eprintln!(
        "soak: tried {tried}, survived {survived}, lost {}; {} of {} answers stalled; agent RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}",
        tried - survived,
        c.stalls,
        c.requests
    );
    assert_eq!(survived, tried, "every cycle completes");
    // Seen once in about 420 requests under heavy load (2026-12-02, cause not yet
    // found, tests/README.md): rare, and recovered as the host's link recovers.
    assert!(c.stalls <= 2, "answers stalled {} times in {} requests", c.stalls, c.requests);
    assert_eq!(g.online_cpus(), "0-1");
    assert_eq!(fds1, fds0, "no file descriptor leaks");
    assert!(rss1 <= rss0 + 512, "RSS stays flat (allocator noise aside): {rss0} -> {rss1} KiB");
}

/// DIMM plug then unplug, each through vmplug (the guest agent onlines, then
/// offlines before the detach), many times: every cycle ends with the guest back at
/// its boot memory and the agent's RSS and open files flat.
#[test]
fn soak_dimm_plug_unplug_cycles() {
    let cycles: u32 = std::env::var("VMPLUG_SOAK_DIMM_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mut g = Guest::boot("dimmsoak", GuestSpec::default());
    let name = g.name.clone();
    let boot_kib = g.mem_total_kib();
    let cycle = |g: &mut Guest, i: u32| -> Result<(), String> {
        let id = format!("soak{i}");
        let plug = g.vmplug_quiet(&["attach-memory", &name, "256M", "--live", "--request-id", &id, "--json"]);
        let unplug = g.vmplug_quiet(&["detach-memory", &name, "--request-id", &id, "--live", "--json"]);
        for (what, out) in [("attach", plug), ("detach", unplug)] {
            if !out.status.success() {
                return Err(format!("{what} of cycle {i}: {}", String::from_utf8_lossy(&out.stdout)));
            }
        }
        Ok(())
    };
    // The first cycle, looked at closely.
    cycle(&mut g, 0).expect("first cycle");
    assert_eq!(g.mem_total_kib(), boot_kib, "the guest is back at its boot memory");
    assert_eq!(g.sh("ls -d /sys/devices/system/memory/memory* | wc -l").trim(), "4", "only the boot blocks remain");
    assert!(!g.daemon.virsh_ok(&["dumpxml", &name]).contains("ua-vmplug-soak0-"));
    let (rss0, fds0) = agent_rss_and_fds(&mut g);
    let started = std::time::Instant::now();
    let (mut tried, mut survived, mut failures) = (0, 0, Vec::new());
    for i in 1..=cycles {
        tried += 1;
        match cycle(&mut g, i) {
            Ok(()) => survived += 1,
            Err(e) => failures.push(e),
        }
    }
    let per_cycle = started.elapsed() / cycles.max(1);
    let (rss1, fds1) = agent_rss_and_fds(&mut g);
    let dimms_left = g.daemon.virsh_ok(&["dumpxml", &name]).matches("<memory model='dimm'").count();
    let mem_now = g.mem_total_kib();
    eprintln!(
        "dimm soak: tried {tried}, survived {survived}, lost {}; {per_cycle:?} per plug+unplug; agent RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}; DIMMs left {dimms_left}; MemTotal {boot_kib} -> {mem_now} KiB",
        tried - survived
    );
    assert!(failures.is_empty(), "{} failed cycles, first: {}", failures.len(), failures[0]);
    assert_eq!(dimms_left, 0, "every DIMM went away");
    assert_eq!(mem_now, boot_kib, "the guest is back at its boot memory");
    assert_eq!(fds1, fds0, "no file descriptor leaks");
    assert!(rss1 <= rss0 + 512, "RSS stays flat (allocator noise aside): {rss0} -> {rss1} KiB");
}

/// Memory added exactly when the guest has run out of it: a RAM-backed file
/// leaves about 24 MiB available. The agent still answers (status); a 1 GiB DIMM,
/// whose memory map alone needs more than that, is refused before libvirt is
/// asked; a 512 MiB DIMM is attached and onlined, and the agent is neither killed
/// nor restarted.
#[test]
fn the_agent_answers_and_onlines_when_guest_memory_is_nearly_full() {
    let mut g = Guest::boot("memfull", GuestSpec::default());
    let name = g.name.clone();
    let avail_kib = |g: &mut Guest| -> u64 {
        let out = g.sh("grep MemAvailable /proc/meminfo");
        out.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("MemAvailable")
    };
    let agent_pid = g.sh("cat /run/agent.pid");
    // Unevictable (ramfs) pages: the kernel cannot reclaim them.
    let fill_mib = avail_kib(&mut g) / 1024 - 24;
    g.sh(&format!(
        "mkdir -p /fill && mount -t ramfs ramfs /fill && dd if=/dev/zero of=/fill/f bs=1M count={fill_mib} 2>&1 | tail -1"
    ));
    let before = avail_kib(&mut g);
    eprintln!("filled {fill_mib} MiB: MemAvailable {} MiB", before / 1024);
    assert!(before < 32 * 1024, "memory is nearly full: {before} KiB available");
    let st = g.vmplug_json(&["status", &name]);
    let seen = st["guest"]["mem_available"].as_u64().expect("the agent reports MemAvailable");
    assert!(seen < 32 << 20, "the agent sees the pressure: {seen} bytes");
    // 1 GiB needs 32 MiB for its memory map: refused, nothing attached.
    let big = g.vmplug(&["attach-memory", &name, "1G", "--live", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&big.stdout).expect("JSON report");
    assert_eq!(big.status.code(), Some(2), "{r}");
    assert!(r["findings"].as_array().expect("findings").iter().any(|f| f["id"] == "mem.guest-free"), "{r}");
    assert!(!g.daemon.virsh_ok(&["dumpxml", &name]).contains("<memory model='dimm'"), "nothing was attached");
    let r = g.vmplug_json(&["attach-memory", &name, "512M", "--live"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(r["guest"]["blocks"].as_array().expect("blocks").len(), 4);
    let after = avail_kib(&mut g);
    eprintln!(
        "memory nearly full: tried 1, survived 1, lost 0; MemAvailable {} -> {} MiB",
        before / 1024,
        after / 1024
    );
    assert!(after > before + 400 * 1024, "the new memory is usable: {before} -> {after} KiB");
    assert_eq!(g.sh("cat /run/agent.pid"), agent_pid, "the agent was neither killed nor restarted");
    assert!(!g.sh("cat /tmp/agent.log").contains("agent exited"));
    g.sh("rm -f /fill/f; umount /fill");
}
