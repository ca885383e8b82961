//! `vmplug verify-image`: boot an image builder's own disk image (through an
//! overlay, so it is never written) under a private libvirtd, with a
//! definition `prepare` made hot-plug-ready, and run the hot-plug matrix
//! against it with vmplug's own verbs: vCPU plug, a DIMM on each guest NUMA
//! cell, a misaligned size, DIMM unplug, virtio-mem grow and shrink, and the
//! agent killed mid-plug. Each case ends pass, fail or skip with the reason and
//! what the guest showed.
//!
//! The guest is reached through its vmplug-guest agent (virtio-serial) and,
//! when the image gives one, a shell on the serial console, used only to read
//! sysfs and dmesg and to kill the agent. Without an agent the plugs run
//! `--no-wait` and the console shows whether the image's own rules onlined
//! them; what only the agent can prove is skipped, and says so.

pub mod domain;
pub mod image;
pub mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmplug_common::protocol::{GuestInfo, ZonePolicy};
use vmplug_common::{text, Bytes, CpuSet, MIB};

use crate::domain::{Affect, Connection, DomainError};
use crate::harness::console::Console;
use crate::harness::libvirtd::{reap_stale, Libvirtd};
use crate::harness::workdir;
use crate::harness::HarnessError;
use crate::ops::{self, HotplugOpts, MemoryOpts};
use crate::preflight::{RuleId, Severity};
use crate::report::{OpReport, Outcome};
use crate::unplug::DimmSelector;
use crate::verb::{self, Verb};
use crate::vmem::{ResizeOpts, SizeChange};
use crate::vmem_add::AddVirtioMem;
use crate::wait::Wait;
use domain::{Accel, AccelChoice, Arch, DirectBoot};
use report::{Case, GuestView, Summary, Verdict, VerifyReport};

/// The agent's virtio-serial channel name, as the guest package expects it.
pub const AGENT_CHANNEL: &str = "org.vmplug.guest.0";
/// The virtio-mem region the matrix grows into and shrinks out of.
const VIRTIO_MEM_REGION: Bytes = Bytes(1024 * MIB);
/// How much the virtio-mem cases move.
const VIRTIO_MEM_STEP: Bytes = Bytes(256 * MIB);
/// Room above boot memory for the DIMMs of the matrix.
const DIMM_ROOM: Bytes = Bytes(4096 * MIB);
/// Each case's guest phase may take this long (TCG onlines slowly).
const CASE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after a console shell answers an agent may still appear.
const AGENT_GRACE: Duration = Duration::from_secs(20);
/// One console command.
const SHELL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct VerifyOpts {
    pub image: PathBuf,
    pub arch: Arch,
    pub boot: DirectBoot,
    pub machine: Option<String>,
    /// Boot memory, split over the cells.
    pub memory: Bytes,
    pub cells: u32,
    pub max_vcpus: u32,
    pub accel: AccelChoice,
    /// How long the guest may take to answer (agent or console) after start.
    pub boot_timeout: Duration,
    /// The base under which each run makes a fresh private directory; it must
    /// be this user's alone (see [`workdir::private_base`]).
    pub work_dir: PathBuf,
    /// The image's format as the operator states it; judged from the file's
    /// own header when absent.
    pub format: Option<image::DiskFormat>,
    /// Leave the work directory (logs, overlay, definition) behind.
    pub keep: bool,
}

/// The run's own directory. When the run ends — normally, by an error, or by
/// a signal that drops the run — whatever still runs there (the guest, the
/// daemons) is stopped through the directory's own records, and the directory
/// is removed unless kept.
#[derive(Debug)]
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        crate::harness::libvirtd::stop_dir(&self.path);
        if self.keep {
            eprintln!("vmplug: verify-image left its work directory: {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn harness(e: DomainError) -> HarnessError {
    HarnessError(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HarnessError> + Send + 'static,
) -> Result<T, HarnessError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| HarnessError(format!("worker failed: {e}")))?
}

/// Runs the whole matrix; `Err` only when the guest could not be set up at all
/// (the image unreadable, libvirtd not starting, a definition refused).
pub async fn verify_image(o: &VerifyOpts) -> Result<VerifyReport, HarnessError> {
    let started = Instant::now();
    // Only to fail early, before any directory is made: the image is opened
    // (once, for good) by image::take.
    if let Err(e) = std::fs::symlink_metadata(&o.image) {
        return Err(HarnessError(format!("{}: {e}", o.image.display())));
    }
    for (what, p) in [("--kernel", &o.boot.kernel), ("--initrd", &o.boot.initrd)] {
        if let Some(p) = p.as_ref().filter(|p| !p.is_file()) {
            return Err(HarnessError(format!("{what} {}: no such file", p.display())));
        }
    }
    if o.boot.kernel.is_none() && (o.boot.initrd.is_some() || o.boot.append.is_some()) {
        return Err(HarnessError::new("--initrd and --append need --kernel"));
    }
    if o.cells == 0 || o.max_vcpus < 2 || !o.max_vcpus.is_multiple_of(o.cells) {
        return Err(HarnessError(format!(
            "--cells {} --max-vcpus {}: the vCPUs must split evenly over at least one cell, with room for one more vCPU",
            o.cells, o.max_vcpus
        )));
    }
    let accel = domain::pick_accel(o.accel, o.arch).map_err(HarnessError)?;
    let base = workdir::private_base(&o.work_dir)?;
    reap_stale(&base);
    let dir = workdir::fresh_dir(&base, "run")?;
    let work = WorkDir { path: dir.clone(), keep: o.keep };
    let (img, fmt, disk) = (o.image.clone(), o.format, dir.join("disk"));
    let image = blocking(move || image::take(&img, fmt, &disk)).await?;
    // QEMU runs as the distribution's unprivileged user and libvirt relabels
    // what it boots: both get private copies, never the operator's files.
    let copy = |from: &Option<PathBuf>, name: &str| -> Result<Option<PathBuf>, HarnessError> {
        from.as_ref()
            .map(|f| {
                let to = dir.join(name);
                std::fs::copy(f, &to).map_err(|e| HarnessError(format!("copying {}: {e}", f.display())))?;
                Ok(to)
            })
            .transpose()
    };
    let boot = domain::DirectBoot {
        kernel: copy(&o.boot.kernel, "vmlinuz")?,
        initrd: copy(&o.boot.initrd, "initrd.img")?,
        append: o.boot.append.clone(),
    };
    let cache = base.join("libvirt-cache");
    let (d, c) = (dir.clone(), cache.clone());
    let daemon = blocking(move || Libvirtd::start(&d, &c)).await?;
    let uri = daemon.uri.clone();
    let conn: Arc<dyn Connection> =
        Arc::new(blocking(move || crate::libvirt::LibvirtConnection::open(Some(&uri)).map_err(harness)).await?);
    let name = format!("vmplug-verify-{}", std::process::id());
    let machine = pick_machine(conn.as_ref(), o)?;
    let mut s = Session {
        conn,
        name,
        daemon,
        console: None,
        agent: None,
        vcpus: 1,
        block_size: None,
        cases: vec![],
        dimms: vec![],
        virtio_mem: Ok(()),
        disk_format: image.format.clone(),
        boot,
        _work: work,
    };
    s.define(o, &accel, &machine).await?;
    let view = s.boot(o.boot_timeout).await?;
    s.run_matrix(o).await;
    let _ = s.daemon.virsh(&["destroy", &s.name]);
    let mut r = VerifyReport {
        image,
        arch: o.arch.name(),
        machine,
        accel,
        guest: view,
        cases: std::mem::take(&mut s.cases),
        summary: Summary::default(),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    r.summarise();
    Ok(r)
}

/// The machine type: the operator's, else q35 on x86 and the newest versioned
/// `virt` this host's QEMU offers on aarch64 (never a hard-coded version).
fn pick_machine(conn: &dyn Connection, o: &VerifyOpts) -> Result<String, HarnessError> {
    if let Some(m) = &o.machine {
        return Ok(m.clone());
    }
    domain::default_machine(o.arch, || conn.capabilities().map_err(harness))?.ok_or_else(|| {
        HarnessError::new("this host's libvirt offers no versioned aarch64 'virt' machine (install qemu-system-arm)")
    })
}

/// A kernel option each guest-side refusal points at.
pub fn kernel_option(rule: &str) -> Option<&'static str> {
    match RuleId::from_id(rule)? {
        RuleId::MemGuestAcpi => Some("CONFIG_ACPI_HOTPLUG_MEMORY"),
        RuleId::MemGuestKernel => Some("CONFIG_MEMORY_HOTPLUG"),
        RuleId::CpuGuestAcpi => Some("CONFIG_ACPI_HOTPLUG_CPU"),
        RuleId::VmemGuestDriver => Some("CONFIG_VIRTIO_MEM"),
        RuleId::CpuGuestPossible => Some("CONFIG_NR_CPUS (or the possible_cpus= / nr_cpus= boot parameters)"),
        _ => None,
    }
}

/// A preflight rule about the guest kernel's own abilities.
pub fn guest_rule(rule: &str) -> bool {
    rule.contains(".guest-")
}

/// What a verb's report says about the image. A refusal is the image's fault
/// only when a rule about the guest kernel refused it; any other refusal is
/// about this host or this definition, so the case could not be tried.
pub fn judge(r: &OpReport) -> (Verdict, String, Option<&'static str>) {
    let errors: Vec<_> = r.findings.iter().filter(|f| f.severity == Severity::Error).collect();
    match r.outcome {
        Outcome::Ok => (Verdict::Pass, r.message.clone(), None),
        // Fail only when every error is about the guest kernel: a host-side
        // error alongside (this QEMU cannot hot-plug aarch64 vCPUs, so the
        // guest also sees none possible) means the image was never tested.
        Outcome::Refused if !errors.is_empty() && errors.iter().all(|f| guest_rule(f.id)) => {
            let why: Vec<String> = errors.iter().map(|f| format!("[{}] {}", f.id, f.message)).collect();
            (Verdict::Fail, format!("refused by {}", why.join("; ")), errors.iter().find_map(|f| kernel_option(f.id)))
        }
        Outcome::Refused => {
            let why: Vec<String> = errors.iter().map(|f| format!("[{}] {}", f.id, f.message)).collect();
            (Verdict::Skip, format!("not tried, refused for a reason outside the image: {}", why.join("; ")), None)
        }
        Outcome::LibvirtError | Outcome::Error | Outcome::Usage => {
            (Verdict::Skip, format!("not tried: {}", r.message), None)
        }
        Outcome::GuestTimeout | Outcome::GuestFailed | Outcome::Partial | Outcome::AgentUnreachable => {
            (Verdict::Fail, format!("{}: {}", r.outcome.word(), r.message), None)
        }
    }
}

/// What the report's guest part shows, in a line or two.
fn op_evidence(r: &OpReport) -> Vec<String> {
    let mut ev: Vec<String> = r.host.applied.iter().map(|a| format!("host: {a}")).collect();
    if let Some(g) = &r.guest {
        let failed: Vec<String> = g
            .blocks
            .iter()
            .filter(|b| {
                matches!(
                    b.outcome,
                    vmplug_common::protocol::ItemOutcome::Failed { .. }
                        | vmplug_common::protocol::ItemOutcome::NotFound
                )
            })
            .map(|b| format!("memory{} {}", b.index, crate::report::outcome_text(&b.outcome, false)))
            .collect();
        let zones: std::collections::BTreeMap<&str, u32> =
            g.blocks.iter().filter_map(|b| b.zone.as_deref()).fold(Default::default(), |mut m, z| {
                *m.entry(z).or_default() += 1;
                m
            });
        let zones: Vec<String> = zones.iter().map(|(z, n)| format!("{n} {z}")).collect();
        ev.push(format!(
            "agent: {} CPU(s) online ({}), {} memory online; {} block(s) reported{}{}",
            g.cpus_online.len(),
            g.cpus_online,
            g.memory_online,
            g.blocks.len(),
            if zones.is_empty() { String::new() } else { format!(" ({})", zones.join(", ")) },
            if failed.is_empty() { String::new() } else { format!("; failed: {}", failed.join(", ")) }
        ));
    }
    for d in &r.virtio_mem {
        ev.push(format!(
            "device {}: requested {}, holds {}, {} block(s) online",
            d.device, d.requested, d.current, d.blocks_online
        ));
    }
    // Warnings about the guest matter here; the rest (a --live change is not
    // persistent, the guide's 4 GiB advice) are about the throwaway definition.
    ev.extend(
        r.findings
            .iter()
            .filter(|f| f.severity == Severity::Warning && (f.id.contains(".guest") || f.id.starts_with("agent.")))
            .map(|f| format!("warning [{}] {}", f.id, f.message)),
    );
    ev
}

struct Session {
    conn: Arc<dyn Connection>,
    name: String,
    daemon: Libvirtd,
    console: Option<Console>,
    /// The agent's facts at boot; `None`: no agent answered.
    agent: Option<GuestInfo>,
    vcpus: u32,
    block_size: Option<u64>,
    cases: Vec<Case>,
    /// Request ids of the DIMMs plugged so far.
    dimms: Vec<String>,
    /// Why the virtio-mem device could not be added, if it could not.
    virtio_mem: Result<(), String>,
    /// The format of the private copy of the image the guest boots.
    disk_format: String,
    /// The kernel and initrd (private copies) and the command line.
    boot: DirectBoot,
    _work: WorkDir,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("name", &self.name).finish_non_exhaustive()
    }
}

/// The verbs' options: `no_wait` is for a guest with no agent, whose handshake
/// is not waited for again (boot already found none).
fn hotplug(no_wait: bool, zone: ZonePolicy) -> HotplugOpts {
    HotplugOpts {
        affect: Affect::Live,
        timeout: CASE_TIMEOUT,
        agent_wait: if no_wait { Duration::from_secs(1) } else { Duration::from_secs(30) },
        no_wait,
        force: false,
        agent: None,
        zone,
    }
}

fn case(id: &str, verdict: Verdict, reason: impl Into<String>, started: Instant) -> Case {
    Case {
        id: id.into(),
        verdict,
        reason: reason.into(),
        kernel_option: None,
        evidence: vec![],
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

/// The dmesg lines a hot-plug case is about.
const DMESG_PATTERN: &str =
    "hotplug|hot-add|hot add|memory|virtio_mem|block size|unaligned|add_memory|offlin|onlin|cpu[0-9]|acpi";

impl Session {
    /// The plain definition, made hot-plug-ready by `prepare`, with a virtio-mem
    /// region added by `add-virtio-mem`: the verbs an operator would run.
    async fn define(&mut self, o: &VerifyOpts, accel: &Accel, machine: &str) -> Result<(), HarnessError> {
        let dir = self.daemon.dir.clone();
        let boot = self.boot.clone();
        let memory_mib = (o.memory.get() / MIB).max(256 * u64::from(o.cells));
        let plain = domain::Definition {
            name: &self.name,
            dir: &dir,
            arch: o.arch,
            machine,
            kvm: accel.domain_type() == "kvm",
            memory_mib,
            vcpus: 1,
            hotplug: None,
            boot: &boot,
            disks: vec![domain::Disk { file: "disk", format: &self.disk_format, dev: "vda", readonly: false }],
            agent_channel: AGENT_CHANNEL,
            channel_in_dir: true,
            extras: domain::Extras::default(),
        };
        let path = dir.join("plain.xml");
        std::fs::write(&path, domain::domain_xml(&plain))
            .map_err(|e| HarnessError(format!("{}: {e}", path.display())))?;
        self.daemon.virsh_out(&["define", &path.to_string_lossy()])?;
        let p = crate::prepare::PrepareOpts {
            max_vcpus: Some(o.max_vcpus),
            max_memory: Some(Bytes(memory_mib * MIB + DIMM_ROOM.get() + VIRTIO_MEM_REGION.get())),
            slots: Some(8),
            cells: Some(o.cells),
            ..Default::default()
        };
        let r = ops::prepare(self.conn.clone(), &self.name, &p, false).await.map_err(harness)?;
        if let Some(why) = r.refused {
            return Err(HarnessError(format!("prepare refused the throwaway guest's definition: {why}")));
        }
        let add = AddVirtioMem { size: VIRTIO_MEM_REGION, node: Some(0), block: Bytes(2 * MIB) };
        let r = crate::verb::run(&add, self.conn.clone(), &self.name, &AddVirtioMem::opts(Affect::Config))
            .await
            .map_err(harness)?;
        if r.outcome != Outcome::Ok {
            self.virtio_mem = Err(format!("add-virtio-mem: {}", r.message));
        }
        let xml = self.daemon.virsh_out(&["dumpxml", "--inactive", &self.name])?;
        let _ = std::fs::write(dir.join("domain.xml"), xml);
        Ok(())
    }

    /// One of vmplug's own verbs on the guest, live, as the matrix runs them.
    async fn verb<V: Verb>(&self, verb: &V, no_wait: bool, zone: ZonePolicy) -> Result<OpReport, DomainError> {
        verb::run(verb, self.conn.clone(), &self.name, &hotplug(no_wait, zone)).await
    }

    /// Starts the guest and waits for its agent and its console shell, whichever
    /// it has. The boot case records how it went.
    async fn boot(&mut self, timeout: Duration) -> Result<GuestView, HarnessError> {
        let started = Instant::now();
        self.daemon.virsh_out(&["start", &self.name])?;
        let sock = self.daemon.dir.join("console.sock");
        // The console shell is looked for alongside the agent; a guest without
        // one costs the boot timeout, not more.
        let agent_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let log = self.daemon.dir.join("console.log");
        let up = agent_up.clone();
        let mut console_task = Some(tokio::task::spawn_blocking(move || {
            // Nothing is typed before the guest's userland is up: keys typed
            // into GRUB stop its countdown, and half a line typed into a
            // starting shell leaves it inside an open quote.
            let deadline = started + timeout;
            Wait::new("a shell prompt on the serial console", deadline.saturating_duration_since(Instant::now()))
                .every(Duration::from_millis(250))
                .until_blocking(|| (up.load(std::sync::atomic::Ordering::SeqCst) || prompt_seen(&log)).then_some(()))
                .map_err(|_| HarnessError(format!(
                    "no shell prompt appeared on the serial console within {timeout:?} (a shell, or an autologin getty, is needed there)"
                )))?;
            let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(10));
            Console::connect(&sock, wait).map(|c| (c, started.elapsed()))
        }));
        let mut agent_at = None;
        let mut console_at = None;
        let deadline = started + timeout;
        let mut agent_error = String::new();
        let mut console_result: Option<Result<(Console, Duration), HarnessError>> = None;
        let booting =
            Wait::new("the guest agent or the console shell", deadline.saturating_duration_since(Instant::now()))
                .every(Duration::from_millis(500));
        let mut waiting = booting.start();
        loop {
            if self.try_agent(&mut agent_error).await {
                agent_at = Some(started.elapsed());
                agent_up.store(true, std::sync::atomic::Ordering::SeqCst);
                break;
            }
            if let Some(task) = console_task.take_if(|t| t.is_finished()) {
                let shell = task.await.map_err(|e| HarnessError(format!("worker: {e}")))?;
                let up = shell.is_ok();
                console_result = Some(shell);
                if up {
                    // The shell is up and the agent is not: the packaged agent
                    // starts before getty, so 20 s more settle whether it has one.
                    let grace = Wait::new("the agent after the shell", AGENT_GRACE.min(waiting.left()))
                        .every(Duration::from_millis(500));
                    let mut settling = grace.start();
                    loop {
                        if self.try_agent(&mut agent_error).await {
                            agent_at = Some(started.elapsed());
                            break;
                        }
                        if settling.pause().await.is_err() {
                            break;
                        }
                    }
                    break;
                }
            }
            if waiting.pause().await.is_err() {
                break;
            }
        }
        if let Some(task) = console_task {
            // The agent answered first: the shell gets the rest of the boot time.
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(30));
            console_result = Some(match tokio::time::timeout(left, task).await {
                Ok(r) => r.map_err(|e| HarnessError(format!("worker: {e}")))?,
                Err(_) => Err(HarnessError(format!("no shell answered on the serial console within {timeout:?}"))),
            });
        }
        let mut console_error = String::new();
        match console_result {
            Some(Ok((c, at))) => {
                self.console = Some(c);
                console_at = Some(at);
            }
            Some(Err(e)) => console_error = text::escape_uncut(&e.to_string()).into_owned(),
            None => {}
        }
        let mut view = GuestView {
            kernel: None,
            agent: self.agent.clone(),
            console_shell: self.console.is_some(),
            kernel_config: vec![],
        };
        view.kernel = self.agent.as_ref().map(|a| a.kernel.clone()).or_else(|| self.sh_line("uname -r"));
        if let Some(cfg) = self.sh_raw(
            "{ zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r) 2>/dev/null; } | grep -E '^(# )?CONFIG_(MEMORY_HOTPLUG|MEMORY_HOTREMOVE|ACPI_HOTPLUG_MEMORY|ACPI_HOTPLUG_CPU|HOTPLUG_CPU|VIRTIO_MEM|MHP_MEMMAP_ON_MEMORY|MEMORY_HOTPLUG_DEFAULT_ONLINE)[= ]'",
        ) {
            view.kernel_config = console_lines(&cfg, "");
        }
        self.block_size = match &self.agent {
            Some(a) => a.memory.as_ref().map(|m| m.block_size.get()),
            None => self
                .sh_raw("cat /sys/devices/system/memory/block_size_bytes")
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok()),
        };
        let took = agent_at.or(console_at).unwrap_or_else(|| started.elapsed());
        let mut c = match (&self.agent, self.console.is_some()) {
            (Some(a), _) => case(
                "boot",
                Verdict::Pass,
                format!("vmplug-guest {} answered in {:.1} s", a.agent_version, took.as_secs_f64()),
                started,
            ),
            (None, true) => case(
                "boot",
                Verdict::Pass,
                format!("a console shell answered in {:.1} s; no agent answered", took.as_secs_f64()),
                started,
            ),
            (None, false) => case(
                "boot",
                Verdict::Fail,
                format!("neither the vmplug-guest agent nor a console shell answered within {timeout:?}"),
                started,
            ),
        };
        if self.agent.is_none() {
            c.evidence.push(format!("agent: {}", text::escape_uncut(&agent_error)));
        }
        if self.console.is_none() {
            c.evidence.push(format!("console: {console_error}"));
            c.evidence.extend(console_log_tail(&self.daemon.dir.join("console.log")));
        }
        if let Some(a) = &self.agent {
            c.evidence.push(facts_line(a));
        }
        self.cases.push(c);
        Ok(view)
    }

    /// One handshake attempt (up to 5 s); on success the agent's facts are kept.
    async fn try_agent(&mut self, error: &mut String) -> bool {
        match crate::tune::status(self.conn.clone(), &self.name, None, Duration::from_secs(5)).await {
            Ok(st) if st.guest.is_some() => {
                self.agent = st.guest;
                true
            }
            Ok(st) => {
                *error = st.agent_error.unwrap_or_default();
                false
            }
            Err(e) => {
                *error = e.to_string();
                false
            }
        }
    }

    /// A console command's output, or `None` when there is no shell. It is
    /// the guest's text, raw: parse it, never report it (see [`Self::sh_line`]).
    fn sh_raw(&mut self, cmd: &str) -> Option<String> {
        let c = self.console.as_mut()?;
        tokio::task::block_in_place(|| c.exec(cmd, SHELL_TIMEOUT)).ok().map(|(_, out)| out)
    }

    /// A console command's one-line output, trimmed and escaped as it arrives:
    /// fit for the report.
    fn sh_line(&mut self, cmd: &str) -> Option<String> {
        self.sh_raw(cmd).map(|o| text::escape(o.trim()))
    }

    fn dmesg_mark(&mut self) -> Option<usize> {
        self.sh_raw("dmesg | wc -l").and_then(|n| n.trim().parse().ok())
    }

    /// The dmesg lines about hot-plug since `mark`, at most six.
    fn dmesg_since(&mut self, mark: Option<usize>) -> Vec<String> {
        let Some(m) = mark else { return vec![] };
        let cmd = format!("dmesg | tail -n +{} | grep -iE '{DMESG_PATTERN}' | tail -n 6", m + 1);
        self.sh_raw(&cmd).map(|o| console_lines(&o, "dmesg: ")).unwrap_or_default()
    }

    /// The guest's facts now, from the agent.
    async fn facts(&self) -> Option<GuestInfo> {
        crate::tune::status(self.conn.clone(), &self.name, None, Duration::from_secs(15)).await.ok()?.guest
    }

    /// Runs one verb-backed case and records it, with the guest's evidence.
    async fn record(
        &mut self,
        id: &str,
        started: Instant,
        mark: Option<usize>,
        r: Result<OpReport, DomainError>,
    ) -> Verdict {
        let mut c = match r {
            Ok(r) => {
                let (verdict, reason, option) = judge(&r);
                let mut c = case(id, verdict, reason, started);
                c.kernel_option = option;
                c.evidence = op_evidence(&r);
                c
            }
            Err(e) => case(id, Verdict::Skip, format!("not tried: {e}"), started),
        };
        if self.agent.is_some() && c.verdict != Verdict::Skip {
            if let Some(f) = self.facts().await {
                c.evidence.push(state_line(&f));
            }
        }
        c.evidence.extend(self.dmesg_since(mark));
        let v = c.verdict;
        self.cases.push(c);
        v
    }

    async fn run_matrix(&mut self, o: &VerifyOpts) {
        let reachable = self.agent.is_some() || self.console.is_some();
        let ids = self.case_ids(o);
        if !reachable {
            for id in ids {
                self.cases.push(case(&id, Verdict::Skip, "the guest was not reachable (see boot)", Instant::now()));
            }
            return;
        }
        self.cpu_plug().await;
        let mut plugged = false;
        for node in 0..o.cells {
            plugged |= self.dimm_plug(node).await == Verdict::Pass;
        }
        self.dimm_misaligned().await;
        self.dimm_unplug().await;
        let grown = self.virtio_mem(true).await == Verdict::Pass;
        if grown {
            self.virtio_mem(false).await;
        } else {
            self.cases.push(case(
                "virtio-mem-shrink",
                Verdict::Skip,
                "not tried: virtio-mem-grow did not pass",
                Instant::now(),
            ));
        }
        self.agent_restart(plugged, grown).await;
    }

    fn case_ids(&self, o: &VerifyOpts) -> Vec<String> {
        let mut ids = vec!["cpu-plug".to_string()];
        ids.extend((0..o.cells).map(|n| format!("dimm-plug-node{n}")));
        ids.extend(
            ["dimm-misaligned", "dimm-unplug", "virtio-mem-grow", "virtio-mem-shrink", "agent-restart"]
                .map(String::from),
        );
        ids
    }

    async fn cpu_plug(&mut self) {
        let started = Instant::now();
        let mark = self.dmesg_mark();
        let target = self.vcpus + 1;
        if self.agent.is_some() {
            let r = self.verb(&ops::Setvcpus { target }, false, ZonePolicy::Auto).await;
            if self.record("cpu-plug", started, mark, r).await == Verdict::Pass {
                self.vcpus = target;
            }
            return;
        }
        // No agent: plug blind, then see in sysfs whether the image onlined it.
        let r = self.verb(&ops::Setvcpus { target }, true, ZonePolicy::Auto).await;
        let applied = matches!(&r, Ok(r) if r.outcome == Outcome::Ok);
        if !applied {
            self.record("cpu-plug", started, mark, r).await;
            return;
        }
        self.vcpus = target;
        let mut online = String::new();
        let ok = Wait::new(format!("the image to online {target} vCPUs"), CASE_TIMEOUT)
            .every(Duration::from_millis(200))
            .until(|| {
                online = self.sh_line("cat /sys/devices/system/cpu/online").unwrap_or_default();
                online.trim().parse::<CpuSet>().is_ok_and(|s| s.len() as u32 >= target).then_some(())
            })
            .await
            .is_ok();
        let mut c = if ok {
            case(
                "cpu-plug",
                Verdict::Pass,
                format!("setvcpus {target} (no agent: --no-wait); the image onlined the new vCPU by itself"),
                started,
            )
        } else {
            case("cpu-plug", Verdict::Fail, format!("the new vCPU stayed offline for {CASE_TIMEOUT:?}: nothing in the image onlines hot-plugged CPUs (install vmplug-guest, or an online rule)"), started)
        };
        c.evidence.push(format!("sysfs: cpu/online = {}", online.trim()));
        c.evidence.extend(self.dmesg_since(mark));
        self.cases.push(c);
    }

    fn blocks_online(&mut self) -> Option<(u64, u64)> {
        let out = self.sh_raw("cat /sys/devices/system/memory/memory*/state | sort | uniq -c")?;
        let count = |w: &str| {
            out.lines()
                .filter_map(|l| l.split_once(char::is_whitespace).map(|(n, s)| (n.trim(), s.trim())))
                .filter(|(_, s)| *s == w)
                .filter_map(|(n, _)| n.parse::<u64>().ok())
                .sum()
        };
        Some((count("online"), count("offline")))
    }

    async fn dimm_plug(&mut self, node: u32) -> Verdict {
        let id = format!("dimm-plug-node{node}");
        let started = Instant::now();
        let mark = self.dmesg_mark();
        let Some(bs) = self.block_size else {
            let c = case(
                &id,
                Verdict::Fail,
                "the guest kernel has no memory hot-plug (/sys/devices/system/memory is absent)",
                started,
            );
            self.cases.push(Case { kernel_option: Some("CONFIG_MEMORY_HOTPLUG"), ..c });
            return Verdict::Fail;
        };
        let request = format!("verify-n{node}");
        let mem = MemoryOpts {
            size: Bytes(bs),
            node: Some(node),
            round_up: false,
            ceiling: None,
            max_dimm: Bytes(bs),
            request_id: request.clone(),
        };
        if self.agent.is_some() {
            let r = self.verb(&ops::AttachMemory { mem: mem.clone() }, false, ZonePolicy::Auto).await;
            let v = self.record(&id, started, mark, r).await;
            if v == Verdict::Pass {
                self.dimms.push(request);
            }
            return v;
        }
        let before = self.blocks_online();
        let r = self.verb(&ops::AttachMemory { mem: mem.clone() }, true, ZonePolicy::Auto).await;
        if !matches!(&r, Ok(r) if r.outcome == Outcome::Ok) {
            return self.record(&id, started, mark, r).await;
        }
        let want = before.map(|(on, _)| on + 1);
        let mut now = before;
        let ok = Wait::new("the image to online the new DIMM's blocks", CASE_TIMEOUT)
            .every(Duration::from_millis(200))
            .until(|| {
                now = self.blocks_online();
                now.is_some_and(|(on, off)| Some(on) >= want && off == 0).then_some(())
            })
            .await
            .is_ok();
        let mut c = if ok {
            case(
                &id,
                Verdict::Pass,
                format!(
                    "attach-memory {} --node {node} (no agent: --no-wait); the image onlined its block by itself",
                    Bytes(bs)
                ),
                started,
            )
        } else {
            case(&id, Verdict::Fail, format!("the DIMM's block was not online after {CASE_TIMEOUT:?}: nothing in the image onlines hot-plugged memory (install vmplug-guest, or an online rule)"), started)
        };
        if let (Some((b_on, b_off)), Some((on, off))) = (before, now) {
            c.evidence.push(format!("sysfs: memory blocks online {b_on} → {on}, offline {b_off} → {off}"));
        }
        c.evidence.extend(self.dmesg_since(mark));
        let v = c.verdict;
        self.cases.push(c);
        v
    }

    async fn dimm_misaligned(&mut self) {
        let id = "dimm-misaligned";
        let started = Instant::now();
        let (Some(bs), true) = (self.block_size, self.agent.is_some()) else {
            let why = "vmplug refuses a misaligned size from the block size the agent reports; without an agent it could not, and plugging it would break every later DIMM of this guest";
            self.cases.push(case(id, Verdict::Skip, why, started));
            return;
        };
        let size = Bytes(bs + bs / 2);
        let before = self.daemon.virsh_out(&["dumpxml", &self.name]).map(|x| x.matches("model='dimm'").count()).ok();
        let mem = MemoryOpts {
            size,
            node: Some(0),
            round_up: false,
            ceiling: None,
            max_dimm: size,
            request_id: "verify-misaligned".into(),
        };
        let r = self.verb(&ops::AttachMemory { mem: mem.clone() }, false, ZonePolicy::Auto).await;
        let after = self.daemon.virsh_out(&["dumpxml", &self.name]).map(|x| x.matches("model='dimm'").count()).ok();
        let mut c = match &r {
            Ok(r)
                if r.outcome == Outcome::Refused
                    && r.findings.iter().any(|f| f.id == RuleId::MemBlockAlign.id())
                    && before == after =>
            {
                case(
                    id,
                    Verdict::Pass,
                    format!("{size} refused before anything was attached (block size {})", Bytes(bs)),
                    started,
                )
            }
            Ok(r) => case(
                id,
                Verdict::Fail,
                format!("{size} was not refused for its alignment: {} — {}", r.outcome.word(), r.message),
                started,
            ),
            Err(e) => case(id, Verdict::Skip, format!("not tried: {e}"), started),
        };
        if let Ok(r) = &r {
            c.evidence.extend(
                r.findings
                    .iter()
                    .filter(|f| f.id == RuleId::MemBlockAlign.id())
                    .map(|f| format!("[{}] {}", f.id, f.message)),
            );
        }
        c.evidence.push(format!("DIMMs in the live XML: {} before, {} after", before.unwrap_or(0), after.unwrap_or(0)));
        self.cases.push(c);
    }

    async fn dimm_unplug(&mut self) {
        let id = "dimm-unplug";
        let started = Instant::now();
        if self.agent.is_none() {
            self.cases.push(case(
                id,
                Verdict::Skip,
                "vmplug unplugs only memory the agent has offlined; no agent answered",
                started,
            ));
            return;
        }
        let Some(request) = self.dimms.first().cloned() else {
            self.cases.push(case(id, Verdict::Skip, "no DIMM was plugged", started));
            return;
        };
        let mark = self.dmesg_mark();
        let sel = DimmSelector::Request(request.clone());
        let r = self.verb(&crate::unplug::DetachMemory { sel: sel.clone() }, false, ZonePolicy::Auto).await;
        if self.record(id, started, mark, r).await == Verdict::Pass {
            self.dimms.retain(|d| *d != request);
        }
    }

    async fn virtio_mem(&mut self, grow: bool) -> Verdict {
        let id = if grow { "virtio-mem-grow" } else { "virtio-mem-shrink" };
        let started = Instant::now();
        if let Err(why) = self.virtio_mem.clone() {
            self.cases.push(case(id, Verdict::Skip, format!("not tried: {why}"), started));
            return Verdict::Skip;
        }
        if self.agent.is_none() {
            let why = "resize-memory's verdict rests on the agent's account of the blocks it onlined or released; without an agent only the device's size is visible";
            self.cases.push(case(id, Verdict::Skip, why, started));
            return Verdict::Skip;
        }
        let mark = self.dmesg_mark();
        let change = if grow { SizeChange::Grow(VIRTIO_MEM_STEP) } else { SizeChange::Shrink(VIRTIO_MEM_STEP) };
        let r = ResizeOpts { change, node: None, settle: Duration::from_secs(10) };
        let res = self.verb(&crate::vmem::ResizeMemory { r }, false, ZonePolicy::Movable).await;
        self.record(id, started, mark, res).await
    }

    /// Kills the agent as soon as the plug's first block exists in the guest;
    /// the image's supervisor must bring it back and the plug must complete.
    async fn agent_restart(&mut self, dimm: bool, vmem: bool) {
        let id = "agent-restart";
        let started = Instant::now();
        if self.agent.is_none() || self.console.is_none() {
            let why = if self.agent.is_none() {
                "no agent answered"
            } else {
                "it needs a shell on the serial console to kill the agent mid-plug"
            };
            self.cases.push(case(id, Verdict::Skip, why, started));
            return;
        }
        if !dimm && !vmem {
            self.cases.push(case(
                id,
                Verdict::Skip,
                "no plug method passed, so there is nothing to interrupt",
                started,
            ));
            return;
        }
        let before_pid = self.sh_line("pidof vmplug-guest").unwrap_or_default();
        let dirs = self
            .sh_raw("ls -d /sys/devices/system/memory/memory* | wc -l")
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let (conn, name) = (self.conn.clone(), self.name.clone());
        let bs = self.block_size.unwrap_or(128 * MIB);
        let (what, task) = if dimm {
            let size = Bytes(4 * bs);
            let mem = MemoryOpts {
                size,
                node: Some(0),
                round_up: false,
                ceiling: None,
                max_dimm: size,
                request_id: "verify-restart".into(),
            };
            (
                format!("attach-memory {size}"),
                tokio::spawn(async move {
                    verb::run(&ops::AttachMemory { mem: mem.clone() }, conn, &name, &hotplug(false, ZonePolicy::Auto))
                        .await
                }),
            )
        } else {
            let r =
                ResizeOpts { change: SizeChange::Grow(Bytes(512 * MIB)), node: None, settle: Duration::from_secs(10) };
            (
                "resize-memory +512 MiB".to_string(),
                tokio::spawn(async move {
                    verb::run(&crate::vmem::ResizeMemory { r }, conn, &name, &hotplug(false, ZonePolicy::Movable)).await
                }),
            )
        };
        let chance =
            Wait::new("a new memory block to kill the agent at", Duration::from_secs(60)).every(Duration::ZERO);
        let mut waiting = chance.start();
        let mut killed = false;
        let mut finished_first = false;
        while waiting.pause().await.is_ok() {
            if task.is_finished() {
                finished_first = true;
                break;
            }
            let cmd = format!("[ $(ls -d /sys/devices/system/memory/memory* | wc -l) -gt {dirs} ] && kill -9 $(pidof vmplug-guest) && echo KILLED");
            if self.sh_raw(&cmd).is_some_and(|o| o.contains("KILLED")) {
                killed = true;
                break;
            }
        }
        let r = match task.await {
            Ok(r) => r,
            Err(e) => Err(DomainError::Other(format!("the plug's task failed: {e}"))),
        };
        let mut c = match (&r, killed, finished_first) {
            (_, false, true) => {
                case(id, Verdict::Skip, format!("{what} completed before the agent could be killed mid-way"), started)
            }
            (_, false, false) => case(
                id,
                Verdict::Skip,
                format!("{what}: no new memory block appeared within 60 s to kill the agent at"),
                started,
            ),
            (Ok(r), true, _) => {
                let (v, reason, opt) = judge(r);
                let reason = match v {
                    Verdict::Pass => format!(
                        "agent killed after the first block appeared; it came back and {what} completed: {reason}"
                    ),
                    _ => format!("agent killed mid-plug: {reason}"),
                };
                let mut c = case(id, v, reason, started);
                c.kernel_option = opt;
                c.evidence = op_evidence(r);
                c
            }
            (Err(e), true, _) => {
                case(id, Verdict::Fail, format!("agent killed mid-plug, and {what} ended in error: {e}"), started)
            }
        };
        // The image's supervisor restarts the agent (the package's unit after
        // 500 ms); it counts as back once it answers a handshake again.
        let back =
            Wait::new("the restarted agent's handshake", Duration::from_secs(30)).every(Duration::from_millis(500));
        let mut waiting = back.start();
        let mut error = String::new();
        let mut answered = false;
        if killed {
            loop {
                if self.try_agent(&mut error).await {
                    answered = true;
                    break;
                }
                if waiting.pause().await.is_err() {
                    break;
                }
            }
        }
        let after_pid = self.sh_line("pidof vmplug-guest").unwrap_or_default();
        c.evidence.push(format!(
            "agent pid {} → {}",
            before_pid.trim(),
            if after_pid.trim().is_empty() { "none" } else { after_pid.trim() }
        ));
        if killed && !answered && c.verdict == Verdict::Pass {
            c.verdict = Verdict::Fail;
            c.reason = format!("the plug completed but the agent did not answer again within 30 s (does the image's service restart it?): {error}");
        }
        self.cases.push(c);
    }
}

/// Console output as report lines: each line escaped as it arrives (the
/// console is the guest's), trimmed, blank ones dropped, after `prefix`.
fn console_lines(out: &str, prefix: &str) -> Vec<String> {
    out.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| format!("{prefix}{}", text::escape(l))).collect()
}

/// At most the last `bytes` of a file (empty when it cannot be read): a
/// guest can make its console log as large as it likes.
fn file_tail(path: &Path, bytes: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return vec![] };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(bytes))).is_err() || f.take(bytes).read_to_end(&mut out).is_err() {
        return vec![];
    }
    out
}

/// How much of the console log's end is read for its last lines.
const CONSOLE_TAIL_BYTES: u64 = 16 * 1024;

/// The console log's last lines, escaped, for a boot that found no shell.
fn console_log_tail(log: &Path) -> Vec<String> {
    let tail = file_tail(log, CONSOLE_TAIL_BYTES);
    let lines = console_lines(&String::from_utf8_lossy(&tail), "console log: ");
    lines[lines.len().saturating_sub(8)..].to_vec()
}

/// Whether the console's log ends at a shell or login prompt.
fn prompt_seen(log: &Path) -> bool {
    let tail = String::from_utf8_lossy(&file_tail(log, 512)).into_owned();
    let last = tail.rsplit(['\n', '\r']).find(|l| !l.trim().is_empty()).unwrap_or_default();
    // busybox's line editing asks for the cursor position after its prompt.
    let last = last.replace("\u{1b}[6n", "");
    let last = last.trim_end();
    last.ends_with('#') || last.ends_with('$') || last.ends_with("login:")
}

/// What changes from case to case, in one line.
fn state_line(a: &GuestInfo) -> String {
    let mem = match &a.memory {
        Some(m) => {
            let zones: Vec<String> = m.zones.iter().map(|(z, n)| format!("{n} {z}")).collect();
            format!("{} block(s) online ({}), {} offline", m.blocks_online, zones.join(", "), m.blocks_offline)
        }
        None => "no memory hot-plug".into(),
    };
    format!("guest after: CPUs online {}, {mem}, MemTotal {}", a.cpus.online, a.mem_total)
}

/// The agent's facts in one line.
fn facts_line(a: &GuestInfo) -> String {
    let mem = match &a.memory {
        Some(m) => {
            let zones: Vec<String> = m.zones.iter().map(|(z, n)| format!("{n} {z}")).collect();
            format!(
                "block size {}, {} block(s) online ({}), {} offline, auto_online_blocks {}",
                Bytes(m.block_size.get()),
                m.blocks_online,
                zones.join(", "),
                m.blocks_offline,
                m.auto_online_blocks.as_deref().unwrap_or("?")
            )
        }
        None => "no memory hot-plug (/sys/devices/system/memory absent)".into(),
    };
    let yn = |b: Option<bool>| b.map_or("?", |b| if b { "yes" } else { "no" });
    format!(
        "guest: kernel {}, CPUs online {} of possible {}, {mem}, ACPI memory hot-plug {}, ACPI CPU hot-plug {}, virtio_mem devices {}, NUMA nodes {}, udev online rule {}",
        a.kernel,
        a.cpus.online,
        a.cpus.possible,
        yn(a.acpi_memory_hotplug),
        yn(a.acpi_cpu_hotplug),
        a.virtio_mem_devices.map_or("driver not loaded".to_string(), |n| n.to_string()),
        a.numa_possible.as_ref().unwrap_or(&a.numa_nodes),
        if a.udev_online_rule { "yes" } else { "no" }
    )
}

/// The outcome of the whole run: a failed case is the guest's failure.
pub fn outcome_of(r: &VerifyReport) -> Outcome {
    if r.summary.fail > 0 {
        Outcome::GuestFailed
    } else {
        Outcome::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security finding 3: dmesg, kernel config and console log lines went
    /// into the report raw (escape sequences, forged lines).
    #[test]
    fn console_text_is_escaped_as_it_arrives() {
        let out = "\u{1b}[2Kmemory memory9: onlined\r\n\n  ::error file=a::owned\u{7}\nresult: PASS\u{202e}\r\n";
        let lines = console_lines(out, "dmesg: ");
        assert_eq!(
            lines,
            vec![
                "dmesg: \\u{1b}[2Kmemory memory9: onlined",
                "dmesg: ::error file=a::owned\\u{7}",
                "dmesg: result: PASS\\u{202e}"
            ]
        );
        assert!(lines.iter().flat_map(|l| l.chars()).all(|c| !text::needs_escape(c)));
    }

    /// The console log is the guest's to fill: only its end is read, and its
    /// last lines arrive escaped.
    #[test]
    fn only_the_end_of_the_console_log_is_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("console.log");
        let mut text = "x".repeat(4 << 20);
        text.push_str("\nline\u{1b}[31m red\r\n");
        text.push_str(&(1..=9).map(|i| format!("{i}\n")).collect::<String>());
        text.push_str("~ # ");
        std::fs::write(&log, &text).expect("write");
        assert!(prompt_seen(&log));
        assert_eq!(file_tail(&log, 16).len(), 16);
        let tail = console_log_tail(&log);
        assert_eq!(tail.len(), 8);
        assert_eq!(tail[0], "console log: 3");
        assert_eq!(tail[7], "console log: ~ #");
        assert!(file_tail(&dir.path().join("none"), 16).is_empty());
        std::fs::write(&log, "a\u{1b}]0;t\u{7}\nb").expect("write");
        assert_eq!(console_log_tail(&log), vec!["console log: a\\u{1b}]0;t\\u{7}", "console log: b"]);
    }

    #[test]
    fn a_prompt_is_a_shell_or_a_login_at_the_end_of_the_log() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("console.log");
        let seen = |text: &str| {
            std::fs::write(&log, text).expect("write");
            prompt_seen(&log)
        };
        assert!(!seen(""));
        assert!(seen("booting\r\n~ # \u{1b}[6n"), "busybox's prompt with its cursor query");
        assert!(seen("Debian GNU/Linux 12 vmplug-guest ttyS0\r\n\r\nroot@vmplug-guest:~# "));
        assert!(seen("vmplug-guest login: "));
        assert!(!seen("Booting `Debian GNU/Linux'\r\n\r\nLoading Linux 6.1.0 ...\r\n"), "GRUB is not a prompt");
    }
}
