//! What the end-to-end tests need on this machine, found once.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A guest kernel unpacked in the cache: its image and its modules tree.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    /// `.../lib/modules/RELEASE/kernel`.
    pub modules: PathBuf,
}

impl Kernel {
    /// The kernel unpacked under `dir` (modules under `lib/` or `usr/lib/`; a
    /// kernel with everything built in has none).
    fn find(dir: &Path, setup: &str) -> Kernel {
        let image = std::fs::read_dir(dir.join("boot"))
            .ok()
            .and_then(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
            })
            .unwrap_or_else(|| panic!("no guest kernel under {}: {setup}", dir.display()));
        let release = image.file_name().expect("name").to_string_lossy().trim_start_matches("vmlinuz-").to_string();
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|m| dir.join(m).join(&release).join("kernel"))
            .find(|p| p.exists())
            .unwrap_or_else(|| dir.join("lib/modules").join(&release).join("kernel"));
        Kernel { image, modules }
    }

    /// Whether `module` (`drivers/virtio/virtio`) is built into this kernel
    /// (always, for a kernel without modules).
    pub fn builtin(&self, module: &str) -> bool {
        if !self.modules.exists() {
            return true;
        }
        let list = self.modules.parent().map(|p| p.join("modules.builtin")).unwrap_or_default();
        std::fs::read_to_string(list).unwrap_or_default().lines().any(|l| l == format!("kernel/{module}.ko"))
    }
}

#[derive(Debug)]
pub struct Env {
    pub repo: PathBuf,
    pub cache: PathBuf,
    /// Where per-test work directories go.
    pub work: PathBuf,
    pub kernel: PathBuf,
    pub modules: PathBuf,
    /// Debian trixie's 6.12: onlines hot-added memory by itself.
    pub trixie: Kernel,
    /// Debian 12's arm64 kernel (no ACPI memory hot-plug), for aarch64 guests.
    pub arm64: Kernel,
    /// Debian 12's arm64 source cross-built with ACPI memory hot-plug.
    pub arm64_acpi: Kernel,
    /// The static aarch64 busybox that came with it.
    pub busybox_arm64: PathBuf,
    pub vmplug: PathBuf,
    pub guest_agent: PathBuf,
    /// The static aarch64 agent (musl).
    pub guest_agent_arm64: PathBuf,
    pub vhost_vsock: PathBuf,
    pub busybox: PathBuf,
}

fn must_exist(p: PathBuf, hint: &str) -> PathBuf {
    assert!(p.exists(), "{} is missing: {hint}", p.display());
    p
}

impl Env {
    /// Panics with the step to run when something is missing (`make test` does all).
    pub fn get() -> &'static Env {
        static ENV: OnceLock<Env> = OnceLock::new();
        ENV.get_or_init(|| {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf();
            let cache =
                std::env::var_os("VMPLUG_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/vmplug-cache".into());
            let setup = "run `make test` (or scripts/setup-host.sh) first";
            let bookworm = Kernel::find(&cache.join("kernel"), setup);
            let trixie = Kernel::find(&cache.join("kernel-trixie"), setup);
            let arm64 = Kernel::find(&cache.join("kernel-arm64"), setup);
            let arm64_acpi = Kernel::find(&cache.join("kernel-arm64-acpi"), setup);
            let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo.join("target"));
            let work =
                std::env::var_os("VMPLUG_E2E_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/vmplug-e2e".into());
            // Root runs what is in it: it must be this user's alone.
            let work = vmplug::harness::workdir::private_base(&work).unwrap_or_else(|e| panic!("{e}"));
            vmplug::harness::workdir::private_base(&cache).unwrap_or_else(|e| panic!("{e}"));
            Env {
                modules: bookworm.modules,
                kernel: bookworm.image,
                trixie,
                arm64,
                arm64_acpi,
                busybox_arm64: must_exist(cache.join("kernel-arm64/bin/busybox"), setup),
                vmplug: must_exist(
                    std::env::var_os("VMPLUG_BIN").map(PathBuf::from).unwrap_or_else(|| target.join("debug/vmplug")),
                    "build it: cargo build -p vmplug",
                ),
                guest_agent: must_exist(
                    target.join("x86_64-unknown-linux-gnu/release/vmplug-guest"),
                    "build the static agent: make guest-agent",
                ),
                guest_agent_arm64: must_exist(
                    target.join("aarch64-unknown-linux-musl/release/vmplug-guest"),
                    "build the static agents: make guest-agent",
                ),
                vhost_vsock: must_exist(cache.join("bin/vhost-device-vsock"), setup),
                busybox: must_exist(PathBuf::from("/bin/busybox"), setup),
                repo,
                cache,
                work,
            }
        })
    }
}
