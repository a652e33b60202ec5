//! Plain text completion without a chat template (debugging aid for base models).
use std::time::Instant;
use tokentop::engine::{Engine, Flow, GenEvent};
use tokentop::protocol::{GenParams, LoadOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut e = Engine::load(
        std::path::Path::new(&args[1]),
        &LoadOptions::default(),
        &candle_core::Device::Cpu,
    )?;
    let ids = e.tokenizer.encode(&args[2])?;
    let params = GenParams {
        temperature: 0.0,
        max_tokens: 30,
        repeat_penalty: 1.0,
        ..Default::default()
    };
    e.generate_tokens(Instant::now(), &ids, &params, |ev| {
        if let GenEvent::Token(t) = ev {
            print!("{t}");
        }
        Flow::Continue
    })?;
    println!();
    Ok(())
}
