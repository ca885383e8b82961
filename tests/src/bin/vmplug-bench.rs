//! `make bench`: in one nested guest, interleaving the methods run by run,
//! measures how fast hot-plugged CPUs and memory are really online —
//! vmplug's closed loop, the guide's udev rule (corrected), the guide's shell
//! loop, and kernel auto-online for memory, for DIMMs and for virtio-mem growth;
//! the floor of each operation is its fastest method in the same run, and each
//! method's time is split into the plug call, the guest until online, and the
//! rest. Then the agent's footprint, vmplug's own time per operation, staged
//! growth (16–64 GiB into a 4 GiB guest), virtio-mem from 1 to 48 GiB, and one
//! autoscale growing four guests.
//! Prints a markdown table and writes it, a JSON file and an SVG chart to
//! `results/`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use vmplug_e2e::stats::{latency_table, summarize, MIN_SAMPLES};
use vmplug_e2e::{Env, Guest, GuestSpec};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 128 * MIB;

/// Runs per method and operation: `VMPLUG_BENCH_RUNS`, never fewer than
/// [`MIN_SAMPLES`] (the least the report's intervals are computed from).
fn runs() -> usize {
    std::env::var("VMPLUG_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(MIN_SAMPLES).max(MIN_SAMPLES)
}

#[derive(Default)]
struct Samples(BTreeMap<(String, String), Vec<f64>>);

impl Samples {
    fn add(&mut self, op: &str, method: &str, ms: f64) {
        eprintln!("  {op:<14} {method:<22} {ms:>9.1} ms");
        self.0.entry((op.to_string(), method.to_string())).or_default().push(ms);
    }
}

/// Median (a true one: the mean of the middle two for an even count), min, max.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let s = summarize(v).expect("at least one sample");
    (s.median, s.min, s.max)
}

/// vCPU plugs: `runs()` for each of the four CPU methods, rotated.
fn cpu_plugs() -> u32 {
    4 * runs() as u32
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn total_blocks(g: &mut Guest) -> u64 {
    // A kernel message on the console can land in the answer (seen once, with
    // virtio-mem unplugging): the count is the last number, asked again if none.
    for _ in 0..5 {
        let out = g.sh("ls -d /sys/devices/system/memory/memory* | wc -l");
        if let Some(n) = out.split_whitespace().rev().find_map(|w| w.parse().ok()) {
            return n;
        }
        eprintln!("  block count unreadable in {out:?}; asking again");
    }
    panic!("no block count from the guest in five tries");
}

/// Waits inside the guest until `want` blocks exist and none is offline.
fn wait_memory_online(g: &mut Guest, want: u64) {
    g.sh(&format!(
        "while [ $(ls -d /sys/devices/system/memory/memory* | wc -l) -lt {want} ] || grep -q offline /sys/devices/system/memory/memory*/state; do usleep 2000; done"
    ));
}

fn attach_dimm_virsh(g: &Guest, size: u64) {
    let path = g.dir.join("bench-dimm.xml");
    std::fs::write(
        &path,
        format!("<memory model='dimm'><target><size unit='KiB'>{}</size><node>0</node></target></memory>", size / 1024),
    )
    .expect("dimm xml");
    g.daemon.virsh_ok(&["attach-device", &g.name, &path.to_string_lossy(), "--live"]);
}

/// Offlines the newest DIMM's blocks and unplugs it, so the next run starts equal.
fn remove_last_dimm(g: &mut Guest, blocks_before: u64, size: u64) {
    let n = size / BLOCK;
    g.sh(&format!(
        "for f in $(ls -d /sys/devices/system/memory/memory* | sed 's/.*memory//' | sort -n | tail -n {n}); do echo offline > /sys/devices/system/memory/memory$f/state; done"
    ));
    let xml = g.daemon.virsh_ok(&["dumpxml", &g.name]);
    let start = xml.rfind("<memory model='dimm'").expect("a DIMM to remove");
    let end = start + xml[start..].find("</memory>").expect("end") + "</memory>".len();
    let path = g.dir.join("bench-detach.xml");
    std::fs::write(&path, &xml[start..end]).expect("detach xml");
    g.daemon.virsh_ok(&["detach-device", &g.name, &path.to_string_lossy(), "--live"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while total_blocks(g) > blocks_before {
        assert!(Instant::now() < deadline, "DIMM was not removed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.daemon.virsh_ok(&["dumpxml", &g.name]).matches("model='dimm'").count() > 0 {
        assert!(Instant::now() < deadline, "libvirt still lists the DIMM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lets a freshly (re)started onliner reach its steady state before a run.
fn settle() {
    std::thread::sleep(Duration::from_secs(1));
}

/// Where one vmplug run's wall time went, from its report: outside the verb
/// (process start, libvirt connection, exit), preflight (the libvirt facts and
/// the agent's handshake, which overlap, then the rules and plan), libvirt's
/// calls, the guest's onlining; and, inside preflight, the facts and the
/// handshake each.
const PHASES: [&str; 8] = [
    "outside the verb",
    "preflight",
    "libvirt calls",
    "guest",
    "of preflight: libvirt facts",
    "of preflight: agent handshake (alongside the host facts)",
    "of guest: last add seen",
    "of guest: last onlined seen",
];

/// The phases in order; the last four are parts of the second and fourth, not
/// added to the wall (the guest's milestones only when the agent sent events).
fn phases(wall_ms: f64, r: &serde_json::Value) -> [f64; 8] {
    let t = &r["timings"];
    let get = |k: &str| t[k].as_f64().unwrap_or(0.0);
    let opt = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
    [
        (wall_ms - get("total_ms")).max(0.0),
        get("preflight_ms"),
        get("libvirt_ms"),
        get("guest_ms"),
        get("facts_ms"),
        get("handshake_ms"),
        opt("guest_added_ms"),
        opt("guest_onlined_ms"),
    ]
}

/// Per (operation, method): each run's [plug call, guest, rest] ms.
type Splits = BTreeMap<(String, String), Vec<[f64; 3]>>;

thread_local! {
    /// Per (operation, method): [plug call, guest until online, the rest] ms.
    static SPLITS: std::cell::RefCell<Splits> = Default::default();
    static PHASE_SAMPLES: std::cell::RefCell<BTreeMap<String, Vec<[f64; 8]>>> = Default::default();
}

fn add_phases(op: &str, wall_ms: f64, r: &serde_json::Value) {
    PHASE_SAMPLES.with(|p| p.borrow_mut().entry(op.to_string()).or_default().push(phases(wall_ms, r)));
    let t = &r["timings"];
    let (plug, guest) = (t["libvirt_ms"].as_f64().unwrap_or(0.0), t["guest_ms"].as_f64().unwrap_or(0.0));
    add_split(op, "vmplug", plug, guest, wall_ms);
}

/// Where one run of a method went: the plug call (libvirt), the guest until
/// online after it, and the rest of the wall time.
fn add_split(op: &str, method: &str, plug_ms: f64, guest_ms: f64, wall_ms: f64) {
    let rest = (wall_ms - plug_ms - guest_ms).max(0.0);
    SPLITS.with(|p| p.borrow_mut().entry((op.into(), method.into())).or_default().push([plug_ms, guest_ms, rest]));
}

/// vmplug's own time in a report: total minus libvirt and guest.
fn own_ms(r: &serde_json::Value) -> f64 {
    let t = &r["timings"];
    let get = |k: &str| t[k].as_f64().unwrap_or(0.0);
    (get("total_ms") - get("libvirt_ms") - get("guest_ms")).max(0.0)
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("vmplug JSON: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The agent's cost over the vmplug memory runs.
#[derive(Default)]
struct AgentCost {
    ticks: u64,
    blocks: u64,
    peak_kib: u64,
}

/// The memory model a row measures.
#[derive(Clone, Copy, PartialEq)]
enum Model {
    Dimm,
    VirtioMem,
}

impl Model {
    /// Its name in `VMPLUG_BENCH_ONLY`.
    fn label(self) -> &'static str {
        match self {
            Model::Dimm => "dimm",
            Model::VirtioMem => "virtio-mem",
        }
    }

    fn op(self, size: u64) -> String {
        let gib = size / 1024 / MIB;
        match self {
            Model::Dimm => format!("memory {gib} GiB"),
            Model::VirtioMem => format!("virtio-mem {gib} GiB"),
        }
    }

    /// vmplug's command for the plug.
    fn vmplug_args(self, name: &str, size: u64) -> Vec<String> {
        let mib = size / MIB;
        let v: Vec<&str> = match self {
            // Movable, as every other method gets under movable_node, so the DIMM
            // can be unplugged for the next run.
            Model::Dimm => vec!["attach-memory", name, "", "--node", "0", "--zone", "movable", "--live", "--json"],
            Model::VirtioMem => vec!["resize-memory", name, "", "--live", "--json"],
        };
        let size = if self == Model::Dimm { format!("{mib}M") } else { format!("+{mib}M") };
        v.into_iter().map(|a| if a.is_empty() { size.clone() } else { a.to_string() }).collect()
    }

    /// The plug as virsh does it, with nothing onlining in between.
    fn plug_raw(self, g: &Guest, size: u64) {
        match self {
            Model::Dimm => attach_dimm_virsh(g, size),
            Model::VirtioMem => virtio_mem_request(g, size),
        }
    }

    /// Takes the plug out again, so the next run starts equal.
    fn unplug(self, g: &mut Guest, blocks_before: u64, size: u64) {
        match self {
            Model::Dimm => remove_last_dimm(g, blocks_before, size),
            Model::VirtioMem => virtio_mem_reset(g, blocks_before),
        }
    }
}

fn bench_memory(g: &mut Guest, s: &mut Samples, own: &mut Vec<f64>, cost: &mut AgentCost, model: Model, size: u64) {
    let op = model.op(size);
    let methods = ["vmplug", "udev rule", "shell loop (guide)", "kernel auto-online"];
    for run in 0..runs() {
        for (i, _) in methods.iter().enumerate() {
            // Rotate the order each run so no method always goes first.
            let method = methods[(i + run) % methods.len()];
            let before = total_blocks(g);
            let want = before + size / BLOCK;
            match method {
                "vmplug" => {
                    g.sh("onliner agent");
                    settle();
                    let (_, _, ticks_before, _) = agent_proc(g);
                    let args = model.vmplug_args(&g.name, size);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let t = Instant::now();
                    let out = g.vmplug_quiet(&args);
                    let el = t.elapsed();
                    let r = json(&out);
                    assert_eq!(r["outcome"], "ok", "{r}");
                    s.add(&op, method, ms(el));
                    add_phases(&op, ms(el), &r);
                    let (_, hwm, ticks_after, _) = agent_proc(g);
                    if model == Model::Dimm {
                        cost.ticks += ticks_after.saturating_sub(ticks_before);
                        cost.blocks += size / BLOCK;
                    }
                    cost.peak_kib = cost.peak_kib.max(hwm);
                    own.push(own_ms(&r));
                }
                "udev rule" | "kernel auto-online" => {
                    g.sh(if method == "udev rule" { "onliner udev" } else { "onliner kernel" });
                    settle();
                    let t = Instant::now();
                    model.plug_raw(g, size);
                    let plugged = ms(t.elapsed());
                    wait_memory_online(g, want);
                    let wall = ms(t.elapsed());
                    s.add(&op, method, wall);
                    add_split(&op, method, plugged, wall - plugged, wall);
                }
                _ => {
                    g.sh("onliner none");
                    let t = Instant::now();
                    model.plug_raw(g, size);
                    let plugged = ms(t.elapsed());
                    // The guide's loop, as a person would run it: again until every
                    // block is there and online (virtio-mem adds at most about 1 GiB
                    // offline, then waits for it to be onlined).
                    g.sh(&format!(
                        "while [ $(ls -d /sys/devices/system/memory/memory* | wc -l) -lt {want} ] || grep -q offline /sys/devices/system/memory/memory*/state; do for i in `grep -l offline /sys/devices/system/memory/memory*/state`; do echo online > $i; done; usleep 2000; done"
                    ));
                    let wall = ms(t.elapsed());
                    s.add(&op, method, wall);
                    add_split(&op, method, plugged, wall - plugged, wall);
                }
            }
            g.sh("onliner none");
            model.unplug(g, before, size);
        }
    }
}

/// `virsh update-memory-device` of the one virtio-mem device to `size`.
fn virtio_mem_request(g: &Guest, size: u64) {
    g.daemon.virsh_ok(&[
        "update-memory-device",
        &g.name,
        "--node",
        "0",
        "--requested-size",
        &format!("{}KiB", size / 1024),
        "--live",
    ]);
}

/// Shrinks the virtio-mem device back to nothing, so the next run starts equal.
fn virtio_mem_reset(g: &mut Guest, blocks_before: u64) {
    virtio_mem_request(g, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while total_blocks(g) > blocks_before {
        assert!(Instant::now() < deadline, "virtio-mem did not unplug");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The kernel's own online write for a CPU, alone: a component of every
/// method (not a method: nothing plugs), shown for reference.
const CPU_WRITE_ALONE: &str = "online write alone, in the guest (component)";

fn bench_cpus(g: &mut Guest, s: &mut Samples, own: &mut Vec<f64>, max: u32) {
    let op = "vCPU";
    let methods = ["vmplug", "udev rule", "shell loop (guide)", CPU_WRITE_ALONE];
    let name = g.name.clone();
    for k in 2..=max {
        let method = methods[(k as usize - 2) % methods.len()];
        let cpu = k - 1;
        match method {
            "vmplug" => {
                g.sh("onliner agent");
                settle();
                let t = Instant::now();
                let out = g.vmplug_quiet(&["setvcpus", &name, &k.to_string(), "--live", "--json"]);
                let el = t.elapsed();
                let r = json(&out);
                assert_eq!(r["outcome"], "ok", "{r}");
                s.add(op, method, ms(el));
                add_phases(op, ms(el), &r);
                own.push(own_ms(&r));
            }
            "udev rule" | "shell loop (guide)" => {
                let udev = method == "udev rule";
                g.sh(if udev { "onliner udev" } else { "onliner none" });
                settle();
                let t = Instant::now();
                g.daemon.virsh_ok(&["setvcpus", &name, &k.to_string(), "--live"]);
                let plugged = ms(t.elapsed());
                if udev {
                    g.sh(&format!("until [ \"$(cat /sys/devices/system/cpu/cpu{cpu}/online 2>/dev/null)\" = 1 ]; do usleep 2000; done"));
                } else {
                    // The guide's loop: every offline CPU onlined, until the new one is.
                    g.sh(&format!("until [ \"$(cat /sys/devices/system/cpu/cpu{cpu}/online 2>/dev/null)\" = 1 ]; do for f in $(grep -l 0 /sys/devices/system/cpu/cpu*/online); do echo 1 > $f; done; usleep 2000; done"));
                }
                let wall = ms(t.elapsed());
                s.add(op, method, wall);
                add_split(op, method, plugged, wall - plugged, wall);
            }
            _ => {
                g.sh("onliner none");
                g.daemon.virsh_ok(&["setvcpus", &name, &k.to_string(), "--live"]);
                g.sh(&format!("until [ -e /sys/devices/system/cpu/cpu{cpu}/online ]; do usleep 2000; done"));
                // busybox date has no %N: /proc/uptime gives 10 ms resolution,
                // enough for a write that takes hundreds of ms under TCG.
                let out = g.sh(&format!(
                    "a=$(cut -d' ' -f1 /proc/uptime); echo 1 > /sys/devices/system/cpu/cpu{cpu}/online; b=$(cut -d' ' -f1 /proc/uptime); echo $a $b"
                ));
                let t: Vec<f64> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                assert_eq!(t.len(), 2, "in-guest timing: {out}");
                s.add(op, method, (t[1] - t[0]) * 1000.0);
            }
        }
    }
}

/// (VmRSS KiB, VmHWM KiB, utime+stime ticks, context switches) of the agent.
fn agent_proc(g: &mut Guest) -> (u64, u64, u64, u64) {
    let out = g.sh(
        "p=$(cat /run/agent.pid); grep -E '^(VmRSS|VmHWM)' /proc/$p/status | tr -s ' ' | cut -d' ' -f2 | tr '\\n' ' '; \
         cut -d' ' -f14,15 /proc/$p/stat | tr '\\n' ' '; \
         cat /proc/$p/task/*/status | grep ctxt_switches | tr -s '\\t ' ' ' | cut -d' ' -f2 | paste -sd+ | bc 2>/dev/null || \
         (t=0; for n in $(cat /proc/$p/task/*/status | grep ctxt_switches | tr -s '\\t ' ' ' | cut -d' ' -f2); do t=$((t+n)); done; echo $t)",
    );
    let v: Vec<u64> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(v.len() >= 5, "agent /proc figures: {out}");
    (v[0], v[1], v[2] + v[3], v[4])
}

fn svg(samples: &Samples) -> String {
    let rows: Vec<_> = samples.0.iter().map(|((op, m), v)| (format!("{op}: {m}"), stats(v))).collect();
    let max = rows.iter().map(|(_, (_, _, hi))| *hi).fold(1.0, f64::max);
    let (w, left, bar_h) = (900.0, 300.0, 22.0);
    let h = 40.0 + rows.len() as f64 * (bar_h + 8.0);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n"
    );
    let _ = writeln!(s, "<text x='10' y='20' font-size='14'>Hot-plug to confirmed online, median with min–max (ms, lower is better)</text>");
    let scale = (w - left - 80.0) / max;
    for (i, (label, (med, lo, hi))) in rows.iter().enumerate() {
        let y = 35.0 + i as f64 * (bar_h + 8.0);
        let color = if label.contains("vmplug") {
            "#2a7ab0"
        } else if label.contains("floor") || label.contains("kernel") {
            "#999"
        } else {
            "#d08a2a"
        };
        let _ = writeln!(s, "<text x='{}' y='{}' text-anchor='end'>{label}</text>", left - 8.0, y + 15.0);
        let _ = writeln!(s, "<rect x='{left}' y='{y}' width='{:.1}' height='{bar_h}' fill='{color}'/>", med * scale);
        let _ = writeln!(
            s,
            "<line x1='{:.1}' x2='{:.1}' y1='{:.1}' y2='{:.1}' stroke='black'/>",
            left + lo * scale,
            left + hi * scale,
            y + bar_h / 2.0,
            y + bar_h / 2.0
        );
        let _ = writeln!(s, "<text x='{:.1}' y='{}'>{med:.0}</text>", left + hi * scale + 6.0, y + 15.0);
    }
    s.push_str("</svg>\n");
    s
}

/// `vmplug-bench report FILE`: the latency table, in markdown, from the raw
/// samples a run wrote (`results/bench.json`), nothing measured.
fn report(path: &str) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let raw: BTreeMap<String, Vec<f64>> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    print!("{}", latency_table(&raw, &[CPU_WRITE_ALONE]));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, verb, path] = args.as_slice() {
        if verb == "report" {
            report(path);
            return;
        }
    }
    let env = Env::get();
    let started = Instant::now();
    eprintln!("vmplug bench: {} runs per method, methods interleaved", runs());
    if std::env::var("VMPLUG_BENCH_ONLY").is_ok_and(|v| v == "concurrent") {
        println!("{}", concurrent_table(&bench_concurrent()));
        return;
    }
    if std::env::var("VMPLUG_BENCH_ONLY").is_ok_and(|v| v == "grow48") {
        println!("{}", grow48_table(&bench_grow_48()));
        return;
    }
    let spec = GuestSpec {
        vcpus: 1,
        // One plug per vCPU: every CPU method gets `runs()` of them.
        max_vcpus: 1 + cpu_plugs(),
        cells_mib: vec![1024],
        // 1 GiB boot + a 4 GiB DIMM + the 4 GiB virtio-mem region.
        max_memory_mib: 10240,
        slots: 4,
        cmdline_extra: "movable_node".into(),
        virtio_mem: vec![(0, 4096)],
        ..GuestSpec::default()
    };
    let mut g = Guest::boot("bench", spec);
    let mut samples = Samples::default();
    let mut own = Vec::new();

    g.sh("onliner agent");
    settle();
    std::thread::sleep(Duration::from_secs(2));
    let (rss_idle, _, _, cs0) = agent_proc(&mut g);
    std::thread::sleep(Duration::from_secs(30));
    let (_, _, _, cs1) = agent_proc(&mut g);
    let idle_wakeups_per_min = (cs1.saturating_sub(cs0)) as f64 * 2.0;

    let mut cost = AgentCost::default();
    // `VMPLUG_BENCH_ONLY=dimm|virtio-mem`: one model's latency table, printed
    // only (a quick look while working; `make bench` runs everything).
    let only = std::env::var("VMPLUG_BENCH_ONLY").ok();
    for model in [Model::Dimm, Model::VirtioMem] {
        if only.as_deref().is_some_and(|o| o != model.label()) {
            continue;
        }
        for size in [1024 * MIB, 4096 * MIB] {
            bench_memory(&mut g, &mut samples, &mut own, &mut cost, model, size);
        }
    }
    if only.is_some() {
        let raw: BTreeMap<String, Vec<f64>> =
            samples.0.iter().map(|((op, m), v)| (format!("{op} / {m}"), v.clone())).collect();
        print!("{}", latency_table(&raw, &[CPU_WRITE_ALONE]));
        return;
    }
    let hwm = cost.peak_kib;
    let cpu_ms_per_block = cost.ticks as f64 * 10.0 / cost.blocks.max(1) as f64;
    bench_cpus(&mut g, &mut samples, &mut own, 1 + cpu_plugs());
    drop(g);
    let staged: Vec<Staged> = [16, 32, 64]
        .into_iter()
        .filter(|gib| std::env::var("VMPLUG_BENCH_STAGED").map_or(true, |only| only == gib.to_string()))
        .map(|gib| {
            eprintln!("  staged growth: {gib} GiB into a 4 GiB guest with about 1 GiB available");
            bench_staged(gib)
        })
        .collect();
    let only_staged = std::env::var("VMPLUG_BENCH_STAGED").is_ok();
    let grow48 = if only_staged { None } else { Some(bench_grow_48()) };
    let concurrent = if only_staged { None } else { Some(bench_concurrent()) };

    let bin_size = std::fs::metadata(&env.guest_agent).map(|m| m.len()).unwrap_or(0);
    // The floor is the fastest method measured for the operation in this run
    // (the CPU write alone is a component, not a method).
    let floor_of = |op: &str| -> Option<(f64, String)> {
        samples
            .0
            .iter()
            .filter(|((o, m), _)| o == op && m != CPU_WRITE_ALONE)
            .map(|((_, m), v)| (stats(v).0, m.clone()))
            .min_by(|a, b| a.0.total_cmp(&b.0))
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| operation | method | median ms | min ms | max ms | × fastest |\n| --- | --- | ---: | ---: | ---: | ---: |"
    );
    for ((op, m), v) in &samples.0 {
        let (med, lo, hi) = stats(v);
        let ratio = match floor_of(op) {
            Some((_, fastest)) if *m == fastest => "**1.00** (fastest)".to_string(),
            Some((f, _)) => format!("{:.2}", med / f),
            None => String::new(),
        };
        let _ = writeln!(md, "| {op} | {m} | {med:.1} | {lo:.1} | {hi:.1} | {ratio} |");
    }
    let _ = writeln!(
        md,
        "\n| vmplug's wall time by phase, median ms | {} | wall |\n| --- |{}",
        PHASES.join(" | "),
        " ---: |".repeat(PHASES.len() + 1)
    );
    PHASE_SAMPLES.with(|p| {
        for (op, runs) in p.borrow().iter() {
            let cols: Vec<String> = (0..PHASES.len())
                .map(|i| {
                    let v: Vec<f64> = runs.iter().map(|r| r[i]).filter(|x| !x.is_nan()).collect();
                    if v.is_empty() {
                        "–".to_string()
                    } else {
                        format!("{:.0}", stats(&v).0)
                    }
                })
                .collect();
            let wall = stats(&runs.iter().map(|r| r[..4].iter().sum::<f64>()).collect::<Vec<_>>()).0;
            let _ = writeln!(md, "| {op} | {} | {wall:.0} |", cols.join(" | "));
        }
    });
    let _ = writeln!(
        md,
        "\n| where each method's time went, median ms | plug call (libvirt) | guest, until online | the rest (process, facts, handshake, plan; console round trip for the others) | wall |\n| --- | --- | ---: | ---: | ---: | ---: |"
    );
    SPLITS.with(|p| {
        for ((op, m), runs) in p.borrow().iter() {
            let col = |i: usize| stats(&runs.iter().map(|r| r[i]).collect::<Vec<_>>()).0;
            let wall = stats(&runs.iter().map(|r| r.iter().sum::<f64>()).collect::<Vec<_>>()).0;
            let _ = writeln!(md, "| {op} | {m} | {:.0} | {:.0} | {:.0} | {wall:.0} |", col(0), col(1), col(2));
        }
    });
    let _ = writeln!(
        md,
        "\n| staged growth into a 4 GiB guest | available before | waves | blocks onlined | MemTotal grew | total ms | guest ms | QEMU RSS grew | OOM |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for s in &staged {
        let _ = writeln!(
            md,
            "| attach-memory {} GiB | {} MiB | {} | {} | {:.2} GiB | {:.0} | {:.0} | {:.0} MiB | {} |",
            s.gib,
            s.available_mib,
            s.waves,
            s.blocks,
            s.mem_total_delta_gib,
            s.total_ms,
            s.guest_ms,
            s.qemu_rss_delta_mib,
            if s.oom { "yes" } else { "none" }
        );
    }
    if let Some(r) = &grow48 {
        md.push_str(&grow48_table(r));
    }
    if let Some(c) = &concurrent {
        md.push_str(&concurrent_table(c));
    }
    let (own_med, own_lo, own_hi) = if own.is_empty() { (0.0, 0.0, 0.0) } else { stats(&own) };
    let _ = writeln!(md, "\n| agent / host figure | value |\n| --- | ---: |");
    let _ = writeln!(md, "| vmplug-guest static binary | {:.2} MiB |", bin_size as f64 / MIB as f64);
    let _ = writeln!(md, "| agent RSS idle | {:.2} MiB |", rss_idle as f64 / 1024.0);
    let _ = writeln!(md, "| agent peak RSS (VmHWM) while onlining | {:.2} MiB |", hwm as f64 / 1024.0);
    let _ = writeln!(md, "| agent CPU time per onlined block (10 ms ticks, averaged) | {cpu_ms_per_block:.2} ms |");
    let _ = writeln!(md, "| agent wake-ups per idle minute (context switches) | {idle_wakeups_per_min:.0} |");
    let _ = writeln!(md, "| vmplug's own time per operation (excl. libvirt and guest), median [min–max] | {own_med:.0} ms [{own_lo:.0}–{own_hi:.0}] |");
    let _ = writeln!(
        md,
        "\n{} runs per method and memory size, methods rotated run by run, one TCG guest (Debian 6.1, `movable_node`), {}; total {:.0} s.",
        runs(),
        chrono_like_now(),
        started.elapsed().as_secs_f64()
    );
    println!("{md}");
    let dir = env.repo.join("results");
    std::fs::create_dir_all(&dir).expect("results dir");
    std::fs::write(dir.join("bench.md"), &md).expect("write md");
    std::fs::write(dir.join("bench.svg"), svg(&samples)).expect("write svg");
    let raw: BTreeMap<String, &Vec<f64>> = samples.0.iter().map(|((o, m), v)| (format!("{o} / {m}"), v)).collect();
    std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(&raw).expect("json")).expect("write json");
    // Every raw sample behind every table above, with the command and machine.
    let all = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine(),
        "date": chrono_like_now(),
        "runs_per_method": runs(),
        "latency_ms": raw,
        "phases": {
            "columns": PHASES,
            "runs_ms": PHASE_SAMPLES.with(|p| p.borrow().clone()),
        },
        "split": {
            "columns": ["plug call (libvirt)", "guest, until online", "the rest"],
            "runs_ms": SPLITS.with(|p| p.borrow().iter().map(|((o, m), v)| (format!("{o} / {m}"), v.clone())).collect::<BTreeMap<_, _>>()),
        },
        "staged": staged,
        "grow_1_to_48_gib": grow48,
        "autoscale": concurrent,
        "footprint": {
            "guest_agent_bytes": bin_size,
            "agent_rss_idle_kib": rss_idle,
            "agent_peak_rss_kib": hwm,
            "agent_cpu_ms_per_block": cpu_ms_per_block,
            "agent_wakeups_per_idle_minute": idle_wakeups_per_min,
            "vmplug_own_ms": own,
        },
    });
    std::fs::write(dir.join("bench-raw.json"), serde_json::to_string_pretty(&all).expect("json")).expect("write raw");
    eprintln!("results written to {}", dir.display());
}

/// What the bench ran on: the kernel, CPUs and their model.
fn machine() -> serde_json::Value {
    let uname = std::process::Command::new("uname").arg("-srvm").output().ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1));
    serde_json::json!({
        "uname": uname.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model.map(str::trim),
    })
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One row of staged growth: `gib` GiB into a fresh 4 GiB guest whose memory
/// is mostly in use (1 GiB left available, as the performance issue has it).
#[derive(serde::Serialize)]
struct Staged {
    gib: u64,
    available_mib: u64,
    waves: usize,
    total_ms: f64,
    guest_ms: f64,
    blocks: usize,
    mem_total_delta_gib: f64,
    qemu_rss_delta_mib: f64,
    oom: bool,
}

fn bench_staged(gib: u64) -> Staged {
    let spec = GuestSpec {
        vcpus: 1,
        max_vcpus: 2,
        cells_mib: vec![4096],
        max_memory_mib: (4 + gib) * 1024,
        slots: 32,
        ..GuestSpec::default()
    };
    let mut g = Guest::boot("benchstaged", spec);
    let name = g.name.clone();
    // Fill the guest's memory (tmpfs cannot be reclaimed) until about 1 GiB is left.
    g.sh("mkdir -p /fill && mount -t tmpfs -o size=4g tmpfs /fill");
    let avail = |g: &mut Guest| -> u64 {
        g.sh("grep MemAvailable /proc/meminfo").split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let fill = (avail(&mut g) / 1024).saturating_sub(1024);
    g.sh(&format!("dd if=/dev/zero of=/fill/hog bs=1M count={fill} 2>/dev/null; sync"));
    let available_mib = avail(&mut g) / 1024;
    let before = g.mem_total_kib();
    let rss0 = rss_kib(g.qemu_pid());
    let t = Instant::now();
    let out = g.vmplug_quiet(&["attach-memory", &name, &format!("{gib}G"), "--max-dimm", "4G", "--json"]);
    let total_ms = ms(t.elapsed());
    let r = json(&out);
    assert_eq!(r["outcome"], "ok", "staged {gib} GiB: {r}");
    let rss1 = rss_kib(g.qemu_pid());
    let applied = r["applied"].as_array().cloned().unwrap_or_default();
    let oom = g.sh("dmesg | grep -c -i -E 'out of memory|oom-kill' || true").trim() != "0";
    Staged {
        gib,
        available_mib,
        waves: applied.iter().filter(|a| a.as_str().is_some_and(|s| s.starts_with("wave "))).count().max(1),
        total_ms,
        guest_ms: r["timings"]["guest_ms"].as_f64().unwrap_or(0.0),
        blocks: r["guest"]["blocks"].as_array().map_or(0, Vec::len),
        mem_total_delta_gib: (g.mem_total_kib() - before) as f64 / (1024.0 * 1024.0),
        qemu_rss_delta_mib: (rss1 as f64 - rss0 as f64) / 1024.0,
        oom,
    }
}

/// 1 → 48 GiB through virtio-mem, staged as the guide's 1:32 rule demands: a
/// 1 GiB guest (about 0.8 GiB available) cannot hold the page structures of
/// 47 GiB of movable memory (1/64 of it, 752 MiB), so a first stage of 1 GiB is
/// onlined in the kernel's zone (where later page structures can go), then
/// the rest movable. Neon's autoscaler (KVM, its own report) takes about 1 s.
#[derive(serde::Serialize)]
struct Grow48 {
    available_mib: u64,
    /// Stage 1 (+1 GiB, kernel zone) and stage 2 (to 48 GiB, movable), wall ms.
    stage_ms: [f64; 2],
    total_ms: f64,
    mem_total_gib: f64,
    blocks_online: u64,
    current_lags: bool,
    qemu_rss_delta_mib: f64,
    oom: bool,
}

fn bench_grow_48() -> Grow48 {
    let spec = GuestSpec {
        vcpus: 1,
        max_vcpus: 2,
        cells_mib: vec![1024],
        max_memory_mib: 48 * 1024,
        slots: 1,
        virtio_mem: vec![(0, 47 * 1024)],
        ..GuestSpec::default()
    };
    let mut g = Guest::boot("bench48", spec);
    let name = g.name.clone();
    let available_mib: u64 = g
        .sh("grep MemAvailable /proc/meminfo")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024;
    let rss0 = rss_kib(g.qemu_pid());
    let mut stage_ms = [0.0; 2];
    let mut last = serde_json::Value::Null;
    for (i, args) in [["+1G", "--zone", "kernel"], ["48G", "--zone", "movable"]].iter().enumerate() {
        let t = Instant::now();
        let out = g.vmplug_quiet(&["resize-memory", &name, args[0], args[1], args[2], "--timeout", "900", "--json"]);
        stage_ms[i] = ms(t.elapsed());
        last = json(&out);
        assert_eq!(last["outcome"], "ok", "1 → 48 GiB, stage {}: {last}", i + 1);
    }
    let d = &last["virtio_mem"][0];
    let oom = g.sh("dmesg | grep -c -i -E 'out of memory|oom-kill|page allocation failure' || true").trim() != "0";
    Grow48 {
        available_mib,
        stage_ms,
        total_ms: stage_ms[0] + stage_ms[1],
        mem_total_gib: g.mem_total_kib() as f64 / (1024.0 * 1024.0),
        blocks_online: d["blocks_online"].as_u64().unwrap_or(0),
        current_lags: d["current_lags"] == true,
        qemu_rss_delta_mib: (rss_kib(g.qemu_pid()) as f64 - rss0 as f64) / 1024.0,
        oom,
    }
}

fn grow48_table(r: &Grow48) -> String {
    format!(
        "\n| virtio-mem 1 → 48 GiB, staged (1:32) | available before | stage 1: +1 GiB kernel zone ms | stage 2: to 48 GiB movable ms | total ms | MemTotal after | blocks online | libvirt's current lagged | QEMU RSS grew | OOM | Neon's autoscaler (its report, KVM) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |\n\
         | one TCG guest | {} MiB | {:.0} | {:.0} | {:.0} | {:.2} GiB | {} | {} | {:.0} MiB | {} | about 1000 ms |\n",
        r.available_mib,
        r.stage_ms[0],
        r.stage_ms[1],
        r.total_ms,
        r.mem_total_gib,
        r.blocks_online,
        if r.current_lags { "yes" } else { "no" },
        r.qemu_rss_delta_mib,
        if r.oom { "yes" } else { "none" },
    )
}

fn chrono_like_now() -> String {
    let out = std::process::Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

/// One autoscale process, four guests (the most this machine runs), each under
/// its own libvirtd: per-guest latency of an alert-driven grow alone and with all
/// four at once, so serialisation shows as a ratio.
#[derive(serde::Serialize)]
struct Concurrent {
    /// The action's duration per the event (`duration_ms`), one guest alone.
    single: Vec<f64>,
    /// From the POST to the last event, one guest alone.
    single_wall: Vec<f64>,
    /// Each guest's action duration when two alerts arrive in one delivery.
    two: Vec<f64>,
    two_wall: Vec<f64>,
    /// Each guest's action duration when four alerts arrive in one delivery.
    four: Vec<f64>,
    /// From the POST to the fourth event.
    four_wall: Vec<f64>,
}

fn concurrent_table(c: &Concurrent) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n| one autoscale, Alertmanager alerts → +256 MiB verified | per-guest action ms, median | min | max | alert → last event ms, median | × one guest |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    );
    let (one, _, _) = stats(&c.single);
    for (label, v, wall) in [
        ("1 guest", &c.single, &c.single_wall),
        ("2 guests at once", &c.two, &c.two_wall),
        ("4 guests at once", &c.four, &c.four_wall),
    ] {
        let (med, lo, hi) = stats(v);
        let _ = writeln!(md, "| {label} | {med:.0} | {lo:.0} | {hi:.0} | {:.0} | {:.2} |", stats(wall).0, med / one);
    }
    md
}

fn bench_concurrent() -> Concurrent {
    use std::io::BufRead;
    use vmplug_e2e::procs::{free_port, http, Procs};
    // The most this machine runs (2 cores, 24 GiB): four small TCG guests.
    vmplug_e2e::guest::allow_guests(4);
    let guests: Vec<Guest> =
        (0..4).map(|_| Guest::boot("benchconc", GuestSpec { slots: 16, ..GuestSpec::default() })).collect();
    let hook = free_port();
    let quote = |v: Vec<String>| v.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
    let policy = format!(
        "uris = [{}]\nwebhook_listen = '127.0.0.1:{hook}'\n[select]\nnames = [{}]\n\
         [timing]\ninterval_s = 3600\nsustain = 1\ncooldown_s = 0\n[cpu]\npsi_some_avg10 = 100.0\n\
         [memory]\nstep = '256M'\nmax = '8G'\navailable_below = '1M'\npsi_some_avg10 = 100.0\npsi_full_avg10 = 100.0\n\
         [host]\nconcurrency = 4\n",
        quote(guests.iter().map(|g| g.daemon.uri.clone()).collect()),
        quote(guests.iter().map(|g| g.name.clone()).collect()),
    );
    let path = guests[0].dir.join("concurrent.toml");
    std::fs::write(&path, policy).expect("policy");
    let mut child = std::process::Command::new(&Env::get().vmplug)
        .args(["autoscale", "--policy", &path.to_string_lossy()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("autoscale");
    let stdout = child.stdout.take().expect("stdout");
    let _procs = Procs(vec![child]);
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    // The first sampling round (one event per guest), then only alerts act.
    for _ in 0..guests.len() {
        rx.recv_timeout(Duration::from_secs(60)).expect("autoscale's first round");
    }
    let alert = |names: &[&Guest]| -> (Vec<f64>, f64) {
        let alerts: Vec<String> = names
            .iter()
            .map(|g| format!(r#"{{"status":"firing","labels":{{"alertname":"Bench","domain":"{}"}}}}"#, g.name))
            .collect();
        let t = Instant::now();
        let (code, body) =
            http(hook, "POST", "/alerts", &format!(r#"{{"version":"4","alerts":[{}]}}"#, alerts.join(",")))
                .expect("webhook answers");
        // Alertmanager's webhook version 4; the answer says what became of each alert.
        assert_eq!(code, 200, "{body}");
        let mut took = Vec::new();
        while took.len() < names.len() {
            let ev = rx.recv_timeout(Duration::from_secs(120)).expect("an alert's event");
            if ev["rule"] != "alert.memory" {
                continue;
            }
            assert_eq!(ev["outcome"], "ok", "{ev}");
            took.push(ev["duration_ms"].as_f64().unwrap_or(0.0));
        }
        (took, ms(t.elapsed()))
    };
    let mut c = Concurrent {
        single: vec![],
        single_wall: vec![],
        two: vec![],
        two_wall: vec![],
        four: vec![],
        four_wall: vec![],
    };
    let all: Vec<&Guest> = guests.iter().collect();
    for run in 0..runs() {
        eprintln!("  concurrency run {run}: one guest, two at once, then four at once");
        let (one, wall) = alert(&all[run % all.len()..][..1]);
        c.single.extend(one);
        c.single_wall.push(wall);
        let (two, wall) = alert(&all[(run % 3)..][..2]);
        c.two.extend(two);
        c.two_wall.push(wall);
        let (four, wall) = alert(&all);
        c.four.extend(four);
        c.four_wall.push(wall);
    }
    c
}
