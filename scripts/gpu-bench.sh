#!/usr/bin/env bash
# GPU benchmark without TensorRT: SD1.5-architecture random weights, ONNX Runtime CUDA provider, fp16, 512x512,
# batch 1 and 4, 4 steps, side by side with diffusers (torch fp16 on the same GPU). Offline: no hub access needed.
#
#   scripts/gpu-bench.sh [WHEEL_DIR] [OUT_DIR]
#
# WHEEL_DIR (optional): a folder of wheels to install offline first (e.g. diffusers and clip-anytorch on a machine
# whose Python has torch, onnxruntime-gpu and transformers but no network). OUT_DIR gets gpu-bench.json and .txt.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-}
out=${2:-.}
mkdir -p "$out"
if [ -n "$wheels" ]; then
  pip install --no-index --no-deps --find-links "$wheels" "$wheels"/*.whl
fi
pip install --no-deps --no-build-isolation -e . >/dev/null
python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), 'onnxruntime has no CUDA provider'"
bundle=artifacts/sd15-random-512-fp16
lcmtrt build-engines --preset sd15-random --backend onnxruntime --precision fp16 \
  --height 512 --width 512 --batch 1,4 --out "$bundle"
lcmtrt bench --engines "$bundle" --batch 1,4 --steps 4 --iterations 5 --warmup 2 \
  --compare diffusers --json "$out/gpu-bench.json" | tee "$out/gpu-bench.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$out/gpu-bench.txt"
