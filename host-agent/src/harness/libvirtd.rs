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

use super::HarnessError;

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
    let end = Instant::now() + grace;
    while alive(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Stops the daemons (and vsock backends) of work directories under `work`
/// whose owning process is gone (a run killed by Ctrl-C or CI), by the PID
/// files they recorded, and removes those directories.
pub fn reap_stale(work: &Path) {
    let Ok(rd) = fs::read_dir(work) else {
        return;
    };
    for dir in rd.flatten().map(|e| e.path()) {
        let Some(owner) = read_pid(&dir.join("owner.pid")) else {
            continue;
        };
        if alive(owner) {
            continue;
        }
        eprintln!("vmplug: reaping leftovers of dead process {owner} in {}", dir.display());
        let _ = Command::new("virsh").args(["-c", &uri_for(&dir), "list", "--name"]).output().map(|o| {
            for name in String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.is_empty()) {
                let _ = Command::new("virsh").args(["-c", &uri_for(&dir), "destroy", name]).output();
            }
        });
        for pidfile in ["vhost-vsock.pid", "libvirtd.pid", "virtlogd.pid"] {
            if let Some(pid) = read_pid(&dir.join(pidfile)).filter(|&p| alive(p)) {
                stop_pid(pid, Duration::from_secs(5));
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// The URI a client uses for the daemon of work directory `dir`.
pub fn uri_for(dir: &Path) -> String {
    format!("qemu:///system?socket={}/run/libvirt-sock", dir.display())
}

fn io(what: &str) -> impl Fn(std::io::Error) -> HarnessError + '_ {
    move |e| HarnessError(format!("{what}: {e}"))
}

impl Libvirtd {
    /// Starts a daemon pair under `dir` (created, world-traversable), sharing the
    /// QEMU capability cache under `cache`. Waits until it answers.
    pub fn start(dir: &Path, cache: &Path) -> Result<Libvirtd, HarnessError> {
        for d in ["etc", "lib", "log", "run"] {
            fs::create_dir_all(dir.join(d)).map_err(io(&format!("creating {}", dir.join(d).display())))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io("chmod of the work dir"))?;
        fs::write(dir.join("owner.pid"), std::process::id().to_string()).map_err(io("writing owner.pid"))?;
        fs::create_dir_all(cache).map_err(io(&format!("creating {}", cache.display())))?;
        fs::create_dir_all("/run/libvirt").map_err(io("creating the /run/libvirt mount point"))?;
        if !Path::new("/etc/libvirt/libvirtd.conf").exists() {
            return Err(HarnessError::new(
                "/etc/libvirt/libvirtd.conf is missing: install libvirt-daemon-system and libvirt-clients",
            ));
        }
        // A copy of the stock configuration, without autostarted networks (no
        // bridge on the host), QEMU run as root (sockets in our work dir), and
        // logs kept in the work dir.
        let status = Command::new("cp")
            .args(["-a", "/etc/libvirt/.", &dir.join("etc").to_string_lossy()])
            .status()
            .map_err(io("cp"))?;
        if !status.success() {
            return Err(HarnessError::new("copying /etc/libvirt failed"));
        }
        let _ = fs::remove_dir_all(dir.join("etc/qemu/networks"));
        let _ = fs::remove_dir_all(dir.join("etc/hooks"));
        let mut qemu_conf = fs::read_to_string(dir.join("etc/qemu.conf")).unwrap_or_default();
        qemu_conf.push_str("\nuser = \"root\"\ngroup = \"root\"\nstdio_handler = \"file\"\n");
        fs::write(dir.join("etc/qemu.conf"), qemu_conf).map_err(io("writing qemu.conf"))?;
        let mut conf = fs::read_to_string(dir.join("etc/libvirtd.conf")).unwrap_or_default();
        conf.push_str("\nlog_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n");
        fs::write(dir.join("etc/libvirtd.conf"), conf).map_err(io("writing libvirtd.conf"))?;
        let d = dir.display();
        let script = format!(
            "set -e
             mount --bind {d}/etc /etc/libvirt
             mount --bind {d}/lib /var/lib/libvirt
             mount --bind {cache} /var/cache/libvirt
             mount --bind {d}/log /var/log/libvirt
             mount --bind {d}/run /run/libvirt
             virtlogd -d --pid-file {d}/virtlogd.pid
             libvirtd -d --pid-file {d}/libvirtd.pid",
            cache = cache.display()
        );
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
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
            .args(["-t", &logd.to_string(), "-m", "--", "libvirtd", "-d", "--pid-file"])
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
        let end = Instant::now() + DAEMON_READY_TIMEOUT;
        loop {
            let o = self.virsh(&["version"])?;
            if o.status.success() {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(HarnessError(format!(
                    "the private libvirtd did not answer within {DAEMON_READY_TIMEOUT:?}: {}\n{}",
                    String::from_utf8_lossy(&o.stderr).trim(),
                    self.log_tail(20)
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
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
