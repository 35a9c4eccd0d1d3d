"""Explicit FSDP prefetch under expert parallelism (issue 13.6), on 2 gloo processes.

The order the planner names (`prefetch_chain`, printed by `plan`) is compared with what FSDP2 really does in a
forward + backward: the all-gathers each unit's pre-forward / pre-backward issues besides its own, read from
FSDP's param groups while they run. Before explicit prefetch, forward issued none (a unit was gathered only when
the CPU reached it, which under EP waits on the all-to-all's split sizes).
"""

from __future__ import annotations

import pytest
import torch
from distributed_testing import run_distributed
from test_parallel_fsdp_ep import global_batch, lm_loss, tiny_config
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

from mythos_train.model import MythosModel
from mythos_train.planner.report import to_json
from parallel import build_mesh, parallelize


def observed_prefetches(rank: int, world: int) -> dict[str, list[tuple[str, str]]]:
    """(unit, other unit it gathers during its own pre-forward / pre-backward), in the order they happen."""
    cfg = tiny_config(ep=2)
    cfg.model.prelude_layers, cfg.model.coda_layers = 2, 2
    torch.manual_seed(0)
    model = MythosModel(cfg.model)
    wrap = parallelize(model, build_mesh(cfg.parallel, world, "cpu"), cfg)
    lm_loss(model, global_batch(0, world).chunk(world)[rank], 1, 2, wrap).backward()  # lazy init
    events: list[tuple[str, str]] = []
    originals = {name: getattr(FSDPParamGroup, name) for name in ("pre_forward", "pre_backward", "unshard")}

    def recording(name):
        def method(self, *args, **kwargs):
            if name != "unshard" or not (self.is_unsharded or self._all_gather_result is not None):
                events.append((name, self._module_fqn or "root"))
            return originals[name](self, *args, **kwargs)

        return method

    for name in originals:
        setattr(FSDPParamGroup, name, recording(name))
    try:
        lm_loss(model, global_batch(1, world).chunk(world)[rank], 1, 2, wrap).backward()
    finally:
        for name, method in originals.items():
            setattr(FSDPParamGroup, name, method)
    pairs: dict[str, list[tuple[str, str]]] = {"forward": [], "backward": []}
    phase, current = None, None
    for name, unit in events:
        if name in ("pre_forward", "pre_backward"):
            phase, current = name[4:], unit
        elif unit != current and (current, unit) not in pairs[phase]:
            pairs[phase].append((current, unit))
    return pairs


@pytest.mark.slow
def test_fsdp_prefetches_in_the_order_the_plan_names():
    from mythos_train.config import load_config
    from mythos_train.planner.plan import build_plan

    cfg = load_config("configs/debug.toml", ["--model.prelude_layers=2", "--model.coda_layers=2"])
    named = to_json(build_plan(cfg, 1, 2, "h100"), cfg, None)["prefetch"]
    for observed in run_distributed(observed_prefetches, 2):
        assert observed == {phase: [tuple(pair) for pair in pairs] for phase, pairs in named.items()}, observed
