//! Private files: what tokentop writes (the data dir, sessions, exports, a model being
//! assembled) is for the user alone: 0700 directories and 0600 files on Unix, and existing
//! ones are tightened. Also the two guards that keep a conversation out of error text:
//! `redact` for error messages that may quote it and a panic hook that withholds the message.
//! Off Unix the permission calls do nothing beyond the plain file operation.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Creates `dir` and any missing parents, user-only. Existing folders are left as they are
/// (see `tighten` for those).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Opens `path` for writing with `opts` (create/append/truncate chosen by the caller), the
/// file user-only whether it is new or was already there.
fn open_private(path: &Path, opts: &mut OpenOptions) -> io::Result<File> {
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(opts, 0o600);
    let f = opts.open(path)?;
    // The mode above only applies to a file this call creates.
    restrict(&f)?;
    Ok(f)
}

/// Creates (or truncates) `path` as a user-only file.
pub fn create_file(path: &Path) -> io::Result<File> {
    open_private(
        path,
        OpenOptions::new().write(true).create(true).truncate(true),
    )
}

/// Opens `path` for appending, creating it user-only.
pub fn append_file(path: &Path) -> io::Result<File> {
    open_private(path, OpenOptions::new().create(true).append(true))
}

/// Writes `contents` to a user-only `path`.
pub fn write(path: &Path, contents: impl AsRef<[u8]>) -> io::Result<()> {
    use std::io::Write;
    create_file(path)?.write_all(contents.as_ref())
}

/// Takes the group and other permission bits off an open file or folder.
fn restrict(f: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = f.metadata()?.permissions().mode();
        if mode & 0o077 != 0 {
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7700))?;
        }
    }
    let _ = f;
    Ok(())
}

/// Takes the group and other permission bits off an existing file or folder (a 0755 folder
/// becomes 0700, a 0644 file 0600). A path that does not exist is fine; symbolic links are
/// not followed.
pub fn tighten(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mode = meta.permissions().mode();
        if !meta.file_type().is_symlink() && mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7700))?;
        }
    }
    let _ = path;
    Ok(())
}

/// `tighten` for a folder and the plain files directly inside it.
pub fn tighten_tree(dir: &Path) -> io::Result<()> {
    tighten(dir)?;
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            tighten(&entry.path())?;
        }
    }
    Ok(())
}

/// An error message with every quoted piece of the user's text replaced by `[your text]`:
/// the whole text, and each of its lines long enough to be recognisable. Errors from
/// libraries (a chat template's `raise_exception`, a tokenizer) may quote their input; the
/// rest of the message (what went wrong, where) is kept.
pub fn redact<'a>(message: &str, texts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = message.to_string();
    let mut pieces: Vec<&str> = Vec::new();
    for t in texts {
        pieces.push(t);
        pieces.extend(t.lines());
    }
    // Longest first, so a whole text goes before the lines inside it.
    pieces.retain(|p| p.trim().chars().count() >= 4);
    pieces.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in pieces {
        out = out.replace(p, "[your text]");
        let trimmed = p.trim();
        if trimmed.chars().count() >= 4 {
            out = out.replace(trimmed, "[your text]");
        }
    }
    out
}

/// Replaces the panic hook with one that prints where the panic happened but not its
/// message, which can quote the conversation (a string slice out of bounds prints the
/// string). `TOKENTOP_SHOW_PANICS=1` keeps Rust's full message, for debugging. Install it
/// before the terminal's own hook (ratatui's init), which restores the screen and then
/// calls this one.
pub fn hide_panic_messages() {
    if std::env::var_os("TOKENTOP_SHOW_PANICS").is_some_and(|v| v == "1") {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map_or("an unknown place".to_string(), |l| l.to_string());
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        // writeln! rather than eprintln!, which panics (inside the hook: aborts) when
        // stderr is closed.
        let _ = writeln!(
            std::io::stderr(),
            "tokentop: thread '{thread}' panicked at {at} (a bug; the message is withheld as it may quote your conversation, TOKENTOP_SHOW_PANICS=1 shows it)"
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[cfg(unix)]
    #[test]
    fn new_files_and_folders_are_user_only_and_old_ones_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let nested = d.path().join("a/b");
        create_dir_all(&nested).unwrap();
        assert_eq!(mode(&d.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        let f = nested.join("x.md");
        write(&f, "secret").unwrap();
        assert_eq!(mode(&f), 0o600);
        // An existing world-readable file keeps its content on append and loses the bits.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        append_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        std::fs::set_permissions(&nested, std::fs::Permissions::from_mode(0o755)).unwrap();
        tighten_tree(&nested).unwrap();
        assert_eq!((mode(&nested), mode(&f)), (0o700, 0o600));
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "secret");
        tighten(&d.path().join("missing")).unwrap();
    }

    #[test]
    fn redact_removes_quoted_text_and_keeps_the_rest() {
        let msg = "invalid operation: cannot convert 'my bank PIN is 1234' (in chat:3)";
        assert_eq!(
            redact(msg, ["my bank PIN is 1234"]),
            "invalid operation: cannot convert '[your text]' (in chat:3)"
        );
        // One line of a multi-line prompt is caught too; tiny words are not scrubbed.
        let msg = "unexpected 'second line here' near 'ok'";
        assert_eq!(
            redact(msg, ["first\nsecond line here", "ok"]),
            "unexpected '[your text]' near 'ok'"
        );
    }
}
