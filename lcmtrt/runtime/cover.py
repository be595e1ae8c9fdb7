"""How a run's rows are cut into launches of the built batch sizes: the cover with the least predicted time.

A launch at batch size b costs cost[b] whatever number of its rows are real (missing rows are padding, computed
and dropped). On a GPU one launch of 4 often costs little more than one of 1, so 3 rows run fastest padded into one
batch of 4; on a CPU a launch costs about its rows, so 3 rows run fastest as three launches of 1. The costs are
measured per built size at warm-up (`Pipeline.measure_batch_costs`); without measurements a launch is taken to cost
its batch size, which never pads when the sizes cover the rows exactly and prefers fewer launches on a tie.
"""

from __future__ import annotations

from typing import Mapping


def linear_costs(sizes: tuple[int, ...] | list[int]) -> dict[int, float]:
    """The cost model before anything is measured: a launch costs its batch size."""
    return {int(size): float(size) for size in sizes}


def cheapest_cover(rows: int, costs: Mapping[int, float]) -> list[tuple[int, int]]:
    """(row count, batch size) launches covering `rows` rows in order at the least total cost (ties: fewer
    launches, then larger batches first); only the last launch may be padded. `costs` maps each built batch size
    to the seconds one launch takes."""
    if rows < 1:
        return []
    sizes = sorted((int(s) for s in costs), reverse=True)
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"batch sizes must be positive integers, got {sorted(costs)}")
    # best[r]: (cost, launches) of covering r rows, and the batch size of its first launch
    best: list[tuple[float, int]] = [(0.0, 0)] + [(float("inf"), 0)] * rows
    first = [0] * (rows + 1)
    for r in range(1, rows + 1):
        for size in sizes:
            before = best[max(0, r - size)]
            candidate = (before[0] + float(costs[size]), before[1] + 1)
            if candidate < best[r]:
                best[r], first[r] = candidate, size
    chosen, left = [], rows
    while left > 0:
        chosen.append(first[left])
        left -= first[left]
    chosen.sort(reverse=True)  # full launches first; the smallest, possibly padded, last
    launches, left = [], rows
    for size in chosen:
        if left <= 0:  # only with a zero cost: a launch that would run padding alone is left out
            break
        launches.append((min(size, left), size))
        left -= launches[-1][0]
    return launches
