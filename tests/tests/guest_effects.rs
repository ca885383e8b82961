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
