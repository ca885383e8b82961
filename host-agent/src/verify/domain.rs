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

/// Everything the plain definition needs.
#[derive(Debug, Clone)]
pub struct Plain<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    pub arch: Arch,
    pub machine: &'a str,
    pub accel: &'a Accel,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub boot: &'a DirectBoot,
    pub agent_channel: &'a str,
    /// The format of the run's private copy of the image (`disk` in `dir`).
    pub disk_format: &'a str,
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

/// A definition as an operator would write it without hot-plug in mind (every
/// vCPU present, no `<maxMemory>`, no guest NUMA): `prepare` makes it ready.
pub fn plain_xml(p: &Plain) -> String {
    let d = esc(&p.dir.display().to_string());
    let (firmware, features, cpu, emulator) = match p.arch {
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
    let cpu = if p.accel.kind == "kvm" {
        "<cpu mode='host-passthrough' check='none'/>".to_string()
    } else {
        format!("<cpu mode='custom' match='exact' check='none'><model fallback='allow'>{cpu}</model></cpu>")
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
    format!(
        "<domain type='{virt}'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu placement='static'>{vcpus}</vcpu>
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
    <disk type='file' device='disk'>
      <driver name='qemu' type='{disk_format}'/>
      <source file='{d}/disk'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='unix'>
      <source mode='bind' path='{d}/console.sock'/>
      <log file='{d}/console.log' append='on'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='{d}/agent.sock'/>
      <target type='virtio' name='{channel}'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
",
        virt = p.accel.domain_type(),
        name = esc(p.name),
        mem = p.memory_mib,
        vcpus = p.vcpus,
        arch = p.arch.name(),
        machine = esc(p.machine),
        channel = esc(p.agent_channel),
        disk_format = esc(p.disk_format),
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

    #[test]
    fn the_plain_definition_is_escaped_and_boots_what_it_was_given() {
        let accel = Accel { kind: "tcg", reason: String::new() };
        let boot = DirectBoot { kernel: Some("/k&1".into()), initrd: None, append: Some("a<b".into()) };
        let p = Plain {
            name: "n",
            dir: Path::new("/w/a'b&c"),
            arch: Arch::X86_64,
            machine: "q35",
            accel: &accel,
            memory_mib: 1024,
            vcpus: 1,
            boot: &boot,
            agent_channel: "org.vmplug.guest.0",
            disk_format: "raw",
        };
        let xml = plain_xml(&p);
        assert!(roxmltree::Document::parse(&xml).is_ok(), "{xml}");
        assert!(xml.contains("<kernel>/k&amp;1</kernel>") && xml.contains("console=ttyS0 a&lt;b"));
        assert!(xml.contains("<domain type='qemu'>") && !xml.contains("<initrd>"));
        // The work directory cannot end an attribute, and the disk's chain ends
        // where libvirt is told: nothing the image names is followed.
        assert!(xml.contains("<source file='/w/a&apos;b&amp;c/disk'/>\n      <backingStore/>"), "{xml}");
        assert!(xml.contains("<driver name='qemu' type='raw'/>"));
        let disk = DirectBoot::default();
        assert!(plain_xml(&Plain { boot: &disk, ..p }).contains("<boot dev='hd'/>"));
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
