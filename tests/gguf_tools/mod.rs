//! Helpers for the hostile-GGUF tests: a walker that finds where each header field of a GGUF
//! lies (to overwrite counts, types, dims and offsets), and a runner that loads files in a
//! child process under an address-space limit, so a panic, an abort or a memory explosion
//! fails the test instead of being caught in-process.
#![allow(dead_code)]

use candle_core::Device;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use tokentop::engine::{Engine, Flow};
use tokentop::protocol::{GenParams, LoadOptions, Message, Role};

/// Address space a child may use: the tiny models need well under 100 MB of heap; the rest
/// is thread stacks and the binary. A terabyte allocation, or gigabytes of tables, fail.
pub const CHILD_MEMORY_MB: u64 = 1024;

/// Where a header field lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The tensor or metadata count (8 bytes).
    Count,
    /// A length prefix of a string or array (8 bytes).
    Length,
    /// A metadata value type (4 bytes).
    ValueType,
    /// A scalar metadata value of `size` bytes; `float` for f32/f64.
    Scalar { size: usize, float: bool },
    /// A tensor's dimension count (4 bytes).
    NDims,
    /// One tensor dimension (8 bytes).
    Dim,
    /// A tensor's ggml type (4 bytes).
    DType,
    /// A tensor's data offset (8 bytes).
    Offset,
}

/// Every field of a GGUF v2/v3 header with its byte position.
pub fn fields(b: &[u8]) -> Vec<(usize, Field)> {
    let mut out = Vec::new();
    let mut at = 8;
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    out.push((at, Field::Count));
    out.push((at + 8, Field::Count));
    let (n_t, n_kv) = (u64_at(at), u64_at(at + 8));
    at += 16;
    fn value(b: &[u8], at: &mut usize, ty: u32, out: &mut Vec<(usize, Field)>) {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                out.push((*at, Field::Length));
                *at += 8 + u64_at(*at) as usize;
                return;
            }
            9 => {
                let elem = u32::from_le_bytes(b[*at..*at + 4].try_into().unwrap());
                out.push((*at, Field::ValueType));
                out.push((*at + 4, Field::Length));
                let n = u64_at(*at + 4);
                *at += 12;
                for _ in 0..n {
                    value(b, at, elem, out);
                }
                return;
            }
            _ => panic!("the base file has value type {ty}"),
        };
        out.push((
            *at,
            Field::Scalar {
                size,
                float: matches!(ty, 6 | 12),
            },
        ));
        *at += size;
    }
    for _ in 0..n_kv {
        out.push((at, Field::Length));
        at += 8 + u64_at(at) as usize;
        let ty = u32_at(at);
        out.push((at, Field::ValueType));
        at += 4;
        value(b, &mut at, ty, &mut out);
    }
    for _ in 0..n_t {
        out.push((at, Field::Length));
        at += 8 + u64_at(at) as usize;
        let n_dims = u32_at(at) as usize;
        out.push((at, Field::NDims));
        at += 4;
        for d in 0..n_dims {
            out.push((at + 8 * d, Field::Dim));
        }
        at += 8 * n_dims;
        out.push((at, Field::DType));
        out.push((at + 4, Field::Offset));
        at += 12;
    }
    out
}

/// Overwrites the header entry of tensor `name`: its dims (file order, innermost first),
/// ggml type and offset, each only where given.
pub fn patch_tensor(
    b: &mut [u8],
    name: &str,
    dims: Option<&[u64]>,
    dtype: Option<u32>,
    offset: Option<u64>,
) {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = b
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap_or_else(|| panic!("tensor {name} not in the file"))
        + key.len();
    let n_dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    if let Some(dims) = dims {
        assert_eq!(dims.len(), n_dims, "keep the dimension count of {name}");
        for (i, d) in dims.iter().enumerate() {
            b[at + 4 + 8 * i..at + 12 + 8 * i].copy_from_slice(&d.to_le_bytes());
        }
    }
    let t = at + 4 + 8 * n_dims;
    if let Some(ty) = dtype {
        b[t..t + 4].copy_from_slice(&ty.to_le_bytes());
    }
    if let Some(o) = offset {
        b[t + 4..t + 12].copy_from_slice(&o.to_le_bytes());
    }
}

/// What loading a file (and, when it loads, asking it for two tokens) gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Loaded and answered.
    Answered,
    /// Load or generation failed with this error.
    Error(String),
}

/// The child side: loads the files named in $TT_HOSTILE_CASES (one path a line), printing
/// `CASE i START` before and `CASE i OK` / `CASE i ERR message` after each.
pub fn child_load_cases() -> bool {
    let Some(list) = std::env::var_os("TT_HOSTILE_CASES") else {
        return false;
    };
    let list = std::fs::read_to_string(list).unwrap();
    for (i, path) in list.lines().enumerate() {
        announce(i);
        report(i, &load_and_answer(Path::new(path)));
    }
    true
}

pub fn announce(i: usize) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "CASE {i} START").unwrap();
    out.flush().unwrap();
}

pub fn report(i: usize, o: &Outcome) {
    let mut out = std::io::stdout().lock();
    match o {
        Outcome::Answered => writeln!(out, "CASE {i} OK").unwrap(),
        Outcome::Error(e) => writeln!(out, "CASE {i} ERR {}", e.replace('\n', " | ")).unwrap(),
    }
    out.flush().unwrap();
}

pub fn load_and_answer(path: &Path) -> Outcome {
    let mut e = match Engine::load(
        path,
        &LoadOptions {
            n_ctx: 256,
            ..Default::default()
        },
        &Device::Cpu,
    ) {
        Ok(e) => e,
        Err(e) => return Outcome::Error(format!("{e:#}")),
    };
    let params = GenParams {
        max_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    match e.generate(&[Message::new(Role::User, "hi")], &params, |_| {
        Flow::Continue
    }) {
        Ok(_) => Outcome::Answered,
        Err(e) => Outcome::Error(format!("{e:#}")),
    }
}

/// Runs this test binary's test `entry` in a child process under the memory limit, with
/// `env` set; returns its stdout. Panics (failing the calling test) when the child dies of
/// a signal or exits non-zero, naming the case it was on.
pub fn run_child(entry: &str, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -v {} && exec \"$0\" \"$@\"",
            CHILD_MEMORY_MB * 1024
        ))
        .arg(exe)
        .args([entry, "--exact", "--nocapture", "--test-threads=1"])
        .env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .env("MALLOC_ARENA_MAX", "2")
        .env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running the child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let last = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with("CASE "))
            .unwrap_or("(before the first case)");
        panic!(
            "the child died ({}) at: {last}\nstderr tail: {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 2000)
        );
    }
    stdout
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len()).find(|&i| s.is_char_boundary(i)).unwrap();
    &s[start..]
}

/// Loads each file in a capped child; one outcome per file.
pub fn load_capped(entry: &str, dir: &Path, files: &[PathBuf]) -> Vec<Outcome> {
    let list = dir.join("cases.txt");
    let text: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    std::fs::write(&list, text.join("\n")).unwrap();
    let out = run_child(entry, &[("TT_HOSTILE_CASES", list.to_str().unwrap())]);
    parse_outcomes(&out, files.len())
}

pub fn parse_outcomes(out: &str, n: usize) -> Vec<Outcome> {
    let mut res = vec![None; n];
    for line in out.lines() {
        let Some(rest) = line.strip_prefix("CASE ") else {
            continue;
        };
        let (i, what) = rest.split_once(' ').unwrap();
        let i: usize = i.parse().unwrap();
        if what == "OK" {
            res[i] = Some(Outcome::Answered);
        } else if let Some(e) = what.strip_prefix("ERR ") {
            res[i] = Some(Outcome::Error(e.to_string()));
        }
    }
    res.into_iter()
        .enumerate()
        .map(|(i, o)| o.unwrap_or_else(|| panic!("case {i} reported nothing:\n{out}")))
        .collect()
}
