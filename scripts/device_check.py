"""Helpers of scripts/device-check.sh that run before lcmtrt is installed (standard library only): join split wheel
parts, find the CUDA libraries ONNX Runtime's CUDA provider needs among PyTorch's nvidia packages, describe the host,
compare two images, and assemble one JSON report.

    python device_check.py join-parts SRC DEST      wheels in SRC (whole or as parts) -> whole wheels in DEST
    python device_check.py install SRC TARGET        join, then pip install --no-deps --no-index --target TARGET
    python device_check.py ld-path ORT_ROOT          prints `export LD_LIBRARY_PATH=...`; exits 1 if a library is missing
    python device_check.py environment               GPU, driver, torch, ONNX Runtime providers as JSON
    python device_check.py compare A.png B.png       PSNR and max/mean pixel difference as JSON
    python device_check.py assemble OUT.json NAME=FILE.json ...   one report from the pieces
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

# X.whl.part0, X.whl.part-01, X.whl.001 (split -d), X.whl.aa (split): the index orders the parts
PART = re.compile(r"^(?P<base>.+\.whl)\.(?:part[-_]?)?(?P<index>\d+|[a-z]{2})$")
PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
SYSTEM_LIBS = re.compile(r"^(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux.*|libcuda)\.so")


def join_parts(src: Path, dest: Path) -> list[Path]:
    """Copy whole wheels from `src` to `dest` and join split ones (parts in index order, no index missing);
    every result must be a readable zip. Returns the wheels written."""
    dest.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[tuple[str, Path]]] = {}
    written = []
    for path in sorted(src.iterdir()):
        match = PART.match(path.name)
        if match:
            groups.setdefault(match["base"], []).append((match["index"], path))
        elif path.suffix == ".whl":
            shutil.copyfile(path, dest / path.name)
            written.append(dest / path.name)
    for base, parts in groups.items():
        if (src / base).exists():
            raise ValueError(f"{base} is in {src} both whole and as parts")
        numeric = all(index.isdigit() for index, _ in parts)
        parts.sort(key=lambda p: int(p[0]) if numeric else p[0])
        if numeric:
            numbers = [int(index) for index, _ in parts]
            if numbers != list(range(numbers[0], numbers[0] + len(numbers))) or numbers[0] not in (0, 1):
                raise ValueError(f"{base}: parts {numbers} are not a complete sequence")
        target = dest / base
        with open(target, "wb") as out:
            for _, part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        written.append(target)
    for wheel in written:
        if not zipfile.is_zipfile(wheel) or zipfile.ZipFile(wheel).testzip() is not None:
            raise ValueError(f"{wheel.name} is not a complete wheel (a part missing or corrupt?)")
    return written


def install(src: Path, target: Path) -> list[Path]:
    """Join the wheels of `src` into TARGET/.wheels and install them all into TARGET, offline and without resolving
    dependencies (the host brings torch and CUDA; the folder brings the rest)."""
    wheels = join_parts(src, target / ".wheels")
    if not wheels:
        raise ValueError(f"no wheels (or wheel parts) in {src}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--upgrade",
                    "--target", str(target), *map(str, wheels)], check=True)
    return wheels


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared library (what `readelf -d` lists as NEEDED)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, shentsize, shnum = struct.unpack_from("<Q", data, 0x28)[0], *struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC; its sh_link is the string table
    strtab = sections[dynamic[6]][4]
    needed = []
    for offset in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, offset)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            end = data.index(b"\0", strtab + value)
            needed.append(data[strtab + value:end].decode())
    return needed


def nvidia_lib_dirs(roots: list[Path]) -> list[Path]:
    """Folders of shared libraries in the `nvidia` packages (nvidia/*/lib, nvidia/cu13/lib) under site folders."""
    dirs = []
    for root in roots:
        for lib in sorted((root / "nvidia").glob("**/lib")) if (root / "nvidia").is_dir() else []:
            if any(lib.glob("*.so*")) and lib not in dirs:
                dirs.append(lib)
    return dirs


def system_libraries() -> set[str]:
    """Library names the dynamic loader's cache knows (`ldconfig -p`), e.g. a CUDA toolkit installed system-wide."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}


def library_path(ort_root: Path, site_roots: list[Path], system: set[str] = frozenset()) -> tuple[list[Path], list[str]]:
    """(folders to put on LD_LIBRARY_PATH, libraries the CUDA provider needs that neither they nor the system
    have)."""
    dirs = nvidia_lib_dirs(site_roots)
    missing = []
    for name in elf_needed(ort_root / PROVIDER):
        if SYSTEM_LIBS.match(name) or name in system:
            continue  # the C runtime, libcuda from the driver, libraries the loader finds anyway
        if not any((d / name).exists() for d in dirs):
            missing.append(name)
    return dirs, missing


def environment() -> dict[str, Any]:
    """The GPU and driver (nvidia-smi), torch and its CUDA, ONNX Runtime and its providers."""
    env: dict[str, Any] = {"python": sys.version.split()[0]}
    try:
        query = "name,driver_version,memory.total,compute_cap"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60, check=True).stdout.strip().splitlines()
        env["gpus"] = [dict(zip(query.split(","), (v.strip() for v in line.split(",")))) for line in out]
    except (OSError, subprocess.SubprocessError) as e:
        env["gpus_error"] = str(e)
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["torch_gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as e:  # noqa: BLE001 - report whatever is broken
        env["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as e:  # noqa: BLE001
        env["onnxruntime_error"] = f"{type(e).__name__}: {e}"
    return env


def compare(a: Path, b: Path) -> dict[str, float]:
    """PSNR (dB, 8-bit peak; null for identical images) and the largest and mean absolute pixel difference of two
    same-sized images."""
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), np.float64)
    if x.shape != y.shape:
        raise ValueError(f"{a} is {x.shape}, {b} is {y.shape}")
    mse = float(((x - y) ** 2).mean())
    psnr = None if mse == 0 else round(10 * float(np.log10(255.0**2 / mse)), 2)
    return {"psnr_db": psnr, "max_abs_diff": int(np.abs(x - y).max()),
            "mean_abs_diff": round(float(np.abs(x - y).mean()), 3)}


def assemble(out: Path, pieces: dict[str, Path]) -> dict[str, Any]:
    """One JSON object: each piece under its name; a missing or unreadable piece is recorded as an error. A .tsv
    piece holds the script's steps, one `name exit-code seconds` line each."""
    report: dict[str, Any] = {}
    for name, path in pieces.items():
        try:
            if path.suffix == ".tsv":
                rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
                report[name] = {r[0]: {"exit_code": int(r[1]), "seconds": int(r[2])} for r in rows}
            else:
                report[name] = json.loads(path.read_text())
        except (OSError, ValueError, IndexError) as e:
            report[name] = {"error": f"{path.name}: {e}"}
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "join-parts":
        for wheel in join_parts(Path(args[0]), Path(args[1])):
            print(wheel)
    elif command == "install":
        for wheel in install(Path(args[0]), Path(args[1])):
            print(f"installed {wheel.name}")
    elif command == "ld-path":
        roots = [Path(p) for p in sys.path if p and Path(p).is_dir()]
        dirs, missing = library_path(Path(args[0]), roots, system_libraries())
        current = os.environ.get("LD_LIBRARY_PATH", "")
        print(f"export LD_LIBRARY_PATH={':'.join([*map(str, dirs), *filter(None, [current])])}")
        if missing:
            print(f"ONNX Runtime's CUDA provider needs {', '.join(missing)}, found in no nvidia package folder "
                  f"({', '.join(map(str, dirs)) or 'none found'})", file=sys.stderr)
            return 1
    elif command == "environment":
        print(json.dumps(environment(), indent=2))
    elif command == "compare":
        print(json.dumps(compare(Path(args[0]), Path(args[1]))))
    elif command == "assemble":
        assemble(Path(args[0]), {k: Path(v) for k, v in (a.split("=", 1) for a in args[1:])})
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
