//! Command line: verbs mirror virsh (same names, same --live/--config/--current).

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmplug_common::protocol::ZonePolicy;
use vmplug_common::{Bytes, CpuSet};

use crate::autoscale::{Host, Policy, PolicyError};
use crate::domain::{Connection, DomainError, NumaMode, NumaParams};
use crate::link::AgentAddr;
use crate::ops::{self, MemoryOpts};
use crate::preflight::Severity;
use crate::report::{Envelope, OpReport, Outcome as ReportOutcome};
use crate::tune::{self, Refused, TuneError};
use crate::verb::{self, Verb, VerbArgs};

#[derive(Parser, Debug)]
#[command(
    name = "vmplug",
    version,
    disable_version_flag = true,
    about = "Grow running VMs through libvirt and prove the guest uses what it was given"
)]
pub struct Cli {
    /// Print the version (-v as virsh -v, -V as other tools).
    #[arg(short = 'v', short_alias = 'V', long, action = clap::ArgAction::Version)]
    pub version: Option<bool>,
    /// libvirt URI (as virsh -c); default: LIBVIRT_DEFAULT_URI, then libvirt's default.
    #[arg(short = 'c', long = "connect", global = true)]
    pub connect: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

pub use vmplug_common::size::parse_size;

/// A CPU or node list on the command line (`0-3,8`, `0-7,^2`): never empty.
pub fn parse_set(s: &str) -> Result<CpuSet, String> {
    let set: CpuSet = s.parse().map_err(|e: vmplug_common::CpuSetError| e.to_string())?;
    if set.is_empty() {
        return Err(format!("'{s}' names no CPU or node (an exclusion such as ^1 alone excludes from nothing)"));
    }
    Ok(set)
}

pub use crate::verb::{AffectArgs, AgentArgs, HotplugArgs};

/// The verbs registered through the Verb layer: one line each (`Variant(Args)`,
/// the variant's name in kebab case being the verb's). Their CLI, report name
/// and `--json` operation come from their [`VerbArgs`] and [`Verb`] impls.
macro_rules! registered_verbs {
    ($($variant:ident($args:ty),)*) => {
        #[derive(Subcommand, Debug)]
        pub enum Registered {
            $($variant($args),)*
        }

        impl Registered {
            /// Every registered verb's name, in registration order.
            pub const NAMES: &[&'static str] = &[$(<<$args as VerbArgs>::Verb as Verb>::NAME,)*];

            /// The verb, as typed.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Registered::$variant(_) => <<$args as VerbArgs>::Verb as Verb>::NAME,)*
                }
            }

            pub fn domain(&self) -> &str {
                match self {
                    $(Registered::$variant(a) => a.domain(),)*
                }
            }

            fn domain_mut(&mut self) -> &mut String {
                match self {
                    $(Registered::$variant(a) => a.domain_mut(),)*
                }
            }

            /// The verb for `check`, with the options its command line gives.
            fn preview(&self) -> Result<(Box<dyn verb::Preview>, crate::facts::HotplugOpts), CliError> {
                match self {
                    $(Registered::$variant(a) => Ok((Box::new(a.verb()?), a.opts()?)),)*
                }
            }

            /// What the verb's command line asks that vmplug does not do.
            fn unsupported(&self) -> Option<String> {
                match self {
                    $(Registered::$variant(a) => a.unsupported(),)*
                }
            }

            async fn run(&self, conn: Arc<dyn Connection>) -> Result<Done, CliError> {
                match self {
                    $(Registered::$variant(a) => {
                        let v = a.verb()?;
                        let r = verb::run(&v, conn, a.domain(), &a.opts()?).await;
                        Ok(Done::op(r.map_err(|e| verb_error(v.request_id(), e))?))
                    })*
                }
            }
        }
    };
}

registered_verbs! {
    Setvcpus(crate::ops::SetvcpusArgs),
    AttachMemory(crate::ops::AttachMemoryArgs),
    DetachMemory(crate::unplug::DetachMemoryArgs),
    AddVirtioMem(crate::vmem_add::AddVirtioMemArgs),
    ResizeMemory(crate::vmem::ResizeMemoryArgs),
    DetachVirtioMem(crate::vmem_detach::DetachVirtioMemArgs),
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show or set CPU scheduler parameters (cpu_shares=N vcpu_quota=… …).
    Schedinfo {
        /// Domain name, ID or UUID (as virsh takes them).
        domain: String,
        #[command(flatten)]
        affect: AffectArgs,
        /// key=value pairs to set.
        params: Vec<String>,
        /// A key=value pair to set, as virsh schedinfo --set (repeatable;
        /// instead of the positional pairs).
        #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "params")]
        set: Vec<String>,
    },
    /// Show or set the QEMU emulator threads' host CPU affinity.
    Emulatorpin {
        /// Domain name, ID or UUID (as virsh takes them).
        domain: String,
        /// Host CPUs (`0-3,^1`); without it, the current affinity.
        #[arg(value_parser = parse_set)]
        cpuset: Option<CpuSet>,
        /// Host CPUs, as virsh emulatorpin --cpulist (instead of CPUSET).
        #[arg(long = "cpulist", value_name = "CPUSET", value_parser = parse_set, conflicts_with = "cpuset")]
        cpulist: Option<CpuSet>,
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Show or set a vCPU's host CPU affinity.
    Vcpupin {
        /// Domain name, ID or UUID (as virsh takes them).
        domain: String,
        /// The vCPU to pin; without VCPU and CPUSET, the table.
        vcpu: Option<u32>,
        /// Host CPUs (`0-3,^1`).
        #[arg(value_parser = parse_set)]
        cpuset: Option<CpuSet>,
        /// The vCPU, as virsh vcpupin --vcpu (instead of VCPU).
        #[arg(long = "vcpu", value_name = "VCPU", conflicts_with = "vcpu")]
        vcpu_flag: Option<u32>,
        /// Host CPUs, as virsh vcpupin --cpulist (instead of CPUSET).
        #[arg(long = "cpulist", value_name = "CPUSET", value_parser = parse_set, conflicts_with = "cpuset")]
        cpulist: Option<CpuSet>,
        #[command(flatten)]
        affect: AffectArgs,
    },
    #[command(flatten)]
    Registered(Registered),
    /// Show or set host NUMA memory placement.
    Numatune {
        /// Domain name, ID or UUID (as virsh takes them).
        domain: String,
        /// strict, preferred, interleave or restrictive.
        #[arg(long)]
        mode: Option<NumaMode>,
        /// Host NUMA nodes (`0-1`, `0-3,^2`).
        #[arg(long, value_parser = parse_set)]
        nodeset: Option<CpuSet>,
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Host NUMA topology (as numactl -H), guest cells and their placement.
    Numa {
        /// Domain name, ID or UUID (as virsh takes them).
        domain: String,
    },
    /// Preflight only: is the domain ready for these hot-plugs?
    Check {
        /// Domain name, ID or UUID (as virsh takes them).
        domain: String,
        /// Check `setvcpus DOMAIN N`.
        #[arg(long)]
        cpus: Option<u32>,
        /// With --cpus: check `setvcpus --guest DOMAIN N` (guest-level).
        #[arg(long, requires = "cpus")]
        guest: bool,
        /// Check `attach-memory DOMAIN SIZE` (a size with a unit: 512M, 1G).
        #[arg(long, value_parser = parse_size)]
        memory: Option<Bytes>,
        /// Check `resize-memory DOMAIN SIZE` (virtio-mem: 4G, +1G, -512M).
        #[arg(long, allow_hyphen_values = true)]
        resize: Option<crate::vmem::SizeChange>,
        /// Guest NUMA node of the memory (needs --memory or --resize).
        #[arg(long)]
        node: Option<u32>,
        /// As attach-memory --round-up.
        #[arg(long, requires = "memory")]
        round_up: bool,
        /// As attach-memory --max-dimm.
        #[arg(long, default_value = "4G", value_parser = parse_size)]
        max_dimm: Bytes,
        /// The options the verbs take: check answers for exactly these.
        #[command(flatten)]
        hotplug: HotplugArgs,
        /// Check a verb with its own arguments and options, as it would run
        /// (`check DOM detach-virtio-mem DOM --alias A`).
        #[command(subcommand)]
        verb: Option<Registered>,
    },
    /// Make a domain hot-plug-ready (edits the persistent definition only; takes
    /// effect at the next start). Prints a unified diff of the XML.
    Prepare {
        /// Domain name, ID or UUID (as virsh takes them).
        domain: String,
        /// Largest vCPU count hot-plug may reach (at most 4096).
        #[arg(long)]
        max_vcpus: Option<u32>,
        /// Largest memory hot-plug may reach (<maxMemory>; a size with a unit).
        #[arg(long, value_parser = parse_size)]
        max_memory: Option<Bytes>,
        /// Memory slots to reserve (at most 256).
        #[arg(long)]
        slots: Option<u32>,
        /// Guest NUMA cells (each holds whole sockets; at most 128).
        #[arg(long)]
        cells: Option<u32>,
        /// Host NUMA nodes to back the cells with (round-robin), pinning each
        /// cell's vCPUs to its node's CPUs.
        #[arg(long, value_parser = parse_set)]
        host_nodes: Option<CpuSet>,
        /// numatune mode for the memnodes.
        #[arg(long)]
        mode: Option<NumaMode>,
        /// Socket path of the guest agent's virtio-serial channel (default: none
        /// given, libvirt chooses it under its channel directory when the domain
        /// starts). The channel is added when the domain has no agent address.
        #[arg(long)]
        channel_path: Option<String>,
        /// Print the diff only; define nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Grow running VMs from their guests' pressure, within a policy (TOML).
    /// Prints one JSON event per decision.
    Autoscale {
        /// The policy file (TOML; see README).
        #[arg(long)]
        policy: std::path::PathBuf,
        /// Sample until one decision per domain, act, and exit.
        #[arg(long)]
        once: bool,
        /// Decide and report, but change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Prove a guest image before it ships: boot it (through an overlay; the
    /// image is never written) under a private libvirtd with a hot-plug-ready
    /// definition, run the hot-plug matrix with vmplug's own verbs, and report
    /// pass, fail or skip for each case with the guest's evidence. Needs root;
    /// never touches the machine's own libvirtd. Exit 0: no case failed; 5: a
    /// case failed; 1: the guest could not be set up.
    VerifyImage {
        /// The disk image (qcow2 or raw).
        image: std::path::PathBuf,
        /// The guest's architecture.
        #[arg(long, value_enum, default_value = "x86_64")]
        arch: crate::verify::domain::Arch,
        /// Boot this kernel directly (else the image's own boot loader).
        #[arg(long)]
        kernel: Option<std::path::PathBuf>,
        /// The initrd for --kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<std::path::PathBuf>,
        /// The kernel command line for --kernel (default: root=/dev/vda; the
        /// serial console is added when it names none).
        #[arg(long, requires = "kernel")]
        append: Option<String>,
        /// The machine type (default: q35; aarch64: the newest versioned virt).
        #[arg(long)]
        machine: Option<String>,
        /// Boot memory, split over the cells (a size with a unit).
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        memory: Bytes,
        /// Guest NUMA cells: one DIMM case per cell.
        #[arg(long, default_value_t = 2)]
        cells: u32,
        /// vCPUs the definition allows (one is present at boot).
        #[arg(long, default_value_t = 4)]
        max_vcpus: u32,
        /// kvm, tcg, or auto: KVM when it is usable here (said in the report).
        #[arg(long, value_enum, default_value = "auto")]
        accel: crate::verify::domain::AccelChoice,
        /// Seconds the guest may take to answer after it is started.
        #[arg(long, default_value_t = 300)]
        boot_timeout: u64,
        /// What to print: text, json (the envelope) or junit (XML for CI).
        #[arg(long, value_enum, default_value = "text")]
        report: ReportFormat,
        /// The image's format (default: judged from its header; anything but
        /// a self-contained raw or qcow2 image is refused).
        #[arg(long, value_enum)]
        format: Option<crate::verify::image::DiskFormat>,
        /// The base of each run's fresh private directory (the private
        /// libvirtd, the image's copy, the logs). It must be this user's alone:
        /// created mode 0711 when missing, refused when another user owns it or
        /// may write to it.
        #[arg(long, default_value = "/var/lib/vmplug/verify")]
        work_dir: std::path::PathBuf,
        /// Keep the run's work directory (logs, the image's copy, definition).
        #[arg(long)]
        keep: bool,
    },
    /// Show or change vmplug's settings of a domain: tags (autoscale's
    /// `[select] tag`) and the guest agent's address, all in one element of
    /// the domain's <metadata> (namespace https://vmplug.dev/xmlns/domain/1).
    /// Prints the settings as libvirt then holds them.
    Meta {
        /// Domain name, ID or UUID (as virsh takes them).
        domain: String,
        /// Add this tag (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tag: Vec<crate::meta::Tag>,
        /// Remove this tag (repeatable; removals come before additions).
        #[arg(long = "untag", value_name = "TAG")]
        untag: Vec<crate::meta::Tag>,
        /// Set the guest agent's address: hybrid:PATH:PORT, vsock:CID:PORT or serial:PATH.
        #[arg(long, conflicts_with = "no_agent")]
        agent: Option<AgentAddr>,
        /// Remove the agent's address (the domain's channel or <vsock> is used then).
        #[arg(long)]
        no_agent: bool,
        /// The running domain only (default: running and persistent when it runs,
        /// else persistent).
        #[arg(long)]
        live: bool,
        /// The persistent definition only (with --live: both).
        #[arg(long)]
        config: bool,
    },
    /// The host's and the guest's view side by side.
    Status {
        /// Domain name, ID or UUID (as virsh takes them).
        domain: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

impl Cli {
    /// The output is the JSON envelope (`--json`, or `verify-image --report json`).
    pub fn wants_json(&self) -> bool {
        self.json || matches!(self.command, Command::VerifyImage { report: ReportFormat::Json, .. })
    }
}

/// The `domain` field of the verbs that name one, borrowed as `$cmd` is
/// (shared or mutable): one list for `Command::domain` and `domain_mut`.
macro_rules! named_domain {
    ($cmd:expr) => {
        match $cmd {
            Command::Schedinfo { domain, .. }
            | Command::Emulatorpin { domain, .. }
            | Command::Vcpupin { domain, .. }
            | Command::Numatune { domain, .. }
            | Command::Numa { domain }
            | Command::Check { domain, .. }
            | Command::Prepare { domain, .. }
            | Command::Status { domain, .. }
            | Command::Meta { domain, .. } => Some(domain),
            Command::Autoscale { .. } | Command::VerifyImage { .. } | Command::Registered(_) => None,
        }
    };
}

impl Command {
    /// The verb, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Schedinfo { .. } => "schedinfo",
            Command::Emulatorpin { .. } => "emulatorpin",
            Command::Vcpupin { .. } => "vcpupin",
            Command::Numatune { .. } => "numatune",
            Command::Numa { .. } => "numa",
            Command::Check { .. } => "check",
            Command::Prepare { .. } => "prepare",
            Command::Autoscale { .. } => "autoscale",
            Command::Status { .. } => "status",
            Command::Meta { .. } => "meta",
            Command::VerifyImage { .. } => "verify-image",
            Command::Registered(r) => r.name(),
        }
    }

    /// The domain the command names, to be replaced by its name once found.
    fn domain_mut(&mut self) -> Option<&mut String> {
        if let Command::Registered(r) = self {
            return Some(r.domain_mut());
        }
        named_domain!(self)
    }

    /// The domain the command is about, if it names one.
    pub fn domain(&self) -> Option<&str> {
        if let Command::Registered(r) = self {
            return Some(r.domain());
        }
        named_domain!(self).map(String::as_str)
    }
}

/// How `verify-image` prints its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
    Junit,
}

/// Why a command ended without its result. Each kind has one outcome and so one
/// exit code (README, "Exit codes").
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// An attach-memory run that ended early: the request id makes a repeat safe.
    #[error("attach-memory request {id}: {source}; repeat with --request-id {id} to attach only what is missing")]
    Request { id: String, source: DomainError },
    #[error("{0}")]
    Other(String),
}

impl From<crate::meta::MetaVerbError> for CliError {
    fn from(e: crate::meta::MetaVerbError) -> Self {
        match e {
            crate::meta::MetaVerbError::Domain(d) => CliError::Domain(d),
            e => CliError::Other(e.to_string()),
        }
    }
}

impl From<TuneError> for CliError {
    fn from(e: TuneError) -> Self {
        match e {
            TuneError::Domain(d) => CliError::Domain(d),
            TuneError::Refused(r) => CliError::Refused(r),
        }
    }
}

fn domain_outcome(e: &DomainError) -> ReportOutcome {
    match e {
        DomainError::Usage(_) => ReportOutcome::Usage,
        DomainError::Connect { .. } | DomainError::Libvirt { .. } => ReportOutcome::LibvirtError,
        DomainError::NotFound(_) | DomainError::NotRunning(_) | DomainError::Other(_) => ReportOutcome::Error,
    }
}

impl CliError {
    pub fn outcome(&self) -> ReportOutcome {
        match self {
            CliError::Usage(_) => ReportOutcome::Usage,
            CliError::Domain(e) | CliError::Request { source: e, .. } => domain_outcome(e),
            CliError::Refused(_) => ReportOutcome::Refused,
            CliError::Policy(PolicyError::Read(..)) | CliError::Other(_) => ReportOutcome::Error,
            CliError::Policy(_) => ReportOutcome::Usage,
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.outcome().exit_code()
    }

    /// The `--json` envelope of this error for `command`.
    pub fn envelope(&self, command: &Command) -> Envelope {
        let mut env = Envelope::new(command.name(), command.domain(), self.outcome(), self.to_string());
        env.error = Some(self.to_string());
        if let CliError::Refused(r) = self {
            env.findings = r.0.clone();
        }
        env
    }
}

/// What a command produced: its envelope, its own result and its text form.
#[derive(Debug)]
pub struct Done {
    pub envelope: Envelope,
    pub result: Option<serde_json::Value>,
    pub text: String,
}

impl Done {
    fn new<T: serde::Serialize>(envelope: Envelope, result: &T, text: String) -> Done {
        Done { envelope, result: serde_json::to_value(result).ok(), text }
    }

    /// A read-only command (or one whose change is shown by its output).
    fn shown<T: serde::Serialize>(cmd: &Command, result: &T, text: String) -> Done {
        Done::new(Envelope::new(cmd.name(), cmd.domain(), ReportOutcome::Ok, String::new()), result, text)
    }

    fn op(r: OpReport) -> Done {
        let text = r.render_text();
        Done::new(r.envelope(), &r, text)
    }

    pub fn exit_code(&self) -> u8 {
        self.envelope.exit_code
    }

    /// What to print: the text, or the one JSON envelope.
    pub fn render(&self, json: bool) -> String {
        if json {
            json_line(&self.envelope.to_json(self.result.clone()))
        } else {
            self.text.clone()
        }
    }
}

/// A JSON document as printed: pretty, one trailing newline.
pub fn json_line(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")) + "\n"
}

/// Refuses what the command line says but vmplug does not do, before
/// anything is read.
fn refuse_unsupported(cmd: &Command) -> Result<(), CliError> {
    match cmd {
        Command::Registered(r) => r.unsupported().map_or(Ok(()), |why| Err(CliError::Usage(why))),
        _ => Ok(()),
    }
}

/// A verb's error; one that carries an idempotency key (attach-memory's
/// request id) names it, so the request can be repeated — unless the request
/// itself was wrong or its domain is not there.
fn verb_error(request_id: Option<&str>, e: DomainError) -> CliError {
    match (request_id, e) {
        (_, e @ (DomainError::Usage(_) | DomainError::NotFound(_))) | (None, e) => CliError::Domain(e),
        (Some(id), e) => CliError::Request { id: id.to_string(), source: e },
    }
}

/// The domain the command names, by its name however it was given (name, ID
/// or UUID, as virsh takes them): reports and errors after this name it so.
async fn resolve_domain(cmd: &mut Command, conn: &Arc<dyn Connection>) -> Result<(), CliError> {
    let Some(given) = cmd.domain_mut() else { return Ok(()) };
    *given = name_of(conn, given).await?;
    if let Command::Check { verb: Some(v), .. } = cmd {
        // The verb checked names its domain too: by its name from here on.
        let name = name_of(conn, v.domain()).await?;
        *v.domain_mut() = name;
    }
    Ok(())
}

/// The name of the domain `key` (a name, ID or UUID) names.
async fn name_of(conn: &Arc<dyn Connection>, key: &str) -> Result<String, CliError> {
    let (conn, key) = (conn.clone(), key.to_string());
    Ok(tokio::task::spawn_blocking(move || conn.lookup(&key).map(|d| d.name().to_string()))
        .await
        .map_err(|e| CliError::Other(format!("libvirt worker failed: {e}")))??)
}

/// Runs one command against a connection. The domain the command names is
/// looked up first (by name, ID or UUID) and named by its name from then on.
pub async fn run(cli: &mut Cli, conn: Arc<dyn Connection>) -> Result<Done, CliError> {
    refuse_unsupported(&cli.command)?;
    resolve_domain(&mut cli.command, &conn).await?;
    let cmd = &cli.command;
    Ok(match cmd {
        Command::Schedinfo { domain, affect, params, set } => {
            let set = tune::parse_sched_args(if set.is_empty() { params } else { set })?;
            let p = tune::schedinfo(conn, domain, affect.affect()?, set).await?;
            Done::shown(cmd, &p, tune::render_sched(&p))
        }
        Command::Emulatorpin { domain, cpuset, cpulist, affect } => {
            let cpuset = cpuset.clone().or_else(|| cpulist.clone());
            let t = tune::emulatorpin(conn, domain, affect.affect()?, cpuset).await?;
            Done::shown(cmd, &t, tune::render_pins(&t))
        }
        Command::Vcpupin { domain, vcpu, cpuset, vcpu_flag, cpulist, affect } => {
            let (vcpu, cpuset) = (vcpu.or(*vcpu_flag), cpuset.as_ref().or(cpulist.as_ref()));
            let pin = match (vcpu, cpuset) {
                (Some(v), Some(c)) => Some((v, c.clone())),
                (None, None) => None,
                _ => return Err(CliError::Usage("vcpupin: give both VCPU and CPUSET, or neither".into())),
            };
            let t = tune::vcpupin(conn, domain, affect.affect()?, pin).await?;
            Done::shown(cmd, &t, tune::render_pins(&t))
        }
        Command::Registered(r) => r.run(conn).await?,
        Command::Numatune { domain, mode, nodeset, affect } => {
            let set = NumaParams { mode: *mode, nodeset: nodeset.clone() };
            let p = tune::numatune(conn, domain, affect.affect()?, set).await?;
            Done::shown(cmd, &p, tune::render_numatune(&p))
        }
        Command::Numa { domain } => {
            let v = tune::numa(conn, domain).await?;
            let mut env = Envelope::new(cmd.name(), cmd.domain(), ReportOutcome::Ok, String::new());
            env.findings = v.findings.clone();
            Done::new(env, &v, tune::render_numa(&v))
        }
        Command::Check { domain, cpus, guest, memory, resize, node, round_up, max_dimm, hotplug, verb } => {
            if node.is_some() && memory.is_none() && resize.is_none() {
                return Err(CliError::Usage("--node needs --memory or --resize".into()));
            }
            let memory = memory.map(|size| MemoryOpts {
                size,
                node: *node,
                round_up: *round_up,
                ceiling: None,
                max_dimm: *max_dimm,
                request_id: ops::new_request_id(),
            });
            let resize =
                resize.map(|change| crate::vmem::ResizeOpts { change, node: *node, settle: Duration::from_secs(10) });
            // The zone each verb defaults to: auto for DIMMs, movable for virtio-mem.
            let zone = if resize.is_some() && memory.is_none() { ZonePolicy::Movable } else { ZonePolicy::Auto };
            let req =
                tune::CheckRequest { cpus: *cpus, guest: *guest, memory, resize, opts: hotplug.opts_with_zone(zone)? };
            let (mut verbs, mut opts) = (req.verbs(), req.opts);
            if let Some(v) = verb {
                if v.domain() != domain {
                    return Err(CliError::Usage(format!("check {domain}: the {} names another domain", v.name())));
                }
                let (v, o) = v.preview()?;
                verbs.push(v);
                opts = o;
            }
            check(cmd, conn, domain, &verbs, &opts).await?
        }
        Command::Prepare { domain, max_vcpus, max_memory, slots, cells, host_nodes, mode, channel_path, dry_run } => {
            let opts = crate::prepare::PrepareOpts {
                max_vcpus: *max_vcpus,
                max_memory: *max_memory,
                slots: *slots,
                cells: *cells,
                host_nodes: host_nodes.clone(),
                mode: *mode,
                channel_path: channel_path.clone(),
            };
            prepare(cmd, conn, domain, &opts, *dry_run).await?
        }
        Command::Autoscale { policy, once, dry_run } => autoscale(conn, policy, *once, *dry_run).await?,
        Command::VerifyImage { .. } => {
            return run_verify(cli).await.unwrap_or_else(|| Err(CliError::Usage("not verify-image".into())))
        }
        Command::Meta { domain, tag, untag, agent, no_agent, live, config } => {
            let change = crate::meta::Change {
                tag: tag.clone(),
                untag: untag.clone(),
                agent: agent.as_ref().map(Into::into),
                no_agent: *no_agent,
            };
            let r = crate::meta::meta(conn, domain, change, *live, *config).await?;
            let mut env = Envelope::new(cmd.name(), cmd.domain(), ReportOutcome::Ok, String::new());
            env.applied = r.applied.clone();
            Done::new(env, &r, r.render_text())
        }
        Command::Status { domain, agent } => {
            let st = tune::status(conn, domain, agent.agent.as_ref(), Duration::from_secs(agent.agent_timeout)).await?;
            Done::shown(cmd, &st, tune::render_status(&st))
        }
    })
}

/// `attach-memory`: the request id is what makes a repeat safe, so an error
/// after the start names it.
async fn check(
    cmd: &Command,
    conn: Arc<dyn Connection>,
    domain: &str,
    verbs: &[Box<dyn verb::Preview>],
    opts: &crate::facts::HotplugOpts,
) -> Result<Done, CliError> {
    let c = tune::check_verbs(conn, domain, verbs, opts).await?;
    let (outcome, message) = if c.ready { (ReportOutcome::Ok, "ready") } else { (ReportOutcome::Refused, "not ready") };
    let mut env = Envelope::new(cmd.name(), cmd.domain(), outcome, message.into());
    env.findings = c.findings.clone();
    if !c.ready {
        let ids: Vec<&str> = c.findings.iter().filter(|f| f.severity == Severity::Error).map(|f| f.id).collect();
        env.error = Some(format!("not ready: {}", ids.join(", ")));
    }
    Ok(Done::new(env, &c, tune::render_check(&c)))
}

async fn prepare(
    cmd: &Command,
    conn: Arc<dyn Connection>,
    domain: &str,
    opts: &crate::prepare::PrepareOpts,
    dry_run: bool,
) -> Result<Done, CliError> {
    let r = ops::prepare(conn, domain, opts, dry_run).await?;
    let mut env = match &r.refused {
        Some(why) => Envelope {
            error: Some(why.clone()),
            ..Envelope::new(cmd.name(), cmd.domain(), ReportOutcome::Refused, why.clone())
        },
        None => Envelope::new(cmd.name(), cmd.domain(), ReportOutcome::Ok, String::new()),
    };
    env.findings = r.findings.clone();
    if r.defined {
        env.applied = vec!["define (persistent definition)".into()];
    }
    Ok(Done::new(env, &r, r.render_text()))
}

async fn autoscale(
    conn: Arc<dyn Connection>,
    policy: &std::path::Path,
    once: bool,
    dry_run: bool,
) -> Result<Done, CliError> {
    autoscale_on(Some(conn), None, policy, once, dry_run).await
}

/// `vmplug autoscale` as the binary runs it: the policy's `uris` when it has
/// them (then `-c` is neither opened nor needed: the daemon may run where no
/// libvirtd is), else `-c`'s connection, opened here.
pub async fn run_autoscale(cli: &Cli) -> Option<Result<Done, CliError>> {
    let Command::Autoscale { policy, once, dry_run } = &cli.command else { return None };
    Some(autoscale_on(None, cli.connect.clone(), policy, *once, *dry_run).await)
}

/// The first of SIGINT (Ctrl-C), SIGTERM (what `timeout`, systemd and a
/// cancelled CI job send) and SIGHUP (a closed terminal), by name.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup())) {
        (Ok(mut int), Ok(mut term), Ok(mut hup)) => tokio::select! {
            _ = int.recv() => "interrupted",
            _ = term.recv() => "terminated",
            _ = hup.recv() => "hung up",
        },
        _ => {
            tracing::warn!("cannot watch for SIGTERM or SIGHUP; only Ctrl-C cleans up");
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    }
}

/// `vmplug verify-image`: it starts its own libvirtd, so `-c` is not opened.
/// SIGINT, SIGTERM and SIGHUP end the run and still destroy the guest, stop the
/// daemons and remove the work directory.
pub async fn run_verify(cli: &Cli) -> Option<Result<Done, CliError>> {
    let Command::VerifyImage {
        image,
        arch,
        kernel,
        initrd,
        append,
        machine,
        memory,
        cells,
        max_vcpus,
        accel,
        boot_timeout,
        report,
        format,
        work_dir,
        keep,
    } = &cli.command
    else {
        return None;
    };
    let o = crate::verify::VerifyOpts {
        image: image.clone(),
        arch: *arch,
        boot: crate::verify::domain::DirectBoot {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            append: append.clone(),
        },
        machine: machine.clone(),
        memory: *memory,
        cells: *cells,
        max_vcpus: *max_vcpus,
        accel: *accel,
        boot_timeout: Duration::from_secs((*boot_timeout).clamp(10, 3600)),
        work_dir: work_dir.clone(),
        format: *format,
        keep: *keep,
    };
    let r = tokio::select! {
        r = crate::verify::verify_image(&o) => r,
        sig = stop_signal() => Err(crate::harness::HarnessError(format!("{sig}: the guest and its libvirtd were stopped"))),
    };
    let r = match r {
        Ok(r) => r,
        // A CI system reading JUnit gets a document on this path too.
        Err(e) if *report == ReportFormat::Junit && !cli.json => {
            let msg = format!("verify-image: {e}");
            eprintln!("vmplug: {msg}");
            let env = Envelope {
                error: Some(msg.clone()),
                ..Envelope::new("verify-image", None, ReportOutcome::Error, msg.clone())
            };
            return Some(Ok(Done {
                envelope: env,
                result: None,
                text: crate::verify::report::junit_error(&o.image, &msg),
            }));
        }
        Err(e) => return Some(Err(CliError::Other(format!("verify-image: {e}")))),
    };
    let env = Envelope::new("verify-image", None, crate::verify::outcome_of(&r), r.message());
    let env = Envelope { error: (r.summary.fail > 0).then(|| r.message()), ..env };
    let result = serde_json::to_value(&r).ok();
    let text = match (report, cli.json) {
        (ReportFormat::Json, _) | (_, true) => json_line(&env.to_json(result.clone())),
        (ReportFormat::Junit, false) => r.render_junit(),
        (ReportFormat::Text, false) => r.render_text(),
    };
    Some(Ok(Done { envelope: env, result, text }))
}

async fn open(uri: Option<String>) -> Result<Arc<dyn Connection>, CliError> {
    let c = tokio::task::spawn_blocking(move || crate::libvirt::LibvirtConnection::open(uri.as_deref()))
        .await
        .map_err(|e| CliError::Other(format!("libvirt worker failed: {e}")))??;
    Ok(Arc::new(c))
}

async fn autoscale_on(
    conn: Option<Arc<dyn Connection>>,
    connect: Option<String>,
    policy: &std::path::Path,
    once: bool,
    dry_run: bool,
) -> Result<Done, CliError> {
    let text = std::fs::read_to_string(policy).map_err(|e| PolicyError::Read(policy.display().to_string(), e))?;
    let p = Policy::parse(&policy.display().to_string(), &text)?;
    // A policy out of bounds is refused before any host is opened or made.
    p.limits()?;
    let mut hosts = Vec::new();
    if p.uris.is_empty() {
        let conn = match conn {
            Some(c) => c,
            None => open(connect).await?,
        };
        hosts.push(Host::new(conn.uri(), conn, p.host.concurrency));
    } else {
        for uri in &p.uris {
            hosts.push(Host::new(uri.clone(), open(Some(uri.clone())).await?, p.host.concurrency));
        }
    }
    crate::autoscale::run(hosts, p, dry_run, once).await?;
    let env = Envelope::new("autoscale", None, ReportOutcome::Ok, "autoscale ended".into());
    Ok(Done { envelope: env, result: None, text: String::new() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    /// The `--json` schema's operations are the CLI's verbs: every
    /// subcommand, by the name it is typed as, and "usage"; a registered
    /// verb's report name (`Verb::NAME`) is the name it is typed as.
    #[test]
    fn the_schema_names_every_verb_as_it_is_typed() {
        use clap::CommandFactory;
        let typed: Vec<String> =
            Cli::command().get_subcommands().map(|c| c.get_name().to_string()).filter(|n| n != "help").collect();
        for name in Registered::NAMES {
            assert!(typed.iter().any(|t| t == name), "{name} is registered but typed otherwise: {typed:?}");
        }
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../schema/vmplug-report.schema.json")).expect("the schema is JSON");
        let mut listed: Vec<String> = schema["properties"]["operation"]["enum"]
            .as_array()
            .expect("an enum of operations")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let mut want = typed.clone();
        want.push("usage".into());
        listed.sort();
        want.sort();
        assert_eq!(listed, want, "the schema's operations and the CLI's verbs");
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmplug").chain(args.iter().copied()))
    }

    fn ok(args: &[&str]) -> Cli {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn kind(args: &[&str]) -> ErrorKind {
        parse(args).map(|c| panic!("{args:?} parsed: {c:?}")).expect_err("refused").kind()
    }

    #[test]
    fn virsh_version_flags_print_the_version() {
        for flag in ["-v", "-V", "--version"] {
            assert_eq!(kind(&[flag]), ErrorKind::DisplayVersion, "{flag}");
        }
    }

    #[test]
    fn schedinfo_takes_virsh_set_beside_positional_pairs() {
        let Command::Schedinfo { set, params, .. } = ok(&["schedinfo", "d", "--set", "cpu_shares=100"]).command else {
            panic!("schedinfo")
        };
        assert_eq!((set, params), (vec!["cpu_shares=100".to_string()], vec![]));
        assert!(parse(&["schedinfo", "d", "cpu_shares=100"]).is_ok());
        assert_eq!(kind(&["schedinfo", "d", "cpu_shares=1", "--set", "cpu_shares=2"]), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn vcpupin_and_emulatorpin_take_virsh_flags() {
        let Command::Vcpupin { vcpu_flag, cpulist, vcpu, cpuset, .. } =
            ok(&["vcpupin", "d", "--vcpu", "0", "--cpulist", "1-2"]).command
        else {
            panic!("vcpupin")
        };
        assert_eq!(
            (vcpu_flag, cpulist.map(|c| c.to_string()), vcpu, cpuset),
            (Some(0), Some("1-2".into()), None, None)
        );
        assert!(parse(&["vcpupin", "d", "0", "1-2"]).is_ok());
        assert_eq!(kind(&["vcpupin", "d", "0", "--vcpu", "1", "--cpulist", "1"]), ErrorKind::ArgumentConflict);
        assert_eq!(kind(&["vcpupin", "d", "0", "1", "--cpulist", "1"]), ErrorKind::ArgumentConflict);
        let Command::Emulatorpin { cpulist, cpuset, .. } = ok(&["emulatorpin", "d", "--cpulist", "0-1"]).command else {
            panic!("emulatorpin")
        };
        assert_eq!((cpulist.map(|c| c.to_string()), cpuset), (Some("0-1".into()), None));
        assert_eq!(kind(&["emulatorpin", "d", "0", "--cpulist", "1"]), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn setvcpus_takes_count_either_way_and_refuses_maximum() {
        let Command::Registered(Registered::Setvcpus(a)) = ok(&["setvcpus", "d", "--count", "3"]).command else {
            panic!("setvcpus")
        };
        assert_eq!((a.count, a.count_flag), (None, Some(3)));
        assert!(parse(&["setvcpus", "d", "3"]).is_ok());
        assert_eq!(kind(&["setvcpus", "d", "3", "--count", "3"]), ErrorKind::ArgumentConflict);
        assert_eq!(kind(&["setvcpus", "d"]), ErrorKind::MissingRequiredArgument);
        let cli = ok(&["setvcpus", "d", "--count", "8", "--maximum"]);
        let e = refuse_unsupported(&cli.command).expect_err("refused");
        assert_eq!(e.exit_code(), crate::report::EXIT_USAGE);
        assert!(e.to_string().contains("vmplug prepare d --max-vcpus"), "{e}");
        assert!(refuse_unsupported(&ok(&["setvcpus", "d", "8"]).command).is_ok());
    }

    #[tokio::test]
    async fn a_domain_given_by_id_or_uuid_is_named_by_its_name() {
        let xml = "<domain type='kvm' id='3'><name>web</name><uuid>0b5e0c2e-1d2f-4a7b-9c3d-5e6f7a8b9c0d</uuid>\
                   <memory unit='KiB'>1048576</memory><vcpu>1</vcpu></domain>";
        let conn: Arc<dyn Connection> =
            crate::fake::FakeConnection::new("<capabilities/>", vec![crate::fake::FakeDomain::new("web", xml, None)]);
        for given in ["web", "3", "0b5e0c2e-1d2f-4a7b-9c3d-5e6f7a8b9c0d"] {
            let mut cmd = ok(&["status", given]).command;
            resolve_domain(&mut cmd, &conn).await.expect("found");
            assert_eq!(cmd.domain(), Some("web"), "{given}");
        }
        let mut cmd = ok(&["status", "4"]).command;
        let e = resolve_domain(&mut cmd, &conn).await.expect_err("refused");
        assert_eq!(e.exit_code(), 1, "{e}");
    }

    #[tokio::test]
    async fn check_takes_a_registered_verb_with_its_own_arguments() {
        let dom = crate::fake::FakeDomain::new("vm", crate::vmem_detach::DOM, None);
        let caps = include_str!("../tests/fixtures/caps.xml");
        let conn: Arc<dyn Connection> = crate::fake::FakeConnection::new(caps, vec![dom]);
        let mut cli = ok(&["check", "vm", "detach-virtio-mem", "vm", "--alias", "virtiomem1"]);
        let d = run(&mut cli, conn.clone()).await.expect("a verdict");
        assert_eq!(d.exit_code(), 2, "{}", d.text);
        assert!(d.text.contains("[vmem.plugged]"), "{}", d.text);
        let mut cli = ok(&["check", "vm", "detach-virtio-mem", "vm", "--alias", "virtiomem0"]);
        let d = run(&mut cli, conn.clone()).await.expect("a verdict");
        assert_eq!(d.exit_code(), 0, "{}", d.text);
        assert!(d.text.contains("would: detach virtiomem0 (live)"), "{}", d.text);
        let mut cli = ok(&["check", "vm", "detach-virtio-mem", "other", "--alias", "virtiomem0"]);
        assert!(run(&mut cli, conn).await.is_err(), "another domain");
    }
}
