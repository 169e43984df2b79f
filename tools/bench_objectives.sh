#!/usr/bin/env bash
# The objective benchmark (BENCHMARKS.md, "Objectives: collapse, dropouts, noisy pairs"): the
# learning benchmark's data, 4 objectives x K {4, 1} x noisy pairs {0, 20%, 50%}, the recipe's
# dropouts at 0% noise, 3 seeds for K=4; then robust InfoNCE (loss.robust_q=0.5), the best
# under noise, and robust selective; two streams of runs side by side (one per core), then one
# report. About 5 hours on a 2-core CPU. "official" runs as the paper trains (no collapse
# guard: train.collapse.action=warn); a run the guard stops (exit 3) is scored from its last
# checkpoint and marked.
#   bash tools/bench_objectives.sh [WORK] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/setdiv_bench_objectives}
OUT=${2:-$WORK/report}
B=(.venv/bin/python tools/bench_learning.py --work "$WORK")
mkdir -p "$WORK"
"${B[@]}" --prepare   # the data first, once, for both streams

stream() {  # objectives A and B: clean and dropout runs, then noise, then K=1
    local a=$1 b=$2 tag=$3
    "${B[@]}" --out "$WORK/$tag-1" --runs "$a:off,$b:off,$a:on,$b:on" --seeds 0,1,2
    "${B[@]}" --out "$WORK/$tag-2" --runs "$a:off,$b:off" --noise 0.2,0.5 --seeds 0,1,2
    local k1a=${a/k4/k1} k1b=${b/k4/k1}
    "${B[@]}" --out "$WORK/$tag-3" --runs "$k1a:off,$k1b:off" --noise 0,0.2,0.5 --seeds 0
    "${B[@]}" --out "$WORK/$tag-4" --runs "$k1a:on,$k1b:on,$4" --seeds 0
}
stream k4 k4_sel s1 k4_hardest:on,k4_hardest_guarded:on,k4_hardest:off > "$WORK/s1.log" 2>&1 &
stream k4_nce k4_hnnce s2 k4_mean:on,k4_mean:off > "$WORK/s2.log" 2>&1 &
wait
"${B[@]}" --out "$WORK/r1" --runs k4_rnce:off --noise 0,0.2,0.5 --seeds 0,1 > "$WORK/r1.log" 2>&1 &
{ "${B[@]}" --out "$WORK/r2" --runs k4_rnce:off --noise 0,0.2,0.5 --seeds 2
  "${B[@]}" --out "$WORK/r3" --runs k4_rnce:on --seeds 0,1,2
  "${B[@]}" --out "$WORK/r4" --runs k4_rsel:on,k4_rsel:off,k4_hnrnce:on,k4_hnrnce:off --seeds 0
} > "$WORK/r2.log" 2>&1 &
wait
"${B[@]}" --out "$OUT" --collect "$WORK"/s1-{1,2,3,4} "$WORK"/s2-{1,2,3,4} "$WORK"/r{1,2,3,4}
