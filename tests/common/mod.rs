//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The real SmolLM2 GGUF: $TOKENTOP_TEST_MODEL, else the model store (`tokentop pull` puts it
/// there). CI fetches it first; a developer without it gets a skip notice, not a pass.
pub fn smollm2() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("TOKENTOP_TEST_MODEL").map(PathBuf::from),
        tokentop::catalog::store_dir()
            .ok()
            .map(|d| d.join("SmolLM2-135M-Instruct.Q4_1.gguf")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        if std::env::var_os("TOKENTOP_REQUIRE_MODELS").is_some() {
            panic!("TOKENTOP_REQUIRE_MODELS is set but SmolLM2 is not available");
        }
        eprintln!("SKIPPED: SmolLM2 GGUF not found; run `cargo run --release -- pull smollm2-135m`");
    }
    found
}

/// The real Gemma 3 270M GGUF, found like `smollm2`.
pub fn gemma() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("TOKENTOP_TEST_GEMMA").map(PathBuf::from),
        tokentop::catalog::store_dir()
            .ok()
            .map(|d| d.join("gemma-3-270m-q4_k_m.gguf")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        if std::env::var_os("TOKENTOP_REQUIRE_MODELS").is_some() {
            panic!("TOKENTOP_REQUIRE_MODELS is set but Gemma 3 270M is not available");
        }
        eprintln!("SKIPPED: Gemma GGUF not found; run `cargo run --release -- pull gemma-3-270m`");
    }
    found
}

use tokentop::engine::synth::{SynthExperts, SynthSpec};

/// Writes a synthetic model into `dir` and returns its path.
pub fn synth(dir: &std::path::Path, spec: &SynthSpec) -> PathBuf {
    let name = format!(
        "{}{}.gguf",
        spec.arch,
        spec.experts.map_or(String::new(), |e| format!("-moe{}", if e.stacked { "" } else { "-split" }))
    );
    let path = dir.join(name);
    spec.write(&path).expect("writing a synthetic GGUF");
    path
}

/// Every architecture the engine supports, MoE flavours included.
pub fn all_specs() -> Vec<SynthSpec> {
    let mut mixtral = SynthSpec::new("llama");
    mixtral.experts = Some(SynthExperts { count: 4, used: 2, stacked: true });
    let mut old_mixtral = SynthSpec::new("llama");
    old_mixtral.experts = Some(SynthExperts { count: 3, used: 2, stacked: false });
    vec![
        SynthSpec::new("llama"),
        mixtral,
        old_mixtral,
        SynthSpec::new("qwen2"),
        SynthSpec::new("qwen3"),
        SynthSpec::new("qwen3moe"),
        SynthSpec::new("gemma3"),
        SynthSpec::new("phi3"),
    ]
}
