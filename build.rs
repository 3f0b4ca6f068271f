//! Build steps: the table of the browser UI's files (`static/`, compiled into the binary), the CUDA
//! kernels with the `cuda` feature, and Intel MKL linked statically with the `mkl` feature (CPU
//! bf16 matrix products). MKL comes from PyPI's `mkl-static` wheel: `scripts/fetch-mkl.sh`
//! installs it under `target/mkl`; `ZTURBO_MKL_DIR` points elsewhere.

use std::path::{Path, PathBuf};

fn main() {
    static_assets();
    cuda_kernels();
    mkl();
}

/// The wheel of PyPI's `mkl-static` that build.rs fetches by itself (and scripts/fetch-mkl.sh by
/// pip): version, address and sha256, pinned.
const MKL_VERSION: &str = "2026.2.0";
const MKL_LIBS_TAG: &str = "seq1";
const MKL_WHEEL_URL: &str = "https://files.pythonhosted.org/packages/38/9a/\
    cba6e6f980cae556f9028a86dd19669c686451a0649bf931aa556974fcfb/\
    mkl_static-2026.2.0-py2.py3-none-manylinux_2_28_x86_64.whl";
const MKL_WHEEL_SHA256: &str = "090e439bf202b45579c75d2ba50ff7ead05752d553a06aba79c3ed2b5247921b";
/// The three static libraries zturbo links (LP64 interface, sequential threading layer, core).
const MKL_LIBS: [&str; 3] = [
    "libmkl_intel_lp64.a",
    "libmkl_sequential.a",
    "libmkl_core.a",
];
/// Longest the download may take before the build goes on without MKL.
const MKL_FETCH_SECONDS: &str = "300";

/// Intel MKL, linked statically on x86-64 Linux, sets `cfg(zturbo_mkl)` (f32 products through
/// `cblas_sgemm`, bf16 products on CPUs with AMX / AVX512-BF16). The libraries come from
/// `ZTURBO_MKL_DIR/lib` when set, else from `<target>/mkl/lib`; when those are missing, build.rs
/// downloads the pinned `mkl-static` wheel from PyPI (curl, time-boxed, sha256-checked) and
/// unpacks the three libraries there once. If that fails (offline, no curl), the build goes on in
/// pure Rust with one warning, and remembers the failure in `<target>/mkl/fetch-failed` so later
/// builds do not retry (delete it to retry). `ZTURBO_MKL=0` skips MKL altogether; the `mkl`
/// feature makes it required (the build fails instead of falling back).
fn mkl() {
    println!("cargo:rustc-check-cfg=cfg(zturbo_mkl)");
    println!("cargo:rerun-if-env-changed=ZTURBO_MKL_DIR");
    println!("cargo:rerun-if-env-changed=ZTURBO_MKL");
    let required = std::env::var_os("CARGO_FEATURE_MKL").is_some();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch != "x86_64" || os != "linux" {
        if required {
            panic!("feature `mkl`: MKL is linked on x86-64 Linux only (target {arch}-{os})");
        }
        return;
    }
    let off = std::env::var("ZTURBO_MKL").is_ok_and(|v| v == "0" || v == "off");
    if off && !required {
        return;
    }
    let (root, fetchable) = match std::env::var_os("ZTURBO_MKL_DIR") {
        Some(d) => (PathBuf::from(d), false),
        None => (target_dir().join("mkl"), true),
    };
    let lib = root.join("lib");
    let version = root.join("version");
    let failed = root.join("fetch-failed");
    let want_version = format!("{MKL_VERSION}-{MKL_LIBS_TAG}");
    let present = MKL_LIBS.iter().all(|l| lib.join(l).is_file())
        && (!fetchable
            || std::fs::read_to_string(&version).is_ok_and(|v| v.trim() == want_version));
    if !present {
        let why = if !fetchable {
            format!("{} lacks {}", lib.display(), MKL_LIBS.join(", "))
        } else if failed.is_file() && !required {
            let reason = std::fs::read_to_string(&failed).unwrap_or_default();
            format!(
                "an earlier fetch failed ({}); delete {} to retry",
                reason.trim(),
                failed.display()
            )
        } else {
            match fetch_mkl(&root) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&failed);
                    String::new()
                }
                Err(e) => {
                    let _ = std::fs::create_dir_all(&root);
                    let _ = std::fs::write(&failed, &e);
                    e
                }
            }
        };
        // Watch only files that exist (a missing one would rerun this script on every build).
        for p in [&failed, &lib] {
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
        if !why.is_empty() {
            if required {
                panic!(
                    "feature `mkl`: no MKL: {why}. Run scripts/fetch-mkl.sh or set ZTURBO_MKL_DIR \
                     to a folder with lib/{}.",
                    MKL_LIBS.join(", lib/")
                );
            }
            println!(
                "cargo:warning=zturbo: built without MKL (pure-Rust matrix products, slower on the \
                 CPU): {why}"
            );
            return;
        }
    }
    if version.is_file() {
        println!("cargo:rerun-if-changed={}", version.display());
    }
    for l in MKL_LIBS {
        println!("cargo:rerun-if-changed={}", lib.join(l).display());
    }
    println!("cargo:rustc-link-arg=-Wl,--start-group");
    for l in MKL_LIBS {
        println!("cargo:rustc-link-arg={}", lib.join(l).display());
    }
    println!("cargo:rustc-link-arg=-Wl,--end-group");
    for l in ["pthread", "m", "dl"] {
        println!("cargo:rustc-link-arg=-l{l}");
    }
    println!("cargo:rustc-cfg=zturbo_mkl");
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `target/` beside Cargo.toml.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                manifest_dir().join(d)
            }
        }
        None => manifest_dir().join("target"),
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
}

/// Downloads the pinned wheel into `root` with curl, checks its sha256 and unpacks the three
/// libraries into `root/lib` (written under temporary names, renamed when complete, `version`
/// last). Returns a one-line reason on failure.
fn fetch_mkl(root: &Path) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    std::fs::create_dir_all(root.join("lib")).map_err(|e| format!("{}: {e}", root.display()))?;
    let wheel = root.join("mkl-static.whl.part");
    let status = std::process::Command::new("curl")
        .args([
            "--fail",
            "--location",
            "--silent",
            "--show-error",
            "--connect-timeout",
            "20",
            "--max-time",
            MKL_FETCH_SECONDS,
            "--output",
        ])
        .arg(&wheel)
        .arg(MKL_WHEEL_URL)
        .status()
        .map_err(|e| format!("running curl: {e}"))?;
    let result = (|| {
        if !status.success() {
            return Err(format!(
                "downloading {MKL_WHEEL_URL} failed (curl: {status})"
            ));
        }
        let mut file =
            std::fs::File::open(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", wheel.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != MKL_WHEEL_SHA256 {
            return Err(format!(
                "the wheel's sha256 is {got}, expected {MKL_WHEEL_SHA256}"
            ));
        }
        unzip_libs(&wheel, &root.join("lib"))?;
        std::fs::write(
            root.join("version"),
            format!("{MKL_VERSION}-{MKL_LIBS_TAG}\n"),
        )
        .map_err(|e| format!("{}: {e}", root.display()))
    })();
    let _ = std::fs::remove_file(&wheel);
    result
}

/// Extracts the members of the zip `zip` whose file names are in [`MKL_LIBS`] into `dest` (stored
/// or deflated entries; the central directory gives names, sizes and offsets).
fn unzip_libs(zip: &Path, dest: &Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let err = |e: std::io::Error| format!("{}: {e}", zip.display());
    let mut f = std::fs::File::open(zip).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    // End of central directory: the last 22 bytes plus a comment of up to 64 KiB.
    let tail_len = len.min(22 + 65535);
    f.seek(SeekFrom::Start(len - tail_len)).map_err(err)?;
    let mut tail = vec![0u8; tail_len as usize];
    f.read_exact(&mut tail).map_err(err)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or_else(|| format!("{}: not a zip file", zip.display()))?;
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as u64;
    let u32_at =
        |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as u64;
    let entries = u16_at(&tail, eocd + 10);
    let cd_size = u32_at(&tail, eocd + 12);
    let cd_offset = u32_at(&tail, eocd + 16);
    if cd_offset == 0xffff_ffff || entries == 0xffff {
        return Err(format!(
            "{}: zip64 archives are not supported",
            zip.display()
        ));
    }
    f.seek(SeekFrom::Start(cd_offset)).map_err(err)?;
    let mut cd = vec![0u8; cd_size as usize];
    f.read_exact(&mut cd).map_err(err)?;
    let mut at = 0usize;
    let mut found = 0;
    for _ in 0..entries {
        if at + 46 > cd.len() || cd[at..at + 4] != [0x50, 0x4b, 0x01, 0x02] {
            return Err(format!("{}: bad central directory", zip.display()));
        }
        let method = u16_at(&cd, at + 10);
        let csize = u32_at(&cd, at + 20);
        let usize_ = u32_at(&cd, at + 24);
        let name_len = u16_at(&cd, at + 28) as usize;
        let extra_len = u16_at(&cd, at + 30) as usize;
        let comment_len = u16_at(&cd, at + 32) as usize;
        let local = u32_at(&cd, at + 42);
        let name = String::from_utf8_lossy(&cd[at + 46..at + 46 + name_len]).into_owned();
        at += 46 + name_len + extra_len + comment_len;
        let base = name.rsplit('/').next().unwrap_or("");
        if !MKL_LIBS.contains(&base) {
            continue;
        }
        if csize == 0xffff_ffff || usize_ == 0xffff_ffff || local == 0xffff_ffff {
            return Err(format!(
                "{}: {name} is a zip64 entry (not supported)",
                zip.display()
            ));
        }
        // The local header repeats the name and has its own extra field before the data.
        f.seek(SeekFrom::Start(local)).map_err(err)?;
        let mut lh = [0u8; 30];
        f.read_exact(&mut lh).map_err(err)?;
        let data = local + 30 + u16_at(&lh, 26) + u16_at(&lh, 28);
        f.seek(SeekFrom::Start(data)).map_err(err)?;
        let raw = (&mut f).take(csize);
        let part = dest.join(format!("{base}.part"));
        let mut out =
            std::fs::File::create(&part).map_err(|e| format!("{}: {e}", part.display()))?;
        let copied = match method {
            0 => std::io::copy(&mut { raw }, &mut out),
            8 => std::io::copy(&mut flate2::read::DeflateDecoder::new(raw), &mut out),
            m => return Err(format!("{}: {name}: compression method {m}", zip.display())),
        }
        .map_err(|e| format!("{}: {name}: {e}", zip.display()))?;
        if copied != usize_ {
            return Err(format!(
                "{}: {name}: {copied} bytes, expected {usize_}",
                zip.display()
            ));
        }
        drop(out);
        std::fs::rename(&part, dest.join(base)).map_err(|e| format!("{}: {e}", part.display()))?;
        found += 1;
    }
    if found != MKL_LIBS.len() {
        return Err(format!(
            "{}: the wheel lacks some of {}",
            zip.display(),
            MKL_LIBS.join(", ")
        ));
    }
    Ok(())
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
