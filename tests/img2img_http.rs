//! Image to image, inpainting and LoRAs over HTTP with the demo model (the tiny Z-Image fixture):
//! the job API (`image`, `mask`, `strength`, `loras`), A1111's `POST /sdapi/v1/img2img` and
//! `GET /sdapi/v1/loras`, OpenAI's multipart `POST /v1/images/edits`; a queued image-to-image job
//! survives a restart (its input is stored); every bad input is a 4xx naming the field.
//! Inputs: `tests/fixtures/img2img/input.png` (128×128) and `mask.png` (white = repaint).

mod support;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use support::*;

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/img2img")
        .join(rel)
}

fn b64_file(rel: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(fixture(rel)).unwrap())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn png(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn fetch_png(s: &Server, url: &str) -> image::RgbImage {
    let bytes = client().get(s.url(url)).send().unwrap().bytes().unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// Pixels far from the mask's rectangle (x 24..88, y 40..104) keep the input's values exactly
/// (the paste-back); inside it the model painted something else.
fn assert_pasted_back(out: &image::RgbImage) {
    let input = image::open(fixture("input.png")).unwrap().to_rgb8();
    assert_eq!(out.dimensions(), input.dimensions());
    for (x, y) in [(0, 0), (127, 0), (5, 120), (120, 10), (110, 70)] {
        assert_eq!(out.get_pixel(x, y), input.get_pixel(x, y), "({x}, {y})");
    }
    let changed = (40..104)
        .flat_map(|y| (24..88).map(move |x| (x, y)))
        .filter(|&(x, y)| out.get_pixel(x, y) != input.get_pixel(x, y))
        .count();
    assert!(changed > 1000, "only {changed} pixels changed in the mask");
}

#[test]
fn job_api_img2img_inpainting_and_loras() {
    let out = temp_dir("i2i-jobs");
    let models = temp_dir("i2i-models");
    std::fs::create_dir_all(models.join("loras")).unwrap();
    std::fs::copy(
        fixture("lora_peft.safetensors"),
        models.join("loras/style.safetensors"),
    )
    .unwrap();
    // A kohya LoRA made for SD-Turbo's UNet: its keys match no layer of the Z-Image demo.
    std::fs::copy(
        fixture("sd_lora_kohya.safetensors"),
        models.join("loras/for-sd.safetensors"),
    )
    .unwrap();
    let s = Server::start_with_models(&out, &models, &[], &[]);
    let (st, _, err) = post_json(
        &s.url("/api/jobs"),
        &json!({"prompt": "a lake", "loras": [{"name": "for-sd", "weight": 0.5}]}),
    );
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["error"]["field"], "loras");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("for-sd") && msg.contains("lora_unet_") && msg.contains("matches no layer"),
        "{msg}"
    );

    // Image to image: the job takes the image's size.
    let id = submit(
        &s,
        json!({"prompt": "a lake", "image": b64_file("input.png"), "strength": 0.5, "steps": 4,
               "seed": 3, "enhance": false}),
    );
    let job = wait_terminal(&s, &id, Duration::from_secs(60));
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(
        (
            job["params"]["width"].clone(),
            job["params"]["height"].clone()
        ),
        (json!(128), json!(128))
    );
    assert_eq!(job["params"]["strength"], 0.5);
    let img = fetch_png(&s, job["images"][0].as_str().unwrap());
    assert_eq!(img.dimensions(), (128, 128));
    // The input is stored by content for a restart.
    let stored = std::fs::read_dir(out.join("inputs")).unwrap().count();
    assert_eq!(stored, 1);

    // Inpainting (a data: URL this time) with a LoRA named in the prompt and one in `loras`.
    let id = submit(
        &s,
        json!({"prompt": "a lake <lora:style:0.6>", "image": format!("data:image/png;base64,{}", b64_file("input.png")),
               "mask": b64_file("mask.png"), "steps": 3, "seed": 9, "enhance": false,
               "loras": [{"name": "style", "weight": 0.3}]}),
    );
    let job = wait_terminal(&s, &id, Duration::from_secs(60));
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["params"]["prompt"], "a lake");
    assert_eq!(
        job["params"]["loras"],
        json!([{"name": "style", "weight": 0.3}, {"name": "style", "weight": 0.6}])
    );
    assert_eq!(job["params"]["mask_blur"], 4);
    assert_pasted_back(&fetch_png(&s, job["images"][0].as_str().unwrap()));

    // Only the masked region, at 64×64, pasted back into the 128×128 image.
    let id = submit(
        &s,
        json!({"prompt": "a lake", "image": b64_file("input.png"), "mask": b64_file("mask.png"),
               "width": 64, "height": 64, "steps": 2, "enhance": false, "inpaint_full_res": true,
               "inpaint_full_res_padding": 8, "inpaint_fill": "fill"}),
    );
    let job = wait_terminal(&s, &id, Duration::from_secs(60));
    assert_eq!(job["state"], "done", "{job}");
    assert_pasted_back(&fetch_png(&s, job["images"][0].as_str().unwrap()));

    // The A1111 list of LoRAs.
    let (st, list) = get_json(&s.url("/sdapi/v1/loras"));
    assert_eq!(st, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["for-sd", "style"]);
}

#[test]
fn bad_inputs_are_4xx_naming_the_field() {
    let out = temp_dir("i2i-bad");
    let s = Server::start(&out, &[], &[]);
    let post = |body: Value| post_json(&s.url("/api/jobs"), &body);
    let input = b64_file("input.png");
    let small_mask = b64(&png(&image::DynamicImage::ImageLuma8(
        image::GrayImage::from_pixel(64, 64, image::Luma([255])),
    )));
    let black_mask = b64(&png(&image::DynamicImage::ImageLuma8(
        image::GrayImage::new(128, 128),
    )));
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"prompt": "x", "image": b64(b"just text")}),
            "image",
            "not a PNG, JPEG or WebP",
        ),
        (
            json!({"prompt": "x", "image": "%%%"}),
            "image",
            "not valid base64",
        ),
        (
            json!({"prompt": "x", "image": input, "mask": small_mask}),
            "mask",
            "same size",
        ),
        (
            json!({"prompt": "x", "image": input, "mask": black_mask}),
            "mask",
            "empty",
        ),
        (
            json!({"prompt": "x", "image": input, "strength": 1.5}),
            "strength",
            "between 0 and 1",
        ),
        (
            json!({"prompt": "x", "image": input, "strength": -0.5}),
            "strength",
            "between 0 and 1",
        ),
        (
            json!({"prompt": "x", "strength": 0.5}),
            "strength",
            "needs an input image",
        ),
        (
            json!({"prompt": "x", "mask": small_mask}),
            "mask",
            "needs an input image",
        ),
        (
            json!({"prompt": "x", "loras": [{"name": "nope"}]}),
            "loras",
            "no LoRA named `nope`",
        ),
        (
            json!({"prompt": "x <lora:nope:0.5>"}),
            "loras",
            "no LoRA named `nope`",
        ),
        (json!({"prompt": "x <lora:nope"}), "prompt", "closing"),
        (
            json!({"prompt": "x", "image": input, "mask_blur": 500, "mask": b64_file("mask.png")}),
            "mask_blur",
            "between 0 and 64",
        ),
    ];
    for (body, field, words) in cases {
        let (st, _, err) = post(body.clone());
        assert_eq!(st, 422, "{field}: {err}");
        assert_eq!(err["error"]["field"], field, "{err}");
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words), "{field}: {msg}");
    }
    // Over the size limit: more than 10 MiB once decoded (bodies over 16 MiB are a 413 before
    // any field is read; tests/server_http.rs covers that).
    let big = "A".repeat(14_000_000);
    let (st, _, err) = post(json!({"prompt": "x", "image": big}));
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["error"]["field"], "image");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("limit"),
        "{err}"
    );
    // Too many pixels (a small file declaring 5000×5000).
    let huge = b64(&png(&image::DynamicImage::ImageLuma8(
        image::GrayImage::new(5000, 5000),
    )));
    let (st, _, err) = post(json!({"prompt": "x", "image": huge}));
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["error"]["field"], "image");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("pixels"),
        "{err}"
    );

    // A1111: FastAPI's 422 shape with A1111's field names.
    let a = |body: Value| post_json(&s.url("/sdapi/v1/img2img"), &body);
    let (st, _, err) = a(json!({"prompt": "x", "init_images": [input], "denoising_strength": 2.0}));
    assert_eq!(st, 422, "{err}");
    assert_eq!(
        err["detail"][0]["loc"],
        json!(["body", "denoising_strength"])
    );
    let (st, _, err) = a(json!({"prompt": "x", "init_images": []}));
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["detail"][0]["loc"], json!(["body", "init_images"]));
    let (st, _, err) = a(json!({"prompt": "x", "init_images": [input], "mask": small_mask}));
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["detail"][0]["loc"], json!(["body", "mask"]));
    let (st, _, err) = a(
        json!({"prompt": "x", "init_images": [input], "inpainting_fill": 7, "mask": b64_file("mask.png")}),
    );
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["detail"][0]["loc"], json!(["body", "inpainting_fill"]));
    let (st, _, err) = a(json!({"prompt": "x", "init_images": [b64(b"nope")]}));
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["detail"][0]["loc"], json!(["body", "init_images"]));

    // OpenAI: 400 with `param`.
    let (st, err) = multipart(&s, &[("prompt", Part::Text("x"))]);
    assert_eq!(
        (st, err["error"]["param"].clone()),
        (400, json!("image")),
        "{err}"
    );
    let (st, err) = multipart(
        &s,
        &[("prompt", Part::Text("x")), ("image", Part::File(b"no"))],
    );
    assert_eq!(
        (st, err["error"]["param"].clone()),
        (400, json!("image")),
        "{err}"
    );
    let opaque = png(&image::DynamicImage::ImageRgb8(image::RgbImage::new(
        128, 128,
    )));
    let input_png = std::fs::read(fixture("input.png")).unwrap();
    let (st, err) = multipart(
        &s,
        &[
            ("prompt", Part::Text("x")),
            ("image", Part::File(&input_png)),
            ("mask", Part::File(&opaque)),
        ],
    );
    assert_eq!(
        (st, err["error"]["param"].clone()),
        (400, json!("mask")),
        "{err}"
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("transparen"),
        "{err}"
    );
    let (st, err) = get_json(&s.url("/v1/models"));
    assert_eq!(st, 200, "{err}");
}

enum Part<'a> {
    Text(&'a str),
    File(&'a [u8]),
}

/// A multipart/form-data POST to `/v1/images/edits`, built by hand.
fn multipart(s: &Server, parts: &[(&str, Part<'_>)]) -> (u16, Value) {
    let boundary = "zturbo-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, part) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(t) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{t}\r\n")
                        .as_bytes(),
                );
            }
            Part::File(bytes) => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\nContent-Type: image/png\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let (st, _, json) = post_raw(
        &s.url("/v1/images/edits"),
        &format!("multipart/form-data; boundary={boundary}"),
        body,
    );
    (st.as_u16(), json)
}

#[test]
fn a1111_img2img_and_openai_edits() {
    let out = temp_dir("i2i-apis");
    let s = Server::start(&out, &[], &[]);
    let input = b64_file("input.png");
    // Inpainting with A1111's defaults (fill, only masked) and an inverted black-on-white mask.
    let mut inverted = image::open(fixture("mask.png")).unwrap().to_luma8();
    image::imageops::invert(&mut inverted);
    let (st, _, r) = post_json(
        &s.url("/sdapi/v1/img2img"),
        &json!({"prompt": "a lake", "init_images": [format!("data:image/png;base64,{input}")],
                "mask": b64(&png(&image::DynamicImage::ImageLuma8(inverted))),
                "inpainting_mask_invert": 1, "denoising_strength": 0.9, "steps": 3,
                "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler a"}),
    );
    assert_eq!(st, 200, "{r}");
    let png_bytes = base64::engine::general_purpose::STANDARD
        .decode(r["images"][0].as_str().unwrap())
        .unwrap();
    assert_pasted_back(&image::load_from_memory(&png_bytes).unwrap().to_rgb8());
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 0.9);
    assert_eq!(info["all_seeds"], json!([5]));
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Denoising strength: 0.9"));
    assert_eq!(r["parameters"]["init_images"], Value::Null);

    // Whole-picture image to image, two images.
    let (st, _, r) = post_json(
        &s.url("/sdapi/v1/img2img"),
        &json!({"prompt": "a lake", "init_images": [input], "denoising_strength": 0.5,
                "steps": 2, "batch_size": 2, "seed": 11}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["images"].as_array().unwrap().len(), 2);

    // OpenAI edits: transparent mask pixels are edited.
    let mask = image::open(fixture("mask.png")).unwrap().to_luma8();
    let rgba = image::RgbaImage::from_fn(128, 128, |x, y| {
        image::Rgba([
            0,
            0,
            0,
            if mask.get_pixel(x, y).0[0] >= 128 {
                0
            } else {
                255
            },
        ])
    });
    let input_png = std::fs::read(fixture("input.png")).unwrap();
    let mask_png = png(&image::DynamicImage::ImageRgba8(rgba));
    let (st, r) = multipart(
        &s,
        &[
            ("model", Part::Text("gpt-image-1")),
            ("prompt", Part::Text("a lake")),
            ("image", Part::File(&input_png)),
            ("mask", Part::File(&mask_png)),
            ("n", Part::Text("1")),
            ("quality", Part::Text("low")),
        ],
    );
    assert_eq!(st, 200, "{r}");
    let png_bytes = base64::engine::general_purpose::STANDARD
        .decode(r["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert_pasted_back(&image::load_from_memory(&png_bytes).unwrap().to_rgb8());
}

#[test]
fn a_queued_img2img_job_survives_a_restart() {
    let out = temp_dir("i2i-restart");
    let slow = ("ZTURBO_TEST_WORKER_DELAY_MS", "300");
    let s = Server::start(&out, &[], &[slow]);
    let body = json!({"prompt": "a lake", "image": b64_file("input.png"), "mask": b64_file("mask.png"),
                      "steps": 3, "seed": 2, "enhance": false});
    let first = submit(&s, body.clone());
    let second = submit(&s, body);
    let mut ev = SseReader::open(&s.url(&format!("/api/jobs/{first}/events")));
    assert!(ev.any(|e| e.name == "progress"));
    s.kill9();
    let s = Server::start(&out, &[], &[]);
    for id in [&first, &second] {
        let job = wait_terminal(&s, id, Duration::from_secs(60));
        assert_eq!(job["state"], "done", "{job}");
        assert_pasted_back(&fetch_png(&s, job["images"][0].as_str().unwrap()));
    }
}
