//! The TUI's state machine, driven by messages alone: no terminal, no engine, no files.

mod common;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseEventKind};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokentop::protocol::*;
use tokentop::state::{update, AbPhase, Effect, Mode, Msg, State, SwitchItem};
use tokentop::telemetry::{Memory, PoolKind, Power, Snapshot};

fn key(code: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn ctrl(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

fn typed(st: &mut State, s: &str) {
    for c in s.chars() {
        assert!(update(st, key(KeyCode::Char(c))).is_empty());
    }
}

use common::model_info as info;

fn item(label: &str, local: bool) -> SwitchItem {
    SwitchItem {
        label: label.into(),
        id: Some(label.into()),
        path: local.then(|| PathBuf::from(format!("/models/{label}.gguf"))),
        size: 100_000_000,
        params_b: 0.1,
        active_params_b: 0.1,
        moe: false,
        tags: vec!["dense".into()],
    }
}

fn ready(name: &str) -> State {
    let mut st = State::new(
        GenParams::default(),
        vec![item("a", true), item("b", true), item("big", false)],
    );
    update(
        &mut st,
        Msg::Engine(EngineEvent::Ready { info: info(name) }),
    );
    st
}

fn stats(n: usize) -> GenStats {
    GenStats {
        prompt_tokens: 20,
        cached_tokens: 0,
        prompt_eval: Duration::from_millis(100),
        ttft: Duration::from_millis(120),
        generated_tokens: n,
        decode: Duration::from_millis(100 * (n as u64 - 1)),
        total: Duration::from_secs(1),
        kv_bytes: 1000,
        server: None,
    }
}

fn token(st: &mut State, req: RequestId, text: &str) {
    update(
        st,
        Msg::Engine(EngineEvent::Token {
            req,
            text: text.into(),
        }),
    );
}

fn finish(st: &mut State, req: RequestId, n: usize, reason: FinishReason) -> Vec<Effect> {
    update(
        st,
        Msg::Engine(EngineEvent::Finished {
            req,
            stats: stats(n),
            reason,
        }),
    )
}

fn req_of(fx: &[Effect]) -> RequestId {
    fx.iter()
        .find_map(|e| match e {
            Effect::Generate { req, .. } => Some(*req),
            _ => None,
        })
        .expect("a Generate effect")
}

#[test]
fn send_stream_and_finish() {
    let mut st = ready("a");
    typed(&mut st, "hi there");
    let fx = update(&mut st, key(KeyCode::Enter));
    // The prompt is saved with its answer, not before.
    assert_eq!(fx.len(), 1, "{fx:?}");
    let req = req_of(&fx);
    match &fx[0] {
        Effect::Generate { messages, .. } => {
            assert_eq!(messages, &vec![Message::new(Role::User, "hi there")])
        }
        e => panic!("{e:?}"),
    }
    assert!(st.input.text.is_empty());
    // Sending again while streaming does nothing but say so.
    typed(&mut st, "x");
    assert!(update(&mut st, key(KeyCode::Enter)).is_empty());
    assert!(st.status.contains("wait"));

    update(
        &mut st,
        Msg::Engine(EngineEvent::Prefilled {
            req,
            prompt_tokens: 20,
            cached_tokens: 0,
            ttft: Duration::from_millis(120),
            kv_bytes: 10,
        }),
    );
    for t in ["Hel", "lo", "!"] {
        token(&mut st, req, t);
    }
    // A late token of an older request is dropped.
    token(&mut st, req + 100, "zzz");
    assert_eq!(st.chat.last().unwrap().text, "Hello!");
    assert!(
        st.stream
            .as_ref()
            .unwrap()
            .live_rate(Instant::now() + Duration::from_secs(1))
            .unwrap()
            > 0.0
    );

    let fx = finish(&mut st, req, 3, FinishReason::Eos);
    let footer = st.chat.last().unwrap().footer.clone().unwrap();
    assert_eq!(footer.tokens, 3);
    assert!((footer.decode_rate - 10.0).abs() < 1e-9);
    match &fx[..] {
        [Effect::SaveEntry(q), Effect::SaveEntry(a)] => {
            assert_eq!((q.role, q.text.as_str()), (Role::User, "hi there"));
            assert_eq!((a.role, a.text.as_str()), (Role::Assistant, "Hello!"));
            assert!(a.footer.is_some());
        }
        fx => panic!("{fx:?}"),
    }
    assert_eq!(st.decode_history.len(), 1);
    assert_eq!(st.context_used(), 23);
    assert!(st.stream.is_none());

    // The second turn carries the whole conversation.
    st.input.clear();
    typed(&mut st, "more");
    let fx = update(&mut st, key(KeyCode::Enter));
    match &fx[0] {
        Effect::Generate { messages, .. } => assert_eq!(messages.len(), 3),
        e => panic!("{e:?}"),
    }
}

#[test]
fn cancel_and_quit_keys() {
    let mut st = ready("a");
    // Ctrl-C twice quits when idle; anything between disarms it.
    assert!(update(&mut st, ctrl('c')).is_empty());
    assert_eq!(update(&mut st, ctrl('c')), vec![Effect::Quit]);
    let mut st = ready("a");
    update(&mut st, ctrl('c'));
    update(&mut st, key(KeyCode::Char('x')));
    assert!(update(&mut st, ctrl('c')).is_empty());

    typed(&mut st, "go");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    assert_eq!(
        update(&mut st, key(KeyCode::Esc)),
        vec![Effect::Cancel { req }]
    );
    assert_eq!(update(&mut st, ctrl('c')), vec![Effect::Cancel { req }]);
    finish(&mut st, req, 2, FinishReason::Cancelled);
    assert_eq!(
        st.chat.last().unwrap().footer.as_ref().unwrap().reason,
        FinishReason::Cancelled
    );
}

#[test]
fn editor_keys_paste_and_scroll() {
    let mut st = ready("a");
    typed(&mut st, "ab");
    update(
        &mut st,
        Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT)),
    );
    update(&mut st, Msg::Paste("line\r\ntwo".into()));
    assert_eq!(st.input.text, "ab\nline\ntwo");
    // '?' is text once something is typed; on an empty prompt it opens the help.
    typed(&mut st, "?");
    assert_eq!(st.mode, Mode::Chat);
    update(&mut st, ctrl('u'));
    update(&mut st, key(KeyCode::Char('?')));
    assert_eq!(st.mode, Mode::Help);
    update(&mut st, key(KeyCode::Esc));
    assert_eq!(st.mode, Mode::Chat);
    update(&mut st, Msg::Mouse(MouseEventKind::ScrollUp));
    update(&mut st, key(KeyCode::PageUp));
    assert_eq!(st.scroll, 13);
    update(&mut st, Msg::Mouse(MouseEventKind::ScrollDown));
    assert_eq!(st.scroll, 10);
}

#[test]
fn failed_answer_returns_the_prompt_to_the_editor() {
    let mut st = ready("a");
    typed(&mut st, "a very long prompt");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    update(
        &mut st,
        Msg::Engine(EngineEvent::Failed {
            req,
            error: "the prompt is 9000 tokens".into(),
        }),
    );
    assert!(st.chat.is_empty());
    assert_eq!(st.input.text, "a very long prompt");
    assert!(st.status.contains("9000 tokens"));
}

#[test]
fn a_prompt_refused_for_context_length_is_never_saved() {
    let mut st = ready("a");
    typed(&mut st, "a very long prompt");
    // The user retries three times; each is refused and nothing reaches the session file.
    for _ in 0..3 {
        let fx = update(&mut st, key(KeyCode::Enter));
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::SaveEntry(_))),
            "{fx:?}"
        );
        let fx = update(
            &mut st,
            Msg::Engine(EngineEvent::Failed {
                req: req_of(&fx),
                error: "the prompt is 9000 tokens but the context holds 4096 (the model was \
                        trained for 8192; --ctx raises it)"
                    .into(),
            }),
        );
        assert!(fx.is_empty(), "{fx:?}");
        assert!(st.chat.is_empty());
        assert_eq!(st.input.text, "a very long prompt");
        // The way out is named.
        assert!(
            st.status.contains("Ctrl-N starts a new conversation"),
            "{}",
            st.status
        );
    }
    // A prompt that is answered is saved, once, with its answer.
    st.input.clear();
    typed(&mut st, "short");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    token(&mut st, req, "ok");
    let fx = finish(&mut st, req, 2, FinishReason::Eos);
    let saved: Vec<_> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::SaveEntry(e) => Some(e.text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(saved, ["short", "ok"]);
}

#[test]
fn a_cancelled_answer_is_saved_with_its_prompt() {
    let mut st = ready("a");
    typed(&mut st, "tell me");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    token(&mut st, req, "Once");
    assert_eq!(
        update(&mut st, key(KeyCode::Esc)),
        vec![Effect::Cancel { req }]
    );
    let fx = finish(&mut st, req, 2, FinishReason::Cancelled);
    match &fx[..] {
        [Effect::SaveEntry(q), Effect::SaveEntry(a)] => {
            assert_eq!(q.text, "tell me");
            assert_eq!(a.text, "Once");
            assert_eq!(a.footer.as_ref().unwrap().reason, FinishReason::Cancelled);
        }
        fx => panic!("{fx:?}"),
    }
}

#[test]
fn context_count_is_clamped_and_reset_by_a_new_chat() {
    let mut st = ready("a");
    let n_ctx = st.model.as_ref().unwrap().n_ctx;
    typed(&mut st, "fill it");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    // Stopped by a full context: prompt + generated counts the last sampled token, which
    // never enters the cache, so it is one over what the context holds.
    let mut s = stats(n_ctx - 20 + 1);
    s.prompt_tokens = 20;
    update(
        &mut st,
        Msg::Engine(EngineEvent::Finished {
            req,
            stats: s,
            reason: FinishReason::ContextFull,
        }),
    );
    assert_eq!(st.context_used(), n_ctx, "never N > max");
    // Ctrl-N: a new conversation holds nothing.
    let fx = update(&mut st, ctrl('n'));
    assert_eq!(fx, vec![Effect::NewSession]);
    assert!(st.chat.is_empty());
    assert_eq!(st.context_used(), 0);
    // Ctrl-N while an answer streams saves that answer as far as it got, then clears.
    typed(&mut st, "again");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    token(&mut st, req, "par");
    let fx = update(&mut st, ctrl('n'));
    assert!(
        matches!(&fx[0], Effect::Cancel { req: r } if *r == req),
        "{fx:?}"
    );
    assert!(
        matches!(&fx[1..], [Effect::SaveEntry(q), Effect::SaveEntry(a), Effect::NewSession]
            if q.text == "again" && a.text == "par"),
        "{fx:?}"
    );
    // The late end of the cut answer saves nothing into the new session.
    assert!(finish(&mut st, req, 2, FinishReason::Cancelled).is_empty());
    assert_eq!(st.context_used(), 0);
}

#[test]
fn loaded_in_is_not_shown_beside_loading() {
    let mut st = ready("a");
    assert!(st.status.starts_with("loaded in"), "{}", st.status);
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Down));
    update(&mut st, key(KeyCode::Enter));
    assert!(st.loading.is_some());
    assert!(!st.status.contains("loaded in"), "{}", st.status);
    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("b") }));
    assert!(st.loading.is_none() && st.status.starts_with("loaded in"));
}

#[test]
fn switching_models_cancels_loads_and_downloads() {
    let mut st = ready("a");
    typed(&mut st, "go");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    update(&mut st, ctrl('o'));
    assert!(matches!(
        st.mode,
        Mode::Switcher {
            selected: 0,
            for_ab: false
        }
    ));
    update(&mut st, key(KeyCode::Down));
    let fx = update(&mut st, key(KeyCode::Enter));
    assert_eq!(
        fx,
        vec![
            Effect::Cancel { req },
            Effect::Load {
                path: "/models/b.gguf".into()
            }
        ]
    );
    assert!(st.loading.is_some());
    // The engine ends the interrupted answer before it loads.
    finish(&mut st, req, 2, FinishReason::Cancelled);
    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("b") }));
    assert_eq!(st.model.as_ref().unwrap().name, "b");
    assert_eq!(st.chat.len(), 2, "the conversation stays");

    // A catalog model not on disk is downloaded first, then loaded.
    update(&mut st, key(KeyCode::F(2)));
    update(&mut st, key(KeyCode::Up));
    let fx = update(&mut st, key(KeyCode::Enter));
    assert_eq!(fx, vec![Effect::Fetch { id: "big".into() }]);
    let fx = update(
        &mut st,
        Msg::Fetched {
            id: "big".into(),
            result: Ok("/store/big.gguf".into()),
        },
    );
    assert_eq!(
        fx,
        vec![Effect::Load {
            path: "/store/big.gguf".into()
        }]
    );
    assert!(st.switcher[2].is_local());
    update(
        &mut st,
        Msg::Engine(EngineEvent::LoadFailed {
            path: "/store/big.gguf".into(),
            error: "unsupported architecture \"mamba\"".into(),
        }),
    );
    assert!(st.loading.is_none() && st.status.contains("mamba"));
}

#[test]
fn ab_runs_both_models_then_returns_to_the_first() {
    let mut st = ready("a");
    typed(&mut st, "compare me");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    finish(&mut st, req, 2, FinishReason::Eos);

    update(&mut st, ctrl('b'));
    update(&mut st, key(KeyCode::Down)); // "b"
    let fx = update(&mut st, key(KeyCode::Enter));
    let req_a = req_of(&fx);
    match &fx[0] {
        Effect::Generate { messages, .. } => {
            assert_eq!(messages, &vec![Message::new(Role::User, "compare me")])
        }
        e => panic!("{e:?}"),
    }
    token(&mut st, req_a, "A says");
    let fx = finish(&mut st, req_a, 4, FinishReason::Eos);
    assert_eq!(
        fx,
        vec![Effect::Load {
            path: "/models/b.gguf".into()
        }]
    );
    let fx = update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("b") }));
    let req_b = req_of(&fx);
    token(&mut st, req_b, "B says");
    let fx = finish(&mut st, req_b, 5, FinishReason::MaxTokens);
    assert_eq!(
        fx,
        vec![Effect::Load {
            path: "/models/a.gguf".into()
        }]
    );
    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("a") }));
    let ab = st.ab.as_ref().unwrap();
    assert_eq!(ab.phase, AbPhase::Done);
    assert_eq!(st.mode, Mode::AbResult);
    assert_eq!(
        (ab.a.answer.as_str(), ab.b.answer.as_str()),
        ("A says", "B says")
    );
    assert_eq!(ab.a.footer.as_ref().unwrap().tokens, 4);
    assert_eq!(
        ab.b.footer.as_ref().unwrap().reason,
        FinishReason::MaxTokens
    );
    // The chat itself is untouched by the A/B run.
    assert_eq!(st.chat.len(), 2);
}

#[test]
fn energy_is_integrated_over_the_answer_or_unknown() {
    let snap = |at: Instant, watts: Option<f64>, rss: u64| {
        Msg::Telemetry(Snapshot {
            at,
            memory: Memory {
                kind: PoolKind::System,
                total: 8 << 30,
                used: 4 << 30,
                process_rss: rss,
            },
            power: watts.map_or(Power::Unavailable("none".into()), |w| Power::Watts {
                watts: w,
                source: "test".into(),
            }),
            details: Default::default(),
        })
    };
    let t0 = Instant::now();
    let mut st = ready("a");
    update(&mut st, snap(t0, Some(10.0), 100));
    typed(&mut st, "go");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    update(
        &mut st,
        snap(t0 + Duration::from_millis(500), Some(20.0), 300),
    );
    update(
        &mut st,
        snap(t0 + Duration::from_millis(1000), Some(30.0), 200),
    );
    finish(&mut st, req, 5, FinishReason::Eos);
    let f = st.chat.last().unwrap().footer.clone().unwrap();
    assert!((f.joules.unwrap() - 25.0).abs() < 1e-9, "{f:?}");
    assert_eq!(f.peak_rss, 300);
    assert_eq!(st.watts_history.len(), 3);

    // With no power sensor there is no energy figure, not a zero.
    let mut st = ready("a");
    update(&mut st, snap(t0, None, 100));
    typed(&mut st, "go");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    update(&mut st, snap(t0 + Duration::from_millis(250), None, 100));
    finish(&mut st, req, 5, FinishReason::Eos);
    assert_eq!(
        st.chat.last().unwrap().footer.as_ref().unwrap().joules,
        None
    );
}
