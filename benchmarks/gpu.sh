#!/usr/bin/env bash
# Paper-scale TWA step overhead and projection bandwidth on one GPU (issue 7,
# item 8), as one command that finishes within 8 minutes:
#
#   benchmarks/gpu.sh [--smoke] [OUT_DIR]     (default OUT_DIR: benchmarks/results)
#
# Needs jax[cuda] (pip install -e . 'jax[cuda12]'); a CUDA build of torch,
# if installed, adds the PyTorch reference side. Three timed runs of
# benchmarks/step_overhead.py, each writing its JSON after every row, so a
# run cut short by its time limit still leaves what it measured:
#   1. VGG16, batch 128, n = 100: TWA/SGD step ratio (JAX and PyTorch),
#      projection time and bandwidth 2|P|/t against the copy bandwidth.
#   2. PreResNet-164, the same.
#   3. VGG16 with P stored in bfloat16 (half the bytes per pass; JAX only).
# --smoke runs the same logic on CPU at tiny sizes (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
smoke=0
out=benchmarks/results
for arg in "$@"; do
  case $arg in
    --smoke) smoke=1 ;;
    -*) echo "gpu.sh: unknown option $arg (usage: gpu.sh [--smoke] [OUT_DIR])" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
mkdir -p "$out"
# JAX and torch share the GPU: no up-front grab of 75% of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if (( smoke )); then
  runs=("small_cnn|--smoke|120" "small_cnn|--smoke --torch off --basis-dtype bfloat16|120")
else
  "$python" - <<'PY'
import sys, jax
platform = jax.devices()[0].platform
if platform != "gpu":
  sys.exit(f"gpu.sh: JAX runs on {platform}, not a GPU: install jax[cuda12] "
           "(or use --smoke to check the script on CPU)")
print("device:", jax.devices()[0].device_kind, flush=True)
PY
  paper="--batch 128 --ns 100 --repeats 15 --max-basis-gb 64"
  runs=("vgg16|$paper|180" "preresnet164|$paper|180"
        "vgg16|$paper --torch off --basis-dtype bfloat16|90")
fi

status=0
for i in "${!runs[@]}"; do
  IFS='|' read -r model flags limit <<< "${runs[$i]}"
  json="$out/gpu_step_overhead_$((i + 1)).json"
  echo "== run $((i + 1)): $model $flags (limit ${limit}s) -> $json"
  # shellcheck disable=SC2086  # $flags is a list of options
  if ! timeout "$limit" "$python" benchmarks/step_overhead.py \
      --models "$model" $flags --out "$json"; then
    echo "gpu.sh: run $((i + 1)) failed or hit its ${limit}s limit" >&2
    status=1
  fi
done
exit $status
