//! Remote backends: OpenAI-compatible servers (llama-server, vLLM, SGLang, LM Studio) and
//! Ollama, reached over HTTP. `worker` is a second engine thread that speaks the same
//! `EngineCmd`/`EngineEvent` protocol as the local engine; `stream` parses what the servers
//! send; `metrics` reads their Prometheus `/metrics` (also used by `tokentop top`).
//!
//! HTTP is ureq 2 (blocking, already in the tree through hf-hub): the stream is read on its
//! own thread, so a cancel or a stalled server is noticed by the worker without waiting on
//! a socket.

pub mod metrics;
pub mod router;
pub mod stream;
pub mod watch;
pub mod worker;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a server may stay silent (no byte of an answer) before the answer fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// One server to talk to: from `--endpoint URL` or a named entry of `endpoints.toml`.
#[derive(Clone, PartialEq)]
pub struct Endpoint {
    /// The name in endpoints.toml, or the URL itself.
    pub name: String,
    /// Base URL without a trailing slash or `/v1`: `http://spark.local:8080`.
    pub url: String,
    /// The model to ask for; None: the first the server lists.
    pub model: Option<String>,
    /// The API key, read from the environment variable named in the config. Never written
    /// anywhere (sessions, logs, exports); `Debug` hides it.
    pub api_key: Option<String>,
    /// Silence after which an answer fails.
    pub timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<hidden>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// endpoints.toml: `[[endpoint]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    endpoint: Vec<ConfigEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigEntry {
    name: String,
    url: String,
    model: Option<String>,
    /// Name of the environment variable that holds the API key (the key itself is never
    /// written in the file).
    api_key_env: Option<String>,
    timeout_s: Option<u64>,
}

/// `$TOKENTOP_CONFIG`, else the platform config dir's `tokentop/endpoints.toml`.
pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TOKENTOP_CONFIG") {
        return Some(PathBuf::from(p));
    }
    directories::ProjectDirs::from("", "", "tokentop")
        .map(|d| d.config_dir().join("endpoints.toml"))
}

fn timeout_from_env() -> Result<Option<Duration>> {
    match std::env::var("TOKENTOP_REMOTE_TIMEOUT") {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Some(Duration::from_secs_f64(s))),
            _ => bail!("TOKENTOP_REMOTE_TIMEOUT must be a number of seconds above 0, not {v:?}"),
        },
        Err(_) => Ok(None),
    }
}

/// Turns `--endpoint` (a URL, or a name in the config file) and an optional model into an
/// endpoint.
pub fn resolve(arg: &str, model: Option<&str>) -> Result<Endpoint> {
    let env_timeout = timeout_from_env()?;
    if arg.contains("://") {
        return Ok(Endpoint {
            name: arg.to_string(),
            url: normalize_url(arg)?,
            model: model.map(str::to_string),
            api_key: std::env::var("TOKENTOP_API_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
            timeout: env_timeout.unwrap_or(DEFAULT_TIMEOUT),
        });
    }
    let path = config_path().context("no config dir to find named endpoints in")?;
    let entries = read_config(&path)?;
    let Some(e) = entries.into_iter().find(|e| e.name == arg) else {
        bail!(
            "no endpoint named {arg:?} in {} (give a URL like http://host:8080, or add an [[endpoint]] there)",
            path.display()
        );
    };
    let api_key = match &e.api_key_env {
        Some(var) => match std::env::var(var) {
            Ok(k) if !k.is_empty() => Some(k),
            _ => bail!(
                "endpoint {:?} in {} takes its API key from ${var}, which is not set",
                e.name,
                path.display()
            ),
        },
        None => None,
    };
    Ok(Endpoint {
        name: e.name,
        url: normalize_url(&e.url).with_context(|| format!("in {}", path.display()))?,
        model: model.map(str::to_string).or(e.model),
        api_key,
        timeout: env_timeout
            .or(e.timeout_s.map(Duration::from_secs))
            .unwrap_or(DEFAULT_TIMEOUT),
    })
}

fn read_config(path: &Path) -> Result<Vec<ConfigEntry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no endpoints file at {}", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file: ConfigFile = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {}",
            path.display(),
            e.to_string().lines().next().unwrap_or("bad TOML")
        )
    })?;
    Ok(file.endpoint)
}

/// `http://host:8080/v1/` → `http://host:8080`.
pub fn normalize_url(url: &str) -> Result<String> {
    let u = url.trim().trim_end_matches('/');
    let u = u.strip_suffix("/v1").unwrap_or(u);
    if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() <= "https://".len() {
        bail!("{url:?} is not an http:// or https:// URL");
    }
    Ok(u.to_string())
}

/// The kind of server, told apart by what it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    LlamaServer,
    Vllm,
    Sglang,
    Ollama,
    /// Speaks /v1 but says nothing more about itself (LM Studio, a proxy, OpenAI).
    OpenAi,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::LlamaServer => "llama-server",
            Kind::Vllm => "vLLM",
            Kind::Sglang => "SGLang",
            Kind::Ollama => "Ollama",
            Kind::OpenAi => "OpenAI-compatible",
        }
    }
}

/// An HTTP agent with a connect timeout and a read timeout (a backstop: the worker notices
/// silence itself).
pub fn agent(read_timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(read_timeout)
        .build()
}

/// A GET with the endpoint's key; errors become one line naming the URL.
pub fn get(agent: &ureq::Agent, ep: &Endpoint, path: &str) -> Result<String> {
    let url = format!("{}{path}", ep.url);
    let mut req = agent.get(&url);
    if let Some(k) = &ep.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.call() {
        Ok(resp) => resp
            .into_string()
            .map_err(|e| anyhow::anyhow!("reading {url}: {e}")),
        Err(e) => Err(anyhow::anyhow!(http_error(&url, e, None))),
    }
}

/// One line for a failed request: refused connection, bad key, unknown model, timeout.
pub fn http_error(url: &str, e: ureq::Error, model: Option<&str>) -> String {
    match e {
        ureq::Error::Status(code, resp) => {
            let body = resp.into_string().unwrap_or_default();
            let msg = server_message(&body);
            match code {
                401 | 403 => format!(
                    "{url} refused the request ({code} {}): {msg} — check the API key (TOKENTOP_API_KEY, or api_key_env in endpoints.toml)",
                    if code == 401 { "Unauthorized" } else { "Forbidden" }
                ),
                404 => match model {
                    Some(m) => format!("{url}: model {m:?} not found (404): {msg}"),
                    None => format!("{url}: not found (404): {msg}"),
                },
                _ => format!("{url}: HTTP {code}: {msg}"),
            }
        }
        ureq::Error::Transport(t) => transport_error(url, &t),
    }
}

fn transport_error(url: &str, t: &ureq::Transport) -> String {
    use std::error::Error as _;
    let io_kind = t
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(|e| e.kind());
    match (t.kind(), io_kind) {
        (_, Some(std::io::ErrorKind::ConnectionRefused)) => {
            format!("cannot connect to {url}: connection refused (is the server running?)")
        }
        (_, Some(std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)) => {
            format!("{url} did not answer in time (timeout)")
        }
        (ureq::ErrorKind::Dns, _) => format!("cannot resolve the host of {url}"),
        (ureq::ErrorKind::ConnectionFailed, _) => format!(
            "cannot connect to {url}: {}",
            t.message().unwrap_or("connection failed")
        ),
        _ => format!("{url}: {}", one_line(&t.to_string())),
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// The message of an error body: OpenAI's `{"error":{"message":…}}`, Ollama's
/// `{"error":"…"}`, or the text itself (cut short).
pub fn server_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        let e = &v["error"];
        if let Some(m) = e["message"]
            .as_str()
            .or(e.as_str())
            .or(v["detail"].as_str())
        {
            return one_line(m);
        }
    }
    let t = one_line(body);
    if t.is_empty() {
        "no message".into()
    } else {
        t.chars().take(200).collect()
    }
}

/// A model a server offers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RemoteModel {
    pub id: String,
    pub n_ctx: Option<usize>,
    pub n_ctx_train: Option<usize>,
    pub params: Option<u64>,
    pub size: Option<u64>,
    pub quant: Option<String>,
}

/// Models from `GET /v1/models` (llama-server adds a `meta` block with sizes).
pub fn parse_v1_models(body: &str) -> Result<Vec<RemoteModel>> {
    let v: serde_json::Value = serde_json::from_str(body).context("the model list is not JSON")?;
    let Some(data) = v["data"].as_array() else {
        bail!("the model list has no \"data\" array");
    };
    Ok(data
        .iter()
        .filter_map(|m| {
            let meta = &m["meta"];
            Some(RemoteModel {
                id: m["id"].as_str()?.to_string(),
                n_ctx: meta["n_ctx"]
                    .as_u64()
                    .or(m["max_model_len"].as_u64())
                    .map(|n| n as usize),
                n_ctx_train: meta["n_ctx_train"].as_u64().map(|n| n as usize),
                params: meta["n_params"].as_u64(),
                size: meta["size"].as_u64(),
                quant: meta["ftype"].as_str().map(str::to_string),
            })
        })
        .collect())
}

/// Models from Ollama's `GET /api/tags`.
pub fn parse_ollama_tags(body: &str) -> Result<Vec<RemoteModel>> {
    let v: serde_json::Value = serde_json::from_str(body).context("/api/tags is not JSON")?;
    let Some(models) = v["models"].as_array() else {
        bail!("/api/tags has no \"models\" array");
    };
    Ok(models
        .iter()
        .filter_map(|m| {
            Some(RemoteModel {
                id: m["name"].as_str().or(m["model"].as_str())?.to_string(),
                size: m["size"].as_u64(),
                quant: m["details"]["quantization_level"]
                    .as_str()
                    .map(str::to_string),
                ..Default::default()
            })
        })
        .collect())
}

/// Whether `want` names `id`: the same string, or (llama-server lists the file path) the
/// file name or its stem.
pub fn model_matches(id: &str, want: &str) -> bool {
    if id == want {
        return true;
    }
    let p = Path::new(id);
    p.file_name().is_some_and(|n| n == want) || p.file_stem().is_some_and(|n| n == want)
}

/// What a server is and what it serves.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub kind: Kind,
    pub models: Vec<RemoteModel>,
}

/// Asks the server what it is and which models it has: Ollama answers `/api/tags`, the
/// others `/v1/models` (llama-server's entries are `owned_by: llamacpp`, vLLM's `vllm`).
pub fn probe(agent: &ureq::Agent, ep: &Endpoint) -> Result<ServerInfo> {
    let v1 = get(agent, ep, "/v1/models");
    let body = match v1 {
        Ok(b) => b,
        Err(e) => {
            // Ollama serves /v1/models too; a server without it may still be Ollama.
            if let Ok(tags) = get(agent, ep, "/api/tags") {
                return Ok(ServerInfo {
                    kind: Kind::Ollama,
                    models: parse_ollama_tags(&tags)?,
                });
            }
            return Err(e);
        }
    };
    let models = parse_v1_models(&body).with_context(|| format!("{}/v1/models", ep.url))?;
    let owner = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["data"][0]["owned_by"].as_str().map(str::to_string))
        .unwrap_or_default();
    let kind = match owner.as_str() {
        "llamacpp" => Kind::LlamaServer,
        "vllm" => Kind::Vllm,
        "sglang" => Kind::Sglang,
        "library" | "ollama" => Kind::Ollama,
        _ if get(agent, ep, "/api/version").is_ok() => Kind::Ollama,
        _ => Kind::OpenAi,
    };
    Ok(ServerInfo { kind, models })
}

/// Marks a model name as the server's in a `Load` path (a llama-server on the same machine
/// lists its model by a path that is a file here too).
pub const REMOTE_PREFIX: &str = "remote:";

/// The `Load` path that asks the server for model `id`.
pub fn load_path(id: &str) -> PathBuf {
    PathBuf::from(format!("{REMOTE_PREFIX}{id}"))
}

/// The server's model named by a `Load` path made by [`load_path`].
pub fn remote_model(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix(REMOTE_PREFIX)
}

/// The host:port of a URL, for short labels.
pub fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized_and_checked() {
        assert_eq!(normalize_url("http://h:8080/v1/").unwrap(), "http://h:8080");
        assert_eq!(normalize_url("https://x.org").unwrap(), "https://x.org");
        assert!(normalize_url("ftp://x").is_err());
        assert!(normalize_url("http://").is_err());
    }

    #[test]
    fn models_match_by_path_name_or_stem() {
        let id = "/m/SmolLM2-135M-Instruct.Q4_1.gguf";
        assert!(model_matches(id, id));
        assert!(model_matches(id, "SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(model_matches(id, "SmolLM2-135M-Instruct.Q4_1"));
        assert!(!model_matches(id, "SmolLM2"));
    }

    #[test]
    fn error_bodies_become_one_line() {
        assert_eq!(
            server_message(
                r#"{"error":{"message":"File Not Found","type":"not_found_error","code":404}}"#
            ),
            "File Not Found"
        );
        assert_eq!(
            server_message(r#"{"error":"model 'x' not found"}"#),
            "model 'x' not found"
        );
        assert_eq!(server_message(""), "no message");
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let ep = Endpoint {
            name: "n".into(),
            url: "http://h".into(),
            model: None,
            api_key: Some("sk-secret".into()),
            timeout: DEFAULT_TIMEOUT,
        };
        assert!(!format!("{ep:?}").contains("sk-secret"));
    }
}
