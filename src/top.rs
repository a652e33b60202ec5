//! `tokentop top [URL…]`: top for inference servers, drawn from what `remote::watch` polls.

use crate::remote::watch::{fmt_rate, start_pollers, url_of, ServerView, TopState};
use crate::remote::{self, Kind};
use anyhow::Result;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Sparkline};
use std::collections::VecDeque;
use std::io::Write;
use std::time::Duration;

/// Draws the whole screen.
pub fn render(st: &TopState, frame: &mut ratatui::Frame) {
    let area = frame.area();
    let n = st.servers.len().max(1) as u32;
    let rows = Layout::vertical(vec![Constraint::Ratio(1, n); n as usize]).split(area);
    for (s, rect) in st.servers.iter().zip(rows.iter()) {
        render_server(s, frame, *rect);
    }
}

fn render_server(s: &ServerView, frame: &mut ratatui::Frame, area: Rect) {
    let kind = s
        .reading
        .as_ref()
        .and_then(|r| r.kind)
        .map_or("?", Kind::as_str);
    let title = if s.down.is_some() {
        format!(" {} — down ", s.url)
    } else {
        format!(" {} — {kind} ", s.url)
    };
    let block = Block::bordered()
        .title(title)
        .border_style(if s.down.is_some() {
            Style::default().fg(Color::Red)
        } else {
            Style::default()
        });
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [text, sparks] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(inner);
    let lines: Vec<Line> = s.lines().into_iter().skip(1).map(Line::from).collect();
    let lines = if s.down.is_some() || s.reading.is_none() {
        s.lines().into_iter().map(Line::from).collect()
    } else {
        lines
    };
    frame.render_widget(
        Paragraph::new(lines).wrap(ratatui::widgets::Wrap { trim: false }),
        text,
    );
    let [p, g] =
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(sparks);
    let spark = |title: String, data: &VecDeque<u64>, color: Color| {
        let data: Vec<u64> = data.iter().copied().collect();
        let max = data.iter().copied().max().unwrap_or(0).max(1);
        Sparkline::default()
            .block(Block::bordered().title(title))
            .max(max)
            .data(data)
            .style(Style::default().fg(color))
    };
    frame.render_widget(
        spark(
            format!("prompt {}", fmt_rate(s.prompt_rate)),
            &s.prompt_hist,
            Color::Cyan,
        ),
        p,
    );
    frame.render_widget(
        spark(
            format!("generation {}", fmt_rate(s.gen_rate)),
            &s.gen_hist,
            Color::Green,
        ),
        g,
    );
}

/// `tokentop top`: the full screen, or with `batch` plain text every second (like
/// `top -b`), `iterations` times (0: until interrupted).
pub fn run(urls: &[String], batch: bool, iterations: u64) -> Result<()> {
    let urls: Vec<String> = urls
        .iter()
        .map(|u| remote::normalize_url(u))
        .collect::<Result<_>>()?;
    let mut st = TopState::new(&urls);
    let rx = start_pollers(urls.iter().map(|u| url_of(u)).collect());
    if batch {
        let mut done = 0;
        loop {
            // One round: a reading of every server.
            let mut got = vec![false; urls.len()];
            while got.iter().any(|g| !g) {
                let (i, at, r) = rx.recv()?;
                st.update(i, at, r);
                got[i] = true;
            }
            done += 1;
            let mut text = format!(
                "tokentop top — {}\n",
                jiff::Timestamp::now()
                    .round(jiff::Unit::Second)
                    .unwrap_or(jiff::Timestamp::now())
            );
            for s in &st.servers {
                for l in s.lines() {
                    text.push_str(&l);
                    text.push('\n');
                }
            }
            text.push('\n');
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .map_err(crate::cli::stdout_error)?;
            if iterations > 0 && done >= iterations {
                return Ok(());
            }
        }
    }
    use std::io::IsTerminal;
    if !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()) {
        anyhow::bail!("`top` needs a terminal; use `tokentop top --batch` for scripts");
    }
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        let mut rounds = 0u64;
        loop {
            let mut changed = false;
            while let Ok((i, at, r)) = rx.try_recv() {
                st.update(i, at, r);
                changed = true;
                if i == 0 {
                    rounds += 1;
                }
            }
            if changed {
                terminal.draw(|f| render(&st, f))?;
            }
            if iterations > 0 && rounds >= iterations {
                return Ok(());
            }
            if crossterm::event::poll(Duration::from_millis(100))? {
                use crossterm::event::{Event, KeyCode, KeyModifiers};
                match crossterm::event::read()? {
                    Event::Key(k)
                        if k.code == KeyCode::Char('q')
                            || k.code == KeyCode::Esc
                            || (k.code == KeyCode::Char('c')
                                && k.modifiers.contains(KeyModifiers::CONTROL)) =>
                    {
                        return Ok(())
                    }
                    Event::Resize(..) => {
                        terminal.draw(|f| render(&st, f))?;
                    }
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}
