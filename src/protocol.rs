//! Every type that crosses a thread boundary: commands into the engine, events out of it.

use std::path::PathBuf;
use std::time::Duration;

/// Identifies one generation request; the UI drops events of a request it replaced.
pub type RequestId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Sampling and length settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 disables it.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
    /// Keep going past end-of-turn tokens (benchmarks, tests).
    pub ignore_eos: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_tokens: 512,
            temperature: 0.7,
            top_k: Some(40),
            top_p: Some(0.9),
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 42,
            ignore_eos: false,
        }
    }
}

/// The element type of the KV cache on the CPU, as llama.cpp's `--cache-type-k/-v` name
/// them. A GPU's cache stays f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvType {
    /// Half precision: half the memory of f32, llama.cpp's default.
    #[default]
    #[value(name = "f16")]
    F16,
    /// 8-bit blocks of 32 with an f16 scale: about a quarter of f32.
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "f32")]
    F32,
}

impl KvType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::F32 => "f32",
        }
    }
}

/// The cache types of keys and of values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvTypes {
    pub k: KvType,
    pub v: KvType,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Context length to allocate; capped by what the model was trained for.
    pub n_ctx: usize,
    /// Element types of the KV cache on the CPU.
    pub kv: KvTypes,
    /// Keep the model loaded before this one resident beside it when both fit in memory
    /// (an A/B run), so that switching back to it is instant. Otherwise it is freed once the
    /// new one is ready. Either way the old model stays loaded until the new one is, when
    /// memory allows, so a file that fails to load leaves the old model in place.
    pub keep_previous: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            kv: KvTypes::default(),
            keep_previous: false,
        }
    }
}

#[derive(Debug)]
pub enum EngineCmd {
    Load {
        path: PathBuf,
        opts: LoadOptions,
    },
    Generate {
        req: RequestId,
        messages: Vec<Message>,
        params: GenParams,
    },
    Cancel {
        req: RequestId,
    },
    Shutdown,
}

/// What the UI shows about the loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub name: String,
    pub arch: String,
    pub quant: String,
    pub params: u64,
    pub weight_bytes: u64,
    pub file_bytes: u64,
    pub n_ctx: usize,
    pub train_ctx: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub load_time: Duration,
    pub tokenizer_source: String,
    pub template_is_fallback: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    /// A base model's completion reached a paragraph end (a blank line).
    ParagraphEnd,
    MaxTokens,
    Cancelled,
    ContextFull,
    /// The answer failed part way (a remote server died or cut the stream, the engine failed);
    /// the part that came is kept.
    Cut,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::ParagraphEnd => "paragraph end",
            FinishReason::MaxTokens => "max tokens",
            FinishReason::Cancelled => "cancelled",
            FinishReason::ContextFull => "context full",
            FinishReason::Cut => "cut",
        }
    }
}

/// Timings of one answer. TTFT runs from the request to the first sampled token; the
/// decode rate counts the tokens after the first, over the time after it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenStats {
    /// Tokens in the whole rendered prompt.
    pub prompt_tokens: usize,
    /// Of those, how many were already in the KV cache from the previous turn.
    pub cached_tokens: usize,
    /// Time to evaluate the new prompt tokens.
    pub prompt_eval: Duration,
    pub ttft: Duration,
    pub generated_tokens: usize,
    /// Time from the first sampled token to the last.
    pub decode: Duration,
    pub total: Duration,
    /// Bytes the KV cache buffers occupy at the end.
    pub kv_bytes: usize,
    /// What a remote server reported about the same answer (its own clocks), beside the
    /// rates above, which a remote backend measures on the client from the stream.
    pub server: Option<ServerStats>,
}

/// Timings a remote server reports for one answer, from its own clocks: llama-server's
/// `timings`, Ollama's `eval_count`/`eval_duration`/`prompt_eval_*`, or OpenAI/vLLM `usage`
/// (token counts only, no durations).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerStats {
    /// Where the numbers come from: "llama-server timings", "ollama", "usage".
    pub source: String,
    pub prompt_tokens: Option<usize>,
    pub cached_tokens: Option<usize>,
    pub prompt_eval: Option<Duration>,
    pub generated_tokens: Option<usize>,
    pub decode: Option<Duration>,
    /// Rates the server states itself (llama-server's `prompt_per_second` and
    /// `predicted_per_second`, which leave the first token out): shown as given.
    pub stated_prompt_rate: Option<f64>,
    pub stated_decode_rate: Option<f64>,
}

impl ServerStats {
    /// Prompt tokens per second by the server's clock: as it states it, else its count
    /// over its duration.
    pub fn prompt_rate(&self) -> Option<f64> {
        self.stated_prompt_rate
            .or_else(|| Some(rate(self.prompt_tokens?, self.prompt_eval?)))
            .filter(|r| *r > 0.0 && r.is_finite())
    }

    /// Generated tokens per second by the server's clock: as it states it, else its count
    /// over its duration (Ollama's eval_count / eval_duration).
    pub fn decode_rate(&self) -> Option<f64> {
        self.stated_decode_rate
            .or_else(|| Some(rate(self.generated_tokens?, self.decode?)))
            .filter(|r| *r > 0.0 && r.is_finite())
    }
}

impl GenStats {
    pub fn prompt_eval_tokens(&self) -> usize {
        self.prompt_tokens - self.cached_tokens
    }

    pub fn prompt_rate(&self) -> f64 {
        rate(self.prompt_eval_tokens(), self.prompt_eval)
    }

    /// Decode tokens per second, excluding the first token (which belongs to TTFT).
    pub fn decode_rate(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode)
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    if n == 0 || d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Loading {
        path: PathBuf,
    },
    Ready {
        info: ModelInfo,
    },
    LoadFailed {
        path: PathBuf,
        error: String,
    },
    Prefilled {
        req: RequestId,
        prompt_tokens: usize,
        cached_tokens: usize,
        ttft: Duration,
        kv_bytes: usize,
    },
    Token {
        req: RequestId,
        text: String,
    },
    Finished {
        req: RequestId,
        stats: GenStats,
        reason: FinishReason,
    },
    Failed {
        req: RequestId,
        error: String,
    },
    /// After each load (ready or failed): the models the engine holds now, the active one
    /// first (empty when none), and how the load went.
    Resident {
        models: Vec<PathBuf>,
        how: LoadHow,
    },
}

/// How a load was carried out, for the UI to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadHow {
    /// No model was loaded before.
    Fresh,
    /// The model was already resident: switched to without reading it again.
    Reused,
    /// Read from disk while the previous model stayed loaded (both fit).
    BesideOld,
    /// The two did not fit together: the previous model was freed first.
    Swapped,
    /// Loading failed; the previous model is still loaded, untouched.
    FailedKeptOld,
    /// Loading failed after the previous model was freed (they did not fit together);
    /// the previous one is being read again (a `Loading` and `Ready` follow).
    FailedReloadingOld,
    /// Loading failed and no model is loaded.
    FailedNone,
}

/// The words of the engine's error for a prompt longer than the context, so that each front
/// end can add its own way out (Ctrl-N in the TUI, /reset in the REPL).
pub const CONTEXT_HOLDS: &str = "context holds";

/// Whether an engine error is a prompt that does not fit the context.
pub fn is_context_overflow(error: &str) -> bool {
    error.contains(CONTEXT_HOLDS)
}
