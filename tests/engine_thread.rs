//! The engine thread: readiness handshake, cancel within a token, a Load that interrupts an
//! answer, and multi-turn chat reusing the KV cache.
mod common;

use candle_core::Device;
use std::time::Duration;
use tokentop::engine::{synth::SynthSpec, worker::EngineHandle, Engine, Flow, GenEvent};
use tokentop::protocol::*;

/// The next event, past the `Resident` report that follows each load (checked on its own in
/// `two_models_stay_resident_and_a_failed_switch_keeps_the_old_one`).
fn next(h: &EngineHandle) -> EngineEvent {
    loop {
        match next_any(h) {
            EngineEvent::Resident { .. } => {}
            ev => return ev,
        }
    }
}

fn next_any(h: &EngineHandle) -> EngineEvent {
    h.events
        .recv_timeout(Duration::from_secs(60))
        .expect("engine event")
}

fn load(h: &EngineHandle, path: &std::path::Path, keep_previous: bool) {
    h.send(EngineCmd::Load {
        path: path.to_path_buf(),
        opts: LoadOptions {
            keep_previous,
            ..Default::default()
        },
    });
}

/// The events of one load, up to and with its `Resident` report (a reload of the old model
/// after a failed swap adds its own).
fn load_events(h: &EngineHandle) -> Vec<EngineEvent> {
    let mut out = vec![];
    loop {
        let ev = next_any(h);
        let end = matches!(ev, EngineEvent::Resident { .. });
        out.push(ev);
        if end {
            return out;
        }
    }
}

fn resident(ev: &EngineEvent) -> (Vec<std::path::PathBuf>, LoadHow) {
    match ev {
        EngineEvent::Resident { models, how } => (models.clone(), *how),
        other => panic!("{other:?}"),
    }
}

/// Item 18 and 5 of issue 9 on the real engine thread with two tiny models: an A/B-style load
/// keeps the first resident beside the second, and going back reads nothing; a plain switch
/// frees the one before; a file that fails to load leaves the model in use loaded and
/// answering.
#[test]
fn two_models_stay_resident_and_a_failed_switch_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::synth(dir.path(), &SynthSpec::new("llama"));
    let b = common::synth(dir.path(), &SynthSpec::new("qwen3"));
    let h = EngineHandle::spawn();
    load(&h, &a, false);
    let evs = load_events(&h);
    assert!(matches!(&evs[1], EngineEvent::Ready { info } if info.path == a));
    assert_eq!(resident(&evs[2]), (vec![a.clone()], LoadHow::Fresh));

    // B beside A (both fit: they are tiny), then back to A without reading it.
    load(&h, &b, true);
    let evs = load_events(&h);
    assert!(matches!(&evs[1], EngineEvent::Ready { info } if info.path == b));
    assert_eq!(
        resident(&evs[2]),
        (vec![b.clone(), a.clone()], LoadHow::BesideOld)
    );
    load(&h, &a, true);
    let evs = load_events(&h);
    match &evs[1] {
        EngineEvent::Ready { info } => {
            assert_eq!((&info.path, info.load_time), (&a, Duration::ZERO))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        resident(&evs[2]),
        (vec![a.clone(), b.clone()], LoadHow::Reused)
    );
    // A repeated A/B: B is still resident.
    load(&h, &b, true);
    assert_eq!(
        resident(&load_events(&h)[2]),
        (vec![b.clone(), a.clone()], LoadHow::Reused)
    );
    // A plain switch back to A keeps only A.
    load(&h, &a, false);
    assert_eq!(
        resident(&load_events(&h)[2]),
        (vec![a.clone()], LoadHow::Reused)
    );

    // A corrupt file: the load fails, A is still loaded and answers.
    let bad = dir.path().join("corrupt.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00 not a model").unwrap();
    load(&h, &bad, false);
    let evs = load_events(&h);
    assert!(
        matches!(&evs[1], EngineEvent::LoadFailed { path, .. } if *path == bad),
        "{evs:?}"
    );
    assert_eq!(resident(&evs[2]), (vec![a.clone()], LoadHow::FailedKeptOld));
    h.send(EngineCmd::Generate {
        req: 1,
        messages: vec![Message::new(Role::User, "hi")],
        params: GenParams {
            max_tokens: 3,
            ..Default::default()
        },
    });
    loop {
        match next(&h) {
            EngineEvent::Finished { req: 1, stats, .. } => {
                assert!(stats.generated_tokens > 0);
                break;
            }
            EngineEvent::Prefilled { req: 1, .. } | EngineEvent::Token { req: 1, .. } => {}
            other => panic!("the old model no longer answers: {other:?}"),
        }
    }
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
    // Counted here are the tokens already queued when this thread got to send the cancel
    // (the tiny model writes one in well under a millisecond; on a loaded 2-core CI machine
    // this thread can lag tens of them); the engine itself checks for a cancel every token.
    assert!(
        tokens_after_cancel <= 40,
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
