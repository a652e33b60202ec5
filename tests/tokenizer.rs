//! Tokenizers built from GGUF metadata round-trip real text, and streaming detokenization
//! yields exactly the full decode, without holding back punctuation.
mod common;
mod llama_server;

use tokentop::engine::{gguf::Gguf, synth::SynthSpec, tokenizer::ModelTokenizer, TokenStream};

const SAMPLES: [&str; 5] = [
    "The capital of France is Paris.",
    "Emoji: 🚀 (rocket) 😶‍🌫️ (zwj sequence) ✅ done!",
    "fn main() {\n    println!(\"{}\", 40 + 2); // code\n}\n",
    "naïve café, 東京, Ωμέγα, 12345 tabs\tand  double  spaces",
    "<|im_start|> is text here, and so is <end_of_turn> once tokenized as special",
];

fn tokenizer(path: &std::path::Path) -> ModelTokenizer {
    ModelTokenizer::for_model(&Gguf::open(path).unwrap()).unwrap()
}

fn round_trip(tok: &ModelTokenizer, text: &str) {
    let ids = tok.inner.encode(text, false).unwrap().get_ids().to_vec();
    assert!(!ids.is_empty());
    let back = tok.inner.decode(&ids, false).unwrap();
    assert_eq!(back, text, "round trip through {} ids", ids.len());
    let mut stream = TokenStream::default();
    let mut streamed = String::new();
    for &id in &ids {
        if let Some(t) = stream.push(tok, id).unwrap() {
            streamed.push_str(&t);
        }
    }
    if let Some(t) = stream.flush(tok).unwrap() {
        streamed.push_str(&t);
    }
    assert_eq!(streamed, tok.decode(&ids).unwrap());
}

#[test]
fn smollm2_bpe_round_trips_and_knows_its_specials() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let tok = tokenizer(&path);
    for s in SAMPLES {
        round_trip(&tok, s);
    }
    // Digits are split one by one by the "smollm" pre-tokenizer.
    let ids = tok.inner.encode("12345", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 5);
    // Control tokens are single ids, and end answers.
    let ids = tok
        .inner
        .encode("<|im_start|>user\nhi<|im_end|>", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    assert!(tok.is_stop(2));
    // Known ids of this vocabulary: "Paris" with its leading space is one token.
    let paris = tok
        .inner
        .encode(" Paris", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(paris.len(), 1);
    assert_eq!(tok.token_text(paris[0]).unwrap(), "ĠParis");
}

#[test]
fn gemma_sentencepiece_round_trips() {
    let Some(path) = common::gemma() else { return };
    let tok = tokenizer(&path);
    for s in SAMPLES {
        round_trip(&tok, s);
    }
    assert!(tok.add_bos);
    let ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>").unwrap();
    assert_eq!(ids[0], 2, "BOS first");
    assert_eq!(ids[1], 105, "<start_of_turn> is one control token");
    assert!(tok.is_stop(106), "<end_of_turn> ends an answer");
    assert!(tok.is_stop(1), "<eos> ends an answer");
}

/// Gemma's SentencePiece segmentation (spm.rs) gives llama.cpp's tokens, on the samples and
/// on a few thousand tokens of English prose.
#[test]
fn gemma_tokens_equal_llama_cpp() {
    let Some(path) = common::gemma() else { return };
    let Some(server) = llama_server::start_model(&path, &[]) else {
        return;
    };
    let tok = tokenizer(&path);
    let essays = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/bench/data/essays.txt"
    ))
    .unwrap();
    let texts = SAMPLES.iter().copied().chain([
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
        "  leading spaces, trailing ones  ",
        essays.as_str(),
    ]);
    for text in texts {
        let ours = tok.inner.encode(text, false).unwrap().get_ids().to_vec();
        let theirs = server.tokenize(text);
        let first = ours.iter().zip(&theirs).position(|(a, b)| a != b);
        assert_eq!(
            (ours.len(), first),
            (theirs.len(), None),
            "{:?}",
            &text[..text.len().min(80)]
        );
    }
}

#[test]
fn synthetic_sentencepiece_uses_byte_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(dir.path(), &SynthSpec::new("gemma3"));
    let tok = tokenizer(&path);
    // None of these characters is a piece: they go through <0x..> byte tokens.
    round_trip(&tok, "the capital of France is Paris? 🚀 東");
    let ids = tok.inner.encode("🚀", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 4, "four UTF-8 bytes, four byte tokens");
}

#[test]
fn streaming_emits_punctuation_without_lag() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(dir.path(), &SynthSpec::new("llama"));
    let tok = tokenizer(&path);
    let ids = tok.inner.encode("Hi!", false).unwrap().get_ids().to_vec();
    let mut stream = TokenStream::default();
    let out: Vec<Option<String>> = ids.iter().map(|&i| stream.push(&tok, i).unwrap()).collect();
    assert_eq!(out.last().unwrap().as_deref(), Some("!"), "{out:?}");
    // A multi-byte character arrives only once complete.
    let ids = tok.inner.encode("é", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 2);
    let mut stream = TokenStream::default();
    assert_eq!(stream.push(&tok, ids[0]).unwrap(), None);
    assert_eq!(stream.push(&tok, ids[1]).unwrap().as_deref(), Some("é"));
}
