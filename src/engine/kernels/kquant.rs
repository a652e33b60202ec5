//! The K-quant types (Q4_K, Q5_K, Q6_K: 256-weight super-blocks): tokentop's packing in
//! tiles of eight rows, activation quantization to ggml's block_q8_K, and the matmul entry
//! that runs one instruction set's tile kernels on candle's barrier pool.
//!
//! Written here because candle 0.11's K-quant kernels run one parallel region per matrix
//! (no fused Q/K/V, gate/up or MoE regions), keep f32 scales and mins per sub-block in its
//! repacked tiles (a third more bytes read per token than the file holds), and have no tile
//! path at all for Q5_K.
//!
//! Tiles hold eight rows, one per lane of an AVX2 register: per super-block the rows' f16
//! scales, their 6-bit sub-block scales and mins as bytes, then the quants with four
//! consecutive weights of one row in four bytes (8 rows × 4 bytes: one register), the same
//! order as candle's x86 tiles. A matrix whose row count is not a multiple of 8 ends in a
//! tile padded with zero rows, which the kernels compute and nobody reads.
//!
//! Activations are quantized as llama.cpp does ([`quantize_activations`]: halves to even,
//! where candle rounds them away from zero; nothing else differs). Given the same quantized
//! activations, the arithmetic, per row: the integer dot product of each sub-block is exact;
//! the float updates replay candle's x86 tile kernels (repack_x86.rs, the same in its AVX2,
//! AVX-VNNI, AVX-512 and AMX forms), so results are bit-identical to candle wherever candle
//! takes its tiles (Q4_K always, Q6_K for more than one input row; both when the row count is
//! a multiple of 16):
//! - Q4_K / Q5_K, per sub-block of 32: `acc = fma(Σq·a, (d·sc)·d_a, acc)`, then
//!   `acc = fma(−(dmin·m), d_a·(bsum₀+bsum₁), acc)` (Q5_K has no candle tile: same order);
//! - Q6_K, per sub-block of 16: `acc = fma(Σq·a − 32·bsum, (d·sc)·d_a, acc)` with q in 0..63.
//!
//! For Q6_K with one activation row (decode) candle runs its vec_dot kernel instead, and so
//! do these kernels: per super-block eight exact integer lane sums (lane l: weights 4l..4l+3
//! of every 32, times their scales), `lane = fma(d·d_a, lane, lane)`, and candle's final
//! sum of the eight lanes; so Q6_K decode is bit-identical to candle too.
//!
//! Elsewhere (Q5_K, and row counts not a multiple of 16) candle runs its vec_dot kernels, a
//! different order of the same float additions: results agree within a few ulps of Σ|w·x|.

use super::{Isa, Job, Out};
use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;
/// Rows per tile.
pub const TILE: usize = 8;

/// One super-block of 256 activations quantized to int8: ggml's block_q8_K.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8KBlock {
    pub d: f32,
    pub qs: [i8; QK_K],
    /// Σ qs over each 16 consecutive values.
    pub bsums: [i16; QK_K / 16],
    /// d·(bsums[2s] + bsums[2s+1]) per 32 values, and 32·bsums[s] per 16, as the Q4_K/Q5_K
    /// and Q6_K kernels use them (computed once per row, not once per tile).
    pub dsum32: [f32; QK_K / 32],
    pub sum16x32: [f32; QK_K / 16],
}

impl Default for Q8KBlock {
    fn default() -> Self {
        Self {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
            dsum32: [0.0; QK_K / 32],
            sum16x32: [0.0; QK_K / 16],
        }
    }
}

/// ggml's quantize_row_q8_K as llama.cpp's CPU backend runs it (quantize_row_q8_K_ref on
/// x86-64 and aarch64): the scale maps the value of largest magnitude to −127, d is its
/// reciprocal, and the products round halves to even (ggml's nearest_int; candle's
/// BlockQ8K::from_float rounds them away from zero).
pub fn quantize_activations(x: &[f32], out: &mut [Q8KBlock]) {
    for (xs, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xs {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *b = Q8KBlock::default();
            continue;
        }
        let iscale = -127f32 / max;
        // (iscale·v) rounded half to even and clamped to i8 (the saturating cast).
        super::round_i8(xs, iscale, &mut b.qs);
        for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = q.iter().map(|&q| q as i32).sum::<i32>() as i16;
        }
        b.d = 1.0 / iscale;
        for (s, v) in b.dsum32.iter_mut().enumerate() {
            *v = b.d * (b.bsums[2 * s] as i32 + b.bsums[2 * s + 1] as i32) as f32;
        }
        for (v, &s) in b.sum16x32.iter_mut().zip(&b.bsums) {
            *v = 32.0 * s as f32;
        }
    }
}

/// Which K-quant a tile holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KQuant {
    Q4K,
    Q5K,
    Q6K,
}

/// Byte offsets inside one tile's super-block (8 rows × 256 weights).
pub(super) mod layout {
    /// Q4_K / Q5_K: d and dmin (8 f16 each), scales and mins ([sub][row] bytes), quants
    /// ([group of 8 weights][row][4 bytes]: weight j in the low nibble of byte j, weight
    /// j + 4 in the high one), Q5_K's fifth bits ([sub][row][4 bytes], see `pack`).
    pub const D: usize = 0;
    pub const DMIN: usize = 16;
    pub const SC: usize = 32;
    pub const MN: usize = 96;
    pub const QS: usize = 160;
    pub const QH5: usize = 1184;
    /// Q6_K: d (8 f16), scales ([sub of 16][row] i8), low nibbles as Q4_K's quants, the
    /// two high bits ([sub][row][4 bytes]: bits 2i, 2i+1 of byte j for weight 4i + j).
    pub const D6: usize = 0;
    pub const SC6: usize = 16;
    pub const QL6: usize = 144;
    pub const QH6: usize = 1168;
}

impl KQuant {
    /// Bytes of one super-block of one row in ggml's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of one super-block of a tile.
    pub(super) fn tile_bytes(self) -> usize {
        match self {
            Self::Q4K => 1184,
            Self::Q5K => 1440,
            Self::Q6K => 1680,
        }
    }
}

/// ggml's get_scale_min_k4: the 6-bit scale and min of sub-block j.
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 256 weights of one ggml block as unsigned values (Q6_K's still offset by 32).
#[cfg(test)]
fn block_values(kind: KQuant, blk: &[u8]) -> [u8; QK_K] {
    let mut v = [0u8; QK_K];
    match kind {
        KQuant::Q4K | KQuant::Q5K => {
            let qs = if kind == KQuant::Q4K {
                &blk[16..144]
            } else {
                &blk[48..176]
            };
            for c in 0..4 {
                for j in 0..32 {
                    v[c * 64 + j] = qs[c * 32 + j] & 0x0F;
                    v[c * 64 + 32 + j] = qs[c * 32 + j] >> 4;
                }
            }
            if kind == KQuant::Q5K {
                let qh = &blk[16..48];
                for (i, v) in v.iter_mut().enumerate() {
                    *v |= ((qh[i % 32] >> (i / 32)) & 1) << 4;
                }
            }
        }
        KQuant::Q6K => {
            let (ql, qh) = (&blk[0..128], &blk[128..192]);
            for h in 0..2 {
                let (ql, qh) = (&ql[h * 64..], &qh[h * 32..]);
                for j in 0..32 {
                    v[h * 128 + j] = (ql[j] & 0x0F) | ((qh[j] & 3) << 4);
                    v[h * 128 + j + 32] = (ql[j + 32] & 0x0F) | (((qh[j] >> 2) & 3) << 4);
                    v[h * 128 + j + 64] = (ql[j] >> 4) | (((qh[j] >> 4) & 3) << 4);
                    v[h * 128 + j + 96] = (ql[j + 32] >> 4) | (((qh[j] >> 6) & 3) << 4);
                }
            }
        }
    }
    v
}

/// Bytes of n rows of k weights packed in tiles (the last tile padded to eight rows).
pub fn packed_len(kind: KQuant, n: usize, k: usize) -> usize {
    n.div_ceil(TILE) * (k / QK_K) * kind.tile_bytes()
}

/// Repacks n rows of k weights given in ggml's block layout into tiles of eight rows.
#[cfg(test)]
fn pack(kind: KQuant, raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    let mut data = vec![0u8; packed_len(kind, n, k)];
    pack_into(kind, raw, n, k, &mut data);
    data
}

/// Four bytes of a slice as a little-endian word (four lanes of one byte).
fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A tile's quants (weights 8g..8g+7 of row r in word g·TILE + r, weight 8g + j in the low
/// nibble of byte j, 8g + j + 4 in the high one) from 32 bytes of a ggml block whose low
/// nibbles hold 32-weight chunk `lo` and high nibbles chunk `lo + step`: eight bytes give
/// both chunks' words for one group (bytes 0..3 and 4..7 of it, nibble by nibble).
fn nibble_quads(src: &[u8; 32], lo: usize, step: usize, out: &mut [u8; 1024], r: usize) {
    const M: u64 = 0x0F0F_0F0F_0F0F_0F0F;
    for i in 0..4 {
        let x = u64::from_le_bytes(src[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let (l, h) = (x & M, (x >> 4) & M);
        // Byte j + 4's nibble goes to the high half of byte j.
        for (c, v) in [(lo, l), (lo + step, h)] {
            let o = ((4 * c + i) * TILE + r) * 4;
            out[o..o + 4].copy_from_slice(&((v | (v >> 28)) as u32).to_le_bytes());
        }
    }
}

fn bytes32(b: &[u8], at: usize) -> &[u8; 32] {
    b[at..at + 32].try_into().expect("32 bytes")
}

/// `pack` into `out` (`packed_len` bytes; every byte is written, padding rows as zeros).
///
/// Written on words (each byte a lane) rather than weight by weight: the loader repacks
/// every K-quant matrix of a model with this, and unpacking each weight to a byte first (as
/// `pack_reference` does) made it 45% of a MoE file's load. A test holds the two to the same
/// bytes.
pub fn pack_into(kind: KQuant, raw: &[u8], n: usize, k: usize, out: &mut [u8]) {
    use layout::*;
    assert_eq!(k % QK_K, 0, "rows must be whole super-blocks");
    let (kb, bb, tb) = (k / QK_K, kind.block_bytes(), kind.tile_bytes());
    assert_eq!(raw.len(), n * kb * bb, "matrix bytes");
    assert_eq!(out.len(), packed_len(kind, n, k), "packed bytes");
    for (t, tile) in out.chunks_exact_mut(kb * tb).enumerate() {
        let rows = TILE.min(n - t * TILE);
        if rows < TILE {
            tile.fill(0);
        }
        for (b, out) in tile.chunks_exact_mut(tb).enumerate() {
            for r in 0..rows {
                let at = ((t * TILE + r) * kb + b) * bb;
                let blk = &raw[at..at + bb];
                match kind {
                    KQuant::Q4K | KQuant::Q5K => {
                        out[D + 2 * r..D + 2 * r + 2].copy_from_slice(&blk[0..2]);
                        out[DMIN + 2 * r..DMIN + 2 * r + 2].copy_from_slice(&blk[2..4]);
                        for s in 0..8 {
                            let (sc, mn) = scale_min(s, &blk[4..16]);
                            out[SC + s * TILE + r] = sc;
                            out[MN + s * TILE + r] = mn;
                        }
                        // Bytes 32m..32m+32: chunk 2m in the low nibbles, 2m + 1 in the high.
                        let qs = if kind == KQuant::Q4K { 16 } else { 48 };
                        let quads: &mut [u8; 1024] =
                            (&mut out[QS..QS + 1024]).try_into().expect("1024");
                        for m in 0..4 {
                            nibble_quads(bytes32(blk, qs + 32 * m), 2 * m, 1, quads, r);
                        }
                        if kind == KQuant::Q5K {
                            // Sub s, byte j: bit 2·g4 is the fifth bit of weight 8·g4 + j,
                            // bit 2·g4 + 1 that of weight 8·g4 + 4 + j (g4: group in sub);
                            // weight i's fifth bit is bit i/32 of qh[i % 32].
                            let qh = &blk[16..48];
                            for s in 0..8 {
                                let mut h = 0u32;
                                for g4 in 0..4 {
                                    let (a, b) = (word(qh, 8 * g4), word(qh, 8 * g4 + 4));
                                    h |= ((a >> s) & 0x0101_0101) << (2 * g4);
                                    h |= ((b >> s) & 0x0101_0101) << (2 * g4 + 1);
                                }
                                let o = QH5 + (s * TILE + r) * 4;
                                out[o..o + 4].copy_from_slice(&h.to_le_bytes());
                            }
                        }
                    }
                    KQuant::Q6K => {
                        out[D6 + 2 * r..D6 + 2 * r + 2].copy_from_slice(&blk[208..210]);
                        for s in 0..16 {
                            out[SC6 + s * TILE + r] = blk[192 + s];
                        }
                        // Bytes 32p..32p+32 (half h = p/2): chunk 4h + p%2 in the low
                        // nibbles, chunk 4h + p%2 + 2 in the high ones.
                        let quads: &mut [u8; 1024] =
                            (&mut out[QL6..QL6 + 1024]).try_into().expect("1024");
                        for p in 0..4 {
                            nibble_quads(bytes32(blk, 32 * p), 4 * (p / 2) + p % 2, 2, quads, r);
                        }
                        // Sub s (16 weights of chunk c = s/2), byte j: bits 2i, 2i+1 are the
                        // two high bits of weight 16s + 4i + j, which are bits 2q, 2q+1 of
                        // qh[32h + (16s + 4i + j) % 32] (h = c/4, q = c%4).
                        let qh = &blk[128..192];
                        for s in 0..16 {
                            let c = s / 2;
                            let base = 32 * (c / 4) + 16 * (s % 2);
                            let mut h = 0u32;
                            for i in 0..4 {
                                h |= ((word(qh, base + 4 * i) >> (2 * (c % 4))) & 0x0303_0303)
                                    << (2 * i);
                            }
                            let o = QH6 + (s * TILE + r) * 4;
                            out[o..o + 4].copy_from_slice(&h.to_le_bytes());
                        }
                    }
                }
            }
        }
    }
}

/// The first, byte-by-byte form of `pack_into`, kept as the test's reference: each weight
/// unpacked to a byte, then packed again.
#[cfg(test)]
fn pack_reference(kind: KQuant, raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    use layout::*;
    assert_eq!(k % QK_K, 0, "rows must be whole super-blocks");
    let (kb, bb, tb) = (k / QK_K, kind.block_bytes(), kind.tile_bytes());
    assert_eq!(raw.len(), n * kb * bb, "matrix bytes");
    let tiles = n.div_ceil(TILE);
    let mut data = vec![0u8; tiles * kb * tb];
    for (t, tile) in data.chunks_exact_mut(kb * tb).enumerate() {
        for (b, out) in tile.chunks_exact_mut(tb).enumerate() {
            for r in 0..TILE.min(n - t * TILE) {
                let at = ((t * TILE + r) * kb + b) * bb;
                let blk = &raw[at..at + bb];
                let v = block_values(kind, blk);
                // Four consecutive weights of group g (8 weights) at byte offset of row r.
                let quad = |base: usize, g: usize| base + (g * TILE + r) * 4;
                match kind {
                    KQuant::Q4K | KQuant::Q5K => {
                        out[D + 2 * r..D + 2 * r + 2].copy_from_slice(&blk[0..2]);
                        out[DMIN + 2 * r..DMIN + 2 * r + 2].copy_from_slice(&blk[2..4]);
                        for s in 0..8 {
                            let (sc, mn) = scale_min(s, &blk[4..16]);
                            out[SC + s * TILE + r] = sc;
                            out[MN + s * TILE + r] = mn;
                        }
                        for g in 0..32 {
                            for j in 0..4 {
                                out[quad(QS, g) + j] =
                                    (v[8 * g + j] & 0x0F) | (v[8 * g + j + 4] & 0x0F) << 4;
                            }
                        }
                        if kind == KQuant::Q5K {
                            // Sub s, byte j: bit 2·g4 is the fifth bit of weight 8·g4 + j,
                            // bit 2·g4 + 1 that of weight 8·g4 + 4 + j (g4: group in sub).
                            for s in 0..8 {
                                for j in 0..4 {
                                    let mut h = 0u8;
                                    for g4 in 0..4 {
                                        let w = 32 * s + 8 * g4 + j;
                                        h |= (v[w] >> 4) << (2 * g4);
                                        h |= (v[w + 4] >> 4) << (2 * g4 + 1);
                                    }
                                    out[quad(QH5, s) + j] = h;
                                }
                            }
                        }
                    }
                    KQuant::Q6K => {
                        out[D6 + 2 * r..D6 + 2 * r + 2].copy_from_slice(&blk[208..210]);
                        for s in 0..16 {
                            out[SC6 + s * TILE + r] = blk[192 + s];
                        }
                        for g in 0..32 {
                            for j in 0..4 {
                                out[quad(QL6, g) + j] =
                                    (v[8 * g + j] & 0x0F) | (v[8 * g + j + 4] & 0x0F) << 4;
                            }
                        }
                        for s in 0..16 {
                            for j in 0..4 {
                                let mut h = 0u8;
                                for i in 0..4 {
                                    h |= (v[16 * s + 4 * i + j] >> 4) << (2 * i);
                                }
                                out[quad(QH6, s) + j] = h;
                            }
                        }
                    }
                }
            }
        }
    }
    data
}

/// The pieces of row r of one tile super-block: f16 scales, sub-block scales and mins, and
/// the 256 weights as unsigned values.
struct RowBlock {
    d: f32,
    dmin: f32,
    sc: [i32; 16],
    mn: [i32; 8],
    v: [u8; QK_K],
}

fn row_block(kind: KQuant, tb: &[u8], r: usize) -> RowBlock {
    use layout::*;
    let half = |i: usize| f16::from_bits(u16::from_le_bytes([tb[i], tb[i + 1]])).to_f32();
    let quad = |base: usize, g: usize, j: usize| tb[base + (g * TILE + r) * 4 + j];
    let mut rb = RowBlock {
        d: 0.0,
        dmin: 0.0,
        sc: [0; 16],
        mn: [0; 8],
        v: [0; QK_K],
    };
    let qs = if kind == KQuant::Q6K { QL6 } else { QS };
    for g in 0..32 {
        for j in 0..4 {
            let b = quad(qs, g, j);
            rb.v[8 * g + j] = b & 0x0F;
            rb.v[8 * g + j + 4] = b >> 4;
        }
    }
    match kind {
        KQuant::Q4K | KQuant::Q5K => {
            rb.d = half(D + 2 * r);
            rb.dmin = half(DMIN + 2 * r);
            for s in 0..8 {
                rb.sc[s] = tb[SC + s * TILE + r] as i32;
                rb.mn[s] = tb[MN + s * TILE + r] as i32;
            }
            if kind == KQuant::Q5K {
                for s in 0..8 {
                    for j in 0..4 {
                        let h = quad(QH5, s, j);
                        for g4 in 0..4 {
                            let w = 32 * s + 8 * g4 + j;
                            rb.v[w] |= ((h >> (2 * g4)) & 1) << 4;
                            rb.v[w + 4] |= ((h >> (2 * g4 + 1)) & 1) << 4;
                        }
                    }
                }
            }
        }
        KQuant::Q6K => {
            rb.d = half(D6 + 2 * r);
            for s in 0..16 {
                rb.sc[s] = tb[SC6 + s * TILE + r] as i8 as i32;
                for j in 0..4 {
                    let h = quad(QH6, s, j);
                    for i in 0..4 {
                        rb.v[16 * s + 4 * i + j] |= ((h >> (2 * i)) & 3) << 4;
                    }
                }
            }
        }
    }
    rb
}

/// Row j of a packed matrix as floats, computed as candle's dequantization does (for
/// embedding lookups from a matrix tied to the output layer, so it is stored once).
pub fn dequantize_row(kind: KQuant, data: &[u8], k: usize, j: usize, out: &mut [f32]) {
    let (kb, tb) = (k / QK_K, kind.tile_bytes());
    let tile = &data[(j / TILE) * kb * tb..(j / TILE + 1) * kb * tb];
    for (b, ys) in out.chunks_exact_mut(QK_K).enumerate().take(kb) {
        let rb = row_block(kind, &tile[b * tb..(b + 1) * tb], j % TILE);
        for (i, y) in ys.iter_mut().enumerate() {
            *y = match kind {
                KQuant::Q4K | KQuant::Q5K => {
                    let (s, m) = (i / 32, i / 32);
                    (rb.d * rb.sc[s] as f32) * rb.v[i] as f32 - rb.dmin * rb.mn[m] as f32
                }
                KQuant::Q6K => rb.d * rb.sc[i / 16] as f32 * (rb.v[i] as i32 - 32) as f32,
            };
        }
    }
}

/// One tile against one activation row in the kernels' order, one row at a time: the
/// reference the SIMD kernels are checked against, and what runs where none does.
fn tile_scalar(kind: KQuant, order: Order, tile: &[u8], act: &[Q8KBlock]) -> [f32; TILE] {
    let tb = kind.tile_bytes();
    let mut out = [0f32; TILE];
    for (r, out) in out.iter_mut().enumerate() {
        // Order::Lanes: candle's eight lanes, lane l holding weights 4l..4l+3 of every 32.
        let (mut acc, mut lanes) = (0f32, [0f32; 8]);
        for (b, a) in act.iter().enumerate() {
            let rb = row_block(kind, &tile[b * tb..(b + 1) * tb], r);
            let dot = |from: usize, len: usize| -> i32 {
                (from..from + len)
                    .map(|i| rb.v[i] as i32 * a.qs[i] as i32)
                    .sum()
            };
            match (kind, order) {
                (KQuant::Q4K | KQuant::Q5K, _) => {
                    for s in 0..8 {
                        let scale = rb.d * rb.sc[s] as f32;
                        let min = rb.dmin * rb.mn[s] as f32;
                        acc = (dot(32 * s, 32) as f32).mul_add(scale * a.d, acc);
                        acc = (-min).mul_add(a.dsum32[s], acc);
                    }
                }
                (KQuant::Q6K, Order::SubBlocks) => {
                    for s in 0..16 {
                        let scale = rb.d * rb.sc[s] as f32;
                        let f = dot(16 * s, 16) as f32 - a.sum16x32[s];
                        acc = f.mul_add(scale * a.d, acc);
                    }
                }
                (KQuant::Q6K, Order::Lanes) => {
                    let d = a.d * rb.d;
                    for (l, lane) in lanes.iter_mut().enumerate() {
                        let isum: i32 = (0..8)
                            .map(|c| {
                                let at = 32 * c + 4 * l;
                                let asum: i32 = (at..at + 4).map(|i| a.qs[i] as i32).sum();
                                rb.sc[at / 16] * (dot(at, 4) - 32 * asum)
                            })
                            .sum();
                        *lane = d.mul_add(isum as f32, *lane);
                    }
                }
            }
        }
        *out = match order {
            Order::SubBlocks => acc,
            // candle's hsum_float_8.
            Order::Lanes => {
                let x = lanes;
                ((x[4] + x[0]) + (x[6] + x[2])) + ((x[5] + x[1]) + (x[7] + x[3]))
            }
        };
    }
    out
}

/// The order a kernel adds its float terms in (see the module comment): per sub-block (the
/// tiles of candle's x86 kernels) or, for Q6_K with one activation row, per super-block in
/// eight lanes summed at the end (candle's vec_dot, which it runs for Q6_K decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Order {
    SubBlocks,
    Lanes,
}

impl Order {
    fn of(kind: KQuant, m: usize) -> Self {
        if kind == KQuant::Q6K && m == 1 {
            Self::Lanes
        } else {
            Self::SubBlocks
        }
    }
}

/// Which tile kernels run: chosen once per call from the instruction set the kernels module
/// detected, plus AVX512-VNNI where this CPU reports it (at run time, never at build time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) enum Kernels {
    /// The scalar reference (no SIMD kernel on this CPU; also checked against in tests).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (kquant_avx2.rs).
    Avx2,
    /// AVX2 plus AVX512F, AVX512BW, AVX512VL and AVX512-VNNI (kquant_avx512.rs).
    Avx512Vnni,
}

impl Kernels {
    /// The fastest this CPU runs, given the kernels module's instruction set.
    pub(super) fn best(isa: Option<Isa>) -> Self {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        #[cfg(target_arch = "x86_64")]
        if isa.is_some() {
            let vnni = *VNNI.get_or_init(|| {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            });
            return if vnni { Self::Avx512Vnni } else { Self::Avx2 };
        }
        let _ = (isa, &VNNI);
        Self::Scalar
    }

    /// Every variant this CPU runs (for tests).
    #[cfg(test)]
    fn available(isa: Option<Isa>) -> Vec<Self> {
        let mut v = vec![Self::Scalar];
        if isa.is_some() && cfg!(target_arch = "x86_64") {
            v.push(Self::Avx2);
        }
        if Self::best(isa) == Self::Avx512Vnni {
            v.push(Self::Avx512Vnni);
        }
        v
    }

    /// Activation rows one kernel call takes (AVX-512 has the registers for eight).
    fn rows_per_call(self) -> usize {
        if self == Self::Avx512Vnni {
            8
        } else {
            4
        }
    }
}

/// One tile (all its super-blocks) against up to `rows_per_call` activation rows:
/// `acc[i][r]`.
fn tile_rows(
    kernels: Kernels,
    kind: KQuant,
    order: Order,
    tile: &[u8],
    acts: &[&[Q8KBlock]],
) -> [[f32; 8]; 8] {
    match kernels {
        // SAFETY: `Kernels::best` picks Avx2 only where the kernels module found AVX2, FMA
        // and F16C, and Avx512Vnni only where AVX512F, VL and VNNI are reported as well.
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 => unsafe { super::kquant_avx2::tile_rows(kind, order, tile, acts) },
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512Vnni => unsafe { super::kquant_avx512::tile_rows(kind, order, tile, acts) },
        _ => {
            let mut out = [[0f32; 8]; 8];
            for (o, act) in out.iter_mut().zip(acts) {
                *o = tile_scalar(kind, order, tile, act);
            }
            out
        }
    }
}

/// Two consecutive tiles against up to eight activation rows, where the kernels take them
/// together (`kquant_avx512::tile_pair_rows`, in the per-sub-block order): `out[i][r]`, r
/// counting the first tile's rows then the second's; None elsewhere.
#[allow(unused_variables)]
fn tile_pair_rows(
    kernels: Kernels,
    kind: KQuant,
    order: Order,
    ta: &[u8],
    tb: &[u8],
    acts: &[&[Q8KBlock]],
) -> Option<[[f32; 16]; 8]> {
    match (kernels, order) {
        // SAFETY: `Kernels::best` picks Avx512Vnni only where AVX2, FMA, F16C, AVX512F, BW,
        // VL and VNNI are reported; both tiles hold the activation rows' super-blocks.
        #[cfg(target_arch = "x86_64")]
        (Kernels::Avx512Vnni, Order::SubBlocks) => {
            Some(unsafe { super::kquant_avx512::tile_pair_rows(kind, ta, tb, acts) })
        }
        _ => None,
    }
}

/// Several K-quant matrices of one kind and width, each on its own rows, in one parallel
/// region on candle's barrier pool (as `super::matmul_jobs` does for the legacy types).
pub(super) fn matmul_jobs(kernels: Kernels, kind: KQuant, jobs: &[Job]) -> Vec<Vec<f32>> {
    let Some(first) = jobs.first() else {
        return Vec::new();
    };
    let k = first.w.k;
    let (kb, tb) = (k / QK_K, kind.tile_bytes());
    let (acts, which) = super::quantize_inputs(jobs, k, kb, quantize_activations);
    let ms: Vec<usize> = jobs.iter().map(|j| j.x.len() / k).collect();
    let mut ys: Vec<Vec<f32>> = jobs
        .iter()
        .zip(&ms)
        .map(|(j, &m)| vec![0f32; m * j.w.n])
        .collect();
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    // Work items are tiles, numbered across the jobs.
    let starts: Vec<usize> = jobs
        .iter()
        .scan(0, |acc, j| {
            let s = *acc;
            *acc += j.w.n.div_ceil(TILE);
            Some(s)
        })
        .collect();
    let total: usize = jobs.iter().map(|j| j.w.n.div_ceil(TILE)).sum();
    // Prefill: a block of tiles (about 256 KiB of weights) is swept over every activation
    // row, four or eight rows at a time, so the rows are read once per block rather than once per
    // tile and the block stays in cache; decode is the same loop with one row.
    let block = (256 << 10) / (kb * tb).max(1);
    candle_core::utils::barrier_pool().execute_chunked(total, |tiles| {
        let mut g = tiles.start;
        while g < tiles.end {
            let t = starts.partition_point(|&s| s <= g) - 1;
            let (w, out, m, acts) = (jobs[t].w, outs[t], ms[t], &acts[which[t]]);
            let n = w.n;
            let first = g - starts[t];
            let last = (first + block.max(1))
                .min(n.div_ceil(TILE))
                .min(tiles.end - starts[t]);
            let order = Order::of(kind, m);
            let step = kernels.rows_per_call();
            for i0 in (0..m).step_by(step) {
                let mt = step.min(m - i0);
                let rows_x: [&[Q8KBlock]; 8] =
                    std::array::from_fn(|i| &acts[(i0 + i.min(mt - 1)) * kb..][..kb]);
                let tile = |ti: usize| &w.data()[ti * kb * tb..(ti + 1) * kb * tb];
                // SAFETY: element (i0 + di, j) of job t's output, for the rows j of tiles
                // first..last, belongs to this task; each output holds m · n values.
                let put =
                    |di: usize, j: usize, v: f32| unsafe { *out.0.add((i0 + di) * n + j) = v };
                let mut ti = first;
                while ti < last {
                    if ti + 1 < last {
                        let pair = tile_pair_rows(
                            kernels,
                            kind,
                            order,
                            tile(ti),
                            tile(ti + 1),
                            &rows_x[..mt],
                        );
                        if let Some(v) = pair {
                            let rows = (2 * TILE).min(n - ti * TILE);
                            for (di, v) in v.iter().enumerate().take(mt) {
                                for (r, &v) in v.iter().enumerate().take(rows) {
                                    put(di, ti * TILE + r, v);
                                }
                            }
                            ti += 2;
                            continue;
                        }
                    }
                    let rows = TILE.min(n - ti * TILE);
                    let v = tile_rows(kernels, kind, order, tile(ti), &rows_x[..mt]);
                    for (di, v) in v.iter().enumerate().take(mt) {
                        for (r, &v) in v.iter().enumerate().take(rows) {
                            put(di, ti * TILE + r, v);
                        }
                    }
                    ti += 1;
                }
            }
            g = starts[t] + last;
        }
    });
    ys
}

#[cfg(test)]
mod tests {
    use super::super::{isa, Kind, Packed};
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use crate::engine::kernels::test_values as random;

    /// The word-wise repack writes the same bytes as the weight-by-weight one it replaced,
    /// for every K-quant on arbitrary bytes (every bit of every field lands somewhere
    /// checked), in whole tiles and with a padded last tile, into a buffer that held
    /// garbage before (padding rows come out zero).
    #[test]
    fn word_wise_pack_equals_the_byte_by_byte_pack() {
        for kind in [KQuant::Q4K, KQuant::Q5K, KQuant::Q6K] {
            for (n, k) in [(16, 512), (13, 256), (1, 768), (8, 256)] {
                let len = n * (k / QK_K) * kind.block_bytes();
                let raw: Vec<u8> = random(len, n as u64 * 31 + k as u64)
                    .iter()
                    .map(|v| (v.to_bits() >> 7) as u8)
                    .collect();
                let want = pack_reference(kind, &raw, n, k);
                assert_eq!(pack(kind, &raw, n, k), want, "{kind:?} n={n} k={k}");
                let mut out = vec![0xA5u8; packed_len(kind, n, k)];
                pack_into(kind, &raw, n, k, &mut out);
                assert_eq!(out, want, "{kind:?} n={n} k={k} into a used buffer");
            }
        }
    }

    /// Every K-quant against candle's own matmul on random blocks, in decode and prefill
    /// shapes (m = 33 takes candle's AMX route where the CPU has one), with row counts that
    /// fill whole tiles and that leave a 4-row tail:
    /// - bit-identical where candle runs its x86 tiles (Q4_K, and Q6_K for m > 1, when n is
    ///   a multiple of 16) and for Q6_K decode (m = 1, candle's vec_dot order replayed): the
    ///   same float updates in the same order;
    /// - elsewhere (candle's vec_dot kernels: 8 lanes per super-block, summed at the end)
    ///   within 1e-5 of Σ|w·x|: the same products, added in another order;
    /// - always bit-identical to the scalar reference of the kernels' order, for every
    ///   instruction set this CPU runs and for the scalar route itself.
    #[test]
    fn kquant_kernels_match_candle_reference() {
        let Some(isa) = isa() else {
            eprintln!("SKIPPED: no kernel instruction set on this CPU; candle's kernels run");
            return;
        };
        let dev = Device::Cpu;
        let k = 512;
        let (mut exact_cases, mut reordered_cases) = (0, 0);
        for n in [48, 52, 12] {
            for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
                let Some(kind) = Kind::from_dtype(dtype) else {
                    eprintln!("SKIPPED: {dtype:?} runs on candle's kernels here");
                    continue;
                };
                let w = Tensor::from_vec(random(n * k, 1), (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let packed = Packed::new(kind, &q.data().unwrap(), n, k);
                let deq: Vec<f32> = q
                    .dequantize(&dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let reference = QMatMul::from_qtensor(q).unwrap();
                for m in [1, 2, 7, 8, 9, 33] {
                    let x = random(m * k, 2 + m as u64);
                    let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
                    let theirs: Vec<f32> = reference
                        .forward(&xt)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let job = [Job { w: &packed, x: &x }];
                    let kq = kind.kquant().unwrap();
                    let ours = matmul_jobs(Kernels::best(Some(isa)), kq, &job)
                        .pop()
                        .unwrap();
                    for kernels in Kernels::available(Some(isa)) {
                        let v = matmul_jobs(kernels, kq, &job).pop().unwrap();
                        assert_eq!(ours, v, "{dtype:?} n={n} m={m}: {kernels:?}");
                    }
                    let candle_tiles = match dtype {
                        GgmlDType::Q4K => n % 16 == 0,
                        // m = 1: both run candle's vec_dot order, whatever n.
                        GgmlDType::Q6K => n % 16 == 0 || m == 1,
                        _ => false,
                    };
                    if candle_tiles {
                        assert_eq!(ours, theirs, "{dtype:?} n={n} m={m}");
                        exact_cases += ours.len();
                        continue;
                    }
                    reordered_cases += ours.len();
                    for (idx, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                        let (i, j) = (idx / n, idx % n);
                        let scale: f32 =
                            (0..k).map(|c| (deq[j * k + c] * x[i * k + c]).abs()).sum();
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "{dtype:?} n={n} m={m} ({i},{j}): {a} vs {b}"
                        );
                    }
                }
                // Rows read back from the tiles equal candle's dequantization.
                let mut row = vec![0f32; k];
                for j in [0, 5, n - 1] {
                    packed.dequantize_row(j, &mut row);
                    assert_eq!(row, deq[j * k..(j + 1) * k], "{dtype:?} row {j}");
                }
            }
        }
        eprintln!(
            "{:?}: {exact_cases} values bit-identical to candle, {reordered_cases} in another order within tolerance",
            Kernels::available(Some(isa))
        );
    }

    /// Several jobs in one parallel region (fused Q/K/V, gate/up, MoE experts), with tile
    /// blocks that cross job boundaries and inputs shared or not, give each job's own result.
    #[test]
    fn fused_kquant_jobs_equal_single_jobs() {
        let Some(isa) = isa() else {
            eprintln!("SKIPPED: no kernel instruction set on this CPU");
            return;
        };
        let dev = Device::Cpu;
        let k = 512;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let Some(kind) = Kind::from_dtype(dtype) else {
                continue;
            };
            let kq = kind.kquant().unwrap();
            let mats: Vec<Packed> = [(1000, 11), (52, 12), (8, 13)]
                .iter()
                .map(|&(n, seed)| {
                    let w = Tensor::from_vec(random(n * k, seed), (n, k), &dev).unwrap();
                    let q = QTensor::quantize(&w, dtype).unwrap();
                    Packed::new(kind, &q.data().unwrap(), n, k)
                })
                .collect();
            let (x1, x2) = (random(k, 21), random(9 * k, 22));
            let jobs = [
                Job {
                    w: &mats[0],
                    x: &x1,
                },
                Job {
                    w: &mats[1],
                    x: &x1,
                },
                Job {
                    w: &mats[2],
                    x: &x2,
                },
                Job {
                    w: &mats[0],
                    x: &x2,
                },
            ];
            let kernels = Kernels::best(Some(isa));
            let fused = matmul_jobs(kernels, kq, &jobs);
            for (j, y) in jobs.iter().zip(&fused) {
                let single = matmul_jobs(kernels, kq, std::slice::from_ref(j))
                    .pop()
                    .unwrap();
                assert_eq!(*y, single, "{dtype:?} n={} m={}", j.w.n, j.x.len() / k);
            }
        }
    }

    /// Activations quantize exactly as ggml's quantize_row_q8_K_ref, which llama.cpp runs for
    /// every K and IQ type on x86-64 and aarch64 alike (its repacked GEMMs'
    /// ggml_quantize_mat_q8_K_4x8 too): written out from ggml-quants.c (nearest_int: halves
    /// to even), on random blocks, a zero block and a block of exact halves.
    #[test]
    fn q8k_activations_match_ggml() {
        let mut x = random(5 * QK_K, 7);
        x[QK_K..2 * QK_K].fill(0.0);
        x[2 * QK_K + 3] = -5.0;
        // max −127: iscale 1, so these are exact halves.
        let halves = &mut x[4 * QK_K..];
        halves[..8].copy_from_slice(&[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -126.5, -127.0]);
        halves[8..].fill(3.0);
        let mut ours = vec![Q8KBlock::default(); 5];
        quantize_activations(&x, &mut ours);
        let nearest_int = |f: f32| ((f + 12582912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000;
        for (i, (b, xs)) in ours.iter().zip(x.chunks_exact(QK_K)).enumerate() {
            let (mut max, mut amax) = (0f32, 0f32);
            for &v in xs {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            let iscale = if amax == 0.0 { 0.0 } else { -127.0 / max };
            let qs: Vec<i8> = xs
                .iter()
                .map(|&v| nearest_int(iscale * v).min(127) as i8)
                .collect();
            let d = if amax == 0.0 { 0.0 } else { 1.0 / iscale };
            assert_eq!(b.d.to_bits(), d.to_bits(), "block {i}: d");
            assert_eq!(b.qs[..], qs[..], "block {i}: qs");
            for (j, s) in b.bsums.iter().enumerate() {
                let sum: i32 = qs[16 * j..16 * (j + 1)].iter().map(|&q| q as i32).sum();
                assert_eq!(*s as i32, sum, "block {i}: bsums[{j}]");
            }
            for s in 0..8 {
                let pair = b.bsums[2 * s] as i32 + b.bsums[2 * s + 1] as i32;
                assert_eq!(b.dsum32[s], b.d * pair as f32);
                assert_eq!(b.sum16x32[2 * s], 32.0 * b.bsums[2 * s] as f32);
            }
        }
        assert_eq!(ours[4].qs[..8], [0, 2, 2, 0, -2, -2, -126, -127]);
    }
}
