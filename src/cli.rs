//! Command line: `run` (one prompt, or a line-based chat), `pull`, `list`.

use crate::catalog::{fetch, Catalog, ModelRef};
use crate::engine::worker::EngineHandle;
use crate::protocol::{
    EngineCmd, EngineEvent, GenParams, LoadOptions, Message, ModelInfo, RequestId, Role,
};
use crate::stats::ollama_block;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
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
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Tokens to generate (tg tests), comma-separated; 0 skips.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Tokens already in the context before each test, comma-separated.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub depth: Vec<usize>,
    /// Threads, comma-separated (default: one per physical core).
    #[arg(short = 't', long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Repetitions of each test (after one uncounted warm-up).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: usize,
    #[arg(short = 'o', long, value_enum, default_value = "md")]
    pub output: crate::bench::Output,
}

#[derive(Debug, Args)]
pub struct UiArgs {
    /// Catalog id or path to a .gguf file (default: the catalog's default model).
    pub model: Option<String>,
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
    /// Catalog id or path to a .gguf file (default: the catalog's default model).
    pub model: Option<String>,
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
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 512)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// 1.0 disables top-p.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Context length to allocate (capped by the model's own).
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
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

pub fn list(catalog: &Catalog) {
    println!(
        "{:<32} {:<8} {:>9} {:>9} {:<8} {:>9}  LOCAL",
        "ID", "ARCH", "PARAMS", "ACTIVE", "QUANT", "SIZE"
    );
    for m in &catalog.models {
        let local = fetch::local_path(m).map_or("-".to_string(), |p| p.display().to_string());
        println!(
            "{:<32} {:<8} {:>8}B {:>8}B {:<8} {:>8.1}G  {}{}",
            m.id,
            m.arch,
            m.params_b,
            m.active_params_b,
            m.quant,
            m.size as f64 / 1e9,
            local,
            if m.id == catalog.default {
                "  (default)"
            } else {
                ""
            }
        );
    }
}

/// Loads a model on the engine thread, waiting for the handshake.
pub fn load(engine: &EngineHandle, path: PathBuf, ctx: usize) -> Result<ModelInfo> {
    engine.send(EngineCmd::Load {
        path,
        opts: LoadOptions { n_ctx: ctx },
    });
    loop {
        match engine.events.recv().context("the engine thread stopped")? {
            EngineEvent::Loading { path } => eprintln!("tokentop: loading {}", path.display()),
            EngineEvent::Ready { info } => return Ok(info),
            EngineEvent::LoadFailed { error, .. } => bail!("{error}"),
            _ => {}
        }
    }
}

pub fn run(catalog: &Catalog, args: &RunArgs) -> Result<()> {
    let path = model_path(catalog, args.model.as_deref())?;
    let engine = EngineHandle::spawn();
    let info = load(&engine, path, args.gen.ctx)?;
    eprintln!(
        "tokentop: {} ({}, {}, {:.0}M params, {}-token context) loaded in {:.2}s",
        info.name,
        info.arch,
        info.quant,
        info.params as f64 / 1e6,
        info.n_ctx,
        info.load_time.as_secs_f64()
    );

    // Ctrl-C stops the answer being streamed; at the chat prompt it quits.
    let streaming = Arc::new(AtomicU64::new(0));
    {
        let streaming = streaming.clone();
        let tx = engine.sender();
        ctrlc::set_handler(move || match streaming.load(Ordering::SeqCst) {
            0 => std::process::exit(130),
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
        return ask(&mut history, prompt.clone(), true);
    }
    eprintln!("tokentop: chat with {} — /reset forgets the conversation, /bye or Ctrl-D quits, Ctrl-C stops an answer", info.name);
    let stdin = std::io::stdin();
    let mut first = true;
    loop {
        eprint!(">>> ");
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
                eprintln!("tokentop: conversation cleared");
                continue;
            }
            _ => {}
        }
        if let Err(e) = ask(&mut history, line, first) {
            eprintln!("tokentop: {e:#}");
        }
        first = false;
    }
    Ok(())
}

/// Prints the tokens of `req` as they come and the stats block at the end; returns the text.
fn stream_answer(
    engine: &EngineHandle,
    req: RequestId,
    load: std::time::Duration,
) -> Result<String> {
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    loop {
        match engine.events.recv().context("the engine thread stopped")? {
            EngineEvent::Token { req: r, text: t } if r == req => {
                out.write_all(t.as_bytes())?;
                out.flush()?;
                text.push_str(&t);
            }
            EngineEvent::Finished {
                req: r,
                stats,
                reason,
            } if r == req => {
                writeln!(out)?;
                out.flush()?;
                eprint!("\n{}", ollama_block(&stats, load, reason));
                return Ok(text);
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
    eprintln!("tokentop: measuring memory bandwidth…");
    let p = crate::roofline::probe(&path)?;
    println!(
        "{}: {:.1} GB/s read bandwidth, {:.1} GB memory (saved to {})",
        p.name,
        p.bandwidth_gbs,
        p.memory_gb,
        path.display()
    );
    Ok(())
}

pub fn ui(catalog: Catalog, args: &UiArgs) -> Result<()> {
    let theme = crate::theme::Theme::load(&args.theme)?;
    // The model is fetched (with a progress bar) before the screen is taken over.
    let model = model_path(&catalog, args.model.as_deref())?;
    let profiles = crate::roofline::profiles(local_profile_path().ok().as_deref());
    crate::app::run(crate::app::AppConfig {
        model,
        catalog,
        theme,
        params: args.gen.params(),
        n_ctx: args.gen.ctx,
        profiles,
        system: args.system.clone(),
    })
}

pub fn bench(catalog: &Catalog, b: &BenchCli) -> Result<()> {
    if b.reps == 0 {
        bail!("-r must be at least 1");
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
    crate::bench::run(&crate::bench::BenchArgs {
        models,
        n_prompt: b.n_prompt.clone(),
        n_gen: b.n_gen.clone(),
        depth: b.depth.clone(),
        threads,
        reps: b.reps,
        output: b.output,
    })
}
