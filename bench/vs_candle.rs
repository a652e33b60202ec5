//! Decode and prefill speed of tokentop's engine against candle-transformers' quantized
//! llama (what candle's `quantized` example runs) on the same GGUF, interleaved, same
//! threads. Usage: cargo run --release --example vs_candle -- MODEL.gguf [RUNS]
use candle_core::{Device, Tensor};
use std::time::Instant;
use tokentop::engine::{gguf::Gguf, model::Model};

const PROMPT: usize = 128;
const DECODE: usize = 128;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&args[1]);
    let runs: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let dev = Device::Cpu;
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 100 + i * 7).collect();
    let (mut ours_pp, mut ours_tg, mut ref_pp, mut ref_tg) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        // tokentop
        let mut m = Model::load(&mut Gguf::open(path)?, 4096, &dev)?;
        let t = Instant::now();
        let mut logits = m.forward(&prompt)?;
        ours_pp.push(PROMPT as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..DECODE {
            let next = logits.argmax(0)?.to_scalar::<u32>()?;
            logits = m.forward(&[next])?;
        }
        ours_tg.push(DECODE as f64 / t.elapsed().as_secs_f64());
        drop(m);

        // candle-transformers
        let mut f = std::fs::File::open(path)?;
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f)?;
        let mut r = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            ct, &mut f, &dev,
        )?;
        let t = Instant::now();
        let mut logits = r
            .forward(&Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?, 0)?
            .squeeze(0)?;
        ref_pp.push(PROMPT as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..DECODE {
            let next = logits.argmax(0)?.to_scalar::<u32>()?;
            logits = r
                .forward(&Tensor::new(&[next], &dev)?.unsqueeze(0)?, PROMPT + i)?
                .squeeze(0)?;
        }
        ref_tg.push(DECODE as f64 / t.elapsed().as_secs_f64());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("| test | tokentop t/s | candle-transformers t/s | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| pp{PROMPT} | {:.1} | {:.1} | {:.2} |",
        mean(&ours_pp),
        mean(&ref_pp),
        mean(&ours_pp) / mean(&ref_pp)
    );
    println!(
        "| tg{DECODE} | {:.1} | {:.1} | {:.2} |",
        mean(&ours_tg),
        mean(&ref_tg),
        mean(&ours_tg) / mean(&ref_tg)
    );
    Ok(())
}
