//! vmplug-guest: the guest half of vmplug's closed loop. Watches kernel uevents and
//! sysfs, onlines hot-plugged CPUs and memory blocks, verifies, and reports to the
//! host over vsock or virtio-serial.

pub mod agent;
pub mod config;
pub mod daemon;
pub mod forecast;
pub mod notify;
pub mod online;
pub mod queues;
pub mod server;
pub mod sysfs;
#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transport;
pub mod udev;
pub mod uevent;

use std::sync::Arc;

use config::Config;
use online::{KernelWriter, OnlinePolicy, Onliner};
use sysfs::Sysfs;

/// Builds the agent that talks to the real kernel under the configured roots.
pub fn agent_from_config(config: &Config) -> Arc<agent::Agent> {
    let sysfs = Sysfs::new(&config.sysfs_root, &config.proc_root);
    let policy = OnlinePolicy {
        movable_ratio: config.movable_ratio,
        write_attempts: config.write_attempts.max(1),
        ..OnlinePolicy::default()
    };
    agent::Agent::with_channels(
        Onliner::new(sysfs, policy, Box::new(KernelWriter)),
        config.zone,
        config.online_on_add,
        Arc::new(queues::Ethtool),
        config.queues_follow_cpus,
    )
    .with_floors(forecast::Floors {
        min_available: vmplug_common::Bytes(config.veto_min_available_mib.saturating_mul(vmplug_common::MIB)),
        memory_pressure: config.veto_memory_pressure,
    })
}
