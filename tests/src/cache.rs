//! Artefacts in `$VMPLUG_CACHE` built by the fixture itself, under the same rules
//! as `scripts/lib.sh`: an exclusive lock per artefact (so concurrent test
//! binaries build it once and the others wait and reuse it), a private temporary
//! path, and an atomic rename, so a half-built artefact is never taken as done.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The lock file of `path`, as `scripts/lib.sh` names it.
fn lock_path(cache: &Path, path: &Path) -> PathBuf {
    let rel = path.strip_prefix(cache).unwrap_or(path).to_string_lossy().replace('/', "_");
    cache.join(".locks").join(format!("{rel}.lock"))
}

/// Makes sure `path` (inside `cache`) exists: returns at once if it does,
/// otherwise `build(tmp)` creates `tmp` and it is renamed to `path`. What a
/// killed builder left behind is removed first (only the lock holder builds).
pub fn artefact(cache: &Path, path: &Path, build: impl FnOnce(&Path)) -> PathBuf {
    let lock = lock_path(cache, path);
    fs::create_dir_all(lock.parent().expect("locks dir")).expect("create the cache's lock dir");
    let file: File = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .unwrap_or_else(|e| panic!("{}: {e}", lock.display()));
    let _held =
        Flock::lock(file, FlockArg::LockExclusive).unwrap_or_else(|(_, e)| panic!("locking {}: {e}", lock.display()));
    if path.exists() {
        return path.to_path_buf();
    }
    let dir = path.parent().expect("artefact dir");
    let base = path.file_name().expect("artefact name").to_string_lossy().into_owned();
    let stale = format!(".{base}.tmp.");
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&stale) {
            let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
        }
    }
    let tmp = dir.join(format!("{stale}{}", std::process::id()));
    build(&tmp);
    assert!(tmp.exists(), "building {} produced nothing", path.display());
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("publishing {}: {e}", path.display()));
    path.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child this test starts: the cache it builds into and is killed in.
    const KILLED_BUILDER: &str = "VMPLUG_TEST_KILLED_BUILDER_CACHE";
    const NAME: &str = "cache::tests::a_killed_build_leaves_nothing_that_looks_finished";

    /// README: "a killed run leaves nothing that looks finished". A child process
    /// is SIGKILLed halfway through writing an artefact: the artefact's path does
    /// not exist (its half is only under the private temporary name), and the
    /// next build removes that half and publishes a whole one.
    #[test]
    fn a_killed_build_leaves_nothing_that_looks_finished() {
        if let Ok(cache) = std::env::var(KILLED_BUILDER) {
            let cache = PathBuf::from(cache);
            artefact(&cache, &cache.join("kernel"), |tmp| {
                fs::write(tmp, b"half").expect("write half");
                nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).expect("kill myself");
            });
            unreachable!("killed while building");
        }
        let cache = std::env::temp_dir().join(format!("vmplug-cache-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        fs::create_dir_all(&cache).expect("cache dir");
        let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
            .env(KILLED_BUILDER, &cache)
            .status()
            .expect("start the builder");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "the builder was killed mid-build: {status:?}");
        let path = cache.join("kernel");
        assert!(!path.exists(), "nothing looks finished after the kill");
        let halves = || {
            fs::read_dir(&cache)
                .expect("cache")
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".kernel.tmp."))
                .count()
        };
        assert_eq!(halves(), 1, "the half is under its private temporary name");
        artefact(&cache, &path, |tmp| fs::write(tmp, b"whole").expect("write whole"));
        assert_eq!(fs::read(&path).expect("published"), b"whole");
        assert_eq!(halves(), 0, "the next build removed the killed one's half");
        fs::remove_dir_all(&cache).expect("clean up");
    }
}
