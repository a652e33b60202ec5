//! Markdown answers to styled lines: headings, lists, bold/italic, inline code, links with
//! their URL, block quotes, tables drawn with aligned columns and borders, and fenced code
//! blocks coloured by the theme's syntect theme, kept readable on the theme's background.

use crate::theme::Theme;
use pulldown_cmark::{Alignment, CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};
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
    /// Block quotes open around the text; each line in one starts with a bar per level.
    quotes: usize,
    quote_style: Style,
    /// Destinations of the links open around the text.
    links: Vec<String>,
    /// The table being read: alignments, rows of cells of spans.
    table: Option<Table>,
}

struct Table {
    align: Vec<Alignment>,
    rows: Vec<Vec<Vec<Span<'static>>>>,
    /// How many rows are the head.
    head: usize,
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
        let mut spans = std::mem::take(&mut self.current);
        if self.quotes > 0 {
            spans.insert(0, Span::styled("▎ ".repeat(self.quotes), self.quote_style));
        }
        self.lines.push(Line::from(spans));
    }

    fn blank(&mut self) {
        if !self.current.is_empty() {
            self.newline();
        }
        if self.lines.last().is_some_and(|l| !l.spans.is_empty()) {
            self.lines.push(Line::default());
        }
    }

    /// Draws the finished table: columns as wide as their widest cell, aligned as the
    /// table says, with box-drawing borders and a rule under the head.
    fn table(&mut self, t: Table, border: Style) {
        let cols = t.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width = |cell: &[Span]| cell.iter().map(Span::width).sum::<usize>();
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                t.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| width(cell))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let rule = |l: &str, m: &str, r: &str| {
            let inner: Vec<String> = widths.iter().map(|w| "─".repeat(w + 2)).collect();
            Line::styled(format!("{l}{}{r}", inner.join(m)), border)
        };
        self.lines.push(rule("┌", "┬", "┐"));
        for (i, row) in t.rows.iter().enumerate() {
            if i == t.head && i > 0 {
                self.lines.push(rule("├", "┼", "┤"));
            }
            let mut spans = vec![Span::styled("│", border)];
            for (c, w) in widths.iter().enumerate() {
                let cell = row.get(c).map_or(&[][..], Vec::as_slice);
                let pad = w - width(cell);
                let (left, right) = match t.align.get(c) {
                    Some(Alignment::Right) => (pad, 0),
                    Some(Alignment::Center) => (pad / 2, pad - pad / 2),
                    _ => (0, pad),
                };
                spans.push(Span::raw(" ".repeat(left + 1)));
                spans.extend(cell.iter().cloned());
                spans.push(Span::raw(" ".repeat(right + 1)));
                spans.push(Span::styled("│", border));
            }
            self.lines.push(Line::from(spans));
        }
        self.lines.push(rule("└", "┴", "┘"));
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
        quotes: 0,
        quote_style: Style::default().fg(theme.dim),
        links: Vec::new(),
        table: None,
    };
    let mut code: Option<(String, String)> = None;
    let opts = Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES;
    for ev in Parser::new_ext(text, opts) {
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
            Event::Start(Tag::Table(align)) => {
                b.blank();
                b.table = Some(Table {
                    align,
                    rows: Vec::new(),
                    head: 0,
                });
            }
            Event::Start(Tag::TableHead) => {
                if let Some(t) = b.table.as_mut() {
                    t.rows.push(Vec::new());
                }
                let s = b.style().add_modifier(Modifier::BOLD);
                b.styles.push(s);
            }
            Event::End(TagEnd::TableHead) => {
                if let Some(t) = b.table.as_mut() {
                    t.head = t.rows.len();
                }
                b.styles.pop();
            }
            Event::Start(Tag::TableRow) => {
                if let Some(t) = b.table.as_mut() {
                    t.rows.push(Vec::new());
                }
            }
            Event::Start(Tag::TableCell) => b.current.clear(),
            Event::End(TagEnd::TableCell) => {
                let cell = std::mem::take(&mut b.current);
                if let Some(row) = b.table.as_mut().and_then(|t| t.rows.last_mut()) {
                    row.push(cell);
                }
            }
            Event::End(TagEnd::Table) => {
                if let Some(t) = b.table.take() {
                    b.table(t, Style::default().fg(theme.dim));
                }
                b.blank();
            }
            Event::Start(Tag::BlockQuote(_)) => {
                b.blank();
                b.quotes += 1;
                let s = b.style().fg(theme.dim).add_modifier(Modifier::ITALIC);
                b.styles.push(s);
            }
            Event::End(TagEnd::BlockQuote(_)) => {
                if !b.current.is_empty() {
                    b.newline();
                }
                // A quote's last paragraph leaves a blank line inside the quote: drop it.
                while b.lines.last().is_some_and(|l| l.spans.is_empty()) {
                    b.lines.pop();
                }
                b.quotes = b.quotes.saturating_sub(1);
                b.styles.pop();
                b.blank();
            }
            Event::Start(Tag::Link { dest_url, .. }) => {
                b.links.push(dest_url.to_string());
                let s = b
                    .style()
                    .fg(theme.accent)
                    .add_modifier(Modifier::UNDERLINED);
                b.styles.push(s);
            }
            Event::End(TagEnd::Link) => {
                b.styles.pop();
                if let Some(url) = b.links.pop() {
                    // The URL stays readable (and copyable) unless the text already is it.
                    let shown: String = b.current.iter().map(|s| s.content.as_ref()).collect();
                    let bare = url.strip_prefix("mailto:").unwrap_or(&url);
                    if !url.is_empty() && !shown.ends_with(bare) {
                        b.current.push(Span::styled(
                            format!(" <{url}>"),
                            Style::default().fg(theme.dim),
                        ));
                    }
                }
            }
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
            Event::SoftBreak | Event::HardBreak if b.table.is_some() => {
                b.current.push(Span::raw(" "));
            }
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
    let Some(t) = ts.themes.get(&theme.code_theme) else {
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
                                Style::default().fg(readable((c.r, c.g, c.b), theme)),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_else(|_| vec![Span::raw(line.trim_end_matches('\n').to_string())]);
            Line::from(spans)
        })
        .collect()
}

/// A code colour moved towards the theme's text colour until it has the theme's least
/// contrast against the background, so no token is invisible (a pale comment on white).
pub fn readable(c: (u8, u8, u8), theme: &Theme) -> Color {
    let bg = theme.background;
    let target =
        crate::theme::rgb(theme.fg).unwrap_or(if bg.0 as u32 + bg.1 as u32 + bg.2 as u32 > 382 {
            (0, 0, 0)
        } else {
            (255, 255, 255)
        });
    let mix = |a: u8, b: u8, t: f64| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    let (r, g, b) = (0..=10)
        .map(|step| {
            let t = step as f64 / 10.0;
            (
                mix(c.0, target.0, t),
                mix(c.1, target.1, t),
                mix(c.2, target.2, t),
            )
        })
        .find(|&m| crate::theme::contrast(m, bg) >= theme.min_contrast)
        .unwrap_or(target);
    Color::Rgb(r, g, b)
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
    fn tables_links_and_quotes() {
        let t = Theme::default();
        let md = "| model | tok/s | note |\n|:--|--:|:-:|\n| SmolLM2 | 24.1 | **fast** |\n| Gemma 3 270M | 9.5 | base |\n\nSee [the docs](https://example.com/docs) or <https://example.com>.\n\n> Quoted *wisdom*\n> over two lines.\n\nAfter.";
        let ls = lines(md, &t);
        assert_eq!(
            plain(&ls),
            [
                "┌──────────────┬───────┬──────┐",
                "│ model        │ tok/s │ note │",
                "├──────────────┼───────┼──────┤",
                "│ SmolLM2      │  24.1 │ fast │",
                "│ Gemma 3 270M │   9.5 │ base │",
                "└──────────────┴───────┴──────┘",
                "",
                "See the docs <https://example.com/docs> or https://example.com.",
                "",
                "▎ Quoted wisdom",
                "▎ over two lines.",
                "",
                "After.",
            ]
        );
        // The head is bold, the link text underlined, the quote dim and italic.
        let head = ls[1].spans.iter().find(|s| s.content == "model").unwrap();
        assert!(head.style.add_modifier.contains(Modifier::BOLD));
        let link = ls[7]
            .spans
            .iter()
            .find(|s| s.content == "the docs")
            .unwrap();
        assert!(link.style.add_modifier.contains(Modifier::UNDERLINED));
        assert_eq!(link.style.fg, Some(t.accent));
        let quote = ls[9].spans.iter().find(|s| s.content == "Quoted ").unwrap();
        assert_eq!(quote.style.fg, Some(t.dim));
        assert!(quote.style.add_modifier.contains(Modifier::ITALIC));
    }

    /// Every token of code in several languages, in every built-in theme, contrasts with the
    /// theme's background at least as the theme asks (no invisible tokens on light).
    #[test]
    fn code_tokens_are_readable_in_every_theme() {
        let samples = [
            ("rust", "// a comment\nfn main() { let x: u32 = 0x1F; println!(\"{x} {}\", 'c'); }\n#[derive(Debug)]\nstruct S<'a> { s: &'a str }\n"),
            ("python", "# comment\n@decorator\ndef f(a=None, *args):\n    \"\"\"Doc.\"\"\"\n    return f'{a!r}' + r'\\d' if a else 3.5e-2\n"),
            ("js", "/* c */ const re = /ab+c/g; let s = `t ${x}`; class A extends B {}\n"),
            ("sh", "#!/bin/sh\nfor f in *.txt; do echo \"$f\" | grep -q x && exit 1; done\n"),
            ("json", "{\"a\": [1, true, null, \"s\"]}\n"),
            ("diff", "--- a\n+++ b\n@@ -1 +1 @@\n-old\n+new\n"),
            ("c", "#include <stdio.h>\nint main(void) { return 0; } // c\n"),
        ];
        for name in Theme::builtin_names() {
            let theme = Theme::load(name).unwrap();
            let mut tokens = 0;
            for (lang, code) in samples {
                for line in highlight(code, lang, &theme) {
                    for span in &line.spans {
                        if span.content.trim().is_empty() {
                            continue;
                        }
                        tokens += 1;
                        let fg = crate::theme::rgb(span.style.fg.expect("coloured")).unwrap();
                        let c = crate::theme::contrast(fg, theme.background);
                        assert!(
                            c >= theme.min_contrast,
                            "{name}: {lang} token {:?} has contrast {c:.2} < {}",
                            span.content,
                            theme.min_contrast
                        );
                    }
                }
            }
            assert!(tokens > 100, "{name}: {tokens}");
        }
        // The themes differ: light's code is not the dark syntect theme's colours.
        let [dark, light] =
            ["dark", "light"].map(|n| highlight("fn f() {}", "rust", &Theme::load(n).unwrap()));
        assert_ne!(dark[0].spans[0].style.fg, light[0].spans[0].style.fg);
        // A pale colour on white is darkened until readable; a readable one is kept.
        let light = Theme::load("light").unwrap();
        let pale = crate::theme::rgb(readable((0xdd, 0xdd, 0xdd), &light)).unwrap();
        assert!(crate::theme::contrast(pale, (255, 255, 255)) >= 3.0);
        assert_eq!(readable((0, 0, 0x80), &light), Color::Rgb(0, 0, 0x80));
    }

    #[test]
    fn unterminated_fence_while_streaming() {
        let ls = lines("Here:\n```python\nprint(1)\n", &Theme::default());
        assert_eq!(plain(&ls), ["Here:", "", "print(1)"]);
    }
}
