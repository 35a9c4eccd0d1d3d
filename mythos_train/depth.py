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
    """`sample(step) -> (n_nograd, n_grad)`; total = n + k, k = min(total, backprop_depth) (truncated backprop).

    Distributions of the total depth (clamped to [min_depth, max_depth]):
      fixed              mean_depth
      uniform            integer uniform on [min_depth, max_depth]
      poisson-lognormal  Huginn: rate ~ LogNormal with E[rate] = mean_depth, total = Poisson(rate) + 1
                         (so E[total] = mean_depth + 1 before clamping, as in Huginn's recpre code)
      poisson            Parcae: total = Poisson(mean_depth - 1) + 1 (E[total] = mean_depth)
    """

    def __init__(self, train: TrainConfig):
        self.distribution = train.depth_distribution
        self.seed = train.seed
        self.mean_depth = float(train.mean_depth)
        self.min_depth = train.min_depth
        self.max_depth = train.max_depth
        self.backprop_depth = train.backprop_depth

    def total_depth(self, step: int) -> int:
        # 0x5DE9 tags this stream so it never coincides with another user of (seed, step).
        rng = np.random.default_rng([self.seed & (2**63 - 1), step, 0x5DE9])
        if self.distribution == "fixed":
            total = round(self.mean_depth)
        elif self.distribution == "uniform":
            total = int(rng.integers(self.min_depth, self.max_depth + 1))
        elif self.distribution == "poisson-lognormal":
            mu = math.log(self.mean_depth) - LOGNORMAL_SIGMA**2 / 2
            total = int(rng.poisson(rng.lognormal(mu, LOGNORMAL_SIGMA))) + 1
        elif self.distribution == "poisson":
            total = int(rng.poisson(max(self.mean_depth - 1.0, 0.0))) + 1
        else:
            raise ValueError(f"train.depth_distribution: unknown {self.distribution!r}")
        return min(max(total, self.min_depth), self.max_depth)

    def sample(self, step: int) -> tuple[int, int]:
        total = self.total_depth(step)
        n_grad = min(total, self.backprop_depth)
        return total - n_grad, n_grad
