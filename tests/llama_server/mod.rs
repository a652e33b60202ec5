//! A real llama-server on 127.0.0.1 serving SmolLM2, for the remote-backend and `top` tests.
//! The binary is $LLAMA_SERVER, else the one in $LLAMA_BIN, else the one
//! `../shared/tools/llama-ref` builds (CI runs that first). Without it the tests fail, unless
//! TOKENTOP_SKIP_REAL_MODELS=1 (then they print SKIPPED), as the real-model tests do.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    /// llama.cpp's tokens for `text` (`/tokenize`: special tokens parsed, no BOS added).
    #[allow(dead_code)]
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let body = serde_json::json!({ "content": text, "add_special": false });
        let reply = ureq::post(&format!("{}/tokenize", self.url))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap()
            .into_string()
            .unwrap();
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        reply["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    }

    /// Kills the server (as a crash would: SIGKILL, no goodbye to clients).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn skip(why: &str) -> Option<Server> {
    if std::env::var_os("TOKENTOP_SKIP_REAL_MODELS").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: llama-server ({why}; TOKENTOP_SKIP_REAL_MODELS=1)");
        return None;
    }
    panic!("cannot start llama-server for the tests: {why} (set LLAMA_SERVER, or TOKENTOP_SKIP_REAL_MODELS=1 to skip)");
}

fn binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("LLAMA_SERVER") {
        return Ok(PathBuf::from(p));
    }
    tool("llama-server")
}

/// One of llama.cpp's programs: from $LLAMA_BIN, else from the folder
/// `../shared/tools/llama-ref` builds.
pub fn tool(name: &str) -> Result<PathBuf, String> {
    let dir = match std::env::var_os("LLAMA_BIN") {
        Some(d) => PathBuf::from(d),
        None => {
            let tool = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/llama-ref");
            let out = Command::new(&tool)
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("running {}: {e}", tool.display()))?;
            if !out.status.success() {
                return Err(format!("{} failed", tool.display()));
            }
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let bin = dir.join(name);
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("no {name} in {}", dir.display()))
    }
}

/// Starts llama-server with `extra` arguments and waits until it answers /health.
pub fn start(extra: &[&str]) -> Option<Server> {
    let model = super::common::smollm2()?;
    start_model(&model, extra)
}

/// Starts llama-server on `model` (a synthetic file, say) like `start`.
pub fn start_model(model: &std::path::Path, extra: &[&str]) -> Option<Server> {
    let bin = match binary() {
        Ok(b) => b,
        Err(e) => return skip(&e),
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(&bin)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--metrics", "--slots", "-t", "1", "-c", "2048", "-np", "1"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let url = format!("http://127.0.0.1:{port}");
    let mut server = Server { child, url };
    let t0 = Instant::now();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build();
    loop {
        match agent.get(&format!("{}/health", server.url)).call() {
            Ok(r) if r.status() == 200 => return Some(server),
            // 401 with --api-key: it is up.
            Err(ureq::Error::Status(401, _)) => return Some(server),
            _ => {}
        }
        if let Ok(Some(st)) = server.child.try_wait() {
            panic!("llama-server exited at start: {st}");
        }
        if t0.elapsed() > Duration::from_secs(120) {
            server.kill();
            panic!("llama-server did not come up in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each step of a `/completion` reply made with `n_probs`: the token llama.cpp chose and its
/// top log-probabilities as (token id, log-probability).
pub fn greedy_steps(reply: &serde_json::Value) -> Vec<(u32, Vec<(u32, f64)>)> {
    let steps = reply["completion_probabilities"]
        .as_array()
        .unwrap_or_else(|| panic!("no completion_probabilities in {reply}"));
    steps
        .iter()
        .map(|s| {
            let top = s["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["id"].as_u64().unwrap() as u32,
                        t["logprob"].as_f64().unwrap(),
                    )
                })
                .collect();
            (s["id"].as_u64().unwrap() as u32, top)
        })
        .collect()
}

/// The body of a greedy `/completion` of `prompt` for `n` tokens with the top 10 of each step,
/// the prompt cache off and the ids below `vocab` that `banned` names never chosen (a ban
/// changes only the choice: the reported log-probabilities are of the raw logits).
pub fn greedy_request(
    prompt: &[u32],
    n: usize,
    vocab: u32,
    banned: impl Fn(u32) -> bool,
) -> serde_json::Value {
    let bias: Vec<serde_json::Value> = (0..vocab)
        .filter(|&id| banned(id))
        .map(|id| serde_json::json!([id, false]))
        .collect();
    serde_json::json!({
        "prompt": prompt,
        "n_predict": n,
        "temperature": 0.0,
        "n_probs": 10,
        "ignore_eos": true,
        "logit_bias": bias,
        "cache_prompt": false,
    })
}

/// llama-server's greedy completion (`greedy_request`) on `model`, with an f32 KV cache and no
/// flash attention as the parity tests' tokentop side keeps (llama.cpp's CPU flash attention
/// rounds to f16 on the way): per step, the token it chose and its top 10. None where no
/// llama-server runs here (the caller skips).
#[allow(clippy::type_complexity)]
pub fn f32_greedy_steps(
    model: &std::path::Path,
    prompt: &[u32],
    n: usize,
    vocab: u32,
    banned: impl Fn(u32) -> bool,
) -> Option<Vec<(u32, Vec<(u32, f64)>)>> {
    let server = start_model(model, &["-ctk", "f32", "-ctv", "f32", "-fa", "off"])?;
    let body = greedy_request(prompt, n, vocab, banned);
    let reply = ureq::post(&format!("{}/completion", server.url))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap_or_else(|e| panic!("llama-server /completion: {e}"))
        .into_string()
        .unwrap();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    Some(greedy_steps(&reply))
}
