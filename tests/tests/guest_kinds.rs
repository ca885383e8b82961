//! The guests users run, beyond Debian 12's kernel with nothing onlining:
//! Debian trixie's 6.12, which onlines hot-added memory itself (into the Normal
//! zone unless told otherwise), and an openEuler-style udev rule that onlines
//! every new CPU and block as plain `online` while the agent does the same.
//! vmplug's report must stay exact: which blocks, which zone, who onlined them;
//! an asked zone enforced or the deviation named with what to change.

use vmplug_e2e::{Guest, GuestKernel, GuestSpec};

fn blocks(r: &serde_json::Value) -> Vec<(String, String)> {
    r["guest"]["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| (b["zone"].as_str().unwrap_or("?").to_string(), b["status"].as_str().unwrap_or("?").to_string()))
        .collect()
}

fn trixie(cmdline: &str) -> GuestSpec {
    GuestSpec {
        kernel: GuestKernel::Trixie,
        cells_mib: vec![384, 384],
        max_vcpus: 2,
        virtio_mem: vec![(1, 2048)],
        cmdline_extra: cmdline.into(),
        ..GuestSpec::default()
    }
}

/// `vmplug ARGS --json`, expecting exit `code`; the document, schema-checked.
fn expect(g: &Guest, args: &[&str], code: i32) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = g.vmplug(&a);
    assert_eq!(out.status.code(), Some(code), "{args:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    vmplug_e2e::schema::assert_valid(&r, &a);
    r
}

/// A request with an explicit zone on a kernel that onlines by itself: done
/// (exit 0) with the blocks moved, or refused by the guest (exit 5) naming the
/// blocks left in Normal and the boot options that fix it. Nothing else.
fn enforced_or_named(g: &Guest, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = g.vmplug(&a);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    vmplug_e2e::schema::assert_valid(&r, &a);
    match out.status.code() {
        Some(0) => {}
        Some(5) => {
            let msg = r["message"].as_str().expect("message");
            assert!(msg.contains("Normal") && msg.contains("memhp_default_state=online_movable"), "{msg}");
        }
        other => panic!("{args:?} ended {other:?}: {r}"),
    }
    r
}

#[test]
fn trixie_onlines_memory_itself_and_vmplug_says_so() {
    let mut g = Guest::boot("trixie", trixie(""));
    let name = g.name.clone();
    assert_eq!(g.sh("cat /sys/devices/system/memory/auto_online_blocks").trim(), "online");
    // The default zone policy accepts the kernel's choice and says who onlined.
    let r = g.vmplug_json(&["attach-memory", &name, "256M", "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(blocks(&r), vec![("Normal".into(), "already".into()); 2], "{r}");
    let msg = r["message"].as_str().expect("message");
    assert!(msg.contains("2 of them onlined by the kernel or a udev rule before the agent"), "{msg}");
    // An explicit zone the kernel did not use: the agent moves the blocks when it
    // can empty them (measured both ways on this kernel: it depends on whether
    // the kernel has allocated from them yet), else the deviation and its fix.
    let r = enforced_or_named(&g, &["attach-memory", &name, "256M", "--node", "1", "--zone", "movable"]);
    if r["outcome"] == "ok" {
        assert_eq!(blocks(&r), vec![("Movable".into(), "done".into()); 2], "moved by the agent: {r}");
    }
    // virtio-mem: movable by default, the same; --zone online takes the kernel's choice.
    enforced_or_named(&g, &["resize-memory", &name, "+512M", "--node", "1"]);
    let r = g.vmplug_json(&["resize-memory", &name, "+512M", "--node", "1", "--zone", "online"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    // Unplugging kernel-onlined memory: its blocks are in Normal, which the
    // guest's forecast never counts as releasable (a DIMM goes whole or not at
    // all), so the unplug is refused before anything changes (tp-libvirt's
    // default-zone DIMM unplug, "rejected by the guest", caught on the host).
    let st = g.vmplug_json(&["status", &name]);
    let first = st["dimms"][0]["alias"].as_str().expect("alias").to_string();
    let r = expect(&g, &["detach-memory", &name, "--alias", &first], 2);
    assert!(r["findings"].as_array().expect("findings").iter().any(|f| f["id"] == "mem.forecast"), "{r}");
    let still = g.daemon.virsh_ok(&["dumpxml", &name]).contains(&format!("<alias name='{first}'/>"));
    assert!(still, "refused, and still attached: {r}");
    // This kernel sees no hot-pluggable CPU on QEMU 10's MADT: refused before
    // anything changes, by the guest's own possible mask.
    let r = expect(&g, &["setvcpus", &name, "2"], 2);
    assert!(r["findings"].as_array().expect("findings").iter().any(|f| f["id"] == "cpu.guest-possible"), "{r}");
    assert_eq!(g.online_cpus(), "0");
    // The kernel's own markers, case-sensitive: a loaded TCG host makes the
    // guest say "… estimate for loops_per_jiffy", which is no oops.
    let oops = g.sh("dmesg | grep -E -B2 -A12 '(^|[^[:alnum:]_])Oops|kernel BUG|BUG: |Call Trace:'; true");
    assert_eq!(oops.trim(), "", "no oops");
}

#[test]
fn trixie_told_to_online_movable_passes_with_the_default_zone() {
    let mut g = Guest::boot("trixiemov", trixie("memhp_default_state=online_movable"));
    let name = g.name.clone();
    assert_eq!(g.sh("cat /sys/devices/system/memory/auto_online_blocks").trim(), "online_movable");
    let r = g.vmplug_json(&["resize-memory", &name, "+512M", "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(r["virtio_mem"][0]["zones"]["Movable"].as_u64(), Some(4), "{r}");
    let r = g.vmplug_json(&["resize-memory", &name, "-512M", "--node", "1"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let r = g.vmplug_json(&["attach-memory", &name, "256M", "--node", "0", "--zone", "movable"]);
    assert_eq!(blocks(&r), vec![("Movable".into(), "already".into()); 2], "{r}");
}

/// openEuler ships a rule that onlines every new CPU and memory block as plain
/// `online`; here it runs beside the agent, both racing for each new device.
/// The race is not left to chance: each outcome is forced and its report
/// checked — the agent first (udevd stopped while the DIMM arrives, its queued
/// events then find the blocks online), and the rule first (a watcher in the
/// guest stops the agent the instant the DIMM's first block appears and lets
/// it go once udev has onlined every block).
#[test]
fn an_openeuler_style_rule_racing_the_agent_leaves_the_report_exact() {
    let spec = GuestSpec { cells_mib: vec![384, 384], max_vcpus: 2, ..GuestSpec::default() };
    let mut g = Guest::boot("openeuler", spec);
    let name = g.name.clone();
    let udevd = g.sh("rm -f /etc/udev/rules.d/80-vmplug-*; \
          printf '%s\\n' 'SUBSYSTEM==\"cpu\", ACTION==\"add\", TEST==\"online\", ATTR{online}==\"0\", ATTR{online}=\"1\"' \
                        'SUBSYSTEM==\"memory\", ACTION==\"add\", TEST==\"state\", ATTR{state}==\"offline\", ATTR{state}=\"online\"' \
                        >/etc/udev/rules.d/40-openEuler.rules; \
          setsid /lib/systemd/systemd-udevd --daemon </dev/null >/dev/null 2>&1; sleep 1; pidof systemd-udevd");
    let udevd = udevd.trim().to_string();
    assert!(udevd.parse::<u32>().is_ok(), "udevd runs (pid {udevd:?}): the rule can race");
    let info = g.vmplug_json(&["status", &name]);
    assert_eq!(info["guest"]["udev_online_rule"], true, "the agent sees the rule: {info}");

    // The agent first: udevd is stopped while the DIMM arrives.
    g.sh(&format!("kill -STOP {udevd}"));
    let r = g.vmplug_json(&["attach-memory", &name, "256M", "--node", "0"]);
    g.sh(&format!("kill -CONT {udevd}"));
    assert_eq!(r["outcome"], "ok", "{r}");
    assert!(blocks(&r).iter().all(|(_, s)| s == "done") && blocks(&r).len() == 2, "the agent onlined both: {r}");
    assert!(!r["message"].as_str().expect("message").contains("onlined by the kernel"), "{r}");

    // The rule first: the agent is stopped as the first block appears and let
    // go once no block is offline (udev onlined them). The watcher counts the
    // blocks with the shell's own glob, no process per turn: a loop of `ls`
    // under TCG was slow enough that udev and the agent had finished before it
    // looked, and the race it stages never happened.
    g.sh("agent=$(cat /run/agent.pid); set -- /sys/devices/system/memory/memory*; n=$#; \
          (while set -- /sys/devices/system/memory/memory*; [ $# -le $n ]; do :; done; \
           kill -STOP $agent; echo stopped > /tmp/stopped; \
           while grep -q offline /sys/devices/system/memory/memory*/state; do sleep 1; done; \
           kill -CONT $agent; echo released > /tmp/released) >/dev/null 2>&1 & true");
    let r = g.vmplug_json(&["attach-memory", &name, "512M", "--node", "0"]);
    // The watcher's marks may trail the answer by its last steps (the agent
    // can take a block before it is stopped); a short wait covers that.
    let released = g.sh("for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /tmp/released ] && break; sleep 1; done; \
                         cat /tmp/stopped /tmp/released");
    assert_eq!(
        released.split_whitespace().collect::<Vec<_>>(),
        ["stopped", "released"],
        "the watcher stopped and released the agent"
    );
    assert_eq!(r["outcome"], "ok", "{r}");
    let b = blocks(&r);
    assert_eq!(b.len(), 4, "one result per block: {r}");
    assert!(b.iter().all(|(_, s)| s == "done" || s == "already"), "no double-online error surfaced: {r}");
    // The agent may have taken the first block before it was stopped; the
    // rest were udev's.
    let others = b.iter().filter(|(_, s)| s == "already").count();
    assert!(others >= 3, "udev onlined the blocks that came while the agent was stopped: {r}");
    let msg = r["message"].as_str().expect("message");
    assert!(msg.contains(&format!("{others} of them onlined by the kernel or a udev rule")), "{msg}");

    let r = g.vmplug_json(&["setvcpus", &name, "2"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(g.online_cpus(), "0-1");
    // The kernel's own markers, case-sensitive: a loaded TCG host makes the
    // guest say "… estimate for loops_per_jiffy", which is no oops.
    let oops = g.sh("dmesg | grep -E -B2 -A12 '(^|[^[:alnum:]_])Oops|kernel BUG|BUG: |Call Trace:'; true");
    assert_eq!(oops.trim(), "", "no oops");
}
