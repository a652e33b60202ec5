//! Watching inference servers: each server is polled once a second on its own thread (a slow
//! or dead one holds up no other): llama-server's `/metrics` (needs `--metrics`) and `/slots`,
//! vLLM's and SGLang's `/metrics`, Ollama's `/api/ps`. Rates are counters differenced over
//! time; a server that stops answering is shown as down. `tokentop top` draws this, and the
//! TUI's panes show it for a remote model.

use super::metrics::{self, Histogram};
use super::{Endpoint, Kind};
use anyhow::Result;
use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub const PERIOD: Duration = Duration::from_secs(1);
/// Points kept per sparkline.
const HISTORY: usize = 120;

/// One poll of one server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    pub kind: Option<Kind>,
    pub models: Vec<String>,
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    /// Prompt tokens processed since start, in-flight ones included where the server says.
    pub prompt_total: Option<f64>,
    /// Tokens generated since start, in-flight ones included (llama-server's `/slots`).
    pub gen_total: Option<f64>,
    pub kv_usage: Option<f64>,
    /// Where `kv_usage` comes from when it is not the server's own gauge.
    pub kv_source: Option<String>,
    pub ttft: Option<Histogram>,
    pub itl: Option<Histogram>,
    /// Why a number is missing (no --metrics, Ollama has no counters, …).
    pub notes: Vec<String>,
}

pub fn url_of(base: &str) -> Endpoint {
    Endpoint {
        name: base.into(),
        url: base.into(),
        model: None,
        api_key: std::env::var("TOKENTOP_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
        timeout: Duration::from_secs(2),
    }
}

/// Reads a server once; Err is why it is down.
pub fn poll(agent: &ureq::Agent, base: &str) -> std::result::Result<Reading, String> {
    poll_endpoint(agent, &url_of(base))
}

/// [`poll`] with an endpoint's API key.
pub fn poll_endpoint(agent: &ureq::Agent, ep: &Endpoint) -> std::result::Result<Reading, String> {
    let ep = ep.clone();
    let base = ep.url.as_str();
    let mut r = Reading::default();
    let metrics_text = super::get(agent, &ep, "/metrics");
    let refused = |e: &anyhow::Error| {
        let s = format!("{e:#}");
        s.contains("cannot connect") || s.contains("timeout") || s.contains("resolve")
    };
    if let Err(e) = &metrics_text {
        if refused(e) {
            return Err(format!("{e:#}"));
        }
    }
    if let Some(m) = metrics_text.ok().and_then(|t| metrics::parse(&t).ok()) {
        if m.kind.is_some() {
            r.kind = m.kind;
            r.models = m.models;
            r.running = m.running;
            r.waiting = m.waiting;
            r.prompt_total = m.prompt_tokens;
            r.gen_total = m.generation_tokens;
            r.kv_usage = m.kv_usage;
            r.ttft = m.ttft;
            r.itl = m.itl;
        }
    }
    if r.kind.is_none() || r.kind == Some(Kind::LlamaServer) {
        // llama-server counts tokens into its counters when a request ends; /slots shows
        // the ones of requests still running.
        if let Ok(body) = super::get(agent, &ep, "/slots") {
            if let Ok(slots) = parse_slots(&body) {
                let had_metrics = r.kind.is_some();
                r.kind = Some(Kind::LlamaServer);
                r.running = Some(r.running.unwrap_or(slots.busy as f64));
                r.gen_total = Some(r.gen_total.unwrap_or(0.0) + slots.decoding as f64);
                r.prompt_total = Some(r.prompt_total.unwrap_or(0.0) + slots.prompting as f64);
                if r.kv_usage.is_none() && slots.n_ctx > 0 {
                    // No KV gauge in this llama-server's /metrics: the running requests'
                    // tokens over the slots' context (cache kept by idle slots not counted).
                    r.kv_usage = Some(slots.in_context as f64 / slots.n_ctx as f64);
                    r.kv_source = Some("running requests' tokens over slot context, /slots".into());
                }
                if !had_metrics {
                    r.notes
                        .push("no /metrics: start llama-server with --metrics for counters".into());
                }
            }
        }
    }
    if r.kind.is_none() {
        if let Ok(body) = super::get(agent, &ep, "/api/ps") {
            if let Ok(ps) = parse_ollama_ps(&body) {
                r.kind = Some(Kind::Ollama);
                r.models = ps
                    .iter()
                    .map(|m| {
                        format!(
                            "{} ({:.1} GB, {:.0}% on GPU)",
                            m.name,
                            m.size as f64 / 1e9,
                            if m.size > 0 {
                                100.0 * m.size_vram as f64 / m.size as f64
                            } else {
                                0.0
                            }
                        )
                    })
                    .collect();
                r.notes.push(
                    "Ollama exposes no request or token counters: rates and queues are n/a".into(),
                );
                return Ok(r);
            }
        }
    }
    if r.models.is_empty() || r.kind == Some(Kind::LlamaServer) {
        if let Ok(body) = super::get(agent, &ep, "/v1/models") {
            if let Ok(models) = super::parse_v1_models(&body) {
                r.models = models
                    .into_iter()
                    .map(|m| {
                        std::path::Path::new(&m.id)
                            .file_name()
                            .map_or(m.id.clone(), |n| n.to_string_lossy().into_owned())
                    })
                    .collect();
                if r.kind.is_none() {
                    r.kind = Some(Kind::OpenAi);
                    r.notes
                        .push("no /metrics this tool can read: only the models are shown".into());
                }
            }
        }
    }
    if r.kind.is_none() {
        return Err(format!(
            "{base} answers, but not as an inference server (no /metrics, /slots, /api/ps or /v1/models)"
        ));
    }
    Ok(r)
}

/// llama-server's `/slots`: how many are busy and the tokens they have generated so far.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Slots {
    pub total: usize,
    pub busy: usize,
    /// Tokens generated so far by the requests running.
    pub decoding: u64,
    /// Prompt tokens evaluated so far by the requests running.
    pub prompting: u64,
    /// Context the slots have, in tokens.
    pub n_ctx: u64,
    /// Tokens in the running requests' contexts (prompt and generated).
    pub in_context: u64,
}

pub fn parse_slots(body: &str) -> Result<Slots> {
    let v: serde_json::Value = serde_json::from_str(body)?;
    let arr = v
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("/slots is not an array"))?;
    let mut s = Slots {
        total: arr.len(),
        ..Default::default()
    };
    for slot in arr {
        s.n_ctx += slot["n_ctx"].as_u64().unwrap_or(0);
        if slot["is_processing"].as_bool() == Some(true) {
            s.in_context += slot["n_prompt_tokens"].as_u64().unwrap_or(0)
                + slot["next_token"][0]["n_decoded"].as_u64().unwrap_or(0);
            s.busy += 1;
            s.decoding += slot["next_token"][0]["n_decoded"].as_u64().unwrap_or(0);
            s.prompting += slot["n_prompt_tokens_processed"].as_u64().unwrap_or(0);
        }
    }
    Ok(s)
}

/// A model Ollama has in memory (`/api/ps`).
#[derive(Debug, Clone, PartialEq)]
pub struct OllamaLoaded {
    pub name: String,
    pub size: u64,
    /// Bytes in GPU memory; 0 (or absent) when it runs from system memory.
    pub size_vram: u64,
    pub expires_at: String,
}

pub fn parse_ollama_ps(body: &str) -> Result<Vec<OllamaLoaded>> {
    let v: serde_json::Value = serde_json::from_str(body)?;
    let arr = v["models"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("/api/ps has no \"models\" array"))?;
    Ok(arr
        .iter()
        .filter_map(|m| {
            Some(OllamaLoaded {
                name: m["name"].as_str().or(m["model"].as_str())?.to_string(),
                size: m["size"].as_u64().unwrap_or(0),
                size_vram: m["size_vram"].as_u64().unwrap_or(0),
                expires_at: m["expires_at"].as_str().unwrap_or("").to_string(),
            })
        })
        .collect())
}

/// What the screen shows for one server.
#[derive(Debug, Clone, Default)]
pub struct ServerView {
    pub url: String,
    pub reading: Option<Reading>,
    /// Why the server is down; None while it answers.
    pub down: Option<String>,
    pub prompt_rate: Option<f64>,
    pub gen_rate: Option<f64>,
    pub ttft: Option<Histogram>,
    pub itl: Option<Histogram>,
    pub prompt_hist: VecDeque<u64>,
    pub gen_hist: VecDeque<u64>,
    prev: Option<(Instant, Reading)>,
    polls: u64,
}

/// The whole screen's state: pure, fed readings.
#[derive(Debug, Clone, Default)]
pub struct TopState {
    pub servers: Vec<ServerView>,
}

fn rate(new: Option<f64>, old: Option<f64>, dt: f64) -> Option<f64> {
    let (n, o) = (new?, old?);
    // A counter that went back means the server restarted: no rate this time.
    (n >= o && dt > 0.0).then(|| (n - o) / dt)
}

fn push(h: &mut VecDeque<u64>, v: Option<f64>) {
    h.push_back(v.unwrap_or(0.0).round().max(0.0) as u64);
    while h.len() > HISTORY {
        h.pop_front();
    }
}

impl TopState {
    pub fn new(urls: &[String]) -> Self {
        Self {
            servers: urls
                .iter()
                .map(|u| ServerView {
                    url: u.clone(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// Takes the reading of server `i` made at `at`.
    pub fn update(&mut self, i: usize, at: Instant, r: std::result::Result<Reading, String>) {
        let Some(s) = self.servers.get_mut(i) else {
            return;
        };
        s.polls += 1;
        match r {
            Err(why) => {
                s.down = Some(why);
                s.prev = None;
                s.prompt_rate = None;
                s.gen_rate = None;
                push(&mut s.prompt_hist, None);
                push(&mut s.gen_hist, None);
            }
            Ok(r) => {
                s.down = None;
                if let Some((t0, old)) = &s.prev {
                    let dt = at.duration_since(*t0).as_secs_f64();
                    s.prompt_rate = rate(r.prompt_total, old.prompt_total, dt);
                    s.gen_rate = rate(r.gen_total, old.gen_total, dt);
                    // Percentiles over the last interval when requests ended in it, else
                    // since the server started.
                    s.ttft = window(&r.ttft, &old.ttft);
                    s.itl = window(&r.itl, &old.itl);
                    push(&mut s.prompt_hist, s.prompt_rate);
                    push(&mut s.gen_hist, s.gen_rate);
                } else {
                    s.ttft = r.ttft.clone();
                    s.itl = r.itl.clone();
                }
                s.prev = Some((at, r.clone()));
                s.reading = Some(r);
            }
        }
    }
}

fn window(new: &Option<Histogram>, old: &Option<Histogram>) -> Option<Histogram> {
    let n = new.as_ref()?;
    match old.as_ref().and_then(|o| n.since(o)) {
        Some(w) if w.count() > 0.0 => Some(w),
        _ => Some(n.clone()),
    }
}

pub fn fmt_rate(r: Option<f64>) -> String {
    r.map_or("n/a".into(), |r| format!("{r:.1} tok/s"))
}

fn fmt_pcts(h: &Option<Histogram>) -> String {
    let Some(h) = h.as_ref().filter(|h| h.count() > 0.0) else {
        return "n/a".into();
    };
    let q = |p: f64| {
        h.quantile(p)
            .map_or("?".into(), |s| format!("{:.0}ms", s * 1e3))
    };
    format!(
        "p50 {} p90 {} p99 {} ({} requests)",
        q(0.5),
        q(0.9),
        q(0.99),
        h.count()
    )
}

impl ServerView {
    /// The text lines of this server (the screen and `--batch` print the same).
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(why) = &self.down {
            out.push(format!("{}  DOWN: {why}", self.url));
            return out;
        }
        let Some(r) = &self.reading else {
            out.push(format!("{}  connecting…", self.url));
            return out;
        };
        out.push(format!(
            "{}  {}  up",
            self.url,
            r.kind.map_or("?", Kind::as_str)
        ));
        out.push(format!(
            "  models:     {}",
            if r.models.is_empty() {
                "-".into()
            } else {
                r.models.join(", ")
            }
        ));
        let n = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0}"));
        out.push(format!(
            "  requests:   {} running, {} waiting",
            n(r.running),
            n(r.waiting)
        ));
        let warming = self.polls < 2 && r.gen_total.is_some();
        out.push(format!(
            "  prompt:     {}",
            if warming {
                "…".into()
            } else {
                fmt_rate(self.prompt_rate)
            }
        ));
        out.push(format!(
            "  generation: {}",
            if warming {
                "…".into()
            } else {
                fmt_rate(self.gen_rate)
            }
        ));
        out.push(format!("  TTFT:       {}", fmt_pcts(&self.ttft)));
        out.push(format!("  ITL:        {}", fmt_pcts(&self.itl)));
        out.push(format!(
            "  KV cache:   {}",
            match (r.kv_usage, &r.kv_source) {
                (Some(k), None) => format!("{:.0}% used", k * 100.0),
                (Some(k), Some(src)) => format!("≈{:.0}% used ({src})", k * 100.0),
                (None, _) => "n/a (the server does not report it)".into(),
            }
        ));
        for note in &r.notes {
            out.push(format!("  note: {note}"));
        }
        out
    }
}

/// A poll's result: server index, when, the reading or why the server is down.
pub type Polled = (usize, Instant, std::result::Result<Reading, String>);

/// One poller thread per server, each sending its reading once a period until the
/// receiver is dropped.
pub fn start_pollers(endpoints: Vec<Endpoint>) -> Receiver<Polled> {
    let (tx, rx) = channel();
    for (i, ep) in endpoints.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("tokentop-top-{i}"))
            .spawn(move || {
                let agent = super::agent(Duration::from_secs(2));
                loop {
                    let t0 = Instant::now();
                    let r = poll_endpoint(&agent, &ep);
                    if tx.send((i, t0, r)).is_err() {
                        return;
                    }
                    std::thread::sleep(PERIOD.saturating_sub(t0.elapsed()));
                }
            })
            .expect("spawning a poller thread");
    }
    rx
}
