//! The Hugging Face side of the catalog: where the hub's cache lives, what is in it, and a
//! download into it that survives a bad connection.
//!
//! The cache is laid out as `huggingface_hub` (Python) writes it, so both share files:
//! `models--ORG--NAME/blobs/<etag>` holds the bytes, `snapshots/<commit>/<file>` is a relative
//! symlink to the blob, `refs/<branch>` names the commit. A download is written to
//! `blobs/<etag>.incomplete` (the Python client's name, so either one resumes what the other
//! left) and resumed with `Range: bytes=N-`; the blob is renamed into place only after its
//! size and sha256 were checked.
//!
//! Written here rather than with hf-hub: its sync client appends whatever a range request
//! returns (a 200 with the whole file after a partial corrupts the blob), never checks the
//! sha256, ignores `HF_HUB_CACHE`, and has no read timeout, so a stalled connection hangs.

use super::fetch::Report;
use anyhow::{anyhow, bail, Context, Result};
use indicatif::ProgressStyle;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Attempts in a row that may fail without a byte of progress before a download gives up.
const MAX_STALLED_ATTEMPTS: u32 = 4;
/// A connection that sends nothing for this long is dropped and the download resumed.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The hub cache folder, read as `huggingface_hub` reads it: `HF_HUB_CACHE` (or the older
/// `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn cache_root() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(PathBuf::from(p));
    }
    Some(hf_home()?.join("hub"))
}

/// `HF_HOME`, else `XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("HF_HOME") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(p).join("huggingface"));
    }
    Some(
        directories::BaseDirs::new()?
            .home_dir()
            .join(".cache/huggingface"),
    )
}

/// `HF_ENDPOINT` without a trailing slash, else the hub.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .map_or_else(
            || "https://huggingface.co".to_string(),
            |e| e.trim().trim_end_matches('/').to_string(),
        )
}

/// The user's token: `HF_TOKEN`, else the file `huggingface-cli login` writes.
fn token() -> Option<String> {
    let t = std::env::var("HF_TOKEN").ok().or_else(|| {
        let path = std::env::var_os("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .or_else(|| Some(hf_home()?.join("token")))?;
        fs::read_to_string(path).ok()
    })?;
    let t = t.trim().to_string();
    (!t.is_empty() && t.chars().all(|c| c.is_ascii_graphic())).then_some(t)
}

/// The cache folder of a model repository (`org/name` was checked by the catalog parser).
fn repo_dir(root: &Path, repo: &str) -> PathBuf {
    root.join(format!("models--{}", repo.replace('/', "--")))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A file of the cache for `repo` at `revision` (a branch, or a commit), if present and,
/// after following every symlink, a regular file inside the cache.
pub fn cache_get(repo: &str, revision: Option<&str>, file: &str) -> Option<PathBuf> {
    let root = cache_root()?;
    let dir = repo_dir(&root, repo);
    let rev = revision.unwrap_or("main");
    let commit = match fs::read_to_string(dir.join("refs").join(rev)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if is_hex(rev, 40) => rev.to_string(),
        Err(_) => return None,
    };
    // One plain folder name (a ref is text anyone could have written); `inside` then
    // checks where the file really is.
    if commit.is_empty() || commit.starts_with('.') || commit.contains(['/', '\\']) {
        return None;
    }
    inside(&root, &dir.join("snapshots").join(commit).join(file))
}

/// `path` if it is, after following every symlink, a regular file inside `root`.
pub fn inside(root: &Path, path: &Path) -> Option<PathBuf> {
    let root = root.canonicalize().ok()?;
    let real = path.canonicalize().ok()?;
    (real.starts_with(&root) && real.is_file()).then(|| path.to_owned())
}

/// What the hub says about one file before it is downloaded.
#[derive(Debug)]
struct Remote {
    file: String,
    url: String,
    commit: String,
    /// The blob's name: the sha256 of an LFS file, the git sha1 of a small one.
    etag: String,
    size: u64,
}

fn agent(redirects: u32) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .redirects(redirects)
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout_read(READ_TIMEOUT)
        .build()
}

fn with_token(req: ureq::Request) -> ureq::Request {
    match token() {
        Some(t) => req.set("Authorization", &format!("Bearer {t}")),
        None => req,
    }
}

/// One line for a failed request: the status and URL, or the transport error.
fn describe(url: &str, e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(401, _) | ureq::Error::Status(403, _) => {
            anyhow!("{url}: access denied (a gated or private repository needs HF_TOKEN)")
        }
        ureq::Error::Status(404, _) => anyhow!("{url}: not found"),
        ureq::Error::Status(code, r) => anyhow!("{url}: HTTP {code} {}", r.status_text()),
        ureq::Error::Transport(t) => anyhow!("{url}: {t}"),
    }
}

/// A HEAD request on the resolve URL, following only the hub's own relative redirects (a
/// renamed repository): an LFS file answers with a redirect to its CDN that carries
/// `X-Linked-Etag` and `X-Linked-Size`, a small file with `ETag` and `Content-Length`.
fn head(repo: &str, revision: &str, file: &str) -> Result<Remote> {
    let base = endpoint();
    let url = format!("{base}/{repo}/resolve/{revision}/{file}");
    let agent = agent(0);
    let mut at = url.clone();
    for _ in 0..5 {
        let resp = with_token(agent.head(&at))
            .set("Accept-Encoding", "identity")
            .call()
            .map_err(|e| describe(&at, e))?;
        let location = resp.header("location").unwrap_or("");
        if (300..400).contains(&resp.status()) && location.starts_with('/') {
            at = format!("{base}{location}");
            continue;
        }
        let header = |name: &str| resp.header(name).map(|v| v.trim().to_string());
        let commit = header("x-repo-commit")
            .ok_or_else(|| anyhow!("{url}: the server sent no X-Repo-Commit header"))?;
        if !is_hex(&commit, 40) {
            bail!("{url}: the server sent a malformed commit \"{commit:.50}\"");
        }
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .ok_or_else(|| anyhow!("{url}: the server sent no ETag header"))?;
        let etag = etag
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_lowercase();
        if !is_hex(&etag, 64) && !is_hex(&etag, 40) {
            bail!("{url}: the server sent a malformed ETag \"{etag:.80}\"");
        }
        let size = header("x-linked-size")
            .or_else(|| header("content-length"))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("{url}: the server sent no file size"))?;
        if size > super::validate::MAX_SIZE {
            bail!("{url}: the server says the file is {size} bytes, more than 2 TiB");
        }
        return Ok(Remote {
            file: file.to_string(),
            url,
            commit,
            etag,
            size,
        });
    }
    bail!("{url}: too many redirects")
}

/// Downloads `files` of `repo` into the cache, in order, with one progress bar for all of
/// them, and returns their snapshot paths. Files already in the cache are not fetched
/// again. `expect_size` (the catalog's size of all files together, and whether it is only
/// approximate) is checked against what the hub says before anything is downloaded.
pub fn download(
    repo: &str,
    revision: Option<&str>,
    files: &[String],
    expect_size: (u64, bool),
    report: Report,
) -> Result<Vec<PathBuf>> {
    let root = cache_root().context("no home directory for the Hugging Face cache")?;
    let rev = revision.unwrap_or("main");
    let remotes = files
        .iter()
        .map(|f| head(repo, rev, f))
        .collect::<Result<Vec<_>>>()?;
    let total: u64 = remotes.iter().map(|r| r.size).sum();
    let (size, approx) = expect_size;
    if !super::size_matches(size, approx, total) {
        bail!(
            "Hugging Face {repo} has {} bytes in {}, the catalog expects {}{size}",
            total,
            files.join(" + "),
            if approx { "about " } else { "" }
        );
    }
    // In the TUI (quiet) the bar is hidden but read by the switcher (bytes, rate, ETA).
    let bar = super::fetch::progress_bar(report, total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let dir = repo_dir(&root, repo);
    let mut paths = Vec::new();
    let mut before = 0u64;
    for (i, r) in remotes.iter().enumerate() {
        let name = r.file.rsplit('/').next().unwrap_or(&r.file);
        bar.set_message(if remotes.len() > 1 {
            format!("{name} ({}/{})", i + 1, remotes.len())
        } else {
            name.to_string()
        });
        let blob = dir.join("blobs").join(&r.etag);
        if !fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == r.size) {
            fetch_blob(
                &root,
                repo,
                r,
                &blob,
                &|n| bar.set_position(before + n),
                report,
            )?;
        }
        before += r.size;
        bar.set_position(before);
        paths.push(link(&root, &dir, r, rev)?);
    }
    bar.finish_and_clear();
    Ok(paths)
}

/// Points `snapshots/<commit>/<file>` at the blob and `refs/<revision>` at the commit.
fn link(root: &Path, dir: &Path, r: &Remote, rev: &str) -> Result<PathBuf> {
    let pointer = dir.join("snapshots").join(&r.commit).join(&r.file);
    let parent = pointer.parent().expect("a file in a folder");
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    // From snapshots/<commit>/a/b.gguf up to the repo folder: one `..` per folder below it.
    let depth = r.file.matches('/').count() + 2;
    let target = PathBuf::from("../".repeat(depth))
        .join("blobs")
        .join(&r.etag);
    let _ = fs::remove_file(&pointer);
    symlink_or_copy(&target, &dir.join("blobs").join(&r.etag), &pointer)?;
    if rev != r.commit {
        let refs = dir.join("refs");
        fs::create_dir_all(&refs).with_context(|| format!("cannot create {}", refs.display()))?;
        fs::write(refs.join(rev), &r.commit)
            .with_context(|| format!("cannot write {}", refs.join(rev).display()))?;
    }
    inside(root, &pointer).ok_or_else(|| {
        anyhow!(
            "{} does not lead to the downloaded file inside the Hugging Face cache",
            pointer.display()
        )
    })
}

#[cfg(unix)]
fn symlink_or_copy(target: &Path, _blob: &Path, pointer: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, pointer)
        .with_context(|| format!("cannot create the link {}", pointer.display()))
}

/// Windows without developer mode cannot make symlinks: the blob is moved to the snapshot,
/// as huggingface_hub does there.
#[cfg(not(unix))]
fn symlink_or_copy(_target: &Path, blob: &Path, pointer: &Path) -> Result<()> {
    fs::rename(blob, pointer).with_context(|| format!("cannot move to {}", pointer.display()))
}

/// Downloads one blob into `<blob>.incomplete`, resuming what is there, then checks and
/// renames it.
fn fetch_blob(
    root: &Path,
    repo: &str,
    r: &Remote,
    blob: &Path,
    progress: &dyn Fn(u64),
    report: Report,
) -> Result<()> {
    let blobs = blob.parent().expect("blobs folder");
    fs::create_dir_all(blobs).with_context(|| format!("cannot create {}", blobs.display()))?;
    // huggingface_hub's lock for the same blob, so a Python download of it waits for us.
    let locks = root
        .join(".locks")
        .join(format!("models--{}", repo.replace('/', "--")));
    fs::create_dir_all(&locks).with_context(|| format!("cannot create {}", locks.display()))?;
    let lock_path = locks.join(format!("{}.lock", r.etag));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;

    let partial = blob.with_file_name(format!("{}.incomplete", r.etag));
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    let have = file.metadata()?.len();
    if have > r.size {
        file.set_len(0)?;
    } else if have > 0 {
        report.say(format_args!(
            "resuming {} at {:.1} of {:.1} GB",
            r.file,
            have as f64 / 1e9,
            r.size as f64 / 1e9
        ));
    }
    let mut hasher = Sha256::new();
    let mut hashed = 0u64;
    let mut stalled = 0;
    loop {
        let have = file.metadata()?.len();
        if have == r.size {
            break;
        }
        if hashed != have {
            // The bytes on disk from an earlier attempt or run are hashed once, here.
            hasher = Sha256::new();
            file.seek(SeekFrom::Start(0))?;
            std::io::copy(&mut (&mut file).take(have), &mut hasher)
                .with_context(|| format!("cannot read {}", partial.display()))?;
            hashed = have;
        }
        progress(have);
        match attempt(r, &mut file, have, &mut hasher, &mut hashed, progress) {
            Ok(()) => {}
            Err(e) => {
                if hashed > have {
                    stalled = 0;
                } else {
                    stalled += 1;
                }
                if e.is::<Changed>() || stalled >= MAX_STALLED_ATTEMPTS {
                    if e.is::<Changed>() {
                        let _ = fs::remove_file(&partial);
                    }
                    return Err(e.context(format!(
                        "downloading {}{}",
                        r.file,
                        if partial.exists() {
                            format!(" (the {hashed} bytes so far are kept in {}; the next pull resumes there)", partial.display())
                        } else {
                            String::new()
                        }
                    )));
                }
                report.say(format_args!("{:#}; resuming", e));
                std::thread::sleep(Duration::from_millis(500 * (1 << stalled.min(4))));
            }
        }
    }
    file.sync_all()?;
    if hashed != r.size {
        hasher = Sha256::new();
        file.seek(SeekFrom::Start(0))?;
        std::io::copy(&mut file, &mut hasher)?;
    }
    drop(file);
    if r.etag.len() == 64 {
        let got = hex::encode(hasher.finalize());
        if got != r.etag {
            let _ = fs::remove_file(&partial);
            bail!(
                "the download of {} has sha256 {got}, Hugging Face says {}; removed it, the next pull starts over",
                r.file,
                r.etag
            );
        }
    }
    fs::rename(&partial, blob)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), blob.display()))?;
    Ok(())
}

/// The file changed on the hub while it was downloaded: what is on disk is of no use.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Changed(String);

/// One GET from byte `have` to the end, appended to `file` and to `hasher`.
fn attempt(
    r: &Remote,
    file: &mut File,
    have: u64,
    hasher: &mut Sha256,
    hashed: &mut u64,
    progress: &dyn Fn(u64),
) -> Result<()> {
    let mut req = with_token(agent(5).get(&r.url)).set("Accept-Encoding", "identity");
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        // The range starts at the end: the partial is longer than the file is now.
        Err(ureq::Error::Status(416, _)) => {
            file.set_len(0)?;
            *hashed = 0;
            *hasher = Sha256::new();
            return Err(Changed(format!(
                "{}: the server refused to resume at byte {have}",
                r.url
            ))
            .into());
        }
        other => other.map_err(|e| describe(&r.url, e))?,
    };
    let mut at = match resp.status() {
        206 => {
            // `bytes START-END/TOTAL`: resume only where we asked, of a file of the same size.
            let range = resp.header("content-range").unwrap_or("").to_string();
            let parsed = range
                .strip_prefix("bytes ")
                .and_then(|s| s.split_once('/'))
                .and_then(|(span, total)| {
                    let start = span.split_once('-')?.0.parse::<u64>().ok()?;
                    Some((start, total.parse::<u64>().ok()?))
                });
            match parsed {
                Some((start, total)) if start == have && total == r.size => have,
                Some((_, total)) if total != r.size => {
                    return Err(Changed(format!(
                        "{} changed on the server while downloading ({total} bytes, was {}); run the pull again to start over",
                        r.file, r.size
                    ))
                    .into())
                }
                _ => bail!("{}: unexpected Content-Range \"{range:.80}\"", r.url),
            }
        }
        200 => {
            // The server ignored the range (or this is the first attempt): start from zero.
            file.set_len(0)?;
            *hasher = Sha256::new();
            *hashed = 0;
            0
        }
        code => bail!("{}: unexpected HTTP {code}", r.url),
    };
    file.seek(SeekFrom::Start(at))?;
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| anyhow!("{}: connection lost at byte {at}: {e}", r.file))?;
        if n == 0 {
            break;
        }
        if at + n as u64 > r.size {
            file.set_len(0)?;
            *hashed = 0;
            *hasher = Sha256::new();
            return Err(Changed(format!(
                "{}: the server sent more than the {} bytes it announced",
                r.file, r.size
            ))
            .into());
        }
        file.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        at += n as u64;
        *hashed = at;
        progress(at);
    }
    if at != r.size {
        bail!("{}: connection closed at byte {at} of {}", r.file, r.size);
    }
    Ok(())
}
