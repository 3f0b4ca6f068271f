//! `zturbo probe`: the hostile probe of issue 18, repeated against a running server on loopback
//! and summed up in one table — connections that never finish their request head, idle and
//! half-sent ones, bodies that are too big, nested or not UTF-8, path traversal, Origin/Host
//! tricks, wrong keys, an SSE storm, cancels that race the end of a run, and (with `--outputs`) a
//! second server on the same folder. Bounded: every check has a fixed number of requests and
//! connections, and the slow ones (waiting for the server to close a connection) run side by side
//! under one `--wait` limit.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// The server, e.g. http://127.0.0.1:7860 (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:7860")]
    url: String,
    /// The server's --api-key, if it has one (wrong keys are tried either way).
    #[arg(long, env = "ZTURBO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The server's outputs folder: also try to start a second server on it.
    #[arg(long)]
    outputs: Option<PathBuf>,
    /// Connections opened that never send a byte.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    silent: u32,
    /// Event streams opened at once.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
    streams: u32,
    /// Seconds to wait for the server to close a connection it should close.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=600))]
    wait: u64,
    /// Image side of the jobs the cancel checks run (large enough to cancel mid-run).
    #[arg(long, default_value_t = 1024)]
    size: u32,
    /// Only the connection checks (silent, half-sent and idle connections).
    #[arg(long)]
    connections_only: bool,
}

/// One line of the table.
struct Row {
    check: String,
    expect: String,
    got: String,
    ok: bool,
}

fn row(check: &str, expect: &str, got: String, ok: bool) -> Row {
    Row {
        check: check.into(),
        expect: expect.into(),
        got,
        ok,
    }
}

/// The server under test and what was sent to it.
struct Target {
    addr: String,
    key: Option<String>,
    requests: AtomicUsize,
    connections: AtomicUsize,
}

/// A parsed response.
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

impl Target {
    fn connect(&self) -> Result<TcpStream> {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let addr = self
            .addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow!("{} does not resolve", self.addr))?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        // Long enough for a synchronous generation, bounded for a server that never answers.
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(s)
    }

    /// Sends raw bytes on a fresh connection and reads the answer to its end.
    fn raw(&self, bytes: &[u8]) -> Result<Reply> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut s = self.connect()?;
        // A server may answer (413) and close before the whole body is sent. No half-close: a
        // server may take it for the client leaving (the request says `Connection: close`).
        let _ = s.write_all(bytes);
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        parse_reply(&raw)
    }

    /// One request with `Host` and `Connection: close`; the key when `auth`.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        auth: bool,
    ) -> Result<Reply> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {}\r\n", self.addr));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let (true, Some(k)) = (auth, &self.key) {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        self.raw(&bytes)
    }

    fn get(&self, path: &str) -> Result<Reply> {
        self.request("GET", path, &[], None, true)
    }

    fn post_json(&self, path: &str, body: &Value) -> Result<Reply> {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
            true,
        )
    }
}

fn parse_reply(raw: &[u8]) -> Result<Reply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP answer (connection closed)"))?;
    let headers: String = lines.collect::<Vec<_>>().join("\n");
    let chunked = headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            out.push_str(&rest[..n.min(rest.len())]);
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Reads until the server closes `s` (EOF or reset) or `until`; when it closed, how long after
/// `from`.
fn closed_by(s: &mut TcpStream, from: Instant, until: Instant) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let _ = s.set_read_timeout(Some(left.min(Duration::from_millis(500))));
        match s.read(&mut buf) {
            Ok(0) => return Some(from.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return Some(from.elapsed()),
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

pub fn run(args: ProbeArgs) -> Result<()> {
    let started = Instant::now();
    let authority = args
        .url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("--url must be http://HOST:PORT"))?
        .to_string();
    let host = authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(&authority);
    if !zturbo::server::security::is_loopback_host(host) {
        bail!("the probe runs against a server on loopback only (got {authority})");
    }
    let t = Arc::new(Target {
        addr: authority.clone(),
        key: args.api_key.clone(),
        requests: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
    });
    let health = t
        .get("/api/health")
        .with_context(|| format!("no server answers at {}", args.url))?;
    eprintln!("probing {} ({})", args.url, health.body.trim());
    let wait = Duration::from_secs(args.wait);
    let mut rows = Vec::new();

    // The slow checks first, side by side: connections the server should close on its own.
    let opened = Instant::now();
    let deadline = opened + wait;
    let mut silent = Vec::new();
    for _ in 0..args.silent {
        match t.connect() {
            Ok(s) => silent.push(s),
            Err(_) => break,
        }
    }
    let n_silent = silent.len();
    let silent_watch = std::thread::spawn(move || {
        let times: Vec<Option<Duration>> = silent
            .iter_mut()
            .map(|s| closed_by(s, opened, deadline))
            .collect();
        times
    });
    let tp = t.clone();
    let partial_watch = std::thread::spawn(move || -> Result<Option<Duration>> {
        let mut s = tp.connect()?;
        let from = Instant::now();
        s.write_all(b"GET /api/health HTTP/1.1\r\nHost: ")?;
        Ok(closed_by(&mut s, from, deadline))
    });
    let ti = t.clone();
    let idle_watch = std::thread::spawn(move || -> Result<Option<Duration>> {
        let mut s = ti.connect()?;
        ti.requests.fetch_add(1, Ordering::Relaxed);
        write!(s, "GET /api/health HTTP/1.1\r\nHost: {}\r\n\r\n", ti.addr)?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(closed_by(&mut s, Instant::now(), deadline))
    });

    // A real request while the silent connections are open.
    let t0 = Instant::now();
    let r = t.get("/api/health");
    rows.push(match r {
        Ok(r) => row(
            &format!("request with {n_silent} silent connections open"),
            "answered",
            format!("{} after {}", r.status, secs(t0.elapsed())),
            r.status == 200,
        ),
        Err(e) => row(
            &format!("request with {n_silent} silent connections open"),
            "answered",
            format!("failed: {e}"),
            false,
        ),
    });

    if !args.connections_only {
        request_checks(&t, &args, &mut rows)?;
    }

    // Now collect the slow checks.
    let times = silent_watch
        .join()
        .map_err(|_| anyhow!("a probe thread panicked"))?;
    let closed: Vec<Duration> = times.iter().flatten().copied().collect();
    rows.insert(
        0,
        row(
            &format!("{n_silent} connections that send nothing"),
            "closed (10 s)",
            match closed.iter().max() {
                Some(m) => format!(
                    "{}/{n_silent} closed, last after {}",
                    closed.len(),
                    secs(*m)
                ),
                None => format!("0/{n_silent} closed in {}", secs(wait)),
            },
            closed.len() == n_silent,
        ),
    );
    let partial = partial_watch
        .join()
        .map_err(|_| anyhow!("a probe thread panicked"))??;
    rows.insert(
        1,
        row(
            "half a request head",
            "closed (10 s)",
            partial
                .map(|d| format!("closed after {}", secs(d)))
                .unwrap_or_else(|| format!("open after {}", secs(wait))),
            partial.is_some(),
        ),
    );
    let idle = idle_watch
        .join()
        .map_err(|_| anyhow!("a probe thread panicked"))??;
    rows.insert(
        2,
        row(
            "kept-alive connection left idle",
            "closed (30 s)",
            idle.map(|d| format!("closed after {}", secs(d)))
                .unwrap_or_else(|| format!("open after {}", secs(wait))),
            idle.is_some(),
        ),
    );
    let health = t.get("/api/health")?.json();
    rows.push(row(
        "health",
        "ok (or degraded with a reason)",
        match health["reason"].as_str() {
            Some(r) => format!("{}: {r}", health["status"]),
            None => health["status"].to_string(),
        },
        health["status"] == "ok" || health["reason"].is_string(),
    ));

    println!("| check | expected | result | |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} |",
            r.check,
            r.expect,
            r.got.replace('|', "/"),
            if r.ok { "ok" } else { "FAIL" }
        );
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    println!(
        "\n{} checks, {failed} failed; {} requests on {} connections in {}",
        rows.len(),
        t.requests.load(Ordering::Relaxed),
        t.connections.load(Ordering::Relaxed),
        secs(started.elapsed())
    );
    if failed > 0 {
        bail!("{failed} of {} checks failed", rows.len());
    }
    Ok(())
}

/// Everything but the connection checks: bodies, headers, keys, streams, cancels, the lock.
fn request_checks(t: &Arc<Target>, args: &ProbeArgs, rows: &mut Vec<Row>) -> Result<()> {
    // Bodies and headers.
    let job = json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 1});
    let body = job.to_string();
    let r = t.request("POST", "/api/jobs", &[], Some(body.as_bytes()), true)?;
    rows.push(row(
        "POST without Content-Type",
        "415",
        r.status.to_string(),
        r.status == 415,
    ));
    let origin = format!("https://{}", t.addr);
    let r = t.request(
        "POST",
        "/api/jobs",
        &[("Content-Type", "application/json"), ("Origin", &origin)],
        Some(body.as_bytes()),
        true,
    )?;
    rows.push(row(
        "POST with Origin https://<this host:port>",
        "403",
        r.status.to_string(),
        r.status == 403,
    ));
    let (h, p) = t.addr.rsplit_once(':').unwrap_or((&t.addr, "80"));
    let zero_host = format!("{h}:0{p}");
    let r = t.request("GET", "/api/health", &[("Host", &zero_host)], None, true)?;
    rows.push(row(
        "Host port with a leading zero",
        "403",
        r.status.to_string(),
        r.status == 403,
    ));
    let traversal = [
        "/images/..%2f..%2fetc%2fpasswd",
        "/images/../../etc/passwd",
        "/images/%2e%2e/%2e%2e/etc/passwd",
        "/images/..%5c..%5cwindows%5cwin.ini",
        "/images/....//....//etc/passwd",
        "/images/%252e%252e%252fetc%252fpasswd",
        "/images/.jobs/x.json",
        "/images/.zturbo.lock",
        "/images/%2fetc%2fpasswd",
        "/images/0123456789abcdef-1.png%00.txt",
        "/images/0123456789abcdef-1.png/..",
        "/images/..",
        "/images/.",
        "/images/0123456789abcdef.json",
        "/images/0123456789ABCDEF-1.png",
        "/images/0123456789abcdef-01.png",
        "/images/%c0%ae%c0%ae/etc/passwd",
        "/images/..;/etc/passwd",
        "/static/../Cargo.toml",
        "/..%2fCargo.toml",
        "/%2e%2e/Cargo.toml",
        "/app.js/../../Cargo.toml",
        "/api/jobs/..%2f..%2fetc",
        "/api/jobs/../../../etc/passwd",
        "/images//etc/passwd",
    ];
    let mut served = Vec::new();
    for path in traversal {
        let r = t.get(path)?;
        if r.status == 200 || r.status >= 500 {
            served.push(format!("{path} → {}", r.status));
        }
    }
    rows.push(row(
        &format!("path traversal ({} variants)", traversal.len()),
        "none served, no 5xx",
        if served.is_empty() {
            "none".into()
        } else {
            served.join("; ")
        },
        served.is_empty(),
    ));
    let bearer = t
        .key
        .as_ref()
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let r = t.raw(
        format!(
            "POST /api/jobs HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{bearer}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            t.addr,
            17u64 << 20
        )
        .as_bytes(),
    )?;
    rows.push(row(
        "body of 17 MiB announced",
        "413",
        r.status.to_string(),
        r.status == 413,
    ));
    let mut chunked = format!(
        "POST /api/jobs HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n{bearer}\r\n",
        t.addr,
    )
    .into_bytes();
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..17 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = t.raw(&chunked)?;
    rows.push(row(
        "chunked body of 17 MiB",
        "413",
        r.status.to_string(),
        r.status == 413,
    ));
    let nested = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let r = t.request(
        "POST",
        "/api/jobs",
        &[("Content-Type", "application/json")],
        Some(nested.as_bytes()),
        true,
    )?;
    rows.push(row(
        "JSON nested 20 000 deep",
        "4xx",
        r.status.to_string(),
        (400..500).contains(&r.status),
    ));
    let mut bad = br#"{"prompt": "a lake "#.to_vec();
    bad.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    bad.extend_from_slice(br#""}"#);
    let r = t.request(
        "POST",
        "/api/jobs",
        &[("Content-Type", "application/json")],
        Some(&bad),
        true,
    )?;
    rows.push(row(
        "prompt that is not UTF-8",
        "4xx",
        r.status.to_string(),
        (400..500).contains(&r.status),
    ));

    // Keys.
    let auth = t.request("GET", "/api/auth", &[], None, false)?.json();
    if auth["required"] == true {
        let mut statuses = Vec::new();
        for i in 0..15 {
            let r = t.request(
                "GET",
                "/api/jobs",
                &[("Authorization", &format!("Bearer wrong-{i}"))],
                None,
                false,
            )?;
            statuses.push(r.status);
        }
        let limited = statuses.iter().filter(|s| **s == 429).count();
        rows.push(row(
            "15 wrong keys from one address",
            "429 after 10",
            format!(
                "{} × 401, {limited} × 429",
                statuses.iter().filter(|s| **s == 401).count()
            ),
            limited > 0,
        ));
        if let Some(key) = &t.key {
            // The right key from the same address may be refused for a few seconds now.
            std::thread::sleep(Duration::from_secs(7));
            let r = t.post_json("/api/auth", &json!({ "key": key }))?;
            let max_age = r
                .header("set-cookie")
                .and_then(|c| {
                    c.split(';')
                        .find_map(|p| p.trim().strip_prefix("Max-Age=").map(str::to_string))
                })
                .unwrap_or_else(|| format!("no cookie ({})", r.status));
            rows.push(row(
                "login cookie lifetime",
                "expires (7 days)",
                format!("Max-Age={max_age}"),
                max_age == "604800",
            ));
        }
    } else {
        rows.push(row(
            "wrong keys",
            "(server has no key)",
            "skipped".into(),
            true,
        ));
    }

    // An SSE storm.
    let mut readers = Vec::new();
    for _ in 0..args.streams {
        let ts = t.clone();
        readers.push(std::thread::spawn(move || -> bool {
            let Ok(mut s) = ts.connect() else {
                return false;
            };
            ts.requests.fetch_add(1, Ordering::Relaxed);
            let auth = ts
                .key
                .as_ref()
                .map(|k| format!("Authorization: Bearer {k}\r\n"))
                .unwrap_or_default();
            if write!(
                s,
                "GET /api/memory/stream HTTP/1.1\r\nHost: {}\r\n{auth}\r\n",
                ts.addr
            )
            .is_err()
            {
                return false;
            }
            let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if got.windows(13).any(|w| w == b"event: sample") {
                    return true;
                }
            }
            false
        }));
    }
    let ok = readers
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .filter(|ok| *ok)
        .count();
    rows.push(row(
        &format!("{} event streams at once", args.streams),
        "all get events",
        format!("{ok}/{}", args.streams),
        ok == args.streams as usize,
    ));
    let doc = t.get("/openapi.json")?.json();
    let described = [
        "/api/jobs/{id}/events",
        "/api/memory/stream",
        "/api/models/{name}/pull/events",
    ]
    .iter()
    .filter(|p| {
        doc["paths"][**p]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
            ["oneOf"]
            .is_array()
    })
    .count();
    rows.push(row(
        "OpenAPI: event streams",
        "each event described",
        format!("{described}/3 described"),
        described == 3,
    ));

    // Cancels that race the end of a run.
    rows.push(cancel_one_step(t, args.size)?);
    rows.push(cancel_under_openai(t, args.size)?);

    if let Some(dir) = &args.outputs {
        rows.push(second_server(dir)?);
    }

    Ok(())
}

/// Polls a job until `done(job)` or `within`; the last state seen.
fn poll_job(
    t: &Target,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let until = Instant::now() + within;
    loop {
        let job = t.get(&format!("/api/jobs/{id}"))?.json();
        if done(&job) || Instant::now() > until {
            return Ok(job);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn terminal(job: &Value) -> bool {
    matches!(job["state"].as_str(), Some("done" | "failed" | "cancelled"))
}

/// A 1-step job cancelled after its step (in the decode): the cancel must win.
fn cancel_one_step(t: &Target, size: u32) -> Result<Row> {
    let check = format!("cancel a 1-step {size}² job after its step");
    let r = t.post_json(
        "/api/jobs",
        &json!({"prompt": "a lake", "width": size, "height": size, "steps": 1}),
    )?;
    let Some(id) = r.json()["id"].as_str().map(str::to_string) else {
        return Ok(row(
            &check,
            "cancelled",
            format!("not accepted: {}", r.body),
            false,
        ));
    };
    let job = poll_job(t, &id, Duration::from_secs(120), |j| {
        terminal(j) || j["step"].as_u64() >= Some(1)
    })?;
    if terminal(&job) {
        return Ok(row(
            &check,
            "cancelled",
            format!("ended ({}) before it could be cancelled", job["state"]),
            false,
        ));
    }
    let t0 = Instant::now();
    let r = t.request("DELETE", &format!("/api/jobs/{id}"), &[], None, true)?;
    let job = poll_job(t, &id, Duration::from_secs(120), terminal)?;
    let images = job["images"].as_array().map(|a| a.len()).unwrap_or(0);
    Ok(row(
        &check,
        "cancelled",
        format!(
            "DELETE {} → {} after {}, {images} image(s)",
            r.status,
            job["state"].as_str().unwrap_or("?"),
            secs(t0.elapsed())
        ),
        job["state"] == "cancelled" && images == 0,
    ))
}

/// A synchronous OpenAI call whose job another client cancels: a clear answer, not a 500.
fn cancel_under_openai(t: &Arc<Target>, size: u32) -> Result<Row> {
    let check = "/v1 call whose job another client cancels";
    let tc = t.clone();
    let call = std::thread::spawn(move || {
        tc.post_json(
            "/v1/images/generations",
            &json!({"prompt": "a lake", "size": format!("{size}x{size}"), "quality": "max",
                    "response_format": "b64_json"}),
        )
    });
    let until = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let list = t.get("/api/jobs")?.json();
        let running = list["jobs"].as_array().and_then(|jobs| {
            jobs.iter()
                .find(|j| j["state"] == "running")
                .and_then(|j| j["id"].as_str().map(str::to_string))
        });
        if let Some(id) = running {
            break id;
        }
        if Instant::now() > until || call.is_finished() {
            return Ok(row(check, "409", "its job never ran".into(), false));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    t.request("DELETE", &format!("/api/jobs/{id}"), &[], None, true)?;
    let r = call
        .join()
        .map_err(|_| anyhow!("a probe thread panicked"))??;
    let code = r.json()["error"]["code"].as_str().unwrap_or("").to_string();
    Ok(row(
        check,
        "409, not 500",
        format!("{} {code}", r.status),
        r.status < 500 && r.status != 200,
    ))
}

/// A second server on the same outputs folder must refuse to start, naming the first one.
fn second_server(dir: &std::path::Path) -> Result<Row> {
    let check = "second server on the same outputs folder";
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["serve", "--model", "demo", "--port", "0", "--outputs"])
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // It started if it prints its address.
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut line = String::new();
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
    }
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(line) = rx.try_recv() {
            if line.starts_with("listening on") {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(row(
                    check,
                    "refused, naming the pid",
                    "it started: both would resume the same jobs".into(),
                    false,
                ));
            }
        }
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let line = err.lines().last().unwrap_or("").to_string();
            return Ok(row(
                check,
                "refused, naming the pid",
                format!("exit {}: {line}", status.code().unwrap_or(-1)),
                !status.success() && line.contains("pid"),
            ));
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(row(
                check,
                "refused, naming the pid",
                "it started: both would resume the same jobs".into(),
                false,
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
