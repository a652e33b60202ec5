//! An A/B run as it happens: both answers side by side in the chat's place, each with its
//! model, where it stands (waiting, loading, prefilling, the live decode rate, or its footer
//! once done) and its text, following the end of the text as it streams.

use super::{answer_lines, block, footer_text, Ctx};
use crate::state::{AbPhase, AbRun, AbSide, State};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};
use ratatui::Frame;

/// Draws the A/B run in progress (`st.ab`) in `area`.
pub fn render_live(f: &mut Frame, area: Rect, st: &State, ctx: &Ctx) {
    let Some(ab) = &st.ab else {
        return;
    };
    let title = format!(" A/B · {} ", one_line(&ab.prompt, 60));
    let b = block(&title, ctx);
    let inner = b.inner(area);
    f.render_widget(b, area);
    let [answers, note] =
        Layout::vertical([Constraint::Min(0), Constraint::Length(1)]).areas(inner);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(answers);
    for (i, (side, rect)) in [(&ab.a, left), (&ab.b, right)].into_iter().enumerate() {
        let column = rect.inner(ratatui::layout::Margin::new(1, 0));
        let head = Paragraph::new(header(st, ab, side, i == 0, ctx)).wrap(Wrap { trim: true });
        let head_h = (head.line_count(column.width) as u16).min(column.height / 2);
        let [head_area, body] =
            Layout::vertical([Constraint::Length(head_h), Constraint::Min(0)]).areas(column);
        f.render_widget(head, head_area);
        let writing = match ab.phase {
            AbPhase::AnswerA => i == 0,
            AbPhase::AnswerB => i == 1,
            _ => false,
        };
        let live = st.stream.as_ref().filter(|_| writing);
        let lines = answer_lines(&side.answer, side.footer.as_ref(), live, false, ctx);
        let text = Paragraph::new(lines).wrap(Wrap { trim: false });
        // Follow the end of the answer.
        let total = text.line_count(body.width) as u16;
        let y = total.saturating_sub(body.height);
        f.render_widget(text.scroll((y, 0)), body);
    }
    let how = ab
        .residency
        .clone()
        .unwrap_or_else(|| "Esc stops the answer being written".into());
    f.render_widget(
        Paragraph::new(Line::styled(how, Style::default().fg(ctx.theme.dim))),
        note,
    );
}

/// The side's model and where it stands.
fn header(st: &State, ab: &AbRun, side: &AbSide, is_a: bool, ctx: &Ctx) -> Vec<Line<'static>> {
    let t = ctx.theme;
    let name = Span::styled(
        format!("{} {}", if is_a { "A" } else { "B" }, side.model),
        Style::default().fg(t.accent).add_modifier(Modifier::BOLD),
    );
    let writing = matches!(
        (&ab.phase, is_a),
        (AbPhase::AnswerA, true) | (AbPhase::AnswerB, false)
    );
    let state = if let Some(foot) = &side.footer {
        footer_text(foot)
    } else if writing {
        match &st.stream {
            Some(s) if s.prefilled_at.is_none() => "prefilling…".into(),
            Some(s) => match s.live_rate(ctx.now) {
                Some(r) => format!("answering… {r:.1} tok/s · {} tokens", s.pieces),
                None => "answering…".into(),
            },
            None => String::new(),
        }
    } else if ab.phase == AbPhase::LoadB && !is_a {
        "loading…".into()
    } else {
        "waiting for A".into()
    };
    vec![
        Line::from(name),
        Line::styled(state, Style::default().fg(t.dim)),
    ]
}

/// The first line of `s`, cut to `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let first = s
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if first.chars().count() > max {
        format!("{}…", first.chars().take(max - 1).collect::<String>())
    } else {
        first.to_string()
    }
}
