#!/usr/bin/env bash
# Load time and peak memory, tokentop against llama.cpp, on the same GGUFs, interleaved round by
# round with a warm page cache (the file is read once before the first round). Usage:
#   bench/load-vs-llama-cpp.sh [-r ROUNDS] [-t THREADS] MODEL...
# MODEL is a catalog id or a .gguf path. tokentop's time is `tokentop bench -p 1 -n 1`'s load
# column (opening the file and building the weights). llama.cpp's is taken from the timestamps
# of llama-completion's verbose log: from "load the model" to "constructing llama_context" (the
# header, mmap, and repacking into its CPU_REPACK buffers), for a one-token answer. The "load
# time" its perf summary prints is not that (it is a few ms however long the weights took).
# Peak RSS of both is /usr/bin/time's maximum resident set size, over the file's size.
# llama.cpp sizes its KV cache for its default context while tokentop's bench sizes it for
# the test, so llama.cpp's RSS column is not like for like.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 threads=$(nproc)
while getopts "r:t:" o; do
  case $o in r) rounds=$OPTARG;; t) threads=$OPTARG;; *) exit 2;; esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || set -- smollm2-135m gemma-3-270m
[ -x /usr/bin/time ] || { echo "bench/load-vs-llama-cpp.sh: needs /usr/bin/time (apt install time)" >&2; exit 1; }

cargo build --release -q
tt=$PWD/target/release/tokentop
bin=${LLAMA_BIN:-$(../shared/tools/llama-ref)}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for model in "$@"; do
  path=$("$tt" pull "$model" 2>/dev/null)
  cat "$path" >/dev/null
  for _ in $(seq "$rounds"); do
    /usr/bin/time -f "rss_kb %M" -o "$out/lt" "$bin/llama-completion" -m "$path" -p hi -n 1 \
      -t "$threads" --no-warmup -no-cnv -v </dev/null >/dev/null 2>"$out/l"
    # Log timestamps are minutes.seconds.milliseconds.microseconds.
    ms=$(grep -a -E 'load the model|llama_context: constructing' "$out/l" | python3 -c '
import sys
t = [sum(int(x) * f for x, f in zip(l.split()[0].split("."), (60e3, 1e3, 1, 1e-3))) for l in sys.stdin]
print(f"{t[-1] - t[0]:.1f}")')
    kb=$(sed -n 's/^rss_kb \([0-9]*\)/\1/p' "$out/lt")
    printf 'llama.cpp\t%s\t%s\t%s\n' "$model" "$ms" "$kb" >>"$out/rows"
    /usr/bin/time -f "rss_kb %M" -o "$out/t" "$tt" bench -m "$path" -p 1 -n 1 -r 1 -t "$threads" \
      -o jsonl </dev/null >"$out/j"
    ms=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["load_ms"])' "$out/j")
    kb=$(sed -n 's/^rss_kb \([0-9]*\)/\1/p' "$out/t")
    printf 'tokentop\t%s\t%s\t%s\n' "$model" "$ms" "$kb" >>"$out/rows"
  done
  printf 'size\t%s\t%s\t0\n' "$model" "$(stat -c %s "$path")" >>"$out/rows"
done
python3 - "$out/rows" "$rounds" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    tool, model, ms, kb = line.rstrip("\n").split("\t")
    rows.setdefault(model, {}).setdefault(tool, []).append((float(ms), int(kb)))
print(f"| model | file MB | llama.cpp load ms (min–max of {sys.argv[2]}) | tokentop load ms | tokentop / llama.cpp (medians) | llama.cpp peak RSS / file | tokentop peak RSS / file |")
print("|---|---|---|---|---|---|---|")
med = lambda v: sorted(v)[len(v) // 2]
for model, by in rows.items():
    size = by["size"][0][0]
    l, t = by["llama.cpp"], by["tokentop"]
    lm, tm = [x[0] for x in l], [x[0] for x in t]
    lr, tr = max(x[1] for x in l) * 1024 / size, max(x[1] for x in t) * 1024 / size
    print(f"| {model} | {size / 1e6:.0f} | {min(lm):.0f}–{max(lm):.0f} | {min(tm):.0f}–{max(tm):.0f} | {med(tm) / med(lm):.2f}x | {lr:.2f}x | {tr:.2f}x |")
PY
