//! A busybox initramfs that loads the virtio modules, starts `vmplug-guest` and
//! gives the test a shell on the serial console. Built once per agent binary.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Env;

/// Modules in load order (the package has no modules.dep).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/char/virtio_console",
    "net/vmw_vsock/vsock",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common",
    "net/vmw_vsock/vmw_vsock_virtio_transport",
];

/// The line init prints once the agent is started and the shell is about to run.
pub const READY_MARKER: &str = "vmplug-e2e: ready";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /run /tmp /etc/vmplug
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "vmplug-e2e: insmod $m failed"; done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && ln -sf "/dev/$(basename "$p")" "/dev/virtio-ports/$(cat "$p/name")"
done
# The agent, restarted when it dies, as systemd's Restart= would.
(
  while :; do
    /bin/vmplug-guest serve >>/tmp/agent.log 2>&1 &
    echo $! >/run/agent.pid
    wait $!
    echo "agent exited with $?" >>/tmp/agent.log
    sleep 0.2
  done
) &
echo "vmplug-e2e: ready"
exec setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
"#;

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

/// The initramfs for the current agent binary (rebuilt when it changes).
pub fn initramfs(env: &Env) -> PathBuf {
    let key = format!("{}-{:x}", hash_file(&env.guest_agent), INIT.len() + MODULES.len());
    let out = env.cache.join(format!("initramfs-{key}.cpio.gz"));
    if out.exists() {
        return out;
    }
    let tmp = env.cache.join(format!("initramfs-build-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    for d in ["bin", "lib/modules", "sbin", "usr/bin", "usr/sbin"] {
        fs::create_dir_all(tmp.join(d)).expect("mkdir");
    }
    fs::copy(&env.busybox, tmp.join("bin/busybox")).expect("copy busybox");
    fs::copy(&env.guest_agent, tmp.join("bin/vmplug-guest")).expect("copy agent");
    let mut order = String::new();
    for m in MODULES {
        let name = Path::new(m).file_name().expect("module name").to_string_lossy().to_string();
        fs::copy(env.modules.join(format!("{m}.ko")), tmp.join(format!("lib/modules/{name}.ko")))
            .unwrap_or_else(|e| panic!("module {m}: {e}"));
        order.push_str(&name);
        order.push('\n');
    }
    fs::write(tmp.join("modules.order"), order).expect("order");
    fs::write(tmp.join("init"), INIT).expect("init");
    fs::set_permissions(tmp.join("init"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let partial = out.with_extension("partial");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'", tmp.display(), partial.display()))
        .status()
        .expect("run cpio");
    assert!(status.success(), "building the initramfs failed");
    fs::rename(&partial, &out).expect("publish initramfs");
    let _ = fs::remove_dir_all(&tmp);
    out
}
