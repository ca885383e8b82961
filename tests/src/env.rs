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
    pub vmplug: PathBuf,
    pub guest_agent: PathBuf,
    pub busybox: PathBuf,
    /// What only the suite uses (the trixie and aarch64 guests): always there
    /// for [`Env::get`], absent for [`Env::demo`].
    suite: Option<SuiteParts>,
}

/// The guests `make demo` never boots.
#[derive(Debug)]
struct SuiteParts {
    trixie: Kernel,
    arm64: Kernel,
    arm64_acpi: Kernel,
    /// The vhost-user vsock backend the vsock guests use (the demo's guest
    /// talks over virtio-serial).
    vhost_vsock: PathBuf,
    busybox_arm64: PathBuf,
    guest_agent_arm64: PathBuf,
}

fn must_exist(p: PathBuf, hint: &str) -> PathBuf {
    assert!(p.exists(), "{} is missing: {hint}", p.display());
    p
}

static ENV: OnceLock<Env> = OnceLock::new();

impl Env {
    /// Everything the suite needs, checked at once: panics with the step to run
    /// when something is missing (`make test` does all).
    pub fn get() -> &'static Env {
        ENV.get_or_init(|| Env::load(true))
    }

    /// What `make demo` needs (one x86 guest: the bookworm kernel, the x86
    /// agent, busybox, vmplug), checked at once. Called
    /// first, it is what [`Env::get`] returns in this process; the suite's
    /// other guests then panic naming `make setup`.
    pub fn demo() -> &'static Env {
        ENV.get_or_init(|| Env::load(false))
    }

    fn load(suite: bool) -> Env {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf();
        let cache =
            std::env::var_os("VMPLUG_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/vmplug-cache".into());
        let setup = if suite {
            "run `make test` (or scripts/setup-host.sh) first"
        } else {
            "run `make demo` (or scripts/setup-host.sh demo) first"
        };
        let bookworm = Kernel::find(&cache.join("kernel"), setup);
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo.join("target"));
        let suite = suite.then(|| SuiteParts {
            trixie: Kernel::find(&cache.join("kernel-trixie"), setup),
            arm64: Kernel::find(&cache.join("kernel-arm64"), setup),
            arm64_acpi: Kernel::find(&cache.join("kernel-arm64-acpi"), setup),
            vhost_vsock: must_exist(cache.join("bin/vhost-device-vsock"), setup),
            busybox_arm64: must_exist(cache.join("kernel-arm64/bin/busybox"), setup),
            guest_agent_arm64: must_exist(
                target.join("aarch64-unknown-linux-musl/release/vmplug-guest"),
                "build the static agents: make guest-agent",
            ),
        });
        let work =
            std::env::var_os("VMPLUG_E2E_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/vmplug-e2e".into());
        // Root runs what is in it: it must be this user's alone.
        let work = vmplug::harness::workdir::private_base(&work).unwrap_or_else(|e| panic!("{e}"));
        vmplug::harness::workdir::private_base(&cache).unwrap_or_else(|e| panic!("{e}"));
        Env {
            modules: bookworm.modules,
            kernel: bookworm.image,
            suite,
            vmplug: must_exist(
                std::env::var_os("VMPLUG_BIN").map(PathBuf::from).unwrap_or_else(|| target.join("debug/vmplug")),
                "build it: cargo build -p vmplug",
            ),
            guest_agent: must_exist(
                target.join("x86_64-unknown-linux-gnu/release/vmplug-guest"),
                "build the static agent: make guest-agent",
            ),
            busybox: must_exist(PathBuf::from("/bin/busybox"), setup),
            repo,
            cache,
            work,
        }
    }

    /// vhost-device-vsock, built by `make setup` (not by the demo's set-up).
    pub fn vhost_vsock(&self) -> &PathBuf {
        &self.suite("vhost-device-vsock").vhost_vsock
    }

    fn suite(&self, what: &str) -> &SuiteParts {
        self.suite.as_ref().unwrap_or_else(|| {
            panic!("{what} is not part of the demo's set-up: run `make setup` (`make test` does) and use Env::get")
        })
    }

    /// Debian trixie's 6.12: onlines hot-added memory by itself.
    pub fn trixie(&self) -> &Kernel {
        &self.suite("the trixie kernel").trixie
    }

    /// Debian 12's arm64 kernel (no ACPI memory hot-plug), for aarch64 guests.
    pub fn arm64(&self) -> &Kernel {
        &self.suite("the arm64 kernel").arm64
    }

    /// Debian 12's arm64 source cross-built with ACPI memory hot-plug.
    pub fn arm64_acpi(&self) -> &Kernel {
        &self.suite("the arm64 ACPI kernel").arm64_acpi
    }

    /// The static aarch64 busybox that came with the arm64 kernel.
    pub fn busybox_arm64(&self) -> &Path {
        &self.suite("the arm64 busybox").busybox_arm64
    }

    /// The static aarch64 agent (musl).
    pub fn guest_agent_arm64(&self) -> &Path {
        &self.suite("the aarch64 agent").guest_agent_arm64
    }
}
