//! The legacy 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): their ggml layout and
//! tokentop's packing in groups of four rows, shared by every instruction set's kernels.
//! `Kind` and `Packed` also carry the K-quants, whose layout lives in kquant.rs, and IQ4_NL
//! and MXFP4, which are Q4_0 with a 16-entry table of values instead of `nibble − 8` (and,
//! for MXFP4, a power-of-two scale byte instead of an f16): packed like Q4_0, as llama.cpp's
//! repack.cpp packs them (block_iq4_nlx4), they run on the Q4_0 kernels with one table
//! lookup (pshufb / tbl) per 16 nibbles.

use super::iq::IqType;
use super::iq_tables::{KVALUES_IQ4NL, KVALUES_MXFP4};
use super::kquant::{self, KQuant};
use super::mxfp4::e8m0_half;
use candle_core::quantized::GgmlDType;
use half::f16;
use std::sync::Arc;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    /// IQ4_NL: an f16 scale and 32 nibbles indexing `KVALUES_IQ4NL`.
    Iq4Nl,
    /// MXFP4: an E8M0 scale byte and 32 nibbles indexing `KVALUES_MXFP4`.
    Mxfp4,
    /// K-quants (kquant.rs; x86-64 only, candle's kernels elsewhere).
    Q4K,
    Q5K,
    Q6K,
}

impl Kind {
    /// The kernel for a weight type, where one runs on this CPU.
    pub fn from_dtype(d: GgmlDType) -> Option<Self> {
        super::isa()?;
        Some(match d {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K if cfg!(target_arch = "x86_64") => Self::Q4K,
            GgmlDType::Q5K if cfg!(target_arch = "x86_64") => Self::Q5K,
            GgmlDType::Q6K if cfg!(target_arch = "x86_64") => Self::Q6K,
            _ => return None,
        })
    }

    /// The kernel for an IQ type, where one runs on this CPU: IQ4_NL and MXFP4 (the others
    /// run on kernels/iq.rs).
    pub fn from_iq(t: IqType) -> Option<Self> {
        super::isa()?;
        match t {
            IqType::Iq4Nl => Some(Self::Iq4Nl),
            IqType::Mxfp4 => Some(Self::Mxfp4),
            _ => None,
        }
    }

    /// The values a nibble indexes, for the table types.
    pub(super) fn table(self) -> Option<&'static [i8; 16]> {
        match self {
            Self::Iq4Nl => Some(&KVALUES_IQ4NL),
            Self::Mxfp4 => Some(&KVALUES_MXFP4),
            _ => None,
        }
    }

    /// Whether the kernels take the weights as signed bytes with one scale a block (Q4_0,
    /// Q8_0 and the table types), not as unsigned ones with a min or an offset.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // NEON matches the kinds
    pub(super) fn is_signed(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q8_0 | Self::Iq4Nl | Self::Mxfp4)
    }

    /// Bytes of a block's scale: an f16, or MXFP4's E8M0 byte.
    pub(super) fn scale_bytes(self) -> usize {
        if self == Self::Mxfp4 {
            1
        } else {
            2
        }
    }

    /// The scale of a block whose scale bytes start at `p[0]`.
    pub(super) fn scale(self, p: &[u8]) -> f32 {
        if self == Self::Mxfp4 {
            e8m0_half(p[0])
        } else {
            f16::from_bits(u16::from_le_bytes([p[0], p[1]])).to_f32()
        }
    }

    /// The K-quant this is, if it is one.
    pub fn kquant(self) -> Option<KQuant> {
        Some(match self {
            Self::Q4K => KQuant::Q4K,
            Self::Q5K => KQuant::Q5K,
            Self::Q6K => KQuant::Q6K,
            _ => return None,
        })
    }

    /// Weights per block: 32, or 256 for the K-quants.
    pub fn block_weights(self) -> usize {
        if self.kquant().is_some() {
            super::kquant::QK_K
        } else {
            QK
        }
    }

    /// Bytes of one block (`block_weights` weights) in ggml's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Iq4Nl => 18,
            Self::Mxfp4 => 17,
            Self::Q4K | Self::Q5K | Self::Q6K => self.kquant().expect("K").block_bytes(),
        }
    }

    pub(super) fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    pub(super) fn has_high_bits(self) -> bool {
        matches!(self, Self::Q5_0 | Self::Q5_1)
    }

    /// Bytes of quantized values per row and block (after scales and high bits).
    pub(super) fn qs_bytes(self) -> usize {
        if self == Self::Q8_0 {
            32
        } else {
            16
        }
    }

    /// Offsets inside a ggml block: (min, high bits, quants).
    pub(super) fn block_offsets(self) -> (usize, usize, usize) {
        match self {
            Self::Q4_0 => (0, 0, 2),
            Self::Q4_1 => (2, 0, 4),
            Self::Q5_0 => (0, 2, 6),
            Self::Q5_1 => (2, 4, 8),
            Self::Q8_0 => (0, 0, 2),
            Self::Iq4Nl => (0, 0, 2),
            Self::Mxfp4 => (0, 0, 1),
            Self::Q4K | Self::Q5K | Self::Q6K => unreachable!("K-quants pack in kquant.rs"),
        }
    }

    /// Offsets inside a packed 4-row block: (mins, high bits, quants); scales are at 0.
    pub(super) fn packed_offsets(self) -> (usize, usize, usize) {
        let m = 4 * self.scale_bytes();
        let h = if self.has_min() { m + 8 } else { m };
        let q = h + if self.has_high_bits() { 16 } else { 0 };
        (m, h, q)
    }
}

/// A weight matrix repacked in groups of four rows; the last n % 4 rows keep ggml's layout.
#[derive(Debug)]
pub struct Packed {
    pub kind: Kind,
    pub n: usize,
    pub k: usize,
    data: PackedBytes,
}

/// Fresh memory for packed weights, written once at load. Large buffers are anonymous maps
/// rather than heap blocks: their pages stay untouched (and unzeroed by the allocator) until
/// the repack writes them, the loader faults them in a span at a time (`prefault`: one call
/// per 2 MiB instead of one page fault per 4 KiB page; page faults were a third of a MoE
/// file's load), and they go back to the system when the model is dropped instead of staying
/// in an allocator arena. One buffer may hold several matrices (the experts of a stacked
/// tensor). Not advised as transparent huge pages: measured on this project's x86-64 VM,
/// zeroing fresh 2 MiB pages made a 756 MB MoE load almost three times slower (the host
/// backs them lazily), and the batched faults already remove most of the per-page cost.
#[derive(Debug)]
pub struct PackedBuffer(Buf);

#[derive(Debug)]
enum Buf {
    Heap(Vec<u8>),
    Anon(memmap2::MmapMut),
}

impl PackedBuffer {
    /// Below this a buffer is a heap block (a map of its own would waste most of a page).
    const MAP_FROM: usize = 2 << 20;

    /// `len` zero bytes.
    pub fn new(len: usize) -> Self {
        if len >= Self::MAP_FROM {
            if let Ok(map) = memmap2::MmapMut::map_anon(len) {
                return Self(Buf::Anon(map));
            }
        }
        Self(Buf::Heap(vec![0; len]))
    }

    /// Faults in the pages of `len` bytes at `at` in one call (MADV_POPULATE_WRITE) ahead of
    /// writing them, instead of one page fault per page.
    pub fn prefault(&self, at: usize, len: usize) {
        #[cfg(target_os = "linux")]
        if let Buf::Anon(m) = &self.0 {
            // An error (a kernel older than 5.14) leaves the pages to fault one by one.
            let _ = m.advise_range(memmap2::Advice::PopulateWrite, at, len);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (at, len);
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Buf::Heap(v) => v,
            Buf::Anon(m) => m,
        }
    }

    fn bytes(&self) -> &[u8] {
        match &self.0 {
            Buf::Heap(v) => v,
            Buf::Anon(m) => m,
        }
    }
}

/// A packed matrix's bytes: a range of a buffer it may share with other matrices.
#[derive(Debug)]
struct PackedBytes {
    buf: Arc<PackedBuffer>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for PackedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf.bytes()[self.start..self.start + self.len]
    }
}

impl Packed {
    /// Bytes n rows of k weights take packed.
    pub fn packed_len(kind: Kind, n: usize, k: usize) -> usize {
        match kind.kquant() {
            Some(kq) => kquant::packed_len(kq, n, k),
            None => n * (k / QK) * kind.block_bytes(),
        }
    }

    /// Repacks n rows of k weights given in ggml's block layout.
    pub fn new(kind: Kind, raw: &[u8], n: usize, k: usize) -> Self {
        let mut buf = PackedBuffer(Buf::Heap(vec![0; Self::packed_len(kind, n, k)]));
        Self::pack_into(kind, raw, n, k, buf.bytes_mut());
        Self::from_buffer(kind, n, k, buf, 1)
            .pop()
            .expect("one matrix")
    }

    /// `new`'s bytes, written into `out` (`packed_len` bytes). Rows packed separately in
    /// consecutive ranges (each but the last a multiple of 8 rows, so no group or tile
    /// straddles two) into consecutive ranges of `out` give the bytes of the whole.
    pub fn pack_into(kind: Kind, raw: &[u8], n: usize, k: usize, out: &mut [u8]) {
        if let Some(kq) = kind.kquant() {
            return kquant::pack_into(kq, raw, n, k, out);
        }
        assert_eq!(k % QK, 0, "rows must be whole blocks");
        let (nb, bb) = (k / QK, kind.block_bytes());
        assert_eq!(raw.len(), n * nb * bb, "matrix bytes");
        assert_eq!(out.len(), raw.len(), "packed bytes");
        let groups = n / 4;
        let mut at = 0;
        let mut put = |b: &[u8]| {
            out[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        };
        let (bm, bh, bq) = kind.block_offsets();
        let qn = kind.qs_bytes();
        for g in 0..groups {
            for b in 0..nb {
                let block = |r: usize| {
                    let at = ((g * 4 + r) * nb + b) * bb;
                    &raw[at..at + bb]
                };
                for r in 0..4 {
                    put(&block(r)[0..kind.scale_bytes()]);
                }
                if kind.has_min() {
                    for r in 0..4 {
                        put(&block(r)[bm..bm + 2]);
                    }
                }
                if kind.has_high_bits() {
                    for r in 0..4 {
                        put(&block(r)[bh..bh + 4]);
                    }
                }
                for r in 0..4 {
                    put(&block(r)[bq..bq + qn]);
                }
            }
        }
        put(&raw[groups * 4 * nb * bb..]);
    }

    /// `count` matrices of n rows of k weights packed one after another in `buf` (each
    /// `packed_len` bytes, see `pack_into`), sharing it.
    pub fn from_buffer(
        kind: Kind,
        n: usize,
        k: usize,
        buf: PackedBuffer,
        count: usize,
    ) -> Vec<Self> {
        let len = Self::packed_len(kind, n, k);
        assert_eq!(buf.bytes().len(), count * len, "buffer of {count} matrices");
        let buf = Arc::new(buf);
        (0..count)
            .map(|i| Self {
                kind,
                n,
                k,
                data: PackedBytes {
                    buf: buf.clone(),
                    start: i * len,
                    len,
                },
            })
            .collect()
    }

    /// Row j as floats, computed as candle's dequantization does (for embedding lookups
    /// from a matrix tied to the output layer, so it is stored once).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let kind = self.kind;
        if let Some(kq) = kind.kquant() {
            return kquant::dequantize_row(kq, &self.data, self.k, j, out);
        }
        let (nb, bb) = (self.k / QK, kind.block_bytes());
        let half =
            |b: &[u8], i: usize| f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
        let sb = kind.scale_bytes();
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
                (
                    kind.scale(&g[sb * r..]),
                    m,
                    h,
                    &g[oq + r * qn..oq + (r + 1) * qn],
                )
            } else {
                let (bm, bh, bq) = kind.block_offsets();
                let blk = &self.tail_row(j)[b * bb..(b + 1) * bb];
                let m = if kind.has_min() { half(blk, bm) } else { 0.0 };
                let h = if kind.has_high_bits() {
                    word(blk, bh)
                } else {
                    0
                };
                (kind.scale(blk), m, h, &blk[bq..bq + qn])
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
                        Kind::Iq4Nl | Kind::Mxfp4 => {
                            kind.table().expect("a table type")[nib as usize] as i32
                        }
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

    /// The packed bytes (K-quants: tiles of kquant.rs).
    pub(super) fn data(&self) -> &[u8] {
        &self.data
    }

    pub(super) fn group(&self, g: usize) -> &[u8] {
        let gb = 4 * (self.k / QK) * self.kind.block_bytes();
        &self.data[g * gb..(g + 1) * gb]
    }

    /// A row past the last whole group, in ggml's layout.
    pub(super) fn tail_row(&self, j: usize) -> &[u8] {
        let rb = (self.k / QK) * self.kind.block_bytes();
        let start = (self.n / 4) * 4 * rb + (j - (self.n / 4) * 4) * rb;
        &self.data[start..start + rb]
    }
}
