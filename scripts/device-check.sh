#!/usr/bin/env bash
# The GPU measurement in one go, on a bare GPU host with PyTorch (CUDA 13) but no network, diffusers or TensorRT:
# ONNX Runtime's CUDA provider, fp16, sd15-random (SD1.5 architecture, random weights written offline) at 512x512.
#
#   scripts/device-check.sh WHEEL_DIR OUT_DIR
#
# WHEEL_DIR holds onnxruntime-gpu, diffusers and lcmtrt wheels (and whatever else the host lacks: onnx, transformers,
# tokenizers, safetensors, ...), whole or split into parts (X.whl.part0, X.whl.001, X.whl.aa, ...), which are joined
# first. Without an lcmtrt wheel this checkout is installed. Steps: install into a private folder (pip --no-deps
# --target), put the CUDA 13 libraries the provider needs (readelf -d NEEDED) from PyTorch's nvidia packages on
# LD_LIBRARY_PATH, print the GPU, driver, torch and providers, build the fp16 bundle for the CUDA provider, record
# which engines run as CUDA graphs, run `lcmtrt bench --compare diffusers` at batch 1 and 4 (diffusers fp16 on the
# same GPU), then compare the fp16 GPU image with an fp32 CPU bundle's image for the same seed (PSNR, max
# difference). OUT_DIR gets device-check.json with everything, the images and one log per step.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
wheels=${1:?usage: scripts/device-check.sh WHEEL_DIR OUT_DIR}
out=${2:?usage: scripts/device-check.sh WHEEL_DIR OUT_DIR}
py=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/lcmtrt-device-check.XXXXXX")
export LCMTRT_CACHE="$work/cache"
start=$(date +%s)
prompt="a photo of a red fox in the snow"
: > "$out/steps.tsv"

# step NAME TIMEOUT_S COMMAND...: runs with its output in OUT/NAME.log, records exit code and seconds
step() {
  local name=$1 limit=$2 began=$SECONDS rc
  shift 2
  echo "[device-check +$(( $(date +%s) - start ))s] $name" >&2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - began ))" >> "$out/steps.tsv"
  [ "$rc" -eq 0 ] || { echo "  $name failed ($rc); last lines of $out/$name.log:" >&2; tail -n 5 "$out/$name.log" >&2; }
  return "$rc"
}

finish() {
  "$py" "$here/device_check.py" assemble "$out/device-check.json" steps="$out/steps.tsv" \
    environment="$out/environment.json" cuda_graphs="$out/cuda-graphs.json" bench="$out/bench.json" \
    quality="$out/quality.json"
  echo "[device-check +$(( $(date +%s) - start ))s] wrote $out/device-check.json" >&2
  rm -rf "$work"
}
trap finish EXIT

step install 180 "$py" "$here/device_check.py" install "$wheels" "$work/site" || exit 1
if ! ls "$work/site"/lcmtrt-*.dist-info >/dev/null 2>&1; then
  step install-lcmtrt 120 "$py" -m pip install --quiet --no-deps --no-index --no-build-isolation --target "$work/site" \
    "$repo" || exit 1
fi
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$work/site/bin:$PATH"
step ld-path 30 "$py" "$here/device_check.py" ld-path "$work/site" || exit 1
eval "$(head -n 1 "$out/ld-path.log")"
"$py" "$here/device_check.py" environment > "$out/environment.json"
cat "$out/environment.json"
step imports 120 "$py" -c "import numpy, PIL, tokenizers, onnx, transformers, diffusers, safetensors, torch, lcmtrt
import onnxruntime as o
assert 'CUDAExecutionProvider' in o.get_available_providers(), 'onnxruntime has no CUDA provider'" || exit 1

gpu="$work/sd15-random-512-fp16" cpu="$work/sd15-random-512-fp32"
step build-gpu 300 lcmtrt build-engines --preset sd15-random --backend onnxruntime --precision fp16 \
  --height 512 --width 512 --batch 1,4 --out "$gpu" || exit 1
step cuda-graphs 120 "$py" -c "import json, sys
from lcmtrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
from lcmtrt.bundle import load_bundle
backend = OnnxRuntimeBackend(load_bundle(sys.argv[1]), 'cuda')
json.dump({'engines': sorted(backend.sessions), 'cuda_graph_engines': sorted(backend.cuda_graph_engines)},
          open(sys.argv[2], 'w'))" "$gpu" "$out/cuda-graphs.json"
step bench 300 lcmtrt bench --engines "$gpu" --device cuda --batch 1,4 --steps 4 --iterations 5 --warmup 2 \
  --compare diffusers --json "$out/bench.json" && cat "$out/bench.log"
step infer-gpu 120 lcmtrt infer --engines "$gpu" --device cuda "$prompt" --seed 0 --output "$out/gpu-fp16.png"
step build-cpu 300 env CUDA_VISIBLE_DEVICES= lcmtrt build-engines --preset sd15-random --backend onnxruntime \
  --precision fp32 --height 512 --width 512 --batch 1 --out "$cpu" &&
  step infer-cpu 180 env CUDA_VISIBLE_DEVICES= lcmtrt infer --engines "$cpu" --device cpu "$prompt" --seed 0 \
    --output "$out/cpu-fp32.png" &&
  "$py" "$here/device_check.py" compare "$out/gpu-fp16.png" "$out/cpu-fp32.png" > "$out/quality.json" &&
  cat "$out/quality.json"
