//! The real binary in tmux, as a person uses it: type a prompt, watch it stream, read the
//! speed off the screen, shrink the terminal to 20x5, quit with Ctrl-C twice; end it with
//! SIGTERM, SIGHUP, SIGINT and SIGQUIT mid-answer; start it with stdin not a terminal; A/B
//! two real models then chat on and end with SIGTERM mid-answer; reopen a session while an
//! answer streams.
mod common;

use std::process::Command;
use std::time::{Duration, Instant};
use tokentop::protocol::Role;

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("running tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screen(s: &str) -> String {
    tmux(&["capture-pane", "-p", "-t", s])
}

fn wait_for(s: &str, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = screen(s);
        if pred(&text) {
            return text;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; screen:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (TTFT s, prefill tok/s, decode tok/s) from an answer footer line.
fn footer(screen: &str) -> Option<(f64, f64, f64)> {
    let line = screen
        .lines()
        .find(|l| l.contains("TTFT ") && l.contains(" · decode "))?;
    let num = |after: &str| -> Option<f64> {
        let rest = &line[line.find(after)? + after.len()..];
        rest.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?
            .parse()
            .ok()
    };
    Some((num("TTFT ")?, num("prefill ")?, num("decode ")?))
}

/// The machine's architecture when this test binary is not of it: tmux and `uname` are native
/// programs, so `uname -m` names the host even when qemu-user runs this binary.
fn emulated() -> Option<String> {
    let out = Command::new("uname").arg("-m").output().ok()?;
    let host = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let same = host == std::env::consts::ARCH || (host == "arm64" && cfg!(target_arch = "aarch64"));
    (!same && !host.is_empty()).then_some(host)
}

struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        tmux(&["kill-session", "-t", &self.0]);
    }
}

#[test]
fn chat_in_tmux_streams_and_shows_speed() {
    if !have_tmux() {
        return;
    }
    let Some(model) = common::smollm2() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let (name, _guard) = launch(
        "e2e",
        home.path(),
        &format!("{} --temperature 0 -n 48", model.display()),
        "",
    );

    tmux(&[
        "send-keys",
        "-t",
        &name,
        "What is the capital of France?",
        "Enter",
    ]);
    let done = wait_for(&name, "the answer's footer", 120, |t| footer(t).is_some());
    let (ttft, prefill, decode) = footer(&done).unwrap();
    assert!(ttft > 0.0 && prefill > 0.0 && decode > 0.0, "{done}");
    // The streamed answer sits between the model's name and the footer.
    let lines: Vec<&str> = done.lines().collect();
    let foot = lines.iter().position(|l| l.contains(" · decode ")).unwrap();
    let head = lines
        .iter()
        .position(|l| l.contains("What is the capital of France?"))
        .unwrap();
    let answer: String = lines[head + 3..foot]
        .iter()
        .map(|l| l.split('│').next().unwrap_or("").trim())
        .collect();
    assert!(answer.len() > 10, "no streamed answer on screen:\n{done}");
    // The speed pane agrees with the footer.
    assert!(
        done.contains(&format!("{decode:.1} tok/s decode")),
        "{done}"
    );
    assert!(
        done.contains("n/a") || done.contains(" W "),
        "power pane shows a reading or n/a:\n{done}"
    );

    // A 20x5 terminal still draws, and growing back restores the panes.
    tmux(&["resize-window", "-t", &name, "-x", "20", "-y", "5"]);
    std::thread::sleep(Duration::from_millis(800));
    let tiny = screen(&name);
    assert!(
        tiny.contains("tokentop") && !tiny.contains("TOKENTOP_EXIT"),
        "{tiny}"
    );
    tmux(&["resize-window", "-t", &name, "-x", "110", "-y", "34"]);
    wait_for(&name, "the panes after resizing", 10, |t| {
        t.contains("speed")
    });

    // Ctrl-C twice quits cleanly, restoring the terminal (the shell's echo shows).
    tmux(&["send-keys", "-t", &name, "C-c"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux(&["send-keys", "-t", &name, "C-c"]);
    let end = wait_for(&name, "tokentop to exit", 10, |t| {
        t.contains("TOKENTOP_EXIT=")
    });
    assert!(end.contains("TOKENTOP_EXIT=0"), "{end}");
    assert!(
        !end.contains("speed"),
        "the alternate screen was left:\n{end}"
    );

    // The conversation was saved as it happened.
    let sessions = tokentop::session::list(&home.path().join("sessions"));
    assert_eq!(sessions.len(), 1);
    let saved = tokentop::session::load(&sessions[0]).unwrap();
    assert_eq!(saved.len(), 2);
    assert!(saved[1].footer.is_some() && !saved[1].text.is_empty());
}

fn have_tmux() -> bool {
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must install tmux");
        eprintln!("SKIPPED: tmux is not installed");
        return false;
    }
    if let Some(host) = emulated() {
        eprintln!(
            "SKIPPED: this {} test runs under emulation on a {host} machine (qemu-user), which does not emulate the terminal ioctls the binary needs inside tmux",
            std::env::consts::ARCH
        );
        return false;
    }
    true
}

/// The shell line a tmux test runs: `tokentop ui ARGS` with its own TOKENTOP_HOME, then the
/// exit status as `TOKENTOP_EXIT=N`, then `after`, then a pause that keeps the pane to read.
fn ui_shell(home: &std::path::Path, args: &str, after: &str) -> String {
    format!(
        "TOKENTOP_HOME={} {} ui {args}; echo TOKENTOP_EXIT=$?; {after}sleep 60",
        home.display(),
        env!("CARGO_BIN_EXE_tokentop"),
    )
}

/// Run after tokentop by `ui_shell`: prints the terminal's line discipline, which a restored
/// terminal has back in canonical mode with echo.
const TTY_AFTER: &str =
    "echo TTY=$(stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo); ";

/// Starts `tokentop ui ARGS` (see `ui_shell`) in a tmux session named after `tag` and waits
/// for the model to load; returns the session's name and the guard that ends it.
fn launch(tag: &str, home: &std::path::Path, args: &str, after: &str) -> (String, Session) {
    let name = format!("tokentop-{tag}-{}", std::process::id());
    let guard = start(&name, &ui_shell(home, args, after));
    wait_for(&name, "the model to load", 60, |t| {
        t.contains("loaded in") && t.contains("prompt ·")
    });
    (name, guard)
}

/// Starts `cmd` in a new detached tmux session of 110x34.
fn start(name: &str, cmd: &str) -> Session {
    tmux(&[
        "new-session",
        "-d",
        "-s",
        name,
        "-x",
        "110",
        "-y",
        "34",
        cmd,
    ]);
    Session(name.to_string())
}

/// One of tmux's pane formats, such as `#{alternate_on}`.
fn pane_format(s: &str, format: &str) -> String {
    tmux(&["display-message", "-p", "-t", s, format])
        .trim()
        .to_string()
}

/// tokentop's process id: the child of the pane's shell.
fn tokentop_pid(s: &str) -> String {
    let shell = pane_format(s, "#{pane_pid}");
    let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
    children
        .split_whitespace()
        .next()
        .expect("tokentop runs under the pane's shell")
        .to_string()
}

/// SIGTERM, SIGHUP, SIGINT and SIGQUIT sent while an answer streams: the terminal is
/// restored (alternate screen left, raw mode off, cursor shown), the exit status is 128 + the
/// signal, and the part of the answer that streamed is saved in the session.
#[test]
fn signals_while_streaming_restore_the_terminal() {
    if !have_tmux() {
        return;
    }
    let Some(model) = common::smollm2() else {
        return;
    };
    for (signal, code) in [("TERM", 143), ("HUP", 129), ("INT", 130), ("QUIT", 131)] {
        let home = tempfile::tempdir().unwrap();
        // After tokentop, the shell prints its status and the terminal's line discipline.
        let (name, _guard) = launch(
            &format!("sig{signal}"),
            home.path(),
            &format!("{} --temperature 0 -n 4000", model.display()),
            TTY_AFTER,
        );
        assert_eq!(pane_format(&name, "#{alternate_on}"), "1");
        tmux(&[
            "send-keys",
            "-t",
            &name,
            "Write the numbers from 1 to 300, separated by commas.",
            "Enter",
        ]);
        // Some text before the caret: tokens have arrived, not only the prefill started.
        wait_for(&name, "the answer to stream", 60, |t| {
            t.contains("answering…")
                && t.lines().any(|l| {
                    l.split_once('▌').is_some_and(|(before, _)| {
                        before.trim_start_matches(['│', ' ']).trim().len() > 1
                    })
                })
        });
        let pid = tokentop_pid(&name);
        assert!(Command::new("sh")
            .args(["-c", &format!("kill -{signal} {pid}")])
            .status()
            .unwrap()
            .success());
        let end = wait_for(&name, "tokentop to exit", 20, |t| t.contains("TTY="));
        assert!(
            end.contains(&format!("TOKENTOP_EXIT={code}")),
            "SIG{signal}:\n{end}"
        );
        assert!(end.contains("TTY=icanon echo"), "raw mode is off:\n{end}");
        assert!(
            !end.contains("speed"),
            "the alternate screen was left:\n{end}"
        );
        assert!(!end.contains("panicked"), "{end}");
        assert_eq!(pane_format(&name, "#{alternate_on}"), "0");
        assert_eq!(pane_format(&name, "#{cursor_flag}"), "1", "cursor shown");

        let sessions = tokentop::session::list(&home.path().join("sessions"));
        assert_eq!(sessions.len(), 1);
        let saved = tokentop::session::load(&sessions[0]).unwrap();
        assert_eq!(saved.len(), 2, "{saved:?}");
        assert!(
            saved[1].footer.is_none() && !saved[1].text.is_empty(),
            "the partial answer is kept: {saved:?}"
        );
    }
}

/// `tokentop ui </dev/null` on a terminal: stdin is not one, so it stops before fetching.
#[test]
fn the_tui_with_stdin_not_a_terminal_fails_at_once() {
    if !have_tmux() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let name = format!("tokentop-notty-{}", std::process::id());
    let cmd = ui_shell(home.path(), "</dev/null", "");
    let _guard = start(&name, &cmd);
    let end = wait_for(&name, "tokentop to exit", 20, |t| {
        t.contains("TOKENTOP_EXIT=")
    });
    assert!(
        end.contains(
            "tokentop: error: the TUI needs a terminal; use `tokentop run --prompt …` for scripts"
        ) && end.contains("TOKENTOP_EXIT=1"),
        "{end}"
    );
    assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0);
}

/// A GGUF with `general.alignment = 0`, on which candle's reader divides by zero (issue 8,
/// class 1): the engine thread may die on it. Either way the UI keeps the screen (it is not
/// restored under the running app), says what happened instead of "loading" forever, and
/// still quits normally.
#[test]
fn a_failing_engine_is_reported_in_the_title() {
    if !have_tmux() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = common::synth(
        dir.path(),
        &tokentop::engine::synth::SynthSpec::new("llama"),
    );
    let mut bytes = std::fs::read(&good).unwrap();
    // Same-length key rename: llama.block_count (a u32) becomes general.alignment = 0.
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at..at + key.len()].copy_from_slice(b"general.alignment");
    let value = at + key.len() + 4;
    bytes[value..value + 4].copy_from_slice(&0u32.to_le_bytes());
    let bad = dir.path().join("align0.gguf");
    std::fs::write(&bad, bytes).unwrap();

    let name = format!("tokentop-engine-{}", std::process::id());
    let cmd = ui_shell(dir.path(), &bad.display().to_string(), "");
    let _guard = start(&name, &cmd);
    let shown = wait_for(&name, "the failure in the title", 30, |t| {
        let title = t.lines().next().unwrap_or("");
        title.contains("the engine stopped: ") || title.contains("load failed: ")
    });
    assert!(
        !shown.lines().next().unwrap().contains("loading"),
        "{shown}"
    );
    assert_eq!(pane_format(&name, "#{alternate_on}"), "1", "{shown}");
    assert!(!shown.contains("panicked"), "{shown}");
    tmux(&["send-keys", "-t", &name, "C-c"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux(&["send-keys", "-t", &name, "C-c"]);
    let end = wait_for(&name, "tokentop to exit", 10, |t| {
        t.contains("TOKENTOP_EXIT=")
    });
    assert!(end.contains("TOKENTOP_EXIT=0"), "{end}");
    assert_eq!(pane_format(&name, "#{alternate_on}"), "0");
}

/// Some text before the caret: tokens have arrived, not only the prefill started.
fn streaming(t: &str) -> bool {
    t.contains("answering…")
        && t.lines().any(|l| {
            l.split_once('▌')
                .is_some_and(|(before, _)| before.trim_start_matches(['│', ' ']).trim().len() > 1)
        })
}

/// A TOKENTOP_HOME whose model store holds (links to) the catalog's two real models, so the
/// switcher offers both as on disk; sessions are written here, never in the shared home.
fn home_with_models(models: &[&std::path::Path]) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("models");
    std::fs::create_dir_all(&store).unwrap();
    for m in models {
        std::os::unix::fs::symlink(m, store.join(m.file_name().unwrap())).unwrap();
    }
    home
}

/// Issue 9 item 1 end to end: an A/B of SmolLM2 against Gemma streams side by side, files
/// both answers, and the normal answer after it gets its footer and is saved; then SIGTERM
/// in the middle of another answer restores the terminal and keeps the part streamed.
#[test]
fn ab_then_a_normal_answer_then_sigterm() {
    if !have_tmux() {
        return;
    }
    let (Some(smol), Some(gemma)) = (common::smollm2(), common::gemma()) else {
        return;
    };
    let home = home_with_models(&[&smol, &gemma]);
    let (name, _guard) = launch(
        "ab",
        home.path(),
        &format!("{} --temperature 0 -n 24", smol.display()),
        TTY_AFTER,
    );

    // A/B the typed prompt against Gemma, picked by its row in the switcher.
    tmux(&["send-keys", "-t", &name, "Name a color.", ""]);
    tmux(&["send-keys", "-t", &name, "C-b"]);
    wait_for(&name, "the A/B switcher", 10, |t| {
        t.contains("gemma-3-270m")
    });
    let row = tokentop::catalog::Catalog::builtin()
        .models
        .iter()
        .position(|m| m.id == "gemma-3-270m")
        .unwrap();
    for _ in 0..row {
        tmux(&["send-keys", "-t", &name, "Down"]);
    }
    tmux(&["send-keys", "-t", &name, "Enter"]);
    let scorecard = |t: &str| {
        t.lines()
            .find(|l| l.contains("╭ A/B · ") && l.contains(" · Esc closes "))
            .map(str::to_string)
    };
    let live = wait_for(&name, "the A/B side by side", 60, |t| {
        t.contains("A/B · Name a color.") || scorecard(t).is_some()
    });
    let done = wait_for(&name, "the A/B scorecard", 180, |t| scorecard(t).is_some());
    // Two small models fit together: B was read beside A, and A came back without a read.
    let card = scorecard(&done).unwrap();
    assert!(
        card.contains("B loaded beside A: both stay in memory; A was still in memory: no reload"),
        "{done}"
    );
    // Caught while it ran (it may have finished between two looks): both sides are shown.
    assert!(
        !live.contains("A/B · Name a color.") || live.contains("B gemma-3-270m"),
        "both sides are shown:\n{live}"
    );
    assert!(done.contains("A/B done"), "{done}");
    tmux(&["send-keys", "-t", &name, "Escape"]);
    // Typed at once, the prompt would follow the Escape in the same read and become Alt keys.
    wait_for(&name, "the scorecard to close", 10, |t| {
        scorecard(t).is_none()
    });

    // The normal answer after it: footer on screen and saved with its prompt.
    tmux(&["send-keys", "-t", &name, "Say hello.", "Enter"]);
    let after = wait_for(&name, "the answer after the A/B", 120, |t| {
        !t.contains("answering…")
            && t.lines()
                .skip_while(|l| !l.contains("Say hello."))
                .any(|l| l.contains(" · decode "))
    });
    assert!(!after.contains('▌'), "no caret left:\n{after}");
    let sessions = tokentop::session::list(&home.path().join("sessions"));
    assert_eq!(sessions.len(), 1);
    let saved = tokentop::session::load(&sessions[0]).unwrap();
    let roles: Vec<Role> = saved.iter().map(|e| e.role).collect();
    assert_eq!(
        roles,
        [
            Role::System,
            Role::System,
            Role::System,
            Role::User,
            Role::Assistant
        ],
        "{saved:?}"
    );
    assert_eq!(saved[0].text, "**A/B** of: Name a color.");
    assert!(saved[1].footer.is_some() && saved[2].footer.is_some());
    assert_ne!(saved[1].model, saved[2].model);
    assert_eq!(saved[3].text, "Say hello.");
    assert!(saved[4].footer.is_some() && !saved[4].text.is_empty());

    // SIGTERM mid-answer: the terminal comes back and the partial answer is kept.
    tmux(&[
        "send-keys",
        "-t",
        &name,
        "Write the numbers from 1 to 300, separated by commas.",
        "Enter",
    ]);
    wait_for(&name, "the answer to stream", 60, streaming);
    let pid = tokentop_pid(&name);
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let end = wait_for(&name, "tokentop to exit", 20, |t| t.contains("TTY="));
    assert!(end.contains("TOKENTOP_EXIT=143"), "{end}");
    assert!(end.contains("TTY=icanon echo"), "raw mode is off:\n{end}");
    assert_eq!(pane_format(&name, "#{alternate_on}"), "0");
    assert_eq!(pane_format(&name, "#{cursor_flag}"), "1", "cursor shown");
    let saved = tokentop::session::load(&sessions[0]).unwrap();
    assert_eq!(saved.len(), 7, "{saved:?}");
    assert!(saved[6].footer.is_none() && !saved[6].text.is_empty());
}

/// Issue 9 item 3 end to end: F4 and Enter on an older session while an answer streams. The
/// older session's file is not changed by a single byte; the answer in flight is saved, as
/// cancelled, into a session of its own.
#[test]
fn reopening_a_session_while_streaming_leaves_it_untouched() {
    if !have_tmux() {
        return;
    }
    let Some(model) = common::smollm2() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("sessions");
    let mut old = tokentop::session::SessionFile::new(dir.clone());
    old.append(&common::entry(Role::User, "an older question"))
        .unwrap();
    let mut answer = common::entry(Role::Assistant, "an older answer");
    answer.model = "SmolLM2".into();
    old.append(&answer).unwrap();
    let old_path = old.path().unwrap().to_path_buf();
    let before = std::fs::read(&old_path).unwrap();

    let (name, _guard) = launch(
        "f4",
        home.path(),
        &format!("{} --temperature 0 -n 4000", model.display()),
        "",
    );
    tmux(&[
        "send-keys",
        "-t",
        &name,
        "Write the numbers from 1 to 300, separated by commas.",
        "Enter",
    ]);
    wait_for(&name, "the answer to stream", 60, streaming);
    tmux(&["send-keys", "-t", &name, "F4"]);
    wait_for(&name, "the session list", 10, |t| {
        t.contains("an older question")
    });
    tmux(&["send-keys", "-t", &name, "Enter"]);
    let shown = wait_for(&name, "the older session", 10, |t| t.contains("reopened"));
    // Give late tokens of the stopped answer time to arrive: they must go nowhere.
    std::thread::sleep(Duration::from_millis(1500));
    let now = screen(&name);
    assert!(
        now.contains("an older answer") && !now.contains('▌'),
        "{now}"
    );
    assert!(!shown.contains("answering…"), "{shown}");
    assert_eq!(
        std::fs::read(&old_path).unwrap(),
        before,
        "the reopened file is unchanged"
    );

    tmux(&["send-keys", "-t", &name, "C-c"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux(&["send-keys", "-t", &name, "C-c"]);
    let end = wait_for(&name, "tokentop to exit", 10, |t| {
        t.contains("TOKENTOP_EXIT=")
    });
    assert!(end.contains("TOKENTOP_EXIT=0"), "{end}");
    assert_eq!(std::fs::read(&old_path).unwrap(), before);
    let sessions = tokentop::session::list(&dir);
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let own = sessions.iter().find(|p| **p != old_path).unwrap();
    let saved = tokentop::session::load(own).unwrap();
    assert_eq!(saved.len(), 2, "{saved:?}");
    assert!(saved[0].text.starts_with("Write the numbers"));
    assert_eq!(
        saved[1].footer.as_ref().map(|f| f.reason),
        Some(tokentop::protocol::FinishReason::Cancelled),
        "{saved:?}"
    );
    assert!(!saved[1].text.is_empty());
}

/// A 10 MB session reopened with F4 (issue 9 item 10): it opens at its end, sits idle, and
/// still answers keys: typing shows in the prompt, PgUp moves the view, Ctrl-C twice quits.
/// bench/long-chat.sh measures the idle CPU and key-to-screen time; this only checks it works.
#[test]
fn a_ten_megabyte_session_reopens_and_answers_keys() {
    if !have_tmux() {
        return;
    }
    let Some(model) = common::smollm2() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let mut file = tokentop::session::SessionFile::new(home.path().join("sessions"));
    let para = "Prose about memory bandwidth and **decode** rates, long enough to wrap. ".repeat(5);
    let answer =
        format!("{para}\n\n- a point\n- another\n\n```rust\nfn main() {{}}\n```\n\n").repeat(150);
    let mut size = 0;
    let mut turn = 0;
    while size < 10_000_000 {
        turn += 1;
        let mut a = common::entry(
            tokentop::protocol::Role::Assistant,
            &format!("{answer}END OF ANSWER {turn}"),
        );
        a.footer = Some(tokentop::state::Footer {
            ttft: Duration::from_millis(100),
            prefill_rate: 500.0,
            decode_rate: 40.0,
            tokens: 500,
            reason: tokentop::protocol::FinishReason::Eos,
            joules: None,
            peak_rss: 0,
            thinking: None,
        });
        let q = common::entry(tokentop::protocol::Role::User, &format!("question {turn}"));
        file.append(&q).unwrap();
        file.append(&a).unwrap();
        size += a.text.len();
    }
    let (name, _guard) = launch("long", home.path(), &model.display().to_string(), "");
    tmux(&["send-keys", "-t", &name, "F4"]);
    wait_for(&name, "the session list", 20, |t| {
        t.contains("sessions (Enter")
    });
    tmux(&["send-keys", "-t", &name, "Enter"]);
    let end = format!("END OF ANSWER {turn}");
    let opened = wait_for(&name, "the reopened session's end", 60, |t| {
        t.contains(&end)
    });
    // Idle for a while, then keys still reach the screen.
    std::thread::sleep(Duration::from_secs(3));
    tmux(&["send-keys", "-t", &name, "still here"]);
    wait_for(&name, "typed text in the prompt", 10, |t| {
        t.contains("still here")
    });
    tmux(&["send-keys", "-t", &name, "PPage"]);
    let up = wait_for(&name, "PgUp to move the view", 10, |t| !t.contains(&end));
    assert_ne!(up, opened);
    tmux(&["send-keys", "-t", &name, "NPage"]);
    wait_for(&name, "PgDn back to the end", 10, |t| t.contains(&end));
    tmux(&["send-keys", "-t", &name, "C-c"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux(&["send-keys", "-t", &name, "C-c"]);
    let exit = wait_for(&name, "tokentop to exit", 10, |t| {
        t.contains("TOKENTOP_EXIT=")
    });
    assert!(exit.contains("TOKENTOP_EXIT=0"), "{exit}");
}
