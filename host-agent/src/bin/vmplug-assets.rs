//! `vmplug-assets DIR`: the man pages (`DIR/man/vmplug.1` and one page per verb,
//! `vmplug-setvcpus.1`, …) and the bash, zsh and fish completions
//! (`DIR/completions/`), all generated from the CLI's own definition so they
//! cannot drift from it.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

fn write_man(cmd: &clap::Command, name: &str, dir: &Path) -> std::io::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).title(name).render(&mut out)?;
    std::fs::write(dir.join(format!("{name}.1")), out)
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| "target/assets".into());
    let (man, completions) = (dir.join("man"), dir.join("completions"));
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut cmd = vmplug::cli::Cli::command();
    cmd.build();
    write_man(&cmd, "vmplug", &man)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_man(sub, &format!("vmplug-{}", sub.get_name()), &man)?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "vmplug", &completions)?;
    }
    // bash-completion looks the file up by the command's name.
    std::fs::rename(completions.join("vmplug.bash"), completions.join("vmplug"))?;
    println!("wrote {} and {}", man.display(), completions.display());
    Ok(())
}
