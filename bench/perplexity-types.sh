#!/usr/bin/env bash
# The quant types of issue 13 (Q2_K, Q3_K, IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS,
# IQ2_S, IQ1_S, IQ1_M, MXFP4) on real weights: SmolLM2-135M (Q4_1) requantized by llama.cpp's
# llama-quantize --allow-requantize --pure into each (an importance matrix from llama-imatrix on
# the text for every type; the IQ1/IQ2/IQ3_XXS types need one), then
#   - perplexity: `tokentop perplexity` against `llama-perplexity` (must agree within 1%);
#   - decode speed: `tokentop bench -n 128` against `llama-bench -n 128`, one run each.
# SmolLM2's rows of 576 are not whole 256-blocks: llama-quantize stores those matrices in a
# fallback type (IQ4_NL for the IQ types, Q4_0 for the K-quants) and only ffn_down (rows of
# 1536) in the type itself; the table names what each file holds. MXFP4 (32-blocks) is every
# attention and feed-forward matrix.
#   bench/perplexity-types.sh [-c 512] [-t 2] [-k CHUNKS] [-f TEXT] [TYPE...]
# Files are kept in target/ppl-models. llama.cpp comes from ../shared/tools/llama-ref or $LLAMA_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
ctx=512 threads=2 text=bench/data/essays.txt chunks=
while getopts "c:t:k:f:" o; do
  case $o in c) ctx=$OPTARG;; t) threads=$OPTARG;; k) chunks=$OPTARG;; f) text=$OPTARG;; *) exit 2;; esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || set -- Q2_K Q3_K IQ4_NL IQ4_XS IQ3_XXS IQ3_S IQ2_XXS IQ2_XS IQ2_S IQ1_S IQ1_M MXFP4

cargo build --release -q
tt=$PWD/target/release/tokentop
bin=${LLAMA_BIN:-$(../shared/tools/llama-ref)}
base=$("$tt" pull smollm2-135m 2>/dev/null)
dir=target/ppl-models
mkdir -p "$dir"
imatrix=$dir/smollm2-135m.imatrix.gguf
[ -s "$imatrix" ] || "$bin/llama-imatrix" -m "$base" -f "$text" -o "$imatrix" -c 256 -t "$threads" >/dev/null 2>&1
ppl_of() { sed -n 's/.*Final estimate: PPL = \([0-9.]*\) +\/- \([0-9.]*\).*/\1 \2/p' | tail -1; }
tg_of() { python3 -c 'import json,sys; print(f"{json.loads(sys.stdin.readline())[sys.argv[1]]:.1f}")' "$1"; }
llama_chunks=() tt_chunks=()
[ -z "$chunks" ] || { llama_chunks=(--chunks "$chunks"); tt_chunks=(--chunks "$chunks"); }
echo "text: $text, n_ctx=$ctx${chunks:+, $chunks chunks}, threads=$threads, $(date -u +%Y-%m-%d), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo
echo "| type | tensors (type: count) | llama-perplexity | tokentop perplexity | difference | llama-bench tg128 t/s | tokentop tg128 t/s | ratio |"
echo "|---|---|---|---|---|---|---|---|"
for type in "$@"; do
  file=$dir/smollm2-135m-$type.gguf
  if [ ! -s "$file" ]; then
    case $type in
      # ggml type -> llama-quantize file type: IQ2_S is the default of IQ2_M (IQ2_S gives IQ2_XS)
      IQ2_S) args=(--pure --imatrix "$imatrix" "$base" "$file" IQ2_M) ;;
      Q3_K) args=(--pure --imatrix "$imatrix" "$base" "$file" Q3_K_S) ;;
      MXFP4) args=(--tensor-type 'ffn_.*=mxfp4' --tensor-type 'attn_.*=mxfp4' "$base" "$file" Q8_0) ;;
      *) args=(--pure --imatrix "$imatrix" "$base" "$file" "$type") ;;
    esac
    "$bin/llama-quantize" --allow-requantize "${args[@]}" "$threads" >/dev/null 2>&1
  fi
  held=$(python3 - "$file" <<'PY'
import sys, struct, collections
# the tensor types of a GGUF (v2/v3 header), without a dependency
f = open(sys.argv[1], 'rb'); r = lambda n: f.read(n)
u32 = lambda: struct.unpack('<I', r(4))[0]; u64 = lambda: struct.unpack('<Q', r(8))[0]
names = {0:'F32',1:'F16',2:'Q4_0',3:'Q4_1',6:'Q5_0',7:'Q5_1',8:'Q8_0',10:'Q2_K',11:'Q3_K',12:'Q4_K',
         13:'Q5_K',14:'Q6_K',16:'IQ2_XXS',17:'IQ2_XS',18:'IQ3_XXS',19:'IQ1_S',20:'IQ4_NL',21:'IQ3_S',
         22:'IQ2_S',23:'IQ4_XS',29:'IQ1_M',30:'BF16',39:'MXFP4'}
assert r(4) == b'GGUF'; u32(); nt = u64(); nkv = u64()
def skip(t):
    if t in (0, 1, 7): r(1)
    elif t in (2, 3): r(2)
    elif t in (4, 5, 6): r(4)
    elif t in (10, 11, 12): r(8)
    elif t == 8: r(u64())
    elif t == 9:
        et = u32(); n = u64()
        for _ in range(n): skip(et)
for _ in range(nkv):
    r(u64()); skip(u32())
c = collections.Counter()
for _ in range(nt):
    r(u64()); nd = u32(); [u64() for _ in range(nd)]; c[names.get(u32(), '?')] += 1; u64()
print(', '.join(f'{k}: {v}' for k, v in c.most_common() if k != 'F32'))
PY
)
  read -r lp le < <("$bin/llama-perplexity" -m "$file" -f "$text" -c "$ctx" -t "$threads" "${llama_chunks[@]}" 2>&1 | ppl_of)
  read -r tp te < <("$tt" perplexity -m "$file" -f "$text" -c "$ctx" "${tt_chunks[@]}" 2>/dev/null | ppl_of)
  diff=$(python3 -c "print(f'{($tp - $lp) / $lp * 100:+.2f}%')")
  ltg=$("$bin/llama-bench" -m "$file" -p 0 -n 128 -t "$threads" -r 1 -o jsonl 2>/dev/null | tg_of avg_ts)
  ttg=$("$tt" bench -m "$file" -p 0 -n 128 -t "$threads" -r 1 -o jsonl 2>/dev/null | tg_of avg_ts)
  ratio=$(python3 -c "print(f'{$ttg / $ltg:.2f}x')")
  echo "| $type | $held | $lp ± $le | $tp ± $te | $diff | $ltg | $ttg | $ratio |"
done
