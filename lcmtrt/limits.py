"""The valid range of every number a user gives (CLI flags, and the same fields over HTTP): checked up front, so a
NaN, an infinity or an absurd size is refused with its range before anything is loaded or run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lcmtrt.errors import UserError


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = False
    low_open: bool = False  # (low, high] instead of [low, high]

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        bound = (lambda v: str(int(v))) if self.integer else (lambda v: f"{v:g}")
        return f"{kind} in {'(' if self.low_open else '['}{bound(self.low)}, {bound(self.high)}]"

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # ints are exact, however large
            return False
        if self.integer and value != int(value):
            return False
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high


LIMITS = {
    "guidance_scale": Range(0.0, 100.0),
    "strength": Range(0.0, 1.0, low_open=True),
    "control_scale": Range(0.0, 10.0),
    "control_start": Range(0.0, 1.0),
    "control_end": Range(0.0, 1.0),
    "adapter_scale": Range(0.0, 10.0),
    "adapter_factor": Range(0.0, 1.0),
    "steps": Range(1, 1000, integer=True),  # the scheduler then holds it to original_inference_steps
    "original_inference_steps": Range(1, 1000, integer=True),
    "eta": Range(0.0, 1.0),  # TCD's gamma and DDIM's eta
    "timestep": Range(0, 999, integer=True),  # one of --timesteps (the scheduler holds it below num_train_timesteps)
    "num_images": Range(1, 1_000_000, integer=True),
    "seed": Range(0, 2**63 - 1, integer=True),  # torch.manual_seed's range
    "height": Range(8, 8192, integer=True),
    "width": Range(8, 8192, integer=True),
    "batch": Range(1, 256, integer=True),
    "concurrency": Range(1, 1024, integer=True),
    "workspace_gb": Range(0.0, 4096.0, low_open=True),
    "iterations": Range(1, 100_000, integer=True),
    "warmup": Range(0, 10_000, integer=True),
    # lcmtrt serve (and the Ray app's arguments of the same names)
    "port": Range(1, 65535, integer=True),
    "max_n": Range(1, 1024, integer=True),  # images per request
    "max_queue": Range(1, 65536, integer=True),  # images waiting per model
    "max_batch_wait_ms": Range(0.0, 60_000.0),
    "max_body_mb": Range(0.0, 1024.0, low_open=True),
    "request_timeout_s": Range(0.0, 86_400.0, low_open=True),
    "replicas": Range(1, 1024, integer=True),
    "gpus_per_replica": Range(0.0, 1024.0),
    "cpus_per_replica": Range(0.0, 1024.0),
    "max_step_programs": Range(1, 1024, integer=True),  # step programs kept per served model (`serve`)
    "batch_ms": Range(0.0, 3_600_000.0, low_open=True),  # `serve --batch-ms`: a run's milliseconds at a batch size
    # lcmtrt bench-serve
    "requests": Range(1, 1_000_000, integer=True),
    "seconds": Range(0.0, 86_400.0, low_open=True),
    "n": Range(1, 1024, integer=True),
}


def checked(name: str, value: float) -> float:
    """`value` if it lies in `name`'s range, else a UserError naming the range."""
    limit = LIMITS[name]
    if not limit.holds(value):
        raise UserError(f"{name.replace('_', '-')} {value!r} must be {limit.describe()}")
    return int(value) if limit.integer else float(value)


def parse(name: str, text: str) -> float:
    """A number from text (a CLI flag's value), checked against its range."""
    limit = LIMITS[name]
    try:
        value = int(text) if limit.integer else float(text)
    except ValueError:
        raise UserError(f"{name.replace('_', '-')} {text!r} must be {limit.describe()}") from None
    return checked(name, value)


def checked_values(values: Mapping[str, Any], spell: Callable[[str], str] = lambda key: key) -> dict[str, float]:
    """Each value, a number or its text (a flag's, or an argument of `serve run key=value`), checked against
    LIMITS[key]: the same keys with ints and floats, or a UserError naming the first wrong one as `spell(key)`."""
    checked = {}
    for key, value in values.items():
        limit = LIMITS[key]
        shown = value if isinstance(value, str) else repr(value)
        shown = shown if len(shown) <= 40 else f"{shown[:37]}..."
        wrong = UserError(f"{spell(key)} {shown}: must be {limit.describe()}")
        number = value
        if isinstance(value, str):
            try:
                number = int(value) if limit.integer and value.strip().lstrip("+-").isdigit() else float(value)
            except ValueError:
                raise wrong from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not limit.holds(number):
            raise wrong
        checked[key] = int(number) if limit.integer else float(number)
    return checked
