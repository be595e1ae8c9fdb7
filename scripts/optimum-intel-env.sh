#!/usr/bin/env bash
# The venv of bench's CPU peers: optimum-intel's OVLatentConsistencyModelPipeline (`lcmtrt bench --compare
# optimum-intel`) and openvino-genai's Text2ImagePipeline (`--compare openvino-genai`), which runs on optimum-intel's
# export. It has its own venv because optimum-intel pins older transformers (<5.6) and huggingface-hub (<1.22) than
# lcmtrt's exporter uses. Idempotent: an existing venv that already has these versions is left as it is.
#
#   scripts/optimum-intel-env.sh [VENV_DIR]      (default: .venv-optimum in the repository root)
#
# lcmtrt finds it there, or wherever LCMTRT_OPTIMUM_PYTHON points (VENV_DIR/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-optimum}
python=${PYTHON:-python3}

# One resolved set, installed and run offline on a local checkpoint: optimum-intel 2.2 needs optimum 2.3,
# transformers <5.6 and huggingface-hub <1.22, which leaves diffusers 0.39 as the newest that fits. OpenVINO is the
# release lcmtrt's own OpenVINO backend uses, so the two compare the same compiler; openvino-genai and
# openvino-tokenizers are that release's (openvino-tokenizers also makes the export write the OpenVINO tokenizer
# models genai reads).
torch_pin="torch==2.13.0"  # named first and alone: the CPU build; a bare `torch` would pull the CUDA one
pins=(
  "optimum-intel[openvino,diffusers]==2.2.0"
  "optimum==2.3.0"
  "diffusers==0.39.0"
  "transformers==5.5.4"
  "huggingface-hub==1.21.0"
  "openvino==2026.4.1"
  "openvino-tokenizers==2026.4.1.0"
  "openvino-genai==2026.4.1.0"
  "nncf==3.4.0"
)

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv with $($python --version)"
  "$python" -m venv "$venv"
else
  echo "using the existing $venv"
fi
pip=("$venv/bin/python" -m pip)

installed() {  # 0 when every pin (and CPU torch) is installed at its version
  "$venv/bin/python" - "$torch_pin" "${pins[@]}" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
for pin in sys.argv[1:]:
    name, wanted = re.sub(r"\[.*\]", "", pin).split("==")
    try:
        if version(name).split("+")[0] != wanted:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
}

if installed; then
  echo "$venv already has $torch_pin ${pins[*]}"
else
  echo "installing $torch_pin (CPU build)"
  "${pip[@]}" install --quiet "$torch_pin"
  echo "installing ${pins[*]}"
  "${pip[@]}" install --quiet "$torch_pin" "${pins[@]}"
fi

# optimum-intel requires torchvision, which PyPI ships built against CUDA torch: with CPU torch its operators fail to
# register and break `import transformers` models. Nothing the diffusion pipelines use needs it, so it goes.
if "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "removing torchvision (a CUDA build that CPU torch cannot load)"
  "${pip[@]}" uninstall --quiet --yes torchvision
fi

echo "checking that OVLatentConsistencyModelPipeline and Text2ImagePipeline import"
"$venv/bin/python" -c "from optimum.intel import OVLatentConsistencyModelPipeline; import torch, openvino; \
from openvino_genai import Text2ImagePipeline, TorchGenerator; import openvino_genai; \
print('ok: torch', torch.__version__, '| openvino', openvino.__version__, '| genai', openvino_genai.__version__)"
echo "peer venv ready: $venv/bin/python"
