"""The backend interface the pipeline drives: buffers, bindings (an engine with its buffers bound once), a stream.

A pipeline allocates every buffer and creates every binding before its first request; a request then only writes
host inputs, enqueues `Binding.run()` calls (or one captured graph of them) and reads the outputs.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np


class Buffer(Protocol):
    """A fixed allocation on the backend's device (host memory for ONNX Runtime on CPU)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def write(self, host: np.ndarray) -> None:
        """Enqueue a copy of `host` (same shape and dtype) into the buffer."""

    def read(self) -> np.ndarray:
        """Wait for the stream, then return the buffer's contents as a host array (valid until the next read)."""

    def row(self, index: int) -> Buffer:
        """A view of `self[index]` that aliases this buffer's memory (no copy)."""

    def release(self) -> None:
        """Free the memory now (a pipeline evicting a step program); the buffer must not be used after. A row
        view frees nothing: its parent owns the memory."""


class HostBuffer:
    """A Buffer in host memory: a numpy array with a fixed address that engines read and write in place."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape, self.dtype = array.shape, array.dtype

    def write(self, host: np.ndarray) -> None:
        if host.shape != self.shape or host.dtype != self.dtype:
            raise ValueError(f"buffer is {self.dtype}{list(self.shape)}, got {host.dtype}{list(host.shape)}")
        np.copyto(self.array, host)

    def read(self) -> np.ndarray:
        return self.array

    def row(self, index: int) -> HostBuffer:
        if not 0 <= index < self.shape[0]:
            raise IndexError(f"row {index} of a buffer with {self.shape[0]} rows")
        return HostBuffer(self.array[index])

    def release(self) -> None:
        self.array = None  # the memory goes with the last reference (a released binding holds none)


class Binding(Protocol):
    """One engine at one batch size with every input and output bound to a Buffer."""

    def run(self) -> None:
        """Enqueue one execution; returns without waiting on the device."""

    def release(self) -> None:
        """Free what the binding holds (TensorRT: its execution context) and its references to the buffers; the
        binding must not run after. The buffers themselves stay: release them separately."""


class Backend(Protocol):
    name: str
    device: str  # human-readable: "CPU (onnxruntime)", "NVIDIA H100 80GB HBM3"

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype | str) -> Buffer: ...

    def bind(self, engine: str, batch: int, tensors: dict[str, Buffer]) -> Binding: ...

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        """Return a callable that enqueues the same work as `launch`; where CUDA graphs are supported its first call
        runs `launch` eagerly and captures it, later calls replay the graph, and its `release()` frees the graph."""

    def synchronize(self) -> None: ...

    def timed(self, run: Callable[[], None]) -> float:
        """Seconds the device spends on `run` (CUDA events on a GPU, the wall clock on a CPU)."""
