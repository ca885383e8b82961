//! A shell on the guest's serial console (a Unix socket QEMU listens on): run a
//! command, get its output and exit status, every read bounded. It needs a shell
//! on the console (an autologin getty, or the test initramfs's); without one,
//! `connect` says so after its timeout. What the guest writes there is bounded
//! in memory: a command's output and the transcript keep their last bytes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::HarnessError;
use crate::wait::Wait;

/// What the test initramfs prints when its console shell exits and another starts.
const SHELL_RESTARTED: &str = "vmplug-e2e: console shell exited";
/// Most bytes of one command's output kept (its end); a guest flooding its
/// console cannot grow the host's memory past this.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// Most bytes of the transcript kept (its end).
pub const MAX_TRANSCRIPT_BYTES: usize = 256 * 1024;

/// How far past `@@END-n ` its closing `@@` may be (the exit status between).
const STATUS_WINDOW: usize = 24;

/// The largest character boundary of `s` at or below `i`.
fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Text that keeps only its last `cap` bytes (at a character boundary) and
/// counts what it dropped.
#[derive(Debug)]
pub struct TextTail {
    text: String,
    cap: usize,
    dropped: u64,
}

impl TextTail {
    pub fn new(cap: usize) -> Self {
        TextTail { text: String::new(), cap, dropped: 0 }
    }

    pub fn push_str(&mut self, s: &str) {
        self.text.push_str(s);
        if self.text.len() > self.cap {
            // Down to three quarters, so a flood moves the kept text once per
            // quarter of the cap read, not on every read.
            let mut cut = self.text.len() - self.cap * 3 / 4;
            while !self.text.is_char_boundary(cut) {
                cut += 1;
            }
            self.text.drain(..cut);
            self.dropped += cut as u64;
        }
    }

    /// Bytes pushed so far, dropped ones included.
    pub fn end(&self) -> u64 {
        self.dropped + self.text.len() as u64
    }

    /// Where `pat` first occurs at or after `from` (bytes since the first
    /// push, dropped ones included), as an index into the kept text.
    pub fn find_since(&self, pat: &str, from: u64) -> Option<usize> {
        let i = usize::try_from(from.saturating_sub(self.dropped)).unwrap_or(usize::MAX);
        let i = floor_boundary(&self.text, i);
        self.text[i..].find(pat).map(|k| i + k)
    }

    /// The text kept.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Bytes dropped from the front.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl std::fmt::Display for TextTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.dropped > 0 {
            writeln!(f, "[vmplug: {} earlier bytes dropped]", self.dropped)?;
        }
        f.write_str(&self.text)
    }
}

/// UTF-8 decoding across reads: a character split between two reads is
/// decoded whole once its last byte has come; invalid bytes become U+FFFD.
#[derive(Debug, Default)]
struct Utf8Reader {
    /// The start of a character whose other bytes have not come yet (< 4 bytes).
    pending: Vec<u8>,
}

impl Utf8Reader {
    fn decode(&mut self, bytes: &[u8]) -> String {
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(bytes);
        let mut out = String::with_capacity(buf.len());
        let mut rest = &buf[..];
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(good));
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &bad[n..];
                        }
                        // Incomplete at the end: wait for the rest.
                        None => {
                            self.pending = bad.to_vec();
                            rest = &[];
                        }
                    }
                }
            }
        }
        out
    }
}

#[derive(Debug)]
pub struct Console {
    stream: UnixStream,
    seq: u64,
    decoder: Utf8Reader,
    /// The end of everything read so far (shown when something fails).
    pub transcript: TextTail,
}

impl Console {
    /// Connects to the console socket at `path` and waits until a shell there
    /// runs a command, for up to `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Console, HarnessError> {
        let end = Instant::now() + timeout;
        let mut last = None;
        let stream = Wait::new(format!("console {}", path.display()), timeout)
            .every(Duration::from_millis(100))
            .until_blocking(|| UnixStream::connect(path).map_err(|e| last = Some(e)).ok())
            .map_err(|w| match &last {
                Some(e) => HarnessError(format!("console {}: {e}", path.display())),
                None => HarnessError(w.to_string()),
            })?;
        let mut c = Console::on_stream(stream)?;
        // No echo of what we type; quiet kernel messages on this console. A login
        // shell may not be reading yet (getty flushes early input): ask again.
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match c.exec("stty -echo; dmesg -n 1", left.min(Duration::from_secs(3))) {
                Ok(_) => return Ok(c),
                Err(e) if Instant::now() >= end => {
                    return Err(HarnessError(format!("no shell answers on the serial console within {timeout:?}: {e}")))
                }
                Err(_) => {}
            }
        }
    }

    /// A console on a connected stream, before any shell set-up.
    fn on_stream(stream: UnixStream) -> Result<Console, HarnessError> {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| HarnessError(format!("console read timeout: {e}")))?;
        Ok(Console { stream, seq: 0, decoder: Utf8Reader::default(), transcript: TextTail::new(MAX_TRANSCRIPT_BYTES) })
    }

    /// Runs `cmd` in the guest shell; `Err` on timeout, with what was read. If the
    /// console shell dies before it starts the command (the test initramfs starts
    /// a new one and says so), the new shell is set up and gets the command once
    /// more: the command never ran, so sending it again cannot run it twice.
    pub fn exec(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), HarnessError> {
        match self.exec_once(cmd, timeout)? {
            Some(done) => Ok(done),
            None => {
                self.transcript
                    .push_str("\n[vmplug: the console shell restarted before the command; sending it again]\n");
                // The old shell may have read part of the line before it died,
                // leaving the new one inside an open quote (measured: `> `
                // prompts until the timeout). Ctrl-C drops whatever it holds.
                self.stream.write_all(b"\x03").map_err(|e| HarnessError(format!("console write: {e}")))?;
                std::thread::sleep(Duration::from_millis(300));
                let again = || HarnessError::new("console shell restarted twice");
                self.exec_once("stty -echo; dmesg -n 1", timeout)?.ok_or_else(again)?;
                self.exec_once(cmd, timeout)?.ok_or_else(again)
            }
        }
    }

    /// `None`: the shell restarted before it began `cmd`.
    fn exec_once(&mut self, cmd: &str, timeout: Duration) -> Result<Option<(i32, String)>, HarnessError> {
        self.seq += 1;
        let n = self.seq;
        // The markers are assembled by the shell, so the typed text never matches.
        let line = format!("echo \"@@B\"\"EGIN-{n}@@\"; {cmd}; echo \"@@E\"\"ND-{n} $?@@\"\n");
        self.stream.write_all(line.as_bytes()).map_err(|e| HarnessError(format!("console write: {e}")))?;
        let begin = format!("@@BEGIN-{n}@@");
        let end_tag = format!("@@END-{n} ");
        let deadline = Instant::now() + timeout;
        // Before the begin marker: only its end matters (the marker, when it
        // comes). After it: the command's output, its end kept.
        let mut before = TextTail::new(MAX_OUTPUT_BYTES);
        let mut output: Option<TextTail> = None;
        let mut chunk = [0u8; 4096];
        // Where the next search starts in each (bytes since its first byte,
        // dropped ones included): a flood is searched about once, not on
        // every read.
        let (mut seen_before, mut seen_output) = (0u64, 0u64);
        loop {
            if output.is_none() {
                match before.find_since(&begin, seen_before) {
                    Some(b) => {
                        let mut o = TextTail::new(MAX_OUTPUT_BYTES);
                        o.push_str(&before.as_str()[b + begin.len()..]);
                        output = Some(o);
                    }
                    None if before.find_since(SHELL_RESTARTED, seen_before).is_some() => {
                        // Let the new shell come up and read what is left of our line.
                        std::thread::sleep(Duration::from_millis(500));
                        return Ok(None);
                    }
                    None => seen_before = before.end().saturating_sub(SHELL_RESTARTED.len().max(begin.len()) as u64),
                }
            }
            if let Some(o) = &output {
                match o.find_since(&end_tag, seen_output) {
                    Some(e) => {
                        let buf = o.as_str();
                        let after = &buf[e + end_tag.len()..];
                        let window = &after[..floor_boundary(after, STATUS_WINDOW)];
                        match window.find("@@") {
                            Some(close) => {
                                let status: i32 = window[..close].trim().parse().unwrap_or(-1);
                                let mut out = buf[..e].replace('\r', "").trim().to_string();
                                if o.dropped() > 0 {
                                    out = format!("[vmplug: {} bytes of output dropped]\n{out}", o.dropped());
                                }
                                return Ok(Some((status, out)));
                            }
                            // Not our marker (its status is a short number): search past it.
                            None if after.len() >= STATUS_WINDOW => seen_output = o.dropped() + e as u64 + 1,
                            None => seen_output = o.dropped() + e as u64,
                        }
                    }
                    None => seen_output = o.end().saturating_sub(end_tag.len() as u64),
                }
            }
            if Instant::now() > deadline {
                let buf = output.as_ref().unwrap_or(&before).as_str();
                let tail: String = buf.chars().rev().take(400).collect::<Vec<_>>().into_iter().rev().collect();
                let tail = vmplug_common::text::escape(&tail);
                return Err(HarnessError(format!("no answer to `{cmd}` within {timeout:?}; read: {tail}")));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(HarnessError::new("console closed")),
                Ok(k) => {
                    let s = self.decoder.decode(&chunk[..k]);
                    output.as_mut().unwrap_or(&mut before).push_str(&s);
                    self.transcript.push_str(&s);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(HarnessError(format!("console read: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// A fake console shell on the other end of a socket pair: for each line
    /// typed, the chunks `answer(n)` gives, each written on its own (a pause
    /// between them, so the console reads them apart).
    fn fake_shell(answer: impl Fn(u64) -> Vec<Vec<u8>> + Send + 'static) -> Console {
        let (host, guest) = UnixStream::pair().expect("socket pair");
        std::thread::spawn(move || {
            let mut w = guest.try_clone().expect("clone");
            for line in BufReader::new(guest).lines() {
                let Ok(line) = line else { return };
                let Some(n) = line.split("EGIN-").nth(1).and_then(|r| r.split('@').next()?.parse().ok()) else {
                    continue;
                };
                for chunk in answer(n) {
                    if w.write_all(&chunk).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(30));
                }
            }
        });
        Console::on_stream(host).expect("console")
    }

    fn begin(n: u64) -> Vec<u8> {
        format!("@@BEGIN-{n}@@\r\n").into_bytes()
    }

    fn end(n: u64, status: i32) -> Vec<u8> {
        format!("\r\n@@END-{n} {status}@@\r\n").into_bytes()
    }

    /// Security finding 10: each 4 KiB read was decoded on its own, so a
    /// character split between two reads became two U+FFFD.
    #[test]
    fn a_character_split_between_reads_is_decoded_whole() {
        let mut c = fake_shell(|n| {
            let text = "grün 区 \u{1F600}".as_bytes().to_vec();
            // Cut inside ü (2 bytes), 区 (3) and the emoji (4).
            let (a, rest) = text.split_at(3);
            let (b, rest) = rest.split_at(5);
            let (d, e) = rest.split_at(rest.len() - 2);
            vec![begin(n), a.to_vec(), b.to_vec(), d.to_vec(), e.to_vec(), end(n, 3)]
        });
        let (status, out) = c.exec("x", Duration::from_secs(10)).expect("answer");
        assert_eq!((status, out.as_str()), (3, "grün 区 \u{1F600}"));
        assert!(c.transcript.as_str().contains("grün 区 \u{1F600}"), "{}", c.transcript);
        let mut d = Utf8Reader::default();
        assert_eq!(d.decode(b"a\xff\xc3"), "a\u{FFFD}", "invalid bytes replaced, a started character kept");
        assert_eq!(d.decode(b"\xbcb"), "üb");
    }

    /// Security finding 10: a guest flooding its console grew the host's
    /// memory without bound (the transcript and each command's output).
    #[test]
    fn a_flooding_console_is_kept_to_its_end() {
        let mut c = fake_shell(|n| {
            let flood = vec![b'y'; 256 * 1024];
            let mut chunks = vec![flood.clone(); 8]; // before the marker
            chunks.push(begin(n));
            chunks.extend(vec![flood; 16]);
            chunks.push(b"\n@@END-fake @@ the end".to_vec());
            chunks.push(end(n, 0));
            chunks
        });
        let (status, out) = c.exec("flood", Duration::from_secs(60)).expect("answer");
        assert_eq!(status, 0);
        assert!(out.len() <= MAX_OUTPUT_BYTES + 64, "{} bytes kept", out.len());
        assert!(out.starts_with("[vmplug: "), "says what was dropped: {}", &out[..60]);
        assert!(out.ends_with("\n@@END-fake @@ the end"), "the end is kept");
        assert!(c.transcript.as_str().len() <= MAX_TRANSCRIPT_BYTES);
        assert!(c.transcript.dropped() >= 5 * 1024 * 1024, "{}", c.transcript.dropped());
        assert!(c.transcript.to_string().starts_with("[vmplug: "));
    }

    #[test]
    fn a_text_tail_keeps_its_end_at_a_character_boundary() {
        let mut t = TextTail::new(8);
        t.push_str("abcdefgh");
        assert_eq!((t.as_str(), t.dropped()), ("abcdefgh", 0));
        t.push_str("ü");
        assert!(t.as_str().len() <= 8 && t.as_str().ends_with("ghü"), "{}", t.as_str());
        assert_eq!(t.end(), 10);
        assert_eq!(t.find_since("h", 0), t.as_str().find('h'));
        assert_eq!(t.find_since("h", 8), None, "searches from an offset past it");
    }

    #[test]
    fn a_console_that_never_answers_times_out_with_its_text_escaped() {
        let mut c = fake_shell(|_| vec![b"\x1b[2Kno marker\n::error x".to_vec()]);
        let e = c.exec("x", Duration::from_millis(600)).expect_err("no end marker");
        assert!(e.0.contains("read: \\u{1b}[2Kno marker\\u{a}::error x"), "{e}");
    }
}
