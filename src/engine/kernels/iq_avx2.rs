//! The IQ and MXFP4 kernels with AVX2 (+FMA, F16C). The 256-weight types sum each super-block
//! exactly in integers and apply one float update, as the scalar kernels in iq.rs do, so the
//! two give identical results. (IQ4_NL and MXFP4 run on the block kernels, repacked:
//! legacy.rs.)
//!
//! Grid groups are gathered with scalar loads into one vector (ggml's AVX2 kernels do the
//! same: AVX2 gathers are slower here); signs are applied to the activations with `sign_epi8`
//! or an xor and subtraction. With AVX-512 only IQ4_XS has its own kernel (iq_avx512.rs): the
//! grid types' time goes to the lookups and the one shuffle port, which wider registers do
//! not shorten.

use super::iq::{dot_row_q8k as scalar_q8k, iq1m_scale, IqType, Q8KBlock};
use super::iq_tables::*;
use super::prefetch;
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
///
/// One function per type with its loop over the super-blocks inside, shaped like ggml's x86
/// kernels: two 32-weight sub-blocks a step into two accumulators, scales and signs expanded
/// in vectors, grid indices built in a vector and stored once, then looked up with scalar loads.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row_q8k(ty: IqType, row: &[u8], act: &[Q8KBlock]) -> f32 {
    debug_assert!(row.len() >= act.len() * ty.block_bytes());
    let b = row.as_ptr();
    match ty {
        IqType::Iq2Xxs => iq2xxs(b, act),
        IqType::Iq2Xs => iq2xs(b, act),
        IqType::Iq2S => iq2s(b, act),
        IqType::Iq3Xxs => iq3xxs(b, act),
        IqType::Iq3S => iq3s(b, act),
        IqType::Iq1S => iq1s(b, act),
        IqType::Iq1M => iq1m(b, act),
        IqType::Iq4Xs => iq4xs(b, act),
        IqType::Iq4Nl | IqType::Mxfp4 => scalar_q8k(ty, row, act),
    }
}

/// The lanes of a vector of grid indices, through memory: one store, then scalar loads
/// (ggml's AVX2 IQ2_XS and IQ3_S kernels do the same). Read plainly, LLVM turns them into
/// `vpextrd`/`vpextrw`, two micro-ops each on the shuffle port these kernels are short of;
/// volatile loads keep them loads.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lanes<T: Copy, const N: usize>(v: __m256i) -> [T; N] {
    debug_assert_eq!(std::mem::size_of::<[T; N]>(), 32);
    let m = v;
    let p = &m as *const __m256i as *const T;
    std::array::from_fn(|l| std::ptr::read_volatile(p.add(l)))
}

/// `table[i]` for an index the caller has masked to the table's length.
#[inline(always)]
unsafe fn at<T: Copy>(table: &[T], i: u32) -> T {
    debug_assert!((i as usize) < table.len());
    // SAFETY: the caller's mask keeps i below the table's length.
    *table.get_unchecked(i as usize)
}

/// Four 8-byte grid entries, entry l in 64-bit lane l.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn grid4(table: &[u64], i: &[u32]) -> __m256i {
    _mm256_set_epi64x(
        at(table, i[3]) as i64,
        at(table, i[2]) as i64,
        at(table, i[1]) as i64,
        at(table, i[0]) as i64,
    )
}

/// Eight 4-byte grid entries, entry l in 32-bit lane l.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn grid8(table: &[u32], i: &[u32; 8]) -> __m256i {
    let g = |l: usize| at(table, i[l]) as i32;
    _mm256_set_epi32(g(7), g(6), g(5), g(4), g(3), g(2), g(1), g(0))
}

/// 8 bytes as 8 u32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bytes8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
}

/// The 32 activations at q8 with the signs of the 32 bits at `s` applied (bit set: negated).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn signed32(q8: *const i8, s: *const u8) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(u32_at(s) as i32), shuf);
    let neg = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_sub_epi8(_mm256_xor_si256(load(q8), neg), neg)
}

/// IQ2_XS / IQ2_S scales: 8 bytes of two 4-bit scales each, as `2s+1` in i16 lanes, the low
/// nibbles (first 16 weights of each sub-block) in the low 128 bits, the high ones above.
/// `_mm256_shuffle_epi8` with `0x0100 + 0x0202·j` in every 16-bit lane picks sub-block j's.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibble_scales(p: *const u8) -> __m256i {
    let v = (p as *const i64).read_unaligned();
    let s = _mm_and_si128(_mm_set_epi64x(v >> 4, v), _mm_set1_epi8(0x0F));
    _mm256_cvtepu8_epi16(_mm_add_epi8(_mm_add_epi8(s, s), _mm_set1_epi8(1)))
}

// k picks the sub-block (j = jj + k) as well as its accumulator
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq2xxs(row: *const u8, act: &[Q8KBlock]) -> f32 {
    let bb = IqType::Iq2Xxs.block_bytes();
    let mut sumf = 0f32;
    for (i, a) in act.iter().enumerate() {
        let (b, q8) = (row.add(i * bb), a.qs.as_ptr());
        prefetch(b, bb);
        let mut acc = [_mm256_setzero_si256(); 2];
        for jj in (0..8).step_by(2) {
            for k in 0..2 {
                let j = jj + k;
                let (a0, a1) = (u32_at(b.add(2 + 8 * j)), u32_at(b.add(6 + 8 * j)));
                let g = grid4(
                    &IQ2XXS_GRID,
                    &[a0 & 255, a0 >> 8 & 255, a0 >> 16 & 255, a0 >> 24],
                );
                let s = grid4(
                    &KEVEN_SIGNS,
                    &[a1 & 127, a1 >> 7 & 127, a1 >> 14 & 127, a1 >> 21 & 127],
                );
                let y = _mm256_sign_epi8(load(q8.add(32 * j)), s);
                let ls = 2 * (a1 >> 28) as i16 + 1;
                acc[k] = _mm256_add_epi32(acc[k], udot(g, y, _mm256_set1_epi16(ls)));
            }
        }
        let s = hsum_i32(_mm256_add_epi32(acc[0], acc[1]));
        sumf += half(b) * a.d * s as f32 * 0.125;
    }
    sumf
}

/// IQ2_XS as ggml's AVX2 kernel: 16 grid indices (9 bits) and their 7 sign bits a load; the
/// eighth sign bit (odd parity) from a 16-entry table.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq2xs(row: *const u8, act: &[Q8KBlock]) -> f32 {
    let bb = IqType::Iq2Xs.block_bytes();
    let m511 = _mm256_set1_epi16(511);
    // 0x80 where the 4 bits of the byte's index have odd parity, in both 128-bit halves
    const PARITY: [u8; 16] = [
        0, 128, 128, 0, 128, 0, 0, 128, 128, 0, 0, 128, 0, 128, 128, 0,
    ];
    let parity = _mm_loadu_si128(PARITY.as_ptr() as *const __m128i);
    let parity = _mm256_set_m128i(parity, parity);
    // byte 2l of the signs, 8 times, for groups l = 0..4 and 4..8 of 16
    let (sel1, sel2) = (
        _mm256_set_epi64x(
            0x0606060606060606,
            0x0404040404040404,
            0x0202020202020202,
            0,
        ),
        _mm256_set_epi64x(
            0x0E0E0E0E0E0E0E0E,
            0x0C0C0C0C0C0C0C0C,
            0x0A0A0A0A0A0A0A0A,
            0x0808080808080808,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let one = _mm256_set1_epi8(1);
    let mut sumf = 0f32;
    for (i, a) in act.iter().enumerate() {
        let (b, q8) = (row.add(i * bb), a.qs.as_ptr());
        prefetch(b, bb);
        let sc = nibble_scales(b.add(66));
        let mut pick = _mm256_set1_epi16(0x0100);
        let mut acc = [_mm256_setzero_si256(); 2];
        for h in 0..2 {
            let q = _mm256_loadu_si256(b.add(2 + 32 * h) as *const __m256i);
            let gi = lanes::<u16, 16>(_mm256_and_si256(q, m511));
            let part = _mm256_srli_epi16(q, 9);
            let odd = _mm256_shuffle_epi8(parity, _mm256_xor_si256(part, _mm256_srli_epi16(q, 13)));
            let full = _mm256_or_si256(part, odd);
            let lo = _mm256_permute2x128_si256(full, full, 0x00);
            let hi = _mm256_permute2x128_si256(full, full, 0x11);
            for (k, (f, sel)) in [(lo, sel1), (lo, sel2), (hi, sel1), (hi, sel2)]
                .into_iter()
                .enumerate()
            {
                let idx = [0, 1, 2, 3].map(|l| gi[4 * k + l] as u32);
                let g = grid4(&IQ2XS_GRID, &idx);
                let s = _mm256_shuffle_epi8(f, sel);
                let s = _mm256_cmpeq_epi8(_mm256_and_si256(s, bit), bit);
                let y = _mm256_sign_epi8(load(q8.add(32 * (4 * h + k))), _mm256_or_si256(s, one));
                let p = udot(g, y, _mm256_shuffle_epi8(sc, pick));
                pick = _mm256_add_epi16(pick, _mm256_set1_epi16(0x0202));
                acc[k % 2] = _mm256_add_epi32(acc[k % 2], p);
            }
        }
        let s = hsum_i32(_mm256_add_epi32(acc[0], acc[1]));
        sumf += half(b) * a.d * s as f32 * 0.125;
    }
    sumf
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq2s(row: *const u8, act: &[Q8KBlock]) -> f32 {
    let bb = IqType::Iq2S.block_bytes();
    let mut sumf = 0f32;
    for (i, a) in act.iter().enumerate() {
        let (b, q8) = (row.add(i * bb), a.qs.as_ptr());
        prefetch(b, bb);
        let (qs, signs, qh) = (b.add(2), b.add(34), b.add(66));
        let sc = nibble_scales(b.add(74));
        let mut pick = _mm256_set1_epi16(0x0100);
        let mut acc = [_mm256_setzero_si256(); 2];
        for j in (0..8).step_by(2) {
            let idx: [u32; 8] = std::array::from_fn(|l| {
                let h = *qh.add(j + l / 4) as u32;
                *qs.add(4 * j + l) as u32 | (h << (8 - 2 * (l % 4)) & 0x300)
            });
            for k in 0..2 {
                let g = grid4(&IQ2S_GRID, &idx[4 * k..]);
                let y = signed32(q8.add(32 * (j + k)), signs.add(4 * (j + k)));
                let p = udot(g, y, _mm256_shuffle_epi8(sc, pick));
                pick = _mm256_add_epi16(pick, _mm256_set1_epi16(0x0202));
                acc[k] = _mm256_add_epi32(acc[k], p);
            }
        }
        let s = hsum_i32(_mm256_add_epi32(acc[0], acc[1]));
        sumf += half(b) * a.d * s as f32 * 0.125;
    }
    sumf
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq3xxs(row: *const u8, act: &[Q8KBlock]) -> f32 {
    let bb = IqType::Iq3Xxs.block_bytes();
    let mut sumf = 0f32;
    for (i, a) in act.iter().enumerate() {
        let (b, q8) = (row.add(i * bb), a.qs.as_ptr());
        prefetch(b, bb);
        let (qs, gas) = (b.add(2), b.add(66));
        let mut acc = _mm256_setzero_si256();
        for j in 0..8 {
            let aux = u32_at(gas.add(4 * j));
            let q = qs.add(8 * j);
            let gi = |l: usize| IQ3XXS_GRID[*q.add(l) as usize] as i32;
            let g = _mm256_set_epi32(gi(7), gi(6), gi(5), gi(4), gi(3), gi(2), gi(1), gi(0));
            let s = grid4(
                &KEVEN_SIGNS,
                &[aux & 127, aux >> 7 & 127, aux >> 14 & 127, aux >> 21 & 127],
            );
            let y = _mm256_sign_epi8(load(q8.add(32 * j)), s);
            let ls = 2 * (aux >> 28) as i16 + 1;
            acc = _mm256_add_epi32(acc, udot(g, y, _mm256_set1_epi16(ls)));
        }
        sumf += half(b) * a.d * hsum_i32(acc) as f32 * 0.25;
    }
    sumf
}

// k picks the sub-block (j = jj + k) as well as its accumulator
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq3s(row: *const u8, act: &[Q8KBlock]) -> f32 {
    let bb = IqType::Iq3S.block_bytes();
    // index i of a sub-block takes bit i of its qh byte as bit 8
    let shift = _mm256_set_epi32(1, 2, 3, 4, 5, 6, 7, 8);
    let m256 = _mm256_set1_epi32(256);
    let mut sumf = 0f32;
    for (i, a) in act.iter().enumerate() {
        let (b, q8) = (row.add(i * bb), a.qs.as_ptr());
        prefetch(b, bb);
        let (qs, qh, signs, scales) = (b.add(2), b.add(66), b.add(74), b.add(106));
        let mut acc = [_mm256_setzero_si256(); 2];
        for jj in (0..8).step_by(2) {
            for k in 0..2 {
                let j = jj + k;
                let h = _mm256_set1_epi32(*qh.add(j) as i32);
                let hi = _mm256_and_si256(_mm256_sllv_epi32(h, shift), m256);
                let idx: [u32; 8] = lanes(_mm256_or_si256(bytes8(qs.add(8 * j)), hi));
                let g = grid8(&IQ3S_GRID, &idx);
                let y = signed32(q8.add(32 * j), signs.add(4 * j));
                let ls = 2 * (*scales.add(j / 2) >> (4 * (j % 2)) & 0xF) as i16 + 1;
                acc[k] = _mm256_add_epi32(acc[k], udot(g, y, _mm256_set1_epi16(ls)));
            }
        }
        sumf += half(b) * a.d * hsum_i32(_mm256_add_epi32(acc[0], acc[1])) as f32;
    }
    sumf
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq1s(row: *const u8, act: &[Q8KBlock]) -> f32 {
    let bb = IqType::Iq1S.block_bytes();
    // index l of a sub-block takes bits 3l..3l+3 of its qh word as bits 8..11
    let shift = _mm256_set_epi32(9, 6, 3, 0, 9, 6, 3, 0);
    let m7 = _mm256_set1_epi32(7);
    let ones = _mm256_set1_epi8(1);
    let mut sumf = 0f32;
    for (i, a) in act.iter().enumerate() {
        let (b, q8) = (row.add(i * bb), a.qs.as_ptr());
        prefetch(b, bb);
        let (qs, qh) = (b.add(2), b.add(34));
        let mut acc = [_mm256_setzero_si256(); 2];
        let mut sumi1 = 0i32;
        for j in (0..8).step_by(2) {
            let (h0, h1) = (u16_at(qh.add(2 * j)), u16_at(qh.add(2 * j + 2)));
            let h = _mm256_set_m128i(_mm_set1_epi32(h1 as i32), _mm_set1_epi32(h0 as i32));
            let hi = _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(h, shift), m7), 8);
            let idx: [u32; 8] = lanes(_mm256_or_si256(bytes8(qs.add(4 * j)), hi));
            for (k, h) in [h0 as i32, h1 as i32].into_iter().enumerate() {
                let g = grid4(&IQ1S_GRID, &idx[4 * k..]);
                let y = _mm256_sign_epi8(load(q8.add(32 * (j + k))), g);
                let ls = 2 * (h >> 12 & 7) + 1;
                let p =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(ones, y), _mm256_set1_epi16(ls as i16));
                acc[k] = _mm256_add_epi32(acc[k], p);
                let delta = if h & 0x8000 != 0 { -1 } else { 1 };
                let bs = a.bsums[2 * (j + k)] as i32 + a.bsums[2 * (j + k) + 1] as i32;
                sumi1 += ls * delta * bs;
            }
        }
        let s = hsum_i32(_mm256_add_epi32(acc[0], acc[1]));
        sumf += half(b) * a.d * (s as f32 + IQ1S_DELTA * sumi1 as f32);
    }
    sumf
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq1m(row: *const u8, act: &[Q8KBlock]) -> f32 {
    let bb = IqType::Iq1M.block_bytes();
    // index l of a sub-block takes the low 3 bits of nibble l of its two qh bytes as bits
    // 8..11; the nibble's bit 3 is the sign of its delta
    let shift = _mm256_set_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    let (m7, m8) = (_mm256_set1_epi32(7), _mm256_set1_epi32(8));
    let ones = _mm256_set1_epi8(1);
    let mut sumf = 0f32;
    for (i, a) in act.iter().enumerate() {
        let (b, q8) = (row.add(i * bb), a.qs.as_ptr());
        prefetch(b, bb);
        let (qs, qh) = (b, b.add(32));
        let sc: [u16; 4] = std::array::from_fn(|i| u16_at(b.add(48 + 2 * i)));
        let d = half(iq1m_scale(&sc).to_le_bytes().as_ptr());
        let (mut acc1, mut acc2) = ([_mm256_setzero_si256(); 2], [_mm256_setzero_si256(); 2]);
        for j in (0..8).step_by(2) {
            // qh bytes 2j..2j+4, each twice
            let hb = _mm_cvtsi32_si128(u32_at(qh.add(2 * j)) as i32);
            let h = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hb, hb)), shift);
            let hi = _mm256_slli_epi32(_mm256_and_si256(h, m7), 8);
            let idx: [u32; 8] = lanes(_mm256_or_si256(bytes8(qs.add(4 * j)), hi));
            // −1 lanes where the delta is negative
            let neg = _mm256_cmpeq_epi32(_mm256_and_si256(h, m8), m8);
            let negs = [
                _mm256_castsi256_si128(neg),
                _mm256_extracti128_si256(neg, 1),
            ];
            let s = sc[j / 2];
            for k in 0..2 {
                let g = grid4(&IQ1S_GRID, &idx[4 * k..]);
                // ±1 in every byte of a group of 8
                let delta = _mm256_or_si256(_mm256_cvtepi32_epi64(negs[k]), ones);
                let s = s >> (6 * k);
                let ls = scales2(2 * (s & 7) as i32 + 1, 2 * (s >> 3 & 7) as i32 + 1);
                let y = load(q8.add(32 * (j + k)));
                let p1 = _mm256_maddubs_epi16(ones, _mm256_sign_epi8(y, g));
                let p2 = _mm256_maddubs_epi16(ones, _mm256_sign_epi8(y, delta));
                acc1[k] = _mm256_add_epi32(acc1[k], _mm256_madd_epi16(p1, ls));
                acc2[k] = _mm256_add_epi32(acc2[k], _mm256_madd_epi16(p2, ls));
            }
        }
        let s1 = hsum_i32(_mm256_add_epi32(acc1[0], acc1[1]));
        let s2 = hsum_i32(_mm256_add_epi32(acc2[0], acc2[1]));
        sumf += d * a.d * (s1 as f32 + IQ1M_DELTA * s2 as f32);
    }
    sumf
}

// k picks the sub-block (j = jj + k) as well as its accumulator
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq4xs(row: *const u8, act: &[Q8KBlock]) -> f32 {
    let bb = IqType::Iq4Xs.block_bytes();
    let table = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
    let m4 = _mm_set1_epi8(0x0F);
    let mut sumf = 0f32;
    for (i, a) in act.iter().enumerate() {
        let (b, q8) = (row.add(i * bb), a.qs.as_ptr());
        prefetch(b, bb);
        let h = u16_at(b.add(2)) as i32;
        let mut acc = [_mm256_setzero_si256(); 2];
        for jj in (0..8).step_by(2) {
            for k in 0..2 {
                let j = jj + k;
                let ls =
                    (*b.add(4 + j / 2) as i32 >> (4 * (j % 2)) & 0xF) | (h >> (2 * j) & 3) << 4;
                let q = _mm_loadu_si128(b.add(8 + 16 * j) as *const __m128i);
                let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, m4));
                let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
                let w = _mm256_set_m128i(hi, lo);
                let y = load(q8.add(32 * j));
                let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
                let p = _mm256_madd_epi16(p, _mm256_set1_epi16((ls - 32) as i16));
                acc[k] = _mm256_add_epi32(acc[k], p);
            }
        }
        sumf += half(b) * a.d * hsum_i32(_mm256_add_epi32(acc[0], acc[1])) as f32;
    }
    sumf
}
