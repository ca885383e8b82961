//! A simulated guest kernel for unit and integration tests: a sysfs/procfs tree in a
//! temp dir plus an [`AttrWriter`] that reacts to writes as the kernel does
//! (`state` reads `online` afterwards, `valid_zones` names the zone, the cpu
//! `online` list follows). Faults (an errno for the next N writes) can be injected.
//! Never used outside tests.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmplug_common::CpuSet;

use crate::online::AttrWriter;
use crate::queues::{ChannelControl, Channels};
use crate::sysfs::Sysfs;

#[derive(Debug, Clone)]
pub struct FakeKernel {
    pub root: PathBuf,
    faults: Arc<Mutex<HashMap<PathBuf, VecDeque<i32>>>>,
    /// path → (what another writer puts there first, the errno the agent then gets)
    races: Arc<Mutex<HashMap<PathBuf, (String, i32)>>>,
    writes: Arc<Mutex<Vec<(PathBuf, String)>>>,
    nets: FakeChannels,
}

/// The ethtool channel interface of the fake kernel's network devices.
#[derive(Debug, Clone, Default)]
pub struct FakeChannels {
    state: Arc<Mutex<HashMap<String, Channels>>>,
    sets: Arc<Mutex<Vec<(String, u32)>>>,
    fail: Arc<Mutex<Option<i32>>>,
}

impl FakeChannels {
    /// The combined channels of `device` now.
    pub fn combined(&self, device: &str) -> u32 {
        self.state.lock().expect("lock").get(device).map_or(0, |c| c.combined)
    }

    /// Every set the agent made, in order.
    pub fn sets(&self) -> Vec<(String, u32)> {
        self.sets.lock().expect("lock").clone()
    }

    /// Every later set fails with `errno` (as virtio_net's EBUSY while XDP is on).
    pub fn fail_sets(&self, errno: i32) {
        *self.fail.lock().expect("lock") = Some(errno);
    }
}

impl ChannelControl for FakeChannels {
    fn get(&self, device: &str) -> io::Result<Channels> {
        self.state.lock().expect("lock").get(device).copied().ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
    }

    fn set_combined(&self, device: &str, combined: u32) -> io::Result<()> {
        self.sets.lock().expect("lock").push((device.to_string(), combined));
        if let Some(errno) = *self.fail.lock().expect("lock") {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let mut st = self.state.lock().expect("lock");
        let c = st.get_mut(device).ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        if combined == 0 || combined > c.max_combined {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        c.combined = combined;
        Ok(())
    }
}

fn put(path: &Path, content: &str) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).expect("create fake dir");
    }
    fs::write(path, content).expect("write fake file");
}

impl FakeKernel {
    /// A guest with `possible` CPUs possible, cpu0 present (no `online` file),
    /// 128 MiB blocks, no memory blocks yet.
    pub fn new(root: &Path, possible: u32) -> Self {
        let k = FakeKernel {
            root: root.to_path_buf(),
            faults: Arc::default(),
            races: Arc::default(),
            writes: Arc::default(),
            nets: FakeChannels::default(),
        };
        let cpu = k.sys().join("devices/system/cpu");
        put(&cpu.join("possible"), &format!("0-{}\n", possible - 1));
        // cpu0 has no `online` file: the kernel's online list is what says it is up.
        put(&cpu.join("online"), "0\n");
        fs::create_dir_all(cpu.join("cpu0")).expect("cpu0");
        k.sync_cpu_lists();
        let mem = k.sys().join("devices/system/memory");
        put(&mem.join("block_size_bytes"), "8000000\n");
        put(&mem.join("auto_online_blocks"), "offline\n");
        put(&k.sys().join("devices/system/node/online"), "0\n");
        fs::create_dir_all(k.sys().join("devices/system/node/node0")).expect("node0");
        put(&k.sys().join("firmware/acpi/hotplug/memory/enabled"), "1\n");
        put(&k.sys().join("firmware/acpi/hotplug/processor/enabled"), "1\n");
        put(&k.proc().join("meminfo"), "MemTotal:        1000000 kB\nMemFree:          800000 kB\nMemAvailable:     900000 kB\nHugepagesize:       2048 kB\n");
        put(&k.proc().join("loadavg"), "0.50 0.25 0.10 1/80 1234\n");
        put(
            &k.proc().join("pressure/cpu"),
            "some avg10=1.50 avg60=0.50 avg300=0.10 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
        put(
            &k.proc().join("pressure/memory"),
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
        put(&k.proc().join("sys/kernel/osrelease"), "6.1.0-fake\n");
        k
    }

    pub fn sys(&self) -> PathBuf {
        self.root.join("sys")
    }

    pub fn proc(&self) -> PathBuf {
        self.root.join("proc")
    }

    pub fn sysfs(&self) -> Sysfs {
        Sysfs::new(self.sys(), self.proc())
    }

    pub fn writer(&self) -> Box<dyn AttrWriter> {
        Box::new(self.clone())
    }

    /// Every write the agent made, in order.
    pub fn writes(&self) -> Vec<(PathBuf, String)> {
        self.writes.lock().expect("lock").clone()
    }

    /// The next `errnos.len()` writes to `path` fail with these errnos.
    pub fn fail_writes(&self, path: PathBuf, errnos: &[i32]) {
        self.faults.lock().expect("lock").entry(path).or_default().extend(errnos);
    }

    /// The next write to `path` loses a race: another writer (a udev rule) puts
    /// `content` there first, and the kernel answers the agent with `errno`.
    pub fn race_write(&self, path: PathBuf, content: &str, errno: i32) {
        self.races.lock().expect("lock").insert(path, (content.to_string(), errno));
    }

    /// Hot-plugs `cpuN` (`online` file present, offline unless `online`).
    pub fn add_cpu(&self, id: u32, online: bool) {
        put(&self.sys().join(format!("devices/system/cpu/cpu{id}/online")), if online { "1\n" } else { "0\n" });
        self.sync_cpu_lists();
    }

    /// Hot-plugs `memoryN` on `node` with the given `valid_zones`.
    pub fn add_block(&self, index: u64, online: bool, zones: &str, node: u32) {
        let dir = self.sys().join(format!("devices/system/memory/memory{index}"));
        put(&dir.join("state"), if online { "online\n" } else { "offline\n" });
        put(&dir.join("valid_zones"), &format!("{zones}\n"));
        put(&dir.join("phys_index"), &format!("{index:08x}\n"));
        put(&dir.join("removable"), "1\n");
        fs::create_dir_all(dir.join(format!("node{node}"))).expect("node link");
    }

    /// Loads the virtio_mem driver with `devices` bound to it.
    pub fn load_virtio_mem(&self, devices: u32) {
        let drv = self.sys().join("bus/virtio/drivers/virtio_mem");
        fs::create_dir_all(&drv).expect("virtio_mem driver");
        for n in 0..devices {
            fs::create_dir_all(drv.join(format!("virtio{}", n + 1))).expect("virtio_mem device");
        }
    }

    /// A network interface `name` bound to `driver`, with `max` combined channels
    /// of which `combined` are in use.
    pub fn add_netdev(&self, name: &str, driver: &str, max: u32, combined: u32) {
        let drv = self.sys().join("bus/virtio/drivers").join(driver);
        fs::create_dir_all(&drv).expect("driver dir");
        let dev = self.sys().join("class/net").join(name).join("device");
        fs::create_dir_all(&dev).expect("net device dir");
        std::os::unix::fs::symlink(&drv, dev.join("driver")).expect("driver link");
        self.nets.state.lock().expect("lock").insert(name.to_string(), Channels { max_combined: max, combined });
    }

    /// The ethtool channel interface of the devices [`Self::add_netdev`] made.
    pub fn channels(&self) -> FakeChannels {
        self.nets.clone()
    }

    /// Hot-unplugs `memoryN` (the DIMM was ejected).
    pub fn remove_block(&self, index: u64) {
        let _ = fs::remove_dir_all(self.sys().join(format!("devices/system/memory/memory{index}")));
    }

    fn sync_cpu_lists(&self) {
        let dir = self.sys().join("devices/system/cpu");
        let sysfs = self.sysfs();
        // Entries a test made unreadable on purpose are left out of the lists.
        let cpus: Vec<_> = sysfs
            .cpu_entries()
            .expect("fake cpu dir readable")
            .into_iter()
            .filter_map(|(_, e)| e.ok().flatten())
            .collect();
        let present: CpuSet = cpus.iter().map(|c| c.id).collect();
        let online: CpuSet = cpus.iter().filter(|c| c.online).map(|c| c.id).collect();
        put(&dir.join("present"), &format!("{present}\n"));
        put(&dir.join("online"), &format!("{online}\n"));
    }
}

impl AttrWriter for FakeKernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        self.writes.lock().expect("lock").push((path.to_path_buf(), value.to_string()));
        if let Some(errno) = self.faults.lock().expect("lock").get_mut(path).and_then(|q| q.pop_front()) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if let Some((content, errno)) = self.races.lock().expect("lock").remove(path) {
            fs::write(path, content)?;
            self.sync_cpu_lists();
            return Err(io::Error::from_raw_os_error(errno));
        }
        if !path.exists() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        match (name, value) {
            ("online", "1" | "0") => {
                fs::write(path, format!("{value}\n"))?;
                self.sync_cpu_lists();
            }
            ("state", v) if v.starts_with("online") => {
                let zones_path = path.with_file_name("valid_zones");
                let zones = fs::read_to_string(&zones_path).unwrap_or_default();
                let zone = match v {
                    "online_movable" => "Movable".to_string(),
                    "online_kernel" => "Normal".to_string(),
                    _ => zones.split_whitespace().next().unwrap_or("Normal").to_string(),
                };
                if !zones.split_whitespace().any(|z| z == zone) {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                fs::write(path, "online\n")?;
                fs::write(zones_path, format!("{zone}\n"))?;
            }
            ("state", "offline") => {
                fs::write(path, "offline\n")?;
                fs::write(path.with_file_name("valid_zones"), "Normal Movable\n")?;
            }
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
        Ok(())
    }
}
