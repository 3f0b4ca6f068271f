//! Regression tests for the hostile probe of issue 18, each against the real `zturbo serve`
//! binary with the demo model: connection timeouts and the connection cap, keep-alive and SSE
//! streams, and the disk, cancel, lock and security findings.

mod common;
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

// ---------------------------------------------------------------------------------------------
// The outputs folder: one server, no stale temporaries, disk errors that say so.

#[test]
fn a_second_server_on_the_same_outputs_is_refused_with_the_holders_pid() {
    let out = temp_dir("outputs-lock");
    // A temporary left by a write that was killed half-way.
    let stale = out.join(".0123456789abcdef-1.png.4242.tmp");
    std::fs::write(&stale, b"half a PNG").unwrap();
    let first = Server::start(&out, &[], &[]);
    assert!(
        !stale.exists(),
        "the stale temporary was not removed at start"
    );
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args(["serve", "--model", "demo", "--port", "0", "--outputs"])
        .arg(&out)
        .env_remove("ZTURBO_API_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(!String::from_utf8_lossy(&run.stdout).contains("listening"));
    assert!(
        stderr.contains(&format!("(pid {})", first.pid())) && stderr.contains("--outputs"),
        "{stderr}"
    );
    // The first one is untouched, and the folder is free again once it is gone.
    assert_eq!(get_json(&first.url("/api/health")).0, 200);
    first.kill9();
    let second = Server::start(&out, &[], &[]);
    assert_eq!(get_json(&second.url("/api/health")).0, 200);
}

#[test]
fn an_unwritable_outputs_folder_is_reported_and_refuses_jobs_clearly() {
    let out = temp_dir("outputs-unwritable");
    // The journal's folder cannot be created: every job's first write would fail.
    std::fs::write(out.join(".jobs"), b"not a folder").unwrap();
    let s = Server::start(&out, &[], &[]);
    let (st, health) = get_json(&s.url("/api/health"));
    assert_eq!(st, 200);
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["reason"]
            .as_str()
            .unwrap()
            .contains("cannot be written"),
        "{health}"
    );
    let body = json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 1});
    let (st, _, e) = post_json(&s.url("/api/jobs"), &body);
    assert_eq!(st, 503, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("outputs folder") && msg.contains("journal"),
        "{msg}"
    );
    let (st, _, e) = post_json(
        &s.url("/v1/images/generations"),
        &json!({"prompt": "a lake", "size": "64x64"}),
    );
    assert_eq!(st, 503, "{e}");
    assert_eq!(e["error"]["code"], "service_unavailable");
    let (st, _, e) = post_json(&s.url("/sdapi/v1/txt2img"), &json!({"prompt": "a lake"}));
    assert_eq!(st, 503, "{e}");
    assert!(e["detail"].as_str().unwrap().contains("journal"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Cancels that win, and synchronous calls that end.

#[test]
fn a_one_step_job_is_cancelled_while_its_only_step_runs() {
    let out = temp_dir("cancel-one-step");
    let s = Server::start(&out, &[], &[("ZTURBO_TEST_WORKER_DELAY_MS", "3000")]);
    let id = submit(
        &s,
        json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 1}),
    );
    let mut events = SseReader::open(&s.url(&format!("/api/jobs/{id}/events")));
    assert!(
        events.by_ref().any(|e| e.name == "progress"),
        "the step never ran"
    );
    // Its one step has run (the worker holds it there): the cancel must still win.
    let (st, body) = delete(&s.url(&format!("/api/jobs/{id}")));
    assert_eq!(st, 202, "{body}");
    let rest: Vec<String> = events.map(|e| e.name).collect();
    assert_eq!(
        rest.last().map(String::as_str),
        Some("cancelled"),
        "{rest:?}"
    );
    let job = wait_terminal(&s, &id, Duration::from_secs(20));
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["images"], json!([]));
    assert!(!out.join(format!("{id}-1.png")).exists());
}

#[test]
fn openai_calls_answer_409_when_cancelled_and_504_past_the_wait_limit() {
    let out = temp_dir("sync-limits");
    let s = Server::start(
        &out,
        &["--sync-timeout", "2"],
        &[("ZTURBO_TEST_WORKER_DELAY_MS", "400")],
    );
    // Another client cancels the job a synchronous call waits for.
    let url = s.url("/v1/images/generations");
    let call = std::thread::spawn(move || {
        let res = client()
            .post(url)
            .json(&json!({"prompt": "a lake", "size": "64x64", "quality": "max"}))
            .send()
            .unwrap();
        let retry = res
            .headers()
            .get("x-should-retry")
            .map(|v| v.to_str().unwrap().to_string());
        (
            res.status().as_u16(),
            retry,
            res.json::<serde_json::Value>().unwrap(),
        )
    });
    let id = loop {
        let (_, list) = get_json(&s.url("/api/jobs"));
        if let Some(j) = list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["state"] == "running")
        {
            break j["id"].as_str().unwrap().to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(delete(&s.url(&format!("/api/jobs/{id}"))).0, 202);
    let (st, retry, e) = call.join().unwrap();
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "job_cancelled", "{e}");
    assert_eq!(retry.as_deref(), Some("false"));

    // A job that holds the worker longer than --sync-timeout: a synchronous call behind it gets
    // 504 after 2 s, and its job (never started) is cancelled rather than left to run unseen.
    let busy = submit(
        &s,
        json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 30}),
    );
    let t = Instant::now();
    let res = client()
        .post(s.url("/v1/images/generations"))
        .json(&json!({"prompt": "a lake", "size": "64x64"}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(res.headers()["x-should-retry"], "false");
    let e: serde_json::Value = res.json().unwrap();
    assert_eq!(e["error"]["code"], "timeout", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let (st, _, e) = post_json(
        &s.url("/sdapi/v1/txt2img"),
        &json!({"prompt": "a lake", "width": 64, "height": 64, "n_iter": 2}),
    );
    assert_eq!(st, 504, "{e}");
    assert!(
        e["detail"].as_str().unwrap().contains("--sync-timeout"),
        "{e}"
    );
    // Only the long job is left: the waiting ones were all cancelled.
    let (_, list) = get_json(&s.url("/api/jobs"));
    let live: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| matches!(j["state"].as_str(), Some("queued" | "running")))
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(live, vec![busy.as_str()]);
}

// ---------------------------------------------------------------------------------------------
// The API key's rate limit, through real connections.

#[test]
fn wrong_keys_from_one_address_are_slowed_down() {
    let out = temp_dir("key-rate");
    let s = Server::start(&out, &["--api-key", "k-123456"], &[]);
    let c = client();
    for i in 0..10 {
        let st = c
            .get(s.url("/api/jobs"))
            .bearer_auth(format!("guess-{i}"))
            .send()
            .unwrap()
            .status();
        assert_eq!(st, 401, "guess {i}");
    }
    let res = c
        .get(s.url("/v1/models"))
        .bearer_auth("guess-10")
        .send()
        .unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers().get("retry-after").is_some());
    let res = c
        .post(s.url("/api/auth"))
        .json(&json!({"key": "another-guess"}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 429);
}

// ---------------------------------------------------------------------------------------------
// Cancels inside the engine: after the last step, and inside the decode (between the VAE's
// bands and tiles), on the tiny Z-Image fixture.

mod engine_cancel {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use candle_core::{Device, Tensor};
    use zturbo::engine::{
        CancelToken, Engine, EngineConfig, EngineError, Observer, Phase, RunExtras, StepEvent,
    };
    use zturbo::families::z_image::ZImage;
    use zturbo::families::{Family, ModelDir, PrecisionPolicy};
    use zturbo::memory::planner::{MemoryMode, VaeTiling};
    use zturbo::memory::probe::CpuProbe;
    use zturbo::request::ValidRequest;

    use super::common::fixture;

    fn family() -> ZImage {
        ZImage::open(
            ModelDir::open(fixture("tiny-z-image")).unwrap(),
            &Device::Cpu,
            PrecisionPolicy::F32,
        )
        .unwrap()
    }

    fn request(steps: u32) -> ValidRequest {
        ValidRequest {
            prompt: "a lake".into(),
            negative_prompt: None,
            width: 128,
            height: 128,
            steps,
            cfg: 1.0,
            seed: 7,
            batch: 2,
            enhance: false,
            memory_mode: MemoryMode::Performance,
            init: None,
            control: None,
            loras: Vec::new(),
            enhance_exclude: Vec::new(),
        }
    }

    /// Cancels the job at a given step, or when the decode starts.
    struct CancelAt {
        token: CancelToken,
        step: Option<usize>,
        decode: bool,
    }

    impl Observer for CancelAt {
        fn phase(&mut self, p: Phase) {
            if self.decode && p == Phase::Decode {
                self.token.cancel();
            }
        }
        fn step(&mut self, e: &StepEvent) {
            if Some(e.step) == self.step {
                self.token.cancel();
            }
        }
    }

    fn run(steps: u32, at_step: Option<usize>, decode: bool) -> Result<usize, EngineError> {
        let mut engine = Engine::new(
            Box::new(family()),
            "tiny",
            Arc::new(CpuProbe::new()),
            EngineConfig {
                memory_budget: None,
                faults: Default::default(),
            },
        );
        let token = CancelToken::new();
        let mut obs = CancelAt {
            token: token.clone(),
            step: at_step,
            decode,
        };
        engine
            .generate(&request(steps), &RunExtras::default(), &mut obs, &token)
            .map(|g| g.images.len())
    }

    #[test]
    fn a_cancel_during_the_last_step_or_the_decode_wins() {
        // Reference: nothing cancelled, both images made.
        assert_eq!(run(1, None, false).unwrap(), 2);
        // A 1-step job cancelled during its only step (and a 2-step one during its last).
        assert!(matches!(
            run(1, Some(1), false),
            Err(EngineError::Cancelled)
        ));
        assert!(matches!(
            run(2, Some(2), false),
            Err(EngineError::Cancelled)
        ));
        // Cancelled as the decode starts.
        assert!(matches!(run(1, None, true), Err(EngineError::Cancelled)));
    }

    #[test]
    fn the_vae_stops_between_bands_and_tiles_once_interrupted() {
        let mut f = family();
        let c = f.profile().latent_channels;
        let z = Tensor::zeros((1, c, 16, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
        let tiling = VaeTiling::square(8, 2);
        let flag = Arc::new(AtomicBool::new(false));
        let _scope = zturbo::ops::interrupt::scope(flag.clone());
        // Not interrupted: whole and tiled decodes run.
        assert!(f.decode(&z).is_ok());
        assert!(zturbo::engine::decode::decode_image(&mut f, &z, Some(tiling)).is_ok());
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let whole = f.decode(&z).unwrap_err().to_string();
        assert!(
            whole.contains(zturbo::ops::interrupt::INTERRUPTED),
            "{whole}"
        );
        let tiled = zturbo::engine::decode::decode_image(&mut f, &z, Some(tiling))
            .unwrap_err()
            .to_string();
        assert!(
            tiled.contains(zturbo::ops::interrupt::INTERRUPTED),
            "{tiled}"
        );
    }
}
