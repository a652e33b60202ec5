//! A real generation on a CUDA GPU: weights and KV cache on the device, candle's quantized CUDA
//! matmuls, routing on the device. Compiled in `--features cuda` builds only; without a CUDA
//! device (or driver) it says SKIPPED and passes.
#![cfg(feature = "cuda")]
mod common;

use candle_core::Device;
use tokentop::engine::{backend_name, default_device, memory_pool, Engine, Flow, GenEvent};
use tokentop::protocol::{GenParams, LoadOptions, Message, Role};

#[test]
fn smollm2_answers_on_cuda() {
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device ({e})");
            return;
        }
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
