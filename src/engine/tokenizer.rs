//! The tokenizer, built from the GGUF's own vocabulary (or a tokenizer.json beside the file).
//!
//! `tokenizer.ggml.model = gpt2` is a byte-level BPE whose split regex depends on
//! `tokenizer.ggml.pre`; `llama`/`gemma` are SentencePiece vocabularies with scores, merged by
//! score like llama.cpp's SPM tokenizer, with byte fallback. An unknown `pre` is refused rather than guessed: a
//! wrong split silently degrades every answer.

use super::gguf::Gguf;
use super::spm::Spm;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BpeBuilder;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, Encoding, Model, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer, TokenizerImpl,
};

// GGML token types (llama.cpp's llama_token_type).
const TYPE_NORMAL: i64 = 1;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

const SPIECE_SPACE: &str = "\u{2581}";

// Split regexes as llama.cpp's llama-vocab.cpp defines them per `tokenizer.ggml.pre`.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// o200k (gpt-4o, gpt-oss, Llama 4): the regex of the model's tokenizer.json, which llama.cpp
/// quotes beside its lookahead rewrite for its own regex engine (LLAMA_VOCAB_PRE_TYPE_GPT4O);
/// the tokenizers crate's Oniguruma runs the original.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek-V3 / R1 (llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM, the Split sequence of
/// the model's tokenizer.json): digits in threes, CJK runs, then words and punctuation.
const DEEPSEEK3_SPLITS: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// DeepSeek-LLM and V2 (LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM): newlines alone, letter runs of
/// the scripts its tokenizer.json lists, ASCII / full-width punctuation, trailing spaces,
/// CJK and Hangul runs, digit runs.
const DEEPSEEK_LLM_SPLITS: [&str; 6] = [
    r"[\r\n]",
    "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
];
/// Qwen3.5's: Qwen2's with combining marks (\p{M}) kept in words.
const QWEN35_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token texts that end a turn in the chat formats tokentop knows; any present in the
/// vocabulary stops generation, like llama.cpp's EOG set.
const END_OF_TURN_TEXTS: [&str; 9] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|return|>",
    "<|call|>",
    "</s>",
];

/// The tokenizers crate's pipeline (normalizer, special tokens, pre-tokenizer, decoder) around
/// one of its own models (BPE from the GGUF, or whatever a tokenizer.json holds) or around
/// llama.cpp's SentencePiece segmentation (spm.rs).
pub enum Inner {
    Hf(Box<Tokenizer>),
    Spm(Box<SpmTokenizer>),
}

pub type SpmTokenizer = TokenizerImpl<
    Spm,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// `$t` bound to whichever tokenizer `$inner` holds.
macro_rules! each {
    ($inner:expr, $t:ident => $e:expr) => {
        match $inner {
            Inner::Hf($t) => $e,
            Inner::Spm($t) => $e,
        }
    };
}

impl Inner {
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> tokenizers::Result<Encoding> {
        each!(self, t => t.encode(text, add_special_tokens))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> tokenizers::Result<String> {
        each!(self, t => t.decode(ids, skip_special_tokens))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        each!(self, t => t.token_to_id(token))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        each!(self, t => t.id_to_token(id))
    }

    pub fn get_vocab_size(&self, with_added_tokens: bool) -> usize {
        each!(self, t => t.get_vocab_size(with_added_tokens))
    }

    fn added_ids(&self) -> Vec<(u32, String)> {
        each!(self, t => t
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect())
    }
}

/// A tokenizer plus the special ids generation needs.
pub struct ModelTokenizer {
    pub inner: Inner,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Every id that ends an answer: EOS, EOT and known end-of-turn tokens.
    pub stop_ids: Vec<u32>,
    /// Added tokens that are markup, not text (`<start_of_image>`, `<|fim_pad|>`): a base
    /// model writing one has left the running text.
    pub markup_ids: std::collections::HashSet<u32>,
    pub add_bos: bool,
    /// Where it came from, for the model info line.
    pub source: String,
}

impl ModelTokenizer {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| {
            anyhow!(
                "tokenizing failed: {}",
                crate::private::redact(&e.to_string(), [text])
            )
        })?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos {
            if let Some(bos) = self.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("detokenizing failed: {e}"))
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    pub fn is_markup(&self, id: u32) -> bool {
        self.markup_ids.contains(&id)
    }

    /// Builds the tokenizer for a model file: a `tokenizer.json` in the same folder wins.
    pub fn for_model(g: &Gguf) -> Result<Self> {
        let beside = g.path.with_file_name("tokenizer.json");
        let (inner, source) = if beside.is_file() {
            let t = Tokenizer::from_file(&beside)
                .map_err(|e| anyhow!("cannot read {}: {e}", beside.display()))?;
            (Inner::Hf(Box::new(t)), beside.display().to_string())
        } else {
            (from_gguf_metadata(g)?, "GGUF metadata".to_string())
        };
        let vocab_len = inner.get_vocab_size(true);
        let id = |key: &str| g.get_u32(key).filter(|&i| (i as usize) < vocab_len);
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = [eos, id("tokenizer.ggml.eot_token_id")]
            .into_iter()
            .flatten()
            .collect();
        // Harmony (gpt-oss) ends a turn with <|return|> or <|call|>; its <|end|> only ends
        // one message of the turn (llama.cpp drops <|end|> from its EOG set in this case).
        let harmony = ["<|return|>", "<|call|>"]
            .iter()
            .all(|t| inner.token_to_id(t).is_some());
        for text in END_OF_TURN_TEXTS {
            if let Some(i) = inner.token_to_id(text) {
                if !stop_ids.contains(&i) {
                    stop_ids.push(i);
                }
            }
        }
        let markup_ids = inner
            .added_ids()
            .into_iter()
            .filter(|(_, c)| {
                c.len() > 2
                    && c.starts_with('<')
                    && c.ends_with('>')
                    && !c.chars().any(char::is_whitespace)
            })
            .map(|(id, _)| id)
            .collect();
        if harmony {
            let end = inner.token_to_id("<|end|>");
            stop_ids.retain(|&i| Some(i) != end);
        }
        let model = g.get_str("tokenizer.ggml.model").unwrap_or("");
        let add_bos = g
            .get_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(model == "llama");
        Ok(Self {
            inner,
            bos,
            eos,
            stop_ids,
            markup_ids,
            add_bos,
            source,
        })
    }

    /// For tests and tools that have a tokenizer.json path.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        Tokenizer::from_file(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))
    }
}

fn string_array(g: &Gguf, key: &str) -> Result<Vec<String>> {
    g.string_array(key).unwrap_or_else(|| {
        bail!(
            "{} has no {key}: no tokenizer in the file and no tokenizer.json beside it",
            g.path.display()
        )
    })
}

fn number_array(g: &Gguf, key: &str) -> Option<Vec<f64>> {
    g.number_array(key)
}

fn from_gguf_metadata(g: &Gguf) -> Result<Inner> {
    let model = g
        .get_str("tokenizer.ggml.model")
        .with_context(|| format!("{} has no tokenizer.ggml.model", g.path.display()))?;
    let tokens = string_array(g, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        bail!("{}: the tokenizer vocabulary is empty", g.path.display());
    }
    let types: Vec<i64> = number_array(g, "tokenizer.ggml.token_type")
        .filter(|t| t.len() == tokens.len())
        .map(|t| t.into_iter().map(|x| x as i64).collect())
        .unwrap_or_else(|| vec![TYPE_NORMAL; tokens.len()]);
    // Control tokens are special (matched in prompts, skipped in output); user-defined
    // ones are ordinary text the vocabulary keeps whole (Gemma's "\n\n", runs of spaces).
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TYPE_CONTROL)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TYPE_USER_DEFINED)
        .map(|(s, _)| AddedToken::from(s.clone(), false).normalized(false))
        .collect();
    Ok(match model {
        "gpt2" => {
            let mut t = bpe(g, &tokens)?;
            add_pieces(&mut t, &control, &user);
            Inner::Hf(Box::new(t))
        }
        "llama" | "gemma" => {
            let mut t = sentencepiece(g, tokens, &types)?;
            add_pieces(&mut t, &control, &user);
            Inner::Spm(Box::new(t))
        }
        other => bail!(
            "{}: tokenizer model \"{other}\" is not supported (gpt2, llama and gemma are); put a tokenizer.json beside the file",
            g.path.display()
        ),
    })
}

fn add_pieces<M: Model>(
    t: &mut TokenizerImpl<
        M,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >,
    control: &[AddedToken],
    user: &[AddedToken],
) {
    t.add_special_tokens(control);
    t.add_tokens(user);
}

fn bpe(g: &Gguf, tokens: &[String]) -> Result<Tokenizer> {
    let pre = g.get_str("tokenizer.ggml.pre").with_context(|| {
        format!(
            "{}: BPE tokenizer without tokenizer.ggml.pre; refusing to guess its split rules",
            g.path.display()
        )
    })?;
    let (regexes, ignore_merges): (&[&str], bool) = match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "dbrx" | "smaug-bpe" => (&[LLAMA3_SPLIT], pre != "dbrx"),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => (&[QWEN2_SPLIT], false),
        "qwen35" => (&[QWEN35_SPLIT], false),
        "gpt-4o" | "llama4" => (&[GPT4O_SPLIT], false),
        "deepseek-v3" => (&DEEPSEEK3_SPLITS, false),
        "deepseek-llm" => (&DEEPSEEK_LLM_SPLITS, false),
        "gpt-2" | "gpt2" | "phi-2" | "default" | "olmo" | "mpt" => (&[GPT2_SPLIT], false),
        "starcoder" | "smollm" | "refact" => (&[r"\p{N}", GPT2_SPLIT], false),
        other => bail!(
            "{}: BPE pre-tokenizer \"{other}\" is not known to tokentop; put the model's tokenizer.json beside the file",
            g.path.display()
        ),
    };
    let merges = string_array(g, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("malformed BPE merge {m:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let model = BpeBuilder::new()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| anyhow!("building the BPE tokenizer: {e}"))?;
    let mut t = Tokenizer::new(model);
    let mut pres: Vec<PreTokenizerWrapper> = regexes
        .iter()
        .map(|r| {
            Split::new(
                SplitPattern::Regex(r.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| anyhow!("split regex: {e}"))
        })
        .collect::<Result<_>>()?;
    pres.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));
    t.with_pre_tokenizer(Some(PreSequence::new(pres)));
    t.with_decoder(Some(ByteLevel::new(false, false, false)));
    Ok(t)
}

/// SentencePiece vocabularies (`llama`, `gemma`): llama.cpp's SPM segmentation (spm.rs),
/// with the ▁ spaces and byte-fallback decoding around it.
fn sentencepiece(g: &Gguf, tokens: Vec<String>, types: &[i64]) -> Result<SpmTokenizer> {
    let scores: Vec<f32> = number_array(g, "tokenizer.ggml.scores")
        .filter(|s| s.len() == tokens.len())
        .with_context(|| {
            format!(
                "{}: SentencePiece tokenizer without one score per token",
                g.path.display()
            )
        })?
        .into_iter()
        .map(|s| s as f32)
        .collect();
    let unk = g.get_u32("tokenizer.ggml.unknown_token_id").unwrap_or(0);
    if unk as usize >= tokens.len() {
        bail!("{}: unknown-token id out of range", g.path.display());
    }
    let mergeable = |i: usize| matches!(types[i], TYPE_NORMAL | TYPE_USER_DEFINED);
    let mut t = SpmTokenizer::new(Spm::new(tokens, scores, mergeable, unk));
    let space_prefix = g
        .get_bool("tokenizer.ggml.add_space_prefix")
        .unwrap_or(true);
    let replace = Replace::new(" ", SPIECE_SPACE).map_err(|e| anyhow!("{e}"))?;
    let normalizer: NormalizerWrapper = if space_prefix {
        NormalizerSequence::new(vec![
            Prepend::new(SPIECE_SPACE.to_string()).into(),
            replace.into(),
        ])
        .into()
    } else {
        replace.into()
    };
    t.with_normalizer(Some(normalizer));
    let mut decoders: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(Replace::new(SPIECE_SPACE, " ").map_err(|e| anyhow!("{e}"))?),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    t.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(t)
}
