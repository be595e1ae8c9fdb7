"""`--device`: one vocabulary for every command and backend, parsed case-insensitively here; each backend maps it to
its own device names and refuses, in one line naming the ones it can use, a device it cannot.

    auto            the device the bundle was built for (ONNX Runtime's provider, OpenVINO's device; TensorRT: cuda)
    cpu             the CPU (ONNX Runtime's CPU provider, OpenVINO's CPU)
    cuda, cuda:0    the first visible NVIDIA GPU (TensorRT, ONNX Runtime's CUDA provider); CUDA_VISIBLE_DEVICES
                    chooses which GPU that is
    gpu             cuda on TensorRT and ONNX Runtime; OpenVINO's GPU (an Intel GPU)
    gpu.1, npu ...  any device OpenVINO lists here, and AUTO:..., HETERO:..., MULTI:... lists of them

Only the first visible CUDA GPU is used: a backend opened on cuda:N (N > 0) would have to make device N current in
every thread that runs it, so cuda:N is refused with the CUDA_VISIBLE_DEVICES advice instead.
"""

from __future__ import annotations

import re
from typing import Sequence

from lcmtrt.errors import UserError

DEVICE_HELP = ("auto (the bundle's device), cpu, cuda or gpu (TensorRT and ONNX Runtime: the first visible NVIDIA GPU; "
               "OpenVINO: gpu is its GPU), or any OpenVINO device (gpu.1, npu, ...); case-insensitive")
CUDA = ("cuda", "cuda:0", "gpu")  # the CUDA backends' names of the first visible NVIDIA GPU
OPENVINO_META = ("auto", "hetero", "multi", "batch")  # OpenVINO devices that take a list of devices: AUTO:GPU,CPU
_SYNTAX = re.compile(r"[a-z][a-z0-9_]*(\.[0-9]+)?(:[a-z0-9_.,:]+)?")
ONE_GPU = "CUDA_VISIBLE_DEVICES=N selects GPU N as cuda"


def parse_device(text: str) -> str:
    """`text` in the vocabulary's spelling (lowercase, trimmed), or a UserError for what is not a device name."""
    device = str(text).strip().lower()
    if not _SYNTAX.fullmatch(device):
        raise UserError(f"--device {text!r} is not a device name; choose {choices_line()}")
    return device


def choices_line() -> str:
    return "auto, cpu, cuda (or gpu), or an OpenVINO device such as gpu.1 or npu"


def _refuse(device: str, backend: str, usable: str, hint: str = "") -> UserError:
    return UserError(f"--device {device} cannot run this {backend} bundle; it runs on {usable}{hint}")


def _cuda_index_hint(device: str) -> str:
    return f" ({ONE_GPU})" if device.startswith("cuda:") else ""


def tensorrt_device(device: str) -> str:
    """TensorRT runs on the first visible CUDA GPU only: `cuda`."""
    device = parse_device(device)
    if device == "auto" or device in CUDA:
        return "cuda"
    raise _refuse(device, "TensorRT", "auto, cuda or gpu (the first visible NVIDIA GPU)", _cuda_index_hint(device)
                   or ("; build a --backend onnxruntime or openvino bundle for the CPU" if device == "cpu" else ""))


def onnxruntime_device(device: str, built_for: str, cuda_listed: bool) -> str:
    """ONNX Runtime's provider for `device`: "cpu" or "cuda" (its CUDA provider, where this ONNX Runtime has one).
    `built_for`: the provider the bundle was optimized for (auto's answer)."""
    device = parse_device(device)
    chosen = built_for if device == "auto" else "cuda" if device in CUDA else device
    if chosen == "cpu":
        return "cpu"
    if chosen == "cuda" and cuda_listed:
        return "cuda"
    if chosen == "cuda" and device == "auto":
        raise UserError("this bundle was built for ONNX Runtime's CUDA provider, which this host's ONNX Runtime does "
                        "not have; use --device cpu, or install onnxruntime-gpu")
    usable = "auto, cpu, cuda or gpu" if cuda_listed else "auto or cpu (this ONNX Runtime has no CUDA provider)"
    raise _refuse(device, "ONNX Runtime", usable, _cuda_index_hint(device))


def openvino_device(device: str, built_for: str, available: Sequence[str]) -> str:
    """OpenVINO's name for `device` among the `available` ones (`ov.Core().available_devices`, e.g. CPU, GPU.0,
    GPU.1), matched case-insensitively; `built_for`: the device the bundle targets (auto's answer). A device list
    (AUTO:GPU,CPU) keeps OpenVINO's meaning, each listed device checked the same way."""
    device = parse_device(device)
    name = parse_device(built_for) if device == "auto" else device
    if name in OPENVINO_META and device == "auto":  # a bundle built for OpenVINO's own AUTO device
        return name.upper()
    head, _, listed = name.partition(":")
    if listed and head in OPENVINO_META:
        return f"{head.upper()}:" + ",".join(openvino_device(part, built_for, available) for part in listed.split(","))
    canonical = {d.lower(): d for d in available}
    if name in canonical:
        return canonical[name]
    if "." not in name and any(d.startswith(name + ".") for d in canonical):  # GPU when there are GPU.0 and GPU.1
        return name.upper()
    if device == "auto":
        raise UserError(f"this OpenVINO bundle targets device {built_for}, which this host does not have; choose "
                        f"--device among {', '.join(available)} (the devices OpenVINO finds here)")
    raise _refuse(device, "OpenVINO", ", ".join(["auto", *available]) + " (the devices OpenVINO finds here)")
