//! `vmplug verify-image` as image builders' CI runs it: as root, on images from
//! pull requests, next to other local users, ended by `timeout` or a cancelled
//! job. An image that names a host file is refused before anything boots; a
//! work directory another user made first is refused; SIGTERM and SIGHUP clean
//! up as Ctrl-C does; a run killed outright is reaped by the next one.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use vmplug::wait::Wait;

use vmplug_e2e::env::Kernel;
use vmplug_e2e::guest::Arch;
use vmplug_e2e::initramfs::initramfs;
use vmplug_e2e::verify::{recorded_pids, run_dirs_of, running};
use vmplug_e2e::Env;

/// A private base of this test's own under the suite's work directory. When
/// the test ends, even by a panic, whatever a run left there (a SIGKILLed
/// run's daemons and guest) is reaped, and the base removed.
struct Base(PathBuf);

impl std::ops::Deref for Base {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Base {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        vmplug::harness::libvirtd::reap_stale(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn base(test: &str) -> Base {
    let b = Env::get().work.join(format!("verify-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&b);
    Base(b)
}

fn spawn(image: &Path, work: &Path, extra: &[&str]) -> Child {
    let env = Env::get();
    let kernel = Kernel { image: env.kernel.clone(), modules: env.modules.clone() };
    let initrd = initramfs(env, &kernel, Arch::X86_64);
    Command::new(&env.vmplug)
        .arg("verify-image")
        .arg(image)
        .arg("--kernel")
        .arg(&env.kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--append", "quiet", "--cells", "1", "--max-vcpus", "2", "--work-dir"])
        .arg(work)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmplug verify-image")
}

fn finish(child: Child) -> (i32, String) {
    let out: Output = child.wait_with_output().expect("vmplug verify-image finished");
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("[exit {:?}]\n{all}", out.status.code());
    (out.status.code().unwrap_or(-1), all)
}

fn blank_disk(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let disk = dir.join("blank.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(16 << 20)).expect("blank disk");
    disk
}

/// Waits until the run of `pid` under `work` has a QEMU process: the guest is
/// booting. Returns the run directory.
fn wait_guest_started(work: &Path, pid: u32) -> PathBuf {
    let started = || {
        let dir = run_dirs_of(work, pid).into_iter().next()?;
        recorded_pids(&dir).iter().any(|(f, p)| f.starts_with("vmplug-verify") && running(*p)).then_some(dir)
    };
    Wait::new("verify-image to start a guest", Duration::from_secs(180))
        .every(Duration::from_millis(100))
        .until_blocking(started)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn an_image_naming_a_host_file_is_refused_before_anything_boots() {
    let work = base("hostile");
    let scratch = Env::get().work.join(format!("hostile-image-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("dir");
    let secret = scratch.join("secret");
    std::fs::write(&secret, "LEAK-ME-root-only\n".repeat(64)).expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let evil = scratch.join("evil.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&evil)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let child = spawn(&evil, &work, &["--json"]);
    let pid = child.id();
    let (code, out) = finish(child);
    let _ = std::fs::remove_dir_all(&scratch);
    assert_eq!(code, 1, "a refused image is a setup error, not a verdict");
    assert!(out.contains(&format!("has a backing file '{}'", secret.display())), "names the file: {out}");
    assert!(!out.contains("LEAK-ME"), "not one byte of the host file comes back");
    assert!(!out.contains("libvirtd"), "nothing was started: {out}");
    assert!(run_dirs_of(&work, pid).is_empty());
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_work_directory_another_user_made_first_is_refused() {
    let work = base("foreign");
    std::fs::create_dir(&work).expect("mkdir");
    // nobody, as another local user could have made it under /var/tmp.
    std::os::unix::fs::chown(&work, Some(65534), Some(65534)).expect("chown");
    let disk = blank_disk(&Env::get().work.join(format!("foreign-disk-{}", std::process::id())));
    let (code, out) = finish(spawn(&disk, &work, &[]));
    assert_eq!(code, 1);
    assert!(out.contains(&format!("refusing work directory {}", work.display())), "{out}");
    assert!(out.contains("owned by uid 65534"), "{out}");
    assert_eq!(std::fs::read_dir(&work).expect("read").count(), 0, "nothing was written into it");

    std::os::unix::fs::chown(&work, Some(0), Some(0)).expect("chown");
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (code, out) = finish(spawn(&disk, &work, &[]));
    assert_eq!(code, 1);
    assert!(out.contains("writable by its group or by others"), "{out}");
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(disk.parent().expect("dir"));
}

#[test]
fn sigterm_and_sighup_mid_boot_clean_up_and_a_killed_run_is_reaped_by_the_next() {
    let work = base("signals");
    let disk = blank_disk(&Env::get().work.join(format!("signals-disk-{}", std::process::id())));
    for (sig, name) in [(libc::SIGTERM, "terminated"), (libc::SIGHUP, "hung up")] {
        let child = spawn(&disk, &work, &[]);
        let pid = child.id();
        let dir = wait_guest_started(&work, pid);
        let pids = recorded_pids(&dir);
        assert!(pids.len() >= 3, "libvirtd, virtlogd and QEMU recorded: {pids:?}");
        // SAFETY: kill(2) on the child this test started.
        unsafe { libc::kill(pid as i32, sig) };
        let (code, out) = finish(child);
        assert_eq!(code, 1, "{name}");
        assert!(out.contains(&format!("{name}: the guest and its libvirtd were stopped")), "{out}");
        assert!(!dir.exists(), "{name}: the run directory is removed");
        for (f, p) in &pids {
            assert!(!running(*p), "{name}: {f} (PID {p}) is still running");
        }
    }

    // SIGKILL leaves everything behind; the next run (even one refused at
    // once) stops it, by the records and only after checking each PID.
    let child = spawn(&disk, &work, &[]);
    let pid = child.id();
    let dir = wait_guest_started(&work, pid);
    let pids = recorded_pids(&dir);
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = finish(child);
    assert!(pids.iter().all(|(_, p)| running(*p)), "SIGKILL leaves the daemons and QEMU running: {pids:?}");
    // A directory for an image: refused once the work directory is set up.
    let (code, out) = finish(spawn(disk.parent().expect("dir"), &work, &[]));
    assert_eq!(code, 1);
    assert!(out.contains("not a regular file"), "{out}");
    assert!(out.contains(&format!("reaping leftovers of dead process {pid}")), "{out}");
    assert!(!dir.exists(), "the dead run's directory is removed");
    for (f, p) in &pids {
        assert!(!running(*p), "{f} (PID {p}) of the killed run is still running");
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(disk.parent().expect("dir"));
}
