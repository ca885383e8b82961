//! `Connection`/`Domain` on libvirt through the `virt` crate. Every call blocks:
//! callers on the async runtime go through `spawn_blocking`.

use std::sync::Arc;

use virt::connect::Connect;
use virt::domain::{SchedBandwidth, SchedulerInfo};
use virt::sys;
use vmplug_common::CpuSet;

use crate::domain::{
    Affect, Connection, Domain, DomainError, DomainState, Listed, NumaMode, NumaParams, PauseReason, SchedParams,
    XmlView,
};

/// A state and reason as libvirt's numbers (`virDomainState`, and
/// `virDomainPausedReason` when paused).
fn state_from_raw(state: i32, reason: i32) -> DomainState {
    let (state, reason) = (state as u32, reason as u32);
    let pause = match reason {
        sys::VIR_DOMAIN_PAUSED_USER => PauseReason::User,
        sys::VIR_DOMAIN_PAUSED_MIGRATION | sys::VIR_DOMAIN_PAUSED_POSTCOPY | sys::VIR_DOMAIN_PAUSED_POSTCOPY_FAILED => {
            PauseReason::Migration
        }
        sys::VIR_DOMAIN_PAUSED_SAVE
        | sys::VIR_DOMAIN_PAUSED_DUMP
        | sys::VIR_DOMAIN_PAUSED_SNAPSHOT
        | sys::VIR_DOMAIN_PAUSED_FROM_SNAPSHOT => PauseReason::SaveOrSnapshot,
        sys::VIR_DOMAIN_PAUSED_IOERROR => PauseReason::IoError,
        sys::VIR_DOMAIN_PAUSED_WATCHDOG => PauseReason::Watchdog,
        sys::VIR_DOMAIN_PAUSED_CRASHED => PauseReason::Crashed,
        sys::VIR_DOMAIN_PAUSED_STARTING_UP => PauseReason::StartingUp,
        _ => PauseReason::Other,
    };
    match state {
        sys::VIR_DOMAIN_RUNNING => DomainState::Running,
        sys::VIR_DOMAIN_BLOCKED => DomainState::Blocked,
        sys::VIR_DOMAIN_PAUSED => DomainState::Paused(pause),
        sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
        sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
        sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
        sys::VIR_DOMAIN_PMSUSPENDED => DomainState::PmSuspended,
        _ => DomainState::NoState,
    }
}

fn impact(a: Affect) -> u32 {
    match a {
        Affect::Live => sys::VIR_DOMAIN_AFFECT_LIVE,
        Affect::Config => sys::VIR_DOMAIN_AFFECT_CONFIG,
        Affect::Both => sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG,
        Affect::Current => sys::VIR_DOMAIN_AFFECT_CURRENT,
    }
}

#[derive(Debug)]
pub struct LibvirtConnection {
    conn: Connect,
    uri: String,
}

impl LibvirtConnection {
    /// Opens `uri` (None: `LIBVIRT_DEFAULT_URI`, else libvirt's default), as virsh does.
    pub fn open(uri: Option<&str>) -> Result<Self, DomainError> {
        let conn = Connect::open(uri).map_err(|e| DomainError::Connect {
            uri: uri.unwrap_or("(default)").to_string(),
            message: e.message().to_string(),
        })?;
        let uri = conn.uri().unwrap_or_else(|_| uri.unwrap_or_default().to_string());
        Ok(LibvirtConnection { conn, uri })
    }
}

impl Connection for LibvirtConnection {
    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn capabilities(&self) -> Result<String, DomainError> {
        self.conn.capabilities().map_err(|e| DomainError::Other(format!("capabilities: {}", e.message())))
    }

    fn domain_capabilities(&self, arch: &str, machine: &str, virt_type: &str) -> Result<String, DomainError> {
        self.conn
            .domain_capabilities(None, Some(arch), Some(machine), Some(virt_type), 0)
            .map_err(|e| DomainError::Other(format!("domain capabilities: {}", e.message())))
    }

    fn cells_free_memory(&self, nodes: u32) -> Result<Vec<u64>, DomainError> {
        self.conn
            .cells_free_memory(0, nodes as i32)
            .map_err(|e| DomainError::Other(format!("free memory per node: {}", e.message())))
    }

    fn lookup(&self, name: &str) -> Result<Arc<dyn Domain>, DomainError> {
        // As virsh: the name, then a running domain's numeric ID, then the UUID.
        let dom = self
            .conn
            .lookup_domain_by_name(name)
            .or_else(|e| match name.parse::<u32>() {
                Ok(id) => self.conn.lookup_domain_by_id(id),
                Err(_) => Err(e),
            })
            .or_else(|e| {
                if crate::domain::looks_like_uuid(name) {
                    self.conn.lookup_domain_by_uuid_string(name)
                } else {
                    Err(e)
                }
            })
            .map_err(|_| DomainError::NotFound(name.to_string()))?;
        // Reports name the domain by its name, however it was given.
        let real = dom.name().map_err(|e| DomainError::Libvirt {
            domain: name.to_string(),
            op: "domname",
            message: e.message().to_string(),
        })?;
        Ok(Arc::new(LibvirtDomain { dom, name: real }))
    }

    fn define(&self, xml: &str) -> Result<(), DomainError> {
        self.conn.define_domain_xml(xml).map(|_| ()).map_err(|e| DomainError::Other(format!("define: {}", e.message())))
    }

    /// One `virConnectGetAllDomainStats` call (state, vCPUs, balloon; only what
    /// the driver has at hand, never waiting on a domain's job): every active
    /// domain's handle, state and fingerprint in one round trip.
    fn list_running(&self) -> Result<Vec<Listed>, DomainError> {
        use std::os::raw::{c_int, c_uint, c_ulonglong};
        let stats = sys::VIR_DOMAIN_STATS_STATE | sys::VIR_DOMAIN_STATS_VCPU | sys::VIR_DOMAIN_STATS_BALLOON;
        let flags = sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT;
        let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
        // SAFETY: the connection pointer is live for `self`; libvirt allocates
        // `records` (a NULL-terminated array) and we free it below.
        let n = unsafe { sys::virConnectGetAllDomainStats(self.conn.as_ptr(), stats as c_uint, &mut records, flags) };
        if n < 0 || records.is_null() {
            let e = virt::error::Error::last_error();
            return Err(DomainError::Other(format!("list domains (bulk stats): {}", e.message())));
        }
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: `records` holds `n` valid record pointers.
            let rec = unsafe { &**records.add(i) };
            let (params, np) = (rec.params, rec.nparams);
            let int = |name: &std::ffi::CStr| {
                let mut v: c_int = 0;
                // SAFETY: params/np are the record's; `v` is a valid out pointer.
                (unsafe { sys::virTypedParamsGetInt(params, np, name.as_ptr(), &mut v) } == 1).then_some(v)
            };
            let uint = |name: &std::ffi::CStr| {
                let mut v: c_uint = 0;
                // SAFETY: as above.
                (unsafe { sys::virTypedParamsGetUInt(params, np, name.as_ptr(), &mut v) } == 1).then_some(v)
            };
            let ullong = |name: &std::ffi::CStr| {
                let mut v: c_ulonglong = 0;
                // SAFETY: as above.
                (unsafe { sys::virTypedParamsGetULLong(params, np, name.as_ptr(), &mut v) } == 1).then_some(v)
            };
            let state = state_from_raw(int(c"state.state").unwrap_or(0), int(c"state.reason").unwrap_or(0));
            let vcpus = uint(c"vcpu.current");
            let memory = ullong(c"balloon.maximum");
            let fingerprint = match (vcpus, memory) {
                (None, None) => 0,
                (v, m) => {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (v, m).hash(&mut h);
                    h.finish().max(1)
                }
            };
            // SAFETY: the record's domain is live until the list is freed; the
            // reference taken here is the one the new `Domain` owns and frees.
            let dom = unsafe {
                if sys::virDomainRef(rec.dom) < 0 {
                    continue;
                }
                virt::domain::Domain::from_ptr(rec.dom)
            };
            let id = dom.id();
            let Ok(name) = dom.name() else { continue };
            out.push(Listed { dom: Arc::new(LibvirtDomain { dom, name }), id, state, fingerprint });
        }
        // SAFETY: the array libvirt returned, freed once with its records.
        unsafe { sys::virDomainStatsRecordListFree(records) };
        Ok(out)
    }

    fn list_domains(&self) -> Result<Vec<String>, DomainError> {
        let doms =
            self.conn.list_all_domains(0).map_err(|e| DomainError::Other(format!("list domains: {}", e.message())))?;
        Ok(doms.iter().filter_map(|d| d.name().ok()).collect())
    }
}

#[derive(Debug)]
pub struct LibvirtDomain {
    dom: virt::domain::Domain,
    name: String,
}

impl LibvirtDomain {
    fn err(&self, op: &'static str) -> impl Fn(virt::error::Error) -> DomainError + '_ {
        move |e| DomainError::Libvirt { domain: self.name.clone(), op, message: e.message().to_string() }
    }
}

impl Domain for LibvirtDomain {
    fn name(&self) -> &str {
        &self.name
    }

    fn is_active(&self) -> Result<bool, DomainError> {
        self.dom.is_active().map_err(self.err("is-active"))
    }

    fn state(&self) -> Result<DomainState, DomainError> {
        use virt::domain::{DomainPausedReason as P, DomainState as S, DomainStateReason as R};
        use virt::enumutil::Enum;
        let (state, reason) = self.dom.state().map_err(self.err("domstate"))?;
        let pause = match reason {
            Enum::Known(R::Paused(Enum::Known(r))) => match r {
                P::User => PauseReason::User,
                P::Migration | P::PostCopy | P::PostCopyFailed => PauseReason::Migration,
                P::Save | P::Dump | P::Snapshot | P::FromSnapshot => PauseReason::SaveOrSnapshot,
                P::IOError => PauseReason::IoError,
                P::Watchdog => PauseReason::Watchdog,
                P::Crashed => PauseReason::Crashed,
                P::StartingUp => PauseReason::StartingUp,
                _ => PauseReason::Other,
            },
            _ => PauseReason::Other,
        };
        Ok(match state {
            Enum::Known(S::Running) => DomainState::Running,
            Enum::Known(S::Blocked) => DomainState::Blocked,
            Enum::Known(S::Paused) => DomainState::Paused(pause),
            Enum::Known(S::Shutdown) => DomainState::ShuttingDown,
            Enum::Known(S::Shutoff) => DomainState::ShutOff,
            Enum::Known(S::Crashed) => DomainState::Crashed,
            Enum::Known(S::PMSuspended) => DomainState::PmSuspended,
            Enum::Known(S::NoState) | Enum::Unknown(_) => DomainState::NoState,
        })
    }

    fn xml(&self, view: XmlView) -> Result<String, DomainError> {
        let flags = match view {
            XmlView::Live => 0,
            XmlView::Inactive => sys::VIR_DOMAIN_XML_INACTIVE,
        };
        self.dom.xml_desc(flags).map_err(self.err("dumpxml"))
    }

    fn job_running(&self) -> Result<bool, DomainError> {
        if !self.is_active()? {
            return Ok(false);
        }
        // job_info, not job_stats: virt 0.5's job_stats builds a Vec from a null
        // pointer when libvirt returns no parameters (no job).
        let stats = self.dom.job_info().map_err(self.err("domjobinfo"))?;
        Ok(stats.r#type != sys::VIR_DOMAIN_JOB_NONE as i32)
    }

    fn set_vcpus(&self, count: u32, affect: Affect) -> Result<(), DomainError> {
        self.dom.set_vcpus_flags(count, impact(affect)).map_err(self.err("setvcpus"))
    }

    fn attach_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        self.dom.attach_device_flags(xml, impact(affect)).map_err(self.err("attach-device"))
    }

    fn detach_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        self.dom.detach_device_flags(xml, impact(affect)).map_err(self.err("detach-device"))
    }

    fn update_device(&self, xml: &str, affect: Affect) -> Result<(), DomainError> {
        self.dom.update_device_flags(xml, impact(affect)).map_err(self.err("update-device"))
    }

    fn scheduler(&self, affect: Affect) -> Result<SchedParams, DomainError> {
        // As virsh: without --live/--config the flagless call, which reads the
        // current state (some drivers accept no flags at all here).
        let s = match affect {
            Affect::Current => self.dom.scheduler_parameters(),
            a => self.dom.scheduler_parameters_flags(impact(a)),
        }
        .map_err(self.err("schedinfo"))?;
        Ok(SchedParams {
            scheduler: s.scheduler_type,
            cpu_shares: s.cpu_shares,
            vcpu_period: s.vcpu_bw.period,
            vcpu_quota: s.vcpu_bw.quota,
            emulator_period: s.emulator_bw.period,
            emulator_quota: s.emulator_bw.quota,
            global_period: s.global_bw.period,
            global_quota: s.global_bw.quota,
            iothread_period: s.iothread_bw.period,
            iothread_quota: s.iothread_bw.quota,
        })
    }

    fn set_scheduler(&self, p: &SchedParams, affect: Affect) -> Result<(), DomainError> {
        let info = SchedulerInfo {
            scheduler_type: p.scheduler.clone(),
            cpu_shares: p.cpu_shares,
            vcpu_bw: SchedBandwidth { period: p.vcpu_period, quota: p.vcpu_quota },
            emulator_bw: SchedBandwidth { period: p.emulator_period, quota: p.emulator_quota },
            global_bw: SchedBandwidth { period: p.global_period, quota: p.global_quota },
            iothread_bw: SchedBandwidth { period: p.iothread_period, quota: p.iothread_quota },
            ..Default::default()
        };
        match affect {
            Affect::Current => self.dom.set_scheduler_parameters(&info),
            a => self.dom.set_scheduler_parameters_flags(&info, impact(a)),
        }
        .map_err(self.err("schedinfo"))
    }

    fn pin_emulator(&self, cpus: &CpuSet, host_cpus: u32, affect: Affect) -> Result<(), DomainError> {
        let map = cpus.to_cpumap(host_cpus).map_err(|e| DomainError::Usage(e.to_string()))?;
        self.dom.pin_emulator(&map, impact(affect)).map_err(self.err("emulatorpin"))
    }

    fn pin_vcpu(&self, vcpu: u32, cpus: &CpuSet, host_cpus: u32, affect: Affect) -> Result<(), DomainError> {
        let map = cpus.to_cpumap(host_cpus).map_err(|e| DomainError::Usage(e.to_string()))?;
        self.dom.pin_vcpu_flags(vcpu, &map, impact(affect)).map_err(self.err("vcpupin"))
    }

    fn numa(&self, affect: Affect) -> Result<NumaParams, DomainError> {
        let p = self.dom.numa_parameters(impact(affect)).map_err(self.err("numatune"))?;
        Ok(NumaParams {
            mode: p.mode.and_then(|m| match m as u32 {
                sys::VIR_DOMAIN_NUMATUNE_MEM_STRICT => Some(NumaMode::Strict),
                sys::VIR_DOMAIN_NUMATUNE_MEM_PREFERRED => Some(NumaMode::Preferred),
                sys::VIR_DOMAIN_NUMATUNE_MEM_INTERLEAVE => Some(NumaMode::Interleave),
                sys::VIR_DOMAIN_NUMATUNE_MEM_RESTRICTIVE => Some(NumaMode::Restrictive),
                _ => None,
            }),
            nodeset: p.node_set.filter(|s| !s.is_empty()).and_then(|s| s.parse().ok()),
        })
    }

    fn set_numa(&self, p: &NumaParams, affect: Affect) -> Result<(), DomainError> {
        let params = virt::domain::NUMAParameters {
            node_set: p.nodeset.as_ref().map(|s| s.to_string()),
            mode: p.mode.map(|m| match m {
                NumaMode::Strict => sys::VIR_DOMAIN_NUMATUNE_MEM_STRICT as i32,
                NumaMode::Preferred => sys::VIR_DOMAIN_NUMATUNE_MEM_PREFERRED as i32,
                NumaMode::Interleave => sys::VIR_DOMAIN_NUMATUNE_MEM_INTERLEAVE as i32,
                NumaMode::Restrictive => sys::VIR_DOMAIN_NUMATUNE_MEM_RESTRICTIVE as i32,
            }),
        };
        self.dom.set_numa_parameters(params, impact(affect)).map_err(self.err("numatune"))
    }

    fn metadata(&self, ns: &str, view: XmlView) -> Result<Option<String>, DomainError> {
        let flags = match view {
            XmlView::Live => sys::VIR_DOMAIN_AFFECT_LIVE,
            XmlView::Inactive => sys::VIR_DOMAIN_AFFECT_CONFIG,
        };
        match self.dom.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(ns), flags) {
            Ok(xml) => Ok(Some(xml)),
            Err(e) if matches!(e.code(), virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomainMetadata)) => {
                Ok(None)
            }
            Err(e) => Err(self.err("metadata")(e)),
        }
    }

    fn set_metadata(&self, ns: &str, key: &str, element: Option<&str>, affect: Affect) -> Result<(), DomainError> {
        self.dom
            .set_metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, element, Some(key), Some(ns), impact(affect))
            .map_err(self.err("metadata"))
    }
}
