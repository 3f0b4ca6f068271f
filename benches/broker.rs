//! Throughput across machines (issue 21): jobs per minute through one `zturbo serve --broker`
//! front door with 1 worker, then with 2, on the demo model, in one run. Each round uses a fresh
//! `redis-server` (AOF on) on a free loopback port and a fresh outputs folder, submits the same
//! jobs at once and times the first submission to the last job done; it then counts jobs lost
//! (not done) and duplicate or stray images (PNG count against image count).
//!
//! `cargo bench --bench broker` (needs `redis-server` on PATH). Knobs: `ZTURBO_BENCH_JOBS` (16),
//! `ZTURBO_BENCH_SIZE` (512), `ZTURBO_BENCH_STEPS` (8), `ZTURBO_BENCH_THREADS` — CPU threads per
//! worker (`RAYON_NUM_THREADS`; default 1, so that two workers on one machine stand for two
//! machines rather than fight over the same cores; 0 leaves it unset).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::redis::{pngs, Redis, Worker};
use support::{get_json, post_json, temp_dir, Server};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Round {
    workers: usize,
    jobs: usize,
    seconds: f64,
    lost: usize,
    extra_images: isize,
    /// Jobs each worker ran, by name.
    per_worker: std::collections::BTreeMap<String, usize>,
    /// Mean engine time of a job (its record's `timings.total_ms`).
    mean_run_ms: f64,
}

fn round(workers: usize, jobs: usize, size: u64, steps: u64, threads: u64) -> Round {
    let dir = temp_dir(&format!("bench-broker-{workers}"));
    let redis = Redis::start(&dir.join("redis"), None);
    let threads = threads.to_string();
    let env: Vec<(&str, &str)> = if threads == "0" {
        vec![]
    } else {
        vec![("RAYON_NUM_THREADS", threads.as_str())]
    };
    let mut ws: Vec<Worker> = (0..workers)
        .map(|i| Worker::start(&dir, &redis.url(), &format!("w{}", i + 1), &[], &env))
        .collect();
    for w in &mut ws {
        w.wait_registered(Duration::from_secs(120));
    }
    let s = Server::start(
        &dir.join("out"),
        &["--broker", &redis.url(), "--queue-size", "1000"],
        &[],
    );
    let t = Instant::now();
    let ids: Vec<String> = (0..jobs)
        .map(|i| {
            let body = json!({ "prompt": "a lighthouse at dusk", "width": size, "height": size,
                               "steps": steps, "seed": i, "batch": 1 });
            let (st, _, j) = post_json(&s.url("/api/jobs"), &body);
            assert_eq!(st, 202, "{j}");
            j["id"].as_str().unwrap().to_string()
        })
        .collect();
    let mut lost = 0;
    let mut per_worker = std::collections::BTreeMap::new();
    let mut run_ms = Vec::new();
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let (_, j) = get_json(&s.url(&format!("/api/jobs/{id}")));
            match j["state"].as_str() {
                Some("done") => {
                    let w = j["worker"].as_str().unwrap_or("?").to_string();
                    *per_worker.entry(w).or_insert(0) += 1;
                    run_ms.push(j["timings"]["total_ms"].as_f64().unwrap_or(0.0));
                    break;
                }
                Some("failed" | "cancelled") => {
                    lost += 1;
                    break;
                }
                _ if Instant::now() > deadline => {
                    lost += 1;
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    let extra_images = pngs(&s.outputs).len() as isize - (jobs - lost) as isize;
    Round {
        workers,
        jobs,
        seconds,
        lost,
        extra_images,
        per_worker,
        mean_run_ms: run_ms.iter().sum::<f64>() / run_ms.len().max(1) as f64,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter we do not have.
    let jobs = env_or("ZTURBO_BENCH_JOBS", 16) as usize;
    let size = env_or("ZTURBO_BENCH_SIZE", 512);
    let steps = env_or("ZTURBO_BENCH_STEPS", 8);
    let threads = env_or("ZTURBO_BENCH_THREADS", 1);
    println!(
        "broker throughput: demo model, {jobs} jobs of {size}x{size}, {steps} steps, batch 1, \
         {} CPU thread(s) per worker",
        if threads == 0 {
            "all".to_string()
        } else {
            threads.to_string()
        }
    );
    let rounds: Vec<Round> = [1, 2]
        .into_iter()
        .map(|w| round(w, jobs, size, steps, threads))
        .collect();
    println!(
        "| workers | jobs | seconds | jobs/min | jobs lost | duplicate images | jobs per worker | mean engine ms/job |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rounds {
        let split: Vec<String> = r
            .per_worker
            .iter()
            .map(|(w, n)| format!("{w}: {n}"))
            .collect();
        println!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {} | {:.0} |",
            r.workers,
            r.jobs,
            r.seconds,
            r.jobs as f64 * 60.0 / r.seconds,
            r.lost,
            r.extra_images,
            split.join(", "),
            r.mean_run_ms
        );
    }
    let speedup = rounds[0].seconds / rounds[1].seconds;
    println!("1 → 2 workers: ×{speedup:.2} throughput");
}
