//! `vmplug prepare` on a plain domain (no NUMA, no slots, every vCPU present),
//! then hot-plug CPUs and a DIMM on each cell after it starts.

use vmplug_e2e::{Guest, GuestSpec};

#[test]
fn a_plain_domain_becomes_hot_plug_ready() {
    let mut g =
        Guest::define("prep", GuestSpec { vcpus: 2, cells_mib: vec![512], plain: true, ..GuestSpec::default() });
    let name = g.name.clone();
    let before = g.daemon.virsh_ok(&["dumpxml", "--inactive", &name]);
    let dry = g.vmplug(&[
        "prepare",
        &name,
        "--max-vcpus",
        "4",
        "--max-memory",
        "4G",
        "--slots",
        "8",
        "--cells",
        "2",
        "--dry-run",
    ]);
    assert!(dry.status.success());
    assert!(String::from_utf8_lossy(&dry.stdout).contains("+    <numa>"), "the diff shows the new cells");
    assert_eq!(g.daemon.virsh_ok(&["dumpxml", "--inactive", &name]), before, "--dry-run defines nothing");
    let r =
        g.vmplug_json(&["prepare", &name, "--max-vcpus", "4", "--max-memory", "4G", "--slots", "8", "--cells", "2"]);
    assert_eq!(r["defined"], true, "{r}");
    let out = g.vmplug(&["prepare", &name, "--slots", "300"]);
    assert_eq!(out.status.code(), Some(2), "more than 256 slots is refused");
    let check = g.vmplug_json(&["check", &name, "--cpus", "4", "--memory", "256M", "--node", "1"]);
    assert_eq!(check["ready"], true, "{check}");

    g.start();
    let name = g.name.clone();
    let r = g.vmplug_json(&["setvcpus", &name, "4", "--live"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(g.online_cpus(), "0-3");
    for node in ["0", "1"] {
        let r = g.vmplug_json(&["attach-memory", &name, "256M", "--node", node, "--live"]);
        assert_eq!(r["outcome"], "ok", "{r}");
        assert!(r["guest"]["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .all(|b| b["node"].as_u64() == node.parse().ok()));
    }
}
