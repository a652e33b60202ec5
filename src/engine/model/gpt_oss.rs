//! gpt-oss (OpenAI's open-weight MoE; llama.cpp's `LLM_ARCH_OPENAI_MOE`, src/models/openai-moe.cpp):
//! what it adds to the shared transformer, following llama.cpp:
//! - sliding-window attention on every other layer (`attention.sliding_window`, pattern 2: even
//!   layers windowed, odd layers full), and an attention sink per head: a learned logit that
//!   joins the softmax of that head's scores and takes its share of the probability;
//! - biases on Q/K/V, on the attention output, on the router and on every expert;
//! - the experts' SwiGLU variant (`ggml_swiglu_oai`, alpha 1.702, limit 7.0):
//!   `min(g, 7)·σ(1.702·min(g, 7)) · (clamp(u, -7, 7) + 1)`;
//! - routing by the top k router logits, weighted by the softmax over those k
//!   (`LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT`);
//! - YaRN rotary scaling as llama.cpp loads it (`rope.scaling.*`), NeoX layout;
//! - the pre-FFN norm stored as `post_attention_norm`, no `ffn_norm`.

use super::moe::{host_routes, split_experts};
use super::{candle_type, check_finite, check_shape, fetch, matrix, Gguf, HParams, Matrix, Rope};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// ggml_swiglu_oai's constants as llama.cpp's build_moe_ffn passes them.
const SWIGLU_ALPHA: f32 = 1.702;
const SWIGLU_LIMIT: f32 = 7.0;

/// YaRN rotary scaling, with the values llama.cpp derives from the GGUF (llama-model.cpp's
/// rope hparams, llama-context.cpp's cparams) for ggml_rope_ext.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// 1 / rope.scaling.factor.
    pub freq_scale: f32,
    /// rope.scaling.original_context_length (else the training context).
    pub orig_ctx: usize,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

/// gpt-oss's hyper-parameters on top of the common ones.
pub(super) fn hparams(g: &Gguf, mut hp: HParams) -> Result<HParams> {
    let p = hp.arch.as_str();
    let key = |k: &str| format!("{p}.{k}");
    let file = g.path.display();
    if hp.sliding_window.is_none() {
        bail!("{file} lacks {p}.attention.sliding_window, which gpt-oss needs");
    }
    if hp.n_expert == 0 {
        bail!("{file} lacks {p}.expert_count, which gpt-oss needs");
    }
    hp.swa_period = g
        .get_u32(&key("attention.sliding_window_pattern"))
        .unwrap_or(2) as usize;
    hp.rope_base_local = g
        .get_f32(&key("rope.freq_base_swa"))
        .unwrap_or(hp.rope_base);
    if g.get_str(&key("rope.scaling.type")) == Some("yarn") {
        let factor = g.get_f32(&key("rope.scaling.factor")).unwrap_or(0.0);
        if !factor.is_finite() || factor < 0.0 {
            bail!("{file}: {p}.rope.scaling.factor is {factor}, not a valid scaling factor");
        }
        let freq_scale = if factor == 0.0 { 1.0 } else { 1.0 / factor };
        // llama-context.cpp: ext_factor 1 for YaRN; attn_factor is get_mscale(factor) with
        // the magnitude ggml's rope adds (1 + 0.1 ln factor) cancelled, times
        // rope.scaling.attn_factor.
        let factor = 1.0 / freq_scale;
        let mscale = if factor <= 1.0 {
            1.0
        } else {
            0.1 * factor.ln() + 1.0
        };
        let attn_factor = mscale
            * (1.0 / (1.0 + 0.1 * factor.ln()))
            * g.get_f32(&key("rope.scaling.attn_factor")).unwrap_or(1.0);
        let orig_ctx = g
            .get_u32(&key("rope.scaling.original_context_length"))
            .map_or(hp.train_ctx, |v| v as usize);
        if orig_ctx == 0 || !attn_factor.is_finite() {
            bail!("{file}: {p}.rope.scaling.original_context_length or attn_factor is invalid");
        }
        hp.yarn = Some(Yarn {
            freq_scale,
            orig_ctx,
            ext_factor: 1.0,
            attn_factor,
            beta_fast: 32.0,
            beta_slow: 1.0,
        });
    }
    Ok(hp)
}

/// ggml_rope_yarn_corr_dim.
fn corr_dim(n_dims: usize, n_ctx_orig: usize, n_rot: f32, base: f32) -> f32 {
    n_dims as f32 * (n_ctx_orig as f32 / (n_rot * 2.0 * std::f32::consts::PI)).ln()
        / (2.0 * base.ln())
}

/// The rotary tables of one frequency base: with YaRN as ggml's CPU rope computes them
/// (ggml_rope_cache_init / rope_yarn, theta stepped by repeated multiplication in f32 as
/// there), else the plain ones.
pub(super) fn rope(hp: &HParams, base: f32, max_pos: usize, dev: &Device) -> Result<Rope> {
    let Some(y) = hp.yarn else {
        return Rope::new(hp, base, hp.rope_scale_global, None, max_pos, dev);
    };
    let n_dims = hp.rope_dim;
    let half = n_dims / 2;
    let theta_scale = base.powf(-2.0 / n_dims as f32);
    let low = corr_dim(n_dims, y.orig_ctx, y.beta_fast, base)
        .floor()
        .max(0.0);
    let high = corr_dim(n_dims, y.orig_ctx, y.beta_slow, base)
        .ceil()
        .min(n_dims as f32 - 1.0);
    let ramp = |i0: usize| {
        let v = ((i0 / 2) as f32 - low) / (high - low).max(0.001);
        1.0 - v.clamp(0.0, 1.0)
    };
    let mut mscale = y.attn_factor;
    if y.ext_factor != 0.0 {
        mscale *= 1.0 + 0.1 * (1.0 / y.freq_scale).ln();
    }
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for pos in 0..max_pos {
        let mut theta_extrap = pos as f32;
        for i in 0..half {
            let theta_interp = y.freq_scale * theta_extrap;
            let theta = if y.ext_factor != 0.0 {
                let mix = ramp(2 * i) * y.ext_factor;
                theta_interp * (1.0 - mix) + theta_extrap * mix
            } else {
                theta_interp
            };
            cos.push(theta.cos() * mscale);
            sin.push(theta.sin() * mscale);
            theta_extrap *= theta_scale;
        }
    }
    Ok(Rope {
        cos: Tensor::from_vec(cos, (max_pos, half), dev)?,
        sin: Tensor::from_vec(sin, (max_pos, half), dev)?,
        dim: n_dims,
        neox: true,
    })
}

/// Softmax over the last dimension of `att` (b·n_kv groups, n_rep·seq rows, keys) with each
/// head's sink logit joining its rows, as ggml_soft_max_ext with sinks: the sink takes its
/// share of the probability and is dropped from the output. `sinks` holds one (unscaled)
/// logit per query head; head = kv·n_rep + r for row r·seq + s of group kv.
pub(super) fn softmax_with_sinks(
    att: &Tensor,
    sinks: &Tensor,
    (b, nkv, n_rep, seq): (usize, usize, usize, usize),
) -> Result<Tensor> {
    let (groups, rows, keys) = att.dims3()?;
    let col = sinks
        .to_dtype(att.dtype())?
        .reshape((1, nkv, n_rep, 1, 1))?
        .broadcast_as((b, nkv, n_rep, seq, 1))?
        .reshape((groups, rows, 1))?;
    let all = Tensor::cat(&[att, &col], 2)?;
    Ok(candle_nn::ops::softmax_last_dim(&all)?
        .narrow(2, 0, keys)?
        .contiguous()?)
}

/// ggml_swiglu_oai on the gate and up projections.
fn swiglu_oai(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let x = gate.minimum(SWIGLU_LIMIT)?;
    let y = up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)?;
    let glu = x.div(&(x.affine(-SWIGLU_ALPHA as f64, 0.0)?.exp()? + 1.0)?)?;
    Ok(glu.mul(&(y + 1.0)?)?)
}

#[derive(Debug, Clone)]
struct Expert {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

/// gpt-oss's mixture of experts: biased router, biased experts, SwiGLU-OAI, softmax over the
/// chosen k. Routed on the host: the rows each expert was chosen for run through it as one
/// batch (any weight type: MXFP4 on tokentop's kernels, the rest through `Matrix`).
#[derive(Debug, Clone)]
pub(super) struct Moe {
    router: Matrix,
    router_b: Tensor,
    experts: Vec<Expert>,
    /// (n_expert, n_ff), (n_expert, n_ff), (n_expert, n_embd).
    gate_b: Tensor,
    up_b: Tensor,
    down_b: Tensor,
    top_k: usize,
}

impl Moe {
    pub(super) fn load(g: &Gguf, p: &str, hp: &HParams, dev: &Device) -> Result<Self> {
        let (n, e) = (hp.n_expert, hp.n_embd);
        let file = g.path.display().to_string();
        if hp.n_expert_used == 0 || hp.n_expert_used > n {
            bail!(
                "{file}: expert_used_count is {} but it must be between 1 and expert_count {n}",
                hp.n_expert_used
            );
        }
        let name = |part: &str, what: &str| format!("{p}.{part}.{what}");
        let n_ff = match g.tensor_dims(&name("ffn_gate_exps", "weight")) {
            Some(&[count, rows, cols]) if count == n && cols == e && rows > 0 => rows,
            other => bail!(
                "{file}: tensor {} has shape {} but the model's hyper-parameters need [{n}, expert_feed_forward_length, {e}]",
                name("ffn_gate_exps", "weight"),
                other.map_or("(missing)".to_string(), |d| format!("{d:?}"))
            ),
        };
        let vec = |g: &Gguf, t: &str, shape: &[usize]| -> Result<Tensor> {
            let v = fetch(g, t, shape, dev)?.dequantize(dev)?;
            check_finite(g, t, &v)?;
            Ok(v)
        };
        let router = matrix(g, &name("ffn_gate_inp", "weight"), n, e, dev)?;
        let router_b = vec(g, &name("ffn_gate_inp", "bias"), &[n])?;
        let stacked = |g: &Gguf, part: &str, shape: [usize; 3]| -> Result<Vec<Matrix>> {
            let t = name(part, "weight");
            match Matrix::iq_matrices(g, &t, &shape, dev)? {
                Some(ms) => Ok(ms),
                None => {
                    check_shape(g, &t, &shape)?;
                    let dtype = candle_type(g, &t)?;
                    let (_, dims, raw) = g.raw(&t)?;
                    split_experts(dtype, raw, dims, dev, |b| g.release_bytes(b))
                }
            }
        };
        let gate = stacked(g, "ffn_gate_exps", [n, n_ff, e])?;
        let up = stacked(g, "ffn_up_exps", [n, n_ff, e])?;
        let down = stacked(g, "ffn_down_exps", [n, e, n_ff])?;
        let experts = gate
            .into_iter()
            .zip(up)
            .zip(down)
            .map(|((gate, up), down)| Expert { gate, up, down })
            .collect();
        Ok(Self {
            router,
            router_b,
            experts,
            gate_b: vec(g, &name("ffn_gate_exps", "bias"), &[n, n_ff])?,
            up_b: vec(g, &name("ffn_up_exps", "bias"), &[n, n_ff])?,
            down_b: vec(g, &name("ffn_down_exps", "bias"), &[n, e])?,
            top_k: hp.n_expert_used,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, seq, d) = x.dims3()?;
        let xs = x.reshape((b * seq, d))?;
        let logits = self.router.forward(&xs)?.broadcast_add(&self.router_b)?;
        // The softmax over all experts renormalised over the chosen k is the softmax over
        // the chosen k logits (llama.cpp's SOFTMAX_WEIGHT gating).
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let (rows, weights) = host_routes(&probs, self.top_k, self.experts.len())?;
        let mut out = xs.zeros_like()?;
        for (e, ex) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(rows[e].as_slice(), xs.device())?;
            let xe = xs.index_select(&idx, 0)?;
            let [gate, up] = Matrix::forward_many([&ex.gate, &ex.up], &xe)?;
            let gate = gate.broadcast_add(&self.gate_b.get(e)?)?;
            let up = up.broadcast_add(&self.up_b.get(e)?)?;
            let y = ex
                .down
                .forward(&swiglu_oai(&gate, &up)?)?
                .broadcast_add(&self.down_b.get(e)?)?;
            let w = Tensor::new(weights[e].as_slice(), xs.device())?.reshape(((), 1))?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out.reshape((b, seq, d))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml_swiglu_oai's formula, value by value (ggml-cpu ops.cpp).
    #[test]
    fn swiglu_oai_clamps_as_ggml_does() {
        let g = [-9.0f32, -1.0, 0.0, 0.5, 6.9, 7.0, 12.0];
        let u = [-9.0f32, 3.0, 1.0, -0.5, 8.0, -7.5, 0.25];
        let dev = Device::Cpu;
        let got: Vec<f32> = swiglu_oai(
            &Tensor::new(&g[..], &dev).unwrap(),
            &Tensor::new(&u[..], &dev).unwrap(),
        )
        .unwrap()
        .to_vec1()
        .unwrap();
        for i in 0..g.len() {
            let x = g[i].min(7.0);
            let y = u[i].clamp(-7.0, 7.0);
            let want = x / (1.0 + (1.702 * -x).exp()) * (y + 1.0);
            assert!((got[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "{i}");
        }
        // The limit bites: a gate of 12 acts as 7, an up of -7.5 as -7.
        assert!((got[6] - 7.0 / (1.0 + (-1.702f32 * 7.0).exp()) * 1.25).abs() < 1e-5);
        assert!((got[5] - 7.0 / (1.0 + (-1.702f32 * 7.0).exp()) * -6.0).abs() < 1e-5);
    }

    /// A sink takes its share of the probability: the visible weights sum to
    /// 1 − σ(sink − logsumexp(scores)), and a sink of −∞ changes nothing.
    #[test]
    fn sinks_take_their_share() {
        let dev = Device::Cpu;
        // 2 KV groups × 2 heads each × 3 query rows, 5 keys.
        let att = Tensor::arange(0f32, 60.0, &dev)
            .unwrap()
            .affine(0.37, -3.0)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((2, 6, 5))
            .unwrap();
        let sinks = Tensor::new(&[0.5f32, -1.0, 2.0, f32::NEG_INFINITY], &dev).unwrap();
        let p: Vec<Vec<Vec<f32>>> = softmax_with_sinks(&att, &sinks, (1, 2, 2, 3))
            .unwrap()
            .to_vec3()
            .unwrap();
        let a: Vec<Vec<Vec<f32>>> = att.to_vec3().unwrap();
        let s = [0.5f32, -1.0, 2.0, f32::NEG_INFINITY];
        for kv in 0..2 {
            for row in 0..6 {
                let head = kv * 2 + row / 3;
                let z: f32 = a[kv][row].iter().map(|v| v.exp()).sum();
                let want = z / (z + s[head].exp());
                let sum: f32 = p[kv][row].iter().sum();
                assert!((sum - want).abs() < 1e-6, "group {kv} row {row}");
            }
        }
    }
}
