//! GGUF block decoders that do their arithmetic in f16, one rounding per operation, exactly as
//! ComfyUI-GGUF and diffusers' GGUF loader do (`d = d.view(torch.float16)`, then `d * q - m` on
//! half tensors): a DiT from a GGUF file then gives the images those tools give. llama.cpp (and
//! transformers, through gguf-py) decode in f32 instead; [`super::quantized`] has that path too.
//!
//! Each decoder writes one block's values as f32 numbers that are exact f16 values.

/// `x` rounded to the nearest f16 value (ties to even, f16 subnormals included), as an f32 —
/// what storing an f32 result into a half tensor does.
#[inline(always)]
pub fn f16r(x: f32) -> f32 {
    let a = x.abs();
    if a >= 6.103_515_6e-5 {
        if a >= 65520.0 {
            return if x.is_nan() {
                x
            } else {
                f32::INFINITY.copysign(x)
            };
        }
        // Keep 11 significant bits: round the low 13 bits of the f32 mantissa, ties to even.
        let b = x.to_bits();
        f32::from_bits(b.wrapping_add(0x0fff + ((b >> 13) & 1)) & !0x1fff)
    } else {
        // f16 subnormals are multiples of 2^-24.
        (x * 16_777_216.0).round_ties_even() * (1.0 / 16_777_216.0)
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

/// Decodes one block of type `t` into `y` (`y.len()` values).
pub fn decode_block(t: candle_core::quantized::GgmlDType, b: &[u8], y: &mut [f32]) {
    use candle_core::quantized::GgmlDType as G;
    match t {
        G::Q4_0 => {
            let d = half(b, 0);
            for j in 0..16 {
                let q = b[2 + j];
                y[j] = f16r(d * ((q & 0x0f) as i32 - 8) as f32);
                y[j + 16] = f16r(d * ((q >> 4) as i32 - 8) as f32);
            }
        }
        G::Q4_1 => {
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
            let d = half(b, 0);
            for j in 0..32 {
                y[j] = f16r(d * (b[2 + j] as i8) as f32);
            }
        }
        G::Q2K => {
            // scales[16] qs[64] d dmin; value = d·(sc & 15)·q − dmin·(sc >> 4), q 2 bits.
            let (d, dmin) = (half(b, 80), half(b, 82));
            let (scales, qs) = (&b[0..16], &b[16..80]);
            for (e, v) in y.iter_mut().enumerate().take(256) {
                let (h, r) = (e / 128, e % 128);
                let (s, k) = (r / 32, r % 32);
                let q = (qs[h * 32 + k] >> (2 * s)) & 3;
                let sc = scales[e / 16];
                let dl = f16r(d * (sc & 0x0f) as f32);
                let ml = f16r(dmin * (sc >> 4) as f32);
                *v = f16r(f16r(dl * q as f32) - ml);
            }
        }
        G::Q3K => {
            // hmask[32] qs[64] scales[12] d; 6-bit signed scales, q = 2 low bits − 4·!high bit.
            let d = half(b, 108);
            let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
            let mut dl = [0f32; 16];
            for (k, v) in dl.iter_mut().enumerate() {
                let low = if k < 8 { sc[k] & 0x0f } else { sc[k - 8] >> 4 };
                let high = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
                let s = ((low | (high << 4)) as i32) - 32;
                *v = f16r(d * s as f32);
            }
            for (e, v) in y.iter_mut().enumerate().take(256) {
                let (h, r) = (e / 128, e % 128);
                let (s, k) = (r / 32, r % 32);
                let low = ((qs[h * 32 + k] >> (2 * s)) & 3) as i32;
                let high = ((hmask[k] >> (e / 32)) & 1) as i32 ^ 1;
                *v = f16r(dl[e / 16] * (low - (high << 2)) as f32);
            }
        }
        G::Q4K | G::Q5K => {
            // d dmin scales[12] (qh[32] for Q5_K) qs[128]; 8 sub-blocks of 32 with 6-bit scale
            // and min; value = d·sc·q − dmin·m.
            let (d, dmin) = (half(b, 0), half(b, 2));
            let s = &b[4..16];
            let five = t == G::Q5K;
            let (qh, qs) = if five {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
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
                for k in 0..32 {
                    let mut q = (qs[c * 32 + k] >> (4 * nib)) & 0x0f;
                    if five {
                        q |= ((qh[k] >> j) & 1) << 4;
                    }
                    y[j * 32 + k] = f16r(f16r(d1 * q as f32) - m1);
                }
            }
        }
        G::Q6K => {
            // ql[128] qh[64] scales[16] (i8) d; q = 4 low bits | 2 high bits << 4, minus 32.
            let d = half(b, 208);
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let mut dl = [0f32; 16];
            for (k, v) in dl.iter_mut().enumerate() {
                *v = f16r(d * (sc[k] as i8) as f32);
            }
            for (e, v) in y.iter_mut().enumerate().take(256) {
                let (h, r) = (e / 128, e % 128);
                let low = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
                let high = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
                let q = ((low | (high << 4)) as i32) - 32;
                *v = f16r(dl[e / 16] * q as f32);
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
