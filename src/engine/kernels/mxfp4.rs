//! MXFP4 (ggml type 39, gpt-oss's expert weights): blocks of 32 E2M1 values sharing one
//! power-of-two scale, `{ e: u8, qs: [u8; 16] }`, paired with block_q8_0 activations as ggml
//! pairs them (ggml_vec_dot_mxfp4_q8_0).

use super::iq_tables::KVALUES_MXFP4;
use super::{Q8Block, QK};

/// Bytes of one block of 32 weights.
pub const BLOCK_BYTES: usize = 17;

/// ggml's GGML_E8M0_TO_FP32_HALF: 2^(e − 128), the scale for the doubled E2M1 values; e < 2
/// give the subnormals 2^−128 and 2^−127 (as ggml builds them, bit for bit).
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (e as u32 - 1) << 23
    };
    f32::from_bits(bits)
}

/// One block's 32 weights (ggml's dequantize_row_mxfp4).
pub fn dequantize_block(b: &[u8], out: &mut [f32]) {
    let d = e8m0_half(b[0]);
    for j in 0..QK / 2 {
        let q = b[1 + j];
        out[j] = KVALUES_MXFP4[(q & 0x0F) as usize] as f32 * d;
        out[j + QK / 2] = KVALUES_MXFP4[(q >> 4) as usize] as f32 * d;
    }
}

/// One row against q8_0 activations, ggml's generic arithmetic: per block
/// `sumf += (d_y · scale) · Σ q·w`.
pub fn dot_row(row: &[u8], act: &[Q8Block]) -> f32 {
    let mut sumf = 0f32;
    for (b, a) in row.chunks_exact(BLOCK_BYTES).zip(act) {
        let d = a.d * e8m0_half(b[0]);
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let q = b[1 + j];
            sumi += a.qs[j] as i32 * KVALUES_MXFP4[(q & 0x0F) as usize] as i32;
            sumi += a.qs[j + QK / 2] as i32 * KVALUES_MXFP4[(q >> 4) as usize] as i32;
        }
        sumf += d * sumi as f32;
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_half_is_two_to_the_e_minus_128() {
        for e in 0..=255u8 {
            assert_eq!(e8m0_half(e), 2f64.powi(e as i32 - 128) as f32, "e = {e}");
        }
    }
}
