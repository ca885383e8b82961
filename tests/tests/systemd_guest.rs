//! Guest image integration: a debootstrapped bookworm systemd guest with the
//! vmplug-guest .deb installed offline onlines hot-plugged CPUs and memory with
//! no manual step, reports to the host, and does so again after a restart; an
//! image with only the corrected udev rules (no agent) onlines too.

use std::time::{Duration, Instant};

use vmplug_e2e::images::systemd_image;
use vmplug_e2e::{Guest, GuestSpec};

fn wait_in_guest(g: &mut Guest, what: &str, cond: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if g.sh(&format!("{cond} && echo YES")).contains("YES") {
            return;
        }
        assert!(Instant::now() < end, "{what} did not happen within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Security finding 8: the unit left `/proc/sys`, `/proc/sysrq-trigger` and the
/// rest of `/sys` writable. In the running agent's mount namespace they are
/// read-only and only the two trees it writes are read-write (the hot-plugs
/// below prove those writes still work). `systemd-analyze security` is printed
/// for SECURITY.md.
fn check_the_agents_sandbox(g: &mut Guest) {
    let pid = g.sh("systemctl show -p MainPID --value vmplug-guest.service").trim().to_string();
    assert!(pid.parse::<u32>().is_ok_and(|p| p > 0), "agent pid: {pid:?}");
    let mounts = g.sh(&format!("awk '{{print $5, substr($6, 1, 2)}}' /proc/{pid}/mountinfo"));
    let mode_of = |path: &str| {
        mounts.lines().filter_map(|l| l.split_once(' ')).filter(|(p, _)| *p == path).map(|(_, m)| m).next_back()
    };
    for (path, want) in [
        ("/proc/sys", "ro"),
        ("/proc/sysrq-trigger", "ro"),
        ("/sys", "ro"),
        ("/sys/devices/system/cpu", "rw"),
        ("/sys/devices/system/memory", "rw"),
    ] {
        assert_eq!(mode_of(path), Some(want), "{path} in the agent's namespace:\n{mounts}");
    }
    let analysis = g.sh("systemd-analyze security --no-pager vmplug-guest.service 2>&1 | tail -40");
    eprintln!("systemd-analyze security vmplug-guest.service:\n{analysis}");
    let level = analysis
        .lines()
        .find_map(|l| l.split("Overall exposure level for vmplug-guest.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok());
    eprintln!("vmplug-guest.service exposure level: {level:?}");
    // Measured 2.4 ("OK") with bookworm's systemd 252 (SECURITY.md): a unit that
    // loses its hardening goes above 3.
    assert!(level.is_some_and(|l| l <= 3.0), "exposure level {level:?} (was 2.4):\n{analysis}");
}

#[test]
fn the_packaged_service_onlines_and_reports_across_a_restart() {
    let spec = GuestSpec { vcpus: 1, max_vcpus: 4, disk: Some(systemd_image("agent")), ..GuestSpec::default() };
    let mut g = Guest::boot("systemd", spec);
    let name = g.name.clone();
    assert_eq!(g.sh("systemctl is-active vmplug-guest.service").trim(), "active");
    assert_eq!(g.sh("systemctl show -p Type --value vmplug-guest.service").trim(), "notify");
    assert_eq!(g.sh("ls /etc/udev/rules.d/ | grep -c vmplug || true").trim(), "0", "no rule competes with the agent");
    check_the_agents_sandbox(&mut g);

    let r = g.vmplug_json(&["setvcpus", &name, "2", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let r = g.vmplug_json(&["attach-memory", &name, "256M", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(g.online_cpus(), "0-1");
    assert!(g.sh("journalctl -u vmplug-guest.service --no-pager").contains("onlined on add"));

    // A restart: the definition has 2 vCPUs and the DIMM; the service comes back
    // and the coldplugged DIMM's blocks are online.
    g.destroy();
    g.start();
    assert_eq!(g.sh("systemctl is-active vmplug-guest.service").trim(), "active");
    assert_eq!(g.online_cpus(), "0-1");
    wait_in_guest(
        &mut g,
        "every block online after the restart",
        "! grep -q offline /sys/devices/system/memory/memory*/state",
    );
    let st = g.vmplug_json(&["status", &name]);
    let dimms = st["dimms"].as_array().expect("dimms");
    assert_eq!(dimms.len(), 1, "{st}");
    assert!(dimms[0]["blocks"].as_array().expect("blocks").iter().all(|b| b["online"] == true), "{st}");
}

#[test]
fn an_image_with_only_the_udev_rules_onlines_too() {
    let spec = GuestSpec { vcpus: 1, max_vcpus: 2, disk: Some(systemd_image("udev")), ..GuestSpec::default() };
    let mut g = Guest::boot("udevonly", spec);
    let name = g.name.clone();
    assert_ne!(g.sh("systemctl is-active vmplug-guest.service || true").trim(), "active", "no agent in this image");
    let before = g.sh("ls -d /sys/devices/system/memory/memory* | wc -l").trim().parse::<u64>().expect("count");
    g.daemon.virsh_ok(&["setvcpus", &name, "2", "--live"]);
    let out = g.vmplug(&["attach-memory", &name, "256M", "--live", "--no-wait", "--agent-timeout", "2"]);
    assert!(out.status.success(), "plugged without an agent (--no-wait)");
    wait_in_guest(&mut g, "udev onlines the new vCPU", "[ \"$(cat /sys/devices/system/cpu/cpu1/online)\" = 1 ]");
    wait_in_guest(
        &mut g,
        "udev onlines the new blocks",
        &format!("[ $(ls -d /sys/devices/system/memory/memory* | wc -l) -ge {} ] && ! grep -q offline /sys/devices/system/memory/memory*/state", before + 2),
    );
}
