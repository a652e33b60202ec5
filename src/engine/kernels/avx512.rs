//! The legacy 32-block kernels with AVX-512 (F, BW, VL) and VNNI: a packed group's four rows
//! sit in one 512-bit register per half block (16-byte chunk r = row r), and vpdpbusd sums
//! four byte products per 32-bit lane, the grouping candle's AVX2 `madd(maddubs)` lanes have.
//! Integer sums are exact in any order and the float arithmetic is avx2.rs's, lane for lane,
//! so the results equal candle's x86 results bit for bit:
//! - Q4_0/Q8_0: each of candle's 8 lanes per row keeps its own `fma(d·d', lane, acc)` chain
//!   (lanes 0..4 in the register of weights 0..16, lanes 4..8 in that of weights 16..32), and
//!   the lanes are summed in candle's `hsum_float_8` order at the end;
//! - Q4_1/Q5_0/Q5_1: each row's block sum, then avx2.rs's per-block float update.
//!
//! vpdpbusd multiplies unsigned by signed bytes, so weights are made unsigned (Q4_0's nibbles
//! as stored, Q8_0 + 128) and the offset is taken back per lane as `offset · Σ y` (Q5_0's 16
//! per block, as avx2.rs does).
//!
//! Prefill unpacks a group once into that register layout (with the scales spread per
//! row) and sweeps four activation rows at a time over it, reusing each weight register
//! for all four.

use super::avx2::{half4, update};
use super::{Kind, Q8Block};
use std::arch::x86_64::*;

/// A block of a packed group's four rows as two registers: chunk r (16 bytes) of the first
/// holds row r's weights 0..16 in candle's 32-byte order, the second its weights 16..32,
/// unsigned (see `lanes` for the offset).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn block4(kind: Kind, p: *const u8) -> (__m512i, __m512i) {
    let (_, oh, oq) = kind.packed_offsets();
    if kind == Kind::Q8_0 {
        // Rows 0,1 and rows 2,3, 32 bytes each: regroup the 16-byte halves.
        let r01 = _mm512_loadu_si512(p.add(oq) as *const __m512i);
        let r23 = _mm512_loadu_si512(p.add(oq + 64) as *const __m512i);
        let lo = _mm512_shuffle_i64x2::<0b10_00_10_00>(r01, r23);
        let hi = _mm512_shuffle_i64x2::<0b11_01_11_01>(r01, r23);
        let flip = _mm512_set1_epi8(-128);
        return (_mm512_xor_si512(lo, flip), _mm512_xor_si512(hi, flip));
    }
    let raw = _mm512_loadu_si512(p.add(oq) as *const __m512i);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut lo = _mm512_and_si512(raw, m4);
    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4);
    if kind.has_high_bits() {
        // Row r's 32-bit word: bits 0..16 go to chunk r of `lo`, bits 16..32 to `hi`.
        let h = _mm_loadu_si128(p.add(oh) as *const __m128i);
        let h = _mm_shuffle_epi8(
            h,
            _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15),
        );
        let b16 = _mm512_set1_epi8(0x10);
        lo = _mm512_mask_add_epi8(lo, _mm_cvtsi128_si64(h) as u64, lo, b16);
        hi = _mm512_mask_add_epi8(hi, _mm_extract_epi64::<1>(h) as u64, hi, b16);
    }
    (lo, hi)
}

/// An activation block's bytes 0..16 and 16..32, each in all four chunks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn y_halves(a: &Q8Block) -> (__m512i, __m512i) {
    let p = a.qs.as_ptr() as *const __m128i;
    (
        _mm512_broadcast_i32x4(_mm_loadu_si128(p)),
        _mm512_broadcast_i32x4(_mm_loadu_si128(p.add(1))),
    )
}

/// candle's Q4_0/Q8_0 lanes: Σ of four adjacent products of true weights and activations,
/// from the unsigned weights `w` of `block4`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn lanes(kind: Kind, w: __m512i, y: __m512i) -> __m512i {
    let z = _mm512_setzero_si512();
    let offset = match kind {
        Kind::Q4_0 => _mm512_set1_epi8(8),
        // 0x80: 128 as the unsigned operand.
        _ => _mm512_set1_epi8(-128),
    };
    _mm512_sub_epi32(
        _mm512_dpbusd_epi32(z, w, y),
        _mm512_dpbusd_epi32(z, offset, y),
    )
}

/// Four row values spread over the chunks: lanes 4r..4r+4 all hold v[r].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn per_row(v: __m128) -> __m512 {
    let idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))
}

/// Each chunk's four lanes summed: [row 0, row 1, row 2, row 3].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn row_sums(v: __m512i) -> __m128i {
    let h = _mm256_hadd_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
    let h = _mm256_hadd_epi32(h, h);
    _mm_unpacklo_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
}

/// Per row, candle's `hsum_float_8` of its 8 lanes (0..4 in chunk r of `lo`, 4..8 in `hi`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn finish(lo: __m512, hi: __m512) -> [f32; 4] {
    let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
    _mm512_storeu_ps(a.as_mut_ptr(), lo);
    _mm512_storeu_ps(b.as_mut_ptr(), hi);
    std::array::from_fn(|r| {
        let (l, h) = (&a[4 * r..4 * r + 4], &b[4 * r..4 * r + 4]);
        let s = [h[0] + l[0], h[1] + l[1], h[2] + l[2], h[3] + l[3]];
        (s[0] + s[2]) + (s[1] + s[3])
    })
}

/// Four rows of a packed group against one row of activations.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot4(kind: Kind, group: &[u8], act: &[Q8Block]) -> [f32; 4] {
    let gb = 4 * kind.block_bytes();
    debug_assert!(group.len() >= act.len() * gb);
    let p0 = group.as_ptr();
    if matches!(kind, Kind::Q4_0 | Kind::Q8_0) {
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (b, a) in act.iter().enumerate() {
            let p = p0.add(b * gb);
            let (wl, wh) = block4(kind, p);
            let (yl, yh) = y_halves(a);
            let d = per_row(_mm_mul_ps(half4(p), _mm_set1_ps(a.d)));
            lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lanes(kind, wl, yl)), lo);
            hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lanes(kind, wh, yh)), hi);
        }
        return finish(lo, hi);
    }
    let (om, _, _) = kind.packed_offsets();
    let z = _mm512_setzero_si512();
    let mut sumf = _mm_setzero_ps();
    for (b, a) in act.iter().enumerate() {
        let p = p0.add(b * gb);
        let (wl, wh) = block4(kind, p);
        let (yl, yh) = y_halves(a);
        let v = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, wl, yl), wh, yh);
        let m = if kind.has_min() {
            half4(p.add(om))
        } else {
            _mm_setzero_ps()
        };
        sumf = update(kind, sumf, row_sums(v), half4(p), m, a);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), sumf);
    out
}

/// Bytes per block of an unpacked tile (`unpack`), and f32 per block of its scales and mins.
pub const TILE_BYTES: usize = 128;
pub const TILE_SCALES: usize = 16;

/// Unpacks a packed group into `block4`'s registers (`q`, 128 bytes per block) and its
/// scales and mins spread per row (16 f32 per block: lanes 4r..4r+4 hold row r's).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn unpack(
    kind: Kind,
    group: &[u8],
    nb: usize,
    q: &mut [u8],
    d: &mut [f32],
    m: &mut [f32],
) {
    let gb = 4 * kind.block_bytes();
    debug_assert!(group.len() >= nb * gb && q.len() >= nb * TILE_BYTES);
    debug_assert!(d.len() >= nb * TILE_SCALES && m.len() >= nb * TILE_SCALES);
    let (om, _, _) = kind.packed_offsets();
    for b in 0..nb {
        let p = group.as_ptr().add(b * gb);
        let (lo, hi) = block4(kind, p);
        let qp = q.as_mut_ptr().add(b * TILE_BYTES);
        _mm512_storeu_si512(qp as *mut __m512i, lo);
        _mm512_storeu_si512(qp.add(64) as *mut __m512i, hi);
        _mm512_storeu_ps(d.as_mut_ptr().add(b * TILE_SCALES), per_row(half4(p)));
        if kind.has_min() {
            _mm512_storeu_ps(
                m.as_mut_ptr().add(b * TILE_SCALES),
                per_row(half4(p.add(om))),
            );
        }
    }
}

/// An unpacked group's four rows against four rows of activations: out[i][r] is row r
/// against activation row i, with `dot4`'s arithmetic.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn tile4(
    kind: Kind,
    q: &[u8],
    d: &[f32],
    m: &[f32],
    acts: [&[Q8Block]; 4],
) -> [[f32; 4]; 4] {
    let nb = acts[0].len();
    debug_assert!(acts.iter().all(|a| a.len() == nb));
    debug_assert!(q.len() >= nb * TILE_BYTES && d.len() >= nb * TILE_SCALES);
    let a = acts.map(|a| a.as_ptr());
    if matches!(kind, Kind::Q4_0 | Kind::Q8_0) {
        let mut acc = [[_mm512_setzero_ps(); 2]; 4];
        for b in 0..nb {
            let qp = q.as_ptr().add(b * TILE_BYTES);
            let wl = _mm512_loadu_si512(qp as *const __m512i);
            let wh = _mm512_loadu_si512(qp.add(64) as *const __m512i);
            let db = _mm512_loadu_ps(d.as_ptr().add(b * TILE_SCALES));
            for (acc, &a) in acc.iter_mut().zip(&a) {
                let a = &*a.add(b);
                let (yl, yh) = y_halves(a);
                let s = _mm512_mul_ps(db, _mm512_set1_ps(a.d));
                acc[0] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(lanes(kind, wl, yl)), acc[0]);
                acc[1] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(lanes(kind, wh, yh)), acc[1]);
            }
        }
        return acc.map(|[lo, hi]| finish(lo, hi));
    }
    // Lane 4r + i: row r against activation row i.
    let z = _mm512_setzero_si512();
    let mut sumf = _mm512_setzero_ps();
    for b in 0..nb {
        let qp = q.as_ptr().add(b * TILE_BYTES);
        let wl = _mm512_loadu_si512(qp as *const __m512i);
        let wh = _mm512_loadu_si512(qp.add(64) as *const __m512i);
        let ab = a.map(|a| &*a.add(b));
        let v = ab.map(|a| {
            let (yl, yh) = y_halves(a);
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, wl, yl), wh, yh)
        });
        // Chunk r of v[i] holds row r's four partial sums: transpose-add to lane 4r + i.
        let t0 = _mm512_add_epi32(
            _mm512_unpacklo_epi32(v[0], v[1]),
            _mm512_unpackhi_epi32(v[0], v[1]),
        );
        let t1 = _mm512_add_epi32(
            _mm512_unpacklo_epi32(v[2], v[3]),
            _mm512_unpackhi_epi32(v[2], v[3]),
        );
        let mut sumi =
            _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
        if kind == Kind::Q5_0 {
            // Σ (q − 16)·y = Σ q·y − 16·Σ y, exactly.
            let isum = _mm_setr_epi32(ab[0].isum, ab[1].isum, ab[2].isum, ab[3].isum);
            sumi = _mm512_sub_epi32(sumi, _mm512_broadcast_i32x4(_mm_slli_epi32::<4>(isum)));
        }
        let ad = _mm512_broadcast_f32x4(_mm_setr_ps(ab[0].d, ab[1].d, ab[2].d, ab[3].d));
        let db = _mm512_loadu_ps(d.as_ptr().add(b * TILE_SCALES));
        let mut t = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sumi), db), ad);
        if kind.has_min() {
            let mb = _mm512_loadu_ps(m.as_ptr().add(b * TILE_SCALES));
            let s = _mm512_broadcast_f32x4(_mm_setr_ps(ab[0].s, ab[1].s, ab[2].s, ab[3].s));
            t = _mm512_add_ps(t, _mm512_mul_ps(mb, s));
        }
        sumf = _mm512_add_ps(sumf, t);
    }
    let mut v = [0f32; 16];
    _mm512_storeu_ps(v.as_mut_ptr(), sumf);
    std::array::from_fn(|i| std::array::from_fn(|r| v[4 * r + i]))
}
