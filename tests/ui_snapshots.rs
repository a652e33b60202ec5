//! Each pane rendered on ratatui's TestBackend and compared with its insta snapshot.

use ratatui::backend::TestBackend;
use ratatui::layout::Rect;
use ratatui::Terminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokentop::protocol::*;
use tokentop::roofline::{self, Profile};
use tokentop::state::{
    update, AbPhase, AbRun, AbSide, ChatEntry, Footer, Mode, Msg, State, Stream, SwitchItem,
};
use tokentop::telemetry::{Memory, PoolKind, Power, Snapshot};
use tokentop::theme::Theme;
use tokentop::ui::{self, Ctx};

const GB: u64 = 1_000_000_000;

fn footer(decode: f64, tokens: usize) -> Footer {
    Footer {
        ttft: Duration::from_millis(420),
        prefill_rate: 310.0,
        decode_rate: decode,
        tokens,
        reason: FinishReason::Eos,
        joules: Some(12.0),
        peak_rss: 2 * GB,
    }
}

fn fixture(now: Instant) -> State {
    let items = vec![
        SwitchItem {
            label: "smollm2-135m".into(),
            id: Some("smollm2-135m".into()),
            path: Some("/m/smol.gguf".into()),
            size: GB / 10,
            params_b: 0.135,
            active_params_b: 0.135,
            moe: false,
            tags: vec!["dense".into()],
        },
        SwitchItem {
            label: "qwen3-30b-a3b".into(),
            id: Some("qwen3-30b-a3b".into()),
            path: None,
            size: 18 * GB,
            params_b: 30.5,
            active_params_b: 3.3,
            moe: true,
            tags: vec!["moe".into()],
        },
        SwitchItem {
            label: "llama-3.1-70b".into(),
            id: Some("llama-3.1-70b".into()),
            path: None,
            size: 42 * GB,
            params_b: 70.6,
            active_params_b: 70.6,
            moe: false,
            tags: vec!["dense".into()],
        },
    ];
    let mut st = State::new(GenParams::default(), items);
    st.model = Some(ModelInfo {
        path: PathBuf::from("/m/smol.gguf"),
        name: "SmolLM2 135M".into(),
        arch: "llama".into(),
        quant: "Q4_1".into(),
        params: 135_000_000,
        weight_bytes: GB / 10,
        file_bytes: GB / 10,
        n_ctx: 4096,
        train_ctx: 8192,
        n_expert: 0,
        n_expert_used: 0,
        load_time: Duration::from_millis(250),
        tokenizer_source: "GGUF metadata".into(),
        template_is_fallback: false,
    });
    st.chat = vec![
        ChatEntry { role: Role::User, text: "Show me **Rust**".into(), model: String::new(), footer: None },
        ChatEntry {
            role: Role::Assistant,
            text: "## Hello\n\nHere is *code*:\n\n```rust\nfn main() {\n    println!(\"hi\");\n}\n```\n\n- one\n- two `x`".into(),
            model: "SmolLM2 135M".into(),
            footer: Some(footer(25.5, 64)),
        },
    ];
    st.last = Some(Footer {
        tokens: 120,
        ..footer(25.5, 64)
    });
    st.decode_history = [20.0, 22.0, 25.5, 24.0, 26.0, 25.5].into_iter().collect();
    st.memory = Some(Memory {
        kind: PoolKind::System,
        total: 24 * GB,
        used: 6 * GB,
        process_rss: GB / 2,
    });
    st.kv_bytes = 50_000_000;
    st.power = Power::Unavailable(
        "no powercap (RAPL) interface; no hwmon power sensor or battery power reading".into(),
    );
    let _ = now;
    st
}

fn profiles() -> Vec<Profile> {
    let mut p = vec![Profile {
        name: "this machine".into(),
        bandwidth_gbs: 20.0,
        memory_gb: 24.0,
    }];
    p.extend(roofline::profiles(None));
    p
}

fn draw(
    w: u16,
    h: u16,
    st: &State,
    now: Instant,
    pane: fn(&mut ratatui::Frame, Rect, &State, &Ctx),
) -> String {
    let theme = Theme::default();
    let profiles = profiles();
    let cache = ui::LineCache::default();
    let ctx = Ctx {
        theme: &theme,
        profiles: &profiles,
        now,
        cache: &cache,
    };
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| pane(f, f.area(), st, &ctx)).unwrap();
    format!("{}", t.backend())
}

fn full(f: &mut ratatui::Frame, _: Rect, st: &State, ctx: &Ctx) {
    ui::render(f, st, ctx)
}

#[test]
fn speed_pane() {
    let now = Instant::now();
    let st = fixture(now);
    insta::assert_snapshot!(draw(34, 8, &st, now, ui::render_speed));
}

#[test]
fn speed_pane_while_streaming_is_live() {
    let now = Instant::now();
    let mut st = fixture(now);
    st.stream = Some(Stream {
        req: 9,
        started: now - Duration::from_secs(3),
        prefilled_at: Some(now - Duration::from_secs(2)),
        ttft: Some(Duration::from_millis(900)),
        prompt_tokens: 200,
        cached_tokens: 150,
        pieces: 21,
        energy_j: 0.0,
        energy_known: false,
        peak_rss: 0,
    });
    // 20 tokens after the first, in two seconds.
    insta::assert_snapshot!(draw(34, 8, &st, now, ui::render_speed));
}

#[test]
fn memory_pane() {
    let now = Instant::now();
    insta::assert_snapshot!(draw(34, 7, &fixture(now), now, ui::render_memory));
}

#[test]
fn power_pane_unavailable_and_measured() {
    let now = Instant::now();
    let mut st = fixture(now);
    insta::assert_snapshot!("power_na", draw(34, 7, &st, now, ui::render_power));
    let memory = st.memory.unwrap();
    for (i, w) in [30.0, 45.0, 60.0, 52.0].into_iter().enumerate() {
        update(
            &mut st,
            Msg::Telemetry(Snapshot {
                at: now + Duration::from_millis(250 * i as u64),
                memory,
                power: Power::Watts {
                    watts: w,
                    source: "RAPL package".into(),
                },
            }),
        );
    }
    insta::assert_snapshot!("power_watts", draw(34, 7, &st, now, ui::render_power));
}

#[test]
fn roofline_pane() {
    let now = Instant::now();
    insta::assert_snapshot!(draw(34, 8, &fixture(now), now, ui::render_roofline));
}

#[test]
fn chat_pane_with_markdown_and_footer() {
    let now = Instant::now();
    insta::assert_snapshot!(draw(70, 20, &fixture(now), now, ui::render_chat));
}

#[test]
fn whole_screen_and_overlays() {
    let now = Instant::now();
    let mut st = fixture(now);
    insta::assert_snapshot!("screen", draw(100, 30, &st, now, full));
    st.mode = Mode::Switcher {
        selected: 1,
        for_ab: false,
    };
    insta::assert_snapshot!("switcher", draw(100, 30, &st, now, full));
    st.mode = Mode::Help;
    insta::assert_snapshot!("help", draw(100, 30, &st, now, full));
    st.ab = Some(AbRun {
        prompt: "hi".into(),
        a: AbSide {
            model: "SmolLM2".into(),
            path: "/a".into(),
            answer: "Paris.".into(),
            footer: Some(footer(25.0, 3)),
        },
        b: AbSide {
            model: "Gemma 3".into(),
            path: "/b".into(),
            answer: "It is **Paris**.".into(),
            footer: Some(Footer {
                joules: None,
                ..footer(12.0, 5)
            }),
        },
        phase: AbPhase::Done,
    });
    st.mode = Mode::AbResult;
    insta::assert_snapshot!("ab", draw(100, 30, &st, now, full));
}

#[test]
fn tiny_terminals_do_not_panic() {
    let now = Instant::now();
    let mut st = fixture(now);
    st.mode = Mode::Switcher {
        selected: 0,
        for_ab: false,
    };
    for (w, h) in [(20, 5), (1, 1), (10, 3), (40, 10), (200, 4)] {
        draw(w, h, &st, now, full);
    }
    st.mode = Mode::Chat;
    insta::assert_snapshot!("tiny_20x5", draw(20, 5, &st, now, full));
}

#[test]
fn line_cache_follows_replaced_conversations() {
    let now = Instant::now();
    let theme = Theme::default();
    let cache = ui::LineCache::default();
    let ctx = Ctx {
        theme: &theme,
        profiles: &[],
        now,
        cache: &cache,
    };
    let mut st = fixture(now);
    let mut t = Terminal::new(TestBackend::new(40, 10)).unwrap();
    st.chat = vec![ChatEntry {
        role: Role::User,
        text: "apples".into(),
        model: String::new(),
        footer: None,
    }];
    t.draw(|f| ui::render_chat(f, f.area(), &st, &ctx)).unwrap();
    st.chat[0].text = "pears!".into();
    t.draw(|f| ui::render_chat(f, f.area(), &st, &ctx)).unwrap();
    let screen = format!("{}", t.backend());
    assert!(
        screen.contains("pears!") && !screen.contains("apples"),
        "{screen}"
    );
}
