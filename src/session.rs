//! Conversations saved as they happen: one JSON line per chat entry, appended and flushed, so
//! a crash or kill -9 loses at most the answer in flight. Exported to Markdown on request.

use crate::protocol::Role;
use crate::state::{ChatEntry, SessionSummary};
use crate::ui::footer_text;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `$TOKENTOP_HOME/sessions`, else the platform data dir's `sessions`.
pub fn sessions_dir() -> Result<PathBuf> {
    Ok(crate::catalog::data_dir()?.join("sessions"))
}

/// A session file, created on the first entry.
pub struct SessionFile {
    dir: PathBuf,
    path: Option<PathBuf>,
}

impl SessionFile {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, path: None }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Continue appending to an existing session.
    pub fn reopen(&mut self, path: PathBuf) {
        self.path = Some(path);
    }

    /// The next entry starts a new file.
    pub fn restart(&mut self) {
        self.path = None;
    }

    pub fn append(&mut self, entry: &ChatEntry) -> Result<()> {
        let path = match &self.path {
            Some(p) => p.clone(),
            None => {
                crate::private::create_dir_all(&self.dir)
                    .with_context(|| format!("creating {}", self.dir.display()))?;
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                let p = self.dir.join(format!("session-{secs}.jsonl"));
                self.path = Some(p.clone());
                p
            }
        };
        let mut f = crate::private::append_file(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut line = String::new();
        // A torn last line (a crash or a full disk mid-write) must not swallow this entry.
        if !ends_with_newline(&path).with_context(|| format!("reading {}", path.display()))? {
            line.push('\n');
        }
        line.push_str(&serde_json::to_string(entry)?);
        line.push('\n');
        f.write_all(line.as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// Whether `path` is empty or ends with a newline.
fn ends_with_newline(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    if f.metadata()?.len() == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Reads a session back. Entries are whole conversation turns; an answer saved after it
/// finished replaces the placeholder of its turn. A line that is not a whole entry (a torn
/// line from a crash mid-write, a line that is not UTF-8) is skipped; the others are kept.
pub fn load(path: &Path) -> Result<Vec<ChatEntry>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<ChatEntry>(l).ok())
        .collect())
}

/// At start: the data dir (`dir`'s parent), `dir` and every file in it lose their group and
/// other permissions, so conversations saved by an older tokentop (or copied in) are private
/// too.
pub fn make_private(dir: &Path) -> Result<()> {
    if let Some(data) = dir.parent() {
        crate::private::tighten(data)
            .with_context(|| format!("cannot make {} private", data.display()))?;
    }
    crate::private::tighten_tree(dir)
        .with_context(|| format!("cannot make {} private", dir.display()))
}

/// Writes the conversation as Markdown beside its session file (or as `conversation.md` in
/// `dir` before anything was saved), user-only; returns where.
pub fn export(entries: &[ChatEntry], session: Option<&Path>, dir: &Path) -> Result<PathBuf> {
    let path = match session {
        Some(p) => p.with_extension("md"),
        None => dir.join("conversation.md"),
    };
    crate::private::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::private::write(&path, to_markdown(entries))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Saved sessions, newest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.reverse();
    v
}

/// Saved sessions as the session list shows them, the most recently written first.
pub fn summaries(dir: &Path) -> Vec<SessionSummary> {
    let tz = jiff::tz::TimeZone::system();
    let mut v: Vec<(std::time::SystemTime, SessionSummary)> = list(dir)
        .into_iter()
        .map(|path| {
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            let entries = load(&path).unwrap_or_default();
            (modified, summarize(path, &entries, modified, &tz))
        })
        .collect();
    // Newest first; `list` already orders equal times by name, newest first.
    v.sort_by_key(|a| std::cmp::Reverse(a.0));
    v.into_iter().map(|(_, s)| s).collect()
}

/// The title, date, models and turn count of one session.
pub fn summarize(
    path: PathBuf,
    entries: &[ChatEntry],
    modified: std::time::SystemTime,
    tz: &jiff::tz::TimeZone,
) -> SessionSummary {
    const TITLE_CHARS: usize = 40;
    let first = entries
        .iter()
        .find(|e| e.role == Role::User)
        .and_then(|e| e.text.lines().map(str::trim).find(|l| !l.is_empty()));
    let title = match first {
        Some(t) if t.chars().count() > TITLE_CHARS => {
            format!("{}…", t.chars().take(TITLE_CHARS - 1).collect::<String>())
        }
        Some(t) => t.to_string(),
        None => path
            .file_stem()
            .map_or(String::new(), |s| s.to_string_lossy().into_owned()),
    };
    let mut models: Vec<String> = Vec::new();
    for e in entries.iter().filter(|e| e.role != Role::User) {
        if !e.model.is_empty() && !models.contains(&e.model) {
            models.push(e.model.clone());
        }
    }
    let date = jiff::Timestamp::try_from(modified)
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%d %H:%M")
                .to_string()
        })
        .unwrap_or_default();
    SessionSummary {
        path,
        title,
        date,
        models,
        turns: entries.iter().filter(|e| e.role == Role::User).count(),
    }
}

pub fn to_markdown(entries: &[ChatEntry]) -> String {
    let mut out = String::from("# tokentop conversation\n\n");
    for e in entries {
        match e.role {
            Role::User => out.push_str(&format!("## You\n\n{}\n\n", e.text)),
            // A note with no model (an A/B run's prompt, turns dropped from the context).
            Role::System if e.model.is_empty() => out.push_str(&format!("{}\n\n", e.text)),
            _ => {
                out.push_str(&format!("## {}\n\n", e.model));
                // A thinking block folds away in Markdown viewers, as it does in the chat.
                let parts = crate::think::split(&e.text);
                if let Some(thought) = parts.thought {
                    out.push_str(&format!(
                        "<details><summary>Thinking</summary>\n\n{thought}\n\n</details>\n\n"
                    ));
                }
                out.push_str(&format!("{}\n\n", parts.answer));
                if let Some(f) = &e.footer {
                    out.push_str(&format!("*{}*\n\n", footer_text(f)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FinishReason;
    use crate::state::Footer;
    use std::time::Duration;

    #[test]
    fn append_reload_and_export() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SessionFile::new(dir.path().join("sessions"));
        let user = ChatEntry {
            role: Role::User,
            text: "hi".into(),
            model: String::new(),
            footer: None,
        };
        let answer = ChatEntry {
            role: Role::Assistant,
            text: "hello **there**".into(),
            model: "SmolLM2".into(),
            footer: Some(Footer {
                ttft: Duration::from_millis(250),
                prefill_rate: 100.0,
                decode_rate: 20.0,
                tokens: 5,
                reason: FinishReason::Eos,
                joules: None,
                peak_rss: 1,
                thinking: None,
            }),
        };
        s.append(&user).unwrap();
        s.append(&answer).unwrap();
        let path = s.path().unwrap().to_owned();
        // A torn line from a crash mid-write is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"role\":\"us")
            .unwrap();
        assert_eq!(load(&path).unwrap(), vec![user.clone(), answer.clone()]);
        assert_eq!(list(&dir.path().join("sessions")), vec![path]);
        let md = to_markdown(&[user, answer]);
        assert!(
            md.contains("## You\n\nhi") && md.contains("## SmolLM2\n\nhello **there**"),
            "{md}"
        );
        assert!(md.contains("decode 20.0 tok/s"), "{md}");
        // Notes: an A/B prompt is a line of its own, an A/B answer is headed by its model.
        let note = ChatEntry {
            role: Role::System,
            text: "**A/B** of: hi".into(),
            model: String::new(),
            footer: None,
        };
        let b = ChatEntry {
            role: Role::System,
            text: "B".into(),
            model: "Gemma 3".into(),
            footer: None,
        };
        let md = to_markdown(&[note, b]);
        assert!(md.contains("\n**A/B** of: hi\n\n## Gemma 3\n\nB"), "{md}");
        // A thinking block folds away; the answer follows it.
        let thinker = ChatEntry {
            role: Role::Assistant,
            text: "<think>\nhm\n</think>\n\nFour.".into(),
            model: "Qwen3".into(),
            footer: None,
        };
        let md = to_markdown(&[thinker]);
        assert!(
            md.contains(
                "## Qwen3\n\n<details><summary>Thinking</summary>\n\nhm\n\n</details>\n\nFour.\n"
            ),
            "{md}"
        );
    }
}
