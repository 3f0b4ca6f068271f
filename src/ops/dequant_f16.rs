//! GGUF block decoders that do their arithmetic in f16, one rounding per operation, exactly as
//! ComfyUI-GGUF and diffusers' GGUF loader do (`d = d.view(torch.float16)`, then `d * q - m` on
//! half tensors): a DiT from a GGUF file then gives the images those tools give. llama.cpp (and
//! transformers, through gguf-py) decode in f32 instead; [`super::quantized`] has that path too.
//!
//! Each decoder writes one block's values as f32 numbers that are exact f16 values.

/// `x` rounded to the nearest f16 value (ties to even, f16 subnormals included), as an f32 —
/// what storing an f32 result into a half tensor does. Branch-free, so block loops vectorise.
#[inline(always)]
pub fn f16r(x: f32) -> f32 {
    // Normal range: keep 11 significant bits, rounding the low 13 mantissa bits to even.
    let b = x.to_bits();
    let normal = f32::from_bits(b.wrapping_add(0x0fff + ((b >> 13) & 1)) & !0x1fff);
    // Subnormal range: multiples of 2^-24, rounded to even by the 1.5·2^23 trick.
    const M: f32 = 12_582_912.0;
    let sub = (((x * 16_777_216.0 + M) - M) * (1.0 / 16_777_216.0)).copysign(x);
    let a = x.abs();
    let r = if a >= 6.103_515_6e-5 { normal } else { sub };
    if a >= 65520.0 {
        f32::INFINITY.copysign(x)
    } else {
        r
    }
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Block sizes (values, bytes) of the types decoded here.
pub fn block_shape(t: candle_core::quantized::GgmlDType) -> Option<(usize, usize)> {
    use candle_core::quantized::GgmlDType as G;
    Some(match t {
        G::Q4_0 => (32, 18),
        G::Q4_1 => (32, 20),
        G::Q5_0 => (32, 22),
        G::Q5_1 => (32, 24),
        G::Q8_0 => (32, 34),
        G::Q2K => (256, 84),
        G::Q3K => (256, 110),
        G::Q4K => (256, 144),
        G::Q5K => (256, 176),
        G::Q6K => (256, 210),
        _ => return None,
    })
}

#[inline(always)]
fn decode_blocks_plain(
    t: candle_core::quantized::GgmlDType,
    block: usize,
    bytes_per_block: usize,
    data: &[u8],
    out: &mut [f32],
) {
    for (y, x) in out
        .chunks_exact_mut(block)
        .zip(data.chunks_exact(bytes_per_block))
    {
        decode_block(t, x, y);
    }
}

super::cpu::with_avx512!(
    pub fn decode_blocks(
        t: candle_core::quantized::GgmlDType,
        block: usize,
        bytes_per_block: usize,
        data: &[u8],
        out: &mut [f32]
    ) => decode_blocks_plain
);

/// Decodes one block of type `t` into `y` (`y.len()` values). Index loops over fixed-size
/// arrays on purpose: the compiler vectorises them.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub fn decode_block(t: candle_core::quantized::GgmlDType, b: &[u8], y: &mut [f32]) {
    use candle_core::quantized::GgmlDType as G;
    match t {
        G::Q4_0 => {
            let (Ok(y), Ok(b)) = (<&mut [f32; 32]>::try_from(y), <&[u8; 18]>::try_from(b)) else {
                return;
            };
            let d = half(b, 0);
            for j in 0..16 {
                let q = b[2 + j];
                y[j] = f16r(d * ((q & 0x0f) as i32 - 8) as f32);
                y[j + 16] = f16r(d * ((q >> 4) as i32 - 8) as f32);
            }
        }
        G::Q4_1 => {
            let (Ok(y), Ok(b)) = (<&mut [f32; 32]>::try_from(y), <&[u8; 20]>::try_from(b)) else {
                return;
            };
            let (d, m) = (half(b, 0), half(b, 2));
            for j in 0..16 {
                let q = b[4 + j];
                y[j] = f16r(f16r(d * (q & 0x0f) as f32) + m);
                y[j + 16] = f16r(f16r(d * (q >> 4) as f32) + m);
            }
        }
        G::Q5_0 => {
            let d = half(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let q = b[6 + j];
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                y[j] = f16r(d * (((q & 0x0f) as u32 | h0) as i32 - 16) as f32);
                y[j + 16] = f16r(d * (((q >> 4) as u32 | h1) as i32 - 16) as f32);
            }
        }
        G::Q5_1 => {
            let (d, m) = (half(b, 0), half(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for j in 0..16 {
                let q = b[8 + j];
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                y[j] = f16r(f16r(d * ((q & 0x0f) as u32 | h0) as f32) + m);
                y[j + 16] = f16r(f16r(d * ((q >> 4) as u32 | h1) as f32) + m);
            }
        }
        G::Q8_0 => {
            let (Ok(y), Ok(b)) = (<&mut [f32; 32]>::try_from(y), <&[u8; 34]>::try_from(b)) else {
                return;
            };
            let d = half(b, 0);
            for j in 0..32 {
                y[j] = f16r(d * (b[2 + j] as i8) as f32);
            }
        }
        G::Q2K => {
            // scales[16] qs[64] d dmin; value = d·(sc & 15)·q − dmin·(sc >> 4), q 2 bits.
            let (Ok(y), Ok(b)) = (<&mut [f32; 256]>::try_from(y), <&[u8; 84]>::try_from(b)) else {
                return;
            };
            let (d, dmin) = (half(b, 80), half(b, 82));
            for h in 0..2 {
                let Some(qs) = b[16 + h * 32..].first_chunk::<32>() else {
                    return;
                };
                for s in 0..4 {
                    for half16 in 0..2 {
                        let sc = b[h * 8 + s * 2 + half16];
                        let dl = f16r(d * (sc & 0x0f) as f32);
                        let ml = f16r(dmin * (sc >> 4) as f32);
                        let base = h * 128 + s * 32 + half16 * 16;
                        let Some(out) = y[base..].first_chunk_mut::<16>() else {
                            return;
                        };
                        for k in 0..16 {
                            let q = (qs[half16 * 16 + k] >> (2 * s)) & 3;
                            out[k] = f16r(f16r(dl * q as f32) - ml);
                        }
                    }
                }
            }
        }
        G::Q3K => {
            // hmask[32] qs[64] scales[12] d; 6-bit signed scales, q = 2 low bits − 4·!high bit.
            let (Ok(y), Ok(b)) = (<&mut [f32; 256]>::try_from(y), <&[u8; 110]>::try_from(b)) else {
                return;
            };
            let d = half(b, 108);
            let Some(hmask) = b[0..].first_chunk::<32>() else {
                return;
            };
            let sc = &b[96..108];
            let mut dl = [0f32; 16];
            for (k, v) in dl.iter_mut().enumerate() {
                let low = if k < 8 { sc[k] & 0x0f } else { sc[k - 8] >> 4 };
                let high = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
                let s = ((low | (high << 4)) as i32) - 32;
                *v = f16r(d * s as f32);
            }
            for h in 0..2 {
                let Some(qs) = b[32 + h * 32..].first_chunk::<32>() else {
                    return;
                };
                for s in 0..4 {
                    let bit = h * 4 + s;
                    for half16 in 0..2 {
                        let scale = dl[h * 8 + s * 2 + half16];
                        let base = h * 128 + s * 32 + half16 * 16;
                        let Some(out) = y[base..].first_chunk_mut::<16>() else {
                            return;
                        };
                        for k in 0..16 {
                            let kk = half16 * 16 + k;
                            let low = ((qs[kk] >> (2 * s)) & 3) as i32;
                            let high = (((hmask[kk] >> bit) & 1) ^ 1) as i32;
                            out[k] = f16r(scale * (low - (high << 2)) as f32);
                        }
                    }
                }
            }
        }
        G::Q4K | G::Q5K => {
            // d dmin scales[12] (qh[32] for Q5_K) qs[128]; 8 sub-blocks of 32 with 6-bit scale
            // and min; value = d·sc·q − dmin·m.
            let Ok(y) = <&mut [f32; 256]>::try_from(y) else {
                return;
            };
            let five = t == G::Q5K;
            if b.len() < if five { 176 } else { 144 } {
                return;
            }
            let (d, dmin) = (half(b, 0), half(b, 2));
            let s = &b[4..16];
            let no_high = [0u8; 32];
            let qh: &[u8; 32] = if five {
                match b[16..].first_chunk::<32>() {
                    Some(q) => q,
                    None => return,
                }
            } else {
                &no_high
            };
            let qs_at = if five { 48 } else { 16 };
            for j in 0..8 {
                let (sc, m) = if j < 4 {
                    (s[j] & 0x3f, s[4 + j] & 0x3f)
                } else {
                    (
                        (s[8 + j - 4] & 0x0f) | ((s[j - 4] >> 2) & 0x30),
                        (s[8 + j - 4] >> 4) | ((s[4 + j - 4] >> 2) & 0x30),
                    )
                };
                let d1 = f16r(d * sc as f32);
                let m1 = f16r(dmin * m as f32);
                let (c, nib) = (j / 2, j % 2);
                let Some(qs) = b[qs_at + c * 32..].first_chunk::<32>() else {
                    return;
                };
                let Some(out) = y[j * 32..].first_chunk_mut::<32>() else {
                    return;
                };
                for k in 0..32 {
                    let q = ((qs[k] >> (4 * nib)) & 0x0f) | (((qh[k] >> j) & 1) << 4);
                    out[k] = f16r(f16r(d1 * q as f32) - m1);
                }
            }
        }
        G::Q6K => {
            // ql[128] qh[64] scales[16] (i8) d; q = 4 low bits | 2 high bits << 4, minus 32.
            let (Ok(y), Ok(b)) = (<&mut [f32; 256]>::try_from(y), <&[u8; 210]>::try_from(b)) else {
                return;
            };
            let d = half(b, 208);
            let mut dl = [0f32; 16];
            for (k, v) in dl.iter_mut().enumerate() {
                *v = f16r(d * (b[192 + k] as i8) as f32);
            }
            for h in 0..2 {
                let Some(qh) = b[128 + h * 32..].first_chunk::<32>() else {
                    return;
                };
                for s in 0..4 {
                    let Some(ql) = b[h * 64 + (s % 2) * 32..].first_chunk::<32>() else {
                        return;
                    };
                    for half16 in 0..2 {
                        let scale = dl[h * 8 + s * 2 + half16];
                        let base = h * 128 + s * 32 + half16 * 16;
                        let Some(out) = y[base..].first_chunk_mut::<16>() else {
                            return;
                        };
                        for k in 0..16 {
                            let kk = half16 * 16 + k;
                            let low = (ql[kk] >> (4 * (s / 2))) & 0x0f;
                            let high = (qh[kk] >> (2 * s)) & 3;
                            let q = ((low | (high << 4)) as i32) - 32;
                            out[k] = f16r(scale * q as f32);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16r_rounds_like_half() {
        // Reference: the `half` crate's correctly rounded f32 → f16 conversion.
        let mut x = 1.0e-9f32;
        while x < 70000.0 {
            for v in [x, -x, x * 1.000_123, x * 0.999_77] {
                let want = half::f16::from_f32(v).to_f32();
                assert_eq!(f16r(v).to_bits(), want.to_bits(), "{v:e}");
            }
            x *= 1.013;
        }
        // Ties go to even.
        let tie = 1.0 + 2f32.powi(-11);
        assert_eq!(f16r(tie), half::f16::from_f32(tie).to_f32());
    }
}
