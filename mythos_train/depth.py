"""Per-step loop depth: how many loop iterations run without gradients (n) and with them (k).

Every rank must run the same depth (FSDP and expert all-to-alls are collective), and a resumed run must draw
what an uninterrupted one would. So a draw is a pure function of (seed, step): a fresh numpy Generator seeded
from both, no communication and no sampler state to checkpoint.
"""

from __future__ import annotations

import math

import numpy as np

from mythos_train.config import TrainConfig

LOGNORMAL_SIGMA = 0.5
"Huginn's spread of the Poisson rate."


class DepthSampler:
    """`sample(step) -> (n_nograd, n_grad)`; total = n + k, k = min(total, backprop_depth) (truncated backprop);
    (0, 1) for the first depth_warmup_steps steps.

    Distributions of the total depth (clamped to [min_depth, max_depth]):
      fixed              mean_depth
      uniform            integer uniform on [min_depth, max_depth]
      poisson-lognormal  Huginn: rate ~ LogNormal(sigma 0.5), total = Poisson(rate) + 1, with E[rate] =
                         mean_depth - 1 so that E[total] = mean_depth like every other distribution
                         (Huginn's own mean r counts the +1 on top: its E[total] is r + 1)
      poisson            Parcae: total = Poisson(mean_depth - 1) + 1 (E[total] = mean_depth)
    mean_depth is the expected total before clamping to [min_depth, max_depth].
    """

    def __init__(self, train: TrainConfig):
        self.distribution = train.depth_distribution
        self.seed = train.seed
        self.mean_depth = float(train.mean_depth)
        self.min_depth = train.min_depth
        self.max_depth = train.max_depth
        self.backprop_depth = train.backprop_depth
        self.warmup_steps = train.depth_warmup_steps

    def total_depth(self, step: int) -> int:
        # 0x5DE9 tags this stream so it never coincides with another user of (seed, step).
        rng = np.random.default_rng([self.seed & (2**63 - 1), step, 0x5DE9])
        if self.distribution == "fixed":
            total = round(self.mean_depth)
        elif self.distribution == "uniform":
            total = int(rng.integers(self.min_depth, self.max_depth + 1))
        elif self.distribution == "poisson-lognormal":
            rate_mean = self.mean_depth - 1.0
            rate = (
                rng.lognormal(math.log(rate_mean) - LOGNORMAL_SIGMA**2 / 2, LOGNORMAL_SIGMA) if rate_mean > 0 else 0.0
            )
            total = int(rng.poisson(rate)) + 1
        elif self.distribution == "poisson":
            total = int(rng.poisson(max(self.mean_depth - 1.0, 0.0))) + 1
        else:
            raise ValueError(f"train.depth_distribution: unknown {self.distribution!r}")
        return min(max(total, self.min_depth), self.max_depth)

    def sample(self, step: int) -> tuple[int, int]:
        if step < self.warmup_steps:
            return 0, 1
        total = self.total_depth(step)
        n_grad = min(total, self.backprop_depth)
        return total - n_grad, n_grad
