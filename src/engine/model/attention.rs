//! Attention on the CPU over a KV cache stored in f16 (the default), q8_0 or f32, as
//! llama.cpp's `--cache-type-k/-v` choose: one fused pass per block of query rows — scores,
//! online softmax, weighted sum of V — with no mask or score tensor and no gemm.
//!
//! Written here because candle has no CPU flash attention: its path (an f32 gemm, then
//! separate scale, mask and softmax tensors over an f32 cache) read the cache twice, wrote
//! an n_head × seq × depth score tensor per layer, and ran candle's gemm threads against the
//! spinning pool the block kernels use.
//!
//! Work items are (KV head, block of query positions, KV split) on candle's barrier pool:
//! the query heads that share a KV head (grouped-query attention) run together, so each
//! block of K and V is converted to f32 once for all of them; prefill splits over query
//! positions; decode at depth splits the keys (split-K) and merges the partial softmaxes
//! (max, sum, unnormalized output) afterwards. Within a block the causal mask and a sliding
//! window are each row's key range. AVX2 (with FMA and F16C) is used when the CPU reports
//! it at run time; elsewhere plain loops that the compiler vectorizes.

use crate::protocol::KvType;
use anyhow::{bail, Result};
use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Values per q8_0 block.
const Q8: usize = 32;

/// One side (K or V) of a layer's cache on the CPU: `heads` rows of `dim` values per
/// position, head-major (`[head][position][dim]`) so that a block of positions of one head is
/// contiguous. Capacity grows by doubling up to the context; `truncate` keeps a prefix.
pub struct KvStore {
    ty: KvType,
    heads: usize,
    dim: usize,
    cap: usize,
    len: usize,
    data: Buf,
}

enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8(Vec<BlockQ8_0>),
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("ty", &self.ty)
            .field("heads", &self.heads)
            .field("dim", &self.dim)
            .field("cap", &self.cap)
            .field("len", &self.len)
            .finish()
    }
}

impl KvStore {
    pub fn new(ty: KvType, heads: usize, dim: usize) -> Result<Self> {
        if ty == KvType::Q8_0 && !dim.is_multiple_of(Q8) {
            bail!(
                "a q8_0 KV cache needs a head size that is a multiple of {Q8}, not {dim}; use f16"
            );
        }
        let data = match ty {
            KvType::F32 => Buf::F32(Vec::new()),
            KvType::F16 => Buf::F16(Vec::new()),
            KvType::Q8_0 => Buf::Q8(Vec::new()),
        };
        Ok(Self {
            ty,
            heads,
            dim,
            cap: 0,
            len: 0,
            data,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes the buffer occupies.
    pub fn bytes(&self) -> usize {
        self.heads * self.cap * self.ty.row_bytes(self.dim)
    }

    /// Storage units (values, or q8_0 blocks) per row of `dim` values.
    fn units(&self) -> usize {
        match self.ty {
            KvType::Q8_0 => self.dim / Q8,
            _ => self.dim,
        }
    }

    /// Appends `seq` positions given as `[head][seq][dim]` values.
    pub fn append(&mut self, x: &[f32], seq: usize, max_len: usize) -> Result<()> {
        let need = self.len + seq;
        if need > max_len {
            bail!("KV cache full: {need} positions needed, {max_len} allocated");
        }
        if x.len() != self.heads * seq * self.dim {
            bail!(
                "KV cache: {} values appended, expected {} heads × {seq} × {}",
                x.len(),
                self.heads,
                self.dim
            );
        }
        if need > self.cap {
            self.grow(need.max(self.cap * 2).max(256).min(max_len));
        }
        let (u, dim) = (self.units(), self.dim);
        for h in 0..self.heads {
            let src = &x[h * seq * dim..(h + 1) * seq * dim];
            let at = (h * self.cap + self.len) * u;
            match &mut self.data {
                Buf::F32(d) => d[at..at + seq * u].copy_from_slice(src),
                Buf::F16(d) => d[at..at + seq * u].convert_from_f32_slice(src),
                Buf::Q8(d) => BlockQ8_0::from_float(src, &mut d[at..at + seq * u]),
            }
        }
        self.len = need;
        Ok(())
    }

    fn grow(&mut self, cap: usize) {
        let (u, old_cap, len) = (self.units(), self.cap, self.len);
        fn regrow<T: Clone>(
            v: &mut Vec<T>,
            zero: T,
            heads: usize,
            u: usize,
            old: usize,
            new: usize,
            len: usize,
        ) {
            let mut out = vec![zero; heads * new * u];
            for h in 0..heads {
                out[h * new * u..(h * new + len) * u]
                    .clone_from_slice(&v[h * old * u..(h * old + len) * u]);
            }
            *v = out;
        }
        let h = self.heads;
        match &mut self.data {
            Buf::F32(d) => regrow(d, 0.0, h, u, old_cap, cap, len),
            Buf::F16(d) => regrow(d, f16::ZERO, h, u, old_cap, cap, len),
            Buf::Q8(d) => regrow(d, BlockQ8_0::zeros(), h, u, old_cap, cap, len),
        }
        self.cap = cap;
    }

    /// Asks the cache for positions `j0..j0 + n` of head `h` (see `kernels::prefetch_range`):
    /// the block a task converts next, while it works on this one.
    pub fn prefetch(&self, h: usize, j0: usize, n: usize) {
        let j0 = j0.min(self.cap);
        let n = n.min(self.cap - j0);
        let u = self.units();
        let at = (h * self.cap + j0) * u;
        let (p, unit) = match &self.data {
            Buf::F32(d) => (d[at..].as_ptr() as *const u8, size_of::<f32>()),
            Buf::F16(d) => (d[at..].as_ptr() as *const u8, size_of::<f16>()),
            Buf::Q8(d) => (d[at..].as_ptr() as *const u8, size_of::<BlockQ8_0>()),
        };
        crate::engine::kernels::prefetch_range(p, n * u * unit);
    }

    /// Positions `j0..j0 + n` of head `h` as f32, `n × dim` values into `out`.
    pub fn rows_f32(&self, h: usize, j0: usize, n: usize, out: &mut [f32]) {
        let u = self.units();
        let at = (h * self.cap + j0) * u;
        let out = &mut out[..n * self.dim];
        match &self.data {
            Buf::F32(d) => out.copy_from_slice(&d[at..at + n * u]),
            Buf::F16(d) => d[at..at + n * u].convert_to_f32_slice(out),
            Buf::Q8(d) => BlockQ8_0::to_float(&d[at..at + n * u], out),
        }
    }
}

impl KvType {
    /// Bytes of one row of `dim` values.
    pub fn row_bytes(self, dim: usize) -> usize {
        match self {
            KvType::F32 => 4 * dim,
            KvType::F16 => 2 * dim,
            KvType::Q8_0 => dim.div_ceil(Q8) * std::mem::size_of::<BlockQ8_0>(),
        }
    }
}

/// The query side of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// `[n_head][seq][dim]` values, after any norm and rotary embedding.
    pub q: &'a [f32],
    pub n_head: usize,
    pub seq: usize,
    /// Position of the first query row; the cache holds keys `0..pos + seq`.
    pub pos: usize,
    /// A sliding window: query p sees keys p+1-w..=p. None: every key up to p.
    pub window: Option<usize>,
    pub scale: f32,
    /// gpt-oss's attention sinks: per query head, a logit that joins the softmax's
    /// denominator (ggml_soft_max_ext with sinks) and adds no value.
    pub sinks: Option<&'a [f32]>,
}

/// The normalizer of a row whose scores have running max `m` and sum `l` (of e^(s − m)):
/// `(rescale, 1 / denominator)` with the head's sink joining the sum, computed against
/// max(m, sink) as ggml does so a large sink cannot overflow.
fn normalizer(query: &Query, h: usize, m: f32, l: f32) -> (f32, f32) {
    match query.sinks.and_then(|s| s.get(h)) {
        Some(&sink) => {
            let top = m.max(sink);
            let r = if l > 0.0 { (m - top).exp() } else { 0.0 };
            let den = l * r + (sink - top).exp();
            (r, if den > 0.0 { 1.0 / den } else { 0.0 })
        }
        None => (1.0, if l > 0.0 { 1.0 / l } else { 0.0 }),
    }
}

/// softmax(Q·Kᵀ·scale + causal/window mask)·V for every query row, as `[seq][n_head][dim]`
/// (the layout the output projection reads). K and V are the layer's cache after this
/// call's keys were appended.
pub fn attend(query: &Query, k: &KvStore, v: &KvStore) -> Result<Vec<f32>> {
    let threads = candle_core::utils::get_num_threads();
    attend_with(simd_for(k.dim), query, k, v, threads)
}

/// Which inner loops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2's arithmetic, with the 32 vector registers of AVX-512 (VL): two query rows
    /// that see the same keys (heads sharing a KV head, at one position) are scored and
    /// summed together, each key and value vector loaded once for both. Bit-identical to
    /// `Avx2` row by row.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    Scalar,
}

fn simd_for(dim: usize) -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let has = *AVX2.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        });
        if has && dim.is_multiple_of(8) {
            // The block kernels' choice, so TOKENTOP_ISA=avx2 keeps attention on AVX2 too.
            if crate::engine::kernels::isa() == Some(crate::engine::kernels::Isa::Avx512) {
                return Simd::Avx512;
            }
            return Simd::Avx2;
        }
    }
    let _ = dim;
    Simd::Scalar
}

/// A raw pointer that may cross threads; each task writes a disjoint range through it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements of buffers that outlive the parallel call.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// `len` values from element `at` on.
    ///
    /// # Safety
    /// They lie in the buffer and no other task touches them.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// How one call is cut into tasks.
struct Plan {
    rep: usize,
    /// Query positions per task.
    qb: usize,
    n_qb: usize,
    /// KV splits per (KV head, query block).
    splits: usize,
    /// Keys per block (converted to f32 together).
    block: usize,
}

impl Plan {
    fn new(query: &Query, n_kv: usize, dim: usize, threads: usize) -> Self {
        let rep = query.n_head / n_kv;
        // About 64 query rows per task: K/V blocks are converted once for all of them.
        let qb = (64 / rep).clamp(1, query.seq);
        let n_qb = query.seq.div_ceil(qb);
        let block = (4096 / dim).clamp(8, 128) / 8 * 8;
        // Decode (and short prefills) on few KV heads: split the keys so every thread has
        // work, at least 256 keys a split.
        let keys = query.pos + query.seq;
        let want = (4 * threads).div_ceil(n_kv * n_qb);
        let splits = want.min(keys / 256).max(1);
        Self {
            rep,
            qb,
            n_qb,
            splits,
            block,
        }
    }
}

fn attend_with(
    simd: Simd,
    query: &Query,
    k: &KvStore,
    v: &KvStore,
    threads: usize,
) -> Result<Vec<f32>> {
    let (n_kv, dim) = (k.heads, k.dim);
    let total = query.pos + query.seq;
    if v.heads != n_kv || v.dim != dim {
        bail!("attention: K and V caches differ in shape");
    }
    if k.len != total || v.len != total {
        bail!(
            "attention: the cache holds {} keys and {} values, expected {total}",
            k.len,
            v.len
        );
    }
    if n_kv == 0 || !query.n_head.is_multiple_of(n_kv) {
        bail!(
            "attention: {} query heads cannot share {n_kv} KV heads",
            query.n_head
        );
    }
    if query.q.len() != query.n_head * query.seq * dim {
        bail!(
            "attention: {} query values, expected {} heads × {} × {dim}",
            query.q.len(),
            query.n_head,
            query.seq
        );
    }
    if query.window == Some(0) {
        bail!("attention: a window of 0 keys");
    }
    let plan = Plan::new(query, n_kv, dim, threads);
    let (rep, qb, splits) = (plan.rep, plan.qb, plan.splits);
    let rows_max = qb * rep;
    let mut out = vec![0f32; query.seq * query.n_head * dim];
    // Split-K partials: per task and row, m, l and dim unnormalized outputs.
    let stride = dim + 2;
    let n_tasks = n_kv * plan.n_qb * splits;
    let mut partial = if splits > 1 {
        vec![0f32; n_tasks * rows_max * stride]
    } else {
        Vec::new()
    };
    let (out_p, part_p) = (Out(out.as_mut_ptr()), Out(partial.as_mut_ptr()));
    candle_core::utils::barrier_pool().execute_chunked(n_tasks, |tasks| {
        let mut scratch = Scratch::new(rows_max, dim, plan.block);
        for t in tasks {
            let split = t % splits;
            let qbi = (t / splits) % plan.n_qb;
            let g = t / splits / plan.n_qb;
            let rows = run_task(simd, query, k, v, &plan, g, qbi, split, &mut scratch);
            for ri in 0..rows {
                let (m, l) = (scratch.m[ri], scratch.l[ri]);
                let o = &scratch.o[ri * dim..(ri + 1) * dim];
                if splits == 1 {
                    let (s, h) = (qbi * qb + ri / rep, g * rep + ri % rep);
                    let (r, inv) = normalizer(query, h, m, l);
                    // SAFETY: row (s, h) of the output belongs to this task alone.
                    let dst = unsafe { out_p.slice((s * query.n_head + h) * dim, dim) };
                    for (d, &x) in dst.iter_mut().zip(o) {
                        *d = x * r * inv;
                    }
                } else {
                    // SAFETY: task t's partial rows are written by task t alone.
                    let dst = unsafe { part_p.slice((t * rows_max + ri) * stride, stride) };
                    dst[0] = m;
                    dst[1] = l;
                    dst[2..].copy_from_slice(o);
                }
            }
        }
    });
    if splits > 1 {
        merge(query, &plan, dim, &partial, &mut out);
    }
    Ok(out)
}

/// Combines the split-K partial softmaxes: weights e^(m_s − max m), output Σ w·O_s / Σ w·l_s.
fn merge(query: &Query, plan: &Plan, dim: usize, partial: &[f32], out: &mut [f32]) {
    let (rep, qb, splits) = (plan.rep, plan.qb, plan.splits);
    let stride = dim + 2;
    let rows_max = qb * rep;
    let n_kv = query.n_head / rep;
    let mut acc = vec![0f32; dim];
    for g in 0..n_kv {
        for qbi in 0..plan.n_qb {
            let rows = qb.min(query.seq - qbi * qb) * rep;
            let task0 = (g * plan.n_qb + qbi) * splits;
            for ri in 0..rows {
                let part = |s: usize| {
                    let at = ((task0 + s) * rows_max + ri) * stride;
                    &partial[at..at + stride]
                };
                let m = (0..splits)
                    .map(|s| part(s)[0])
                    .fold(f32::NEG_INFINITY, f32::max);
                acc.fill(0.0);
                let mut l = 0.0;
                for s in 0..splits {
                    let p = part(s);
                    if p[1] == 0.0 {
                        continue;
                    }
                    let w = (p[0] - m).exp();
                    l += w * p[1];
                    for (a, &x) in acc.iter_mut().zip(&p[2..]) {
                        *a += w * x;
                    }
                }
                let (s, h) = (qbi * qb + ri / rep, g * rep + ri % rep);
                let (r, inv) = normalizer(query, h, m, l);
                let dst = &mut out[(s * query.n_head + h) * dim..][..dim];
                for (d, &a) in dst.iter_mut().zip(&acc) {
                    *d = a * r * inv;
                }
            }
        }
    }
}

/// One thread's buffers, reused across its tasks.
struct Scratch {
    /// Per row: running max, running sum, unnormalized output.
    m: Vec<f32>,
    l: Vec<f32>,
    o: Vec<f32>,
    /// A block of K and of V as f32, and one row's scores / probabilities.
    kf: Vec<f32>,
    vf: Vec<f32>,
    s: Vec<f32>,
    /// The scores of the second row of a pair (`Simd::Avx512`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    s2: Vec<f32>,
}

impl Scratch {
    fn new(rows: usize, dim: usize, block: usize) -> Self {
        Self {
            m: vec![0.0; rows],
            l: vec![0.0; rows],
            o: vec![0.0; rows * dim],
            kf: vec![0.0; block * dim],
            vf: vec![0.0; block * dim],
            s: vec![0.0; block],
            s2: vec![0.0; block],
        }
    }
}

/// The keys query position `p` sees: `lo..hi`.
fn visible(p: usize, window: Option<usize>) -> (usize, usize) {
    (window.map_or(0, |w| (p + 1).saturating_sub(w)), p + 1)
}

/// One task: KV head `g`, query block `qbi`, KV split `split`. Leaves each row's m, l and
/// unnormalized output in `sc`; returns the number of rows.
#[allow(clippy::too_many_arguments)]
fn run_task(
    simd: Simd,
    query: &Query,
    k: &KvStore,
    v: &KvStore,
    plan: &Plan,
    g: usize,
    qbi: usize,
    split: usize,
    sc: &mut Scratch,
) -> usize {
    let (rep, dim, b) = (plan.rep, k.dim, plan.block);
    let s0 = qbi * plan.qb;
    let n_pos = plan.qb.min(query.seq - s0);
    let rows = n_pos * rep;
    sc.m[..rows].fill(f32::NEG_INFINITY);
    sc.l[..rows].fill(0.0);
    sc.o[..rows * dim].fill(0.0);
    // Keys any row of this block sees, in whole blocks, and this split's share of them.
    let (lo, _) = visible(query.pos + s0, query.window);
    let (_, hi) = visible(query.pos + s0 + n_pos - 1, query.window);
    let (first, last) = (lo / b, hi.div_ceil(b));
    let n_blocks = last - first;
    let (b0, b1) = (
        first + n_blocks * split / plan.splits,
        first + n_blocks * (split + 1) / plan.splits,
    );
    for blk in b0..b1 {
        let j0 = blk * b;
        let n = b.min(hi - j0);
        if blk + 1 < b1 {
            k.prefetch(g, j0 + b, b);
            v.prefetch(g, j0 + b, b);
        }
        k.rows_f32(g, j0, n, &mut sc.kf);
        v.rows_f32(g, j0, n, &mut sc.vf);
        let mut ri = 0;
        while ri < rows {
            let s = s0 + ri / rep;
            let h = g * rep + ri % rep;
            let (lo, hi) = visible(query.pos + s, query.window);
            let (a, z) = (lo.max(j0), hi.min(j0 + n));
            if a >= z {
                ri += 1;
                continue;
            }
            let q = &query.q[(h * query.seq + s) * dim..][..dim];
            let row = RowBlock {
                q,
                kf: &sc.kf,
                vf: &sc.vf,
                dim,
                a: a - j0,
                z: z - j0,
                scale: query.scale,
            };
            // The next row is the next head at the same position: it sees the same keys.
            #[cfg(target_arch = "x86_64")]
            if simd == Simd::Avx512 && ri + 1 < rows && (ri + 1) / rep == ri / rep {
                let q2 = &query.q[((h + 1) * query.seq + s) * dim..][..dim];
                let (m1, m2) = sc.m[ri..ri + 2].split_at_mut(1);
                let (l1, l2) = sc.l[ri..ri + 2].split_at_mut(1);
                let (o1, o2) = sc.o[ri * dim..(ri + 2) * dim].split_at_mut(dim);
                // SAFETY: simd_for found AVX2, FMA, F16C and AVX-512 (F, VL), and dim is a
                // multiple of 8.
                unsafe {
                    avx2::row_block2(
                        &row,
                        q2,
                        [&mut m1[0], &mut m2[0]],
                        [&mut l1[0], &mut l2[0]],
                        [o1, o2],
                        [&mut sc.s, &mut sc.s2],
                    )
                };
                ri += 2;
                continue;
            }
            let o = &mut sc.o[ri * dim..(ri + 1) * dim];
            match simd {
                // SAFETY: simd_for found AVX2, FMA and F16C, and dim is a multiple of 8.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 | Simd::Avx512 => unsafe {
                    avx2::row_block(&row, &mut sc.m[ri], &mut sc.l[ri], o, &mut sc.s)
                },
                Simd::Scalar => scalar_row_block(&row, &mut sc.m[ri], &mut sc.l[ri], o, &mut sc.s),
            }
            ri += 1;
        }
    }
    rows
}

/// One query row against keys `a..z` of a converted block (rows of `dim` f32; the block
/// buffers hold whole groups of 8 keys, those past the block's end finite and ignored).
struct RowBlock<'a> {
    q: &'a [f32],
    kf: &'a [f32],
    vf: &'a [f32],
    dim: usize,
    a: usize,
    z: usize,
    scale: f32,
}

/// The online-softmax update of one row over one block, with plain loops.
fn scalar_row_block(r: &RowBlock, m: &mut f32, l: &mut f32, o: &mut [f32], s: &mut [f32]) {
    let dim = r.dim;
    for (j, sj) in s.iter_mut().enumerate().take(r.z).skip(r.a) {
        let kr = &r.kf[j * dim..(j + 1) * dim];
        // Eight partial sums, which the compiler can keep in vector lanes.
        let mut acc = [0f32; 8];
        let mut c = 0;
        while c + 8 <= dim {
            for (lane, a) in acc.iter_mut().enumerate() {
                *a += r.q[c + lane] * kr[c + lane];
            }
            c += 8;
        }
        let tail: f32 = r.q[c..dim].iter().zip(&kr[c..]).map(|(a, b)| a * b).sum();
        *sj = (acc.iter().sum::<f32>() + tail) * r.scale;
    }
    let mx = s[r.a..r.z]
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let m_new = m.max(mx);
    let alpha = if *m == f32::NEG_INFINITY {
        0.0
    } else {
        (*m - m_new).exp()
    };
    let mut sum = 0.0;
    for x in &mut s[r.a..r.z] {
        *x = (*x - m_new).exp();
        sum += *x;
    }
    *l = *l * alpha + sum;
    if alpha != 1.0 {
        for x in o.iter_mut() {
            *x *= alpha;
        }
    }
    for (j, &p) in s.iter().enumerate().take(r.z).skip(r.a) {
        for (x, &vv) in o.iter_mut().zip(&r.vf[j * dim..(j + 1) * dim]) {
            *x += p * vv;
        }
    }
    *m = m_new;
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::RowBlock;
    use std::arch::x86_64::*;

    /// The eight sums of eight accumulators, as one vector (lane r = Σ lanes of a[r]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn reduce8(a: [__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let lo = _mm256_permute2f128_ps(u0, u1, 0x20);
        let hi = _mm256_permute2f128_ps(u0, u1, 0x31);
        _mm256_add_ps(lo, hi)
    }

    /// Dot products of q with eight consecutive rows of `k` (row stride `dim`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot8(q: *const f32, k: *const f32, dim: usize) -> __m256 {
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut c = 0;
        while c < dim {
            let qv = _mm256_loadu_ps(q.add(c));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.add(r * dim + c)), *a);
            }
            c += 8;
        }
        reduce8(acc)
    }

    /// e^x lane by lane (Cephes' expf: range reduction by ln 2 and a degree-5 polynomial,
    /// within 2 ulp); lanes below −87 give 0, as they do in f32 to within 1e-38.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp8(x: __m256) -> __m256 {
        let tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_GE_OQ);
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        ));
        _mm256_and_ps(_mm256_mul_ps(y, pow2), tiny)
    }

    /// o[c0..c0 + 8N] += Σ_j p[j] · v[j][c0..c0 + 8N], with the output strip in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv_strip<const N: usize>(
        o: *mut f32,
        p: &[f32],
        v: *const f32,
        dim: usize,
        a: usize,
        z: usize,
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        for (t, x) in acc.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(o.add(8 * t));
        }
        for (j, &pj) in p.iter().enumerate().take(z).skip(a) {
            let pj = _mm256_set1_ps(pj);
            let row = v.add(j * dim);
            for (t, x) in acc.iter_mut().enumerate() {
                *x = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row.add(8 * t)), *x);
            }
        }
        for (t, x) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(8 * t), *x);
        }
    }

    /// Dot products of two query rows with eight consecutive rows of `k`, each key vector
    /// loaded once for both; each row's sums are `dot8`'s, operation for operation.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot8x2(q1: *const f32, q2: *const f32, k: *const f32, dim: usize) -> [__m256; 2] {
        let mut a1 = [_mm256_setzero_ps(); 8];
        let mut a2 = [_mm256_setzero_ps(); 8];
        let mut c = 0;
        while c < dim {
            let (v1, v2) = (_mm256_loadu_ps(q1.add(c)), _mm256_loadu_ps(q2.add(c)));
            for r in 0..8 {
                let kv = _mm256_loadu_ps(k.add(r * dim + c));
                a1[r] = _mm256_fmadd_ps(v1, kv, a1[r]);
                a2[r] = _mm256_fmadd_ps(v2, kv, a2[r]);
            }
            c += 8;
        }
        [reduce8(a1), reduce8(a2)]
    }

    /// Eight scores of keys g..g + 8, scaled, those outside a..z set to −∞.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn masked(sc: __m256, scale: f32, g: usize, a: usize, z: usize) -> __m256 {
        let sc = _mm256_mul_ps(sc, _mm256_set1_ps(scale));
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let (av, zv) = (_mm256_set1_epi32(a as i32), _mm256_set1_epi32(z as i32));
        let idx = _mm256_add_epi32(_mm256_set1_epi32(g as i32), lanes);
        let out = _mm256_or_si256(
            _mm256_cmpgt_epi32(av, idx),
            _mm256_cmpgt_epi32(_mm256_add_epi32(idx, _mm256_set1_epi32(1)), zv),
        );
        _mm256_blendv_ps(
            sc,
            _mm256_set1_ps(f32::NEG_INFINITY),
            _mm256_castsi256_ps(out),
        )
    }

    /// The online-softmax step of one row whose masked scores of keys g0..g1 are in `s`
    /// with lane maxima `mx`: the scores become e^(s − m_new), `l` and `o` are rescaled.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn softmax_step(
        mx: __m256,
        m: &mut f32,
        l: &mut f32,
        o: &mut [f32],
        s: &mut [f32],
        g0: usize,
        g1: usize,
    ) {
        let mut lanes_max = [0f32; 8];
        _mm256_storeu_ps(lanes_max.as_mut_ptr(), mx);
        let mx = lanes_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let m_new = m.max(mx);
        let alpha = if *m == f32::NEG_INFINITY {
            0.0
        } else {
            (*m - m_new).exp()
        };
        let mv = _mm256_set1_ps(m_new);
        let mut sum = _mm256_setzero_ps();
        let mut g = g0;
        while g < g1 {
            let p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(g)), mv));
            _mm256_storeu_ps(s.as_mut_ptr().add(g), p);
            sum = _mm256_add_ps(sum, p);
            g += 8;
        }
        let mut lanes_sum = [0f32; 8];
        _mm256_storeu_ps(lanes_sum.as_mut_ptr(), sum);
        *l = *l * alpha + lanes_sum.iter().sum::<f32>();
        if alpha != 1.0 {
            for x in o.iter_mut() {
                *x *= alpha;
            }
        }
        *m = m_new;
    }

    /// `pv_strip` for two rows, each value vector loaded once for both.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv_strip2<const N: usize>(
        o: [*mut f32; 2],
        p: [&[f32]; 2],
        v: *const f32,
        dim: usize,
        a: usize,
        z: usize,
    ) {
        let mut a1 = [_mm256_setzero_ps(); N];
        let mut a2 = [_mm256_setzero_ps(); N];
        for t in 0..N {
            a1[t] = _mm256_loadu_ps(o[0].add(8 * t));
            a2[t] = _mm256_loadu_ps(o[1].add(8 * t));
        }
        for (j, (&x1, &x2)) in p[0].iter().zip(p[1]).enumerate().take(z).skip(a) {
            let (p1, p2) = (_mm256_set1_ps(x1), _mm256_set1_ps(x2));
            let row = v.add(j * dim);
            for t in 0..N {
                let vv = _mm256_loadu_ps(row.add(8 * t));
                a1[t] = _mm256_fmadd_ps(p1, vv, a1[t]);
                a2[t] = _mm256_fmadd_ps(p2, vv, a2[t]);
            }
        }
        for t in 0..N {
            _mm256_storeu_ps(o[0].add(8 * t), a1[t]);
            _mm256_storeu_ps(o[1].add(8 * t), a2[t]);
        }
    }

    /// `scalar_row_block` with AVX2: scores eight keys at a time, the exponentials in
    /// vectors, the weighted sum of V in strips of 64 outputs held in registers.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `dim` is a multiple of 8; `kf`/`vf` hold whole groups
    /// of 8 rows covering `a..z`; `s` holds them too.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_block(
        r: &RowBlock,
        m: &mut f32,
        l: &mut f32,
        o: &mut [f32],
        s: &mut [f32],
    ) {
        let dim = r.dim;
        let (g0, g1) = (r.a / 8 * 8, r.z.div_ceil(8) * 8);
        debug_assert!(g1 * dim <= r.kf.len() && g1 <= s.len() && dim.is_multiple_of(8));
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut g = g0;
        while g < g1 {
            let sc = dot8(r.q.as_ptr(), r.kf.as_ptr().add(g * dim), dim);
            let sc = masked(sc, r.scale, g, r.a, r.z);
            _mm256_storeu_ps(s.as_mut_ptr().add(g), sc);
            mx = _mm256_max_ps(mx, sc);
            g += 8;
        }
        softmax_step(mx, m, l, o, s, g0, g1);
        let mut c = 0;
        while c + 64 <= dim {
            pv_strip::<8>(
                o.as_mut_ptr().add(c),
                s,
                r.vf.as_ptr().add(c),
                dim,
                r.a,
                r.z,
            );
            c += 64;
        }
        while c < dim {
            pv_strip::<1>(
                o.as_mut_ptr().add(c),
                s,
                r.vf.as_ptr().add(c),
                dim,
                r.a,
                r.z,
            );
            c += 8;
        }
    }

    /// `row_block` for two query rows over the same keys (`r`'s range; the second row's
    /// query is `q2`): each K and V vector is loaded once for both, the accumulators of both
    /// held in AVX-512's 32 registers. Every row's values are `row_block`'s, bit for bit.
    ///
    /// # Safety
    /// As `row_block`, and the CPU has AVX-512 F and VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    pub(super) unsafe fn row_block2(
        r: &RowBlock,
        q2: &[f32],
        m: [&mut f32; 2],
        l: [&mut f32; 2],
        o: [&mut [f32]; 2],
        s: [&mut [f32]; 2],
    ) {
        let dim = r.dim;
        let (g0, g1) = (r.a / 8 * 8, r.z.div_ceil(8) * 8);
        debug_assert!(g1 * dim <= r.kf.len() && g1 <= s[0].len() && g1 <= s[1].len());
        debug_assert!(dim.is_multiple_of(8) && q2.len() == dim);
        let [m1, m2] = m;
        let [l1, l2] = l;
        let [o1, o2] = o;
        let [s1, s2] = s;
        let mut mx1 = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut mx2 = mx1;
        let mut g = g0;
        while g < g1 {
            let [d1, d2] = dot8x2(r.q.as_ptr(), q2.as_ptr(), r.kf.as_ptr().add(g * dim), dim);
            let sc1 = masked(d1, r.scale, g, r.a, r.z);
            let sc2 = masked(d2, r.scale, g, r.a, r.z);
            _mm256_storeu_ps(s1.as_mut_ptr().add(g), sc1);
            _mm256_storeu_ps(s2.as_mut_ptr().add(g), sc2);
            mx1 = _mm256_max_ps(mx1, sc1);
            mx2 = _mm256_max_ps(mx2, sc2);
            g += 8;
        }
        softmax_step(mx1, m1, l1, o1, s1, g0, g1);
        softmax_step(mx2, m2, l2, o2, s2, g0, g1);
        let (p1, p2) = (o1.as_mut_ptr(), o2.as_mut_ptr());
        let mut c = 0;
        while c + 64 <= dim {
            pv_strip2::<8>(
                [p1.add(c), p2.add(c)],
                [s1, s2],
                r.vf.as_ptr().add(c),
                dim,
                r.a,
                r.z,
            );
            c += 64;
        }
        while c < dim {
            pv_strip2::<1>(
                [p1.add(c), p2.add(c)],
                [s1, s2],
                r.vf.as_ptr().add(c),
                dim,
                r.a,
                r.z,
            );
            c += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::engine::kernels::test_values as random;

    /// softmax(Q·Kᵀ·scale + mask)·V in f64 from the values the cache holds (read back, so the
    /// comparison sees only the kernel's arithmetic), `[seq][n_head][dim]`, plus for each
    /// output value Σ p·|v| (the scale of its rounding error).
    fn reference(query: &Query, k: &KvStore, v: &KvStore) -> (Vec<f64>, Vec<f64>) {
        let (n_kv, dim, total) = (k.heads, k.dim, query.pos + query.seq);
        let rep = query.n_head / n_kv;
        let mut kk = vec![0f32; total * dim];
        let mut vv = vec![0f32; total * dim];
        let mut out = vec![0f64; query.seq * query.n_head * dim];
        let mut mag = out.clone();
        for h in 0..query.n_head {
            k.rows_f32(h / rep, 0, total, &mut kk);
            v.rows_f32(h / rep, 0, total, &mut vv);
            for s in 0..query.seq {
                let p = query.pos + s;
                let q = &query.q[(h * query.seq + s) * dim..][..dim];
                let scores: Vec<f64> = (0..total)
                    .map(|j| {
                        let seen = j <= p && query.window.is_none_or(|w| p - j < w);
                        if !seen {
                            return f64::NEG_INFINITY;
                        }
                        let d: f64 = (0..dim).map(|c| q[c] as f64 * kk[j * dim + c] as f64).sum();
                        d * query.scale as f64
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..dim {
                    let at = (s * query.n_head + h) * dim + c;
                    out[at] = (0..total)
                        .map(|j| e[j] * vv[j * dim + c] as f64)
                        .sum::<f64>()
                        / sum;
                    mag[at] = (0..total)
                        .map(|j| e[j] * (vv[j * dim + c] as f64).abs())
                        .sum::<f64>()
                        / sum;
                }
            }
        }
        (out, mag)
    }

    /// Every inner-loop choice this CPU runs.
    fn simds() -> Vec<Simd> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut v = vec![Simd::Scalar];
        #[cfg(target_arch = "x86_64")]
        if simd_for(64) != Simd::Scalar {
            v.push(Simd::Avx2);
            if simd_for(64) == Simd::Avx512 {
                v.push(Simd::Avx512);
            }
        }
        v
    }

    struct Case {
        n_head: usize,
        n_kv: usize,
        dim: usize,
        pos: usize,
        seq: usize,
        window: Option<usize>,
    }

    fn cache(ty: KvType, n_kv: usize, dim: usize, total: usize, seed: u64) -> KvStore {
        let mut c = KvStore::new(ty, n_kv, dim).unwrap();
        // Filled in two appends (the second of one position when decode-sized), so that
        // growth keeps what was written.
        let first = total / 2;
        let x = random(n_kv * first * dim, seed);
        c.append(&x, first, total).unwrap();
        let rest = total - first;
        let mut x = random(n_kv * rest * dim, seed + 1);
        // Larger values in some keys so the softmax is not flat.
        for x in x.iter_mut().step_by(7) {
            *x *= 4.0;
        }
        c.append(&x, rest, total).unwrap();
        c
    }

    /// The fused kernel, every instruction set this CPU runs and every cache type, against the
    /// f64 reference on the same cached values, in decode and prefill shapes: with and without
    /// GQA, at depth (split-K), with sliding windows shorter and longer than the depth, and
    /// head sizes of 64, 256 and 80 (not a multiple of 64: the AVX2 tail strips). Tolerance:
    /// 2e-5 of Σ p·|v| plus 1e-6 (f32 accumulation over a few thousand keys).
    #[test]
    fn fused_attention_matches_f64_reference() {
        let cases = [
            // decode, GQA 3:1, at depth (split-K)
            Case {
                n_head: 9,
                n_kv: 3,
                dim: 64,
                pos: 3000,
                seq: 1,
                window: None,
            },
            // decode, one KV head for 4 query heads, head size 256, windowed and global
            Case {
                n_head: 4,
                n_kv: 1,
                dim: 256,
                pos: 1500,
                seq: 1,
                window: Some(512),
            },
            Case {
                n_head: 4,
                n_kv: 1,
                dim: 256,
                pos: 1500,
                seq: 1,
                window: None,
            },
            // prefill chunk from empty and at depth, causal inside the chunk
            Case {
                n_head: 9,
                n_kv: 3,
                dim: 64,
                pos: 0,
                seq: 77,
                window: None,
            },
            Case {
                n_head: 4,
                n_kv: 1,
                dim: 256,
                pos: 700,
                seq: 100,
                window: Some(64),
            },
            Case {
                n_head: 2,
                n_kv: 2,
                dim: 80,
                pos: 33,
                seq: 40,
                window: Some(50),
            },
            // a window longer than the context: no key is cut
            Case {
                n_head: 4,
                n_kv: 2,
                dim: 64,
                pos: 5,
                seq: 3,
                window: Some(4096),
            },
            // first token
            Case {
                n_head: 4,
                n_kv: 2,
                dim: 64,
                pos: 0,
                seq: 1,
                window: None,
            },
        ];
        for (ci, c) in cases.iter().enumerate() {
            let total = c.pos + c.seq;
            for ty in [KvType::F16, KvType::Q8_0, KvType::F32] {
                if ty == KvType::Q8_0 && c.dim % 32 != 0 {
                    assert!(KvStore::new(ty, c.n_kv, c.dim).is_err());
                    continue;
                }
                let k = cache(ty, c.n_kv, c.dim, total, 10 + ci as u64);
                let v = cache(ty, c.n_kv, c.dim, total, 20 + ci as u64);
                let q = random(c.n_head * c.seq * c.dim, 30 + ci as u64);
                let query = Query {
                    q: &q,
                    n_head: c.n_head,
                    seq: c.seq,
                    pos: c.pos,
                    window: c.window,
                    scale: 1.0 / (c.dim as f32).sqrt(),
                    sinks: None,
                };
                let (want, mag) = reference(&query, &k, &v);
                for simd in simds() {
                    for threads in [1, 2, 8] {
                        let got = attend_with(simd, &query, &k, &v, threads).unwrap();
                        assert_eq!(got.len(), want.len());
                        for (i, ((&g, &w), &m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                            assert!(
                                (g as f64 - w).abs() <= 2e-5 * m + 1e-6,
                                "case {ci} {ty:?} {simd:?} threads {threads} [{i}]: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The paired-row kernel (`Simd::Avx512`) gives each row exactly `Avx2`'s values: same
    /// products, same order, only loaded once for two rows. Skipped where the CPU has no
    /// AVX-512.
    #[test]
    fn paired_rows_equal_single_rows_bit_for_bit() {
        if !simds().iter().any(|s| format!("{s:?}") == "Avx512") {
            eprintln!("SKIPPED: no AVX-512 on this CPU");
            return;
        }
        #[cfg(target_arch = "x86_64")]
        // (n_head, n_kv, dim, pos, seq, window): odd and even heads per KV head, prefill and
        // decode, at depth, windowed, head sizes with and without a 64-wide strip.
        for (ci, (n_head, n_kv, dim, pos, seq, window)) in [
            (9, 3, 64, 0, 77, None::<usize>),
            (32, 8, 128, 300, 40, None),
            (32, 4, 128, 2000, 1, None),
            (4, 1, 256, 700, 30, Some(64)),
            (6, 2, 80, 33, 12, Some(50)),
            (2, 2, 64, 10, 5, None),
        ]
        .into_iter()
        .enumerate()
        {
            let total = pos + seq;
            let k = cache(KvType::F16, n_kv, dim, total, 40 + ci as u64);
            let v = cache(KvType::F16, n_kv, dim, total, 50 + ci as u64);
            let q = random(n_head * seq * dim, 60 + ci as u64);
            let query = Query {
                q: &q,
                n_head,
                seq,
                pos,
                window,
                scale: 1.0 / (dim as f32).sqrt(),
                sinks: None,
            };
            for threads in [1, 2] {
                let single = attend_with(Simd::Avx2, &query, &k, &v, threads).unwrap();
                let paired = attend_with(Simd::Avx512, &query, &k, &v, threads).unwrap();
                let (a, b): (Vec<u32>, Vec<u32>) = (
                    single.iter().map(|x| x.to_bits()).collect(),
                    paired.iter().map(|x| x.to_bits()).collect(),
                );
                assert_eq!(a, b, "case {ci}, {threads} threads");
            }
        }
    }

    /// What an f16 cache costs in accuracy against exact f32 keys and values: f16 keeps 11
    /// significant bits, so outputs move by about 2⁻¹¹ of their scale (llama.cpp's default
    /// cache makes the same rounding); q8_0 by about 1/127 of each block's largest value.
    #[test]
    fn cache_rounding_is_bounded() {
        let (n_kv, dim, pos, seq) = (2, 64, 300, 20);
        let total = pos + seq;
        let exact_k = cache(KvType::F32, n_kv, dim, total, 1);
        let exact_v = cache(KvType::F32, n_kv, dim, total, 2);
        let q = random(4 * seq * dim, 3);
        let query = Query {
            q: &q,
            n_head: 4,
            seq,
            pos,
            window: None,
            scale: 0.125,
            sinks: None,
        };
        let (want, mag) = reference(&query, &exact_k, &exact_v);
        for (ty, tol) in [(KvType::F16, 2e-3), (KvType::Q8_0, 3e-2)] {
            let k = cache(ty, n_kv, dim, total, 1);
            let v = cache(ty, n_kv, dim, total, 2);
            let got = attend(&query, &k, &v).unwrap();
            let worst = got
                .iter()
                .zip(&want)
                .zip(&mag)
                .map(|((&g, &w), &m)| (g as f64 - w).abs() / m.max(1e-3))
                .fold(0.0, f64::max);
            assert!(worst < tol, "{ty:?}: worst relative error {worst}");
            assert!(worst > 0.0, "{ty:?} should round something");
        }
    }

    #[test]
    fn truncate_keeps_the_prefix_and_bytes_follow_the_type() {
        let mut c = KvStore::new(KvType::F16, 2, 64).unwrap();
        let x = random(2 * 10 * 64, 5);
        c.append(&x, 10, 4096).unwrap();
        assert_eq!(c.bytes(), 2 * 256 * 64 * 2);
        c.truncate(4);
        assert_eq!(c.len(), 4);
        let y = random(2 * 300 * 64, 6);
        c.append(&y, 300, 4096).unwrap();
        assert_eq!(c.len(), 304);
        assert_eq!(c.bytes(), 2 * 512 * 64 * 2, "doubled past 256");
        // Head 1, position 2 survived the truncation and the growth.
        let mut row = vec![0f32; 64];
        c.rows_f32(1, 2, 1, &mut row);
        let want: Vec<f32> = x[(10 + 2) * 64..(10 + 3) * 64]
            .iter()
            .map(|&v| f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(row, want);
        // Head 0, position 4 is the first appended after the truncation.
        c.rows_f32(0, 4, 1, &mut row);
        assert_eq!(row[0], f16::from_f32(y[0]).to_f32());
        assert!(
            c.append(&random(2 * 64, 7), 1, 304).is_err(),
            "past max_len"
        );
        let q8 = KvStore::new(KvType::Q8_0, 2, 64).unwrap();
        assert_eq!(KvType::Q8_0.row_bytes(64), 68);
        assert_eq!(q8.bytes(), 0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_two_ulp() {
        if simd_for(64) == Simd::Scalar {
            eprintln!("SKIPPED: no AVX2 on this CPU");
            return;
        }
        use std::arch::x86_64::*;
        let mut worst = 0f32;
        for i in 0..20000 {
            let x = -87.0 + i as f32 * (87.0 / 20000.0);
            let xs = [x, x * 0.5, x * 0.1, x * 0.01, 0.0, -1e-7, x * 0.9, x * 0.3];
            let mut out = [0f32; 8];
            // SAFETY: the CPU has AVX2 (checked above).
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(xs.as_ptr()))) };
            for (o, x) in out.iter().zip(xs) {
                let want = (x as f64).exp();
                worst = worst.max(((*o as f64 - want).abs() / want) as f32);
            }
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        let mut out = [1f32; 8];
        // SAFETY: as above.
        unsafe {
            _mm256_storeu_ps(
                out.as_mut_ptr(),
                avx2::exp8(_mm256_set1_ps(f32::NEG_INFINITY)),
            )
        };
        assert_eq!(out, [0.0; 8]);
    }
}
