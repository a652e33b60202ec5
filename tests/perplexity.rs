//! `tokentop perplexity`: the method checked step by step on a synthetic model, the numbers
//! checked against llama-perplexity on the real SmolLM2, and bad inputs as one-line errors.
mod common;
mod llama_server;

use candle_core::Device;
use std::path::Path;
use tokentop::engine::synth::SynthSpec;
use tokentop::engine::{gguf::Gguf, model::Model, Engine};
use tokentop::perplexity::perplexity;
use tokentop::protocol::LoadOptions;

const TEXT: &str = "bench/data/essays.txt";

/// The estimate equals the negative log-likelihood computed one token at a time with the
/// model's own decode path: chunks of n_ctx, BOS in front, only the second half scored.
#[test]
fn perplexity_is_the_mean_nll_of_each_chunks_second_half() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(dir.path(), &SynthSpec::new("llama"));
    let text = "the capital of France is Paris and the river is wide. ".repeat(6);
    let n_ctx = 16;
    let mut engine = Engine::load(
        &path,
        &LoadOptions {
            n_ctx: 64,
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    let mut seen = Vec::new();
    let got = perplexity(&mut engine, &text, n_ctx, Some(3), |i, e| seen.push((i, e))).unwrap();
    assert_eq!(got.estimates.len(), 3);
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1, 2]);

    let tokens = engine.tokenizer.encode(&text).unwrap();
    assert_eq!(got.tokens, tokens.len());
    // A chunk starts with BOS where the model adds one (this synthetic vocabulary does not).
    let bos = engine.tokenizer.bos.filter(|_| engine.tokenizer.add_bos);
    let mut model = Model::load(&mut Gguf::open(&path).unwrap(), 64, &Device::Cpu).unwrap();
    let (mut nll, mut count) = (0f64, 0usize);
    for c in 0..3 {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        model.truncate_cache(0);
        for (i, &t) in chunk.iter().enumerate().take(n_ctx - 1) {
            let logits: Vec<f32> = model.forward(&[t]).unwrap().to_vec1().unwrap();
            if i >= n_ctx / 2 {
                let max = logits.iter().copied().fold(f32::MIN, f32::max);
                let z: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
                nll += z.ln() - f64::from(logits[chunk[i + 1] as usize] - max);
                count += 1;
            }
        }
        let want = (nll / count as f64).exp();
        // 2e-3: with AVX-512, the batch (prefill) path of Q8_0 adds each block's products in
        // another order than the one-token path (kernels::avx512::Wide), which moves this
        // random model's perplexity by about 1e-3; a wrong method moves it by far more.
        let diff = (got.estimates[c] - want).abs() / want;
        assert!(diff < 2e-3, "chunk {c}: {} vs {want}", got.estimates[c]);
    }
    assert_eq!(got.ppl, *got.estimates.last().unwrap());
    assert!(got.error > 0.0 && got.error < got.ppl, "{got:?}");
}

fn final_ppl(out: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.contains("Final estimate: PPL = "))
        .unwrap_or_else(|| panic!("no final estimate in {out}"));
    line.split("PPL = ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The same file, text and context give llama-perplexity's number within 1%.
#[test]
fn perplexity_agrees_with_llama_perplexity_on_smollm2() {
    let Some(model) = common::smollm2() else {
        return;
    };
    // Like the llama-server tests: without llama.cpp this fails, unless real-model tests are
    // skipped on purpose.
    let bin = match llama_server::tool("llama-perplexity") {
        Ok(b) => b,
        Err(e) => {
            assert!(
                std::env::var_os("TOKENTOP_SKIP_REAL_MODELS").is_some_and(|v| v == "1"),
                "no llama-perplexity: {e} (set LLAMA_BIN, or TOKENTOP_SKIP_REAL_MODELS=1 to skip)"
            );
            eprintln!("SKIPPED: llama-perplexity ({e})");
            return;
        }
    };
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join(TEXT);
    let args = |c: &str| -> Vec<String> {
        vec![
            "-m".into(),
            model.display().to_string(),
            "-f".into(),
            text.display().to_string(),
            "-c".into(),
            c.into(),
            "--chunks".into(),
            "3".into(),
        ]
    };
    let mut ours_args = vec!["perplexity".to_string()];
    ours_args.extend(args("256"));
    let ours = common::tokentop(&ours_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let ours_out = String::from_utf8_lossy(&ours.stdout);
    assert!(ours_out.starts_with("[1]"), "{ours_out}");
    let theirs = std::process::Command::new(bin)
        .args(args("256"))
        .args(["-t", "2"])
        .output()
        .unwrap();
    let theirs_out = String::from_utf8_lossy(&theirs.stderr).into_owned()
        + &String::from_utf8_lossy(&theirs.stdout);
    let (a, b) = (final_ppl(&ours_out), final_ppl(&theirs_out));
    eprintln!("tokentop {a}, llama.cpp {b}");
    assert!(
        (a - b).abs() / b < 0.01,
        "tokentop {a} vs llama-perplexity {b}"
    );
}

#[test]
fn bad_perplexity_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth(dir.path(), &SynthSpec::new("llama"));
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, [0x66, 0xff, 0xfe, 0x00]).unwrap();
    let m = model.to_str().unwrap();
    for (args, want) in [
        (vec!["-f", short.to_str().unwrap()], "needs at least"),
        (vec!["-f", binary.to_str().unwrap()], "is not UTF-8"),
        (
            vec!["-f", "/nonexistent/text.txt"],
            "cannot read /nonexistent/text.txt",
        ),
        (vec!["-f", short.to_str().unwrap(), "-c", "2"], "context"),
    ] {
        let out = common::tokentop(&[&["perplexity", "-m", m][..], &args[..]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("tokentop: error: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}
