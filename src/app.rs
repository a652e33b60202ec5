//! The TUI's event loop: one `select!` over terminal events and a frame tick that drains the
//! engine and telemetry channels; redraws only when something changed. Effects from the
//! state machine are carried out here.

use crate::catalog::{fetch, Catalog};
use crate::engine::worker::EngineHandle;
use crate::protocol::{EngineCmd, GenParams, LoadOptions};
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
use futures::StreamExt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
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
    pub profiles: Vec<Profile>,
    pub system: Option<String>,
}

/// Models the switcher offers: the catalog (local or downloadable), then other GGUFs in
/// the model store, then the model given on the command line.
pub fn switch_items(catalog: &Catalog, extra: &[PathBuf]) -> Vec<SwitchItem> {
    let mut items: Vec<SwitchItem> = catalog
        .models
        .iter()
        .map(|m| SwitchItem {
            label: m.id.clone(),
            id: Some(m.id.clone()),
            path: fetch::local_path(m),
            size: m.size,
            params_b: m.params_b,
            active_params_b: m.active_params_b,
            moe: m.is_moe(),
            tags: m.tags.clone(),
        })
        .collect();
    let mut local: Vec<PathBuf> = crate::catalog::store_dir()
        .ok()
        .and_then(|d| std::fs::read_dir(d).ok())
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    local.extend(extra.iter().cloned());
    for p in local {
        let is_gguf = p.extension().is_some_and(|x| x == "gguf");
        let known = items
            .iter()
            .any(|i| i.path.as_ref().and_then(|x| x.canonicalize().ok()) == p.canonicalize().ok());
        if is_gguf && !known && p.is_file() {
            items.push(SwitchItem {
                label: p
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
                id: None,
                size: std::fs::metadata(&p).map_or(0, |m| m.len()),
                path: Some(p),
                params_b: 0.0,
                active_params_b: 0.0,
                moe: false,
                tags: vec!["local".into()],
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
            Effect::Load { path } => self.engine.send(EngineCmd::Load {
                path,
                opts: LoadOptions { n_ctx: self.n_ctx },
            }),
            Effect::Fetch { id } => {
                let model = self.catalog.find(&id).cloned();
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    let result = match model {
                        Some(m) => fetch::ensure_local(&m, fetch::Report::Quiet)
                            .map_err(|e| format!("{e:#}")),
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
                return Some(Msg::SessionList(session::list(&self.sessions_dir)))
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

/// Runs the TUI until the user quits. The terminal is restored on every exit path, panics
/// included (ratatui's init installs a panic hook that restores it first).
pub fn run(cfg: AppConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut terminal = ratatui::init();
    crossterm::execute!(std::io::stdout(), EnableMouseCapture, EnableBracketedPaste)?;
    let result = rt.block_on(event_loop(&mut terminal, cfg));
    let _ = crossterm::execute!(
        std::io::stdout(),
        DisableMouseCapture,
        DisableBracketedPaste
    );
    ratatui::restore();
    result
}

async fn event_loop(terminal: &mut ratatui::DefaultTerminal, cfg: AppConfig) -> Result<()> {
    let mut engine = EngineHandle::spawn();
    let engine_events = engine.take_events();
    let telemetry = TelemetryHandle::spawn(PathBuf::from("/sys"));
    let (tx, background): (Sender<Msg>, Receiver<Msg>) = channel();
    let sessions_dir = session::sessions_dir()?;
    let mut st = State::new(
        cfg.params.clone(),
        switch_items(&cfg.catalog, std::slice::from_ref(&cfg.model)),
    );
    st.system_prompt = cfg.system.clone();
    st.offline = crate::offline::is_offline();
    if let Err(e) = session::make_private(&sessions_dir) {
        st.status = format!("{e:#}");
    }
    let mut io = Io {
        engine,
        catalog: cfg.catalog,
        session: SessionFile::new(sessions_dir.clone()),
        sessions_dir,
        n_ctx: cfg.n_ctx,
        tx,
    };
    st.loading = Some((
        cfg.model
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        Instant::now(),
    ));
    io.run(
        Effect::Load {
            path: cfg.model.clone(),
        },
        &st,
    );

    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(FRAME);
    let mut dirty = true;
    let mut last_second = Instant::now();
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
                None => return Ok(()),
            },
            _ = tick.tick() => {
                msgs.extend(engine_events.try_iter().map(Msg::Engine));
                msgs.extend(telemetry.snapshots.try_iter().map(Msg::Telemetry));
                msgs.extend(background.try_iter());
                // Clocks in the view (load timer, live rate) move once a second at least.
                if last_second.elapsed() >= Duration::from_secs(1) {
                    last_second = Instant::now();
                    dirty = true;
                }
            }
        }
        let mut queue: std::collections::VecDeque<Msg> = msgs.into();
        while let Some(msg) = queue.pop_front() {
            dirty = true;
            for effect in state::update(&mut st, msg) {
                if effect == Effect::Quit {
                    return Ok(());
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
            dirty = false;
            last_draw = Instant::now();
        }
    }
}
