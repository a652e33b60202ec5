//! Issue 12, part 4: a Hugging Face download cut part way resumes with a Range request and
//! is still verified before use. The hub is a small HTTP server in this test process, at
//! `HF_ENDPOINT`, answering as huggingface.co does for an LFS file: a HEAD on
//! `/{repo}/resolve/{rev}/{file}` is a 302 to the CDN carrying `X-Repo-Commit`,
//! `X-Linked-Etag` (the sha256) and `X-Linked-Size`; a GET is the same 302, and the CDN
//! URL serves the bytes, honouring `Range: bytes=N-` with a 206.

mod catalog_common;
use catalog_common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const LEN: usize = 300_000;
const COMMIT: &str = "8f3d9a6c2b1e4f5a6b7c8d9e0f1a2b3c4d5e6f70";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// The first GET of each file sends this many bytes, then the connection drops.
    CutFirstAt(usize),
    /// Every GET honours its Range.
    Honour,
    /// Ranges are ignored: always a 200 with the whole file.
    IgnoreRange,
    /// A ranged GET says the file now has 10 more bytes.
    ChangedSize,
}

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    range: Option<String>,
}

struct Hub {
    url: String,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Hub {
    /// Serves `files` (name in repo `org/m`, bytes) until the test ends.
    fn start(files: Vec<(&str, Vec<u8>)>, mode: Mode) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let files: Arc<Vec<(String, Vec<u8>)>> =
            Arc::new(files.into_iter().map(|(n, b)| (n.to_string(), b)).collect());
        let (log2, url2) = (log.clone(), url.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (log, files, url) = (log2.clone(), files.clone(), url2.clone());
                std::thread::spawn(move || serve(conn, &log, &files, &url, mode));
            }
        });
        Hub { url, log }
    }
    fn gets(&self) -> Vec<Req> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == "GET" && r.path.starts_with("/cdn/"))
            .cloned()
            .collect()
    }
}

fn serve(
    mut conn: TcpStream,
    log: &Mutex<Vec<Req>>,
    files: &[(String, Vec<u8>)],
    url: &str,
    mode: Mode,
) {
    // One request per connection (each answer says `Connection: close`).
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return; // tokentop's quick reachability check connects and leaves.
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let nth_get = {
        let mut log = log.lock().unwrap();
        log.push(Req {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
        });
        log.iter()
            .filter(|r| r.method == "GET" && r.path == path)
            .count()
    };
    let mut send = |head: String, body: &[u8]| {
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(body);
        let _ = conn.flush();
    };
    let file = files.iter().find(|(name, bytes)| {
        path == format!("/org/m/resolve/main/{name}") || path == format!("/cdn/{}", sha256(bytes))
    });
    let Some((_, bytes)) = file else {
        return send(
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
            b"",
        );
    };
    let sha = sha256(bytes);
    let len = bytes.len();
    if path.starts_with("/org/") {
        return send(
            format!(
                "HTTP/1.1 302 Found\r\nLocation: {url}/cdn/{sha}\r\nX-Repo-Commit: {COMMIT}\r\nX-Linked-Etag: \"{sha}\"\r\nX-Linked-Size: {len}\r\nETag: W/\"1a2b\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            b"",
        );
    }
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    match (mode, start) {
        (Mode::CutFirstAt(n), _) if nth_get == 1 => send(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"),
            &bytes[..n],
        ),
        (Mode::ChangedSize, Some(s)) => send(
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                len + 9,
                len + 10,
                len - s
            ),
            &bytes[s..],
        ),
        (Mode::IgnoreRange, _) | (_, None) => send(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"),
            bytes,
        ),
        (_, Some(s)) => send(
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                len - 1,
                len - s
            ),
            &bytes[s..],
        ),
    }
}

/// A sandbox with a catalog of one model `m` from Hugging Face `org/m`, files `files`.
fn setup(files: &[&str], size: usize, sha: Option<&str>) -> (Sandbox, PathBuf) {
    let sb = Sandbox::new();
    let list = files
        .iter()
        .map(|f| format!("\"{f}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let cat = sb.write_catalog(&catalog(
        "m.gguf",
        size as u64,
        sha,
        &format!("{{ kind = \"hf\", repo = \"org/m\", files = [{list}] }}"),
    ));
    (sb, cat)
}

fn pull(sb: &Sandbox, cat: &std::path::Path, hub: &Hub) -> std::process::Output {
    sb.command(&["--catalog", cat.to_str().unwrap(), "pull", "m"])
        .env("HF_ENDPOINT", &hub.url)
        .output()
        .unwrap()
}

fn repo_dir(sb: &Sandbox) -> PathBuf {
    sb.hf_cache().join("models--org--m")
}

/// Where a download of `bytes` is kept while incomplete (huggingface_hub's name).
fn incomplete(sb: &Sandbox, bytes: &[u8]) -> PathBuf {
    repo_dir(sb).join(format!("blobs/{}.incomplete", sha256(bytes)))
}

fn snapshot(sb: &Sandbox, file: &str) -> PathBuf {
    repo_dir(sb).join("snapshots").join(COMMIT).join(file)
}

/// The pull succeeded, printed the snapshot path, and the file there is `bytes`.
fn assert_pulled(sb: &Sandbox, out: &std::process::Output, bytes: &[u8]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let path = snapshot(sb, "m.gguf");
    assert_eq!(stdout(out), format!("{}\n", path.display()));
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "downloaded file differs"
    );
    assert_eq!(
        std::fs::read_link(&path).unwrap(),
        PathBuf::from(format!("../../blobs/{}", sha256(bytes)))
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir(sb).join("refs/main")).unwrap(),
        COMMIT
    );
    assert!(!incomplete(sb, bytes).exists());
}

#[test]
fn a_download_cut_part_way_resumes_with_a_range_request_and_verifies() {
    let bytes = model_bytes(LEN);
    let hub = Hub::start(vec![("m.gguf", bytes.clone())], Mode::CutFirstAt(100_000));
    let (sb, cat) = setup(&["m.gguf"], LEN, Some(&sha256(&bytes)));
    let out = pull(&sb, &cat, &hub);
    assert_pulled(&sb, &out, &bytes);
    let gets = hub.gets();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(gets[1].range.as_deref(), Some("bytes=100000-"));
    let err = stderr(&out);
    assert!(
        err.lines().any(|l| l.contains("m.gguf: connection")
            && l.contains("at byte 100000")
            && l.ends_with("; resuming")),
        "{err}"
    );
    // Used from the cache from now on: no more requests.
    let out = pull(&sb, &cat, &hub);
    assert_pulled(&sb, &out, &bytes);
    assert_eq!(hub.gets().len(), 2);
}

#[test]
fn a_download_left_by_an_earlier_run_resumes_where_it_stopped() {
    let bytes = model_bytes(LEN);
    let hub = Hub::start(vec![("m.gguf", bytes.clone())], Mode::Honour);
    let (sb, cat) = setup(&["m.gguf"], LEN, Some(&sha256(&bytes)));
    let part = incomplete(&sb, &bytes);
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &bytes[..123_456]).unwrap();
    let out = pull(&sb, &cat, &hub);
    assert_pulled(&sb, &out, &bytes);
    let gets = hub.gets();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(gets[0].range.as_deref(), Some("bytes=123456-"));
    assert!(
        stderr(&out).contains("resuming m.gguf at 0.0 of 0.0 GB"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_corrupted_resumed_file_fails_verification_and_the_next_pull_starts_over() {
    let bytes = model_bytes(LEN);
    let hub = Hub::start(vec![("m.gguf", bytes.clone())], Mode::Honour);
    let (sb, cat) = setup(&["m.gguf"], LEN, Some(&sha256(&bytes)));
    let part = incomplete(&sb, &bytes);
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    let mut bad = bytes[..150_000].to_vec();
    bad[777] ^= 0x40;
    std::fs::write(&part, &bad).unwrap();

    let out = pull(&sb, &cat, &hub);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(stdout(&out), "");
    let mut whole = bad.clone();
    whole.extend_from_slice(&bytes[150_000..]);
    assert!(
        err.contains(&format!(
            "the download of m.gguf has sha256 {}, Hugging Face says {}; removed it, the next pull starts over",
            sha256(&whole),
            sha256(&bytes)
        )),
        "{err}"
    );
    assert_eq!(hub.gets()[0].range.as_deref(), Some("bytes=150000-"));
    // Nothing unverified is left where it could be used.
    assert!(!part.exists());
    assert!(!snapshot(&sb, "m.gguf").exists());
    assert!(!repo_dir(&sb)
        .join(format!("blobs/{}", sha256(&bytes)))
        .exists());

    let out = pull(&sb, &cat, &hub);
    assert_pulled(&sb, &out, &bytes);
    assert_eq!(hub.gets()[1].range, None);
}

#[test]
fn a_server_that_ignores_the_range_restarts_the_file_cleanly() {
    let bytes = model_bytes(LEN);
    let hub = Hub::start(vec![("m.gguf", bytes.clone())], Mode::IgnoreRange);
    let (sb, cat) = setup(&["m.gguf"], LEN, Some(&sha256(&bytes)));
    let part = incomplete(&sb, &bytes);
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &bytes[..200_000]).unwrap();
    let out = pull(&sb, &cat, &hub);
    assert_pulled(&sb, &out, &bytes);
    assert_eq!(hub.gets()[0].range.as_deref(), Some("bytes=200000-"));
}

#[test]
fn a_file_that_changed_size_on_the_server_is_not_resumed() {
    let bytes = model_bytes(LEN);
    let hub = Hub::start(vec![("m.gguf", bytes.clone())], Mode::ChangedSize);
    let (sb, cat) = setup(&["m.gguf"], LEN, Some(&sha256(&bytes)));
    let part = incomplete(&sb, &bytes);
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &bytes[..200_000]).unwrap();
    let out = pull(&sb, &cat, &hub);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("m.gguf changed on the server while downloading (300010 bytes, was 300000)"),
        "{err}"
    );
    assert!(!part.exists());
}

#[test]
fn the_parts_of_a_split_model_download_in_order_beside_each_other() {
    let a = model_bytes(70_000);
    let b = model_bytes(50_000)[..]
        .iter()
        .map(|x| x ^ 0x55)
        .collect::<Vec<u8>>();
    let names = ["q8/m-00001-of-00002.gguf", "q8/m-00002-of-00002.gguf"];
    let hub = Hub::start(
        vec![(names[0], a.clone()), (names[1], b.clone())],
        Mode::CutFirstAt(10_000),
    );
    let (sb, cat) = setup(&names, a.len() + b.len(), None);
    let out = pull(&sb, &cat, &hub);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let first = snapshot(&sb, names[0]);
    assert_eq!(stdout(&out), format!("{}\n", first.display()));
    assert!(std::fs::read(&first).unwrap() == a);
    assert!(std::fs::read(snapshot(&sb, names[1])).unwrap() == b);
    assert_eq!(
        std::fs::read_link(&first).unwrap(),
        PathBuf::from(format!("../../../blobs/{}", sha256(&a)))
    );
    let gets: Vec<(String, Option<String>)> =
        hub.gets().into_iter().map(|r| (r.path, r.range)).collect();
    let (pa, pb) = (
        format!("/cdn/{}", sha256(&a)),
        format!("/cdn/{}", sha256(&b)),
    );
    assert_eq!(
        gets,
        [
            (pa.clone(), None),
            (pa, Some("bytes=10000-".into())),
            (pb.clone(), None),
            (pb, Some("bytes=10000-".into())),
        ]
    );

    // A catalog whose size is not what the hub has is refused before any download.
    let hub = Hub::start(
        vec![(names[0], a.clone()), (names[1], b.clone())],
        Mode::Honour,
    );
    let (sb, cat) = setup(&names, a.len() + b.len() + 1, None);
    let out = pull(&sb, &cat, &hub);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "Hugging Face org/m has {} bytes in {} + {}, the catalog expects {}",
            a.len() + b.len(),
            names[0],
            names[1],
            a.len() + b.len() + 1
        )),
        "{}",
        stderr(&out)
    );
    assert!(hub.gets().is_empty());
}

/// An entry whose size is only approximate (`approx_size = true`, no sha256: written without
/// the hub at hand) takes the hub's file when it is within 2% of that size, verified by the
/// hub's sha256, and `list` then finds it in the cache; an exact size that is off is refused
/// before any byte is fetched, and so is an approximate one that is 10% off.
#[test]
fn an_approximate_catalog_size_takes_the_hubs_file_within_two_percent() {
    let bytes = model_bytes(LEN);
    let hub = Hub::start(vec![("m.gguf", bytes.clone())], Mode::Honour);
    let catalog_with = |sb: &Sandbox, size: usize, approx: bool| {
        let text = catalog(
            "m.gguf",
            size as u64,
            None,
            "{ kind = \"hf\", repo = \"org/m\", files = [\"m.gguf\"] }",
        )
        .replace(
            "sources = [",
            &format!("approx_size = {approx}\nsources = ["),
        );
        sb.write_catalog(&text)
    };
    let sb = Sandbox::new();
    let near = LEN + LEN / 100;
    let cat = catalog_with(&sb, near, false);
    let out = pull(&sb, &cat, &hub);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "has {LEN} bytes in m.gguf, the catalog expects {near}"
        )),
        "{err}"
    );
    let far = catalog_with(&sb, LEN + LEN / 10, true);
    let err = stderr(&pull(&sb, &far, &hub));
    assert!(err.contains("the catalog expects about"), "{err}");
    assert!(hub.gets().is_empty(), "nothing fetched for a refused size");

    let cat = catalog_with(&sb, near, true);
    let out = pull(&sb, &cat, &hub);
    assert_pulled(&sb, &out, &bytes);
    let list = stdout(&sb.run(&["--catalog", cat.to_str().unwrap(), "list"]));
    let line = list.lines().find(|l| l.starts_with("m ")).unwrap();
    assert!(
        line.contains("~0.0G") && line.contains("hf-cache"),
        "{line}"
    );
}
