//! Regression tests for the hostile probe of issue 18, each against the real `zturbo serve`
//! binary with the demo model: connection timeouts and the connection cap, keep-alive and SSE
//! streams, and the disk, cancel, lock and security findings.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

fn addr(s: &Server) -> String {
    s.url.trim_start_matches("http://").to_string()
}

/// Waits until the server closes `sock` (EOF or reset); returns how long that took, or `None`
/// if it was still open after `within`. Bytes the server sends first (a response) are skipped.
fn closed_within(sock: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(t.elapsed());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.read(&mut buf) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(t.elapsed()),
        }
    }
}

#[test]
fn silent_and_slow_connections_are_closed_and_the_cap_holds() {
    let out = temp_dir("conn-timeouts");
    let s = Server::start(
        &out,
        &["--header-timeout", "1", "--max-connections", "4"],
        &[],
    );
    let a = addr(&s);
    // Six connections that never send a byte: four fill the cap, two wait in the backlog.
    let mut silent: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(&a).unwrap()).collect();
    // Half a request head, and a head dripped one byte at a time.
    let mut partial = TcpStream::connect(&a).unwrap();
    partial
        .write_all(b"GET /api/health HTTP/1.1\r\nHost: ")
        .unwrap();
    let drip_addr = a.clone();
    let drip = std::thread::spawn(move || {
        let mut d = TcpStream::connect(&drip_addr).unwrap();
        let t = Instant::now();
        for b in b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: yes\r\n" {
            if d.write_all(&[*b]).is_err() {
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        closed_within(&mut d, Duration::from_secs(20)).unwrap_or(Duration::MAX)
    });

    // A real request queued behind all of them is still answered: the silent ones are closed
    // once their head deadline passes and the waiting connections are accepted.
    let t = Instant::now();
    let (st, health) = get_json(&s.url("/api/health"));
    assert_eq!(st, 200, "{health}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "served after {:?}",
        t.elapsed()
    );
    for (i, sock) in silent.iter_mut().enumerate() {
        let took = closed_within(sock, Duration::from_secs(15));
        assert!(took.is_some(), "silent connection {i} was never closed");
    }
    assert!(
        closed_within(&mut partial, Duration::from_secs(15)).is_some(),
        "a half-sent head kept its connection open"
    );
    let dripped = drip.join().unwrap();
    assert!(
        dripped < Duration::from_secs(6),
        "a dripped head kept its connection for {dripped:?} (deadline 1 s from connecting)"
    );
    // The server is fine afterwards.
    assert_eq!(get_json(&s.url("/api/health")).0, 200);
}

#[test]
fn idle_keep_alive_is_closed_but_streams_and_long_calls_are_not() {
    let out = temp_dir("conn-idle");
    let s = Server::start(
        &out,
        &["--header-timeout", "1", "--idle-timeout", "1"],
        &[("ZTURBO_TEST_WORKER_DELAY_MS", "700")],
    );
    let a = addr(&s);

    // One request on a kept-alive connection, then silence: closed after the idle timeout.
    let mut sock = TcpStream::connect(&a).unwrap();
    write!(sock, "GET /api/health HTTP/1.1\r\nHost: {a}\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    sock.read_exact(&mut head).unwrap();
    assert_eq!(&head[..], b"HTTP/1.1 200");
    let took = closed_within(&mut sock, Duration::from_secs(10));
    assert!(
        took.is_some_and(|t| t >= Duration::from_millis(500)),
        "idle keep-alive connection: {took:?}"
    );

    // An event stream that is being read stays open well past both timeouts.
    let t = Instant::now();
    let mut samples = 0;
    for ev in SseReader::open(&s.url("/api/memory/stream")) {
        if ev.name == "sample" {
            samples += 1;
        }
        if t.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    assert!(
        t.elapsed() > Duration::from_secs(4),
        "the stream ended early"
    );
    assert!(samples > 4, "{samples} samples");

    // A synchronous generation that takes longer than the idle timeout is answered.
    let t = Instant::now();
    let (st, _, r) = post_json(
        &s.url("/v1/images/generations"),
        &json!({"prompt": "a lake", "size": "64x64", "quality": "low", "response_format": "b64_json"}),
    );
    assert_eq!(st, 200, "{r}");
    assert!(t.elapsed() > Duration::from_secs(2), "{:?}", t.elapsed());
}
