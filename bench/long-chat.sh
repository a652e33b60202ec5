#!/usr/bin/env bash
# Cost of a long chat in the TUI (issue 9 item 10): a 10 MB session is reopened (F4), then
#  - idle CPU: utime+stime of the tokentop process from /proc/PID/stat over 30 s untouched;
#  - key-to-screen: time from `tmux send-keys` of one character to `capture-pane` showing it,
#    over 20 keys typed one at a time (capture-pane is polled every few ms, so each figure
#    includes up to one poll interval and tmux's own latency).
# Usage: bench/long-chat.sh [MODEL.gguf] [MB]   (MODEL defaults to the first GGUF in
# $TOKENTOP_HOME/models; the session is written to a temporary TOKENTOP_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
# TOKENTOP_BIN=path measures another build (an older commit, say).
bin=${TOKENTOP_BIN:-}
[ -n "$bin" ] || { cargo build --release -q; bin=$PWD/target/release/tokentop; }
model=${1:-$(ls "${TOKENTOP_HOME:?set TOKENTOP_HOME or give a model}"/models/*.gguf | head -1)}
mb=${2:-10}
home=$(mktemp -d)
session=tokentop-longchat-$$
trap 'tmux kill-session -t $session 2>/dev/null || true; rm -rf "$home"' EXIT
mkdir -p "$home/sessions"

# A session of about $mb MB: turns of markdown prose, lists and code, like long answers.
python3 - "$home/sessions/session-1.jsonl" "$mb" <<'PY'
import json, sys
path, mb = sys.argv[1], float(sys.argv[2])
para = ("The quick brown fox jumps over the lazy dog while the model keeps talking about "
        "memory bandwidth, **roofline** ceilings and `decode` rates. ") * 4
answer = "\n\n".join([
    "## Section", para, "- first point\n- second point\n- third point", para,
    "```rust\nfn main() {\n    println!(\"hello\");\n}\n```", para,
] * 40)
footer = {"ttft": {"secs": 0, "nanos": 120000000}, "prefill_rate": 900.0, "decode_rate": 40.0,
          "tokens": 512, "reason": "eos", "joules": None, "peak_rss": 0}
size, turn = 0, 0
with open(path, "w") as f:
    while size < mb * 1e6:
        turn += 1
        for e in ({"role": "user", "text": f"question {turn}", "model": "", "footer": None},
                  {"role": "assistant", "text": answer + f"\n\nEND OF ANSWER {turn}",
                   "model": "bench", "footer": footer}):
            line = json.dumps(e) + "\n"
            size += len(line)
            f.write(line)
print(f"session: {size/1e6:.1f} MB, {turn} turns", file=sys.stderr)
PY

tmux new-session -d -s "$session" -x 140 -y 45 "TOKENTOP_HOME=$home $bin ui $model"
screen() { tmux capture-pane -p -t "$session"; }
wait_for() { # PATTERN SECONDS
  for _ in $(seq $(($2 * 20))); do screen | grep -q -- "$1" && return 0; sleep 0.05; done
  echo "timed out waiting for: $1" >&2; screen >&2; return 1
}
wait_for "loaded in" 120
tmux send-keys -t "$session" F4
wait_for "sessions (Enter" 20
t0=$(date +%s%N)
tmux send-keys -t "$session" Enter
wait_for "quick brown fox" 120
echo "reopen to screen: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
screen | grep -q "END OF ANSWER" || echo "NOTE: the chat's end (END OF ANSWER) is not on screen after reopening"
pid=$(cut -d' ' -f1 < "/proc/$(tmux display-message -p -t "$session" '#{pane_pid}')/task/$(tmux display-message -p -t "$session" '#{pane_pid}')/children" 2>/dev/null || true)
[ -n "$pid" ] || pid=$(tmux display-message -p -t "$session" '#{pane_pid}')
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
sleep 2
a=$(ticks); sleep 30; b=$(ticks)
hz=$(getconf CLK_TCK)
awk -v t=$((b - a)) -v hz="$hz" 'BEGIN {printf "idle CPU over 30 s: %d ticks = %.2f%% of a core\n", t, 100 * t / hz / 30}'

lat=()
for k in a b c d e f g h i j k l m n o p q r s t; do
  t0=$(date +%s%N)
  tmux send-keys -t "$session" "$k"
  typed=$(printf '%s' {a..t} | cut -c1-$(( $(printf '%d' "'$k") - 96 )))
  for _ in $(seq 2000); do screen | grep -q -- "$typed" && break; sleep 0.002; done
  lat+=($(( ($(date +%s%N) - t0) / 1000000 )))
  sleep 0.2
done
printf '%s\n' "${lat[@]}" | sort -n | awk '{v[NR]=$1} END {printf "key-to-screen over %d keys: median %d ms, max %d ms\n", NR, v[int((NR+1)/2)], v[NR]}'
echo "$(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') $(nproc) cores"
