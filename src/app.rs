//! The TUI's event loop: one `select!` over terminal events and a frame tick that drains the
//! engine and telemetry channels; redraws only when something changed. Effects from the
//! state machine are carried out here.

use crate::catalog::{fetch, Catalog};
use crate::engine::worker::EngineHandle;
use crate::protocol::{EngineCmd, EngineEvent, GenParams, LoadOptions};
use crate::roofline::Profile;
use crate::session::{self, SessionFile};
use crate::state::{self, Effect, Msg, State, SwitchItem};
use crate::telemetry::TelemetryHandle;
use crate::theme::Theme;
use crate::ui;
use anyhow::Result;
use base64::Engine as _;
use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture, Event,
    EventStream,
};
use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen};
use futures::StreamExt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tick period: channels are drained and keys answered within 25 ms.
const FRAME: Duration = Duration::from_millis(25);
/// While an answer streams, redraw at most this often: on two cores every frame drawn is
/// taken from the engine, and 12 frames a second is smooth enough for reading.
const STREAM_FRAME: Duration = Duration::from_millis(80);

pub struct AppConfig {
    pub model: PathBuf,
    pub catalog: Catalog,
    pub theme: Theme,
    pub params: GenParams,
    pub n_ctx: usize,
    /// KV cache element types on the CPU.
    pub kv: crate::protocol::KvTypes,
    pub profiles: Vec<Profile>,
    pub system: Option<String>,
    /// A server to chat with instead of the embedded engine.
    pub endpoint: Option<crate::remote::Endpoint>,
}

/// The backend's worker: the embedded engine, or a remote server's (same protocol).
fn spawn_backend(endpoint: Option<&crate::remote::Endpoint>) -> EngineHandle {
    match endpoint {
        Some(ep) => crate::remote::router::spawn(ep.clone()),
        None => EngineHandle::spawn(),
    }
}

/// The switcher's items for a server: the models it lists (`/v1/models`, `/api/tags`).
fn remote_items(ep: &crate::remote::Endpoint) -> Vec<SwitchItem> {
    let agent = crate::remote::agent(std::time::Duration::from_secs(5));
    let models = crate::remote::probe(&agent, ep)
        .map(|i| i.models)
        .unwrap_or_default();
    models
        .into_iter()
        .map(|m| SwitchItem {
            label: m.id.clone(),
            id: None,
            path: Some(crate::remote::load_path(&m.id)),
            size: m.size.unwrap_or(0),
            params_b: m.params.map_or(0.0, |p| p as f64 / 1e9),
            active_params_b: m.params.map_or(0.0, |p| p as f64 / 1e9),
            moe: false,
            tags: vec![format!("remote {}", crate::remote::host_of(&ep.url))],
        })
        .collect()
}

/// Models the switcher offers: the catalog (local or downloadable; a local one tagged with
/// where it is when that is not tokentop's store), then other GGUFs in the model store, in
/// other tools' stores (Ollama, LM Studio, the Hugging Face cache; tagged with the store),
/// then the model given on the command line.
pub fn switch_items(catalog: &Catalog, extra: &[PathBuf]) -> Vec<SwitchItem> {
    use crate::catalog::discover::{self, Origin};
    let found = discover::scan().found;
    let mut items: Vec<SwitchItem> = catalog
        .models
        .iter()
        .map(|m| {
            let local = fetch::locate(m, &found);
            let mut tags = m.tags.clone();
            if let Some((_, origin)) = &local {
                if *origin != Origin::Store {
                    tags.push(origin.label().into());
                }
            }
            SwitchItem {
                label: m.id.clone(),
                id: Some(m.id.clone()),
                path: local.map(|(p, _)| p),
                size: m.size,
                params_b: m.params_b,
                active_params_b: m.active_params_b,
                moe: m.is_moe(),
                tags,
            }
        })
        .collect();
    // (path, label, size of all parts, source tag)
    type Extra<'a> = (PathBuf, Option<String>, Option<u64>, &'a str);
    let mut local: Vec<Extra> = crate::catalog::store_dir()
        .ok()
        .and_then(|d| std::fs::read_dir(d).ok())
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| (e.path(), None, None, "local")))
                .collect()
        })
        .unwrap_or_default();
    local.extend(found.iter().map(|f| {
        (
            f.path.clone(),
            Some(f.id.clone()),
            Some(f.size),
            f.origin.label(),
        )
    }));
    local.extend(extra.iter().map(|p| (p.clone(), None, None, "local")));
    for (p, label, size, source) in local {
        let is_gguf = label.is_some() || p.extension().is_some_and(|x| x == "gguf");
        let known = items
            .iter()
            .any(|i| i.path.as_ref().and_then(|x| x.canonicalize().ok()) == p.canonicalize().ok());
        if is_gguf && !known && p.is_file() {
            items.push(SwitchItem {
                label: label.unwrap_or_else(|| {
                    p.file_name()
                        .map_or(String::new(), |n| n.to_string_lossy().into_owned())
                }),
                id: None,
                size: size.unwrap_or_else(|| std::fs::metadata(&p).map_or(0, |m| m.len())),
                path: Some(p),
                params_b: 0.0,
                active_params_b: 0.0,
                moe: false,
                tags: vec![source.into()],
            });
        }
    }
    items
}

struct Io {
    engine: EngineHandle,
    catalog: Catalog,
    session: SessionFile,
    sessions_dir: PathBuf,
    n_ctx: usize,
    kv: crate::protocol::KvTypes,
    /// Results of background work (downloads), drained each frame.
    tx: Sender<Msg>,
}

impl Io {
    fn run(&mut self, effect: Effect, st: &State) -> Option<Msg> {
        match effect {
            Effect::Generate {
                req,
                messages,
                params,
            } => self.engine.send(EngineCmd::Generate {
                req,
                messages,
                params,
            }),
            Effect::Cancel { req } => self.engine.send(EngineCmd::Cancel { req }),
            Effect::Load {
                path,
                keep_previous,
            } => self.engine.send(EngineCmd::Load {
                path,
                opts: LoadOptions {
                    n_ctx: self.n_ctx,
                    kv: self.kv,
                    keep_previous,
                },
            }),
            Effect::Fetch { id } => {
                let model = self.catalog.find(&id).cloned();
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    let result = match model {
                        Some(m) => std::panic::catch_unwind(|| {
                            fetch::ensure_local(&m, fetch::Report::Quiet)
                                .map_err(|e| format!("{e:#}"))
                        })
                        .unwrap_or_else(|_| {
                            Err("the download stopped on an internal error".into())
                        }),
                        None => Err(format!("{id} is not in the catalog")),
                    };
                    let _ = tx.send(Msg::Fetched { id, result });
                });
            }
            Effect::SaveEntry(e) => {
                if let Err(err) = self.session.append(&e) {
                    return Some(Msg::Status(format!("session not saved: {err:#}")));
                }
            }
            Effect::NewSession => self.session.restart(),
            Effect::ListSessions => {
                return Some(Msg::SessionList(session::summaries(&self.sessions_dir)))
            }
            Effect::OpenSession(path) => {
                return Some(match session::load(&path) {
                    Ok(entries) => {
                        self.session.reopen(path.clone());
                        Msg::SessionLoaded { path, entries }
                    }
                    Err(e) => Msg::Status(format!("{e:#}")),
                })
            }
            Effect::ExportMarkdown => {
                let result = session::export(&st.chat, self.session.path(), &self.sessions_dir);
                return Some(Msg::Status(match result {
                    Ok(path) => format!("exported to {}", path.display()),
                    Err(e) => format!("export failed: {e:#}"),
                }));
            }
            Effect::Copy(text) => {
                // OSC 52 asks the terminal to put the text on the clipboard, over SSH too.
                let b64 = base64::engine::general_purpose::STANDARD.encode(text);
                let mut out = std::io::stdout();
                let _ = write!(out, "\x1b]52;c;{b64}\x07");
                let _ = out.flush();
            }
            Effect::Quit => {}
        }
        None
    }
}

/// Runs the TUI until the user quits or a signal ends it; returns that signal's number.
/// The terminal is restored on every exit path: quitting, an error, SIGTERM, SIGHUP, SIGINT
/// and SIGQUIT (see [`Signals`]), and a panic of the UI thread (see [`PanicHook`]).
pub fn run(cfg: AppConfig) -> Result<Option<i32>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let hook = PanicHook::install(true);
    let result = enter_terminal().and_then(|mut terminal| {
        let r = rt.block_on(event_loop(&mut terminal, cfg));
        restore_terminal();
        r
    });
    drop(hook);
    // Panics of background threads are kept off the screen while it is in use; they are
    // reported here, after the terminal is back.
    for p in take_background_panics() {
        let _ = writeln!(std::io::stderr(), "tokentop: {p}");
    }
    result
}

/// Raw mode, the alternate screen, mouse and bracketed paste; undone by `restore_terminal`.
fn enter_terminal() -> Result<ratatui::DefaultTerminal> {
    let setup = || -> std::io::Result<ratatui::DefaultTerminal> {
        crossterm::terminal::enable_raw_mode()?;
        crossterm::execute!(
            std::io::stdout(),
            EnterAlternateScreen,
            EnableMouseCapture,
            EnableBracketedPaste
        )?;
        ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(std::io::stdout()))
    };
    setup().map_err(|e| {
        restore_terminal();
        anyhow::anyhow!("cannot set up the terminal: {e}")
    })
}

/// Leaves the alternate screen, turns raw mode off and shows the cursor. Each step is tried
/// on its own and errors are ignored: after a hangup the terminal may be gone, and this also
/// runs inside the panic hook.
fn restore_terminal() {
    let mut out = std::io::stdout();
    let _ = crossterm::execute!(out, DisableMouseCapture, DisableBracketedPaste);
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(out, LeaveAlternateScreen, crossterm::cursor::Show);
}

/// The name of the engine's thread, to tell its panics from others.
const ENGINE_THREAD: &str = "tokentop-engine";

/// Panics of threads other than the UI's, as "thread NAME stopped: MESSAGE (at FILE:LINE)".
static BACKGROUND_PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn take_background_panics() -> Vec<String> {
    let mut v = BACKGROUND_PANICS.lock().unwrap_or_else(|e| e.into_inner());
    v.drain(..)
        .map(|(thread, msg)| format!("thread {thread} stopped: {msg}"))
        .collect()
}

/// The last panic message of the engine thread, if it panicked while a [`PanicHook`] was in.
pub fn engine_panic() -> Option<String> {
    let v = BACKGROUND_PANICS.lock().unwrap_or_else(|e| e.into_inner());
    v.iter()
        .rev()
        .find(|(t, _)| t == ENGINE_THREAD)
        .map(|(_, m)| m.clone())
}

type Hook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

/// While the TUI runs: a panic of the UI thread restores the terminal (with `restore`), then
/// prints as usual (what ratatui's hook does); a panic of another thread (engine, downloads)
/// leaves the screen alone, which is still in use, and is recorded instead: the UI says the
/// engine stopped, and `run` prints the message after the terminal is back. `tokentop run`
/// uses it too (without `restore`), to report an engine panic as one line. Dropping it puts
/// the old hook back.
pub struct PanicHook {
    previous: Arc<Hook>,
}

impl PanicHook {
    /// Installs it; the calling thread is the one whose panics are printed.
    pub fn install(restore: bool) -> Self {
        let previous: Arc<Hook> = Arc::new(std::panic::take_hook());
        let ui = std::thread::current().id();
        let prev = previous.clone();
        std::panic::set_hook(Box::new(move |info| {
            let me = std::thread::current();
            if me.id() == ui {
                if restore {
                    restore_terminal();
                }
                prev(info);
                return;
            }
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            let at = info
                .location()
                .map(|l| format!(" (at {}:{})", l.file(), l.line()))
                .unwrap_or_default();
            BACKGROUND_PANICS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((me.name().unwrap_or("unnamed").to_string(), msg + &at));
        }));
        Self { previous }
    }
}

impl Drop for PanicHook {
    fn drop(&mut self) {
        let previous = self.previous.clone();
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| previous(info)));
    }
}

/// Signals that end the TUI: SIGTERM (`kill`), SIGHUP (the terminal closed), SIGINT and
/// SIGQUIT sent from outside (in raw mode Ctrl-C and Ctrl-\ arrive as keys instead).
/// tokio's signal streams, awaited in the event loop's select!.
struct Signals(Vec<(i32, tokio::signal::unix::Signal)>);

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        [
            SignalKind::terminate(),
            SignalKind::hangup(),
            SignalKind::interrupt(),
            SignalKind::quit(),
        ]
        .into_iter()
        .map(|k| Ok((k.as_raw_value(), signal(k)?)))
        .collect::<Result<Vec<_>>>()
        .map(Self)
    }

    /// The number of the next signal received.
    async fn recv(&mut self) -> i32 {
        let waits = self.0.iter_mut().map(|(n, s)| {
            let n = *n;
            Box::pin(async move {
                s.recv().await;
                n
            })
        });
        futures::future::select_all(waits).await.0
    }
}

/// Moves what the engine sent into `msgs`; false once its channel is disconnected (the
/// engine thread ended: it panicked, or its loop returned).
fn drain_engine(events: &Receiver<EngineEvent>, msgs: &mut Vec<Msg>) -> bool {
    loop {
        match events.try_recv() {
            Ok(ev) => msgs.push(Msg::Engine(ev)),
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
}

async fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    cfg: AppConfig,
) -> Result<Option<i32>> {
    let mut engine = spawn_backend(cfg.endpoint.as_ref());
    let mut engine_events = engine.take_events();
    let telemetry = TelemetryHandle::spawn(PathBuf::from("/sys"));
    let (tx, background): (Sender<Msg>, Receiver<Msg>) = channel();
    let sessions_dir = session::sessions_dir()?;
    let mut st = State::new(
        cfg.params.clone(),
        match &cfg.endpoint {
            Some(ep) => {
                // The server's models, then the local ones (A/B can compare the two).
                let mut items = remote_items(ep);
                items.extend(switch_items(&cfg.catalog, &[]));
                items
            }
            None => switch_items(&cfg.catalog, std::slice::from_ref(&cfg.model)),
        },
    );
    st.system_prompt = cfg.system.clone();
    st.offline = crate::offline::is_offline();
    if let Err(e) = session::make_private(&sessions_dir) {
        st.status = format!("{e:#}");
    }
    let endpoint = cfg.endpoint.clone();
    // A remote backend's server, polled once a second for the memory and power panes.
    let mut server_top = crate::remote::watch::TopState::new(
        &endpoint.iter().map(|e| e.url.clone()).collect::<Vec<_>>(),
    );
    let server_polls = endpoint
        .as_ref()
        .map(|ep| crate::remote::watch::start_pollers(vec![ep.clone()]));
    let mut io = Io {
        engine,
        catalog: cfg.catalog,
        session: SessionFile::new(sessions_dir.clone()),
        sessions_dir,
        n_ctx: cfg.n_ctx,
        kv: cfg.kv,
        tx,
    };
    let label = match (&endpoint, crate::remote::remote_model(&cfg.model)) {
        (Some(ep), Some(m)) => format!(
            "{} @ {}",
            if m.is_empty() { "a model" } else { m },
            crate::remote::host_of(&ep.url)
        ),
        _ => cfg
            .model
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
    };
    st.loading = Some((label, Instant::now()));
    io.run(
        Effect::Load {
            path: cfg.model.clone(),
            keep_previous: false,
        },
        &st,
    );
    let mut signals = Signals::new()?;

    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(FRAME);
    let mut dirty = true;
    let mut last_second = Instant::now();
    let mut progress_shown = String::new();
    let mut last_draw = Instant::now() - STREAM_FRAME;
    let cache = ui::LineCache::default();
    loop {
        let mut msgs = Vec::new();
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(Event::Key(k))) => msgs.push(Msg::Key(k)),
                Some(Ok(Event::Paste(s))) => msgs.push(Msg::Paste(s)),
                Some(Ok(Event::Mouse(m))) => msgs.push(Msg::Mouse(m.kind)),
                Some(Ok(Event::Resize(..))) => dirty = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(None),
            },
            signal = signals.recv() => {
                // Keep the part of an answer that streamed, as a finished one would be.
                if st.stream.is_some() && st.ab.is_none() {
                    for e in st.turn_to_save() {
                        io.run(Effect::SaveEntry(e), &st);
                    }
                }
                // Exit now: dropping the engine would wait for a load in progress.
                std::mem::forget(io.engine);
                return Ok(Some(signal));
            }
            _ = tick.tick() => {
                if !drain_engine(&engine_events, &mut msgs) {
                    let why = engine_panic().unwrap_or_else(|| "its thread ended".into());
                    msgs.push(Msg::EngineStopped(why));
                    // A fresh engine, so that a model can be loaded again.
                    io.engine = spawn_backend(endpoint.as_ref());
                    engine_events = io.engine.take_events();
                }
                ui::retitle(&mut msgs, &io.catalog);
                // The download ended: its last progress line goes (any other status stays).
                if !progress_shown.is_empty() && !ui::is_downloading(&st) {
                    if st.status == progress_shown {
                        msgs.push(Msg::Status(String::new()));
                    }
                    progress_shown.clear();
                }
                msgs.extend(telemetry.snapshots.try_iter().map(Msg::Telemetry));
                msgs.extend(background.try_iter());
                if let Some(rx) = &server_polls {
                    for (i, at, r) in rx.try_iter() {
                        server_top.update(i, at, r);
                        st.remote = server_top.servers.first().cloned();
                        dirty = true;
                    }
                }
                // Clocks in the view (load timer, live rate) move once a second at least;
                // idle, nothing moves, so nothing is drawn.
                let clocks = st.loading.is_some() || st.stream.is_some();
                if clocks && last_second.elapsed() >= Duration::from_secs(1) {
                    last_second = Instant::now();
                    dirty = true;
                    // A download's bytes, rate and ETA, for the title and the switcher.
                    if ui::is_downloading(&st) {
                        if let Some(p) = fetch::download_progress() {
                            progress_shown = ui::download_text(&p);
                            msgs.push(Msg::Status(progress_shown.clone()));
                        }
                    }
                }
            }
        }
        let mut queue: std::collections::VecDeque<Msg> = msgs.into();
        while let Some(msg) = queue.pop_front() {
            dirty = true;
            for effect in state::update(&mut st, msg) {
                if effect == Effect::Quit {
                    return Ok(None);
                }
                if let Some(m) = io.run(effect, &st) {
                    queue.push_back(m);
                }
            }
        }
        let throttled = st.stream.is_some() && last_draw.elapsed() < STREAM_FRAME;
        if dirty && !throttled {
            let ctx = ui::Ctx {
                theme: &cfg.theme,
                profiles: &cfg.profiles,
                now: Instant::now(),
                cache: &cache,
            };
            terminal.draw(|f| ui::render(f, &st, &ctx))?;
            (st.scroll_max, st.scroll) = (cache.max_scroll(), st.scroll.min(cache.max_scroll()));
            dirty = false;
            last_draw = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine thread that panics: its events arrive, then the disconnect is noticed, and
    /// the panic's message is kept (not printed over the screen) for the UI to show.
    #[test]
    fn a_panicking_engine_thread_is_noticed_with_its_message() {
        let hook = PanicHook::install(false);
        let (tx, rx) = channel();
        let t = std::thread::Builder::new()
            .name(ENGINE_THREAD.into())
            .spawn(move || {
                tx.send(EngineEvent::Loading {
                    path: PathBuf::from("m.gguf"),
                })
                .unwrap();
                let shape: Vec<usize> = Vec::new();
                // A real index panic, like a bad tensor shape would cause.
                std::hint::black_box(&shape)[std::hint::black_box(3)]
            })
            .unwrap();
        assert!(t.join().is_err());
        drop(hook);
        let mut msgs = Vec::new();
        assert!(!drain_engine(&rx, &mut msgs), "the disconnect is seen");
        assert_eq!(msgs.len(), 1, "events sent before the panic still arrive");
        let why = engine_panic().expect("the engine's panic was recorded");
        assert!(
            why.contains("index out of bounds") && why.contains("src/app.rs"),
            "{why}"
        );
        let printed = take_background_panics();
        assert!(
            printed
                .iter()
                .any(|p| p.starts_with("thread tokentop-engine stopped: index out of bounds")),
            "{printed:?}"
        );
    }

    #[test]
    fn a_live_engine_channel_is_not_a_stop() {
        let (tx, rx) = channel();
        tx.send(EngineEvent::Loading {
            path: PathBuf::from("m.gguf"),
        })
        .unwrap();
        let mut msgs = Vec::new();
        assert!(drain_engine(&rx, &mut msgs));
        assert_eq!(msgs.len(), 1);
        assert!(drain_engine(&rx, &mut msgs));
        assert_eq!(msgs.len(), 1);
    }
}
