//! `/etc/vmplug/guest.toml`: every key optional, unknown keys are an error.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmplug_common::protocol::{ZonePolicy, DEFAULT_SERIAL_NAME, DEFAULT_VSOCK_PORT};

pub const DEFAULT_CONFIG: &str = "/etc/vmplug/guest.toml";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// sysfs root (every sysfs path is built from it).
    pub sysfs_root: PathBuf,
    /// procfs root.
    pub proc_root: PathBuf,
    /// Where device nodes live (`/dev/virtio-ports/NAME`, `/dev/vportNpM`).
    pub dev_root: PathBuf,
    /// AF_VSOCK port to listen on; 0 disables vsock. Privileged (≤ 1023) by
    /// default, so no unprivileged guest user can bind it first.
    pub vsock_port: u32,
    /// Accept only host connections from a privileged source port (only the
    /// host's root can bind one). Turn off only behind a hybrid vsock backend
    /// (Firecracker, Cloud Hypervisor) that picks unprivileged ports itself and
    /// whose Unix socket is the guard.
    pub vsock_privileged_peer: bool,
    /// virtio-serial port name; empty disables virtio-serial.
    pub serial_port: String,
    /// Zone policy for memory onlined without an explicit request.
    pub zone: ZonePolicy,
    /// Upper bound of movable:kernel online blocks for the `auto` policy.
    pub movable_ratio: f64,
    /// Online a CPU or memory block as soon as its `add` uevent arrives.
    pub online_on_add: bool,
    /// At start-up, online whatever is offline (covers events missed while down).
    pub online_at_start: bool,
    /// Attempts per sysfs write on EBUSY/EAGAIN.
    pub write_attempts: u32,
    /// After CPUs go online or offline, set every multiqueue virtio-net device's
    /// combined channels to the online CPU count (bounded by its maximum).
    pub queues_follow_cpus: bool,
    /// Refuse a shrink that would leave MemAvailable under this many MiB (0: off).
    pub veto_min_available_mib: u64,
    /// Refuse a shrink while PSI memory `some avg10` is over this percentage (0: off).
    pub veto_memory_pressure: f64,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive).
    pub log: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sysfs_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            dev_root: PathBuf::from("/dev"),
            vsock_port: DEFAULT_VSOCK_PORT,
            vsock_privileged_peer: true,
            serial_port: DEFAULT_SERIAL_NAME.to_string(),
            zone: ZonePolicy::Auto,
            movable_ratio: 3.0,
            online_on_add: true,
            online_at_start: true,
            write_attempts: 5,
            queues_follow_cpus: true,
            veto_min_available_mib: 0,
            veto_memory_pressure: 0.0,
            log: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    #[error("{0}: movable_ratio must be positive, got {1}")]
    BadRatio(PathBuf, f64),
    #[error("{0}: veto_memory_pressure must be a percentage from 0 to 100, got {1}")]
    BadPressure(PathBuf, f64),
}

impl Config {
    /// Loads `path`. A missing file is the defaults only when `optional`.
    pub fn load(path: &Path, optional: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(ConfigError::Read(path.to_path_buf(), e)),
        };
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let c: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e.message().to_string()))?;
        if c.movable_ratio <= 0.0 || c.movable_ratio.is_nan() {
            return Err(ConfigError::BadRatio(path.to_path_buf(), c.movable_ratio));
        }
        if !(0.0..=100.0).contains(&c.veto_memory_pressure) {
            return Err(ConfigError::BadPressure(path.to_path_buf(), c.veto_memory_pressure));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(Path::new("g.toml"), "vsock_prot = 5").expect_err("unknown key");
        assert!(err.to_string().contains("vsock_prot"), "{err}");
    }

    #[test]
    fn shipped_example_is_the_defaults() {
        let text = include_str!("../guest.toml");
        assert_eq!(Config::parse(Path::new("guest.toml"), text).expect("parses"), Config::default());
    }

    #[test]
    fn partial_file_keeps_defaults() {
        let c = Config::parse(Path::new("g.toml"), "zone = \"movable\"\nvsock_port = 0").expect("parses");
        assert_eq!(c.zone, ZonePolicy::Movable);
        assert_eq!(c.vsock_port, 0);
        assert_eq!(c.serial_port, DEFAULT_SERIAL_NAME);
        assert!(Config::parse(Path::new("g.toml"), "movable_ratio = 0.0").is_err());
        assert!(Config::parse(Path::new("g.toml"), "veto_memory_pressure = 101.0").is_err());
        assert!(Config::parse(Path::new("g.toml"), "veto_memory_pressure = nan").is_err());
    }
}
