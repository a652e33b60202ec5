//! Every numeric option of every subcommand: a bad value is refused while the command line
//! is parsed, before any model is fetched or loaded, with one line `tokentop: error: …` and
//! exit status 1; never a panic.
mod common;

use std::process::{Command, Output, Stdio};

/// Runs the binary with a fresh, empty model store and no terminal.
fn tokentop_in(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tokentop"))
        .args(args)
        .env("TOKENTOP_HOME", home)
        .env_remove("TOKENTOP_CATALOG")
        .stdin(Stdio::null())
        .output()
        .expect("running tokentop")
}

/// Asserts the one-line error, exit 1, no panic, nothing on stdout and nothing written.
fn refused(args: &[&str], message: &str) {
    let home = tempfile::tempdir().unwrap();
    let out = tokentop_in(home.path(), args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        format!("tokentop: error: {message}\n"),
        "tokentop {args:?}"
    );
    assert_eq!(out.status.code(), Some(1), "tokentop {args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "tokentop {args:?}");
    assert!(!stderr.contains("panicked"));
    assert_eq!(
        std::fs::read_dir(home.path()).unwrap().count(),
        0,
        "tokentop {args:?} wrote into the model store"
    );
}

/// The generation options, shared by `run` and `ui`.
#[test]
fn generation_options_are_checked_at_parse_time() {
    let cases: &[(&[&str], &str)] = &[
        (&["-n", "0"], "invalid value '0' for '--max-tokens <MAX_TOKENS>': max tokens must be at least 1"),
        (&["--max-tokens", "-5"], "invalid value '-5' for '--max-tokens <MAX_TOKENS>': max tokens must be at least 1"),
        (&["-n", "99999999999999999999999"], "invalid value '99999999999999999999999' for '--max-tokens <MAX_TOKENS>': max tokens must be at most 16777216"),
        (&["-n", "ten"], "invalid value 'ten' for '--max-tokens <MAX_TOKENS>': max tokens must be a whole number"),
        (&["--temperature", "NaN"], "invalid value 'NaN' for '--temperature <TEMPERATURE>': temperature must be a finite number"),
        (&["--temperature", "inf"], "invalid value 'inf' for '--temperature <TEMPERATURE>': temperature must be a finite number"),
        (&["--temperature", "-1"], "invalid value '-1' for '--temperature <TEMPERATURE>': temperature must be 0 (greedy) or from 0.001 to 100"),
        (&["--temperature", "1e-40"], "invalid value '1e-40' for '--temperature <TEMPERATURE>': temperature must be 0 (greedy) or from 0.001 to 100"),
        (&["--temperature", "1000"], "invalid value '1000' for '--temperature <TEMPERATURE>': temperature must be 0 (greedy) or from 0.001 to 100"),
        (&["--top-p", "0"], "invalid value '0' for '--top-p <TOP_P>': top-p must be above 0 and at most 1 (1 turns it off)"),
        (&["--top-p", "1.5"], "invalid value '1.5' for '--top-p <TOP_P>': top-p must be above 0 and at most 1 (1 turns it off)"),
        (&["--top-p", "NaN"], "invalid value 'NaN' for '--top-p <TOP_P>': top-p must be a finite number"),
        (&["--top-k", "-1"], "invalid value '-1' for '--top-k <TOP_K>': top-k must be 0 or more"),
        (&["--repeat-penalty", "0"], "invalid value '0' for '--repeat-penalty <REPEAT_PENALTY>': repeat penalty must be from 0.01 to 100 (1 turns it off)"),
        (&["--repeat-penalty", "NaN"], "invalid value 'NaN' for '--repeat-penalty <REPEAT_PENALTY>': repeat penalty must be a finite number"),
        (&["--repeat-penalty", "-2"], "invalid value '-2' for '--repeat-penalty <REPEAT_PENALTY>': repeat penalty must be from 0.01 to 100 (1 turns it off)"),
        (&["--repeat-last-n", "x"], "invalid value 'x' for '--repeat-last-n <REPEAT_LAST_N>': repeat-last-n must be a whole number"),
        (&["--ctx", "0"], "invalid value '0' for '--ctx <CTX>': context length must be at least 1"),
        (&["--ctx", "18446744073709551615"], "invalid value '18446744073709551615' for '--ctx <CTX>': context length must be at most 16777216"),
        (&["--seed", "-1"], "invalid value '-1' for '--seed <SEED>': seed must be a whole number from 0 to 18446744073709551615"),
        (&["--cache-type-k", "q4_0"], "invalid value 'q4_0' for '--cache-type-k <TYPE>' [possible values: f16, q8_0, f32]; a similar value exists: 'q8_0'"),
        (&["--cache-type-v", "int4"], "invalid value 'int4' for '--cache-type-v <TYPE>' [possible values: f16, q8_0, f32]"),
    ];
    for (opts, message) in cases {
        for cmd in [&["run", "--prompt", "hi"][..], &["ui"][..]] {
            let args: Vec<&str> = cmd.iter().chain(opts.iter()).copied().collect();
            refused(&args, message);
        }
    }
}

#[test]
fn bench_options_are_checked_before_any_model_is_fetched() {
    let cases: &[(&[&str], &str)] = &[
        (&["-p", "0", "-n", "0"], "nothing to measure: every -p and -n is 0"),
        (&["-p", "0,0", "-n", "0"], "nothing to measure: every -p and -n is 0"),
        (&["-d", "18446744073709551615"], "invalid value '18446744073709551615' for '--n-depth <DEPTH>': depth must be at most 16777216"),
        (&["-d", "0,99999999999999999999"], "invalid value '99999999999999999999' for '--n-depth <DEPTH>': depth must be at most 16777216"),
        (&["-p", "18446744073709551615"], "invalid value '18446744073709551615' for '--n-prompt <N_PROMPT>': prompt length must be at most 16777216"),
        (&["-n", "-1"], "invalid value '-1' for '--n-gen <N_GEN>': tokens to generate must be 0 or more"),
        (&["-t", "0"], "invalid value '0' for '--threads <THREADS>': threads must be at least 1"),
        (&["-t", "2,100000"], "invalid value '100000' for '--threads <THREADS>': threads must be at most 1024"),
        (&["-r", "0"], "invalid value '0' for '--repetitions <REPS>': repetitions must be at least 1"),
        (&["-o", "xml"], "invalid value 'xml' for '--output <OUTPUT>' [possible values: md, csv, json, jsonl]"),
        (&["--cache-type-k", "bf16"], "invalid value 'bf16' for '--cache-type-k <TYPE>' [possible values: f16, q8_0, f32]; a similar value exists: 'f16'"),
    ];
    for (opts, message) in cases {
        let args: Vec<&str> = ["bench"].iter().chain(opts.iter()).copied().collect();
        refused(&args, message);
    }
}

/// Usage errors are one line and exit 1 too (not clap's usage block and status 2), with
/// clap's tip kept; help and version still print normally with status 0.
#[test]
fn usage_errors_are_one_line() {
    refused(
        &["run", "--promt", "hi"],
        "unexpected argument '--promt' found; a similar argument exists: '--prompt'",
    );
    refused(
        &["pull"],
        "the following required arguments were not provided: <MODEL>",
    );
    refused(&["frobnicate"], "unrecognized subcommand 'frobnicate'");
    let home = tempfile::tempdir().unwrap();
    for args in [&["--help"][..], &["run", "--help"], &["--version"]] {
        let out = tokentop_in(home.path(), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty() && out.stderr.is_empty(), "{args:?}");
    }
}
