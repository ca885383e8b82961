//! What a `vmplug verify-image` run leaves in its work directory base.

use std::path::{Path, PathBuf};

use vmplug::harness::libvirtd::OWNER_FILE;
use vmplug::harness::workdir::ProcessId;

/// The run directories under `base` whose owner record names process `pid`.
pub fn run_dirs_of(base: &Path, pid: u32) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(base) else {
        return vec![];
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|d| {
            std::fs::read_to_string(d.join(OWNER_FILE))
                .ok()
                .and_then(|s| ProcessId::parse(&s))
                .is_some_and(|o| o.pid == pid as i32)
        })
        .collect()
}

/// The PIDs a run directory's daemons and guest recorded: libvirtd, virtlogd
/// and every QEMU libvirt started there.
pub fn recorded_pids(dir: &Path) -> Vec<(String, i32)> {
    let mut files: Vec<PathBuf> = ["libvirtd.pid", "virtlogd.pid"].iter().map(|f| dir.join(f)).collect();
    if let Ok(rd) = std::fs::read_dir(dir.join("run/qemu")) {
        files.extend(rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pid")));
    }
    files
        .into_iter()
        .filter_map(|f| {
            let pid = std::fs::read_to_string(&f).ok()?.trim().parse().ok()?;
            Some((f.file_name()?.to_string_lossy().into_owned(), pid))
        })
        .collect()
}

/// Whether process `pid` exists (and is not a zombie waiting for its parent).
pub fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}
