//! Quantized matrix × activations on the CPU for the legacy 32-weight block types (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0), with AVX2 on x86-64 and NEON (with or without the dot-product extension)
//! on aarch64.
//!
//! Written here because candle 0.11 has no SIMD path for Q4_1, Q5_0 and Q5_1 (its generic loop
//! made SmolLM2 and Gemma 3 several times slower than llama.cpp), and its per-matrix parallel
//! regions cost more than the arithmetic on small models.
//!
//! Layout: `legacy.rs` holds the block types and their packing (weights repacked at load time
//! in groups of four rows, as llama.cpp's repacking does: per block, the four rows' scales sit
//! together and the quantized bytes follow); `avx2.rs` and `neon.rs` hold one instruction set
//! each, as ggml-cpu keeps its arch folders. The instruction set is detected once, at run time,
//! in [`isa`]; nothing assumes a feature the CPU does not report (no `target-cpu`).
//!
//! Activations are quantized exactly as llama.cpp's CPU backend does on the same architecture
//! (block_q8_1 / block_q8_0: see [`quantize_activations`]), which is not quite candle's
//! arithmetic; given the same quantized activations, results equal candle's:
//! - each block's integer dot product is exact in any order;
//! - x86 (AVX2): Q4_1/Q5_0/Q5_1 apply candle's per-block float update in candle's order
//!   (`sumf += sumi·d·d' [+ m·s]`); Q4_0/Q8_0 replay candle's AVX2 kernels, which accumulate
//!   `fma(d·d', pairs, acc)` in 8 lanes and then sum the lanes;
//! - aarch64 (NEON): every type applies the per-block update; for Q4_0/Q8_0 that is
//!   `sumf += sumi·(d'·d)`, the arithmetic of candle's repacked NEON kernels (see neon.rs for
//!   where candle's own choice of kernel differs, and by how much).
//!
//! IQ4_NL and MXFP4 (no candle kernel) are packed and run the same way as Q4_0, their
//! nibbles looked up in the type's table (legacy.rs); their reference is the dequantized
//! weights (kernels/iq.rs), which the tests hold them to within float rounding.
//!
//! One exception on purpose: prefill (8 or more activation rows) of Q4_0, Q5_0 and Q8_0 with
//! AVX-512 runs 16-row wide tiles (`avx512::Wide`) that scale each block's whole integer sum
//! once, as llama.cpp's repacked GEMM does, instead of replaying candle's eight FMA lanes:
//! about twice as fast, within a few ulps of Σ|w·x| of candle (tested), and as close to
//! llama-perplexity as before (bench/perplexity.sh; see bench/RESULTS.md).

mod kquant;
mod legacy;

pub mod iq;
#[cfg(target_arch = "x86_64")]
mod iq_avx2;
#[cfg(target_arch = "x86_64")]
mod iq_avx512;
mod iq_tables;
mod mxfp4;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod kquant_avx2;
#[cfg(target_arch = "x86_64")]
mod kquant_avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

pub use legacy::{Kind, Packed, PackedBuffer, QK};

use half::f16;

/// How far ahead of the weights it is reading a kernel asks the cache for the next ones, in
/// bytes. Every kernel reads its weights as one forward stream per thread, but on the x86
/// machines measured the hardware prefetcher does not keep that stream in cache: with these
/// requests, decode of an 8B-shape Q4_0 file went from 61 to 92 t/s (the machine's read
/// bandwidth) and of SmolLM2 Q8_0 from 107 to 158 t/s; 1 KiB ahead gained a third of that,
/// 2 KiB two thirds, 4 KiB all of it (bench/RESULTS.md, 2026-11-25, third session).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 4096;

/// Asks the cache for the `bytes` that start `PREFETCH_AHEAD` past `p`, one request per
/// 64-byte line: what a kernel reading `bytes` from `p` in this step reads a few steps on.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    prefetch_range(p.wrapping_add(PREFETCH_AHEAD), bytes);
}

/// `prefetch` in a kernel taking `rows` activation rows per call: only decode (one row)
/// streams its weights; prefill sweeps a block of tiles that is already in cache.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_rows(rows: usize, p: *const u8, bytes: usize) {
    if rows == 1 {
        prefetch(p, bytes);
    }
}

/// Asks the cache for `bytes` from `p`, one request per 64-byte line. A hint only (it never
/// faults, past the end of a buffer included). x86-64 only: the ARM cores of the users'
/// machines are not measured here, and their prefetchers follow streams.
#[inline(always)]
pub fn prefetch_range(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch reads nothing the program sees and does not fault on any
            // address; the address is only computed (wrapping), never dereferenced.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
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

/// ggml-cpu's quantize_row_q8_1 as llama.cpp runs it on this architecture (and its
/// quantize_row_q8_0, which writes the same d and qs): d = amax/127 stored as f16, the values
/// multiplied by 127/amax on x86-64 (the AVX2 code in arch/x86/quants.c; its repacked GEMMs'
/// ggml_quantize_mat_q8_0_4x8 does the same) or by 1/d on aarch64 (arch/arm/quants.c) and
/// rounded half to even (`_mm256_round_ps(.., _MM_ROUND_NEAREST)`, NEON's vcvtnq), and
/// s = d·Σq with the unrounded f32 d, stored as f16.
///
/// Not candle's BlockQ8_0/BlockQ8_1::from_float (1/d and halves away from zero, s from the f16
/// d), which rounds some of the same inputs to another integer than llama.cpp does: on the
/// random-weight parity files such a flip moves log-probabilities by 1e-2 to 1 from that step
/// on (tests/deepseek2.rs, gpt_oss.rs).
pub fn quantize_activations(x: &[f32], out: &mut [Q8Block]) {
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        #[cfg(target_arch = "x86_64")]
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        #[cfg(not(target_arch = "x86_64"))]
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        round_i8(xs, id, &mut b.qs);
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(d * sum as f32).to_f32();
        b.isum = sum;
    }
}

/// `(x · scale)` rounded to the nearest integer, halves to even (as `f32::round_ties_even`,
/// ggml's nearest_int and its SIMD quantizers), saturated to i8 for each value (as `as i8`
/// casts), 32 at a time with AVX2 where the kernels run on x86-64 (bit-identical: see
/// avx2::round_i8x32).
pub(super) fn round_i8(x: &[f32], scale: f32, out: &mut [i8]) {
    debug_assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if isa().is_some() && x.len().is_multiple_of(QK) {
        for (x, out) in x.chunks_exact(QK).zip(out.chunks_exact_mut(QK)) {
            // SAFETY: isa() found AVX2 on this x86-64 CPU; both chunks hold 32 values.
            unsafe { avx2::round_i8x32(x.as_ptr(), scale, out.as_mut_ptr()) };
        }
        return;
    }
    for (q, &v) in out.iter_mut().zip(x) {
        *q = (v * scale).round_ties_even() as i8;
    }
}

/// An instruction set the block kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F, BW, VL and VNNI (vpdpbusd), besides AVX2's set.
    Avx512,
    /// aarch64 NEON with the dot-product extension (SDOT).
    NeonDot,
    /// aarch64 NEON without it (widening multiplies instead).
    Neon,
}

impl Isa {
    /// The name `TOKENTOP_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::NeonDot => "neon-dot",
            Self::Neon => "neon",
        }
    }
}

/// The instruction set the kernels use on this CPU, detected once; None where no kernel
/// runs (candle's own kernels run instead). `TOKENTOP_ISA` caps it: `avx2` keeps an AVX-512
/// CPU on the AVX2 kernels (as an AVX2-only CPU runs them), `neon` keeps a CPU with SDOT off
/// it, `none` leaves every matrix to candle; a name this CPU does not run, or no name of
/// an instruction set, changes nothing.
pub fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| capped(&runnable(), std::env::var("TOKENTOP_ISA").ok().as_deref()))
}

/// The instruction sets this CPU runs, best first, detected at run time (never from the
/// build's target features: a binary built on an AVX-512 machine runs on an AVX2-only one).
fn runnable() -> Vec<Isa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            v.push(Isa::Avx512);
        }
        v.push(Isa::Avx2);
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push(Isa::NeonDot);
        }
        v.push(Isa::Neon);
    }
    v
}

/// The best of `runnable` allowed by the cap `TOKENTOP_ISA` names.
fn capped(runnable: &[Isa], cap: Option<&str>) -> Option<Isa> {
    let cap = cap.map(|c| c.trim().to_ascii_lowercase());
    match cap.as_deref() {
        Some("none") => None,
        Some(name) => runnable
            .iter()
            .find(|i| i.name() == name)
            .or(runnable.first())
            .copied(),
        None => runnable.first().copied(),
    }
}

/// Whether the block kernels run here.
pub fn simd() -> bool {
    isa().is_some()
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
    let isa = isa().expect("Kind::from_dtype picks the block kernels only where one runs");
    matmul_many_with(isa, mats, x, m)
}

/// `matmul_many` with a given instruction set, which the caller has checked this CPU runs.
fn matmul_many_with(isa: Isa, mats: &[&Packed], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let jobs: Vec<Job> = mats.iter().map(|&w| Job { w, x }).collect();
    debug_assert!(mats.iter().all(|p| x.len() == m * p.k));
    matmul_jobs_with(isa, &jobs)
}

/// The jobs' inputs quantized `per_row` blocks to a row of `k` values, once per distinct
/// input slice (jobs sharing an input share its blocks), and which of them each job reads.
fn quantize_inputs<B: Clone + Default + Send>(
    jobs: &[Job],
    k: usize,
    per_row: usize,
    quantize: fn(&[f32], &mut [B]),
) -> (Vec<Vec<B>>, Vec<usize>) {
    let mut inputs: Vec<(*const f32, usize)> = Vec::new();
    let mut acts: Vec<Vec<B>> = Vec::new();
    let which = jobs
        .iter()
        .map(|j| {
            let key = (j.x.as_ptr(), j.x.len());
            inputs.iter().position(|&i| i == key).unwrap_or_else(|| {
                let mut a = vec![B::default(); j.x.len() / k * per_row];
                quantize_rows(&mut a, j.x, k, per_row, quantize);
                inputs.push(key);
                acts.push(a);
                acts.len() - 1
            })
        })
        .collect();
    (acts, which)
}

/// The rows of x (k values each) quantized into `per_row` blocks each of `out`; a prompt's
/// rows in parallel on the barrier pool (serial, this is most of a small model's time
/// outside the matmuls while the other cores spin).
fn quantize_rows<B: Send>(
    out: &mut [B],
    x: &[f32],
    k: usize,
    per_row: usize,
    quantize: fn(&[f32], &mut [B]),
) {
    let rows = x.len() / k;
    if rows < 4 {
        for (a, xs) in out.chunks_mut(per_row).zip(x.chunks(k)) {
            quantize(xs, a);
        }
        return;
    }
    /// A pointer to `out` that may cross threads; each task writes its own rows.
    #[derive(Clone, Copy)]
    struct Rows<B>(*mut B);
    // SAFETY: tasks write disjoint rows of `out`, which outlives the parallel call.
    unsafe impl<B: Send> Send for Rows<B> {}
    unsafe impl<B: Send> Sync for Rows<B> {}
    impl<B> Rows<B> {
        /// Row i of `per_row` blocks.
        ///
        /// # Safety
        /// Row i is in bounds and written by this task only.
        #[allow(clippy::mut_from_ref)]
        unsafe fn row(&self, i: usize, per_row: usize) -> &mut [B] {
            std::slice::from_raw_parts_mut(self.0.add(i * per_row), per_row)
        }
    }
    assert!(out.len() >= rows * per_row, "activation blocks");
    let dst = Rows(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        for i in range {
            // SAFETY: i < rows, and each row index is handed to one task.
            quantize(&x[i * k..(i + 1) * k], unsafe { dst.row(i, per_row) });
        }
    });
}

/// One matrix and the rows (m × k, m = x.len() / k) it multiplies.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub w: &'a Packed,
    pub x: &'a [f32],
}

/// Several matrices of one kind and width, each on its own rows, in one parallel region
/// (llama.cpp's mul_mat_id: every expert a token chose, and in prefill every token an expert
/// was chosen by, without a region per expert). Jobs sharing an input slice quantize it
/// once. Returns each job's m × n output.
pub fn matmul_jobs(jobs: &[Job]) -> Vec<Vec<f32>> {
    let isa = isa().expect("Kind::from_dtype picks the block kernels only where one runs");
    matmul_jobs_with(isa, jobs)
}

fn matmul_jobs_with(isa: Isa, jobs: &[Job]) -> Vec<Vec<f32>> {
    let Some(first) = jobs.first() else {
        return Vec::new();
    };
    let (kind, k) = (first.w.kind, first.w.k);
    assert!(
        jobs.iter()
            .all(|j| j.w.kind == kind && j.w.k == k && j.x.len() % k == 0),
        "one kind and width"
    );
    if let Some(kq) = kind.kquant() {
        return kquant::matmul_jobs(kquant::Kernels::best(Some(isa)), kq, jobs);
    }
    let nb = k / QK;
    let (acts, which) = quantize_inputs(jobs, k, nb, quantize_activations);
    let ms: Vec<usize> = jobs.iter().map(|j| j.x.len() / k).collect();
    let mut ys: Vec<Vec<f32>> = jobs
        .iter()
        .zip(&ms)
        .map(|(j, &m)| vec![0f32; m * j.w.n])
        .collect();
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    // Work items are groups of four rows, or of 16 (four groups) in a job that is a prefill
    // the wide tiles take, numbered across the jobs (in a MoE prefill some experts get
    // enough tokens for the wide tiles and some do not).
    let wide_kind = wide_tiles(isa, kind);
    let wide: Vec<bool> = ms
        .iter()
        .map(|&m| wide_kind && m >= WIDE_MIN_ROWS)
        .collect();
    let per_item = |t: usize| if wide[t] { 4 } else { 1 };
    let items = |t: usize| jobs[t].w.n.div_ceil(4).div_ceil(per_item(t));
    let starts: Vec<usize> = (0..jobs.len())
        .scan(0, |acc, t| {
            let s = *acc;
            *acc += items(t);
            Some(s)
        })
        .collect();
    let total: usize = (0..jobs.len()).map(items).sum();
    candle_core::utils::barrier_pool().execute_chunked(total, |chunk| {
        for item in chunk {
            let t = starts.partition_point(|&s| s <= item) - 1;
            let (w, out, m, acts) = (jobs[t].w, outs[t], ms[t], &acts[which[t]]);
            let n = w.n;
            let (per_item, wide) = (per_item(t), wide[t]);
            let g0 = (item - starts[t]) * per_item;
            // SAFETY: element (i, j) of job t's output belongs to this task for the rows j
            // of its groups g0..g0+per_item; each output holds m * n values.
            let put = |i: usize, j: usize, v: f32| unsafe { *out.0.add(i * n + j) = v };
            let act = |i: usize| &acts[i * nb..(i + 1) * nb];
            if wide && (g0 + 4) * 4 <= n {
                #[cfg(target_arch = "x86_64")]
                wide_rows(kind, w, g0, nb, m, &act, |i, v| {
                    // SAFETY: row i's elements g0·4..g0·4 + 16 of job t's output belong to
                    // this task (16 whole rows of w); the output holds m · n values.
                    unsafe {
                        std::ptr::copy_nonoverlapping(v.as_ptr(), out.0.add(i * n + g0 * 4), 16)
                    }
                });
                continue;
            }
            for gi in g0..(g0 + per_item).min(n.div_ceil(4)) {
                let j0 = gi * 4;
                if j0 + 4 <= n {
                    group_rows(isa, kind, w.group(gi), nb, m, &act, |i, r, v| {
                        put(i, j0 + r, v)
                    });
                } else {
                    for j in j0..n {
                        let row = w.tail_row(j);
                        for i in 0..m {
                            put(i, j, tail_dot(isa, kind, row, act(i)));
                        }
                    }
                }
            }
        }
    });
    ys
}

/// Activation rows from which a matmul takes the wide tiles (`avx512::Wide`): below it,
/// unpacking a tile costs more than it saves.
const WIDE_MIN_ROWS: usize = 8;

/// Whether prefill of `kind` runs on the 16-row wide tiles: Q4_0, Q5_0, Q8_0, IQ4_NL and
/// MXFP4 with AVX-512 (the types without a min; Q4_1 and Q5_1 keep candle's arithmetic).
#[allow(unused_variables)]
fn wide_tiles(isa: Isa, kind: Kind) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        return matches!(
            kind,
            Kind::Q4_0 | Kind::Q5_0 | Kind::Q8_0 | Kind::Iq4Nl | Kind::Mxfp4
        );
    }
    false
}

/// Groups g0..g0+4 of `w` (16 whole rows) against every activation row through one wide
/// tile, eight activation rows per call: `put(i, values)`, values for rows g0·4..g0·4 + 16.
#[cfg(target_arch = "x86_64")]
fn wide_rows<'a>(
    kind: Kind,
    w: &Packed,
    g0: usize,
    nb: usize,
    m: usize,
    act: &impl Fn(usize) -> &'a [Q8Block],
    mut put: impl FnMut(usize, &[f32; avx512::WIDE]),
) {
    const MT: usize = 8;
    // SAFETY: wide_tiles found AVX-512 F/BW/VL/VNNI (and AVX2) and a matrix of a kind
    // without a min (Q4_0, Q5_0, Q8_0, IQ4_NL, MXFP4);
    // groups g0..g0+4 are whole groups of nb packed blocks.
    let tile = unsafe { avx512::Wide::unpack(kind, std::array::from_fn(|g| w.group(g0 + g)), nb) };
    let mut emit = |i0: usize, v: &[[f32; avx512::WIDE]]| {
        for (di, v) in v.iter().enumerate() {
            put(i0 + di, v);
        }
    };
    let mut i0 = 0;
    while i0 + MT <= m {
        // SAFETY: as above; every activation row holds nb blocks.
        let v = unsafe { tile.dot::<MT>(std::array::from_fn(|i| act(i0 + i))) };
        emit(i0, &v);
        i0 += MT;
    }
    while i0 < m {
        // SAFETY: as above.
        let v = unsafe { tile.dot::<1>([act(i0)]) };
        emit(i0, &v);
        i0 += 1;
    }
}

/// Four rows of a packed group against every activation row: `put(i, r, value)`.
#[allow(unused_variables)]
fn group_rows<'a>(
    isa: Isa,
    kind: Kind,
    group: &[u8],
    nb: usize,
    m: usize,
    act: &impl Fn(usize) -> &'a [Q8Block],
    mut put: impl FnMut(usize, usize, f32),
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            if m >= 8 {
                // Prefill: each 4-row tile is unpacked once and swept over every row of x,
                // which makes it a matrix kernel rather than m matrix-vector products.
                let mut q = vec![0u8; nb * 4 * QK];
                let mut d = vec![0f32; nb * 4];
                let mut mins = vec![0f32; nb * 4];
                // SAFETY: isa() found AVX2; buffers sized for nb blocks of 4 rows.
                unsafe { avx2::unpack4(kind, group, nb, &mut q, &mut d, &mut mins) };
                for i in 0..m {
                    // SAFETY: as above.
                    let v = unsafe { avx2::dot4_unpacked(kind, &q, &d, &mins, act(i)) };
                    for (r, v) in v.into_iter().enumerate() {
                        put(i, r, v);
                    }
                }
            } else {
                for i in 0..m {
                    // SAFETY: isa() found AVX2; the group holds nb packed blocks.
                    let v = unsafe { avx2::dot4(kind, group, act(i)) };
                    for (r, v) in v.into_iter().enumerate() {
                        put(i, r, v);
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            if m >= 4 {
                // Prefill: the group unpacked once into registers' layout, swept over the
                // rows of x four at a time.
                // SAFETY: isa() found AVX-512 F/BW/VL/VNNI (and AVX2); the group holds nb
                // packed blocks.
                let tile = unsafe { avx512::Tile::unpack(kind, group, nb) };
                for i0 in (0..m).step_by(4) {
                    // Past the last row, repeat it and drop the results.
                    let rows = std::array::from_fn(|j| act((i0 + j).min(m - 1)));
                    // SAFETY: as above; every row holds nb blocks.
                    let v = unsafe { tile.dot4x4(rows) };
                    for (j, v) in v.into_iter().enumerate().take(m - i0) {
                        for (r, v) in v.into_iter().enumerate() {
                            put(i0 + j, r, v);
                        }
                    }
                }
            } else {
                for i in 0..m {
                    // SAFETY: isa() found AVX-512 F/BW/VL/VNNI (and AVX2); the group holds
                    // nb packed blocks.
                    let v = unsafe { avx512::dot4(kind, group, act(i)) };
                    for (r, v) in v.into_iter().enumerate() {
                        put(i, r, v);
                    }
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot | Isa::Neon => {
            for i in 0..m {
                // SAFETY: isa() found NEON (and SDOT for NeonDot); the group holds nb
                // packed blocks.
                let v = unsafe {
                    if isa == Isa::NeonDot {
                        neon::dot4_sdot(kind, group, act(i))
                    } else {
                        neon::dot4(kind, group, act(i))
                    }
                };
                for (r, v) in v.into_iter().enumerate() {
                    put(i, r, v);
                }
            }
        }
        #[allow(unreachable_patterns)]
        _ => unreachable!("{isa:?} is not detected on this architecture"),
    }
}

/// One row in ggml's layout (the tail of a matrix) against one activation row.
#[allow(unused_variables)]
fn tail_dot(isa: Isa, kind: Kind, row: &[u8], act: &[Q8Block]) -> f32 {
    match isa {
        // SAFETY: isa() found AVX2 (an AVX-512 CPU has it too); the row holds nb ggml blocks.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::dot_row(kind, row, act) },
        // SAFETY: isa() found NEON (and SDOT for NeonDot); the row holds nb ggml blocks.
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => unsafe { neon::dot_row_sdot(kind, row, act) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::dot_row(kind, row, act) },
        #[allow(unreachable_patterns)]
        _ => unreachable!("{isa:?} is not detected on this architecture"),
    }
}

/// A 64-bit LCG's states after `seed`: the tests' deterministic inputs, the same on every
/// run and machine.
#[cfg(test)]
fn lcg(seed: u64) -> impl Iterator<Item = u64> {
    std::iter::successors(Some(seed), |s| {
        Some(
            s.wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407),
        )
    })
    .skip(1)
}

/// Deterministic values in [-1, 1) for the tests of the kernels and of attention.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    lcg(seed)
        .take(n)
        .map(|s| ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0)
        .collect()
}

/// Deterministic bytes for the tests: random weight blocks, before their scales are tamed.
#[cfg(test)]
pub(crate) fn test_bytes(n: usize, seed: u64) -> Vec<u8> {
    lcg(seed).take(n).map(|s| (s >> 56) as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use crate::engine::kernels::test_values as random;

    /// Every instruction set this CPU runs (AVX-512 and AVX2 here; NEON with and without
    /// SDOT on an M-series or Grace CPU), so that each path is checked.
    fn available() -> Vec<Isa> {
        runnable()
    }

    /// The vector rounding of activations equals the scalar `(x·scale).round_ties_even() as
    /// i8` on ties (±0.5, ±1.5, ±2.5), just below them, signed zeros, and values that
    /// saturate.
    #[test]
    fn activation_rounding_matches_scalar() {
        let below_half = 0.5f32.next_down();
        let mut x: Vec<f32> = vec![
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            below_half,
            -below_half,
            0.0,
            -0.0,
            126.5,
            -127.5,
            127.49,
            200.0,
            -200.0,
            1e30,
            -1e30,
            3.4999998,
            -3.5000002,
            0.25,
            64.5,
            -64.5,
        ];
        x.extend(random(32 * 8 - x.len(), 9).iter().map(|v| v * 130.0));
        for scale in [1.0f32, 0.999, 1.0 / 3.0, -127.0 / 129.0] {
            let mut ours = vec![0i8; x.len()];
            round_i8(&x, scale, &mut ours);
            let theirs: Vec<i8> = x
                .iter()
                .map(|&v| (v * scale).round_ties_even() as i8)
                .collect();
            assert_eq!(ours, theirs, "scale {scale}");
        }
        let mut ties = [0i8; QK];
        round_i8(&x[..QK], 1.0, &mut ties);
        assert_eq!(ties[..6], [0, 0, 2, -2, 2, -2], "halves go to even");
    }

    /// ggml's block quantizer as llama.cpp's CPU backend runs it here, written out from
    /// ggml-cpu's C: the multiplier 127/amax on x86-64 (arch/x86/quants.c) and 1/d on
    /// aarch64 (arch/arm/quants.c), halves to even (nearest_int's 1.5·2²³ trick, which is
    /// exactly what `_mm256_round_ps(.., _MM_ROUND_NEAREST)` and NEON's vcvtnq give), and
    /// s = d·Σq from the f32 d.
    fn ggml_q8_1(xs: &[f32]) -> (f16, f16, [i8; QK]) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if cfg!(target_arch = "x86_64") {
            if amax != 0.0 {
                127.0 / amax
            } else {
                0.0
            }
        } else if d != 0.0 {
            1.0 / d
        } else {
            0.0
        };
        let nearest_int = |f: f32| ((f + 12582912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000;
        let qs: [i8; QK] = std::array::from_fn(|j| nearest_int(xs[j] * id) as i8);
        let sum: i32 = qs.iter().map(|&q| q as i32).sum();
        (f16::from_f32(d), f16::from_f32(d * sum as f32), qs)
    }

    /// Activations quantize as llama.cpp's quantize_row_q8_0 / q8_1 do on this CPU, bit for
    /// bit: on random blocks, on a block of exact halves, and on a block where this
    /// architecture's multiplier and the other one (127/amax, 1/(amax/127)) round some value
    /// differently (candle's BlockQ8_1::from_float takes 1/d and rounds halves away from zero).
    #[test]
    fn activations_quantize_as_llama_cpp() {
        let mut x = random(QK * 16, 11);
        for (b, v) in x.chunks_exact_mut(QK).enumerate() {
            v.iter_mut().for_each(|v| *v *= (b as f32 - 7.5) * 0.37);
        }
        // Exact halves: amax 127, so the multiplier is 1 either way.
        let halves: [f32; 8] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.0];
        x.extend(halves.iter().chain(std::iter::repeat(&3.0)).take(QK));
        // An amax whose two multipliers differ, and a value that they round apart.
        let split = (0..100_000)
            .map(|i| 0.75 + i as f32 * 1e-5)
            .find_map(|amax: f32| {
                let (a, b) = (127.0 / amax, 1.0 / (amax / 127.0));
                (0..126)
                    .flat_map(|j| {
                        let v = (j as f32 + 0.5) / a;
                        [v.next_down(), v, v.next_up()]
                    })
                    .find(|&v| (v * a).round_ties_even() != (v * b).round_ties_even())
                    .map(|v| (amax, v))
            })
            .expect("an amax and a value the two multipliers round apart");
        x.push(split.0);
        x.push(split.1);
        x.extend(std::iter::repeat_n(0.1, QK - 2));
        // An all-zero block.
        x.extend([0.0; QK]);
        let mut ours = vec![Q8Block::default(); x.len() / QK];
        quantize_activations(&x, &mut ours);
        for (i, (b, xs)) in ours.iter().zip(x.chunks_exact(QK)).enumerate() {
            let (d, s, qs) = ggml_q8_1(xs);
            assert_eq!(b.qs, qs, "block {i}: qs");
            assert_eq!(b.d, d.to_f32(), "block {i}: d");
            assert_eq!(b.s, s.to_f32(), "block {i}: s");
            assert_eq!(
                b.isum,
                qs.iter().map(|&q| q as i32).sum::<i32>(),
                "block {i}"
            );
        }
        assert_eq!(ours[16].qs[..8], [0, 2, 2, 0, -2, -2, 126, 127]);
    }

    /// Random IQ4_NL / MXFP4 blocks (every nibble pattern is valid) with modest scales:
    /// IQ4_NL's f16 between 2^-8 and 2^-7, MXFP4's E8M0 byte 120..128.
    fn table_blocks(ty: iq::IqType, blocks: usize, seed: u64) -> Vec<u8> {
        let mut raw = test_bytes(blocks * ty.block_bytes(), seed);
        for b in raw.chunks_exact_mut(ty.block_bytes()) {
            match ty {
                iq::IqType::Mxfp4 => b[0] = 120 + b[0] % 8,
                _ => b[1] = 0x1C + b[1] % 4,
            }
        }
        raw
    }

    /// IQ4_NL and MXFP4 repacked for the block kernels, for every instruction set this CPU
    /// runs, in decode and prefill shapes (AVX2's unpacked tiles from m = 8, AVX-512's 4-row
    /// tiles from m = 4 and its 16-row wide tiles from m = 8), with row counts leaving a
    /// tail of 1 to 3 ggml rows or none: each value within 1e-5 of Σ|w·x| of the f64 dot
    /// product of the dequantized weights (kernels/iq.rs, itself held to gguf-py's
    /// dequantization) and the activations as quantized. The integer block sums are exact,
    /// so only the float scaling and summation order can move a value, by a few ulps of that
    /// sum. Rows read back from the packed layout equal iq.rs's dequantization bit for bit.
    #[test]
    fn iq4nl_mxfp4_tiles_match_dequantized_reference() {
        let isas = available();
        if isas.is_empty() {
            eprintln!("SKIPPED: no kernel instruction set on this CPU; kernels/iq.rs runs");
            return;
        }
        let k = 256;
        let mut checked = 0;
        for ty in [iq::IqType::Iq4Nl, iq::IqType::Mxfp4] {
            let kind = Kind::from_iq(ty).expect("a block kernel for the table types");
            for n in [41, 42, 44, 68, 71] {
                let raw = table_blocks(ty, n * k / QK, ty.ggml_id() as u64 + n as u64);
                let w = iq::IqMatrix::new(ty, raw.clone(), n, k).unwrap();
                let packed = Packed::new(kind, &raw, n, k);
                let wf = w.dequantize();
                let mut row = vec![0f32; k];
                for j in 0..n {
                    packed.dequantize_row(j, &mut row);
                    assert_eq!(row, wf[j * k..(j + 1) * k], "{ty:?} n={n} row {j}");
                }
                for m in [1, 2, 3, 4, 5, 8, 9, 17] {
                    let x = random(m * k, 11 + m as u64);
                    let mut a = vec![Q8Block::default(); m * k / QK];
                    quantize_activations(&x, &mut a);
                    let xq: Vec<f64> = a
                        .iter()
                        .flat_map(|b| b.qs.map(|q| q as f64 * b.d as f64))
                        .collect();
                    for &isa in &isas {
                        let got = matmul_many_with(isa, &[&packed], &x, m).pop().unwrap();
                        for i in 0..m {
                            for j in 0..n {
                                let (wr, xr) = (&wf[j * k..(j + 1) * k], &xq[i * k..(i + 1) * k]);
                                let want: f64 =
                                    wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b).sum();
                                let scale: f64 =
                                    wr.iter().zip(xr).map(|(&a, &b)| (a as f64 * b).abs()).sum();
                                let v = got[i * n + j] as f64;
                                assert!(
                                    (v - want).abs() <= 1e-5 * scale,
                                    "{isa:?} {ty:?} n={n} m={m} ({i},{j}): {v} vs {want}"
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        eprintln!("checked {isas:?}: {checked} values");
    }

    /// The repacked IQ4_NL / MXFP4 kernels agree with the unrepacked per-row ones
    /// (kernels/iq.rs, ggml's arithmetic: one float update per block) on the same weights
    /// and inputs, for every instruction set this CPU runs and iq.rs's scalar code: the same
    /// exact integer block sums, scaled and summed in another order, so within 1e-5 of
    /// Σ|w·x| (most values are bit-identical: the count is printed).
    #[test]
    fn iq4nl_mxfp4_repacked_agree_with_unrepacked() {
        let isas = available();
        if isas.is_empty() {
            eprintln!("SKIPPED: no kernel instruction set on this CPU; kernels/iq.rs runs");
            return;
        }
        let (n, k) = (70, 576);
        let (mut same, mut total) = (0, 0);
        for ty in [iq::IqType::Iq4Nl, iq::IqType::Mxfp4] {
            let kind = Kind::from_iq(ty).unwrap();
            let raw = table_blocks(ty, n * k / QK, 5);
            let w = iq::IqMatrix::new(ty, raw.clone(), n, k).unwrap();
            let packed = Packed::new(kind, &raw, n, k);
            let wf = w.dequantize();
            for m in [1, 9] {
                let x = random(m * k, 3 + m as u64);
                for &isa in &isas {
                    let ours = matmul_many_with(isa, &[&packed], &x, m).pop().unwrap();
                    for per_row in [Some(isa), None] {
                        let theirs = iq::matmul_with(per_row, &w, &x, m);
                        for (idx, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                            let (i, j) = (idx / n, idx % n);
                            let scale: f32 =
                                (0..k).map(|c| (wf[j * k + c] * x[i * k + c]).abs()).sum();
                            assert!(
                                (a - b).abs() <= 1e-5 * scale,
                                "{isa:?} vs {per_row:?} {ty:?} m={m} ({i},{j}): {a} vs {b}"
                            );
                            same += (a == b) as usize;
                            total += 1;
                        }
                    }
                }
            }
        }
        eprintln!("repacked vs per-row: {same} of {total} values bit-identical");
    }

    /// A MoE prefill's jobs (one per expert, each with its own tokens) give every job what a
    /// matmul of that job alone gives, bit for bit, whatever the other jobs' row counts: an
    /// expert with enough tokens for the wide tiles takes them even beside one that has one
    /// token (before, one small job sent them all to the narrow tiles).
    #[test]
    fn each_job_of_a_region_equals_its_own_matmul() {
        let (n, k) = (40, 256);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let kind = Kind::from_dtype(dtype).unwrap();
            let mats: Vec<Packed> = (0..3)
                .map(|e| {
                    let w = Tensor::from_vec(random(n * k, 7 + e), (n, k), &Device::Cpu).unwrap();
                    let q = QTensor::quantize(&w, dtype).unwrap();
                    Packed::new(kind, &q.data().unwrap(), n, k)
                })
                .collect();
            let ms = [1usize, 12, 5];
            let xs: Vec<Vec<f32>> = ms
                .iter()
                .enumerate()
                .map(|(e, &m)| random(m * k, 20 + e as u64))
                .collect();
            for isa in available() {
                let jobs: Vec<Job> = mats.iter().zip(&xs).map(|(w, x)| Job { w, x }).collect();
                let together = matmul_jobs_with(isa, &jobs);
                for (e, job) in jobs.iter().enumerate() {
                    let alone = matmul_jobs_with(isa, std::slice::from_ref(job))
                        .pop()
                        .unwrap();
                    assert_eq!(
                        together[e], alone,
                        "{isa:?} {dtype:?} job {e} (m = {})",
                        ms[e]
                    );
                }
            }
        }
    }

    /// The vector E8M0 scale (avx2::scales4) equals mxfp4::e8m0_half for every byte,
    /// subnormal scales (e < 2) and 2^127 included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn mxfp4_vector_scales_match_e8m0_half() {
        if !available().contains(&Isa::Avx2) {
            eprintln!("SKIPPED: no AVX2 on this CPU");
            return;
        }
        for e0 in (0..=255u8).step_by(4) {
            let e = [e0, e0 + 1, e0 + 2, e0 + 3];
            let mut got = [0f32; 4];
            // SAFETY: AVX2, FMA and F16C are detected above; `e` holds four bytes.
            unsafe {
                std::arch::x86_64::_mm_storeu_ps(
                    got.as_mut_ptr(),
                    avx2::scales4(Kind::Mxfp4, e.as_ptr()),
                )
            };
            for (g, e) in got.iter().zip(e) {
                assert_eq!(g.to_bits(), mxfp4::e8m0_half(e).to_bits(), "e = {e}");
            }
        }
    }

    #[test]
    fn isa_cap_picks_the_named_set_or_the_best() {
        let x86 = [Isa::Avx512, Isa::Avx2];
        assert_eq!(capped(&x86, None), Some(Isa::Avx512));
        assert_eq!(capped(&x86, Some("avx2")), Some(Isa::Avx2));
        assert_eq!(capped(&x86, Some(" AVX512 ")), Some(Isa::Avx512));
        // An AVX2-only CPU asked for AVX-512 runs AVX2.
        assert_eq!(capped(&[Isa::Avx2], Some("avx512")), Some(Isa::Avx2));
        assert_eq!(capped(&x86, Some("none")), None);
        assert_eq!(capped(&x86, Some("neon")), Some(Isa::Avx512));
        let arm = [Isa::NeonDot, Isa::Neon];
        assert_eq!(capped(&arm, Some("neon")), Some(Isa::Neon));
        assert_eq!(capped(&[], None), None);
        // This CPU's list is best first and holds only sets of its architecture.
        let here = runnable();
        assert_eq!(isa().is_some(), simd());
        if std::env::var_os("TOKENTOP_ISA").is_none() {
            assert_eq!(isa(), here.first().copied());
        }
    }

    /// Random activations on a grid that both quantizers read alike: per block of 32, whole
    /// numbers up to ±127 (one of them ±127) times a power of two, so d is that power exactly,
    /// every product with the multiplier (127/amax or 1/d) is a whole number, and s = d·Σq
    /// rounds to f16 the same from an f16 or an f32 d: tokentop's blocks (ggml's arithmetic)
    /// then equal candle's (its own), and a kernel's result can be held to candle's bit for bit.
    fn grid_values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = random(n, seed);
        for (b, v) in x.chunks_exact_mut(QK).enumerate() {
            let scale = 0.5f32.powi(1 + (b % 5) as i32);
            v.iter_mut().for_each(|v| *v = (*v * 127.0).round() * scale);
            v[b % QK] = if b % 2 == 0 { 127.0 } else { -127.0 } * scale;
        }
        x
    }

    /// Every type against candle's own matmul on random blocks, in decode and prefill shapes,
    /// with row counts that leave a tail and that do not, for every instruction set this CPU
    /// runs: bit-identical, except Q4_0/Q8_0 on aarch64 where candle itself picks kernels of
    /// different summation order by row count (see neon.rs): there bit-identical when the row
    /// count is a multiple of 4 and m is 1, else within 1e-5 of Σ|w·x| (reordering the
    /// additions of 8 blocks' products moves a result by a few ulps of that sum at most).
    #[test]
    fn kernels_match_candle_reference() {
        let isas = available();
        if isas.is_empty() {
            eprintln!(
                "SKIPPED: no kernel instruction set on this CPU; candle's kernels run instead"
            );
            return;
        }
        let dev = Device::Cpu;
        let k = 256;
        let (mut reordered_cases, mut exact_cases) = (0, 0);
        for n in [42, 44, 68] {
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
                let deq: Vec<f32> = q
                    .dequantize(&dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let reference = QMatMul::from_qtensor(q).unwrap();
                for m in [1, 3, 4, 7, 8, 9, 17] {
                    let x = grid_values(m * k, 2 + m as u64);
                    let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
                    let theirs: Vec<f32> = reference
                        .forward(&xt)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    for &isa in &isas {
                        let ours = matmul_many_with(isa, &[&packed], &x, m).pop().unwrap();
                        let reordered = (matches!(isa, Isa::Neon | Isa::NeonDot)
                            && matches!(kind, Kind::Q4_0 | Kind::Q8_0)
                            && (n % 4 != 0 || m != 1))
                            || (wide_tiles(isa, kind) && m >= WIDE_MIN_ROWS);
                        if !reordered {
                            assert_eq!(ours, theirs, "{isa:?} {dtype:?} n={n} m={m}");
                            continue;
                        }
                        reordered_cases += ours.len();
                        exact_cases += ours.iter().zip(&theirs).filter(|(a, b)| a == b).count();
                        for (idx, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                            let (i, j) = (idx / n, idx % n);
                            let scale: f32 =
                                (0..k).map(|c| (deq[j * k + c] * x[i * k + c]).abs()).sum();
                            assert!(
                                (a - b).abs() <= 1e-5 * scale,
                                "{isa:?} {dtype:?} n={n} m={m} ({i},{j}): {a} vs {b}"
                            );
                        }
                    }
                }
                // Rows read back from the packed layout equal candle's dequantization.
                let mut row = vec![0f32; k];
                for j in [0, 5, n - 1] {
                    packed.dequantize_row(j, &mut row);
                    assert_eq!(row, deq[j * k..(j + 1) * k], "{dtype:?} row {j}");
                }
            }
        }
        eprintln!(
            "checked {isas:?}; Q4_0/Q8_0 against candle's reordered kernels: {exact_cases} of {reordered_cases} values bit-identical, the rest within tolerance"
        );
    }
}
