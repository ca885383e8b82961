//! `make demo`: boots a throwaway guest under a private libvirtd, hot-plugs CPUs
//! and memory with the real `vmplug`, and shows the closed-loop report.

use std::time::Instant;

use vmplug_e2e::{Env, Guest, GuestSpec, Transport};

fn step(g: &Guest, title: &str, args: &[&str]) -> std::process::Output {
    println!("\n=== {title}\n$ vmplug {}", args.join(" "));
    let out = g.vmplug_quiet(args);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.stderr.is_empty() {
        print!("{}", String::from_utf8_lossy(&out.stderr));
    }
    println!("[exit {}]", out.status.code().unwrap_or(-1));
    out
}

fn main() {
    let started = Instant::now();
    // Only what this one x86 guest needs (`make demo` sets up nothing else).
    Env::demo();
    println!("vmplug demo: booting a guest (TCG, Debian 6.1 kernel, busybox + vmplug-guest) under a private libvirtd…");
    let spec = GuestSpec {
        vcpus: 1,
        max_vcpus: 4,
        cells_mib: vec![512, 512],
        transport: Transport::Serial,
        virtio_mem: vec![(0, 2048)],
        ..GuestSpec::default()
    };
    let mut g = Guest::boot("demo", spec);
    let name = g.name.clone();
    println!("guest {name} booted in {:.1} s; agent over virtio-serial", started.elapsed().as_secs_f64());
    let mut results = Vec::new();
    step(&g, "The host's and the guest's view", &["status", &name]);
    step(
        &g,
        "Preflight for 4 vCPUs and 1 GiB on node 1",
        &["check", &name, "--cpus", "4", "--memory", "1G", "--node", "1"],
    );
    for (title, args) in [
        ("CPU hot-plug 1 → 2, live and persistent", vec!["setvcpus", &name, "2", "--live", "--config"]),
        ("CPU hot-plug 2 → 4", vec!["setvcpus", &name, "4", "--live", "--config"]),
        ("Memory hot-plug: 1 GiB on guest node 1", vec!["attach-memory", &name, "1G", "--node", "1", "--live"]),
        (
            "Memory hot-plug: 512 MiB, balanced over the cells",
            vec!["attach-memory", &name, "512M", "--live", "--request-id", "demo512"],
        ),
        (
            "A size the guest cannot use: refused before anything is plugged",
            vec!["attach-memory", &name, "100M", "--live"],
        ),
        (
            "Memory unplug: the 512 MiB again, offlined in the guest before libvirt detaches it",
            vec!["detach-memory", &name, "--request-id", "demo512", "--live"],
        ),
        ("virtio-mem: node 0 grows by 512 MiB, onlined movable", vec!["resize-memory", &name, "+512M", "--node", "0"]),
        ("virtio-mem: and gives it back, released by the guest", vec!["resize-memory", &name, "-512M", "--node", "0"]),
    ] {
        let out = step(&g, title, &args);
        results.push((title, out.status.code().unwrap_or(-1)));
    }
    step(&g, "After: host and guest agree", &["status", &name]);
    let seen = g.sh("cat /sys/devices/system/cpu/online; grep MemTotal /proc/meminfo");
    println!("\n=== Inside the guest\n{seen}");
    println!("\n=== Summary");
    for (title, code) in &results {
        println!(
            "  [{}] {title}",
            if *code == 0 {
                " ok "
            } else if *code == 2 {
                "refused"
            } else {
                "FAIL"
            }
        );
    }
    println!("demo finished in {:.1} s; tearing the guest down", started.elapsed().as_secs_f64());
    let failed = results.iter().filter(|(t, c)| if t.starts_with("A size") { *c != 2 } else { *c != 0 }).count();
    drop(g);
    if failed > 0 {
        eprintln!("demo: {failed} step(s) did not behave as expected");
        std::process::exit(1);
    }
}
