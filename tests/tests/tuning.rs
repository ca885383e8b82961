//! Scenario 4: the guide's tuning verbs, verified where the kernel applies them:
//! the cgroup files and the QEMU threads' affinity.

use std::fs;

use vmplug_e2e::{Guest, GuestSpec};

/// The domain's cgroup directory under one v1 controller.
fn cgroup_dir(controller: &str, name: &str) -> std::path::PathBuf {
    let machine = std::path::Path::new("/sys/fs/cgroup").join(controller).join("machine");
    fs::read_dir(&machine)
        .unwrap_or_else(|e| panic!("{}: {e}", machine.display()))
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(name)))
        .unwrap_or_else(|| panic!("no cgroup for {name} under {}", machine.display()))
}

fn cpus_allowed(pid: i32, tid: i32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("status");
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list").trim().to_string()
}

/// The thread id of vCPU `n` (QEMU names it `CPU n/TCG`).
fn vcpu_tid(pid: i32, n: u32) -> i32 {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .find_map(|t| {
            let comm = fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim() == format!("CPU {n}/TCG")).then(|| t.file_name().to_string_lossy().parse().ok())?
        })
        .expect("vCPU thread")
}

#[test]
fn schedinfo_pins_and_numatune_reach_the_kernel() {
    if !std::path::Path::new("/sys/fs/cgroup/cpu/machine").exists()
        && !std::path::Path::new("/sys/fs/cgroup/cpu").exists()
    {
        panic!("these machines use cgroup v1 (tests/README.md); the cpu controller is missing");
    }
    let g = Guest::boot("tune", GuestSpec { vcpus: 2, max_vcpus: 2, ..GuestSpec::default() });
    let name = g.name.clone();

    let live = g.vmplug_json(&["schedinfo", &name, "--live", "cpu_shares=2048"]);
    assert_eq!(live["cpu_shares"], 2048);
    let shares = fs::read_to_string(cgroup_dir("cpu", &name).join("cpu.shares")).expect("cpu.shares");
    assert_eq!(shares.trim(), "2048", "the live change is in the cgroup");
    let config = g.vmplug_json(&["schedinfo", &name, "--config", "cpu_shares=4096"]);
    assert_eq!(config["cpu_shares"], 4096);
    assert!(g.daemon.virsh_ok(&["dumpxml", "--inactive", &name]).contains("<shares>4096</shares>"));
    let again = fs::read_to_string(cgroup_dir("cpu", &name).join("cpu.shares")).expect("cpu.shares");
    assert_eq!(again.trim(), "2048", "--config leaves the running domain alone");
    let out = g.vmplug(&["schedinfo", &name, "--live", "cpu_shares=1"]);
    assert_eq!(out.status.code(), Some(2), "cgroup v1 shares below 2 are refused by preflight");
    assert!(String::from_utf8_lossy(&out.stderr).contains("sched.shares-range"));

    let pid = g.qemu_pid();
    let pins = g.vmplug_json(&["emulatorpin", &name, "0", "--live"]);
    assert_eq!(pins["emulator"], "0");
    assert_eq!(cpus_allowed(pid, pid), "0", "QEMU's main thread runs on CPU 0 only");
    let pins = g.vmplug_json(&["vcpupin", &name, "0", "1", "--live"]);
    assert_eq!(pins["vcpus"][0][1], "1");
    assert_eq!(cpus_allowed(pid, vcpu_tid(pid, 0)), "1", "vCPU 0's thread runs on CPU 1 only");
    let out = g.vmplug(&["vcpupin", &name, "0", "0-63"]);
    assert_eq!(out.status.code(), Some(2), "refused by preflight");
    assert!(String::from_utf8_lossy(&out.stderr).contains("pin.host-cpus"));

    let xml = g.daemon.virsh_ok(&["dumpxml", &name]);
    // vmplug's numatune view is libvirt's own (as virsh prints it).
    let nt = g.vmplug_json(&["numatune", &name]);
    let virsh = g.daemon.virsh_ok(&["numatune", &name]);
    let field = |key: &str| {
        virsh
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == key).map(|(_, v)| v.trim().to_string()))
    };
    assert_eq!(nt["mode"].as_str().map(str::to_string), field("numa_mode"), "{nt} vs {virsh}");
    assert_eq!(nt["nodeset"].as_str().unwrap_or(""), field("numa_nodeset").unwrap_or_default(), "{nt} vs {virsh}");
    let numa = g.vmplug_json(&["numa", &name]);
    let caps = g.daemon.virsh_ok(&["capabilities"]);
    assert_eq!(numa["host"].as_array().expect("host nodes").len(), caps.matches("<cell id=").count());
    assert_eq!(numa["guest_cells"].as_array().expect("cells").len(), xml.matches("<cell id=").count());
    let out = g.vmplug(&["numatune", &name, "--nodeset", "7", "--config"]);
    assert_eq!(out.status.code(), Some(2), "a host node that does not exist is refused by preflight");
}
