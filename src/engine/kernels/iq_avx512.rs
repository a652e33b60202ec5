//! The table-lookup types (IQ4_NL and MXFP4 against q8_0, IQ4_XS against q8_K) with AVX-512
//! (F, BW, VL, VNNI): two 32-weight blocks per 512-bit register, the weights looked up from
//! the 16-entry table in every 128-bit lane, and `vpdpbusd` for the products (|w| unsigned
//! times the activations with w's sign, as the AVX2 kernels use `sign_epi8`; AVX-512 has no
//! byte sign instruction, so a masked subtraction negates them).
//!
//! IQ4_XS sums each super-block exactly in integers, as iq.rs's scalar kernel does, so the two
//! are bit-identical. IQ4_NL and MXFP4 accumulate `d·d'·Σ` in 16 float lanes (two blocks at a
//! time), another order of the float additions than the AVX2 kernels' 8 lanes: results agree
//! within a few ulps of Σ|w·x| (iq.rs's tests check every instruction set against f64).
//!
//! The grid types (IQ1, IQ2, IQ3) stay on the AVX2 kernels: their time goes to looking up one
//! grid entry per 4 or 8 weights with scalar loads, which wider registers do not shorten.

use super::iq::{IqType, Q8KBlock};
use super::iq_tables::{KVALUES_IQ4NL, KVALUES_MXFP4};
use super::Q8Block;
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

/// 64 activations from two 32-byte runs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn load2(p0: *const i8, p1: *const i8) -> __m512i {
    let a = _mm256_loadu_si256(p0 as *const __m256i);
    let b = _mm256_loadu_si256(p1 as *const __m256i);
    _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1)
}

/// One IQ4_NL or MXFP4 row against q8_0 activations: per pair of blocks
/// `acc = fma(d·d' (per half), Σ, acc)` in 16 lanes; an odd last block goes to the AVX2 kernel.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_row_q8_0(ty: IqType, row: &[u8], act: &[Q8Block]) -> f32 {
    let bb = ty.block_bytes();
    debug_assert!(row.len() >= act.len() * bb);
    let (t, qoff) = match ty {
        IqType::Iq4Nl => (table(&KVALUES_IQ4NL), 2),
        _ => (table(&KVALUES_MXFP4), 1),
    };
    let scale = |b: *const u8| match ty {
        IqType::Iq4Nl => half::f16::from_bits((b as *const u16).read_unaligned()).to_f32(),
        _ => super::mxfp4::e8m0_half(*b),
    };
    let mut acc = _mm512_setzero_ps();
    let pairs = act.len() / 2;
    for (p, a) in act.chunks_exact(2).enumerate() {
        let b0 = row.as_ptr().add(2 * p * bb);
        let b1 = b0.add(bb);
        let w = lookup2(t, b0.add(qoff), b1.add(qoff));
        let s = dot4s(w, load2(a[0].qs.as_ptr(), a[1].qs.as_ptr()));
        let d = _mm512_mask_blend_ps(
            0xFF00,
            _mm512_set1_ps(scale(b0) * a[0].d),
            _mm512_set1_ps(scale(b1) * a[1].d),
        );
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc);
    }
    let mut sumf = _mm512_reduce_add_ps(acc);
    if act.len() % 2 == 1 {
        let last = 2 * pairs;
        sumf += super::iq_avx2::dot_row_q8_0(ty, &row[last * bb..], &act[last..]);
    }
    sumf
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
