//! ControlNet over HTTP with the demo model (the tiny Z-Image fixture) and the tiny ControlNets of
//! `tests/fixtures/controlnet/` in the models folder: the job API's `control` (its map stored for
//! a restart, bad input a 4xx naming the field), A1111's `alwayson_scripts.controlnet.args`,
//! `/controlnet/model_list`, `/controlnet/module_list`, `/controlnet/detect`, `/api/info`
//! features; webuiapi's `ControlNetUnit` when the client Python is there (`ZTURBO_PY_CLIENTS`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use support::*;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn b64_file(rel: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(fixture(rel)).unwrap())
}

/// A models folder with `controlnet/tiny-2.1/` (diffusers folder) and `controlnet/tiny-1.0.safetensors`.
fn models_with_controlnets(name: &str) -> PathBuf {
    let models = temp_dir(name);
    let cn = models.join("controlnet");
    std::fs::create_dir_all(cn.join("tiny-2.1")).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(
            fixture(&format!("controlnet/tiny-2.1/{f}")),
            cn.join("tiny-2.1").join(f),
        )
        .unwrap();
    }
    std::fs::copy(
        fixture("controlnet/tiny-1.0.safetensors"),
        cn.join("tiny-1.0.safetensors"),
    )
    .unwrap();
    models
}

#[test]
fn job_api_runs_control_and_names_bad_fields() {
    let out = temp_dir("cn-jobs");
    let models = models_with_controlnets("cn-jobs-models");
    let s = Server::start_with_models(&out, &models, &[], &[]);

    let (st, info) = get_json(&s.url("/api/info"));
    assert_eq!(st, 200);
    assert!(
        info["features"]
            .as_array()
            .unwrap()
            .contains(&json!("controlnet")),
        "{info}"
    );
    let (_, list) = get_json(&s.url("/controlnet/model_list"));
    assert_eq!(list["model_list"], json!(["tiny-1.0", "tiny-2.1"]));
    let (_, modules) = get_json(&s.url("/controlnet/module_list"));
    assert_eq!(modules["module_list"], json!(["none", "canny"]));

    let control = b64_file("controlnet/control.png");
    let id = submit(
        &s,
        json!({"prompt": "a lake", "width": 128, "height": 128, "steps": 2, "seed": 4,
               "enhance": false, "control": {"model": "tiny-2.1", "image": control,
               "scale": 0.9, "preprocess": "canny", "end": 0.5}}),
    );
    let job = wait_terminal(&s, &id, Duration::from_secs(60));
    assert_eq!(job["state"], "done", "{job}");
    let c = &job["params"]["control"];
    assert_eq!(c["model"], "tiny-2.1");
    assert_eq!(c["scale"], 0.9);
    assert_eq!(c["preprocess"], "canny");
    assert_eq!(
        (c["start"].clone(), c["end"].clone()),
        (json!(0.0), json!(0.5))
    );
    // The map is stored by content, so the journaled job finds it after a restart.
    let sha = c["image"]["sha256"].as_str().unwrap();
    assert!(out.join("inputs").join(format!("{sha}.png")).is_file());

    let post = |body: Value| post_json(&s.url("/api/jobs"), &body);
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"model": "nope", "image": control}),
            "control.model",
            "no ControlNet named `nope`",
        ),
        (
            json!({"image": control}),
            "control.model",
            "tiny-1.0, tiny-2.1",
        ),
        (
            json!({"model": "tiny-2.1", "image": base64::engine::general_purpose::STANDARD.encode(b"text")}),
            "control.image",
            "not a PNG",
        ),
        (
            json!({"model": "tiny-2.1", "image": control, "scale": 2.5}),
            "control.scale",
            "between 0 and 2",
        ),
        (
            json!({"model": "tiny-2.1", "image": control, "scale": -0.1}),
            "control.scale",
            "between 0 and 2",
        ),
        (
            json!({"model": "tiny-2.1", "image": control, "start": 0.7, "end": 0.3}),
            "control.start",
            "below control.end",
        ),
        (
            json!({"model": "tiny-2.1", "image": control, "end": 1.5}),
            "control.end",
            "between 0 and 1",
        ),
        (
            json!({"model": "tiny-2.1", "image": control, "preprocess": "openpose"}),
            "control.preprocess",
            "none, canny",
        ),
    ];
    for (c, field, needle) in cases {
        let (st, _, err) = post(json!({"prompt": "x", "control": c}));
        assert_eq!(st, 422, "{field}: {err}");
        assert_eq!(err["error"]["field"], field, "{err}");
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{field}: {msg}");
    }

    // The preview: the canny map of the image, as the preprocessor makes it.
    let (st, _, det) = post_json(
        &s.url("/controlnet/detect"),
        &json!({"controlnet_module": "canny", "controlnet_input_images": [b64_file("controlnet/canny_src.png")]}),
    );
    assert_eq!(st, 200, "{det}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(det["images"][0].as_str().unwrap())
        .unwrap();
    let got = image::load_from_memory(&png).unwrap().to_rgb8();
    let src = image::open(fixture("controlnet/canny_src.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(got, zturbo::control::canny(&src, 100, 200));
    let (st, _, err) = post_json(
        &s.url("/controlnet/detect"),
        &json!({"controlnet_module": "depth", "controlnet_input_images": [b64_file("controlnet/canny_src.png")]}),
    );
    assert_eq!(
        (st.as_u16(), err["error"]["field"].clone()),
        (422, json!("controlnet_module"))
    );
}

#[test]
fn a1111_alwayson_controlnet_units() {
    let out = temp_dir("cn-a1111");
    let models = models_with_controlnets("cn-a1111-models");
    let s = Server::start_with_models(&out, &models, &[], &[]);
    let unit = |extra: Value| {
        let mut u = json!({"image": b64_file("controlnet/control.png"), "module": "canny",
                           "model": "tiny-1.0 [abcd1234]", "weight": 0.8, "guidance_start": 0.0,
                           "guidance_end": 1.0, "threshold_a": 64, "threshold_b": 128,
                           "enabled": true});
        if let (Value::Object(u), Value::Object(e)) = (&mut u, extra) {
            u.extend(e);
        }
        u
    };
    let body = |units: Vec<Value>| {
        json!({"prompt": "a lake", "width": 128, "height": 128, "steps": 2, "cfg_scale": 1.0,
               "seed": 3, "alwayson_scripts": {"controlnet": {"args": units}}})
    };
    let (st, _, r) = post_json(
        &s.url("/sdapi/v1/txt2img"),
        &body(vec![
            unit(json!({})),
            unit(json!({"enabled": false, "model": "tiny-2.1"})),
        ]),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["images"].as_array().unwrap().len(), 1);
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert!(info.to_string().contains("tiny-1.0"), "{info}");

    for (extra, field) in [
        (json!({"weight": 3.0}), "weight"),
        (
            json!({"guidance_start": 0.9, "guidance_end": 0.2}),
            "guidance_start",
        ),
        (json!({"module": "openpose_full"}), "module"),
        (json!({"model": "nope"}), "model"),
    ] {
        let (st, _, r) = post_json(&s.url("/sdapi/v1/txt2img"), &body(vec![unit(extra)]));
        assert_eq!(st, 422, "{field}: {r}");
        let loc = r["detail"][0]["loc"].to_string();
        assert!(
            loc.contains(&format!("alwayson_scripts.controlnet.args.{field}")),
            "{field}: {r}"
        );
    }
    let (st, _, r) = post_json(
        &s.url("/sdapi/v1/txt2img"),
        &body(vec![unit(json!({})), unit(json!({"model": "tiny-2.1"}))]),
    );
    assert_eq!(st, 422, "{r}");
    assert!(r.to_string().contains("one per job"), "{r}");

    // webuiapi's ControlNetUnit, when the client Python is there.
    let py = std::env::var_os("ZTURBO_PY_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixture("../../target/pyclients/bin/python"));
    let has = Command::new(&py)
        .args(["-c", "import webuiapi"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!(
            "webuiapi not found at {}: its ControlNetUnit check skipped",
            py.display()
        );
        return;
    }
    let o = Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/controlnet.py"))
        .arg(&s.url)
        .arg(fixture("controlnet/control.png"))
        .arg("tiny-2.1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && stdout.contains("controlnet client ok"),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.log()
    );
}
