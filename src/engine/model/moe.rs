//! Mixture-of-experts feed-forward (Qwen3-MoE, Mixtral): a softmax router picks the top k
//! experts per token and their outputs are summed with the chosen probabilities renormalised
//! over those k.
//!
//! Two ways to run it, chosen at load by where the weights live:
//! - on a CPU, one matrix per expert (tokentop's block kernels), routed on the host: the rows
//!   of each expert are gathered and run as one batch;
//! - on a CUDA GPU, the stacked (n_expert, rows, cols) tensors stay whole and candle's
//!   `indexed_moe_forward` runs every (token, chosen expert) pair in one launch per projection,
//!   with the routing (sort, gather, renormalise) done by tensor ops on the device, so a
//!   forward pass never waits for the router's probabilities to reach the host.

use super::kernels::{self, Job, Packed};
use super::{
    candle_type, check_shape, fetch, ff_width, matrix, Act, GateUp, Gguf, HParams, Matrix, Mlp,
};
use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor, D};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub(super) struct Moe {
    router: Matrix,
    experts: Experts,
    top_k: usize,
    /// DeepSeek's routing (model/deepseek2.rs) instead of the softmax renormalised over k.
    gating: Option<Arc<dyn Gating>>,
}

/// A router other than the softmax renormalised over the chosen k: from the router's logits
/// of each token, its chosen experts and their weights.
pub(super) trait Gating: std::fmt::Debug + Send + Sync {
    fn choose(&self, logits: &[f32], top_k: usize) -> Vec<(usize, f32)>;
}

#[derive(Debug, Clone)]
enum Experts {
    /// One MLP per expert, routed on the host.
    Split(Vec<Mlp>),
    /// Stacked tensors on a CUDA device, routed there.
    Stacked {
        gate: Arc<QTensor>,
        up: Arc<QTensor>,
        down: Arc<QTensor>,
        act: Act,
    },
}

/// The types candle's CUDA `indexed_moe_forward` handles correctly: the K-quants. Its Q8_0
/// kernel steps from one expert to the next by `n * k / 256` blocks (QK_K) where Q8_0 blocks
/// hold 32 weights (candle-kernels 0.11.1, quantized.cu `indexed_moe_forward`), so every
/// expert but the first would read the wrong weights; legacy types have no kernel. Those are
/// split per expert and routed on the host even on a GPU.
fn device_routed(dev: &Device, dtypes: &[GgmlDType]) -> bool {
    dev.is_cuda()
        && dtypes.iter().all(|d| {
            matches!(
                d,
                GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
            )
        })
}

impl Moe {
    pub(super) fn load(g: &Gguf, p: &str, hp: &HParams, act: Act, dev: &Device) -> Result<Self> {
        let (n, e) = (hp.n_expert, hp.n_embd);
        let router = matrix(g, &format!("{p}.ffn_gate_inp.weight"), n, e, dev)?;
        if hp.n_expert_used == 0 || hp.n_expert_used > n {
            bail!(
                "{}: expert_used_count is {} but it must be between 1 and expert_count {n}",
                g.path.display(),
                hp.n_expert_used
            );
        }
        let experts = if g.has_tensor(&format!("{p}.ffn_gate_exps.weight")) {
            let name = |n: &str| format!("{p}.{n}_exps.weight");
            let n_ff = match g.tensor_dims(&name("ffn_gate")) {
                Some(&[_, rows, _]) if rows > 0 => rows,
                other => bail!(
                    "{}: tensor {} has shape {other:?} but the model's hyper-parameters need [{n}, feed_forward_length, {e}]",
                    g.path.display(),
                    name("ffn_gate")
                ),
            };
            let iq = |g: &Gguf, part: &str, shape: [usize; 3]| {
                Matrix::iq_matrices(g, &name(part), &shape, dev)
            };
            // IQ / MXFP4 experts (gpt-oss, IQ2 DeepSeek): one matrix each, on tokentop's
            // kernels; a part in a candle type beside them is split as usual.
            let parts = [
                iq(g, "ffn_gate", [n, n_ff, e])?,
                iq(g, "ffn_up", [n, n_ff, e])?,
                iq(g, "ffn_down", [n, e, n_ff])?,
            ];
            if parts.iter().any(Option::is_some) {
                let [gate, up, down] = parts;
                let take = |m: Option<Vec<Matrix>>, part: &str, shape: [usize; 3]| match m {
                    Some(m) => Ok(m),
                    None => {
                        check_shape(g, &name(part), &shape)?;
                        let dtype = candle_type(g, &name(part))?;
                        let (_, dims, raw) = g.raw(&name(part))?;
                        split_experts(dtype, raw, dims, dev, |b| g.release_bytes(b))
                    }
                };
                let gate = take(gate, "ffn_gate", [n, n_ff, e])?;
                let up = take(up, "ffn_up", [n, n_ff, e])?;
                let down = take(down, "ffn_down", [n, e, n_ff])?;
                return Ok(Self {
                    router,
                    top_k: hp.n_expert_used,
                    gating: None,
                    experts: Experts::Split(
                        gate.into_iter()
                            .zip(up)
                            .zip(down)
                            .map(|((gate, up), down)| Mlp {
                                gate_up: GateUp::Separate { gate, up },
                                down,
                                act,
                            })
                            .collect(),
                    ),
                });
            }
            let shapes = [
                ("ffn_gate", [n, n_ff, e]),
                ("ffn_up", [n, n_ff, e]),
                ("ffn_down", [n, e, n_ff]),
            ];
            let mut dtypes = Vec::with_capacity(3);
            for (t, shape) in &shapes {
                check_shape(g, &name(t), shape)?;
                dtypes.push(candle_type(g, &name(t))?);
            }
            if device_routed(dev, &dtypes) {
                let mut stacked = Vec::with_capacity(3);
                for (t, shape) in &shapes {
                    stacked.push(Arc::new(fetch(g, &name(t), shape, dev)?));
                    g.release(&name(t));
                }
                let [gate, up, down] = <[Arc<QTensor>; 3]>::try_from(stacked)
                    .map_err(|_| anyhow::anyhow!("three stacked expert tensors"))?;
                Experts::Stacked {
                    gate,
                    up,
                    down,
                    act,
                }
            } else {
                // Each expert's matrix is built straight from its slice of the map (no copy
                // of the whole stacked tensor), and its pages are given back once it is.
                let split = |t: &str, dtype: GgmlDType| -> Result<Vec<Matrix>> {
                    let (_, dims, raw) = g.raw(&name(t))?;
                    split_experts(dtype, raw, dims, dev, |b| g.release_bytes(b))
                };
                let (gate, up, down) = (
                    split("ffn_gate", dtypes[0])?,
                    split("ffn_up", dtypes[1])?,
                    split("ffn_down", dtypes[2])?,
                );
                Experts::Split(
                    gate.into_iter()
                        .zip(up)
                        .zip(down)
                        .map(|((gate, up), down)| Mlp {
                            gate_up: GateUp::Separate { gate, up },
                            down,
                            act,
                        })
                        .collect(),
                )
            }
        } else {
            // Older Mixtral GGUFs store one tensor per expert.
            let mut experts = Vec::with_capacity(n);
            for x in 0..n {
                let name = |n: &str| format!("{p}.{n}.{x}.weight");
                let n_ff = ff_width(g, &name("ffn_gate"), e, 1)?;
                let t = |g: &Gguf, n: &str, [rows, cols]: [usize; 2]| -> Result<Matrix> {
                    matrix(g, &name(n), rows, cols, dev)
                };
                experts.push(Mlp {
                    gate_up: GateUp::Separate {
                        gate: t(g, "ffn_gate", [n_ff, e])?,
                        up: t(g, "ffn_up", [n_ff, e])?,
                    },
                    down: t(g, "ffn_down", [e, n_ff])?,
                    act,
                });
            }
            Experts::Split(experts)
        };
        Ok(Self {
            router,
            experts,
            top_k: hp.n_expert_used,
            gating: None,
        })
    }

    /// The same experts routed by `gating`.
    pub(super) fn with_gating(mut self, gating: Arc<dyn Gating>) -> Self {
        self.gating = Some(gating);
        self
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, seq, d) = x.dims3()?;
        let xs = x.reshape((b * seq, d))?;
        let logits = self.router.forward(&xs)?;
        if let Some(gating) = &self.gating {
            let routes = gated_routes(gating.as_ref(), &logits, self.top_k, self.n_expert())?;
            let out = match &self.experts {
                Experts::Split(experts) => match packed_experts(experts) {
                    Some(parts) => one_region_with(&parts, experts[0].act, &xs, routes)?,
                    None => host_routed_with(experts, &xs, routes)?,
                },
                Experts::Stacked {
                    gate,
                    up,
                    down,
                    act,
                } => {
                    let (ids, w) = routes_as_tensors(&routes, b * seq, self.top_k, xs.device())?;
                    stacked_with(&ids, &w, &xs, [gate, up, down], *act, |w, x, ids| {
                        Ok(w.indexed_moe_forward(&fresh(x)?, ids)?)
                    })?
                }
            };
            return Ok(out.reshape((b, seq, d))?);
        }
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let out = match &self.experts {
            Experts::Split(experts) => match packed_experts(experts) {
                Some(parts) => one_region_routed(&parts, experts[0].act, self.top_k, &xs, &probs)?,
                None => host_routed(experts, self.top_k, &xs, &probs)?,
            },
            Experts::Stacked {
                gate,
                up,
                down,
                act,
            } => stacked_routed(
                &probs,
                self.top_k,
                &xs,
                [gate, up, down],
                *act,
                |w, x, ids| Ok(w.indexed_moe_forward(&fresh(x)?, ids)?),
            )?,
        };
        Ok(out.reshape((b, seq, d))?)
    }

    fn n_expert(&self) -> usize {
        match &self.experts {
            Experts::Split(e) => e.len(),
            Experts::Stacked { gate, .. } => gate.shape().dims()[0],
        }
    }
}

/// Each token's experts and weights as `gating` chooses them, per expert.
fn gated_routes(gating: &dyn Gating, logits: &Tensor, top_k: usize, n: usize) -> Result<Routes> {
    let logits: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    let mut rows = vec![Vec::<u32>::new(); n];
    let mut weights = vec![Vec::<f32>::new(); n];
    for (row, l) in logits.iter().enumerate() {
        for (e, w) in gating.choose(l, top_k) {
            if e >= n {
                bail!("the router chose expert {e} of {n}");
            }
            rows[e].push(row as u32);
            weights[e].push(w);
        }
    }
    Ok((rows, weights))
}

/// Per-expert routes as the (tokens, k) ids and weights the device route takes.
fn routes_as_tensors(
    (rows, weights): &Routes,
    tokens: usize,
    k: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut ids = vec![Vec::with_capacity(k); tokens];
    let mut ws = vec![Vec::with_capacity(k); tokens];
    for (e, (r, w)) in rows.iter().zip(weights).enumerate() {
        for (&t, &w) in r.iter().zip(w) {
            ids[t as usize].push(e as u32);
            ws[t as usize].push(w);
        }
    }
    if ids.iter().any(|i| i.len() != k) {
        bail!("the router chose other than {k} experts for a token");
    }
    let ids: Vec<u32> = ids.concat();
    let ws: Vec<f32> = ws.concat();
    Ok((
        Tensor::from_vec(ids, (tokens, k), dev)?,
        Tensor::from_vec(ws, (tokens, k), dev)?,
    ))
}

/// Top-k routing by tensor ops, so it runs wherever `probs` (tokens, n_expert) lives: the
/// chosen experts (tokens, k) as u32 and their probabilities renormalised over the k.
pub(super) fn route(probs: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let ids = probs
        .arg_sort_last_dim(false)?
        .narrow(D::Minus1, 0, k)?
        .contiguous()?;
    let w = probs.contiguous()?.gather(&ids, D::Minus1)?;
    let w = w.broadcast_div(&w.sum_keepdim(D::Minus1)?)?;
    Ok((ids, w))
}

/// The device route: `mm(w, x, ids)` multiplies, for each token t and its j-th chosen expert
/// e = ids[t, j], the row x[t, j] (or x[t, 0] when x has one row per token) by expert e's
/// matrix in the stacked `w`, giving (tokens, k, rows) — candle's `indexed_moe_forward`.
fn stacked_routed(
    probs: &Tensor,
    top_k: usize,
    xs: &Tensor,
    [gate, up, down]: [&QTensor; 3],
    act: Act,
    mm: impl Fn(&QTensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (ids, w) = route(probs, top_k)?;
    stacked_with(&ids, &w, xs, [gate, up, down], act, mm)
}

/// The device route on chosen experts `ids` (tokens, k) with weights `w` (tokens, k).
fn stacked_with(
    ids: &Tensor,
    w: &Tensor,
    xs: &Tensor,
    [gate, up, down]: [&QTensor; 3],
    act: Act,
    mm: impl Fn(&QTensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    // (tokens, 1, d): every chosen expert of a token reads the same row.
    let xs = xs.unsqueeze(1)?;
    let g = mm(gate, &xs, ids)?;
    let u = mm(up, &xs, ids)?;
    // (tokens, k, n_ff): each (token, expert) pair reads its own row.
    let h = (act.apply(&g)? * u)?;
    let y = mm(down, &h, ids)?;
    Ok(y.broadcast_mul(&w.unsqueeze(D::Minus1)?)?.sum(1)?)
}

/// candle's CUDA `indexed_moe_forward` reads its input from the start of its buffer, so it
/// must be given a contiguous tensor that owns its storage from offset 0.
fn fresh(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() && x.layout().start_offset() == 0 {
        Ok(x.clone())
    } else {
        Ok(x.copy()?)
    }
}

/// Chosen experts per token: for each expert, the token rows it was chosen for and their
/// renormalised probabilities.
type Routes = (Vec<Vec<u32>>, Vec<Vec<f32>>);

pub(super) fn host_routes(probs: &Tensor, top_k: usize, n_expert: usize) -> Result<Routes> {
    let probs: Vec<Vec<f32>> = probs.to_vec2()?;
    let mut rows = vec![Vec::<u32>::new(); n_expert];
    let mut weights = vec![Vec::<f32>::new(); n_expert];
    for (row, p) in probs.iter().enumerate() {
        let mut idx: Vec<usize> = (0..p.len()).collect();
        idx.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]));
        let chosen = &idx[..top_k.min(idx.len())];
        let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
        for &e in chosen {
            rows[e].push(row as u32);
            weights[e].push(p[e] / sum);
        }
    }
    Ok((rows, weights))
}

/// Every expert's gate, up and down as tokentop's packed block matrices of one kind and
/// width, or None (candle's matrices, mixed kinds).
fn packed_experts(experts: &[Mlp]) -> Option<Vec<[&Packed; 3]>> {
    let parts: Vec<[&Packed; 3]> = experts
        .iter()
        .map(|e| match (&e.gate_up, &e.down) {
            (
                GateUp::Separate {
                    gate: Matrix::Blocks(g),
                    up: Matrix::Blocks(u),
                },
                Matrix::Blocks(d),
            ) => Some([g.as_ref(), u.as_ref(), d.as_ref()]),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let same = |i: usize| {
        parts
            .iter()
            .all(|p| p[i].kind == parts[0][i].kind && p[i].k == parts[0][i].k)
    };
    (same(0) && same(1) && parts.iter().all(|p| p[1].kind == p[0].kind) && same(2)).then_some(parts)
}

/// The host route on packed experts, as llama.cpp's mul_mat_id: gate and up of every chosen
/// expert (each on the rows routed to it) in one parallel region, then every down in a
/// second, instead of a region per expert and projection.
fn one_region_routed(
    parts: &[[&Packed; 3]],
    act: Act,
    top_k: usize,
    xs: &Tensor,
    probs: &Tensor,
) -> Result<Tensor> {
    let routes = host_routes(probs, top_k, parts.len())?;
    one_region_with(parts, act, xs, routes)
}

/// `one_region_routed` on routes already chosen.
fn one_region_with(
    parts: &[[&Packed; 3]],
    act: Act,
    xs: &Tensor,
    (rows, weights): Routes,
) -> Result<Tensor> {
    let (tokens, d) = xs.dims2()?;
    let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
    let used: Vec<usize> = (0..parts.len()).filter(|&e| !rows[e].is_empty()).collect();
    let inputs: Vec<Vec<f32>> = used
        .iter()
        .map(|&e| {
            rows[e]
                .iter()
                .flat_map(|&r| &x[r as usize * d..(r as usize + 1) * d])
                .copied()
                .collect()
        })
        .collect();
    let jobs: Vec<Job> = used
        .iter()
        .zip(&inputs)
        .flat_map(|(&e, x)| [Job { w: parts[e][0], x }, Job { w: parts[e][1], x }])
        .collect();
    let gate_up = kernels::matmul_jobs(&jobs);
    let hidden: Vec<Vec<f32>> = gate_up
        .chunks(2)
        .map(|gu| {
            gu[0]
                .iter()
                .zip(&gu[1])
                .map(|(&g, &u)| act.apply_f32(g) * u)
                .collect()
        })
        .collect();
    let jobs: Vec<Job> = used
        .iter()
        .zip(&hidden)
        .map(|(&e, x)| Job { w: parts[e][2], x })
        .collect();
    let downs = kernels::matmul_jobs(&jobs);
    let mut out = vec![0f32; tokens * d];
    for (&e, y) in used.iter().zip(&downs) {
        for (i, (&r, &w)) in rows[e].iter().zip(&weights[e]).enumerate() {
            let o = &mut out[r as usize * d..(r as usize + 1) * d];
            for (o, &v) in o.iter_mut().zip(&y[i * d..(i + 1) * d]) {
                *o += w * v;
            }
        }
    }
    Ok(Tensor::from_vec(out, (tokens, d), xs.device())?)
}

/// The host route: the probabilities are read back, the rows each expert was chosen for are
/// gathered and run through it as one batch, and the weighted outputs are added back.
fn host_routed(experts: &[Mlp], top_k: usize, xs: &Tensor, probs: &Tensor) -> Result<Tensor> {
    let routes = host_routes(probs, top_k, experts.len())?;
    host_routed_with(experts, xs, routes)
}

/// `host_routed` on routes already chosen.
fn host_routed_with(experts: &[Mlp], xs: &Tensor, (rows, weights): Routes) -> Result<Tensor> {
    let mut out = xs.zeros_like()?;
    for (e, expert) in experts.iter().enumerate() {
        if rows[e].is_empty() {
            continue;
        }
        let idx = Tensor::new(rows[e].as_slice(), xs.device())?;
        let w = Tensor::new(weights[e].as_slice(), xs.device())?.reshape(((), 1))?;
        let y = expert
            .forward(&xs.index_select(&idx, 0)?)?
            .broadcast_mul(&w)?;
        out = out.index_add(&idx, &y, 0)?;
    }
    Ok(out)
}

/// Splits a stacked (n_expert, rows, cols) quantized tensor, as the file stores it, into one
/// matrix per expert; the blocks of each expert are contiguous, so this is a byte split. For
/// the block kernels every expert is repacked in one pass into one shared buffer (see
/// model.rs's `pack_stacked`).
pub(super) fn split_experts(
    dtype: GgmlDType,
    data: &[u8],
    dims: &[usize],
    dev: &Device,
    built: impl Fn(&[u8]),
) -> Result<Vec<Matrix>> {
    let [n, rows, cols] = dims[..] else {
        bail!("stacked expert tensor has shape {dims:?}, expected 3 dimensions");
    };
    if n == 0 || !data.len().is_multiple_of(n) {
        bail!(
            "stacked expert tensor of shape {dims:?} holds {} bytes",
            data.len()
        );
    }
    Matrix::stacked_from_bytes(dtype, data, n, rows, cols, dev, &built)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest difference between two outputs, and the largest magnitude of `want`.
    fn diff_and_scale(got: &Tensor, want: &Tensor) -> (f32, f32) {
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        (max((got - want).unwrap()), max(want.clone()))
    }

    /// Deterministic values in [-scale, scale): the tests must not depend on a random draw.
    fn values(shape: impl Into<candle_core::Shape>, scale: f32, seed: u64) -> Tensor {
        let shape = shape.into();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The device route picks the same experts with the same weights as the host route.
    #[test]
    fn tensor_routing_matches_host_routing() {
        let logits = values((7, 16), 4.0, 1);
        let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let (ids, w) = route(&probs, 3).unwrap();
        let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        let w: Vec<Vec<f32>> = w.to_vec2().unwrap();
        for (row, p) in probs.to_vec2::<f32>().unwrap().iter().enumerate() {
            let mut idx: Vec<usize> = (0..p.len()).collect();
            idx.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]));
            let sum: f32 = idx[..3].iter().map(|&e| p[e]).sum();
            for j in 0..3 {
                assert_eq!(ids[row][j] as usize, idx[j], "row {row}");
                assert!((w[row][j] - p[idx[j]] / sum).abs() < 1e-6, "row {row}");
            }
            assert!((w[row].iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    /// What `indexed_moe_forward` computes, on the CPU from dequantized weights.
    fn indexed_reference(w: &QTensor, x: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let w = w.dequantize(&Device::Cpu)?;
        let ids: Vec<Vec<u32>> = ids.to_vec2()?;
        let mut rows = Vec::new();
        for (t, chosen) in ids.iter().enumerate() {
            for (j, &e) in chosen.iter().enumerate() {
                let xr = x.get(t)?.get(if x.dim(1)? == 1 { 0 } else { j })?;
                let we = w.get(e as usize)?;
                rows.push(we.matmul(&xr.unsqueeze(1)?)?.squeeze(1)?);
            }
        }
        Ok(Tensor::stack(&rows, 0)?.reshape((ids.len(), ids[0].len(), ()))?)
    }

    /// The device route (stacked experts, one indexed matmul per projection) gives the host
    /// route's output on the same Q4_K experts.
    #[test]
    fn stacked_route_matches_host_route() {
        let dev = Device::Cpu;
        let (n_exp, d, ff, k, tokens) = (6, 256, 512, 2, 5);
        let q = |shape: (usize, usize, usize), seed| {
            let t = values(shape, 0.1, seed);
            QTensor::quantize(&t, GgmlDType::Q4K).unwrap()
        };
        let (gate, up, down) = (
            q((n_exp, ff, d), 2),
            q((n_exp, ff, d), 3),
            q((n_exp, d, ff), 4),
        );
        let xs = values((tokens, d), 1.0, 5);
        let logits = values((tokens, n_exp), 4.0, 6);
        let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let device = stacked_routed(
            &probs,
            k,
            &xs,
            [&gate, &up, &down],
            Act::Silu,
            indexed_reference,
        )
        .unwrap();
        let split = |t: &QTensor| {
            let data = t.data().unwrap();
            split_experts(t.dtype(), &data, t.shape().dims(), &dev, |_| ()).unwrap()
        };
        let experts: Vec<Mlp> = split(&gate)
            .into_iter()
            .zip(split(&up))
            .zip(split(&down))
            .map(|((gate, up), down)| Mlp {
                gate_up: GateUp::Separate { gate, up },
                down,
                act: Act::Silu,
            })
            .collect();
        let host = host_routed(&experts, k, &xs, &probs).unwrap();
        let (diff, scale) = diff_and_scale(&device, &host);
        // The host route quantizes activations (q8_K, twice) for candle's Q4_K kernel; the
        // reference multiplies dequantized weights in f32: they differ by 1.8% of the scale
        // here. Swapping gate and up differs by 56%.
        assert!(
            diff < 0.05 * scale,
            "routes differ by {diff} (outputs up to {scale})"
        );
    }

    /// Packed experts routed in two parallel regions give the per-expert route's output.
    /// The experts of a stacked tensor, packed in one pass into one shared buffer (large
    /// enough here to be an anonymous map), are the matrices each expert's bytes packed alone
    /// give: the same rows back and bit-identical products, for legacy and K-quant types, with
    /// row counts that leave a partial group or tile inside every expert; and every byte of
    /// the map is given back once, in order.
    #[test]
    fn experts_packed_in_one_pass_equal_each_packed_alone() {
        if !kernels::simd() {
            eprintln!("SKIPPED: no block kernels on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let (n_exp, rows) = (8, 262);
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let Some(kind) = kernels::Kind::from_dtype(dtype) else {
                eprintln!("SKIPPED {dtype:?}: candle's kernels run it on this CPU");
                continue;
            };
            let cols = kind.block_weights() * if kind.kquant().is_some() { 8 } else { 64 };
            let w = QTensor::quantize(&values((n_exp, rows, cols), 1.0, 9), dtype).unwrap();
            let raw = w.data().unwrap();
            assert!(
                Packed::packed_len(kind, rows, cols) * n_exp >= 2 << 20,
                "{dtype:?}: the test's buffer should be a map"
            );
            let spans = std::cell::RefCell::new(Vec::new());
            let base = raw.as_ptr() as usize;
            let experts = split_experts(dtype, &raw, &[n_exp, rows, cols], &dev, |b| {
                spans
                    .borrow_mut()
                    .push((b.as_ptr() as usize - base, b.len()))
            })
            .unwrap();
            let mut at = 0;
            for (start, len) in spans.into_inner() {
                assert_eq!(start, at, "{dtype:?}: spans given back in order, once");
                at += len;
            }
            assert_eq!(at, raw.len(), "{dtype:?}: every byte given back");
            let per = raw.len() / n_exp;
            let x: Vec<f32> = (0..3 * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for (e, m) in experts.iter().enumerate() {
                let Matrix::Blocks(shared) = m else {
                    panic!("{dtype:?} expert {e} is not packed");
                };
                let alone = Packed::new(kind, &raw[e * per..(e + 1) * per], rows, cols);
                for j in 0..rows {
                    alone.dequantize_row(j, &mut a);
                    shared.dequantize_row(j, &mut b);
                    assert_eq!(a, b, "{dtype:?} expert {e} row {j}");
                }
                let (ya, yb) = (
                    kernels::matmul(&alone, &x, 3),
                    kernels::matmul(shared, &x, 3),
                );
                assert!(
                    ya.iter().zip(&yb).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?} expert {e}"
                );
            }
        }
    }

    #[test]
    fn one_region_route_matches_the_per_expert_route() {
        if !kernels::simd() {
            eprintln!("SKIPPED: no block kernels on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let (n_exp, d, ff, k, tokens) = (6, 64, 96, 2, 9);
        let split = |shape: (usize, usize, usize), seed| {
            let q = QTensor::quantize(&values(shape, 0.1, seed), GgmlDType::Q4_0).unwrap();
            split_experts(
                q.dtype(),
                &q.data().unwrap(),
                q.shape().dims(),
                &dev,
                |_| (),
            )
            .unwrap()
        };
        let experts: Vec<Mlp> = split((n_exp, ff, d), 2)
            .into_iter()
            .zip(split((n_exp, ff, d), 3))
            .zip(split((n_exp, d, ff), 4))
            .map(|((gate, up), down)| Mlp {
                gate_up: GateUp::Separate { gate, up },
                down,
                act: Act::Silu,
            })
            .collect();
        let parts = packed_experts(&experts).expect("Q4_0 experts are packed");
        let xs = values((tokens, d), 1.0, 5);
        let probs = candle_nn::ops::softmax_last_dim(&values((tokens, n_exp), 4.0, 6)).unwrap();
        let one = one_region_routed(&parts, Act::Silu, k, &xs, &probs).unwrap();
        let each = host_routed(&experts, k, &xs, &probs).unwrap();
        let (diff, scale) = diff_and_scale(&one, &each);
        // The same kernels on the same rows; only SiLU is computed by another expression.
        assert!(
            diff <= 1e-5 * scale,
            "routes differ by {diff} (outputs up to {scale})"
        );
    }
}
