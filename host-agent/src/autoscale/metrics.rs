//! The Prometheus endpoint: per-domain gauges and counters, served at
//! `/metrics` only, bounded in connections, time and bytes, and never ended by a
//! failing `accept`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use vmplug_common::protocol::GuestInfo;

use super::decision::{Action, Capacity, DecisionEvent};
use super::Engine;

/// One domain's series: which host, which domain.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    pub domain: String,
    pub uri: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZoneLabels {
    domain: String,
    uri: String,
    zone: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PressureLabels {
    domain: String,
    uri: String,
    /// `cpu`, `memory`.
    resource: String,
    /// `some`, `full`.
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    domain: String,
    uri: String,
    /// The action's kind (`add_vcpus`, `grow_virtio_mem`, …).
    action: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UriLabels {
    uri: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    /// One of [`ALERT_RESULTS`].
    result: String,
}

/// What became of an alert, the `result` label of `vmplug_alerts_total`:
/// `accepted`, `duplicate` (a second alert for a domain and resource in one
/// delivery), `rejected` (no such domain or host), `invalid` (an alert that
/// names no domain, an unknown resource or status), `malformed` (a delivery
/// that is not Alertmanager's webhook at all), `resolved`. Every one is a
/// series from the start, at 0.
pub const ALERT_RESULTS: [&str; 6] = ["accepted", "duplicate", "rejected", "invalid", "malformed", "resolved"];

/// The kinds of action that take time, each with its duration histogram from the start.
const ACTION_KINDS: [&str; 4] = ["add_vcpus", "add_memory", "grow_virtio_mem", "shrink_virtio_mem"];

type FGauge = Gauge<f64, AtomicU64>;

/// The TYPE a metric is written with.
trait HasKind {
    fn kind(&self) -> &'static str;
}
impl HasKind for Counter {
    fn kind(&self) -> &'static str {
        "counter"
    }
}
impl HasKind for Gauge {
    fn kind(&self) -> &'static str {
        "gauge"
    }
}
impl<S, M: HasKind + prometheus_client::metrics::TypedMetric + Clone + Default> HasKind for Family<S, M> {
    fn kind(&self) -> &'static str {
        M::default().kind()
    }
}
impl HasKind for FGauge {
    fn kind(&self) -> &'static str {
        "gauge"
    }
}

/// The autoscale metrics as Prometheus families (HELP and TYPE for each,
/// labels escaped by the encoder); a domain's series go when the domain does.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    vcpus: Family<DomainLabels, Gauge>,
    vcpus_max: Family<DomainLabels, Gauge>,
    memory: Family<DomainLabels, Gauge>,
    max_memory: Family<DomainLabels, Gauge>,
    agent_up: Family<DomainLabels, Gauge>,
    guest_cpus: Family<DomainLabels, Gauge>,
    guest_mem_total: Family<DomainLabels, Gauge>,
    guest_mem_available: Family<DomainLabels, Gauge>,
    guest_blocks_online: Family<ZoneLabels, Gauge>,
    guest_blocks_offline: Family<DomainLabels, Gauge>,
    pressure: Family<PressureLabels, FGauge>,
    last_exit: Family<DomainLabels, Gauge>,
    actions: Family<ActionLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    alerts: Family<AlertLabels, Counter>,
    sessions: Family<DomainLabels, Counter>,
    fleet: Fleet,
    /// Every family's OpenMetrics name, HELP, TYPE and UNIT: the encoder writes
    /// nothing for a family with no series, and a scrape names them all.
    families: Vec<(String, &'static str, &'static str, &'static str)>,
    /// Label sets in use per domain, for removal.
    seen: std::sync::Mutex<std::collections::HashMap<DomainLabels, DomainSeries>>,
}

/// The daemon's own series: its beat, its listings, its session budget.
#[derive(Debug, Default)]
struct Fleet {
    rounds: Counter,
    rounds_skipped: Counter,
    missed: Counter,
    listing: Family<UriLabels, FGauge>,
    round: Family<UriLabels, FGauge>,
    answered: Family<UriLabels, FGauge>,
    xml_reads: Family<UriLabels, Counter>,
    sessions_open: Gauge,
    sessions_kept: Gauge,
    session_budget: Gauge,
    evicted: Counter,
    refused: Counter,
}

/// The labelled series one domain has, beyond its plain [`DomainLabels`] ones.
#[derive(Debug, Default)]
struct DomainSeries {
    zones: std::collections::BTreeSet<&'static str>,
    actions: std::collections::BTreeSet<(String, String)>,
}

/// The zone names a Linux kernel writes in `valid_zones` (`zone_names` in
/// `mm/page_alloc.c`). The zone label of a guest's series is one of these or
/// [`OTHER_ZONE`]: a guest names its zones, and a label taken as it wrote it
/// let one guest add series without end (756k in a minute).
pub const KERNEL_ZONES: [&str; 6] = ["DMA", "DMA32", "Normal", "HighMem", "Movable", "Device"];

/// The zone label of the blocks in any zone not in [`KERNEL_ZONES`] (the
/// agent's `unknown`, or a name a guest made up), their counts summed.
pub const OTHER_ZONE: &str = "other";

/// The label a guest's zone name gets: a kernel zone, else [`OTHER_ZONE`].
fn zone_label(name: &str) -> &'static str {
    KERNEL_ZONES.iter().find(|z| **z == name).copied().unwrap_or(OTHER_ZONE)
}

const SESSIONS_HELP: &str =
    "Guest agent sessions autoscale opened (connect and handshake); one per domain while vsock sessions last";

const PRESSURE_HELP: &str = "The guest's PSI avg10 as a ratio (0-1), by resource and kind";

fn duration_histogram() -> Histogram {
    // 50 ms to about 100 s.
    Histogram::new(exponential_buckets(0.05, 2.0, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut families: Vec<(String, &'static str, &'static str, &'static str)> = Vec::new();
        let mut gauge = |name: &'static str, help: &'static str, unit: Option<Unit>| {
            let f = Family::<DomainLabels, Gauge>::default();
            match unit {
                Some(u) => {
                    let full = if matches!(u, Unit::Bytes) { "_bytes" } else { "" };
                    families.push((format!("{name}{full}"), help, "gauge", full.trim_start_matches('_')));
                    registry.register_with_unit(name, help, u, f.clone())
                }
                None => {
                    families.push((name.into(), help, "gauge", ""));
                    registry.register(name, help, f.clone())
                }
            }
            f
        };
        let vcpus = gauge("vmplug_domain_vcpus", "vCPUs of the domain, as libvirt's live XML says", None);
        let vcpus_max = gauge("vmplug_domain_vcpus_max", "The domain's vCPU maximum", None);
        let memory = gauge(
            "vmplug_domain_memory",
            "The guest's memory per libvirt: boot, DIMMs, virtio-mem plugged",
            Some(Unit::Bytes),
        );
        let max_memory = gauge("vmplug_domain_max_memory", "The domain's <maxMemory>", Some(Unit::Bytes));
        let agent_up = gauge("vmplug_guest_agent_up", "1 when the guest agent answered this round, else 0", None);
        let guest_cpus =
            gauge("vmplug_guest_cpus_online", "CPUs online inside the guest, as its agent read them", None);
        let guest_mem_total = gauge("vmplug_guest_memory_total", "MemTotal inside the guest", Some(Unit::Bytes));
        let guest_mem_available =
            gauge("vmplug_guest_memory_available", "MemAvailable inside the guest", Some(Unit::Bytes));
        let guest_blocks_offline =
            gauge("vmplug_guest_memory_blocks_offline", "Memory blocks present but offline inside the guest", None);
        let last_exit = gauge(
            "vmplug_domain_last_action_exit_code",
            "Exit code of the domain's last action (0: done and verified)",
            None,
        );
        families.extend([
            ("vmplug_guest_memory_blocks_online".into(), "Memory blocks online inside the guest, by zone", "gauge", ""),
            ("vmplug_guest_pressure_avg10_ratio".into(), PRESSURE_HELP, "gauge", ""),
            ("vmplug_actions".into(), "Actions taken, by kind and outcome", "counter", ""),
            ("vmplug_agent_sessions".into(), SESSIONS_HELP, "counter", ""),
        ]);
        let guest_blocks_online = Family::<ZoneLabels, Gauge>::default();
        registry.register(
            "vmplug_guest_memory_blocks_online",
            "Memory blocks online inside the guest, by zone",
            guest_blocks_online.clone(),
        );
        let pressure = Family::<PressureLabels, FGauge>::default();
        registry.register("vmplug_guest_pressure_avg10_ratio", PRESSURE_HELP, pressure.clone());
        let actions = Family::<ActionLabels, Counter>::default();
        registry.register("vmplug_actions", "Actions taken, by kind and outcome", actions.clone());
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "vmplug_action_duration",
            "Wall time of an action through its closed loop, by kind",
            Unit::Seconds,
            duration.clone(),
        );
        let alerts = Family::<AlertLabels, Counter>::default();
        registry.register("vmplug_alerts", "Alerts received from Alertmanager's webhook, by result", alerts.clone());
        let sessions = Family::<DomainLabels, Counter>::default();
        registry.register("vmplug_agent_sessions", SESSIONS_HELP, sessions.clone());
        let fleet = Fleet::default();
        type Families = Vec<(String, &'static str, &'static str, &'static str)>;
        fn reg(
            registry: &mut Registry,
            families: &mut Families,
            name: &'static str,
            help: &'static str,
            seconds: bool,
            metric: impl prometheus_client::registry::Metric + HasKind,
        ) {
            let kind = metric.kind();
            if seconds {
                families.push((format!("{name}_seconds"), help, kind, "seconds"));
                registry.register_with_unit(name, help, Unit::Seconds, metric);
            } else {
                families.push((name.into(), help, kind, ""));
                registry.register(name, help, metric);
            }
        }
        let f = &fleet;
        let (r, fs) = (&mut registry, &mut families);
        reg(r, fs, "vmplug_autoscale_rounds", "Rounds the beat started", false, f.rounds.clone());
        reg(
            r,
            fs,
            "vmplug_autoscale_rounds_skipped",
            "Rounds of the beat skipped because the daemon was behind it",
            false,
            f.rounds_skipped.clone(),
        );
        reg(r, fs, "vmplug_autoscale_missed_samples", "Domain samples a round missed: the domain's previous step, or its host's listing, was still running, or the round was skipped", false, f.missed.clone());
        reg(
            r,
            fs,
            "vmplug_autoscale_listing",
            "The host's last listing: from the round's due instant to its selection ready",
            true,
            f.listing.clone(),
        );
        reg(
            r,
            fs,
            "vmplug_autoscale_round",
            "The host's last round: from its due instant to the end of its last step",
            true,
            f.round.clone(),
        );
        reg(
            r,
            fs,
            "vmplug_autoscale_answered",
            "The host's last round: from its due instant to the end of its last step whose agent answered",
            true,
            f.answered.clone(),
        );
        reg(
            r,
            fs,
            "vmplug_domain_xml_reads",
            "Live domain XML reads (only domains new, changed, invalidated or due by age are read)",
            false,
            f.xml_reads.clone(),
        );
        reg(
            r,
            fs,
            "vmplug_agent_sessions_open",
            "Agent sessions open: kept between rounds and in use by steps",
            false,
            f.sessions_open.clone(),
        );
        reg(r, fs, "vmplug_agent_sessions_kept", "Agent sessions kept between rounds", false, f.sessions_kept.clone());
        reg(
            r,
            fs,
            "vmplug_agent_session_budget",
            "Agent sessions the file-descriptor budget allows (RLIMIT_NOFILE less a reserve)",
            false,
            f.session_budget.clone(),
        );
        reg(r, fs, "vmplug_agent_sessions_evicted", "Kept agent sessions closed, least recently used first, to stay within the budget; each such domain connects again at its next sample", false, f.evicted.clone());
        reg(r, fs, "vmplug_agent_sessions_refused", "New agent sessions refused because every session of the budget was in use by a running step (the sample is reported failed)", false, f.refused.clone());
        // Families whose label values are a fixed set are whole from the
        // first scrape: a rate over them needs no first event.
        for result in ALERT_RESULTS {
            let _ = alerts.get_or_create(&AlertLabels { result: result.into() });
        }
        for kind in ACTION_KINDS {
            let _ = duration.get_or_create(&KindLabels { action: kind.into() });
        }
        Metrics {
            registry,
            families,
            alerts,
            sessions,
            fleet,
            vcpus,
            vcpus_max,
            memory,
            max_memory,
            agent_up,
            guest_cpus,
            guest_mem_total,
            guest_mem_available,
            guest_blocks_online,
            guest_blocks_offline,
            pressure,
            last_exit,
            actions,
            duration,
            seen: Default::default(),
        }
    }
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// The exposition in Prometheus' text format 0.0.4, what a scraper that
    /// does not ask for OpenMetrics (and `promtool check metrics`) reads.
    pub fn render(&self) -> String {
        self.render_as(Format::Prometheus)
    }

    /// The exposition in OpenMetrics' text format 1.0.0.
    pub fn render_openmetrics(&self) -> String {
        self.render_as(Format::OpenMetrics)
    }

    /// The exposition in `format`, as one string (tests, small registries;
    /// the endpoint streams [`Metrics::render_chunks`]).
    pub fn render_as(&self, format: Format) -> String {
        let mut s = String::new();
        self.render_chunks(format, &mut |c| {
            s.push_str(&c);
            true
        });
        s
    }

    /// The exposition in `format`, handed to `sink` in pieces of about
    /// [`CHUNK`] bytes as the encoder writes it: a scrape of 160k series is
    /// never one string (it was 19 MB, held three times over: the encoding,
    /// its Prometheus conversion, the response). `sink` returns false to stop.
    pub fn render_chunks(&self, format: Format, sink: &mut dyn FnMut(String) -> bool) {
        let mut w = ChunkWriter {
            format,
            families: &self.families,
            sink,
            out: String::with_capacity(CHUNK + 1024),
            line: String::new(),
            help: None,
            typed: std::collections::HashSet::new(),
            stopped: false,
        };
        if prometheus_client::encoding::text::encode(&mut w, &self.registry).is_err() && !w.stopped {
            w.out.clear();
            w.line.clear();
            w.out.push_str("# encoding failed\n");
            if format == Format::OpenMetrics {
                w.out.push_str("# EOF\n");
            }
        }
        if !w.line.is_empty() {
            let line = std::mem::take(&mut w.line);
            w.take_line(&line);
        }
        if !w.stopped && !w.out.is_empty() {
            let out = std::mem::take(&mut w.out);
            (w.sink)(out);
        }
    }

    /// One round's decision and what it saw: the host's view from libvirt, the
    /// guest's from its agent (`guest`: `None` when it did not answer).
    pub(crate) fn record(&self, ev: &DecisionEvent, cap: &Capacity, guest: Option<&GuestInfo>) {
        self.record_sample(ev, cap, guest);
        self.record_action(ev);
    }

    /// Alerts received, by result (one of [`ALERT_RESULTS`]).
    pub(crate) fn count_alerts(&self, result: &str, n: u64) {
        self.alerts.get_or_create(&AlertLabels { result: result.into() }).inc_by(n);
    }

    /// Autoscale opened a new session to the domain's agent.
    pub(crate) fn session_opened(&self, l: &DomainLabels) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.entry(l.clone()).or_default();
        self.sessions.get_or_create(l).inc();
    }

    /// What one sample saw (libvirt's view and the guest's).
    fn record_sample(&self, ev: &DecisionEvent, cap: &Capacity, guest: Option<&GuestInfo>) {
        let l = DomainLabels { uri: ev.uri.clone(), domain: ev.domain.clone() };
        // Held while the series are written, so `retain` never runs in between
        // and leaves a series it no longer knows of.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let series = seen.entry(l.clone()).or_default();
        self.vcpus.get_or_create(&l).set(i64::from(cap.vcpus));
        self.vcpus_max.get_or_create(&l).set(i64::from(cap.vcpus_max));
        self.memory.get_or_create(&l).set(as_i64(cap.memory.get()));
        self.max_memory.get_or_create(&l).set(as_i64(cap.max_memory.get()));
        self.agent_up.get_or_create(&l).set(i64::from(ev.inputs.is_some()));
        if let Some(s) = &ev.inputs {
            for (resource, kind, v) in
                [("cpu", "some", s.cpu_some), ("memory", "some", s.mem_some), ("memory", "full", s.mem_full)]
            {
                let p = PressureLabels {
                    uri: l.uri.clone(),
                    domain: l.domain.clone(),
                    resource: resource.into(),
                    kind: kind.into(),
                };
                self.pressure.get_or_create(&p).set(v / 100.0);
            }
            self.guest_mem_available.get_or_create(&l).set(as_i64(s.available.get()));
        }
        if let Some(g) = guest {
            self.guest_cpus.get_or_create(&l).set(as_i64(g.cpus.online.len() as u64));
            self.guest_mem_total.get_or_create(&l).set(as_i64(g.mem_total.get()));
            // The guest's facts replace the last ones: a zone it no longer
            // reports loses its series.
            let mut zones = std::collections::BTreeMap::<&'static str, u32>::new();
            match &g.memory {
                Some(m) => {
                    self.guest_blocks_offline.get_or_create(&l).set(i64::from(m.blocks_offline));
                    for (zone, n) in &m.zones {
                        let sum = zones.entry(zone_label(zone)).or_default();
                        *sum = sum.saturating_add(*n);
                    }
                }
                None => {
                    self.guest_blocks_offline.remove(&l);
                }
            }
            for gone in series.zones.iter().filter(|z| !zones.contains_key(*z)) {
                self.guest_blocks_online.remove(&zone_labels(&l, gone));
            }
            for (zone, n) in &zones {
                self.guest_blocks_online.get_or_create(&zone_labels(&l, zone)).set(i64::from(*n));
            }
            series.zones = zones.into_keys().collect();
        }
    }

    /// The action an event took, if any: counted, timed, its exit code kept.
    pub(crate) fn record_action(&self, ev: &DecisionEvent) {
        let l = DomainLabels { uri: ev.uri.clone(), domain: ev.domain.clone() };
        if let Some(o) = ev.outcome {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let series = seen.entry(l.clone()).or_default();
            let kind = action_kind(&ev.action).to_string();
            let outcome = serde_json::to_value(o).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            let a = ActionLabels {
                uri: l.uri.clone(),
                domain: l.domain.clone(),
                action: kind.clone(),
                outcome: outcome.clone(),
            };
            self.actions.get_or_create(&a).inc();
            series.actions.insert((kind.clone(), outcome));
            self.duration.get_or_create(&KindLabels { action: kind }).observe(ev.duration_ms as f64 / 1000.0);
            self.last_exit.get_or_create(&l).set(i64::from(o.exit_code()));
        }
    }

    /// The session budget in force.
    pub(crate) fn set_session_budget(&self, n: usize) {
        self.fleet.session_budget.set(as_i64(n as u64));
    }

    /// A kept session was closed to make room for another.
    pub(crate) fn session_evicted(&self) {
        self.fleet.evicted.inc();
    }

    /// A new session was refused: the budget was all in use.
    pub(crate) fn session_refused(&self) {
        self.fleet.refused.inc();
    }

    /// A round started, `skipped` rounds of the beat after the last one.
    pub(crate) fn round_started(&self, skipped: u64, open: usize, kept: usize) {
        self.fleet.rounds.inc();
        self.fleet.rounds_skipped.inc_by(skipped);
        self.fleet.sessions_open.set(as_i64(open as u64));
        self.fleet.sessions_kept.set(as_i64(kept as u64));
    }

    /// `n` domain samples were missed.
    pub(crate) fn missed(&self, n: u64) {
        self.fleet.missed.inc_by(n);
    }

    /// A host's listing ended `took` after its round was due; `reads` live
    /// XML reads on it since the start.
    pub(crate) fn listed(&self, uri: &str, took: Duration, reads: u64) {
        let l = UriLabels { uri: uri.into() };
        self.fleet.listing.get_or_create(&l).set(took.as_secs_f64());
        let c = self.fleet.xml_reads.get_or_create(&l);
        c.inc_by(reads.saturating_sub(c.get()));
    }

    /// A host's round ended (its last step) `took` after it was due; its last
    /// answered sample ended `answered` after.
    pub(crate) fn round_ended(&self, uri: &str, took: Duration, answered: Option<Duration>) {
        let l = UriLabels { uri: uri.into() };
        self.fleet.round.get_or_create(&l).set(took.as_secs_f64());
        if let Some(a) = answered {
            self.fleet.answered.get_or_create(&l).set(a.as_secs_f64());
        }
    }

    /// Drops every series of `uri`'s domains not in `live`.
    pub(crate) fn retain_uri(&self, uri: &str, live: &std::collections::HashSet<String>) {
        self.retain_where(|l| l.uri != uri || live.contains(&l.domain));
    }

    /// Drops every series of the domains not in `live` (stopped, undefined, or
    /// no longer selected on any host), so a scrape shows only what exists.
    pub fn retain(&self, live: &std::collections::HashSet<DomainLabels>) {
        self.retain_where(|l| live.contains(l));
    }

    fn retain_where(&self, keep: impl Fn(&DomainLabels) -> bool) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<DomainLabels> = seen.keys().filter(|l| !keep(l)).cloned().collect();
        for l in gone {
            let Some(series) = seen.remove(&l) else { continue };
            for f in [
                &self.vcpus,
                &self.vcpus_max,
                &self.memory,
                &self.max_memory,
                &self.agent_up,
                &self.guest_cpus,
                &self.guest_mem_total,
                &self.guest_mem_available,
                &self.guest_blocks_offline,
                &self.last_exit,
            ] {
                f.remove(&l);
            }
            self.sessions.remove(&l);
            for zone in series.zones {
                self.guest_blocks_online.remove(&zone_labels(&l, zone));
            }
            for (resource, kind) in [("cpu", "some"), ("memory", "some"), ("memory", "full")] {
                let p = PressureLabels {
                    uri: l.uri.clone(),
                    domain: l.domain.clone(),
                    resource: resource.into(),
                    kind: kind.into(),
                };
                self.pressure.remove(&p);
            }
            for (action, outcome) in series.actions {
                self.actions.remove(&ActionLabels { uri: l.uri.clone(), domain: l.domain.clone(), action, outcome });
            }
        }
    }
}

/// The size of the pieces a scrape is encoded and written in.
pub const CHUNK: usize = 64 * 1024;

/// What the encoder writes, line by line, in the format asked for, into
/// pieces of [`CHUNK`] bytes. OpenMetrics is the encoder's; Prometheus text
/// 0.0.4 differs in that a counter family's HELP and TYPE name its `_total`
/// series (OpenMetrics names the family without it), `unknown` is `untyped`,
/// and there are no `# UNIT` or `# EOF` lines. Series lines are the same in
/// both. Before the end, the families with no series yet still say what they
/// are (the encoder writes nothing for them).
struct ChunkWriter<'a> {
    format: Format,
    families: &'a [(String, &'static str, &'static str, &'static str)],
    sink: &'a mut dyn FnMut(String) -> bool,
    out: String,
    /// The part of a line written so far.
    line: String,
    /// A HELP line held until its family's TYPE line says whether it is a counter.
    help: Option<String>,
    /// Families whose TYPE line was written.
    typed: std::collections::HashSet<String>,
    stopped: bool,
}

impl ChunkWriter<'_> {
    fn emit(&mut self, text: &str) {
        self.out.push_str(text);
        if self.out.len() >= CHUNK && !self.stopped {
            let full = std::mem::replace(&mut self.out, String::with_capacity(CHUNK + 1024));
            if !(self.sink)(full) {
                self.stopped = true;
            }
        }
    }

    /// One whole line (without its newline).
    fn take_line(&mut self, line: &str) {
        if line == "# EOF" {
            let missing: Vec<(String, &str, &str, &str)> = self
                .families
                .iter()
                .filter(|(name, ..)| !self.typed.contains(name))
                .map(|(n, h, k, u)| (n.clone(), *h, *k, *u))
                .collect();
            for (name, help, kind, unit) in missing {
                self.take_line(&format!("# HELP {name} {help}."));
                self.take_line(&format!("# TYPE {name} {kind}"));
                if !unit.is_empty() {
                    self.take_line(&format!("# UNIT {name} {unit}"));
                }
            }
            if self.format == Format::OpenMetrics {
                self.emit("# EOF\n");
            }
            return;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(held) = self.help.replace(rest.to_string()) {
                // A HELP with no TYPE after it: as it is.
                self.meta("# HELP ", &held, false);
            }
            return;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            self.typed.insert(name.to_string());
            let counter = kind == "counter";
            if let Some(help) = self.help.take() {
                self.meta("# HELP ", &help, counter);
            }
            self.meta("# TYPE ", rest, counter);
            return;
        }
        if let Some(help) = self.help.take() {
            self.meta("# HELP ", &help, false);
        }
        if self.format == Format::Prometheus && line.starts_with("# UNIT ") {
            return;
        }
        self.emit(line);
        self.emit("\n");
    }

    /// A HELP or TYPE line (`rest`: after its prefix), its name with `_total`
    /// for a counter in Prometheus text.
    fn meta(&mut self, prefix: &str, rest: &str, counter: bool) {
        if self.format == Format::OpenMetrics {
            self.emit(prefix);
            self.emit(rest);
            self.emit("\n");
            return;
        }
        let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        let tail = if prefix == "# TYPE " && tail == "unknown" { "untyped" } else { tail };
        let suffix = if counter { "_total" } else { "" };
        self.emit(prefix);
        self.emit(name);
        self.emit(suffix);
        self.emit(" ");
        self.emit(tail);
        self.emit("\n");
    }
}

impl std::fmt::Write for ChunkWriter<'_> {
    fn write_str(&mut self, mut s: &str) -> std::fmt::Result {
        if self.stopped {
            return Err(std::fmt::Error);
        }
        while let Some(i) = s.find('\n') {
            if self.line.is_empty() {
                self.take_line(&s[..i]);
            } else {
                self.line.push_str(&s[..i]);
                let line = std::mem::take(&mut self.line);
                self.take_line(&line);
            }
            s = &s[i + 1..];
        }
        self.line.push_str(s);
        if self.stopped {
            Err(std::fmt::Error)
        } else {
            Ok(())
        }
    }
}

/// The two text expositions the endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text format 0.0.4, the default.
    Prometheus,
    /// OpenMetrics 1.0.0, for a client whose `Accept` prefers it.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of a scrape in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a weight (`q`) above 0 and no lower
    /// than any text or wildcard range's (Prometheus sends it at 1 and
    /// `text/plain` at 0.5); Prometheus text otherwise, and with no header.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else { return Format::Prometheus };
        let (mut om, mut text) = (0.0_f64, 0.0_f64);
        for range in accept.split(',') {
            let mut params = range.split(';').map(str::trim);
            let kind = params.next().unwrap_or_default().to_ascii_lowercase();
            let q = params
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            match kind.as_str() {
                "application/openmetrics-text" => om = om.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }
}

/// The value of the first header called `name` in a request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

fn zone_labels(l: &DomainLabels, zone: &str) -> ZoneLabels {
    ZoneLabels { uri: l.uri.clone(), domain: l.domain.clone(), zone: zone.into() }
}

/// The `kind` an action serialises with (`none`, `add_vcpus`, …).
fn action_kind(a: &Action) -> &'static str {
    match a {
        Action::None => "none",
        Action::AddVcpus { .. } => "add_vcpus",
        Action::AddMemory { .. } => "add_memory",
        Action::GrowVirtioMem { .. } => "grow_virtio_mem",
        Action::ShrinkVirtioMem { .. } => "shrink_virtio_mem",
    }
}

/// Most metrics connections served at once; more wait in the listen backlog.
pub const MAX_METRICS_CONNECTIONS: usize = 32;
/// How long a metrics client may take to send its request line and headers.
pub const METRICS_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause after a failed `accept` (EMFILE under a connection flood):
/// the endpoint pauses and goes on, it never ends.
pub const METRICS_ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// `metrics_listen` as a socket address: a bare port (`9477` or `:9477`) binds
/// loopback only; anything else is taken as written.
pub fn metrics_addr(listen: &str) -> Result<std::net::SocketAddr, String> {
    let port_only = listen.strip_prefix(':').unwrap_or(listen);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    listen.parse().map_err(|e| format!("'{listen}' is not PORT or ADDRESS:PORT ({e})"))
}

/// What one HTTP request head asks for: the metrics in a format, or a fixed
/// answer (status line, `Content-Type`, body).
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Metrics(Format),
    Fixed(&'static str, &'static str, &'static str),
}

/// The answer to one HTTP request head: the metrics in the format its
/// `Accept` header asks for ([`Format::negotiate`]) at `/metrics`, else an error.
pub fn route(head: &[u8]) -> Answer {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let head = String::from_utf8_lossy(head);
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.trim_end().split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    match (method, path, version) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/") => match (m, p.split('?').next()) {
            ("GET" | "HEAD", Some("/metrics")) => Answer::Metrics(Format::negotiate(header(&head, "accept"))),
            ("GET" | "HEAD", _) => Answer::Fixed("404 Not Found", PLAIN, "not found: metrics are at /metrics\n"),
            _ => Answer::Fixed("405 Method Not Allowed", PLAIN, "only GET /metrics\n"),
        },
        _ => Answer::Fixed("400 Bad Request", PLAIN, "bad request\n"),
    }
}

/// The status line, `Content-Type` and body of the answer to one HTTP request
/// head, the body whole (the endpoint streams it instead).
pub fn metrics_response(head: &[u8], metrics: &Metrics) -> (&'static str, &'static str, String) {
    match route(head) {
        Answer::Metrics(format) => ("200 OK", format.content_type(), metrics.render_as(format)),
        Answer::Fixed(status, kind, body) => (status, kind, body.into()),
    }
}

/// Serves the metrics (Prometheus text, or OpenMetrics when asked) on `addr` until the process ends: at
/// most [`MAX_METRICS_CONNECTIONS`] at once, each bounded in time and bytes,
/// accept failures backed off and never fatal.
pub async fn serve_metrics(addr: &str, engine: Arc<Engine>) -> std::io::Result<std::net::SocketAddr> {
    let addr = metrics_addr(addr).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics endpoint reachable beyond this host (unauthenticated)");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(10);
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, ?pause, "metrics accept failed; pausing");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(METRICS_ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            pause = Duration::from_millis(10);
            let engine = engine.clone();
            tokio::spawn(async move {
                answer_metrics(stream, &engine).await;
                drop(permit);
            });
        }
    });
    Ok(bound)
}

/// Reads one request head (at most 4 KiB, within [`METRICS_READ_TIMEOUT`]) and answers it.
async fn answer_metrics(mut s: tokio::net::TcpStream, engine: &Arc<Engine>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(METRICS_READ_TIMEOUT, async {
        let mut buf = [0u8; 512];
        while head.len() < 4096 && !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.ends_with(b"\n\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    match route(&head) {
        Answer::Fixed(status, kind, body) => {
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(METRICS_READ_TIMEOUT, s.write_all(resp.as_bytes())).await;
        }
        Answer::Metrics(format) => {
            // The body's end is the connection's (HTTP/1.0, no length known
            // before the last piece is encoded).
            let head =
                format!("HTTP/1.0 200 OK\r\nContent-Type: {}\r\nConnection: close\r\n\r\n", format.content_type());
            if !matches!(tokio::time::timeout(METRICS_READ_TIMEOUT, s.write_all(head.as_bytes())).await, Ok(Ok(()))) {
                return;
            }
            // Encoded on the blocking pool, piece by piece, each written as it
            // comes. The encoder never waits for the client (a slow one must
            // not hold the families' locks, which sampling takes): the pieces
            // not yet written queue, and each is freed once written.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let engine = engine.clone();
            let encoder = tokio::task::spawn_blocking(move || {
                engine.metrics.render_chunks(format, &mut |chunk| tx.send(chunk).is_ok());
            });
            while let Some(chunk) = rx.recv().await {
                match tokio::time::timeout(METRICS_READ_TIMEOUT, s.write_all(chunk.as_bytes())).await {
                    Ok(Ok(())) => {}
                    // A client that stops reading, or went: the encoder stops at
                    // its next piece.
                    _ => break,
                }
            }
            drop(rx);
            let _ = encoder.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Outcome;

    /// The render before issue #31, whole: the encoder's string, the empty
    /// families put before `# EOF`, and the Prometheus text converted from it.
    fn old_render(m: &Metrics, format: Format) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &m.registry).expect("encode");
        let mut empty = String::new();
        for (name, help, kind, unit) in &m.families {
            if !s.contains(&format!("# TYPE {name} ")) {
                empty.push_str(&format!("# HELP {name} {help}.\n# TYPE {name} {kind}\n"));
                if !unit.is_empty() {
                    empty.push_str(&format!("# UNIT {name} {unit}\n"));
                }
            }
        }
        let at = s.rfind("# EOF").unwrap_or(s.len());
        s.insert_str(at, &empty);
        if format == Format::OpenMetrics {
            return s;
        }
        let counters: std::collections::HashSet<&str> =
            s.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
        let mut out = String::new();
        for line in s.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
            match meta {
                Some((prefix, rest)) => {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    let tail = if prefix == "# TYPE " && tail == "unknown" { "untyped" } else { tail };
                    let suffix = if counters.contains(name) { "_total" } else { "" };
                    out.push_str(&format!("{prefix}{name}{suffix} {tail}\n"));
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Issue #31: a scrape of 160k series was one 19 MB string, built three
    /// times over. It is encoded in pieces of about CHUNK bytes, and what the
    /// pieces say is, byte for byte, what the whole string said, in both
    /// formats, empty, with a few domains and with thousands.
    #[test]
    fn the_chunked_render_says_what_the_whole_one_said() {
        let cap = crate::autoscale::decision::tests::cap();
        let m = Metrics::default();
        let check = |m: &Metrics, many: bool| {
            for format in [Format::Prometheus, Format::OpenMetrics] {
                let mut chunks = Vec::new();
                m.render_chunks(format, &mut |c| {
                    chunks.push(c);
                    true
                });
                let whole = old_render(m, format);
                assert_eq!(chunks.concat(), whole, "{format:?}");
                assert!(chunks.iter().all(|c| c.len() < CHUNK + 4096), "pieces stay near CHUNK bytes");
                if many {
                    assert!(chunks.len() > 8, "{} pieces for {} bytes", chunks.len(), whole.len());
                }
            }
        };
        check(&m, false);
        m.session_opened(&DomainLabels { domain: "db1".into(), uri: "qemu:///system".into() });
        m.record(&event("db1", Some(Outcome::Ok)), &cap, Some(&guest(&[("Normal", 7), ("Movable", 2)])));
        m.record(&event("we\"ird\\\n", Some(Outcome::GuestTimeout)), &cap, None);
        m.count_alerts("accepted", 2);
        m.listed("qemu:///system", Duration::from_millis(30), 12);
        m.round_ended("qemu:///system", Duration::from_millis(900), Some(Duration::from_millis(400)));
        check(&m, false);
        for i in 0..3000 {
            let d = format!("guest-{i}");
            m.session_opened(&DomainLabels { domain: d.clone(), uri: "qemu+ssh://h/system".into() });
            m.record(&event(&d, (i % 7 == 0).then_some(Outcome::Ok)), &cap, Some(&guest(&[("Normal", 7)])));
        }
        check(&m, true);
        // A sink that stops (the client went) stops the encoding.
        let mut n = 0;
        m.render_chunks(Format::Prometheus, &mut |_| {
            n += 1;
            false
        });
        assert_eq!(n, 1, "nothing encoded for a client that went");
    }

    /// Security finding 7: the endpoint answered every path; it answers /metrics only.
    #[test]
    fn the_metrics_endpoint_answers_its_path_only() {
        let m = Metrics::default();
        assert_eq!(metrics_response(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m).0, "200 OK");
        assert_eq!(metrics_response(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &m).0, "200 OK");
        assert_eq!(metrics_response(b"GET / HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(metrics_response(b"GET /metrics/../etc HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(metrics_response(b"POST /metrics HTTP/1.1\r\n\r\n", &m).0, "405 Method Not Allowed");
        assert_eq!(metrics_response(b"\x16\x03\x01garbage", &m).0, "400 Bad Request");
        assert_eq!(metrics_response(b"", &m).0, "400 Bad Request");
        assert_eq!(metrics_addr("9477").expect("port"), "127.0.0.1:9477".parse().expect("addr"));
        assert_eq!(metrics_addr(":9477").expect("port"), "127.0.0.1:9477".parse().expect("addr"));
        assert_eq!(metrics_addr("0.0.0.0:9477").expect("addr"), "0.0.0.0:9477".parse().expect("addr"));
        assert!(metrics_addr("localhost:x").is_err());
    }

    /// Issue #30: every scrape was OpenMetrics whatever the client asked.
    /// Prometheus text by default; OpenMetrics when `Accept` prefers it.
    #[test]
    fn the_format_is_what_the_client_accepts() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, want) in [
            (None, Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain;version=0.0.4"), Format::Prometheus),
            (Some(prometheus), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (Some("Application/OpenMetrics-Text; version=1.0.0"), Format::OpenMetrics),
            (Some("application/openmetrics-text;q=0"), Format::Prometheus),
            (Some("text/plain, application/openmetrics-text;q=0.5"), Format::Prometheus),
            (Some("application/json"), Format::Prometheus),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
        let m = Metrics::default();
        let (status, kind, body) = metrics_response(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m);
        assert_eq!((status, kind), ("200 OK", "text/plain; version=0.0.4; charset=utf-8"));
        assert!(!body.contains("# EOF") && body.contains("# TYPE vmplug_alerts_total counter"), "{body}");
        let ask = format!("GET /metrics HTTP/1.1\r\nAccept: {prometheus}\r\n\r\n");
        let (status, kind, body) = metrics_response(ask.as_bytes(), &m);
        assert_eq!((status, kind), ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8"));
        assert!(body.ends_with("# EOF\n") && body.contains("# TYPE vmplug_alerts counter"), "{body}");
    }

    /// Issue #30: a family had no series, and so no line at all, until its
    /// first event. Every family has its HELP and TYPE from the start, and the
    /// ones with a fixed set of label values have every series, at 0.
    #[test]
    fn every_family_is_there_before_its_first_event() {
        let text = Metrics::default().render();
        for family in [
            "vmplug_domain_vcpus",
            "vmplug_domain_memory_bytes",
            "vmplug_guest_memory_blocks_online",
            "vmplug_guest_pressure_avg10_ratio",
            "vmplug_actions_total",
            "vmplug_action_duration_seconds",
            "vmplug_alerts_total",
            "vmplug_agent_sessions_total",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}: {text}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}: {text}");
        }
        for result in ALERT_RESULTS {
            assert!(text.contains(&format!("vmplug_alerts_total{{result=\"{result}\"}} 0\n")), "{result}: {text}");
        }
        for kind in ACTION_KINDS {
            assert!(text.contains(&format!("vmplug_action_duration_seconds_count{{action=\"{kind}\"}} 0\n")), "{text}");
        }
    }

    /// Issue #30: `promtool check metrics` failed (no HELP for
    /// `vmplug_actions_total`: OpenMetrics names a counter family without its
    /// suffix). The Prometheus text passes it, empty and with series (label
    /// values that need escaping among them).
    #[test]
    fn promtool_finds_nothing_to_complain_about() {
        let m = Metrics::default();
        let empty = m.render();
        let cap = crate::autoscale::decision::tests::cap();
        let l = DomainLabels { domain: "db1".into(), uri: "qemu:///system".into() };
        m.session_opened(&l);
        m.record(&event("db1", Some(Outcome::Ok)), &cap, Some(&guest(&[("Normal", 7)])));
        m.record(&event("we\"ird\\\n", Some(Outcome::GuestTimeout)), &cap, None);
        m.count_alerts("accepted", 2);
        for text in [empty, m.render()] {
            let Some(problems) = promtool_check(&text) else { return };
            assert_eq!(problems, "", "{text}");
        }
    }

    /// What `promtool check metrics` says of `text` (empty: nothing), or
    /// `None`, with the reason printed, when promtool is not installed.
    pub(crate) fn promtool_check(text: &str) -> Option<String> {
        use std::io::Write;
        let child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: promtool not runnable ({e}); Debian's 'prometheus' package has it");
                return None;
            }
        };
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
        let out = child.wait_with_output().expect("promtool");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Some(if out.status.success() { said.trim().to_string() } else { format!("{}: {said}", out.status) })
    }

    fn event(domain: &str, outcome: Option<Outcome>) -> DecisionEvent {
        DecisionEvent {
            ts: 0,
            uri: "qemu:///system".into(),
            domain: domain.into(),
            inputs: Some(crate::autoscale::Sample {
                cpu_some: 50.0,
                mem_some: 0.0,
                mem_full: 0.0,
                available: vmplug_common::Bytes(1 << 30),
            }),
            vcpus: 2,
            memory: vmplug_common::Bytes(1 << 30),
            rule: "cpu.psi",
            reason: String::new(),
            action: Action::AddVcpus { to: 3 },
            dry_run: false,
            outcome,
            message: None,
            duration_ms: 300,
        }
    }

    /// Families by the book: HELP and TYPE each, units in the names, label values
    /// escaped, a histogram per action kind, and a domain's series gone with it.
    #[test]
    fn families_are_typed_escaped_and_dropped_with_their_domain() {
        let m = Metrics::default();
        let cap = crate::autoscale::decision::tests::cap();
        m.record(&event("db1", Some(Outcome::Ok)), &cap, None);
        m.record(&event("we\"ird\\\n", None), &cap, None);
        let text = m.render();
        for family in [
            "vmplug_domain_vcpus",
            "vmplug_guest_pressure_avg10_ratio",
            "vmplug_actions_total",
            "vmplug_action_duration_seconds",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}: {text}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}: {text}");
        }
        assert!(
            text.contains("vmplug_domain_memory_bytes{domain=\"db1\",uri=\"qemu:///system\"} 1073741824"),
            "{text}"
        );
        assert!(
            text.contains(
                "vmplug_actions_total{domain=\"db1\",uri=\"qemu:///system\",action=\"add_vcpus\",outcome=\"ok\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("vmplug_action_duration_seconds_bucket{le=\"0.4\",action=\"add_vcpus\"} 1")
                || text.contains("vmplug_action_duration_seconds_bucket{action=\"add_vcpus\",le=\"0.4\"} 1"),
            "{text}"
        );
        assert!(text.contains("vmplug_guest_pressure_avg10_ratio{domain=\"db1\",uri=\"qemu:///system\",resource=\"cpu\",kind=\"some\"} 0.5"), "{text}");
        assert!(text.contains(r#"domain="we\"ird\\\n""#), "label values escaped: {text}");
        let keep: std::collections::HashSet<DomainLabels> =
            [DomainLabels { domain: "db1".into(), uri: "qemu:///system".into() }].into();
        m.retain(&keep);
        let text = m.render();
        assert!(!text.contains("ird"), "the gone domain's series are dropped: {text}");
        assert!(text.contains("domain=\"db1\""), "{text}");
    }

    /// A guest's facts as its agent sends them, with these zones.
    fn guest(zones: &[(&str, u32)]) -> GuestInfo {
        let frame: serde_json::Value =
            serde_json::from_str(include_str!("../../../common/tests/golden/guest_info.json")).expect("golden");
        let mut body = frame["body"].clone();
        body.as_object_mut().map(|o| o.remove("type"));
        let mut info: GuestInfo = serde_json::from_value(body).expect("guest info");
        if let Some(m) = &mut info.memory {
            m.zones = zones.iter().map(|(z, n)| (z.to_string(), *n)).collect();
        }
        info
    }

    /// The series of one family a scrape shows, sorted (a family's order is
    /// its hash map's).
    fn series(text: &str, family: &str) -> Vec<String> {
        let mut lines: Vec<String> =
            text.lines().filter(|l| l.starts_with(&format!("{family}{{"))).map(str::to_string).collect();
        lines.sort();
        lines
    }

    /// Security finding 4 (issue #26): a guest that named fresh zones on every
    /// handshake added a series per name for as long as its domain ran (756k
    /// series, a 78 MB scrape, 308 MiB RSS after 60 s). Zone labels are the
    /// kernel's zones or `other`, and a zone the guest no longer reports loses
    /// its series.
    #[test]
    fn a_guest_inventing_zone_names_cannot_grow_the_series() {
        let m = Metrics::default();
        let cap = crate::autoscale::decision::tests::cap();
        for round in 0..2000 {
            let fresh: Vec<String> = (0..50).map(|i| format!("zone-{round}-{i}")).collect();
            let mut zones: Vec<(&str, u32)> = fresh.iter().map(|z| (z.as_str(), 1)).collect();
            zones.push(("Normal", 7));
            m.record(&event("db1", None), &cap, Some(&guest(&zones)));
        }
        let text = m.render();
        let online = series(&text, "vmplug_guest_memory_blocks_online");
        assert!(online.len() <= KERNEL_ZONES.len() + 1, "{} zone series for one domain", online.len());
        assert_eq!(
            online,
            [
                r#"vmplug_guest_memory_blocks_online{domain="db1",uri="qemu:///system",zone="Normal"} 7"#,
                r#"vmplug_guest_memory_blocks_online{domain="db1",uri="qemu:///system",zone="other"} 50"#,
            ],
            "made-up names are summed under 'other'"
        );
        // The daemon's own families (beat, listing, sessions) are 3 KiB of it.
        assert!(text.len() < 12 * 1024, "a scrape of one domain stays small: {} bytes", text.len());

        // Facts replaced: the zones no longer reported lose their series.
        m.record(&event("db1", None), &cap, Some(&guest(&[("Movable", 3), ("DMA32", 1)])));
        let text = m.render();
        let online = series(&text, "vmplug_guest_memory_blocks_online");
        assert_eq!(online.len(), 2, "{online:?}");
        assert!(online.iter().all(|l| l.contains("Movable") || l.contains("DMA32")), "{online:?}");
        // A guest with no memory hot-plug any more: no zone series at all.
        let mut none = guest(&[]);
        none.memory = None;
        m.record(&event("db1", None), &cap, Some(&none));
        let text = m.render();
        assert!(series(&text, "vmplug_guest_memory_blocks_online").is_empty(), "{text}");
        assert!(series(&text, "vmplug_guest_memory_blocks_offline").is_empty(), "{text}");
        for (name, label) in [("Normal", "Normal"), ("DMA", "DMA"), ("unknown", "other"), ("normal", "other")] {
            assert_eq!(zone_label(name), label);
        }
    }

    /// Security finding 4 (issue #26): every series of a domain that stops being
    /// reported (stopped, undefined, no longer selected) goes, the zone and
    /// session series with it; a domain still reported keeps its own.
    #[test]
    fn a_domain_that_goes_away_loses_every_series() {
        let m = Metrics::default();
        let cap = crate::autoscale::decision::tests::cap();
        for d in ["gone", "kept"] {
            let l = DomainLabels { domain: d.into(), uri: "qemu:///system".into() };
            m.session_opened(&l);
            m.record(&event(d, Some(Outcome::Ok)), &cap, Some(&guest(&[("Normal", 7), ("Movable", 2)])));
        }
        let kept: std::collections::HashSet<DomainLabels> =
            [DomainLabels { domain: "kept".into(), uri: "qemu:///system".into() }].into();
        let before = m.render().lines().filter(|l| l.contains("domain=\"kept\"")).count();
        m.retain(&kept);
        let text = m.render();
        let left: Vec<&str> = text.lines().filter(|l| l.contains("\"gone\"")).collect();
        assert!(left.is_empty(), "the gone domain's series: {left:?}");
        assert_eq!(text.lines().filter(|l| l.contains("domain=\"kept\"")).count(), before, "{text}");
        m.retain(&Default::default());
        let text = m.render();
        assert!(!text.contains("domain="), "no domain reported, no domain series: {text}");
    }
}
