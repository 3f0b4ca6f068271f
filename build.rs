//! Build steps: the table of the browser UI's files (`static/`, compiled into the binary), the CUDA
//! kernels with the `cuda` feature, and Intel MKL linked statically with the `mkl` feature (CPU
//! bf16 matrix products). MKL comes from PyPI's `mkl-static` wheel: `scripts/fetch-mkl.sh`
//! installs it under `target/mkl`; `ZTURBO_MKL_DIR` points elsewhere.

use std::path::{Path, PathBuf};

fn main() {
    static_assets();
    cuda_kernels();
    println!("cargo:rerun-if-env-changed=ZTURBO_MKL_DIR");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_MKL");
    if std::env::var_os("CARGO_FEATURE_MKL").is_none() {
        return;
    }
    let root = match std::env::var_os("ZTURBO_MKL_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
            .join("target")
            .join("mkl"),
    };
    let lib = root.join("lib");
    let libs = [
        "libmkl_intel_lp64.a",
        "libmkl_sequential.a",
        "libmkl_core.a",
    ];
    for l in libs {
        let p = lib.join(l);
        if !p.is_file() {
            panic!(
                "feature `mkl`: {} not found. Run scripts/fetch-mkl.sh (installs PyPI's mkl-static \
                 under target/mkl) or set ZTURBO_MKL_DIR to a folder with lib/{l}.",
                p.display()
            );
        }
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rustc-link-arg=-Wl,--start-group");
    for l in libs {
        println!("cargo:rustc-link-arg={}", lib.join(l).display());
    }
    println!("cargo:rustc-link-arg=-Wl,--end-group");
    for l in ["pthread", "m", "dl"] {
        println!("cargo:rustc-link-arg=-l{l}");
    }
}

/// With the `cuda` feature: compiles each `src/ops/cuda/*.cu` (one kernel per file) to its own PTX
/// module, `$OUT_DIR/<name>.ptx`, with the nvcc candle's own kernels use (`NVCC`, else `nvcc` on
/// PATH), for `CUDA_COMPUTE_CAP` (default 80; PTX is JIT-compiled by the driver for newer GPUs).
fn cuda_kernels() {
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let dir = PathBuf::from("src/ops/cuda");
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("common.cuh").display()
    );
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("feature `cuda`: reading {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    kernels.sort();
    for src in kernels {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().expect("a .cu file").to_string_lossy();
        let out = out_dir.join(format!("{stem}.ptx"));
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", "--use_fast_math"])
            .arg(format!("--gpu-architecture=compute_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap_or_else(|e| {
                panic!("feature `cuda`: running {nvcc}: {e} (set NVCC; see README, GPU build)")
            });
        if !status.success() {
            panic!("feature `cuda`: {nvcc} failed on {}", src.display());
        }
    }
}

/// Writes `$OUT_DIR/static_assets.rs`: every file under `static/` as `("/rel/path", bytes)`, so
/// the server serves whatever the UI is made of (ES modules included) with no list to maintain.
fn static_assets() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("static");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect_files(&root, &mut files);
    files.sort();
    let mut out = String::from("pub static ASSETS: &[(&str, &[u8])] = &[\n");
    for f in &files {
        let rel = f.strip_prefix(&root).expect("under static/");
        let url: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        out.push_str(&format!(
            "    ({:?}, include_bytes!({:?})),\n",
            format!("/{}", url.join("/")),
            f.display().to_string()
        ));
    }
    out.push_str("];\n");
    let dest =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("static_assets.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}

/// Regular files below `dir`, skipping hidden entries (editor swap files, `.DS_Store`).
fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        println!("cargo:rerun-if-changed={}", p.display());
        if p.is_dir() {
            collect_files(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}
