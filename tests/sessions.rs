//! Session files survive what a real disk does to them: a torn last line (a crash or a full
//! disk mid-write) and bytes that are not UTF-8 lose only the damaged line.

mod common;

use common::entry;
use std::io::Write;
use tokentop::protocol::Role;
use tokentop::session::{self, SessionFile};
use tokentop::state::ChatEntry;

fn append_raw(path: &std::path::Path, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

#[test]
fn append_after_a_torn_line_keeps_the_new_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SessionFile::new(dir.path().join("sessions"));
    let (q, a) = (entry(Role::User, "hi"), entry(Role::Assistant, "hello"));
    s.append(&q).unwrap();
    s.append(&a).unwrap();
    let path = s.path().unwrap().to_owned();
    // The crash: half an entry and no newline.
    append_raw(&path, b"{\"role\":\"user\",\"text\":\"half");
    // The next run reopens the session and goes on.
    let mut s = SessionFile::new(dir.path().join("sessions"));
    s.reopen(path.clone());
    let next = entry(Role::User, "still there?");
    s.append(&next).unwrap();
    assert_eq!(session::load(&path).unwrap(), vec![q, a, next]);
    // Only the torn line gained a newline: the good lines are untouched, one entry a line.
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.ends_with('\n'));
}

#[test]
fn append_to_a_whole_file_adds_no_blank_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SessionFile::new(dir.path().join("sessions"));
    s.append(&entry(Role::User, "a")).unwrap();
    s.append(&entry(Role::Assistant, "b")).unwrap();
    let text = std::fs::read_to_string(s.path().unwrap()).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(!text.contains("\n\n"), "{text:?}");
}

#[test]
fn a_line_that_is_not_utf8_loses_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SessionFile::new(dir.path().join("sessions"));
    let q = entry(Role::User, "question");
    s.append(&q).unwrap();
    let path = s.path().unwrap().to_owned();
    // A bit flip inside an entry's text: 0xff is never valid UTF-8.
    append_raw(
        &path,
        b"{\"role\":\"assistant\",\"text\":\"bad \xff byte\",\"model\":\"m\",\"footer\":null}\n",
    );
    let a = entry(Role::Assistant, "answer");
    s.append(&a).unwrap();
    assert!(std::str::from_utf8(&std::fs::read(&path).unwrap()).is_err());
    assert_eq!(session::load(&path).unwrap(), vec![q, a]);
}

fn answer(model: &str, text: &str) -> ChatEntry {
    ChatEntry {
        model: model.into(),
        ..entry(Role::Assistant, text)
    }
}

#[test]
fn a_summary_has_the_first_prompt_date_models_and_turns() {
    let entries = [
        entry(Role::User, "\n  Why is the sky blue?  \nAnswer briefly."),
        answer("SmolLM2 135M", "Rayleigh scattering."),
        entry(Role::User, "And sunsets?"),
        answer("Gemma 3 270M", "Longer path."),
        entry(Role::User, "Thanks"),
        answer("SmolLM2 135M", "You're welcome."),
    ];
    // 2026-11-24 18:02:30 UTC.
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_543_350);
    let s = session::summarize(
        "/s/session-1.jsonl".into(),
        &entries,
        at,
        &jiff::tz::TimeZone::UTC,
    );
    assert_eq!(s.title, "Why is the sky blue?");
    assert_eq!(s.date, "2026-11-24 18:02");
    assert_eq!(s.models, ["SmolLM2 135M", "Gemma 3 270M"]);
    assert_eq!(s.turns, 3);
    // A long first prompt is cut; a session without one is named by its file.
    let long = [entry(Role::User, &"word ".repeat(40))];
    let s = session::summarize("/s/x.jsonl".into(), &long, at, &jiff::tz::TimeZone::UTC);
    assert_eq!(s.title.chars().count(), 40);
    assert!(s.title.ends_with('…'));
    let s = session::summarize(
        "/s/session-7.jsonl".into(),
        &[],
        at,
        &jiff::tz::TimeZone::UTC,
    );
    assert_eq!((s.title.as_str(), s.turns), ("session-7", 0));
}

#[test]
fn the_session_list_is_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, prompt: &str, secs: u64| {
        let path = dir.path().join(name);
        let mut s = SessionFile::new(dir.path().to_owned());
        s.reopen(path.clone());
        s.append(&entry(Role::User, prompt)).unwrap();
        s.append(&answer("SmolLM2", "ok")).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .unwrap();
    };
    // The oldest file was written to last (reopened), so it is the newest session.
    write("session-100.jsonl", "reopened yesterday", 1_795_400_000);
    write("session-200.jsonl", "a week ago", 1_795_000_000);
    write("session-300.jsonl", "two days ago", 1_795_300_000);
    let titles: Vec<_> = session::summaries(dir.path())
        .into_iter()
        .map(|s| s.title)
        .collect();
    assert_eq!(titles, ["reopened yesterday", "two days ago", "a week ago"]);
}
