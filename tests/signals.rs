//! Signals, terminals and closed pipes, on the real binary: no terminal for the TUI is an
//! error before anything is fetched; Ctrl-C during `run --prompt` stops the answer and exits
//! 130; a closed stdout ends `run` (and `list`) quietly, never with a panic; a stopped
//! engine is shown in the UI. The TUI's own signal handling is in tests/tui_e2e.rs (tmux).
mod common;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};
use tokentop::protocol::{EngineEvent, GenParams, ModelInfo};
use tokentop::state::{update, Effect, Msg, State};

const BIN: &str = env!("CARGO_BIN_EXE_tokentop");

/// A prompt SmolLM2 answers at length, so that the answer is still streaming when the test
/// interrupts it.
const LONG: &str = "Write the numbers from 1 to 300, separated by commas.";

/// Waits for the child to exit by itself; kills it and fails after `secs`.
fn wait_exit(child: &mut Child, secs: u64, what: &str) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}: still running after {secs}s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

#[test]
fn the_tui_without_a_terminal_fails_before_fetching() {
    for args in [
        &[][..],
        &["ui"],
        &["ui", "smollm2-135m"],
        &["ui", "--theme", "light"],
    ] {
        let home = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(args)
            .env("TOKENTOP_HOME", home.path())
            .env_remove("TOKENTOP_CATALOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr,
            "tokentop: error: the TUI needs a terminal; use `tokentop run --prompt …` for scripts\n",
            "tokentop {args:?}"
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        assert_eq!(
            std::fs::read_dir(home.path()).unwrap().count(),
            0,
            "tokentop {args:?} fetched or wrote something"
        );
    }
}

#[test]
fn sigint_during_run_prompt_stops_the_answer_and_exits_130() {
    let Some(model) = common::smollm2() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["run", model.to_str().unwrap(), "--prompt", LONG])
        .args(["--temperature", "0", "-n", "4000"])
        .env("TOKENTOP_HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // Interrupt once some of the answer has streamed.
    let mut seen = Vec::new();
    while seen.len() < 20 {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(chunk) => seen.extend(chunk),
            Err(e) => panic!("no answer streamed ({e}): {}", stderr_of(&mut child)),
        }
    }
    // The shell's kill builtin: no procps needed.
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_exit(&mut child, 60, "run --prompt after SIGINT");
    reader.join().unwrap();
    seen.extend(rx.try_iter().flatten());
    let stderr = stderr_of(&mut child);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The answer stopped at once (the model would have counted on for thousands of tokens),
    // and what was generated was printed, followed by the stats block.
    let text = String::from_utf8_lossy(&seen);
    assert!(text.trim().len() >= 20 && text.ends_with('\n'), "{text}");
    assert!(
        stderr.contains("finish reason:        cancelled"),
        "{stderr}"
    );
}

/// The chat keeps stdin open: if a closed stdout did not end it, it would wait forever.
#[test]
fn the_chat_stops_when_stdout_is_closed() {
    let Some(model) = common::smollm2() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(BIN)
        .args([
            "run",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "4000",
        ])
        .env("TOKENTOP_HOME", home.path())
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{LONG}").unwrap();
    let status = wait_exit(&mut child, 120, "the chat with a closed stdout");
    drop(stdin);
    let stderr = stderr_of(&mut child);
    assert_eq!(status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("error"), "quietly: {stderr}");
}

#[test]
fn printing_commands_exit_quietly_when_stdout_is_closed() {
    let home = tempfile::tempdir().unwrap();
    for (args, code) in [
        (&["list"][..], 141),
        (&["--help"][..], 0),
        (&["run", "--help"][..], 0),
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(BIN)
            .args(args)
            .env("TOKENTOP_HOME", home.path())
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

fn info() -> ModelInfo {
    common::model_info("m")
}

fn send(st: &mut State, text: &str) -> Vec<Effect> {
    for c in text.chars() {
        update(
            st,
            Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)),
        );
    }
    update(
        st,
        Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)),
    )
}

/// The app turns a disconnected engine channel into `Msg::EngineStopped` (src/app.rs tests
/// that part); the UI then says so instead of "loading" forever.
#[test]
fn a_stopped_engine_is_shown_instead_of_loading_forever() {
    let mut st = State::new(GenParams::default(), vec![]);
    st.loading = Some(("m.gguf".into(), Instant::now()));
    update(
        &mut st,
        Msg::EngineStopped("attempt to divide by zero".into()),
    );
    assert!(st.loading.is_none());
    assert_eq!(
        st.status,
        "the engine stopped: attempt to divide by zero; Ctrl-O loads a model again"
    );

    // Mid-answer: the streamed part is kept and saved; an empty answer gives the prompt back.
    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info() }));
    let fx = send(&mut st, "hello");
    let req = fx
        .iter()
        .find_map(|e| match e {
            Effect::Generate { req, .. } => Some(*req),
            _ => None,
        })
        .unwrap();
    update(
        &mut st,
        Msg::Engine(EngineEvent::Token {
            req,
            text: "Hi the".into(),
        }),
    );
    let fx = update(&mut st, Msg::EngineStopped("gone".into()));
    assert!(
        matches!(&fx[..], [Effect::SaveEntry(q), Effect::SaveEntry(a)]
            if q.text == "hello" && a.text == "Hi the"),
        "{fx:?}"
    );
    assert!(st.stream.is_none() && st.model.is_none());
    assert_eq!(st.chat.len(), 2);

    update(&mut st, Msg::Engine(EngineEvent::Ready { info: info() }));
    send(&mut st, "again");
    let fx = update(&mut st, Msg::EngineStopped("gone".into()));
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(st.chat.len(), 2, "the unanswered turn is taken back");
    assert_eq!(st.input.text, "again");
}
