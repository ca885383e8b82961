//! Golden files for `vmplug prepare`: input definition → prepared definition.
//! Regenerate deliberately with `VMPLUG_BLESS=1`.

use vmplug::domain::NumaMode;
use vmplug::prepare::{prepare, PrepareError, PrepareOpts};

/// The one error of a refusal: its rule id and message.
fn refusal(e: &PrepareError) -> (&'static str, String) {
    let errors: Vec<_> = e
        .findings()
        .into_iter()
        .filter(|f| f.severity == vmplug::preflight::Severity::Error)
        .map(|f| (f.id, f.message))
        .collect();
    assert_eq!(errors.len(), 1, "one error: {errors:?}");
    errors.into_iter().next().expect("one")
}

/// The refusal is `id`'s, and its message has `text`.
fn assert_refused(e: &PrepareError, id: &str, text: &str) {
    let (got, message) = refusal(e);
    assert_eq!(got, id, "{message}");
    assert!(message.contains(text), "{id}: {message}");
    assert_eq!(e.to_string(), message);
}
use vmplug::xml::{DomainFacts, HostFacts};
use vmplug_common::{Bytes, GIB};

fn host() -> HostFacts {
    let mut h = HostFacts::parse_capabilities(include_str!("fixtures/caps.xml")).expect("caps");
    h.free = vec![Bytes(16 * GIB), Bytes(GIB)];
    h
}

fn golden(name: &str, input: &str, opts: &PrepareOpts) -> DomainFacts {
    let out = prepare(input, &host(), opts).expect("prepares");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("VMPLUG_BLESS").is_some() {
        std::fs::write(&path, &out.xml).expect("bless");
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (VMPLUG_BLESS=1 creates it)", path.display()));
    assert_eq!(out.xml, want, "prepared XML of {name} changed");
    // Idempotent: preparing the result again changes nothing.
    let again = prepare(&out.xml, &host(), opts).expect("prepares again");
    assert_eq!(again.xml, out.xml, "prepare is not idempotent for {name}");
    DomainFacts::parse(&out.xml).expect("reads back")
}

#[test]
fn plain_domain_one_cell() {
    let input = include_str!("fixtures/plain.xml");
    let opts =
        PrepareOpts { max_vcpus: Some(8), max_memory: Some(Bytes(16 * GIB)), slots: Some(16), ..Default::default() };
    let f = golden("prepared-plain-1cell.xml", input, &opts);
    assert_eq!((f.vcpus_current, f.vcpus_max), (2, 8));
    assert_eq!((f.max_memory, f.slots), (Some(Bytes(16 * GIB)), Some(16)));
    assert_eq!(f.cells.len(), 1);
    assert_eq!(f.cells[0].cpus.to_string(), "0-7");
    let out = prepare(input, &host(), &opts).expect("prepares").xml;
    assert!(out.contains("<!-- hand-written; this comment must survive -->"));
    assert!(out.contains("<app:tag xmlns:app='https://example.com/app'>keep-me</app:tag>"));
}

#[test]
fn two_cells_on_two_host_nodes() {
    let input = include_str!("fixtures/plain.xml");
    let opts = PrepareOpts {
        max_vcpus: Some(4),
        max_memory: Some(Bytes(8 * GIB)),
        cells: Some(2),
        host_nodes: Some("0-1".parse().expect("set")),
        mode: Some(NumaMode::Preferred),
        ..Default::default()
    };
    let f = golden("prepared-plain-2cells.xml", input, &opts);
    assert_eq!(f.cells.iter().map(|c| c.cpus.to_string()).collect::<Vec<_>>(), vec!["0-1", "2-3"]);
    assert_eq!(f.cells.iter().map(|c| c.memory).collect::<Vec<_>>(), vec![Bytes(2 * GIB), Bytes(2 * GIB)]);
    assert_eq!(f.memnodes.get(&1).map(|(m, s)| (m.clone(), s.to_string())), Some(("preferred".into(), "1".into())));
    assert_eq!(f.vcpupins.get(&3).map(|s| s.to_string()), Some("4-7".into()), "cell 1's vCPUs on host node 1's CPUs");
}

#[test]
fn existing_cputune_children_are_kept() {
    let input = include_str!("fixtures/x86-ready.xml");
    let opts = PrepareOpts { cells: Some(2), host_nodes: Some("0".parse().expect("set")), ..Default::default() };
    let f = golden("prepared-ready-cputune.xml", input, &opts);
    assert_eq!(f.cpu_shares, Some(1024), "<shares> kept");
    assert_eq!(f.emulatorpin.map(|s| s.to_string()), Some("0-1".into()), "<emulatorpin> kept");
    assert!(f.vcpupins.values().all(|s| s.to_string() == "0-3"), "every vCPU on node 0");
    assert_eq!(f.dimms.len(), 1, "devices untouched");
}

#[test]
fn aarch64_virt_41_with_topology() {
    let opts = PrepareOpts { max_vcpus: Some(8), slots: Some(256), cells: Some(2), ..Default::default() };
    let f = golden("prepared-arm-virt41.xml", include_str!("fixtures/arm-virt41.xml"), &opts);
    assert_eq!(
        f.cells.iter().map(|c| c.cpus.to_string()).collect::<Vec<_>>(),
        vec!["0-3", "4-7"],
        "whole 2-core sockets per cell"
    );
    assert_eq!(f.topology.map(|t| t.sockets), Some(4));
}

#[test]
fn impossible_requests_are_refused_each_with_its_reason() {
    let plain = include_str!("fixtures/plain.xml");
    let h = host();
    let refuse = |xml: &str, o: PrepareOpts| prepare(xml, &h, &o).expect_err("refused");
    assert_refused(
        &refuse(plain, PrepareOpts { slots: Some(257), ..Default::default() }),
        "mem.slots",
        "257 memory slots requested: the guide allows at most 256",
    );
    assert_refused(
        &refuse(plain, PrepareOpts { max_memory: Some(Bytes(GIB)), ..Default::default() }),
        "mem.max-memory",
        "max memory 1 GiB is below the current memory",
    );
    assert_refused(
        &refuse(plain, PrepareOpts { max_vcpus: Some(1), ..Default::default() }),
        "cpu.max",
        "1 vCPUs is below the 2 the domain has now",
    );
    assert_refused(
        &refuse(plain, PrepareOpts { host_nodes: Some("5".parse().expect("set")), ..Default::default() }),
        "numatune.nodes",
        "host NUMA node 5 does not exist (host nodes: 0-1)",
    );
    // Node 1 has 1 GiB free; a strict 4 GiB cell cannot start there.
    assert_refused(
        &refuse(plain, PrepareOpts { host_nodes: Some("1".parse().expect("set")), ..Default::default() }),
        "numatune.strict-free",
        "to host node 1 with 1 GiB free would fail at start",
    );
    let old_arm = include_str!("fixtures/arm-virt41.xml").replace("virt-4.1", "virt-4.0");
    assert_refused(&refuse(&old_arm, PrepareOpts::default()), "cpu.machine", "the guide requires virt-4.1 or newer");
    let arm = include_str!("fixtures/arm-virt41.xml");
    assert_refused(
        &refuse(arm, PrepareOpts { max_vcpus: Some(7), ..Default::default() }),
        "cpu.cores-multiple",
        "7 vCPUs is not a multiple of the topology's",
    );
    // On a QEMU whose virt-4.1 cannot hot-plug vCPUs (upstream's), it has no GED
    // either: refused, naming the newest versioned machine libvirt offers.
    let upstream = HostFacts {
        cpu_hotplug: Some(false),
        machines: vec!["virt".into(), "virt-10.0".into(), "virt-4.1".into(), "virt-9.2".into()],
        ..host()
    };
    let e = prepare(arm, &upstream, &PrepareOpts::default()).expect_err("refused");
    assert_refused(&e, "cpu.machine", "use virt-10.0");
    // On virt-10.0 the same QEMU can take DIMMs; prepare says how vCPUs scale there.
    let newer = arm.replace("virt-4.1", "virt-10.0");
    let p = prepare(&newer, &upstream, &PrepareOpts::default()).expect("prepares");
    assert!(p.notes.iter().any(|n| n.contains("setvcpus --guest")), "{:?}", p.notes);
    assert_refused(
        &refuse(plain, PrepareOpts { cells: Some(3), ..Default::default() }),
        "cpu.socket-cell",
        "3 guest NUMA cells for 2 sockets: every cell needs at least one whole socket",
    );
}

#[test]
fn hugepage_backed_cells_are_whole_hugepages() {
    let opts =
        PrepareOpts { max_vcpus: Some(4), max_memory: Some(Bytes(16 * GIB)), cells: Some(2), ..Default::default() };
    let f = golden("prepared-hugepages.xml", include_str!("fixtures/hugepages.xml"), &opts);
    // 3 GiB in 1 GiB pages over two cells: 2 + 1, never 1.5 + 1.5.
    assert_eq!(f.cells.iter().map(|c| c.memory).collect::<Vec<_>>(), vec![Bytes(2 * GIB), Bytes(GIB)]);
    assert_eq!(f.hugepage_size, Some(Bytes(GIB)), "<memoryBacking> untouched");
}

/// Security finding 9: an empty `--host-nodes` divided by zero (a panic); and
/// `--slots 0` was accepted, leaving memory hot-plug impossible without a word.
#[test]
fn empty_host_nodes_and_zero_slots_are_refused() {
    let input = include_str!("fixtures/plain.xml");
    let empty = PrepareOpts { host_nodes: Some(vmplug_common::CpuSet::new()), ..Default::default() };
    let e = prepare(input, &host(), &empty).expect_err("refused, not a panic");
    assert_refused(&e, "numatune.nodes", "--host-nodes is empty: name at least one host NUMA node (host nodes: 0-1)");
    let zero = PrepareOpts { slots: Some(0), ..Default::default() };
    assert_refused(&prepare(input, &host(), &zero).expect_err("refused"), "mem.slots", "0 memory slots");
}

/// Issue 14: `prepare` said "already hot-plug-ready" for domains the guide
/// forbids. The prepared definition must pass the readiness rules.
#[test]
fn the_prepared_definition_is_held_to_the_readiness_rules() {
    use vmplug::ops::readiness_of;
    let input = include_str!("fixtures/plain.xml");
    let ids = |xml: &str| -> Vec<(&'static str, vmplug::preflight::Severity)> {
        readiness_of(xml, &host()).expect("parses").iter().map(|f| (f.id, f.severity)).collect()
    };
    let ready =
        PrepareOpts { max_vcpus: Some(8), max_memory: Some(Bytes(16 * GIB)), slots: Some(16), ..Default::default() };
    let ok = prepare(input, &host(), &ready).expect("prepares").xml;
    assert!(ids(&ok).iter().all(|(_, s)| *s != vmplug::preflight::Severity::Error), "{:?}", ids(&ok));

    // A vhost-user interface excludes memory hot-plug.
    let vhost = input.replace(
        "</devices>",
        "<interface type='vhostuser'><source type='unix' path='/run/vu.sock' mode='client'/><model type='virtio'/></interface>\n</devices>",
    );
    let out = prepare(&vhost, &host(), &ready).expect("prepares").xml;
    assert!(ids(&out).contains(&("mem.vhost-user", vmplug::preflight::Severity::Error)), "{:?}", ids(&out));

    // 200 slots: only 64 minus the virtio-net devices are usable.
    let many = PrepareOpts { slots: Some(200), ..ready.clone() };
    let out = prepare(input, &host(), &many).expect("prepares").xml;
    assert!(ids(&out).contains(&("mem.slots", vmplug::preflight::Severity::Error)), "{:?}", ids(&out));

    // 2 GiB of initial memory: the guide's 4 GiB for Linux guests, warned.
    let small = input.replace("<memory unit='KiB'>4194304</memory>", "<memory unit='KiB'>2097152</memory>").replace(
        "<currentMemory unit='KiB'>4194304</currentMemory>",
        "<currentMemory unit='KiB'>2097152</currentMemory>",
    );
    let out = prepare(&small, &host(), &ready).expect("prepares").xml;
    assert!(ids(&out).contains(&("mem.linux-4g", vmplug::preflight::Severity::Warning)), "{:?}", ids(&out));

    // By default max vCPUs stays at the current count: said, not silent.
    let out = prepare(input, &host(), &PrepareOpts::default()).expect("prepares").xml;
    assert!(ids(&out).contains(&("cpu.max", vmplug::preflight::Severity::Warning)), "{:?}", ids(&out));
}

/// Security finding 8 (issue #26): `prepare --max-vcpus 2000000 --cells 1000000`
/// spun for minutes laying out cells no machine can start. vCPUs and cells are
/// bounded before any layout, each with its own refusal; the bounds themselves
/// are accepted.
#[test]
fn huge_vcpu_and_cell_counts_are_refused_at_once() {
    use vmplug::prepare::{MAX_CELLS, MAX_VCPUS};
    let plain = include_str!("fixtures/plain.xml");
    let h = host();
    let started = std::time::Instant::now();
    let huge = PrepareOpts { max_vcpus: Some(2_000_000), cells: Some(1_000_000), ..Default::default() };
    let e = prepare(plain, &h, &huge).expect_err("refused");
    // Both counts are over their bounds: each says so, before any layout.
    assert_eq!(e.ids(), ["cpu.max", "cpu.socket-cell"], "{e}");
    assert!(e.to_string().contains("2000000 vCPUs requested: at most 4096"), "{e}");
    let cells = PrepareOpts { max_vcpus: Some(MAX_VCPUS), cells: Some(1_000_000), ..Default::default() };
    let e = prepare(plain, &h, &cells).expect_err("refused");
    assert_refused(&e, "cpu.socket-cell", "1000000 guest NUMA cells requested: at most 128");
    let over = PrepareOpts { max_vcpus: Some(MAX_VCPUS + 1), ..Default::default() };
    assert_refused(&prepare(plain, &h, &over).expect_err("refused"), "cpu.max", "4097 vCPUs requested: at most 4096");
    let most = PrepareOpts { max_vcpus: Some(MAX_VCPUS), cells: Some(MAX_CELLS), ..Default::default() };
    let p = prepare(plain, &h, &most).expect("the bounds themselves are accepted");
    let f = vmplug::xml::DomainFacts::parse(&p.xml).expect("parses");
    assert_eq!((f.vcpus_max, f.cells.len()), (MAX_VCPUS, MAX_CELLS as usize));
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "took {:?}", started.elapsed());
}

/// Issue #27: the agent's channel is added without a path (libvirt chooses the
/// socket under its channel directory, which its AppArmor and SELinux
/// profiles allow), or on the path asked for.
#[test]
fn the_agent_channel_is_added_where_asked() {
    use vmplug::link::{discover, LinkError};
    let input = include_str!("fixtures/plain.xml");
    let at = PrepareOpts { channel_path: Some("/run/vmplug/web1.agent".into()), ..Default::default() };
    let f = golden("prepared-plain-channel-path.xml", input, &at);
    assert_eq!(f.channels.get("org.vmplug.guest.0"), Some(&Some("/run/vmplug/web1.agent".to_string())));

    // Without a path the inactive definition cannot say where the agent is.
    let f =
        DomainFacts::parse(&prepare(input, &host(), &PrepareOpts::default()).expect("prepares").xml).expect("parses");
    assert_eq!(f.channels.get("org.vmplug.guest.0"), Some(&None));
    assert!(matches!(discover(&f), Err(LinkError::ChannelPathUnknown { .. })));

    // An existing channel is kept, or moved to the path asked for.
    let ready = include_str!("fixtures/x86-ready.xml");
    let kept = prepare(ready, &host(), &PrepareOpts::default()).expect("prepares").xml;
    assert_eq!(kept.matches("<channel").count(), 1);
    let moved = PrepareOpts { channel_path: Some("/run/other.sock".into()), ..Default::default() };
    let out = prepare(ready, &host(), &moved).expect("prepares").xml;
    assert_eq!(out.matches("<channel").count(), 1, "{out}");
    let f = DomainFacts::parse(&out).expect("parses");
    assert_eq!(f.channels.get("org.vmplug.guest.0"), Some(&Some("/run/other.sock".to_string())));

    // A domain reached through <vsock> gets no channel (it would win over vsock).
    let vsock =
        input.replace("</devices>", "  <vsock model='virtio'><cid auto='no' address='3'/></vsock>\n  </devices>");
    let out = prepare(&vsock, &host(), &PrepareOpts::default()).expect("prepares");
    assert!(!out.xml.contains("<channel"), "{}", out.xml);
    assert!(out.notes.iter().any(|n| n.contains("no channel added")), "{:?}", out.notes);

    // <devices/> grows a list; a relative path is refused.
    let empty =
        input.replace("<devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n  </devices>", "<devices/>");
    assert_ne!(empty, input);
    let out = prepare(&empty, &host(), &PrepareOpts::default()).expect("prepares").xml;
    assert!(DomainFacts::parse(&out).expect("parses").channels.contains_key("org.vmplug.guest.0"), "{out}");
    let relative = PrepareOpts { channel_path: Some("agent.sock".into()), ..Default::default() };
    assert_refused(
        &prepare(input, &host(), &relative).expect_err("refused"),
        "prepare.channel-path",
        "channel path 'agent.sock' is not absolute",
    );
}
