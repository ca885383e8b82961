//! The VM's whole lifecycle on the stock stack (QEMU as the distribution's
//! unprivileged user): after a vCPU, a DIMM and a virtio-mem plug made with
//! `--live --config`, each of a libvirtd restart, suspend + resume,
//! managedsave + start, save + restore, a guest reset and power-off + start
//! leaves libvirt's view and the guest's agreeing — every CPU and block the
//! domain has is online in the guest, and `status` says so — and the next plug
//! works. A plug in a state where the guest runs no code is refused at once by
//! the state's own rule (tp-libvirt's vCPU plug/unplug matrix does the same).

use std::time::{Duration, Instant};

use vmplug_e2e::{Guest, GuestSpec};

const MIB: u64 = 1024 * 1024;

/// What the domain holds: vCPUs, DIMMs and the virtio-mem device's size.
#[derive(Debug, Clone, Copy)]
struct Want {
    cpus: u32,
    dimms: usize,
    vmem: u64,
}

/// Why `status` and the guest's sysfs do not (yet) show `w`; None when they do.
fn disagreement(g: &mut Guest, w: Want) -> Option<String> {
    let name = g.name.clone();
    let out = g.vmplug_quiet(&["status", &name, "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    if !st["agent_error"].is_null() {
        return Some(format!("agent: {}", st["agent_error"]));
    }
    let cpus = format!("0-{}", w.cpus - 1);
    if st["vcpus_current"] != w.cpus || st["guest"]["cpus"]["online"] != cpus.as_str() {
        return Some(format!("vCPUs: libvirt {}, guest online {}", st["vcpus_current"], st["guest"]["cpus"]["online"]));
    }
    let dimms = st["dimms"].as_array().cloned().unwrap_or_default();
    if dimms.len() != w.dimms {
        return Some(format!("{} DIMMs, not {}", dimms.len(), w.dimms));
    }
    let all_online = |blocks: &serde_json::Value| {
        blocks.as_array().is_some_and(|b| b.iter().all(|b| b["present"] == true && b["online"] == true))
    };
    if let Some(d) =
        dimms.iter().find(|d| !all_online(&d["blocks"]) || d["blocks"].as_array().is_none_or(Vec::is_empty))
    {
        return Some(format!("DIMM {} not online in the guest: {}", d["alias"], d["blocks"]));
    }
    let v = &st["virtio_mem"][0];
    let plugged = v["blocks"].as_array().map_or(0, Vec::len) as u64 * 128 * MIB;
    if v["requested"] != w.vmem || plugged != w.vmem || !all_online(&v["blocks"]) {
        return Some(format!(
            "virtio-mem: requested {}, {} MiB of blocks present, {}",
            v["requested"],
            plugged / MIB,
            v["blocks"]
        ));
    }
    // The guest's own sysfs, not only the agent's word.
    let online = g.online_cpus();
    let offline = g.sh("grep -l offline /sys/devices/system/memory/memory*/state | wc -l");
    if online.trim() != cpus || offline.trim() != "0" {
        return Some(format!("guest sysfs: CPUs online {online}, {offline} memory blocks offline"));
    }
    None
}

/// Waits (bounded) until libvirt's view and the guest's agree on `w`: after a
/// boot the agent onlines what is present as it starts.
fn agree(g: &mut Guest, w: Want, after: &str) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        match disagreement(g, w) {
            None => return,
            Some(why) if Instant::now() > end => {
                g.dump_logs();
                panic!("after {after}: libvirt and the guest disagree: {why}");
            }
            Some(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// One more 128 MiB DIMM, persisted; it must be online in the guest.
fn plug_dimm(g: &mut Guest, w: &mut Want, after: &str) {
    let name = g.name.clone();
    let r = g.vmplug_json(&["attach-memory", &name, "128M", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "a plug after {after}: {r}");
    w.dimms += 1;
    agree(g, *w, &format!("the plug after {after}"));
}

/// A live vCPU plug in a state where the guest runs no code: refused at once
/// (no handshake wait) by `rule`, nothing changed.
fn refused_at_once(g: &mut Guest, rule: &str) {
    let name = g.name.clone();
    let started = Instant::now();
    let out = g.vmplug(&["setvcpus", &name, "4", "--live", "--json"]);
    assert_eq!(out.status.code(), Some(2), "refused");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let ids: Vec<&str> = r["findings"].as_array().expect("findings").iter().filter_map(|f| f["id"].as_str()).collect();
    assert!(ids.contains(&rule), "{rule} in {ids:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "no wait for a handshake that cannot come");
}

#[test]
fn plugged_resources_survive_every_lifecycle_step_and_the_next_plug_works() {
    let spec = GuestSpec { cells_mib: vec![512], max_vcpus: 4, virtio_mem: vec![(0, 1024)], ..GuestSpec::default() };
    let mut g = Guest::boot("life", spec);
    let name = g.name.clone();
    // Under the stock qemu.conf QEMU is not root.
    let qemu_uid = std::fs::read_to_string(format!("/proc/{}/status", g.qemu_pid()))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:").map(|u| u.split_whitespace().next().unwrap_or_default().to_string()))
        .expect("Uid");
    assert_ne!(qemu_uid, "0", "QEMU runs as the distribution's unprivileged user");

    let r = g.vmplug_json(&["setvcpus", &name, "2", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let mut w = Want { cpus: 2, dimms: 0, vmem: 0 };
    plug_dimm(&mut g, &mut w, "boot");
    let r = g.vmplug_json(&["resize-memory", &name, "+256M", "--node", "0", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    w.vmem = 256 * MIB;
    agree(&mut g, w, "the plugs");

    let down = g.daemon.restart();
    eprintln!("libvirtd was down for {down:?}");
    agree(&mut g, w, "a libvirtd restart");
    plug_dimm(&mut g, &mut w, "a libvirtd restart");

    g.daemon.virsh_ok(&["suspend", &name]);
    refused_at_once(&mut g, "domain.paused");
    g.daemon.virsh_ok(&["resume", &name]);
    agree(&mut g, w, "suspend + resume");
    plug_dimm(&mut g, &mut w, "suspend + resume");

    g.daemon.virsh_ok(&["managedsave", &name]);
    refused_at_once(&mut g, "domain.running");
    g.daemon.virsh_ok(&["start", &name]);
    g.reconnect_console();
    agree(&mut g, w, "managedsave + start");
    plug_dimm(&mut g, &mut w, "managedsave + start");

    let save = g.dir.join("guest.save");
    g.daemon.virsh_ok(&["save", &name, &save.to_string_lossy()]);
    refused_at_once(&mut g, "domain.running");
    g.daemon.virsh_ok(&["restore", &save.to_string_lossy()]);
    let _ = std::fs::remove_file(&save);
    g.reconnect_console();
    agree(&mut g, w, "save + restore");
    plug_dimm(&mut g, &mut w, "save + restore");

    // A reset reboots the guest kernel; QEMU keeps the devices and the agent
    // onlines, as it starts, what it finds present.
    g.reset();
    agree(&mut g, w, "a guest reset");
    plug_dimm(&mut g, &mut w, "a guest reset");

    // Power off and on: what was persisted with --config comes back at boot.
    g.destroy();
    g.start();
    agree(&mut g, w, "power-off + start");
    plug_dimm(&mut g, &mut w, "power-off + start");
    let r = g.vmplug_json(&["setvcpus", &name, "3", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "a vCPU plug at the end: {r}");
    w.cpus = 3;
    agree(&mut g, w, "the last vCPU plug");
}
