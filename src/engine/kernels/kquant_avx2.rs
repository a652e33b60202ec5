//! The K-quant tile kernels with AVX2 (+FMA, F16C): eight rows in the eight lanes, the
//! activations broadcast four bytes at a time, the float updates in candle's order (see
//! kquant.rs).

use super::kquant::{layout::*, KQuant, Order, Q8KBlock, TILE};
use super::{prefetch, prefetch_rows};
use std::arch::x86_64::*;

/// Four activation bytes broadcast to every lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bcast(p: *const i8) -> __m256i {
    _mm256_set1_epi32((p as *const i32).read_unaligned())
}

/// Eight bytes as eight f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bytes_u8(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bytes_i8(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// Eight f16 as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn halves(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// `x` shifted left by `n` bits (right by −n) in each 16-bit lane; callers mask bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn shift(x: __m256i, n: i32) -> __m256i {
    match n {
        4 => _mm256_slli_epi16(x, 4),
        3 => _mm256_slli_epi16(x, 3),
        2 => _mm256_slli_epi16(x, 2),
        1 => _mm256_slli_epi16(x, 1),
        0 => x,
        -1 => _mm256_srli_epi16(x, 1),
        -2 => _mm256_srli_epi16(x, 2),
        -3 => _mm256_srli_epi16(x, 3),
        _ => unreachable!("shift {n}"),
    }
}

/// Q4_K (Q5 false) or Q5_K (Q5 true): one tile against MT activation rows.
// b indexes the tile's super-blocks and every activation row's blocks at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q45k<const MT: usize, const Q5: bool>(tile: &[u8], acts: &[&[Q8KBlock]]) -> [__m256; MT] {
    let tb = if Q5 { KQuant::Q5K } else { KQuant::Q4K }.tile_bytes();
    let kb = acts[0].len();
    debug_assert!(tile.len() >= kb * tb && acts.len() >= MT);
    let mask = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); MT];
    for b in 0..kb {
        let p = tile.as_ptr().add(b * tb);
        prefetch_rows(MT, p, tb);
        let dv = halves(p.add(D));
        let mv = halves(p.add(DMIN));
        let a: [&Q8KBlock; MT] = std::array::from_fn(|i| &acts[i][b]);
        for s in 0..8 {
            let scale = _mm256_mul_ps(dv, bytes_u8(p.add(SC + s * TILE)));
            let min = _mm256_mul_ps(mv, bytes_u8(p.add(MN + s * TILE)));
            let h = if Q5 {
                _mm256_loadu_si256(p.add(QH5 + s * 32) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            let mut isum = [_mm256_setzero_si256(); MT];
            let mut s16 = [_mm256_setzero_si256(); MT];
            for g4 in 0..4 {
                let w = _mm256_loadu_si256(p.add(QS + (s * 4 + g4) * 32) as *const __m256i);
                let mut lo = _mm256_and_si256(w, mask);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
                if Q5 {
                    let g = g4 as i32;
                    lo = _mm256_or_si256(lo, _mm256_and_si256(shift(h, 4 - 2 * g), bit4));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(shift(h, 3 - 2 * g), bit4));
                }
                for i in 0..MT {
                    let q = a[i].qs.as_ptr().add(32 * s + 8 * g4);
                    // |pair| ≤ 2·15·128 (Q4_K: eight pairs fit i16) or 2·31·128 (Q5_K: four).
                    s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(lo, bcast(q)));
                    s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(hi, bcast(q.add(4))));
                }
                if Q5 && g4 % 2 == 1 {
                    for i in 0..MT {
                        isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(s16[i], ones));
                        s16[i] = _mm256_setzero_si256();
                    }
                }
            }
            for i in 0..MT {
                if !Q5 {
                    isum[i] = _mm256_madd_epi16(s16[i], ones);
                }
                let da = a[i].d;
                let f = _mm256_cvtepi32_ps(isum[i]);
                acc[i] = _mm256_fmadd_ps(f, _mm256_mul_ps(scale, _mm256_set1_ps(da)), acc[i]);
                let dsum = _mm256_broadcast_ss(&a[i].dsum32[s]);
                acc[i] = _mm256_fnmadd_ps(min, dsum, acc[i]);
            }
        }
    }
    acc
}

/// Q6_K: one tile against MT activation rows.
// b indexes the tile's super-blocks and every activation row's blocks at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k<const MT: usize>(tile: &[u8], acts: &[&[Q8KBlock]]) -> [__m256; MT] {
    let tb = KQuant::Q6K.tile_bytes();
    let kb = acts[0].len();
    debug_assert!(tile.len() >= kb * tb && acts.len() >= MT);
    let mask = _mm256_set1_epi8(0x0F);
    let bits45 = _mm256_set1_epi8(0x30);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); MT];
    for b in 0..kb {
        let p = tile.as_ptr().add(b * tb);
        prefetch_rows(MT, p, tb);
        let dv = halves(p.add(D6));
        let a: [&Q8KBlock; MT] = std::array::from_fn(|i| &acts[i][b]);
        for s in 0..16 {
            let scale = _mm256_mul_ps(dv, bytes_i8(p.add(SC6 + s * TILE)));
            let h = _mm256_loadu_si256(p.add(QH6 + s * 32) as *const __m256i);
            let mut isum = [_mm256_setzero_si256(); MT];
            for hh in 0..2 {
                let w = _mm256_loadu_si256(p.add(QL6 + (2 * s + hh) * 32) as *const __m256i);
                // Quads 2·hh (low nibbles) and 2·hh + 1 (high); quad i's bits at 2i.
                let qi = 2 * hh as i32;
                let lo = _mm256_or_si256(
                    _mm256_and_si256(w, mask),
                    _mm256_and_si256(shift(h, 4 - 2 * qi), bits45),
                );
                let hi = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(w, 4), mask),
                    _mm256_and_si256(shift(h, 2 - 2 * qi), bits45),
                );
                for i in 0..MT {
                    let q = a[i].qs.as_ptr().add(16 * s + 8 * hh);
                    // |pair| ≤ 2·63·128: two pairs fit i16.
                    let s16 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, bcast(q)),
                        _mm256_maddubs_epi16(hi, bcast(q.add(4))),
                    );
                    isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(s16, ones));
                }
            }
            for i in 0..MT {
                let da = a[i].d;
                let f = _mm256_sub_ps(
                    _mm256_cvtepi32_ps(isum[i]),
                    _mm256_broadcast_ss(&a[i].sum16x32[s]),
                );
                acc[i] = _mm256_fmadd_ps(f, _mm256_mul_ps(scale, _mm256_set1_ps(da)), acc[i]);
            }
        }
    }
    acc
}

/// Q6_K against one activation row in candle's vec_dot order: per super-block, eight lane
/// sums per row (lane l: weights 4l..4l+3 of every 32, times their sub-block scale, exact
/// integers), `lane = fma(d·d_a, lane, lane)`, and at the end candle's hsum_float_8.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6k_lanes(tile: &[u8], act: &[Q8KBlock]) -> __m256 {
    let tb = KQuant::Q6K.tile_bytes();
    debug_assert!(tile.len() >= act.len() * tb);
    let mask = _mm256_set1_epi8(0x0F);
    let bits45 = _mm256_set1_epi8(0x30);
    let m32 = _mm256_set1_epi8(32);
    // lanes[l]: lane l of every row (one row per vector lane).
    let mut lanes = [_mm256_setzero_ps(); 8];
    for (b, a) in act.iter().enumerate() {
        let p = tile.as_ptr().add(b * tb);
        prefetch(p, tb);
        let d = _mm256_mul_ps(_mm256_set1_ps(a.d), halves(p.add(D6)));
        let mut isum = [_mm256_setzero_si256(); 8];
        for s in 0..16 {
            // Each row's scale in both 16-bit halves of its 32-bit lane.
            let sc = _mm_loadl_epi64(p.add(SC6 + s * TILE) as *const __m128i);
            let sc = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc, sc));
            let h = _mm256_loadu_si256(p.add(QH6 + s * 32) as *const __m256i);
            for hh in 0..2 {
                let w = _mm256_loadu_si256(p.add(QL6 + (2 * s + hh) * 32) as *const __m256i);
                let qi = 2 * hh as i32;
                let quads = [
                    _mm256_or_si256(
                        _mm256_and_si256(w, mask),
                        _mm256_and_si256(shift(h, 4 - 2 * qi), bits45),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(w, 4), mask),
                        _mm256_and_si256(shift(h, 2 - 2 * qi), bits45),
                    ),
                ];
                for (e, q) in quads.into_iter().enumerate() {
                    let i = 2 * hh + e;
                    let y = bcast(a.qs.as_ptr().add(16 * s + 4 * i));
                    // (q − 32)·a per pair, |·| ≤ 2·32·128, as candle subtracts 32·a.
                    let p16 =
                        _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), _mm256_maddubs_epi16(m32, y));
                    let l = 4 * (s % 2) + i;
                    isum[l] = _mm256_add_epi32(isum[l], _mm256_madd_epi16(p16, sc));
                }
            }
        }
        for (lane, isum) in lanes.iter_mut().zip(isum) {
            *lane = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), *lane);
        }
    }
    let x = lanes;
    _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(x[4], x[0]), _mm256_add_ps(x[6], x[2])),
        _mm256_add_ps(_mm256_add_ps(x[5], x[1]), _mm256_add_ps(x[7], x[3])),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run<const MT: usize>(kind: KQuant, tile: &[u8], acts: &[&[Q8KBlock]]) -> [[f32; 8]; 8] {
    let acc = match kind {
        KQuant::Q4K => q45k::<MT, false>(tile, acts),
        KQuant::Q5K => q45k::<MT, true>(tile, acts),
        KQuant::Q6K => q6k::<MT>(tile, acts),
    };
    let mut out = [[0f32; 8]; 8];
    for (o, a) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), a);
    }
    out
}

/// One tile (every super-block of its eight rows) against 1 to 4 activation rows:
/// `out[i][r]` is activation row i times tile row r.
///
/// # Safety
/// The CPU runs AVX2, FMA and F16C; `tile` holds `acts[i].len()` packed super-blocks of
/// `kind`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_rows(
    kind: KQuant,
    order: Order,
    tile: &[u8],
    acts: &[&[Q8KBlock]],
) -> [[f32; 8]; 8] {
    if order == Order::Lanes {
        debug_assert!(kind == KQuant::Q6K && acts.len() == 1);
        let mut out = [[0f32; 8]; 8];
        _mm256_storeu_ps(out[0].as_mut_ptr(), q6k_lanes(tile, acts[0]));
        return out;
    }
    match acts.len() {
        1 => run::<1>(kind, tile, acts),
        2 => run::<2>(kind, tile, acts),
        3 => run::<3>(kind, tile, acts),
        4 => run::<4>(kind, tile, acts),
        n => unreachable!("{n} activation rows per call"),
    }
}
