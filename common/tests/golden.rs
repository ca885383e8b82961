//! Golden serialized frames: any change to the wire format shows up as a diff of the
//! files under `tests/golden/`. Regenerate deliberately with `VMPLUG_BLESS=1`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use vmplug_common::frame::encode;
use vmplug_common::protocol::*;
use vmplug_common::{BlockSize, Bytes, CpuSet, MIB};

fn check<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(name: &str, msg: &T) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    let frame = encode(msg).expect("encodes");
    if std::env::var_os("VMPLUG_BLESS").is_some() {
        std::fs::write(&path, &frame).expect("write golden");
    }
    let golden =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run with VMPLUG_BLESS=1 to create)", path.display()));
    assert_eq!(String::from_utf8_lossy(&frame), String::from_utf8_lossy(&golden), "wire format of {name} changed");
    let back: T = serde_json::from_slice(&golden).expect("golden decodes");
    assert_eq!(&back, msg);
}

fn cpus(s: &str) -> CpuSet {
    s.parse().expect("cpulist")
}

#[test]
fn hello() {
    check("hello.json", &Message::new(Some(1), Request::Hello { protocol: 1, host_agent: "vmplug 0.1.0".into() }));
}

#[test]
fn online_request() {
    check(
        "online.json",
        &Message::new(
            Some(2),
            Request::Online(OnlineRequest {
                cpus: Some(4),
                memory: vec![MemRange { start: 0x1_0000_0000, size: Bytes(1024 * MIB) }],
                zone: ZonePolicy::Auto,
                timeout_ms: 30_000,
                virtio_mem: vec![],
            }),
        ),
    );
}

#[test]
fn guest_info() {
    check(
        "guest_info.json",
        &Message::new(
            Some(1),
            Response::GuestInfo(GuestInfo {
                protocol: 1,
                agent_version: "0.1.0".into(),
                capabilities: vec!["online".into(), "offline".into(), "pressure".into()],
                kernel: "6.1.0-56-amd64".into(),
                cpus: CpuFacts { possible: cpus("0-3"), present: cpus("0-1"), online: cpus("0-1") },
                memory: Some(MemoryFacts {
                    block_size: BlockSize::new(128 * MIB).expect("pow2"),
                    blocks_online: 8,
                    blocks_offline: 0,
                    zones: BTreeMap::from([("Normal".to_string(), 7), ("DMA".to_string(), 1)]),
                    auto_online_blocks: Some("offline".into()),
                }),
                hugepage_size: Some(Bytes(2 * MIB)),
                mem_total: Bytes(1000 * MIB),
                mem_available: Bytes(900 * MIB),
                acpi_memory_hotplug: Some(true),
                acpi_cpu_hotplug: Some(true),
                numa_nodes: cpus("0-1"),
                numa_possible: None,
                memmap_on_memory: None,
                udev_online_rule: false,
                virtio_mem_devices: None,
            }),
        ),
    );
}

#[test]
fn report() {
    check(
        "report.json",
        &Message::new(
            Some(2),
            Response::Report(Report {
                cpus: vec![
                    CpuResult { cpu: 1, outcome: ItemOutcome::Already },
                    CpuResult { cpu: 2, outcome: ItemOutcome::Done },
                    CpuResult { cpu: 3, outcome: ItemOutcome::Failed { errno: 16, message: "EBUSY".into() } },
                ],
                blocks: vec![BlockResult {
                    index: 32,
                    start: 0x1_0000_0000,
                    node: Some(0),
                    zone: Some("Movable".into()),
                    outcome: ItemOutcome::Done,
                }],
                cpus_online: cpus("0-2"),
                memory_online: Bytes(1152 * MIB),
                complete: false,
                timed_out: false,
                duration_ms: 412,
                queues: vec![],
            }),
        ),
    );
}

/// Queues follow CPUs: the answer to `queues`, and a report carrying a change
/// (only ever sent to a host that asked for `queues` on its connection).
#[test]
fn queues() {
    let eth0 = QueueState {
        device: "eth0".into(),
        max: 4,
        combined: Some(4),
        last: Some(QueueChange { from: 2, to: 4, outcome: ItemOutcome::Done }),
    };
    check(
        "queues.json",
        &Message::new(Some(3), Response::Queues(Queues { enabled: true, cpus_online: 4, devices: vec![eth0.clone()] })),
    );
    check(
        "report_queues.json",
        &Message::new(
            Some(4),
            Response::Report(Report {
                cpus: vec![CpuResult { cpu: 3, outcome: ItemOutcome::Done }],
                blocks: vec![],
                cpus_online: cpus("0-3"),
                memory_online: Bytes(0),
                complete: true,
                timed_out: false,
                duration_ms: 40,
                queues: vec![eth0],
            }),
        ),
    );
}

#[test]
fn error_and_event() {
    check(
        "error.json",
        &Message::new(
            Some(9),
            Response::Error(ErrorBody {
                code: ErrorCode::Misaligned,
                message: "memory range size 100 MiB is not a multiple of the block size 128 MiB".into(),
            }),
        ),
    );
    check(
        "event.json",
        &Message::new(None, Response::Event(Event::MemoryOnlined { block: 33, zone: Some("Movable".into()) })),
    );
}

#[test]
fn decode_request_classifies_bad_input() {
    let code = |frame: &str| decode_request(frame.as_bytes()).map(|_| ()).map_err(|(_, e)| e.code);
    assert_eq!(code("{"), Err(ErrorCode::Malformed));
    assert_eq!(code("[1]"), Err(ErrorCode::Malformed));
    assert_eq!(code(r#"{"v":2,"id":1,"body":{"type":"info"}}"#), Err(ErrorCode::VersionMismatch));
    assert_eq!(code(r#"{"v":1,"id":1,"body":{"type":"reboot"}}"#), Err(ErrorCode::UnknownRequest));
    assert_eq!(code(r#"{"v":1,"id":1,"body":{"type":"online"}}"#), Err(ErrorCode::Malformed));
    assert_eq!(code(r#"{"v":1,"id":1,"body":{"type":"info"}}"#), Ok(()));
    let (id, _) = decode_request(br#"{"v":1,"id":77,"body":{"type":"nope"}}"#).expect_err("unknown");
    assert_eq!(id, Some(77), "the id of a bad request is echoed back");
}

/// A shrink forecast with the guest's veto on the release asked about.
#[test]
fn forecast() {
    let range = MemRange { start: 0x1_0000_0000, size: Bytes(1024 * MIB) };
    check(
        "forecast_request.json",
        &Message::new(
            Some(5),
            Request::Forecast(ForecastRequest {
                dimms: vec![],
                virtio_mem: vec![range],
                release: Some(Bytes(512 * MIB)),
            }),
        ),
    );
    check(
        "forecast.json",
        &Message::new(
            Some(5),
            Response::Forecast(Forecast {
                block_size: BlockSize::new(128 * MIB).expect("block size"),
                mem_available: Bytes(600 * MIB),
                nodes: vec![NodeForecast { node: 0, online: Bytes(1536 * MIB), releasable: Bytes(768 * MIB) }],
                devices: vec![DeviceForecast {
                    kind: DeviceKind::VirtioMem,
                    start: range.start,
                    size: range.size,
                    present: Bytes(1024 * MIB),
                    releasable: Bytes(768 * MIB),
                    held: Some("2 block(s) online in Normal".into()),
                }],
                veto: Some(Veto {
                    floor: "min_available".into(),
                    reason: "releasing 512 MiB would leave MemAvailable at 88 MiB".into(),
                }),
            }),
        ),
    );
}
