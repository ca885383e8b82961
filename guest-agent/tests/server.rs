//! Both ends in one process: a host-side client built from `common` talks to the
//! guest server over an in-memory stream, against a simulated kernel.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use vmplug_common::frame::{write_frame, Decoded, FrameReader, MAX_FRAME_BYTES};
use vmplug_common::protocol::*;
use vmplug_common::{Bytes, MIB};
use vmplug_guest::agent::Agent;
use vmplug_guest::online::{OnlinePolicy, Onliner};
use vmplug_guest::server::{serve_connection, SessionLimits};
use vmplug_guest::testing::FakeKernel;

struct Link {
    reader: FrameReader<tokio::io::ReadHalf<DuplexStream>>,
    writer: tokio::io::WriteHalf<DuplexStream>,
    next_id: u64,
    _stop: watch::Sender<bool>,
}

impl Link {
    async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    async fn send(&mut self, req: Request) -> u64 {
        self.next_id += 1;
        write_frame(&mut self.writer, &Message::new(Some(self.next_id), req)).await.expect("send");
        self.next_id
    }

    /// The next response, skipping unsolicited events.
    async fn recv(&mut self) -> Message<Response> {
        loop {
            let item = tokio::time::timeout(Duration::from_secs(10), self.reader.next())
                .await
                .expect("agent answered within 10 s")
                .expect("frame");
            let Decoded::Frame(f) = item else { panic!("oversized frame from agent") };
            let env: Message<Response> = serde_json::from_slice(&f).expect("valid response");
            if !matches!(env.body, Response::Event(_)) {
                return env;
            }
        }
    }

    async fn call(&mut self, req: Request) -> Response {
        let id = self.send(req).await;
        let env = self.recv().await;
        assert_eq!(env.id, Some(id), "response carries the request id");
        env.body
    }

    async fn hello(&mut self) -> GuestInfo {
        match self.call(Request::Hello { protocol: PROTOCOL_VERSION, host_agent: "test".into() }).await {
            Response::GuestInfo(i) => i,
            other => panic!("expected guest info, got {other:?}"),
        }
    }
}

fn start(possible: u32) -> (tempfile::TempDir, FakeKernel, Arc<Agent>, Link) {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = FakeKernel::new(dir.path(), possible);
    let policy = OnlinePolicy { retry_pause: Duration::from_millis(1), ..OnlinePolicy::default() };
    let agent = Agent::new(Onliner::new(kernel.sysfs(), policy, kernel.writer()), ZonePolicy::Auto, false);
    let (host, guest) = tokio::io::duplex(1 << 20);
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(serve_connection(agent.clone(), guest, Vec::new(), stop, SessionLimits::VSOCK));
    let (r, w) = tokio::io::split(host);
    (dir, kernel, agent, Link { reader: FrameReader::new(r), writer: w, next_id: 0, _stop: stop_tx })
}

fn error_code(r: &Response) -> ErrorCode {
    match r {
        Response::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn handshake_reports_the_guest_facts() {
    let (_d, k, _a, mut link) = start(4);
    k.add_cpu(1, true);
    k.add_block(0, true, "Normal", 0);
    let info = link.hello().await;
    assert_eq!(info.protocol, PROTOCOL_VERSION);
    assert_eq!(info.cpus.online.to_string(), "0-1");
    assert_eq!(info.cpus.possible.to_string(), "0-3");
    let mem = info.memory.expect("memory hot-plug present");
    assert_eq!(mem.block_size.get(), 128 * MIB);
    assert_eq!(mem.blocks_online, 1);
    assert_eq!(info.hugepage_size, Some(Bytes(2 * MIB)));
    assert_eq!(info.acpi_memory_hotplug, Some(true));
}

#[tokio::test(start_paused = true)]
async fn online_waits_for_devices_that_appear_after_the_request() {
    let (_d, k, agent, mut link) = start(4);
    link.hello().await;
    let id = link
        .send(Request::Online(OnlineRequest {
            cpus: Some(3),
            memory: vec![MemRange { start: 32 * 128 * MIB, size: Bytes(256 * MIB) }],
            zone: ZonePolicy::Auto,
            timeout_ms: 10_000,
            virtio_mem: vec![],
        }))
        .await;
    // On a paused clock this returns only once the agent waits: the request is in
    // flight before the devices appear.
    tokio::time::sleep(Duration::from_millis(100)).await;
    k.add_cpu(1, false);
    k.add_cpu(2, false);
    k.add_block(32, false, "Normal Movable", 0);
    k.add_block(33, false, "Normal Movable", 0);
    agent.notify_changed(); // what a uevent does
    let env = link.recv().await;
    assert_eq!(env.id, Some(id));
    let Response::Report(r) = env.body else { panic!("expected report, got {:?}", env.body) };
    assert!(r.complete && !r.timed_out, "{r:?}");
    assert_eq!(r.cpus_online.to_string(), "0-2");
    assert_eq!(r.blocks.iter().map(|b| b.index).collect::<Vec<_>>(), vec![32, 33]);
    assert!(r.blocks.iter().all(|b| b.outcome == ItemOutcome::Done && b.node == Some(0)));
    assert_eq!(r.memory_online, Bytes(256 * MIB));
}

#[tokio::test(start_paused = true)]
async fn online_times_out_with_an_explicit_report() {
    let (_d, _k, _a, mut link) = start(4);
    link.hello().await;
    let r = link
        .call(Request::Online(OnlineRequest {
            cpus: Some(2),
            memory: vec![],
            zone: ZonePolicy::Auto,
            timeout_ms: 300,
            virtio_mem: vec![],
        }))
        .await;
    let Response::Report(r) = r else { panic!("expected report, got {r:?}") };
    assert!(r.timed_out && !r.complete);
    assert_eq!(r.cpus.last().map(|c| (c.cpu, c.outcome.clone())), Some((1, ItemOutcome::NotFound)));
}

#[tokio::test(start_paused = true)]
async fn misaligned_memory_is_refused_naming_both_sizes() {
    let (_d, _k, _a, mut link) = start(2);
    link.hello().await;
    let r = link
        .call(Request::Online(OnlineRequest {
            cpus: None,
            memory: vec![MemRange { start: 4 << 30, size: Bytes(100 * MIB) }],
            zone: ZonePolicy::Auto,
            timeout_ms: 1000,
            virtio_mem: vec![],
        }))
        .await;
    assert_eq!(error_code(&r), ErrorCode::Misaligned);
    let Response::Error(e) = r else { unreachable!() };
    assert!(e.message.contains("100 MiB") && e.message.contains("128 MiB"), "{}", e.message);
}

#[tokio::test(start_paused = true)]
async fn hot_plug_before_hello_is_refused() {
    let (_d, _k, _a, mut link) = start(2);
    let r = link
        .call(Request::Online(OnlineRequest {
            cpus: Some(1),
            memory: vec![],
            zone: ZonePolicy::Auto,
            timeout_ms: 100,
            virtio_mem: vec![],
        }))
        .await;
    assert_eq!(error_code(&r), ErrorCode::HandshakeRequired);
    let r = link.call(Request::Hello { protocol: 99, host_agent: "future".into() }).await;
    assert_eq!(error_code(&r), ErrorCode::VersionMismatch);
}

#[tokio::test(start_paused = true)]
async fn bad_frames_get_specific_errors_and_the_connection_survives() {
    let (_d, _k, _a, mut link) = start(2);
    link.send_raw(b"{not json\n").await;
    assert_eq!(error_code(&link.recv().await.body), ErrorCode::Malformed);
    link.send_raw(b"{\"v\":1,\"id\":5,\"body\":{\"type\":\"reboot\"}}\n").await;
    let env = link.recv().await;
    assert_eq!((env.id, error_code(&env.body)), (Some(5), ErrorCode::UnknownRequest));
    link.send_raw(b"{\"v\":7,\"id\":6,\"body\":{\"type\":\"info\"}}\n").await;
    assert_eq!(error_code(&link.recv().await.body), ErrorCode::VersionMismatch);
    let mut big = vec![b'x'; MAX_FRAME_BYTES + 10];
    big.push(b'\n');
    link.send_raw(&big).await;
    assert_eq!(error_code(&link.recv().await.body), ErrorCode::FrameTooLarge);
    let r = link
        .call(Request::Online(OnlineRequest {
            cpus: Some(1),
            memory: vec![],
            zone: ZonePolicy::Auto,
            timeout_ms: 0,
            virtio_mem: vec![],
        }))
        .await;
    assert_eq!(error_code(&r), ErrorCode::HandshakeRequired);
    // Still serving.
    link.hello().await;
}

#[tokio::test(start_paused = true)]
async fn a_second_request_while_one_runs_is_busy() {
    let (_d, _k, _a, mut link) = start(4);
    link.hello().await;
    let first = link
        .send(Request::Online(OnlineRequest {
            cpus: Some(3),
            memory: vec![],
            zone: ZonePolicy::Auto,
            timeout_ms: 500,
            virtio_mem: vec![],
        }))
        .await;
    let second = link.send(Request::Pressure).await;
    let a = link.recv().await;
    assert_eq!((a.id, error_code(&a.body)), (Some(second), ErrorCode::Busy));
    let b = link.recv().await;
    assert_eq!(b.id, Some(first));
    assert!(matches!(b.body, Response::Report(ref r) if r.timed_out));
}

#[tokio::test(start_paused = true)]
async fn bounds_on_timeouts_and_ranges() {
    let (_d, _k, _a, mut link) = start(2);
    link.hello().await;
    let r = link
        .call(Request::Online(OnlineRequest {
            cpus: Some(1),
            memory: vec![],
            zone: ZonePolicy::Auto,
            timeout_ms: MAX_TIMEOUT_MS + 1,
            virtio_mem: vec![],
        }))
        .await;
    assert_eq!(error_code(&r), ErrorCode::Invalid);
    let ranges = vec![MemRange { start: 0, size: Bytes(128 * MIB) }; MAX_RANGES + 1];
    let r = link.call(Request::Offline(OfflineRequest { cpus: None, memory: ranges, timeout_ms: 100 })).await;
    assert_eq!(error_code(&r), ErrorCode::Invalid);
}

#[tokio::test(start_paused = true)]
async fn pressure_reads_psi_meminfo_and_load() {
    let (_d, _k, _a, mut link) = start(2);
    link.hello().await;
    let Response::Pressure(p) = link.call(Request::Pressure).await else { panic!("expected pressure") };
    assert_eq!(p.cpu_some.map(|s| s.avg10), Some(1.5));
    assert_eq!(p.mem_available, Bytes(900_000 * 1024));
    assert_eq!(p.load1, 0.5);
    assert_eq!(p.cpus_online, 1);
}

#[tokio::test(start_paused = true)]
async fn events_flow_after_hello() {
    let (_d, k, agent, mut link) = start(4);
    link.hello().await;
    k.add_cpu(1, false);
    agent.emit(Event::CpuAdded { cpu: 1 });
    let item = tokio::time::timeout(Duration::from_secs(5), link.reader.next()).await.expect("event").expect("frame");
    let Decoded::Frame(f) = item else { panic!("oversized") };
    let env: Message<Response> = serde_json::from_slice(&f).expect("json");
    assert_eq!(env.id, None);
    assert_eq!(env.body, Response::Event(Event::CpuAdded { cpu: 1 }));
}

/// Security finding 6: connections to the agent never timed out. A session that
/// does not say hello is closed after `HELLO_DEADLINE`; one that says nothing
/// more after `IDLE_TIMEOUT`; one in use stays. (Tokio's paused clock: the
/// times are exact and the test takes no real time.)
#[tokio::test(start_paused = true)]
async fn silent_sessions_are_closed_and_busy_ones_kept() {
    use vmplug_guest::server::{HELLO_DEADLINE, IDLE_TIMEOUT};
    let (_d, _k, _a, mut link) = start(2);
    let t0 = tokio::time::Instant::now();
    assert!(matches!(link.reader.next().await, Err(vmplug_common::frame::FrameError::Closed)));
    assert_eq!(t0.elapsed(), HELLO_DEADLINE, "closed exactly at the hello deadline");

    let (_d, _k, _a, mut link) = start(2);
    link.hello().await;
    tokio::time::sleep(IDLE_TIMEOUT - Duration::from_secs(1)).await;
    assert!(matches!(link.call(Request::Info).await, Response::GuestInfo(_)), "still served before the timeout");
    let t1 = tokio::time::Instant::now();
    loop {
        match link.reader.next().await {
            Ok(_) => continue, // events
            Err(e) => {
                assert!(matches!(e, vmplug_common::frame::FrameError::Closed), "{e}");
                break;
            }
        }
    }
    assert_eq!(t1.elapsed(), IDLE_TIMEOUT, "closed one idle timeout after the last request");
}

/// A virtio-mem region: the blocks the device plugged are onlined in the asked
/// zone, the rest of the region is neither waited for nor reported, and blocks
/// it plugs later are onlined in that zone by the uevent path.
#[tokio::test(start_paused = true)]
async fn virtio_mem_regions_online_what_is_present_and_remember_the_zone() {
    use vmplug_guest::uevent::{parse, Action};
    let dir = tempfile::tempdir().expect("tempdir");
    let k = FakeKernel::new(dir.path(), 2);
    let policy = OnlinePolicy { retry_pause: Duration::from_millis(1), ..OnlinePolicy::default() };
    let agent = Agent::new(Onliner::new(k.sysfs(), policy, k.writer()), ZonePolicy::Kernel, true);
    let region = MemRange { start: 48 * 128 * MIB, size: Bytes(16 * 128 * MIB) };
    k.add_block(48, false, "Normal Movable", 1);
    k.add_block(49, false, "Normal Movable", 1);
    let req = OnlineRequest {
        cpus: None,
        memory: vec![],
        zone: ZonePolicy::Movable,
        timeout_ms: 5_000,
        virtio_mem: vec![region],
    };
    // A paused clock: it moves only while every task waits, so the time below is
    // the agent's own waiting, whatever the machine's load.
    let started = tokio::time::Instant::now();
    let r = agent.online(req).await.expect("report");
    assert!(started.elapsed() < Duration::from_secs(1), "absent blocks of the region are not waited for");
    assert!(r.complete && !r.timed_out, "{r:?}");
    assert_eq!(r.blocks.iter().map(|b| b.index).collect::<Vec<_>>(), vec![48, 49]);
    assert!(r.blocks.iter().all(|b| b.outcome == ItemOutcome::Done), "{r:?}");
    assert!(k.writes().iter().all(|(_, v)| v == "online_movable"), "{:?}", k.writes());
    // The device plugs another block: the uevent path uses the host's zone, not
    // the configured `kernel`.
    k.add_block(50, false, "Normal Movable", 1);
    let ev = parse(b"add@/devices/system/memory/memory50\0ACTION=add\0DEVPATH=/devices/system/memory/memory50\0SUBSYSTEM=memory\0SEQNUM=1\0")
        .expect("uevent");
    assert_eq!(ev.action, Action::Add);
    agent.on_uevent(&ev).await;
    let last = k.writes().last().cloned().expect("a write");
    assert!(last.0.ends_with("memory50/state") && last.1 == "online_movable", "{last:?}");
    // A block outside every region still follows the configuration.
    k.add_block(8, false, "Normal Movable", 0);
    let ev = parse(b"add@/devices/system/memory/memory8\0ACTION=add\0DEVPATH=/devices/system/memory/memory8\0SUBSYSTEM=memory\0SEQNUM=2\0")
        .expect("uevent");
    agent.on_uevent(&ev).await;
    let last = k.writes().last().cloned().expect("a write");
    assert!(last.0.ends_with("memory8/state") && last.1 == "online_kernel", "{last:?}");
}

/// Queues follow CPUs: an online request to 4 CPUs sets a 4-queue-pair virtio-net
/// device from 2 to 4 combined channels, an offline to 1 back to 1; `queues`
/// reports the device and the agent's last change, and once the host has sent it,
/// reports carry the changes; a disabled agent reports and changes nothing.
#[tokio::test(start_paused = true)]
async fn queues_follow_the_online_cpus() {
    for follow in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = FakeKernel::new(dir.path(), 4);
        k.add_cpu(1, true);
        k.add_netdev("eth0", "virtio_net", 4, 2);
        let policy = OnlinePolicy { retry_pause: Duration::from_millis(1), ..OnlinePolicy::default() };
        let agent = Agent::with_channels(
            Onliner::new(k.sysfs(), policy, k.writer()),
            ZonePolicy::Auto,
            false,
            Arc::new(k.channels()),
            follow,
        );
        let (host, guest) = tokio::io::duplex(1 << 20);
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(serve_connection(agent.clone(), guest, Vec::new(), stop, SessionLimits::VSOCK));
        let (r, w) = tokio::io::split(host);
        let mut link = Link { reader: FrameReader::new(r), writer: w, next_id: 0, _stop: _stop_tx };
        let info = link.hello().await;
        assert!(info.capabilities.iter().any(|c| c == "queues"));
        k.add_cpu(2, false);
        k.add_cpu(3, false);
        let online = OnlineRequest {
            cpus: Some(4),
            memory: vec![],
            zone: ZonePolicy::Auto,
            timeout_ms: 1000,
            virtio_mem: vec![],
        };
        let Response::Report(r) = link.call(Request::Online(online)).await else { panic!("expected a report") };
        assert!(r.complete && r.queues.is_empty(), "a host that never sent `queues` never gets the field: {r:?}");
        let Response::Queues(q) = link.call(Request::Queues).await else { panic!("expected queues") };
        assert_eq!((q.enabled, q.cpus_online), (follow, 4));
        assert_eq!(q.devices.len(), 1);
        let d = &q.devices[0];
        assert_eq!((d.device.as_str(), d.max), ("eth0", 4));
        if !follow {
            assert_eq!((d.combined, &d.last), (Some(2), &None), "disabled: untouched");
            assert!(k.channels().sets().is_empty());
            continue;
        }
        assert_eq!(d.combined, Some(4));
        assert_eq!(d.last, Some(QueueChange { from: 2, to: 4, outcome: ItemOutcome::Done }));
        let off = OfflineRequest { cpus: Some(1), memory: vec![], timeout_ms: 1000 };
        let Response::Report(r) = link.call(Request::Offline(off)).await else { panic!("expected a report") };
        assert!(r.complete, "{r:?}");
        let change = QueueChange { from: 4, to: 1, outcome: ItemOutcome::Done };
        assert_eq!(r.queues.len(), 1, "after `queues` the report lists the change: {r:?}");
        assert_eq!(
            (r.queues[0].device.as_str(), r.queues[0].combined, &r.queues[0].last),
            ("eth0", Some(1), &Some(change))
        );
        let Response::Queues(q) = link.call(Request::Queues).await else { panic!("expected queues") };
        assert_eq!(q.devices[0].combined, Some(1));
        assert_eq!(q.devices[0].last, Some(QueueChange { from: 4, to: 1, outcome: ItemOutcome::Done }));
        assert_eq!(k.channels().combined("eth0"), 1);
    }
}
