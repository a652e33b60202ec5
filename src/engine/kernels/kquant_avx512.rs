//! The K-quant tile kernels with AVX512-VNNI on 256-bit registers (AVX512VL): the tiles and
//! float updates of kquant_avx2.rs, with each group's integer dot product one VPDPBUSD
//! (four bytes of a row times four broadcast activation bytes, added into the row's i32)
//! instead of VPMADDUBSW, VPADDW and VPMADDWD. Integer sums are exact either way, so the
//! results are bit-identical to the AVX2 kernels. Q6_K decode in candle's lane order stays
//! on the AVX2 kernel (its per-lane scales need the 16-bit products).

use super::kquant::{layout::*, KQuant, Order, Q8KBlock, TILE};
use super::kquant_avx2::{bcast, bytes_i8, bytes_u8, halves, q6k_lanes, shift};
use super::prefetch_rows;
use std::arch::x86_64::*;

/// Q4_K (Q5 false) or Q5_K (Q5 true): one tile against MT activation rows.
// b indexes the tile's super-blocks and every activation row's blocks at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn q45k<const MT: usize, const Q5: bool>(tile: &[u8], acts: &[&[Q8KBlock]]) -> [__m256; MT] {
    let tb = if Q5 { KQuant::Q5K } else { KQuant::Q4K }.tile_bytes();
    let kb = acts[0].len();
    debug_assert!(tile.len() >= kb * tb && acts.len() >= MT);
    let mask = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
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
                    isum[i] = _mm256_dpbusd_epi32(isum[i], lo, bcast(q));
                    isum[i] = _mm256_dpbusd_epi32(isum[i], hi, bcast(q.add(4)));
                }
            }
            for i in 0..MT {
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

/// Q6_K per sub-block: one tile against MT activation rows.
// b indexes the tile's super-blocks and every activation row's blocks at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn q6k<const MT: usize>(tile: &[u8], acts: &[&[Q8KBlock]]) -> [__m256; MT] {
    let tb = KQuant::Q6K.tile_bytes();
    let kb = acts[0].len();
    debug_assert!(tile.len() >= kb * tb && acts.len() >= MT);
    let mask = _mm256_set1_epi8(0x0F);
    let bits45 = _mm256_set1_epi8(0x30);
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
                    isum[i] = _mm256_dpbusd_epi32(isum[i], lo, bcast(q));
                    isum[i] = _mm256_dpbusd_epi32(isum[i], hi, bcast(q.add(4)));
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

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
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

/// `kquant_avx2::tile_rows` with VNNI.
///
/// # Safety
/// The CPU runs AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512-VNNI; `tile` holds
/// `acts[i].len()` packed super-blocks of `kind`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
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
        5 => run::<5>(kind, tile, acts),
        6 => run::<6>(kind, tile, acts),
        7 => run::<7>(kind, tile, acts),
        8 => run::<8>(kind, tile, acts),
        n => unreachable!("{n} activation rows per call"),
    }
}

// Prefill on 512-bit registers: two consecutive tiles side by side, the first tile's eight
// rows in lanes 0..8 and the second's in lanes 8..16. Every lane runs the float updates of
// the 256-bit kernels above in the same order, so results are bit-identical to them; one
// instruction now does the work of two, which halves the unpacking, scale and float work
// per product (vpdpbusd itself issues at the same rate of products either way).

/// Two tiles' 32-byte vectors at `pa` and `pb` as one register.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pair_si(pa: *const u8, pb: *const u8) -> __m512i {
    let a = _mm256_loadu_si256(pa as *const __m256i);
    let b = _mm256_loadu_si256(pb as *const __m256i);
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
}

/// Two tiles' eight f16 as sixteen f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pair_halves(pa: *const u8, pb: *const u8) -> __m512 {
    let a = _mm_loadu_si128(pa as *const __m128i);
    let b = _mm_loadu_si128(pb as *const __m128i);
    _mm512_cvtph_ps(_mm256_set_m128i(b, a))
}

/// Two tiles' eight bytes as sixteen f32, unsigned or signed.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pair_bytes<const SIGNED: bool>(pa: *const u8, pb: *const u8) -> __m512 {
    let v = _mm_unpacklo_epi64(
        _mm_loadl_epi64(pa as *const __m128i),
        _mm_loadl_epi64(pb as *const __m128i),
    );
    _mm512_cvtepi32_ps(if SIGNED {
        _mm512_cvtepi8_epi32(v)
    } else {
        _mm512_cvtepu8_epi32(v)
    })
}

/// `x` shifted left by `n` bits (right by −n) in each 16-bit lane; callers mask bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn shift512(x: __m512i, n: i32) -> __m512i {
    match n {
        4 => _mm512_slli_epi16::<4>(x),
        3 => _mm512_slli_epi16::<3>(x),
        2 => _mm512_slli_epi16::<2>(x),
        1 => _mm512_slli_epi16::<1>(x),
        0 => x,
        -1 => _mm512_srli_epi16::<1>(x),
        -2 => _mm512_srli_epi16::<2>(x),
        -3 => _mm512_srli_epi16::<3>(x),
        _ => unreachable!("shift {n}"),
    }
}

/// Q4_K (Q5 false) or Q5_K (Q5 true): two tiles against MT activation rows.
// b indexes the tiles' super-blocks and every activation row's blocks at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q45k_pair<const MT: usize, const Q5: bool>(
    ta: &[u8],
    tb: &[u8],
    acts: &[&[Q8KBlock]],
) -> [__m512; MT] {
    let bytes = if Q5 { KQuant::Q5K } else { KQuant::Q4K }.tile_bytes();
    let kb = acts[0].len();
    debug_assert!(ta.len() >= kb * bytes && tb.len() >= kb * bytes && acts.len() >= MT);
    let mask = _mm512_set1_epi8(0x0F);
    let bit4 = _mm512_set1_epi8(0x10);
    let mut acc = [_mm512_setzero_ps(); MT];
    for b in 0..kb {
        let (pa, pb) = (ta.as_ptr().add(b * bytes), tb.as_ptr().add(b * bytes));
        prefetch_rows(MT, pa, bytes);
        prefetch_rows(MT, pb, bytes);
        let dv = pair_halves(pa.add(D), pb.add(D));
        let mv = pair_halves(pa.add(DMIN), pb.add(DMIN));
        let a: [&Q8KBlock; MT] = std::array::from_fn(|i| &acts[i][b]);
        for s in 0..8 {
            let at = SC + s * TILE;
            let scale = _mm512_mul_ps(dv, pair_bytes::<false>(pa.add(at), pb.add(at)));
            let at = MN + s * TILE;
            let min = _mm512_mul_ps(mv, pair_bytes::<false>(pa.add(at), pb.add(at)));
            let h = if Q5 {
                pair_si(pa.add(QH5 + s * 32), pb.add(QH5 + s * 32))
            } else {
                _mm512_setzero_si512()
            };
            let mut isum = [_mm512_setzero_si512(); MT];
            for g4 in 0..4 {
                let at = QS + (s * 4 + g4) * 32;
                let w = pair_si(pa.add(at), pb.add(at));
                let mut lo = _mm512_and_si512(w, mask);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask);
                if Q5 {
                    let g = g4 as i32;
                    lo = _mm512_or_si512(lo, _mm512_and_si512(shift512(h, 4 - 2 * g), bit4));
                    hi = _mm512_or_si512(hi, _mm512_and_si512(shift512(h, 3 - 2 * g), bit4));
                }
                for i in 0..MT {
                    let q = a[i].qs.as_ptr().add(32 * s + 8 * g4) as *const i32;
                    isum[i] =
                        _mm512_dpbusd_epi32(isum[i], lo, _mm512_set1_epi32(q.read_unaligned()));
                    let y = _mm512_set1_epi32(q.add(1).read_unaligned());
                    isum[i] = _mm512_dpbusd_epi32(isum[i], hi, y);
                }
            }
            for i in 0..MT {
                let f = _mm512_cvtepi32_ps(isum[i]);
                acc[i] = _mm512_fmadd_ps(f, _mm512_mul_ps(scale, _mm512_set1_ps(a[i].d)), acc[i]);
                acc[i] = _mm512_fnmadd_ps(min, _mm512_set1_ps(a[i].dsum32[s]), acc[i]);
            }
        }
    }
    acc
}

/// Q6_K per sub-block: two tiles against MT activation rows.
// b indexes the tiles' super-blocks and every activation row's blocks at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6k_pair<const MT: usize>(ta: &[u8], tb: &[u8], acts: &[&[Q8KBlock]]) -> [__m512; MT] {
    let bytes = KQuant::Q6K.tile_bytes();
    let kb = acts[0].len();
    debug_assert!(ta.len() >= kb * bytes && tb.len() >= kb * bytes && acts.len() >= MT);
    let mask = _mm512_set1_epi8(0x0F);
    let bits45 = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); MT];
    for b in 0..kb {
        let (pa, pb) = (ta.as_ptr().add(b * bytes), tb.as_ptr().add(b * bytes));
        prefetch_rows(MT, pa, bytes);
        prefetch_rows(MT, pb, bytes);
        let dv = pair_halves(pa.add(D6), pb.add(D6));
        let a: [&Q8KBlock; MT] = std::array::from_fn(|i| &acts[i][b]);
        for s in 0..16 {
            let at = SC6 + s * TILE;
            let scale = _mm512_mul_ps(dv, pair_bytes::<true>(pa.add(at), pb.add(at)));
            let h = pair_si(pa.add(QH6 + s * 32), pb.add(QH6 + s * 32));
            let mut isum = [_mm512_setzero_si512(); MT];
            for hh in 0..2 {
                let at = QL6 + (2 * s + hh) * 32;
                let w = pair_si(pa.add(at), pb.add(at));
                let qi = 2 * hh as i32;
                let lo = _mm512_or_si512(
                    _mm512_and_si512(w, mask),
                    _mm512_and_si512(shift512(h, 4 - 2 * qi), bits45),
                );
                let hi = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask),
                    _mm512_and_si512(shift512(h, 2 - 2 * qi), bits45),
                );
                for i in 0..MT {
                    let q = a[i].qs.as_ptr().add(16 * s + 8 * hh) as *const i32;
                    isum[i] =
                        _mm512_dpbusd_epi32(isum[i], lo, _mm512_set1_epi32(q.read_unaligned()));
                    let y = _mm512_set1_epi32(q.add(1).read_unaligned());
                    isum[i] = _mm512_dpbusd_epi32(isum[i], hi, y);
                }
            }
            for i in 0..MT {
                let f = _mm512_sub_ps(
                    _mm512_cvtepi32_ps(isum[i]),
                    _mm512_set1_ps(a[i].sum16x32[s]),
                );
                acc[i] = _mm512_fmadd_ps(f, _mm512_mul_ps(scale, _mm512_set1_ps(a[i].d)), acc[i]);
            }
        }
    }
    acc
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn run_pair<const MT: usize>(
    kind: KQuant,
    ta: &[u8],
    tb: &[u8],
    acts: &[&[Q8KBlock]],
) -> [[f32; 16]; 8] {
    let acc = match kind {
        KQuant::Q4K => q45k_pair::<MT, false>(ta, tb, acts),
        KQuant::Q5K => q45k_pair::<MT, true>(ta, tb, acts),
        KQuant::Q6K => q6k_pair::<MT>(ta, tb, acts),
    };
    let mut out = [[0f32; 16]; 8];
    for (o, a) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), a);
    }
    out
}

/// Two consecutive tiles against up to eight activation rows, in the per-sub-block order:
/// `out[i][r]` is activation row i times row r of the first tile (r < 8) or row r − 8 of
/// the second, equal to `tile_rows` on each tile.
///
/// # Safety
/// The CPU runs AVX2, FMA, F16C, AVX512F, AVX512BW, AVX512VL and AVX512-VNNI; `ta` and
/// `tb` each hold `acts[i].len()` packed super-blocks of `kind`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tile_pair_rows(
    kind: KQuant,
    ta: &[u8],
    tb: &[u8],
    acts: &[&[Q8KBlock]],
) -> [[f32; 16]; 8] {
    match acts.len() {
        1 => run_pair::<1>(kind, ta, tb, acts),
        2 => run_pair::<2>(kind, ta, tb, acts),
        3 => run_pair::<3>(kind, ta, tb, acts),
        4 => run_pair::<4>(kind, ta, tb, acts),
        5 => run_pair::<5>(kind, ta, tb, acts),
        6 => run_pair::<6>(kind, ta, tb, acts),
        7 => run_pair::<7>(kind, ta, tb, acts),
        8 => run_pair::<8>(kind, ta, tb, acts),
        n => unreachable!("{n} activation rows per call"),
    }
}
