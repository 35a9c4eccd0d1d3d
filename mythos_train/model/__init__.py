"""Single-device recurrent-depth transformer (never imports torch.distributed)."""

from mythos_train.model.model import MythosModel, TransformerBlock
from mythos_train.model.parallel_plan import ParallelPlan
from mythos_train.model.recurrent import LoopStats

__all__ = ["LoopStats", "MythosModel", "ParallelPlan", "TransformerBlock"]
