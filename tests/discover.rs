//! Issue 12, part 3: GGUFs already in Ollama's, LM Studio's and the Hugging Face cache's
//! stores are listed with their source, mapped onto catalog ids (size, then sha256) and
//! loaded in place. The fixture trees are laid out as the tools write them:
//!
//! - Ollama (server/modelpath.go GetBlobsPath, server/manifest.go, types/model/name.go in
//!   ollama/ollama): `manifests/<host>/<namespace>/<model>/<tag>` holds the manifest as Go's
//!   `json.Encoder` writes it (one line, fields in struct order, a trailing newline);
//!   `blobs/sha256-<hex>` holds each layer, named by its sha256.
//! - LM Studio: `~/.lmstudio/models/<publisher>/<repo>/<file>.gguf`, vision projectors as
//!   `mmproj-*.gguf` beside the model.
//! - Hugging Face (huggingface_hub's cache): `models--ORG--NAME/blobs/<sha256>`,
//!   `snapshots/<commit>/<file>` a relative symlink to the blob, `refs/main` the commit.

mod catalog_common;
use catalog_common::*;
use std::path::{Path, PathBuf};

/// A GGUF-looking file: the magic, then deterministic bytes (discovery reads only the magic).
fn gguf(len: usize) -> Vec<u8> {
    let mut b = model_bytes(len);
    b[..4].copy_from_slice(b"GGUF");
    b
}

struct Tree {
    sb: Sandbox,
}

impl Tree {
    fn new() -> Self {
        let sb = Sandbox::new();
        std::fs::create_dir_all(sb.path("user")).unwrap();
        Tree { sb }
    }
    fn ollama(&self) -> PathBuf {
        self.sb.path("user/.ollama/models")
    }
    fn lmstudio(&self) -> PathBuf {
        self.sb.path("user/.lmstudio/models")
    }
    /// The real binary with this sandbox as the user's home; Ollama's store found at its
    /// default place.
    fn run(&self, args: &[&str]) -> std::process::Output {
        self.sb
            .command(args)
            .env("HOME", self.sb.path("user"))
            .env_remove("OLLAMA_MODELS")
            .env_remove("XDG_CACHE_HOME")
            .output()
            .unwrap()
    }
    fn list(&self, catalog: Option<&Path>) -> (String, String) {
        let mut args = vec![];
        if let Some(c) = catalog {
            args.extend(["--catalog", c.to_str().unwrap()]);
        }
        args.push("list");
        let out = self.run(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        (stdout(&out), stderr(&out))
    }
}

/// Writes `bytes` as an Ollama blob; returns its hex digest.
fn ollama_blob(root: &Path, bytes: &[u8]) -> String {
    let hex = sha256(bytes);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::write(root.join(format!("blobs/sha256-{hex}")), bytes).unwrap();
    hex
}

/// An Ollama model: a GGUF model layer, template and params layers, and the config blob,
/// with the manifest written as Ollama writes it.
fn ollama_model(root: &Path, name: &str, model: &[u8]) -> PathBuf {
    let (host, ns, model_name, tag) = {
        let parts: Vec<&str> = name.split(['/', ':']).collect();
        (parts[0], parts[1], parts[2], parts[3])
    };
    let layer = |media: &str, bytes: &[u8]| {
        format!(
            r#"{{"mediaType":"{media}","digest":"sha256:{}","size":{}}}"#,
            ollama_blob(root, bytes),
            bytes.len()
        )
    };
    let config = br#"{"model_format":"gguf","model_family":"llama","model_families":["llama"],"model_type":"135M","file_type":"Q4_1","architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layers = [
        layer("application/vnd.ollama.image.model", model),
        layer(
            "application/vnd.ollama.image.template",
            b"{{ .System }}\n{{ .Prompt }}",
        ),
        layer(
            "application/vnd.ollama.image.params",
            br#"{"stop":["<|im_end|>"]}"#,
        ),
    ];
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:{}","size":{}}},"layers":[{}]}}"#,
        ollama_blob(root, config),
        config.len(),
        layers.join(",")
    ) + "\n";
    let path = root.join("manifests").join(host).join(ns).join(model_name);
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join(tag), manifest).unwrap();
    root.join(format!("blobs/sha256-{}", sha256(model)))
}

/// A file of the Hugging Face cache of `repo` as huggingface_hub writes it.
fn hf_file(cache: &Path, repo: &str, file: &str, bytes: &[u8]) -> PathBuf {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let hex = sha256(bytes);
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("blobs").join(&hex), bytes).unwrap();
    std::fs::write(dir.join("refs/main"), commit).unwrap();
    let link = dir.join("snapshots").join(commit).join(file);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    let up = "../".repeat(file.matches('/').count() + 2);
    std::os::unix::fs::symlink(format!("{up}blobs/{hex}"), &link).unwrap();
    link
}

/// The line of `list` for `id`, split in columns, without the TAGS column (index 6), so
/// SOURCE is [6] and the path [7].
fn row(list: &str, id: &str) -> Vec<String> {
    let mut cols: Vec<String> = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("{id} not listed:\n{list}"))
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if cols.len() > 6 {
        cols.remove(6);
    }
    cols
}

#[test]
fn list_shows_the_ggufs_of_ollama_lm_studio_and_the_hf_cache_with_their_source() {
    let t = Tree::new();
    let tiny = ollama_model(
        &t.ollama(),
        "registry.ollama.ai/library/tiny:latest",
        &gguf(5000),
    );
    let user = ollama_model(
        &t.ollama(),
        "registry.ollama.ai/someone/small:q4",
        &gguf(5001),
    );
    let hfco = ollama_model(
        &t.ollama(),
        "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
        &gguf(5002),
    );
    // A recorded real manifest (llama3 8B as Ollama wrote it, quoted in
    // GDKAYKY/llama.cpp-desktop docs/MODEL_PATH.md), with a sparse blob of its size.
    let real = std::fs::read_to_string("tests/data/ollama/llama3-8b.manifest").unwrap();
    let mdir = t
        .ollama()
        .join("manifests/registry.ollama.ai/library/llama3");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(mdir.join("8b"), &real).unwrap();
    let big = t
        .ollama()
        .join("blobs/sha256-60e05f2100071479f596b964f89f510f057ce397ea22f2833a0cfe029bfc2463");
    let f = std::fs::File::create(&big).unwrap();
    std::io::Write::write_all(&mut &f, b"GGUF").unwrap();
    f.set_len(4683074048).unwrap();

    let repo = t.lmstudio().join("lmstudio-community/Tiny-GGUF");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("Tiny-Q4_K_M.gguf"), gguf(6000)).unwrap();
    std::fs::write(repo.join("mmproj-Tiny-F16.gguf"), gguf(100)).unwrap();
    std::fs::write(repo.join("README.md"), "not a model").unwrap();
    let split = t.lmstudio().join("lmstudio-community/Big-GGUF");
    std::fs::create_dir_all(&split).unwrap();
    std::fs::write(split.join("Big-Q8_0-00001-of-00002.gguf"), gguf(3000)).unwrap();
    std::fs::write(split.join("Big-Q8_0-00002-of-00002.gguf"), gguf(4000)).unwrap();

    let hf = hf_file(
        &t.sb.hf_cache(),
        "org/tiny",
        "sub/tiny-Q4_0.gguf",
        &gguf(7000),
    );

    let (list, err) = t.list(None);
    assert_eq!(err, "", "no warnings expected");
    let r = row(&list, "ollama:tiny:latest");
    assert_eq!(r[6..], ["ollama".to_string(), tiny.display().to_string()]);
    assert_eq!(
        row(&list, "ollama:someone/small:q4")[7],
        user.display().to_string()
    );
    assert_eq!(
        row(
            &list,
            "ollama:hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"
        )[7],
        hfco.display().to_string()
    );
    let r = row(&list, "ollama:llama3:8b");
    assert_eq!(r[5], "4.7G");
    assert_eq!(r[7], big.display().to_string());
    let r = row(
        &list,
        "lmstudio:lmstudio-community/Tiny-GGUF/Tiny-Q4_K_M.gguf",
    );
    assert_eq!(r[6], "lmstudio");
    // A split model once, by its first part; no projector, nothing but GGUFs.
    row(
        &list,
        "lmstudio:lmstudio-community/Big-GGUF/Big-Q8_0-00001-of-00002.gguf",
    );
    assert!(!list.contains("00002-of"), "{list}");
    assert!(
        !list.contains("mmproj") && !list.contains("README"),
        "{list}"
    );
    let r = row(&list, "hf:org/tiny/sub/tiny-Q4_0.gguf");
    assert_eq!(r[6..], ["hf-cache".to_string(), hf.display().to_string()]);
    // The catalog still comes first, with its source column.
    assert_eq!(row(&list, "smollm2-135m")[6], "-");

    // Older LM Studio's folder and a relocated Ollama store are found too.
    let old = t.sb.path("user/.cache/lm-studio/models/TheBloke/Old-GGUF");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("old.Q4_K_M.gguf"), gguf(2000)).unwrap();
    let moved = t.sb.path("elsewhere");
    ollama_model(
        &moved,
        "registry.ollama.ai/library/moved:latest",
        &gguf(2001),
    );
    let out =
        t.sb.command(&["list"])
            .env("HOME", t.sb.path("user"))
            .env("OLLAMA_MODELS", &moved)
            .output()
            .unwrap();
    let list = stdout(&out);
    row(&list, "lmstudio:TheBloke/Old-GGUF/old.Q4_K_M.gguf");
    row(&list, "ollama:moved:latest");
    assert!(!list.contains("ollama:tiny:latest"), "{list}");

    // LM Studio's home moved elsewhere (the pointer file it writes), and HF_HUB_CACHE
    // taking the place of HF_HOME/hub.
    let lms = t.sb.path("lms-home");
    let repo = lms.join("models/pub/Moved-GGUF");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("moved.gguf"), gguf(2100)).unwrap();
    std::fs::write(
        t.sb.path("user/.lmstudio-home-pointer"),
        lms.to_str().unwrap(),
    )
    .unwrap();
    let hub = t.sb.path("hub-elsewhere");
    hf_file(&hub, "org2/other", "other.gguf", &gguf(2200));
    let out =
        t.sb.command(&["list"])
            .env("HOME", t.sb.path("user"))
            .env("HF_HUB_CACHE", &hub)
            .output()
            .unwrap();
    let list = stdout(&out);
    row(&list, "lmstudio:pub/Moved-GGUF/moved.gguf");
    row(&list, "hf:org2/other/other.gguf");
    assert!(!list.contains("hf:org/tiny"), "{list}");
}

/// A catalog model with one Hugging Face source that cannot be reached (HF_ENDPOINT is a
/// closed port), so only a store can provide it.
fn one_model_catalog(t: &Tree, bytes: &[u8]) -> PathBuf {
    t.sb.write_catalog(&catalog(
        "m.gguf",
        bytes.len() as u64,
        Some(&sha256(bytes)),
        r#"{ kind = "hf", repo = "o/n", files = ["m.gguf"] }"#,
    ))
}

#[test]
fn a_catalog_model_in_ollamas_store_is_listed_under_its_id_and_used_in_place() {
    let t = Tree::new();
    let bytes = gguf(9000);
    let blob = ollama_model(&t.ollama(), "registry.ollama.ai/library/m:latest", &bytes);
    let cat = one_model_catalog(&t, &bytes);
    let (list, _) = t.list(Some(&cat));
    assert_eq!(
        row(&list, "m")[6..8],
        ["ollama".to_string(), blob.display().to_string()]
    );
    // Listed once: as the catalog model, not again as an Ollama one.
    assert!(!list.contains("ollama:m:latest"), "{list}");

    let out = t.run(&["--catalog", cat.to_str().unwrap(), "pull", "m"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(stdout(&out), format!("{}\n", blob.display()));
    assert!(
        err.contains("using") && err.contains("ollama:m:latest"),
        "{err}"
    );
    // Nothing was copied into tokentop's store.
    assert!(!t.sb.store().join("m.gguf").exists());
    assert_eq!(std::fs::read(&blob).unwrap(), bytes);
}

#[test]
fn a_same_size_file_with_other_content_is_not_taken_for_a_catalog_model() {
    let t = Tree::new();
    let bytes = gguf(9000);
    let mut other = bytes.clone();
    other[4000] ^= 1;
    let repo = t.lmstudio().join("pub/M-GGUF");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("m.gguf"), &other).unwrap();
    let cat = one_model_catalog(&t, &bytes);
    // `list` matches on size alone (nothing hashed there)...
    let (list, _) = t.list(Some(&cat));
    assert_eq!(row(&list, "m")[6], "lmstudio");
    // ...but using it needs the sha256 too: this one is refused, and the download (to a
    // closed port) fails.
    let out = t.run(&["--catalog", cat.to_str().unwrap(), "pull", "m"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("using"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");

    // An Ollama blob whose name is not the catalog's sha256 is not listed as the model.
    let t = Tree::new();
    ollama_model(&t.ollama(), "registry.ollama.ai/library/x:latest", &other);
    let cat = one_model_catalog(&t, &bytes);
    let (list, _) = t.list(Some(&cat));
    assert_eq!(row(&list, "m")[6], "-");
    row(&list, "ollama:x:latest");
}

#[test]
fn hostile_store_entries_are_skipped_with_one_line_warnings() {
    let t = Tree::new();
    let root = t.ollama();
    ollama_model(&root, "registry.ollama.ai/library/good:latest", &gguf(3000));
    let lib = root.join("manifests/registry.ollama.ai/library");
    let put = |name: &str, text: &[u8]| {
        std::fs::create_dir_all(lib.join(name)).unwrap();
        std::fs::write(lib.join(name).join("latest"), text).unwrap();
    };
    put("notjson", b"\x00\xffnot json at all");
    put("empty", b"");
    put("nolayers", br#"{"schemaVersion":2}"#);
    put(
        "traversal",
        br#"{"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:../../../../../sentinel/x","size":7}]}"#,
    );
    put(
        "missing",
        format!(
            r#"{{"layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{}","size":7}}]}}"#,
            "ab".repeat(32)
        )
        .as_bytes(),
    );
    put("huge", &vec![b' '; 2 << 20]);
    // A blob that is a symlink out of the store, and one whose size is not the manifest's.
    let outside = t.sb.path("sentinel/x.gguf");
    std::fs::write(&outside, gguf(500)).unwrap();
    let hex = "cd".repeat(32);
    std::os::unix::fs::symlink(&outside, root.join(format!("blobs/sha256-{hex}"))).unwrap();
    put(
        "escape",
        format!(
            r#"{{"layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{hex}","size":500}}]}}"#
        )
        .as_bytes(),
    );
    let wrong = ollama_blob(&root, &gguf(800));
    put(
        "wrongsize",
        format!(
            r#"{{"layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{wrong}","size":801}}]}}"#
        )
        .as_bytes(),
    );
    // A manifest without a GGUF model layer is not a model for us, and no warning.
    put(
        "safetensors",
        br#"{"layers":[{"mediaType":"application/vnd.ollama.image.tensor; name=x","digest":"sha256:00","size":1}]}"#,
    );
    // LM Studio: a symlink loop, a link to `/`, a file linked from outside, a non-GGUF.
    let pubdir = t.lmstudio().join("pub");
    std::fs::create_dir_all(pubdir.join("Repo")).unwrap();
    std::os::unix::fs::symlink(&pubdir, pubdir.join("Repo/loop")).unwrap();
    std::os::unix::fs::symlink("/", pubdir.join("root")).unwrap();
    std::os::unix::fs::symlink(&outside, pubdir.join("Repo/linked.gguf")).unwrap();
    std::fs::write(pubdir.join("Repo/fake.gguf"), b"<html>not a model</html>").unwrap();
    std::fs::write(pubdir.join("Repo/real.gguf"), gguf(1000)).unwrap();

    let out = t.run(&["list"]);
    let (list, err) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{err}");
    row(&list, "ollama:good:latest");
    row(&list, "lmstudio:pub/Repo/real.gguf");
    assert!(!list.contains("sentinel"), "{list}");
    for name in [
        "notjson",
        "empty",
        "nolayers",
        "traversal",
        "missing",
        "huge",
        "escape",
        "wrongsize",
    ] {
        assert!(
            !list.contains(&format!("ollama:{name}:")),
            "{name} listed:\n{list}"
        );
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.contains(&format!("library/{name}/latest")))
            .collect();
        assert_eq!(lines.len(), 1, "{name}: {err}");
        assert!(
            lines[0].starts_with("tokentop: warning: Ollama manifest ")
                && lines[0].ends_with("; skipped"),
            "{}",
            lines[0]
        );
    }
    assert!(err.contains("malformed digest"), "{err}");
    assert!(err.contains("larger than 1 MiB"), "{err}");
    assert!(err.contains("is 800 bytes, the manifest says 801"), "{err}");
    assert!(!err.contains("safetensors"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("linked.gguf leads to") && l.contains("outside")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("fake.gguf is not a GGUF file")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn run_loads_a_listed_store_model_in_place_by_its_id() {
    let t = Tree::new();
    let dir = tempfile::tempdir().unwrap();
    let synth = dir.path().join("tiny.gguf");
    tokentop::engine::synth::SynthSpec::new("llama")
        .write(&synth)
        .unwrap();
    let blob = ollama_model(
        &t.ollama(),
        "registry.ollama.ai/library/tiny:latest",
        &std::fs::read(&synth).unwrap(),
    );
    let out = t.run(&["run", "ollama:tiny:latest", "--prompt", "hi", "-n", "3"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("tokentop: loading {}", blob.display())),
        "{err}"
    );
    let out = t.run(&["run", "ollama:nope:latest", "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "tokentop: error: ollama:nope:latest: no such model in the stores on this machine (see `tokentop list`)\n"
    );
}
