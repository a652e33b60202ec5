//! `tokentop bench`: llama-bench's tests (pp512, tg128, pp512 @ d512), columns and csv/json
//! field names, plus TTFT, peak RSS and energy per token where a power source is readable.
//! candle sizes its thread pool once per process, so each thread count of a matrix runs in a
//! child process.

use crate::engine::{backend_name, default_device, gguf::Gguf, model::Model};
use crate::telemetry::PowerProbe;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Env var marking a child process that runs one thread count.
const CHILD: &str = "TOKENTOP_BENCH_CHILD";

#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub models: Vec<PathBuf>,
    pub n_prompt: Vec<usize>,
    pub n_gen: Vec<usize>,
    pub depth: Vec<usize>,
    pub threads: Vec<usize>,
    pub reps: usize,
    pub output: Output,
    /// KV cache element types on the CPU.
    pub kv: crate::protocol::KvTypes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Md,
    Csv,
    Json,
    Jsonl,
}

/// One row, with llama-bench's field names (and a few of tokentop's own after them).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Row {
    pub build_commit: String,
    pub cpu_info: String,
    pub backends: String,
    pub model_filename: String,
    pub model_type: String,
    pub model_size: u64,
    pub model_n_params: u64,
    pub n_threads: usize,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub n_depth: usize,
    pub test_time: String,
    pub avg_ns: u64,
    pub stddev_ns: u64,
    pub avg_ts: f64,
    pub stddev_ts: f64,
    pub samples_ns: Vec<u64>,
    pub samples_ts: Vec<f64>,
    /// Time to the first token: prompt evaluation (pp) or the first decode step (tg).
    pub ttft_ms: f64,
    pub peak_rss_bytes: Option<u64>,
    pub joules_per_token: Option<f64>,
    /// Opening the file and loading the weights onto the device, once per model (llama-bench
    /// has no such column).
    #[serde(default)]
    pub load_ms: f64,
}

impl Row {
    /// llama-bench's test name: "pp512", "tg128", "pp512 @ d512".
    pub fn test(&self) -> String {
        let base = if self.n_prompt > 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        };
        if self.n_depth > 0 {
            format!("{base} @ d{}", self.n_depth)
        } else {
            base
        }
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Peak resident memory of this process (Linux VmHWM).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Pseudo-random prompt tokens, as llama-bench feeds.
fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab.max(1)) as u32)
        .collect()
}

struct Measured {
    elapsed: Duration,
    first: Duration,
    joules: Option<f64>,
}

fn run_once(
    model: &mut Model,
    n_prompt: usize,
    n_gen: usize,
    depth: usize,
    salt: usize,
) -> Result<Measured> {
    let vocab = model.vocab_size();
    model.truncate_cache(0);
    for chunk in tokens(depth, vocab, salt + 1).chunks(512) {
        model.forward(chunk)?;
    }
    let mut power = PowerProbe::discover(Path::new("/sys"));
    let start = Instant::now();
    power.read(start);
    let first;
    if n_prompt > 0 {
        let mut logits = None;
        for chunk in tokens(n_prompt, vocab, salt).chunks(512) {
            logits = Some(model.forward(chunk)?);
        }
        if let Some(l) = logits {
            l.argmax(0)?.to_scalar::<u32>()?;
        }
        first = start.elapsed();
    } else {
        let mut next = tokens(1, vocab, salt)[0];
        let mut first_at = None;
        for _ in 0..n_gen {
            let logits = model.forward(&[next])?;
            next = logits.argmax(0)?.to_scalar::<u32>()?;
            first_at.get_or_insert_with(|| start.elapsed());
        }
        first = first_at.unwrap_or_default();
    }
    let elapsed = start.elapsed();
    let joules = power
        .read(Instant::now())
        .watts()
        .map(|w| w * elapsed.as_secs_f64());
    Ok(Measured {
        elapsed,
        first,
        joules,
    })
}

/// Runs the matrix for the thread count this process was started with.
fn run_here(args: &BenchArgs, threads: usize) -> Result<Vec<Row>> {
    let device = default_device();
    let mut rows = Vec::new();
    for path in &args.models {
        let load_start = Instant::now();
        let mut g = Gguf::open(path)?;
        let max_depth = args.depth.iter().max().copied().unwrap_or(0);
        let longest = args
            .n_prompt
            .iter()
            .chain(&args.n_gen)
            .max()
            .copied()
            .unwrap_or(0);
        // The command line bounds each count, but a bad sum must be an error, not a wrap.
        let needed = max_depth
            .checked_add(longest)
            .and_then(|n| n.checked_add(1))
            .with_context(|| {
                format!("depth {max_depth} + {longest} tokens exceed any model's context")
            })?;
        let mut model = Model::load(&mut g, needed, &device)?;
        model.set_kv_types(args.kv)?;
        let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
        if model.n_ctx < needed {
            bail!(
                "{}: depth {max_depth} + {longest} tokens exceed the model's context of {}",
                path.display(),
                model.n_ctx
            );
        }
        let size_label = {
            let p = g.parameter_count() as f64;
            if p >= 1e9 {
                format!("{:.0}B", p / 1e9)
            } else {
                format!("{:.0}M", p / 1e6)
            }
        };
        let model_type = format!(
            "{} {size_label} {}",
            model.hp.arch.as_str(),
            g.dominant_quant()
        );
        let mut tests: Vec<(usize, usize)> = args
            .n_prompt
            .iter()
            .filter(|&&p| p > 0)
            .map(|&p| (p, 0))
            .collect();
        tests.extend(args.n_gen.iter().filter(|&&n| n > 0).map(|&n| (0, n)));
        for &depth in &args.depth {
            for &(p, n) in &tests {
                run_once(&mut model, p, n, depth, 0)?; // warm-up, not counted
                let mut samples = Vec::new();
                for rep in 0..args.reps {
                    samples.push(run_once(&mut model, p, n, depth, rep + 1)?);
                }
                let tokens = (p + n) as f64;
                let ns: Vec<u64> = samples
                    .iter()
                    .map(|m| m.elapsed.as_nanos() as u64)
                    .collect();
                let ts: Vec<f64> = samples
                    .iter()
                    .map(|m| tokens / m.elapsed.as_secs_f64())
                    .collect();
                let (avg_ns, std_ns) = mean_std(&ns.iter().map(|&x| x as f64).collect::<Vec<_>>());
                let (avg_ts, std_ts) = mean_std(&ts);
                let joules: Option<Vec<f64>> = samples.iter().map(|m| m.joules).collect();
                rows.push(Row {
                    build_commit: env!("CARGO_PKG_VERSION").into(),
                    cpu_info: cpu_info(),
                    backends: backend_name(&device).into(),
                    model_filename: path.display().to_string(),
                    model_type: model_type.clone(),
                    model_size: g.weight_bytes(),
                    model_n_params: g.parameter_count(),
                    n_threads: threads,
                    n_prompt: p,
                    n_gen: n,
                    n_depth: depth,
                    test_time: now_rfc3339(),
                    avg_ns: avg_ns as u64,
                    stddev_ns: std_ns as u64,
                    avg_ts,
                    stddev_ts: std_ts,
                    samples_ns: ns,
                    samples_ts: ts,
                    ttft_ms: samples
                        .iter()
                        .map(|m| m.first.as_secs_f64() * 1e3)
                        .sum::<f64>()
                        / samples.len() as f64,
                    peak_rss_bytes: peak_rss(),
                    joules_per_token: joules
                        .map(|j| j.iter().sum::<f64>() / (tokens * j.len() as f64)),
                    load_ms,
                });
            }
        }
    }
    Ok(rows)
}

fn cpu_info() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = crate::engine::template::civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Runs the whole matrix and returns it in the chosen format, for the caller to print.
pub fn run(args: &BenchArgs) -> Result<String> {
    let rows = if std::env::var_os(CHILD).is_some() {
        let threads = crate::engine::thread_count();
        run_here(args, threads)?
    } else {
        let mut rows = Vec::new();
        for &t in &args.threads {
            rows.extend(run_child(args, t)?);
        }
        rows
    };
    format(&rows, args.output)
}

fn run_child(args: &BenchArgs, threads: usize) -> Result<Vec<Row>> {
    let exe = std::env::current_exe()?;
    let list = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let models: Vec<String> = args
        .models
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let out = std::process::Command::new(exe)
        .env(CHILD, "1")
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .env("RAYON_NUM_THREADS", threads.to_string())
        .args([
            "bench",
            "-m",
            &models.join(","),
            "-p",
            &list(&args.n_prompt),
            "-n",
            &list(&args.n_gen),
        ])
        .args([
            "-d",
            &list(&args.depth),
            "-r",
            &args.reps.to_string(),
            "-t",
            &threads.to_string(),
            "-o",
            "jsonl",
            "--cache-type-k",
            args.kv.k.as_str(),
            "--cache-type-v",
            args.kv.v.as_str(),
        ])
        .stderr(std::process::Stdio::piped())
        .output()
        .context("starting the benchmark process")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // The child's one-line error becomes ours, so that the user sees it once.
        match stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("tokentop: error: "))
        {
            Some(error) => bail!("{error}"),
            None => bail!(
                "the benchmark with {threads} threads failed ({}): {}",
                out.status,
                stderr.trim()
            ),
        }
    }
    {
        use std::io::Write as _;
        let _ = std::io::stderr().write_all(stderr.as_bytes());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).context("reading a benchmark row"))
        .collect()
}

pub fn format(rows: &[Row], output: Output) -> Result<String> {
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(rows)? + "\n",
        Output::Jsonl => rows
            .iter()
            .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
            .collect::<Result<String, _>>()?,
        Output::Csv => {
            let mut s = String::from("build_commit,cpu_info,backends,model_filename,model_type,model_size,model_n_params,n_threads,n_prompt,n_gen,n_depth,test_time,avg_ns,stddev_ns,avg_ts,stddev_ts,ttft_ms,peak_rss_bytes,joules_per_token,load_ms\n");
            for r in rows {
                let opt = |v: Option<String>| v.unwrap_or_default();
                s.push_str(&format!(
                    "\"{}\",\"{}\",\"{}\",\"{}\",\"{}\",{},{},{},{},{},{},\"{}\",{},{},{:.6},{:.6},{:.3},{},{},{:.1}\n",
                    r.build_commit, r.cpu_info, r.backends, r.model_filename, r.model_type, r.model_size, r.model_n_params,
                    r.n_threads, r.n_prompt, r.n_gen, r.n_depth, r.test_time, r.avg_ns, r.stddev_ns, r.avg_ts, r.stddev_ts,
                    r.ttft_ms, opt(r.peak_rss_bytes.map(|x| x.to_string())), opt(r.joules_per_token.map(|x| format!("{x:.4}"))), r.load_ms
                ));
            }
            s
        }
        Output::Md => {
            let mut s = String::from("| model                          |       size |     params | backend    | threads |            test |                  t/s |  TTFT ms |   peak RSS |    J/tok | load s |\n");
            s.push_str("| ------------------------------ | ---------: | ---------: | ---------- | ------: | --------------: | -------------------: | -------: | ---------: | -------: | -----: |\n");
            for r in rows {
                let params = if r.model_n_params >= 1_000_000_000 {
                    format!("{:.2} B", r.model_n_params as f64 / 1e9)
                } else {
                    format!("{:.2} M", r.model_n_params as f64 / 1e6)
                };
                let size = if r.model_size >= 1 << 30 {
                    format!("{:.2} GiB", r.model_size as f64 / (1u64 << 30) as f64)
                } else {
                    format!("{:.2} MiB", r.model_size as f64 / (1u64 << 20) as f64)
                };
                s.push_str(&format!(
                    "| {:<30} | {:>10} | {:>10} | {:<10} | {:>7} | {:>15} | {:>20} | {:>8.1} | {:>10} | {:>8} | {:>6.2} |\n",
                    r.model_type,
                    size,
                    params,
                    r.backends,
                    r.n_threads,
                    r.test(),
                    format!("{:.2} ± {:.2}", r.avg_ts, r.stddev_ts),
                    r.ttft_ms,
                    r.peak_rss_bytes.map_or("n/a".into(), |b| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)),
                    r.joules_per_token.map_or("n/a".into(), |j| format!("{j:.3}")),
                    r.load_ms / 1e3,
                ));
            }
            s
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_and_stats() {
        let mut r: Row = serde_json::from_str(r#"{"build_commit":"x","cpu_info":"c","backends":"CPU","model_filename":"m","model_type":"llama 135M Q4_1","model_size":90177536,"model_n_params":134515008,"n_threads":2,"n_prompt":512,"n_gen":0,"n_depth":0,"test_time":"t","avg_ns":1,"stddev_ns":0,"avg_ts":328.214,"stddev_ts":3.1,"samples_ns":[1],"samples_ts":[328.2],"ttft_ms":1560.0,"peak_rss_bytes":null,"joules_per_token":null}"#).unwrap();
        assert_eq!(r.test(), "pp512");
        r.n_depth = 512;
        assert_eq!(r.test(), "pp512 @ d512");
        r.n_prompt = 0;
        r.n_gen = 128;
        r.n_depth = 0;
        assert_eq!(r.test(), "tg128");
        let md = format(&[r.clone()], Output::Md).unwrap();
        assert!(
            md.contains("| llama 135M Q4_1") && md.contains("86.00 MiB") && md.contains("134.52 M"),
            "{md}"
        );
        assert!(md.contains("328.21 ± 3.10") && md.contains("n/a"), "{md}");
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
        let csv = format(&[r], Output::Csv).unwrap();
        assert!(csv.starts_with("build_commit,") && csv.lines().count() == 2);
    }
}
