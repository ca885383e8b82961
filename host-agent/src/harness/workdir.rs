//! Directories the harness writes as root, made so no other local user can
//! plant anything in them first.
//!
//! A predictable path under a world-writable directory (`/var/tmp/...`) is a
//! gift to a local attacker when root later trusts what is inside: the files
//! it overwrites, the PIDs its files name, the hooks a daemon runs from it. So
//! the base directory is created private or, when it exists, accepted only if
//! it is a real directory owned by the invoking user that nobody else may
//! write, below parents that are equally safe (root-owned, or sticky). Each
//! run then gets a fresh directory of its own from `mkdtemp`, and stale-run
//! reaping stops a PID only after it has shown it is the process recorded.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::HarnessError;

/// Mode of a base or run directory: private, but traversable so an
/// unprivileged QEMU can reach the files libvirt hands it inside.
pub const DIR_MODE: u32 = 0o711;

const S_ISVTX: u32 = 0o1000;

/// Who is asking: the effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why `meta` (of `path`) may not be trusted by `uid` as a directory it
/// alone controls; `None` when it may.
pub fn untrusted_dir(path: &Path, meta: &fs::Metadata, uid: u32) -> Option<String> {
    if meta.file_type().is_symlink() {
        return Some(format!("{} is a symbolic link", path.display()));
    }
    if !meta.is_dir() {
        return Some(format!("{} is not a directory", path.display()));
    }
    if meta.uid() != uid {
        return Some(format!("{} is owned by uid {}, not by this user (uid {uid})", path.display(), meta.uid()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(format!("{} is writable by its group or by others (mode {mode:o})", path.display()));
    }
    None
}

/// Why an ancestor directory lets someone other than root or `uid` replace
/// what is below it; `None` when it does not.
fn untrusted_parent(path: &Path, meta: &fs::Metadata, uid: u32) -> Option<String> {
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 && meta.uid() != uid {
        return Some(format!("its parent {} is owned by uid {}", path.display(), meta.uid()));
    }
    if mode & 0o022 != 0 && mode & S_ISVTX == 0 {
        return Some(format!("its parent {} is writable by others and not sticky (mode {mode:o})", path.display()));
    }
    None
}

/// Makes sure `base` is a directory only the invoking user controls: created
/// with [`DIR_MODE`] when missing; refused, naming the reason, when it exists
/// and is a link, is owned by someone else, or is group/other-writable, or
/// when one of its parents lets another user swap it.
pub fn private_base(base: &Path) -> Result<PathBuf, HarnessError> {
    let uid = euid();
    let refuse = |why: String| {
        HarnessError(format!("refusing work directory {}: {why}; remove it or pass another", base.display()))
    };
    if base.as_os_str().is_empty() {
        return Err(refuse("an empty path".into()));
    }
    let abs = if base.is_absolute() {
        base.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| HarnessError(format!("current directory: {e}")))?.join(base)
    };
    // Parents first, from the root down; missing ones are created private.
    let mut built = PathBuf::new();
    let parents: Vec<_> = abs.components().collect();
    for (i, c) in parents.iter().enumerate() {
        built.push(c);
        let last = i + 1 == parents.len();
        let m = match fs::symlink_metadata(&built) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match fs::DirBuilder::new().mode(DIR_MODE).create(&built) {
                    Ok(()) => {
                        // The umask may have narrowed the mode; it is set exactly.
                        fs::set_permissions(&built, fs::Permissions::from_mode(DIR_MODE))
                            .map_err(|e| refuse(format!("chmod {}: {e}", built.display())))?;
                        continue;
                    }
                    // Made in between (two runs or tests starting at once):
                    // judged like any directory that was already there.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        fs::symlink_metadata(&built).map_err(|e| refuse(format!("{}: {e}", built.display())))?
                    }
                    Err(e) => return Err(refuse(format!("creating {}: {e}", built.display()))),
                }
            }
            Err(e) => return Err(refuse(format!("{}: {e}", built.display()))),
        };
        if last {
            if let Some(why) = untrusted_dir(&built, &m, uid) {
                return Err(refuse(why));
            }
            continue;
        }
        // A link among the parents is followed (as /var/run is); what it points
        // at must be as safe as a real directory would be.
        let m = if m.file_type().is_symlink() {
            if m.uid() != 0 && m.uid() != uid {
                return Err(refuse(format!("its parent {} is a link owned by uid {}", built.display(), m.uid())));
            }
            fs::metadata(&built).map_err(|e| refuse(format!("{}: {e}", built.display())))?
        } else {
            m
        };
        if !m.is_dir() {
            return Err(refuse(format!("{} is not a directory", built.display())));
        }
        if let Some(why) = untrusted_parent(&built, &m, uid) {
            return Err(refuse(why));
        }
    }
    Ok(abs)
}

/// A fresh directory `base/PREFIX-XXXXXX` made by `mkdtemp` (so it cannot
/// have existed before), with mode [`DIR_MODE`].
pub fn fresh_dir(base: &Path, prefix: &str) -> Result<PathBuf, HarnessError> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .rand_bytes(8)
        .permissions(fs::Permissions::from_mode(DIR_MODE))
        .tempdir_in(base)
        .map_err(|e| HarnessError(format!("creating a run directory in {}: {e}", base.display())))?
        .keep();
    fs::set_permissions(&dir, fs::Permissions::from_mode(DIR_MODE))
        .map_err(|e| HarnessError(format!("chmod {}: {e}", dir.display())))?;
    Ok(dir)
}

/// A process as recorded: its PID and the kernel's start time for it (field
/// 22 of `/proc/PID/stat`), which a recycled PID does not share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: i32,
    pub start: u64,
}

impl ProcessId {
    /// This process.
    pub fn me() -> Option<ProcessId> {
        let pid = std::process::id() as i32;
        Some(ProcessId { pid, start: start_time(pid)? })
    }

    /// As written to a file: `PID START`.
    pub fn record(self) -> String {
        format!("{} {}", self.pid, self.start)
    }

    pub fn parse(s: &str) -> Option<ProcessId> {
        let mut w = s.split_whitespace();
        let pid = w.next()?.parse().ok().filter(|&p: &i32| p > 1)?;
        let start = w.next()?.parse().ok()?;
        w.next().is_none().then_some(ProcessId { pid, start })
    }

    /// Whether this very process (not a later one with its PID) still runs.
    pub fn alive(self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// The start time of `pid` from `/proc/PID/stat`; the command name in field 2
/// may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is a process that was started with `arg` as one of its
/// arguments (a daemon given `--pid-file DIR/x.pid` names its own pid file):
/// the proof, before a signal, that a PID read from a file is still ours.
pub fn runs_with_arg(pid: i32, arg: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = arg.as_os_str().as_encoded_bytes();
    cmdline.split(|&b| b == 0).any(|a| a == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_owned_by_another_user_or_writable_by_others_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("w");
        let made = private_base(&base).expect("created");
        let m = fs::metadata(&made).expect("meta");
        assert_eq!(m.mode() & 0o777, DIR_MODE);
        private_base(&base).expect("ours, private: accepted again");

        fs::set_permissions(&base, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = private_base(&base).expect_err("world-writable");
        assert!(e.0.contains("writable by its group or by others"), "{e}");

        let link = t.path().join("l");
        std::os::unix::fs::symlink(&base, &link).expect("symlink");
        let e = private_base(&link).expect_err("a link");
        assert!(e.0.contains("symbolic link"), "{e}");

        // Not ours: judged as a pure function, so no second user is needed.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700)).expect("chmod");
        let m = fs::symlink_metadata(&base).expect("meta");
        let why = untrusted_dir(&base, &m, m.uid() + 1).expect("someone else's");
        assert!(why.contains("owned by uid"), "{why}");
    }

    #[test]
    fn a_parent_others_may_write_without_the_sticky_bit_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let open = t.path().join("open");
        fs::create_dir(&open).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = private_base(&open.join("w")).expect_err("swappable");
        assert!(e.0.contains("not sticky"), "{e}");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).expect("chmod");
        private_base(&open.join("w")).expect("a sticky parent, as /var/tmp is");
    }

    /// Two runs (or two tests) making the same base at once both get it: the
    /// one that loses the race judges the directory the other made.
    #[test]
    fn two_makers_of_one_base_both_succeed() {
        for _ in 0..50 {
            let t = tempfile::tempdir().expect("tempdir");
            let base = t.path().join("a/b/cache");
            let racers: Vec<_> = (0..4)
                .map(|_| {
                    let base = base.clone();
                    std::thread::spawn(move || private_base(&base))
                })
                .collect();
            for r in racers {
                r.join().expect("thread").expect("each maker gets the base");
            }
        }
    }

    #[test]
    fn run_directories_are_fresh_and_private() {
        let t = tempfile::tempdir().expect("tempdir");
        let a = fresh_dir(t.path(), "run").expect("a");
        let b = fresh_dir(t.path(), "run").expect("b");
        assert_ne!(a, b);
        assert_eq!(fs::metadata(&a).expect("meta").mode() & 0o777, DIR_MODE);
        assert!(a.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("run-")));
    }

    #[test]
    fn a_recorded_process_is_recognised_and_a_recycled_pid_is_not() {
        let me = ProcessId::me().expect("this process");
        assert!(me.alive());
        assert_eq!(ProcessId::parse(&me.record()), Some(me));
        assert!(!ProcessId { start: me.start + 1, ..me }.alive(), "same PID, other start time");
        assert_eq!(ProcessId::parse("1 5"), None, "init is never ours");
        assert_eq!(ProcessId::parse("12"), None, "a bare PID proves nothing");
        assert_eq!(ProcessId::parse("12 5 7"), None);
        assert_eq!(parse_start_time("77 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 x"), Some(4242));
    }

    #[test]
    fn a_pid_is_ours_only_when_it_runs_with_the_recorded_argument() {
        let exe = std::env::current_exe().expect("exe");
        assert!(
            runs_with_arg(std::process::id() as i32, &exe)
                || runs_with_arg(std::process::id() as i32, Path::new(&std::env::args().next().expect("argv0")))
        );
        assert!(!runs_with_arg(std::process::id() as i32, Path::new("/nonexistent/libvirtd.pid")));
    }
}
