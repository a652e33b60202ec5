//! gpt-oss's "harmony" answer format, turned into what the chat shows: the model writes
//! messages on channels, `<|channel|>analysis<|message|>…<|end|>` (its reasoning), then
//! `<|start|>assistant<|channel|>final<|message|>…<|return|>` (the answer). The reasoning
//! becomes a `<think>…</think>` block (shown collapsed, like other thinking models), the
//! final channel is the answer, and the headers and control tokens are dropped.
//!
//! The control tokens decode to no text (they are special), so the filter reads token ids:
//! it is fed each generated id with the text the detokenizer gave for it.

use super::tokenizer::ModelTokenizer;

/// The ids of harmony's control tokens in a vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ids {
    start: u32,
    end: u32,
    message: u32,
    channel: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Before any harmony token: text passes through as the answer (a model that skips the
    /// format still shows what it writes).
    Plain,
    /// A message header (`<|start|>` role, `<|channel|>` name, recipients): not shown.
    Header { channel: String, in_name: bool },
    /// Inside a message body.
    Body { thinking: bool },
    /// Between messages: nothing is shown until the next header.
    Between,
}

/// Rewrites one answer's harmony stream (see the module docs).
#[derive(Debug, Clone)]
pub struct HarmonyFilter {
    ids: Ids,
    state: State,
    /// Whether a `<think>` has been written and not yet closed.
    open: bool,
}

impl HarmonyFilter {
    /// A filter for a vocabulary that has harmony's tokens, else None.
    pub fn for_tokenizer(tok: &ModelTokenizer) -> Option<Self> {
        let id = |t: &str| tok.inner.token_to_id(t);
        Some(Self {
            ids: Ids {
                start: id("<|start|>")?,
                end: id("<|end|>")?,
                message: id("<|message|>")?,
                channel: id("<|channel|>")?,
            },
            state: State::Plain,
            open: false,
        })
    }

    /// The shown text for generated token `id`, whose decoded text was `text`.
    pub fn push(&mut self, id: u32, text: Option<String>) -> Option<String> {
        let ids = self.ids;
        if id == ids.start {
            self.state = State::Header {
                channel: String::new(),
                in_name: false,
            };
            return None;
        }
        if id == ids.channel {
            self.state = State::Header {
                channel: String::new(),
                in_name: true,
            };
            return None;
        }
        if id == ids.message {
            let thinking = match &self.state {
                // The channel name, without `to=…` recipients or a `<|constrain|>` type.
                State::Header { channel, .. } => channel.split_whitespace().next() != Some("final"),
                _ => false,
            };
            self.state = State::Body { thinking };
            return match (thinking, self.open) {
                (true, false) => {
                    self.open = true;
                    Some(crate::think::OPEN.to_string())
                }
                (false, true) => {
                    self.open = false;
                    Some(crate::think::CLOSE.to_string())
                }
                _ => None,
            };
        }
        if id == ids.end {
            self.state = State::Between;
            return None;
        }
        let text = text?;
        match &mut self.state {
            State::Plain | State::Body { .. } => Some(text),
            State::Header { channel, in_name } => {
                if *in_name {
                    channel.push_str(&text);
                }
                None
            }
            State::Between => None,
        }
    }

    /// What is left at the end of the answer: the closing tag of an unfinished block.
    pub fn finish(&mut self) -> Option<String> {
        std::mem::take(&mut self.open).then(|| crate::think::CLOSE.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gguf::Gguf;
    use crate::engine::synth::SynthSpec;

    /// The synthetic gpt-oss vocabulary (byte-level BPE plus harmony's control tokens).
    fn tokenizer() -> (tempfile::TempDir, ModelTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpt-oss.gguf");
        SynthSpec::new("gpt-oss").write(&path).unwrap();
        let tok = ModelTokenizer::for_model(&Gguf::open(&path).unwrap()).unwrap();
        (dir, tok)
    }

    /// Runs a whole answer (as the model writes it, control tokens included) through the
    /// detokenizer and the filter, as the engine does.
    fn shown(tok: &ModelTokenizer, answer: &str) -> String {
        let ids = tok.inner.encode(answer, false).unwrap().get_ids().to_vec();
        let mut f = HarmonyFilter::for_tokenizer(tok).expect("harmony tokens");
        let mut stream = crate::engine::TokenStream::default();
        let mut out = String::new();
        for id in ids {
            let piece = stream.push(tok, id).unwrap();
            out.extend(f.push(id, piece));
        }
        out.extend(
            stream
                .flush(tok)
                .unwrap()
                .and_then(|t| f.push(u32::MAX, Some(t))),
        );
        out.extend(f.finish());
        out
    }

    #[test]
    fn analysis_becomes_a_thinking_block_and_final_the_answer() {
        let (_dir, tok) = tokenizer();
        let answer = "<|channel|>analysis<|message|>User asks the capital. It is Paris.<|end|>\
                      <|start|>assistant<|channel|>final<|message|>Paris is the capital.<|return|>";
        assert_eq!(
            shown(&tok, answer),
            "<think>User asks the capital. It is Paris.</think>Paris is the capital."
        );
        let parts = crate::think::split("<think>a b</think>Paris");
        assert_eq!((parts.thought, parts.answer), (Some("a b"), "Paris"));
    }

    #[test]
    fn two_analysis_messages_make_one_block_and_an_unfinished_one_is_closed() {
        let (_dir, tok) = tokenizer();
        let answer = "<|channel|>analysis<|message|>one<|end|><|start|>assistant\
                      <|channel|>analysis<|message|> two<|end|>\
                      <|start|>assistant<|channel|>final<|message|>done";
        assert_eq!(shown(&tok, answer), "<think>one two</think>done");
        // Cut off while thinking (max tokens): the block is closed at the end.
        let cut = "<|channel|>analysis<|message|>still thinking";
        assert_eq!(shown(&tok, cut), "<think>still thinking</think>");
        // A tool-call preamble on the commentary channel is not the answer either; the
        // recipient after the channel name does not confuse it.
        let tool = "<|channel|>commentary to=functions.get<|message|>{}<|end|>\
                    <|start|>assistant<|channel|>final<|message|>ok";
        assert_eq!(shown(&tok, tool), "<think>{}</think>ok");
    }

    #[test]
    fn text_without_harmony_tokens_passes_through() {
        let (_dir, tok) = tokenizer();
        assert_eq!(shown(&tok, "just text"), "just text");
    }

    #[test]
    fn end_ends_a_message_not_the_turn() {
        let (_dir, tok) = tokenizer();
        let id = |t: &str| tok.inner.token_to_id(t).unwrap();
        assert!(!tok.is_stop(id("<|end|>")));
        assert!(tok.is_stop(id("<|return|>")));
        assert!(tok.is_stop(id("<|call|>")));
    }
}
