"""Interleaved rounds and their statistics.

The machine is shared and one run varies by about 10%, so runners are never
timed in blocks (all of mpipe, then all of a peer: a drift in the machine's
load would read as a difference between them).  Each round runs the subject
(mpipe) once, then every other runner once, in an order rotated from round to
round; round ``r``'s subject run and runner X's run form pair ``r``.  Reported:
the median wall time of each runner, and the median of the per-pair ratios
subject / X (below 1: the subject is faster).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mpipe.bench.measure import Sample

logger = logging.getLogger(__name__)


@dataclass
class Rounds:
    subject: str
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def walls(self, name: str) -> list[float]:
        return [s.wall_s for s in self.samples.get(name, [])]

    def median_wall(self, name: str) -> float:
        return statistics.median(self.walls(name))

    def median_cpu_pct(self, name: str) -> float:
        return statistics.median(s.cpu_pct for s in self.samples[name])

    def ratios(self, other: str, of: str | None = None) -> list[float]:
        """``of`` (default: the subject) / other, round by round."""
        return [a.wall_s / b.wall_s for a, b in zip(self.samples[of or self.subject],
                                                    self.samples[other], strict=True)]

    def median_ratio(self, other: str) -> float:
        return statistics.median(self.ratios(other))

    def summary(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for name in self.samples:
            entry: dict[str, Any] = {
                "median_wall_s": round(self.median_wall(name), 4),
                "median_cpu_pct": round(self.median_cpu_pct(name), 1),
                "n": len(self.samples[name]),
            }
            if name != self.subject:
                entry["ratios"] = [round(r, 4) for r in self.ratios(name)]
                entry["median_ratio"] = round(self.median_ratio(name), 4)
            doc[name] = entry
        return doc

    def as_json(self) -> dict[str, Any]:
        return {"subject": self.subject,
                "runs": {n: [s.as_json() for s in v] for n, v in self.samples.items()},
                "summary": self.summary()}


def interleave(subject: tuple[str, Callable[[], Sample]],
               others: list[tuple[str, Callable[[], Sample]]], pairs: int, *,
               before_each: Callable[[], None], on_sample: Callable[[str, Sample], None]
               ) -> Rounds:
    """``pairs`` rounds of subject, then each other runner (order rotated)."""
    rounds = Rounds(subject[0])
    for r in range(pairs):
        k = r % len(others) if others else 0
        order = [subject, *others[k:], *others[:k]]
        for name, run in order:
            before_each()
            sample = run()
            rounds.samples.setdefault(name, []).append(sample)
            on_sample(name, sample)
    return rounds
