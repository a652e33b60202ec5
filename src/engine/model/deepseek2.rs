//! DeepSeek-V2 / V3 / R1 (llama.cpp's `LLM_ARCH_DEEPSEEK2`, src/models/deepseek2.cpp): what it
//! adds to the shared transformer, following llama.cpp:
//! - multi-head latent attention (MLA): the query from `attn_q` or through a LoRA
//!   (`attn_q_a`, `attn_q_a_norm`, `attn_q_b`); per token one latent `c_kv` (kv_lora_rank
//!   values, normed by `attn_kv_a_norm`) and one rotary key `k_pe` shared by every head, both
//!   from `attn_kv_a_mqa`; each head's query split into a "nope" part and a rotary part;
//! - the up-projections absorbed as llama.cpp's MLA path does: the nope query goes through
//!   `attn_k_b` into latent space, attention runs as one KV head of [c_kv, k_pe] whose values
//!   are c_kv itself, and each head's output goes through `attn_v_b`. The KV cache therefore
//!   holds kv_lora_rank + rope values per token and layer, as llama.cpp's does. Older files
//!   with one `attn_kv_b` are split into the same two projections at load;
//! - the fused CPU attention kernel (model/attention.rs) runs it with K and V the same store
//!   (the values are the first kv_lora_rank columns of each key row; the rotary tail of the
//!   output is dropped);
//! - YaRN with DeepSeek's mscale (`rope.scaling.yarn_log_multiplier`) folded into the score
//!   scale as llama.cpp does; GGML's "normal" rope layout (adjacent pairs);
//! - leading dense layers (`leading_dense_block_count`), then MoE layers with shared experts
//!   (`ffn_*_shexp`) and DeepSeek's routing: softmax or sigmoid scores
//!   (`expert_gating_func`), an optional score-correction bias (`exp_probs_b`) used to choose
//!   but not to weigh, expert groups (`expert_group_count` / `expert_group_used_count`),
//!   optional renormalisation (`expert_weights_norm`) and the routed scaling factor
//!   (`expert_weights_scale`).

use super::kernels::{self, Job, Packed};
use super::moe::{self, split_experts, Gating};
use super::{
    attention, attention_mask, cached_attention, candle_type, check_finite, check_shape, fetch,
    ff_width, gpt_oss, load_parallel, matrix, norm, Act, Embedding, GateUp, Gguf, HParams, KvCache,
    Matrix, Mlp, Rope,
};
use crate::protocol::KvTypes;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

/// llama.cpp's `LLAMA_EXPERT_GATING_FUNC_TYPE_*` values.
const GATING_SOFTMAX: u32 = 1;
const GATING_SIGMOID: u32 = 2;

/// DeepSeek's hyper-parameters on top of the common ones.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaParams {
    /// 0: the query comes from a plain `attn_q` (V2-Lite).
    pub q_lora: usize,
    pub kv_lora: usize,
    /// Per head: the query / key dimensions without and with rotary embedding, and the value's.
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
    /// The softmax scale, with YaRN's mscale² folded in as llama.cpp does.
    pub kq_scale: f32,
    /// The first layers are dense; the rest MoE.
    pub dense_lead: usize,
    pub routing: Routing,
}

/// How the router's logits choose experts and weigh them (llama.cpp's build_moe_ffn).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routing {
    pub sigmoid: bool,
    pub norm: bool,
    pub scale: f32,
    pub groups: usize,
    pub groups_used: usize,
}

impl MlaParams {
    /// Values per token and layer in the cache: the latent and the rotary key.
    fn latent_dim(&self) -> usize {
        self.kv_lora + self.rope
    }

    /// `HParams::context_bytes` for this cache: one row of kv_lora + rope values per token
    /// and layer (K and V are the same store on the CPU; a GPU keeps two f32 copies).
    pub(super) fn context_bytes(
        &self,
        hp: &HParams,
        n_ctx: usize,
        chunk: usize,
        kv: Option<KvTypes>,
    ) -> u64 {
        let f = 4u64;
        let (ctx, chunk) = (n_ctx as u64, chunk.min(n_ctx) as u64);
        let dim = self.latent_dim();
        let layers = hp.n_layer as u64;
        let (cache, scratch) = match kv {
            Some(t) => (
                layers
                    .saturating_mul(ctx)
                    .saturating_mul(t.k.row_bytes(dim) as u64),
                4u64.saturating_mul(chunk)
                    .saturating_mul((hp.n_head * dim) as u64)
                    .saturating_mul(f),
            ),
            None => (
                layers
                    .saturating_mul(ctx)
                    .saturating_mul(2 * dim as u64 * f),
                (hp.n_head as u64 + 1)
                    .saturating_mul(chunk)
                    .saturating_mul(ctx)
                    .saturating_mul(f),
            ),
        };
        let tables = 2u64
            .saturating_mul(ctx)
            .saturating_mul(self.rope as u64 / 2)
            .saturating_mul(f);
        cache.saturating_add(scratch).saturating_add(tables)
    }
}

/// ggml's get_mscale in llama-context.cpp.
fn get_mscale(scale: f32, mscale: f32) -> f32 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// DeepSeek's hyper-parameters (llama_model_deepseek2::load_arch_hparams), its YaRN (the
/// `cparams.yarn_attn_factor` llama-context.cpp derives) and the score scale its graph uses.
pub(super) fn hparams(g: &Gguf, mut hp: HParams) -> Result<HParams> {
    let p = hp.arch.as_str();
    let key = |k: &str| format!("{p}.{k}");
    let file = g.path.display();
    let vocab = g.tensor_dims("token_embd.weight").map_or(0, |d| d[0]);
    // llama.cpp reads no q_lora_rank for the "lite" layer counts (V2-Lite and kin).
    let lite = hp.n_layer == 27 || hp.n_layer == 26 || (hp.n_layer == 48 && vocab == 128_256);
    let q_lora = if lite {
        0
    } else {
        g.get_u32(&key("attention.q_lora_rank")).unwrap_or(0) as usize
    };
    let kv_lora = g
        .get_u32(&key("attention.kv_lora_rank"))
        .with_context(|| format!("{file} lacks {p}.attention.kv_lora_rank, which DeepSeek needs"))?
        as usize;
    let mla_k = g.get_u32(&key("attention.key_length_mla")).unwrap_or(0) as usize;
    let mla_v = g.get_u32(&key("attention.value_length_mla")).unwrap_or(0) as usize;
    // Files with the split attn_k_b / attn_v_b carry the per-head sizes under the _mla keys
    // (key_length is then the latent's); older ones have them as key_length / value_length.
    let (k_dim, v_dim) = if mla_k != 0 && mla_v != 0 {
        (mla_k, mla_v)
    } else {
        (
            hp.head_dim,
            g.get_u32(&key("attention.value_length"))
                .map_or(hp.head_dim, |v| v as usize),
        )
    };
    let rope = hp.rope_dim;
    if kv_lora == 0 || v_dim == 0 || k_dim <= rope {
        bail!(
            "{file}: {p}.attention.kv_lora_rank {kv_lora}, key length {k_dim}, value length {v_dim} and rope.dimension_count {rope} do not make MLA heads"
        );
    }
    let dense_lead = g.get_u32(&key("leading_dense_block_count")).unwrap_or(0) as usize;
    if dense_lead > hp.n_layer {
        bail!(
            "{file}: {p}.leading_dense_block_count is {dense_lead} of {} blocks",
            hp.n_layer
        );
    }
    let sigmoid = match g.get_u32(&key("expert_gating_func")).unwrap_or(0) {
        0 | GATING_SOFTMAX => false,
        GATING_SIGMOID => true,
        other => bail!(
            "{file}: {p}.expert_gating_func is {other}; tokentop runs softmax ({GATING_SOFTMAX}) and sigmoid ({GATING_SIGMOID})"
        ),
    };
    let groups = g.get_u32(&key("expert_group_count")).unwrap_or(0) as usize;
    let groups_used = g.get_u32(&key("expert_group_used_count")).unwrap_or(0) as usize;
    let routing = Routing {
        sigmoid,
        norm: g.get_bool(&key("expert_weights_norm")).unwrap_or(false),
        scale: g.get_f32(&key("expert_weights_scale")).unwrap_or(0.0),
        groups,
        groups_used,
    };
    if dense_lead < hp.n_layer {
        let (n, k) = (hp.n_expert, hp.n_expert_used);
        if n < 1 || k == 0 || k > n {
            bail!("{file}: {p}.expert_count {n} and expert_used_count {k} do not make a mixture of experts");
        }
        if groups > 1
            && (!n.is_multiple_of(groups)
                || groups_used == 0
                || groups_used > groups
                || groups_used * (n / groups) < k)
        {
            bail!(
                "{file}: {p}.expert_group_count {groups} and expert_group_used_count {groups_used} cannot route {k} of {n} experts"
            );
        }
        if !routing.scale.is_finite() {
            bail!("{file}: {p}.expert_weights_scale is {}", routing.scale);
        }
    }
    // YaRN as llama-context.cpp sets it up for DeepSeek: the converter stores
    // 0.1 × mscale_all_dim as yarn_log_multiplier.
    let log_mul = g
        .get_f32(&key("rope.scaling.yarn_log_multiplier"))
        .map_or(0.0, |v| v / 0.1);
    let rope_attn = g.get_f32(&key("rope.scaling.attn_factor")).unwrap_or(1.0);
    let mut kq_mscale = rope_attn;
    if g.get_str(&key("rope.scaling.type")) == Some("yarn") {
        let factor = g.get_f32(&key("rope.scaling.factor")).unwrap_or(0.0);
        if !factor.is_finite() || factor < 0.0 {
            bail!("{file}: {p}.rope.scaling.factor is {factor}, not a valid scaling factor");
        }
        let freq_scale = if factor == 0.0 { 1.0 } else { 1.0 / factor };
        let factor = 1.0 / freq_scale;
        let mut attn = if log_mul != 0.0 {
            let mscale = if log_mul != 1.0 { log_mul } else { 1.0 };
            get_mscale(factor, mscale) / get_mscale(factor, log_mul)
        } else {
            get_mscale(factor, 1.0)
        };
        attn *= 1.0 / (1.0 + 0.1 * factor.ln());
        attn *= rope_attn;
        // The graph undoes the cancel, then multiplies in the log-multiplier's mscale.
        let attn_org = attn * (1.0 + 0.1 * (1.0 / freq_scale).ln());
        kq_mscale = attn_org * (1.0 + 0.1 * log_mul * (1.0 / freq_scale).ln());
        let orig_ctx = g
            .get_u32(&key("rope.scaling.original_context_length"))
            .map_or(hp.train_ctx, |v| v as usize);
        if orig_ctx == 0 || !attn.is_finite() || !kq_mscale.is_finite() {
            bail!("{file}: {p}.rope.scaling.* do not make a valid YaRN");
        }
        hp.yarn = Some(gpt_oss::Yarn {
            freq_scale,
            orig_ctx,
            ext_factor: 1.0,
            attn_factor: attn,
            beta_fast: g
                .get_f32(&key("rope.scaling.yarn_beta_fast"))
                .unwrap_or(32.0),
            beta_slow: g
                .get_f32(&key("rope.scaling.yarn_beta_slow"))
                .unwrap_or(1.0),
        });
    }
    let kq_scale = kq_mscale * kq_mscale / (k_dim as f32).sqrt();
    // tokentop's cache: one KV head of the latent and the rotary key.
    hp.n_kv_head = 1;
    hp.head_dim = kv_lora + rope;
    hp.mla = Some(MlaParams {
        q_lora,
        kv_lora,
        nope: k_dim - rope,
        rope,
        v_dim,
        kq_scale,
        dense_lead,
        routing,
    });
    Ok(hp)
}

/// DeepSeek's router for one layer: its routing and its score-correction bias.
#[derive(Debug)]
struct Router {
    routing: Routing,
    bias: Option<Vec<f32>>,
}

impl Gating for Router {
    /// llama.cpp's build_moe_ffn: scores by softmax or sigmoid; the bias added for choosing
    /// only; the best `groups_used` groups by the sum of their two best biased scores; the top
    /// k of those; the unbiased scores as weights, renormalised (sum clamped to f16's smallest
    /// normal) and scaled if asked.
    fn choose(&self, logits: &[f32], k: usize) -> Vec<(usize, f32)> {
        let r = &self.routing;
        let n = logits.len();
        let probs: Vec<f32> = if r.sigmoid {
            logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect()
        } else {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
            let sum: f64 = e.iter().map(|&x| x as f64).sum();
            let inv = (1.0 / sum) as f32;
            e.iter().map(|&x| x * inv).collect()
        };
        let mut sel = match &self.bias {
            Some(b) => probs.iter().zip(b).map(|(p, b)| p + b).collect(),
            None => probs.clone(),
        };
        if r.groups > 1 && n.is_multiple_of(r.groups) {
            let per = n / r.groups;
            let score: Vec<f32> = sel
                .chunks(per)
                .map(|g| {
                    let mut g = g.to_vec();
                    g.sort_unstable_by(|a, b| b.total_cmp(a));
                    g.iter().take(2).sum()
                })
                .collect();
            let mut order: Vec<usize> = (0..r.groups).collect();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
            for &g in &order[r.groups_used.min(r.groups)..] {
                sel[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
            }
        }
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| sel[b].total_cmp(&sel[a]));
        let chosen = &idx[..k.min(n)];
        let mut w: Vec<f32> = chosen.iter().map(|&e| probs[e]).collect();
        if r.norm {
            let sum = w.iter().sum::<f32>().max(6.103_515_6e-5);
            w.iter_mut().for_each(|x| *x /= sum);
        }
        if r.scale != 0.0 && r.scale != 1.0 {
            w.iter_mut().for_each(|x| *x *= r.scale);
        }
        chosen.iter().copied().zip(w).collect()
    }
}

#[derive(Debug)]
enum QProj {
    Plain(Matrix),
    Lora { a: Matrix, norm: Tensor, b: Matrix },
}

/// The latent cache of one layer: on the CPU one store of kv_lora + rope values per token
/// (keys and values both), on a GPU the shared cache with the rows as keys and values.
#[derive(Debug)]
struct Latent {
    types: KvTypes,
    host: Option<attention::KvStore>,
    device: KvCache,
}

impl Latent {
    fn new(types: KvTypes) -> Self {
        Self {
            types,
            host: None,
            device: KvCache::new(types),
        }
    }

    fn len(&self) -> usize {
        self.host.as_ref().map_or(self.device.len(), |h| h.len())
    }

    fn truncate(&mut self, n: usize) {
        if let Some(h) = &mut self.host {
            h.truncate(n);
        }
        self.device.truncate(n);
    }

    fn bytes(&self) -> usize {
        self.host.as_ref().map_or(0, |h| h.bytes()) + self.device.bytes()
    }

    /// Appends the rows `k` (1, 1, seq, dim) and attends `q` (1, heads, seq, dim) over the
    /// cache, the values being the keys: (seq, heads, dim).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        pos: usize,
        scale: f32,
        n_ctx: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, nh, seq, dim) = q.dims4()?;
        if self.len() != pos {
            bail!(
                "attention at position {pos} but the cache holds {} positions",
                self.len()
            );
        }
        if !q.device().is_cpu() {
            let out = cached_attention(
                &mut self.device,
                q,
                k,
                k,
                (pos, None, None),
                scale as f64,
                n_ctx,
                mask,
            )?;
            return Ok(out.reshape((seq, nh, dim))?);
        }
        let store = match &mut self.host {
            Some(s) => s,
            None => self
                .host
                .insert(attention::KvStore::new(self.types.k, 1, dim)?),
        };
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        store
            .append(&flat(k)?, seq, n_ctx)
            .context("appending to the KV cache")?;
        let q = flat(q)?;
        let out = attention::attend(
            &attention::Query {
                q: &q,
                n_head: nh,
                seq,
                pos,
                window: None,
                scale,
                sinks: None,
            },
            store,
            store,
        )?;
        Ok(Tensor::from_vec(out, (seq, nh, dim), k.device())?)
    }
}

#[derive(Debug)]
struct Attention {
    q: QProj,
    kv_a: Matrix,
    kv_a_norm: Tensor,
    /// Per head: (kv_lora × nope) and (v_dim × kv_lora).
    k_b: Heads,
    v_b: Heads,
    out: Matrix,
    rope: Arc<Rope>,
    cache: Latent,
}

#[derive(Debug)]
enum Ffn {
    Dense(Mlp),
    Moe { moe: moe::Moe, shared: Mlp },
}

#[derive(Debug)]
struct Block {
    attn_norm: Tensor,
    attn: Attention,
    ffn_norm: Tensor,
    ffn: Ffn,
}

/// The layers of a DeepSeek model and the conversation their caches hold.
pub(super) struct Stack {
    mla: MlaParams,
    blocks: Vec<Block>,
}

/// One projection per head.
#[derive(Debug)]
enum Heads {
    /// The file's stacked tensor as one matrix per head.
    Each(Vec<Matrix>),
    /// Split from an older file's attn_kv_b: (heads, rows, cols) in f32, one batched product.
    Stacked(Tensor),
}

/// Head h of x (heads, seq, k) through head h's matrix: (heads, seq, n). Block-kernel
/// matrices of one kind run as one parallel region (one job per head), other types one head
/// at a time.
fn per_head(heads: &Heads, x: &Tensor) -> Result<Tensor> {
    let ms = match heads {
        Heads::Each(ms) => ms,
        Heads::Stacked(w) => return Ok(x.contiguous()?.matmul(&w.t()?)?),
    };
    let (nh, seq, k) = x.dims3()?;
    if ms.len() != nh {
        bail!("{} head matrices for {nh} heads", ms.len());
    }
    let packed: Option<Vec<&Packed>> = ms
        .iter()
        .map(|m| match m {
            Matrix::Blocks(p) => Some(p.as_ref()),
            _ => None,
        })
        .collect();
    if let (Some(p), true) = (packed, x.device().is_cpu()) {
        if p.iter()
            .all(|w| w.kind == p[0].kind && w.k == k && w.n == p[0].n)
        {
            let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let jobs: Vec<Job> = p
                .iter()
                .enumerate()
                .map(|(h, w)| Job {
                    w,
                    x: &xs[h * seq * k..(h + 1) * seq * k],
                })
                .collect();
            let ys = kernels::matmul_jobs(&jobs).concat();
            return Ok(Tensor::from_vec(ys, (nh, seq, p[0].n), x.device())?);
        }
    }
    let outs = (0..nh)
        .map(|h| ms[h].forward(&x.get(h)?.contiguous()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&outs, 0)?)
}

/// A stacked (heads, rows, cols) tensor as one matrix per head.
fn head_matrices(g: &Gguf, name: &str, shape: [usize; 3], dev: &Device) -> Result<Heads> {
    if let Some(ms) = Matrix::iq_matrices(g, name, &shape, dev)? {
        return Ok(Heads::Each(ms));
    }
    check_shape(g, name, &shape)?;
    if !g.has_tensor(name) {
        bail!(
            "{} lacks the tensor {name} its architecture needs",
            g.path.display()
        );
    }
    let dtype = candle_type(g, name)?;
    let (_, dims, raw) = g.raw(name)?;
    split_experts(dtype, raw, dims, dev, |b| g.release_bytes(b)).map(Heads::Each)
}

/// An older file's `attn_kv_b` (heads × (nope + v) rows of kv_lora) split into llama.cpp's
/// `attn_k_b` (per head the nope rows transposed) and `attn_v_b` (the v rows), in f32.
fn split_kv_b(
    g: &Gguf,
    name: &str,
    m: &MlaParams,
    nh: usize,
    dev: &Device,
) -> Result<(Heads, Heads)> {
    let per = m.nope + m.v_dim;
    let w = fetch(g, name, &[nh * per, m.kv_lora], &Device::Cpu)?.dequantize(&Device::Cpu)?;
    g.release(name);
    check_finite(g, name, &w)?;
    let w = w.reshape((nh, per, m.kv_lora))?;
    let k_b = w.narrow(1, 0, m.nope)?.transpose(1, 2)?.contiguous()?;
    let v_b = w.narrow(1, m.nope, m.v_dim)?.contiguous()?;
    Ok((
        Heads::Stacked(k_b.to_device(dev)?),
        Heads::Stacked(v_b.to_device(dev)?),
    ))
}

impl Stack {
    pub(super) fn load(g: &Gguf, hp: &HParams, n_ctx: usize, dev: &Device) -> Result<Self> {
        let m = hp
            .mla
            .clone()
            .context("a DeepSeek model without its MLA parameters")?;
        let (e, nh) = (hp.n_embd, hp.n_head);
        let file = g.path.display();
        let mut rope = gpt_oss::rope(hp, hp.rope_base, n_ctx, dev)?;
        rope.neox = false;
        let rope = Arc::new(rope);
        let vec_f32 = |g: &Gguf, name: &str, len: usize| -> Result<Tensor> {
            let t = fetch(g, name, &[len], dev)?.dequantize(dev)?;
            g.release(name);
            check_finite(g, name, &t)?;
            Ok(t)
        };
        let qmm = |g: &Gguf, name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            matrix(g, name, rows, cols, dev)
        };
        let mlp = |g: &Gguf, p: &str, suffix: &str| -> Result<Mlp> {
            let name = |part: &str| format!("{p}.{part}{suffix}.weight");
            let ff = ff_width(g, &name("ffn_gate"), e, 1)?;
            Ok(Mlp {
                gate_up: GateUp::Separate {
                    gate: qmm(g, &name("ffn_gate"), ff, e)?,
                    up: qmm(g, &name("ffn_up"), ff, e)?,
                },
                down: qmm(g, &name("ffn_down"), e, ff)?,
                act: Act::Silu,
            })
        };
        let kd = m.nope + m.rope;
        let load_block = |i: usize| -> Result<Block> {
            let p = format!("blk.{i}");
            let n = |s: &str| format!("{p}.{s}");
            let q = if m.q_lora > 0 {
                QProj::Lora {
                    a: qmm(g, &n("attn_q_a.weight"), m.q_lora, e)?,
                    norm: vec_f32(g, &n("attn_q_a_norm.weight"), m.q_lora)?,
                    b: qmm(g, &n("attn_q_b.weight"), nh * kd, m.q_lora)?,
                }
            } else {
                QProj::Plain(qmm(g, &n("attn_q.weight"), nh * kd, e)?)
            };
            let (k_b, v_b) = if g.has_tensor(&n("attn_k_b.weight")) {
                (
                    head_matrices(g, &n("attn_k_b.weight"), [nh, m.kv_lora, m.nope], dev)?,
                    head_matrices(g, &n("attn_v_b.weight"), [nh, m.v_dim, m.kv_lora], dev)?,
                )
            } else if g.has_tensor(&n("attn_kv_b.weight")) {
                split_kv_b(g, &n("attn_kv_b.weight"), &m, nh, dev)?
            } else {
                bail!(
                    "{file} lacks the tensor {} its architecture needs",
                    n("attn_k_b.weight")
                );
            };
            let attn = Attention {
                q,
                kv_a: qmm(g, &n("attn_kv_a_mqa.weight"), m.kv_lora + m.rope, e)?,
                kv_a_norm: vec_f32(g, &n("attn_kv_a_norm.weight"), m.kv_lora)?,
                k_b,
                v_b,
                out: qmm(g, &n("attn_output.weight"), e, nh * m.v_dim)?,
                rope: rope.clone(),
                cache: Latent::new(KvTypes::default()),
            };
            let ffn = if i < m.dense_lead {
                Ffn::Dense(mlp(g, &p, "")?)
            } else {
                shape_checked_router(g, &p, hp)?;
                let bias_name = n("exp_probs_b.bias");
                let bias = if g.has_tensor(&bias_name) {
                    let t = vec_f32(g, &bias_name, hp.n_expert)?;
                    Some(t.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
                } else {
                    None
                };
                let moe =
                    moe::Moe::load(g, &p, hp, Act::Silu, dev)?.with_gating(Arc::new(Router {
                        routing: m.routing,
                        bias,
                    }));
                Ffn::Moe {
                    moe,
                    shared: mlp(g, &p, "_shexp")?,
                }
            };
            Ok(Block {
                attn_norm: vec_f32(g, &n("attn_norm.weight"), e)?,
                attn,
                ffn_norm: vec_f32(g, &n("ffn_norm.weight"), e)?,
                ffn,
            })
        };
        let blocks = load_parallel(hp.n_layer, load_block)?;
        Ok(Self { mla: m, blocks })
    }

    pub(super) fn cached_len(&self) -> usize {
        self.blocks.first().map_or(0, |b| b.attn.cache.len())
    }

    pub(super) fn truncate(&mut self, len: usize) {
        for b in &mut self.blocks {
            b.attn.cache.truncate(len);
        }
    }

    /// Empties the caches and keeps them in `types` from now on (the latent takes the key
    /// type: it is keys and values both).
    pub(super) fn set_kv_types(&mut self, types: KvTypes) -> Result<()> {
        attention::KvStore::new(types.k, 1, self.mla.latent_dim())?;
        for b in &mut self.blocks {
            b.attn.cache = Latent::new(types);
        }
        Ok(())
    }

    pub(super) fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.attn.cache.bytes()).sum()
    }

    /// The hidden states (1, seq, d) of `tokens` after the last layer; fills the caches.
    pub(super) fn hidden(
        &mut self,
        tokens: &[u32],
        embed: &Embedding,
        hp: &HParams,
        n_ctx: usize,
        dev: &Device,
    ) -> Result<Tensor> {
        let pos = self.cached_len();
        let mask = if dev.is_cpu() {
            None
        } else {
            attention_mask(tokens.len(), pos, None, dev)?
        };
        let mut x = embed.lookup(tokens, dev)?;
        for b in &mut self.blocks {
            let h = norm(&x, &b.attn_norm, hp.rms_eps)?;
            let a = b
                .attn
                .forward(&h, &self.mla, hp, n_ctx, pos, mask.as_ref())?;
            x = (x + a)?;
            let h = norm(&x, &b.ffn_norm, hp.rms_eps)?;
            let f = match &b.ffn {
                Ffn::Dense(mlp) => mlp.forward(&h)?,
                Ffn::Moe { moe, shared } => (moe.forward(&h)? + shared.forward(&h)?)?,
            };
            x = (x + f)?;
        }
        Ok(x)
    }
}

/// The router's shape, named when wrong (Moe::load reads it).
fn shape_checked_router(g: &Gguf, p: &str, hp: &HParams) -> Result<()> {
    let name = format!("{p}.ffn_gate_inp.weight");
    match g.tensor_dims(&name) {
        Some(d) if d == [hp.n_expert, hp.n_embd] => Ok(()),
        other => bail!(
            "{}: tensor {name} has shape {} but {}.expert_count is {} (expected [{}, {}])",
            g.path.display(),
            other.map_or("(missing)".to_string(), |d| format!("{d:?}")),
            hp.arch.as_str(),
            hp.n_expert,
            hp.n_expert,
            hp.n_embd
        ),
    }
}

impl Attention {
    fn forward(
        &mut self,
        h: &Tensor,
        m: &MlaParams,
        hp: &HParams,
        n_ctx: usize,
        pos: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, seq, _) = h.dims3()?;
        if b != 1 {
            bail!("DeepSeek attention runs one sequence at a time, not {b}");
        }
        let (nh, eps) = (hp.n_head, hp.rms_eps);
        let q = match &self.q {
            QProj::Plain(w) => w.forward(h)?,
            QProj::Lora { a, norm: w, b } => b.forward(&norm(&a.forward(h)?, w, eps)?)?,
        };
        let q = q
            .reshape((seq, nh, m.nope + m.rope))?
            .transpose(0, 1)?
            .contiguous()?;
        let q_nope = q.narrow(D::Minus1, 0, m.nope)?.contiguous()?;
        let q_pe = self.rope.apply(
            &q.narrow(D::Minus1, m.nope, m.rope)?
                .contiguous()?
                .unsqueeze(0)?,
            pos,
        )?;
        let kv = self.kv_a.forward(h)?.reshape((seq, m.kv_lora + m.rope))?;
        let c = norm(
            &kv.narrow(D::Minus1, 0, m.kv_lora)?.contiguous()?,
            &self.kv_a_norm,
            eps,
        )?;
        let k_pe = self.rope.apply(
            &kv.narrow(D::Minus1, m.kv_lora, m.rope)?
                .contiguous()?
                .reshape((1, 1, seq, m.rope))?,
            pos,
        )?;
        // The nope query in latent space: per head through attn_k_b.
        let q_abs = per_head(&self.k_b, &q_nope)?.unsqueeze(0)?;
        let q = Tensor::cat(&[&q_abs, &q_pe], D::Minus1)?.contiguous()?;
        let k =
            Tensor::cat(&[&c.reshape((1, 1, seq, m.kv_lora))?, &k_pe], D::Minus1)?.contiguous()?;
        let o = self.cache.attend(&q, &k, pos, m.kq_scale, n_ctx, mask)?;
        // The values are the latent columns; back per head through attn_v_b.
        let o = o
            .narrow(D::Minus1, 0, m.kv_lora)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = per_head(&self.v_b, &o)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((1, seq, nh * m.v_dim))?;
        self.out.forward(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(sigmoid: bool) -> Routing {
        Routing {
            sigmoid,
            norm: true,
            scale: 2.5,
            groups: 4,
            groups_used: 2,
        }
    }

    /// The bias picks, the unbiased scores weigh; groups outside the best two are never
    /// chosen even when an expert there scores highest.
    #[test]
    fn v3_routing_chooses_by_bias_and_groups_and_weighs_without_bias() {
        // 8 experts in 4 groups of 2.
        let logits = [0.1f32, 0.2, 3.0, -1.0, 0.5, 0.4, -0.3, -0.2];
        let bias = vec![0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0];
        let r = Router {
            routing: routing(true),
            bias: Some(bias.clone()),
        };
        let got = r.choose(&logits, 2);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let sel: Vec<f32> = logits.iter().zip(&bias).map(|(&l, b)| sig(l) + b).collect();
        // Group scores (sum of both): g3 (biased) is best, then g1 (3.0 and -1.0) vs g2.
        let g = |i: usize| sel[2 * i] + sel[2 * i + 1];
        let mut groups = [0usize, 1, 2, 3];
        groups.sort_by(|&a, &b| g(b).total_cmp(&g(a)));
        let allowed: Vec<usize> = groups[..2]
            .iter()
            .flat_map(|&g| [2 * g, 2 * g + 1])
            .collect();
        let mut best: Vec<usize> = allowed.clone();
        best.sort_by(|&a, &b| sel[b].total_cmp(&sel[a]));
        let ids: Vec<usize> = got.iter().map(|&(e, _)| e).collect();
        assert_eq!(ids, best[..2].to_vec());
        let sum: f32 = ids.iter().map(|&e| sig(logits[e])).sum();
        for &(e, w) in &got {
            assert!((w - sig(logits[e]) / sum * 2.5).abs() < 1e-6, "expert {e}");
        }
        // Without the bias the groups and the winners change.
        let plain = Router {
            routing: routing(true),
            bias: None,
        }
        .choose(&logits, 2);
        assert_ne!(plain.iter().map(|&(e, _)| e).collect::<Vec<_>>(), ids);
    }

    /// V2-Lite's routing: softmax over all experts, top k, weights not renormalised.
    #[test]
    fn softmax_routing_keeps_the_full_softmax_weights() {
        let logits = [0.3f32, -0.2, 1.5, 0.9, 0.0, -1.0];
        let r = Router {
            routing: Routing {
                sigmoid: false,
                norm: false,
                scale: 1.0,
                groups: 0,
                groups_used: 0,
            },
            bias: None,
        };
        let got = r.choose(&logits, 2);
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert_eq!(got.iter().map(|&(e, _)| e).collect::<Vec<_>>(), [2, 3]);
        for &(e, w) in &got {
            assert!((w - logits[e].exp() / z).abs() < 1e-6);
        }
    }
}
