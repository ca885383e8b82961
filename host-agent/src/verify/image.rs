//! The image under test is hostile input: it comes from an image builder's
//! pull request and `verify-image` runs as root.
//!
//! A disk image can name other files that QEMU then opens on its behalf: a
//! qcow2 backing file (`/etc/shadow` as raw: its bytes show up in the guest), an
//! external data file, a `json:` pseudo-filename. A guessed format lets a raw
//! image that starts with a qcow2 header be read as qcow2. So the image is
//!
//! - opened once, read-only, and never by name again: the format is judged
//!   from that open file (its own header, parsed here, for qcow2), then the
//!   file's bytes are copied (sparsely) into the run's private directory, so
//!   nobody can swap or change what is booted after it was checked;
//! - refused, naming what it refers to, when it has a backing file, an
//!   external data file or encryption, or when it is a format other than raw
//!   and qcow2;
//! - checked once more by `qemu-img info` with the format pinned (`-f`), under a
//!   time, memory and CPU limit, on the private copy;
//! - handed to libvirt with its format and an explicit empty `<backingStore/>`,
//!   so neither libvirt nor QEMU follows anything the image names.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::harness::HarnessError;
use crate::wait::Wait;

/// The formats `verify-image` boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The image as it was checked.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// The path the operator gave, resolved.
    pub path: PathBuf,
    pub format: String,
    pub virtual_size: u64,
}

/// `qemu-img` on a hostile file: at most this long …
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(30);
/// … this much address space …
const QEMU_IMG_MEMORY: u64 = 1 << 30;
/// … and this many seconds of CPU.
const QEMU_IMG_CPU_SECONDS: u64 = 20;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// qcow2 v3 incompatible feature: the guest data lives in an external file.
const QCOW2_EXTERNAL_DATA_FILE: u64 = 1 << 2;

/// Magic numbers of formats QEMU would also open, refused by name rather than
/// booted as raw bytes.
const OTHER_FORMATS: [(&[u8], &str); 6] = [
    (b"KDMV", "vmdk"),
    (b"QED\0", "qed"),
    (b"LUKS\xba\xbe", "luks"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc (vhd)"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
];

fn err(path: &Path, msg: impl std::fmt::Display) -> HarnessError {
    HarnessError(format!("image {}: {msg}", path.display()))
}

/// What the first bytes say the image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Raw,
    Qcow2 { virtual_size: u64 },
}

/// Judges an image by its header. `Err` names the reason a hostile or
/// unsupported image is refused. `asked` is the operator's `--format`: a file
/// is never read as a format its bytes do not have, and a raw file may start
/// with any bytes (it is then read as raw, which opens nothing else).
pub fn probe(header: &[u8], file: &impl FileExt, asked: Option<DiskFormat>) -> Result<Probe, String> {
    let qcow2 = header.starts_with(&QCOW2_MAGIC);
    match asked {
        Some(DiskFormat::Raw) => return Ok(Probe::Raw),
        Some(DiskFormat::Qcow2) if !qcow2 => return Err("--format qcow2, but the file has no qcow2 header".into()),
        _ => {}
    }
    if !qcow2 {
        if let Some((_, name)) = OTHER_FORMATS.iter().find(|(m, _)| header.starts_with(m)) {
            return Err(format!("format '{name}'; verify-image takes qcow2 or raw"));
        }
        return Ok(Probe::Raw);
    }
    let be32 = |at: usize| header.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()));
    let be64 = |at: usize| header.get(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
    let version = be32(4).ok_or("a truncated qcow2 header")?;
    if !(2..=3).contains(&version) {
        return Err(format!("qcow2 version {version}; only 2 and 3 exist"));
    }
    let backing_offset = be64(8).ok_or("a truncated qcow2 header")?;
    let backing_len = be32(16).ok_or("a truncated qcow2 header")?;
    if backing_offset != 0 || backing_len != 0 {
        let mut name = vec![0u8; backing_len.min(1023) as usize];
        let got = file.read_at(&mut name, backing_offset).unwrap_or(0);
        name.truncate(got);
        return Err(format!(
            "has a backing file '{}'; verify-image takes a self-contained image (qemu-img convert -O qcow2 flattens one)",
            vmplug_common::text::escape(&String::from_utf8_lossy(&name))
        ));
    }
    let virtual_size = be64(24).ok_or("a truncated qcow2 header")?;
    let crypt = be32(32).ok_or("a truncated qcow2 header")?;
    if crypt != 0 {
        return Err(format!("is encrypted (method {crypt}); verify-image boots unencrypted images"));
    }
    if version == 3 {
        let incompatible = be64(72).ok_or("a truncated qcow2 v3 header")?;
        if incompatible & QCOW2_EXTERNAL_DATA_FILE != 0 {
            return Err("keeps its data in an external data file; verify-image takes a self-contained image".into());
        }
    }
    Ok(Probe::Qcow2 { virtual_size })
}

/// Opens `image` once, checks it, and copies it to `dest` (in the run's
/// private directory), which is what the guest then boots.
pub fn take(image: &Path, asked: Option<DiskFormat>, dest: &Path) -> Result<ImageInfo, HarnessError> {
    let path = image.canonicalize().map_err(|e| err(image, e))?;
    // O_NONBLOCK: opening a FIFO planted in place of the image must not hang.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| err(&path, e))?;
    let meta = file.metadata().map_err(|e| err(&path, e))?;
    if !meta.is_file() {
        return Err(err(&path, "not a regular file"));
    }
    let mut header = vec![0u8; 512];
    let n = read_full(&mut file, &mut header).map_err(|e| err(&path, e))?;
    header.truncate(n);
    let probed = probe(&header, &file, asked).map_err(|m| err(&path, m))?;
    let format = match probed {
        Probe::Raw => DiskFormat::Raw,
        Probe::Qcow2 { .. } => DiskFormat::Qcow2,
    };
    sparse_copy(&mut file, meta.len(), dest)
        .map_err(|e| err(&path, format!("copying it to {}: {e}", dest.display())))?;
    let virtual_size = qemu_img_check(dest, format).map_err(|m| err(&path, m))?;
    if let Probe::Qcow2 { virtual_size: v } = probed {
        if v != virtual_size {
            return Err(err(&path, format!("its header says {v} bytes, qemu-img {virtual_size}")));
        }
    }
    Ok(ImageInfo { path, format: format.name().into(), virtual_size })
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Copies `len` bytes of `src` to a new file `dest`, skipping holes (a 20 GiB
/// image with 1 GiB of data costs 1 GiB).
fn sparse_copy(src: &mut File, len: u64, dest: &Path) -> std::io::Result<()> {
    let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(dest)?;
    out.set_len(len)?;
    let fd = src.as_raw_fd();
    let mut pos: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        // SAFETY: lseek on a descriptor this function borrows; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            // The file system cannot say: copy everything from here.
        }
        let start = if data < 0 { pos } else { data as u64 };
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { (hole as u64).min(len) };
        src.seek(SeekFrom::Start(start))?;
        out.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let k = src.read(&mut buf[..want])?;
            if k == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the image shrank while it was copied",
                ));
            }
            out.write_all(&buf[..k])?;
            left -= k as u64;
        }
        pos = end;
    }
    out.sync_all()
}

/// `qemu-img info -f FORMAT` on the private copy: the format as pinned, no
/// backing file, no data file, and the virtual size.
fn qemu_img_check(copy: &Path, format: DiskFormat) -> Result<u64, String> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json", "-f", format.name()]).arg(copy);
    let out = run_limited(cmd, QEMU_IMG_TIMEOUT)?;
    if !out.status.success() {
        return Err(format!(
            "not a {} image qemu-img can read: {}",
            format.name(),
            vmplug_common::text::escape(String::from_utf8_lossy(&out.stderr).trim())
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img info printed no JSON: {e}"))?;
    judge_info(&v, format)
}

/// What `qemu-img info --output=json` must say of an image that opens nothing else.
pub fn judge_info(v: &serde_json::Value, format: DiskFormat) -> Result<u64, String> {
    let esc = |v: &serde_json::Value| vmplug_common::text::escape(&v.to_string());
    if v["format"].as_str() != Some(format.name()) {
        return Err(format!("qemu-img reads it as {}, not {}", esc(&v["format"]), format.name()));
    }
    for key in ["backing-filename", "full-backing-filename", "backing-filename-format"] {
        if !v[key].is_null() {
            return Err(format!("has a backing file {}", esc(&v[key])));
        }
    }
    let data_file = &v["format-specific"]["data"]["data-file"];
    if !data_file.is_null() {
        return Err(format!("keeps its data in an external data file {}", esc(data_file)));
    }
    if v["filename"].as_str().is_some_and(|f| f.starts_with("json:")) {
        return Err("qemu-img names it by a json: pseudo-filename".into());
    }
    v["virtual-size"].as_u64().filter(|&s| s > 0).ok_or_else(|| "qemu-img reports no virtual size".into())
}

/// Runs a tool on hostile input under a wall-clock limit (then killed), an
/// address-space limit and a CPU-time limit.
fn run_limited(mut cmd: Command, timeout: Duration) -> Result<std::process::Output, String> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only setrlimit, which is async-signal-safe; it allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let set = |res, v: u64| {
                let l = libc::rlimit { rlim_cur: v as libc::rlim_t, rlim_max: v as libc::rlim_t };
                if libc::setrlimit(res, &l) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            set(libc::RLIMIT_AS, QEMU_IMG_MEMORY)?;
            set(libc::RLIMIT_CPU, QEMU_IMG_CPU_SECONDS)?;
            set(libc::RLIMIT_CORE, 0)
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{name} (install qemu-utils): {e}"))?;
    let readers: Vec<_> = [
        child.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>),
        child.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .map(|r| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(r) = r {
                // At most 4 MiB of output is kept.
                let _ = r.take(4 << 20).read_to_end(&mut buf);
            }
            buf
        })
    })
    .collect();
    let finished = Wait::new(format!("{name} to finish"), timeout)
        .every(Duration::from_millis(20))
        .until_blocking(|| child.try_wait().transpose());
    let status = match finished {
        Ok(s) => s.map_err(|e| format!("{name}: {e}"))?,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{name} did not finish within {timeout:?}; killed"));
        }
    };
    let mut outs = readers.into_iter().map(|t| t.join().unwrap_or_default());
    let stdout = outs.next().unwrap_or_default();
    let stderr = outs.next().unwrap_or_default();
    Ok(std::process::Output { status, stdout, stderr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn qcow2_header(version: u32, backing: Option<&str>, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        if let Some(b) = backing {
            h[8..16].copy_from_slice(&200u64.to_be_bytes());
            h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
            h[200..200 + b.len()].copy_from_slice(b.as_bytes());
        }
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h
    }

    fn judge(h: &[u8], asked: Option<DiskFormat>) -> Result<Probe, String> {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(h).expect("write");
        probe(h, &f, asked)
    }

    #[test]
    fn a_backing_file_is_refused_by_name() {
        let e = judge(&qcow2_header(3, Some("/etc/shadow"), 0), None).expect_err("backing");
        assert!(e.contains("backing file '/etc/shadow'"), "{e}");
        let e =
            judge(&qcow2_header(2, Some("json:{\"file\":{\"filename\":\"/root/x\"}}"), 0), None).expect_err("json:");
        assert!(e.contains("backing file 'json:"), "{e}");
        // Asking for qcow2 changes nothing.
        assert!(judge(&qcow2_header(3, Some("/etc/shadow"), 0), Some(DiskFormat::Qcow2)).is_err());
    }

    #[test]
    fn an_external_data_file_encryption_or_another_format_is_refused() {
        let e = judge(&qcow2_header(3, None, QCOW2_EXTERNAL_DATA_FILE), None).expect_err("data file");
        assert!(e.contains("external data file"), "{e}");
        let mut enc = qcow2_header(3, None, 0);
        enc[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert!(judge(&enc, None).expect_err("luks").contains("encrypted"));
        assert!(judge(b"KDMV\x01\x00\x00\x00", None).expect_err("vmdk").contains("'vmdk'"));
        assert!(judge(&qcow2_header(9, None, 0), None).expect_err("v9").contains("version 9"));
        assert!(judge(&QCOW2_MAGIC, None).expect_err("truncated").contains("truncated"));
    }

    #[test]
    fn a_raw_image_is_never_read_as_qcow2_against_the_operators_word() {
        assert_eq!(judge(&qcow2_header(3, None, 0), None), Ok(Probe::Qcow2 { virtual_size: 1 << 30 }));
        // --format raw: a raw disk that happens to begin with a qcow2 header
        // (with a backing file, even) is read as raw bytes, which open nothing.
        assert_eq!(judge(&qcow2_header(3, Some("/etc/shadow"), 0), Some(DiskFormat::Raw)), Ok(Probe::Raw));
        assert_eq!(judge(&[0u8; 512], None), Ok(Probe::Raw));
        assert!(judge(&[0u8; 512], Some(DiskFormat::Qcow2)).is_err());
    }

    #[test]
    fn qemu_img_naming_another_file_is_refused() {
        let ok = serde_json::json!({"format": "qcow2", "virtual-size": 1024, "filename": "/w/disk"});
        assert_eq!(judge_info(&ok, DiskFormat::Qcow2), Ok(1024));
        let mut b = ok.clone();
        b["backing-filename"] = "/etc/shadow".into();
        assert!(judge_info(&b, DiskFormat::Qcow2).expect_err("backing").contains("/etc/shadow"));
        let mut d = ok.clone();
        d["format-specific"] = serde_json::json!({"type": "qcow2", "data": {"data-file": "/etc/shadow"}});
        assert!(judge_info(&d, DiskFormat::Qcow2).expect_err("data file").contains("external data file"));
        assert!(judge_info(&ok, DiskFormat::Raw).expect_err("format").contains("not raw"));
    }

    #[test]
    fn the_copy_keeps_data_and_holes() {
        let t = tempfile::tempdir().expect("tempdir");
        let src = t.path().join("src");
        let f = File::create(&src).expect("create");
        f.set_len(64 << 20).expect("sparse");
        f.write_all_at(b"head", 0).expect("write");
        f.write_all_at(b"tail", (64 << 20) - 4).expect("write");
        f.write_all_at(&[7u8; 8192], 20 << 20).expect("write");
        drop(f);
        let dest = t.path().join("dest");
        let mut src_f = File::open(&src).expect("open");
        sparse_copy(&mut src_f, 64 << 20, &dest).expect("copy");
        assert_eq!(std::fs::read(&src).expect("src"), std::fs::read(&dest).expect("dest"));
        assert!(sparse_copy(&mut src_f, 64 << 20, &dest).is_err(), "an existing destination is never overwritten");
    }

    #[test]
    fn a_hung_tool_is_killed_at_its_deadline() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let started = Instant::now();
        let e = run_limited(c, Duration::from_millis(300)).expect_err("killed");
        assert!(e.contains("did not finish"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
