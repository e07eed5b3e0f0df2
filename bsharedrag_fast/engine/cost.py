"""What a step costs, learned from the steps the engine runs; the scheduler's rule for
mixing embedding rows into steps that generate.

A step of r rows reads every weight once and multiplies r rows through them, so
t(r) ~ max(weight bytes / bandwidth, r * flops per row / peak) plus fixed overheads. Mixing
e embedding rows into a step of n generation rows costs t(n + e) - t(n); running them in
steps of their own costs e * t(B) / B (B = max_batch_tokens, the cheapest rows a step
offers). Mixing pays when the first is no more than the second:

- on a GPU, or a CPU for small n + e, the step is bandwidth-bound: t(n + e) ~ t(n), so
  mixing saves nearly all of the embedding rows' cost (both kinds share one weight read);
- on this CPU a decode step of <= 16 rows runs the C++ kernel that streams each weight
  once (ops/linear.py), and a few dozen more rows move it to torch's GEMM, whose rows cost
  more than those of a full step: measured on the bench_engine model (d=512, 8 layers,
  2 threads), t(8) = 11 ms, t(48) = 34 ms, t(256) = 122 ms: 40 rows mixed in cost 575 us a
  row against 476 alone, while 184 rows mixed in cost 435 us a row.

StepCosts keeps an exponential moving average of the seconds per step in row buckets
(powers of two and their midpoints) and interpolates between them. Until a bucket has been
seen the rule mixes (what the engine did before), so the table fills from the steps the
workload runs anyway: decode-only steps, full embedding steps, mixed steps.
"""
from __future__ import annotations

import bisect
from typing import Optional

# step sizes the table keeps: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and the midpoints)
_BUCKETS = sorted({int(b) for k in range(15) for b in (2**k, 1.5 * 2**k)})


class StepCosts:
    """Seconds per engine step by its row count (see the module docstring)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha  # weight of the newest observation
        self.seconds: dict[int, float] = {}  # bucket -> EMA of seconds per step

    @staticmethod
    def bucket(rows: int) -> int:
        i = bisect.bisect_left(_BUCKETS, rows)
        if i == len(_BUCKETS):
            return _BUCKETS[-1]
        if i > 0 and rows - _BUCKETS[i - 1] < _BUCKETS[i] - rows:
            return _BUCKETS[i - 1]
        return _BUCKETS[i]

    def observe(self, rows: int, seconds: float) -> None:
        b = self.bucket(rows)
        old = self.seconds.get(b)
        self.seconds[b] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def estimate(self, rows: int) -> Optional[float]:
        """Seconds for a step of `rows` rows: its bucket's average, or the line between the
        nearest seen buckets around it; None when no seen bucket lies on both sides."""
        b = self.bucket(rows)
        if b in self.seconds:
            return self.seconds[b]
        seen = sorted(self.seconds)
        i = bisect.bisect_left(seen, b)
        if i == 0 or i == len(seen):
            return None
        lo, hi = seen[i - 1], seen[i]
        return self.seconds[lo] + (self.seconds[hi] - self.seconds[lo]) * (b - lo) / (hi - lo)

    def mixing_pays(self, gen_rows: int, embed_rows: int, full_rows: int) -> bool:
        """Whether embed_rows embedding rows are cheaper inside a step of gen_rows generation
        rows than in full steps of their own (full_rows rows each). True while any of the
        three costs is unknown (mix, and learn)."""
        if gen_rows == 0 or embed_rows == 0:
            return True
        with_them, without, full = (self.estimate(gen_rows + embed_rows), self.estimate(gen_rows),
                                    self.estimate(full_rows))
        if with_them is None or without is None or full is None:
            return True
        return with_them - without <= embed_rows * full / full_rows
