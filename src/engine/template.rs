//! Chat prompts from the GGUF's `tokenizer.chat_template`, rendered with minijinja the way
//! Hugging Face's `apply_chat_template` does (trim_blocks, lstrip_blocks, Python string
//! methods, `raise_exception`).

use crate::protocol::Message;
use anyhow::{anyhow, bail, Result};
use minijinja::{context, Environment, Error, ErrorKind};

/// Gemma GGUFs often ship without a template; this is Gemma 3's own.
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

/// ChatML, the format of most other small instruct models.
const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Largest template source accepted; real ones are a few KB (the biggest, with tool-call
/// formats, about 20 KB).
pub const MAX_TEMPLATE_BYTES: usize = 256 << 10;
/// Instructions one render may run (minijinja's fuel): a long chat needs thousands, a
/// template looping over `range(100000)` twice would need 10^10.
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// Bytes a render may produce beyond twice the conversation's own text.
pub const MAX_RENDER_OVERHEAD: usize = 1 << 20;

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template comes from, for errors ("the chat template in FILE").
    origin: String,
    bos: String,
    eos: String,
    /// True when the file had no template and a built-in one is used.
    pub is_fallback: bool,
    /// A base model's plain completion: no template, the conversation as one text.
    pub plain: bool,
}

/// Whether a GGUF without a chat template is a base (pretrained, not instruction-tuned) model:
/// neither its name, its fine-tune label nor its file name has an instruct marker such as
/// "it", "instruct" or "chat". Such a model gets plain completion, not a made-up template.
pub fn is_base_model(name: Option<&str>, finetune: Option<&str>, file: &str) -> bool {
    const MARKERS: [&str; 8] = [
        "it",
        "instruct",
        "chat",
        "sft",
        "dpo",
        "rlhf",
        "orpo",
        "assistant",
    ];
    ![name.unwrap_or(""), finetune.unwrap_or(""), file]
        .iter()
        .flat_map(|s| s.split(|c: char| !c.is_ascii_alphanumeric()))
        .any(|w| MARKERS.contains(&w.to_ascii_lowercase().as_str()))
}

/// The text a base model continues: the conversation's texts one after the other, a blank
/// line between them (the system prompt first, if any); the last one is kept as typed, since
/// a trailing space or newline changes what comes next. The tokenizer adds BOS.
pub fn plain_prompt(messages: &[Message]) -> String {
    let n = messages.len();
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if i + 1 == n {
                m.content.as_str()
            } else {
                m.content.trim_end()
            }
        })
        .filter(|c| !c.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

impl ChatTemplate {
    /// `source` is the file's template, if any; `arch` picks the fallback; `origin` names
    /// the file in errors.
    pub fn new(
        source: Option<&str>,
        origin: &str,
        arch: &str,
        bos: String,
        eos: String,
    ) -> Result<Self> {
        if let Some(t) = source.filter(|t| t.len() > MAX_TEMPLATE_BYTES) {
            bail!(
                "the chat template in {origin} is {} bytes, over the {} KB a template may have",
                t.len(),
                MAX_TEMPLATE_BYTES >> 10
            );
        }
        let (text, is_fallback) = match source {
            Some(t) => (t.to_string(), false),
            None if arch.starts_with("gemma") => (GEMMA_TEMPLATE.to_string(), true),
            None => (CHATML_TEMPLATE.to_string(), true),
        };
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_format: String| -> String {
            // Templates use this for "today's date" in system prompts; a fixed format is
            // enough and avoids a date-time dependency.
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let days = secs / 86_400;
            let (y, m, d) = civil_from_days(days as i64);
            format!("{y:04}-{m:02}-{d:02}")
        });
        env.add_template_owned("chat", text)
            .map_err(|e| anyhow!("the chat template in {origin} does not parse: {e}"))?;
        Ok(Self {
            env,
            origin: origin.to_string(),
            bos,
            eos,
            is_fallback,
            plain: false,
        })
    }

    /// Plain completion for a base model (see [`is_base_model`]).
    pub fn plain(origin: &str) -> Self {
        Self {
            env: Environment::new(),
            origin: origin.to_string(),
            bos: String::new(),
            eos: String::new(),
            is_fallback: false,
            plain: true,
        }
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        if self.plain {
            return Ok(plain_prompt(messages));
        }
        let tmpl = self.env.get_template("chat")?;
        let msgs: Vec<_> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let text_len: usize = messages.iter().map(|m| m.content.len()).sum();
        let cap = text_len
            .saturating_mul(2)
            .saturating_add(MAX_RENDER_OVERHEAD);
        let mut out = Capped {
            buf: Vec::new(),
            cap,
        };
        let result = tmpl.render_captured_to(
            context! {
                messages => msgs,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos.as_str(),
                eos_token => self.eos.as_str(),
            },
            &mut out,
        );
        let origin = &self.origin;
        match result {
            Ok(_) => String::from_utf8(out.buf)
                .map_err(|_| anyhow!("the chat template in {origin} produced invalid UTF-8")),
            Err(_) if out.buf.len() >= cap => bail!(
                "the chat template in {origin} produced over {cap} bytes for a {text_len}-byte conversation"
            ),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => bail!(
                "the chat template in {origin} ran too long (over {TEMPLATE_FUEL} steps)"
            ),
            Err(e) => {
                let contents = messages.iter().map(|m| m.content.as_str());
                let e = crate::private::redact(&e.to_string(), contents);
                bail!("rendering the chat template in {origin} failed: {e}")
            }
        }
    }
}

/// Output that refuses to grow past `cap` bytes, so a template cannot fill memory.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(b.len()) > self.cap {
            self.buf.resize(self.cap, 0);
            return Err(std::io::Error::other("rendered prompt too long"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Role;

    fn msgs() -> Vec<Message> {
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello!"),
            Message::new(Role::User, "Capital of France?"),
        ]
    }

    #[test]
    fn chatml_multi_turn_with_generation_prompt() {
        let t = ChatTemplate::new(None, "m.gguf", "qwen2", "".into(), "".into()).unwrap();
        let out = t.render(&msgs(), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_gen = t.render(&msgs(), false).unwrap();
        assert!(no_gen.ends_with("Capital of France?<|im_end|>\n"));
    }

    #[test]
    fn gemma_fallback_folds_system_into_first_user_turn() {
        let t =
            ChatTemplate::new(None, "m.gguf", "gemma3", "<bos>".into(), "<eos>".into()).unwrap();
        assert!(t.is_fallback);
        let out = t.render(&msgs(), true).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn hf_style_template_with_python_methods_and_exceptions() {
        let src = "{% for m in messages %}{% if m['role'] not in ['user','assistant','system'] %}{{ raise_exception('bad role') }}{% endif %}{{ bos_token if loop.first }}[{{ m['role'].upper() }}] {{ m['content'].strip() }}\n{% endfor %}";
        let t =
            ChatTemplate::new(Some(src), "m.gguf", "llama", "<s>".into(), "</s>".into()).unwrap();
        let out = t
            .render(&[Message::new(Role::User, "  hey  ")], false)
            .unwrap();
        assert_eq!(out, "<s>[USER] hey\n");
        let raising = "{{ raise_exception('Conversation roles must alternate') }}";
        let t = ChatTemplate::new(Some(raising), "m.gguf", "llama", "".into(), "".into()).unwrap();
        let err = t.render(&msgs(), true).unwrap_err().to_string();
        assert!(err.contains("Conversation roles must alternate"), "{err}");
    }

    #[test]
    fn broken_template_is_an_error_not_a_panic() {
        let err = ChatTemplate::new(Some("{% for %}"), "m.gguf", "llama", "".into(), "".into())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not parse"), "{err}");
    }

    #[test]
    fn hostile_templates_are_stopped_with_clear_errors() {
        let t =
            |src: &str| ChatTemplate::new(Some(src), "evil.gguf", "llama", "".into(), "".into());
        let render = |src: &str| {
            t(src)
                .unwrap()
                .render(&msgs(), true)
                .unwrap_err()
                .to_string()
        };
        let err = render("{% for i in range(100000) %}{% for j in range(100000) %}{% set y = i * j %}{% endfor %}{% endfor %}");
        assert_eq!(
            err,
            format!("the chat template in evil.gguf ran too long (over {TEMPLATE_FUEL} steps)")
        );
        let err = render("{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}");
        assert!(
            err.starts_with("the chat template in evil.gguf produced over 1048")
                && err.contains("bytes for a"),
            "{err}"
        );
        let big = "a".repeat(MAX_TEMPLATE_BYTES + 1);
        let err = t(&big).err().unwrap().to_string();
        assert!(
            err.contains("evil.gguf is 262145 bytes, over the 256 KB"),
            "{err}"
        );
    }

    #[test]
    fn base_models_are_told_by_name_and_get_plain_completion() {
        // The real files' metadata (general.name, general.finetune, file name).
        assert!(is_base_model(
            Some("Gemma 3 270m"),
            None,
            "gemma-3-270m-q4_k_m.gguf"
        ));
        assert!(!is_base_model(
            Some("Gemma 3 270m It"),
            None,
            "gemma-3-270m-it-Q4_K_M.gguf"
        ));
        assert!(!is_base_model(
            Some("Smollm2 135M 8k Lc100K Mix1 Ep2"),
            Some("8k-lc100k-mix1-ep2"),
            "SmolLM2-135M-Instruct.Q4_1.gguf"
        ));
        assert!(!is_base_model(None, None, "Qwen2.5-0.5B-Chat.Q8_0.gguf"));
        // "it" only as a word: "Llama-3.1-8B" and "unit" are not instruct markers.
        assert!(is_base_model(None, None, "Meta-Llama-3.1-8B-Q4_K_M.gguf"));
        let t = ChatTemplate::plain("m.gguf");
        assert!(t.plain && !t.is_fallback);
        let out = t.render(&msgs(), true).unwrap();
        assert_eq!(
            out, "Be brief.\n\nHi\n\nHello!\n\nCapital of France?",
            "no role markers, no made-up turns"
        );
        // An answer's trailing blank line is not doubled; the last text keeps its newline.
        let m = [
            Message::new(Role::User, "Once upon a time"),
            Message::new(Role::Assistant, " there was a fox.\n\n"),
            Message::new(Role::User, "The end\n"),
        ];
        assert_eq!(
            t.render(&m, true).unwrap(),
            "Once upon a time\n\n there was a fox.\n\nThe end\n"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_416), (2025, 11, 24));
    }
}
