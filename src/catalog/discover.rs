//! GGUF models the user already has in other tools' stores, used in place (never copied):
//!
//! - Ollama (`$OLLAMA_MODELS`, else `~/.ollama/models`, and the Linux service's
//!   `/usr/share/ollama/.ollama/models`): `manifests/<registry>/<namespace>/<model>/<tag>`
//!   is a JSON manifest whose layer of media type `application/vnd.ollama.image.model` names
//!   the GGUF as `blobs/sha256-<hex>` (Ollama's server/manifest.go and modelpath.go).
//! - LM Studio (`~/.lmstudio/models`, the folder `~/.lmstudio-home-pointer` names, and the
//!   older `~/.cache/lm-studio/models`): `<publisher>/<repo>/*.gguf`.
//! - The Hugging Face cache (any repository): `models--ORG--NAME/snapshots/<rev>/**.gguf`.
//!
//! Every store is untrusted: a manifest that is not JSON, too large, or names a malformed
//! digest, and a file whose real path (after symlinks) leaves its store, is skipped with a
//! one-line warning. Folders are walked without following symlinks, so a link loop or a link
//! to `/` costs nothing. Vision projectors (`mmproj*`) and the later parts of split GGUFs are
//! not models of their own; a split model is listed once, by its first part.

use serde::Deserialize;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest Ollama manifest read (real ones are under 2 KiB).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// How deep the Hugging Face snapshots are walked (repos keep quants in subfolders).
const MAX_DEPTH: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// tokentop's own model store.
    Store,
    HfCache,
    Ollama,
    LmStudio,
}

impl Origin {
    /// The source column of `list` and the switcher.
    pub fn label(self) -> &'static str {
        match self {
            Origin::Store => "store",
            Origin::HfCache => "hf-cache",
            Origin::Ollama => "ollama",
            Origin::LmStudio => "lmstudio",
        }
    }
}

/// A GGUF found in another tool's store.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub origin: Origin,
    /// What `run` accepts and `list` shows: `ollama:llama3.2:latest`,
    /// `lmstudio:publisher/repo/file.gguf`, `hf:org/name/file.gguf`.
    pub id: String,
    /// The file to load (a split model's first part).
    pub path: PathBuf,
    /// Bytes of the model (all parts of a split one).
    pub size: u64,
    /// The sha256 the store names the file by, when it is content-addressed (Ollama's
    /// blobs, Hugging Face's LFS blobs); not checked here.
    pub sha256: Option<String>,
    /// Whether the model is split over several files.
    pub split: bool,
}

#[derive(Debug, Default)]
pub struct Discovery {
    pub found: Vec<Found>,
    /// One line each: what was skipped and why.
    pub warnings: Vec<String>,
}

impl Discovery {
    pub fn find(&self, id: &str) -> Option<&Found> {
        self.found.iter().find(|f| f.id == id)
    }
}

/// Looks through every store this machine has.
pub fn scan() -> Discovery {
    let mut d = Discovery::default();
    let mut seen = Vec::new();
    for root in ollama_roots() {
        if let Some(real) = fresh(&root, &mut seen) {
            scan_ollama(&root, &real, &mut d);
        }
    }
    for root in lmstudio_roots() {
        if let Some(real) = fresh(&root, &mut seen) {
            scan_lmstudio(&root, &real, &mut d);
        }
    }
    if let Some(root) = super::hf::cache_root() {
        if let Some(real) = fresh(&root, &mut seen) {
            scan_hf(&real, &mut d);
        }
    }
    d
}

/// The real path of a store folder not scanned yet (two settings may name one folder).
fn fresh(root: &Path, seen: &mut Vec<PathBuf>) -> Option<PathBuf> {
    let real = root.canonicalize().ok().filter(|p| p.is_dir())?;
    if seen.contains(&real) {
        return None;
    }
    seen.push(real.clone());
    Some(real)
}

fn home() -> Option<PathBuf> {
    directories::BaseDirs::new().map(|b| b.home_dir().to_owned())
}

fn ollama_roots() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("OLLAMA_MODELS").filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut roots: Vec<PathBuf> = home()
        .map(|h| h.join(".ollama/models"))
        .into_iter()
        .collect();
    if cfg!(target_os = "linux") {
        roots.push(PathBuf::from("/usr/share/ollama/.ollama/models"));
    }
    roots
}

fn lmstudio_roots() -> Vec<PathBuf> {
    let Some(home) = home() else {
        return Vec::new();
    };
    let mut roots = Vec::new();
    // LM Studio 0.3 writes its (movable) home folder's path into this file.
    if let Ok(p) = fs::read_to_string(home.join(".lmstudio-home-pointer")) {
        let p = PathBuf::from(p.trim());
        if p.is_absolute() {
            roots.push(p.join("models"));
        }
    }
    roots.push(home.join(".lmstudio/models"));
    roots.push(home.join(".cache/lm-studio/models"));
    roots
}

/// Names as read from a folder, skipping names that are not UTF-8 or hold control
/// characters (they would be printed on the terminal), with their file types (symlinks not
/// followed), sorted.
fn entries(dir: &Path) -> Vec<(String, PathBuf, fs::FileType)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    if name.chars().any(char::is_control) {
                        return None;
                    }
                    Some((name, e.path(), e.file_type().ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    entries(dir)
        .into_iter()
        .filter(|(n, _, t)| t.is_dir() && !n.starts_with('.'))
        .map(|(n, p, _)| (n, p))
        .collect()
}

/// `path`'s size if, after following symlinks, it is a regular file inside `root` (a real
/// path) that starts with the GGUF magic; else the reason it is skipped.
fn check_file(root: &Path, path: &Path) -> Result<u64, String> {
    let real = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !real.starts_with(root) {
        return Err(format!(
            "{} leads to {}, outside {}",
            path.display(),
            real.display(),
            root.display()
        ));
    }
    let meta = fs::metadata(&real).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut magic = [0u8; 4];
    let read = File::open(&real).and_then(|mut f| f.read_exact(&mut magic));
    if read.is_err() || &magic != b"GGUF" {
        return Err(format!("{} is not a GGUF file", path.display()));
    }
    Ok(meta.len())
}
/// `(stem, part, count)` of `stem-00001-of-00003.gguf`.
fn split_part(name: &str) -> Option<(&str, u32, u32)> {
    let base = name.strip_suffix(".gguf")?;
    let (rest, count) = base.rsplit_once("-of-")?;
    let (stem, part) = rest.rsplit_once('-')?;
    let (part, count) = (part.parse().ok()?, count.parse().ok()?);
    (part >= 1 && part <= count).then_some((stem, part, count))
}

/// Adds the GGUFs of one folder (a LM Studio repo, a snapshot folder): single files, and
/// split models by their first part with every part's size.
fn add_ggufs(
    root: &Path,
    files: &[(String, PathBuf)],
    origin: Origin,
    id: &dyn Fn(&str) -> String,
    sha: &dyn Fn(&Path) -> Option<String>,
    d: &mut Discovery,
) {
    for (name, path) in files {
        if !name.ends_with(".gguf") || name.starts_with("mmproj") {
            continue;
        }
        let (size, split) = match split_part(name) {
            Some((_, part, _)) if part > 1 => continue,
            Some((stem, _, count)) => {
                let mut total = 0;
                let mut bad = None;
                for i in 1..=count {
                    let p = path.with_file_name(format!("{stem}-{i:05}-of-{count:05}.gguf"));
                    match check_file(root, &p) {
                        Ok(n) => total += n,
                        Err(e) => {
                            bad = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = bad {
                    d.warnings
                        .push(format!("split model {}: {e}", path.display()));
                    continue;
                }
                (total, true)
            }
            None => match check_file(root, path) {
                Ok(n) => (n, false),
                Err(e) => {
                    d.warnings.push(e);
                    continue;
                }
            },
        };
        d.found.push(Found {
            origin,
            id: id(name),
            path: path.clone(),
            size,
            sha256: if split { None } else { sha(path) },
            split,
        });
    }
}

fn scan_lmstudio(root: &Path, real: &Path, d: &mut Discovery) {
    for (publisher, pdir) in subdirs(root) {
        for (repo, rdir) in subdirs(&pdir) {
            let files: Vec<(String, PathBuf)> = entries(&rdir)
                .into_iter()
                .filter(|(_, _, t)| !t.is_dir())
                .map(|(n, p, _)| (n, p))
                .collect();
            let id = |n: &str| format!("lmstudio:{publisher}/{repo}/{n}");
            add_ggufs(real, &files, Origin::LmStudio, &id, &|_| None, d);
        }
    }
}

fn scan_hf(root: &Path, d: &mut Discovery) {
    let before = d.found.len();
    for (name, repo) in subdirs(root) {
        let Some(repo_id) = name
            .strip_prefix("models--")
            .and_then(|r| r.split_once("--"))
            .map(|(org, n)| format!("{org}/{n}"))
        else {
            continue;
        };
        for (_, snap) in subdirs(&repo.join("snapshots")) {
            walk_hf(root, &snap, "", &repo_id, 0, d);
        }
    }
    // The same file in two snapshots is one blob: keep the first; two different files of the
    // same name in different revisions are told apart by the revision.
    let mut i = before;
    while i < d.found.len() {
        let (real, id) = (d.found[i].path.canonicalize().ok(), d.found[i].id.clone());
        let dup_blob = d.found[before..i]
            .iter()
            .any(|f| f.path.canonicalize().ok() == real);
        if dup_blob {
            d.found.remove(i);
            continue;
        }
        if d.found[before..i].iter().any(|f| f.id == id) {
            let rev = d.found[i]
                .path
                .components()
                .rev()
                .find_map(|c| {
                    let s = c.as_os_str().to_str()?;
                    (s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(s)
                })
                .unwrap_or("")
                .get(..8)
                .unwrap_or("")
                .to_string();
            d.found[i].id = format!("{id}@{rev}");
        }
        i += 1;
    }
}

fn walk_hf(root: &Path, dir: &Path, rel: &str, repo: &str, depth: usize, d: &mut Discovery) {
    if depth > MAX_DEPTH {
        return;
    }
    let mut files = Vec::new();
    for (name, path, t) in entries(dir) {
        if t.is_dir() {
            walk_hf(root, &path, &format!("{rel}{name}/"), repo, depth + 1, d);
        } else {
            files.push((name, path));
        }
    }
    let id = |n: &str| format!("hf:{repo}/{rel}{n}");
    // An LFS file's blob is named by its sha256.
    let sha = |p: &Path| {
        let real = p.canonicalize().ok()?;
        let name = real.file_name()?.to_str()?;
        (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| name.to_lowercase())
    };
    add_ggufs(root, &files, Origin::HfCache, &id, &sha, d);
}

/// The parts of an Ollama manifest read here; everything else in it is ignored.
#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
}

const OLLAMA_MODEL: &str = "application/vnd.ollama.image.model";
const OLLAMA_REGISTRY: &str = "registry.ollama.ai";

fn scan_ollama(root: &Path, real: &Path, d: &mut Discovery) {
    let manifests = root.join("manifests");
    for (host, hdir) in subdirs(&manifests) {
        for (ns, ndir) in subdirs(&hdir) {
            for (model, mdir) in subdirs(&ndir) {
                for (tag, path, t) in entries(&mdir) {
                    if t.is_dir() || tag.starts_with('.') {
                        continue;
                    }
                    // Ollama's short names (types/model/name.go DisplayShortest).
                    let name = match (host.as_str(), ns.as_str()) {
                        (OLLAMA_REGISTRY, "library") => format!("{model}:{tag}"),
                        (OLLAMA_REGISTRY, _) => format!("{ns}/{model}:{tag}"),
                        _ => format!("{host}/{ns}/{model}:{tag}"),
                    };
                    match ollama_model(root, real, &path) {
                        Ok(Some((blob, size, sha))) => d.found.push(Found {
                            origin: Origin::Ollama,
                            id: format!("ollama:{name}"),
                            path: blob,
                            size,
                            sha256: Some(sha),
                            split: false,
                        }),
                        Ok(None) => {}
                        Err(e) => d
                            .warnings
                            .push(format!("Ollama manifest {}: {e}; skipped", path.display())),
                    }
                }
            }
        }
    }
}

/// The model blob of one manifest, its size and sha256; `None` for a manifest without a
/// GGUF model layer (an embedding of safetensors tensors, say).
fn ollama_model(
    root: &Path,
    real: &Path,
    manifest: &Path,
) -> Result<Option<(PathBuf, u64, String)>, String> {
    let mut bytes = Vec::new();
    File::open(manifest)
        .and_then(|f| f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err("larger than 1 MiB".into());
    }
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a manifest ({e})"))?;
    let Some(layer) = m.layers.iter().find(|l| l.media_type == OLLAMA_MODEL) else {
        return Ok(None);
    };
    // Ollama's own rule for a digest (modelpath.go GetBlobsPath): sha256, 64 hex digits.
    let hexd = layer
        .digest
        .strip_prefix("sha256:")
        .or_else(|| layer.digest.strip_prefix("sha256-"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            format!(
                "malformed digest \"{}\"",
                layer
                    .digest
                    .chars()
                    .take(80)
                    .collect::<String>()
                    .escape_debug()
            )
        })?;
    let blob = root.join("blobs").join(format!("sha256-{hexd}"));
    let size = check_file(real, &blob)?;
    if size != layer.size {
        return Err(format!(
            "{} is {size} bytes, the manifest says {}",
            blob.display(),
            layer.size
        ));
    }
    Ok(Some((blob, size, hexd.to_lowercase())))
}
