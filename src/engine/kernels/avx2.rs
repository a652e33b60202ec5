//! The legacy 32-block kernels with AVX2 (+FMA, F16C): bit-identical to candle's x86 results.
//! Also the fallback of avx512.rs for a matrix's tail rows.

use super::{prefetch, Kind, Q8Block, QK};
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let tmp = _mm_loadu_si128(p as *const __m128i);
    let bytes = _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
    _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
}

/// 0xFF in byte j where bit j of the 32-bit little-endian word at `p` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits(p: *const u8) -> __m256i {
    let x32 = (p as *const i32).read_unaligned();
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned() as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// Four consecutive f16 as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn half4(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i))
}

/// The scales of a packed block's four rows as f32: four f16, or MXFP4's four E8M0 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scales4(kind: Kind, p: *const u8) -> __m128 {
    if kind != Kind::Mxfp4 {
        return half4(p);
    }
    // mxfp4::e8m0_half: 2^(e − 128) as the exponent field e − 1, or the subnormal
    // 0x0020_0000 << e for e < 2.
    let e = _mm_cvtepu8_epi32(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
    let one = _mm_set1_epi32(1);
    let normal = _mm_slli_epi32::<23>(_mm_sub_epi32(e, one));
    let sub = _mm_sllv_epi32(_mm_set1_epi32(0x0020_0000), e);
    _mm_castsi128_ps(_mm_blendv_epi8(sub, normal, _mm_cmpgt_epi32(e, one)))
}

/// One block's scale: an f16, or MXFP4's E8M0 byte.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale1(kind: Kind, p: *const u8) -> f32 {
    if kind == Kind::Mxfp4 {
        super::mxfp4::e8m0_half(*p)
    } else {
        half(p)
    }
}

/// A block's 32 weights as bytes, given its quants `q` and high bits `h`: unsigned
/// (Q4_1, Q5_1; Q5_0 too, offset folded later) or signed (Q4_0, Q8_0, and IQ4_NL and
/// MXFP4 as their tables' values, looked up with one pshufb).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weights(kind: Kind, q: *const u8, h: *const u8) -> __m256i {
    match kind {
        Kind::Q4_0 => _mm256_sub_epi8(nibbles(q), _mm256_set1_epi8(8)),
        Kind::Q4_1 => nibbles(q),
        Kind::Q5_0 | Kind::Q5_1 => _mm256_or_si256(
            nibbles(q),
            _mm256_and_si256(bits(h), _mm256_set1_epi8(0x10)),
        ),
        Kind::Q8_0 => _mm256_loadu_si256(q as *const __m256i),
        Kind::Iq4Nl | Kind::Mxfp4 => {
            let t = _mm_loadu_si128(kind.table().expect("a table type").as_ptr() as *const __m128i);
            _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(t), nibbles(q))
        }
        Kind::Q4K | Kind::Q5K | Kind::Q6K => unreachable!("K-quants run in kquant_avx2.rs"),
    }
}

/// The 8 partial i32 sums of a block's integer dot product with activations `y`.
/// Unsigned weights: Σ w·y (no i16 saturation: w < 32, |y| ≤ 127). Signed: via |w|
/// (|w| ≤ 127 for every signed kind, IQ4_NL's −127 included, so pairs stay within i16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lanes(kind: Kind, w: __m256i, y: __m256i) -> __m256i {
    let (a, b) = if kind.is_signed() {
        (_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w))
    } else {
        (w, y)
    };
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

/// candle's hsum_float_8, in its order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Exact per-lane sums of four 8-lane vectors.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum4(l: [__m256i; 4]) -> __m128i {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(l[0], l[1]), _mm256_hadd_epi32(l[2], l[3]));
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
}

/// candle's per-block float update for the integer-sum kinds, four rows as four lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn update(
    kind: Kind,
    sumf: __m128,
    sumi: __m128i,
    d: __m128,
    m: __m128,
    a: &Q8Block,
) -> __m128 {
    let mut sumi = sumi;
    if kind == Kind::Q5_0 {
        // Σ (q − 16)·y = Σ q·y − 16·Σ y, exactly.
        sumi = _mm_sub_epi32(sumi, _mm_set1_epi32(16 * a.isum));
    }
    let mut t = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(sumi), d), _mm_set1_ps(a.d));
    if kind.has_min() {
        t = _mm_add_ps(t, _mm_mul_ps(m, _mm_set1_ps(a.s)));
    }
    _mm_add_ps(sumf, t)
}

/// Four rows of a packed group against one row of activations.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot4(kind: Kind, group: &[u8], act: &[Q8Block]) -> [f32; 4] {
    let gb = 4 * kind.block_bytes();
    debug_assert!(group.len() >= act.len() * gb);
    let (om, oh, oq) = kind.packed_offsets();
    let qn = kind.qs_bytes();
    let p0 = group.as_ptr();
    if kind.is_signed() {
        // candle's AVX2 kernel per row: acc = fma(d·d', pairs as floats, acc); hsum.
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, a) in act.iter().enumerate() {
            let p = p0.add(b * gb);
            prefetch(p, gb);
            let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let mut d = [0f32; 4];
            _mm_storeu_ps(d.as_mut_ptr(), scales4(kind, p));
            for r in 0..4 {
                let w = weights(kind, p.add(oq + r * qn), p);
                let q = _mm256_cvtepi32_ps(lanes(kind, w, y));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d[r] * a.d), q, acc[r]);
            }
        }
        return acc.map(|x| hsum(x));
    }
    let mut sumf = _mm_setzero_ps();
    for (b, a) in act.iter().enumerate() {
        let p = p0.add(b * gb);
        prefetch(p, gb);
        let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        let l = |r: usize| {
            lanes(
                kind,
                weights(kind, p.add(oq + r * qn), p.add(oh + r * 4)),
                y,
            )
        };
        let m = if kind.has_min() {
            half4(p.add(om))
        } else {
            _mm_setzero_ps()
        };
        sumf = update(kind, sumf, sum4([l(0), l(1), l(2), l(3)]), half4(p), m, a);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), sumf);
    out
}

/// One row in ggml's layout (the tail of a matrix), the same arithmetic as `dot4`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row(kind: Kind, row: &[u8], act: &[Q8Block]) -> f32 {
    let bb = kind.block_bytes();
    let (bm, bh, bq) = kind.block_offsets();
    let mut acc = _mm256_setzero_ps();
    let mut sumf = _mm_setzero_ps();
    for (b, a) in act.iter().enumerate() {
        let p = row.as_ptr().add(b * bb);
        prefetch(p, bb);
        let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        let l = lanes(kind, weights(kind, p.add(bq), p.add(bh)), y);
        if kind.is_signed() {
            acc = _mm256_fmadd_ps(
                _mm256_set1_ps(scale1(kind, p) * a.d),
                _mm256_cvtepi32_ps(l),
                acc,
            );
        } else {
            let z = _mm256_setzero_si256();
            let m = _mm_set1_ps(if kind.has_min() { half(p.add(bm)) } else { 0.0 });
            sumf = update(kind, sumf, sum4([l, z, z, z]), _mm_set1_ps(half(p)), m, a);
        }
    }
    if kind.is_signed() {
        hsum(acc)
    } else {
        _mm_cvtss_f32(sumf)
    }
}

/// Unpacks a packed group into unsigned bytes (4 rows × 32 per block) and f32 scales and
/// mins (4 per block), for sweeping many activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn unpack4(
    kind: Kind,
    group: &[u8],
    nb: usize,
    q: &mut [u8],
    d: &mut [f32],
    m: &mut [f32],
) {
    let gb = 4 * kind.block_bytes();
    let (om, oh, oq) = kind.packed_offsets();
    for b in 0..nb {
        let p = group.as_ptr().add(b * gb);
        for r in 0..4 {
            let w = weights(kind, p.add(oq + r * kind.qs_bytes()), p.add(oh + r * 4));
            _mm256_storeu_si256(q.as_mut_ptr().add((b * 4 + r) * QK) as *mut __m256i, w);
        }
        _mm_storeu_ps(d.as_mut_ptr().add(b * 4), scales4(kind, p));
        if kind.has_min() {
            _mm_storeu_ps(m.as_mut_ptr().add(b * 4), half4(p.add(om)));
        }
    }
}

/// `dot4` on an unpacked tile: the same integer sums and float updates.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot4_unpacked(
    kind: Kind,
    q: &[u8],
    d: &[f32],
    m: &[f32],
    act: &[Q8Block],
) -> [f32; 4] {
    let w =
        |b: usize, r: usize| _mm256_loadu_si256(q.as_ptr().add((b * 4 + r) * QK) as *const __m256i);
    if kind.is_signed() {
        // `dot4`'s replay of candle's kernel.
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, a) in act.iter().enumerate() {
            let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            for (r, acc) in acc.iter_mut().enumerate() {
                let l = _mm256_cvtepi32_ps(lanes(kind, w(b, r), y));
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(d[b * 4 + r] * a.d), l, *acc);
            }
        }
        return acc.map(|x| hsum(x));
    }
    let mut sumf = _mm_setzero_ps();
    for (b, a) in act.iter().enumerate() {
        let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        let l = |r: usize| lanes(kind, w(b, r), y);
        let mins = if kind.has_min() {
            _mm_loadu_ps(m.as_ptr().add(b * 4))
        } else {
            _mm_setzero_ps()
        };
        sumf = update(
            kind,
            sumf,
            sum4([l(0), l(1), l(2), l(3)]),
            _mm_loadu_ps(d.as_ptr().add(b * 4)),
            mins,
            a,
        );
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), sumf);
    out
}

/// `(x[i] · scale).round_ties_even()` saturated to i8, for the 32 values at `x`, exactly as
/// the scalar expression for finite values (NaN gives −128, not 0): the same single rounding
/// of the product, then the rounding to an integer that ggml's quantizers do
/// (`_mm256_round_ps(.., _MM_ROUND_NEAREST)`: halves to even).
///
/// # Safety
/// The CPU runs AVX2; `x` and `out` hold 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn round_i8x32(x: *const f32, scale: f32, out: *mut i8) {
    let s = _mm256_set1_ps(scale);
    let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    let v: [__m256i; 4] = std::array::from_fn(|c| {
        let p = _mm256_mul_ps(_mm256_loadu_ps(x.add(8 * c)), s);
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p);
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
    });
    // Pack to bytes: packs interleave 128-bit lanes, the permutation restores the order.
    let ab = _mm256_packs_epi32(v[0], v[1]);
    let cd = _mm256_packs_epi32(v[2], v[3]);
    let q = _mm256_packs_epi16(ab, cd);
    let q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out as *mut __m256i, q);
}
