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
