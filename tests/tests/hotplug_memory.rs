//! Scenarios 2 and 3: DIMMs on a two-cell guest, every block online on the
//! right node with MemTotal growing by exactly the size; a misaligned size
//! refused, and, forced past preflight, the guest's rejection reported.

use vmplug_e2e::{Guest, GuestSpec};

const MIB: u64 = 1024 * 1024;

fn blocks_of(r: &serde_json::Value) -> Vec<(u64, u64)> {
    r["guest"]["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| (b["index"].as_u64().expect("index"), b["node"].as_u64().expect("node")))
        .collect()
}

#[test]
fn dimms_on_two_cells_are_onlined_on_their_nodes() {
    let spec = GuestSpec { cells_mib: vec![384, 384], max_vcpus: 2, ..GuestSpec::default() };
    let mut g = Guest::boot("mem", spec);
    let name = g.name.clone();
    for (size, node, bytes) in [("128M", None, 128 * MIB), ("1G", Some(0), 1024 * MIB), ("512M", Some(1), 512 * MIB)] {
        let before = g.mem_total_kib();
        let mut args = vec!["attach-memory", &name, size, "--live"];
        let node_s = node.map(|n: u32| n.to_string());
        if let Some(n) = &node_s {
            args.extend(["--node", n]);
        }
        let r = g.vmplug_json(&args);
        assert_eq!(r["outcome"], "ok", "{r}");
        let blocks = blocks_of(&r);
        assert_eq!(blocks.len() as u64, bytes / (128 * MIB), "one result per block");
        for (index, reported_node) in blocks {
            let (state, sys_node) = g.block(index);
            assert_eq!(state, "online", "memory{index}");
            assert_eq!(sys_node, Some(reported_node as u32), "memory{index} node");
            if let Some(n) = node {
                assert_eq!(reported_node, n as u64, "memory{index} on the requested node");
            }
        }
        assert_eq!(g.mem_total_kib() - before, bytes / 1024, "MemTotal grew by exactly {size}");
    }
    let st = g.vmplug_json(&["status", &name]);
    assert_eq!(st["dimms"].as_array().expect("dimms").len(), 3);
    for d in st["dimms"].as_array().expect("dimms") {
        assert!(d["blocks"].as_array().expect("blocks").iter().all(|b| b["online"] == true), "{d}");
    }
}

#[test]
fn misaligned_size_is_refused_and_forcing_it_is_caught() {
    let mut g = Guest::boot("memalign", GuestSpec::default());
    let name = g.name.clone();
    let out = g.vmplug(&["attach-memory", &name, "100M", "--live", "--json"]);
    assert_eq!(out.status.code(), Some(2), "refused by preflight");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    vmplug_e2e::schema::assert_valid(&r, &["(a run that exits non-zero)"]);
    let msg = r["findings"][0]["message"].as_str().expect("message").to_string();
    assert!(msg.contains("128 MiB") && msg.contains("100 MiB"), "names both sizes: {msg}");
    assert_eq!(g.daemon.virsh_ok(&["dumpxml", &name]).matches("model='dimm'").count(), 0, "nothing attached");

    // Forced past preflight: libvirt "succeeds", the guest cannot use it, and
    // vmplug says so instead of reporting success.
    let out = g.vmplug(&["attach-memory", &name, "100M", "--live", "--force", "--timeout", "5", "--json"]);
    let code = out.status.code();
    assert!(matches!(code, Some(4) | Some(5)), "guest timeout or guest failure, got {code:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    vmplug_e2e::schema::assert_valid(&r, &["(a run that exits non-zero)"]);
    assert_ne!(r["outcome"], "ok");
    let dmesg = g.sh("dmesg | grep -i -E 'unaligned|add_memory' | tail -3");
    assert!(!dmesg.is_empty(), "the guest kernel rejected the DIMM");
}

/// Staged growth: 16 GiB into a 512 MiB guest is more than 1:32 of what it has
/// available, so vmplug plugs it in waves, each onlined before the next; every
/// block online, MemTotal exact, no OOM.
#[test]
fn sixteen_gib_into_a_small_guest_goes_in_waves() {
    let spec = GuestSpec { max_memory_mib: 24 * 1024, max_vcpus: 2, ..GuestSpec::default() };
    let mut g = Guest::boot("memwaves", spec);
    let name = g.name.clone();
    let before = g.mem_total_kib();
    let r = g.vmplug_json(&["attach-memory", &name, "16G", "--max-dimm", "2G"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let applied: Vec<&str> = r["applied"].as_array().expect("applied").iter().filter_map(|a| a.as_str()).collect();
    let waves = applied.iter().filter(|a| a.starts_with("wave ")).count();
    assert!(waves >= 2, "more than 1:32 of what a 512 MiB guest has cannot go at once: {applied:?}");
    let m = r["message"].as_str().unwrap_or_default();
    assert!(m.contains(&format!("in {waves} waves")), "{r}");
    assert!(!m.contains("udev rule"), "earlier waves were onlined by the agent, nobody else: {m}");
    assert_eq!(blocks_of(&r).len(), 128, "every block of the 16 GiB");
    assert_eq!(g.mem_total_kib() - before, 16 * 1024 * 1024, "MemTotal grew by exactly 16 GiB");
    let oom = g.sh("dmesg | grep -c -i -E 'out of memory|oom-kill' || true");
    assert_eq!(oom.trim(), "0", "no OOM in the guest");
}
