//! Command line: `run` (one prompt, or a line-based chat), `pull`, `list`.

use crate::catalog::{fetch, Catalog, ModelRef};
use crate::engine::worker::EngineHandle;
use crate::protocol::{
    EngineCmd, EngineEvent, GenParams, KvType, KvTypes, LoadOptions, Message, ModelInfo, RequestId,
    Role,
};
use crate::stats::ollama_block;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "tokentop",
    version,
    about = "top for tokens: chat with local GGUF models and see the real speed"
)]
pub struct Cli {
    /// A models.toml to use instead of the built-in catalog.
    #[arg(long, global = true, env = "TOKENTOP_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// Open no network connection: models not on disk are not downloaded (also
    /// TOKENTOP_OFFLINE=1 or HF_HUB_OFFLINE=1).
    #[arg(long, global = true)]
    pub offline: bool,
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Answer one prompt (--prompt) or chat line by line; prints Ollama-style stats.
    Run(RunArgs),
    /// Download a catalog model into the model store.
    Pull {
        /// Catalog id (see `tokentop list`).
        model: String,
    },
    /// Show the catalog and which models are on this machine.
    List,
    /// The full-screen chat with live speed, memory and power panes (the default).
    Ui(UiArgs),
    /// Measure this machine's memory bandwidth for the roofline line.
    Probe,
    /// Benchmark like llama-bench: pp/tg tests, t/s as mean ± stddev, plus TTFT, peak RSS, J/token.
    Bench(BenchCli),
    /// Perplexity of a model on a text file, with llama-perplexity's method and output.
    Perplexity(PerplexityCli),
    /// Top for inference servers: llama-server, vLLM, SGLang, Ollama, refreshed every second.
    Top(TopArgs),
}

#[derive(Debug, Args)]
pub struct PerplexityCli {
    /// Catalog id or path to a .gguf file.
    #[arg(short, long, default_value = "smollm2-135m")]
    pub model: String,
    /// The text to score (UTF-8).
    #[arg(short = 'f', long = "file")]
    pub file: std::path::PathBuf,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512, allow_negative_numbers = true,
          value_parser = count("context", 4, MAX_TOKENS_ARG))]
    pub ctx: usize,
    /// Score at most this many chunks (default: all the text holds).
    #[arg(long, allow_negative_numbers = true, value_parser = count("chunks", 1, usize::MAX))]
    pub chunks: Option<usize>,
    #[command(flatten)]
    pub kv: CacheArgs,
}

/// The KV cache's element types on the CPU, with llama.cpp's option names.
#[derive(Debug, Args, Clone, Copy, Default)]
pub struct CacheArgs {
    /// Type of the cached keys on the CPU: f16, q8_0 or f32 (a GPU's cache is f32).
    #[arg(long = "cache-type-k", value_enum, default_value_t = KvType::F16)]
    pub k: KvType,
    /// Type of the cached values on the CPU: f16, q8_0 or f32.
    #[arg(long = "cache-type-v", value_enum, default_value_t = KvType::F16)]
    pub v: KvType,
}

impl CacheArgs {
    pub fn types(&self) -> KvTypes {
        KvTypes {
            k: self.k,
            v: self.v,
        }
    }
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Server base URLs (default: http://127.0.0.1:8080).
    pub urls: Vec<String>,
    /// Print plain text every second instead of the full screen (like `top -b`).
    #[arg(short, long)]
    pub batch: bool,
    /// Stop after this many refreshes (0: run until quit).
    #[arg(short = 'n', long, default_value_t = 0)]
    pub iterations: u64,
}

#[derive(Debug, Args)]
pub struct BenchCli {
    /// Models: catalog ids or .gguf paths, comma-separated.
    #[arg(short, long, value_delimiter = ',', default_value = "smollm2-135m")]
    pub model: Vec<String>,
    /// Prompt lengths to time (pp tests), comma-separated; 0 skips.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512",
        allow_negative_numbers = true,
        value_parser = count("prompt length", 0, MAX_TOKENS_ARG)
    )]
    pub n_prompt: Vec<usize>,
    /// Tokens to generate (tg tests), comma-separated; 0 skips.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128",
        allow_negative_numbers = true,
        value_parser = count("tokens to generate", 0, MAX_TOKENS_ARG)
    )]
    pub n_gen: Vec<usize>,
    /// Tokens already in the context before each test, comma-separated.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0",
        allow_negative_numbers = true,
        value_parser = count("depth", 0, MAX_TOKENS_ARG)
    )]
    pub depth: Vec<usize>,
    /// Threads, comma-separated, 1 to 1024 (default: one per physical core).
    #[arg(short = 't', long, value_delimiter = ',', allow_negative_numbers = true,
          value_parser = count("threads", 1, MAX_THREADS))]
    pub threads: Vec<usize>,
    /// Repetitions of each test (after one uncounted warm-up), 1 to 10000.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5, allow_negative_numbers = true,
          value_parser = count("repetitions", 1, MAX_REPS))]
    pub reps: usize,
    #[arg(short = 'o', long, value_enum, default_value = "md")]
    pub output: crate::bench::Output,
    #[command(flatten)]
    pub kv: CacheArgs,
}

#[derive(Debug, Args)]
pub struct UiArgs {
    /// Catalog id or path to a .gguf file (default: the catalog's default model); with
    /// --endpoint, a model the server serves (default: its first).
    pub model: Option<String>,
    /// Chat with a server instead of the embedded engine: a URL (http://host:8080) or a
    /// name in endpoints.toml (see the README).
    #[arg(long, env = "TOKENTOP_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Colour theme: dark, light, high-contrast, or a theme .toml file.
    #[arg(long, default_value = "dark")]
    pub theme: String,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub gen: GenArgs,
}

#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Catalog id or path to a .gguf file (default: the catalog's default model); with
    /// --endpoint, a model the server serves (default: its first).
    pub model: Option<String>,
    /// Chat with a server instead of the embedded engine: a URL (http://host:8080) or a
    /// name in endpoints.toml (see the README).
    #[arg(long, env = "TOKENTOP_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Answer this prompt and exit; without it, chat on stdin.
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub gen: GenArgs,
}

#[derive(Debug, Args, Clone)]
pub struct GenArgs {
    /// Most tokens to generate (at least 1).
    #[arg(short = 'n', long, default_value_t = 512, allow_negative_numbers = true,
          value_parser = count("max tokens", 1, MAX_TOKENS_ARG))]
    pub max_tokens: usize,
    /// 0 = greedy; otherwise from 0.001 to 100.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true, value_parser = temperature)]
    pub temperature: f64,
    /// Sample only from the K most likely tokens; 0 = all tokens (top-k off).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true,
          value_parser = count("top-k", 0, usize::MAX))]
    pub top_k: usize,
    /// Sample from the smallest set of tokens whose probabilities add up to P, in (0, 1];
    /// 1 = top-p off.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true, value_parser = top_p)]
    pub top_p: f64,
    /// Penalty for repeating recent tokens, from 0.01 to 100; 1 = off.
    #[arg(long, default_value_t = 1.1, allow_negative_numbers = true, value_parser = repeat_penalty)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at; 0 = off.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true,
          value_parser = count("repeat-last-n", 0, usize::MAX))]
    pub repeat_last_n: usize,
    /// Seed of the sampler's random numbers, 0 to 18446744073709551615.
    #[arg(long, default_value_t = 42, allow_negative_numbers = true, value_parser = seed)]
    pub seed: u64,
    /// Context length to allocate, 1 to 16777216 (capped by the model's own).
    #[arg(long, default_value_t = 4096, allow_negative_numbers = true,
          value_parser = count("context length", 1, MAX_TOKENS_ARG))]
    pub ctx: usize,
    #[command(flatten)]
    pub kv: CacheArgs,
}

/// The largest token count any option takes (2^24 = 16,777,216): more than any model's
/// context, and small enough that sums of counts never overflow.
pub const MAX_TOKENS_ARG: usize = 1 << 24;
/// Most benchmark threads.
pub const MAX_THREADS: usize = 1024;
/// Most benchmark repetitions.
pub const MAX_REPS: usize = 10_000;

/// A clap value parser for a whole number from `min` to `max`, whose errors name `what`.
fn count(
    what: &'static str,
    min: usize,
    max: usize,
) -> impl Fn(&str) -> std::result::Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let n: usize = match s.trim().parse() {
            Ok(n) => n,
            Err(_) if s.trim().starts_with('-') => return Err(at_least(what, min)),
            Err(_) if !s.trim().is_empty() && s.trim().bytes().all(|b| b.is_ascii_digit()) => {
                return Err(format!("{what} must be at most {max}"))
            }
            Err(_) => return Err(format!("{what} must be a whole number")),
        };
        if n < min {
            Err(at_least(what, min))
        } else if n > max {
            Err(format!("{what} must be at most {max}"))
        } else {
            Ok(n)
        }
    }
}

fn at_least(what: &str, min: usize) -> String {
    if min == 0 {
        format!("{what} must be 0 or more")
    } else {
        format!("{what} must be at least {min}")
    }
}

/// A finite number (NaN and infinities are refused here, once, for every float option).
fn finite(s: &str, what: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(format!("{what} must be a finite number")),
    }
}

/// Below 0.001 the logits divided by the temperature overflow f32 and sampling breaks down,
/// and 0 already means greedy; above 100 every token is as likely as any other.
fn temperature(s: &str) -> std::result::Result<f64, String> {
    let t = finite(s, "temperature")?;
    if t == 0.0 || (0.001..=100.0).contains(&t) {
        Ok(t)
    } else {
        Err("temperature must be 0 (greedy) or from 0.001 to 100".into())
    }
}

fn seed(s: &str) -> std::result::Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("seed must be a whole number from 0 to {}", u64::MAX))
}

fn top_p(s: &str) -> std::result::Result<f64, String> {
    let p = finite(s, "top-p")?;
    if p > 0.0 && p <= 1.0 {
        Ok(p)
    } else {
        Err("top-p must be above 0 and at most 1 (1 turns it off)".into())
    }
}

fn repeat_penalty(s: &str) -> std::result::Result<f32, String> {
    let r = finite(s, "repeat penalty")?;
    if (0.01..=100.0).contains(&r) {
        Ok(r as f32)
    } else {
        Err("repeat penalty must be from 0.01 to 100 (1 turns it off)".into())
    }
}

/// Exit without a message: a signal ended tokentop (status 128 + its number) or stdout was
/// closed under it (141, as if SIGPIPE had ended it, so pipelines read as with `cat`).
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
pub struct QuietExit(pub i32);

pub const SIGINT: i32 = 2;
pub const SIGPIPE: i32 = 13;

/// A write to stdout failed: a closed reader (EPIPE) becomes a quiet exit.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        QuietExit(128 + SIGPIPE).into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// Prints to stdout, turning a closed reader into a quiet exit (`print!` would panic).
pub fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(stdout_error)
}

/// `eprintln!` that never panics: a closed or hung-up stderr loses the line, nothing else.
macro_rules! note {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// One line for a command-line error from clap, without its usage block: "invalid value
/// '0' for '--max-tokens <MAX_TOKENS>': max tokens must be at least 1".
pub fn clap_error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut parts: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        parts.push(line.strip_prefix("tip: ").unwrap_or(line).to_string());
    }
    let mut line = String::new();
    for part in parts {
        if !line.is_empty() {
            let glue = line.ends_with(':') || part.starts_with("[possible values");
            line.push_str(if glue { " " } else { "; " });
        }
        line.push_str(&part);
    }
    if line.is_empty() {
        line = "bad command line (see `tokentop --help`)".into();
    }
    line
}

impl Default for UiArgs {
    fn default() -> Self {
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            u: UiArgs,
        }
        W::parse_from(["tokentop"]).u
    }
}

impl Default for GenArgs {
    fn default() -> Self {
        Self::parse_from(["x"])
    }
}

impl GenArgs {
    fn parse_from<I: IntoIterator<Item = &'static str>>(args: I) -> Self {
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            g: GenArgs,
        }
        W::parse_from(args).g
    }

    pub fn params(&self) -> GenParams {
        GenParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: (self.top_k > 0).then_some(self.top_k),
            top_p: (self.top_p < 1.0).then_some(self.top_p),
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
            ignore_eos: false,
        }
    }
}

pub fn load_catalog(path: Option<&PathBuf>) -> Result<Catalog> {
    match path {
        Some(p) => Catalog::load(p),
        None => Ok(Catalog::builtin()),
    }
}

/// A model argument turned into a file on disk, fetching catalog models on first use.
pub fn model_path(catalog: &Catalog, arg: Option<&str>) -> Result<PathBuf> {
    match catalog.resolve(arg)? {
        ModelRef::Path(p) => Ok(p),
        ModelRef::Catalog(m) => fetch::ensure_local(m, fetch::Report::Terminal),
    }
}

/// The catalog, each model with where it is on this machine (SOURCE: store, hf-cache,
/// ollama, lmstudio), then the GGUFs of other tools' stores that are no catalog model,
/// by the id `run` accepts. What a store holds that cannot be used is one warning line each.
pub fn list(catalog: &Catalog) -> Result<()> {
    let found = crate::catalog::discover::scan();
    for w in &found.warnings {
        note!("tokentop: warning: {w}");
    }
    let mut out = format!(
        "{:<32} {:<8} {:>9} {:>9} {:<8} {:>9}  {:<24} {:<8}  LOCAL\n",
        "ID", "ARCH", "PARAMS", "ACTIVE", "QUANT", "SIZE", "TAGS", "SOURCE"
    );
    let mut used = Vec::new();
    for m in &catalog.models {
        let local = fetch::locate(m, &found.found);
        let (source, path) = local.as_ref().map_or(("-", "-".to_string()), |(p, o)| {
            used.push(p.clone());
            (o.label(), p.display().to_string())
        });
        out.push_str(&format!(
            "{:<32} {:<8} {:>8}B {:>8}B {:<8} {:>9}  {:<24} {:<8}  {}{}\n",
            m.id,
            m.arch,
            m.params_b,
            m.active_params_b,
            m.quant,
            format!(
                "{}{:.1}G",
                if m.approx_size { "~" } else { "" },
                m.size as f64 / 1e9
            ),
            if m.tags.is_empty() {
                "-".to_string()
            } else {
                m.tags.join(",")
            },
            source,
            path,
            if m.id == catalog.default {
                "  (default)"
            } else {
                ""
            }
        ));
    }
    for f in found.found.iter().filter(|f| !used.contains(&f.path)) {
        out.push_str(&format!(
            "{:<32} {:<8} {:>9} {:>9} {:<8} {:>8.1}G  {:<15} {:<8}  {}\n",
            f.id,
            "-",
            "-",
            "-",
            "-",
            f.size as f64 / 1e9,
            "-",
            f.origin.label(),
            f.path.display()
        ));
    }
    print_out(&out)
}

/// The engine thread is gone (it ended or panicked) while we waited for its answer.
#[derive(Debug, thiserror::Error)]
#[error("the engine stopped: {}", crate::app::engine_panic().unwrap_or_else(|| "its thread ended".into()))]
struct EngineGone;

/// Loads a model on the engine thread, waiting for the handshake.
pub fn load(engine: &EngineHandle, path: PathBuf, ctx: usize) -> Result<ModelInfo> {
    load_on(engine, path, ctx, KvTypes::default(), false)
}

fn load_on(
    engine: &EngineHandle,
    path: PathBuf,
    ctx: usize,
    kv: KvTypes,
    remote: bool,
) -> Result<ModelInfo> {
    engine.send(EngineCmd::Load {
        path,
        opts: LoadOptions {
            n_ctx: ctx,
            kv,
            ..Default::default()
        },
    });
    loop {
        match engine.events.recv().map_err(|_| EngineGone)? {
            EngineEvent::Loading { path } if remote => {
                if path.as_os_str().is_empty() {
                    note!("tokentop: asking the server which model it serves")
                } else {
                    note!("tokentop: asking the server for {}", path.display())
                }
            }
            EngineEvent::Loading { path } => note!("tokentop: loading {}", path.display()),
            EngineEvent::Ready { info } => return Ok(info),
            EngineEvent::LoadFailed { error, .. } => bail!("{error}"),
            _ => {}
        }
    }
}

pub fn run(catalog: &Catalog, args: &RunArgs) -> Result<()> {
    let (engine, path) = match &args.endpoint {
        Some(e) => {
            let ep = crate::remote::resolve(e, args.model.as_deref())?;
            let model = PathBuf::from(ep.model.clone().unwrap_or_default());
            (crate::remote::worker::spawn(ep), model)
        }
        None => (
            EngineHandle::spawn(),
            model_path(catalog, args.model.as_deref())?,
        ),
    };
    // An engine panic is reported as one error line rather than a panic message.
    let _hook = crate::app::PanicHook::install(false);
    let remote = args.endpoint.is_some();
    let mut info = load_on(&engine, path, args.gen.ctx, args.gen.kv.types(), remote)?;
    if !remote {
        info.name = catalog.model_title(&info.path);
    }
    if remote {
        note!(
            "tokentop: {} ({}, {}), found in {:.2}s",
            info.name,
            info.quant,
            info.tokenizer_source,
            info.load_time.as_secs_f64()
        );
    } else {
        note!(
            "tokentop: {} ({}, {}, {:.0}M params, {}-token context) loaded in {:.2}s",
            info.name,
            info.arch,
            info.quant,
            info.params as f64 / 1e6,
            info.n_ctx,
            info.load_time.as_secs_f64()
        );
    }

    // Ctrl-C stops the answer being streamed (a second one, before it has stopped, quits);
    // at the chat prompt it quits. Quitting on Ctrl-C exits with 130 (128 + SIGINT).
    let streaming = Arc::new(AtomicU64::new(0));
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let streaming = streaming.clone();
        let interrupted = interrupted.clone();
        let tx = engine.sender();
        ctrlc::set_handler(move || match streaming.load(Ordering::SeqCst) {
            0 => std::process::exit(128 + SIGINT),
            _ if interrupted.swap(true, Ordering::SeqCst) => std::process::exit(128 + SIGINT),
            req => {
                let _ = tx.send(EngineCmd::Cancel { req });
            }
        })
        .context("installing the Ctrl-C handler")?;
    }

    let mut history: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new(Role::System, s.clone()))
        .collect();
    let params = args.gen.params();
    let mut next_req: RequestId = 1;
    let mut ask = |history: &mut Vec<Message>, text: String, first: bool| -> Result<()> {
        history.push(Message::new(Role::User, text));
        let req = next_req;
        next_req += 1;
        interrupted.store(false, Ordering::SeqCst);
        streaming.store(req, Ordering::SeqCst);
        engine.send(EngineCmd::Generate {
            req,
            messages: history.clone(),
            params: params.clone(),
        });
        let answer = stream_answer(
            &engine,
            req,
            if first {
                info.load_time
            } else {
                Default::default()
            },
        );
        streaming.store(0, Ordering::SeqCst);
        match answer {
            Ok(text) => {
                history.push(Message::new(Role::Assistant, text));
                Ok(())
            }
            Err(e) => {
                history.pop();
                Err(e)
            }
        }
    };

    if let Some(prompt) = &args.prompt {
        ask(&mut history, prompt.clone(), true)?;
        if interrupted.load(Ordering::SeqCst) {
            return Err(QuietExit(128 + SIGINT).into());
        }
        return Ok(());
    }
    note!("tokentop: chat with {} — /reset forgets the conversation, /drop its oldest exchange, /bye or Ctrl-D quits, Ctrl-C stops an answer", info.name);
    let stdin = std::io::stdin();
    let mut first = true;
    loop {
        let _ = write!(std::io::stderr(), ">>> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']).to_string();
        match line.trim() {
            "" => continue,
            "/bye" | "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == Role::System);
                note!("tokentop: conversation cleared");
                continue;
            }
            "/drop" => {
                match drop_oldest_exchange(&mut history) {
                    Some(chars) => note!(
                        "tokentop: dropped the oldest exchange ({chars} characters); send the prompt again"
                    ),
                    None => note!("tokentop: nothing to drop"),
                }
                continue;
            }
            _ => {}
        }
        if let Err(e) = ask(&mut history, line, first) {
            // A closed stdout or a dead engine ends the chat; other errors end one answer.
            if e.is::<QuietExit>() || e.is::<EngineGone>() {
                return Err(e);
            }
            if crate::protocol::is_context_overflow(&format!("{e:#}")) {
                note!("tokentop: {e:#} — /drop forgets the oldest exchange, /reset starts a new conversation");
            } else {
                note!("tokentop: {e:#}");
            }
        }
        first = false;
    }
    Ok(())
}

/// Removes the oldest user turn and the answers after it (system prompts stay); returns the
/// characters removed, or None when there is no exchange to drop.
fn drop_oldest_exchange(history: &mut Vec<Message>) -> Option<usize> {
    let start = history.iter().position(|m| m.role == Role::User)?;
    let end = history[start + 1..]
        .iter()
        .position(|m| m.role == Role::User)
        .map_or(history.len(), |i| start + 1 + i);
    let dropped: Vec<Message> = history.drain(start..end).collect();
    Some(dropped.iter().map(|m| m.content.chars().count()).sum())
}

/// Prints the tokens of `req` as they come and the stats block at the end; returns the text
/// without its thinking block (what the next turn sends back, as llama-server does). When
/// stdout is closed under it, the answer is cancelled and the error is a quiet exit.
fn stream_answer(
    engine: &EngineHandle,
    req: RequestId,
    load: std::time::Duration,
) -> Result<String> {
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    let sent = std::time::Instant::now();
    let mut think = crate::think::Tracker::default();
    let stop = |e: std::io::Error| {
        engine.send(EngineCmd::Cancel { req });
        stdout_error(e)
    };
    loop {
        match engine.events.recv().map_err(|_| EngineGone)? {
            EngineEvent::Token { req: r, text: t } if r == req => {
                out.write_all(t.as_bytes())
                    .and_then(|_| out.flush())
                    .map_err(stop)?;
                text.push_str(&t);
                think.piece(&text, std::time::Instant::now());
            }
            EngineEvent::Finished {
                req: r,
                stats,
                reason,
            } if r == req => {
                writeln!(out).and_then(|_| out.flush()).map_err(stop)?;
                let mut block = ollama_block(&stats, load, reason);
                if let Some(time) = think.duration(std::time::Instant::now()) {
                    let first = think.answered.map_or("none".into(), |t| {
                        crate::stats::fmt_duration(t.saturating_duration_since(sent))
                    });
                    let mut line = |k: &str, v: String| {
                        block.push_str(&format!("{:<22}{v}\n", format!("{k}:")))
                    };
                    line("thinking count", format!("{} token(s)", think.pieces));
                    line("thinking duration", crate::stats::fmt_duration(time));
                    line("time to first answer", first);
                }
                let _ = write!(std::io::stderr(), "\n{block}");
                return Ok(crate::think::split(&text).answer.to_string());
            }
            EngineEvent::Failed { req: r, error } if r == req => bail!("{error}"),
            _ => {}
        }
    }
}

/// Where `tokentop probe` keeps this machine's profile.
pub fn local_profile_path() -> Result<PathBuf> {
    Ok(crate::catalog::data_dir()?.join("hardware-local.toml"))
}

pub fn probe() -> Result<()> {
    let path = local_profile_path()?;
    note!("tokentop: measuring memory bandwidth…");
    let (p, bw) = crate::roofline::probe(&path)?;
    print_out(&format!(
        "{}: {}, {:.1} GB memory (saved to {})\n",
        p.name,
        bw.summary(),
        p.memory_gb,
        path.display()
    ))
}

/// The message when the TUI is started without a terminal.
pub const NO_TERMINAL: &str = "the TUI needs a terminal; use `tokentop run --prompt …` for scripts";

pub fn ui(catalog: Catalog, args: &UiArgs) -> Result<()> {
    // Checked before anything is fetched or loaded.
    if !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()) {
        bail!(NO_TERMINAL);
    }
    let theme = crate::theme::Theme::load(&args.theme)?;
    let endpoint = match &args.endpoint {
        Some(e) => Some(crate::remote::resolve(e, args.model.as_deref())?),
        None => None,
    };
    // The model is fetched (with a progress bar) before the screen is taken over.
    let model = match &endpoint {
        Some(ep) => crate::remote::load_path(ep.model.as_deref().unwrap_or_default()),
        None => model_path(&catalog, args.model.as_deref())?,
    };
    let profiles = crate::roofline::profiles(local_profile_path().ok().as_deref());
    let ended_by = crate::app::run(crate::app::AppConfig {
        model,
        catalog,
        theme,
        params: args.gen.params(),
        n_ctx: args.gen.ctx,
        kv: args.gen.kv.types(),
        profiles,
        system: args.system.clone(),
        endpoint,
    })?;
    match ended_by {
        Some(signal) => Err(QuietExit(128 + signal).into()),
        None => Ok(()),
    }
}

pub fn perplexity(catalog: &Catalog, p: &PerplexityCli) -> Result<()> {
    let text =
        std::fs::read(&p.file).with_context(|| format!("cannot read {}", p.file.display()))?;
    let text = String::from_utf8(text)
        .map_err(|e| anyhow!("{} is not UTF-8 text ({e})", p.file.display()))?;
    let path = model_path(catalog, Some(&p.model))?;
    let device = crate::engine::default_device();
    let opts = LoadOptions {
        n_ctx: p.ctx,
        kv: p.kv.types(),
        ..Default::default()
    };
    let mut engine = crate::engine::Engine::load(&path, &opts, &device)?;
    let result = crate::perplexity::perplexity(&mut engine, &text, p.ctx, p.chunks, |i, est| {
        // Printed as it goes, like llama-perplexity: a run over a long text takes minutes.
        let _ = print_out(&format!("[{}]{est:.4},", i + 1));
    })?;
    print_out(&format!(
        "\nFinal estimate: PPL = {:.4} +/- {:.5}\n",
        result.ppl, result.error
    ))?;
    note!(
        "perplexity: {} on {}: {} tokens, {} chunks of {}",
        path.display(),
        p.file.display(),
        result.tokens,
        result.estimates.len(),
        p.ctx
    );
    Ok(())
}

pub fn bench(catalog: &Catalog, b: &BenchCli) -> Result<()> {
    // Checked before any model is fetched.
    if !b.n_prompt.iter().chain(&b.n_gen).any(|&n| n > 0) {
        bail!("nothing to measure: every -p and -n is 0");
    }
    let models = b
        .model
        .iter()
        .map(|m| model_path(catalog, Some(m)))
        .collect::<Result<Vec<_>>>()?;
    let threads = if b.threads.is_empty() {
        vec![crate::engine::thread_count()]
    } else {
        b.threads.clone()
    };
    let table = crate::bench::run(&crate::bench::BenchArgs {
        models,
        n_prompt: b.n_prompt.clone(),
        n_gen: b.n_gen.clone(),
        depth: b.depth.clone(),
        threads,
        reps: b.reps,
        output: b.output,
        kv: b.kv.types(),
    })?;
    print_out(&table)
}
