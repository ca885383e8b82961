//! Scenario 5: the same closed loop over hybrid vsock (vhost-device-vsock) and
//! over virtio-serial.

use vmplug_e2e::{Guest, GuestSpec, Transport};

fn closed_loop(transport: Transport) {
    let mut g = Guest::boot(
        if transport == Transport::Vsock { "vsock" } else { "serial" },
        GuestSpec { transport, ..GuestSpec::default() },
    );
    let name = g.name.clone();
    // No host connected yet: the agent must sleep, not spin (a virtio-serial port
    // without a host reports a level hang-up; waiting on it naively burns a CPU).
    let before = g.agent_cpu_ticks();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let burnt = g.agent_cpu_ticks() - before;
    assert!(burnt < 30, "the idle agent used {burnt} ticks of CPU in 3 s: it is busy-looping");
    let r = g.vmplug_json(&["setvcpus", &name, "2", "--live"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let r = g.vmplug_json(&["attach-memory", &name, "256M", "--live"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(g.online_cpus(), "0-1");
    let st = g.vmplug_json(&["status", &name]);
    assert!(st["agent_error"].is_null(), "{st}");
    assert_eq!(st["guest"]["cpus"]["online"], "0-1");
    if transport == Transport::Vsock {
        tags_and_agent_share_one_element(&g);
    }
}

/// libvirt keeps one metadata element per namespace: the vsock guest's agent
/// address (in vmplug's element) and tags set by `vmplug meta` live in that
/// one element, both survive live and config, and autoscale selects the
/// domain by tag and reaches its agent through the same element.
fn tags_and_agent_share_one_element(g: &Guest) {
    let name = g.name.clone();
    let r = g.vmplug_json(&["meta", &name, "--tag", "web", "--tag", "autoscale"]);
    for view in ["live", "config"] {
        let tags: Vec<&str> = r[view]["tags"].as_array().expect("tags").iter().filter_map(|t| t.as_str()).collect();
        assert_eq!(tags, ["web", "autoscale"], "{view}: {r}");
        assert!(r[view]["agent"].as_str().is_some_and(|a| a.starts_with("hybrid:")), "{view}: {r}");
    }
    let xml = g.daemon.virsh_ok(&["dumpxml", "--inactive", &name]);
    assert_eq!(xml.matches("https://vmplug.dev/xmlns/domain/1").count(), 1, "one element: {xml}");
    let ev = g.autoscale_once(
        "[select]\ntag = 'autoscale'\n[cpu]\nmax = 2\n[memory]\nmax = '1G'\n[timing]\ninterval_s = 1\nsustain = 1\n",
    );
    let mine: Vec<_> = ev.iter().filter(|e| e["domain"] == name.as_str()).collect();
    assert!(!mine.is_empty(), "selected by tag: {ev:?}");
    assert!(mine.iter().all(|e| !e["inputs"].is_null()), "its agent was reached through the element: {mine:?}");
}

#[test]
fn over_hybrid_vsock() {
    closed_loop(Transport::Vsock);
}

#[test]
fn over_virtio_serial() {
    closed_loop(Transport::Serial);
}

/// The channel as `vmplug prepare` adds it: no socket path, so libvirt puts the
/// socket under its own channel directory (owned by QEMU's user) and vmplug
/// finds it in the live XML and trusts it as the domain's own.
#[test]
fn over_the_channel_libvirt_placed() {
    let mut g = Guest::boot("libvirt-channel", GuestSpec { libvirt_channel: true, ..GuestSpec::default() });
    let name = g.name.clone();
    let live = g.daemon.virsh_ok(&["dumpxml", &name]);
    assert!(live.contains("/run/libvirt/qemu/channel/"), "libvirt chose the path: {live}");
    // That path is libvirt's /run/libvirt, which for this private daemon exists
    // in its mount namespace only: vmplug runs there, as it would on a host.
    let daemon_pid = std::fs::read_to_string(g.daemon.dir.join("libvirtd.pid")).expect("pid");
    let out = std::process::Command::new("nsenter")
        .args(["-t", daemon_pid.trim(), "-m", "--"])
        .arg(&vmplug_e2e::Env::get().vmplug)
        .args(["-c", &g.daemon.uri, "setvcpus", &name, "2", "--live", "--json"])
        .output()
        .expect("nsenter vmplug");
    let r: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(g.online_cpus(), "0-1");
}
