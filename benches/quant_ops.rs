//! `cargo bench --bench quant_ops`: on the CPU, how should a quantized linear layer multiply?
//! Compares, per block type and activation rows M, on the bench-shaped DiT's weight shapes
//! (768 → 2048, 2048 → 768): dequantizing the weight per product (f16 arithmetic as ComfyUI-GGUF
//! and diffusers decode, or f32 as llama.cpp does) followed by the f32 product — what `Lin` does —
//! against integer dot products with 8-bit activations, without a copy of the weight
//! (`vec_dot_matmul`) and through candle's `QMatMul`, which keeps a repacked copy of every weight
//! it multiplies (resident bytes then grow past the file's).
//!
//! A second table (`--precision int8`'s choice) times, on Z-Image's real DiT linear shapes
//! (3840 → 3840, 3840 → 10240, 10240 → 3840) at M = 1024 and 4096 tokens, a `Lin` with an f32
//! weight (MKL's sgemm in an MKL build) against the same `Lin` with its weight in per-channel int8
//! (our AVX512-VNNI kernel, activations quantized per row on every call) and against Q8_0 blocks
//! through candle's integer vec-dot, with the int8 result's error relative to the f32 product.
//!
//! Options after `--`: `--runs N` (default 5), `--types q8_0,q4_k,q6_k`, `--tables blocks,int8`
//! (default both), `--tokens 1024,4096`.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use zturbo::ops::cpu::int8::vnni_available;
use zturbo::ops::quantized::{dequantize_blocks, quantize_rows, vec_dot_matmul, BlockArithmetic};
use zturbo::ops::Lin;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(
    runs: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        let y = f()?;
        drop(y);
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let runs: usize = get("--runs").and_then(|s| s.parse().ok()).unwrap_or(5);
    let types: Vec<GgmlDType> = get("--types")
        .unwrap_or_else(|| "q8_0,q4_k,q6_k".into())
        .split(',')
        .filter_map(|t| match t {
            "q8_0" => Some(GgmlDType::Q8_0),
            "q4_0" => Some(GgmlDType::Q4_0),
            "q4_k" => Some(GgmlDType::Q4K),
            "q5_k" => Some(GgmlDType::Q5K),
            "q6_k" => Some(GgmlDType::Q6K),
            _ => None,
        })
        .collect();
    let tables = get("--tables").unwrap_or_else(|| "blocks,int8".into());
    let tokens: Vec<usize> = get("--tokens")
        .unwrap_or_else(|| "1024,4096".into())
        .split(',')
        .filter_map(|t| t.parse().ok())
        .collect();
    let dev = Device::Cpu;
    if tables.contains("int8") {
        int8_table(runs, &tokens)?;
    }
    if !tables.contains("blocks") {
        return Ok(());
    }
    println!(
        "quantized linear on the CPU ({} threads), median of {runs} runs, ms",
        candle_core::utils::get_num_threads()
    );
    println!();
    println!("| type | M | K → N | dequantize f16 arith. | dequantize f32 arith. | f32 product alone | dequantize (f16) + product | vec-dot (no copy) | QMatMul (repacked copy) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for t in types {
        for (k, n) in [(768usize, 2048usize), (2048, 768)] {
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
            let q = quantize_rows(&w, t)?;
            let qm = QMatMul::from_qtensor(quantize_rows(&w, t)?)?;
            for m in [16usize, 256, 1024] {
                let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
                let deq = time(runs, || {
                    dequantize_blocks(&q, DType::F32, BlockArithmetic::F16)
                })?;
                let deq32 = time(runs, || {
                    dequantize_blocks(&q, DType::F32, BlockArithmetic::F32)
                })?;
                let wd = dequantize_blocks(&q, DType::F32, BlockArithmetic::F16)?;
                let product = time(runs, || x.broadcast_matmul(&wd.t()?))?;
                let dense = time(runs, || {
                    let wd = dequantize_blocks(&q, DType::F32, BlockArithmetic::F16)?;
                    x.broadcast_matmul(&wd.t()?)
                })?;
                let vd = time(runs, || {
                    vec_dot_matmul(&x, &q)?
                        .ok_or_else(|| candle_core::Error::Msg("no vec-dot kernel".into()))
                })?;
                let qmm = time(runs, || qm.forward(&x))?;
                println!(
                    "| {t:?} | {m} | {k} → {n} | {deq:.2} | {deq32:.2} | {product:.2} | {dense:.2} | {vd:.2} | {qmm:.2} |"
                );
            }
        }
    }
    Ok(())
}

/// The CPU's model name and the flags that pick a CPU product path.
fn cpu_line() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = text
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_string();
    let flags: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split(':').nth(1))
        .map(|f| f.split_whitespace().collect())
        .unwrap_or_default();
    let shown: Vec<&str> = [
        "avx2",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_bf16",
        "amx_int8",
    ]
    .into_iter()
    .filter(|f| flags.contains(f))
    .collect();
    format!("{model} ({})", shown.join(", "))
}

/// f32 `Lin` against int8 `Lin` (and Q8_0 vec-dot) on the DiT's real linear shapes.
fn int8_table(runs: usize, tokens: &[usize]) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!(
        "int8 vs f32 linear on the CPU: {}, {} threads, int8 kernel {}, median of {runs} runs, ms",
        cpu_line(),
        candle_core::utils::get_num_threads(),
        if vnni_available() {
            "AVX512-VNNI"
        } else {
            "portable (no AVX512-VNNI)"
        }
    );
    println!();
    println!("| M | K → N | f32 `Lin` | int8 `Lin` | f32 / int8 | Q8_0 vec-dot | int8 max error ÷ max output |");
    println!("|---|---|---|---|---|---|---|");
    for (k, n) in [(3840usize, 3840usize), (3840, 10240), (10240, 3840)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let f32_lin = Lin::from_parts(w.clone(), None, DType::F32)?;
        let mut int8_lin = f32_lin.clone();
        int8_lin.quantize_int8()?;
        let q8 = quantize_rows(&w, GgmlDType::Q8_0)?;
        for &m in tokens {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
            let t_f32 = time(runs, || f32_lin.forward(&x))?;
            let t_i8 = time(runs, || int8_lin.forward(&x))?;
            // candle's vec-dot is slow at these sizes: timed once per shape, at the smaller M.
            let t_q8 = if m == tokens[0] {
                let t = time(1, || {
                    vec_dot_matmul(&x, &q8)?
                        .ok_or_else(|| candle_core::Error::Msg("no vec-dot kernel".into()))
                })?;
                format!("{t:.1}")
            } else {
                "–".into()
            };
            let want = f32_lin.forward(&x)?;
            let got = int8_lin.forward(&x)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            println!(
                "| {m} | {k} → {n} | {t_f32:.1} | {t_i8:.1} | {:.2} | {t_q8} | {err:.4} |",
                t_f32 / t_i8
            );
        }
    }
    println!();
    Ok(())
}
