//! The K-quant tile kernels with AVX512-VNNI on 256-bit registers (AVX512VL): the tiles and
//! float updates of kquant_avx2.rs, with each group's integer dot product one VPDPBUSD
//! (four bytes of a row times four broadcast activation bytes, added into the row's i32)
//! instead of VPMADDUBSW, VPADDW and VPMADDWD. Integer sums are exact either way, so the
//! results are bit-identical to the AVX2 kernels. Q6_K decode in candle's lane order stays
//! on the AVX2 kernel (its per-lane scales need the 16-bit products).

use super::kquant::{layout::*, KQuant, Order, Q8KBlock, TILE};
use super::kquant_avx2::{bcast, bytes_i8, bytes_u8, halves, q6k_lanes, shift};
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
