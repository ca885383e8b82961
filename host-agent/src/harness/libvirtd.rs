//! A private libvirtd + virtlogd in their own mount namespace, with /etc/libvirt,
//! /var/lib/libvirt, /var/log/libvirt and /run/libvirt bind-mounted from a work
//! directory, so the machine's own libvirt state is never read or changed. The
//! QEMU capability cache is shared between daemons (the first probe takes ~8 s).
//! Needs root (mount namespaces, bind mounts) and the machine's libvirt packages.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::workdir::{self, ProcessId};
use super::HarnessError;
use crate::wait::Wait;

/// How long a daemon may take to answer its first call (includes the QEMU probe).
pub const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug)]
pub struct Libvirtd {
    pub dir: PathBuf,
    pub uri: String,
    stopped: bool,
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL. Only for PIDs we started.
pub fn stop_pid(pid: i32, grace: Duration) {
    // SAFETY: plain kill(2) on a PID this harness started and recorded.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // Ending within the grace or not, SIGKILL follows below if it is still there.
    let _ = Wait::new(format!("pid {pid} to exit"), grace)
        .every(Duration::from_millis(50))
        .until_blocking(|| (!alive(pid)).then_some(()));
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The pid files a work directory may hold, each with the argument its
/// process was started with that proves, before a signal, that a PID read from
/// the file still names that process (a daemon names its own pid file; the
/// vsock backend its vhost-user socket).
const PID_FILES: [(&str, &str); 3] =
    [("vhost-vsock.pid", "vhu.sock"), ("libvirtd.pid", "libvirtd.pid"), ("virtlogd.pid", "virtlogd.pid")];

/// The file naming the process that owns a work directory (`PID START`).
pub const OWNER_FILE: &str = "owner.pid";

/// Stops the daemons (and vsock backends) of work directories under `work`
/// whose owning process is gone (a run killed by SIGKILL, or a crash), by the
/// PID files they recorded, and removes those directories.
///
/// Only what this user's runs made is touched: `work` must pass
/// [`workdir::private_base`], each directory must be a real directory owned by
/// this user holding an owner record (`PID START`), and a PID from a file is
/// signalled only while `/proc/PID/cmdline` shows the argument that ties it to
/// that directory, so a recycled PID, or one written by someone else, is left alone.
pub fn reap_stale(work: &Path) {
    if workdir::private_base(work).is_err() {
        return;
    }
    let Ok(rd) = fs::read_dir(work) else {
        return;
    };
    let me = workdir::euid();
    for dir in rd.flatten().map(|e| e.path()) {
        let Ok(meta) = fs::symlink_metadata(&dir) else {
            continue;
        };
        if workdir::untrusted_dir(&dir, &meta, me).is_some() {
            continue;
        }
        let Some(owner) = fs::read_to_string(dir.join(OWNER_FILE)).ok().and_then(|s| ProcessId::parse(&s)) else {
            continue;
        };
        if owner.alive() {
            continue;
        }
        eprintln!("vmplug: reaping leftovers of dead process {} in {}", owner.pid, dir.display());
        stop_dir(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Destroys the domains of the daemon in work directory `dir` and stops the
/// processes its pid files name — each only after `/proc` shows it is the
/// process started for this directory.
pub fn stop_dir(dir: &Path) {
    if dir.join("run/libvirt-sock").exists() {
        let _ = Command::new("virsh").args(["-c", &uri_for(dir), "list", "--name"]).output().map(|o| {
            for name in String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.is_empty()) {
                let _ = Command::new("virsh").args(["-c", &uri_for(dir), "destroy", name]).output();
            }
        });
    }
    for (pidfile, proof) in PID_FILES {
        if let Some(pid) = read_pid(&dir.join(pidfile)).filter(|&p| p > 1 && alive(p)) {
            if workdir::runs_with_arg(pid, &dir.join(proof)) {
                stop_pid(pid, Duration::from_secs(5));
            } else {
                eprintln!(
                    "vmplug: {} names PID {pid}, which is not that process; left alone",
                    dir.join(pidfile).display()
                );
            }
        }
    }
}

/// The gid of group `name` (getgrnam_r).
fn group_id(name: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: group is plain data; getgrnam_r fills it (or not) and it is read
    // only when `found` reports success.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: valid pointers for the call: the NUL-terminated name, the group
    // record, a buffer of the length given, and the result pointer.
    let rc = unsafe { libc::getgrnam_r(c_name.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    (rc == 0 && !found.is_null()).then_some(grp.gr_gid)
}

/// What the private daemon's configuration adds to the stock one: its log in
/// the work directory, and its sockets (read-write, read-only, admin) for root
/// alone — Debian's polkit build would otherwise make them 0777.
const LIBVIRTD_CONF: &str = "
log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"
unix_sock_group = \"root\"
unix_sock_rw_perms = \"0700\"
unix_sock_ro_perms = \"0700\"
unix_sock_admin_perms = \"0700\"
";

/// Runs in the new mount and UTS namespaces with the work directory as `$1`,
/// the capability cache as `$2` and the daemon's host name as `$3`.
const NAMESPACE_SCRIPT: &str = r#"set -e
hostname "$3"
mount --bind "$1/etc" /etc/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$2" /var/cache/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/run" /run/libvirt
virtlogd -d --pid-file "$1/virtlogd.pid"
libvirtd -d --pid-file "$1/libvirtd.pid""#;

/// The URI a client uses for the daemon of work directory `dir`; the path is
/// percent-encoded, so no character of it can end the query or add a parameter.
pub fn uri_for(dir: &Path) -> String {
    let mut path = String::new();
    for &b in dir.join("run/libvirt-sock").as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            path.push(b as char);
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    format!("qemu:///system?socket={path}")
}

/// The host name of the daemon of work directory `dir`: `vmplug-` and the
/// directory's name, reduced to what a host name may hold.
pub fn host_name(dir: &Path) -> String {
    let base = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let label: String =
        base.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(50).collect();
    format!("vmplug-{}", label.trim_matches('-'))
}

fn io(what: &str) -> impl Fn(std::io::Error) -> HarnessError + '_ {
    move |e| HarnessError(format!("{what}: {e}"))
}

impl Libvirtd {
    /// Starts a daemon pair under `dir`, a fresh directory of this run (from
    /// [`workdir::fresh_dir`]), sharing the QEMU capability cache under `cache`
    /// (a directory only this user controls). Waits until it answers.
    pub fn start(dir: &Path, cache: &Path) -> Result<Libvirtd, HarnessError> {
        let meta = fs::symlink_metadata(dir).map_err(io(&format!("{}", dir.display())))?;
        if let Some(why) = workdir::untrusted_dir(dir, &meta, workdir::euid()) {
            return Err(HarnessError(format!("refusing to start libvirtd in {why}")));
        }
        // etc and log hold configuration and logs only root reads; lib and run
        // are where libvirt makes the directories QEMU reaches.
        for (d, mode) in [("etc", 0o700), ("lib", 0o755), ("log", 0o700), ("run", 0o755)] {
            let p = dir.join(d);
            fs::create_dir(&p).map_err(io(&format!("creating {}", p.display())))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io(&format!("chmod {}", p.display())))?;
        }
        let owner = ProcessId::me().ok_or_else(|| HarnessError::new("reading this process's start time"))?;
        fs::write(dir.join(OWNER_FILE), owner.record()).map_err(io("writing owner.pid"))?;
        let cache = workdir::private_base(cache)?;
        fs::create_dir_all("/run/libvirt").map_err(io("creating the /run/libvirt mount point"))?;
        if !Path::new("/etc/libvirt/libvirtd.conf").exists() {
            return Err(HarnessError::new(
                "/etc/libvirt/libvirtd.conf is missing: install libvirt-daemon-system and libvirt-clients",
            ));
        }
        // A copy of the stock configuration — QEMU runs as the distribution's
        // unprivileged user with libvirt's dynamic ownership, as shipped —
        // without autostarted networks (no bridge on the host) or hooks, with
        // the daemon's log in the work dir and its sockets for root alone.
        let status = Command::new("cp")
            .arg("-a")
            .arg("--")
            .arg("/etc/libvirt/.")
            .arg(dir.join("etc"))
            .status()
            .map_err(io("cp"))?;
        if !status.success() {
            return Err(HarnessError::new("copying /etc/libvirt failed"));
        }
        let _ = fs::remove_dir_all(dir.join("etc/qemu/networks"));
        let _ = fs::remove_dir_all(dir.join("etc/hooks"));
        let mut conf = fs::read_to_string(dir.join("etc/libvirtd.conf")).unwrap_or_default();
        conf.push_str(LIBVIRTD_CONF);
        // Each daemon is a host of its own to libvirt, which refuses a
        // migration between two daemons that share a host UUID (by default the
        // machine's SMBIOS one), and a host name its own.
        let host_uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").map_err(io("reading a random UUID"))?;
        conf.push_str(&format!("host_uuid = \"{}\"\n", host_uuid.trim()));
        fs::write(dir.join("etc/libvirtd.conf"), conf).map_err(io("writing libvirtd.conf"))?;
        // Paths are the script's arguments, never part of its text.
        let out = Command::new("unshare")
            .args(["-m", "-u", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT, "vmplug-libvirtd"])
            .arg(dir)
            .arg(&cache)
            .arg(host_name(dir))
            .output()
            .map_err(io("unshare"))?;
        let mut daemon = Libvirtd { dir: dir.to_path_buf(), uri: uri_for(dir), stopped: false };
        if !out.status.success() {
            daemon.stop();
            return Err(HarnessError(format!(
                "starting a private libvirtd failed (root is needed for its mount namespace): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        if let Err(e) = daemon.wait_answering() {
            daemon.stop();
            return Err(e);
        }
        Ok(daemon)
    }

    /// Restarts libvirtd as `systemctl restart` would (SIGTERM, then a new daemon)
    /// in the same mount namespace, entered through virtlogd; running QEMU
    /// processes stay, and the new daemon reconnects to them. Returns how long the
    /// daemon did not answer.
    pub fn restart(&self) -> Result<Duration, HarnessError> {
        let started = Instant::now();
        let pidfile = self.dir.join("libvirtd.pid");
        let old = read_pid(&pidfile).ok_or_else(|| HarnessError::new("no libvirtd pid file"))?;
        let logd = read_pid(&self.dir.join("virtlogd.pid")).ok_or_else(|| HarnessError::new("no virtlogd pid file"))?;
        stop_pid(old, Duration::from_secs(30));
        let _ = fs::remove_file(&pidfile);
        let out = Command::new("nsenter")
            .args(["-t", &logd.to_string(), "-m", "-u", "--", "libvirtd", "-d", "--pid-file"])
            .arg(&pidfile)
            .output()
            .map_err(io("nsenter"))?;
        if !out.status.success() {
            return Err(HarnessError(format!("restarting libvirtd failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        self.wait_answering()?;
        Ok(started.elapsed())
    }

    fn wait_answering(&self) -> Result<(), HarnessError> {
        let mut stderr = String::new();
        let answered = Wait::new("the private libvirtd to answer", DAEMON_READY_TIMEOUT)
            .every(Duration::from_millis(200))
            .until_blocking(|| match self.virsh(&["version"]) {
                Err(e) => Some(Err(e)),
                Ok(o) if o.status.success() => Some(Ok(())),
                Ok(o) => {
                    stderr = String::from_utf8_lossy(&o.stderr).trim().to_string();
                    None
                }
            });
        match answered {
            Ok(r) => r,
            Err(_) => Err(HarnessError(format!(
                "the private libvirtd did not answer within {DAEMON_READY_TIMEOUT:?}: {stderr}\n{}",
                self.log_tail(20)
            ))),
        }
    }

    /// The user and group QEMU runs as under this daemon: `user` and `group`
    /// of its qemu.conf when set, else the packaged default (Debian and Ubuntu:
    /// `libvirt-qemu`; Fedora, RHEL and openEuler: `qemu`) with its primary
    /// group. Files QEMU opens itself (a vhost-user socket of a backend we
    /// start) are given to it, as an operator would.
    pub fn qemu_user(&self) -> Result<(u32, u32), HarnessError> {
        let conf = fs::read_to_string(self.dir.join("etc/qemu.conf")).unwrap_or_default();
        let set = |key: &str| {
            conf.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let names = match set("user") {
            Some(u) => vec![u],
            None => vec!["libvirt-qemu".to_string(), "qemu".to_string()],
        };
        let (uid, gid) = names
            .iter()
            .find_map(|n| {
                crate::trust::user_ids(n).or_else(|| n.strip_prefix('+').and_then(|u| u.parse().ok()).map(|u| (u, u)))
            })
            .ok_or_else(|| HarnessError(format!("none of the QEMU users {names:?} exists on this host")))?;
        let gid = match set("group") {
            Some(g) => g.strip_prefix('+').and_then(|g| g.parse().ok()).or_else(|| group_id(&g)).unwrap_or(gid),
            None => gid,
        };
        Ok((uid, gid))
    }

    /// Runs virsh against this daemon.
    pub fn virsh(&self, args: &[&str]) -> Result<Output, HarnessError> {
        Command::new("virsh").arg("-c").arg(&self.uri).args(args).output().map_err(io("running virsh"))
    }

    /// Runs virsh; its stdout, or an error with its stderr.
    pub fn virsh_out(&self, args: &[&str]) -> Result<String, HarnessError> {
        let o = self.virsh(args)?;
        if !o.status.success() {
            return Err(HarnessError(format!(
                "virsh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log/libvirtd.log")).unwrap_or_default()
    }

    /// The last `n` lines of the daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Destroys every domain, then stops the daemons by their PID files.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if let Ok(o) = Command::new("virsh").args(["-c", &self.uri, "list", "--name"]).output() {
            for name in String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.virsh(&["destroy", name.trim()]);
            }
        }
        for pidfile in ["libvirtd.pid", "virtlogd.pid"] {
            if let Some(pid) = read_pid(&self.dir.join(pidfile)) {
                stop_pid(pid, Duration::from_secs(10));
            }
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_directory_cannot_add_to_the_uri() {
        assert_eq!(uri_for(Path::new("/w/run-1")), "qemu:///system?socket=/w/run-1/run/libvirt-sock");
        let u = uri_for(Path::new("/w/a&no_verify=1 #x?"));
        assert_eq!(u, "qemu:///system?socket=/w/a%26no_verify%3D1%20%23x%3F/run/libvirt-sock");
    }

    #[test]
    fn a_daemon_host_name_is_a_valid_label() {
        assert_eq!(host_name(Path::new("/w/1234-7-aB_c.9")), "vmplug-1234-7-ab-c-9");
        assert!(host_name(Path::new(&format!("/w/{}", "x".repeat(200)))).len() <= 63);
    }

    #[test]
    fn reaping_leaves_directories_and_pids_it_cannot_prove_alone() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("work");
        workdir::private_base(&base).expect("base");
        // A dead owner, and a pid file naming a live process that is not the
        // daemon of that directory (this test itself): it must survive.
        let dir = base.join("run-x");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join(OWNER_FILE), "999999999 1").expect("owner");
        fs::write(dir.join("libvirtd.pid"), std::process::id().to_string()).expect("pid");
        // A directory whose owner still runs is kept.
        let live = base.join("run-live");
        fs::create_dir(&live).expect("mkdir");
        fs::write(live.join(OWNER_FILE), ProcessId::me().expect("me").record()).expect("owner");
        // An owner file with a bare PID (the old format, or a forgery) proves nothing.
        let bare = base.join("run-bare");
        fs::create_dir(&bare).expect("mkdir");
        fs::write(bare.join(OWNER_FILE), "999999999").expect("owner");
        reap_stale(&base);
        assert!(!dir.exists(), "the dead run's directory is removed");
        assert!(live.exists() && bare.exists());
        // Still here to assert: the pid file's PID (ours) was not signalled.

        // A base another user could write is not read at all.
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join(OWNER_FILE), "999999999 1").expect("owner");
        fs::set_permissions(&base, fs::Permissions::from_mode(0o777)).expect("chmod");
        reap_stale(&base);
        assert!(dir.exists(), "nothing under a shared base is touched");
    }
}
