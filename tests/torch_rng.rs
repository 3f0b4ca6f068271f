//! Portable seeds: zturbo's re-implementation of PyTorch's CPU generator reproduces
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` bit for bit.
//! Golden: `tests/fixtures/torch_rng.safetensors`, made by `tests/fixtures/gen/gen_torch_rng.py`
//! with torch 2.15.0 (x86-64, AVX-512 capability); its docstring lists every tensor.

mod common;

use candle_core::Device;
use common::Golden;
use sha2::{Digest, Sha256};
use zturbo::nn::torch_rng::{randn, TorchGenerator};

fn golden() -> Golden {
    Golden::load("torch_rng.safetensors")
}

fn list<T: serde::de::DeserializeOwned>(g: &Golden, key: &str) -> Vec<T> {
    serde_json::from_value(g.json(key)).unwrap()
}

fn values(g: &Golden, name: &str) -> Vec<f32> {
    g.get(name).flatten_all().unwrap().to_vec1().unwrap()
}

#[track_caller]
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ, first at {}: {} vs {}",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}

#[test]
fn every_size_and_seed_matches_torch_bit_for_bit() {
    let g = golden();
    let seeds: Vec<u64> = list(&g, "seeds");
    let sizes: Vec<usize> = list(&g, "sizes");
    assert!(seeds.contains(&(1u64 << 63)) && seeds.contains(&u64::MAX));
    for &seed in &seeds {
        for &n in &sizes {
            let want = values(&g, &format!("randn.s{seed}.n{n}"));
            assert_bits(
                &format!("seed {seed}, {n} values"),
                &TorchGenerator::new(seed).randn(n),
                &want,
            );
        }
    }
}

#[test]
fn latent_shapes_match_torch_bit_for_bit() {
    let g = golden();
    let seeds: Vec<u64> = list(&g, "seeds");
    let shapes: Vec<Vec<usize>> = list(&g, "shapes");
    let hashed: Vec<Vec<usize>> = list(&g, "hashed_shapes");
    let name = |s: &[usize]| {
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x")
    };
    for &seed in &seeds {
        for shape in &shapes {
            let t = randn(seed, shape, &Device::Cpu).unwrap();
            assert_eq!(t.dims(), shape.as_slice());
            let want = values(&g, &format!("shape.s{seed}.{}", name(shape)));
            assert_bits(
                &format!("seed {seed} {shape:?}"),
                &t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &want,
            );
        }
        for shape in &hashed {
            let n = shape.iter().product();
            let bytes: Vec<u8> = TorchGenerator::new(seed)
                .randn(n)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let got = format!("{:x}", Sha256::digest(&bytes));
            let key = format!("sha256.s{seed}.{}", name(shape));
            assert_eq!(
                &got,
                g.meta.get(&key).unwrap(),
                "seed {seed} {shape:?}: the draw's SHA-256 differs from torch's"
            );
        }
    }
}

#[test]
fn draws_on_one_generator_follow_torch_state() {
    let g = golden();
    let seeds: Vec<u64> = list(&g, "seeds");
    let sizes: Vec<usize> = list(&g, "seq_sizes");
    for &seed in &seeds {
        let mut gen = TorchGenerator::new(seed);
        let got: Vec<f32> = sizes.iter().flat_map(|&n| gen.randn(n)).collect();
        assert_bits(
            &format!("seed {seed} sequence {sizes:?}"),
            &got,
            &values(&g, &format!("seq.s{seed}")),
        );
    }
}
