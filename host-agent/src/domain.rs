//! The hypervisor boundary: exactly the verbs vmplug uses, behind two narrow
//! traits. `libvirt` implements them on the `virt` crate; `fake` in memory for
//! unit tests. Raw libvirt flags and cpumaps never leave this module.

use vmplug_common::CpuSet;

/// Where a change applies, as virsh's `--live`, `--config`, `--current`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Affect {
    /// The running domain (`--live`).
    Live,
    /// The persistent definition (`--config`).
    Config,
    /// Both (`--live --config`).
    Both,
    /// Live if running, else config (`--current`, virsh's default).
    Current,
}

impl Affect {
    /// From virsh-style flags.
    pub fn from_flags(live: bool, config: bool, current: bool) -> Result<Affect, DomainError> {
        match (live, config, current) {
            (_, _, true) if live || config => {
                Err(DomainError::Usage("--current is exclusive with --live and --config".into()))
            }
            (true, true, _) => Ok(Affect::Both),
            (true, false, _) => Ok(Affect::Live),
            (false, true, _) => Ok(Affect::Config),
            (false, false, _) => Ok(Affect::Current),
        }
    }

    /// Resolves `Current` against the domain's state.
    pub fn resolve(self, running: bool) -> Affect {
        match self {
            Affect::Current if running => Affect::Live,
            Affect::Current => Affect::Config,
            a => a,
        }
    }

    pub fn live(self) -> bool {
        matches!(self, Affect::Live | Affect::Both)
    }

    pub fn config(self) -> bool {
        matches!(self, Affect::Config | Affect::Both)
    }
}

/// Scheduler parameters of the guide's `virsh schedinfo` listing.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SchedParams {
    pub scheduler: String,
    pub cpu_shares: Option<u64>,
    pub vcpu_period: Option<u64>,
    pub vcpu_quota: Option<i64>,
    pub emulator_period: Option<u64>,
    pub emulator_quota: Option<i64>,
    pub global_period: Option<u64>,
    pub global_quota: Option<i64>,
    pub iothread_period: Option<u64>,
    pub iothread_quota: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NumaMode {
    Strict,
    Preferred,
    Interleave,
    Restrictive,
}

impl NumaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NumaMode::Strict => "strict",
            NumaMode::Preferred => "preferred",
            NumaMode::Interleave => "interleave",
            NumaMode::Restrictive => "restrictive",
        }
    }
}

impl std::str::FromStr for NumaMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(NumaMode::Strict),
            "preferred" => Ok(NumaMode::Preferred),
            "interleave" => Ok(NumaMode::Interleave),
            "restrictive" => Ok(NumaMode::Restrictive),
            o => Err(format!("unknown numatune mode '{o}' (strict, preferred, interleave, restrictive)")),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct NumaParams {
    pub mode: Option<NumaMode>,
    pub nodeset: Option<CpuSet>,
}

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("domain '{0}' not found")]
    NotFound(String),
    #[error("domain '{0}' is not running")]
    NotRunning(String),
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("libvirt: {op} on '{domain}' failed: {message}")]
    Libvirt { domain: String, op: &'static str, message: String },
    #[error("{0}")]
    Other(String),
}

/// Why a domain is paused, as far as vmplug's messages need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PauseReason {
    /// `virsh suspend`.
    User,
    /// A migration (the source pauses at its end; post-copy on either side).
    Migration,
    /// Saving, dumping or snapshotting the domain.
    SaveOrSnapshot,
    /// An I/O error of a disk set to pause on errors.
    IoError,
    /// Its watchdog fired with action pause.
    Watchdog,
    /// The guest crashed (on_crash preserve).
    Crashed,
    /// Starting up (before its CPUs first run).
    StartingUp,
    Other,
}

/// A domain's state (`virsh domstate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    Running,
    /// Running, blocked on a resource (Xen's view; QEMU reports running).
    Blocked,
    Paused(PauseReason),
    ShuttingDown,
    ShutOff,
    /// Crashed and kept (on_crash preserve).
    Crashed,
    /// Suspended by the guest's power management (S3/S4).
    PmSuspended,
    /// The driver does not say.
    NoState,
}

impl DomainState {
    /// The guest's CPUs run: an agent in it can answer.
    pub fn guest_runs(self) -> bool {
        matches!(self, DomainState::Running | DomainState::Blocked | DomainState::NoState)
    }

    /// As virsh says it.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused(_) => "paused",
            DomainState::ShuttingDown => "in shutdown",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::PmSuspended => "pmsuspended",
            DomainState::NoState => "no state",
        }
    }
}

/// Which XML to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XmlView {
    Live,
    Inactive,
}

/// A UUID as virsh takes it: 32 hex digits, dashes anywhere between them.
pub fn looks_like_uuid(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_hexdigit() || c == '-') && s.chars().filter(char::is_ascii_hexdigit).count() == 32
}

/// An active domain as one bulk listing shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub dom: std::sync::Arc<dyn Domain>,
    /// Its ID while it runs: a new one after every start.
    pub id: Option<u32>,
    pub state: DomainState,
    /// A hash of what the listing reports that changes with the live XML
    /// (current vCPUs, memory total); 0 when the driver reports none of it.
    pub fingerprint: u64,
}

/// A libvirt connection: host facts and domain lookup.
pub trait Connection: Send + Sync + std::fmt::Debug {
    fn uri(&self) -> String;
    fn capabilities(&self) -> Result<String, DomainError>;
    /// Domain capabilities for an emulator/arch/machine/virt type.
    fn domain_capabilities(&self, arch: &str, machine: &str, virt_type: &str) -> Result<String, DomainError>;
    /// Free bytes on each host NUMA node.
    fn cells_free_memory(&self, nodes: u32) -> Result<Vec<u64>, DomainError>;
    /// The domain by name, else (as virsh) by a running domain's numeric ID,
    /// else by UUID; the domain found answers `name()` with its real name.
    fn lookup(&self, name: &str) -> Result<std::sync::Arc<dyn Domain>, DomainError>;
    fn list_domains(&self) -> Result<Vec<String>, DomainError>;
    /// The active domains with their handles and states, from one listing (no
    /// lookup by name after it). This default, for connections without a bulk
    /// listing, looks each one up.
    fn list_running(&self) -> Result<Vec<Listed>, DomainError> {
        let mut out = Vec::new();
        for name in self.list_domains()? {
            let Ok(dom) = self.lookup(&name) else { continue };
            if !dom.is_active().unwrap_or(false) {
                continue;
            }
            let Ok(state) = dom.state() else { continue };
            out.push(Listed { dom, id: None, state, fingerprint: 0 });
        }
        Ok(out)
    }
    /// Defines (or redefines) a domain's persistent configuration.
    fn define(&self, xml: &str) -> Result<(), DomainError>;
}

/// One domain.
pub trait Domain: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &str;
    fn is_active(&self) -> Result<bool, DomainError>;
    /// Running, paused, shutting down, … (`virsh domstate --reason`).
    fn state(&self) -> Result<DomainState, DomainError>;
    fn xml(&self, view: XmlView) -> Result<String, DomainError>;
    /// A migration, save or snapshot job is running.
    fn job_running(&self) -> Result<bool, DomainError>;
    fn set_vcpus(&self, count: u32, affect: Affect) -> Result<(), DomainError>;
    fn attach_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError>;
    fn detach_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError>;
    /// Changes a device in place (`virsh update-device`; a virtio-mem device's
    /// `<requested>` size).
    fn update_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError>;
    fn scheduler(&self, affect: Affect) -> Result<SchedParams, DomainError>;
    fn set_scheduler(&self, params: &SchedParams, affect: Affect) -> Result<(), DomainError>;
    fn pin_emulator(&self, cpus: &CpuSet, host_cpus: u32, affect: Affect) -> Result<(), DomainError>;
    fn pin_vcpu(&self, vcpu: u32, cpus: &CpuSet, host_cpus: u32, affect: Affect) -> Result<(), DomainError>;
    fn numa(&self, affect: Affect) -> Result<NumaParams, DomainError>;
    fn set_numa(&self, params: &NumaParams, affect: Affect) -> Result<(), DomainError>;
    /// The metadata element of namespace `ns` in one view, as libvirt returns
    /// it (namespace stripped); `None` when the domain has none
    /// (`virsh metadata --uri NS`).
    fn metadata(&self, ns: &str, view: XmlView) -> Result<Option<String>, DomainError>;
    /// Sets (`Some`) or removes (`None`) the metadata element of namespace `ns`,
    /// written with prefix `key`; it replaces the namespace's element, if any
    /// (`virsh metadata --uri NS --key KEY --set XML | --remove`). `affect` is
    /// `Live` or `Config`, or `Both`.
    fn set_metadata(&self, ns: &str, key: &str, element: Option<&str>, affect: Affect) -> Result<(), DomainError>;
}
