//! Views: read-only render functions of the state. No IO here.

pub mod ab;
pub mod markdown;

use crate::catalog::Catalog;
use crate::protocol::Role;
use crate::roofline::{self, Profile};
use crate::state::{AbRun, ChatEntry, Footer, Mode, State, SwitchItem};
use crate::telemetry::{Battery, Charge, GpuMemory, Memory, Power};
use crate::theme::Theme;
use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Clear, Paragraph, Row, Sparkline, Table, Wrap};
use ratatui::Frame;
use std::time::Instant;

/// What the views need besides the state.
pub struct Ctx<'a> {
    pub theme: &'a Theme,
    pub profiles: &'a [Profile],
    /// "Now", passed in so snapshot tests are stable.
    pub now: Instant,
    /// Rendered lines of finished chat entries, so a frame only re-renders the one streaming.
    pub cache: &'a LineCache,
}

/// A memo of each chat entry's lines and of how many rows each line wraps to at the
/// width last drawn, so a frame neither re-renders the markdown of finished entries nor
/// re-wraps the whole chat: it sums cached row counts and wraps only the lines on screen.
#[derive(Default)]
pub struct LineCache {
    entries: std::cell::RefCell<Vec<Option<CachedEntry>>>,
    /// How many lines the chat could scroll up in the last frame drawn.
    max_scroll: std::cell::Cell<u16>,
}

impl LineCache {
    /// The chat's scroll limit measured by the last frame (the state's `scroll_max`).
    pub fn max_scroll(&self) -> u16 {
        self.max_scroll.get()
    }
}

/// One entry's rendered lines, with the rows each takes at `width`.
struct CachedEntry {
    key: EntryKey,
    lines: Vec<Line<'static>>,
    width: u16,
    heights: Vec<usize>,
    rows: usize,
}

impl CachedEntry {
    fn new(key: EntryKey, lines: Vec<Line<'static>>, width: u16) -> Self {
        let heights: Vec<usize> = lines.iter().map(|l| wrapped_rows(l, width)).collect();
        let rows = heights.iter().sum();
        Self {
            key,
            lines,
            width,
            heights,
            rows,
        }
    }

    fn rewrap(&mut self, width: u16) {
        if self.width != width {
            *self = Self::new(self.key, std::mem::take(&mut self.lines), width);
        }
    }
}

/// Rows a line takes in a paragraph of `width` wrapped without trimming. A paragraph wraps
/// each line on its own, so a window of lines wraps the same as the whole chat.
fn wrapped_rows(line: &Line<'static>, width: u16) -> usize {
    Paragraph::new(line.clone())
        .wrap(Wrap { trim: false })
        .line_count(width)
        .max(1)
}

/// What identifies an entry's text without reading all of it each frame: where it lives,
/// its length, its first and last 4 KB, and whether it has a footer. Finished entries are
/// never edited in place, only replaced (a reopened session) or removed.
/// Thinking blocks shown in full or not (Ctrl-T) changes every answer that has one.
type EntryKey = (usize, usize, u64, bool, bool);

fn entry_key(e: &ChatEntry, show_thinking: bool) -> EntryKey {
    use std::hash::{Hash, Hasher};
    let b = e.text.as_bytes();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b[..b.len().min(4096)].hash(&mut h);
    b[b.len().saturating_sub(4096)..].hash(&mut h);
    (
        b.as_ptr() as usize,
        b.len(),
        h.finish(),
        e.footer.is_some(),
        show_thinking,
    )
}

/// Width of the telemetry column.
const SIDE: u16 = 34;

pub fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

pub(crate) fn block<'a>(title: &'a str, ctx: &Ctx) -> Block<'a> {
    Block::bordered()
        .border_type(BorderType::Rounded)
        .border_style(Style::default().fg(ctx.theme.border))
        .title(Span::styled(title, Style::default().fg(ctx.theme.accent)))
}

pub fn render(f: &mut Frame, st: &State, ctx: &Ctx) {
    let area = f.area();
    f.render_widget(
        Block::default().style(Style::default().bg(ctx.theme.bg).fg(ctx.theme.fg)),
        area,
    );
    if area.height < 3 || area.width < 10 {
        f.render_widget(Paragraph::new(title_line(st, ctx)), area);
        return;
    }
    let input_h = (st.input.text.matches('\n').count() as u16 + 3)
        .clamp(3, 8)
        .min(area.height.saturating_sub(2));
    let [title, body, input] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(input_h),
    ])
    .areas(area);
    f.render_widget(Paragraph::new(title_line(st, ctx)), title);
    let show_side = body.width >= SIDE + 30 && body.height >= 16;
    let chat_area = if show_side {
        let [chat, side] =
            Layout::horizontal([Constraint::Min(30), Constraint::Length(SIDE)]).areas(body);
        render_side(f, side, st, ctx);
        chat
    } else {
        body
    };
    if st.ab.is_some() {
        ab::render_live(f, chat_area, st, ctx);
    } else {
        render_chat(f, chat_area, st, ctx);
    }
    render_input(f, input, st, ctx);
    match &st.mode {
        Mode::Chat => {}
        Mode::Help => render_help(f, area, ctx),
        Mode::Switcher { selected, for_ab } => {
            render_switcher(f, area, st, *selected, *for_ab, ctx)
        }
        Mode::Sessions { selected } => render_sessions(f, area, st, *selected, ctx),
        Mode::AbResult => {
            if let Some(ab) = &st.ab_last {
                render_ab(f, area, ab, ctx);
            }
        }
    }
}

/// Gives a freshly loaded model its [`Catalog::model_title`] before the state sees it.
pub fn retitle(msgs: &mut [crate::state::Msg], catalog: &Catalog) {
    for m in msgs {
        if let crate::state::Msg::Engine(crate::protocol::EngineEvent::Ready { info }) = m {
            info.name = catalog.model_title(&info.path);
        }
    }
}

fn title_line(st: &State, ctx: &Ctx) -> Line<'static> {
    let t = ctx.theme;
    let mut spans = vec![Span::styled(
        " tokentop ",
        Style::default()
            .fg(t.bg)
            .bg(t.accent)
            .add_modifier(Modifier::BOLD),
    )];
    let model = match (&st.model, &st.loading) {
        // A download's label says so itself ("downloading X"); a load's is the model.
        (_, Some((label, since))) => format!(
            " {}{label}… {:.0}s",
            if label.starts_with("downloading") {
                ""
            } else {
                "loading "
            },
            ctx.now.saturating_duration_since(*since).as_secs_f64()
        ),
        (Some(m), None) => format!(
            " {} · {} {} · {:.0}M",
            m.name,
            m.arch,
            m.quant,
            m.params as f64 / 1e6
        ),
        (None, None) => " no model".into(),
    };
    spans.push(Span::styled(model, Style::default().fg(t.fg)));
    if st.offline {
        spans.push(Span::raw(" "));
        spans.push(Span::styled(
            " offline ",
            Style::default().fg(t.bg).bg(t.warn),
        ));
    }
    if !st.status.is_empty() {
        spans.push(Span::styled(
            format!("  {}", st.status),
            Style::default().fg(t.dim),
        ));
    }
    Line::from(spans)
}

pub fn footer_text(f: &Footer) -> String {
    let energy = match f.joules {
        Some(j) if f.tokens > 0 => format!(" · {:.2} J/tok", j / f.tokens as f64),
        _ => String::new(),
    };
    // A thinking model's answer starts after its block: that wait is shown beside TTFT.
    let thought = match f.thinking {
        Some(th) => {
            let answer = th
                .first_answer
                .map_or("none".into(), |d| format!("{:.2}s", d.as_secs_f64()));
            format!(
                " · first answer {answer} (thought {} tokens, {:.1}s)",
                th.tokens,
                th.time.as_secs_f64()
            )
        }
        None => String::new(),
    };
    format!(
        "TTFT {:.2}s{thought} · prefill {:.0} tok/s · decode {:.1} tok/s · {} tokens · {}{energy}",
        f.ttft.as_secs_f64(),
        f.prefill_rate,
        f.decode_rate,
        f.tokens,
        f.reason.as_str()
    )
}

/// An answer's lines: its thinking block collapsed to one line (or in full when `shown`),
/// then the answer as markdown. `live` is the stream still writing it.
pub(crate) fn answer_lines(
    text: &str,
    footer: Option<&Footer>,
    live: Option<&crate::state::Stream>,
    shown: bool,
    ctx: &Ctx,
) -> Vec<Line<'static>> {
    let t = ctx.theme;
    let parts = crate::think::split(text);
    let mut out = Vec::new();
    if let Some(thought) = parts.thought {
        let (pieces, time) = match (live, footer.and_then(|f| f.thinking)) {
            (Some(s), _) => (Some(s.think.pieces), s.think.duration(ctx.now)),
            (None, Some(th)) => (Some(th.tokens), Some(th.time)),
            (None, None) => (None, None),
        };
        let style = Style::default().fg(t.dim).add_modifier(Modifier::ITALIC);
        out.push(Line::styled(
            crate::think::summary(!parts.closed, pieces, time, shown),
            style,
        ));
        if shown {
            out.extend(
                thought
                    .lines()
                    .map(|l| Line::styled(format!("│ {l}"), Style::default().fg(t.dim))),
            );
        }
    }
    out.extend(markdown::lines(parts.answer, t));
    out
}

fn entry_lines(
    e: &ChatEntry,
    live: Option<&crate::state::Stream>,
    show_thinking: bool,
    ctx: &Ctx,
) -> Vec<Line<'static>> {
    let streaming = live.is_some();
    let t = ctx.theme;
    let mut out = Vec::new();
    match e.role {
        Role::User => {
            out.push(Line::styled(
                "you",
                Style::default().fg(t.user).add_modifier(Modifier::BOLD),
            ));
            out.extend(
                e.text
                    .lines()
                    .map(|l| Line::styled(l.to_string(), Style::default().fg(t.user))),
            );
        }
        _ => {
            out.push(Line::styled(
                e.model.clone(),
                Style::default().fg(t.accent).add_modifier(Modifier::BOLD),
            ));
            out.extend(answer_lines(
                &e.text,
                e.footer.as_ref(),
                live,
                show_thinking,
                ctx,
            ));
            if streaming {
                let caret = Span::styled("▌", Style::default().fg(t.accent));
                if out.len() > 1 {
                    out.last_mut().expect("non-empty").spans.push(caret);
                } else {
                    out.push(Line::from(caret));
                }
            }
            if let Some(f) = &e.footer {
                out.push(Line::styled(footer_text(f), Style::default().fg(t.dim)));
            }
        }
    }
    out.push(Line::default());
    out
}

pub fn render_chat(f: &mut Frame, area: Rect, st: &State, ctx: &Ctx) {
    let n = st.chat.len();
    if n == 0 || area.width == 0 {
        ctx.cache.max_scroll.set(0);
        let hint = Line::styled(
            "Type a prompt and press Enter. ? or F1 for help, Ctrl-O to switch models.",
            Style::default().fg(ctx.theme.dim),
        );
        f.render_widget(Paragraph::new(hint).wrap(Wrap { trim: false }), area);
        return;
    }
    let width = area.width;
    let mut cache = ctx.cache.entries.borrow_mut();
    cache.resize_with(n, || None);
    let mut total = 0usize;
    for (i, e) in st.chat.iter().enumerate() {
        let streaming = st.stream.is_some() && st.ab.is_none() && i + 1 == n;
        let key = entry_key(e, st.show_thinking);
        let slot = &mut cache[i];
        match slot {
            Some(c) if !streaming && c.key == key => c.rewrap(width),
            _ => {
                let live = st.stream.as_ref().filter(|_| streaming);
                let lines = entry_lines(e, live, st.show_thinking, ctx);
                let mut c = CachedEntry::new(key, lines, width);
                if streaming {
                    // Never reused: the next frame's text differs.
                    c.key.0 = 0;
                }
                *slot = Some(c);
            }
        }
        total += slot.as_ref().map_or(0, |c| c.rows);
    }
    let height = area.height as usize;
    let max_scroll = total.saturating_sub(height);
    ctx.cache
        .max_scroll
        .set(max_scroll.min(u16::MAX as usize) as u16);
    let top = max_scroll - (st.scroll as usize).min(max_scroll);
    // Only the lines that reach the window are handed to the paragraph.
    let mut window: Vec<Line> = Vec::new();
    let mut row = 0usize;
    let mut skip = 0usize;
    'entries: for c in cache.iter().flatten() {
        if row + c.rows <= top {
            row += c.rows;
            continue;
        }
        for (line, h) in c.lines.iter().zip(&c.heights) {
            if row + h <= top {
                row += h;
                continue;
            }
            if window.is_empty() {
                skip = top - row;
            }
            window.push(line.clone());
            row += h;
            if row >= top + height {
                break 'entries;
            }
        }
    }
    let p = Paragraph::new(window).wrap(Wrap { trim: false });
    f.render_widget(p.scroll((skip.min(u16::MAX as usize) as u16, 0)), area);
}

pub fn render_input(f: &mut Frame, area: Rect, st: &State, ctx: &Ctx) {
    let title = if st.stream.is_some() {
        " answering… Esc stops "
    } else {
        " prompt · Enter sends · Alt-Enter newline "
    };
    let b = block(title, ctx);
    let inner = b.inner(area);
    // The text scrolls so the cursor stays in the box: sideways for a long line (by display
    // columns, so wide characters count as two), down for more lines than the box holds.
    let (line, _) = st.input.cursor_line_col();
    let before = &st.input.text[..st.input.cursor];
    let col = Span::raw(before.rsplit('\n').next().unwrap_or("")).width();
    let x_off = (col + 1).saturating_sub(inner.width as usize);
    let y_off = (line + 1).saturating_sub(inner.height as usize);
    let clamp = |v: usize| v.min(u16::MAX as usize) as u16;
    f.render_widget(
        Paragraph::new(st.input.text.as_str())
            .scroll((clamp(y_off), clamp(x_off)))
            .block(b),
        area,
    );
    if st.mode == Mode::Chat && inner.width > 0 && inner.height > 0 {
        let x = inner.x + clamp(col - x_off).min(inner.width - 1);
        let y = inner.y + clamp(line - y_off).min(inner.height - 1);
        f.set_cursor_position(Position::new(x, y));
    }
}

pub fn render_side(f: &mut Frame, area: Rect, st: &State, ctx: &Ctx) {
    let [speed, memory, power, roof] = Layout::vertical([
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Min(0),
    ])
    .areas(area);
    render_speed(f, speed, st, ctx);
    render_memory(f, memory, st, ctx);
    render_power(f, power, st, ctx);
    render_roofline(f, roof, st, ctx);
}

/// Decode rate to show now: live while streaming, else the last answer's.
pub fn current_rate(st: &State, now: Instant) -> Option<f64> {
    match &st.stream {
        Some(s) => s.live_rate(now),
        None => st.last.as_ref().map(|f| f.decode_rate),
    }
}

pub fn render_speed(f: &mut Frame, area: Rect, st: &State, ctx: &Ctx) {
    let t = ctx.theme;
    let b = block(" speed ", ctx);
    let inner = b.inner(area);
    f.render_widget(b, area);
    let rate = current_rate(st, ctx.now).map_or("—".into(), |r| format!("{r:.1}"));
    let ttft = st
        .stream
        .as_ref()
        .and_then(|s| s.ttft)
        .or(st.last.as_ref().map(|l| l.ttft))
        .map_or("—".into(), |d| format!("{:.2}s", d.as_secs_f64()));
    // Time to the first answer token, for an answer that thinks first.
    let answer = match &st.stream {
        Some(s) if s.think.began.is_some() => Some(s.thought(ctx.now).and_then(|t| t.first_answer)),
        Some(_) => None,
        None => st
            .last
            .as_ref()
            .and_then(|l| l.thinking)
            .map(|t| t.first_answer),
    }
    .map(|a| match a {
        Some(d) => format!(" · answer {:.2}s", d.as_secs_f64()),
        None => " · answer …".into(),
    });
    let prefill = st
        .last
        .as_ref()
        .map_or("—".into(), |l| format!("{:.0} tok/s", l.prefill_rate));
    let ctx_total = st.model.as_ref().map_or(0, |m| m.n_ctx);
    let lines = vec![
        Line::from(vec![
            Span::styled(
                rate,
                Style::default().fg(t.good).add_modifier(Modifier::BOLD),
            ),
            Span::styled(" tok/s decode", Style::default().fg(t.dim)),
        ]),
        Line::from(vec![
            Span::styled("TTFT ", Style::default().fg(t.dim)),
            Span::raw(ttft),
            Span::styled(answer.unwrap_or_default(), Style::default().fg(t.dim)),
        ]),
        Line::from(vec![
            Span::styled("prefill ", Style::default().fg(t.dim)),
            Span::raw(prefill),
        ]),
        Line::from(vec![
            Span::styled("context ", Style::default().fg(t.dim)),
            Span::raw(format!("{} / {} tokens", st.context_used(), ctx_total)),
        ]),
    ];
    let [text, spark] = Layout::vertical([Constraint::Length(4), Constraint::Min(0)]).areas(inner);
    f.render_widget(Paragraph::new(lines), text);
    let data: Vec<u64> = st
        .decode_history
        .iter()
        .map(|r| (r * 10.0) as u64)
        .collect();
    f.render_widget(
        Sparkline::default()
            .data(&data)
            .style(Style::default().fg(t.good)),
        spark,
    );
}

/// The memory pool split into weights, KV cache, other use of this process, other
/// processes and free.
pub fn pool_split(m: &Memory, weights: u64, kv: u64) -> [(&'static str, u64); 4] {
    let ours = m.process_rss.max(weights + kv);
    [
        ("weights", weights.min(m.total)),
        ("KV cache", kv),
        ("other", ours.saturating_sub(weights + kv) + m.others()),
        ("free", m.total.saturating_sub(m.others() + ours)),
    ]
}

pub fn render_memory(f: &mut Frame, area: Rect, st: &State, ctx: &Ctx) {
    if let Some(server) = remote_shown(st) {
        return render_remote(f, area, server, " server memory ", ctx);
    }
    let t = ctx.theme;
    let Some(m) = &st.memory else {
        f.render_widget(
            Paragraph::new("reading…").block(block(" memory ", ctx)),
            area,
        );
        return;
    };
    let title = format!(" memory · {} {} ", gb(m.total), m.kind.label());
    let b = block(&title, ctx);
    let inner = b.inner(area);
    f.render_widget(b, area);
    let weights = st.model.as_ref().map_or(0, |x| x.weight_bytes);
    let parts = pool_split(m, weights, st.kv_bytes as u64);
    let colors = [t.weights, t.kv, t.other, t.free];
    let width = inner.width as u64;
    let mut bar = Vec::new();
    let mut used = 0u64;
    for (i, (_, bytes)) in parts.iter().enumerate() {
        let cells = if i == parts.len() - 1 {
            width.saturating_sub(used)
        } else {
            (bytes * width).checked_div(m.total).unwrap_or(0)
        };
        used += cells;
        bar.push(Span::styled(
            "█".repeat(cells as usize),
            Style::default().fg(colors[i]),
        ));
    }
    let mut lines = vec![Line::from(bar)];
    for (i, (label, bytes)) in parts.iter().enumerate() {
        lines.push(Line::from(vec![
            Span::styled("■ ", Style::default().fg(colors[i])),
            Span::styled(format!("{label:<9}"), Style::default().fg(t.dim)),
            Span::raw(gb(*bytes)),
        ]));
    }
    let dim = Style::default().fg(t.dim);
    lines.push(match &st.details.gpu_memory {
        GpuMemory::Dedicated { used, total } => Line::from(vec![
            Span::styled("GPU VRAM ", dim),
            Span::raw(format!("{} / {}", gb(*used), gb(*total))),
        ]),
        GpuMemory::Share { used } => Line::from(vec![
            Span::styled("GPU share ", dim),
            Span::raw(format!("{} of the pool", gb(*used))),
        ]),
        GpuMemory::WiredLimit { bytes, default } => Line::from(vec![
            Span::styled("GPU limit ", dim),
            Span::raw(gb(*bytes)),
            // iogpu.wired_limit_mb sets it (README, help); the default is about 3/4 of RAM.
            Span::styled(if *default { ", default ¾" } else { ", raised" }, dim),
        ]),
        GpuMemory::Unavailable(reason) => Line::styled(format!("GPU n/a: {reason}"), dim),
    });
    f.render_widget(Paragraph::new(lines), inner);
}

/// The battery line(s) of the power pane: discharge, share spent generating, tokens per
/// percent and hours left on battery; what the charger does on AC.
pub fn battery_lines(st: &State, ctx: &Ctx) -> Vec<Line<'static>> {
    let t = ctx.theme;
    let dim = Style::default().fg(t.dim);
    let r = match &st.details.battery {
        Battery::Unavailable(reason) => {
            return vec![Line::styled(format!("battery n/a: {reason}"), dim)]
        }
        Battery::Reading(r) => r,
    };
    let pct = r.percent.map_or(String::new(), |p| format!(" · {p:.0}%"));
    match r.state {
        Charge::Discharging => {
            let w = r.watts.unwrap_or(0.0);
            let left = r
                .hours_left(w)
                .map_or(String::new(), |h| format!(" · {h:.1} h left"));
            let mut lines = vec![Line::from(vec![
                Span::styled("battery ", Style::default().fg(t.warn)),
                Span::raw(format!("{w:.1} W{pct}{left}")),
            ])];
            if let Some(s) = st.battery_use.generating_share() {
                lines.push(Line::styled(
                    format!(
                        "{:.0}% of {:.2} Wh spent generating",
                        100.0 * s,
                        st.battery_use.joules / 3600.0
                    ),
                    dim,
                ));
            }
            let per_pct = st.last.as_ref().and_then(|l| {
                let tokens = st
                    .chat
                    .last()
                    .and_then(|e| e.footer.as_ref())
                    .map_or(0, |f| f.tokens);
                let j = l.joules.filter(|j| *j > 0.0)?;
                (tokens > 0).then(|| Some(tokens as f64 * r.joules_per_percent()? / j))?
            });
            if let Some(n) = per_pct {
                lines.push(Line::styled(
                    format!("{n:.0} tokens per 1% of battery"),
                    dim,
                ));
            }
            lines
        }
        Charge::Charging => vec![Line::styled(
            match r.watts {
                Some(w) if w > 0.0 => format!("on AC, charging {w:.0} W{pct}"),
                _ => format!("on AC, charging{pct}"),
            },
            dim,
        )],
        Charge::Full => vec![Line::styled("on AC, full".to_string(), dim)],
        Charge::NotCharging => vec![Line::styled(format!("on AC, not charging{pct}"), dim)],
    }
}

/// The GPU line of the power pane: NVML's utilisation, clocks and temperature, or the
/// CPU/GPU/ANE split where macmon gives one.
fn gpu_line(st: &State, ctx: &Ctx) -> Line<'static> {
    let dim = Style::default().fg(ctx.theme.dim);
    if !st.details.parts.is_empty() {
        let parts: Vec<String> = st
            .details
            .parts
            .iter()
            .map(|(n, w)| format!("{n} {w:.1}"))
            .collect();
        return Line::styled(format!("{} W", parts.join(" · ")), dim);
    }
    match &st.details.gpu {
        Ok(g) => {
            let opt = |v: Option<u32>, unit: &str| v.map_or("—".into(), |v| format!("{v}{unit}"));
            Line::from(vec![
                Span::styled("GPU ", dim),
                Span::raw(format!(
                    "{} · {} · {}",
                    opt(g.utilization_pct, "%"),
                    opt(g.graphics_mhz, " MHz"),
                    opt(g.temperature_c, "°C")
                )),
            ])
        }
        Err(reason) => Line::styled(format!("GPU n/a: {reason}"), dim),
    }
}

/// The server, while the model in use is a remote one.
fn remote_shown(st: &State) -> Option<&crate::remote::watch::ServerView> {
    st.remote
        .as_ref()
        .filter(|_| st.model.as_ref().is_some_and(|m| m.arch == "remote"))
}

/// A remote backend's pane: what its server exposes (KV cache, requests, rates), n/a with
/// the reason for the rest. Power is never exposed over HTTP by these servers.
fn render_remote(
    f: &mut Frame,
    area: Rect,
    server: &crate::remote::watch::ServerView,
    title: &str,
    ctx: &Ctx,
) {
    let dim = Style::default().fg(ctx.theme.dim);
    let mut lines: Vec<Line> = if title.contains("power") {
        vec![
            Line::from(vec![
                Span::styled("n/a", Style::default().fg(ctx.theme.warn)),
                Span::styled(
                    ": the server does not expose its power over HTTP (/metrics has none)",
                    dim,
                ),
            ]),
            Line::styled(format!("server {}", server.url), dim),
        ]
    } else {
        // What matters most first: a short pane cuts the rest.
        let all = server.lines();
        let order = [
            "KV cache",
            "requests",
            "generation",
            "prompt",
            "TTFT",
            "ITL",
            "note",
            "models",
        ];
        let mut picked: Vec<Line> = all
            .first()
            .map(|l| Line::raw(l.clone()))
            .into_iter()
            .collect();
        for key in order {
            picked.extend(
                all.iter()
                    .skip(1)
                    .filter(|l| l.trim_start().starts_with(key))
                    .map(|l| Line::raw(l.trim_start().to_string())),
            );
        }
        picked
    };
    lines.truncate(area.height.saturating_sub(2) as usize);
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(block(title, ctx)),
        area,
    );
}

pub fn render_power(f: &mut Frame, area: Rect, st: &State, ctx: &Ctx) {
    if let Some(server) = remote_shown(st) {
        return render_remote(f, area, server, " server power ", ctx);
    }
    let t = ctx.theme;
    let b = block(" power ", ctx);
    let inner = b.inner(area);
    f.render_widget(b, area);
    let mut lines = Vec::new();
    match &st.power {
        Power::Unavailable(reason) => {
            lines.push(Line::from(vec![
                Span::styled(
                    "n/a",
                    Style::default().fg(t.warn).add_modifier(Modifier::BOLD),
                ),
                Span::styled(format!(": {reason}"), Style::default().fg(t.dim)),
            ]));
        }
        Power::Watts { watts, source } => {
            lines.push(Line::from(vec![
                Span::styled(
                    format!("{watts:.1} W"),
                    Style::default().fg(t.good).add_modifier(Modifier::BOLD),
                ),
                Span::styled(format!(" {source}"), Style::default().fg(t.dim)),
            ]));
            let per_token = st.last.as_ref().and_then(|l| {
                let j = l.joules?;
                let n = st
                    .chat
                    .last()
                    .and_then(|e| e.footer.as_ref())
                    .map_or(0, |f| f.tokens);
                (n > 0 && j > 0.0).then(|| (j / n as f64, n as f64 / j))
            });
            lines.push(Line::raw(
                per_token.map_or("J/token —".to_string(), |(jpt, tpj)| {
                    format!("{jpt:.2} J/tok · {tpj:.1} tok/J")
                }),
            ));
        }
    }
    lines.push(gpu_line(st, ctx));
    lines.extend(battery_lines(st, ctx));
    let text = Paragraph::new(lines).wrap(Wrap { trim: true });
    let n = text.line_count(inner.width) as u16;
    let [text_area, spark] =
        Layout::vertical([Constraint::Length(n), Constraint::Min(0)]).areas(inner);
    f.render_widget(text, text_area);
    if st.power.watts().is_some() {
        let data: Vec<u64> = st.watts_history.iter().map(|w| (w * 10.0) as u64).collect();
        f.render_widget(
            Sparkline::default()
                .data(&data)
                .style(Style::default().fg(t.warn)),
            spark,
        );
    }
}

/// Share of the weights read per token: the catalog's active/total for a known MoE, else
/// experts used / experts as an estimate, else all of them.
pub fn active_fraction(st: &State) -> f64 {
    let Some(m) = &st.model else { return 1.0 };
    if let Some(item) = st
        .switcher
        .iter()
        .find(|i| i.path.as_deref() == Some(m.path.as_path()))
    {
        if item.params_b > 0.0 {
            return item.active_params_b / item.params_b;
        }
    }
    if m.n_expert > 0 {
        m.n_expert_used as f64 / m.n_expert as f64
    } else {
        1.0
    }
}

pub fn render_roofline(f: &mut Frame, area: Rect, st: &State, ctx: &Ctx) {
    let t = ctx.theme;
    let b = block(" roofline (decode ceiling) ", ctx);
    let inner = b.inner(area);
    f.render_widget(b, area);
    let Some(m) = &st.model else { return };
    let bytes = roofline::bytes_per_token(m.weight_bytes, active_fraction(st));
    let measured = st.last.as_ref().map(|l| l.decode_rate);
    let mut lines = vec![Line::styled(
        format!("{:.0} MB read per token", bytes / 1e6),
        Style::default().fg(t.dim),
    )];
    let detected = st
        .details
        .machine
        .as_deref()
        .and_then(|name| roofline::detect(ctx.profiles, name));
    // The detected machine first, then a probed "this machine", then the rest.
    let mut order: Vec<usize> = (0..ctx.profiles.len()).collect();
    order.sort_by_key(|&i| (Some(i) != detected, ctx.profiles[i].name != "this machine"));
    for i in order {
        let p = &ctx.profiles[i];
        let ceiling = roofline::ceiling(p.bandwidth_gbs, bytes);
        let mine = Some(i) == detected || p.name == "this machine";
        // The measured rate's share of the ceiling where it is this machine, else its power.
        let last = match (mine, measured, p.power_w) {
            (true, Some(r), _) => format!("{:>5.0}%", 100.0 * r / ceiling.max(1e-9)),
            (_, _, Some(w)) => format!("{w:>5.0}W"),
            _ => String::new(),
        };
        let mut spans = vec![Span::raw(format!("{:<12}{:>6.0} tok/s", p.name, ceiling))];
        if mine {
            spans[0].style = Style::default().add_modifier(Modifier::BOLD);
            spans.push(Span::styled(last, Style::default().fg(t.good)));
        } else {
            spans.push(Span::styled(last, Style::default().fg(t.dim)));
        }
        lines.push(Line::from(spans));
    }
    if detected.is_none() && !ctx.profiles.iter().any(|p| p.name == "this machine") {
        lines.push(Line::styled(
            "tokentop probe measures this machine",
            Style::default().fg(t.dim),
        ));
    }
    f.render_widget(Paragraph::new(lines), inner);
}

fn popup(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

pub const HELP: &[(&str, &str)] = &[
    ("Enter", "send the prompt"),
    ("Alt-Enter / Shift-Enter", "new line in the prompt"),
    ("Up / Down", "prompt history"),
    ("Esc / Ctrl-C", "stop the answer"),
    ("Ctrl-C twice", "quit"),
    ("Ctrl-O / F2", "switch model (the conversation stays)"),
    ("Ctrl-B / F3", "A/B: the last prompt on another model"),
    ("F4", "reopen a saved session"),
    ("Ctrl-N", "new conversation"),
    ("Ctrl-D", "context full: drop the oldest turns from it"),
    ("Ctrl-E", "export the conversation to Markdown"),
    ("Ctrl-T", "show or collapse thinking blocks"),
    ("Ctrl-Y", "copy the last answer (OSC 52)"),
    ("PgUp / PgDn / wheel", "scroll"),
    ("? / F1", "this help"),
];

pub const METRICS: &[(&str, &str)] = &[
    ("TTFT", "request to first sampled token, measured by the engine (prefill included)"),
    ("prefill", "prompt tokens evaluated per second (tokens reused from the cache excluded)"),
    ("decode", "tokens per second after the first token, which belongs to TTFT"),
    ("answer", "thinking models: request to the first token after the <think> block"),
    ("context", "tokens in the conversation / context allocated"),
    ("memory", "the pool (system RAM, cgroup limit or unified memory): model weights, KV cache, other use, free; the GPU's memory, share or wired limit (Mac: sysctl iogpu.wired_limit_mb)"),
    ("power", "NVML GPU energy, macmon (Mac), RAPL, hwmon or battery watts; else n/a and why"),
    ("battery", "on battery: watts, share spent generating, tokens per 1%, hours left"),
    ("J/tok", "energy over the answer divided by its tokens"),
    ("roofline", "memory bandwidth / bytes read per token: the fastest decode can be"),
];

fn render_help(f: &mut Frame, area: Rect, ctx: &Ctx) {
    let r = popup(area, 90, (HELP.len() + METRICS.len() + 5) as u16);
    f.render_widget(Clear, r);
    let t = ctx.theme;
    let mut lines = Vec::new();
    for (k, v) in HELP {
        lines.push(Line::from(vec![
            Span::styled(format!("{k:<24}"), Style::default().fg(t.accent)),
            Span::raw(*v),
        ]));
    }
    lines.push(Line::default());
    for (k, v) in METRICS {
        lines.push(Line::from(vec![
            Span::styled(format!("{k:<10}"), Style::default().fg(t.good)),
            Span::raw(*v),
        ]));
    }
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(block(" help · Esc closes ", ctx)),
        r,
    );
}

/// Whether a model fits: its size plus a little KV cache against free memory, counting the
/// current model's weights as free since switching releases them.
pub fn fits(item: &SwitchItem, st: &State) -> Option<bool> {
    let m = st.memory?;
    let current = st.model.as_ref().map_or(0, |x| x.weight_bytes);
    let available = m.free() + current.min(m.process_rss);
    Some(item.size + item.size / 20 <= available)
}

/// Whether the model being loaded is still being downloaded (the loading label says so).
pub fn is_downloading(st: &State) -> bool {
    st.loading
        .as_ref()
        .is_some_and(|(label, _)| label.starts_with("downloading"))
}

/// A download's progress in one line: "pip: x · 120.5 / 253.1 MB · 48% · 5.2 MB/s · ETA 25s".
pub fn download_text(p: &crate::catalog::fetch::DownloadProgress) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let pct = if p.total > 0 {
        format!(" · {:.0}%", 100.0 * p.done as f64 / p.total as f64)
    } else {
        String::new()
    };
    let eta = p.eta.map_or(String::new(), |d| {
        let s = d.as_secs();
        if s >= 3600 {
            format!(" · ETA {}h{:02}m", s / 3600, s / 60 % 60)
        } else if s >= 60 {
            format!(" · ETA {}m{:02}s", s / 60, s % 60)
        } else {
            format!(" · ETA {s}s")
        }
    });
    let what = if p.what.is_empty() {
        String::new()
    } else {
        format!("{} · ", p.what)
    };
    format!(
        "{what}{:.1} / {:.1} MB{pct} · {:.1} MB/s{eta}",
        mb(p.done),
        mb(p.total),
        p.rate / 1e6
    )
}

fn render_switcher(
    f: &mut Frame,
    area: Rect,
    st: &State,
    selected: usize,
    for_ab: bool,
    ctx: &Ctx,
) {
    let t = ctx.theme;
    let r = popup(area, 100, st.switcher.len() as u16 + 4);
    f.render_widget(Clear, r);
    let rows = st.switcher.iter().enumerate().map(|(i, item)| {
        let fit = match fits(item, st) {
            Some(true) => Span::styled("fits", Style::default().fg(t.good)),
            Some(false) => Span::styled("too big", Style::default().fg(t.bad)),
            None => Span::raw("?"),
        };
        let style = if i == selected {
            Style::default().fg(t.bg).bg(t.accent)
        } else {
            Style::default()
        };
        let params = if item.moe {
            format!("{}B ({}B active)", item.params_b, item.active_params_b)
        } else if item.params_b > 0.0 {
            format!("{}B", item.params_b)
        } else {
            String::new()
        };
        Row::new(vec![
            Line::raw(item.label.clone()),
            Line::raw(gb(item.size)),
            Line::raw(params),
            Line::raw(item.tags.join(",")),
            Line::raw(match (item.is_local(), st.offline) {
                (true, _) => "local",
                (false, false) => "download",
                (false, true) => "needs download",
            }),
            Line::from(fit),
        ])
        .style(style)
    });
    let title = if for_ab {
        " A/B: answer the last prompt with… (Enter picks, Esc closes) "
    } else {
        " switch model (Enter loads, Esc closes) "
    };
    let table = Table::new(
        rows,
        [
            Constraint::Min(24),
            Constraint::Length(9),
            Constraint::Length(20),
            Constraint::Length(16),
            Constraint::Length(if st.offline { 15 } else { 9 }),
            Constraint::Length(8),
        ],
    )
    .header(
        Row::new(["model", "size", "params", "tags", "", "memory"])
            .style(Style::default().fg(t.dim)),
    );
    let mut b = block(title, ctx);
    if is_downloading(st) && !st.status.is_empty() {
        b = b.title_bottom(Span::styled(
            format!(" {} ", st.status),
            Style::default().fg(t.good),
        ));
    }
    let table = table.block(b);
    f.render_widget(table, r);
}

fn render_sessions(f: &mut Frame, area: Rect, st: &State, selected: usize, ctx: &Ctx) {
    let r = popup(area, 110, st.sessions.len().max(1) as u16 + 2);
    f.render_widget(Clear, r);
    let lines: Vec<Line> = if st.sessions.is_empty() {
        vec![Line::raw("no saved sessions yet")]
    } else {
        st.sessions
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let turns = if s.turns == 1 { "turn " } else { "turns" };
                let name = format!(
                    "{}  {:<40}  {:>3} {turns}  {}",
                    s.date,
                    s.title,
                    s.turns,
                    s.models.join(", ")
                );
                if i == selected {
                    Line::styled(name, Style::default().fg(ctx.theme.bg).bg(ctx.theme.accent))
                } else {
                    Line::raw(name)
                }
            })
            .collect()
    };
    f.render_widget(
        Paragraph::new(lines).block(block(" sessions (Enter reopens, Esc closes) ", ctx)),
        r,
    );
}

fn render_ab(f: &mut Frame, area: Rect, ab: &AbRun, ctx: &Ctx) {
    let t = ctx.theme;
    let r = popup(
        area,
        area.width.saturating_sub(4),
        area.height.saturating_sub(2),
    );
    f.render_widget(Clear, r);
    // How the two models were held (both resident, or swapped), once the engine said.
    let title = match &ab.residency {
        Some(r) => format!(" A/B · {r} · Esc closes "),
        None => " A/B · Esc closes ".into(),
    };
    let b = block(&title, ctx);
    let inner = b.inner(r);
    f.render_widget(b, r);
    let [answers, card] =
        Layout::vertical([Constraint::Min(0), Constraint::Length(8)]).areas(inner);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(answers);
    for (side, rect) in [(&ab.a, left), (&ab.b, right)] {
        let mut lines = vec![Line::styled(
            side.model.clone(),
            Style::default().fg(t.accent).add_modifier(Modifier::BOLD),
        )];
        lines.extend(markdown::lines(&side.answer, t));
        f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), rect);
    }
    let cell = |side: &crate::state::AbSide, pick: &dyn Fn(&Footer) -> String| {
        side.footer.as_ref().map_or("—".into(), pick)
    };
    type Metric<'m> = (&'m str, &'m dyn Fn(&Footer) -> String);
    let metric_rows: [Metric; 5] = [
        ("TTFT", &|f| format!("{:.2} s", f.ttft.as_secs_f64())),
        ("prefill", &|f| format!("{:.0} tok/s", f.prefill_rate)),
        ("decode", &|f| format!("{:.1} tok/s", f.decode_rate)),
        ("J/token", &|f| {
            f.joules
                .filter(|_| f.tokens > 0)
                .map_or("n/a".into(), |j| format!("{:.2}", j / f.tokens as f64))
        }),
        ("peak memory", &|f| gb(f.peak_rss)),
    ];
    let rows = metric_rows
        .iter()
        .map(|(name, pick)| Row::new(vec![name.to_string(), cell(&ab.a, pick), cell(&ab.b, pick)]));
    let table = Table::new(
        rows,
        [
            Constraint::Length(12),
            Constraint::Percentage(45),
            Constraint::Percentage(45),
        ],
    )
    .header(
        Row::new(vec!["".to_string(), ab.a.model.clone(), ab.b.model.clone()])
            .style(Style::default().fg(t.dim)),
    );
    f.render_widget(table, card);
}
