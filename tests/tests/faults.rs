//! Scenario 6: the guest agent is killed while it onlines a 1 GiB DIMM. Its
//! supervisor restarts it; the host's wait reconnects and ends with every block
//! online, never with an offline block unreported.

use std::process::Command;
use std::time::{Duration, Instant};

use vmplug_e2e::{Env, Guest, GuestSpec};

#[test]
fn agent_killed_while_onlining_converges() {
    let mut g = Guest::boot("fault", GuestSpec::default());
    let name = g.name.clone();
    let env = Env::get();
    // The host side runs in the background while the test kills the agent.
    let child = Command::new(&env.vmplug)
        .args(["-c", &g.daemon.uri, "attach-memory", &name, "1G", "--live", "--timeout", "90", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vmplug");
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
    let env = Env::get();
    let args = ["attach-memory", &name, "2G", "--max-dimm", "512M", "--live", "--request-id", "crash1", "--json"];
    let mut child = Command::new(&env.vmplug)
        .arg("-c")
        .arg(&g.daemon.uri)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("vmplug");
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
