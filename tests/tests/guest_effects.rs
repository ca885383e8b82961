//! Making new resources useful inside a real guest: a multiqueue virtio-net
//! device's combined channels follow the vCPUs the host plugs and unplugs
//! (2 → 4 queue pairs in use after a vCPU hot-plug, and back to 2 when the guest
//! takes CPUs offline, read back from the guest's own sysfs).

use vmplug_e2e::{Guest, GuestSpec};

/// The guest's virtio-net interface names.
fn virtio_nics(g: &mut Guest) -> Vec<String> {
    let out = g.sh(
        "for n in /sys/class/net/*; do readlink $n/device/driver 2>/dev/null | grep -q '/virtio_net$' && basename $n; done",
    );
    out.split_whitespace().map(str::to_string).collect()
}

/// Receive queues the kernel has set up on `nic` (`queues/rx-N`), as the guest sees them.
fn rx_queues(g: &mut Guest, nic: &str) -> u32 {
    let out = g.sh(&format!("ls /sys/class/net/{nic}/queues | grep -c '^rx-'"));
    out.trim().parse().unwrap_or_else(|_| panic!("rx queue count from '{out}'"))
}

#[test]
fn a_multiqueue_nic_follows_the_vcpus() {
    let spec = GuestSpec { vcpus: 2, max_vcpus: 4, nic_queues: Some(4), ..GuestSpec::default() };
    let mut g = Guest::boot("nicq", spec);
    let name = g.name.clone();
    let nics = virtio_nics(&mut g);
    assert_eq!(nics.len(), 1, "one virtio-net interface: {nics:?}");
    let nic = nics[0].clone();
    assert_eq!(rx_queues(&mut g, &nic), 2, "virtio_net probed with 2 CPUs online: 2 of 4 queue pairs");
    // Up by a live vCPU hot-plug, down by guest-level scaling (the agent takes
    // CPUs offline; no ACPI eject, whose 5 s libvirt timeout a loaded TCG host misses).
    for (target, from, online, how) in [(4u32, 2u32, "0-3", "--live"), (2, 4, "0-1", "--guest")] {
        let r = g.vmplug_json(&["setvcpus", &name, &target.to_string(), how]);
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["guest"]["cpus_online"], online, "{r}");
        let q = &r["guest"]["queues"];
        assert_eq!(q.as_array().map(Vec::len), Some(1), "the report lists the one change: {r}");
        assert_eq!(q[0]["device"], nic.as_str());
        assert_eq!(q[0]["max"], 4);
        assert_eq!(q[0]["combined"], target);
        assert_eq!(q[0]["last"]["from"], from);
        assert_eq!(q[0]["last"]["to"], target);
        assert_eq!(q[0]["last"]["status"], "done");
        assert_eq!(rx_queues(&mut g, &nic), target, "the guest's own sysfs agrees with the report");
    }
}

const MIB: u64 = 1024 * 1024;

fn virtio_mem_guest(test: &str) -> Guest {
    Guest::boot(
        test,
        GuestSpec { cells_mib: vec![512], max_vcpus: 2, virtio_mem: vec![(0, 2048)], ..GuestSpec::default() },
    )
}

/// The guest's forecast for its one virtio-mem device, from `status --json`.
fn device_forecast(g: &Guest) -> u64 {
    let st = g.vmplug_json(&["status", &g.name]);
    st["forecast"]["devices"][0]["releasable"].as_u64().unwrap_or_else(|| panic!("no forecast in {st}"))
}

/// A shrink forecast: the region's 1 GiB onlined Movable, then its lower half
/// moved to Normal inside the guest (offline, `online_kernel`): the forecast names
/// the Movable half, `check` refuses more (`mem.forecast`), and a shrink of what
/// it forecast releases that, within one memory block, as the guest's MemTotal
/// shows.
#[test]
fn the_forecast_matches_what_a_shrink_releases() {
    let mut g = virtio_mem_guest("forecast");
    let name = g.name.clone();
    let r = g.vmplug_json(&["resize-memory", &name, "+1G"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let moved =
        g.sh("cd /sys/devices/system/memory; low=$(ls -d memory* | sed 's/memory//' | sort -n | tail -8 | head -4); \
         for b in $low; do echo offline >memory$b/state; done; n=0; \
         for b in $low; do echo online_kernel >memory$b/state && n=$((n+1)); done; echo $n");
    assert_eq!(moved.trim(), "4", "four blocks now in Normal");
    let forecast = device_forecast(&g);
    let block = 128 * MIB;
    assert!(forecast >= 512 * MIB - block && forecast < 1024 * MIB, "the Movable half only: {forecast}");
    let over = format!("-{}M", forecast / MIB + 128);
    let out = g.vmplug(&["check", &name, "--resize", &over, "--json"]);
    assert_eq!(out.status.code(), Some(2), "more than the forecast is refused");
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let text = c.to_string();
    assert!(text.contains("mem.forecast"), "{c}");
    let before = g.mem_total_kib() * 1024;
    let shrink = format!("-{}M", forecast / MIB);
    let r = g.vmplug_json(&["resize-memory", &name, &shrink]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let released = before - g.mem_total_kib() * 1024;
    eprintln!("forecast {} MiB, released {} MiB", forecast / MIB, released / MIB);
    assert!(released.abs_diff(forecast) <= block, "forecast {forecast}, released {released}");
}

/// The guest's veto: a guest that fills 256 MiB of tmpfs and sets its own
/// MemAvailable floor refuses a shrink, and a DIMM detach, that would go under
/// it; the host reports a refusal (`guest.veto`, exit 2) with the guest's
/// reason, and nothing changes.
#[test]
fn the_guest_vetoes_a_shrink_below_its_floor() {
    let mut g = virtio_mem_guest("veto");
    let name = g.name.clone();
    let r = g.vmplug_json(&["resize-memory", &name, "+1G"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let r = g.vmplug_json(&["attach-memory", &name, "512M", "--node", "0"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let dimm = g.vmplug_json(&["status", &name])["dimms"][0]["alias"].as_str().expect("alias").to_string();
    g.sh("mkdir -p /fill && mount -t tmpfs -o size=300m tmpfs /fill && dd if=/dev/zero of=/fill/f bs=1M count=256 2>/dev/null");
    let avail: u64 =
        g.sh("sed -n 's/^MemAvailable: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo").trim().parse().expect("MemAvailable");
    // A floor 256 MiB under what is available: a 512 MiB shrink breaks it.
    let floor_mib = avail / 1024 - 256;
    g.sh(&format!(
        "echo 'veto_min_available_mib = {floor_mib}' >/etc/vmplug/guest.toml; kill $(cat /run/agent.pid); sleep 1"
    ));
    let before = g.mem_total_kib();
    let out = g.vmplug(&["resize-memory", &name, "-512M", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(out.status.code(), Some(2), "a refusal's exit code: {r}");
    assert_eq!(r["outcome"], "refused", "{r}");
    let veto = r["findings"].as_array().expect("findings").iter().find(|f| f["id"] == "guest.veto").cloned();
    let veto = veto.unwrap_or_else(|| panic!("no guest.veto finding: {r}"));
    assert!(veto["message"].as_str().is_some_and(|m| m.contains("veto_min_available_mib")), "{veto}");
    assert_eq!(g.mem_total_kib(), before, "nothing was released");
    // A DIMM is memory given back too: the same floor refuses its detach
    // before the guest offlines a block of it.
    let out = g.vmplug(&["detach-memory", &name, "--alias", &dimm, "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(out.status.code(), Some(2), "a refusal's exit code: {r}");
    let veto = r["findings"].as_array().expect("findings").iter().find(|f| f["id"] == "guest.veto").cloned();
    let veto = veto.unwrap_or_else(|| panic!("no guest.veto finding: {r}"));
    assert!(veto["message"].as_str().is_some_and(|m| m.contains("veto_min_available_mib")), "{veto}");
    assert!(g.daemon.virsh_ok(&["dumpxml", &name]).contains(&format!("<alias name='{dimm}'/>")), "still attached");
    assert_eq!(g.mem_total_kib(), before, "no block of it was offlined");
    // Within the floor the guest agrees.
    let r = g.vmplug_json(&["resize-memory", &name, "-128M"]);
    assert_eq!(r["outcome"], "ok", "{r}");
}
