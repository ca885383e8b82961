//! The VM's whole lifecycle on the stock stack (QEMU as the distribution's
//! unprivileged user): after a vCPU, a DIMM and a virtio-mem plug made with
//! `--live --config`, each of a libvirtd restart, suspend + resume,
//! managedsave + start, save + restore, a guest reboot, a guest shutdown +
//! start, and a live migration to another libvirtd leaves libvirt's view and the guest's agreeing — every CPU and block the
//! domain has is online in the guest, and `status` says so — and the next plug
//! works. A plug in a state where the guest runs no code is refused at once by
//! the state's own rule (tp-libvirt's vCPU plug/unplug matrix does the same).

use std::time::{Duration, Instant};

use vmplug::wait::Wait;

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
    let mut why = None;
    let agreed = Wait::new(format!("libvirt and the guest to agree after {after}"), Duration::from_secs(120))
        .every(Duration::from_millis(500))
        .until_blocking(|| {
            why = disagreement(g, w);
            why.is_none().then_some(())
        });
    if let Err(e) = agreed {
        g.dump_logs();
        panic!("{e}: they disagree: {}", why.unwrap_or_default());
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

    // The guest reboots itself: QEMU keeps the devices and the agent onlines,
    // as it starts, what it finds present.
    g.guest_reboot();
    agree(&mut g, w, "a guest reboot");
    plug_dimm(&mut g, &mut w, "a guest reboot");

    // The guest powers itself off, then the domain is started: what was
    // persisted with --config comes back at boot.
    let state = g.guest_poweroff();
    assert_eq!(state, "shut off (shutdown)", "the guest, not the host, ended it");
    refused_at_once(&mut g, "domain.running");
    g.start();
    agree(&mut g, w, "a guest shutdown + start");
    plug_dimm(&mut g, &mut w, "a guest shutdown + start");
    let r = g.vmplug_json(&["setvcpus", &name, "3", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "a vCPU plug at the end: {r}");
    w.cpus = 3;
    agree(&mut g, w, "the last vCPU plug");
}

/// What must not change when the guest moves: vCPUs, each DIMM (alias, size,
/// node, its blocks and their state), each virtio-mem device (requested and
/// current size, node, its blocks), and the guest's own view (CPUs online,
/// MemTotal).
fn placement(g: &mut Guest) -> serde_json::Value {
    let name = g.name.clone();
    let out = g.vmplug_quiet(&["status", &name, "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    serde_json::json!({
        "vcpus": st["vcpus_current"],
        "dimms": st["dimms"],
        "virtio_mem": st["virtio_mem"],
        "cpus_online": g.online_cpus(),
        "mem_total_kib": g.mem_total_kib(),
    })
}

/// The host UUID libvirt reports for a daemon (`<host><uuid>` of its capabilities).
fn host_uuid(capabilities: &str) -> String {
    let doc = roxmltree::Document::parse(capabilities).expect("capabilities XML");
    doc.descendants()
        .find(|n| n.has_tag_name("uuid") && n.parent().is_some_and(|p| p.has_tag_name("host")))
        .and_then(|n| n.text())
        .expect("<host><uuid>")
        .to_string()
}

#[test]
fn plugged_resources_survive_a_live_migration_and_the_next_plug_works() {
    let spec = GuestSpec { cells_mib: vec![512], max_vcpus: 4, virtio_mem: vec![(0, 1024)], ..GuestSpec::default() };
    let mut g = Guest::boot("migrate", spec);
    let name = g.name.clone();
    let r = g.vmplug_json(&["setvcpus", &name, "2", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let mut w = Want { cpus: 2, dimms: 0, vmem: 0 };
    plug_dimm(&mut g, &mut w, "boot");
    let r = g.vmplug_json(&["resize-memory", &name, "+256M", "--node", "0", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    w.vmem = 256 * MIB;
    agree(&mut g, w, "the plugs");
    let before = placement(&mut g);
    let source_uuid = host_uuid(&g.daemon.virsh_ok(&["capabilities"]));

    // Slowly at first (1 MiB/s), so a plug can be tried while the job runs:
    // the source refuses it at once by the job's rule.
    let m = g.start_migration(1);
    let sending = || {
        g.daemon.virsh_ok(&["domjobinfo", &name]).lines().any(|l| {
            l.strip_prefix("Memory processed:")
                .is_some_and(|v| !v.trim().starts_with("0.000") && !v.trim().starts_with("0 "))
        })
    };
    Wait::new("the migration to start sending memory", Duration::from_secs(60))
        .every(Duration::from_millis(100))
        .until_blocking(|| sending().then_some(()))
        .unwrap_or_else(|e| panic!("{e}"));
    refused_at_once(&mut g, "domain.job");
    // Then at full speed. libvirt sets the job's own bandwidth as QEMU
    // starts sending (measured: a raise made just before was undone), so it
    // is raised once QEMU has sent memory, and checked.
    g.daemon.virsh_ok(&["migrate-setspeed", &name, "8192"]);
    assert_eq!(g.daemon.virsh_ok(&["migrate-getspeed", &name]).trim(), "8192", "the bandwidth was raised");
    let started = Instant::now();
    g.finish_migration(m);
    eprintln!("the migration ended {:?} after its bandwidth was raised", started.elapsed());

    // Another host to libvirt, and the domain is the destination's alone.
    assert_ne!(host_uuid(&g.daemon.virsh_ok(&["capabilities"])), source_uuid, "distinct host UUIDs");
    assert!(g.daemon.virsh_ok(&["list", "--all", "--name"]).lines().any(|l| l.trim() == name));
    let gone = g.retired.last().expect("the source daemon").virsh(&["domstate", &name]);
    assert!(!gone.status.success(), "--undefinesource: the source no longer has the domain");

    agree(&mut g, w, "a live migration");
    assert_eq!(placement(&mut g), before, "sizes, nodes and online state unchanged by the migration");
    plug_dimm(&mut g, &mut w, "a live migration");
    let r = g.vmplug_json(&["resize-memory", &name, "+128M", "--node", "0", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "a virtio-mem resize on the destination: {r}");
    w.vmem += 128 * MIB;
    let r = g.vmplug_json(&["setvcpus", &name, "3", "--live", "--config"]);
    assert_eq!(r["outcome"], "ok", "a vCPU plug on the destination: {r}");
    w.cpus = 3;
    agree(&mut g, w, "the plugs on the destination");

    // The persistent definition moved too: a power cycle on the destination
    // brings back everything plugged with --config, before and after the move.
    g.guest_poweroff();
    g.start();
    agree(&mut g, w, "a shutdown + start on the destination");
}
