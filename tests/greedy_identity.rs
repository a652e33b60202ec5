//! Greedy generations of the real models, pinned: the speed work (own kernels, fused and
//! repacked matmuls) reproduces candle's arithmetic bit for bit, so these texts, recorded
//! before it, must not change.
mod common;

fn greedy(model: &std::path::Path) -> String {
    let out = common::tokentop(&[
        "run",
        model.to_str().unwrap(),
        "--prompt",
        "Write a short poem about the sea.",
        "--temperature",
        "0",
        "-n",
        "48",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn smollm2_greedy_text_is_unchanged() {
    let Some(path) = common::smollm2() else {
        return;
    };
    assert_eq!(greedy(&path), include_str!("data/smollm2-sea.txt"));
}

#[test]
fn gemma_greedy_text_is_unchanged() {
    let Some(path) = common::gemma() else { return };
    assert_eq!(greedy(&path), include_str!("data/gemma-sea.txt"));
}
