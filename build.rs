//! Embeds the web UI (every file under `static/`) into the binary, and links Intel MKL
//! statically when the `mkl` feature is on (CPU bf16 matrix products, see
//! `src/families/cpu_gemm.rs`). The MKL libraries come from PyPI's `mkl-static` wheel:
//! `scripts/fetch-mkl.sh` installs it under `target/mkl`; `ZTURBO_MKL_DIR` points elsewhere.

use std::path::PathBuf;

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

/// With the `cuda` feature: compiles `src/cuda/*.cu` to one PTX module (`$OUT_DIR/zturbo_kernels.ptx`)
/// with the nvcc candle's own kernels use (`NVCC`, else `nvcc` on PATH), for `CUDA_COMPUTE_CAP`
/// (default 80; PTX is JIT-compiled by the driver for newer GPUs).
fn cuda_kernels() {
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = PathBuf::from("src/cuda/softmax.cu");
    println!("cargo:rerun-if-changed={}", src.display());
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("zturbo_kernels.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
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

/// Writes `$OUT_DIR/static_assets.rs`: one `(url path, content type, bytes)` entry per file under
/// `static/`, so the server serves the UI's ES modules as they are (no bundler, no build step)
/// and a new module needs no route of its own.
fn static_assets() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("static");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect_files(&root, &mut files);
    files.sort();
    let mut out = String::from("&[\n");
    for path in files {
        let rel = path
            .strip_prefix(&root)
            .expect("under static/")
            .to_str()
            .unwrap_or_else(|| panic!("static/: non-UTF-8 file name {}", path.display()))
            .replace('\\', "/");
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let content_type = match ext {
            "html" => "text/html; charset=utf-8",
            "js" | "mjs" => "text/javascript; charset=utf-8",
            "css" => "text/css; charset=utf-8",
            "json" => "application/json",
            "svg" => "image/svg+xml",
            "png" => "image/png",
            "txt" | "md" => "text/plain; charset=utf-8",
            _ => panic!(
                "static/{rel}: no content type known for `.{ext}` files (add one in build.rs)"
            ),
        };
        out.push_str(&format!(
            "    ({rel:?}, {content_type:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    out.push_str("]\n");
    let dest =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("static_assets.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Editor back-ups and hidden files are not part of the UI.
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        if path.is_dir() {
            println!("cargo:rerun-if-changed={}", path.display());
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}
