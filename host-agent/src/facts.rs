//! What a verb reads before it plans, and the libvirt helpers every verb uses:
//! the domain and host facts, the agent's session, the options of the hot-plug
//! verbs. Below the verbs (`ops`, `unplug`, `vmem`, `tune`) and the planners
//! (`plan`), above the adapters (`domain`, `xml`, `link`, `preflight`).

use std::sync::Arc;
use std::time::Duration;

use vmplug_common::protocol::{GuestInfo, ZonePolicy};
use vmplug_common::Bytes;

use crate::domain::{Affect, Connection, Domain, DomainError, DomainState, XmlView};
use crate::link::{discover, AgentAddr, GuestLink, LinkError};
use crate::preflight::{AgentTrouble, Ctx};
use crate::report::{ms, Run};
use crate::trust::{SocketTrust, LOGIN_DEFS};
use crate::xml::{DomainFacts, HostFacts};

/// Runs a blocking libvirt call on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DomainError> + Send + 'static,
) -> Result<T, DomainError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| DomainError::Other(format!("libvirt worker failed: {e}")))?
}

/// A domain with everything read about it.
#[derive(Debug)]
pub struct Loaded {
    pub dom: Arc<dyn Domain>,
    pub running: bool,
    /// Running, paused, shutting down, … (`running` is "active": any but shut off).
    pub state: DomainState,
    pub job_running: bool,
    pub facts: DomainFacts,
    pub host: HostFacts,
}

impl Loaded {
    /// The preflight context for this domain.
    pub fn ctx<'a>(
        &'a self,
        guest: Option<&'a vmplug_common::protocol::GuestInfo>,
        affect: Affect,
        no_wait: bool,
    ) -> Ctx<'a> {
        Ctx {
            dom: &self.facts,
            host: &self.host,
            guest,
            agent_trouble: None,
            running: self.running,
            state: self.state,
            job_running: self.job_running,
            affect,
            no_wait,
        }
    }
}

/// Whether the libvirt host is this machine (then its cgroup version is ours).
fn is_local(uri: &str) -> bool {
    let after = uri.split_once("://").map(|(_, r)| r).unwrap_or("");
    after.starts_with('/')
}

fn local_cgroup_v2() -> Option<bool> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        Some(true)
    } else if root.join("cpu").exists() || root.join("cpu,cpuacct").exists() {
        Some(false)
    } else {
        None
    }
}

/// Host facts for a domain: topology, free memory per node, hypervisor limits.
pub fn host_facts(conn: &dyn Connection, facts: &DomainFacts) -> Result<HostFacts, DomainError> {
    let caps = conn.capabilities()?;
    let mut host =
        HostFacts::parse_capabilities(&caps).map_err(|e| DomainError::Other(format!("host capabilities: {e}")))?;
    host.machines = HostFacts::parse_machines(&caps, &facts.arch);
    if !host.nodes.is_empty() {
        host.free =
            conn.cells_free_memory(host.nodes.len() as u32).unwrap_or_default().into_iter().map(Bytes).collect();
    }
    if !facts.arch.is_empty() {
        host.max_vcpus = conn
            .domain_capabilities(&facts.arch, &facts.machine, &facts.virt_type)
            .ok()
            .and_then(|x| HostFacts::parse_domcaps_max_vcpus(&x));
    }
    if is_local(&conn.uri()) {
        host.cgroup_v2 = local_cgroup_v2();
        // x86's pc and q35 hot-plug vCPUs in every QEMU libvirt supports; other
        // architectures differ by QEMU build (aarch64: openEuler's can, upstream
        // cannot), so the domain's own emulator is asked.
        if !matches!(facts.arch.as_str(), "x86_64" | "i686" | "") && !facts.emulator.is_empty() {
            host.cpu_hotplug = probe_cpu_hotplug(&facts.emulator, &facts.machine);
        }
    }
    Ok(host)
}

/// How long QEMU may take to answer `query-machines` (35–120 ms measured).
const QEMU_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks `emulator` (no guest, no accelerator besides TCG, no devices) whether
/// `machine` can hot-plug CPUs. None when QEMU cannot be run or does not list it.
pub fn probe_cpu_hotplug(emulator: &str, machine: &str) -> Option<bool> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let mut child = Command::new(emulator)
        .args(["-machine", "none", "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| tracing::debug!(emulator, error = %e, "cannot run the emulator to ask about its machines"))
        .ok()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // A QEMU that hangs is killed after the timeout (only this child, by PID).
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(QEMU_PROBE_TIMEOUT).is_err() {
            // SAFETY: kill(2) on the PID of the child spawned above, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let mut stdin = child.stdin.take()?;
    let _ = stdin
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-machines\"}\n{\"execute\":\"quit\"}\n");
    drop(stdin);
    let answer = child.stdout.take().and_then(|out| {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .find(|v| v["return"].is_array())
    });
    let _ = child.wait();
    let _ = tx.send(());
    let _ = watchdog.join();
    let found = crate::xml::machine_hotplugs_cpus(&answer?["return"], machine);
    tracing::debug!(emulator, machine, ?found, "QEMU query-machines: hotpluggable-cpus");
    found
}

/// A domain's state and XML, without the host's facts.
#[derive(Debug)]
pub struct DomainRead {
    pub dom: Arc<dyn Domain>,
    pub running: bool,
    pub state: DomainState,
    pub job_running: bool,
    pub facts: DomainFacts,
}

impl DomainRead {
    pub fn with_host(self, host: HostFacts) -> Loaded {
        Loaded {
            dom: self.dom,
            running: self.running,
            state: self.state,
            job_running: self.job_running,
            facts: self.facts,
            host,
        }
    }
}

/// Reads a domain: state and XML (live when running and `live` wanted).
pub async fn read_domain(conn: Arc<dyn Connection>, name: &str, want_live: bool) -> Result<DomainRead, DomainError> {
    let name = name.to_string();
    blocking(move || {
        let dom = conn.lookup(&name)?;
        let running = dom.is_active()?;
        let state = if running { dom.state()? } else { DomainState::ShutOff };
        let view = if running && want_live { XmlView::Live } else { XmlView::Inactive };
        let parse = |xml: String| {
            DomainFacts::parse(&xml).map_err(|e| DomainError::Other(format!("domain XML of '{name}': {e}")))
        };
        let mut facts = parse(dom.xml(view)?)?;
        // A virtio-mem device whose `<current>` is not its `<requested>` may
        // only be libvirt's view lagging (QEMU sends a device's size at most
        // once a second, and a verdict may come from the guest's blocks
        // before it): a plan on that view would start from a stale size.
        let lagging = |f: &DomainFacts| f.virtio_mems.iter().any(|v| v.current.is_some_and(|c| c != v.requested));
        if view == XmlView::Live && lagging(&facts) {
            let catch_up = crate::wait::Wait::new("libvirt's virtio-mem <current> to catch up", VIRTIO_MEM_CATCH_UP)
                .every(std::time::Duration::from_millis(50));
            let mut waiting = catch_up.start();
            while lagging(&facts) && waiting.pause_blocking().is_ok() {
                facts = parse(dom.xml(view)?)?;
            }
        }
        let job_running = dom.job_running().unwrap_or(false);
        Ok(DomainRead { dom, running, state, job_running, facts })
    })
    .await
}

/// How long a read waits for libvirt's `<current>` of a virtio-mem device to
/// reach its `<requested>` (QEMU's size event comes at most a second late); a
/// device still changing after that is read as it stands.
pub const VIRTIO_MEM_CATCH_UP: std::time::Duration = std::time::Duration::from_millis(1500);

/// [`host_facts`] off the async threads.
pub async fn read_host(conn: Arc<dyn Connection>, facts: DomainFacts) -> Result<HostFacts, DomainError> {
    blocking(move || host_facts(conn.as_ref(), &facts)).await
}

/// Reads a domain: state, XML (live when running and `live` wanted), host facts.
pub async fn load(conn: Arc<dyn Connection>, name: &str, want_live: bool) -> Result<Loaded, DomainError> {
    let d = read_domain(conn.clone(), name, want_live).await?;
    let host = read_host(conn, d.facts.clone()).await?;
    Ok(d.with_host(host))
}

/// Options shared by the hot-plug commands.
#[derive(Debug, Clone)]
pub struct HotplugOpts {
    pub affect: Affect,
    /// How long the guest may take to bring everything online.
    pub timeout: Duration,
    /// How long to wait for the agent's handshake.
    pub agent_wait: Duration,
    pub no_wait: bool,
    /// Apply even when preflight has errors (the guest still verifies).
    pub force: bool,
    pub agent: Option<AgentAddr>,
    pub zone: ZonePolicy,
}

/// Connects to the agent for a live operation on a running domain. Its socket
/// must belong to the user the domain runs as (the DAC label of `facts`, which
/// are the live XML's), root, this user or a non-login account.
pub async fn connect_agent(
    facts: &DomainFacts,
    addr: Option<&AgentAddr>,
    wait: Duration,
) -> Result<GuestLink, LinkError> {
    let addr = match addr {
        Some(a) => a.clone(),
        None => discover(facts)?,
    };
    let expect = SocketTrust::for_domain(facts.dac_user.as_ref(), std::path::Path::new(LOGIN_DEFS));
    GuestLink::connect_expecting(&addr, &expect, wait).await
}

/// The agent link of a running domain (none for a stopped one, nor for one
/// whose guest is not running: paused, suspended, …), or why not.
pub async fn agent_if_running(
    l: &Loaded,
    addr: Option<&AgentAddr>,
    wait: Duration,
) -> (Option<GuestLink>, Option<LinkError>) {
    if !l.running || !l.state.guest_runs() {
        return (None, None);
    }
    match connect_agent(&l.facts, addr, wait).await {
        Ok(link) => (Some(link), None),
        Err(e) => (None, Some(e)),
    }
}

/// Options of `attach-memory`.
#[derive(Debug, Clone)]
pub struct MemoryOpts {
    pub size: Bytes,
    pub node: Option<u32>,
    /// Round a size that is not a multiple of the guest's block size up to one.
    pub round_up: bool,
    /// The most rounding up may reach, as a total (autoscale: the policy's and
    /// the host's room); `None`: the domain's `<maxMemory>` headroom. The guest
    /// reports the block size, so this is what keeps it from widening the plug.
    pub ceiling: Option<Bytes>,
    pub max_dimm: Bytes,
    /// Ties the DIMMs to this request (`<alias name='ua-vmplug-ID-N'/>`): the
    /// same command with the same id, after a crash, attaches only what is missing.
    pub request_id: String,
}

/// A fresh request id (microseconds since the epoch, base 36).
pub fn new_request_id() -> String {
    let mut n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    let mut s = String::new();
    while n > 0 {
        let d = (n % 36) as u32;
        s.insert(0, char::from_digit(d, 36).unwrap_or('0'));
        n /= 36;
    }
    s
}

/// Request ids become libvirt user aliases: `[A-Za-z0-9_-]`, at most 40.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 40 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// What a plan may look at, read once: the domain (live XML when running), the
/// host, where the change lands, and the guest's facts (or why there are none).
#[derive(Debug)]
pub struct Facts {
    pub loaded: Loaded,
    pub affect: Affect,
    pub guest: Option<GuestInfo>,
    pub agent_error: Option<String>,
    /// Why there are no guest facts, for the rules (refused, absent, silent).
    pub agent_trouble: Option<AgentTrouble>,
    /// The persistent definition, when a running domain's change also goes there.
    pub persistent: Option<DomainFacts>,
    /// What the guest could release now, per node and per DIMM and virtio-mem
    /// device (agents with the `forecast` capability).
    pub forecast: Option<vmplug_common::protocol::Forecast>,
}

impl Facts {
    /// The preflight context of these facts.
    pub fn ctx_for(&self, no_wait: bool) -> Ctx<'_> {
        Ctx { agent_trouble: self.agent_trouble.as_ref(), ..self.loaded.ctx(self.guest.as_ref(), self.affect, no_wait) }
    }
}

/// Reads everything the verbs' plans need, and opens the agent session a live
/// change on a running domain uses (none when plugging blind: `--no-wait` with no
/// agent configured or discoverable).
pub async fn gather(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
) -> Result<(Facts, Option<GuestLink>), DomainError> {
    gather_phases(conn, name, opts, None, true).await.map(|(f, l, _)| (f, l))
}

/// [`gather`], and how long the libvirt facts and the agent's handshake took (ms).
async fn gather_phases(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
    held: Option<GuestLink>,
    ask_guest: bool,
) -> Result<(Facts, Option<GuestLink>, (u64, u64)), DomainError> {
    // The domain first (it says where the agent is), then the host's facts and
    // the agent's handshake at the same time: neither waits for the other.
    let t = std::time::Instant::now();
    let d = read_domain(conn.clone(), name, true).await?;
    let affect = opts.affect.resolve(d.running);
    let blind = !ask_guest || (opts.no_wait && opts.agent.is_none() && discover(&d.facts).is_err());
    let host = async {
        let h = read_host(conn.clone(), d.facts.clone()).await;
        (h, ms(t))
    };
    let agent = async {
        let t = std::time::Instant::now();
        // A guest that runs no code (paused, suspended, …) cannot answer: the
        // state rules say so at once instead of after the handshake's wait.
        let s = if affect.live() && !blind && d.running && d.state.guest_runs() {
            session(&d.facts, opts, held).await
        } else {
            (None, None)
        };
        (s, ms(t))
    };
    let ((host, facts_ms), ((mut link, err), handshake_ms)) = tokio::join!(host, agent);
    let forecast = match link.as_mut() {
        Some(l) => shrink_forecast(l, &d.facts).await,
        None => None,
    };
    let loaded = d.with_host(host?);
    let persistent = if affect.config() && loaded.running {
        let dom = loaded.dom.clone();
        let xml = blocking(move || dom.xml(XmlView::Inactive)).await?;
        Some(DomainFacts::parse(&xml).map_err(|e| DomainError::Other(format!("persistent XML of '{name}': {e}")))?)
    } else {
        None
    };
    let facts = Facts {
        guest: link.as_ref().map(|k| k.info.clone()),
        agent_error: err.as_ref().map(LinkError::to_string),
        agent_trouble: err.as_ref().map(AgentTrouble::from),
        loaded,
        affect,
        persistent,
        forecast,
    };
    Ok((facts, link, (facts_ms, handshake_ms)))
}

/// The guest's forecast over every DIMM and virtio-mem region the live XML places.
async fn shrink_forecast(link: &mut GuestLink, dom: &DomainFacts) -> Option<vmplug_common::protocol::Forecast> {
    use vmplug_common::protocol::{ForecastRequest, MemRange};
    let dimms: Vec<MemRange> =
        dom.dimms.iter().filter_map(|d| Some(MemRange { start: d.base?, size: d.size })).collect();
    let virtio_mem: Vec<MemRange> = dom.virtio_mems.iter().filter_map(|d| d.range()).collect();
    if dimms.is_empty() && virtio_mem.is_empty() {
        return None;
    }
    match link.forecast(ForecastRequest { dimms, virtio_mem, release: None }).await {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "no shrink forecast from the guest");
            None
        }
    }
}

/// [`gather`], timed: the facts, the agent session (none unless `ask_guest`),
/// and the run whose preflight phase the reading was (every verb's entry
/// point starts so).
pub async fn gather_timed(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
    ask_guest: bool,
) -> Result<(Facts, Option<GuestLink>, Run), DomainError> {
    timed(conn, name, opts, None, ask_guest).await
}

/// [`gather_timed`] with an agent session the caller already holds (autoscale
/// keeps one per domain): used when it leads to this domain's agent and still
/// answers (its facts are asked again), else closed and a new one opened.
pub async fn gather_timed_with(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
    held: Option<GuestLink>,
) -> Result<(Facts, Option<GuestLink>, Run), DomainError> {
    timed(conn, name, opts, held, true).await
}

async fn timed(
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
    held: Option<GuestLink>,
    ask_guest: bool,
) -> Result<(Facts, Option<GuestLink>, Run), DomainError> {
    let mut run = Run::new();
    let t = std::time::Instant::now();
    let (facts, link, (facts_ms, handshake_ms)) = gather_phases(conn, name, opts, held, ask_guest).await?;
    run.preflight_ms = ms(t);
    (run.facts_ms, run.handshake_ms) = (facts_ms, handshake_ms);
    Ok((facts, link, run))
}

/// The agent session of a live change: `held` when it leads where this domain's
/// agent is and answers a fresh `Info`, else a new one. A held session that is not
/// used is closed before connecting (a virtio-serial channel admits one client).
async fn session(
    dom: &DomainFacts,
    opts: &HotplugOpts,
    held: Option<GuestLink>,
) -> (Option<GuestLink>, Option<LinkError>) {
    let want = opts.agent.clone().or_else(|| discover(dom).ok());
    if let Some(mut link) = held {
        if want.as_ref() == Some(&link.addr) {
            match link.refresh().await {
                Ok(()) => return (Some(link), None),
                Err(e) => tracing::debug!(error = %e, "the held agent session no longer answers; connecting again"),
            }
        }
    }
    match connect_agent(dom, opts.agent.as_ref(), opts.agent_wait).await {
        Ok(link) => (Some(link), None),
        Err(e) => (None, Some(e)),
    }
}
