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
//! Prefill unpacks a group once into that register layout (`Tile`, with the scales spread
//! per row) and sweeps four activation rows at a time over it, reusing each weight register
//! for all four.

use super::avx2::{half4, scales4, update};
use super::{prefetch, Kind, Q8Block};
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
    if let Some(t) = kind.table() {
        // The table's values + 128 (unsigned; `lanes` takes 128·Σ y back), looked up by
        // vpshufb in each 128-bit lane.
        let t = _mm_xor_si128(
            _mm_loadu_si128(t.as_ptr() as *const __m128i),
            _mm_set1_epi8(-128),
        );
        let t = _mm512_broadcast_i32x4(t);
        return (_mm512_shuffle_epi8(t, lo), _mm512_shuffle_epi8(t, hi));
    }
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
    if kind.is_signed() {
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (b, a) in act.iter().enumerate() {
            let p = p0.add(b * gb);
            prefetch(p, gb);
            let (wl, wh) = block4(kind, p);
            let (yl, yh) = y_halves(a);
            let d = per_row(_mm_mul_ps(scales4(kind, p), _mm_set1_ps(a.d)));
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
        prefetch(p, gb);
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

/// A packed group unpacked once for prefill, to be swept over many activation rows: per
/// block, `block4`'s two registers (128 bytes), the scales and mins spread per row (lanes
/// 4r..4r+4 hold row r's), and for Q4_0/Q8_0 `−128·Σ w` per lane.
///
/// Q4_0/Q8_0 weights are kept signed here, and each activation row is made unsigned instead
/// (y + 128, one xor): the correction `128·Σ w` then belongs to the weights and is computed
/// once per tile, not once per activation row (`Σ w·y = Σ w·(y + 128) − 128·Σ w`).
pub struct Tile {
    kind: Kind,
    q: Vec<__m512i>,
    d: Vec<__m512>,
    m: Vec<__m512>,
    corr: Vec<__m512i>,
}

impl Tile {
    /// Unpacks a group of nb packed blocks.
    ///
    /// # Safety
    /// The CPU runs AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C; `group` holds nb packed blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn unpack(kind: Kind, group: &[u8], nb: usize) -> Self {
        let gb = 4 * kind.block_bytes();
        debug_assert!(group.len() >= nb * gb);
        let (om, _, _) = kind.packed_offsets();
        let signed = kind.is_signed();
        let mut t = Self {
            kind,
            q: Vec::with_capacity(2 * nb),
            d: Vec::with_capacity(nb),
            m: Vec::new(),
            corr: Vec::new(),
        };
        for b in 0..nb {
            let p = group.as_ptr().add(b * gb);
            let (lo, hi) = block4(kind, p);
            for w in [lo, hi] {
                let w = match kind {
                    Kind::Q4_0 => _mm512_sub_epi8(w, _mm512_set1_epi8(8)),
                    Kind::Q8_0 | Kind::Iq4Nl | Kind::Mxfp4 => {
                        _mm512_xor_si512(w, _mm512_set1_epi8(-128))
                    }
                    _ => w,
                };
                if signed {
                    let z = _mm512_setzero_si512();
                    // 0x80: 128 as the unsigned operand.
                    let c = _mm512_dpbusd_epi32(z, _mm512_set1_epi8(-128), w);
                    t.corr.push(_mm512_sub_epi32(z, c));
                }
                t.q.push(w);
            }
            t.d.push(per_row(scales4(kind, p)));
            if kind.has_min() {
                t.m.push(per_row(half4(p.add(om))));
            }
        }
        t
    }

    /// The tile's four rows against four rows of activations: out[i][r] is row r against
    /// activation row i, with `dot4`'s arithmetic.
    ///
    /// # Safety
    /// As for `unpack`; every activation row holds the tile's nb blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot4x4(&self, acts: [&[Q8Block]; 4]) -> [[f32; 4]; 4] {
        let (kind, nb) = (self.kind, self.d.len());
        debug_assert!(acts.iter().all(|a| a.len() == nb));
        let a = acts.map(|a| a.as_ptr());
        if kind.is_signed() {
            let flip = _mm512_set1_epi8(-128);
            let mut acc = [[_mm512_setzero_ps(); 2]; 4];
            for b in 0..nb {
                let (wl, wh) = (self.q[2 * b], self.q[2 * b + 1]);
                let (cl, ch) = (self.corr[2 * b], self.corr[2 * b + 1]);
                let db = self.d[b];
                for (acc, &a) in acc.iter_mut().zip(&a) {
                    let a = &*a.add(b);
                    let (yl, yh) = y_halves(a);
                    let (yl, yh) = (_mm512_xor_si512(yl, flip), _mm512_xor_si512(yh, flip));
                    let s = _mm512_mul_ps(db, _mm512_set1_ps(a.d));
                    let ll = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cl, yl, wl));
                    let lh = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(ch, yh, wh));
                    acc[0] = _mm512_fmadd_ps(s, ll, acc[0]);
                    acc[1] = _mm512_fmadd_ps(s, lh, acc[1]);
                }
            }
            return acc.map(|[lo, hi]| finish(lo, hi));
        }
        // Lane 4r + i: row r against activation row i.
        let z = _mm512_setzero_si512();
        let mut sumf = _mm512_setzero_ps();
        for b in 0..nb {
            let (wl, wh) = (self.q[2 * b], self.q[2 * b + 1]);
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
            let mut t = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sumi), self.d[b]), ad);
            if kind.has_min() {
                let s = _mm512_broadcast_f32x4(_mm_setr_ps(ab[0].s, ab[1].s, ab[2].s, ab[3].s));
                t = _mm512_add_ps(t, _mm512_mul_ps(self.m[b], s));
            }
            sumf = _mm512_add_ps(sumf, t);
        }
        let mut v = [0f32; 16];
        _mm512_storeu_ps(v.as_mut_ptr(), sumf);
        std::array::from_fn(|i| std::array::from_fn(|r| v[4 * r + i]))
    }
}

/// Rows of a `Wide` tile: four packed groups.
pub const WIDE: usize = 16;

/// Four packed Q4_0, Q5_0, Q8_0, IQ4_NL or MXFP4 groups (16 rows) unpacked once for prefill in llama.cpp's
/// repacked-GEMM layout: per block, eight registers whose lane r holds four consecutive
/// weights of row r (register t: weights 4t..4t+4) as unsigned bytes, and the 16 rows'
/// scales in one register. An activation row's four bytes are broadcast to all lanes, so
/// one vpdpbusd adds four products to each of the 16 rows' sums and every lane ends a
/// block holding its row's whole integer dot product: one conversion and one FMA per block
/// and activation row, `acc += (d_w·d_x)·Σ q·y` (llama.cpp's ggml_gemm_q4_0_8x8_q8_0 and
/// ggml_vec_dot_q8_0_q8_0 apply the scale once per block the same way).
///
/// That is not candle's order (it keeps eight partial lanes per row, each with its own FMA
/// chain), so results differ from candle's by a few ulps of Σ|w·x|: the tests hold this
/// kernel to a tolerance and the perplexity check (bench/perplexity.sh) to llama.cpp's.
pub struct Wide {
    /// What the unsigned bytes are offset by: 8 (Q4_0), 16 (Q5_0) or 128 (Q8_0's + 128, the
    /// table types' values + 128).
    offset: i32,
    q: Vec<__m512i>,
    d: Vec<__m512>,
}

impl Wide {
    /// Unpacks the four consecutive groups `groups[0..4]` of nb packed blocks each.
    ///
    /// # Safety
    /// The CPU runs AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C; every group holds nb packed
    /// blocks of `kind`, which is Q4_0, Q5_0, Q8_0, IQ4_NL or MXFP4.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn unpack(kind: Kind, groups: [&[u8]; 4], nb: usize) -> Self {
        debug_assert!(kind == Kind::Q5_0 || kind.is_signed());
        let gb = 4 * kind.block_bytes();
        debug_assert!(groups.iter().all(|g| g.len() >= nb * gb));
        // A group's block as `block4`'s two registers (chunk c: row c's weights 0..16, then
        // 16..32); `pos[t]` is, for lane 4g + c, the dword of row c holding weights
        // 4t..4t+4 in that pair.
        let pos: [__m512i; 8] = std::array::from_fn(|t| {
            let t = t as i32;
            let p = |c: i32| (t / 4) * 16 + 4 * c + t % 4;
            _mm512_setr4_epi32(p(0), p(1), p(2), p(3))
        });
        let mut w = Self {
            offset: match kind {
                Kind::Q4_0 => 8,
                Kind::Q5_0 => 16,
                _ => 128,
            },
            q: Vec::with_capacity(8 * nb),
            d: Vec::with_capacity(nb),
        };
        for b in 0..nb {
            let p = groups.map(|g| g.as_ptr().add(b * gb));
            let mut out = [_mm512_setzero_si512(); 8];
            for (g, &p) in p.iter().enumerate() {
                let (a, bb) = block4(kind, p);
                let lanes: __mmask16 = 0xF << (4 * g);
                for (o, &pos) in out.iter_mut().zip(&pos) {
                    *o = _mm512_mask_mov_epi32(*o, lanes, _mm512_permutex2var_epi32(a, pos, bb));
                }
            }
            w.q.extend_from_slice(&out);
            if kind == Kind::Mxfp4 {
                let mut s = [0f32; WIDE];
                for (g, &p) in p.iter().enumerate() {
                    _mm_storeu_ps(s.as_mut_ptr().add(4 * g), scales4(kind, p));
                }
                w.d.push(_mm512_loadu_ps(s.as_ptr()));
                continue;
            }
            // The four groups' four f16 scales each, rows 0..16 in order.
            let s01 = _mm_unpacklo_epi64(
                _mm_loadl_epi64(p[0] as *const __m128i),
                _mm_loadl_epi64(p[1] as *const __m128i),
            );
            let s23 = _mm_unpacklo_epi64(
                _mm_loadl_epi64(p[2] as *const __m128i),
                _mm_loadl_epi64(p[3] as *const __m128i),
            );
            w.d.push(_mm512_cvtph_ps(_mm256_set_m128i(s23, s01)));
        }
        w
    }

    /// The 16 rows against MT activation rows: `out[i][r]` is row r against `acts[i]`.
    ///
    /// # Safety
    /// As for `unpack`; every activation row holds the tile's nb blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot<const MT: usize>(&self, acts: [&[Q8Block]; MT]) -> [[f32; WIDE]; MT] {
        let nb = self.d.len();
        debug_assert!(acts.iter().all(|a| a.len() == nb));
        let a = acts.map(|a| a.as_ptr());
        let mut acc = [_mm512_setzero_ps(); MT];
        for b in 0..nb {
            let w: [__m512i; 8] = std::array::from_fn(|t| self.q[8 * b + t]);
            let db = self.d[b];
            for (acc, &a) in acc.iter_mut().zip(&a) {
                let a = &*a.add(b);
                // Σ (u − offset)·y = Σ u·y − offset·Σ y, all exact in i32.
                // Two chains of four vpdpbusd, so that their latency overlaps.
                let mut s = [
                    _mm512_set1_epi32(-self.offset * a.isum),
                    _mm512_setzero_si512(),
                ];
                let y = a.qs.as_ptr() as *const i32;
                for (t, &w) in w.iter().enumerate() {
                    let yt = _mm512_set1_epi32(y.add(t).read_unaligned());
                    s[t % 2] = _mm512_dpbusd_epi32(s[t % 2], w, yt);
                }
                let s = _mm512_add_epi32(s[0], s[1]);
                let scale = _mm512_mul_ps(db, _mm512_set1_ps(a.d));
                *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), *acc);
            }
        }
        acc.map(|v| {
            let mut o = [0f32; WIDE];
            _mm512_storeu_ps(o.as_mut_ptr(), v);
            o
        })
    }
}
