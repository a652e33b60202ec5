//! The TUI's state as a pure machine: `update(&mut State, Msg) -> Vec<Effect>`. No IO here;
//! app.rs carries out the effects (start a stream, cancel, load a model, save the session).

pub mod input;

use crate::protocol::{
    EngineEvent, FinishReason, GenParams, GenStats, LoadHow, Message, ModelInfo, RequestId, Role,
};
use crate::telemetry::{BatteryUse, Details, Memory, Power, Snapshot};
use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEventKind};
use input::Input;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How many past answers the speed sparkline shows, and telemetry samples the power one.
pub const HISTORY: usize = 60;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Footer {
    pub ttft: Duration,
    pub prefill_rate: f64,
    pub decode_rate: f64,
    pub tokens: usize,
    pub reason: FinishReason,
    pub joules: Option<f64>,
    pub peak_rss: u64,
    /// The answer's thinking block, when it had one (sessions from before have none).
    #[serde(default)]
    pub thinking: Option<Thought>,
}

/// A thinking block as the footer reports it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Thought {
    /// Pieces (close to tokens) of the block, its tags included.
    pub tokens: usize,
    pub time: Duration,
    /// Request to the first answer token after the block; none when the answer stopped
    /// while still thinking.
    pub first_answer: Option<Duration>,
}

/// How a note that turns left the context begins (see [`State::drop_oldest_turns`]).
pub const DROPPED_NOTE: &str = "*Dropped from the context:";

/// An entry of the conversation. `Role::System` entries in the chat are notes shown and saved
/// but never sent to the model: an A/B run's prompt and answers, and what left the context.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatEntry {
    pub role: Role,
    pub text: String,
    /// The model that wrote an answer.
    pub model: String,
    pub footer: Option<Footer>,
}

/// A saved session as the session list shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSummary {
    pub path: PathBuf,
    /// The first prompt, on one line (the file name when there is none).
    pub title: String,
    /// When it was last written, local time, `YYYY-MM-DD HH:MM`.
    pub date: String,
    /// The models that answered, in order of first answer.
    pub models: Vec<String>,
    /// Prompts in it.
    pub turns: usize,
}

/// One model the switcher offers: a catalog entry or a GGUF found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchItem {
    pub label: String,
    /// Catalog id, when it is one.
    pub id: Option<String>,
    pub path: Option<PathBuf>,
    pub size: u64,
    pub params_b: f64,
    pub active_params_b: f64,
    pub moe: bool,
    pub tags: Vec<String>,
}

impl SwitchItem {
    pub fn is_local(&self) -> bool {
        self.path.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Chat,
    Help,
    /// Choosing a model; `for_ab` picks the B side of an A/B run.
    Switcher {
        selected: usize,
        for_ab: bool,
    },
    Sessions {
        selected: usize,
    },
    /// Showing a finished A/B comparison (`State::ab_last`).
    AbResult,
}

/// The answer being streamed.
#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    pub req: RequestId,
    pub started: Instant,
    pub prefilled_at: Option<Instant>,
    pub ttft: Option<Duration>,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    /// Token events received (text pieces, close to tokens).
    pub pieces: usize,
    pub energy_j: f64,
    pub energy_known: bool,
    pub peak_rss: u64,
    /// The thinking block of the answer so far.
    pub think: crate::think::Tracker,
}

impl Stream {
    /// A request just sent: nothing prefilled or streamed yet, the process at `rss` bytes.
    pub fn new(req: RequestId, started: Instant, rss: u64) -> Self {
        Stream {
            req,
            started,
            prefilled_at: None,
            ttft: None,
            prompt_tokens: 0,
            cached_tokens: 0,
            pieces: 0,
            energy_j: 0.0,
            energy_known: true,
            peak_rss: rss,
            think: crate::think::Tracker::default(),
        }
    }

    /// The thinking block as the footer reports it, measured up to `now`.
    pub fn thought(&self, now: Instant) -> Option<Thought> {
        let time = self.think.duration(now)?;
        Some(Thought {
            tokens: self.think.pieces,
            time,
            first_answer: self
                .think
                .answered
                .map(|t| t.saturating_duration_since(self.started)),
        })
    }

    /// Decode rate while streaming, after the first token, so it converges on the final one.
    pub fn live_rate(&self, now: Instant) -> Option<f64> {
        let first = self.prefilled_at?;
        let secs = now.duration_since(first).as_secs_f64();
        (self.pieces > 1 && secs > 0.0).then(|| (self.pieces - 1) as f64 / secs)
    }

    /// The footer of an answer stopped here, before the engine's own figures arrive: TTFT
    /// and prefill from the `Prefilled` event, the live decode rate, the pieces received.
    pub fn cancelled_footer(&self, now: Instant) -> Footer {
        self.partial_footer(now, FinishReason::Cancelled)
    }

    /// The footer of an answer that ended before the engine finished it: what the stream
    /// measured so far, with `reason`.
    pub fn partial_footer(&self, now: Instant, reason: FinishReason) -> Footer {
        let ttft = self
            .ttft
            .unwrap_or_else(|| now.saturating_duration_since(self.started));
        let evaluated = self.prompt_tokens.saturating_sub(self.cached_tokens);
        Footer {
            ttft,
            prefill_rate: if ttft.is_zero() {
                0.0
            } else {
                evaluated as f64 / ttft.as_secs_f64()
            },
            decode_rate: self.live_rate(now).unwrap_or(0.0),
            tokens: self.pieces,
            reason,
            joules: self.energy_known.then_some(self.energy_j),
            peak_rss: self.peak_rss,
            thinking: self.thought(now),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AbSide {
    pub model: String,
    pub path: PathBuf,
    pub answer: String,
    pub footer: Option<Footer>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AbPhase {
    AnswerA,
    LoadB,
    AnswerB,
    LoadBack,
    Done,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AbRun {
    pub prompt: String,
    pub a: AbSide,
    pub b: AbSide,
    pub phase: AbPhase,
    /// How B was loaded and how A came back (resident beside the other, or swapped), once
    /// known, in words.
    pub residency: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Key(KeyEvent),
    Paste(String),
    Mouse(MouseEventKind),
    Engine(EngineEvent),
    Telemetry(Snapshot),
    /// A catalog model finished downloading (or failed to).
    Fetched {
        id: String,
        result: Result<PathBuf, String>,
    },
    /// Saved sessions found on disk, for the list.
    SessionList(Vec<SessionSummary>),
    /// A saved session read back.
    SessionLoaded {
        path: PathBuf,
        entries: Vec<ChatEntry>,
    },
    Status(String),
    /// The engine thread ended (a panic, say); the reason. The app starts a fresh engine.
    EngineStopped(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Generate {
        req: RequestId,
        messages: Vec<Message>,
        params: GenParams,
    },
    Cancel {
        req: RequestId,
    },
    Load {
        path: PathBuf,
        /// Keep the model loaded now resident beside the new one when both fit (A/B).
        keep_previous: bool,
    },
    Fetch {
        id: String,
    },
    /// Append an entry to the session file (so a crash loses at most the answer in flight).
    SaveEntry(ChatEntry),
    NewSession,
    ListSessions,
    OpenSession(PathBuf),
    ExportMarkdown,
    Copy(String),
    Quit,
}

#[derive(Debug)]
pub struct State {
    pub chat: Vec<ChatEntry>,
    pub input: Input,
    pub stream: Option<Stream>,
    pub model: Option<ModelInfo>,
    /// A model being loaded (label), with when the load started.
    pub loading: Option<(String, Instant)>,
    pub switcher: Vec<SwitchItem>,
    pub mode: Mode,
    /// Lines scrolled up from the bottom of the chat; 0 follows the stream.
    pub scroll: u16,
    /// How far the chat can scroll up, as the last frame measured it: scrolling up stops
    /// there, so scrolling down moves the view at once.
    pub scroll_max: u16,
    pub decode_history: VecDeque<f64>,
    pub last: Option<Footer>,
    pub memory: Option<Memory>,
    pub power: Power,
    pub watts_history: VecDeque<f64>,
    /// The GPU, the battery and what the machine is, from the last telemetry snapshot.
    pub details: Details,
    /// Battery energy spent since start, and how much of it while generating.
    pub battery_use: BatteryUse,
    pub kv_bytes: usize,
    /// The A/B run in progress (its answers stream side by side).
    pub ab: Option<AbRun>,
    /// The last finished A/B run, for its scorecard.
    pub ab_last: Option<AbRun>,
    /// The catalog model being downloaded because the user picked it, while it is still
    /// their choice: picking another model meanwhile means it is not loaded when it lands.
    pub fetching: Option<String>,
    /// The models the engine holds, the active one first.
    pub resident: Vec<PathBuf>,
    /// A switch that failed and the model being read again in its place: the failure is
    /// still shown once that model is back.
    failed_switch: Option<String>,
    /// A/B just finished: the `Resident` event of A's return notes its residency.
    ab_back_pending: bool,
    /// The context is full (the prompt was refused, or an answer filled it): the prompt's
    /// tokens and the context's size when known. Ctrl-D then drops the oldest turns.
    pub overflow: Option<(usize, usize)>,
    pub sessions: Vec<SessionSummary>,
    pub next_req: RequestId,
    pub quit_armed: bool,
    pub status: String,
    pub params: GenParams,
    pub system_prompt: Option<String>,
    /// No network: models not on disk cannot be fetched (`--offline`).
    pub offline: bool,
    /// The server of a remote backend as its `/metrics`, `/slots` or `/api/ps` show it (the
    /// memory and power panes show this instead of the client machine); set by app.rs.
    pub remote: Option<crate::remote::watch::ServerView>,
    last_sample: Option<Instant>,
    /// Tokens of context after the last answer (see `context_used`).
    pub context: usize,
    /// Thinking blocks shown in full rather than collapsed to one line (Ctrl-T).
    pub show_thinking: bool,
}

impl State {
    pub fn new(params: GenParams, switcher: Vec<SwitchItem>) -> Self {
        Self {
            chat: Vec::new(),
            input: Input::default(),
            stream: None,
            model: None,
            loading: None,
            switcher,
            mode: Mode::Chat,
            scroll: 0,
            scroll_max: u16::MAX,
            decode_history: VecDeque::new(),
            last: None,
            memory: None,
            power: Power::Unavailable("no reading yet".into()),
            watts_history: VecDeque::new(),
            details: Details::default(),
            battery_use: BatteryUse::default(),
            kv_bytes: 0,
            ab: None,
            ab_last: None,
            fetching: None,
            resident: Vec::new(),
            failed_switch: None,
            ab_back_pending: false,
            overflow: None,
            sessions: Vec::new(),
            next_req: 1,
            quit_armed: false,
            status: String::new(),
            params,
            system_prompt: None,
            offline: false,
            remote: None,
            last_sample: None,
            context: 0,
            show_thinking: false,
        }
    }

    pub fn model_label(&self) -> String {
        self.model
            .as_ref()
            .map_or("no model".into(), |m| m.name.clone())
    }

    /// Where the conversation the model sees begins: after the last note of dropped turns.
    pub fn context_start(&self) -> usize {
        self.chat
            .iter()
            .rposition(is_drop_note)
            .map_or(0, |i| i + 1)
    }

    /// Messages for the engine: the system prompt and the conversation so far, without the
    /// turns dropped from the context, without notes, and past answers without their
    /// thinking blocks (as reasoning models' own templates and llama-server send them).
    pub fn messages(&self) -> Vec<Message> {
        self.system_prompt
            .iter()
            .map(|s| Message::new(Role::System, s.clone()))
            .chain(
                self.chat[self.context_start()..]
                    .iter()
                    .filter(|e| e.role != Role::System)
                    .map(|e| match e.role {
                        Role::Assistant => {
                            Message::new(e.role, crate::think::split(&e.text).answer.to_string())
                        }
                        _ => Message::new(e.role, e.text.clone()),
                    }),
            )
            .collect()
    }

    /// Ctrl-D when the context is full: the oldest turns leave the context (they stay on
    /// screen, above a note that says what was dropped, and in the session file). As many
    /// go as the refused prompt needs, judged by characters against its token count, and
    /// at least one; the prompt stays in the input line to send again.
    pub fn drop_oldest_turns(&mut self) -> Vec<Effect> {
        let Some((prompt_tokens, holds)) = self.overflow else {
            self.status = "the context is not full: nothing to drop".into();
            return vec![];
        };
        if self.stream.is_some() || self.ab.is_some() {
            self.status = "wait for the current answer (Esc stops it)".into();
            return vec![];
        }
        let start = self.context_start();
        // Turns in the context: each begins with a prompt.
        let turn_starts: Vec<usize> = (start..self.chat.len())
            .filter(|&i| self.chat[i].role == Role::User)
            .collect();
        if turn_starts.is_empty() {
            self.status =
                "no turns left to drop: the prompt alone does not fit; shorten it or raise --ctx"
                    .into();
            return vec![];
        }
        let chars = |r: std::ops::Range<usize>| -> usize {
            self.chat[r]
                .iter()
                .filter(|e| e.role != Role::System)
                .map(|e| e.text.chars().count())
                .sum()
        };
        let total = chars(start..self.chat.len()) + self.input.text.chars().count();
        // Keep at most this share of the characters: the share of the refused prompt's
        // tokens that fits, with a margin for the answer and the estimate.
        let share = if prompt_tokens > 0 && holds > 0 {
            (holds as f64 / prompt_tokens as f64 * 0.8).min(0.8)
        } else {
            0.5
        };
        let mut cut = 1; // turns to drop
        while cut < turn_starts.len() {
            let end = turn_starts[cut];
            let left = total - chars(start..end);
            if (left as f64) <= share * total as f64 {
                break;
            }
            cut += 1;
        }
        let end = turn_starts.get(cut).copied().unwrap_or(self.chat.len());
        let kept = total.saturating_sub(chars(start..end));
        let first = self.chat[turn_starts[0]]
            .text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .chars()
            .take(40)
            .collect::<String>();
        let what = if cut == 1 {
            format!("the oldest turn (\"{first}\")")
        } else {
            format!("the {cut} oldest turns, from \"{first}\"")
        };
        let note = ChatEntry {
            role: Role::System,
            text: format!(
                "{DROPPED_NOTE} {what}, about {} characters; the model no longer sees what is above.*",
                total - kept
            ),
            model: String::new(),
            footer: None,
        };
        self.chat.insert(end, note.clone());
        // The count falls by the share of the characters that went; the next answer gives
        // the exact figure.
        self.context = (self.context as f64 * kept as f64 / total.max(1) as f64) as usize;
        self.overflow = None;
        self.status = format!("dropped {what}; Enter sends the prompt again");
        vec![Effect::SaveEntry(note)]
    }

    /// Tokens of context in use: the answer being written, else the conversation after the
    /// last answer (0 after Ctrl-N, a reopened session or a new model). Never more than the
    /// context holds: an answer stopped by a full context counts its last sampled token, which
    /// never enters the cache, so prompt + generated can be one over.
    pub fn context_used(&self) -> usize {
        let used = self
            .stream
            .as_ref()
            .map_or(self.context, |s| s.prompt_tokens + s.pieces);
        match &self.model {
            Some(m) => used.min(m.n_ctx),
            None => used,
        }
    }

    fn start_request(&mut self, messages: Vec<Message>) -> Vec<Effect> {
        let req = self.next_req;
        self.next_req += 1;
        self.stream = Some(Stream::new(
            req,
            Instant::now(),
            self.memory.map_or(0, |m| m.process_rss),
        ));
        self.scroll = 0;
        vec![Effect::Generate {
            req,
            messages,
            params: self.params.clone(),
        }]
    }

    /// Shows `label` as loading; the status of the previous load ("loaded in …") goes, so
    /// that it is never shown beside "loading".
    fn begin_loading(&mut self, label: String) {
        if self.status.starts_with("loaded in") {
            self.status.clear();
        }
        self.loading = Some((label, Instant::now()));
    }

    /// Ends the answer being streamed here and now, as cancelled, before something replaces
    /// the chat or the model (an A/B run, a reopened session, a new conversation): the engine
    /// is told to stop, the answer keeps what streamed with a cancelled footer, and the turn
    /// is saved into the current session. Its late events belong to no conversation now and
    /// are dropped. An A/B run in progress is given up, and A is loaded back if B was in.
    fn detach_stream(&mut self) -> Vec<Effect> {
        let mut fx = vec![];
        if let Some(s) = self.stream.take() {
            fx.push(Effect::Cancel { req: s.req });
            if self.ab.is_none() {
                let f = s.cancelled_footer(Instant::now());
                if let Some(e) = self.chat.last_mut().filter(|e| e.role == Role::Assistant) {
                    e.footer = Some(f);
                }
                self.context = s.prompt_tokens + s.pieces;
                fx.extend(self.save_turn());
            }
        }
        if let Some(ab) = self.ab.take() {
            if matches!(ab.phase, AbPhase::LoadB | AbPhase::AnswerB) {
                self.begin_loading(ab.a.model.clone());
                fx.push(Effect::Load {
                    path: ab.a.path,
                    keep_previous: true,
                });
            }
        }
        fx
    }

    fn cancel(&mut self) -> Vec<Effect> {
        match &self.stream {
            Some(s) => {
                self.status = "answer stopped".into();
                vec![Effect::Cancel { req: s.req }]
            }
            None => vec![],
        }
    }

    fn send(&mut self) -> Vec<Effect> {
        if self.stream.is_some() || self.loading.is_some() {
            self.status = "wait for the current answer (Esc stops it)".into();
            return vec![];
        }
        if self.model.is_none() {
            self.status = "no model loaded: Ctrl-O opens the model switcher".into();
            return vec![];
        }
        let text = self.input.take();
        if text.trim().is_empty() {
            return vec![];
        }
        self.chat.push(ChatEntry {
            role: Role::User,
            text,
            model: String::new(),
            footer: None,
        });
        self.chat.push(ChatEntry {
            role: Role::Assistant,
            text: String::new(),
            model: self.model_label(),
            footer: None,
        });
        let mut messages = self.messages();
        messages.pop(); // the empty answer being written
                        // The prompt is saved with its answer (`turn_to_save`), not now: a prompt the engine
                        // refuses (too long for the context) comes back to the input and is never saved.
        self.start_request(messages)
    }

    /// The last turn, its prompt and its answer, as entries to append to the session file
    /// once the answer is over (finished, cancelled, failed part-way or cut by a signal).
    pub fn turn_to_save(&self) -> Vec<ChatEntry> {
        match &self.chat[self.chat.len().saturating_sub(2)..] {
            [u, a] if u.role == Role::User && a.role == Role::Assistant => {
                vec![u.clone(), a.clone()]
            }
            [.., a] if a.role == Role::Assistant => vec![a.clone()],
            _ => vec![],
        }
    }

    fn save_turn(&self) -> Vec<Effect> {
        self.turn_to_save()
            .into_iter()
            .map(Effect::SaveEntry)
            .collect()
    }

    /// Begins an A/B run of the last prompt (or the input) against `b`.
    fn start_ab(&mut self, b: &SwitchItem) -> Vec<Effect> {
        if self.loading.is_some() || self.ab.is_some() {
            self.status = "wait for the model to load".into();
            return vec![];
        }
        // An answer streaming now is finished (as cancelled) and saved first.
        let mut fx = self.detach_stream();
        let prompt = if !self.input.text.trim().is_empty() {
            self.input.take()
        } else if let Some(p) = self.chat.iter().rev().find(|e| e.role == Role::User) {
            p.text.clone()
        } else {
            self.status = "type a prompt first, then A/B it".into();
            return fx;
        };
        let (Some(a), Some(b_path)) = (&self.model, &b.path) else {
            self.status = "A/B needs a loaded model and a downloaded second model".into();
            return fx;
        };
        self.ab = Some(AbRun {
            prompt: prompt.clone(),
            a: AbSide {
                model: a.name.clone(),
                path: a.path.clone(),
                answer: String::new(),
                footer: None,
            },
            b: AbSide {
                model: b.label.clone(),
                path: b_path.clone(),
                answer: String::new(),
                footer: None,
            },
            phase: AbPhase::AnswerA,
            residency: None,
        });
        self.status = format!("A/B: {} first", a.name);
        fx.extend(self.start_request(vec![Message::new(Role::User, prompt)]));
        fx
    }

    fn choose_model(&mut self, i: usize, for_ab: bool) -> Vec<Effect> {
        let Some(item) = self.switcher.get(i).cloned() else {
            return vec![];
        };
        self.mode = Mode::Chat;
        if for_ab {
            return self.start_ab(&item);
        }
        // A model picked during an A/B run ends the run: its answer is stopped and dropped
        // (the run is not filed), and the picked model is loaded instead of the run's next.
        let mut stopped = vec![];
        if self.ab.take().is_some() {
            if let Some(s) = self.stream.take() {
                stopped.push(Effect::Cancel { req: s.req });
            }
            self.loading = None;
            self.status = "A/B stopped".into();
        }
        match (&item.path, &item.id) {
            (Some(path), _) => {
                let mut effects = stopped;
                effects.extend(self.cancel());
                // A download picked before is no longer the choice.
                self.fetching = None;
                self.begin_loading(item.label.clone());
                effects.push(Effect::Load {
                    path: path.clone(),
                    keep_previous: false,
                });
                effects
            }
            (None, Some(_)) if self.offline => {
                self.status = format!("{} needs download, offline", item.label);
                stopped
            }
            (None, Some(id)) if self.fetching.as_ref() == Some(id) => {
                self.status = format!("{} is downloading already", item.label);
                stopped
            }
            (None, Some(id)) => {
                let mut effects = stopped;
                effects.extend(self.cancel());
                self.fetching = Some(id.clone());
                self.begin_loading(format!("downloading {}", item.label));
                effects.push(Effect::Fetch { id: id.clone() });
                effects
            }
            (None, None) => stopped,
        }
    }
}

fn ctrl(k: &KeyEvent, c: char) -> bool {
    k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char(c)
}

/// The one place the state changes.
pub fn update(st: &mut State, msg: Msg) -> Vec<Effect> {
    match msg {
        Msg::Key(k) if k.kind != KeyEventKind::Release => on_key(st, k),
        Msg::Key(_) => vec![],
        Msg::Paste(text) => {
            if st.mode == Mode::Chat {
                st.input.insert(&text);
            }
            vec![]
        }
        Msg::Mouse(MouseEventKind::ScrollUp) => {
            st.scroll = st.scroll.saturating_add(3).min(st.scroll_max);
            vec![]
        }
        Msg::Mouse(MouseEventKind::ScrollDown) => {
            st.scroll = st.scroll.saturating_sub(3);
            vec![]
        }
        Msg::Mouse(_) => vec![],
        Msg::Engine(ev) => on_engine(st, ev),
        Msg::Telemetry(snap) => {
            on_telemetry(st, snap);
            vec![]
        }
        Msg::Fetched { id, result } => {
            // Loaded only if it is still the user's choice; otherwise it waits in the
            // switcher and nothing in progress (a load, an answer) is disturbed.
            let wanted = st.fetching.as_deref() == Some(id.as_str());
            if wanted {
                st.fetching = None;
            }
            match result {
                Ok(path) => {
                    for item in st
                        .switcher
                        .iter_mut()
                        .filter(|i| i.id.as_deref() == Some(&id))
                    {
                        item.path = Some(path.clone());
                    }
                    if !wanted {
                        st.status = format!("{id} downloaded; Ctrl-O loads it");
                        return vec![];
                    }
                    st.begin_loading(id);
                    vec![Effect::Load {
                        path,
                        keep_previous: false,
                    }]
                }
                Err(e) => {
                    if wanted {
                        st.loading = None;
                    }
                    st.status = format!("download of {id} failed: {e}");
                    vec![]
                }
            }
        }
        Msg::SessionList(list) => {
            st.sessions = list;
            st.mode = Mode::Sessions { selected: 0 };
            vec![]
        }
        Msg::SessionLoaded { path, entries } => {
            st.chat = entries;
            st.context = 0;
            st.overflow = None;
            st.scroll = 0;
            st.status = format!("reopened {}", path.display());
            vec![]
        }
        Msg::Status(s) => {
            st.status = s;
            vec![]
        }
        Msg::EngineStopped(why) => {
            let mut fx = vec![];
            st.fetching = None;
            if let Some(req) = st.stream.as_ref().map(|s| s.req) {
                // Like a failed request: a partial answer is kept (and saved), an empty one
                // is taken back with its prompt returned to the input line.
                if st.ab.is_none()
                    && st
                        .chat
                        .last()
                        .is_some_and(|e| e.role == Role::Assistant && !e.text.is_empty())
                {
                    fx = st.save_turn();
                }
                on_engine(
                    st,
                    EngineEvent::Failed {
                        req,
                        error: String::new(),
                    },
                );
            }
            st.ab = None;
            st.loading = None;
            st.model = None;
            st.resident.clear();
            st.kv_bytes = 0;
            st.status = format!("the engine stopped: {why}; Ctrl-O loads a model again");
            fx
        }
    }
}

fn on_key(st: &mut State, k: KeyEvent) -> Vec<Effect> {
    // Ctrl-C: stop the answer, else arm quitting; twice in a row quits.
    if ctrl(&k, 'c') {
        if st.stream.is_some() {
            st.quit_armed = false;
            return st.cancel();
        }
        if st.quit_armed {
            return vec![Effect::Quit];
        }
        st.quit_armed = true;
        st.status = "press Ctrl-C again to quit".into();
        return vec![];
    }
    st.quit_armed = false;
    match st.mode.clone() {
        Mode::Help | Mode::AbResult => {
            if matches!(
                k.code,
                KeyCode::Esc
                    | KeyCode::Enter
                    | KeyCode::Char('q')
                    | KeyCode::Char('?')
                    | KeyCode::F(1)
            ) {
                st.mode = Mode::Chat;
            }
            vec![]
        }
        Mode::Switcher { selected, for_ab } => {
            let n = st.switcher.len();
            match k.code {
                KeyCode::Esc => st.mode = Mode::Chat,
                KeyCode::Up if n > 0 => {
                    st.mode = Mode::Switcher {
                        selected: (selected + n - 1) % n,
                        for_ab,
                    }
                }
                KeyCode::Down if n > 0 => {
                    st.mode = Mode::Switcher {
                        selected: (selected + 1) % n,
                        for_ab,
                    }
                }
                KeyCode::Enter => return st.choose_model(selected, for_ab),
                _ => {}
            }
            vec![]
        }
        Mode::Sessions { selected } => {
            let n = st.sessions.len();
            match k.code {
                KeyCode::Esc => st.mode = Mode::Chat,
                KeyCode::Up if n > 0 => {
                    st.mode = Mode::Sessions {
                        selected: (selected + n - 1) % n,
                    }
                }
                KeyCode::Down if n > 0 => {
                    st.mode = Mode::Sessions {
                        selected: (selected + 1) % n,
                    }
                }
                KeyCode::Enter if n > 0 => {
                    st.mode = Mode::Chat;
                    // The answer in flight is saved into its own session before the chat
                    // is replaced; none of its tokens reach the reopened one.
                    let mut fx = st.detach_stream();
                    if !fx.is_empty() {
                        st.status = "answer stopped".into();
                    }
                    fx.push(Effect::OpenSession(st.sessions[selected].path.clone()));
                    return fx;
                }
                _ => {}
            }
            vec![]
        }
        Mode::Chat => on_chat_key(st, k),
    }
}

fn on_chat_key(st: &mut State, k: KeyEvent) -> Vec<Effect> {
    let alt = k.modifiers.contains(KeyModifiers::ALT);
    let shift = k.modifiers.contains(KeyModifiers::SHIFT);
    match k.code {
        KeyCode::Esc => return st.cancel(),
        KeyCode::Enter if alt || shift => st.input.insert("\n"),
        KeyCode::Enter => return st.send(),
        KeyCode::F(1) => st.mode = Mode::Help,
        KeyCode::Char('?') if st.input.text.is_empty() => st.mode = Mode::Help,
        KeyCode::F(2) | KeyCode::Char('o') if k.code == KeyCode::F(2) || ctrl(&k, 'o') => {
            st.mode = Mode::Switcher {
                selected: 0,
                for_ab: false,
            }
        }
        KeyCode::F(3) | KeyCode::Char('b') if k.code == KeyCode::F(3) || ctrl(&k, 'b') => {
            st.mode = Mode::Switcher {
                selected: 0,
                for_ab: true,
            }
        }
        KeyCode::F(4) => return vec![Effect::ListSessions],
        KeyCode::Char('e') if ctrl(&k, 'e') => return vec![Effect::ExportMarkdown],
        KeyCode::Char('y') if ctrl(&k, 'y') => {
            return match st
                .chat
                .iter()
                .rev()
                .find(|e| e.role == Role::Assistant && !e.text.is_empty())
            {
                Some(e) => {
                    st.status = "last answer copied".into();
                    vec![Effect::Copy(e.text.clone())]
                }
                None => vec![],
            };
        }
        KeyCode::Char('n') if ctrl(&k, 'n') => {
            // An answer cut by Ctrl-N is saved (as far as it got) before the chat goes.
            let mut fx = st.detach_stream();
            st.chat.clear();
            st.context = 0;
            st.overflow = None;
            st.status = "new conversation".into();
            fx.push(Effect::NewSession);
            return fx;
        }
        KeyCode::Char('u') if ctrl(&k, 'u') => st.input.clear(),
        KeyCode::Char('t') if ctrl(&k, 't') => {
            st.show_thinking = !st.show_thinking;
            st.status = if st.show_thinking {
                "thinking blocks shown in full".into()
            } else {
                "thinking blocks collapsed".into()
            };
        }
        KeyCode::Char('d') if ctrl(&k, 'd') => return st.drop_oldest_turns(),
        KeyCode::Char(c) if !k.modifiers.contains(KeyModifiers::CONTROL) => {
            let mut b = [0u8; 4];
            st.input.insert(c.encode_utf8(&mut b));
        }
        KeyCode::Backspace => st.input.backspace(),
        KeyCode::Delete => st.input.delete(),
        KeyCode::Left => st.input.left(),
        KeyCode::Right => st.input.right(),
        KeyCode::Home => st.input.home(),
        KeyCode::End => st.input.end(),
        KeyCode::Up if !st.input.is_multiline() => st.input.history_prev(),
        KeyCode::Down if !st.input.is_multiline() => st.input.history_next(),
        KeyCode::PageUp => st.scroll = st.scroll.saturating_add(10).min(st.scroll_max),
        KeyCode::PageDown => st.scroll = st.scroll.saturating_sub(10),
        _ => {}
    }
    vec![]
}

fn footer(stats: &GenStats, reason: FinishReason, stream: &Stream) -> Footer {
    Footer {
        ttft: stats.ttft,
        prefill_rate: stats.prompt_rate(),
        decode_rate: stats.decode_rate(),
        tokens: stats.generated_tokens,
        reason,
        joules: stream.energy_known.then_some(stream.energy_j),
        peak_rss: stream.peak_rss,
        thinking: stream.thought(Instant::now()),
    }
}

/// A remote answer's rates side by side: the footer's are the client's (from the stream as
/// it arrived, network included), the server's come from its own clocks.
pub fn server_rates_line(f: &Footer, sv: &crate::protocol::ServerStats) -> String {
    let rate = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.1} tok/s"));
    format!(
        "client: decode {:.1} tok/s, TTFT {:.2}s · server ({}): prompt {}, decode {}",
        f.decode_rate,
        f.ttft.as_secs_f64(),
        sv.source,
        rate(sv.prompt_rate()),
        rate(sv.decode_rate())
    )
}

fn on_engine(st: &mut State, ev: EngineEvent) -> Vec<Effect> {
    let current = st.stream.as_ref().map(|s| s.req);
    match ev {
        EngineEvent::Loading { path } => {
            // The engine reading back the model a failed switch had to free.
            if st.loading.is_none() {
                st.begin_loading(file_label(&path));
            }
            vec![]
        }
        EngineEvent::Ready { info } => {
            st.loading = None;
            st.status = match st.failed_switch.take() {
                Some(why) => format!("{why}; {} is loaded again", info.name),
                None => format!("loaded in {:.1}s", info.load_time.as_secs_f64()),
            };
            st.kv_bytes = 0;
            st.context = 0;
            st.overflow = None;
            st.model = Some(info);
            ab_after_load(st)
        }
        EngineEvent::LoadFailed { error, .. } => {
            st.loading = None;
            st.status = format!("load failed: {error}");
            if let Some(ab) = st.ab.take() {
                st.status = format!("A/B stopped: {} failed to load: {error}", ab.b.model);
            }
            vec![]
        }
        EngineEvent::Resident { models, how } => {
            on_resident(st, &models, how);
            st.resident = models;
            vec![]
        }
        // Events of a replaced request are dropped.
        EngineEvent::Prefilled { req, .. }
        | EngineEvent::Token { req, .. }
        | EngineEvent::Finished { req, .. }
        | EngineEvent::Failed { req, .. }
            if Some(req) != current =>
        {
            vec![]
        }
        EngineEvent::Prefilled {
            prompt_tokens,
            cached_tokens,
            ttft,
            kv_bytes,
            ..
        } => {
            let s = st.stream.as_mut().expect("current request");
            s.prefilled_at = Some(Instant::now());
            s.ttft = Some(ttft);
            s.prompt_tokens = prompt_tokens;
            s.cached_tokens = cached_tokens;
            st.kv_bytes = kv_bytes;
            vec![]
        }
        EngineEvent::Token { text, .. } => {
            let s = st.stream.as_mut().expect("current request");
            s.pieces += 1;
            let answer = match st.ab.as_mut() {
                Some(ab) if ab.phase == AbPhase::AnswerA => Some(&mut ab.a.answer),
                Some(ab) if ab.phase == AbPhase::AnswerB => Some(&mut ab.b.answer),
                _ => st.chat.last_mut().map(|e| &mut e.text),
            };
            if let Some(answer) = answer {
                answer.push_str(&text);
                s.think.piece(answer, Instant::now());
            }
            vec![]
        }
        EngineEvent::Finished { stats, reason, .. } => {
            let s = st.stream.take().expect("current request");
            let f = footer(&stats, reason, &s);
            st.kv_bytes = stats.kv_bytes;
            if f.tokens > 1 {
                st.decode_history.push_back(f.decode_rate);
                while st.decode_history.len() > HISTORY {
                    st.decode_history.pop_front();
                }
            }
            st.context = stats.prompt_tokens + stats.generated_tokens;
            if let Some(sv) = &stats.server {
                st.status = server_rates_line(&f, sv);
            }
            if reason == FinishReason::ContextFull {
                let n_ctx = st.model.as_ref().map_or(0, |m| m.n_ctx);
                st.overflow = Some((st.context, n_ctx));
                if st.ab.is_none() {
                    st.status = "the context is full — Ctrl-D drops the oldest turns, Ctrl-N starts a new conversation".into();
                }
            }
            st.last = Some(Footer {
                tokens: stats.prompt_tokens + stats.generated_tokens,
                ..f.clone()
            });
            if st.ab.is_some() {
                return ab_after_answer(st, f);
            }
            if let Some(e) = st.chat.last_mut() {
                e.footer = Some(f);
            }
            st.save_turn()
        }
        EngineEvent::Failed { error, .. } => {
            let stream = st.stream.take();
            st.status = if crate::protocol::is_context_overflow(&error) {
                st.overflow = Some(overflow_sizes(&error));
                format!(
                    "error: {error} — Ctrl-D drops the oldest turns, Ctrl-N starts a new conversation"
                )
            } else {
                format!("error: {error}")
            };
            if st.ab.take().is_some() {
                return vec![];
            }
            // The failed turn is taken back so the prompt can be edited and resent; a part
            // that streamed before the failure is kept and saved with its prompt, its footer
            // saying it was cut.
            if let Some(e) = st
                .chat
                .last_mut()
                .filter(|e| e.role == Role::Assistant && !e.text.is_empty())
            {
                e.footer = stream.map(|s| s.partial_footer(Instant::now(), FinishReason::Cut));
                return st.save_turn();
            }
            if st
                .chat
                .last()
                .is_some_and(|e| e.role == Role::Assistant && e.text.is_empty())
            {
                st.chat.pop();
                if let Some(user) = st.chat.pop() {
                    st.input.clear();
                    st.input.insert(&user.text);
                }
            }
            vec![]
        }
    }
}

/// A file's name, for a model known only by its path.
fn file_label(path: &std::path::Path) -> String {
    path.file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned())
}

fn is_drop_note(e: &ChatEntry) -> bool {
    e.role == Role::System && e.text.starts_with(DROPPED_NOTE)
}

/// (prompt tokens, context size) from the engine's refusal "the prompt is N tokens but the
/// context holds M …"; (0, 0) when the words differ.
fn overflow_sizes(error: &str) -> (usize, usize) {
    let after = |key: &str| -> usize {
        error
            .split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
            .unwrap_or(0)
    };
    (
        after("the prompt is "),
        after(&format!("{} ", crate::protocol::CONTEXT_HOLDS)),
    )
}

/// What the engine holds after a load: a failed switch either kept the old model (the title
/// stays true) or freed it, in which case it is being read back or nothing is loaded; an A/B
/// run records whether its two models stay resident together.
fn on_resident(st: &mut State, models: &[PathBuf], how: LoadHow) {
    let name = st.model.as_ref().map(|m| m.name.clone());
    match how {
        LoadHow::FailedKeptOld => {
            if let Some(name) = &name {
                st.status.push_str(&format!(" — still on {name}"));
            }
        }
        LoadHow::FailedReloadingOld => {
            st.failed_switch = Some(st.status.clone());
            st.model = None;
            st.status.push_str(" — reading the previous model back");
        }
        LoadHow::FailedNone => {
            st.model = None;
            st.status
                .push_str(" — no model is loaded: Ctrl-O opens the model switcher");
        }
        _ => {}
    }
    if models.is_empty() {
        st.model = None;
    }
    // The run in progress, or the one that just finished with A's return.
    let ab = if st.ab.is_some() {
        st.ab.as_mut()
    } else if std::mem::take(&mut st.ab_back_pending) {
        st.ab_last.as_mut()
    } else {
        None
    };
    let Some(ab) = ab else {
        if how == LoadHow::Reused && st.loading.is_none() {
            if let Some(name) = name {
                st.status = format!("switched to {name} (already in memory)");
            }
        }
        return;
    };
    let words = match (&ab.phase, how) {
        (AbPhase::AnswerB, LoadHow::Reused) => "B was still in memory: no reload",
        (AbPhase::AnswerB, LoadHow::BesideOld) => "B loaded beside A: both stay in memory",
        (AbPhase::AnswerB, LoadHow::Swapped) => {
            "A and B do not fit in memory together: A was freed for B"
        }
        (AbPhase::Done, LoadHow::Reused) => "A was still in memory: no reload",
        (AbPhase::Done, LoadHow::Swapped | LoadHow::Fresh | LoadHow::BesideOld) => {
            "A was read back from disk"
        }
        _ => return,
    };
    let r = ab.residency.get_or_insert_with(String::new);
    if !r.is_empty() {
        r.push_str("; ");
    }
    r.push_str(words);
    if ab.phase == AbPhase::Done {
        st.status = format!("A/B done: {r} (Esc closes the scorecard)");
    }
}

fn ab_after_answer(st: &mut State, f: Footer) -> Vec<Effect> {
    let ab = st.ab.as_mut().expect("A/B run");
    match ab.phase {
        AbPhase::AnswerA => {
            ab.a.footer = Some(f);
            ab.phase = AbPhase::LoadB;
            let (label, path) = (ab.b.model.clone(), ab.b.path.clone());
            st.begin_loading(label);
            vec![Effect::Load {
                path,
                keep_previous: true,
            }]
        }
        AbPhase::AnswerB => {
            ab.b.footer = Some(f);
            ab.phase = AbPhase::LoadBack;
            let (label, path) = (ab.a.model.clone(), ab.a.path.clone());
            st.begin_loading(label);
            vec![Effect::Load {
                path,
                keep_previous: true,
            }]
        }
        _ => vec![],
    }
}

fn ab_after_load(st: &mut State) -> Vec<Effect> {
    let Some(ab) = st.ab.as_mut() else {
        return vec![];
    };
    match ab.phase {
        AbPhase::LoadB => {
            ab.phase = AbPhase::AnswerB;
            // B is named as the title names a loaded model (A already is).
            if let Some(m) = &st.model {
                ab.b.model = m.name.clone();
            }
            st.status = format!("A/B: now {}", ab.b.model);
            let prompt = ab.prompt.clone();
            st.start_request(vec![Message::new(Role::User, prompt)])
        }
        AbPhase::LoadBack => {
            ab.phase = AbPhase::Done;
            st.mode = Mode::AbResult;
            st.status = "A/B done (Esc closes the scorecard)".into();
            finish_ab(st)
        }
        _ => vec![],
    }
}

fn on_telemetry(st: &mut State, snap: Snapshot) {
    let dt = st.last_sample.map(|t| snap.at.saturating_duration_since(t));
    st.last_sample = Some(snap.at);
    if let Some(s) = st.stream.as_mut() {
        s.peak_rss = s.peak_rss.max(snap.memory.process_rss);
        match (snap.power.watts(), dt) {
            (Some(w), Some(dt)) => s.energy_j += w * dt.as_secs_f64(),
            _ => s.energy_known = false,
        }
    }
    if let Some(w) = snap.power.watts() {
        st.watts_history.push_back(w);
        while st.watts_history.len() > HISTORY {
            st.watts_history.pop_front();
        }
    }
    if let Some(dt) = dt {
        let generating = st.stream.is_some();
        st.battery_use
            .record(&snap.details.battery, dt.as_secs_f64(), generating);
    }
    st.memory = Some(snap.memory);
    st.power = snap.power;
    st.details = snap.details;
}

/// Files a finished A/B run: its prompt and both answers go into the chat as notes (shown and
/// saved to the session, never sent to the model, so the conversation goes on with A as
/// before), and the run is kept for the scorecard. The residency note comes with the
/// `Resident` event that follows this `Ready`, so the run is moved to `ab_last` then too.
fn finish_ab(st: &mut State) -> Vec<Effect> {
    let Some(ab) = st.ab.take() else {
        return vec![];
    };
    let mut notes = vec![ChatEntry {
        role: Role::System,
        text: format!("**A/B** of: {}", ab.prompt),
        model: String::new(),
        footer: None,
    }];
    for side in [&ab.a, &ab.b] {
        notes.push(ChatEntry {
            role: Role::System,
            text: side.answer.clone(),
            model: side.model.clone(),
            footer: side.footer.clone(),
        });
    }
    st.chat.extend(notes.iter().cloned());
    st.ab_last = Some(ab);
    st.ab_back_pending = true;
    notes.into_iter().map(Effect::SaveEntry).collect()
}
