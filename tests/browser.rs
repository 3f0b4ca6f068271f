//! The real-browser test: `zturbo serve` with the demo model, driven by headless Chromium through
//! `tests/browser/ui_test.mjs` (playwright-core and axe-core from npm, pinned; the system's Debian
//! `chromium`; never a browser download). It checks the zh-CN messages against English, then uses
//! the page as people do: generate (hero, gallery, the chart's exact job peak, per-image seeds),
//! the lightbox, downloads, search and delete, the enhancement chips, image to image (a result
//! used as the input image), inpainting (a mask painted with mouse and keyboard) and a LoRA with a
//! weight, the Models panel (from a fake hub), the profile contract, a phone viewport, cancel-all
//! and Esc, an outage (it kills and restarts a server of its own under the page), model switching
//! between two tiny local models, the API-key prompt, and axe-core in both themes and both
//! languages. Screenshots for humans and CI artefacts: `target/browser-desktop.png`,
//! `browser-phone.png`, `browser-zh-CN.png`, `browser-dark.png`, `browser-outage.png`.
//!
//! Needs `node`, `npm ci --prefix tests/browser` and `apt-get install chromium`; `.ci/run` does
//! all three. A missing piece fails the test with a message saying which.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{fake_hub, temp_dir, tiny_models_dir, Server};

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

fn check_prerequisites(root: &Path) {
    let node = Command::new("node").arg("--version").output();
    assert!(
        matches!(&node, Ok(o) if o.status.success()),
        "the browser test needs Node.js (`node` on PATH): install it (Debian: apt-get install nodejs npm), \
         or run .ci/run, which installs everything the tests need"
    );
    for package in ["playwright-core", "axe-core"] {
        assert!(
            root.join("tests/browser/node_modules")
                .join(package)
                .is_dir(),
            "the browser test needs {package}: run `npm ci --prefix tests/browser` (or .ci/run)"
        );
    }
    assert!(
        chromium().is_file(),
        "the browser test needs Chromium at {} (Debian: apt-get install chromium; or set CHROMIUM=/path), \
         or run .ci/run",
        chromium().display()
    );
}

#[test]
fn ui_generates_an_image_in_headless_chromium() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    check_prerequisites(&root);
    let out = temp_dir("browser");
    // Downloads from the Models panel go to a fake hub (no network in tests).
    let hub = fake_hub(false);
    let hf_home = out.with_file_name(format!("{}-hf", out.file_name().unwrap().to_string_lossy()));
    // One LoRA in <models-dir>/loras/ for the picker (the tiny Z-Image PEFT fixture, which
    // matches the demo model's layers).
    let models = out.with_file_name(format!(
        "{}-models",
        out.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(models.join("loras")).unwrap();
    std::fs::copy(
        root.join("tests/fixtures/img2img/lora_peft.safetensors"),
        models.join("loras/style.safetensors"),
    )
    .unwrap();
    let server = Server::start_with_models(
        &out,
        &models,
        &[],
        &[
            ("HF_ENDPOINT", hub.url.as_str()),
            ("HF_HOME", hf_home.to_str().unwrap()),
        ],
    );
    let keyed = Server::start(
        &out.with_file_name(format!(
            "{}-keyed",
            out.file_name().unwrap().to_string_lossy()
        )),
        &["--api-key", "browser-test-key"],
        &[],
    );
    // Two tiny local models to switch between.
    let models = tiny_models_dir("browser-models", false);
    let switching = Server::start_in(
        &out.with_file_name(format!(
            "{}-switch",
            out.file_name().unwrap().to_string_lossy()
        )),
        &models,
        "tiny-z-image",
        &[],
        &[],
    );
    let target = root.join("target");
    std::fs::create_dir_all(&target).unwrap();
    for name in [
        "browser-desktop.png",
        "browser-phone.png",
        "browser-zh-CN.png",
    ] {
        let _ = std::fs::remove_file(target.join(name));
    }
    let scratch = temp_dir("browser-scratch");
    let run = Command::new("node")
        .arg(root.join("tests/browser/ui_test.mjs"))
        .arg(&server.url)
        .arg(&target)
        .env("CHROMIUM", chromium())
        .env("PULL_MODEL", "sd-turbo")
        .env("KEYED_URL", &keyed.url)
        .env("KEYED_KEY", "browser-test-key")
        .env("ZTURBO_BIN", env!("CARGO_BIN_EXE_zturbo"))
        .env("SCRATCH_DIR", &scratch)
        .env("SWITCH_URL", &switching.url)
        .env("SWITCH_MODELS", "tiny-z-image,tiny-sd-turbo")
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "the browser test failed ({}):\n{stdout}\n{stderr}\nserver log:\n{}",
        run.status,
        server.log()
    );
    for name in [
        "browser-desktop.png",
        "browser-phone.png",
        "browser-zh-CN.png",
    ] {
        assert!(
            target.join(name).is_file(),
            "no screenshot {name} in {}",
            target.display()
        );
    }
    println!("screenshots in {}", target.display());
}
