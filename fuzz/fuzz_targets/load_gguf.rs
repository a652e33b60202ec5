//! Any bytes given as a GGUF file must load or fail with an error, and a loaded model must
//! answer or fail with an error: never panic, abort or exhaust memory (run with
//! `-rss_limit_mb=1024`). Seed the corpus with tiny valid files, e.g. from
//! `tokentop::engine::synth::SynthSpec::write`.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use tokentop::engine::{Engine, Flow};
use tokentop::protocol::{GenParams, LoadOptions, Message, Role};

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    let Ok(mut engine) = Engine::load(f.path(), &LoadOptions { n_ctx: 256 }, &Device::Cpu) else {
        return;
    };
    let params = GenParams {
        max_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    let _ = engine.generate(&[Message::new(Role::User, "hi")], &params, |_| {
        Flow::Continue
    });
});
