//! tokentop's own GGUF header parser: every ggml type id is read (candle's reader refused the
//! ones candle cannot compute with), tensors of those types are handed out as the raw bytes
//! the file stores, and the IQ types and MXFP4 among them load and run on tokentop's kernels.
mod common;
mod gguf_tools;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use gguf_tools::patch_tensor;
use tokentop::engine::gguf::{GgmlType, Gguf};
use tokentop::engine::synth::SynthSpec;
use tokentop::engine::Engine;
use tokentop::protocol::LoadOptions;

/// (id, name, values per block, bytes per block) for every type in ggml/include/ggml.h's
/// enum ggml_type, block sizes and sizeof(block_*) as ggml/src/ggml.c's type_traits and
/// ggml-common.h's static_asserts give them (QK_K = 256).
const GGML: [(u32, &str, usize, usize); 34] = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 2 + 16),
    (3, "Q4_1", 32, 2 * 2 + 16),
    (6, "Q5_0", 32, 2 + 4 + 16),
    (7, "Q5_1", 32, 2 * 2 + 4 + 16),
    (8, "Q8_0", 32, 2 + 32),
    (9, "Q8_1", 32, 2 * 2 + 32),
    (10, "Q2_K", 256, 256 / 16 + 256 / 4 + 2 * 2),
    (11, "Q3_K", 256, 256 / 8 + 256 / 4 + 12 + 2),
    (12, "Q4_K", 256, 2 * 2 + 12 + 256 / 2),
    (13, "Q5_K", 256, 2 * 2 + 12 + 256 / 8 + 256 / 2),
    (14, "Q6_K", 256, 256 / 2 + 256 / 4 + 256 / 16 + 2),
    (15, "Q8_K", 256, 4 + 256 + 256 / 16 * 2),
    (16, "IQ2_XXS", 256, 2 + 256 / 8 * 2),
    (17, "IQ2_XS", 256, 2 + 256 / 8 * 2 + 256 / 32),
    (18, "IQ3_XXS", 256, 2 + 3 * 256 / 8),
    (19, "IQ1_S", 256, 2 + 256 / 8 + 256 / 16),
    (20, "IQ4_NL", 32, 2 + 16),
    (
        21,
        "IQ3_S",
        256,
        2 + 256 / 4 + 256 / 32 + 256 / 8 + 256 / 64,
    ),
    (22, "IQ2_S", 256, 2 + 256 / 4 + 256 / 32 + 256 / 32),
    (23, "IQ4_XS", 256, 2 + 2 + 256 / 64 + 256 / 2),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 256 / 8 + 256 / 16 + 256 / 32),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, (256 - 4 * 256 / 64) / 5 + 256 / 64 + 2),
    (35, "TQ2_0", 256, 256 / 4 + 2),
    (39, "MXFP4", 32, 1 + 16),
    (40, "NVFP4", 64, 4 + 32),
    (41, "Q1_0", 128, 2 + 16),
];

#[test]
fn every_ggml_type_id_has_its_block_geometry() {
    for (id, name, block, bytes) in GGML {
        let t = GgmlType::from_id(id).unwrap_or_else(|| panic!("type id {id} ({name})"));
        assert_eq!(
            (
                t.id(),
                t.to_string().as_str(),
                t.block_size(),
                t.type_size()
            ),
            (id, name, block, bytes)
        );
    }
    // Removed ids and ids past the end are unknown.
    for id in [4, 5, 31, 32, 33, 36, 37, 38, 42, 1000, u32::MAX] {
        assert_eq!(GgmlType::from_id(id), None, "{id}");
    }
    // Where candle has the type, tokentop's geometry is candle's.
    for (id, ..) in GGML {
        let t = GgmlType::from_id(id).unwrap();
        if let Some(c) = t.to_candle() {
            assert_eq!(
                (c.block_size(), c.type_size()),
                (t.block_size(), t.type_size())
            );
        }
    }
    assert_eq!(GgmlType::IQ2_XXS.to_candle(), None);
    assert_eq!(GgmlType::Q4_K.to_candle(), Some(GgmlDType::Q4K));
}

#[test]
fn tensors_of_types_candle_lacks_are_read_raw_and_run_on_tokentop_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = SynthSpec::new("llama");
    spec.dtype = GgmlDType::Q4_0;
    let base = common::synth(dir.path(), &spec);
    let bytes = std::fs::read(&base).unwrap();
    let name = "blk.0.attn_q.weight";
    let (want_dims, want_data) = {
        let g = Gguf::open(&base).unwrap();
        let (ty, dims, data) = g.raw(name).unwrap();
        assert_eq!(ty, GgmlType::Q4_0);
        (dims.to_vec(), data.to_vec())
    };
    let tokens = [1u32, 5, 9, 3];
    let logits = |path: &std::path::Path| -> Vec<f32> {
        let mut e = Engine::load(path, &LoadOptions::default(), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        e.score(&tokens, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let original = logits(&base);
    // IQ4_NL blocks are as large as Q4_0's: the same bytes, read as the new type.
    let mut b = bytes.clone();
    patch_tensor(&mut b, name, None, Some(20), None);
    let path = dir.path().join("iq4_nl.gguf");
    std::fs::write(&path, &b).unwrap();
    let g = Gguf::open(&path).unwrap();
    let (ty, dims, data) = g.raw(name).unwrap();
    assert_eq!((ty, dims), (GgmlType::IQ4_NL, want_dims.as_slice()));
    assert_eq!(data, want_data.as_slice());
    assert_eq!(g.tensor_type(name), Some(GgmlType::IQ4_NL));
    // candle's reader still refuses it by name; the model loads it through kernels/iq.rs.
    let err = format!("{:#}", g.tensor(name, &Device::Cpu).unwrap_err());
    assert!(
        err.contains(&format!(
            "{}: tensor {name} has type IQ4_NL, which tokentop does not support yet",
            path.display()
        )) && !err.contains('\n'),
        "{err}"
    );
    let iq = logits(&path);
    assert!(iq.iter().all(|v| v.is_finite()));
    assert_ne!(
        iq, original,
        "the IQ4_NL reading of the bytes changes the weights"
    );
    // MXFP4 (17-byte blocks of 32, smaller than Q4_0's): the slice is the size ggml gives.
    let mut b = bytes;
    let last = "output.weight";
    patch_tensor(&mut b, last, None, Some(39), None);
    let path = dir.path().join("mxfp4.gguf");
    std::fs::write(&path, &b).unwrap();
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.tensor_type(last), Some(GgmlType::MXFP4));
    let (_, dims, data) = g.raw(last).unwrap();
    let elems: usize = dims.iter().product();
    assert_eq!(data.len(), elems / 32 * 17);
    // Scales of 2^-8 in every block (Q4_0's bytes read as E8M0 exponents overflow).
    let at = b
        .windows(data.len())
        .position(|w| w == data)
        .expect("the tensor's bytes are in the file");
    let n = data.len();
    drop(g);
    for blk in b[at..at + n].chunks_exact_mut(17) {
        blk[0] = 120;
    }
    std::fs::write(&path, &b).unwrap();
    let mx = logits(&path);
    assert!(mx.iter().all(|v| v.is_finite()));
    assert_ne!(mx, original, "the MXFP4 output matrix is used");
}

/// Stacked expert tensors in an IQ type (IQ2 DeepSeek, gpt-oss's MXFP4) split into one
/// matrix per expert on tokentop's kernels, beside parts in candle's types.
#[test]
fn moe_experts_in_an_iq_type_load_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = SynthSpec::new("qwen3moe");
    spec.dtype = GgmlDType::Q4_0;
    let base = common::synth(dir.path(), &spec);
    let tokens = [1u32, 5, 9, 3];
    let logits = |path: &std::path::Path| -> Vec<f32> {
        let mut e = Engine::load(path, &LoadOptions::default(), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        e.score(&tokens, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let original = logits(&base);
    let mut b = std::fs::read(&base).unwrap();
    // gate and up of layer 0 as IQ4_NL (the same block size as Q4_0); down stays Q4_0.
    for name in ["blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"] {
        patch_tensor(&mut b, name, None, Some(20), None);
    }
    let path = dir.path().join("moe-iq4_nl.gguf");
    std::fs::write(&path, &b).unwrap();
    let iq = logits(&path);
    assert!(iq.iter().all(|v| v.is_finite()));
    assert_ne!(iq, original, "the experts' IQ4_NL reading is used");
}
