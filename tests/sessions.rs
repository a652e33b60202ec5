//! Session files survive what a real disk does to them: a torn last line (a crash or a full
//! disk mid-write) and bytes that are not UTF-8 lose only the damaged line.

use std::io::Write;
use tokentop::protocol::Role;
use tokentop::session::{self, SessionFile};
use tokentop::state::ChatEntry;

fn entry(role: Role, text: &str) -> ChatEntry {
    ChatEntry {
        role,
        text: text.into(),
        model: if role == Role::User { "" } else { "SmolLM2" }.into(),
        footer: None,
    }
}

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
