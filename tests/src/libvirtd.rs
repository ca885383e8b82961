//! A private libvirtd + virtlogd in their own mount namespace, with /etc/libvirt,
//! /var/lib/libvirt, /var/log/libvirt and /run/libvirt bind-mounted from a work
//! directory, so tests never touch the machine's own libvirt state. The QEMU
//! capability cache is shared between daemons (the first probe takes ~8 s).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::Env;

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
    // SAFETY: plain kill(2) on a PID this fixture started and recorded.
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

/// Stops daemons whose test process is gone (a run killed by Ctrl-C or CI).
pub fn reap_stale(env: &Env) {
    let Ok(rd) = fs::read_dir(&env.work) else {
        return;
    };
    for dir in rd.flatten().map(|e| e.path()) {
        let Some(owner) = read_pid(&dir.join("owner.pid")) else {
            continue;
        };
        if alive(owner) {
            continue;
        }
        eprintln!("e2e: reaping leftovers of dead test process {owner} in {}", dir.display());
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

fn uri_for(dir: &Path) -> String {
    format!("qemu:///system?socket={}/run/libvirt-sock", dir.display())
}

impl Libvirtd {
    /// Starts a daemon pair under `dir` (created, world-traversable).
    pub fn start(env: &Env, dir: &Path) -> Libvirtd {
        for d in ["etc", "lib", "log", "run"] {
            fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(dir.join("owner.pid"), std::process::id().to_string()).expect("owner pid");
        let cache = env.cache.join("libvirt-cache");
        fs::create_dir_all(&cache).expect("cache dir");
        fs::create_dir_all("/run/libvirt").expect("/run/libvirt mount point");
        // A copy of the stock configuration, without autostarted networks (no
        // bridge on the host), QEMU run as root (sockets in our work dir), and
        // logs kept in the work dir.
        let status =
            Command::new("cp").args(["-a", "/etc/libvirt/.", &dir.join("etc").to_string_lossy()]).status().expect("cp");
        assert!(status.success(), "copying /etc/libvirt failed");
        let _ = fs::remove_dir_all(dir.join("etc/qemu/networks"));
        let _ = fs::remove_dir_all(dir.join("etc/hooks"));
        let mut qemu_conf = fs::read_to_string(dir.join("etc/qemu.conf")).unwrap_or_default();
        qemu_conf.push_str("\nuser = \"root\"\ngroup = \"root\"\nstdio_handler = \"file\"\n");
        fs::write(dir.join("etc/qemu.conf"), qemu_conf).expect("qemu.conf");
        let mut conf = fs::read_to_string(dir.join("etc/libvirtd.conf")).unwrap_or_default();
        conf.push_str("\nlog_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n");
        fs::write(dir.join("etc/libvirtd.conf"), conf).expect("libvirtd.conf");
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
            .expect("unshare");
        assert!(out.status.success(), "starting libvirtd failed: {}", String::from_utf8_lossy(&out.stderr));
        let daemon = Libvirtd { dir: dir.to_path_buf(), uri: uri_for(dir), stopped: false };
        daemon.wait_answering();
        daemon
    }

    /// Restarts libvirtd as `systemctl restart` would (SIGTERM, then a new daemon)
    /// in the same mount namespace, entered through virtlogd; running QEMU
    /// processes stay, and the new daemon reconnects to them. Returns how long the
    /// daemon did not answer.
    pub fn restart(&self) -> Duration {
        let started = Instant::now();
        let old = read_pid(&self.dir.join("libvirtd.pid")).expect("libvirtd pid file");
        let logd = read_pid(&self.dir.join("virtlogd.pid")).expect("virtlogd pid file");
        stop_pid(old, Duration::from_secs(30));
        let _ = fs::remove_file(self.dir.join("libvirtd.pid"));
        let pidfile = self.dir.join("libvirtd.pid");
        let out = Command::new("nsenter")
            .args(["-t", &logd.to_string(), "-m", "--", "libvirtd", "-d", "--pid-file"])
            .arg(&pidfile)
            .output()
            .expect("nsenter");
        assert!(out.status.success(), "restarting libvirtd failed: {}", String::from_utf8_lossy(&out.stderr));
        self.wait_answering();
        started.elapsed()
    }

    fn wait_answering(&self) {
        let end = Instant::now() + DAEMON_READY_TIMEOUT;
        loop {
            let o = self.virsh(&["version"]);
            if o.status.success() {
                return;
            }
            assert!(
                Instant::now() < end,
                "libvirtd did not answer within {DAEMON_READY_TIMEOUT:?}: {}\n{}",
                String::from_utf8_lossy(&o.stderr),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh").arg("-c").arg(&self.uri).args(args).output().expect("run virsh")
    }

    /// Runs virsh and returns stdout, panicking with stderr on failure.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(o.status.success(), "virsh {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log/libvirtd.log")).unwrap_or_default()
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
