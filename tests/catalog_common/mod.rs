//! Helpers for the catalog and model-store tests: a sandbox (its own TOKENTOP_HOME, HF
//! cache and pip configuration), catalogs written by the tests, and a real wheel served to
//! the real pip from a local folder.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temp folder holding everything one test touches.
pub struct Sandbox {
    pub root: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        for d in ["home", "hf", "wheels", "bin", "sentinel"] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        Sandbox { root }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }
    pub fn store(&self) -> PathBuf {
        self.path("home/models")
    }
    /// The Hugging Face cache hf-hub uses with HF_HOME set to `hf/`.
    pub fn hf_cache(&self) -> PathBuf {
        self.path("hf/hub")
    }
    pub fn write_catalog(&self, text: &str) -> PathBuf {
        let p = self.path("catalog.toml");
        std::fs::write(&p, text).unwrap();
        p
    }
    /// The real binary, sandboxed: its store, HF cache (downloads go to a closed local
    /// port, so they fail at once; HF_HUB_OFFLINE would turn off pip too), and a pip that only
    /// looks in `wheels/` and reads no user configuration.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tokentop"));
        c.args(args)
            .env("TOKENTOP_HOME", self.path("home"))
            .env_remove("TOKENTOP_CATALOG")
            .env("HF_HOME", self.path("hf"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("HUGGINGFACE_HUB_CACHE")
            .env_remove("HF_TOKEN")
            // No other tool's store of this machine shows up in the tests' `list`.
            .env("OLLAMA_MODELS", self.path("ollama"))
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("TOKENTOP_OFFLINE")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("PIP_CONFIG_FILE", "/dev/null")
            .env("PIP_NO_INDEX", "1")
            .env("PIP_FIND_LINKS", self.path("wheels"))
            .env("PIP_NO_CACHE_DIR", "1")
            .env("TMPDIR", self.path("tmp-outside"));
        std::fs::create_dir_all(self.path("tmp-outside")).unwrap();
        c
    }
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running tokentop")
    }
    /// A `python3` (and `python`) first on PATH that only leaves a marker file: proof of
    /// whether tokentop started the pip the catalog asked for.
    pub fn fake_python(&self) -> (String, PathBuf) {
        let marker = self.path("python-ran");
        let script = format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\n[ \"$1\" = --version ] && echo Python 3.0 && exit 0\nexit 1\n",
            marker.display()
        );
        for name in ["python3", "python"] {
            let p = self.path("bin").join(name);
            std::fs::write(&p, &script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        (path, marker)
    }
    /// Every file and symlink under the sandbox, relative to it, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(self.root.path(), self.root.path(), &mut out);
        out.sort();
        out
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            walk(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

/// The model bytes our test wheels carry: deterministic, not compressible to nothing.
pub fn model_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes a minimal valid wheel `DIST-VERSION-py3-none-any.whl` into `dir` holding
/// `member` = `bytes`, as pip expects to find it (dist-info METADATA, WHEEL, RECORD).
pub fn write_wheel(dir: &Path, dist: &str, version: &str, member: &str, bytes: &[u8]) {
    let stem = dist.replace('-', "_");
    let path = dir.join(format!("{stem}-{version}-py3-none-any.whl"));
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let info = format!("{stem}-{version}.dist-info");
    let files: Vec<(String, Vec<u8>)> = vec![
        (member.to_string(), bytes.to_vec()),
        (
            format!("{info}/METADATA"),
            format!("Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n").into_bytes(),
        ),
        (
            format!("{info}/WHEEL"),
            b"Wheel-Version: 1.0\nGenerator: tokentop-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
                .to_vec(),
        ),
    ];
    let mut record = String::new();
    for (name, data) in &files {
        zip.start_file(name.as_str(), opts).unwrap();
        zip.write_all(data).unwrap();
        record.push_str(&format!("{name},,\n"));
    }
    record.push_str(&format!("{info}/RECORD,,\n"));
    zip.start_file(format!("{info}/RECORD"), opts).unwrap();
    zip.write_all(record.as_bytes()).unwrap();
    zip.finish().unwrap();
}

/// A catalog with one model `m`, default, with the given file, size, sha256 and sources
/// (TOML inline tables).
pub fn catalog(file: &str, size: u64, sha256: Option<&str>, sources: &str) -> String {
    format!(
        "default = \"m\"\n\n[[model]]\nid = \"m\"\nname = \"Test model\"\narch = \"llama\"\nparams_b = 0.1\nactive_params_b = 0.1\ntags = [\"dense\"]\nquant = \"Q4_0\"\nfile = \"{file}\"\nsize = {size}\n{}sources = [{sources}]\n",
        sha256.map_or(String::new(), |h| format!("sha256 = \"{h}\"\n"))
    )
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
