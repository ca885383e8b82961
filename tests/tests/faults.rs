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
