"""What the host CPU offers for reduced precision, read from /proc/cpuinfo (Linux; elsewhere nothing is known)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import AbstractSet

log = logging.getLogger("lcmtrt")

CPUINFO = Path("/proc/cpuinfo")
# int8 dot-product instructions: without one of them oneDNN's int8 kernels build each dot product from several AVX2
# instructions and gain little or nothing over fp32
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info(path: Path | None = None) -> tuple[str | None, frozenset[str]]:
    """The first processor's model name and flags (from `path`, default CPUINFO); (None, no flags) where the file
    cannot be read."""
    name, flags = None, frozenset()
    try:
        with open(path or CPUINFO) as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return name, flags


def int8_warning(flags: AbstractSet[str]) -> str | None:
    """One line saying int8 may not pay off on a CPU without int8 dot products; None where it has them or the flags
    are unknown."""
    if not flags or any(flag in flags for flag in INT8_FLAGS):
        return None
    return ("warning: this CPU has no VNNI or AMX int8 (avx512_vnni, avx_vnni, amx_int8): each int8 dot product "
            "takes several AVX2 instructions, so int8 may not be faster than fp32 here")


def warn_if_int8_slow(path: Path | None = None) -> None:
    """Log int8_warning for this host's CPU, if it applies."""
    warning = int8_warning(cpu_info(path)[1])
    if warning:
        log.warning(warning)
