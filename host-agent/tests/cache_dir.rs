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

/// `artefact` (scripts/lib.sh) SIGKILLed while its builder runs: the cache
/// holds no finished-looking artefact, only the builder's temporary path, and
/// the next run removes that and builds the artefact whole.
#[test]
fn a_killed_artefact_build_leaves_nothing_that_looks_finished() {
    let t = tempfile::tempdir().expect("tempdir");
    let cache = t.path().join("cache");
    let started = t.path().join("started");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root");
    let run = |builder: &str| {
        use std::os::unix::process::CommandExt;
        Command::new("bash")
            .process_group(0)
            .args(["-c", &format!(". scripts/lib.sh && {builder} && artefact \"$VMPLUG_CACHE/thing\" build")])
            .env("VMPLUG_CACHE", &cache)
            .env("STARTED", &started)
            .current_dir(repo)
            .spawn()
            .expect("bash")
    };
    // Half the artefact written, then the builder waits to be killed.
    let mut slow = run("build() { mkdir \"$1\"; echo half > \"$1/part1\"; touch \"$STARTED\"; exec sleep 600; }");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !started.exists() {
        assert!(slow.try_wait().expect("wait").is_none(), "the builder ended before it was killed");
        assert!(std::time::Instant::now() < deadline, "the builder never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The whole group (its own): bash, the builder's subshell and its sleep.
    // SAFETY: kill has no memory preconditions; the group is our child's.
    unsafe { libc::kill(-(slow.id() as i32), libc::SIGKILL) };
    let _ = slow.wait();
    assert!(!cache.join("thing").exists(), "a killed build left something that looks finished");
    let left: Vec<String> = std::fs::read_dir(&cache)
        .expect("cache")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".thing.tmp."))
        .collect();
    assert_eq!(left.len(), 1, "the killed builder's temporary path stays, and only that: {left:?}");

    let status = run("build() { mkdir \"$1\"; echo whole > \"$1/part1\"; echo whole > \"$1/part2\"; }")
        .wait()
        .expect("second run");
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(cache.join("thing/part1")).expect("part1"), "whole\n");
    assert!(cache.join("thing/part2").exists(), "built whole, not on top of the half");
    let still = std::fs::read_dir(&cache)
        .expect("cache")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(".thing.tmp."));
    assert!(!still, "the dead run's temporary path is removed");
}
