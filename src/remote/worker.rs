//! The remote backend's thread: takes `EngineCmd`s and answers with `EngineEvent`s like the
//! local engine, so the state machine, panes, sessions and A/B work unchanged.
//!
//! Each answer is read by a stream thread that only parses and forwards; this thread owns
//! the clocks. Commands and stream events come in on one channel (a small forwarder moves
//! the commands over), so a Cancel is answered at once, and the stream thread drops the
//! connection at its next read (the next token): the server sees the client go and stops.
//! A server that sends nothing for the endpoint's timeout fails the answer.

use super::stream::{parse_ollama_line, parse_sse_data, Piece, ThinkTags};
use super::{Endpoint, Kind};
use crate::engine::worker::EngineHandle;
use crate::protocol::{
    EngineCmd, EngineEvent, FinishReason, GenParams, GenStats, Message, ModelInfo, RequestId,
    ServerStats,
};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the worker looks at the clock while nothing arrives.
const TICK: Duration = Duration::from_millis(50);

enum Inner {
    Cmd(EngineCmd),
    Stream { req: RequestId, ev: StreamEv },
}

enum StreamEv {
    Piece(Piece),
    /// The connection ended (cleanly, as far as HTTP goes).
    End,
    /// The request failed before any answer came (refused, 401, 404, …).
    Refused(String),
    /// Reading the answer failed part-way.
    Broken(String),
}

/// Spawns the remote worker for `ep`; it is driven like the local engine.
pub fn spawn(ep: Endpoint) -> EngineHandle {
    let (tx, cmd_rx) = channel::<EngineCmd>();
    let (ev_tx, events) = channel();
    let (inner_tx, inner_rx) = channel::<Inner>();
    let fwd = inner_tx.clone();
    std::thread::Builder::new()
        .name("tokentop-remote-cmds".into())
        .spawn(move || {
            for c in cmd_rx {
                if fwd.send(Inner::Cmd(c)).is_err() {
                    return;
                }
            }
            let _ = fwd.send(Inner::Cmd(EngineCmd::Shutdown));
        })
        .expect("spawning the remote command thread");
    let thread = std::thread::Builder::new()
        .name("tokentop-remote".into())
        .spawn(move || {
            let mut w = Worker {
                agent: super::agent(ep.timeout),
                ep,
                model: None,
                active: None,
                ev: ev_tx,
                inner: inner_tx,
            };
            loop {
                let msg = match inner_rx.recv_timeout(TICK) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                w.check_stall();
                match msg {
                    Some(Inner::Cmd(EngineCmd::Shutdown)) => {
                        w.stop_active();
                        return;
                    }
                    Some(Inner::Cmd(c)) => w.command(c),
                    Some(Inner::Stream { req, ev }) => w.stream_event(req, ev),
                    None => {}
                }
            }
        })
        .expect("spawning the remote thread");
    EngineHandle::from_parts(tx, events, thread)
}

struct Loaded {
    id: String,
    kind: Kind,
}

/// The answer being streamed, and the client's clocks for it.
struct Active {
    req: RequestId,
    started: Instant,
    first: Option<Instant>,
    last_token: Option<Instant>,
    /// Last time anything came from the server.
    heard: Instant,
    pieces: usize,
    finish: Option<String>,
    server: Option<ServerStats>,
    cancel: Arc<AtomicBool>,
    /// Reasoning text wrapped in `<think>` tags as it comes.
    tags: ThinkTags,
}

struct Worker {
    agent: ureq::Agent,
    ep: Endpoint,
    model: Option<Loaded>,
    active: Option<Active>,
    ev: Sender<EngineEvent>,
    inner: Sender<Inner>,
}

impl Worker {
    fn send(&self, e: EngineEvent) {
        let _ = self.ev.send(e);
    }

    fn command(&mut self, c: EngineCmd) {
        match c {
            EngineCmd::Shutdown => {}
            EngineCmd::Cancel { req } => {
                if self.active.as_ref().is_some_and(|a| a.req == req) {
                    self.finish(Some(FinishReason::Cancelled));
                }
            }
            EngineCmd::Load { path, .. } => {
                self.stop_active();
                self.load(path);
            }
            EngineCmd::Generate {
                req,
                messages,
                params,
            } => {
                self.stop_active();
                self.generate(req, messages, params);
            }
        }
    }

    /// A new command ends the answer in progress, as in the local engine.
    fn stop_active(&mut self) {
        if self.active.is_some() {
            self.finish(Some(FinishReason::Cancelled));
        }
    }

    fn load(&mut self, path: PathBuf) {
        let want = super::remote_model(&path)
            .map(str::to_string)
            .unwrap_or_else(|| path.to_string_lossy().into_owned());
        self.send(EngineEvent::Loading { path: path.clone() });
        let t0 = Instant::now();
        let result = super::probe(&self.agent, &self.ep).and_then(|info| {
            let found = if want.is_empty() {
                info.models.first()
            } else {
                info.models
                    .iter()
                    .find(|m| super::model_matches(&m.id, &want))
            };
            match found {
                Some(m) => Ok((info.kind, m.clone())),
                None => {
                    let names: Vec<&str> = info.models.iter().map(|m| m.id.as_str()).collect();
                    anyhow::bail!(
                        "{}: model {want:?} not found (404); it serves: {}",
                        self.ep.url,
                        if names.is_empty() {
                            "nothing".into()
                        } else {
                            names.join(", ")
                        }
                    )
                }
            }
        });
        match result {
            Ok((kind, m)) => {
                let short = std::path::Path::new(&m.id)
                    .file_name()
                    .map_or(m.id.clone(), |n| n.to_string_lossy().into_owned());
                let info = ModelInfo {
                    path: super::load_path(&m.id),
                    name: format!("{short} @ {}", super::host_of(&self.ep.url)),
                    arch: "remote".into(),
                    quant: m.quant.clone().unwrap_or_else(|| kind.as_str().into()),
                    params: m.params.unwrap_or(0),
                    weight_bytes: m.size.unwrap_or(0),
                    file_bytes: m.size.unwrap_or(0),
                    n_ctx: m.n_ctx.unwrap_or(0),
                    train_ctx: m.n_ctx_train.or(m.n_ctx).unwrap_or(0),
                    n_expert: 0,
                    n_expert_used: 0,
                    load_time: t0.elapsed(),
                    tokenizer_source: format!("{} at {}", kind.as_str(), self.ep.url),
                    template_is_fallback: false,
                };
                self.model = Some(Loaded { id: m.id, kind });
                self.send(EngineEvent::Ready { info });
            }
            Err(e) => {
                self.model = None;
                self.send(EngineEvent::LoadFailed {
                    path,
                    error: format!("{e:#}"),
                });
            }
        }
    }

    fn generate(&mut self, req: RequestId, messages: Vec<Message>, params: GenParams) {
        let Some(model) = &self.model else {
            self.send(EngineEvent::Failed {
                req,
                error: "no model is loaded".into(),
            });
            return;
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            agent: self.agent.clone(),
            ep: self.ep.clone(),
            model: model.id.clone(),
            kind: model.kind,
            req,
            messages,
            params,
            cancel: cancel.clone(),
            tx: self.inner.clone(),
        };
        let now = Instant::now();
        self.active = Some(Active {
            req,
            started: now,
            first: None,
            last_token: None,
            heard: now,
            pieces: 0,
            finish: None,
            server: None,
            cancel,
            tags: ThinkTags::default(),
        });
        let spawned = std::thread::Builder::new()
            .name("tokentop-remote-stream".into())
            .spawn(move || job.run());
        if let Err(e) = spawned {
            self.fail(format!("cannot start the stream thread: {e}"));
        }
    }

    fn stream_event(&mut self, req: RequestId, ev: StreamEv) {
        let Some(a) = self.active.as_mut().filter(|a| a.req == req) else {
            return; // an abandoned answer
        };
        let now = Instant::now();
        a.heard = now;
        match ev {
            StreamEv::Piece(p) => {
                let text = a.tags.wrap(&p);
                if !text.is_empty() {
                    if a.first.is_none() {
                        a.first = Some(now);
                        let ttft = now - a.started;
                        let _ = self.ev.send(EngineEvent::Prefilled {
                            req,
                            prompt_tokens: 0,
                            cached_tokens: 0,
                            ttft,
                            kv_bytes: 0,
                        });
                    }
                    a.pieces += 1;
                    a.last_token = Some(now);
                    let _ = self.ev.send(EngineEvent::Token { req, text });
                }
                if p.finish.is_some() {
                    a.finish = p.finish;
                }
                if p.server.is_some() {
                    a.server = p.server;
                }
                if p.done {
                    self.finish(None);
                }
            }
            StreamEv::End => {
                if a.finish.is_some() {
                    self.finish(None);
                } else {
                    let msg = self.cut_message("the server closed the connection");
                    self.fail(msg);
                }
            }
            StreamEv::Refused(e) => self.fail(e),
            StreamEv::Broken(e) => {
                let msg = self.cut_message(&e);
                self.fail(msg);
            }
        }
    }

    fn cut_message(&self, why: &str) -> String {
        let n = self.active.as_ref().map_or(0, |a| a.pieces);
        format!(
            "the stream from {} was cut mid-answer after {n} token(s) ({why}); the part received is kept",
            self.ep.url
        )
    }

    fn check_stall(&mut self) {
        let Some(a) = &self.active else { return };
        if a.heard.elapsed() >= self.ep.timeout {
            let msg = format!(
                "{} sent nothing for {:.0}s (timeout) after {} token(s); the part received is kept",
                self.ep.url,
                self.ep.timeout.as_secs_f64(),
                a.pieces
            );
            self.fail(msg);
        }
    }

    fn fail(&mut self, error: String) {
        if let Some(a) = self.active.take() {
            a.cancel.store(true, Ordering::SeqCst);
            self.send(EngineEvent::Failed { req: a.req, error });
        }
    }

    /// Ends the answer with its stats; `reason` overrides what the server said.
    fn finish(&mut self, reason: Option<FinishReason>) {
        let Some(a) = self.active.take() else { return };
        a.cancel.store(true, Ordering::SeqCst);
        let now = Instant::now();
        let reason = reason.unwrap_or(match a.finish.as_deref() {
            Some("length") => FinishReason::MaxTokens,
            _ => FinishReason::Eos,
        });
        let ttft = a.first.map_or(now - a.started, |f| f - a.started);
        let cached = a.server.as_ref().and_then(|s| s.cached_tokens).unwrap_or(0);
        let evaluated = a.server.as_ref().and_then(|s| s.prompt_tokens).unwrap_or(0);
        let stats = GenStats {
            prompt_tokens: evaluated + cached,
            cached_tokens: cached,
            // The client cannot see prefill apart from the wait for the first token.
            prompt_eval: ttft,
            ttft,
            generated_tokens: a.pieces,
            decode: match (a.first, a.last_token) {
                (Some(f), Some(l)) => l - f,
                _ => Duration::ZERO,
            },
            total: now - a.started,
            kv_bytes: 0,
            server: a.server,
        };
        self.send(EngineEvent::Finished {
            req: a.req,
            stats,
            reason,
        });
    }
}

/// One request, run on its own thread.
struct Job {
    agent: ureq::Agent,
    ep: Endpoint,
    model: String,
    kind: Kind,
    req: RequestId,
    messages: Vec<Message>,
    params: GenParams,
    cancel: Arc<AtomicBool>,
    tx: Sender<Inner>,
}

impl Job {
    fn emit(&self, ev: StreamEv) -> bool {
        !self.cancel.load(Ordering::SeqCst)
            && self.tx.send(Inner::Stream { req: self.req, ev }).is_ok()
    }

    fn run(self) {
        let ollama = self.kind == Kind::Ollama;
        let path = if ollama {
            "/api/chat"
        } else {
            "/v1/chat/completions"
        };
        let url = format!("{}{path}", self.ep.url);
        let body = request_body(&self.model, self.kind, &self.messages, &self.params);
        let mut req = self
            .agent
            .post(&url)
            .set("Content-Type", "application/json");
        if let Some(k) = &self.ep.api_key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let resp = match req.send_string(&body.to_string()) {
            Ok(r) => r,
            Err(e) => {
                self.emit(StreamEv::Refused(super::http_error(
                    &url,
                    e,
                    Some(&self.model),
                )));
                return;
            }
        };
        let reader = resp.into_reader();
        if ollama {
            self.read_lines(reader);
        } else {
            self.read_sse(reader);
        }
    }

    /// Ollama: one JSON object a line.
    fn read_lines(&self, reader: impl Read) {
        let mut lines = BufReader::new(reader);
        let mut line = String::new();
        loop {
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) => {
                    self.emit(StreamEv::End);
                    return;
                }
                Ok(_) if line.trim().is_empty() => {}
                Ok(_) => {
                    let ev = match parse_ollama_line(line.trim()) {
                        Ok(p) => StreamEv::Piece(p),
                        Err(e) => StreamEv::Broken(format!("{e:#}")),
                    };
                    let stop = matches!(ev, StreamEv::Broken(_));
                    if !self.emit(ev) || stop {
                        return;
                    }
                }
                Err(e) => {
                    self.emit(StreamEv::Broken(e.to_string()));
                    return;
                }
            }
        }
    }

    /// OpenAI-compatible: server-sent events, framed by eventsource-stream over the
    /// blocking reader's chunks.
    fn read_sse(&self, mut reader: impl Read) {
        use eventsource_stream::Eventsource;
        let chunks = std::iter::from_fn(move || {
            let mut buf = vec![0u8; 8192];
            match reader.read(&mut buf) {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some(Ok(buf))
                }
                Err(e) => Some(Err(e)),
            }
        });
        let events =
            futures::executor::block_on_stream(futures::stream::iter(chunks).eventsource());
        for ev in events {
            if self.cancel.load(Ordering::SeqCst) {
                return; // dropping the reader closes the connection
            }
            let out = match ev {
                Ok(e) if e.data.is_empty() => continue,
                Ok(e) => match parse_sse_data(&e.data) {
                    Ok(p) => StreamEv::Piece(p),
                    Err(err) => StreamEv::Broken(format!("{err:#}")),
                },
                Err(e) => StreamEv::Broken(match e {
                    eventsource_stream::EventStreamError::Transport(io) => io.to_string(),
                    other => format!("malformed stream: {other}"),
                }),
            };
            let stop = matches!(out, StreamEv::Broken(_));
            if !self.emit(out) || stop {
                return;
            }
        }
        self.emit(StreamEv::End);
    }
}

/// The JSON body of a chat request. Sampling options beyond OpenAI's are sent only to
/// servers known to take them.
pub fn request_body(
    model: &str,
    kind: Kind,
    messages: &[Message],
    p: &GenParams,
) -> serde_json::Value {
    let msgs: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
        .collect();
    if kind == Kind::Ollama {
        let mut options = serde_json::json!({
            "num_predict": p.max_tokens,
            "temperature": p.temperature,
            "seed": p.seed,
            "repeat_penalty": p.repeat_penalty,
            "repeat_last_n": p.repeat_last_n,
        });
        if let Some(k) = p.top_k {
            options["top_k"] = k.into();
        }
        if let Some(t) = p.top_p {
            options["top_p"] = t.into();
        }
        return serde_json::json!({
            "model": model, "messages": msgs, "stream": true, "options": options,
        });
    }
    let mut body = serde_json::json!({
        "model": model,
        "messages": msgs,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "seed": p.seed,
    });
    if let Some(t) = p.top_p {
        body["top_p"] = t.into();
    }
    if matches!(kind, Kind::LlamaServer | Kind::Vllm | Kind::Sglang) {
        if let Some(k) = p.top_k {
            body["top_k"] = k.into();
        }
        let key = if kind == Kind::LlamaServer {
            "repeat_penalty"
        } else {
            "repetition_penalty"
        };
        body[key] = f64::from(p.repeat_penalty).into();
        if p.ignore_eos {
            body["ignore_eos"] = true.into();
        }
    }
    body
}
