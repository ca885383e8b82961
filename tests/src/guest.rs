//! One test guest: spec, domain XML, boot, shell, the `vmplug` binary, teardown.

use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vmplug::wait::Wait;

use crate::console::Console;
use crate::initramfs::{initramfs, READY_MARKER};
use crate::libvirtd::{reap_stale, stop_pid, Libvirtd};
use crate::Env;

/// Boot to the ready marker: 6–8 s measured under TCG; generous for a loaded host.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// One shell command in the guest.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many guests at once per test process (2 cores, TCG).
pub const MAX_GUESTS: usize = 2;

pub const AGENT_PORT: u32 = vmplug_common::protocol::DEFAULT_VSOCK_PORT;
pub const SERIAL_NAME: &str = "org.vmplug.guest.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// virtio-serial channel (a Unix socket on the host).
    Serial,
    /// virtio-vsock through vhost-device-vsock, dialled as hybrid vsock.
    Vsock,
}

/// Which of the cached guest kernels boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestKernel {
    /// Debian 12's 6.1: hot-added memory stays offline until someone onlines it.
    #[default]
    Bookworm,
    /// Debian 13's 6.12: the kernel onlines hot-added memory itself.
    Trixie,
    /// Debian 12's arm64 6.1 (aarch64 `virt` under TCG, UEFI + ACPI): no ACPI
    /// memory hot-plug, so only virtio-mem reaches it.
    Arm64,
    /// Debian 12's arm64 6.1 source cross-built with ACPI memory hot-plug and
    /// everything built in (setup-host.sh): DIMMs reach it.
    Arm64Acpi,
}

/// The guest's architecture (vmplug's own: one type for verify-image and the suite).
pub use vmplug::verify::domain::Arch;

impl GuestKernel {
    pub fn arch(self) -> Arch {
        match self {
            GuestKernel::Bookworm | GuestKernel::Trixie => Arch::X86_64,
            GuestKernel::Arm64 | GuestKernel::Arm64Acpi => Arch::Aarch64,
        }
    }

    fn kernel(self, env: &Env) -> crate::env::Kernel {
        match self {
            GuestKernel::Bookworm => crate::env::Kernel { image: env.kernel.clone(), modules: env.modules.clone() },
            GuestKernel::Trixie => env.trixie().clone(),
            GuestKernel::Arm64 => env.arm64().clone(),
            GuestKernel::Arm64Acpi => env.arm64_acpi().clone(),
        }
    }
}

/// The newest versioned `virt-X.Y` machine type that `capabilities` (libvirt's
/// host capabilities XML) offers for aarch64; never a hard-coded version.
/// Parsed by vmplug's own capabilities reader and machine chooser.
pub fn newest_virt_machine(capabilities: &str) -> Option<String> {
    vmplug::verify::domain::default_machine(Arch::Aarch64, || Ok::<_, ()>(capabilities.to_string())).ok().flatten()
}

#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub vcpus: u32,
    pub max_vcpus: u32,
    /// Initial memory of each guest NUMA cell, MiB (vCPUs are spread evenly).
    pub cells_mib: Vec<u64>,
    pub max_memory_mib: u64,
    pub slots: u32,
    pub transport: Transport,
    pub cmdline_extra: String,
    /// A domain as an operator would write it without hot-plug in mind: no
    /// `<maxMemory>`, no guest NUMA, every vCPU present (for `vmplug prepare`).
    pub plain: bool,
    /// Boot this ext4 image (copied per test) with systemd instead of the
    /// busybox initramfs userland.
    pub disk: Option<PathBuf>,
    /// A raw image attached read-only as a second virtio disk (`/dev/vdb`),
    /// copied per test: files handed to a running guest.
    pub data_disk: Option<PathBuf>,
    /// virtio-mem devices defined at boot: (guest node, size MiB), each with
    /// 2 MiB blocks and nothing requested.
    pub virtio_mem: Vec<(u32, u64)>,
    pub kernel: GuestKernel,
    /// The machine type; None: q35 on x86, the newest versioned `virt` on aarch64.
    pub machine: Option<String>,
    /// The agent's virtio-serial channel names no socket path: libvirt places
    /// it under its own channel directory, as `vmplug prepare` leaves it.
    pub libvirt_channel: bool,
    /// A virtio-net interface with this many queue pairs (a multiqueue tap that
    /// libvirt creates and QEMU serves in userspace: no vhost-net needed).
    pub nic_queues: Option<u32>,
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            vcpus: 1,
            max_vcpus: 4,
            cells_mib: vec![512],
            max_memory_mib: 8192,
            slots: 8,
            transport: Transport::Serial,
            cmdline_extra: String::new(),
            plain: false,
            disk: None,
            data_disk: None,
            virtio_mem: Vec::new(),
            kernel: GuestKernel::Bookworm,
            machine: None,
            libvirt_channel: false,
            nic_queues: None,
        }
    }
}

impl GuestSpec {
    /// The domain XML of a hot-plug-ready test guest on `machine`, written by
    /// vmplug's one definition writer (verify-image's too).
    pub fn domain_xml(
        &self,
        name: &str,
        dir: &std::path::Path,
        kernel: &std::path::Path,
        initrd: &std::path::Path,
        machine: &str,
    ) -> String {
        use vmplug::verify::domain::{domain_xml, Definition, DirectBoot, Disk, Extras, Hotplug};
        let d = dir.display();
        let mut extras = Extras::default();
        if self.transport == Transport::Vsock {
            extras.metadata = format!(
                "<metadata><vmplug:domain xmlns:vmplug='https://vmplug.dev/xmlns/domain/1'><vmplug:agent transport='hybrid' path='{d}/vsock.sock' port='{AGENT_PORT}'/></vmplug:domain></metadata>"
            );
            extras.memory_backing =
                "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>".to_string();
            extras.qemu_args = format!(
                "<qemu:arg value='-chardev'/><qemu:arg value='socket,id=vmplugvsock,path={d}/vhu.sock'/>\
                 <qemu:arg value='-device'/><qemu:arg value='vhost-user-vsock-pci,chardev=vmplugvsock,bus=pcie.0,addr=0x10'/>"
            );
        }
        for (node, mib) in &self.virtio_mem {
            let _ = write!(
                extras.devices,
                "<memory model='virtio-mem'><target><size unit='MiB'>{mib}</size><node>{node}</node>\
                 <block unit='MiB'>2</block><requested unit='MiB'>0</requested></target></memory>"
            );
        }
        if let Some(q) = self.nic_queues {
            let _ = write!(
                extras.devices,
                "<interface type='ethernet'><model type='virtio'/><driver name='qemu' queues='{q}'/></interface>"
            );
        }
        let mut disks = Vec::new();
        if self.disk.is_some() {
            disks.push(Disk { file: "root.img", format: "raw", dev: "vda", readonly: false });
        }
        if self.data_disk.is_some() {
            disks.push(Disk { file: "data.img", format: "raw", dev: "vdb", readonly: true });
        }
        let root = if self.disk.is_some() { " vmplug.root=/dev/vda" } else { "" };
        let acpi = if self.kernel.arch() == Arch::Aarch64 { " acpi=force" } else { "" };
        let boot = DirectBoot {
            kernel: Some(kernel.to_path_buf()),
            initrd: Some(initrd.to_path_buf()),
            append: Some(
                format!("quiet loglevel=1 panic=-1{root}{acpi} {}", self.cmdline_extra).trim_end().to_string(),
            ),
        };
        let hotplug = (!self.plain).then_some(Hotplug {
            max_vcpus: self.max_vcpus,
            cells_mib: &self.cells_mib,
            slots: self.slots,
            max_memory_mib: self.max_memory_mib,
        });
        domain_xml(&Definition {
            name,
            dir,
            arch: self.kernel.arch(),
            machine,
            kvm: false,
            memory_mib: self.cells_mib.iter().sum(),
            vcpus: self.vcpus,
            hotplug,
            boot: &boot,
            disks,
            agent_channel: SERIAL_NAME,
            channel_in_dir: !self.libvirt_channel,
            extras,
        })
    }
}

/// Copies `from` to `to` (a fresh file in a guest's directory).
fn copy_in(from: &std::path::Path, to: &std::path::Path) -> PathBuf {
    fs::copy(from, to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    to.to_path_buf()
}

/// Limits concurrent guests within one test process.
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

static SLOTS: Slots = Slots { used: Mutex::new(0), freed: Condvar::new() };
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Guests one process may run at once: [`MAX_GUESTS`] unless raised.
static GUEST_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(MAX_GUESTS);

/// Lets this process run up to `n` guests at once (the bench's four-guest
/// concurrency row; tests keep [`MAX_GUESTS`]).
pub fn allow_guests(n: usize) {
    GUEST_LIMIT.store(n.max(1), Ordering::SeqCst);
    SLOTS.freed.notify_all();
}

fn take_slot() {
    let mut used = SLOTS.used.lock().unwrap_or_else(|e| e.into_inner());
    while *used >= GUEST_LIMIT.load(Ordering::SeqCst) {
        used = SLOTS.freed.wait(used).unwrap_or_else(|e| e.into_inner());
    }
    *used += 1;
}

fn give_slot() {
    *SLOTS.used.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
    // Every waiter: one waiting for several slots may not be the one that can go.
    SLOTS.freed.notify_all();
}

thread_local! {
    /// Slots this test thread holds through [`reserve_guests`], not yet booted.
    static RESERVED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Slots for a test that runs `n` guests at once, taken together: two such
/// tests each holding one slot and waiting for a second would wait forever.
/// The next `n` guests this thread defines use them; dropping the guard gives
/// back those not used.
#[must_use = "the slots are held while the guard lives"]
pub fn reserve_guests(n: usize) -> GuestSlots {
    let mut used = SLOTS.used.lock().unwrap_or_else(|e| e.into_inner());
    assert!(n <= GUEST_LIMIT.load(Ordering::SeqCst), "{n} guests at once is more than this process may run");
    while *used + n > GUEST_LIMIT.load(Ordering::SeqCst) {
        used = SLOTS.freed.wait(used).unwrap_or_else(|e| e.into_inner());
    }
    *used += n;
    RESERVED.with(|r| r.set(r.get() + n));
    GuestSlots
}

/// The guard of [`reserve_guests`].
#[derive(Debug)]
pub struct GuestSlots;

impl Drop for GuestSlots {
    fn drop(&mut self) {
        let unused = RESERVED.with(|r| r.replace(0));
        if unused > 0 {
            *SLOTS.used.lock().unwrap_or_else(|e| e.into_inner()) -= unused;
            SLOTS.freed.notify_all();
        }
    }
}

/// A slot for one guest: one reserved by this thread, else a free one.
fn slot_for_guest() {
    let reserved = RESERVED.with(|r| {
        let n = r.get();
        r.set(n.saturating_sub(1));
        n > 0
    });
    if !reserved {
        take_slot();
    }
}

#[derive(Debug)]
pub struct Guest {
    pub name: String,
    pub dir: PathBuf,
    pub spec: GuestSpec,
    pub daemon: Libvirtd,
    pub console: Option<Console>,
    vsock_backend: Option<Child>,
    xml: String,
    /// The daemons (with their work directories) a migration left behind:
    /// stopped and removed with the guest.
    pub retired: Vec<Libvirtd>,
}

/// A live migration under way (see [`Guest::start_migration`]): `virsh
/// migrate` running, and the destination's daemon and directory. Dropped
/// unfinished (a failed test), it aborts the job and stops that daemon.
#[derive(Debug)]
pub struct Migration {
    virsh: Option<Child>,
    daemon: Option<Libvirtd>,
    domain: String,
    source_uri: String,
}

impl Drop for Migration {
    fn drop(&mut self) {
        if let Some(mut child) = self.virsh.take() {
            let _ = Command::new("virsh").args(["-c", &self.source_uri, "domjobabort", &self.domain]).output();
            stop_pid(child.id() as i32, Duration::from_secs(10));
            let _ = child.wait();
        }
        if let Some(mut d) = self.daemon.take() {
            d.stop();
            if std::env::var_os("VMPLUG_KEEP").is_none() {
                let _ = fs::remove_dir_all(&d.dir);
            }
        }
    }
}

impl Guest {
    /// Defines and starts a guest, waits for its agent to be started and its
    /// console shell to answer.
    pub fn boot(test: &str, spec: GuestSpec) -> Guest {
        let mut g = Guest::define(test, spec);
        g.start();
        g
    }

    /// Defines a guest (under its own daemon) without starting it.
    pub fn define(test: &str, spec: GuestSpec) -> Guest {
        let env = Env::get();
        reap_stale(env);
        slot_for_guest();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("vmplug-{test}-{}-{n}", std::process::id());
        let dir = vmplug::harness::workdir::fresh_dir(&env.work, &format!("{}-{n}", std::process::id()))
            .unwrap_or_else(|e| panic!("{e}"));
        let daemon = Libvirtd::start(env, &dir);
        let kernel = spec.kernel.kernel(env);
        let initrd = initramfs(env, &kernel, spec.kernel.arch());
        // QEMU runs as the distribution's unprivileged user: it reads its
        // kernel and initrd from the guest's own directory (which it may
        // traverse), never from the cache (which may be private to root).
        let kernel = crate::env::Kernel { image: copy_in(&kernel.image, &dir.join("vmlinuz")), ..kernel };
        let initrd = copy_in(&initrd, &dir.join("initrd.img"));
        let machine = match &spec.machine {
            Some(m) => m.clone(),
            None => vmplug::verify::domain::default_machine(spec.kernel.arch(), || {
                Ok::<_, ()>(daemon.virsh_ok(&["capabilities"]))
            })
            .ok()
            .flatten()
            .expect("libvirt's capabilities offer no versioned aarch64 'virt' machine"),
        };
        if let Some(img) = &spec.disk {
            // A private, sparse copy: the test may write to it and reboot.
            let st = Command::new("cp").arg("--sparse=always").arg(img).arg(dir.join("root.img")).status().expect("cp");
            assert!(st.success(), "copying {}", img.display());
        }
        if let Some(img) = &spec.data_disk {
            copy_in(img, &dir.join("data.img"));
        }
        let xml = spec.domain_xml(&name, &dir, &kernel.image, &initrd, &machine);
        let mut guest = Guest { name, dir, spec, daemon, console: None, vsock_backend: None, xml, retired: Vec::new() };
        if guest.spec.transport == Transport::Vsock {
            guest.start_vsock_backend(3 + n);
        }
        fs::write(guest.dir.join("domain.xml"), &guest.xml).expect("write xml");
        let path = guest.dir.join("domain.xml");
        guest.daemon.virsh_ok(&["define", &path.to_string_lossy()]);
        guest
    }

    fn start_vsock_backend(&mut self, cid: u32) {
        let env = Env::get();
        let log = fs::File::create(self.dir.join("vhost-vsock.log")).expect("log");
        let child = Command::new(env.vhost_vsock())
            .arg("--guest-cid")
            .arg(cid.to_string())
            .arg("--socket")
            .arg(self.dir.join("vhu.sock"))
            .arg("--uds-path")
            .arg(self.dir.join("vsock.sock"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start vhost-device-vsock");
        fs::write(self.dir.join("vhost-vsock.pid"), child.id().to_string()).expect("pid");
        Wait::new("vhost-device-vsock to create its socket", Duration::from_secs(10))
            .every(Duration::from_millis(20))
            .until_blocking(|| self.dir.join("vhu.sock").exists().then_some(()))
            .unwrap_or_else(|e| panic!("{e}"));
        // QEMU (the unprivileged user) connects to the backend's socket itself:
        // it is handed to that user, as an operator would.
        let (uid, gid) = self.daemon.qemu_user().unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::chown(self.dir.join("vhu.sock"), Some(uid), Some(gid)).expect("chown vhu.sock");
        self.vsock_backend = Some(child);
    }

    /// Starts the defined domain without waiting for it to boot.
    pub fn start_nowait(&mut self) {
        let _ = fs::remove_file(self.dir.join("console.log"));
        self.console = None;
        self.daemon.virsh_ok(&["start", &self.name]);
    }

    /// Waits for a started domain's ready marker and connects its console.
    pub fn wait_ready(&mut self) {
        self.wait_boots(1);
    }

    /// Hard-resets the running guest (as a crash or `reboot -f` does; QEMU and its
    /// hot-plugged devices stay) and waits until it has booted again.
    pub fn reset(&mut self) {
        let boots = self.boots();
        self.console = None;
        self.daemon.virsh_ok(&["reset", &self.name]);
        self.wait_boots(boots + 1);
    }

    /// Reboots the guest from inside (the kernel's reboot(2), as `reboot -f`
    /// does; QEMU resets the machine and keeps its devices) and waits until it
    /// has booted again.
    pub fn guest_reboot(&mut self) {
        let boots = self.boots();
        self.sh("(sleep 1; reboot -f) >/dev/null 2>&1 & true");
        self.console = None;
        self.wait_boots(boots + 1);
    }

    /// Powers the guest off from inside (the kernel's power-off, as `poweroff
    /// -f` does: ACPI S5, QEMU exits) and waits until libvirt reports the
    /// domain shut off by its guest (`virsh domstate --reason`: shutdown).
    pub fn guest_poweroff(&mut self) -> String {
        self.sh("(sleep 1; poweroff -f) >/dev/null 2>&1 & true");
        self.console = None;
        let mut state = String::new();
        let off = Wait::new(format!("guest {} to power off", self.name), BOOT_TIMEOUT)
            .every(Duration::from_millis(200))
            .until_blocking(|| {
                state = self.daemon.virsh_ok(&["domstate", "--reason", &self.name]);
                state.starts_with("shut off").then(|| state.trim().to_string())
            });
        off.unwrap_or_else(|e| {
            self.dump_logs();
            panic!("{e}: {state}")
        })
    }

    /// Starts a live migration of this guest to a second private libvirtd on
    /// this machine — its own mount and UTS namespaces, host name and host
    /// UUID — over loopback TCP at most `bandwidth_mib` MiB/s (libvirt's
    /// `--bandwidth`; raise it with `virsh migrate-setspeed`). The definition
    /// moves with it (`--persistent --undefinesource`). What the destination's
    /// QEMU opens (kernel, initrd, console and agent sockets, logs) is in the
    /// destination's own directory: the migratable live and persistent XML are
    /// handed over with the paths moved there, as an operator would with
    /// `--xml` and `--persistent-xml`.
    pub fn start_migration(&mut self, bandwidth_mib: u64) -> Migration {
        assert!(self.spec.disk.is_none(), "a guest with a disk would need shared storage to migrate");
        assert!(
            self.spec.transport == Transport::Serial,
            "a vsock guest would need its vhost-user backend on the destination too: not modelled here"
        );
        let env = Env::get();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = vmplug::harness::workdir::fresh_dir(&env.work, &format!("{}-{n}", std::process::id()))
            .unwrap_or_else(|e| panic!("{e}"));
        let daemon = Libvirtd::start(env, &dir);
        for f in ["vmlinuz", "initrd.img"] {
            copy_in(&self.dir.join(f), &dir.join(f));
        }
        let (from, to) = (format!("{}/", self.dir.display()), format!("{}/", dir.display()));
        let live = self.daemon.virsh_ok(&["dumpxml", "--migratable", &self.name]).replace(&from, &to);
        let persistent =
            self.daemon.virsh_ok(&["dumpxml", "--inactive", "--migratable", &self.name]).replace(&from, &to);
        fs::write(dir.join("migrate-live.xml"), live).expect("write xml");
        fs::write(dir.join("migrate-persistent.xml"), persistent).expect("write xml");
        let virsh = Command::new("virsh")
            .arg("-c")
            .arg(&self.daemon.uri)
            .args(["migrate", "--live", "--persistent", "--undefinesource", "--xml"])
            .arg(dir.join("migrate-live.xml"))
            .arg("--persistent-xml")
            .arg(dir.join("migrate-persistent.xml"))
            .args(["--migrateuri", "tcp://127.0.0.1", "--bandwidth", &bandwidth_mib.to_string(), "--domain"])
            .arg(&self.name)
            .arg("--desturi")
            .arg(&daemon.uri)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run virsh migrate");
        Migration {
            virsh: Some(virsh),
            daemon: Some(daemon),
            domain: self.name.clone(),
            source_uri: self.daemon.uri.clone(),
        }
    }

    /// Waits for the migration to end; on success the guest is the
    /// destination's (its daemon, directory and console), the source's daemon
    /// kept until the guest is dropped. Panics with virsh's error otherwise.
    pub fn finish_migration(&mut self, mut m: Migration) {
        let out = m.virsh.take().expect("migration running").wait_with_output().expect("virsh migrate");
        if !out.status.success() {
            self.dump_logs();
            panic!("virsh migrate failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let dest = m.daemon.take().expect("destination");
        self.console = None;
        self.dir = dest.dir.clone();
        self.retired.push(std::mem::replace(&mut self.daemon, dest));
        self.reconnect_console();
    }

    /// How many times the guest reached its ready marker since it was started.
    fn boots(&self) -> usize {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default().matches(READY_MARKER).count()
    }

    fn wait_boots(&mut self, n: usize) {
        let booted = Wait::new(format!("guest {} to boot", self.name), BOOT_TIMEOUT)
            .every(Duration::from_millis(100))
            .until_blocking(|| (self.boots() >= n).then_some(()));
        if let Err(e) = booted {
            self.dump_logs();
            panic!("{e}");
        }
        match Console::connect(&self.dir.join("console.sock"), EXEC_TIMEOUT) {
            Ok(c) => self.console = Some(c),
            Err(e) => {
                self.dump_logs();
                panic!("guest {}: {e}", self.name);
            }
        }
    }

    /// Connects to the console of a guest that did not boot again (resumed,
    /// restored from a save): no ready marker is waited for.
    pub fn reconnect_console(&mut self) {
        self.console = None;
        match Console::connect(&self.dir.join("console.sock"), EXEC_TIMEOUT) {
            Ok(c) => self.console = Some(c),
            Err(e) => {
                self.dump_logs();
                panic!("guest {}: {e}", self.name);
            }
        }
    }

    /// Starts the defined domain and waits until its shell answers.
    pub fn start(&mut self) {
        self.start_nowait();
        self.wait_ready();
    }

    /// Destroys the running domain (its definition stays).
    pub fn destroy(&mut self) {
        self.console = None;
        let _ = self.daemon.virsh(&["destroy", &self.name]);
    }

    /// Runs a shell command in the guest; panics (with logs) on timeout.
    pub fn sh(&mut self, cmd: &str) -> String {
        match self.console.as_mut().expect("guest running").exec(cmd, EXEC_TIMEOUT) {
            Ok((_, out)) => out,
            Err(e) => {
                self.dump_logs();
                panic!("guest shell: {e}");
            }
        }
    }

    /// utime + stime of the guest agent, in clock ticks (1/100 s).
    pub fn agent_cpu_ticks(&mut self) -> u64 {
        let out = self.sh("cut -d' ' -f14,15 /proc/$(cat /run/agent.pid)/stat");
        out.split_whitespace().filter_map(|w| w.parse::<u64>().ok()).sum()
    }

    /// `/sys/devices/system/cpu/online` in the guest.
    pub fn online_cpus(&mut self) -> String {
        self.sh("cat /sys/devices/system/cpu/online")
    }

    /// `MemTotal` of the guest's /proc/meminfo, KiB.
    pub fn mem_total_kib(&mut self) -> u64 {
        let out = self.sh("grep MemTotal /proc/meminfo");
        out.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("MemTotal from '{out}'"))
    }

    /// (state, node) of `memoryN` as the guest's sysfs shows it.
    pub fn block(&mut self, index: u64) -> (String, Option<u32>) {
        let out = self.sh(&format!(
            "cat /sys/devices/system/memory/memory{index}/state; ls /sys/devices/system/memory/memory{index} | grep '^node'"
        ));
        let mut lines = out.lines();
        let state = lines.next().unwrap_or_default().trim().to_string();
        let node = lines.next().and_then(|l| l.trim().strip_prefix("node")?.parse().ok());
        (state, node)
    }

    /// Runs the real `vmplug` binary against this guest's daemon, quietly.
    pub fn vmplug_quiet(&self, args: &[&str]) -> Output {
        Command::new(&Env::get().vmplug).arg("-c").arg(&self.daemon.uri).args(args).output().expect("run vmplug")
    }

    /// Runs the real `vmplug` binary against this guest's daemon (debug logs on,
    /// command and output echoed for the test log).
    pub fn vmplug(&self, args: &[&str]) -> Output {
        let env = Env::get();
        let out = Command::new(&env.vmplug)
            .arg("-c")
            .arg(&self.daemon.uri)
            .args(args)
            .env("RUST_LOG", "vmplug=debug")
            .output()
            .expect("run vmplug");
        eprintln!(
            "$ vmplug {}\n[exit {}]\n{}{}",
            args.join(" "),
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts the real `vmplug` in the background (stdout and stderr piped), for
    /// tests that inject a fault while it runs.
    pub fn vmplug_spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(&Env::get().vmplug)
            .arg("-c")
            .arg(&self.daemon.uri)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmplug")
    }

    /// `vmplug … --json` parsed and checked against the envelope's schema;
    /// panics unless it exits 0.
    pub fn vmplug_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.vmplug(&a);
        assert!(out.status.success(), "vmplug {} failed", args.join(" "));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("vmplug --json prints JSON");
        crate::schema::assert_valid(&doc, &a);
        doc
    }

    /// A grown virtio-mem device of a report (`d`, one of its `virtio_mem`)
    /// holds `bytes`: libvirt's `<current>` says so, or the guest's blocks
    /// proved it while libvirt's view lagged (`current_lags`), and then
    /// libvirt's view catches up within 5 s (QEMU reports a device's size at
    /// most once a second). Returns whether it lagged.
    pub fn assert_vmem_holds(&self, d: &serde_json::Value, bytes: u64) -> bool {
        assert_eq!(d["requested"].as_u64(), Some(bytes), "requested: {d}");
        if d["current_lags"] != true {
            assert_eq!(d["current"].as_u64(), Some(bytes), "libvirt's current: {d}");
            return false;
        }
        assert!(d["current"].as_u64().is_some_and(|c| c < bytes), "a lag is a current short of the size: {d}");
        let alias = d["device"].as_str().expect("device");
        let name = self.name.clone();
        crate::procs::wait_for(
            &format!("libvirt's <current> of {alias} to reach {bytes}"),
            Duration::from_secs(5),
            || {
                let st = self.vmplug_json(&["status", &name]);
                let v = st["virtio_mem"].as_array()?.iter().find(|v| v["alias"] == alias)?.clone();
                (v["current"].as_u64() == Some(bytes)).then_some(())
            },
        );
        true
    }

    /// `vmplug autoscale --once` with `policy` (TOML): its JSON events.
    pub fn autoscale_once(&self, policy: &str) -> Vec<serde_json::Value> {
        let path = self.dir.join("policy.toml");
        fs::write(&path, policy).expect("policy");
        let out = self.vmplug(&["autoscale", "--policy", &path.to_string_lossy(), "--once"]);
        assert!(out.status.success(), "autoscale --once failed");
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON event")).collect()
    }

    /// The QEMU process of the running domain.
    pub fn qemu_pid(&self) -> i32 {
        let pidfile = self.dir.join(format!("lib/qemu/{}.pid", self.name));
        let pidfile = if pidfile.exists() { pidfile } else { self.dir.join(format!("run/qemu/{}.pid", self.name)) };
        fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()))
            .trim()
            .parse()
            .expect("pid")
    }

    pub fn dump_logs(&mut self) {
        eprintln!(
            "===== {} console =====\n{}",
            self.name,
            fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
        );
        if let Some(c) = self.console.as_mut() {
            if let Ok((_, log)) = c.exec("tail -n 80 /tmp/agent.log", Duration::from_secs(10)) {
                eprintln!("===== agent log =====\n{log}");
            }
        }
        let qemu_log = self.dir.join(format!("log/qemu/{}.log", self.name));
        eprintln!("===== qemu log =====\n{}", fs::read_to_string(qemu_log).unwrap_or_default());
        eprintln!("===== libvirtd log (tail) =====");
        eprintln!("{}", self.daemon.log_tail(40));
        if self.vsock_backend.is_some() {
            eprintln!(
                "===== vhost-device-vsock =====\n{}",
                fs::read_to_string(self.dir.join("vhost-vsock.log")).unwrap_or_default()
            );
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.console = None;
        let _ = self.daemon.virsh(&["destroy", &self.name]);
        self.daemon.stop();
        for d in &mut self.retired {
            d.stop();
            if std::env::var_os("VMPLUG_KEEP").is_none() && !std::thread::panicking() {
                let _ = fs::remove_dir_all(&d.dir);
            }
        }
        if let Some(mut child) = self.vsock_backend.take() {
            stop_pid(child.id() as i32, Duration::from_secs(5));
            let _ = child.wait();
        }
        if std::env::var_os("VMPLUG_KEEP").is_none() && !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        give_slot();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The suite's guests through the one writer: what each spec asks is in
    /// the definition vmplug itself reads.
    #[test]
    fn a_test_guests_definition_says_what_its_spec_asks() {
        let spec = GuestSpec {
            vcpus: 2,
            max_vcpus: 4,
            cells_mib: vec![384, 384],
            transport: Transport::Vsock,
            cmdline_extra: "memhp_default_state=offline".into(),
            disk: Some(PathBuf::from("/img")),
            virtio_mem: vec![(1, 1024)],
            nic_queues: Some(4),
            ..GuestSpec::default()
        };
        let dir = std::path::Path::new("/run/g");
        let xml = spec.domain_xml("g1", dir, "/run/g/vmlinuz".as_ref(), "/run/g/initrd.img".as_ref(), "q35");
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
        let f = vmplug::xml::DomainFacts::parse(&xml).expect("vmplug reads it");
        assert_eq!((f.vcpus_current, f.vcpus_max, f.cells.len(), f.slots), (2, 4, 2, Some(8)));
        assert_eq!(f.virtio_mems.len(), 1);
        assert_eq!(f.channels.get(SERIAL_NAME).cloned().flatten().as_deref(), Some("/run/g/agent.sock"));
        let cmdline = doc.descendants().find(|n| n.has_tag_name("cmdline")).and_then(|n| n.text()).unwrap_or_default();
        assert_eq!(cmdline, "console=ttyS0 quiet loglevel=1 panic=-1 vmplug.root=/dev/vda memhp_default_state=offline");
        assert!(
            xml.contains("<qemu:arg value='vhost-user-vsock-pci,chardev=vmplugvsock,bus=pcie.0,addr=0x10'/>"),
            "{xml}"
        );
        assert!(xml.contains("<memoryBacking><source type='memfd'/>") && xml.contains("port='"), "{xml}");
        assert!(xml.contains("<driver name='qemu' queues='4'/>"), "{xml}");
        assert!(xml.starts_with("<domain type='qemu' xmlns:qemu="), "{xml}");

        let arm =
            GuestSpec { kernel: GuestKernel::Arm64Acpi, plain: true, libvirt_channel: true, ..GuestSpec::default() };
        let xml = arm.domain_xml("g2", dir, "/k".as_ref(), "/i".as_ref(), "virt-9.2");
        let f = vmplug::xml::DomainFacts::parse(&xml).expect("vmplug reads it");
        assert_eq!((f.vcpus_current, f.max_memory, f.cells.len()), (1, None, 0));
        assert_eq!(f.channels.get(SERIAL_NAME).cloned(), Some(None), "libvirt places the socket");
        assert!(xml.contains("console=ttyAMA0 quiet loglevel=1 panic=-1 acpi=force</cmdline>"), "{xml}");
        assert!(xml.contains("AAVMF_CODE.fd") && xml.contains("<domain type='qemu'>"), "{xml}");
    }
}
