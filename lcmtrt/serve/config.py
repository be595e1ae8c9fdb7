"""What `lcmtrt serve` is given, checked in one place for the command's flags and for the Ray app builder's
arguments (`serve run lcmtrt.serve.ray_app:app_builder key=value`, or a `serve deploy` YAML): each number against
its range in limits.py, then the numbers against each other, the keys, and the --engines specs, before anything is
loaded or started. Imports neither FastAPI nor Ray, so the command checks its flags before it needs either."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lcmtrt import limits
from lcmtrt.errors import UserError

# the single-host settings with their defaults (ServeConfig's), and those of a Ray deployment
SERVE_DEFAULTS: dict[str, float] = {"max_n": 4, "max_batch_wait_ms": 10.0, "max_queue": 64, "max_body_mb": 20.0,
                                    "request_timeout_s": 600.0, "max_step_programs": 16}
RAY_DEFAULTS: dict[str, float] = {"replicas": 1, "gpus_per_replica": 0.0, "cpus_per_replica": 1.0}


def flag(key: str) -> str:
    """How the command spells a setting: max_n -> --max-n."""
    return "--" + key.replace("_", "-")


def check_serve_settings(values: Mapping[str, Any], spell: Callable[[str], str] = flag) -> dict[str, float]:
    """`values` (numbers, or their text as a flag or `key=value` gives them; missing ones take SERVE_DEFAULTS) in
    their limits.py ranges and consistent with each other: the checked numbers, or a one-line UserError that names
    the setting as `spell` spells it."""
    checked = limits.checked_values({**SERVE_DEFAULTS, **values}, spell)
    if checked["max_n"] > checked["max_queue"]:
        raise UserError(f"{spell('max_n')} {checked['max_n']} is above {spell('max_queue')} {checked['max_queue']}: "
                        f"a request for more than {checked['max_queue']} images could never be queued; raise "
                        f"{spell('max_queue')} or lower {spell('max_n')}")
    return checked


def check_api_keys(keys: list[Any], name: str = "--api-key") -> tuple[str, ...]:
    """Bearer keys as given (also from LCMTRT_API_KEY); an empty or padded one would never match what a client
    sends, since the server strips the Authorization header's token."""
    for key in keys:
        if not isinstance(key, str) or not key or key != key.strip():
            # the key itself is not repeated: it may be a real one with a stray space
            raise UserError(f"{name}: a key is empty, not text, or has leading or trailing spaces; give each key "
                            "exactly as clients send it")
    return tuple(keys)


def check_ray_settings(values: Mapping[str, Any], spell: Callable[[str], str] = flag) -> dict[str, float]:
    """Replicas and the CPUs and GPUs of each (missing ones take RAY_DEFAULTS), in their limits.py ranges."""
    return limits.checked_values({**RAY_DEFAULTS, **values}, spell)


def parse_models(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """`DIR` or `NAME=DIR`; a folder whose own name holds `=` still works when it exists."""
    models = []
    for spec in specs:
        name, _, folder = spec.partition("=")
        if not folder or Path(spec).exists():
            models.append((Path(spec).resolve().name, Path(spec)))
        elif not name:
            raise UserError(f"--engines {spec!r}: NAME=DIR needs a name before '='")
        else:
            models.append((name, Path(folder)))
    return models
