//! A busybox initramfs that loads the virtio modules, starts `vmplug-guest` and
//! gives the test a shell on the serial console. Built once per agent binary.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::env::Kernel;
use crate::guest::Arch;
use crate::Env;

/// Modules in load order (the package has no modules.dep); those a kernel has
/// built in (trixie's virtio core and console) are left out for it.
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/char/virtio_console",
    "drivers/virtio/virtio_mem",
    // A multiqueue NIC's queues follow the CPUs (tests/tests/guest_effects.rs).
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "net/vmw_vsock/vsock",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common",
    "net/vmw_vsock/vmw_vsock_virtio_transport",
    // For `vmplug.root=`: a systemd guest's ext4 root disk.
    "drivers/block/virtio_blk",
    "lib/crc16",
    "crypto/crc32c_generic",
    "fs/mbcache",
    "fs/jbd2/jbd2",
    "fs/ext4/ext4",
];

/// The line init prints once the agent is started and the shell is about to run.
pub const READY_MARKER: &str = "vmplug-e2e: ready";

/// `onliner agent|udev|none|kernel`: who onlines hot-plugged resources (benchmarks
/// switch between the methods in one guest). `kernel` is memory auto-online.
const ONLINER: &str = r#"#!/bin/sh
stop_agent() { touch /run/agent.disabled; [ -e /run/agent.pid ] && kill "$(cat /run/agent.pid)" 2>/dev/null; rm -f /run/agent.pid; }
stop_udev() { p=$(pidof systemd-udevd) && kill $p && while pidof systemd-udevd >/dev/null; do usleep 10000; done; true; }
echo offline >/sys/devices/system/memory/auto_online_blocks
case "$1" in
  agent) stop_udev; rm -f /run/agent.disabled; while [ ! -e /run/agent.pid ]; do sleep 0.05; done ;;
  udev) stop_agent; pidof systemd-udevd >/dev/null || setsid /lib/systemd/systemd-udevd --daemon </dev/null >/dev/null 2>&1; timeout 10 udevadm settle ;;
  none) stop_agent; stop_udev ;;
  kernel) stop_agent; stop_udev; echo online >/sys/devices/system/memory/auto_online_blocks ;;
  *) echo "usage: onliner agent|udev|none|kernel" >&2; exit 2 ;;
esac
"#;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /run /tmp /etc/vmplug
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "vmplug-e2e: insmod $m failed"; done
# A systemd guest: mount its root disk and hand over to its /sbin/init.
root=$(sed -n 's/.*vmplug\.root=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$root" ]; then
  mkdir -p /newroot
  if mount -t ext4 "$root" /newroot; then
    umount /proc /sys /dev
    exec switch_root /newroot /sbin/init
  fi
  echo "vmplug-e2e: cannot mount $root"
fi
# The serial console: ttyS0 on x86, ttyAMA0 on aarch64's virt machine.
tty=$(sed -n 's/.*console=\([a-zA-Z0-9]*\).*/\1/p' /proc/cmdline)
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && ln -sf "/dev/$(basename "$p")" "/dev/virtio-ports/$(cat "$p/name")"
done
# The agent, restarted when it dies, as systemd's Restart= would, and as
# unlikely as under the unit to be chosen by the OOM killer. `onliner`
# (benchmarks) parks it while /run/agent.disabled exists.
(
  while :; do
    if [ -e /run/agent.disabled ]; then sleep 0.2; continue; fi
    /bin/vmplug-guest serve >>/tmp/agent.log 2>&1 &
    echo $! >/run/agent.pid
    echo -999 >/proc/$!/oom_score_adj  # as the unit's OOMScoreAdjust=-999
    wait $!
    echo "agent exited with $?" >>/tmp/agent.log
    sleep 0.2
  done
) &
echo "vmplug-e2e: ready"
# PID 1 stays this script: a console shell that exits is simply started again.
while :; do
  setsid sh -c "exec sh </dev/$tty >/dev/$tty 2>&1"
  echo "vmplug-e2e: console shell exited with $?" >/dev/$tty
done
"#;

/// systemd-udevd (udevadm) with its libraries and the repository's corrected
/// rules, so the guide's udev path can be measured in the same guest.
fn add_udev(root: &Path, env: &Env) {
    let udevadm = Path::new("/bin/udevadm");
    let ldd = Command::new("ldd").arg(udevadm).output().expect("ldd");
    let mut files = vec![udevadm.to_path_buf()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split("=>").nth(1).unwrap_or(line).split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    for f in files {
        let dest = root.join(f.strip_prefix("/").expect("absolute"));
        fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        fs::copy(&f, &dest).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    fs::create_dir_all(root.join("lib/systemd")).expect("mkdir");
    std::os::unix::fs::symlink("/bin/udevadm", root.join("lib/systemd/systemd-udevd")).expect("symlink");
    let rules = root.join("etc/udev/rules.d");
    fs::create_dir_all(&rules).expect("mkdir");
    for r in ["80-vmplug-memory-online.rules", "80-vmplug-cpu-online.rules"] {
        fs::copy(env.repo.join("udev-rules").join(r), rules.join(r)).expect("copy rule");
    }
}

fn hash_file(p: &Path) -> String {
    let meta = fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mtime = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}", meta.len(), mtime)
}

/// The initramfs for the current agent binary of `arch` and `kernel`'s modules
/// (rebuilt when either changes).
pub fn initramfs(env: &Env, kernel: &Kernel, arch: Arch) -> PathBuf {
    let agent = match arch {
        Arch::X86_64 => env.guest_agent.as_path(),
        Arch::Aarch64 => env.guest_agent_arm64(),
    };
    let key =
        format!("{}-{}-{:x}", hash_file(agent), hash_file(&kernel.image), INIT.len() + ONLINER.len() + MODULES.len());
    let out = env.cache.join(format!("initramfs-{key}.cpio.gz"));
    crate::cache::artefact(&env.cache, &out, |archive| {
        let root = archive.with_extension("root");
        let _ = fs::remove_dir_all(&root);
        fill_root(&root, env, kernel, arch);
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
                root.display(),
                archive.display()
            ))
            .status()
            .expect("run cpio");
        let _ = fs::remove_dir_all(&root);
        assert!(status.success(), "building the initramfs failed");
    });
    prune_old(env, &out, "initramfs-", ".cpio.gz");
    out
}

/// The initramfs's tree: busybox, the agent, the modules, init and (on x86,
/// whose udevd is the host's own binary) udev.
fn fill_root(tmp: &Path, env: &Env, kernel: &Kernel, arch: Arch) {
    for d in ["bin", "lib/modules", "sbin", "usr/bin", "usr/sbin"] {
        fs::create_dir_all(tmp.join(d)).expect("mkdir");
    }
    let (busybox, agent) = match arch {
        Arch::X86_64 => (env.busybox.as_path(), env.guest_agent.as_path()),
        Arch::Aarch64 => (env.busybox_arm64(), env.guest_agent_arm64()),
    };
    fs::copy(busybox, tmp.join("bin/busybox")).expect("copy busybox");
    fs::copy(agent, tmp.join("bin/vmplug-guest")).expect("copy agent");
    let mut order = String::new();
    for m in MODULES {
        let name = Path::new(m).file_name().expect("module name").to_string_lossy().to_string();
        if kernel.builtin(m) {
            continue;
        }
        fs::copy(kernel.modules.join(format!("{m}.ko")), tmp.join(format!("lib/modules/{name}.ko")))
            .unwrap_or_else(|e| panic!("module {m}: {e}"));
        order.push_str(&name);
        order.push('\n');
    }
    fs::write(tmp.join("modules.order"), order).expect("order");
    fs::write(tmp.join("init"), INIT).expect("init");
    fs::set_permissions(tmp.join("init"), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(tmp.join("bin/onliner"), ONLINER).expect("onliner");
    fs::set_permissions(tmp.join("bin/onliner"), fs::Permissions::from_mode(0o755)).expect("chmod");
    if arch == Arch::X86_64 {
        add_udev(tmp, env);
    }
}

/// Removes cache files named `prefix…suffix` other than `keep` (earlier agent
/// builds' archives and images) once they are older than an hour, so a test
/// process still booting from one is not disturbed.
pub(crate) fn prune_old(env: &Env, keep: &Path, prefix: &str, suffix: &str) {
    let Ok(rd) = fs::read_dir(&env.cache) else { return };
    for p in rd.flatten().map(|e| e.path()) {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let old = fs::metadata(&p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if p != keep && name.starts_with(prefix) && name.ends_with(suffix) && old {
            let _ = fs::remove_file(&p);
        }
    }
}
