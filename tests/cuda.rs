//! A real generation on a CUDA GPU: weights and KV cache on the device, candle's quantized CUDA
//! matmuls, routing on the device. Compiled in `--features cuda` builds only; without a CUDA
//! device (or driver) it says SKIPPED and passes.
#![cfg(feature = "cuda")]
mod common;

use candle_core::Device;
use tokentop::engine::{
    backend_name, default_device, gguf::Gguf, memory_pool, model::Model, Engine, Flow, GenEvent,
};
use tokentop::protocol::{GenParams, LoadOptions, Message, Role};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn smollm2_answers_on_cuda() {
    let Some(device) = cuda() else {
        return;
    };
    // The engine picks the GPU by itself in a CUDA build.
    assert_eq!(backend_name(&default_device()), "CUDA");
    assert_ne!(memory_pool(&device), tokentop::engine::MemoryPool::Host);
    let Some(path) = common::smollm2() else {
        return;
    };
    let mut engine = Engine::load(&path, &LoadOptions::default(), &device).unwrap();
    let params = GenParams {
        max_tokens: 24,
        temperature: 0.0,
        ..Default::default()
    };
    let mut text = String::new();
    let msgs = [Message::new(Role::User, "What is the capital of France?")];
    let (stats, _) = engine
        .generate(&msgs, &params, |ev| {
            if let GenEvent::Token(t) = ev {
                text.push_str(t);
            }
            Flow::Continue
        })
        .unwrap();
    assert!(text.contains("Paris"), "answer without Paris: {text}");
    assert!(stats.generated_tokens > 0, "{stats:?}");
}

/// Every synthetic architecture gives the CPU's logits on the GPU, in prefill and in decode.
/// The Qwen3-MoE in Q4_K runs candle's `indexed_moe_forward` on stacked experts with routing
/// on the device there, and host-routed split experts on the CPU; the Q8_0 MoE files and old
/// Mixtral files (one tensor per expert) are routed on the host on both.
/// The GPU quantizes activations to q8_1 where the CPU's kernels use q8_0, so the logits
/// agree to a tolerance, not bit for bit.
#[test]
fn every_architecture_matches_the_cpu_on_cuda() {
    let Some(device) = cuda() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..36).map(|i| 3 + (i * 37 % 200)).collect();
    for spec in common::all_specs() {
        let path = common::synth(dir.path(), &spec);
        let load = |dev: &Device| Model::load(&mut Gguf::open(&path).unwrap(), 512, dev).unwrap();
        let (mut cpu, mut gpu) = (load(&Device::Cpu), load(&device));
        let mut check = |step: &str, toks: &[u32]| {
            let a = cpu.forward(toks).unwrap();
            let b = gpu.forward(toks).unwrap().to_device(&Device::Cpu).unwrap();
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = common::max_abs_diff(&a, &b);
            eprintln!(
                "{} {step}: max |cpu - gpu| {diff} (logits up to {scale})",
                spec.arch
            );
            assert!(
                diff <= 0.05 * scale.max(1.0),
                "{} {step}: GPU logits differ by {diff} (scale {scale})",
                spec.arch
            );
        };
        check("prefill", &tokens[..32]);
        for (i, t) in tokens[32..].iter().enumerate() {
            check(&format!("decode {i}"), &[*t]);
        }
    }
}
