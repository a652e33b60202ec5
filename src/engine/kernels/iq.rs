//! The IQ types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS) and
//! MXFP4: block layouts as ggml-common.h defines them, dequantization as ggml-quants.c does it,
//! and matrix × activations against the activation blocks ggml pairs them with (block_q8_K
//! for the 256-weight types, block_q8_0 for IQ4_NL and MXFP4).
//!
//! Written here because candle 0.11 has none of these types. Weights stay in ggml's layout
//! (no repacking): the grids are looked up per group of 8 (or 4) weights, which a repacked
//! layout would not make cheaper. The scalar kernels follow ggml's generic C (integer sums per
//! block, one float update per block or sub-block); iq_avx2.rs holds the AVX2 ones.
//!
//! The q8_K activations are the K-quants' (kquant.rs), as llama.cpp uses one
//! quantize_row_q8_K for every K and IQ type: ggml's quantize_row_q8_K_ref, halves to even.

use super::iq_tables::*;
pub(super) use super::kquant::{Q8KBlock, QK_K};
use super::{kquant, mxfp4, quantize_activations, Isa, Out, Q8Block, QK};
use half::f16;

/// A weight type with no candle support, read from its ggml type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IqType {
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    Iq1M,
    Mxfp4,
}

impl IqType {
    pub const ALL: [IqType; 10] = [
        Self::Iq2Xxs,
        Self::Iq2Xs,
        Self::Iq3Xxs,
        Self::Iq1S,
        Self::Iq4Nl,
        Self::Iq3S,
        Self::Iq2S,
        Self::Iq4Xs,
        Self::Iq1M,
        Self::Mxfp4,
    ];

    /// ggml's type id (enum ggml_type).
    pub fn ggml_id(self) -> u32 {
        match self {
            Self::Iq2Xxs => 16,
            Self::Iq2Xs => 17,
            Self::Iq3Xxs => 18,
            Self::Iq1S => 19,
            Self::Iq4Nl => 20,
            Self::Iq3S => 21,
            Self::Iq2S => 22,
            Self::Iq4Xs => 23,
            Self::Iq1M => 29,
            Self::Mxfp4 => 39,
        }
    }

    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Iq2Xxs => "IQ2_XXS",
            Self::Iq2Xs => "IQ2_XS",
            Self::Iq3Xxs => "IQ3_XXS",
            Self::Iq1S => "IQ1_S",
            Self::Iq4Nl => "IQ4_NL",
            Self::Iq3S => "IQ3_S",
            Self::Iq2S => "IQ2_S",
            Self::Iq4Xs => "IQ4_XS",
            Self::Iq1M => "IQ1_M",
            Self::Mxfp4 => "MXFP4",
        }
    }

    /// Weights per block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::Iq4Nl | Self::Mxfp4 => QK,
            _ => QK_K,
        }
    }

    /// Bytes per block (sizeof(block_*) in ggml-common.h).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Iq2Xxs => 2 + QK_K / 4,            // d, qs[QK_K/8] u16
            Self::Iq2Xs => 2 + QK_K / 4 + QK_K / 32, // d, qs u16, scales
            Self::Iq2S => 2 + QK_K / 4 + QK_K / 16,  // d, qs (grid + signs), qh, scales
            Self::Iq3Xxs => 2 + 3 * QK_K / 8,        // d, qs (grid + scales and signs)
            Self::Iq3S => 2 + QK_K / 4 + QK_K / 32 + QK_K / 8 + QK_K / 64, // d, qs, qh, signs, scales
            Self::Iq1S => 2 + QK_K / 8 + QK_K / 16,                        // d, qs, qh u16
            Self::Iq1M => QK_K / 8 + QK_K / 16 + QK_K / 32, // qs, qh, scales (d inside them)
            Self::Iq4Nl => 2 + QK / 2,                      // d, qs
            Self::Iq4Xs => 2 + 2 + QK_K / 64 + QK_K / 2,    // d, scales_h, scales_l, qs
            Self::Mxfp4 => mxfp4::BLOCK_BYTES,              // e, qs
        }
    }

    /// Whether the activations are block_q8_K (else block_q8_0).
    fn pairs_q8k(self) -> bool {
        self.block_elems() == QK_K
    }
}

fn half(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Byte j of a grid entry (weight j of its group).
fn gb(entry: u64, j: usize) -> u8 {
    (entry >> (8 * j)) as u8
}

fn sign(signs: u8, j: usize) -> f32 {
    if signs >> j & 1 == 1 {
        -1.0
    } else {
        1.0
    }
}

/// One block's weights, as ggml's dequantize_row_* computes them.
pub fn dequantize_block(ty: IqType, b: &[u8], y: &mut [f32]) {
    match ty {
        IqType::Iq2Xxs => {
            let d = half(b, 0);
            for ib in 0..8 {
                let (a0, a1) = (u32_at(b, 2 + 8 * ib), u32_at(b, 6 + 8 * ib));
                let db = d * (0.5 + (a1 >> 28) as f32) * 0.25;
                for l in 0..4 {
                    let grid = IQ2XXS_GRID[(a0 >> (8 * l)) as u8 as usize];
                    let signs = KSIGNS_IQ2XS[(a1 >> (7 * l) & 127) as usize];
                    for j in 0..8 {
                        y[32 * ib + 8 * l + j] = db * gb(grid, j) as f32 * sign(signs, j);
                    }
                }
            }
        }
        IqType::Iq2Xs => {
            let d = half(b, 0);
            for ib in 0..8 {
                let sc = b[66 + ib];
                let db = [
                    d * (0.5 + (sc & 0xF) as f32) * 0.25,
                    d * (0.5 + (sc >> 4) as f32) * 0.25,
                ];
                for l in 0..4 {
                    let q = u16_at(b, 2 + 2 * (4 * ib + l));
                    let grid = IQ2XS_GRID[(q & 511) as usize];
                    let signs = KSIGNS_IQ2XS[(q >> 9) as usize];
                    for j in 0..8 {
                        y[32 * ib + 8 * l + j] = db[l / 2] * gb(grid, j) as f32 * sign(signs, j);
                    }
                }
            }
        }
        IqType::Iq2S => {
            let d = half(b, 0);
            let (qs, signs, qh, scales) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
            for ib in 0..8 {
                let sc = scales[ib];
                let db = [
                    d * (0.5 + (sc & 0xF) as f32) * 0.25,
                    d * (0.5 + (sc >> 4) as f32) * 0.25,
                ];
                for l in 0..4 {
                    let idx = qs[4 * ib + l] as usize | ((qh[ib] as usize) << (8 - 2 * l) & 0x300);
                    let grid = IQ2S_GRID[idx];
                    let s = signs[4 * ib + l];
                    for j in 0..8 {
                        y[32 * ib + 8 * l + j] = db[l / 2] * gb(grid, j) as f32 * sign(s, j);
                    }
                }
            }
        }
        IqType::Iq3Xxs => {
            let d = half(b, 0);
            let (qs, gas) = (&b[2..66], &b[66..98]);
            for ib in 0..8 {
                let aux = u32_at(gas, 4 * ib);
                let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
                for l in 0..4 {
                    let signs = KSIGNS_IQ2XS[(aux >> (7 * l) & 127) as usize];
                    let g1 = IQ3XXS_GRID[qs[8 * ib + 2 * l] as usize] as u64;
                    let g2 = IQ3XXS_GRID[qs[8 * ib + 2 * l + 1] as usize] as u64;
                    let o = 32 * ib + 8 * l;
                    for j in 0..4 {
                        y[o + j] = db * gb(g1, j) as f32 * sign(signs, j);
                        y[o + j + 4] = db * gb(g2, j) as f32 * sign(signs, j + 4);
                    }
                }
            }
        }
        IqType::Iq3S => {
            let d = half(b, 0);
            let (qs, qh, signs, scales) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
            for ib in 0..8 {
                let sc = scales[ib / 2] >> (4 * (ib % 2)) & 0xF;
                let db = d * (1 + 2 * sc as i32) as f32;
                let (q, s, h) = (&qs[8 * ib..], &signs[4 * ib..], qh[ib] as usize);
                for l in 0..4 {
                    let g1 = IQ3S_GRID[q[2 * l] as usize | (h << (8 - 2 * l) & 256)] as u64;
                    let g2 = IQ3S_GRID[q[2 * l + 1] as usize | (h << (7 - 2 * l) & 256)] as u64;
                    let o = 32 * ib + 8 * l;
                    for j in 0..4 {
                        y[o + j] = db * gb(g1, j) as f32 * sign(s[l], j);
                        y[o + j + 4] = db * gb(g2, j) as f32 * sign(s[l], j + 4);
                    }
                }
            }
        }
        IqType::Iq1S => {
            let d = half(b, 0);
            let (qs, qh) = (&b[2..34], &b[34..50]);
            for ib in 0..8 {
                let h = u16_at(qh, 2 * ib) as usize;
                let dl = d * (2 * (h >> 12 & 7) + 1) as f32;
                let delta = if h & 0x8000 != 0 {
                    -IQ1S_DELTA
                } else {
                    IQ1S_DELTA
                };
                for l in 0..4 {
                    let grid = IQ1S_GRID[qs[4 * ib + l] as usize | (h >> (3 * l) & 7) << 8];
                    for j in 0..8 {
                        y[32 * ib + 8 * l + j] = dl * (gb(grid, j) as i8 as f32 + delta);
                    }
                }
            }
        }
        IqType::Iq1M => {
            let (qs, qh) = (&b[0..32], &b[32..48]);
            let sc: [u16; 4] = std::array::from_fn(|i| u16_at(b, 48 + 2 * i));
            let d = f16::from_bits(iq1m_scale(&sc)).to_f32();
            for ib in 0..8 {
                let s = sc[ib / 2] >> (6 * (ib % 2));
                let dl = [
                    d * (2 * (s & 7) + 1) as f32,
                    d * (2 * (s >> 3 & 7) + 1) as f32,
                ];
                let (h0, h1) = (qh[2 * ib] as usize, qh[2 * ib + 1] as usize);
                let idx = [
                    qs[4 * ib] as usize | (h0 << 8 & 0x700),
                    qs[4 * ib + 1] as usize | (h0 << 4 & 0x700),
                    qs[4 * ib + 2] as usize | (h1 << 8 & 0x700),
                    qs[4 * ib + 3] as usize | (h1 << 4 & 0x700),
                ];
                let delta = [h0 & 0x08, h0 & 0x80, h1 & 0x08, h1 & 0x80].map(|m| {
                    if m != 0 {
                        -IQ1M_DELTA
                    } else {
                        IQ1M_DELTA
                    }
                });
                for l in 0..4 {
                    let grid = IQ1S_GRID[idx[l]];
                    for j in 0..8 {
                        y[32 * ib + 8 * l + j] = dl[l / 2] * (gb(grid, j) as i8 as f32 + delta[l]);
                    }
                }
            }
        }
        IqType::Iq4Nl => {
            let d = half(b, 0);
            for j in 0..16 {
                y[j] = d * KVALUES_IQ4NL[(b[2 + j] & 0xF) as usize] as f32;
                y[j + 16] = d * KVALUES_IQ4NL[(b[2 + j] >> 4) as usize] as f32;
            }
        }
        IqType::Iq4Xs => {
            let d = half(b, 0);
            let h = u16_at(b, 2) as i32;
            for ib in 0..8 {
                let ls = (b[4 + ib / 2] as i32 >> (4 * (ib % 2)) & 0xF) | (h >> (2 * ib) & 3) << 4;
                let dl = d * (ls - 32) as f32;
                let qs = &b[8 + 16 * ib..8 + 16 * (ib + 1)];
                for j in 0..16 {
                    y[32 * ib + j] = dl * KVALUES_IQ4NL[(qs[j] & 0xF) as usize] as f32;
                    y[32 * ib + j + 16] = dl * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
                }
            }
        }
        IqType::Mxfp4 => mxfp4::dequantize_block(b, y),
    }
}

/// IQ1_M's f16 super-block scale, spread over the top 4 bits of its four scale words.
pub(super) fn iq1m_scale(sc: &[u16; 4]) -> u16 {
    (sc[0] >> 12) | (sc[1] >> 8 & 0x00F0) | (sc[2] >> 4 & 0x0F00) | (sc[3] & 0xF000)
}

/// One row of weights (whole blocks) as floats.
pub fn dequantize_row(ty: IqType, row: &[u8], out: &mut [f32]) {
    let (bb, be) = (ty.block_bytes(), ty.block_elems());
    for (b, y) in row.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        dequantize_block(ty, b, y);
    }
}

/// Σ q8[j] · grid[j] · ±1 over a group of 8, with the sign bits of `signs`.
fn signed8(grid: u64, signs: u8, q8: &[i8]) -> i32 {
    (0..8)
        .map(|j| {
            let v = gb(grid, j) as i32 * q8[j] as i32;
            if signs >> j & 1 == 1 {
                -v
            } else {
                v
            }
        })
        .sum()
}

/// One row of a 256-weight type against q8_K activations: ggml's generic
/// ggml_vec_dot_*_q8_K arithmetic (an exact integer sum per super-block, then one float
/// update).
pub fn dot_row_q8k(ty: IqType, row: &[u8], act: &[Q8KBlock]) -> f32 {
    let bb = ty.block_bytes();
    let mut sumf = 0f32;
    for (b, a) in row.chunks_exact(bb).zip(act) {
        let q8 = &a.qs;
        match ty {
            IqType::Iq2Xxs => {
                let mut bsum = 0i32;
                for ib in 0..8 {
                    let (a0, a1) = (u32_at(b, 2 + 8 * ib), u32_at(b, 6 + 8 * ib));
                    let mut sumi = 0;
                    for l in 0..4 {
                        let grid = IQ2XXS_GRID[(a0 >> (8 * l)) as u8 as usize];
                        let signs = KSIGNS_IQ2XS[(a1 >> (7 * l) & 127) as usize];
                        sumi += signed8(grid, signs, &q8[32 * ib + 8 * l..]);
                    }
                    bsum += sumi * (2 * (a1 >> 28) as i32 + 1);
                }
                sumf += half(b, 0) * a.d * bsum as f32 * 0.125;
            }
            IqType::Iq2Xs => {
                let mut bsum = 0i32;
                for ib in 0..8 {
                    let sc = b[66 + ib] as i32;
                    let mut s = [0i32; 2];
                    for l in 0..4 {
                        let q = u16_at(b, 2 + 2 * (4 * ib + l));
                        let grid = IQ2XS_GRID[(q & 511) as usize];
                        let signs = KSIGNS_IQ2XS[(q >> 9) as usize];
                        s[l / 2] += signed8(grid, signs, &q8[32 * ib + 8 * l..]);
                    }
                    bsum += s[0] * (2 * (sc & 0xF) + 1) + s[1] * (2 * (sc >> 4) + 1);
                }
                sumf += half(b, 0) * a.d * bsum as f32 * 0.125;
            }
            IqType::Iq2S => {
                let (qs, signs, qh, scales) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
                let mut bsum = 0i32;
                for ib in 0..8 {
                    let sc = scales[ib] as i32;
                    let mut s = [0i32; 2];
                    for l in 0..4 {
                        let idx =
                            qs[4 * ib + l] as usize | ((qh[ib] as usize) << (8 - 2 * l) & 0x300);
                        s[l / 2] +=
                            signed8(IQ2S_GRID[idx], signs[4 * ib + l], &q8[32 * ib + 8 * l..]);
                    }
                    bsum += s[0] * (2 * (sc & 0xF) + 1) + s[1] * (2 * (sc >> 4) + 1);
                }
                sumf += half(b, 0) * a.d * bsum as f32 * 0.125;
            }
            IqType::Iq3Xxs => {
                let (qs, gas) = (&b[2..66], &b[66..98]);
                let mut bsum = 0i32;
                for ib in 0..8 {
                    let aux = u32_at(gas, 4 * ib);
                    let mut sumi = 0;
                    for l in 0..4 {
                        let signs = KSIGNS_IQ2XS[(aux >> (7 * l) & 127) as usize];
                        let g = IQ3XXS_GRID[qs[8 * ib + 2 * l] as usize] as u64
                            | (IQ3XXS_GRID[qs[8 * ib + 2 * l + 1] as usize] as u64) << 32;
                        sumi += signed8(g, signs, &q8[32 * ib + 8 * l..]);
                    }
                    bsum += sumi * (2 * (aux >> 28) as i32 + 1);
                }
                sumf += half(b, 0) * a.d * bsum as f32 * 0.25;
            }
            IqType::Iq3S => {
                let (qs, qh, signs, scales) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
                let mut bsum = 0i32;
                for ib in 0..8 {
                    let ls = 2 * (scales[ib / 2] >> (4 * (ib % 2)) & 0xF) as i32 + 1;
                    let (q, s, h) = (&qs[8 * ib..], &signs[4 * ib..], qh[ib] as usize);
                    let mut sumi = 0;
                    for l in 0..4 {
                        let g1 = IQ3S_GRID[q[2 * l] as usize | (h << (8 - 2 * l) & 256)] as u64;
                        let g2 = IQ3S_GRID[q[2 * l + 1] as usize | (h << (7 - 2 * l) & 256)];
                        sumi += signed8(g1 | (g2 as u64) << 32, s[l], &q8[32 * ib + 8 * l..]);
                    }
                    bsum += sumi * ls;
                }
                sumf += half(b, 0) * a.d * bsum as f32;
            }
            IqType::Iq1S => {
                let (qs, qh) = (&b[2..34], &b[34..50]);
                let (mut sumi, mut sumi1) = (0i32, 0i32);
                for ib in 0..8 {
                    let h = u16_at(qh, 2 * ib) as usize;
                    let ls = 2 * (h >> 12 & 7) as i32 + 1;
                    let delta = if h & 0x8000 != 0 { -1 } else { 1 };
                    let mut lsum = 0i32;
                    for l in 0..4 {
                        let grid = IQ1S_GRID[qs[4 * ib + l] as usize | (h >> (3 * l) & 7) << 8];
                        for j in 0..8 {
                            lsum += q8[32 * ib + 8 * l + j] as i32 * gb(grid, j) as i8 as i32;
                        }
                    }
                    sumi += ls * lsum;
                    sumi1 += ls * delta * (a.bsums[2 * ib] as i32 + a.bsums[2 * ib + 1] as i32);
                }
                sumf += half(b, 0) * a.d * (sumi as f32 + IQ1S_DELTA * sumi1 as f32);
            }
            IqType::Iq1M => {
                let (qs, qh) = (&b[0..32], &b[32..48]);
                let sc: [u16; 4] = std::array::from_fn(|i| u16_at(b, 48 + 2 * i));
                let d = f16::from_bits(iq1m_scale(&sc)).to_f32();
                let (mut sumi1, mut sumi2) = (0i32, 0i32);
                for ib in 0..8 {
                    let (h0, h1) = (qh[2 * ib] as usize, qh[2 * ib + 1] as usize);
                    let idx = [
                        qs[4 * ib] as usize | (h0 << 8 & 0x700),
                        qs[4 * ib + 1] as usize | (h0 << 4 & 0x700),
                        qs[4 * ib + 2] as usize | (h1 << 8 & 0x700),
                        qs[4 * ib + 3] as usize | (h1 << 4 & 0x700),
                    ];
                    let delta = [h0 & 0x08, h0 & 0x80, h1 & 0x08, h1 & 0x80]
                        .map(|m| 1 - 2 * (m != 0) as i32);
                    let (mut s1, mut s2) = ([0i32; 2], [0i32; 2]);
                    for l in 0..4 {
                        let grid = IQ1S_GRID[idx[l]];
                        let (mut l1, mut l2) = (0i32, 0i32);
                        for j in 0..8 {
                            let q = q8[32 * ib + 8 * l + j] as i32;
                            l1 += q * gb(grid, j) as i8 as i32;
                            l2 += q;
                        }
                        s1[l / 2] += l1;
                        s2[l / 2] += l2 * delta[l];
                    }
                    let s = sc[ib / 2] >> (6 * (ib % 2));
                    let (ls1, ls2) = (2 * (s & 7) as i32 + 1, 2 * (s >> 3 & 7) as i32 + 1);
                    sumi1 += s1[0] * ls1 + s1[1] * ls2;
                    sumi2 += s2[0] * ls1 + s2[1] * ls2;
                }
                sumf += d * a.d * (sumi1 as f32 + IQ1M_DELTA * sumi2 as f32);
            }
            IqType::Iq4Xs => {
                let h = u16_at(b, 2) as i32;
                let mut bsum = 0i32;
                for ib in 0..8 {
                    let ls =
                        (b[4 + ib / 2] as i32 >> (4 * (ib % 2)) & 0xF) | (h >> (2 * ib) & 3) << 4;
                    let qs = &b[8 + 16 * ib..];
                    let y = &q8[32 * ib..];
                    let mut sumi = 0i32;
                    for j in 0..16 {
                        sumi += y[j] as i32 * KVALUES_IQ4NL[(qs[j] & 0xF) as usize] as i32;
                        sumi += y[j + 16] as i32 * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as i32;
                    }
                    bsum += sumi * (ls - 32);
                }
                sumf += half(b, 0) * a.d * bsum as f32;
            }
            IqType::Iq4Nl | IqType::Mxfp4 => unreachable!("{ty:?} pairs with q8_0"),
        }
    }
    sumf
}

/// One IQ4_NL row against q8_0 activations (ggml_vec_dot_iq4_nl_q8_0's arithmetic).
pub fn dot_row_iq4nl(row: &[u8], act: &[Q8Block]) -> f32 {
    let mut sumf = 0f32;
    for (b, a) in row.chunks_exact(IqType::Iq4Nl.block_bytes()).zip(act) {
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += a.qs[j] as i32 * KVALUES_IQ4NL[(b[2 + j] & 0xF) as usize] as i32;
            sumi += a.qs[j + 16] as i32 * KVALUES_IQ4NL[(b[2 + j] >> 4) as usize] as i32;
        }
        sumf += a.d * half(b, 0) * sumi as f32;
    }
    sumf
}

/// A weight matrix of n rows × k in one of these types, in ggml's layout.
#[derive(Debug)]
pub struct IqMatrix {
    pub ty: IqType,
    pub n: usize,
    pub k: usize,
    data: Vec<u8>,
}

impl IqMatrix {
    /// n rows of k weights in ggml's block layout; an error names what does not fit.
    pub fn new(ty: IqType, data: Vec<u8>, n: usize, k: usize) -> Result<Self, String> {
        Self::check(ty, data.len(), n, k)?;
        Ok(Self { ty, n, k, data })
    }

    /// Whether `bytes` hold n rows of k weights of `ty`, in whole blocks.
    pub fn check(ty: IqType, bytes: usize, n: usize, k: usize) -> Result<(), String> {
        if !k.is_multiple_of(ty.block_elems()) {
            return Err(format!(
                "{}: rows of {k} weights are not whole blocks of {}",
                ty.name(),
                ty.block_elems()
            ));
        }
        let want = n * (k / ty.block_elems()) * ty.block_bytes();
        if bytes != want {
            return Err(format!(
                "{}: {n}×{k} weights need {want} bytes, found {bytes}",
                ty.name()
            ));
        }
        Ok(())
    }

    pub fn row_bytes(&self) -> usize {
        self.k / self.ty.block_elems() * self.ty.block_bytes()
    }

    pub fn row(&self, j: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[j * rb..(j + 1) * rb]
    }

    /// The blocks as ggml lays them out, row after row.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        dequantize_row(self.ty, self.row(j), out);
    }

    /// The whole matrix as floats (GPU builds, which have no kernel for these types).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for (j, y) in out.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row(j, y);
        }
        out
    }
}

/// Activations quantized the way a weight type pairs with.
pub(super) enum Acts {
    Q8_0(Vec<Q8Block>),
    Q8K(Vec<Q8KBlock>),
}

impl Acts {
    pub(super) fn new(ty: IqType, x: &[f32]) -> Self {
        if ty.pairs_q8k() {
            let mut a = vec![Q8KBlock::default(); x.len() / QK_K];
            kquant::quantize_activations(x, &mut a);
            Self::Q8K(a)
        } else {
            let mut a = vec![Q8Block::default(); x.len() / QK];
            quantize_activations(x, &mut a);
            Self::Q8_0(a)
        }
    }
}

/// One row against activation row i (nb blocks a row), with the best kernel this CPU runs.
#[allow(unused_variables)]
fn dot(isa: Option<Isa>, ty: IqType, row: &[u8], acts: &Acts, i: usize, nb: usize) -> f32 {
    match acts {
        // IQ4_NL and MXFP4 run on the block kernels (legacy.rs) wherever an instruction set
        // does; this is the scalar path for the others and for tests.
        Acts::Q8_0(a) => {
            let a = &a[i * nb..(i + 1) * nb];
            match ty {
                IqType::Iq4Nl => dot_row_iq4nl(row, a),
                _ => mxfp4::dot_row(row, a),
            }
        }
        Acts::Q8K(a) => {
            let a = &a[i * nb..(i + 1) * nb];
            #[cfg(target_arch = "x86_64")]
            if isa == Some(Isa::Avx512) && ty == IqType::Iq4Xs {
                // SAFETY: as above.
                return unsafe { super::iq_avx512::dot_row_iq4xs(row, a) };
            }
            #[cfg(target_arch = "x86_64")]
            if matches!(isa, Some(Isa::Avx2 | Isa::Avx512)) {
                // SAFETY: as above.
                return unsafe { super::iq_avx2::dot_row_q8k(ty, row, a) };
            }
            dot_row_q8k(ty, row, a)
        }
    }
}

/// y (m × n) = x (m × k) · Wᵀ, on candle's thread pool, rows split across the threads.
pub fn matmul(w: &IqMatrix, x: &[f32], m: usize) -> Vec<f32> {
    matmul_with(super::isa(), w, x, m)
}

pub(super) fn matmul_with(isa: Option<Isa>, w: &IqMatrix, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * w.k, "input of m rows of k");
    let nb = w.k / w.ty.block_elems();
    let acts = Acts::new(w.ty, x);
    let n = w.n;
    let mut y = vec![0f32; m * n];
    let out = &Out(y.as_mut_ptr());
    // Rows in chunks of 8 so that a thread's rows share cache lines of the output.
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(8), |chunks| {
        for c in chunks {
            for j in 8 * c..(8 * c + 8).min(n) {
                let row = w.row(j);
                for i in 0..m {
                    let v = dot(isa, w.ty, row, &acts, i, nb);
                    let o = *out;
                    // SAFETY: element (i, j) belongs to the task holding row j; y has m × n.
                    unsafe { *o.0.add(i * n + j) = v };
                }
            }
        }
    });
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of real weights and gguf-py's dequantization of them (tests/fixtures/iq/make.py:
    /// SmolLM2-135M requantized by llama.cpp's llama-quantize, an importance matrix from
    /// llama-imatrix where the type needs one).
    fn fixture(name: &str) -> (Vec<u8>, Vec<f32>) {
        let path = format!(
            "{}/tests/fixtures/iq/{name}.bin",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (bb, be) = match IqType::ALL.into_iter().find(|t| t.name() == name) {
            Some(t) => (t.block_bytes(), t.block_elems()),
            None => (if name == "Q2_K" { 84 } else { 110 }, QK_K),
        };
        let (raw, f) = bytes.split_at(2 * bb);
        assert_eq!(f.len(), 2 * be * 4, "{path}: two blocks and their weights");
        let f = f
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (raw.to_vec(), f)
    }

    use crate::engine::kernels::{test_bytes, test_values as random};

    /// Random blocks (every bit pattern of these types is a valid block) with a modest scale,
    /// so that every grid entry and sign pattern gets exercised.
    fn random_blocks(ty: IqType, n: usize, seed: u64) -> Vec<u8> {
        let mut raw = test_bytes(n * ty.block_bytes(), seed);
        for b in raw.chunks_exact_mut(ty.block_bytes()) {
            match ty {
                IqType::Mxfp4 => b[0] = 120 + b[0] % 8,
                IqType::Iq1M => {
                    // the f16 scale 0x2000 (1/128) in the top nibbles of the four scale words
                    for (i, nib) in [0u8, 0, 0, 0x20].into_iter().enumerate() {
                        b[49 + 2 * i] = b[49 + 2 * i] & 0x0F | nib;
                    }
                }
                _ => b[..2].copy_from_slice(&0x2000u16.to_le_bytes()),
            }
        }
        raw
    }

    #[test]
    fn dequantization_matches_gguf_py_on_llama_quantize_blocks() {
        for ty in IqType::ALL {
            let (raw, want) = fixture(ty.name());
            let mut got = vec![0f32; want.len()];
            dequantize_row(ty, &raw, &mut got);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs(),
                    "{} weight {i}: {a} vs gguf-py {b}",
                    ty.name()
                );
            }
            assert!(
                want.iter().any(|&v| v != 0.0),
                "{}: a real block",
                ty.name()
            );
        }
    }

    /// Q2_K and Q3_K are candle's: its dequantization agrees with gguf-py's too.
    #[test]
    fn candle_q2k_q3k_match_gguf_py() {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
        for (name, dtype) in [("Q2_K", GgmlDType::Q2K), ("Q3_K", GgmlDType::Q3K)] {
            let (raw, want) = fixture(name);
            let dev = candle_core::Device::Cpu;
            let q = qtensor_from_ggml(dtype, &raw, vec![2, QK_K], &dev).unwrap();
            let got: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs(),
                    "{name} weight {i}: {a} vs {b}"
                );
            }
        }
    }

    /// Every kernel this CPU runs against the dequantized weights times the dequantized
    /// activations (in f64): the integer sums make that exact up to float rounding. The AVX2
    /// kernels of the 256-weight types equal the scalar ones bit for bit.
    #[test]
    fn kernels_match_dequantized_reference() {
        let (n, k) = (11, 512);
        for ty in IqType::ALL {
            let nb = k / ty.block_elems();
            let raw = random_blocks(ty, n * nb, ty.ggml_id() as u64);
            let w = IqMatrix::new(ty, raw, n, k).unwrap();
            let wf = w.dequantize();
            for m in [1, 3] {
                let x = random(m * k, 7 + m as u64);
                // the activations as the kernels see them
                let xq: Vec<f64> = match Acts::new(ty, &x) {
                    Acts::Q8K(a) => a
                        .iter()
                        .flat_map(|b| b.qs.map(|q| q as f64 * b.d as f64))
                        .collect(),
                    Acts::Q8_0(a) => a
                        .iter()
                        .flat_map(|b| b.qs.map(|q| q as f64 * b.d as f64))
                        .collect(),
                };
                let scalar = matmul_with(None, &w, &x, m);
                // every instruction set this CPU runs, not only the best one
                for isa in super::super::runnable().into_iter().map(Some).chain([None]) {
                    let got = matmul_with(isa, &w, &x, m);
                    for i in 0..m {
                        for j in 0..n {
                            let (wr, xr) = (&wf[j * k..(j + 1) * k], &xq[i * k..(i + 1) * k]);
                            let want: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b).sum();
                            let scale: f64 =
                                wr.iter().zip(xr).map(|(&a, &b)| (a as f64 * b).abs()).sum();
                            let v = got[i * n + j];
                            assert!(
                                (v as f64 - want).abs() <= 1e-5 * scale + 1e-30,
                                "{} {isa:?} m={m} ({i},{j}): {v} vs {want}",
                                ty.name()
                            );
                            if ty.pairs_q8k() {
                                assert_eq!(scalar[i * n + j], v, "{} {isa:?} ({i},{j})", ty.name());
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let e = IqMatrix::new(IqType::Iq4Xs, vec![0; 136], 1, 200).unwrap_err();
        assert!(e.contains("not whole blocks of 256"), "{e}");
        let e = IqMatrix::new(IqType::Iq4Xs, vec![0; 135], 1, 256).unwrap_err();
        assert!(e.contains("need 136 bytes, found 135"), "{e}");
    }
}
