//! SentencePiece (`tokenizer.ggml.model` = `llama` / `gemma`) segmentation as llama.cpp's SPM
//! tokenizer does it (llama-vocab.cpp, `llm_tokenizer_spm_session`): start from the text's
//! characters, repeatedly merge the adjacent pair whose concatenation is the best-scoring
//! piece (ties: the leftmost), and spell characters that are no piece as `<0xXX>` byte
//! tokens.
//!
//! Written here because the tokenizers crate has no such model: its Unigram segments by
//! log-probabilities, which these scores are not (Gemma 3: "What" became "Wh"+"at"), and
//! expressing the merges as its BPE meant deriving a merge list from every piece's splits and
//! building BPE's merge map from it: about 2 s and 130 MB for Gemma 3's 262,144 pieces at
//! every start. This needs only the vocabulary and a hash map of it, as llama.cpp does.
//! Normalization (the ▁ spaces), special tokens and decoding stay with the tokenizers crate.

use hashbrown::{DefaultHashBuilder, HashTable};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Model, Token, Trainer};

/// A SentencePiece vocabulary: pieces, their scores, and which may be built by merging.
pub struct Spm {
    pieces: Vec<String>,
    /// Ids by piece text, hashed from `pieces` in place.
    ids: HashTable<u32>,
    hasher: DefaultHashBuilder,
    scores: Vec<f32>,
    /// Normal and user-defined pieces; control, byte and unknown ones are never merged into.
    mergeable: Vec<bool>,
    bytes: [Option<u32>; 256],
    unk: u32,
}

impl Spm {
    /// `pieces[i]` with `scores[i]`; `mergeable(i)` says whether piece i may be the result of
    /// a merge. Pieces that repeat keep their first id, as llama.cpp's text-to-token map does.
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        mergeable: impl Fn(usize) -> bool,
        unk: u32,
    ) -> Self {
        let hasher = DefaultHashBuilder::default();
        let mut ids = HashTable::with_capacity(pieces.len());
        let mut bytes = [None; 256];
        for (i, p) in pieces.iter().enumerate() {
            let at = |&id: &u32| pieces[id as usize].as_str();
            ids.entry(
                hasher.hash_one(p.as_str()),
                |id| at(id) == p,
                |id| hasher.hash_one(at(id)),
            )
            .or_insert(i as u32);
            if let Some(b) = byte_piece(p) {
                bytes[b as usize].get_or_insert(i as u32);
            }
        }
        let mergeable = (0..pieces.len()).map(mergeable).collect();
        Self {
            pieces,
            ids,
            hasher,
            scores,
            mergeable,
            bytes,
            unk,
        }
    }

    fn piece(&self, text: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(text);
        self.ids
            .find(hash, |&id| self.pieces[id as usize] == text)
            .copied()
    }
}

/// `<0xAB>` → 0xAB.
fn byte_piece(p: &str) -> Option<u8> {
    let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// A symbol: a byte range of the text, linked to its neighbours; `len` 0 once merged away.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of symbols `left` and its right neighbour, valid while their lengths
/// still add up to `len`.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// The heap's top is the highest score, then the leftmost (llama.cpp's llm_bigram_spm).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl Model for Spm {
    type Trainer = NoTraining;

    fn tokenize(&self, text: &str) -> tokenizers::Result<Vec<Token>> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (left, right) = (left?, right?);
            let (l, r) = (symbols[left], symbols[right]);
            let len = l.len + r.len;
            let id = self.piece(&text[l.start..l.start + len])? as usize;
            self.mergeable[id].then(|| Bigram {
                score: self.scores[id],
                left,
                right,
                len,
            })
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len = b.len;
            symbols[b.left].next = r.next;
            symbols[b.right].len = 0;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            queue.extend(bigram(&symbols, l.prev, Some(b.left)));
            queue.extend(bigram(&symbols, Some(b.left), r.next));
        }
        let mut out = Vec::new();
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let span = &text[s.start..s.start + s.len];
            match self.piece(span) {
                Some(id) => out.push(Token::new(id, span.to_string(), (s.start, s.start + s.len))),
                // Only single characters are left unmerged and unknown: spell their bytes.
                None => {
                    for (k, &b) in span.as_bytes().iter().enumerate() {
                        let id = self.bytes[b as usize].unwrap_or(self.unk);
                        let value = self.pieces[id as usize].clone();
                        out.push(Token::new(id, value, (s.start + k, s.start + k + 1)));
                    }
                }
            }
            at = s.next;
        }
        Ok(out)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.piece(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.pieces.get(id as usize).cloned()
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        self.ids
            .iter()
            .map(|&id| (self.pieces[id as usize].clone(), id))
            .collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.pieces.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("a SentencePiece vocabulary read from a GGUF is not saved".into())
    }

    fn get_trainer(&self) -> NoTraining {
        NoTraining
    }
}

/// `Model` asks for a trainer; a vocabulary read from a model file is never trained.
pub struct NoTraining;

impl Trainer for NoTraining {
    type Model = Spm;

    fn should_show_progress(&self) -> bool {
        false
    }

    fn train(&self, _model: &mut Spm) -> tokenizers::Result<Vec<AddedToken>> {
        Err("a SentencePiece vocabulary read from a GGUF cannot be trained".into())
    }

    fn feed<I, S, F>(&mut self, _iterator: I, _process: F) -> tokenizers::Result<()>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
        F: Fn(&str) -> tokenizers::Result<Vec<String>> + Sync,
    {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32)]) -> Spm {
        let mut all: Vec<(String, f32)> = vec![("<unk>".into(), 0.0)];
        all.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0)));
        all.extend(pieces.iter().map(|(p, s)| (p.to_string(), *s)));
        let (pieces, scores) = all.into_iter().unzip();
        Spm::new(pieces, scores, |i| i > 256, 0)
    }

    fn ids(spm: &Spm, text: &str) -> Vec<String> {
        let toks = spm.tokenize(text).unwrap();
        toks.into_iter().map(|t| t.value).collect()
    }

    #[test]
    fn the_best_scoring_pair_merges_first() {
        // "ab" outscores "bc": a|b|c → ab|c, although "bc" and "abc" via "a"+"bc" exist.
        let spm = vocab(&[
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("ab", -2.0),
            ("bc", -3.0),
        ]);
        assert_eq!(ids(&spm, "abc"), ["ab", "c"]);
        let spm = vocab(&[
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("ab", -3.0),
            ("bc", -2.0),
        ]);
        assert_eq!(ids(&spm, "abc"), ["a", "bc"]);
    }

    #[test]
    fn merges_chain_into_longer_pieces_and_ties_go_left() {
        let spm = vocab(&[("a", -1.0), ("aa", -1.0), ("aaaa", -1.0)]);
        // a|a|a|a|a: the leftmost pairs merge first: aa|aa|a, then aaaa|a.
        assert_eq!(ids(&spm, "aaaaa"), ["aaaa", "a"]);
    }

    #[test]
    fn characters_without_a_piece_are_spelled_in_bytes() {
        let spm = vocab(&[("h", -1.0), ("i", -1.0), ("hi", -1.0)]);
        assert_eq!(ids(&spm, "hié"), ["hi", "<0xC3>", "<0xA9>"]);
        let toks = spm.tokenize("é").unwrap();
        assert_eq!(toks[1].offsets, (1, 2));
    }

    #[test]
    fn pieces_that_may_not_merge_are_not_built() {
        // "<s>" is a control piece (not mergeable): its characters stay apart.
        let mut all: Vec<String> = vec!["<unk>".into(), "<s>".into(), "<".into(), "s".into()];
        all.extend(["<s".into(), ">".into()]);
        let scores = vec![0.0; all.len()];
        let spm = Spm::new(all, scores, |i| i >= 2, 0);
        assert_eq!(ids(&spm, "<s>"), ["<s", ">"]);
    }

    #[test]
    fn empty_text_has_no_tokens() {
        assert!(vocab(&[]).tokenize("").unwrap().is_empty());
    }
}
