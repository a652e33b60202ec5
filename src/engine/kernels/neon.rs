//! The legacy 32-block kernels with NEON, for aarch64 (Apple silicon, NVIDIA Grace).
//!
//! Each block's integer dot product is exact: with the dot-product extension by SDOT (as
//! candle's and llama.cpp's arm kernels do), without it by widening multiplies and pairwise
//! adds into i32. The float update per block is scalar, in candle's order:
//! - Q4_1/Q5_0/Q5_1: `sumf += sumi·d·d' [+ m·s]`, candle's generic code (it has no NEON path
//!   for them), so results are bit-identical;
//! - Q4_0/Q8_0: `sumf += sumi·(d'·d)`, the arithmetic of candle's repacked NEON gemv
//!   (neon.rs `vec_dot_4_q4_0x4_q8_0`, `vec_dot_4_q8_0x4_q8_0`), which candle takes in decode
//!   when the row count is a multiple of 4 (every real model's matrices): bit-identical there.
//!   For other row counts candle falls back to `vec_dot_q4_0_q8_0`, which keeps four float
//!   lanes per row and sums them at the end, and in prefill it runs tiled kernels: the same
//!   products added in another order, so results there differ by float rounding only (the
//!   reference test states the tolerance; under qemu 5562 of 8424 such values were equal).

use super::{Kind, Q8Block};
use half::f16;
use std::arch::aarch64::*;

/// SDOT twice into one accumulator: lane i += Σ of bytes 4i..4i+3 of a0·b0 and a1·b1.
/// Written in assembly as candle does: the intrinsic is not stable in Rust yet.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot2(a0: int8x16_t, b0: int8x16_t, a1: int8x16_t, b1: int8x16_t) -> int32x4_t {
    let mut acc: int32x4_t = vdupq_n_s32(0);
    std::arch::asm!(
        "sdot {acc:v}.4s, {a0:v}.16b, {b0:v}.16b",
        "sdot {acc:v}.4s, {a1:v}.16b, {b1:v}.16b",
        acc = inout(vreg) acc,
        a0 = in(vreg) a0,
        b0 = in(vreg) b0,
        a1 = in(vreg) a1,
        b1 = in(vreg) b1,
        options(pure, nomem, nostack),
    );
    acc
}

/// The same sums without SDOT: i8·i8 products widened to i16, pairs added into i32.
#[inline(always)]
unsafe fn mul_sum(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    vaddq_s32(
        vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b))),
        vpaddlq_s16(vmull_high_s8(a, b)),
    )
}

/// A block's 32 weights as two signed byte vectors (weights 0..15 and 16..31), given its
/// quants `q` and high bits `h`: signed for Q4_0, Q8_0, IQ4_NL and MXFP4, unsigned (< 32) for the others
/// (Q5_0's −16 is folded into the float update).
#[inline(always)]
unsafe fn weights(kind: Kind, q: *const u8, h: *const u8) -> (int8x16_t, int8x16_t) {
    if kind == Kind::Q8_0 {
        return (vld1q_s8(q as *const i8), vld1q_s8(q.add(16) as *const i8));
    }
    let v = vld1q_u8(q);
    let (mut lo, mut hi) = (vandq_u8(v, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(v));
    if let Some(t) = kind.table() {
        // IQ4_NL / MXFP4: the nibbles index the type's 16 values (one tbl each half).
        let t = vld1q_s8(t.as_ptr());
        return (vqtbl1q_s8(t, lo), vqtbl1q_s8(t, hi));
    }
    if kind == Kind::Q4_0 {
        lo = vsubq_u8(lo, vdupq_n_u8(8));
        hi = vsubq_u8(hi, vdupq_n_u8(8));
    }
    if kind.has_high_bits() {
        // Bit j of the little-endian word at h is weight j's fifth bit.
        let bits = (h as *const u32).read_unaligned();
        let sel = vld1q_u8([1u8, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128].as_ptr());
        let fifth = |b0: u32, b1: u32| {
            let spread = vcombine_u8(vdup_n_u8(b0 as u8), vdup_n_u8(b1 as u8));
            vandq_u8(vtstq_u8(spread, sel), vdupq_n_u8(0x10))
        };
        lo = vorrq_u8(lo, fifth(bits, bits >> 8));
        hi = vorrq_u8(hi, fifth(bits >> 16, bits >> 24));
    }
    (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
}

/// Exact Σ w·y of one block.
#[inline(always)]
unsafe fn block_sum<const SDOT: bool>(kind: Kind, q: *const u8, h: *const u8, a: &Q8Block) -> i32 {
    let (wl, wh) = weights(kind, q, h);
    let (yl, yh) = (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16)));
    let lanes = if SDOT {
        sdot2(wl, yl, wh, yh)
    } else {
        vaddq_s32(mul_sum(wl, yl), mul_sum(wh, yh))
    };
    vaddvq_s32(lanes)
}

#[inline(always)]
unsafe fn half(p: *const u8) -> f32 {
    f16::from_bits((p as *const u16).read_unaligned()).to_f32()
}

/// candle's per-block float update (see the module comment).
#[inline(always)]
fn update(kind: Kind, sumf: f32, sumi: i32, d: f32, m: f32, a: &Q8Block) -> f32 {
    match kind {
        Kind::Q4_0 | Kind::Q8_0 | Kind::Iq4Nl | Kind::Mxfp4 => sumf + sumi as f32 * (a.d * d),
        // Σ (q − 16)·y = Σ q·y − 16·Σ y, exactly.
        Kind::Q5_0 => sumf + (sumi - 16 * a.isum) as f32 * d * a.d,
        Kind::Q4_1 | Kind::Q5_1 => sumf + (sumi as f32 * d * a.d + m * a.s),
        Kind::Q4K | Kind::Q5K | Kind::Q6K => unreachable!("K-quants are candle's on aarch64"),
    }
}

#[inline(always)]
unsafe fn dot4_impl<const SDOT: bool>(kind: Kind, group: &[u8], act: &[Q8Block]) -> [f32; 4] {
    let gb = 4 * kind.block_bytes();
    debug_assert!(group.len() >= act.len() * gb);
    let (om, oh, oq) = kind.packed_offsets();
    let qn = kind.qs_bytes();
    let mut sumf = [0f32; 4];
    for (b, a) in act.iter().enumerate() {
        let p = group.as_ptr().add(b * gb);
        for (r, s) in sumf.iter_mut().enumerate() {
            let sumi = block_sum::<SDOT>(kind, p.add(oq + r * qn), p.add(oh + 4 * r), a);
            let m = if kind.has_min() {
                half(p.add(om + 2 * r))
            } else {
                0.0
            };
            let d = kind.scale(std::slice::from_raw_parts(
                p.add(kind.scale_bytes() * r),
                kind.scale_bytes(),
            ));
            *s = update(kind, *s, sumi, d, m, a);
        }
    }
    sumf
}

#[inline(always)]
unsafe fn dot_row_impl<const SDOT: bool>(kind: Kind, row: &[u8], act: &[Q8Block]) -> f32 {
    let bb = kind.block_bytes();
    debug_assert!(row.len() >= act.len() * bb);
    let (bm, bh, bq) = kind.block_offsets();
    let mut sumf = 0f32;
    for (b, a) in act.iter().enumerate() {
        let p = row.as_ptr().add(b * bb);
        let sumi = block_sum::<SDOT>(kind, p.add(bq), p.add(bh), a);
        let m = if kind.has_min() { half(p.add(bm)) } else { 0.0 };
        let d = kind.scale(std::slice::from_raw_parts(p, kind.scale_bytes()));
        sumf = update(kind, sumf, sumi, d, m, a);
    }
    sumf
}

/// Four rows of a packed group against one row of activations, with SDOT.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn dot4_sdot(kind: Kind, group: &[u8], act: &[Q8Block]) -> [f32; 4] {
    dot4_impl::<true>(kind, group, act)
}

/// Four rows of a packed group against one row of activations, plain NEON.
#[target_feature(enable = "neon")]
pub unsafe fn dot4(kind: Kind, group: &[u8], act: &[Q8Block]) -> [f32; 4] {
    dot4_impl::<false>(kind, group, act)
}

/// One row in ggml's layout (the tail of a matrix), with SDOT.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn dot_row_sdot(kind: Kind, row: &[u8], act: &[Q8Block]) -> f32 {
    dot_row_impl::<true>(kind, row, act)
}

/// One row in ggml's layout (the tail of a matrix), plain NEON.
#[target_feature(enable = "neon")]
pub unsafe fn dot_row(kind: Kind, row: &[u8], act: &[Q8Block]) -> f32 {
    dot_row_impl::<false>(kind, row, act)
}
