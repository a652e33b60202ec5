//! Tiny random-weight GGUFs of every supported architecture load, generate exactly the
//! tokens asked for, and give the same logits whether the KV cache is filled in one pass or
//! token by token.
mod common;

use candle_core::Device;
use std::time::Instant;
use tokentop::engine::{gguf::Gguf, model::Model, Engine, Flow};
use tokentop::protocol::{FinishReason, GenParams, LoadOptions, Message, Role};

fn greedy(max_tokens: usize) -> GenParams {
    GenParams {
        max_tokens,
        temperature: 0.0,
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn every_architecture_loads_and_generates_the_requested_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for spec in common::all_specs() {
        let path = common::synth(dir.path(), &spec);
        let mut engine = Engine::load(&path, &LoadOptions::default(), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!(engine.info.arch, spec.arch);
        assert_eq!(engine.info.n_expert, spec.experts.map_or(0, |e| e.count));
        let msgs = [Message::new(Role::User, "the capital of France is")];
        let mut streamed = 0;
        let (stats, reason) = engine
            .generate(&msgs, &greedy(12), |_| {
                streamed += 1;
                Flow::Continue
            })
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!(reason, FinishReason::MaxTokens, "{}", spec.arch);
        assert_eq!(stats.generated_tokens, 12, "{}", spec.arch);
        assert!(streamed >= 2, "{}: only {streamed} events", spec.arch);
        assert!(
            stats.prompt_tokens > 5 && stats.decode_rate() > 0.0,
            "{}: {stats:?}",
            spec.arch
        );
        // The cache now holds the prompt and every generated token but the last.
        assert_eq!(engine.cached_tokens().len(), stats.prompt_tokens + 11);
    }
}

#[test]
fn incremental_decoding_matches_a_single_pass() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| 3 + (i * 37 % 200)).collect();
    for spec in common::all_specs() {
        let path = common::synth(dir.path(), &spec);
        let mut whole = Model::load(&mut Gguf::open(&path).unwrap(), 512, &Device::Cpu).unwrap();
        let all = whole.forward(&tokens).unwrap();
        // The last layer runs past its attention only for the rows whose logits are asked
        // for: those rows equal the same rows of every token's logits.
        let load = || Model::load(&mut Gguf::open(&path).unwrap(), 512, &Device::Cpu).unwrap();
        let every = load().forward_all(&tokens, 0).unwrap();
        let tail = load().forward_all(&tokens, 30).unwrap();
        assert_eq!(tail.dims(), &[10, every.dim(1).unwrap()], "{}", spec.arch);
        let diff = common::max_abs_diff(&every.narrow(0, 30, 10).unwrap(), &tail);
        assert!(
            diff < 1e-3,
            "{}: a suffix's logits differ by {diff}",
            spec.arch
        );
        let diff = common::max_abs_diff(&every.get(39).unwrap(), &all);
        assert!(
            diff < 1e-3,
            "{}: the last logits differ by {diff}",
            spec.arch
        );
        let mut steps = Model::load(&mut Gguf::open(&path).unwrap(), 512, &Device::Cpu).unwrap();
        steps.forward(&tokens[..25]).unwrap();
        let mut last = None;
        for t in &tokens[25..] {
            last = Some(steps.forward(&[*t]).unwrap());
        }
        let diff = common::max_abs_diff(&all, &last.unwrap());
        assert!(
            diff < 1e-3,
            "{}: cached decoding differs by {diff}",
            spec.arch
        );

        // Truncating the cache and re-running a different suffix equals a fresh pass.
        steps.truncate_cache(10);
        let alt: Vec<u32> = tokens[..10].iter().copied().chain([5, 6, 7]).collect();
        let a = steps.forward(&alt[10..]).unwrap();
        let mut fresh = Model::load(&mut Gguf::open(&path).unwrap(), 512, &Device::Cpu).unwrap();
        let b = fresh.forward(&alt).unwrap();
        let diff = common::max_abs_diff(&a, &b);
        assert!(
            diff < 1e-3,
            "{}: truncated cache differs by {diff}",
            spec.arch
        );
    }
}

#[test]
fn same_seed_same_text_and_sampling_params_matter() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(dir.path(), &common::all_specs()[0]);
    let run = |params: &GenParams| {
        let mut e = Engine::load(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
        let mut text = String::new();
        e.generate_tokens(Instant::now(), &[5, 6, 7, 8], params, |ev| {
            if let tokentop::engine::GenEvent::Token(t) = ev {
                text.push_str(t);
            }
            Flow::Continue
        })
        .unwrap();
        text
    };
    let hot = GenParams {
        max_tokens: 30,
        temperature: 1.5,
        top_k: None,
        top_p: None,
        repeat_penalty: 1.0,
        ignore_eos: true,
        seed: 1,
        ..Default::default()
    };
    assert_eq!(run(&hot), run(&hot));
    let other_seed = GenParams {
        seed: 2,
        ..hot.clone()
    };
    assert_ne!(run(&hot), run(&other_seed));
}

#[test]
fn split_gguf_loads_from_its_first_part_and_matches_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let spec = tokentop::engine::synth::SynthSpec::new("qwen2");
    let whole = common::synth(dir.path(), &spec);
    let first = spec.write_split(dir.path(), "model", 3).unwrap();
    let tokens = [5u32, 9, 44, 7];
    let a = Model::load(&mut Gguf::open(&whole).unwrap(), 64, &Device::Cpu)
        .unwrap()
        .forward(&tokens)
        .unwrap();
    let split = Gguf::open(&first).unwrap();
    assert_eq!(
        split.parameter_count(),
        Gguf::open(&whole).unwrap().parameter_count()
    );
    let b = Model::load(&mut Gguf::open(&first).unwrap(), 64, &Device::Cpu)
        .unwrap()
        .forward(&tokens)
        .unwrap();
    let diff = common::max_abs_diff(&a, &b);
    assert_eq!(diff, 0.0);

    let second = dir.path().join("model-00002-of-00003.gguf");
    let err = format!("{:#}", Gguf::open(&second).err().unwrap());
    assert!(err.contains("open its first part"), "{err}");
    std::fs::remove_file(dir.path().join("model-00003-of-00003.gguf")).unwrap();
    let err = format!("{:#}", Gguf::open(&first).err().unwrap());
    assert!(
        err.contains("model-00003-of-00003.gguf is missing"),
        "{err}"
    );
}
