"""The parts of scripts/device-check.sh that run without a GPU: joining split wheels, installing from the folder,
reading a library's NEEDED entries, finding the CUDA provider's libraries, comparing images, the JSON report."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("device_check", ROOT / "scripts" / "device_check.py")
device_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_check)

# what `readelf -d` lists as NEEDED for onnxruntime-gpu 1.31.1's libonnxruntime_providers_cuda.so
ORT_131_NEEDED = ["libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcudart.so.13", "libcuda.so.1",
                  "libdl.so.2", "librt.so.1", "libpthread.so.0", "libstdc++.so.6", "libm.so.6", "libgcc_s.so.1",
                  "libc.so.6", "ld-linux-x86-64.so.2"]


def make_wheel(folder: Path, name: str = "devcheckpkg", padding: int = 200_000) -> Path:
    """A minimal installable wheel; `padding` makes it big enough to split."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    info = f"{name}-0.1.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{name}/padding.bin": np.random.default_rng(0).bytes(padding).hex(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{info}/RECORD", "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n")
    return wheel


def split(wheel: Path, suffixes: list[str]) -> None:
    data = wheel.read_bytes()
    size = -(-len(data) // len(suffixes))
    for k, suffix in enumerate(suffixes):
        (wheel.parent / f"{wheel.name}{suffix}").write_bytes(data[k * size:(k + 1) * size])
    wheel.unlink()


@pytest.mark.parametrize("suffixes", [[f".part{k}" for k in range(12)], [".001", ".002", ".003"], [".aa", ".ab"]])
def test_split_wheels_are_joined_in_order(tmp_path: Path, suffixes: list[str]) -> None:
    whole = make_wheel(tmp_path / "src")
    expected = whole.read_bytes()
    split(whole, suffixes)
    other = make_wheel(tmp_path / "src", "otherpkg", padding=10)
    written = device_check.join_parts(tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in written) == sorted([whole.name, other.name])
    assert (tmp_path / "out" / whole.name).read_bytes() == expected  # .part10 after .part9, not after .part1


def test_a_missing_part_is_refused(tmp_path: Path) -> None:
    whole = make_wheel(tmp_path / "src")
    split(whole, [".part0", ".part1", ".part2"])
    (tmp_path / "src" / f"{whole.name}.part1").unlink()
    with pytest.raises(ValueError, match="not a complete sequence"):
        device_check.join_parts(tmp_path / "src", tmp_path / "out")


def test_a_truncated_wheel_is_refused(tmp_path: Path) -> None:
    whole = make_wheel(tmp_path / "src")
    whole.write_bytes(whole.read_bytes()[:-5000])
    with pytest.raises(ValueError, match="not a complete wheel"):
        device_check.join_parts(tmp_path / "src", tmp_path / "out")


def test_install_from_the_folder_offline_into_a_target(tmp_path: Path) -> None:
    split(make_wheel(tmp_path / "src"), [".part0", ".part1"])
    device_check.install(tmp_path / "src", tmp_path / "site")
    value = subprocess.run([sys.executable, "-c", "import devcheckpkg; print(devcheckpkg.VALUE)"], text=True,
                           capture_output=True, env={"PYTHONPATH": str(tmp_path / "site")}, check=True).stdout
    assert value.strip() == "42"


def test_elf_needed_matches_readelf() -> None:
    import onnxruntime

    library = next((Path(onnxruntime.__file__).parent / "capi").glob("onnxruntime_pybind11_state*.so"))
    needed = device_check.elf_needed(library)
    assert "libc.so.6" in needed or "libstdc++.so.6" in needed
    if shutil.which("readelf"):
        listing = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
        assert needed == [line.split("[")[1].rstrip("]") for line in listing.splitlines() if "(NEEDED)" in line]


def test_cuda_libraries_are_found_in_torchs_nvidia_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_check, "elf_needed", lambda path: ORT_131_NEEDED)
    site = tmp_path / "site"
    for rel in ("nvidia/cu13/lib/libcublas.so.13", "nvidia/cu13/lib/libcublasLt.so.13",
                "nvidia/cu13/lib/libcudart.so.13", "nvidia/cudnn/lib/libcudnn.so.9", "nvidia/nccl/include/x.h"):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(b"")
    dirs, missing = device_check.library_path(tmp_path, [site])
    assert dirs == [site / "nvidia/cu13/lib", site / "nvidia/cudnn/lib"] and missing == ["libcurand.so.10"]
    assert device_check.library_path(tmp_path, [site], {"libcurand.so.10"})[1] == []


def test_compare_and_assemble_one_report(tmp_path: Path) -> None:
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    noisy = image.copy()
    noisy[0, 0, 0] = noisy[0, 0, 0] ^ 4
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(noisy).save(tmp_path / "b.png")
    quality = device_check.compare(tmp_path / "a.png", tmp_path / "b.png")
    assert quality["max_abs_diff"] == 4 and 50 < quality["psnr_db"] < 80
    assert device_check.compare(tmp_path / "a.png", tmp_path / "a.png")["psnr_db"] is None
    (tmp_path / "quality.json").write_text(json.dumps(quality))
    (tmp_path / "steps.tsv").write_text("install\t0\t12\nbench\t124\t300\n")
    device_check.assemble(tmp_path / "report.json", {"steps": tmp_path / "steps.tsv",
                                                     "quality": tmp_path / "quality.json",
                                                     "bench": tmp_path / "bench.json"})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"]["bench"] == {"exit_code": 124, "seconds": 300} and report["quality"] == quality
    assert "error" in report["bench"]  # a step that wrote nothing is recorded, not fatal


def test_device_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device-check.sh")], check=True)


def test_script_installs_from_the_folder_and_reports_a_missing_cuda_provider(tmp_path: Path) -> None:
    """Here the run stops where the GPU part starts (no onnxruntime-gpu in the folder), but still writes its JSON."""
    split(make_wheel(tmp_path / "wheels"), [".part0", ".part1"])
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device-check.sh"), str(tmp_path / "wheels"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable,
                              "TMPDIR": str(tmp_path)})
    assert run.returncode == 1, run.stderr
    report = json.loads((tmp_path / "out" / "device-check.json").read_text())
    assert report["steps"]["install"]["exit_code"] == 0 and report["steps"]["install-lcmtrt"]["exit_code"] == 0
    assert report["steps"]["ld-path"]["exit_code"] != 0 and "error" in report["bench"]
    assert "libonnxruntime_providers_cuda.so" in (tmp_path / "out" / "ld-path.log").read_text()
    assert not list(tmp_path.glob("lcmtrt-device-check.*"))  # the work folder is removed
