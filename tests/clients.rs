//! Unmodified client libraries against `zturbo serve` with the demo model: the official `openai`
//! Python SDK (base_url pointed at zturbo) and the `webuiapi` A1111 client, driven by
//! `tests/clients/smoke.py` — once against the default loopback server, once with `--api-key`
//! (bearer for OpenAI, HTTP basic for webuiapi, signed image URLs).
//!
//! Needs a Python with the pinned packages of `tests/clients/requirements.txt`: `.ci/run` creates
//! `target/pyclients` with them (or set ZTURBO_PY_CLIENTS to a Python that has them). A missing
//! piece fails the test with a message saying how to get it.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{temp_dir, Server};

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("ZTURBO_PY_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/pyclients/bin/python"))
}

fn run_smoke(server: &Server, key: Option<&str>) {
    let py = python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/smoke.py");
    let mut cmd = Command::new(&py);
    cmd.arg(&script).arg(&server.url);
    if let Some(k) = key {
        cmd.arg(k);
    }
    // Nothing from the caller's environment may point the SDK elsewhere.
    cmd.env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY");
    let out = cmd.output().expect("run the client smoke script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("clients ok"),
        "the clients failed ({}):\n{stdout}\n{stderr}\nserver log:\n{}",
        out.status,
        server.log()
    );
}

#[test]
fn openai_sdk_and_webuiapi_get_images() {
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import openai, webuiapi"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the client test needs a Python with the packages of tests/clients/requirements.txt at {}: \
         run .ci/run, or `python3 -m venv target/pyclients && target/pyclients/bin/pip install \
         -r tests/clients/requirements.txt` (or set ZTURBO_PY_CLIENTS=/path/to/python)",
        py.display()
    );
    let out = temp_dir("clients");
    let open = Server::start(&out.join("open"), &[], &[]);
    run_smoke(&open, None);
    drop(open);
    let keyed = Server::start(&out.join("keyed"), &["--api-key", "smoke-test-key"], &[]);
    run_smoke(&keyed, Some("smoke-test-key"));
}
