"""Learning curves of the RL baselines and the stopping rule, as small pure pieces.

A baseline is measured at ``baselines.curve_points`` evenly spaced points of its budget: its Len on
validation users of the *train* simulator (never the test one). With ``baselines.patience`` it
stops once that many points in a row did not improve on the best, and the best point's policy is
the one that goes to the test simulator — the validation-users version of "train until the
validation metric stops improving".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence


def curve_marks(total: int, points: int) -> list[int]:
    """The budget amounts at which the curve is measured: ``points`` evenly spaced, the last at
    ``total`` (none when ``points`` is 0)."""
    return [math.ceil(total * (k + 1) / points) for k in range(points)] if points else []


@dataclass
class CurveTracker:
    """The points measured so far, the best, and whether to stop (``patience`` points in a row
    without a strictly better Len; None never stops)."""

    patience: int | None = None
    points: list[dict[str, float]] = field(default_factory=list)
    best_index: int = -1

    @property
    def best(self) -> dict[str, float] | None:
        return self.points[self.best_index] if self.best_index >= 0 else None

    def add(self, done: int, len_mean: float) -> tuple[bool, bool]:
        """Record a point; returns (it is the new best, training should stop)."""
        self.points.append({"done": int(done), "len_mean": float(len_mean)})
        improved = self.best is None or len_mean > self.best["len_mean"]
        if improved:
            self.best_index = len(self.points) - 1
        since_best = len(self.points) - 1 - self.best_index
        return improved, self.patience is not None and since_best >= self.patience


def mean_curve(curves: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, float]]:
    """The training seeds' curves averaged point by point (a seed that stopped early counts only
    at the points it reached)."""
    out = []
    for index in range(max((len(c) for c in curves), default=0)):
        at = [c[index] for c in curves if len(c) > index]
        out.append({"done": float(sum(p["done"] for p in at) / len(at)),
                    "len_mean": float(sum(p["len_mean"] for p in at) / len(at)), "seeds": len(at)})
    return out
