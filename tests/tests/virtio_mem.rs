//! virtio-mem on a real guest (Debian 6.1, `virtio_mem` module, two NUMA cells,
//! one device per cell): grow a node by 1 GiB and shrink it back, a balanced
//! total, a shrink the guest cannot complete reported truthfully with the
//! device's requested size set back, and a new device added.

use vmplug_e2e::{Guest, GuestSpec};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

fn spec() -> GuestSpec {
    GuestSpec {
        cells_mib: vec![384, 384],
        max_vcpus: 2,
        virtio_mem: vec![(0, 2048), (1, 2048)],
        ..GuestSpec::default()
    }
}

/// The report's entry for the device on `node`.
fn device(r: &serde_json::Value, node: u64) -> serde_json::Value {
    r["virtio_mem"]
        .as_array()
        .unwrap_or_else(|| panic!("no virtio_mem in {r}"))
        .iter()
        .find(|d| d["node"] == node)
        .cloned()
        .unwrap_or_else(|| panic!("no device on node {node} in {r}"))
}

/// `<current>` of the live XML's virtio-mem device on `node`, bytes.
fn live_current(g: &Guest, node: u32) -> (u64, u64) {
    let xml = g.daemon.virsh_ok(&["dumpxml", &g.name]);
    let dev = xml
        .split("<memory model='virtio-mem'>")
        .skip(1)
        .find(|d| d.contains(&format!("<node>{node}</node>")))
        .expect("device in the live XML");
    let kib = |tag: &str| -> u64 {
        let open = format!("<{tag} unit='KiB'>");
        let at = dev.find(&open).expect(tag) + open.len();
        dev[at..dev[at..].find('<').map(|e| at + e).expect("end")].parse().expect("number")
    };
    (kib("requested") * 1024, kib("current") * 1024)
}

#[test]
fn grow_a_node_by_1g_and_shrink_back() {
    let mut g = Guest::boot("vmem", spec());
    let name = g.name.clone();
    let before = g.mem_total_kib();
    let r = g.vmplug_json(&["resize-memory", &name, "+1G", "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let d = device(&r, 1);
    let lagged = g.assert_vmem_holds(&d, GIB);
    eprintln!(
        "+1G: libvirt's <current> {}",
        if lagged { "caught up after the verdict" } else { "agreed at the verdict" }
    );
    assert_eq!(d["blocks_online"].as_u64(), Some(8), "eight 128 MiB blocks online: {d}");
    assert_eq!(d["zones"]["Movable"].as_u64(), Some(8), "movable by default: {d}");
    assert_eq!(g.mem_total_kib() - before, GIB / 1024, "MemTotal grew by exactly 1 GiB");
    assert_eq!(live_current(&g, 1), (GIB, GIB));
    assert_eq!(live_current(&g, 0), (0, 0), "the other node's device is untouched");
    // The guest's own view: the region's first block online on node 1.
    let first = 0x1_8000_0000u64 / (128 * MIB);
    assert_eq!(g.block(first), ("online".to_string(), Some(1)));

    let st = g.vmplug_json(&["status", &name]);
    let v = st["virtio_mem"].as_array().expect("virtio_mem in status");
    assert_eq!(v.len(), 2, "{st}");
    assert_eq!(st["dimms"].as_array().map(Vec::len), Some(0), "virtio-mem is not counted as DIMMs: {st}");

    let r = g.vmplug_json(&["resize-memory", &name, "-1G", "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(device(&r, 1)["current"].as_u64(), Some(0));
    assert_eq!(device(&r, 1)["blocks"].as_u64(), Some(0), "every block of the region gone");
    assert_eq!(g.mem_total_kib(), before, "MemTotal back where it started");
    let gone = g.sh(&format!("test -e /sys/devices/system/memory/memory{first} && echo present || echo absent"));
    assert_eq!(gone.trim(), "absent", "memory{first} removed from the guest");

    // A total, balanced over both nodes: 768 MiB boot + 512 MiB.
    let r = g.vmplug_json(&["resize-memory", &name, "1280M"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    g.assert_vmem_holds(&device(&r, 0), 256 * MIB);
    g.assert_vmem_holds(&device(&r, 1), 256 * MIB);
    assert_eq!(g.mem_total_kib() - before, 512 * 1024);
    let r = g.vmplug_json(&["resize-memory", &name, "768M"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(g.mem_total_kib(), before);

    // Refused before anything changes: misaligned, past the device, below boot.
    for (args, id) in [
        (vec!["resize-memory", &name, "+3M", "--node", "1"], "vmem.block-align"),
        (vec!["resize-memory", &name, "+3G", "--node", "1"], "vmem.size"),
        (vec!["resize-memory", &name, "512M"], "vmem.floor"),
    ] {
        let mut a = args.clone();
        a.push("--json");
        let out = g.vmplug(&a);
        assert_eq!(out.status.code(), Some(2), "{args:?} refused");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        vmplug_e2e::schema::assert_valid(&r, &["(a run that exits non-zero)"]);
        assert_eq!(r["findings"][0]["id"], id, "{r}");
        assert!(r["applied"].as_array().is_some_and(Vec::is_empty), "nothing applied: {r}");
    }
    assert_eq!(live_current(&g, 1), (0, 0));
}

#[test]
fn a_shrink_the_guest_cannot_finish_is_reported_and_stops_retrying() {
    let mut g = Guest::boot("vmemfull", spec());
    let name = g.name.clone();
    let r = g.vmplug_json(&["resize-memory", &name, "+512M", "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    // Fill the guest's memory with tmpfs data (no swap): the plugged memory is in
    // use and there is nowhere to move it.
    let avail_kib: u64 = g
        .sh("grep MemAvailable /proc/meminfo")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemAvailable");
    let fill_mib = avail_kib / 1024 - 64;
    g.sh(&format!(
        "mkdir -p /fill && mount -t tmpfs -o size={fill_mib}M tmpfs /fill && dd if=/dev/zero of=/fill/x bs=1M count={fill_mib} 2>/dev/null; echo filled"
    ));
    // The guest's forecast sees it first: MemAvailable cannot take the pages,
    // so the shrink is refused before anything changes (mem.forecast).
    let out = g.vmplug(&["resize-memory", &name, "-512M", "--node", "1", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(out.status.code(), Some(2), "refused by the forecast: {r}");
    assert_eq!(r["findings"][0]["id"], "mem.forecast", "{r}");
    assert!(r["applied"].as_array().is_some_and(Vec::is_empty), "nothing applied: {r}");
    assert_eq!(live_current(&g, 1).0, 512 * MIB, "requested untouched");
    // Forced past the forecast, the device tries, the guest holds on, and the
    // wait ends after --settle with requested set back.
    let out = g.vmplug(&["resize-memory", &name, "-512M", "--node", "1", "--settle", "5", "--force", "--json"]);
    assert_eq!(out.status.code(), Some(5), "the guest could not release it all");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    vmplug_e2e::schema::assert_valid(&r, &["(a run that exits non-zero)"]);
    let d = device(&r, 1);
    let held = d["current"].as_u64().expect("current");
    assert!(held > 0, "something stayed plugged: {d}");
    assert_eq!(d["requested_reset"], true, "{d}");
    assert_eq!(live_current(&g, 1), (held, held), "requested set back to what the guest holds");
    let msg = r["message"].as_str().expect("message");
    assert!(msg.contains("released") && msg.contains("set back"), "{msg}");

    // Freed again, the rest comes out.
    g.sh("rm /fill/x && umount /fill; echo freed");
    let rest = format!("-{}M", held / MIB);
    let r = g.vmplug_json(&["resize-memory", &name, &rest, "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(live_current(&g, 1), (0, 0));
}

#[test]
fn a_device_is_added_to_the_definition_and_live_and_checked_before() {
    let g = Guest::boot("vmemadd", spec());
    let name = g.name.clone();
    let out = g.vmplug(&["add-virtio-mem", &name, "1G", "--json"]);
    assert_eq!(out.status.code(), Some(2), "a guest with NUMA cells needs --node");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["findings"][0]["id"], "vmem.node", "{r}");
    let r = g.vmplug_json(&["add-virtio-mem", &name, "1G", "--node", "0", "--config"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let inactive = g.daemon.virsh_ok(&["dumpxml", "--inactive", &name]);
    assert_eq!(inactive.matches("model='virtio-mem'").count(), 3, "added to the definition");
    let live = g.daemon.virsh_ok(&["dumpxml", &name]);
    assert_eq!(live.matches("model='virtio-mem'").count(), 2, "the running domain is unchanged");
    // Live: libvirt's q35 domain has a free PCIe root port for it; the guest's
    // driver takes it, and it grows with the node's other device.
    let r = g.vmplug_json(&["add-virtio-mem", &name, "512M", "--node", "1", "--live"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let live = g.daemon.virsh_ok(&["dumpxml", &name]);
    assert_eq!(live.matches("model='virtio-mem'").count(), 3, "attached live");
    let r = g.vmplug_json(&["resize-memory", &name, "+1G", "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let devices = r["virtio_mem"].as_array().expect("devices");
    assert_eq!(devices.len(), 2, "balanced over node 1's two devices: {r}");
    for d in devices {
        g.assert_vmem_holds(d, 512 * MIB);
    }
}

/// The live XML's alias of the virtio-mem device on `node`, if it lists one.
fn live_alias(g: &Guest, node: u32) -> Option<String> {
    let xml = g.daemon.virsh_ok(&["dumpxml", &g.name]);
    let dev = xml
        .split("<memory model='virtio-mem'>")
        .skip(1)
        .map(|d| &d[..d.find("</memory>").unwrap_or(d.len())])
        .find(|d| d.contains(&format!("<node>{node}</node>")))?;
    let at = dev.find("<alias name='")? + "<alias name='".len();
    Some(dev[at..at + dev[at..].find('\'')?].to_string())
}

/// tp-libvirt's "detach a virtio-mem device with plugged memory": refused
/// (QEMU would refuse it too), and once resize-memory has the guest release
/// the memory, the detach succeeds and the device is gone from the live XML.
#[test]
fn a_device_with_plugged_memory_is_refused_and_detached_once_empty() {
    let g = Guest::boot("vmemdet", spec());
    let name = g.name.clone();
    let r = g.vmplug_json(&["resize-memory", &name, "+512M", "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let alias = live_alias(&g, 1).expect("node 1's device has an alias");

    let out = g.vmplug(&["detach-virtio-mem", &name, "--alias", &alias, "--json"]);
    assert_eq!(out.status.code(), Some(2), "a device holding memory is refused");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    vmplug_e2e::schema::assert_valid(&r, &["(a run that exits non-zero)"]);
    let f = r["findings"].as_array().expect("findings").iter().find(|f| f["id"] == "vmem.plugged").cloned();
    let msg = f.unwrap_or_else(|| panic!("no vmem.plugged in {r}"))["message"].to_string();
    assert!(msg.contains("resize-memory") && msg.contains("512 MiB"), "{msg}");
    assert_eq!(live_current(&g, 1), (512 * MIB, 512 * MIB), "nothing was changed");

    let r = g.vmplug_json(&["resize-memory", &name, "-512M", "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let r = g.vmplug_json(&["detach-virtio-mem", &name, "--alias", &alias]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(r["operation"], "detach-virtio-mem", "{r}");
    assert_eq!(live_alias(&g, 1), None, "gone from the live XML");
    assert_eq!(live_current(&g, 0), (0, 0), "node 0's device stays");
}

/// Autoscale grows a virtio-mem guest under pressure and, with a shrink
/// threshold, gives the memory back when it is idle, down to the floor.
#[test]
fn autoscale_grows_and_shrinks_through_virtio_mem() {
    let mut g = Guest::boot("vmemauto", spec());
    let name = g.name.clone();
    let before = g.mem_total_kib();
    let common = "[timing]\ninterval_s = 1\nsustain = 2\ncooldown_s = 0\n[host]\nmemory_reserve = '64M'\n";
    // Always "tight" (MemAvailable is far under 4 GiB): one step up.
    let grow = format!(
        "[select]\nnames = ['{name}']\n[memory]\nmax = '2G'\nstep = '256M'\navailable_below = '4G'\npsi_some_avg10 = 100.0\npsi_full_avg10 = 100.0\n{common}"
    );
    let ev = g.autoscale_once(&grow);
    let last = ev.last().expect("events");
    assert_eq!(
        (last["action"]["kind"].as_str(), last["outcome"].as_str()),
        (Some("grow_virtio_mem"), Some("ok")),
        "{ev:?}"
    );
    assert_eq!(g.mem_total_kib() - before, 256 * 1024, "MemTotal grew by the step");
    let plugged = live_current(&g, 0).1 + live_current(&g, 1).1;
    assert_eq!(plugged, 256 * MIB);
    // Idle (MemAvailable far over 384 MiB): the step comes back, then the floor holds.
    let shrink = format!(
        "[select]\nnames = ['{name}']\n[memory]\nmax = '2G'\nstep = '256M'\navailable_below = '16M'\nshrink_available_above = '384M'\nmin = '768M'\n{common}"
    );
    let ev = g.autoscale_once(&shrink);
    let last = ev.last().expect("events");
    assert_eq!(
        (last["action"]["kind"].as_str(), last["outcome"].as_str()),
        (Some("shrink_virtio_mem"), Some("ok")),
        "{ev:?}"
    );
    assert_eq!(g.mem_total_kib(), before, "MemTotal back where it started");
    assert_eq!(live_current(&g, 0).1 + live_current(&g, 1).1, 0);
    let ev = g.autoscale_once(&shrink);
    assert!(ev.iter().all(|e| e["action"]["kind"] == "none"), "{ev:?}");
    assert_eq!(ev.last().expect("events")["rule"], "memory.at-min", "{ev:?}");
}

/// The guide's 1:32 rule, as it really applies to virtio-mem: the guest's driver
/// adds at most 1 GiB offline and waits for it to be onlined before adding more,
/// so a growth of 16 GiB — over 32 times what a 512 MiB guest has available,
/// which DIMMs would have to stage — arrives in the driver's own steps, each
/// onlined by the agent, with no OOM.
#[test]
fn growth_far_over_32_times_available_arrives_in_the_drivers_steps() {
    let spec = GuestSpec {
        cells_mib: vec![512],
        max_vcpus: 2,
        max_memory_mib: 512 + 16384,
        virtio_mem: vec![(0, 16384)],
        ..GuestSpec::default()
    };
    let mut g = Guest::boot("vmem-big", spec);
    let name = g.name.clone();
    let available_kib: u64 = g
        .sh("grep MemAvailable /proc/meminfo")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemAvailable");
    assert!(available_kib * 1024 * 32 < 16 * GIB, "the request is over 32× available ({available_kib} KiB)");
    let before = g.mem_total_kib();
    let r = g.vmplug_json(&["resize-memory", &name, "+16G"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let d = device(&r, 0);
    g.assert_vmem_holds(&d, 16 * GIB);
    assert_eq!(d["blocks_online"].as_u64(), Some(128), "every 128 MiB block online: {d}");
    assert_eq!(g.mem_total_kib() - before, 16 * GIB / 1024, "MemTotal grew by exactly 16 GiB");
    let oom = g.sh("dmesg | grep -c -i -E 'out of memory|oom-kill|page allocation failure' || true");
    assert_eq!(oom.trim(), "0", "no OOM and no failed allocation in the guest");
    eprintln!(
        "virtio-mem +16 GiB into 512 MiB ({} MiB available): {} ms, guest {} ms",
        available_kib / 1024,
        r["timings"]["total_ms"],
        r["timings"]["guest_ms"]
    );
}
