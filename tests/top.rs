//! `tokentop top`: /metrics, /slots and /api/ps parsers on recorded real outputs
//! (tests/data/remote/README.md says where each comes from), and the screen over a real
//! llama-server while it answers.

mod common;
mod llama_server;

use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokentop::remote::metrics;
use tokentop::remote::watch::{self, TopState};
use tokentop::remote::Kind;
use tokentop::top;

fn data(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/remote")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn llama_server_metrics() {
    let m = metrics::parse(&data("llama_server_metrics.txt")).unwrap();
    assert_eq!(m.kind, Some(Kind::LlamaServer));
    assert_eq!(m.prompt_tokens, Some(36.0));
    assert_eq!(m.generation_tokens, Some(12.0));
    assert_eq!(m.running, Some(0.0));
    assert_eq!(m.waiting, Some(0.0));
    // This llama-server has no KV cache gauge and no histograms.
    assert_eq!(m.kv_usage, None);
    assert_eq!(m.ttft, None);
    let busy = metrics::parse(&data("llama_server_metrics_busy.txt")).unwrap();
    assert_eq!(busy.running, Some(1.0));
}

#[test]
fn llama_server_slots() {
    let busy = watch::parse_slots(&data("llama_server_slots_busy.json")).unwrap();
    assert_eq!((busy.total, busy.busy, busy.decoding), (1, 1, 81));
    assert_eq!(busy.prompting, 14);
    // 119 prompt tokens and 81 generated in a 2048-token slot.
    assert_eq!((busy.in_context, busy.n_ctx), (200, 2048));
    let idle = watch::parse_slots(&data("llama_server_slots_idle.json")).unwrap();
    assert_eq!((idle.total, idle.busy, idle.decoding), (1, 0, 0));
    assert!(watch::parse_slots("{}").is_err());
}

#[test]
fn vllm_metrics() {
    let m = metrics::parse(&data("vllm_bloom_metrics.txt")).unwrap();
    assert_eq!(m.kind, Some(Kind::Vllm));
    assert_eq!(m.models, vec!["bigscience/bloom-560m".to_string()]);
    assert_eq!(m.prompt_tokens, Some(1196.0));
    assert_eq!(m.generation_tokens, Some(218152.0));
    let ttft = m.ttft.expect("the TTFT histogram");
    assert_eq!(ttft.count(), 213.0);
    // 112 of 213 first tokens within 20 ms, 211 within 40 ms: the median is just under 20 ms
    // (bucket 0.01–0.02, linear), the 90th percentile between 20 and 40 ms.
    let p50 = ttft.quantile(0.5).unwrap();
    assert!((p50 - (0.01 + 0.01 * 106.5 / 112.0)).abs() < 1e-9, "{p50}");
    let p90 = ttft.quantile(0.9).unwrap();
    assert!(p90 > 0.02 && p90 < 0.04, "{p90}");

    let q = metrics::parse(&data("vllm_qwen_metrics.txt")).unwrap();
    assert_eq!(q.kind, Some(Kind::Vllm));
    assert_eq!(
        q.models,
        vec!["Qwen/Qwen2.5-Coder-32B-Instruct".to_string()]
    );
    assert_eq!(
        (q.running, q.waiting, q.kv_usage),
        (Some(0.0), Some(0.0), Some(0.0))
    );
}

#[test]
fn ollama_ps() {
    let ps = watch::parse_ollama_ps(&data("ollama_ps.json")).unwrap();
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0].name, "mistral:latest");
    assert_eq!(ps[0].size, 5137025024);
    assert_eq!(ps[0].size_vram, 5137025024);
    assert_eq!(ps[0].expires_at, "2024-06-04T14:38:31.83753-07:00");
    assert!(watch::parse_ollama_ps("[]").is_err());
}

#[test]
fn rates_are_counters_differenced_and_a_server_that_goes_is_down() {
    let mut st = TopState::new(&["http://a".to_string()]);
    let t0 = Instant::now();
    let reading = |gen: f64| watch::Reading {
        kind: Some(Kind::Vllm),
        gen_total: Some(gen),
        prompt_total: Some(100.0),
        ..Default::default()
    };
    st.update(0, t0, Ok(reading(1000.0)));
    st.update(0, t0 + Duration::from_secs(2), Ok(reading(1100.0)));
    assert_eq!(st.servers[0].gen_rate, Some(50.0));
    assert_eq!(st.servers[0].prompt_rate, Some(0.0));
    // A restart (counter back to 0) gives no rate rather than a negative one.
    st.update(0, t0 + Duration::from_secs(3), Ok(reading(5.0)));
    assert_eq!(st.servers[0].gen_rate, None);
    st.update(
        0,
        t0 + Duration::from_secs(4),
        Err("connection refused".into()),
    );
    let lines = st.servers[0].lines();
    assert_eq!(
        lines,
        vec!["http://a  DOWN: connection refused".to_string()]
    );
    assert_eq!(st.servers[0].gen_hist.len(), 3);
}

#[test]
fn top_shows_a_real_servers_rates_while_it_answers() {
    let Some(mut server) = llama_server::start(&[]) else {
        return;
    };
    let url = server.url.clone();
    // A long answer in the background.
    let body = serde_json::json!({
        "model": "m", "stream": false, "max_tokens": 300, "temperature": 0, "ignore_eos": true,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
    })
    .to_string();
    let chat_url = format!("{url}/v1/chat/completions");
    let bg = std::thread::spawn(move || {
        let _ = ureq::post(&chat_url)
            .set("Content-Type", "application/json")
            .send_string(&body);
    });
    let agent = tokentop::remote::agent(Duration::from_secs(2));
    let mut st = TopState::new(std::slice::from_ref(&url));
    let t0 = Instant::now();
    let mut seen = None;
    while t0.elapsed() < Duration::from_secs(60) {
        let at = Instant::now();
        let r = watch::poll(&agent, &url).expect("the server is up");
        st.update(0, at, Ok(r));
        let s = &st.servers[0];
        if s.reading.as_ref().and_then(|r| r.running) == Some(1.0)
            && s.gen_rate.is_some_and(|g| g > 0.0)
        {
            seen = Some(s.lines());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let lines = seen.expect("a generation rate while the request ran");
    assert!(lines[0].contains("llama-server  up"), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("1 running")), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("  generation: ") && l.ends_with("tok/s")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("SmolLM2")), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("  KV cache:   ≈") && l.contains("/slots")),
        "{lines:?}"
    );

    // The screen draws the same, with its sparklines.
    let backend = ratatui::backend::TestBackend::new(100, 14);
    let mut term = ratatui::Terminal::new(backend).unwrap();
    term.draw(|f| top::render(&st, f)).unwrap();
    let screen: String = term
        .backend()
        .buffer()
        .content()
        .iter()
        .map(|c| c.symbol())
        .collect();
    assert!(screen.contains("generation"), "{screen}");
    assert!(screen.contains("1 running"), "{screen}");

    // The binary's batch mode, while the answer may still run.
    let out = common::tokentop(&["top", "--batch", "-n", "2", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("llama-server  up").count(), 2, "{text}");

    // Gone: shown as down, not a crash.
    server.kill();
    let r = watch::poll(&agent, &url);
    st.update(0, Instant::now(), r);
    assert!(
        st.servers[0].lines()[0].contains("DOWN: cannot connect"),
        "{:?}",
        st.servers[0].lines()
    );
    let out = common::tokentop(&["top", "--batch", "-n", "1", &url]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("DOWN"));
    let _ = bg.join();
}
