//! End-to-end tests of the ecosystem surfaces of `zturbo serve` with the demo model: the OpenAI
//! Images API, the AUTOMATIC1111 API, PNG parameters, `/openapi.json`, the local-server security
//! (loopback Host check, cross-origin refusal, API key off loopback) and UI-started model
//! downloads against an unreachable hub and a fake one (progress, resume after interruption).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use support::*;

const SLOW: (&str, &str) = ("ZTURBO_TEST_WORKER_DELAY_MS", "300");

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn png_parameters(png: &[u8]) -> String {
    let chunks = zturbo::engine::output::png_text_chunks(png).expect("a PNG");
    chunks
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v)
        .expect("a parameters chunk")
}

/// A request with extra headers; returns status and the JSON body.
fn send(req: reqwest::blocking::RequestBuilder) -> (u16, Value) {
    let res = req.send().unwrap();
    let status = res.status().as_u16();
    let text = res.text().unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {text:.300}"));
    (status, json)
}

#[test]
fn openai_images_api() {
    let out = temp_dir("openai");
    let s = Server::start(&out, &[], &[]);
    let gen = s.url("/v1/images/generations");

    // b64_json, two images, an official model alias, quality → steps.
    let (st, _, r) = post_json(
        &gen,
        &json!({"model": "dall-e-3", "prompt": "a red fox in the snow", "n": 2, "size": "64x64",
                "quality": "low", "style": "vivid", "user": "tester", "response_format": "b64_json"}),
    );
    assert_eq!(st, 200, "{r}");
    assert!(r["created"].as_u64().unwrap() > 1_600_000_000);
    let data = r["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for d in data {
        let revised = d["revised_prompt"].as_str().unwrap();
        assert!(
            revised.starts_with("a red fox in the snow, ") && revised.len() > 30,
            "the enhanced prompt: {revised}"
        );
        assert!(d.get("url").is_none());
        let png = b64(d["b64_json"].as_str().unwrap());
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
        let params = png_parameters(&png);
        // quality "low" = half the demo's 8 steps.
        assert!(
            params.contains("Steps: 4,") && params.contains("Size: 64x64"),
            "{params}"
        );
    }

    // url: absolute, fetchable; the model's own name; `auto` size = the model's default.
    let (st, _, r) = post_json(
        &gen,
        &json!({"model": "demo", "prompt": "a lighthouse", "size": "256x256", "response_format": "url"}),
    );
    assert_eq!(st, 200, "{r}");
    let url = r["data"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{}/images/", s.url)) && url.ends_with(".png"),
        "{url}"
    );
    let png = client().get(url).send().unwrap();
    assert_eq!(png.status(), 200);
    let img = image::load_from_memory(&png.bytes().unwrap()).unwrap();
    assert_eq!((img.width(), img.height()), (256, 256));

    // The jobs went through the one queue: the UI lists them.
    let (_, list) = get_json(&s.url("/api/jobs"));
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2);

    // Errors: OpenAI's shape, 400, `param` naming the field.
    let cases = [
        (json!({"prompt": "x", "size": "100x100"}), "size"),
        (json!({"prompt": "x", "size": "huge"}), "size"),
        (json!({"prompt": "x", "size": "4096x4096"}), "size"),
        (
            json!({"prompt": "x", "model": "stable-diffusion-xl"}),
            "model",
        ),
        (json!({"prompt": "x", "n": 99}), "n"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "quality": "ultra"}), "quality"),
        (
            json!({"prompt": "x", "response_format": "jpeg"}),
            "response_format",
        ),
        (
            json!({"prompt": "x", "output_format": "webp"}),
            "output_format",
        ),
        (json!({"prompt": "x", "stream": true}), "stream"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": "   "}), "prompt"),
        (json!({"n": 1}), "prompt"),
        (json!({"prompt": "x", "n": "two"}), "n"),
    ];
    for (body, param) in cases {
        let (st, _, e) = post_json(&gen, &body);
        assert_eq!(st, 400, "{body}: {e}");
        let err = &e["error"];
        assert_eq!(err["param"], param, "{body}: {e}");
        assert_eq!(err["type"], "invalid_request_error", "{e}");
        assert!(err["message"].as_str().unwrap().len() > 5, "{e}");
        assert!(err.get("code").is_some(), "{e}");
    }
    let (st, _, e) = post_raw(&gen, "application/json", b"{\"prompt\": ".to_vec());
    assert_eq!(st, 400);
    assert!(e["error"]["message"].is_string() && e["error"]["param"].is_null());
    let (st, _, e) = post_raw(&gen, "text/plain", b"{}".to_vec());
    assert_eq!(st, 415);
    assert_eq!(e["error"]["type"], "invalid_request_error");

    // Models.
    let (st, m) = get_json(&s.url("/v1/models"));
    assert_eq!(st, 200);
    assert_eq!(m["object"], "list");
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["demo", "dall-e-2", "dall-e-3", "gpt-image-1"]);
    assert_eq!(m["data"][0]["object"], "model");
    let (st, m) = get_json(&s.url("/v1/models/dall-e-3"));
    assert_eq!((st.as_u16(), m["id"].as_str()), (200, Some("dall-e-3")));
    let (st, e) = get_json(&s.url("/v1/models/nope"));
    assert_eq!(st, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    let (st, e) = get_json(&s.url("/v1/nope"));
    assert_eq!(st, 404);
    assert!(
        e["error"]["type"].is_string(),
        "OpenAI shape under /v1: {e}"
    );
}

#[test]
fn openai_failures_and_disconnects() {
    // Every denoiser call fails: the job fails, and the call answers 500 in OpenAI's shape.
    let out = temp_dir("openai-fail");
    let s = Server::start(
        &out,
        &[],
        &[("ZTURBO_FAULT", "denoiser-nan@step=1,attempts=all")],
    );
    let (st, _, e) = post_json(
        &s.url("/v1/images/generations"),
        &json!({"prompt": "a lake", "size": "64x64", "response_format": "b64_json"}),
    );
    assert_eq!(st, 500, "{e}");
    assert_eq!(e["error"]["type"], "server_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("image generation failed: "),
        "{e}"
    );
    drop(s);

    // A client that gives up does not cancel the job: it stays journaled and finishes.
    let out = temp_dir("openai-leave");
    let s = Server::start(&out, &[], &[SLOW]);
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap();
    let gone = quick
        .post(s.url("/v1/images/generations"))
        .json(&json!({"prompt": "a lake", "size": "64x64", "quality": "low"}))
        .send();
    assert!(
        gone.is_err(),
        "the call should outlast the client's timeout"
    );
    let (_, list) = get_json(&s.url("/api/jobs"));
    let id = list["jobs"][0]["id"].as_str().unwrap().to_string();
    let job = wait_terminal(&s, &id, Duration::from_secs(60));
    assert_eq!(job["state"], "done", "{job}");
    assert!(out.join(format!("{id}-1.png")).is_file());
}

/// What `webuiapi`'s `txt2img` sends (defaults included), with the test's values.
fn webuiapi_payload(overrides: Value) -> Value {
    // Parsed from text: a literal this long exceeds `json!`'s recursion limit.
    let mut p: Value = serde_json::from_str(
        r#"{
        "enable_hr": false, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0,
        "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": null, "hr_sampler_name": null,
        "hr_scheduler": null, "hr_prompt": "", "hr_negative_prompt": "", "denoising_strength": 0.7,
        "firstphase_width": 0, "firstphase_height": 0, "prompt": "", "styles": [], "seed": -1,
        "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
        "batch_size": 1, "n_iter": 1, "steps": 20, "cfg_scale": 7.0, "width": 512, "height": 512,
        "restore_faces": false, "tiling": false, "do_not_save_samples": false,
        "do_not_save_grid": false, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0,
        "s_tmin": 0, "s_noise": 1, "override_settings": {},
        "override_settings_restore_afterwards": true, "sampler_name": "Euler a",
        "scheduler": "automatic", "sampler_index": "Euler a", "script_name": null,
        "script_args": [], "send_images": true, "save_images": false, "alwayson_scripts": {}
    }"#,
    )
    .unwrap();
    for (k, v) in overrides.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

#[test]
fn a1111_api() {
    let out = temp_dir("a1111");
    let s = Server::start(&out, &[], &[]);
    let t2i = s.url("/sdapi/v1/txt2img");

    let (st, _, r) = post_json(
        &t2i,
        &webuiapi_payload(
            json!({"prompt": "a lighthouse at dusk", "negative_prompt": "blurry",
            "seed": 42, "batch_size": 2, "n_iter": 2, "steps": 2, "width": 64, "height": 80}),
        ),
    );
    assert_eq!(st, 200, "{r}");
    let images = r["images"].as_array().unwrap();
    assert_eq!(images.len(), 4, "n_iter × batch_size");
    // `info` is a JSON string, as A1111 returns it.
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([42, 43, 44, 45]));
    assert_eq!(info["seed"], 42);
    // Prompts go to the model as given.
    assert_eq!(info["prompt"], "a lighthouse at dusk");
    assert_eq!(info["all_prompts"].as_array().unwrap().len(), 4);
    assert_eq!(info["negative_prompt"], "blurry");
    assert_eq!(
        (info["width"].as_u64(), info["height"].as_u64()),
        (Some(64), Some(80))
    );
    assert_eq!(info["steps"], 2);
    assert_eq!(
        info["cfg_scale"], 2.4,
        "CFG 7 is clamped to the model's safe maximum"
    );
    assert_eq!(info["sd_model_name"], "demo");
    assert_eq!(info["job_timestamp"].as_str().unwrap().len(), 14);
    let infotexts = info["infotexts"].as_array().unwrap();
    assert_eq!(infotexts.len(), 4);
    for (i, img) in images.iter().enumerate() {
        let png = b64(img.as_str().unwrap());
        let decoded = image::load_from_memory(&png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (64, 80));
        let text = png_parameters(&png);
        assert_eq!(text, infotexts[i].as_str().unwrap());
        let p = zturbo::engine::output::parse_parameters(&text);
        assert_eq!(p.seed, Some(42 + i as u64));
        assert_eq!(p.prompt, "a lighthouse at dusk");
        assert_eq!(p.negative_prompt.as_deref(), Some("blurry"));
        assert!(text.contains("CFG requested: 7"), "{text}");
    }
    // `parameters` echoes the request, extra fields included.
    assert_eq!(r["parameters"]["seed"], 42);
    assert_eq!(r["parameters"]["sampler_name"], "Euler a");
    assert_eq!(r["parameters"]["cfg_scale"], 7.0);
    assert_eq!(r["parameters"]["alwayson_scripts"], json!({}));

    // seed -1: random; missing fields take the model's defaults.
    let (st, _, r) = post_json(
        &t2i,
        &json!({"prompt": "a lake", "seed": -1, "width": 64, "height": 64, "steps": 1}),
    );
    assert_eq!(st, 200, "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert!(info["seed"].as_u64().is_some(), "{info}");
    assert_eq!(r["parameters"]["seed"], -1);
    assert_eq!(r["parameters"]["batch_size"], 1);

    // Wrong types and our own validation: FastAPI's 422 shape naming the field.
    let cases = [
        (
            json!({"prompt": "x", "steps": "many"}),
            "steps",
            "type_error.integer",
        ),
        (
            json!({"prompt": "x", "width": 64.5}),
            "width",
            "type_error.integer",
        ),
        (
            json!({"prompt": "x", "cfg_scale": "high"}),
            "cfg_scale",
            "type_error.float",
        ),
        (json!({"prompt": 3}), "prompt", "type_error.str"),
        (json!({"prompt": "x", "width": 100}), "width", "value_error"),
        (json!({"prompt": "x", "steps": 0}), "steps", "value_error"),
        (
            json!({"prompt": "x", "height": -64}),
            "height",
            "value_error",
        ),
        (json!({"prompt": "x", "n_iter": 0}), "n_iter", "value_error"),
        (
            json!({"prompt": "x", "batch_size": 99}),
            "batch_size",
            "value_error",
        ),
        (
            json!({"prompt": "x", "cfg_scale": 99}),
            "cfg_scale",
            "value_error",
        ),
        (json!({"prompt": ""}), "prompt", "value_error"),
    ];
    for (body, field, kind) in cases {
        let (st, _, e) = post_json(&t2i, &body);
        assert_eq!(st, 422, "{body}: {e}");
        let d = &e["detail"][0];
        assert_eq!(d["loc"], json!(["body", field]), "{body}: {e}");
        assert_eq!(d["type"], kind, "{body}: {e}");
        assert!(d["msg"].as_str().unwrap().len() > 3, "{e}");
    }
    let (st, _, e) = post_raw(&t2i, "application/json", b"{\"prompt\"".to_vec());
    assert_eq!(st, 422);
    assert_eq!(e["detail"][0]["type"], "value_error.jsondecode");
    let (st, _, e) = post_raw(&t2i, "application/json", b"[1]".to_vec());
    assert_eq!(st, 422, "{e}");
    let (st, e) = get_json(&s.url("/sdapi/v1/extra-single-image"));
    assert_eq!(st, 404);
    assert!(e["detail"].is_string(), "{e}");

    // The lists clients read.
    let (st, m) = get_json(&s.url("/sdapi/v1/sd-models"));
    assert_eq!(st, 200);
    assert_eq!(m[0]["title"], "demo");
    assert_eq!(m[0]["model_name"], "demo");
    for k in ["hash", "sha256", "filename", "config"] {
        assert!(m[0].get(k).is_some(), "{k}");
    }
    let (st, o) = get_json(&s.url("/sdapi/v1/options"));
    assert_eq!(st, 200);
    assert_eq!(o["sd_model_checkpoint"], m[0]["title"]);
    // A checkpoint not on this machine is refused naming the field (switching itself is
    // server_http's models_switch_between_jobs_from_the_api_a_job_and_a1111).
    let (st, _, r) = post_json(
        &s.url("/sdapi/v1/options"),
        &json!({"sd_model_checkpoint": "other.safetensors", "CLIP_stop_at_last_layers": 2}),
    );
    assert_eq!(st.as_u16(), 422, "{r}");
    assert_eq!(
        r["detail"][0]["loc"],
        json!(["body", "sd_model_checkpoint"]),
        "{r}"
    );
    assert_eq!(r["detail"][0]["type"], "value_error", "{r}");
    // The loaded one (title as listed) and other options: accepted, nothing changes.
    let (st, _, r) = post_json(
        &s.url("/sdapi/v1/options"),
        &json!({"sd_model_checkpoint": "demo", "CLIP_stop_at_last_layers": 2}),
    );
    assert_eq!((st.as_u16(), r), (200, Value::Null));
    let (_, o) = get_json(&s.url("/sdapi/v1/options"));
    assert_eq!(
        o["sd_model_checkpoint"], "demo",
        "other options are ignored"
    );
    let (st, sm) = get_json(&s.url("/sdapi/v1/samplers"));
    assert_eq!(st, 200);
    assert_eq!(sm[0]["name"], "Euler (flow)");
    assert_eq!(get_json(&s.url("/sdapi/v1/schedulers")).0, 200);
    let (st, sc) = get_json(&s.url("/sdapi/v1/scripts"));
    assert_eq!(
        (st.as_u16(), sc),
        (200, json!({"txt2img": [], "img2img": []}))
    );

    // Idle progress.
    let (st, p) = get_json(&s.url("/sdapi/v1/progress"));
    assert_eq!(st, 200);
    assert_eq!(p["progress"], 0.0);
    assert_eq!(p["state"]["job_count"], 0);
    assert!(p["current_image"].is_null());
}

#[test]
fn a1111_progress_and_interrupt() {
    let out = temp_dir("a1111-progress");
    let s = Server::start(&out, &[], &[SLOW]);
    let url = s.url("/sdapi/v1/txt2img");
    let call = std::thread::spawn(move || {
        post_json(
            &url,
            &json!({"prompt": "a lake", "width": 64, "height": 64, "steps": 30, "n_iter": 2}),
        )
    });
    // Progress moves while the first of the two jobs runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    let p = loop {
        let (_, p) = get_json(&s.url("/sdapi/v1/progress"));
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 2 {
            break p;
        }
        assert!(Instant::now() < deadline, "no progress: {p}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let progress = p["progress"].as_f64().unwrap();
    assert!(progress > 0.0 && progress < 1.0, "{p}");
    assert_eq!(p["state"]["sampling_steps"], 30);
    assert_eq!(p["state"]["job_count"], 2, "{p}");
    assert!(p["eta_relative"].as_f64().unwrap() > 0.0, "{p}");
    assert_eq!(p["state"]["interrupted"], false);

    let (st, _, r) = post_json(&s.url("/sdapi/v1/interrupt"), &json!({}));
    assert_eq!((st.as_u16(), r), (200, json!({})));
    // The call ends early, with the images made so far (none), and its other job is dropped.
    let (st, _, r) = call.join().unwrap();
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["images"], json!([]));
    // Both jobs end cancelled (the second may have started before the call stopped it).
    let (_, list) = get_json(&s.url("/api/jobs"));
    let ids: Vec<String> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        let job = wait_terminal(&s, id, Duration::from_secs(30));
        assert_eq!(job["state"], "cancelled", "{job}");
    }
    let (_, p) = get_json(&s.url("/sdapi/v1/progress"));
    assert_eq!(p["state"]["job_count"], 0, "{p}");
}

#[test]
fn png_parameters_parse_back_into_the_request() {
    let out = temp_dir("pnginfo");
    let s = Server::start(&out, &[], &[]);
    let id = submit(
        &s,
        json!({"prompt": "a quiet harbour, morning fog", "negative_prompt": "people, text",
               "width": 96, "height": 64, "steps": 3, "cfg": 1.8, "seed": 1234, "enhance": false}),
    );
    let job = wait_terminal(&s, &id, Duration::from_secs(60));
    assert_eq!(job["state"], "done", "{job}");
    let png = client()
        .get(s.url(job["images"][0].as_str().unwrap()))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let chunks = zturbo::engine::output::png_text_chunks(&png).unwrap();
    let text = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    let p = zturbo::engine::output::parse_parameters(text);
    assert_eq!(p.prompt, "a quiet harbour, morning fog");
    assert_eq!(p.negative_prompt.as_deref(), Some("people, text"));
    assert_eq!(
        (p.width, p.height, p.steps, p.seed),
        (Some(96), Some(64), Some(3), Some(1234))
    );
    assert_eq!(p.cfg, Some(1.8));
    assert_eq!(p.model.as_deref(), Some("demo"));
    assert!(
        text.contains("Sampler: Euler (flow)") && text.contains("Version: zturbo"),
        "{text}"
    );
    // The `zturbo` chunk is the full record: its params are the job's.
    let record: Value =
        serde_json::from_str(&chunks.iter().find(|(k, _)| k == "zturbo").unwrap().1).unwrap();
    assert_eq!(record["params"], job["params"]);
    assert_eq!(record["job_id"], id.as_str());
    // Submitting the parsed parameters again makes the same image.
    let again = submit(
        &s,
        json!({"prompt": p.prompt, "negative_prompt": p.negative_prompt, "width": p.width,
               "height": p.height, "steps": p.steps, "cfg": p.cfg, "seed": p.seed, "enhance": false}),
    );
    let job2 = wait_terminal(&s, &again, Duration::from_secs(60));
    let png2 = std::fs::read(out.join(format!("{again}-1.png"))).unwrap();
    let a = image::load_from_memory(&png).unwrap().to_rgb8();
    let b = image::load_from_memory(&png2).unwrap().to_rgb8();
    assert_eq!(job2["params"]["seed"], 1234);
    assert!(a.as_raw() == b.as_raw(), "same parameters, same pixels");
}

#[test]
fn openapi_describes_the_live_routes() {
    let out = temp_dir("openapi");
    let s = Server::start(&out, &[], &[]);
    let (st, doc) = get_json(&s.url("/openapi.json"));
    assert_eq!(st, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/images/generations",
        "/sdapi/v1/txt2img",
        "/api/jobs",
        "/api/models/{name}/pull",
    ] {
        assert!(paths.contains_key(p), "{p}");
    }
    // Every documented GET without parameters answers 200 (event streams excepted).
    for (path, item) in paths {
        let Some(get) = item.get("get") else { continue };
        let sse = get["responses"]["200"]["content"]
            .get("text/event-stream")
            .is_some();
        if path.contains('{') || sse {
            continue;
        }
        let res = client().get(s.url(path)).send().unwrap();
        assert_eq!(res.status(), 200, "GET {path}");
    }
}

/// Status and JSON body of a request on a raw socket (headers exactly as given).
fn raw_request(base: &str, head: &str, body: &str) -> (u16, Value) {
    let addr = base.trim_start_matches("http://");
    let mut sock = TcpStream::connect(addr).unwrap();
    write!(
        sock,
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    sock.read_to_string(&mut raw).unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let text = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    let json = text
        .find('{')
        .and_then(|a| text.rfind('}').map(|b| &text[a..=b]))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

#[test]
fn loopback_server_refuses_rebinding_and_cross_origin_posts() {
    let out = temp_dir("origin");
    let s = Server::start(&out, &[], &[]);
    let addr = s.url.trim_start_matches("http://").to_string();
    let body = r#"{"prompt":"a lake","width":64,"height":64,"steps":1}"#;

    // DNS rebinding: the attacker's name in Host.
    let port = addr.rsplit(':').next().unwrap();
    let (st, e) = raw_request(
        &s.url,
        &format!("GET /api/jobs HTTP/1.1\r\nHost: rebind.evil.example:{port}"),
        "",
    );
    assert_eq!(st, 403, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("loopback"));

    // A cross-site form post (text/plain needs no preflight) and a cross-origin fetch.
    for (origin, ct) in [
        ("https://evil.example", "text/plain"),
        ("http://localhost:1", "application/json"),
        ("null", "application/json"),
    ] {
        let (st, e) = raw_request(
            &s.url,
            &format!(
                "POST /api/jobs HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\nContent-Type: {ct}"
            ),
            body,
        );
        assert_eq!(st, 403, "{origin}: {e}");
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cross-origin"));
    }
    let (st, e) = raw_request(
        &s.url,
        &format!("POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://evil.example\r\nContent-Type: application/json"),
        r#"{"prompt":"x"}"#,
    );
    assert_eq!(st, 403);
    assert!(e["error"]["type"].is_string(), "OpenAI shape: {e}");
    let (st, e) = raw_request(
        &s.url,
        &format!(
            "POST /sdapi/v1/interrupt HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://evil.example"
        ),
        "",
    );
    assert_eq!(st, 403);
    assert!(e["detail"].is_string(), "A1111 shape: {e}");
    let (_, list) = get_json(&s.url("/api/jobs"));
    assert_eq!(list["jobs"], json!([]), "nothing was queued");

    // The page's own origin is fine, under either loopback name.
    for origin in [format!("http://{addr}"), format!("http://localhost:{port}")] {
        let (st, e) = raw_request(
            &s.url,
            &format!("POST /api/jobs HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\nContent-Type: application/json"),
            body,
        );
        assert_eq!(st, 202, "{origin}: {e}");
    }
    // No CORS headers by default.
    let res = client()
        .get(s.url("/api/health"))
        .header("origin", "https://evil.example")
        .send()
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn off_loopback_an_api_key_is_required() {
    let out = temp_dir("auth");
    // Refused at start without a key.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args([
            "serve",
            "--model",
            "demo",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--outputs",
        ])
        .arg(out.join("refused"))
        .env_remove("ZTURBO_API_KEY")
        .env_remove("ZTURBO_INSECURE_NO_AUTH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(!String::from_utf8_lossy(&run.stdout).contains("listening"));
    assert!(
        stderr.contains("--api-key") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // With a key (from the environment): every API call needs it, the page does not.
    let s = Server::start_on(
        &out.join("keyed"),
        "0.0.0.0",
        &[],
        &[("ZTURBO_API_KEY", "k-123456")],
    );
    let c = client();
    let (st, e) = send(c.get(s.url("/api/jobs")));
    assert_eq!(st, 401, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("API key"));
    let (st, e) = send(c.get(s.url("/v1/models")));
    assert_eq!(st, 401);
    assert_eq!(e["error"]["code"], "invalid_api_key");
    let (st, e) = send(c.get(s.url("/sdapi/v1/sd-models")));
    assert_eq!(st, 401);
    assert!(e["detail"].is_string());
    let (st, _) = send(c.get(s.url("/v1/models")).bearer_auth("wrong"));
    assert_eq!(st, 401);
    assert_eq!(c.get(s.url("/")).send().unwrap().status(), 200);
    // Off loopback any Host is fine (there is no name to pin), with the key.
    let (st, _) = send(c.get(s.url("/v1/models")).bearer_auth("k-123456"));
    assert_eq!(st, 200);
    let (st, _) = send(
        c.get(s.url("/sdapi/v1/sd-models"))
            .basic_auth("anyone", Some("k-123456")),
    );
    assert_eq!(st, 200);
    // A generation with the key; its signed URL opens without one, other images do not.
    let (st, r) = send(
        c.post(s.url("/v1/images/generations"))
            .bearer_auth("k-123456")
            .json(&json!({"prompt": "a lake", "size": "64x64", "quality": "low", "response_format": "url"})),
    );
    assert_eq!(st, 200, "{r}");
    let url = r["data"][0]["url"].as_str().unwrap();
    assert!(url.contains("?sig="), "{url}");
    assert_eq!(c.get(url).send().unwrap().status(), 200);
    let unsigned = url.split('?').next().unwrap();
    assert_eq!(c.get(unsigned).send().unwrap().status(), 401);
    // The UI's cookie.
    let (st, _) = send(c.get(s.url("/api/auth")));
    assert_eq!(st, 200);
    let res = c
        .post(s.url("/api/auth"))
        .json(&json!({"key": "k-123456"}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 204);
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    let pair = cookie.split(';').next().unwrap();
    let (st, _) = send(c.get(s.url("/api/jobs")).header("cookie", pair));
    assert_eq!(st, 200);
    drop(s);

    // --insecure-no-auth: open on purpose.
    let s = Server::start_on(&out.join("open"), "0.0.0.0", &["--insecure-no-auth"], &[]);
    assert_eq!(get_json(&s.url("/api/health")).0, 200);
}

// ---------------------------------------------------------------------------------------------
// Model downloads

#[test]
fn pull_against_an_unreachable_hub_fails_cleanly() {
    let out = temp_dir("pull-offline");
    let hf_home = out.join("hf");
    // Nothing listens on port 9 of loopback: the connection is refused at once.
    let env = [
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ("HF_HOME", hf_home.to_str().unwrap()),
    ];
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args(["pull", "sd-turbo"])
        .envs(env)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains("cannot reach the Hugging Face hub"),
        "{stderr}"
    );
    assert!(stderr.contains("offline"), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args(["pull", "no-such-model"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("neither a known model"));

    // The same from the UI's API: 202, then a `failed` event with the message.
    let s = Server::start(&out.join("outputs"), &[], &env);
    let (st, _, r) = post_json(&s.url("/api/models/sd-turbo/pull"), &json!(null));
    assert_eq!(st, 202, "{r}");
    assert_eq!(r["events"], "/api/models/sd-turbo/pull/events");
    let events: Vec<SseEvent> =
        SseReader::open(&s.url("/api/models/sd-turbo/pull/events")).collect();
    let last = events.last().expect("an event");
    assert_eq!(last.name, "failed", "{events:?}");
    assert!(
        last.data["error"]
            .as_str()
            .unwrap()
            .contains("cannot reach the Hugging Face hub"),
        "{last:?}"
    );
    // Refusals.
    let (st, _, e) = post_json(&s.url("/api/models/no-such-model/pull"), &json!(null));
    assert_eq!(st, 404, "{e}");
    let (st, _, e) = post_json(&s.url("/api/models/demo/pull"), &json!(null));
    assert_eq!(st, 409, "{e}");
    let (st, e) = get_json(&s.url("/api/models/sdxl-turbo/pull/events"));
    assert_eq!(st, 404, "{e}");
    let (_, m) = get_json(&s.url("/api/models"));
    assert!(m["pull"].is_null());
}

#[test]
fn pull_reports_progress_and_resumes_after_an_interruption() {
    let out = temp_dir("pull-hub");
    let hub = fake_hub(true);
    let hf_home = out.join("hf");
    let env = [
        ("HF_ENDPOINT", hub.url.as_str()),
        ("HF_HOME", hf_home.to_str().unwrap()),
    ];
    let s = Server::start(&out.join("outputs"), &[], &env);
    let events_url = s.url("/api/models/sd-turbo/pull/events");

    // 1. The connection drops halfway through the weights: `failed`.
    let (st, _, _) = post_json(&s.url("/api/models/sd-turbo/pull"), &json!(null));
    assert_eq!(st, 202);
    let events: Vec<SseEvent> = SseReader::open(&events_url).collect();
    assert_eq!(events.last().unwrap().name, "failed", "{events:?}");

    // 2. Again: the download resumes where it stopped, with progress on the way, then `done`.
    let (st, _, _) = post_json(&s.url("/api/models/sd-turbo/pull"), &json!(null));
    assert_eq!(st, 202);
    let events: Vec<SseEvent> = SseReader::open(&events_url).collect();
    let last = events.last().unwrap();
    assert_eq!(last.name, "done", "{events:?}");
    let weights: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e.name == "progress" && e.data["file"] == "unet/diffusion_pytorch_model.safetensors"
        })
        .map(|e| &e.data)
        .collect();
    // The size is known from the hub's answer on (the file's first event may precede it).
    assert!(weights.iter().all(|w| w["count"] == 3 && w["index"] == 2));
    let weights: Vec<&Value> = weights
        .into_iter()
        .filter(|w| !w["total_bytes"].is_null())
        .collect();
    assert!(weights.len() >= 2, "{events:?}");
    for w in &weights {
        assert_eq!(w["total_bytes"], WEIGHTS_LEN as u64, "{w}");
    }
    let bytes: Vec<u64> = weights
        .iter()
        .map(|w| w["bytes"].as_u64().unwrap())
        .collect();
    assert!(bytes.windows(2).all(|b| b[0] <= b[1]), "{bytes:?}");
    assert_eq!(*bytes.last().unwrap(), WEIGHTS_LEN as u64);
    let ranges = hub.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], "bytes=0-");
    let resumed_at: usize = ranges[1]
        .strip_prefix("bytes=")
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap();
    assert!(resumed_at > 0 && resumed_at < WEIGHTS_LEN, "{ranges:?}");
    // The snapshot is complete and byte-exact, and the model list sees it.
    let path = std::path::PathBuf::from(last.data["path"].as_str().unwrap());
    let got = std::fs::read(path.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(got == weights_bytes(), "the resumed file differs");
    let (_, m) = get_json(&s.url("/api/models"));
    let sd = m["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "sd-turbo")
        .unwrap();
    assert_eq!(sd["state"], "on_disk", "{sd}");
}
