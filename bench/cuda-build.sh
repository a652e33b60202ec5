#!/usr/bin/env bash
# Compiles tokentop with --features cuda on a machine without a GPU (CI does not have the time for
# it: a clean build takes about half an hour on 2 cores). Installs the CUDA toolkit wheels and a
# link-only driver stub with ../shared/tools/cuda-env (or $CUDA_ENV when given), then builds the
# binary and the tests in release, and prints the time taken and the result as its last lines.
#   bench/cuda-build.sh                      CUDA_COMPUTE_CAP=90 (H100)
#   CUDA_COMPUTE_CAP=121 bench/cuda-build.sh GB10 (DGX Spark)
# The build goes to target/cuda so it does not invalidate the CPU build in target/release.
set -uo pipefail
cd "$(dirname "$0")/.."
env_tool=${CUDA_ENV:-../shared/tools/cuda-env}
eval "$("$env_tool")" || { echo "cuda-build: $env_tool failed"; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
start=$(date +%s)
cargo build --release --features cuda --all-targets
rc=$?
secs=$(( $(date +%s) - start ))
echo "cuda-build: $(date -u +%Y-%m-%d) CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') ($(nproc) cores)"
echo "cuda-build: cargo build --release --features cuda --all-targets: $([ $rc = 0 ] && echo ok || echo FAILED rc=$rc) in $((secs / 60)) min $((secs % 60)) s"
exit $rc
