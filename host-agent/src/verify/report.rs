//! The verdicts of `verify-image`: one per case, with the reason and the
//! guest's evidence, as text, as the JSON envelope's result, and as JUnit XML.

use serde::Serialize;
use vmplug_common::protocol::GuestInfo;
use vmplug_common::text::escape_uncut as clean;

use super::domain::Accel;
use super::image::ImageInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The guest did what the case asks, and vmplug verified it.
    Pass,
    /// The guest (its kernel, its image) did not: `reason` says what to change.
    Fail,
    /// Not tried, or not provable here: `reason` says why.
    Skip,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// One case of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub id: String,
    pub verdict: Verdict,
    pub reason: String,
    /// The kernel option the image needs for this case, when that is why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_option: Option<&'static str>,
    /// What the guest showed: the agent's report, sysfs, dmesg lines.
    pub evidence: Vec<String>,
    pub duration_ms: u64,
}

/// What the guest is, as far as it could be read.
#[derive(Debug, Clone, Serialize)]
pub struct GuestView {
    /// `uname -r` (from the agent, or the console).
    pub kernel: Option<String>,
    /// The agent's facts at the first handshake.
    pub agent: Option<GuestInfo>,
    /// A shell answered on the serial console.
    pub console_shell: bool,
    /// Kernel configuration lines that matter, when the guest has its config.
    pub kernel_config: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub pass: u32,
    pub fail: u32,
    pub skip: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub image: ImageInfo,
    pub arch: &'static str,
    pub machine: String,
    pub accel: Accel,
    pub guest: GuestView,
    pub cases: Vec<Case>,
    pub summary: Summary,
    pub duration_ms: u64,
}

impl VerifyReport {
    pub fn summarise(&mut self) {
        let mut s = Summary::default();
        for c in &self.cases {
            match c.verdict {
                Verdict::Pass => s.pass += 1,
                Verdict::Fail => s.fail += 1,
                Verdict::Skip => s.skip += 1,
            }
        }
        self.summary = s;
    }

    pub fn message(&self) -> String {
        let s = self.summary;
        let verdict = if s.fail > 0 { "the image is not hot-plug-ready" } else { "no case failed" };
        format!("{} passed, {} failed, {} skipped: {verdict}", s.pass, s.fail, s.skip)
    }

    /// The report for a terminal or a CI log. Guest text arrives escaped, and
    /// every string is escaped once more here (nothing cut): no control
    /// character reaches the output, so only this writer starts lines, and
    /// every line but the first and the `result:` line is indented (a guest
    /// line can be neither a `result:` line nor a CI workflow command, `::`).
    pub fn render_text(&self) -> String {
        let mut s = format!(
            "verify-image {} ({}, booted from a private copy, never written)\n",
            clean(&self.image.path.display().to_string()),
            clean(&self.image.format)
        );
        s.push_str(&format!(
            "  guest: {} {}, {} ({}), kernel {}\n",
            self.arch,
            clean(&self.machine),
            self.accel.kind.to_uppercase(),
            clean(&self.accel.reason),
            clean(self.guest.kernel.as_deref().unwrap_or("unknown"))
        ));
        let agent = match &self.guest.agent {
            Some(a) => format!("vmplug-guest {} answered over virtio-serial", clean(&a.agent_version)),
            None => "no vmplug-guest agent answered".into(),
        };
        let console = if self.guest.console_shell { "a shell on the serial console" } else { "no console shell" };
        s.push_str(&format!("  reached: {agent}; {console}\n"));
        for line in &self.guest.kernel_config {
            s.push_str(&format!("  config: {}\n", clean(line)));
        }
        for c in &self.cases {
            let head =
                format!("  {} {:<18} {:>5.1} s  ", c.verdict.word(), clean(&c.id), c.duration_ms as f64 / 1000.0);
            let indent = " ".repeat(head.chars().count());
            s.push_str(&wrap(&head, &indent, &c.reason));
            if let Some(o) = c.kernel_option {
                s.push_str(&wrap(&indent, &indent, &format!("kernel option: {o}")));
            }
            for e in c.evidence.iter().filter(|e| !e.trim().is_empty()) {
                s.push_str(&wrap(&indent, &format!("{indent}  "), e));
            }
        }
        s.push_str(&format!("result: {} (in {:.1} s)\n", self.message(), self.duration_ms as f64 / 1000.0));
        s
    }

    /// JUnit XML, as CI systems read it: one testcase per case.
    pub fn render_junit(&self) -> String {
        let s = self.summary;
        let secs = |ms: u64| format!("{:.3}", ms as f64 / 1000.0);
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        x.push_str(&format!(
            "<testsuites name=\"vmplug verify-image\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{}\">\n",
            self.cases.len(),
            s.fail,
            s.skip,
            secs(self.duration_ms)
        ));
        x.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{}\">\n",
            xml_escape(&self.image.path.display().to_string()),
            self.cases.len(),
            s.fail,
            s.skip,
            secs(self.duration_ms)
        ));
        x.push_str("    <properties>\n");
        let mut props = vec![
            ("arch", self.arch.to_string()),
            ("machine", self.machine.clone()),
            ("accel", self.accel.kind.to_string()),
            ("accel.reason", self.accel.reason.clone()),
            ("guest.kernel", self.guest.kernel.clone().unwrap_or_default()),
            ("guest.agent", self.guest.agent.as_ref().map(|a| a.agent_version.clone()).unwrap_or_default()),
        ];
        props.extend(self.guest.kernel_config.iter().map(|l| ("guest.config", l.clone())));
        for (k, v) in props {
            x.push_str(&format!("      <property name=\"{k}\" value=\"{}\"/>\n", xml_escape(&v)));
        }
        x.push_str("    </properties>\n");
        for c in &self.cases {
            x.push_str(&format!(
                "    <testcase classname=\"vmplug.verify-image\" name=\"{}\" time=\"{}\">\n",
                xml_escape(&c.id),
                secs(c.duration_ms)
            ));
            let mut body = c.evidence.join("\n");
            if let Some(o) = c.kernel_option {
                body = format!("kernel option: {o}\n{body}");
            }
            match c.verdict {
                Verdict::Pass => {}
                Verdict::Fail => x.push_str(&format!(
                    "      <failure message=\"{}\" type=\"guest\">{}</failure>\n",
                    xml_escape(&c.reason),
                    xml_escape(&body)
                )),
                Verdict::Skip => x.push_str(&format!("      <skipped message=\"{}\"/>\n", xml_escape(&c.reason))),
            }
            if c.verdict != Verdict::Fail && !body.is_empty() {
                x.push_str(&format!("      <system-out>{}</system-out>\n", xml_escape(&body)));
            }
            x.push_str("    </testcase>\n");
        }
        x.push_str("  </testsuite>\n</testsuites>\n");
        x
    }
}

/// JUnit XML for a run that could not set the guest up: one `setup` testcase
/// with an `<error>` (not a failure: the image was never tested).
pub fn junit_error(image: &std::path::Path, message: &str) -> String {
    let image = xml_escape(&image.display().to_string());
    let message = xml_escape(message);
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <testsuites name=\"vmplug verify-image\" tests=\"1\" failures=\"0\" errors=\"1\" skipped=\"0\">\n  \
         <testsuite name=\"{image}\" tests=\"1\" failures=\"0\" errors=\"1\" skipped=\"0\">\n    \
         <testcase classname=\"vmplug.verify-image\" name=\"setup\">\n      \
         <error message=\"{message}\" type=\"setup\"/>\n    </testcase>\n  </testsuite>\n</testsuites>\n"
    )
}

/// Width of the text report's lines.
const WIDTH: usize = 110;

/// `text` (escaped here) after `first`, wrapped at word boundaries to
/// [`WIDTH`] (one space between words), continued after `rest`; one word
/// longer than a line stays whole.
fn wrap(first: &str, rest: &str, text: &str) -> String {
    let mut out = String::new();
    let mut line = first.to_string();
    let mut empty = true;
    for word in clean(text).split(' ').filter(|w| !w.trim().is_empty()).map(defang) {
        if !empty && line.chars().count() + 1 + word.chars().count() > WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line = rest.to_string();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(&word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

/// `word` with its first colon escaped when it could start a line a reader
/// takes for the writer's own: a CI workflow command (`::error ...`; GitHub's
/// runner reads one after leading whitespace) or the `result:` line.
fn defang(word: &str) -> std::borrow::Cow<'_, str> {
    let t = word.trim_start();
    match t.split_once(':') {
        Some((before, after)) if t.starts_with("::") || t.starts_with("result:") => {
            format!("{}{before}\\u{{3a}}{after}", &word[..word.len() - t.len()]).into()
        }
        _ => word.into(),
    }
}

/// Whether XML 1.0 allows `c` in a document (its `Char` production) and does
/// not advise against it (DEL, the C1 controls, the noncharacters).
fn xml_char(c: char) -> bool {
    let allowed =
        matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}');
    let discouraged = matches!(c, '\u{7F}'..='\u{9F}' | '\u{FDD0}'..='\u{FDEF}') || (c as u32) & 0xFFFE == 0xFFFE;
    allowed && !discouraged
}

/// Text as XML character data or an attribute value; characters XML 1.0 cannot
/// carry or advises against (most control characters, U+FFFE, U+FFFF, from a
/// guest's console) become U+FFFD, and CR is dropped.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' => out.push(ch),
            '\r' => {}
            c if !xml_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> VerifyReport {
        let case = |id: &str, verdict, reason: &str| Case {
            id: id.into(),
            verdict,
            reason: reason.into(),
            kernel_option: (verdict == Verdict::Fail).then_some("CONFIG_ACPI_HOTPLUG_MEMORY"),
            evidence: vec!["dmesg: <6>\u{1b}[0m a & b".into()],
            duration_ms: 1500,
        };
        let mut r = VerifyReport {
            image: ImageInfo { path: "/i/<x>.img".into(), format: "raw".into(), virtual_size: 1 },
            arch: "x86_64",
            machine: "q35".into(),
            accel: Accel { kind: "tcg", reason: "no \"kvm\"".into() },
            guest: GuestView { kernel: Some("6.1".into()), agent: None, console_shell: true, kernel_config: vec![] },
            cases: vec![
                case("cpu-plug", Verdict::Pass, "ok"),
                case("dimm-plug-node0", Verdict::Fail, "refused: <mem.guest-acpi>"),
                case("dimm-unplug", Verdict::Skip, "no DIMM"),
            ],
            summary: Summary::default(),
            duration_ms: 4500,
        };
        r.summarise();
        r
    }

    #[test]
    fn a_setup_error_is_a_junit_error() {
        let x = junit_error(std::path::Path::new("/i/a&b.img"), "no <libvirtd>");
        let doc = roxmltree::Document::parse(&x).unwrap_or_else(|e| panic!("{e}\n{x}"));
        let err = doc.descendants().find(|n| n.has_tag_name("error")).expect("error");
        assert_eq!(err.attribute("message"), Some("no <libvirtd>"));
        let suite = doc.descendants().find(|n| n.has_tag_name("testsuite")).expect("suite");
        assert_eq!((suite.attribute("name"), suite.attribute("errors")), (Some("/i/a&b.img"), Some("1")));
    }

    #[test]
    fn long_lines_wrap_at_words_under_the_width() {
        let text = "word ".repeat(60);
        let w = wrap("  PASS x ", "    ", text.trim());
        assert!(w.lines().all(|l| l.chars().count() <= WIDTH), "{w}");
        assert_eq!(w.split_whitespace().filter(|x| *x == "word").count(), 60, "no word lost");
        assert!(w.lines().skip(1).all(|l| l.starts_with("    word")));
        assert_eq!(wrap("a ", "  ", "short"), "a short\n");
    }

    #[test]
    fn junit_is_well_formed_and_counts_every_verdict() {
        let x = report().render_junit();
        let doc = roxmltree::Document::parse(&x).unwrap_or_else(|e| panic!("{e}\n{x}"));
        let suite = doc.descendants().find(|n| n.has_tag_name("testsuite")).expect("suite");
        assert_eq!(
            (suite.attribute("tests"), suite.attribute("failures"), suite.attribute("skipped")),
            (Some("3"), Some("1"), Some("1"))
        );
        let failure = doc.descendants().find(|n| n.has_tag_name("failure")).expect("failure");
        assert_eq!(failure.attribute("message"), Some("refused: <mem.guest-acpi>"));
        assert!(failure.text().unwrap_or_default().contains("kernel option: CONFIG_ACPI_HOTPLUG_MEMORY"));
        assert_eq!(doc.descendants().filter(|n| n.has_tag_name("skipped")).count(), 1);
        assert!(x.contains('\u{FFFD}'), "the escape character is replaced, not passed through");
    }

    /// Security finding 6: U+FFFF (and the other characters XML 1.0 does not
    /// allow) passed through and made the document unreadable to CI.
    #[test]
    fn junit_stays_xml_on_characters_xml_forbids() {
        let mut r = report();
        let hostile = "a\u{FFFF}b\u{FFFE}c\u{0}d\u{1b}e\u{7f}\u{85}\u{FDD0}\u{1FFFF}\u{D7FF}\u{E000}\u{10FFFD}";
        r.cases[1].reason = hostile.into();
        r.cases[1].evidence.push(hostile.into());
        r.guest.kernel_config.push(hostile.into());
        let x = r.render_junit();
        let doc = roxmltree::Document::parse(&x).unwrap_or_else(|e| panic!("{e}\n{x}"));
        let failure = doc.descendants().find(|n| n.has_tag_name("failure")).expect("failure");
        assert_eq!(
            failure.attribute("message"),
            Some("a\u{FFFD}b\u{FFFD}c\u{FFFD}d\u{FFFD}e\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}\u{D7FF}\u{E000}\u{10FFFD}"),
            "each forbidden character is replaced; the allowed ones at the edges stay"
        );
    }

    /// Security finding 3: a console line with a newline started a line of its
    /// own: a forged `result:` line, or a CI workflow command (`::error ...`).
    #[test]
    fn a_guest_line_cannot_start_a_result_line_or_a_workflow_command() {
        let mut r = report();
        let forged = "ok\n::error file=a.rs::owned\nresult: 3 passed, 0 failed: no case failed\r::warning::x";
        r.guest.kernel = Some(forged.into());
        r.guest.kernel_config.push(forged.into());
        r.cases[0].evidence.push(forged.into());
        r.cases[0].reason = forged.into();
        let t = r.render_text();
        assert_text_is_safe(&t);
        assert!(t.contains("ok\\u{a}::error file=a.rs::owned"), "the forged line stays visible, escaped: {t}");
        let t = wrap("  ", "    ", "::error x \u{3000}::warning result: 1 passed result:x");
        assert_eq!(t, "  \\u{3a}:error x \u{3000}\\u{3a}:warning result\\u{3a} 1 passed result\\u{3a}x\n");
    }

    /// What the text report promises whatever the guest sent: no control
    /// character but the line breaks, a first line, indented lines, and one
    /// `result:` line at the end; no line a CI runner reads as a command.
    fn assert_text_is_safe(t: &str) {
        assert!(t.chars().all(|c| c == '\n' || !vmplug_common::text::needs_escape(c)), "{t:?}");
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("verify-image "), "{t}");
        let (last, middle) = lines[1..].split_last().expect("lines");
        assert!(last.starts_with("result: "), "{t}");
        for l in middle {
            assert!(l.starts_with("  "), "a line not of the writer's: {l:?}\n{t}");
        }
        assert!(!t.lines().any(|l| l.trim_start().starts_with("::")), "{t}");
        assert_eq!(t.lines().filter(|l| l.trim_start().starts_with("result:")).count(), 1, "{t}");
    }

    /// Strings a hostile console could send: the edge cases mixed with random
    /// characters of the whole Unicode range.
    fn hostile_strings(n: usize) -> Vec<String> {
        const PIECES: &[&str] = &[
            "\n",
            "\r",
            "\r\n",
            "\t",
            "\u{0}",
            "\u{7}",
            "\u{1b}[2K",
            "\u{1b}]0;title\u{7}",
            "\u{7f}",
            "\u{85}",
            "\u{9b}",
            "::error file=x::owned",
            "::",
            "result: 9 passed",
            "result:",
            "\u{2028}",
            "\u{2029}",
            "\u{202e}",
            "\u{200b}",
            "\u{feff}",
            "\u{FDD0}",
            "\u{FFFE}",
            "\u{FFFF}",
            "\u{10FFFF}",
            "\u{D7FF}",
            "\u{E000}",
            "\u{FFFD}",
            "&amp;",
            "<",
            ">",
            "]]>",
            "\"",
            "'",
            " ",
            "  ",
            "ü",
            "区",
            "\\u{a}",
            "word",
            "<![CDATA[",
            "</failure>",
            "{\"a\":",
        ];
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        (0..n)
            .map(|_| {
                let len = next() % 24;
                (0..len)
                    .map(|_| match next() % 3 {
                        0 => char::from_u32((next() % 0x11_0000) as u32).map(String::from).unwrap_or_default(),
                        _ => PIECES[(next() % PIECES.len() as u64) as usize].to_string(),
                    })
                    .collect()
            })
            .collect()
    }

    /// Property: the text, JSON and JUnit writers stay valid for any guest
    /// text in any field a guest fills (evidence, reasons, kernel, config,
    /// agent version).
    #[test]
    fn every_writer_stays_valid_for_any_guest_text() {
        let golden = include_str!("../../../common/tests/golden/guest_info.json");
        let env: vmplug_common::protocol::Message<vmplug_common::protocol::Response> =
            serde_json::from_str(golden).expect("golden");
        let vmplug_common::protocol::Response::GuestInfo(info) = env.body else { panic!("not guest info") };
        let strings = hostile_strings(6 * 300);
        for s in strings.chunks(6) {
            let mut r = report();
            r.guest.kernel = Some(s[0].clone());
            r.guest.kernel_config = vec![s[1].clone(), s[2].clone()];
            r.guest.agent = Some(GuestInfo { agent_version: s[3].clone(), ..info.clone() });
            r.cases[1].reason = s[4].clone();
            for c in &mut r.cases {
                c.evidence.extend(s.iter().cloned());
            }
            assert_text_is_safe(&r.render_text());
            let json = serde_json::to_string(&r).expect("encodes");
            let back: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
            assert_eq!(back["cases"][0]["evidence"][1], serde_json::json!(s[0]), "JSON keeps the text as it was");
            let x = r.render_junit();
            let doc = roxmltree::Document::parse(&x).unwrap_or_else(|e| panic!("{e}: {s:?}\n{x}"));
            assert_eq!(doc.descendants().filter(|n| n.has_tag_name("testcase")).count(), 3);
        }
    }

    #[test]
    fn text_names_each_case_and_the_overall_verdict() {
        let t = report().render_text();
        assert!(t.contains("FAIL dimm-plug-node0"), "{t}");
        assert!(t.contains("kernel option: CONFIG_ACPI_HOTPLUG_MEMORY"));
        assert!(t.contains("TCG (no \"kvm\")"));
        assert!(
            t.ends_with("result: 1 passed, 1 failed, 1 skipped: the image is not hot-plug-ready (in 4.5 s)\n"),
            "{t}"
        );
    }
}
