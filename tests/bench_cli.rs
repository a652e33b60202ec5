//! `tokentop bench` on a synthetic model: llama-bench's tests and fields, a thread matrix
//! run in child processes.
mod common;

use tokentop::bench::Row;

#[test]
fn bench_matrix_in_llama_bench_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(
        dir.path(),
        &tokentop::engine::synth::SynthSpec::new("qwen3"),
    );
    let out = common::tokentop(&[
        "bench",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "16",
        "-n",
        "4",
        "-d",
        "0,8",
        "-r",
        "2",
        "-t",
        "1,2",
        "-o",
        "jsonl",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Row> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<(usize, String)> = rows.iter().map(|r| (r.n_threads, r.test())).collect();
    let want: Vec<(usize, String)> = [1, 2]
        .into_iter()
        .flat_map(|t| ["pp16", "tg4", "pp16 @ d8", "tg4 @ d8"].map(|n| (t, n.to_string())))
        .collect();
    assert_eq!(names, want);
    for r in &rows {
        assert_eq!(r.samples_ts.len(), 2);
        assert!(
            r.avg_ts > 0.0
                && r.ttft_ms > 0.0
                && r.load_ms > 0.0
                && r.model_type.starts_with("qwen3"),
            "{r:?}"
        );
        assert_eq!(r.backends, "CPU");
    }
    let md = common::tokentop(&[
        "bench",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "8",
        "-n",
        "0",
        "-r",
        "1",
    ]);
    let md = String::from_utf8_lossy(&md.stdout);
    assert!(
        md.starts_with("| model") && md.contains("|             pp8 |") && md.contains("load s |"),
        "{md}"
    );
}

/// Depths and lengths beyond the model's context (512 tokens here) are an error naming the
/// file, not a panic; the largest depth the command line takes cannot overflow the sums.
#[test]
fn bench_beyond_the_context_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synth(
        dir.path(),
        &tokentop::engine::synth::SynthSpec::new("llama"),
    );
    let p = path.to_str().unwrap();
    for depth in ["600", "16777216"] {
        let out = common::tokentop(&[
            "bench", "-m", p, "-p", "0", "-n", "16777216", "-d", depth, "-r", "1", "-t", "1",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(
            stderr,
            format!(
                "tokentop: error: {p}: depth {depth} + 16777216 tokens exceed the model's context of 512\n"
            )
        );
    }
}
