"""The runtime needs numpy, pillow, tokenizers and one backend: no torch, diffusers or transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BACKENDS, on_backend

BLOCK_HEAVY = """
import sys
for name in ("torch", "diffusers", "transformers", "onnx", "fastapi", "uvicorn", "openai"):
    sys.modules[name] = None  # any import of them now raises ImportError
from lcmtrt.cli.main import main
code = main(sys.argv[1:])
leaked = [m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "onnx")
          and sys.modules[m] is not None]
assert not leaked, leaked
sys.exit(code)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_infer_runs_without_torch(tiny_sd15_bundle: Path, tmp_path: Path, backend: str) -> None:
    out = tmp_path / "light.png"
    bundle = on_backend(tiny_sd15_bundle, backend)
    argv = ["infer", "--engines", str(bundle), "a cat", "--seed", "7", "--output", str(out)]
    done = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "noise from numpy" in done.stderr
    first = np.asarray(Image.open(out))
    assert first.shape == (64, 64, 3)
    # numpy noise is still deterministic per seed
    done = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), first)


def test_broken_torch_falls_back_to_numpy_noise(tiny_sd15_bundle: Path, tmp_path: Path) -> None:
    """torch installed but failing to import (here: a missing CUDA library) draws numpy noise, with a warning."""
    broken = tmp_path / "site" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise OSError('libcudnn.so.9: cannot open shared object file')\n")
    code = ("import sys\n"
            f"sys.path.insert(0, {str(broken.parent)!r})\n"
            "from lcmtrt.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    argv = ["infer", "--engines", str(tiny_sd15_bundle), "a cat", "--seed", "7", "--output", str(tmp_path / "a.png")]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch is installed but does not import (OSError: libcudnn.so.9" in done.stderr
    assert "noise from numpy" in done.stderr


def test_runtime_modules_import_nothing_heavy() -> None:
    code = ("import sys\n"
            "import lcmtrt.cli.main, lcmtrt.runtime.pipeline, lcmtrt.runtime.backends.onnxruntime, lcmtrt.runtime.scheduler\n"
            "import lcmtrt.runtime.backends.openvino\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'onnx'})\n"
            "print(','.join(heavy))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_serve_without_the_serve_extra_says_what_to_install(tiny_sd15_bundle: Path) -> None:
    argv = ["serve", "--engines", str(tiny_sd15_bundle)]
    done = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "lcmtrt: error: serving needs the serve extra: pip install 'lcmtrt[serve]' (fastapi is missing)"]
