//! Helpers for the end-to-end server tests: start the real `zturbo serve` binary on an ephemeral
//! port with the built-in demo model and a fresh outputs folder, talk to it over HTTP, read SSE.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod redis;

/// A fresh, empty folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("zturbo-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Server {
    child: Child,
    pub url: String,
    pub outputs: PathBuf,
    log: PathBuf,
}

impl Server {
    /// `zturbo serve --model demo --port 0 --outputs <outputs>` plus `args`; `env` is added to a
    /// cleaned environment (no ZTURBO_* from the caller's shell).
    pub fn start(outputs: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_full(outputs, "demo", "127.0.0.1", args, env)
    }

    /// [`Server::start`] with `--model model --models-dir models_dir`.
    pub fn start_in(
        outputs: &Path,
        models_dir: &Path,
        model: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut all = vec!["--models-dir", models_dir.to_str().unwrap()];
        all.extend_from_slice(args);
        Server::start_full(outputs, model, "127.0.0.1", &all, env)
    }

    /// [`Server::start`] with another `--model`.
    pub fn start_model(outputs: &Path, model: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_full(outputs, model, "127.0.0.1", args, env)
    }

    /// [`Server::start`] listening on `host`.
    pub fn start_on(outputs: &Path, host: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_full(outputs, "demo", host, args, env)
    }

    /// [`Server::start`] with `--models-dir models_dir` (e.g. holding `loras/`).
    pub fn start_with_models(
        outputs: &Path,
        models_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        Server::start_dirs(outputs, "demo", "127.0.0.1", models_dir, args, env)
    }

    fn start_full(
        outputs: &Path,
        model: &str,
        host: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let models_dir = outputs.with_file_name("no-models-here");
        Server::start_dirs(outputs, model, host, &models_dir, args, env)
    }

    fn start_dirs(
        outputs: &Path,
        model: &str,
        host: &str,
        models_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        // Next to the outputs folder, one per start (a restarted server gets a fresh log).
        let log = outputs.with_file_name(format!(
            "{}.server-{}.log",
            outputs.file_name().unwrap().to_string_lossy(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zturbo"));
        for (k, _) in std::env::vars() {
            if k.starts_with("ZTURBO_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["serve", "--model", model, "--port", "0", "--host", host])
            .arg("--outputs")
            .arg(outputs);
        if !args.contains(&"--models-dir") {
            cmd.arg("--models-dir").arg(models_dir);
        }
        cmd.args(args)
            .env("ZTURBO_LOG", "info,tower_http=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().expect("spawn zturbo serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server printed no `listening on` line; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .to_string();
        Server {
            child,
            url,
            outputs: outputs.to_path_buf(),
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up (the journal must cope).
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for a graceful exit; returns whether it exited with status 0.
    pub fn terminate(mut self, within: Duration) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                panic!(
                    "the server did not exit within {within:?} of SIGTERM; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// POST a JSON value; returns status, headers and the parsed body.
pub fn post_json(
    url: &str,
    body: &Value,
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    post_raw(url, "application/json", body.to_string().into_bytes())
}

pub fn post_raw(
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    let res = client()
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let text = res.text().unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {text:.300}"));
    (status, headers, json)
}

pub fn get_json(url: &str) -> (reqwest::StatusCode, Value) {
    let res = client().get(url).send().unwrap();
    let status = res.status();
    let text = res.text().unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {text:.300}"));
    (status, json)
}

/// DELETE; the body parsed as JSON (`null` when empty, as a 204's is).
pub fn delete(url: &str) -> (reqwest::StatusCode, Value) {
    let res = client().delete(url).send().unwrap();
    let status = res.status();
    let text = res.text().unwrap();
    let json = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {text:.300}"))
    };
    (status, json)
}

/// Submits a job; panics unless it is accepted. Returns its id.
pub fn submit(server: &Server, body: Value) -> String {
    let (status, _, json) = post_json(&server.url("/api/jobs"), &body);
    assert_eq!(status, 202, "{json}");
    json["id"].as_str().unwrap().to_string()
}

/// Polls a job until it is in a terminal state.
pub fn wait_terminal(server: &Server, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, job) = get_json(&server.url(&format!("/api/jobs/{id}")));
        assert_eq!(status, 200, "{job}");
        if matches!(job["state"].as_str(), Some("done" | "failed" | "cancelled")) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still {} after {within:?}; server log:\n{}",
            job["state"],
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One SSE event: its name and JSON data.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub name: String,
    pub data: Value,
}

/// Reads `text/event-stream` events from a streaming response body.
pub struct SseReader {
    lines: std::io::Lines<BufReader<Box<dyn Read + Send>>>,
}

impl SseReader {
    pub fn open(url: &str) -> SseReader {
        let res = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
            .get(url)
            .send()
            .unwrap();
        assert_eq!(res.status(), 200, "GET {url}");
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content type {ct}");
        assert_eq!(
            res.headers()
                .get("x-accel-buffering")
                .and_then(|v| v.to_str().ok()),
            Some("no")
        );
        let body: Box<dyn Read + Send> = Box::new(res);
        SseReader {
            lines: BufReader::new(body).lines(),
        }
    }
}

impl Iterator for SseReader {
    type Item = SseEvent;
    fn next(&mut self) -> Option<SseEvent> {
        let mut name = String::from("message");
        let mut data = String::new();
        let mut seen = false;
        loop {
            let line = self.lines.next()?.ok()?;
            if line.is_empty() {
                if seen {
                    let data = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
                    return Some(SseEvent { name, data });
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // keep-alive comment
            }
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
                seen = true;
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
                seen = true;
            }
        }
    }
}

/// Reads a job's event stream to its end (it closes after the terminal event).
pub fn job_events(server: &Server, id: &str) -> Vec<SseEvent> {
    SseReader::open(&server.url(&format!("/api/jobs/{id}/events"))).collect()
}

/// A fake Hugging Face hub: the repository API, and files served with ranges. The first full
/// download of the weight file is cut off halfway when `cut_once` is set.
pub struct FakeHub {
    pub url: String,
    /// `Range` headers of weight-file downloads, in order.
    pub ranges: Arc<Mutex<Vec<String>>>,
}

pub const WEIGHTS_LEN: usize = 3 << 20;

pub fn weights_bytes() -> Vec<u8> {
    (0..WEIGHTS_LEN).map(|i| (i * 7 % 251) as u8).collect()
}

pub fn fake_hub(cut_once: bool) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    std::thread::spawn(move || {
        let weights = Arc::new(weights_bytes());
        let cut = Arc::new(Mutex::new(cut_once));
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (weights, cut, seen) = (weights.clone(), cut.clone(), seen.clone());
            std::thread::spawn(move || serve_hub(conn, &weights, &cut, &seen));
        }
    });
    FakeHub { url, ranges }
}

fn serve_hub(mut conn: TcpStream, weights: &[u8], cut: &Mutex<bool>, seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let index = br#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#;
    let files: [(&str, &[u8]); 3] = [
        ("model_index.json", index),
        ("unet/config.json", b"{}"),
        ("unet/diffusion_pytorch_model.safetensors", weights),
    ];
    if path.starts_with("/api/models/") {
        let body = json!({"sha": "0123456789abcdef0123456789abcdef01234567", "siblings":
            files.iter().map(|(f, _)| json!({"rfilename": f})).chain([json!({"rfilename": "README.md"})]).collect::<Vec<_>>()})
        .to_string();
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let Some((name, bytes)) = files
        .iter()
        .find(|(f, _)| path.ends_with(&format!("/resolve/main/{f}")))
    else {
        let _ = write!(
            conn,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    };
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let metadata_probe = range.as_deref() == Some("bytes=0-0");
    let end = if metadata_probe { 1 } else { bytes.len() };
    if name.ends_with(".safetensors") && !metadata_probe {
        seen.lock().unwrap().push(range.clone().unwrap_or_default());
    }
    let body = &bytes[start.min(end)..end];
    let _ = write!(
        conn,
        "HTTP/1.1 206 Partial Content\r\nETag: \"etag-{}\"\r\nX-Repo-Commit: 0123456789abcdef0123456789abcdef01234567\r\nContent-Range: bytes {start}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        name.len() * 1000 + bytes.len(),
        end.saturating_sub(1),
        bytes.len(),
        body.len()
    );
    // The weights trickle in 64 KiB pieces (so progress is seen); the first time, only half.
    let mut sent = 0;
    let half = body.len() / 2;
    let cut_now = name.ends_with(".safetensors") && !metadata_probe && {
        let mut c = cut.lock().unwrap();
        std::mem::replace(&mut *c, false)
    };
    for piece in body.chunks(64 << 10) {
        if cut_now && sent >= half {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return;
        }
        if conn.write_all(piece).is_err() {
            return;
        }
        sent += piece.len();
        if body.len() > 1 {
            std::thread::sleep(Duration::from_millis(15));
        }
    }
}

/// A models folder holding the tiny fixture models (symlinks, so nothing is copied): the names a
/// model switch can use. `broken` adds `broken-sd-turbo`, whose UNet weights are cut short.
pub fn tiny_models_dir(name: &str, broken: bool) -> PathBuf {
    let dir = temp_dir(name);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for m in ["tiny-z-image", "tiny-sd-turbo"] {
        std::os::unix::fs::symlink(fixtures.join(m), dir.join(m)).unwrap();
    }
    if broken {
        let b = dir.join("broken-sd-turbo");
        copy_tree(&fixtures.join("tiny-sd-turbo"), &b);
        let w = b.join("unet/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    }
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.file_name().is_some_and(|n| n == "golden") {
            continue;
        }
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}
