//! The real SmolLM2 through the real binary, as a user runs it.
mod common;

use std::process::Command;

fn rate(stderr: &str, key: &str) -> f64 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} line in:\n{stderr}"));
    line[key.len()..]
        .trim()
        .trim_end_matches(" tokens/s")
        .parse()
        .unwrap()
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let out = common::tokentop(&[
        "run",
        path.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        // Greedy: a sampled answer depends on the last bits of the logits, which differ
        // between x86 and ARM kernels (seed 1 answered "Estée Lauder…" on aarch64).
        "--temperature",
        "0",
        "-n",
        "32",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Paris"), "answer without Paris: {stdout}");
    for key in [
        "total duration:",
        "load duration:",
        "prompt eval count:",
        "prompt eval duration:",
        "eval count:",
        "eval duration:",
    ] {
        assert!(stderr.contains(key), "{key} missing:\n{stderr}");
    }
    assert!(rate(&stderr, "prompt eval rate:") > 0.0);
    assert!(rate(&stderr, "eval rate:") > 0.0);
    assert!(stderr.contains("time to first token:"));
}

#[test]
fn chat_repl_reuses_the_cache_between_turns() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let mut child = repl(&path, &["-n", "24"]);
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Germany?\n/bye\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("eval rate:").count(),
        4,
        "two answers:\n{stderr}"
    );
    // The second answer evaluates only the new turn; the first turn's tokens come from the cache.
    let cached: usize = stderr
        .lines()
        .find_map(|l| l.strip_prefix("prompt cached:"))
        .expect("second turn reports cached tokens")
        .trim()
        .trim_end_matches(" token(s)")
        .parse()
        .unwrap();
    assert!(cached > 30, "{cached} cached tokens:\n{stderr}");
}

#[test]
fn bad_files_and_catalogs_fail_cleanly_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = common::tokentop(&["run", bad.to_str().unwrap(), "--prompt", "hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tokentop: error:") && stderr.contains("corrupt or truncated"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let toml = dir.path().join("models.toml");
    std::fs::write(&toml, "default = \"a\"\n[[model]]\nid = \"a\"\n").unwrap();
    let out = common::tokentop(&["--catalog", toml.to_str().unwrap(), "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("models.toml is invalid") && stderr.contains("missing field"),
        "{stderr}"
    );

    let out = common::tokentop(&["run", "no-such-model", "--prompt", "hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown model \"no-such-model\""),
        "{stderr}"
    );
}

#[test]
fn chat_repl_names_reset_when_the_context_is_full() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let mut child = repl(&path, &["-n", "8", "--ctx", "64"]);
    use std::io::Write;
    let long = "the cat sat on the mat ".repeat(30);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{long}\n/reset\nHi\n/bye\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let refusal = stderr
        .lines()
        .find(|l| l.contains("context holds 64"))
        .unwrap_or_else(|| panic!("no refusal:\n{stderr}"));
    assert!(
        refusal.contains("/reset starts a new conversation") && !refusal.contains("shorten"),
        "{refusal}"
    );
    // After /reset the short prompt is answered.
    assert_eq!(stderr.matches("eval rate:").count(), 2, "{stderr}");
}

/// A refused prompt offers /drop; /drop forgets the oldest exchange (the first prompt and its
/// answer), and the same prompt then fits and is answered.
#[test]
fn chat_repl_drops_the_oldest_exchange_to_make_room() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let mut child = repl(&path, &["-n", "8", "--ctx", "64"]);
    use std::io::Write;
    let mid = "the cat sat on the mat the cat sat on the mat";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("Hi\nHello there\n{mid}\n/drop\n{mid}\n/bye\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let refusal = stderr
        .lines()
        .position(|l| l.contains("context holds 64") && l.contains("/drop forgets the oldest"))
        .unwrap_or_else(|| panic!("no refusal offering /drop:\n{stderr}"));
    let lines: Vec<&str> = stderr.lines().collect();
    let dropped = lines
        .iter()
        .position(|l| l.contains("dropped the oldest exchange ("))
        .unwrap_or_else(|| panic!("no drop of \"Hi\" and its answer:\n{stderr}"));
    assert!(dropped > refusal);
    // Answered: Hi, Hello there, and the prompt again after the drop.
    let answers: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("eval rate:"))
        .collect();
    assert_eq!(answers.len(), 3, "{stderr}");
    assert!(answers[2] > dropped, "{stderr}");
}

/// `tokentop run MODEL` as a line-by-line chat (greedy), with its pipes open.
fn repl(path: &std::path::Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_tokentop"))
        .args(["run", path.to_str().unwrap(), "--temperature", "0"])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}
