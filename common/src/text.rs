//! Text that came from the other side of the link, made safe to print.
//!
//! A guest controls every string it sends (kernel version, zone names, error
//! messages). Printed raw, an escape sequence or a newline in one of them could
//! rewrite the operator's terminal or forge a line of a report. The host escapes
//! every guest string once, where the frame is decoded ([`Response::escape_text`]),
//! so nothing downstream (text, JSON, logs) can carry a control character.

use crate::protocol::{Event, GuestInfo, ItemOutcome, QueueState, Report, Response};

/// Longest guest string kept, in characters; the rest is cut and marked.
pub const MAX_TEXT_CHARS: usize = 512;

/// Whether `c` may not be shown as itself: control characters (C0, DEL, C1),
/// the invisible formatting characters that reorder or hide text (bidi
/// overrides and isolates, zero-width characters, the BOM), the line and
/// paragraph separators (a line break to some viewers), and the
/// noncharacters (U+FDD0..U+FDEF and U+xFFFE/U+xFFFF: U+FFFE and U+FFFF
/// make an XML document invalid).
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{61C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FDD0}'..='\u{FDEF}'
                | '\u{FEFF}'
        )
        || (c as u32) & 0xFFFE == 0xFFFE
}

/// `s` with every such character written as `\u{XX}`, cut to [`MAX_TEXT_CHARS`].
pub fn escape(s: &str) -> String {
    if s.chars().count() <= MAX_TEXT_CHARS && !s.chars().any(needs_escape) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len().min(MAX_TEXT_CHARS * 4));
    for (i, c) in s.chars().enumerate() {
        if i == MAX_TEXT_CHARS {
            out.push_str("…(cut)");
            break;
        }
        push_escaped(&mut out, c);
    }
    out
}

/// Multi-line guest text (a console command's output, a log's tail) as its
/// lines, each [`escape`]d: the line breaks stay breaks between items, never
/// inside one.
pub fn escape_lines(s: &str) -> Vec<String> {
    s.lines().map(escape).collect()
}

/// `s` with every character of [`needs_escape`] escaped and nothing cut: for a
/// writer that must not print a control character whatever it was handed
/// (text already bounded, or its own).
pub fn escape_uncut(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    s.chars().for_each(|c| push_escaped(&mut out, c));
    std::borrow::Cow::Owned(out)
}

fn push_escaped(out: &mut String, c: char) {
    if needs_escape(c) {
        out.push_str(&format!("\\u{{{:x}}}", c as u32));
    } else {
        out.push(c);
    }
}

fn escape_in_place(s: &mut String) {
    let e = escape(s);
    if e != *s {
        *s = e;
    }
}

fn escape_opt(s: &mut Option<String>) {
    if let Some(s) = s {
        escape_in_place(s);
    }
}

fn escape_outcome(o: &mut ItemOutcome) {
    if let ItemOutcome::Failed { message, .. } = o {
        escape_in_place(message);
    }
}

impl GuestInfo {
    fn escape_text(&mut self) {
        escape_in_place(&mut self.agent_version);
        escape_in_place(&mut self.kernel);
        self.capabilities.iter_mut().for_each(escape_in_place);
        if let Some(m) = &mut self.memory {
            m.zones = std::mem::take(&mut m.zones).into_iter().map(|(k, v)| (escape(&k), v)).collect();
            escape_opt(&mut m.auto_online_blocks);
        }
    }
}

impl Report {
    fn escape_text(&mut self) {
        self.cpus.iter_mut().for_each(|c| escape_outcome(&mut c.outcome));
        for b in &mut self.blocks {
            escape_opt(&mut b.zone);
            escape_outcome(&mut b.outcome);
        }
        self.queues.iter_mut().for_each(QueueState::escape_text);
    }
}

impl QueueState {
    fn escape_text(&mut self) {
        escape_in_place(&mut self.device);
        if let Some(c) = &mut self.last {
            escape_outcome(&mut c.outcome);
        }
    }
}

impl Response {
    /// Escapes every string the guest sent (see the module docs).
    pub fn escape_text(&mut self) {
        match self {
            Response::GuestInfo(info) => info.escape_text(),
            Response::Report(r) => r.escape_text(),
            Response::Pressure(_) => {}
            Response::Queues(q) => q.devices.iter_mut().for_each(QueueState::escape_text),
            Response::Forecast(f) => {
                f.devices.iter_mut().for_each(|d| escape_opt(&mut d.held));
                if let Some(v) = &mut f.veto {
                    escape_in_place(&mut v.floor);
                    escape_in_place(&mut v.reason);
                }
            }
            Response::Blocks { blocks } => blocks.iter_mut().for_each(|b| escape_opt(&mut b.zone)),
            Response::Error(e) => escape_in_place(&mut e.message),
            Response::Event(ev) => match ev {
                Event::AgentStarted { version } => escape_in_place(version),
                Event::MemoryOnlined { zone, .. } => escape_opt(zone),
                Event::OnlineFailed { what, .. } => escape_in_place(what),
                Event::CpuAdded { .. } | Event::CpuOnlined { .. } | Event::MemoryAdded { .. } => {}
            },
        }
    }
}

impl Event {
    /// Bytes this event holds on the heap and inline, for byte-bounded logs.
    pub fn held_bytes(&self) -> usize {
        std::mem::size_of::<Event>()
            + match self {
                Event::AgentStarted { version } => version.len(),
                Event::MemoryOnlined { zone, .. } => zone.as_ref().map_or(0, String::len),
                Event::OnlineFailed { what, .. } => what.len(),
                Event::CpuAdded { .. } | Event::CpuOnlined { .. } | Event::MemoryAdded { .. } => 0,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{BlockResult, ErrorBody, ErrorCode, QueueChange};

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert_eq!(escape("6.1.0-13-amd64"), "6.1.0-13-amd64");
        assert_eq!(escape("a\nvcpus 8 of 8"), "a\\u{a}vcpus 8 of 8");
        assert_eq!(escape("\u{1b}[2K\rforged"), "\\u{1b}[2K\\u{d}forged");
        assert_eq!(escape("x\u{202e}gnp.exe"), "x\\u{202e}gnp.exe");
        assert_eq!(escape("tab\there\u{7f}\u{9b}"), "tab\\u{9}here\\u{7f}\\u{9b}");
        assert_eq!(escape("Movable ü 区"), "Movable ü 区", "printable non-ASCII stays");
    }

    /// Security finding 6: U+FFFF passed through and made the JUnit report
    /// invalid XML; the line separators broke lines in some viewers.
    #[test]
    fn noncharacters_and_line_separators_are_escaped() {
        assert_eq!(escape("a\u{FFFF}b\u{FFFE}"), "a\\u{ffff}b\\u{fffe}");
        assert_eq!(escape("\u{FDD0}\u{FDEF}\u{1FFFF}\u{10FFFE}"), "\\u{fdd0}\\u{fdef}\\u{1ffff}\\u{10fffe}");
        assert_eq!(escape("x\u{2028}::error y\u{2029}"), "x\\u{2028}::error y\\u{2029}");
        assert_eq!(escape("\u{2060}\u{61C}"), "\\u{2060}\\u{61c}");
        assert_eq!(escape("\u{FDCF}\u{FDF0}\u{FFFD}\u{1F600}"), "\u{FDCF}\u{FDF0}\u{FFFD}\u{1F600}", "neighbours stay");
    }

    #[test]
    fn multi_line_text_is_escaped_line_by_line() {
        assert_eq!(
            escape_lines("CONFIG_A=y\r\n\u{1b}[2Kresult: PASS\n::error x\rforged"),
            vec!["CONFIG_A=y", "\\u{1b}[2Kresult: PASS", "::error x\\u{d}forged"]
        );
        assert!(escape_lines("").is_empty());
    }

    #[test]
    fn uncut_escaping_keeps_length_and_borrows_clean_text() {
        let long = format!("{}\n", "k".repeat(10_000));
        assert_eq!(escape_uncut(&long), format!("{}\\u{{a}}", "k".repeat(10_000)));
        assert!(matches!(escape_uncut("clean ü"), std::borrow::Cow::Borrowed("clean ü")));
    }

    #[test]
    fn long_strings_are_cut() {
        let long = "k".repeat(10_000);
        let e = escape(&long);
        assert_eq!(e.chars().count(), MAX_TEXT_CHARS + "…(cut)".chars().count());
        assert!(e.ends_with("…(cut)"));
    }

    #[test]
    fn every_guest_string_of_a_response_is_escaped() {
        let mut r = Response::Report(Report {
            cpus: vec![],
            blocks: vec![BlockResult {
                index: 1,
                start: 0,
                node: None,
                zone: Some("Movable\n  guest: memory9 onlined".into()),
                outcome: ItemOutcome::Failed { errno: 16, message: "busy\u{1b}]0;owned\u{7}".into() },
            }],
            cpus_online: Default::default(),
            memory_online: Default::default(),
            complete: false,
            timed_out: false,
            duration_ms: 0,
            queues: vec![QueueState {
                device: "eth0\u{1b}[2J".into(),
                max: 4,
                combined: Some(2),
                last: Some(QueueChange {
                    from: 2,
                    to: 4,
                    outcome: ItemOutcome::Failed { errno: 16, message: "x\ny".into() },
                }),
            }],
        });
        r.escape_text();
        let text = serde_json::to_string(&r).expect("json");
        assert!(!text.contains("\\n") && !text.contains("\\u001b") && !text.contains("\\u0007"), "{text}");
        let mut e = Response::Error(ErrorBody { code: ErrorCode::Internal, message: "a\nb".into() });
        e.escape_text();
        assert_eq!(e, Response::Error(ErrorBody { code: ErrorCode::Internal, message: "a\\u{a}b".into() }));
    }
}
