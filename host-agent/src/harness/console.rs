//! A shell on the guest's serial console (a Unix socket QEMU listens on): run a
//! command, get its output and exit status, every read bounded. It needs a shell
//! on the console (an autologin getty, or the test initramfs's); without one,
//! `connect` says so after its timeout.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::HarnessError;

/// What the test initramfs prints when its console shell exits and another starts.
const SHELL_RESTARTED: &str = "vmplug-e2e: console shell exited";

#[derive(Debug)]
pub struct Console {
    stream: UnixStream,
    seq: u64,
    /// Everything read so far (shown when something fails).
    pub transcript: String,
}

impl Console {
    /// Connects to the console socket at `path` and waits until a shell there
    /// runs a command, for up to `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Console, HarnessError> {
        let end = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Err(HarnessError(format!("console {}: {e}", path.display()))),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| HarnessError(format!("console read timeout: {e}")))?;
        let mut c = Console { stream, seq: 0, transcript: String::new() };
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
        let mut buf = String::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let (Some(b), Some(e)) = (buf.find(&begin), buf.find(&end_tag)) {
                if let Some(close) = buf[e + end_tag.len()..].find("@@") {
                    let status: i32 = buf[e + end_tag.len()..e + end_tag.len() + close].trim().parse().unwrap_or(-1);
                    let out = buf[b + begin.len()..e].replace('\r', "").trim().to_string();
                    return Ok(Some((status, out)));
                }
            }
            if !buf.contains(&begin) && buf.contains(SHELL_RESTARTED) {
                // Let the new shell come up and read what is left of our line.
                std::thread::sleep(Duration::from_millis(500));
                return Ok(None);
            }
            if Instant::now() > deadline {
                let tail: String = buf.chars().rev().take(400).collect::<Vec<_>>().into_iter().rev().collect();
                return Err(HarnessError(format!("no answer to `{cmd}` within {timeout:?}; read: {tail}")));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(HarnessError::new("console closed")),
                Ok(k) => {
                    let s = String::from_utf8_lossy(&chunk[..k]);
                    buf.push_str(&s);
                    self.transcript.push_str(&s);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(HarnessError(format!("console read: {e}"))),
            }
        }
    }
}
