//! Command line: verbs mirror virsh (same names, same --live/--config/--current).

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vmplug_common::protocol::ZonePolicy;
use vmplug_common::{Bytes, CpuSet};

use crate::domain::{Affect, Connection, DomainError, NumaMode, NumaParams};
use crate::link::AgentAddr;
use crate::ops::{self, HotplugOpts, MemoryOpts};
use crate::report::{OpReport, EXIT_USAGE};
use crate::tune::{self, TuneError};
use crate::unplug::{self, DimmSelector};

#[derive(Parser, Debug)]
#[command(
    name = "vmplug",
    version,
    about = "Grow running VMs through libvirt and prove the guest uses what it was given"
)]
pub struct Cli {
    /// libvirt URI (as virsh -c); default: LIBVIRT_DEFAULT_URI, then libvirt's default.
    #[arg(short = 'c', long = "connect", global = true)]
    pub connect: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct AffectArgs {
    /// Affect the running domain.
    #[arg(long)]
    pub live: bool,
    /// Affect the persistent definition.
    #[arg(long)]
    pub config: bool,
    /// Live if running, else config (the default).
    #[arg(long)]
    pub current: bool,
}

impl AffectArgs {
    fn affect(self) -> Result<Affect, DomainError> {
        Affect::from_flags(self.live, self.config, self.current)
    }
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Guest agent address: vsock:CID:PORT, hybrid:PATH:PORT or serial:PATH
    /// (default: from the domain's vmplug metadata or its virtio-serial channel).
    #[arg(long)]
    pub agent: Option<AgentAddr>,
    /// Seconds to wait for the agent's handshake.
    #[arg(long, default_value_t = 30)]
    pub agent_timeout: u64,
}

#[derive(Args, Debug, Clone)]
pub struct HotplugArgs {
    #[command(flatten)]
    pub affect: AffectArgs,
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Seconds the guest may take to bring everything online.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Do not wait for the guest's confirmation.
    #[arg(long)]
    pub no_wait: bool,
    /// Apply even when preflight finds errors (the guest's answer is still checked).
    #[arg(long)]
    pub force: bool,
    /// Zone for onlined memory: auto, movable, kernel, online.
    #[arg(long, default_value = "auto")]
    pub zone: ZonePolicy,
}

impl HotplugArgs {
    fn opts(&self) -> Result<HotplugOpts, DomainError> {
        Ok(HotplugOpts {
            affect: self.affect.affect()?,
            timeout: Duration::from_secs(self.timeout.clamp(1, 3600)),
            agent_wait: Duration::from_secs(self.agent.agent_timeout.clamp(1, 3600)),
            no_wait: self.no_wait,
            force: self.force,
            agent: self.agent.agent.clone(),
            zone: self.zone,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show or set CPU scheduler parameters (cpu_shares=N vcpu_quota=… …).
    Schedinfo {
        domain: String,
        #[command(flatten)]
        affect: AffectArgs,
        /// key=value pairs to set.
        params: Vec<String>,
    },
    /// Show or set the QEMU emulator threads' host CPU affinity.
    Emulatorpin {
        domain: String,
        cpuset: Option<CpuSet>,
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Show or set a vCPU's host CPU affinity.
    Vcpupin {
        domain: String,
        vcpu: Option<u32>,
        cpuset: Option<CpuSet>,
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Set the number of vCPUs; waits until the guest has them online.
    Setvcpus {
        domain: String,
        count: u32,
        #[command(flatten)]
        hotplug: HotplugArgs,
    },
    /// Hot-plug memory as DIMMs; waits until the guest has every block online.
    AttachMemory {
        domain: String,
        size: Bytes,
        /// Guest NUMA node (default: balanced over the cells).
        #[arg(long)]
        node: Option<u32>,
        /// Round a misaligned size up to the guest's block size.
        #[arg(long)]
        round_up: bool,
        /// Largest single DIMM; larger sizes are split.
        #[arg(long, default_value = "4G")]
        max_dimm: Bytes,
        /// Idempotency key: repeating the command with the same id (after a crash)
        /// attaches only what is missing. Default: a fresh id, printed in the report.
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        hotplug: HotplugArgs,
    },
    /// Hot-unplug DIMMs: the guest offlines their blocks, libvirt detaches them,
    /// vmplug waits for QEMU to remove them and the guest to confirm.
    DetachMemory {
        domain: String,
        /// One DIMM by alias (`ua-vmplug-ID-N`, or libvirt's `dimmN`).
        #[arg(long, conflicts_with = "request_id", required_unless_present = "request_id")]
        alias: Option<String>,
        /// Every DIMM that `attach-memory --request-id ID` attached.
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        hotplug: HotplugArgs,
    },
    /// Show or set host NUMA memory placement.
    Numatune {
        domain: String,
        #[arg(long)]
        mode: Option<NumaMode>,
        #[arg(long)]
        nodeset: Option<CpuSet>,
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Host NUMA topology (as numactl -H), guest cells and their placement.
    Numa { domain: String },
    /// Preflight only: is the domain ready for these hot-plugs?
    Check {
        domain: String,
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long)]
        memory: Option<Bytes>,
        #[arg(long)]
        node: Option<u32>,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Make a domain hot-plug-ready (edits the persistent definition only; takes
    /// effect at the next start). Prints a unified diff of the XML.
    Prepare {
        domain: String,
        /// Largest vCPU count hot-plug may reach.
        #[arg(long)]
        max_vcpus: Option<u32>,
        /// Largest memory hot-plug may reach (<maxMemory>).
        #[arg(long)]
        max_memory: Option<Bytes>,
        /// Memory slots to reserve (at most 256).
        #[arg(long)]
        slots: Option<u32>,
        /// Guest NUMA cells (each holds whole sockets).
        #[arg(long)]
        cells: Option<u32>,
        /// Host NUMA nodes to back the cells with (round-robin), pinning each
        /// cell's vCPUs to its node's CPUs.
        #[arg(long)]
        host_nodes: Option<CpuSet>,
        /// numatune mode for the memnodes.
        #[arg(long)]
        mode: Option<NumaMode>,
        /// Print the diff only; define nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Grow running VMs from their guests' pressure, within a policy (TOML).
    /// Prints one JSON event per decision.
    Autoscale {
        #[arg(long)]
        policy: std::path::PathBuf,
        /// Sample until one decision per domain, act, and exit.
        #[arg(long)]
        once: bool,
        /// Decide and report, but change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The host's and the guest's view side by side.
    Status {
        domain: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

/// What a command printed and how the process should exit.
#[derive(Debug)]
pub struct Outcome {
    pub text: String,
    pub exit: u8,
}

fn print<T: serde::Serialize>(json: bool, v: &T, text: impl FnOnce(&T) -> String) -> String {
    if json {
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")) + "\n"
    } else {
        text(v)
    }
}

fn op_out(json: bool, r: OpReport) -> Outcome {
    Outcome { exit: r.outcome.exit_code(), text: print(json, &r, OpReport::render_text) }
}

fn tune_err(e: TuneError) -> anyhow::Error {
    anyhow::Error::new(e)
}

/// Runs one command against a connection.
pub async fn run(cli: &Cli, conn: Arc<dyn Connection>) -> anyhow::Result<Outcome> {
    let json = cli.json;
    let ok = |text| Outcome { text, exit: 0 };
    Ok(match &cli.command {
        Command::Schedinfo { domain, affect, params } => {
            let set = tune::parse_sched_args(params)?;
            let p = tune::schedinfo(conn, domain, affect.affect()?, set).await.map_err(tune_err)?;
            ok(print(json, &p, tune::render_sched))
        }
        Command::Emulatorpin { domain, cpuset, affect } => {
            let t = tune::emulatorpin(conn, domain, affect.affect()?, cpuset.clone()).await.map_err(tune_err)?;
            ok(print(json, &t, tune::render_pins))
        }
        Command::Vcpupin { domain, vcpu, cpuset, affect } => {
            let pin = match (vcpu, cpuset) {
                (Some(v), Some(c)) => Some((*v, c.clone())),
                (None, None) => None,
                _ => {
                    return Ok(Outcome {
                        text: "vcpupin: give both VCPU and CPUSET, or neither\n".into(),
                        exit: EXIT_USAGE,
                    })
                }
            };
            let t = tune::vcpupin(conn, domain, affect.affect()?, pin).await.map_err(tune_err)?;
            ok(print(json, &t, tune::render_pins))
        }
        Command::Setvcpus { domain, count, hotplug } => {
            op_out(json, ops::setvcpus(conn, domain, *count, &hotplug.opts()?).await?)
        }
        Command::AttachMemory { domain, size, node, round_up, max_dimm, request_id, hotplug } => {
            let mem = MemoryOpts {
                size: *size,
                node: *node,
                round_up: *round_up,
                ceiling: None,
                max_dimm: *max_dimm,
                request_id: request_id.clone().unwrap_or_else(ops::new_request_id),
            };
            // The id is what makes a repeat safe: name it even when the run ends in an error.
            let r = ops::attach_memory(conn, domain, &mem, &hotplug.opts()?).await.map_err(|e| match e {
                DomainError::Usage(_) | DomainError::NotFound(_) => anyhow::Error::new(e),
                e => anyhow::Error::new(e).context(format!(
                    "attach-memory request {}: repeat with --request-id {} to attach only what is missing",
                    mem.request_id, mem.request_id
                )),
            })?;
            op_out(json, r)
        }
        Command::DetachMemory { domain, alias, request_id, hotplug } => {
            let sel = match (alias, request_id) {
                (Some(a), _) => DimmSelector::Alias(a.clone()),
                (None, Some(id)) => DimmSelector::Request(id.clone()),
                (None, None) => Err(DomainError::Usage("give --alias or --request-id".into()))?,
            };
            op_out(json, unplug::detach_memory(conn, domain, &sel, &hotplug.opts()?).await?)
        }
        Command::Numatune { domain, mode, nodeset, affect } => {
            let p =
                tune::numatune(conn, domain, affect.affect()?, NumaParams { mode: *mode, nodeset: nodeset.clone() })
                    .await
                    .map_err(tune_err)?;
            ok(print(json, &p, tune::render_numatune))
        }
        Command::Numa { domain } => {
            let v = tune::numa(conn, domain).await.map_err(tune_err)?;
            ok(print(json, &v, tune::render_numa))
        }
        Command::Check { domain, cpus, memory, node, agent } => {
            let c = tune::check(
                conn,
                domain,
                *cpus,
                memory.map(|m| (m, *node)),
                agent.agent.as_ref(),
                Duration::from_secs(agent.agent_timeout),
            )
            .await
            .map_err(tune_err)?;
            let exit = if c.ready { 0 } else { crate::report::Outcome::Refused.exit_code() };
            Outcome { text: print(json, &c, tune::render_check), exit }
        }
        Command::Prepare { domain, max_vcpus, max_memory, slots, cells, host_nodes, mode, dry_run } => {
            let opts = crate::prepare::PrepareOpts {
                max_vcpus: *max_vcpus,
                max_memory: *max_memory,
                slots: *slots,
                cells: *cells,
                host_nodes: host_nodes.clone(),
                mode: *mode,
            };
            let r = ops::prepare(conn, domain, &opts, *dry_run).await?;
            let exit = if r.refused.is_some() { crate::report::Outcome::Refused.exit_code() } else { 0 };
            Outcome { text: print(json, &r, ops::PrepareReport::render_text), exit }
        }
        Command::Autoscale { policy, once, dry_run } => {
            use crate::autoscale::{Host, Policy, PolicyError};
            let text =
                std::fs::read_to_string(policy).map_err(|e| PolicyError::Read(policy.display().to_string(), e))?;
            let p = Policy::parse(&policy.display().to_string(), &text)?;
            let mut hosts = Vec::new();
            if p.uris.is_empty() {
                hosts.push(Host::new(conn.uri(), conn, p.host.concurrency));
            } else {
                for uri in &p.uris {
                    let u = uri.clone();
                    let c = tokio::task::spawn_blocking(move || crate::libvirt::LibvirtConnection::open(Some(&u)))
                        .await??;
                    hosts.push(Host::new(uri.clone(), Arc::new(c), p.host.concurrency));
                }
            }
            crate::autoscale::run(hosts, p, *dry_run, *once).await?;
            ok(String::new())
        }
        Command::Status { domain, agent } => {
            let s = tune::status(conn, domain, agent.agent.as_ref(), Duration::from_secs(agent.agent_timeout))
                .await
                .map_err(tune_err)?;
            ok(print(json, &s, tune::render_status))
        }
    })
}
