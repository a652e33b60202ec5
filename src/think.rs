//! Thinking blocks: the `<think>…</think>` part that reasoning models (Qwen3, DeepSeek-R1 and
//! its distills) write before their answer. The chat shows it collapsed with its own token
//! count and time, so the time to the first *answer* token is visible beside TTFT.
//!
//! An answer's text keeps the tags as the model wrote them (sessions and exports stay
//! faithful); this module only reads them. Where a chat template opens the block itself (the
//! R1 distills' generation prompt ends with `<think>\n`), the engine puts the opening tag in
//! front of the first piece, and a server's separate reasoning text (`reasoning_content`,
//! Ollama's `thinking`) is wrapped in the same tags by the remote worker, so every source
//! reads alike here.

use std::time::{Duration, Instant};

pub const OPEN: &str = "<think>";
pub const CLOSE: &str = "</think>";

/// An answer split at its thinking block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts<'a> {
    /// The thinking text, when the answer opens with a block.
    pub thought: Option<&'a str>,
    /// Whether the block has ended (its closing tag has arrived).
    pub closed: bool,
    /// What the user reads as the answer: everything after the block.
    pub answer: &'a str,
}

/// Splits `text` at its leading thinking block. A block only counts at the start (after
/// white space): a `<think>` quoted in the middle of an answer is answer text. While a tag is
/// still arriving in pieces (`<thi`), nothing is shown as answer yet.
pub fn split(text: &str) -> Parts<'_> {
    let start = text.trim_start();
    let Some(rest) = start.strip_prefix(OPEN) else {
        let pending = !start.is_empty() && OPEN.starts_with(start);
        return Parts {
            thought: None,
            closed: false,
            answer: if pending { "" } else { text },
        };
    };
    match rest.find(CLOSE) {
        Some(i) => Parts {
            thought: Some(rest[..i].trim()),
            closed: true,
            answer: rest[i + CLOSE.len()..].trim_start(),
        },
        None => Parts {
            thought: Some(rest.trim_start()),
            closed: false,
            answer: "",
        },
    }
}

/// Whether a rendered prompt leaves the model inside a thinking block (the template wrote
/// the opening tag, so the model's first token is already thought).
pub fn prompt_opens_block(prompt: &str) -> bool {
    prompt.trim_end().ends_with(OPEN)
}

/// The thinking part of a streamed answer, measured piece by piece.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tracker {
    /// Pieces (close to tokens) of the block, its tags included.
    pub pieces: usize,
    /// When the block began and ended.
    pub began: Option<Instant>,
    pub ended: Option<Instant>,
    /// When the first answer text (not white space) arrived.
    pub answered: Option<Instant>,
}

impl Tracker {
    /// Notes one piece that has just been appended, `text` being the whole answer so far.
    pub fn piece(&mut self, text: &str, now: Instant) {
        let p = split(text);
        if p.thought.is_some() && self.ended.is_none() {
            self.pieces += 1;
            self.began.get_or_insert(now);
            if p.closed {
                self.ended = Some(now);
            }
        }
        if self.answered.is_none() && !p.answer.trim().is_empty() {
            self.answered = Some(now);
        }
    }

    /// How long the block took (to now, while it is still open).
    pub fn duration(&self, now: Instant) -> Option<Duration> {
        let began = self.began?;
        Some(self.ended.unwrap_or(now).saturating_duration_since(began))
    }
}

/// The collapsed line a thinking block shows: `▸ thought · 245 tokens · 12.3 s`; counts
/// that are not known (a session saved before they were) are left out.
pub fn summary(open: bool, pieces: Option<usize>, time: Option<Duration>, shown: bool) -> String {
    let arrow = if shown { '▾' } else { '▸' };
    let what = if open { "thinking…" } else { "thought" };
    let pieces = pieces.map_or(String::new(), |n| format!(" · {n} tokens"));
    let time = time.map_or(String::new(), |d| format!(" · {:.1} s", d.as_secs_f64()));
    let hint = if shown { "" } else { " (Ctrl-T shows it)" };
    format!("{arrow} {what}{pieces}{time}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_closed_block() {
        let p = split("<think>\nLet me see: 2+2.\n</think>\n\nIt is **4**.");
        assert_eq!(p.thought, Some("Let me see: 2+2."));
        assert!(p.closed);
        assert_eq!(p.answer, "It is **4**.");
    }

    #[test]
    fn an_open_block_has_no_answer_yet() {
        let p = split("<think>\nStill going");
        assert_eq!(p.thought, Some("Still going"));
        assert!(!p.closed);
        assert_eq!(p.answer, "");
    }

    #[test]
    fn text_without_a_block_is_all_answer() {
        let text = "Paris. (In HTML you might write <think> as a tag.)";
        assert_eq!(
            split(text),
            Parts {
                thought: None,
                closed: false,
                answer: text
            }
        );
        // A tag still arriving shows nothing, a non-tag shows at once.
        assert_eq!(split("<thi").answer, "");
        assert_eq!(split("<b").answer, "<b");
    }

    #[test]
    fn templates_that_open_the_block() {
        // DeepSeek-R1-Distill's generation prompt, as its template renders it.
        assert!(prompt_opens_block(
            "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n"
        ));
        assert!(!prompt_opens_block("<|im_start|>assistant\n"));
    }

    #[test]
    fn tracker_counts_block_pieces_and_first_answer() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = Tracker::default();
        let mut text = String::new();
        for (i, piece) in ["<think>", "\nhm", ", four", "</think>", "\n\n", "4", "."]
            .iter()
            .enumerate()
        {
            text.push_str(piece);
            t.piece(&text, at(100 * i as u64));
        }
        assert_eq!(t.pieces, 4, "the tags and the two pieces between them");
        assert_eq!(t.duration(at(5000)), Some(Duration::from_millis(300)));
        assert_eq!(t.answered, Some(at(500)), "the blank line is not an answer");
        let mut plain = Tracker::default();
        plain.piece("Hello", at(0));
        assert_eq!((plain.pieces, plain.began), (0, None));
        assert_eq!(plain.answered, Some(at(0)));
    }

    #[test]
    fn summary_line() {
        let s = summary(false, Some(245), Some(Duration::from_millis(12_340)), false);
        assert_eq!(s, "▸ thought · 245 tokens · 12.3 s (Ctrl-T shows it)");
        assert_eq!(summary(true, Some(3), None, true), "▾ thinking… · 3 tokens");
        assert_eq!(summary(false, None, None, true), "▾ thought");
    }
}
