//! Qwen3.5 / Qwen3.6 (`qwen35`, `qwen35moe`): Gated DeltaNet layers (linear attention with a
//! recurrent state and a short causal convolution) interleaved with gated full attention, each
//! followed by a dense or mixture-of-experts feed-forward with a sigmoid-gated shared expert.
//!
//! Written to follow llama.cpp exactly: src/models/qwen35.cpp and qwen35moe.cpp (hparams,
//! tensors, the layer graph), src/models/delta-net-base.cpp (the convolution state and the
//! delta rule) and ggml-cpu's `ggml_compute_forward_gated_delta_net_one_chunk` (the
//! recurrence: value head `h` reads key head `h % key_heads`, as ggml_repeat tiles them).
//!
//! The delta rule runs on the host, token by token, in f32: it is a few hundred thousand
//! multiply-adds per token and layer (cheap beside the projections), and candle has no op for a
//! recurrence; the projections stay on the model's matrices.
//!
//! The recurrent state is per conversation like the KV cache, but it cannot be cut back to an
//! arbitrary prefix. So the state after each prompt is kept as a checkpoint, with the tokens
//! seen: `truncate` goes back to the checkpoint (or to the empty state when the prefix is
//! shorter) and the next forward pass first replays the tokens between it and the prefix.

use super::{
    attend, attention_mask, check_finite, fetch, moe, norm, Act, Arch, Embedding, Ffn, GateUp,
    Gguf, HParams, KvCache, Linear, Matrix, Mlp, Qkv, Rope,
};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use std::sync::Arc;

/// Tokens replayed per pass when the state goes back to a checkpoint.
const REPLAY_CHUNK: usize = 512;

/// The linear-attention shape, from the `{arch}.ssm.*` keys as llama.cpp reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaNetParams {
    /// Width of the causal convolution (`ssm.conv_kernel`).
    pub d_conv: usize,
    /// Key and value head width (`ssm.state_size`).
    pub head_dim: usize,
    /// Key heads (`ssm.group_count`) and value heads (`ssm.time_step_rank`).
    pub k_heads: usize,
    pub v_heads: usize,
    /// Every n-th layer is full attention (`full_attention_interval`, 4 by default).
    pub full_attention_interval: usize,
    /// llama.cpp's multi-axis rope sections (`rope.dimension_sections`).
    pub rope_sections: [usize; 4],
    /// Multi-token-prediction blocks after the decoder's (`nextn_predict_layers`), counted in
    /// `block_count`; llama.cpp does not run them in the main pass and neither does tokentop.
    pub nextn_layers: usize,
}

impl DeltaNetParams {
    pub(super) fn from_gguf(g: &Gguf, arch: Arch) -> Result<Option<Self>> {
        if !matches!(arch, Arch::Qwen35 | Arch::Qwen35Moe) {
            return Ok(None);
        }
        let p = arch.as_str();
        let key = |k: &str| format!("{p}.{k}");
        let need = |k: &str| -> Result<usize> { Ok(g.require_u32(&key(k))? as usize) };
        let mut rope_sections = [0usize; 4];
        if let Some(candle_core::quantized::gguf_file::Value::Array(v)) =
            g.get(&key("rope.dimension_sections"))
        {
            for (slot, v) in rope_sections.iter_mut().zip(v) {
                *slot = v
                    .to_i32()
                    .ok()
                    .and_then(|v| usize::try_from(v).ok())
                    .with_context(|| {
                        format!(
                            "{}: {p}.rope.dimension_sections holds {v:?}, not a count",
                            g.path.display()
                        )
                    })?;
            }
        }
        let dn = Self {
            d_conv: need("ssm.conv_kernel")?,
            head_dim: need("ssm.state_size")?,
            k_heads: need("ssm.group_count")?,
            v_heads: need("ssm.time_step_rank")?,
            full_attention_interval: g.get_u32(&key("full_attention_interval")).unwrap_or(4)
                as usize,
            rope_sections,
            nextn_layers: g.get_u32(&key("nextn_predict_layers")).unwrap_or(0) as usize,
        };
        let inner = need("ssm.inner_size")?;
        let file = g.path.display();
        if dn.d_conv < 2 || dn.d_conv > 64 {
            bail!("{file}: {p}.ssm.conv_kernel is {}, not 2 to 64", dn.d_conv);
        }
        if dn.head_dim == 0 || dn.head_dim > 1024 {
            bail!(
                "{file}: {p}.ssm.state_size is {}, not 1 to 1024",
                dn.head_dim
            );
        }
        if dn.k_heads == 0 || dn.v_heads == 0 || !dn.v_heads.is_multiple_of(dn.k_heads) {
            bail!(
                "{file}: {p}.ssm.time_step_rank {} value heads cannot share {} key heads (ssm.group_count)",
                dn.v_heads,
                dn.k_heads
            );
        }
        if dn.v_heads.checked_mul(dn.head_dim) != Some(inner) {
            bail!(
                "{file}: {p}.ssm.inner_size is {inner} but time_step_rank {} × state_size {} is {}",
                dn.v_heads,
                dn.head_dim,
                dn.v_heads.saturating_mul(dn.head_dim)
            );
        }
        if dn.full_attention_interval == 0 {
            bail!("{file}: {p}.full_attention_interval is 0");
        }
        Ok(Some(dn))
    }

    /// Whether layer `i` is a Gated DeltaNet layer (llama.cpp's `is_recr`).
    pub fn is_recurrent(&self, i: usize) -> bool {
        !(i + 1).is_multiple_of(self.full_attention_interval)
    }

    pub(super) fn first_attention_layer(&self, n_layer: usize) -> Option<usize> {
        (0..n_layer).find(|&i| !self.is_recurrent(i))
    }

    pub fn attention_layers(&self, n_layer: usize) -> usize {
        (0..n_layer).filter(|&i| !self.is_recurrent(i)).count()
    }

    fn key_dim(&self) -> usize {
        self.k_heads * self.head_dim
    }

    fn value_dim(&self) -> usize {
        self.v_heads * self.head_dim
    }

    /// Channels of the convolution: query, key and value.
    fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }

    /// f32 values of one layer's state: the convolution's last inputs and the delta-rule
    /// matrices.
    fn state_len(&self) -> usize {
        (self.d_conv - 1) * self.conv_dim() + self.v_heads * self.head_dim * self.head_dim
    }

    /// Bytes of a conversation's recurrent state, with its checkpoint.
    pub fn state_bytes(&self, n_layer: usize) -> u64 {
        let layers = (n_layer - self.attention_layers(n_layer)) as u64;
        layers
            .saturating_mul(self.state_len() as u64)
            .saturating_mul(4 * 2)
    }

    /// Bounds the hyper-parameters by the first recurrent layer's tensors.
    pub(super) fn check(&self, g: &Gguf, hp: &HParams) -> Result<()> {
        let file = g.path.display();
        let p = hp.arch.as_str();
        if hp.rope_dim > hp.head_dim {
            bail!(
                "{file}: {p}.rope.dimension_count {} exceeds the head width {}",
                hp.rope_dim,
                hp.head_dim
            );
        }
        let pairs: usize = self.rope_sections.iter().sum();
        if pairs == 0 || pairs > hp.rope_dim / 2 {
            bail!(
                "{file}: {p}.rope.dimension_sections {:?} must cover 1 to {} rotary pairs",
                self.rope_sections,
                hp.rope_dim / 2
            );
        }
        if let Some(i) = (0..hp.n_layer).find(|&i| self.is_recurrent(i)) {
            let name = format!("blk.{i}.attn_qkv.weight");
            let want = [self.conv_dim(), hp.n_embd];
            match g.tensor_dims(&name) {
                Some(d) if d == want => {}
                Some(d) => bail!(
                    "{file}: tensor {name} has shape {d:?} but ssm.group_count {}, time_step_rank {} and state_size {} need {want:?}",
                    self.k_heads,
                    self.v_heads,
                    self.head_dim
                ),
                None => bail!("{file} lacks the tensor {name} its architecture needs"),
            }
        }
        Ok(())
    }

    /// The rotary tables: llama.cpp's interleaved multi-axis rope (IMROPE) on text, where the
    /// three position axes all hold the token's position and the fourth holds 0: a rotary pair
    /// whose sector falls to the fourth axis does not turn (its frequency is 0 here).
    fn rope(&self, hp: &HParams, n_ctx: usize, dev: &Device) -> Result<Rope> {
        let s = self.rope_sections;
        let sect_dims: usize = s.iter().sum();
        let factors: Vec<f32> = (0..hp.rope_dim / 2)
            .map(|i| {
                let sector = i % sect_dims;
                let text_axis = (sector.is_multiple_of(3) && sector < 3 * s[0])
                    || (sector % 3 == 1 && sector < 3 * s[1])
                    || (sector % 3 == 2 && sector < 3 * s[2]);
                if text_axis {
                    1.0
                } else {
                    f32::INFINITY
                }
            })
            .collect();
        Rope::new(hp, hp.rope_base, 1.0, Some(&factors), n_ctx, dev)
    }
}

/// One layer's recurrent state: the convolution's last `d_conv - 1` inputs (time-major rows
/// of `conv_dim`) and, per value head, the delta-rule matrix stored as ggml does (row j =
/// value index, column i = key index).
#[derive(Debug, Clone, Default)]
struct State {
    conv: Vec<f32>,
    ssm: Vec<f32>,
}

#[derive(Debug)]
struct DeltaNet {
    qkv: Matrix,
    z: Matrix,
    beta: Matrix,
    alpha: Matrix,
    dt_bias: Vec<f32>,
    a: Vec<f32>,
    /// (conv_dim, d_conv), row-major: channel c's taps oldest first.
    conv: Vec<f32>,
    norm: Tensor,
    out: Matrix,
    state: State,
}

#[derive(Debug)]
struct GatedAttention {
    /// Query and gate, interleaved per head: [q (head_dim), gate (head_dim)] × heads; then
    /// keys and values (separate, or one matrix in that order).
    qkv: Qkv,
    q_norm: Tensor,
    k_norm: Tensor,
    out: Matrix,
    rope: Arc<Rope>,
    cache: KvCache,
}

#[derive(Debug)]
enum Mixer {
    Attention(Box<GatedAttention>),
    DeltaNet(Box<DeltaNet>),
}

/// Qwen3.5-MoE's shared expert, scaled by sigmoid(gate · x) per token.
#[derive(Debug)]
struct SharedExpert {
    mlp: Mlp,
    gate: Tensor,
}

#[derive(Debug)]
struct Block {
    attn_norm: Tensor,
    post_norm: Tensor,
    mixer: Mixer,
    ffn: Ffn,
    shared: Option<SharedExpert>,
}

/// The layers of a Qwen3.5 model and the conversation they hold.
pub(super) struct Hybrid {
    dn: DeltaNetParams,
    blocks: Vec<Block>,
    /// Every token of the conversation (the logical cache).
    tokens: Vec<u32>,
    /// How many of `tokens` the states and KV caches hold; the rest are replayed by the next
    /// forward pass.
    done: usize,
    /// The recurrent states after the last prompt: (position, one per DeltaNet layer).
    checkpoint: Option<(usize, Vec<State>)>,
    /// A pass failed half-way: the states are not those of `done` tokens.
    dirty: bool,
}

impl Hybrid {
    pub(super) fn load(g: &Gguf, hp: &HParams, n_ctx: usize, dev: &Device) -> Result<Self> {
        let dn = hp
            .delta_net
            .clone()
            .context("a Qwen3.5 model without its linear-attention parameters")?;
        let e = hp.n_embd;
        let vec_f32 = |g: &Gguf, name: &str, len: usize| -> Result<Tensor> {
            let t = fetch(g, name, &[len], dev)?.dequantize(dev)?;
            check_finite(g, name, &t)?;
            Ok(t)
        };
        let host = |g: &Gguf, name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = fetch(g, name, shape, &Device::Cpu)?.dequantize(&Device::Cpu)?;
            check_finite(g, name, &t)?;
            Ok(t.flatten_all()?.to_vec1()?)
        };
        let qmm = |g: &Gguf, name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            Matrix::new(fetch(g, name, &[rows, cols], dev)?)
        };
        let rope = Arc::new(dn.rope(hp, n_ctx, dev)?);
        let (qd, kvd, hd) = (
            hp.n_head * hp.head_dim,
            hp.n_kv_head * hp.head_dim,
            hp.head_dim,
        );
        let mut blocks = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let p = format!("blk.{i}");
            let n = |s: &str| format!("{p}.{s}");
            let mixer = if dn.is_recurrent(i) {
                let (vd, cd, h) = (dn.value_dim(), dn.conv_dim(), dn.v_heads);
                Mixer::DeltaNet(Box::new(DeltaNet {
                    qkv: qmm(g, &n("attn_qkv.weight"), cd, e)?,
                    z: qmm(g, &n("attn_gate.weight"), vd, e)?,
                    beta: qmm(g, &n("ssm_beta.weight"), h, e)?,
                    alpha: qmm(g, &n("ssm_alpha.weight"), h, e)?,
                    dt_bias: host(g, &n("ssm_dt.bias"), &[h])?,
                    a: host(g, &n("ssm_a"), &[h])?,
                    conv: host(g, &n("ssm_conv1d.weight"), &[cd, dn.d_conv])?,
                    norm: vec_f32(g, &n("ssm_norm.weight"), dn.head_dim)?,
                    out: qmm(g, &n("ssm_out.weight"), e, vd)?,
                    state: State::default(),
                }))
            } else {
                let qkv = if g.has_tensor(&n("attn_qkv.weight")) {
                    Qkv::Fused(Linear {
                        w: qmm(g, &n("attn_qkv.weight"), 2 * qd + 2 * kvd, e)?,
                        b: None,
                    })
                } else {
                    let m = |g: &Gguf, s: &str, rows: usize| -> Result<Linear> {
                        Ok(Linear {
                            w: qmm(g, &n(s), rows, e)?,
                            b: None,
                        })
                    };
                    Qkv::Separate {
                        q: m(g, "attn_q.weight", 2 * qd)?,
                        k: m(g, "attn_k.weight", kvd)?,
                        v: m(g, "attn_v.weight", kvd)?,
                    }
                };
                Mixer::Attention(Box::new(GatedAttention {
                    qkv,
                    q_norm: vec_f32(g, &n("attn_q_norm.weight"), hd)?,
                    k_norm: vec_f32(g, &n("attn_k_norm.weight"), hd)?,
                    out: qmm(g, &n("attn_output.weight"), e, qd)?,
                    rope: rope.clone(),
                    cache: KvCache::default(),
                }))
            };
            let (ffn, shared) = if hp.n_expert > 1 {
                let moe = moe::Moe::load(g, &p, hp, Act::Silu, dev)?;
                let shared = if g.has_tensor(&n("ffn_up_shexp.weight")) {
                    let ff = super::ff_width(g, &n("ffn_up_shexp.weight"), e, 1)?;
                    Some(SharedExpert {
                        mlp: Mlp {
                            gate_up: GateUp::Separate {
                                gate: qmm(g, &n("ffn_gate_shexp.weight"), ff, e)?,
                                up: qmm(g, &n("ffn_up_shexp.weight"), ff, e)?,
                            },
                            down: qmm(g, &n("ffn_down_shexp.weight"), e, ff)?,
                            act: Act::Silu,
                        },
                        gate: vec_f32(g, &n("ffn_gate_inp_shexp.weight"), e)?.reshape((e, 1))?,
                    })
                } else {
                    None
                };
                (Ffn::Moe(moe), shared)
            } else {
                let ff = super::ff_width(g, &n("ffn_gate.weight"), e, 1)?;
                let mlp = Mlp {
                    gate_up: GateUp::Separate {
                        gate: qmm(g, &n("ffn_gate.weight"), ff, e)?,
                        up: qmm(g, &n("ffn_up.weight"), ff, e)?,
                    },
                    down: qmm(g, &n("ffn_down.weight"), e, ff)?,
                    act: Act::Silu,
                };
                (Ffn::Dense(mlp), None)
            };
            blocks.push(Block {
                attn_norm: vec_f32(g, &n("attn_norm.weight"), e)?,
                post_norm: vec_f32(g, &n("post_attention_norm.weight"), e)?,
                mixer,
                ffn,
                shared,
            });
        }
        let mut hybrid = Self {
            dn,
            blocks,
            tokens: Vec::new(),
            done: 0,
            checkpoint: None,
            dirty: false,
        };
        hybrid.reset_states();
        Ok(hybrid)
    }

    pub(super) fn cached_len(&self) -> usize {
        self.tokens.len()
    }

    /// Keeps the first `len` tokens: the states go back to the checkpoint when it lies within
    /// them, else to empty, and the next pass replays the tokens from there.
    pub(super) fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        if self.dirty {
            self.recover();
            return;
        }
        if self.done <= len {
            return;
        }
        match self.checkpoint.take() {
            Some((at, states)) if at <= len => {
                let mut it = states.iter();
                for b in &mut self.blocks {
                    if let Mixer::DeltaNet(d) = &mut b.mixer {
                        d.state
                            .clone_from(it.next().expect("one state per DeltaNet layer"));
                    }
                }
                self.done = at;
                self.checkpoint = Some((at, states));
            }
            _ => {
                self.reset_states();
                self.done = 0;
            }
        }
        for b in &mut self.blocks {
            if let Mixer::Attention(a) = &mut b.mixer {
                a.cache.truncate(self.done);
            }
        }
    }

    /// Empties the attention layers' caches and stores them in `types` from now on.
    pub(crate) fn set_kv_types(&mut self, types: crate::protocol::KvTypes) {
        for b in &mut self.blocks {
            if let Mixer::Attention(a) = &mut b.mixer {
                a.cache = KvCache::new(types);
            }
        }
    }

    /// After a failed pass: everything from the empty state, the tokens kept to replay.
    fn recover(&mut self) {
        self.reset_states();
        self.done = 0;
        self.checkpoint = None;
        self.dirty = false;
        for b in &mut self.blocks {
            if let Mixer::Attention(a) = &mut b.mixer {
                a.cache.truncate(0);
            }
        }
    }

    fn reset_states(&mut self) {
        let dn = &self.dn;
        for b in &mut self.blocks {
            if let Mixer::DeltaNet(d) = &mut b.mixer {
                d.state = State {
                    conv: vec![0.0; (dn.d_conv - 1) * dn.conv_dim()],
                    ssm: vec![0.0; dn.v_heads * dn.head_dim * dn.head_dim],
                };
            }
        }
    }

    /// Bytes of the KV caches, the recurrent states and their checkpoint.
    pub(super) fn bytes(&self) -> usize {
        let state = |s: &State| 4 * (s.conv.len() + s.ssm.len());
        let live: usize = self
            .blocks
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Attention(a) => a.cache.bytes(),
                Mixer::DeltaNet(d) => state(&d.state),
            })
            .sum();
        let saved: usize = self
            .checkpoint
            .as_ref()
            .map_or(0, |(_, s)| s.iter().map(state).sum());
        live + saved
    }

    /// The hidden states (1, seq, d) of `tokens` after the last layer, having first replayed
    /// whatever `truncate` left to redo.
    pub(super) fn hidden(
        &mut self,
        tokens: &[u32],
        embed: &Embedding,
        hp: &HParams,
        n_ctx: usize,
        dev: &Device,
    ) -> Result<Tensor> {
        if self.dirty {
            self.recover();
        }
        let x = self.replay_and_run(tokens, embed, hp, n_ctx, dev);
        self.dirty = x.is_err();
        let x = x?;
        if tokens.len() > 1 {
            // The end of a prompt: where the next turn most likely diverges.
            let states = self
                .blocks
                .iter()
                .filter_map(|b| match &b.mixer {
                    Mixer::DeltaNet(d) => Some(d.state.clone()),
                    Mixer::Attention(_) => None,
                })
                .collect();
            self.checkpoint = Some((self.done, states));
        }
        Ok(x)
    }

    fn replay_and_run(
        &mut self,
        tokens: &[u32],
        embed: &Embedding,
        hp: &HParams,
        n_ctx: usize,
        dev: &Device,
    ) -> Result<Tensor> {
        while self.done < self.tokens.len() {
            let end = self.tokens.len().min(self.done + REPLAY_CHUNK);
            let replay = self.tokens[self.done..end].to_vec();
            self.run(&replay, embed, hp, n_ctx, dev)?;
        }
        self.run(tokens, embed, hp, n_ctx, dev)
    }

    fn run(
        &mut self,
        tokens: &[u32],
        embed: &Embedding,
        hp: &HParams,
        n_ctx: usize,
        dev: &Device,
    ) -> Result<Tensor> {
        let pos = self.done;
        let mask = attention_mask(tokens.len(), pos, None, dev)?;
        let mut x = embed.lookup(tokens, dev)?;
        for b in &mut self.blocks {
            let h = norm(&x, &b.attn_norm, hp.rms_eps)?;
            let m = match &mut b.mixer {
                Mixer::Attention(a) => a.forward(&h, hp, n_ctx, pos, mask.as_ref())?,
                Mixer::DeltaNet(d) => d.forward(&h, &self.dn, hp.rms_eps)?,
            };
            x = (x + m)?;
            let h = norm(&x, &b.post_norm, hp.rms_eps)?;
            let mut f = b.ffn.forward(&h)?;
            if let Some(s) = &b.shared {
                let (bs, seq, d) = h.dims3()?;
                let gate = candle_nn::ops::sigmoid(&h.reshape((bs * seq, d))?.matmul(&s.gate)?)?;
                let y = s
                    .mlp
                    .forward(&h)?
                    .broadcast_mul(&gate.reshape((bs, seq, 1))?)?;
                f = (f + y)?;
            }
            x = (x + f)?;
        }
        if self.tokens.len() == self.done {
            self.tokens.extend_from_slice(tokens);
        }
        self.done += tokens.len();
        Ok(x)
    }
}

impl GatedAttention {
    fn forward(
        &mut self,
        h: &Tensor,
        hp: &HParams,
        n_ctx: usize,
        pos: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, seq, _) = h.dims3()?;
        let (nh, nkv, hd) = (hp.n_head, hp.n_kv_head, hp.head_dim);
        let [qg, k, v] = match &self.qkv {
            Qkv::Separate { q, k, v } => Matrix::forward_many([&q.w, &k.w, &v.w], h)?,
            Qkv::Fused(all) => {
                let all = all.forward(h)?;
                [
                    all.narrow(D::Minus1, 0, 2 * nh * hd)?,
                    all.narrow(D::Minus1, 2 * nh * hd, nkv * hd)?,
                    all.narrow(D::Minus1, (2 * nh + nkv) * hd, nkv * hd)?,
                ]
            }
        };
        let qg = qg.reshape((b, seq, nh, 2 * hd))?;
        let q = norm(
            &qg.narrow(D::Minus1, 0, hd)?.contiguous()?,
            &self.q_norm,
            hp.rms_eps,
        )?;
        let gate = qg
            .narrow(D::Minus1, hd, hd)?
            .contiguous()?
            .reshape((b, seq, nh * hd))?;
        let k = norm(
            &k.reshape((b, seq, nkv, hd))?.contiguous()?,
            &self.k_norm,
            hp.rms_eps,
        )?;
        let q = self.rope.apply(&q.transpose(1, 2)?.contiguous()?, pos)?;
        let k = self.rope.apply(&k.transpose(1, 2)?.contiguous()?, pos)?;
        let v = v.reshape((b, seq, nkv, hd))?.transpose(1, 2)?;
        let out = attend(&mut self.cache, hp, n_ctx, &q, &k, &v, mask)?;
        let out = (out * candle_nn::ops::sigmoid(&gate)?)?;
        self.out.forward(&out)
    }
}

/// ggml's softplus (ggml_softplus: linear above 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// ggml_l2_norm: x / max(|x|, eps).
fn l2_normalize(x: &mut [f32], eps: f32) {
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let scale = 1.0 / (sum.sqrt() as f32).max(eps);
    x.iter_mut().for_each(|v| *v *= scale);
}

/// A dot product in eight lanes, so the compiler vectorizes it (a plain `sum` must add in
/// order and does not).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A buffer the head tasks write disjoint parts of.
struct Shared(*mut f32);
// SAFETY: each task touches only its own head's state and output elements, and the buffers
// outlive the parallel call.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Through a method, so closures capture the whole (Sync) wrapper, not the raw field.
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// The delta rule for one value head over `seq` tokens (ggml's
/// gated_delta_net: decay, error against what the state recalls for k, rank-1 update,
/// read-out with q), writing the head's outputs into `out` (seq × vd).
#[allow(clippy::too_many_arguments)]
fn delta_rule(
    s: &mut [f32],
    conv: &[f32],
    gates: &[(f32, f32)],
    out: &Shared,
    head: usize,
    dn: &DeltaNetParams,
    seq: usize,
) {
    let (cd, sd, hv) = (dn.conv_dim(), dn.head_dim, dn.v_heads);
    let (kd, vd) = (dn.key_dim(), dn.value_dim());
    let kh = head % dn.k_heads;
    let scale = 1.0 / (sd as f32).sqrt();
    let mut delta = vec![0f32; sd];
    for t in 0..seq {
        let row = &conv[t * cd..(t + 1) * cd];
        let q = &row[kh * sd..(kh + 1) * sd];
        let k = &row[kd + kh * sd..kd + (kh + 1) * sd];
        let v = &row[2 * kd + head * sd..2 * kd + (head + 1) * sd];
        let (decay, beta) = gates[t * hv + head];
        s.iter_mut().for_each(|x| *x *= decay);
        for (j, d) in delta.iter_mut().enumerate() {
            *d = (v[j] - dot(&s[j * sd..(j + 1) * sd], k)) * beta;
        }
        for (j, d) in delta.iter().enumerate() {
            for (x, ki) in s[j * sd..(j + 1) * sd].iter_mut().zip(k) {
                *x += ki * d;
            }
        }
        for j in 0..sd {
            let o = dot(&s[j * sd..(j + 1) * sd], q) * scale;
            // SAFETY: element (t, head, j) belongs to this head's task alone.
            unsafe { *out.at(t * vd + head * sd + j) = o };
        }
    }
}

impl DeltaNet {
    fn forward(&mut self, h: &Tensor, dn: &DeltaNetParams, eps: f64) -> Result<Tensor> {
        let (b, seq, _) = h.dims3()?;
        if b != 1 {
            bail!("Gated DeltaNet runs one sequence at a time, not {b}");
        }
        let [qkv, z, beta, alpha] =
            Matrix::forward_many([&self.qkv, &self.z, &self.beta, &self.alpha], h)?;
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?)
        };
        let (qkv, beta, alpha) = (host(&qkv)?, host(&beta)?, host(&alpha)?);
        let (cd, kc, sd, hv) = (dn.conv_dim(), dn.d_conv, dn.head_dim, dn.v_heads);
        let (kd, vd) = (dn.key_dim(), dn.value_dim());
        let state_len = self.state.ssm.len();
        if state_len != hv * sd * sd {
            bail!(
                "Gated DeltaNet state of {state_len} values, expected {}",
                hv * sd * sd
            );
        }

        // Causal convolution over the kept inputs and the new ones (ggml_ssm_conv), then SiLU.
        let mut input = std::mem::take(&mut self.state.conv);
        input.extend_from_slice(&qkv);
        let mut conv = vec![0f32; seq * cd];
        for t in 0..seq {
            for c in 0..cd {
                let taps = &self.conv[c * kc..(c + 1) * kc];
                let sum: f32 = (0..kc).map(|j| input[(t + j) * cd + c] * taps[j]).sum();
                conv[t * cd + c] = silu(sum);
            }
        }
        self.state.conv = input[seq * cd..].to_vec();

        // Unit-length queries and keys per head; the decay exp(softplus(α + dt) · A) and
        // sigmoid(β) per token and value head.
        for row in conv.chunks_exact_mut(cd) {
            for head in row[..2 * kd].chunks_exact_mut(sd) {
                l2_normalize(head, eps as f32);
            }
        }
        let gates: Vec<(f32, f32)> = (0..seq * hv)
            .map(|i| {
                let head = i % hv;
                let g = softplus(alpha[i] + self.dt_bias[head]) * self.a[head];
                (g.exp(), sigmoid(beta[i]))
            })
            .collect();
        // The value heads are independent: one task each, over all the tokens.
        let mut out = vec![0f32; seq * vd];
        let shared = Shared(out.as_mut_ptr());
        let states = Shared(self.state.ssm.as_mut_ptr());
        let run = |heads: std::ops::Range<usize>| {
            for head in heads {
                // SAFETY: head `head`'s state slice is touched by this task alone.
                let s =
                    unsafe { std::slice::from_raw_parts_mut(states.at(head * sd * sd), sd * sd) };
                delta_rule(s, &conv, &gates, &shared, head, dn, seq);
            }
        };
        // (Small enough that the tests' prompts take the parallel path and their decode steps
        // the inline one.)
        if seq * hv * sd * sd < 1 << 14 {
            run(0..hv);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(hv, run);
        }

        // Gated RMS norm per value head: norm(o) × silu(z).
        let o = Tensor::from_vec(out, (1, seq, hv, sd), h.device())?;
        let z = z.reshape((1, seq, hv, sd))?;
        let o = (norm(&o, &self.norm, eps)? * z.silu()?)?.reshape((1, seq, vd))?;
        self.out.forward(&o)
    }
}
