//! Markdown answers to styled lines: headings, lists, bold/italic, inline code, and fenced
//! code blocks coloured by syntect.

use crate::theme::Theme;
use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use std::sync::OnceLock;
use syntect::easy::HighlightLines;
use syntect::highlighting::ThemeSet;
use syntect::parsing::SyntaxSet;

fn syntaxes() -> &'static (SyntaxSet, ThemeSet) {
    static SETS: OnceLock<(SyntaxSet, ThemeSet)> = OnceLock::new();
    SETS.get_or_init(|| {
        (
            SyntaxSet::load_defaults_newlines(),
            ThemeSet::load_defaults(),
        )
    })
}

struct Builder {
    lines: Vec<Line<'static>>,
    current: Vec<Span<'static>>,
    styles: Vec<Style>,
    lists: Vec<Option<u64>>,
}

impl Builder {
    fn style(&self) -> Style {
        self.styles.last().copied().unwrap_or_default()
    }

    fn push_text(&mut self, text: &str, style: Style) {
        let mut parts = text.split('\n');
        if let Some(first) = parts.next() {
            if !first.is_empty() {
                self.current.push(Span::styled(first.to_string(), style));
            }
        }
        for part in parts {
            self.newline();
            if !part.is_empty() {
                self.current.push(Span::styled(part.to_string(), style));
            }
        }
    }

    fn newline(&mut self) {
        self.lines
            .push(Line::from(std::mem::take(&mut self.current)));
    }

    fn blank(&mut self) {
        if !self.current.is_empty() {
            self.newline();
        }
        if self.lines.last().is_some_and(|l| !l.spans.is_empty()) {
            self.lines.push(Line::default());
        }
    }
}

/// Renders `text` as markdown lines (unwrapped; the paragraph wraps them).
pub fn lines(text: &str, theme: &Theme) -> Vec<Line<'static>> {
    let base = Style::default().fg(theme.assistant);
    let mut b = Builder {
        lines: Vec::new(),
        current: Vec::new(),
        styles: vec![base],
        lists: Vec::new(),
    };
    let mut code: Option<(String, String)> = None;
    for ev in Parser::new_ext(text, Options::ENABLE_STRIKETHROUGH) {
        if let Some((lang, buf)) = code.as_mut() {
            match ev {
                Event::Text(t) => buf.push_str(&t),
                Event::End(TagEnd::CodeBlock) => {
                    let (lang, buf) = (lang.clone(), std::mem::take(buf));
                    code = None;
                    b.blank();
                    b.lines.extend(highlight(&buf, &lang, theme));
                    b.lines.push(Line::default());
                }
                _ => {}
            }
            continue;
        }
        match ev {
            Event::Start(Tag::Heading { level, .. }) => {
                b.blank();
                let marks = match level {
                    HeadingLevel::H1 => "# ",
                    HeadingLevel::H2 => "## ",
                    _ => "### ",
                };
                let s = Style::default()
                    .fg(theme.accent)
                    .add_modifier(Modifier::BOLD);
                b.current.push(Span::styled(marks, s));
                b.styles.push(s);
            }
            Event::End(TagEnd::Heading(_)) => {
                b.styles.pop();
                b.blank();
            }
            Event::Start(Tag::Paragraph) => {}
            Event::End(TagEnd::Paragraph) => b.blank(),
            Event::Start(Tag::List(start)) => {
                if !b.current.is_empty() {
                    b.newline();
                }
                b.lists.push(start);
            }
            Event::End(TagEnd::List(_)) => {
                b.lists.pop();
                if b.lists.is_empty() {
                    b.blank();
                }
            }
            Event::Start(Tag::Item) => {
                if !b.current.is_empty() {
                    b.newline();
                }
                let depth = b.lists.len().saturating_sub(1);
                let bullet = match b.lists.last_mut() {
                    Some(Some(n)) => {
                        *n += 1;
                        format!("{}. ", *n - 1)
                    }
                    _ => "• ".to_string(),
                };
                b.current.push(Span::styled(
                    format!("{}{bullet}", "  ".repeat(depth)),
                    Style::default().fg(theme.accent),
                ));
            }
            Event::End(TagEnd::Item) if !b.current.is_empty() => {
                b.newline();
            }
            Event::Start(Tag::Strong) => {
                let s = b.style().add_modifier(Modifier::BOLD);
                b.styles.push(s);
            }
            Event::Start(Tag::Emphasis) => {
                let s = b.style().add_modifier(Modifier::ITALIC);
                b.styles.push(s);
            }
            Event::Start(Tag::Strikethrough) => {
                let s = b.style().add_modifier(Modifier::CROSSED_OUT);
                b.styles.push(s);
            }
            Event::End(TagEnd::Strong | TagEnd::Emphasis | TagEnd::Strikethrough) => {
                b.styles.pop();
            }
            Event::Start(Tag::CodeBlock(kind)) => {
                let lang = match kind {
                    CodeBlockKind::Fenced(l) => {
                        l.split_whitespace().next().unwrap_or("").to_string()
                    }
                    CodeBlockKind::Indented => String::new(),
                };
                code = Some((lang, String::new()));
            }
            Event::Code(t) => {
                let s = Style::default().fg(theme.code);
                b.current.push(Span::styled(t.to_string(), s));
            }
            Event::Text(t) => {
                let s = b.style();
                b.push_text(&t, s);
            }
            Event::SoftBreak | Event::HardBreak => b.newline(),
            Event::Rule => {
                b.blank();
                b.lines
                    .push(Line::styled("────────", Style::default().fg(theme.dim)));
            }
            _ => {}
        }
    }
    // An unterminated fence while streaming: show what there is.
    if let Some((lang, buf)) = code {
        b.blank();
        b.lines.extend(highlight(&buf, &lang, theme));
    }
    if !b.current.is_empty() {
        b.newline();
    }
    while b.lines.last().is_some_and(|l| l.spans.is_empty()) {
        b.lines.pop();
    }
    b.lines
}

fn highlight(code: &str, lang: &str, theme: &Theme) -> Vec<Line<'static>> {
    let (ss, ts) = syntaxes();
    let syntax = ss
        .find_syntax_by_token(lang)
        .unwrap_or_else(|| ss.find_syntax_plain_text());
    let Some(t) = ts.themes.get("base16-ocean.dark") else {
        return code
            .lines()
            .map(|l| Line::styled(l.to_string(), Style::default().fg(theme.code)))
            .collect();
    };
    let mut h = HighlightLines::new(syntax, t);
    code.split_inclusive('\n')
        .map(|line| {
            let spans = h
                .highlight_line(line, ss)
                .map(|ranges| {
                    ranges
                        .into_iter()
                        .map(|(s, text)| {
                            let c = s.foreground;
                            Span::styled(
                                text.trim_end_matches('\n').to_string(),
                                Style::default().fg(Color::Rgb(c.r, c.g, c.b)),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_else(|_| vec![Span::raw(line.trim_end_matches('\n').to_string())]);
            Line::from(spans)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(lines: &[Line]) -> Vec<String> {
        lines
            .iter()
            .map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect())
            .collect()
    }

    #[test]
    fn headings_lists_and_code() {
        let t = Theme::default();
        let md = "# Title\n\nSome **bold** and `code`.\n\n- one\n- two\n\n1. first\n2. second\n\n```rust\nfn main() {}\n```\n";
        let ls = lines(md, &t);
        assert_eq!(
            plain(&ls),
            [
                "# Title",
                "",
                "Some bold and code.",
                "",
                "• one",
                "• two",
                "",
                "1. first",
                "2. second",
                "",
                "fn main() {}"
            ]
        );
        let bold = ls[2].spans.iter().find(|s| s.content == "bold").unwrap();
        assert!(bold.style.add_modifier.contains(Modifier::BOLD));
        let code = ls[2].spans.iter().find(|s| s.content == "code").unwrap();
        assert_eq!(code.style.fg, Some(t.code));
        // Syntax colours: the keyword is not the same colour as the name.
        let fn_line = &ls[10];
        assert!(fn_line.spans.len() > 2, "{fn_line:?}");
        assert_ne!(
            fn_line.spans[0].style.fg,
            fn_line.spans.last().unwrap().style.fg
        );
    }

    #[test]
    fn unterminated_fence_while_streaming() {
        let ls = lines("Here:\n```python\nprint(1)\n", &Theme::default());
        assert_eq!(plain(&ls), ["Here:", "", "print(1)"]);
    }
}
