//! What the shell completions (written by `vmplug-assets`) offer beyond clap's
//! definition: the fixed values of `--zone` and `--mode`, which the command
//! line parses with `FromStr` and so would otherwise complete as file names,
//! and the live domain names, which the scripts ask the binary for:
//! `vmplug __complete-domains [-c URI] [VERB]` prints them one a line (nothing
//! for a verb that names no domain, nothing on any error).

use clap::builder::PossibleValuesParser;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::domain::Connection;

/// The hidden first argument the completion scripts call the binary with.
pub const COMPLETE_DOMAINS: &str = "__complete-domains";

/// Whether `verb` takes a domain as its first operand.
pub fn takes_domain(verb: &str) -> bool {
    crate::cli::Cli::command()
        .find_subcommand(verb)
        .is_some_and(|s| s.get_arguments().any(|a| a.get_id() == "domain" && a.is_positional()))
}

/// What `__complete-domains ARGS` asks for: the URI (`-c`/`--connect`), and
/// whether domains are wanted at all (no verb, or one that names a domain).
pub fn parse_request(args: &[String]) -> (Option<String>, bool) {
    let (mut uri, mut verb) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" | "--connect" => uri = it.next().cloned(),
            s if s.starts_with("--connect=") => uri = Some(s["--connect=".len()..].to_string()),
            s if !s.starts_with('-') && verb.is_none() => verb = Some(s.to_string()),
            _ => {}
        }
    }
    (uri, verb.as_deref().is_none_or(takes_domain))
}

/// The domains' names, sorted; none when libvirt cannot list them.
pub fn domain_names(conn: &dyn Connection) -> Vec<String> {
    let mut names = conn.list_domains().unwrap_or_default();
    names.sort();
    names
}

/// Bash: after clap's completion, a verb's first operand completes to the
/// domains (options that take a value before it make it the second word, and
/// then nothing is offered: completion never guesses).
const BASH: &str = r#"
# Domain names, live from libvirt through `vmplug __complete-domains`.
_vmplug_domains() {
    local i w verb="" uri="" operands=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        case $w in
            -c | --connect) uri=${COMP_WORDS[i + 1]}; i=$((i + 1)) ;;
            -*) ;;
            *) if [[ -z $verb ]]; then verb=$w; else operands=$((operands + 1)); fi ;;
        esac
    done
    _vmplug "$@"
    if [[ -n $verb && $operands -eq 0 && $2 != -* ]]; then
        local names
        names=$("$1" __complete-domains ${uri:+--connect "$uri"} "$verb" 2>/dev/null)
        [[ -z $names ]] || mapfile -t COMPREPLY < <(compgen -W "$names" -- "$2")
    fi
}
complete -F _vmplug_domains -o bashdefault -o default vmplug
"#;

/// Zsh: the `domain` operand's action asks the binary.
const ZSH: &str = r#"
(( $+functions[_vmplug_domains] )) ||
_vmplug_domains() {
    local -a names uri
    local i
    for ((i = 2; i < CURRENT; i++)); do
        [[ $words[i] == (-c|--connect) ]] && uri=(--connect "$words[i+1]")
    done
    names=(${(f)"$(vmplug __complete-domains $uri 2>/dev/null)"})
    _describe -t domains 'domain' names
}
"#;

/// Fish: a verb that names a domain offers them while no operand is given.
const FISH: &str = r#"
# Domain names, live from libvirt through `vmplug __complete-domains`.
function __vmplug_domains
    set -l words (commandline -opc)
    set -l uri
    set -l i (contains -i -- -c $words; or contains -i -- --connect $words)
    and set uri --connect $words[(math $i + 1)]
    vmplug __complete-domains $uri $words[2..-1] 2>/dev/null
end
complete -c vmplug -n 'not __fish_use_subcommand' -f -a '(__vmplug_domains)'
"#;

/// `script`, clap's completion for `shell`, with the domain names added.
pub fn with_domains(shell: Shell, script: &str) -> String {
    match shell {
        Shell::Bash => format!("{script}{BASH}"),
        // The domain operand's action, `_default` in clap's script.
        Shell::Zsh => format!(
            "{}{ZSH}",
            script.replace("(as virsh takes them):_default'", "(as virsh takes them):_vmplug_domains'")
        ),
        Shell::Fish => format!("{script}{FISH}"),
        _ => script.to_string(),
    }
}

/// `--zone`'s values (`ZonePolicy`'s names).
pub const ZONES: [&str; 4] = ["auto", "movable", "kernel", "online"];
/// `--mode`'s values (numatune's modes, `NumaMode`'s names).
pub const MODES: [&str; 4] = ["strict", "preferred", "interleave", "restrictive"];

/// `cmd` with `--zone` and `--mode` listing their values, in every verb.
pub fn with_fixed_values(mut cmd: clap::Command) -> clap::Command {
    let verbs: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
    for verb in verbs {
        cmd = cmd.mut_subcommand(verb, |mut sub| {
            for (id, values) in [("zone", ZONES), ("mode", MODES)] {
                if sub.get_arguments().any(|a| a.get_id() == id) {
                    sub = sub.mut_arg(id, |a| a.value_parser(PossibleValuesParser::new(values)));
                }
            }
            sub
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn domains_are_offered_only_to_a_verb_that_names_one() {
        assert_eq!(parse_request(&args(&[])), (None, true));
        assert_eq!(parse_request(&args(&["setvcpus"])), (None, true));
        assert_eq!(parse_request(&args(&["-c", "test:///default", "status"])), (Some("test:///default".into()), true));
        assert_eq!(parse_request(&args(&["--connect=qemu:///system", "vcpupin"])).0.as_deref(), Some("qemu:///system"));
        for verb in ["autoscale", "verify-image", "no-such-verb"] {
            assert_eq!(parse_request(&args(&[verb])), (None, false), "{verb}");
        }
    }

    #[test]
    fn the_names_come_from_libvirt_sorted() {
        use crate::fake::{FakeConnection, FakeDomain};
        let doms =
            ["web2", "db1", "web1"].map(|n| FakeDomain::new(n, &format!("<domain><name>{n}</name></domain>"), None));
        let conn = FakeConnection::new("<capabilities/>", doms.to_vec());
        assert_eq!(domain_names(conn.as_ref()), ["db1", "web1", "web2"]);
    }

    #[test]
    fn every_shell_asks_the_binary() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut cmd = with_fixed_values(crate::cli::Cli::command());
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "vmplug", &mut out);
            let script = with_domains(shell, &String::from_utf8(out).expect("UTF-8"));
            assert!(script.contains(COMPLETE_DOMAINS), "{shell:?}");
            if shell == Shell::Zsh {
                assert!(script.contains(":_vmplug_domains'") && !script.contains("virsh takes them):_default"));
            }
        }
    }

    #[test]
    fn the_values_are_the_ones_the_command_line_parses() {
        for z in ZONES {
            assert!(z.parse::<vmplug_common::protocol::ZonePolicy>().is_ok(), "{z}");
        }
        for m in MODES {
            let mode: crate::domain::NumaMode = m.parse().expect("a numatune mode");
            assert_eq!(mode.as_str(), m);
        }
    }

    #[test]
    fn every_zone_and_mode_option_lists_its_values() {
        let cmd = with_fixed_values(crate::cli::Cli::command());
        let mut seen = 0;
        for sub in cmd.get_subcommands() {
            for a in sub.get_arguments().filter(|a| a.get_id() == "zone" || a.get_id() == "mode") {
                let values: Vec<String> = a.get_possible_values().iter().map(|v| v.get_name().to_string()).collect();
                assert_eq!(values.len(), 4, "{} --{}", sub.get_name(), a.get_id());
                seen += 1;
            }
        }
        assert!(seen >= 3, "zone and mode options found: {seen}");
    }
}
