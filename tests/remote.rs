//! Remote backends: parsers on recorded real server outputs (tests/data/remote/README.md says
//! where each comes from), and the worker, `run --endpoint` and the TUI's state machine
//! against a real llama-server.

mod common;
mod llama_server;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokentop::engine::worker::EngineHandle;
use tokentop::protocol::*;
use tokentop::remote::stream::{parse_ollama_line, parse_sse_data};
use tokentop::remote::{self, Endpoint};
use tokentop::state::{update, Effect, Msg, State};

fn data(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/remote")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn endpoint(url: &str) -> Endpoint {
    Endpoint {
        name: url.into(),
        url: url.into(),
        model: None,
        api_key: None,
        timeout: Duration::from_secs(30),
    }
}

// ---- parsers on recorded outputs ----

#[test]
fn llama_server_sse_with_timings() {
    // Recorded from llama-server: 12 content chunks, then usage + timings, then [DONE].
    let text = data("llama_server_chat_sse.txt");
    let mut answer = String::new();
    let mut server = None;
    let mut finish = None;
    let mut done = false;
    for line in text.lines() {
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        let p = parse_sse_data(d).unwrap();
        answer.push_str(&p.text);
        if p.server.is_some() {
            server = p.server;
        }
        if p.finish.is_some() {
            finish = p.finish;
        }
        done |= p.done;
    }
    assert!(done);
    assert_eq!(finish.as_deref(), Some("stop"));
    assert!(answer.starts_with("Hello,"), "{answer:?}");
    let s = server.expect("timings");
    assert_eq!(s.source, "llama-server timings");
    assert_eq!(s.prompt_tokens, Some(36));
    assert_eq!(s.cached_tokens, Some(0));
    assert_eq!(s.generated_tokens, Some(12));
    // predicted_per_second 56.06 and prompt_per_second 192.85 in the recording.
    assert!((s.decode_rate().unwrap() - 56.06).abs() < 0.01, "{s:?}");
    assert!((s.prompt_rate().unwrap() - 192.85).abs() < 0.01, "{s:?}");
}

#[test]
fn openai_usage_without_timings() {
    // vLLM/OpenAI put only `usage` on the last chunk: counts, no durations.
    let p = parse_sse_data(
        r#"{"id":"x","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":30,"completion_tokens":7,"total_tokens":37,"prompt_tokens_details":{"cached_tokens":16}}}"#,
    )
    .unwrap();
    let s = p.server.unwrap();
    assert_eq!(s.source, "usage");
    assert_eq!((s.prompt_tokens, s.cached_tokens), (Some(14), Some(16)));
    assert_eq!(s.generated_tokens, Some(7));
    assert_eq!(s.decode_rate(), None);
}

#[test]
fn malformed_sse_is_an_error_not_a_panic() {
    for bad in ["{", "[1,2]", "\"text\"", "{\"choices\": 5}"] {
        let e = parse_sse_data(bad).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("malformed stream"),
            "{bad}: {e:#}"
        );
    }
}

#[test]
fn ollama_chat_stream() {
    let mut text = String::new();
    let mut last = None;
    for line in data("ollama_chat_stream.ndjson").lines() {
        let p = parse_ollama_line(line).unwrap();
        text.push_str(&p.text);
        if p.done {
            last = Some(p);
        }
    }
    assert_eq!(text, "Hello!");
    let p = last.expect("a done line");
    assert_eq!(p.finish.as_deref(), Some("stop"));
    let s = p.server.unwrap();
    assert_eq!(s.source, "ollama");
    assert_eq!(s.generated_tokens, Some(17));
    assert_eq!(s.prompt_tokens, Some(10));
    // eval_count 17 over eval_duration 4.032296 s; prompt 10 over 0.246847 s.
    assert!((s.decode_rate().unwrap() - 17.0 / 4.032296).abs() < 1e-6);
    assert!((s.prompt_rate().unwrap() - 10.0 / 0.246847).abs() < 1e-6);
}

#[test]
fn model_lists() {
    let v1 = remote::parse_v1_models(&data("llama_server_v1_models.json")).unwrap();
    assert_eq!(v1.len(), 1);
    assert!(v1[0].id.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(v1[0].n_ctx, Some(2048));
    assert_eq!(v1[0].n_ctx_train, Some(8192));
    assert_eq!(v1[0].params, Some(134515008));
    assert_eq!(v1[0].quant.as_deref(), Some("Q4_1"));
    let tags = remote::parse_ollama_tags(&data("ollama_tags.json")).unwrap();
    assert_eq!(tags.len(), 1);
    assert_eq!(tags[0].id, "gemma3");
    assert_eq!(tags[0].size, Some(3338801804));
    assert_eq!(tags[0].quant.as_deref(), Some("Q4_K_M"));
    assert!(remote::parse_v1_models("{}").is_err());
    assert!(remote::parse_ollama_tags("nope").is_err());
}

#[test]
fn named_endpoints_come_from_the_config_file_and_keys_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("endpoints.toml");
    std::fs::write(
        &cfg,
        "[[endpoint]]\nname = \"spark\"\nurl = \"http://spark.local:8000/v1/\"\nmodel = \"qwen3\"\napi_key_env = \"TT_TEST_KEY_SPARK\"\ntimeout_s = 7\n",
    )
    .unwrap();
    // The environment is the process's: this is the only test that sets these.
    std::env::set_var("TOKENTOP_CONFIG", &cfg);
    let e = remote::resolve("spark", None).unwrap_err();
    assert!(
        e.to_string()
            .contains("$TT_TEST_KEY_SPARK, which is not set"),
        "{e}"
    );
    std::env::set_var("TT_TEST_KEY_SPARK", "sk-123");
    let ep = remote::resolve("spark", None).unwrap();
    assert_eq!(ep.url, "http://spark.local:8000");
    assert_eq!(ep.model.as_deref(), Some("qwen3"));
    assert_eq!(ep.api_key.as_deref(), Some("sk-123"));
    assert_eq!(ep.timeout, Duration::from_secs(7));
    assert!(!format!("{ep:?}").contains("sk-123"));
    let e = remote::resolve("nas", None).unwrap_err();
    assert!(e.to_string().contains("no endpoint named \"nas\""), "{e}");
    std::fs::write(&cfg, "[[endpoint]]\nname = 3\n").unwrap();
    let e = remote::resolve("spark", None).unwrap_err();
    assert!(e.to_string().contains("endpoints.toml"), "{e}");
    std::env::remove_var("TOKENTOP_CONFIG");
}

// ---- the worker against servers ----

/// Collects events of `req` until it ends.
fn answer(engine: &EngineHandle, req: RequestId) -> (String, EngineEvent) {
    let mut text = String::new();
    loop {
        let ev = engine
            .events
            .recv_timeout(Duration::from_secs(120))
            .expect("an event");
        match ev {
            EngineEvent::Token { req: r, text: t } if r == req => text.push_str(&t),
            EngineEvent::Finished { req: r, .. } | EngineEvent::Failed { req: r, .. }
                if r == req =>
            {
                return (text, ev)
            }
            _ => {}
        }
    }
}

fn load(engine: &EngineHandle, model: &str) -> Result<ModelInfo, String> {
    engine.send(EngineCmd::Load {
        path: PathBuf::from(model),
        opts: LoadOptions::default(),
    });
    loop {
        match engine
            .events
            .recv_timeout(Duration::from_secs(30))
            .expect("a load event")
        {
            EngineEvent::Ready { info } => return Ok(info),
            EngineEvent::LoadFailed { error, .. } => return Err(error),
            _ => {}
        }
    }
}

fn ask(engine: &EngineHandle, req: RequestId, prompt: &str, max_tokens: usize) {
    engine.send(EngineCmd::Generate {
        req,
        messages: vec![Message::new(Role::User, prompt)],
        params: GenParams {
            max_tokens,
            temperature: 0.0,
            // Long answers stay long (llama-server takes ignore_eos).
            ignore_eos: max_tokens > 100,
            ..Default::default()
        },
    });
}

#[test]
fn a_refused_connection_is_one_clear_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let engine = remote::worker::spawn(endpoint(&url));
    let e = load(&engine, "").unwrap_err();
    assert_eq!(
        e,
        format!("cannot connect to {url}/v1/models: connection refused (is the server running?)")
    );
    // And from the command line: one line, exit status 1.
    let out = common::tokentop(&["run", "--endpoint", &url, "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("tokentop: error: cannot connect to") && l.contains("refused")),
        "{err}"
    );
}

/// A server that answers /v1/models, then sends `reply` to the chat request as is (or
/// nothing, holding the connection open, when None). It stands for the misbehaving servers
/// a real one cannot be made into: a broken SSE stream, one that never answers.
fn odd_server(reply: Option<&'static str>) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let mut buf = [0u8; 8192];
            let n = c.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            if head.starts_with("GET /v1/models") {
                let body =
                    r#"{"object":"list","data":[{"id":"m","object":"model","owned_by":"me"}]}"#;
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            } else if head.starts_with("POST") {
                match reply {
                    Some(r) => {
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n{r}"
                        );
                    }
                    None => held.push(c),
                }
            } else {
                let _ = write!(c, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            }
        }
    });
    url
}

#[test]
fn malformed_sse_keeps_the_part_received() {
    let url = odd_server(Some(
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: {oops\n\n",
    ));
    let engine = remote::worker::spawn(endpoint(&url));
    load(&engine, "m").unwrap();
    ask(&engine, 1, "hi", 16);
    let (text, end) = answer(&engine, 1);
    assert_eq!(text, "Hello");
    match end {
        EngineEvent::Failed { error, .. } => {
            assert!(error.contains("cut mid-answer after 2 token(s)"), "{error}");
            assert!(error.contains("malformed stream"), "{error}");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_server_that_never_answers_times_out() {
    let url = odd_server(None);
    let mut ep = endpoint(&url);
    ep.timeout = Duration::from_millis(700);
    let engine = remote::worker::spawn(ep);
    load(&engine, "m").unwrap();
    let t0 = Instant::now();
    ask(&engine, 1, "hi", 16);
    let (text, end) = answer(&engine, 1);
    assert!(text.is_empty());
    match end {
        EngineEvent::Failed { error, .. } => {
            assert!(error.contains("(timeout)"), "{error}");
            assert!(error.starts_with(&url), "{error}");
        }
        e => panic!("{e:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn run_endpoint_answers_with_client_and_server_rates() {
    let Some(server) = llama_server::start(&[]) else {
        return;
    };
    let out = common::tokentop(&[
        "run",
        "--endpoint",
        &server.url,
        "--prompt",
        "Name three colours.",
        "-n",
        "24",
        "--temperature",
        "0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let rate = |key: &str| -> f64 {
        let line = err
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key:?} in {err}"));
        line[key.len()..]
            .trim()
            .trim_end_matches(" tokens/s")
            .parse()
            .unwrap_or_else(|_| panic!("{line}"))
    };
    assert!(rate("eval rate:") > 0.0, "{err}");
    assert!(rate("server eval rate:") > 0.0, "{err}");
    assert!(rate("server prompt rate:") > 0.0, "{err}");
    assert!(
        err.contains("rates above:          measured by tokentop (client)"),
        "{err}"
    );
    assert!(
        err.contains("server reports:       llama-server timings"),
        "{err}"
    );

    // A model the server does not serve.
    let out = common::tokentop(&["run", "--endpoint", &server.url, "gpt-9", "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokentop: error: ") && err.contains("model \"gpt-9\" not found (404)"),
        "{err}"
    );
}

#[test]
fn a_wrong_api_key_is_401() {
    let Some(server) = llama_server::start(&["--api-key", "right-key"]) else {
        return;
    };
    let mut ep = endpoint(&server.url);
    ep.api_key = Some("wrong-key".into());
    let engine = remote::worker::spawn(ep.clone());
    let e = load(&engine, "").unwrap_err();
    assert!(
        e.contains("401 Unauthorized") && e.contains("API key"),
        "{e}"
    );
    ep.api_key = Some("right-key".into());
    let engine = remote::worker::spawn(ep);
    load(&engine, "").unwrap();
    ask(&engine, 1, "Hi", 4);
    assert!(matches!(answer(&engine, 1).1, EngineEvent::Finished { .. }));
}

fn key(code: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

/// Carries out the effects the way app.rs does, for the ones that reach the backend.
fn run_effects(engine: &EngineHandle, fx: Vec<Effect>, saved: &mut Vec<String>) {
    for e in fx {
        match e {
            Effect::Generate {
                req,
                messages,
                params,
            } => engine.send(EngineCmd::Generate {
                req,
                messages,
                params,
            }),
            Effect::Cancel { req } => engine.send(EngineCmd::Cancel { req }),
            Effect::Load {
                path,
                keep_previous,
            } => engine.send(EngineCmd::Load {
                path,
                opts: LoadOptions {
                    keep_previous,
                    ..Default::default()
                },
            }),
            Effect::SaveEntry(e) => saved.push(e.text),
            _ => {}
        }
    }
}

/// Feeds backend events to the state machine until `done` holds.
fn pump(
    st: &mut State,
    engine: &EngineHandle,
    saved: &mut Vec<String>,
    mut done: impl FnMut(&State) -> bool,
) {
    let t0 = Instant::now();
    while !done(st) {
        assert!(t0.elapsed() < Duration::from_secs(120), "{}", st.status);
        if let Ok(ev) = engine.events.recv_timeout(Duration::from_millis(100)) {
            let fx = update(st, Msg::Engine(ev));
            run_effects(engine, fx, saved);
        }
    }
}

fn submit(st: &mut State, engine: &EngineHandle, saved: &mut Vec<String>, prompt: &str) {
    for c in prompt.chars() {
        update(st, key(KeyCode::Char(c)));
    }
    let fx = update(st, key(KeyCode::Enter));
    assert!(
        fx.iter().any(|e| matches!(e, Effect::Generate { .. })),
        "{fx:?}"
    );
    run_effects(engine, fx, saved);
}

#[test]
fn the_state_machine_drives_a_remote_server_and_a_kill_mid_answer_keeps_the_part() {
    let Some(mut server) = llama_server::start(&[]) else {
        return;
    };
    let engine = remote::worker::spawn(endpoint(&server.url));
    let mut st = State::new(
        GenParams {
            max_tokens: 400,
            temperature: 0.0,
            ..Default::default()
        },
        vec![],
    );
    let mut saved = Vec::new();
    run_effects(
        &engine,
        vec![Effect::Load {
            path: PathBuf::from(""),
            keep_previous: false,
        }],
        &mut saved,
    );
    pump(&mut st, &engine, &mut saved, |st| st.model.is_some());
    assert!(st.model.as_ref().unwrap().name.contains("SmolLM2"));

    // A whole answer, through the same effects as the local engine.
    submit(&mut st, &engine, &mut saved, "Say hi.");
    pump(&mut st, &engine, &mut saved, |st| st.stream.is_none());
    let last = st.chat.last().unwrap();
    assert!(!last.text.is_empty());
    let footer = last.footer.as_ref().expect("a footer");
    assert!(footer.tokens > 0);
    assert_eq!(saved.len(), 2, "prompt and answer saved");
    // The status line says which rates are the client's and which the server's.
    assert!(
        st.status.starts_with("client: decode ")
            && st.status.contains("server (llama-server timings): prompt ")
            && !st.status.contains("decode n/a"),
        "{}",
        st.status
    );

    // Killed mid-answer: the cut-stream message, the part kept and saved.
    saved.clear();
    st.params.ignore_eos = true; // a long answer, to be cut
    submit(
        &mut st,
        &engine,
        &mut saved,
        "Write a long story about a lighthouse keeper.",
    );
    pump(&mut st, &engine, &mut saved, |st| {
        st.chat.last().is_some_and(|e| e.text.len() > 20)
    });
    server.kill();
    pump(&mut st, &engine, &mut saved, |st| st.stream.is_none());
    assert!(
        st.status.contains("was cut mid-answer after"),
        "{}",
        st.status
    );
    let part = st.chat.last().unwrap();
    assert!(part.text.len() > 20, "{part:?}");
    // Saved with a footer that says it was cut, counting the tokens that came.
    let footer = part.footer.as_ref().expect("a footer on the part");
    assert_eq!(footer.reason, tokentop::protocol::FinishReason::Cut);
    assert!(footer.tokens > 0, "{footer:?}");
    assert_eq!(saved.last(), Some(&part.text), "the part is saved");
}

#[test]
fn cancel_closes_the_stream_within_a_token() {
    let Some(server) = llama_server::start(&[]) else {
        return;
    };
    let engine = remote::worker::spawn(endpoint(&server.url));
    load(&engine, "").unwrap();
    ask(&engine, 1, "Write a long story about a cat.", 400);
    let mut tokens = 0;
    while tokens < 3 {
        if let EngineEvent::Token { .. } = engine.events.recv().unwrap() {
            tokens += 1;
        }
    }
    engine.send(EngineCmd::Cancel { req: 1 });
    let t0 = Instant::now();
    let (_, end) = answer(&engine, 1);
    match end {
        EngineEvent::Finished { reason, stats, .. } => {
            assert_eq!(reason, FinishReason::Cancelled);
            assert!(stats.generated_tokens >= 3);
        }
        e => panic!("{e:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    // The server lets the request go: its slot is free again soon after.
    let agent = remote::agent(Duration::from_secs(2));
    let t0 = Instant::now();
    loop {
        let slots = remote::get(&agent, &endpoint(&server.url), "/slots").unwrap();
        if tokentop::remote::watch::parse_slots(&slots).unwrap().busy == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the server still generates after the cancel: {slots}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ab_compares_a_remote_model_with_a_local_one() {
    let Some(server) = llama_server::start(&[]) else {
        return;
    };
    let local = common::smollm2().expect("the local model");
    let item = |label: &str, path: PathBuf| tokentop::state::SwitchItem {
        label: label.into(),
        id: None,
        path: Some(path),
        size: 0,
        params_b: 0.1,
        active_params_b: 0.1,
        moe: false,
        tags: vec![],
    };
    // The router behind `ui --endpoint`: remote names to the server, GGUF files to the
    // embedded engine.
    let engine = remote::router::spawn(endpoint(&server.url));
    let mut st = State::new(
        GenParams {
            max_tokens: 8,
            temperature: 0.0,
            ..Default::default()
        },
        vec![
            item("remote", remote::load_path("SmolLM2-135M-Instruct.Q4_1")),
            item("local", local),
        ],
    );
    let mut saved = Vec::new();
    run_effects(
        &engine,
        vec![Effect::Load {
            path: remote::load_path(""),
            keep_previous: false,
        }],
        &mut saved,
    );
    pump(&mut st, &engine, &mut saved, |st| st.model.is_some());
    assert_eq!(st.model.as_ref().unwrap().arch, "remote");
    submit(&mut st, &engine, &mut saved, "Say hi.");
    pump(&mut st, &engine, &mut saved, |st| st.stream.is_none());

    let fx = update(
        &mut st,
        Msg::Key(KeyEvent::new(KeyCode::Char('b'), KeyModifiers::CONTROL)),
    );
    run_effects(&engine, fx, &mut saved);
    let fx = update(&mut st, key(KeyCode::Down));
    run_effects(&engine, fx, &mut saved);
    let fx = update(&mut st, key(KeyCode::Enter));
    run_effects(&engine, fx, &mut saved);
    assert!(st.ab.is_some(), "{}", st.status);
    // A finished run leaves `ab` for `ab_last` (the scorecard).
    pump(&mut st, &engine, &mut saved, |st| {
        st.ab.is_none()
            && st
                .ab_last
                .as_ref()
                .is_some_and(|ab| ab.phase == tokentop::state::AbPhase::Done)
    });
    let ab = st.ab_last.as_ref().unwrap();
    assert!(
        ab.a.model.contains("SmolLM2") && ab.a.model.contains('@'),
        "{}",
        ab.a.model
    );
    // B is named as the loaded local model is (not by its switcher label).
    assert!(
        ab.b.model.contains("135M") && !ab.b.model.contains('@'),
        "{}",
        ab.b.model
    );
    assert!(!ab.a.answer.is_empty() && !ab.b.answer.is_empty());
    assert!(ab.a.footer.is_some() && ab.b.footer.is_some());
    // Back on the remote model at the end.
    assert_eq!(st.model.as_ref().unwrap().arch, "remote");
}
