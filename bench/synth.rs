//! Writes a synthetic GGUF (random quantized weights, a small byte-level vocabulary) at the
//! layer shapes of a model users run, with fewer layers, for benchmarks that need real
//! matrix sizes without downloading the model:
//!   cargo run --release --example synth -- qwen3-30b-a3b 4 q4_k_m /tmp/qwen3moe.gguf
//! Shapes: see `tokentop::engine::synth::PRESETS`. Types: q4_0, q8_0, q4_k, q4_k_m (Q4_K with
//! Q6_K where llama.cpp's Q4_K_M puts it), q6_k. The vocabulary is tiny, so the output
//! matrix is too: per-layer costs are the real model's, the head is not.
use candle_core::quantized::GgmlDType;
use tokentop::engine::synth::{SynthDims, PRESETS};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
    let [shape, layers, dtype, out] = &args[..] else {
        eprintln!("usage: synth SHAPE LAYERS TYPE OUT.gguf   (shapes: {names:?})");
        std::process::exit(2);
    };
    let fail = |msg: String| -> ! {
        eprintln!("synth: error: {msg}");
        std::process::exit(1)
    };
    let layers: usize = layers
        .parse()
        .unwrap_or_else(|_| fail(format!("{layers}: not a layer count")));
    let mut spec = SynthDims::preset(shape, layers)
        .unwrap_or_else(|| fail(format!("unknown shape {shape} (known: {names:?})")));
    (spec.dtype, spec.k_mix) = match dtype.as_str() {
        "q4_0" => (GgmlDType::Q4_0, false),
        "q8_0" => (GgmlDType::Q8_0, false),
        "q4_k" => (GgmlDType::Q4K, false),
        "q4_k_m" => (GgmlDType::Q4K, true),
        "q6_k" => (GgmlDType::Q6K, false),
        other => fail(format!("unknown type {other}")),
    };
    if let Err(e) = spec.write(std::path::Path::new(out)) {
        fail(format!("{out}: {e:#}"));
    }
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    println!(
        "{out}: {shape} x {layers} layers, {dtype}, {:.2} GB",
        size as f64 / 1e9
    );
}
