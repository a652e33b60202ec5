//! Tiny random-weight GGUF files for every supported architecture, written with candle's
//! GGUF writer, so tests (and anyone checking an install) can load and run each
//! architecture in milliseconds without downloading a model.

use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// `general.architecture`.
    pub arch: String,
    /// Mixture of experts (qwen3moe always is; llama with experts is Mixtral).
    pub experts: Option<SynthExperts>,
    /// Quantization of the big matrices.
    pub dtype: GgmlDType,
    pub n_layer: usize,
    pub context_length: usize,
    /// SentencePiece vocabulary (Gemma style) instead of byte-level BPE.
    pub sentencepiece: bool,
    pub seed: u64,
    /// Layer widths: tiny by default; `SynthDims::preset` gives the shapes of real models.
    pub dims: SynthDims,
    /// Quantize like llama.cpp's Q4_K_M: Q6_K for the output and for `attn_v` / `ffn_down` in
    /// the layers llama.cpp gives more bits; `dtype` elsewhere.
    pub k_mix: bool,
    /// Experts in MXFP4 (ggml type 39, as gpt-oss ships them), which candle cannot write:
    /// written as f16 placeholders of the same byte size, then the header is patched.
    pub mxfp4_experts: bool,
    /// DeepSeek's latent attention and routing (`deepseek2` only).
    pub mla: Option<SynthMla>,
}

/// A DeepSeek (`deepseek2`) model's attention and routing, written as llama.cpp's converter
/// writes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthMla {
    /// 0: a plain `attn_q` (V2-Lite); else the query LoRA's rank.
    pub q_lora: usize,
    pub kv_lora: usize,
    /// Per head: query/key dimensions without and with rotary embedding, value dimensions.
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
    /// Dense layers before the MoE ones.
    pub dense_lead: usize,
    /// Shared experts (each `expert_ff` wide).
    pub shared: usize,
    /// `expert_gating_func`: sigmoid (V3) or softmax (V2).
    pub sigmoid: bool,
    /// A score-correction bias `exp_probs_b` (V3).
    pub bias: bool,
    /// (`expert_group_count`, `expert_group_used_count`); (0, 0) writes neither.
    pub groups: (usize, usize),
    pub norm: bool,
    pub scale: f32,
    /// `rope.scaling.yarn_log_multiplier` as the converter stores it (0.1 × mscale_all_dim).
    pub yarn_log_mul: f32,
    /// One `attn_kv_b` per layer (files converted before llama.cpp split it), without the
    /// `_mla` length keys.
    pub legacy_kv_b: bool,
}

impl SynthMla {
    /// DeepSeek-V3's layout at tiny widths: query LoRA, sigmoid routing with a bias, 4
    /// groups of 2 experts of which 2 groups are used, renormalised weights × 2.5, a leading
    /// dense layer.
    pub fn v3() -> Self {
        Self {
            q_lora: 32,
            kv_lora: 32,
            nope: 32,
            rope: 16,
            v_dim: 32,
            dense_lead: 1,
            shared: 1,
            sigmoid: true,
            bias: true,
            groups: (4, 2),
            norm: true,
            scale: 2.5,
            yarn_log_mul: 0.1,
            legacy_kv_b: false,
        }
    }

    /// DeepSeek-V2-Lite's layout at tiny widths: a plain `attn_q`, softmax routing with the
    /// full-softmax weights, two shared experts.
    pub fn v2_lite() -> Self {
        Self {
            q_lora: 0,
            shared: 2,
            sigmoid: false,
            bias: false,
            groups: (0, 0),
            norm: false,
            scale: 1.0,
            yarn_log_mul: 0.0707,
            ..Self::v3()
        }
    }
}

/// The widths of a synthetic model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthDims {
    pub n_embd: usize,
    pub n_ff: usize,
    /// Feed-forward width of one expert (MoE only).
    pub expert_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl Default for SynthDims {
    fn default() -> Self {
        Self {
            n_embd: N_EMBD,
            n_ff: N_FF,
            expert_ff: N_FF,
            n_head: N_HEAD,
            n_kv_head: N_KV_HEAD,
            head_dim: HEAD_DIM,
        }
    }
}

/// The shape of a model users run.
pub struct Preset {
    pub name: &'static str,
    pub arch: &'static str,
    pub dims: SynthDims,
    /// (count, used per token).
    pub experts: Option<(usize, usize)>,
    /// DeepSeek's attention and routing.
    pub mla: Option<SynthMla>,
}

/// Real shapes users run, by name.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "llama-3.1-8b",
        arch: "llama",
        dims: SynthDims {
            n_embd: 4096,
            n_ff: 14336,
            expert_ff: 0,
            n_head: 32,
            n_kv_head: 8,
            head_dim: 128,
        },
        experts: None,
        mla: None,
    },
    Preset {
        name: "llama-3.1-70b",
        arch: "llama",
        dims: SynthDims {
            n_embd: 8192,
            n_ff: 28672,
            expert_ff: 0,
            n_head: 64,
            n_kv_head: 8,
            head_dim: 128,
        },
        experts: None,
        mla: None,
    },
    Preset {
        name: "qwen3-30b-a3b",
        arch: "qwen3moe",
        dims: SynthDims {
            n_embd: 2048,
            n_ff: 6144,
            expert_ff: 768,
            n_head: 32,
            n_kv_head: 4,
            head_dim: 128,
        },
        experts: Some((128, 8)),
        mla: None,
    },
    // DeepSeek-V3 / R1 (config.json of deepseek-ai/DeepSeek-V3): 61 layers, the first 3 dense.
    Preset {
        name: "deepseek-v3",
        arch: "deepseek2",
        dims: SynthDims {
            n_embd: 7168,
            n_ff: 18432,
            expert_ff: 2048,
            n_head: 128,
            n_kv_head: 1,
            head_dim: 576,
        },
        experts: Some((256, 8)),
        mla: Some(SynthMla {
            q_lora: 1536,
            kv_lora: 512,
            nope: 128,
            rope: 64,
            v_dim: 128,
            dense_lead: 3,
            shared: 1,
            sigmoid: true,
            bias: true,
            groups: (8, 4),
            norm: true,
            scale: 2.5,
            yarn_log_mul: 0.1,
            legacy_kv_b: false,
        }),
    },
    // DeepSeek-V2-Lite (config.json of deepseek-ai/DeepSeek-V2-Lite): 27 layers, the first dense.
    Preset {
        name: "deepseek-v2-lite",
        arch: "deepseek2",
        dims: SynthDims {
            n_embd: 2048,
            n_ff: 10944,
            expert_ff: 1408,
            n_head: 16,
            n_kv_head: 1,
            head_dim: 576,
        },
        experts: Some((64, 6)),
        mla: Some(SynthMla {
            q_lora: 0,
            kv_lora: 512,
            nope: 128,
            rope: 64,
            v_dim: 128,
            dense_lead: 1,
            shared: 2,
            sigmoid: false,
            bias: false,
            groups: (0, 0),
            norm: false,
            scale: 1.0,
            yarn_log_mul: 0.0707,
            legacy_kv_b: false,
        }),
    },
];

impl SynthDims {
    /// The spec of a named preset (see `PRESETS`) with `n_layer` layers.
    pub fn preset(name: &str, n_layer: usize) -> Option<SynthSpec> {
        let p = PRESETS.iter().find(|p| p.name == name)?;
        let mut spec = SynthSpec::new(p.arch);
        spec.dims = p.dims;
        spec.n_layer = n_layer;
        spec.context_length = 8192;
        spec.experts = p.experts.map(|(count, used)| SynthExperts {
            count,
            used,
            stacked: true,
        });
        spec.mla = p.mla;
        Some(spec)
    }
}

/// llama.cpp's `use_more_bits` (src/llama-quant.cpp): the first and last eighth of the layers
/// and every third one between get more bits in Q4_K_M.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

#[derive(Debug, Clone, Copy)]
pub struct SynthExperts {
    pub count: usize,
    pub used: usize,
    /// One stacked tensor per projection (current GGUFs) or one per expert (old Mixtral).
    pub stacked: bool,
}

pub const N_EMBD: usize = 64;
pub const N_FF: usize = 128;
pub const N_HEAD: usize = 4;
pub const N_KV_HEAD: usize = 2;
pub const HEAD_DIM: usize = 16;
/// Gemma-style sliding window, small so tests cross it.
pub const WINDOW: usize = 8;

impl SynthSpec {
    pub fn new(arch: &str) -> Self {
        Self {
            arch: arch.to_string(),
            experts: match arch {
                "qwen3moe" | "qwen35moe" | "gpt-oss" => Some(SynthExperts {
                    count: 4,
                    used: 2,
                    stacked: true,
                }),
                "deepseek2" => Some(SynthExperts {
                    count: 8,
                    used: 2,
                    stacked: true,
                }),
                _ => None,
            },
            dtype: GgmlDType::Q8_0,
            n_layer: 2,
            context_length: 512,
            sentencepiece: arch == "gemma3",
            seed: 7,
            dims: SynthDims::default(),
            k_mix: false,
            mxfp4_experts: false,
            mla: (arch == "deepseek2").then(SynthMla::v3),
        }
    }

    /// Writes the model to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(m) = self.mla {
            return self.write_deepseek2(path, m);
        }
        let dev = Device::Cpu;
        let mut rng = SplitMix(self.seed);
        let arch = self.arch.as_str();
        let SynthDims {
            n_embd,
            n_ff,
            expert_ff,
            n_head,
            n_kv_head,
            head_dim,
        } = self.dims;
        let k = |s: &str| format!("{arch}.{s}");
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (
                "general.name".into(),
                Value::String(format!("synthetic {arch}")),
            ),
            (k("block_count"), Value::U32(self.n_layer as u32)),
            (k("context_length"), Value::U32(self.context_length as u32)),
            (k("embedding_length"), Value::U32(n_embd as u32)),
            (k("feed_forward_length"), Value::U32(n_ff as u32)),
            (k("attention.head_count"), Value::U32(n_head as u32)),
            (k("attention.head_count_kv"), Value::U32(n_kv_head as u32)),
            (k("attention.key_length"), Value::U32(head_dim as u32)),
            (k("attention.value_length"), Value::U32(head_dim as u32)),
            (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
            (k("rope.freq_base"), Value::F32(10_000.0)),
            (k("rope.dimension_count"), Value::U32(head_dim as u32)),
        ];
        if matches!(arch, "qwen35" | "qwen35moe") {
            // Partial rotary, as Qwen3.5 rotates a quarter of each head.
            md.retain(|(key, _)| key != &k("rope.dimension_count"));
            md.push((
                k("rope.dimension_count"),
                Value::U32(QWEN35_ROPE_DIM as u32),
            ));
        }
        if matches!(arch, "gemma3" | "gpt-oss") {
            md.push((k("attention.sliding_window"), Value::U32(WINDOW as u32)));
        }
        if arch == "gpt-oss" {
            // gpt-oss-20b's rope: base 150000, YaRN ×32 over a 4096-token original context
            // (with 16-dimension heads the YaRN ramp falls on dimensions 2 to 5 of 8).
            md.retain(|(key, _)| key != &k("rope.freq_base"));
            md.push((k("rope.freq_base"), Value::F32(150_000.0)));
            md.push((k("rope.scaling.type"), Value::String("yarn".into())));
            md.push((k("rope.scaling.factor"), Value::F32(32.0)));
            md.push((k("rope.scaling.original_context_length"), Value::U32(4096)));
        }
        let hybrid = matches!(arch, "qwen35" | "qwen35moe");
        if hybrid {
            delta_net_metadata(&mut md, arch, head_dim);
        }
        if let Some(e) = self.experts {
            md.push((k("expert_count"), Value::U32(e.count as u32)));
            md.push((k("expert_used_count"), Value::U32(e.used as u32)));
            md.push((
                k("expert_feed_forward_length"),
                Value::U32(expert_ff as u32),
            ));
            if arch == "qwen35moe" {
                md.push((
                    k("expert_shared_feed_forward_length"),
                    Value::U32(n_ff as u32),
                ));
            }
        }
        let vocab = if self.sentencepiece {
            sentencepiece_vocab(&mut md)
        } else if arch == "gpt-oss" {
            bpe_vocab(&mut md, "gpt-4o", &HARMONY_TOKENS)
        } else {
            bpe_vocab(&mut md, "gpt-2", &[])
        };
        let vocab = if hybrid {
            qwen35_tokenizer(&mut md, vocab)
        } else {
            vocab
        };

        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        // (tensor, real dims) of the MXFP4 placeholders to patch in the header.
        let mut patches: Vec<(String, Vec<usize>)> = Vec::new();
        let mut q = |shape: &[usize], dtype: GgmlDType| -> Result<QTensor> {
            let n: usize = shape.iter().product();
            let scale = 1.7 / (*shape.last().unwrap() as f32).sqrt();
            let data: Vec<f32> = (0..n).map(|_| rng.uniform() * scale).collect();
            Ok(QTensor::quantize(
                &Tensor::from_vec(data, shape, &dev)?,
                dtype,
            )?)
        };
        let ones = |n: usize,
                    q: &mut dyn FnMut(&[usize], GgmlDType) -> Result<QTensor>|
         -> Result<QTensor> {
            let noise = q(&[n], GgmlDType::F32)?.dequantize(&dev)?;
            Ok(QTensor::quantize(&((noise * 0.1)? + 1.0)?, GgmlDType::F32)?)
        };
        let dt = self.dtype;
        tensors.push(("token_embd.weight".into(), q(&[vocab, n_embd], dt)?));
        tensors.push(("output_norm.weight".into(), ones(n_embd, &mut q)?));
        // Small models tie the output to the embedding; keep one arch of each kind.
        if !matches!(arch, "gemma3" | "qwen3") {
            let out = if self.k_mix { GgmlDType::Q6K } else { dt };
            tensors.push(("output.weight".into(), q(&[vocab, n_embd], out)?));
        }
        let (qd, kvd) = (n_head * head_dim, n_kv_head * head_dim);
        for i in 0..self.n_layer {
            let p = |n: &str| format!("blk.{i}.{n}");
            let big = if self.k_mix && use_more_bits(i, self.n_layer) {
                GgmlDType::Q6K
            } else {
                dt
            };
            tensors.push((p("attn_norm.weight"), ones(n_embd, &mut q)?));
            if hybrid {
                tensors.push((p("post_attention_norm.weight"), ones(n_embd, &mut q)?));
                if (i + 1) % QWEN35_FULL_ATTENTION_INTERVAL == 0 {
                    // Gated attention: the Q projection also yields a per-head gate.
                    tensors.push((p("attn_q.weight"), q(&[2 * qd, n_embd], dt)?));
                    tensors.push((p("attn_k.weight"), q(&[kvd, n_embd], dt)?));
                    tensors.push((p("attn_v.weight"), q(&[kvd, n_embd], dt)?));
                    tensors.push((p("attn_output.weight"), q(&[n_embd, qd], dt)?));
                    tensors.push((p("attn_q_norm.weight"), ones(head_dim, &mut q)?));
                    tensors.push((p("attn_k_norm.weight"), ones(head_dim, &mut q)?));
                } else {
                    delta_net_tensors(&mut tensors, &p, n_embd, head_dim, dt, &mut q)?;
                }
            } else {
                if arch == "gpt-oss" {
                    // Its pre-FFN norm, under llama.cpp's name for it.
                    tensors.push((p("post_attention_norm.weight"), ones(n_embd, &mut q)?));
                    tensors.push((p("attn_q.bias"), q(&[qd], GgmlDType::F32)?));
                    tensors.push((p("attn_k.bias"), q(&[kvd], GgmlDType::F32)?));
                    tensors.push((p("attn_v.bias"), q(&[kvd], GgmlDType::F32)?));
                    tensors.push((p("attn_output.bias"), q(&[n_embd], GgmlDType::F32)?));
                    tensors.push((p("attn_sinks.weight"), q(&[n_head], GgmlDType::F32)?));
                } else {
                    tensors.push((p("ffn_norm.weight"), ones(n_embd, &mut q)?));
                }
                tensors.push((p("attn_output.weight"), q(&[n_embd, qd], dt)?));
                if arch == "phi3" {
                    tensors.push((p("attn_qkv.weight"), q(&[qd + 2 * kvd, n_embd], dt)?));
                } else {
                    tensors.push((p("attn_q.weight"), q(&[qd, n_embd], dt)?));
                    tensors.push((p("attn_k.weight"), q(&[kvd, n_embd], dt)?));
                    tensors.push((p("attn_v.weight"), q(&[kvd, n_embd], big)?));
                }
                if arch == "qwen2" {
                    tensors.push((p("attn_q.bias"), q(&[qd], GgmlDType::F32)?));
                    tensors.push((p("attn_k.bias"), q(&[kvd], GgmlDType::F32)?));
                    tensors.push((p("attn_v.bias"), q(&[kvd], GgmlDType::F32)?));
                }
                if matches!(arch, "qwen3" | "qwen3moe" | "gemma3") {
                    tensors.push((p("attn_q_norm.weight"), ones(head_dim, &mut q)?));
                    tensors.push((p("attn_k_norm.weight"), ones(head_dim, &mut q)?));
                }
                if arch == "gemma3" {
                    tensors.push((p("post_attention_norm.weight"), ones(n_embd, &mut q)?));
                    tensors.push((p("post_ffw_norm.weight"), ones(n_embd, &mut q)?));
                }
            }
            if arch == "qwen35moe" {
                tensors.push((
                    p("ffn_gate_inp_shexp.weight"),
                    q(&[n_embd], GgmlDType::F32)?,
                ));
                tensors.push((p("ffn_gate_shexp.weight"), q(&[n_ff, n_embd], dt)?));
                tensors.push((p("ffn_up_shexp.weight"), q(&[n_ff, n_embd], dt)?));
                tensors.push((p("ffn_down_shexp.weight"), q(&[n_embd, n_ff], dt)?));
            }
            match self.experts {
                Some(e) => {
                    tensors.push((
                        p("ffn_gate_inp.weight"),
                        q(&[e.count, n_embd], GgmlDType::F32)?,
                    ));
                    if arch == "gpt-oss" {
                        tensors.push((p("ffn_gate_inp.bias"), q(&[e.count], GgmlDType::F32)?));
                    }
                    if e.stacked {
                        for (part, shape, dtype) in [
                            ("ffn_gate_exps", [e.count, expert_ff, n_embd], dt),
                            ("ffn_up_exps", [e.count, expert_ff, n_embd], dt),
                            ("ffn_down_exps", [e.count, n_embd, expert_ff], big),
                        ] {
                            let t = if self.mxfp4_experts {
                                let w = q(&shape, GgmlDType::F32)?.dequantize(&dev)?;
                                mxfp4_placeholder(&w, &mut patches, &p(&format!("{part}.weight")))?
                            } else {
                                q(&shape, dtype)?
                            };
                            tensors.push((p(&format!("{part}.weight")), t));
                            if arch == "gpt-oss" {
                                tensors.push((
                                    p(&format!("{part}.bias")),
                                    q(&shape[..2], GgmlDType::F32)?,
                                ));
                            }
                        }
                    } else {
                        for x in 0..e.count {
                            tensors.push((
                                p(&format!("ffn_gate.{x}.weight")),
                                q(&[expert_ff, n_embd], dt)?,
                            ));
                            tensors.push((
                                p(&format!("ffn_up.{x}.weight")),
                                q(&[expert_ff, n_embd], dt)?,
                            ));
                            tensors.push((
                                p(&format!("ffn_down.{x}.weight")),
                                q(&[n_embd, expert_ff], big)?,
                            ));
                        }
                    }
                }
                None if arch == "phi3" => {
                    tensors.push((p("ffn_up.weight"), q(&[2 * n_ff, n_embd], dt)?));
                    tensors.push((p("ffn_down.weight"), q(&[n_embd, n_ff], big)?));
                }
                None => {
                    tensors.push((p("ffn_gate.weight"), q(&[n_ff, n_embd], dt)?));
                    tensors.push((p("ffn_up.weight"), q(&[n_ff, n_embd], dt)?));
                    tensors.push((p("ffn_down.weight"), q(&[n_embd, n_ff], big)?));
                }
            }
        }
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut buf = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut buf, &md_refs, &t_refs)?;
        let mut bytes = buf.into_inner();
        for (name, dims) in &patches {
            patch_mxfp4(&mut bytes, name, dims)?;
        }
        std::fs::write(path, bytes)?;
        Ok(())
    }
}

/// Qwen3.5 shapes: rotary dimensions per head (of `head_dim`), the sections llama.cpp's
/// multi-axis rope splits them into (all text positions, covering every rotary pair as the real
/// models' [11, 11, 10, 0] do), every n-th layer full attention, the rest Gated DeltaNet with
/// `QWEN35_K_HEADS` key heads shared by twice as many value heads (as Qwen3.6-35B-A3B's 16 and
/// 32), and the causal convolution's width.
pub const QWEN35_ROPE_DIM: usize = 8;
pub const QWEN35_ROPE_SECTIONS: [i32; 4] = [2, 1, 1, 0];
pub const QWEN35_FULL_ATTENTION_INTERVAL: usize = 2;
pub const QWEN35_K_HEADS: usize = 2;
pub const QWEN35_V_HEADS: usize = 4;
pub const QWEN35_CONV: usize = 4;

fn delta_net_metadata(md: &mut Vec<(String, Value)>, arch: &str, head_dim: usize) {
    let k = |s: &str| format!("{arch}.{s}");
    md.push((
        k("rope.dimension_sections"),
        Value::Array(
            QWEN35_ROPE_SECTIONS
                .iter()
                .map(|&v| Value::I32(v))
                .collect(),
        ),
    ));
    md.push((
        k("full_attention_interval"),
        Value::U32(QWEN35_FULL_ATTENTION_INTERVAL as u32),
    ));
    md.push((k("ssm.conv_kernel"), Value::U32(QWEN35_CONV as u32)));
    md.push((k("ssm.state_size"), Value::U32(head_dim as u32)));
    md.push((k("ssm.group_count"), Value::U32(QWEN35_K_HEADS as u32)));
    md.push((k("ssm.time_step_rank"), Value::U32(QWEN35_V_HEADS as u32)));
    md.push((
        k("ssm.inner_size"),
        Value::U32((head_dim * QWEN35_V_HEADS) as u32),
    ));
}

/// Qwen3.5's own split rules (combining marks stay in words), and a merge that only they
/// allow: "e" with the first byte of U+0301 (a combining acute accent, UTF-8 CC 81; 0xCC is
/// "Ì" in GPT-2's byte alphabet), so "e\u{301}" tokenizes differently under Qwen2's rules.
/// Returns the vocabulary size.
fn qwen35_tokenizer(md: &mut [(String, Value)], vocab: usize) -> usize {
    let mut size = vocab;
    for (k, v) in md.iter_mut() {
        match (k.as_str(), v) {
            ("tokenizer.ggml.pre", v) => *v = Value::String("qwen35".into()),
            ("tokenizer.ggml.tokens", Value::Array(t)) => {
                t.push(Value::String("eÌ".into()));
                size = t.len();
            }
            ("tokenizer.ggml.token_type", Value::Array(t)) => t.push(Value::I32(1)),
            ("tokenizer.ggml.merges", Value::Array(m)) => m.push(Value::String("e Ì".into())),
            _ => {}
        }
    }
    size
}

/// The tensors of one Gated DeltaNet layer, named and shaped as llama.cpp's qwen35 loader
/// wants them (src/models/qwen35.cpp `load_arch_tensors`); the convolution, decay and norm
/// stay f32 as llama-quantize keeps them.
fn delta_net_tensors(
    tensors: &mut Vec<(String, QTensor)>,
    p: &dyn Fn(&str) -> String,
    n_embd: usize,
    head_dim: usize,
    dt: GgmlDType,
    q: &mut dyn FnMut(&[usize], GgmlDType) -> Result<QTensor>,
) -> Result<()> {
    let f32 = GgmlDType::F32;
    let key_dim = head_dim * QWEN35_K_HEADS;
    let value_dim = head_dim * QWEN35_V_HEADS;
    let conv_dim = 2 * key_dim + value_dim;
    tensors.push((p("attn_qkv.weight"), q(&[conv_dim, n_embd], dt)?));
    tensors.push((p("attn_gate.weight"), q(&[value_dim, n_embd], dt)?));
    tensors.push((p("ssm_conv1d.weight"), q(&[conv_dim, QWEN35_CONV], f32)?));
    tensors.push((p("ssm_dt.bias"), q(&[QWEN35_V_HEADS], f32)?));
    // A = -exp(A_log): negative, so the state decays.
    let a = q(&[QWEN35_V_HEADS], f32)?.dequantize(&Device::Cpu)?;
    let a = ((a.abs()? + 0.5)? * -1.0)?;
    tensors.push((p("ssm_a"), QTensor::quantize(&a, f32)?));
    tensors.push((p("ssm_beta.weight"), q(&[QWEN35_V_HEADS, n_embd], f32)?));
    tensors.push((p("ssm_alpha.weight"), q(&[QWEN35_V_HEADS, n_embd], f32)?));
    let norm = q(&[head_dim], f32)?.dequantize(&Device::Cpu)?;
    tensors.push((
        p("ssm_norm.weight"),
        QTensor::quantize(&((norm * 0.1)? + 1.0)?, f32)?,
    ));
    tensors.push((p("ssm_out.weight"), q(&[n_embd, value_dim], dt)?));
    Ok(())
}

impl SynthSpec {
    /// A `deepseek2` file with every hyper-parameter and tensor llama.cpp's loader reads
    /// (llama_model_deepseek2::load_arch_hparams / load_arch_tensors).
    fn write_deepseek2(&self, path: &Path, m: SynthMla) -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = SplitMix(self.seed);
        let arch = "deepseek2";
        let SynthDims {
            n_embd,
            n_ff,
            expert_ff,
            n_head,
            ..
        } = self.dims;
        let experts = self.experts.unwrap_or(SynthExperts {
            count: 8,
            used: 2,
            stacked: true,
        });
        let k = |s: &str| format!("{arch}.{s}");
        let kd = m.nope + m.rope;
        let (kv_heads, key_len, value_len) = if m.legacy_kv_b {
            (n_head, kd, m.v_dim)
        } else {
            (1, m.kv_lora + m.rope, m.kv_lora)
        };
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (
                "general.name".into(),
                Value::String("synthetic deepseek2".into()),
            ),
            (k("block_count"), Value::U32(self.n_layer as u32)),
            (k("context_length"), Value::U32(self.context_length as u32)),
            (k("embedding_length"), Value::U32(n_embd as u32)),
            (k("feed_forward_length"), Value::U32(n_ff as u32)),
            (k("attention.head_count"), Value::U32(n_head as u32)),
            (k("attention.head_count_kv"), Value::U32(kv_heads as u32)),
            (k("attention.key_length"), Value::U32(key_len as u32)),
            (k("attention.value_length"), Value::U32(value_len as u32)),
            (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
            (k("rope.freq_base"), Value::F32(10_000.0)),
            (k("rope.dimension_count"), Value::U32(m.rope as u32)),
            (k("attention.q_lora_rank"), Value::U32(m.q_lora as u32)),
            (k("attention.kv_lora_rank"), Value::U32(m.kv_lora as u32)),
            (
                k("leading_dense_block_count"),
                Value::U32(m.dense_lead as u32),
            ),
            (k("expert_count"), Value::U32(experts.count as u32)),
            (k("expert_used_count"), Value::U32(experts.used as u32)),
            (
                k("expert_feed_forward_length"),
                Value::U32(expert_ff as u32),
            ),
            (k("expert_shared_count"), Value::U32(m.shared as u32)),
            (k("expert_weights_scale"), Value::F32(m.scale)),
            (k("expert_weights_norm"), Value::Bool(m.norm)),
            (
                k("expert_gating_func"),
                Value::U32(if m.sigmoid { 2 } else { 1 }),
            ),
            // DeepSeek's YaRN: ×40 over a 4096-token original context.
            (k("rope.scaling.type"), Value::String("yarn".into())),
            (k("rope.scaling.factor"), Value::F32(40.0)),
            (k("rope.scaling.original_context_length"), Value::U32(4096)),
            (
                k("rope.scaling.yarn_log_multiplier"),
                Value::F32(m.yarn_log_mul),
            ),
        ];
        if !m.legacy_kv_b {
            md.push((k("attention.key_length_mla"), Value::U32(kd as u32)));
            md.push((k("attention.value_length_mla"), Value::U32(m.v_dim as u32)));
        }
        if m.groups.0 > 0 {
            md.push((k("expert_group_count"), Value::U32(m.groups.0 as u32)));
            md.push((k("expert_group_used_count"), Value::U32(m.groups.1 as u32)));
        }
        let pre = if m.sigmoid {
            "deepseek-v3"
        } else {
            "deepseek-llm"
        };
        let vocab = bpe_vocab(&mut md, pre, &[]);
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut q = |shape: &[usize], dtype: GgmlDType| -> Result<QTensor> {
            // Rows a type cannot block (attn_k_b's 128 for a K-quant) fall back to Q8_0, as
            // llama-quantize does for them.
            let last = *shape.last().unwrap();
            let dtype = if last.is_multiple_of(dtype.block_size()) {
                dtype
            } else if last.is_multiple_of(GgmlDType::Q8_0.block_size()) {
                GgmlDType::Q8_0
            } else {
                GgmlDType::F32
            };
            let n: usize = shape.iter().product();
            let scale = 1.7 / (*shape.last().unwrap() as f32).sqrt();
            let data: Vec<f32> = (0..n).map(|_| rng.uniform() * scale).collect();
            Ok(QTensor::quantize(
                &Tensor::from_vec(data, shape, &dev)?,
                dtype,
            )?)
        };
        let ones = |n: usize,
                    q: &mut dyn FnMut(&[usize], GgmlDType) -> Result<QTensor>|
         -> Result<QTensor> {
            let noise = q(&[n], GgmlDType::F32)?.dequantize(&dev)?;
            Ok(QTensor::quantize(&((noise * 0.1)? + 1.0)?, GgmlDType::F32)?)
        };
        let dt = self.dtype;
        tensors.push(("token_embd.weight".into(), q(&[vocab, n_embd], dt)?));
        tensors.push(("output_norm.weight".into(), ones(n_embd, &mut q)?));
        tensors.push(("output.weight".into(), q(&[vocab, n_embd], dt)?));
        let (e, nh, n_exp, sh) = (n_embd, n_head, experts.count, expert_ff * m.shared);
        for i in 0..self.n_layer {
            let p = |n: &str| format!("blk.{i}.{n}");
            tensors.push((p("attn_norm.weight"), ones(e, &mut q)?));
            if m.q_lora > 0 {
                tensors.push((p("attn_q_a.weight"), q(&[m.q_lora, e], dt)?));
                tensors.push((p("attn_q_a_norm.weight"), ones(m.q_lora, &mut q)?));
                tensors.push((p("attn_q_b.weight"), q(&[nh * kd, m.q_lora], dt)?));
            } else {
                tensors.push((p("attn_q.weight"), q(&[nh * kd, e], dt)?));
            }
            tensors.push((p("attn_kv_a_mqa.weight"), q(&[m.kv_lora + m.rope, e], dt)?));
            tensors.push((p("attn_kv_a_norm.weight"), ones(m.kv_lora, &mut q)?));
            if m.legacy_kv_b {
                tensors.push((
                    p("attn_kv_b.weight"),
                    q(&[nh * (m.nope + m.v_dim), m.kv_lora], dt)?,
                ));
            } else {
                tensors.push((p("attn_k_b.weight"), q(&[nh, m.kv_lora, m.nope], dt)?));
                tensors.push((p("attn_v_b.weight"), q(&[nh, m.v_dim, m.kv_lora], dt)?));
            }
            tensors.push((p("attn_output.weight"), q(&[e, nh * m.v_dim], dt)?));
            tensors.push((p("ffn_norm.weight"), ones(e, &mut q)?));
            if i < m.dense_lead {
                tensors.push((p("ffn_gate.weight"), q(&[n_ff, e], dt)?));
                tensors.push((p("ffn_up.weight"), q(&[n_ff, e], dt)?));
                tensors.push((p("ffn_down.weight"), q(&[e, n_ff], dt)?));
                continue;
            }
            tensors.push((p("ffn_gate_inp.weight"), q(&[n_exp, e], GgmlDType::F32)?));
            if m.bias {
                tensors.push((p("exp_probs_b.bias"), q(&[n_exp], GgmlDType::F32)?));
            }
            tensors.push((p("ffn_gate_exps.weight"), q(&[n_exp, expert_ff, e], dt)?));
            tensors.push((p("ffn_up_exps.weight"), q(&[n_exp, expert_ff, e], dt)?));
            tensors.push((p("ffn_down_exps.weight"), q(&[n_exp, e, expert_ff], dt)?));
            tensors.push((p("ffn_gate_shexp.weight"), q(&[sh, e], dt)?));
            tensors.push((p("ffn_up_shexp.weight"), q(&[sh, e], dt)?));
            tensors.push((p("ffn_down_shexp.weight"), q(&[e, sh], dt)?));
        }
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path)?;
        gguf_file::write(&mut f, &md_refs, &t_refs)?;
        Ok(())
    }
}

/// A seeded generator for the weights: candle's CPU device cannot be seeded, and tests need
/// the same model every run. SplitMix64, mapped to uniform [-1, 1).
struct SplitMix(u64);

impl SplitMix {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

impl SynthSpec {
    /// Writes the model as a llama.cpp-style split GGUF (`stem-0000i-of-0000n.gguf`), tensors
    /// spread across the parts; returns the first part's path.
    pub fn write_split(&self, dir: &Path, stem: &str, n: usize) -> Result<std::path::PathBuf> {
        let whole = dir.join(format!("{stem}.whole.gguf"));
        self.write(&whole)?;
        let mut f = std::fs::File::open(&whole)?;
        let content = gguf_file::Content::read(&mut f)?;
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let count = Value::U16(n as u16);
        let mut first = None;
        for part in 0..n {
            let mut md: Vec<(&str, &Value)> = vec![("split.count", &count)];
            let no = Value::U16(part as u16);
            md.push(("split.no", &no));
            if part == 0 {
                md.extend(content.metadata.iter().map(|(k, v)| (k.as_str(), v)));
            }
            let tensors: Vec<(&str, QTensor)> = names
                .iter()
                .skip(part)
                .step_by(n)
                .map(|name| Ok((name.as_str(), content.tensor(&mut f, name, &Device::Cpu)?)))
                .collect::<Result<_>>()?;
            let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
            let path = dir.join(format!("{stem}-{:05}-of-{n:05}.gguf", part + 1));
            gguf_file::write(&mut std::fs::File::create(&path)?, &md, &refs)?;
            first.get_or_insert(path);
        }
        std::fs::remove_file(&whole)?;
        Ok(first.expect("at least one part"))
    }
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// gpt-oss's harmony control tokens (after the byte-level vocabulary and its merges).
pub const HARMONY_TOKENS: [&str; 6] = [
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
    "<|call|>",
];

/// ggml's E2M1 values doubled (kvalues_mxfp4), for `mxfp4_placeholder`'s quantizer.
const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `w` quantized to MXFP4 as ggml's quantize_row_mxfp4_ref does, in an f16 tensor of the
/// same byte size (candle has no MXFP4 type); `patches` records the real shape for
/// `patch_mxfp4`. The innermost dimension must be a multiple of 64.
fn mxfp4_placeholder(
    w: &Tensor,
    patches: &mut Vec<(String, Vec<usize>)>,
    name: &str,
) -> Result<QTensor> {
    let dims = w.dims().to_vec();
    let inner = *dims.last().expect("a matrix");
    anyhow::ensure!(
        inner.is_multiple_of(64),
        "MXFP4 synth needs rows of a multiple of 64 weights"
    );
    let x: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let mut bytes = Vec::with_capacity(x.len() / 32 * 17);
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = if amax > 0.0 {
            (amax.log2().floor() - 2.0 + 127.0) as u8
        } else {
            0
        };
        // GGML_E8M0_TO_FP32_HALF
        let d = if e < 2 {
            f32::from_bits(0x0020_0000u32 << e)
        } else {
            f32::from_bits((e as u32 - 1) << 23)
        };
        let best = |v: f32| -> u8 {
            let err = |i: usize| (MXFP4_VALUES[i] as f32 * d - v).abs();
            (1..16).fold(0, |best, i| if err(i) < err(best) { i } else { best }) as u8
        };
        bytes.push(e);
        for j in 0..16 {
            bytes.push(best(b[j]) | best(b[j + 16]) << 4);
        }
    }
    let mut fake = dims.clone();
    *fake.last_mut().expect("a matrix") = inner / 64 * 17;
    patches.push((name.to_string(), dims));
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        GgmlDType::F16,
        &bytes,
        fake,
        &Device::Cpu,
    )?)
}

/// Rewrites the header entry of the f16 placeholder `name` to MXFP4 with its real dims
/// (GGUF order: innermost first); the data is already MXFP4 blocks of the same size.
fn patch_mxfp4(b: &mut [u8], name: &str, dims: &[usize]) -> Result<()> {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = b
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .ok_or_else(|| anyhow::anyhow!("tensor {name} not in the written file"))?
        + key.len();
    let n_dims = u32::from_le_bytes(b[at..at + 4].try_into()?) as usize;
    anyhow::ensure!(n_dims == dims.len(), "{name}: {n_dims} dims written");
    for (i, d) in dims.iter().rev().enumerate() {
        b[at + 4 + 8 * i..at + 12 + 8 * i].copy_from_slice(&(*d as u64).to_le_bytes());
    }
    let t = at + 4 + 8 * n_dims;
    b[t..t + 4].copy_from_slice(&39u32.to_le_bytes());
    Ok(())
}

/// Byte-level BPE: the 256 byte symbols, a few merges, ChatML control tokens and `extra`
/// control tokens after them; `pre` is the pre-tokenizer's name. Returns the vocabulary size.
fn bpe_vocab(md: &mut Vec<(String, Value)>, pre: &str, extra: &[&str]) -> usize {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3i32, 3, 3];
    // GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100+.
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
        tokens.push(c.to_string());
        types.push(1);
    }
    let mut merges: Vec<String> = ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "Ġ a", "o n"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if pre == "gpt-4o" || pre.starts_with("deepseek") {
        // gpt-4o's split differs from GPT-2's here: digits go in threes ("1234" is "123" +
        // "4", so never "34"), and "'S" stays with its word; merges across the cuts show it.
        // DeepSeek-V3's splits digits in threes and keeps "'S" too, DeepSeek-LLM's neither.
        merges.extend(["3 4", "' S"].map(String::from));
    }
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    for t in extra {
        tokens.push(t.to_string());
        types.push(3);
    }
    md.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    md.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    md.push(("tokenizer.ggml.tokens".into(), strings(&tokens)));
    md.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    md.push(("tokenizer.ggml.merges".into(), strings(&merges)));
    md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(1)));
    md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(2)));
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    tokens.len()
}

/// SentencePiece (Gemma style): control tokens, byte fallback pieces, and scored pieces.
fn sentencepiece_vocab(md: &mut Vec<(String, Value)>) -> usize {
    let mut tokens: Vec<String> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut types = vec![3i32, 3, 3, 2, 3, 3];
    let mut scores = vec![0f32; tokens.len()];
    for b in 0..=255u32 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    tokens.push("\n".into());
    types.push(4);
    scores.push(0.0);
    let pieces = [
        "▁",
        "e",
        "t",
        "a",
        "o",
        "i",
        "n",
        "s",
        "r",
        "h",
        "l",
        "d",
        "u",
        "c",
        "m",
        "▁the",
        "▁a",
        "▁is",
        "▁of",
        "er",
        "in",
        "on",
        "an",
        "user",
        "model",
        "▁Paris",
        "▁capital",
        "▁France",
        "?",
        ".",
        ",",
    ];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(
            -(i as f32)
                - if p.starts_with('▁') && p.len() > 3 {
                    0.0
                } else {
                    10.0
                },
        );
    }
    md.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
    md.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
    md.push(("tokenizer.ggml.tokens".into(), strings(&tokens)));
    md.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    md.push((
        "tokenizer.ggml.scores".into(),
        Value::Array(scores.into_iter().map(Value::F32).collect()),
    ));
    md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(2)));
    md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(1)));
    md.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)));
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)));
    md.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
    tokens.len()
}
