//! A base model (issue 9 item 15): the catalog tags it `base`, `list` and the switcher say so,
//! and it gets plain completion that stops at a paragraph end instead of a made-up chat
//! template it rambles through to max tokens. Checked with the real Gemma 3 270M.
mod common;

use ratatui::backend::TestBackend;
use ratatui::Terminal;
use std::time::Instant;
use tokentop::catalog::Catalog;
use tokentop::engine::Engine;
use tokentop::protocol::{FinishReason, GenParams, LoadOptions, Message, Role};
use tokentop::state::{Mode, State};
use tokentop::theme::Theme;
use tokentop::ui::{self, Ctx};

#[test]
fn gemma_is_tagged_base_in_the_catalog_list_and_switcher() {
    let cat = Catalog::builtin();
    let gemma = cat.find("gemma-3-270m").unwrap();
    assert!(gemma.tags.iter().any(|t| t == "base"), "{:?}", gemma.tags);
    let smol = cat.find("smollm2-135m").unwrap();
    assert!(!smol.tags.iter().any(|t| t == "base"));

    let out = common::tokentop(&["list"]);
    assert!(out.status.success());
    let list = String::from_utf8_lossy(&out.stdout);
    let header = list.lines().next().unwrap();
    assert!(header.contains("TAGS"), "{list}");
    let row = list
        .lines()
        .find(|l| l.starts_with("gemma-3-270m "))
        .unwrap();
    assert!(row.contains("dense,base"), "{list}");

    let mut st = State::new(GenParams::default(), tokentop::app::switch_items(&cat, &[]));
    st.mode = Mode::Switcher {
        selected: 0,
        for_ab: false,
    };
    let (theme, cache) = (Theme::default(), ui::LineCache::default());
    let ctx = Ctx {
        theme: &theme,
        profiles: &[],
        now: Instant::now(),
        cache: &cache,
    };
    let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
    t.draw(|f| ui::render(f, &st, &ctx)).unwrap();
    let screen = format!("{}", t.backend());
    let row = screen.lines().find(|l| l.contains("gemma-3-270m")).unwrap();
    assert!(row.contains("dense,base"), "{screen}");
}

#[test]
fn real_gemma_base_completes_plainly_and_stops_at_a_paragraph_end() {
    let Some(path) = common::gemma() else {
        return;
    };
    let mut engine = Engine::load(
        &path,
        &LoadOptions {
            n_ctx: 2048,
            ..Default::default()
        },
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(!engine.info.template_is_fallback, "no made-up template");
    let messages = [Message::new(Role::User, "The capital of France is")];
    // The prompt is the text itself (BOS added by the tokenizer), no turn markers.
    let prompt = engine.render_prompt(&messages).unwrap();
    assert_eq!(prompt, "The capital of France is");
    let params = GenParams {
        max_tokens: 300,
        temperature: 0.0,
        ..GenParams::default()
    };
    let mut text = String::new();
    let (stats, reason) = engine
        .generate(&messages, &params, |ev| {
            if let tokentop::engine::GenEvent::Token(t) = ev {
                text.push_str(t);
            }
            tokentop::engine::Flow::Continue
        })
        .unwrap();
    assert!(
        matches!(reason, FinishReason::ParagraphEnd | FinishReason::Eos),
        "{reason:?} after {} tokens: {text}",
        stats.generated_tokens
    );
    assert!(stats.generated_tokens < 300, "{text}");
    assert!(!text.contains("<start_of_turn>") && !text.trim().is_empty());
    // A paragraph ends at a blank line, or where the model writes markup instead of text
    // (Gemma 3 base puts `<start_of_image>` between paragraphs): never shown.
    assert!(!text.contains("<start_of_image>"), "{text:?}");
    if reason == FinishReason::ParagraphEnd {
        assert!(!text.trim_end().contains("\n\n"), "one paragraph: {text:?}");
    }
}
