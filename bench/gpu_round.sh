#!/usr/bin/env bash
# Timed steps on a GPU machine, each with the GPU's utilisation sampled every 0.5 s.
#
#   OUT=DIR bash bench/gpu_round.sh STEP [STEP ...]
#
# Steps: tests, gputests (the GPU-sensitive ones), t1 (Task 1 core, float32), t1bf16, t1jitoff, t1tune0
# (XLA autotuning off), kd (bench_kd), ftmnv (MobileNetV2 anchor and toolkit with XLA, flags in $FT_FLAGS), ft32, ftbf32, ftbf128
# (bench_finetune at float32 batch 32 / bfloat16 + XLA batch 32 / 128), ftoff32, ftoffbf128 (no XLA,
# anchor and toolkit rows only), t2 (Task 2's whole
# course table on a synthetic 3,152-image 224-px folder; resumes, so it can span calls;
# extra flags in $T2_FLAGS), startup (seconds to import TensorFlow, run a first GPU op, a first
# convolution and a first XLA compilation), t1short (Task 1 teacher, kd, scratch, 2 epochs: the
# compile cost is the first epoch less the second), fusedforms (bench_fused_forms: the looped and
# stacked fused grid's first and later steps and graph sizes, 18 cells, both kinds of stacked products), t1stacked (Task 1 core with --fuse-grid stacked),
# t1times (per-run times of the t1 folder; t2 prints its own).
# $TAG is appended to step names, so a step can run under several environments
# (e.g. XLA_FLAGS) in one round. Appends one line per step to $OUT/summary.txt (exit status,
# wall seconds, mean GPU utilisation = busy share, peak GPU memory), the programs' output
# to $OUT/log.txt, and packs the runs' JSON records into $OUT/runs.tar.gz.
# Inputs: $MNIST_DIR (default .gpu/cz/mnist), $ANNOTATIONS (an MHIST annotations.csv,
# default .gpu/cz/annotations.csv), scratch in $WORK (default /tmp/gpuw).
set -uo pipefail
OUT=${OUT:?set OUT}
WORK=${WORK:-/tmp/gpuw}
MNIST=${MNIST_DIR:-.gpu/cz/mnist}
ANNOTATIONS=${ANNOTATIONS:-.gpu/cz/annotations.csv}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1${TAG:-} limit=$2
  shift 2
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    >"$WORK/gpu-$name.csv" 2>/dev/null &
  local sampler=$! start
  start=$(date +%s%N)
  echo "== $name: $*" >>"$OUT/log.txt"
  timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
  local rc=$? ms=$((($(date +%s%N) - start) / 1000000))
  kill "$sampler" 2>/dev/null
  awk -F', ' -v n="$name" -v rc=$rc -v ms=$ms '{u += $1; if ($2 > m) m = $2; c++}
    END {printf "%-8s rc=%-3s wall=%7.1f s  gpu busy %5.1f%% (%d samples)  gpu memory max %d MiB\n",
         n, rc, ms / 1000, c ? u / c : 0, c, m}' "$WORK/gpu-$name.csv" | tee -a "$OUT/summary.txt"
}

mhist() {
  [ -f "$WORK/mhist/annotations.csv" ] ||
    python3 -m task2_mhist.synthetic --out "$WORK/mhist" --annotations "$ANNOTATIONS" >>"$OUT/log.txt" 2>&1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/summary.txt"
for s in "$@"; do
  case $s in
  tests) step tests 420 python3 -m pytest -q -p no:cacheprovider $(python3 -c "import xdist" 2>/dev/null && echo -n 6) ;;
  t1) step t1 300 python3 task1_mnist/run.py --data-dir "$MNIST" --out "$WORK/t1" -q \
        --only flops,teacher,kd,scratch,grid ;;
  t1stacked) step t1stacked 300 python3 task1_mnist/run.py --data-dir "$MNIST" --out "$WORK/t1stacked" -q \
               --only flops,teacher,kd,scratch,grid --fuse-grid stacked ;;
  fusedforms) step fusedforms 200 python3 bench/bench_fused_forms.py --out "$OUT/fused_forms.json" ;;
  t1bf16) step t1bf16 300 python3 task1_mnist/run.py --data-dir "$MNIST" --out "$WORK/t1bf16" -q \
            --only flops,teacher,kd,scratch,grid --precision mixed_bfloat16 ;;
  t1jitoff) step t1jitoff 130 python3 task1_mnist/run.py --data-dir "$MNIST" --out "$WORK/t1jitoff" -q \
              --only flops,teacher,kd,scratch,grid --jit off ;;
  t1tune0) XLA_FLAGS=--xla_gpu_autotune_level=0 step t1tune0 130 python3 task1_mnist/run.py --data-dir "$MNIST" \
             --out "$WORK/t1tune0" -q --only flops,teacher,kd,scratch,grid ;;
  ftoff32) mhist && step ftoff32 90 python3 bench/bench_finetune.py --data-dir "$WORK/mhist" --limit 2048 \
             --jit off --parts anchor,toolkit --precisions float32 --out "$OUT/ft_off_fp32_b32.json" ;;
  ftoffbf128) mhist && step ftoffbf128 90 python3 bench/bench_finetune.py --data-dir "$WORK/mhist" --limit 2048 \
                --jit off --parts anchor,toolkit --precisions mixed_bfloat16 --batch-size 128 \
                --out "$OUT/ft_off_bf16_b128.json" ;;
  gputests) step gputests 80 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_distribute.py \
              tests/test_losses.py tests/test_task1.py::test_same_seed_repeats_a_run_exactly \
              tests/test_task1.py::test_mirrored_strategy_recipe_matches_default tests/test_fused.py \
              tests/test_task1.py::test_a_fused_grid_under_a_mirrored_strategy_matches_default ;;
  kd) step kd 300 python3 bench/bench_kd.py --data-dir "$MNIST" --epochs 4 --grid-cells 6 --out "$OUT/kd_mnist.json" ;;
  ft32) mhist && step ft32 200 python3 bench/bench_finetune.py --data-dir "$WORK/mhist" --limit 2048 \
          --precisions float32 --out "$OUT/ft_fp32_b32.json" ;;
  ftbf32) mhist && step ftbf32 200 python3 bench/bench_finetune.py --data-dir "$WORK/mhist" --limit 2048 \
            --precisions mixed_bfloat16 --jit on --out "$OUT/ft_bf16_b32.json" ;;
  ftbf128) mhist && step ftbf128 200 python3 bench/bench_finetune.py --data-dir "$WORK/mhist" --limit 2048 \
             --precisions mixed_bfloat16 --jit on --batch-size 128 --out "$OUT/ft_bf16_b128.json" ;;
  t2) mhist && step t2 "${T2_LIMIT:-560}" python3 task2_mhist/run.py --data-dir "$WORK/mhist" --weights none \
        --out "$WORK/t2" -q ${T2_FLAGS:-}
      python3 bench/run_times.py "$WORK/t2" | tee -a "$OUT/summary.txt" ;;
  t1times) python3 bench/run_times.py "$WORK/t1${TAG:-}" | tee -a "$OUT/summary.txt" ;;
  startup) TF_CPP_MIN_LOG_LEVEL=0 step startup 120 python3 bench/gpu_startup.py
           grep -aE "^startup seconds|ptxas|PTX|nvlink|JitLink|[Ff]alling back" "$OUT/log.txt" | sort | uniq -c | head -20 |
             sed "s/^/  startup${TAG:-}: /" | tee -a "$OUT/summary.txt" ;;
  ftmnv) mhist && step ftmnv 300 python3 bench/bench_finetune.py --data-dir "$WORK/mhist" --limit 2048 --jit on \
           --architectures mobilenetv2 --parts anchor,toolkit --precisions float32 ${FT_FLAGS:-} --out "$OUT/ftmnv${TAG:-}.json" ;;
  t1short) step t1short 200 python3 task1_mnist/run.py --data-dir "$MNIST" --out "$WORK/t1short${TAG:-}" -q \
             --only teacher,kd,scratch --epochs 2 && python3 bench/run_times.py "$WORK/t1short${TAG:-}" | tee -a "$OUT/summary.txt" ;;
  *) echo "unknown step $s" | tee -a "$OUT/summary.txt" ;;
  esac
done
(cd "$WORK" && find . -path ./mhist -prune -o \( -name '*.json' -o -name '*.csv' \) -print |
  tar czf "$OUT/runs.tar.gz" -T -)
cat "$OUT/summary.txt"
