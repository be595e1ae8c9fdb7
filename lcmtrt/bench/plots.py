"""`bench --plot` and `bench-serve --plot`: PNG charts of what their JSON reports hold (matplotlib, the bench extra).

plot_bench: per setting (batch, steps), each stage's median time and the end-to-end p50 side by side for every
contender, and images/s per setting. plot_serve: client latency (p50/p90/p99) and images/s against concurrency,
with the offline images/s beside when the report has them. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from lcmtrt.errors import UserError

log = logging.getLogger(__name__)
DPI = 100
PANEL_IN = (4.6, 3.4)  # one setting's panel, inches
STAGES = (("text", "text"), ("denoise_total", "denoise (all steps)"), ("vae_decode", "VAE decode"))
COLORS = ("#2456c7", "#e07b00", "#2a9d4b", "#b8336a", "#6b4fbb", "#7a7a7a")


def require_matplotlib() -> None:
    """Fail before minutes of benchmarking when the plot could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'lcmtrt[bench]'") from None


def _pyplot() -> Any:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def bench_layout(report: dict[str, Any]) -> tuple[int, int]:
    """(columns, rows) of panels: one per (batch, steps) setting plus one for images/s."""
    panels = len(report["lcmtrt"]["results"]) + 1
    columns = min(3, panels)
    return columns, math.ceil(panels / columns)


def bench_size(report: dict[str, Any]) -> tuple[int, int]:
    """The PNG's (width, height) in pixels for this report."""
    columns, rows = bench_layout(report)
    return round(PANEL_IN[0] * columns * DPI), round((PANEL_IN[1] * rows + 0.5) * DPI)


def sampler_text(env: dict[str, Any]) -> str:
    """The timed sampler as a report names it, e.g. "tcd eta 0.3, timesteps 999,499" (older reports name none: LCM)."""
    text = str(env.get("sampler", "lcm"))
    if env.get("eta"):
        text += f" eta {env['eta']:g}"
    if env.get("timesteps"):
        text += ", timesteps " + ",".join(str(t) for t in env["timesteps"])
    return text


def _title(env: dict[str, Any]) -> str:
    sampler = f", {sampler_text(env)}" if env.get("sampler") else ""  # reports from before samplers name none
    return (f"lcmtrt bench: {env.get('model')} {env.get('size')}{sampler}, {env.get('backend')} "
            f"{env.get('precision')} on {env.get('device')}\n{env.get('cpu', '')}")


def _bar_labels(ax: Any, bars: Any, fmt: str) -> None:
    labels = ["" if math.isnan(b.get_height()) else fmt.format(b.get_height()) for b in bars]
    ax.bar_label(bars, labels=labels, fontsize=6.5, padding=1)


def plot_bench(report: dict[str, Any], path: str | Path) -> Path:
    """Draws a `lcmtrt bench` JSON report: stage and end-to-end times per contender, then images/s; returns path."""
    plt = _pyplot()
    contenders = [name for name in report if name != "speedup"]
    settings = list(report["lcmtrt"]["results"])
    columns, rows = bench_layout(report)
    width, height = bench_size(report)
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    figure.suptitle(_title(report["lcmtrt"].get("environment", {})), fontsize=9)
    bar = 0.8 / len(contenders)
    for ax, setting in zip(axes, settings):
        labels = [label for _, label in STAGES] + ["end to end p50"]
        for i, name in enumerate(contenders):
            result = report[name]["results"].get(setting)
            if result is None:
                continue
            stages = result.get("stages") or {}
            # a system timed whole (optimum-intel) has no stage bars, only its end to end
            values = [stages[key]["median_ms"] if key in stages else math.nan for key, _ in STAGES]
            values.append(result["end_to_end"]["p50_ms"])
            positions = [x + (i - (len(contenders) - 1) / 2) * bar for x in range(len(labels))]
            _bar_labels(ax, ax.bar(positions, values, bar, label=name, color=COLORS[i % len(COLORS)]), "{:.3g}")
        ax.set_xticks(range(len(labels)), labels, fontsize=7.5)
        ax.set_title(setting, fontsize=9)
        ax.set_ylabel("ms (median; end to end p50)", fontsize=7.5)
        ax.tick_params(axis="y", labelsize=7.5)
        ax.margins(y=0.15)
    ax = axes[len(settings)]
    for i, name in enumerate(contenders):
        values = [report[name]["results"][s]["images_per_s"] if s in report[name]["results"] else math.nan
                  for s in settings]
        positions = [x + (i - (len(contenders) - 1) / 2) * bar for x in range(len(settings))]
        _bar_labels(ax, ax.bar(positions, values, bar, label=name, color=COLORS[i % len(COLORS)]), "{:.3g}")
    ax.set_xticks(range(len(settings)), [s.replace("-", "\n") for s in settings], fontsize=7.5)
    ax.set_title("throughput", fontsize=9)
    ax.set_ylabel("images/s (p50)", fontsize=7.5)
    ax.tick_params(axis="y", labelsize=7.5)
    ax.margins(y=0.15)
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=len(contenders), fontsize=8, frameon=False)
    for unused in axes[len(settings) + 1:]:
        unused.set_visible(False)
    return _save(plt, figure, path)


SERVE_SIZE = (1150, 420)  # pixels


def plot_serve(report: dict[str, Any], path: str | Path) -> Path:
    """Draws a `lcmtrt bench-serve` JSON report: latency and images/s against concurrency; returns path."""
    plt = _pyplot()
    levels = report["levels"]
    concurrency = [level["concurrency"] for level in levels]
    figure = plt.figure(figsize=(SERVE_SIZE[0] / DPI, SERVE_SIZE[1] / DPI), dpi=DPI, layout="constrained")
    latency, throughput = figure.subplots(1, 2)
    model = report.get("model", {})
    figure.suptitle(f"lcmtrt bench-serve: model {model.get('id')} ({model.get('size')}, {model.get('backend')} "
                    f"{model.get('precision')}), n={report.get('settings', {}).get('n', 1)} per request", fontsize=9)
    for key, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
        latency.plot(concurrency, [level[key] for level in levels], style, label=key.removesuffix("_ms"))
    latency.set_ylabel("client latency, ms")
    latency.set_ylim(bottom=0)
    throughput.plot(concurrency, [level["images_per_s"] for level in levels], "o-", color=COLORS[0],
                    label="served images/s")
    for level in levels:
        refused = level.get("refused_503", 0) + level.get("lost", 0)
        if refused:
            throughput.annotate(f"{level.get('refused_503', 0)} x 503, {level.get('lost', 0)} lost",
                                (level["concurrency"], level["images_per_s"]), fontsize=7, xytext=(0, -14),
                                textcoords="offset points", ha="right", color="#a01818")
    offline = report.get("offline", {}).get("by_batch", {})
    for i, (batch, figures) in enumerate(offline.items()):
        throughput.axhline(figures["images_per_s"], color=COLORS[(i + 1) % len(COLORS)], linestyle="--",
                           linewidth=1, label=f"offline bench, batch {batch}")
    throughput.set_ylabel("images/s")
    throughput.set_ylim(bottom=0)
    for ax in (latency, throughput):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.minorticks_off()
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    return _save(plt, figure, path)


def _save(plt: Any, figure: Any, path: str | Path) -> Path:
    """PNG bytes rendered in memory, then written to a temporary file beside `path` and renamed over it."""
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("plot written to %s", path)
    return path
