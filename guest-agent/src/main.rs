//! `vmplug-guest`: parse, configure, run, report the error chain once.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmplug_common::protocol::ZonePolicy;
use vmplug_guest::config::{Config, DEFAULT_CONFIG};

#[derive(Parser, Debug)]
#[command(name = "vmplug-guest", version, about = "Onlines hot-plugged CPUs and memory and reports to the host")]
struct Cli {
    /// Configuration file (default /etc/vmplug/guest.toml; absent means defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// sysfs root.
    #[arg(long, global = true)]
    sysfs_root: Option<PathBuf>,
    /// procfs root.
    #[arg(long, global = true)]
    proc_root: Option<PathBuf>,
    /// Log filter (overrides the config's `log`).
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (the default).
    Serve {
        /// vsock port; 0 disables vsock.
        #[arg(long)]
        vsock_port: Option<u32>,
        /// virtio-serial port name; "" disables it.
        #[arg(long)]
        serial_port: Option<String>,
        /// Zone policy for onlining without a request.
        #[arg(long)]
        zone: Option<ZonePolicy>,
    },
    /// Online everything offline now, print a JSON report, exit 1 if any item failed.
    Online {
        #[arg(long)]
        zone: Option<ZonePolicy>,
    },
    /// Print the guest's view: CPUs, memory blocks by state and zone, block size.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let (path, optional) = match &cli.config {
        Some(p) => (p.clone(), false),
        None => (PathBuf::from(DEFAULT_CONFIG), true),
    };
    let mut config = Config::load(&path, optional)?;
    if let Some(p) = &cli.sysfs_root {
        config.sysfs_root = p.clone();
    }
    if let Some(p) = &cli.proc_root {
        config.proc_root = p.clone();
    }
    if let Some(l) = &cli.log {
        config.log = l.clone();
    }
    Ok(config)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut config = load(&cli)?;
    match &cli.command {
        None | Some(Command::Serve { .. }) => {
            if let Some(Command::Serve { vsock_port, serial_port, zone }) = &cli.command {
                config.vsock_port = vsock_port.unwrap_or(config.vsock_port);
                config.serial_port = serial_port.clone().unwrap_or(config.serial_port);
                config.zone = zone.unwrap_or(config.zone);
            }
            init_tracing(&config.log);
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async {
                let agent = vmplug_guest::agent_from_config(&config);
                vmplug_guest::daemon::run(agent, &config).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Online { zone }) => {
            config.zone = zone.unwrap_or(config.zone);
            init_tracing(&config.log);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let report = rt.block_on(vmplug_guest::agent_from_config(&config).online_everything())?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.failures() > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Some(Command::Status { json }) => {
            init_tracing(&config.log);
            let info = vmplug_guest::agent_from_config(&config).info().context("reading the guest's state")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_status(&info);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_status(i: &vmplug_common::protocol::GuestInfo) {
    println!("kernel:            {}", i.kernel);
    println!("cpus possible:     {}", i.cpus.possible);
    println!("cpus present:      {}", i.cpus.present);
    println!("cpus online:       {} ({})", i.cpus.online, i.cpus.online.len());
    match &i.memory {
        Some(m) => {
            println!("block size:        {}", m.block_size);
            println!("blocks online:     {}", m.blocks_online);
            println!("blocks offline:    {}", m.blocks_offline);
            for (zone, n) in &m.zones {
                println!("  zone {zone:<12} {n}");
            }
            println!("auto_online:       {}", m.auto_online_blocks.as_deref().unwrap_or("-"));
        }
        None => println!("memory hot-plug:   not supported by this kernel"),
    }
    println!("acpi hotplug:      memory={:?} processor={:?}", i.acpi_memory_hotplug, i.acpi_cpu_hotplug);
    println!("numa nodes:        {}", i.numa_nodes);
    println!("mem total/avail:   {} / {}", i.mem_total, i.mem_available);
    println!("udev online rule:  {}", if i.udev_online_rule { "installed" } else { "none" });
    match i.virtio_mem_devices {
        Some(n) => println!("virtio-mem:        driver loaded, {n} device(s)"),
        None => println!("virtio-mem:        driver not loaded"),
    }
}

fn init_tracing(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmplug-guest: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The hand-written page (man/vmplug-guest.8) names every subcommand and
    /// option the command line has.
    #[test]
    fn the_man_page_names_every_subcommand_and_option() {
        let page = include_str!("../man/vmplug-guest.8").replace("\\-", "-");
        let cmd = super::Cli::command();
        let mut missing = Vec::new();
        for c in std::iter::once(&cmd).chain(cmd.get_subcommands()) {
            if c.get_name() != "vmplug-guest"
                && !page.contains(&format!(".B {}", c.get_name()))
                && !page.contains(&format!(".RB [ {} ]", c.get_name()))
            {
                missing.push(c.get_name().to_string());
            }
            for a in c.get_arguments() {
                if let Some(long) = a.get_long() {
                    if !page.contains(&format!("--{long}")) {
                        missing.push(format!("{} --{long}", c.get_name()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "man/vmplug-guest.8 lacks {missing:?}");
    }

    /// guest.toml(5) documents every key of the packaged guest.toml.
    #[test]
    fn the_config_page_documents_every_key() {
        let page = include_str!("../man/guest.toml.5");
        let keys: Vec<&str> = include_str!("../guest.toml")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim()))
            .collect();
        assert!(keys.len() >= 12, "{keys:?}");
        for key in keys {
            assert!(page.contains(&format!(".BR {key} \"")), "man/guest.toml.5 lacks {key}");
        }
    }
}
