//! The real-browser test: `zturbo serve` with the demo model, driven by headless Chromium through
//! `tests/browser/ui_test.mjs` (playwright-core from npm, the system's Debian `chromium`; never a
//! browser download). It types a prompt, clicks Generate, waits for the image in the gallery and
//! checks the memory chart got samples; uses that result as the input image, paints a mask
//! (mouse and keyboard), picks a LoRA with a weight and inpaints it; downloads a model from the Models panel (from a fake hub)
//! and logs into a second server started with `--api-key`. Screenshots for humans:
//! `target/browser-screenshot.png` (1280 px wide) and `target/browser-screenshot-narrow.png`
//! (420 px).
//!
//! Needs `node`, `npm ci --prefix tests/browser` and `apt-get install chromium`; `.ci/run` does
//! all three. A missing piece fails the test with a message saying which.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{fake_hub, temp_dir, Server};

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
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .is_dir(),
        "the browser test needs playwright-core: run `npm ci --prefix tests/browser` (or .ci/run)"
    );
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
    let target = root.join("target");
    std::fs::create_dir_all(&target).unwrap();
    let shot = target.join("browser-screenshot.png");
    let narrow = target.join("browser-screenshot-narrow.png");
    let _ = std::fs::remove_file(&shot);
    let run = Command::new("node")
        .arg(root.join("tests/browser/ui_test.mjs"))
        .arg(&server.url)
        .arg(&shot)
        .arg(&narrow)
        .env("CHROMIUM", chromium())
        .env("PULL_MODEL", "sd-turbo")
        .env("KEYED_URL", &keyed.url)
        .env("KEYED_KEY", "browser-test-key")
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
    assert!(shot.is_file(), "no screenshot at {}", shot.display());
    println!("screenshots: {} and {}", shot.display(), narrow.display());
}
