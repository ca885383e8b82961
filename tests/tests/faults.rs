//! Scenario 6: the guest agent is killed while it onlines a 1 GiB DIMM. Its
//! supervisor restarts it; the host's wait reconnects and ends with every block
//! online, never with an offline block unreported.

use std::time::{Duration, Instant};

use vmplug_e2e::{Guest, GuestSpec};

#[test]
fn agent_killed_while_onlining_converges() {
    let mut g = Guest::boot("fault", GuestSpec::default());
    let name = g.name.clone();
    // The host side runs in the background while the test kills the agent.
    let child = g.vmplug_spawn(&["attach-memory", &name, "1G", "--live", "--timeout", "90", "--json"]);
    // Kill the agent as soon as the first block of the DIMM exists in the guest.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = g.sh(
            "ls -d /sys/devices/system/memory/memory32 2>/dev/null && kill -9 $(cat /run/agent.pid) && echo KILLED",
        );
        if out.contains("KILLED") {
            break;
        }
        assert!(Instant::now() < deadline, "the DIMM never appeared in the guest");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("vmplug finished");
    eprintln!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    vmplug_e2e::schema::assert_valid(&r, &["(a run that exits non-zero)"]);
    let offline = g.sh("grep -l offline /sys/devices/system/memory/memory*/state | wc -l");
    assert_eq!(r["outcome"], "ok", "the wait survives the agent's restart: {r}");
    assert_eq!(offline.trim(), "0", "success means no block is left offline");
    assert_eq!(r["guest"]["blocks"].as_array().expect("blocks").len(), 8);
    assert!(g.sh("cat /tmp/agent.log").contains("agent exited"), "the agent really was killed");
}

#[test]
fn vmplug_killed_mid_attach_then_repeated_attaches_only_what_is_missing() {
    let mut g = Guest::boot("vmplugkill", GuestSpec::default());
    let name = g.name.clone();
    let args = ["attach-memory", &name, "2G", "--max-dimm", "512M", "--live", "--request-id", "crash1", "--json"];
    let mut child = g.vmplug_spawn(&args);
    // Kill it as soon as the first DIMM of the request is in the live XML.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !g.daemon.virsh_ok(&["dumpxml", &name]).contains("ua-vmplug-crash1-") {
        assert!(Instant::now() < deadline, "no DIMM was attached");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    let attached = g.daemon.virsh_ok(&["dumpxml", &name]).matches("ua-vmplug-crash1-").count();
    eprintln!("killed vmplug with {attached} of 4 DIMMs attached");
    // The same command again: the live XML is the truth; no second DIMM set.
    let r = g.vmplug_json(&args[..args.len() - 1]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let xml = g.daemon.virsh_ok(&["dumpxml", &name]);
    assert_eq!(xml.matches("ua-vmplug-crash1-").count(), 4, "exactly the request's four DIMMs");
    assert_eq!(r["guest"]["blocks"].as_array().expect("blocks").len(), 16, "the guest confirms all 2 GiB");
    assert_eq!(g.sh("grep -l offline /sys/devices/system/memory/memory*/state | wc -l").trim(), "0");
}

/// libvirtd restarted (as `systemctl restart libvirtd` does) while `attach-memory`
/// runs: once as soon as the request's first DIMM is in the live XML (libvirt
/// calls still to come), once when the guest is onlining (vmplug waiting on the
/// agent). QEMU and the guest keep running; vmplug either finishes or reports a
/// libvirt error naming the request; the same command again ends with exactly the
/// request's DIMMs, every block online.
#[test]
fn libvirtd_restarted_mid_attach_converges() {
    let mut g = Guest::boot("lvrestart", GuestSpec::default());
    let name = g.name.clone();
    let (mut tried, mut survived) = (0, 0);
    let first_block = |i: usize| 32 + 16 * i as u64;
    for (i, phase) in ["libvirt", "guest"].into_iter().enumerate() {
        tried += 1;
        let id = format!("lvr{i}");
        let args = ["attach-memory", &name, "2G", "--max-dimm", "512M", "--live", "--request-id", &id, "--json"];
        let child = g.vmplug_spawn(&args);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let hit = match phase {
                "libvirt" => g.daemon.virsh_ok(&["dumpxml", &name]).contains(&format!("ua-vmplug-{id}-")),
                _ => g
                    .sh(&format!("ls -d /sys/devices/system/memory/memory{} 2>/dev/null", first_block(i)))
                    .contains("memory"),
            };
            if hit {
                break;
            }
            assert!(Instant::now() < deadline, "the attach never reached the {phase} phase");
            std::thread::sleep(Duration::from_millis(5));
        }
        let down = g.daemon.restart();
        let out = child.wait_with_output().expect("vmplug finished");
        let code = out.status.code().unwrap_or(-1);
        eprintln!(
            "restart in the {phase} phase ({down:?} without libvirtd): vmplug exit {code}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if code != 0 {
            // A clear libvirt error (exit 3) or partial (6), never a false success,
            // and the message names the request to repeat.
            assert!([3, 6].contains(&code), "exit {code}");
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(text.contains(&format!("--request-id {id}")), "the error names the request: {text}");
        }
        let r = g.vmplug_json(&args[..args.len() - 1]);
        let xml = g.daemon.virsh_ok(&["dumpxml", &name]);
        let dimms = xml.matches(&format!("ua-vmplug-{id}-")).count();
        let offline = g.sh("grep -l offline /sys/devices/system/memory/memory*/state | wc -l");
        let ok = r["outcome"] == "ok" && dimms == 4 && offline.trim() == "0";
        eprintln!(
            "after the repeat: outcome {}, {dimms} DIMM(s) of the request, {} offline block(s)",
            r["outcome"],
            offline.trim()
        );
        if ok {
            survived += 1;
        }
    }
    eprintln!("libvirtd restart: tried {tried}, survived {survived}, lost {}", tried - survived);
    assert_eq!(survived, tried);
    assert_eq!(g.mem_total_kib() / 1024 / 1024, 4, "512 MiB at boot + 2 × 2 GiB, about 4 GiB seen by the guest");
}

/// The guest is hard-reset in the middle of an operation, as soon as the new
/// device is visible in it: while its agent onlines a 1 GiB DIMM, and while it
/// onlines hot-plugged vCPUs. QEMU keeps the devices across the reset, the agent
/// onlines them at its next start, and vmplug's wait reconnects and ends with the
/// guest's confirmation (or, if it gave up, the repeat does).
#[test]
fn guest_reset_mid_operation_converges() {
    let mut g = Guest::boot("reset", GuestSpec::default());
    let name = g.name.clone();
    let (mut tried, mut survived) = (0, 0);
    let cases: [(&[&str], &str); 2] = [
        (&["attach-memory", &name, "1G", "--live", "--request-id", "rst", "--timeout", "120"], "memory/memory32"),
        (&["setvcpus", &name, "4", "--live", "--timeout", "120"], "cpu/cpu3"),
    ];
    for (args, device) in cases {
        tried += 1;
        let child = g.vmplug_spawn(&[args, &["--json"]].concat());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !g.sh(&format!("ls -d /sys/devices/system/{device} 2>/dev/null")).contains(device) {
            assert!(Instant::now() < deadline, "{device} never appeared in the guest");
            std::thread::sleep(Duration::from_millis(10));
        }
        g.reset();
        let out = child.wait_with_output().expect("vmplug finished");
        eprintln!(
            "reset during `{}`: exit {}\n{}{}",
            args[0],
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let r = if first["outcome"] == "ok" { first } else { g.vmplug_json(args) };
        let offline_blocks = g.sh("grep -l offline /sys/devices/system/memory/memory*/state | wc -l");
        let cpus = g.online_cpus();
        eprintln!("after: outcome {}, offline blocks {}, CPUs online {cpus}", r["outcome"], offline_blocks.trim());
        if r["outcome"] == "ok" && offline_blocks.trim() == "0" {
            survived += 1;
        }
    }
    let dimms = g.daemon.virsh_ok(&["dumpxml", &name]).matches("ua-vmplug-rst-").count();
    eprintln!("guest reset: tried {tried}, survived {survived}, lost {}", tried - survived);
    assert_eq!(survived, tried);
    assert_eq!(dimms, 1, "one DIMM for the request, reset or not");
    assert_eq!(g.online_cpus(), "0-3");
    assert!(g.mem_total_kib() > 1400 * 1024, "boot memory plus the DIMM, after the reset");
}
