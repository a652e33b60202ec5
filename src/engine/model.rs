//! One decoder-only transformer that covers every supported architecture.
//!
//! Written on candle-core rather than using candle-transformers' per-architecture models
//! because those keep their KV cache private and only ever grow it by concatenation: chat
//! needs to truncate the cache back to the prefix a new turn shares with the last one, and
//! the architectures differ only in a handful of switches (fused QKV, biases, Q/K norms,
//! sandwich norms, MoE, RoPE layout, sliding windows) that read better side by side.

use super::gguf::{Gguf, Mapped};
use super::kernels::iq::{IqMatrix, IqType};
use super::kernels::{self, Kind, Packed, PackedBuffer};
use crate::protocol::KvTypes;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use std::sync::Arc;

pub(crate) mod attention;
mod deepseek2;
mod gpt_oss;
mod moe;
mod qwen35;

/// The architectures this engine runs, by their GGUF `general.architecture` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Gemma3,
    Phi3,
    /// Qwen3.5 / Qwen3.6: Gated DeltaNet layers between gated full attention (model/qwen35.rs).
    Qwen35,
    Qwen35Moe,
    /// OpenAI's gpt-oss (llama.cpp's LLM_ARCH_OPENAI_MOE).
    GptOss,
    /// DeepSeek-V2 / V3 / R1: latent attention and routed experts (model/deepseek2.rs).
    DeepSeek2,
}

impl Arch {
    pub const SUPPORTED: [&'static str; 10] = [
        "llama",
        "qwen2",
        "qwen3",
        "qwen3moe",
        "gemma3",
        "phi3",
        "qwen35",
        "qwen35moe",
        "gpt-oss",
        "deepseek2",
    ];

    pub fn from_gguf_name(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "qwen3moe" => Self::Qwen3Moe,
            "gemma3" => Self::Gemma3,
            "phi3" => Self::Phi3,
            "qwen35" => Self::Qwen35,
            "qwen35moe" => Self::Qwen35Moe,
            "gpt-oss" => Self::GptOss,
            "deepseek2" => Self::DeepSeek2,
            other => bail!(
                "unsupported architecture \"{other}\": tokentop runs {}",
                Self::SUPPORTED.join(", ")
            ),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3moe",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
            Self::Qwen35 => "qwen35",
            Self::Qwen35Moe => "qwen35moe",
            Self::GptOss => "gpt-oss",
            Self::DeepSeek2 => "deepseek2",
        }
    }

    /// GPT-NeoX rotary layout (halves) versus the GGML "normal" layout (adjacent pairs),
    /// as llama.cpp's llama_model_rope_type assigns them.
    fn rope_is_neox(self) -> bool {
        !matches!(self, Self::Llama | Self::DeepSeek2)
    }
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct HParams {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f64,
    /// The context length the model was trained for.
    pub train_ctx: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// Gemma 3: window of the local layers, and every `swa_period`-th layer is global.
    pub sliding_window: Option<usize>,
    pub swa_period: usize,
    pub rope_base_local: f32,
    pub rope_scale_global: f32,
    /// Qwen3.5's linear-attention layers (None for every other architecture).
    pub delta_net: Option<qwen35::DeltaNetParams>,
    /// YaRN context extension (`rope.scaling.type = yarn`): gpt-oss and DeepSeek.
    pub yarn: Option<gpt_oss::Yarn>,
    /// DeepSeek's latent attention and routing (None for every other architecture).
    pub mla: Option<deepseek2::MlaParams>,
}

impl HParams {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = Arch::from_gguf_name(g.architecture()?)?;
        let p = arch.as_str();
        let key = |k: &str| format!("{p}.{k}");
        let n_embd = g.require_u32(&key("embedding_length"))? as usize;
        let n_head = g.require_u32(&key("attention.head_count"))? as usize;
        let n_layer = g.require_u32(&key("block_count"))? as usize;
        if n_head == 0 || n_layer == 0 || n_embd == 0 {
            bail!(
                "{} declares an empty model (zero heads, layers or width)",
                g.path.display()
            );
        }
        let n_kv_head = g
            .get_u32(&key("attention.head_count_kv"))
            .unwrap_or(n_head as u32) as usize;
        if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            bail!(
                "{}: {n_head} attention heads cannot share {n_kv_head} KV heads",
                g.path.display()
            );
        }
        let head_dim = g
            .get_u32(&key("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(n_embd / n_head);
        let rope_dim = g
            .get_u32(&key("rope.dimension_count"))
            .map(|v| v as usize)
            .unwrap_or(head_dim)
            .min(head_dim);
        let default_base = if arch == Arch::Gemma3 {
            1_000_000.0
        } else {
            10_000.0
        };
        let sliding_window = matches!(arch, Arch::Gemma3 | Arch::GptOss)
            .then(|| {
                g.get_u32(&key("attention.sliding_window"))
                    .map(|v| v as usize)
            })
            .flatten();
        let rope_scale_global = match g.get_str(&key("rope.scaling.type")) {
            Some("linear") => g.get_f32(&key("rope.scaling.factor")).unwrap_or(1.0),
            _ => 1.0,
        };
        let delta_net = qwen35::DeltaNetParams::from_gguf(g, arch)?;
        let nextn = delta_net.as_ref().map_or(0, |d| d.nextn_layers);
        if nextn >= n_layer {
            bail!(
                "{}: {p}.nextn_predict_layers is {nextn} of {n_layer} blocks",
                g.path.display()
            );
        }
        let hp = Self {
            arch,
            n_layer: n_layer - nextn,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            rope_dim,
            rope_base: g.get_f32(&key("rope.freq_base")).unwrap_or(default_base),
            rms_eps: g
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6) as f64,
            train_ctx: g.get_u32(&key("context_length")).unwrap_or(2048) as usize,
            n_expert: g.get_u32(&key("expert_count")).unwrap_or(0) as usize,
            n_expert_used: g.get_u32(&key("expert_used_count")).unwrap_or(0) as usize,
            sliding_window,
            swa_period: 6,
            rope_base_local: g.get_f32(&key("rope.local_freq_base")).unwrap_or(10_000.0),
            rope_scale_global,
            delta_net,
            yarn: None,
            mla: None,
        };
        let hp = match arch {
            Arch::GptOss => gpt_oss::hparams(g, hp)?,
            Arch::DeepSeek2 => deepseek2::hparams(g, hp)?,
            _ => hp,
        };
        hp.check(g)?;
        Ok(hp)
    }

    /// Bounds every hyper-parameter by what the tensors provide, before anything derived
    /// from one (layers, rotary tables, KV cache) is allocated: a corrupt count is an error
    /// naming the key, never a terabyte allocation.
    fn check(&self, g: &Gguf) -> Result<()> {
        let p = self.arch.as_str();
        let file = g.path.display();
        let blocks = g
            .tensor_names()
            .filter_map(|n| {
                n.strip_prefix("blk.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .map(|i| i + 1)
            .max()
            .unwrap_or(0);
        if self.n_layer > blocks {
            bail!(
                "{file}: {p}.block_count is {} but the file has tensors for {blocks} blocks",
                self.n_layer
            );
        }
        let embd = g.tensor_dims("token_embd.weight").with_context(|| {
            format!("{file} lacks the tensor token_embd.weight its architecture needs")
        })?;
        if embd.len() != 2 || embd[1] != self.n_embd || embd[0] == 0 {
            bail!(
                "{file}: tensor token_embd.weight has shape {embd:?} but {p}.embedding_length is {} (expected [vocabulary, {}])",
                self.n_embd,
                self.n_embd
            );
        }
        let q_rows = self.n_head.checked_mul(self.head_dim);
        let kv_rows = self.n_kv_head.checked_mul(self.head_dim);
        let (Some(q_rows), Some(kv_rows)) = (q_rows, kv_rows) else {
            bail!(
                "{file}: {p}.attention.head_count {} × key_length {} overflows",
                self.n_head,
                self.head_dim
            );
        };
        if self.head_dim == 0 {
            bail!("{file}: {p}.attention.key_length is 0");
        }
        let shape = |name: &str| g.tensor_dims(name).map(<[usize]>::to_vec);
        let want_q = if self.mla.is_some() {
            // DeepSeek's projections are checked as its layers load (model/deepseek2.rs).
            (vec![], vec![], String::new())
        } else if let Some(dn) = &self.delta_net {
            // Gated attention: the Q projection yields a query and a gate per head.
            dn.check(g, self)?;
            match dn.first_attention_layer(self.n_layer) {
                Some(i) => {
                    let (q, qkv) = (
                        format!("blk.{i}.attn_q.weight"),
                        format!("blk.{i}.attn_qkv.weight"),
                    );
                    let q2 = q_rows.saturating_mul(2);
                    match (shape(&q), shape(&qkv)) {
                        (Some(d), _) => (d, vec![q2, self.n_embd], q),
                        (None, Some(d)) => {
                            let rows = q2.saturating_add(kv_rows.saturating_mul(2));
                            (d, vec![rows, self.n_embd], qkv)
                        }
                        (None, None) => {
                            bail!("{file} lacks the tensor {q} its architecture needs")
                        }
                    }
                }
                None => (vec![], vec![], String::new()),
            }
        } else if let Some(d) = shape("blk.0.attn_qkv.weight") {
            let rows = q_rows.checked_add(kv_rows.saturating_mul(2));
            (
                d,
                vec![rows.unwrap_or(usize::MAX), self.n_embd],
                "blk.0.attn_qkv.weight".to_string(),
            )
        } else if let Some(d) = shape("blk.0.attn_q.weight") {
            (
                d,
                vec![q_rows, self.n_embd],
                "blk.0.attn_q.weight".to_string(),
            )
        } else {
            bail!("{file} lacks the tensor blk.0.attn_q.weight its architecture needs");
        };
        if want_q.0 != want_q.1 {
            bail!(
                "{file}: tensor {} has shape {:?} but head_count {}, head_count_kv {} and key_length {} need {:?}",
                want_q.2,
                want_q.0,
                self.n_head,
                self.n_kv_head,
                self.head_dim,
                want_q.1
            );
        }
        if self.rope_dim < 2 || !self.rope_dim.is_multiple_of(2) {
            bail!(
                "{file}: {p}.rope.dimension_count is {}; it must be even and at least 2",
                self.rope_dim
            );
        }
        for (k, v, min) in [
            ("rope.freq_base", self.rope_base, f32::MIN_POSITIVE),
            (
                "rope.local_freq_base",
                self.rope_base_local,
                f32::MIN_POSITIVE,
            ),
            (
                "rope.scaling.factor",
                self.rope_scale_global,
                f32::MIN_POSITIVE,
            ),
            ("attention.layer_norm_rms_epsilon", self.rms_eps as f32, 0.0),
        ] {
            if !v.is_finite() || v < min {
                bail!("{file}: {p}.{k} is {v}, not a valid positive number");
            }
        }
        if self.sliding_window == Some(0) {
            bail!("{file}: {p}.attention.sliding_window is 0");
        }
        if self.n_expert > 1 && self.mla.is_none() {
            let router = shape("blk.0.ffn_gate_inp.weight");
            if router.as_deref() != Some(&[self.n_expert, self.n_embd][..]) {
                bail!(
                    "{file}: tensor blk.0.ffn_gate_inp.weight has shape {} but {p}.expert_count is {} (expected [{}, {}])",
                    router.map_or("(missing)".to_string(), |d| format!("{d:?}")),
                    self.n_expert,
                    self.n_expert,
                    self.n_embd
                );
            }
            if self.n_expert_used == 0 || self.n_expert_used > self.n_expert {
                bail!(
                    "{file}: {p}.expert_used_count is {} but it must be between 1 and expert_count {}",
                    self.n_expert_used,
                    self.n_expert
                );
            }
        }
        Ok(())
    }

    /// The context a user gets: what they asked for, at most what the model was trained for.
    pub fn context_len(&self, requested: usize) -> usize {
        requested.min(self.train_ctx).max(1)
    }

    /// Bytes the model needs beyond its weights at an `n_ctx`-token context: the KV cache
    /// when full, the rotary tables and the attention scratch of one prefill chunk.
    /// `kv`: the cache types on the CPU (fused attention: no score tensor, only the chunk's
    /// queries and outputs); None on a GPU (an f32 cache and candle's score and mask tensors).
    pub fn context_bytes(&self, n_ctx: usize, chunk: usize, kv: Option<KvTypes>) -> u64 {
        if let Some(m) = &self.mla {
            return m.context_bytes(self, n_ctx, chunk, kv);
        }
        let f = 4u64; // f32
        let (ctx, chunk) = (n_ctx as u64, chunk.min(n_ctx) as u64);
        // Qwen3.5's Gated DeltaNet layers keep a recurrent state instead of a KV cache.
        let attn_layers = self
            .delta_net
            .as_ref()
            .map_or(self.n_layer, |d| d.attention_layers(self.n_layer));
        let per_pos = |bytes_per_row: u64| {
            (attn_layers as u64)
                .saturating_mul(self.n_kv_head as u64)
                .saturating_mul(bytes_per_row)
                .saturating_mul(ctx)
        };
        let row = |ty: crate::protocol::KvType| ty.row_bytes(self.head_dim) as u64;
        let (kv_bytes, scratch) = match kv {
            Some(t) => (
                per_pos(row(t.k)).saturating_add(per_pos(row(t.v))),
                4u64.saturating_mul(chunk)
                    .saturating_mul(self.n_head as u64 * self.head_dim as u64)
                    .saturating_mul(f),
            ),
            None => (
                per_pos(2 * self.head_dim as u64 * f),
                (self.n_head as u64 + 1)
                    .saturating_mul(chunk)
                    .saturating_mul(ctx)
                    .saturating_mul(f),
            ),
        };
        let kv_bytes = kv_bytes.saturating_add(
            self.delta_net
                .as_ref()
                .map_or(0, |d| d.state_bytes(self.n_layer)),
        );
        let tables = 2u64
            .saturating_mul(3 * ctx)
            .saturating_mul(self.rope_dim as u64 / 2)
            .saturating_mul(f);
        kv_bytes.saturating_add(tables).saturating_add(scratch)
    }

    fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && !(layer + 1).is_multiple_of(self.swa_period)
    }
}

/// A layer's KV cache. On the CPU it holds the chosen element types for the fused attention
/// (model/attention.rs); on a GPU, f32 tensors preallocated in growing chunks and written in
/// place. `truncate` drops a suffix so a new chat turn can keep the prefix it shares with the
/// last one.
#[derive(Debug, Default)]
pub(crate) struct KvCache {
    types: KvTypes,
    store: Store,
}

#[derive(Debug, Default)]
enum Store {
    #[default]
    Empty,
    Host {
        k: attention::KvStore,
        v: attention::KvStore,
    },
    Device {
        k: Tensor,
        v: Tensor,
        len: usize,
    },
}

impl KvCache {
    pub(crate) fn new(types: KvTypes) -> Self {
        Self {
            types,
            store: Store::Empty,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.store {
            Store::Empty => 0,
            Store::Host { k, .. } => k.len(),
            Store::Device { len, .. } => *len,
        }
    }

    pub(crate) fn truncate(&mut self, n: usize) {
        match &mut self.store {
            Store::Empty => {}
            Store::Host { k, v } => {
                k.truncate(n);
                v.truncate(n);
            }
            Store::Device { len, .. } => *len = (*len).min(n),
        }
    }

    fn bytes(&self) -> usize {
        match &self.store {
            Store::Empty => 0,
            Store::Host { k, v } => k.bytes() + v.bytes(),
            Store::Device { k, v, .. } => [k, v]
                .iter()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
        }
    }

    /// The GPU path: appends (b, heads, seq, d) keys and values and returns views of the
    /// cached ones.
    fn append_device(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        max_len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        let (old, len) = match std::mem::take(&mut self.store) {
            Store::Device { k, v, len } => (Some((k, v)), len),
            _ => (None, 0),
        };
        let need = len + seq;
        if need > max_len {
            bail!("KV cache full: {need} positions needed, {max_len} allocated");
        }
        let capacity = old.as_ref().map_or(0, |(k, _)| k.dims()[2]);
        let (kb, vb) = match old {
            Some(old) if need <= capacity => old,
            old => {
                let cap = need.max(capacity * 2).max(256).min(max_len);
                let (b, h, _, d) = k.dims4()?;
                let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                    let buf = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
                    if let (Some(old), true) = (old, len > 0) {
                        buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    }
                    Ok(buf)
                };
                (
                    grow(old.as_ref().map(|o| &o.0))?,
                    grow(old.as_ref().map(|o| &o.1))?,
                )
            }
        };
        kb.slice_set(&k.contiguous()?, 2, len)?;
        vb.slice_set(&v.contiguous()?, 2, len)?;
        let views = (kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?);
        self.store = Store::Device {
            k: kb,
            v: vb,
            len: need,
        };
        Ok(views)
    }
}

/// Self-attention of one layer over its cache, for every architecture's forward: appends
/// this call's keys and values at positions `pos..pos + seq` and returns
/// softmax(q·kᵀ·scale + causal mask [+ window])·v as (b, seq, n_head · head_dim).
/// q: (b, n_head, seq, hd); k, v: (b, n_kv, seq, hd), any strides; grouped-query heads
/// adjacent (query head h uses KV head h / (n_head / n_kv)). On the CPU this is the fused
/// kernel over the cache in its chosen types; on a GPU candle's ops, with `mask` (from
/// `attention_mask`, None when every key is visible). `sinks`: gpt-oss's logit per query
/// head that joins its softmax (see model/gpt_oss.rs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn cached_attention(
    cache: &mut KvCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (pos, window, sinks): (usize, Option<usize>, Option<&Tensor>),
    scale: f64,
    n_ctx: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, nh, seq, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    if cache.len() != pos {
        bail!(
            "attention at position {pos} but the cache holds {} positions",
            cache.len()
        );
    }
    if q.device().is_cpu() && b == 1 {
        if matches!(cache.store, Store::Empty | Store::Device { .. }) {
            cache.store = Store::Host {
                k: attention::KvStore::new(cache.types.k, nkv, hd)?,
                v: attention::KvStore::new(cache.types.v, nkv, hd)?,
            };
        }
        let Store::Host { k: kc, v: vc } = &mut cache.store else {
            unreachable!("set above")
        };
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        kc.append(&flat(k)?, seq, n_ctx)
            .context("appending to the KV cache")?;
        vc.append(&flat(v)?, seq, n_ctx)
            .context("appending to the KV cache")?;
        let q = flat(q)?;
        let sinks = sinks.map(flat).transpose()?;
        let out = attention::attend(
            &attention::Query {
                q: &q,
                n_head: nh,
                seq,
                pos,
                window,
                scale: scale as f32,
                sinks: sinks.as_deref(),
            },
            kc,
            vc,
        )?;
        return Ok(Tensor::from_vec(out, (b, seq, nh * hd), k.device())?);
    }
    let (k, v) = cache
        .append_device(k, v, n_ctx)
        .context("appending to the KV cache")?;
    let total = k.dim(2)?;
    // Grouped-query attention without copying K/V: the n_rep query heads that share one KV
    // head are adjacent, so fold them into the row dimension of one matmul per KV head.
    let n_rep = nh / nkv;
    let q = q.contiguous()?.reshape((b * nkv, n_rep * seq, hd))?;
    // squeeze keeps the cache views strided instead of copying them (batch is always 1).
    let (k, v) = if b == 1 {
        (k.squeeze(0)?, v.squeeze(0)?)
    } else {
        (
            k.reshape((b * nkv, total, hd))?,
            v.reshape((b * nkv, total, hd))?,
        )
    };
    let mut att = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        att = att
            .reshape((b * nkv, n_rep, seq, total))?
            .broadcast_add(mask)?
            .reshape((b * nkv, n_rep * seq, total))?;
    }
    let att = match sinks {
        Some(sinks) => gpt_oss::softmax_with_sinks(&att, sinks, (b, nkv, n_rep, seq))?,
        None => candle_nn::ops::softmax_last_dim(&att)?,
    };
    Ok(att
        .matmul(&v)?
        .reshape((b, nh, seq, hd))?
        .transpose(1, 2)?
        .reshape((b, seq, nh * hd))?)
}

#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    dim: usize,
    neox: bool,
}

impl Rope {
    fn new(
        hp: &HParams,
        base: f32,
        pos_scale: f32,
        freq_factors: Option<&[f32]>,
        max_pos: usize,
        device: &Device,
    ) -> Result<Self> {
        let half = hp.rope_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let f = 1.0 / base.powf(2.0 * i as f32 / hp.rope_dim as f32);
                f / freq_factors
                    .and_then(|ff| ff.get(i))
                    .copied()
                    .unwrap_or(1.0)
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos: Vec<f32> = (0..max_pos).map(|p| p as f32 / pos_scale).collect();
        let pos = Tensor::from_vec(pos, (max_pos, 1), device)?;
        let angles = pos.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
            dim: hp.rope_dim,
            neox: hp.arch.rope_is_neox(),
        })
    }

    /// x: (batch, heads, seq, head_dim), contiguous.
    fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let head_dim = x.dim(3)?;
        let rot = |x: &Tensor| -> Result<Tensor> {
            Ok(if self.neox {
                candle_nn::rotary_emb::rope(x, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope_i(x, &cos, &sin)?
            })
        };
        if self.dim == head_dim {
            rot(x)
        } else {
            let rotated = rot(&x.narrow(3, 0, self.dim)?.contiguous()?)?;
            let pass = x.narrow(3, self.dim, head_dim - self.dim)?;
            Ok(Tensor::cat(&[rotated, pass], 3)?)
        }
    }
}

/// A weight matrix: tokentop's kernels for the 32-weight block types on a CPU with AVX2 or NEON
/// (see kernels/; weights repacked at load), candle's for K-quants, float weights and GPUs
/// (weights on a GPU stay there: `from_arc` takes the block kernels only for CPU tensors).
#[derive(Debug, Clone)]
enum Matrix {
    Blocks(Arc<Packed>),
    Candle(QMatMul),
    /// The IQ types and MXFP4, which candle lacks: kernels/iq.rs on the CPU.
    Iq(Arc<IqMatrix>),
}

/// An IQ or MXFP4 tensor: `count` matrices (1 for a 2-D tensor) of n rows of k weights of
/// `ty`, one after another in `data` (the map).
struct IqLayout<'g> {
    ty: IqType,
    n: usize,
    k: usize,
    count: usize,
    data: &'g [u8],
}

impl IqLayout<'_> {
    /// The matrices, copied out of the map.
    fn matrices(&self) -> Vec<IqMatrix> {
        self.data
            .chunks_exact(self.data.len() / self.count)
            .map(|d| IqMatrix::new(self.ty, d.to_vec(), self.n, self.k).expect("checked"))
            .collect()
    }
}

impl Matrix {
    /// An IQ or MXFP4 tensor's layout, checked against `want`; None for another type.
    fn iq_layout<'g>(g: &'g Gguf, name: &str, want: &[usize]) -> Result<Option<IqLayout<'g>>> {
        let Some(ty) = g
            .tensor_type(name)
            .and_then(|t| IqType::from_ggml_id(t.id()))
        else {
            return Ok(None);
        };
        let (_, dims, data) = g.raw(name)?;
        let bad = |what: String| anyhow::anyhow!("{}: tensor {name}: {what}", g.path.display());
        if dims != want {
            return Err(bad(format!(
                "shape {dims:?} but the model's hyper-parameters need {want:?}"
            )));
        }
        let (&k, rest) = dims
            .split_last()
            .ok_or_else(|| bad("no dimensions".into()))?;
        let (&n, outer) = rest
            .split_last()
            .ok_or_else(|| bad("one dimension".into()))?;
        let count: usize = outer.iter().product();
        if count == 0 || data.len() % count != 0 {
            return Err(bad(format!("{} bytes for shape {dims:?}", data.len())));
        }
        IqMatrix::check(ty, data.len() / count, n, k).map_err(bad)?;
        Ok(Some(IqLayout {
            ty,
            n,
            k,
            count,
            data,
        }))
    }

    /// The tensor as n matrices of its rows × cols (n = 1 for a 2-D `want`) when its type is
    /// an IQ type or MXFP4, else None.
    fn fetch_iq(g: &Gguf, name: &str, want: &[usize]) -> Result<Option<Vec<IqMatrix>>> {
        Ok(Self::iq_layout(g, name, want)?.map(|l| l.matrices()))
    }

    /// An IQ or MXFP4 tensor as its matrices on `dev` (see `fetch_iq`), the map given back:
    /// IQ4_NL and MXFP4 on the CPU packed straight from the map for the block kernels, as
    /// `stacked_from_bytes` packs the legacy types (no copy of the file's layout first).
    fn iq_matrices(
        g: &Gguf,
        name: &str,
        want: &[usize],
        dev: &Device,
    ) -> Result<Option<Vec<Self>>> {
        let Some(l) = Self::iq_layout(g, name, want)? else {
            return Ok(None);
        };
        if let (Some(kind), true, true) = (Kind::from_iq(l.ty), dev.is_cpu(), l.n > 0) {
            let packed = pack_stacked(kind, l.data, l.count, l.n, l.k, &|b| g.release_bytes(b));
            g.release(name);
            return Ok(Some(
                packed
                    .into_iter()
                    .map(|p| Self::Blocks(Arc::new(p)))
                    .collect(),
            ));
        }
        let ms = l.matrices();
        g.release(name);
        ms.into_iter()
            .map(|m| Self::from_iq(Arc::new(m), dev))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An IQ / MXFP4 matrix on `dev`: the CPU kernels (IQ4_NL and MXFP4 repacked for the
    /// block kernels where they run, as Q4_0 is), or on a GPU (no kernels there yet) its
    /// weights dequantized to f16.
    fn from_iq(m: Arc<IqMatrix>, dev: &Device) -> Result<Self> {
        if dev.is_cpu() {
            if let Some(kind) = Kind::from_iq(m.ty) {
                return Ok(Self::Blocks(Arc::new(Packed::new(
                    kind,
                    m.data(),
                    m.n,
                    m.k,
                ))));
            }
            return Ok(Self::Iq(m));
        }
        static NOTE: std::sync::Once = std::sync::Once::new();
        NOTE.call_once(|| {
            eprintln!(
                "tokentop: note: no GPU kernels for {} yet: its weights run dequantized to f16",
                m.ty.name()
            )
        });
        let t = Tensor::from_vec(m.dequantize(), (m.n, m.k), dev)?.to_dtype(DType::F16)?;
        Ok(Self::Candle(QMatMul::TensorF16(t)))
    }

    fn new(q: QTensor) -> Result<Self> {
        Self::from_arc(Arc::new(q))
    }

    fn from_arc(q: Arc<QTensor>) -> Result<Self> {
        if let (Some(kind), &[n, k], true) = (
            Kind::from_dtype(q.dtype()),
            q.shape().dims(),
            q.device().is_cpu(),
        ) {
            if k % kind.block_weights() == 0 {
                return Ok(Self::Blocks(Arc::new(Packed::new(kind, &q.data()?, n, k))));
            }
        }
        Ok(Self::Candle(QMatMul::from_arc(q)?))
    }

    /// A matrix of n rows of k weights from its bytes as the file stores them (a slice of the
    /// memory map): repacked straight from there for the block kernels, else copied once
    /// into candle's quantized tensor (on `dev`). `done` gets each part of `raw` once it is no
    /// longer needed (the loader gives back those pages of the map; see `pack_stacked`).
    fn from_bytes(
        dtype: GgmlDType,
        raw: &[u8],
        n: usize,
        k: usize,
        dev: &Device,
        done: &dyn Fn(&[u8]),
    ) -> Result<Self> {
        Ok(Self::stacked_from_bytes(dtype, raw, 1, n, k, dev, done)?
            .pop()
            .expect("one matrix"))
    }

    /// `count` matrices of n rows of k weights stored one after another in `raw` (the
    /// experts of a stacked tensor, or one matrix), as `from_bytes` builds them; for the block
    /// kernels all packed into one buffer (see `pack_stacked`).
    fn stacked_from_bytes(
        dtype: GgmlDType,
        raw: &[u8],
        count: usize,
        n: usize,
        k: usize,
        dev: &Device,
        done: &dyn Fn(&[u8]),
    ) -> Result<Vec<Self>> {
        if count == 0 || !raw.len().is_multiple_of(count) {
            bail!(
                "{count} matrices of [{n}, {k}] cannot hold {} bytes",
                raw.len()
            );
        }
        if let (Some(kind), true) = (Kind::from_dtype(dtype), dev.is_cpu()) {
            if k.is_multiple_of(kind.block_weights()) && n > 0 {
                return Ok(pack_stacked(kind, raw, count, n, k, done)
                    .into_iter()
                    .map(|p| Self::Blocks(Arc::new(p)))
                    .collect());
            }
        }
        let per = raw.len() / count;
        raw.chunks_exact(per)
            .map(|raw| {
                let m = Self::new(qtensor_from_ggml(dtype, raw, vec![n, k], dev)?);
                done(raw);
                m
            })
            .collect()
    }

    /// The input as m rows of k values.
    fn input_rows(x: &Tensor, k: usize) -> Result<(Vec<f32>, usize)> {
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        if !xs.len().is_multiple_of(k) {
            bail!("matmul: input of {} values, expected rows of {k}", xs.len());
        }
        let m = xs.len() / k;
        Ok((xs, m))
    }

    fn output(y: Vec<f32>, x: &Tensor, n: usize) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok(Tensor::from_vec(y, dims, x.device())?)
    }

    /// Several matrices on one input; the block-kernel ones sharing the first one's kind and
    /// width run as one fused pass (one activation quantization, one parallel region).
    fn forward_many<const N: usize>(ms: [&Matrix; N], x: &Tensor) -> Result<[Tensor; N]> {
        let key = |m: &Matrix| match m {
            Self::Blocks(p) => Some((p.kind, p.k)),
            Self::Candle(_) | Self::Iq(_) => None,
        };
        let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
        if let Some(first) = ms.iter().find_map(|m| key(m)) {
            let group: Vec<usize> = (0..N).filter(|&i| key(ms[i]) == Some(first)).collect();
            if group.len() > 1 {
                let packed: Vec<&Packed> = group
                    .iter()
                    .map(|&i| match ms[i] {
                        Self::Blocks(p) => p.as_ref(),
                        Self::Candle(_) | Self::Iq(_) => unreachable!("grouped by kernel kind"),
                    })
                    .collect();
                let (xs, m) = Self::input_rows(x, first.1)?;
                let ys = kernels::matmul_many(&packed, &xs, m);
                for ((&i, y), p) in group.iter().zip(ys).zip(&packed) {
                    out[i] = Some(Self::output(y, x, p.n)?);
                }
            }
        }
        for (i, slot) in out.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = Some(ms[i].forward(x)?);
            }
        }
        Ok(out.map(|t| t.expect("every output filled")))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(x)?),
            Self::Iq(w) => {
                let (xs, m) = Self::input_rows(x, w.k)?;
                Self::output(kernels::iq::matmul(w, &xs, m), x, w.n)
            }
            Self::Blocks(p) => {
                let (xs, m) = Self::input_rows(x, p.k)?;
                Self::output(kernels::matmul(p, &xs, m), x, p.n)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Linear {
    w: Matrix,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Act {
    Silu,
    GeluTanh,
}

impl Act {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::Silu => x.silu()?,
            Act::GeluTanh => x.gelu()?,
        })
    }

    /// `apply` on one value, with candle's CPU formulas.
    fn apply_f32(self, x: f32) -> f32 {
        match self {
            Act::Silu => x / (1.0 + (-x).exp()),
            Act::GeluTanh => {
                const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (SQRT_TWO_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
            }
        }
    }
}

#[derive(Debug, Clone)]
enum GateUp {
    Separate {
        gate: Matrix,
        up: Matrix,
    },
    /// Phi-3 stores gate and up as one matrix, gate first.
    Fused {
        gate_up: Matrix,
        n_ff: usize,
    },
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: GateUp,
    down: Matrix,
    act: Act,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => {
                let [g, u] = Matrix::forward_many([gate, up], x)?;
                (g, u)
            }
            GateUp::Fused { gate_up, n_ff } => {
                let gu = gate_up.forward(x)?;
                (
                    gu.narrow(D::Minus1, 0, *n_ff)?,
                    gu.narrow(D::Minus1, *n_ff, *n_ff)?,
                )
            }
        };
        self.down.forward(&(self.act.apply(&gate)? * up)?)
    }
}

#[derive(Debug, Clone)]
enum Ffn {
    Dense(Mlp),
    Moe(moe::Moe),
    GptOss(gpt_oss::Moe),
}

impl Ffn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Ffn::Dense(mlp) => mlp.forward(x),
            Ffn::Moe(m) => m.forward(x),
            Ffn::GptOss(m) => m.forward(x),
        }
    }
}

#[derive(Debug, Clone)]
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    qkv: Qkv,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    attn_out: Matrix,
    /// gpt-oss: a bias on the attention output and a learned logit per head that joins
    /// every softmax of that head (an "attention sink").
    attn_out_b: Option<Tensor>,
    sinks: Option<Tensor>,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    ffn: Ffn,
    post_ffn_norm: Option<Tensor>,
    rope: Arc<Rope>,
    window: Option<usize>,
    cache: KvCache,
}

/// Token embeddings: rows read from the memory-mapped file as it stores them (only the rows
/// of the tokens looked up are ever paged in), candle's quantized rows (on a GPU), or the
/// packed output matrix they are tied to (read back row by row, so tied weights are stored
/// once).
enum Embedding {
    Mapped {
        dtype: GgmlDType,
        rows: usize,
        k: usize,
        data: Mapped,
    },
    Quant(Arc<QTensor>),
    Tied(Arc<Packed>),
    /// An IQ / MXFP4 table, dequantized row by row (shared with the output when tied).
    Iq(Arc<IqMatrix>),
}

impl Embedding {
    fn rows(&self) -> usize {
        match self {
            Self::Mapped { rows, .. } => *rows,
            Self::Quant(q) => q.shape().dims()[0],
            Self::Tied(p) => p.n,
            Self::Iq(m) => m.n,
        }
    }

    fn lookup(&self, tokens: &[u32], dev: &Device) -> Result<Tensor> {
        match self {
            Self::Mapped {
                dtype,
                rows,
                k,
                data,
            } => {
                // The rows' blocks gathered and dequantized by candle: the same values its
                // embedding gave when the whole matrix was copied in.
                let bytes = data.bytes();
                let rb = bytes.len() / rows.max(&1);
                let mut picked = Vec::with_capacity(tokens.len() * rb);
                for &t in tokens {
                    let t = t as usize;
                    if t >= *rows {
                        bail!("token id {t} is outside the vocabulary of {rows}");
                    }
                    picked.extend_from_slice(&bytes[t * rb..(t + 1) * rb]);
                }
                let q = qtensor_from_ggml(*dtype, &picked, vec![tokens.len(), *k], dev)?;
                Ok(q.dequantize(dev)?.unsqueeze(0)?)
            }
            Self::Quant(q) => {
                let ids = Tensor::new(tokens, dev)?.unsqueeze(0)?;
                Ok(q.embedding(&ids)?)
            }
            Self::Tied(p) => {
                let mut out = vec![0f32; tokens.len() * p.k];
                for (row, &t) in out.chunks_exact_mut(p.k).zip(tokens) {
                    p.dequantize_row(t as usize, row);
                }
                Ok(Tensor::from_vec(out, (1, tokens.len(), p.k), dev)?)
            }
            Self::Iq(m) => {
                let mut out = vec![0f32; tokens.len() * m.k];
                for (row, &t) in out.chunks_exact_mut(m.k).zip(tokens) {
                    m.dequantize_row(t as usize, row);
                }
                Ok(Tensor::from_vec(out, (1, tokens.len(), m.k), dev)?)
            }
        }
    }
}

/// The loaded model: weights, rotary tables and the KV cache of one conversation.
pub struct Model {
    pub hp: HParams,
    /// Positions the KV cache is allowed to hold (the context a user gets).
    pub n_ctx: usize,
    embed: Embedding,
    embed_scale: Option<f64>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: Matrix,
    device: Device,
    /// Qwen3.5's layers with their recurrent state (then `layers` is empty).
    hybrid: Option<qwen35::Hybrid>,
    /// DeepSeek's layers with their latent caches (then `layers` is empty).
    mla: Option<deepseek2::Stack>,
}

fn norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, w, eps as f32)?)
}

impl Model {
    /// Loads the weights. `n_ctx` caps the context (and so the KV cache and rotary tables).
    /// Every tensor's shape is checked against the hyper-parameters before it is read.
    pub fn load(g: &mut Gguf, n_ctx: usize, device: &Device) -> Result<Self> {
        let g: &Gguf = g;
        let hp = HParams::from_gguf(g)?;
        let n_ctx = hp.context_len(n_ctx);
        let dev = device;
        let e = hp.n_embd;
        let vec_f32 = |g: &Gguf, name: &str, len: usize| -> Result<Tensor> {
            let t = fetch(g, name, &[len], dev)?.dequantize(dev)?;
            g.release(name);
            check_finite(g, name, &t)?;
            Ok(t)
        };
        let opt_f32 = |g: &Gguf, name: &str, len: usize| -> Result<Option<Tensor>> {
            if g.has_tensor(name) {
                Ok(Some(vec_f32(g, name, len)?))
            } else {
                Ok(None)
            }
        };
        let qmm = |g: &Gguf, name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            matrix(g, name, rows, cols, dev)
        };
        let linear = |g: &Gguf, name: &str, rows: usize| -> Result<Linear> {
            Ok(Linear {
                w: qmm(g, &format!("{name}.weight"), rows, e)?,
                b: opt_f32(g, &format!("{name}.bias"), rows)?,
            })
        };

        let freq_factors: Option<Vec<f32>> = opt_f32(g, "rope_freqs.weight", hp.rope_dim / 2)?
            .map(|t| t.flatten_all().and_then(|t| t.to_vec1()))
            .transpose()?;
        let (rope_global, rope_local) = if hp.arch == Arch::GptOss {
            (
                Arc::new(gpt_oss::rope(&hp, hp.rope_base, n_ctx, dev)?),
                Arc::new(gpt_oss::rope(&hp, hp.rope_base_local, n_ctx, dev)?),
            )
        } else {
            let global = Arc::new(Rope::new(
                &hp,
                hp.rope_base,
                hp.rope_scale_global,
                freq_factors.as_deref(),
                n_ctx,
                dev,
            )?);
            let local = match hp.sliding_window {
                Some(_) => Arc::new(Rope::new(&hp, hp.rope_base_local, 1.0, None, n_ctx, dev)?),
                None => global.clone(),
            };
            (global, local)
        };

        // HParams::check has seen token_embd's shape: [vocab, n_embd].
        let vocab = g.tensor_dims("token_embd.weight").map_or(0, |d| d[0]);
        let (embed, output) =
            if let Some(mut m) = Matrix::fetch_iq(g, "token_embd.weight", &[vocab, e])? {
                g.release("token_embd.weight");
                let m = Arc::new(m.remove(0));
                match g.has_tensor("output.weight") {
                    true => (Embedding::Iq(m), qmm(g, "output.weight", vocab, e)?),
                    // Tied and repacked: the embedding reads rows back from the packed copy,
                    // so the table is stored once.
                    false => match Matrix::from_iq(m.clone(), dev)? {
                        Matrix::Blocks(p) => (Embedding::Tied(p.clone()), Matrix::Blocks(p)),
                        output => (Embedding::Iq(m), output),
                    },
                }
            } else if g.has_tensor("output.weight") {
                (
                    embedding(g, vocab, e, dev)?,
                    qmm(g, "output.weight", vocab, e)?,
                )
            } else {
                match qmm(g, "token_embd.weight", vocab, e)? {
                    Matrix::Blocks(p) => (Embedding::Tied(p.clone()), Matrix::Blocks(p)),
                    candle => (embedding(g, vocab, e, dev)?, candle),
                }
            };
        let act = if hp.arch == Arch::Gemma3 {
            Act::GeluTanh
        } else {
            Act::Silu
        };

        let (qd, kvd, hd) = (
            hp.n_head * hp.head_dim,
            hp.n_kv_head * hp.head_dim,
            hp.head_dim,
        );
        // Qwen3.5's layers (DeltaNet and gated attention) are its own module's.
        let hybrid = match hp.delta_net {
            Some(_) => Some(qwen35::Hybrid::load(g, &hp, n_ctx, dev)?),
            None => None,
        };
        // Layers load in parallel (each repacks or copies its weights from the map); the
        // first error in layer order is the one reported, as a sequential load would.
        let load_layer = |i: usize| -> Result<Layer> {
            let p = format!("blk.{i}");
            let qkv = if g.has_tensor(&format!("{p}.attn_qkv.weight")) {
                Qkv::Fused(linear(g, &format!("{p}.attn_qkv"), qd + 2 * kvd)?)
            } else {
                Qkv::Separate {
                    q: linear(g, &format!("{p}.attn_q"), qd)?,
                    k: linear(g, &format!("{p}.attn_k"), kvd)?,
                    v: linear(g, &format!("{p}.attn_v"), kvd)?,
                }
            };
            let ffn = if hp.arch == Arch::GptOss {
                Ffn::GptOss(gpt_oss::Moe::load(g, &p, &hp, dev)?)
            } else if hp.n_expert > 1 {
                Ffn::Moe(moe::Moe::load(g, &p, &hp, act, dev)?)
            } else {
                let (gate_up, n_ff) = if g.has_tensor(&format!("{p}.ffn_gate.weight")) {
                    let n_ff = ff_width(g, &format!("{p}.ffn_gate.weight"), e, 1)?;
                    let gate_up = GateUp::Separate {
                        gate: qmm(g, &format!("{p}.ffn_gate.weight"), n_ff, e)?,
                        up: qmm(g, &format!("{p}.ffn_up.weight"), n_ff, e)?,
                    };
                    (gate_up, n_ff)
                } else {
                    let name = format!("{p}.ffn_up.weight");
                    let n_ff = ff_width(g, &name, e, 2)? / 2;
                    let gate_up = GateUp::Fused {
                        gate_up: qmm(g, &name, 2 * n_ff, e)?,
                        n_ff,
                    };
                    (gate_up, n_ff)
                };
                Ffn::Dense(Mlp {
                    gate_up,
                    down: qmm(g, &format!("{p}.ffn_down.weight"), e, n_ff)?,
                    act,
                })
            };
            let sliding = hp.is_sliding(i);
            // gpt-oss names its pre-FFN norm post_attention_norm (llama.cpp's attn_post_norm).
            let (post_attn_norm, ffn_norm) = if hp.arch == Arch::GptOss {
                (
                    None,
                    vec_f32(g, &format!("{p}.post_attention_norm.weight"), e)?,
                )
            } else {
                (
                    opt_f32(g, &format!("{p}.post_attention_norm.weight"), e)?,
                    vec_f32(g, &format!("{p}.ffn_norm.weight"), e)?,
                )
            };
            let sinks = if hp.arch == Arch::GptOss {
                Some(vec_f32(g, &format!("{p}.attn_sinks.weight"), hp.n_head)?)
            } else {
                None
            };
            Ok(Layer {
                attn_norm: vec_f32(g, &format!("{p}.attn_norm.weight"), e)?,
                qkv,
                q_norm: opt_f32(g, &format!("{p}.attn_q_norm.weight"), hd)?,
                k_norm: opt_f32(g, &format!("{p}.attn_k_norm.weight"), hd)?,
                attn_out: qmm(g, &format!("{p}.attn_output.weight"), e, qd)?,
                attn_out_b: opt_f32(g, &format!("{p}.attn_output.bias"), e)?,
                sinks,
                post_attn_norm,
                ffn_norm,
                ffn,
                post_ffn_norm: opt_f32(g, &format!("{p}.post_ffw_norm.weight"), e)?,
                rope: if sliding {
                    rope_local.clone()
                } else {
                    rope_global.clone()
                },
                window: if sliding { hp.sliding_window } else { None },
                cache: KvCache::default(),
            })
        };
        let mla = match hp.mla {
            Some(_) => Some(deepseek2::Stack::load(g, &hp, n_ctx, dev)?),
            None => None,
        };
        let layers = if hybrid.is_some() || mla.is_some() {
            Vec::new()
        } else {
            load_parallel(hp.n_layer, load_layer)?
        };
        let embed_scale = (hp.arch == Arch::Gemma3).then(|| (hp.n_embd as f64).sqrt());
        Ok(Self {
            output_norm: vec_f32(g, "output_norm.weight", e)?,
            hp,
            n_ctx,
            embed,
            embed_scale,
            layers,
            output,
            device: dev.clone(),
            hybrid,
            mla,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.embed.rows()
    }

    /// Tokens currently held in the KV cache.
    pub fn cached_len(&self) -> usize {
        if let Some(h) = &self.hybrid {
            return h.cached_len();
        }
        if let Some(m) = &self.mla {
            return m.cached_len();
        }
        self.layers.first().map_or(0, |l| l.cache.len())
    }

    /// Keeps the first `len` cached positions and forgets the rest.
    pub fn truncate_cache(&mut self, len: usize) {
        if let Some(h) = &mut self.hybrid {
            h.truncate(len);
        }
        if let Some(m) = &mut self.mla {
            m.truncate(len);
        }
        for l in &mut self.layers {
            l.cache.truncate(len);
        }
    }

    /// Empties the KV cache and stores it in `types` from now on (on the CPU; a GPU's
    /// cache stays f32). A type this model's head size cannot use is an error.
    pub fn set_kv_types(&mut self, types: KvTypes) -> Result<()> {
        for ty in [types.k, types.v] {
            attention::KvStore::new(ty, self.hp.n_kv_head, self.hp.head_dim)?;
        }
        for l in &mut self.layers {
            l.cache = KvCache::new(types);
        }
        if let Some(h) = &mut self.hybrid {
            h.set_kv_types(types);
        }
        if let Some(m) = &mut self.mla {
            m.set_kv_types(types)?;
        }
        Ok(())
    }

    /// Bytes the KV cache buffers occupy now.
    pub fn kv_cache_bytes(&self) -> usize {
        let hybrid = self.hybrid.as_ref().map_or(0, qwen35::Hybrid::bytes);
        let mla = self.mla.as_ref().map_or(0, deepseek2::Stack::bytes);
        hybrid + mla + self.layers.iter().map(|l| l.cache.bytes()).sum::<usize>()
    }

    /// Runs `tokens` at positions `cached_len()..`, appending them to the cache, and returns
    /// the logits of the last one as a (vocab,) f32 tensor.
    /// Runs `tokens` after the cached ones and returns the logits of the last.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let x = self.hidden(tokens, tokens.len().saturating_sub(1))?;
        Ok(self.logits(&x.i(0)?)?.squeeze(0)?)
    }

    /// Runs `tokens` after the cached ones and returns the logits of every one of them from
    /// index `from` on, as (tokens.len() - from, vocab) rows (perplexity needs them all).
    pub fn forward_all(&mut self, tokens: &[u32], from: usize) -> Result<Tensor> {
        let seq = tokens.len();
        if from >= seq {
            bail!("forward_all: no logits asked for ({from} of {seq} tokens skipped)");
        }
        let x = self.hidden(tokens, from)?;
        self.logits(&x.i(0)?)
    }

    /// The logits (rows, vocab) of hidden states (rows, d).
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = norm(x, &self.output_norm, self.hp.rms_eps)?;
        Ok(self.output.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// The hidden states (1, seq − from, d) after the last layer of `tokens[from..]`; fills
    /// the cache with all of them. As llama.cpp does, the last layer runs its attention for
    /// every token (their keys and values go into the cache) and the rest of it (output
    /// projection, FFN) only for the rows whose logits are asked for: in a prefill, one
    /// row of the last layer's FFN instead of all of them.
    fn hidden(&mut self, tokens: &[u32], from: usize) -> Result<Tensor> {
        let pos = self.cached_len();
        let seq = tokens.len();
        if seq == 0 {
            bail!("forward called with no tokens");
        }
        if pos + seq > self.n_ctx {
            bail!(
                "context full: {} tokens do not fit in the {}-token context",
                pos + seq,
                self.n_ctx
            );
        }
        let vocab = self.vocab_size() as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        if let Some(h) = &mut self.hybrid {
            let x = h.hidden(tokens, &self.embed, &self.hp, self.n_ctx, &self.device)?;
            return Ok(x.narrow(1, from, seq - from)?);
        }
        if let Some(m) = &mut self.mla {
            let x = m.hidden(tokens, &self.embed, &self.hp, self.n_ctx, &self.device)?;
            return Ok(x.narrow(1, from, seq - from)?);
        }
        let mut x = self.embed.lookup(tokens, &self.device)?;
        if let Some(s) = self.embed_scale {
            x = (x * s)?;
        }
        // Mask tensors only for candle's attention on a GPU: the CPU kernel masks by range.
        let mut masks: [Option<Tensor>; 2] = [None, None];
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let slot = usize::from(layer.window.is_some());
            if masks[slot].is_none() && !self.device.is_cpu() {
                masks[slot] = attention_mask(seq, pos, layer.window, &self.device)?;
            }
            let keep = if i == last { from } else { 0 };
            let mask = masks[slot].as_ref();
            x = layer_forward(layer, &self.hp, self.n_ctx, &x, pos, mask, keep)?;
        }
        if self.layers.is_empty() {
            x = x.narrow(1, from, seq - from)?;
        }
        Ok(x)
    }
}

/// Repacks `count` matrices of n rows of k weights, stored one after another in `raw` (a
/// slice of the memory map), straight into one fresh buffer (kernels' `PackedBuffer`), with
/// no intermediate copy. Rows go in pieces of PIECE_ROWS; the buffer's pages are faulted in
/// PREFAULT bytes ahead of the writes, and `done` gets the map's bytes behind them in spans
/// of at least GIVE_BACK, so the file's pages and the packed copy are never both resident
/// whole (peak memory stays near the file's size).
fn pack_stacked(
    kind: Kind,
    raw: &[u8],
    count: usize,
    n: usize,
    k: usize,
    done: &dyn Fn(&[u8]),
) -> Vec<Packed> {
    // A multiple of 8 rows, so no tile or group straddles two pieces.
    const PIECE_ROWS: usize = 64;
    // Each give-back drops the map's pages around it (see gguf.rs's FAULT_AROUND), the
    // next rows' included, which are then read in again: in spans of 2 MiB that happens
    // about once per page rather than once per piece.
    const GIVE_BACK: usize = 2 << 20;
    // Pages of the buffer faulted in per call: few calls, and at most this much of it
    // resident ahead of the map's pages given back.
    const PREFAULT: usize = 2 << 20;
    let (per_raw, per) = (raw.len() / count, Packed::packed_len(kind, n, k));
    let rb = per_raw / n;
    let mut buf = PackedBuffer::new(count * per);
    let total = count * per;
    let (mut given, mut ready) = (0, 0);
    for e in 0..count {
        for r0 in (0..n).step_by(PIECE_ROWS) {
            let r1 = (r0 + PIECE_ROWS).min(n);
            let (from, to) = (e * per_raw + r0 * rb, e * per_raw + r1 * rb);
            let at = e * per;
            let (o0, o1) = (
                at + Packed::packed_len(kind, r0, k),
                at + Packed::packed_len(kind, r1, k),
            );
            if o1 > ready {
                let end = (ready + PREFAULT).max(o1).min(total);
                buf.prefault(ready, end - ready);
                ready = end;
            }
            Packed::pack_into(
                kind,
                &raw[from..to],
                r1 - r0,
                k,
                &mut buf.bytes_mut()[o0..o1],
            );
            if to - given >= GIVE_BACK || to == raw.len() {
                done(&raw[given..to]);
                given = to;
            }
        }
    }
    Packed::from_buffer(kind, n, k, buf, count)
}

/// Runs `f` for 0..n on a few short-lived threads (as many as the CPU has, at most n) and
/// returns the results in order, or the error of the lowest index that failed. Plain scoped
/// threads rather than candle's barrier pool: the work calls candle operations that use that
/// pool themselves, and the threads are gone before inference starts, so they fight nothing.
fn load_parallel<T: Send>(n: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n);
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicUsize::new(usize::MAX);
    let mut results: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
    let done: Vec<Vec<(usize, Result<T>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // Past an index that failed nothing more is needed.
                        if i >= n || i > failed.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        let r = f(i);
                        if r.is_err() {
                            failed.fetch_min(i, std::sync::atomic::Ordering::Relaxed);
                        }
                        out.push((i, r));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for (i, r) in done.into_iter().flatten() {
        results[i] = Some(r);
    }
    // Every index below the first failure ran, so the first missing result follows an error.
    results
        .into_iter()
        .map_while(|r| r)
        .collect::<Result<Vec<T>>>()
}

/// Checks a tensor's shape is `want`: a wrong shape names the tensor and both shapes,
/// instead of failing somewhere inside a matmul.
fn check_shape(g: &Gguf, name: &str, want: &[usize]) -> Result<()> {
    if let Some(dims) = g.tensor_dims(name) {
        if dims != want {
            bail!(
                "{}: tensor {name} has shape {dims:?} but the model's hyper-parameters need {want:?}",
                g.path.display()
            );
        }
    }
    Ok(())
}

/// Reads a tensor into candle's quantized tensor after checking its shape is `want`.
fn fetch(g: &Gguf, name: &str, want: &[usize], dev: &Device) -> Result<QTensor> {
    check_shape(g, name, want)?;
    g.tensor(name, dev)
}

/// The candle type of a tensor, or the one-line error naming a type tokentop cannot run.
fn candle_type(g: &Gguf, name: &str) -> Result<GgmlDType> {
    let (ty, ..) = g.raw(name)?;
    ty.to_candle().with_context(|| {
        format!(
            "{}: tensor {name} has type {ty}, which tokentop does not support yet (it runs F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K)",
            g.path.display()
        )
    })
}

/// A weight matrix of `rows` × `cols`, built from the memory map (see `Matrix::from_bytes`);
/// the map's pages are given back once it is built.
fn matrix(g: &Gguf, name: &str, rows: usize, cols: usize, dev: &Device) -> Result<Matrix> {
    // The IQ types and MXFP4, which candle lacks, run on tokentop's kernels.
    if let Some(mut m) = Matrix::iq_matrices(g, name, &[rows, cols], dev)? {
        return Ok(m.remove(0));
    }
    check_shape(g, name, &[rows, cols])?;
    let dtype = candle_type(g, name)?;
    let (_, _, raw) = g.raw(name)?;
    Matrix::from_bytes(dtype, raw, rows, cols, dev, &|b| g.release_bytes(b))
        .with_context(|| format!("reading tensor {name} from {}", g.path.display()))
}

/// The token embedding: on the CPU read from the map row by row as it is looked up (never
/// copied whole); on a GPU uploaded as candle's quantized tensor.
fn embedding(g: &Gguf, vocab: usize, e: usize, dev: &Device) -> Result<Embedding> {
    let name = "token_embd.weight";
    check_shape(g, name, &[vocab, e])?;
    let dtype = candle_type(g, name)?;
    if dev.is_cpu() {
        let (_, _, data) = g.mapped(name)?;
        return Ok(Embedding::Mapped {
            dtype,
            rows: vocab,
            k: e,
            data,
        });
    }
    let q = g.tensor(name, dev)?;
    g.release(name);
    Ok(Embedding::Quant(Arc::new(q)))
}

/// The feed-forward width a tensor of shape [rows, n_embd] gives (rows a non-zero multiple
/// of `per`, 2 for a fused gate+up).
fn ff_width(g: &Gguf, name: &str, n_embd: usize, per: usize) -> Result<usize> {
    match g.tensor_dims(name) {
        Some(&[rows, cols]) if cols == n_embd && rows > 0 && rows % per == 0 => Ok(rows),
        Some(dims) => bail!(
            "{}: tensor {name} has shape {dims:?} but the model's hyper-parameters need [feed_forward_length{}, {n_embd}]",
            g.path.display(),
            if per == 2 { " × 2" } else { "" }
        ),
        None => bail!(
            "{} lacks the tensor {name} its architecture needs",
            g.path.display()
        ),
    }
}

/// Norm weights and biases are read as f32: a NaN or infinity there is named at load.
fn check_finite(g: &Gguf, name: &str, t: &Tensor) -> Result<()> {
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
        bail!(
            "{}: tensor {name} holds {bad}, not a finite number: the file is corrupt",
            g.path.display()
        );
    }
    Ok(())
}

/// Additive mask (seq, pos+seq): 0 where query i may see key j, -inf elsewhere.
/// None when every key is visible (one new token and no window cutting in).
fn attention_mask(
    seq: usize,
    pos: usize,
    window: Option<usize>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let total = pos + seq;
    if seq == 1 && window.is_none_or(|w| total <= w) {
        return Ok(None);
    }
    let mut m = vec![0f32; seq * total];
    for i in 0..seq {
        let qpos = pos + i;
        for j in 0..total {
            let visible = j <= qpos && window.is_none_or(|w| qpos - j < w);
            if !visible {
                m[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (seq, total), dev)?))
}

fn layer_forward(
    l: &mut Layer,
    hp: &HParams,
    n_ctx: usize,
    x: &Tensor,
    pos: usize,
    mask: Option<&Tensor>,
    keep: usize,
) -> Result<Tensor> {
    let (b, seq, _) = x.dims3()?;
    let (nh, nkv, hd) = (hp.n_head, hp.n_kv_head, hp.head_dim);
    let h = norm(x, &l.attn_norm, hp.rms_eps)?;
    let (q, k, v) = match &l.qkv {
        Qkv::Separate { q, k, v } => {
            let [qw, kw, vw] = Matrix::forward_many([&q.w, &k.w, &v.w], &h)?;
            let bias = |t: Tensor, l: &Linear| -> Result<Tensor> {
                Ok(match &l.b {
                    Some(b) => t.broadcast_add(b)?,
                    None => t,
                })
            };
            (bias(qw, q)?, bias(kw, k)?, bias(vw, v)?)
        }
        Qkv::Fused(qkv) => {
            let all = qkv.forward(&h)?;
            (
                all.narrow(D::Minus1, 0, nh * hd)?,
                all.narrow(D::Minus1, nh * hd, nkv * hd)?,
                all.narrow(D::Minus1, (nh + nkv) * hd, nkv * hd)?,
            )
        }
    };
    let mut q = q.reshape((b, seq, nh, hd))?;
    let mut k = k.reshape((b, seq, nkv, hd))?;
    if let Some(w) = &l.q_norm {
        q = norm(&q.contiguous()?, w, hp.rms_eps)?;
    }
    if let Some(w) = &l.k_norm {
        k = norm(&k.contiguous()?, w, hp.rms_eps)?;
    }
    let q = l.rope.apply(&q.transpose(1, 2)?.contiguous()?, pos)?;
    let k = l.rope.apply(&k.transpose(1, 2)?.contiguous()?, pos)?;
    let v = v.reshape((b, seq, nkv, hd))?.transpose(1, 2)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let sinks = l.sinks.as_ref();
    let out = cached_attention(
        &mut l.cache,
        &q,
        &k,
        &v,
        (pos, l.window, sinks),
        scale,
        n_ctx,
        mask,
    )?;
    // Past the attention, rows are independent: only rows keep.. go on (see `hidden`).
    let (x, out) = if keep > 0 {
        (
            x.narrow(1, keep, seq - keep)?,
            out.narrow(1, keep, seq - keep)?,
        )
    } else {
        (x.clone(), out)
    };
    let mut out = l.attn_out.forward(&out)?;
    if let Some(bias) = &l.attn_out_b {
        out = out.broadcast_add(bias)?;
    }
    if let Some(w) = &l.post_attn_norm {
        out = norm(&out, w, hp.rms_eps)?;
    }
    let x = (x + out)?;
    let h = norm(&x, &l.ffn_norm, hp.rms_eps)?;
    let mut f = l.ffn.forward(&h)?;
    if let Some(w) = &l.post_ffn_norm {
        f = norm(&f, w, hp.rms_eps)?;
    }
    Ok((x + f)?)
}

/// Appends `k`, `v` (b, kv heads, seq, head_dim) to `cache` at its end and attends `q` (b,
/// heads, seq, head_dim) over it with no window: the heads' outputs as (b, seq, heads ×
/// head_dim). For architectures whose attention blocks live in their own module (qwen35).
pub(crate) fn attend(
    cache: &mut KvCache,
    hp: &HParams,
    n_ctx: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scale = 1.0 / (hp.head_dim as f64).sqrt();
    let pos = cache.len();
    cached_attention(cache, q, k, v, (pos, None, None), scale, n_ctx, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Repacking in pieces (as the loader does for large matrices) gives the matrix `new`
    /// gives: the same rows back and bit-identical products, with a tail of n % 4 rows
    /// (legacy types) or a padded last tile (K-quants, where this CPU runs their kernels).
    #[test]
    fn matrices_repacked_in_pieces_equal_whole_ones() {
        if !kernels::simd() {
            eprintln!("SKIPPED: no block kernels on this CPU");
            return;
        }
        let n = 2 * 1024 + 70;
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let Some(kind) = Kind::from_dtype(dtype) else {
                eprintln!("SKIPPED {dtype:?}: candle's kernels run it on this CPU");
                continue;
            };
            let k = kind.block_weights() * 2;
            let vals: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919 % 201) as f32 - 100.0) / 50.0)
                .collect();
            let w = Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let raw = q.data().unwrap();
            let whole = Packed::new(kind, &raw, n, k);
            let given_back = std::cell::Cell::new(0);
            let Matrix::Blocks(pieces) =
                Matrix::from_bytes(dtype, &raw, n, k, &Device::Cpu, &|b| {
                    given_back.set(given_back.get() + b.len())
                })
                .unwrap()
            else {
                panic!("{dtype:?} is not packed");
            };
            assert_eq!(
                given_back.get(),
                raw.len(),
                "{dtype:?}: every byte given back"
            );
            let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
            for j in 0..n {
                whole.dequantize_row(j, &mut a);
                pieces.dequantize_row(j, &mut b);
                assert_eq!(a, b, "{dtype:?} row {j}");
            }
            let x: Vec<f32> = (0..3 * k).map(|i| (i as f32).sin()).collect();
            let (ya, yb) = (
                kernels::matmul(&whole, &x, 3),
                kernels::matmul(&pieces, &x, 3),
            );
            assert!(
                ya.iter().zip(&yb).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype:?}"
            );
        }
    }

    /// Parallel loading returns results in order, or the error of the lowest failing index
    /// (what a sequential load would report), whichever thread met it first.
    #[test]
    fn parallel_load_reports_the_first_error_in_order() {
        let ok = load_parallel(37, |i| Ok(i * 2)).unwrap();
        assert_eq!(ok, (0..37).map(|i| i * 2).collect::<Vec<_>>());
        for _ in 0..20 {
            let err = load_parallel(40, |i| {
                if i == 9 || i == 31 {
                    // The later failure tends to finish first.
                    std::thread::sleep(std::time::Duration::from_millis(if i == 9 {
                        5
                    } else {
                        0
                    }));
                    bail!("layer {i} is bad")
                }
                Ok(i)
            })
            .unwrap_err();
            assert_eq!(err.to_string(), "layer 9 is bad");
        }
        assert!(load_parallel(0, Ok).unwrap().is_empty());
    }
}
