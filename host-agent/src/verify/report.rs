//! The verdicts of `verify-image`: one per case, with the reason and the
//! guest's evidence, as text, as the JSON envelope's result, and as JUnit XML.

use serde::Serialize;
use vmplug_common::protocol::GuestInfo;

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

    pub fn render_text(&self) -> String {
        let mut s = format!(
            "verify-image {} ({}, booted from a private copy, never written)\n",
            self.image.path.display(),
            self.image.format
        );
        s.push_str(&format!(
            "  guest: {} {}, {} ({}), kernel {}\n",
            self.arch,
            self.machine,
            self.accel.kind.to_uppercase(),
            self.accel.reason,
            self.guest.kernel.as_deref().unwrap_or("unknown")
        ));
        let agent = match &self.guest.agent {
            Some(a) => format!("vmplug-guest {} answered over virtio-serial", a.agent_version),
            None => "no vmplug-guest agent answered".into(),
        };
        let console = if self.guest.console_shell { "a shell on the serial console" } else { "no console shell" };
        s.push_str(&format!("  reached: {agent}; {console}\n"));
        for line in &self.guest.kernel_config {
            s.push_str(&format!("  config: {line}\n"));
        }
        for c in &self.cases {
            let head = format!("  {} {:<18} {:>5.1} s  ", c.verdict.word(), c.id, c.duration_ms as f64 / 1000.0);
            let indent = " ".repeat(head.chars().count());
            s.push_str(&wrap(&head, &indent, &c.reason));
            if let Some(o) = c.kernel_option {
                s.push_str(&wrap(&indent, &indent, &format!("kernel option: {o}")));
            }
            for e in &c.evidence {
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

/// `text` after `first`, wrapped at word boundaries to [`WIDTH`], continued
/// after `rest`; one word longer than a line stays whole.
fn wrap(first: &str, rest: &str, text: &str) -> String {
    let mut out = String::new();
    let mut line = first.to_string();
    let mut empty = true;
    for word in text.split(' ') {
        if !empty && line.chars().count() + 1 + word.chars().count() > WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line = rest.to_string();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

/// Text as XML character data or an attribute value; characters XML 1.0 cannot
/// carry (most control characters, from a guest's console) become U+FFFD.
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
            c if (c as u32) < 0x20 => out.push('\u{FFFD}'),
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
