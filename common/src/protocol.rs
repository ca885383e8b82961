//! The host ↔ guest protocol. The host is the client, the guest listens.
//!
//! Every frame is one JSON envelope `{"v":1,"id":7,"body":{"type":…}}` on one line.
//! Semantics are idempotent totals ("4 CPUs online", "these ranges online"), never
//! deltas, so a retry, a udev rule or kernel auto-online that got there first is
//! harmless. Hot-plug requests are refused until `Hello` succeeded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{BlockSize, Bytes, CpuSet};

/// The protocol version this build speaks. A peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default vsock port the guest agent listens on: privileged, so only a
/// process with `CAP_NET_BIND_SERVICE` (the agent's unit) can bind it.
pub const DEFAULT_VSOCK_PORT: u32 = 1023;

/// Default virtio-serial port name (`/dev/virtio-ports/NAME`).
pub const DEFAULT_SERIAL_NAME: &str = "org.vmplug.guest.0";

/// The host's CID: the only peer a guest accepts on AF_VSOCK.
pub const HOST_CID: u32 = 2;

/// Longest timeout a request may ask for: one hour. Bounds every guest-side wait.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// Most memory ranges one request may name (a guest has at most 256 DIMM slots).
pub const MAX_RANGES: usize = 256;

/// An envelope: protocol version, request id (absent on unsolicited events), body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message<B> {
    pub v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub body: B,
}

impl<B> Message<B> {
    pub fn new(id: Option<u64>, body: B) -> Self {
        Message { v: PROTOCOL_VERSION, id, body }
    }
}

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Handshake: answered with [`Response::GuestInfo`].
    Hello {
        protocol: u32,
        host_agent: String,
    },
    /// The guest's current facts again (after a rescan).
    Info,
    Online(OnlineRequest),
    Offline(OfflineRequest),
    Pressure,
    /// Read-only: the state, zone and node of every block in these ranges.
    Blocks {
        memory: Vec<MemRange>,
    },
    /// Read-only: the multiqueue virtio-net devices' channels and what the agent
    /// last changed in them. Sent only to agents with the `queues` capability.
    Queues,
    /// Read-only: how much memory the guest could release now, per node and per
    /// device the host names, and, when `release` is given, whether the guest
    /// agrees to give that much back. Sent only to agents with `forecast`.
    Forecast(ForecastRequest),
}

impl Request {
    /// The names of every request type, for "unknown request" errors.
    pub const TYPES: &'static [&'static str] =
        &["hello", "info", "online", "offline", "pressure", "blocks", "queues", "forecast"];

    pub fn type_name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Info => "info",
            Request::Online(_) => "online",
            Request::Offline(_) => "offline",
            Request::Pressure => "pressure",
            Request::Blocks { .. } => "blocks",
            Request::Queues => "queues",
            Request::Forecast(_) => "forecast",
        }
    }
}

/// A guest-physical memory range (one DIMM), as the live domain XML's
/// `<address type='dimm' base=…/>` and `<target><size>` give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemRange {
    pub start: u64,
    pub size: Bytes,
}

impl MemRange {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size.get())
    }
}

/// Where onlined memory blocks go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZonePolicy {
    /// Movable while the block may be movable and movable:kernel stays under the
    /// agent's bound (default 3:1), else kernel.
    #[default]
    Auto,
    Movable,
    Kernel,
    /// Let the kernel choose (`online`).
    Online,
}

impl std::str::FromStr for ZonePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ZonePolicy::Auto),
            "movable" => Ok(ZonePolicy::Movable),
            "kernel" => Ok(ZonePolicy::Kernel),
            "online" => Ok(ZonePolicy::Online),
            other => Err(format!("unknown zone policy '{other}' (auto, movable, kernel, online)")),
        }
    }
}

/// Bring the guest to at least `cpus` online CPUs and every block of `memory`
/// online, waiting up to `timeout_ms` for devices that have not appeared yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineRequest {
    /// Target total of online CPUs (not a delta).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Ranges whose blocks must all be online.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<MemRange>,
    #[serde(default)]
    pub zone: ZonePolicy,
    pub timeout_ms: u64,
    /// virtio-mem device regions: online whichever of their blocks are present
    /// (the device plugs them in its own time; absent ones are not waited for).
    /// The agent also onlines blocks that appear in them later with `zone`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtio_mem: Vec<MemRange>,
}

/// Bring the guest down to `cpus` online CPUs (highest ids first) and every block of
/// `memory` offline, so the host can unplug them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<MemRange>,
    pub timeout_ms: u64,
}

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    GuestInfo(GuestInfo),
    Report(Report),
    Pressure(Pressure),
    Blocks {
        blocks: Vec<BlockState>,
    },
    Queues(Queues),
    Forecast(Forecast),
    Error(ErrorBody),
    /// Unsolicited (no id).
    Event(Event),
}

/// The guest's facts, the answer to `Hello` and `Info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestInfo {
    pub protocol: u32,
    pub agent_version: String,
    pub capabilities: Vec<String>,
    pub kernel: String,
    pub cpus: CpuFacts,
    /// `None` when the kernel has no memory hot-plug (no `/sys/devices/system/memory`).
    pub memory: Option<MemoryFacts>,
    pub hugepage_size: Option<Bytes>,
    pub mem_total: Bytes,
    pub mem_available: Bytes,
    /// `/sys/firmware/acpi/hotplug/{memory,processor}/enabled`; `None` if absent.
    pub acpi_memory_hotplug: Option<bool>,
    pub acpi_cpu_hotplug: Option<bool>,
    /// Guest NUMA nodes online.
    pub numa_nodes: CpuSet,
    /// Guest NUMA nodes the kernel knows (`/sys/devices/system/node/possible`);
    /// `None` from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_possible: Option<CpuSet>,
    /// `memory_hotplug.memmap_on_memory`: a new block's page structures come out
    /// of the block itself, so plugging needs no free memory in proportion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memmap_on_memory: Option<bool>,
    /// A udev rule that onlines hot-plugged CPUs or memory is installed.
    pub udev_online_rule: bool,
    /// Devices bound to the kernel's virtio_mem driver; `None` when the driver is
    /// not loaded (or the agent predates the `virtio-mem` capability).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtio_mem_devices: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFacts {
    pub possible: CpuSet,
    pub present: CpuSet,
    pub online: CpuSet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryFacts {
    pub block_size: BlockSize,
    pub blocks_online: u32,
    pub blocks_offline: u32,
    /// Online blocks by zone name (`Normal`, `Movable`, `DMA32`, …).
    pub zones: BTreeMap<String, u32>,
    /// `auto_online_blocks` (`offline`, `online`, `online_movable`, …).
    pub auto_online_blocks: Option<String>,
}

/// What happened to one CPU or memory block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum ItemOutcome {
    /// The agent changed its state, and a re-read confirmed it.
    Done,
    /// Already in the wanted state: nothing written.
    Already,
    /// Not present in the guest (before the deadline).
    NotFound,
    /// The kernel refused, with the errno of the last attempt.
    Failed { errno: i32, message: String },
}

impl ItemOutcome {
    pub fn is_success(&self) -> bool {
        matches!(self, ItemOutcome::Done | ItemOutcome::Already)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// No deny_unknown_fields: serde cannot combine it with `flatten`.
pub struct CpuResult {
    pub cpu: u32,
    #[serde(flatten)]
    pub outcome: ItemOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// No deny_unknown_fields: serde cannot combine it with `flatten`.
pub struct BlockResult {
    /// `memoryN`.
    pub index: u64,
    /// Guest-physical start.
    pub start: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
    /// Zone after the operation (`Movable`, `Normal`), when online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(flatten)]
    pub outcome: ItemOutcome,
}

/// One memory block as the guest sees it (answer to `Blocks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    pub index: u64,
    pub start: u64,
    /// `false` when the block is absent from the guest.
    pub present: bool,
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
}

/// The answer to `Online` and `Offline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub cpus: Vec<CpuResult>,
    pub blocks: Vec<BlockResult>,
    pub cpus_online: CpuSet,
    /// Bytes of memory in online blocks, after the operation.
    pub memory_online: Bytes,
    /// Every target of the request was reached.
    pub complete: bool,
    /// The deadline passed before every requested device appeared.
    pub timed_out: bool,
    pub duration_ms: u64,
    /// Multiqueue virtio-net devices whose combined channels the agent changed
    /// (or failed to) to follow the CPUs since its last report, each with that
    /// change in `last`. Sent only on a connection whose host has sent `queues`
    /// (a host that predates the field refuses a report carrying it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueState>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.cpus.iter().filter(|c| !c.outcome.is_success()).count()
            + self.blocks.iter().filter(|b| !b.outcome.is_success()).count()
    }
}

/// The answer to `Queues`: every multiqueue virtio-net device's combined
/// channels, which the agent keeps at the online CPU count (bounded by the
/// device's maximum) when `queues_follow_cpus` is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queues {
    /// `queues_follow_cpus` in the guest's configuration.
    pub enabled: bool,
    pub cpus_online: u32,
    pub devices: Vec<QueueState>,
}

/// One virtio-net device with more than one queue pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// The interface name (`eth0`).
    pub device: String,
    /// The device's maximum combined channels (its queue pairs).
    pub max: u32,
    /// Combined channels now; `None` when they could not be read.
    pub combined: Option<u32>,
    /// The agent's last change (or failed attempt) on this device since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<QueueChange>,
}

/// One change of a device's combined channels: `from` → `to`, and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// No deny_unknown_fields: serde cannot combine it with `flatten`.
pub struct QueueChange {
    pub from: u32,
    pub to: u32,
    #[serde(flatten)]
    pub outcome: ItemOutcome,
}

/// What a shrink could take: the host's DIMMs and virtio-mem regions, and the
/// bytes it means to take (for the guest's veto).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForecastRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimms: Vec<MemRange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtio_mem: Vec<MemRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Bytes>,
}

/// The answer to `forecast`. A block can be released now when the kernel can
/// offline it without a fight: it is offline already, or online in
/// ZONE_MOVABLE (no unmovable allocations there) and `removable`. What is
/// released must also fit: the pages in it move to what stays, so no more
/// than `MemAvailable` can go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forecast {
    pub block_size: BlockSize,
    pub mem_available: Bytes,
    /// Per guest node: online memory, and what of it could be released now.
    pub nodes: Vec<NodeForecast>,
    /// Per device the request named, in its order.
    pub devices: Vec<DeviceForecast>,
    /// The guest refuses to release `release` bytes, and why; `None` when it
    /// agrees or was not asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veto: Option<Veto>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeForecast {
    pub node: u32,
    pub online: Bytes,
    pub releasable: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Dimm,
    VirtioMem,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceForecast {
    pub kind: DeviceKind,
    pub start: u64,
    pub size: Bytes,
    /// Bytes of the device's blocks present in the guest (online or not).
    pub present: Bytes,
    /// What could be released now: a DIMM all or nothing (every block must
    /// go), a virtio-mem region block by block.
    pub releasable: Bytes,
    /// Why not more, when something is held (`2 blocks in Normal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// A guest's refusal to shrink, with the floor it would break.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Veto {
    /// `min_available` or `memory_pressure`.
    pub floor: String,
    pub reason: String,
}

/// PSI, meminfo and load: the autoscaler's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pressure {
    pub cpu_some: Option<Psi>,
    pub memory_some: Option<Psi>,
    pub memory_full: Option<Psi>,
    pub mem_total: Bytes,
    pub mem_available: Bytes,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub cpus_online: u32,
}

/// One PSI line: `some avg10=0.00 avg60=0.00 avg300=0.00 total=0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Psi {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    pub total_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON, or not an envelope.
    Malformed,
    /// Over [`crate::frame::MAX_FRAME_BYTES`].
    FrameTooLarge,
    UnknownRequest,
    VersionMismatch,
    /// A hot-plug request before `Hello`.
    HandshakeRequired,
    /// Another request is still running on this connection.
    Busy,
    /// Memory not a whole number of blocks.
    Misaligned,
    /// A value out of bounds (timeout, too many ranges, …).
    Invalid,
    /// The guest kernel cannot do it (no memory hot-plug).
    Unsupported,
    Internal,
}

impl std::fmt::Display for ErrorCode {
    /// The wire name (`handshake_required`), as an operator reads it in messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string));
        f.write_str(name.as_deref().unwrap_or("unknown"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    AgentStarted { version: String },
    CpuAdded { cpu: u32 },
    CpuOnlined { cpu: u32 },
    MemoryAdded { block: u64 },
    MemoryOnlined { block: u64, zone: Option<String> },
    OnlineFailed { what: String, errno: i32 },
}

/// The request body of a frame, checked: version, known type, fields.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedRequest {
    pub id: Option<u64>,
    pub request: Request,
}

/// Decodes a request frame, classifying every failure into an [`ErrorBody`] that can
/// go back to the peer (with the id when one could be read).
pub fn decode_request(frame: &[u8]) -> Result<DecodedRequest, (Option<u64>, ErrorBody)> {
    let raw: serde_json::Value = serde_json::from_slice(frame)
        .map_err(|e| (None, ErrorBody { code: ErrorCode::Malformed, message: format!("not JSON: {e}") }))?;
    let id = raw.get("id").and_then(|v| v.as_u64());
    let err = |code, message: String| (id, ErrorBody { code, message });
    let env: Message<serde_json::Value> =
        serde_json::from_value(raw).map_err(|e| err(ErrorCode::Malformed, format!("not an envelope: {e}")))?;
    if env.v != PROTOCOL_VERSION {
        return Err(err(
            ErrorCode::VersionMismatch,
            format!("envelope version {} is not supported (this agent speaks {PROTOCOL_VERSION})", env.v),
        ));
    }
    let ty = env.body.get("type").and_then(|t| t.as_str()).unwrap_or("").to_string();
    if !Request::TYPES.contains(&ty.as_str()) {
        return Err(err(
            ErrorCode::UnknownRequest,
            format!("unknown request type '{ty}' (known: {})", Request::TYPES.join(", ")),
        ));
    }
    let request: Request =
        serde_json::from_value(env.body).map_err(|e| err(ErrorCode::Malformed, format!("bad '{ty}' request: {e}")))?;
    Ok(DecodedRequest { id, request })
}

/// The fuzz targets' properties (fuzz/fuzz_targets), as proptests in the regular suite.
#[cfg(test)]
mod fuzz_properties {
    use super::*;
    use crate::frame::{encode, Decoded, FrameDecoder};
    use proptest::prelude::*;

    const GOLDEN: [&str; 6] = [
        include_str!("../tests/golden/hello.json"),
        include_str!("../tests/golden/online.json"),
        include_str!("../tests/golden/guest_info.json"),
        include_str!("../tests/golden/report.json"),
        include_str!("../tests/golden/event.json"),
        include_str!("../tests/golden/error.json"),
    ];

    /// A golden frame with a few bytes overwritten: mostly near-valid JSON, which
    /// reaches the validators rather than stopping at the parser.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        (0..GOLDEN.len(), proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)).prop_map(
            |(i, edits)| {
                let mut f: Vec<u8> = GOLDEN[i].trim().bytes().filter(|&b| b != b'\n').collect();
                for (at, b) in edits {
                    let at = at.index(f.len());
                    f[at] = b;
                }
                f
            },
        )
    }

    proptest! {
        /// `guest_request`: bounded decoding independent of chunking, and every frame
        /// either a request or a specific error.
        #[test]
        fn guest_side_decoding(frames in proptest::collection::vec(mutated(), 1..4), cut in 0usize..2048) {
            let stream: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied().chain([b'\n'])).collect();
            let cut = cut.min(stream.len());
            let (mut whole, mut parts) = (FrameDecoder::new(4096), FrameDecoder::new(4096));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            whole.feed(&stream, &mut a);
            parts.feed(&stream[..cut], &mut b);
            parts.feed(&stream[cut..], &mut b);
            prop_assert_eq!(&a, &b);
            for item in a {
                if let Decoded::Frame(f) = item {
                    if let Err((_, body)) = decode_request(&f) {
                        prop_assert!(!body.message.is_empty());
                    }
                }
            }
        }

        /// `host_response`: an answer the host accepts re-encodes to the same answer.
        #[test]
        fn host_side_accepted_answers_round_trip(frame in mutated()) {
            if let Ok(env) = serde_json::from_slice::<Message<Response>>(&frame) {
                let again = encode(&env).expect("re-encodes");
                let back: Message<Response> = serde_json::from_slice(&again).expect("decodes");
                prop_assert_eq!(back, env);
            }
        }
    }
}
