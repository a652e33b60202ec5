//! The engine thread: readiness handshake, cancel within a token, a Load that interrupts an
//! answer, and multi-turn chat reusing the KV cache.
mod common;

use candle_core::Device;
use std::time::Duration;
use tokentop::engine::{synth::SynthSpec, worker::EngineHandle, Engine, Flow, GenEvent};
use tokentop::protocol::*;

fn next(h: &EngineHandle) -> EngineEvent {
    h.events
        .recv_timeout(Duration::from_secs(60))
        .expect("engine event")
}

fn endless() -> GenParams {
    GenParams {
        max_tokens: 100_000,
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn load_failure_is_reported_not_a_dead_engine() {
    let h = EngineHandle::spawn();
    h.send(EngineCmd::Load {
        path: "/no/such/model.gguf".into(),
        opts: LoadOptions::default(),
    });
    assert!(matches!(next(&h), EngineEvent::Loading { .. }));
    match next(&h) {
        EngineEvent::LoadFailed { error, .. } => assert!(error.contains("cannot open"), "{error}"),
        other => panic!("{other:?}"),
    }
    h.send(EngineCmd::Generate {
        req: 1,
        messages: vec![Message::new(Role::User, "hi")],
        params: GenParams::default(),
    });
    assert!(
        matches!(next(&h), EngineEvent::Failed { req: 1, error } if error.contains("no model"))
    );
}

#[test]
fn cancel_stops_within_a_token_and_load_interrupts() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(dir.path(), &SynthSpec::new("llama"));
    let h = EngineHandle::spawn();
    h.send(EngineCmd::Load {
        path: path.clone(),
        opts: LoadOptions::default(),
    });
    assert!(matches!(next(&h), EngineEvent::Loading { .. }));
    assert!(matches!(next(&h), EngineEvent::Ready { info } if info.arch == "llama"));

    h.send(EngineCmd::Generate {
        req: 7,
        messages: vec![Message::new(Role::User, "go")],
        params: endless(),
    });
    let mut tokens_after_cancel = 0;
    let mut cancelled = false;
    loop {
        match next(&h) {
            EngineEvent::Token { req: 7, .. } => {
                if cancelled {
                    tokens_after_cancel += 1;
                } else {
                    // A cancel of another request is ignored.
                    h.send(EngineCmd::Cancel { req: 99 });
                    h.send(EngineCmd::Cancel { req: 7 });
                    cancelled = true;
                }
            }
            EngineEvent::Finished {
                req: 7,
                reason,
                stats,
            } => {
                assert_eq!(reason, FinishReason::Cancelled);
                assert!(stats.generated_tokens < 100, "{stats:?}");
                break;
            }
            EngineEvent::Prefilled { req: 7, .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(
        tokens_after_cancel <= 2,
        "{tokens_after_cancel} tokens after the cancel"
    );

    // A Load while streaming ends the answer, then loads.
    h.send(EngineCmd::Generate {
        req: 8,
        messages: vec![Message::new(Role::User, "go")],
        params: endless(),
    });
    loop {
        if let EngineEvent::Token { req: 8, .. } = next(&h) {
            break;
        }
    }
    h.send(EngineCmd::Load {
        path,
        opts: LoadOptions::default(),
    });
    loop {
        match next(&h) {
            EngineEvent::Finished { req: 8, reason, .. } => {
                assert_eq!(reason, FinishReason::Cancelled)
            }
            EngineEvent::Ready { .. } => break,
            EngineEvent::Token { req: 8, .. } | EngineEvent::Loading { .. } => {}
            other => panic!("{other:?}"),
        }
    }
}

fn answer(e: &mut Engine, msgs: &[Message], params: &GenParams) -> (String, GenStats) {
    let mut text = String::new();
    let (stats, _) = e
        .generate(msgs, params, |ev| {
            if let GenEvent::Token(t) = ev {
                text.push_str(t);
            }
            Flow::Continue
        })
        .unwrap();
    (text, stats)
}

#[test]
fn second_turn_reuses_the_cache_and_answers_as_a_fresh_engine_would() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["qwen3", "gemma3"] {
        let path = common::synth(dir.path(), &SynthSpec::new(arch));
        let params = GenParams {
            max_tokens: 6,
            temperature: 0.0,
            ..Default::default()
        };
        let mut e = Engine::load(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
        let mut msgs = vec![Message::new(Role::User, "the capital of France")];
        let (first, s1) = answer(&mut e, &msgs, &params);
        msgs.push(Message::new(Role::Assistant, first));
        msgs.push(Message::new(Role::User, "and the capital of Italy"));
        let (second, s2) = answer(&mut e, &msgs, &params);
        assert!(
            s2.cached_tokens >= s1.prompt_tokens - 1,
            "{arch}: {s1:?} then {s2:?}"
        );
        assert_eq!(s2.prompt_eval_tokens() + s2.cached_tokens, s2.prompt_tokens);

        let mut fresh = Engine::load(&path, &LoadOptions::default(), &Device::Cpu).unwrap();
        let (again, s3) = answer(&mut fresh, &msgs, &params);
        assert_eq!(s3.cached_tokens, 0);
        assert_eq!(second, again, "{arch}: cache reuse changed the answer");
    }
}
