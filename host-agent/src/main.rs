//! `vmplug`: parse, connect, run, print once, exit with the outcome's code.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vmplug::cli::{json_line, run, Cli, CliError};
use vmplug::domain::Connection;
use vmplug::libvirt::LibvirtConnection;
use vmplug::report::{Envelope, Outcome, EXIT_USAGE};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(vmplug::completion::COMPLETE_DOMAINS) {
        return complete_domains(&args[1..]);
    }
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(e),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    // libvirt's default handler prints every error itself; vmplug reports each
    // one once, in its own words.
    virt::error::clear_error_callback();
    let result = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => with_shutdown(rt, async {
            if let Some(done) = vmplug::cli::run_autoscale(&cli).await {
                return done;
            }
            if let Some(done) = vmplug::cli::run_verify(&cli).await {
                return done;
            }
            let uri = cli.connect.clone();
            let conn: Arc<dyn Connection> = Arc::new(
                tokio::task::spawn_blocking(move || LibvirtConnection::open(uri.as_deref()))
                    .await
                    .map_err(|e| CliError::Other(format!("libvirt worker failed: {e}")))??,
            );
            run(&mut cli, conn).await
        }),
        Err(e) => Err(CliError::Other(format!("cannot start runtime: {e}"))),
    };
    match result {
        Ok(done) => {
            // verify-image's text is already in the format it was asked for.
            let json = cli.json && !matches!(cli.command, vmplug::cli::Command::VerifyImage { .. });
            let out = jsonl(&cli, done.render(json));
            // Text in the locale's character set; JSON stays UTF-8.
            print!("{}", if json { out.into() } else { vmplug::locale::for_terminal(&out) });
            ExitCode::from(done.exit_code())
        }
        Err(e) => {
            if cli.wants_json() {
                print!("{}", jsonl(&cli, json_line(&e.envelope(&cli.command).to_json(None))));
            } else {
                eprintln!("vmplug: {}", vmplug::locale::for_terminal(&e.to_string()));
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// `vmplug __complete-domains [-c URI] [VERB]`, for the shell completions: the
/// domains' names, one a line; nothing (and exit 0) on any error, since a
/// completion must never print one.
fn complete_domains(args: &[String]) -> ExitCode {
    let (uri, wanted) = vmplug::completion::parse_request(args);
    if wanted {
        virt::error::clear_error_callback();
        if let Ok(conn) = LibvirtConnection::open(uri.as_deref()) {
            for name in vmplug::completion::domain_names(&conn) {
                println!("{name}");
            }
        }
    }
    ExitCode::SUCCESS
}

/// autoscale's `--json` is JSON Lines throughout: its envelope is its last
/// line, compact like the events before it.
fn jsonl(cli: &Cli, out: String) -> String {
    if cli.json && matches!(cli.command, vmplug::cli::Command::Autoscale { .. }) {
        vmplug::autoscale::events::compact_line(&out)
    } else {
        out
    }
}

/// Runs `f` to its end, then leaves: a blocking task still running (a console
/// reader waiting out its deadline after a signal ended verify-image, a libvirt
/// call nobody awaits any more) is given a moment and then abandoned, never
/// waited for. Everything the run must undo is undone before `f` returns.
fn with_shutdown<T>(rt: tokio::runtime::Runtime, f: impl std::future::Future<Output = T>) -> T {
    let out = rt.block_on(f);
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    out
}

/// A command line clap could not take: help and version print and exit 0;
/// anything else is a usage error (exit 64), as a JSON envelope under `--json`.
fn usage(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            EXIT_USAGE
        } else {
            0
        });
    }
    if std::env::args().any(|a| a == "--json") {
        let mut env = Envelope::new("usage", None, Outcome::Usage, e.kind().to_string());
        env.error = Some(e.render().to_string().trim().to_string());
        let line = json_line(&env.to_json(None));
        // `vmplug --json autoscale` with a wrong flag: still one line.
        let autoscale = std::env::args().any(|a| a == "autoscale");
        print!("{}", if autoscale { vmplug::autoscale::events::compact_line(&line) } else { line });
    } else {
        let _ = e.print();
    }
    ExitCode::from(EXIT_USAGE)
}
