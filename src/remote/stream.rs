//! What a streamed answer is made of: the `data:` payloads of `/v1/chat/completions` (SSE,
//! framed by eventsource-stream) and the JSON lines of Ollama's native `/api/chat`, turned
//! into text pieces and the server's own timings.

use crate::protocol::ServerStats;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::time::Duration;

/// One parsed chunk of an answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Piece {
    /// Answer text in this chunk.
    pub text: String,
    /// Reasoning text in this chunk, which servers send apart (`reasoning_content`, Ollama's
    /// `thinking`); the worker shows it as a thinking block, as the local engine does.
    pub thinking: String,
    /// The server says the answer is over: "stop", "length", …
    pub finish: Option<String>,
    /// Token counts and timings the server attached (usually to the last chunk).
    pub server: Option<ServerStats>,
    /// The end of the stream (`data: [DONE]`, or Ollama's `"done": true`).
    pub done: bool,
}

/// Puts a stream's reasoning text inside `<think>` tags, as a local model writes it, so a
/// remote answer's thinking block reads the same in the chat.
#[derive(Debug, Default)]
pub struct ThinkTags {
    /// Reasoning text has come and its block is not closed yet.
    open: bool,
}

impl ThinkTags {
    /// A piece's text as the chat shows it.
    pub fn wrap(&mut self, p: &Piece) -> String {
        let mut text = String::new();
        if !p.thinking.is_empty() {
            if !self.open {
                text.push_str(crate::think::OPEN);
                self.open = true;
            }
            text.push_str(&p.thinking);
        }
        if !p.text.is_empty() {
            if self.open {
                text.push_str(crate::think::CLOSE);
                text.push_str("\n\n");
                self.open = false;
            }
            text.push_str(&p.text);
        }
        text
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    timings: Option<Timings>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
    reasoning_content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    cached_tokens: Option<usize>,
}

/// llama-server's `timings` block (milliseconds).
#[derive(Deserialize)]
struct Timings {
    cache_n: Option<usize>,
    prompt_n: Option<usize>,
    prompt_ms: Option<f64>,
    predicted_n: Option<usize>,
    predicted_ms: Option<f64>,
    prompt_per_second: Option<f64>,
    predicted_per_second: Option<f64>,
}

fn ms(x: f64) -> Option<Duration> {
    (x.is_finite() && x >= 0.0).then(|| Duration::from_secs_f64(x / 1e3))
}

/// Parses the data of one SSE event of `/v1/chat/completions`.
pub fn parse_sse_data(data: &str) -> Result<Piece> {
    if data.trim() == "[DONE]" {
        return Ok(Piece {
            done: true,
            ..Default::default()
        });
    }
    let c: Chunk = serde_json::from_str(data).with_context(|| {
        format!(
            "malformed stream: not a chat completion chunk: {:?}",
            data.chars().take(80).collect::<String>()
        )
    })?;
    if let Some(e) = c.error {
        anyhow::bail!(
            "the server stopped the answer: {}",
            super::server_message(&serde_json::json!({ "error": e }).to_string())
        );
    }
    let mut piece = Piece::default();
    for ch in &c.choices {
        if let Some(t) = &ch.delta.reasoning_content {
            piece.thinking.push_str(t);
        }
        if let Some(t) = &ch.delta.content {
            piece.text.push_str(t);
        }
        if ch.finish_reason.is_some() {
            piece.finish = ch.finish_reason.clone();
        }
    }
    // Prompt counts are of the tokens evaluated, the cached ones apart.
    piece.server = match (c.timings, c.usage) {
        (Some(t), _) => Some(ServerStats {
            source: "llama-server timings".into(),
            prompt_tokens: t.prompt_n,
            cached_tokens: t.cache_n,
            prompt_eval: t.prompt_ms.and_then(ms),
            generated_tokens: t.predicted_n,
            decode: t.predicted_ms.and_then(ms),
            stated_prompt_rate: t.prompt_per_second,
            stated_decode_rate: t.predicted_per_second,
        }),
        (None, Some(u)) => {
            let cached = u.prompt_tokens_details.and_then(|d| d.cached_tokens);
            Some(ServerStats {
                source: "usage".into(),
                prompt_tokens: u
                    .prompt_tokens
                    .map(|n| n.saturating_sub(cached.unwrap_or(0))),
                cached_tokens: cached,
                generated_tokens: u.completion_tokens,
                ..Default::default()
            })
        }
        (None, None) => None,
    };
    Ok(piece)
}

#[derive(Deserialize)]
struct OllamaLine {
    message: Option<OllamaMessage>,
    #[serde(default)]
    done: bool,
    done_reason: Option<String>,
    error: Option<String>,
    prompt_eval_count: Option<usize>,
    prompt_eval_duration: Option<u64>,
    eval_count: Option<usize>,
    eval_duration: Option<u64>,
}

#[derive(Deserialize)]
struct OllamaMessage {
    #[serde(default)]
    content: String,
    #[serde(default)]
    thinking: String,
}

/// Parses one JSON line of Ollama's native `/api/chat` stream (durations in nanoseconds).
pub fn parse_ollama_line(line: &str) -> Result<Piece> {
    let l: OllamaLine = serde_json::from_str(line).with_context(|| {
        format!(
            "malformed stream: not an Ollama chat line: {:?}",
            line.chars().take(80).collect::<String>()
        )
    })?;
    if let Some(e) = l.error {
        anyhow::bail!("the server stopped the answer: {e}");
    }
    let mut piece = Piece::default();
    if let Some(m) = l.message {
        piece.thinking.push_str(&m.thinking);
        piece.text.push_str(&m.content);
    }
    if l.done {
        piece.done = true;
        piece.finish = Some(l.done_reason.unwrap_or_else(|| "stop".into()));
        piece.server = Some(ServerStats {
            source: "ollama".into(),
            prompt_tokens: l.prompt_eval_count,
            cached_tokens: None,
            prompt_eval: l.prompt_eval_duration.map(Duration::from_nanos),
            generated_tokens: l.eval_count,
            decode: l.eval_duration.map(Duration::from_nanos),
            ..Default::default()
        });
    }
    Ok(piece)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_and_garbage() {
        assert!(parse_sse_data("[DONE]").unwrap().done);
        let e = parse_sse_data("{not json").unwrap_err();
        assert!(format!("{e:#}").starts_with("malformed stream"), "{e:#}");
        let e = parse_sse_data(r#"{"error":{"message":"boom"}}"#).unwrap_err();
        assert_eq!(e.to_string(), "the server stopped the answer: boom");
    }

    /// Reasoning text, as llama-server (`--reasoning-format deepseek`: `reasoning_content`
    /// deltas) and Ollama (`message.thinking`, docs/api.md's thinking example) stream it,
    /// becomes a `<think>` block before the answer.
    #[test]
    fn reasoning_text_becomes_a_thinking_block() {
        let lines = [
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"Okay, "}}],"object":"chat.completion.chunk"}"#,
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"2+2."}}],"object":"chat.completion.chunk"}"#,
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"4"}}],"object":"chat.completion.chunk"}"#,
        ];
        let mut tags = ThinkTags::default();
        let text: String = lines
            .iter()
            .map(|l| tags.wrap(&parse_sse_data(l).unwrap()))
            .collect();
        assert_eq!(text, "<think>Okay, 2+2.</think>\n\n4");
        let p = crate::think::split(&text);
        assert_eq!((p.thought, p.answer), (Some("Okay, 2+2."), "4"));

        let ollama = [
            r#"{"model":"deepseek-r1","created_at":"2025-05-29T09:35:56.836222Z","message":{"role":"assistant","content":"","thinking":"Hmm"},"done":false}"#,
            r#"{"model":"deepseek-r1","created_at":"2025-05-29T09:35:57.836222Z","message":{"role":"assistant","content":"Yes."},"done":false}"#,
        ];
        let mut tags = ThinkTags::default();
        let text: String = ollama
            .iter()
            .map(|l| tags.wrap(&parse_ollama_line(l).unwrap()))
            .collect();
        assert_eq!(text, "<think>Hmm</think>\n\nYes.");
    }
}
