//! The stats block printed after an answer, in Ollama's `--verbose` layout plus TTFT.

use crate::protocol::{FinishReason, GenStats};
use std::time::Duration;

pub fn ollama_block(stats: &GenStats, load: Duration, reason: FinishReason) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{:<22}{v}\n", format!("{k}:")));
    line("total duration", fmt_duration(stats.total + load));
    line("load duration", fmt_duration(load));
    line(
        "prompt eval count",
        format!("{} token(s)", stats.prompt_eval_tokens()),
    );
    if stats.cached_tokens > 0 {
        line("prompt cached", format!("{} token(s)", stats.cached_tokens));
    }
    line("prompt eval duration", fmt_duration(stats.prompt_eval));
    line(
        "prompt eval rate",
        format!("{:.2} tokens/s", stats.prompt_rate()),
    );
    line("time to first token", fmt_duration(stats.ttft));
    line("eval count", format!("{} token(s)", stats.generated_tokens));
    line("eval duration", fmt_duration(stats.decode));
    line("eval rate", format!("{:.2} tokens/s", stats.decode_rate()));
    line("finish reason", reason.as_str().to_string());
    if let Some(sv) = &stats.server {
        // A remote answer: the rates above are the client's, from the stream as it arrived
        // (network included); the server's own follow.
        let rate = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.2} tokens/s"));
        line("rates above", "measured by tokentop (client)".into());
        line("server reports", sv.source.clone());
        if let Some(n) = sv.prompt_tokens {
            line("server prompt eval", format!("{n} token(s)"));
        }
        line("server prompt rate", rate(sv.prompt_rate()));
        if let Some(n) = sv.generated_tokens {
            line("server eval count", format!("{n} token(s)"));
        }
        line("server eval rate", rate(sv.decode_rate()));
    }
    s
}

/// Go-style durations like Ollama prints: "1.234567s", "12.3456ms", "850µs".
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs >= 1.0 {
        format!("{secs:.6}s")
    } else if secs >= 1e-3 {
        format!("{:.4}ms", secs * 1e3)
    } else {
        format!("{:.0}µs", secs * 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_has_ollama_lines_and_rates() {
        let st = GenStats {
            prompt_tokens: 30,
            cached_tokens: 10,
            prompt_eval: Duration::from_millis(100),
            ttft: Duration::from_millis(120),
            generated_tokens: 11,
            decode: Duration::from_millis(500),
            total: Duration::from_millis(700),
            kv_bytes: 0,
            server: None,
        };
        let b = ollama_block(&st, Duration::from_millis(50), FinishReason::Eos);
        assert!(b.contains("total duration:       750.0000ms"), "{b}");
        assert!(b.contains("prompt eval count:    20 token(s)"), "{b}");
        assert!(b.contains("prompt eval rate:     200.00 tokens/s"), "{b}");
        // 10 tokens after the first, in half a second.
        assert!(b.contains("eval rate:            20.00 tokens/s"), "{b}");
        assert!(b.contains("time to first token:  120.0000ms"), "{b}");
        assert!(b.contains("finish reason:        eos"), "{b}");
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_micros(850)), "850µs");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.500000s");
    }
}
