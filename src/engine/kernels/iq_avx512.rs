//! IQ4_XS against q8_K with AVX-512 (F, BW, VL, VNNI): two 32-weight blocks per 512-bit
//! register, the weights looked up from the 16-entry table in every 128-bit lane, and
//! `vpdpbusd` for the products (|w| unsigned times the activations with w's sign, as the AVX2
//! kernels use `sign_epi8`; AVX-512 has no byte sign instruction, so a masked subtraction
//! negates them). Each super-block is summed exactly in integers, as iq.rs's scalar kernel
//! does, so the two are bit-identical. (IQ4_NL and MXFP4 run on the block kernels, repacked:
//! legacy.rs.)
//!
//! The grid types (IQ1, IQ2, IQ3) stay on the AVX2 kernels: their time goes to looking up one
//! grid entry per 4 or 8 weights with scalar loads, which wider registers do not shorten.

use super::iq::{IqType, Q8KBlock};
use super::iq_tables::KVALUES_IQ4NL;
use super::prefetch;
use std::arch::x86_64::*;

/// The 16 table bytes in every 128-bit lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn table(t: &[i8; 16]) -> __m512i {
    _mm512_broadcast_i32x4(_mm_loadu_si128(t.as_ptr() as *const __m128i))
}

/// Two blocks' 16 bytes of packed nibbles (`p0`, `p1`) as the 64 weights
/// [block 0: 0..16, 16..32 | block 1: 0..16, 16..32], looked up in `t`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn lookup2(t: __m512i, p0: *const u8, p1: *const u8) -> __m512i {
    let m4 = _mm256_set1_epi8(0x0F);
    let q = _mm256_set_m128i(
        _mm_loadu_si128(p1 as *const __m128i),
        _mm_loadu_si128(p0 as *const __m128i),
    );
    let lo = _mm256_and_si256(q, m4);
    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    // [lo0, lo1, hi0, hi1] → [lo0, hi0, lo1, hi1]
    let idx = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    let idx = _mm512_shuffle_i64x2(idx, idx, 0b11_01_10_00);
    _mm512_shuffle_epi8(t, idx)
}

/// Σ w·y over each 4 consecutive bytes (16 i32 lanes), w and y signed, |y| ≤ 127.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot4s(w: __m512i, y: __m512i) -> __m512i {
    let z = _mm512_setzero_si512();
    let ys = _mm512_mask_sub_epi8(y, _mm512_movepi8_mask(w), z, y);
    _mm512_dpbusd_epi32(z, _mm512_abs_epi8(w), ys)
}

/// One IQ4_XS row against q8_K activations: per super-block an exact integer sum (each
/// sub-block's products times its scale), then one float update, as iq.rs's scalar kernel.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_row_iq4xs(row: &[u8], act: &[Q8KBlock]) -> f32 {
    let bb = IqType::Iq4Xs.block_bytes();
    debug_assert!(row.len() >= act.len() * bb);
    let t = table(&KVALUES_IQ4NL);
    let mut sumf = 0f32;
    for (ib, a) in act.iter().enumerate() {
        let b = row.as_ptr().add(ib * bb);
        prefetch(b, bb);
        let h = (b.add(2) as *const u16).read_unaligned() as i32;
        let ls = |j: usize| {
            ((*b.add(4 + j / 2) as i32 >> (4 * (j % 2)) & 0xF) | (h >> (2 * j) & 3) << 4) - 32
        };
        let mut acc = _mm512_setzero_si512();
        for j in (0..8).step_by(2) {
            let w = lookup2(t, b.add(8 + 16 * j), b.add(8 + 16 * (j + 1)));
            let y = _mm512_loadu_si512(a.qs.as_ptr().add(32 * j) as *const _);
            let sc = _mm512_mask_blend_epi32(
                0xFF00,
                _mm512_set1_epi32(ls(j)),
                _mm512_set1_epi32(ls(j + 1)),
            );
            acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(dot4s(w, y), sc));
        }
        let d = half::f16::from_bits((b as *const u16).read_unaligned()).to_f32();
        sumf += d * a.d * _mm512_reduce_add_epi32(acc) as f32;
    }
    sumf
}
