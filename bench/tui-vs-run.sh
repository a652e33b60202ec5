#!/usr/bin/env bash
# Decode tok/s shown by the TUI versus `tokentop run`, same model, prompt, greedy sampling
# and token budget, interleaved. Usage: bench/tui-vs-run.sh [MODEL] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
bin=$PWD/target/release/tokentop
model=${1:-smollm2-135m}
runs=${2:-3}
n=128
prompt="Write a long story about a robot who learns to paint."
session=tokentop-bench-$$

tui_rate() {
  tmux new-session -d -s "$session" -x 140 -y 50 "$bin ui $model --temperature 0 -n $n"
  trap 'tmux kill-session -t $session 2>/dev/null' RETURN
  for _ in $(seq 300); do tmux capture-pane -p -t "$session" | grep -q "loaded in" && break; sleep 0.2; done
  tmux send-keys -t "$session" "$prompt" Enter
  for _ in $(seq 1500); do
    line=$(tmux capture-pane -p -J -t "$session" | grep -o "decode [0-9.]* tok/s · [0-9]* tokens" || true)
    [ -n "$line" ] && { echo "$line" | awk '{print $2}'; return; }
    sleep 0.2
  done
  echo "timed out" >&2; return 1
}

run_rate() {
  "$bin" run "$model" --prompt "$prompt" --temperature 0 -n $n 2>&1 >/dev/null | awk '/^eval rate:/ {print $3}'
}

echo "model=$model runs=$runs tokens=$n $(date -u +%F) $(nproc) cores"
for i in $(seq "$runs"); do
  r=$(run_rate); t=$(tui_rate)
  echo "run $i: tokentop run $r tok/s, TUI $t tok/s"
  echo "$r $t" >> /tmp/$session.rates
done
awk '{r+=$1; t+=$2; k++} END {printf "mean: run %.2f tok/s, TUI %.2f tok/s, TUI/run = %.3f\n", r/k, t/k, t/r}' /tmp/$session.rates
rm -f /tmp/$session.rates
