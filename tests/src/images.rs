//! Guest disk images built from the package under test (systemd guests, and
//! the images `verify-image` is proven on).

use std::path::PathBuf;
use std::process::Command;

use crate::Env;

/// The x86_64 guest package `make package` built: the .deb, or with `rpm` the .rpm.
pub fn guest_package(rpm: bool) -> PathBuf {
    let env = Env::get();
    let (prefix, suffix) = if rpm { ("vmplug-guest-", ".x86_64.rpm") } else { ("vmplug-guest_", "_amd64.deb") };
    std::fs::read_dir(env.repo.join("target/packages"))
        .ok()
        .and_then(|rd| {
            rd.flatten().map(|e| e.path()).find(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                name.starts_with(prefix) && name.ends_with(suffix)
            })
        })
        .unwrap_or_else(|| panic!("target/packages/{prefix}*{suffix}: run `make package` (make test does)"))
}

/// The image of `kind` (`agent`: the .deb installed; `agent-rpm`: the .rpm
/// installed by rpm; `udev`: the rules alone), built once per package (cached
/// next to the kernel).
pub fn systemd_image(kind: &str) -> PathBuf {
    let env = Env::get();
    let deb = guest_package(kind == "agent-rpm");
    let meta = std::fs::metadata(&deb).expect("deb");
    let stamp = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // The build script's content is part of the name: a changed recipe rebuilds.
    let script = std::fs::read(env.repo.join("scripts/build-systemd-image.sh")).expect("image script");
    let recipe = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        script.hash(&mut h);
        h.finish() as u32
    };
    let out = env.cache.join(format!("systemd-{kind}-{:x}-{stamp:x}-{recipe:x}.img", meta.len()));
    if !out.exists() {
        let st = Command::new(env.repo.join("scripts/build-systemd-image.sh"))
            .arg(kind)
            .arg(&deb)
            .arg(&out)
            .status()
            .expect("image script");
        assert!(st.success(), "building the {kind} image failed");
    }
    out
}

/// The systemd image of `kind` as a disk that boots by itself (MBR, syslinux, a
/// FAT boot partition with Debian's kernel and the fixture's initramfs, the
/// ext4 root as the second partition), in qcow2: what an image builder ships.
/// Built once per root image and initramfs (scripts/build-bootable-image.sh).
pub fn bootable_image(kind: &str) -> PathBuf {
    let env = Env::get();
    let root = systemd_image(kind);
    let kernel = crate::env::Kernel { image: env.kernel.clone(), modules: env.modules.clone() };
    let initrd = crate::initramfs::initramfs(env, &kernel, crate::guest::Arch::X86_64);
    let stem = |p: &std::path::Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!("bootable-{kind}-");
    let out = env.cache.join(format!("{prefix}{}-{}.qcow2", stem(&root), stem(&initrd)));
    if !out.exists() {
        let st = Command::new(env.repo.join("scripts/build-bootable-image.sh"))
            .arg(&root)
            .arg(&env.kernel)
            .arg(&initrd)
            .arg(&out)
            .env("VMPLUG_CACHE", &env.cache)
            .status()
            .expect("bootable image script");
        assert!(st.success(), "building the bootable {kind} image failed");
    }
    crate::initramfs::prune_old(env, &out, &prefix, ".qcow2");
    out
}
