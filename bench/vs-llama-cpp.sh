#!/usr/bin/env bash
# tokentop bench against llama-bench on the same GGUFs and thread count, interleaved rep by
# rep, printing t/s per test and the ratio. Usage:
#   bench/vs-llama-cpp.sh [-r REPS] [-t THREADS] [-p 512] [-n 128] [-d 0,4096] MODEL...
# MODEL is a catalog id or a .gguf path. llama.cpp comes from ../shared/tools/llama-ref, or
# from $LLAMA_BIN (a folder holding llama-bench) when that build cannot run on this CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=5 threads=$(nproc) pp=512 tg=128 depth=0
while getopts "r:t:p:n:d:" o; do
  case $o in r) reps=$OPTARG;; t) threads=$OPTARG;; p) pp=$OPTARG;; n) tg=$OPTARG;; d) depth=$OPTARG;; *) exit 2;; esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || set -- smollm2-135m gemma-3-270m

cargo build --release -q
tt=$PWD/target/release/tokentop
bin=${LLAMA_BIN:-$(../shared/tools/llama-ref)}
lb=$bin/llama-bench
# The shared build enables AVX-VNNI; CPUs with AVX512-VNNI but not AVX-VNNI (AMD EPYC
# here) die with SIGILL. Say so instead of printing nonsense ratios.
if ! "$lb" --help >/dev/null 2>&1 || ! "$lb" -m "$("$tt" pull "$1" 2>/dev/null)" -p 8 -n 0 -r 1 -t 1 >/dev/null 2>&1; then
  echo "llama-bench in $bin does not run on this CPU (SIGILL?); rebuild llama.cpp with -DGGML_AVX_VNNI=OFF and set LLAMA_BIN" >&2
  exit 1
fi

out=$(mktemp -d)
for model in "$@"; do
  path=$("$tt" pull "$model" 2>/dev/null)
  for rep in $(seq "$reps"); do
    "$lb" -m "$path" -p "$pp" -n "$tg" -d "$depth" -t "$threads" -r 1 -o jsonl 2>/dev/null | sed "s|^|llama.cpp\t$model\t|" >> "$out/rows"
    "$tt" bench -m "$path" -p "$pp" -n "$tg" -d "$depth" -t "$threads" -r 1 -o jsonl | sed "s|^|tokentop\t$model\t|" >> "$out/rows"
  done
done
python3 - "$out/rows" "$threads" <<'PY'
import json, sys, statistics as st
rows = {}
for line in open(sys.argv[1]):
    tool, model, js = line.rstrip("\n").split("\t", 2)
    r = json.loads(js)
    test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    if r.get("n_depth"):
        test += f" @ d{r['n_depth']}"
    rows.setdefault((model, test), {}).setdefault(tool, []).append(r["avg_ts"])
print(f"| model | test | threads | llama.cpp t/s | tokentop t/s | tokentop / llama.cpp |")
print("|---|---|---|---|---|---|")
for (model, test), by in rows.items():
    l, t = by.get("llama.cpp", [0]), by.get("tokentop", [0])
    ml, mt = st.mean(l), st.mean(t)
    sd = lambda v: st.stdev(v) if len(v) > 1 else 0.0
    print(f"| {model} | {test} | {sys.argv[2]} | {ml:.2f} ± {sd(l):.2f} | {mt:.2f} ± {sd(t):.2f} | {mt/ml if ml else 0:.2f}x |")
PY
rm -rf "$out"
