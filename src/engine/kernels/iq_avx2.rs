//! The IQ and MXFP4 kernels with AVX2 (+FMA, F16C). The 256-weight types sum each super-block
//! exactly in integers and apply one float update, as the scalar kernels in iq.rs do, so the
//! two give identical results; IQ4_NL and MXFP4 accumulate `d·d'·Σ` in 8 float lanes (as
//! ggml's AVX2 kernels do), which reorders the float additions.
//!
//! Grid groups are gathered with scalar loads into one vector (ggml's AVX2 kernels do the
//! same); signs become ±1 bytes applied to the activations with `sign_epi8`.

use super::iq::{dot_row_q8k as scalar_q8k, iq1m_scale, IqType, Q8KBlock};
use super::iq_tables::*;
use super::Q8Block;
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned() as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

#[inline]
unsafe fn u16_at(p: *const u8) -> u16 {
    (p as *const u16).read_unaligned()
}

#[inline]
unsafe fn u32_at(p: *const u8) -> u32 {
    (p as *const u32).read_unaligned()
}

/// Sum of the 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32(x: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01));
    _mm_cvtsi128_si32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_f32(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// ±1 bytes from the 32 bits of `w` (bit j set: −1 in byte j).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn signs32(w: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(w as i32), shuf);
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_or_si256(set, _mm256_set1_epi8(1))
}

/// Σ over pairs of (unsigned grid bytes × signed activations), weighted per 16-bit pair by
/// `scale`: 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn udot(g: __m256i, y: __m256i, scale: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(g, y), scale)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const i8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Two i16 scales: `a` for the first 16 bytes, `b` for the last 16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales2(a: i32, b: i32) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(b as i16), _mm_set1_epi16(a as i16))
}

/// One row of a 256-weight type against q8_K activations; identical to iq.rs's scalar one.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row_q8k(ty: IqType, row: &[u8], act: &[Q8KBlock]) -> f32 {
    let bb = ty.block_bytes();
    debug_assert!(row.len() >= act.len() * bb);
    let mut sumf = 0f32;
    for (ib, a) in act.iter().enumerate() {
        let b = row.as_ptr().add(ib * bb);
        let q8 = a.qs.as_ptr();
        match ty {
            IqType::Iq4Xs => {
                let table = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
                let m4 = _mm_set1_epi8(0x0F);
                let h = u16_at(b.add(2)) as i32;
                let mut acc = _mm256_setzero_si256();
                for j in 0..8 {
                    let ls =
                        (*b.add(4 + j / 2) as i32 >> (4 * (j % 2)) & 0xF) | (h >> (2 * j) & 3) << 4;
                    let q = _mm_loadu_si128(b.add(8 + 16 * j) as *const __m128i);
                    let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, m4));
                    let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
                    let w = _mm256_set_m128i(hi, lo);
                    let y = load(q8.add(32 * j));
                    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
                    acc = _mm256_add_epi32(
                        acc,
                        _mm256_madd_epi16(p, _mm256_set1_epi16((ls - 32) as i16)),
                    );
                }
                sumf += half(b) * a.d * hsum_i32(acc) as f32;
            }
            IqType::Iq2Xxs => {
                let mut acc = _mm256_setzero_si256();
                for j in 0..8 {
                    let (a0, a1) = (u32_at(b.add(2 + 8 * j)), u32_at(b.add(6 + 8 * j)));
                    let g = _mm256_set_epi64x(
                        IQ2XXS_GRID[(a0 >> 24) as usize] as i64,
                        IQ2XXS_GRID[(a0 >> 16 & 255) as usize] as i64,
                        IQ2XXS_GRID[(a0 >> 8 & 255) as usize] as i64,
                        IQ2XXS_GRID[(a0 & 255) as usize] as i64,
                    );
                    let s = _mm256_set_epi64x(
                        KEVEN_SIGNS[(a1 >> 21 & 127) as usize] as i64,
                        KEVEN_SIGNS[(a1 >> 14 & 127) as usize] as i64,
                        KEVEN_SIGNS[(a1 >> 7 & 127) as usize] as i64,
                        KEVEN_SIGNS[(a1 & 127) as usize] as i64,
                    );
                    let y = _mm256_sign_epi8(load(q8.add(32 * j)), s);
                    let ls = 2 * (a1 >> 28) as i16 + 1;
                    acc = _mm256_add_epi32(acc, udot(g, y, _mm256_set1_epi16(ls)));
                }
                sumf += half(b) * a.d * hsum_i32(acc) as f32 * 0.125;
            }
            IqType::Iq2Xs => {
                let mut acc = _mm256_setzero_si256();
                for j in 0..8 {
                    let q: [u16; 4] = std::array::from_fn(|l| u16_at(b.add(2 + 8 * j + 2 * l)));
                    let g = _mm256_set_epi64x(
                        IQ2XS_GRID[(q[3] & 511) as usize] as i64,
                        IQ2XS_GRID[(q[2] & 511) as usize] as i64,
                        IQ2XS_GRID[(q[1] & 511) as usize] as i64,
                        IQ2XS_GRID[(q[0] & 511) as usize] as i64,
                    );
                    let s = _mm256_set_epi64x(
                        KEVEN_SIGNS[(q[3] >> 9) as usize] as i64,
                        KEVEN_SIGNS[(q[2] >> 9) as usize] as i64,
                        KEVEN_SIGNS[(q[1] >> 9) as usize] as i64,
                        KEVEN_SIGNS[(q[0] >> 9) as usize] as i64,
                    );
                    let y = _mm256_sign_epi8(load(q8.add(32 * j)), s);
                    let sc = *b.add(66 + j) as i32;
                    let ls = scales2(2 * (sc & 0xF) + 1, 2 * (sc >> 4) + 1);
                    acc = _mm256_add_epi32(acc, udot(g, y, ls));
                }
                sumf += half(b) * a.d * hsum_i32(acc) as f32 * 0.125;
            }
            IqType::Iq2S => {
                let (qs, signs, qh, scales) = (b.add(2), b.add(34), b.add(66), b.add(74));
                let mut acc = _mm256_setzero_si256();
                for j in 0..8 {
                    let h = *qh.add(j) as usize;
                    let idx = |l: usize| *qs.add(4 * j + l) as usize | (h << (8 - 2 * l) & 0x300);
                    let g = _mm256_set_epi64x(
                        IQ2S_GRID[idx(3)] as i64,
                        IQ2S_GRID[idx(2)] as i64,
                        IQ2S_GRID[idx(1)] as i64,
                        IQ2S_GRID[idx(0)] as i64,
                    );
                    let y =
                        _mm256_sign_epi8(load(q8.add(32 * j)), signs32(u32_at(signs.add(4 * j))));
                    let sc = *scales.add(j) as i32;
                    let ls = scales2(2 * (sc & 0xF) + 1, 2 * (sc >> 4) + 1);
                    acc = _mm256_add_epi32(acc, udot(g, y, ls));
                }
                sumf += half(b) * a.d * hsum_i32(acc) as f32 * 0.125;
            }
            IqType::Iq3Xxs => {
                let (qs, gas) = (b.add(2), b.add(66));
                let mut acc = _mm256_setzero_si256();
                for j in 0..8 {
                    let aux = u32_at(gas.add(4 * j));
                    let q = qs.add(8 * j);
                    let gi = |l: usize| IQ3XXS_GRID[*q.add(l) as usize] as i32;
                    let g =
                        _mm256_set_epi32(gi(7), gi(6), gi(5), gi(4), gi(3), gi(2), gi(1), gi(0));
                    let s = _mm256_set_epi64x(
                        KEVEN_SIGNS[(aux >> 21 & 127) as usize] as i64,
                        KEVEN_SIGNS[(aux >> 14 & 127) as usize] as i64,
                        KEVEN_SIGNS[(aux >> 7 & 127) as usize] as i64,
                        KEVEN_SIGNS[(aux & 127) as usize] as i64,
                    );
                    let y = _mm256_sign_epi8(load(q8.add(32 * j)), s);
                    let ls = 2 * (aux >> 28) as i16 + 1;
                    acc = _mm256_add_epi32(acc, udot(g, y, _mm256_set1_epi16(ls)));
                }
                sumf += half(b) * a.d * hsum_i32(acc) as f32 * 0.25;
            }
            IqType::Iq3S => {
                let (qs, qh, signs, scales) = (b.add(2), b.add(66), b.add(74), b.add(106));
                let mut acc = _mm256_setzero_si256();
                for j in 0..8 {
                    let h = *qh.add(j) as usize;
                    let q = qs.add(8 * j);
                    let gi = |i: usize| IQ3S_GRID[*q.add(i) as usize | (h << (8 - i) & 256)] as i32;
                    let g =
                        _mm256_set_epi32(gi(7), gi(6), gi(5), gi(4), gi(3), gi(2), gi(1), gi(0));
                    let y =
                        _mm256_sign_epi8(load(q8.add(32 * j)), signs32(u32_at(signs.add(4 * j))));
                    let ls = 2 * (*scales.add(j / 2) >> (4 * (j % 2)) & 0xF) as i16 + 1;
                    acc = _mm256_add_epi32(acc, udot(g, y, _mm256_set1_epi16(ls)));
                }
                sumf += half(b) * a.d * hsum_i32(acc) as f32;
            }
            IqType::Iq1S => {
                let (qs, qh) = (b.add(2), b.add(34));
                let ones = _mm256_set1_epi8(1);
                let mut acc = _mm256_setzero_si256();
                let mut sumi1 = 0i32;
                for j in 0..8 {
                    let h = u16_at(qh.add(2 * j)) as usize;
                    let gi = |l: usize| {
                        IQ1S_GRID[*qs.add(4 * j + l) as usize | (h >> (3 * l) & 7) << 8] as i64
                    };
                    let g = _mm256_set_epi64x(gi(3), gi(2), gi(1), gi(0));
                    let ls = 2 * (h >> 12 & 7) as i32 + 1;
                    let p = _mm256_maddubs_epi16(ones, _mm256_sign_epi8(load(q8.add(32 * j)), g));
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(ls as i16)));
                    let delta = if h & 0x8000 != 0 { -1 } else { 1 };
                    sumi1 += ls * delta * (a.bsums[2 * j] as i32 + a.bsums[2 * j + 1] as i32);
                }
                sumf += half(b) * a.d * (hsum_i32(acc) as f32 + IQ1S_DELTA * sumi1 as f32);
            }
            IqType::Iq1M => {
                let (qs, qh) = (b, b.add(32));
                let sc: [u16; 4] = std::array::from_fn(|i| u16_at(b.add(48 + 2 * i)));
                let d = half(iq1m_scale(&sc).to_le_bytes().as_ptr());
                let ones = _mm256_set1_epi8(1);
                let (mut acc1, mut acc2) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for j in 0..8 {
                    let (h0, h1) = (*qh.add(2 * j) as usize, *qh.add(2 * j + 1) as usize);
                    let q = qs.add(4 * j);
                    let g = _mm256_set_epi64x(
                        IQ1S_GRID[*q.add(3) as usize | (h1 << 4 & 0x700)] as i64,
                        IQ1S_GRID[*q.add(2) as usize | (h1 << 8 & 0x700)] as i64,
                        IQ1S_GRID[*q.add(1) as usize | (h0 << 4 & 0x700)] as i64,
                        IQ1S_GRID[*q as usize | (h0 << 8 & 0x700)] as i64,
                    );
                    // ±1 in every byte of a group of 8.
                    let dv = |m: usize| {
                        if m != 0 {
                            -1i64
                        } else {
                            0x0101010101010101
                        }
                    };
                    let delta = _mm256_set_epi64x(
                        dv(h1 & 0x80),
                        dv(h1 & 0x08),
                        dv(h0 & 0x80),
                        dv(h0 & 0x08),
                    );
                    let s = sc[j / 2] >> (6 * (j % 2));
                    let ls = scales2(2 * (s & 7) as i32 + 1, 2 * (s >> 3 & 7) as i32 + 1);
                    let y = load(q8.add(32 * j));
                    let p1 = _mm256_maddubs_epi16(ones, _mm256_sign_epi8(y, g));
                    let p2 = _mm256_maddubs_epi16(ones, _mm256_sign_epi8(y, delta));
                    acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(p1, ls));
                    acc2 = _mm256_add_epi32(acc2, _mm256_madd_epi16(p2, ls));
                }
                sumf += d * a.d * (hsum_i32(acc1) as f32 + IQ1M_DELTA * hsum_i32(acc2) as f32);
            }
            IqType::Iq4Nl | IqType::Mxfp4 => {
                return scalar_q8k(ty, row, act);
            }
        }
    }
    sumf
}

/// One IQ4_NL or MXFP4 row against q8_0 activations: per block
/// `acc = fma(d·d', Σ pairs, acc)` in 8 lanes, summed at the end.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row_q8_0(ty: IqType, row: &[u8], act: &[Q8Block]) -> f32 {
    let bb = ty.block_bytes();
    debug_assert!(row.len() >= act.len() * bb);
    let (table, qoff) = match ty {
        IqType::Iq4Nl => (KVALUES_IQ4NL.as_ptr(), 2),
        _ => (KVALUES_MXFP4.as_ptr(), 1),
    };
    let table = _mm_loadu_si128(table as *const __m128i);
    let m4 = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for (ib, a) in act.iter().enumerate() {
        let b = row.as_ptr().add(ib * bb);
        let d = match ty {
            IqType::Iq4Nl => half(b),
            _ => super::mxfp4::e8m0_half(*b),
        };
        let q = _mm_loadu_si128(b.add(qoff) as *const __m128i);
        let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, m4));
        let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
        let w = _mm256_set_m128i(hi, lo);
        let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
        let l = _mm256_madd_epi16(p, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(l), acc);
    }
    hsum_f32(acc)
}
