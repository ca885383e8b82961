//! Scenario 1: `setvcpus` 1 → 2 → 4 `--live --config`, confirmed by the guest, and
//! still there after a destroy and start.

use vmplug_e2e::{Guest, GuestSpec};

#[test]
fn setvcpus_live_config_closes_the_loop_and_survives_a_restart() {
    let mut g = Guest::boot("cpu", GuestSpec { vcpus: 1, max_vcpus: 4, ..GuestSpec::default() });
    let name = g.name.clone();
    for (target, online) in [(2, "0-1"), (4, "0-3")] {
        let r = g.vmplug_json(&["setvcpus", &name, &target.to_string(), "--live", "--config"]);
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["host"]["persistent"], true);
        let guest = &r["guest"];
        assert_eq!(guest["complete"], true);
        assert_eq!(guest["cpus_online"], online);
        assert_eq!(g.online_cpus(), online, "the guest's own sysfs agrees with the report");
    }
    // The persistent definition has 4; a fresh boot brings all four up.
    g.destroy();
    let xml = g.daemon.virsh_ok(&["dumpxml", "--inactive", &name]);
    assert!(xml.contains("current='4'") || xml.contains(">4</vcpu>"), "{xml}");
    g.start();
    assert_eq!(g.online_cpus(), "0-3");
    let st = g.vmplug_json(&["status", &name]);
    assert_eq!(st["vcpus_current"], 4);
    assert_eq!(st["guest"]["cpus"]["online"], "0-3");
}

#[test]
fn impossible_cpu_counts_are_refused_with_specific_rules() {
    let mut g = Guest::boot("cpubad", GuestSpec { vcpus: 1, max_vcpus: 2, ..GuestSpec::default() });
    let name = g.name.clone();
    let out = g.vmplug(&["setvcpus", &name, "3", "--live", "--json"]);
    assert_eq!(out.status.code(), Some(2), "refused by preflight");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    vmplug_e2e::schema::assert_valid(&r, &["(a run that exits non-zero)"]);
    assert_eq!(r["outcome"], "refused");
    assert!(r["findings"].as_array().expect("findings").iter().any(|f| f["id"] == "cpu.max"), "{r}");
    assert_eq!(g.online_cpus(), "0", "nothing was applied");
    let out = g.vmplug(&["setvcpus", "no-such-domain", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

/// Guest-level scaling on x86 too: two cells' worth of vCPUs at boot,
/// `maxcpus=1`, the agent onlines and offlines among them; libvirt unchanged.
#[test]
fn setvcpus_guest_scales_inside_an_x86_guest() {
    let spec = GuestSpec { vcpus: 2, max_vcpus: 2, cmdline_extra: "maxcpus=1".into(), ..GuestSpec::default() };
    let mut g = Guest::boot("cpuguest", spec);
    let name = g.name.clone();
    assert_eq!(g.online_cpus().trim(), "0", "maxcpus=1 holds: the agent's start-up onlining respects it");
    let r = g.vmplug_json(&["setvcpus", &name, "2", "--guest"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(g.online_cpus().trim(), "0-1");
    let r = g.vmplug_json(&["setvcpus", &name, "1", "--guest"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(g.online_cpus().trim(), "0");
    let vcpus = g.daemon.virsh_ok(&["vcpucount", &name, "--live", "--active"]);
    assert_eq!(vcpus.trim(), "2", "libvirt's count never moved");
}
