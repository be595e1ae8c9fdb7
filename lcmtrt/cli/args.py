"""What the `lcmtrt` commands share: bounded argparse types and checks on the files a report is written to."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from lcmtrt import limits
from lcmtrt.bundle import SAMPLERS
from lcmtrt.errors import UserError
from lcmtrt.runtime.backends.devices import DEVICE_HELP, parse_device



def device_arg(text: str) -> str:
    """An argparse type for --device of infer, bench and serve: runtime/backends/devices.py's vocabulary, any case
    (each backend then refuses the devices it cannot use, naming those it can)."""
    try:
        return parse_device(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    """The one --device flag of infer, bench and serve."""
    parser.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """The --scheduler, --eta and --timesteps of infer and bench (checked together by runtime.scheduler's
    choose_sampler, as a request's)."""
    parser.add_argument("--scheduler", choices=SAMPLERS,
                        help="the sampler (default: the preset's): lcm, tcd (TCDScheduler), euler-trailing and "
                             "ddim-trailing (Euler/DDIM with timestep_spacing='trailing'); no rebuild")
    parser.add_argument("--eta", type=bounded("eta"),
                        help="tcd's gamma / ddim's eta, as the pipelines' eta (default 0)")
    parser.add_argument("--timesteps", type=bounded_list("timestep"),
                        help="custom timesteps, comma-separated (lcm, tcd, euler-trailing: e.g. DMD2's "
                             "999,749,499,249)")


def bounded(name: str) -> Callable[[str], float]:
    """An argparse type: the number must lie in limits.LIMITS[name] (finite, in range), else a one-line error."""
    def parse(text: str) -> float:
        try:
            return limits.parse(name, text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def bounded_list(name: str) -> Callable[[str], tuple[int, ...]]:
    """Comma-separated integers, each in limits.LIMITS[name]."""
    one = bounded(name)

    def parse(text: str) -> tuple[int, ...]:
        return tuple(int(one(part)) for part in text.split(","))

    parse.__name__ = name
    return parse


def bounded_floats(name: str) -> Callable[[str], float | tuple[float, ...]]:
    """One number, or comma-separated numbers (one per ControlNet), each in limits.LIMITS[name]."""
    one = bounded(name)

    def parse(text: str) -> float | tuple[float, ...]:
        values = tuple(one(part) for part in text.split(","))
        return values[0] if len(values) == 1 else values

    parse.__name__ = name
    return parse


def probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in `folder`: access() says yes for root on /proc and read-only mounts, and finding
    out after minutes of generation would be too late."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".lcmtrt-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror or type(e).__name__})") from None


def check_report_paths(args: argparse.Namespace) -> None:
    """--json and --plot must be writable files (and --plot drawable) before minutes of measuring."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is None:
            continue
        if not path.parent.is_dir():
            raise UserError(f"{flag} {path}: folder {path.parent} does not exist")
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name")
        probe_writable(path.parent, f"{flag} {path}")
    if args.plot is not None:
        if args.plot.suffix.lower() != ".png":
            raise UserError(f"--plot {args.plot}: the plot is a PNG; name it FILE.png")
        from lcmtrt.bench.plots import require_matplotlib

        require_matplotlib()


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_reports(args: argparse.Namespace, report: dict[str, Any], draw: Callable[[dict[str, Any], Path], None]) -> None:
    """--json (atomically) and --plot (drawn by `draw`) of a finished measurement, where asked for."""
    if args.json is not None:
        import json

        write_atomic(args.json, json.dumps(report, indent=2) + "\n")
    if args.plot is not None:
        draw(report, args.plot)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def seeds_arg(text: str) -> int | list[int]:
    seeds = list(bounded_list("seed")(text))
    return seeds[0] if len(seeds) == 1 else seeds


def pair_arg(text: str) -> tuple[int, int]:
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated integers like 1024,1024, got {text!r}") from None
    return first, second
