//! The manual pages' parts that clap cannot derive from the command line: EXIT
//! STATUS (from [`Outcome`], the one type that chooses an exit code), ENVIRONMENT,
//! FILES and SEE ALSO, the `.TH` header's date, and the line discipline that
//! `mandoc -T lint` asks for. `vmplug-assets` renders the pages with them.

use std::fmt::Write as _;

use crate::report::Outcome;

/// Every outcome, in exit-code order. [`meaning`] matches them exhaustively, so
/// a new variant cannot reach the pages without a sentence.
pub const OUTCOMES: [Outcome; 9] = [
    Outcome::Ok,
    Outcome::Error,
    Outcome::Refused,
    Outcome::LibvirtError,
    Outcome::GuestTimeout,
    Outcome::GuestFailed,
    Outcome::Partial,
    Outcome::AgentUnreachable,
    Outcome::Usage,
];

/// What an exit status means, as README's "Exit codes" says it.
pub fn meaning(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "Done, and verified inside the guest.",
        Outcome::Error => "An error before acting (the domain was not found, a file was unreadable); nothing changed.",
        Outcome::Refused => "Refused by preflight; nothing changed.",
        Outcome::LibvirtError => "A libvirt error (also when libvirtd went away during the command).",
        Outcome::GuestTimeout => "The guest did not confirm in time.",
        Outcome::GuestFailed => "The guest reported a failure, or disagrees with libvirt.",
        Outcome::Partial => {
            "Partial: some steps were applied. Repeat attach-memory with the same --request-id: it attaches only what is missing."
        }
        Outcome::AgentUnreachable => "The guest agent could not be reached.",
        Outcome::Usage => "Usage: the command line is wrong; nothing was read or changed.",
    }
}

/// Which page a section is for: the top page (`vmplug.1`) or a verb's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page<'a> {
    Top,
    Verb(&'a str),
}

/// Escapes text for a roff text line: backslashes, hyphens (which roff would
/// otherwise print as typographic hyphens) and a leading control character.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            _ => out.push(c),
        }
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

fn tagged(out: &mut String, tag: &str, text: &str) {
    let _ = writeln!(out, ".TP\n\\fB{}\\fR\n{}", escape(tag), escape(text));
}

fn see_also(out: &mut String, refs: &[(&str, &str)]) {
    out.push_str(".SH \"SEE ALSO\"\n");
    for (i, (name, sec)) in refs.iter().enumerate() {
        let comma = if i + 1 < refs.len() { "," } else { "" };
        let _ = writeln!(out, ".BR {} ({}){comma}", escape(name), sec);
    }
}

/// EXIT STATUS, ENVIRONMENT, FILES and SEE ALSO for `page`; `verbs` are the
/// verbs that have pages of their own (the top page names them).
pub fn sections(page: Page<'_>, verbs: &[&str]) -> String {
    let mut out = String::new();
    out.push_str(".SH \"EXIT STATUS\"\n");
    if page == Page::Verb("verify-image") {
        tagged(&mut out, "0", "No case failed.");
        tagged(&mut out, "1", "The guest could not be set up (the image was unreadable, no libvirt, interrupted); under --report junit a document with one setup <error> is still printed.");
        tagged(&mut out, "5", "A case failed: the image is not hot-plug-ready.");
        tagged(&mut out, "64", meaning(Outcome::Usage));
    } else {
        for o in OUTCOMES {
            tagged(&mut out, &o.exit_code().to_string(), meaning(o));
        }
        let _ = writeln!(out, ".PP\n{}", escape("Under --json the same code is the envelope's exit_code."));
    }
    out.push_str(".SH ENVIRONMENT\n");
    tagged(&mut out, "LIBVIRT_DEFAULT_URI", "The libvirt URI when -c/--connect is not given, as for virsh(1).");
    tagged(&mut out, "RUST_LOG", "Log filter of the messages on standard error (error, warn, info, debug, trace or a tracing directive); default warn.");
    tagged(
        &mut out,
        "LC_ALL, LC_CTYPE, LANG",
        "The first one set decides the character set, as in the C library: unless it names UTF-8, the text output is ASCII.",
    );
    out.push_str(".SH FILES\n");
    match page {
        Page::Verb("autoscale") | Page::Top => {
            tagged(&mut out, "/etc/vmplug/autoscale.toml", "The policy vmplug-autoscale.service runs autoscale with.");
            tagged(
                &mut out,
                "/usr/lib/systemd/system/vmplug-autoscale.service",
                "The autoscale daemon's unit (installed disabled).",
            );
        }
        _ => {}
    }
    if matches!(page, Page::Verb("verify-image") | Page::Top) {
        tagged(
            &mut out,
            "/var/lib/vmplug/verify",
            "verify-image's default --work-dir: one fresh directory per run below it.",
        );
    }
    tagged(
        &mut out,
        "/usr/share/doc/vmplug/README.md",
        "The full manual: every verb, the preflight rules, the JSON envelope, autoscale's metrics and webhook.",
    );
    let mut refs: Vec<(&str, &str)> = Vec::new();
    let names: Vec<String>;
    match page {
        Page::Top => {
            names = verbs.iter().map(|v| format!("vmplug-{v}")).collect();
            refs.extend(names.iter().map(|n| (n.as_str(), "1")));
        }
        Page::Verb(_) => refs.push(("vmplug", "1")),
    }
    refs.push(("virsh", "1"));
    if matches!(page, Page::Verb("autoscale") | Page::Top) {
        refs.push(("systemctl", "1"));
    }
    see_also(&mut out, &refs);
    out
}

/// `YYYY-MM-DD` of a Unix time (UTC), for the `.TH` date slot.
pub fn date(unix: u64) -> String {
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let days = (unix / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The page's date: `SOURCE_DATE_EPOCH` (reproducible builds; `make package` sets
/// it to the last commit's time), else now.
pub fn page_date(source_date_epoch: Option<&str>) -> String {
    let unix = source_date_epoch.and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    });
    date(unix)
}

/// Longest text line `mandoc -T lint` accepts without a style message.
const MAX_LINE: usize = 80;

/// Applies the line discipline of `mandoc -T lint`: no trailing white space, no
/// text line over 80 bytes (filled text is broken between words, which roff
/// joins again), no text line that roff would take for a request, no `.br`
/// beside a blank line (which already breaks the line: clap writes both around
/// its lists of possible values).
pub fn tidy(roff: &str) -> String {
    let mut out = String::with_capacity(roff.len());
    let mut fill = true;
    let lines: Vec<&str> = roff.lines().map(str::trim_end).collect();
    for (i, &line) in lines.iter().enumerate() {
        let blank_beside = |j: Option<usize>| j.and_then(|j| lines.get(j)).is_some_and(|l| l.is_empty());
        if line == ".br" && (blank_beside(i.checked_sub(1)) || blank_beside(Some(i + 1))) {
            continue;
        }
        if line.starts_with(".nf") {
            fill = false;
        } else if line.starts_with(".fi") {
            fill = true;
        }
        if !fill || line.starts_with('.') || line.starts_with('\'') || line.len() <= MAX_LINE {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut current = String::new();
        for word in line.split(' ').filter(|w| !w.is_empty()) {
            if !current.is_empty() && current.len() + 1 + word.len() > MAX_LINE {
                out.push_str(&current);
                out.push('\n');
                current.clear();
            }
            if current.is_empty() && (word.starts_with('.') || word.starts_with('\'')) {
                current.push_str("\\&");
            } else if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(word);
        }
        out.push_str(&current);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_listed_once_with_its_code() {
        let codes: std::collections::BTreeSet<u8> = OUTCOMES.iter().map(|o| o.exit_code()).collect();
        assert_eq!(codes.len(), OUTCOMES.len());
        assert_eq!(codes.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5, 6, 7, 64]);
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_796_400_000), "2026-12-04");
        assert_eq!(page_date(Some("86400")), "1970-01-02");
    }

    #[test]
    fn tidy_breaks_long_text_lines_between_words_only() {
        let long = format!("{} .dot 'quote", "word ".repeat(30));
        let out = tidy(&format!(".TH X 1  \n{long}\n.nf\n{long}\n.fi\n"));
        for line in out.lines() {
            assert_eq!(line, line.trim_end());
        }
        let filled: Vec<&str> = out.lines().skip(1).take_while(|l| !l.starts_with(".nf")).collect();
        assert!(filled.len() > 1 && filled.iter().all(|l| l.len() <= MAX_LINE && !l.starts_with('.')));
        assert_eq!(filled.join(" ").replace("\\&", ""), long.split_whitespace().collect::<Vec<_>>().join(" "));
        assert!(out.contains(&format!(".nf\n{}\n.fi", long.trim_end())), "no-fill text is left alone");
        assert_eq!(tidy("a\n.br\n\n.br\nb\n.br\nc\n"), "a\n\nb\n.br\nc\n");
    }

    #[test]
    fn sections_name_every_exit_code_and_no_unshipped_page() {
        let top = sections(Page::Top, &["setvcpus", "autoscale"]);
        for o in OUTCOMES {
            assert!(top.contains(&format!("\\fB{}\\fR", o.exit_code())), "{o:?}");
        }
        assert!(top.contains(".BR vmplug\\-setvcpus (1),\n") && !top.contains("help"));
        let verify = sections(Page::Verb("verify-image"), &[]);
        assert!(verify.contains("A case failed") && verify.contains("/var/lib/vmplug/verify"));
    }
}
