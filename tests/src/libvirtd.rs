//! The private libvirtd of `vmplug::harness` (the same code `vmplug verify-image`
//! runs), with the fixture's convention: a failure panics with the daemon's log.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

pub use vmplug::harness::libvirtd::stop_pid;

use crate::Env;

#[derive(Debug)]
pub struct Libvirtd(pub vmplug::harness::libvirtd::Libvirtd);

impl std::ops::Deref for Libvirtd {
    type Target = vmplug::harness::libvirtd::Libvirtd;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Libvirtd {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Stops daemons whose test process is gone (a run killed by Ctrl-C or CI).
pub fn reap_stale(env: &Env) {
    vmplug::harness::libvirtd::reap_stale(&env.work);
}

impl Libvirtd {
    /// Starts a daemon pair under `dir` (created, world-traversable).
    pub fn start(env: &Env, dir: &Path) -> Libvirtd {
        let cache = env.cache.join("libvirt-cache");
        Libvirtd(vmplug::harness::libvirtd::Libvirtd::start(dir, &cache).unwrap_or_else(|e| panic!("{e}")))
    }

    /// Restarts libvirtd in place; how long it did not answer.
    pub fn restart(&self) -> Duration {
        self.0.restart().unwrap_or_else(|e| panic!("{e}\n{}", self.0.log_tail(40)))
    }

    pub fn virsh(&self, args: &[&str]) -> Output {
        self.0.virsh(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs virsh and returns stdout, panicking with stderr on failure.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        self.0.virsh_out(args).unwrap_or_else(|e| panic!("{e}"))
    }
}
