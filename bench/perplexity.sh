#!/usr/bin/env bash
# tokentop perplexity against llama-perplexity on the same GGUFs, text, context and threads,
# printing both and their relative difference. SmolLM2 (Q4_1) is requantized with llama.cpp's
# llama-quantize --allow-requantize into the types users run, kept in target/ppl-models.
#   bench/perplexity.sh [-c 512] [-t THREADS] [-f TEXT] [TYPE...]
# TYPE: a llama-quantize type (Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0, ...), `Q4_1` for the
# file as shipped, or `gemma` for the Gemma 3 270M Q4_K_M file. Default: all of them.
# llama.cpp comes from ../shared/tools/llama-ref, or from $LLAMA_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
ctx=512 threads=$(nproc) text=bench/data/essays.txt
while getopts "c:t:f:" o; do
  case $o in c) ctx=$OPTARG;; t) threads=$OPTARG;; f) text=$OPTARG;; *) exit 2;; esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || set -- Q4_1 Q4_K_M Q5_K_M Q6_K Q8_0 Q4_0 gemma

cargo build --release -q
tt=$PWD/target/release/tokentop
bin=${LLAMA_BIN:-$(../shared/tools/llama-ref)}
base=$("$tt" pull smollm2-135m 2>/dev/null)
mkdir -p target/ppl-models
ppl_of() { sed -n 's/.*Final estimate: PPL = \([0-9.]*\) +\/- \([0-9.]*\).*/\1 \2/p' | tail -1; }
echo "text: $text, n_ctx=$ctx, threads=$threads, $(date -u +%Y-%m-%d), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo
echo "| file | llama-perplexity | tokentop perplexity | difference |"
echo "|---|---|---|---|"
for type in "$@"; do
  case $type in
    Q4_1) file=$base ;;
    gemma) file=$("$tt" pull gemma-3-270m 2>/dev/null) ;;
    *) file=target/ppl-models/smollm2-135m-$type.gguf
       [ -s "$file" ] || "$bin/llama-quantize" --allow-requantize "$base" "$file" "$type" "$threads" >/dev/null 2>&1 ;;
  esac
  read -r lp le < <("$bin/llama-perplexity" -m "$file" -f "$text" -c "$ctx" -t "$threads" 2>&1 | ppl_of)
  read -r tp te < <("$tt" perplexity -m "$file" -f "$text" -c "$ctx" 2>/dev/null | ppl_of)
  diff=$(python3 -c "print(f'{($tp - $lp) / $lp * 100:+.2f}%')")
  echo "| $(basename "$file") | $lp ± $le | $tp ± $te | $diff |"
done
