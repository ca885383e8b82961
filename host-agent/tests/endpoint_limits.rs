//! README's limits of autoscale's two HTTP endpoints, over loopback: the
//! webhook answers a body over 256 KiB with 413 (by `Content-Length` or chunked)
//! and a request not received in time with 408, and serves 16 requests at once;
//! the metrics endpoint serves 32 connections at once and gives a client 2 s to
//! send its request. On a paused clock: time moves only while every task waits,
//! so "in time" and "at once" are the code's own, not the machine's load.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use vmplug::autoscale::metrics::{MAX_METRICS_CONNECTIONS, METRICS_READ_TIMEOUT};
use vmplug::autoscale::webhook::{serve, MAX_WEBHOOK_BODY};
use vmplug::autoscale::{serve_metrics, Engine, Policy};

/// README: "at most 16 requests at once" and a 5 s read timeout.
const WEBHOOK_AT_ONCE: usize = 16;
const WEBHOOK_READ_TIMEOUT: Duration = Duration::from_secs(5);

fn engine() -> Arc<Engine> {
    let policy = Policy::default();
    let limits = policy.limits().expect("defaults are valid");
    Arc::new(Engine::new(policy, limits, true))
}

async fn webhook() -> std::net::SocketAddr {
    serve("127.0.0.1:0", engine(), vec![]).await.expect("bind")
}

/// Sends `req` and reads the whole answer (the server closes after it).
async fn exchange(addr: std::net::SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(req).await.expect("send");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_webhook_body_over_256_kib_gets_413_by_length_or_chunked() {
    let addr = webhook().await;
    let body = vec![b' '; MAX_WEBHOOK_BODY + 1];
    let mut req = format!("POST /alerts HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(&body);
    let answer = exchange(addr, &req).await;
    assert!(answer.starts_with("HTTP/1.0 413 "), "by Content-Length: {answer:?}");

    let mut req = b"POST /alerts HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..(MAX_WEBHOOK_BODY / 4096 + 2) {
        req.extend_from_slice(b"1000\r\n");
        req.extend_from_slice(&[b' '; 4096]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = exchange(addr, &req).await;
    assert!(answer.starts_with("HTTP/1.0 413 "), "chunked: {answer:?}");

    // At the limit it is read (and judged as a payload: blanks are not JSON).
    let body = vec![b' '; MAX_WEBHOOK_BODY];
    let mut req = format!("POST /alerts HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(&body);
    let answer = exchange(addr, &req).await;
    assert!(answer.starts_with("HTTP/1.0 400 "), "at the limit: {answer:?}");
}

#[tokio::test(start_paused = true)]
async fn a_webhook_request_not_received_in_time_gets_408() {
    let addr = webhook().await;
    let started = Instant::now();
    let answer = exchange(addr, b"POST /alerts HTTP/1.1\r\nContent-Length: 10\r\n\r\n{").await;
    assert!(answer.starts_with("HTTP/1.0 408 "), "{answer:?}");
    assert_eq!(started.elapsed(), WEBHOOK_READ_TIMEOUT, "answered when the read timeout ends");
}

/// `held` silent connections, then one real request: how long it waited.
async fn wait_behind(addr: std::net::SocketAddr, held: usize, req: &[u8]) -> (Duration, String, Vec<TcpStream>) {
    let mut silent = Vec::new();
    for _ in 0..held {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Let the server take every connection it will.
    tokio::task::yield_now().await;
    let started = Instant::now();
    let answer = exchange(addr, req).await;
    (started.elapsed(), answer, silent)
}

#[tokio::test(start_paused = true)]
async fn the_webhook_serves_16_requests_at_once() {
    let req = b"GET /nothing HTTP/1.0\r\n\r\n";
    let addr = webhook().await;
    let (waited, answer, _held) = wait_behind(addr, WEBHOOK_AT_ONCE - 1, req).await;
    assert!(answer.starts_with("HTTP/1.0 404 "), "{answer:?}");
    assert_eq!(waited, Duration::ZERO, "a 16th request is served at once");

    let addr = webhook().await;
    let (waited, answer, _held) = wait_behind(addr, WEBHOOK_AT_ONCE, req).await;
    assert!(answer.starts_with("HTTP/1.0 404 "), "{answer:?}");
    assert_eq!(waited, WEBHOOK_READ_TIMEOUT, "a 17th waits until a slot frees (a silent one times out)");
}

#[tokio::test(start_paused = true)]
async fn the_metrics_endpoint_serves_32_connections_and_gives_each_2_s() {
    let req = b"GET /metrics HTTP/1.0\r\n\r\n";
    assert_eq!((MAX_METRICS_CONNECTIONS, METRICS_READ_TIMEOUT), (32, Duration::from_secs(2)), "README's figures");
    let addr = serve_metrics("127.0.0.1:0", engine()).await.expect("bind");
    let (waited, answer, _held) = wait_behind(addr, MAX_METRICS_CONNECTIONS - 1, req).await;
    assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer:?}");
    assert_eq!(waited, Duration::ZERO, "a 32nd connection is served at once");

    let addr = serve_metrics("127.0.0.1:0", engine()).await.expect("bind");
    let (waited, answer, held) = wait_behind(addr, MAX_METRICS_CONNECTIONS, req).await;
    assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer:?}");
    assert_eq!(waited, METRICS_READ_TIMEOUT, "a 33rd waits until a silent one's 2 s end");
    // The silent ones were closed, unanswered, when their 2 s ended.
    for mut s in held {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "a silent client gets no answer: {rest:?}");
    }
}
