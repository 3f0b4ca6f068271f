//! Several machines (issue 21), end to end with the real binaries: a real `redis-server` on a free
//! loopback port (AOF on), `zturbo worker` processes and a `zturbo serve --broker` front door, all
//! with the demo model at 64×64. Faults are real: kill -9 of a worker and of the front door, a
//! Redis stop and start. Step delays (`ZTURBO_TEST_WORKER_DELAY_MS`) hold a job running on a
//! chosen worker.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::redis::{pngs, Redis, Worker};
use support::*;

const WAIT: Duration = Duration::from_secs(90);

fn body(steps: u32, batch: u32, seed: u64) -> Value {
    json!({ "prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": steps,
            "batch": batch, "seed": seed })
}

fn front_door(outputs: &Path, redis: &Redis) -> Server {
    Server::start(outputs, &["--broker", &redis.url()], &[])
}

/// Polls until the job runs on `worker` (and has made `min_step` steps); returns its view.
fn wait_running_on(s: &Server, id: &str, worker: &str, min_step: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, job) = get_json(&s.url(&format!("/api/jobs/{id}")));
        if job["state"] == "running"
            && job["worker"] == worker
            && job["step"].as_u64().unwrap_or(0) >= min_step
        {
            return job;
        }
        assert!(
            !matches!(job["state"].as_str(), Some("done" | "failed" | "cancelled")),
            "job {id} ended before it was seen running on {worker}: {job}"
        );
        assert!(
            Instant::now() < deadline,
            "job {id} not running on {worker}: {job}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every job done, with exactly its batch's images on disk, and nothing else on disk.
fn assert_all_done_once(s: &Server, jobs: &[(String, u32)]) {
    let mut expected = Vec::new();
    for (id, batch) in jobs {
        let job = wait_terminal(s, id, WAIT);
        assert_eq!(job["state"], "done", "{job}\n{}", s.log());
        let images = job["images"].as_array().unwrap();
        assert_eq!(images.len(), *batch as usize, "{job}");
        for n in 1..=*batch {
            expected.push(format!("{id}-{n}.png"));
        }
    }
    expected.sort();
    // The PNG count equals the image count: no duplicate, no stray image.
    assert_eq!(pngs(&s.outputs), expected);
}

#[test]
fn a_worker_killed_mid_job_leaves_it_to_another_and_every_job_finishes_once() {
    let dir = temp_dir("broker-kill-worker");
    let redis = Redis::start(&dir.join("redis"), None);
    let url = redis.url();
    let slow = [("ZTURBO_TEST_WORKER_DELAY_MS", "250")];
    let claim = ["--claim-after", "2"];
    let mut w1 = Worker::start(&dir, &url, "w1", &claim, &slow);
    w1.wait_registered(WAIT);
    let s = front_door(&dir.join("out"), &redis);
    let (_, workers) = get_json(&s.url("/api/workers"));
    assert_eq!(workers["broker"], true, "{workers}");
    assert_eq!(workers["workers"][0]["name"], "w1", "{workers}");
    let (_, info) = get_json(&s.url("/api/info"));
    assert_eq!(info["model"]["name"], "demo", "{info}");

    let jobs: Vec<(String, u32)> = (0..4)
        .map(|i| {
            let batch = 1 + i % 2;
            (submit(&s, body(8, batch, 100 + i as u64)), batch)
        })
        .collect();
    // The first job is well under way on w1 when w1 dies.
    wait_running_on(&s, &jobs[0].0, "w1", 2);
    w1.kill9();
    let mut w2 = Worker::start(&dir, &url, "w2", &claim, &[]);
    w2.wait_registered(WAIT);

    assert_all_done_once(&s, &jobs);
    let (_, first) = get_json(&s.url(&format!("/api/jobs/{}", jobs[0].0)));
    assert_eq!(first["worker"], "w2", "the survivor finished it: {first}");
    assert!(
        w2.log()
            .contains("taking over a job whose worker stopped answering"),
        "{}",
        w2.log()
    );
    // The dead worker drops off the list once its heartbeat lapses.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, workers) = get_json(&s.url("/api/workers"));
        let names: Vec<&str> = workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["name"].as_str())
            .collect();
        if names == ["w2"] {
            break;
        }
        assert!(Instant::now() < deadline, "{workers}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_front_door_killed_and_restarted_gets_every_job_back() {
    let dir = temp_dir("broker-kill-front");
    let redis = Redis::start(&dir.join("redis"), None);
    let mut w = Worker::start(
        &dir,
        &redis.url(),
        "w1",
        &[],
        &[("ZTURBO_TEST_WORKER_DELAY_MS", "150")],
    );
    w.wait_registered(WAIT);
    let out = dir.join("out");
    let s = front_door(&out, &redis);
    let jobs: Vec<(String, u32)> = (0..3).map(|i| (submit(&s, body(6, 2, 7 + i)), 2)).collect();
    wait_running_on(&s, &jobs[0].0, "w1", 1);
    s.kill9();
    // The worker goes on while the front door is away: results wait in the broker.
    std::thread::sleep(Duration::from_secs(2));
    let s = front_door(&out, &redis);
    assert_all_done_once(&s, &jobs);
    // The broker forgets each job once its end is journaled: no result (PNG bytes) is left there.
    let deadline = Instant::now() + WAIT;
    while !redis.keys("zturbo:result:*").is_empty() {
        assert!(Instant::now() < deadline, "{:?}", redis.keys("zturbo:*"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(redis.keys("zturbo:done:*").len(), 3);
    // A result the broker still holds for a job the journal has as ended (the front door died
    // between the two) is settled at the next start, not delivered again.
    drop(s);
    let stale = format!("zturbo:result:{}", jobs[0].0);
    let reply = redis.command(&["HSET", &stale, "outcome", "cancelled", "record", "{}"]);
    assert!(reply.starts_with(':'), "{reply}");
    let s = front_door(&out, &redis);
    let deadline = Instant::now() + WAIT;
    while !redis.keys("zturbo:result:*").is_empty() {
        assert!(Instant::now() < deadline, "{}", s.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        s.log().contains("settling a job whose end was journaled"),
        "{}",
        s.log()
    );
    assert_eq!(
        get_json(&s.url(&format!("/api/jobs/{}", jobs[0].0))).1["state"],
        "done"
    );
    assert_eq!(pngs(&out).len(), 6);
    let (_, list) = get_json(&s.url("/api/jobs"));
    assert_eq!(list["jobs"].as_array().unwrap().len(), 3, "{list}");
}

#[test]
fn a_redis_stop_and_start_loses_nothing_and_is_a_clear_503_meanwhile() {
    let dir = temp_dir("broker-redis-restart");
    let mut redis = Redis::start(&dir.join("redis"), None);
    let mut w = Worker::start(
        &dir,
        &redis.url(),
        "w1",
        &[],
        &[("ZTURBO_TEST_WORKER_DELAY_MS", "200")],
    );
    w.wait_registered(WAIT);
    let s = front_door(&dir.join("out"), &redis);
    let first = submit(&s, body(8, 1, 1));
    let second = submit(&s, body(2, 1, 2));
    wait_running_on(&s, &first, "w1", 1);

    redis.stop();
    // New jobs are refused with a clear 503 while the broker is away.
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        let (status, headers, json) = post_json(&s.url("/api/jobs"), &body(2, 1, 3));
        if status == 503 {
            assert!(headers.contains_key("retry-after"));
            break json;
        }
        assert_eq!(status, 202, "{json}");
        assert!(Instant::now() < deadline, "never refused: {}", s.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    let message = refused["error"]["message"]
        .as_str()
        .or_else(|| refused["error"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("broker") && message.contains(&format!("127.0.0.1:{}", redis.port)),
        "{refused}"
    );
    let (_, health) = get_json(&s.url("/api/health"));
    assert_eq!(health["status"], "degraded", "{health}");

    std::thread::sleep(Duration::from_secs(1));
    redis.restart();
    // The worker and the front door reconnect on their own; the accepted jobs all finish.
    let mut jobs = vec![(first, 1), (second, 1)];
    let deadline = Instant::now() + WAIT;
    let third = loop {
        let (status, _, json) = post_json(&s.url("/api/jobs"), &body(2, 1, 4));
        if status == 202 {
            break json["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "{json}\n{}", s.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    jobs.push((third, 1));
    // A job accepted in the moment before the outage was noticed also comes through.
    let (_, list) = get_json(&s.url("/api/jobs"));
    for j in list["jobs"].as_array().unwrap() {
        let id = j["id"].as_str().unwrap().to_string();
        if !jobs.iter().any(|(k, _)| *k == id) {
            jobs.push((id, 1));
        }
    }
    assert_all_done_once(&s, &jobs);
}

#[test]
fn a_cancel_reaches_the_remote_worker_running_the_job() {
    let dir = temp_dir("broker-cancel");
    let redis = Redis::start(&dir.join("redis"), None);
    let mut w = Worker::start(
        &dir,
        &redis.url(),
        "w1",
        &[],
        &[("ZTURBO_TEST_WORKER_DELAY_MS", "400")],
    );
    w.wait_registered(WAIT);
    let s = front_door(&dir.join("out"), &redis);
    // A front door switches no model (its workers load theirs at start): naming the served one
    // is fine, any other is a 409 that says so — for a switch, a job and the A1111 option.
    let (status, _, r) = post_json(&s.url("/api/model"), &json!({ "name": "demo" }));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["state"], "loaded", "{r}");
    let (status, _, r) = post_json(&s.url("/api/model"), &json!({ "name": "sd-turbo" }));
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["error"]["field"], "name", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("workers serve the model `demo`"), "{msg}");
    let mut other = body(2, 1, 8);
    other["model"] = json!("sd-turbo");
    let (status, _, r) = post_json(&s.url("/api/jobs"), &other);
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["error"]["field"], "model", "{r}");
    let (status, _, r) = post_json(
        &s.url("/sdapi/v1/options"),
        &json!({ "sd_model_checkpoint": "sd-turbo" }),
    );
    assert_eq!(status, 409, "{r}");
    // Live previews are local only: the front door says it sends none.
    let (_, info) = get_json(&s.url("/api/info"));
    assert_eq!(info["preview"], false, "{info}");
    let id = submit(&s, body(40, 1, 9));
    wait_running_on(&s, &id, "w1", 1);
    let t = Instant::now();
    let (status, _) = delete(&s.url(&format!("/api/jobs/{id}")));
    assert!(status.is_success(), "{status}");
    let job = wait_terminal(&s, &id, WAIT);
    assert_eq!(job["state"], "cancelled", "{job}");
    // 40 steps of 400 ms would take 16 s: the worker stopped it at its next steps.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(w.log().contains("job stopped (cancelled)"), "{}", w.log());
    assert!(pngs(&s.outputs).is_empty());
    // The worker is free again: the next job runs.
    let next = submit(&s, body(2, 1, 10));
    assert_eq!(wait_terminal(&s, &next, WAIT)["state"], "done");
}

#[test]
fn a_wrong_password_or_url_is_a_clear_error_that_never_shows_the_password() {
    let dir = temp_dir("broker-auth");
    let redis = Redis::start(&dir.join("redis"), Some("right-pass-7f3a"));
    let wrong = format!("redis://:wrong-pass-91c2@127.0.0.1:{}", redis.port);
    let w = Worker::start(&dir, &wrong, "w1", &[], &[]);
    let (status, log) = w.wait_exit(WAIT);
    assert!(!status.success());
    assert!(log.contains("refused the password"), "{log}");
    assert!(
        log.contains(&format!("redis://:***@127.0.0.1:{}", redis.port)),
        "{log}"
    );
    assert!(!log.contains("wrong-pass-91c2"), "{log}");

    // The front door says the same, before it serves anything.
    let out = Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args(["serve", "--port", "0", "--broker", &wrong])
        .arg("--outputs")
        .arg(dir.join("out"))
        .env_remove("ZTURBO_BROKER")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refused the password"), "{stderr}");
    assert!(!stderr.contains("wrong-pass-91c2"), "{stderr}");

    // A URL that is not a Redis URL names the option and the expected form.
    let out = Command::new(env!("CARGO_BIN_EXE_zturbo"))
        .args([
            "worker",
            "--model",
            "demo",
            "--broker",
            "http://:pw-x@127.0.0.1:1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--broker") && stderr.contains("redis://"),
        "{stderr}"
    );
    assert!(!stderr.contains("pw-x"), "{stderr}");

    // The right password works.
    let mut ok = Worker::start(&dir, &redis.url(), "w2", &[], &[]);
    ok.wait_registered(WAIT);
}

#[test]
fn rediss_works_with_the_brokers_ca_and_an_untrusted_certificate_is_a_clear_error() {
    let dir = temp_dir("broker-tls");
    let (redis, ca) = Redis::start_tls(&dir.join("redis"), Some("tls-pass-5d1e"));
    let ca_arg = ca.to_string_lossy().into_owned();
    let mut w = Worker::start(&dir, &redis.url(), "w1", &["--broker-ca", &ca_arg], &[]);
    w.wait_registered(WAIT);
    let s = Server::start(
        &dir.join("out"),
        &["--broker", &redis.url(), "--broker-ca", &ca_arg],
        &[],
    );
    let id = submit(&s, body(2, 1, 5));
    assert_eq!(wait_terminal(&s, &id, WAIT)["state"], "done");
    assert_eq!(pngs(&s.outputs), [format!("{id}-1.png")]);
    // The synchronous surfaces go through the broker too.
    let (st, _, r) = post_json(
        &s.url("/v1/images/generations"),
        &json!({"prompt": "a red fox", "n": 2, "size": "64x64", "quality": "low",
                "response_format": "b64_json"}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["data"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(pngs(&s.outputs).len(), 3);

    // Without the CA the certificate is not trusted: said at once, with the fix.
    let untrusting = Worker::start(&dir, &redis.url(), "w2", &[], &[]);
    let (status, log) = untrusting.wait_exit(WAIT);
    assert!(!status.success());
    assert!(log.contains("--broker-ca"), "{log}");
    assert!(!log.contains("tls-pass-5d1e"), "{log}");
}

#[test]
fn a_live_worker_keeps_a_job_that_outlasts_the_visibility_timeout() {
    let dir = temp_dir("broker-long-job");
    let redis = Redis::start(&dir.join("redis"), None);
    let slow = [("ZTURBO_TEST_WORKER_DELAY_MS", "250")];
    let claim = ["--claim-after", "1"];
    let mut w1 = Worker::start(&dir, &redis.url(), "w1", &claim, &slow);
    w1.wait_registered(WAIT);
    let s = front_door(&dir.join("out"), &redis);
    // 14 steps of 250 ms: well past the 1 s visibility timeout, with an idle second worker
    // looking for entries to take over all along.
    let id = submit(&s, body(14, 1, 3));
    wait_running_on(&s, &id, "w1", 1);
    let mut w2 = Worker::start(&dir, &redis.url(), "w2", &claim, &slow);
    w2.wait_registered(WAIT);
    let job = wait_terminal(&s, &id, WAIT);
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["worker"], "w1", "{job}");
    assert!(!w2.log().contains("taking over"), "{}", w2.log());
    assert_eq!(pngs(&s.outputs), [format!("{id}-1.png")]);
}
