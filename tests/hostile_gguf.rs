//! Issue 8, engine classes: malformed GGUFs (1), allocation bombs in metadata (2), hostile
//! chat templates (3), quadratic tokenizer construction (4) and the engine's numbers (9).
//! Each file is written here from a synthetic model, loaded in a child process under an
//! address-space limit (gguf_tools::CHILD_MEMORY_MB), and must give one exact kind of error:
//! never a panic, an abort or a memory explosion.
mod common;
mod gguf_tools;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use gguf_tools::{load_capped, patch_tensor, Outcome};
use std::path::{Path, PathBuf};
use tokentop::engine::synth::{SynthSpec, HEAD_DIM, N_EMBD, N_KV_HEAD};

/// The child process's entry point (see gguf_tools::run_child); does nothing in a normal run.
#[test]
fn child_entry() {
    gguf_tools::child_load_cases();
}

type Md = Vec<(String, Value)>;
type Ts = Vec<(String, QTensor)>;

/// A synthetic model of `arch`, rewritten after `edit` changes its metadata and tensors.
fn rewrite(dir: &Path, arch: &str, name: &str, edit: impl FnOnce(&mut Md, &mut Ts)) -> PathBuf {
    let base = common::synth(dir, &SynthSpec::new(arch));
    let mut f = std::fs::File::open(&base).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut md: Md = c
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<&String> = c.tensor_infos.keys().collect();
    names.sort();
    let mut ts: Ts = names
        .iter()
        .map(|n| (n.to_string(), c.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    edit(&mut md, &mut ts);
    let path = dir.join(format!("{name}.gguf"));
    let mdr: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tsr: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &mdr, &tsr).unwrap();
    path
}

fn set(md: &mut Md, key: &str, v: Value) {
    md.retain(|(k, _)| k != key);
    md.push((key.to_string(), v));
}

fn f32_tensor(shape: &[usize], fill: f32) -> QTensor {
    let t = Tensor::full(fill, shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, GgmlDType::F32).unwrap()
}

fn replace(ts: &mut Ts, name: &str, t: QTensor) {
    let slot = ts.iter_mut().find(|(n, _)| n == name).unwrap();
    slot.1 = t;
}

/// Loads every case in one capped child and checks each error contains its expected text.
fn expect_errors(dir: &Path, cases: &[(PathBuf, &str)]) {
    let files: Vec<PathBuf> = cases.iter().map(|(p, _)| p.clone()).collect();
    let outcomes = load_capped("child_entry", dir, &files);
    for ((path, want), got) in cases.iter().zip(outcomes) {
        match got {
            Outcome::Error(e) => assert!(
                e.contains(want),
                "{}: expected an error containing {want:?}, got {e:?}",
                path.display()
            ),
            Outcome::Answered => panic!("{} loaded and answered", path.display()),
        }
    }
}

#[test]
fn malformed_gguf_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = |name: &str, arch: &str, patch: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
        let base = common::synth(d, &SynthSpec::new(arch));
        let mut b = std::fs::read(base).unwrap();
        patch(&mut b);
        let p = d.join(format!("{name}.gguf"));
        std::fs::write(&p, b).unwrap();
        p
    };
    let vocab = |arch: &str| -> u64 {
        let base = common::synth(d, &SynthSpec::new(arch));
        let mut f = std::fs::File::open(base).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        c.tensor_infos["token_embd.weight"].shape.dims()[0] as u64
    };
    let v = vocab("gemma3");
    let zero_width =
        format!("tensor token_embd.weight has shape [{v}, 0] but gemma3.embedding_length is 64");
    let cases = vec![
        (
            rewrite(d, "llama", "align0", |md, _| {
                set(md, "general.alignment", Value::U32(0))
            }),
            "general.alignment is 0, not a power of two",
        ),
        (
            rewrite(d, "llama", "align3", |md, _| {
                set(md, "general.alignment", Value::U32(3))
            }),
            "general.alignment is 3, not a power of two",
        ),
        (
            raw("overflow", "llama", &|b| {
                patch_tensor(b, "token_embd.weight", Some(&[1 << 33, 1 << 32]), None, None)
            }),
            "tensor token_embd.weight has dimensions [4294967296, 8589934592], whose product overflows",
        ),
        (
            // Gemma ties its output to the embedding: a zero-width one once reached
            // chunks_exact_mut(0).
            raw("zero_width", "gemma3", &|b| {
                patch_tensor(b, "token_embd.weight", Some(&[0, v]), None, None)
            }),
            zero_width.as_str(),
        ),
        (
            raw("no_experts", "qwen3moe", &|b| {
                patch_tensor(b, "blk.0.ffn_gate_exps.weight", Some(&[64, 128, 0]), None, None)
            }),
            "tensor blk.0.ffn_gate_exps.weight has shape [0, 128, 64] but the model's hyper-parameters need [4, 128, 64]",
        ),
        (
            rewrite(d, "qwen3moe", "router5", |_, ts| {
                replace(ts, "blk.0.ffn_gate_inp.weight", f32_tensor(&[5, N_EMBD], 0.1))
            }),
            "tensor blk.0.ffn_gate_inp.weight has shape [5, 64] but qwen3moe.expert_count is 4",
        ),
        (
            rewrite(d, "qwen3moe", "used0", |md, _| {
                set(md, "qwen3moe.expert_used_count", Value::U32(0))
            }),
            "qwen3moe.expert_used_count is 0 but it must be between 1 and expert_count 4",
        ),
        (
            rewrite(d, "qwen3moe", "used9", |md, _| {
                set(md, "qwen3moe.expert_used_count", Value::U32(9))
            }),
            "qwen3moe.expert_used_count is 9 but it must be between 1 and expert_count 4",
        ),
        (
            raw("bad_dtype", "llama", &|b| {
                patch_tensor(b, "output_norm.weight", None, Some(15), None)
            }),
            "tensor output_norm.weight has type Q8_K, which only exists as a scratch format",
        ),
        (
            raw("misaligned", "llama", &|b| {
                patch_tensor(b, "output_norm.weight", None, None, Some(3))
            }),
            "tensor output_norm.weight starts at offset 3, not a multiple of the alignment 32",
        ),
    ];
    expect_errors(d, &cases);
}

#[test]
fn allocation_bombs_in_metadata_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bomb = |key: &str, arch: &str, v: u32| {
        rewrite(d, arch, &key.replace('.', "_"), |md, _| {
            set(md, &format!("{arch}.{key}"), Value::U32(v))
        })
    };
    let cases = vec![
        (
            bomb("block_count", "llama", u32::MAX),
            "llama.block_count is 4294967295 but the file has tensors for 2 blocks",
        ),
        (
            bomb("expert_count", "qwen3moe", u32::MAX),
            "tensor blk.0.ffn_gate_inp.weight has shape [4, 64] but qwen3moe.expert_count is 4294967295",
        ),
        (
            bomb("attention.key_length", "qwen3", 1 << 30),
            "tensor blk.0.attn_q.weight has shape [64, 64] but head_count 4, head_count_kv 2 and key_length 1073741824 need [4294967296, 64]",
        ),
        (
            bomb("embedding_length", "llama", u32::MAX),
            "tensor token_embd.weight has shape",
        ),
        (
            bomb("attention.head_count", "llama", u32::MAX),
            "4294967295 attention heads cannot share 2 KV heads",
        ),
    ];
    expect_errors(d, &cases);
}

#[test]
fn hostile_chat_templates_stop_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let with_template = |name: &str, t: String| {
        rewrite(d, "qwen2", name, |md, _| {
            set(md, "tokenizer.chat_template", Value::String(t))
        })
    };
    let spin = with_template(
        "spin",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i %}{% endfor %}{% endfor %}".into(),
    );
    let huge = with_template(
        "huge_output",
        "{% for i in range(50) %}{{ 'x' * 100000000 }}{% endfor %}".into(),
    );
    let big = with_template("big_source", "x".repeat(50 << 20));
    let cases = [
        (
            spin.clone(),
            format!(
                "the chat template in {} ran too long (over 20000000 steps)",
                spin.display()
            ),
        ),
        (
            huge.clone(),
            format!("the chat template in {} produced over 1048", huge.display()),
        ),
        (
            big.clone(),
            format!(
                "the chat template in {} is 52428800 bytes, over the 256 KB a template may have",
                big.display()
            ),
        ),
    ];
    let cases: Vec<(PathBuf, &str)> = cases.iter().map(|(p, s)| (p.clone(), s.as_str())).collect();
    expect_errors(d, &cases);
}

#[test]
fn long_vocabulary_pieces_do_not_make_the_tokenizer_quadratic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Extends Gemma's SentencePiece vocabulary (and the embedding to match) with `extra`.
    let with_pieces = |name: &str, extra: Vec<String>| {
        rewrite(d, "gemma3", name, |md, ts| {
            let get = |md: &Md, k: &str| md.iter().find(|(n, _)| n == k).unwrap().1.clone();
            let Value::Array(mut tokens) = get(md, "tokenizer.ggml.tokens") else {
                panic!()
            };
            let Value::Array(mut types) = get(md, "tokenizer.ggml.token_type") else {
                panic!()
            };
            let Value::Array(mut scores) = get(md, "tokenizer.ggml.scores") else {
                panic!()
            };
            for p in extra {
                tokens.push(Value::String(p));
                types.push(Value::I32(1));
                scores.push(Value::F32(-1.0));
            }
            let n = tokens.len();
            set(md, "tokenizer.ggml.tokens", Value::Array(tokens));
            set(md, "tokenizer.ggml.token_type", Value::Array(types));
            set(md, "tokenizer.ggml.scores", Value::Array(scores));
            replace(ts, "token_embd.weight", f32_tensor(&[n, N_EMBD], 0.01));
        })
    };
    let one_long = with_pieces("long_piece", vec!["ab".repeat(1 << 20)]);
    // 20,000 distinct 200-byte pieces: no merge list is derived from the pieces (spm.rs), so
    // neither file costs more than its size.
    let many: Vec<String> = (0..20_000).map(|i| format!("{i:0>200}")).collect();
    let many = with_pieces("many_pieces", many);
    let start = std::time::Instant::now();
    let outcomes = load_capped("child_entry", d, &[one_long.clone(), many.clone()]);
    // A hang guard, not a speed target: the 2 MB piece alone once took over a minute.
    assert!(start.elapsed().as_secs() < 60, "{:?}", start.elapsed());
    assert_eq!(outcomes[0], Outcome::Answered, "{}", one_long.display());
    assert_eq!(outcomes[1], Outcome::Answered, "{}", many.display());
}

#[test]
fn wrong_shapes_duplicates_and_nan_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kvd = N_KV_HEAD * HEAD_DIM;
    let cases = vec![
        (
            rewrite(d, "llama", "shape", |_, ts| {
                replace(ts, "blk.1.attn_k.weight", f32_tensor(&[kvd + 16, N_EMBD], 0.1))
            }),
            "tensor blk.1.attn_k.weight has shape [48, 64] but the model's hyper-parameters need [32, 64]",
        ),
        (
            rewrite(d, "llama", "dup_tensor", |_, ts| {
                let t = f32_tensor(&[N_EMBD], 1.0);
                ts.push(("output_norm.weight".into(), t));
            }),
            "the tensor output_norm.weight appears twice",
        ),
        (
            rewrite(d, "llama", "dup_key", |md, _| {
                md.push(("llama.block_count".into(), Value::U32(1)))
            }),
            "the metadata key llama.block_count appears twice",
        ),
        (
            rewrite(d, "llama", "nan_norm", |_, ts| {
                replace(ts, "blk.0.attn_norm.weight", f32_tensor(&[N_EMBD], f32::NAN))
            }),
            "tensor blk.0.attn_norm.weight holds NaN, not a finite number: the file is corrupt",
        ),
        (
            rewrite(d, "llama", "nan_matrix", |_, ts| {
                let vocab = ts.iter().find(|(n, _)| n == "output.weight").unwrap().1.shape().dims()[0];
                replace(ts, "output.weight", f32_tensor(&[vocab, N_EMBD], f32::NAN))
            }),
            "the model produced NaN logits: its weights are corrupt",
        ),
        (
            rewrite(d, "llama", "nan_rope", |md, _| {
                set(md, "llama.rope.freq_base", Value::F32(f32::NAN))
            }),
            "llama.rope.freq_base is NaN, not a valid positive number",
        ),
    ];
    expect_errors(d, &cases);
}
