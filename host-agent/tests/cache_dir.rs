//! `scripts/lib.sh` trusts its cache (`$VMPLUG_CACHE`): root runs the tools in
//! `bin/` and boots the kernels. A cache another local user could have made or
//! can write (one planted `cargo-deb` under `/var/tmp/vmplug-cache/bin` was run
//! as root by `make package`) must be refused before anything in it is used.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn source_lib(cache: &Path) -> (bool, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root");
    let out = Command::new("bash")
        .args(["-c", ". scripts/lib.sh && echo LIB-LOADED"])
        .env("VMPLUG_CACHE", cache)
        .current_dir(repo)
        .output()
        .expect("bash");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && text.contains("LIB-LOADED"), text)
}

#[test]
fn a_missing_cache_is_created_private() {
    let t = tempfile::tempdir().expect("tempdir");
    let cache = t.path().join("a/cache");
    let (ok, out) = source_lib(&cache);
    assert!(ok, "{out}");
    let m = std::fs::metadata(&cache).expect("created");
    assert_eq!(m.mode() & 0o022, 0, "nobody else may write it");
    assert!(cache.join(".locks").is_dir());
}

#[test]
fn a_cache_others_may_write_or_a_link_is_refused() {
    let t = tempfile::tempdir().expect("tempdir");
    let cache = t.path().join("cache");
    std::fs::create_dir(&cache).expect("mkdir");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (ok, out) = source_lib(&cache);
    assert!(!ok && out.contains(&format!("refusing {}", cache.display())), "{out}");
    assert!(!cache.join(".locks").exists(), "nothing is written into it");

    let link = t.path().join("link");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink(&cache, &link).expect("symlink");
    let (ok, out) = source_lib(&link);
    assert!(!ok && out.contains("symbolic link"), "{out}");

    let open = t.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (ok, out) = source_lib(&open.join("cache"));
    assert!(!ok && out.contains("lets another user replace it"), "{out}");
}

#[test]
fn a_cache_owned_by_another_user_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making a directory owned by another user needs root");
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let cache = t.path().join("cache");
    std::fs::create_dir_all(cache.join("bin")).expect("mkdir");
    std::fs::write(cache.join("bin/cargo-deb"), "#!/bin/sh\necho PLANTED\n").expect("plant");
    for p in [cache.clone(), cache.join("bin"), cache.join("bin/cargo-deb")] {
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).expect("chown");
    }
    let (ok, out) = source_lib(&cache);
    assert!(!ok && out.contains("owned by uid 65534"), "{out}");
}
