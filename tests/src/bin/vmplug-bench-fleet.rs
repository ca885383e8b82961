//! `make bench-fleet`: autoscale's control plane at fleet scale, on this
//! machine. Private libvirtd daemons (one per simulated host) serve libvirt's
//! test driver over their RPC sockets (`test+unix:///NODE.xml?socket=…`), each
//! with a node file of running domains; a second process plays every domain's
//! guest agent on the real wire protocol (hybrid vsock: one Unix socket per
//! host, `CONNECT <port>` picks the domain; JSON frames of `vmplug_common`);
//! the real `vmplug autoscale --dry-run` samples them all on its 5 s beat.
//! For 100, 1,000 and 10,000 domains over 1 and 10 hosts (and 10,000 over 10
//! with a tenth of the agents hung: they accept, then never answer), it
//! reports per round the daemon's wall time (listing, last answered sample,
//! last step) and CPU time, its RSS and descriptors, the /metrics scrape's
//! size and time, the domain samples missed, and every healthy domain's
//! cadence as the bench saw its decision events arrive. Raw samples go to
//! `results/fleet-raw.json`, the table to `results/fleet.md`.
//!
//! `vmplug-bench-fleet report FILE` prints the table from raw samples again.
//! No guest boots here: it needs no guest lock, but it is CPU-heavy.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmplug::harness::libvirtd::Libvirtd;

/// The beat the daemon keeps (the policy's `interval_s`).
const INTERVAL_S: u64 = 5;
/// One agent in this many hangs, in the hung configuration.
const HUNG_EVERY: usize = 10;
const GUEST_INFO: &str = include_str!("../../../common/tests/golden/guest_info.json");

#[derive(Clone, Copy, Debug)]
struct Config {
    domains: usize,
    hosts: usize,
    hung: bool,
}

impl Config {
    fn label(&self) -> String {
        let nofile = std::env::var("FLEET_NOFILE").map(|n| format!(", LimitNOFILE={n}")).unwrap_or_default();
        format!(
            "{} domains / {} host{}{}{nofile}",
            self.domains,
            self.hosts,
            if self.hosts > 1 { "s" } else { "" },
            if self.hung { ", 1/10 agents hung" } else { "" }
        )
    }
}

fn configs() -> Vec<Config> {
    if let Ok(list) = std::env::var("FLEET_CONFIGS") {
        // `100x1,10000x10h`
        return list
            .split(',')
            .filter_map(|c| {
                let hung = c.ends_with('h');
                let (d, h) = c.trim_end_matches('h').split_once('x')?;
                Some(Config { domains: d.parse().ok()?, hosts: h.parse().ok()?, hung })
            })
            .collect();
    }
    let mut v = Vec::new();
    for domains in [100, 1000, 10_000] {
        for hosts in [1, 10] {
            v.push(Config { domains, hosts, hung: false });
        }
    }
    v.push(Config { domains: 10_000, hosts: 10, hung: true });
    v
}

/// Rounds measured per configuration, after the warm-up.
fn rounds() -> usize {
    std::env::var("FLEET_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(6).max(2)
}

// ---------------------------------------------------------------- agents

/// The agents process: one listener per host (`DIR/hK.sock`), hybrid vsock's
/// `CONNECT <port>` naming the domain (its index on the host); hello and info
/// answered with the golden guest facts, pressure with a calm guest's. With
/// `hung`, the agent of every HUNG_EVERY-th domain accepts and never answers.
fn agents(dir: &Path, hosts: usize, hung: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let info: serde_json::Value = serde_json::from_str(GUEST_INFO).expect("golden guest info");
        let info = Arc::new(info);
        for h in 0..hosts {
            let path = dir.join(format!("h{h}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).expect("bind agent socket");
            let info = info.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let info = info.clone();
                    tokio::spawn(serve_agent(s, info, hung));
                }
            });
        }
        std::future::pending::<()>().await;
    });
}

fn calm_pressure() -> vmplug_common::protocol::Response {
    use vmplug_common::protocol::{Pressure, Psi, Response};
    let psi = Some(Psi { avg10: 1.0, avg60: 1.0, avg300: 1.0, total_us: 1 });
    Response::Pressure(Pressure {
        cpu_some: psi,
        memory_some: psi,
        memory_full: psi,
        mem_total: vmplug_common::Bytes(1 << 30),
        mem_available: vmplug_common::Bytes(900 << 20),
        load1: 0.1,
        load5: 0.1,
        load15: 0.1,
        cpus_online: 1,
    })
}

async fn serve_agent(s: tokio::net::UnixStream, info: Arc<serde_json::Value>, hung: bool) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let port: usize = line.trim().strip_prefix("CONNECT ").and_then(|p| p.parse().ok()).unwrap_or(0);
    if w.write_all(format!("OK {}\n", 1_000_000 + port).as_bytes()).await.is_err() {
        return;
    }
    if hung && port % HUNG_EVERY == HUNG_EVERY - 1 {
        // Hung: reads (so the host's writes succeed) and never answers.
        let mut sink = [0u8; 4096];
        while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
        return;
    }
    let mut dec = vmplug_common::frame::FrameDecoder::default();
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        dec.feed(&buf[..n], &mut frames);
        for f in frames.drain(..) {
            let vmplug_common::frame::Decoded::Frame(bytes) = f else { continue };
            let Ok(req) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            let id = req["id"].as_u64();
            let out = match req["body"]["type"].as_str() {
                Some("hello" | "info") => {
                    let mut v = (*info).clone();
                    v["id"] = id.into();
                    vmplug_common::frame::encode(&v)
                }
                Some("pressure") => {
                    vmplug_common::frame::encode(&vmplug_common::protocol::Message::new(id, calm_pressure()))
                }
                _ => continue,
            };
            let Ok(out) = out else { return };
            if w.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------- harness

fn node_xml(host: usize, per_host: usize, agent_sock: &Path) -> String {
    let mut s = String::from("<node>\n");
    for i in 0..per_host {
        s.push_str(&format!(
            "<domain type='test'><name>g{host}-{i}</name><memory unit='MiB'>1024</memory><currentMemory unit='MiB'>1024</currentMemory><vcpu placement='static' current='1'>4</vcpu><os><type arch='x86_64'>hvm</type></os><metadata><vmplug:agent xmlns:vmplug='https://vmplug.dev/xmlns/agent/1' transport='hybrid' path='{}' port='{i}'/></metadata></domain>\n",
            agent_sock.display()
        ));
    }
    s.push_str("</node>\n");
    s
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// One scrape: bytes, seconds, and the body.
fn scrape(port: u16) -> Option<(usize, f64, String)> {
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n").ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    let secs = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&body).into_owned();
    let at = text.find("\r\n\r\n").map(|i| i + 4).unwrap_or(0);
    Some((body.len() - at, secs, text[at..].to_string()))
}

/// The sum over all series of a family in a scrape (`name` exactly, any labels).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ') || r.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The largest value over a family's series.
fn metric_max(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// CPU seconds (user + system) of a process.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / clock_ticks()
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn stop(child: &mut Child) {
    // Only the process this bench started, by its PID.
    // SAFETY: kill(2) on our own child's PID, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Decision events as the bench received them: per domain, when each answered one arrived.
#[derive(Default)]
struct Seen {
    answered: HashMap<String, Vec<Instant>>,
    silent: u64,
    lines: u64,
}

fn run_config(c: Config, work: &Path, daemons: &[Libvirtd], vmplug: &Path, me: &Path) -> serde_json::Value {
    eprintln!("== {}", c.label());
    let dir = work.join(format!("c{}x{}{}", c.domains, c.hosts, if c.hung { "h" } else { "" }));
    std::fs::create_dir_all(&dir).expect("config dir");
    let agent_dir = dir.join("a");
    std::fs::create_dir_all(&agent_dir).expect("agent dir");
    let per_host = c.domains / c.hosts;
    let mut uris = Vec::new();
    for (h, daemon) in daemons.iter().enumerate().take(c.hosts) {
        let node = dir.join(format!("h{h}.xml"));
        std::fs::write(&node, node_xml(h, per_host, &agent_dir.join(format!("h{h}.sock")))).expect("node xml");
        let socket = daemon.dir.join("run/libvirt-sock");
        uris.push(format!("test+unix://{}?socket={}", node.display(), socket.display()));
    }
    let mut agents = Command::new(me)
        .args(["agents", &agent_dir.to_string_lossy(), &c.hosts.to_string(), if c.hung { "hung" } else { "healthy" }])
        .stdin(Stdio::null())
        .spawn()
        .expect("agents process");
    for h in 0..c.hosts {
        let p = agent_dir.join(format!("h{h}.sock"));
        let t = Instant::now();
        while !p.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let port = free_port();
    let policy = dir.join("policy.toml");
    let uri_list: Vec<String> = uris.iter().map(|u| format!("{u:?}")).collect();
    std::fs::write(
        &policy,
        format!(
            "uris = [{}]\nmetrics_listen = \"127.0.0.1:{port}\"\n[select]\nglobs = ['*']\n[timing]\ninterval_s = {INTERVAL_S}\n",
            uri_list.join(", ")
        ),
    )
    .expect("policy");
    let log = std::fs::File::create(dir.join("vmplug.log")).expect("log");
    // FLEET_NOFILE: the daemon under that descriptor limit (as a unit's
    // LimitNOFILE), for a fleet larger than its session budget.
    let mut cmd = match std::env::var("FLEET_NOFILE").ok().and_then(|n| n.parse::<u64>().ok()) {
        Some(n) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg("--").arg(vmplug);
            c
        }
        None => Command::new(vmplug),
    };
    let mut daemon = cmd
        .args(["autoscale", "--dry-run", "--policy", &policy.to_string_lossy()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("vmplug autoscale");
    let pid = daemon.id();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = daemon.stdout.take().expect("stdout");
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let now = Instant::now();
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                let Some(domain) = v["domain"].as_str() else { continue };
                let mut s = seen.lock().expect("seen");
                s.lines += 1;
                if v["inputs"].is_null() {
                    s.silent += 1;
                } else {
                    s.answered.entry(domain.to_string()).or_default().push(now);
                }
            }
        })
    };
    // Warm-up: the first rounds connect every session and read every XML.
    let started = Instant::now();
    let warm = loop {
        std::thread::sleep(Duration::from_millis(500));
        if let Some((_, _, text)) = scrape(port) {
            if metric(&text, "vmplug_autoscale_rounds_total") >= 3.0 {
                break Some(text);
            }
        }
        if started.elapsed() > Duration::from_secs(180) {
            break None;
        }
        if matches!(daemon.try_wait(), Ok(Some(_))) {
            break None;
        }
    };
    let Some(warm) = warm else {
        stop(&mut daemon);
        stop(&mut agents);
        let _ = reader.join();
        let log = std::fs::read_to_string(dir.join("vmplug.log")).unwrap_or_default();
        panic!(
            "{}: the daemon did not reach its third round: {}",
            c.label(),
            log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
    };
    let warmup_s = started.elapsed().as_secs_f64();
    // Measure: a scrape in the middle of each round.
    let (cpu0, t0) = (cpu_s(pid), Instant::now());
    let missed0 = metric(&warm, "vmplug_autoscale_missed_samples_total");
    let skipped0 = metric(&warm, "vmplug_autoscale_rounds_skipped_total");
    let rounds0 = metric(&warm, "vmplug_autoscale_rounds_total");
    let evicted0 = metric(&warm, "vmplug_agent_sessions_evicted_total");
    let reads0 = metric(&warm, "vmplug_domain_xml_reads_total");
    let mut per_round = Vec::new();
    for _ in 0..rounds() {
        std::thread::sleep(Duration::from_secs(INTERVAL_S));
        let cpu_before = cpu_s(pid);
        let Some((bytes, secs, text)) = scrape(port) else { continue };
        let r = serde_json::json!({
            "scrape_bytes": bytes,
            "scrape_s": secs,
            "scrape_cpu_s": cpu_s(pid) - cpu_before,
            "listing_s": metric_max(&text, "vmplug_autoscale_listing_seconds"),
            "answered_s": metric_max(&text, "vmplug_autoscale_answered_seconds"),
            "round_s": metric_max(&text, "vmplug_autoscale_round_seconds"),
            "rss_mib": rss_mib(pid),
            "fds": fds(pid),
            "sessions_open": metric(&text, "vmplug_agent_sessions_open"),
            "cpu_s_total": cpu_s(pid),
        });
        eprintln!("  {r}");
        per_round.push(r);
    }
    let (cpu1, window) = (cpu_s(pid), t0.elapsed());
    let end = scrape(port).map(|s| s.2).unwrap_or_default();
    let rounds_done = metric(&end, "vmplug_autoscale_rounds_total") - rounds0;
    let missed = metric(&end, "vmplug_autoscale_missed_samples_total") - missed0;
    let skipped = metric(&end, "vmplug_autoscale_rounds_skipped_total") - skipped0;
    let evicted = metric(&end, "vmplug_agent_sessions_evicted_total") - evicted0;
    let xml_reads = metric(&end, "vmplug_domain_xml_reads_total") - reads0;
    let budget = metric(&end, "vmplug_agent_session_budget");
    stop(&mut daemon);
    stop(&mut agents);
    let _ = reader.join();
    // Cadence of the healthy domains over the window: the largest gap between
    // two answered samples of each, as the bench received their events.
    let seen = seen.lock().expect("seen");
    let healthy: Vec<String> = (0..c.hosts)
        .flat_map(|h| (0..per_host).map(move |i| (h, i)))
        .filter(|(_, i)| !(c.hung && i % HUNG_EVERY == HUNG_EVERY - 1))
        .map(|(h, i)| format!("g{h}-{i}"))
        .collect();
    let (mut worst_gap, mut late, mut never) = (0.0f64, 0usize, 0usize);
    let mut gaps = Vec::new();
    for d in &healthy {
        let times: Vec<Instant> = seen
            .answered
            .get(d)
            .map(|v| v.iter().copied().filter(|t| *t >= t0 && *t <= t0 + window).collect())
            .unwrap_or_default();
        if times.is_empty() {
            never += 1;
            continue;
        }
        let gap = times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).fold(0.0, f64::max);
        gaps.push(gap);
        worst_gap = worst_gap.max(gap);
        if gap > 1.5 * INTERVAL_S as f64 {
            late += 1;
        }
    }
    let cpu = cpu1 - cpu0;
    let per = |k: &str| -> Vec<f64> { per_round.iter().filter_map(|r| r[k].as_f64()).collect() };
    let max = |v: Vec<f64>| v.into_iter().fold(0.0, f64::max);
    let summary = serde_json::json!({
        "config": { "domains": c.domains, "hosts": c.hosts, "hung_fraction": if c.hung { 1.0 / HUNG_EVERY as f64 } else { 0.0 } },
        "label": c.label(),
        "interval_s": INTERVAL_S,
        "warmup_s": warmup_s,
        "window_s": window.as_secs_f64(),
        "rounds": rounds_done,
        "cpu_s_per_round": if rounds_done > 0.0 { cpu / rounds_done } else { 0.0 },
        "cpu_ms_per_domain_round": if rounds_done > 0.0 { 1000.0 * cpu / rounds_done / c.domains as f64 } else { 0.0 },
        "listing_s_max": max(per("listing_s")),
        "answered_s_max": max(per("answered_s")),
        "round_s_max": max(per("round_s")),
        "rss_mib_max": max(per("rss_mib")),
        "fds_max": max(per("fds")),
        "scrape_bytes": max(per("scrape_bytes")),
        "scrape_s_max": max(per("scrape_s")),
        "missed_samples": missed,
        "rounds_skipped": skipped,
        "sessions_evicted": evicted,
        "session_budget": budget,
        "xml_reads_in_window": xml_reads,
        "healthy_domains": healthy.len(),
        "healthy_never_sampled": never,
        "healthy_gap_over_1_5_interval": late,
        "healthy_worst_gap_s": worst_gap,
        "silent_events": seen.silent,
        "events": seen.lines,
        "per_round": per_round,
    });
    eprintln!(
        "  => {}",
        serde_json::json!({ "cpu_s_per_round": summary["cpu_s_per_round"], "answered_s_max": summary["answered_s_max"], "missed": missed, "late": late, "never": never, "worst_gap_s": worst_gap })
    );
    summary
}

fn table(runs: &[serde_json::Value]) -> String {
    let mut s = String::new();
    s.push_str("| configuration | rounds | listing s (max) | last answered sample s (max) | last step s (max) | CPU s / round | CPU ms / domain·round | RSS MiB | fds | scrape | scrape s | missed samples | rounds skipped | sessions evicted | healthy domains late / never | worst healthy gap s |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.0} | {:.0} | {:.1} MB | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} of {:.0} | {:.2} |\n",
            r["label"].as_str().unwrap_or(""),
            f("rounds"),
            f("listing_s_max"),
            f("answered_s_max"),
            f("round_s_max"),
            f("cpu_s_per_round"),
            f("cpu_ms_per_domain_round"),
            f("rss_mib_max"),
            f("fds_max"),
            f("scrape_bytes") / 1e6,
            f("scrape_s_max"),
            f("missed_samples"),
            f("rounds_skipped"),
            f("sessions_evicted"),
            f("healthy_gap_over_1_5_interval"),
            f("healthy_never_sampled"),
            f("healthy_domains"),
            f("healthy_worst_gap_s"),
        ));
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("agents") => {
            let dir = PathBuf::from(&args[2]);
            let hosts: usize = args[3].parse().expect("hosts");
            agents(&dir, hosts, args.get(4).map(String::as_str) == Some("hung"));
            return;
        }
        Some("report") => {
            let raw: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&args[2]).expect("raw file")).expect("json");
            print!("{}", table(raw["runs"].as_array().map(Vec::as_slice).unwrap_or(&[])));
            return;
        }
        _ => {}
    }
    let me = std::env::current_exe().expect("own path");
    let vmplug = PathBuf::from(std::env::var("VMPLUG_BIN").unwrap_or_else(|_| "target/release/vmplug".into()));
    assert!(vmplug.exists(), "{} missing: build it (make bench-fleet does)", vmplug.display());
    let base = PathBuf::from(std::env::var("FLEET_WORK").unwrap_or_else(|_| "/tmp".into()));
    let work = vmplug::harness::workdir::fresh_dir(&base, "vf").expect("work dir");
    let configs = configs();
    let hosts = configs.iter().map(|c| c.hosts).max().unwrap_or(1);
    let cache = work.join("cache");
    std::fs::create_dir_all(&cache).expect("cache dir");
    let mut daemons = Vec::new();
    for h in 0..hosts {
        let d = work.join(format!("d{h}"));
        std::fs::create_dir(&d).expect("daemon dir");
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        daemons.push(Libvirtd::start(&d, &cache).unwrap_or_else(|e| panic!("libvirtd {h}: {e}")));
    }
    eprintln!("{} private libvirtd daemons up in {}", daemons.len(), work.display());
    eprintln!("load average at start: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    let mut runs = Vec::new();
    for c in configs {
        runs.push(run_config(c, &work, &daemons, &vmplug, &me));
    }
    for mut d in daemons {
        d.stop();
    }
    let _ = std::fs::remove_dir_all(&work);
    let machine = serde_json::json!({
        "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "libvirt": Command::new("libvirtd").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
    });
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let raw = serde_json::json!({ "date": date, "machine": machine, "interval_s": INTERVAL_S, "runs": runs });
    std::fs::create_dir_all("results").expect("results dir");
    let name = std::env::var("FLEET_OUT").unwrap_or_else(|_| "fleet".into());
    std::fs::write(format!("results/{name}-raw.json"), serde_json::to_string_pretty(&raw).expect("json")).expect("raw");
    let md =
        format!("# make bench-fleet, {date}\n\n{}", table(raw["runs"].as_array().map(Vec::as_slice).unwrap_or(&[])));
    std::fs::write(format!("results/{name}.md"), &md).expect("md");
    print!("{md}");
}
