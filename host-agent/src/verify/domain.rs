//! The throwaway guest of `verify-image`: which accelerator, the image's
//! overlay, and the plain definition `prepare` then makes hot-plug-ready.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The guest's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The serial console device the kernel writes to.
    pub fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when it is usable here, TCG otherwise.
    Auto,
    /// KVM; refused, with the reason, when it is not usable here.
    Kvm,
    /// TCG (QEMU's emulation): slower, works everywhere.
    Tcg,
}

/// The accelerator the guest runs under, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Accel {
    /// `kvm` or `tcg`.
    pub kind: &'static str,
    pub reason: String,
}

impl Accel {
    pub fn domain_type(&self) -> &'static str {
        if self.kind == "kvm" {
            "kvm"
        } else {
            "qemu"
        }
    }
}

/// Whether KVM can run a stock guest kernel of `arch` on this host. `/dev/kvm`
/// alone is not enough: on a PVM host (kvm_pvm, no VMX/SVM) it exists, libvirt
/// offers it, and a stock guest kernel hangs under it (measured here).
/// The machine type a guest of `arch` gets unless one is given: q35 on x86,
/// and on aarch64 the newest versioned `virt` that libvirt's host capabilities
/// offer (`caps`, read only then; never a hard-coded version). `Ok(None)`: the
/// capabilities offer none. The one chooser for verify-image and the e2e suite.
pub fn default_machine<E>(arch: Arch, caps: impl FnOnce() -> Result<String, E>) -> Result<Option<String>, E> {
    match arch {
        Arch::X86_64 => Ok(Some("q35".into())),
        Arch::Aarch64 => {
            let machines = crate::xml::HostFacts::parse_machines(&caps()?, "aarch64");
            Ok(crate::xml::newest_versioned(&machines, "virt").map(str::to_string))
        }
    }
}

pub fn kvm_usable(arch: Arch) -> Result<(), String> {
    if Arch::host() != Some(arch) {
        return Err(format!(
            "the host is {}, the guest {}: KVM runs only the host's architecture",
            std::env::consts::ARCH,
            arch.name()
        ));
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Err(format!("/dev/kvm cannot be opened read-write: {e}"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err("/dev/kvm is PVM-based (the kvm_pvm module): stock guest kernels hang under it".into());
    }
    if arch == Arch::X86_64 {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or_default();
        if !flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
            return Err(
                "the host CPU shows neither vmx nor svm: /dev/kvm has no hardware virtualisation behind it".into()
            );
        }
    }
    Ok(())
}

/// Picks the accelerator: `Auto` takes KVM only when [`kvm_usable`] says so.
pub fn pick_accel(choice: AccelChoice, arch: Arch) -> Result<Accel, String> {
    match (choice, kvm_usable(arch)) {
        (AccelChoice::Tcg, _) => Ok(Accel { kind: "tcg", reason: "asked for (--accel tcg)".into() }),
        (AccelChoice::Kvm, Ok(())) | (AccelChoice::Auto, Ok(())) => {
            Ok(Accel { kind: "kvm", reason: "/dev/kvm is usable".into() })
        }
        (AccelChoice::Kvm, Err(why)) => Err(format!("--accel kvm: {why}")),
        (AccelChoice::Auto, Err(why)) => Ok(Accel { kind: "tcg", reason: why }),
    }
}

/// Where the guest's kernel comes from.
#[derive(Debug, Clone, Default)]
pub struct DirectBoot {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
}

/// A disk of the guest: a file in its work directory.
#[derive(Debug, Clone, Copy)]
pub struct Disk<'a> {
    /// The file's name in the work directory.
    pub file: &'a str,
    /// Its format (`raw`, `qcow2`); its chain ends here (`<backingStore/>`):
    /// nothing an image names is followed.
    pub format: &'a str,
    pub dev: &'a str,
    pub readonly: bool,
}

/// What makes a definition hot-plug-ready from the start: vCPUs up to `max_vcpus`
/// (one socket each), guest NUMA cells, and `<maxMemory>` with slots.
#[derive(Debug, Clone, Copy)]
pub struct Hotplug<'a> {
    pub max_vcpus: u32,
    /// Each cell's initial memory (MiB); the vCPUs are split evenly over them.
    pub cells_mib: &'a [u64],
    pub slots: u32,
    pub max_memory_mib: u64,
}

/// Test-only parts, already XML, written where they belong: the vsock
/// backend's `<metadata>`, `<memoryBacking>` and QEMU arguments, more devices.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    pub metadata: String,
    pub memory_backing: String,
    pub devices: String,
    /// `<qemu:arg>` elements (the QEMU namespace is declared when there are any).
    pub qemu_args: String,
}

/// A guest definition: verify-image's throwaway guest and the e2e suite's test
/// guests differ only in these. [`domain_xml`] is the one writer of either.
#[derive(Debug, Clone)]
pub struct Definition<'a> {
    pub name: &'a str,
    /// The work directory: the console's socket and log, the agent's socket and
    /// the disks are there.
    pub dir: &'a Path,
    pub arch: Arch,
    pub machine: &'a str,
    /// KVM (host CPU passed through) or TCG (the architecture's generic CPU).
    pub kvm: bool,
    /// The initial memory (MiB): the cells' sum when hot-plug-ready.
    pub memory_mib: u64,
    /// vCPUs present at boot.
    pub vcpus: u32,
    /// `None`: plain, as an operator writes it without hot-plug in mind (every
    /// vCPU present, no `<maxMemory>`, no guest NUMA): `prepare` makes it ready.
    pub hotplug: Option<Hotplug<'a>>,
    pub boot: &'a DirectBoot,
    pub disks: Vec<Disk<'a>>,
    /// The agent's virtio-serial channel name.
    pub agent_channel: &'a str,
    /// The channel's socket is `agent.sock` in the work directory; else libvirt
    /// places it under its own channel directory (as `prepare` leaves it).
    pub channel_in_dir: bool,
    pub extras: Extras,
}

/// The kernel command line: the operator's, with the serial console added
/// when it names none (the console shell reads sysfs through it).
pub fn cmdline(arch: Arch, append: Option<&str>) -> String {
    let base = match arch {
        Arch::X86_64 => "root=/dev/vda".to_string(),
        Arch::Aarch64 => "root=/dev/vda acpi=force".to_string(),
    };
    let line = append.map(str::to_string).unwrap_or(base);
    if line.split_whitespace().any(|w| w.starts_with("console=")) {
        line
    } else {
        format!("console={} {line}", arch.console())
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// Guest NUMA cells over `max` vCPUs: the vCPUs split evenly, the last cell
/// taking the remainder.
fn cells_xml(max: u32, cells_mib: &[u64]) -> String {
    let n = cells_mib.len().max(1) as u32;
    let per = max / n;
    let mut out = String::new();
    for (i, mib) in cells_mib.iter().enumerate() {
        let i = i as u32;
        let last = if i + 1 == n { max - 1 } else { (i + 1) * per - 1 };
        out.push_str(&format!("<cell id='{i}' cpus='{}-{last}' memory='{mib}' unit='MiB'/>", i * per));
    }
    out
}

/// The definition's XML. aarch64 boots through UEFI (AAVMF, which libvirt
/// requires for ACPI there) and still takes the kernel from `<kernel>`.
pub fn domain_xml(p: &Definition) -> String {
    let d = esc(&p.dir.display().to_string());
    let (firmware, features, model, emulator) = match p.arch {
        Arch::X86_64 => (String::new(), "<acpi/><apic/>", "qemu64", "qemu-system-x86_64"),
        Arch::Aarch64 => (
            "<loader readonly='yes' type='pflash'>/usr/share/AAVMF/AAVMF_CODE.fd</loader>\
             <nvram template='/usr/share/AAVMF/AAVMF_VARS.fd'/>"
                .to_string(),
            "<acpi/><gic version='3'/>",
            "cortex-a57",
            "qemu-system-aarch64",
        ),
    };
    let (vcpu, max_memory, numa) = match &p.hotplug {
        None => (format!("<vcpu placement='static'>{}</vcpu>", p.vcpus), String::new(), String::new()),
        Some(h) => (
            format!("<vcpu placement='static' current='{}'>{}</vcpu>", p.vcpus, h.max_vcpus),
            format!("<maxMemory slots='{}' unit='MiB'>{}</maxMemory>", h.slots, h.max_memory_mib),
            format!(
                "<topology sockets='{}' dies='1' clusters='1' cores='1' threads='1'/><numa>{}</numa>",
                h.max_vcpus,
                cells_xml(h.max_vcpus, h.cells_mib)
            ),
        ),
    };
    let cpu = match (p.kvm, numa.is_empty()) {
        (true, true) => "<cpu mode='host-passthrough' check='none'/>".to_string(),
        (true, false) => format!("<cpu mode='host-passthrough' check='none'>{numa}</cpu>"),
        (false, _) => {
            format!("<cpu mode='custom' match='exact' check='none'><model fallback='allow'>{model}</model>{numa}</cpu>")
        }
    };
    let boot = match &p.boot.kernel {
        Some(k) => format!(
            "<kernel>{}</kernel>{}<cmdline>{}</cmdline>",
            esc(&k.display().to_string()),
            p.boot
                .initrd
                .as_ref()
                .map(|i| format!("<initrd>{}</initrd>", esc(&i.display().to_string())))
                .unwrap_or_default(),
            esc(&cmdline(p.arch, p.boot.append.as_deref()))
        ),
        None => "<boot dev='hd'/>".to_string(),
    };
    let disks: String = p
        .disks
        .iter()
        .map(|k| {
            format!(
                "<disk type='file' device='disk'>
      <driver name='qemu' type='{format}'/>
      <source file='{d}/{file}'/>
      <backingStore/>
      <target dev='{dev}' bus='virtio'/>{ro}
    </disk>
    ",
                format = esc(k.format),
                file = esc(k.file),
                dev = esc(k.dev),
                ro = if k.readonly { "<readonly/>" } else { "" },
            )
        })
        .collect();
    let channel = if p.channel_in_dir {
        format!("<source mode='bind' path='{d}/agent.sock'/>")
    } else {
        "<source mode='bind'/>".into()
    };
    let e = &p.extras;
    let (ns, qemu) = if e.qemu_args.is_empty() {
        ("", String::new())
    } else {
        (
            " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'",
            format!("<qemu:commandline>{}</qemu:commandline>", e.qemu_args),
        )
    };
    format!(
        "<domain type='{virt}'{ns}>
  <name>{name}</name>
  {metadata}
  <memory unit='MiB'>{mem}</memory>
  {max_memory}
  {vcpu}
  {backing}
  <os>
    <type arch='{arch}' machine='{machine}'>hvm</type>
    {firmware}
    {boot}
  </os>
  <features>{features}</features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/{emulator}</emulator>
    {disks}<serial type='unix'>
      <source mode='bind' path='{d}/console.sock'/>
      <log file='{d}/console.log' append='on'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      {channel}
      <target type='virtio' name='{channel_name}'/>
    </channel>
    {devices}
    <memballoon model='none'/>
  </devices>
  {qemu}
</domain>
",
        virt = if p.kvm { "kvm" } else { "qemu" },
        name = esc(p.name),
        metadata = e.metadata,
        mem = p.memory_mib,
        backing = e.memory_backing,
        arch = p.arch.name(),
        machine = esc(p.machine),
        channel_name = esc(p.agent_channel),
        devices = e.devices,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_added_only_when_the_command_line_names_none() {
        assert_eq!(cmdline(Arch::X86_64, None), "console=ttyS0 root=/dev/vda");
        assert_eq!(cmdline(Arch::Aarch64, None), "console=ttyAMA0 root=/dev/vda acpi=force");
        assert_eq!(cmdline(Arch::X86_64, Some("console=hvc0 root=LABEL=r")), "console=hvc0 root=LABEL=r");
        assert_eq!(cmdline(Arch::X86_64, Some("vmplug.root=/dev/vda")), "console=ttyS0 vmplug.root=/dev/vda");
    }

    #[test]
    fn tcg_is_forced_or_explained() {
        let a = pick_accel(AccelChoice::Tcg, Arch::X86_64).expect("tcg is always possible");
        assert_eq!((a.kind, a.domain_type()), ("tcg", "qemu"));
        let foreign = if Arch::host() == Some(Arch::Aarch64) { Arch::X86_64 } else { Arch::Aarch64 };
        let a = pick_accel(AccelChoice::Auto, foreign).expect("auto falls back");
        assert_eq!(a.kind, "tcg");
        assert!(a.reason.contains("only the host's architecture"), "{}", a.reason);
        assert!(pick_accel(AccelChoice::Kvm, foreign).is_err(), "kvm for a foreign architecture is refused");
    }

    fn plain<'a>(accel_kvm: bool, boot: &'a DirectBoot, dir: &'a Path) -> Definition<'a> {
        Definition {
            name: "n",
            dir,
            arch: Arch::X86_64,
            machine: "q35",
            kvm: accel_kvm,
            memory_mib: 1024,
            vcpus: 1,
            hotplug: None,
            boot,
            disks: vec![Disk { file: "disk", format: "raw", dev: "vda", readonly: false }],
            agent_channel: "org.vmplug.guest.0",
            channel_in_dir: true,
            extras: Extras::default(),
        }
    }

    #[test]
    fn the_plain_definition_is_escaped_and_boots_what_it_was_given() {
        let boot = DirectBoot { kernel: Some("/k&1".into()), initrd: None, append: Some("a<b".into()) };
        let p = plain(false, &boot, Path::new("/w/a'b&c"));
        let xml = domain_xml(&p);
        assert!(roxmltree::Document::parse(&xml).is_ok(), "{xml}");
        assert!(xml.contains("<kernel>/k&amp;1</kernel>") && xml.contains("console=ttyS0 a&lt;b"));
        assert!(xml.contains("<domain type='qemu'>") && !xml.contains("<initrd>"));
        // The work directory cannot end an attribute, and the disk's chain ends
        // where libvirt is told: nothing the image names is followed.
        assert!(xml.contains("<source file='/w/a&apos;b&amp;c/disk'/>\n      <backingStore/>"), "{xml}");
        assert!(xml.contains("<driver name='qemu' type='raw'/>"));
        assert!(!xml.contains("maxMemory") && !xml.contains("<numa>") && !xml.contains("qemu:"), "{xml}");
        let disk = DirectBoot::default();
        assert!(domain_xml(&Definition { boot: &disk, ..p }).contains("<boot dev='hd'/>"));
    }

    #[test]
    fn a_hot_plug_ready_definition_has_cells_slots_and_its_extras() {
        let boot = DirectBoot { kernel: Some("/k".into()), initrd: Some("/i".into()), append: None };
        let cells = [512, 256];
        let p = Definition {
            hotplug: Some(Hotplug { max_vcpus: 5, cells_mib: &cells, slots: 8, max_memory_mib: 8192 }),
            memory_mib: 768,
            vcpus: 2,
            channel_in_dir: false,
            extras: Extras {
                qemu_args: "<qemu:arg value='-x'/>".into(),
                devices: "<rng model='virtio'/>".into(),
                ..Extras::default()
            },
            ..plain(true, &boot, Path::new("/w"))
        };
        let xml = domain_xml(&p);
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
        let facts = crate::xml::DomainFacts::parse(&xml).expect("vmplug reads it");
        assert_eq!((facts.vcpus_current, facts.vcpus_max, facts.slots), (2, 5, Some(8)));
        let cpus: Vec<String> = facts.cells.iter().map(|c| format!("{}:{}", c.id, c.memory)).collect();
        assert_eq!(cpus, ["0:512 MiB", "1:256 MiB"]);
        assert!(xml.contains("<cell id='0' cpus='0-1'") && xml.contains("<cell id='1' cpus='2-4'"), "{xml}");
        assert!(xml.contains("<cpu mode='host-passthrough' check='none'><topology"), "{xml}");
        assert!(xml.contains("<channel type='unix'>\n      <source mode='bind'/>"), "{xml}");
        assert!(doc.descendants().any(|n| n.has_tag_name("rng")));
        assert!(xml.contains("<qemu:commandline><qemu:arg value='-x'/></qemu:commandline>"), "{xml}");
    }

    #[test]
    fn the_machine_is_q35_on_x86_and_the_newest_versioned_virt_on_aarch64() {
        let caps = "<capabilities><host/><guest><os_type>hvm</os_type><arch name='aarch64'>\
            <machine maxCpus='512'>virt-9.2</machine><machine canonical='virt-10.0' maxCpus='512'>virt</machine>\
            <machine maxCpus='512'>virt-10.0</machine><machine maxCpus='512'>virt-4.1</machine></arch></guest>\
            <guest><os_type>hvm</os_type><arch name='x86_64'><machine>virt-99.0</machine></arch></guest></capabilities>";
        let pick = |arch| default_machine(arch, || Ok::<_, ()>(caps.to_string())).expect("no error");
        assert_eq!(pick(Arch::Aarch64).as_deref(), Some("virt-10.0"));
        assert_eq!(pick(Arch::X86_64).as_deref(), Some("q35"));
        let none = default_machine(Arch::Aarch64, || Ok::<_, ()>("<capabilities/>".into()));
        assert_eq!(none, Ok(None));
        let unread = default_machine(Arch::X86_64, || Err("not read"));
        assert_eq!(unread, Ok(Some("q35".into())), "x86 never reads the capabilities");
    }
}
