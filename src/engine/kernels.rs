//! Quantized matrix × activations on the CPU for the 32-weight block types (Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0), with AVX2.
//!
//! Written here because candle 0.11 has no SIMD path for Q4_1, Q5_0 and Q5_1 on x86 (its
//! generic loop made SmolLM2 and Gemma 3 several times slower than llama.cpp), and its
//! per-matrix parallel regions cost more than the arithmetic on small models.
//!
//! Results are bit-identical to candle's, so greedy generations do not change:
//! - activations are quantized exactly as candle/ggml do (block_q8_1 / block_q8_0);
//! - Q4_1/Q5_0/Q5_1: each block's integer dot product is exact in any order, and the float
//!   update per block is candle's expression in candle's order (`sumf += sumi·d·d' [+ m·s]`);
//! - Q4_0/Q8_0: candle's AVX2 kernels accumulate `fma(d·d', pairs, acc)` in 8 lanes and then
//!   sum the lanes; the same sequence is replayed per row. They are only taken where AVX2
//!   runs: elsewhere candle's scalar code is the reference and runs itself.
//!
//! Weights are repacked at load time in groups of four rows (as llama.cpp's repacking does):
//! per block, the four rows' scales sit together and the quantized bytes follow, so one load
//! fetches four scales and a group is one memory stream. Same bytes in total.

use candle_core::quantized::GgmlDType;
use half::f16;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl Kind {
    /// The kernel for a weight type, where one runs on this CPU.
    pub fn from_dtype(d: GgmlDType) -> Option<Self> {
        if !simd() {
            return None;
        }
        Some(match d {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            _ => return None,
        })
    }

    /// Bytes of one block of 32 weights in ggml's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
        }
    }

    fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    fn has_high_bits(self) -> bool {
        matches!(self, Self::Q5_0 | Self::Q5_1)
    }

    /// Bytes of quantized values per row and block (after scales and high bits).
    fn qs_bytes(self) -> usize {
        if self == Self::Q8_0 {
            32
        } else {
            16
        }
    }

    /// Offsets inside a ggml block: (min, high bits, quants).
    fn block_offsets(self) -> (usize, usize, usize) {
        match self {
            Self::Q4_0 => (0, 0, 2),
            Self::Q4_1 => (2, 0, 4),
            Self::Q5_0 => (0, 2, 6),
            Self::Q5_1 => (2, 4, 8),
            Self::Q8_0 => (0, 0, 2),
        }
    }

    /// Offsets inside a packed 4-row block: (mins, high bits, quants); scales are at 0.
    fn packed_offsets(self) -> (usize, usize, usize) {
        let m = 8;
        let h = if self.has_min() { 16 } else { 8 };
        let q = h + if self.has_high_bits() { 16 } else { 0 };
        (m, h, q)
    }
}

/// One block of 32 activations quantized to int8: ggml's block_q8_1 (d and d·Σq as f16),
/// which also serves the types that pair with block_q8_0 (they ignore `s`).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Q8Block {
    pub d: f32,
    pub s: f32,
    /// Σ qs, exactly (prefill folds Q5_0's −16 offset into it).
    pub isum: i32,
    pub qs: [i8; QK],
}

/// ggml's quantize_row_q8_1, with d and s rounded through f16 as ggml and candle store them.
pub fn quantize_activations(x: &[f32], out: &mut [Q8Block]) {
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = f16::from_f32(d);
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.d = d16.to_f32();
        b.s = f16::from_f32(f16::from_f32(sum as f32).to_f32() * b.d).to_f32();
        b.isum = sum;
    }
}

/// Whether the AVX2 kernels run here.
pub fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A weight matrix repacked in groups of four rows; the last n % 4 rows keep ggml's layout.
#[derive(Debug)]
pub struct Packed {
    pub kind: Kind,
    pub n: usize,
    pub k: usize,
    data: Vec<u8>,
}

impl Packed {
    /// Repacks n rows of k weights given in ggml's block layout.
    pub fn new(kind: Kind, raw: &[u8], n: usize, k: usize) -> Self {
        assert_eq!(k % QK, 0, "rows must be whole blocks");
        let (nb, bb) = (k / QK, kind.block_bytes());
        assert_eq!(raw.len(), n * nb * bb, "matrix bytes");
        let groups = n / 4;
        let mut data = Vec::with_capacity(raw.len());
        let (bm, bh, bq) = kind.block_offsets();
        let qn = kind.qs_bytes();
        for g in 0..groups {
            for b in 0..nb {
                let block = |r: usize| {
                    let at = ((g * 4 + r) * nb + b) * bb;
                    &raw[at..at + bb]
                };
                for r in 0..4 {
                    data.extend_from_slice(&block(r)[0..2]);
                }
                if kind.has_min() {
                    for r in 0..4 {
                        data.extend_from_slice(&block(r)[bm..bm + 2]);
                    }
                }
                if kind.has_high_bits() {
                    for r in 0..4 {
                        data.extend_from_slice(&block(r)[bh..bh + 4]);
                    }
                }
                for r in 0..4 {
                    data.extend_from_slice(&block(r)[bq..bq + qn]);
                }
            }
        }
        data.extend_from_slice(&raw[groups * 4 * nb * bb..]);
        Self { kind, n, k, data }
    }

    /// Row j as floats, computed as candle's dequantization does (for embedding lookups
    /// from a matrix tied to the output layer, so it is stored once).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let kind = self.kind;
        let (nb, bb) = (self.k / QK, kind.block_bytes());
        let half =
            |b: &[u8], i: usize| f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
        // (d, m, high bits, quants) of block b of row j, wherever the layout puts them.
        let parts = |b: usize| -> (f32, f32, u32, &[u8]) {
            let word =
                |s: &[u8], i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
            let qn = kind.qs_bytes();
            if j < (self.n / 4) * 4 {
                let (om, oh, oq) = kind.packed_offsets();
                let g = &self.group(j / 4)[b * 4 * bb..(b + 1) * 4 * bb];
                let r = j % 4;
                let m = if kind.has_min() {
                    half(g, om + 2 * r)
                } else {
                    0.0
                };
                let h = if kind.has_high_bits() {
                    word(g, oh + 4 * r)
                } else {
                    0
                };
                (half(g, 2 * r), m, h, &g[oq + r * qn..oq + (r + 1) * qn])
            } else {
                let (bm, bh, bq) = kind.block_offsets();
                let blk = &self.tail_row(j)[b * bb..(b + 1) * bb];
                let m = if kind.has_min() { half(blk, bm) } else { 0.0 };
                let h = if kind.has_high_bits() {
                    word(blk, bh)
                } else {
                    0
                };
                (half(blk, 0), m, h, &blk[bq..bq + qn])
            }
        };
        for (b, ys) in out.chunks_exact_mut(QK).enumerate().take(nb) {
            let (d, m, h, q) = parts(b);
            for (i, y) in ys.iter_mut().enumerate() {
                let v = if kind == Kind::Q8_0 {
                    q[i] as i8 as i32
                } else {
                    let nib = if i < 16 { q[i] & 0x0F } else { q[i - 16] >> 4 } as i32;
                    let hb = ((h >> i) & 1) as i32;
                    match kind {
                        Kind::Q4_0 => nib - 8,
                        Kind::Q5_0 => (nib | hb << 4) - 16,
                        Kind::Q5_1 => nib | hb << 4,
                        _ => nib,
                    }
                };
                *y = if kind.has_min() {
                    v as f32 * d + m
                } else {
                    v as f32 * d
                };
            }
        }
    }

    fn group(&self, g: usize) -> &[u8] {
        let gb = 4 * (self.k / QK) * self.kind.block_bytes();
        &self.data[g * gb..(g + 1) * gb]
    }

    /// A row past the last whole group, in ggml's layout.
    fn tail_row(&self, j: usize) -> &[u8] {
        let rb = (self.k / QK) * self.kind.block_bytes();
        let start = (self.n / 4) * 4 * rb + (j - (self.n / 4) * 4) * rb;
        &self.data[start..start + rb]
    }
}

/// A raw pointer that may cross threads; each task writes a disjoint range through it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements of buffers that outlive the parallel call.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// y (m × n) = x (m × k) · Wᵀ.
pub fn matmul(w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    matmul_many(&[w], x, m).pop().expect("one matrix")
}

/// Several matrices of one kind and width applied to the same input (Q, K and V; gate and
/// up): the activations are quantized once and all rows share one parallel region on
/// candle's spinning barrier pool (the one candle's kernels use; a second pool fought it
/// for the cores). For prefill each 4-row tile is unpacked once and swept over every row of
/// x, which makes it a matrix kernel rather than m matrix-vector products.
pub fn matmul_many(mats: &[&Packed], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    assert!(
        simd(),
        "the block kernels need AVX2; Kind::from_dtype does not pick them otherwise"
    );
    let (kind, k) = (mats[0].kind, mats[0].k);
    assert!(
        mats.iter().all(|p| p.kind == kind && p.k == k),
        "one kind and width"
    );
    let nb = k / QK;
    let mut acts = vec![Q8Block::default(); m * nb];
    for (a, xs) in acts.chunks_mut(nb).zip(x.chunks(k)) {
        quantize_activations(xs, a);
    }
    let mut ys: Vec<Vec<f32>> = mats.iter().map(|p| vec![0f32; m * p.n]).collect();
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    // Work items are groups of four rows, numbered across the matrices.
    let starts: Vec<usize> = mats
        .iter()
        .scan(0, |acc, p| {
            let s = *acc;
            *acc += p.n.div_ceil(4);
            Some(s)
        })
        .collect();
    let total: usize = mats.iter().map(|p| p.n.div_ceil(4)).sum();
    candle_core::utils::barrier_pool().execute_chunked(total, |groups| {
        for g in groups {
            let t = starts.partition_point(|&s| s <= g) - 1;
            let (w, out) = (mats[t], outs[t]);
            let n = w.n;
            let gi = g - starts[t];
            let j0 = gi * 4;
            // SAFETY: element (i, j) of matrix t's output belongs to this task for j in
            // j0..j0+4; each output holds m * n values.
            let put = |i: usize, j: usize, v: f32| unsafe { *out.0.add(i * n + j) = v };
            let act = |i: usize| &acts[i * nb..(i + 1) * nb];
            if j0 + 4 <= n {
                let group = w.group(gi);
                if m >= 8 && kind != Kind::Q8_0 && kind != Kind::Q4_0 {
                    let mut q = vec![0u8; nb * 4 * QK];
                    let mut d = vec![0f32; nb * 4];
                    let mut mins = vec![0f32; nb * 4];
                    // SAFETY: simd() checked; buffers sized for nb blocks of 4 rows.
                    unsafe { avx2::unpack4(kind, group, nb, &mut q, &mut d, &mut mins) };
                    for i in 0..m {
                        // SAFETY: as above.
                        let v = unsafe { avx2::dot4_unpacked(kind, &q, &d, &mins, act(i)) };
                        for (r, v) in v.into_iter().enumerate() {
                            put(i, j0 + r, v);
                        }
                    }
                } else {
                    for i in 0..m {
                        // SAFETY: simd() checked; the group holds nb packed blocks.
                        let v = unsafe { avx2::dot4(kind, group, act(i)) };
                        for (r, v) in v.into_iter().enumerate() {
                            put(i, j0 + r, v);
                        }
                    }
                }
            } else {
                for j in j0..n {
                    let row = w.tail_row(j);
                    for i in 0..m {
                        // SAFETY: simd() checked; the row holds nb ggml blocks.
                        put(i, j, unsafe { avx2::dot_row(kind, row, act(i)) });
                    }
                }
            }
        }
    });
    ys
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Kind, Q8Block, QK};
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
    unsafe fn half4(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i))
    }

    /// A block's 32 weights as bytes, given its quants `q` and high bits `h`: unsigned
    /// (Q4_1, Q5_1; Q5_0 too, offset folded later) or signed (Q4_0, Q8_0).
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
        }
    }

    /// The 8 partial i32 sums of a block's integer dot product with activations `y`.
    /// Unsigned weights: Σ w·y (no i16 saturation: w < 32, |y| ≤ 127). Signed: via |w|.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes(kind: Kind, w: __m256i, y: __m256i) -> __m256i {
        let (a, b) = match kind {
            Kind::Q4_0 | Kind::Q8_0 => (_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)),
            _ => (w, y),
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
    unsafe fn update(
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
        if matches!(kind, Kind::Q4_0 | Kind::Q8_0) {
            // candle's AVX2 kernel per row: acc = fma(d·d', pairs as floats, acc); hsum.
            let mut acc = [_mm256_setzero_ps(); 4];
            for (b, a) in act.iter().enumerate() {
                let p = p0.add(b * gb);
                let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                let mut d = [0f32; 4];
                _mm_storeu_ps(d.as_mut_ptr(), half4(p));
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
            let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let l = lanes(kind, weights(kind, p.add(bq), p.add(bh)), y);
            if matches!(kind, Kind::Q4_0 | Kind::Q8_0) {
                acc = _mm256_fmadd_ps(_mm256_set1_ps(half(p) * a.d), _mm256_cvtepi32_ps(l), acc);
            } else {
                let z = _mm256_setzero_si256();
                let m = _mm_set1_ps(if kind.has_min() { half(p.add(bm)) } else { 0.0 });
                sumf = update(kind, sumf, sum4([l, z, z, z]), _mm_set1_ps(half(p)), m, a);
            }
        }
        if matches!(kind, Kind::Q4_0 | Kind::Q8_0) {
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
                let w = weights(kind, p.add(oq + r * 16), p.add(oh + r * 4));
                _mm256_storeu_si256(q.as_mut_ptr().add((b * 4 + r) * QK) as *mut __m256i, w);
            }
            _mm_storeu_ps(d.as_mut_ptr().add(b * 4), half4(p));
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
        let mut sumf = _mm_setzero_ps();
        for (b, a) in act.iter().enumerate() {
            let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let l = |r: usize| {
                lanes(
                    kind,
                    _mm256_loadu_si256(q.as_ptr().add((b * 4 + r) * QK) as *const __m256i),
                    y,
                )
            };
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every type against candle's own matmul on random blocks, in decode and prefill shapes,
    /// with a row count that leaves a tail: bit-identical.
    #[test]
    fn kernels_match_candle_reference() {
        if !simd() {
            eprintln!("SKIPPED: no AVX2 here; candle's kernels run instead");
            return;
        }
        let dev = Device::Cpu;
        let (n, k) = (42, 256);
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
            let kind = Kind::from_dtype(dtype).unwrap();
            let w = Tensor::from_vec(random(n * k, 1), (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let packed = Packed::new(kind, &q.data().unwrap(), n, k);
            let reference = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 7, 9] {
                let x = random(m * k, 2 + m as u64);
                let ours = matmul(&packed, &x, m);
                let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
                let theirs: Vec<f32> = reference
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(ours, theirs, "{dtype:?} m={m}");
            }
            // Rows read back from the packed layout equal candle's dequantization.
            let deq: Vec<f32> = QTensor::quantize(&w, dtype)
                .unwrap()
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut row = vec![0f32; k];
            for j in [0, 5, n - 1] {
                packed.dequantize_row(j, &mut row);
                assert_eq!(row, deq[j * k..(j + 1) * k], "{dtype:?} row {j}");
            }
        }
    }
}
