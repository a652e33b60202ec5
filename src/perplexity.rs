//! `tokentop perplexity`: llama-perplexity's method and output, so a kernel change can be
//! checked by quality and a user can compare two quantizations of one model.
//!
//! The method is llama.cpp's tools/perplexity/perplexity.cpp (`perplexity`, no --ppl-stride):
//! the whole text is tokenized (with BOS when the model adds one) and cut into chunks of n_ctx
//! tokens; a chunk's first token is replaced by BOS (when the model adds one); each chunk runs
//! from an empty cache and only its second half is scored, so every scored token has at least
//! n_ctx/2 tokens of context. PPL = exp(mean negative log-likelihood); the error is
//! PPL x the standard error of that mean, as llama.cpp prints it.

use crate::engine::Engine;
use anyhow::{bail, Result};

/// The result of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// Tokens in the whole text.
    pub tokens: usize,
    pub n_ctx: usize,
    /// The running estimate after each chunk (what llama-perplexity prints as `[i]x`).
    pub estimates: Vec<f64>,
    pub ppl: f64,
    /// PPL's standard error.
    pub error: f64,
}

/// Scores `text` in chunks of `n_ctx` tokens (at most `max_chunks` of them), calling
/// `on_chunk(i, running estimate)` after each.
pub fn perplexity(
    engine: &mut Engine,
    text: &str,
    n_ctx: usize,
    max_chunks: Option<usize>,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity> {
    if n_ctx < 4 {
        bail!("a context of {n_ctx} tokens is too small to score (at least 4)");
    }
    if n_ctx > engine.info.n_ctx {
        bail!(
            "a context of {n_ctx} tokens is more than this model was loaded with ({}); pass a smaller -c",
            engine.info.n_ctx
        );
    }
    let tokens = engine.tokenizer.encode(text)?;
    if tokens.len() < 2 * n_ctx {
        bail!(
            "the text tokenizes to only {} tokens; a context of {n_ctx} needs at least {}",
            tokens.len(),
            2 * n_ctx
        );
    }
    let bos = engine.tokenizer.bos.filter(|_| engine.tokenizer.add_bos);
    let n_chunk = (tokens.len() / n_ctx).min(max_chunks.unwrap_or(usize::MAX));
    let first = n_ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut estimates = Vec::with_capacity(n_chunk);
    for i in 0..n_chunk {
        let mut chunk = tokens[i * n_ctx..(i + 1) * n_ctx].to_vec();
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        let logits: Vec<Vec<f32>> = engine.score(&chunk, first)?.to_vec2()?;
        // Row j holds the logits after token first + j, which predict token first + j + 1.
        for (j, row) in logits.iter().take(n_ctx - 1 - first).enumerate() {
            let v = nll_of(row, chunk[first + j + 1] as usize);
            nll += v;
            nll2 += v * v;
        }
        count += n_ctx - 1 - first;
        let estimate = (nll / count as f64).exp();
        estimates.push(estimate);
        on_chunk(i, estimate);
    }
    let mean = nll / count as f64;
    let var = nll2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let error = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        tokens: tokens.len(),
        n_ctx,
        estimates,
        ppl,
        error,
    })
}

/// -log softmax(logits)[tok], with llama.cpp's arithmetic: max and exponentials in f32, their
/// sum and the logarithm in f64.
fn nll_of(logits: &[f32], tok: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    -(f64::from(logits[tok] - max) - sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_minus_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for (t, &l) in logits.iter().enumerate() {
            let want = -(f64::from(l).exp() / z).ln();
            assert!((nll_of(&logits, t) - want).abs() < 1e-6, "{t}");
        }
        // Uniform logits over 4 tokens: perplexity 4.
        assert!((nll_of(&[7.0; 4], 2).exp() - 4.0).abs() < 1e-6);
    }
}
