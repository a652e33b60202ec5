//! Colour themes from themes/*.toml (dark, light, high-contrast built in).

use anyhow::{anyhow, bail, Context, Result};
use ratatui::style::Color;
use serde::Deserialize;
use std::str::FromStr;

const BUILTIN: [(&str, &str); 3] = [
    ("dark", include_str!("../themes/dark.toml")),
    ("light", include_str!("../themes/light.toml")),
    (
        "high-contrast",
        include_str!("../themes/high-contrast.toml"),
    ),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTheme {
    name: String,
    fg: String,
    bg: String,
    dim: String,
    accent: String,
    user: String,
    assistant: String,
    code: String,
    weights: String,
    kv: String,
    other: String,
    free: String,
    good: String,
    warn: String,
    bad: String,
    border: String,
    /// syntect's theme for code blocks (one of its defaults).
    #[serde(default)]
    code_theme: Option<String>,
    /// The terminal background `bg = "reset"` stands for, to keep code readable on it.
    #[serde(default)]
    terminal_bg: Option<String>,
    /// Least contrast ratio (WCAG) a code token keeps against the background.
    #[serde(default)]
    min_contrast: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Theme {
    pub name: String,
    pub fg: Color,
    pub bg: Color,
    pub dim: Color,
    pub accent: Color,
    pub user: Color,
    pub assistant: Color,
    pub code: Color,
    pub weights: Color,
    pub kv: Color,
    pub other: Color,
    pub free: Color,
    pub good: Color,
    pub warn: Color,
    pub bad: Color,
    pub border: Color,
    pub code_theme: String,
    /// The background as RGB: `bg`, or `terminal_bg` when `bg` is the terminal's own.
    pub background: (u8, u8, u8),
    pub min_contrast: f64,
}

/// A colour as RGB: "#rrggbb", or a named or indexed terminal colour as xterm shows it;
/// None for `reset` (the terminal's own colour).
pub fn rgb(c: Color) -> Option<(u8, u8, u8)> {
    const ANSI: [(u8, u8, u8); 16] = [
        (0, 0, 0),
        (205, 0, 0),
        (0, 205, 0),
        (205, 205, 0),
        (0, 0, 238),
        (205, 0, 205),
        (0, 205, 205),
        (229, 229, 229),
        (127, 127, 127),
        (255, 0, 0),
        (0, 255, 0),
        (255, 255, 0),
        (92, 92, 255),
        (255, 0, 255),
        (0, 255, 255),
        (255, 255, 255),
    ];
    let indexed = |i: u8| -> (u8, u8, u8) {
        match i {
            0..=15 => ANSI[i as usize],
            16..=231 => {
                let level = |v: u8| if v == 0 { 0 } else { 55 + 40 * v };
                let i = i - 16;
                (level(i / 36), level(i / 6 % 6), level(i % 6))
            }
            _ => {
                let v = 8 + 10 * (i - 232);
                (v, v, v)
            }
        }
    };
    Some(match c {
        Color::Reset => return None,
        Color::Rgb(r, g, b) => (r, g, b),
        Color::Indexed(i) => indexed(i),
        Color::Black => ANSI[0],
        Color::Red => ANSI[1],
        Color::Green => ANSI[2],
        Color::Yellow => ANSI[3],
        Color::Blue => ANSI[4],
        Color::Magenta => ANSI[5],
        Color::Cyan => ANSI[6],
        Color::Gray => ANSI[7],
        Color::DarkGray => ANSI[8],
        Color::LightRed => ANSI[9],
        Color::LightGreen => ANSI[10],
        Color::LightYellow => ANSI[11],
        Color::LightBlue => ANSI[12],
        Color::LightMagenta => ANSI[13],
        Color::LightCyan => ANSI[14],
        Color::White => ANSI[15],
    })
}

/// WCAG 2 contrast ratio of two colours (1 to 21).
pub fn contrast(a: (u8, u8, u8), b: (u8, u8, u8)) -> f64 {
    let lum = |(r, g, b): (u8, u8, u8)| {
        let ch = |v: u8| {
            let v = v as f64 / 255.0;
            if v <= 0.03928 {
                v / 12.92
            } else {
                ((v + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * ch(r) + 0.7152 * ch(g) + 0.0722 * ch(b)
    };
    let (x, y) = (lum(a), lum(b));
    (x.max(y) + 0.05) / (x.min(y) + 0.05)
}

impl Theme {
    pub fn parse(text: &str) -> Result<Self> {
        let r: RawTheme = toml::from_str(text).map_err(|e| anyhow!("invalid theme: {e}"))?;
        let c = |field: &str, v: &str| -> Result<Color> {
            Color::from_str(v)
                .map_err(|_| anyhow!("theme {}: {field} = \"{v}\" is not a colour", r.name))
        };
        Ok(Self {
            fg: c("fg", &r.fg)?,
            bg: c("bg", &r.bg)?,
            dim: c("dim", &r.dim)?,
            accent: c("accent", &r.accent)?,
            user: c("user", &r.user)?,
            assistant: c("assistant", &r.assistant)?,
            code: c("code", &r.code)?,
            weights: c("weights", &r.weights)?,
            kv: c("kv", &r.kv)?,
            other: c("other", &r.other)?,
            free: c("free", &r.free)?,
            good: c("good", &r.good)?,
            warn: c("warn", &r.warn)?,
            bad: c("bad", &r.bad)?,
            border: c("border", &r.border)?,
            code_theme: r
                .code_theme
                .clone()
                .unwrap_or_else(|| "base16-ocean.dark".into()),
            background: match rgb(c("bg", &r.bg)?) {
                Some(bg) => bg,
                None => {
                    let t = r.terminal_bg.as_deref().unwrap_or("#000000");
                    rgb(c("terminal_bg", t)?).ok_or_else(|| {
                        anyhow!("theme {}: terminal_bg must be a colour, not reset", r.name)
                    })?
                }
            },
            min_contrast: r.min_contrast.unwrap_or(3.0),
            name: r.name,
        })
        .and_then(|t: Self| {
            let known = syntect::highlighting::ThemeSet::load_defaults();
            if !known.themes.contains_key(&t.code_theme) {
                let mut names: Vec<&String> = known.themes.keys().collect();
                names.sort();
                bail!(
                    "theme {}: code_theme = \"{}\" is not one of syntect's: {}",
                    t.name,
                    t.code_theme,
                    names
                        .iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(t)
        })
    }

    /// A built-in theme by name, or a theme file by path.
    pub fn load(name_or_path: &str) -> Result<Self> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(text);
        }
        let text = std::fs::read_to_string(name_or_path).with_context(|| {
            format!(
                "no theme \"{name_or_path}\": built-in themes are {}, or give a .toml path",
                BUILTIN.map(|(n, _)| n).join(", ")
            )
        })?;
        Self::parse(&text)
    }

    pub fn builtin_names() -> [&'static str; 3] {
        BUILTIN.map(|(n, _)| n)
    }
}

impl Default for Theme {
    fn default() -> Self {
        Self::parse(BUILTIN[0].1).expect("the dark theme is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_bad_colours_are_named() {
        for n in Theme::builtin_names() {
            assert_eq!(Theme::load(n).unwrap().name, n);
        }
        let bad = BUILTIN[0]
            .1
            .replace("accent = \"#5fafff\"", "accent = \"sparkly\"");
        let err = Theme::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("accent = \"sparkly\""), "{err}");
        let bad = BUILTIN[1].1.replace("InspiredGitHub", "Nope");
        let err = Theme::parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("code_theme = \"Nope\" is not one of syntect's: ")
                && err.contains("InspiredGitHub"),
            "{err}"
        );
        // A theme file from before code themes still loads, with the dark defaults.
        let old: String = BUILTIN[0]
            .1
            .lines()
            .filter(|l| {
                !l.starts_with("code_theme")
                    && !l.starts_with("terminal_bg")
                    && !l.starts_with("min_contrast")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let t = Theme::parse(&old).unwrap();
        assert_eq!(
            (t.code_theme.as_str(), t.background, t.min_contrast),
            ("base16-ocean.dark", (0, 0, 0), 3.0)
        );
        assert!(Theme::load("nope")
            .unwrap_err()
            .to_string()
            .contains("built-in themes are"));
    }
}
