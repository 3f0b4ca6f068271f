//! `cargo bench --bench quant_ops`: on the CPU, how should a quantized linear layer multiply?
//! Compares, per block type and activation rows M, on the bench-shaped DiT's weight shapes
//! (768 → 2048, 2048 → 768): dequantizing the weight per product (f16 arithmetic as ComfyUI-GGUF
//! and diffusers decode, or f32 as llama.cpp does) followed by the f32 product — what `Lin` does —
//! against integer dot products with 8-bit activations, without a copy of the weight
//! (`vec_dot_matmul`) and through candle's `QMatMul`, which keeps a repacked copy of every weight
//! it multiplies (resident bytes then grow past the file's). Options after `--`: `--runs N`
//! (default 5), `--types q8_0,q4_k,q6_k`.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use zturbo::ops::quantized::{dequantize_blocks, quantize_rows, vec_dot_matmul, BlockArithmetic};

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
    let dev = Device::Cpu;
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
