"""Metrics as the losses name them: `{name: (sum, count)}` pairs, added up and divided.

A loss returns sums and counts, so they add across micro-batches, devices and steps without
bias; `means` divides. `Window` keeps the sums of the good steps since the last logged row,
and the sequences and time they took.
"""
from __future__ import annotations

import time


def means(pairs: dict) -> dict[str, float]:
    """{name: sum / count} of {name: (sum, count)} (a count of 0 divides by 1)."""
    return {name: float(s) / max(float(c), 1.0) for name, (s, c) in pairs.items()}


class Window:
    """The logged metrics' sums over the steps since the last row."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.seqs = 0
        self.t0 = time.perf_counter()

    def add(self, pairs: dict) -> None:
        for name, (s, c) in pairs.items():
            acc = self.sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(c)

    def means(self, names=()) -> dict:
        """{name: sum / count} of the metrics added, and None for those of `names` never added (no
        finite step in the window); the loss first."""
        names = sorted(set(names) | set(self.sums), key=lambda name: name != "loss")
        return {name: self.sums[name][0] / max(self.sums[name][1], 1) if name in self.sums else None
                for name in names}

    def seconds(self) -> float:
        return time.perf_counter() - self.t0
