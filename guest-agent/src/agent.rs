//! The agent's core: request semantics over the onlining engine, shared by every
//! connection, the uevent task and the one-shot commands.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch, Mutex};
use vmplug_common::protocol::{
    ErrorBody, ErrorCode, Event, GuestInfo, ItemOutcome, MemRange, OfflineRequest, OnlineRequest, Pressure,
    QueueChange, QueueState, Queues, Report, ZonePolicy, MAX_RANGES, MAX_TIMEOUT_MS, PROTOCOL_VERSION,
};
use vmplug_common::Bytes;

use crate::online::{blocks_of, merge, OnlineError, Onliner};
use crate::queues::{ChannelControl, Ethtool};
use crate::sysfs::{hugepage_size, Sysfs, SysfsError};
use crate::uevent::{Action, Resource, Uevent};

/// While a request waits for devices to appear, sysfs is also rescanned this often,
/// in case a uevent was lost. Never runs when no request is waiting.
pub const WAIT_RESCAN: Duration = Duration::from_millis(250);

/// After a memory `add` uevent, how often and how long to wait for the kernel to
/// finish registering the block (2 s in all); a request's own wait covers the rest.
const ADD_SETTLE_TRIES: u32 = 400;
const ADD_SETTLE_PAUSE: Duration = Duration::from_millis(5);

pub const CAPABILITIES: &[&str] = &["online", "offline", "pressure", "events", "virtio-mem", "queues", "forecast"];

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Online(#[from] OnlineError),
    #[error("guest state unreadable")]
    Sysfs(#[from] SysfsError),
    #[error("timeout of {0} ms is out of range (1..={MAX_TIMEOUT_MS})")]
    BadTimeout(u64),
    #[error("request names {0} memory ranges, more than {MAX_RANGES}")]
    TooManyRanges(usize),
    #[error("blocking task failed: {0}")]
    Join(String),
}

impl AgentError {
    pub fn to_body(&self) -> ErrorBody {
        let code = match self {
            AgentError::Online(OnlineError::Misaligned { .. }) => ErrorCode::Misaligned,
            AgentError::Online(OnlineError::NoMemoryHotplug) => ErrorCode::Unsupported,
            AgentError::Online(OnlineError::TooManyBlocks(_))
            | AgentError::BadTimeout(_)
            | AgentError::TooManyRanges(_) => ErrorCode::Invalid,
            _ => ErrorCode::Internal,
        };
        let mut message = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        ErrorBody { code, message }
    }
}

#[derive(Debug)]
pub struct Agent {
    onliner: Arc<Onliner>,
    zone: vmplug_common::protocol::ZonePolicy,
    /// Bumped on every uevent (or lost-event notice): waiting requests rescan.
    changes: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    /// Serialises writers: requests and the uevent onliner never interleave.
    lock: Mutex<()>,
    /// Whether `add` uevents are onlined without a request.
    online_on_add: bool,
    /// Resources this agent onlined on its own (on `add`), not yet reported:
    /// a request that finds them online reports them as done by the agent.
    self_onlined: std::sync::Mutex<std::collections::HashSet<Resource>>,
    /// virtio-mem regions the host named, with the zone it asked for: blocks the
    /// device plugs there later are onlined in that zone, not the default one.
    virtio_mem: std::sync::Mutex<Vec<(MemRange, ZonePolicy)>>,
    /// The network devices' channels (ethtool), and whether they follow the CPUs.
    channels: Arc<dyn ChannelControl>,
    queues_follow_cpus: bool,
    /// The last change the agent made (or tried) on each device's channels.
    queue_log: std::sync::Mutex<BTreeMap<String, QueueChange>>,
    /// Changes not reported yet (the uevent onliner's, then a request's own):
    /// the next CPU request's report carries them.
    queue_unreported: std::sync::Mutex<BTreeMap<String, QueueState>>,
    /// The guest's own floors under which it vetoes a shrink.
    floors: std::sync::Mutex<crate::forecast::Floors>,
}

impl Agent {
    pub fn new(onliner: Onliner, zone: vmplug_common::protocol::ZonePolicy, online_on_add: bool) -> Arc<Self> {
        Self::with_channels(onliner, zone, online_on_add, Arc::new(Ethtool), false)
    }

    /// An agent whose multiqueue network devices' channels follow the online
    /// CPUs when `queues_follow_cpus`, set through `channels`.
    pub fn with_channels(
        onliner: Onliner,
        zone: vmplug_common::protocol::ZonePolicy,
        online_on_add: bool,
        channels: Arc<dyn ChannelControl>,
        queues_follow_cpus: bool,
    ) -> Arc<Self> {
        let (changes, _) = watch::channel(0);
        let (events, _) = broadcast::channel(256);
        Arc::new(Agent {
            onliner: Arc::new(onliner),
            zone,
            changes,
            events,
            lock: Mutex::new(()),
            online_on_add,
            self_onlined: Default::default(),
            virtio_mem: Default::default(),
            channels,
            queues_follow_cpus,
            queue_log: Default::default(),
            queue_unreported: Default::default(),
            floors: Default::default(),
        })
    }

    /// This agent with the guest's floors for its shrink veto.
    pub fn with_floors(self: Arc<Self>, floors: crate::forecast::Floors) -> Arc<Self> {
        *self.floors.lock().unwrap_or_else(|e| e.into_inner()) = floors;
        self
    }

    /// How much memory the guest could release now, and its veto on `req.release`.
    pub fn forecast(
        &self,
        req: &vmplug_common::protocol::ForecastRequest,
    ) -> Result<vmplug_common::protocol::Forecast, AgentError> {
        Self::check_bounds(1, req.dimms.len() + req.virtio_mem.len())?;
        let floors = *self.floors.lock().unwrap_or_else(|e| e.into_inner());
        Ok(crate::forecast::forecast(self.sysfs(), req, &floors)?)
    }

    /// Sets every multiqueue virtio-net device's combined channels to the online
    /// CPUs (bounded by its maximum), when configured; remembers what changed.
    /// The caller holds the writers' lock, or runs where no CPU changes.
    async fn follow_cpus(&self) {
        if !self.queues_follow_cpus {
            return;
        }
        let sysfs = self.sysfs().clone();
        let ctl = self.channels.clone();
        let res = tokio::task::spawn_blocking(move || {
            let cpus = sysfs.cpu_facts().map(|f| f.online.len() as u32)?;
            Ok::<_, SysfsError>(crate::queues::align(&sysfs, ctl.as_ref(), cpus, true))
        })
        .await;
        match res {
            Ok(Ok(aligned)) => {
                let mut log = self.queue_log.lock().unwrap_or_else(|e| e.into_inner());
                let mut unreported = self.queue_unreported.lock().unwrap_or_else(|e| e.into_inner());
                for a in aligned.into_iter().filter(|a| a.changed) {
                    let Some(c) = a.state.last.clone() else { continue };
                    log.insert(a.state.device.clone(), c.clone());
                    // Two changes since the last report (3 then 4 CPUs) read as one: first `from`, last `to`.
                    let from = unreported.get(&a.state.device).and_then(|u| u.last.as_ref()).map_or(c.from, |l| l.from);
                    let last = QueueChange { from, ..c };
                    unreported.insert(a.state.device.clone(), QueueState { last: Some(last), ..a.state });
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot count online CPUs for the network queues"),
            Err(e) => tracing::warn!(error = %e, "network queue task failed"),
        }
    }

    /// The queue changes not reported yet, oldest device name first.
    fn take_queue_changes(&self) -> Vec<QueueState> {
        std::mem::take(&mut *self.queue_unreported.lock().unwrap_or_else(|e| e.into_inner())).into_values().collect()
    }

    /// The multiqueue virtio-net devices now and the agent's last change to each.
    pub fn queues(&self) -> Result<Queues, AgentError> {
        let s = self.sysfs();
        let cpus_online = s.cpu_facts()?.online.len() as u32;
        let log = self.queue_log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let devices = crate::queues::align(s, self.channels.as_ref(), cpus_online, false)
            .into_iter()
            .map(|a| QueueState { last: log.get(&a.state.device).cloned(), ..a.state })
            .collect();
        Ok(Queues { enabled: self.queues_follow_cpus, cpus_online, devices })
    }

    pub fn sysfs(&self) -> &Sysfs {
        &self.onliner.sysfs
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Something may have changed in sysfs (a uevent arrived, or was lost).
    pub fn notify_changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Onliner) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let onliner = self.onliner.clone();
        tokio::task::spawn_blocking(move || f(&onliner)).await.map_err(|e| AgentError::Join(e.to_string()))?
    }

    pub fn info(&self) -> Result<GuestInfo, AgentError> {
        let s = self.sysfs();
        let meminfo = s.meminfo()?;
        Ok(GuestInfo {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            kernel: s.kernel_release(),
            cpus: s.cpu_facts()?,
            memory: s.memory_facts()?,
            hugepage_size: hugepage_size(&meminfo),
            mem_total: Bytes(meminfo.get("MemTotal").copied().unwrap_or(0)),
            mem_available: Bytes(meminfo.get("MemAvailable").copied().unwrap_or(0)),
            acpi_memory_hotplug: s.acpi_hotplug("memory"),
            acpi_cpu_hotplug: s.acpi_hotplug("processor"),
            numa_nodes: s.numa_nodes(),
            numa_possible: s.numa_possible(),
            memmap_on_memory: s.memmap_on_memory(),
            udev_online_rule: crate::udev::online_rule_installed(&s.sys),
            virtio_mem_devices: s.virtio_mem_devices(),
        })
    }

    pub fn pressure(&self) -> Result<Pressure, AgentError> {
        let s = self.sysfs();
        let meminfo = s.meminfo()?;
        let (load1, load5, load15) = s.loadavg()?;
        let (cpu_some, _) = s.psi("cpu");
        let (memory_some, memory_full) = s.psi("memory");
        Ok(Pressure {
            cpu_some,
            memory_some,
            memory_full,
            mem_total: Bytes(meminfo.get("MemTotal").copied().unwrap_or(0)),
            mem_available: Bytes(meminfo.get("MemAvailable").copied().unwrap_or(0)),
            load1,
            load5,
            load15,
            cpus_online: s.cpu_facts()?.online.len() as u32,
        })
    }

    fn check_bounds(timeout_ms: u64, ranges: usize) -> Result<Duration, AgentError> {
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(AgentError::BadTimeout(timeout_ms));
        }
        if ranges > MAX_RANGES {
            return Err(AgentError::TooManyRanges(ranges));
        }
        Ok(Duration::from_millis(timeout_ms))
    }

    /// Brings the guest to the request's targets, waiting (bounded) for devices that
    /// have not appeared yet. Always answers with the full report.
    pub async fn online(&self, req: OnlineRequest) -> Result<Report, AgentError> {
        let started = Instant::now();
        let timeout = Self::check_bounds(req.timeout_ms, req.memory.len() + req.virtio_mem.len())?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut blocks = self.onliner.blocks_for(&req.memory)?;
        // virtio-mem regions: every block the device may plug, but only those
        // present count (the rest is not waited for).
        let required: std::collections::BTreeSet<u64> = blocks.iter().copied().collect();
        let optional: std::collections::BTreeSet<u64> =
            self.onliner.blocks_for(&req.virtio_mem)?.into_iter().filter(|b| !required.contains(b)).collect();
        blocks.extend(optional.iter().copied());
        if !req.virtio_mem.is_empty() {
            *self.virtio_mem.lock().unwrap_or_else(|e| e.into_inner()) =
                req.virtio_mem.iter().map(|r| (*r, req.zone)).collect();
        }
        let mut changes = self.changes.subscribe();
        let mut cpu_results = BTreeMap::new();
        let mut block_results = BTreeMap::new();
        let zone = req.zone;
        let target = req.cpus;
        let timed_out = loop {
            // Mark the current generation seen *before* scanning: any uevent after
            // this point wakes the wait below, so nothing falls between scan and wait.
            changes.borrow_and_update();
            let guard = self.lock.lock().await;
            // Only what is not settled yet is read again: a block this request
            // onlined (or found online) stays so, and re-reading every block on
            // every uevent made a growth of n blocks cost n² sysfs reads.
            let wanted: Vec<u64> = blocks
                .iter()
                .copied()
                .filter(|b| {
                    !block_results.get(b).is_some_and(|r: &vmplug_common::protocol::BlockResult| {
                        matches!(r.outcome, ItemOutcome::Done | ItemOutcome::Already)
                    })
                })
                .collect();
            let (cpus, blks) = self
                .blocking(move |o| {
                    let cpus = match target {
                        Some(t) => o.cpu_pass(t)?,
                        None => Vec::new(),
                    };
                    Ok((cpus, o.block_pass(&wanted, zone)?))
                })
                .await?;
            drop(guard);
            merge(&mut cpu_results, cpus, |c| c.cpu, |c| &c.outcome);
            let blks: Vec<vmplug_common::protocol::BlockResult> = blks
                .into_iter()
                .filter(|b| !(b.outcome == ItemOutcome::NotFound && optional.contains(&b.index)))
                .collect();
            merge(&mut block_results, blks, |b| b.index, |b| &b.outcome);
            let missing = cpu_results.values().any(|c| c.outcome == ItemOutcome::NotFound)
                || block_results.values().any(|b| b.outcome == ItemOutcome::NotFound);
            if !missing {
                break false;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break true,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(WAIT_RESCAN) => {}
            }
        };
        if target.is_some() {
            let _guard = self.lock.lock().await;
            self.follow_cpus().await;
        }
        let mut report = self.finish(cpu_results, block_results, target, timed_out, started).await?;
        if target.is_some() {
            report.queues = self.take_queue_changes();
        }
        Ok(report)
    }

    async fn finish(
        &self,
        cpus: BTreeMap<u32, vmplug_common::protocol::CpuResult>,
        blocks: BTreeMap<u64, vmplug_common::protocol::BlockResult>,
        target: Option<u32>,
        timed_out: bool,
        started: Instant,
    ) -> Result<Report, AgentError> {
        let (online, memory_online) = self.blocking(|o| Ok((o.sysfs.cpu_facts()?.online, o.memory_online()?))).await?;
        let mut cpus: Vec<_> = cpus.into_values().collect();
        let mut blocks: Vec<_> = blocks.into_values().collect();
        {
            use vmplug_common::protocol::ItemOutcome;
            let mut mine = self.self_onlined.lock().unwrap_or_else(|e| e.into_inner());
            for c in cpus.iter_mut().filter(|c| c.outcome == ItemOutcome::Already) {
                if mine.remove(&Resource::Cpu(c.cpu)) {
                    c.outcome = ItemOutcome::Done;
                }
            }
            for b in blocks.iter_mut().filter(|b| b.outcome == ItemOutcome::Already) {
                if mine.remove(&Resource::MemoryBlock(b.index)) {
                    b.outcome = ItemOutcome::Done;
                }
            }
        }
        let all_ok = cpus.iter().all(|c| c.outcome.is_success()) && blocks.iter().all(|b| b.outcome.is_success());
        let cpus_ok = target.is_none_or(|t| online.len() as u32 >= t);
        Ok(Report {
            cpus,
            blocks,
            cpus_online: online,
            memory_online,
            complete: all_ok && cpus_ok && !timed_out,
            timed_out,
            duration_ms: started.elapsed().as_millis() as u64,
            queues: Vec::new(),
        })
    }

    /// The state of every block in `ranges` (read-only).
    pub fn blocks(
        &self,
        ranges: &[vmplug_common::protocol::MemRange],
    ) -> Result<Vec<vmplug_common::protocol::BlockState>, AgentError> {
        Self::check_bounds(1, ranges.len())?;
        let bs = self.onliner.block_size()?.ok_or(OnlineError::NoMemoryHotplug)?;
        blocks_of(ranges, bs)?
            .into_iter()
            .map(|index| {
                let b = self.sysfs().block(index)?;
                Ok(vmplug_common::protocol::BlockState {
                    index,
                    start: crate::online::block_start(index, bs),
                    present: b.is_some(),
                    online: b.as_ref().is_some_and(|b| b.online),
                    zone: b.as_ref().filter(|b| b.online).and_then(|b| b.zones.first().cloned()),
                    node: b.and_then(|b| b.node),
                })
            })
            .collect()
    }

    /// Takes CPUs and memory blocks offline so the host can unplug them.
    pub async fn offline(&self, req: OfflineRequest) -> Result<Report, AgentError> {
        let started = Instant::now();
        Self::check_bounds(req.timeout_ms, req.memory.len())?;
        let blocks = self.onliner.blocks_for(&req.memory)?;
        let target = req.cpus;
        let _guard = self.lock.lock().await;
        let (cpus, blks) = self
            .blocking(move |o| {
                let cpus = match target {
                    Some(t) => o.cpu_offline_pass(t)?,
                    None => Vec::new(),
                };
                let blks = blocks.iter().map(|&i| o.offline_block(i)).collect::<Result<Vec<_>, _>>()?;
                Ok((cpus, blks))
            })
            .await?;
        let queues = match target {
            Some(_) => {
                self.follow_cpus().await;
                self.take_queue_changes()
            }
            None => Vec::new(),
        };
        let (online, memory_online) = self.blocking(|o| Ok((o.sysfs.cpu_facts()?.online, o.memory_online()?))).await?;
        let complete = cpus.iter().all(|c| c.outcome.is_success())
            && blks.iter().all(|b| b.outcome.is_success())
            && target.is_none_or(|t| online.len() as u32 <= t);
        Ok(Report {
            cpus,
            blocks: blks,
            cpus_online: online,
            memory_online,
            complete,
            timed_out: false,
            duration_ms: started.elapsed().as_millis() as u64,
            queues,
        })
    }

    /// Onlines everything offline now (start-up, `vmplug-guest online`).
    pub async fn online_everything(&self) -> Result<Report, AgentError> {
        let started = Instant::now();
        let zone = self.zone;
        let _guard = self.lock.lock().await;
        let (cpus, blocks) = self.blocking(move |o| Ok(o.online_everything(zone)?)).await?;
        self.follow_cpus().await;
        drop(_guard);
        for c in &cpus {
            self.emit_result(Resource::Cpu(c.cpu), &c.outcome, None);
        }
        for b in &blocks {
            self.emit_result(Resource::MemoryBlock(b.index), &b.outcome, b.zone.clone());
        }
        let mut report = self
            .finish(
                cpus.into_iter().map(|c| (c.cpu, c)).collect(),
                blocks.into_iter().map(|b| (b.index, b)).collect(),
                None,
                false,
                started,
            )
            .await?;
        report.queues = self.take_queue_changes();
        Ok(report)
    }

    fn emit_result(&self, what: Resource, outcome: &vmplug_common::protocol::ItemOutcome, zone: Option<String>) {
        use vmplug_common::protocol::ItemOutcome;
        let event = match (what, outcome) {
            (Resource::Cpu(cpu), ItemOutcome::Done) => Event::CpuOnlined { cpu },
            (Resource::MemoryBlock(block), ItemOutcome::Done) => Event::MemoryOnlined { block, zone },
            (r, ItemOutcome::Failed { errno, .. }) => Event::OnlineFailed {
                what: match r {
                    Resource::Cpu(c) => format!("cpu{c}"),
                    Resource::MemoryBlock(b) => format!("memory{b}"),
                },
                errno: *errno,
            },
            _ => return,
        };
        self.emit(event);
    }

    /// The zone a newly added resource is onlined in: the host's for a block of
    /// a virtio-mem region it named, else the configured one.
    fn zone_for(&self, resource: Resource) -> ZonePolicy {
        let Resource::MemoryBlock(b) = resource else { return self.zone };
        let Ok(Some(bs)) = self.onliner.block_size() else { return self.zone };
        let start = crate::online::block_start(b, bs);
        let regions = self.virtio_mem.lock().unwrap_or_else(|e| e.into_inner());
        regions.iter().find(|(r, _)| start >= r.start && start < r.end()).map_or(self.zone, |(_, z)| *z)
    }

    /// Reacts to one kernel uevent: wakes waiting requests and, if configured,
    /// onlines a newly added CPU or memory block right away.
    pub async fn on_uevent(&self, ev: &Uevent) {
        let Some(resource) = ev.resource() else {
            return;
        };
        if ev.action == Action::Add {
            self.emit(match resource {
                Resource::Cpu(cpu) => Event::CpuAdded { cpu },
                Resource::MemoryBlock(block) => Event::MemoryAdded { block },
            });
            if self.online_on_add {
                let zone = self.zone_for(resource);
                let guard = self.lock.lock().await;
                let res = self
                    .blocking(move |o| {
                        Ok(match resource {
                            Resource::Cpu(c) => (o.online_cpu(c)?, None),
                            Resource::MemoryBlock(b) => {
                                // The add uevent comes before the kernel links the
                                // block to its node; wait (bounded) for that.
                                for _ in 0..ADD_SETTLE_TRIES {
                                    if o.sysfs.block(b)?.is_none_or(|blk| blk.ready) {
                                        break;
                                    }
                                    std::thread::sleep(ADD_SETTLE_PAUSE);
                                }
                                // Only `auto` needs the zone counts (a read of every block).
                                let mut counts = match zone {
                                    vmplug_common::protocol::ZonePolicy::Auto => {
                                        crate::online::ZoneCounts::of(&o.sysfs.blocks()?)
                                    }
                                    _ => crate::online::ZoneCounts::default(),
                                };
                                let r = o.online_block(b, zone, &mut counts)?;
                                (r.outcome, r.zone)
                            }
                        })
                    })
                    .await;
                if matches!(resource, Resource::Cpu(_)) {
                    self.follow_cpus().await;
                }
                drop(guard);
                match res {
                    Ok((outcome, zone)) => {
                        tracing::info!(?resource, ?outcome, "onlined on add");
                        if outcome == vmplug_common::protocol::ItemOutcome::Done {
                            let mut mine = self.self_onlined.lock().unwrap_or_else(|e| e.into_inner());
                            // Bounded: a guest that is never asked must not grow this forever.
                            if mine.len() < 65_536 {
                                mine.insert(resource);
                            }
                        }
                        self.emit_result(resource, &outcome, zone);
                    }
                    Err(e) => tracing::warn!(?resource, error = %e, "onlining on add failed"),
                }
            }
        }
        self.notify_changed();
    }
}
