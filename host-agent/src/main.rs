//! `vmplug`: parse, connect, run, print once, exit with the outcome's code.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vmplug::cli::{run, Cli};
use vmplug::domain::{Connection, DomainError};
use vmplug::libvirt::LibvirtConnection;
use vmplug::report::{Outcome, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmplug: cannot start runtime: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = rt.block_on(async {
        let uri = cli.connect.clone();
        let conn: Arc<dyn Connection> =
            Arc::new(tokio::task::spawn_blocking(move || LibvirtConnection::open(uri.as_deref())).await??);
        run(&cli, conn).await
    });
    match result {
        Ok(out) => {
            print!("{}", out.text);
            ExitCode::from(out.exit)
        }
        Err(e) => {
            eprintln!("vmplug: {e:#}");
            ExitCode::from(error_exit(&e))
        }
    }
}

/// libvirt failures keep their own exit code even when they end a command early.
fn error_exit(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<DomainError>() {
        Some(DomainError::Libvirt { .. } | DomainError::Connect { .. }) => Outcome::LibvirtError.exit_code(),
        _ => EXIT_USAGE,
    }
}
