//! Every bad input is a clear error, never a panic.
mod common;

use candle_core::Device;
use std::io::Write;
use std::time::Instant;
use tokentop::engine::{synth::SynthSpec, Engine, Flow};
use tokentop::protocol::{GenParams, LoadOptions, Message, Role};

fn load_err(path: &std::path::Path) -> String {
    match Engine::load(path, &LoadOptions::default(), &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

#[test]
fn wrong_magic_empty_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_err(&write(dir.path(), "a.gguf", b"PK\x03\x04 this is a zip"));
    assert!(
        err.contains("not a GGUF model") && err.contains("magic"),
        "{err}"
    );
    let err = load_err(&write(dir.path(), "empty.gguf", b""));
    assert!(
        err.contains("not a GGUF model") && err.contains("0 bytes"),
        "{err}"
    );
    let err = load_err(&dir.path().join("absent.gguf"));
    assert!(err.contains("cannot open"), "{err}");
}

#[test]
fn corrupt_header_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = common::synth(dir.path(), &SynthSpec::new("llama"));
    let mut bytes = std::fs::read(&good).unwrap();
    // Smash the metadata: huge counts and garbage strings after the magic and version.
    for b in bytes.iter_mut().skip(8).take(200) {
        *b = 0xFF;
    }
    let err = load_err(&write(dir.path(), "corrupt.gguf", &bytes));
    assert!(err.contains("corrupt or truncated GGUF"), "{err}");
}

#[test]
fn truncated_file_names_the_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let good = common::synth(dir.path(), &SynthSpec::new("llama"));
    let bytes = std::fs::read(&good).unwrap();
    let err = load_err(&write(
        dir.path(),
        "cut.gguf",
        &bytes[..bytes.len() * 2 / 3],
    ));
    assert!(err.contains("truncated") && err.contains("tensor"), "{err}");
    // Cut inside the header too.
    let err = load_err(&write(dir.path(), "cut2.gguf", &bytes[..300]));
    assert!(err.contains("corrupt or truncated"), "{err}");
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(dir.path(), &SynthSpec::new("mamba"));
    let err = load_err(&path);
    assert!(err.contains("unsupported architecture \"mamba\""), "{err}");
    for arch in ["llama", "qwen2", "qwen3", "qwen3moe", "gemma3", "phi3"] {
        assert!(err.contains(arch), "{err} does not list {arch}");
    }
}

#[test]
fn prompt_longer_than_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(dir.path(), &SynthSpec::new("qwen2"));
    let mut e = Engine::load(
        &path,
        &LoadOptions {
            n_ctx: 64,
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    let long = "the ".repeat(200);
    let err = e
        .generate(
            &[Message::new(Role::User, long)],
            &GenParams::default(),
            |_| Flow::Continue,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the prompt is") && err.contains("context holds 64"),
        "{err}"
    );
    // The engine still answers afterwards.
    let (stats, _) = e
        .generate(
            &[Message::new(Role::User, "hi")],
            &GenParams {
                max_tokens: 3,
                ..Default::default()
            },
            |_| Flow::Continue,
        )
        .unwrap();
    assert!(stats.generated_tokens >= 1);
}

#[test]
fn generation_stops_when_the_context_fills() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(dir.path(), &SynthSpec::new("llama"));
    let mut e = Engine::load(
        &path,
        &LoadOptions {
            n_ctx: 32,
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    let params = GenParams {
        max_tokens: 1000,
        ignore_eos: true,
        ..Default::default()
    };
    let (stats, reason) = e
        .generate_tokens(Instant::now(), &[5; 20], &params, |_| Flow::Continue)
        .unwrap();
    assert_eq!(reason, tokentop::protocol::FinishReason::ContextFull);
    assert_eq!(
        stats.prompt_tokens + stats.generated_tokens,
        33,
        "{stats:?}"
    );
}
