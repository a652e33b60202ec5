//! Quantized matrix × activations on the CPU for Q4_1, Q5_0 and Q5_1, with AVX2 dot products.
//!
//! Written here because candle 0.11 has no SIMD path for these three on x86: its generic
//! loop made SmolLM2 (Q4_1) and most of Gemma 3 (Q5_0) several times slower than llama.cpp.
//! The block layouts and the activation quantization are ggml's, and the SIMD part computes
//! each block's integer dot product (exact in any order); the float combination per block is
//! candle's own expression in candle's order, so results are bit-identical to candle's and
//! greedy generations do not change. Other types keep candle's kernels (AVX2 for Q4_0, Q8_0
//! and the K-quants).

use candle_core::quantized::GgmlDType;
use half::f16;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4_1,
    Q5_0,
    Q5_1,
}

impl Kind {
    pub fn from_dtype(d: GgmlDType) -> Option<Self> {
        Some(match d {
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            _ => return None,
        })
    }

    /// Bytes of one block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
        }
    }
}

/// One block of 32 activations quantized to int8: ggml's block_q8_1 (d and d·Σq as f16),
/// which also serves Q5_0, whose dot product pairs with block_q8_0 (it ignores `s`).
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

#[inline(always)]
fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dot product of one weight row (`row`, raw blocks) with quantized activations.
pub fn dot(kind: Kind, row: &[u8], act: &[Q8Block]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked above); slices are in bounds.
        return unsafe { avx2::dot(kind, row, act) };
    }
    dot_scalar(kind, row, act)
}

/// Four rows against the same activations: `[dot(rows[0], act), …]`, bit-identical to four
/// `dot` calls but with the four float accumulations interleaved.
pub fn dot4(kind: Kind, rows: [&[u8]; 4], act: &[Q8Block]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::dot4(kind, rows, act) };
    }
    rows.map(|r| dot_scalar(kind, r, act))
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// The (d, min, high bits, nibbles) of block `b`.
#[inline(always)]
fn parts(kind: Kind, b: &[u8]) -> (f32, f32, u32, &[u8]) {
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    match kind {
        Kind::Q4_1 => (half_at(b, 0), half_at(b, 2), 0, &b[4..20]),
        Kind::Q5_0 => (half_at(b, 0), 0.0, word(2), &b[6..22]),
        Kind::Q5_1 => (half_at(b, 0), half_at(b, 2), word(4), &b[8..24]),
    }
}

/// candle's (and ggml's generic) per-block float update, in its order, so the result is
/// bit-identical whatever computed `sumi`.
#[inline]
fn combine(kind: Kind, sumf: f32, sumi: i32, d: f32, m: f32, a: &Q8Block) -> f32 {
    match kind {
        Kind::Q5_0 => sumf + sumi as f32 * d * a.d,
        Kind::Q4_1 | Kind::Q5_1 => sumf + (sumi as f32 * d * a.d + m * a.s),
    }
}

/// The portable reference: ggml's generic vec_dot for each type.
pub fn dot_scalar(kind: Kind, row: &[u8], act: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.chunks_exact(kind.block_bytes()).zip(act) {
        let (d, m, qh, qs) = parts(kind, b);
        let offset = if kind == Kind::Q5_0 { 16 } else { 0 };
        let mut sumi = 0i32;
        for (j, &q) in qs.iter().enumerate().take(QK / 2) {
            let (mut lo, mut hi) = ((q & 0x0F) as i32, (q >> 4) as i32);
            if kind != Kind::Q4_1 {
                lo |= (((qh >> j) & 1) << 4) as i32;
                hi |= (((qh >> (j + 16)) & 1) << 4) as i32;
            }
            sumi += (lo - offset) * a.qs[j] as i32 + (hi - offset) * a.qs[j + QK / 2] as i32;
        }
        sum = combine(kind, sum, sumi, d, m, a);
    }
    sum
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

    /// Σ unsigned(ax) · signed(sy) over all 32 byte pairs, exactly (no i16 saturation: the
    /// weights are below 32 and the activations within ±127).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn us8(ax: __m256i, sy: __m256i) -> i32 {
        let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1));
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(dot),
            _mm256_extracti128_si256(dot, 1),
        );
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// The 8 partial i32 sums of one block's integer dot product.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_lanes(kind: Kind, p: *const u8, qy: __m256i) -> __m256i {
        let (x, y) = match kind {
            Kind::Q4_1 => (nibbles(p.add(4)), qy),
            Kind::Q5_0 => {
                let hi = _mm256_andnot_si256(bits(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
                let x = _mm256_or_si256(nibbles(p.add(6)), hi);
                (_mm256_sign_epi8(x, x), _mm256_sign_epi8(qy, x))
            }
            Kind::Q5_1 => {
                let hi = _mm256_and_si256(bits(p.add(4)), _mm256_set1_epi8(0x10));
                (_mm256_or_si256(nibbles(p.add(8)), hi), qy)
            }
        };
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    }

    /// Unpacks four weight rows into unsigned bytes (Q4_1: the nibble; Q5_x: nibble | high
    /// bit << 4) and their scales, laid out per block as 4 × 32 bytes, 4 d, 4 m.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn unpack4(
        kind: Kind,
        rows: [&[u8]; 4],
        nb: usize,
        q: &mut [u8],
        d: &mut [f32],
        m: &mut [f32],
    ) {
        let bb = kind.block_bytes();
        for b in 0..nb {
            for (r, row) in rows.iter().enumerate() {
                let p = row.as_ptr().add(b * bb);
                let x = match kind {
                    Kind::Q4_1 => nibbles(p.add(4)),
                    Kind::Q5_0 => _mm256_or_si256(
                        nibbles(p.add(6)),
                        _mm256_and_si256(bits(p.add(2)), _mm256_set1_epi8(0x10)),
                    ),
                    Kind::Q5_1 => _mm256_or_si256(
                        nibbles(p.add(8)),
                        _mm256_and_si256(bits(p.add(4)), _mm256_set1_epi8(0x10)),
                    ),
                };
                _mm256_storeu_si256(q.as_mut_ptr().add((b * 4 + r) * QK) as *mut __m256i, x);
                let (dd, mm, _, _) = super::parts(kind, &row[b * bb..(b + 1) * bb]);
                d[b * 4 + r] = dd;
                m[b * 4 + r] = mm;
            }
        }
    }

    /// dot4 on an unpacked tile: the same integer sums and the same float expression per
    /// lane, so bit-identical to `dot4`, without unpacking the weights for every row of x.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_unpacked(
        kind: Kind,
        q: &[u8],
        d: &[f32],
        m: &[f32],
        act: &[Q8Block],
    ) -> [f32; 4] {
        let ones = _mm256_set1_epi16(1);
        let mut sumf = _mm_setzero_ps();
        for (b, a) in act.iter().enumerate() {
            let qy = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let lane = |r: usize| {
                let x = _mm256_loadu_si256(q.as_ptr().add((b * 4 + r) * QK) as *const __m256i);
                _mm256_madd_epi16(_mm256_maddubs_epi16(x, qy), ones)
            };
            let h = _mm256_hadd_epi32(
                _mm256_hadd_epi32(lane(0), lane(1)),
                _mm256_hadd_epi32(lane(2), lane(3)),
            );
            let mut sumi = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            if kind == Kind::Q5_0 {
                // Σ (q − 16)·y = Σ q·y − 16·Σ y, exactly.
                sumi = _mm_sub_epi32(sumi, _mm_set1_epi32(16 * a.isum));
            }
            let dv = _mm_loadu_ps(d.as_ptr().add(b * 4));
            let mut t = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(sumi), dv), _mm_set1_ps(a.d));
            if kind != Kind::Q5_0 {
                t = _mm_add_ps(
                    t,
                    _mm_mul_ps(_mm_loadu_ps(m.as_ptr().add(b * 4)), _mm_set1_ps(a.s)),
                );
            }
            sumf = _mm_add_ps(sumf, t);
        }
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), sumf);
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4(kind: Kind, rows: [&[u8]; 4], act: &[Q8Block]) -> [f32; 4] {
        let bb = kind.block_bytes();
        let nb = act.len();
        debug_assert!(rows.iter().all(|r| r.len() >= nb * bb));
        let ptrs = rows.map(|r| r.as_ptr());
        let mut sumf = _mm_setzero_ps();
        let scale = |off: usize, i: usize| {
            let h = |r: usize| (ptrs[r].add(i * bb + off) as *const u16).read_unaligned() as i16;
            _mm_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), 0, 0, 0, 0))
        };
        for (i, a) in act.iter().enumerate() {
            let qy = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let l0 = block_lanes(kind, ptrs[0].add(i * bb), qy);
            let l1 = block_lanes(kind, ptrs[1].add(i * bb), qy);
            let l2 = block_lanes(kind, ptrs[2].add(i * bb), qy);
            let l3 = block_lanes(kind, ptrs[3].add(i * bb), qy);
            // Exact integer sums of the four blocks, one per lane.
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(l0, l1), _mm256_hadd_epi32(l2, l3));
            let sumi = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            // The scalar expression, lane by lane: sumf + (sumi * d * d8 [+ m * s]).
            let d = scale(0, i);
            let mut t = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(sumi), d), _mm_set1_ps(a.d));
            if kind != Kind::Q5_0 {
                t = _mm_add_ps(t, _mm_mul_ps(scale(2, i), _mm_set1_ps(a.s)));
            }
            sumf = _mm_add_ps(sumf, t);
        }
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), sumf);
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(kind: Kind, row: &[u8], act: &[Q8Block]) -> f32 {
        let bb = kind.block_bytes();
        let mut sumf = 0f32;
        let half = |p: *const u8| {
            let bits = (p as *const u16).read_unaligned() as i32;
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
        };
        for (b, a) in row.chunks_exact(bb).zip(act) {
            let p = b.as_ptr();
            let d = half(p);
            let m = if kind == Kind::Q5_0 {
                0.0
            } else {
                half(p.add(2))
            };
            let qy = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let sumi = match kind {
                Kind::Q4_1 => us8(nibbles(p.add(4)), qy),
                Kind::Q5_0 => {
                    // x - 16 as signed bytes: the high bit clear turns into 0xF0.
                    let hi = _mm256_andnot_si256(bits(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
                    let x = _mm256_or_si256(nibbles(p.add(6)), hi);
                    us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(qy, x))
                }
                Kind::Q5_1 => {
                    let hi = _mm256_and_si256(bits(p.add(4)), _mm256_set1_epi8(0x10));
                    us8(_mm256_or_si256(nibbles(p.add(8)), hi), qy)
                }
            };
            sumf = super::combine(kind, sumf, sumi, d, m, a);
        }
        debug_assert_eq!(QK, 32);
        sumf
    }
}

/// A raw pointer that may cross threads; each task writes a disjoint range through it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint rows of one buffer that outlives the parallel call.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// y (m × n) = x (m × k) · Wᵀ, W being n rows of k weights in `kind` blocks. Each weight
/// row is read once and used for every activation row while it sits in cache, which is
/// what makes prefill a matrix kernel rather than m matrix-vector products.
///
/// Rows are spread over candle's spinning barrier pool, the one candle's own kernels use:
/// a second pool (rayon) fought it for the same cores and most time went to the scheduler.
pub fn matmul(kind: Kind, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    matmul_many(kind, &[(w, n)], k, x, m)
        .pop()
        .expect("one matrix")
}

/// Several matrices of one kind applied to the same input (Q, K and V; gate and up): the
/// activations are quantized once and all rows share one parallel region.
pub fn matmul_many(
    kind: Kind,
    mats: &[(&[u8], usize)],
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<Vec<f32>> {
    debug_assert_eq!(k % QK, 0);
    let nb = k / QK;
    let row_bytes = nb * kind.block_bytes();
    let mut acts = vec![Q8Block::default(); m * nb];
    for (a, xs) in acts.chunks_mut(nb).zip(x.chunks(k)) {
        quantize_activations(xs, a);
    }
    let mut ys: Vec<Vec<f32>> = mats.iter().map(|(_, n)| vec![0f32; m * n]).collect();
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    // Work items are groups of four rows (dot4), numbered across the matrices.
    let starts: Vec<usize> = mats
        .iter()
        .scan(0, |acc, (_, n)| {
            let s = *acc;
            *acc += n.div_ceil(4);
            Some(s)
        })
        .collect();
    let total: usize = mats.iter().map(|(_, n)| n.div_ceil(4)).sum();
    candle_core::utils::barrier_pool().execute_chunked(total, |groups| {
        for g in groups {
            let t = starts.partition_point(|&s| s <= g) - 1;
            let (w, n) = mats[t];
            debug_assert_eq!(w.len(), n * row_bytes);
            let out = outs[t];
            let row = |j: usize| &w[j * row_bytes..(j + 1) * row_bytes];
            let j0 = (g - starts[t]) * 4;
            #[cfg(target_arch = "x86_64")]
            if m >= 8 && j0 + 4 <= n && avx2() {
                // Prefill: unpack the four rows once, then sweep every row of x.
                let rows = [row(j0), row(j0 + 1), row(j0 + 2), row(j0 + 3)];
                let (mut q, mut d, mut mins) = (
                    vec![0u8; nb * 4 * QK],
                    vec![0f32; nb * 4],
                    vec![0f32; nb * 4],
                );
                // SAFETY: AVX2/FMA/F16C checked; buffers sized for nb blocks of 4 rows.
                unsafe { avx2::unpack4(kind, rows, nb, &mut q, &mut d, &mut mins) };
                for i in 0..m {
                    let act = &acts[i * nb..(i + 1) * nb];
                    // SAFETY: as below; the same AVX2 check.
                    let v = unsafe { avx2::dot4_unpacked(kind, &q, &d, &mins, act) };
                    for (r, v) in v.into_iter().enumerate() {
                        // SAFETY: rows j0..j0+4 of output row i of matrix t are this task's.
                        unsafe { *out.0.add(i * n + j0 + r) = v };
                    }
                }
                continue;
            }
            for i in 0..m {
                let act = &acts[i * nb..(i + 1) * nb];
                // SAFETY: rows j0..j0+4 of output row i of matrix t are written by this task
                // only, and each output holds m * n values.
                let put = |j: usize, v: f32| unsafe { *out.0.add(i * n + j) = v };
                if j0 + 4 <= n {
                    let v = dot4(kind, [row(j0), row(j0 + 1), row(j0 + 2), row(j0 + 3)], act);
                    for (r, v) in v.into_iter().enumerate() {
                        put(j0 + r, v);
                    }
                } else {
                    for j in j0..n {
                        put(j, dot(kind, row(j), act));
                    }
                }
            }
        }
    });
    ys
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

    /// Every type, against candle's own matmul on random blocks, decode and prefill shapes,
    /// and the AVX2 path against the scalar one: all bit-identical.
    #[test]
    fn kernels_match_candle_reference() {
        let dev = Device::Cpu;
        let (n, k) = (42, 256);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
            let kind = Kind::from_dtype(dtype).unwrap();
            let w = Tensor::from_vec(random(n * k, 1), (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let reference = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 7, 9] {
                let x = random(m * k, 2 + m as u64);
                let ours = matmul(kind, &bytes, n, k, &x, m);
                let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
                let theirs: Vec<f32> = reference
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                // Bit for bit: the float combination follows candle's order.
                assert_eq!(ours, theirs, "{dtype:?} m={m}");
                // The SIMD and scalar paths agree too.
                let mut acts = vec![Q8Block::default(); k / QK];
                quantize_activations(&x[..k], &mut acts);
                let row = &bytes[..k / QK * kind.block_bytes()];
                let (s, v) = (dot_scalar(kind, row, &acts), dot(kind, row, &acts));
                assert_eq!(s, v, "{dtype:?}: scalar vs simd");
            }
        }
    }
}
