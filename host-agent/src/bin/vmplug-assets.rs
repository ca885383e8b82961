//! `vmplug-assets DIR`: the man pages (`DIR/man/vmplug.1` and one page per verb,
//! `vmplug-setvcpus.1`, …) and the bash, zsh and fish completions
//! (`DIR/completions/`), all generated from the CLI's own definition so they
//! cannot drift from it. The sections clap cannot derive (EXIT STATUS,
//! ENVIRONMENT, FILES, SEE ALSO) come from `vmplug::manual`; the `.TH` date is
//! `SOURCE_DATE_EPOCH`'s, else today's.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use vmplug::manual::{self, Page};

fn write_man(
    cmd: &clap::Command,
    name: &str,
    page: Page<'_>,
    verbs: &[&str],
    date: &str,
    dir: &Path,
) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .date(date)
        .source(format!("vmplug {}", env!("CARGO_PKG_VERSION")))
        .manual("vmplug manual");
    let mut out = Vec::new();
    man.render(&mut out)?;
    let mut text = String::from_utf8_lossy(&out).into_owned();
    text.push_str(&manual::sections(page, verbs));
    std::fs::write(dir.join(format!("{name}.1")), manual::tidy(&text))
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| "target/assets".into());
    let (man, completions) = (dir.join("man"), dir.join("completions"));
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let date = manual::page_date(std::env::var("SOURCE_DATE_EPOCH").ok().as_deref());
    // The pages describe `help` nowhere (there is no vmplug-help page to name).
    let mut pages = vmplug::cli::Cli::command().disable_help_subcommand(true);
    pages.build();
    let verbs: Vec<&str> = pages.get_subcommands().filter(|s| !s.is_hide_set()).map(|s| s.get_name()).collect();
    write_man(&pages, "vmplug", Page::Top, &verbs, &date, &man)?;
    for sub in pages.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        write_man(sub, &format!("vmplug-{name}"), Page::Verb(name), &verbs, &date, &man)?;
    }
    let mut cmd = vmplug::completion::with_fixed_values(vmplug::cli::Cli::command());
    // bash-completion looks the file up by the command's name.
    for (shell, file) in [(Shell::Bash, "vmplug"), (Shell::Zsh, "_vmplug"), (Shell::Fish, "vmplug.fish")] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, "vmplug", &mut out);
        let script = vmplug::completion::with_domains(shell, &String::from_utf8_lossy(&out));
        std::fs::write(completions.join(file), script)?;
    }
    println!("wrote {} and {}", man.display(), completions.display());
    Ok(())
}
