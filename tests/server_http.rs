//! End-to-end HTTP tests of `zturbo serve` with the built-in demo model (the tiny random-weight
//! Z-Image fixture), each on its own ephemeral port and outputs folder.
//!
//! Slow paths use the test hook `ZTURBO_TEST_WORKER_DELAY_MS` (the worker sleeps that long after
//! every denoising step, cancellably) to hold a job "running" while the test acts.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const SLOW: (&str, &str) = ("ZTURBO_TEST_WORKER_DELAY_MS", "300");

#[test]
fn page_info_models_and_enhance() {
    let out = temp_dir("info");
    let s = Server::start(&out, &[], &[]);
    for (path, ct) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
    ] {
        let res = client().get(s.url(path)).send().unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let got = res.headers()["content-type"].to_str().unwrap().to_string();
        assert!(got.starts_with(ct), "{path}: {got}");
    }

    let (st, health) = get_json(&s.url("/api/health"));
    assert_eq!(st, 200);
    assert_eq!(
        health,
        json!({"status": "ok", "model": "demo", "device": "cpu"})
    );

    let (st, info) = get_json(&s.url("/api/info"));
    assert_eq!(st, 200);
    let m = &info["model"];
    assert_eq!(m["name"], "demo");
    assert_eq!(m["family"], "z-image");
    assert_eq!(m["demo"], true);
    // f32 defaults arrive as the decimals the model states (1.8, not 1.7999999523…); the demo
    // keeps Z-Image's steps and CFG at 512² (its images are noise: no need to wait for 1024²).
    assert_eq!(
        m["defaults"],
        json!({"width": 512, "height": 512, "steps": 8, "cfg": 1.8})
    );
    assert_eq!(m["limits"]["width"], json!([64, 2048]));
    assert_eq!(m["limits"]["steps"], json!([1, 100]));
    assert_eq!(m["limits"]["cfg"], json!([1.0, 30.0]));
    assert_eq!(m["limits"]["prompt_chars"], 4000);
    assert_eq!(m["safe_cfg_max"], 2.4);
    assert_eq!(m["size_multiple"], 16);
    let max_batch = info["max_batch"].as_u64().unwrap();
    assert!((1..=8).contains(&max_batch));
    assert_eq!(m["limits"]["batch"], json!([1, max_batch]));
    assert_eq!(info["device"]["kind"], "cpu");
    assert!(info["device"]["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(info["queue_size"], 32);
    assert_eq!(
        info["memory_modes"],
        json!(["auto", "performance", "balanced", "low"])
    );
    let help = info["demo_help"].as_str().unwrap();
    assert!(
        help.contains("random") && help.contains("zturbo pull z-image-turbo"),
        "{help}"
    );
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));

    let (st, models) = get_json(&s.url("/api/models"));
    assert_eq!(st, 200);
    let list = models["models"].as_array().unwrap();
    let demo = list.iter().find(|m| m["name"] == "demo").unwrap();
    assert_eq!(demo["state"], "loaded");
    let zit = list.iter().find(|m| m["name"] == "z-image-turbo").unwrap();
    assert_eq!(zit["state"], "not_downloaded");
    assert!(zit["size_bytes"].as_u64().unwrap() > 10_000_000_000);

    let (st, _, enh) = post_json(
        &s.url("/api/enhance"),
        &json!({"prompt": "a mountain lake at dawn"}),
    );
    assert_eq!(st, 200, "{enh}");
    assert!(enh["prompt"]
        .as_str()
        .unwrap()
        .starts_with("a mountain lake at dawn, "));
    assert!(!enh["added"]["prompt"].as_array().unwrap().is_empty());
    assert!(!enh["added"]["negative_prompt"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(!enh["advice"].as_array().unwrap().is_empty());
    // Unknown fields are refused, naming them (`cfg` and `steps` are the form's, see below).
    let (st, _, err) = post_json(&s.url("/api/enhance"), &json!({"prompt": "x", "seed": 2}));
    assert_eq!(st, 422);
    assert_eq!(err["error"]["field"], "seed");
    // The preview reads the form's CFG and steps, so its advice matches the form: CFG 3.0 is
    // called out as intercepted, not "1.8, the default".
    let (st, _, enh) = post_json(
        &s.url("/api/enhance"),
        &json!({"prompt": "a mountain lake at dawn", "cfg": 3.0, "steps": 4}),
    );
    assert_eq!(st, 200, "{enh}");
    let advice: Vec<&str> = enh["advice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["message"].as_str().unwrap())
        .collect();
    assert!(
        advice
            .iter()
            .any(|m| m.starts_with("CFG 3") && m.contains("intercepted")),
        "{advice:?}"
    );
    assert!(advice.iter().any(|m| m.contains('4')), "{advice:?}");
    // Removed phrases stay out.
    let first = enh["added"]["prompt"][0].as_str().unwrap().to_string();
    let (st, _, enh2) = post_json(
        &s.url("/api/enhance"),
        &json!({"prompt": "a mountain lake at dawn", "exclude": [first]}),
    );
    assert_eq!(st, 200, "{enh2}");
    assert!(!enh2["added"]["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == &json!(first)));
    for (body, field) in [
        (json!({"prompt": "x", "cfg": 0.5}), "cfg"),
        (json!({"prompt": "x", "steps": 0}), "steps"),
        (json!({"prompt": "x", "exclude": ["a\u{0007}"]}), "exclude"),
    ] {
        let (st, _, err) = post_json(&s.url("/api/enhance"), &body);
        assert_eq!(
            (st.as_u16(), err["error"]["field"].as_str()),
            (422, Some(field)),
            "{body}"
        );
    }

    // Unknown paths and jobs: JSON 404s.
    let (st, err) = get_json(&s.url("/api/nope"));
    assert_eq!(st, 404);
    assert!(err["error"]["message"].is_string());
    let (st, err) = get_json(&s.url("/api/jobs/0123456789abcdef"));
    assert_eq!(st, 404);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("0123456789abcdef"));
}

#[test]
fn submit_stream_done_and_png() {
    let out = temp_dir("generate");
    let s = Server::start(&out, &[], &[]);
    let (st, headers, acc) = post_json(
        &s.url("/api/jobs"),
        &json!({"prompt": "a serene mountain lake at dawn", "width": 128, "height": 96,
                "steps": 4, "cfg": 1.8, "seed": 42}),
    );
    assert_eq!(st, 202, "{acc}");
    let id = acc["id"].as_str().unwrap().to_string();
    assert_eq!(acc["position"], 0);
    assert_eq!(headers["location"], format!("/api/jobs/{id}").as_str());

    let events = job_events(&s, &id);
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert!(matches!(names[0], "queued" | "started"), "{names:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e.name == "progress")
        .map(|e| {
            assert_eq!(e.data["total"], 4);
            assert!(e.data["elapsed_ms"].is_u64());
            e.data["step"].as_u64().unwrap()
        })
        .collect();
    assert!(
        !steps.is_empty() && steps.windows(2).all(|w| w[0] < w[1]),
        "{steps:?}"
    );
    assert_eq!(steps.last(), Some(&4));
    let url = events.last().unwrap().data["images"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(url, format!("/images/{id}-1.png"));
    let done_peak = events.last().unwrap().data["peak_memory_bytes"].as_u64();

    let png = client().get(s.url(&url)).send().unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    let bytes = png.bytes().unwrap();
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (128, 96));
    let chunks = zturbo::engine::output::png_text_chunks(&bytes).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.contains("Seed: 42") && params.contains("Size: 128x96"),
        "{params}"
    );
    assert!(chunks.iter().any(|(k, _)| k == "zturbo"));

    let (st, job) = get_json(&s.url(&format!("/api/jobs/{id}")));
    assert_eq!(st, 200);
    assert_eq!(job["state"], "done");
    assert_eq!(job["step"], 4);
    assert_eq!(job["total_steps"], 4);
    assert_eq!(job["images"], json!([url]));
    let p = &job["params"];
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64()),
        (Some(128), Some(96))
    );
    assert_eq!(p["seed"], 42);
    assert_eq!(p["cfg"], 1.8);
    assert_eq!(p["cfg_requested"], 1.8);
    assert_eq!(p["model"], "demo");
    // Final prompts: the enhancement's additions are in, the original is kept alongside.
    assert!(p["prompt"]
        .as_str()
        .unwrap()
        .starts_with("a serene mountain lake at dawn, "));
    assert!(p["negative_prompt"]
        .as_str()
        .unwrap()
        .contains("black screen"));
    assert_eq!(
        job["enhancement"]["original_prompt"],
        "a serene mountain lake at dawn"
    );
    let t = &job["timings"];
    for k in [
        "queue_ms",
        "encode_ms",
        "denoise_ms",
        "decode_ms",
        "total_ms",
    ] {
        assert!(t[k].is_u64(), "timings.{k}: {t}");
    }
    assert!(job["peak_memory_bytes"].as_u64().unwrap() > 0);
    // The done event carries the record's exact peak (the chart shows that, not a sample).
    assert_eq!(done_peak, job["peak_memory_bytes"].as_u64());
    assert_eq!(job["image_seeds"], json!([42]));
    // A download is an attachment named after the prompt, the image's seed and its index.
    let dl = client()
        .get(s.url(&format!("{url}?download=1")))
        .send()
        .unwrap();
    assert_eq!(dl.status(), 200);
    assert_eq!(
        dl.headers()["content-disposition"],
        "attachment; filename=\"a-serene-mountain-lake-at-dawn-42-1.png\""
    );
    assert!(png_has_no_disposition(&s, &url));
    // The memory plan the run used is part of the record.
    assert!(job["plan"]["mode"].is_string(), "{}", job["plan"]);
    assert!(job["plan"]["reasons"]
        .as_array()
        .is_some_and(|r| !r.is_empty()));
    assert!(job["created_at"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(job["error"].is_null());

    // The files: image, sidecar with the full record, journal entry.
    assert!(out.join(format!("{id}-1.png")).is_file());
    let sidecar: Value =
        serde_json::from_slice(&std::fs::read(out.join(format!("{id}.json"))).unwrap()).unwrap();
    assert_eq!(sidecar["state"], "done");
    assert_eq!(sidecar["params"]["seed"], 42);
    assert_eq!(
        sidecar["request"]["prompt"],
        "a serene mountain lake at dawn"
    );
    assert!(out.join(".jobs").join(format!("{id}.json")).is_file());

    // An ended job's stream sends the final event at once, then ends.
    let again = job_events(&s, &id);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].name, "done");

    // History: newest first.
    let second = submit(
        &s,
        json!({"prompt": "cyberpunk street", "width": 64, "height": 64,
                                    "steps": 1, "batch": 2, "cfg": 3.2}),
    );
    let events = job_events(&s, &second);
    // A job that ends before the stream is opened shows only its final event: the notice is
    // then read from the record (on a busy machine this 1-step job can finish that fast).
    let notice = match events.iter().find(|e| e.name == "notice") {
        Some(e) => e.data.clone(),
        None => get_json(&s.url(&format!("/api/jobs/{second}"))).1["notices"][0].clone(),
    };
    assert_eq!(notice["kind"], "cfg_clamped", "{notice}");
    assert_eq!(notice["to"], 2.4);
    let done = events.last().unwrap();
    assert_eq!(done.name, "done");
    assert_eq!(done.data["images"].as_array().unwrap().len(), 2);
    let (_, list) = get_json(&s.url("/api/jobs"));
    let ids: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![second.as_str(), id.as_str()]);
    let j2 = &list["jobs"][0];
    let base_seed = j2["params"]["seed"].as_u64().unwrap();
    assert_eq!(j2["image_seeds"], json!([base_seed, base_seed + 1]));
    assert_eq!(j2["params"]["cfg"], 2.4);
    assert_eq!(j2["params"]["cfg_requested"], 3.2);
    assert_eq!(j2["notices"][0]["kind"], "cfg_clamped");
}

fn png_has_no_disposition(s: &Server, url: &str) -> bool {
    let res = client().get(s.url(url)).send().unwrap();
    res.status() == 200 && res.headers().get("content-disposition").is_none()
}

/// The (status, field) a body is refused with.
fn refusal(s: &Server, body: Vec<u8>) -> (u16, Value) {
    let (st, _, json) = post_raw(&s.url("/api/jobs"), "application/json", body);
    let msg = json["error"]["message"].as_str().unwrap_or("");
    assert!(!msg.is_empty(), "error without a message: {json}");
    (st.as_u16(), json["error"]["field"].clone())
}

#[test]
fn invalid_bodies_name_the_field() {
    let out = temp_dir("invalid");
    let s = Server::start(&out, &[], &[]);
    let ten_mb = "a".repeat(10 << 20);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": "x", "width": "wide"}), "width"),
        (json!({"prompt": "x", "steps": 2.5}), "steps"),
        (json!({"prompt": "x", "seed": -1}), "seed"),
        (json!({"prompt": "x", "enhance": "yes"}), "enhance"),
        (json!({"prompt": "x", "width": 100}), "width"),
        (json!({"prompt": "x", "height": 1000}), "height"),
        (json!({"prompt": "x", "width": 4096}), "width"),
        (json!({"prompt": "x", "steps": 0}), "steps"),
        (json!({"prompt": "x", "steps": 500}), "steps"),
        (json!({"prompt": "x", "cfg": -1}), "cfg"),
        (json!({"prompt": "x", "batch": 0}), "batch"),
        (json!({"prompt": "x", "batch": 99}), "batch"),
        (
            json!({"prompt": "x", "memory_mode": "turbo"}),
            "memory_mode",
        ),
        (json!({"prompt": "   "}), "prompt"),
        (json!({"prompt": ten_mb}), "prompt"),
        (json!({"prompt": "x", "stepz": 4}), "stepz"),
        (
            json!({"prompt": "x", "enhance_exclude": "all"}),
            "enhance_exclude",
        ),
        (
            json!({"prompt": "x", "enhance_exclude": ["x".repeat(201)]}),
            "enhance_exclude",
        ),
        (json!({"steps": 4}), "prompt"),
    ];
    for (body, field) in cases {
        let shown = body.to_string().chars().take(80).collect::<String>();
        let (st, got) = refusal(&s, body.to_string().into_bytes());
        assert_eq!(st, 422, "{shown}");
        assert_eq!(got, field, "{shown}");
    }
    // Messages name the range and the value given.
    let (_, _, e) = post_json(&s.url("/api/jobs"), &json!({"prompt": "x", "steps": 500}));
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("1") && msg.contains("100") && msg.contains("500"),
        "{msg}"
    );
    let (_, _, e) = post_json(&s.url("/api/jobs"), &json!({"prompt": "x", "width": 100}));
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("multiple of 16") && msg.contains("100"),
        "{msg}"
    );

    // Not JSON at all, trailing garbage: 400 without a field.
    for body in [&b"{\"prompt\": "[..], b"{\"prompt\": \"x\"} x", b"not json"] {
        let (st, field) = refusal(&s, body.to_vec());
        assert_eq!(st, 400);
        assert!(field.is_null());
    }
    // Wrong content type: 415; over the body limit: 413 — both in the JSON error shape.
    let (st, _, e) = post_raw(
        &s.url("/api/jobs"),
        "text/plain",
        b"{\"prompt\":\"x\"}".to_vec(),
    );
    assert_eq!(st, 415, "{e}");
    // The limit is enforced from Content-Length, before any of the body is read: announce 17 MiB
    // over a raw socket and send none of it (a client streaming the body would race the server's
    // early close).
    let (st, e) = announce_body(&s.url, "/api/jobs", 17 << 20);
    assert_eq!(st, 413, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("MiB"));
    // Nothing was queued by any of it.
    let (_, list) = get_json(&s.url("/api/jobs"));
    assert_eq!(list["jobs"], json!([]));
}

#[test]
fn cancel_running_and_queued_jobs() {
    let out = temp_dir("cancel");
    let s = Server::start(&out, &[], &[SLOW]);
    let body = json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 30});
    let running = submit(&s, body.clone());
    let queued = submit(&s, body);

    let mut events = SseReader::open(&s.url(&format!("/api/jobs/{running}/events")));
    // Wait until it has really started stepping.
    let mut seen = Vec::new();
    for ev in events.by_ref() {
        seen.push(ev.name.clone());
        if ev.name == "progress" {
            break;
        }
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("progress"),
        "{seen:?}"
    );

    // The queued one first: cancelled at once.
    let (st, body) = get_json(&s.url(&format!("/api/jobs/{queued}")));
    assert_eq!(
        (
            st.as_u16(),
            body["state"].as_str(),
            body["position"].as_u64()
        ),
        (200, Some("queued"), Some(0))
    );
    let (st, body) = delete(&s.url(&format!("/api/jobs/{queued}")));
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["state"], "cancelled");
    let ev = job_events(&s, &queued);
    assert_eq!(
        ev.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        vec!["cancelled"]
    );

    // The running one stops between steps.
    let t = Instant::now();
    let (st, body) = delete(&s.url(&format!("/api/jobs/{running}")));
    assert_eq!(st, 202, "{body}");
    assert_eq!(body["state"], "cancelling");
    let rest: Vec<SseEvent> = events.collect();
    assert_eq!(
        rest.last().map(|e| e.name.as_str()),
        Some("cancelled"),
        "{rest:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let job = wait_terminal(&s, &running, Duration::from_secs(10));
    assert_eq!(job["state"], "cancelled");
    assert!(job["step"].as_u64().unwrap() < 30);
    assert_eq!(job["images"], json!([]));

    // Ended jobs cannot be cancelled again; unknown ones are not found.
    let (st, body) = delete(&s.url(&format!("/api/jobs/{running}")));
    assert_eq!(st, 409, "{body}");
    let (st, _) = delete(&s.url("/api/jobs/0123456789abcdef"));
    assert_eq!(st, 404);

    // The worker is free again.
    let quick = submit(
        &s,
        json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 1}),
    );
    assert_eq!(
        wait_terminal(&s, &quick, Duration::from_secs(30))["state"],
        "done"
    );
}

#[test]
fn full_queue_is_429_with_retry_after() {
    let out = temp_dir("full");
    let s = Server::start(&out, &["--queue-size", "1"], &[SLOW]);
    let body = json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 30});
    let a = submit(&s, body.clone());
    let (st, _, b) = post_json(&s.url("/api/jobs"), &body);
    assert_eq!(st, 202);
    assert_eq!(
        b["position"], 0,
        "one job ahead is running, so this one is next"
    );
    let (st, headers, err) = post_json(&s.url("/api/jobs"), &body);
    assert_eq!(st, 429, "{err}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=600).contains(&retry), "{retry}");
    assert!(err["error"]["message"].as_str().unwrap().contains("full"));
    assert!(err["error"]["field"].is_null());
    // Jobs list shows both, newest first, with the queued position.
    let (_, list) = get_json(&s.url("/api/jobs"));
    let jobs = list["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["id"], b["id"]);
    assert_eq!(jobs[0]["state"], "queued");
    assert_eq!(jobs[0]["position"], 0);
    assert_eq!(jobs[1]["id"], a.as_str());
    assert_eq!(jobs[1]["state"], "running");
    // Freeing the slot lets the next one in.
    delete(&s.url(&format!("/api/jobs/{}", b["id"].as_str().unwrap())));
    let (st, _, _) = post_json(&s.url("/api/jobs"), &body);
    assert_eq!(st, 202);
}

#[test]
fn memory_stream_yields_tagged_samples() {
    let out = temp_dir("memory");
    let s = Server::start(&out, &[], &[("ZTURBO_TEST_WORKER_DELAY_MS", "150")]);
    let mut stream = SseReader::open(&s.url("/api/memory/stream"));
    let first: Vec<SseEvent> = stream.by_ref().take(3).collect();
    assert_eq!(first.len(), 3);
    for e in &first {
        assert_eq!(e.name, "sample");
        assert_eq!(e.data["device"], "cpu");
        assert!(e.data["used_bytes"].as_u64().unwrap() > 0, "{}", e.data);
        assert!(e.data["total_bytes"].as_u64().unwrap() > 0);
        assert!(e.data["t_ms"].is_u64());
    }
    let id = submit(
        &s,
        json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 12}),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut busy: Vec<Value> = Vec::new();
    let mut last_t = 0;
    for e in stream {
        let t = e.data["t_ms"].as_u64().unwrap();
        assert!(t >= last_t, "samples go forward in time");
        last_t = t;
        if e.data["job_id"] == id.as_str() {
            busy.push(e.data);
        } else if !busy.is_empty() {
            break; // the job ended
        }
        assert!(
            Instant::now() < deadline,
            "no end of the job in the memory stream"
        );
    }
    assert!(
        busy.len() >= 5,
        "only {} samples while the job ran",
        busy.len()
    );
    assert!(busy
        .iter()
        .any(|d| d["phase"] == "denoise" && d["step"].as_u64().is_some()));
    // ≥ 5 Hz while a job runs (the sampler's busy interval is 100 ms).
    let span = busy.last().unwrap()["t_ms"].as_u64().unwrap() - busy[0]["t_ms"].as_u64().unwrap();
    let rate = (busy.len() - 1) as f64 / (span as f64 / 1000.0);
    assert!(rate >= 5.0, "{rate:.1} Hz over {span} ms");
}

#[test]
fn images_serves_only_what_the_server_wrote() {
    let out = temp_dir("images");
    let s = Server::start(&out, &[], &[]);
    std::fs::write(out.join("notes.png"), b"not ours").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink("/etc/hostname", out.join("0123456789abcdef-1.png")).unwrap();
    for path in [
        "/images/notes.png",
        "/images/0123456789abcdef-1.png",
        "/images/0123456789abcdef-2.png",
        "/images/..%2F..%2FCargo.toml",
        "/images/%2Fetc%2Fpasswd",
    ] {
        let res = client().get(s.url(path)).send().unwrap();
        assert_eq!(res.status(), 404, "{path}");
        let body: Value = res.json().unwrap();
        assert!(body["error"]["message"].is_string());
    }
    // A raw request line with `..` (no client-side normalisation).
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        tcp,
        "GET /images/../Cargo.toml HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw:.200}");
}

fn journal_states(out: &std::path::Path, ids: &[String]) -> Vec<String> {
    ids.iter()
        .map(|id| {
            let bytes = std::fs::read(out.join(".jobs").join(format!("{id}.json")))
                .unwrap_or_else(|e| panic!("journal entry of {id}: {e}"));
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            v["state"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn journaled_jobs_survive_kill_and_restart() {
    let out = temp_dir("restart");
    let body = json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 6, "seed": 7});

    // 1. Three accepted jobs, the first one running, then SIGKILL.
    let s = Server::start(&out, &[], &[SLOW]);
    let ids: Vec<String> = (0..3).map(|_| submit(&s, body.clone())).collect();
    let mut ev = SseReader::open(&s.url(&format!("/api/jobs/{}/events", ids[0])));
    assert!(ev.any(|e| e.name == "progress"));
    s.kill9();
    assert_eq!(
        journal_states(&out, &ids),
        vec!["running", "queued", "queued"]
    );
    // A damaged entry must not stop the next start.
    std::fs::write(
        out.join(".jobs").join("fedcba9876543210.json"),
        b"{\"id\": \"fed",
    )
    .unwrap();

    // 2. Restart (still slow): the first job runs again; SIGTERM leaves them all journaled.
    let s = Server::start(&out, &[], &[SLOW]);
    let (_, list) = get_json(&s.url("/api/jobs"));
    let states: Vec<(&str, &str)> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["id"].as_str().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        vec![
            (ids[2].as_str(), "queued"),
            (ids[1].as_str(), "queued"),
            (ids[0].as_str(), "running")
        ]
    );
    // The interrupted job says it restarted from step 1; the ones that never ran do not.
    let resumed = |id: &str| -> bool {
        let (_, j) = get_json(&s.url(&format!("/api/jobs/{id}")));
        j["notices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["kind"] == "resumed")
    };
    assert!(resumed(&ids[0]));
    assert!(!resumed(&ids[1]) && !resumed(&ids[2]));
    let mut ev = SseReader::open(&s.url(&format!("/api/jobs/{}/events", ids[0])));
    let mut saw_notice = false;
    assert!(ev.any(|e| {
        saw_notice |= e.name == "notice" && e.data["kind"] == "resumed";
        e.name == "progress"
    }));
    assert!(saw_notice, "the stream tells the page the job restarted");
    assert!(s.terminate(Duration::from_secs(20)), "graceful exit status");
    assert_eq!(
        journal_states(&out, &ids),
        vec!["running", "queued", "queued"]
    );

    // 3. Restart at full speed: all three finish, in their original order.
    let s = Server::start(&out, &[], &[]);
    let jobs: Vec<Value> = ids
        .iter()
        .map(|id| wait_terminal(&s, id, Duration::from_secs(60)))
        .collect();
    let kinds = |j: &Value| -> Vec<String> {
        j["notices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["kind"].as_str().unwrap().to_string())
            .collect()
    };
    // Resumed twice, noted once, and still there once it has run.
    assert_eq!(
        kinds(&jobs[0])
            .iter()
            .filter(|k| k.as_str() == "resumed")
            .count(),
        1,
        "{}",
        jobs[0]
    );
    for j in &jobs {
        assert_eq!(j["state"], "done", "{j}");
        assert_eq!(j["params"]["seed"], 7);
        let name = format!("{}-1.png", j["id"].as_str().unwrap());
        assert!(out.join(&name).is_file(), "{name}");
    }
    let started: Vec<u64> = jobs
        .iter()
        .map(|j| j["started_at"].as_u64().unwrap())
        .collect();
    assert!(started.windows(2).all(|w| w[0] <= w[1]), "{started:?}");
    assert_eq!(journal_states(&out, &ids), vec!["done", "done", "done"]);
    assert!(s.terminate(Duration::from_secs(20)));

    // 4. The history survives one more restart.
    let s = Server::start(&out, &[], &[]);
    let (_, list) = get_json(&s.url("/api/jobs"));
    let listed: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        vec![ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]
    );
    assert!(list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["state"] == "done"));
}

#[test]
fn a_model_that_does_not_load_ends_the_process_with_the_error() {
    let out = temp_dir("noload");
    let broken = out.join("broken-model");
    std::fs::create_dir_all(&broken).unwrap();
    // Found as a folder, fails on the worker thread while loading.
    std::fs::write(
        broken.join("model_index.json"),
        b"{\"_class_name\": \"NoSuchPipeline\"}",
    )
    .unwrap();
    for (model, expect) in [
        ("no-such-model", "no-such-model"),
        (broken.to_str().unwrap(), "NoSuchPipeline"),
    ] {
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_zturbo"))
            .args(["serve", "--port", "0", "--model", model, "--outputs"])
            .arg(out.join("outputs"))
            .env_remove("ZTURBO_TEST_WORKER_DELAY_MS")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{model}: {stdout}");
        assert!(!stdout.contains("listening on"), "{model}: {stdout}");
        assert!(stderr.contains(expect), "{model}: {stderr}");
    }
}

/// Sends only the headers of a POST announcing `len` body bytes; returns the status and JSON body.
fn announce_body(base: &str, path: &str, len: usize) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        sock,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = sock.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:.200}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    // A chunked body: take the JSON object inside.
    let json = body
        .find('{')
        .and_then(|a| body.rfind('}').map(|b| &body[a..=b]))
        .unwrap_or("null");
    (
        status,
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn serves_an_sd_turbo_folder_too() {
    // The second family through the same server: defaults follow the model (512², 1 step, CFG 1).
    let out = temp_dir("sd");
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd-turbo");
    let s = Server::start_model(&out, model, &[], &[]);
    let (st, info) = get_json(&s.url("/api/info"));
    assert_eq!(st, 200);
    assert_eq!(info["model"]["family"], "sd-turbo");
    assert_eq!(
        info["model"]["defaults"],
        json!({"width": 512, "height": 512, "steps": 1, "cfg": 1.0})
    );
    assert_eq!(info["model"]["size_multiple"], 8);
    let id = submit(
        &s,
        json!({"prompt": "a serene mountain lake at dawn", "width": 136, "height": 96, "steps": 2}),
    );
    let rec = wait_terminal(&s, &id, Duration::from_secs(120));
    assert_eq!(rec["state"], "done", "{rec}");
    let url = rec["images"][0].as_str().unwrap();
    let bytes = client().get(s.url(url)).send().unwrap().bytes().unwrap();
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (136, 96));
}

#[test]
fn history_pages_search_delete_and_cancel_all() {
    let out = temp_dir("history");
    let s = Server::start(&out, &[], &[]);
    let prompts = [
        "a red fox",
        "a blue lake",
        "a red barn",
        "a green hill",
        "a red kite",
    ];
    let ids: Vec<String> = prompts
        .iter()
        .map(|p| {
            submit(
                &s,
                json!({"prompt": p, "width": 64, "height": 64, "steps": 1, "enhance": false}),
            )
        })
        .collect();
    for id in &ids {
        assert_eq!(
            wait_terminal(&s, id, Duration::from_secs(60))["state"],
            "done"
        );
    }
    // Pages of two, newest first; `next_before` walks to the end.
    let mut seen = Vec::new();
    let mut url = s.url("/api/history?limit=2");
    loop {
        let (st, page) = get_json(&url);
        assert_eq!(st, 200, "{page}");
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 2);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()));
        match page["next_before"].as_u64() {
            Some(b) => url = s.url(&format!("/api/history?limit=2&before={b}")),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    // Search: case-insensitive text in the prompt.
    let (_, page) = get_json(&s.url("/api/history?q=RED"));
    let found: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["params"]["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(found, vec!["a red kite", "a red barn", "a red fox"]);
    assert!(page["next_before"].is_null());
    for bad in ["limit=0", "limit=101", "limit=x", "colour=red"] {
        let (st, err) = get_json(&s.url(&format!("/api/history?{bad}")));
        assert_eq!(st, 422, "{bad}: {err}");
        assert!(err["error"]["message"].is_string());
    }

    // Delete: the record, its images, its sidecar and its journal entry go; a second delete is 404.
    let victim = &ids[1];
    let (st, _) = delete(&s.url(&format!("/api/history/{victim}")));
    assert_eq!(st, 204);
    assert!(!out.join(format!("{victim}-1.png")).exists());
    assert!(!out.join(format!("{victim}.json")).exists());
    assert!(!out.join(".jobs").join(format!("{victim}.json")).exists());
    let (st, _) = get_json(&s.url(&format!("/api/jobs/{victim}")));
    assert_eq!(st, 404);
    let (st, _) = delete(&s.url(&format!("/api/history/{victim}")));
    assert_eq!(st, 404);
    let (_, page) = get_json(&s.url("/api/history?q=lake"));
    assert_eq!(page["jobs"], json!([]));
    drop(s);

    // A restart does not bring it back; cancel-all empties the queue but leaves the running job.
    let s = Server::start(&out, &[], &[SLOW]);
    let (_, page) = get_json(&s.url("/api/history?limit=100"));
    assert_eq!(page["jobs"].as_array().unwrap().len(), 4);
    let body = json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 8});
    let queued: Vec<String> = (0..4).map(|_| submit(&s, body.clone())).collect();
    let mut ev = SseReader::open(&s.url(&format!("/api/jobs/{}/events", queued[0])));
    assert!(ev.any(|e| e.name == "progress"));
    let (st, err) = delete(&s.url("/api/jobs"));
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["error"]["field"], "state");
    let (st, out_) = delete(&s.url("/api/jobs?state=queued"));
    assert_eq!(st, 200, "{out_}");
    let mut cancelled: Vec<String> = out_["cancelled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    cancelled.sort();
    let mut expected = queued[1..].to_vec();
    expected.sort();
    assert_eq!(cancelled, expected);
    for id in &queued[1..] {
        let (_, j) = get_json(&s.url(&format!("/api/jobs/{id}")));
        assert_eq!(j["state"], "cancelled");
    }
    let (_, j) = get_json(&s.url(&format!("/api/jobs/{}", queued[0])));
    assert_eq!(j["state"], "running");
    // Deleting a job that has not finished is refused.
    let (st, err) = delete(&s.url(&format!("/api/history/{}", queued[0])));
    assert_eq!(st, 409, "{err}");
}

/// Each step's preview: a PNG data URL of the denoised estimate, one pixel per latent cell.
fn preview_size(event: &SseEvent) -> (u32, u32) {
    use base64::Engine as _;
    let url = event.data["image"].as_str().unwrap();
    let b64 = url
        .strip_prefix("data:image/png;base64,")
        .unwrap_or_else(|| panic!("not a PNG data URL: {url:.60}"));
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    (img.width(), img.height())
}

#[test]
fn live_previews_reach_the_stream_unless_turned_off() {
    let out = temp_dir("preview");
    let s = Server::start(&out, &[], &[SLOW]);
    let (_, info) = get_json(&s.url("/api/info"));
    assert_eq!(info["preview"], true);
    let body = json!({"prompt": "a lake", "width": 128, "height": 96, "steps": 3, "batch": 2});
    let id = submit(&s, body.clone());
    // Two streams on the same job: one with previews, one that asked for none.
    let quiet = SseReader::open(&s.url(&format!("/api/jobs/{id}/events?preview=0")));
    let events = job_events(&s, &id);
    let previews: Vec<&SseEvent> = events.iter().filter(|e| e.name == "preview").collect();
    let steps: Vec<u64> = previews
        .iter()
        .map(|e| e.data["step"].as_u64().unwrap())
        .collect();
    assert!(
        !steps.is_empty() && steps.windows(2).all(|w| w[0] < w[1]),
        "{steps:?}"
    );
    assert_eq!(steps.last(), Some(&3));
    for p in &previews {
        // 128×96 px at 8 px per latent cell (the batch's first image only).
        assert_eq!(preview_size(p), (16, 12));
    }
    let quiet: Vec<SseEvent> = quiet.collect();
    assert!(quiet.iter().all(|e| e.name != "preview"), "?preview=0");
    assert_eq!(quiet.last().unwrap().name, "done");
    drop(s);

    // Server-wide off: no previews on any stream, and /api/info says so.
    let s = Server::start(&out, &["--preview", "off"], &[]);
    let (_, info) = get_json(&s.url("/api/info"));
    assert_eq!(info["preview"], false);
    let id = submit(&s, body);
    let events = job_events(&s, &id);
    assert!(events.iter().all(|e| e.name != "preview"));
    assert_eq!(events.last().unwrap().name, "done");
}

/// Reads `/api/events` until a `model` event in `state` for `name`; returns it.
fn wait_model_event(ev: &mut SseReader, state: &str, name: &str) -> Value {
    ev.find(|e| e.name == "model" && e.data["state"] == state && e.data["name"] == name)
        .unwrap_or_else(|| panic!("no `model {state}` event for {name}"))
        .data
}

#[test]
fn models_switch_between_jobs_from_the_api_a_job_and_a1111() {
    let out = temp_dir("switch");
    let models = tiny_models_dir("switch-models", true);
    let s = Server::start_in(&out, &models, "tiny-z-image", &[], &[]);
    let (_, health) = get_json(&s.url("/api/health"));
    assert_eq!(health["model"], "tiny-z-image");
    let mut events = SseReader::open(&s.url("/api/events"));
    let first = events.next().unwrap();
    assert_eq!(
        (
            first.name.as_str(),
            &first.data["state"],
            &first.data["name"]
        ),
        ("model", &json!("loaded"), &json!("tiny-z-image"))
    );

    // 1. From the page's call: idle, so the worker loads it at once.
    let (st, _, sel) = post_json(&s.url("/api/model"), &json!({"name": "tiny-sd-turbo"}));
    assert_eq!(st, 202, "{sel}");
    assert_eq!(sel["state"], "switching");
    wait_model_event(&mut events, "loading", "tiny-sd-turbo");
    let loaded = wait_model_event(&mut events, "loaded", "tiny-sd-turbo");
    assert_eq!(loaded["family"], "sd-turbo");
    let (_, info) = get_json(&s.url("/api/info"));
    assert_eq!(info["model"]["name"], "tiny-sd-turbo");
    assert_eq!(info["model"]["family"], "sd-turbo");
    assert_eq!(info["model"]["size_multiple"], 8);
    let (_, health) = get_json(&s.url("/api/health"));
    assert_eq!(health["model"], "tiny-sd-turbo");
    // Validation follows the loaded model: 72 is a multiple of SD's 8 (not of Z-Image's 16).
    let id = submit(
        &s,
        json!({"prompt": "a lake", "width": 72, "height": 64, "steps": 1}),
    );
    let job = wait_terminal(&s, &id, Duration::from_secs(120));
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["params"]["model"], "tiny-sd-turbo");

    // 2. A job that names another model: the worker switches before it and says so on its stream.
    let id = submit(
        &s,
        json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 1, "model": "tiny-z-image"}),
    );
    let loading = wait_model_event(&mut events, "loading", "tiny-z-image");
    assert_eq!(loading["job"], json!(id));
    assert_eq!(
        wait_model_event(&mut events, "loaded", "tiny-z-image")["job"],
        json!(id)
    );
    let job = wait_terminal(&s, &id, Duration::from_secs(120));
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["params"]["model"], "tiny-z-image");
    let switch = job["notices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "model_switch")
        .expect("the job says the worker switched models for it");
    assert!(switch["message"].as_str().unwrap().contains("tiny-z-image"));
    // Its limits were Z-Image's: 72 is refused for it, naming the field.
    let (st, _, err) = post_json(
        &s.url("/api/jobs"),
        &json!({"prompt": "x", "width": 72, "model": "tiny-z-image"}),
    );
    assert_eq!(
        (st.as_u16(), &err["error"]["field"]),
        (422, &json!("width"))
    );
    let (st, _, err) = post_json(
        &s.url("/api/jobs"),
        &json!({"prompt": "x", "model": "no-such-model"}),
    );
    assert_eq!(
        (st.as_u16(), &err["error"]["field"]),
        (422, &json!("model")),
        "{err}"
    );

    // 3. A1111: the options call answers once the model is loaded, and GET reports it.
    let (st, _, _) = post_json(
        &s.url("/sdapi/v1/options"),
        &json!({"sd_model_checkpoint": "tiny-sd-turbo [no hash]"}),
    );
    assert_eq!(st, 200);
    let (_, opts) = get_json(&s.url("/sdapi/v1/options"));
    assert_eq!(opts["sd_model_checkpoint"], "tiny-sd-turbo");
    let (_, info) = get_json(&s.url("/api/info"));
    assert_eq!(info["model"]["name"], "tiny-sd-turbo");
    let (_, list) = get_json(&s.url("/sdapi/v1/sd-models"));
    let titles: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    for t in ["demo", "tiny-z-image", "tiny-sd-turbo", "broken-sd-turbo"] {
        assert!(titles.contains(&t), "{titles:?}");
    }

    // 4. A model that does not load: the error names the file, the previous model comes back.
    let (st, _, _) = post_json(&s.url("/api/model"), &json!({"name": "broken-sd-turbo"}));
    assert_eq!(st, 202);
    let failed = wait_model_event(&mut events, "failed", "broken-sd-turbo");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("diffusion_pytorch_model.safetensors"),
        "the error names the file: {error}"
    );
    wait_model_event(&mut events, "loaded", "tiny-sd-turbo");
    let (_, info) = get_json(&s.url("/api/info"));
    assert_eq!(info["model"]["name"], "tiny-sd-turbo");
    let (_, opts) = get_json(&s.url("/sdapi/v1/options"));
    assert_eq!(opts["sd_model_checkpoint"], "tiny-sd-turbo", "not retried");
    let (st, _, err) = post_json(
        &s.url("/sdapi/v1/options"),
        &json!({"sd_model_checkpoint": "broken-sd-turbo"}),
    );
    // A checkpoint that does not load is the client's value: 422 naming the field and the file.
    assert_eq!(st, 422, "{err}");
    assert_eq!(
        err["detail"][0]["loc"],
        json!(["body", "sd_model_checkpoint"]),
        "{err}"
    );
    assert!(
        err["detail"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("safetensors"),
        "{err}"
    );
    let (st, _, err) = post_json(&s.url("/api/model"), &json!({"name": "nope"}));
    assert_eq!((st.as_u16(), &err["error"]["field"]), (422, &json!("name")));
    // Still serving.
    let id = submit(
        &s,
        json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 1}),
    );
    assert_eq!(
        wait_terminal(&s, &id, Duration::from_secs(120))["state"],
        "done"
    );
}
