//! The prompt editor: multi-line text with a cursor and a history of sent prompts. Kept
//! here rather than using a widget crate so the state machine stays pure and testable.

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Input {
    pub text: String,
    /// Byte offset of the cursor, always on a char boundary.
    pub cursor: usize,
    history: Vec<String>,
    /// Position while browsing the history (None: editing a new prompt).
    browsing: Option<usize>,
}

impl Input {
    pub fn insert(&mut self, s: &str) {
        // Pasted text from terminals often uses \r for line ends.
        let s = s.replace("\r\n", "\n").replace('\r', "\n");
        self.text.insert_str(self.cursor, &s);
        self.cursor += s.len();
        self.browsing = None;
    }

    pub fn backspace(&mut self) {
        if let Some((i, _)) = self.text[..self.cursor].char_indices().next_back() {
            self.text.replace_range(i..self.cursor, "");
            self.cursor = i;
        }
    }

    pub fn delete(&mut self) {
        if let Some(c) = self.text[self.cursor..].chars().next() {
            self.text
                .replace_range(self.cursor..self.cursor + c.len_utf8(), "");
        }
    }

    pub fn left(&mut self) {
        if let Some((i, _)) = self.text[..self.cursor].char_indices().next_back() {
            self.cursor = i;
        }
    }

    pub fn right(&mut self) {
        if let Some(c) = self.text[self.cursor..].chars().next() {
            self.cursor += c.len_utf8();
        }
    }

    pub fn home(&mut self) {
        self.cursor = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1);
    }

    pub fn end(&mut self) {
        self.cursor += self.text[self.cursor..]
            .find('\n')
            .unwrap_or(self.text.len() - self.cursor);
    }

    pub fn clear(&mut self) {
        self.text.clear();
        self.cursor = 0;
        self.browsing = None;
    }

    pub fn is_multiline(&self) -> bool {
        self.text.contains('\n')
    }

    /// Takes the text to send, remembering it in the history.
    pub fn take(&mut self) -> String {
        let text = std::mem::take(&mut self.text);
        self.cursor = 0;
        self.browsing = None;
        if !text.trim().is_empty() && self.history.last() != Some(&text) {
            self.history.push(text.clone());
        }
        text
    }

    pub fn history_prev(&mut self) {
        let i = match self.browsing {
            None if !self.history.is_empty() => self.history.len() - 1,
            Some(i) if i > 0 => i - 1,
            _ => return,
        };
        self.browsing = Some(i);
        self.text = self.history[i].clone();
        self.cursor = self.text.len();
    }

    pub fn history_next(&mut self) {
        match self.browsing {
            Some(i) if i + 1 < self.history.len() => {
                self.browsing = Some(i + 1);
                self.text = self.history[i + 1].clone();
                self.cursor = self.text.len();
            }
            Some(_) => self.clear(),
            None => {}
        }
    }

    /// (line, column in chars) of the cursor, for placing the terminal cursor.
    pub fn cursor_line_col(&self) -> (usize, usize) {
        let before = &self.text[..self.cursor];
        let line = before.matches('\n').count();
        let col = before.rsplit('\n').next().unwrap_or("").chars().count();
        (line, col)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editing_with_multibyte_text() {
        let mut i = Input::default();
        i.insert("héllo");
        i.left();
        i.left();
        i.backspace();
        assert_eq!(i.text, "hélo");
        i.home();
        i.delete();
        assert_eq!(i.text, "élo");
        i.end();
        i.insert("\r\nsecond");
        assert_eq!(i.text, "élo\nsecond");
        assert_eq!(i.cursor_line_col(), (1, 6));
        assert!(i.is_multiline());
    }

    #[test]
    fn history_browsing() {
        let mut i = Input::default();
        i.insert("one");
        assert_eq!(i.take(), "one");
        i.insert("two");
        i.take();
        i.history_prev();
        assert_eq!(i.text, "two");
        i.history_prev();
        assert_eq!(i.text, "one");
        i.history_prev();
        assert_eq!(i.text, "one");
        i.history_next();
        assert_eq!(i.text, "two");
        i.history_next();
        assert_eq!(i.text, "");
    }
}
