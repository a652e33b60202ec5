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
                path: "/models/b.gguf".into(),
                keep_previous: false,
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
            path: "/store/big.gguf".into(),
            keep_previous: false,
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
            path: "/models/b.gguf".into(),
            keep_previous: true,
        }]
    );
    let fx = update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("b") }));
    let req_b = req_of(&fx);
    token(&mut st, req_b, "B says");
    let fx = finish(&mut st, req_b, 5, FinishReason::MaxTokens);
    assert_eq!(
        fx,
        vec![Effect::Load {
            path: "/models/a.gguf".into(),
            keep_previous: true,
        }]
    );
    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("a") }));
    assert!(st.ab.is_none(), "no A/B runs now");
    let ab = st.ab_last.as_ref().unwrap();
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
    // The A/B run is filed in the chat as notes the model never sees.
    assert_eq!(st.chat.len(), 5);
    assert_eq!(st.messages().len(), 2);
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

fn saved(fx: &[Effect]) -> Vec<(Role, String, Option<FinishReason>)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::SaveEntry(e) => {
                Some((e.role, e.text.clone(), e.footer.as_ref().map(|f| f.reason)))
            }
            _ => None,
        })
        .collect()
}

fn resident(st: &mut State, models: &[&str], how: LoadHow) -> Vec<Effect> {
    update(
        st,
        Msg::Engine(EngineEvent::Resident {
            models: models
                .iter()
                .map(|m| PathBuf::from(format!("/models/{m}.gguf")))
                .collect(),
            how,
        }),
    )
}

/// An A/B of "b" against the loaded "a", run to the end with the engine's residency reports
/// (`b_how` for B's load, `a_how` for A's return); returns the effects of A's return.
fn run_ab(st: &mut State, b_how: LoadHow, a_how: LoadHow) -> Vec<Effect> {
    update(st, ctrl('b'));
    update(st, key(KeyCode::Down)); // "b"
    let req_a = req_of(&update(st, key(KeyCode::Enter)));
    token(st, req_a, "A says");
    finish(st, req_a, 4, FinishReason::Eos);
    let req_b = req_of(&update(
        st,
        Msg::Engine(EngineEvent::Ready { info: info("b") }),
    ));
    resident(st, &["b", "a"], b_how);
    token(st, req_b, "B says");
    finish(st, req_b, 5, FinishReason::Eos);
    let mut info_a = info("a");
    if a_how == LoadHow::Reused {
        info_a.load_time = Duration::ZERO;
    }
    let mut fx = update(st, Msg::Engine(EngineEvent::Ready { info: info_a }));
    fx.extend(resident(st, &["a", "b"], a_how));
    fx
}

/// Issue 9 item 1: after an A/B run the next answer streams into the chat, gets its footer
/// and is saved with its prompt; the A/B run itself is filed in the chat and the session as
/// notes the model is not sent. While the run goes, its answers stream into its two sides.
#[test]
fn after_an_ab_run_answers_get_a_footer_and_are_saved() {
    let mut st = ready("a");
    typed(&mut st, "first");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    token(&mut st, req, "one");
    finish(&mut st, req, 2, FinishReason::Eos);

    update(&mut st, ctrl('b'));
    update(&mut st, key(KeyCode::Down));
    let req_a = req_of(&update(&mut st, key(KeyCode::Enter)));
    token(&mut st, req_a, "A ");
    token(&mut st, req_a, "says");
    assert_eq!(st.ab.as_ref().unwrap().a.answer, "A says", "A streams live");
    assert_eq!(st.stream.as_ref().unwrap().pieces, 2, "with its live rate");
    finish(&mut st, req_a, 4, FinishReason::Eos);
    let req_b = req_of(&update(
        &mut st,
        Msg::Engine(EngineEvent::Ready { info: info("b") }),
    ));
    token(&mut st, req_b, "B says");
    assert_eq!(st.ab.as_ref().unwrap().b.answer, "B says");
    assert_eq!(st.chat.len(), 2, "the chat is not written while A/B runs");
    finish(&mut st, req_b, 5, FinishReason::Eos);
    let fx = update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("a") }));
    assert_eq!(
        saved(&fx),
        vec![
            (Role::System, "**A/B** of: first".into(), None),
            (Role::System, "A says".into(), Some(FinishReason::Eos)),
            (Role::System, "B says".into(), Some(FinishReason::Eos)),
        ]
    );
    assert!(st.ab.is_none() && st.ab_last.is_some());
    assert_eq!(st.mode, Mode::AbResult);
    update(&mut st, key(KeyCode::Esc));

    // The next answer: streamed into the chat, footer, saved with its prompt.
    typed(&mut st, "second");
    let fx = update(&mut st, key(KeyCode::Enter));
    match &fx[..] {
        [Effect::Generate { messages, .. }] => {
            // The A/B notes are not part of the conversation the model sees.
            let texts: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            assert_eq!(texts, ["first", "one", "second"]);
        }
        fx => panic!("{fx:?}"),
    }
    let req = req_of(&fx);
    token(&mut st, req, "two");
    assert_eq!(st.chat.last().unwrap().text, "two");
    let fx = finish(&mut st, req, 2, FinishReason::Eos);
    assert!(st.chat.last().unwrap().footer.is_some());
    assert_eq!(
        saved(&fx),
        vec![
            (Role::User, "second".into(), None),
            (Role::Assistant, "two".into(), Some(FinishReason::Eos)),
        ]
    );
}

/// Issue 9 item 2: an A/B started while an answer streams ends that answer as cancelled and
/// saves it with its prompt first; the A/B runs that prompt.
#[test]
fn ab_started_while_streaming_saves_the_answer_as_cancelled() {
    let mut st = ready("a");
    typed(&mut st, "tell me");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    update(
        &mut st,
        Msg::Engine(EngineEvent::Prefilled {
            req,
            prompt_tokens: 12,
            cached_tokens: 0,
            ttft: Duration::from_millis(100),
            kv_bytes: 10,
        }),
    );
    token(&mut st, req, "Once");
    token(&mut st, req, " upon");
    update(&mut st, ctrl('b'));
    update(&mut st, key(KeyCode::Down));
    let fx = update(&mut st, key(KeyCode::Enter));
    assert_eq!(fx[0], Effect::Cancel { req });
    assert_eq!(
        saved(&fx),
        vec![
            (Role::User, "tell me".into(), None),
            (
                Role::Assistant,
                "Once upon".into(),
                Some(FinishReason::Cancelled)
            ),
        ]
    );
    let f = st.chat[1].footer.as_ref().unwrap();
    assert_eq!((f.tokens, f.ttft), (2, Duration::from_millis(100)));
    assert!((f.prefill_rate - 120.0).abs() < 1e-9, "{f:?}");
    match &fx[3..] {
        [Effect::Generate {
            req: a, messages, ..
        }] => {
            assert!(*a > req);
            assert_eq!(messages, &vec![Message::new(Role::User, "tell me")]);
        }
        fx => panic!("{fx:?}"),
    }
    // The cancelled answer's late events change nothing.
    token(&mut st, req, " a time");
    assert!(finish(&mut st, req, 3, FinishReason::Cancelled).is_empty());
    assert_eq!(st.chat[1].text, "Once upon");
    assert_eq!(st.ab.as_ref().unwrap().a.answer, "");
}

/// Issue 9 item 3: reopening a session while an answer streams saves that answer (cancelled)
/// into the current session before the reopened one is read; the stream's late tokens and end
/// reach neither the reopened chat nor its file.
#[test]
fn reopening_a_session_while_streaming_saves_the_answer_to_its_own_session() {
    let mut st = ready("a");
    typed(&mut st, "long story");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    token(&mut st, req, "Once");
    assert_eq!(
        update(&mut st, key(KeyCode::F(4))),
        vec![Effect::ListSessions]
    );
    let old = PathBuf::from("/sessions/old.jsonl");
    update(
        &mut st,
        Msg::SessionList(vec![tokentop::state::SessionSummary {
            path: old.clone(),
            title: "old".into(),
            date: String::new(),
            models: vec!["a".into()],
            turns: 1,
        }]),
    );
    token(&mut st, req, " upon");
    let fx = update(&mut st, key(KeyCode::Enter));
    assert_eq!(fx[0], Effect::Cancel { req });
    assert_eq!(
        saved(&fx),
        vec![
            (Role::User, "long story".into(), None),
            (
                Role::Assistant,
                "Once upon".into(),
                Some(FinishReason::Cancelled)
            ),
        ]
    );
    // Saved before the other session is opened (app.rs runs effects in order).
    assert_eq!(fx.last(), Some(&Effect::OpenSession(old.clone())));
    assert!(st.stream.is_none());
    let entries = vec![common::entry(Role::User, "earlier")];
    update(
        &mut st,
        Msg::SessionLoaded {
            path: old,
            entries: entries.clone(),
        },
    );
    token(&mut st, req, " a time");
    assert!(finish(&mut st, req, 3, FinishReason::Cancelled).is_empty());
    assert_eq!(st.chat, entries, "the reopened chat is untouched");
}

/// Issue 9 item 4: a download that lands after the user picked another model is not loaded
/// (nothing in progress is cancelled); one still wanted is. A failed download that is no
/// longer the choice does not end another model's load.
#[test]
fn a_download_is_loaded_only_while_it_is_the_choice() {
    let mut st = ready("a");
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Up)); // "big", not on disk
    assert_eq!(
        update(&mut st, key(KeyCode::Enter)),
        vec![Effect::Fetch { id: "big".into() }]
    );
    // Picking it again does not start a second download.
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Up));
    assert!(update(&mut st, key(KeyCode::Enter)).is_empty());
    // The user moves on to "b" and chats with it.
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Down));
    update(&mut st, key(KeyCode::Enter));
    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("b") }));
    typed(&mut st, "go");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    token(&mut st, req, "ok");
    let fx = update(
        &mut st,
        Msg::Fetched {
            id: "big".into(),
            result: Ok("/store/big.gguf".into()),
        },
    );
    assert!(fx.is_empty(), "{fx:?}");
    assert!(st.stream.is_some() && st.loading.is_none());
    assert!(st.switcher[2].is_local(), "it waits in the switcher");
    assert!(st.status.contains("big downloaded"), "{}", st.status);
    finish(&mut st, req, 2, FinishReason::Eos);

    // Still the choice: loaded when it lands. Not the choice any more and failed: the load
    // in progress goes on.
    let mut st = ready("a");
    st.switcher[2].path = None;
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Up));
    update(&mut st, key(KeyCode::Enter));
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
            path: "/store/big.gguf".into(),
            keep_previous: false
        }]
    );
    let mut st = ready("a");
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Up));
    update(&mut st, key(KeyCode::Enter));
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Down));
    update(&mut st, key(KeyCode::Enter));
    update(
        &mut st,
        Msg::Fetched {
            id: "big".into(),
            result: Err("no route to host".into()),
        },
    );
    assert_eq!(st.loading.as_ref().unwrap().0, "b", "b's load goes on");
    assert!(st.status.contains("no route to host"));
}

/// Issue 9 item 5: a switch to a file that fails to load keeps the old model (the engine
/// loads the new one beside it), so the title stays true and the next prompt is answered;
/// when the two did not fit together the old one is read back, and the title says so.
#[test]
fn a_failed_switch_keeps_the_old_model_or_reads_it_back() {
    let mut st = ready("a");
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Down));
    update(&mut st, key(KeyCode::Enter));
    update(
        &mut st,
        Msg::Engine(EngineEvent::LoadFailed {
            path: "/models/b.gguf".into(),
            error: "not a GGUF file".into(),
        }),
    );
    resident(&mut st, &["a"], LoadHow::FailedKeptOld);
    assert_eq!(st.model_label(), "a");
    assert!(st.loading.is_none());
    assert!(
        st.status.contains("not a GGUF file") && st.status.contains("still on a"),
        "{}",
        st.status
    );
    typed(&mut st, "hi");
    assert!(matches!(
        &update(&mut st, key(KeyCode::Enter))[..],
        [Effect::Generate { .. }]
    ));

    // The two did not fit: A was freed for B, B failed, A is read back.
    let mut st = ready("a");
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Down));
    update(&mut st, key(KeyCode::Enter));
    update(
        &mut st,
        Msg::Engine(EngineEvent::LoadFailed {
            path: "/models/b.gguf".into(),
            error: "unsupported architecture \"mamba\"".into(),
        }),
    );
    resident(&mut st, &[], LoadHow::FailedReloadingOld);
    assert!(
        st.model.is_none(),
        "the title never names a model not loaded"
    );
    update(
        &mut st,
        Msg::Engine(EngineEvent::Loading {
            path: "/models/a.gguf".into(),
        }),
    );
    assert_eq!(st.loading.as_ref().unwrap().0, "a.gguf");
    typed(&mut st, "hi");
    assert!(update(&mut st, key(KeyCode::Enter)).is_empty(), "wait");
    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("a") }));
    resident(&mut st, &["a"], LoadHow::Fresh);
    assert_eq!(st.model_label(), "a");
    assert!(
        st.status.contains("mamba") && st.status.contains("a is loaded again"),
        "{}",
        st.status
    );
    assert!(matches!(
        &update(&mut st, key(KeyCode::Enter))[..],
        [Effect::Generate { .. }]
    ));

    // Nothing could be loaded: no model, and the title says so.
    resident(&mut st, &[], LoadHow::FailedNone);
    assert!(st.model.is_none());
}

/// Issue 9 item 9 (rest): on a context overflow Ctrl-D drops the oldest turns: they stay on
/// screen above a note saying what went, leave the messages sent and the context count, and
/// the note is saved; the refused prompt is sent again with Enter.
#[test]
fn ctrl_d_drops_the_oldest_turns_when_the_context_is_full() {
    let mut st = ready("a");
    // Not full: nothing happens.
    assert!(update(&mut st, ctrl('d')).is_empty());
    assert!(st.status.contains("not full"), "{}", st.status);
    for (q, a) in [
        ("alpha", "x".repeat(400)),
        ("beta", "y".repeat(400)),
        ("gamma", "z".repeat(400)),
    ] {
        typed(&mut st, q);
        let req = req_of(&update(&mut st, key(KeyCode::Enter)));
        token(&mut st, req, &a);
        finish(&mut st, req, 100, FinishReason::Eos);
    }
    let before = st.context_used();
    typed(&mut st, "delta");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    update(
        &mut st,
        Msg::Engine(EngineEvent::Failed {
            req,
            error: "the prompt is 4500 tokens but the context holds 4096 (the model was trained \
                    for 8192; --ctx raises it)"
                .into(),
        }),
    );
    assert!(
        st.status.contains("Ctrl-D drops the oldest turns"),
        "{}",
        st.status
    );
    assert_eq!(st.input.text, "delta");
    let fx = update(&mut st, ctrl('d'));
    // 4096 / 4500 of the tokens fit, less a margin for the answer: the oldest turn of three
    // goes.
    match &saved(&fx)[..] {
        [(Role::System, note, None)] => {
            assert!(
                note.contains("the oldest turn (\"alpha\"), about 405 characters"),
                "{note}"
            )
        }
        fx => panic!("{fx:?}"),
    }
    assert_eq!(
        st.chat.len(),
        7,
        "dropped turns stay on screen, with the note"
    );
    assert!(st.context_used() < before);
    assert!(st.status.contains("Enter sends the prompt again"));
    let fx = update(&mut st, key(KeyCode::Enter));
    match &fx[..] {
        [Effect::Generate { messages, .. }] => {
            let texts: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            assert_eq!(texts[0], "beta");
            assert_eq!(texts.len(), 5);
        }
        fx => panic!("{fx:?}"),
    }
    // A second refusal asking for much less: more turns go at once.
    let req = req_of(&fx);
    update(
        &mut st,
        Msg::Engine(EngineEvent::Failed {
            req,
            error: "the prompt is 9000 tokens but the context holds 1000".into(),
        }),
    );
    let fx = update(&mut st, ctrl('d'));
    assert!(
        saved(&fx)[0]
            .1
            .contains("the 2 oldest turns, from \"beta\""),
        "{fx:?}"
    );
    let fx = update(&mut st, key(KeyCode::Enter));
    match &fx[..] {
        [Effect::Generate { messages, .. }] => assert_eq!(messages.len(), 1),
        fx => panic!("{fx:?}"),
    }
    // An answer that filled the context offers the same.
    let req = req_of(&fx);
    finish(&mut st, req, 10, FinishReason::ContextFull);
    assert!(st.status.contains("Ctrl-D"), "{}", st.status);
}

/// Issue 9 item 18: an A/B whose two models fit keeps both resident (the engine says how each
/// load went) and says so; a repeated A/B reloads nothing; models that do not fit together
/// are swapped, and that is said too.
#[test]
fn ab_says_whether_both_models_stayed_resident() {
    let mut st = ready("a");
    typed(&mut st, "compare");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
    finish(&mut st, req, 2, FinishReason::Eos);
    // The A/B loads keep the other model.
    update(&mut st, ctrl('b'));
    update(&mut st, key(KeyCode::Down));
    let req_a = req_of(&update(&mut st, key(KeyCode::Enter)));
    assert_eq!(
        finish(&mut st, req_a, 2, FinishReason::Eos),
        vec![Effect::Load {
            path: "/models/b.gguf".into(),
            keep_previous: true
        }]
    );
    let req_b = req_of(&update(
        &mut st,
        Msg::Engine(EngineEvent::Ready { info: info("b") }),
    ));
    resident(&mut st, &["b", "a"], LoadHow::BesideOld);
    finish(&mut st, req_b, 2, FinishReason::Eos);
    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("a") }));
    resident(&mut st, &["a", "b"], LoadHow::Reused);
    let r = st.ab_last.as_ref().unwrap().residency.clone().unwrap();
    assert_eq!(
        r,
        "B loaded beside A: both stay in memory; A was still in memory: no reload"
    );
    assert!(st.status.contains(&r), "{}", st.status);
    assert_eq!(st.resident.len(), 2);
    update(&mut st, key(KeyCode::Esc));

    run_ab(&mut st, LoadHow::Reused, LoadHow::Reused);
    assert_eq!(
        st.ab_last.as_ref().unwrap().residency.as_deref(),
        Some("B was still in memory: no reload; A was still in memory: no reload")
    );
    update(&mut st, key(KeyCode::Esc));
    run_ab(&mut st, LoadHow::Swapped, LoadHow::Swapped);
    assert_eq!(
        st.ab_last.as_ref().unwrap().residency.as_deref(),
        Some("A and B do not fit in memory together: A was freed for B; A was read back from disk")
    );
    // A plain switch to a resident model says it was not read again.
    update(&mut st, key(KeyCode::Esc));
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Down));
    update(&mut st, key(KeyCode::Enter));
    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("b") }));
    resident(&mut st, &["b"], LoadHow::Reused);
    assert_eq!(st.status, "switched to b (already in memory)");
}

/// A model picked while an A/B runs ends the run: its answer is stopped, nothing of it is
/// filed or saved, its late events are dropped, and the picked model is the one loaded.
#[test]
fn switching_models_during_an_ab_run_ends_it() {
    let mut st = ready("a");
    typed(&mut st, "compare");
    update(&mut st, ctrl('b'));
    update(&mut st, key(KeyCode::Down));
    let req_a = req_of(&update(&mut st, key(KeyCode::Enter)));
    token(&mut st, req_a, "A");
    update(&mut st, ctrl('o'));
    update(&mut st, key(KeyCode::Down));
    let fx = update(&mut st, key(KeyCode::Enter));
    assert_eq!(
        fx,
        vec![
            Effect::Cancel { req: req_a },
            Effect::Load {
                path: "/models/b.gguf".into(),
                keep_previous: false
            }
        ]
    );
    assert!(st.ab.is_none() && st.ab_last.is_none());
    assert!(finish(&mut st, req_a, 2, FinishReason::Cancelled).is_empty());
    assert!(update(&mut st, Msg::Engine(EngineEvent::Ready { info: info("b") })).is_empty());
    assert_eq!(st.mode, Mode::Chat);
    assert!(st.chat.is_empty());
}

/// A reasoning model's answer: its `<think>` block is counted and timed apart, the footer
/// says when the first answer token came, the next turn sends the answer without the block,
/// and Ctrl-T toggles how the chat shows it.
#[test]
fn thinking_block_is_measured_and_not_sent_back() {
    let mut st = ready("a");
    typed(&mut st, "2+2?");
    let req = req_of(&update(&mut st, key(KeyCode::Enter)));
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
    for t in ["<think>", "\nTwo", " plus two", ".\n", "</think>"] {
        token(&mut st, req, t);
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = st.stream.as_ref().unwrap();
    assert_eq!(s.think.pieces, 5);
    assert!(s.think.answered.is_none(), "no answer text yet");
    assert_eq!(s.thought(Instant::now()).unwrap().first_answer, None);
    for t in ["\n\n", "It is", " 4."] {
        token(&mut st, req, t);
    }
    finish(&mut st, req, 8, FinishReason::Eos);
    let th = st.chat.last().unwrap().footer.as_ref().unwrap().thinking;
    let th = th.expect("the footer has the thinking block");
    assert_eq!(th.tokens, 5);
    assert!(th.time >= Duration::from_millis(15), "{th:?}");
    let first = th.first_answer.expect("an answer came");
    assert!(first >= th.time, "{th:?}");
    let line = tokentop::ui::footer_text(st.chat.last().unwrap().footer.as_ref().unwrap());
    assert!(
        line.contains("first answer") && line.contains("thought 5 tokens"),
        "{line}"
    );

    typed(&mut st, "and 3+3?");
    let fx = update(&mut st, key(KeyCode::Enter));
    match fx.iter().find(|e| matches!(e, Effect::Generate { .. })) {
        Some(Effect::Generate { messages, .. }) => assert_eq!(
            messages[1],
            Message::new(Role::Assistant, "It is 4."),
            "the thinking block stays out of the next prompt"
        ),
        other => panic!("{other:?}"),
    }
    assert!(!st.show_thinking);
    update(&mut st, ctrl('t'));
    assert!(st.show_thinking && st.status.contains("shown"));
}
