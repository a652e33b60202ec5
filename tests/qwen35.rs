//! Qwen3.5 / Qwen3.6 (`qwen35`, `qwen35moe`): Gated DeltaNet layers interleaved with gated full
//! attention. Tiny synthetic files with random weights, against llama.cpp's llama-server (the
//! same greedy tokens for 64 steps, top-10 log-probabilities within 1e-3), and multi-turn reuse
//! of the recurrent state against fresh passes.
mod common;
mod gguf_tools;
mod llama_server;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tokentop::engine::{gguf::Gguf, model::Model, synth::SynthSpec, Engine, Flow};
use tokentop::protocol::{GenParams, LoadOptions, Message, Role};

/// Four layers: DeltaNet, attention, DeltaNet, attention (synth's interval of 2).
fn spec(arch: &str, dtype: GgmlDType) -> SynthSpec {
    let mut spec = SynthSpec::new(arch);
    spec.n_layer = 4;
    spec.dtype = dtype;
    spec
}

fn write(dir: &Path, arch: &str, dtype: GgmlDType) -> PathBuf {
    common::synth(dir, &spec(arch, dtype))
}

/// The model with an f32 KV cache, as llama-server is started for the comparison (the f16
/// cache's arithmetic is the attention's concern, tested in engine::model::attention).
fn load(path: &Path) -> Model {
    let mut m = Model::load(&mut Gguf::open(path).unwrap(), 512, &Device::Cpu).unwrap();
    let f32 = tokentop::protocol::KvType::F32;
    m.set_kv_types(tokentop::protocol::KvTypes { k: f32, v: f32 })
        .unwrap();
    m
}

/// Text as the synthetic byte-level vocabulary's tokens (3 control tokens, then the bytes).
fn ascii(text: &str) -> Vec<u32> {
    text.bytes().map(|b| 3 + u32::from(b)).collect()
}

/// Tokens llama.cpp is kept from picking: the end-of-generation ones (0 `<|endoftext|>`,
/// 2 `<|im_end|>`; `ignore_eos` bans them anyway) and the bytes 0x80 and up (ids 131 to 258),
/// which are not UTF-8 on their own: llama-server holds a token's probabilities back until its
/// text is valid UTF-8 and then drops them, so a random model picking one would lose steps.
/// So is 267, "e" with the first byte of a combining accent (synth's Qwen3.5 merge).
/// A ban changes only the choice: the reported log-probabilities are of the raw logits.
fn banned(id: u32) -> bool {
    id == 0 || id == 2 || (131..=258).contains(&id) || id == 267
}

/// Greedy decoding against llama.cpp for 64 steps, fed llama.cpp's tokens: each step must pick
/// llama.cpp's token and give its top-10 log-probabilities within 1e-3.
fn parity(arch: &str, dtype: GgmlDType) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), arch, dtype);
    let prompt = ascii("The capital of France is");
    let Some(steps) = llama_server::f32_greedy_steps(&path, &prompt, 64, 300, banned) else {
        return;
    };
    let what = format!("{arch} {dtype:?}");
    common::assert_steps_match(&mut load(&path), &prompt, &steps, banned, 1e-3, &what);
}

#[test]
fn qwen35_matches_llama_cpp() {
    parity("qwen35", GgmlDType::F32);
}

#[test]
fn qwen35moe_matches_llama_cpp() {
    parity("qwen35moe", GgmlDType::F32);
}

#[test]
fn qwen35_q8_0_matches_llama_cpp() {
    parity("qwen35", GgmlDType::Q8_0);
}

#[test]
fn qwen35moe_q8_0_matches_llama_cpp() {
    parity("qwen35moe", GgmlDType::Q8_0);
}

/// Logits of `tokens` from a fresh model.
fn fresh(path: &Path, tokens: &[u32]) -> Tensor {
    load(path).forward(tokens).unwrap()
}

#[test]
fn a_second_turn_reuses_the_state_and_equals_a_fresh_pass() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["qwen35", "qwen35moe"] {
        let path = write(dir.path(), arch, GgmlDType::Q8_0);
        let first = ascii("user: the capital of France?\nassistant:");
        let answer = ascii(" Paris, of course.");
        let mut model = load(&path);
        // Before the first token: the zeroed DeltaNet states (no KV cache, no checkpoint).
        let dn = model.hp.delta_net.clone().unwrap();
        let state = dn.state_bytes(model.hp.n_layer) as usize;
        assert_eq!(model.kv_cache_bytes(), state / 2, "{arch}");
        model.forward(&first).unwrap();
        // Decoding the answer token by token, as the engine does.
        for t in &answer {
            model.forward(&[*t]).unwrap();
        }
        let held = first.len() + answer.len();
        assert_eq!(model.cached_len(), held);
        // KV cache of the attention layers, the DeltaNet states and their checkpoint.
        assert!(
            model.kv_cache_bytes() > state,
            "{arch}: {} bytes held, the states alone are {state}",
            model.kv_cache_bytes()
        );

        let whole: Vec<u32> = first
            .iter()
            .chain(&answer)
            .copied()
            .chain(ascii("\nuser: and of Spain?\nassistant:"))
            .collect();
        // The next prompt shares everything held; then prefixes ending inside the answer
        // (after the checkpoint at the end of the first prompt), exactly at it, and inside
        // the first prompt (before it: recomputed from the empty state).
        for keep in [held, first.len() + 5, first.len(), 7, 0] {
            let mut m = load(&path);
            m.forward(&first).unwrap();
            for t in &answer {
                m.forward(&[*t]).unwrap();
            }
            m.truncate_cache(keep);
            assert_eq!(m.cached_len(), keep, "{arch}");
            let a = m.forward(&whole[keep..]).unwrap();
            let b = fresh(&path, &whole);
            let diff = common::max_abs_diff(&a, &b);
            assert!(
                diff < 1e-4,
                "{arch}: keeping {keep} tokens, logits differ by {diff}"
            );
            // And decoding on from there still agrees.
            let a = m.forward(&[3 + b'!' as u32]).unwrap();
            let mut more = whole.clone();
            more.push(3 + b'!' as u32);
            let diff = common::max_abs_diff(&a, &fresh(&path, &more));
            assert!(
                diff < 1e-4,
                "{arch}: keeping {keep}, the next step differs by {diff}"
            );
        }
    }
}

#[test]
fn the_engine_answers_a_second_turn_from_the_cache_as_a_fresh_engine_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "qwen35moe", GgmlDType::Q8_0);
    let params = GenParams {
        max_tokens: 8,
        temperature: 0.0,
        ignore_eos: true,
        ..Default::default()
    };
    let answer = |engine: &mut Engine, msgs: &[Message]| {
        let mut text = String::new();
        let (stats, _) = engine
            .generate(msgs, &params, |e| {
                if let tokentop::engine::GenEvent::Token(t) = e {
                    text.push_str(t);
                }
                Flow::Continue
            })
            .unwrap();
        (text, stats)
    };
    let mut engine = Engine::load(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
    let mut msgs = vec![Message::new(Role::User, "the capital of France is")];
    let (first, _) = answer(&mut engine, &msgs);
    msgs.push(Message::new(Role::Assistant, &first));
    msgs.push(Message::new(Role::User, "and of Spain?"));
    let (second, stats) = answer(&mut engine, &msgs);
    assert!(stats.cached_tokens > 5, "{stats:?}");
    let mut again = Engine::load(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
    let (fresh, _) = answer(&mut again, &msgs);
    assert_eq!(second, fresh);
}

/// Rewrites `path` with `edit` applied to its metadata.
fn with_metadata(
    path: &Path,
    out: &Path,
    edit: impl FnOnce(&mut Vec<(String, candle_core::quantized::gguf_file::Value)>),
) {
    use candle_core::quantized::gguf_file;
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut md: Vec<(String, gguf_file::Value)> = c.metadata.clone().into_iter().collect();
    edit(&mut md);
    let ts: Vec<(String, candle_core::quantized::QTensor)> = c
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), c.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &candle_core::quantized::QTensor)> =
        ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(out).unwrap(), &md, &ts).unwrap();
}

/// Qwen3.5 GGUFs that keep the multi-token-prediction block count it in `block_count`
/// (`nextn_predict_layers` = 1): the decoder is the blocks before it, as in llama.cpp.
#[test]
fn a_multi_token_prediction_block_is_not_a_decoder_layer() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "qwen35moe", GgmlDType::Q8_0);
    let mtp = dir.path().join("mtp.gguf");
    with_metadata(&path, &mtp, |md| {
        for (k, v) in md.iter_mut() {
            if k == "qwen35moe.block_count" {
                *v = Value::U32(5);
            }
        }
        md.push(("qwen35moe.nextn_predict_layers".into(), Value::U32(1)));
    });
    let tokens = ascii("hello there");
    let mut m = load(&mtp);
    assert_eq!(m.hp.n_layer, 4);
    let diff = common::max_abs_diff(&m.forward(&tokens).unwrap(), &fresh(&path, &tokens));
    assert_eq!(diff, 0.0);

    // A corrupt count is an error naming the key.
    let bad = dir.path().join("bad.gguf");
    with_metadata(&path, &bad, |md| {
        md.push(("qwen35moe.nextn_predict_layers".into(), Value::U32(9)))
    });
    let err = Model::load(&mut Gguf::open(&bad).unwrap(), 512, &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("nextn_predict_layers"),
        "{err:#}"
    );
}

/// The child process's entry point for `hostile_hyper_parameters_are_errors_not_crashes`.
#[test]
fn child_entry() {
    gguf_tools::child_load_cases();
}

/// Every Qwen3.5 hyper-parameter set to values from 0 to 2^32 - 1 (and the rope sections to
/// odd arrays): each file, loaded in a memory-capped child and asked for two tokens, ends in
/// an answer or a one-line error; the ones tokentop checks name their key.
#[test]
fn hostile_hyper_parameters_are_errors_not_crashes() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut named = Vec::new();
    for arch in ["qwen35", "qwen35moe"] {
        let base = write(dir.path(), arch, GgmlDType::Q8_0);
        let keys = [
            "ssm.conv_kernel",
            "ssm.state_size",
            "ssm.group_count",
            "ssm.time_step_rank",
            "ssm.inner_size",
            "full_attention_interval",
            "nextn_predict_layers",
            "rope.dimension_count",
            "attention.key_length",
            "attention.head_count",
            "attention.head_count_kv",
            "expert_count",
            "expert_used_count",
            "block_count",
        ];
        let mut cases: Vec<(String, Value)> = Vec::new();
        for key in keys {
            for v in [0u32, 1, 2, 3, 5, 64, 1 << 20, u32::MAX] {
                cases.push((format!("{arch}.{key}"), Value::U32(v)));
            }
        }
        for sections in [
            vec![],
            vec![0, 0, 0, 0],
            vec![-1, 2, 1, 0],
            vec![100, 0, 0, 0],
            vec![1],
        ] {
            cases.push((
                format!("{arch}.rope.dimension_sections"),
                Value::Array(sections.into_iter().map(Value::I32).collect()),
            ));
        }
        for (i, (key, value)) in cases.into_iter().enumerate() {
            let out = dir.path().join(format!("{arch}-{i}.gguf"));
            let k = key.clone();
            with_metadata(&base, &out, move |md| {
                md.retain(|(name, _)| name != &k);
                md.push((k, value));
            });
            named.push(key);
            files.push(out);
        }
    }
    let outcomes = gguf_tools::load_capped("child_entry", dir.path(), &files);
    let (mut answered, mut errors) = (0, 0);
    for ((o, key), file) in outcomes.iter().zip(&named).zip(&files) {
        match o {
            gguf_tools::Outcome::Answered => answered += 1,
            gguf_tools::Outcome::Error(e) => {
                errors += 1;
                assert!(!e.contains('\n'), "{}: {e}", file.display());
                // The keys this module checks say which key is wrong.
                let own = [
                    "ssm.",
                    "full_attention_interval",
                    "nextn_predict_layers",
                    "dimension_sections",
                ];
                if own.iter().any(|k| key.contains(k)) && e.contains("qwen35") {
                    let short = key.rsplit('.').next().unwrap();
                    assert!(
                        e.contains(short) || e.contains("has shape") || e.contains("lacks"),
                        "{key} in {}: {e}",
                        file.display()
                    );
                }
            }
        }
    }
    eprintln!(
        "{} hostile files: {answered} answered, {errors} errors",
        files.len()
    );
    assert!(
        errors > files.len() / 2,
        "{answered} answered, {errors} errors"
    );
}

/// Qwen3.5's pre-tokenizer (`tokenizer.ggml.pre` = "qwen35": Qwen2's split with combining
/// marks kept in words) splits text as llama.cpp's does.
#[test]
fn the_qwen35_pre_tokenizer_matches_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "qwen35", GgmlDType::Q8_0);
    let Some(server) = llama_server::start_model(&path, &[]) else {
        return;
    };
    let engine = Engine::load(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
    for text in [
        "the cat in the hat",
        "cafe\u{301} and nai\u{308}ve: e\u{301}ther, a\u{301}\u{301}b \u{301}in",
        "It's 2026!\n\n  indented\tthen 12345 numbers",
        "Ελληνικά και 中文, emoji 🙂 and more",
    ] {
        let theirs = server.tokenize(text);
        assert_eq!(engine.tokenizer.encode(text).unwrap(), theirs, "{text:?}");
    }
}

/// Attention layers with one fused `attn_qkv` (query+gate, keys, values; llama.cpp's qwen35moe
/// accepts it) give the logits the separate projections do.
#[test]
fn a_fused_attention_projection_equals_the_separate_ones() {
    use candle_core::quantized::{gguf_file, QTensor};
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "qwen35moe", GgmlDType::F32);
    let mut f = std::fs::File::open(&path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut ts: Vec<(String, QTensor)> = Vec::new();
    let mut fused = 0;
    for name in c.tensor_infos.keys() {
        let t = c.tensor(&mut f, name, &Device::Cpu).unwrap();
        let Some(layer) = name.strip_suffix(".attn_q.weight") else {
            if !name.ends_with(".attn_k.weight") && !name.ends_with(".attn_v.weight") {
                ts.push((name.clone(), t));
            }
            continue;
        };
        let part = |p: &str| {
            c.tensor(
                &mut std::fs::File::open(&path).unwrap(),
                &format!("{layer}.{p}.weight"),
                &Device::Cpu,
            )
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
        };
        let all = Tensor::cat(&[part("attn_q"), part("attn_k"), part("attn_v")], 0).unwrap();
        ts.push((
            format!("{layer}.attn_qkv.weight"),
            QTensor::quantize(&all, GgmlDType::F32).unwrap(),
        ));
        fused += 1;
    }
    assert_eq!(fused, 2);
    let out = dir.path().join("fused.gguf");
    let md: Vec<(&str, &gguf_file::Value)> =
        c.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tr: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&out).unwrap(), &md, &tr).unwrap();
    let tokens = ascii("fused or not, the same");
    let (mut a, mut b) = (load(&path), load(&out));
    let diff = common::max_abs_diff(&a.forward(&tokens).unwrap(), &b.forward(&tokens).unwrap());
    assert!(diff < 1e-5, "prefill differs by {diff}");
    let diff = common::max_abs_diff(&a.forward(&[70]).unwrap(), &b.forward(&[70]).unwrap());
    assert!(diff < 1e-5, "decode differs by {diff}");
}
