//! Colour themes from themes/*.toml (dark, light, high-contrast built in).

use anyhow::{anyhow, Context, Result};
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
            name: r.name,
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
        assert!(Theme::load("nope")
            .unwrap_err()
            .to_string()
            .contains("built-in themes are"));
    }
}
