"""OpenVINO backend: one compiled model per (engine, batch) from the bundle's static-shape IR, one infer request per
binding with every input and output set to a host buffer once (shared memory: a run copies nothing in or out).

Compiled models go through OpenVINO's model cache, so a second load of the same bundle skips compilation. OpenVINO
never evicts from it, and every rebuilt bundle adds blobs of its own (GBs for a bf16 SD1.5 at 512x512), so after each
compilation the least recently used blobs are removed until the cache fits $LCMTRT_OPENVINO_CACHE_GB (16 by default;
0 turns the cache off, inf leaves it unbounded); the blobs this process wrote or imported are never removed by it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import openvino as ov

from lcmtrt.runtime.backends.base import HostBuffer
from lcmtrt.bundle import Bundle
from lcmtrt.errors import UserError
from lcmtrt.runtime.backends.devices import openvino_device

log = logging.getLogger(__name__)

# bundle precision -> OpenVINO's hint; int8 bundles set none: their quantized ops run in int8 and the rest at the
# device's default precision (bf16 on CPUs with avx512_bf16 or AMX, f32 elsewhere), whatever the build host had
INFERENCE_PRECISION: dict[str, str | None] = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": None}
REBUILD = "rebuild it with `lcmtrt build-engines --backend openvino`"
CACHE_LIMIT_GB = 16.0  # default bound on the compiled-model cache; $LCMTRT_OPENVINO_CACHE_GB overrides it
_blobs_in_use: set[Path] = set()  # cache blobs this process wrote or imported: its pruning never removes them


def cache_dir() -> Path:
    """OpenVINO's compiled-model cache, beside the tiny checkpoints ($LCMTRT_CACHE or ~/.cache/lcmtrt)."""
    root = os.environ.get("LCMTRT_CACHE") or Path.home() / ".cache" / "lcmtrt"
    return Path(root) / "openvino"


def cache_limit_bytes() -> int | None:
    """The compiled-model cache's bound in bytes, from $LCMTRT_OPENVINO_CACHE_GB (GiB; `inf`: unbounded, None) or
    CACHE_LIMIT_GB; 0 turns the cache off (the backend then sets no CACHE_DIR)."""
    raw = os.environ.get("LCMTRT_OPENVINO_CACHE_GB", "")
    try:
        gb = float(raw) if raw else CACHE_LIMIT_GB
    except ValueError:
        raise UserError(f"LCMTRT_OPENVINO_CACHE_GB={raw!r} is not a number of GiB (0 turns the cache off, inf leaves "
                        f"it unbounded)") from None
    if math.isnan(gb) or gb < 0:
        raise UserError(f"LCMTRT_OPENVINO_CACHE_GB={raw!r} must be 0 (no cache), a positive number of GiB or inf")
    return None if math.isinf(gb) else 0 if gb == 0 else max(1, int(gb * 2**30))


def prune_cache(folder: Path, limit: int, keep: set[Path]) -> list[Path]:
    """Remove the least recently used compiled blobs (by access or write time, whichever is later) until the folder's
    blobs total at most `limit` bytes, never one in `keep`; returns what it removed. Best effort: a blob it may not
    remove (a read-only or shared cache) is skipped with a warning. A blob another process has open or mapped stays
    readable to it: removing a file only unlinks its name."""
    blobs = []
    for path in folder.glob("*.blob"):
        with contextlib.suppress(OSError):  # gone meanwhile (another process pruned it) or unreadable: not counted
            stat = path.stat()
            blobs.append((max(stat.st_atime, stat.st_mtime), stat.st_size, path))
    total = sum(size for _, size, _ in blobs)
    removed, refused = [], []
    for _, size, path in sorted(blobs):
        if total <= limit:
            break
        if path in keep:
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            refused.append(f"{path.name} ({e.strerror})")
            continue
        total -= size
    if refused:
        log.warning("OpenVINO cache %s is over its bound, but %d blobs could not be removed: %s", folder,
                    len(refused), ", ".join(refused[:3]) + (", ..." if len(refused) > 3 else ""))
    return removed


def mapped_blobs(folder: Path) -> set[Path]:
    """The cache blobs this process has mapped: OpenVINO maps the blob a compiled model was imported from (Linux's
    /proc/self/maps; elsewhere none are known, and only the blobs a compilation wrote count as in use)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    prefix = f"{folder.resolve()}{os.sep}"  # the kernel lists resolved paths; a removed file ends in " (deleted)"
    blobs = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
        if len(fields) == 6 and fields[5].startswith(prefix) and fields[5].endswith(".blob"):
            blobs.add(Path(fields[5]))
    return blobs


def openvino_version() -> str:
    """The release, e.g. 2026.4.1 (without the build hash): IR and compiled-cache compatibility follow it."""
    return ov.get_version().split("-")[0]


def check_device(core: ov.Core, device: str) -> str:
    """OpenVINO's name for `device` (the --device vocabulary of devices.py, any case; auto is CPU) on this host;
    refuses a device it does not have, naming those it has."""
    return openvino_device(device, "CPU", core.available_devices)


def compile_config(precision: str) -> dict[str, str]:
    """What every engine of a bundle of `precision` is compiled with (before the cache folder)."""
    hint = INFERENCE_PRECISION[precision]
    return {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_PRECISION_HINT": hint} if hint else {})}


def check_compatible(build: dict[str, Any], root: Path) -> None:
    """IR and cached blobs are tied to the OpenVINO release that wrote them."""
    built = build.get("openvino_version")
    here = openvino_version()
    if built is None:
        raise UserError(f"bundle {root} records no OpenVINO version; {REBUILD}")
    if built != here:
        raise UserError(f"bundle {root} was built with OpenVINO {built} but this host has {here}; {REBUILD}, "
                        f"or install openvino=={built}")


class OvBinding:
    def __init__(self, request: ov.InferRequest):
        self.request = request

    def run(self) -> None:
        self.request.infer()  # synchronous: the tensors it reads and writes are the bound buffers themselves

    def release(self) -> None:
        """Drop the infer request, and with it its tensors' references to the buffers' arrays."""
        self.request = None


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, bundle: Bundle, device: str = "auto", cache: bool = True):
        """`cache`: compiled models go through OpenVINO's model cache (off for a build's own passes over IR that it
        is about to rewrite, so the cache never keeps their blobs)."""
        check_compatible(bundle.build, bundle.root)
        self.bundle = bundle
        self.core = ov.Core()
        self.ov_device = openvino_device(device, bundle.build.get("ov_device", "CPU"), self.core.available_devices)
        self.config = compile_config(bundle.precision)
        self.cache_limit = cache_limit_bytes() if cache else 0
        self.cache_folder = cache_dir().resolve() if cache and self.cache_limit != 0 else None
        if self.cache_folder:
            self.cache_folder.mkdir(parents=True, exist_ok=True)
            self.config["CACHE_DIR"] = str(self.cache_folder)
        self.compiled: dict[tuple[str, int], ov.CompiledModel] = {}
        self.device = f"{self.ov_device} (openvino {bundle.precision})"
        for spec in bundle.engines.values():  # a damaged bundle fails at load, not at the first request
            for batch in spec.batch_sizes:
                if not self._ir(spec.name, batch).is_file():
                    raise UserError(f"bundle {bundle.root} has no OpenVINO IR for {spec.name} at batch {batch}; {REBUILD}")

    def _ir(self, engine: str, batch: int) -> Path:
        return self.bundle.path(f"ov/{engine}.b{batch}.xml")

    def _compiled(self, engine: str, batch: int) -> ov.CompiledModel:
        key = (engine, batch)
        if key not in self.compiled:
            if batch not in self.bundle.engines[engine].batch_sizes:
                raise ValueError(f"engine {engine} was built for batch sizes {self.bundle.engines[engine].batch_sizes}")
            before = set(self.cache_folder.glob("*.blob")) if self.cache_folder else set()
            try:  # from the path, so a cached blob is imported without reading the IR
                self.compiled[key] = self.core.compile_model(str(self._ir(engine, batch)), self.ov_device, self.config)
            except RuntimeError as e:
                raise UserError(f"OpenVINO cannot compile {engine} (batch {batch}) from {self.bundle.root}: "
                                f"{str(e).strip().splitlines()[-1]}; {REBUILD}") from None
            if self.cache_folder:
                self._prune(set(self.cache_folder.glob("*.blob")) - before)
        return self.compiled[key]

    def _prune(self, written: set[Path]) -> None:
        """Bound the cache after a compilation. The blobs this process wrote or imported stay (a server's other
        bundles' too), and are touched: their times say when they were last used, whatever the mount's atime."""
        in_use = written | mapped_blobs(self.cache_folder)
        for path in in_use - _blobs_in_use:
            with contextlib.suppress(OSError):  # another user's blob in a shared cache: its times stay
                os.utime(path)
        _blobs_in_use.update(in_use)
        if self.cache_limit is None:
            return
        removed = prune_cache(self.cache_folder, self.cache_limit, keep=_blobs_in_use)
        if removed:
            log.info("OpenVINO cache %s: removed %d least recently used compiled models to stay under %g GiB "
                     "($LCMTRT_OPENVINO_CACHE_GB)", self.cache_folder, len(removed), self.cache_limit / 2**30)

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype | str) -> HostBuffer:
        return HostBuffer(np.zeros(tuple(shape), np.dtype(dtype)))

    def bind(self, engine: str, batch: int, tensors: dict[str, HostBuffer]) -> OvBinding:
        spec = self.bundle.engines[engine]
        expected = {t.name: t for t in spec.inputs + spec.outputs}
        if set(tensors) != set(expected):
            raise ValueError(f"engine {engine} takes {sorted(expected)}, bound {sorted(tensors)}")
        request = self._compiled(engine, batch).create_infer_request()
        for name, buffer in tensors.items():
            want = expected[name]
            if buffer.shape != want.concrete(batch) or buffer.dtype != np.dtype(want.dtype):
                raise ValueError(f"{engine}.{name} needs {want.dtype}{list(want.concrete(batch))}, "
                                 f"bound {buffer.dtype}{list(buffer.shape)}")
            request.set_tensor(name, ov.Tensor(buffer.array, shared_memory=True))
        return OvBinding(request)

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        return launch  # synchronous CPU execution: nothing to record

    def synchronize(self) -> None:
        """infer() returns once the work is done."""

    def timed(self, run: Callable[[], None]) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
