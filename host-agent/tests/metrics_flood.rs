//! Security finding 7: the metrics endpoint ended for good after a flood. When
//! the process runs out of descriptors, `accept` fails (EMFILE) and the old loop
//! (`while let Ok(..) = accept()`) returned. Now it pauses and goes on: the
//! connection that waited through the failure is answered once descriptors free.
//!
//! Alone in its own test binary: it lowers this process's descriptor limit.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use vmplug::autoscale::{serve_metrics, Engine, Policy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_failures_do_not_end_the_endpoint() {
    let policy = Policy::default();
    let limits = policy.limits().expect("defaults are valid");
    let engine = Arc::new(Engine::new(policy, limits, true));
    let addr = serve_metrics("127.0.0.1:0", engine).await.expect("bind");

    // Use up every descriptor but one: the client's socket takes it, so the
    // server's accept of that very connection fails with EMFILE.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let mut low = lim;
    low.rlim_cur = 256.min(lim.rlim_max);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    let mut hog = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hog.push(f);
    }
    hog.pop();
    let client = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).expect("connect with the last descriptor");
        c.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("send");
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        answer
    });
    // Let accept fail a few times, then give the descriptors back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(hog);
    let answer = tokio::task::spawn_blocking(move || client.join().expect("client thread")).await.expect("join");
    assert!(answer.starts_with("HTTP/1.0 200 OK"), "answered after the accept failures: {answer:?}");
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}
