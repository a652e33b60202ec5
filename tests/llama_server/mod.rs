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
