//! The inference engine: GGUF loading, the model, tokenizer, chat template, sampling, and the
//! generation loop. `Engine` is synchronous and testable; `worker` puts it on its own thread.

pub mod gguf;
pub mod harmony;
pub mod kernels;
pub mod model;
pub mod spm;
pub mod synth;
pub mod template;
pub mod tokenizer;
pub mod worker;

use crate::protocol::{
    FinishReason, GenParams, GenStats, LoadOptions, Message, ModelInfo, CONTEXT_HOLDS,
};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use gguf::Gguf;
use model::Model;
use std::path::Path;
use std::time::Instant;
use template::ChatTemplate;
use tokenizer::ModelTokenizer;

/// Prompt tokens evaluated per forward pass; bounds the attention scratch memory.
const PREFILL_CHUNK: usize = 512;

/// The device the engine runs on: the GPU of the enabled backend, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    #[cfg(feature = "metal")]
    if let Ok(d) = Device::new_metal(0) {
        return d;
    }
    Device::Cpu
}

/// Where a device keeps the weights, for the fits-in-memory check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryPool {
    /// System memory: the CPU.
    Host,
    /// A GPU sharing system memory with the CPU (Apple silicon; GB10 in DGX Spark; Jetson):
    /// the weights come out of the same pool as on the CPU.
    Unified,
    /// A GPU with its own memory, with this many bytes free.
    Dedicated { free: u64 },
}

/// The memory pool of a device.
pub fn memory_pool(device: &Device) -> MemoryPool {
    match device {
        Device::Cpu => MemoryPool::Host,
        Device::Metal(_) => MemoryPool::Unified,
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda_pool(d),
        #[allow(unreachable_patterns)]
        _ => MemoryPool::Host,
    }
}

#[cfg(feature = "cuda")]
fn cuda_pool(d: &candle_core::CudaDevice) -> MemoryPool {
    use candle_core::cuda::cudarc::driver::sys::CUdevice_attribute as A;
    let stream = d.cuda_stream();
    let ctx = stream.context();
    let attr = |a| ctx.attribute(a).ok();
    // GB10 (compute capability 12.1) and Jetson-class GPUs have no memory of their own.
    let integrated = attr(A::CU_DEVICE_ATTRIBUTE_INTEGRATED) == Some(1)
        || (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        ) == (Some(12), Some(1));
    match ctx.mem_get_info() {
        Ok((free, _)) if !integrated => MemoryPool::Dedicated { free: free as u64 },
        _ => MemoryPool::Unified,
    }
}

/// Bytes the weights may take on a device: what the system has free for the CPU and for GPUs
/// that share its memory, the GPU's free memory for one with its own.
pub fn available_for_weights(device: &Device) -> u64 {
    match memory_pool(device) {
        MemoryPool::Host | MemoryPool::Unified => crate::telemetry::available_memory(),
        MemoryPool::Dedicated { free } => free,
    }
}

/// The backend of a device, as `bench` reports it (llama-bench's names).
pub fn backend_name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "CPU",
        Device::Cuda(_) => "CUDA",
        Device::Metal(_) => "Metal",
    }
}

/// Threads candle computes with: $CANDLE_NUM_THREADS, else $RAYON_NUM_THREADS, else one per
/// physical core (candle's default, which suits decode: SMT siblings share the memory bus).
pub fn thread_count() -> usize {
    ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|k| {
            std::env::var(k)
                .ok()?
                .parse()
                .ok()
                .filter(|&n: &usize| n > 0)
        })
        .unwrap_or_else(candle_core::utils::get_num_threads)
}

/// Refuses to load weights that cannot fit: the kernel would kill the process part way,
/// or the machine would swap for minutes, instead of a clear answer.
/// `context_bytes` is what the context adds (KV cache when full, rotary tables, attention
/// scratch; `HParams::context_bytes`).
pub fn check_fits(
    weight_bytes: u64,
    context_bytes: u64,
    n_ctx: usize,
    available: u64,
) -> Result<()> {
    // Weights and context, plus room for activations and the tokenizer.
    let needed = weight_bytes
        .saturating_add(weight_bytes / 20)
        .saturating_add(context_bytes)
        .saturating_add(256 << 20);
    if needed > available {
        return Err(DoesNotFit(format!(
            "the model needs about {:.1} GB of memory ({:.1} GB of weights, {:.1} GB for a {n_ctx}-token context) but only {:.1} GB is available; close other programs, lower --ctx or pick a smaller model or quantization",
            needed as f64 / 1e9,
            weight_bytes as f64 / 1e9,
            context_bytes as f64 / 1e9,
            available as f64 / 1e9
        ))
        .into());
    }
    Ok(())
}

/// `check_fits`'s refusal, as a type: the engine thread frees the model it holds and tries
/// again when a new one does not fit beside it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DoesNotFit(pub String);

/// What the generation loop reports as it goes; the callback's answer can stop it.
pub enum GenEvent<'a> {
    Prefilled {
        prompt_tokens: usize,
        cached_tokens: usize,
        ttft: std::time::Duration,
        kv_bytes: usize,
    },
    Token(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// A loaded model ready to chat, with the tokens its KV cache currently holds.
pub struct Engine {
    model: Model,
    pub tokenizer: ModelTokenizer,
    template: ChatTemplate,
    cached: Vec<u32>,
    pub info: ModelInfo,
}

/// Says what to do about a GPU error a user can fix. candle's CUDA kernels are PTX compiled by
/// the build's toolkit, and a driver older than that toolkit cannot load them (seen on an H100
/// with driver 580 / CUDA 13.0 and a binary built with the CUDA 13.4 toolkit).
pub fn gpu_hint(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("UNSUPPORTED_PTX_VERSION") {
        e.context(
            "this build's CUDA toolkit is newer than the GPU driver: rebuild with the toolkit \
             of the CUDA version `nvidia-smi` shows, or update the driver",
        )
    } else {
        e
    }
}

impl Engine {
    pub fn load(path: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        Self::load_on(path, opts, device).map_err(gpu_hint)
    }

    fn load_on(path: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let start = Instant::now();
        let mut g = Gguf::open(path)?;
        let arch = g.architecture()?.to_string();
        // Architecture and tokenizer are checked before any weight is read.
        model::Arch::from_gguf_name(&arch)?;
        let tokenizer = ModelTokenizer::for_model(&g)?;
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
        let source = g.get_str("tokenizer.chat_template");
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        let base = source.is_none()
            && template::is_base_model(
                g.get_str("general.name"),
                g.get_str("general.finetune"),
                &file,
            );
        let template = if base {
            ChatTemplate::plain(&path.display().to_string())
        } else {
            ChatTemplate::new(
                source,
                &path.display().to_string(),
                &arch,
                token(tokenizer.bos),
                token(tokenizer.eos),
            )?
        };
        let hp = model::HParams::from_gguf(&g)?;
        let n_ctx = hp.context_len(opts.n_ctx);
        check_fits(
            g.weight_bytes(),
            hp.context_bytes(n_ctx, PREFILL_CHUNK, device.is_cpu().then_some(opts.kv)),
            n_ctx,
            available_for_weights(device),
        )?;
        let mut model = Model::load(&mut g, opts.n_ctx, device)?;
        model.set_kv_types(opts.kv)?;
        let name = g
            .get_str("general.name")
            .map(str::to_string)
            .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let info = ModelInfo {
            path: path.to_owned(),
            name,
            arch,
            quant: g.dominant_quant(),
            params: g.parameter_count(),
            weight_bytes: g.weight_bytes(),
            file_bytes: g.file_size,
            n_ctx: model.n_ctx,
            train_ctx: model.hp.train_ctx,
            n_expert: model.hp.n_expert,
            n_expert_used: model.hp.n_expert_used,
            load_time: start.elapsed(),
            tokenizer_source: tokenizer.source.clone(),
            template_is_fallback: template.is_fallback,
        };
        Ok(Self {
            model,
            tokenizer,
            template,
            cached: Vec::new(),
            info,
        })
    }

    /// The prompt tokens for a conversation, ending with the assistant's turn opening.
    pub fn prompt_tokens(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        self.tokenizer.encode(&text)
    }

    pub fn render_prompt(&self, messages: &[Message]) -> Result<String> {
        self.template.render(messages, true)
    }

    /// Tokens whose keys and values the cache holds.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    pub fn kv_cache_bytes(&self) -> usize {
        self.model.kv_cache_bytes()
    }

    /// Scores a token sequence from an empty cache: the logits (rows, vocab) of every token
    /// from index `from` on, computed in prefill chunks. Leaves the cache empty.
    pub fn score(&mut self, tokens: &[u32], from: usize) -> Result<Tensor> {
        self.reset();
        let mut rows = Vec::new();
        let mut done = 0;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let end = done + chunk.len();
            if end > from {
                let skip = from.saturating_sub(done);
                rows.push(self.model.forward_all(chunk, skip).map_err(gpu_hint)?);
            } else {
                self.model.forward(chunk).map_err(gpu_hint)?;
            }
            done = end;
        }
        self.reset();
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Forgets the conversation in the KV cache.
    pub fn reset(&mut self) {
        self.model.truncate_cache(0);
        self.cached.clear();
    }

    /// Answers the conversation's last turn, reporting through `on_event`.
    pub fn generate(
        &mut self,
        messages: &[Message],
        params: &GenParams,
        on_event: impl FnMut(GenEvent) -> Flow,
    ) -> Result<(GenStats, FinishReason)> {
        let start = Instant::now();
        let text = self.template.render(messages, true)?;
        let tokens = self.tokenizer.encode(&text)?;
        // A template that opens the thinking block itself (DeepSeek-R1's distills): the
        // answer's text gets the tag the model never writes, so it reads like any other.
        let mut open = crate::think::prompt_opens_block(&text);
        let mut on_event = on_event;
        self.generate_tokens(start, &tokens, params, |ev| match ev {
            GenEvent::Token(t) if open => {
                open = false;
                on_event(GenEvent::Token(&format!("{}\n{t}", crate::think::OPEN)))
            }
            ev => on_event(ev),
        })
    }

    /// Like `generate` for an already tokenized prompt (benchmarks use this).
    pub fn generate_tokens(
        &mut self,
        start: Instant,
        tokens: &[u32],
        params: &GenParams,
        on_event: impl FnMut(GenEvent) -> Flow,
    ) -> Result<(GenStats, FinishReason)> {
        self.run_tokens(start, tokens, params, on_event)
            .map_err(gpu_hint)
    }

    fn run_tokens(
        &mut self,
        start: Instant,
        tokens: &[u32],
        params: &GenParams,
        mut on_event: impl FnMut(GenEvent) -> Flow,
    ) -> Result<(GenStats, FinishReason)> {
        let n_ctx = self.model.n_ctx;
        if tokens.is_empty() {
            bail!("the prompt is empty");
        }
        if tokens.len() >= n_ctx {
            bail!(
                "the prompt is {} tokens but the {CONTEXT_HOLDS} {n_ctx} (the model was trained for {}; --ctx raises it)",
                tokens.len(),
                self.model.hp.train_ctx
            );
        }
        let result = self.run(start, tokens, params, &mut on_event);
        if result.is_err() {
            // A failed pass can leave the cache half-written: forget it rather than trust it.
            self.reset();
        }
        result
    }

    fn run(
        &mut self,
        start: Instant,
        tokens: &[u32],
        params: &GenParams,
        on_event: &mut impl FnMut(GenEvent) -> Flow,
    ) -> Result<(GenStats, FinishReason)> {
        let n_ctx = self.model.n_ctx;
        // Reuse the KV cache for the prefix this prompt shares with what it holds; at
        // least one token is evaluated so there are logits to sample from.
        let shared = self
            .cached
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = shared.min(tokens.len() - 1);
        self.model.truncate_cache(keep);
        self.cached.truncate(keep);

        let prefill_start = Instant::now();
        let mut logits: Option<Tensor> = None;
        for chunk in tokens[keep..].chunks(PREFILL_CHUNK) {
            logits = Some(self.model.forward(chunk)?);
            self.cached.extend_from_slice(chunk);
        }
        let prompt_eval = prefill_start.elapsed();
        let Some(mut logits) = logits else {
            bail!("no prompt token was evaluated");
        };
        self.check_logits(&logits)?;

        let mut sampler = Sampler::new(params);
        let mut history: Vec<u32> = tokens.to_vec();
        let mut next = sampler.sample(&logits, &history)?;
        let ttft = start.elapsed();
        let first_at = Instant::now();
        let mut last_at;
        let mut stats = GenStats {
            prompt_tokens: tokens.len(),
            cached_tokens: keep,
            prompt_eval,
            ttft,
            ..Default::default()
        };
        let mut stop_requested = on_event(GenEvent::Prefilled {
            prompt_tokens: tokens.len(),
            cached_tokens: keep,
            ttft,
            kv_bytes: self.model.kv_cache_bytes(),
        }) == Flow::Stop;

        let mut stream = TokenStream::default();
        // gpt-oss: its analysis channel shown as a thinking block, its final one as the answer.
        let mut harmony = harmony::HarmonyFilter::for_tokenizer(&self.tokenizer);
        // A base model continues text with no end of turn: it stops at the end of its first
        // paragraph (a blank line after some text), else it writes to max tokens.
        let plain = self.template.plain;
        let (mut has_text, mut tail) = (false, String::new());
        let reason = loop {
            stats.generated_tokens += 1;
            last_at = Instant::now();
            if !params.ignore_eos && self.tokenizer.is_stop(next) {
                break FinishReason::Eos;
            }
            // A base model that writes markup (Gemma 3's `<start_of_image>` between
            // paragraphs) has left the running text: that ends the paragraph too.
            if plain && !params.ignore_eos && has_text && self.tokenizer.is_markup(next) {
                break FinishReason::ParagraphEnd;
            }
            history.push(next);
            let mut paragraph_end = false;
            let piece = stream.push(&self.tokenizer, next)?;
            let piece = match harmony.as_mut() {
                Some(h) => h.push(next, piece),
                None => piece,
            };
            if let Some(text) = piece {
                if on_event(GenEvent::Token(&text)) == Flow::Stop {
                    stop_requested = true;
                }
                if plain {
                    // Only the last few characters are kept: enough to see "\n\n".
                    tail.push_str(&text);
                    let cut = tail.char_indices().rev().nth(3).map_or(0, |(i, _)| i);
                    tail.drain(..cut);
                    has_text |= !text.trim().is_empty();
                    paragraph_end = has_text && tail.ends_with("\n\n");
                }
            }
            if stop_requested {
                break FinishReason::Cancelled;
            }
            if paragraph_end && !params.ignore_eos {
                break FinishReason::ParagraphEnd;
            }
            if stats.generated_tokens >= params.max_tokens {
                break FinishReason::MaxTokens;
            }
            if self.model.cached_len() + 1 > n_ctx {
                break FinishReason::ContextFull;
            }
            logits = self.model.forward(&[next])?;
            self.check_logits(&logits)?;
            self.cached.push(next);
            next = sampler.sample(&logits, &history)?;
        };
        let mut rest = stream.flush(&self.tokenizer)?;
        if let Some(h) = harmony.as_mut() {
            rest = rest.and_then(|t| h.push(u32::MAX, Some(t)));
            rest = match (rest, h.finish()) {
                (Some(a), Some(b)) => Some(a + &b),
                (a, b) => a.or(b),
            };
        }
        if let Some(rest) = rest {
            on_event(GenEvent::Token(&rest));
        }
        stats.decode = last_at - first_at;
        stats.kv_bytes = self.model.kv_cache_bytes();
        stats.total = start.elapsed();
        Ok((stats, reason))
    }
}

impl Engine {
    /// NaN or infinite logits come from corrupt weights (a NaN scale in a quantized block);
    /// say so, rather than let the sampler report "a weight is not a valid number".
    fn check_logits(&self, logits: &Tensor) -> Result<()> {
        let v: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        if v.iter().any(|x| !x.is_finite()) {
            bail!(
                "the model produced NaN logits: its weights are corrupt ({})",
                self.info.path.display()
            );
        }
        Ok(())
    }
}

/// Sampling settings turned into candle's logits processor plus a repeat penalty.
pub struct Sampler {
    processor: LogitsProcessor,
    penalty: f32,
    last_n: usize,
}

impl Sampler {
    pub fn new(p: &GenParams) -> Self {
        let t = p.temperature;
        let sampling = if t <= 0.0 {
            Sampling::ArgMax
        } else {
            match (p.top_k, p.top_p) {
                (Some(k), Some(top_p)) => Sampling::TopKThenTopP {
                    k,
                    p: top_p,
                    temperature: t,
                },
                (Some(k), None) => Sampling::TopK { k, temperature: t },
                (None, Some(top_p)) => Sampling::TopP {
                    p: top_p,
                    temperature: t,
                },
                (None, None) => Sampling::All { temperature: t },
            }
        };
        Self {
            processor: LogitsProcessor::from_sampling(p.seed, sampling),
            penalty: p.repeat_penalty,
            last_n: p.repeat_last_n,
        }
    }

    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let logits = if self.penalty != 1.0 && self.last_n > 0 {
            let from = history.len().saturating_sub(self.last_n);
            candle_transformers::utils::apply_repeat_penalty(
                logits,
                self.penalty,
                &history[from..],
            )?
        } else {
            logits.clone()
        };
        Ok(self.processor.sample(&logits)?)
    }
}

/// Incremental detokenization: emits text as soon as the tokens so far decode to complete
/// UTF-8. Decoding a window (not single tokens) keeps SentencePiece's spaces and byte-level
/// BPE's multi-byte characters right; unlike candle's TokenOutputStream it does not hold
/// back a token that ends in punctuation.
#[derive(Debug, Default)]
pub struct TokenStream {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl TokenStream {
    pub fn push(&mut self, tok: &ModelTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.ends_with('\u{FFFD}') || now.len() <= before.len() {
            return Ok(None);
        }
        match now.get(before.len()..) {
            Some(text) if now.starts_with(&before) => {
                let text = text.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(Some(text))
            }
            _ => Ok(None),
        }
    }

    /// Whatever is still held back at the end (an incomplete character, lossily).
    pub fn flush(&mut self, tok: &ModelTokenizer) -> Result<Option<String>> {
        if self.read >= self.ids.len() {
            return Ok(None);
        }
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(now
            .get(before.len()..)
            .filter(|t| !t.is_empty())
            .map(str::to_string))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_driver_older_than_the_toolkit_gets_a_way_out() {
        // The error cudarc gives for PTX newer than the driver (as candle wraps it).
        let e = anyhow::anyhow!(
            "DriverError(CUDA_ERROR_UNSUPPORTED_PTX_VERSION, \"the provided PTX was compiled with an unsupported toolchain.\")"
        );
        let text = format!("{:#}", super::gpu_hint(e));
        assert!(
            text.starts_with("this build's CUDA toolkit is newer than the GPU driver"),
            "{text}"
        );
        assert!(text.contains("UNSUPPORTED_PTX_VERSION"), "{text}");
        let other = format!("{:#}", super::gpu_hint(anyhow::anyhow!("out of memory")));
        assert_eq!(other, "out of memory");
    }

    #[test]
    fn too_big_models_are_refused_with_sizes() {
        let gb = 1_000_000_000;
        assert!(super::check_fits(4 * gb, 0, 4096, 24 * gb).is_ok());
        let err = super::check_fits(42 * gb, 0, 4096, 20 * gb)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("44.4 GB") && err.contains("20.0 GB is available"),
            "{err}"
        );
        // The context counts: 4 GB of weights fit in 8 GB, not with a 6 GB KV cache.
        assert!(super::check_fits(4 * gb, 0, 4096, 8 * gb).is_ok());
        let err = super::check_fits(4 * gb, 6 * gb, 131_072, 8 * gb)
            .unwrap_err()
            .to_string();
        assert!(err.contains("6.0 GB for a 131072-token context"), "{err}");
    }
}
